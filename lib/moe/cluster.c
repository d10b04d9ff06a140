/* Clustering of instruction embeddings: mean pooling, L2 normalisation and
 * k-means with k-means++ seeding, driven from the host over the passes of
 * cl/kmeans.cl.  The product x C^T of an assignment is a blocked kernel of
 * its own rather than a CLBlast GEMM: K is small (tens of clusters), a
 * shape that CLBlast's tiles serve badly (on PoCL it ran at a fifth of the
 * kernel's rate), and the kernel adds in a fixed order.
 *
 * The host makes the decisions between passes (the random draws, the
 * convergence test, which points re-seed empty clusters) from vectors of N
 * floats it reads back; the passes over the [N, D] matrix, which are where
 * the time goes, stay on the device.  The objective is summed on the host
 * in double, in point order, which makes it exact enough to compare runs
 * and independent of how the device schedules work. */
#include <config.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/alloc.h"
#include "device/program.h"
#include "device/tuning.h"
#include "tensor/tensor.h"

#define PROGRAM "kmeans"
#define DEFAULT_ITERATIONS 100
/* The update's partial sums: one work-item per chunk of at least
 * CHUNK_POINTS points, which streams its rows once; up to MAX_CHUNKS of
 * them keep a CPU's cores busy while their sums (MAX_CHUNKS K D floats)
 * stay small next to the points.  A GPU would want more, narrower
 * work-items (left to a tuned parameter). */
#define CHUNK_POINTS 256
#define MAX_CHUNKS 64

#define SET_ARG(k, i, v) clSetKernelArg((k), (i), sizeof(v), &(v))

/* A contiguous tensor of the given dtype and rank, with its shape. */
static atmoe_status check_matrix(atmoe_context *ctx, const char *fn,
                                 const char *what, const atmoe_tensor *t,
                                 atmoe_dtype dtype, int ndim)
{
    if (t->ctx != ctx)
        return atm_fail(ctx, ATMOE_STATUS_WRONG_CONTEXT,
                        "%s: %s belongs to another context", fn, what);
    if (t->dtype != dtype)
        return atm_fail(ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: %s is %s, must be %s", fn, what,
                        atmoe_dtype_name(t->dtype), atmoe_dtype_name(dtype));
    char buf[96];
    if (t->ndim != ndim)
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s has shape %s, must have %d dimension(s)", fn,
                        what, atm_shape_string(t->ndim, t->shape, buf,
                                               sizeof buf), ndim);
    if (!atm_tensor_is_contiguous(t))
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: %s must be contiguous (not a strided view)", fn,
                        what);
    return ATMOE_STATUS_OK;
}

static atmoe_status shape_fail(atmoe_context *ctx, const char *fn,
                               const char *what, const atmoe_tensor *t,
                               const char *want)
{
    char buf[96];
    return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                    "%s: %s has shape %s, must be %s", fn, what,
                    atm_shape_string(t->ndim, t->shape, buf, sizeof buf),
                    want);
}

static atmoe_status kernel(atmoe_context *ctx, const char *name,
                           cl_kernel *k)
{
    return atm_kernel_get(ctx, PROGRAM, "", name, k);
}

/* A 1-D pass of cl/kmeans.cl over count items, in work-groups of the
 * tuned "kmeans" WG (64 by default, as every pass had). */
static atmoe_status launch(atmoe_context *ctx, cl_kernel k, size_t count,
                           const char *name)
{
    return atm_launch_1d_local(ctx, k, count,
                               atm_param_work_group(ctx, ATM_PARAM_KMEANS_WG),
                               name, NULL);
}

static atmoe_status arg_fail(atmoe_context *ctx, const char *name)
{
    return atm_fail(ctx, ATMOE_STATUS_OPENCL_ERROR,
                    "clSetKernelArg(%s) failed", name);
}

static atmoe_status read_buffer(atmoe_context *ctx, cl_mem b, size_t offset,
                                void *dst, size_t bytes, const char *what)
{
    cl_int err = clEnqueueReadBuffer(ctx->queue, b, CL_TRUE, offset, bytes,
                                     dst, 0, NULL, NULL);
    return err == CL_SUCCESS ? ATMOE_STATUS_OK : atm_fail_cl(ctx, err, what);
}

static atmoe_status copy_buffer(atmoe_context *ctx, cl_mem src,
                                size_t src_offset, cl_mem dst,
                                size_t dst_offset, size_t bytes)
{
    cl_int err = clEnqueueCopyBuffer(ctx->queue, src, dst, src_offset,
                                     dst_offset, bytes, 0, NULL, NULL);
    return err == CL_SUCCESS ? ATMOE_STATUS_OK
                             : atm_fail_cl(ctx, err, "clEnqueueCopyBuffer");
}

/* sq[r] = ||row r||^2 of x [n, d] at element offset off. */
static atmoe_status row_sqnorm(atmoe_context *ctx, cl_mem sq, cl_mem x,
                               cl_ulong off, cl_ulong n, cl_ulong d)
{
    cl_kernel k;
    atmoe_status st = kernel(ctx, "row_sqnorm", &k);
    if (st != ATMOE_STATUS_OK)
        return st;
    cl_int err = SET_ARG(k, 0, sq);
    err |= SET_ARG(k, 1, x);
    err |= SET_ARG(k, 2, off);
    err |= SET_ARG(k, 3, n);
    err |= SET_ARG(k, 4, d);
    if (err != CL_SUCCESS)
        return arg_fail(ctx, "row_sqnorm");
    return launch(ctx, k, n, "row_sqnorm");
}

/* The squared norms of the rows of t [n, d] on the device (sq) and in host
 * memory (host, n floats), checked: the first row that is not finite, or
 * with zero_bad of zero norm, fails naming `what` and the row. */
static atmoe_status checked_sqnorms(atmoe_context *ctx, const char *fn,
                                    const char *what, const atmoe_tensor *t,
                                    cl_mem sq, float *host, int zero_bad)
{
    size_t n = t->shape[0], d = t->shape[1];
    atmoe_status st = row_sqnorm(ctx, sq, t->buffer, t->offset, n, d);
    if (st == ATMOE_STATUS_OK)
        st = read_buffer(ctx, sq, 0, host, n * sizeof *host, fn);
    if (st != ATMOE_STATUS_OK)
        return st;
    /* A NaN or infinity anywhere in a row makes its sum of squares NaN or
     * infinite; finite values too large to square do too, and are as
     * unusable for distances. */
    for (size_t r = 0; r < n; r++) {
        if (!isfinite(host[r]))
            return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                            "%s: row %zu of %s is not finite (NaN, infinite "
                            "or too large to square)", fn, r, what);
        if (zero_bad && host[r] == 0.0f)
            return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                            "%s: row %zu of %s has zero norm and cannot be "
                            "normalised", fn, r, what);
    }
    return ATMOE_STATUS_OK;
}

static atmoe_status scale_rows(atmoe_context *ctx, cl_mem out,
                               cl_ulong out_off, cl_mem x, cl_ulong x_off,
                               cl_mem sq, cl_ulong n, cl_ulong d)
{
    cl_kernel k;
    atmoe_status st = kernel(ctx, "scale_rows", &k);
    if (st != ATMOE_STATUS_OK)
        return st;
    cl_int err = SET_ARG(k, 0, out);
    err |= SET_ARG(k, 1, out_off);
    err |= SET_ARG(k, 2, x);
    err |= SET_ARG(k, 3, x_off);
    err |= SET_ARG(k, 4, sq);
    err |= SET_ARG(k, 5, n);
    err |= SET_ARG(k, 6, d);
    if (err != CL_SUCCESS)
        return arg_fail(ctx, "scale_rows");
    return launch(ctx, k, n * d, "scale_rows");
}

/* dst = src with unit rows; src is checked first, so a failure leaves dst
 * alone.  A scratch of n floats on the device and the host. */
static atmoe_status normalize_rows(atmoe_context *ctx, const char *fn,
                                   const char *what, const atmoe_tensor *src,
                                   cl_mem dst, cl_ulong dst_off)
{
    size_t n = src->shape[0], d = src->shape[1];
    float *host = atm_malloc(n * sizeof *host);
    if (host == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: no host memory for %zu row norms", fn, n);
    cl_mem sq = NULL;
    atmoe_status st = atm_buffer_new(ctx, n * sizeof(float), &sq, fn);
    if (st == ATMOE_STATUS_OK)
        st = checked_sqnorms(ctx, fn, what, src, sq, host, 1);
    if (st == ATMOE_STATUS_OK)
        st = scale_rows(ctx, dst, dst_off, src->buffer, src->offset, sq, n,
                        d);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_context_finish(ctx);
    if (sq)
        clReleaseMemObject(sq);
    atm_free(host);
    return st;
}

ATMOE_API atmoe_status atmoe_embeddings_normalize(atmoe_context *ctx,
                                                  const atmoe_tensor *src,
                                                  atmoe_tensor *dst)
{
    static const char fn[] = "atmoe_embeddings_normalize";
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, src);
    ATM_CHECK_NULL(ctx, dst);
    atmoe_status st = check_matrix(ctx, fn, "src", src, ATMOE_DTYPE_F32, 2);
    if (st == ATMOE_STATUS_OK)
        st = check_matrix(ctx, fn, "dst", dst, ATMOE_DTYPE_F32, 2);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (dst->shape[0] != src->shape[0] || dst->shape[1] != src->shape[1]) {
        char want[96];
        return shape_fail(ctx, fn, "dst", dst,
                          atm_shape_string(2, src->shape, want, sizeof want));
    }
    return normalize_rows(ctx, fn, "src", src, dst->buffer, dst->offset);
}

ATMOE_API atmoe_status atmoe_embeddings_pool(atmoe_context *ctx,
                                             const atmoe_tensor *tokens,
                                             const atmoe_tensor *mask,
                                             atmoe_tensor *out)
{
    static const char fn[] = "atmoe_embeddings_pool";
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, tokens);
    ATM_CHECK_NULL(ctx, out);
    atmoe_status st =
        check_matrix(ctx, fn, "tokens", tokens, ATMOE_DTYPE_F32, 3);
    if (st == ATMOE_STATUS_OK)
        st = check_matrix(ctx, fn, "out", out, ATMOE_DTYPE_F32, 2);
    if (st == ATMOE_STATUS_OK && mask)
        st = check_matrix(ctx, fn, "mask", mask, ATMOE_DTYPE_I32, 2);
    if (st != ATMOE_STATUS_OK)
        return st;
    size_t n = tokens->shape[0], l = tokens->shape[1], d = tokens->shape[2];
    char want[96];
    size_t nd[2] = {n, d}, nl[2] = {n, l};
    if (out->shape[0] != n || out->shape[1] != d)
        return shape_fail(ctx, fn, "out", out,
                          atm_shape_string(2, nd, want, sizeof want));
    if (mask && (mask->shape[0] != n || mask->shape[1] != l))
        return shape_fail(ctx, fn, "mask", mask,
                          atm_shape_string(2, nl, want, sizeof want));
    if (mask) {
        /* The mask is small next to the tokens: checking it on the host
         * names the empty row, where a NaN mean would name nothing. */
        int32_t *m = atm_malloc(n * l * sizeof *m);
        if (m == NULL)
            return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                            "%s: no host memory for the mask", fn);
        st = atmoe_tensor_read(mask, m, n * l * sizeof *m);
        for (size_t r = 0; r < n && st == ATMOE_STATUS_OK; r++) {
            size_t kept = 0;
            for (size_t t = 0; t < l; t++)
                kept += m[r * l + t] != 0;
            if (kept == 0)
                st = atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                              "%s: row %zu of mask keeps no token: its mean "
                              "is undefined", fn, r);
        }
        atm_free(m);
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    cl_kernel k;
    st = kernel(ctx, "pool_mean", &k);
    if (st != ATMOE_STATUS_OK)
        return st;
    /* Without a mask the kernel never reads it: the tokens stand in. */
    cl_mem mbuf = mask ? mask->buffer : tokens->buffer;
    cl_ulong moff = mask ? mask->offset : 0, cn = n, cl_ = l, cd = d;
    cl_int has = mask != NULL;
    cl_ulong ooff = out->offset, toff = tokens->offset;
    cl_int err = SET_ARG(k, 0, out->buffer);
    err |= SET_ARG(k, 1, ooff);
    err |= SET_ARG(k, 2, tokens->buffer);
    err |= SET_ARG(k, 3, toff);
    err |= SET_ARG(k, 4, mbuf);
    err |= SET_ARG(k, 5, moff);
    err |= SET_ARG(k, 6, has);
    err |= SET_ARG(k, 7, cn);
    err |= SET_ARG(k, 8, cl_);
    err |= SET_ARG(k, 9, cd);
    if (err != CL_SUCCESS)
        return arg_fail(ctx, "pool_mean");
    st = launch(ctx, k, n * d, "pool_mean");
    return st != ATMOE_STATUS_OK ? st : atmoe_context_finish(ctx);
}

/* ------------------------------------------------------------------ k-means */

/* dots [n, k] (at element offset dots_off) = x C^T, by the blocked
 * kernel of cl/kmeans.cl: 4 points by 4 centroids per work-item. */
static atmoe_status dots(atmoe_context *ctx, cl_mem out, cl_ulong out_off,
                         cl_mem x, cl_ulong x_off, cl_mem cent,
                         cl_ulong cent_off, cl_ulong n, cl_ulong k,
                         cl_ulong d)
{
    cl_kernel kd;
    atmoe_status st = kernel(ctx, "dots_blocked", &kd);
    if (st != ATMOE_STATUS_OK)
        return st;
    cl_int err = SET_ARG(kd, 0, out);
    err |= SET_ARG(kd, 1, out_off);
    err |= SET_ARG(kd, 2, x);
    err |= SET_ARG(kd, 3, x_off);
    err |= SET_ARG(kd, 4, cent);
    err |= SET_ARG(kd, 5, cent_off);
    err |= SET_ARG(kd, 6, n);
    err |= SET_ARG(kd, 7, k);
    err |= SET_ARG(kd, 8, d);
    if (err != CL_SUCCESS)
        return arg_fail(ctx, "dots_blocked");
    size_t items = (n + 3) / 4 * ((k + 3) / 4);
    return launch(ctx, kd, items, "dots_blocked");
}

/* The assignment in one pass (assign_blocked): assign [n] (i32, at
 * assign_off) the nearest centroid of each point, dist [n] its squared
 * distance; csq holds the centroids' squared norms. */
static atmoe_status assign_pass(atmoe_context *ctx, cl_kernel a,
                                cl_mem assign, cl_ulong assign_off,
                                cl_mem dist, cl_mem x, cl_ulong x_off,
                                cl_mem cent, cl_ulong cent_off, cl_mem csq,
                                cl_ulong n, cl_ulong k, cl_ulong d)
{
    cl_int err = SET_ARG(a, 0, assign);
    err |= SET_ARG(a, 1, assign_off);
    err |= SET_ARG(a, 2, dist);
    err |= SET_ARG(a, 3, x);
    err |= SET_ARG(a, 4, x_off);
    err |= SET_ARG(a, 5, cent);
    err |= SET_ARG(a, 6, cent_off);
    err |= SET_ARG(a, 7, csq);
    err |= SET_ARG(a, 8, n);
    err |= SET_ARG(a, 9, k);
    err |= SET_ARG(a, 10, d);
    if (err != CL_SUCCESS)
        return arg_fail(ctx, "assign_blocked");
    return launch(ctx, a, (n + 3) / 4, "assign_blocked");
}

/* SplitMix64 (Steele, Lea and Flood 2014), the generator documented in
 * atmoe.h: a test can draw the same numbers. */
static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

#define GOLDEN 0x9e3779b97f4a7c15ULL

static double uniform(uint64_t *state)
{
    *state += GOLDEN;
    return (double)(mix64(*state) >> 11) * 0x1.0p-53;
}

/* What one k-means call holds on the device and the host. */
typedef struct kmeans_work {
    atmoe_context *ctx;
    const char *fn;
    size_t n, d, k, chunk, chunks;
    cl_mem x;      /* the points (the caller's, or their normalised copy) */
    cl_ulong x_off;
    cl_mem xsq;    /* [n] ||x||^2, read back to check the points */
    cl_mem cent;   /* [k, d] the run's centroids */
    cl_mem csq;    /* [k] */
    cl_mem assign; /* [n] i32 */
    cl_mem dist;   /* [n] squared distance to the assigned centroid */
    cl_mem partial, pcount, counts;
    cl_mem best, best_assign;
    float *hdist;  /* [n] */
    int32_t *hcount; /* [k] */
    cl_kernel k_seed, k_sqnorm, k_assign, k_partial, k_finish;
} kmeans_work;

static void work_release(kmeans_work *w)
{
    cl_mem *bufs[] = {&w->x,      &w->xsq,     &w->cent,   &w->csq,
                      &w->assign, &w->dist,    &w->partial, &w->pcount,
                      &w->counts, &w->best,    &w->best_assign};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (*bufs[i])
            clReleaseMemObject(*bufs[i]);
    atm_free(w->hdist);
    atm_free(w->hcount);
}

/* Allocates what a run needs; x is set by the caller. */
static atmoe_status work_init(kmeans_work *w)
{
    atmoe_context *ctx = w->ctx;
    size_t n = w->n, d = w->d, k = w->k;
    w->chunks = (n + CHUNK_POINTS - 1) / CHUNK_POINTS;
    if (w->chunks > MAX_CHUNKS)
        w->chunks = MAX_CHUNKS;
    w->chunk = (n + w->chunks - 1) / w->chunks;
    struct {
        cl_mem *buf;
        size_t bytes;
    } need[] = {
        {&w->xsq, n * 4},         {&w->cent, k * d * 4},
        {&w->csq, k * 4},
        {&w->assign, n * 4},      {&w->dist, n * 4},
        {&w->partial, w->chunks * k * d * 4},
        {&w->pcount, w->chunks * k * 4},
        {&w->counts, k * 4},      {&w->best, k * d * 4},
        {&w->best_assign, n * 4},
    };
    atmoe_status st = ATMOE_STATUS_OK;
    for (size_t i = 0; i < sizeof need / sizeof need[0] && !st; i++)
        st = atm_buffer_new(ctx, need[i].bytes, need[i].buf, w->fn);
    if (st != ATMOE_STATUS_OK)
        return st;
    w->hdist = atm_malloc(n * sizeof *w->hdist);
    w->hcount = atm_malloc(k * sizeof *w->hcount);
    if (w->hdist == NULL || w->hcount == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: no host memory for %zu distances", w->fn, n);
    if (!st)
        st = kernel(ctx, "seed_distance", &w->k_seed);
    if (!st)
        st = kernel(ctx, "row_sqnorm", &w->k_sqnorm);
    if (!st)
        st = kernel(ctx, "assign_blocked", &w->k_assign);
    if (!st)
        st = kernel(ctx, "partial_sums", &w->k_partial);
    if (!st)
        st = kernel(ctx, "finish_means", &w->k_finish);
    return st;
}

/* Row `row` of the run's centroids = point p. */
static atmoe_status set_centroid(kmeans_work *w, size_t row, size_t p)
{
    return copy_buffer(w->ctx, w->x, (w->x_off + p * w->d) * 4, w->cent,
                       row * w->d * 4, w->d * 4);
}

/* The first point whose running sum of weights exceeds u times their
 * total (the last point of positive weight when rounding leaves the sum
 * short); u N when every weight is zero. */
static size_t draw_point(const float *weight, size_t n, double u)
{
    double total = 0.0;
    for (size_t i = 0; i < n; i++)
        total += weight[i];
    if (!(total > 0.0)) {
        size_t p = (size_t)(u * (double)n);
        return p < n ? p : n - 1;
    }
    double target = u * total, run = 0.0;
    size_t last = 0;
    for (size_t i = 0; i < n; i++) {
        run += weight[i];
        if (weight[i] > 0.0f)
            last = i;
        if (run > target)
            return i;
    }
    return last;
}

static atmoe_status seed_pass(kmeans_work *w, size_t row, int first)
{
    cl_kernel k = w->k_seed;
    cl_ulong r = row, n = w->n, d = w->d;
    cl_int f = first;
    cl_int err = SET_ARG(k, 0, w->dist);
    err |= SET_ARG(k, 1, w->x);
    err |= SET_ARG(k, 2, w->x_off);
    err |= SET_ARG(k, 3, w->cent);
    err |= SET_ARG(k, 4, r);
    err |= SET_ARG(k, 5, f);
    err |= SET_ARG(k, 6, n);
    err |= SET_ARG(k, 7, d);
    if (err != CL_SUCCESS)
        return arg_fail(w->ctx, "seed_distance");
    return launch(w->ctx, k, w->n, "seed_distance");
}

/* k-means++ (Arthur and Vassilvitskii 2007), one draw per centroid. */
static atmoe_status seed_plusplus(kmeans_work *w, uint64_t *rng)
{
    size_t p = (size_t)(uniform(rng) * (double)w->n);
    if (p >= w->n)
        p = w->n - 1;
    atmoe_status st = set_centroid(w, 0, p);
    for (size_t c = 1; c < w->k && st == ATMOE_STATUS_OK; c++) {
        st = seed_pass(w, c - 1, c == 1);
        if (st == ATMOE_STATUS_OK)
            st = read_buffer(w->ctx, w->dist, 0, w->hdist,
                             w->n * sizeof(float), w->fn);
        if (st == ATMOE_STATUS_OK)
            st = set_centroid(w, c, draw_point(w->hdist, w->n,
                                               uniform(rng)));
    }
    return st;
}

/* Assigns every point to its nearest centroid; *objective = the sum of
 * their squared distances, and w->hdist holds each. */
static atmoe_status assign_step(kmeans_work *w, double *objective)
{
    atmoe_context *ctx = w->ctx;
    cl_ulong n = w->n, d = w->d, k = w->k, zero = 0;
    cl_kernel q = w->k_sqnorm;
    cl_int err = SET_ARG(q, 0, w->csq);
    err |= SET_ARG(q, 1, w->cent);
    err |= SET_ARG(q, 2, zero);
    err |= SET_ARG(q, 3, k);
    err |= SET_ARG(q, 4, d);
    if (err != CL_SUCCESS)
        return arg_fail(ctx, "row_sqnorm");
    atmoe_status st = launch(ctx, q, w->k, "row_sqnorm");
    if (st != ATMOE_STATUS_OK)
        return st;
    st = assign_pass(ctx, w->k_assign, w->assign, 0, w->dist, w->x,
                     w->x_off, w->cent, 0, w->csq, n, k, d);
    if (st == ATMOE_STATUS_OK)
        st = read_buffer(ctx, w->dist, 0, w->hdist, w->n * sizeof(float),
                         w->fn);
    if (st != ATMOE_STATUS_OK)
        return st;
    double sum = 0.0;
    for (size_t i = 0; i < w->n; i++)
        sum += w->hdist[i];
    *objective = sum;
    return ATMOE_STATUS_OK;
}

/* Moves the centroids to the means of their points and re-seeds the empty
 * ones with the farthest points (by the distances of the last
 * assignment, in w->hdist, which this consumes). */
static atmoe_status update_step(kmeans_work *w, size_t *reseeded)
{
    atmoe_context *ctx = w->ctx;
    cl_ulong n = w->n, d = w->d, k = w->k, chunk = w->chunk,
             chunks = w->chunks;
    cl_kernel p = w->k_partial;
    cl_int err = SET_ARG(p, 0, w->partial);
    err |= SET_ARG(p, 1, w->pcount);
    err |= SET_ARG(p, 2, w->x);
    err |= SET_ARG(p, 3, w->x_off);
    err |= SET_ARG(p, 4, w->assign);
    err |= SET_ARG(p, 5, n);
    err |= SET_ARG(p, 6, d);
    err |= SET_ARG(p, 7, k);
    err |= SET_ARG(p, 8, chunk);
    err |= SET_ARG(p, 9, chunks);
    if (err != CL_SUCCESS)
        return arg_fail(ctx, "partial_sums");
    /* Work-groups of one, so that the chunks spread over the cores. */
    atmoe_status st = atm_launch_1d_local(ctx, p, w->chunks, 1,
                                          "partial_sums", NULL);
    if (st != ATMOE_STATUS_OK)
        return st;
    cl_kernel f = w->k_finish;
    err = SET_ARG(f, 0, w->cent);
    err |= SET_ARG(f, 1, w->counts);
    err |= SET_ARG(f, 2, w->partial);
    err |= SET_ARG(f, 3, w->pcount);
    err |= SET_ARG(f, 4, d);
    err |= SET_ARG(f, 5, k);
    err |= SET_ARG(f, 6, chunks);
    if (err != CL_SUCCESS)
        return arg_fail(ctx, "finish_means");
    st = launch(ctx, f, w->k * w->d, "finish_means");
    if (st == ATMOE_STATUS_OK)
        st = read_buffer(ctx, w->counts, 0, w->hcount,
                         w->k * sizeof(int32_t), w->fn);
    *reseeded = 0;
    for (size_t c = 0; c < w->k && st == ATMOE_STATUS_OK; c++) {
        if (w->hcount[c] != 0)
            continue;
        size_t far = 0;
        for (size_t i = 1; i < w->n; i++)
            if (w->hdist[i] > w->hdist[far])
                far = i;
        /* Taken: the next empty cluster gets the next farthest point. */
        w->hdist[far] = -1.0f;
        st = set_centroid(w, c, far);
        (*reseeded)++;
    }
    return st;
}

/* Checks the options against the points; fills in the defaults. */
static atmoe_status check_options(atmoe_context *ctx, const char *fn,
                                  const atmoe_kmeans_options *o, size_t n,
                                  unsigned *restarts, unsigned *iterations)
{
    if (o->k == 0)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: k is 0, must be at least 1", fn);
    if (o->k > n)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: k is %zu, more clusters than the %zu points", fn,
                        o->k, n);
    if (!(o->tolerance >= 0.0) || isinf(o->tolerance))
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: tolerance is %g, must be finite and at least 0",
                        fn, o->tolerance);
    *restarts = o->restarts ? o->restarts : 1;
    *iterations = o->max_iterations ? o->max_iterations : DEFAULT_ITERATIONS;
    if (o->init_given && *restarts != 1)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: init_given starts from one set of centroids, "
                        "so restarts must be 1 (is %u)", fn, *restarts);
    return ATMOE_STATUS_OK;
}

/* One run from its seeding to convergence, the cap or a stop. */
static atmoe_status run_once(kmeans_work *w, const atmoe_kmeans_options *o,
                             unsigned restart, unsigned max_iterations,
                             atmoe_kmeans_result *run)
{
    atmoe_status st = ATMOE_STATUS_OK;
    memset(run, 0, sizeof *run);
    if (!o->init_given) {
        uint64_t rng = mix64(o->seed + (uint64_t)(restart + 1) * GOLDEN);
        st = seed_plusplus(w, &rng);
    }
    double objective = 0.0;
    if (st == ATMOE_STATUS_OK)
        st = assign_step(w, &objective);
    for (unsigned it = 1; it <= max_iterations && st == ATMOE_STATUS_OK;
         it++) {
        size_t reseeded = 0;
        double previous = objective;
        st = update_step(w, &reseeded);
        if (st == ATMOE_STATUS_OK)
            st = assign_step(w, &objective);
        if (st != ATMOE_STATUS_OK)
            break;
        run->iterations = it;
        run->reseeded += reseeded;
        double change =
            previous > 0.0 ? (previous - objective) / previous : 0.0;
        if (o->progress) {
            atmoe_kmeans_progress p = {restart, it, objective, change,
                                       reseeded};
            if (o->progress(&p, o->user) != 0)
                return atm_fail(w->ctx, ATMOE_STATUS_CANCELLED,
                                "%s: stopped by the progress callback at "
                                "iteration %u of run %u", w->fn, it, restart);
        }
        /* A re-seeding can raise the objective for one iteration before it
         * lowers it; only an iteration without one may end the run. */
        if (reseeded == 0 && change <= o->tolerance) {
            run->converged = 1;
            break;
        }
    }
    run->objective = objective;
    return st;
}

ATMOE_API atmoe_status atmoe_kmeans(atmoe_context *ctx,
                                    const atmoe_tensor *points,
                                    const atmoe_kmeans_options *options,
                                    atmoe_tensor *centroids,
                                    atmoe_tensor *assignments,
                                    atmoe_kmeans_result *result)
{
    static const char fn[] = "atmoe_kmeans";
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, points);
    ATM_CHECK_NULL(ctx, options);
    ATM_CHECK_NULL(ctx, centroids);
    atmoe_status st =
        check_matrix(ctx, fn, "points", points, ATMOE_DTYPE_F32, 2);
    if (st == ATMOE_STATUS_OK)
        st = check_matrix(ctx, fn, "centroids", centroids, ATMOE_DTYPE_F32,
                          2);
    if (st == ATMOE_STATUS_OK && assignments)
        st = check_matrix(ctx, fn, "assignments", assignments,
                          ATMOE_DTYPE_I32, 1);
    if (st != ATMOE_STATUS_OK)
        return st;
    size_t n = points->shape[0], d = points->shape[1];
    unsigned restarts = 1, iterations = DEFAULT_ITERATIONS;
    st = check_options(ctx, fn, options, n, &restarts, &iterations);
    if (st != ATMOE_STATUS_OK)
        return st;
    size_t k = options->k;
    char want[96];
    size_t kd[2] = {k, d};
    if (centroids->shape[0] != k || centroids->shape[1] != d)
        return shape_fail(ctx, fn, "centroids", centroids,
                          atm_shape_string(2, kd, want, sizeof want));
    if (assignments && assignments->shape[0] != n)
        return shape_fail(ctx, fn, "assignments", assignments,
                          atm_shape_string(1, &n, want, sizeof want));

    kmeans_work w = {.ctx = ctx, .fn = fn, .n = n, .d = d, .k = k};
    st = work_init(&w);
    if (st == ATMOE_STATUS_OK && options->normalize) {
        st = atm_buffer_new(ctx, n * d * sizeof(float), &w.x, fn);
        if (st == ATMOE_STATUS_OK)
            st = normalize_rows(ctx, fn, "points", points, w.x, 0);
    } else if (st == ATMOE_STATUS_OK) {
        w.x = points->buffer;
        clRetainMemObject(w.x);
        w.x_off = points->offset;
    }
    /* Every point's squared norm, checked for NaN and infinity. */
    if (st == ATMOE_STATUS_OK) {
        atmoe_tensor x = *points;
        x.buffer = w.x;
        x.offset = w.x_off;
        st = checked_sqnorms(ctx, fn, "points", &x, w.xsq, w.hdist, 0);
    }
    /* Given centroids with a NaN would attract no point and never move. */
    if (st == ATMOE_STATUS_OK && options->init_given)
        st = checked_sqnorms(ctx, fn, "centroids", centroids, w.csq, w.hdist,
                             0);
    if (st == ATMOE_STATUS_OK && options->init_given)
        st = copy_buffer(ctx, centroids->buffer, centroids->offset * 4,
                         w.cent, 0, k * d * 4);
    atmoe_kmeans_result best = {0}, run;
    best.objective = INFINITY;
    for (unsigned r = 0; r < restarts && st == ATMOE_STATUS_OK; r++) {
        st = run_once(&w, options, r, iterations, &run);
        if (st != ATMOE_STATUS_OK)
            break;
        if (run.objective < best.objective) {
            best = run;
            best.best_restart = r;
            st = copy_buffer(ctx, w.cent, 0, w.best, 0, k * d * 4);
            if (st == ATMOE_STATUS_OK)
                st = copy_buffer(ctx, w.assign, 0, w.best_assign, 0, n * 4);
        }
        best.restarts = r + 1;
    }
    if (st == ATMOE_STATUS_OK)
        st = copy_buffer(ctx, w.best, 0, centroids->buffer,
                         centroids->offset * 4, k * d * 4);
    if (st == ATMOE_STATUS_OK && assignments)
        st = copy_buffer(ctx, w.best_assign, 0, assignments->buffer,
                         assignments->offset * 4, n * 4);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_context_finish(ctx);
    work_release(&w);
    if (st == ATMOE_STATUS_OK && result)
        *result = best;
    return st;
}

ATMOE_API atmoe_status atmoe_kmeans_assign(atmoe_context *ctx,
                                           const atmoe_tensor *centroids,
                                           const atmoe_tensor *points,
                                           atmoe_tensor *assignments,
                                           atmoe_tensor *scores)
{
    static const char fn[] = "atmoe_kmeans_assign";
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, centroids);
    ATM_CHECK_NULL(ctx, points);
    if (assignments == NULL && scores == NULL)
        return atm_fail(ctx, ATMOE_STATUS_NULL_POINTER,
                        "%s: assignments and scores are both NULL", fn);
    atmoe_status st =
        check_matrix(ctx, fn, "centroids", centroids, ATMOE_DTYPE_F32, 2);
    if (st == ATMOE_STATUS_OK)
        st = check_matrix(ctx, fn, "points", points, ATMOE_DTYPE_F32, 2);
    if (st == ATMOE_STATUS_OK && assignments)
        st = check_matrix(ctx, fn, "assignments", assignments,
                          ATMOE_DTYPE_I32, 1);
    if (st == ATMOE_STATUS_OK && scores)
        st = check_matrix(ctx, fn, "scores", scores, ATMOE_DTYPE_F32, 2);
    if (st != ATMOE_STATUS_OK)
        return st;
    size_t n = points->shape[0], d = points->shape[1];
    size_t k = centroids->shape[0];
    char want[96];
    if (centroids->shape[1] != d) {
        size_t kd[2] = {k, d};
        return shape_fail(ctx, fn, "centroids", centroids,
                          atm_shape_string(2, kd, want, sizeof want));
    }
    size_t nk[2] = {n, k};
    if (scores && (scores->shape[0] != n || scores->shape[1] != k))
        return shape_fail(ctx, fn, "scores", scores,
                          atm_shape_string(2, nk, want, sizeof want));
    if (assignments && assignments->shape[0] != n)
        return shape_fail(ctx, fn, "assignments", assignments,
                          atm_shape_string(1, &n, want, sizeof want));

    kmeans_work w = {.ctx = ctx, .fn = fn, .n = n, .d = d, .k = k};
    float *hsq = atm_malloc((n > k ? n : k) * sizeof *hsq);
    if (hsq == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: no host memory for %zu row norms", fn, n);
    struct {
        cl_mem *buf;
        size_t bytes;
    } need[] = {{&w.xsq, n * 4}, {&w.csq, k * 4}, {&w.dist, n * 4}};
    for (size_t i = 0; i < sizeof need / sizeof need[0] && !st; i++)
        st = atm_buffer_new(ctx, need[i].bytes, need[i].buf, fn);
    if (!st && assignments == NULL)
        st = atm_buffer_new(ctx, n * 4, &w.assign, fn);
    if (!st)
        st = checked_sqnorms(ctx, fn, "points", points, w.xsq, hsq, 0);
    if (!st)
        st = checked_sqnorms(ctx, fn, "centroids", centroids, w.csq, hsq, 0);
    cl_mem assign = assignments ? assignments->buffer : w.assign;
    cl_ulong assign_off = assignments ? assignments->offset : 0;
    cl_ulong xoff = points->offset, coff = centroids->offset, cn = n, ck = k,
             cd = d;
    cl_kernel a;
    if (!st && scores == NULL) {
        /* Assignments alone: one pass, no [N, K] matrix. */
        st = kernel(ctx, "assign_blocked", &a);
        if (!st)
            st = assign_pass(ctx, a, assign, assign_off, w.dist,
                             points->buffer, xoff, centroids->buffer, coff,
                             w.csq, cn, ck, cd);
    } else if (!st) {
        cl_ulong soff = scores->offset;
        st = dots(ctx, scores->buffer, soff, points->buffer, xoff,
                  centroids->buffer, coff, n, k, d);
        if (!st)
            st = kernel(ctx, "assign_nearest", &a);
        if (!st) {
            cl_int err = SET_ARG(a, 0, assign);
            err |= SET_ARG(a, 1, assign_off);
            err |= SET_ARG(a, 2, w.dist);
            err |= SET_ARG(a, 3, scores->buffer);
            err |= SET_ARG(a, 4, soff);
            err |= SET_ARG(a, 5, w.csq);
            err |= SET_ARG(a, 6, points->buffer);
            err |= SET_ARG(a, 7, xoff);
            err |= SET_ARG(a, 8, centroids->buffer);
            err |= SET_ARG(a, 9, coff);
            err |= SET_ARG(a, 10, cn);
            err |= SET_ARG(a, 11, ck);
            err |= SET_ARG(a, 12, cd);
            st = err != CL_SUCCESS ? arg_fail(ctx, "assign_nearest")
                                   : launch(ctx, a, n,
                                                   "assign_nearest");
        }
    }
    if (!st)
        st = atmoe_context_finish(ctx);
    atm_free(hsq);
    work_release(&w);
    return st;
}
