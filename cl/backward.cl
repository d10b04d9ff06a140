/* Kernels of reverse mode: the engine's building blocks (a sum over the
 * dimensions an operand broadcast along, zeros) and the gradients of the
 * graph's operations where composing existing operations would be
 * wasteful (activations' derivatives, softmax and norm rows, top-k's
 * scatter, mean's spread, a view's padding).  Every buffer comes with an
 * element offset, since graph tensors live at offsets in one arena; every
 * kernel writes every element of its result. */

/* out (shape os, padded to four dimensions on the left) = x (shape xs)
 * summed over each dimension where os is 1 and xs is not. */
__kernel void sum_to_f32(__global float *out, ulong out_offset,
                         __global const float *x, ulong x_offset, uint4 xs,
                         uint4 os, ulong count)
{
    ulong e = get_global_id(0);
    if (e >= count)
        return;
    ulong r = e;
    uint o3 = r % os.w;
    r /= os.w;
    uint o2 = r % os.z;
    r /= os.z;
    uint o1 = r % os.y;
    uint o0 = r / os.y;
    uint n0 = os.x == 1 ? xs.x : 1, n1 = os.y == 1 ? xs.y : 1;
    uint n2 = os.z == 1 ? xs.z : 1, n3 = os.w == 1 ? xs.w : 1;
    x += x_offset;
    float s = 0.0f;
    for (uint a = 0; a < n0; a++)
        for (uint b = 0; b < n1; b++)
            for (uint c = 0; c < n2; c++)
                for (uint d = 0; d < n3; d++) {
                    ulong i0 = n0 > 1 ? a : o0, i1 = n1 > 1 ? b : o1;
                    ulong i2 = n2 > 1 ? c : o2, i3 = n3 > 1 ? d : o3;
                    s += x[((i0 * xs.y + i1) * xs.z + i2) * xs.w + i3];
                }
    out[out_offset + e] = s;
}

__kernel void zero_f32(__global float *out, ulong out_offset, ulong count)
{
    ulong e = get_global_id(0);
    if (e < count)
        out[out_offset + e] = 0.0f;
}

/* dx = dy f'(x), with the forward's formulas (cl/elementwise.cl): the
 * sigmoid through exp(-|x|), GELU exact (erf), not its tanh form. */
inline float bw_sigmoid(float x)
{
    float e = exp(-fabs(x));
    return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

#define DEFINE_ACT_BACKWARD(NAME, EXPR)                                       \
    __kernel void NAME(__global float *out, ulong out_offset,                 \
                       __global const float *dy, ulong dy_offset,             \
                       __global const float *xs, ulong x_offset, ulong count) \
    {                                                                         \
        ulong i = get_global_id(0);                                           \
        if (i >= count)                                                       \
            return;                                                           \
        float x = xs[x_offset + i];                                           \
        float g = dy[dy_offset + i];                                          \
        out[out_offset + i] = g * (EXPR);                                     \
    }

DEFINE_ACT_BACKWARD(sigmoid_backward_f32, bw_sigmoid(x) * (1.0f - bw_sigmoid(x)))
DEFINE_ACT_BACKWARD(silu_backward_f32,
                    bw_sigmoid(x) * (1.0f + x * (1.0f - bw_sigmoid(x))))
DEFINE_ACT_BACKWARD(gelu_backward_f32,
                    0.5f * erfc(-x * 0.70710678118654752f) +
                        x * 0.39894228040143268f * exp(-0.5f * x * x))

/* Rows along a dimension, as in cl/reduce.cl: [outer, n, inner], one
 * work-item per (outer, inner) line. */
#define LINE_SETUP                                                            \
    ulong r = get_global_id(0);                                               \
    if (r >= outer * inner)                                                   \
        return;                                                               \
    ulong base = (r / inner) * n * inner + r % inner;

/* dx = y (dy - sum(dy y)) along the line, from the softmax's result y. */
__kernel void softmax_backward_f32(__global float *out, ulong out_offset,
                                   __global const float *y, ulong y_offset,
                                   __global const float *dy, ulong dy_offset,
                                   ulong outer, ulong n, ulong inner)
{
    LINE_SETUP
    out += out_offset;
    y += y_offset;
    dy += dy_offset;
    float s = 0.0f;
    for (ulong j = 0; j < n; j++)
        s += dy[base + j * inner] * y[base + j * inner];
    for (ulong j = 0; j < n; j++)
        out[base + j * inner] = y[base + j * inner] * (dy[base + j * inner] - s);
}

/* The line of x's gradient: zeros, and dv where top-k kept an entry. */
__kernel void topk_backward_f32(__global float *out, ulong out_offset,
                                __global const float *dv, ulong dv_offset,
                                __global const int *idx, ulong idx_offset,
                                ulong outer, ulong n, ulong inner, ulong k)
{
    LINE_SETUP
    out += out_offset;
    ulong kbase = (r / inner) * k * inner + r % inner;
    for (ulong j = 0; j < n; j++)
        out[base + j * inner] = 0.0f;
    for (ulong t = 0; t < k; t++) {
        int j = idx[idx_offset + kbase + t * inner];
        if (j >= 0 && (ulong)j < n)
            out[base + (ulong)j * inner] = dv[dv_offset + kbase + t * inner];
    }
}

/* dx = dy / n spread along the reduced dimension; one work-item per
 * element of x. */
__kernel void mean_backward_f32(__global float *out, ulong out_offset,
                                __global const float *dy, ulong dy_offset,
                                ulong outer, ulong n, ulong inner)
{
    ulong e = get_global_id(0);
    if (e >= outer * n * inner)
        return;
    ulong o = e / (n * inner), i = e % inner;
    out[out_offset + e] = dy[dy_offset + o * inner + i] / (float)n;
}

/* y = x / max(|x|, eps): dx = (dy - y (y . dy)) / |x| where |x| > eps, and
 * dy / eps where the floor holds (y is then x / eps, linear in x). */
__kernel void l2norm_backward_f32(__global float *out, ulong out_offset,
                                  __global const float *x, ulong x_offset,
                                  __global const float *dy, ulong dy_offset,
                                  ulong outer, ulong n, ulong inner, float eps)
{
    LINE_SETUP
    out += out_offset;
    x += x_offset;
    dy += dy_offset;
    float ss = 0.0f, xd = 0.0f;
    for (ulong j = 0; j < n; j++) {
        float v = x[base + j * inner];
        ss += v * v;
        xd += v * dy[base + j * inner];
    }
    float norm = sqrt(ss);
    if (norm > eps) {
        float inv = 1.0f / norm, c = xd * inv * inv * inv;
        for (ulong j = 0; j < n; j++)
            out[base + j * inner] =
                dy[base + j * inner] * inv - x[base + j * inner] * c;
    } else {
        float inv = 1.0f / eps;
        for (ulong j = 0; j < n; j++)
            out[base + j * inner] = dy[base + j * inner] * inv;
    }
}

/* dx of the norms over the last dimension, with g = dy w:
 * RMSNorm   dx = inv (g - xhat mean(g xhat)),            xhat = x inv;
 * LayerNorm dx = inv (g - mean(g) - xhat mean(g xhat)),  xhat = (x - mu) inv.
 * The weight's and bias's gradients are sums over rows the host composes. */
__kernel void rmsnorm_backward_f32(__global float *out, ulong out_offset,
                                   __global const float *x, ulong x_offset,
                                   __global const float *weight,
                                   ulong weight_offset, int has_weight,
                                   __global const float *dy, ulong dy_offset,
                                   ulong rows, ulong n, float eps)
{
    ulong r = get_global_id(0);
    if (r >= rows)
        return;
    __global const float *row = x + x_offset + r * n;
    __global const float *d = dy + dy_offset + r * n;
    __global float *dst = out + out_offset + r * n;
    weight += weight_offset;
    float ss = 0.0f;
    for (ulong j = 0; j < n; j++)
        ss += row[j] * row[j];
    float inv = rsqrt(ss / (float)n + eps);
    float gx = 0.0f;
    for (ulong j = 0; j < n; j++)
        gx += d[j] * (has_weight ? weight[j] : 1.0f) * row[j] * inv;
    gx /= (float)n;
    for (ulong j = 0; j < n; j++)
        dst[j] = inv * (d[j] * (has_weight ? weight[j] : 1.0f) -
                        row[j] * inv * gx);
}

__kernel void layernorm_backward_f32(__global float *out, ulong out_offset,
                                     __global const float *x, ulong x_offset,
                                     __global const float *weight,
                                     ulong weight_offset, int has_weight,
                                     __global const float *dy,
                                     ulong dy_offset, ulong rows, ulong n,
                                     float eps)
{
    ulong r = get_global_id(0);
    if (r >= rows)
        return;
    __global const float *row = x + x_offset + r * n;
    __global const float *d = dy + dy_offset + r * n;
    __global float *dst = out + out_offset + r * n;
    weight += weight_offset;
    float mean = 0.0f;
    for (ulong j = 0; j < n; j++)
        mean += row[j];
    mean /= (float)n;
    float var = 0.0f;
    for (ulong j = 0; j < n; j++) {
        float c = row[j] - mean;
        var += c * c;
    }
    float inv = rsqrt(var / (float)n + eps);
    float gm = 0.0f, gx = 0.0f;
    for (ulong j = 0; j < n; j++) {
        float g = d[j] * (has_weight ? weight[j] : 1.0f);
        gm += g;
        gx += g * (row[j] - mean) * inv;
    }
    gm /= (float)n;
    gx /= (float)n;
    for (ulong j = 0; j < n; j++)
        dst[j] = inv * (d[j] * (has_weight ? weight[j] : 1.0f) - gm -
                        (row[j] - mean) * inv * gx);
}
