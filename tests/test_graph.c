/* Tests of compute graphs as a whole: validation when a node is added (with
 * the operation, the operand and the shapes in the message), names, the
 * memory planner (reuse, in place, pinned inputs and outputs, nodes that no
 * output needs), results against a float64 host reference and bit for bit
 * across plans, a steady state that allocates nothing, dumps, profiles, and
 * re-planning after the graph changes.  The numerics of each operation on
 * its own are in test_graph_ops.c.
 *
 * Each test runs a few parts on one context, since opening the device
 * costs more than most parts.  Checks of message contents are collected and
 * reported at the end of a test, so that one vague message does not hide the
 * checks after it; a wrong status or a wrong result fails at once.  Parts
 * known to fail hard come last in their test. */
#define _GNU_SOURCE
#include <dirent.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */
/* ------------------------------------------------------------------------ */

#define F32 ATMOE_DTYPE_F32
#define F16 ATMOE_DTYPE_F16
#define I32 ATMOE_DTYPE_I32
#define NONE ATMOE_NODE_NONE

#define SHAPE(...) ((const size_t[]){__VA_ARGS__})
#define NDIM(...) ((int)(sizeof((size_t[]){__VA_ARGS__}) / sizeof(size_t)))

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    ck_assert_msg(p != NULL, "out of host memory (%zu bytes)", bytes);
    return p;
}

/* Soft checks: failures are collected and reported together by
 * soft_done() at the end of the test. */
static char soft_log[16384];
static size_t soft_len;
static int soft_count;

static void soft_reset(void)
{
    soft_log[0] = '\0';
    soft_len = 0;
    soft_count = 0;
}

static void soft_fail(const char *fmt, ...)
{
    soft_count++;
    if (soft_len + 2 >= sizeof soft_log)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(soft_log + soft_len, sizeof soft_log - soft_len, fmt,
                      ap);
    va_end(ap);
    if (n > 0)
        soft_len += (size_t)n;
    if (soft_len >= sizeof soft_log - 1)
        soft_len = sizeof soft_log - 2;
    soft_log[soft_len++] = '\n';
    soft_log[soft_len] = '\0';
}

static void soft_done(void)
{
    ck_assert_msg(soft_count == 0, "%d message check(s) failed:\n%s",
                  soft_count, soft_log);
}

/* Notes every string of the NULL-terminated list that msg lacks. */
static void msg_has_(const char *msg, const char *expr, int line, ...)
{
    va_list ap;
    va_start(ap, line);
    for (const char *s; (s = va_arg(ap, const char *)) != NULL;)
        if (strstr(msg, s) == NULL)
            soft_fail("line %d: %s: the message \"%s\" lacks \"%s\"", line,
                      expr, msg, s);
    va_end(ap);
}

/* expr must fail with status want (at once), and atmoe_errmsg(ctx) must
 * contain every string given (collected). */
#define FAILS(expr, ctx, want, ...)                                           \
    do {                                                                      \
        ck_assert_fails(expr, ctx, ATMOE_STATUS_##want);                      \
        msg_has_(atmoe_errmsg(ctx), #expr, __LINE__, __VA_ARGS__,             \
                 (const char *)NULL);                                         \
    } while (0)

/* The same with a wrong status collected too, for checks placed before
 * others that should still run. */
#define SOFT_FAILS(expr, ctx, want, ...)                                      \
    do {                                                                      \
        atmoe_status sst_ = (expr);                                           \
        if (sst_ != ATMOE_STATUS_##want)                                      \
            soft_fail("line %d: %s -> %s, expected %s", __LINE__, #expr,      \
                      atmoe_status_name(sst_), #want);                        \
        else                                                                  \
            msg_has_(atmoe_errmsg(ctx), #expr, __LINE__, __VA_ARGS__,         \
                     (const char *)NULL);                                     \
    } while (0)

#define OK(expr) ck_assert_status(expr, ctx)

static atmoe_node add_input(atmoe_context *ctx, atmoe_graph *g,
                            const char *name, atmoe_dtype dtype, int batched,
                            int ndim, const size_t *shape)
{
    atmoe_node n = NONE;
    OK(atmoe_graph_input(g, name, dtype, ndim, shape, batched, &n));
    return n;
}
#define INPUT(name, dtype, batched, ...)                                      \
    add_input(ctx, g, name, dtype, batched, NDIM(__VA_ARGS__),                \
              SHAPE(__VA_ARGS__))

static atmoe_node add_const(atmoe_context *ctx, atmoe_graph *g,
                            const char *name, int ndim, const size_t *shape,
                            const float *data)
{
    atmoe_node n = NONE;
    OK(atmoe_graph_constant(g, name, F32, ndim, shape, data, &n));
    return n;
}

static atmoe_graph *new_graph(atmoe_context *ctx)
{
    atmoe_graph *g = NULL;
    OK(atmoe_graph_new(ctx, &g));
    ck_assert_ptr_nonnull(g);
    return g;
}

/* Nodes in the graph: the first id that atmoe_graph_get_shape refuses. */
static size_t node_count(const atmoe_graph *g)
{
    size_t n = 0;
    while (atmoe_graph_get_shape(g, (atmoe_node)n, NULL, NULL, NULL) ==
           ATMOE_STATUS_OK)
        n++;
    return n;
}

static void expect_shape_(atmoe_context *ctx, const atmoe_graph *g,
                          atmoe_node n, atmoe_dtype dtype, int ndim,
                          const size_t *shape, int line)
{
    int nd = -1;
    size_t s[ATMOE_MAX_DIMS] = {0};
    atmoe_dtype dt = (atmoe_dtype)-1;
    OK(atmoe_graph_get_shape(g, n, &nd, s, &dt));
    ck_assert_msg(nd == ndim, "line %d: node %d has %d dimensions, not %d",
                  line, n, nd, ndim);
    for (int i = 0; i < ndim; i++)
        ck_assert_msg(s[i] == shape[i],
                      "line %d: node %d: dimension %d is %zu, not %zu", line,
                      n, i, s[i], shape[i]);
    ck_assert_msg(dt == dtype, "line %d: node %d is %s, not %s", line, n,
                  atmoe_dtype_name(dt), atmoe_dtype_name(dtype));
}
#define EXPECT_SHAPE(n, dtype, ...)                                           \
    expect_shape_(ctx, g, n, dtype, NDIM(__VA_ARGS__), SHAPE(__VA_ARGS__),    \
                  __LINE__)

static uint64_t node_bytes(atmoe_context *ctx, const atmoe_graph *g,
                           atmoe_node n)
{
    int nd;
    size_t s[ATMOE_MAX_DIMS];
    atmoe_dtype dt;
    OK(atmoe_graph_get_shape(g, n, &nd, s, &dt));
    uint64_t count = 1;
    for (int i = 0; i < nd; i++)
        count *= s[i];
    return count * atmoe_dtype_size(dt);
}

static void memory_stats(atmoe_context *ctx, atmoe_memory_stats *m)
{
    memset(m, 0xab, sizeof *m);
    OK(atmoe_context_get_memory_stats(ctx, m));
}

static size_t count_substr(const char *text, const char *s)
{
    size_t n = 0;
    for (const char *p = text; (p = strstr(p, s)) != NULL; p += strlen(s))
        n++;
    return n;
}

/* The entries of dir (without . and ..), sorted, joined by '|'. */
static void list_dir(const char *dir, char *out, size_t size)
{
    DIR *d = opendir(dir);
    ck_assert_msg(d != NULL, "opendir(%s) failed", dir);
    char *names[64];
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        ck_assert_uint_lt(n, 64);
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char *t = names[j];
            names[j] = names[j - 1];
            names[j - 1] = t;
        }
    out[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        if (i)
            strncat(out, "|", size - strlen(out) - 1);
        strncat(out, names[i], size - strlen(out) - 1);
        free(names[i]);
    }
}

/* ------------------------------------------------------------------------ */
/* float64 references                                                        */
/* ------------------------------------------------------------------------ */

/* out[r][j] = sum_k x[r][k] w[j][k] (+ bias[j]): x W^T + b, w is [n, k]. */
static void ref_linear(const double *x, size_t rows, size_t k, const float *w,
                       size_t n, const float *bias, double *out)
{
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < n; j++) {
            double s = bias ? bias[j] : 0.0;
            for (size_t i = 0; i < k; i++)
                s += x[r * k + i] * (double)w[j * k + i];
            out[r * n + j] = s;
        }
}

/* out = x W, w is [k, n]. */
static void ref_matmul(const double *x, size_t rows, size_t k, const float *w,
                       size_t n, double *out)
{
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < n; j++) {
            double s = 0.0;
            for (size_t i = 0; i < k; i++)
                s += x[r * k + i] * (double)w[i * n + j];
            out[r * n + j] = s;
        }
}

static void ref_rmsnorm(double *x, size_t rows, size_t n, const float *w,
                        float eps)
{
    for (size_t r = 0; r < rows; r++) {
        double ss = 0;
        for (size_t j = 0; j < n; j++)
            ss += x[r * n + j] * x[r * n + j];
        double inv = 1.0 / sqrt(ss / (double)n + (double)eps);
        for (size_t j = 0; j < n; j++)
            x[r * n + j] *= inv * (w ? (double)w[j] : 1.0);
    }
}

static void ref_silu(double *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = x[i] / (1.0 + exp(-x[i]));
}

static void ref_softmax(const double *x, size_t rows, size_t n, double *out)
{
    for (size_t r = 0; r < rows; r++) {
        double m = -INFINITY, s = 0;
        for (size_t j = 0; j < n; j++)
            m = fmax(m, x[r * n + j]);
        for (size_t j = 0; j < n; j++)
            s += exp(x[r * n + j] - m);
        for (size_t j = 0; j < n; j++)
            out[r * n + j] = exp(x[r * n + j] - m) / s;
    }
}

/* Values of the k largest per row, descending. */
static void ref_topk_values(const double *x, size_t rows, size_t n, size_t k,
                            double *values)
{
    for (size_t r = 0; r < rows; r++) {
        int used[64] = {0};
        for (size_t t = 0; t < k; t++) {
            size_t best = n;
            for (size_t j = 0; j < n; j++)
                if (!used[j] && (best == n || x[r * n + j] > x[r * n + best]))
                    best = j;
            used[best] = 1;
            values[r * k + t] = x[r * n + best];
        }
    }
}

/* Checks indices a device topk chose against the reference values of its
 * input, allowing for ties within tol: distinct, in range, in descending
 * order, and nothing left out larger than what was chosen. */
static void check_topk(const int32_t *idx, const double *x, size_t rows,
                       size_t n, size_t k, double tol, const char *what)
{
    for (size_t r = 0; r < rows; r++) {
        int chosen[64] = {0};
        for (size_t t = 0; t < k; t++) {
            int32_t i = idx[r * k + t];
            ck_assert_msg(i >= 0 && (size_t)i < n,
                          "%s: row %zu: index %d is out of range", what, r, i);
            ck_assert_msg(!chosen[i], "%s: row %zu: index %d twice", what, r,
                          i);
            chosen[i] = 1;
            if (t > 0)
                ck_assert_msg(x[r * n + i] <= x[r * n + idx[r * k + t - 1]] +
                                                  tol,
                              "%s: row %zu: indices not in descending order",
                              what, r);
        }
        double last = x[r * n + idx[r * k + k - 1]];
        for (size_t j = 0; j < n; j++)
            ck_assert_msg(chosen[j] || x[r * n + j] <= last + tol,
                          "%s: row %zu: element %zu (%g) was left out for a "
                          "smaller one (%g)", what, r, j, x[r * n + j], last);
    }
}

/* Relative error, measured against at least floor for values near 0. */
static void check_close(const float *got, const double *want, size_t n,
                        double tol, double floor, const char *what)
{
    double err = test_max_rel_err(got, want, n, floor);
    ck_assert_msg(err <= tol, "%s: relative error %g > %g", what, err, tol);
}

/* ------------------------------------------------------------------------ */
/* A small graph: one of each kind of node, batched along two different     */
/* dimensions, and one node that no output needs                            */
/* ------------------------------------------------------------------------ */

enum { SM_B = 9, SM_D = 17, SM_H = 6, SM_U = 4, SM_K = 2, SM_NODES = 15 };

typedef struct small_params {
    float w1[SM_H * SM_D], b1[SM_H], w2[SM_U * SM_D], gw[SM_D];
} small_params;

typedef struct small_graph {
    atmoe_node x, w1, b1, h, s, tv, ti, xt, w2, u, m, gw, r, y, dg;
    const char *op[SM_NODES];   /* expected operation (NULL: any) */
    const char *name[SM_NODES]; /* names given (when named) */
    size_t edges;               /* operands, for the dot dump */
} small_graph;

typedef struct small_out {
    float s[SM_B * SM_H];
    int32_t ti[SM_B * SM_K];
    float u[SM_U * SM_B];
    float m[SM_D];
    float y[SM_B * SM_D];
} small_out;

static void small_params_init(small_params *p, uint64_t seed)
{
    test_rng rng;
    test_rng_seed(&rng, seed);
    test_fill_uniform(&rng, p->w1, SM_H * SM_D, -0.5, 0.5);
    test_fill_uniform(&rng, p->b1, SM_H, -0.2, 0.2);
    test_fill_uniform(&rng, p->w2, SM_U * SM_D, -0.5, 0.5);
    test_fill_uniform(&rng, p->gw, SM_D, 0.5, 1.5);
}

static void small_record(small_graph *sg, atmoe_node n, const char *op,
                         const char *name, size_t operands)
{
    ck_assert_int_ge(n, 0);
    ck_assert_int_lt(n, SM_NODES);
    sg->op[n] = op;
    sg->name[n] = name;
    sg->edges += operands;
}

/* x [9, 17] batched ->
 *   h = x W1^T + b1 [9, 6] -> softmax s (out); topk(h, 2) -> tv, ti (out)
 *   xt = x^T [17, 9] (batched along dim 1) -> u = W2 xt [4, 9] (out)
 *   m = mean(x, 0) [17] (out: over the batch)
 *   r = rmsnorm(x, gw) -> y = silu(r) (out)
 *   dg = gelu(h): needed by nothing. */
static void small_build(atmoe_context *ctx, atmoe_graph *g,
                        const small_params *p, int named, small_graph *sg)
{
    memset(sg, 0, sizeof *sg);
#define NM(s) (named ? (s) : NULL)
#define NAME(node, s)                                                         \
    do {                                                                      \
        if (named)                                                            \
            OK(atmoe_graph_set_name(g, node, s));                             \
    } while (0)
    sg->x = INPUT(NM("x"), F32, 1, SM_B, SM_D);
    small_record(sg, sg->x, "input", "x", 0);
    sg->w1 = add_const(ctx, g, NM("w1"), 2, SHAPE(SM_H, SM_D), p->w1);
    small_record(sg, sg->w1, "constant", "w1", 0);
    sg->b1 = add_const(ctx, g, NM("b1"), 1, SHAPE(SM_H), p->b1);
    small_record(sg, sg->b1, "constant", "b1", 0);
    OK(atmoe_graph_matmul(g, sg->x, sg->w1, sg->b1, ATMOE_MATMUL_TRANSPOSE_B,
                          &sg->h));
    NAME(sg->h, "h");
    small_record(sg, sg->h, "matmul", "h", 3);
    OK(atmoe_graph_softmax(g, sg->h, -1, &sg->s));
    NAME(sg->s, "s");
    small_record(sg, sg->s, "softmax", "s", 1);
    OK(atmoe_graph_topk(g, sg->h, SM_K, -1, &sg->tv, &sg->ti));
    NAME(sg->tv, "tv");
    NAME(sg->ti, "ti");
    small_record(sg, sg->tv, "topk", "tv", 1);
    /* The indices' operation name is the library's own choice. */
    small_record(sg, sg->ti, NULL, "ti", 1);
    OK(atmoe_graph_transpose(g, sg->x, 0, 1, &sg->xt));
    NAME(sg->xt, "xt");
    small_record(sg, sg->xt, "transpose", "xt", 1);
    sg->w2 = add_const(ctx, g, NM("w2"), 2, SHAPE(SM_U, SM_D), p->w2);
    small_record(sg, sg->w2, "constant", "w2", 0);
    OK(atmoe_graph_matmul(g, sg->w2, sg->xt, NONE, 0, &sg->u));
    NAME(sg->u, "u");
    small_record(sg, sg->u, "matmul", "u", 2);
    OK(atmoe_graph_mean(g, sg->x, 0, &sg->m));
    NAME(sg->m, "m");
    small_record(sg, sg->m, "mean", "m", 1);
    sg->gw = add_const(ctx, g, NM("gw"), 1, SHAPE(SM_D), p->gw);
    small_record(sg, sg->gw, "constant", "gw", 0);
    OK(atmoe_graph_rmsnorm(g, sg->x, sg->gw, 1e-5f, &sg->r));
    NAME(sg->r, "r");
    small_record(sg, sg->r, "rmsnorm", "r", 2);
    OK(atmoe_graph_silu(g, sg->r, &sg->y));
    NAME(sg->y, "y");
    small_record(sg, sg->y, "silu", "y", 1);
    OK(atmoe_graph_gelu(g, sg->h, &sg->dg));
    NAME(sg->dg, "dg");
    small_record(sg, sg->dg, "gelu", "dg", 1);
#undef NM
#undef NAME
    OK(atmoe_graph_mark_output(g, sg->s));
    OK(atmoe_graph_mark_output(g, sg->ti));
    OK(atmoe_graph_mark_output(g, sg->u));
    OK(atmoe_graph_mark_output(g, sg->m));
    OK(atmoe_graph_mark_output(g, sg->y));
    ck_assert_uint_eq(node_count(g), SM_NODES);
}

typedef struct small_ref {
    double h[SM_B * SM_H], s[SM_B * SM_H], u[SM_U * SM_B], m[SM_D],
        y[SM_B * SM_D];
} small_ref;

static void small_reference(const small_params *p, const float *x, size_t b,
                            small_ref *r)
{
    double xd[SM_B * SM_D];
    for (size_t i = 0; i < b * SM_D; i++)
        xd[i] = x[i];
    ref_linear(xd, b, SM_D, p->w1, SM_H, p->b1, r->h);
    ref_softmax(r->h, b, SM_H, r->s);
    for (size_t i = 0; i < SM_U; i++)
        for (size_t j = 0; j < b; j++) {
            double s = 0;
            for (size_t k = 0; k < SM_D; k++)
                s += (double)p->w2[i * SM_D + k] * xd[j * SM_D + k];
            r->u[i * b + j] = s;
        }
    for (size_t k = 0; k < SM_D; k++) {
        double s = 0;
        for (size_t j = 0; j < b; j++)
            s += xd[j * SM_D + k];
        r->m[k] = s / (double)b;
    }
    memcpy(r->y, xd, b * SM_D * sizeof *xd);
    ref_rmsnorm(r->y, b, SM_D, p->gw, 1e-5f);
    ref_silu(r->y, b * SM_D);
}

static void small_run(atmoe_context *ctx, atmoe_graph *g,
                      const small_graph *sg, const float *x, size_t b,
                      size_t compute_batch, small_out *o)
{
    test_poison((float *)o, sizeof *o / sizeof(float));
    OK(atmoe_graph_set_input(g, sg->x, x, b * SM_D * sizeof *x, b));
    OK(atmoe_graph_compute(g, compute_batch));
    OK(atmoe_graph_read(g, sg->s, o->s, b * SM_H * sizeof(float)));
    OK(atmoe_graph_read(g, sg->ti, o->ti, b * SM_K * sizeof(int32_t)));
    OK(atmoe_graph_read(g, sg->u, o->u, SM_U * b * sizeof(float)));
    OK(atmoe_graph_read(g, sg->m, o->m, SM_D * sizeof(float)));
    OK(atmoe_graph_read(g, sg->y, o->y, b * SM_D * sizeof(float)));
}

static void small_check(const small_params *p, const float *x, size_t b,
                        const small_out *o, const char *what)
{
    small_ref r;
    small_reference(p, x, b, &r);
    char w[128];
    snprintf(w, sizeof w, "%s (batch %zu): softmax", what, b);
    check_close(o->s, r.s, b * SM_H, 1e-5, 0.05, w);
    snprintf(w, sizeof w, "%s (batch %zu): topk indices", what, b);
    check_topk(o->ti, r.h, b, SM_H, SM_K, 1e-5, w);
    snprintf(w, sizeof w, "%s (batch %zu): W2 x^T", what, b);
    check_close(o->u, r.u, SM_U * b, 1e-5, 0.05, w);
    snprintf(w, sizeof w, "%s (batch %zu): mean over the batch", what, b);
    check_close(o->m, r.m, SM_D, 1e-5, 0.05, w);
    snprintf(w, sizeof w, "%s (batch %zu): silu(rmsnorm)", what, b);
    check_close(o->y, r.y, b * SM_D, 1e-5, 0.05, w);
}

/* ------------------------------------------------------------------------ */
/* Build-time errors                                                         */
/* ------------------------------------------------------------------------ */

static void matmul_errors(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node a = INPUT("a", F32, 0, 7, 13);
    atmoe_node b = INPUT("b", F32, 0, 12, 5);
    atmoe_node w = INPUT("w", F32, 0, 5, 12);
    atmoe_node good_b = INPUT("good_b", F32, 0, 13, 5);
    atmoe_node a3 = INPUT("a3", F32, 0, 2, 7, 13);
    atmoe_node v4 = INPUT("v4", F32, 0, 4);
    atmoe_node m15 = INPUT("m15", F32, 0, 1, 5);
    atmoe_node ai = INPUT("ai", I32, 0, 7, 13);
    atmoe_node ci = INPUT("ci", I32, 0, 5);
    atmoe_node ah = INPUT("ah", F16, 0, 7, 13);
    atmoe_node v5 = INPUT("v5", F32, 0, 5);
    size_t count = node_count(g);
    atmoe_node out = 12345;

    /* Inner dimensions: plain, with b transposed, with a transposed. */
    FAILS(atmoe_graph_matmul(g, a, b, NONE, 0, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_matmul", "[7, 13]", "[12, 5]");
    FAILS(atmoe_graph_matmul(g, a, w, NONE, ATMOE_MATMUL_TRANSPOSE_B, &out),
          ctx, SHAPE_MISMATCH, "atmoe_graph_matmul", "[7, 13]", "[5, 12]");
    FAILS(atmoe_graph_matmul(g, a, good_b, NONE, ATMOE_MATMUL_TRANSPOSE_A,
                             &out),
          ctx, SHAPE_MISMATCH, "atmoe_graph_matmul", "[7, 13]", "[13, 5]");
    /* Not 2-D, either operand. */
    FAILS(atmoe_graph_matmul(g, a3, good_b, NONE, 0, &out), ctx,
          SHAPE_MISMATCH, "atmoe_graph_matmul", "[2, 7, 13]", "[13, 5]");
    FAILS(atmoe_graph_matmul(g, a, v4, NONE, 0, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_matmul", "[7, 13]", "[4]");
    /* Bias of the wrong length or rank. */
    FAILS(atmoe_graph_matmul(g, a, good_b, v4, 0, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_matmul", "bias", "[5]", "[4]");
    FAILS(atmoe_graph_matmul(g, a, good_b, m15, 0, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_matmul", "bias", "[1, 5]");
    /* Data types: i32 and f16 operands, an i32 bias. */
    FAILS(atmoe_graph_matmul(g, ai, good_b, NONE, 0, &out), ctx,
          DTYPE_MISMATCH, "atmoe_graph_matmul", "i32", "[7, 13]");
    FAILS(atmoe_graph_matmul(g, a, ai, NONE, ATMOE_MATMUL_TRANSPOSE_B, &out),
          ctx, DTYPE_MISMATCH, "atmoe_graph_matmul", "i32");
    FAILS(atmoe_graph_matmul(g, ah, good_b, NONE, 0, &out), ctx,
          DTYPE_MISMATCH, "atmoe_graph_matmul", "f16");
    FAILS(atmoe_graph_matmul(g, a, good_b, ci, 0, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_matmul", "bias", "i32");
    /* Unknown flags. */
    FAILS(atmoe_graph_matmul(g, a, good_b, NONE, 4u, &out), ctx,
          INVALID_ARGUMENT, "atmoe_graph_matmul", "flags");

    /* Nothing was added, and out was left alone. */
    ck_assert_uint_eq(node_count(g), count);
    ck_assert_int_eq(out, 12345);

    /* The same operands the right way round. */
    OK(atmoe_graph_matmul(g, a, good_b, v5, 0, &out));
    EXPECT_SHAPE(out, F32, 7, 5);
    OK(atmoe_graph_matmul(g, a, a, NONE, ATMOE_MATMUL_TRANSPOSE_B, &out));
    EXPECT_SHAPE(out, F32, 7, 7);
    OK(atmoe_graph_matmul(g, a, a, NONE, ATMOE_MATMUL_TRANSPOSE_A, &out));
    EXPECT_SHAPE(out, F32, 13, 13);
    OK(atmoe_graph_matmul(g, good_b, a, NONE,
                          ATMOE_MATMUL_TRANSPOSE_A | ATMOE_MATMUL_TRANSPOSE_B,
                          &out));
    EXPECT_SHAPE(out, F32, 5, 7);
    atmoe_graph_free(g);
}

static void elementwise_errors(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node a = INPUT("a", F32, 0, 7, 13);
    atmoe_node b = INPUT("b", F32, 0, 7, 12);
    atmoe_node v7 = INPUT("v7", F32, 0, 7);
    atmoe_node row = INPUT("row", F32, 0, 13);
    atmoe_node col = INPUT("col", F32, 0, 7, 1);
    atmoe_node ai = INPUT("ai", I32, 0, 7, 13);
    atmoe_node ah = INPUT("ah", F16, 0, 7, 13);
    atmoe_node xb = INPUT("xb", F32, 1, 9, 13);
    atmoe_node fixed9 = INPUT("fixed9", F32, 0, 9, 13);
    size_t count = node_count(g);
    atmoe_node out = 12345;

    FAILS(atmoe_graph_add(g, a, b, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_add", "[7, 13]", "[7, 12]");
    FAILS(atmoe_graph_add(g, b, a, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_add", "[7, 13]", "[7, 12]");
    FAILS(atmoe_graph_mul(g, a, v7, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_mul", "[7, 13]", "[7]");
    FAILS(atmoe_graph_add(g, a, ai, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_add", "i32", "[7, 13]");
    FAILS(atmoe_graph_mul(g, ai, a, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_mul", "i32");
    /* f16 is storage only: arithmetic takes f32. */
    FAILS(atmoe_graph_add(g, a, ah, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_add", "f16");
    FAILS(atmoe_graph_silu(g, ah, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_silu", "f16");
    FAILS(atmoe_graph_scale(g, ai, 2.0f, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_scale", "i32");
    FAILS(atmoe_graph_silu(g, ai, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_silu", "i32");
    FAILS(atmoe_graph_gelu(g, ai, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_gelu", "i32");
    FAILS(atmoe_graph_sigmoid(g, ai, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_sigmoid", "i32");
    /* A batched dimension meets a fixed one of the same planned size: at a
     * smaller batch they would disagree. */
    FAILS(atmoe_graph_add(g, xb, fixed9, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_add", "[9, 13]");
    ck_assert_uint_eq(node_count(g), count);
    ck_assert_int_eq(out, 12345);

    /* Broadcasts that are fine. */
    OK(atmoe_graph_add(g, a, row, &out));
    EXPECT_SHAPE(out, F32, 7, 13);
    OK(atmoe_graph_mul(g, a, col, &out));
    EXPECT_SHAPE(out, F32, 7, 13);
    OK(atmoe_graph_add(g, xb, row, &out));
    EXPECT_SHAPE(out, F32, 9, 13);
    atmoe_graph_free(g);
}

static void reduction_errors(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node x = INPUT("x", F32, 0, 7, 13);
    atmoe_node xb = INPUT("xb", F32, 1, 9, 13);
    atmoe_node vb = INPUT("vb", F32, 1, 9);
    atmoe_node w12 = INPUT("w12", F32, 0, 12);
    atmoe_node w13 = INPUT("w13", F32, 0, 13);
    atmoe_node w1x13 = INPUT("w1x13", F32, 0, 1, 13);
    atmoe_node wi = INPUT("wi", I32, 0, 13);
    atmoe_node b7 = INPUT("b7", F32, 0, 7);
    size_t count = node_count(g);
    atmoe_node out = 12345, v = 12345, ix = 12345;

    /* Dimensions out of range, from both ends. */
    FAILS(atmoe_graph_softmax(g, x, 2, &out), ctx, OUT_OF_RANGE,
          "atmoe_graph_softmax", "[7, 13]");
    FAILS(atmoe_graph_softmax(g, x, -3, &out), ctx, OUT_OF_RANGE,
          "atmoe_graph_softmax", "-3");
    FAILS(atmoe_graph_topk(g, x, 2, 2, &v, &ix), ctx, OUT_OF_RANGE,
          "atmoe_graph_topk", "[7, 13]");
    FAILS(atmoe_graph_mean(g, x, 2, &out), ctx, OUT_OF_RANGE,
          "atmoe_graph_mean", "[7, 13]");
    FAILS(atmoe_graph_mean(g, x, -3, &out), ctx, OUT_OF_RANGE,
          "atmoe_graph_mean");
    FAILS(atmoe_graph_l2norm(g, x, 5, 1e-6f, &out), ctx, OUT_OF_RANGE,
          "atmoe_graph_l2norm");
    /* k outside 1..n. */
    FAILS(atmoe_graph_topk(g, x, 0, -1, &v, &ix), ctx, OUT_OF_RANGE,
          "atmoe_graph_topk", "[7, 13]", "0");
    FAILS(atmoe_graph_topk(g, x, 14, -1, &v, &ix), ctx, OUT_OF_RANGE,
          "atmoe_graph_topk", "14", "13");
    FAILS(atmoe_graph_topk(g, x, -2, -1, &v, &ix), ctx, OUT_OF_RANGE,
          "atmoe_graph_topk");
    FAILS(atmoe_graph_topk(g, x, 8, 0, &v, &ix), ctx, OUT_OF_RANGE,
          "atmoe_graph_topk", "8");
    /* topk along the batch. */
    FAILS(atmoe_graph_topk(g, xb, 2, 0, &v, &ix), ctx, SHAPE_MISMATCH,
          "atmoe_graph_topk", "batch");
    FAILS(atmoe_graph_topk(g, x, 2, -1, NULL, NULL), ctx, NULL_POINTER,
          "atmoe_graph_topk");
    /* Norm weights and biases of the wrong length, rank or type. */
    FAILS(atmoe_graph_rmsnorm(g, x, w12, 1e-5f, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_rmsnorm", "weight", "[12]", "[7, 13]");
    FAILS(atmoe_graph_rmsnorm(g, x, w1x13, 1e-5f, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_rmsnorm", "[1, 13]");
    FAILS(atmoe_graph_rmsnorm(g, x, wi, 1e-5f, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_rmsnorm", "i32");
    FAILS(atmoe_graph_layernorm(g, x, w13, b7, 1e-5f, &out), ctx,
          SHAPE_MISMATCH, "atmoe_graph_layernorm", "bias", "[7]", "[7, 13]");
    FAILS(atmoe_graph_layernorm(g, x, w12, NONE, 1e-5f, &out), ctx,
          SHAPE_MISMATCH, "atmoe_graph_layernorm", "weight", "[12]");
    FAILS(atmoe_graph_rmsnorm(g, x, NONE, -1e-3f, &out), ctx,
          INVALID_ARGUMENT, "atmoe_graph_rmsnorm", "eps");
    FAILS(atmoe_graph_rmsnorm(g, x, NONE, NAN, &out), ctx, INVALID_ARGUMENT,
          "atmoe_graph_rmsnorm", "eps");
    FAILS(atmoe_graph_l2norm(g, x, -1, -1.0f, &out), ctx, INVALID_ARGUMENT,
          "atmoe_graph_l2norm", "eps");
    /* A norm over the batch. */
    FAILS(atmoe_graph_rmsnorm(g, vb, NONE, 1e-5f, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_rmsnorm", "batch");
    ck_assert_uint_eq(node_count(g), count);
    ck_assert_int_eq(out, 12345);
    ck_assert_int_eq(v, 12345);
    ck_assert_int_eq(ix, 12345);

    /* The limits themselves are fine. */
    OK(atmoe_graph_topk(g, x, 13, -1, &v, &ix));
    EXPECT_SHAPE(v, F32, 7, 13);
    EXPECT_SHAPE(ix, I32, 7, 13);
    OK(atmoe_graph_topk(g, x, 7, 0, &v, NULL));
    EXPECT_SHAPE(v, F32, 7, 13);
    OK(atmoe_graph_topk(g, x, 1, 1, NULL, &ix));
    EXPECT_SHAPE(ix, I32, 7, 1);
    OK(atmoe_graph_softmax(g, x, -2, &out));
    EXPECT_SHAPE(out, F32, 7, 13);
    OK(atmoe_graph_mean(g, x, -1, &out));
    EXPECT_SHAPE(out, F32, 7);
    OK(atmoe_graph_mean(g, x, 0, &out));
    EXPECT_SHAPE(out, F32, 13);
    OK(atmoe_graph_mean(g, w13, 0, &out));
    EXPECT_SHAPE(out, F32, 1);
    OK(atmoe_graph_rmsnorm(g, x, w13, 0.0f, &out));
    OK(atmoe_graph_layernorm(g, xb, w13, w13, 1e-5f, &out));
    EXPECT_SHAPE(out, F32, 9, 13);
    atmoe_graph_free(g);
}

static void rows_errors(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node table = INPUT("table", F32, 0, 10, 13);
    atmoe_node itable = INPUT("itable", I32, 0, 10, 13);
    atmoe_node fidx = INPUT("fidx", F32, 0, 7);
    atmoe_node hidx = INPUT("hidx", F16, 0, 7);
    atmoe_node idx = INPUT("idx", I32, 0, 7);
    atmoe_node idx2 = INPUT("idx2", I32, 0, 7, 1);
    atmoe_node src = INPUT("src", F32, 0, 7, 13);
    atmoe_node src6 = INPUT("src6", F32, 0, 6, 13);
    size_t count = node_count(g);
    atmoe_node out = 12345;

    FAILS(atmoe_graph_gather_rows(g, table, fidx, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_gather_rows", "indices", "f32", "[7]");
    FAILS(atmoe_graph_gather_rows(g, table, hidx, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_gather_rows", "f16");
    FAILS(atmoe_graph_gather_rows(g, itable, idx, &out), ctx, DTYPE_MISMATCH,
          "atmoe_graph_gather_rows", "i32", "[10, 13]");
    FAILS(atmoe_graph_scatter_add_rows(g, table, fidx, src, &out), ctx,
          DTYPE_MISMATCH, "atmoe_graph_scatter_add_rows", "indices", "f32");
    FAILS(atmoe_graph_scatter_add_rows(g, table, idx, src6, &out), ctx,
          SHAPE_MISMATCH, "atmoe_graph_scatter_add_rows", "[10, 13]",
          "[6, 13]");
    /* 2-D indices are refused (with the shape in the message). */
    atmoe_status st = atmoe_graph_gather_rows(g, table, idx2, &out);
    ck_assert_int_ne(st, ATMOE_STATUS_OK);
    msg_has_(atmoe_errmsg(ctx), "gather_rows with [7, 1] indices", __LINE__,
             "atmoe_graph_gather_rows", "[7, 1]", (const char *)NULL);
    ck_assert_uint_eq(node_count(g), count);
    ck_assert_int_eq(out, 12345);

    OK(atmoe_graph_gather_rows(g, table, idx, &out));
    EXPECT_SHAPE(out, F32, 7, 13);
    OK(atmoe_graph_scatter_add_rows(g, table, idx, src, &out));
    EXPECT_SHAPE(out, F32, 10, 13);
    atmoe_graph_free(g);
}

static void layout_errors(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node x = INPUT("x", F32, 0, 7, 13);
    atmoe_node y = INPUT("y", F32, 0, 6, 12);
    atmoe_node z = INPUT("z", F32, 0, 7, 4);
    atmoe_node xb = INPUT("xb", F32, 1, 9, 13);
    size_t count = node_count(g);
    atmoe_node out = 12345;

    FAILS(atmoe_graph_reshape(g, x, 1, SHAPE(90), &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_reshape", "[7, 13]", "[90]");
    FAILS(atmoe_graph_reshape(g, x, 2, SHAPE(13, 8), &out), ctx,
          SHAPE_MISMATCH, "atmoe_graph_reshape", "[7, 13]", "[13, 8]");
    FAILS(atmoe_graph_reshape(g, x, 0, SHAPE(91), &out), ctx,
          INVALID_ARGUMENT, "atmoe_graph_reshape");
    FAILS(atmoe_graph_reshape(g, x, 5, SHAPE(91, 1, 1, 1, 1), &out), ctx,
          INVALID_ARGUMENT, "atmoe_graph_reshape");
    FAILS(atmoe_graph_reshape(g, x, 2, SHAPE(91, 0), &out), ctx,
          SHAPE_MISMATCH, "atmoe_graph_reshape");
    /* A batched node must keep the batch outermost. */
    FAILS(atmoe_graph_reshape(g, xb, 2, SHAPE(13, 9), &out), ctx,
          SHAPE_MISMATCH, "atmoe_graph_reshape", "[9, 13]", "[13, 9]");
    FAILS(atmoe_graph_view(g, x, SHAPE(5, 0), SHAPE(3, 13), &out), ctx,
          SHAPE_MISMATCH, "atmoe_graph_view", "[3, 13]", "[7, 13]");
    FAILS(atmoe_graph_view(g, x, SHAPE(0, 13), SHAPE(1, 1), &out), ctx,
          SHAPE_MISMATCH, "atmoe_graph_view", "[7, 13]");
    FAILS(atmoe_graph_view(g, x, SHAPE(0, 2), SHAPE(7, 12), &out), ctx,
          SHAPE_MISMATCH, "atmoe_graph_view", "[7, 12]", "[7, 13]");
    FAILS(atmoe_graph_view(g, x, SHAPE(0, 0), SHAPE(0, 13), &out), ctx,
          SHAPE_MISMATCH, "atmoe_graph_view");
    FAILS(atmoe_graph_concat(g, x, y, 1, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_concat", "[7, 13]", "[6, 12]");
    FAILS(atmoe_graph_concat(g, x, z, 0, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_concat", "[7, 13]", "[7, 4]");
    FAILS(atmoe_graph_concat(g, x, z, 2, &out), ctx, OUT_OF_RANGE,
          "atmoe_graph_concat", "[7, 13]");
    FAILS(atmoe_graph_concat(g, x, xb, 1, &out), ctx, SHAPE_MISMATCH,
          "atmoe_graph_concat", "[7, 13]", "[9, 13]");
    FAILS(atmoe_graph_transpose(g, x, 0, 2, &out), ctx, OUT_OF_RANGE,
          "atmoe_graph_transpose", "[7, 13]");
    FAILS(atmoe_graph_transpose(g, x, -3, 0, &out), ctx, OUT_OF_RANGE,
          "atmoe_graph_transpose", "[7, 13]");
    ck_assert_uint_eq(node_count(g), count);
    ck_assert_int_eq(out, 12345);

    OK(atmoe_graph_reshape(g, x, 3, SHAPE(13, 7, 1), &out));
    EXPECT_SHAPE(out, F32, 13, 7, 1);
    OK(atmoe_graph_reshape(g, xb, 1, SHAPE(117), &out));
    EXPECT_SHAPE(out, F32, 117);
    OK(atmoe_graph_view(g, x, SHAPE(2, 3), SHAPE(5, 10), &out));
    EXPECT_SHAPE(out, F32, 5, 10);
    OK(atmoe_graph_concat(g, x, z, 1, &out));
    EXPECT_SHAPE(out, F32, 7, 17);
    OK(atmoe_graph_concat(g, x, x, -2, &out));
    EXPECT_SHAPE(out, F32, 14, 13);
    OK(atmoe_graph_transpose(g, x, -1, -2, &out));
    EXPECT_SHAPE(out, F32, 13, 7);
    atmoe_graph_free(g);
}

static void bad_node_ids(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node x = INPUT("x", F32, 0, 7, 13);
    atmoe_node w = INPUT("w", F32, 0, 13);
    atmoe_node y;
    OK(atmoe_graph_silu(g, x, &y));
    size_t count = node_count(g);
    const atmoe_node bad[] = {-5, 999, NONE, (atmoe_node)count};
    char num[32];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        atmoe_node b = bad[i], out = 12345;
        snprintf(num, sizeof num, "%d", b);
        FAILS(atmoe_graph_add(g, x, b, &out), ctx, INVALID_ARGUMENT,
              "atmoe_graph_add", "not a node", num);
        FAILS(atmoe_graph_mul(g, b, x, &out), ctx, INVALID_ARGUMENT,
              "atmoe_graph_mul", num);
        FAILS(atmoe_graph_matmul(g, x, b, NONE, ATMOE_MATMUL_TRANSPOSE_B,
                                 &out),
              ctx, INVALID_ARGUMENT, "atmoe_graph_matmul", num);
        FAILS(atmoe_graph_silu(g, b, &out), ctx, INVALID_ARGUMENT,
              "atmoe_graph_silu", num);
        FAILS(atmoe_graph_softmax(g, b, -1, &out), ctx, INVALID_ARGUMENT,
              "atmoe_graph_softmax", num);
        FAILS(atmoe_graph_concat(g, x, b, 0, &out), ctx, INVALID_ARGUMENT,
              "atmoe_graph_concat", num);
        FAILS(atmoe_graph_gather_rows(g, x, b, &out), ctx, INVALID_ARGUMENT,
              "atmoe_graph_gather_rows", num);
        FAILS(atmoe_graph_get_shape(g, b, NULL, NULL, NULL), ctx,
              INVALID_ARGUMENT, "atmoe_graph_get_shape", num);
        FAILS(atmoe_graph_set_name(g, b, "zz"), ctx, INVALID_ARGUMENT,
              "atmoe_graph_set_name", num);
        FAILS(atmoe_graph_mark_output(g, b), ctx, INVALID_ARGUMENT,
              "atmoe_graph_mark_output", num);
        if (b != NONE) { /* optional operands */
            FAILS(atmoe_graph_matmul(g, x, x, b, ATMOE_MATMUL_TRANSPOSE_B,
                                     &out),
                  ctx, INVALID_ARGUMENT, "atmoe_graph_matmul", num);
            FAILS(atmoe_graph_rmsnorm(g, x, b, 1e-5f, &out), ctx,
                  INVALID_ARGUMENT, "atmoe_graph_rmsnorm", num);
            FAILS(atmoe_graph_layernorm(g, x, w, b, 1e-5f, &out), ctx,
                  INVALID_ARGUMENT, "atmoe_graph_layernorm", num);
        }
        ck_assert_int_eq(out, 12345);
    }
    ck_assert_uint_eq(node_count(g), count);

    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_plan(g, 0));
    float data[7 * 13] = {0};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(num, sizeof num, "%d", bad[i]);
        FAILS(atmoe_graph_set_input(g, bad[i], data, sizeof data, 0), ctx,
              INVALID_ARGUMENT, "atmoe_graph_set_input", num);
        FAILS(atmoe_graph_read(g, bad[i], data, sizeof data), ctx,
              INVALID_ARGUMENT, "atmoe_graph_read", num);
    }
    atmoe_graph_free(g);
}

/* Every call with a NULL graph: NULL_POINTER, with the function's name in
 * the thread's message. */
#define NULL_GRAPH(expr, fn) FAILS(expr, NULL, NULL_POINTER, fn)

static void null_graph(atmoe_context *ctx)
{
    atmoe_tensor *t = NULL;
    OK(atmoe_tensor_new(ctx, F32, 1, SHAPE(4), &t));
    const float data[4] = {0};
    atmoe_node n = 12345, n2 = 12345;
    atmoe_graph_memory mem;
    atmoe_node_profile prof;

    FAILS(atmoe_graph_new(NULL, NULL), NULL, NULL_POINTER, "atmoe_graph_new");
    atmoe_graph *g = (atmoe_graph *)&n;
    FAILS(atmoe_graph_new(NULL, &g), NULL, NULL_POINTER, "atmoe_graph_new");
    /* Left alone or cleared, never a graph. */
    ck_assert(g == NULL || g == (atmoe_graph *)&n);
    NULL_GRAPH(atmoe_graph_input(NULL, "x", F32, 1, SHAPE(4), 0, &n),
               "atmoe_graph_input");
    NULL_GRAPH(atmoe_graph_parameter(NULL, "p", t, &n),
               "atmoe_graph_parameter");
    NULL_GRAPH(atmoe_graph_constant(NULL, "c", F32, 1, SHAPE(4), data, &n),
               "atmoe_graph_constant");
    NULL_GRAPH(atmoe_graph_matmul(NULL, 0, 1, NONE, 0, &n),
               "atmoe_graph_matmul");
    NULL_GRAPH(atmoe_graph_add(NULL, 0, 1, &n), "atmoe_graph_add");
    NULL_GRAPH(atmoe_graph_mul(NULL, 0, 1, &n), "atmoe_graph_mul");
    NULL_GRAPH(atmoe_graph_scale(NULL, 0, 2.0f, &n), "atmoe_graph_scale");
    NULL_GRAPH(atmoe_graph_silu(NULL, 0, &n), "atmoe_graph_silu");
    NULL_GRAPH(atmoe_graph_gelu(NULL, 0, &n), "atmoe_graph_gelu");
    NULL_GRAPH(atmoe_graph_sigmoid(NULL, 0, &n), "atmoe_graph_sigmoid");
    NULL_GRAPH(atmoe_graph_softmax(NULL, 0, -1, &n), "atmoe_graph_softmax");
    NULL_GRAPH(atmoe_graph_topk(NULL, 0, 1, -1, &n, &n2), "atmoe_graph_topk");
    NULL_GRAPH(atmoe_graph_rmsnorm(NULL, 0, NONE, 1e-5f, &n),
               "atmoe_graph_rmsnorm");
    NULL_GRAPH(atmoe_graph_layernorm(NULL, 0, NONE, NONE, 1e-5f, &n),
               "atmoe_graph_layernorm");
    NULL_GRAPH(atmoe_graph_mean(NULL, 0, 0, &n), "atmoe_graph_mean");
    NULL_GRAPH(atmoe_graph_l2norm(NULL, 0, 0, 1e-6f, &n),
               "atmoe_graph_l2norm");
    NULL_GRAPH(atmoe_graph_gather_rows(NULL, 0, 1, &n),
               "atmoe_graph_gather_rows");
    NULL_GRAPH(atmoe_graph_scatter_add_rows(NULL, 0, 1, 2, &n),
               "atmoe_graph_scatter_add_rows");
    NULL_GRAPH(atmoe_graph_reshape(NULL, 0, 1, SHAPE(4), &n),
               "atmoe_graph_reshape");
    NULL_GRAPH(atmoe_graph_view(NULL, 0, SHAPE(0), SHAPE(4), &n),
               "atmoe_graph_view");
    NULL_GRAPH(atmoe_graph_transpose(NULL, 0, 0, 1, &n),
               "atmoe_graph_transpose");
    NULL_GRAPH(atmoe_graph_concat(NULL, 0, 1, 0, &n), "atmoe_graph_concat");
    NULL_GRAPH(atmoe_graph_set_name(NULL, 0, "x"), "atmoe_graph_set_name");
    NULL_GRAPH(atmoe_graph_find(NULL, "x", &n), "atmoe_graph_find");
    NULL_GRAPH(atmoe_graph_get_shape(NULL, 0, NULL, NULL, NULL),
               "atmoe_graph_get_shape");
    NULL_GRAPH(atmoe_graph_mark_output(NULL, 0), "atmoe_graph_mark_output");
    NULL_GRAPH(atmoe_graph_plan(NULL, 0), "atmoe_graph_plan");
    NULL_GRAPH(atmoe_graph_get_memory(NULL, &mem), "atmoe_graph_get_memory");
    NULL_GRAPH(atmoe_graph_set_input(NULL, 0, data, sizeof data, 0),
               "atmoe_graph_set_input");
    NULL_GRAPH(atmoe_graph_compute(NULL, 0), "atmoe_graph_compute");
    NULL_GRAPH(atmoe_graph_read(NULL, 0, (void *)data, sizeof data),
               "atmoe_graph_read");
    NULL_GRAPH(atmoe_graph_set_profiling(NULL, 1),
               "atmoe_graph_set_profiling");
    NULL_GRAPH(atmoe_graph_get_profile(NULL, 0, &prof),
               "atmoe_graph_get_profile");
    NULL_GRAPH(atmoe_graph_dump(NULL, "/tmp/x", ATMOE_DUMP_TEXT),
               "atmoe_graph_dump");
    ck_assert_int_eq(n, 12345);
    ck_assert_int_eq(n2, 12345);
    atmoe_graph_free(NULL); /* a no-op */
    atmoe_tensor_free(t);
}

/* NULL out pointers and other NULL arguments on a real graph. */
static void null_arguments(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node x = INPUT("x", F32, 0, 4, 3);
    atmoe_node v = INPUT("v", F32, 0, 3);
    atmoe_node ix = INPUT("ix", I32, 0, 4);
    atmoe_node n = 12345;
    const float data[12] = {0};
    size_t count = node_count(g);

    FAILS(atmoe_graph_new(ctx, NULL), ctx, NULL_POINTER, "atmoe_graph_new");
    FAILS(atmoe_graph_input(g, "y", F32, 2, NULL, 0, &n), ctx, NULL_POINTER,
          "atmoe_graph_input", "shape");
    FAILS(atmoe_graph_input(g, "y", F32, 2, SHAPE(4, 3), 0, NULL), ctx,
          NULL_POINTER, "atmoe_graph_input", "node");
    FAILS(atmoe_graph_parameter(g, "p", NULL, &n), ctx, NULL_POINTER,
          "atmoe_graph_parameter", "tensor");
    FAILS(atmoe_graph_constant(g, "c", F32, 1, SHAPE(3), NULL, &n), ctx,
          NULL_POINTER, "atmoe_graph_constant", "data");
    FAILS(atmoe_graph_constant(g, "c", F32, 1, SHAPE(3), data, NULL), ctx,
          NULL_POINTER, "atmoe_graph_constant");
    FAILS(atmoe_graph_matmul(g, x, x, NONE, ATMOE_MATMUL_TRANSPOSE_B, NULL),
          ctx, NULL_POINTER, "atmoe_graph_matmul", "out");
    FAILS(atmoe_graph_add(g, x, v, NULL), ctx, NULL_POINTER,
          "atmoe_graph_add", "out");
    FAILS(atmoe_graph_mul(g, x, v, NULL), ctx, NULL_POINTER,
          "atmoe_graph_mul");
    FAILS(atmoe_graph_scale(g, x, 2.0f, NULL), ctx, NULL_POINTER,
          "atmoe_graph_scale");
    FAILS(atmoe_graph_silu(g, x, NULL), ctx, NULL_POINTER,
          "atmoe_graph_silu");
    FAILS(atmoe_graph_gelu(g, x, NULL), ctx, NULL_POINTER,
          "atmoe_graph_gelu");
    FAILS(atmoe_graph_sigmoid(g, x, NULL), ctx, NULL_POINTER,
          "atmoe_graph_sigmoid");
    FAILS(atmoe_graph_softmax(g, x, -1, NULL), ctx, NULL_POINTER,
          "atmoe_graph_softmax");
    FAILS(atmoe_graph_topk(g, x, 2, -1, NULL, NULL), ctx, NULL_POINTER,
          "atmoe_graph_topk");
    FAILS(atmoe_graph_rmsnorm(g, x, v, 1e-5f, NULL), ctx, NULL_POINTER,
          "atmoe_graph_rmsnorm");
    FAILS(atmoe_graph_layernorm(g, x, v, v, 1e-5f, NULL), ctx, NULL_POINTER,
          "atmoe_graph_layernorm");
    FAILS(atmoe_graph_mean(g, x, 0, NULL), ctx, NULL_POINTER,
          "atmoe_graph_mean");
    FAILS(atmoe_graph_l2norm(g, x, 0, 1e-6f, NULL), ctx, NULL_POINTER,
          "atmoe_graph_l2norm");
    FAILS(atmoe_graph_gather_rows(g, x, ix, NULL), ctx, NULL_POINTER,
          "atmoe_graph_gather_rows");
    FAILS(atmoe_graph_scatter_add_rows(g, x, ix, x, NULL), ctx, NULL_POINTER,
          "atmoe_graph_scatter_add_rows");
    FAILS(atmoe_graph_reshape(g, x, 1, NULL, &n), ctx, NULL_POINTER,
          "atmoe_graph_reshape");
    FAILS(atmoe_graph_reshape(g, x, 1, SHAPE(12), NULL), ctx, NULL_POINTER,
          "atmoe_graph_reshape");
    FAILS(atmoe_graph_view(g, x, NULL, SHAPE(1, 1), &n), ctx, NULL_POINTER,
          "atmoe_graph_view");
    FAILS(atmoe_graph_view(g, x, SHAPE(0, 0), NULL, &n), ctx, NULL_POINTER,
          "atmoe_graph_view");
    FAILS(atmoe_graph_view(g, x, SHAPE(0, 0), SHAPE(1, 1), NULL), ctx,
          NULL_POINTER, "atmoe_graph_view");
    FAILS(atmoe_graph_transpose(g, x, 0, 1, NULL), ctx, NULL_POINTER,
          "atmoe_graph_transpose");
    FAILS(atmoe_graph_concat(g, x, x, 0, NULL), ctx, NULL_POINTER,
          "atmoe_graph_concat");
    FAILS(atmoe_graph_set_name(g, x, NULL), ctx, NULL_POINTER,
          "atmoe_graph_set_name");
    FAILS(atmoe_graph_find(g, NULL, &n), ctx, NULL_POINTER,
          "atmoe_graph_find");
    FAILS(atmoe_graph_find(g, "x", NULL), ctx, NULL_POINTER,
          "atmoe_graph_find");
    FAILS(atmoe_graph_get_memory(g, NULL), ctx, NULL_POINTER,
          "atmoe_graph_get_memory");
    FAILS(atmoe_graph_dump(g, NULL, ATMOE_DUMP_TEXT), ctx, NULL_POINTER,
          "atmoe_graph_dump");
    FAILS(atmoe_graph_get_profile(g, 0, NULL), ctx, NULL_POINTER,
          "atmoe_graph_get_profile");
    ck_assert_uint_eq(node_count(g), count);
    ck_assert_int_eq(n, 12345);

    OK(atmoe_graph_mark_output(g, x));
    OK(atmoe_graph_plan(g, 0));
    FAILS(atmoe_graph_set_input(g, x, NULL, sizeof data, 0), ctx,
          NULL_POINTER, "atmoe_graph_set_input");
    OK(atmoe_graph_set_input(g, x, data, sizeof data, 0));
    OK(atmoe_graph_compute(g, 0));
    FAILS(atmoe_graph_read(g, x, NULL, sizeof data), ctx, NULL_POINTER,
          "atmoe_graph_read");
    atmoe_graph_free(g);
}

static void duplicate_names(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node x = INPUT("x", F32, 0, 4, 3);
    atmoe_node y = INPUT("y", F32, 0, 4, 3);
    atmoe_node n = 12345, found = NONE;
    const float data[12] = {0};
    atmoe_tensor *t = NULL;
    OK(atmoe_tensor_new(ctx, F32, 2, SHAPE(4, 3), &t));
    size_t count = node_count(g);

    FAILS(atmoe_graph_input(g, "x", F32, 2, SHAPE(4, 3), 0, &n), ctx,
          INVALID_ARGUMENT, "atmoe_graph_input", "'x'");
    FAILS(atmoe_graph_input(g, "x", I32, 1, SHAPE(5), 0, &n), ctx,
          INVALID_ARGUMENT, "atmoe_graph_input", "'x'");
    FAILS(atmoe_graph_constant(g, "y", F32, 2, SHAPE(4, 3), data, &n), ctx,
          INVALID_ARGUMENT, "atmoe_graph_constant", "'y'");
    FAILS(atmoe_graph_parameter(g, "x", t, &n), ctx, INVALID_ARGUMENT,
          "atmoe_graph_parameter", "'x'");
    FAILS(atmoe_graph_set_name(g, y, "x"), ctx, INVALID_ARGUMENT,
          "atmoe_graph_set_name", "'x'");
    ck_assert_uint_eq(node_count(g), count);
    ck_assert_int_eq(n, 12345);
    /* The names are still where they were. */
    OK(atmoe_graph_find(g, "x", &found));
    ck_assert_int_eq(found, x);
    OK(atmoe_graph_find(g, "y", &found));
    ck_assert_int_eq(found, y);
    /* A node may be given its own name again. */
    OK(atmoe_graph_set_name(g, x, "x"));
    /* An operation's default name is taken too. */
    atmoe_node s;
    OK(atmoe_graph_silu(g, x, &s));
    OK(atmoe_graph_set_name(g, s, "act"));
    FAILS(atmoe_graph_set_name(g, x, "act"), ctx, INVALID_ARGUMENT,
          "atmoe_graph_set_name", "'act'");
    OK(atmoe_graph_find(g, "act", &found));
    ck_assert_int_eq(found, s);
    atmoe_tensor_free(t);
    atmoe_graph_free(g);
}

static void batch_errors(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node a = INPUT("a", F32, 1, 9, 13);
    atmoe_node n = 12345;
    size_t count = node_count(g);

    FAILS(atmoe_graph_input(g, "b", F32, 2, SHAPE(5, 13), 1, &n), ctx,
          SHAPE_MISMATCH, "atmoe_graph_input", "'b'", "5", "9");
    FAILS(atmoe_graph_input(g, "c", I32, 1, SHAPE(10), 1, &n), ctx,
          SHAPE_MISMATCH, "atmoe_graph_input", "10", "9");
    /* A view must keep the whole batch. */
    FAILS(atmoe_graph_view(g, a, SHAPE(0, 0), SHAPE(4, 13), &n), ctx,
          SHAPE_MISMATCH, "atmoe_graph_view", "batch", "[9, 13]");
    FAILS(atmoe_graph_view(g, a, SHAPE(1, 0), SHAPE(8, 13), &n), ctx,
          SHAPE_MISMATCH, "atmoe_graph_view", "batch");
    ck_assert_uint_eq(node_count(g), count);
    ck_assert_int_eq(n, 12345);

    /* Same batch, a fixed input of another size, and a view of the other
     * dimension are fine. */
    OK(atmoe_graph_input(g, "b", F32, 3, SHAPE(9, 2, 5), 1, &n));
    OK(atmoe_graph_input(g, "c", F32, 2, SHAPE(5, 13), 0, &n));
    OK(atmoe_graph_view(g, a, SHAPE(0, 2), SHAPE(9, 5), &n));
    EXPECT_SHAPE(n, F32, 9, 5);
    atmoe_graph_free(g);
}

static void plan_errors(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_graph_memory mem;

    FAILS(atmoe_graph_plan(g, 0), ctx, INVALID_ARGUMENT, "atmoe_graph_plan",
          "output");
    atmoe_node x = INPUT("x", F32, 0, 4, 3);
    atmoe_node y;
    OK(atmoe_graph_silu(g, x, &y));
    FAILS(atmoe_graph_plan(g, 0), ctx, INVALID_ARGUMENT, "atmoe_graph_plan",
          "output");
    FAILS(atmoe_graph_get_memory(g, &mem), ctx, INVALID_ARGUMENT,
          "atmoe_graph_get_memory");
    OK(atmoe_graph_mark_output(g, y));
    FAILS(atmoe_graph_plan(g, 4u), ctx, INVALID_ARGUMENT, "atmoe_graph_plan",
          "flags");
    FAILS(atmoe_graph_plan(g, 0x80000000u | ATMOE_PLAN_NO_REUSE), ctx,
          INVALID_ARGUMENT, "atmoe_graph_plan", "flags");
    FAILS(atmoe_graph_get_memory(g, &mem), ctx, INVALID_ARGUMENT,
          "atmoe_graph_get_memory");
    OK(atmoe_graph_plan(g, ATMOE_PLAN_NO_REUSE | ATMOE_PLAN_NO_INPLACE));
    OK(atmoe_graph_get_memory(g, &mem));
    ck_assert_uint_eq(mem.nodes_computed, 2);
    /* A refused plan leaves the previous one in place. */
    FAILS(atmoe_graph_plan(g, 8u), ctx, INVALID_ARGUMENT, "atmoe_graph_plan");
    OK(atmoe_graph_get_memory(g, &mem));
    atmoe_graph_free(g);
}

static void compute_errors(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    small_params p;
    small_params_init(&p, 7);
    small_graph sg;
    small_build(ctx, g, &p, 1, &sg);
    /* An input no output needs. */
    atmoe_node unused = INPUT("unused", F32, 1, SM_B, 3);
    atmoe_node fixed = INPUT("fixed", F32, 0, 2, 3);
    atmoe_node fz;
    OK(atmoe_graph_scale(g, fixed, 2.0f, &fz));
    OK(atmoe_graph_mark_output(g, fz));
    float x[SM_B * SM_D], buf[SM_B * SM_D], f6[6] = {1, 2, 3, 4, 5, 6};
    test_rng rng;
    test_rng_seed(&rng, 8);
    test_fill_uniform(&rng, x, SM_B * SM_D, -1, 1);

    /* Before planning. */
    FAILS(atmoe_graph_compute(g, 0), ctx, INVALID_ARGUMENT,
          "atmoe_graph_compute", "plan");
    FAILS(atmoe_graph_set_input(g, sg.x, x, sizeof x, SM_B), ctx,
          INVALID_ARGUMENT, "atmoe_graph_set_input", "plan");
    FAILS(atmoe_graph_read(g, sg.y, buf, sizeof buf), ctx, INVALID_ARGUMENT,
          "atmoe_graph_read", "plan");

    OK(atmoe_graph_plan(g, 0));
    /* Nothing computed yet. */
    FAILS(atmoe_graph_read(g, sg.y, buf, sizeof buf), ctx, INVALID_ARGUMENT,
          "atmoe_graph_read");
    atmoe_node_profile prof;
    FAILS(atmoe_graph_get_profile(g, 0, &prof), ctx, INVALID_ARGUMENT,
          "atmoe_graph_get_profile");
    /* Inputs never set. */
    FAILS(atmoe_graph_compute(g, 0), ctx, INVALID_ARGUMENT,
          "atmoe_graph_compute", "never set");
    OK(atmoe_graph_set_input(g, fixed, f6, sizeof f6, 0));
    FAILS(atmoe_graph_compute(g, 0), ctx, INVALID_ARGUMENT,
          "atmoe_graph_compute", "'x'");
    /* Not an input. */
    FAILS(atmoe_graph_set_input(g, sg.h, x, SM_B * SM_H * sizeof(float), SM_B),
          ctx, INVALID_ARGUMENT, "atmoe_graph_set_input", "not an input");
    FAILS(atmoe_graph_set_input(g, sg.w1, p.w1, sizeof p.w1, 0), ctx,
          INVALID_ARGUMENT, "atmoe_graph_set_input", "not an input");
    /* Rows: too many, none for a batched input, some for a fixed one. */
    FAILS(atmoe_graph_set_input(g, sg.x, x, sizeof x, SM_B + 1), ctx,
          OUT_OF_RANGE, "atmoe_graph_set_input", "10");
    FAILS(atmoe_graph_set_input(g, sg.x, x, sizeof x, 0), ctx, OUT_OF_RANGE,
          "atmoe_graph_set_input");
    FAILS(atmoe_graph_set_input(g, fixed, f6, sizeof f6, 2), ctx,
          INVALID_ARGUMENT, "atmoe_graph_set_input");
    /* The wrong number of bytes for the rows. */
    FAILS(atmoe_graph_set_input(g, sg.x, x, sizeof x - SM_D * sizeof(float),
                                SM_B),
          ctx, SHAPE_MISMATCH, "atmoe_graph_set_input", "'x'");
    FAILS(atmoe_graph_set_input(g, sg.x, x, sizeof x, 3), ctx, SHAPE_MISMATCH,
          "atmoe_graph_set_input");
    FAILS(atmoe_graph_set_input(g, fixed, f6, sizeof f6 - 1, 0), ctx,
          SHAPE_MISMATCH, "atmoe_graph_set_input");

    OK(atmoe_graph_set_input(g, sg.x, x, 4 * SM_D * sizeof(float), 4));
    /* A batch larger than planned, and one the inputs do not hold. */
    FAILS(atmoe_graph_compute(g, SM_B + 1), ctx, OUT_OF_RANGE,
          "atmoe_graph_compute", "10");
    FAILS(atmoe_graph_compute(g, 3), ctx, SHAPE_MISMATCH,
          "atmoe_graph_compute", "'x'");
    FAILS(atmoe_graph_compute(g, 0), ctx, SHAPE_MISMATCH,
          "atmoe_graph_compute", "'x'");
    FAILS(atmoe_graph_read(g, sg.y, buf, sizeof buf), ctx, INVALID_ARGUMENT,
          "atmoe_graph_read");

    /* Now it works, and reads check what they are given. */
    OK(atmoe_graph_compute(g, 4));
    FAILS(atmoe_graph_read(g, sg.h, buf, 4 * SM_H * sizeof(float)), ctx,
          INVALID_ARGUMENT, "atmoe_graph_read", "not an output");
    FAILS(atmoe_graph_read(g, sg.x, buf, 4 * SM_D * sizeof(float)), ctx,
          INVALID_ARGUMENT, "atmoe_graph_read", "not an output");
    FAILS(atmoe_graph_read(g, sg.y, buf, sizeof buf), ctx, SHAPE_MISMATCH,
          "atmoe_graph_read", "'y'");
    small_out o;
    small_run(ctx, g, &sg, x, 4, 4, &o);
    small_check(&p, x, 4, &o, "after refused calls");
    float fz_out[6];
    OK(atmoe_graph_read(g, fz, fz_out, sizeof fz_out));
    for (int i = 0; i < 6; i++)
        ck_assert_float_eq(fz_out[i], 2 * f6[i]);

    /* A graph without batched inputs runs batch 0 or 1 only. */
    atmoe_graph *g2 = new_graph(ctx);
    {
        atmoe_node a = add_input(ctx, g2, "a", F32, 0, 2, SHAPE(2, 3)), b;
        OK(atmoe_graph_sigmoid(g2, a, &b));
        OK(atmoe_graph_mark_output(g2, b));
        OK(atmoe_graph_plan(g2, 0));
        OK(atmoe_graph_set_input(g2, a, f6, sizeof f6, 0));
        FAILS(atmoe_graph_compute(g2, 2), ctx, OUT_OF_RANGE,
              "atmoe_graph_compute");
        OK(atmoe_graph_compute(g2, 1));
        OK(atmoe_graph_compute(g2, 0));
    }

    /* The byte count rule holds for an input that no output reads too. */
    SOFT_FAILS(atmoe_graph_set_input(g, unused, x, 5, 2), ctx,
               SHAPE_MISMATCH, "atmoe_graph_set_input", "'unused'");
    atmoe_graph_free(g2);
    atmoe_graph_free(g);
}

/* ------------------------------------------------------------------------ */
/* Names                                                                     */
/* ------------------------------------------------------------------------ */

static void names(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node x = INPUT("tokens", F32, 1, 9, 17), found = NONE;
    atmoe_node h;
    OK(atmoe_graph_silu(g, x, &h));
    OK(atmoe_graph_set_name(g, h, "hidden"));
    OK(atmoe_graph_find(g, "hidden", &found));
    ck_assert_int_eq(found, h);
    OK(atmoe_graph_find(g, "tokens", &found));
    ck_assert_int_eq(found, x);

    /* Renaming frees the old name. */
    OK(atmoe_graph_set_name(g, h, "hidden2"));
    found = 12345;
    FAILS(atmoe_graph_find(g, "hidden", &found), ctx, NOT_FOUND,
          "atmoe_graph_find", "hidden");
    ck_assert(found == 12345 || found == NONE); /* never another node */
    OK(atmoe_graph_find(g, "hidden2", &found));
    ck_assert_int_eq(found, h);
    OK(atmoe_graph_set_name(g, x, "hidden"));
    OK(atmoe_graph_find(g, "hidden", &found));
    ck_assert_int_eq(found, x);
    FAILS(atmoe_graph_find(g, "no such node", &found), ctx,
          NOT_FOUND, "atmoe_graph_find", "no such node");

    /* Lengths: 1 to 63 bytes. */
    char name63[64], name64[65];
    memset(name63, 'n', 63);
    name63[63] = '\0';
    memset(name64, 'm', 64);
    name64[64] = '\0';
    FAILS(atmoe_graph_set_name(g, h, ""), ctx, INVALID_ARGUMENT,
          "atmoe_graph_set_name");
    FAILS(atmoe_graph_set_name(g, h, name64), ctx, INVALID_ARGUMENT,
          "atmoe_graph_set_name");
    atmoe_node n = 12345;
    FAILS(atmoe_graph_input(g, name64, F32, 1, SHAPE(3), 0, &n), ctx,
          INVALID_ARGUMENT, "atmoe_graph_input");
    ck_assert_int_eq(n, 12345);
    OK(atmoe_graph_set_name(g, h, name63));
    OK(atmoe_graph_find(g, name63, &found));
    ck_assert_int_eq(found, h);
    OK(atmoe_graph_find(g, "hidden", &found));
    ck_assert_int_eq(found, x);

    /* Shapes as inferred. */
    float w[5 * 17] = {0};
    atmoe_node c = add_const(ctx, g, "w", 2, SHAPE(5, 17), w);
    atmoe_node mm, v, ix, mean0, mean1, tr, rs, cat, vw, sm;
    OK(atmoe_graph_matmul(g, h, c, NONE, ATMOE_MATMUL_TRANSPOSE_B, &mm));
    OK(atmoe_graph_topk(g, mm, 3, -1, &v, &ix));
    OK(atmoe_graph_mean(g, h, 0, &mean0));
    OK(atmoe_graph_mean(g, h, 1, &mean1));
    OK(atmoe_graph_transpose(g, h, 0, 1, &tr));
    OK(atmoe_graph_reshape(g, h, 1, SHAPE(9 * 17), &rs));
    OK(atmoe_graph_concat(g, h, mm, 1, &cat));
    OK(atmoe_graph_view(g, cat, SHAPE(0, 3), SHAPE(9, 4), &vw));
    OK(atmoe_graph_softmax(g, vw, 0, &sm));
    EXPECT_SHAPE(x, F32, 9, 17);
    EXPECT_SHAPE(c, F32, 5, 17);
    EXPECT_SHAPE(mm, F32, 9, 5);
    EXPECT_SHAPE(v, F32, 9, 3);
    EXPECT_SHAPE(ix, I32, 9, 3);
    EXPECT_SHAPE(mean0, F32, 17);
    EXPECT_SHAPE(mean1, F32, 9);
    EXPECT_SHAPE(tr, F32, 17, 9);
    EXPECT_SHAPE(rs, F32, 153);
    EXPECT_SHAPE(cat, F32, 9, 22);
    EXPECT_SHAPE(vw, F32, 9, 4);
    EXPECT_SHAPE(sm, F32, 9, 4);
    /* Every out pointer is optional. */
    int nd = 0;
    OK(atmoe_graph_get_shape(g, ix, &nd, NULL, NULL));
    ck_assert_int_eq(nd, 2);
    atmoe_dtype dt = F32;
    OK(atmoe_graph_get_shape(g, ix, NULL, NULL, &dt));
    ck_assert_int_eq(dt, I32);
    atmoe_graph_free(g);
}

/* The names of every computed node, from the profile, are distinct and
 * find their node (collected as soft failures, so that the graph is freed
 * whatever happens). */
static void check_names_unique(atmoe_context *ctx, atmoe_graph *g)
{
    atmoe_graph_memory mem;
    OK(atmoe_graph_get_memory(g, &mem));
    char names[64][64];
    atmoe_node ids[64];
    ck_assert_uint_le(mem.nodes_computed, 64);
    for (size_t i = 0; i < mem.nodes_computed; i++) {
        atmoe_node_profile prof;
        OK(atmoe_graph_get_profile(g, i, &prof));
        ck_assert_msg(prof.name[0] != '\0', "node %d has no name", prof.node);
        snprintf(names[i], sizeof names[i], "%s", prof.name);
        ids[i] = prof.node;
        for (size_t j = 0; j < i; j++)
            if (strcmp(names[j], names[i]) == 0)
                soft_fail("nodes %d and %d are both named '%s'", ids[j],
                          ids[i], names[i]);
        atmoe_node found = NONE;
        OK(atmoe_graph_find(g, names[i], &found));
        if (found != prof.node)
            soft_fail("find('%s') gives node %d, not node %d", names[i],
                      found, prof.node);
    }
}

static void default_names(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node x = INPUT(NULL, F32, 0, 3, 5), c, a, b, d, v, ix, m;
    const float cdata[5] = {1, 2, 3, 4, 5};
    c = add_const(ctx, g, NULL, 1, SHAPE(5), cdata);
    OK(atmoe_graph_add(g, x, c, &a));
    OK(atmoe_graph_mul(g, a, c, &b));
    OK(atmoe_graph_add(g, b, a, &d));
    OK(atmoe_graph_topk(g, d, 2, -1, &v, &ix));
    OK(atmoe_graph_mean(g, v, -1, &m));
    OK(atmoe_graph_mark_output(g, ix));
    OK(atmoe_graph_mark_output(g, m));
    OK(atmoe_graph_plan(g, 0));
    float xd[15] = {0};
    OK(atmoe_graph_set_input(g, x, xd, sizeof xd, 0));
    OK(atmoe_graph_compute(g, 0));
    check_names_unique(ctx, g);
    atmoe_graph_free(g);
}

/* Default names must not collide with names the caller gave, before or
 * after. */
static void default_names_avoid_given_ones(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    atmoe_node x, s, y, z;
    /* Names in the form a default name could take. */
    x = INPUT("scale_1", F32, 0, 3, 5);
    OK(atmoe_graph_scale(g, x, 2.0f, &s));
    OK(atmoe_graph_silu(g, s, &y));
    OK(atmoe_graph_set_name(g, y, "gelu_3"));
    OK(atmoe_graph_gelu(g, y, &z));
    OK(atmoe_graph_mark_output(g, z));
    OK(atmoe_graph_plan(g, 0));
    float xd[15] = {0};
    OK(atmoe_graph_set_input(g, x, xd, sizeof xd, 0));
    OK(atmoe_graph_compute(g, 0));
    check_names_unique(ctx, g);
    atmoe_graph_free(g);
}

/* atmoe_errmsg reports the last failed call: calls that succeed leave it
 * alone, including those that look names up internally. */
static void errmsg_after_success(atmoe_context *shared)
{
    (void)shared; /* a context of its own, with nothing failed yet */
    atmoe_context *ctx = test_context();
    if (atmoe_errmsg(ctx)[0] != '\0')
        soft_fail("a new context has the message \"%s\"", atmoe_errmsg(ctx));
    atmoe_graph *g = new_graph(ctx);
    atmoe_node x = INPUT("x", F32, 0, 3, 5), y, found;
    OK(atmoe_graph_silu(g, x, &y));
    OK(atmoe_graph_set_name(g, y, "y"));
    if (atmoe_errmsg(ctx)[0] != '\0')
        soft_fail("after successful calls only, the message is \"%s\"",
                  atmoe_errmsg(ctx));
    ck_assert_fails(atmoe_graph_find(g, "nothing", &found), ctx,
                    ATMOE_STATUS_NOT_FOUND);
    char before[512];
    snprintf(before, sizeof before, "%s", atmoe_errmsg(ctx));
    INPUT("z", F32, 0, 3);
    OK(atmoe_graph_set_name(g, x, "x2"));
    if (strcmp(before, atmoe_errmsg(ctx)) != 0)
        soft_fail("successful calls changed the message from \"%s\" to "
                  "\"%s\"", before, atmoe_errmsg(ctx));
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
}

/* ------------------------------------------------------------------------ */
/* The planner on a long chain                                               */
/* ------------------------------------------------------------------------ */

enum { CH_B = 9, CH_D = 17, CH_H = 23, CH_BLOCKS = 12, CH_K = 3 };

typedef struct chain_params {
    float x[CH_B * CH_D];
    float w1[CH_BLOCKS][CH_H * CH_D]; /* [H, D], used transposed */
    float b1[CH_BLOCKS][CH_H];
    float gw[CH_BLOCKS][CH_H];
    float w2[CH_BLOCKS][CH_H * CH_D]; /* [H, D] */
    float dc[CH_D];
} chain_params;

typedef struct chain {
    atmoe_node x, final, mid, ti, ro;
    size_t nodes, dangling;
    uint64_t raw_intermediate; /* bytes of every node with memory of its own */
    uint64_t raw_pinned;       /* of the input and the outputs' memory */
} chain;

typedef struct chain_out {
    float final[CH_B * CH_D], mid[CH_B * CH_D], ro[CH_B * CH_D];
    int32_t ti[CH_B * CH_K];
} chain_out;

static void chain_params_init(chain_params *p, uint64_t seed)
{
    test_rng rng;
    test_rng_seed(&rng, seed);
    test_fill_uniform(&rng, p->x, CH_B * CH_D, -1, 1);
    for (int i = 0; i < CH_BLOCKS; i++) {
        test_fill_uniform(&rng, p->w1[i], CH_H * CH_D, -0.4, 0.4);
        test_fill_uniform(&rng, p->b1[i], CH_H, -0.1, 0.1);
        test_fill_uniform(&rng, p->gw[i], CH_H, 0.5, 1.5);
        test_fill_uniform(&rng, p->w2[i], CH_H * CH_D, -0.3, 0.3);
    }
    test_fill_uniform(&rng, p->dc, CH_D, -1, 1);
}

#define OWNS(node) (c->raw_intermediate += node_bytes(ctx, g, node))

/* Twelve blocks of h = 0.7 (silu(rmsnorm(h W1^T + b1)) W2 + h) on a batched
 * [9, 17] input, with side branches: a softmax after block 3 added back
 * after block 7; topk after block 5, whose mean is added back after block
 * 8; a reshape of block 9's result as an output; block 11 reading its
 * input through two reshapes and a scale; a dangling branch after block 1.
 * Outputs: the end, block 5's result, the topk indices, the reshape. */
static void chain_build(atmoe_context *ctx, atmoe_graph *g,
                        const chain_params *p, chain *c)
{
    memset(c, 0, sizeof *c);
    atmoe_node h, sm = NONE, mnr = NONE;
    c->x = h = INPUT("x", F32, 1, CH_B, CH_D);
    OWNS(h);
    for (int i = 0; i < CH_BLOCKS; i++) {
        atmoe_node hin = h, t, r, s, t2, a;
        if (i == 11) {
            atmoe_node r1, r2;
            OK(atmoe_graph_reshape(g, h, 1, SHAPE(CH_B * CH_D), &r1));
            OK(atmoe_graph_reshape(g, r1, 2, SHAPE(CH_B, CH_D), &r2));
            OK(atmoe_graph_scale(g, r2, 1.25f, &hin));
            OWNS(hin);
        }
        atmoe_node w1 = add_const(ctx, g, NULL, 2, SHAPE(CH_H, CH_D),
                                  p->w1[i]);
        atmoe_node b1 = add_const(ctx, g, NULL, 1, SHAPE(CH_H), p->b1[i]);
        OK(atmoe_graph_matmul(g, hin, w1, b1, ATMOE_MATMUL_TRANSPOSE_B, &t));
        OWNS(t);
        atmoe_node gw = add_const(ctx, g, NULL, 1, SHAPE(CH_H), p->gw[i]);
        OK(atmoe_graph_rmsnorm(g, t, gw, 1e-5f, &r));
        OWNS(r);
        OK(atmoe_graph_silu(g, r, &s));
        OWNS(s);
        atmoe_node w2 = add_const(ctx, g, NULL, 2, SHAPE(CH_H, CH_D),
                                  p->w2[i]);
        OK(atmoe_graph_matmul(g, s, w2, NONE, 0, &t2));
        OWNS(t2);
        OK(atmoe_graph_add(g, t2, hin, &a));
        OWNS(a);
        OK(atmoe_graph_scale(g, a, 0.7f, &h));
        OWNS(h);
        if (i == 1) {
            atmoe_node dc, dm, dg;
            dc = add_const(ctx, g, "dangling_const", 1, SHAPE(CH_D), p->dc);
            OK(atmoe_graph_mul(g, h, dc, &dm));
            OK(atmoe_graph_gelu(g, dm, &dg));
            c->dangling += 3;
        }
        if (i == 3) {
            OK(atmoe_graph_softmax(g, h, -1, &sm));
            OWNS(sm);
        }
        if (i == 5) {
            atmoe_node tv, mn;
            OK(atmoe_graph_topk(g, h, CH_K, -1, &tv, &c->ti));
            OWNS(tv);
            OWNS(c->ti);
            OK(atmoe_graph_mean(g, tv, -1, &mn));
            OWNS(mn);
            OK(atmoe_graph_reshape(g, mn, 2, SHAPE(CH_B, 1), &mnr));
            c->mid = h;
        }
        if (i == 7) {
            OK(atmoe_graph_add(g, h, sm, &h));
            OWNS(h);
        }
        if (i == 8) {
            OK(atmoe_graph_add(g, h, mnr, &h));
            OWNS(h);
        }
        if (i == 9) {
            OK(atmoe_graph_reshape(g, h, 1, SHAPE(CH_B * CH_D), &c->ro));
        }
    }
    c->final = h;
    OK(atmoe_graph_mark_output(g, c->final));
    OK(atmoe_graph_mark_output(g, c->mid));
    OK(atmoe_graph_mark_output(g, c->ti));
    OK(atmoe_graph_mark_output(g, c->ro));
    c->raw_pinned = node_bytes(ctx, g, c->x) + node_bytes(ctx, g, c->final) +
                    node_bytes(ctx, g, c->mid) + node_bytes(ctx, g, c->ti) +
                    node_bytes(ctx, g, c->ro);
    c->nodes = node_count(g);
}

/* The chain in float64 on all rows (every row is independent). */
static void chain_reference(const chain_params *p, double *final, double *mid,
                            double *ro)
{
    enum { N = CH_B * CH_D };
    double h[N], hin[N], t[CH_B * CH_H], t2[N], sm[N], tv[CH_B * CH_K],
        mn[CH_B];
    for (int i = 0; i < N; i++)
        h[i] = p->x[i];
    for (int b = 0; b < CH_BLOCKS; b++) {
        for (int i = 0; i < N; i++)
            hin[i] = b == 11 ? h[i] * 1.25 : h[i];
        ref_linear(hin, CH_B, CH_D, p->w1[b], CH_H, p->b1[b], t);
        ref_rmsnorm(t, CH_B, CH_H, p->gw[b], 1e-5f);
        ref_silu(t, CH_B * CH_H);
        ref_matmul(t, CH_B, CH_H, p->w2[b], CH_D, t2);
        for (int i = 0; i < N; i++)
            h[i] = (double)0.7f * (t2[i] + hin[i]);
        if (b == 3)
            ref_softmax(h, CH_B, CH_D, sm);
        if (b == 5) {
            ref_topk_values(h, CH_B, CH_D, CH_K, tv);
            for (int r = 0; r < CH_B; r++) {
                mn[r] = 0;
                for (int k = 0; k < CH_K; k++)
                    mn[r] += tv[r * CH_K + k] / CH_K;
            }
            memcpy(mid, h, sizeof h);
        }
        if (b == 7)
            for (int i = 0; i < N; i++)
                h[i] += sm[i];
        if (b == 8)
            for (int i = 0; i < N; i++)
                h[i] += mn[i / CH_D];
        if (b == 9)
            memcpy(ro, h, sizeof h);
    }
    memcpy(final, h, sizeof h);
}

static void chain_run(atmoe_context *ctx, atmoe_graph *g, const chain *c,
                      const chain_params *p, size_t b, chain_out *o)
{
    test_poison(o->final, CH_B * CH_D);
    test_poison(o->mid, CH_B * CH_D);
    test_poison(o->ro, CH_B * CH_D);
    for (size_t i = 0; i < CH_B * CH_K; i++)
        o->ti[i] = -7;
    OK(atmoe_graph_set_input(g, c->x, p->x, b * CH_D * sizeof(float), b));
    OK(atmoe_graph_compute(g, b));
    OK(atmoe_graph_read(g, c->final, o->final, b * CH_D * sizeof(float)));
    OK(atmoe_graph_read(g, c->mid, o->mid, b * CH_D * sizeof(float)));
    OK(atmoe_graph_read(g, c->ro, o->ro, b * CH_D * sizeof(float)));
    OK(atmoe_graph_read(g, c->ti, o->ti, b * CH_K * sizeof(int32_t)));
}

static void chain_check(const chain_out *o, size_t b, const double *final,
                        const double *mid, const double *ro, const char *what)
{
    char w[128];
    snprintf(w, sizeof w, "%s, batch %zu: end of the chain", what, b);
    check_close(o->final, final, b * CH_D, 1e-4, 0.25, w);
    snprintf(w, sizeof w, "%s, batch %zu: block 5", what, b);
    check_close(o->mid, mid, b * CH_D, 1e-4, 0.25, w);
    snprintf(w, sizeof w, "%s, batch %zu: reshaped block 9", what, b);
    check_close(o->ro, ro, b * CH_D, 1e-4, 0.25, w);
    snprintf(w, sizeof w, "%s, batch %zu: topk indices", what, b);
    check_topk(o->ti, mid, b, CH_D, CH_K, 1e-4, w);
    /* Rows past the batch are left alone. */
    for (size_t i = b * CH_D; i < CH_B * CH_D; i++)
        ck_assert_msg(isnan(o->final[i]), "%s: read past the batch", what);
}

static void check_plan_memory(atmoe_context *ctx, atmoe_graph *g,
                              const chain *c, unsigned flags,
                              atmoe_graph_memory *mem)
{
    atmoe_memory_stats before, after;
    memory_stats(ctx, &before);
    OK(atmoe_graph_plan(g, flags));
    memory_stats(ctx, &after);
    OK(atmoe_graph_get_memory(g, mem));
    ck_assert_uint_eq(mem->nodes_computed, c->nodes - c->dangling);
    ck_assert_uint_ge(mem->intermediate_bytes, c->raw_intermediate);
    ck_assert_uint_ge(mem->pinned_bytes, c->raw_pinned);
    ck_assert_uint_le(mem->pinned_bytes, mem->arena_bytes);
    ck_assert_uint_le(mem->arena_bytes, mem->intermediate_bytes);
    /* The plan allocates one arena and nothing else. */
    ck_assert_uint_eq(after.allocations, before.allocations + 1);
    ck_assert_uint_eq(after.allocated_bytes,
                      before.allocated_bytes + mem->arena_bytes);
}

static void planner_chain(atmoe_context *ctx)
{
    chain_params *p = xmalloc(sizeof *p);
    chain_params_init(p, 11);
    enum { N = CH_B * CH_D };
    double *ref = xmalloc(3 * N * sizeof *ref);
    chain_reference(p, ref, ref + N, ref + 2 * N);
    chain_out *out = xmalloc(6 * sizeof *out); /* 3 plans x 2 batches */
    const size_t batches[2] = {CH_B, 4};

    /* Planned normally. */
    atmoe_graph *g = new_graph(ctx);
    chain c;
    chain_build(ctx, g, p, &c);
    ck_assert_uint_ge(c.nodes, 50);
    atmoe_graph_memory mem, mem_nr, mem_ni, mem_again;
    check_plan_memory(ctx, g, &c, 0, &mem);
    ck_assert_msg(mem.arena_bytes * 2 <= mem.intermediate_bytes,
                  "arena of %llu bytes for %llu bytes of intermediates",
                  (unsigned long long)mem.arena_bytes,
                  (unsigned long long)mem.intermediate_bytes);
    for (int k = 0; k < 2; k++) {
        chain_run(ctx, g, &c, p, batches[k], &out[k]);
        chain_check(&out[k], batches[k], ref, ref + N, ref + 2 * N,
                    "default plan");
    }

    /* The same graph planned again without reuse: every intermediate has
     * memory of its own. */
    check_plan_memory(ctx, g, &c, ATMOE_PLAN_NO_REUSE, &mem_nr);
    ck_assert_uint_eq(mem_nr.arena_bytes, mem_nr.intermediate_bytes);
    ck_assert_uint_eq(mem_nr.intermediate_bytes, mem.intermediate_bytes);
    ck_assert_uint_eq(mem_nr.pinned_bytes, mem.pinned_bytes);
    for (int k = 0; k < 2; k++) {
        chain_run(ctx, g, &c, p, batches[k], &out[2 + k]);
        chain_check(&out[2 + k], batches[k], ref, ref + N, ref + 2 * N,
                    "NO_REUSE");
    }

    /* A second graph built the same way, planned without in-place
     * operations. */
    atmoe_graph *g2 = new_graph(ctx);
    chain c2;
    chain_build(ctx, g2, p, &c2);
    ck_assert_uint_eq(c2.nodes, c.nodes);
    check_plan_memory(ctx, g2, &c2, ATMOE_PLAN_NO_INPLACE, &mem_ni);
    ck_assert_uint_eq(mem_ni.intermediate_bytes, mem.intermediate_bytes);
    ck_assert_uint_eq(mem_ni.pinned_bytes, mem.pinned_bytes);
    ck_assert_uint_le(mem_ni.arena_bytes, mem_nr.arena_bytes);
    for (int k = 0; k < 2; k++) {
        chain_run(ctx, g2, &c2, p, batches[k], &out[4 + k]);
        chain_check(&out[4 + k], batches[k], ref, ref + N, ref + 2 * N,
                    "NO_INPLACE");
    }

    /* The same kernels ran in the same order: identical bits. */
    for (int k = 0; k < 2; k++) {
        ck_assert_msg(memcmp(&out[k], &out[2 + k], sizeof *out) == 0,
                      "batch %zu: default and NO_REUSE plans differ",
                      batches[k]);
        ck_assert_msg(memcmp(&out[k], &out[4 + k], sizeof *out) == 0,
                      "batch %zu: default and NO_INPLACE plans differ",
                      batches[k]);
    }

    /* Both flags at once; and planning is deterministic. */
    check_plan_memory(ctx, g2, &c2,
                      ATMOE_PLAN_NO_REUSE | ATMOE_PLAN_NO_INPLACE, &mem_again);
    ck_assert_uint_eq(mem_again.arena_bytes, mem_nr.arena_bytes);
    check_plan_memory(ctx, g, &c, 0, &mem_again);
    ck_assert_uint_eq(mem_again.arena_bytes, mem.arena_bytes);
    chain_run(ctx, g, &c, p, CH_B, &out[2]);
    ck_assert_msg(memcmp(&out[0], &out[2], sizeof *out) == 0,
                  "planning again changed the results");

    atmoe_graph_free(g2);
    atmoe_graph_free(g);
    free(out);
    free(ref);
    free(p);
}

/* Aliasing the planner must see through: an output that is an input, a
 * reshape of an input, a constant; in-place chains over reshapes; an
 * operation reading the same node twice. */
static void planner_aliasing(atmoe_context *ctx)
{
    enum { B = 5, D = 6 };
    const float cdata[D] = {0.5f, -1, 2, 0.25f, 3, -0.75f};
    float x[B * D];
    test_rng rng;
    test_rng_seed(&rng, 21);
    test_fill_uniform(&rng, x, B * D, -2, 2);
    float outs[3][5][B * D];

    const unsigned flags[3] = {0, ATMOE_PLAN_NO_REUSE, ATMOE_PLAN_NO_INPLACE};
    for (int f = 0; f < 3; f++) {
        atmoe_graph *g = new_graph(ctx);
        atmoe_node in = INPUT("x", F32, 1, B, D);
        atmoe_node c = add_const(ctx, g, "c", 1, SHAPE(D), cdata);
        atmoe_node rin, a, r1, r2, s, sq, t, u;
        OK(atmoe_graph_reshape(g, in, 1, SHAPE(B * D), &rin));
        OK(atmoe_graph_add(g, in, c, &a));          /* a = x + c */
        OK(atmoe_graph_reshape(g, a, 1, SHAPE(B * D), &r1));
        OK(atmoe_graph_reshape(g, r1, 2, SHAPE(B, D), &r2));
        OK(atmoe_graph_sigmoid(g, r2, &s));         /* in place over a */
        OK(atmoe_graph_mul(g, s, s, &sq));          /* reads s twice */
        OK(atmoe_graph_scale(g, sq, -2.0f, &t));
        OK(atmoe_graph_add(g, t, sq, &u));          /* u = -sq */
        OK(atmoe_graph_mark_output(g, in));
        OK(atmoe_graph_mark_output(g, rin));
        OK(atmoe_graph_mark_output(g, c));
        OK(atmoe_graph_mark_output(g, u));
        OK(atmoe_graph_mark_output(g, sq));
        OK(atmoe_graph_plan(g, flags[f]));
        for (int k = 0; k < 5; k++)
            test_poison(outs[f][k], B * D);
        size_t b = 3;
        OK(atmoe_graph_set_input(g, in, x, b * D * sizeof(float), b));
        OK(atmoe_graph_compute(g, b));
        OK(atmoe_graph_read(g, in, outs[f][0], b * D * sizeof(float)));
        OK(atmoe_graph_read(g, rin, outs[f][1], b * D * sizeof(float)));
        OK(atmoe_graph_read(g, c, outs[f][2], D * sizeof(float)));
        OK(atmoe_graph_read(g, u, outs[f][3], b * D * sizeof(float)));
        OK(atmoe_graph_read(g, sq, outs[f][4], b * D * sizeof(float)));
        for (size_t i = 0; i < b * D; i++) {
            ck_assert_float_eq(outs[f][0][i], x[i]);
            ck_assert_float_eq(outs[f][1][i], x[i]);
            double sg = 1.0 / (1.0 + exp(-((double)x[i] + cdata[i % D])));
            ck_assert_msg(fabs(outs[f][4][i] - sg * sg) <= 1e-6,
                          "plan %u: s*s[%zu] = %g, not %g", flags[f], i,
                          outs[f][4][i], sg * sg);
            ck_assert_msg(fabs(outs[f][3][i] + sg * sg) <= 1e-6,
                          "plan %u: u[%zu] = %g, not %g", flags[f], i,
                          outs[f][3][i], -sg * sg);
        }
        for (size_t i = 0; i < D; i++)
            ck_assert_float_eq(outs[f][2][i], cdata[i]);
        atmoe_graph_free(g);
    }
    ck_assert(memcmp(outs[0], outs[1], sizeof outs[0]) == 0);
    ck_assert(memcmp(outs[0], outs[2], sizeof outs[0]) == 0);
}

/* Reshapes of a constant and of a parameter share their storage, not the
 * arena: read directly and as operands. */
static void planner_storage_reshape(atmoe_context *ctx)
{
    enum { B = 4, D = 6 };
    const float cdata[D] = {1, 2, 3, 4, 5, 6};
    const float pdata[D] = {-0.5f, 0.25f, 2, -3, 0.125f, 8};
    float x[B * D];
    for (int i = 0; i < B * D; i++)
        x[i] = (float)(i % 5) - 2.0f;
    atmoe_tensor *pt = NULL;
    OK(atmoe_tensor_new(ctx, F32, 2, SHAPE(3, 2), &pt));
    OK(atmoe_tensor_write(pt, pdata, sizeof pdata));

    atmoe_graph *g = new_graph(ctx);
    atmoe_node in = INPUT("x", F32, 1, B, D);
    atmoe_node c = add_const(ctx, g, "c", 2, SHAPE(2, 3), cdata);
    atmoe_node pw, rc, rp, a, m;
    OK(atmoe_graph_parameter(g, "p", pt, &pw));
    atmoe_tensor_free(pt);
    OK(atmoe_graph_reshape(g, c, 1, SHAPE(D), &rc));
    OK(atmoe_graph_reshape(g, pw, 1, SHAPE(D), &rp));
    OK(atmoe_graph_add(g, in, rc, &a)); /* x + c */
    OK(atmoe_graph_mul(g, a, rp, &m));  /* (x + c) p */
    OK(atmoe_graph_mark_output(g, rc));
    OK(atmoe_graph_mark_output(g, rp));
    OK(atmoe_graph_mark_output(g, m));
    OK(atmoe_graph_plan(g, 0));
    OK(atmoe_graph_set_input(g, in, x, sizeof x, B));
    OK(atmoe_graph_compute(g, 0));
    float got_c[D], got_p[D], got_m[B * D];
    test_poison(got_c, D);
    test_poison(got_p, D);
    test_poison(got_m, B * D);
    OK(atmoe_graph_read(g, rc, got_c, sizeof got_c));
    OK(atmoe_graph_read(g, rp, got_p, sizeof got_p));
    OK(atmoe_graph_read(g, m, got_m, sizeof got_m));
    for (int i = 0; i < D; i++) {
        ck_assert_msg(got_c[i] == cdata[i],
                      "reshaped constant [%d] reads %g, not %g", i, got_c[i],
                      cdata[i]);
        ck_assert_msg(got_p[i] == pdata[i],
                      "reshaped parameter [%d] reads %g, not %g", i,
                      got_p[i], pdata[i]);
    }
    for (int i = 0; i < B * D; i++) {
        float want = (x[i] + cdata[i % D]) * pdata[i % D];
        ck_assert_msg(got_m[i] == want, "(x + c) p [%d] = %g, not %g", i,
                      got_m[i], want);
    }
    atmoe_graph_free(g);
}

/* ------------------------------------------------------------------------ */
/* Steady state                                                              */
/* ------------------------------------------------------------------------ */

static void steady_state(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    small_params p;
    small_params_init(&p, 3);
    small_graph sg;
    small_build(ctx, g, &p, 0, &sg);
    OK(atmoe_graph_plan(g, 0));
    atmoe_graph_memory mem;
    OK(atmoe_graph_get_memory(g, &mem));
    ck_assert_uint_eq(mem.nodes_computed, SM_NODES - 1);

    atmoe_memory_stats before, after;
    memory_stats(ctx, &before);
    test_rng rng;
    test_rng_seed(&rng, 4);
    float x[SM_B * SM_D], x0[SM_B * SM_D];
    small_out o, first;
    size_t b0 = 0;
    for (int it = 0; it < 100; it++) {
        size_t b = 1 + (size_t)(it * 5) % SM_B;
        test_fill_uniform(&rng, x, b * SM_D, -1.5, 1.5);
        /* The planned batch also as batch 0. */
        small_run(ctx, g, &sg, x, b, b == SM_B && it % 2 ? 0 : b, &o);
        char what[32];
        snprintf(what, sizeof what, "iteration %d", it);
        small_check(&p, x, b, &o, what);
        if (it == 0) {
            b0 = b;
            memcpy(x0, x, sizeof x);
            memcpy(&first, &o, sizeof o);
        }
    }
    memory_stats(ctx, &after);
    ck_assert_uint_eq(after.allocations, before.allocations);
    ck_assert_uint_eq(after.allocated_bytes, before.allocated_bytes);
    /* The first input again gives the first results, bit for bit. */
    small_run(ctx, g, &sg, x0, b0, b0, &o);
    ck_assert(memcmp(&o, &first, sizeof o) == 0);
    atmoe_graph_free(g);
}

/* A parameter's contents may change between computes, and its handle may be
 * freed while the graph uses it. */
static void parameter_updates(atmoe_context *ctx)
{
    enum { R = 3, K = 5, N = 4 };
    float x[R * K], w[N * K], got[R * N];
    double want[R * N], xd[R * K];
    test_rng rng;
    test_rng_seed(&rng, 5);
    test_fill_uniform(&rng, x, R * K, -1, 1);
    for (int i = 0; i < R * K; i++)
        xd[i] = x[i];
    atmoe_tensor *wt = NULL;
    OK(atmoe_tensor_new(ctx, F32, 2, SHAPE(N, K), &wt));
    test_fill_uniform(&rng, w, N * K, -1, 1);
    OK(atmoe_tensor_write(wt, w, sizeof w));

    atmoe_graph *g = new_graph(ctx);
    atmoe_node in = INPUT("x", F32, 0, R, K), pw, y, n = 12345;
    OK(atmoe_graph_parameter(g, "w", wt, &pw));
    EXPECT_SHAPE(pw, F32, N, K);
    OK(atmoe_graph_matmul(g, in, pw, NONE, ATMOE_MATMUL_TRANSPOSE_B, &y));
    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_plan(g, 0));
    OK(atmoe_graph_set_input(g, in, x, sizeof x, 0));
    for (int round = 0; round < 3; round++) {
        if (round == 1) {
            test_fill_uniform(&rng, w, N * K, -1, 1);
            OK(atmoe_tensor_write(wt, w, sizeof w));
        }
        if (round == 2) {
            atmoe_tensor_free(wt);
            wt = NULL;
        }
        OK(atmoe_graph_compute(g, 0));
        test_poison(got, R * N);
        OK(atmoe_graph_read(g, y, got, sizeof got));
        ref_linear(xd, R, K, w, N, NULL, want);
        char what[32];
        snprintf(what, sizeof what, "round %d", round);
        check_close(got, want, R * N, 1e-5, 0.05, what);
    }

    /* A non-contiguous view is refused, as is a tensor of another
     * context. */
    atmoe_tensor *t = NULL, *v = NULL;
    OK(atmoe_tensor_new(ctx, F32, 2, SHAPE(4, 6), &t));
    OK(atmoe_tensor_view(t, SHAPE(0, 1), SHAPE(4, 3), &v));
    FAILS(atmoe_graph_parameter(g, "v", v, &n), ctx, INVALID_ARGUMENT,
          "atmoe_graph_parameter");
    atmoe_context *ctx2 = test_context();
    atmoe_tensor *t2 = NULL;
    ck_assert_status(atmoe_tensor_new(ctx2, F32, 1, SHAPE(3), &t2), ctx2);
    FAILS(atmoe_graph_parameter(g, "t2", t2, &n), ctx, WRONG_CONTEXT,
          "atmoe_graph_parameter");
    ck_assert_int_eq(n, 12345);
    atmoe_tensor_free(t2);
    atmoe_context_free(ctx2);
    atmoe_tensor_free(v);
    atmoe_tensor_free(t);
    atmoe_graph_free(g);
}

/* ------------------------------------------------------------------------ */
/* Dumps                                                                     */
/* ------------------------------------------------------------------------ */

static void dump(atmoe_context *ctx)
{
    char dir[PATH_MAX], path[PATH_MAX + 64], listing[2048];
    test_mkdtemp(dir, sizeof dir, "graph-dump");
    atmoe_graph *g = new_graph(ctx);
    small_params p;
    small_params_init(&p, 9);
    small_graph sg;
    small_build(ctx, g, &p, 1, &sg);

    static const char *const files[] = {"before.txt", "before.dot",
                                        "after.txt", "after.dot"};
    for (int k = 0; k < 4; k++) {
        if (k == 2) {
            OK(atmoe_graph_plan(g, 0));
            float x[SM_B * SM_D] = {0};
            OK(atmoe_graph_set_input(g, sg.x, x, sizeof x, SM_B));
            OK(atmoe_graph_compute(g, 0));
        }
        snprintf(path, sizeof path, "%s/%s", dir, files[k]);
        atmoe_dump_format fmt = k % 2 ? ATMOE_DUMP_DOT : ATMOE_DUMP_TEXT;
        OK(atmoe_graph_dump(g, path, fmt));
        /* Writing over an existing file works too. */
        OK(atmoe_graph_dump(g, path, fmt));
        char *text = test_read_file(path, NULL);
        for (int i = 0; i < SM_NODES; i++)
            ck_assert_msg(strstr(text, sg.name[i]) != NULL,
                          "%s lacks node '%s':\n%s", files[k], sg.name[i],
                          text);
        if (fmt == ATMOE_DUMP_TEXT) {
            if (k < 2)
                ck_assert_msg(strstr(text, "arena") == NULL,
                              "%s: an arena before planning:\n%s", files[k],
                              text);
            else
                ck_assert_msg(strstr(text, "arena") != NULL,
                              "%s lacks the arena:\n%s", files[k], text);
            ck_assert_msg(strstr(text, "[9, 17]") != NULL,
                          "%s lacks the input's shape:\n%s", files[k], text);
        } else {
            ck_assert_msg(strncmp(text, "digraph", 7) == 0,
                          "%s does not start with digraph:\n%s", files[k],
                          text);
            ck_assert_msg(count_substr(text, "->") == sg.edges,
                          "%s has %zu edges, not %zu:\n%s", files[k],
                          count_substr(text, "->"), sg.edges, text);
            size_t len = strlen(text);
            ck_assert_msg(len >= 2 && strcmp(text + len - 2, "}\n") == 0,
                          "%s does not end with }", files[k]);
        }
        free(text);
    }
    list_dir(dir, listing, sizeof listing);
    ck_assert_str_eq(listing, "after.dot|after.txt|before.dot|before.txt");

    /* A directory that does not exist: IO_ERROR, nothing left behind. */
    snprintf(path, sizeof path, "%s/missing/graph.txt", dir);
    FAILS(atmoe_graph_dump(g, path, ATMOE_DUMP_TEXT), ctx, IO_ERROR,
          "atmoe_graph_dump", "missing");
    FAILS(atmoe_graph_dump(g, path, ATMOE_DUMP_DOT), ctx, IO_ERROR,
          "atmoe_graph_dump");
    /* A path that is a directory: the temporary file goes. */
    snprintf(path, sizeof path, "%s/sub", dir);
    ck_assert_int_eq(mkdir(path, 0755), 0);
    FAILS(atmoe_graph_dump(g, path, ATMOE_DUMP_TEXT), ctx, IO_ERROR,
          "atmoe_graph_dump", "sub");
    list_dir(dir, listing, sizeof listing);
    ck_assert_str_eq(listing,
                     "after.dot|after.txt|before.dot|before.txt|sub");
    list_dir(path, listing, sizeof listing);
    ck_assert_str_eq(listing, "");

    /* A path longer than the system takes. */
    {
        size_t len = strlen(dir);
        char *long_path = xmalloc(len + PATH_MAX + 16);
        memcpy(long_path, dir, len);
        long_path[len] = '/';
        memset(long_path + len + 1, 'a', PATH_MAX + 8);
        long_path[len + 1 + PATH_MAX + 8] = '\0';
        FAILS(atmoe_graph_dump(g, long_path, ATMOE_DUMP_TEXT), ctx, IO_ERROR,
              "atmoe_graph_dump");
        free(long_path);
    }
    list_dir(dir, listing, sizeof listing);
    ck_assert_str_eq(listing,
                     "after.dot|after.txt|before.dot|before.txt|sub");

    /* Formats outside the enum write nothing. */
    snprintf(path, sizeof path, "%s/bad.txt", dir);
    FAILS(atmoe_graph_dump(g, path, (atmoe_dump_format)7), ctx,
          INVALID_ARGUMENT, "atmoe_graph_dump", "7");
    FAILS(atmoe_graph_dump(g, path, (atmoe_dump_format)-1), ctx,
          INVALID_ARGUMENT, "atmoe_graph_dump");
    list_dir(dir, listing, sizeof listing);
    ck_assert_str_eq(listing,
                     "after.dot|after.txt|before.dot|before.txt|sub");

    atmoe_graph_free(g);
    test_rmdir_r(dir);
}

/* ------------------------------------------------------------------------ */
/* Profiles                                                                  */
/* ------------------------------------------------------------------------ */

static void profile(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    small_params p;
    small_params_init(&p, 13);
    small_graph sg;
    small_build(ctx, g, &p, 1, &sg);
    OK(atmoe_graph_plan(g, 0));
    OK(atmoe_graph_set_profiling(g, 1));
    const size_t b = 5;
    float x[SM_B * SM_D];
    test_rng rng;
    test_rng_seed(&rng, 14);
    test_fill_uniform(&rng, x, b * SM_D, -1, 1);
    small_out o;
    small_run(ctx, g, &sg, x, b, b, &o);
    small_check(&p, x, b, &o, "profiled");

    atmoe_graph_memory mem;
    OK(atmoe_graph_get_memory(g, &mem));
    ck_assert_uint_eq(mem.nodes_computed, SM_NODES - 1);
    int seen[SM_NODES] = {0};
    double total_ms = 0;
    for (size_t i = 0; i < mem.nodes_computed; i++) {
        atmoe_node_profile prof;
        memset(&prof, 0x5a, sizeof prof);
        OK(atmoe_graph_get_profile(g, i, &prof));
        ck_assert_int_ge(prof.node, 0);
        ck_assert_int_lt(prof.node, SM_NODES);
        ck_assert_msg(!seen[prof.node], "node %d profiled twice", prof.node);
        seen[prof.node] = 1;
        ck_assert_msg(prof.node != sg.dg, "the unneeded node was computed");
        ck_assert_ptr_nonnull(prof.op);
        ck_assert_msg(prof.op[0] != '\0', "node %d: no operation name",
                      prof.node);
        if (sg.op[prof.node])
            ck_assert_str_eq(prof.op, sg.op[prof.node]);
        ck_assert_str_eq(prof.name, sg.name[prof.node]);
        ck_assert_msg(isfinite(prof.ms) && prof.ms >= 0,
                      "node '%s': %g ms", prof.name, prof.ms);
        total_ms += prof.ms;
        if (prof.node == sg.h) {
            /* [5, 17] x [6, 17]^T + [6] */
            ck_assert_uint_eq(prof.flops, 2 * b * SM_H * SM_D + b * SM_H);
            ck_assert_uint_eq(prof.bytes, (b * SM_D + SM_H * SM_D + SM_H +
                                           b * SM_H) * sizeof(float));
        }
        if (prof.node == sg.u) {
            /* [4, 17] x [17, 5] */
            ck_assert_uint_eq(prof.flops, 2 * SM_U * b * SM_D);
            ck_assert_uint_eq(prof.bytes,
                              (SM_U * SM_D + SM_D * b + SM_U * b) *
                                  sizeof(float));
        }
        if (strcmp(prof.op, "softmax") == 0 || strcmp(prof.op, "silu") == 0)
            ck_assert_uint_gt(prof.bytes, 0);
    }
    for (int i = 0; i < SM_NODES; i++)
        ck_assert_msg(seen[i] || i == sg.dg, "node %d was not profiled", i);
    ck_assert_msg(total_ms > 0, "no node took any time");
    atmoe_node_profile prof;
    FAILS(atmoe_graph_get_profile(g, mem.nodes_computed, &prof), ctx,
          OUT_OF_RANGE, "atmoe_graph_get_profile");
    FAILS(atmoe_graph_get_profile(g, (size_t)-1, &prof), ctx, OUT_OF_RANGE,
          "atmoe_graph_get_profile");

    /* With profiling off, no times but the same costs. */
    OK(atmoe_graph_set_profiling(g, 0));
    small_run(ctx, g, &sg, x, b, b, &o);
    for (size_t i = 0; i < mem.nodes_computed; i++) {
        OK(atmoe_graph_get_profile(g, i, &prof));
        ck_assert_msg(prof.ms == 0, "node '%s': %g ms without profiling",
                      prof.name, prof.ms);
        if (prof.node == sg.h)
            ck_assert_uint_eq(prof.flops, 2 * b * SM_H * SM_D + b * SM_H);
    }
    atmoe_graph_free(g);
}

/* ------------------------------------------------------------------------ */
/* Changing a planned graph                                                  */
/* ------------------------------------------------------------------------ */

static void replan(atmoe_context *ctx)
{
    atmoe_graph *g = new_graph(ctx);
    small_params p;
    small_params_init(&p, 17);
    small_graph sg;
    small_build(ctx, g, &p, 0, &sg);
    OK(atmoe_graph_plan(g, 0));
    float x[SM_B * SM_D], buf[SM_B * SM_D];
    test_rng rng;
    test_rng_seed(&rng, 18);
    test_fill_uniform(&rng, x, SM_B * SM_D, -1, 1);
    small_out o;
    small_run(ctx, g, &sg, x, 6, 6, &o);
    small_check(&p, x, 6, &o, "first plan");

    /* A failed addition changes nothing: the plan stays. */
    atmoe_node z = 12345;
    ck_assert_fails(atmoe_graph_add(g, sg.y, sg.s, &z), ctx,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    OK(atmoe_graph_compute(g, 6));
    atmoe_graph_memory mem;
    OK(atmoe_graph_get_memory(g, &mem));
    ck_assert_uint_eq(mem.nodes_computed, SM_NODES - 1);

    /* A new node discards the plan. */
    OK(atmoe_graph_scale(g, sg.y, 2.0f, &z));
    FAILS(atmoe_graph_compute(g, 6), ctx, INVALID_ARGUMENT,
          "atmoe_graph_compute", "plan");
    FAILS(atmoe_graph_get_memory(g, &mem), ctx, INVALID_ARGUMENT,
          "atmoe_graph_get_memory");
    FAILS(atmoe_graph_read(g, sg.y, buf, 6 * SM_D * sizeof(float)), ctx,
          INVALID_ARGUMENT, "atmoe_graph_read");
    FAILS(atmoe_graph_set_input(g, sg.x, x, 6 * SM_D * sizeof(float), 6), ctx,
          INVALID_ARGUMENT, "atmoe_graph_set_input");

    /* Planned again (the dangling z counts as not needed), inputs must be
     * set again, and then everything works. */
    atmoe_memory_stats before, after;
    memory_stats(ctx, &before);
    OK(atmoe_graph_plan(g, 0));
    memory_stats(ctx, &after);
    OK(atmoe_graph_get_memory(g, &mem));
    ck_assert_uint_eq(after.allocations, before.allocations + 1);
    ck_assert_uint_eq(after.allocated_bytes,
                      before.allocated_bytes + mem.arena_bytes);
    ck_assert_uint_eq(mem.nodes_computed, SM_NODES - 1);
    FAILS(atmoe_graph_compute(g, 6), ctx, INVALID_ARGUMENT,
          "atmoe_graph_compute", "never set");
    small_run(ctx, g, &sg, x, 6, 6, &o);
    small_check(&p, x, 6, &o, "second plan");

    /* Marking an output discards the plan too. */
    OK(atmoe_graph_mark_output(g, z));
    FAILS(atmoe_graph_compute(g, 6), ctx, INVALID_ARGUMENT,
          "atmoe_graph_compute");
    OK(atmoe_graph_plan(g, 0));
    OK(atmoe_graph_get_memory(g, &mem));
    ck_assert_uint_eq(mem.nodes_computed, SM_NODES);
    small_run(ctx, g, &sg, x, 6, 6, &o);
    small_check(&p, x, 6, &o, "third plan");
    float zz[6 * SM_D];
    OK(atmoe_graph_read(g, z, zz, sizeof zz));
    for (size_t i = 0; i < 6 * SM_D; i++)
        ck_assert_float_eq(zz[i], 2.0f * o.y[i]);
    atmoe_graph_free(g);
}

/* ------------------------------------------------------------------------ */

/* Each test runs its parts on one context (opening the device costs more
 * than most parts), then reports the collected message checks. */
typedef void (*part_fn)(atmoe_context *ctx);

static void run_parts(const part_fn *parts, size_t count)
{
    soft_reset();
    atmoe_context *ctx = test_context();
    for (size_t i = 0; i < count; i++)
        parts[i](ctx);
    atmoe_context_free(ctx); /* before a failure can skip it */
    soft_done();
}

#define PARTS(...)                                                            \
    do {                                                                      \
        static const part_fn parts_[] = {__VA_ARGS__};                        \
        run_parts(parts_, sizeof parts_ / sizeof parts_[0]);                  \
    } while (0)

START_TEST(test_operand_errors)
{
    PARTS(matmul_errors, elementwise_errors, reduction_errors, rows_errors,
          layout_errors);
}
END_TEST

START_TEST(test_node_and_null_errors)
{
    PARTS(bad_node_ids, null_graph, null_arguments);
}
END_TEST

START_TEST(test_name_and_batch_errors)
{
    PARTS(duplicate_names, batch_errors);
}
END_TEST

START_TEST(test_plan_and_compute_errors)
{
    PARTS(plan_errors, compute_errors);
}
END_TEST

START_TEST(test_names)
{
    PARTS(names, errmsg_after_success);
}
END_TEST

START_TEST(test_default_names)
{
    PARTS(default_names, default_names_avoid_given_ones);
}
END_TEST

START_TEST(test_planner)
{
    /* The reshape of storage last: it fails hard. */
    PARTS(planner_chain, planner_aliasing, planner_storage_reshape);
}
END_TEST

START_TEST(test_steady_state)
{
    PARTS(steady_state);
}
END_TEST

START_TEST(test_parameters_and_replanning)
{
    PARTS(parameter_updates, replan);
}
END_TEST

START_TEST(test_dump_and_profile)
{
    PARTS(dump, profile);
}
END_TEST

static Suite *graph_suite(void)
{
    Suite *s = suite_create("graph");
    TCase *tc;

    tc = tcase_create("errors");
    tcase_add_test(tc, test_operand_errors);
    tcase_add_test(tc, test_node_and_null_errors);
    tcase_add_test(tc, test_name_and_batch_errors);
    tcase_add_test(tc, test_plan_and_compute_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("names");
    tcase_add_test(tc, test_names);
    tcase_add_test(tc, test_default_names);
    suite_add_tcase(s, tc);

    tc = tcase_create("planner");
    tcase_add_test(tc, test_planner);
    suite_add_tcase(s, tc);

    tc = tcase_create("execution");
    tcase_add_test(tc, test_steady_state);
    tcase_add_test(tc, test_parameters_and_replanning);
    suite_add_tcase(s, tc);

    tc = tcase_create("introspection");
    tcase_add_test(tc, test_dump_and_profile);
    suite_add_tcase(s, tc);

    return s;
}

int main(void)
{
    return test_run_suite(graph_suite());
}
