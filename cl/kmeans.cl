/* Clustering: mean pooling of token embeddings, row norms and scaling,
 * and the passes of k-means (lib/moe/cluster.c drives them).
 *
 * Every matrix is dense row-major f32 with an element offset (a tensor may
 * start inside its buffer).  No kernel uses atomics: each output element
 * has one work-item that adds its terms in a fixed order, so a run gives
 * the same bits every time on a device. */

/* out[n, j] = mean of tokens[n, l, j] over the l whose mask[n, l] is not
 * zero (every l without a mask).  The host has checked that every masked
 * row keeps at least one token. */
__kernel void pool_mean(__global float *out, ulong out_offset,
                        __global const float *tokens, ulong tokens_offset,
                        __global const int *mask, ulong mask_offset,
                        int has_mask, ulong n, ulong l, ulong d)
{
    ulong g = get_global_id(0);
    if (g >= n * d)
        return;
    ulong row = g / d, j = g % d;
    tokens += tokens_offset + row * l * d + j;
    mask += mask_offset + row * l;
    float sum = 0.0f;
    uint kept = 0;
    for (ulong t = 0; t < l; t++) {
        if (has_mask && mask[t] == 0)
            continue;
        sum += tokens[t * d];
        kept++;
    }
    out[out_offset + g] = sum / (float)kept;
}

/* sq[r] = sum over j of x[r, j]^2: the host reads it back to find
 * zero-norm and non-finite rows, and k-means computes its centroids'
 * for the assignment. */
__kernel void row_sqnorm(__global float *sq, __global const float *x,
                         ulong x_offset, ulong n, ulong d)
{
    ulong r = get_global_id(0);
    if (r >= n)
        return;
    x += x_offset + r * d;
    float s = 0.0f;
    for (ulong j = 0; j < d; j++)
        s += x[j] * x[j];
    sq[r] = s;
}

/* out[r, j] = x[r, j] / sqrt(sq[r]); out may be x. */
__kernel void scale_rows(__global float *out, ulong out_offset,
                         __global const float *x, ulong x_offset,
                         __global const float *sq, ulong n, ulong d)
{
    ulong g = get_global_id(0);
    if (g >= n * d)
        return;
    out[out_offset + g] = x[x_offset + g] / sqrt(sq[g / d]);
}

/* k-means++ seeding: dmin[r] = min(dmin[r], ||x[r] - c||^2) for the new
 * centroid c (row `row` of cent), or the distance itself for the first.
 * The difference is formed directly, not through ||x||^2 - 2 x.c + ||c||^2,
 * so the draws that follow see distances without cancellation. */
__kernel void seed_distance(__global float *dmin, __global const float *x,
                            ulong x_offset, __global const float *cent,
                            ulong row, int first, ulong n, ulong d)
{
    ulong r = get_global_id(0);
    if (r >= n)
        return;
    x += x_offset + r * d;
    cent += row * d;
    float s = 0.0f;
    for (ulong j = 0; j < d; j++) {
        float t = x[j] - cent[j];
        s += t * t;
    }
    dmin[r] = first ? s : fmin(dmin[r], s);
}

/* The assignment step after the GEMM dots = x C^T [n, k]: each point's
 * nearest centroid by ||c||^2 - 2 x.c (the lowest index among equals).
 * Its squared distance is then formed directly from the difference: the
 * expanded form loses to cancellation what the objective and the choice of
 * re-seeding points need, when points lie far from the origin and close to
 * their centroids. */
__kernel void assign_nearest(__global int *assign, ulong assign_offset,
                             __global float *dist,
                             __global const float *dots, ulong dots_offset,
                             __global const float *csq,
                             __global const float *x, ulong x_offset,
                             __global const float *cent, ulong cent_offset,
                             ulong n, ulong k, ulong d)
{
    ulong r = get_global_id(0);
    if (r >= n)
        return;
    dots += dots_offset + r * k;
    float best = INFINITY;
    int arg = 0;
    for (ulong c = 0; c < k; c++) {
        float v = csq[c] - 2.0f * dots[c];
        if (v < best) {
            best = v;
            arg = (int)c;
        }
    }
    assign[assign_offset + r] = arg;
    x += x_offset + r * d;
    cent += cent_offset + (ulong)arg * d;
    float s = 0.0f;
    for (ulong j = 0; j < d; j++) {
        float t = x[j] - cent[j];
        s += t * t;
    }
    dist[r] = s;
}

/* The update step, first half: chunk p of `chunk` points adds its points
 * into partial[p, c, j] for their cluster c, and the work-item of column 0
 * counts them into pcount[p, c].  Each (p, j) belongs to one work-item,
 * which is what makes the sums deterministic without atomics. */
__kernel void partial_sums(__global float *partial, __global int *pcount,
                           __global const float *x, ulong x_offset,
                           __global const int *assign, ulong n, ulong d,
                           ulong k, ulong chunk, ulong chunks)
{
    ulong g = get_global_id(0);
    if (g >= chunks * d)
        return;
    ulong p = g / d, j = g % d;
    __global float *sums = partial + p * k * d + j;
    __global int *counts = pcount + p * k;
    for (ulong c = 0; c < k; c++)
        sums[c * d] = 0.0f;
    if (j == 0)
        for (ulong c = 0; c < k; c++)
            counts[c] = 0;
    ulong begin = p * chunk, end = min(begin + chunk, n);
    x += x_offset + j;
    for (ulong r = begin; r < end; r++) {
        int c = assign[r];
        sums[(ulong)c * d] += x[r * d];
        if (j == 0)
            counts[c]++;
    }
}

/* Second half: cent[c, j] = the sum of the chunks' partial sums, in chunk
 * order, over the cluster's count; an empty cluster keeps its centroid
 * (the host re-seeds it).  counts[c] receives the count. */
__kernel void finish_means(__global float *cent, __global int *counts,
                           __global const float *partial,
                           __global const int *pcount, ulong d, ulong k,
                           ulong chunks)
{
    ulong g = get_global_id(0);
    if (g >= k * d)
        return;
    ulong c = g / d, j = g % d;
    float s = 0.0f;
    int count = 0;
    for (ulong p = 0; p < chunks; p++) {
        s += partial[(p * k + c) * d + j];
        count += pcount[p * k + c];
    }
    if (j == 0)
        counts[c] = count;
    if (count > 0)
        cent[g] = s / (float)count;
}
