/* The backward of the MoE layer's rows (the fused mixture, the grouped
 * router), called directly through the row (op.h's contract) the way the
 * reverse-mode engine will: a forward graph with inputs, graph inputs for
 * the upstream gradients (random dy ...), the row's backward, the returned
 * gradient nodes and the registered expert gradients marked as outputs,
 * planned, computed and compared with central finite differences of a
 * float64 host reference of the forward, with loss = sum(dy .* y) (and
 * sum(dw .* w) + sum(da .* a) + sum(dd .* d) for the router).  A layer's
 * two rows are also chained, as the engine will chain them.
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
#include "base/half.h"
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
#define TOL_GRAD 2e-5

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
    size_t batch; /* tokens computed (0: T, the planned batch) */
    int w0_f16;   /* W0 stored in f16 (rounded on the host for the
                     reference) */

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
    if (m->w0_f16)
        for (size_t i = 0; i < m->d_out * m->d_in; i++)
            m->w0[i] = atm_f16_to_f32(atm_f32_to_f16(m->w0[i]));
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
    atmoe_node w0 = input(g, "w0",
                          m->w0_f16 ? ATMOE_DTYPE_F16 : ATMOE_DTYPE_F32,
                          m->d_out, m->d_in, 0);
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
    /* A smaller batch than planned computes its own tokens: the reference
     * is then that of the first `batch` tokens. */
    if (m->batch) {
        m->T = m->batch;
        if (m->gates == GATES_TOKEN)
            m->rows = m->T;
    }
    size_t T = m->T;
    OK(atmoe_graph_set_input(g, x, m->x, T * m->d_in * 4, T));
    if (m->w0_f16) {
        uint16_t *h = malloc(m->d_out * m->d_in * sizeof *h);
        ck_assert_ptr_nonnull(h);
        for (size_t i = 0; i < m->d_out * m->d_in; i++)
            h[i] = atm_f32_to_f16(m->w0[i]);
        OK(atmoe_graph_set_input(g, w0, h, m->d_out * m->d_in * 2, 0));
        free(h);
    } else {
        OK(atmoe_graph_set_input(g, w0, m->w0, m->d_out * m->d_in * 4, 0));
    }
    if (m->has_bias)
        OK(atmoe_graph_set_input(g, bias, m->bias, m->d_out * 4, 0));
    OK(atmoe_graph_set_input(g, gates, m->g, m->rows * m->width * 4,
                             m->gates == GATES_TOKEN ? T : 0));
    if (seq)
        OK(atmoe_graph_set_input(g, gidx, m->gidx, T * 4, T));
    OK(atmoe_graph_set_input(g, dy, m->dy, T * m->d_out * 4, T));
    OK(atmoe_graph_compute(g, T));
    /* A training step allocates nothing on the host. */
    atmoe_compute_stats cs;
    OK(atmoe_graph_get_compute_stats(g, &cs));
    ck_assert_uint_eq(cs.host_allocations, 0);

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

    /* W0 in f16 (dx reads its f32 copy), computed at 4 of the 7 planned
     * tokens. */
    mcase h = {.name = "block, f16 W0, batch 4", .mix = ATMOE_MIX_BLOCK,
               .T = 7, .d_in = 13, .d_out = 11, .rank_p = 2, .lambda = 0.5f,
               .gates = GATES_TOKEN, .has_bias = 1, .c = 1.0f, .batch = 4,
               .w0_f16 = 1};
    five_experts(&h);
    h.train[1] = ATMOE_TRAIN_A | ATMOE_TRAIN_B;
    h.train[5] = ATMOE_TRAIN_B;
    run_mixture_case(&h);
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

    mcase b = {.name = "diagonal, per sequence, batch 5",
               .mix = ATMOE_MIX_DIAGONAL, .T = 7, .d_in = 13, .d_out = 11,
               .gates = GATES_SEQUENCE, .S = 3, .c = 0.9f, .batch = 5};
    five_experts(&b);
    b.lambda = 1.0f;
    b.train[0] = b.train[4] = ATMOE_TRAIN_A | ATMOE_TRAIN_B;
    run_mixture_case(&b);
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

/* y of x (rows T) through a fresh graph over set, planned now. */
static float *forward_once(mcase *m, atmoe_experts *set)
{
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node x = input(g, "x", ATMOE_DTYPE_F32, m->T, m->d_in, 1);
    atmoe_node w0 = input(g, "w0", ATMOE_DTYPE_F32, m->d_out, m->d_in, 0);
    atmoe_node gates = input(g, "gates", ATMOE_DTYPE_F32, m->T, m->width, 1);
    atmoe_node y;
    OK(atmoe_graph_mixture(g, x, w0, ATMOE_NODE_NONE, set, m->mix, gates,
                           ATMOE_NODE_NONE, m->c, &y));
    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_plan(g, 0));
    OK(atmoe_graph_set_input(g, x, m->x, m->T * m->d_in * 4, m->T));
    OK(atmoe_graph_set_input(g, w0, m->w0, m->d_out * m->d_in * 4, 0));
    OK(atmoe_graph_set_input(g, gates, m->g, m->T * m->width * 4, m->T));
    OK(atmoe_graph_compute(g, 0));
    float *out = read_node(g, y, m->T * m->d_out);
    atmoe_graph_free(g);
    return out;
}

/* The optimiser updates an expert's B^T (the registered range) only; the
 * forward must follow it whatever route its batch takes (cl/linear.cl's
 * refreshes its copy of B from B^T before each run while a B trains, in a
 * graph planned before as well), and the set's second copy of B is
 * current again once no B trains. */
START_TEST(test_mixture_trained_b_forward)
{
    CTX = test_context();
    test_rng_seed(&RNG, 16);
    /* Two tokens: cl/linear.cl's route unless B trains. */
    mcase m = {.mix = ATMOE_MIX_BLOCK, .T = 2, .d_in = 13, .d_out = 11,
               .gates = GATES_TOKEN, .c = 1.0f};
    five_experts(&m);
    m.lambda = 1.0f;
    mcase_setup(&m);
    atmoe_experts *set = mcase_set(&m);
    /* A graph planned while B is frozen, on the linear route. */
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node x = input(g, "x", ATMOE_DTYPE_F32, m.T, m.d_in, 1);
    atmoe_node w0 = input(g, "w0", ATMOE_DTYPE_F32, m.d_out, m.d_in, 0);
    atmoe_node gates = input(g, "gates", ATMOE_DTYPE_F32, m.T, m.width, 1);
    atmoe_node y;
    OK(atmoe_graph_mixture(g, x, w0, ATMOE_NODE_NONE, set, m.mix, gates,
                           ATMOE_NODE_NONE, 1.0f, &y));
    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_plan(g, 0));
    OK(atmoe_graph_set_input(g, x, m.x, m.T * m.d_in * 4, m.T));
    OK(atmoe_graph_set_input(g, w0, m.w0, m.d_out * m.d_in * 4, 0));
    OK(atmoe_graph_set_input(g, gates, m.g, m.T * m.width * 4, m.T));
    OK(atmoe_graph_compute(g, 0));

    OK(atmoe_experts_set_trainable(set, 2, ATMOE_TRAIN_B));
    /* As the optimiser would: expert 2's B^T rows change on the device. */
    size_t n = m.Z * m.d_out;
    for (size_t i = m.offset[2] * m.d_out;
         i < (m.offset[2] + m.erank[2]) * m.d_out; i++)
        m.Bt[i] = -m.Bt[i] + 0.25f;
    OK(atmoe_tensor_write(set->bt, m.Bt, n * sizeof(float)));
    mparams p = {dup_d(m.x, m.T * m.d_in), dup_d(m.w0, m.d_out * m.d_in),
                 dup_d(m.bias, m.d_out), dup_d(m.g, m.rows * m.width),
                 dup_d(m.A, m.R * m.d_in), dup_d(m.Bt, n)};
    double *yref = malloc(m.T * m.d_out * sizeof *yref);
    ref_loss(&m, &p, yref);
    /* The graph planned before stays on the linear route, which copies
     * B^T into the set's second copy first: it follows the update. */
    OK(atmoe_graph_compute(g, 0));
    float *got = read_node(g, y, m.T * m.d_out);
    expect_grad("trained B, planned before", got, yref, m.T * m.d_out, 2e-6);
    free(got);
    atmoe_graph_free(g);

    got = forward_once(&m, set);
    expect_grad("trained B, forward", got, yref, m.T * m.d_out, 2e-6);
    free(got);
    /* Frozen again: the second copy is made current, and the linear
     * route reads it. */
    OK(atmoe_experts_set_trainable(set, 2, 0));
    got = forward_once(&m, set);
    expect_grad("trained B, frozen again", got, yref, m.T * m.d_out, 2e-6);
    free(got);
    free(yref);
    free(p.x);
    free(p.w0);
    free(p.bias);
    free(p.gates);
    free(p.A);
    free(p.Bt);
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


/* ---------------------------------------------------------- the router */

#define RG 3 /* groups, at most */
#define RM 3 /* experts per group, at most */

typedef struct rcase {
    const char *name;
    atmoe_router_form form;
    size_t rows, d_in;
    int batched; /* h per token (batched) or per sequence */
    int G, counts[RG];
    float tau_g, tau_d;
    int topk_g, topk_e;
    int gmask_off[RG], emask_off[RG * RM]; /* 1: switched off */
    float gfix[RG], efix[RG * RM];         /* 0: free (set below) */
    int has_da, has_dd;

    /* derived */
    int M, E, slot[RG * RM];
    float *h, *wg, *wd, *dw, *da, *dd; /* wd: W_D [d_in, G*M] or V_D [G, M] */
    double min_gap; /* of the top-k choices, unperturbed */
} rcase;

typedef struct rparams {
    double *h, *wg, *wd;
} rparams;

static void r_softmax(double *x, const int *keep, int n, double tau)
{
    double m = -INFINITY, sum = 0.0;
    for (int i = 0; i < n; i++)
        if (keep[i])
            m = fmax(m, x[i] / tau);
    for (int i = 0; i < n; i++) {
        x[i] = keep[i] ? exp(x[i] / tau - m) : 0.0;
        sum += x[i];
    }
    for (int i = 0; i < n; i++)
        x[i] = sum > 0.0 ? x[i] / sum : 0.0;
}

/* cl/router.cl's keep_top, noting the gap between the last kept and the
 * first dropped value. */
static void r_keep_top(const double *v, int *keep, int n, int k,
                       double *gap)
{
    if (k <= 0)
        return;
    int kept = 0;
    for (int i = 0; i < n; i++)
        kept += keep[i];
    double dropped = -INFINITY;
    for (; kept > k; kept--) {
        int worst = -1;
        for (int i = 0; i < n; i++)
            if (keep[i] && (worst < 0 || v[i] <= v[worst]))
                worst = i;
        keep[worst] = 0;
        dropped = fmax(dropped, v[worst]);
    }
    for (int i = 0; i < n; i++)
        if (keep[i] && dropped > -INFINITY)
            *gap = fmin(*gap, v[i] - dropped);
}

static void r_apply_fixed(double *v, const int *keep, const float *fixed,
                          int n)
{
    double fs = 0.0, free_sum = 0.0;
    for (int i = 0; i < n; i++) {
        if (!keep[i])
            continue;
        if (isnan(fixed[i]))
            free_sum += v[i];
        else
            fs += fixed[i];
    }
    double room = fmax(1.0 - fs, 0.0);
    for (int i = 0; i < n; i++)
        v[i] = !keep[i]            ? 0.0
               : !isnan(fixed[i])  ? fixed[i]
               : free_sum > 0.0    ? v[i] * room / free_sum
                                   : 0.0;
}

/* The forward in float64 (cl/router.cl's steps) and the loss
 * sum(dw w) + sum(da a) + sum(dd d); outputs may be NULL. */
static double r_loss(rcase *c, const rparams *p, double *a_out,
                     double *d_out, double *w_out)
{
    int G = c->G, M = c->M;
    double loss = 0.0;
    for (size_t r = 0; r < c->rows; r++) {
        const double *h = p->h + r * c->d_in;
        double a[RG], d[RG * RM];
        int keep_g[RG], free_g[RG];
        for (int g = 0; g < G; g++) {
            double acc = 0.0;
            for (size_t k = 0; k < c->d_in; k++)
                acc += h[k] * p->wg[k * G + g];
            a[g] = acc;
            int any = 0;
            for (int m = 0; m < c->counts[g]; m++)
                any |= !c->emask_off[g * M + m];
            keep_g[g] = !c->gmask_off[g] && any;
        }
        r_softmax(a, keep_g, G, c->tau_g);
        for (int g = 0; g < G; g++)
            free_g[g] = keep_g[g] && isnan(c->gfix[g]);
        r_keep_top(a, free_g, G, c->topk_g, &c->min_gap);
        for (int g = 0; g < G; g++)
            keep_g[g] = free_g[g] || (keep_g[g] && !isnan(c->gfix[g]));
        r_apply_fixed(a, keep_g, c->gfix, G);
        for (int g = 0; g < G; g++) {
            double *dg = d + g * M;
            int keep_e[RM], free_e[RM];
            for (int m = 0; m < M; m++) {
                keep_e[m] = m < c->counts[g] && !c->emask_off[g * M + m];
                double acc = 0.0;
                if (c->form == ATMOE_ROUTER_PROJECTED)
                    for (size_t k = 0; k < c->d_in; k++)
                        acc += h[k] * p->wd[k * G * M + g * M + m];
                else
                    acc = a[g] * p->wd[g * M + m];
                dg[m] = acc;
            }
            r_softmax(dg, keep_e, M, c->tau_d);
            for (int m = 0; m < M; m++)
                free_e[m] = keep_e[m] && isnan(c->efix[g * M + m]);
            r_keep_top(dg, free_e, M, c->topk_e, &c->min_gap);
            for (int m = 0; m < M; m++)
                keep_e[m] = free_e[m] ||
                            (keep_e[m] && !isnan(c->efix[g * M + m]));
            r_apply_fixed(dg, keep_e, c->efix + g * M, M);
            for (int m = 0; m < M; m++)
                if (!keep_g[g])
                    dg[m] = 0.0;
        }
        for (int g = 0; g < G; g++) {
            if (c->has_da)
                loss += c->da[r * G + g] * a[g];
            if (a_out)
                a_out[r * G + g] = a[g];
        }
        for (int s = 0; s < G * M; s++) {
            if (c->has_dd)
                loss += c->dd[r * G * M + s] * d[s];
            if (d_out)
                d_out[r * G * M + s] = d[s];
        }
        for (int e = 0; e < c->E; e++) {
            int s = c->slot[e];
            double w = a[s / M] * d[s];
            loss += c->dw[r * c->E + e] * w;
            if (w_out)
                w_out[r * c->E + e] = w;
        }
    }
    return loss;
}

static double *r_fd(rcase *c, rparams *p, double *v, size_t n)
{
    double *g = malloc((n ? n : 1) * sizeof *g);
    ck_assert_ptr_nonnull(g);
    double gap = c->min_gap;
    for (size_t i = 0; i < n; i++) {
        double keep = v[i], h = 1e-6;
        v[i] = keep + h;
        double lp = r_loss(c, p, NULL, NULL, NULL);
        v[i] = keep - h;
        double lm = r_loss(c, p, NULL, NULL, NULL);
        v[i] = keep;
        g[i] = (lp - lm) / (2 * h);
    }
    c->min_gap = gap;
    return g;
}

/* Tolerance of the router's gradients, relative to the largest |FD|:
 * central differences with step 1e-6 in float64 carry 1e-9 of truncation
 * and rounding; the device's f32 forward weights (within 2e-5, see
 * tests/test_moe.c) and the backward's own sums over d_in = 13 and
 * rows <= 7 give the rest.  The largest error seen is 1e-6. */
#define TOL_ROUTER_GRAD 2e-5

static void run_router_case(rcase *c)
{
    int G = c->G;
    c->M = 0;
    c->E = 0;
    for (int g = 0; g < G; g++)
        c->M = c->counts[g] > c->M ? c->counts[g] : c->M;
    int M = c->M;
    for (int g = 0; g < G; g++)
        for (int m = 0; m < c->counts[g]; m++)
            c->slot[c->E++] = g * M + m;
    for (int i = 0; i < RG; i++)
        if (c->gfix[i] == 0.0f)
            c->gfix[i] = NAN;
    for (int i = 0; i < RG * RM; i++)
        if (c->efix[i] == 0.0f)
            c->efix[i] = NAN;
    int projected = c->form == ATMOE_ROUTER_PROJECTED;
    size_t nwd = projected ? c->d_in * G * M : (size_t)G * M;
    c->h = rnd(c->rows * c->d_in, -1, 1);
    c->wg = rnd(c->d_in * G, -0.8, 0.8);
    c->wd = rnd(nwd, projected ? -0.8 : -3, projected ? 0.8 : 3);
    c->dw = rnd(c->rows * c->E, -1, 1);
    c->da = rnd(c->rows * G, -1, 1);
    c->dd = rnd(c->rows * G * M, -1, 1);

    /* The set: experts in group order, so expert e is slot[e]. */
    atmoe_experts *set;
    size_t d_out = 5;
    OK(atmoe_experts_new(CTX, c->d_in, d_out, &set));
    float *ea = rnd(c->d_in, -0.5, 0.5), *eb = rnd(d_out, -0.5, 0.5);
    for (int g = 0; g < G; g++)
        for (int m = 0; m < c->counts[g]; m++)
            OK(atmoe_experts_add(set, g, 1, ea, eb, 1.0f, 0, NULL));
    free(ea);
    free(eb);
    atmoe_router *router;
    OK(atmoe_router_new(set, c->form, c->tau_g, c->tau_d, c->topk_g,
                        c->topk_e, &router));
    for (int g = 0; g < G; g++) {
        if (c->gmask_off[g])
            OK(atmoe_router_set_mask(router, g, -1, 0));
        if (!isnan(c->gfix[g]))
            OK(atmoe_router_set_fixed(router, g, -1, c->gfix[g]));
        for (int m = 0; m < c->counts[g]; m++) {
            if (c->emask_off[g * M + m])
                OK(atmoe_router_set_mask(router, g, m, 0));
            if (!isnan(c->efix[g * M + m]))
                OK(atmoe_router_set_fixed(router, g, m, c->efix[g * M + m]));
        }
    }

    atmoe_graph *gr;
    OK(atmoe_graph_new(CTX, &gr));
    atmoe_node h = input(gr, "h", ATMOE_DTYPE_F32, c->rows, c->d_in,
                         c->batched);
    atmoe_node wg = input(gr, "w_g", ATMOE_DTYPE_F32, c->d_in, G, 0);
    atmoe_node wd = projected
                        ? input(gr, "w_d", ATMOE_DTYPE_F32, c->d_in, G * M, 0)
                        : input(gr, "v_d", ATMOE_DTYPE_F32, G, M, 0);
    atmoe_node dw = input(gr, "dw", ATMOE_DTYPE_F32, c->rows, c->E,
                          c->batched);
    atmoe_node da = c->has_da ? input(gr, "da", ATMOE_DTYPE_F32, c->rows, G,
                                      c->batched)
                              : ATMOE_NODE_NONE;
    atmoe_node dd = c->has_dd ? input(gr, "dd", ATMOE_DTYPE_F32, c->rows,
                                      G * M, c->batched)
                              : ATMOE_NODE_NONE;
    atmoe_node a, d, w;
    OK(atmoe_graph_router(gr, h, router, wg, wd, &a, &d, &w));
    int grad_out[3] = {dw, da, dd};
    unsigned char need[ATM_MAX_SRC] = {1, 1, 1};
    int grad_in[ATM_MAX_SRC];
    OK(call_backward(gr, w, grad_out, need, grad_in));
    OK(atmoe_graph_mark_output(gr, w));
    for (int i = 0; i < 3; i++) {
        ck_assert_int_ne(grad_in[i], ATMOE_NODE_NONE);
        OK(atmoe_graph_mark_output(gr, grad_in[i]));
    }
    OK(atmoe_graph_plan(gr, 0));
    poison_arena(gr);
    size_t br = c->batched ? c->rows : 0;
    OK(atmoe_graph_set_input(gr, h, c->h, c->rows * c->d_in * 4, br));
    OK(atmoe_graph_set_input(gr, wg, c->wg, c->d_in * G * 4, 0));
    OK(atmoe_graph_set_input(gr, wd, c->wd, nwd * 4, 0));
    OK(atmoe_graph_set_input(gr, dw, c->dw, c->rows * c->E * 4, br));
    if (c->has_da)
        OK(atmoe_graph_set_input(gr, da, c->da, c->rows * G * 4, br));
    if (c->has_dd)
        OK(atmoe_graph_set_input(gr, dd, c->dd, c->rows * G * M * 4, br));
    OK(atmoe_graph_compute(gr, 0));

    rparams p = {dup_d(c->h, c->rows * c->d_in), dup_d(c->wg, c->d_in * G),
                 dup_d(c->wd, nwd)};
    c->min_gap = INFINITY;
    double *wref = malloc(c->rows * c->E * sizeof *wref);
    r_loss(c, &p, NULL, NULL, wref);
    /* Top-k on random data: a near tie would make the choice flip under
     * the finite differences' step. */
    ck_assert_msg(c->min_gap > 1e-3, "%s: top-k near tie (%g)", c->name,
                  c->min_gap);
    char what[160];
    float *got = read_node(gr, w, c->rows * c->E);
    snprintf(what, sizeof what, "%s: w", c->name);
    expect_grad(what, got, wref, c->rows * c->E, 1e-5);
    free(got);
    free(wref);
    struct {
        const char *name;
        double *v;
        size_t n;
    } ops[3] = {{"dh", p.h, c->rows * c->d_in},
                {"dW_G", p.wg, c->d_in * G},
                {projected ? "dW_D" : "dV_D", p.wd, nwd}};
    for (int i = 0; i < 3; i++) {
        double *want = r_fd(c, &p, ops[i].v, ops[i].n);
        got = read_node(gr, grad_in[i], ops[i].n);
        snprintf(what, sizeof what, "%s: %s", c->name, ops[i].name);
        expect_grad(what, got, want, ops[i].n, TOL_ROUTER_GRAD);
        free(got);
        free(want);
    }
    free(p.h);
    free(p.wg);
    free(p.wd);
    atmoe_graph_free(gr);
    atmoe_router_free(router);
    atmoe_experts_free(set);
    free(c->h);
    free(c->wg);
    free(c->wd);
    free(c->dw);
    free(c->da);
    free(c->dd);
}

START_TEST(test_router_projected)
{
    CTX = test_context();
    test_rng_seed(&RNG, 21);
    rcase c = {.name = "projected", .form = ATMOE_ROUTER_PROJECTED,
               .rows = 7, .d_in = 13, .batched = 1, .G = 2,
               .counts = {2, 3}, .tau_g = 0.7f, .tau_d = 1.3f, .has_da = 1,
               .has_dd = 1};
    run_router_case(&c);
    /* Top-k groups and experts; only dL/dw read. */
    rcase k = {.name = "projected, top-k", .form = ATMOE_ROUTER_PROJECTED,
               .rows = 7, .d_in = 13, .batched = 1, .G = 3,
               .counts = {2, 3, 2}, .tau_g = 1.1f, .tau_d = 0.9f,
               .topk_g = 2, .topk_e = 2};
    run_router_case(&k);
    /* Masks and fixed weights, per sequence. */
    rcase f = {.name = "projected, masks and fixed",
               .form = ATMOE_ROUTER_PROJECTED, .rows = 3, .d_in = 13,
               .G = 3, .counts = {2, 3, 2}, .tau_g = 0.8f, .tau_d = 1.0f,
               .has_da = 1, .has_dd = 1};
    f.gfix[2] = 0.25f;
    f.emask_off[1 * 3 + 1] = 1;
    f.efix[1 * 3 + 0] = 0.3f;
    run_router_case(&f);
    atmoe_context_free(CTX);
}
END_TEST

START_TEST(test_router_scaled)
{
    CTX = test_context();
    test_rng_seed(&RNG, 22);
    rcase c = {.name = "scaled", .form = ATMOE_ROUTER_SCALED, .rows = 7,
               .d_in = 13, .batched = 1, .G = 2, .counts = {2, 3},
               .tau_g = 1.2f, .tau_d = 0.8f, .has_da = 1, .has_dd = 1};
    run_router_case(&c);
    rcase k = {.name = "scaled, top-k, masks, fixed",
               .form = ATMOE_ROUTER_SCALED, .rows = 7, .d_in = 13,
               .batched = 1, .G = 3, .counts = {2, 3, 2}, .tau_g = 0.9f,
               .tau_d = 1.4f, .topk_g = 2, .topk_e = 2, .has_dd = 1};
    k.emask_off[2 * 3 + 1] = 1;
    k.efix[1 * 3 + 2] = 0.2f;
    run_router_case(&k);
    rcase s = {.name = "scaled, per sequence", .form = ATMOE_ROUTER_SCALED,
               .rows = 3, .d_in = 13, .G = 3, .counts = {2, 3, 2},
               .tau_g = 1.0f, .tau_d = 0.6f, .has_da = 1};
    /* A fixed group: the free ones share what is left. */
    s.gfix[0] = 0.3f;
    s.emask_off[1 * 3 + 0] = 1;
    run_router_case(&s);
    /* A group masked off. */
    rcase o = {.name = "scaled, a group masked", .form = ATMOE_ROUTER_SCALED,
               .rows = 5, .d_in = 13, .batched = 1, .G = 3,
               .counts = {2, 3, 2}, .tau_g = 1.0f, .tau_d = 1.0f,
               .has_da = 1, .has_dd = 1};
    o.gmask_off[1] = 1;
    run_router_case(&o);
    atmoe_context_free(CTX);
}
END_TEST

START_TEST(test_router_bad_input)
{
    CTX = test_context();
    test_rng_seed(&RNG, 23);
    atmoe_experts *set;
    OK(atmoe_experts_new(CTX, 13, 5, &set));
    float *ea = rnd(13, -0.5, 0.5), *eb = rnd(5, -0.5, 0.5);
    for (int e = 0; e < 3; e++)
        OK(atmoe_experts_add(set, e / 2, 1, ea, eb, 1.0f, 0, NULL));
    free(ea);
    free(eb);
    atmoe_router *router;
    OK(atmoe_router_new(set, ATMOE_ROUTER_PROJECTED, 1.0f, 1.0f, 0, 0,
                        &router));
    atmoe_graph *gr;
    OK(atmoe_graph_new(CTX, &gr));
    atmoe_node h = input(gr, "h", ATMOE_DTYPE_F32, 7, 13, 1);
    atmoe_node wg = input(gr, "w_g", ATMOE_DTYPE_F32, 13, 2, 0);
    atmoe_node wd = input(gr, "w_d", ATMOE_DTYPE_F32, 13, 4, 0);
    atmoe_node bad = input(gr, "dw", ATMOE_DTYPE_F32, 7, 4, 1);
    atmoe_node w;
    OK(atmoe_graph_router(gr, h, router, wg, wd, NULL, NULL, &w));
    int grad_out[3] = {bad, ATMOE_NODE_NONE, ATMOE_NODE_NONE};
    unsigned char need[ATM_MAX_SRC] = {1, 1, 1};
    int grad_in[ATM_MAX_SRC];
    size_t before = gr->count;
    ck_assert_fails_with(call_backward(gr, w, grad_out, need, grad_in), CTX,
                         ATMOE_STATUS_SHAPE_MISMATCH, "dL/dw");
    ck_assert_uint_eq(gr->count, before);
    /* No output read: no gradient, nothing added. */
    int none[3] = {ATMOE_NODE_NONE, ATMOE_NODE_NONE, ATMOE_NODE_NONE};
    OK(call_backward(gr, w, none, need, grad_in));
    ck_assert_uint_eq(gr->count, before);
    ck_assert_int_eq(grad_in[0], ATMOE_NODE_NONE);
    atmoe_graph_free(gr);
    atmoe_router_free(router);
    atmoe_experts_free(set);
    atmoe_context_free(CTX);
}
END_TEST

/* ----------------------------------------------------- router + mixture */

/* An AT-MoE layer routed per token (h = x, gates = the router's w): the
 * loss sum(dy .* y) through both rows' backward, chained as the engine
 * will chain them (the mixture's d(gates) is the router's dL/dw, and x
 * gets both rows' contributions). */
static double layer_loss(mcase *m, mparams *mp, rcase *c, rparams *rp)
{
    double *w = malloc(m->T * (size_t)c->E * sizeof *w);
    ck_assert_ptr_nonnull(w);
    r_loss(c, rp, NULL, NULL, w);
    double *keep = mp->gates;
    mp->gates = w;
    double loss = ref_loss(m, mp, NULL);
    mp->gates = keep;
    free(w);
    return loss;
}

static double *layer_fd(mcase *m, mparams *mp, rcase *c, rparams *rp,
                        double *v, size_t n)
{
    double *g = malloc((n ? n : 1) * sizeof *g);
    ck_assert_ptr_nonnull(g);
    for (size_t i = 0; i < n; i++) {
        double keep = v[i], h = 1e-6;
        v[i] = keep + h;
        double lp = layer_loss(m, mp, c, rp);
        v[i] = keep - h;
        double lm = layer_loss(m, mp, c, rp);
        v[i] = keep;
        g[i] = (lp - lm) / (2 * h);
    }
    return g;
}

START_TEST(test_layer_chain)
{
    CTX = test_context();
    test_rng_seed(&RNG, 31);
    mcase m = {.name = "layer", .mix = ATMOE_MIX_BLOCK, .T = 7, .d_in = 13,
               .d_out = 11, .rank_p = 2, .lambda = 0.8f,
               .gates = GATES_TOKEN, .has_bias = 1, .c = 1.0f};
    five_experts(&m);
    m.train[1] = m.train[3] = ATMOE_TRAIN_A | ATMOE_TRAIN_B;
    mcase_setup(&m);
    atmoe_experts *set = mcase_set(&m);
    rcase c = {.form = ATMOE_ROUTER_PROJECTED, .rows = 7, .d_in = 13,
               .batched = 1, .G = 2, .counts = {2, 3}, .tau_g = 0.9f,
               .tau_d = 1.1f, .topk_e = 2, .M = 3, .E = 5};
    for (int e = 0; e < 5; e++)
        c.slot[e] = m.group[e] * 3 + (e < 2 ? e : e - 2);
    for (int i = 0; i < RG; i++)
        c.gfix[i] = NAN;
    for (int i = 0; i < RG * RM; i++)
        c.efix[i] = NAN;
    c.efix[1 * 3 + 2] = 0.25f; /* a fixed expert */
    size_t G = 2, M = 3, E = 5;
    c.wg = rnd(m.d_in * G, -0.8, 0.8);
    c.wd = rnd(m.d_in * G * M, -0.8, 0.8);
    c.dw = calloc(m.T * E, sizeof *c.dw); /* the mixture's loss only */
    ck_assert_ptr_nonnull(c.dw);
    atmoe_router *router;
    OK(atmoe_router_new(set, c.form, c.tau_g, c.tau_d, 0, c.topk_e,
                        &router));
    OK(atmoe_router_set_fixed(router, 1, 2, 0.25f));

    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node x = input(g, "x", ATMOE_DTYPE_F32, m.T, m.d_in, 1);
    atmoe_node w0 = input(g, "w0", ATMOE_DTYPE_F32, m.d_out, m.d_in, 0);
    atmoe_node bias = input(g, "bias", ATMOE_DTYPE_F32, m.d_out, 0, 0);
    atmoe_node wg = input(g, "w_g", ATMOE_DTYPE_F32, m.d_in, G, 0);
    atmoe_node wd = input(g, "w_d", ATMOE_DTYPE_F32, m.d_in, G * M, 0);
    atmoe_node dy = input(g, "dy", ATMOE_DTYPE_F32, m.T, m.d_out, 1);
    atmoe_layer layer = {w0, bias, set, router, wg, wd, ATMOE_NODE_NONE,
                         ATMOE_NODE_NONE, 1.0f};
    atmoe_node y;
    atmoe_layer_trace tr;
    OK(atmoe_graph_moe_layer(g, x, &layer, &y, &tr));
    OK(atmoe_graph_set_name(g, y, "mix"));
    int go[3] = {dy, ATMOE_NODE_NONE, ATMOE_NODE_NONE};
    unsigned char need_m[ATM_MAX_SRC] = {1, 0, 0, 1, 0};
    int gm[ATM_MAX_SRC], gr[ATM_MAX_SRC];
    OK(call_backward(g, y, go, need_m, gm));
    int go_r[3] = {gm[3], ATMOE_NODE_NONE, ATMOE_NODE_NONE};
    unsigned char need_r[ATM_MAX_SRC] = {1, 1, 1};
    OK(call_backward(g, tr.w, go_r, need_r, gr));
    atmoe_node dx;
    OK(atmoe_graph_add(g, gm[0], gr[0], &dx));
    OK(atmoe_graph_mark_output(g, dx));
    OK(atmoe_graph_mark_output(g, gr[1]));
    OK(atmoe_graph_mark_output(g, gr[2]));
    ck_assert_uint_eq(atm_graph_trainable_count(g), 4);
    for (size_t i = 0; i < 4; i++)
        OK(atmoe_graph_mark_output(g, atm_graph_trainable_at(g, i)->grad));
    OK(atmoe_graph_plan(g, 0));
    poison_arena(g);
    OK(atmoe_graph_set_input(g, x, m.x, m.T * m.d_in * 4, m.T));
    OK(atmoe_graph_set_input(g, w0, m.w0, m.d_out * m.d_in * 4, 0));
    OK(atmoe_graph_set_input(g, bias, m.bias, m.d_out * 4, 0));
    OK(atmoe_graph_set_input(g, wg, c.wg, m.d_in * G * 4, 0));
    OK(atmoe_graph_set_input(g, wd, c.wd, m.d_in * G * M * 4, 0));
    OK(atmoe_graph_set_input(g, dy, m.dy, m.T * m.d_out * 4, m.T));
    OK(atmoe_graph_compute(g, 0));

    mparams mp = {dup_d(m.x, m.T * m.d_in), dup_d(m.w0, m.d_out * m.d_in),
                  dup_d(m.bias, m.d_out), NULL, dup_d(m.A, m.R * m.d_in),
                  dup_d(m.Bt, m.Z * m.d_out)};
    rparams rp = {mp.x, dup_d(c.wg, m.d_in * G), dup_d(c.wd, m.d_in * G * M)};
    c.min_gap = INFINITY;
    layer_loss(&m, &mp, &c, &rp);
    ck_assert_msg(c.min_gap > 1e-3, "layer: top-k near tie (%g)", c.min_gap);
    struct {
        const char *name;
        atmoe_node node;
        double *v;
        size_t n, offset, total;
    } ops[5] = {{"dx", dx, mp.x, m.T * m.d_in, 0, m.T * m.d_in},
                {"dW_G", gr[1], rp.wg, m.d_in * G, 0, m.d_in * G},
                {"dW_D", gr[2], rp.wd, m.d_in * G * M, 0, m.d_in * G * M},
                {"expert1/A", atm_graph_trainable_find(g, "mix/expert1/A")->grad,
                 mp.A + m.offset[1] * m.d_in, m.erank[1] * m.d_in,
                 m.offset[1] * m.d_in, m.R * m.d_in},
                {"expert3/B_T",
                 atm_graph_trainable_find(g, "mix/expert3/B_T")->grad,
                 mp.Bt + m.offset[3] * m.d_out, m.erank[3] * m.d_out,
                 m.offset[3] * m.d_out, m.Z * m.d_out}};
    for (int i = 0; i < 5; i++) {
        double *want = layer_fd(&m, &mp, &c, &rp, ops[i].v, ops[i].n);
        float *got = read_node(g, ops[i].node, ops[i].total);
        char what[64];
        snprintf(what, sizeof what, "layer: %s", ops[i].name);
        expect_grad(what, got + ops[i].offset, want, ops[i].n,
                    TOL_ROUTER_GRAD);
        free(got);
        free(want);
    }
    free(mp.x);
    free(mp.w0);
    free(mp.bias);
    free(mp.A);
    free(mp.Bt);
    free(rp.wg);
    free(rp.wd);
    free(c.wg);
    free(c.wd);
    free(c.dw);
    atmoe_graph_free(g);
    atmoe_router_free(router);
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
    tcase_add_test(tc, test_mixture_trained_b_forward);
    tcase_add_test(tc, test_mixture_bad_input);
    suite_add_tcase(s, tc);
    tc = tcase_create("router");
    tcase_add_test(tc, test_router_projected);
    tcase_add_test(tc, test_router_scaled);
    tcase_add_test(tc, test_router_bad_input);
    suite_add_tcase(s, tc);
    tc = tcase_create("layer");
    tcase_add_test(tc, test_layer_chain);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(backward_suite());
}
