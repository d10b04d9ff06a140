/* Element-wise graph operations on f32.
 *
 * Binary operations broadcast by strides: the host pads both operands to
 * the output's four dimensions and gives a broadcast dimension stride 0, so
 * one kernel covers equal shapes, a bias row, a per-row scale and numpy's
 * other cases.  Unary operations run over dense tensors. */

inline ulong offset4(ulong i, uint4 shape, ulong4 stride)
{
    ulong i3 = i % shape.w;
    i /= shape.w;
    ulong i2 = i % shape.z;
    i /= shape.z;
    ulong i1 = i % shape.y;
    ulong i0 = i / shape.y;
    return i0 * stride.x + i1 * stride.y + i2 * stride.z + i3 * stride.w;
}

#define DEFINE_BINARY(NAME, EXPR)                                             \
    __kernel void NAME(__global float *out, ulong out_offset,                 \
                       __global const float *a, ulong a_offset,               \
                       ulong4 a_stride,                                       \
                       __global const float *b, ulong b_offset,               \
                       ulong4 b_stride, uint4 shape, ulong count)             \
    {                                                                         \
        ulong i = get_global_id(0);                                           \
        if (i >= count)                                                       \
            return;                                                           \
        float x = a[a_offset + offset4(i, shape, a_stride)];                  \
        float y = b[b_offset + offset4(i, shape, b_stride)];                  \
        out[out_offset + i] = EXPR;                                           \
    }

DEFINE_BINARY(add_f32, x + y)
DEFINE_BINARY(mul_f32, x * y)

#define DEFINE_UNARY(NAME, EXPR)                                              \
    __kernel void NAME(__global float *out, ulong out_offset,                 \
                       __global const float *in, ulong in_offset,             \
                       ulong count, float alpha)                              \
    {                                                                         \
        ulong i = get_global_id(0);                                           \
        if (i >= count)                                                       \
            return;                                                           \
        float x = in[in_offset + i];                                          \
        out[out_offset + i] = EXPR;                                           \
    }

/* SiLU and sigmoid through exp(-|x|), so that neither overflows for large
 * |x|; GELU in its exact form, through erfc, which keeps its relative
 * accuracy where 1 + erf(x) cancels (x << 0). */
inline float stable_sigmoid(float x)
{
    float e = exp(-fabs(x));
    return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

DEFINE_UNARY(scale_f32, alpha * x)
DEFINE_UNARY(sigmoid_f32, stable_sigmoid(x))
DEFINE_UNARY(silu_f32, x * stable_sigmoid(x))
DEFINE_UNARY(gelu_f32, 0.5f * x * erfc(-x * 0.70710678118654752f))
