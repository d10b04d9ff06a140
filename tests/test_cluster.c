/* Tests of clustering: mean pooling and L2 normalisation against float64
 * host references, k-means against a float64 host k-means that makes the
 * same k-means++ draws (SplitMix64, as atmoe.h documents), assignment and
 * scores, centroid files, and the refusals of bad input.
 *
 * Shapes are odd (N = 517, D = 19, K = 7) so that no chunk or work-group
 * divides them; outputs are poisoned with NaN before each call. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* ------------------------------------------------------------------------ */
/* Host helpers                                                              */
/* ------------------------------------------------------------------------ */

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    ck_assert_msg(p != NULL, "out of host memory (%zu bytes)", bytes);
    return p;
}

static atmoe_tensor *tensor_from(atmoe_context *ctx, atmoe_dtype dtype,
                                 int ndim, const size_t *shape,
                                 const void *data)
{
    atmoe_tensor *t;
    ck_assert_status(atmoe_tensor_new(ctx, dtype, ndim, shape, &t), ctx);
    size_t n = 1;
    for (int i = 0; i < ndim; i++)
        n *= shape[i];
    if (data)
        ck_assert_status(atmoe_tensor_write(t, data, n * 4), ctx);
    return t;
}

/* A poisoned f32 tensor, so that an element left unwritten reads NaN. */
static atmoe_tensor *poisoned(atmoe_context *ctx, int ndim,
                              const size_t *shape)
{
    atmoe_tensor *t = tensor_from(ctx, ATMOE_DTYPE_F32, ndim, shape, NULL);
    ck_assert_status(atmoe_tensor_fill(t, NAN), ctx);
    return t;
}

static atmoe_tensor *poisoned_i32(atmoe_context *ctx, size_t n)
{
    atmoe_tensor *t = tensor_from(ctx, ATMOE_DTYPE_I32, 1, &n, NULL);
    ck_assert_status(atmoe_tensor_fill(t, -7), ctx);
    return t;
}

/* Well-separated data: k centres in [-10, 10)^d and points within 0.05 of
 * them, every centre used; label[i] is point i's centre. */
static void separated(test_rng *rng, size_t n, size_t d, size_t k, float *x,
                      int *label)
{
    double *centre = xmalloc(k * d * sizeof *centre);
    for (size_t i = 0; i < k * d; i++)
        centre[i] = test_uniform(rng, -10, 10);
    for (size_t i = 0; i < n; i++) {
        size_t c = i < k ? i : (size_t)test_uniform(rng, 0, (double)k);
        if (c >= k)
            c = k - 1;
        label[i] = (int)c;
        for (size_t j = 0; j < d; j++)
            x[i * d + j] = (float)(centre[c * d + j] +
                                   test_uniform(rng, -0.05, 0.05));
    }
    free(centre);
}

/* ------------------------------------------------------------------------ */
/* Host k-means in float64, with the library's draws                         */
/* ------------------------------------------------------------------------ */

#define GOLDEN 0x9e3779b97f4a7c15ULL

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double draw(uint64_t *s)
{
    *s += GOLDEN;
    return (double)(mix64(*s) >> 11) * 0x1.0p-53;
}

static double sqdist(const double *a, const double *b, size_t d)
{
    double s = 0;
    for (size_t j = 0; j < d; j++)
        s += (a[j] - b[j]) * (a[j] - b[j]);
    return s;
}

typedef struct host_km {
    size_t n, d, k;
    const double *x;
    double *cent, *dist;
    int *assign;
} host_km;

static double host_assign(host_km *h)
{
    double obj = 0;
    for (size_t i = 0; i < h->n; i++) {
        double best = INFINITY;
        int arg = 0;
        for (size_t c = 0; c < h->k; c++) {
            double v = sqdist(h->x + i * h->d, h->cent + c * h->d, h->d);
            if (v < best) {
                best = v;
                arg = (int)c;
            }
        }
        h->assign[i] = arg;
        h->dist[i] = best;
        obj += best;
    }
    return obj;
}

static size_t host_pick(const double *w, size_t n, double u)
{
    double total = 0;
    for (size_t i = 0; i < n; i++)
        total += w[i];
    if (!(total > 0)) {
        size_t p = (size_t)(u * (double)n);
        return p < n ? p : n - 1;
    }
    double run = 0;
    size_t last = 0;
    for (size_t i = 0; i < n; i++) {
        run += w[i];
        if (w[i] > 0)
            last = i;
        if (run > u * total)
            return i;
    }
    return last;
}

static void host_seed(host_km *h, uint64_t seed, unsigned restart)
{
    uint64_t s = mix64(seed + (uint64_t)(restart + 1) * GOLDEN);
    size_t n = h->n, d = h->d;
    size_t p = (size_t)(draw(&s) * (double)n);
    if (p >= n)
        p = n - 1;
    memcpy(h->cent, h->x + p * d, d * sizeof(double));
    double *dmin = h->dist;
    for (size_t c = 1; c < h->k; c++) {
        for (size_t i = 0; i < n; i++) {
            double v = sqdist(h->x + i * d, h->cent + (c - 1) * d, d);
            dmin[i] = c == 1 ? v : fmin(dmin[i], v);
        }
        p = host_pick(dmin, n, draw(&s));
        memcpy(h->cent + c * d, h->x + p * d, d * sizeof(double));
    }
}

/* One run as atmoe_kmeans documents it; returns its objective. */
static double host_run(host_km *h, uint64_t seed, unsigned restart,
                       int init_given, unsigned max_it, double tol,
                       size_t *reseeded)
{
    size_t n = h->n, d = h->d, k = h->k;
    if (!init_given)
        host_seed(h, seed, restart);
    double obj = host_assign(h);
    double *sum = xmalloc(k * d * sizeof *sum);
    size_t *count = xmalloc(k * sizeof *count);
    *reseeded = 0;
    for (unsigned it = 1; it <= max_it; it++) {
        memset(sum, 0, k * d * sizeof *sum);
        memset(count, 0, k * sizeof *count);
        for (size_t i = 0; i < n; i++) {
            count[h->assign[i]]++;
            for (size_t j = 0; j < d; j++)
                sum[h->assign[i] * d + j] += h->x[i * d + j];
        }
        size_t re = 0;
        for (size_t c = 0; c < k; c++) {
            if (count[c]) {
                for (size_t j = 0; j < d; j++)
                    h->cent[c * d + j] = sum[c * d + j] / (double)count[c];
                continue;
            }
            size_t far = 0;
            for (size_t i = 1; i < n; i++)
                if (h->dist[i] > h->dist[far])
                    far = i;
            h->dist[far] = -1;
            memcpy(h->cent + c * d, h->x + far * d, d * sizeof(double));
            re++;
        }
        *reseeded += re;
        double prev = obj;
        obj = host_assign(h);
        double change = prev > 0 ? (prev - obj) / prev : 0;
        if (re == 0 && change <= tol)
            break;
    }
    free(sum);
    free(count);
    return obj;
}

typedef struct host_result {
    double objective;
    unsigned best;
    size_t reseeded;
    double *cent;
    int *assign;
} host_result;

static void host_kmeans(const float *xf, size_t n, size_t d, size_t k,
                        uint64_t seed, unsigned restarts, unsigned max_it,
                        double tol, const float *init, host_result *r)
{
    double *x = xmalloc(n * d * sizeof *x);
    for (size_t i = 0; i < n * d; i++)
        x[i] = xf[i];
    host_km h = {n, d, k, x, xmalloc(k * d * sizeof(double)),
                 xmalloc(n * sizeof(double)), xmalloc(n * sizeof(int))};
    r->cent = xmalloc(k * d * sizeof(double));
    r->assign = xmalloc(n * sizeof(int));
    r->objective = INFINITY;
    for (unsigned q = 0; q < restarts; q++) {
        if (init)
            for (size_t i = 0; i < k * d; i++)
                h.cent[i] = init[i];
        size_t re;
        double obj = host_run(&h, seed, q, init != NULL, max_it, tol, &re);
        if (obj < r->objective) {
            r->objective = obj;
            r->best = q;
            r->reseeded = re;
            memcpy(r->cent, h.cent, k * d * sizeof(double));
            memcpy(r->assign, h.assign, n * sizeof(int));
        }
    }
    free(x);
    free(h.cent);
    free(h.dist);
    free(h.assign);
}

static void host_result_free(host_result *r)
{
    free(r->cent);
    free(r->assign);
}

/* Runs atmoe_kmeans on x [n, d]; centroids and assignments to the host. */
static atmoe_status device_kmeans(atmoe_context *ctx, const float *x,
                                  size_t n, size_t d,
                                  const atmoe_kmeans_options *o,
                                  const float *init, float *cent,
                                  int32_t *assign, atmoe_kmeans_result *r)
{
    size_t xs[2] = {n, d}, cs[2] = {o->k, d};
    atmoe_tensor *tx = tensor_from(ctx, ATMOE_DTYPE_F32, 2, xs, x);
    atmoe_tensor *tc = init ? tensor_from(ctx, ATMOE_DTYPE_F32, 2, cs, init)
                            : poisoned(ctx, 2, cs);
    atmoe_tensor *ta = poisoned_i32(ctx, n);
    atmoe_status st = atmoe_kmeans(ctx, tx, o, tc, ta, r);
    if (st == ATMOE_STATUS_OK) {
        ck_assert_status(atmoe_tensor_read(tc, cent, o->k * d * 4), ctx);
        ck_assert_status(atmoe_tensor_read(ta, assign, n * 4), ctx);
    }
    atmoe_tensor_free(tx);
    atmoe_tensor_free(tc);
    atmoe_tensor_free(ta);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Pooling and normalisation                                                 */
/* ------------------------------------------------------------------------ */

START_TEST(test_pool_masked)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 11);
    const size_t n = 5, l = 7, d = 13;
    float *tok = xmalloc(n * l * d * 4), *got = xmalloc(n * d * 4);
    int32_t mask[5 * 7];
    test_fill_uniform(&rng, tok, n * l * d, -2, 3);
    for (size_t i = 0; i < n * l; i++)
        mask[i] = test_uniform(&rng, 0, 1) < 0.5 ? 0 : 1 + (int)(i % 3);
    for (size_t t = 0; t < l; t++)
        mask[0 * l + t] = 1;          /* a whole row */
    memset(mask + 1 * l, 0, l * 4);   /* one token only, the last */
    mask[1 * l + l - 1] = 5;
    for (int with_mask = 0; with_mask < 2; with_mask++) {
        size_t ts[3] = {n, l, d}, ms[2] = {n, l}, os[2] = {n, d};
        atmoe_tensor *tt = tensor_from(ctx, ATMOE_DTYPE_F32, 3, ts, tok);
        atmoe_tensor *tm = tensor_from(ctx, ATMOE_DTYPE_I32, 2, ms, mask);
        atmoe_tensor *to = poisoned(ctx, 2, os);
        ck_assert_status(
            atmoe_embeddings_pool(ctx, tt, with_mask ? tm : NULL, to), ctx);
        ck_assert_status(atmoe_tensor_read(to, got, n * d * 4), ctx);
        double *want = xmalloc(n * d * sizeof *want);
        for (size_t r = 0; r < n; r++)
            for (size_t j = 0; j < d; j++) {
                double s = 0;
                size_t kept = 0;
                for (size_t t = 0; t < l; t++)
                    if (!with_mask || mask[r * l + t]) {
                        s += tok[(r * l + t) * d + j];
                        kept++;
                    }
                want[r * d + j] = s / (double)kept;
            }
        double err = test_max_rel_err(got, want, n * d, 1e-3);
        ck_assert_msg(err < 1e-5, "pool (mask %d): rel err %g", with_mask,
                      err);
        free(want);
        atmoe_tensor_free(tt);
        atmoe_tensor_free(tm);
        atmoe_tensor_free(to);
    }
    free(tok);
    free(got);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_pool_refusals)
{
    atmoe_context *ctx = test_context();
    size_t ts[3] = {3, 4, 5}, ms[2] = {3, 4}, os[2] = {3, 5}, bad[2] = {3, 6};
    int32_t mask[12] = {1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1};
    atmoe_tensor *tt = poisoned(ctx, 3, ts);
    ck_assert_status(atmoe_tensor_fill(tt, 1.0), ctx);
    atmoe_tensor *tm = tensor_from(ctx, ATMOE_DTYPE_I32, 2, ms, mask);
    atmoe_tensor *to = poisoned(ctx, 2, os), *tb = poisoned(ctx, 2, bad);
    atmoe_tensor *ti = tensor_from(ctx, ATMOE_DTYPE_I32, 3, ts, NULL);
    ck_assert_fails_with(atmoe_embeddings_pool(ctx, tt, tm, to), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "row 1 of mask");
    ck_assert_fails_with(atmoe_embeddings_pool(ctx, ti, NULL, to), ctx,
                         ATMOE_STATUS_DTYPE_MISMATCH, "tokens is i32");
    ck_assert_fails_with(atmoe_embeddings_pool(ctx, tt, NULL, tb), ctx,
                         ATMOE_STATUS_SHAPE_MISMATCH, "out has shape [3, 6]");
    ck_assert_fails_with(atmoe_embeddings_pool(ctx, tt, to, to), ctx,
                         ATMOE_STATUS_DTYPE_MISMATCH, "mask is f32");
    ck_assert_fails_with(atmoe_embeddings_pool(ctx, to, NULL, to), ctx,
                         ATMOE_STATUS_SHAPE_MISMATCH, "tokens has shape");
    ck_assert_fails(atmoe_embeddings_pool(ctx, NULL, NULL, to), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    atmoe_tensor_free(tt);
    atmoe_tensor_free(tm);
    atmoe_tensor_free(to);
    atmoe_tensor_free(tb);
    atmoe_tensor_free(ti);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_normalize)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 12);
    const size_t n = 37, d = 19;
    float *x = xmalloc(n * d * 4), *got = xmalloc(n * d * 4);
    double *want = xmalloc(n * d * sizeof *want);
    test_fill_uniform(&rng, x, n * d, -4, 5);
    for (size_t r = 0; r < n; r++) {
        double s = 0;
        for (size_t j = 0; j < d; j++)
            s += (double)x[r * d + j] * x[r * d + j];
        for (size_t j = 0; j < d; j++)
            want[r * d + j] = x[r * d + j] / sqrt(s);
    }
    size_t s2[2] = {n, d};
    atmoe_tensor *src = tensor_from(ctx, ATMOE_DTYPE_F32, 2, s2, x);
    atmoe_tensor *dst = poisoned(ctx, 2, s2);
    ck_assert_status(atmoe_embeddings_normalize(ctx, src, dst), ctx);
    ck_assert_status(atmoe_tensor_read(dst, got, n * d * 4), ctx);
    double err = test_max_rel_err(got, want, n * d, 1e-2);
    ck_assert_msg(err < 1e-5, "normalize: rel err %g", err);
    /* In place. */
    ck_assert_status(atmoe_embeddings_normalize(ctx, src, src), ctx);
    ck_assert_status(atmoe_tensor_read(src, got, n * d * 4), ctx);
    err = test_max_rel_err(got, want, n * d, 1e-2);
    ck_assert_msg(err < 1e-5, "normalize in place: rel err %g", err);

    /* A zero row and a NaN row are named; dst keeps its contents. */
    memset(x + 11 * d, 0, d * 4);
    ck_assert_status(atmoe_tensor_write(src, x, n * d * 4), ctx);
    ck_assert_status(atmoe_tensor_fill(dst, NAN), ctx);
    ck_assert_fails_with(atmoe_embeddings_normalize(ctx, src, dst), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "row 11 of src has zero norm");
    x[5 * d + 3] = NAN;
    ck_assert_status(atmoe_tensor_write(src, x, n * d * 4), ctx);
    ck_assert_fails_with(atmoe_embeddings_normalize(ctx, src, dst), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "row 5 of src is not finite");
    size_t bad[2] = {n, d + 1};
    atmoe_tensor *tb = poisoned(ctx, 2, bad);
    ck_assert_fails_with(atmoe_embeddings_normalize(ctx, src, tb), ctx,
                         ATMOE_STATUS_SHAPE_MISMATCH, "dst has shape");
    atmoe_tensor_free(tb);
    atmoe_tensor_free(src);
    atmoe_tensor_free(dst);
    free(x);
    free(got);
    free(want);
    atmoe_context_free(ctx);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* k-means                                                                   */
/* ------------------------------------------------------------------------ */

/* Well-separated data: the same clusters as the host's, as the data's own
 * labels (up to naming), centroids and objective within float rounding. */
START_TEST(test_kmeans_separated)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 21);
    const size_t n = 517, d = 19, k = 7;
    float *x = xmalloc(n * d * 4), *cent = xmalloc(k * d * 4);
    int *label = xmalloc(n * sizeof *label);
    int32_t *assign = xmalloc(n * 4);
    separated(&rng, n, d, k, x, label);
    atmoe_kmeans_options o = {.k = k, .seed = 5, .restarts = 2,
                              .max_iterations = 50, .tolerance = 1e-6};
    atmoe_kmeans_result r;
    ck_assert_status(device_kmeans(ctx, x, n, d, &o, NULL, cent, assign, &r),
                     ctx);
    host_result h;
    host_kmeans(x, n, d, k, o.seed, 2, 50, 1e-6, NULL, &h);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(assign[i] == h.assign[i],
                      "point %zu: device cluster %d, host %d", i, assign[i],
                      h.assign[i]);
    /* k-means++ on separated data finds the true clusters. */
    int *map = xmalloc(k * sizeof *map);
    for (size_t c = 0; c < k; c++)
        map[c] = -1;
    for (size_t i = 0; i < n; i++) {
        if (map[label[i]] < 0)
            map[label[i]] = assign[i];
        ck_assert_int_eq(map[label[i]], assign[i]);
    }
    double err = test_max_rel_err(cent, h.cent, k * d, 1.0);
    ck_assert_msg(err < 1e-5, "centroids: rel err %g", err);
    ck_assert_msg(fabs(r.objective - h.objective) <= 1e-4 * h.objective,
                  "objective %.9g, host %.9g", r.objective, h.objective);
    ck_assert_uint_eq(r.restarts, 2);
    ck_assert_uint_eq(r.best_restart, h.best);
    ck_assert(r.converged);
    ck_assert_uint_ge(r.iterations, 1);
    host_result_free(&h);
    free(map);
    free(x);
    free(cent);
    free(label);
    free(assign);
    atmoe_context_free(ctx);
}
END_TEST

/* Random data has many local optima: the device's must be no worse than
 * the host's from the same draws. */
START_TEST(test_kmeans_random)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 22);
    const size_t n = 301, d = 11, k = 5;
    float *x = xmalloc(n * d * 4), *cent = xmalloc(k * d * 4);
    int32_t *assign = xmalloc(n * 4);
    test_fill_uniform(&rng, x, n * d, -1, 1);
    for (uint64_t seed = 1; seed <= 3; seed++) {
        atmoe_kmeans_options o = {.k = k, .seed = seed, .restarts = 3,
                                  .max_iterations = 100, .tolerance = 0};
        atmoe_kmeans_result r;
        ck_assert_status(
            device_kmeans(ctx, x, n, d, &o, NULL, cent, assign, &r), ctx);
        host_result h;
        host_kmeans(x, n, d, k, seed, 3, 100, 0, NULL, &h);
        ck_assert_msg(r.objective <= h.objective * (1 + 1e-5),
                      "seed %llu: objective %.9g, host %.9g",
                      (unsigned long long)seed, r.objective, h.objective);
        /* The objective is that of the centroids returned. */
        double obj = 0;
        for (size_t i = 0; i < n; i++) {
            double best = INFINITY;
            for (size_t c = 0; c < k; c++) {
                double s = 0;
                for (size_t j = 0; j < d; j++) {
                    double t = (double)x[i * d + j] - cent[c * d + j];
                    s += t * t;
                }
                best = fmin(best, s);
            }
            obj += best;
        }
        ck_assert_msg(fabs(obj - r.objective) <= 1e-4 * obj,
                      "reported objective %.9g, of the centroids %.9g",
                      r.objective, obj);
        host_result_free(&h);
    }
    free(x);
    free(cent);
    free(assign);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_kmeans_deterministic)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 23);
    const size_t n = 1031, d = 23, k = 9;
    float *x = xmalloc(n * d * 4);
    float *c1 = xmalloc(k * d * 4), *c2 = xmalloc(k * d * 4);
    int32_t *a1 = xmalloc(n * 4), *a2 = xmalloc(n * 4);
    test_fill_uniform(&rng, x, n * d, -1, 1);
    atmoe_kmeans_options o = {.k = k, .seed = 99, .restarts = 2,
                              .max_iterations = 20, .tolerance = 1e-4};
    atmoe_kmeans_result r1, r2;
    ck_assert_status(device_kmeans(ctx, x, n, d, &o, NULL, c1, a1, &r1), ctx);
    ck_assert_status(device_kmeans(ctx, x, n, d, &o, NULL, c2, a2, &r2), ctx);
    ck_assert(memcmp(c1, c2, k * d * 4) == 0);
    ck_assert(memcmp(a1, a2, n * 4) == 0);
    ck_assert(memcmp(&r1.objective, &r2.objective, sizeof(double)) == 0);
    ck_assert_uint_eq(r1.iterations, r2.iterations);
    /* Another seed draws other centroids. */
    o.seed = 100;
    ck_assert_status(device_kmeans(ctx, x, n, d, &o, NULL, c2, a2, &r2), ctx);
    ck_assert(memcmp(c1, c2, k * d * 4) != 0);
    free(x);
    free(c1);
    free(c2);
    free(a1);
    free(a2);
    atmoe_context_free(ctx);
}
END_TEST

/* A centroid far from every point gets no point: it is re-seeded with the
 * farthest point, as the host does, and the clustering recovers. */
START_TEST(test_kmeans_reseed)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 24);
    const size_t n = 517, d = 19, k = 7;
    float *x = xmalloc(n * d * 4), *cent = xmalloc(k * d * 4);
    float *init = xmalloc(k * d * 4);
    int *label = xmalloc(n * sizeof *label);
    int32_t *assign = xmalloc(n * 4);
    separated(&rng, n, d, k, x, label);
    /* A centroid on a point of each cluster but the last, whose centroid
     * no point can reach: it is left empty, then re-seeded with one of the
     * points of the cluster that has none, which lie farthest. */
    for (size_t c = 0; c < k; c++)
        memcpy(init + c * d, x + c * d, d * 4);
    for (size_t j = 0; j < d; j++)
        init[(k - 1) * d + j] = 1e4f;
    atmoe_kmeans_options o = {.k = k, .max_iterations = 50,
                              .tolerance = 1e-6, .init_given = 1};
    atmoe_kmeans_result r;
    ck_assert_status(device_kmeans(ctx, x, n, d, &o, init, cent, assign, &r),
                     ctx);
    host_result h;
    host_kmeans(x, n, d, k, 0, 1, 50, 1e-6, init, &h);
    ck_assert_uint_eq(h.reseeded, 1);
    ck_assert_uint_eq(r.reseeded, 1);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(assign[i] == h.assign[i],
                      "point %zu: device cluster %d, host %d", i, assign[i],
                      h.assign[i]);
    ck_assert_msg(fabs(r.objective - h.objective) <= 1e-4 * h.objective,
                  "objective %.9g, host %.9g", r.objective, h.objective);
    for (size_t i = 0; i < n; i++)
        ck_assert_int_eq(assign[i], label[i]);
    host_result_free(&h);
    free(x);
    free(cent);
    free(init);
    free(label);
    free(assign);
    atmoe_context_free(ctx);
}
END_TEST

typedef struct progress_log {
    double last[8];
    unsigned calls, stop_at;
} progress_log;

static int log_progress(const atmoe_kmeans_progress *p, void *user)
{
    progress_log *l = user;
    l->calls++;
    if (p->restart < 8)
        l->last[p->restart] = p->objective;
    return l->stop_at && l->calls >= l->stop_at;
}

/* The best run is kept: its objective is the least of every run's last. */
START_TEST(test_kmeans_restarts)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 25);
    const size_t n = 211, d = 7, k = 6;
    float *x = xmalloc(n * d * 4), *cent = xmalloc(k * d * 4);
    int32_t *assign = xmalloc(n * 4);
    test_fill_uniform(&rng, x, n * d, -1, 1);
    progress_log log = {{0}, 0, 0};
    atmoe_kmeans_options o = {.k = k, .seed = 7, .restarts = 5,
                              .max_iterations = 30, .tolerance = 0,
                              .progress = log_progress, .user = &log};
    atmoe_kmeans_result r;
    ck_assert_status(device_kmeans(ctx, x, n, d, &o, NULL, cent, assign, &r),
                     ctx);
    ck_assert_uint_eq(r.restarts, 5);
    unsigned best = 0;
    for (unsigned q = 1; q < 5; q++)
        if (log.last[q] < log.last[best])
            best = q;
    ck_assert_uint_eq(r.best_restart, best);
    ck_assert(r.objective == log.last[best]);
    int differ = 0;
    for (unsigned q = 1; q < 5; q++)
        differ |= log.last[q] != log.last[0];
    ck_assert_msg(differ, "every restart found the same objective");
    host_result h;
    host_kmeans(x, n, d, k, 7, 5, 30, 0, NULL, &h);
    ck_assert_msg(r.objective <= h.objective * (1 + 1e-5),
                  "objective %.9g, host %.9g", r.objective, h.objective);
    host_result_free(&h);

    /* A callback that says stop: CANCELLED, outputs unwritten. */
    log.calls = 0;
    log.stop_at = 2;
    size_t xs[2] = {n, d}, cs[2] = {k, d};
    atmoe_tensor *tx = tensor_from(ctx, ATMOE_DTYPE_F32, 2, xs, x);
    atmoe_tensor *tc = poisoned(ctx, 2, cs);
    ck_assert_fails_with(atmoe_kmeans(ctx, tx, &o, tc, NULL, &r), ctx,
                         ATMOE_STATUS_CANCELLED, "stopped");
    ck_assert_uint_eq(log.calls, 2);
    ck_assert_status(atmoe_tensor_read(tc, cent, k * d * 4), ctx);
    for (size_t i = 0; i < k * d; i++)
        ck_assert(isnan(cent[i]));
    atmoe_tensor_free(tx);
    atmoe_tensor_free(tc);
    free(x);
    free(cent);
    free(assign);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_kmeans_normalize)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 26);
    const size_t n = 203, d = 13, k = 4;
    float *x = xmalloc(n * d * 4), *xn = xmalloc(n * d * 4);
    float *cent = xmalloc(k * d * 4);
    int32_t *assign = xmalloc(n * 4);
    test_fill_uniform(&rng, x, n * d, -3, 3);
    for (size_t r = 0; r < n; r++) {
        double s = 0;
        for (size_t j = 0; j < d; j++)
            s += (double)x[r * d + j] * x[r * d + j];
        for (size_t j = 0; j < d; j++)
            xn[r * d + j] = (float)(x[r * d + j] / sqrt(s));
    }
    atmoe_kmeans_options o = {.k = k, .seed = 3, .max_iterations = 40,
                              .normalize = 1};
    atmoe_kmeans_result r;
    ck_assert_status(device_kmeans(ctx, x, n, d, &o, NULL, cent, assign, &r),
                     ctx);
    host_result h;
    host_kmeans(xn, n, d, k, 3, 1, 40, 0, NULL, &h);
    ck_assert_msg(r.objective <= h.objective * (1 + 1e-5),
                  "objective %.9g, host %.9g", r.objective, h.objective);
    host_result_free(&h);
    free(x);
    free(xn);
    free(cent);
    free(assign);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_kmeans_refusals)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 27);
    const size_t n = 17, d = 5;
    float x[17 * 5];
    test_fill_uniform(&rng, x, n * d, -1, 1);
    size_t xs[2] = {n, d}, cs[2] = {3, d}, big[2] = {18, d};
    atmoe_tensor *tx = tensor_from(ctx, ATMOE_DTYPE_F32, 2, xs, x);
    atmoe_tensor *tc = poisoned(ctx, 2, cs), *tbig = poisoned(ctx, 2, big);
    atmoe_tensor *ti = tensor_from(ctx, ATMOE_DTYPE_I32, 2, xs, NULL);
    atmoe_tensor *ta = poisoned_i32(ctx, n - 1);
    atmoe_kmeans_options o = {.k = 3};
    o.k = 0;
    ck_assert_fails_with(atmoe_kmeans(ctx, tx, &o, tc, NULL, NULL), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "k is 0");
    o.k = 18;
    ck_assert_fails_with(atmoe_kmeans(ctx, tx, &o, tbig, NULL, NULL), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "more clusters than the 17 points");
    o.k = 4;
    ck_assert_fails_with(atmoe_kmeans(ctx, tx, &o, tc, NULL, NULL), ctx,
                         ATMOE_STATUS_SHAPE_MISMATCH,
                         "centroids has shape [3, 5], must be [4, 5]");
    o.k = 3;
    ck_assert_fails_with(atmoe_kmeans(ctx, ti, &o, tc, NULL, NULL), ctx,
                         ATMOE_STATUS_DTYPE_MISMATCH, "points is i32");
    ck_assert_fails_with(atmoe_kmeans(ctx, tx, &o, tc, ta, NULL), ctx,
                         ATMOE_STATUS_SHAPE_MISMATCH, "assignments has shape");
    o.tolerance = -1;
    ck_assert_fails_with(atmoe_kmeans(ctx, tx, &o, tc, NULL, NULL), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "tolerance");
    o.tolerance = 0;
    o.init_given = 1;
    o.restarts = 2;
    ck_assert_fails_with(atmoe_kmeans(ctx, tx, &o, tc, NULL, NULL), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "restarts must be 1");
    o.restarts = 1;
    ck_assert_fails_with(atmoe_kmeans(ctx, tx, &o, tc, NULL, NULL), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "row 0 of centroids is not finite");
    o.init_given = 0;
    ck_assert_fails(atmoe_kmeans(ctx, tx, NULL, tc, NULL, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_kmeans(ctx, NULL, &o, tc, NULL, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    /* NaN is refused whether or not the points are normalised; a zero row
     * only when they are. */
    float y[17 * 5];
    memcpy(y, x, sizeof y);
    memset(y + 4 * d, 0, d * 4);
    ck_assert_status(atmoe_tensor_write(tx, y, sizeof y), ctx);
    ck_assert_status(atmoe_kmeans(ctx, tx, &o, tc, NULL, NULL), ctx);
    o.normalize = 1;
    ck_assert_fails_with(atmoe_kmeans(ctx, tx, &o, tc, NULL, NULL), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "row 4 of points has zero norm");
    y[9 * d + 2] = NAN;
    ck_assert_status(atmoe_tensor_write(tx, y, sizeof y), ctx);
    for (int norm = 0; norm < 2; norm++) {
        o.normalize = norm;
        ck_assert_fails_with(atmoe_kmeans(ctx, tx, &o, tc, NULL, NULL), ctx,
                             ATMOE_STATUS_INVALID_ARGUMENT,
                             norm ? "row 4 of points" : "row 9 of points is "
                                                        "not finite");
    }
    memcpy(y, x, sizeof y);
    y[16 * d] = INFINITY;
    ck_assert_status(atmoe_tensor_write(tx, y, sizeof y), ctx);
    o.normalize = 0;
    ck_assert_fails_with(atmoe_kmeans(ctx, tx, &o, tc, NULL, NULL), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "row 16 of points is not finite");
    atmoe_tensor_free(tx);
    atmoe_tensor_free(tc);
    atmoe_tensor_free(tbig);
    atmoe_tensor_free(ti);
    atmoe_tensor_free(ta);
    atmoe_context_free(ctx);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Assignment, scores and files                                              */
/* ------------------------------------------------------------------------ */

START_TEST(test_assign_scores)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 31);
    const size_t n = 203, d = 19, k = 7;
    float *x = xmalloc(n * d * 4), *c = xmalloc(k * d * 4);
    float *scores = xmalloc(n * k * 4);
    int32_t *assign = xmalloc(n * 4);
    test_fill_uniform(&rng, x, n * d, -1, 1);
    test_fill_uniform(&rng, c, k * d, -1, 1);
    size_t xs[2] = {n, d}, cs[2] = {k, d}, ss[2] = {n, k};
    atmoe_tensor *tx = tensor_from(ctx, ATMOE_DTYPE_F32, 2, xs, x);
    atmoe_tensor *tc = tensor_from(ctx, ATMOE_DTYPE_F32, 2, cs, c);
    atmoe_tensor *ts = poisoned(ctx, 2, ss);
    atmoe_tensor *ta = poisoned_i32(ctx, n);
    ck_assert_status(atmoe_kmeans_assign(ctx, tc, tx, ta, ts), ctx);
    ck_assert_status(atmoe_tensor_read(ts, scores, n * k * 4), ctx);
    ck_assert_status(atmoe_tensor_read(ta, assign, n * 4), ctx);
    double *want = xmalloc(n * k * sizeof *want);
    for (size_t i = 0; i < n; i++) {
        double best = INFINITY, second = INFINITY;
        int arg = -1;
        for (size_t q = 0; q < k; q++) {
            double dot = 0, dist = 0;
            for (size_t j = 0; j < d; j++) {
                dot += (double)x[i * d + j] * c[q * d + j];
                double t = (double)x[i * d + j] - c[q * d + j];
                dist += t * t;
            }
            want[i * k + q] = dot;
            if (dist < best) {
                second = best;
                best = dist;
                arg = (int)q;
            } else if (dist < second) {
                second = dist;
            }
        }
        /* Near-ties may round either way in f32. */
        if (second - best > 1e-4 * best)
            ck_assert_msg(assign[i] == arg, "point %zu: %d, host %d", i,
                          assign[i], arg);
    }
    double err = test_max_rel_err(scores, want, n * k, 1.0);
    ck_assert_msg(err < 1e-5, "scores: rel err %g", err);
    /* Either output alone. */
    ck_assert_status(atmoe_tensor_fill(ts, NAN), ctx);
    ck_assert_status(atmoe_kmeans_assign(ctx, tc, tx, NULL, ts), ctx);
    ck_assert_status(atmoe_tensor_read(ts, scores, n * k * 4), ctx);
    ck_assert(test_max_rel_err(scores, want, n * k, 1.0) < 1e-5);
    int32_t *again = xmalloc(n * 4);
    ck_assert_status(atmoe_tensor_fill(ta, -7), ctx);
    ck_assert_status(atmoe_kmeans_assign(ctx, tc, tx, ta, NULL), ctx);
    ck_assert_status(atmoe_tensor_read(ta, again, n * 4), ctx);
    ck_assert(memcmp(again, assign, n * 4) == 0);
    /* Refusals. */
    size_t bad[2] = {n, k + 1};
    atmoe_tensor *tb = poisoned(ctx, 2, bad);
    ck_assert_fails(atmoe_kmeans_assign(ctx, tc, tx, NULL, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails_with(atmoe_kmeans_assign(ctx, tc, tx, NULL, tb), ctx,
                         ATMOE_STATUS_SHAPE_MISMATCH, "scores has shape");
    ck_assert_fails_with(atmoe_kmeans_assign(ctx, tc, tb, ta, NULL), ctx,
                         ATMOE_STATUS_SHAPE_MISMATCH, "centroids has shape");
    x[7 * d] = NAN;
    ck_assert_status(atmoe_tensor_write(tx, x, n * d * 4), ctx);
    ck_assert_fails_with(atmoe_kmeans_assign(ctx, tc, tx, ta, NULL), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "row 7 of points is not finite");
    atmoe_tensor_free(tb);
    atmoe_tensor_free(tx);
    atmoe_tensor_free(tc);
    atmoe_tensor_free(ts);
    atmoe_tensor_free(ta);
    free(x);
    free(c);
    free(scores);
    free(assign);
    free(again);
    free(want);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_centroids_file)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 32);
    const size_t k = 7, d = 19;
    float c[7 * 19], got[7 * 19];
    test_fill_uniform(&rng, c, k * d, -1, 1);
    size_t cs[2] = {k, d};
    atmoe_tensor *tc = tensor_from(ctx, ATMOE_DTYPE_F32, 2, cs, c);
    char dir[512], path[600];
    test_mkdtemp(dir, sizeof dir, "cluster");
    snprintf(path, sizeof path, "%s/c.safetensors", dir);
    const double objective = 123.456789012345678;
    ck_assert_status(atmoe_centroids_save(tc, objective, path), ctx);
    atmoe_tensor *back;
    double obj;
    ck_assert_status(atmoe_centroids_load(ctx, path, &back, &obj), ctx);
    int nd;
    size_t shape[ATMOE_MAX_DIMS];
    ck_assert_status(atmoe_tensor_get_shape(back, &nd, shape), ctx);
    ck_assert_int_eq(nd, 2);
    ck_assert_uint_eq(shape[0], k);
    ck_assert_uint_eq(shape[1], d);
    ck_assert_status(atmoe_tensor_read(back, got, sizeof got), ctx);
    ck_assert(memcmp(got, c, sizeof c) == 0);
    ck_assert(obj == objective);
    atmoe_tensor_free(back);

    /* The metadata and tensor a reader sees. */
    atmoe_safetensors *f;
    const char *text;
    ck_assert_status(atmoe_safetensors_open(NULL, path, &f), NULL);
    ck_assert_status(atmoe_safetensors_get_metadata(f, "objective", &text),
                     NULL);
    ck_assert(strtod(text, NULL) == objective);
    atmoe_safetensors_free(f);

    /* Without an objective: NaN back. */
    ck_assert_status(atmoe_centroids_save(tc, NAN, path), ctx);
    ck_assert_status(atmoe_centroids_load(ctx, path, &back, &obj), ctx);
    ck_assert(isnan(obj));
    atmoe_tensor_free(back);

    /* A file without centroids, or with the wrong shape. */
    atmoe_safetensors_writer *w;
    uint64_t s1[1] = {k};
    ck_assert_status(atmoe_safetensors_writer_new(ctx, &w), ctx);
    ck_assert_status(atmoe_safetensors_writer_add_f32(
                         w, "other", ATMOE_SAFETENSORS_F32, 1, s1, c), ctx);
    ck_assert_status(atmoe_safetensors_writer_save(w, path), ctx);
    atmoe_safetensors_writer_free(w);
    ck_assert_fails(atmoe_centroids_load(ctx, path, &back, &obj), ctx,
                    ATMOE_STATUS_NOT_FOUND);
    ck_assert_status(atmoe_safetensors_writer_new(ctx, &w), ctx);
    ck_assert_status(atmoe_safetensors_writer_add_f32(
                         w, "centroids", ATMOE_SAFETENSORS_F32, 1, s1, c),
                     ctx);
    ck_assert_status(atmoe_safetensors_writer_save(w, path), ctx);
    atmoe_safetensors_writer_free(w);
    ck_assert_fails_with(atmoe_centroids_load(ctx, path, &back, &obj), ctx,
                         ATMOE_STATUS_SHAPE_MISMATCH, "must be [K, D]");
    /* An i32 tensor cannot be saved as centroids. */
    atmoe_tensor *ti = poisoned_i32(ctx, k);
    ck_assert_fails(atmoe_centroids_save(ti, 1.0, path), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);
    atmoe_tensor_free(ti);
    atmoe_tensor_free(tc);
    test_rmdir_r(dir);
    atmoe_context_free(ctx);
}
END_TEST

/* The tuned work-group of the k-means passes ("kmeans" WG) changes the
 * launches, not the arithmetic: any size gives the float64 reference's
 * objective and the same bits as the default 64. */
START_TEST(test_kmeans_work_groups)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 23);
    const size_t n = 203, d = 13, k = 7;
    float *x = xmalloc(n * d * 4), *cent = xmalloc(k * d * 4);
    float *cent64 = xmalloc(k * d * 4);
    int32_t *assign = xmalloc(n * 4), *assign64 = xmalloc(n * 4);
    test_fill_uniform(&rng, x, n * d, -1, 1);
    atmoe_kmeans_options o = {.k = k, .seed = 5, .restarts = 2,
                              .max_iterations = 50, .tolerance = 0};
    host_result h;
    host_kmeans(x, n, d, k, 5, 2, 50, 0, NULL, &h);
    static const int wgs[] = {64, 1, 8, 256};
    for (size_t w = 0; w < sizeof wgs / sizeof wgs[0]; w++) {
        char params[64];
        snprintf(params, sizeof params, "{\"kernels\": {\"kmeans\": "
                 "{\"WG\": %d}}}", wgs[w]);
        ck_assert_status(atmoe_context_set_params(ctx, params), ctx);
        atmoe_kmeans_result r;
        float *c = w == 0 ? cent64 : cent;
        int32_t *a = w == 0 ? assign64 : assign;
        ck_assert_status(device_kmeans(ctx, x, n, d, &o, NULL, c, a, &r),
                         ctx);
        ck_assert_msg(r.objective <= h.objective * (1 + 1e-5),
                      "WG %d: objective %.9g, host %.9g", wgs[w],
                      r.objective, h.objective);
        if (w == 0)
            continue;
        ck_assert_msg(memcmp(cent, cent64, k * d * 4) == 0,
                      "WG %d: other centroids than with 64", wgs[w]);
        ck_assert_msg(memcmp(assign, assign64, n * 4) == 0,
                      "WG %d: other assignments than with 64", wgs[w]);
    }
    host_result_free(&h);
    free(x);
    free(cent);
    free(cent64);
    free(assign);
    free(assign64);
    atmoe_context_free(ctx);
}
END_TEST

static Suite *cluster_suite(void)
{
    Suite *s = suite_create("cluster");
    TCase *tc = tcase_create("embeddings");
    tcase_add_test(tc, test_pool_masked);
    tcase_add_test(tc, test_pool_refusals);
    tcase_add_test(tc, test_normalize);
    suite_add_tcase(s, tc);

    tc = tcase_create("kmeans");
    tcase_add_test(tc, test_kmeans_separated);
    tcase_add_test(tc, test_kmeans_random);
    tcase_add_test(tc, test_kmeans_deterministic);
    tcase_add_test(tc, test_kmeans_reseed);
    tcase_add_test(tc, test_kmeans_restarts);
    tcase_add_test(tc, test_kmeans_normalize);
    tcase_add_test(tc, test_kmeans_refusals);
    tcase_add_test(tc, test_kmeans_work_groups);
    suite_add_tcase(s, tc);

    tc = tcase_create("assign");
    tcase_add_test(tc, test_assign_scores);
    tcase_add_test(tc, test_centroids_file);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(cluster_suite());
}
