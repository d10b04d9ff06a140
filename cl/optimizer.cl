/* The optimiser (lib/train/optimizer.c): the gradients' sum of squares for
 * the global norm, accumulation of micro-batches, and the fused AdamW and
 * SGD updates.  Every buffer comes with an element offset, since
 * gradients live at offsets in a graph's arena and weights at offsets in
 * stacked buffers.  Reductions run in a fixed order, so that a step gives
 * the same bits every time (a resumed run continues bit for bit). */

#define SUMSQ_GROUP 64

/* Partial sums of x^2 over x[0, n): work-group w of the launch writes
 * partials[slot + w], each work-item striding over the whole range. */
__kernel __attribute__((reqd_work_group_size(SUMSQ_GROUP, 1, 1)))
void optimizer_sumsq(__global const float *x, ulong x_offset, ulong n,
                     __global float *partials, ulong slot)
{
    __local float acc[SUMSQ_GROUP];
    ulong lid = get_local_id(0);
    float s = 0.0f;
    x += x_offset;
    for (ulong i = get_global_id(0); i < n; i += get_global_size(0)) {
        float v = x[i];
        s += v * v;
    }
    acc[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (ulong h = SUMSQ_GROUP / 2; h > 0; h /= 2) {
        if (lid < h)
            acc[lid] += acc[lid + h];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0)
        partials[slot + get_group_id(0)] = acc[0];
}

/* out[out_offset] = the sum of partials[0, n), by one work-group (out may
 * be partials, past n). */
__kernel __attribute__((reqd_work_group_size(SUMSQ_GROUP, 1, 1)))
void optimizer_sum(__global const float *partials, ulong n,
                   __global float *out, ulong out_offset)
{
    __local float acc[SUMSQ_GROUP];
    ulong lid = get_local_id(0);
    float s = 0.0f;
    for (ulong i = lid; i < n; i += SUMSQ_GROUP)
        s += partials[i];
    acc[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (ulong h = SUMSQ_GROUP / 2; h > 0; h /= 2) {
        if (lid < h)
            acc[lid] += acc[lid + h];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0)
        out[out_offset] = acc[0];
}

/* acc = g (the first micro-batch of a step: no clearing pass) or
 * acc + g. */
__kernel void optimizer_accumulate(__global float *acc, ulong acc_offset,
                                   __global const float *g, ulong g_offset,
                                   ulong n, int first)
{
    ulong i = get_global_id(0);
    if (i >= n)
        return;
    float v = g[g_offset + i];
    acc[acc_offset + i] = first ? v : acc[acc_offset + i] + v;
}

/* AdamW over one entry, as torch.optim.AdamW: with the gradient
 * gs * g (gs: the clip factor over the number of micro-batches),
 *   m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2,
 *   p = p (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps)
 * with bc1 = 1 - beta1^t, bc2 = 1 - beta2^t. */
__kernel void optimizer_adamw(__global float *p, ulong p_offset,
                              __global const float *g, ulong g_offset,
                              __global float *m, __global float *v,
                              ulong s_offset, ulong n, float gs, float lr,
                              float beta1, float beta2, float eps, float wd,
                              float bc1, float bc2)
{
    ulong i = get_global_id(0);
    if (i >= n)
        return;
    float gi = gs * g[g_offset + i];
    float mi = beta1 * m[s_offset + i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[s_offset + i] + (1.0f - beta2) * gi * gi;
    m[s_offset + i] = mi;
    v[s_offset + i] = vi;
    float pi = p[p_offset + i] * (1.0f - lr * wd);
    p[p_offset + i] = pi - lr * (mi / bc1) / (sqrt(vi / bc2) + eps);
}

/* SGD over one entry: with momentum mu > 0, b = mu b + g (b starts at 0,
 * so the first step's b is g, as in torch.optim.SGD) and the step follows
 * b; with mu = 0 (m unused) it follows g.  Weight decay is decoupled. */
__kernel void optimizer_sgd(__global float *p, ulong p_offset,
                            __global const float *g, ulong g_offset,
                            __global float *m, ulong s_offset, ulong n,
                            float gs, float lr, float mu, float wd)
{
    ulong i = get_global_id(0);
    if (i >= n)
        return;
    float d = gs * g[g_offset + i];
    if (mu > 0.0f) {
        d += mu * m[s_offset + i];
        m[s_offset + i] = d;
    }
    p[p_offset + i] = p[p_offset + i] * (1.0f - lr * wd) - lr * d;
}
