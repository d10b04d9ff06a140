/* The float64 host reference of expert sets and the AT-MoE grouped router
 * (SPEC sections 1-2; the router mirrors cl/router.cl), and the helpers
 * that tests/test_moe.c and tests/test_moe_layer.c share: host buffers,
 * graph inputs and outputs, and the scaled comparison. */
#include "moe_reference.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

atmoe_context *CTX;
test_rng RNG;

float *alloc_uniform(size_t n, double lo, double hi)
{
    float *p = malloc((n ? n : 1) * sizeof *p);
    ck_assert_ptr_nonnull(p);
    test_fill_uniform(&RNG, p, n, lo, hi);
    return p;
}

double *alloc_d(size_t n)
{
    double *p = malloc((n ? n : 1) * sizeof *p);
    ck_assert_ptr_nonnull(p);
    for (size_t i = 0; i < n; i++)
        p[i] = NAN;
    return p;
}

double *to_double(const float *p, size_t n)
{
    double *d = alloc_d(n);
    for (size_t i = 0; i < n; i++)
        d[i] = p[i];
    return d;
}

atmoe_node input2(atmoe_graph *g, const char *name, atmoe_dtype dtype,
                  size_t rows, size_t cols, int batched)
{
    size_t shape[2] = {rows, cols};
    atmoe_node n;
    OK(atmoe_graph_input(g, name, dtype, cols ? 2 : 1, shape, batched, &n));
    return n;
}

atmoe_node const2(atmoe_graph *g, atmoe_dtype dtype, size_t rows,
                  size_t cols, const void *data)
{
    size_t shape[2] = {rows, cols};
    atmoe_node n;
    OK(atmoe_graph_constant(g, NULL, dtype, cols ? 2 : 1, shape, data, &n));
    return n;
}

float *read_out(atmoe_graph *g, atmoe_node n, size_t count)
{
    float *p = malloc((count ? count : 1) * sizeof *p);
    ck_assert_ptr_nonnull(p);
    test_poison(p, count);
    OK(atmoe_graph_read(g, n, p, count * sizeof *p));
    return p;
}

/* |got - want| <= tol * scale everywhere. */
void expect_scaled(const char *what, const float *got,
                   const double *want, const double *scale,
                   size_t rows, size_t cols, double tol)
{
    for (size_t i = 0; i < rows * cols; i++) {
        double e = fabs(got[i] - want[i]) / fmax(scale[i], 1e-30);
        ck_assert_msg(e <= tol,
                      "%s[%zu,%zu] = %.9g, reference %.9g: error %.3g of the "
                      "scale %.4g (tolerance %g)",
                      what, i / cols, i % cols, got[i], want[i], e, scale[i],
                      tol);
    }
}

void model_init(model *m, size_t d_in, size_t d_out, int n,
                const int *group, const size_t *rank,
                const unsigned *flags)
{
    memset(m, 0, sizeof *m);
    m->d_in = d_in;
    m->d_out = d_out;
    m->n = n;
    m->lambda = 1.0f;
    for (int e = 0; e < n; e++) {
        m->group[e] = group[e];
        m->rank[e] = rank[e];
        m->alpha[e] = (float)(rank[e] * test_uniform(&RNG, 0.5, 2.0));
        m->flags[e] = flags ? flags[e] : 0;
        m->A[e] = alloc_uniform(rank[e] * d_in, -1, 1);
        m->B[e] = alloc_uniform(d_out * rank[e], -1, 1);
        m->slot[e] = m->count[group[e]]++;
        if (group[e] + 1 > m->G)
            m->G = group[e] + 1;
        if (m->slot[e] + 1 > m->M)
            m->M = m->slot[e] + 1;
        m->R += rank[e];
    }
}

void model_general(model *m, size_t rank, unsigned flags, float lambda,
                   int first)
{
    m->has_general = 1;
    m->general_first = first;
    m->rank_p = rank;
    m->alpha_p = (float)(rank * test_uniform(&RNG, 0.5, 2.0));
    m->flags_p = flags;
    m->lambda = lambda;
    m->Ap = alloc_uniform(rank * m->d_in, -1, 1);
    m->Bp = alloc_uniform(m->d_out * rank, -1, 1);
}

void model_free(model *m)
{
    for (int e = 0; e < m->n; e++) {
        free(m->A[e]);
        free(m->B[e]);
    }
    free(m->Ap);
    free(m->Bp);
}

atmoe_experts *model_build(const model *m)
{
    atmoe_experts *set = NULL;
    OK(atmoe_experts_new(CTX, m->d_in, m->d_out, &set));
    if (m->has_general && m->general_first)
        OK(atmoe_experts_set_general(set, m->rank_p, m->Ap, m->Bp, m->alpha_p,
                                     m->flags_p, m->lambda));
    for (int e = 0; e < m->n; e++) {
        int index = -1;
        OK(atmoe_experts_add(set, m->group[e], m->rank[e], m->A[e], m->B[e],
                             m->alpha[e], m->flags[e], &index));
        ck_assert_int_eq(index, e);
    }
    if (m->has_general && !m->general_first)
        OK(atmoe_experts_set_general(set, m->rank_p, m->Ap, m->Bp, m->alpha_p,
                                     m->flags_p, m->lambda));
    atmoe_experts_info info;
    memset(&info, 0xff, sizeof info);
    OK(atmoe_experts_get_info(set, &info));
    ck_assert_uint_eq(info.d_in, m->d_in);
    ck_assert_uint_eq(info.d_out, m->d_out);
    ck_assert_uint_eq(info.experts, (size_t)m->n);
    ck_assert_uint_eq(info.groups, (size_t)m->G);
    ck_assert_uint_eq(info.max_group, (size_t)m->M);
    ck_assert_uint_eq(info.total_rank, m->R + (m->has_general ? m->rank_p : 0));
    ck_assert_int_eq(info.has_general, m->has_general);
    ck_assert_msg(info.lambda == m->lambda, "lambda %g, set %g", info.lambda,
                  m->lambda);
    ck_assert_uint_eq(info.dense_r2, 0);
    return set;
}

double ref_scale(size_t rank, float alpha, unsigned flags)
{
    return flags & ATMOE_EXPERT_RSLORA ? alpha / sqrt((double)rank)
                                       : alpha / (double)rank;
}

atmoe_router *router_make(atmoe_experts *set, rcfg *c,
                          atmoe_router_form form, float tau_g,
                          float tau_d, int topk_g, int topk_e)
{
    c->form = form;
    c->tau_g = tau_g;
    c->tau_d = tau_d;
    c->topk_g = topk_g;
    c->topk_e = topk_e;
    for (int i = 0; i < MAXG; i++) {
        c->gmask[i] = 1;
        c->gfix[i] = NAN;
    }
    for (int i = 0; i < MAXG * MAXM; i++) {
        c->emask[i] = 1;
        c->efix[i] = NAN;
    }
    atmoe_router *r = NULL;
    OK(atmoe_router_new(set, form, tau_g, tau_d, topk_g, topk_e, &r));
    ck_assert_ptr_nonnull(r);
    return r;
}

void ref_softmax(double *x, const int *keep, int n, double tau)
{
    double mx = -INFINITY, sum = 0;
    for (int i = 0; i < n; i++)
        if (keep[i] && x[i] / tau > mx)
            mx = x[i] / tau;
    for (int i = 0; i < n; i++) {
        x[i] = keep[i] ? exp(x[i] / tau - mx) : 0.0;
        sum += x[i];
    }
    for (int i = 0; i < n; i++)
        x[i] = sum > 0 ? x[i] / sum : 0.0;
}

/* Keeps the k largest of the entries with keep set (ties: lower index). */
void ref_keep_top(const double *v, int *keep, int n, int k)
{
    if (k <= 0)
        return;
    int cand[MAXM > MAXG ? MAXM : MAXG], kept = 0;
    for (int i = 0; i < n; i++) {
        cand[i] = keep[i];
        kept += keep[i];
    }
    for (; kept > k; kept--) {
        int worst = -1;
        for (int i = 0; i < n; i++)
            if (keep[i] && (worst < 0 || v[i] <= v[worst]))
                worst = i;
        keep[worst] = 0;
    }
    double lo = INFINITY, hi = -INFINITY;
    for (int i = 0; i < n; i++) {
        if (keep[i])
            lo = fmin(lo, v[i]);
        else if (cand[i])
            hi = fmax(hi, v[i]);
    }
    ck_assert_msg(!(hi > -INFINITY && lo != hi && fabs(lo - hi) < NEAR_TIE),
                  "test data: a near tie (%.9g vs %.9g) at the top-k "
                  "boundary; change the seed",
                  lo, hi);
}

void ref_apply_fixed(double *v, const int *keep, const float *fixed,
                     int n)
{
    double fixed_sum = 0, free_sum = 0;
    for (int i = 0; i < n; i++) {
        if (!keep[i])
            continue;
        if (isnan(fixed[i]))
            free_sum += v[i];
        else
            fixed_sum += fixed[i];
    }
    double room = fmax(1.0 - fixed_sum, 0.0);
    for (int i = 0; i < n; i++) {
        if (!keep[i])
            v[i] = 0;
        else if (!isnan(fixed[i]))
            v[i] = fixed[i];
        else
            v[i] = free_sum > 0 ? v[i] * room / free_sum : 0.0;
    }
}

/* a [rows, G], d [rows, G*M], w [rows, n] for router input h [rows, d_in]
 * (float64); wd is W_D [d_in, G*M] (projected) or V_D [G, M] (scaled). */
void ref_router(const model *m, const rcfg *c, const double *h,
                size_t rows, const float *wg, const float *wd,
                double *a_out, double *d_out, double *w_out)
{
    const int G = m->G, M = m->M;
    const size_t din = m->d_in;
    for (size_t r = 0; r < rows; r++) {
        const double *hr = h + r * din;
        double a[MAXG];
        int keep_g[MAXG], free_g[MAXG];
        for (int g = 0; g < G; g++) {
            double s = 0;
            for (size_t k = 0; k < din; k++)
                s += hr[k] * wg[k * G + g];
            a[g] = s;
            int any = 0;
            for (int e = 0; e < m->count[g]; e++)
                any |= c->emask[g * MAXM + e];
            keep_g[g] = c->gmask[g] && any;
        }
        ref_softmax(a, keep_g, G, c->tau_g);
        for (int g = 0; g < G; g++)
            free_g[g] = keep_g[g] && isnan(c->gfix[g]);
        ref_keep_top(a, free_g, G, c->topk_g);
        for (int g = 0; g < G; g++)
            keep_g[g] = free_g[g] || (keep_g[g] && !isnan(c->gfix[g]));
        ref_apply_fixed(a, keep_g, c->gfix, G);

        double *dr = d_out + r * G * M;
        for (int g = 0; g < G; g++) {
            double d[MAXM];
            int keep_e[MAXM], free_e[MAXM];
            for (int e = 0; e < M; e++) {
                keep_e[e] = e < m->count[g] && c->emask[g * MAXM + e];
                if (c->form == ATMOE_ROUTER_PROJECTED) {
                    double s = 0;
                    for (size_t k = 0; k < din; k++)
                        s += hr[k] * wd[k * G * M + g * M + e];
                    d[e] = s;
                } else {
                    d[e] = a[g] * wd[g * M + e];
                }
            }
            ref_softmax(d, keep_e, M, c->tau_d);
            for (int e = 0; e < M; e++)
                free_e[e] = keep_e[e] && isnan(c->efix[g * MAXM + e]);
            ref_keep_top(d, free_e, M, c->topk_e);
            for (int e = 0; e < M; e++)
                keep_e[e] = free_e[e] ||
                            (keep_e[e] && !isnan(c->efix[g * MAXM + e]));
            ref_apply_fixed(d, keep_e, c->efix + g * MAXM, M);
            for (int e = 0; e < M; e++)
                dr[g * M + e] = keep_g[g] ? d[e] : 0.0;
            a_out[r * G + g] = a[g];
        }
        for (int e = 0; e < m->n; e++)
            w_out[r * m->n + e] =
                a[m->group[e]] * dr[m->group[e] * M + m->slot[e]];
    }
}

/* v rounded in place to what dtype holds (f32: unchanged), through the
 * library's own conversion on the device (tests/test_tensor.c checks it
 * over every bf16 pattern and at every tie), so that the float64
 * reference computes with the weights as stored; returns v's elements as
 * dtype stores them (malloc'd), the data of a graph constant.  For a half
 * type, at least one element of random data must change. */
void *stored(atmoe_dtype dtype, float *v, size_t n)
{
    size_t es = atmoe_dtype_size(dtype);
    void *bits = malloc(n * es);
    ck_assert_ptr_nonnull(bits);
    if (dtype == ATMOE_DTYPE_F32) {
        memcpy(bits, v, n * es);
        return bits;
    }
    float *orig = malloc(n * sizeof *orig);
    ck_assert_ptr_nonnull(orig);
    memcpy(orig, v, n * sizeof *v);
    atmoe_tensor *f, *t;
    OK(atmoe_tensor_new(CTX, ATMOE_DTYPE_F32, 1, &n, &f));
    OK(atmoe_tensor_new(CTX, dtype, 1, &n, &t));
    OK(atmoe_tensor_write(f, v, n * sizeof *v));
    OK(atmoe_tensor_copy(t, f));
    OK(atmoe_tensor_read(t, bits, n * es));
    OK(atmoe_tensor_copy(f, t));
    test_poison(v, n);
    OK(atmoe_tensor_read(f, v, n * sizeof *v));
    atmoe_tensor_free(f);
    atmoe_tensor_free(t);
    size_t changed = 0;
    /* Half an ulp of the type's 8 (bf16) or 11 (f16) significant bits, or
     * of f16's smallest subnormal. */
    double rel = dtype == ATMOE_DTYPE_BF16 ? 0x1p-8 : 0x1p-11;
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(fabs((double)v[i] - orig[i]) <=
                          fmax(rel * fabs(orig[i]), 0x1p-25),
                      "%s rounding of %.9g gave %.9g", atmoe_dtype_name(dtype),
                      orig[i], v[i]);
        changed += v[i] != orig[i];
    }
    ck_assert_msg(n < 8 || changed > 0, "%s rounding changed nothing",
                  atmoe_dtype_name(dtype));
    free(orig);
    return bits;
}
