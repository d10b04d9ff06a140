/* The base projection of a mixture, with its expand fused in:
 * y = x W^T (+ bias) (+ alpha z B^T), W [rows, k] and B [rows, zw]
 * row-major, x [tokens, k], z [tokens, zw], y [tokens, rows].  The shrink
 * u = x A^T is the same product without the extras.
 *
 * One work-item owns ROWS consecutive rows of W and TB tokens, streams its
 * rows and tokens once in vector loads (float16, or float8: VW), and keeps
 * a ROWS x TB tile of vector partial sums in registers.  Work-items never share a reduction:
 * CPU OpenCL compilers vectorise within a work-item, not across work-items
 * that each run a reduction loop, and a GEMM library's kernels written for
 * GPUs run several times slower there.  With few tokens (decode) the
 * product is bound by reading W once; with many (prefill) the order of the
 * work-items keeps a block of SR x ST tiles' rows and tokens in cache.
 *
 * The expand (zw rank channels) is added in the same pass, so the layer's
 * output is written once.  ROWS, TB, SR, ST and VW are build options, and so
 * are the storage types of W and B (WT, BT: 0 f32, 1 f16, 2 bf16, and for
 * W only 3 q8): the weights are read as stored and converted in registers,
 * x, z and every sum stay f32 (SPEC section 2).  bf16 is the upper half of
 * an f32 and f16 goes through vload_half, so neither needs cl_khr_fp16;
 * q8 is blocks of an f32 scale and 32 int8 values (atmoe.h, "8-bit
 * blocks"), its offsets in bytes. */

#ifndef ROWS
#define ROWS 8
#endif
#ifndef TB
#define TB 1
#endif
#ifndef SR
#define SR 8
#endif
#ifndef ST
#define ST 8
#endif

#ifndef WT
#define WT 0
#endif
#ifndef BT
#define BT 0
#endif

/* The element type of a weight stored as t, and 16 of its elements (block
 * kb) or one (index i) as f32. */
#define STORE_0 float
#define STORE_1 half
#define STORE_2 ushort
#define STORE_3 uchar
#define STORE_(t) STORE_##t
#define STORE(t) STORE_(t)
#define LOAD16_0(kb, p) vload16((kb), (p))
#define LOAD16_1(kb, p) vload_half16((kb), (p))
#define LOAD16_2(kb, p) as_float16(convert_uint16(vload16((kb), (p))) << 16)
#define LOAD1_0(i, p) ((p)[i])
#define LOAD1_1(i, p) vload_half((i), (p))
#define LOAD1_2(i, p) as_float((uint)(p)[i] << 16)
#define LOAD16_(t, kb, p) LOAD16_##t(kb, p)
/* The width of the products' vectors (VW, 16 or 8; the 8-bit blocks' loop
 * below stays at 16): the host takes the device's native float width, so
 * that a tile of sums fits its registers: on AVX-512 a float16 is one of
 * 32 registers; on AVX2 it is two of 16, and a 4 x 4 tile of float16 sums
 * alone would take all of them (spilled, it ran at half the rate of a
 * 4 x 3 tile of float8 sums on PoCL). */
#ifndef VW
#define VW 16
#endif
#if VW == 8
#define floatV float8
#define VLOADV(kb, p) vload8((kb), (p))
#define LOADV_0(kb, p) vload8((kb), (p))
#define LOADV_1(kb, p) vload_half8((kb), (p))
#define LOADV_2(kb, p) as_float8(convert_uint8(vload8((kb), (p))) << 16)
#else
#define floatV float16
#define VLOADV(kb, p) vload16((kb), (p))
#define LOADV_0 LOAD16_0
#define LOADV_1 LOAD16_1
#define LOADV_2 LOAD16_2
#endif
#define LOADV_(t, kb, p) LOADV_##t(kb, p)
#define LOAD1_(t, i, p) LOAD1_##t(i, p)

inline float sum16(float16 v)
{
    float8 a = v.lo + v.hi;
    float4 b = a.lo + a.hi;
    float2 c = b.lo + b.hi;
    return c.x + c.y;
}

inline float sum8(float8 v)
{
    float4 b = v.lo + v.hi;
    float2 c = b.lo + b.hi;
    return c.x + c.y;
}
#if VW == 8
#define sumV sum8
#else
#define sumV sum16
#endif

/* out[r][t] = the dot product of a's row r and v's row t, n elements from
 * the element offsets arow[r] and vrow[t]: blocks of VW into a register
 * tile, then the n % VW tail; one function per storage type of a. */
#define DEFINE_TILE_DOT(name, T)                                              \
    inline void name(float out[ROWS][TB], __global const STORE(T) *a,         \
                     const ulong arow[ROWS], __global const float *v,         \
                     const ulong vrow[TB], ulong n)                           \
    {                                                                         \
        floatV acc[ROWS][TB];                                                 \
        _Pragma("unroll") for (int r = 0; r < ROWS; r++)                      \
            _Pragma("unroll") for (int t = 0; t < TB; t++)                    \
                acc[r][t] = (floatV)(0.0f);                                   \
        ulong blocks = n / VW;                                                \
        for (ulong kb = 0; kb < blocks; kb++) {                               \
            floatV vv[TB];                                                    \
            _Pragma("unroll") for (int t = 0; t < TB; t++)                    \
                vv[t] = VLOADV(kb, v + vrow[t]);                              \
            _Pragma("unroll") for (int r = 0; r < ROWS; r++) {                \
                floatV av = LOADV_(T, kb, a + arow[r]);                       \
                _Pragma("unroll") for (int t = 0; t < TB; t++)                \
                    acc[r][t] = fma(av, vv[t], acc[r][t]);                    \
            }                                                                 \
        }                                                                     \
        _Pragma("unroll") for (int r = 0; r < ROWS; r++)                      \
            _Pragma("unroll") for (int t = 0; t < TB; t++) {                  \
                float s = sumV(acc[r][t]);                                    \
                for (ulong i = blocks * VW; i < n; i++)                       \
                    s = fma(LOAD1_(T, arow[r] + i, a), v[vrow[t] + i], s);    \
                out[r][t] = s;                                                \
            }                                                                 \
    }

#if WT == 3
/* W in 8-bit blocks: a row of k elements is ceil(k / 32) blocks of 36
 * bytes (arow[r] is its first byte).  Each whole block is two char16 loads
 * widened to float16s, the partial last block (k % 32 elements; the row's
 * padding is never read) one element at a time. */
#define W_ROW_STRIDE(k) (((k) + 31) / 32 * 36)
inline void tile_dot_w(float out[ROWS][TB], __global const uchar *a,
                       const ulong arow[ROWS], __global const float *v,
                       const ulong vrow[TB], ulong n)
{
    float16 acc[ROWS][TB];
#pragma unroll
    for (int r = 0; r < ROWS; r++)
#pragma unroll
        for (int t = 0; t < TB; t++)
            acc[r][t] = (float16)(0.0f);
    ulong blocks = n / 32;
    for (ulong kb = 0; kb < blocks; kb++) {
        float16 v0[TB], v1[TB];
#pragma unroll
        for (int t = 0; t < TB; t++) {
            v0[t] = vload16(2 * kb, v + vrow[t]);
            v1[t] = vload16(2 * kb + 1, v + vrow[t]);
        }
#pragma unroll
        for (int r = 0; r < ROWS; r++) {
            __global const uchar *blk = a + arow[r] + kb * 36;
            float d = *(__global const float *)blk;
            /* The values as 32-bit words (blocks keep 4-byte alignment),
             * which compilers load whole rather than byte by byte. */
            __global const uint *qv = (__global const uint *)(blk + 4);
            float16 q0 = convert_float16(as_char16(vload4(0, qv)));
            float16 q1 = convert_float16(as_char16(vload4(1, qv)));
#if TB == 1
            /* One token: its block sum scaled once (3 vector operations). */
            acc[r][0] = fma((float16)d, fma(q1, v1[0], q0 * v0[0]),
                            acc[r][0]);
#else
            /* Several: the weights dequantised once for all of them. */
            q0 *= d;
            q1 *= d;
#pragma unroll
            for (int t = 0; t < TB; t++)
                acc[r][t] = fma(q1, v1[t], fma(q0, v0[t], acc[r][t]));
#endif
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        __global const uchar *blk = a + arow[r] + blocks * 36;
        float d = blocks * 32 < n ? *(__global const float *)blk : 0.0f;
#pragma unroll
        for (int t = 0; t < TB; t++) {
            float s = sum16(acc[r][t]);
            for (ulong i = blocks * 32; i < n; i++)
                s = fma((float)as_char(blk[4 + i - blocks * 32]) * d,
                        v[vrow[t] + i], s);
            out[r][t] = s;
        }
    }
}
#else
#define W_ROW_STRIDE(k) (k)
DEFINE_TILE_DOT(tile_dot_w, WT)
#endif
DEFINE_TILE_DOT(tile_dot_b, BT)

/* Work-item i covers the rows [rb*ROWS, rb*ROWS + ROWS) and the tokens
 * [tb*TB, tb*TB + TB).  Consecutive work-items walk a block of SR row tiles
 * by st token tiles (st = ST, or fewer when there are fewer token tiles),
 * token tiles fastest, so that the rows and tokens they read are in cache
 * for all but the first; the host launches whole blocks, and the items
 * past the end return.  Rows and tokens past the end of a tile are read
 * again from the last valid one (so every load is in bounds) and not
 * stored. */
__kernel void linear(__global float *y, ulong y_offset,
                   __global const float *x, ulong x_offset,
                   __global const STORE(WT) *w, ulong w_offset, ulong rows,
                   ulong k, ulong tokens, __global const float *bias,
                   ulong bias_offset, int has_bias, __global const float *z,
                   ulong z_offset, __global const STORE(BT) *b, ulong b_offset,
                   ulong zw, float alpha)
{
    ulong token_tiles = (tokens + TB - 1) / TB;
    ulong st = min((ulong)ST, token_tiles);
    ulong blocks_t = (token_tiles + st - 1) / st;
    ulong i = get_global_id(0);
    ulong block = i / (SR * st), j = i % (SR * st);
    ulong r0 = ((block / blocks_t) * SR + j / st) * ROWS;
    ulong t0 = ((block % blocks_t) * st + j % st) * TB;
    if (r0 >= rows || t0 >= tokens)
        return;

    ulong wrow[ROWS], xrow[TB];
#pragma unroll
    for (int r = 0; r < ROWS; r++)
        wrow[r] = w_offset + min(r0 + r, rows - 1) * W_ROW_STRIDE(k);
#pragma unroll
    for (int t = 0; t < TB; t++)
        xrow[t] = x_offset + min(t0 + t, tokens - 1) * k;
    float out[ROWS][TB];
    tile_dot_w(out, w, wrow, x, xrow, k);

    if (zw > 0) {
        ulong brow[ROWS], zrow[TB];
#pragma unroll
        for (int r = 0; r < ROWS; r++)
            brow[r] = b_offset + min(r0 + r, rows - 1) * zw;
#pragma unroll
        for (int t = 0; t < TB; t++)
            zrow[t] = z_offset + min(t0 + t, tokens - 1) * zw;
        float ex[ROWS][TB];
        tile_dot_b(ex, b, brow, z, zrow, zw);
#pragma unroll
        for (int r = 0; r < ROWS; r++)
#pragma unroll
            for (int t = 0; t < TB; t++)
                out[r][t] = fma(alpha, ex[r][t], out[r][t]);
    }

#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        if (r0 + r >= rows)
            break;
        float add = has_bias ? bias[bias_offset + r0 + r] : 0.0f;
#pragma unroll
        for (int t = 0; t < TB; t++)
            if (t0 + t < tokens)
                y[y_offset + (t0 + t) * rows + r0 + r] = out[r][t] + add;
    }
}
