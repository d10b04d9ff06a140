/* Clustering: mean pooling of token embeddings, row norms and scaling,
 * and the passes of k-means (lib/moe/cluster.c drives them).
 *
 * Every matrix is dense row-major f32 with an element offset (a tensor may
 * start inside its buffer).  No kernel uses atomics: each output element
 * has one work-item that adds its terms in a fixed order, so a run gives
 * the same bits every time on a device.
 *
 * The passes over the points walk rows in float8 steps (vload8, a scalar
 * tail for D not a multiple of 8): explicit vectors that a CPU's SIMD units
 * run as they are, where an implicit per-row loop would stay scalar. */

inline float hsum8(float8 v)
{
    float4 h = v.lo + v.hi;
    float2 q = h.lo + h.hi;
    return q.x + q.y;
}

/* sum over j of a[j] b[j], a and b rows of d floats. */
inline float dot_row(__global const float *a, __global const float *b,
                     ulong d)
{
    float8 acc = 0.0f;
    ulong j = 0;
    for (; j + 8 <= d; j += 8)
        acc = fma(vload8(0, a + j), vload8(0, b + j), acc);
    float s = hsum8(acc);
    for (; j < d; j++)
        s = fma(a[j], b[j], s);
    return s;
}

/* sum over j of (a[j] - b[j])^2. */
inline float sqdist_row(__global const float *a, __global const float *b,
                        ulong d)
{
    float8 acc = 0.0f;
    ulong j = 0;
    for (; j + 8 <= d; j += 8) {
        float8 t = vload8(0, a + j) - vload8(0, b + j);
        acc = fma(t, t, acc);
    }
    float s = hsum8(acc);
    for (; j < d; j++) {
        float t = a[j] - b[j];
        s = fma(t, t, s);
    }
    return s;
}

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
    float sum = 0.0f;
    uint kept = 0;
    for (ulong t = 0; t < l; t++) {
        if (has_mask && mask[mask_offset + row * l + t] == 0)
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
    sq[r] = dot_row(x, x, d);
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
    float s = sqdist_row(x + x_offset + r * d, cent + row * d, d);
    dmin[r] = first ? s : fmin(dmin[r], s);
}

/* x C^T in blocks of 4 points (rows xr0..xr3) by 4 centroids (cr0..cr3)
 * per work-item: each float8 step loads 8 vectors for 16 multiply-adds,
 * which keeps a CPU core's FMA units busy rather than waiting on loads.
 * The block is spelled out in named variables (not arrays), which
 * compilers keep in registers.  DOT_BLOCK leaves a_pq (float8) and j (the
 * first column of the scalar tail); DOT_SUM(p, q) is the dot product. */
#define DOT_FOR_BLOCK(X)                                                     \
    X(0, 0) X(0, 1) X(0, 2) X(0, 3) X(1, 0) X(1, 1) X(1, 2) X(1, 3)          \
    X(2, 0) X(2, 1) X(2, 2) X(2, 3) X(3, 0) X(3, 1) X(3, 2) X(3, 3)
#define DOT_ZERO(p, q) float8 a##p##q = 0.0f;
#define DOT_FMA(p, q) a##p##q = fma(x##p, y##q, a##p##q);
#define DOT_BLOCK                                                            \
    DOT_FOR_BLOCK(DOT_ZERO)                                                  \
    ulong j = 0;                                                             \
    for (; j + 8 <= d; j += 8) {                                             \
        float8 x0 = vload8(0, xr0 + j), x1 = vload8(0, xr1 + j);             \
        float8 x2 = vload8(0, xr2 + j), x3 = vload8(0, xr3 + j);             \
        float8 y0 = vload8(0, cr0 + j), y1 = vload8(0, cr1 + j);             \
        float8 y2 = vload8(0, cr2 + j), y3 = vload8(0, cr3 + j);             \
        DOT_FOR_BLOCK(DOT_FMA)                                               \
    }
inline float dot_tail(float s, __global const float *a,
                      __global const float *b, ulong j, ulong d)
{
    for (; j < d; j++)
        s = fma(a[j], b[j], s);
    return s;
}
#define DOT_SUM(p, q) dot_tail(hsum8(a##p##q), xr##p, cr##q, j, d)

/* Rows of x from r0 and of cent from c0, clamped to the last (computed,
 * not written). */
#define DOT_ROWS(r0, c0)                                                     \
    __global const float *xr0 = x + min(r0 + 0, n - 1) * d;                  \
    __global const float *xr1 = x + min(r0 + 1, n - 1) * d;                  \
    __global const float *xr2 = x + min(r0 + 2, n - 1) * d;                  \
    __global const float *xr3 = x + min(r0 + 3, n - 1) * d;                  \
    __global const float *cr0 = cent + min(c0 + 0, k - 1) * d;               \
    __global const float *cr1 = cent + min(c0 + 1, k - 1) * d;               \
    __global const float *cr2 = cent + min(c0 + 2, k - 1) * d;               \
    __global const float *cr3 = cent + min(c0 + 3, k - 1) * d;

#define DOT_STORE(p, q)                                                      \
    if (r0 + p < n && c0 + q < k)                                            \
        dots[dots_offset + (r0 + p) * k + c0 + q] = DOT_SUM(p, q);

/* dots [n, k] = x C^T, a block per work-item (the scores of
 * atmoe_kmeans_assign). */
__kernel void dots_blocked(__global float *dots, ulong dots_offset,
                           __global const float *x, ulong x_offset,
                           __global const float *cent, ulong cent_offset,
                           ulong n, ulong k, ulong d)
{
    ulong g = get_global_id(0);
    ulong blocks_c = (k + 3) / 4;
    ulong r0 = g / blocks_c * 4, c0 = g % blocks_c * 4;
    if (r0 >= n)
        return;
    x += x_offset;
    cent += cent_offset;
    DOT_ROWS(r0, c0)
    DOT_BLOCK
    DOT_FOR_BLOCK(DOT_STORE)
}

#define NEAREST_UPDATE(p, q)                                                 \
    if (c0 + q < k) {                                                        \
        float v = csq[c0 + q] - 2.0f * DOT_SUM(p, q);                        \
        if (v < b##p) {                                                      \
            b##p = v;                                                        \
            i##p = (int)(c0 + q);                                            \
        }                                                                    \
    }
#define NEAREST_STORE(p)                                                     \
    if (r0 + p < n) {                                                        \
        assign[assign_offset + r0 + p] = i##p;                               \
        dist[r0 + p] = sqdist_row(x + (r0 + p) * d, cent + (ulong)i##p * d,  \
                                  d);                                        \
    }

/* The assignment step of k-means in one pass, 4 points per work-item:
 * the products with every centroid block as dots_blocked computes them
 * (the same bits), each point's nearest centroid by ||c||^2 - 2 x.c (the
 * lowest index among equals, centroids in order, as assign_nearest
 * chooses), and then its squared distance formed directly from the
 * difference (see assign_nearest).  No [n, k] matrix is written. */
__kernel void assign_blocked(__global int *assign, ulong assign_offset,
                             __global float *dist,
                             __global const float *x, ulong x_offset,
                             __global const float *cent, ulong cent_offset,
                             __global const float *csq, ulong n, ulong k,
                             ulong d)
{
    ulong r0 = get_global_id(0) * 4;
    if (r0 >= n)
        return;
    x += x_offset;
    cent += cent_offset;
    float b0 = INFINITY, b1 = INFINITY, b2 = INFINITY, b3 = INFINITY;
    int i0 = 0, i1 = 0, i2 = 0, i3 = 0;
    for (ulong c0 = 0; c0 < k; c0 += 4) {
        DOT_ROWS(r0, c0)
        DOT_BLOCK
        DOT_FOR_BLOCK(NEAREST_UPDATE)
    }
    NEAREST_STORE(0)
    NEAREST_STORE(1)
    NEAREST_STORE(2)
    NEAREST_STORE(3)
}

/* The assignment of atmoe_kmeans_assign, after dots_blocked has written
 * its scores dots = x C^T [n, k]: each point's nearest centroid by
 * ||c||^2 - 2 x.c (the lowest index among equals), as assign_blocked
 * chooses.  Its squared distance is then formed directly from the
 * difference: the expanded form loses to cancellation what the objective
 * and the choice of re-seeding points need, when points lie far from the
 * origin and close to their centroids. */
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
    dist[r] = sqdist_row(x + x_offset + r * d,
                         cent + cent_offset + (ulong)arg * d, d);
}

/* The update step, first half: chunk p of `chunk` points, one work-item,
 * adds its points into partial[p, c, :] for their cluster c and counts
 * them into pcount[p, c], a whole row at a time in float8 steps, so that
 * the points stream through once.  Each chunk's sums belong to one
 * work-item, in point order: deterministic without atomics. */
__kernel void partial_sums(__global float *partial, __global int *pcount,
                           __global const float *x, ulong x_offset,
                           __global const int *assign, ulong n, ulong d,
                           ulong k, ulong chunk, ulong chunks)
{
    ulong p = get_global_id(0);
    if (p >= chunks)
        return;
    __global float *sums = partial + p * k * d;
    __global int *counts = pcount + p * k;
    for (ulong i = 0; i < k * d; i++)
        sums[i] = 0.0f;
    for (ulong c = 0; c < k; c++)
        counts[c] = 0;
    ulong begin = p * chunk, end = min(begin + chunk, n);
    x += x_offset;
    for (ulong r = begin; r < end; r++) {
        int c = assign[r];
        __global float *s = sums + (ulong)c * d;
        __global const float *xr = x + r * d;
        ulong j = 0;
        for (; j + 8 <= d; j += 8)
            vstore8(vload8(0, s + j) + vload8(0, xr + j), 0, s + j);
        for (; j < d; j++)
            s[j] += xr[j];
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
