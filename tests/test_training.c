/* Training end to end, through the public API only: an AT-MoE layer
 * (atmoe_graph_moe_layer: the grouped router in front of the fused
 * mixture) with an MSE loss, its gradients from atmoe_graph_backward
 * against central finite differences of a float64 host forward
 * (tests/moe_reference.c's router), a layer that learns a teacher's
 * mapping with AdamW, a checkpointed run resumed bit for bit, the host
 * allocations of a training step, the load-balance loss flowing into the
 * router, and bad input.  The library is linked as its objects for one
 * internal call only: base/alloc.h's count of host allocations, which
 * covers the optimiser's step as well as the compute.
 *
 * Shapes are small and odd (T 7, d 13 -> 11, ranks 3 and 2 in groups of 2
 * and 3 experts); data are random and never zero.  Finite differences
 * move a float weight by h and divide by the step the float actually took
 * (the reference reads floats), so that only the curvature of the loss
 * is left in them. */
#include <config.h>

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "moe_reference.h"

/* Relative to the largest |reference| of each gradient.  The device sums
 * in f32 through the router's softmaxes, two GEMMs and the mix (a few
 * hundred terms, about 1e-5 of the scale in the worst case); finite
 * differences with h 1e-3 on a loss that is smooth where top-k does not
 * switch keep an error of order h^2 times the third derivative (1e-6). */
#define TOL_GRAD 2e-4
#define FD_H 1e-3

/* ------------------------------------------------------------ one layer */

/* A layer under test: its experts on the host (model), router (rcfg), the
 * router's and the base's weights, and the library's handles. */
typedef struct tlayer {
    model m;
    rcfg rc;
    float *w0, *bias, *wg, *wd; /* [d_out, d_in], [d_out], [d_in, G],
                                   [d_in, G*M] or [G, M] */
    size_t wd_count;
    float c;
    atmoe_experts *set;
    atmoe_router *router;
    atmoe_tensor *t_wg, *t_wd;
    atmoe_node n_wg, n_wd, y, w; /* w: the router's weights (trace) */
    char name[16];
} tlayer;

static const int GROUP5[5] = {0, 0, 1, 1, 1};
static const size_t RANK5[5] = {3, 2, 2, 3, 2};
/* Three groups, for top-k over groups that still leaves two. */
static const int GROUP6[6] = {0, 0, 0, 1, 1, 2};
static const size_t RANK6[6] = {3, 2, 2, 3, 2, 1};
/* The layout tlayer_init gives layer 0 (later layers get GROUP5). */
static int THREE_GROUPS;
/* The gate c of the layers tlayer_init makes: the mixture's backward
 * takes cl/linear.cl's route for c = 1 (AT-MoE's) and CLBlast's for any
 * other c, so cases use both. */
static float LAYER_C = 0.7f;

static void tlayer_init(tlayer *L, size_t d_in, size_t d_out,
                        atmoe_router_form form, int topk_g, int topk_e,
                        const char *name)
{
    memset(L, 0, sizeof *L);
    if (THREE_GROUPS && strcmp(name, "l0") == 0)
        model_init(&L->m, d_in, d_out, 6, GROUP6, RANK6, NULL);
    else
        model_init(&L->m, d_in, d_out, 5, GROUP5, RANK5, NULL);
    L->set = model_build(&L->m);
    L->router = router_make(L->set, &L->rc, form, 0.8f, 1.3f, topk_g,
                            topk_e);
    L->w0 = alloc_uniform(d_out * d_in, -0.5, 0.5);
    L->bias = alloc_uniform(d_out, -0.5, 0.5);
    L->wg = alloc_uniform(d_in * (size_t)L->m.G, -1, 1);
    L->wd_count = form == ATMOE_ROUTER_PROJECTED
                      ? d_in * (size_t)(L->m.G * L->m.M)
                      : (size_t)(L->m.G * L->m.M);
    L->wd = alloc_uniform(L->wd_count, -1, 1);
    L->c = LAYER_C;
    snprintf(L->name, sizeof L->name, "%s", name);
}

static void tlayer_free(tlayer *L)
{
    model_free(&L->m);
    atmoe_router_free(L->router);
    atmoe_experts_free(L->set);
    atmoe_tensor_free(L->t_wg);
    atmoe_tensor_free(L->t_wd);
    free(L->w0);
    free(L->bias);
    free(L->wg);
    free(L->wd);
}

static atmoe_tensor *tensor_of(const float *data, int ndim, size_t r,
                               size_t c)
{
    size_t shape[2] = {r, c};
    atmoe_tensor *t = NULL;
    OK(atmoe_tensor_new(CTX, ATMOE_DTYPE_F32, ndim, shape, &t));
    OK(atmoe_tensor_write(t, data, r * (ndim == 2 ? c : 1) * sizeof(float)));
    return t;
}

/* Adds the layer over x: W0 and bias constants (frozen base), w_g and w_d
 * parameters marked trainable, every expert's A and B trainable. */
static void tlayer_graph(tlayer *L, atmoe_graph *g, atmoe_node x)
{
    size_t din = L->m.d_in, dout = L->m.d_out;
    size_t G = (size_t)L->m.G, GM = (size_t)(L->m.G * L->m.M);
    char nm[48];
    atmoe_node w0, bias;
    size_t sw0[2] = {dout, din};
    OK(atmoe_graph_constant(g, NULL, ATMOE_DTYPE_F32, 2, sw0, L->w0, &w0));
    OK(atmoe_graph_constant(g, NULL, ATMOE_DTYPE_F32, 1, &dout, L->bias,
                            &bias));
    L->t_wg = tensor_of(L->wg, 2, din, G);
    if (L->rc.form == ATMOE_ROUTER_PROJECTED)
        L->t_wd = tensor_of(L->wd, 2, din, GM);
    else
        L->t_wd = tensor_of(L->wd, 2, G, (size_t)L->m.M);
    snprintf(nm, sizeof nm, "%s.w_g", L->name);
    OK(atmoe_graph_parameter(g, nm, L->t_wg, &L->n_wg));
    snprintf(nm, sizeof nm, "%s.w_d", L->name);
    OK(atmoe_graph_parameter(g, nm, L->t_wd, &L->n_wd));
    OK(atmoe_graph_set_trainable(g, L->n_wg, 1));
    OK(atmoe_graph_set_trainable(g, L->n_wd, 1));
    for (int e = 0; e < L->m.n; e++)
        OK(atmoe_experts_set_trainable(L->set, (size_t)e,
                                       ATMOE_TRAIN_A | ATMOE_TRAIN_B));
    atmoe_layer spec = {
        .w0 = w0, .bias = bias, .experts = L->set, .router = L->router,
        .w_g = L->n_wg, .w_d = L->n_wd, .router_input = ATMOE_NODE_NONE,
        .gate_index = ATMOE_NODE_NONE, .c = L->c};
    atmoe_layer_trace tr;
    OK(atmoe_graph_moe_layer(g, x, &spec, &L->y, &tr));
    L->w = tr.w;
    OK(atmoe_graph_set_name(g, L->y, L->name));
}

/* y [T, d_out] of the layer for x [T, d_in], float64. */
static void ref_layer(const tlayer *L, const double *x, size_t T, double *y)
{
    const model *m = &L->m;
    size_t din = m->d_in, dout = m->d_out;
    double *a = alloc_d(T * (size_t)m->G);
    double *d = alloc_d(T * (size_t)(m->G * m->M));
    double *w = alloc_d(T * (size_t)m->n);
    ref_router(m, &L->rc, x, T, L->wg, L->wd, a, d, w);
    for (size_t t = 0; t < T; t++) {
        const double *xt = x + t * din;
        double *yt = y + t * dout;
        for (size_t o = 0; o < dout; o++) {
            double acc = L->bias[o];
            for (size_t i = 0; i < din; i++)
                acc += (double)L->w0[o * din + i] * xt[i];
            yt[o] = acc;
        }
        for (int e = 0; e < m->n; e++) {
            double we = w[t * (size_t)m->n + (size_t)e];
            if (we == 0.0)
                continue;
            double s = L->c * we *
                       ref_scale(m->rank[e], m->alpha[e], m->flags[e]);
            for (size_t r = 0; r < m->rank[e]; r++) {
                double u = 0.0;
                for (size_t i = 0; i < din; i++)
                    u += (double)m->A[e][r * din + i] * xt[i];
                for (size_t o = 0; o < dout; o++)
                    yt[o] += s * m->B[e][o * m->rank[e] + r] * u;
            }
        }
    }
    free(a);
    free(d);
    free(w);
}

/* A problem: one or two layers, x, the target, and the float64 loss. */
typedef struct problem {
    tlayer *L;
    size_t n; /* layers */
    size_t T;
    float *x, *target;
} problem;

static double ref_mse(const problem *p)
{
    size_t T = p->T;
    double *h = to_double(p->x, T * p->L[0].m.d_in);
    for (size_t l = 0; l < p->n; l++) {
        double *y = alloc_d(T * p->L[l].m.d_out);
        ref_layer(&p->L[l], h, T, y);
        free(h);
        h = y;
    }
    size_t n = T * p->L[p->n - 1].m.d_out;
    double loss = 0.0;
    for (size_t i = 0; i < n; i++) {
        double e = h[i] - p->target[i];
        loss += e * e;
    }
    free(h);
    return loss / (double)n;
}

/* Central differences of the loss in each of v's n floats. */
static double *fd_grad(const problem *p, float *v, size_t n)
{
    double *gr = alloc_d(n);
    for (size_t i = 0; i < n; i++) {
        float v0 = v[i];
        float hi = (float)(v0 + FD_H), lo = (float)(v0 - FD_H);
        v[i] = hi;
        double lp = ref_mse(p);
        v[i] = lo;
        double lm = ref_mse(p);
        v[i] = v0;
        gr[i] = (lp - lm) / ((double)hi - (double)lo);
    }
    return gr;
}

/* got against want within tol of max |want| (NaN fails). */
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

/* expect_grad, or, where the reference is exactly zero everywhere (the
 * group weights when top-k keeps one group: a is one-hot), a gradient of
 * exact zeros. */
static void expect_grad_z(const char *what, const float *got,
                          const double *want, size_t n, double tol)
{
    int any = 0;
    for (size_t i = 0; i < n; i++)
        any |= want[i] != 0.0;
    if (any) {
        expect_grad(what, got, want, n, tol);
        return;
    }
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(got[i] == 0.0f, "%s[%zu] = %g, not 0", what, i,
                      got[i]);
}

/* Reads the named trainable's gradient (its count checked). */
static float *grad_of(atmoe_graph *g, const char *name, size_t count)
{
    float *p = malloc(count * sizeof *p);
    ck_assert_ptr_nonnull(p);
    test_poison(p, count);
    OK(atmoe_graph_read_gradient(g, name, p, count));
    return p;
}

/* Every trainable of layer L against finite differences. */
static void check_layer_grads(atmoe_graph *g, problem *p, tlayer *L)
{
    char nm[64];
    size_t din = L->m.d_in, dout = L->m.d_out;
    snprintf(nm, sizeof nm, "%s.w_g", L->name);
    size_t nwg = din * (size_t)L->m.G;
    float *got = grad_of(g, nm, nwg);
    double *want = fd_grad(p, L->wg, nwg);
    expect_grad_z(nm, got, want, nwg, TOL_GRAD);
    free(got);
    free(want);

    snprintf(nm, sizeof nm, "%s.w_d", L->name);
    got = grad_of(g, nm, L->wd_count);
    want = fd_grad(p, L->wd, L->wd_count);
    /* Masked and fixed entries get no gradient: their finite differences
     * are 0 too, so the comparison covers them. */
    expect_grad_z(nm, got, want, L->wd_count, TOL_GRAD);
    free(got);
    free(want);

    for (int e = 0; e < L->m.n; e++) {
        size_t r = L->m.rank[e];
        snprintf(nm, sizeof nm, "%s/expert%d/A", L->name, e);
        got = grad_of(g, nm, r * din);
        want = fd_grad(p, L->m.A[e], r * din);
        int used = 0;
        for (size_t i = 0; i < r * din; i++)
            used |= want[i] != 0.0;
        if (used) {
            expect_grad(nm, got, want, r * din, TOL_GRAD);
        } else {
            /* An expert no token routes to: exactly zero. */
            for (size_t i = 0; i < r * din; i++)
                ck_assert_msg(got[i] == 0.0f, "%s[%zu] = %g, not 0", nm, i,
                              got[i]);
        }
        free(got);
        free(want);

        /* B^T [r, d_out]: element (k, o) is B[o, k]. */
        snprintf(nm, sizeof nm, "%s/expert%d/B_T", L->name, e);
        got = grad_of(g, nm, r * dout);
        want = fd_grad(p, L->m.B[e], dout * r);
        double *want_t = alloc_d(r * dout);
        for (size_t k = 0; k < r; k++)
            for (size_t o = 0; o < dout; o++)
                want_t[k * dout + o] = want[o * r + k];
        if (used)
            expect_grad(nm, got, want_t, r * dout, TOL_GRAD);
        free(got);
        free(want);
        free(want_t);
    }
}

/* Builds the graph of problem p (layers chained), the MSE loss and its
 * backward; the input's gradient too when input_grad. */
static atmoe_graph *problem_graph(problem *p, int input_grad, atmoe_node *xn,
                                  atmoe_node *tn, atmoe_node *loss)
{
    atmoe_graph *g = NULL;
    OK(atmoe_graph_new(CTX, &g));
    size_t T = p->T, dout = p->L[p->n - 1].m.d_out;
    *xn = input2(g, "x", ATMOE_DTYPE_F32, T, p->L[0].m.d_in, 1);
    *tn = input2(g, "target", ATMOE_DTYPE_F32, T, dout, 1);
    if (input_grad)
        OK(atmoe_graph_set_trainable(g, *xn, 1));
    atmoe_node h = *xn;
    for (size_t l = 0; l < p->n; l++) {
        tlayer_graph(&p->L[l], g, h);
        h = p->L[l].y;
    }
    OK(atmoe_graph_loss_mse(g, h, *tn, loss));
    OK(atmoe_graph_backward(g, *loss));
    OK(atmoe_graph_plan(g, 0));
    return g;
}

static void problem_set(atmoe_graph *g, const problem *p, atmoe_node xn,
                        atmoe_node tn)
{
    size_t T = p->T;
    OK(atmoe_graph_set_input(g, xn, p->x,
                             T * p->L[0].m.d_in * sizeof(float), T));
    OK(atmoe_graph_set_input(g, tn, p->target,
                             T * p->L[p->n - 1].m.d_out * sizeof(float), T));
}

static float read_loss(atmoe_graph *g, atmoe_node loss)
{
    float v = NAN;
    OK(atmoe_graph_read(g, loss, &v, sizeof v));
    return v;
}

/* The gradient check of one layer configured by setup (masks, fixed
 * weights), or of two stacked layers with the input's gradient. */
static void run_grad_case(atmoe_router_form form, int topk_g, int topk_e,
                          void (*setup)(tlayer *), int stacked)
{
    tlayer L[2];
    problem p = {.L = L, .n = stacked ? 2 : 1, .T = 7};
    tlayer_init(&L[0], 13, stacked ? 9 : 11, form, topk_g, topk_e, "l0");
    if (stacked)
        tlayer_init(&L[1], 9, 11, form, topk_g, topk_e, "l1");
    if (setup)
        setup(&L[0]);
    p.x = alloc_uniform(p.T * 13, -1, 1);
    p.target = alloc_uniform(p.T * 11, -1, 1);

    atmoe_node xn, tn, loss;
    atmoe_graph *g = problem_graph(&p, stacked, &xn, &tn, &loss);
    problem_set(g, &p, xn, tn);
    OK(atmoe_graph_compute(g, 0));
    double lref = ref_mse(&p);
    float lgot = read_loss(g, loss);
    ck_assert_msg(fabs(lgot - lref) <= 1e-5 * fabs(lref),
                  "loss %.9g, reference %.9g", lgot, lref);
    for (size_t l = 0; l < p.n; l++)
        check_layer_grads(g, &p, &L[l]);
    if (stacked) {
        atmoe_node gx;
        OK(atmoe_graph_get_grad(g, xn, &gx));
        float *got = read_out(g, gx, p.T * 13);
        double *want = fd_grad(&p, p.x, p.T * 13);
        expect_grad("dx", got, want, p.T * 13, TOL_GRAD);
        free(got);
        free(want);
    }
    atmoe_graph_free(g);
    for (size_t l = 0; l < p.n; l++)
        tlayer_free(&L[l]);
    free(p.x);
    free(p.target);
}

START_TEST(test_grad_projected)
{
    run_grad_case(ATMOE_ROUTER_PROJECTED, 0, 0, NULL, 0);
}
END_TEST

START_TEST(test_grad_projected_c1)
{
    LAYER_C = 1.0f;
    run_grad_case(ATMOE_ROUTER_PROJECTED, 0, 0, NULL, 0);
    LAYER_C = 0.7f;
}
END_TEST

START_TEST(test_grad_scaled)
{
    run_grad_case(ATMOE_ROUTER_SCALED, 0, 0, NULL, 0);
}
END_TEST

/* One group of two kept: w_g gets exact zeros. */
START_TEST(test_grad_topk)
{
    run_grad_case(ATMOE_ROUTER_PROJECTED, 1, 2, NULL, 0);
}
END_TEST

/* Two groups of three kept, two experts of each (of 3, 2 and 1). */
START_TEST(test_grad_topk_groups)
{
    THREE_GROUPS = 1;
    run_grad_case(ATMOE_ROUTER_SCALED, 2, 2, NULL, 0);
    THREE_GROUPS = 0;
}
END_TEST

/* Expert 1 of group 1 masked, expert 0 of group 0 fixed at 0.3. */
static void mask_and_fix(tlayer *L)
{
    OK(atmoe_router_set_mask(L->router, 1, 1, 0));
    L->rc.emask[1 * MAXM + 1] = 0;
    OK(atmoe_router_set_fixed(L->router, 0, 0, 0.3f));
    L->rc.efix[0 * MAXM + 0] = 0.3f;
}

START_TEST(test_grad_mask_fixed)
{
    run_grad_case(ATMOE_ROUTER_SCALED, 0, 0, mask_and_fix, 0);
}
END_TEST

START_TEST(test_grad_stacked)
{
    LAYER_C = 1.0f;
    run_grad_case(ATMOE_ROUTER_PROJECTED, 0, 2, NULL, 1);
    LAYER_C = 0.7f;
}
END_TEST

/* --------------------------------------------------------- the learner */

/* A student of the teacher's shapes from other random weights. */
typedef struct fit {
    tlayer L;
    problem p;
    atmoe_graph *g;
    atmoe_node xn, tn, loss;
} fit;

/* The 24 -> 24 layer, 4 experts in 2 groups of rank 3. */
static void fit_layer(tlayer *L, const char *name)
{
    static const int grp[4] = {0, 0, 1, 1};
    static const size_t rk[4] = {3, 3, 3, 3};
    memset(L, 0, sizeof *L);
    model_init(&L->m, 24, 24, 4, grp, rk, NULL);
    L->set = model_build(&L->m);
    L->router = router_make(L->set, &L->rc, ATMOE_ROUTER_PROJECTED, 1.0f,
                            1.0f, 0, 0);
    L->w0 = alloc_uniform(24 * 24, -0.3, 0.3);
    L->bias = alloc_uniform(24, -0.3, 0.3);
    L->wg = alloc_uniform(24 * 2, -1, 1);
    L->wd_count = 24 * 4;
    L->wd = alloc_uniform(L->wd_count, -1, 1);
    L->c = 1.0f;
    snprintf(L->name, sizeof L->name, "%s", name);
}

/* Students start from the teacher's base (frozen, shared) and their own
 * experts and router, made small so that they begin far from it. */
static void fit_init(fit *f, const tlayer *teacher, float *x,
                     float *target, size_t T)
{
    fit_layer(&f->L, "s");
    memcpy(f->L.w0, teacher->w0, 24 * 24 * sizeof(float));
    memcpy(f->L.bias, teacher->bias, 24 * sizeof(float));
    f->p = (problem){.L = &f->L, .n = 1, .T = T, .x = x, .target = target};
    f->g = problem_graph(&f->p, 0, &f->xn, &f->tn, &f->loss);
    problem_set(f->g, &f->p, f->xn, f->tn);
}

static void fit_free(fit *f)
{
    atmoe_graph_free(f->g);
    tlayer_free(&f->L);
}

/* T tokens, the teacher's targets (float64 forward, rounded). */
static float *teacher_targets(const tlayer *teacher, const float *x,
                              size_t T)
{
    double *xd = to_double(x, T * 24);
    double *y = alloc_d(T * 24);
    ref_layer(teacher, xd, T, y);
    float *t = malloc(T * 24 * sizeof *t);
    ck_assert_ptr_nonnull(t);
    for (size_t i = 0; i < T * 24; i++)
        t[i] = (float)y[i];
    free(xd);
    free(y);
    return t;
}

/* The loss must fall by FIT_FACTOR within FIT_STEPS full-batch AdamW
 * steps (140 of them on PoCL, from a loss of 4.2). */
#define FIT_T 61
#define FIT_STEPS 300
#define FIT_FACTOR 10.0

START_TEST(test_learns_teacher)
{
    tlayer teacher;
    fit_layer(&teacher, "t");
    float *x = alloc_uniform(FIT_T * 24, -1, 1);
    float *target = teacher_targets(&teacher, x, FIT_T);
    fit f;
    fit_init(&f, &teacher, x, target, FIT_T);

    atmoe_optimizer_config cfg;
    OK(atmoe_optimizer_config_default(&cfg));
    cfg.lr = 1e-2f;
    cfg.weight_decay = 0.0f;
    atmoe_optimizer *opt = NULL;
    OK(atmoe_optimizer_new(f.g, &cfg, &opt));
    float first = NAN, last = NAN;
    int steps = 0;
    for (; steps < FIT_STEPS; steps++) {
        OK(atmoe_graph_compute(f.g, 0));
        last = read_loss(f.g, f.loss);
        ck_assert_msg(isfinite(last), "step %d: loss %g", steps, last);
        if (steps == 0)
            first = last;
        if (last * FIT_FACTOR <= first)
            break;
        atmoe_optimizer_report rep;
        OK(atmoe_optimizer_step(opt, last, &rep));
        ck_assert_uint_eq(rep.step, (uint64_t)steps + 1);
    }
    ck_assert_msg(last * FIT_FACTOR <= first,
                  "the loss fell from %g to %g in %d steps, not by %gx",
                  first, last, steps, FIT_FACTOR);
    atmoe_optimizer_free(opt);
    fit_free(&f);
    tlayer_free(&teacher);
    free(x);
    free(target);
}
END_TEST

/* ------------------------------------------------- checkpoint and resume */

#define RUN_T 23
#define RUN_STEPS 10
#define RUN_SPLIT 6

/* Step `step` of a run: two micro-batches (the first 12 and the last 11
 * tokens), accumulated, then AdamW with clipping. */
static void run_step(fit *f, atmoe_optimizer *opt)
{
    size_t half = 12, rest = RUN_T - 12;
    float lsum = 0.0f;
    for (int mb = 0; mb < 2; mb++) {
        size_t off = mb ? half : 0, rows = mb ? rest : half;
        OK(atmoe_graph_set_input(f->g, f->xn, f->p.x + off * 24,
                                 rows * 24 * sizeof(float), rows));
        OK(atmoe_graph_set_input(f->g, f->tn, f->p.target + off * 24,
                                 rows * 24 * sizeof(float), rows));
        OK(atmoe_graph_compute(f->g, rows));
        lsum += read_loss(f->g, f->loss);
        OK(atmoe_optimizer_accumulate(opt));
    }
    atmoe_optimizer_report rep;
    OK(atmoe_optimizer_step(opt, lsum / 2.0f, &rep));
}

static void read_all(atmoe_graph *g, float **vals, size_t *n)
{
    size_t count;
    OK(atmoe_graph_get_trainable_count(g, &count));
    *n = 0;
    for (size_t i = 0; i < count; i++) {
        atmoe_trainable_info info;
        OK(atmoe_graph_get_trainable(g, i, &info));
        vals[i] = malloc(info.count * sizeof(float));
        ck_assert_ptr_nonnull(vals[i]);
        OK(atmoe_graph_read_trainable(g, info.name, vals[i], info.count));
        *n = count;
    }
}

static atmoe_optimizer *run_optimizer(fit *f)
{
    atmoe_optimizer_config cfg;
    OK(atmoe_optimizer_config_default(&cfg));
    cfg.lr = 5e-3f;
    cfg.max_grad_norm = 0.05f; /* well under the norm: clips every step */
    cfg.accumulation = 2;
    cfg.schedule = ATMOE_SCHEDULE_COSINE;
    cfg.warmup_steps = 3;
    cfg.total_steps = 12;
    cfg.min_lr = 1e-4f;
    atmoe_optimizer *opt = NULL;
    OK(atmoe_optimizer_new(f->g, &cfg, &opt));
    return opt;
}

START_TEST(test_resume_bit_for_bit)
{
    tlayer teacher;
    fit_layer(&teacher, "t");
    float *x = alloc_uniform(RUN_T * 24, -1, 1);
    float *target = teacher_targets(&teacher, x, RUN_T);
    char dir[256], path[300];
    test_mkdtemp(dir, sizeof dir, "training");
    snprintf(path, sizeof path, "%s/ckpt.safetensors", dir);

    /* Uninterrupted. */
    fit a;
    test_rng start = RNG; /* b starts from a's weights */
    fit_init(&a, &teacher, x, target, RUN_T);
    atmoe_optimizer *oa = run_optimizer(&a);
    float *v0[64];
    size_t n0;
    read_all(a.g, v0, &n0);
    for (int s = 0; s < RUN_STEPS; s++)
        run_step(&a, oa);
    float *va[64];
    size_t na;
    read_all(a.g, va, &na);

    /* Stopped after RUN_SPLIT steps, saved, and resumed in a new graph
     * whose own weights are other random values until the load. */
    fit b;
    RNG = start;
    fit_init(&b, &teacher, x, target, RUN_T);
    atmoe_optimizer *ob = run_optimizer(&b);
    for (int s = 0; s < RUN_SPLIT; s++)
        run_step(&b, ob);
    OK(atmoe_optimizer_save(ob, path));
    atmoe_optimizer_free(ob);
    fit_free(&b);

    /* c gets a's scales (alpha) and frozen weights; its trainables are
     * the checkpoint's.  They are overwritten first to show that. */
    fit c;
    RNG = start;
    fit_init(&c, &teacher, x, target, RUN_T);
    atmoe_optimizer *oc = run_optimizer(&c);
    size_t count;
    OK(atmoe_graph_get_trainable_count(c.g, &count));
    for (size_t i = 0; i < count; i++) {
        atmoe_trainable_info info;
        OK(atmoe_graph_get_trainable(c.g, i, &info));
        float *junk = alloc_uniform(info.count, -3, 3);
        OK(atmoe_graph_write_trainable(c.g, info.name, junk, info.count));
        free(junk);
    }
    OK(atmoe_optimizer_load(oc, path));
    for (int s = RUN_SPLIT; s < RUN_STEPS; s++)
        run_step(&c, oc);
    float *vc[64];
    size_t nc;
    read_all(c.g, vc, &nc);
    ck_assert_uint_eq(na, nc);
    ck_assert_uint_gt(na, 0);
    for (size_t i = 0; i < na; i++) {
        atmoe_trainable_info info;
        OK(atmoe_graph_get_trainable(a.g, i, &info));
        ck_assert_msg(memcmp(va[i], vc[i], info.count * sizeof(float)) == 0,
                      "%s differs after the resume", info.name);
        /* ... and the ten steps moved every weight. */
        for (size_t k = 0; k < info.count; k++)
            ck_assert_msg(va[i][k] != v0[i][k], "%s[%zu] did not move",
                          info.name, k);
        free(v0[i]);
        free(va[i]);
        free(vc[i]);
    }
    atmoe_optimizer_free(oa);
    atmoe_optimizer_free(oc);

    /* A checkpoint of another graph: a two-layer one. */
    tlayer L2[2];
    problem p2 = {.L = L2, .n = 2, .T = 7};
    tlayer_init(&L2[0], 13, 9, ATMOE_ROUTER_PROJECTED, 0, 0, "l0");
    tlayer_init(&L2[1], 9, 11, ATMOE_ROUTER_PROJECTED, 0, 0, "l1");
    atmoe_node xn, tn, loss;
    atmoe_graph *g2 = problem_graph(&p2, 0, &xn, &tn, &loss);
    atmoe_optimizer *o2 = NULL;
    atmoe_optimizer_config cfg;
    OK(atmoe_optimizer_config_default(&cfg));
    OK(atmoe_optimizer_new(g2, &cfg, &o2));
    atmoe_status st = atmoe_optimizer_load(o2, path);
    ck_assert_msg(st == ATMOE_STATUS_FORMAT_ERROR ||
                      st == ATMOE_STATUS_SHAPE_MISMATCH,
                  "another graph's checkpoint: %s", atmoe_status_name(st));
    ck_assert_str_ne(atmoe_errmsg(CTX), "");
    atmoe_optimizer_free(o2);
    atmoe_graph_free(g2);
    tlayer_free(&L2[0]);
    tlayer_free(&L2[1]);

    fit_free(&a);
    fit_free(&c);
    test_rmdir_r(dir);
    tlayer_free(&teacher);
    free(x);
    free(target);
}
END_TEST

/* ----------------------------------------------------- host allocations */

START_TEST(test_no_host_allocations)
{
    tlayer teacher;
    fit_layer(&teacher, "t");
    float *x = alloc_uniform(RUN_T * 24, -1, 1);
    float *target = teacher_targets(&teacher, x, RUN_T);
    fit f;
    fit_init(&f, &teacher, x, target, RUN_T);
    atmoe_optimizer_config cfg;
    OK(atmoe_optimizer_config_default(&cfg));
    cfg.max_grad_norm = 0.05f;
    atmoe_optimizer *opt = NULL;
    OK(atmoe_optimizer_new(f.g, &cfg, &opt));
    /* The first step is not special either: count from the start. */
    atmoe_memory_stats m0, m1;
    OK(atmoe_context_get_memory_stats(CTX, &m0));
    for (int s = 0; s < 3; s++) {
        uint64_t a0 = atm_alloc_count();
        OK(atmoe_graph_compute(f.g, 0));
        float loss = read_loss(f.g, f.loss);
        atmoe_optimizer_report rep;
        OK(atmoe_optimizer_step(opt, loss, &rep));
        uint64_t made = atm_alloc_count() - a0;
        ck_assert_msg(made == 0,
                      "step %d: compute, read and step made %llu host "
                      "allocations", s, (unsigned long long)made);
        ck_assert_float_lt(rep.clip, 1.0f); /* the clipping path ran */
        atmoe_compute_stats cs;
        OK(atmoe_graph_get_compute_stats(f.g, &cs));
        ck_assert_uint_eq(cs.host_allocations, 0);
    }
    OK(atmoe_context_get_memory_stats(CTX, &m1));
    ck_assert_uint_eq(m1.allocations, m0.allocations);
    atmoe_optimizer_free(opt);
    fit_free(&f);
    tlayer_free(&teacher);
    free(x);
    free(target);
}
END_TEST

/* ------------------------------------------------ the load-balance loss */

/* mse + 0.5 * load_balance(router weights): the balance term changes the
 * router's gradients (by its finite differences), and the experts' are
 * those of the MSE alone (the balance loss does not reach them). */
static double lb_ref(const problem *p, double weight)
{
    const tlayer *L = p->L;
    size_t T = p->T, E = (size_t)L->m.n;
    double *xd = to_double(p->x, T * L->m.d_in);
    double *a = alloc_d(T * (size_t)L->m.G);
    double *d = alloc_d(T * (size_t)(L->m.G * L->m.M));
    double *w = alloc_d(T * E);
    ref_router(&L->m, &L->rc, xd, T, L->wg, L->wd, a, d, w);
    double f[MAXE] = {0}, P[MAXE] = {0};
    for (size_t t = 0; t < T; t++) {
        size_t best = 0;
        for (size_t e = 1; e < E; e++)
            if (w[t * E + e] > w[t * E + best])
                best = e;
        f[best] += 1.0 / (double)T;
        for (size_t e = 0; e < E; e++)
            P[e] += w[t * E + e] / (double)T;
    }
    double lb = 0.0;
    for (size_t e = 0; e < E; e++)
        lb += f[e] * P[e];
    lb *= (double)E;
    free(xd);
    free(a);
    free(d);
    free(w);
    return ref_mse(p) + weight * lb;
}

static double *lb_fd(const problem *p, float *v, size_t n, double weight)
{
    double *gr = alloc_d(n);
    for (size_t i = 0; i < n; i++) {
        float v0 = v[i];
        float hi = (float)(v0 + FD_H), lo = (float)(v0 - FD_H);
        v[i] = hi;
        double lp = lb_ref(p, weight);
        v[i] = lo;
        double lm = lb_ref(p, weight);
        v[i] = v0;
        gr[i] = (lp - lm) / ((double)hi - (double)lo);
    }
    return gr;
}

START_TEST(test_load_balance_into_router)
{
    const double weight = 0.5;
    tlayer L;
    problem p = {.L = &L, .n = 1, .T = 7};
    tlayer_init(&L, 13, 11, ATMOE_ROUTER_PROJECTED, 0, 0, "l0");
    p.x = alloc_uniform(p.T * 13, -1, 1);
    p.target = alloc_uniform(p.T * 11, -1, 1);

    atmoe_graph *g = NULL;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node xn = input2(g, "x", ATMOE_DTYPE_F32, p.T, 13, 1);
    atmoe_node tn = input2(g, "target", ATMOE_DTYPE_F32, p.T, 11, 1);
    tlayer_graph(&L, g, xn);
    atmoe_node w = L.w;
    atmoe_node mse, lb, lbw, loss;
    OK(atmoe_graph_loss_mse(g, L.y, tn, &mse));
    OK(atmoe_graph_loss_load_balance(g, w, &lb));
    OK(atmoe_graph_scale(g, lb, (float)weight, &lbw));
    OK(atmoe_graph_add(g, mse, lbw, &loss));
    OK(atmoe_graph_backward(g, loss));
    OK(atmoe_graph_plan(g, 0));
    problem_set(g, &p, xn, tn);
    OK(atmoe_graph_compute(g, 0));
    double lref = lb_ref(&p, weight);
    float lgot = read_loss(g, loss);
    ck_assert_msg(fabs(lgot - lref) <= 1e-5 * fabs(lref),
                  "loss %.9g, reference %.9g", lgot, lref);

    size_t nwg = 13 * (size_t)L.m.G;
    float *got = grad_of(g, "l0.w_g", nwg);
    double *want = lb_fd(&p, L.wg, nwg, weight);
    double *mse_only = fd_grad(&p, L.wg, nwg);
    expect_grad("w_g (mse + lb)", got, want, nwg, TOL_GRAD);
    double diff = 0.0, scale = 0.0;
    for (size_t i = 0; i < nwg; i++) {
        diff = fmax(diff, fabs(want[i] - mse_only[i]));
        scale = fmax(scale, fabs(want[i]));
    }
    ck_assert_msg(diff > 10 * TOL_GRAD * scale,
                  "the balance term hardly changes w_g's gradient (%g)",
                  diff);
    free(got);
    free(want);
    free(mse_only);
    got = grad_of(g, "l0.w_d", L.wd_count);
    want = lb_fd(&p, L.wd, L.wd_count, weight);
    expect_grad("w_d (mse + lb)", got, want, L.wd_count, TOL_GRAD);
    free(got);
    free(want);

    atmoe_graph_free(g);
    tlayer_free(&L);
    free(p.x);
    free(p.target);
}
END_TEST

/* ------------------------------------------------------------ bad input */

START_TEST(test_bad_input)
{
    atmoe_graph *g = NULL;
    OK(atmoe_graph_new(CTX, &g));
    atmoe_node x = input2(g, "x", ATMOE_DTYPE_F32, 7, 5, 1);
    atmoe_node t = input2(g, "t", ATMOE_DTYPE_F32, 7, 5, 1);
    atmoe_node loss, s;
    OK(atmoe_graph_loss_mse(g, x, t, &loss));
    /* Nothing trainable. */
    ck_assert_fails(atmoe_graph_backward(g, loss), CTX,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    /* A loss that is not a scalar. */
    OK(atmoe_graph_set_trainable(g, x, 1));
    OK(atmoe_graph_scale(g, x, 2.0f, &s));
    ck_assert_fails(atmoe_graph_backward(g, s), CTX,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    /* Mismatched shapes of a loss. */
    atmoe_node t2 = input2(g, "t2", ATMOE_DTYPE_F32, 7, 4, 1), l2;
    ck_assert_fails(atmoe_graph_loss_mse(g, x, t2, &l2), CTX,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    OK(atmoe_graph_backward(g, loss));
    OK(atmoe_graph_plan(g, 0));

    /* The optimiser's configuration. */
    atmoe_optimizer_config cfg;
    atmoe_optimizer *opt = NULL;
    OK(atmoe_optimizer_config_default(&cfg));
    cfg.lr = 0.0f;
    ck_assert_fails(atmoe_optimizer_new(g, &cfg, &opt), CTX,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    cfg.lr = -1e-3f;
    ck_assert_fails(atmoe_optimizer_new(g, &cfg, &opt), CTX,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    OK(atmoe_optimizer_config_default(&cfg));
    cfg.beta1 = 1.0f;
    ck_assert_fails(atmoe_optimizer_new(g, &cfg, &opt), CTX,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    cfg.beta1 = -0.1f;
    ck_assert_fails(atmoe_optimizer_new(g, &cfg, &opt), CTX,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    OK(atmoe_optimizer_config_default(&cfg));
    cfg.beta2 = 1.5f;
    ck_assert_fails(atmoe_optimizer_new(g, &cfg, &opt), CTX,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    ck_assert_ptr_null(opt);
    atmoe_graph_free(g);
}
END_TEST

static void setup(void)
{
    CTX = test_context();
    test_rng_seed(&RNG, 0x7a1e5eedULL);
}

static void teardown(void)
{
    atmoe_context_free(CTX);
    CTX = NULL;
}

static Suite *training_suite(void)
{
    Suite *s = suite_create("training");
    TCase *tc = tcase_create("gradients");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_grad_projected);
    tcase_add_test(tc, test_grad_projected_c1);
    tcase_add_test(tc, test_grad_scaled);
    tcase_add_test(tc, test_grad_topk);
    tcase_add_test(tc, test_grad_topk_groups);
    tcase_add_test(tc, test_grad_mask_fixed);
    tcase_add_test(tc, test_grad_stacked);
    tcase_add_test(tc, test_load_balance_into_router);
    suite_add_tcase(s, tc);
    tc = tcase_create("optimiser");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_learns_teacher);
    tcase_add_test(tc, test_resume_bit_for_bit);
    tcase_add_test(tc, test_no_host_allocations);
    tcase_add_test(tc, test_bad_input);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(training_suite());
}
