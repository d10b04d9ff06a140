/* Reductions along one dimension of f32 tensors.
 *
 * The host views a tensor as [outer, n, inner] around the reduced
 * dimension; a work-item owns the row (o, i) and walks its n elements with
 * stride inner.  Each work-item reads its row completely before writing it,
 * so the planner may run these in place.  Every buffer comes with an
 * element offset, since graph tensors live at offsets in one arena. */

#define ROW_SETUP                                                             \
    ulong r = get_global_id(0);                                               \
    if (r >= outer * inner)                                                   \
        return;                                                               \
    x += x_offset;                                                            \
    ulong base = (r / inner) * n * inner + r % inner;

__kernel void softmax_f32(__global float *out, ulong out_offset,
                          __global const float *x, ulong x_offset,
                          ulong outer, ulong n, ulong inner)
{
    ROW_SETUP
    out += out_offset;
    /* Subtracting the maximum keeps exp() in range. */
    float m = -INFINITY;
    for (ulong j = 0; j < n; j++)
        m = fmax(m, x[base + j * inner]);
    float sum = 0.0f;
    for (ulong j = 0; j < n; j++)
        sum += exp(x[base + j * inner] - m);
    float inv = 1.0f / sum;
    for (ulong j = 0; j < n; j++)
        out[base + j * inner] = exp(x[base + j * inner] - m) * inv;
}

__kernel void l2norm_f32(__global float *out, ulong out_offset,
                         __global const float *x, ulong x_offset, ulong outer,
                         ulong n, ulong inner, float eps)
{
    ROW_SETUP
    out += out_offset;
    float ss = 0.0f;
    for (ulong j = 0; j < n; j++) {
        float v = x[base + j * inner];
        ss += v * v;
    }
    float inv = 1.0f / fmax(sqrt(ss), eps);
    for (ulong j = 0; j < n; j++)
        out[base + j * inner] = x[base + j * inner] * inv;
}

__kernel void mean_f32(__global float *out, ulong out_offset,
                       __global const float *x, ulong x_offset, ulong outer,
                       ulong n, ulong inner)
{
    ROW_SETUP
    float sum = 0.0f;
    for (ulong j = 0; j < n; j++)
        sum += x[base + j * inner];
    out[out_offset + r] = sum / (float)n;
}

/* Normalisations over the last dimension (inner = 1).  weight and bias are
 * optional: has_weight / has_bias say whether the buffers hold them. */
__kernel void rmsnorm_f32(__global float *out, ulong out_offset,
                          __global const float *x, ulong x_offset,
                          __global const float *weight, ulong weight_offset,
                          int has_weight, ulong rows, ulong n, float eps)
{
    ulong r = get_global_id(0);
    if (r >= rows)
        return;
    __global const float *row = x + x_offset + r * n;
    __global float *dst = out + out_offset + r * n;
    weight += weight_offset;
    float ss = 0.0f;
    for (ulong j = 0; j < n; j++)
        ss += row[j] * row[j];
    float inv = rsqrt(ss / (float)n + eps);
    for (ulong j = 0; j < n; j++)
        dst[j] = row[j] * inv * (has_weight ? weight[j] : 1.0f);
}

__kernel void layernorm_f32(__global float *out, ulong out_offset,
                            __global const float *x, ulong x_offset,
                            __global const float *weight, ulong weight_offset,
                            int has_weight, __global const float *bias,
                            ulong bias_offset, int has_bias, ulong rows,
                            ulong n, float eps)
{
    ulong r = get_global_id(0);
    if (r >= rows)
        return;
    __global const float *row = x + x_offset + r * n;
    __global float *dst = out + out_offset + r * n;
    weight += weight_offset;
    bias += bias_offset;
    float mean = 0.0f;
    for (ulong j = 0; j < n; j++)
        mean += row[j];
    mean /= (float)n;
    /* Two passes: the variance of centred values, not E[x^2] - E[x]^2,
     * which cancels badly when the mean is large. */
    float var = 0.0f;
    for (ulong j = 0; j < n; j++) {
        float d = row[j] - mean;
        var += d * d;
    }
    float inv = rsqrt(var / (float)n + eps);
    for (ulong j = 0; j < n; j++) {
        float v = (row[j] - mean) * inv;
        if (has_weight)
            v *= weight[j];
        if (has_bias)
            v += bias[j];
        dst[j] = v;
    }
}

/* Whether (v1, i1) comes before (v2, i2): larger values first, ties by the
 * lower index, NaN after every number. */
inline bool ranks_before(float v1, ulong i1, float v2, ulong i2)
{
    if (isnan(v1))
        return isnan(v2) && i1 < i2;
    if (isnan(v2))
        return true;
    return v1 > v2 || (v1 == v2 && i1 < i2);
}

/* k rounds of selection: round t picks the best element ranked after the
 * one picked in round t - 1.  O(n k), right for the small k of routers. */
__kernel void topk_f32(__global float *values, ulong values_offset,
                       __global int *indices, ulong indices_offset,
                       __global const float *x, ulong x_offset, ulong outer,
                       ulong n, ulong inner, ulong k)
{
    ROW_SETUP
    ulong out_base = (r / inner) * k * inner + r % inner;
    values += values_offset;
    indices += indices_offset;
    float last_v = 0.0f;
    ulong last_i = 0;
    for (ulong t = 0; t < k; t++) {
        float best_v = 0.0f;
        ulong best_i = n;
        for (ulong j = 0; j < n; j++) {
            float v = x[base + j * inner];
            if (t > 0 && !ranks_before(last_v, last_i, v, j))
                continue;
            if (best_i == n || ranks_before(v, j, best_v, best_i)) {
                best_v = v;
                best_i = j;
            }
        }
        values[out_base + t * inner] = best_v;
        indices[out_base + t * inner] = (int)best_i;
        last_v = best_v;
        last_i = best_i;
    }
}
