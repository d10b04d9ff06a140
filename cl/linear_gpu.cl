/* The group variant of cl/linear.cl's product, shaped for GPUs:
 * y = x W^T (+ bias) (+ alpha z B^T), W [rows, k] and B [rows, zw]
 * row-major, x [tokens, k], z [tokens, zw], y [tokens, rows], with the
 * same arguments as cl/linear.cl's kernel so that the launches share them.
 *
 * A work-group of GS work-items (a power of two) owns GR consecutive rows
 * and shares each row's reduction: item l reads the 4-element blocks l,
 * l + GS, l + 2 GS, ... of the group's rows, so that the items of a group
 * read consecutive addresses (coalesced loads), and keeps a GR x TB tile of
 * partial sums in registers; a tree over local memory then sums the GS
 * partials of each of the GR x TB outputs.  At decode (T = 1 on d = 4096)
 * cl/linear.cl gives 512 work-items each a whole row, which leaves most
 * of a GPU idle and its loads strided by a row; here every row has GS
 * readers.  The expand's partials (alpha z B^T over zw channels) are added
 * to the same registers before the tree: the sum is linear, so one tree
 * serves both and the output is written once.
 *
 * Tokens go by tiles of TB (1, 2 or 4: the host builds one kernel per
 * tile, as for cl/linear.cl), the group walking every tile of the batch
 * over its rows; W's rows are read once per tile, which at the small
 * batches this variant runs (up to the linear route's MAX_TOKENS) stays in
 * cache.  Rows and tokens past the end are read again from the last valid
 * one (every load in bounds) and not stored.  Subgroup reductions are not
 * used: they need an extension this kernel does not assume.
 *
 * The storage types of W and B (WT, BT: 0 f32, 1 f16, 2 bf16) are those
 * of cl/linear.cl, converted in registers; x, z and every sum stay f32. */

#ifndef GS
#define GS 64
#endif
#ifndef GR
#define GR 4
#endif
#ifndef TB
#define TB 1
#endif
#ifndef WT
#define WT 0
#endif
#ifndef BT
#define BT 0
#endif

/* A weight stored as t, and 4 of its elements (block i) or one (index i)
 * as f32: cl/linear.cl's macros at the width of one work-item's load here
 * (neighbouring work-items read neighbouring blocks, so a group's loads
 * are one contiguous run). */
#define STORE_0 float
#define STORE_1 half
#define STORE_2 ushort
#define STORE_(t) STORE_##t
#define STORE(t) STORE_(t)
#define LOAD4_0(i, p) vload4((i), (p))
#define LOAD4_1(i, p) vload_half4((i), (p))
#define LOAD4_2(i, p) as_float4(convert_uint4(vload4((i), (p))) << 16)
#define LOAD1_0(i, p) ((p)[i])
#define LOAD1_1(i, p) vload_half((i), (p))
#define LOAD1_2(i, p) as_float((uint)(p)[i] << 16)
#define LOAD4_(t, i, p) LOAD4_##t(i, p)
#define LOAD1_(t, i, p) LOAD1_##t(i, p)

/* acc[r][t] += scale times the partial dot product of a's row at arow[r]
 * and v's row at vrow[t]: the 4-element blocks lid, lid + GS, ... of the
 * n / 4 whole ones, then the elements lid, lid + GS, ... of the n % 4
 * past them. */
#define DEFINE_GROUP_DOT(name, T)                                             \
    inline void name(float acc[GR][TB], __global const STORE(T) *a,           \
                     const ulong arow[GR], __global const float *v,           \
                     const ulong vrow[TB], ulong n, ulong lid, float scale)   \
    {                                                                         \
        float4 s[GR][TB];                                                     \
        _Pragma("unroll") for (int r = 0; r < GR; r++)                        \
            _Pragma("unroll") for (int t = 0; t < TB; t++)                    \
                s[r][t] = (float4)(0.0f);                                     \
        ulong blocks = n / 4;                                                 \
        for (ulong i = lid; i < blocks; i += GS) {                            \
            float4 vv[TB];                                                    \
            _Pragma("unroll") for (int t = 0; t < TB; t++)                    \
                vv[t] = vload4(i, v + vrow[t]);                               \
            _Pragma("unroll") for (int r = 0; r < GR; r++) {                  \
                float4 av = LOAD4_(T, i, a + arow[r]);                        \
                _Pragma("unroll") for (int t = 0; t < TB; t++)                \
                    s[r][t] = fma(av, vv[t], s[r][t]);                        \
            }                                                                 \
        }                                                                     \
        float tail[GR][TB];                                                   \
        _Pragma("unroll") for (int r = 0; r < GR; r++)                        \
            _Pragma("unroll") for (int t = 0; t < TB; t++)                    \
                tail[r][t] = 0.0f;                                            \
        for (ulong i = blocks * 4 + lid; i < n; i += GS)                      \
            _Pragma("unroll") for (int r = 0; r < GR; r++) {                  \
                float av = LOAD1_(T, arow[r] + i, a);                         \
                _Pragma("unroll") for (int t = 0; t < TB; t++)                \
                    tail[r][t] = fma(av, v[vrow[t] + i], tail[r][t]);         \
            }                                                                 \
        _Pragma("unroll") for (int r = 0; r < GR; r++)                        \
            _Pragma("unroll") for (int t = 0; t < TB; t++) {                  \
                float4 q = s[r][t];                                           \
                float sum = (q.x + q.y) + (q.z + q.w) + tail[r][t];           \
                acc[r][t] = fma(scale, sum, acc[r][t]);                       \
            }                                                                 \
    }

DEFINE_GROUP_DOT(group_dot_w, WT)
DEFINE_GROUP_DOT(group_dot_b, BT)

__kernel __attribute__((reqd_work_group_size(GS, 1, 1))) void
linear_group(__global float *y, ulong y_offset, __global const float *x,
             ulong x_offset, __global const STORE(WT) *w, ulong w_offset,
             ulong rows, ulong k, ulong tokens, __global const float *bias,
             ulong bias_offset, int has_bias, __global const float *z,
             ulong z_offset, __global const STORE(BT) *b, ulong b_offset,
             ulong zw, float alpha)
{
    /* The partials of the GR x TB outputs, one column per work-item. */
    __local float part[GR * TB][GS];
    ulong lid = get_local_id(0);
    ulong r0 = get_group_id(0) * GR;
    /* The host launches ceil(rows / GR) groups: r0 < rows. */
    ulong wrow[GR], brow[GR];
#pragma unroll
    for (int r = 0; r < GR; r++) {
        ulong row = min(r0 + r, rows - 1);
        wrow[r] = w_offset + row * k;
        brow[r] = b_offset + row * zw;
    }

    for (ulong t0 = 0; t0 < tokens; t0 += TB) {
        ulong xrow[TB], zrow[TB];
#pragma unroll
        for (int t = 0; t < TB; t++) {
            ulong tok = min(t0 + t, tokens - 1);
            xrow[t] = x_offset + tok * k;
            zrow[t] = z_offset + tok * zw;
        }
        float acc[GR][TB];
#pragma unroll
        for (int r = 0; r < GR; r++)
#pragma unroll
            for (int t = 0; t < TB; t++)
                acc[r][t] = 0.0f;
        group_dot_w(acc, w, wrow, x, xrow, k, lid, 1.0f);
        if (zw > 0)
            group_dot_b(acc, b, brow, z, zrow, zw, lid, alpha);

#pragma unroll
        for (int r = 0; r < GR; r++)
#pragma unroll
            for (int t = 0; t < TB; t++)
                part[r * TB + t][lid] = acc[r][t];
        barrier(CLK_LOCAL_MEM_FENCE);
        for (ulong s = GS / 2; s > 0; s >>= 1) {
            if (lid < s)
                for (int q = 0; q < GR * TB; q++)
                    part[q][lid] += part[q][lid + s];
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        /* Item q stores output q (r = q / TB, t = q % TB). */
        for (ulong q = lid; q < GR * TB; q += GS) {
            ulong row = r0 + q / TB, tok = t0 + q % TB;
            if (row < rows && tok < tokens)
                y[y_offset + tok * rows + row] =
                    part[q][0] + (has_bias ? bias[bias_offset + row] : 0.0f);
        }
        /* The next tile writes part again only after every item has read
         * its sum. */
        barrier(CLK_LOCAL_MEM_FENCE);
    }
}
