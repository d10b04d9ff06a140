/* The backward of the MoE layer's rows (the fused mixture, the grouped
 * router), called directly through the row (op.h's contract) the way the
 * reverse-mode engine will: a forward graph with inputs, graph inputs for
 * the upstream gradients (random dy ...), the row's backward, the returned
 * gradient nodes and the registered expert gradients marked as outputs,
 * planned, computed and compared with central finite differences of a
 * float64 host reference of the forward, with loss = sum(dy .* y).
 *
 * Shapes are small and odd (T 7, d_in 13, d_out 11, ranks 3 and 2, groups
 * of 2 and 3 experts); data are random, never zero; the whole arena is
 * filled with NaN after planning, so that an element the backward never
 * writes fails, and every comparison fails on NaN.  Links the library's
 * objects (lib/libatmoe_core.la) for its internal headers. */
#include <config.h>

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "graph/trainable.h"
#include "moe/experts.h"
#include "testutil.h"

static atmoe_context *CTX;
static test_rng RNG;

#define OK(expr) ck_assert_status((expr), CTX)

/* Tolerance, relative to the largest |reference| of each gradient.  The
 * loss is linear in every single weight, so central differences are exact
 * up to float64 rounding (1e-13); what is left is the device's f32: sums
 * of at most T d_out = 77 terms per GEMM, chained through two GEMMs and
 * the mix (about 3 * 77 * 6e-8 = 1.4e-5 of the scale in the worst case).
 * The largest error seen is 3e-7 (y: 1e-7). */
#define TOL_GRAD 5e-5

/* ------------------------------------------------------------------ data */

static float *rnd(size_t n, double lo, double hi)
{
    float *p = malloc((n ? n : 1) * sizeof *p);
    ck_assert_ptr_nonnull(p);
    test_fill_uniform(&RNG, p, n, lo, hi);
    return p;
}

static double *dup_d(const float *p, size_t n)
{
    double *d = malloc((n ? n : 1) * sizeof *d);
    ck_assert_ptr_nonnull(d);
    for (size_t i = 0; i < n; i++)
        d[i] = p[i];
    return d;
}

/* got[i] against want[i] within tol of max |want| (NaN fails). */
static void expect_grad(const char *what, const float *got,
                        const double *want, size_t n, double tol)
{
    double scale = 0.0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(want[i]));
    ck_assert_msg(scale > 0.0, "%s: the reference gradient is all zero",
                  what);
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - want[i]) / scale;
        ck_assert_msg(e <= tol,
                      "%s[%zu] = %.9g, finite differences %.9g: error %.3g "
                      "of %.4g (tolerance %g)",
                      what, i, got[i], want[i], e, scale, tol);
    }
}

/* Fills the planned arena with NaN. */
static void poison_arena(atmoe_graph *g)
{
    float nan = NAN;
    cl_int err = clEnqueueFillBuffer(g->ctx->queue, g->arena, &nan,
                                     sizeof nan, 0, g->memory.arena_bytes,
                                     0, NULL, NULL);
    ck_assert_int_eq(err, CL_SUCCESS);
    ck_assert_int_eq(clFinish(g->ctx->queue), CL_SUCCESS);
}

static atmoe_node input(atmoe_graph *g, const char *name, atmoe_dtype dt,
                        size_t rows, size_t cols, int batched)
{
    size_t shape[2] = {rows, cols};
    atmoe_node n;
    OK(atmoe_graph_input(g, name, dt, cols ? 2 : 1, shape, batched, &n));
    return n;
}

static float *read_node(atmoe_graph *g, atmoe_node n, size_t count)
{
    float *p = malloc((count ? count : 1) * sizeof *p);
    ck_assert_ptr_nonnull(p);
    test_poison(p, count);
    OK(atmoe_graph_read(g, n, p, count * sizeof *p));
    return p;
}

/* Calls node's backward as the engine would, with grad_out[0] = dy. */
static atmoe_status call_backward(atmoe_graph *g, atmoe_node node,
                                  const int *grad_out,
                                  const unsigned char *need, int *grad_in)
{
    return g->nodes[node].op->backward(g, node, grad_out, need, grad_in);
}

static int count_op(const atmoe_graph *g, const char *name)
{
    int c = 0;
    for (size_t i = 0; i < g->count; i++)
        c += strcmp(atm_node_op_name(&g->nodes[i]), name) == 0;
    return c;
}

/* -------------------------------------------------------- the mixture */

#define MAX_EXPERTS 8
#define MAX_CH 32

typedef enum { GATES_TOKEN, GATES_SEQUENCE, GATES_SINGLE } gates_kind;

/* One mixture case: its configuration, then the host data. */
typedef struct mcase {
    const char *name;
    atmoe_mix mix;
    size_t T, d_in, d_out;
    int n; /* experts (block, diagonal) */
    int group[MAX_EXPERTS];
    size_t rank[MAX_EXPERTS];
    size_t rank_p; /* general LoRA's rank, 0: none */
    float lambda;
    size_t r1, r2; /* dense */
    gates_kind gates;
    size_t S;      /* sequences (GATES_SEQUENCE) */
    int has_bias;
    float c;
    unsigned train[MAX_EXPERTS + 1]; /* per set index */
    atmoe_merge merge;

    /* derived */
    size_t count;  /* set entries: experts (+ general) */
    size_t R, Z, width, rows;
    int chan_e[MAX_CH];
    double chan_s[MAX_CH];
    size_t offset[MAX_EXPERTS + 1], erank[MAX_EXPERTS + 1];
    /* data */
    float *x, *w0, *bias, *g, *A, *Bt, *dy; /* g: the gates; A [R, d_in], Bt [Z, d_out] */
    int *gidx;
} mcase;

/* z = M(gates) u for token t, float64, as cl/mixture.cl. */
static void ref_mix(const mcase *m, const double *g, const int *gidx,
                    size_t t, const double *u, double *z)
{
    const double *row = NULL;
    size_t gr = m->gates == GATES_TOKEN ? t
                : m->gates == GATES_SINGLE ? 0
                                           : (size_t)gidx[t];
    if (m->gates != GATES_SEQUENCE || (gidx[t] >= 0 && (size_t)gidx[t] < m->rows))
        row = g + gr * m->width;
    if (m->mix == ATMOE_MIX_DENSE) {
        for (size_t j = 0; j < m->Z; j++) {
            double acc = 0.0;
            for (size_t i = 0; row && i < m->R; i++)
                acc += row[i * m->Z + j] * u[i];
            z[j] = acc;
        }
        return;
    }
    for (size_t r = 0; r < m->R; r++) {
        int e = m->chan_e[r];
        double gate = m->mix == ATMOE_MIX_DIAGONAL ? (row ? row[r] : 0.0)
                      : e < 0                      ? 1.0
                      : row                        ? row[e]
                                                   : 0.0;
        z[r] = u[r] * m->chan_s[r] * gate;
    }
}

/* The parameters the finite differences move, float64. */
typedef struct mparams {
    double *x, *w0, *bias, *gates, *A, *Bt;
} mparams;

static double ref_loss(const mcase *m, const mparams *p, double *y_out)
{
    double loss = 0.0, u[MAX_CH], z[MAX_CH];
    for (size_t t = 0; t < m->T; t++) {
        const double *xt = p->x + t * m->d_in;
        for (size_t r = 0; r < m->R; r++) {
            double acc = 0.0;
            for (size_t k = 0; k < m->d_in; k++)
                acc += xt[k] * p->A[r * m->d_in + k];
            u[r] = acc;
        }
        ref_mix(m, p->gates, m->gidx, t, u, z);
        for (size_t j = 0; j < m->d_out; j++) {
            double y = m->has_bias ? p->bias[j] : 0.0;
            for (size_t k = 0; k < m->d_in; k++)
                y += xt[k] * p->w0[j * m->d_in + k];
            double e = 0.0;
            for (size_t q = 0; q < m->Z; q++)
                e += z[q] * p->Bt[q * m->d_out + j];
            y += m->c * e;
            if (y_out)
                y_out[t * m->d_out + j] = y;
            loss += m->dy[t * m->d_out + j] * y;
        }
    }
    return loss;
}

/* dL/dv by central differences over every element of v (n of them). */
static double *fd_grad(const mcase *m, mparams *p, double *v, size_t n)
{
    double *g = malloc((n ? n : 1) * sizeof *g);
    ck_assert_ptr_nonnull(g);
    for (size_t i = 0; i < n; i++) {
        double keep = v[i], h = 1e-3;
        v[i] = keep + h;
        double lp = ref_loss(m, p, NULL);
        v[i] = keep - h;
        double lm = ref_loss(m, p, NULL);
        v[i] = keep;
        g[i] = (lp - lm) / (2 * h);
    }
    return g;
}

static void mcase_setup(mcase *m)
{
    int dense = m->mix == ATMOE_MIX_DENSE;
    m->count = dense ? 1 : (size_t)m->n + (m->rank_p ? 1 : 0);
    size_t R = 0;
    if (dense) {
        m->R = m->r1;
        m->Z = m->r2;
        m->offset[0] = 0;
        m->erank[0] = m->r1;
    } else {
        for (int e = 0; e < m->n; e++) {
            m->offset[e] = R;
            m->erank[e] = m->rank[e];
            R += m->rank[e];
        }
        if (m->rank_p) {
            m->offset[m->n] = R;
            m->erank[m->n] = m->rank_p;
            R += m->rank_p;
        }
        m->R = m->Z = R;
    }
    ck_assert_uint_le(m->R, MAX_CH);
    m->width = m->mix == ATMOE_MIX_BLOCK      ? (size_t)m->n
               : m->mix == ATMOE_MIX_DIAGONAL ? m->R
                                              : m->r1 * m->r2;
    m->rows = m->gates == GATES_TOKEN      ? m->T
              : m->gates == GATES_SEQUENCE ? m->S
                                           : 1;
    m->x = rnd(m->T * m->d_in, -1, 1);
    m->w0 = rnd(m->d_out * m->d_in, -0.5, 0.5);
    m->bias = rnd(m->d_out, -0.5, 0.5);
    m->g = rnd(m->rows * m->width, 0.1, 1);
    m->A = rnd(m->R * m->d_in, -0.5, 0.5);
    m->Bt = rnd(m->Z * m->d_out, -0.5, 0.5);
    m->dy = rnd(m->T * m->d_out, -1, 1);
    m->gidx = malloc(m->T * sizeof *m->gidx);
    ck_assert_ptr_nonnull(m->gidx);
    for (size_t t = 0; t < m->T; t++)
        m->gidx[t] = (int)(t % (m->S ? m->S : 1));
    /* One token outside the gate rows: it reads none (and gives none). */
    if (m->gates == GATES_SEQUENCE)
        m->gidx[m->T / 2] = -1;
}

static void mcase_free(mcase *m)
{
    free(m->x);
    free(m->w0);
    free(m->bias);
    free(m->g);
    free(m->A);
    free(m->Bt);
    free(m->dy);
    free(m->gidx);
}

/* The library's set for m, with m's trainable flags; fills the channel
 * tables from the set's own description. */
static atmoe_experts *mcase_set(mcase *m)
{
    atmoe_experts *set;
    OK(atmoe_experts_new(CTX, m->d_in, m->d_out, &set));
    /* B [d_out, rank] from the stacked Bt. */
    float *b = malloc(m->d_out * MAX_CH * sizeof *b);
    ck_assert_ptr_nonnull(b);
    if (m->mix == ATMOE_MIX_DENSE) {
        for (size_t j = 0; j < m->d_out; j++)
            for (size_t r = 0; r < m->r2; r++)
                b[j * m->r2 + r] = m->Bt[r * m->d_out + j];
        OK(atmoe_experts_set_dense(set, m->r1, m->A, m->r2, b));
    } else {
        for (size_t e = 0; e < m->count; e++) {
            size_t rk = m->erank[e], off = m->offset[e];
            for (size_t j = 0; j < m->d_out; j++)
                for (size_t r = 0; r < rk; r++)
                    b[j * rk + r] = m->Bt[(off + r) * m->d_out + j];
            const float *a = m->A + off * m->d_in;
            float alpha = 1.0f + 0.5f * (float)e;
            if ((int)e < m->n)
                OK(atmoe_experts_add(set, m->group[e], rk, a, b, alpha, 0,
                                     NULL));
            else
                OK(atmoe_experts_set_general(set, rk, a, b, alpha, 0,
                                             m->lambda));
            double s = alpha / (double)rk;
            for (size_t r = 0; r < rk; r++) {
                m->chan_e[off + r] = (int)e < m->n ? (int)e : -1;
                m->chan_s[off + r] =
                    (int)e < m->n ? s * m->lambda : s * (1.0 - m->lambda);
            }
        }
    }
    free(b);
    for (size_t e = 0; e < m->count; e++)
        OK(atmoe_experts_set_trainable(set, e, m->train[e]));
    return set;
}

static void run_mixture_case(mcase *m)
{
    mcase_setup(m);
    atmoe_experts *set = mcase_set(m);
    int seq = m->gates == GATES_SEQUENCE;
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node x = input(g, "x", ATMOE_DTYPE_F32, m->T, m->d_in, 1);
    atmoe_node w0 = input(g, "w0", ATMOE_DTYPE_F32, m->d_out, m->d_in, 0);
    atmoe_node bias = m->has_bias
                          ? input(g, "bias", ATMOE_DTYPE_F32, m->d_out, 0, 0)
                          : ATMOE_NODE_NONE;
    atmoe_node gates = input(g, "gates", ATMOE_DTYPE_F32, m->rows, m->width,
                             m->gates == GATES_TOKEN);
    atmoe_node gidx = seq ? input(g, "gidx", ATMOE_DTYPE_I32, m->T, 0, 1)
                          : ATMOE_NODE_NONE;
    atmoe_node dy = input(g, "dy", ATMOE_DTYPE_F32, m->T, m->d_out, 1);
    atmoe_node y;
    OK(atmoe_graph_mixture(g, x, w0, bias, set, m->mix, gates, gidx, m->c,
                           &y));
    if (m->merge != ATMOE_MERGE_AUTO)
        OK(atmoe_graph_mixture_set_merge(g, y, m->merge));
    OK(atmoe_graph_set_name(g, y, "mix"));

    int grad_out[3] = {dy, ATMOE_NODE_NONE, ATMOE_NODE_NONE};
    unsigned char need[ATM_MAX_SRC] = {1, 1, 1, 1, 1};
    int grad_in[ATM_MAX_SRC];
    OK(call_backward(g, y, grad_out, need, grad_in));
    ck_assert_int_eq(grad_in[4], ATMOE_NODE_NONE); /* gate_index: none */
    ck_assert_int_eq(grad_in[2] == ATMOE_NODE_NONE, !m->has_bias);
    OK(atmoe_graph_mark_output(g, y));
    for (int i = 0; i < 4; i++)
        if (grad_in[i] != ATMOE_NODE_NONE)
            OK(atmoe_graph_mark_output(g, grad_in[i]));
    /* Exactly the trainable A and B of the set are registered. */
    size_t want_entries = 0;
    for (size_t e = 0; e < m->count; e++)
        want_entries += !!(m->train[e] & ATMOE_TRAIN_A) +
                        !!(m->train[e] & ATMOE_TRAIN_B);
    ck_assert_uint_eq(atm_graph_trainable_count(g), want_entries);
    for (size_t i = 0; i < atm_graph_trainable_count(g); i++)
        OK(atmoe_graph_mark_output(g, atm_graph_trainable_at(g, i)->grad));

    OK(atmoe_graph_plan(g, 0));
    poison_arena(g);
    OK(atmoe_graph_set_input(g, x, m->x, m->T * m->d_in * 4, m->T));
    OK(atmoe_graph_set_input(g, w0, m->w0, m->d_out * m->d_in * 4, 0));
    if (m->has_bias)
        OK(atmoe_graph_set_input(g, bias, m->bias, m->d_out * 4, 0));
    OK(atmoe_graph_set_input(g, gates, m->g, m->rows * m->width * 4,
                             m->gates == GATES_TOKEN ? m->T : 0));
    if (seq)
        OK(atmoe_graph_set_input(g, gidx, m->gidx, m->T * 4, m->T));
    OK(atmoe_graph_set_input(g, dy, m->dy, m->T * m->d_out * 4, m->T));
    OK(atmoe_graph_compute(g, 0));

    mparams p = {dup_d(m->x, m->T * m->d_in),
                 dup_d(m->w0, m->d_out * m->d_in), dup_d(m->bias, m->d_out),
                 dup_d(m->g, m->rows * m->width),
                 dup_d(m->A, m->R * m->d_in), dup_d(m->Bt, m->Z * m->d_out)};
    char what[160];
    /* The forward first: the reference is the library's forward. */
    double *yref = malloc(m->T * m->d_out * sizeof *yref);
    ref_loss(m, &p, yref);
    float *got = read_node(g, y, m->T * m->d_out);
    snprintf(what, sizeof what, "%s: y", m->name);
    expect_grad(what, got, yref, m->T * m->d_out, 2e-6);
    free(got);
    free(yref);

    struct {
        const char *name;
        double *v;
        size_t n;
    } ops[4] = {{"dx", p.x, m->T * m->d_in},
                {"dW0", p.w0, m->d_out * m->d_in},
                {"dbias", p.bias, m->d_out},
                {"dgates", p.gates, m->rows * m->width}};
    for (int i = 0; i < 4; i++) {
        if (grad_in[i] == ATMOE_NODE_NONE)
            continue;
        double *want = fd_grad(m, &p, ops[i].v, ops[i].n);
        got = read_node(g, grad_in[i], ops[i].n);
        snprintf(what, sizeof what, "%s: %s", m->name, ops[i].name);
        expect_grad(what, got, want, ops[i].n, TOL_GRAD);
        free(got);
        free(want);
    }

    double *dA = fd_grad(m, &p, p.A, m->R * m->d_in);
    double *dB = fd_grad(m, &p, p.Bt, m->Z * m->d_out);
    for (size_t e = 0; e < m->count; e++) {
        char who[32], name[ATM_TRAINABLE_NAME_SIZE];
        if (m->mix == ATMOE_MIX_DENSE)
            snprintf(who, sizeof who, "dense");
        else if ((int)e == m->n)
            snprintf(who, sizeof who, "general");
        else
            snprintf(who, sizeof who, "expert%zu", e);
        for (int ab = 0; ab < 2; ab++) {
            unsigned flag = ab ? ATMOE_TRAIN_B : ATMOE_TRAIN_A;
            snprintf(name, sizeof name, "mix/%s/%s", who, ab ? "B_T" : "A");
            const atm_trainable *t = atm_graph_trainable_find(g, name);
            if (!(m->train[e] & flag)) {
                ck_assert_msg(t == NULL, "%s: frozen %s is registered",
                              m->name, name);
                continue;
            }
            ck_assert_msg(t != NULL, "%s: %s is not registered", m->name,
                          name);
            size_t cols = ab ? m->d_out : m->d_in;
            size_t rows = ab && m->mix == ATMOE_MIX_DENSE ? m->r2 : m->erank[e];
            ck_assert_uint_eq(t->count, rows * cols);
            ck_assert_uint_eq(t->shape[0], rows);
            ck_assert_uint_eq(t->shape[1], cols);
            const double *want = (ab ? dB : dA) + m->offset[e] * cols;
            size_t all = (ab ? m->Z : m->R) * cols;
            float *gall = read_node(g, t->grad, all);
            snprintf(what, sizeof what, "%s: %s", m->name, name);
            expect_grad(what, gall + t->grad_offset, want, t->count,
                        TOL_GRAD);
            /* The range is the expert's rows of the set's storage. */
            const atmoe_tensor *store = ab ? set->bt : set->a;
            ck_assert_ptr_eq(t->buffer, store->buffer);
            ck_assert_uint_eq(t->offset, store->offset + m->offset[e] * cols);
            free(gall);
        }
    }
    free(dA);
    free(dB);
    free(p.x);
    free(p.w0);
    free(p.bias);
    free(p.gates);
    free(p.A);
    free(p.Bt);
    atmoe_graph_free(g);
    atmoe_experts_free(set);
    mcase_free(m);
}

/* Groups of 2 and 3 experts, ranks 3 and 2 alternating. */
static void five_experts(mcase *m)
{
    static const int group[5] = {0, 0, 1, 1, 1};
    m->n = 5;
    for (int e = 0; e < 5; e++) {
        m->group[e] = group[e];
        m->rank[e] = e % 2 ? 2 : 3;
    }
}

START_TEST(test_mixture_block)
{
    CTX = test_context();
    test_rng_seed(&RNG, 11);
    /* Per-token gates, the general LoRA with lambda, a bias, all
     * trainable. */
    mcase m = {.name = "block, per token, general", .mix = ATMOE_MIX_BLOCK,
               .T = 7, .d_in = 13, .d_out = 11, .rank_p = 2, .lambda = 0.7f,
               .gates = GATES_TOKEN, .has_bias = 1, .c = 0.8f};
    five_experts(&m);
    for (int e = 0; e < 6; e++)
        m.train[e] = ATMOE_TRAIN_A | ATMOE_TRAIN_B;
    run_mixture_case(&m);

    /* Per-sequence gates (one token outside them), frozen experts: 1 and 3
     * frozen, 0 trains A only, 2 B only, the general LoRA both. */
    mcase s = {.name = "block, per sequence, frozen",
               .mix = ATMOE_MIX_BLOCK, .T = 7, .d_in = 13, .d_out = 11,
               .rank_p = 3, .lambda = 0.4f, .gates = GATES_SEQUENCE, .S = 3,
               .c = 1.3f};
    five_experts(&s);
    s.train[0] = ATMOE_TRAIN_A;
    s.train[2] = ATMOE_TRAIN_B;
    s.train[4] = ATMOE_TRAIN_A | ATMOE_TRAIN_B;
    s.train[5] = ATMOE_TRAIN_A | ATMOE_TRAIN_B;
    run_mixture_case(&s);

    /* A single (one-hot) gate row, merged forward: the backward does not
     * care which path the forward took. */
    mcase o = {.name = "block, single one-hot row, merged",
               .mix = ATMOE_MIX_BLOCK, .T = 7, .d_in = 13, .d_out = 11,
               .gates = GATES_SINGLE, .has_bias = 1, .c = 1.0f,
               .merge = ATMOE_MERGE_ALWAYS};
    five_experts(&o);
    o.lambda = 1.0f;
    for (int e = 0; e < 5; e++)
        o.train[e] = ATMOE_TRAIN_A | ATMOE_TRAIN_B;
    run_mixture_case(&o);
    atmoe_context_free(CTX);
}
END_TEST

START_TEST(test_mixture_diagonal)
{
    CTX = test_context();
    test_rng_seed(&RNG, 12);
    mcase m = {.name = "diagonal, per token, general",
               .mix = ATMOE_MIX_DIAGONAL, .T = 7, .d_in = 13, .d_out = 11,
               .rank_p = 2, .lambda = 0.6f, .gates = GATES_TOKEN,
               .has_bias = 1, .c = 0.9f};
    five_experts(&m);
    m.n = 3;
    for (int e = 0; e < 4; e++)
        m.train[e] = ATMOE_TRAIN_A | ATMOE_TRAIN_B;
    m.train[1] = 0;
    run_mixture_case(&m);

    mcase s = {.name = "diagonal, single row", .mix = ATMOE_MIX_DIAGONAL,
               .T = 5, .d_in = 13, .d_out = 11, .gates = GATES_SINGLE,
               .c = 0.5f, .merge = ATMOE_MERGE_NEVER};
    five_experts(&s);
    s.lambda = 1.0f;
    s.train[3] = ATMOE_TRAIN_B;
    run_mixture_case(&s);

    mcase q = {.name = "diagonal, per sequence", .mix = ATMOE_MIX_DIAGONAL,
               .T = 7, .d_in = 13, .d_out = 11, .gates = GATES_SEQUENCE,
               .S = 2, .has_bias = 1, .c = 1.1f};
    five_experts(&q);
    q.lambda = 1.0f;
    q.train[1] = ATMOE_TRAIN_A;
    run_mixture_case(&q);
    atmoe_context_free(CTX);
}
END_TEST

START_TEST(test_mixture_dense)
{
    CTX = test_context();
    test_rng_seed(&RNG, 13);
    mcase m = {.name = "dense, per token", .mix = ATMOE_MIX_DENSE, .T = 7,
               .d_in = 13, .d_out = 11, .r1 = 3, .r2 = 2,
               .gates = GATES_TOKEN, .has_bias = 1, .c = 0.7f};
    m.train[0] = ATMOE_TRAIN_A | ATMOE_TRAIN_B;
    run_mixture_case(&m);

    mcase s = {.name = "dense, per sequence, A only", .mix = ATMOE_MIX_DENSE,
               .T = 7, .d_in = 13, .d_out = 11, .r1 = 3, .r2 = 2,
               .gates = GATES_SEQUENCE, .S = 3, .c = 1.2f};
    s.train[0] = ATMOE_TRAIN_A;
    run_mixture_case(&s);

    mcase o = {.name = "dense, single row, frozen", .mix = ATMOE_MIX_DENSE,
               .T = 5, .d_in = 13, .d_out = 11, .r1 = 3, .r2 = 2,
               .gates = GATES_SINGLE, .c = 1.0f};
    run_mixture_case(&o);
    atmoe_context_free(CTX);
}
END_TEST

/* A frozen set whose caller wants only the base's gradient runs no
 * rank-R work: no mixture_backward node, no registry entry. */
START_TEST(test_mixture_frozen_no_work)
{
    CTX = test_context();
    test_rng_seed(&RNG, 14);
    mcase m = {.mix = ATMOE_MIX_BLOCK, .T = 7, .d_in = 13, .d_out = 11,
               .gates = GATES_TOKEN, .has_bias = 1, .c = 1.0f};
    five_experts(&m);
    m.lambda = 1.0f;
    mcase_setup(&m);
    atmoe_experts *set = mcase_set(&m);
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node x = input(g, "x", ATMOE_DTYPE_F32, m.T, m.d_in, 1);
    atmoe_node w0 = input(g, "w0", ATMOE_DTYPE_F32, m.d_out, m.d_in, 0);
    atmoe_node bias = input(g, "bias", ATMOE_DTYPE_F32, m.d_out, 0, 0);
    atmoe_node gates = input(g, "gates", ATMOE_DTYPE_F32, m.T, m.width, 1);
    atmoe_node dy = input(g, "dy", ATMOE_DTYPE_F32, m.T, m.d_out, 1);
    atmoe_node y;
    OK(atmoe_graph_mixture(g, x, w0, bias, set, m.mix, gates,
                           ATMOE_NODE_NONE, 1.0f, &y));
    int grad_out[3] = {dy, ATMOE_NODE_NONE, ATMOE_NODE_NONE};
    unsigned char need[ATM_MAX_SRC] = {0, 1, 1, 0, 0};
    int grad_in[ATM_MAX_SRC];
    OK(call_backward(g, y, grad_out, need, grad_in));
    ck_assert_int_eq(count_op(g, "mixture_backward"), 0);
    ck_assert_uint_eq(atm_graph_trainable_count(g), 0);
    ck_assert_int_eq(grad_in[0], ATMOE_NODE_NONE);
    ck_assert_int_eq(grad_in[3], ATMOE_NODE_NONE);
    ck_assert_int_ne(grad_in[1], ATMOE_NODE_NONE);
    ck_assert_int_ne(grad_in[2], ATMOE_NODE_NONE);
    /* Nothing read downstream: no gradient at all. */
    int none[3] = {ATMOE_NODE_NONE, ATMOE_NODE_NONE, ATMOE_NODE_NONE};
    size_t before = g->count;
    OK(call_backward(g, y, none, need, grad_in));
    ck_assert_uint_eq(g->count, before);
    ck_assert_int_eq(grad_in[1], ATMOE_NODE_NONE);
    atmoe_graph_free(g);
    atmoe_experts_free(set);
    mcase_free(&m);
    atmoe_context_free(CTX);
}
END_TEST

START_TEST(test_mixture_bad_input)
{
    CTX = test_context();
    test_rng_seed(&RNG, 15);
    mcase m = {.mix = ATMOE_MIX_BLOCK, .T = 7, .d_in = 13, .d_out = 11,
               .rank_p = 2, .lambda = 0.5f, .gates = GATES_TOKEN, .c = 1.0f};
    five_experts(&m);
    mcase_setup(&m);
    atmoe_experts *set = mcase_set(&m);
    /* index == experts is the general LoRA; past it is out of range. */
    OK(atmoe_experts_set_trainable(set, 5, ATMOE_TRAIN_A));
    ck_assert_fails_with(atmoe_experts_set_trainable(set, 6, ATMOE_TRAIN_A),
                         CTX, ATMOE_STATUS_OUT_OF_RANGE, "index 6");
    ck_assert_fails_with(atmoe_experts_set_trainable(set, 0, 4u), CTX,
                         ATMOE_STATUS_INVALID_ARGUMENT, "unknown flags");
    ck_assert_fails_with(atmoe_experts_set_trainable(NULL, 0, 0), CTX,
                         ATMOE_STATUS_NULL_POINTER, "set");

    /* dL/dy of the wrong shape: refused, and nothing is added. */
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node x = input(g, "x", ATMOE_DTYPE_F32, m.T, m.d_in, 1);
    atmoe_node w0 = input(g, "w0", ATMOE_DTYPE_F32, m.d_out, m.d_in, 0);
    atmoe_node gates = input(g, "gates", ATMOE_DTYPE_F32, m.T, m.width, 1);
    atmoe_node dy = input(g, "dy", ATMOE_DTYPE_F32, m.T, m.d_in, 1);
    atmoe_node y;
    OK(atmoe_graph_mixture(g, x, w0, ATMOE_NODE_NONE, set, m.mix, gates,
                           ATMOE_NODE_NONE, 1.0f, &y));
    int grad_out[3] = {dy, ATMOE_NODE_NONE, ATMOE_NODE_NONE};
    unsigned char need[ATM_MAX_SRC] = {1, 1, 0, 1, 0};
    int grad_in[ATM_MAX_SRC];
    size_t before = g->count;
    ck_assert_fails_with(call_backward(g, y, grad_out, need, grad_in), CTX,
                         ATMOE_STATUS_SHAPE_MISMATCH, "dL/dy");
    ck_assert_uint_eq(g->count, before);
    ck_assert_uint_eq(atm_graph_trainable_count(g), 0);
    atmoe_graph_free(g);
    atmoe_experts_free(set);
    mcase_free(&m);
    atmoe_context_free(CTX);
}
END_TEST

static Suite *backward_suite(void)
{
    Suite *s = suite_create("moe_backward");
    TCase *tc = tcase_create("mixture");
    tcase_add_test(tc, test_mixture_block);
    tcase_add_test(tc, test_mixture_diagonal);
    tcase_add_test(tc, test_mixture_dense);
    tcase_add_test(tc, test_mixture_frozen_no_work);
    tcase_add_test(tc, test_mixture_bad_input);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(backward_suite());
}
