/* Losses: scalar reductions in one work-group of LOSS_WG work-items (so
 * that the sum is one device's deterministic order), and their gradients.
 * Every buffer comes with an element offset; scratch is a block of the
 * graph's arena. */

#define LOSS_WG 64

/* Sums v over the work-group into s[0]; every work-item returns with it
 * readable. */
inline float group_sum(__local float *s, float v)
{
    uint l = get_local_id(0);
    s[l] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint h = LOSS_WG / 2; h > 0; h >>= 1) {
        if (l < h)
            s[l] += s[l + h];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return s[0];
}

/* mean((p - t)^2) over count elements. */
__kernel __attribute__((reqd_work_group_size(LOSS_WG, 1, 1)))
void mse_f32(__global float *out, ulong out_offset, __global const float *p,
             ulong p_offset, __global const float *t, ulong t_offset,
             ulong count)
{
    __local float s[LOSS_WG];
    float acc = 0.0f;
    for (ulong i = get_local_id(0); i < count; i += LOSS_WG) {
        float d = p[p_offset + i] - t[t_offset + i];
        acc += d * d;
    }
    float sum = group_sum(s, acc);
    if (get_local_id(0) == 0)
        out[out_offset] = sum / (float)count;
}

/* d(mse)/dp = 2 (p - t) / count, times dL/d(loss). */
__kernel void mse_backward_f32(__global float *out, ulong out_offset,
                               __global const float *p, ulong p_offset,
                               __global const float *t, ulong t_offset,
                               __global const float *dl, ulong dl_offset,
                               ulong count)
{
    ulong i = get_global_id(0);
    if (i >= count)
        return;
    out[out_offset + i] = 2.0f * (p[p_offset + i] - t[t_offset + i]) *
                          dl[dl_offset] / (float)count;
}

/* logsumexp(row) - row[y], through the row's maximum. */
inline float row_nll(__global const float *row, ulong classes, int y)
{
    float m = -INFINITY;
    for (ulong c = 0; c < classes; c++)
        m = fmax(m, row[c]);
    float s = 0.0f;
    for (ulong c = 0; c < classes; c++)
        s += exp(row[c] - m);
    return m + log(s) - row[y];
}

/* The mean of row_nll over rows whose label is not ignore_index; 0 when
 * every row is ignored.  A label outside [0, classes) that is not
 * ignore_index makes the loss NaN, which an optimiser's finiteness check
 * reports: a compute cannot fail on data. */
__kernel __attribute__((reqd_work_group_size(LOSS_WG, 1, 1)))
void cross_entropy_f32(__global float *out, ulong out_offset,
                       __global const float *logits, ulong logits_offset,
                       __global const int *labels, ulong labels_offset,
                       ulong rows, ulong classes, int ignore_index)
{
    __local float s[LOSS_WG];
    float acc = 0.0f, cnt = 0.0f;
    for (ulong r = get_local_id(0); r < rows; r += LOSS_WG) {
        int y = labels[labels_offset + r];
        if (y == ignore_index)
            continue;
        cnt += 1.0f;
        if (y < 0 || (ulong)y >= classes)
            acc = NAN;
        else
            acc += row_nll(logits + logits_offset + r * classes, classes, y);
    }
    float sum = group_sum(s, acc);
    barrier(CLK_LOCAL_MEM_FENCE);
    float n = group_sum(s, cnt);
    if (get_local_id(0) == 0)
        out[out_offset] = n > 0.0f ? sum / n : 0.0f;
}

/* The number of rows that count (not ignored) into work[0]. */
__kernel __attribute__((reqd_work_group_size(LOSS_WG, 1, 1)))
void cross_entropy_count_f32(__global float *work, ulong work_offset,
                             __global const int *labels, ulong labels_offset,
                             ulong rows, int ignore_index)
{
    __local float s[LOSS_WG];
    float cnt = 0.0f;
    for (ulong r = get_local_id(0); r < rows; r += LOSS_WG)
        cnt += labels[labels_offset + r] != ignore_index ? 1.0f : 0.0f;
    float n = group_sum(s, cnt);
    if (get_local_id(0) == 0)
        work[work_offset] = n;
}

/* One work-item per row: (softmax(row) - onehot(y)) dL / count; zeros for
 * an ignored row, NaN for a label out of range. */
__kernel void cross_entropy_backward_f32(
    __global float *out, ulong out_offset, __global const float *logits,
    ulong logits_offset, __global const int *labels, ulong labels_offset,
    __global const float *dl, ulong dl_offset, __global const float *work,
    ulong work_offset, ulong rows, ulong classes, int ignore_index)
{
    ulong r = get_global_id(0);
    if (r >= rows)
        return;
    __global const float *row = logits + logits_offset + r * classes;
    __global float *dst = out + out_offset + r * classes;
    int y = labels[labels_offset + r];
    if (y == ignore_index || y < 0 || (ulong)y >= classes) {
        float v = y == ignore_index ? 0.0f : NAN;
        for (ulong c = 0; c < classes; c++)
            dst[c] = v;
        return;
    }
    float scale = dl[dl_offset] / work[work_offset];
    float m = -INFINITY;
    for (ulong c = 0; c < classes; c++)
        m = fmax(m, row[c]);
    float s = 0.0f;
    for (ulong c = 0; c < classes; c++)
        s += exp(row[c] - m);
    float inv = 1.0f / s;
    for (ulong c = 0; c < classes; c++)
        dst[c] = (exp(row[c] - m) * inv - ((ulong)y == c ? 1.0f : 0.0f)) *
                 scale;
}

/* The top-1 expert of a row of router weights: the first of the largest. */
inline ulong row_argmax(__global const float *row, ulong experts)
{
    ulong best = 0;
    for (ulong e = 1; e < experts; e++)
        if (row[e] > row[best])
            best = e;
    return best;
}

/* The tokens whose top-1 expert is e, and the sum of e's weights. */
inline float2 expert_load(__global const float *w, ulong rows, ulong experts,
                          ulong e)
{
    float cnt = 0.0f, p = 0.0f;
    for (ulong r = 0; r < rows; r++) {
        __global const float *row = w + r * experts;
        cnt += row_argmax(row, experts) == e ? 1.0f : 0.0f;
        p += row[e];
    }
    return (float2)(cnt, p);
}

/* E sum_e f_e P_e with f_e = count_e / T and P_e = sum_r w[r, e] / T. */
__kernel __attribute__((reqd_work_group_size(LOSS_WG, 1, 1)))
void load_balance_f32(__global float *out, ulong out_offset,
                      __global const float *w, ulong w_offset, ulong rows,
                      ulong experts)
{
    __local float s[LOSS_WG];
    float acc = 0.0f;
    for (ulong e = get_local_id(0); e < experts; e += LOSS_WG) {
        float2 l = expert_load(w + w_offset, rows, experts, e);
        acc += l.x * l.y;
    }
    float sum = group_sum(s, acc);
    if (get_local_id(0) == 0)
        out[out_offset] = (float)experts * sum / ((float)rows * (float)rows);
}

/* count_e into work[e], one work-item per expert. */
__kernel void load_balance_count_f32(__global float *work, ulong work_offset,
                                     __global const float *w, ulong w_offset,
                                     ulong rows, ulong experts)
{
    ulong e = get_global_id(0);
    if (e < experts)
        work[work_offset + e] = expert_load(w + w_offset, rows, experts, e).x;
}

/* The fractions f carry no gradient: dL/dw[r, e] = dL E f_e / T. */
__kernel void load_balance_backward_f32(__global float *out, ulong out_offset,
                                        __global const float *work,
                                        ulong work_offset,
                                        __global const float *dl,
                                        ulong dl_offset, ulong rows,
                                        ulong experts)
{
    ulong i = get_global_id(0);
    if (i >= rows * experts)
        return;
    out[out_offset + i] = dl[dl_offset] * (float)experts *
                          work[work_offset + i % experts] /
                          ((float)rows * (float)rows);
}
