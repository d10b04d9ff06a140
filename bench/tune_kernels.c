/* atmoe-tune: the library's own tunable kernels, one row each, and the
 * search that every row gets (see tune_kernels.h):
 *
 *   router        "router" WG and LPI: the items that share a row's dot
 *                 products in cl/router.cl and the logits each pass over
 *                 the row computes (the projected router over 8 experts)
 *   mixture       "mixture" WG, VW and TPI: the work-groups of
 *                 cl/mixture.cl's mix and fold launches and the channels
 *                 and tokens of a mix item (the block mix of 8 experts of
 *                 rank 16 in a narrow layer, and its merge path, which
 *                 folds them into W0)
 *   linear.group  "linear" GROUP_SIZE and GROUP_ROWS of the group variant,
 *                 cl/linear_gpu.cl (run as VARIANT 1 for every batch)
 *   mixture.fused "mixture" FUSED_GS, FUSED_ROWS and FUSED_MAX_TOKENS of
 *                 the fused small-batch variant (run as VARIANT 1)
 *   linear.tile   "linear" TILE_TOKENS, TILE_ROWS, TILE_K, TILE_WT and
 *                 TILE_WR of the tile variant, cl/linear_tile.cl (run for
 *                 every batch); these two are skipped on CPU devices, whose
 *                 defaults leave the variants off
 *   kmeans        "kmeans" WG: the passes of cl/kmeans.cl (atmoe_kmeans)
 *   optimizer     "optimizer" WG: the element-wise updates of
 *                 cl/optimizer.cl (an AdamW step)
 *
 * The search: the reference configuration (the library's defaults, which
 * its tests check against float64) runs every shape once, its outputs
 * become the reference and its times the baseline; then the candidates,
 * every combination of the row's values that the device can run, in a
 * random order from --seed, until the deadline (one at least).  A
 * candidate counts only when every shape's output matches the reference
 * within the row's tolerance (a poisoned buffer is read back, so an
 * element left unwritten fails); its time per shape is the median of
 * --runs runs after that checked first run.  The best by the geometric
 * mean of its speed-ups is kept only when it is at least MIN_GAIN faster
 * and, timed again after the reference, still is and slows no shape by
 * more than NO_HARM.  Each candidate is written into the checkpoint's
 * journal before it runs (tune_effort.c), so that one that crashes or
 * hangs the process is skipped when the step runs again. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "measure.h"
#include "tune_effort.h"
#include "tune_kernels.h"

#define PROGRAM "atmoe-tune"
#define MIN_GAIN 1.03
#define NO_HARM 1.10
#define PRUNE_FACTOR 2.0
#define MIN_SAMPLE_S 0.1
#define MAX_CANDIDATES 1024
#define MAX_RUNS 64

/* The mixture the router and mixture workloads run: 8 experts in 4
 * groups of rank 16, as the linear phases' (atmoe-tune.c). */
#define MIX_EXPERTS 8
#define MIX_GROUPS 4
#define MIX_RANK 16
#define MIX_ALPHA (2.0f * MIX_RANK)
/* The width of the mixture row's mix shapes, and the batch of its merged
 * shapes, a decode's, where folding the experts into W0 is a good part of
 * the work (see mix_setup_as). */
#define MIX_NARROW 16
#define MIX_MERGE_T 16
/* The widths a workload holds at most: the narrow one and the sizes'. */
#define MIX_WIDTHS 3

static int quiet;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    if (quiet)
        return;
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static float draw(const tk_env *env)
{
    return (float)uniform(env->rng);
}

/* ------------------------------------------------------------ workloads */

/* The router, the mixture and the group variant: per width d (1024 for
 * --sizes small, 4096 for full) a base weight and an expert set, and per
 * batch T of the row an input. */
typedef struct mix_work {
    atmoe_context *ctx;
    int router; /* the router's graph, else the mixture's */
    int nd;
    size_t d[MIX_WIDTHS];
    atmoe_tensor *w0[MIX_WIDTHS], *wg[MIX_WIDTHS], *wd[MIX_WIDTHS];
    atmoe_experts *set[MIX_WIDTHS];
    atmoe_router *rt[MIX_WIDTHS];
    struct {
        int k; /* its width's index */
        int merged; /* one gate row for every token, the merge path */
        size_t t;
        float *x, *gates;
        atmoe_graph *g;
        atmoe_node y;
    } s[TK_MAX_SHAPES];
    int ns;
} mix_work;

static int mix_fail(const mix_work *w, atmoe_status st, const char *what)
{
    fprintf(stderr, PROGRAM ": %s: %s: %s\n", what, atmoe_status_name(st),
            atmoe_errmsg(w->ctx));
    return -1;
}

static float *random_floats(const tk_env *env, size_t n, float scale)
{
    float *v = malloc(n * sizeof *v);
    if (v == NULL) {
        fprintf(stderr, PROGRAM ": out of host memory\n");
        return NULL;
    }
    for (size_t i = 0; i < n; i++)
        v[i] = scale * draw(env);
    return v;
}

/* A tensor of shape dims holding random values times scale. */
static atmoe_status random_tensor(const tk_env *env, int ndim,
                                  const size_t *dims, float scale,
                                  atmoe_tensor **t)
{
    size_t n = 1;
    for (int i = 0; i < ndim; i++)
        n *= dims[i];
    float *v = random_floats(env, n, scale);
    if (v == NULL)
        return ATMOE_STATUS_HOST_OUT_OF_MEMORY;
    atmoe_status st = atmoe_tensor_new(env->ctx, ATMOE_DTYPE_F32, ndim, dims,
                                       t);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_tensor_write(*t, v, n * sizeof *v);
    free(v);
    return st;
}

/* merge: the mix's shapes (the row's batches) in a layer MIX_NARROW
 * wide, where the mix kernel's own time is most of the layer's (its work
 * is T x the total rank, whatever d: at d = 4096 the products around it
 * take a thousand times longer and would drown its candidates' gains in
 * their noise), and per width of the sizes a shape on the merge path at
 * MIX_MERGE_T tokens (the experts folded into a copy of W0 under one gate
 * row, fold_gates, which the same work-groups run). */
static int mix_setup_as(const tk_env *env, const tk_kernel *row, void **state,
                        char names[][48], size_t *out_count, int router,
                        int merge)
{
    mix_work *w = calloc(1, sizeof *w);
    *state = w;
    if (w == NULL)
        return -1;
    w->ctx = env->ctx;
    w->router = router;
    if (merge)
        w->d[w->nd++] = MIX_NARROW;
    if (env->small)
        w->d[w->nd++] = 1024;
    if (env->full)
        w->d[w->nd++] = 4096;
    atmoe_status st;
    for (int k = 0; k < w->nd; k++) {
        size_t d = w->d[k], wd[2] = {d, d};
        size_t na = (size_t)MIX_EXPERTS * MIX_RANK * d;
        float *a = random_floats(env, na, 1.0f / sqrtf((float)d));
        float *b = random_floats(env, na, 1.0f / sqrtf(MIX_RANK));
        if (a == NULL || b == NULL) {
            free(a);
            free(b);
            return -1;
        }
        st = random_tensor(env, 2, wd, 1.0f / sqrtf((float)d), &w->w0[k]);
        if (st == ATMOE_STATUS_OK)
            st = atmoe_experts_new(env->ctx, d, d, &w->set[k]);
        for (int e = 0; e < MIX_EXPERTS && st == ATMOE_STATUS_OK; e++)
            st = atmoe_experts_add(w->set[k], e / (MIX_EXPERTS / MIX_GROUPS),
                                   MIX_RANK, a + (size_t)e * MIX_RANK * d,
                                   b + (size_t)e * d * MIX_RANK, MIX_ALPHA, 0,
                                   NULL);
        free(a);
        free(b);
        if (st != ATMOE_STATUS_OK)
            return mix_fail(w, st, "making the mixture's weights");
        if (router) {
            size_t sg[2] = {d, MIX_GROUPS}, sd[2] = {d, MIX_EXPERTS};
            if ((st = random_tensor(env, 2, sg, 1.0f / sqrtf((float)d),
                                    &w->wg[k])) ||
                (st = random_tensor(env, 2, sd, 1.0f / sqrtf((float)d),
                                    &w->wd[k])) ||
                (st = atmoe_router_new(w->set[k], ATMOE_ROUTER_PROJECTED,
                                       1.0f, 1.0f, 2, 0, &w->rt[k])))
                return mix_fail(w, st, "making the router");
        }
        /* With merge, the batches at the narrow width (k 0) and one
         * merged shape (j = nts) at each other. */
        int merged_only = merge && k > 0;
        int first = merged_only ? row->nts : 0;
        int last = merged_only ? row->nts + 1 : row->nts;
        for (int j = first; j < last && w->ns < TK_MAX_SHAPES; j++) {
            int i = w->ns++, merged = j == row->nts;
            size_t t = merged ? MIX_MERGE_T : row->ts[j];
            size_t rows = merged ? 1 : t;
            w->s[i].k = k;
            w->s[i].merged = merged;
            w->s[i].t = t;
            w->s[i].x = random_floats(env, t * d, 1.0f);
            w->s[i].gates = malloc(rows * MIX_EXPERTS * sizeof(float));
            if (w->s[i].x == NULL || w->s[i].gates == NULL)
                return -1;
            for (size_t g = 0; g < rows * MIX_EXPERTS; g++)
                w->s[i].gates[g] = (draw(env) + 1.0f) / (2.0f * MIX_EXPERTS);
            snprintf(names[i], 48, "T=%zu d=%zu%s", t, d,
                     merged ? " merged" : "");
            out_count[i] = t * (router ? MIX_EXPERTS : d);
        }
    }
    return w->ns;
}

static int mixture_setup(const tk_env *env, const tk_kernel *row,
                         void **state, char names[][48], size_t *out_count)
{
    return mix_setup_as(env, row, state, names, out_count, 0, 0);
}

static int merge_setup(const tk_env *env, const tk_kernel *row, void **state,
                       char names[][48], size_t *out_count)
{
    return mix_setup_as(env, row, state, names, out_count, 0, 1);
}

static int router_setup(const tk_env *env, const tk_kernel *row,
                        void **state, char names[][48], size_t *out_count)
{
    return mix_setup_as(env, row, state, names, out_count, 1, 0);
}

/* The mixture y = x W0^T + B_all M(gates) A_all x (block mix, a gate row
 * per token), or the router's expert weights of h = x; planned with the
 * parameters in force, its inputs set. */
static atmoe_status mix_prepare(void *state, int i)
{
    mix_work *w = state;
    int k = w->s[i].k;
    size_t t = w->s[i].t, d = w->d[k];
    size_t gr = w->s[i].merged ? 1 : t;
    size_t xs[2] = {t, d}, gs[2] = {gr, MIX_EXPERTS};
    atmoe_graph *g;
    atmoe_status st = atmoe_graph_new(w->ctx, &g);
    if (st != ATMOE_STATUS_OK)
        return st;
    atmoe_node x, gates = ATMOE_NODE_NONE, p0, p1;
    st = atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &x);
    if (st == ATMOE_STATUS_OK && w->router) {
        if ((st = atmoe_graph_parameter(g, "w_g", w->wg[k], &p0)) ||
            (st = atmoe_graph_parameter(g, "w_d", w->wd[k], &p1)))
            goto out;
        st = atmoe_graph_router(g, x, w->rt[k], p0, p1, NULL, NULL,
                                &w->s[i].y);
    } else if (st == ATMOE_STATUS_OK) {
        if ((st = atmoe_graph_input(g, "gates", ATMOE_DTYPE_F32, 2, gs, 0,
                                    &gates)) ||
            (st = atmoe_graph_parameter(g, "w0", w->w0[k], &p0)))
            goto out;
        st = atmoe_graph_mixture(g, x, p0, ATMOE_NODE_NONE, w->set[k],
                                 ATMOE_MIX_BLOCK, gates, ATMOE_NODE_NONE,
                                 1.0f, &w->s[i].y);
        if (st == ATMOE_STATUS_OK && w->s[i].merged)
            st = atmoe_graph_mixture_set_merge(g, w->s[i].y,
                                               ATMOE_MERGE_ALWAYS);
    }
    if (st || (st = atmoe_graph_mark_output(g, w->s[i].y)) ||
        (st = atmoe_graph_plan(g, 0)) ||
        (st = atmoe_graph_set_input(g, x, w->s[i].x, t * d * sizeof(float),
                                    0)))
        goto out;
    if (!w->router)
        st = atmoe_graph_set_input(g, gates, w->s[i].gates,
                                   gr * MIX_EXPERTS * sizeof(float), 0);
out:
    if (st != ATMOE_STATUS_OK)
        atmoe_graph_free(g);
    else
        w->s[i].g = g;
    return st;
}

static atmoe_status mix_run(void *state, int i)
{
    mix_work *w = state;
    atmoe_status st = atmoe_graph_compute(w->s[i].g, 0);
    return st ? st : atmoe_context_finish(w->ctx);
}

static atmoe_status mix_read(void *state, int i, float *out)
{
    mix_work *w = state;
    size_t n = w->s[i].t * (w->router ? MIX_EXPERTS : w->d[w->s[i].k]);
    return atmoe_graph_read(w->s[i].g, w->s[i].y, out, n * sizeof *out);
}

static void mix_release(void *state, int i)
{
    mix_work *w = state;
    atmoe_graph_free(w->s[i].g);
    w->s[i].g = NULL;
}

static void mix_teardown(void *state)
{
    mix_work *w = state;
    if (w == NULL)
        return;
    for (int i = 0; i < w->ns; i++) {
        atmoe_graph_free(w->s[i].g);
        free(w->s[i].x);
        free(w->s[i].gates);
    }
    for (int k = 0; k < MIX_WIDTHS; k++) {
        atmoe_router_free(w->rt[k]);
        atmoe_experts_free(w->set[k]);
        atmoe_tensor_free(w->w0[k]);
        atmoe_tensor_free(w->wg[k]);
        atmoe_tensor_free(w->wd[k]);
    }
    free(w);
}

static const tk_workload router_work = {router_setup, mix_prepare, mix_run,
                                        mix_read, mix_release, mix_teardown};
static const tk_workload mixture_work = {mixture_setup, mix_prepare, mix_run,
                                         mix_read, mix_release,
                                         mix_teardown};
static const tk_workload merge_work = {merge_setup, mix_prepare, mix_run,
                                       mix_read, mix_release, mix_teardown};

/* k-means: points [N, D] into K clusters, 8 Lloyd iterations from the
 * k-means++ seeding of a fixed seed (atmoe_kmeans); the output is the
 * centroids. */
typedef struct km_work {
    atmoe_context *ctx;
    struct {
        size_t n, d, k;
        atmoe_tensor *x, *c;
    } s[2];
    int ns;
} km_work;

static int kmeans_setup(const tk_env *env, const tk_kernel *row, void **state,
                        char names[][48], size_t *out_count)
{
    (void)row;
    static const size_t shapes[2][3] = {{8191, 61, 37}, {65521, 253, 61}};
    km_work *w = calloc(1, sizeof *w);
    *state = w;
    if (w == NULL)
        return -1;
    w->ctx = env->ctx;
    for (int j = 0; j < 2; j++) {
        if ((j == 0 && !env->small) || (j == 1 && !env->full))
            continue;
        int i = w->ns++;
        w->s[i].n = shapes[j][0];
        w->s[i].d = shapes[j][1];
        w->s[i].k = shapes[j][2];
        size_t xs[2] = {w->s[i].n, w->s[i].d}, cs[2] = {w->s[i].k, w->s[i].d};
        atmoe_status st = random_tensor(env, 2, xs, 1.0f, &w->s[i].x);
        if (st == ATMOE_STATUS_OK)
            st = atmoe_tensor_new(env->ctx, ATMOE_DTYPE_F32, 2, cs,
                                  &w->s[i].c);
        if (st != ATMOE_STATUS_OK) {
            fprintf(stderr, PROGRAM ": making k-means' points: %s\n",
                    atmoe_errmsg(env->ctx));
            return -1;
        }
        snprintf(names[i], 48, "N=%zu D=%zu K=%zu", w->s[i].n, w->s[i].d,
                 w->s[i].k);
        out_count[i] = w->s[i].k * w->s[i].d;
    }
    return w->ns;
}

static atmoe_status km_prepare(void *state, int i)
{
    km_work *w = state;
    return atmoe_tensor_fill(w->s[i].c, NAN);
}

static atmoe_status km_run(void *state, int i)
{
    km_work *w = state;
    atmoe_kmeans_options o;
    memset(&o, 0, sizeof o);
    o.k = w->s[i].k;
    o.seed = 1;
    o.restarts = 1;
    o.max_iterations = 8;
    o.tolerance = 0;
    return atmoe_kmeans(w->ctx, w->s[i].x, &o, w->s[i].c, NULL, NULL);
}

static atmoe_status km_read(void *state, int i, float *out)
{
    km_work *w = state;
    return atmoe_tensor_read(w->s[i].c, out,
                             w->s[i].k * w->s[i].d * sizeof *out);
}

static void km_release(void *state, int i)
{
    (void)state;
    (void)i;
}

static void km_teardown(void *state)
{
    km_work *w = state;
    if (w == NULL)
        return;
    for (int i = 0; i < w->ns; i++) {
        atmoe_tensor_free(w->s[i].x);
        atmoe_tensor_free(w->s[i].c);
    }
    free(w);
}

static const tk_workload kmeans_work = {kmeans_setup, km_prepare, km_run,
                                        km_read, km_release, km_teardown};

/* The optimiser: a weight W [r, c] fitted to a target by the mean squared
 * error, its gradient computed once; a run is one AdamW step on it, and
 * the output W after the first step from the same start. */
typedef struct opt_work {
    atmoe_context *ctx;
    struct {
        size_t r, c;
        float *w0;
        atmoe_tensor *w;
        atmoe_graph *g;
        atmoe_optimizer *opt;
    } s[2];
    int ns;
} opt_work;

static int optimizer_setup(const tk_env *env, const tk_kernel *row,
                           void **state, char names[][48], size_t *out_count)
{
    (void)row;
    static const size_t shapes[2][2] = {{1021, 1031}, {2039, 2053}};
    opt_work *w = calloc(1, sizeof *w);
    *state = w;
    if (w == NULL)
        return -1;
    w->ctx = env->ctx;
    for (int j = 0; j < 2; j++) {
        if ((j == 0 && !env->small) || (j == 1 && !env->full))
            continue;
        int i = w->ns++;
        size_t r = w->s[i].r = shapes[j][0], c = w->s[i].c = shapes[j][1];
        size_t dims[2] = {r, c};
        w->s[i].w0 = random_floats(env, r * c, 1.0f);
        float *target = random_floats(env, r * c, 1.0f);
        atmoe_status st = w->s[i].w0 && target
                              ? atmoe_tensor_new(env->ctx, ATMOE_DTYPE_F32,
                                                 2, dims, &w->s[i].w)
                              : ATMOE_STATUS_HOST_OUT_OF_MEMORY;
        atmoe_graph *g = NULL;
        atmoe_node wn, tn, loss;
        if (st == ATMOE_STATUS_OK &&
            (st = atmoe_graph_new(env->ctx, &g)) == ATMOE_STATUS_OK) {
            w->s[i].g = g;
            (void)((st = atmoe_graph_parameter(g, "w", w->s[i].w, &wn)) ||
                   (st = atmoe_graph_set_trainable(g, wn, 1)) ||
                   (st = atmoe_graph_input(g, "target", ATMOE_DTYPE_F32, 2,
                                           dims, 0, &tn)) ||
                   (st = atmoe_graph_loss_mse(g, wn, tn, &loss)) ||
                   (st = atmoe_graph_backward(g, loss)) ||
                   (st = atmoe_graph_plan(g, 0)) ||
                   (st = atmoe_graph_set_input(g, tn, target,
                                               r * c * sizeof *target, 0)));
        }
        free(target);
        if (st != ATMOE_STATUS_OK) {
            fprintf(stderr, PROGRAM ": making the optimiser's weight: %s\n",
                    atmoe_errmsg(env->ctx));
            return -1;
        }
        snprintf(names[i], 48, "AdamW %zux%zu", r, c);
        out_count[i] = r * c;
    }
    return w->ns;
}

/* W back at its start, its gradient computed, a new AdamW optimiser over
 * it (which reads the parameters in force at each launch). */
static atmoe_status opt_prepare(void *state, int i)
{
    opt_work *w = state;
    size_t n = w->s[i].r * w->s[i].c;
    atmoe_optimizer_config cfg;
    atmoe_status st;
    if ((st = atmoe_tensor_write(w->s[i].w, w->s[i].w0, n * sizeof(float))) ||
        (st = atmoe_graph_compute(w->s[i].g, 0)) ||
        (st = atmoe_optimizer_config_default(&cfg)))
        return st;
    return atmoe_optimizer_new(w->s[i].g, &cfg, &w->s[i].opt);
}

/* One step with the gradients of the last compute (accumulation 1); the
 * step waits for the gradient norm, the finish for the update. */
static atmoe_status opt_run(void *state, int i)
{
    opt_work *w = state;
    atmoe_status st = atmoe_optimizer_step(w->s[i].opt, 1.0f, NULL);
    return st ? st : atmoe_context_finish(w->ctx);
}

static atmoe_status opt_read(void *state, int i, float *out)
{
    opt_work *w = state;
    return atmoe_tensor_read(w->s[i].w, out,
                             w->s[i].r * w->s[i].c * sizeof *out);
}

static void opt_release(void *state, int i)
{
    opt_work *w = state;
    atmoe_optimizer_free(w->s[i].opt);
    w->s[i].opt = NULL;
}

static void opt_teardown(void *state)
{
    opt_work *w = state;
    if (w == NULL)
        return;
    for (int i = 0; i < w->ns; i++) {
        atmoe_optimizer_free(w->s[i].opt);
        atmoe_graph_free(w->s[i].g);
        atmoe_tensor_free(w->s[i].w);
        free(w->s[i].w0);
    }
    free(w);
}

static const tk_workload optimizer_work = {optimizer_setup, opt_prepare,
                                           opt_run, opt_read, opt_release,
                                           opt_teardown};

/* ---------------------------------------------------------- constraints */

/* A work-group size the device takes: the library rounds a larger one
 * down (atm_param_work_group), which would time another candidate's
 * launch again. */
static int fits_work_group(const int *v, const atmoe_device_info *dev,
                           char *why, size_t size)
{
    if ((size_t)v[0] <= dev->max_work_group_size)
        return 0;
    snprintf(why, size, "work-groups of %d, more than %s allows (%zu)", v[0],
             dev->name, dev->max_work_group_size);
    return -1;
}

/* The group variant (moe/linear.c): GROUP_SIZE items a work-group, and
 * GROUP_ROWS x 4 x GROUP_SIZE floats of local memory in at most half of
 * the device's, else the library halves the group (another candidate's
 * launch). */
static int fits_linear_group(const int *v, const atmoe_device_info *dev,
                             char *why, size_t size)
{
    if (fits_work_group(v, dev, why, size) != 0)
        return -1;
    unsigned long long local = 4ULL * (unsigned long long)v[1] * 4 *
                               (unsigned long long)v[0];
    if (local <= dev->local_mem_bytes / 2)
        return 0;
    snprintf(why, size, "%llu bytes of local memory, more than half of the "
             "%llu %s has", local, (unsigned long long)dev->local_mem_bytes,
             dev->name);
    return -1;
}

/* The tile variant (moe/linear.c's tile_fits): a work-item's block
 * divides the tile, its work-group and its two staging blocks of TILE_K
 * rows fit the device (else planning refuses it). */
static int fits_linear_tile(const int *v, const atmoe_device_info *dev,
                            char *why, size_t size)
{
    int tm = v[0], tn = v[1], tk = v[2], wm = v[3], wn = v[4];
    if (tm % wm != 0 || tn % wn != 0) {
        snprintf(why, size, "a block of %d x %d does not divide a tile of "
                 "%d x %d", wm, wn, tm, tn);
        return -1;
    }
    size_t items = (size_t)(tm / wm) * (size_t)(tn / wn);
    unsigned long long local = (unsigned long long)tk * (tm + 1 + tn + 1) *
                               sizeof(float);
    if (items <= dev->max_work_group_size && local <= dev->local_mem_bytes)
        return 0;
    snprintf(why, size, "%zu work-items and %llu bytes of local memory, more "
             "than %s has", items, local, dev->name);
    return -1;
}

/* ---------------------------------------------------------------- table */

#define POW2_TO_1024 {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024}
#define POW2_8_TO_512 {8, 16, 32, 64, 128, 256, 512}

/* A kernel with a tuned parameter (lib/device/params.h and tuning.c's
 * table) gets a row here: its name (a phase and --effort step), program,
 * parameters with the library's defaults and candidate lists, the macros
 * that make them apply (a variant), the device's constraints, a workload
 * (the mixture's and the router's take the batches to time) and a
 * tolerance.  A variant of the products times on the mixture as
 * linear.group does, with its VARIANT in fixed. */
static const size_t router_ts[] = {64, 512};
static const size_t mix_ts[] = {512, 4096};
static const size_t group_ts[] = {16, 64};
static const size_t fused_ts[] = {1, 16, 32};
static const size_t tile_ts[] = {64, 512};

static const tk_kernel rows[] = {
    {"router", "router",
     "the router's items per row and logits per pass (cl/router.cl)",
     {{"WG", 64, 64, {1, 16, 64, 256}, POW2_TO_1024},
      {"LPI", 1, 1, {1, 2, 4, 8}, {1, 2, 4, 8, 16, 32}}},
     NULL, fits_work_group, &router_work, router_ts, 2, 0, 1e-4, 0.2},
    {"mixture", "mixture",
     "the mix's work-groups, channels and tokens an item, and the fold's "
     "work-groups (cl/mixture.cl)",
     {{"WG", 64, 64, {64, 256}, POW2_TO_1024},
      {"VW", 1, 1, {1, 4, 8, 16}, {1, 2, 4, 8, 16}},
      {"TPI", 1, 1, {1, 4, 16}, {1, 2, 4, 8, 16, 32, 64}}},
     NULL, fits_work_group, &merge_work, mix_ts, 2, 0, 1e-4, 0.35},
    {"linear.group", "linear",
     "the group variant's work-groups (cl/linear_gpu.cl)",
     {{"GROUP_SIZE", 64, 128, {32, 64, 128, 256}, POW2_8_TO_512},
      {"GROUP_ROWS", 4, 4, {2, 4, 8}, {1, 2, 4, 8, 16}}},
     "{\"VARIANT\": 1, \"MAX_TOKENS\": 1048576}", fits_linear_group,
     &mixture_work, group_ts, 2, 0, 1e-4, 0.2},
    {"mixture.fused", "mixture",
     "the fused small-batch variant's groups, rows a group and largest "
     "batch (cl/mixture.cl's mixture_fused)",
     {{"FUSED_GS", 16, 128, {32, 64, 128, 256}, POW2_8_TO_512},
      {"FUSED_ROWS", 64, 64, {64, 256}, {64, 128, 256, 512, 1024}},
      {"FUSED_MAX_TOKENS", 16, 16, {8, 16, 32}, {4, 8, 16, 32, 64}}},
     "{\"VARIANT\": 1}", fits_work_group, &mixture_work, fused_ts, 3, 1,
     1e-4, 0.15},
    {"linear.tile", "linear",
     "the tile variant's outputs a group, k a chunk and a work-item's "
     "block (cl/linear_tile.cl)",
     {{"TILE_TOKENS", 64, 64, {32, 64}, {16, 32, 64, 128}},
      {"TILE_ROWS", 64, 64, {32, 64, 128}, {16, 32, 64, 128}},
      {"TILE_K", 16, 16, {8, 16, 32}, {4, 8, 16, 32, 64}},
      {"TILE_WT", 4, 4, {2, 4, 8}, {1, 2, 4, 8}},
      {"TILE_WR", 4, 4, {2, 4, 8}, {1, 2, 4, 8}}},
     "{\"TILE_MIN_TOKENS\": 1, \"MAX_TOKENS\": 1048576}", fits_linear_tile,
     &mixture_work, tile_ts, 2, 1, 1e-4, 0.25},
    {"kmeans", "kmeans", "k-means' passes (cl/kmeans.cl)",
     {{"WG", 64, 64, {16, 32, 128, 256}, POW2_TO_1024}},
     NULL, fits_work_group, &kmeans_work, NULL, 0, 0, 1e-5, 0.125},
    {"optimizer", "optimizer", "AdamW's updates (cl/optimizer.cl)",
     {{"WG", 64, 64, {16, 32, 128, 256}, POW2_TO_1024}},
     NULL, fits_work_group, &optimizer_work, NULL, 0, 0, 1e-6, 0.125},
};

int tk_count(void)
{
    return (int)(sizeof rows / sizeof rows[0]);
}

const tk_kernel *tk_at(int i)
{
    return i >= 0 && i < tk_count() ? &rows[i] : NULL;
}

const tk_kernel *tk_find(const char *name)
{
    for (int i = 0; i < tk_count(); i++)
        if (strcmp(rows[i].name, name) == 0)
            return &rows[i];
    return NULL;
}

/* --------------------------------------------------------------- search */

static int nparams(const tk_kernel *row)
{
    int n = 0;
    while (n < TK_MAX_PARAMS && row->params[n].name)
        n++;
    return n;
}

static int nvalues(const int *v)
{
    int n = 0;
    while (n < TK_MAX_VALUES && v[n] != 0)
        n++;
    return n;
}

/* "GROUP_SIZE=32,GROUP_ROWS=2": a candidate's name in the journal and the
 * progress lines. */
static void label_of(const tk_kernel *row, const int *v, char *out,
                     size_t size)
{
    size_t at = 0;
    out[0] = '\0';
    for (int p = 0; p < nparams(row) && at < size; p++)
        at += (size_t)snprintf(out + at, size - at, "%s%s=%d", p ? "," : "",
                               row->params[p].name, v[p]);
}

/* parent's object member key, made empty when it is missing or not an
 * object. */
static json_t *member_object(json_t *parent, const char *key)
{
    json_t *o = json_object_get(parent, key);
    if (!json_is_object(o)) {
        o = json_object();
        json_object_set_new(parent, key, o);
    }
    return o;
}

/* Applies the entry's kernels with row's parameters at v (and its fixed
 * macros). */
static atmoe_status apply(const tk_kernel *row, const tk_env *env,
                          const int *v)
{
    json_t *k = env->kernels_base ? json_deep_copy(env->kernels_base)
                                  : json_object();
    json_t *prog = member_object(k, row->program);
    if (row->fixed) {
        json_t *f = json_loads(row->fixed, 0, NULL);
        json_object_update(prog, f);
        json_decref(f);
    }
    for (int p = 0; p < nparams(row); p++)
        json_object_set_new(prog, row->params[p].name, json_integer(v[p]));
    json_t *set = json_pack("{s:o}", "kernels", k);
    char *text = set ? json_dumps(set, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(set);
    atmoe_status st = text ? atmoe_context_set_params(env->ctx, text)
                           : ATMOE_STATUS_HOST_OUT_OF_MEMORY;
    free(text);
    return st;
}

typedef struct search {
    const tk_kernel *row;
    const tk_env *env;
    const tk_workload *w;
    void *state;
    int ns;
    char names[TK_MAX_SHAPES][48];
    size_t count[TK_MAX_SHAPES];
    float *ref[TK_MAX_SHAPES], *out;
    double base_s[TK_MAX_SHAPES];
    int timed, wrong, failed, refused, skipped;
} search;

typedef enum { CAND_OK, CAND_SLOW, CAND_WRONG, CAND_FAILED } cand_result;

static double max_diff(const float *y, const float *ref, size_t n)
{
    double worst = 0, scale = 1e-30;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)y[i] - (double)ref[i]);
        if (!(d <= worst))
            worst = isnan(d) ? INFINITY : d;
        if (fabs((double)ref[i]) > scale)
            scale = fabs((double)ref[i]);
    }
    return worst / scale;
}

/* Shape i with the parameters in force: prepared, run once and checked
 * against the reference (or kept as the reference when there is none
 * yet), then timed; best is the fastest time known (0: none), past
 * PRUNE_FACTOR of which the first timed run ends it. */
static cand_result run_shape(search *s, int i, double best, double *secs,
                             double *err)
{
    const tk_env *env = s->env;
    atmoe_status st = s->w->prepare(s->state, i);
    cand_result r = CAND_FAILED;
    double times[MAX_RUNS];
    if (st != ATMOE_STATUS_OK)
        goto fail;
    for (size_t j = 0; j < s->count[i]; j++)
        s->out[j] = NAN;
    double t_first = now_s();
    if ((st = s->w->run(s->state, i)) ||
        (st = s->w->read(s->state, i, s->out)))
        goto fail;
    t_first = now_s() - t_first;
    if (s->ref[i] == NULL) {
        s->ref[i] = malloc(s->count[i] * sizeof(float));
        if (s->ref[i] == NULL)
            goto out;
        memcpy(s->ref[i], s->out, s->count[i] * sizeof(float));
        for (size_t j = 0; j < s->count[i]; j++)
            if (isnan(s->out[j])) {
                say("      %s: the reference left element %zu unwritten "
                    "or NaN\n", s->names[i], j);
                goto out;
            }
    } else {
        *err = max_diff(s->out, s->ref[i], s->count[i]);
        if (!(*err <= s->row->tol)) {
            r = CAND_WRONG;
            goto out;
        }
    }
    /* Samples of at least MIN_SAMPLE_S, well above the resolution of the
     * processor clock. */
    int inner = t_first >= MIN_SAMPLE_S ? 1
                                        : (int)ceil(MIN_SAMPLE_S / t_first);
    if (inner > 1000)
        inner = 1000;
    int runs = env->runs < MAX_RUNS ? env->runs : MAX_RUNS;
    for (int k = 0; k < runs; k++) {
        double t0 = env->clock();
        for (int j = 0; j < inner && st == ATMOE_STATUS_OK; j++)
            st = s->w->run(s->state, i);
        if (st != ATMOE_STATUS_OK)
            goto fail;
        times[k] = (env->clock() - t0) / inner;
        if (k == 0 && best > 0 && times[0] > PRUNE_FACTOR * best) {
            *secs = times[0];
            r = CAND_SLOW;
            goto out;
        }
    }
    *secs = median(times, (size_t)runs);
    r = CAND_OK;
    goto out;
fail:
    say("      %s: %s: %s\n", s->names[i], atmoe_status_name(st),
        atmoe_errmsg(env->ctx));
out:
    s->w->release(s->state, i);
    return r;
}

/* Applies v and runs every shape; times[] gets the medians, the return is
 * the geometric-mean speed-up over the baseline (0: refused, wrong,
 * failed or slow).  best: the fastest time known per shape, or NULL. */
static double candidate(search *s, const int *v, const double *best,
                        double *times)
{
    char label[128];
    label_of(s->row, v, label, sizeof label);
    if (apply(s->row, s->env, v) != ATMOE_STATUS_OK) {
        say("  %-24s refused: %s\n", label, atmoe_errmsg(s->env->ctx));
        s->refused++;
        return 0;
    }
    s->timed++;
    say("  %-24s", label);
    double logsum = 0;
    for (int i = 0; i < s->ns; i++) {
        double secs = 0, err = 0;
        cand_result r = run_shape(s, i, best ? best[i] : 0, &secs, &err);
        if (r == CAND_WRONG) {
            say("    WRONG  (off by %.1e)\n", err);
            s->wrong++;
            return 0;
        }
        if (r == CAND_FAILED) {
            say("   failed\n");
            s->failed++;
            return 0;
        }
        if (r == CAND_SLOW) {
            say("     slow\n");
            return 0;
        }
        times[i] = secs;
        say(" %9.3f ms", 1e3 * secs);
        logsum += log(s->base_s[i] / secs);
    }
    double score = exp(logsum / s->ns);
    say("  %.2fx\n", score);
    return score;
}

/* Every combination of the row's values (the effort's list of each
 * parameter) other than the reference that the device can run, into
 * cand[][TK_MAX_PARAMS]; their count. */
static int candidates(search *s, const int *ref, const atmoe_device_info *dev,
                      int (*cand)[TK_MAX_PARAMS])
{
    const tk_kernel *row = s->row;
    int np = nparams(row), n = 0, idx[TK_MAX_PARAMS] = {0};
    const int *lists[TK_MAX_PARAMS];
    int lens[TK_MAX_PARAMS];
    for (int p = 0; p < np; p++) {
        lists[p] = s->env->full_space ? row->params[p].full
                                      : row->params[p].quick;
        lens[p] = nvalues(lists[p]);
        if (lens[p] == 0)
            return 0;
    }
    for (;;) {
        int v[TK_MAX_PARAMS], same = 1;
        for (int p = 0; p < np; p++) {
            v[p] = lists[p][idx[p]];
            same = same && v[p] == ref[p];
        }
        char why[256];
        if (!same && n < MAX_CANDIDATES) {
            if (row->fits && row->fits(v, dev, why, sizeof why) != 0) {
                s->refused++;
            } else {
                memcpy(cand[n++], v, sizeof v);
            }
        }
        int p = 0;
        while (p < np && ++idx[p] == lens[p])
            idx[p++] = 0;
        if (p == np)
            break;
    }
    return n;
}

static void setup_free(search *s)
{
    if (s->w)
        s->w->teardown(s->state);
    for (int i = 0; i < TK_MAX_SHAPES; i++)
        free(s->ref[i]);
    free(s->out);
}

/* The values kept, into entry's kernels.<program>, and the report into
 * info.<row>. */
static void into_entry(const search *s, const int *kept, double gain,
                       json_t *entry)
{
    const tk_kernel *row = s->row;
    json_t *prog = member_object(member_object(entry, "kernels"),
                                 row->program);
    json_t *values = json_object();
    for (int p = 0; p < nparams(row); p++) {
        json_object_set_new(prog, row->params[p].name, json_integer(kept[p]));
        json_object_set_new(values, row->params[p].name,
                            json_integer(kept[p]));
    }
    json_t *info = member_object(entry, "info");
    json_t *shapes = json_object();
    for (int i = 0; i < s->ns; i++)
        json_object_set_new(shapes, s->names[i],
                            json_real(1e3 * s->base_s[i]));
    json_object_set_new(
        info, row->name,
        json_pack("{s:s, s:o, s:f, s:o, s:{s:i, s:i, s:i, s:i, s:i}}",
                  "program", row->program, "values", values, "speedup", gain,
                  "reference_ms", shapes, "candidates", "timed", s->timed,
                  "wrong", s->wrong, "failed", s->failed, "refused",
                  s->refused, "skipped", s->skipped));
}

int tk_tune(const tk_kernel *row, const tk_env *env, double deadline,
            json_t *entry)
{
    quiet = env->quiet;
    search s;
    memset(&s, 0, sizeof s);
    s.row = row;
    s.env = env;
    atmoe_device_info dev;
    atmoe_context_get_device(env->ctx, &dev);
    int np = nparams(row), ref[TK_MAX_PARAMS], kept[TK_MAX_PARAMS];
    int cpu = dev.type == ATMOE_DEVICE_TYPE_CPU;
    if (cpu && row->off_on_cpus && env->effort_step) {
        say("%s: skipped: %s runs on CPU devices only when forced, and "
            "their defaults leave it off\n", row->name, row->what);
        json_object_set_new(member_object(entry, "info"), row->name,
                            json_pack("{s:s, s:s}", "program", row->program,
                                      "skipped", "a variant CPU devices run "
                                      "only when forced"));
        return 0;
    }
    for (int p = 0; p < np; p++)
        ref[p] = kept[p] = cpu ? row->params[p].def_cpu
                               : row->params[p].def_other;
    char label[128];
    label_of(row, ref, label, sizeof label);
    say("%s: %s, milliseconds per shape, %s (the library's) the "
        "reference:\n", row->name, row->what, label);
    atmoe_status st = apply(row, env, ref);
    if (st != ATMOE_STATUS_OK) {
        fprintf(stderr, PROGRAM ": %s: the reference %s is refused: %s\n",
                row->name, label, atmoe_errmsg(env->ctx));
        return 1;
    }
    s.ns = row->work->setup(env, row, &s.state, s.names, s.count);
    s.w = row->work;
    size_t most = 0;
    for (int i = 0; i < s.ns; i++)
        most = s.count[i] > most ? s.count[i] : most;
    s.out = s.ns > 0 ? malloc(most * sizeof *s.out) : NULL;
    if (s.ns <= 0 || s.out == NULL) {
        setup_free(&s);
        return 1;
    }
    for (int i = 0; i < s.ns; i++) {
        double err = 0;
        if (run_shape(&s, i, 0, &s.base_s[i], &err) != CAND_OK) {
            fprintf(stderr, PROGRAM ": %s: %s failed with the reference "
                    "%s\n", row->name, s.names[i], label);
            setup_free(&s);
            return 1;
        }
        say("  baseline %-15s %9.3f ms\n", s.names[i], 1e3 * s.base_s[i]);
    }

    static int cand[MAX_CANDIDATES][TK_MAX_PARAMS];
    int nc = candidates(&s, ref, &dev, cand);
    /* A random order, so that a short budget samples the space. */
    for (int i = nc - 1; i > 0; i--) {
        int j = (int)(splitmix64(env->rng) % (uint64_t)(i + 1));
        int t[TK_MAX_PARAMS];
        memcpy(t, cand[i], sizeof t);
        memcpy(cand[i], cand[j], sizeof t);
        memcpy(cand[j], t, sizeof t);
    }
    double best_t[TK_MAX_SHAPES], times[TK_MAX_SHAPES], best_score = 0;
    int best = -1, ran = 0;
    memcpy(best_t, s.base_s, sizeof best_t);
    for (int c = 0; c < nc && (ran == 0 || now_s() < deadline); c++) {
        char why[64];
        label_of(row, cand[c], label, sizeof label);
        if (journal_begin(label, why, sizeof why)) {
            say("  %-24s skipped: it %s an earlier run of this step\n", label,
                why);
            s.skipped++;
            continue;
        }
        double sc = candidate(&s, cand[c], best_t, times);
        journal_end();
        ran++;
        if (sc > best_score) {
            best_score = sc;
            best = c;
            memcpy(best_t, times, sizeof best_t);
        }
    }
    double gain = 1;
    if (best < 0 || best_score < MIN_GAIN) {
        say("  no candidate beats the reference by %.0f%%: it stays\n",
            100 * (MIN_GAIN - 1));
    } else {
        /* The best of many noisy timings is flattered by its noise:
         * confirmed, the reference timed again first. */
        double ref_t[TK_MAX_SHAPES], again[TK_MAX_SHAPES];
        label_of(row, cand[best], label, sizeof label);
        say("confirming %s: both timed again, the reference first\n", label);
        double s0 = candidate(&s, ref, NULL, ref_t);
        double s1 = candidate(&s, cand[best], NULL, again);
        int harmless = s0 > 0 && s1 > 0;
        double logsum = 0;
        for (int i = 0; i < s.ns && harmless; i++) {
            harmless = again[i] <= NO_HARM * ref_t[i];
            logsum += log(ref_t[i] / again[i]);
        }
        double g = harmless ? exp(logsum / s.ns) : 0;
        if (!harmless || g < MIN_GAIN) {
            say("  %s is not confirmed (%.2fx, or a shape more than %.0f%% "
                "slower): the reference stays\n", label, g,
                100 * (NO_HARM - 1));
        } else {
            memcpy(kept, cand[best], sizeof kept);
            gain = g;
            memcpy(s.base_s, ref_t, sizeof ref_t);
        }
    }
    label_of(row, kept, label, sizeof label);
    say("%s: %s (%.2fx the reference)\n", row->name, label, gain);
    into_entry(&s, kept, gain, entry);
    setup_free(&s);
    return 0;
}
