/* The tile variant of cl/linear.cl's product, for prefill-sized batches:
 * y = x W^T (+ bias) (+ alpha z B^T), W [rows, k] and B [rows, zw]
 * row-major, x [tokens, k], z [tokens, zw], y [tokens, rows], with the
 * same arguments as cl/linear.cl's kernel so that the launches share them.
 *
 * A work-group owns a tile of TM tokens by TN rows of y.  It walks k in
 * chunks of TK: the group stages the chunk's TM x TK block of x and TN x TK
 * block of W into local memory (W converted to f32 there), waits, and each
 * of its (TM / WM) x (TN / WN) work-items adds the chunk to a WM x WN
 * register block of sums, reading local memory only.  Each element of x
 * and W is read from global memory once per tile rather than once per
 * output, which is what lets a GPU run a batch at its arithmetic rate
 * instead of its cache's.  Work-item (lt, lr) owns the tokens lt, lt + NT,
 * ... and the rows lr, lr + NR, ... of the tile, so that the items of a
 * row of the group read neighbouring words of local memory and store
 * neighbouring elements of y.
 *
 * The expand (alpha z B^T over zw rank channels) runs the same chunks over
 * z and B into the same registers, z scaled by alpha as it is staged (the
 * sum is linear); the bias is added at the store, so the output is written
 * once.  Tokens, rows and k past the end: staged loads read the last valid
 * token and row again (every load in bounds) and k past the end as zero,
 * and outputs past the end are not stored.
 *
 * Build options: TM, TN, TK, WM, WN (the host checks that WM divides TM,
 * WN divides TN, and that the group and its local memory fit the device),
 * and the storage types of W and B (WT, BT: 0 f32, 1 f16, 2 bf16, and for
 * W only 3 q8, its offsets in bytes), as in cl/linear.cl; x, z and every
 * sum stay f32.  The staging's rows of local memory are one word longer
 * than the tile, so that its column-wise stores fall in distinct banks. */

#ifndef TM
#define TM 64
#endif
#ifndef TN
#define TN 64
#endif
#ifndef TK
#define TK 16
#endif
#ifndef WM
#define WM 4
#endif
#ifndef WN
#define WN 4
#endif
#ifndef WT
#define WT 0
#endif
#ifndef BT
#define BT 0
#endif

#define NT (TM / WM) /* work-items along the tokens */
#define NR (TN / WN) /* and along the rows */
#define NI (NT * NR)

#define STORE_0 float
#define STORE_1 half
#define STORE_2 ushort
#define STORE_3 uchar
#define STORE_(t) STORE_##t
#define STORE(t) STORE_(t)

/* Element i of k of the row of a that starts at element (bytes for q8)
 * row, as f32.  q8: blocks of an f32 scale and 32 int8 values (atmoe.h,
 * "8-bit blocks"), 36 bytes; the scale is read with each element, which
 * the group's neighbouring items share through the cache. */
#define LOAD1_0(a, row, i) ((a)[(row) + (i)])
#define LOAD1_1(a, row, i) vload_half((row) + (i), (a))
#define LOAD1_2(a, row, i) as_float((uint)(a)[(row) + (i)] << 16)
#define LOAD1_3(a, row, i)                                                    \
    (*(__global const float *)((a) + (row) + (i) / 32 * 36) *                 \
     (float)as_char((a)[(row) + (i) / 32 * 36 + 4 + (i) % 32]))
#define LOAD1_(t, a, row, i) LOAD1_##t(a, row, i)
#if WT == 3
#define W_ROW_STRIDE(k) (((k) + 31) / 32 * 36)
#else
#define W_ROW_STRIDE(k) (k)
#endif

/* acc += the tile's share of (scale v) a^T over n: a's rows r0 ... r0 +
 * TN - 1 (stride astride, from a_offset), v's tokens t0 ... t0 + TM - 1
 * (stride n, from v_offset), chunk by chunk through vs and as_. */
#define DEFINE_TILE_PRODUCT(name, T)                                          \
    inline void name(float acc[WM][WN], __global const STORE(T) *a,          \
                     ulong a_offset, ulong astride, ulong rows, ulong r0,    \
                     __global const float *v, ulong v_offset, ulong tokens,  \
                     ulong t0, ulong n, float scale,                         \
                     __local float (*vs)[TM + 1],                            \
                     __local float (*as_)[TN + 1], uint lt, uint lr,         \
                     uint lid)                                               \
    {                                                                         \
        for (ulong k0 = 0; k0 < n; k0 += TK) {                                \
            for (uint e = lid; e < TM * TK; e += NI) {                        \
                uint tt = e / TK, kk = e % TK;                                \
                ulong tok = min(t0 + tt, tokens - 1);                         \
                vs[kk][tt] = k0 + kk < n                                      \
                                 ? scale * v[v_offset + tok * n + k0 + kk]    \
                                 : 0.0f;                                      \
            }                                                                 \
            for (uint e = lid; e < TN * TK; e += NI) {                        \
                uint rr = e / TK, kk = e % TK;                                \
                ulong row = a_offset + min(r0 + rr, rows - 1) * astride;      \
                as_[kk][rr] = k0 + kk < n ? LOAD1_(T, a, row, k0 + kk)        \
                                          : 0.0f;                             \
            }                                                                 \
            barrier(CLK_LOCAL_MEM_FENCE);                                     \
            _Pragma("unroll") for (int kk = 0; kk < TK; kk++) {               \
                float vv[WM], av[WN];                                         \
                _Pragma("unroll") for (int j = 0; j < WM; j++)                \
                    vv[j] = vs[kk][lt + j * NT];                              \
                _Pragma("unroll") for (int i = 0; i < WN; i++)                \
                    av[i] = as_[kk][lr + i * NR];                             \
                _Pragma("unroll") for (int j = 0; j < WM; j++)                \
                    _Pragma("unroll") for (int i = 0; i < WN; i++)            \
                        acc[j][i] = fma(vv[j], av[i], acc[j][i]);             \
            }                                                                 \
            /* The next chunk overwrites the staging only after every item  \
             * has read this one. */                                          \
            barrier(CLK_LOCAL_MEM_FENCE);                                     \
        }                                                                     \
    }

DEFINE_TILE_PRODUCT(tile_product_w, WT)
DEFINE_TILE_PRODUCT(tile_product_b, BT)

/* Group g covers the token tile g % token_tiles and the row tile g /
 * token_tiles: the groups that share a tile of W's rows run next to each
 * other, so that the weight (the larger operand at prefill) is read from
 * memory about once and from the cache for the other token tiles. */
__kernel __attribute__((reqd_work_group_size(NI, 1, 1))) void
linear_tile(__global float *y, ulong y_offset, __global const float *x,
            ulong x_offset, __global const STORE(WT) *w, ulong w_offset,
            ulong rows, ulong k, ulong tokens, __global const float *bias,
            ulong bias_offset, int has_bias, __global const float *z,
            ulong z_offset, __global const STORE(BT) *b, ulong b_offset,
            ulong zw, float alpha)
{
    __local float vs[TK][TM + 1];
    __local float as_[TK][TN + 1];
    uint lid = get_local_id(0);
    uint lr = lid % NR, lt = lid / NR;
    ulong token_tiles = (tokens + TM - 1) / TM;
    ulong g = get_group_id(0);
    ulong r0 = g / token_tiles * TN, t0 = g % token_tiles * TM;

    float acc[WM][WN];
#pragma unroll
    for (int j = 0; j < WM; j++)
#pragma unroll
        for (int i = 0; i < WN; i++)
            acc[j][i] = 0.0f;
    tile_product_w(acc, w, w_offset, W_ROW_STRIDE(k), rows, r0, x, x_offset,
                   tokens, t0, k, 1.0f, vs, as_, lt, lr, lid);
    if (zw > 0)
        tile_product_b(acc, b, b_offset, zw, rows, r0, z, z_offset, tokens,
                       t0, zw, alpha, vs, as_, lt, lr, lid);

#pragma unroll
    for (int i = 0; i < WN; i++) {
        ulong row = r0 + lr + i * NR;
        if (row >= rows)
            continue;
        float add = has_bias ? bias[bias_offset + row] : 0.0f;
#pragma unroll
        for (int j = 0; j < WM; j++) {
            ulong tok = t0 + lt + j * NT;
            if (tok < tokens)
                y[y_offset + tok * rows + row] = acc[j][i] + add;
        }
    }
}
