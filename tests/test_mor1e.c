/* Tests of the rank-1 expert layer (Intuition-MoR1E / T-REX, SPEC section
 * 4; include/atmoe.h, "Rank-1 expert layers") against a float64 host
 * reference written from the published equations:
 *
 *   u  = A x,  p = softmax(W_r x),  om = sigmoid(100 w_om)
 *   s  = scores[row of the token's sample] (score_map: s = row map)
 *   g  = k_r om p + k_s (1 - om) s         (ablations drop either term)
 *   top-k: the k largest g kept, p renormalised over them, g formed again
 *   v1: z = g (.) u;  v2: z_j = sum_i g[i r2 + j] u_i
 *   y  = x W0^T + bias + sigmoid(100 w_c) B z
 *
 * and its traces (p, gates, load, importance), both variants, the
 * ablations, top-k (k = E equal to dense routing), a K x E score map,
 * per-sample, per-token and single-row scores, the CLBlast route, batches
 * below the planned one, bad input and the reference initialisation.
 *
 * Shapes are odd (T 9, d_in 21, d_out 17, r1 3, r2 5), data random and
 * never all zero, outputs read into NaN-poisoned buffers, and every
 * comparison fails on NaN. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_reference.h"
#include "testutil.h"

/* The output y, relative to the scale rounding grows with: |bias| +
 * sum_k |W0 x| + c sum_j |B_j| sum_e |g_e| sum_k |A x| (the base and
 * shrink sums of 21 terms, the mix of up to 15 and the expand of up to 5,
 * each within n eps of that scale: (21 + 15 + 5) 6e-8 = 2.5e-6), plus the
 * gate's own error (below).  The largest error seen is under 3e-7. */
#define TOL_Y 1e-5
/* p, absolute (in [0, 1]): a few eps of the logits (|W_r x| <= 21) through
 * the softmax; the largest error seen is 1.2e-7.  g relative to
 * k_r + 2 k_s (K with a map), its largest value: k_r p carries p's error;
 * the largest seen is 8e-8. */
#define TOL_P 1e-6
#define TOL_G 1e-6

#define FAILS_CLEAN(g, expr, want, sub)                                       \
    ck_assert_fails_clean(g, expr, CTX, want, sub)

/* One layer's host data and configuration. */
typedef struct spec {
    size_t T, d_in, d_out, r1, r2, E, S, K;
    atmoe_mor1e_variant variant;
    atmoe_mor1e_routing routing;
    int top_k, has_bias, has_map;
    int w0_f16; /* W0 cast to f16 in the graph (its values exact in f16) */
    int score_mode; /* 0 per token [T, K], 1 per sample [S, K] + index,
                       2 one row [1, K] */
    float k_r, k_s, w_om, w_c;
    float *x, *w0, *bias, *a, *b, *wr, *scores, *map;
    int *index;
} spec;

static void spec_make(spec *s, atmoe_mor1e_variant v, size_t r1, size_t r2,
                      atmoe_mor1e_routing routing, int score_mode, size_t K)
{
    memset(s, 0, sizeof *s);
    s->T = 9;
    s->d_in = 21;
    s->d_out = 17;
    s->r1 = r1;
    s->r2 = r2;
    s->E = v == ATMOE_MOR1E_V1 ? r1 : r1 * r2;
    s->S = score_mode == 1 ? 3 : score_mode == 2 ? 1 : s->T;
    s->K = K ? K : s->E;
    s->has_map = K != 0;
    s->variant = v;
    s->routing = routing;
    s->score_mode = score_mode;
    s->has_bias = 1;
    s->k_r = ATMOE_MOR1E_K_ROUTER;
    s->k_s = ATMOE_MOR1E_K_INTUITION;
    /* om = sigmoid(0.4), c = sigmoid(-0.3): neither at its initial 0.5. */
    s->w_om = 0.004f;
    s->w_c = -0.003f;
    s->x = alloc_uniform(s->T * s->d_in, -1, 1);
    s->w0 = alloc_uniform(s->d_out * s->d_in, -1, 1);
    s->bias = alloc_uniform(s->d_out, -1, 1);
    s->a = alloc_uniform(r1 * s->d_in, -1, 1);
    s->b = alloc_uniform(s->d_out * r2, -1, 1);
    s->wr = alloc_uniform(s->E * s->d_in, -1, 1);
    s->scores = alloc_uniform(s->S * s->K, -1, 1);
    s->map = alloc_uniform(s->K * s->E, 0, 1);
    s->index = malloc(s->T * sizeof *s->index);
    ck_assert_ptr_nonnull(s->index);
    /* Samples of the tokens; -1 and S are outside the score rows. */
    static const int seq[9] = {0, 0, 2, -1, 1, 1, 3, 2, 0};
    memcpy(s->index, seq, sizeof seq);
}

static void spec_free(spec *s)
{
    free(s->x);
    free(s->w0);
    free(s->bias);
    free(s->a);
    free(s->b);
    free(s->wr);
    free(s->scores);
    free(s->map);
    free(s->index);
}

typedef struct ref {
    double *y, *yscale, *p, *g, *load, *imp;
} ref;

static void ref_free(ref *r)
{
    free(r->y);
    free(r->yscale);
    free(r->p);
    free(r->g);
    free(r->load);
    free(r->imp);
}

static double sigmoid(double v)
{
    return 1.0 / (1.0 + exp(-v));
}

/* The float64 forward of the first T tokens. */
static void ref_layer(const spec *s, size_t T, ref *r)
{
    size_t E = s->E, Z = s->variant == ATMOE_MOR1E_V2 ? s->r2 : s->r1;
    int router = s->routing != ATMOE_MOR1E_ROUTE_INTUITION;
    int intuition = s->routing != ATMOE_MOR1E_ROUTE_ROUTER;
    r->y = alloc_d(T * s->d_out);
    r->yscale = alloc_d(T * s->d_out);
    r->p = alloc_d(T * E);
    r->g = alloc_d(T * E);
    r->load = alloc_d(E);
    r->imp = alloc_d(E);
    for (size_t e = 0; e < E; e++)
        r->load[e] = r->imp[e] = 0.0;
    double om = sigmoid(100.0 * s->w_om), c = sigmoid(100.0 * s->w_c);
    double u[64], ua[64], lg[64], sc[64], gg[64], z[64], za[64];
    int kept[64];
    for (size_t t = 0; t < T; t++) {
        const float *xt = s->x + t * s->d_in;
        for (size_t i = 0; i < s->r1; i++) {
            u[i] = ua[i] = 0.0;
            for (size_t k = 0; k < s->d_in; k++) {
                u[i] += (double)s->a[i * s->d_in + k] * xt[k];
                ua[i] += fabs((double)s->a[i * s->d_in + k] * xt[k]);
            }
        }
        double m = -INFINITY, sum = 0.0;
        for (size_t e = 0; e < E; e++) {
            lg[e] = 0.0;
            for (size_t k = 0; k < s->d_in; k++)
                lg[e] += (double)s->wr[e * s->d_in + k] * xt[k];
            m = fmax(m, lg[e]);
        }
        for (size_t e = 0; e < E; e++)
            sum += (lg[e] = exp(lg[e] - m));
        double *pt = r->p + t * E;
        for (size_t e = 0; e < E; e++)
            pt[e] = router ? lg[e] / sum : 0.0;
        /* The token's score row. */
        long row = s->score_mode == 2 ? 0 : (long)t;
        if (s->score_mode == 1)
            row = s->index[t] >= 0 && (size_t)s->index[t] < s->S
                      ? s->index[t]
                      : -1;
        for (size_t e = 0; e < E; e++) {
            sc[e] = 0.0;
            if (!intuition || row < 0)
                continue;
            const float *sr = s->scores + (size_t)row * s->K;
            if (!s->has_map)
                sc[e] = sr[e];
            else
                for (size_t k = 0; k < s->K; k++)
                    sc[e] += (double)sr[k] * s->map[k * E + e];
        }
        for (size_t e = 0; e < E; e++) {
            gg[e] = s->k_r * om * pt[e] + s->k_s * (1.0 - om) * sc[e];
            kept[e] = 1;
        }
        if (s->top_k > 0 && (size_t)s->top_k < E) {
            for (size_t e = 0; e < E; e++) {
                size_t before = 0;
                for (size_t j = 0; j < E; j++)
                    before += gg[j] > gg[e] || (gg[j] == gg[e] && j < e);
                kept[e] = before < (size_t)s->top_k;
            }
            double ps = 0.0;
            for (size_t e = 0; e < E; e++)
                ps += kept[e] ? pt[e] : 0.0;
            for (size_t e = 0; e < E; e++)
                gg[e] = kept[e] ? s->k_r * om * (router ? pt[e] / ps : 0.0) +
                                      s->k_s * (1.0 - om) * sc[e]
                                : 0.0;
        }
        size_t best = 0;
        for (size_t e = 0; e < E; e++) {
            r->g[t * E + e] = gg[e];
            if (gg[e] > gg[best])
                best = e;
            r->imp[e] += pt[e] / (double)T;
        }
        r->load[best] += 1.0 / (double)T;
        for (size_t j = 0; j < Z; j++)
            z[j] = za[j] = 0.0;
        for (size_t e = 0; e < E; e++) {
            size_t i = s->variant == ATMOE_MOR1E_V2 ? e / s->r2 : e;
            size_t j = s->variant == ATMOE_MOR1E_V2 ? e % s->r2 : e;
            z[j] += gg[e] * u[i];
            za[j] += fabs(gg[e]) * ua[i];
        }
        for (size_t o = 0; o < s->d_out; o++) {
            double y = s->has_bias ? s->bias[o] : 0.0;
            double sc_ = s->has_bias ? fabs(s->bias[o]) : 0.0;
            for (size_t k = 0; k < s->d_in; k++) {
                y += (double)s->w0[o * s->d_in + k] * xt[k];
                sc_ += fabs((double)s->w0[o * s->d_in + k] * xt[k]);
            }
            for (size_t j = 0; j < Z; j++) {
                y += c * s->b[o * s->r2 + j] * z[j];
                sc_ += c * fabs(s->b[o * s->r2 + j]) * za[j];
            }
            r->y[t * s->d_out + o] = y;
            r->yscale[t * s->d_out + o] = sc_;
        }
    }
}

/* The batched inputs spec_layer made last (ATMOE_NODE_NONE: none). */
static atmoe_node BATCHED_SCORES, BATCHED_INDEX;

/* The layer's nodes in g over x; trace receives its traces. */
static atmoe_node spec_layer(const spec *s, atmoe_graph *g, atmoe_node x,
                             atmoe_mor1e_trace *trace)
{
    int router = s->routing != ATMOE_MOR1E_ROUTE_INTUITION;
    int intuition = s->routing != ATMOE_MOR1E_ROUTE_ROUTER;
    float one[2] = {s->w_om, s->w_c};
    atmoe_mor1e_layer L = {
        .w0 = const2(g, ATMOE_DTYPE_F32, s->d_out, s->d_in, s->w0),
        .bias = s->has_bias ? const2(g, ATMOE_DTYPE_F32, s->d_out, 0, s->bias)
                            : ATMOE_NODE_NONE,
        .a = const2(g, ATMOE_DTYPE_F32, s->r1, s->d_in, s->a),
        .b = const2(g, ATMOE_DTYPE_F32, s->d_out, s->r2, s->b),
        .w_r = router ? const2(g, ATMOE_DTYPE_F32, s->E, s->d_in, s->wr)
                      : ATMOE_NODE_NONE,
        .w_om = const2(g, ATMOE_DTYPE_F32, 1, 0, &one[0]),
        .w_c = const2(g, ATMOE_DTYPE_F32, 1, 0, &one[1]),
        .scores = ATMOE_NODE_NONE,
        .score_map = ATMOE_NODE_NONE,
        .gate_index = ATMOE_NODE_NONE,
        .variant = s->variant,
        .routing = s->routing,
        .k_router = s->k_r,
        .k_intuition = s->k_s,
        .top_k = s->top_k,
    };
    BATCHED_SCORES = BATCHED_INDEX = ATMOE_NODE_NONE;
    if (intuition) {
        if (s->score_mode == 0) {
            L.scores = input2(g, NULL, ATMOE_DTYPE_F32, s->T, s->K, 1);
            BATCHED_SCORES = L.scores;
        } else {
            L.scores = const2(g, ATMOE_DTYPE_F32, s->S, s->K, s->scores);
        }
        if (s->has_map)
            L.score_map = const2(g, ATMOE_DTYPE_F32, s->K, s->E, s->map);
        if (s->score_mode == 1) {
            L.gate_index = input2(g, NULL, ATMOE_DTYPE_I32, s->T, 0, 1);
            BATCHED_INDEX = L.gate_index;
        }
    }
    if (s->w0_f16)
        OK(atmoe_graph_cast(g, L.w0, ATMOE_DTYPE_F16, &L.w0));
    atmoe_node y;
    OK(atmoe_graph_mor1e_layer(g, x, &L, &y, trace));
    return y;
}

/* After planning: x and the batched inputs of spec_layer, T rows. */
static void set_inputs(atmoe_graph *g, const spec *s, atmoe_node x, size_t T)
{
    OK(atmoe_graph_set_input(g, x, s->x, T * s->d_in * sizeof(float), T));
    if (BATCHED_SCORES != ATMOE_NODE_NONE)
        OK(atmoe_graph_set_input(g, BATCHED_SCORES, s->scores,
                                 T * s->K * sizeof(float), T));
    if (BATCHED_INDEX != ATMOE_NODE_NONE)
        OK(atmoe_graph_set_input(g, BATCHED_INDEX, s->index, T * sizeof(int),
                                 T));
}

/* Builds the layer over an input x [T, d_in], computes it at the batch of
 * T tokens (planned at s->T) and checks y and the traces. */
static void check_layer(const char *what, const spec *s, size_t T)
{
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node x = input2(g, "x", ATMOE_DTYPE_F32, s->T, s->d_in, 1);
    atmoe_mor1e_trace tr;
    atmoe_node y = spec_layer(s, g, x, &tr);
    int router = s->routing != ATMOE_MOR1E_ROUTE_INTUITION;
    ck_assert_int_eq(router, tr.p != ATMOE_NODE_NONE);
    ck_assert_int_eq(router, tr.importance != ATMOE_NODE_NONE);
    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_mark_output(g, tr.gates));
    OK(atmoe_graph_mark_output(g, tr.load));
    if (router) {
        OK(atmoe_graph_mark_output(g, tr.p));
        OK(atmoe_graph_mark_output(g, tr.importance));
    }
    OK(atmoe_graph_plan(g, 0));
    OK(atmoe_graph_set_profiling(g, 1));
    set_inputs(g, s, x, T);
    OK(atmoe_graph_compute(g, T));
    /* A compute allocates nothing on the host. */
    atmoe_compute_stats cs;
    OK(atmoe_graph_get_compute_stats(g, &cs));
    ck_assert_uint_eq(cs.host_allocations, 0);
    /* The shrink and the expand open with a marker, so that a node that
     * runs several commands is timed from its first to its last, on either
     * route.  One whose last command got no event was timed as the marker
     * alone, 0.05 to 0.15 us on PoCL; their kernels take 3 us or more. */
    atmoe_graph_memory mem;
    OK(atmoe_graph_get_memory(g, &mem));
    for (size_t i = 0; i < mem.nodes_computed; i++) {
        atmoe_node_profile prof;
        OK(atmoe_graph_get_profile(g, i, &prof));
        if (strcmp(prof.op, "mor1e_shrink") == 0 ||
            strcmp(prof.op, "mor1e_expand") == 0)
            ck_assert_msg(isfinite(prof.ms) && prof.ms >= 5e-4,
                          "%s: node '%s' (%s) profiled at %g ms", what,
                          prof.name, prof.op, prof.ms);
    }
    ref r;
    ref_layer(s, T, &r);
    char name[96];
    float *got = read_out(g, y, T * s->d_out);
    snprintf(name, sizeof name, "%s: y", what);
    expect_scaled(name, got, r.y, r.yscale, T, s->d_out, TOL_Y);
    free(got);

    double gs = s->k_r + s->k_s * 2.0 * (s->has_map ? (double)s->K : 1.0);
    double *scale = alloc_d(T * s->E);
    for (size_t i = 0; i < T * s->E; i++)
        scale[i] = gs;
    got = read_out(g, tr.gates, T * s->E);
    snprintf(name, sizeof name, "%s: gates", what);
    expect_scaled(name, got, r.g, scale, T, s->E, TOL_G);
    /* A dropped expert's gate is exactly 0. */
    for (size_t i = 0; i < T * s->E; i++)
        ck_assert_msg(r.g[i] != 0.0 || got[i] == 0.0f,
                      "%s: dropped gate %zu is %g", what, i, got[i]);
    free(got);
    for (size_t i = 0; i < T * s->E; i++)
        scale[i] = 1.0;
    got = read_out(g, tr.load, s->E);
    snprintf(name, sizeof name, "%s: load", what);
    expect_scaled(name, got, r.load, scale, 1, s->E, 1e-6);
    free(got);
    if (router) {
        got = read_out(g, tr.p, T * s->E);
        snprintf(name, sizeof name, "%s: p", what);
        expect_scaled(name, got, r.p, scale, T, s->E, TOL_P);
        free(got);
        got = read_out(g, tr.importance, s->E);
        snprintf(name, sizeof name, "%s: importance", what);
        expect_scaled(name, got, r.imp, scale, 1, s->E, TOL_P);
        free(got);
    }
    free(scale);
    ref_free(&r);
    atmoe_graph_free(g);
}

/* y of the layer at s->T, read back. */
static float *layer_output(const spec *s)
{
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node x = input2(g, "x", ATMOE_DTYPE_F32, s->T, s->d_in, 1);
    atmoe_node y = spec_layer(s, g, x, NULL);
    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_plan(g, 0));
    set_inputs(g, s, x, s->T);
    OK(atmoe_graph_compute(g, s->T));
    float *got = read_out(g, y, s->T * s->d_out);
    atmoe_graph_free(g);
    return got;
}

START_TEST(test_v2)
{
    CTX = test_context();
    test_rng_seed(&RNG, 1201);
    spec s;
    /* T-REX: router and per-sample intuition, dense routing. */
    spec_make(&s, ATMOE_MOR1E_V2, 3, 5, ATMOE_MOR1E_ROUTE_BOTH, 1, 0);
    check_layer("v2 per sample", &s, s.T);
    /* Top-k, renormalised. */
    s.top_k = 4;
    check_layer("v2 top-4", &s, s.T);
    s.top_k = 1;
    check_layer("v2 top-1", &s, s.T);
    /* k = E is dense routing, to the bit. */
    s.top_k = 0;
    float *dense = layer_output(&s);
    s.top_k = (int)s.E;
    float *all = layer_output(&s);
    ck_assert_int_eq(memcmp(dense, all, s.T * s.d_out * sizeof(float)), 0);
    free(dense);
    free(all);
    /* No bias; other constants; batches below the planned one. */
    s.top_k = 3;
    s.has_bias = 0;
    s.k_r = 8.0f;
    s.k_s = 1.5f;
    check_layer("v2 no bias, top-3, T = 4", &s, 4);
    check_layer("v2 T = 1", &s, 1);
    check_layer("v2 T = 2", &s, 2);
    spec_free(&s);
    atmoe_context_free(CTX);
}
END_TEST

/* A NaN score reaches the outputs of its sample's tokens (top-k does not
 * drop it quietly), and only those. */
START_TEST(test_nan_scores)
{
    CTX = test_context();
    test_rng_seed(&RNG, 1207);
    spec s;
    spec_make(&s, ATMOE_MOR1E_V2, 3, 5, ATMOE_MOR1E_ROUTE_BOTH, 1, 0);
    s.scores[1 * s.K + 4] = NAN; /* sample 1: tokens 4 and 5 */
    for (int k = 0; k <= 3; k += 3) {
        s.top_k = k;
        float *y = layer_output(&s);
        for (size_t t = 0; t < s.T; t++)
            for (size_t o = 0; o < s.d_out; o++)
                ck_assert_msg(isnan(y[t * s.d_out + o]) == (s.index[t] == 1),
                              "top-%d: y[%zu, %zu] = %g", k, t, o,
                              y[t * s.d_out + o]);
        free(y);
    }
    spec_free(&s);
    atmoe_context_free(CTX);
}
END_TEST

START_TEST(test_v1)
{
    CTX = test_context();
    test_rng_seed(&RNG, 1202);
    spec s;
    /* Scores per token, no gate_index. */
    spec_make(&s, ATMOE_MOR1E_V1, 5, 5, ATMOE_MOR1E_ROUTE_BOTH, 0, 0);
    check_layer("v1 per token", &s, s.T);
    s.top_k = 2;
    check_layer("v1 top-2", &s, s.T);
    spec_free(&s);
    /* One score row for every token. */
    spec_make(&s, ATMOE_MOR1E_V1, 7, 7, ATMOE_MOR1E_ROUTE_BOTH, 2, 0);
    check_layer("v1 one score row", &s, s.T);
    spec_free(&s);
    atmoe_context_free(CTX);
}
END_TEST

START_TEST(test_ablations_and_map)
{
    CTX = test_context();
    test_rng_seed(&RNG, 1203);
    spec s;
    spec_make(&s, ATMOE_MOR1E_V2, 3, 5, ATMOE_MOR1E_ROUTE_ROUTER, 1, 0);
    check_layer("v2 router only", &s, s.T);
    s.top_k = 6;
    check_layer("v2 router only, top-6", &s, s.T);
    spec_free(&s);
    spec_make(&s, ATMOE_MOR1E_V2, 3, 5, ATMOE_MOR1E_ROUTE_INTUITION, 1, 0);
    check_layer("v2 intuition only", &s, s.T);
    s.top_k = 5;
    check_layer("v2 intuition only, top-5", &s, s.T);
    spec_free(&s);
    spec_make(&s, ATMOE_MOR1E_V1, 5, 5, ATMOE_MOR1E_ROUTE_INTUITION, 2, 0);
    check_layer("v1 intuition only, one row", &s, s.T);
    spec_free(&s);
    /* K = 7 clusters mapped onto E = 15 experts. */
    spec_make(&s, ATMOE_MOR1E_V2, 3, 5, ATMOE_MOR1E_ROUTE_BOTH, 1, 7);
    check_layer("v2 K x E map", &s, s.T);
    s.top_k = 4;
    check_layer("v2 K x E map, top-4", &s, s.T);
    spec_free(&s);
    atmoe_context_free(CTX);
}
END_TEST

/* Past 2 tokens shrink and expand run through CLBlast; W0 in f16 then goes
 * through its f32 copy. */
START_TEST(test_clblast_route)
{
    ck_assert_int_eq(setenv("ATMOE_LINEAR_MAX_TOKENS", "2", 1), 0);
    CTX = test_context();
    unsetenv("ATMOE_LINEAR_MAX_TOKENS");
    test_rng_seed(&RNG, 1204);
    spec s;
    spec_make(&s, ATMOE_MOR1E_V2, 3, 5, ATMOE_MOR1E_ROUTE_BOTH, 1, 0);
    s.top_k = 4;
    check_layer("CLBlast v2 top-4", &s, s.T);
    check_layer("CLBlast v2, T = 2 (cl/linear.cl)", &s, 2);
    s.has_bias = 0;
    check_layer("CLBlast v2 no bias", &s, s.T);
    /* W0 in f16: CLBlast reads its f32 copy, cl/linear.cl W0 as stored.
     * Multiples of 1/1024 in [-1, 1] are exact in f16, so the reference
     * stands. */
    for (size_t i = 0; i < s.d_out * s.d_in; i++)
        s.w0[i] = roundf(s.w0[i] * 1024.0f) / 1024.0f;
    s.w0_f16 = 1;
    s.has_bias = 1;
    check_layer("CLBlast v2, W0 f16", &s, s.T);
    check_layer("cl/linear.cl v2, W0 f16", &s, 2);
    spec_free(&s);
    atmoe_context_free(CTX);
}
END_TEST

START_TEST(test_errors)
{
    CTX = test_context();
    test_rng_seed(&RNG, 1205);
    spec s;
    spec_make(&s, ATMOE_MOR1E_V2, 3, 5, ATMOE_MOR1E_ROUTE_BOTH, 1, 0);
    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node x = input2(g, "x", ATMOE_DTYPE_F32, s.T, s.d_in, 1);
    float w = 0.0f;
    atmoe_mor1e_layer ok = {
        .w0 = const2(g, ATMOE_DTYPE_F32, s.d_out, s.d_in, s.w0),
        .bias = const2(g, ATMOE_DTYPE_F32, s.d_out, 0, s.bias),
        .a = const2(g, ATMOE_DTYPE_F32, s.r1, s.d_in, s.a),
        .b = const2(g, ATMOE_DTYPE_F32, s.d_out, s.r2, s.b),
        .w_r = const2(g, ATMOE_DTYPE_F32, s.E, s.d_in, s.wr),
        .w_om = const2(g, ATMOE_DTYPE_F32, 1, 0, &w),
        .w_c = const2(g, ATMOE_DTYPE_F32, 1, 0, &w),
        .scores = const2(g, ATMOE_DTYPE_F32, s.S, s.E, s.scores),
        .score_map = ATMOE_NODE_NONE,
        .gate_index = input2(g, "seq", ATMOE_DTYPE_I32, s.T, 0, 1),
        .variant = ATMOE_MOR1E_V2,
        .routing = ATMOE_MOR1E_ROUTE_BOTH,
        .k_router = ATMOE_MOR1E_K_ROUTER,
        .k_intuition = ATMOE_MOR1E_K_INTUITION,
        .top_k = 0,
    };
    atmoe_node y;
    atmoe_mor1e_layer L;
    const atmoe_status SHAPE = ATMOE_STATUS_SHAPE_MISMATCH,
                       ARG = ATMOE_STATUS_INVALID_ARGUMENT;

    ck_assert_fails_with(atmoe_graph_mor1e_layer(NULL, x, &ok, &y, NULL),
                         NULL, ATMOE_STATUS_NULL_POINTER, "graph");
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, NULL, &y, NULL),
                ATMOE_STATUS_NULL_POINTER, "layer");
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &ok, NULL, NULL),
                ATMOE_STATUS_NULL_POINTER, "y");
    /* k > E */
    L = ok;
    L.top_k = (int)s.E + 1;
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL),
                ATMOE_STATUS_OUT_OF_RANGE, "top_k is 16");
    L.top_k = -1;
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL),
                ATMOE_STATUS_OUT_OF_RANGE, "top_k");
    /* v1 with r1 != r2 */
    L = ok;
    L.variant = ATMOE_MOR1E_V1;
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), SHAPE,
                "v1 needs r1 = r2");
    L.variant = (atmoe_mor1e_variant)7;
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), ARG,
                "variant 7");
    L = ok;
    L.routing = (atmoe_mor1e_routing)-1;
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), ARG,
                "routing -1");
    /* K x E: scores of K = 7 columns with no map, a map of the wrong
     * shape. */
    float *s7 = alloc_uniform(3 * 7, -1, 1), *m7 = alloc_uniform(7 * 15, 0, 1);
    L = ok;
    L.scores = const2(g, ATMOE_DTYPE_F32, 3, 7, s7);
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), SHAPE,
                "K = 7 columns but there are E = 15 experts");
    L.score_map = const2(g, ATMOE_DTYPE_F32, 15, 7, m7);
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), SHAPE,
                "score_map must be an unbatched f32 [7, 15]");
    L.score_map = const2(g, ATMOE_DTYPE_F32, 7, 15, m7);
    OK(atmoe_graph_mor1e_layer(g, x, &L, &y, NULL));
    /* Wrong shapes. */
    L = ok;
    L.a = const2(g, ATMOE_DTYPE_F32, s.r1, s.d_in - 1, s.a);
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), SHAPE,
                "a must be");
    L = ok;
    L.w_r = const2(g, ATMOE_DTYPE_F32, s.E - 1, s.d_in, s.wr);
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), SHAPE,
                "w_r must be");
    L = ok;
    L.w0 = const2(g, ATMOE_DTYPE_F32, s.d_out - 1, s.d_in, s.w0);
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), SHAPE,
                "w0 must be");
    L = ok;
    L.bias = const2(g, ATMOE_DTYPE_F32, s.d_in, 0, s.x);
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), SHAPE,
                "bias must be");
    L = ok;
    L.w_om = const2(g, ATMOE_DTYPE_F32, 2, 0, s.x);
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), SHAPE,
                "w_om must be an unbatched f32 [1]");
    L = ok;
    L.gate_index = input2(g, "seq2", ATMOE_DTYPE_F32, s.T, 0, 1);
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), SHAPE,
                "gate_index must be i32");
    L = ok;
    L.gate_index = ATMOE_NODE_NONE; /* 3 score rows for 9 tokens */
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), SHAPE,
                "one row per token");
    /* The ablations take exactly the nodes they use. */
    L = ok;
    L.routing = ATMOE_MOR1E_ROUTE_INTUITION;
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), ARG,
                "w_r is given");
    L.w_r = ATMOE_NODE_NONE;
    OK(atmoe_graph_mor1e_layer(g, x, &L, &y, NULL));
    L = ok;
    L.routing = ATMOE_MOR1E_ROUTE_ROUTER;
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), ARG,
                "scores, score_map and gate_index are given");
    L.scores = L.gate_index = ATMOE_NODE_NONE;
    OK(atmoe_graph_mor1e_layer(g, x, &L, &y, NULL));
    L = ok;
    L.scores = ATMOE_NODE_NONE;
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), ARG,
                "scores is ATMOE_NODE_NONE");
    L = ok;
    L.w_r = ATMOE_NODE_NONE;
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), ARG,
                "w_r is ATMOE_NODE_NONE");
    L = ok;
    L.k_router = NAN;
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL), ARG,
                "must be finite");
    L = ok;
    L.w_c = 12345;
    FAILS_CLEAN(g, atmoe_graph_mor1e_layer(g, x, &L, &y, NULL),
                ATMOE_STATUS_INVALID_ARGUMENT, "w_c");
    spec_free(&s);
    free(s7);
    free(m7);
    atmoe_graph_free(g);
    atmoe_context_free(CTX);
}
END_TEST

/* A Kaiming-uniform A from the seed (the same for the same seed, within
 * +-1/sqrt(d_in), spread over it), the rest zero. */
START_TEST(test_init)
{
    CTX = test_context();
    const size_t r1 = 3, d_in = 21, d_out = 17, r2 = 5, E = 15;
    atmoe_tensor *t[5];
    size_t shapes[5][2] = {{r1, d_in}, {d_out, r2}, {E, d_in}, {1, 0},
                           {1, 0}};
    for (int i = 0; i < 5; i++) {
        OK(atmoe_tensor_new(CTX, ATMOE_DTYPE_F32, shapes[i][1] ? 2 : 1,
                            shapes[i], &t[i]));
        OK(atmoe_tensor_fill(t[i], 7.0));
    }
    float a1[63], a2[63], a3[63], rest[E * d_in];
    OK(atmoe_mor1e_init(t[0], t[1], t[2], t[3], t[4], 42));
    OK(atmoe_tensor_read(t[0], a1, sizeof a1));
    OK(atmoe_mor1e_init(t[0], NULL, NULL, NULL, NULL, 42));
    OK(atmoe_tensor_read(t[0], a2, sizeof a2));
    OK(atmoe_mor1e_init(t[0], NULL, NULL, NULL, NULL, 43));
    OK(atmoe_tensor_read(t[0], a3, sizeof a3));
    ck_assert_int_eq(memcmp(a1, a2, sizeof a1), 0);
    ck_assert_int_ne(memcmp(a1, a3, sizeof a1), 0);
    double bound = 1.0 / sqrt((double)d_in), lo = 0.0, hi = 0.0;
    for (size_t i = 0; i < r1 * d_in; i++) {
        ck_assert_msg(fabs(a1[i]) <= bound, "a[%zu] = %g", i, a1[i]);
        lo = fmin(lo, a1[i]);
        hi = fmax(hi, a1[i]);
    }
    ck_assert(lo < -0.7 * bound && hi > 0.7 * bound);
    size_t counts[5] = {0, d_out * r2, E * d_in, 1, 1};
    for (int i = 1; i < 5; i++) {
        test_poison(rest, counts[i]);
        OK(atmoe_tensor_read(t[i], rest, counts[i] * sizeof(float)));
        for (size_t j = 0; j < counts[i]; j++)
            ck_assert_msg(rest[j] == 0.0f, "tensor %d [%zu] = %g", i, j,
                          rest[j]);
    }
    ck_assert_fails_with(atmoe_mor1e_init(NULL, NULL, NULL, NULL, NULL, 1),
                         NULL, ATMOE_STATUS_NULL_POINTER, "a");
    atmoe_tensor *h;
    OK(atmoe_tensor_new(CTX, ATMOE_DTYPE_F16, 2, shapes[0], &h));
    ck_assert_fails_with(atmoe_mor1e_init(h, NULL, NULL, NULL, NULL, 1), CTX,
                         ATMOE_STATUS_DTYPE_MISMATCH, "a must be f32");
    ck_assert_fails_with(atmoe_mor1e_init(t[0], h, NULL, NULL, NULL, 1), CTX,
                         ATMOE_STATUS_DTYPE_MISMATCH, "b must be f32");
    atmoe_tensor_free(h);
    for (int i = 0; i < 5; i++)
        atmoe_tensor_free(t[i]);
    atmoe_context_free(CTX);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Manifests                                                                 */
/* ------------------------------------------------------------------------ */

#define EMB 6 /* the instruction embeddings' width */

/* Writes the spec's weights, and centroids [K, EMB], to dir/w.safetensors. */
static void write_weights(const spec *s, const float *centroids,
                          const char *dir)
{
    atmoe_safetensors_writer *w;
    char path[600];
    float om[1] = {s->w_om}, c[1] = {s->w_c};
    uint64_t sw0[2] = {s->d_out, s->d_in}, sb[1] = {s->d_out},
             sa[2] = {s->r1, s->d_in}, sbb[2] = {s->d_out, s->r2},
             sr[2] = {s->E, s->d_in}, s1[1] = {1}, sc[2] = {s->K, EMB};
    OK(atmoe_safetensors_writer_new(CTX, &w));
    OK(atmoe_safetensors_writer_add_f32(w, "w0", ATMOE_SAFETENSORS_F32, 2,
                                        sw0, s->w0));
    OK(atmoe_safetensors_writer_add_f32(w, "bias", ATMOE_SAFETENSORS_F32, 1,
                                        sb, s->bias));
    OK(atmoe_safetensors_writer_add_f32(w, "a", ATMOE_SAFETENSORS_F32, 2, sa,
                                        s->a));
    OK(atmoe_safetensors_writer_add_f32(w, "b", ATMOE_SAFETENSORS_F32, 2, sbb,
                                        s->b));
    OK(atmoe_safetensors_writer_add_f32(w, "w_r", ATMOE_SAFETENSORS_F32, 2,
                                        sr, s->wr));
    OK(atmoe_safetensors_writer_add_f32(w, "w_om", ATMOE_SAFETENSORS_F32, 1,
                                        s1, om));
    OK(atmoe_safetensors_writer_add_f32(w, "w_c", ATMOE_SAFETENSORS_F32, 1,
                                        s1, c));
    OK(atmoe_safetensors_writer_add_f32(w, "centroids", ATMOE_SAFETENSORS_F32,
                                        2, sc, centroids));
    snprintf(path, sizeof path, "%s/w.safetensors", dir);
    OK(atmoe_safetensors_writer_save(w, path));
    atmoe_safetensors_writer_free(w);
}

static const char *RANK1_MANIFEST =
    "{\"version\": 1, \"weights\": \"w.safetensors\", "
    "\"centroids\": \"centroids\", \"layers\": [{\"modules\": {\"q_proj\": "
    "{\"weight\": \"w0\", \"bias\": \"bias\", \"rank1\": {\"variant\": "
    "\"v2\", \"a\": \"a\", \"b\": \"b\", \"w_r\": \"w_r\", \"w_om\": "
    "\"w_om\", \"w_c\": \"w_c\", \"top_k\": 4}}}}]}";

static atmoe_status parse_text(const char *text, const char *dir,
                               atmoe_manifest **m)
{
    return atmoe_manifest_parse(CTX, text, strlen(text), dir, m);
}

/* A manifest's rank-1 module built with embeddings against the float64
 * reference fed by the host's scores C e / |e|. */
START_TEST(test_manifest)
{
    CTX = test_context();
    test_rng_seed(&RNG, 1206);
    char dir[512];
    test_mkdtemp(dir, sizeof dir, "mor1e");
    spec s;
    spec_make(&s, ATMOE_MOR1E_V2, 3, 5, ATMOE_MOR1E_ROUTE_BOTH, 1, 0);
    s.top_k = 4;
    float *emb = alloc_uniform(s.S * EMB, -1, 1);
    float *cent = alloc_uniform(s.K * EMB, -1, 1);
    for (size_t b = 0; b < s.S; b++) {
        double n = 0.0;
        for (size_t d = 0; d < EMB; d++)
            n += (double)emb[b * EMB + d] * emb[b * EMB + d];
        for (size_t k = 0; k < s.K; k++) {
            double v = 0.0;
            for (size_t d = 0; d < EMB; d++)
                v += (double)cent[k * EMB + d] * emb[b * EMB + d];
            s.scores[b * s.K + k] = (float)(v / sqrt(n));
        }
    }
    write_weights(&s, cent, dir);

    atmoe_manifest *m;
    OK(parse_text(RANK1_MANIFEST, dir, &m));
    atmoe_manifest_module mod;
    OK(atmoe_manifest_get_module(m, 0, &mod));
    ck_assert_int_eq(mod.rank1, 1);
    ck_assert_int_eq(mod.variant, ATMOE_MOR1E_V2);
    ck_assert_int_eq(mod.routing, ATMOE_MOR1E_ROUTE_BOTH);
    ck_assert_int_eq(mod.top_k, 4);
    ck_assert(mod.k_router == ATMOE_MOR1E_K_ROUTER &&
              mod.k_intuition == ATMOE_MOR1E_K_INTUITION);
    ck_assert_uint_eq(mod.groups, 0);
    ck_assert_str_eq(mod.a.tensor, "a");
    ck_assert_ptr_null(mod.score_map.file);
    OK(atmoe_manifest_check(m));
    OK(atmoe_manifest_get_module(m, 0, &mod));
    ck_assert_uint_eq(mod.r1, 3);
    ck_assert_uint_eq(mod.r2, 5);
    ck_assert_uint_eq(mod.rank1_experts, 15);
    atmoe_manifest_info info;
    OK(atmoe_manifest_get_info(m, &info));
    ck_assert_uint_eq(info.clusters, 15);
    ck_assert_uint_eq(info.embedding_dim, EMB);
    ck_assert_str_eq(info.centroids_tensor, "centroids");

    atmoe_graph *g;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node x = input2(g, "x", ATMOE_DTYPE_F32, s.T, s.d_in, 1);
    atmoe_manifest_inputs in = {
        ATMOE_NODE_NONE, input2(g, "seq", ATMOE_DTYPE_I32, s.T, 0, 1),
        const2(g, ATMOE_DTYPE_F32, s.S, EMB, emb), ATMOE_NODE_NONE};
    atmoe_node y, out;
    atmoe_layer_trace lt;
    atmoe_mor1e_trace rt;
    /* Plain atmoe_manifest_build has no scores for the module. */
    FAILS_CLEAN(g, atmoe_manifest_build(m, g, x, ATMOE_NODE_NONE,
                                        ATMOE_NODE_NONE, NULL, NULL, &y),
                ATMOE_STATUS_INVALID_ARGUMENT, "uses the intuition");
    OK(atmoe_manifest_build_with(m, g, x, &in, &out, &lt, &rt, &y));
    ck_assert_int_eq(out, y);
    ck_assert_int_eq(lt.w, ATMOE_NODE_NONE);
    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_mark_output(g, rt.gates));
    OK(atmoe_graph_plan(g, 0));
    OK(atmoe_graph_set_input(g, x, s.x, s.T * s.d_in * sizeof(float), s.T));
    OK(atmoe_graph_set_input(g, in.gate_index, s.index, s.T * sizeof(int),
                             s.T));
    OK(atmoe_graph_compute(g, s.T));
    ref r;
    ref_layer(&s, s.T, &r);
    float *got = read_out(g, y, s.T * s.d_out);
    expect_scaled("manifest: y", got, r.y, r.yscale, s.T, s.d_out, TOL_Y);
    free(got);
    atmoe_graph_free(g);

    /* The scores themselves instead of embeddings (scores win when both
     * are given). */
    OK(atmoe_graph_new(CTX, &g));
    x = input2(g, "x", ATMOE_DTYPE_F32, s.T, s.d_in, 1);
    in.gate_index = input2(g, "seq", ATMOE_DTYPE_I32, s.T, 0, 1);
    in.embeddings = const2(g, ATMOE_DTYPE_F32, s.S, EMB, emb);
    in.scores = const2(g, ATMOE_DTYPE_F32, s.S, s.K, s.scores);
    OK(atmoe_manifest_build_with(m, g, x, &in, NULL, NULL, NULL, &y));
    OK(atmoe_graph_mark_output(g, y));
    OK(atmoe_graph_plan(g, 0));
    OK(atmoe_graph_set_input(g, x, s.x, s.T * s.d_in * sizeof(float), s.T));
    OK(atmoe_graph_set_input(g, in.gate_index, s.index, s.T * sizeof(int),
                             s.T));
    OK(atmoe_graph_compute(g, s.T));
    got = read_out(g, y, s.T * s.d_out);
    expect_scaled("manifest, scores: y", got, r.y, r.yscale, s.T, s.d_out,
                  TOL_Y);
    free(got);
    ref_free(&r);
    atmoe_graph_free(g);
    atmoe_manifest_free(m);

    /* Refusals: at parsing, with the JSON path; at the check. */
    static const struct {
        const char *text, *sub;
        atmoe_status st;
    } bad[] = {
        {"{\"version\": 1, \"weights\": \"w.safetensors\", \"layers\": "
         "[{\"modules\": {\"q\": {\"weight\": \"w0\", \"c\": 1, "
         "\"rank1\": {\"a\": \"a\", \"b\": \"b\"}}}}]}",
         "layers[0].modules.q.c: belongs to a module of LoRA experts",
         ATMOE_STATUS_FORMAT_ERROR},
        {"{\"version\": 1, \"weights\": \"w.safetensors\", \"layers\": "
         "[{\"modules\": {\"q\": {\"weight\": \"w0\", \"rank1\": {\"a\": "
         "\"a\", \"b\": \"b\", \"variant\": \"v3\"}}}}]}",
         "layers[0].modules.q.rank1.variant: is \"v3\"",
         ATMOE_STATUS_FORMAT_ERROR},
        {"{\"version\": 1, \"weights\": \"w.safetensors\", \"layers\": "
         "[{\"modules\": {\"q\": {\"weight\": \"w0\", \"rank1\": {\"a\": "
         "\"a\", \"b\": \"b\", \"tau\": 1}}}}]}",
         "rank1: unknown key \"tau\"", ATMOE_STATUS_FORMAT_ERROR},
        {"{\"version\": 1, \"weights\": \"w.safetensors\", \"layers\": "
         "[{\"modules\": {\"q\": {\"weight\": \"w0\", \"rank1\": {\"b\": "
         "\"b\"}}}}]}",
         "rank1.a: is missing", ATMOE_STATUS_FORMAT_ERROR},
        {"{\"version\": 1, \"weights\": \"w.safetensors\", \"layers\": "
         "[{\"modules\": {\"q\": {\"weight\": \"w0\", \"rank1\": {\"a\": "
         "\"a\", \"b\": \"b\", \"w_r\": \"w_r\", \"routing\": "
         "\"intuition\"}}}}]}",
         "rank1.w_r: is given but the routing is \"intuition\"",
         ATMOE_STATUS_FORMAT_ERROR},
        /* v1 with r1 = 3, r2 = 5 */
        {"{\"version\": 1, \"weights\": \"w.safetensors\", \"layers\": "
         "[{\"modules\": {\"q\": {\"weight\": \"w0\", \"rank1\": {\"a\": "
         "\"a\", \"b\": \"b\", \"variant\": \"v1\"}}}}]}",
         "rank1: v1 needs r1 = r2", ATMOE_STATUS_SHAPE_MISMATCH},
        /* k > E */
        {"{\"version\": 1, \"weights\": \"w.safetensors\", \"layers\": "
         "[{\"modules\": {\"q\": {\"weight\": \"w0\", \"rank1\": {\"a\": "
         "\"a\", \"b\": \"b\", \"top_k\": 16}}}}]}",
         "rank1.top_k: is 16, more than the 15 experts",
         ATMOE_STATUS_SHAPE_MISMATCH},
        /* K x E: the map's rows are not the 15 clusters */
        {"{\"version\": 1, \"weights\": \"w.safetensors\", \"centroids\": "
         "\"centroids\", \"layers\": [{\"modules\": {\"q\": {\"weight\": "
         "\"w0\", \"rank1\": {\"a\": \"a\", \"b\": \"b\", \"score_map\": "
         "\"w_r\"}}}}]}",
         "rank1.score_map: tensor w_r", ATMOE_STATUS_SHAPE_MISMATCH},
        {"{\"version\": 1, \"weights\": \"w.safetensors\", \"layers\": "
         "[{\"modules\": {\"q\": {\"weight\": \"w0\", \"rank1\": {\"a\": "
         "\"b\", \"b\": \"b\"}}}}]}",
         "rank1.a: tensor b", ATMOE_STATUS_SHAPE_MISMATCH},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        atmoe_status st = parse_text(bad[i].text, dir, &m);
        if (st == ATMOE_STATUS_OK) {
            st = atmoe_manifest_check(m);
            atmoe_manifest_free(m);
        }
        ck_assert_msg(st == bad[i].st && strstr(atmoe_errmsg(CTX), bad[i].sub),
                      "manifest %zu: %s, \"%s\"; wanted %s, \"%s\"", i,
                      atmoe_status_name(st), atmoe_errmsg(CTX),
                      atmoe_status_name(bad[i].st), bad[i].sub);
    }
    free(emb);
    free(cent);
    spec_free(&s);
    test_rmdir_r(dir);
    atmoe_context_free(CTX);
}
END_TEST

static Suite *mor1e_suite(void)
{
    Suite *s = suite_create("mor1e");
    TCase *tc = tcase_create("layer");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_v2);
    tcase_add_test(tc, test_nan_scores);
    tcase_add_test(tc, test_v1);
    tcase_add_test(tc, test_ablations_and_map);
    tcase_add_test(tc, test_clblast_route);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_init);
    tcase_add_test(tc, test_manifest);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(mor1e_suite());
}
