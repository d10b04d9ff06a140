/* atmoe train demo: a synthetic multitask problem on which routing must
 * pay.  A frozen two-layer linear stack; T tasks, each a different rank-2
 * change of both layers' weights, with inputs centred on a mean of its
 * own.  Stage 1 trains one expert per task, stage 2 the routers over
 * them; one LoRA of the same total parameter count trains on the mixed
 * rows.  A single LoRA applies one change to every input, so it can only
 * fit the tasks' average; routed experts apply each task's own, as far as
 * the router tells the tasks apart.  T-REX (rank-1 experts, router and
 * intuition, about the experts' parameter count) trains jointly on the
 * rows with each row's task as its one-hot intuition cluster.  Every loss
 * is measured on held-out rows drawn like the training ones. */
#define _XOPEN_SOURCE 700
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "train_demo.h"

enum { T = 4, R = 2, D0 = 24, D1 = 32, D2 = 16, HELD = 100 };
/* T-REX: both layers rank-1 experts, variant v1 (E = r1 = r2) routed by
 * both the router and the intuition.  Each layer holds
 * r1 d_in + d_out r2 + E d_in + 2 parameters, 80 E + 2 here, so that no E
 * gives the experts' 2 T R (D0 + D1 + D1 + D2) = 832 exactly: E = 5 gives
 * 804, the nearest (E = 6 gives 964). */
enum { TREX_E = 5 };
#define DEFAULT_ROWS 300
#define ALPHA (2.0f * R)

typedef struct rng {
    uint64_t s;
} rng;

static double uniform(rng *g)
{
    uint64_t z = (g->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return ((double)(z >> 11) + 0.5) * 0x1.0p-53;
}

static double normal(rng *g)
{
    return sqrt(-2.0 * log(uniform(g))) * cos(6.283185307179586 * uniform(g));
}

/* The problem: base weights, the tasks' changes and input means. */
typedef struct problem {
    float w0[D1 * D0], b0[D1], w1[D2 * D1];
    double d0[T][D1 * D0], d1[T][D2 * D1];
    double mu[T][D0];
} problem;

static void make_problem(problem *p, uint64_t seed)
{
    rng g = {seed ^ 0x5eedull};
    for (int i = 0; i < D1 * D0; i++)
        p->w0[i] = (float)(normal(&g) / sqrt(D0));
    for (int i = 0; i < D1; i++)
        p->b0[i] = (float)(0.1 * normal(&g));
    for (int i = 0; i < D2 * D1; i++)
        p->w1[i] = (float)(normal(&g) / sqrt(D1));
    for (int t = 0; t < T; t++) {
        /* Rank R: sum of R outer products u v^T, as large as the base. */
        memset(p->d0[t], 0, sizeof p->d0[t]);
        memset(p->d1[t], 0, sizeof p->d1[t]);
        for (int r = 0; r < R; r++) {
            double u0[D1], v0[D0], u1[D2], v1[D1];
            for (int i = 0; i < D1; i++)
                u0[i] = normal(&g) / sqrt(D1);
            for (int i = 0; i < D0; i++)
                v0[i] = normal(&g) / sqrt(D0);
            for (int i = 0; i < D2; i++)
                u1[i] = normal(&g) / sqrt(D2);
            for (int i = 0; i < D1; i++)
                v1[i] = normal(&g) / sqrt(D1);
            for (int o = 0; o < D1; o++)
                for (int i = 0; i < D0; i++)
                    p->d0[t][o * D0 + i] += 2.0 * u0[o] * v0[i];
            for (int o = 0; o < D2; o++)
                for (int i = 0; i < D1; i++)
                    p->d1[t][o * D1 + i] += 2.0 * u1[o] * v1[i];
        }
        for (int i = 0; i < D0; i++)
            p->mu[t][i] = 1.5 * normal(&g);
    }
}

/* n rows per task: x, y (the stack changed by the task's change) and the
 * task ids. */
static void make_rows(const problem *p, uint64_t seed, size_t n, float *x,
                      float *y, int32_t *task)
{
    rng g = {seed};
    for (size_t k = 0; k < n * T; k++) {
        int t = (int)(k % T);
        task[k] = t;
        double xv[D0], h[D1];
        for (int i = 0; i < D0; i++)
            x[k * D0 + i] = (float)(xv[i] = p->mu[t][i] + normal(&g));
        for (int o = 0; o < D1; o++) {
            double a = p->b0[o];
            for (int i = 0; i < D0; i++)
                a += ((double)p->w0[o * D0 + i] + p->d0[t][o * D0 + i]) *
                     xv[i];
            h[o] = a;
        }
        for (int o = 0; o < D2; o++) {
            double a = 0;
            for (int i = 0; i < D1; i++)
                a += ((double)p->w1[o * D1 + i] + p->d1[t][o * D1 + i]) *
                     h[i];
            y[k * D2 + o] = (float)a;
        }
    }
}

static atmoe_status save_rows(const char *path, const float *x,
                              const float *y, const int32_t *task, size_t n,
                              int zero_tasks)
{
    atmoe_safetensors_writer *w;
    atmoe_status st = atmoe_safetensors_writer_new(NULL, &w);
    if (st != ATMOE_STATUS_OK)
        return st;
    uint64_t xs[2] = {n, D0}, ys[2] = {n, D2}, ts[1] = {n};
    int32_t *zeros = zero_tasks ? calloc(n, sizeof *zeros) : NULL;
    if (zero_tasks && zeros == NULL)
        st = ATMOE_STATUS_HOST_OUT_OF_MEMORY;
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_add_f32(w, "x", ATMOE_SAFETENSORS_F32,
                                              2, xs, x);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_add_f32(w, "y", ATMOE_SAFETENSORS_F32,
                                              2, ys, y);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_add(w, "task", ATMOE_SAFETENSORS_I32, 1,
                                          ts, zero_tasks ? zeros : task);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_save(w, path);
    free(zeros);
    atmoe_safetensors_writer_free(w);
    return st;
}

/* An adapter of rank r over both layers as PEFT initialises one: A
 * uniform in +-1/sqrt(d_in), B zero. */
static atmoe_status save_adapter(const char *dir, size_t r, rng *g)
{
    atmoe_adapter *ad;
    atmoe_status st = atmoe_adapter_new(NULL, &ad);
    if (st != ATMOE_STATUS_OK)
        return st;
    size_t dims[2][2] = {{D0, D1}, {D1, D2}};
    for (int l = 0; l < 2 && st == ATMOE_STATUS_OK; l++) {
        size_t din = dims[l][0], dout = dims[l][1];
        float *a = malloc(r * din * sizeof *a);
        float *b = calloc(dout * r, sizeof *b);
        if (a == NULL || b == NULL)
            st = ATMOE_STATUS_HOST_OUT_OF_MEMORY;
        for (size_t i = 0; st == ATMOE_STATUS_OK && i < r * din; i++)
            a[i] = (float)((2 * uniform(g) - 1) / sqrt((double)din));
        char mod[64];
        snprintf(mod, sizeof mod, "model.layers.%d.proj", l);
        if (st == ATMOE_STATUS_OK)
            st = atmoe_adapter_set(ad, mod, r, din, dout, a, b,
                                   (float)(2 * r), 0);
        free(a);
        free(b);
    }
    if (st == ATMOE_STATUS_OK)
        st = atmoe_adapter_save(ad, dir, ATMOE_SAFETENSORS_F32);
    atmoe_adapter_free(ad);
    return st;
}

/* A manifest over the stack whose every layer mixes the groups given (a
 * JSON fragment such as [["e0"], ["e1"]]); weights at base. */
static int save_manifest(const char *path, const char *base,
                         const char *groups)
{
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return -1;
    fprintf(f,
            "{\"version\": 1, \"weights\": \"%s\", \"layers\": ["
            "{\"index\": 0, \"modules\": {\"proj\": {"
            "\"weight\": \"model.layers.0.proj.weight\", "
            "\"bias\": \"model.layers.0.proj.bias\", \"groups\": %s}}}, "
            "{\"index\": 1, \"modules\": {\"proj\": {"
            "\"weight\": \"model.layers.1.proj.weight\", \"groups\": %s}}}"
            "]}\n",
            base, groups, groups);
    return fclose(f);
}

/* The T-REX inputs: x, y, each row's sample (its task) and the samples'
 * intuition scores.  The demo's intuition is the task's one-hot cluster
 * (no clustering of the inputs): sample t scores 1 on expert t and 0 on
 * the others, the fifth expert (TREX_E = T + 1) left to the router. */
static void trex_scores(float *scores)
{
    for (int t = 0; t < T; t++)
        for (int e = 0; e < TREX_E; e++)
            scores[t * TREX_E + e] = e == t ? 1.0f : 0.0f;
}

static atmoe_status save_trex_rows(const char *path, const float *x,
                                   const float *y, const int32_t *task,
                                   size_t n, const float *scores)
{
    atmoe_safetensors_writer *w;
    atmoe_status st = atmoe_safetensors_writer_new(NULL, &w);
    if (st != ATMOE_STATUS_OK)
        return st;
    uint64_t xs[2] = {n, D0}, ys[2] = {n, D2}, ts[1] = {n};
    uint64_t ss[2] = {T, TREX_E};
    if (!(st = atmoe_safetensors_writer_add_f32(w, "x", ATMOE_SAFETENSORS_F32,
                                                2, xs, x)) &&
        !(st = atmoe_safetensors_writer_add_f32(w, "y", ATMOE_SAFETENSORS_F32,
                                                2, ys, y)) &&
        !(st = atmoe_safetensors_writer_add(w, "sample",
                                            ATMOE_SAFETENSORS_I32, 1, ts,
                                            task)) &&
        !(st = atmoe_safetensors_writer_add_f32(
              w, "scores", ATMOE_SAFETENSORS_F32, 2, ss, scores)))
        st = atmoe_safetensors_writer_save(w, path);
    atmoe_safetensors_writer_free(w);
    return st;
}

/* The base weights, and with ctx the rank-1 experts' A and B as the
 * reference initialises them (atmoe_mor1e_init: A uniform in
 * +-1/sqrt(d_in), B zero; W_r, w_om and w_c absent, hence zero). */
static atmoe_status save_weights(atmoe_context *ctx, const char *path,
                                 const problem *p, uint64_t seed)
{
    atmoe_safetensors_writer *w;
    uint64_t s0[2] = {D1, D0}, sb[1] = {D1}, s1[2] = {D2, D1};
    atmoe_status st = atmoe_safetensors_writer_new(NULL, &w);
    if (st != ATMOE_STATUS_OK)
        return st;
    if ((st = atmoe_safetensors_writer_add_f32(
             w, "model.layers.0.proj.weight", ATMOE_SAFETENSORS_F32, 2, s0,
             p->w0)) ||
        (st = atmoe_safetensors_writer_add_f32(
             w, "model.layers.0.proj.bias", ATMOE_SAFETENSORS_F32, 1, sb,
             p->b0)) ||
        (st = atmoe_safetensors_writer_add_f32(
             w, "model.layers.1.proj.weight", ATMOE_SAFETENSORS_F32, 2, s1,
             p->w1)))
        goto out;
    size_t dims[2][2] = {{D0, D1}, {D1, D2}};
    for (int l = 0; ctx && l < 2 && st == ATMOE_STATUS_OK; l++) {
        size_t din = dims[l][0], dout = dims[l][1];
        size_t as[2] = {TREX_E, din};
        uint64_t a64[2] = {TREX_E, din}, b64[2] = {dout, TREX_E};
        float *a = malloc(TREX_E * din * sizeof *a);
        float *b = calloc(dout * TREX_E, sizeof *b);
        atmoe_tensor *at = NULL;
        char name[32];
        if (a == NULL || b == NULL)
            st = ATMOE_STATUS_HOST_OUT_OF_MEMORY;
        if (st == ATMOE_STATUS_OK &&
            !(st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, as, &at)) &&
            !(st = atmoe_mor1e_init(at, NULL, NULL, NULL, NULL,
                                    seed + 100 + (uint64_t)l)) &&
            !(st = atmoe_context_finish(ctx)))
            st = atmoe_tensor_read(at, a, TREX_E * din * sizeof *a);
        atmoe_tensor_free(at);
        if (st == ATMOE_STATUS_OK) {
            snprintf(name, sizeof name, "trex.%d.a", l);
            st = atmoe_safetensors_writer_add_f32(w, name,
                                                  ATMOE_SAFETENSORS_F32, 2,
                                                  a64, a);
        }
        if (st == ATMOE_STATUS_OK) {
            snprintf(name, sizeof name, "trex.%d.b", l);
            st = atmoe_safetensors_writer_add_f32(w, name,
                                                  ATMOE_SAFETENSORS_F32, 2,
                                                  b64, b);
        }
        free(a);
        free(b);
    }
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_save(w, path);
out:
    atmoe_safetensors_writer_free(w);
    return st;
}

/* The T-REX manifest: the stack's modules as rank-1 layers over base. */
static int save_trex_manifest(const char *path, const char *base)
{
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return -1;
    fprintf(f,
            "{\"version\": 1, \"weights\": \"%s\", \"layers\": ["
            "{\"index\": 0, \"modules\": {\"proj\": {"
            "\"weight\": \"model.layers.0.proj.weight\", "
            "\"bias\": \"model.layers.0.proj.bias\", \"rank1\": {"
            "\"a\": \"trex.0.a\", \"b\": \"trex.0.b\", \"variant\": \"v1\"}}}}, "
            "{\"index\": 1, \"modules\": {\"proj\": {"
            "\"weight\": \"model.layers.1.proj.weight\", \"rank1\": {"
            "\"a\": \"trex.1.a\", \"b\": \"trex.1.b\", \"variant\": \"v1\"}}}}"
            "]}\n",
            base);
    return fclose(f);
}

/* The stack of the manifest at path over rows of x whose task is want (-1:
 * all): the mean squared error against y, and with acc non-NULL the
 * fraction of rows whose largest expert weight in layer 0 is their task's
 * expert. */
static atmoe_status evaluate(atmoe_context *ctx, const char *path,
                             const float *x, const float *y,
                             const int32_t *task, size_t n, int want,
                             const float *scores, double *loss, double *acc)
{
    size_t m = 0;
    for (size_t k = 0; k < n; k++)
        m += want < 0 || task[k] == want;
    float *xs = malloc(m * D0 * sizeof *xs), *out = malloc(m * D2 * sizeof *out);
    float *w = acc ? malloc(m * T * sizeof *w) : NULL;
    int32_t *ts = malloc(m * sizeof *ts);
    float *ys = malloc(m * D2 * sizeof *ys);
    atmoe_manifest *mf = NULL;
    atmoe_graph *g = NULL;
    atmoe_status st = ATMOE_STATUS_OK;
    if (xs == NULL || out == NULL || ts == NULL || ys == NULL ||
        (acc && w == NULL)) {
        st = ATMOE_STATUS_HOST_OUT_OF_MEMORY;
        goto done;
    }
    for (size_t k = 0, j = 0; k < n; k++)
        if (want < 0 || task[k] == want) {
            memcpy(xs + j * D0, x + k * D0, D0 * sizeof *xs);
            memcpy(ys + j * D2, y + k * D2, D2 * sizeof *ys);
            ts[j++] = task[k];
        }
    atmoe_node xn, yn, gi = ATMOE_NODE_NONE, sc = ATMOE_NODE_NONE;
    atmoe_layer_trace tr[2];
    size_t shape[2] = {m, D0}, is[1] = {m}, ss[2] = {T, TREX_E};
    if ((st = atmoe_manifest_open(ctx, path, &mf)) ||
        (st = atmoe_graph_new(ctx, &g)) ||
        (st = atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, shape, 0, &xn)))
        goto done;
    if (scores) {
        /* T-REX: each row routed with its task's scores. */
        atmoe_manifest_inputs in = {ATMOE_NODE_NONE, ATMOE_NODE_NONE,
                                    ATMOE_NODE_NONE, ATMOE_NODE_NONE};
        if ((st = atmoe_graph_input(g, "gate_index", ATMOE_DTYPE_I32, 1, is,
                                    0, &gi)) ||
            (st = atmoe_graph_constant(g, "scores", ATMOE_DTYPE_F32, 2, ss,
                                       scores, &sc)))
            goto done;
        in.gate_index = gi;
        in.scores = sc;
        st = atmoe_manifest_build_with(mf, g, xn, &in, NULL, NULL, NULL, &yn);
    } else {
        st = atmoe_manifest_build(mf, g, xn, ATMOE_NODE_NONE, ATMOE_NODE_NONE,
                                  NULL, tr, &yn);
    }
    if (st ||
        (st = atmoe_graph_mark_output(g, yn)) ||
        (acc && (st = atmoe_graph_mark_output(g, tr[0].w))) ||
        (st = atmoe_graph_plan(g, 0)) ||
        (st = atmoe_graph_set_input(g, xn, xs, m * D0 * sizeof *xs, 0)) ||
        (scores && (st = atmoe_graph_set_input(g, gi, ts, m * sizeof *ts,
                                               0))) ||
        (st = atmoe_graph_compute(g, 0)) ||
        (st = atmoe_graph_read(g, yn, out, m * D2 * sizeof *out)) ||
        (acc && (st = atmoe_graph_read(g, tr[0].w, w, m * T * sizeof *w))))
        goto done;
    double sum = 0;
    for (size_t i = 0; i < m * D2; i++)
        sum += ((double)out[i] - ys[i]) * ((double)out[i] - ys[i]);
    *loss = sum / (double)(m * D2);
    if (acc) {
        size_t right = 0;
        for (size_t j = 0; j < m; j++) {
            int best = 0;
            for (int e = 1; e < T; e++)
                if (w[j * T + e] > w[j * T + best])
                    best = e;
            right += best == ts[j];
        }
        *acc = (double)right / (double)m;
    }
done:
    atmoe_graph_free(g);
    atmoe_manifest_free(mf);
    free(xs);
    free(out);
    free(w);
    free(ts);
    free(ys);
    return st;
}

static int remove_entry(const char *path, const struct stat *st, int flag,
                        struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

int train_demo(atmoe_context *ctx, uint64_t seed, size_t rows,
               const char *json)
{
    if (rows == 0)
        rows = DEFAULT_ROWS;
    const char *tmpdir = getenv("TMPDIR");
    char dir[512], path[700], groups[256];
    snprintf(dir, sizeof dir, "%s/atmoe-demo-XXXXXX",
             tmpdir && *tmpdir ? tmpdir : "/tmp");
    if (mkdtemp(dir) == NULL) {
        fprintf(stderr, "atmoe train demo: cannot create %s\n", dir);
        return EXIT_FAILED;
    }
    problem *p = malloc(sizeof *p);
    size_t n = rows * T, nh = (size_t)HELD * T;
    float *x = malloc(n * D0 * sizeof *x), *y = malloc(n * D2 * sizeof *y);
    float *hx = malloc(nh * D0 * sizeof *hx), *hy = malloc(nh * D2 * sizeof *hy);
    int32_t *task = malloc(n * sizeof *task), *htask = malloc(nh * sizeof *htask);
    int rc = EXIT_OK;
    atmoe_status st = ATMOE_STATUS_OK;
    const char *what = "";
    atmoe_manifest *mf = NULL;
    if (!p || !x || !y || !hx || !hy || !task || !htask) {
        rc = cli_out_of_memory("atmoe train demo");
        goto out;
    }
    make_problem(p, seed);
    make_rows(p, seed + 1, rows, x, y, task);
    make_rows(p, seed + 2, HELD, hx, hy, htask);

    /* The files: base weights, data, initial adapters, manifests. */
    what = "writing the problem";
    snprintf(path, sizeof path, "%s/base.safetensors", dir);
    if ((st = save_weights(NULL, path, p, seed)))
        goto fail;
    snprintf(path, sizeof path, "%s/trex-init.safetensors", dir);
    if ((st = save_weights(ctx, path, p, seed)))
        goto fail;
    float scores[T * TREX_E];
    trex_scores(scores);
    snprintf(path, sizeof path, "%s/trex.safetensors", dir);
    if ((st = save_trex_rows(path, x, y, task, n, scores)))
        goto fail;
    snprintf(path, sizeof path, "%s/train.safetensors", dir);
    if ((st = save_rows(path, x, y, task, n, 0)))
        goto fail;
    snprintf(path, sizeof path, "%s/mixed.safetensors", dir);
    if ((st = save_rows(path, x, y, task, n, 1)))
        goto fail;
    rng g = {seed ^ 0xada97e5ull};
    for (int t = 0; t < T; t++) {
        snprintf(path, sizeof path, "%s/init/e%d", dir, t);
        char parent[600];
        snprintf(parent, sizeof parent, "%s/init", dir);
        mkdir(parent, 0777);
        if ((st = save_adapter(path, R, &g)))
            goto fail;
    }
    snprintf(path, sizeof path, "%s/init/single", dir);
    if ((st = save_adapter(path, (size_t)R * T, &g)))
        goto fail;
    strcpy(groups, "[");
    for (int t = 0; t < T; t++)
        snprintf(groups + strlen(groups), sizeof groups - strlen(groups),
                 "%s[\"e%d\"]", t ? ", " : "", t);
    strcat(groups, "]");
    snprintf(path, sizeof path, "%s/init/experts.json", dir);
    if (save_manifest(path, "../base.safetensors", groups) ||
        (snprintf(path, sizeof path, "%s/init/single.json", dir),
         save_manifest(path, "../base.safetensors", "[[\"single\"]]"))) {
        fprintf(stderr, "atmoe train demo: cannot write %s\n", path);
        rc = EXIT_FAILED;
        goto out;
    }

    atmoe_train_config cfg;
    atmoe_train_config_default(&cfg);
    cfg.optimizer.lr = 1e-2f;
    cfg.optimizer.weight_decay = 0;
    cfg.optimizer.schedule = ATMOE_SCHEDULE_COSINE;
    cfg.optimizer.min_lr = 1e-3f;
    cfg.batch = 32;
    cfg.steps = 600;
    cfg.seed = seed;
    char data[600], out[600];

    /* Stage 1: an expert per task; the single LoRA on every row. */
    what = "stage 1";
    fprintf(stderr, "atmoe train demo: stage 1, %d experts of rank %d...\n",
            T, R);
    snprintf(path, sizeof path, "%s/init/experts.json", dir);
    snprintf(data, sizeof data, "%s/train.safetensors", dir);
    snprintf(out, sizeof out, "%s/trained", dir);
    if ((st = atmoe_manifest_open(ctx, path, &mf)) ||
        (st = atmoe_train_stage1(ctx, mf, data, &cfg, out)))
        goto fail;
    atmoe_manifest_free(mf);
    mf = NULL;
    what = "the single LoRA";
    fprintf(stderr, "atmoe train demo: one LoRA of rank %d on the mixed "
                    "rows...\n", R * T);
    snprintf(path, sizeof path, "%s/init/single.json", dir);
    snprintf(data, sizeof data, "%s/mixed.safetensors", dir);
    cfg.steps = 600 * 2;
    if ((st = atmoe_manifest_open(ctx, path, &mf)) ||
        (st = atmoe_train_stage1(ctx, mf, data, &cfg, out)))
        goto fail;
    atmoe_manifest_free(mf);
    mf = NULL;

    /* Stage 2: the routers over the trained experts. */
    what = "stage 2";
    fprintf(stderr, "atmoe train demo: stage 2, the routers...\n");
    snprintf(path, sizeof path, "%s/trained/experts.json", dir);
    if (save_manifest(path, "../base.safetensors", groups)) {
        fprintf(stderr, "atmoe train demo: cannot write %s\n", path);
        rc = EXIT_FAILED;
        goto out;
    }
    snprintf(data, sizeof data, "%s/train.safetensors", dir);
    snprintf(out, sizeof out, "%s/routed", dir);
    /* The routers' logits must grow large for the mixture to pick one
     * expert: a higher rate than the experts'. */
    cfg.steps = 600;
    cfg.optimizer.lr = 1e-1f;
    cfg.optimizer.min_lr = 1e-2f;
    double trained;
    if ((st = atmoe_manifest_open(ctx, path, &mf)) ||
        (st = atmoe_train_stage2(ctx, mf, data, &cfg, out, &trained)))
        goto fail;
    atmoe_manifest_free(mf);
    mf = NULL;

    /* T-REX: the rank-1 experts of both layers, router and gates trained
     * jointly from the reference initialisation, as many steps as the
     * single LoRA at its rate. */
    what = "T-REX";
    fprintf(stderr, "atmoe train demo: T-REX, %d rank-1 experts a layer...\n",
            TREX_E);
    snprintf(path, sizeof path, "%s/trex-init.json", dir);
    if (save_trex_manifest(path, "trex-init.safetensors")) {
        fprintf(stderr, "atmoe train demo: cannot write %s\n", path);
        rc = EXIT_FAILED;
        goto out;
    }
    snprintf(data, sizeof data, "%s/trex.safetensors", dir);
    snprintf(out, sizeof out, "%s/trex", dir);
    cfg.steps = 600 * 2;
    cfg.optimizer.lr = 1e-2f;
    cfg.optimizer.min_lr = 1e-3f;
    double trex_trained;
    if ((st = atmoe_manifest_open(ctx, path, &mf)) ||
        (st = atmoe_train_trex(ctx, mf, data, &cfg, out, &trex_trained)))
        goto fail;
    atmoe_manifest_free(mf);
    mf = NULL;

    /* Held-out losses. */
    what = "evaluating";
    double per_task = 0, routed, single, acc, l;
    for (int t = 0; t < T; t++) {
        char gt[32];
        snprintf(gt, sizeof gt, "[[\"e%d\"]]", t);
        snprintf(path, sizeof path, "%s/trained/e%d.json", dir, t);
        if (save_manifest(path, "../base.safetensors", gt)) {
            fprintf(stderr, "atmoe train demo: cannot write %s\n", path);
            rc = EXIT_FAILED;
            goto out;
        }
        if ((st = evaluate(ctx, path, hx, hy, htask, nh, t, NULL, &l, NULL)))
            goto fail;
        per_task += l / T;
    }
    snprintf(path, sizeof path, "%s/routed/manifest.json", dir);
    if ((st = evaluate(ctx, path, hx, hy, htask, nh, -1, NULL, &routed,
                          &acc)))
        goto fail;
    snprintf(path, sizeof path, "%s/trained/single.json", dir);
    if (save_manifest(path, "../base.safetensors", "[[\"single\"]]") ||
        (st = evaluate(ctx, path, hx, hy, htask, nh, -1, NULL, &single,
                          NULL))) {
        if (st == ATMOE_STATUS_OK) {
            fprintf(stderr, "atmoe train demo: cannot write %s\n", path);
            rc = EXIT_FAILED;
            goto out;
        }
        goto fail;
    }
    double trex, untrained;
    snprintf(path, sizeof path, "%s/trex/manifest.json", dir);
    if ((st = evaluate(ctx, path, hx, hy, htask, nh, -1, scores, &trex,
                       NULL)))
        goto fail;
    /* Untrained (B zero): the base stack's loss, every method's start. */
    snprintf(path, sizeof path, "%s/trex-init.json", dir);
    if ((st = evaluate(ctx, path, hx, hy, htask, nh, -1, scores, &untrained,
                       NULL)))
        goto fail;
    long experts = (long)T * R * ((D0 + D1) + (D1 + D2));
    /* Per layer A [E, d_in], B [d_out, E], W_r [E, d_in], w_om, w_c. */
    long trex_params = (long)TREX_E * (D0 + D1 + D0) + 2 +
                       (long)TREX_E * (D1 + D2 + D1) + 2;
    long routers = 2L * T * (D0 + D1); /* w_g [d, T] and w_d [d, T] */
    printf("held-out loss (MSE over %zu rows, %d tasks)\n", nh, T);
    printf("  %-12s %12s %11s\n", "method", "loss", "parameters");
    printf("  %-12s %12.6g %11ld\n", "per-task", per_task, experts);
    printf("  %-12s %12.6g %11ld\n", "routed", routed, experts + routers);
    printf("  %-12s %12.6g %11ld\n", "single-lora", single, experts);
    printf("  %-12s %12.6g %11ld\n", "trex", trex, trex_params);
    printf("  %-12s %12.6g %11d\n", "untrained", untrained, 0);
    printf("router accuracy %.4f; routed / per-task %.3f, routed / "
           "single-lora %.3f\n", acc, routed / per_task, routed / single);
    if (json) {
        FILE *f = fopen(json, "w");
        if (f == NULL ||
            fprintf(f,
                    "{\"rows\": [{\"method\": \"per-task\", \"heldout_loss\": "
                    "%.9g, \"parameters\": %ld}, {\"method\": \"routed\", "
                    "\"heldout_loss\": %.9g, \"parameters\": %ld}, "
                    "{\"method\": \"single-lora\", \"heldout_loss\": %.9g, "
                    "\"parameters\": %ld}, {\"method\": \"trex\", "
                    "\"heldout_loss\": %.9g, \"parameters\": %ld}], "
                    "\"router_accuracy\": %.9g, \"untrained_loss\": %.9g}\n",
                    per_task, experts, routed, experts + routers, single,
                    experts, trex, trex_params, acc, untrained) < 0 ||
            fclose(f) != 0) {
            fprintf(stderr, "atmoe train demo: cannot write %s\n", json);
            rc = EXIT_FAILED;
        }
    }
    goto out;
fail:
    rc = cli_fail(what, st, ctx);
out:
    atmoe_manifest_free(mf);
    nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(p);
    free(x);
    free(y);
    free(hx);
    free(hy);
    free(task);
    free(htask);
    return rc;
}
