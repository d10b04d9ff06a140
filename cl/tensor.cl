/* Element-wise tensor kernels: fill and copy (with conversions between f32,
 * f16 and bf16)
 * over up to four dimensions with arbitrary strides, so that views of any
 * block of a parent tensor can be filled and copied in place.
 *
 * Shapes are padded to four dimensions on the left; strides and offsets are
 * in elements.  Half values are read and written through vload_half and
 * vstore_half_rte, which need no cl_khr_fp16 support. */

inline ulong element_offset(ulong i, uint4 shape, ulong4 stride)
{
    ulong i3 = i % shape.w;
    i /= shape.w;
    ulong i2 = i % shape.z;
    i /= shape.z;
    ulong i1 = i % shape.y;
    ulong i0 = i / shape.y;
    return i0 * stride.x + i1 * stride.y + i2 * stride.z + i3 * stride.w;
}

#define LOAD_f32(p, i) ((p)[i])
#define LOAD_f16(p, i) vload_half((i), (p))
#define LOAD_i32(p, i) ((p)[i])
#define LOAD_bf16(p, i) as_float((uint)(p)[i] << 16)
#define STORE_f32(v, p, i) ((p)[i] = (v))
#define STORE_f16(v, p, i) vstore_half_rte((v), (i), (p))
#define STORE_i32(v, p, i) ((p)[i] = (v))
#define STORE_bf16(v, p, i) ((p)[i] = bf16_rte(v))
#define TYPE_f32 float
#define TYPE_f16 half
#define TYPE_i32 int
#define TYPE_bf16 ushort

/* f32 to bf16, rounded to nearest even; a NaN stays a (quiet) NaN, which
 * the rounding could otherwise carry into infinity. */
inline ushort bf16_rte(float v)
{
    uint u = as_uint(v);
    if (isnan(v))
        return (ushort)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (ushort)(u >> 16);
}

#define DEFINE_FILL(T, VT)                                                    \
    __kernel void fill_##T(__global TYPE_##T *dst, ulong dst_offset,          \
                           ulong4 dst_stride, uint4 shape, ulong count,       \
                           VT value)                                          \
    {                                                                         \
        ulong i = get_global_id(0);                                           \
        if (i >= count)                                                       \
            return;                                                           \
        STORE_##T(value, dst, dst_offset + element_offset(i, shape,           \
                                                          dst_stride));       \
    }

DEFINE_FILL(f32, float)
DEFINE_FILL(f16, float)
DEFINE_FILL(i32, int)
DEFINE_FILL(bf16, float)

#define DEFINE_COPY(D, S)                                                     \
    __kernel void copy_##D##_##S(__global TYPE_##D *dst, ulong dst_offset,    \
                                 ulong4 dst_stride,                           \
                                 __global const TYPE_##S *src,                \
                                 ulong src_offset, ulong4 src_stride,         \
                                 uint4 shape, ulong count)                    \
    {                                                                         \
        ulong i = get_global_id(0);                                           \
        if (i >= count)                                                       \
            return;                                                           \
        STORE_##D(LOAD_##S(src, src_offset +                                  \
                                    element_offset(i, shape, src_stride)),    \
                  dst, dst_offset + element_offset(i, shape, dst_stride));    \
    }

DEFINE_COPY(f32, f32)
DEFINE_COPY(f32, f16)
DEFINE_COPY(f16, f32)
DEFINE_COPY(f16, f16)
DEFINE_COPY(i32, i32)
DEFINE_COPY(f32, bf16)
DEFINE_COPY(bf16, f32)
DEFINE_COPY(bf16, bf16)
DEFINE_COPY(f16, bf16)
DEFINE_COPY(bf16, f16)

/* 8-bit blocks (atmoe.h, "8-bit blocks"): a row of n = shape.w elements is
 * ceil(n / 32) blocks of 36 bytes, an f32 scale and 32 int8 values, rows
 * one after the other from byte 0 (a q8 tensor has no views, so its offset
 * and strides are not read).  The scale's load needs 4-byte alignment,
 * which whole blocks keep. */
#define Q8_BLOCK 32
#define Q8_BYTES 36

/* Dequantising: element i of the q8 src into dst as D. */
#define DEFINE_DEQUANT(D)                                                     \
    __kernel void copy_##D##_q8(__global TYPE_##D *dst, ulong dst_offset,     \
                                ulong4 dst_stride, __global const uchar *src, \
                                ulong src_offset, ulong4 src_stride,          \
                                uint4 shape, ulong count)                     \
    {                                                                         \
        ulong i = get_global_id(0);                                           \
        if (i >= count)                                                       \
            return;                                                           \
        ulong n = shape.w, nb = (n + Q8_BLOCK - 1) / Q8_BLOCK;                \
        ulong row = i / n, c = i % n;                                         \
        __global const uchar *blk =                                           \
            src + (row * nb + c / Q8_BLOCK) * Q8_BYTES;                       \
        float d = *(__global const float *)blk;                               \
        float v = (float)as_char(blk[4 + c % Q8_BLOCK]) * d;                  \
        STORE_##D(v, dst, dst_offset + element_offset(i, shape, dst_stride)); \
    }

DEFINE_DEQUANT(f32)
DEFINE_DEQUANT(f16)
DEFINE_DEQUANT(bf16)

/* Quantising: work-item i makes block i of the q8 dst from the S elements
 * of src it covers (padding past the row's end is q = 0).  d = max|x| /
 * 127, q = round(x / d) (ties away from zero, as llama.cpp's roundf); a
 * block of zeros has d = 0 and q = 0; a NaN or infinite element makes d
 * NaN, so that the block never reads as finite. */
#define DEFINE_QUANT(S)                                                       \
    __kernel void copy_q8_##S(__global uchar *dst, ulong dst_offset,          \
                              ulong4 dst_stride, __global const TYPE_##S *src,\
                              ulong src_offset, ulong4 src_stride,            \
                              uint4 shape, ulong count)                       \
    {                                                                         \
        ulong i = get_global_id(0);                                           \
        if (i >= count)                                                       \
            return;                                                           \
        ulong n = shape.w, nb = (n + Q8_BLOCK - 1) / Q8_BLOCK;                \
        ulong row = i / nb, c0 = (i % nb) * Q8_BLOCK;                         \
        ulong len = min((ulong)Q8_BLOCK, n - c0);                             \
        float x[Q8_BLOCK];                                                    \
        float amax = 0.0f;                                                    \
        int finite = 1;                                                       \
        for (ulong j = 0; j < len; j++) {                                     \
            x[j] = LOAD_##S(src, src_offset +                                 \
                                     element_offset(row * n + c0 + j, shape,  \
                                                    src_stride));             \
            finite &= isfinite(x[j]);                                         \
            amax = fmax(amax, fabs(x[j]));                                    \
        }                                                                     \
        float d = finite ? amax / 127.0f : NAN;                               \
        __global uchar *blk = dst + i * Q8_BYTES;                             \
        *(__global float *)blk = d;                                           \
        for (ulong j = 0; j < Q8_BLOCK; j++) {                                \
            float q = j < len && d > 0.0f ? round(x[j] / d) : 0.0f;           \
            blk[4 + j] = as_uchar((char)clamp(q, -127.0f, 127.0f));           \
        }                                                                     \
    }

DEFINE_QUANT(f32)
DEFINE_QUANT(f16)
DEFINE_QUANT(bf16)
