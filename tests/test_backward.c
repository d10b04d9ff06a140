/* Reverse mode (atmoe_graph_backward) and the losses: every operation's
 * gradient against central finite differences of a float64 host reference
 * of the forward, on small odd shapes and random inputs, planned at a
 * larger batch than the one computed (so that gradients follow the
 * computed batch); sums over several readers, frozen parameters, inputs'
 * gradients, top-k's kept entries, the three losses and their ignore
 * index, the registry the optimiser reads, a training compute without host
 * allocations, and bad input.  Links the library's objects
 * (lib/libatmoe_core.la) to reach the registry and to add an operation
 * without a backward. */
#include <config.h>

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "graph/trainable.h"
#include "testutil.h"

/* Computed and planned batch. */
#define T_ROWS 5
#define T_MAX 7
/* Central differences in float64 on the host reference: their error is
 * O(h^2) ~ 1e-6 relative, far below the tolerance of the f32 device
 * gradients, |g - g_fd| / |g_fd| over the whole gradient. */
#define FD_STEP 1e-3
#define GRAD_TOL 1e-3
#define LOSS_TOL 1e-4
#define MAX_LEAVES 6

enum { L_BATCHED, L_INPUT, L_PARAM, L_CONST };

typedef struct leaf {
    int kind, trainable, is_int;
    int ndim;
    size_t shape[ATMOE_MAX_DIMS]; /* at the computed batch */
    double lo, hi;                /* uniform data; ints in [lo, hi) */
} leaf;

typedef struct gcase gcase;
struct gcase {
    int nleaf;
    leaf leaf[MAX_LEAVES];
    /* y, and whether it is batched (in its first dimension); with
     * direct_loss y is the loss itself. */
    int y_batched, direct_loss;
    size_t ycount; /* elements of y at the computed batch */
    atmoe_status (*build)(atmoe_graph *g, const gcase *c,
                          const atmoe_node *in, atmoe_node *y);
    void (*ref)(const gcase *c, double *const *x, double *y);
    /* Optional: rewrites the random data of a leaf. */
    void (*fill)(const gcase *c, int which, double *x, size_t n,
                 test_rng *rng);
    int ip[8];
    double dp[4];
    double loss_tol;
};

static size_t leaf_count(const leaf *l)
{
    size_t c = 1;
    for (int i = 0; i < l->ndim; i++)
        c *= l->shape[i];
    return c;
}

/* The host loss: y itself, or mean(y * R). */
static double host_loss(const gcase *c, double *const *x, const double *r,
                        double *y)
{
    c->ref(c, x, y);
    if (c->direct_loss)
        return y[0];
    double s = 0;
    for (size_t i = 0; i < c->ycount; i++)
        s += y[i] * r[i];
    return s / (double)c->ycount;
}

static void poison_arena(atmoe_graph *g)
{
    if (g->arena == NULL)
        return;
    float nan_ = nanf("");
    ck_assert_int_eq(clEnqueueFillBuffer(g->ctx->queue, g->arena, &nan_,
                                         sizeof nan_, 0,
                                         g->memory.arena_bytes, 0, NULL,
                                         NULL),
                     CL_SUCCESS);
}

/* Builds, plans, computes and checks every trainable leaf's gradient. */
static void check_case(const gcase *c, uint64_t seed)
{
    atmoe_context *ctx = test_context();
    atmoe_graph *g = NULL;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    test_rng rng;
    test_rng_seed(&rng, seed);
    atmoe_node in[MAX_LEAVES];
    double *x[MAX_LEAVES];
    int batched = 0;
    for (int i = 0; i < c->nleaf; i++) {
        const leaf *l = &c->leaf[i];
        batched |= l->kind == L_BATCHED;
        size_t n = leaf_count(l), shape[ATMOE_MAX_DIMS];
        memcpy(shape, l->shape, sizeof shape);
        x[i] = malloc(n * sizeof *x[i]);
        for (size_t e = 0; e < n; e++)
            x[i][e] = l->is_int ? floor(test_uniform(&rng, l->lo, l->hi))
                                : test_uniform(&rng, l->lo, l->hi);
        if (c->fill)
            c->fill(c, i, x[i], n, &rng);
        atmoe_dtype dt = l->is_int ? ATMOE_DTYPE_I32 : ATMOE_DTYPE_F32;
        if (l->kind == L_BATCHED || l->kind == L_INPUT) {
            if (l->kind == L_BATCHED)
                shape[0] = T_MAX;
            ck_assert_status(atmoe_graph_input(g, NULL, dt, l->ndim, shape,
                                               l->kind == L_BATCHED, &in[i]),
                             ctx);
        } else {
            void *data = malloc(n * 4);
            for (size_t e = 0; e < n; e++) {
                if (l->is_int)
                    ((int32_t *)data)[e] = (int32_t)x[i][e];
                else
                    ((float *)data)[e] = (float)x[i][e];
            }
            if (l->kind == L_CONST) {
                ck_assert_status(atmoe_graph_constant(g, NULL, dt, l->ndim,
                                                      shape, data, &in[i]),
                                 ctx);
            } else {
                atmoe_tensor *t;
                ck_assert_status(
                    atmoe_tensor_new(ctx, dt, l->ndim, shape, &t), ctx);
                ck_assert_status(atmoe_tensor_write(t, data, n * 4), ctx);
                ck_assert_status(atmoe_graph_parameter(g, NULL, t, &in[i]),
                                 ctx);
                atmoe_tensor_free(t);
            }
            free(data);
        }
        if (l->trainable)
            ck_assert_status(atmoe_graph_set_trainable(g, in[i], 1), ctx);
    }
    atmoe_node y, loss, rn = ATMOE_NODE_NONE;
    ck_assert_status(c->build(g, c, in, &y), ctx);
    double *r = malloc(c->ycount * sizeof *r);
    float *rf = malloc(c->ycount * sizeof *rf);
    for (size_t e = 0; e < c->ycount; e++) {
        r[e] = test_uniform(&rng, -1, 1);
        rf[e] = (float)r[e];
    }
    if (c->direct_loss) {
        loss = y;
    } else {
        /* loss = mean(y * R), y's rows made [T, rest] first. */
        int nd;
        size_t ys[ATMOE_MAX_DIMS], all = 1;
        ck_assert_status(atmoe_graph_get_shape(g, y, &nd, ys, NULL), ctx);
        for (int i = 0; i < nd; i++)
            all *= ys[i];
        size_t s2[2] = {c->y_batched ? T_MAX : 1,
                        c->y_batched ? all / T_MAX : all};
        atmoe_node y2, m, flat;
        size_t s1[1] = {all};
        ck_assert_status(atmoe_graph_reshape(g, y, 2, s2, &y2), ctx);
        if (c->y_batched)
            ck_assert_status(atmoe_graph_input(g, "R", ATMOE_DTYPE_F32, 2, s2,
                                               1, &rn),
                             ctx);
        else
            ck_assert_status(atmoe_graph_constant(g, "R", ATMOE_DTYPE_F32, 2,
                                                  s2, rf, &rn),
                             ctx);
        ck_assert_status(atmoe_graph_mul(g, y2, rn, &m), ctx);
        ck_assert_status(atmoe_graph_reshape(g, m, 1, s1, &flat), ctx);
        ck_assert_status(atmoe_graph_mean(g, flat, 0, &loss), ctx);
    }
    ck_assert_status(atmoe_graph_backward(g, loss), ctx);
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    /* Twice: the second compute must give the same (nothing accumulates
     * across computes) and both allocate nothing on the host. */
    for (int pass = 0; pass < 2; pass++) {
        poison_arena(g);
        for (int i = 0; i < c->nleaf; i++) {
            const leaf *l = &c->leaf[i];
            if (l->kind != L_BATCHED && l->kind != L_INPUT)
                continue;
            size_t n = leaf_count(l);
            void *data = malloc(n * 4);
            for (size_t e = 0; e < n; e++) {
                if (l->is_int)
                    ((int32_t *)data)[e] = (int32_t)x[i][e];
                else
                    ((float *)data)[e] = (float)x[i][e];
            }
            ck_assert_status(atmoe_graph_set_input(g, in[i], data, n * 4,
                                                   l->kind == L_BATCHED
                                                       ? T_ROWS
                                                       : 0),
                             ctx);
            free(data);
        }
        if (rn != ATMOE_NODE_NONE && c->y_batched)
            ck_assert_status(atmoe_graph_set_input(g, rn, rf,
                                                   c->ycount * sizeof *rf,
                                                   T_ROWS),
                             ctx);
        ck_assert_status(atmoe_graph_compute(g, batched ? T_ROWS : 0), ctx);
        atmoe_compute_stats stats;
        ck_assert_status(atmoe_graph_get_compute_stats(g, &stats), ctx);
        ck_assert_msg(stats.host_allocations == 0,
                      "a training compute made %llu host allocations",
                      (unsigned long long)stats.host_allocations);

        double *yh = malloc((c->ycount + 1) * sizeof *yh);
        float lv;
        ck_assert_status(atmoe_graph_read(g, loss, &lv, sizeof lv), ctx);
        double lref = host_loss(c, x, r, yh);
        double ltol = c->loss_tol > 0 ? c->loss_tol : LOSS_TOL;
        ck_assert_msg(isfinite(lv) &&
                          fabs(lv - lref) <= ltol * fmax(fabs(lref), 1e-3),
                      "loss %.9g, reference %.9g", lv, lref);
        for (int i = 0; i < c->nleaf; i++) {
            const leaf *l = &c->leaf[i];
            if (!l->trainable)
                continue;
            size_t n = leaf_count(l);
            atmoe_node gn;
            ck_assert_status(atmoe_graph_get_grad(g, in[i], &gn), ctx);
            float *got = malloc(n * sizeof *got);
            test_poison(got, n);
            ck_assert_status(atmoe_graph_read(g, gn, got, n * sizeof *got),
                             ctx);
            double num = 0, den = 0;
            for (size_t e = 0; e < n; e++) {
                double keep = x[i][e];
                x[i][e] = keep + FD_STEP;
                double lp = host_loss(c, x, r, yh);
                x[i][e] = keep - FD_STEP;
                double lm = host_loss(c, x, r, yh);
                x[i][e] = keep;
                double fd = (lp - lm) / (2 * FD_STEP);
                ck_assert_msg(isfinite(got[e]),
                              "leaf %d: gradient element %zu is %g", i, e,
                              got[e]);
                num += (got[e] - fd) * (got[e] - fd);
                den += fd * fd;
            }
            double rel = sqrt(num) / fmax(sqrt(den), 1e-12);
            ck_assert_msg(den > 0, "leaf %d: the reference gradient is 0", i);
            ck_assert_msg(rel <= GRAD_TOL,
                          "leaf %d: |g - g_fd| / |g_fd| = %g > %g", i, rel,
                          GRAD_TOL);
            free(got);
        }
        free(yh);
    }
    for (int i = 0; i < c->nleaf; i++)
        free(x[i]);
    free(r);
    free(rf);
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
}

static leaf L(int kind, int trainable, int ndim, size_t d0, size_t d1,
              size_t d2)
{
    leaf l = {kind, trainable, 0, ndim, {d0, d1, d2, 1}, -1, 1};
    return l;
}

static double sigmoid(double v)
{
    return 1 / (1 + exp(-v));
}

/* ------------------------------------------------------------ matmul */

/* Dense row-major C[m, n] = op(A) op(B) (+ bias). */
static void host_matmul(const double *a, const double *b, const double *bias,
                        int ta, int tb, size_t m, size_t n, size_t k,
                        double *c)
{
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j++) {
            double s = bias ? bias[j] : 0;
            for (size_t p = 0; p < k; p++)
                s += (ta ? a[p * m + i] : a[i * k + p]) *
                     (tb ? b[j * k + p] : b[p * n + j]);
            c[i * n + j] = s;
        }
}

/* ip: ta, tb, has bias; leaves a, b, (bias). */
static atmoe_status build_matmul(atmoe_graph *g, const gcase *c,
                                 const atmoe_node *in, atmoe_node *y)
{
    unsigned f = (c->ip[0] ? ATMOE_MATMUL_TRANSPOSE_A : 0) |
                 (c->ip[1] ? ATMOE_MATMUL_TRANSPOSE_B : 0);
    return atmoe_graph_matmul(g, in[0], in[1],
                              c->ip[2] ? in[2] : ATMOE_NODE_NONE, f, y);
}

static void ref_matmul(const gcase *c, double *const *x, double *y)
{
    const leaf *a = &c->leaf[0], *b = &c->leaf[1];
    int ta = c->ip[0], tb = c->ip[1];
    size_t m = a->shape[ta], k = a->shape[!ta], n = b->shape[!tb];
    host_matmul(x[0], x[1], c->ip[2] ? x[2] : NULL, ta, tb, m, n, k, y);
}

static void matmul_case(int ta, int tb, int batched)
{
    gcase c = {0};
    c.nleaf = 3;
    size_t m = batched ? T_ROWS : 4, k = 5, n = 3;
    int ka = batched && !ta ? L_BATCHED : L_PARAM;
    c.leaf[0] = ta ? L(L_PARAM, 1, 2, k, m, 1) : L(ka, 1, 2, m, k, 1);
    c.leaf[1] = tb ? L(L_PARAM, 1, 2, n, k, 1) : L(L_PARAM, 1, 2, k, n, 1);
    c.leaf[2] = L(L_PARAM, 1, 1, n, 1, 1);
    c.ip[0] = ta;
    c.ip[1] = tb;
    c.ip[2] = 1;
    c.y_batched = ka == L_BATCHED;
    c.ycount = m * n;
    c.build = build_matmul;
    c.ref = ref_matmul;
    check_case(&c, 11 + (uint64_t)(ta * 2 + tb));
}

START_TEST(test_matmul_nn)
{
    matmul_case(0, 0, 1);
}
END_TEST

START_TEST(test_matmul_nt)
{
    matmul_case(0, 1, 1);
}
END_TEST

START_TEST(test_matmul_tn)
{
    matmul_case(1, 0, 0);
}
END_TEST

START_TEST(test_matmul_tt)
{
    matmul_case(1, 1, 0);
}
END_TEST

/* C = x^T z with both batched in the inner dimension: the weight-gradient
 * pattern, an unbatched result summed over the computed rows. */
START_TEST(test_matmul_batched_inner)
{
    gcase c = {0};
    c.nleaf = 2;
    c.leaf[0] = L(L_BATCHED, 1, 2, T_ROWS, 4, 1);
    c.leaf[1] = L(L_BATCHED, 1, 2, T_ROWS, 3, 1);
    c.ip[0] = 1;
    c.ycount = 12;
    c.build = build_matmul;
    c.ref = ref_matmul;
    check_case(&c, 21);
}
END_TEST

/* C = W x^T, batched in its columns, then transposed back to [T, 3]. */
static atmoe_status build_matmul_cols(atmoe_graph *g, const gcase *c,
                                      const atmoe_node *in, atmoe_node *y)
{
    (void)c;
    atmoe_node t;
    atmoe_status st = atmoe_graph_matmul(g, in[0], in[1], ATMOE_NODE_NONE,
                                         ATMOE_MATMUL_TRANSPOSE_B, &t);
    return st ? st : atmoe_graph_transpose(g, t, 0, 1, y);
}

static void ref_matmul_cols(const gcase *c, double *const *x, double *y)
{
    (void)c;
    double t[3 * T_ROWS];
    host_matmul(x[0], x[1], NULL, 0, 1, 3, T_ROWS, 5, t);
    for (size_t r = 0; r < T_ROWS; r++)
        for (size_t j = 0; j < 3; j++)
            y[r * 3 + j] = t[j * T_ROWS + r];
}

START_TEST(test_matmul_batched_columns)
{
    gcase c = {0};
    c.nleaf = 2;
    c.leaf[0] = L(L_PARAM, 1, 2, 3, 5, 1);
    c.leaf[1] = L(L_BATCHED, 1, 2, T_ROWS, 5, 1);
    c.y_batched = 1;
    c.ycount = T_ROWS * 3;
    c.build = build_matmul_cols;
    c.ref = ref_matmul_cols;
    check_case(&c, 22);
}
END_TEST

/* ------------------------------------------------------------ elementwise */

/* (a + b) + c, or with mul: a [T, 4], b [4], c [T, 1]. */
static atmoe_status build_binary(atmoe_graph *g, const gcase *c,
                                 const atmoe_node *in, atmoe_node *y)
{
    atmoe_node t;
    atmoe_status (*f)(atmoe_graph *, atmoe_node, atmoe_node, atmoe_node *) =
        c->ip[0] ? atmoe_graph_mul : atmoe_graph_add;
    atmoe_status st = f(g, in[0], in[1], &t);
    return st ? st : f(g, t, in[2], y);
}

static void ref_binary(const gcase *c, double *const *x, double *y)
{
    for (size_t r = 0; r < T_ROWS; r++)
        for (size_t j = 0; j < 4; j++) {
            double a = x[0][r * 4 + j], b = x[1][j], d = x[2][r];
            y[r * 4 + j] = c->ip[0] ? a * b * d : a + b + d;
        }
}

static void binary_case(int mul)
{
    gcase c = {0};
    c.nleaf = 3;
    c.leaf[0] = L(L_BATCHED, 1, 2, T_ROWS, 4, 1);
    c.leaf[1] = L(L_PARAM, 1, 1, 4, 1, 1);
    c.leaf[2] = L(L_BATCHED, 1, 2, T_ROWS, 1, 1);
    c.ip[0] = mul;
    c.y_batched = 1;
    c.ycount = T_ROWS * 4;
    c.build = build_binary;
    c.ref = ref_binary;
    check_case(&c, 31 + (uint64_t)mul);
}

START_TEST(test_add_broadcast)
{
    binary_case(0);
}
END_TEST

START_TEST(test_mul_broadcast)
{
    binary_case(1);
}
END_TEST

/* ip[0]: 0 scale, 1 silu, 2 gelu, 3 sigmoid; x [T, 6]. */
static atmoe_status build_unary(atmoe_graph *g, const gcase *c,
                                const atmoe_node *in, atmoe_node *y)
{
    switch (c->ip[0]) {
    case 0:
        return atmoe_graph_scale(g, in[0], 0.7f, y);
    case 1:
        return atmoe_graph_silu(g, in[0], y);
    case 2:
        return atmoe_graph_gelu(g, in[0], y);
    default:
        return atmoe_graph_sigmoid(g, in[0], y);
    }
}

static void ref_unary(const gcase *c, double *const *x, double *y)
{
    for (size_t i = 0; i < c->ycount; i++) {
        double v = x[0][i];
        switch (c->ip[0]) {
        case 0:
            y[i] = (double)0.7f * v;
            break;
        case 1:
            y[i] = v * sigmoid(v);
            break;
        case 2:
            y[i] = 0.5 * v * erfc(-v / sqrt(2.0));
            break;
        default:
            y[i] = sigmoid(v);
        }
    }
}

static void unary_case(int which)
{
    gcase c = {0};
    c.nleaf = 1;
    c.leaf[0] = L(L_BATCHED, 1, 2, T_ROWS, 6, 1);
    c.leaf[0].lo = -4;
    c.leaf[0].hi = 4;
    c.ip[0] = which;
    c.y_batched = 1;
    c.ycount = T_ROWS * 6;
    c.build = build_unary;
    c.ref = ref_unary;
    check_case(&c, 41 + (uint64_t)which);
}

START_TEST(test_scale)
{
    unary_case(0);
}
END_TEST

START_TEST(test_silu)
{
    unary_case(1);
}
END_TEST

START_TEST(test_gelu)
{
    unary_case(2);
}
END_TEST

START_TEST(test_sigmoid)
{
    unary_case(3);
}
END_TEST

/* ------------------------------------------------------------ reductions */

/* Lines of a dense [outer, n, inner] array. */
#define LINE(o, j, i) (((o) * n + (j)) * inner + (i))

/* ip: 0 softmax, 1 l2norm, 2 mean; ip[1] the dimension; leaf 0's shape. */
static atmoe_status build_along(atmoe_graph *g, const gcase *c,
                                const atmoe_node *in, atmoe_node *y)
{
    switch (c->ip[0]) {
    case 0:
        return atmoe_graph_softmax(g, in[0], c->ip[1], y);
    case 1:
        return atmoe_graph_l2norm(g, in[0], c->ip[1], 1e-6f, y);
    default:
        return atmoe_graph_mean(g, in[0], c->ip[1], y);
    }
}

static void ref_along(const gcase *c, double *const *x, double *y)
{
    const leaf *l = &c->leaf[0];
    int d = c->ip[1];
    size_t outer = 1, n = l->shape[d], inner = 1;
    for (int i = 0; i < d; i++)
        outer *= l->shape[i];
    for (int i = d + 1; i < l->ndim; i++)
        inner *= l->shape[i];
    for (size_t o = 0; o < outer; o++)
        for (size_t i = 0; i < inner; i++) {
            const double *v = x[0];
            double m = -INFINITY, s = 0, ss = 0;
            for (size_t j = 0; j < n; j++) {
                m = fmax(m, v[LINE(o, j, i)]);
                s += v[LINE(o, j, i)];
                ss += v[LINE(o, j, i)] * v[LINE(o, j, i)];
            }
            if (c->ip[0] == 2) {
                y[o * inner + i] = s / (double)n;
                continue;
            }
            double e = 0;
            for (size_t j = 0; j < n; j++)
                e += exp(v[LINE(o, j, i)] - m);
            for (size_t j = 0; j < n; j++)
                y[LINE(o, j, i)] = c->ip[0] == 0
                                       ? exp(v[LINE(o, j, i)] - m) / e
                                       : v[LINE(o, j, i)] /
                                             fmax(sqrt(ss), 1e-6);
        }
}

static void along_case(int which, int dim, leaf l, size_t ycount,
                       int y_batched)
{
    gcase c = {0};
    c.nleaf = 1;
    c.leaf[0] = l;
    c.ip[0] = which;
    c.ip[1] = dim;
    c.y_batched = y_batched;
    c.ycount = ycount;
    c.build = build_along;
    c.ref = ref_along;
    check_case(&c, 51 + (uint64_t)(which * 8 + dim));
}

START_TEST(test_softmax)
{
    along_case(0, 1, L(L_BATCHED, 1, 2, T_ROWS, 6, 1), T_ROWS * 6, 1);
    along_case(0, 0, L(L_PARAM, 1, 2, 4, 5, 1), 20, 0);
    /* Along the batch: over the rows computed. */
    along_case(0, 0, L(L_BATCHED, 1, 2, T_ROWS, 3, 1), T_ROWS * 3, 1);
}
END_TEST

START_TEST(test_l2norm)
{
    along_case(1, 1, L(L_BATCHED, 1, 3, T_ROWS, 5, 3), T_ROWS * 15, 1);
    along_case(1, 0, L(L_BATCHED, 1, 2, T_ROWS, 3, 1), T_ROWS * 3, 1);
}
END_TEST

START_TEST(test_mean)
{
    /* Over a middle dimension, and over the batch itself (the mean
     * divides by the computed rows). */
    along_case(2, 1, L(L_BATCHED, 1, 3, T_ROWS, 4, 3), T_ROWS * 3, 1);
    along_case(2, 0, L(L_BATCHED, 1, 2, T_ROWS, 4, 1), 4, 0);
}
END_TEST

/* top-k values of x [T, 7] along dim 1, k = 3. */
static atmoe_status build_topk(atmoe_graph *g, const gcase *c,
                               const atmoe_node *in, atmoe_node *y)
{
    (void)c;
    return atmoe_graph_topk(g, in[0], 3, 1, y, NULL);
}

static void ref_topk(const gcase *c, double *const *x, double *y)
{
    (void)c;
    for (size_t r = 0; r < T_ROWS; r++) {
        const double *v = x[0] + r * 7;
        int used[7] = {0};
        for (int t = 0; t < 3; t++) {
            int best = -1;
            for (int j = 0; j < 7; j++)
                if (!used[j] && (best < 0 || v[j] > v[best]))
                    best = j;
            used[best] = 1;
            y[r * 3 + t] = v[best];
        }
    }
}

/* Values well apart, so that a finite-difference step never reorders
 * them. */
static void fill_apart(const gcase *c, int which, double *x, size_t n,
                       test_rng *rng)
{
    (void)c;
    (void)which;
    for (size_t r = 0; r < n / 7; r++) {
        int perm[7] = {0, 1, 2, 3, 4, 5, 6};
        for (int j = 6; j > 0; j--) {
            int k = (int)test_uniform(rng, 0, j + 1);
            int t = perm[j];
            perm[j] = perm[k];
            perm[k] = t;
        }
        for (int j = 0; j < 7; j++)
            x[r * 7 + j] = 0.3 * perm[j] - 1 + test_uniform(rng, 0, 0.05);
    }
}

START_TEST(test_topk)
{
    gcase c = {0};
    c.nleaf = 1;
    c.leaf[0] = L(L_BATCHED, 1, 2, T_ROWS, 7, 1);
    c.y_batched = 1;
    c.ycount = T_ROWS * 3;
    c.build = build_topk;
    c.ref = ref_topk;
    c.fill = fill_apart;
    check_case(&c, 61);
}
END_TEST

/* ip[0]: 0 rmsnorm, 1 layernorm; ip[1]: with weight (and bias). */
static atmoe_status build_norm(atmoe_graph *g, const gcase *c,
                               const atmoe_node *in, atmoe_node *y)
{
    atmoe_node w = c->ip[1] ? in[1] : ATMOE_NODE_NONE;
    atmoe_node b = c->ip[1] ? in[2] : ATMOE_NODE_NONE;
    return c->ip[0] ? atmoe_graph_layernorm(g, in[0], w, b, 1e-5f, y)
                    : atmoe_graph_rmsnorm(g, in[0], w, 1e-5f, y);
}

static void ref_norm(const gcase *c, double *const *x, double *y)
{
    const size_t n = 6;
    double eps = (double)1e-5f;
    for (size_t r = 0; r < T_ROWS; r++) {
        const double *v = x[0] + r * n;
        double mean = 0, ss = 0;
        for (size_t j = 0; j < n; j++)
            mean += v[j] / (double)n;
        if (!c->ip[0])
            mean = 0;
        for (size_t j = 0; j < n; j++)
            ss += (v[j] - mean) * (v[j] - mean);
        double inv = 1 / sqrt(ss / (double)n + eps);
        for (size_t j = 0; j < n; j++) {
            double o = (v[j] - mean) * inv;
            if (c->ip[1])
                o *= x[1][j];
            if (c->ip[1] && c->ip[0])
                o += x[2][j];
            y[r * n + j] = o;
        }
    }
}

static void norm_case(int layer, int weighted)
{
    gcase c = {0};
    c.nleaf = weighted ? (layer ? 3 : 2) : 1;
    c.leaf[0] = L(L_BATCHED, 1, 2, T_ROWS, 6, 1);
    c.leaf[0].lo = -2;
    c.leaf[0].hi = 3;
    c.leaf[1] = L(L_PARAM, 1, 1, 6, 1, 1);
    c.leaf[2] = L(L_PARAM, 1, 1, 6, 1, 1);
    c.ip[0] = layer;
    c.ip[1] = weighted;
    c.y_batched = 1;
    c.ycount = T_ROWS * 6;
    c.build = build_norm;
    c.ref = ref_norm;
    check_case(&c, 71 + (uint64_t)(layer * 2 + weighted));
}

START_TEST(test_rmsnorm)
{
    norm_case(0, 1);
    norm_case(0, 0);
}
END_TEST

START_TEST(test_layernorm)
{
    norm_case(1, 1);
    norm_case(1, 0);
}
END_TEST

/* ------------------------------------------------------------ rows */

/* gather: table [6, 4] by indices [T] (repeats); scatter-add: dst [6, 4]
 * += src [T, 4] at indices. */
static atmoe_status build_rows(atmoe_graph *g, const gcase *c,
                               const atmoe_node *in, atmoe_node *y)
{
    if (c->ip[0] == 0)
        return atmoe_graph_gather_rows(g, in[0], in[1], y);
    return atmoe_graph_scatter_add_rows(g, in[0], in[1], in[2], y);
}

static void ref_rows(const gcase *c, double *const *x, double *y)
{
    if (c->ip[0] == 0) {
        for (size_t r = 0; r < T_ROWS; r++)
            for (size_t j = 0; j < 4; j++)
                y[r * 4 + j] = x[0][(size_t)x[1][r] * 4 + j];
        return;
    }
    memcpy(y, x[0], 24 * sizeof *y);
    for (size_t r = 0; r < T_ROWS; r++)
        for (size_t j = 0; j < 4; j++)
            y[(size_t)x[1][r] * 4 + j] += x[2][r * 4 + j];
}

/* Indices with a repeat: 1, 4, 1, 0, 5. */
static void fill_indices(const gcase *c, int which, double *x, size_t n,
                         test_rng *rng)
{
    (void)c;
    (void)rng;
    static const double idx[T_ROWS] = {1, 4, 1, 0, 5};
    if (which == 1)
        memcpy(x, idx, n * sizeof *x);
}

START_TEST(test_gather_rows)
{
    gcase c = {0};
    c.nleaf = 2;
    c.leaf[0] = L(L_PARAM, 1, 2, 6, 4, 1);
    c.leaf[1] = L(L_BATCHED, 0, 1, T_ROWS, 1, 1);
    c.leaf[1].is_int = 1;
    c.y_batched = 1;
    c.ycount = T_ROWS * 4;
    c.build = build_rows;
    c.ref = ref_rows;
    c.fill = fill_indices;
    check_case(&c, 81);
}
END_TEST

START_TEST(test_scatter_add_rows)
{
    gcase c = {0};
    c.nleaf = 3;
    c.leaf[0] = L(L_PARAM, 1, 2, 6, 4, 1);
    c.leaf[1] = L(L_BATCHED, 0, 1, T_ROWS, 1, 1);
    c.leaf[1].is_int = 1;
    c.leaf[2] = L(L_BATCHED, 1, 2, T_ROWS, 4, 1);
    c.ip[0] = 1;
    c.ycount = 24;
    c.build = build_rows;
    c.ref = ref_rows;
    c.fill = fill_indices;
    check_case(&c, 82);
}
END_TEST

/* ------------------------------------------------------------ layout */

/* ip[0]: 0 reshape [T, 6] -> [2T, 3] (then silu, so that the gradient
 * is not dy itself), 1 transpose dims 1, 2 of [T, 3, 4], 2 view of
 * [T, 6] at column 1, 3 columns, 3 concat of [T, 2] and [T, 3] along 1,
 * 4 cast to f16 and back. */
static atmoe_status build_layout(atmoe_graph *g, const gcase *c,
                                 const atmoe_node *in, atmoe_node *y)
{
    atmoe_node t;
    atmoe_status st;
    switch (c->ip[0]) {
    case 0: {
        size_t s[2] = {2 * T_MAX, 3};
        st = atmoe_graph_reshape(g, in[0], 2, s, &t);
        return st ? st : atmoe_graph_silu(g, t, y);
    }
    case 1:
        return atmoe_graph_transpose(g, in[0], 1, 2, y);
    case 2: {
        size_t start[2] = {0, 1}, shape[2] = {T_MAX, 3};
        return atmoe_graph_view(g, in[0], start, shape, y);
    }
    case 3:
        return atmoe_graph_concat(g, in[0], in[1], 1, y);
    default:
        st = atmoe_graph_cast(g, in[0], ATMOE_DTYPE_F16, &t);
        return st ? st : atmoe_graph_cast(g, t, ATMOE_DTYPE_F32, y);
    }
}

static void ref_layout(const gcase *c, double *const *x, double *y)
{
    switch (c->ip[0]) {
    case 0:
        for (size_t i = 0; i < c->ycount; i++)
            y[i] = x[0][i] * sigmoid(x[0][i]);
        break;
    case 1:
        for (size_t r = 0; r < T_ROWS; r++)
            for (size_t a = 0; a < 4; a++)
                for (size_t b = 0; b < 3; b++)
                    y[(r * 4 + a) * 3 + b] = x[0][(r * 3 + b) * 4 + a];
        break;
    case 2:
        for (size_t r = 0; r < T_ROWS; r++)
            for (size_t j = 0; j < 3; j++)
                y[r * 3 + j] = x[0][r * 6 + 1 + j];
        break;
    case 3:
        for (size_t r = 0; r < T_ROWS; r++) {
            for (size_t j = 0; j < 2; j++)
                y[r * 5 + j] = x[0][r * 2 + j];
            for (size_t j = 0; j < 3; j++)
                y[r * 5 + 2 + j] = x[1][r * 3 + j];
        }
        break;
    default: /* the rounding to f16 is taken as the identity */
        memcpy(y, x[0], c->ycount * sizeof *y);
    }
}

static void layout_case(int which, leaf a, leaf b, int nleaf, size_t ycount,
                        double loss_tol)
{
    gcase c = {0};
    c.nleaf = nleaf;
    c.leaf[0] = a;
    c.leaf[1] = b;
    c.ip[0] = which;
    c.y_batched = 1;
    c.ycount = ycount;
    c.build = build_layout;
    c.ref = ref_layout;
    c.loss_tol = loss_tol;
    check_case(&c, 91 + (uint64_t)which);
}

START_TEST(test_reshape)
{
    layout_case(0, L(L_BATCHED, 1, 2, T_ROWS, 6, 1), L(0, 0, 1, 1, 1, 1), 1,
                T_ROWS * 6, 0);
}
END_TEST

START_TEST(test_transpose)
{
    layout_case(1, L(L_BATCHED, 1, 3, T_ROWS, 3, 4), L(0, 0, 1, 1, 1, 1), 1,
                T_ROWS * 12, 0);
}
END_TEST

START_TEST(test_view)
{
    layout_case(2, L(L_BATCHED, 1, 2, T_ROWS, 6, 1), L(0, 0, 1, 1, 1, 1), 1,
                T_ROWS * 3, 0);
}
END_TEST

START_TEST(test_concat)
{
    layout_case(3, L(L_BATCHED, 1, 2, T_ROWS, 2, 1),
                L(L_BATCHED, 1, 2, T_ROWS, 3, 1), 2, T_ROWS * 5, 0);
}
END_TEST

START_TEST(test_cast)
{
    /* f16 keeps 11 bits: the loss is within 1e-3 of the unrounded one. */
    layout_case(4, L(L_BATCHED, 1, 2, T_ROWS, 6, 1), L(0, 0, 1, 1, 1, 1), 1,
                T_ROWS * 6, 1e-3);
}
END_TEST

/* ------------------------------------------------------------ chains */

/* h = x W; s = silu(h); y = s h + s: h and s are each read twice, so
 * their gradients are sums of two contributions. */
static atmoe_status build_chain(atmoe_graph *g, const gcase *c,
                                const atmoe_node *in, atmoe_node *y)
{
    (void)c;
    atmoe_node h, s, p;
    atmoe_status st;
    if ((st = atmoe_graph_matmul(g, in[0], in[1], ATMOE_NODE_NONE, 0, &h)) ||
        (st = atmoe_graph_silu(g, h, &s)) ||
        (st = atmoe_graph_mul(g, s, h, &p)))
        return st;
    return atmoe_graph_add(g, p, s, y);
}

static void ref_chain(const gcase *c, double *const *x, double *y)
{
    (void)c;
    double h[T_ROWS * 4];
    host_matmul(x[0], x[1], NULL, 0, 0, T_ROWS, 4, 5, h);
    for (size_t i = 0; i < T_ROWS * 4; i++) {
        double s = h[i] * sigmoid(h[i]);
        y[i] = s * h[i] + s;
    }
}

START_TEST(test_chain_read_twice)
{
    gcase c = {0};
    c.nleaf = 2;
    c.leaf[0] = L(L_BATCHED, 1, 2, T_ROWS, 5, 1);
    c.leaf[1] = L(L_PARAM, 1, 2, 5, 4, 1);
    c.y_batched = 1;
    c.ycount = T_ROWS * 4;
    c.build = build_chain;
    c.ref = ref_chain;
    check_case(&c, 101);
}
END_TEST

/* y = add(x, x): one node read twice by one operation. */
static atmoe_status build_self(atmoe_graph *g, const gcase *c,
                               const atmoe_node *in, atmoe_node *y)
{
    (void)c;
    atmoe_node t;
    atmoe_status st = atmoe_graph_mul(g, in[0], in[0], &t);
    return st ? st : atmoe_graph_add(g, t, in[0], y);
}

static void ref_self(const gcase *c, double *const *x, double *y)
{
    for (size_t i = 0; i < c->ycount; i++)
        y[i] = x[0][i] * x[0][i] + x[0][i];
}

START_TEST(test_operand_twice)
{
    gcase c = {0};
    c.nleaf = 1;
    c.leaf[0] = L(L_PARAM, 1, 2, 3, 5, 1);
    c.ycount = 15;
    c.build = build_self;
    c.ref = ref_self;
    check_case(&c, 102);
}
END_TEST

/* ------------------------------------------------------------ losses */

static atmoe_status build_mse(atmoe_graph *g, const gcase *c,
                              const atmoe_node *in, atmoe_node *y)
{
    (void)c;
    return atmoe_graph_loss_mse(g, in[0], in[1], y);
}

static void ref_mse(const gcase *c, double *const *x, double *y)
{
    size_t n = leaf_count(&c->leaf[0]);
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (x[0][i] - x[1][i]) * (x[0][i] - x[1][i]);
    y[0] = s / (double)n;
}

START_TEST(test_loss_mse)
{
    gcase c = {0};
    c.nleaf = 2;
    c.leaf[0] = L(L_BATCHED, 1, 2, T_ROWS, 3, 1);
    c.leaf[1] = L(L_BATCHED, 1, 2, T_ROWS, 3, 1);
    c.direct_loss = 1;
    c.ycount = 1;
    c.build = build_mse;
    c.ref = ref_mse;
    check_case(&c, 111);
}
END_TEST

#define IGNORE (-100)
#define CLASSES 5

static atmoe_status build_ce(atmoe_graph *g, const gcase *c,
                             const atmoe_node *in, atmoe_node *y)
{
    atmoe_node ce, w, lb, t;
    atmoe_status st = atmoe_graph_loss_cross_entropy(g, in[0], in[1], IGNORE,
                                                     &ce);
    if (st || !c->ip[0]) {
        *y = ce;
        return st;
    }
    /* ce + 0.05 load_balance(softmax(logits)). */
    if ((st = atmoe_graph_softmax(g, in[0], 1, &w)) ||
        (st = atmoe_graph_loss_load_balance(g, w, &lb)) ||
        (st = atmoe_graph_scale(g, lb, 0.05f, &t)))
        return st;
    return atmoe_graph_add(g, ce, t, y);
}

static void ref_ce(const gcase *c, double *const *x, double *y)
{
    double s = 0, n = 0, f[CLASSES] = {0}, p[CLASSES] = {0};
    for (size_t r = 0; r < T_ROWS; r++) {
        const double *v = x[0] + r * CLASSES;
        double m = -INFINITY, e = 0;
        int best = 0;
        for (int j = 0; j < CLASSES; j++) {
            m = fmax(m, v[j]);
            if (v[j] > v[best])
                best = j;
        }
        for (int j = 0; j < CLASSES; j++)
            e += exp(v[j] - m);
        for (int j = 0; j < CLASSES; j++)
            p[j] += exp(v[j] - m) / e / T_ROWS;
        f[best] += 1.0 / T_ROWS;
        int label = (int)x[1][r];
        if (label == IGNORE)
            continue;
        s += m + log(e) - v[label];
        n += 1;
    }
    y[0] = n > 0 ? s / n : 0;
    if (c->ip[0]) {
        double lb = 0;
        for (int j = 0; j < CLASSES; j++)
            lb += f[j] * p[j];
        y[0] += (double)0.05f * CLASSES * lb;
    }
}

/* Labels 0..C-1 with rows 1 and 3 ignored. */
static void fill_labels(const gcase *c, int which, double *x, size_t n,
                        test_rng *rng)
{
    (void)c;
    (void)rng;
    static const double labels[T_ROWS] = {2, IGNORE, 4, IGNORE, 0};
    if (which == 1)
        memcpy(x, labels, n * sizeof *x);
    else /* logits apart, for the load balance's argmax to hold still */
        for (size_t r = 0; r < n / CLASSES; r++)
            for (size_t j = 0; j < CLASSES; j++)
                x[r * CLASSES + j] =
                    0.4 * (double)((j * 3 + r * 2) % CLASSES) +
                    test_uniform(rng, -0.1, 0.1);
}

static void ce_case(int with_lb)
{
    gcase c = {0};
    c.nleaf = 2;
    c.leaf[0] = L(L_BATCHED, 1, 2, T_ROWS, CLASSES, 1);
    c.leaf[1] = L(L_BATCHED, 0, 1, T_ROWS, 1, 1);
    c.leaf[1].is_int = 1;
    c.ip[0] = with_lb;
    c.direct_loss = 1;
    c.ycount = 1;
    c.build = build_ce;
    c.ref = ref_ce;
    c.fill = fill_labels;
    check_case(&c, 121 + (uint64_t)with_lb);
}

START_TEST(test_loss_cross_entropy)
{
    ce_case(0);
}
END_TEST

START_TEST(test_loss_load_balance)
{
    ce_case(1);
}
END_TEST


/* ------------------------------------------------------------ the engine */

static atmoe_node param(atmoe_context *ctx, atmoe_graph *g, const char *name,
                        int ndim, const size_t *shape, test_rng *rng,
                        atmoe_tensor **keep)
{
    size_t n = 1;
    for (int i = 0; i < ndim; i++)
        n *= shape[i];
    float *data = malloc(n * sizeof *data);
    test_fill_uniform(rng, data, n, -1, 1);
    atmoe_tensor *t;
    atmoe_node node;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, ndim, shape, &t),
                     ctx);
    ck_assert_status(atmoe_tensor_write(t, data, n * sizeof *data), ctx);
    ck_assert_status(atmoe_graph_parameter(g, name, t, &node), ctx);
    free(data);
    if (keep)
        *keep = t;
    else
        atmoe_tensor_free(t);
    return node;
}

static atmoe_node scalar_mean(atmoe_context *ctx, atmoe_graph *g,
                              atmoe_node y, size_t count)
{
    atmoe_node flat, m;
    size_t s[1] = {count};
    ck_assert_status(atmoe_graph_reshape(g, y, 1, s, &flat), ctx);
    ck_assert_status(atmoe_graph_mean(g, flat, 0, &m), ctx);
    return m;
}

static int count_op(const atmoe_graph *g, const atm_op *op)
{
    int n = 0;
    for (size_t i = 0; i < g->count; i++)
        n += g->nodes[i].op == op;
    return n;
}

/* y = x W + b, W frozen, b and x trainable: W gets no gradient node (one
 * GEMM only, dx's; db sums over rows), the registry holds b alone, with
 * its storage, and x's gradient comes back to the caller. */
START_TEST(test_frozen_and_registry)
{
    atmoe_context *ctx = test_context();
    atmoe_graph *g;
    test_rng rng;
    test_rng_seed(&rng, 201);
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t xs[2] = {T_MAX, 5}, ws[2] = {5, 3}, bs[1] = {3};
    atmoe_node x, w, b, y, loss, gb, gx;
    atmoe_tensor *bt;
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 1, &x),
                     ctx);
    w = param(ctx, g, "W", 2, ws, &rng, NULL);
    b = param(ctx, g, "b", 1, bs, &rng, &bt);
    ck_assert_status(atmoe_graph_set_trainable(g, b, 1), ctx);
    ck_assert_status(atmoe_graph_set_trainable(g, x, 1), ctx);
    ck_assert_status(atmoe_graph_matmul(g, x, w, b, 0, &y), ctx);
    loss = scalar_mean(ctx, g, y, T_MAX * 3);
    ck_assert_fails_with(atmoe_graph_get_grad(g, b, &gb), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "no gradients yet");
    ck_assert_status(atmoe_graph_backward(g, loss), ctx);
    /* Forward and dx = dy W^T; no dW = x^T dy. */
    ck_assert_int_eq(count_op(g, &atm_op_matmul), 2);
    ck_assert_fails_with(atmoe_graph_get_grad(g, w, &gb), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "not trainable");
    ck_assert_status(atmoe_graph_get_grad(g, b, &gb), ctx);
    ck_assert_status(atmoe_graph_get_grad(g, x, &gx), ctx);
    ck_assert_int_eq(atm_graph_trainable_count(g), 1);
    const atm_trainable *t = atm_graph_trainable_find(g, "b");
    ck_assert_ptr_nonnull(t);
    ck_assert_ptr_null(atm_graph_trainable_find(g, "x"));
    ck_assert_ptr_eq(t->buffer, bt->buffer);
    ck_assert_uint_eq(t->offset, bt->offset);
    ck_assert_uint_eq(t->count, 3);
    ck_assert_int_eq(t->ndim, 1);
    ck_assert_uint_eq(t->shape[0], 3);
    ck_assert_int_eq(t->grad, gb);
    ck_assert_uint_eq(t->grad_offset, 0);
    ck_assert(g->nodes[gb].is_output && g->nodes[gx].is_output &&
              g->nodes[loss].is_output);
    atmoe_node found;
    ck_assert_status(atmoe_graph_find(g, "b.grad", &found), ctx);
    ck_assert_int_eq(found, gb);

    /* dL/db = 1 / 3 per column; dL/dx = rows of W summed / (3 T). */
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    float xv[T_ROWS * 5], gbv[3], gxv[T_ROWS * 5];
    test_fill_uniform(&rng, xv, T_ROWS * 5, -1, 1);
    ck_assert_status(atmoe_graph_set_input(g, x, xv, sizeof xv, T_ROWS), ctx);
    ck_assert_status(atmoe_graph_compute(g, T_ROWS), ctx);
    ck_assert_status(atmoe_graph_read(g, gb, gbv, sizeof gbv), ctx);
    ck_assert_status(atmoe_graph_read(g, gx, gxv, sizeof gxv), ctx);
    for (int j = 0; j < 3; j++)
        ck_assert_double_eq_tol(gbv[j], 1.0 / 3, 1e-6);
    for (int i = 0; i < T_ROWS * 5; i++)
        ck_assert(isfinite(gxv[i]));
    atmoe_tensor_free(bt);
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
}
END_TEST

/* The values of top-k carry a gradient to their entries and to no other;
 * the indices none. */
START_TEST(test_topk_kept_only)
{
    atmoe_context *ctx = test_context();
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t xs[2] = {T_MAX, 7};
    atmoe_node x, v, ix, loss, gx;
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 1, &x),
                     ctx);
    ck_assert_status(atmoe_graph_set_trainable(g, x, 1), ctx);
    ck_assert_status(atmoe_graph_topk(g, x, 2, 1, &v, &ix), ctx);
    loss = scalar_mean(ctx, g, v, T_MAX * 2);
    ck_assert_status(atmoe_graph_mark_output(g, ix), ctx);
    ck_assert_status(atmoe_graph_backward(g, loss), ctx);
    ck_assert_status(atmoe_graph_get_grad(g, x, &gx), ctx);
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    poison_arena(g);
    test_rng rng;
    test_rng_seed(&rng, 202);
    float xv[T_ROWS * 7], gv[T_ROWS * 7];
    int32_t iv[T_ROWS * 2];
    test_fill_uniform(&rng, xv, T_ROWS * 7, -1, 1);
    ck_assert_status(atmoe_graph_set_input(g, x, xv, sizeof xv, T_ROWS), ctx);
    ck_assert_status(atmoe_graph_compute(g, T_ROWS), ctx);
    ck_assert_status(atmoe_graph_read(g, gx, gv, sizeof gv), ctx);
    ck_assert_status(atmoe_graph_read(g, ix, iv, sizeof iv), ctx);
    for (int r = 0; r < T_ROWS; r++)
        for (int j = 0; j < 7; j++) {
            int kept = iv[r * 2] == j || iv[r * 2 + 1] == j;
            ck_assert_msg(gv[r * 7 + j] == (kept ? 1.0f / (T_ROWS * 2) : 0.0f),
                          "row %d entry %d (kept %d): %g", r, j, kept,
                          gv[r * 7 + j]);
        }
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
}
END_TEST

/* Cross-entropy over logits [T, C] with labels; returns the loss and
 * fills the gradient of the logits. */
static float ce_with_labels(const int32_t *labels, float *grad)
{
    atmoe_context *ctx = test_context();
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t xs[2] = {T_MAX, CLASSES}, ls[1] = {T_MAX};
    atmoe_node x, l, loss, gx;
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 1, &x),
                     ctx);
    ck_assert_status(atmoe_graph_input(g, "l", ATMOE_DTYPE_I32, 1, ls, 1, &l),
                     ctx);
    ck_assert_status(atmoe_graph_set_trainable(g, x, 1), ctx);
    ck_assert_status(atmoe_graph_loss_cross_entropy(g, x, l, IGNORE, &loss),
                     ctx);
    ck_assert_status(atmoe_graph_backward(g, loss), ctx);
    ck_assert_status(atmoe_graph_get_grad(g, x, &gx), ctx);
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    poison_arena(g);
    test_rng rng;
    test_rng_seed(&rng, 203);
    float xv[T_ROWS * CLASSES], lv;
    test_fill_uniform(&rng, xv, T_ROWS * CLASSES, -2, 2);
    ck_assert_status(atmoe_graph_set_input(g, x, xv, sizeof xv, T_ROWS), ctx);
    ck_assert_status(atmoe_graph_set_input(g, l, labels,
                                           T_ROWS * sizeof *labels, T_ROWS),
                     ctx);
    ck_assert_status(atmoe_graph_compute(g, T_ROWS), ctx);
    ck_assert_status(atmoe_graph_read(g, loss, &lv, sizeof lv), ctx);
    ck_assert_status(atmoe_graph_read(g, gx, grad,
                                      T_ROWS * CLASSES * sizeof *grad),
                     ctx);
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
    return lv;
}

START_TEST(test_cross_entropy_all_ignored)
{
    int32_t labels[T_ROWS] = {IGNORE, IGNORE, IGNORE, IGNORE, IGNORE};
    float grad[T_ROWS * CLASSES];
    ck_assert(ce_with_labels(labels, grad) == 0.0f);
    for (int i = 0; i < T_ROWS * CLASSES; i++)
        ck_assert(grad[i] == 0.0f);
}
END_TEST

/* A label outside [0, C) that is not the ignore index: the loss and that
 * row's gradient are NaN (an optimiser's finiteness check reports it);
 * the other rows' gradients stay finite. */
START_TEST(test_cross_entropy_label_out_of_range)
{
    int32_t labels[T_ROWS] = {1, CLASSES, 0, -1, 2};
    float grad[T_ROWS * CLASSES];
    ck_assert(isnan(ce_with_labels(labels, grad)));
    for (int r = 0; r < T_ROWS; r++)
        for (int j = 0; j < CLASSES; j++)
            ck_assert(isnan(grad[r * CLASSES + j]) == (r == 1 || r == 3));
}
END_TEST

/* A row with no backward, from outside the library. */
static const atm_op no_backward_op = {.name = "no_backward_op"};

START_TEST(test_bad_input)
{
    atmoe_context *ctx = test_context();
    atmoe_graph *g;
    test_rng rng;
    test_rng_seed(&rng, 204);
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t ws[2] = {3, 4}, xs[2] = {T_MAX, 4}, ls[1] = {T_MAX}, one[1] = {1};
    atmoe_node w = param(ctx, g, "W", 2, ws, &rng, NULL);
    atmoe_node x, lab, loss, out, ci;
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 1, &x),
                     ctx);
    ck_assert_status(atmoe_graph_input(g, "lab", ATMOE_DTYPE_I32, 1, ls, 1,
                                       &lab),
                     ctx);
    static const int32_t zero = 0;
    ck_assert_status(atmoe_graph_constant(g, "ci", ATMOE_DTYPE_I32, 1, one,
                                          &zero, &ci),
                     ctx);

    /* Marking: parameters and inputs only, f32 only. */
    ck_assert_fails_with(atmoe_graph_set_trainable(g, ci, 1), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "parameter or an input");
    ck_assert_fails_with(atmoe_graph_set_trainable(g, lab, 1), ctx,
                         ATMOE_STATUS_DTYPE_MISMATCH, "f32");
    ck_assert_fails_with(atmoe_graph_set_trainable(g, 999, 1), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "not a node");

    /* The loss: scalar f32, reached by something trainable. */
    loss = scalar_mean(ctx, g, w, 12);
    ck_assert_fails_clean(g, atmoe_graph_backward(g, loss), ctx,
                          ATMOE_STATUS_INVALID_ARGUMENT, "nothing trainable");
    ck_assert_status(atmoe_graph_set_trainable(g, w, 1), ctx);
    ck_assert_fails_clean(g, atmoe_graph_backward(g, w), ctx,
                          ATMOE_STATUS_SHAPE_MISMATCH, "scalar");
    ck_assert_fails_clean(g, atmoe_graph_backward(g, ci), ctx,
                          ATMOE_STATUS_DTYPE_MISMATCH, "f32");

    /* Losses over mismatched operands. */
    ck_assert_fails_clean(g, atmoe_graph_loss_mse(g, x, w, &out), ctx,
                          ATMOE_STATUS_SHAPE_MISMATCH, "one shape");
    ck_assert_fails_clean(g, atmoe_graph_loss_cross_entropy(g, x, x, 0, &out),
                          ctx, ATMOE_STATUS_DTYPE_MISMATCH, "i32");
    ck_assert_fails_clean(g, atmoe_graph_loss_cross_entropy(g, w, lab, 0, &out),
                          ctx, ATMOE_STATUS_SHAPE_MISMATCH, "labels");
    ck_assert_fails_clean(g, atmoe_graph_loss_load_balance(g, loss, &out), ctx,
                          ATMOE_STATUS_SHAPE_MISMATCH, "[T, E]");
    ck_assert_fails_clean(g, atmoe_graph_loss_load_balance(g, lab, &out), ctx,
                          ATMOE_STATUS_DTYPE_MISMATCH, "f32");

    /* An operation without a backward on the path. */
    atm_node p;
    atm_node_like(&p, &no_backward_op, &g->nodes[w], w);
    atmoe_node nb, bad;
    ck_assert_status(atm_graph_push(g, &p, "nb", "test", &nb), ctx);
    bad = scalar_mean(ctx, g, nb, 12);
    ck_assert_fails_clean(g, atmoe_graph_backward(g, bad), ctx,
                          ATMOE_STATUS_NOT_SUPPORTED, "no_backward_op");

    /* A trainable node that does not reach the loss has no gradient; one
     * backward per graph; marking after it is refused. */
    atmoe_node v = param(ctx, g, "V", 2, ws, &rng, NULL), gv;
    ck_assert_status(atmoe_graph_set_trainable(g, v, 1), ctx);
    ck_assert_status(atmoe_graph_backward(g, loss), ctx);
    ck_assert_fails_with(atmoe_graph_get_grad(g, v, &gv), ctx,
                         ATMOE_STATUS_NOT_FOUND, "does not reach");
    ck_assert_fails_with(atmoe_graph_get_grad(g, x, &gv), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "not trainable");
    ck_assert_fails_clean(g, atmoe_graph_backward(g, loss), ctx,
                          ATMOE_STATUS_INVALID_ARGUMENT, "built already");
    ck_assert_fails_with(atmoe_graph_set_trainable(g, x, 1), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "built already");
    ck_assert_int_eq(atm_graph_trainable_count(g), 1);
    ck_assert_fails_with(atmoe_graph_backward(NULL, loss), NULL,
                         ATMOE_STATUS_NULL_POINTER, "graph");
    ck_assert_fails_with(atmoe_graph_get_grad(g, w, NULL), ctx,
                         ATMOE_STATUS_NULL_POINTER, "grad");
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
}
END_TEST

/* An operation with an f32 secondary output (as the router's traces): the
 * engine hands the secondary's gradient to the source's backward as
 * grad_out[1], and asks only for the operands on a path. */
static int seen_gout[3], seen_need[2], seen_calls;

static atmoe_status pair_backward(atmoe_graph *g, int node, const int *gout,
                                  const unsigned char *need, int *gin)
{
    for (int i = 0; i < 3; i++)
        seen_gout[i] = gout[i];
    for (int i = 0; i < 2; i++)
        seen_need[i] = need[i];
    seen_calls++;
    (void)node;
    return atmoe_graph_add(g, gout[0], gout[1], &gin[0]);
}

static const atm_op pair_op = {.name = "pair", .backward = pair_backward};

START_TEST(test_secondary_gradient)
{
    atmoe_context *ctx = test_context();
    atmoe_graph *g;
    test_rng rng;
    test_rng_seed(&rng, 205);
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t ws[1] = {4};
    atmoe_node w = param(ctx, g, "w", 1, ws, &rng, NULL);
    atmoe_node f = param(ctx, g, "frozen", 1, ws, &rng, NULL);
    ck_assert_status(atmoe_graph_set_trainable(g, w, 1), ctx);
    atm_node p;
    atm_node_like(&p, &pair_op, &g->nodes[w], w);
    p.src[1] = f;
    p.nsrc = 2;
    atmoe_node t, sec, u, m, loss, gw;
    ck_assert_status(atm_graph_push(g, &p, "pair", "test", &t), ctx);
    atm_node q = g->nodes[t];
    q.op = &atm_op_secondary;
    q.label = "pair_second";
    q.src[0] = t;
    q.nsrc = 1;
    ck_assert_status(atm_graph_push(g, &q, "pair.second", "test", &sec), ctx);
    g->nodes[t].co[0] = sec;
    ck_assert_status(atmoe_graph_mul(g, t, sec, &u), ctx);
    ck_assert_status(atmoe_graph_mean(g, u, 0, &m), ctx);
    loss = m;
    seen_calls = 0;
    ck_assert_status(atmoe_graph_backward(g, loss), ctx);
    ck_assert_int_eq(seen_calls, 1);
    ck_assert_int_ne(seen_gout[0], ATMOE_NODE_NONE);
    ck_assert_int_ne(seen_gout[1], ATMOE_NODE_NONE);
    ck_assert_int_eq(seen_gout[2], ATMOE_NODE_NONE);
    ck_assert_int_eq(seen_need[0], 1);
    ck_assert_int_eq(seen_need[1], 0); /* the frozen operand */
    ck_assert_status(atmoe_graph_get_grad(g, w, &gw), ctx);
    /* d(mean(t * sec))/dt = sec / 4: the mul's gradient of t. */
    ck_assert_ptr_eq(g->nodes[seen_gout[0]].op, &atm_op_mul);
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
}
END_TEST

/* The loop an optimiser runs, by hand: gradient descent through the
 * registry's buffers fits y = x W + b to targets made by known weights.
 * The registered buffers are those the graph reads (an update shows in
 * the next compute), and the loss falls by 1e4 within 100 steps. */
START_TEST(test_descent_learns)
{
    enum { ROWS = 32, DIN = 4, DOUT = 2, STEPS = 100 };
    atmoe_context *ctx = test_context();
    atmoe_graph *g;
    test_rng rng;
    test_rng_seed(&rng, 206);
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t xs[2] = {ROWS, DIN}, ys[2] = {ROWS, DOUT}, ws[2] = {DIN, DOUT},
           bs[1] = {DOUT};
    atmoe_node x, target, w, b, y, loss;
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 1, &x),
                     ctx);
    ck_assert_status(atmoe_graph_input(g, "target", ATMOE_DTYPE_F32, 2, ys, 1,
                                       &target),
                     ctx);
    w = param(ctx, g, "W", 2, ws, &rng, NULL);
    b = param(ctx, g, "b", 1, bs, &rng, NULL);
    ck_assert_status(atmoe_graph_set_trainable(g, w, 1), ctx);
    ck_assert_status(atmoe_graph_set_trainable(g, b, 1), ctx);
    ck_assert_status(atmoe_graph_matmul(g, x, w, b, 0, &y), ctx);
    ck_assert_status(atmoe_graph_loss_mse(g, y, target, &loss), ctx);
    ck_assert_status(atmoe_graph_backward(g, loss), ctx);
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    ck_assert_int_eq(atm_graph_trainable_count(g), 2);

    float xv[ROWS * DIN], tv[ROWS * DOUT], wt[DIN * DOUT], bt[DOUT];
    test_fill_uniform(&rng, xv, ROWS * DIN, -1, 1);
    test_fill_uniform(&rng, wt, DIN * DOUT, -2, 2);
    test_fill_uniform(&rng, bt, DOUT, -1, 1);
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < DOUT; j++) {
            double v = bt[j];
            for (int k = 0; k < DIN; k++)
                v += xv[r * DIN + k] * wt[k * DOUT + j];
            tv[r * DOUT + j] = (float)v;
        }
    ck_assert_status(atmoe_graph_set_input(g, x, xv, sizeof xv, ROWS), ctx);
    ck_assert_status(atmoe_graph_set_input(g, target, tv, sizeof tv, ROWS),
                     ctx);
    float first = 0, last = 0, grad[DIN * DOUT], value[DIN * DOUT];
    for (int step = 0; step <= STEPS; step++) {
        ck_assert_status(atmoe_graph_compute(g, ROWS), ctx);
        ck_assert_status(atmoe_graph_read(g, loss, &last, sizeof last), ctx);
        if (step == 0)
            first = last;
        for (size_t i = 0; i < atm_graph_trainable_count(g); i++) {
            const atm_trainable *t = atm_graph_trainable_at(g, i);
            size_t bytes = t->count * sizeof(float);
            ck_assert_status(atmoe_graph_read(g, t->grad, grad, bytes), ctx);
            ck_assert_int_eq(clEnqueueReadBuffer(ctx->queue, t->buffer,
                                                 CL_TRUE,
                                                 t->offset * sizeof(float),
                                                 bytes, value, 0, NULL, NULL),
                             CL_SUCCESS);
            for (size_t e = 0; e < t->count; e++)
                value[e] -= 1.0f * grad[e];
            ck_assert_int_eq(clEnqueueWriteBuffer(ctx->queue, t->buffer,
                                                  CL_TRUE,
                                                  t->offset * sizeof(float),
                                                  bytes, value, 0, NULL,
                                                  NULL),
                             CL_SUCCESS);
        }
    }
    ck_assert_msg(first > 0.1f && last < 1e-4f * first,
                  "loss %g after %d steps, from %g", last, STEPS, first);
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
}
END_TEST

/* ------------------------------------------------------------ suite */

static Suite *backward_suite(void)
{
    Suite *s = suite_create("backward");
    TCase *tc = tcase_create("ops");
    tcase_add_test(tc, test_matmul_nn);
    tcase_add_test(tc, test_matmul_nt);
    tcase_add_test(tc, test_matmul_tn);
    tcase_add_test(tc, test_matmul_tt);
    tcase_add_test(tc, test_matmul_batched_inner);
    tcase_add_test(tc, test_matmul_batched_columns);
    tcase_add_test(tc, test_add_broadcast);
    tcase_add_test(tc, test_mul_broadcast);
    tcase_add_test(tc, test_scale);
    tcase_add_test(tc, test_silu);
    tcase_add_test(tc, test_gelu);
    tcase_add_test(tc, test_sigmoid);
    tcase_add_test(tc, test_softmax);
    tcase_add_test(tc, test_l2norm);
    tcase_add_test(tc, test_mean);
    tcase_add_test(tc, test_topk);
    tcase_add_test(tc, test_rmsnorm);
    tcase_add_test(tc, test_layernorm);
    tcase_add_test(tc, test_gather_rows);
    tcase_add_test(tc, test_scatter_add_rows);
    tcase_add_test(tc, test_reshape);
    tcase_add_test(tc, test_transpose);
    tcase_add_test(tc, test_view);
    tcase_add_test(tc, test_concat);
    tcase_add_test(tc, test_cast);
    tcase_add_test(tc, test_chain_read_twice);
    tcase_add_test(tc, test_operand_twice);
    tcase_add_test(tc, test_loss_mse);
    tcase_add_test(tc, test_loss_cross_entropy);
    tcase_add_test(tc, test_loss_load_balance);
    suite_add_tcase(s, tc);
    TCase *te = tcase_create("engine");
    tcase_add_test(te, test_frozen_and_registry);
    tcase_add_test(te, test_topk_kept_only);
    tcase_add_test(te, test_cross_entropy_all_ignored);
    tcase_add_test(te, test_cross_entropy_label_out_of_range);
    tcase_add_test(te, test_bad_input);
    tcase_add_test(te, test_secondary_gradient);
    tcase_add_test(te, test_descent_learns);
    suite_add_tcase(s, te);
    return s;
}

int main(void)
{
    return test_run_suite(backward_suite());
}
