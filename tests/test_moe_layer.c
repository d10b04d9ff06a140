/* Tests of T-REX dense expert sets, AT-MoE layers and stacks of layers
 * (SPEC sections 2-4; include/atmoe.h, "Expert sets, routers and the fused
 * mixture"), the parts tests/test_moe.c does not cover, against float64
 * host references:
 *
 *   dense mix  y = x W0^T + b + c B (G^T (A x)),  A [r1, d_in], B [d_out, r2],
 *              G the token's gate row [r1*r2] reshaped [r1, r2] row-major
 *   layer      the grouped router of test_moe.c on the token's x (or on one
 *              pooled row per sequence, picked by gate_index), then
 *              y = x W0^T + b + c sum_e lambda w_e s_e B_e A_e x
 *                            + c (1 - lambda) s_p B_p A_p x
 *   stack      layers in turn, d_out of a layer the d_in of the next
 *
 * The router reference (masks, fixed weights, top-k) and the helpers are
 * those of tests/test_moe.c (tests/moe_reference.c), with the router input
 * in float64 so that a stack's reference stays in float64 from end to end.
 *
 * Shapes are odd (d_in 37, d_out 29, stacks 37 -> 29 -> 31 -> 23, T 1, 2,
 * 3, 4, 5, 7, 9, 11, 13, 31), data are random and never all zero, outputs
 * are read into NaN-poisoned host buffers, and every comparison is written
 * so that NaN fails it.
 *
 * Each START_TEST opens one context and runs many checks on it. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_reference.h"
#include "testutil.h"

/* ------------------------------------------------------------------------ */
/* Tolerances                                                                */
/* ------------------------------------------------------------------------ */

/* Router weights (a, d, w, all in [0, 1]), absolute, for router inputs with
 * sum_k |h_k W_kj| <= 24 (test_moe.c derives it: at most 8 eps of that sum
 * in a logit, damped by the softmax; the largest error seen is 1e-7).  In a
 * stack the hidden states grow past |h| < 1, so the bound below scales it
 * by max(1, sum |h W| / ROUTER_SUM). */
#define TOL_ROUTER 2e-5
#define ROUTER_SUM 24.0
/* Mixture output of the block mix, relative to the scale the rounding
 * grows with: |bias| + sum_k |W0 x| + |c| sum_channels |coef B| sum_k |A x|
 * (test_moe.c: three f32 GEMMs of at most 97 and 16 terms and the mix,
 * 7e-6 at worst; the largest error seen is 1.3e-7). */
#define TOL_MIX 1e-5
/* The router feeding the mixture, against the float64 pipeline (test_moe.c):
 * the router's error times each expert's term, with |w| taken as 1. */
#define TOL_PIPE (TOL_ROUTER + TOL_MIX)
/* The dense mix, relative to |bias| + sum_k |W0 x| + |c| sum_j' |B_jj'|
 * sum_i |G_ij'| sum_k |A_ik x_k|: the base and shrink GEMMs (37 terms), the
 * mix (r1 <= 4 terms, fp32 accumulation) and the expand (r2 <= 8 terms),
 * each within n eps of that scale: (37 + 4 + 8) * 6e-8 = 3e-6 at worst.
 * The merged path (fold G^T A, r1 terms; W' = W0 + c B (G^T A), r2 terms;
 * one GEMM of 37 terms) sums the same products in another order, so the
 * same bound holds, and two paths agree within twice it.  The largest
 * error seen is 9e-8. */
#define TOL_DENSE 1e-5
/* A stack is checked against its float64 reference with a first-order
 * error bound carried from layer to layer (ref_mix and router_bound): each
 * layer's own rounding (TOL_MIX of its scale, TOL_ROUTER of its weights)
 * plus its input's error through |W0|, |B| |A| and the router (a softmax
 * weight p moves by at most p 2 max|d logit| / tau).  The bound is already
 * a worst case (every error aligned); the factor covers the second-order
 * terms it leaves out.  Single layers use at most 1% of it; through a
 * stack the worst cases compound (the last layer's errors use 3e-5 of
 * it, which would let a 5% error in that layer pass), so test_stack also
 * checks every layer alone, fed by the library's own hidden state
 * (PREFIX_ULPS). */
#define STACK_SAFETY 2.0
/* The per-layer checks of a stack take a layer's input from a shorter
 * stack over the same layers in the same graph: the same operations on the
 * same data, so the same values; 4 ulp of |h| allows for any difference in
 * the order of summation between the two copies all the same. */
#define PREFIX_ULPS (4 * 5.96e-8)

#define MAXL 4 /* layers in a stack */

#define FAILS ck_assert_fails_with

/* ------------------------------------------------------------------------ */
/* Graph helpers                                                             */
/* ------------------------------------------------------------------------ */

#define FAILS_CLEAN(g, expr, want, sub)                                       \
    ck_assert_fails_clean(g, expr, CTX, want, sub)

/* ------------------------------------------------------------------------ */
/* Comparisons                                                               */
/* ------------------------------------------------------------------------ */

/* |got - want| <= bound (absolute, one per element), and exactly 0 where
 * want is exactly 0 (padding slots). */
static void expect_bound(const char *what, const float *got,
                         const double *want, const double *bound, size_t rows,
                         size_t cols)
{
    for (size_t i = 0; i < rows * cols; i++) {
        double b = bound[i];
        ck_assert_msg(fabs(got[i] - want[i]) <= b,
                      "%s[%zu,%zu] = %.9g, reference %.9g (bound %.3g)", what,
                      i / cols, i % cols, got[i], want[i], b);
        ck_assert_msg(want[i] != 0.0 || got[i] == 0.0f,
                      "%s[%zu,%zu] = %.9g, must be exactly 0", what, i / cols,
                      i % cols, got[i]);
    }
}

/* ------------------------------------------------------------------------ */
/* LoRA expert sets, host side                                               */
/* ------------------------------------------------------------------------ */

/* Scales A by sqrt(3 / d_in) and B by sqrt(3 / rank) (general LoRA too),
 * so that A x and B u keep the size of x and u: hidden states stay of
 * order 1 through a stack. */
static void model_shrink(model *m)
{
    double a = sqrt(3.0 / (double)m->d_in);
    for (int e = 0; e <= m->n; e++) {
        int general = e == m->n;
        if (general && !m->has_general)
            break;
        size_t rk = general ? m->rank_p : m->rank[e];
        float *A = general ? m->Ap : m->A[e], *B = general ? m->Bp : m->B[e];
        double b = sqrt(3.0 / (double)rk);
        for (size_t i = 0; i < rk * m->d_in; i++)
            A[i] = (float)(A[i] * a);
        for (size_t i = 0; i < m->d_out * rk; i++)
            B[i] = (float)(B[i] * b);
    }
}

/* ------------------------------------------------------------------------ */
/* Router: error bounds                                                      */
/* ------------------------------------------------------------------------ */

/* Bounds on the errors of a [rows, G], d [rows, G*M] and w [rows, E] (ref
 * the reference's): the router's own rounding (TOL_ROUTER, scaled up for
 * large sum |h W|) and, with the input's error e [rows, d_in] (NULL: exact
 * input), its first-order effect.  A logit moves by at most
 * dz = sum_k |W_k| e_k, and a softmax weight p_i by
 * p_i |dz_i - sum_j p_j dz_j| / tau <= p_i 2 max|dz| / tau; w = a d moves
 * by at most w (ra + rd), ra and rd those relative bounds of a and d.  In
 * the scaled form the within-group logits a[g] V_D[g,m] move with a.  For
 * routers without top-k, masks or fixed weights (a near tie at the top-k
 * boundary would make the choice itself depend on the error). */
static void router_bound(const model *m, const rcfg *c, const double *h,
                         const double *e, size_t rows, const float *wg,
                         const float *wd, const double *a, const double *d,
                         const double *w, double *ea, double *ed, double *ew)
{
    const int G = m->G, M = m->M, E = m->n;
    const size_t din = m->d_in;
    double vmax = 0;
    if (c->form == ATMOE_ROUTER_SCALED)
        for (int i = 0; i < G * M; i++)
            vmax = fmax(vmax, fabs(wd[i]));
    for (size_t r = 0; r < rows; r++) {
        const double *hr = h + r * din, *er = e ? e + r * din : NULL;
        double sum = 0, dg = 0, dd = 0;
        for (int g = 0; g < G; g++) {
            double s = 0, p = 0;
            for (size_t k = 0; k < din; k++) {
                s += fabs(hr[k] * wg[k * G + g]);
                p += er ? fabs((double)wg[k * G + g]) * er[k] : 0.0;
            }
            sum = fmax(sum, s);
            dg = fmax(dg, p);
        }
        double ra = 2 * dg / c->tau_g, rd;
        if (c->form == ATMOE_ROUTER_PROJECTED) {
            for (int j = 0; j < G * M; j++) {
                double s = 0, p = 0;
                for (size_t k = 0; k < din; k++) {
                    s += fabs(hr[k] * wd[k * G * M + j]);
                    p += er ? fabs((double)wd[k * G * M + j]) * er[k] : 0.0;
                }
                sum = fmax(sum, s);
                dd = fmax(dd, p);
            }
            rd = 2 * dd / c->tau_d;
        } else {
            rd = 2 * ra * vmax / c->tau_d; /* |d(a V)| <= a ra |V| <= ra |V| */
        }
        double own = TOL_ROUTER * fmax(1.0, sum / ROUTER_SUM);
        for (int g = 0; g < G; g++)
            ea[r * G + g] = a[r * G + g] * ra + own;
        for (int j = 0; j < G * M; j++)
            ed[r * G * M + j] = d[r * G * M + j] * rd + own;
        for (int i = 0; i < E; i++)
            ew[r * E + i] = w[r * E + i] * (ra + rd) + own;
    }
}

/* ------------------------------------------------------------------------ */
/* Block mixture reference with error propagation                            */
/* ------------------------------------------------------------------------ */

/* y [T, d_out] for input h [T, d_in] (float64) and block gates [gate_rows,
 * n]; gidx maps token t to its gate row (NULL: row t), a row outside
 * [0, gate_rows) gating no expert (the general LoRA still counts).
 * scale: what the mixture's rounding grows with (NULL: not wanted);
 * scale1: the same with every |gate| taken as 1.  err (may be NULL): a
 * bound on |y_lib - y| given the input's error e_in [T, d_in] (NULL: exact)
 * and the gates' error dw [gate_rows, n] (NULL: exact gates): TOL_MIX of the
 * scale, plus e_in through |W0| and |c lambda s B| |A|, plus dw through
 * |c lambda s (B_e A_e h)_j|. */
static void ref_mix(const model *m, const double *h, size_t T,
                    const float *w0, const float *bias, const double *gates,
                    size_t gate_rows, const int *gidx, double c,
                    const double *e_in, const double *dw, double *y,
                    double *scale, double *scale1, double *err)
{
    const size_t din = m->d_in, dout = m->d_out;
    size_t RR = m->R + (m->has_general ? m->rank_p : 0);
    double *u = alloc_d(RR), *ua = alloc_d(RR), *ue = alloc_d(RR);
    for (size_t t = 0; t < T; t++) {
        const double *ht = h + t * din, *et = e_in ? e_in + t * din : NULL;
        long row = gidx ? gidx[t] : (long)t;
        int gated = row >= 0 && (size_t)row < gate_rows;
        size_t ch = 0;
        for (int e = 0; e <= m->n; e++) {
            int general = e == m->n;
            if (general && !m->has_general)
                break;
            const float *A = general ? m->Ap : m->A[e];
            size_t rk = general ? m->rank_p : m->rank[e];
            for (size_t q = 0; q < rk; q++, ch++) {
                double s = 0, sa = 0, se = 0;
                for (size_t k = 0; k < din; k++) {
                    s += A[q * din + k] * ht[k];
                    sa += fabs(A[q * din + k] * ht[k]);
                    se += et ? fabs((double)A[q * din + k]) * et[k] : 0.0;
                }
                u[ch] = s;
                ua[ch] = sa;
                ue[ch] = se;
            }
        }
        for (size_t j = 0; j < dout; j++) {
            double acc = bias ? bias[j] : 0, sc = bias ? fabs(bias[j]) : 0;
            double prop = 0;
            for (size_t k = 0; k < din; k++) {
                acc += w0[j * din + k] * ht[k];
                sc += fabs(w0[j * din + k] * ht[k]);
                prop += et ? fabs((double)w0[j * din + k]) * et[k] : 0.0;
            }
            double sc1 = sc;
            ch = 0;
            for (int e = 0; e <= m->n; e++) {
                int general = e == m->n;
                if (general && !m->has_general)
                    break;
                const float *B = general ? m->Bp : m->B[e];
                size_t rk = general ? m->rank_p : m->rank[e];
                double s = general ? ref_scale(m->rank_p, m->alpha_p,
                                               m->flags_p)
                                   : ref_scale(m->rank[e], m->alpha[e],
                                               m->flags[e]);
                double lam = general ? 1.0 - (double)m->lambda : m->lambda;
                double gate = 1.0;
                if (!general)
                    gate = gated ? gates[(size_t)row * m->n + (size_t)e] : 0.0;
                double coef = c * lam * s, term = 0;
                for (size_t q = 0; q < rk; q++, ch++) {
                    double bq = B[j * rk + q];
                    acc += coef * gate * bq * u[ch];
                    term += bq * u[ch];
                    sc += fabs(coef * gate * bq) * ua[ch];
                    sc1 += fabs(coef * bq) * ua[ch];
                    prop += fabs(coef * gate * bq) * ue[ch];
                }
                if (!general && gated && dw)
                    prop += fabs(coef * term) *
                            dw[(size_t)row * m->n + (size_t)e];
            }
            y[t * dout + j] = acc;
            if (scale)
                scale[t * dout + j] = sc;
            if (scale1)
                scale1[t * dout + j] = sc1;
            if (err)
                err[t * dout + j] = TOL_MIX * sc + prop;
        }
    }
    free(u);
    free(ua);
    free(ue);
}

/* ------------------------------------------------------------------------ */
/* Layers: weights, nodes, and the float64 reference of a stack              */
/* ------------------------------------------------------------------------ */

typedef struct lspec {
    model m;
    atmoe_experts *set;
    rcfg cfg;
    atmoe_router *router;
    float *wg, *wd; /* W_G [d_in, G]; W_D [d_in, G*M] or V_D [G, M] */
    float *w0, *bias; /* bias NULL: none */
    float c;
    size_t S;    /* per-sequence routing: S pooled rows; 0: per token */
    float *hseq; /* [S, d_in] */
    atmoe_layer layer;
} lspec;

/* After model_init (and model_general): the set, its router, the weights.
 * W0 is uniform in +-sqrt(3 / d_in), so that hidden states keep their size
 * through a stack. */
static void lspec_build(lspec *L, atmoe_router_form form, float tau_g,
                        float tau_d, int topk_g, int with_bias, float c,
                        size_t S)
{
    model *m = &L->m;
    L->set = model_build(m);
    L->router = router_make(L->set, &L->cfg, form, tau_g, tau_d, topk_g, 0);
    L->wg = alloc_uniform(m->d_in * (size_t)m->G, -0.5, 0.5);
    if (form == ATMOE_ROUTER_PROJECTED)
        L->wd = alloc_uniform(m->d_in * (size_t)(m->G * m->M), -0.5, 0.5);
    else
        L->wd = alloc_uniform((size_t)(m->G * m->M), -3, 3);
    double a = sqrt(3.0 / (double)m->d_in);
    L->w0 = alloc_uniform(m->d_out * m->d_in, -a, a);
    L->bias = with_bias ? alloc_uniform(m->d_out, -1, 1) : NULL;
    L->c = c;
    L->S = S;
    L->hseq = S ? alloc_uniform(S * m->d_in, -1, 1) : NULL;
}

static void lspec_free(lspec *L)
{
    atmoe_router_free(L->router);
    atmoe_experts_free(L->set);
    free(L->wg);
    free(L->wd);
    free(L->w0);
    free(L->bias);
    free(L->hseq);
    model_free(&L->m);
}

/* The layer's weights as constants of g; gate_index (i32 [T]) is used with
 * per-sequence routing. */
static void lspec_nodes(lspec *L, atmoe_graph *g, atmoe_node gate_index)
{
    const model *m = &L->m;
    atmoe_layer *ly = &L->layer;
    size_t G = (size_t)m->G, M = (size_t)m->M;
    ly->w0 = const2(g, ATMOE_DTYPE_F32, m->d_out, m->d_in, L->w0);
    ly->bias = L->bias ? const2(g, ATMOE_DTYPE_F32, m->d_out, 0, L->bias)
                       : ATMOE_NODE_NONE;
    ly->experts = L->set;
    ly->router = L->router;
    ly->w_g = const2(g, ATMOE_DTYPE_F32, m->d_in, G, L->wg);
    ly->w_d = L->cfg.form == ATMOE_ROUTER_PROJECTED
                  ? const2(g, ATMOE_DTYPE_F32, m->d_in, G * M, L->wd)
                  : const2(g, ATMOE_DTYPE_F32, G, M, L->wd);
    ly->router_input = L->S ? const2(g, ATMOE_DTYPE_F32, L->S, m->d_in,
                                     L->hseq)
                            : ATMOE_NODE_NONE;
    ly->gate_index = L->S ? gate_index : ATMOE_NODE_NONE;
    ly->c = L->c;
}

/* Router rows of a layer computing T tokens. */
static size_t lspec_rows(const lspec *L, size_t T)
{
    return L->S ? L->S : T;
}

/* The float64 reference of one layer of a stack, with error bounds. */
typedef struct lref {
    size_t rows;          /* router rows */
    double *a, *d, *w;    /* [rows, G], [rows, G*M], [rows, E] */
    double *ea, *ed, *ew; /* bounds on their errors, element by element */
    double *y, *ey;       /* [T, d_out] and the bound on its error */
} lref;

static void lref_free(lref *r, size_t n)
{
    for (size_t l = 0; l < n; l++) {
        free(r[l].a);
        free(r[l].d);
        free(r[l].w);
        free(r[l].ea);
        free(r[l].ed);
        free(r[l].ew);
        free(r[l].y);
        free(r[l].ey);
    }
}

/* An input's error bound: in_rel |x| (0 for data the library was given;
 * see PREFIX_ULPS for the others). */
static double *input_err(const float *x, size_t n, double in_rel)
{
    double *e = alloc_d(n);
    for (size_t i = 0; i < n; i++)
        e[i] = in_rel * fabs(x[i]);
    return e;
}

/* Layers L[0..n-1] on x [T, d_in of L[0]] (known within in_rel |x|); gidx
 * [T] for the per-sequence layers. */
static void ref_stack(const lspec *L, size_t n, const float *x, size_t T,
                      const int *gidx, double in_rel, lref *R)
{
    double *x0 = to_double(x, T * L[0].m.d_in);
    double *e0 = input_err(x, T * L[0].m.d_in, in_rel);
    const double *h = x0, *e = e0;
    for (size_t l = 0; l < n; l++) {
        const model *m = &L[l].m;
        lref *r = &R[l];
        size_t G = (size_t)m->G, M = (size_t)m->M, E = (size_t)m->n;
        ck_assert_uint_eq(m->d_in, l ? L[l - 1].m.d_out : L[0].m.d_in);
        r->rows = lspec_rows(&L[l], T);
        r->a = alloc_d(r->rows * G);
        r->d = alloc_d(r->rows * G * M);
        r->w = alloc_d(r->rows * E);
        r->ea = alloc_d(r->rows * G);
        r->ed = alloc_d(r->rows * G * M);
        r->ew = alloc_d(r->rows * E);
        r->y = alloc_d(T * m->d_out);
        r->ey = alloc_d(T * m->d_out);
        double *hs = L[l].S ? to_double(L[l].hseq, L[l].S * m->d_in) : NULL;
        const double *hr = hs ? hs : h, *er = hs ? NULL : e;
        ref_router(m, &L[l].cfg, hr, r->rows, L[l].wg, L[l].wd, r->a, r->d,
                   r->w);
        router_bound(m, &L[l].cfg, hr, er, r->rows, L[l].wg, L[l].wd, r->a,
                     r->d, r->w, r->ea, r->ed, r->ew);
        ref_mix(m, h, T, L[l].w0, L[l].bias, r->w, r->rows,
                L[l].S ? gidx : NULL, L[l].c, e, r->ew, r->y, NULL, NULL,
                r->ey);
        free(hs);
        h = r->y;
        e = r->ey;
    }
    free(x0);
    free(e0);
}

/* What the library gave: traces per layer (NULL entries: not traced) and
 * the final y. */
typedef struct lgot {
    float *a[MAXL], *d[MAXL], *w[MAXL];
    float *y;
} lgot;

static void lgot_free(lgot *o)
{
    for (int l = 0; l < MAXL; l++) {
        free(o->a[l]);
        free(o->d[l]);
        free(o->w[l]);
    }
    free(o->y);
    memset(o, 0, sizeof *o);
}

/* Reads the traces (traces NULL or a trace's w NONE: none) and y. */
static void lgot_read(atmoe_graph *g, const lspec *L, size_t n, size_t T,
                      const atmoe_layer_trace *traces, atmoe_node y, lgot *o)
{
    memset(o, 0, sizeof *o);
    for (size_t l = 0; traces && l < n; l++) {
        const model *m = &L[l].m;
        size_t rows = lspec_rows(&L[l], T);
        o->a[l] = read_out(g, traces[l].a, rows * (size_t)m->G);
        o->d[l] = read_out(g, traces[l].d, rows * (size_t)(m->G * m->M));
        o->w[l] = read_out(g, traces[l].w, rows * (size_t)m->n);
    }
    o->y = read_out(g, y, T * L[n - 1].m.d_out);
}

/* Traces and y of a stack against its reference, x known within
 * in_rel |x|.  For one layer, y is also checked tightly against the
 * mixture fed by the router's own w (and with an exact x, against the
 * pipeline bound of test_moe.c). */
static void check_stack(const char *what, const lspec *L, size_t n,
                        const float *x, size_t T, const int *gidx,
                        double in_rel, const lgot *o)
{
    lref R[MAXL];
    memset(R, 0, sizeof R);
    ref_stack(L, n, x, T, gidx, in_rel, R);
    char buf[96];
    for (size_t l = 0; l < n; l++) {
        const model *m = &L[l].m;
        size_t rows = R[l].rows, G = (size_t)m->G, M = (size_t)m->M;
        size_t E = (size_t)m->n;
        double *ba = alloc_d(rows * G), *bd = alloc_d(rows * G * M),
               *bw = alloc_d(rows * E);
        for (size_t i = 0; i < rows * G; i++)
            ba[i] = STACK_SAFETY * R[l].ea[i];
        for (size_t i = 0; i < rows * G * M; i++)
            bd[i] = STACK_SAFETY * R[l].ed[i];
        for (size_t i = 0; i < rows * E; i++)
            bw[i] = STACK_SAFETY * R[l].ew[i];
        if (o->a[l]) {
            snprintf(buf, sizeof buf, "%s: layer %zu a", what, l);
            expect_bound(buf, o->a[l], R[l].a, ba, rows, G);
            snprintf(buf, sizeof buf, "%s: layer %zu d", what, l);
            expect_bound(buf, o->d[l], R[l].d, bd, rows, G * M);
            snprintf(buf, sizeof buf, "%s: layer %zu w", what, l);
            expect_bound(buf, o->w[l], R[l].w, bw, rows, E);
        }
        free(ba);
        free(bd);
        free(bw);
    }
    const model *last = &L[n - 1].m;
    size_t ny = T * last->d_out;
    double *by = alloc_d(ny);
    for (size_t i = 0; i < ny; i++)
        by[i] = STACK_SAFETY * R[n - 1].ey[i];
    snprintf(buf, sizeof buf, "%s: y", what);
    for (size_t i = 0; i < ny; i++) /* no exact zeros expected in y */
        ck_assert_msg(fabs(o->y[i] - R[n - 1].y[i]) <= by[i],
                      "%s[%zu,%zu] = %.9g, reference %.9g (bound %.3g)", buf,
                      i / last->d_out, i % last->d_out, o->y[i],
                      R[n - 1].y[i], by[i]);
    free(by);
    if (n == 1 && o->w[0]) {
        const model *m = &L[0].m;
        size_t rows = R[0].rows;
        double *gw = to_double(o->w[0], rows * (size_t)m->n);
        double *hx = to_double(x, T * m->d_in);
        double *ex = input_err(x, T * m->d_in, in_rel);
        double *want = alloc_d(T * m->d_out), *err = alloc_d(T * m->d_out);
        ref_mix(m, hx, T, L[0].w0, L[0].bias, gw, rows, L[0].S ? gidx : NULL,
                L[0].c, ex, NULL, want, NULL, NULL, err);
        snprintf(buf, sizeof buf, "%s: y (router's own w)", what);
        for (size_t i = 0; i < T * m->d_out; i++)
            ck_assert_msg(fabs(o->y[i] - want[i]) <= err[i],
                          "%s[%zu,%zu] = %.9g, reference %.9g (bound %.3g)",
                          buf, i / m->d_out, i % m->d_out, o->y[i], want[i],
                          err[i]);
        if (in_rel == 0) {
            double *scale1 = alloc_d(T * m->d_out);
            ref_mix(m, hx, T, L[0].w0, L[0].bias, R[0].w, rows,
                    L[0].S ? gidx : NULL, L[0].c, NULL, NULL, want, NULL,
                    scale1, NULL);
            snprintf(buf, sizeof buf, "%s: y (pipeline)", what);
            expect_scaled(buf, o->y, want, scale1, T, m->d_out, TOL_PIPE);
            free(scale1);
        }
        free(gw);
        free(hx);
        free(ex);
        free(want);
        free(err);
    }
    lref_free(R, n);
}

/* The three layers of the stack tests, 37 -> 29 -> 31 -> 23 (weights
 * scaled by model_shrink):
 *  0: groups {0: 3 5, 1: 2, 2: 4 1}, projected, per token, bias, c 1;
 *  1: groups {0: 2 1, 1: 3 2} + general LoRA (rank 2, lambda 0.6), scaled,
 *     per sequence (S = 2), no bias, c 0.75;
 *  2: groups {0: 1, 1: 2 3, 2: 2, 3: 1 2}, projected, per token, bias,
 *     c 1. */
static void stack3_make(lspec *L)
{
    static const int g0[5] = {0, 0, 1, 2, 2};
    static const size_t r0[5] = {3, 5, 2, 4, 1};
    static const int g1[4] = {0, 0, 1, 1};
    static const size_t r1[4] = {2, 1, 3, 2};
    static const unsigned f1[4] = {0, ATMOE_EXPERT_RSLORA, 0, 0};
    static const int g2[6] = {0, 1, 1, 2, 3, 3};
    static const size_t r2[6] = {1, 2, 3, 2, 1, 2};
    memset(L, 0, 3 * sizeof *L);
    model_init(&L[0].m, 37, 29, 5, g0, r0, NULL);
    model_shrink(&L[0].m);
    lspec_build(&L[0], ATMOE_ROUTER_PROJECTED, 0.7f, 1.3f, 0, 1, 1.0f, 0);
    model_init(&L[1].m, 29, 31, 4, g1, r1, f1);
    model_general(&L[1].m, 2, 0, 0.6f, 0);
    model_shrink(&L[1].m);
    lspec_build(&L[1], ATMOE_ROUTER_SCALED, 1.5f, 0.8f, 0, 0, 0.75f, 2);
    model_init(&L[2].m, 31, 23, 6, g2, r2, NULL);
    model_shrink(&L[2].m);
    lspec_build(&L[2], ATMOE_ROUTER_PROJECTED, 0.9f, 1.1f, 0, 1, 1.0f, 0);
}

/* ------------------------------------------------------------------------ */
/* Dense (T-REX mix-and-match) sets                                          */
/* ------------------------------------------------------------------------ */

typedef struct dense {
    size_t d_in, d_out, r1, r2;
    float *A, *B; /* [r1, d_in] down vectors, [d_out, r2] up vectors */
    atmoe_experts *set;
} dense;

static void dense_make(dense *D, size_t d_in, size_t d_out, size_t r1,
                       size_t r2)
{
    D->d_in = d_in;
    D->d_out = d_out;
    D->r1 = r1;
    D->r2 = r2;
    D->A = alloc_uniform(r1 * d_in, -1, 1);
    D->B = alloc_uniform(d_out * r2, -1, 1);
    D->set = NULL;
    OK(atmoe_experts_new(CTX, d_in, d_out, &D->set));
    OK(atmoe_experts_set_dense(D->set, r1, D->A, r2, D->B));
    atmoe_experts_info info;
    memset(&info, 0xff, sizeof info);
    OK(atmoe_experts_get_info(D->set, &info));
    ck_assert_uint_eq(info.d_in, d_in);
    ck_assert_uint_eq(info.d_out, d_out);
    ck_assert_uint_eq(info.total_rank, r1);
    ck_assert_uint_eq(info.dense_r2, r2);
    ck_assert_int_eq(info.has_general, 0);
}

static void dense_free(dense *D)
{
    atmoe_experts_free(D->set);
    free(D->A);
    free(D->B);
}

/* y [T, d_out] and its rounding scale for gates [gate_rows, r1*r2]; token
 * t uses row gidx[t] (none outside [0, gate_rows): the base projection
 * only), or row t, or with gidx NULL and a single row, row 0. */
static void ref_dense(const dense *D, const float *x, size_t T,
                      const float *w0, const float *bias, const float *gates,
                      size_t gate_rows, const int *gidx, double c, double *y,
                      double *scale)
{
    const size_t din = D->d_in, dout = D->d_out, r1 = D->r1, r2 = D->r2;
    double u[16], ua[16], z[16], za[16];
    ck_assert(r1 <= 16 && r2 <= 16);
    for (size_t t = 0; t < T; t++) {
        const float *xt = x + t * din;
        long row = gidx ? gidx[t] : gate_rows == 1 ? 0 : (long)t;
        int gated = row >= 0 && (size_t)row < gate_rows;
        for (size_t i = 0; i < r1; i++) {
            u[i] = ua[i] = 0;
            for (size_t k = 0; k < din; k++) {
                u[i] += (double)D->A[i * din + k] * xt[k];
                ua[i] += fabs((double)D->A[i * din + k] * xt[k]);
            }
        }
        for (size_t jj = 0; jj < r2; jj++) {
            z[jj] = za[jj] = 0;
            for (size_t i = 0; gated && i < r1; i++) {
                double gij = gates[(size_t)row * r1 * r2 + i * r2 + jj];
                z[jj] += gij * u[i];
                za[jj] += fabs(gij) * ua[i];
            }
        }
        for (size_t j = 0; j < dout; j++) {
            double acc = bias ? bias[j] : 0, sc = bias ? fabs(bias[j]) : 0;
            for (size_t k = 0; k < din; k++) {
                acc += (double)w0[j * din + k] * xt[k];
                sc += fabs((double)w0[j * din + k] * xt[k]);
            }
            for (size_t jj = 0; jj < r2; jj++) {
                double b = D->B[j * r2 + jj];
                acc += c * b * z[jj];
                sc += fabs(c * b) * za[jj];
            }
            y[t * dout + j] = acc;
            scale[t * dout + j] = sc;
        }
    }
}

static void check_dense(const char *what, const dense *D, const float *x,
                        size_t T, const float *w0, const float *bias,
                        const float *gates, size_t gate_rows, const int *gidx,
                        double c, const float *y)
{
    double *want = alloc_d(T * D->d_out), *scale = alloc_d(T * D->d_out);
    ref_dense(D, x, T, w0, bias, gates, gate_rows, gidx, c, want, scale);
    expect_scaled(what, y, want, scale, T, D->d_out, TOL_DENSE);
    free(want);
    free(scale);
}

/* Per-token gates (batched like x), per-sequence gates with gate_index
 * (out-of-range entries included), with and without bias, r1 x r2 of
 * 4 x 8 and 3 x 5; batches 7 and 3 of a plan for 7. */
START_TEST(test_dense_mixture)
{
    CTX = test_context();
    test_rng_seed(&RNG, 2101);
    const size_t T = 7, S = 3, DI = 37, DO = 29;
    dense D[2];
    dense_make(&D[0], DI, DO, 4, 8);
    dense_make(&D[1], DI, DO, 3, 5);
    float *w0 = alloc_uniform(DO * DI, -1, 1);
    float *bias = alloc_uniform(DO, -1, 1);
    /* Sequence of each token; -1 and S (= 3) are outside the gate rows. */
    static const int seq[7] = {2, -1, 0, 1, 1, 3, 0};
    float *gs[2];
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node nx = input2(g, "x", ATMOE_DTYPE_F32, T, DI, 1);
    atmoe_node ni = input2(g, "seq", ATMOE_DTYPE_I32, T, 0, 1);
    atmoe_node nw0 = const2(g, ATMOE_DTYPE_F32, DO, DI, w0);
    atmoe_node nb = const2(g, ATMOE_DTYPE_F32, DO, 0, bias);
    atmoe_node ngt[2], yb[2], yn[2], ys[2];
    for (int s = 0; s < 2; s++) {
        size_t E = D[s].r1 * D[s].r2;
        char name[16];
        snprintf(name, sizeof name, "gates%d", s);
        ngt[s] = input2(g, name, ATMOE_DTYPE_F32, T, E, 1);
        gs[s] = alloc_uniform(S * E, -1, 1);
        atmoe_node ngs = const2(g, ATMOE_DTYPE_F32, S, E, gs[s]);
        OK(atmoe_graph_mixture(g, nx, nw0, nb, D[s].set, ATMOE_MIX_DENSE,
                               ngt[s], ATMOE_NODE_NONE, 0.5f, &yb[s]));
        OK(atmoe_graph_mixture(g, nx, nw0, ATMOE_NODE_NONE, D[s].set,
                               ATMOE_MIX_DENSE, ngt[s], ATMOE_NODE_NONE, 0.5f,
                               &yn[s]));
        /* Per sequence: with bias for one set, without for the other, and
         * a negative c for the second. */
        OK(atmoe_graph_mixture(g, nx, nw0, s ? ATMOE_NODE_NONE : nb, D[s].set,
                               ATMOE_MIX_DENSE, ngs, ni, s ? -1.25f : 0.5f,
                               &ys[s]));
        OK(atmoe_graph_mark_output(g, yb[s]));
        OK(atmoe_graph_mark_output(g, yn[s]));
        OK(atmoe_graph_mark_output(g, ys[s]));
        /* Per-token gates cannot be merged. */
        FAILS(atmoe_graph_mixture_set_merge(g, yb[s], ATMOE_MERGE_ALWAYS),
              CTX, ATMOE_STATUS_INVALID_ARGUMENT, "single gate row");
        FAILS(atmoe_graph_mixture_set_merge(g, ys[s], ATMOE_MERGE_ALWAYS),
              CTX, ATMOE_STATUS_INVALID_ARGUMENT, "single gate row");
    }
    OK(atmoe_graph_plan(g, 0));
    int ndim;
    size_t shape[ATMOE_MAX_DIMS];
    atmoe_dtype dt;
    OK(atmoe_graph_get_shape(g, yb[0], &ndim, shape, &dt));
    ck_assert(ndim == 2 && shape[0] == T && shape[1] == DO &&
              dt == ATMOE_DTYPE_F32);

    static const size_t batches[3] = {7, 3, 7};
    for (int b = 0; b < 3; b++) {
        size_t n = batches[b];
        float *x = alloc_uniform(n * DI, -1, 1);
        float *gt[2];
        OK(atmoe_graph_set_input(g, nx, x, n * DI * sizeof *x, n));
        OK(atmoe_graph_set_input(g, ni, seq, n * sizeof *seq, n));
        for (int s = 0; s < 2; s++) {
            size_t E = D[s].r1 * D[s].r2;
            gt[s] = alloc_uniform(n * E, -1, 1);
            OK(atmoe_graph_set_input(g, ngt[s], gt[s], n * E * sizeof(float),
                                     n));
        }
        OK(atmoe_graph_compute(g, n));
        for (int s = 0; s < 2; s++) {
            char what[80];
            float *y = read_out(g, yb[s], n * DO);
            snprintf(what, sizeof what, "dense %zux%zu per token, bias, T %zu",
                     D[s].r1, D[s].r2, n);
            check_dense(what, &D[s], x, n, w0, bias, gt[s], n, NULL, 0.5, y);
            free(y);
            y = read_out(g, yn[s], n * DO);
            snprintf(what, sizeof what, "dense %zux%zu per token, T %zu",
                     D[s].r1, D[s].r2, n);
            check_dense(what, &D[s], x, n, w0, NULL, gt[s], n, NULL, 0.5, y);
            free(y);
            y = read_out(g, ys[s], n * DO);
            snprintf(what, sizeof what, "dense %zux%zu per sequence, T %zu",
                     D[s].r1, D[s].r2, n);
            check_dense(what, &D[s], x, n, w0, s ? NULL : bias, gs[s], S, seq,
                        s ? -1.25 : 0.5, y);
            free(y);
            free(gt[s]);
        }
        free(x);
    }
    atmoe_graph_free(g);
    for (int s = 0; s < 2; s++) {
        dense_free(&D[s]);
        free(gs[s]);
    }
    free(w0);
    free(bias);
    atmoe_context_free(CTX);
}
END_TEST

/* One gate row for every token, merged into W0 (ALWAYS), not (NEVER), or
 * as the FLOP rule says (AUTO: 4 x 8 merges a batch of 31, since
 * 31 (4 37 + 8 29) > 9 37 29, and not 13 or 1; 3 x 5 likewise, since
 * 31 (3 37 + 5 29) > 6 37 29).  All three agree with the reference and
 * with each other; a new gate row between computes is used (the merged
 * weight is not stale). */
/* W0 stored as types[0], the sets' A and B as types[1] and types[2] (the
 * second set the other way round), against float64 of the stored
 * values. */
static void dense_single_row(const atmoe_dtype types[3])
{
    CTX = test_context();
    test_rng_seed(&RNG, 2202);
    const size_t T = 31, DI = 37, DO = 29;
    static const atmoe_merge modes[3] = {ATMOE_MERGE_NEVER,
                                         ATMOE_MERGE_ALWAYS, ATMOE_MERGE_AUTO};
    dense D[2];
    dense_make(&D[0], DI, DO, 4, 8);
    dense_make(&D[1], DI, DO, 3, 5);
    for (int s = 0; s < 2; s++) {
        atmoe_dtype a = types[s ? 2 : 1], b = types[s ? 1 : 2];
        OK(atmoe_experts_set_dtype(D[s].set, a, b));
        free(stored(a, D[s].A, D[s].r1 * DI));
        free(stored(b, D[s].B, DO * D[s].r2));
    }
    float *w0 = alloc_uniform(DO * DI, -1, 1);
    float *bias = alloc_uniform(DO, -1, 1);
    float *g1 = alloc_uniform(15, -1, 1); /* a constant row for 3 x 5 */
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node nx = input2(g, "x", ATMOE_DTYPE_F32, T, DI, 1);
    void *w0_bits = stored(types[0], w0, DO * DI);
    atmoe_node nw0 = const2(g, types[0], DO, DI, w0_bits);
    free(w0_bits);
    atmoe_node nb = const2(g, ATMOE_DTYPE_F32, DO, 0, bias);
    /* The 4 x 8 row is an input, set before each compute. */
    atmoe_node ng0 = input2(g, "row", ATMOE_DTYPE_F32, 1, 32, 0);
    atmoe_node ng1 = const2(g, ATMOE_DTYPE_F32, 1, 15, g1);
    atmoe_node y0[3], y1[3];
    for (int i = 0; i < 3; i++) {
        OK(atmoe_graph_mixture(g, nx, nw0, nb, D[0].set, ATMOE_MIX_DENSE, ng0,
                               ATMOE_NODE_NONE, 0.5f, &y0[i]));
        OK(atmoe_graph_mixture(g, nx, nw0, ATMOE_NODE_NONE, D[1].set,
                               ATMOE_MIX_DENSE, ng1, ATMOE_NODE_NONE, 0.5f,
                               &y1[i]));
        OK(atmoe_graph_mixture_set_merge(g, y0[i], modes[i]));
        OK(atmoe_graph_mixture_set_merge(g, y1[i], modes[i]));
        OK(atmoe_graph_mark_output(g, y0[i]));
        OK(atmoe_graph_mark_output(g, y1[i]));
    }
    OK(atmoe_graph_plan(g, 0));
    static const size_t batches[4] = {31, 1, 13, 31};
    for (int b = 0; b < 4; b++) {
        size_t n = batches[b];
        float *x = alloc_uniform(n * DI, -1, 1);
        float *g0 = alloc_uniform(32, -1, 1);
        OK(atmoe_graph_set_input(g, nx, x, n * DI * sizeof *x, n));
        OK(atmoe_graph_set_input(g, ng0, g0, 32 * sizeof *g0, 0));
        OK(atmoe_graph_compute(g, n));
        for (int s = 0; s < 2; s++) {
            const float *rowv = s ? g1 : g0;
            const float *bs = s ? NULL : bias;
            float *y[3];
            double *want = alloc_d(n * DO), *scale = alloc_d(n * DO);
            ref_dense(&D[s], x, n, w0, bs, rowv, 1, NULL, 0.5, want, scale);
            for (int i = 0; i < 3; i++) {
                char what[80];
                y[i] = read_out(g, s ? y1[i] : y0[i], n * DO);
                snprintf(what, sizeof what,
                         "dense %zux%zu, one row, merge %d, T %zu", D[s].r1,
                         D[s].r2, (int)modes[i], n);
                expect_scaled(what, y[i], want, scale, n, DO, TOL_DENSE);
            }
            /* The paths against each other (each within TOL_DENSE of the
             * reference, so within twice it of one another). */
            for (int i = 1; i < 3; i++)
                for (size_t k = 0; k < n * DO; k++)
                    ck_assert_msg(fabs(y[i][k] - y[0][k]) <=
                                      2 * TOL_DENSE * scale[k],
                                  "dense %zux%zu, T %zu: merge %d gives "
                                  "%.9g, NEVER %.9g at %zu",
                                  D[s].r1, D[s].r2, n, (int)modes[i],
                                  y[i][k], y[0][k], k);
            for (int i = 0; i < 3; i++)
                free(y[i]);
            free(want);
            free(scale);
        }
        free(g0);
        free(x);
    }
    atmoe_graph_free(g);
    dense_free(&D[0]);
    dense_free(&D[1]);
    free(w0);
    free(bias);
    free(g1);
    atmoe_context_free(CTX);
}

START_TEST(test_dense_single_row)
{
    static const atmoe_dtype f32[3] = {ATMOE_DTYPE_F32, ATMOE_DTYPE_F32,
                                       ATMOE_DTYPE_F32};
    dense_single_row(f32);
}
END_TEST

/* Half precision everywhere: the dense fold of the merged route reads
 * A_all as stored too. */
START_TEST(test_dense_single_row_half)
{
    static const atmoe_dtype half[3] = {ATMOE_DTYPE_BF16, ATMOE_DTYPE_F16,
                                        ATMOE_DTYPE_BF16};
    dense_single_row(half);
}
END_TEST

START_TEST(test_dense_errors)
{
    CTX = test_context();
    test_rng_seed(&RNG, 2303);
    const size_t DI = 37, DO = 29, T = 5;
    float *A = alloc_uniform(40 * DI, -1, 1), *B = alloc_uniform(DO * 40, -1, 1);
    atmoe_experts_info info;

    /* Arguments of atmoe_experts_set_dense. */
    atmoe_experts *dset;
    OK(atmoe_experts_new(CTX, DI, DO, &dset));
    FAILS(atmoe_experts_set_dense(NULL, 4, A, 8, B), NULL,
          ATMOE_STATUS_NULL_POINTER, "set");
    FAILS(atmoe_experts_set_dense(dset, 4, NULL, 8, B), CTX,
          ATMOE_STATUS_NULL_POINTER, "'a'");
    FAILS(atmoe_experts_set_dense(dset, 4, A, 8, NULL), CTX,
          ATMOE_STATUS_NULL_POINTER, "'b'");
    FAILS(atmoe_experts_set_dense(dset, 0, A, 8, B), CTX,
          ATMOE_STATUS_SHAPE_MISMATCH, "0");
    FAILS(atmoe_experts_set_dense(dset, DI + 1, A, 8, B), CTX,
          ATMOE_STATUS_SHAPE_MISMATCH, "38");
    FAILS(atmoe_experts_set_dense(dset, 4, A, 0, B), CTX,
          ATMOE_STATUS_SHAPE_MISMATCH, "r2 0");
    FAILS(atmoe_experts_set_dense(dset, 4, A, DO + 1, B), CTX,
          ATMOE_STATUS_SHAPE_MISMATCH, "r2 30");
    /* Refused calls left the set empty and open. */
    OK(atmoe_experts_get_info(dset, &info));
    ck_assert(info.experts == 0 && info.total_rank == 0 &&
              info.dense_r2 == 0);
    /* r2 = d_out is the largest allowed. */
    {
        atmoe_experts *wide;
        OK(atmoe_experts_new(CTX, DI, DO, &wide));
        OK(atmoe_experts_set_dense(wide, 2, A, DO, B));
        OK(atmoe_experts_get_info(wide, &info));
        ck_assert(info.total_rank == 2 && info.dense_r2 == DO);
        atmoe_experts_free(wide);
    }
    OK(atmoe_experts_set_dense(dset, 4, A, 8, B));
    /* A dense set takes nothing else. */
    FAILS(atmoe_experts_set_dense(dset, 3, A, 5, B), CTX,
          ATMOE_STATUS_INVALID_ARGUMENT, "dense");
    FAILS(atmoe_experts_add(dset, 0, 2, A, B, 1, 0, NULL), CTX,
          ATMOE_STATUS_INVALID_ARGUMENT, "dense");
    FAILS(atmoe_experts_set_general(dset, 2, A, B, 1, 0, 0.5f), CTX,
          ATMOE_STATUS_INVALID_ARGUMENT, "dense");
    /* ... and has no groups to route. */
    atmoe_router *router = (atmoe_router *)&router;
    FAILS(atmoe_router_new(dset, ATMOE_ROUTER_PROJECTED, 1, 1, 0, 0, &router),
          CTX, ATMOE_STATUS_INVALID_ARGUMENT, "dense");
    ck_assert_ptr_null(router);
    FAILS(atmoe_router_new(dset, ATMOE_ROUTER_SCALED, 1, 1, 0, 0, &router),
          CTX, ATMOE_STATUS_INVALID_ARGUMENT, "dense");
    OK(atmoe_experts_get_info(dset, &info));
    ck_assert(info.total_rank == 4 && info.dense_r2 == 8 && !info.has_general);

    /* set_dense on a set with an expert, or with a general LoRA. */
    atmoe_experts *lset, *gset;
    OK(atmoe_experts_new(CTX, DI, DO, &lset));
    OK(atmoe_experts_add(lset, 0, 2, A, B, 1, 0, NULL));
    FAILS(atmoe_experts_set_dense(lset, 4, A, 8, B), CTX,
          ATMOE_STATUS_INVALID_ARGUMENT, "experts already");
    OK(atmoe_experts_add(lset, 1, 3, A, B, 1, 0, NULL));
    OK(atmoe_experts_get_info(lset, &info));
    ck_assert(info.experts == 2 && info.total_rank == 5 &&
              info.dense_r2 == 0);
    OK(atmoe_experts_new(CTX, DI, DO, &gset));
    OK(atmoe_experts_set_general(gset, 2, A, B, 1, 0, 0.5f));
    FAILS(atmoe_experts_set_dense(gset, 4, A, 8, B), CTX,
          ATMOE_STATUS_INVALID_ARGUMENT, "experts already");
    OK(atmoe_experts_get_info(gset, &info));
    ck_assert(info.dense_r2 == 0 && info.has_general);

    /* The mixture: mix and set must agree, gates must be r1*r2 wide. */
    float *buf = alloc_uniform(DO * DI, -1, 1);
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node nx = input2(g, "x", ATMOE_DTYPE_F32, T, DI, 1);
    atmoe_node nw0 = const2(g, ATMOE_DTYPE_F32, DO, DI, buf);
    atmoe_node g32 = input2(g, "g32", ATMOE_DTYPE_F32, T, 32, 1);
    atmoe_node g31 = input2(g, "g31", ATMOE_DTYPE_F32, T, 31, 1);
    atmoe_node g33 = input2(g, "g33", ATMOE_DTYPE_F32, T, 33, 1);
    atmoe_node g4 = input2(g, "g4", ATMOE_DTYPE_F32, T, 4, 1);
    atmoe_node g8 = input2(g, "g8", ATMOE_DTYPE_F32, T, 8, 1);
    atmoe_node g2 = input2(g, "g2", ATMOE_DTYPE_F32, T, 2, 1);
    atmoe_node row31 = const2(g, ATMOE_DTYPE_F32, 1, 31, buf);
    atmoe_node row8 = const2(g, ATMOE_DTYPE_F32, 1, 8, buf);
    atmoe_node ny = -7;
    FAILS_CLEAN(g, atmoe_graph_mixture(g, nx, nw0, ATMOE_NODE_NONE, dset,
                                       ATMOE_MIX_BLOCK, g2, ATMOE_NODE_NONE,
                                       1, &ny),
                ATMOE_STATUS_INVALID_ARGUMENT, "dense");
    FAILS_CLEAN(g, atmoe_graph_mixture(g, nx, nw0, ATMOE_NODE_NONE, dset,
                                       ATMOE_MIX_BLOCK, g32, ATMOE_NODE_NONE,
                                       1, &ny),
                ATMOE_STATUS_INVALID_ARGUMENT, "dense");
    FAILS_CLEAN(g, atmoe_graph_mixture(g, nx, nw0, ATMOE_NODE_NONE, dset,
                                       ATMOE_MIX_DIAGONAL, g4,
                                       ATMOE_NODE_NONE, 1, &ny),
                ATMOE_STATUS_INVALID_ARGUMENT, "dense");
    FAILS_CLEAN(g, atmoe_graph_mixture(g, nx, nw0, ATMOE_NODE_NONE, lset,
                                       ATMOE_MIX_DENSE, g32, ATMOE_NODE_NONE,
                                       1, &ny),
                ATMOE_STATUS_INVALID_ARGUMENT, "dense");
    FAILS_CLEAN(g, atmoe_graph_mixture(g, nx, nw0, ATMOE_NODE_NONE, gset,
                                       ATMOE_MIX_DENSE, g32, ATMOE_NODE_NONE,
                                       1, &ny),
                ATMOE_STATUS_INVALID_ARGUMENT, "dense");
    const atmoe_node bad_gates[5] = {g31, g33, g4, g8, row31};
    for (int i = 0; i < 5; i++)
        FAILS_CLEAN(g, atmoe_graph_mixture(g, nx, nw0, ATMOE_NODE_NONE, dset,
                                           ATMOE_MIX_DENSE, bad_gates[i],
                                           ATMOE_NODE_NONE, 1, &ny),
                    ATMOE_STATUS_SHAPE_MISMATCH, "gates");
    FAILS_CLEAN(g, atmoe_graph_mixture(g, nx, nw0, ATMOE_NODE_NONE, dset,
                                       ATMOE_MIX_DENSE, row8, ATMOE_NODE_NONE,
                                       1, &ny),
                ATMOE_STATUS_SHAPE_MISMATCH, "gates");
    ck_assert_int_eq(ny, -7);
    /* None of that sealed the ordinary sets. */
    OK(atmoe_experts_add(lset, 1, 1, A, B, 1, 0, NULL));

    /* After all that, the dense mixture works, and NaN-free output. */
    OK(atmoe_graph_mixture(g, nx, nw0, ATMOE_NODE_NONE, dset, ATMOE_MIX_DENSE,
                           g32, ATMOE_NODE_NONE, 1, &ny));
    OK(atmoe_graph_mark_output(g, ny));
    OK(atmoe_graph_plan(g, 0));
    float *x = alloc_uniform(T * DI, -1, 1);
    float *gt = alloc_uniform(T * 32, -1, 1);
    OK(atmoe_graph_set_input(g, nx, x, T * DI * sizeof *x, T));
    OK(atmoe_graph_set_input(g, g32, gt, T * 32 * sizeof *gt, T));
    OK(atmoe_graph_compute(g, T));
    float *y = read_out(g, ny, T * DO);
    dense Dv = {DI, DO, 4, 8, A, B, dset};
    check_dense("dense after refused calls", &Dv, x, T, buf, NULL, gt, T, NULL,
                1.0, y);
    free(y);
    free(x);
    free(gt);
    atmoe_graph_free(g);
    atmoe_experts_free(dset);
    atmoe_experts_free(lset);
    atmoe_experts_free(gset);
    free(buf);
    free(A);
    free(B);
    atmoe_context_free(CTX);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* atmoe_graph_moe_layer                                                     */
/* ------------------------------------------------------------------------ */

/* Two layers on one batched x, each routing every token by its hidden
 * state: one with a general LoRA (lambda 0.7), top-2 groups, bias, c 1 and
 * a trace; one with the scaled router, no bias, c 0.5 and no trace.
 * Batches 7 and 5 of a plan for 7. */
START_TEST(test_layer_per_token)
{
    CTX = test_context();
    test_rng_seed(&RNG, 2404);
    const size_t T = 7, DI = 37, DO = 29;
    static const int g0[5] = {0, 0, 1, 2, 2};
    static const size_t r0[5] = {3, 5, 2, 4, 1};
    static const unsigned f0[5] = {0, ATMOE_EXPERT_RSLORA, 0, 0, 0};
    static const int g1[4] = {0, 0, 1, 1};
    static const size_t r1[4] = {2, 1, 3, 2};
    lspec L[2];
    memset(L, 0, sizeof L);
    model_init(&L[0].m, DI, DO, 5, g0, r0, f0);
    model_general(&L[0].m, 3, 0, 0.7f, 0);
    lspec_build(&L[0], ATMOE_ROUTER_PROJECTED, 0.7f, 1.3f, 2, 1, 1.0f, 0);
    model_init(&L[1].m, DI, DO, 4, g1, r1, NULL);
    lspec_build(&L[1], ATMOE_ROUTER_SCALED, 1.5f, 0.6f, 0, 0, 0.5f, 0);

    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node nx = input2(g, "x", ATMOE_DTYPE_F32, T, DI, 1);
    atmoe_node y[2];
    atmoe_layer_trace tr;
    memset(&tr, 0xff, sizeof tr);
    for (int l = 0; l < 2; l++) {
        lspec_nodes(&L[l], g, ATMOE_NODE_NONE);
        OK(atmoe_graph_moe_layer(g, nx, &L[l].layer, &y[l],
                                 l == 0 ? &tr : NULL));
        OK(atmoe_graph_mark_output(g, y[l]));
    }
    ck_assert(tr.a >= 0 && tr.d >= 0 && tr.w >= 0);
    OK(atmoe_graph_mark_output(g, tr.a));
    OK(atmoe_graph_mark_output(g, tr.d));
    OK(atmoe_graph_mark_output(g, tr.w));
    OK(atmoe_graph_plan(g, 0));
    int ndim;
    size_t shape[ATMOE_MAX_DIMS];
    atmoe_dtype dt;
    OK(atmoe_graph_get_shape(g, tr.w, &ndim, shape, &dt));
    ck_assert(ndim == 2 && shape[0] == T && shape[1] == 5);
    OK(atmoe_graph_get_shape(g, tr.d, &ndim, shape, &dt));
    ck_assert(ndim == 2 && shape[0] == T && shape[1] == 6);
    OK(atmoe_graph_get_shape(g, y[0], &ndim, shape, &dt));
    ck_assert(ndim == 2 && shape[0] == T && shape[1] == DO);

    static const size_t batches[2] = {7, 5};
    for (int b = 0; b < 2; b++) {
        size_t n = batches[b];
        float *x = alloc_uniform(n * DI, -1, 1);
        OK(atmoe_graph_set_input(g, nx, x, n * DI * sizeof *x, n));
        OK(atmoe_graph_compute(g, n));
        lgot o;
        lgot_read(g, &L[0], 1, n, &tr, y[0], &o);
        check_stack("layer per token, top-2 groups", &L[0], 1, x, n, NULL,
                    0, &o);
        /* Top-2 of 3 groups: exactly one group gets 0 in every row. */
        for (size_t t = 0; t < n; t++) {
            int zero = 0;
            for (int k = 0; k < 3; k++)
                zero += o.a[0][t * 3 + k] == 0.0f;
            ck_assert_int_eq(zero, 1);
        }
        lgot_free(&o);
        lgot_read(g, &L[1], 1, n, NULL, y[1], &o);
        check_stack("layer per token, scaled, no trace", &L[1], 1, x, n, NULL,
                    0, &o);
        lgot_free(&o);
        free(x);
    }
    atmoe_graph_free(g);
    lspec_free(&L[0]);
    lspec_free(&L[1]);
    atmoe_context_free(CTX);
}
END_TEST

/* Routing per sequence: router_input [S, d_in] (one pooled row per
 * sequence), gate_index [T] naming each token's sequence, out-of-range
 * entries included (those tokens get the base and the general LoRA only).
 * The trace has S rows.  Batches 11 and 4 of a plan for 11. */
START_TEST(test_layer_per_sequence)
{
    CTX = test_context();
    test_rng_seed(&RNG, 2505);
    const size_t T = 11, S = 3, DI = 37, DO = 29;
    static const int g0[5] = {0, 0, 1, 2, 2};
    static const size_t r0[5] = {3, 5, 2, 4, 1};
    static const int seq[11] = {0, 0, 2, 1, 3, 1, 2, -1, 0, 2, 1};
    lspec L;
    memset(&L, 0, sizeof L);
    model_init(&L.m, DI, DO, 5, g0, r0, NULL);
    model_general(&L.m, 2, ATMOE_EXPERT_RSLORA, 0.6f, 0);
    lspec_build(&L, ATMOE_ROUTER_PROJECTED, 0.8f, 1.2f, 0, 1, 0.75f, S);

    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node nx = input2(g, "x", ATMOE_DTYPE_F32, T, DI, 1);
    atmoe_node ni = input2(g, "seq", ATMOE_DTYPE_I32, T, 0, 1);
    lspec_nodes(&L, g, ni);
    atmoe_node y;
    atmoe_layer_trace tr;
    OK(atmoe_graph_moe_layer(g, nx, &L.layer, &y, &tr));
    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_mark_output(g, tr.a));
    OK(atmoe_graph_mark_output(g, tr.d));
    OK(atmoe_graph_mark_output(g, tr.w));
    OK(atmoe_graph_plan(g, 0));
    int ndim;
    size_t shape[ATMOE_MAX_DIMS];
    atmoe_dtype dt;
    OK(atmoe_graph_get_shape(g, tr.a, &ndim, shape, &dt));
    ck_assert(ndim == 2 && shape[0] == S && shape[1] == 3);
    OK(atmoe_graph_get_shape(g, tr.w, &ndim, shape, &dt));
    ck_assert(ndim == 2 && shape[0] == S && shape[1] == 5);

    static const size_t batches[2] = {11, 4};
    for (int b = 0; b < 2; b++) {
        size_t n = batches[b];
        /* The batch of 4 takes the last four tokens (-1 among them). */
        const int *is = seq + (T - n);
        float *x = alloc_uniform(n * DI, -1, 1);
        OK(atmoe_graph_set_input(g, nx, x, n * DI * sizeof *x, n));
        OK(atmoe_graph_set_input(g, ni, is, n * sizeof *is, n));
        OK(atmoe_graph_compute(g, n));
        lgot o;
        lgot_read(g, &L, 1, n, &tr, y, &o);
        check_stack("layer per sequence", &L, 1, x, n, is, 0, &o);
        lgot_free(&o);
        free(x);
    }
    atmoe_graph_free(g);
    lspec_free(&L);
    atmoe_context_free(CTX);
}
END_TEST

START_TEST(test_layer_errors)
{
    CTX = test_context();
    test_rng_seed(&RNG, 2606);
    const size_t T = 5, S = 2, DI = 37, DO = 29;
    static const int g0[5] = {0, 0, 1, 2, 2};
    static const size_t r0[5] = {3, 5, 2, 4, 1};
    static const int g1[3] = {0, 1, 1};
    static const size_t r1[3] = {2, 2, 1};
    lspec L, other;
    memset(&L, 0, sizeof L);
    memset(&other, 0, sizeof other);
    model_init(&L.m, DI, DO, 5, g0, r0, NULL);
    lspec_build(&L, ATMOE_ROUTER_PROJECTED, 0.7f, 1.3f, 0, 1, 1.0f, 0);
    model_init(&other.m, DI, DO, 3, g1, r1, NULL);
    lspec_build(&other, ATMOE_ROUTER_PROJECTED, 0.7f, 1.3f, 0, 0, 1.0f, 0);
    float *buf = alloc_uniform((DI + 1) * (DO + 1), -1, 1);

    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node nx = input2(g, "x", ATMOE_DTYPE_F32, T, DI, 1);
    atmoe_node x_wide = input2(g, "x_wide", ATMOE_DTYPE_F32, T, DI + 1, 1);
    atmoe_node ni = input2(g, "seq", ATMOE_DTYPE_I32, T, 0, 1);
    atmoe_node ni_f32 = input2(g, "seq_f32", ATMOE_DTYPE_F32, T, 0, 1);
    atmoe_node nh = const2(g, ATMOE_DTYPE_F32, S, DI, buf);
    atmoe_node w0_t = const2(g, ATMOE_DTYPE_F32, DI, DO, buf);
    atmoe_node b_long = const2(g, ATMOE_DTYPE_F32, DO + 1, 0, buf);
    atmoe_node wg_wide = const2(g, ATMOE_DTYPE_F32, DI, 4, buf);
    lspec_nodes(&L, g, ATMOE_NODE_NONE);
    lspec_nodes(&other, g, ATMOE_NODE_NONE);
    const atmoe_layer good = L.layer;
    atmoe_layer bad;
    atmoe_node y = -7;
    atmoe_layer_trace tr = {-7, -7, -7};

    FAILS(atmoe_graph_moe_layer(NULL, nx, &good, &y, &tr), NULL,
          ATMOE_STATUS_NULL_POINTER, "NULL");
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, NULL, &y, &tr),
                ATMOE_STATUS_NULL_POINTER, "layer");
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &good, NULL, &tr),
                ATMOE_STATUS_NULL_POINTER, "'y'");
    bad = good;
    bad.experts = NULL;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_NULL_POINTER, "experts");
    bad = good;
    bad.router = NULL;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_NULL_POINTER, "router");
    /* The router of another set (its own set is fine otherwise). */
    bad = good;
    bad.router = other.router;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_INVALID_ARGUMENT, "another expert set");
    bad = good;
    bad.experts = other.set;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_INVALID_ARGUMENT, "another expert set");
    /* router_input and gate_index go together. */
    bad = good;
    bad.router_input = nh;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_INVALID_ARGUMENT, "gate_index");
    bad = good;
    bad.gate_index = ni;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_INVALID_ARGUMENT, "router_input");
    /* Failures in the router (nothing added yet)... */
    bad = good;
    bad.w_g = wg_wide;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_SHAPE_MISMATCH, "w_g");
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, x_wide, &good, &y, &tr),
                ATMOE_STATUS_SHAPE_MISMATCH, "h must be");
    bad = good;
    bad.router_input = nh;
    bad.gate_index = ni;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, x_wide, &bad, &y, &tr),
                ATMOE_STATUS_SHAPE_MISMATCH, "x must be");
    /* ... and in the mixture, after the router's nodes went in: they are
     * taken out again. */
    bad = good;
    bad.w0 = w0_t;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_SHAPE_MISMATCH, "w0");
    bad = good;
    bad.bias = b_long;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_SHAPE_MISMATCH, "bias");
    bad = good;
    bad.c = NAN;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_INVALID_ARGUMENT, "c is");
    bad = good;
    bad.router_input = nh;
    bad.gate_index = ni_f32;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_DTYPE_MISMATCH, "gate_index");
    bad.gate_index = 999;
    FAILS_CLEAN(g, atmoe_graph_moe_layer(g, nx, &bad, &y, &tr),
                ATMOE_STATUS_INVALID_ARGUMENT, "999");
    /* Outputs untouched by every failure. */
    ck_assert_int_eq(y, -7);
    ck_assert(tr.a == -7 && tr.d == -7 && tr.w == -7);

    /* After all that, the good layer goes in and computes right. */
    OK(atmoe_graph_moe_layer(g, nx, &good, &y, &tr));
    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_mark_output(g, tr.a));
    OK(atmoe_graph_mark_output(g, tr.d));
    OK(atmoe_graph_mark_output(g, tr.w));
    OK(atmoe_graph_plan(g, 0));
    float *x = alloc_uniform(T * DI, -1, 1);
    OK(atmoe_graph_set_input(g, nx, x, T * DI * sizeof *x, T));
    OK(atmoe_graph_compute(g, T));
    lgot o;
    lgot_read(g, &L, 1, T, &tr, y, &o);
    check_stack("layer after refused calls", &L, 1, x, T, NULL, 0, &o);
    lgot_free(&o);
    free(x);
    atmoe_graph_free(g);
    lspec_free(&L);
    lspec_free(&other);
    free(buf);
    atmoe_context_free(CTX);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* atmoe_graph_moe_stack                                                     */
/* ------------------------------------------------------------------------ */

/* Three layers, 37 -> 29 -> 31 -> 23 (stack3_make), x batched: planned for
 * 9, computed at 9, 4, 1 and 9 again; traces of every layer and y against
 * the float64 reference of the whole stack.  A second stack over the same
 * layers without traces goes in the same graph, and so do stacks of the
 * first one and two layers: their outputs are the hidden states between
 * the layers, so that each layer (its trace, and its output) is also
 * checked tightly against the reference of that layer alone. */
START_TEST(test_stack)
{
    CTX = test_context();
    test_rng_seed(&RNG, 2707);
    const size_t T = 9;
    static const int seq[9] = {1, 0, 0, 1, 1, 0, 1, 0, 1};
    lspec L[3];
    stack3_make(L);
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node nx = input2(g, "x", ATMOE_DTYPE_F32, T, 37, 1);
    atmoe_node ni = input2(g, "seq", ATMOE_DTYPE_I32, T, 0, 1);
    atmoe_layer layers[3];
    for (int l = 0; l < 3; l++) {
        lspec_nodes(&L[l], g, ni);
        layers[l] = L[l].layer;
    }
    atmoe_node y = -7, y2 = -7;
    atmoe_layer_trace tr[3];
    memset(tr, 0xff, sizeof tr);
    OK(atmoe_graph_moe_stack(g, nx, layers, 3, &y, tr));
    OK(atmoe_graph_moe_stack(g, nx, layers, 3, &y2, NULL));
    ck_assert(y >= 0 && y2 >= 0 && y2 != y);
    atmoe_node hs[2];
    OK(atmoe_graph_moe_stack(g, nx, layers, 1, &hs[0], NULL));
    OK(atmoe_graph_moe_stack(g, nx, layers, 2, &hs[1], NULL));
    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_mark_output(g, y2));
    OK(atmoe_graph_mark_output(g, hs[0]));
    OK(atmoe_graph_mark_output(g, hs[1]));
    for (int l = 0; l < 3; l++) {
        ck_assert(tr[l].a >= 0 && tr[l].d >= 0 && tr[l].w >= 0);
        OK(atmoe_graph_mark_output(g, tr[l].a));
        OK(atmoe_graph_mark_output(g, tr[l].d));
        OK(atmoe_graph_mark_output(g, tr[l].w));
    }
    OK(atmoe_graph_plan(g, 0));
    int ndim;
    size_t shape[ATMOE_MAX_DIMS];
    atmoe_dtype dt;
    OK(atmoe_graph_get_shape(g, y, &ndim, shape, &dt));
    ck_assert(ndim == 2 && shape[0] == T && shape[1] == 23);
    OK(atmoe_graph_get_shape(g, tr[1].w, &ndim, shape, &dt));
    ck_assert(ndim == 2 && shape[0] == 2 && shape[1] == 4); /* per sequence */
    OK(atmoe_graph_get_shape(g, tr[2].d, &ndim, shape, &dt));
    ck_assert(ndim == 2 && shape[0] == T && shape[1] == 8);

    static const size_t batches[4] = {9, 4, 1, 9};
    for (int b = 0; b < 4; b++) {
        size_t n = batches[b];
        float *x = alloc_uniform(n * 37, -1, 1);
        OK(atmoe_graph_set_input(g, nx, x, n * 37 * sizeof *x, n));
        OK(atmoe_graph_set_input(g, ni, seq, n * sizeof *seq, n));
        OK(atmoe_graph_compute(g, n));
        char what[48];
        lgot o;
        lgot_read(g, L, 3, n, tr, y, &o);
        snprintf(what, sizeof what, "stack, T %zu", n);
        check_stack(what, L, 3, x, n, seq, 0, &o);
        /* Layer by layer, each fed by the library's hidden state. */
        float *h[2] = {read_out(g, hs[0], n * 29), read_out(g, hs[1], n * 31)};
        for (int l = 0; l < 3; l++) {
            lgot one;
            memset(&one, 0, sizeof one);
            one.a[0] = o.a[l];
            one.d[0] = o.d[l];
            one.w[0] = o.w[l];
            one.y = l < 2 ? h[l] : o.y;
            snprintf(what, sizeof what, "stack, T %zu, layer %d alone", n, l);
            check_stack(what, &L[l], 1, l ? h[l - 1] : x, n, seq,
                        l ? PREFIX_ULPS : 0.0, &one);
        }
        free(h[0]);
        free(h[1]);
        lgot_free(&o);
        lgot_read(g, L, 3, n, NULL, y2, &o);
        snprintf(what, sizeof what, "stack without traces, T %zu", n);
        check_stack(what, L, 3, x, n, seq, 0, &o);
        lgot_free(&o);
        free(x);
    }
    atmoe_graph_free(g);
    for (int l = 0; l < 3; l++)
        lspec_free(&L[l]);
    atmoe_context_free(CTX);
}
END_TEST

START_TEST(test_stack_errors)
{
    CTX = test_context();
    test_rng_seed(&RNG, 2808);
    const size_t T = 5;
    static const int seq[5] = {0, 1, 1, 0, 1};
    lspec L[3];
    stack3_make(L);
    float *buf = alloc_uniform(40 * 40, -1, 1);
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node nx = input2(g, "x", ATMOE_DTYPE_F32, T, 37, 1);
    atmoe_node ni = input2(g, "seq", ATMOE_DTYPE_I32, T, 0, 1);
    atmoe_layer good[3];
    for (int l = 0; l < 3; l++) {
        lspec_nodes(&L[l], g, ni);
        good[l] = L[l].layer;
    }
    /* Layer 1 (the middle one) is 29 -> 31: a w0 of [29, 31] is wrong. */
    atmoe_node w0_t = const2(g, ATMOE_DTYPE_F32, 29, 31, buf);
    atmoe_layer bad[3];
    atmoe_node y = -7;
    atmoe_layer_trace tr[3], tr0[3];
    memset(tr, 0xff, sizeof tr);
    memcpy(tr0, tr, sizeof tr);
    int traces_touched = 0;

    FAILS(atmoe_graph_moe_stack(NULL, nx, good, 3, &y, tr), NULL,
          ATMOE_STATUS_NULL_POINTER, "NULL");
    FAILS_CLEAN(g, atmoe_graph_moe_stack(g, nx, NULL, 3, &y, tr),
                ATMOE_STATUS_NULL_POINTER, "layers");
    FAILS_CLEAN(g, atmoe_graph_moe_stack(g, nx, good, 3, NULL, tr),
                ATMOE_STATUS_NULL_POINTER, "'y'");
    FAILS_CLEAN(g, atmoe_graph_moe_stack(g, nx, good, 0, &y, tr),
                ATMOE_STATUS_INVALID_ARGUMENT, "no layer");

    /* The middle layer's w0 of the wrong shape: the status of the layer's
     * failure, a message naming the layer (0-based, like traces[]) and the
     * operand, and layer 0's nodes taken out again. */
    memcpy(bad, good, sizeof bad);
    bad[1].w0 = w0_t;
    FAILS_CLEAN(g, atmoe_graph_moe_stack(g, nx, bad, 3, &y, tr),
                ATMOE_STATUS_SHAPE_MISMATCH, "layer 1");
    ck_assert_msg(strstr(atmoe_errmsg(CTX), "w0") != NULL,
                  "message \"%s\" does not name w0", atmoe_errmsg(CTX));
    traces_touched |= memcmp(tr, tr0, sizeof tr) != 0;
    /* The last layer with the router of another set. */
    memcpy(bad, good, sizeof bad);
    bad[2].router = L[0].router;
    FAILS_CLEAN(g, atmoe_graph_moe_stack(g, nx, bad, 3, &y, tr),
                ATMOE_STATUS_INVALID_ARGUMENT, "layer 2");
    ck_assert(strstr(atmoe_errmsg(CTX), "another expert set") != NULL);
    traces_touched |= memcmp(tr, tr0, sizeof tr) != 0;
    /* The first layer. */
    memcpy(bad, good, sizeof bad);
    bad[0].bias = good[2].bias; /* [23], not [29] */
    FAILS_CLEAN(g, atmoe_graph_moe_stack(g, nx, bad, 3, &y, tr),
                ATMOE_STATUS_SHAPE_MISMATCH, "layer 0");
    /* Layers whose sizes do not chain: 37 -> 29, then 31 -> 23. */
    bad[0] = good[0];
    bad[1] = good[2];
    FAILS_CLEAN(g, atmoe_graph_moe_stack(g, nx, bad, 2, &y, tr),
                ATMOE_STATUS_SHAPE_MISMATCH, "layer 1");
    traces_touched |= memcmp(tr, tr0, sizeof tr) != 0;
    /* router_input without gate_index in the middle layer. */
    memcpy(bad, good, sizeof bad);
    bad[1].gate_index = ATMOE_NODE_NONE;
    FAILS_CLEAN(g, atmoe_graph_moe_stack(g, nx, bad, 3, &y, tr),
                ATMOE_STATUS_INVALID_ARGUMENT, "layer 1");
    ck_assert_int_eq(y, -7);

    /* After all that, the stack goes in and computes right. */
    OK(atmoe_graph_moe_stack(g, nx, good, 3, &y, tr));
    OK(atmoe_graph_mark_output(g, y));
    for (int l = 0; l < 3; l++) {
        OK(atmoe_graph_mark_output(g, tr[l].a));
        OK(atmoe_graph_mark_output(g, tr[l].d));
        OK(atmoe_graph_mark_output(g, tr[l].w));
    }
    OK(atmoe_graph_plan(g, 0));
    float *x = alloc_uniform(T * 37, -1, 1);
    OK(atmoe_graph_set_input(g, nx, x, T * 37 * sizeof *x, T));
    OK(atmoe_graph_set_input(g, ni, seq, sizeof seq, T));
    OK(atmoe_graph_compute(g, T));
    lgot o;
    lgot_read(g, L, 3, T, tr, y, &o);
    check_stack("stack after refused calls", L, 3, x, T, seq, 0, &o);
    lgot_free(&o);
    free(x);
    atmoe_graph_free(g);
    for (int l = 0; l < 3; l++)
        lspec_free(&L[l]);
    free(buf);
    atmoe_context_free(CTX);
    /* A failed stack must not hand back traces of layers whose nodes it
     * took out again: their ids would name whatever is added next. */
    ck_assert_msg(!traces_touched,
                  "a failed atmoe_graph_moe_stack wrote traces[] of the "
                  "layers before the failing one");
}
END_TEST

/* Computes g again (inputs as they were) without planning it again, and
 * says in problem what differs from y0 ("" if nothing). */
static void recompute_same(atmoe_graph *g, size_t T, atmoe_node y,
                           const float *y0, size_t count, char *problem,
                           size_t size)
{
    problem[0] = '\0';
    atmoe_status st = atmoe_graph_compute(g, T);
    if (st != ATMOE_STATUS_OK) {
        snprintf(problem, size, "atmoe_graph_compute -> %s: %s",
                 atmoe_status_name(st), atmoe_errmsg(CTX));
        return;
    }
    float *y1 = read_out(g, y, count);
    for (size_t i = 0; i < count && !problem[0]; i++)
        if (!(y1[i] == y0[i]))
            snprintf(problem, size, "y[%zu] = %.9g, was %.9g", i, y1[i],
                     y0[i]);
    free(y1);
}

/* A layer or a stack refused part way (after the router's nodes went in)
 * changes nothing: not the nodes, and not the plan either, so the graph
 * computes again without atmoe_graph_plan. */
START_TEST(test_failed_calls_keep_plan)
{
    CTX = test_context();
    test_rng_seed(&RNG, 2909);
    const size_t T = 5;
    static const int seq[5] = {1, 1, 0, 0, 1};
    lspec L[3];
    stack3_make(L);
    float *buf = alloc_uniform(40 * 40, -1, 1);
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node nx = input2(g, "x", ATMOE_DTYPE_F32, T, 37, 1);
    atmoe_node ni = input2(g, "seq", ATMOE_DTYPE_I32, T, 0, 1);
    atmoe_layer layers[3];
    for (int l = 0; l < 3; l++) {
        lspec_nodes(&L[l], g, ni);
        layers[l] = L[l].layer;
    }
    atmoe_node w0_t = const2(g, ATMOE_DTYPE_F32, 29, 31, buf);
    atmoe_node y;
    OK(atmoe_graph_moe_stack(g, nx, layers, 3, &y, NULL));
    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_plan(g, 0));
    float *x = alloc_uniform(T * 37, -1, 1);
    OK(atmoe_graph_set_input(g, nx, x, T * 37 * sizeof *x, T));
    OK(atmoe_graph_set_input(g, ni, seq, sizeof seq, T));
    OK(atmoe_graph_compute(g, T));
    float *y0 = read_out(g, y, T * 23);

    /* What went wrong, reported after everything is freed (so that a
     * failure here leaks nothing under valgrind with CK_FORK=no). */
    char problem[2][256] = {"", ""};
    atmoe_layer bad = layers[1];
    bad.w0 = w0_t;
    atmoe_node yb = -7;
    /* Layer 1's own input would be 29 wide; x is 37, but the router
     * (per sequence, on router_input) goes in before the mixture fails. */
    FAILS(atmoe_graph_moe_layer(g, nx, &bad, &yb, NULL), CTX,
          ATMOE_STATUS_SHAPE_MISMATCH, "x must be");
    recompute_same(g, T, y, y0, T * 23, problem[0], sizeof problem[0]);
    if (problem[0][0]) /* plan again, to test the stack all the same */
        OK(atmoe_graph_plan(g, 0));

    atmoe_layer bl[3];
    memcpy(bl, layers, sizeof bl);
    bl[1].w0 = w0_t;
    FAILS(atmoe_graph_moe_stack(g, nx, bl, 3, &yb, NULL), CTX,
          ATMOE_STATUS_SHAPE_MISMATCH, "layer 1");
    recompute_same(g, T, y, y0, T * 23, problem[1], sizeof problem[1]);
    ck_assert_int_eq(yb, -7);
    free(y0);
    free(x);
    atmoe_graph_free(g);
    for (int l = 0; l < 3; l++)
        lspec_free(&L[l]);
    free(buf);
    atmoe_context_free(CTX);
    ck_assert_msg(!problem[0][0] && !problem[1][0],
                  "after a refused atmoe_graph_moe_layer: %s; after a "
                  "refused atmoe_graph_moe_stack: %s",
                  problem[0][0] ? problem[0] : "fine",
                  problem[1][0] ? problem[1] : "fine");
}
END_TEST

static Suite *moe_layer_suite(void)
{
    Suite *s = suite_create("moe_layer");
    TCase *tc;

    tc = tcase_create("dense");
    tcase_add_test(tc, test_dense_mixture);
    tcase_add_test(tc, test_dense_single_row);
    tcase_add_test(tc, test_dense_single_row_half);
    tcase_add_test(tc, test_dense_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("layer");
    tcase_add_test(tc, test_layer_per_token);
    tcase_add_test(tc, test_layer_per_sequence);
    tcase_add_test(tc, test_layer_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("stack");
    tcase_add_test(tc, test_stack);
    tcase_add_test(tc, test_stack_errors);
    tcase_add_test(tc, test_failed_calls_keep_plan);
    suite_add_tcase(s, tc);

    return s;
}

int main(void)
{
    return test_run_suite(moe_layer_suite());
}
