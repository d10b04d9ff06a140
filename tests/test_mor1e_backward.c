/* The rank-1 expert layer's backward (atmoe_graph_mor1e_layer under
 * atmoe_graph_backward): every gradient the layer gives (x, W0, bias, A,
 * B, W_r, w_om, w_c, the scores and the K x E score map) against central
 * finite differences of a float64 host forward of the MSE loss against a
 * random target, at odd shapes (T 9 of a plan of 11, d_in 21, d_out 17,
 * r1 3, r2 5), both variants, both ablations, top-k with its
 * renormalisation, per-token, per-sample (gate_index, with rows no token
 * reads and tokens outside the rows) and single-row scores; the arena
 * poisoned with NaN before each compute so that an unwritten element
 * fails.  Then training: a layer from atmoe_mor1e_init fitted with AdamW
 * to a teacher layer's outputs; and bad input.  Links the library's
 * objects (lib/libatmoe_core.la) to poison the arena. */
#include <config.h>

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "testutil.h"

#define T_ROWS 9
#define T_PLAN 11
#define D_IN 21
#define D_OUT 17
#define N_SAMPLES 4 /* per-sample score rows; index 3 is read by none */
/* Central differences of the float64 forward: their error is O(h^2)
 * ~1e-8 relative; a step this small also keeps the top-k choice where it
 * is (gaps between random gates are far larger than h times their
 * slopes).  The device gradients are f32 through sums of at most 21
 * terms, a softmax and the factor 100 of the gates' sigmoids:
 * |g - g_fd| / |g_fd| over a whole gradient stays under 1e-4 (largest
 * seen 2e-5); asserted at 1e-3. */
#define FD_STEP 1e-4
#define GRAD_TOL 1e-3
#define LOSS_TOL 1e-5

/* The leaves, in this order. */
enum { L_X, L_W0, L_BIAS, L_A, L_B, L_WR, L_OM, L_C, L_SCORES, L_MAP, NL };
static const char *LEAF_NAME[NL] = {"x", "w0", "bias", "a", "b", "w_r",
                                    "w_om", "w_c", "scores", "score_map"};

typedef struct bcase {
    atmoe_mor1e_variant variant;
    atmoe_mor1e_routing routing;
    int top_k, score_mode, has_map; /* score_mode 0 per token, 1 per sample
                                       + gate_index, 2 one row */
    unsigned train;                 /* 1 << L_*: leaves trained */
    int w0_f16; /* the frozen base stored as f16 (values exact in f16) */
    /* derived */
    size_t r1, r2, E, K, S, n[NL];
    double *v[NL], *target;
    int index[T_ROWS];
} bcase;

/* The context of the test in progress. */
static atmoe_context *CTX;

static double sigmoid(double v)
{
    return 1.0 / (1.0 + exp(-v));
}

static void case_make(bcase *c, uint64_t seed)
{
    test_rng rng;
    test_rng_seed(&rng, seed);
    c->r1 = 3;
    c->r2 = c->variant == ATMOE_MOR1E_V1 ? 3 : 5;
    c->E = c->variant == ATMOE_MOR1E_V1 ? c->r1 : c->r1 * c->r2;
    c->K = c->has_map ? 4 : c->E;
    c->S = c->score_mode == 1 ? N_SAMPLES : c->score_mode == 2 ? 1 : T_ROWS;
    size_t n[NL] = {T_ROWS * D_IN, D_OUT * D_IN, D_OUT, c->r1 * D_IN,
                    D_OUT * c->r2, c->E * D_IN, 1, 1, c->S * c->K,
                    c->K * c->E};
    memcpy(c->n, n, sizeof n);
    for (int i = 0; i < NL; i++) {
        c->v[i] = malloc(n[i] * sizeof(double));
        ck_assert_ptr_nonnull(c->v[i]);
        for (size_t e = 0; e < n[i]; e++)
            c->v[i][e] = test_uniform(&rng, -1, 1);
    }
    /* om = sigmoid(0.4), c = sigmoid(-0.3): slopes of the sigmoids near
     * their largest, neither at its initial 0.5. */
    c->v[L_OM][0] = 0.004;
    c->v[L_C][0] = -0.003;
    for (size_t e = 0; e < n[L_MAP]; e++)
        c->v[L_MAP][e] = 0.5 * (c->v[L_MAP][e] + 1.0);
    if (c->w0_f16) /* multiples of 1/64 in [-1, 1]: exact in f16 */
        for (size_t e = 0; e < n[L_W0]; e++)
            c->v[L_W0][e] = round(c->v[L_W0][e] * 64.0) / 64.0;
    c->target = malloc(T_ROWS * D_OUT * sizeof(double));
    for (size_t e = 0; e < T_ROWS * D_OUT; e++)
        c->target[e] = test_uniform(&rng, -1, 1);
    /* Samples of the tokens; -1 and 4 are outside the score rows, and no
     * token reads row 3. */
    static const int seq[T_ROWS] = {0, 0, 2, -1, 1, 1, 4, 2, 0};
    memcpy(c->index, seq, sizeof seq);
}

static void case_free(bcase *c)
{
    for (int i = 0; i < NL; i++)
        free(c->v[i]);
    free(c->target);
}

/* The float64 forward (the equations of tests/test_mor1e.c's reference):
 * y [T_ROWS, D_OUT] into y when not NULL; returns the MSE loss. */
static double host_forward(const bcase *c, double *y)
{
    size_t E = c->E, Z = c->variant == ATMOE_MOR1E_V2 ? c->r2 : c->r1;
    int router = c->routing != ATMOE_MOR1E_ROUTE_INTUITION;
    int intuition = c->routing != ATMOE_MOR1E_ROUTE_ROUTER;
    double *const *v = c->v;
    double om = sigmoid(100.0 * v[L_OM][0]), cc = sigmoid(100.0 * v[L_C][0]);
    double kr = router ? ATMOE_MOR1E_K_ROUTER * om : 0.0;
    double ks = ATMOE_MOR1E_K_INTUITION * (1.0 - om);
    double loss = 0.0;
    for (size_t t = 0; t < T_ROWS; t++) {
        const double *xt = v[L_X] + t * D_IN;
        double u[8], p[32], s[32], g[32], z[8];
        int kept[32];
        for (size_t i = 0; i < c->r1; i++) {
            u[i] = 0.0;
            for (size_t k = 0; k < D_IN; k++)
                u[i] += v[L_A][i * D_IN + k] * xt[k];
        }
        double m = -INFINITY, sum = 0.0;
        for (size_t e = 0; e < E; e++) {
            p[e] = 0.0;
            for (size_t k = 0; k < D_IN; k++)
                p[e] += v[L_WR][e * D_IN + k] * xt[k];
            m = fmax(m, p[e]);
        }
        for (size_t e = 0; e < E; e++)
            sum += (p[e] = exp(p[e] - m));
        for (size_t e = 0; e < E; e++)
            p[e] = router ? p[e] / sum : 0.0;
        long row = c->score_mode == 2 ? 0 : (long)t;
        if (c->score_mode == 1)
            row = c->index[t] >= 0 && (size_t)c->index[t] < c->S
                      ? c->index[t]
                      : -1;
        for (size_t e = 0; e < E; e++) {
            s[e] = 0.0;
            if (!intuition || row < 0)
                continue;
            const double *sr = v[L_SCORES] + (size_t)row * c->K;
            if (!c->has_map)
                s[e] = sr[e];
            else
                for (size_t k = 0; k < c->K; k++)
                    s[e] += sr[k] * v[L_MAP][k * E + e];
        }
        for (size_t e = 0; e < E; e++) {
            g[e] = kr * p[e] + ks * s[e];
            kept[e] = 1;
        }
        if (c->top_k > 0 && (size_t)c->top_k < E) {
            for (size_t e = 0; e < E; e++) {
                size_t before = 0;
                for (size_t j = 0; j < E; j++)
                    before += g[j] > g[e] || (g[j] == g[e] && j < e);
                kept[e] = before < (size_t)c->top_k;
            }
            double ps = 0.0;
            for (size_t e = 0; e < E; e++)
                ps += kept[e] ? p[e] : 0.0;
            for (size_t e = 0; e < E; e++)
                g[e] = kept[e] ? kr * (router ? p[e] / ps : 0.0) + ks * s[e]
                               : 0.0;
        }
        for (size_t j = 0; j < Z; j++)
            z[j] = 0.0;
        for (size_t e = 0; e < E; e++) {
            size_t i = c->variant == ATMOE_MOR1E_V2 ? e / c->r2 : e;
            size_t j = c->variant == ATMOE_MOR1E_V2 ? e % c->r2 : e;
            z[j] += g[e] * u[i];
        }
        for (size_t o = 0; o < D_OUT; o++) {
            double yo = v[L_BIAS][o];
            for (size_t k = 0; k < D_IN; k++)
                yo += v[L_W0][o * D_IN + k] * xt[k];
            for (size_t j = 0; j < Z; j++)
                yo += cc * v[L_B][o * c->r2 + j] * z[j];
            if (y)
                y[t * D_OUT + o] = yo;
            double d = yo - c->target[t * D_OUT + o];
            loss += d * d;
        }
    }
    return loss / (double)(T_ROWS * D_OUT);
}

static float *to_f32(const double *x, size_t n)
{
    float *f = malloc(n * sizeof *f);
    ck_assert_ptr_nonnull(f);
    for (size_t i = 0; i < n; i++)
        f[i] = (float)x[i];
    return f;
}

/* A parameter node over a new tensor holding data (the graph keeps its
 * reference). */
static atmoe_node param(atmoe_graph *g, const char *name, int ndim,
                        size_t d0, size_t d1, const double *data)
{
    atmoe_context *ctx = CTX;
    size_t shape[2] = {d0, d1}, n = ndim == 1 ? d0 : d0 * d1;
    atmoe_tensor *t;
    atmoe_node id;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, ndim, shape, &t),
                     ctx);
    float *f = to_f32(data, n);
    ck_assert_status(atmoe_tensor_write(t, f, n * sizeof *f), ctx);
    free(f);
    ck_assert_status(atmoe_graph_parameter(g, name, t, &id), ctx);
    atmoe_tensor_free(t);
    return id;
}

static atmoe_node input(atmoe_graph *g, const char *name, atmoe_dtype dt,
                        int ndim, size_t d1)
{
    atmoe_context *ctx = CTX;
    size_t shape[2] = {T_PLAN, d1};
    atmoe_node id;
    ck_assert_status(atmoe_graph_input(g, name, dt, ndim, shape, 1, &id), ctx);
    return id;
}

static void poison_arena(atmoe_graph *g)
{
    float nan_ = nanf("");
    ck_assert_int_eq(clEnqueueFillBuffer(g->ctx->queue, g->arena, &nan_,
                                         sizeof nan_, 0,
                                         g->memory.arena_bytes, 0, NULL,
                                         NULL),
                     CL_SUCCESS);
}

static void check_case(bcase *c, uint64_t seed)
{
    atmoe_context *ctx = CTX = test_context();
    case_make(c, seed);
    int router = c->routing != ATMOE_MOR1E_ROUTE_INTUITION;
    int intuition = c->routing != ATMOE_MOR1E_ROUTE_ROUTER;
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    atmoe_node nd[NL], index = ATMOE_NODE_NONE;
    for (int i = 0; i < NL; i++)
        nd[i] = ATMOE_NODE_NONE;
    nd[L_X] = input(g, "x", ATMOE_DTYPE_F32, 2, D_IN);
    nd[L_W0] = param(g, "w0", 2, D_OUT, D_IN, c->v[L_W0]);
    nd[L_BIAS] = param(g, "bias", 1, D_OUT, 0, c->v[L_BIAS]);
    nd[L_A] = param(g, "a", 2, c->r1, D_IN, c->v[L_A]);
    nd[L_B] = param(g, "b", 2, D_OUT, c->r2, c->v[L_B]);
    if (router)
        nd[L_WR] = param(g, "w_r", 2, c->E, D_IN, c->v[L_WR]);
    nd[L_OM] = param(g, "w_om", 1, 1, 0, c->v[L_OM]);
    nd[L_C] = param(g, "w_c", 1, 1, 0, c->v[L_C]);
    if (intuition) {
        nd[L_SCORES] = c->score_mode == 0
                           ? input(g, "scores", ATMOE_DTYPE_F32, 2, c->K)
                           : param(g, "scores", 2, c->S, c->K,
                                   c->v[L_SCORES]);
        if (c->has_map)
            nd[L_MAP] = param(g, "score_map", 2, c->K, c->E, c->v[L_MAP]);
        if (c->score_mode == 1)
            index = input(g, "gate_index", ATMOE_DTYPE_I32, 1, 0);
    }
    for (int i = 0; i < NL; i++)
        if ((c->train >> i & 1u) && nd[i] != ATMOE_NODE_NONE)
            ck_assert_status(atmoe_graph_set_trainable(g, nd[i], 1), ctx);
    atmoe_mor1e_layer L = {
        .w0 = nd[L_W0], .bias = nd[L_BIAS], .a = nd[L_A], .b = nd[L_B],
        .w_r = nd[L_WR], .w_om = nd[L_OM], .w_c = nd[L_C],
        .scores = nd[L_SCORES], .score_map = nd[L_MAP], .gate_index = index,
        .variant = c->variant, .routing = c->routing,
        .k_router = ATMOE_MOR1E_K_ROUTER,
        .k_intuition = ATMOE_MOR1E_K_INTUITION, .top_k = c->top_k,
    };
    if (c->w0_f16)
        ck_assert_status(atmoe_graph_cast(g, L.w0, ATMOE_DTYPE_F16, &L.w0),
                         ctx);
    atmoe_node y, target, loss;
    ck_assert_status(atmoe_graph_mor1e_layer(g, nd[L_X], &L, &y, NULL), ctx);
    target = input(g, "target", ATMOE_DTYPE_F32, 2, D_OUT);
    ck_assert_status(atmoe_graph_loss_mse(g, y, target, &loss), ctx);
    ck_assert_status(atmoe_graph_backward(g, loss), ctx);
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);

    float *xf = to_f32(c->v[L_X], c->n[L_X]);
    float *tf = to_f32(c->target, T_ROWS * D_OUT);
    float *sf = to_f32(c->v[L_SCORES], c->n[L_SCORES]);
    for (int pass = 0; pass < 2; pass++) {
        poison_arena(g);
        ck_assert_status(atmoe_graph_set_input(g, nd[L_X], xf,
                                               c->n[L_X] * sizeof *xf,
                                               T_ROWS),
                         ctx);
        ck_assert_status(atmoe_graph_set_input(g, target, tf,
                                               T_ROWS * D_OUT * sizeof *tf,
                                               T_ROWS),
                         ctx);
        if (intuition && c->score_mode == 0)
            ck_assert_status(
                atmoe_graph_set_input(g, nd[L_SCORES], sf,
                                      c->n[L_SCORES] * sizeof *sf, T_ROWS),
                ctx);
        if (index != ATMOE_NODE_NONE)
            ck_assert_status(atmoe_graph_set_input(g, index, c->index,
                                                   sizeof c->index, T_ROWS),
                             ctx);
        ck_assert_status(atmoe_graph_compute(g, T_ROWS), ctx);
        atmoe_compute_stats stats;
        ck_assert_status(atmoe_graph_get_compute_stats(g, &stats), ctx);
        ck_assert_msg(stats.host_allocations == 0,
                      "a training compute made %llu host allocations",
                      (unsigned long long)stats.host_allocations);
        float lv;
        ck_assert_status(atmoe_graph_read(g, loss, &lv, sizeof lv), ctx);
        double lref = host_forward(c, NULL);
        ck_assert_msg(isfinite(lv) && fabs(lv - lref) <= LOSS_TOL * lref,
                      "loss %.9g, reference %.9g", lv, lref);
        for (int i = 0; i < NL; i++) {
            if (!(c->train >> i & 1u) || nd[i] == ATMOE_NODE_NONE)
                continue;
            size_t n = c->n[i];
            atmoe_node gn;
            ck_assert_status(atmoe_graph_get_grad(g, nd[i], &gn), ctx);
            float *got = malloc(n * sizeof *got);
            test_poison(got, n);
            ck_assert_status(atmoe_graph_read(g, gn, got, n * sizeof *got),
                             ctx);
            double num = 0, den = 0, *x = c->v[i];
            for (size_t e = 0; e < n; e++) {
                double keep = x[e];
                x[e] = keep + FD_STEP;
                double lp = host_forward(c, NULL);
                x[e] = keep - FD_STEP;
                double lm = host_forward(c, NULL);
                x[e] = keep;
                double fd = (lp - lm) / (2 * FD_STEP);
                ck_assert_msg(isfinite(got[e]), "%s: gradient element %zu "
                              "is %g", LEAF_NAME[i], e, got[e]);
                num += (got[e] - fd) * (got[e] - fd);
                den += fd * fd;
            }
            double rel = sqrt(num) / fmax(sqrt(den), 1e-300);
            ck_assert_msg(den > 0, "%s: the reference gradient is 0",
                          LEAF_NAME[i]);
            ck_assert_msg(rel <= GRAD_TOL, "%s: |g - g_fd| / |g_fd| = %g > %g",
                          LEAF_NAME[i], rel, GRAD_TOL);
            free(got);
        }
    }
    free(xf);
    free(tf);
    free(sf);
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
    case_free(c);
}

#define TRAIN_ALL                                                             \
    (1u << L_A | 1u << L_B | 1u << L_WR | 1u << L_OM | 1u << L_C)

/* v2, dense routing, per-token scores; gradients to x and the scores. */
START_TEST(test_v2_dense)
{
    bcase c = {.variant = ATMOE_MOR1E_V2, .routing = ATMOE_MOR1E_ROUTE_BOTH,
               .train = TRAIN_ALL | 1u << L_X | 1u << L_SCORES};
    check_case(&c, 11);
}
END_TEST

/* v2, top-4 of 15, per-sample scores through a score map; the base
 * trained too. */
START_TEST(test_v2_topk_samples_map)
{
    bcase c = {.variant = ATMOE_MOR1E_V2, .routing = ATMOE_MOR1E_ROUTE_BOTH,
               .top_k = 4, .score_mode = 1, .has_map = 1,
               .train = TRAIN_ALL | 1u << L_SCORES | 1u << L_MAP |
                        1u << L_W0 | 1u << L_BIAS | 1u << L_X};
    check_case(&c, 12);
}
END_TEST

/* v1, top-2 of 3, one score row for all tokens; the base stored as f16
 * (dx through its f32 copy). */
START_TEST(test_v1_topk_row)
{
    bcase c = {.variant = ATMOE_MOR1E_V1, .routing = ATMOE_MOR1E_ROUTE_BOTH,
               .top_k = 2, .score_mode = 2, .w0_f16 = 1,
               .train = TRAIN_ALL | 1u << L_X | 1u << L_SCORES};
    check_case(&c, 13);
}
END_TEST

/* The ablations: the router alone (top-5 of 15, v2) and the intuition
 * alone (v1, top-2, and v2 dense with a map). */
START_TEST(test_ablations)
{
    bcase r = {.variant = ATMOE_MOR1E_V2, .routing = ATMOE_MOR1E_ROUTE_ROUTER,
               .top_k = 5, .train = TRAIN_ALL | 1u << L_X};
    check_case(&r, 14);
    bcase s = {.variant = ATMOE_MOR1E_V1,
               .routing = ATMOE_MOR1E_ROUTE_INTUITION, .top_k = 2,
               .train = TRAIN_ALL | 1u << L_X | 1u << L_SCORES};
    check_case(&s, 15);
    bcase m = {.variant = ATMOE_MOR1E_V2,
               .routing = ATMOE_MOR1E_ROUTE_INTUITION, .has_map = 1,
               .score_mode = 0, .train = TRAIN_ALL | 1u << L_MAP};
    check_case(&m, 16);
}
END_TEST

/* Only the gates trained (A, B, W_r frozen): the route's kernel still
 * runs for them alone; and only B (nothing through the route). */
START_TEST(test_frozen)
{
    bcase c = {.variant = ATMOE_MOR1E_V2, .routing = ATMOE_MOR1E_ROUTE_BOTH,
               .top_k = 3, .train = 1u << L_OM | 1u << L_C};
    check_case(&c, 17);
    bcase b = {.variant = ATMOE_MOR1E_V1, .routing = ATMOE_MOR1E_ROUTE_BOTH,
               .train = 1u << L_B};
    check_case(&b, 18);
}
END_TEST

/* Training: a T-REX layer from atmoe_mor1e_init (B, W_r and the gates at
 * zero, A at PEFT's Kaiming bound) fitted with AdamW to the outputs of a
 * random teacher layer over the same frozen base and per-token scores,
 * A, B, W_r, w_om and w_c trained jointly: the loss must fall by
 * TRAIN_FACTOR within TRAIN_STEPS steps (AdamW, lr 1e-2; seen on PoCL:
 * 0.335 -> 3.1e-4, down 1000 times, in 90 steps, well under a second),
 * and the router and both gates must have left their initial zeros. */
#define TRAIN_STEPS 300
#define TRAIN_FACTOR 100.0

static atmoe_tensor *new_tensor(size_t d0, size_t d1, int ndim)
{
    size_t shape[2] = {d0, d1};
    atmoe_tensor *t;
    ck_assert_status(atmoe_tensor_new(CTX, ATMOE_DTYPE_F32, ndim, shape, &t),
                     CTX);
    return t;
}

START_TEST(test_train)
{
    atmoe_context *ctx = CTX = test_context();
    bcase c = {.variant = ATMOE_MOR1E_V2, .routing = ATMOE_MOR1E_ROUTE_BOTH,
               .top_k = 6};
    case_make(&c, 21);
    /* The teacher: gates away from 0.5 and a router worth following. */
    c.v[L_OM][0] = 0.01;
    c.v[L_C][0] = 0.005;
    for (size_t e = 0; e < c.n[L_B]; e++)
        c.v[L_B][e] *= 0.1;
    double *y = malloc(T_ROWS * D_OUT * sizeof *y);
    host_forward(&c, y);

    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    atmoe_tensor *t[5] = {new_tensor(c.r1, D_IN, 2), new_tensor(D_OUT, c.r2, 2),
                          new_tensor(c.E, D_IN, 2), new_tensor(1, 0, 1),
                          new_tensor(1, 0, 1)};
    ck_assert_status(atmoe_mor1e_init(t[0], t[1], t[2], t[3], t[4], 7), ctx);
    static const char *names[5] = {"a", "b", "w_r", "w_om", "w_c"};
    atmoe_node w[5];
    for (int i = 0; i < 5; i++) {
        ck_assert_status(atmoe_graph_parameter(g, names[i], t[i], &w[i]), ctx);
        ck_assert_status(atmoe_graph_set_trainable(g, w[i], 1), ctx);
    }
    atmoe_node x = input(g, "x", ATMOE_DTYPE_F32, 2, D_IN);
    atmoe_node scores = input(g, "scores", ATMOE_DTYPE_F32, 2, c.K);
    atmoe_node target = input(g, "target", ATMOE_DTYPE_F32, 2, D_OUT);
    atmoe_mor1e_layer L = {
        .w0 = param(g, "w0", 2, D_OUT, D_IN, c.v[L_W0]),
        .bias = param(g, "bias", 1, D_OUT, 0, c.v[L_BIAS]),
        .a = w[0], .b = w[1], .w_r = w[2], .w_om = w[3], .w_c = w[4],
        .scores = scores, .score_map = ATMOE_NODE_NONE,
        .gate_index = ATMOE_NODE_NONE, .variant = c.variant,
        .routing = c.routing, .k_router = ATMOE_MOR1E_K_ROUTER,
        .k_intuition = ATMOE_MOR1E_K_INTUITION, .top_k = c.top_k,
    };
    atmoe_node out, loss;
    ck_assert_status(atmoe_graph_mor1e_layer(g, x, &L, &out, NULL), ctx);
    ck_assert_status(atmoe_graph_loss_mse(g, out, target, &loss), ctx);
    ck_assert_status(atmoe_graph_backward(g, loss), ctx);
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    atmoe_optimizer_config cfg;
    ck_assert_status(atmoe_optimizer_config_default(&cfg), ctx);
    cfg.lr = 1e-2f;
    cfg.weight_decay = 0.0f;
    atmoe_optimizer *opt;
    ck_assert_status(atmoe_optimizer_new(g, &cfg, &opt), ctx);

    float *xf = to_f32(c.v[L_X], c.n[L_X]);
    float *sf = to_f32(c.v[L_SCORES], c.n[L_SCORES]);
    float *yf = to_f32(y, T_ROWS * D_OUT);
    ck_assert_status(atmoe_graph_set_input(g, x, xf, c.n[L_X] * 4, T_ROWS),
                     ctx);
    ck_assert_status(atmoe_graph_set_input(g, scores, sf,
                                           c.n[L_SCORES] * 4, T_ROWS),
                     ctx);
    ck_assert_status(atmoe_graph_set_input(g, target, yf,
                                           T_ROWS * D_OUT * 4, T_ROWS),
                     ctx);
    float first = NAN, lv = NAN;
    int step;
    for (step = 0; step < TRAIN_STEPS; step++) {
        ck_assert_status(atmoe_graph_compute(g, T_ROWS), ctx);
        ck_assert_status(atmoe_graph_read(g, loss, &lv, sizeof lv), ctx);
        ck_assert_msg(isfinite(lv), "step %d: loss %g", step, lv);
        if (step == 0)
            first = lv;
        else if (lv * TRAIN_FACTOR < first)
            break;
        ck_assert_status(atmoe_optimizer_step(opt, lv, NULL), ctx);
    }
    ck_assert_msg(first > 0 && lv * TRAIN_FACTOR < first,
                  "the loss went from %g to %g in %d steps, not down by %g",
                  first, lv, step, TRAIN_FACTOR);
    for (int i = 2; i < 5; i++) {
        size_t n = i == 2 ? c.E * D_IN : 1;
        float *h = malloc(n * sizeof *h);
        ck_assert_status(atmoe_tensor_read(t[i], h, n * sizeof *h), ctx);
        double norm = 0;
        for (size_t e = 0; e < n; e++)
            norm += (double)h[e] * h[e];
        ck_assert_msg(isfinite(norm) && norm > 0, "%s was not trained",
                      names[i]);
        free(h);
    }
    atmoe_optimizer_free(opt);
    atmoe_graph_free(g);
    for (int i = 0; i < 5; i++)
        atmoe_tensor_free(t[i]);
    free(xf);
    free(sf);
    free(yf);
    free(y);
    case_free(&c);
    atmoe_context_free(ctx);
}
END_TEST

/* Bad input: a loss that reads the router's trace p, or the stats, is
 * refused with a status and a message, and the graph is as it was (a
 * plain loss over y then trains). */
START_TEST(test_errors)
{
    atmoe_context *ctx = CTX = test_context();
    bcase c = {.variant = ATMOE_MOR1E_V2, .routing = ATMOE_MOR1E_ROUTE_BOTH};
    case_make(&c, 31);
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    atmoe_node x = input(g, "x", ATMOE_DTYPE_F32, 2, D_IN);
    atmoe_node a = param(g, "a", 2, c.r1, D_IN, c.v[L_A]);
    atmoe_node w_r = param(g, "w_r", 2, c.E, D_IN, c.v[L_WR]);
    ck_assert_status(atmoe_graph_set_trainable(g, a, 1), ctx);
    ck_assert_status(atmoe_graph_set_trainable(g, w_r, 1), ctx);
    atmoe_mor1e_layer L = {
        .w0 = param(g, "w0", 2, D_OUT, D_IN, c.v[L_W0]),
        .bias = ATMOE_NODE_NONE, .a = a,
        .b = param(g, "b", 2, D_OUT, c.r2, c.v[L_B]), .w_r = w_r,
        .w_om = param(g, "w_om", 1, 1, 0, c.v[L_OM]),
        .w_c = param(g, "w_c", 1, 1, 0, c.v[L_C]),
        .scores = input(g, "scores", ATMOE_DTYPE_F32, 2, c.K),
        .score_map = ATMOE_NODE_NONE, .gate_index = ATMOE_NODE_NONE,
        .variant = c.variant, .routing = c.routing,
        .k_router = ATMOE_MOR1E_K_ROUTER,
        .k_intuition = ATMOE_MOR1E_K_INTUITION,
    };
    atmoe_node y, target, mse, lb, loss, stats_loss;
    atmoe_mor1e_trace tr;
    ck_assert_status(atmoe_graph_mor1e_layer(g, x, &L, &y, &tr), ctx);
    target = input(g, "target", ATMOE_DTYPE_F32, 2, D_OUT);
    ck_assert_status(atmoe_graph_loss_mse(g, y, target, &mse), ctx);
    ck_assert_status(atmoe_graph_loss_load_balance(g, tr.p, &lb), ctx);
    ck_assert_status(atmoe_graph_add(g, mse, lb, &loss), ctx);
    ck_assert_fails_clean(g, atmoe_graph_backward(g, loss), ctx,
                          ATMOE_STATUS_NOT_SUPPORTED, "p trace");
    /* The stats (counts and means of the traces) have no gradient. */
    ck_assert_status(atmoe_graph_mean(g, tr.importance, 0, &stats_loss), ctx);
    ck_assert_fails_clean(g, atmoe_graph_backward(g, stats_loss), ctx,
                          ATMOE_STATUS_NOT_SUPPORTED, "mor1e_stats");
    ck_assert_status(atmoe_graph_backward(g, mse), ctx);
    atmoe_node ga;
    ck_assert_status(atmoe_graph_get_grad(g, a, &ga), ctx);
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    atmoe_graph_free(g);
    case_free(&c);
    atmoe_context_free(ctx);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("mor1e_backward");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_v2_dense);
    tcase_add_test(tc, test_v2_topk_samples_map);
    tcase_add_test(tc, test_v1_topk_row);
    tcase_add_test(tc, test_ablations);
    tcase_add_test(tc, test_frozen);
    tcase_add_test(tc, test_train);
    tcase_add_test(tc, test_errors);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(suite());
}
