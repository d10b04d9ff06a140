/* Tests of the compute graph's operations: every operation runs its real
 * kernels (or CLBlast) on the default device and is compared with a float64
 * reference computed here from the same f32 data.
 *
 * Each case builds a graph around one operation, plans it, computes it once
 * on decoy data (the real data reversed and negated), then on the real data,
 * and reads the outputs into host buffers poisoned first (NaN for f32, a
 * value no index takes for i32, all-ones bytes for the exact byte checks),
 * so that an element the library never writes, or a result left over from
 * the decoy compute, fails.  Operands come in several forms (variants):
 * inputs, parameters (updated between the two computes), constants, and
 * any of those passed through scale(1) first, which makes them
 * intermediates that the planner may overwrite in place or recycle.
 * Shapes are odd on purpose (7x13, 3x5x11, 37x29, ...), inputs are random
 * in ranges like [-3, 3), and NaN never passes a comparison.
 *
 * Check's fork mode runs each START_TEST in a process of its own, which
 * pays PoCL's start-up and CLBlast's compile again, so each test case runs
 * several of the check_ functions on one context.
 *
 * Tolerances are named constants below, each with the error analysis that
 * sets it.  Element-wise results are compared relative to the reference;
 * sums (GEMM, mean, layernorm, scatter-add) relative to the scale their
 * rounding error grows with, as lib/selfcheck.c does for the GEMM. */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* ------------------------------------------------------------------------ */
/* Tolerances                                                                */
/* ------------------------------------------------------------------------ */

/* add, mul, scale: one correctly rounded f32 operation on f32 operands, so
 * the result is within half an ulp (2^-24 = 6e-8 relative) of the exact
 * value; 1e-6 only allows for a compiler that contracts differently. */
#define TOL_ARITH 1e-6
/* sigmoid and silu: exp (at most 3 ulp in OpenCL's full profile), an add,
 * a divide (2.5 ulp) and for silu a multiply: about 8 ulp, 5e-7; relative,
 * with a floor of 1e-30 so that sigmoid(-100) = 3.7e-44, which f32 flushes
 * or holds as a subnormal, needs only be tiny. */
#define TOL_ACT 2e-6
#define ACT_FLOOR 1e-30
/* GELU in its exact form 0.5 x (1 + erf(x / sqrt 2)): erf is within 16 ulp
 * (about 1e-6 absolute near +-1), and for x << 0 the sum 1 + erf cancels,
 * so no f32 erf form is accurate relative to the tiny result there; the
 * error is measured against |x|, the scale of the result (|Phi| <= 1). */
#define TOL_GELU 2e-6
/* softmax: exp per element (3 ulp), a float sum of n terms (n eps relative
 * at worst, n <= 41 here: 2.5e-6) and a multiply; relative, floor 1e-30. */
#define TOL_SOFTMAX 1e-5
/* rmsnorm and l2norm: a float sum of n squares (n eps / 2 relative on the
 * norm at worst, n <= 37: 1.1e-6), a sqrt or rsqrt (2-3 ulp), a divide or
 * multiply and the weight; relative. */
#define TOL_NORM 1e-5
/* layernorm: x - mean cancels, so the error is measured against the
 * output's scale |w| (|xhat| + 1) + |b| (xhat the normalised value), which
 * the mean's and variance's rounding errors are relative to. */
#define TOL_LAYERNORM 1e-5
/* layernorm of rows near 1000 (+-3): each of the n adds of the f32 sum
 * rounds by up to half an ulp of n 1000, so the mean may be off by
 * n 1000 2^-25 = 8.6e-4 (n = 29), 5e-4 of the rows' sigma (1.7), in the
 * worst case, far less typically; the one-pass E[x^2] - E[x]^2 would be off
 * by whole units (or NaN). */
#define TOL_LAYERNORM_OFFSET 2e-3
/* mean: a float sum of n terms; measured against mean |x|. */
#define TOL_MEAN 1e-5
/* matmul: each element against sum_k |a_ik b_kj| (+ |bias_j|), the scale
 * its rounding error grows with, as lib/selfcheck.c does (k <= 29 here). */
#define TOL_GEMM 1e-5
/* scatter_add_rows: up to 3 float adds per element in an unspecified
 * order, each within half an ulp of its partial sum; measured against
 * |dst| + sum |src| over the rows added there. */
#define TOL_SCATTER 1e-6
/* topk values, gather_rows and the data-movement operations copy elements:
 * exact. */
#define TOL_EXACT 0.0

/* ------------------------------------------------------------------------ */
/* Host helpers                                                              */
/* ------------------------------------------------------------------------ */

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    ck_assert_msg(p != NULL, "out of host memory (%zu bytes)", bytes);
    return p;
}

static size_t count_of(int ndim, const size_t *shape)
{
    size_t n = 1;
    for (int i = 0; i < ndim; i++)
        n *= shape[i];
    return n;
}

static const char *shape_str(int ndim, const size_t *shape, char *buf,
                             size_t size)
{
    size_t len = 0;
    len += (size_t)snprintf(buf + len, size - len, "[");
    for (int i = 0; i < ndim && len < size; i++)
        len += (size_t)snprintf(buf + len, size - len, "%s%zu", i ? "," : "",
                                shape[i]);
    if (len < size)
        snprintf(buf + len, size - len, "]");
    return buf;
}

/* Outer, n, inner around dimension d. */
static void split3(int ndim, const size_t *shape, int d, size_t *outer,
                   size_t *n, size_t *inner)
{
    *outer = *inner = 1;
    for (int i = 0; i < d; i++)
        *outer *= shape[i];
    *n = shape[d];
    for (int i = d + 1; i < ndim; i++)
        *inner *= shape[i];
}

static void unravel(size_t i, int ndim, const size_t *shape, size_t *idx)
{
    for (int d = ndim - 1; d >= 0; d--) {
        idx[d] = i % shape[d];
        i /= shape[d];
    }
}

static size_t ravel(int ndim, const size_t *shape, const size_t *idx)
{
    size_t i = 0;
    for (int d = 0; d < ndim; d++)
        i = i * shape[d] + idx[d];
    return i;
}

static float *rand_f32(test_rng *rng, size_t n, double lo, double hi)
{
    float *x = xmalloc(n * sizeof *x);
    test_fill_uniform(rng, x, n, lo, hi);
    return x;
}

/* The half nearest x, ties to even (as in test_tensor.c). */
static uint16_t half_from_double(double x)
{
    uint16_t sign = signbit(x) ? 0x8000 : 0;
    double a = fabs(x);
    if (a >= 65520.0)
        return sign | 0x7c00;
    int k = -14;
    if (a > 0) {
        int e;
        frexp(a, &e);
        if (e - 1 > k)
            k = e - 1;
    }
    double r = nearbyint(ldexp(a, 10 - k));
    return (uint16_t)(sign | (unsigned)(((k + 14) << 10) + (int)r));
}

static double half_to_double(uint16_t h)
{
    int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    double v = exp == 0 ? ldexp(man, -24) : ldexp(man + 1024, exp - 25);
    return (h & 0x8000) ? -v : v;
}

/* Largest |got - want| / max(scale, 1e-30): the error measured against a
 * per-element scale; +inf when an element of got is not finite. */
static double max_scaled_err(const float *got, const double *want,
                             const double *scale, size_t n)
{
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            return INFINITY;
        double e = fabs(got[i] - want[i]) / fmax(scale[i], 1e-30);
        if (e > worst)
            worst = e;
    }
    return worst;
}

/* Prints measured errors when ATMOE_TEST_VERBOSE is set (for tuning). */
static void note_err(const char *what, const char *label, double err)
{
    const char *v = getenv("ATMOE_TEST_VERBOSE");
    if (v && *v)
        fprintf(stderr, "  %-60.60s %-12s %.3g\n", what, label, err);
}

/* Fails unless got is within tol of want: relative with a floor when scale
 * is NULL (test_max_rel_err), else against scale[i]. */
static void expect_close(const char *what, const char *label,
                         const float *got, const double *want,
                         const double *scale, size_t n, double floor,
                         double tol)
{
    double err = scale ? max_scaled_err(got, want, scale, n)
                       : test_max_rel_err(got, want, n, floor);
    note_err(what, label, err);
    if (err <= tol)
        return;
    size_t worst = 0;
    double we = -1;
    for (size_t i = 0; i < n; i++) {
        double e = !isfinite(got[i])
                       ? INFINITY
                       : fabs(got[i] - want[i]) /
                             (scale ? fmax(scale[i], 1e-30)
                                    : fmax(fabs(want[i]), floor));
        if (e > we) {
            we = e;
            worst = i;
        }
        if (isinf(e))
            break;
    }
    ck_abort_msg("%s: %s: error %.3g > %.3g; worst element %zu of %zu: "
                 "got %.9g, want %.9g",
                 what, label, err, tol, worst, n, (double)got[worst],
                 want[worst]);
}

static void expect_ints(const char *what, const char *label,
                        const int32_t *got, const int32_t *want, size_t n)
{
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(got[i] == want[i],
                      "%s: %s: element %zu of %zu is %d, want %d", what,
                      label, i, n, (int)got[i], (int)want[i]);
}

/* ------------------------------------------------------------------------ */
/* The harness: one graph around one operation                              */
/* ------------------------------------------------------------------------ */

enum { K_INPUT, K_PARAM, K_CONST };

typedef struct variant {
    const char *name;
    int kind;      /* what the operands are */
    int prescale;  /* f32 operands pass through scale(1) first */
    unsigned flags; /* of atmoe_graph_plan */
} variant;

static const variant variants[] = {
    {"inputs", K_INPUT, 0, 0},
    {"inputs via scale(1), in place allowed", K_INPUT, 1, 0},
    {"parameters", K_PARAM, 0, 0},
    {"constants", K_CONST, 0, 0},
    {"parameters via scale(1), no in-place", K_PARAM, 1,
     ATMOE_PLAN_NO_INPLACE},
    {"constants via scale(1), no reuse", K_CONST, 1, ATMOE_PLAN_NO_REUSE},
};
#define N_VARIANTS (sizeof variants / sizeof variants[0])

#define MAX_OPERANDS 4
#define MAX_OUTPUTS 2

typedef struct operand {
    atmoe_dtype dtype;
    int kind;
    size_t count;
    const void *data;
    void *decoy;
    atmoe_node node;     /* the input, parameter or constant */
    atmoe_tensor *param; /* K_PARAM: the caller's tensor */
} operand;

typedef struct harness {
    atmoe_context *ctx;
    atmoe_graph *g;
    const variant *v;
    char what[256]; /* the case, for messages */
    int n;
    operand op[MAX_OPERANDS];
    int nout;
    void *out[MAX_OUTPUTS];
    size_t out_count[MAX_OUTPUTS];
    int exact_poison; /* poison outputs with all-ones bytes */
} harness;

static void h_begin(harness *h, atmoe_context *ctx, const variant *v,
                    const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void h_begin(harness *h, atmoe_context *ctx, const variant *v,
                    const char *fmt, ...)
{
    memset(h, 0, sizeof *h);
    h->ctx = ctx;
    h->v = v;
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(h->what, sizeof h->what, fmt, ap);
    va_end(ap);
    if (len >= 0 && (size_t)len < sizeof h->what)
        snprintf(h->what + len, sizeof h->what - (size_t)len, " (%s)",
                 v->name);
    ck_assert_status(atmoe_graph_new(ctx, &h->g), ctx);
}

/* The decoy of an operand: its elements reversed, and f32 ones negated. */
static void make_decoy(void *decoy, const void *data, size_t count,
                       atmoe_dtype dtype)
{
    size_t es = atmoe_dtype_size(dtype);
    const unsigned char *s = data;
    unsigned char *d = decoy;
    for (size_t i = 0; i < count; i++)
        memcpy(d + i * es, s + (count - 1 - i) * es, es);
    if (dtype == ATMOE_DTYPE_F32) {
        float *f = decoy;
        for (size_t i = 0; i < count; i++)
            f[i] = -f[i];
    }
}

/* An operand of the variant's kind (or of kind `kind` when >= 0), holding
 * data; returns the node an operation should read (through scale(1) in the
 * prescale variants, for f32). */
static atmoe_node h_operand_kind(harness *h, int kind, atmoe_dtype dtype,
                                 int ndim, const size_t *shape,
                                 const void *data)
{
    ck_assert_msg(h->n < MAX_OPERANDS, "too many operands");
    operand *o = &h->op[h->n];
    o->dtype = dtype;
    o->kind = kind < 0 ? h->v->kind : kind;
    o->count = count_of(ndim, shape);
    o->data = data;
    size_t bytes = o->count * atmoe_dtype_size(dtype);
    o->decoy = xmalloc(bytes);
    make_decoy(o->decoy, data, o->count, dtype);
    char name[16];
    snprintf(name, sizeof name, "x%d", h->n);
    h->n++;
    switch (o->kind) {
    case K_INPUT:
        ck_assert_status(atmoe_graph_input(h->g, name, dtype, ndim, shape, 0,
                                           &o->node),
                         h->ctx);
        break;
    case K_PARAM:
        ck_assert_status(atmoe_tensor_new(h->ctx, dtype, ndim, shape,
                                          &o->param),
                         h->ctx);
        ck_assert_status(atmoe_graph_parameter(h->g, name, o->param,
                                               &o->node),
                         h->ctx);
        break;
    default:
        ck_assert_status(atmoe_graph_constant(h->g, name, dtype, ndim, shape,
                                              data, &o->node),
                         h->ctx);
        break;
    }
    atmoe_node n = o->node;
    if (h->v->prescale && dtype == ATMOE_DTYPE_F32)
        ck_assert_status(atmoe_graph_scale(h->g, n, 1.0f, &n), h->ctx);
    return n;
}

static atmoe_node h_operand(harness *h, atmoe_dtype dtype, int ndim,
                            const size_t *shape, const void *data)
{
    return h_operand_kind(h, -1, dtype, ndim, shape, data);
}

static atmoe_node h_f32(harness *h, int ndim, const size_t *shape,
                        const float *data)
{
    return h_operand(h, ATMOE_DTYPE_F32, ndim, shape, data);
}

static void expect_shape(const harness *h, atmoe_node node, int ndim,
                         const size_t *shape, atmoe_dtype dtype)
{
    int nd = 0;
    size_t s[ATMOE_MAX_DIMS] = {0};
    atmoe_dtype dt = ATMOE_DTYPE_F32;
    ck_assert_status(atmoe_graph_get_shape(h->g, node, &nd, s, &dt), h->ctx);
    char a[64], b[64];
    ck_assert_msg(nd == ndim && dt == dtype &&
                      memcmp(s, shape, (size_t)ndim * sizeof *s) == 0,
                  "%s: node has shape %s %s, want %s %s", h->what,
                  shape_str(nd, s, a, sizeof a), atmoe_dtype_name(dt),
                  shape_str(ndim, shape, b, sizeof b),
                  atmoe_dtype_name(dtype));
}

/* Sets every input and parameter to its decoy or real data. */
static void h_set(harness *h, int decoy)
{
    for (int i = 0; i < h->n; i++) {
        operand *o = &h->op[i];
        const void *src = decoy ? o->decoy : o->data;
        size_t bytes = o->count * atmoe_dtype_size(o->dtype);
        if (o->kind == K_INPUT)
            ck_assert_status(atmoe_graph_set_input(h->g, o->node, src, bytes,
                                                   0),
                             h->ctx);
        else if (o->kind == K_PARAM)
            ck_assert_status(atmoe_tensor_write(o->param, src, bytes),
                             h->ctx);
    }
}

static void poison(void *buf, size_t count, atmoe_dtype dtype, int exact)
{
    if (exact) {
        memset(buf, 0xff, count * atmoe_dtype_size(dtype));
    } else if (dtype == ATMOE_DTYPE_I32) {
        int32_t *p = buf;
        for (size_t i = 0; i < count; i++)
            p[i] = 0x7fc0dead;
    } else {
        test_poison(buf, count);
    }
}

/* Marks outs as outputs, plans, computes on the decoys and then on the real
 * data, and reads the outputs into h->out[] (poisoned first). */
static void h_run(harness *h, int nout, const atmoe_node *outs)
{
    ck_assert(nout <= MAX_OUTPUTS);
    atmoe_dtype dt[MAX_OUTPUTS];
    size_t bytes[MAX_OUTPUTS];
    for (int i = 0; i < nout; i++) {
        int nd;
        size_t s[ATMOE_MAX_DIMS];
        ck_assert_status(atmoe_graph_mark_output(h->g, outs[i]), h->ctx);
        ck_assert_status(atmoe_graph_get_shape(h->g, outs[i], &nd, s, &dt[i]),
                         h->ctx);
        h->out_count[i] = count_of(nd, s);
        bytes[i] = h->out_count[i] * atmoe_dtype_size(dt[i]);
        h->out[i] = xmalloc(bytes[i]);
    }
    h->nout = nout;
    atmoe_status st = atmoe_graph_plan(h->g, h->v->flags);
    ck_assert_msg(st == ATMOE_STATUS_OK, "%s: atmoe_graph_plan -> %s: %s",
                  h->what, atmoe_status_name(st), atmoe_errmsg(h->ctx));

    for (int pass = 0; pass < 2; pass++) {
        h_set(h, pass == 0);
        for (int i = 0; i < nout; i++)
            poison(h->out[i], h->out_count[i], dt[i], h->exact_poison);
        st = atmoe_graph_compute(h->g, 0);
        ck_assert_msg(st == ATMOE_STATUS_OK,
                      "%s: atmoe_graph_compute -> %s: %s", h->what,
                      atmoe_status_name(st), atmoe_errmsg(h->ctx));
        for (int i = 0; i < nout; i++) {
            st = atmoe_graph_read(h->g, outs[i], h->out[i], bytes[i]);
            ck_assert_msg(st == ATMOE_STATUS_OK,
                          "%s: atmoe_graph_read (output %d) -> %s: %s",
                          h->what, i, atmoe_status_name(st),
                          atmoe_errmsg(h->ctx));
        }
    }
}

static void h_end(harness *h)
{
    atmoe_graph_free(h->g);
    for (int i = 0; i < h->n; i++) {
        atmoe_tensor_free(h->op[i].param);
        free(h->op[i].decoy);
    }
    for (int i = 0; i < h->nout; i++)
        free(h->out[i]);
    memset(h, 0, sizeof *h);
}

/* ------------------------------------------------------------------------ */
/* matmul                                                                    */
/* ------------------------------------------------------------------------ */

/* C = op(A) op(B) + bias in float64, and the scale of each element. */
static void ref_matmul(const float *a, const float *b, const float *bias,
                       unsigned flags, size_t m, size_t k, size_t n,
                       double *c, double *scale)
{
    int ta = !!(flags & ATMOE_MATMUL_TRANSPOSE_A);
    int tb = !!(flags & ATMOE_MATMUL_TRANSPOSE_B);
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j++) {
            double s = bias ? bias[j] : 0, sc = bias ? fabs(bias[j]) : 0;
            for (size_t p = 0; p < k; p++) {
                double av = ta ? a[p * m + i] : a[i * k + p];
                double bv = tb ? b[j * k + p] : b[p * n + j];
                s += av * bv;
                sc += fabs(av * bv);
            }
            c[i * n + j] = s;
            scale[i * n + j] = sc;
        }
}

static void check_matmul(atmoe_context *ctx)
{
    static const size_t shapes[][3] = {
        {7, 13, 5}, {37, 29, 11}, {1, 9, 23}, {19, 1, 6}};
    test_rng rng;
    test_rng_seed(&rng, 11);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            for (unsigned flags = 0; flags < 4; flags++)
                for (int with_bias = 0; with_bias < 2; with_bias++) {
                    size_t m = shapes[s][0], k = shapes[s][1],
                           n = shapes[s][2];
                    int ta = !!(flags & ATMOE_MATMUL_TRANSPOSE_A);
                    int tb = !!(flags & ATMOE_MATMUL_TRANSPOSE_B);
                    size_t sa[2] = {ta ? k : m, ta ? m : k};
                    size_t sb[2] = {tb ? n : k, tb ? k : n};
                    float *a = rand_f32(&rng, m * k, -3, 3);
                    float *b = rand_f32(&rng, k * n, -3, 3);
                    float *bias = rand_f32(&rng, n, -3, 3);
                    harness h;
                    h_begin(&h, ctx, &variants[v],
                            "matmul %zux%zux%zu flags %u%s", m, k, n, flags,
                            with_bias ? " with bias" : "");
                    atmoe_node na = h_f32(&h, 2, sa, a);
                    atmoe_node nb = h_f32(&h, 2, sb, b);
                    atmoe_node nc = with_bias ? h_f32(&h, 1, &n, bias)
                                              : ATMOE_NODE_NONE;
                    atmoe_node out;
                    ck_assert_status(atmoe_graph_matmul(h.g, na, nb, nc,
                                                        flags, &out),
                                     ctx);
                    size_t so[2] = {m, n};
                    expect_shape(&h, out, 2, so, ATMOE_DTYPE_F32);
                    h_run(&h, 1, &out);
                    double *want = xmalloc(m * n * sizeof *want);
                    double *scale = xmalloc(m * n * sizeof *scale);
                    ref_matmul(a, b, with_bias ? bias : NULL, flags, m, k, n,
                               want, scale);
                    expect_close(h.what, "C", h.out[0], want, scale, m * n,
                                 0, TOL_GEMM);
                    free(want);
                    free(scale);
                    h_end(&h);
                    free(a);
                    free(b);
                    free(bias);
                }
}

/* Both operands the same node: X X^T and X^T X. */
static void check_matmul_same_operand(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 12);
    const size_t r = 7, c = 13, sx[2] = {7, 13};
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (int t = 0; t < 2; t++) {
            unsigned flags = t ? ATMOE_MATMUL_TRANSPOSE_A
                               : ATMOE_MATMUL_TRANSPOSE_B;
            float *x = rand_f32(&rng, r * c, -3, 3);
            harness h;
            h_begin(&h, ctx, &variants[v], "matmul of [7,13] with itself, "
                    "flags %u", flags);
            atmoe_node nx = h_f32(&h, 2, sx, x), out;
            ck_assert_status(atmoe_graph_matmul(h.g, nx, nx, ATMOE_NODE_NONE,
                                                flags, &out),
                             ctx);
            size_t m = t ? c : r, k = t ? r : c;
            size_t so[2] = {m, m};
            expect_shape(&h, out, 2, so, ATMOE_DTYPE_F32);
            h_run(&h, 1, &out);
            double *want = xmalloc(m * m * sizeof *want);
            double *scale = xmalloc(m * m * sizeof *scale);
            ref_matmul(x, x, NULL, flags, m, k, m, want, scale);
            expect_close(h.what, "C", h.out[0], want, scale, m * m, 0,
                         TOL_GEMM);
            free(want);
            free(scale);
            h_end(&h);
            free(x);
        }
}

/* ------------------------------------------------------------------------ */
/* add, mul, scale                                                           */
/* ------------------------------------------------------------------------ */

typedef struct bcase {
    int na;
    size_t sa[4];
    int nb;
    size_t sb[4];
} bcase;

static const bcase bcases[] = {
    {2, {7, 13}, 2, {7, 13}},
    {3, {3, 5, 11}, 3, {3, 5, 11}},
    {1, {37}, 1, {37}},
    {4, {2, 3, 5, 7}, 4, {2, 3, 5, 7}},
    {2, {37, 29}, 1, {29}},        /* [T,d] op [d] */
    {2, {37, 1}, 2, {37, 29}},     /* [T,1] op [T,d] */
    {2, {37, 29}, 2, {37, 1}},     /* [T,d] op [T,1] */
    {3, {3, 1, 5}, 2, {4, 1}},     /* both broadcast: [3,4,5] */
    {4, {2, 1, 5, 1}, 3, {3, 1, 7}}, /* [2,3,5,7] */
    {1, {1}, 3, {3, 5, 11}},       /* a single element */
    {3, {3, 5, 11}, 3, {1, 5, 1}},
};
#define N_BCASES (sizeof bcases / sizeof bcases[0])

/* numpy's broadcast of a and b, in float64. */
static size_t ref_binary(int mul, const bcase *c, const float *a,
                         const float *b, int *nd_out, size_t *shape_out,
                         double **out)
{
    int nd = c->na > c->nb ? c->na : c->nb;
    size_t ea[4], eb[4];
    for (int i = 0; i < nd; i++) {
        int ia = i - (nd - c->na), ib = i - (nd - c->nb);
        ea[i] = ia >= 0 ? c->sa[ia] : 1;
        eb[i] = ib >= 0 ? c->sb[ib] : 1;
        shape_out[i] = ea[i] > eb[i] ? ea[i] : eb[i];
    }
    *nd_out = nd;
    size_t n = count_of(nd, shape_out);
    double *w = xmalloc(n * sizeof *w);
    size_t idx[4], ia[4], ib[4];
    for (size_t i = 0; i < n; i++) {
        unravel(i, nd, shape_out, idx);
        for (int d = 0; d < nd; d++) {
            ia[d] = ea[d] == 1 ? 0 : idx[d];
            ib[d] = eb[d] == 1 ? 0 : idx[d];
        }
        double x = a[ravel(nd, ea, ia)], y = b[ravel(nd, eb, ib)];
        w[i] = mul ? x * y : x + y;
    }
    *out = w;
    return n;
}

static void check_add_mul(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 21);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < N_BCASES; c++)
            for (int mul = 0; mul < 2; mul++) {
                const bcase *bc = &bcases[c];
                size_t na = count_of(bc->na, bc->sa),
                       nb = count_of(bc->nb, bc->sb);
                float *a = rand_f32(&rng, na, -3, 3);
                float *b = rand_f32(&rng, nb, -3, 3);
                char s1[64], s2[64];
                harness h;
                h_begin(&h, ctx, &variants[v], "%s %s %s",
                        shape_str(bc->na, bc->sa, s1, sizeof s1),
                        mul ? "*" : "+",
                        shape_str(bc->nb, bc->sb, s2, sizeof s2));
                atmoe_node xa = h_f32(&h, bc->na, bc->sa, a);
                atmoe_node xb = h_f32(&h, bc->nb, bc->sb, b);
                atmoe_node out;
                ck_assert_status(mul ? atmoe_graph_mul(h.g, xa, xb, &out)
                                     : atmoe_graph_add(h.g, xa, xb, &out),
                                 ctx);
                int nd;
                size_t so[4];
                double *want;
                size_t n = ref_binary(mul, bc, a, b, &nd, so, &want);
                expect_shape(&h, out, nd, so, ATMOE_DTYPE_F32);
                h_run(&h, 1, &out);
                expect_close(h.what, "out", h.out[0], want, NULL, n, 1e-30,
                             TOL_ARITH);
                free(want);
                h_end(&h);
                free(a);
                free(b);
            }
}

/* The same node on both sides: x + x and x * x (in place over one
 * operand's memory that the other reads too). */
static void check_add_mul_same_operand(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 22);
    const size_t s[3] = {3, 5, 11}, n = 165;
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (int mul = 0; mul < 2; mul++) {
            float *x = rand_f32(&rng, n, -3, 3);
            harness h;
            h_begin(&h, ctx, &variants[v], "x %s x, [3,5,11]",
                    mul ? "*" : "+");
            atmoe_node nx = h_f32(&h, 3, s, x), out;
            ck_assert_status(mul ? atmoe_graph_mul(h.g, nx, nx, &out)
                                 : atmoe_graph_add(h.g, nx, nx, &out),
                             ctx);
            h_run(&h, 1, &out);
            double want[165];
            for (size_t i = 0; i < n; i++)
                want[i] = mul ? (double)x[i] * x[i] : 2.0 * x[i];
            expect_close(h.what, "out", h.out[0], want, NULL, n, 1e-30,
                         TOL_ARITH);
            h_end(&h);
            free(x);
        }
}

typedef struct ucase {
    int nd;
    size_t s[4];
} ucase;

static const ucase ucases[] = {
    {2, {7, 13}}, {3, {3, 5, 11}}, {1, {37}}, {4, {2, 3, 5, 7}}, {1, {1}},
};
#define N_UCASES (sizeof ucases / sizeof ucases[0])

static void check_scale(atmoe_context *ctx)
{
    static const float alphas[] = {-1.7f, 0.37f, 3.0f};
    test_rng rng;
    test_rng_seed(&rng, 31);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < N_UCASES; c++)
            for (size_t ai = 0; ai < 3; ai++) {
                const ucase *u = &ucases[c];
                size_t n = count_of(u->nd, u->s);
                float *x = rand_f32(&rng, n, -3, 3);
                char s1[64];
                harness h;
                h_begin(&h, ctx, &variants[v], "scale %s by %g",
                        shape_str(u->nd, u->s, s1, sizeof s1),
                        (double)alphas[ai]);
                atmoe_node nx = h_f32(&h, u->nd, u->s, x), out;
                ck_assert_status(atmoe_graph_scale(h.g, nx, alphas[ai], &out),
                                 ctx);
                expect_shape(&h, out, u->nd, u->s, ATMOE_DTYPE_F32);
                h_run(&h, 1, &out);
                double *want = xmalloc(n * sizeof *want);
                for (size_t i = 0; i < n; i++)
                    want[i] = (double)alphas[ai] * x[i];
                expect_close(h.what, "out", h.out[0], want, NULL, n, 1e-30,
                             TOL_ARITH);
                free(want);
                h_end(&h);
                free(x);
            }
}

/* ------------------------------------------------------------------------ */
/* silu, gelu, sigmoid                                                       */
/* ------------------------------------------------------------------------ */

enum { ACT_SILU, ACT_GELU, ACT_SIGMOID };
static const char *const act_names[] = {"silu", "gelu", "sigmoid"};

static double ref_sigmoid(double x)
{
    return x >= 0 ? 1 / (1 + exp(-x)) : exp(x) / (1 + exp(x));
}

static double ref_act(int act, double x)
{
    switch (act) {
    case ACT_SILU: return x * ref_sigmoid(x);
    case ACT_GELU: return 0.5 * x * erfc(-x / sqrt(2.0));
    default: return ref_sigmoid(x);
    }
}

/* Extremes: where exp overflows or underflows in f32, and around 0. */
static const float extremes[] = {
    -200, -100, -88.5f, -80, -30, -10, -3, -1e-3f, -0.0f, 0.0f, 1e-3f, 3,
    10, 30, 80, 88.5f, 100, 200};
#define N_EXTREMES (sizeof extremes / sizeof extremes[0])

static void run_act(atmoe_context *ctx, const variant *v, int act, int nd,
                    const size_t *shape, const float *x)
{
    size_t n = count_of(nd, shape);
    char s1[64];
    harness h;
    h_begin(&h, ctx, v, "%s %s", act_names[act],
            shape_str(nd, shape, s1, sizeof s1));
    atmoe_node nx = h_f32(&h, nd, shape, x), out;
    atmoe_status st = act == ACT_SILU   ? atmoe_graph_silu(h.g, nx, &out)
                      : act == ACT_GELU ? atmoe_graph_gelu(h.g, nx, &out)
                                        : atmoe_graph_sigmoid(h.g, nx, &out);
    ck_assert_status(st, ctx);
    expect_shape(&h, out, nd, shape, ATMOE_DTYPE_F32);
    h_run(&h, 1, &out);
    double *want = xmalloc(n * sizeof *want);
    double *scale = xmalloc(n * sizeof *scale);
    for (size_t i = 0; i < n; i++) {
        want[i] = ref_act(act, x[i]);
        scale[i] = fabs((double)x[i]);
    }
    if (act == ACT_GELU)
        expect_close(h.what, "out", h.out[0], want, scale, n, 0, TOL_GELU);
    else
        expect_close(h.what, "out", h.out[0], want, NULL, n, ACT_FLOOR,
                     TOL_ACT);
    free(want);
    free(scale);
    h_end(&h);
}

static void check_activations(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 41);
    const size_t sx[2] = {2, N_EXTREMES / 2};
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (int act = 0; act < 3; act++) {
            for (size_t c = 0; c < N_UCASES; c++) {
                const ucase *u = &ucases[c];
                float *x = rand_f32(&rng, count_of(u->nd, u->s), -3, 3);
                run_act(ctx, &variants[v], act, u->nd, u->s, x);
                free(x);
            }
            run_act(ctx, &variants[v], act, 2, sx, extremes);
        }
}

/* ------------------------------------------------------------------------ */
/* softmax                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct dcase {
    int nd;
    size_t s[4];
    int dim;
} dcase;

static const dcase softmax_cases[] = {
    {2, {7, 13}, -1}, {2, {7, 13}, 0},     {3, {3, 5, 11}, 2},
    {3, {3, 5, 11}, 1}, {3, {3, 5, 11}, 0}, {1, {37}, 0},
    {4, {2, 3, 5, 7}, 1}, {4, {2, 3, 5, 7}, 2}, {2, {5, 41}, -1},
    {2, {4, 1}, 1},
};

/* Adds +1000 to every row r % 3 == 1 along dimension d and -1000 to every
 * row r % 3 == 2. */
static void offset_rows(float *x, int nd, const size_t *s, int d)
{
    size_t outer, n, inner;
    split3(nd, s, d, &outer, &n, &inner);
    for (size_t r = 0; r < outer * inner; r++) {
        float off = r % 3 == 1 ? 1000.0f : r % 3 == 2 ? -1000.0f : 0.0f;
        size_t base = (r / inner) * n * inner + r % inner;
        for (size_t j = 0; j < n; j++)
            x[base + j * inner] += off;
    }
}

static void check_softmax(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 51);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < sizeof softmax_cases / sizeof *softmax_cases;
             c++)
            for (int offset = 0; offset < 2; offset++) {
                const dcase *dc = &softmax_cases[c];
                int d = dc->dim < 0 ? dc->dim + dc->nd : dc->dim;
                size_t total = count_of(dc->nd, dc->s);
                float *x = rand_f32(&rng, total, -3, 3);
                if (offset)
                    offset_rows(x, dc->nd, dc->s, d);
                char s1[64];
                harness h;
                h_begin(&h, ctx, &variants[v], "softmax %s dim %d%s",
                        shape_str(dc->nd, dc->s, s1, sizeof s1), dc->dim,
                        offset ? ", rows offset by +-1000" : "");
                atmoe_node nx = h_f32(&h, dc->nd, dc->s, x), out;
                ck_assert_status(atmoe_graph_softmax(h.g, nx, dc->dim, &out),
                                 ctx);
                expect_shape(&h, out, dc->nd, dc->s, ATMOE_DTYPE_F32);
                h_run(&h, 1, &out);
                double *want = xmalloc(total * sizeof *want);
                size_t outer, n, inner;
                split3(dc->nd, dc->s, d, &outer, &n, &inner);
                for (size_t r = 0; r < outer * inner; r++) {
                    size_t base = (r / inner) * n * inner + r % inner;
                    double m = -INFINITY, sum = 0;
                    for (size_t j = 0; j < n; j++)
                        m = fmax(m, x[base + j * inner]);
                    for (size_t j = 0; j < n; j++)
                        sum += exp(x[base + j * inner] - m);
                    for (size_t j = 0; j < n; j++)
                        want[base + j * inner] =
                            exp(x[base + j * inner] - m) / sum;
                }
                expect_close(h.what, "out", h.out[0], want, NULL, total,
                             1e-30, TOL_SOFTMAX);
                free(want);
                h_end(&h);
                free(x);
            }
}

/* ------------------------------------------------------------------------ */
/* topk                                                                      */
/* ------------------------------------------------------------------------ */

static const dcase topk_cases[] = {
    {2, {7, 13}, -1},   {3, {3, 11, 5}, 1}, {3, {3, 5, 11}, 2},
    {4, {2, 3, 5, 7}, 2}, {1, {9}, 0},      {2, {7, 13}, 0},
};

/* Values on a grid of 0.5 in [-3, 3), so that rows of 5 or more hold
 * exact ties; every fourth row is all equal. */
static float *tie_data(test_rng *rng, int nd, const size_t *s, int d)
{
    size_t total = count_of(nd, s);
    float *x = xmalloc(total * sizeof *x);
    for (size_t i = 0; i < total; i++)
        x[i] = (float)(floor(test_uniform(rng, -3, 3) * 2) / 2);
    size_t outer, n, inner;
    split3(nd, s, d, &outer, &n, &inner);
    for (size_t r = 3; r < outer * inner; r += 4) {
        size_t base = (r / inner) * n * inner + r % inner;
        for (size_t j = 0; j < n; j++)
            x[base + j * inner] = 1.5f;
    }
    return x;
}

static void check_topk(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 61);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < sizeof topk_cases / sizeof *topk_cases; c++) {
            const dcase *dc = &topk_cases[c];
            int d = dc->dim < 0 ? dc->dim + dc->nd : dc->dim;
            size_t outer, n, inner;
            split3(dc->nd, dc->s, d, &outer, &n, &inner);
            int ks[3] = {1, 3, (int)n};
            for (int ki = 0; ki < 3; ki++)
                /* want: 0 both outputs, 1 indices only, 2 values only */
                for (int wantset = 0; wantset < 3; wantset++) {
                    int k = ks[ki];
                    float *x = tie_data(&rng, dc->nd, dc->s, d);
                    char s1[64];
                    harness h;
                    h_begin(&h, ctx, &variants[v], "topk k=%d of %s dim %d, "
                            "%s", k, shape_str(dc->nd, dc->s, s1, sizeof s1),
                            dc->dim,
                            wantset == 0   ? "values and indices"
                            : wantset == 1 ? "indices only"
                                           : "values only");
                    atmoe_node nx = h_f32(&h, dc->nd, dc->s, x);
                    atmoe_node vals = ATMOE_NODE_NONE, idx = ATMOE_NODE_NONE;
                    ck_assert_status(
                        atmoe_graph_topk(h.g, nx, k, dc->dim,
                                         wantset == 1 ? NULL : &vals,
                                         wantset == 2 ? NULL : &idx),
                        ctx);
                    size_t so[4];
                    memcpy(so, dc->s, sizeof so);
                    so[d] = (size_t)k;
                    if (vals != ATMOE_NODE_NONE)
                        expect_shape(&h, vals, dc->nd, so, ATMOE_DTYPE_F32);
                    if (idx != ATMOE_NODE_NONE)
                        expect_shape(&h, idx, dc->nd, so, ATMOE_DTYPE_I32);
                    atmoe_node outs[2];
                    int nout = 0;
                    if (vals != ATMOE_NODE_NONE)
                        outs[nout++] = vals;
                    if (idx != ATMOE_NODE_NONE)
                        outs[nout++] = idx;
                    h_run(&h, nout, outs);

                    size_t no = outer * (size_t)k * inner;
                    double *wv = xmalloc(no * sizeof *wv);
                    int32_t *wi = xmalloc(no * sizeof *wi);
                    char *taken = xmalloc(n);
                    for (size_t r = 0; r < outer * inner; r++) {
                        size_t base = (r / inner) * n * inner + r % inner;
                        size_t obase = (r / inner) * (size_t)k * inner +
                                       r % inner;
                        memset(taken, 0, n);
                        for (int t = 0; t < k; t++) {
                            size_t best = n;
                            for (size_t j = 0; j < n; j++)
                                if (!taken[j] &&
                                    (best == n || x[base + j * inner] >
                                                      x[base + best * inner]))
                                    best = j;
                            taken[best] = 1;
                            wv[obase + (size_t)t * inner] =
                                x[base + best * inner];
                            wi[obase + (size_t)t * inner] = (int32_t)best;
                        }
                    }
                    int o = 0;
                    if (vals != ATMOE_NODE_NONE)
                        expect_close(h.what, "values", h.out[o++], wv, NULL,
                                     no, 1, TOL_EXACT);
                    if (idx != ATMOE_NODE_NONE)
                        expect_ints(h.what, "indices", h.out[o], wi, no);
                    free(taken);
                    free(wv);
                    free(wi);
                    h_end(&h);
                    free(x);
                }
        }
}

/* ------------------------------------------------------------------------ */
/* rmsnorm, layernorm                                                        */
/* ------------------------------------------------------------------------ */

static const ucase norm_cases[] = {
    {2, {7, 13}}, {3, {3, 5, 11}}, {1, {37}}, {4, {2, 3, 5, 7}},
    {2, {5, 1}}, {2, {1, 29}},
};
#define N_NORM_CASES (sizeof norm_cases / sizeof norm_cases[0])

static void check_rmsnorm(atmoe_context *ctx)
{
    static const float epsilons[] = {1e-5f, 0.25f};
    test_rng rng;
    test_rng_seed(&rng, 71);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < N_NORM_CASES; c++)
            for (int with_w = 0; with_w < 2; with_w++)
                for (int ei = 0; ei < 2; ei++) {
                    const ucase *u = &norm_cases[c];
                    size_t total = count_of(u->nd, u->s);
                    size_t len = u->s[u->nd - 1], rows = total / len;
                    float eps = epsilons[ei];
                    float *x = rand_f32(&rng, total, -3, 3);
                    float *w = rand_f32(&rng, len, -2, 2);
                    char s1[64];
                    harness h;
                    h_begin(&h, ctx, &variants[v], "rmsnorm %s eps %g%s",
                            shape_str(u->nd, u->s, s1, sizeof s1),
                            (double)eps, with_w ? " with weight" : "");
                    atmoe_node nx = h_f32(&h, u->nd, u->s, x);
                    atmoe_node nw = with_w ? h_f32(&h, 1, &len, w)
                                           : ATMOE_NODE_NONE;
                    atmoe_node out;
                    ck_assert_status(atmoe_graph_rmsnorm(h.g, nx, nw, eps,
                                                         &out),
                                     ctx);
                    expect_shape(&h, out, u->nd, u->s, ATMOE_DTYPE_F32);
                    h_run(&h, 1, &out);
                    double *want = xmalloc(total * sizeof *want);
                    for (size_t r = 0; r < rows; r++) {
                        const float *row = x + r * len;
                        double ss = 0;
                        for (size_t j = 0; j < len; j++)
                            ss += (double)row[j] * row[j];
                        double inv = 1 / sqrt(ss / len + (double)eps);
                        for (size_t j = 0; j < len; j++)
                            want[r * len + j] =
                                row[j] * inv * (with_w ? w[j] : 1.0);
                    }
                    expect_close(h.what, "out", h.out[0], want, NULL, total,
                                 1e-30, TOL_NORM);
                    free(want);
                    h_end(&h);
                    free(x);
                    free(w);
                }
}

static void ref_layernorm(const float *x, const float *w, const float *b,
                          size_t rows, size_t len, double eps, double *want,
                          double *scale)
{
    for (size_t r = 0; r < rows; r++) {
        const float *row = x + r * len;
        double mean = 0, var = 0;
        for (size_t j = 0; j < len; j++)
            mean += row[j];
        mean /= len;
        for (size_t j = 0; j < len; j++)
            var += (row[j] - mean) * (row[j] - mean);
        double inv = 1 / sqrt(var / len + eps);
        for (size_t j = 0; j < len; j++) {
            double xh = (row[j] - mean) * inv;
            double wj = w ? w[j] : 1.0, bj = b ? b[j] : 0.0;
            want[r * len + j] = xh * wj + bj;
            scale[r * len + j] = fabs(wj) * (fabs(xh) + 1) + fabs(bj);
        }
    }
}

static void check_layernorm(atmoe_context *ctx)
{
    static const float epsilons[] = {1e-5f, 0.25f};
    test_rng rng;
    test_rng_seed(&rng, 72);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < N_NORM_CASES; c++)
            for (int opt = 0; opt < 4; opt++) /* bit 0 weight, bit 1 bias */
                for (int ei = 0; ei < 2; ei++) {
                    const ucase *u = &norm_cases[c];
                    size_t total = count_of(u->nd, u->s);
                    size_t len = u->s[u->nd - 1], rows = total / len;
                    float eps = epsilons[ei];
                    int with_w = opt & 1, with_b = opt & 2;
                    float *x = rand_f32(&rng, total, -3, 3);
                    float *w = rand_f32(&rng, len, -2, 2);
                    float *b = rand_f32(&rng, len, -2, 2);
                    char s1[64];
                    harness h;
                    h_begin(&h, ctx, &variants[v], "layernorm %s eps %g%s%s",
                            shape_str(u->nd, u->s, s1, sizeof s1),
                            (double)eps, with_w ? " with weight" : "",
                            with_b ? " with bias" : "");
                    atmoe_node nx = h_f32(&h, u->nd, u->s, x);
                    atmoe_node nw = with_w ? h_f32(&h, 1, &len, w)
                                           : ATMOE_NODE_NONE;
                    atmoe_node nb = with_b ? h_f32(&h, 1, &len, b)
                                           : ATMOE_NODE_NONE;
                    atmoe_node out;
                    ck_assert_status(atmoe_graph_layernorm(h.g, nx, nw, nb,
                                                           eps, &out),
                                     ctx);
                    expect_shape(&h, out, u->nd, u->s, ATMOE_DTYPE_F32);
                    h_run(&h, 1, &out);
                    double *want = xmalloc(total * sizeof *want);
                    double *scale = xmalloc(total * sizeof *scale);
                    ref_layernorm(x, with_w ? w : NULL, with_b ? b : NULL,
                                  rows, len, eps, want, scale);
                    expect_close(h.what, "out", h.out[0], want, scale, total,
                                 0, TOL_LAYERNORM);
                    free(want);
                    free(scale);
                    h_end(&h);
                    free(x);
                    free(w);
                    free(b);
                }
}

/* Rows far from zero: the variance must come from centred values. */
static void check_layernorm_offset(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 73);
    const size_t s[2] = {5, 29}, total = 145, len = 29;
    for (size_t v = 0; v < N_VARIANTS; v++) {
        float *x = rand_f32(&rng, total, 997, 1003);
        harness h;
        h_begin(&h, ctx, &variants[v], "layernorm [5,29] of values near "
                "1000");
        atmoe_node nx = h_f32(&h, 2, s, x), out;
        ck_assert_status(atmoe_graph_layernorm(h.g, nx, ATMOE_NODE_NONE,
                                               ATMOE_NODE_NONE, 1e-5f, &out),
                         ctx);
        h_run(&h, 1, &out);
        double want[145], scale[145];
        ref_layernorm(x, NULL, NULL, total / len, len, 1e-5f, want, scale);
        expect_close(h.what, "out", h.out[0], want, scale, total, 0,
                     TOL_LAYERNORM_OFFSET);
        h_end(&h);
        free(x);
    }
}

/* ------------------------------------------------------------------------ */
/* mean, l2norm                                                              */
/* ------------------------------------------------------------------------ */

static void check_mean(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 81);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < N_UCASES; c++) {
            const ucase *u = &ucases[c];
            for (int dim = -1; dim < u->nd; dim++) {
                int d = dim < 0 ? dim + u->nd : dim;
                size_t total = count_of(u->nd, u->s);
                float *x = rand_f32(&rng, total, -3, 3);
                char s1[64];
                harness h;
                h_begin(&h, ctx, &variants[v], "mean of %s over dim %d",
                        shape_str(u->nd, u->s, s1, sizeof s1), dim);
                atmoe_node nx = h_f32(&h, u->nd, u->s, x), out;
                ck_assert_status(atmoe_graph_mean(h.g, nx, dim, &out), ctx);
                /* The dimension goes; a vector's mean is [1]. */
                size_t so[4] = {1, 1, 1, 1};
                int ndo = u->nd == 1 ? 1 : u->nd - 1;
                for (int i = 0, j = 0; i < u->nd; i++)
                    if (i != d)
                        so[j++] = u->s[i];
                expect_shape(&h, out, ndo, so, ATMOE_DTYPE_F32);
                h_run(&h, 1, &out);
                size_t outer, n, inner;
                split3(u->nd, u->s, d, &outer, &n, &inner);
                double *want = xmalloc(outer * inner * sizeof *want);
                double *scale = xmalloc(outer * inner * sizeof *scale);
                for (size_t r = 0; r < outer * inner; r++) {
                    size_t base = (r / inner) * n * inner + r % inner;
                    double sum = 0, sa = 0;
                    for (size_t j = 0; j < n; j++) {
                        sum += x[base + j * inner];
                        sa += fabs((double)x[base + j * inner]);
                    }
                    want[r] = sum / n;
                    scale[r] = sa / n;
                }
                expect_close(h.what, "out", h.out[0], want, scale,
                             outer * inner, 0, TOL_MEAN);
                free(want);
                free(scale);
                h_end(&h);
                free(x);
            }
        }
}

static void check_l2norm(atmoe_context *ctx)
{
    static const dcase cases[] = {
        {2, {7, 13}, 1}, {2, {7, 13}, 0}, {3, {3, 5, 11}, 1},
        {3, {3, 5, 11}, -1}, {1, {37}, 0}, {4, {2, 3, 5, 7}, 2},
        {2, {4, 9}, -1}, /* some rows below eps (see below) */
    };
    test_rng rng;
    test_rng_seed(&rng, 91);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < sizeof cases / sizeof *cases; c++)
            for (int big_eps = 0; big_eps < 2; big_eps++) {
                const dcase *dc = &cases[c];
                int d = dc->dim < 0 ? dc->dim + dc->nd : dc->dim;
                size_t total = count_of(dc->nd, dc->s);
                size_t outer, n, inner;
                split3(dc->nd, dc->s, d, &outer, &n, &inner);
                float *x = rand_f32(&rng, total, -3, 3);
                /* With eps 0.5, rows r % 2 == 1 scaled by 0.01 have a norm
                 * below eps (at most 0.03 sqrt(37) = 0.18): they are
                 * divided by eps instead. */
                float eps = big_eps ? 0.5f : 1e-6f;
                if (big_eps)
                    for (size_t r = 1; r < outer * inner; r += 2) {
                        size_t base = (r / inner) * n * inner + r % inner;
                        for (size_t j = 0; j < n; j++)
                            x[base + j * inner] *= 0.01f;
                    }
                char s1[64];
                harness h;
                h_begin(&h, ctx, &variants[v], "l2norm %s dim %d eps %g",
                        shape_str(dc->nd, dc->s, s1, sizeof s1), dc->dim,
                        (double)eps);
                atmoe_node nx = h_f32(&h, dc->nd, dc->s, x), out;
                ck_assert_status(atmoe_graph_l2norm(h.g, nx, dc->dim, eps,
                                                    &out),
                                 ctx);
                expect_shape(&h, out, dc->nd, dc->s, ATMOE_DTYPE_F32);
                h_run(&h, 1, &out);
                double *want = xmalloc(total * sizeof *want);
                for (size_t r = 0; r < outer * inner; r++) {
                    size_t base = (r / inner) * n * inner + r % inner;
                    double ss = 0;
                    for (size_t j = 0; j < n; j++)
                        ss += (double)x[base + j * inner] *
                              x[base + j * inner];
                    double den = fmax(sqrt(ss), (double)eps);
                    for (size_t j = 0; j < n; j++)
                        want[base + j * inner] = x[base + j * inner] / den;
                }
                expect_close(h.what, "out", h.out[0], want, NULL, total,
                             1e-30, TOL_NORM);
                free(want);
                h_end(&h);
                free(x);
            }
}

/* ------------------------------------------------------------------------ */
/* gather_rows, scatter_add_rows                                             */
/* ------------------------------------------------------------------------ */

static const ucase table_cases[] = {
    {2, {11, 7}}, {3, {6, 3, 5}}, {1, {13}},
};

static void check_gather_rows(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 101);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < sizeof table_cases / sizeof *table_cases; c++) {
            const ucase *u = &table_cases[c];
            int32_t rows = (int32_t)u->s[0];
            /* Repeated rows, the last row, and three outside the table. */
            int32_t idx[9] = {2, 0, rows - 1, 2, rows, -1, 1, 1000, 2};
            size_t nidx = 9;
            size_t total = count_of(u->nd, u->s), row = total / u->s[0];
            float *t = rand_f32(&rng, total, -3, 3);
            char s1[64];
            harness h;
            h_begin(&h, ctx, &variants[v], "gather_rows from %s",
                    shape_str(u->nd, u->s, s1, sizeof s1));
            atmoe_node nt = h_f32(&h, u->nd, u->s, t);
            atmoe_node ni = h_operand(&h, ATMOE_DTYPE_I32, 1, &nidx, idx);
            atmoe_node out;
            ck_assert_status(atmoe_graph_gather_rows(h.g, nt, ni, &out), ctx);
            size_t so[4];
            memcpy(so, u->s, sizeof so);
            so[0] = nidx;
            expect_shape(&h, out, u->nd, so, ATMOE_DTYPE_F32);
            h_run(&h, 1, &out);
            double *want = xmalloc(nidx * row * sizeof *want);
            for (size_t i = 0; i < nidx; i++)
                for (size_t j = 0; j < row; j++)
                    want[i * row + j] = idx[i] >= 0 && idx[i] < rows
                                            ? t[(size_t)idx[i] * row + j]
                                            : 0.0;
            expect_close(h.what, "out", h.out[0], want, NULL, nidx * row, 1,
                         TOL_EXACT);
            free(want);
            h_end(&h);
            free(t);
        }
}

static void check_scatter_add_rows(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 111);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < sizeof table_cases / sizeof *table_cases; c++) {
            const ucase *u = &table_cases[c];
            int32_t rows = (int32_t)u->s[0];
            /* Row 1 three times, row 0 twice, three indices outside. */
            int32_t idx[10] = {1, rows - 1, 1, -1, 0, rows, 1, 0, 1000, 3};
            size_t nidx = 10;
            size_t total = count_of(u->nd, u->s), row = total / u->s[0];
            size_t ss[4];
            memcpy(ss, u->s, sizeof ss);
            ss[0] = nidx;
            float *dst = rand_f32(&rng, total, -3, 3);
            float *src = rand_f32(&rng, nidx * row, -3, 3);
            char s1[64];
            harness h;
            h_begin(&h, ctx, &variants[v], "scatter_add_rows into %s",
                    shape_str(u->nd, u->s, s1, sizeof s1));
            atmoe_node nd = h_f32(&h, u->nd, u->s, dst);
            atmoe_node ni = h_operand(&h, ATMOE_DTYPE_I32, 1, &nidx, idx);
            atmoe_node ns = h_f32(&h, u->nd, ss, src);
            atmoe_node out;
            ck_assert_status(atmoe_graph_scatter_add_rows(h.g, nd, ni, ns,
                                                          &out),
                             ctx);
            expect_shape(&h, out, u->nd, u->s, ATMOE_DTYPE_F32);
            h_run(&h, 1, &out);
            double *want = xmalloc(total * sizeof *want);
            double *scale = xmalloc(total * sizeof *scale);
            for (size_t i = 0; i < total; i++) {
                want[i] = dst[i];
                scale[i] = fabs((double)dst[i]);
            }
            for (size_t i = 0; i < nidx; i++) {
                if (idx[i] < 0 || idx[i] >= rows)
                    continue;
                for (size_t j = 0; j < row; j++) {
                    want[(size_t)idx[i] * row + j] += src[i * row + j];
                    scale[(size_t)idx[i] * row + j] +=
                        fabs((double)src[i * row + j]);
                }
            }
            expect_close(h.what, "out", h.out[0], want, scale, total, 0,
                         TOL_SCATTER);
            free(want);
            free(scale);
            h_end(&h);
            free(dst);
            free(src);
        }
}

/* ------------------------------------------------------------------------ */
/* reshape, view, transpose, concat: exact, byte for byte                   */
/* ------------------------------------------------------------------------ */

/* Random elements of a dtype: f32 in [-3, 3), f16 the halves of such
 * values, i32 in [0, 100000); none is all-ones bytes (the poison). */
static void *rand_elems(test_rng *rng, atmoe_dtype dt, size_t n)
{
    size_t es = atmoe_dtype_size(dt);
    void *p = xmalloc(n * es);
    for (size_t i = 0; i < n; i++) {
        double u = test_uniform(rng, -3, 3);
        if (dt == ATMOE_DTYPE_F32)
            ((float *)p)[i] = (float)u;
        else if (dt == ATMOE_DTYPE_F16)
            ((uint16_t *)p)[i] = half_from_double(u);
        else
            ((int32_t *)p)[i] = (int32_t)((u + 3) * 100000 / 6);
    }
    return p;
}

/* Fails at the first element whose bytes differ. */
static void expect_bytes(const harness *h, const void *got, const void *want,
                         size_t n, atmoe_dtype dt)
{
    size_t es = atmoe_dtype_size(dt);
    const unsigned char *g = got, *w = want;
    for (size_t i = 0; i < n; i++)
        if (memcmp(g + i * es, w + i * es, es) != 0) {
            uint32_t gb = 0, wb = 0;
            memcpy(&gb, g + i * es, es);
            memcpy(&wb, w + i * es, es);
            ck_abort_msg("%s: element %zu of %zu is 0x%08x, want 0x%08x "
                         "(%s)", h->what, i, n, gb, wb, atmoe_dtype_name(dt));
        }
}

static const atmoe_dtype move_dtypes[] = {ATMOE_DTYPE_F32, ATMOE_DTYPE_I32,
                                          ATMOE_DTYPE_F16};

typedef struct rcase {
    int nd;
    size_t s[4];
    int nd2;
    size_t s2[4];
} rcase;

static const rcase reshape_cases[] = {
    {2, {7, 13}, 2, {13, 7}},       {2, {7, 13}, 1, {91}},
    {3, {3, 5, 11}, 2, {15, 11}},   {3, {3, 5, 11}, 2, {5, 33}},
    {3, {3, 5, 11}, 1, {165}},      {4, {2, 3, 5, 7}, 2, {6, 35}},
    {1, {105}, 4, {3, 5, 1, 7}},
};

/* Reshapes of inputs (storage 0) or of parameters and constants. */
static void run_reshape(atmoe_context *ctx, int storage)
{
    test_rng rng;
    test_rng_seed(&rng, storage ? 122 : 121);
    for (size_t v = 0; v < N_VARIANTS; v++) {
        if ((variants[v].kind != K_INPUT) != storage)
            continue;
        for (size_t c = 0; c < sizeof reshape_cases / sizeof *reshape_cases;
             c++)
            for (size_t t = 0; t < 3; t++) {
                const rcase *rc = &reshape_cases[c];
                atmoe_dtype dt = move_dtypes[t];
                size_t n = count_of(rc->nd, rc->s);
                void *x = rand_elems(&rng, dt, n);
                char s1[64], s2[64];
                harness h;
                h_begin(&h, ctx, &variants[v], "reshape %s %s to %s",
                        atmoe_dtype_name(dt),
                        shape_str(rc->nd, rc->s, s1, sizeof s1),
                        shape_str(rc->nd2, rc->s2, s2, sizeof s2));
                h.exact_poison = 1;
                atmoe_node nx = h_operand(&h, dt, rc->nd, rc->s, x), out;
                ck_assert_status(atmoe_graph_reshape(h.g, nx, rc->nd2, rc->s2,
                                                     &out),
                                 ctx);
                expect_shape(&h, out, rc->nd2, rc->s2, dt);
                h_run(&h, 1, &out);
                expect_bytes(&h, h.out[0], x, n, dt);
                h_end(&h);
                free(x);
            }
    }
}

static void check_reshape(atmoe_context *ctx)
{
    run_reshape(ctx, 0);
}

/* A reshape of a parameter or constant: its memory is the caller's tensor
 * or the graph's copy, not the arena. */
static void check_reshape_storage(atmoe_context *ctx)
{
    run_reshape(ctx, 1);
}

typedef struct vcase {
    int nd;
    size_t s[4], start[4], shape[4];
} vcase;

static const vcase view_cases[] = {
    {2, {37, 29}, {3, 5}, {11, 7}},
    {2, {7, 13}, {0, 0}, {7, 13}},
    {2, {7, 13}, {6, 1}, {1, 11}},
    {3, {3, 5, 11}, {1, 2, 3}, {2, 3, 5}},
    {1, {37}, {5}, {13}},
    {4, {2, 3, 5, 7}, {1, 1, 2, 3}, {1, 2, 3, 3}},
};

static void check_view(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 131);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < sizeof view_cases / sizeof *view_cases; c++)
            for (size_t t = 0; t < 3; t++) {
                const vcase *vc = &view_cases[c];
                atmoe_dtype dt = move_dtypes[t];
                size_t es = atmoe_dtype_size(dt);
                size_t n = count_of(vc->nd, vc->s);
                size_t no = count_of(vc->nd, vc->shape);
                unsigned char *x = rand_elems(&rng, dt, n);
                char s1[64], s2[64], s3[64];
                harness h;
                h_begin(&h, ctx, &variants[v], "view %s of %s %s at %s",
                        shape_str(vc->nd, vc->shape, s1, sizeof s1),
                        atmoe_dtype_name(dt),
                        shape_str(vc->nd, vc->s, s2, sizeof s2),
                        shape_str(vc->nd, vc->start, s3, sizeof s3));
                h.exact_poison = 1;
                atmoe_node nx = h_operand(&h, dt, vc->nd, vc->s, x), out;
                ck_assert_status(atmoe_graph_view(h.g, nx, vc->start,
                                                  vc->shape, &out),
                                 ctx);
                expect_shape(&h, out, vc->nd, vc->shape, dt);
                h_run(&h, 1, &out);
                unsigned char *want = xmalloc(no * es);
                size_t idx[4];
                for (size_t i = 0; i < no; i++) {
                    unravel(i, vc->nd, vc->shape, idx);
                    for (int d = 0; d < vc->nd; d++)
                        idx[d] += vc->start[d];
                    memcpy(want + i * es, x + ravel(vc->nd, vc->s, idx) * es,
                           es);
                }
                expect_bytes(&h, h.out[0], want, no, dt);
                free(want);
                h_end(&h);
                free(x);
            }
}

static void check_transpose(atmoe_context *ctx)
{
    static const dcase cases[] = {
        /* dim is dim0 * 10 + dim1 (dim1 negative: -1) */
        {2, {7, 13}, 1},  {2, {37, 29}, 10}, {3, {3, 5, 11}, 2},
        {3, {3, 5, 11}, 1}, {3, {3, 5, 11}, 12}, {3, {3, 5, 11}, -1},
        {4, {2, 3, 5, 7}, 3}, {4, {2, 3, 5, 7}, 13}, {4, {2, 3, 5, 7}, 20},
        {3, {3, 5, 11}, 11}, /* a dimension with itself: a copy */
    };
    test_rng rng;
    test_rng_seed(&rng, 141);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < sizeof cases / sizeof *cases; c++)
            for (size_t t = 0; t < 3; t++) {
                const dcase *tc = &cases[c];
                /* -1: the last dimension with the first. */
                int d0 = tc->dim < 0 ? -1 : tc->dim / 10;
                int d1 = tc->dim < 0 ? 0 : tc->dim % 10;
                int r0 = d0 < 0 ? d0 + tc->nd : d0, r1 = d1;
                atmoe_dtype dt = move_dtypes[t];
                size_t es = atmoe_dtype_size(dt);
                size_t n = count_of(tc->nd, tc->s);
                unsigned char *x = rand_elems(&rng, dt, n);
                size_t so[4];
                memcpy(so, tc->s, sizeof so);
                so[r0] = tc->s[r1];
                so[r1] = tc->s[r0];
                char s1[64];
                harness h;
                h_begin(&h, ctx, &variants[v], "transpose %s %s dims %d, %d",
                        atmoe_dtype_name(dt),
                        shape_str(tc->nd, tc->s, s1, sizeof s1), d0, d1);
                h.exact_poison = 1;
                atmoe_node nx = h_operand(&h, dt, tc->nd, tc->s, x), out;
                ck_assert_status(atmoe_graph_transpose(h.g, nx, d0, d1, &out),
                                 ctx);
                expect_shape(&h, out, tc->nd, so, dt);
                h_run(&h, 1, &out);
                unsigned char *want = xmalloc(n * es);
                size_t idx[4];
                for (size_t i = 0; i < n; i++) {
                    unravel(i, tc->nd, so, idx);
                    size_t tmp = idx[r0];
                    idx[r0] = idx[r1];
                    idx[r1] = tmp;
                    memcpy(want + i * es, x + ravel(tc->nd, tc->s, idx) * es,
                           es);
                }
                expect_bytes(&h, h.out[0], want, n, dt);
                free(want);
                h_end(&h);
                free(x);
            }
}

static void check_concat(atmoe_context *ctx)
{
    static const struct {
        int nd;
        size_t sa[4], sb[4];
        int dim;
    } cases[] = {
        {2, {7, 13}, {7, 5}, 1},         {2, {7, 13}, {4, 13}, 0},
        {3, {3, 5, 11}, {2, 5, 11}, 0},  {3, {3, 5, 11}, {3, 2, 11}, 1},
        {3, {3, 5, 11}, {3, 5, 4}, 2},   {3, {3, 5, 11}, {3, 5, 1}, -1},
        {1, {5}, {8}, 0},                {4, {2, 3, 5, 7}, {2, 3, 1, 7}, 2},
        {4, {2, 3, 5, 7}, {2, 3, 5, 3}, 3},
    };
    test_rng rng;
    test_rng_seed(&rng, 151);
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (size_t c = 0; c < sizeof cases / sizeof *cases; c++)
            for (size_t t = 0; t < 3; t++) {
                int nd = cases[c].nd;
                const size_t *sa = cases[c].sa, *sb = cases[c].sb;
                int d = cases[c].dim < 0 ? cases[c].dim + nd : cases[c].dim;
                atmoe_dtype dt = move_dtypes[t];
                size_t es = atmoe_dtype_size(dt);
                size_t na = count_of(nd, sa), nb = count_of(nd, sb);
                unsigned char *a = rand_elems(&rng, dt, na);
                unsigned char *b = rand_elems(&rng, dt, nb);
                size_t so[4];
                memcpy(so, sa, sizeof so);
                so[d] = sa[d] + sb[d];
                char s1[64], s2[64];
                harness h;
                h_begin(&h, ctx, &variants[v], "concat %s %s and %s dim %d",
                        atmoe_dtype_name(dt), shape_str(nd, sa, s1, sizeof s1),
                        shape_str(nd, sb, s2, sizeof s2), cases[c].dim);
                h.exact_poison = 1;
                atmoe_node xa = h_operand(&h, dt, nd, sa, a);
                atmoe_node xb = h_operand(&h, dt, nd, sb, b);
                atmoe_node out;
                ck_assert_status(atmoe_graph_concat(h.g, xa, xb, cases[c].dim,
                                                    &out),
                                 ctx);
                expect_shape(&h, out, nd, so, dt);
                h_run(&h, 1, &out);
                size_t no = na + nb;
                unsigned char *want = xmalloc(no * es);
                size_t idx[4];
                for (size_t i = 0; i < no; i++) {
                    unravel(i, nd, so, idx);
                    if (idx[d] < sa[d]) {
                        memcpy(want + i * es, a + ravel(nd, sa, idx) * es, es);
                    } else {
                        idx[d] -= sa[d];
                        memcpy(want + i * es, b + ravel(nd, sb, idx) * es, es);
                    }
                }
                expect_bytes(&h, h.out[0], want, no, dt);
                free(want);
                h_end(&h);
                free(a);
                free(b);
            }
}

/* concat(x, x): one node on both sides. */
static void check_concat_same_operand(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 152);
    const size_t s[2] = {7, 13};
    for (size_t v = 0; v < N_VARIANTS; v++)
        for (int d = 0; d < 2; d++) {
            float *x = rand_f32(&rng, 91, -3, 3);
            harness h;
            h_begin(&h, ctx, &variants[v], "concat(x, x) [7,13] dim %d", d);
            h.exact_poison = 1;
            atmoe_node nx = h_f32(&h, 2, s, x), out;
            ck_assert_status(atmoe_graph_concat(h.g, nx, nx, d, &out), ctx);
            h_run(&h, 1, &out);
            float want[182];
            for (size_t i = 0; i < 182; i++) {
                size_t r = d ? i / 26 : i / 13, col = d ? i % 26 : i % 13;
                want[i] = x[(r % 7) * 13 + col % 13];
            }
            expect_bytes(&h, h.out[0], want, 182, ATMOE_DTYPE_F32);
            h_end(&h);
            free(x);
        }
}

/* ------------------------------------------------------------------------ */
/* f16 operands of float operations                                          */
/* ------------------------------------------------------------------------ */

/* f16 is storage: a float operation reads f16 operands as their values and
 * computes in f32 (its result is f32). */
/* f16 storage reaches the arithmetic through atmoe_graph_cast. */
static void check_f16_operands(atmoe_context *ctx)
{
    static const char *const names[] = {"silu", "add [13] f32", "softmax",
                                        "scale 2", "rmsnorm"};
    test_rng rng;
    test_rng_seed(&rng, 161);
    const size_t s[2] = {7, 13}, n = 91, len = 13;
    for (size_t v = 0; v < N_VARIANTS; v++) {
        if (variants[v].prescale)
            continue; /* scale(1) would make them f32 */
        for (int op = 0; op < 5; op++) {
            uint16_t *xh = rand_elems(&rng, ATMOE_DTYPE_F16, n);
            float *y = rand_f32(&rng, len, -3, 3);
            double xd[91];
            for (size_t i = 0; i < n; i++)
                xd[i] = half_to_double(xh[i]);
            harness h;
            h_begin(&h, ctx, &variants[v], "%s of an f16 [7,13]", names[op]);
            atmoe_node nx = h_operand(&h, ATMOE_DTYPE_F16, 2, s, xh), out;
            atmoe_node ny = op == 1 ? h_f32(&h, 1, &len, y) : ATMOE_NODE_NONE;
            /* Arithmetic takes f32 only; f16 storage is cast first, and the
             * refusal says how. */
            atmoe_node refused;
            ck_assert_fails(atmoe_graph_silu(h.g, nx, &refused), ctx,
                            ATMOE_STATUS_DTYPE_MISMATCH);
            ck_assert_ptr_nonnull(strstr(atmoe_errmsg(ctx), "atmoe_graph_cast"));
            ck_assert_status(atmoe_graph_cast(h.g, nx, ATMOE_DTYPE_F32, &nx), ctx);
            atmoe_status st =
                op == 0   ? atmoe_graph_silu(h.g, nx, &out)
                : op == 1 ? atmoe_graph_add(h.g, nx, ny, &out)
                : op == 2 ? atmoe_graph_softmax(h.g, nx, -1, &out)
                : op == 3 ? atmoe_graph_scale(h.g, nx, 2.0f, &out)
                          : atmoe_graph_rmsnorm(h.g, nx, ATMOE_NODE_NONE,
                                                1e-5f, &out);
            ck_assert_status(st, ctx);
            expect_shape(&h, out, 2, s, ATMOE_DTYPE_F32);
            h_run(&h, 1, &out);
            double want[91];
            for (size_t r = 0; r < 7; r++) {
                const double *row = xd + r * len;
                double m = -INFINITY, sum = 0, ss = 0;
                for (size_t j = 0; j < len; j++) {
                    m = fmax(m, row[j]);
                    ss += row[j] * row[j];
                }
                for (size_t j = 0; j < len; j++)
                    sum += exp(row[j] - m);
                for (size_t j = 0; j < len; j++) {
                    double x = row[j];
                    want[r * len + j] =
                        op == 0   ? ref_act(ACT_SILU, x)
                        : op == 1 ? x + y[j]
                        : op == 2 ? exp(x - m) / sum
                        : op == 3 ? 2 * x
                                  : x / sqrt(ss / len + (double)1e-5f);
                }
            }
            expect_close(h.what, "out", h.out[0], want, NULL, n, 1e-30,
                         op == 2 ? TOL_SOFTMAX : op == 4 ? TOL_NORM : TOL_ACT);
            h_end(&h);
            free(xh);
            free(y);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Batched inputs                                                            */
/* ------------------------------------------------------------------------ */

/* The chain matmul(x, W^T) + bias -> silu -> softmax -> mean over the batch
 * for the first b rows of x, in float64. */
static void ref_chain(const float *x, const float *w, const float *bias,
                      size_t b, size_t k, size_t n, double *rows,
                      double *mean, double *mean_scale)
{
    for (size_t j = 0; j < n; j++)
        mean[j] = mean_scale[j] = 0;
    for (size_t i = 0; i < b; i++) {
        double *r = rows + i * n, m = -INFINITY, sum = 0;
        for (size_t j = 0; j < n; j++) {
            double s = bias[j];
            for (size_t p = 0; p < k; p++)
                s += (double)x[i * k + p] * w[j * k + p];
            r[j] = s * ref_sigmoid(s);
            m = fmax(m, r[j]);
        }
        for (size_t j = 0; j < n; j++)
            sum += exp(r[j] - m);
        for (size_t j = 0; j < n; j++) {
            r[j] = exp(r[j] - m) / sum;
            mean[j] += r[j] / b;
            mean_scale[j] += r[j] / b;
        }
    }
}

static void check_batched_chain(atmoe_context *ctx)
{
    /* The GEMM's rounding (TOL_GEMM against sum |x w|, here about 5x the
     * result) goes through silu (derivative <= 1.1) and softmax (relative
     * error of an output <= 2 max |input error|), so the softmax rows are
     * held to TOL_CHAIN relative, and their mean to the same against the
     * mean of the (positive) rows. */
    const double TOL_CHAIN = 1e-4;
    const size_t B = 9, K = 13, N = 11;
    static const size_t batches[] = {9, 4, 1, 9};
    test_rng rng;
    test_rng_seed(&rng, 171);
    for (int with_rows = 0; with_rows < 2; with_rows++)
        for (unsigned flags = 0; flags <= ATMOE_PLAN_NO_INPLACE;
             flags += ATMOE_PLAN_NO_INPLACE) {
            float *w = rand_f32(&rng, N * K, -1, 1);
            float *bias = rand_f32(&rng, N, -1, 1);
            atmoe_graph *g;
            ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
            const size_t sx[2] = {B, K}, sw[2] = {N, K};
            atmoe_tensor *tw;
            ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, sw,
                                              &tw),
                             ctx);
            ck_assert_status(atmoe_tensor_write(tw, w, N * K * sizeof *w),
                             ctx);
            atmoe_node nx, nw, nb, mm, act, sm, mean;
            ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, sx,
                                               1, &nx),
                             ctx);
            ck_assert_status(atmoe_graph_parameter(g, "w", tw, &nw), ctx);
            atmoe_tensor_free(tw); /* the graph keeps the storage */
            ck_assert_status(atmoe_graph_constant(g, "b", ATMOE_DTYPE_F32, 1,
                                                  &N, bias, &nb),
                             ctx);
            ck_assert_status(atmoe_graph_matmul(g, nx, nw, nb,
                                                ATMOE_MATMUL_TRANSPOSE_B, &mm),
                             ctx);
            ck_assert_status(atmoe_graph_silu(g, mm, &act), ctx);
            ck_assert_status(atmoe_graph_softmax(g, act, -1, &sm), ctx);
            ck_assert_status(atmoe_graph_mean(g, sm, 0, &mean), ctx);
            int nd;
            size_t s[4];
            ck_assert_status(atmoe_graph_get_shape(g, mean, &nd, s, NULL),
                             ctx);
            ck_assert_msg(nd == 1 && s[0] == N, "mean over the batch: "
                          "ndim %d shape[0] %zu", nd, s[0]);
            ck_assert_status(atmoe_graph_mark_output(g, mean), ctx);
            if (with_rows)
                ck_assert_status(atmoe_graph_mark_output(g, sm), ctx);
            ck_assert_status(atmoe_graph_plan(g, flags), ctx);

            for (size_t bi = 0; bi < sizeof batches / sizeof *batches; bi++) {
                size_t b = batches[bi];
                char what[128];
                snprintf(what, sizeof what, "chain, batch %zu of %zu "
                         "(step %zu, plan flags %u%s)", b, B, bi, flags,
                         with_rows ? ", softmax rows an output too" : "");
                float *x = rand_f32(&rng, b * K, -3, 3);
                ck_assert_status(atmoe_graph_set_input(g, nx, x,
                                                       b * K * sizeof *x, b),
                                 ctx);
                ck_assert_status(atmoe_graph_compute(g, b), ctx);
                float got_mean[11], got_rows[9 * 11];
                test_poison(got_mean, N);
                test_poison(got_rows, B * N);
                ck_assert_status(atmoe_graph_read(g, mean, got_mean,
                                                  sizeof got_mean),
                                 ctx);
                if (with_rows)
                    ck_assert_status(atmoe_graph_read(g, sm, got_rows,
                                                      b * N * sizeof(float)),
                                     ctx);
                double rows[9 * 11], want[11], scale[11];
                ref_chain(x, w, bias, b, K, N, rows, want, scale);
                expect_close(what, "mean", got_mean, want, scale, N, 0,
                             TOL_CHAIN);
                if (with_rows)
                    expect_close(what, "softmax rows", got_rows, rows, NULL,
                                 b * N, 1e-30, TOL_CHAIN);
                free(x);
            }
            atmoe_graph_free(g);
            free(w);
            free(bias);
        }
}

static void check_set_input_errors(atmoe_context *ctx)
{
    test_rng rng;
    test_rng_seed(&rng, 181);
    const size_t B = 9, K = 13, sx[2] = {9, 13}, sy[1] = {13};
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    atmoe_node nx, ny, out;
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, sx, 1,
                                       &nx),
                     ctx);
    ck_assert_status(atmoe_graph_input(g, "y", ATMOE_DTYPE_F32, 1, sy, 0,
                                       &ny),
                     ctx);
    ck_assert_status(atmoe_graph_add(g, nx, ny, &out), ctx);
    ck_assert_status(atmoe_graph_mark_output(g, out), ctx);
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    float *x = rand_f32(&rng, (B + 1) * K, -3, 3);
    float *y = rand_f32(&rng, K, -3, 3);
    const size_t row = K * sizeof(float);

    /* Batched: rows 0 or above the plan; bytes that are not rows x row. */
    ck_assert_fails(atmoe_graph_set_input(g, nx, x, 0, 0), ctx,
                    ATMOE_STATUS_OUT_OF_RANGE);
    ck_assert_fails(atmoe_graph_set_input(g, nx, x, (B + 1) * row, B + 1),
                    ctx, ATMOE_STATUS_OUT_OF_RANGE);
    ck_assert_fails(atmoe_graph_set_input(g, nx, x, 5 * row, 4), ctx,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    ck_assert_fails(atmoe_graph_set_input(g, nx, x, 4 * row - 4, 4), ctx,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    ck_assert_fails(atmoe_graph_set_input(g, nx, x, B * row, 4), ctx,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    /* Not batched: rows must be 0, bytes the whole input. */
    ck_assert_fails(atmoe_graph_set_input(g, ny, y, row, 1), ctx,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    ck_assert_fails(atmoe_graph_set_input(g, ny, y, row + 4, 0), ctx,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    ck_assert_fails(atmoe_graph_set_input(g, ny, y, row - 4, 0), ctx,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    /* Not an input; NULL data. */
    ck_assert_fails(atmoe_graph_set_input(g, out, x, 4 * row, 4), ctx,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    ck_assert_fails(atmoe_graph_set_input(g, nx, NULL, 4 * row, 4), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    /* Nothing set yet: computing fails. */
    ck_assert_fails(atmoe_graph_compute(g, 4), ctx,
                    ATMOE_STATUS_INVALID_ARGUMENT);

    /* Set for 4 rows: computing another batch fails, 4 works. */
    ck_assert_status(atmoe_graph_set_input(g, nx, x, 4 * row, 4), ctx);
    ck_assert_status(atmoe_graph_set_input(g, ny, y, row, 0), ctx);
    ck_assert_fails(atmoe_graph_compute(g, 5), ctx,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    ck_assert_fails(atmoe_graph_compute(g, B + 1), ctx,
                    ATMOE_STATUS_OUT_OF_RANGE);
    /* A failed set leaves the earlier data. */
    ck_assert_fails(atmoe_graph_set_input(g, nx, x + K, 5 * row, 4), ctx,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    ck_assert_status(atmoe_graph_compute(g, 4), ctx);
    float got[4 * 13];
    test_poison(got, 4 * K);
    ck_assert_fails(atmoe_graph_read(g, out, got, 5 * row), ctx,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    ck_assert_status(atmoe_graph_read(g, out, got, sizeof got), ctx);
    double want[4 * 13];
    for (size_t i = 0; i < 4 * K; i++)
        want[i] = (double)x[i] + y[i % K];
    expect_close("add after refused set_input calls", "out", got, want, NULL,
                 4 * K, 1e-30, TOL_ARITH);

    atmoe_graph_free(g);
    free(x);
    free(y);
}

/* ------------------------------------------------------------------------ */
/* Test cases: each opens a context (one process each under Check's fork
 * mode, which costs PoCL's start-up and CLBlast's compile) and runs a
 * few of the checks above. */

START_TEST(test_matmul)
{
    atmoe_context *ctx = test_context();
    check_matmul(ctx);
    check_matmul_same_operand(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_add_mul_scale)
{
    atmoe_context *ctx = test_context();
    check_add_mul(ctx);
    check_add_mul_same_operand(ctx);
    check_scale(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_activations)
{
    atmoe_context *ctx = test_context();
    check_activations(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_f16_operands)
{
    atmoe_context *ctx = test_context();
    check_f16_operands(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_softmax)
{
    atmoe_context *ctx = test_context();
    check_softmax(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_topk)
{
    atmoe_context *ctx = test_context();
    check_topk(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_norms)
{
    atmoe_context *ctx = test_context();
    check_rmsnorm(ctx);
    check_layernorm(ctx);
    check_layernorm_offset(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_mean_l2norm)
{
    atmoe_context *ctx = test_context();
    check_mean(ctx);
    check_l2norm(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_gather_scatter)
{
    atmoe_context *ctx = test_context();
    check_gather_rows(ctx);
    check_scatter_add_rows(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_reshape)
{
    atmoe_context *ctx = test_context();
    check_reshape(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_reshape_storage)
{
    atmoe_context *ctx = test_context();
    check_reshape_storage(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_view_transpose_concat)
{
    atmoe_context *ctx = test_context();
    check_view(ctx);
    check_transpose(ctx);
    check_concat(ctx);
    check_concat_same_operand(ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_batched)
{
    atmoe_context *ctx = test_context();
    check_batched_chain(ctx);
    check_set_input_errors(ctx);
    atmoe_context_free(ctx);
}
END_TEST

static Suite *graph_ops_suite(void)
{
    Suite *s = suite_create("graph_ops");
    TCase *tc = NULL;

    tc = tcase_create("matmul");
    tcase_add_test(tc, test_matmul);
    suite_add_tcase(s, tc);

    tc = tcase_create("elementwise");
    tcase_add_test(tc, test_add_mul_scale);
    tcase_add_test(tc, test_activations);
    tcase_add_test(tc, test_f16_operands);
    suite_add_tcase(s, tc);

    tc = tcase_create("reductions");
    tcase_add_test(tc, test_softmax);
    tcase_add_test(tc, test_topk);
    tcase_add_test(tc, test_norms);
    tcase_add_test(tc, test_mean_l2norm);
    suite_add_tcase(s, tc);

    tc = tcase_create("rows");
    tcase_add_test(tc, test_gather_scatter);
    suite_add_tcase(s, tc);

    tc = tcase_create("movement");
    tcase_add_test(tc, test_reshape);
    tcase_add_test(tc, test_reshape_storage);
    tcase_add_test(tc, test_view_transpose_concat);
    suite_add_tcase(s, tc);

    tc = tcase_create("batch");
    tcase_add_test(tc, test_batched);
    suite_add_tcase(s, tc);

    return s;
}

int main(void)
{
    return test_run_suite(graph_ops_suite());
}
