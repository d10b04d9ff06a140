/* The training recipes (atmoe_train_stage1): the trained adapters load in
 * atmoe_adapter_open and give, in a float64 host forward of the stack, the
 * loss the trainer reported; training lowers the loss well below the
 * untrained adapters'; bad data is refused with a message and no output.
 * The same on labels over a manifest's head (cross-entropy), whose ignored
 * rows carry no gradient. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "testutil.h"

/* A two-layer stack of odd widths, one module per layer: layer 0 with a
 * bias, layer 1's weight stored transposed [in, out] (a Conv1D). */
enum { D0 = 9, D1 = 11, D2 = 7, N = 150 };
static const size_t ranks[3] = {2, 3, 1}; /* e0, e1, gen */
static const char *const names[3] = {"e0", "e1", "gen"};
#define ALPHA 4.0f

typedef struct fixture {
    char dir[256];
    float w0[D1 * D0], b0[D1], w1t[D1 * D2]; /* w1t: [in, out] */
    /* Initial adapters: [model][layer] A and B. */
    float a[3][2][3 * D1], b[3][2][D1 * 3];
    /* The classification head over the stack: W [C, D2] (stored F64, read
     * as f32), bias [C]. */
    float hw[5 * D2], hb[5];
} fixture;

static atmoe_context *CTX;

static void save_tensor(atmoe_safetensors_writer *w, const char *name,
                        size_t r, size_t c, const float *x)
{
    uint64_t s[2] = {r, c};
    ck_assert_status(atmoe_safetensors_writer_add_f32(
                         w, name, ATMOE_SAFETENSORS_F32, c ? 2 : 1, s, x),
                     NULL);
}

static const char *manifest_text =
    "{\"version\": 1, \"weights\": \"base.safetensors\", \"layers\": ["
    "{\"index\": 0, \"modules\": {\"proj\": {"
    "\"weight\": \"model.layers.0.proj.weight\","
    "\"bias\": \"model.layers.0.proj.bias\","
    "\"groups\": [[\"e0\"], [\"e1\"]],"
    "\"general\": {\"adapter\": \"gen\", \"lambda\": 0.5}}}},"
    "{\"index\": 1, \"modules\": {\"proj\": {"
    "\"weight\": {\"tensor\": \"model.layers.1.proj.weight\", "
    "\"transposed\": true},"
    "\"groups\": [[\"e0\"], [\"e1\"]]}}}]}";

static void make_fixture(fixture *f)
{
    test_rng rng;
    test_rng_seed(&rng, 1401);
    test_mkdtemp(f->dir, sizeof f->dir, "recipe");
    test_fill_uniform(&rng, f->w0, D1 * D0, -0.4, 0.4);
    test_fill_uniform(&rng, f->b0, D1, -0.2, 0.2);
    test_fill_uniform(&rng, f->w1t, D1 * D2, -0.4, 0.4);
    char path[512];
    atmoe_safetensors_writer *w;
    ck_assert_status(atmoe_safetensors_writer_new(NULL, &w), NULL);
    save_tensor(w, "model.layers.0.proj.weight", D1, D0, f->w0);
    save_tensor(w, "model.layers.0.proj.bias", D1, 0, f->b0);
    save_tensor(w, "model.layers.1.proj.weight", D1, D2, f->w1t);
    test_rng hrng;
    test_rng_seed(&hrng, 1402);
    test_fill_uniform(&hrng, f->hw, 5 * D2, -2, 2);
    test_fill_uniform(&hrng, f->hb, 5, -0.5, 0.5);
    uint64_t hs[2] = {5, D2}, bad[2] = {5, D2 + 1};
    float wide[5 * (D2 + 1)];
    test_fill_uniform(&hrng, wide, 5 * (D2 + 1), -1, 1);
    double hw64[5 * D2];
    for (int i = 0; i < 5 * D2; i++)
        hw64[i] = f->hw[i];
    ck_assert_status(atmoe_safetensors_writer_add(
                         w, "head.weight", ATMOE_SAFETENSORS_F64, 2, hs, hw64),
                     NULL);
    save_tensor(w, "head.bias", 5, 0, f->hb);
    float hwt[D2 * 5];
    for (int c = 0; c < 5; c++)
        for (int o = 0; o < D2; o++)
            hwt[o * 5 + c] = f->hw[c * D2 + o];
    save_tensor(w, "head.weight_t", D2, 5, hwt);
    ck_assert_status(atmoe_safetensors_writer_add_f32(
                         w, "wide.weight", ATMOE_SAFETENSORS_F32, 2, bad, wide),
                     NULL);
    snprintf(path, sizeof path, "%s/base.safetensors", f->dir);
    ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
    atmoe_safetensors_writer_free(w);

    /* PEFT's initialisation: A random, B zero; the general LoRA adapts
     * layer 0 only. */
    for (int k = 0; k < 3; k++) {
        atmoe_adapter *ad;
        ck_assert_status(atmoe_adapter_new(NULL, &ad), NULL);
        for (int l = 0; l < (k == 2 ? 1 : 2); l++) {
            size_t din = l ? D1 : D0, dout = l ? D2 : D1, r = ranks[k];
            test_fill_uniform(&rng, f->a[k][l], r * din, -0.3, 0.3);
            memset(f->b[k][l], 0, sizeof f->b[k][l]);
            char mod[64];
            snprintf(mod, sizeof mod, "model.layers.%d.proj", l);
            ck_assert_status(atmoe_adapter_set(ad, mod, r, din, dout,
                                               f->a[k][l], f->b[k][l], ALPHA,
                                               0),
                             NULL);
        }
        snprintf(path, sizeof path, "%s/%s", f->dir, names[k]);
        ck_assert_status(atmoe_adapter_save(ad, path, ATMOE_SAFETENSORS_F32),
                         NULL);
        atmoe_adapter_free(ad);
    }
    snprintf(path, sizeof path, "%s/manifest.json", f->dir);
    test_write_file(path, manifest_text, strlen(manifest_text));
}

/* The float64 forward of the stack with model k's adapters a, b (NULL
 * pointers: the base alone) on one row. */
static void forward(const fixture *f, float *const a[2], float *const b[2],
                    size_t rank, const float *x, double *y)
{
    double h[D1];
    double s = ALPHA / (double)rank;
    for (int o = 0; o < D1; o++) {
        double acc = f->b0[o];
        for (int i = 0; i < D0; i++)
            acc += (double)f->w0[o * D0 + i] * x[i];
        h[o] = acc;
    }
    if (a[0]) {
        double u[3] = {0};
        for (size_t r = 0; r < rank; r++)
            for (int i = 0; i < D0; i++)
                u[r] += (double)a[0][r * D0 + i] * x[i];
        for (int o = 0; o < D1; o++)
            for (size_t r = 0; r < rank; r++)
                h[o] += s * b[0][o * rank + r] * u[r];
    }
    for (int o = 0; o < D2; o++) {
        double acc = 0;
        for (int i = 0; i < D1; i++)
            acc += (double)f->w1t[i * D2 + o] * h[i];
        y[o] = acc;
    }
    if (a[1]) {
        double u[3] = {0};
        for (size_t r = 0; r < rank; r++)
            for (int i = 0; i < D1; i++)
                u[r] += (double)a[1][r * D1 + i] * h[i];
        for (int o = 0; o < D2; o++)
            for (size_t r = 0; r < rank; r++)
                y[o] += s * b[1][o * rank + r] * u[r];
    }
}

/* Data: task t's targets are the stack changed by a rank-1 update of each
 * layer, its inputs centred on a task's own mean. */
static void make_data(const fixture *f, float *x, float *y, int32_t *task)
{
    test_rng rng;
    test_rng_seed(&rng, 77);
    float ta[2][2][D1], tb[2][2][D1];
    for (int t = 0; t < 2; t++)
        for (int l = 0; l < 2; l++) {
            test_fill_uniform(&rng, ta[t][l], D1, -0.5, 0.5);
            test_fill_uniform(&rng, tb[t][l], D1, -0.5, 0.5);
        }
    for (int n = 0; n < N; n++) {
        int t = n % 5 < 2 ? 0 : 1;
        task[n] = t;
        for (int i = 0; i < D0; i++)
            x[n * D0 + i] = (float)(test_uniform(&rng, -1, 1) +
                                    (t ? 0.5 : -0.5) * (i % 2 ? 1 : -1));
        /* The true change: rank 1, scale 1 (A = ta, B = tb / s). */
        float *a[2] = {ta[t][0], ta[t][1]};
        float bb[2][D1];
        for (int o = 0; o < D1; o++)
            bb[0][o] = tb[t][0][o] / ALPHA;
        for (int o = 0; o < D2; o++)
            bb[1][o] = tb[t][1][o] / ALPHA;
        float *b[2] = {bb[0], bb[1]};
        double yy[D2];
        forward(f, a, b, 1, x + n * D0, yy);
        for (int o = 0; o < D2; o++)
            y[n * D2 + o] = (float)yy[o];
    }
}

/* With held_in non-zero, rows 0..HELD of the same arrays also make the
 * held-out split, x_heldout [HELD, held_in]. */
enum { HELD = 20 };
static size_t held_in;

static void save_data(const char *path, const float *x, size_t d_in,
                      const float *y, const int32_t *task, size_t n)
{
    atmoe_safetensors_writer *w;
    ck_assert_status(atmoe_safetensors_writer_new(NULL, &w), NULL);
    save_tensor(w, "x", n, d_in, x);
    save_tensor(w, "y", n, D2, y);
    uint64_t s[1] = {n}, hs[1] = {HELD};
    ck_assert_status(atmoe_safetensors_writer_add(w, "task",
                                                  ATMOE_SAFETENSORS_I32, 1, s,
                                                  task),
                     NULL);
    if (held_in) {
        save_tensor(w, "x_heldout", HELD, held_in, x);
        save_tensor(w, "y_heldout", HELD, D2, y);
        ck_assert_status(atmoe_safetensors_writer_add(
                             w, "task_heldout", ATMOE_SAFETENSORS_I32, 1, hs,
                             task),
                         NULL);
    }
    ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
    atmoe_safetensors_writer_free(w);
}

typedef struct seen {
    float done_loss[3], held_loss[3];
    int done[3];
    uint64_t steps;
    int stop_at; /* cancel at this step, 0: never */
} seen;

static int on_progress(const atmoe_train_progress *p, void *user)
{
    seen *s = user;
    ck_assert_uint_lt(p->model, 3);
    ck_assert_uint_eq(p->models, 3);
    if (p->done) {
        s->done_loss[p->model] = p->loss;
        s->held_loss[p->model] = p->heldout_loss;
        s->done[p->model] = 1;
        return 0;
    }
    ck_assert(isfinite(p->loss));
    s->steps++;
    return s->stop_at && (int)p->step == s->stop_at;
}

static double host_loss(const fixture *f, float *const a[2],
                        float *const b[2], size_t rank, const float *x,
                        const float *y, const int32_t *task, int want)
{
    double sum = 0;
    size_t rows = 0;
    for (int n = 0; n < N; n++) {
        if (want >= 0 && task[n] != want)
            continue;
        double yy[D2];
        forward(f, a, b, rank, x + n * D0, yy);
        for (int o = 0; o < D2; o++)
            sum += (yy[o] - y[n * D2 + o]) * (yy[o] - y[n * D2 + o]);
        rows++;
    }
    return sum / (double)(rows * D2);
}

static atmoe_manifest *open_manifest(const fixture *f)
{
    char path[512];
    atmoe_manifest *m;
    snprintf(path, sizeof path, "%s/manifest.json", f->dir);
    ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
    return m;
}

static void config(atmoe_train_config *c, seen *s)
{
    ck_assert_status(atmoe_train_config_default(c), NULL);
    c->optimizer.lr = 3e-2f;
    c->optimizer.weight_decay = 0;
    c->steps = 120;
    c->batch = 13;
    c->seed = 5;
    c->progress = on_progress;
    c->user = s;
}

START_TEST(test_stage1_round_trip)
{
    fixture f;
    make_fixture(&f);
    float *x = malloc(N * D0 * sizeof *x), *y = malloc(N * D2 * sizeof *y);
    int32_t task[N];
    make_data(&f, x, y, task);
    char data[512], out[512];
    snprintf(data, sizeof data, "%s/data.safetensors", f.dir);
    snprintf(out, sizeof out, "%s/out", f.dir);
    held_in = D0;
    save_data(data, x, D0, y, task, N);
    held_in = 0;
    atmoe_manifest *m = open_manifest(&f);
    atmoe_train_config c;
    seen s = {0};
    config(&c, &s);
    ck_assert_status(atmoe_train_stage1(CTX, m, data, &c, out), CTX);
    ck_assert_uint_eq(s.steps, 3 * 120);
    for (int k = 0; k < 3; k++) {
        ck_assert(s.done[k]);
        char dir[600];
        snprintf(dir, sizeof dir, "%s/%s", out, names[k]);
        atmoe_adapter *ad;
        ck_assert_status(atmoe_adapter_open(CTX, dir, &ad), CTX);
        atmoe_adapter_info info;
        ck_assert_status(atmoe_adapter_get_info(ad, &info), CTX);
        ck_assert_uint_eq(info.targets, k == 2 ? 1 : 2);
        float *a[2] = {NULL, NULL}, *b[2] = {NULL, NULL};
        float *a0[2] = {NULL, NULL}, *b0[2] = {NULL, NULL};
        for (int l = 0; l < (int)info.targets; l++) {
            size_t idx, din = l ? D1 : D0, dout = l ? D2 : D1, r = ranks[k];
            ck_assert_status(atmoe_adapter_find(ad, l, "proj", &idx), CTX);
            atmoe_adapter_target t;
            ck_assert_status(atmoe_adapter_get_target(ad, idx, &t), CTX);
            ck_assert_uint_eq(t.rank, r);
            ck_assert_float_eq(t.alpha, ALPHA);
            a[l] = malloc(r * din * sizeof(float));
            b[l] = malloc(r * dout * sizeof(float));
            test_poison(a[l], r * din);
            test_poison(b[l], r * dout);
            ck_assert_status(atmoe_adapter_read(ad, idx, a[l], r * din, b[l],
                                                r * dout),
                             CTX);
            a0[l] = f.a[k][l];
            b0[l] = f.b[k][l];
        }
        /* The saved tensors give the trainer's loss (a float32 device
         * forward against float64 here), far below the untrained one. */
        int want = k == 2 ? -1 : k;
        double got = host_loss(&f, a, b, ranks[k], x, y, task, want);
        double before = host_loss(&f, a0, b0, ranks[k], x, y, task, want);
        ck_assert_msg(isfinite(got) &&
                          fabs(got - s.done_loss[k]) <= 1e-3 * got + 1e-7,
                      "model %d: host loss %g, trainer's %g", k, got,
                      (double)s.done_loss[k]);
        /* The held-out split is rows 0 .. HELD of the same data. */
        double hsum = 0;
        size_t hrows = 0;
        for (int n = 0; n < HELD; n++) {
            if (want >= 0 && task[n] != want)
                continue;
            double yy[D2];
            forward(&f, a, b, ranks[k], x + n * D0, yy);
            for (int o = 0; o < D2; o++)
                hsum += (yy[o] - y[n * D2 + o]) * (yy[o] - y[n * D2 + o]);
            hrows++;
        }
        double hgot = hsum / (double)(hrows * D2);
        ck_assert_msg(fabs(hgot - s.held_loss[k]) <= 1e-3 * hgot + 1e-7,
                      "model %d: held-out host loss %g, trainer's %g", k,
                      hgot, (double)s.held_loss[k]);
        double ratio = k == 2 ? 0.9 : 0.2;
        ck_assert_msg(got < ratio * before,
                      "model %d: loss %g after training, %g before", k, got,
                      before);
        for (int l = 0; l < 2; l++) {
            free(a[l]);
            free(b[l]);
        }
        atmoe_adapter_free(ad);
    }
    atmoe_manifest_free(m);
    free(x);
    free(y);
    test_rmdir_r(f.dir);
}
END_TEST

/* The stack of the manifest at path on every row, its mean squared error
 * against y, through atmoe_manifest_build (what atmoe run computes). */
static double manifest_loss(const char *path, const float *x, const float *y)
{
    atmoe_manifest *m;
    ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
    atmoe_graph *g;
    atmoe_node xn, out;
    size_t xs[2] = {N, D0};
    ck_assert_status(atmoe_graph_new(CTX, &g), CTX);
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0,
                                       &xn),
                     CTX);
    ck_assert_status(atmoe_manifest_build(m, g, xn, ATMOE_NODE_NONE,
                                          ATMOE_NODE_NONE, NULL, NULL, &out),
                     CTX);
    ck_assert_status(atmoe_graph_mark_output(g, out), CTX);
    ck_assert_status(atmoe_graph_plan(g, 0), CTX);
    ck_assert_status(atmoe_graph_set_input(g, xn, x, N * D0 * sizeof *x, 0),
                     CTX);
    ck_assert_status(atmoe_graph_compute(g, 0), CTX);
    float *got = malloc(N * D2 * sizeof *got);
    test_poison(got, N * D2);
    ck_assert_status(atmoe_graph_read(g, out, got, N * D2 * sizeof *got), CTX);
    double sum = 0;
    for (int i = 0; i < N * D2; i++)
        sum += ((double)got[i] - y[i]) * ((double)got[i] - y[i]);
    free(got);
    atmoe_graph_free(g);
    atmoe_manifest_free(m);
    return sum / (N * D2);
}

/* Stage 1's experts, then stage 2's routers over them: the manifest it
 * writes gives the trainer's loss when built again (as atmoe run does), and
 * routing the trained experts beats their uniform mix. */
START_TEST(test_stage2_round_trip)
{
    fixture f;
    make_fixture(&f);
    float *x = malloc(N * D0 * sizeof *x), *y = malloc(N * D2 * sizeof *y);
    int32_t task[N];
    make_data(&f, x, y, task);
    char data[512], out[512], path[600], out2[512];
    snprintf(data, sizeof data, "%s/data.safetensors", f.dir);
    snprintf(out, sizeof out, "%s/out", f.dir);
    snprintf(out2, sizeof out2, "%s/routed", f.dir);
    save_data(data, x, D0, y, task, N);
    atmoe_manifest *m = open_manifest(&f);
    atmoe_train_config c;
    seen s = {0};
    config(&c, &s);
    ck_assert_status(atmoe_train_stage1(CTX, m, data, &c, out), CTX);
    atmoe_manifest_free(m);

    /* The same stack over the trained experts, routers absent (zeros). */
    const char *from = "\"weights\": \"base.safetensors\"";
    const char *to = "\"weights\": \"../base.safetensors\"";
    char text[2048];
    const char *at = strstr(manifest_text, from);
    ck_assert_ptr_nonnull(at);
    snprintf(text, sizeof text, "%.*s%s%s", (int)(at - manifest_text),
             manifest_text, to, at + strlen(from));
    snprintf(path, sizeof path, "%s/manifest.json", out);
    test_write_file(path, text, strlen(text));
    double uniform = manifest_loss(path, x, y);

    ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
    c.steps = 150;
    c.progress = NULL;
    double trained = NAN;
    ck_assert_status(atmoe_train_stage2(CTX, m, data, &c, out2, &trained),
                     CTX);
    atmoe_manifest_free(m);
    snprintf(path, sizeof path, "%s/manifest.json", out2);
    double rerun = manifest_loss(path, x, y);
    ck_assert_msg(isfinite(rerun) && fabs(rerun - trained) <= 1e-4 * rerun,
                  "the written manifest gives %g, the trainer said %g",
                  rerun, trained);
    ck_assert_msg(trained < 0.7 * uniform,
                  "routed loss %g, uniform routing %g", trained, uniform);
    free(x);
    free(y);
    test_rmdir_r(f.dir);
}
END_TEST

static int exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* The rank-1 stack of the T-REX test: one module D0 -> D1, v1 with E = 4
 * experts routed by router and intuition, scores of S samples. */
enum { E1 = 4, S1 = 6 };
/* Classification: C classes of the stage tests' head, and the label that
 * marks a row ignored. */
enum { C = 5, IGN = -1 };

/* The MSE of the manifest at path over every row, each routed with its
 * sample's scores (what atmoe run computes from the same inputs), given
 * as scores (width E1) or embeddings (width D, embeddings 1); with labels,
 * the mean cross-entropy of its head's C1 logits over the rows not
 * ignored. */
enum { C1 = 3 };
static double trex_loss_with(const char *path, const float *x,
                             const float *y, const int32_t *sample,
                             const float *table, size_t width,
                             int embeddings, const int32_t *labels)
{
    atmoe_manifest *m;
    ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
    atmoe_graph *g;
    atmoe_node xn, gi, sc, out;
    size_t xs[2] = {N, D0}, is[1] = {N}, ss[2] = {S1, width};
    ck_assert_status(atmoe_graph_new(CTX, &g), CTX);
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0,
                                       &xn), CTX);
    ck_assert_status(atmoe_graph_input(g, "gi", ATMOE_DTYPE_I32, 1, is, 0,
                                       &gi), CTX);
    ck_assert_status(atmoe_graph_constant(g, "scores", ATMOE_DTYPE_F32, 2,
                                          ss, table, &sc), CTX);
    atmoe_manifest_inputs in = {ATMOE_NODE_NONE, gi,
                                embeddings ? sc : ATMOE_NODE_NONE,
                                embeddings ? ATMOE_NODE_NONE : sc};
    ck_assert_status(atmoe_manifest_build_with(m, g, xn, &in, NULL, NULL,
                                               NULL, &out), CTX);
    size_t ow = D1;
    if (labels) {
        ck_assert_status(atmoe_manifest_build_head(m, g, out, &out), CTX);
        ow = C1;
    }
    ck_assert_status(atmoe_graph_mark_output(g, out), CTX);
    ck_assert_status(atmoe_graph_plan(g, 0), CTX);
    ck_assert_status(atmoe_graph_set_input(g, xn, x, N * D0 * sizeof *x, 0),
                     CTX);
    ck_assert_status(atmoe_graph_set_input(g, gi, sample, N * sizeof *sample,
                                           0), CTX);
    ck_assert_status(atmoe_graph_compute(g, 0), CTX);
    float *got = malloc(N * ow * sizeof *got);
    test_poison(got, N * ow);
    ck_assert_status(atmoe_graph_read(g, out, got, N * ow * sizeof *got),
                     CTX);
    double sum = 0;
    size_t count = 0;
    for (int n = 0; n < N && labels; n++) {
        if (labels[n] == IGN)
            continue;
        const float *z = got + n * C1;
        double mx = z[0], e = 0;
        for (int c = 1; c < C1; c++)
            mx = z[c] > mx ? z[c] : mx;
        for (int c = 0; c < C1; c++)
            e += exp(z[c] - mx);
        sum += mx + log(e) - z[labels[n]];
        count++;
    }
    for (int i = 0; i < N * D1 && !labels; i++)
        sum += ((double)got[i] - y[i]) * ((double)got[i] - y[i]);
    free(got);
    atmoe_graph_free(g);
    atmoe_manifest_free(m);
    return sum / (double)(labels ? count : N * D1);
}

static double trex_loss(const char *path, const float *x, const float *y,
                        const int32_t *sample, const float *scores,
                        const int32_t *labels)
{
    return trex_loss_with(path, x, y, sample, scores, E1, 0, labels);
}

/* The T-REX problem in dir: w.safetensors (the base w0 and A, B as the
 * reference initialises them), manifest.json (one v1 module of E1
 * experts), data.safetensors (x, y, sample, scores; y times y_scale).
 * x [N, D0], y [N, D1], sample [N] and scores [S1, E1] are the caller's. */
static void trex_problem(const char *dir, float *x, float *y,
                         int32_t *sample, float *scores, double y_scale)
{
    char path[600];
    test_rng rng;
    test_rng_seed(&rng, 1414);
    float w0[D1 * D0], a[E1 * D0], b[D1 * E1] = {0};
    float ta[E1 * D0], tb[D1 * E1];
    test_fill_uniform(&rng, w0, D1 * D0, -0.4, 0.4);
    ck_assert_status(atmoe_context_finish(CTX), CTX);
    atmoe_tensor *at;
    size_t as[2] = {E1, D0};
    ck_assert_status(atmoe_tensor_new(CTX, ATMOE_DTYPE_F32, 2, as, &at), CTX);
    ck_assert_status(atmoe_mor1e_init(at, NULL, NULL, NULL, NULL, 9), CTX);
    ck_assert_status(atmoe_tensor_read(at, a, sizeof a), CTX);
    atmoe_tensor_free(at);
    test_fill_uniform(&rng, scores, S1 * E1, -1, 1);
    test_fill_uniform(&rng, ta, E1 * D0, -0.5, 0.5);
    test_fill_uniform(&rng, tb, D1 * E1, -0.5, 0.5);
    atmoe_safetensors_writer *w;
    ck_assert_status(atmoe_safetensors_writer_new(NULL, &w), NULL);
    save_tensor(w, "w0", D1, D0, w0);
    save_tensor(w, "a", E1, D0, a);
    save_tensor(w, "b", D1, E1, b);
    snprintf(path, sizeof path, "%s/w.safetensors", dir);
    ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
    atmoe_safetensors_writer_free(w);
    const char *text =
        "{\"version\": 1, \"weights\": \"w.safetensors\", \"layers\": "
        "[{\"modules\": {\"proj\": {\"weight\": \"w0\", \"rank1\": "
        "{\"a\": \"a\", \"b\": \"b\", \"variant\": \"v1\"}}}}]}";
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    test_write_file(path, text, strlen(text));

    /* Targets: the base plus a rank-4 change, scaled per sample. */
    test_fill_uniform(&rng, x, N * D0, -1, 1);
    for (int n = 0; n < N; n++) {
        sample[n] = n % S1;
        for (int o = 0; o < D1; o++) {
            double acc = 0;
            for (int i = 0; i < D0; i++)
                acc += (double)w0[o * D0 + i] * x[n * D0 + i];
            for (int r = 0; r < E1; r++) {
                double u = 0;
                for (int i = 0; i < D0; i++)
                    u += (double)ta[r * D0 + i] * x[n * D0 + i];
                acc += tb[o * E1 + r] * u * (1 + scores[sample[n] * E1 + r]);
            }
            y[n * D1 + o] = (float)(acc * y_scale);
        }
    }
    atmoe_safetensors_writer *dw;
    ck_assert_status(atmoe_safetensors_writer_new(NULL, &dw), NULL);
    save_tensor(dw, "x", N, D0, x);
    save_tensor(dw, "y", N, D1, y);
    save_tensor(dw, "scores", S1, E1, scores);
    uint64_t ns[1] = {N};
    ck_assert_status(atmoe_safetensors_writer_add(dw, "sample",
                                                  ATMOE_SAFETENSORS_I32, 1,
                                                  ns, sample), NULL);
    snprintf(path, sizeof path, "%s/data.safetensors", dir);
    ck_assert_status(atmoe_safetensors_writer_save(dw, path), NULL);
    atmoe_safetensors_writer_free(dw);
}

static void trex_config(atmoe_train_config *c, float lr)
{
    ck_assert_status(atmoe_train_config_default(c), NULL);
    c->optimizer.lr = lr;
    c->optimizer.weight_decay = 0;
    c->steps = 150;
    c->batch = 16;
}

/* T-REX: trained jointly from the reference initialisation (B, W_r and the
 * gates zero), the written manifest gives the trainer's loss, well below
 * the start's. */
START_TEST(test_trex_round_trip)
{
    char dir[256], path[600], data[512], out[512];
    test_mkdtemp(dir, sizeof dir, "recipe");
    float *x = malloc(N * D0 * sizeof *x), *y = malloc(N * D1 * sizeof *y);
    float scores[S1 * E1];
    int32_t sample[N];
    trex_problem(dir, x, y, sample, scores, 1);
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    snprintf(data, sizeof data, "%s/data.safetensors", dir);

    atmoe_manifest *m;
    ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
    atmoe_train_config c;
    trex_config(&c, 1e-2f);
    snprintf(out, sizeof out, "%s/out", dir);
    double trained = NAN;
    atmoe_status st = atmoe_train_trex(CTX, m, data, &c, out, &trained);
    atmoe_manifest_free(m);
    /* The rank-1 layer has a backward: NOT_SUPPORTED is a failure. */
    ck_assert_status(st, CTX);
    double before = trex_loss(path, x, y, sample, scores, NULL);
    snprintf(path, sizeof path, "%s/manifest.json", out);
    double rerun = trex_loss(path, x, y, sample, scores, NULL);
    ck_assert_msg(isfinite(rerun) && fabs(rerun - trained) <= 1e-4 * rerun,
                  "the written manifest gives %g, the trainer said %g",
                  rerun, trained);
    ck_assert_msg(trained < 0.5 * before, "trained %g, at the start %g",
                  trained, before);

    /* The same on labels over a head W [C1, D1]: the teacher's classes,
     * every ninth row ignored. */
    float hw[C1 * D1];
    int32_t labels[N];
    test_rng rng;
    test_rng_seed(&rng, 1415);
    test_fill_uniform(&rng, hw, C1 * D1, -2, 2);
    for (int n = 0; n < N; n++) {
        int best = 0;
        double z[C1];
        for (int k = 0; k < C1; k++) {
            z[k] = 0;
            for (int o = 0; o < D1; o++)
                z[k] += (double)hw[k * D1 + o] * y[n * D1 + o];
            best = z[k] > z[best] ? k : best;
        }
        labels[n] = n % 9 == 4 ? IGN : best;
    }
    atmoe_safetensors_writer *w, *dw;
    uint64_t ns[1] = {N};
    ck_assert_status(atmoe_safetensors_writer_new(NULL, &w), NULL);
    save_tensor(w, "hw", C1, D1, hw);
    snprintf(path, sizeof path, "%s/head.safetensors", dir);
    ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
    atmoe_safetensors_writer_free(w);
    ck_assert_status(atmoe_safetensors_writer_new(NULL, &dw), NULL);
    save_tensor(dw, "x", N, D0, x);
    save_tensor(dw, "scores", S1, E1, scores);
    ck_assert_status(atmoe_safetensors_writer_add(dw, "labels",
                                                  ATMOE_SAFETENSORS_I32, 1,
                                                  ns, labels), NULL);
    ck_assert_status(atmoe_safetensors_writer_add(dw, "sample",
                                                  ATMOE_SAFETENSORS_I32, 1,
                                                  ns, sample), NULL);
    ck_assert_status(atmoe_safetensors_writer_save(dw, data), NULL);
    atmoe_safetensors_writer_free(dw);
    const char *htext =
        "{\"version\": 1, \"weights\": \"w.safetensors\", \"head\": "
        "{\"file\": \"head.safetensors\", \"tensor\": \"hw\", "
        "\"ignore_index\": -1}, \"layers\": "
        "[{\"modules\": {\"proj\": {\"weight\": \"w0\", \"rank1\": "
        "{\"a\": \"a\", \"b\": \"b\", \"variant\": \"v1\"}}}}]}";
    snprintf(path, sizeof path, "%s/head.json", dir);
    test_write_file(path, htext, strlen(htext));
    ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
    snprintf(out, sizeof out, "%s/out-labels", dir);
    ck_assert_status(atmoe_train_trex(CTX, m, data, &c, out, &trained), CTX);
    atmoe_manifest_free(m);
    before = trex_loss(path, x, y, sample, scores, labels);
    snprintf(path, sizeof path, "%s/manifest.json", out);
    rerun = trex_loss(path, x, y, sample, scores, labels);
    ck_assert_msg(isfinite(rerun) && fabs(rerun - trained) <= 1e-4 * rerun,
                  "labels: the written manifest gives %.7g, the trainer said "
                  "%.7g", rerun, trained);
    ck_assert_msg(trained < 0.5 * before, "labels: trained %g, at the start "
                  "%g", trained, before);
    free(x);
    free(y);
    test_rmdir_r(dir);
}
END_TEST

typedef struct trex_seen {
    uint64_t steps, skipped;
    float initial, done_loss;
    int done;
} trex_seen;

static int trex_progress(const atmoe_train_progress *p, void *user)
{
    trex_seen *s = user;
    if (p->done) {
        s->done = 1;
        s->done_loss = p->loss;
    } else {
        s->steps++;
    }
    s->skipped = p->skipped;
    s->initial = p->initial_loss;
    return 0;
}

/* Training that does not train fails, writing nothing, rather than
 * succeed at the untrained loss.  At lr 0.1 AdamW moves the gates w by
 * about 0.1 a step, their logits 100 w by about 10: the main gate c =
 * sigmoid(100 w_c) reaches 0 to float precision within a few steps, and
 * every gradient behind it with it (NO_PROGRESS, the gate named).  Targets
 * of 1e20 make every loss infinite: every step is skipped (NOT_FINITE,
 * counted in the progress). */
START_TEST(test_trex_no_progress)
{
    char dir[256], path[600], data[512], out[512];
    test_mkdtemp(dir, sizeof dir, "recipe");
    float *x = malloc(N * D0 * sizeof *x), *y = malloc(N * D1 * sizeof *y);
    float scores[S1 * E1];
    int32_t sample[N];
    trex_problem(dir, x, y, sample, scores, 1);
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    snprintf(data, sizeof data, "%s/data.safetensors", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    atmoe_manifest *m;
    ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
    atmoe_train_config c;
    trex_config(&c, 1e-1f);
    trex_seen s = {0};
    c.progress = trex_progress;
    c.user = &s;
    double trained = -1;
    ck_assert_fails_with(atmoe_train_trex(CTX, m, data, &c, out, &trained),
                         CTX, ATMOE_STATUS_NO_PROGRESS, "c = ");
    ck_assert_msg(strstr(atmoe_errmsg(CTX), "made no progress") &&
                      strstr(atmoe_errmsg(CTX), "layers.0.proj.w_c"),
                  "message: %s", atmoe_errmsg(CTX));
    ck_assert(!exists(out));
    ck_assert(trained == -1);
    ck_assert_uint_eq(s.steps, 150);
    ck_assert(s.done);
    ck_assert_uint_eq(s.skipped, 0);
    /* The initial loss is the untrained manifest's, as atmoe run gives it. */
    double before = trex_loss(path, x, y, sample, scores, NULL);
    ck_assert_msg(fabs(s.initial - before) <= 1e-4 * before,
                  "initial loss %g, the untrained manifest's %g",
                  (double)s.initial, before);
    ck_assert(!(s.done_loss < s.initial));

    trex_problem(dir, x, y, sample, scores, 1e20);
    memset(&s, 0, sizeof s);
    c.steps = 6;
    ck_assert_fails_with(atmoe_train_trex(CTX, m, data, &c, out, &trained),
                         CTX, ATMOE_STATUS_NOT_FINITE,
                         "all 6 steps skipped as not finite");
    ck_assert(!exists(out));
    ck_assert_uint_eq(s.steps, 6);
    ck_assert_uint_eq(s.skipped, 6);
    atmoe_manifest_free(m);
    free(x);
    free(y);
    test_rmdir_r(dir);
}
END_TEST

/* x, y, sample and, unless name is NULL, the samples' table name [S1, w]
 * into the data file path. */
static void save_trex_data(const char *path, const float *x, const float *y,
                           const int32_t *sample, const char *name,
                           const float *table, size_t w)
{
    atmoe_safetensors_writer *dw;
    ck_assert_status(atmoe_safetensors_writer_new(NULL, &dw), NULL);
    save_tensor(dw, "x", N, D0, x);
    save_tensor(dw, "y", N, D1, y);
    if (name)
        save_tensor(dw, name, S1, w, table);
    uint64_t ns[1] = {N};
    ck_assert_status(atmoe_safetensors_writer_add(dw, "sample",
                                                  ATMOE_SAFETENSORS_I32, 1,
                                                  ns, sample), NULL);
    ck_assert_status(atmoe_safetensors_writer_save(dw, path), NULL);
    atmoe_safetensors_writer_free(dw);
}

/* T-REX on the samples' embeddings [S1, DE] instead of their scores: the
 * trainer scores them against the manifest's centroids [E1, DE] in its
 * graph; its loss is that of the written manifest built with the same
 * embeddings (what atmoe run computes), and that of the manifest given
 * the scores C e / |e| computed here in float64.  Bad embeddings are
 * refused with a message naming the row, and nothing is written. */
enum { DE = 5 };
START_TEST(test_trex_embeddings)
{
    char dir[256], path[600], data[512], out[512], mpath[600];
    test_mkdtemp(dir, sizeof dir, "recipe");
    float *x = malloc(N * D0 * sizeof *x), *y = malloc(N * D1 * sizeof *y);
    float scores[S1 * E1], emb[S1 * DE], cent[E1 * DE], host[S1 * E1];
    int32_t sample[N];
    trex_problem(dir, x, y, sample, scores, 1);
    test_rng rng;
    test_rng_seed(&rng, 1415);
    test_fill_uniform(&rng, emb, S1 * DE, -2, 2);
    test_fill_uniform(&rng, cent, E1 * DE, -1, 1);
    for (int r = 0; r < S1; r++) {
        double norm = 0;
        for (int i = 0; i < DE; i++)
            norm += (double)emb[r * DE + i] * emb[r * DE + i];
        norm = sqrt(norm);
        for (int k = 0; k < E1; k++) {
            double acc = 0;
            for (int i = 0; i < DE; i++)
                acc += (double)cent[k * DE + i] * emb[r * DE + i] / norm;
            host[r * E1 + k] = (float)acc;
        }
    }
    atmoe_safetensors_writer *w;
    ck_assert_status(atmoe_safetensors_writer_new(NULL, &w), NULL);
    save_tensor(w, "centroids", E1, DE, cent);
    snprintf(path, sizeof path, "%s/c.safetensors", dir);
    ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
    atmoe_safetensors_writer_free(w);
    const char *text =
        "{\"version\": 1, \"weights\": \"w.safetensors\", \"centroids\": "
        "{\"file\": \"c.safetensors\", \"tensor\": \"centroids\"}, "
        "\"layers\": [{\"modules\": {\"proj\": {\"weight\": \"w0\", "
        "\"rank1\": {\"a\": \"a\", \"b\": \"b\", \"variant\": \"v1\"}}}}]}";
    snprintf(mpath, sizeof mpath, "%s/centroids.json", dir);
    test_write_file(mpath, text, strlen(text));
    snprintf(data, sizeof data, "%s/emb.safetensors", dir);
    save_trex_data(data, x, y, sample, "embeddings", emb, DE);

    atmoe_manifest *m;
    ck_assert_status(atmoe_manifest_open(CTX, mpath, &m), CTX);
    atmoe_train_config c;
    trex_config(&c, 1e-2f);
    snprintf(out, sizeof out, "%s/out", dir);
    double trained = NAN;
    ck_assert_status(atmoe_train_trex(CTX, m, data, &c, out, &trained), CTX);
    atmoe_manifest_free(m);
    double before = trex_loss_with(mpath, x, y, sample, emb, DE, 1, NULL);
    snprintf(path, sizeof path, "%s/manifest.json", out);
    double rerun = trex_loss_with(path, x, y, sample, emb, DE, 1, NULL);
    double scored = trex_loss(path, x, y, sample, host, NULL);
    ck_assert_msg(isfinite(rerun) && fabs(rerun - trained) <= 1e-4 * rerun,
                  "the written manifest on the embeddings gives %g, the "
                  "trainer said %g", rerun, trained);
    ck_assert_msg(fabs(scored - trained) <= 1e-4 * scored,
                  "the written manifest on float64 scores gives %g, the "
                  "trainer said %g", scored, trained);
    ck_assert_msg(trained < 0.5 * before, "trained %g, at the start %g",
                  trained, before);
    test_rmdir_r(out);

    /* Refused, nothing written. */
    ck_assert_status(atmoe_manifest_open(CTX, mpath, &m), CTX);
    c.steps = 3;
    save_trex_data(data, x, y, sample, NULL, NULL, 0);
    ck_assert_fails_with(atmoe_train_trex(CTX, m, data, &c, out, NULL), CTX,
                         ATMOE_STATUS_NOT_FOUND, "or embeddings [S, D]");
    ck_assert(!exists(out));
    save_trex_data(data, x, y, sample, "embeddings", emb, DE - 1);
    ck_assert_fails_with(atmoe_train_trex(CTX, m, data, &c, out, NULL), CTX,
                         ATMOE_STATUS_SHAPE_MISMATCH,
                         "must be [S, 5], as wide as the manifest's "
                         "centroids [4, 5]");
    ck_assert(!exists(out));
    float bad[S1 * DE];
    memcpy(bad, emb, sizeof bad);
    for (int i = 0; i < DE; i++)
        bad[2 * DE + i] = 0;
    save_trex_data(data, x, y, sample, "embeddings", bad, DE);
    ck_assert_fails_with(atmoe_train_trex(CTX, m, data, &c, out, NULL), CTX,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "embeddings row 2 has norm 0");
    ck_assert(!exists(out));
    memcpy(bad, emb, sizeof bad);
    bad[3 * DE + 1] = NAN;
    save_trex_data(data, x, y, sample, "embeddings", bad, DE);
    ck_assert_fails_with(atmoe_train_trex(CTX, m, data, &c, out, NULL), CTX,
                         ATMOE_STATUS_NOT_FINITE,
                         "embeddings row 3, column 1 is not finite");
    ck_assert(!exists(out));
    atmoe_manifest_free(m);
    /* A manifest without centroids. */
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
    save_trex_data(data, x, y, sample, "embeddings", emb, DE);
    ck_assert_fails_with(atmoe_train_trex(CTX, m, data, &c, out, NULL), CTX,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "the manifest names no centroids");
    ck_assert(!exists(out));
    atmoe_manifest_free(m);
    free(x);
    free(y);
    test_rmdir_r(dir);
}
END_TEST

static int stop_model1(const atmoe_train_progress *p, void *user)
{
    (void)user;
    return !p->done && p->model == 1 && p->step == 7;
}

/* Stage 1 stopped at model 1's step 7 and resumed from its checkpoints
 * ends with the adapters, byte for byte, of a run that was not stopped. */
START_TEST(test_stage1_resume)
{
    fixture f;
    make_fixture(&f);
    float *x = malloc(N * D0 * sizeof *x), *y = malloc(N * D2 * sizeof *y);
    int32_t task[N];
    make_data(&f, x, y, task);
    char data[512], a[512], b[512], ca[512], cb[512];
    snprintf(data, sizeof data, "%s/data.safetensors", f.dir);
    snprintf(a, sizeof a, "%s/a", f.dir);
    snprintf(b, sizeof b, "%s/b", f.dir);
    snprintf(ca, sizeof ca, "%s/ckpt-a", f.dir);
    snprintf(cb, sizeof cb, "%s/ckpt-b", f.dir);
    save_data(data, x, D0, y, task, N);
    atmoe_manifest *m = open_manifest(&f);
    atmoe_train_config c;
    seen s = {0};
    config(&c, &s);
    c.steps = 12;
    c.progress = NULL;
    c.checkpoint = ca;
    c.checkpoint_every = 4;
    ck_assert_status(atmoe_train_stage1(CTX, m, data, &c, a), CTX);
    c.checkpoint = cb;
    c.progress = stop_model1;
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, b), CTX,
                         ATMOE_STATUS_CANCELLED, "step 7");
    ck_assert(!exists(b));
    c.progress = NULL;
    c.resume = 1;
    ck_assert_status(atmoe_train_stage1(CTX, m, data, &c, b), CTX);
    for (int k = 0; k < 3; k++) {
        char pa[600], pb[600];
        snprintf(pa, sizeof pa, "%s/%s/adapter_model.safetensors", a,
                 names[k]);
        snprintf(pb, sizeof pb, "%s/%s/adapter_model.safetensors", b,
                 names[k]);
        size_t na, nb;
        void *da = test_read_file(pa, &na), *db = test_read_file(pb, &nb);
        ck_assert_msg(na == nb && memcmp(da, db, na) == 0,
                      "%s: the resumed run's adapter differs", names[k]);
        free(da);
        free(db);
    }
    atmoe_manifest_free(m);
    free(x);
    free(y);
    test_rmdir_r(f.dir);
}
END_TEST


/* Bad data: the status, a message naming what is wrong, no output. */
START_TEST(test_stage1_bad_input)
{
    fixture f;
    make_fixture(&f);
    /* Zeroed: the rows too wide for make_data are written as they are. */
    float *x = calloc(N * (D0 + 1), sizeof *x);
    float *y = malloc(N * D2 * sizeof *y);
    int32_t task[N];
    make_data(&f, x, y, task);
    char data[512], out[512];
    snprintf(data, sizeof data, "%s/data.safetensors", f.dir);
    snprintf(out, sizeof out, "%s/out", f.dir);
    atmoe_manifest *m = open_manifest(&f);
    atmoe_train_config c;
    seen s = {0};
    config(&c, &s);
    c.steps = 4;

    save_data(data, x, D0 + 1, y, task, N);
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_SHAPE_MISMATCH, "x must be [N, 9]");
    ck_assert(!exists(out));

    held_in = D0 - 1;
    save_data(data, x, D0, y, task, N);
    held_in = 0;
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_SHAPE_MISMATCH,
                         "x_heldout must be [N, 9]");
    ck_assert(!exists(out));

    task[37] = 2;
    save_data(data, x, D0, y, task, N);
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_OUT_OF_RANGE, "row 37 is 2");
    ck_assert(!exists(out));

    for (int n = 0; n < N; n++)
        task[n] = 0;
    save_data(data, x, D0, y, task, N);
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_INVALID_ARGUMENT, "task 1 (adapter");
    ck_assert(!exists(out));

    make_data(&f, x, y, task);
    x[41 * D0 + 3] = NAN;
    save_data(data, x, D0, y, task, N);
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_NOT_FINITE, "x row 41, column 3");
    ck_assert(!exists(out));

    /* Stopped by the callback at a step boundary: nothing written. */
    make_data(&f, x, y, task);
    save_data(data, x, D0, y, task, N);
    s.stop_at = 3;
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_CANCELLED, "step 3");
    ck_assert_uint_eq(s.steps, 3);
    ck_assert(!exists(out));

    c.batch = 0;
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_INVALID_ARGUMENT, "batch");
    ck_assert_fails_with(atmoe_train_stage1(CTX, NULL, data, &c, out), CTX,
                         ATMOE_STATUS_NULL_POINTER, "manifest is NULL");
    ck_assert_fails(atmoe_train_config_default(NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    atmoe_manifest_free(m);
    free(x);
    free(y);
    test_rmdir_r(f.dir);
}
END_TEST

/* ------------------------------------------------------------------------
 * Classification: labels [N] over the manifest's linear head, trained with
 * the cross-entropy of its logits (rows labelled IGN left out).
 * ------------------------------------------------------------------------ */

/* The manifest of the fixture with "head" (head.weight, stored F64, and
 * its bias), the weights file named weights. */
static void head_manifest(char *buf, size_t size, const char *weights,
                          const char *head)
{
    const char *from = "\"weights\": \"base.safetensors\"";
    const char *at = strstr(manifest_text, from);
    ck_assert_ptr_nonnull(at);
    snprintf(buf, size, "%.*s\"weights\": \"%s\", \"head\": %s%s",
             (int)(at - manifest_text), manifest_text, weights, head,
             at + strlen(from));
}

static const char *const head_json =
    "{\"tensor\": \"head.weight\", \"bias\": \"head.bias\", "
    "\"ignore_index\": -1}";

static void write_head_manifest(const fixture *f, const char *name,
                                const char *head)
{
    char text[2048], path[600];
    head_manifest(text, sizeof text, "base.safetensors", head);
    snprintf(path, sizeof path, "%s/%s", f->dir, name);
    test_write_file(path, text, strlen(text));
}

static atmoe_manifest *open_named(const fixture *f, const char *name)
{
    char path[600];
    atmoe_manifest *m;
    snprintf(path, sizeof path, "%s/%s", f->dir, name);
    ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
    return m;
}

/* The head's logits of one output row, in float64. */
static void host_logits(const fixture *f, const double *y, double *z)
{
    for (int c = 0; c < C; c++) {
        double acc = f->hb[c];
        for (int o = 0; o < D2; o++)
            acc += (double)f->hw[c * D2 + o] * y[o];
        z[c] = acc;
    }
}

static double row_ce(const double *z, int label)
{
    double m = z[0], s = 0;
    for (int c = 1; c < C; c++)
        m = z[c] > m ? z[c] : m;
    for (int c = 0; c < C; c++)
        s += exp(z[c] - m);
    return m + log(s) - z[label];
}

/* The teacher's labels: the class the head gives the task's true output
 * (make_data's y); every ninth row ignored. */
static void make_labels(const fixture *f, const float *y, int32_t *labels)
{
    for (int n = 0; n < N; n++) {
        double yy[D2], z[C];
        for (int o = 0; o < D2; o++)
            yy[o] = y[n * D2 + o];
        host_logits(f, yy, z);
        int best = 0;
        for (int c = 1; c < C; c++)
            best = z[c] > z[best] ? c : best;
        labels[n] = n % 9 == 4 ? IGN : best;
    }
}

/* The mean cross-entropy over rows [0, rows) of task want (-1: all), not
 * ignored, of the stack with adapters a, b, in float64. */
static double host_ce(const fixture *f, float *const a[2], float *const b[2],
                      size_t rank, const float *x, const int32_t *labels,
                      const int32_t *task, int want, int rows)
{
    double sum = 0;
    size_t count = 0;
    for (int n = 0; n < rows; n++) {
        if ((want >= 0 && task[n] != want) || labels[n] == IGN)
            continue;
        double yy[D2], z[C];
        forward(f, a, b, rank, x + n * D0, yy);
        host_logits(f, yy, z);
        sum += row_ce(z, labels[n]);
        count++;
    }
    return sum / (double)count;
}

/* x, labels (and y when y is not NULL) and task of n rows; with held, rows
 * 0 .. HELD again as the held-out split. */
static void save_labels(const char *path, const float *x, const float *y,
                        const int32_t *labels, const int32_t *task, size_t n,
                        int held)
{
    atmoe_safetensors_writer *w;
    ck_assert_status(atmoe_safetensors_writer_new(NULL, &w), NULL);
    uint64_t s[1] = {n}, hs[1] = {HELD};
    save_tensor(w, "x", n, D0, x);
    if (y)
        save_tensor(w, "y", n, D2, y);
    ck_assert_status(atmoe_safetensors_writer_add(
                         w, "labels", ATMOE_SAFETENSORS_I32, 1, s, labels),
                     NULL);
    ck_assert_status(atmoe_safetensors_writer_add(w, "task",
                                                  ATMOE_SAFETENSORS_I32, 1, s,
                                                  task),
                     NULL);
    if (held) {
        save_tensor(w, "x_heldout", HELD, D0, x);
        ck_assert_status(atmoe_safetensors_writer_add(
                             w, "labels_heldout", ATMOE_SAFETENSORS_I32, 1,
                             hs, labels),
                         NULL);
        ck_assert_status(atmoe_safetensors_writer_add(
                             w, "task_heldout", ATMOE_SAFETENSORS_I32, 1, hs,
                             task),
                         NULL);
    }
    ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
    atmoe_safetensors_writer_free(w);
}

/* Model k's trained adapter under out: a[l], b[l] (NULL for the layers it
 * does not adapt), to free. */
static void read_trained(const char *out, int k, float *a[2], float *b[2])
{
    char dir[600];
    snprintf(dir, sizeof dir, "%s/%s", out, names[k]);
    atmoe_adapter *ad;
    ck_assert_status(atmoe_adapter_open(CTX, dir, &ad), CTX);
    for (int l = 0; l < 2; l++) {
        a[l] = b[l] = NULL;
        size_t idx, din = l ? D1 : D0, dout = l ? D2 : D1, r = ranks[k];
        if (k == 2 && l == 1)
            continue;
        ck_assert_status(atmoe_adapter_find(ad, l, "proj", &idx), CTX);
        a[l] = malloc(r * din * sizeof(float));
        b[l] = malloc(r * dout * sizeof(float));
        test_poison(a[l], r * din);
        test_poison(b[l], r * dout);
        ck_assert_status(atmoe_adapter_read(ad, idx, a[l], r * din, b[l],
                                            r * dout),
                         CTX);
    }
    atmoe_adapter_free(ad);
}

/* Stage 1 on labels: each model's final and held-out cross-entropy, from
 * its written adapter in float64 here, equal the trainer's, far below the
 * untrained stack's and log C. */
START_TEST(test_stage1_labels)
{
    fixture f;
    make_fixture(&f);
    write_head_manifest(&f, "head.json", head_json);
    float *x = malloc(N * D0 * sizeof *x), *y = malloc(N * D2 * sizeof *y);
    int32_t task[N], labels[N];
    make_data(&f, x, y, task);
    make_labels(&f, y, labels);
    char data[512], out[512];
    snprintf(data, sizeof data, "%s/labels.safetensors", f.dir);
    snprintf(out, sizeof out, "%s/out", f.dir);
    save_labels(data, x, NULL, labels, task, N, 1);
    atmoe_manifest *m = open_named(&f, "head.json");
    atmoe_manifest_info info;
    ck_assert_status(atmoe_manifest_check(m), CTX);
    ck_assert_status(atmoe_manifest_get_info(m, &info), CTX);
    ck_assert_uint_eq(info.classes, C);
    ck_assert_int_eq(info.ignore_index, IGN);
    atmoe_train_config c;
    seen s = {0};
    config(&c, &s);
    ck_assert_status(atmoe_train_stage1(CTX, m, data, &c, out), CTX);
    for (int k = 0; k < 3; k++) {
        ck_assert(s.done[k]);
        float *a[2], *b[2];
        float *a0[2] = {f.a[k][0], k == 2 ? NULL : f.a[k][1]};
        float *b0[2] = {f.b[k][0], k == 2 ? NULL : f.b[k][1]};
        read_trained(out, k, a, b);
        int want = k == 2 ? -1 : k;
        double got = host_ce(&f, a, b, ranks[k], x, labels, task, want, N);
        double held = host_ce(&f, a, b, ranks[k], x, labels, task, want, HELD);
        double before = host_ce(&f, a0, b0, ranks[k], x, labels, task, want,
                                N);
        /* A float32 device forward against float64 here: 1e-4 relative,
         * and 1e-6 absolute for a loss near 0, where the float32 logits'
         * rounding dominates (seen: 6e-8). */
        ck_assert_msg(isfinite(got) &&
                          fabs(got - s.done_loss[k]) <= 1e-4 * got + 1e-6,
                      "model %d: host cross-entropy %.7g, trainer's %.7g", k,
                      got, (double)s.done_loss[k]);
        ck_assert_msg(fabs(held - s.held_loss[k]) <= 1e-4 * held + 1e-6,
                      "model %d: held-out host cross-entropy %.7g, trainer's "
                      "%.7g", k, held, (double)s.held_loss[k]);
        /* The general LoRA adapts one layer for both tasks: less room. */
        double ratio = k == 2 ? 0.7 : 0.5;
        ck_assert_msg(got < ratio * before && got < 0.3 * log(C),
                      "model %d: cross-entropy %g after training, %g before "
                      "(log C %g)", k, got, before, log(C));
        for (int l = 0; l < 2; l++) {
            free(a[l]);
            free(b[l]);
        }
    }
    atmoe_manifest_free(m);
    free(x);
    free(y);
    test_rmdir_r(f.dir);
}
END_TEST

/* Largest |a - b| over n elements relative to b's largest magnitude;
 * +inf when any is not finite. */
static double max_diff(const float *a, const float *b, size_t n)
{
    double big = 0, err = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(b[i]))
            return INFINITY;
        big = fabs(b[i]) > big ? fabs(b[i]) : big;
        err = fabs(a[i] - b[i]) > err ? fabs(a[i] - b[i]) : err;
    }
    return big > 0 ? err / big : err;
}

/* Ignored rows carry no gradient: with garbage inputs in the rows labelled
 * IGN, stage 1 (one batch of every row a step) trains the adapters that
 * the same data without those rows gives, and the same loss. */
START_TEST(test_labels_ignored_rows)
{
    fixture f;
    make_fixture(&f);
    write_head_manifest(&f, "head.json", head_json);
    float *x = malloc(N * D0 * sizeof *x), *y = malloc(N * D2 * sizeof *y);
    float *kx = malloc(N * D0 * sizeof *kx);
    int32_t task[N], labels[N], ktask[N], klabels[N];
    make_data(&f, x, y, task);
    make_labels(&f, y, labels);
    test_rng rng;
    test_rng_seed(&rng, 4242);
    int kept = 0;
    for (int n = 0; n < N; n++) {
        if (labels[n] == IGN) {
            test_fill_uniform(&rng, x + n * D0, D0, -30, 30);
            continue;
        }
        memcpy(kx + kept * D0, x + n * D0, D0 * sizeof *x);
        ktask[kept] = task[n];
        klabels[kept++] = labels[n];
    }
    char all[512], only[512], oa[512], ok[512];
    snprintf(all, sizeof all, "%s/all.safetensors", f.dir);
    snprintf(only, sizeof only, "%s/kept.safetensors", f.dir);
    snprintf(oa, sizeof oa, "%s/out-all", f.dir);
    snprintf(ok, sizeof ok, "%s/out-kept", f.dir);
    save_labels(all, x, NULL, labels, task, N, 0);
    save_labels(only, kx, NULL, klabels, ktask, (size_t)kept, 0);
    atmoe_manifest *m = open_named(&f, "head.json");
    atmoe_train_config c;
    seen sa = {0}, sk = {0};
    config(&c, &sa);
    c.steps = 15;
    c.batch = N;
    ck_assert_status(atmoe_train_stage1(CTX, m, all, &c, oa), CTX);
    c.user = &sk;
    ck_assert_status(atmoe_train_stage1(CTX, m, only, &c, ok), CTX);
    for (int k = 0; k < 3; k++) {
        float *a1[2], *b1[2], *a2[2], *b2[2];
        read_trained(oa, k, a1, b1);
        read_trained(ok, k, a2, b2);
        for (int l = 0; l < 2 && a1[l]; l++) {
            size_t r = ranks[k], na = r * (l ? D1 : D0), nb = r * (l ? D2 : D1);
            double ea = max_diff(a1[l], a2[l], na), eb = max_diff(b1[l], b2[l], nb);
            /* Only the order of the batch's sums differs (seen: 2e-7). */
            ck_assert_msg(ea <= 1e-5 && eb <= 1e-5,
                          "model %d layer %d: with the ignored rows A differs "
                          "by %g, B by %g", k, l, ea, eb);
        }
        ck_assert_msg(fabs(sa.done_loss[k] - sk.done_loss[k]) <=
                          1e-5 * sk.done_loss[k],
                      "model %d: loss %g with the ignored rows, %g without",
                      k, (double)sa.done_loss[k], (double)sk.done_loss[k]);
        for (int l = 0; l < 2; l++) {
            free(a1[l]);
            free(b1[l]);
            free(a2[l]);
            free(b2[l]);
        }
    }
    atmoe_manifest_free(m);
    free(x);
    free(y);
    free(kx);
    test_rmdir_r(f.dir);
}
END_TEST

/* The logits z [rows, C] of the manifest at path on rows [0, rows) of x,
 * through atmoe_manifest_build and atmoe_manifest_build_head (what atmoe
 * run writes). */
static void manifest_logits(const char *path, const float *x, int rows,
                            float *z)
{
    atmoe_manifest *m;
    ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
    atmoe_graph *g;
    atmoe_node xn, out, logits;
    size_t xs[2] = {(size_t)rows, D0};
    ck_assert_status(atmoe_graph_new(CTX, &g), CTX);
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0,
                                       &xn), CTX);
    ck_assert_status(atmoe_manifest_build(m, g, xn, ATMOE_NODE_NONE,
                                          ATMOE_NODE_NONE, NULL, NULL, &out),
                     CTX);
    ck_assert_status(atmoe_manifest_build_head(m, g, out, &logits), CTX);
    ck_assert_status(atmoe_graph_mark_output(g, logits), CTX);
    ck_assert_status(atmoe_graph_plan(g, 0), CTX);
    ck_assert_status(atmoe_graph_set_input(g, xn, x,
                                           (size_t)rows * D0 * sizeof *x, 0),
                     CTX);
    ck_assert_status(atmoe_graph_compute(g, 0), CTX);
    test_poison(z, (size_t)rows * C);
    ck_assert_status(atmoe_graph_read(g, logits, z,
                                      (size_t)rows * C * sizeof *z), CTX);
    atmoe_graph_free(g);
    atmoe_manifest_free(m);
}

/* The mean cross-entropy of those logits over the rows not ignored, in
 * float64. */
static double manifest_ce(const char *path, const float *x,
                          const int32_t *labels, int rows)
{
    float *z = malloc((size_t)rows * C * sizeof *z);
    manifest_logits(path, x, rows, z);
    double sum = 0;
    size_t count = 0;
    for (int n = 0; n < rows; n++) {
        if (labels[n] == IGN)
            continue;
        double zz[C];
        for (int k = 0; k < C; k++)
            zz[k] = z[n * C + k];
        sum += row_ce(zz, labels[n]);
        count++;
    }
    free(z);
    return sum / (double)count;
}

/* The head's forms: a bare tensor name (no bias, ignore index -100), and
 * W stored transposed [D2, C] with a bias; the logits against the float64
 * head over the float64 stack (its adapters' B zero: the base alone). */
START_TEST(test_head_forms)
{
    fixture f;
    make_fixture(&f);
    write_head_manifest(&f, "bare.json", "\"head.weight\"");
    write_head_manifest(&f, "t.json",
                        "{\"tensor\": \"head.weight_t\", \"transposed\": "
                        "true, \"bias\": \"head.bias\"}");
    float *x = malloc(N * D0 * sizeof *x), *y = malloc(N * D2 * sizeof *y);
    float *z = malloc(N * C * sizeof *z);
    double *want = malloc(N * C * sizeof *want);
    int32_t task[N];
    make_data(&f, x, y, task);
    for (int k = 0; k < 2; k++) {
        char path[600];
        snprintf(path, sizeof path, "%s/%s", f.dir, k ? "t.json" : "bare.json");
        atmoe_manifest *m;
        atmoe_manifest_info info;
        ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
        ck_assert_status(atmoe_manifest_get_info(m, &info), CTX);
        ck_assert_uint_eq(info.classes, 0); /* not checked yet */
        ck_assert_status(atmoe_manifest_check(m), CTX);
        ck_assert_status(atmoe_manifest_get_info(m, &info), CTX);
        ck_assert_uint_eq(info.classes, C);
        ck_assert_int_eq(info.ignore_index, -100);
        ck_assert_str_eq(info.head_tensor, k ? "head.weight_t" : "head.weight");
        ck_assert_ptr_nonnull(strstr(info.head_file, "base.safetensors"));
        atmoe_manifest_free(m);
        manifest_logits(path, x, N, z);
        float *none[2] = {NULL, NULL};
        for (int n = 0; n < N; n++) {
            double yy[D2];
            forward(&f, none, none, 1, x + n * D0, yy);
            host_logits(&f, yy, want + n * C);
            for (int c = 0; c < C && !k; c++)
                want[n * C + c] -= f.hb[c];
        }
        /* A float32 stack and head against float64: the error relative to
         * max(|logit|, 1) (logits are of order 1 to 10). */
        double err = test_max_rel_err(z, want, N * C, 1.0);
        ck_assert_msg(err <= 1e-5, "%s: logits off by %g", path, err);
    }
    free(x);
    free(y);
    free(z);
    free(want);
    test_rmdir_r(f.dir);
}
END_TEST

static int on_stage2(const atmoe_train_progress *p, void *user)
{
    if (p->done)
        *(float *)user = p->heldout_loss;
    return 0;
}

/* Stage 2 on labels: the written manifest (its head kept) gives the
 * trainer's final and held-out cross-entropy, and routing beats the
 * uniform mix of the experts. */
START_TEST(test_stage2_labels)
{
    fixture f;
    make_fixture(&f);
    write_head_manifest(&f, "head.json", head_json);
    float *x = malloc(N * D0 * sizeof *x), *y = malloc(N * D2 * sizeof *y);
    int32_t task[N], labels[N];
    make_data(&f, x, y, task);
    make_labels(&f, y, labels);
    char data[512], out[512], out2[512], path[600], text[2048];
    snprintf(data, sizeof data, "%s/labels.safetensors", f.dir);
    snprintf(out, sizeof out, "%s/out", f.dir);
    snprintf(out2, sizeof out2, "%s/routed", f.dir);
    save_labels(data, x, NULL, labels, task, N, 1);
    atmoe_manifest *m = open_named(&f, "head.json");
    atmoe_train_config c;
    seen s = {0};
    config(&c, &s);
    c.steps = 60;
    ck_assert_status(atmoe_train_stage1(CTX, m, data, &c, out), CTX);
    atmoe_manifest_free(m);

    head_manifest(text, sizeof text, "../base.safetensors", head_json);
    snprintf(path, sizeof path, "%s/manifest.json", out);
    test_write_file(path, text, strlen(text));
    double uniform = manifest_ce(path, x, labels, N);
    ck_assert_status(atmoe_manifest_open(CTX, path, &m), CTX);
    float held = NAN;
    c.steps = 100;
    c.progress = on_stage2;
    c.user = &held;
    double trained = NAN;
    ck_assert_status(atmoe_train_stage2(CTX, m, data, &c, out2, &trained),
                     CTX);
    atmoe_manifest_free(m);
    snprintf(path, sizeof path, "%s/manifest.json", out2);
    double rerun = manifest_ce(path, x, labels, N);
    double rheld = manifest_ce(path, x, labels, HELD);
    ck_assert_msg(isfinite(rerun) && fabs(rerun - trained) <= 1e-4 * rerun,
                  "the written manifest gives %.7g, the trainer said %.7g",
                  rerun, trained);
    ck_assert_msg(fabs(rheld - held) <= 1e-4 * rheld,
                  "held out: the written manifest gives %.7g, the trainer "
                  "said %.7g", rheld, (double)held);
    ck_assert_msg(trained < 0.8 * uniform && trained < 0.5 * log(C),
                  "routed cross-entropy %g, uniform routing %g", trained,
                  uniform);
    free(x);
    free(y);
    test_rmdir_r(f.dir);
}
END_TEST

/* Bad classification inputs: the status, a message naming what is wrong,
 * no output. */
START_TEST(test_labels_bad_input)
{
    fixture f;
    make_fixture(&f);
    write_head_manifest(&f, "head.json", head_json);
    float *x = malloc(N * D0 * sizeof *x), *y = malloc(N * D2 * sizeof *y);
    int32_t task[N], labels[N];
    make_data(&f, x, y, task);
    make_labels(&f, y, labels);
    char data[512], out[512];
    snprintf(data, sizeof data, "%s/labels.safetensors", f.dir);
    snprintf(out, sizeof out, "%s/out", f.dir);
    atmoe_manifest *m = open_named(&f, "head.json");
    atmoe_train_config c;
    seen s = {0};
    config(&c, &s);
    c.steps = 3;

    labels[37] = C;
    save_labels(data, x, NULL, labels, task, N, 0);
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_OUT_OF_RANGE,
                         "labels of row 37 is 5, outside [0, 5)");
    ck_assert(!exists(out));
    labels[37] = -7;
    save_labels(data, x, NULL, labels, task, N, 1);
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_OUT_OF_RANGE,
                         "labels of row 37 is -7");
    ck_assert(!exists(out));
    make_labels(&f, y, labels);
    labels[3] = 9;
    save_labels(data, x, NULL, labels, task, N, 1);
    labels[3] = 0;
    save_labels(data, x, NULL, labels, task, N, 0);
    /* Rows 0 .. HELD serve as held-out: row 3 of labels_heldout is 9 in a
     * file whose training labels are fine. */
    {
        atmoe_safetensors_writer *w;
        ck_assert_status(atmoe_safetensors_writer_new(NULL, &w), NULL);
        int32_t hl[HELD];
        memcpy(hl, labels, sizeof hl);
        hl[3] = 9;
        uint64_t ns[1] = {N}, hs[1] = {HELD};
        save_tensor(w, "x", N, D0, x);
        save_tensor(w, "x_heldout", HELD, D0, x);
        ck_assert_status(atmoe_safetensors_writer_add(
                             w, "labels", ATMOE_SAFETENSORS_I32, 1, ns,
                             labels), NULL);
        ck_assert_status(atmoe_safetensors_writer_add(
                             w, "task", ATMOE_SAFETENSORS_I32, 1, ns, task),
                         NULL);
        ck_assert_status(atmoe_safetensors_writer_add(
                             w, "labels_heldout", ATMOE_SAFETENSORS_I32, 1, hs,
                             hl), NULL);
        ck_assert_status(atmoe_safetensors_writer_add(
                             w, "task_heldout", ATMOE_SAFETENSORS_I32, 1, hs,
                             task), NULL);
        ck_assert_status(atmoe_safetensors_writer_save(w, data), NULL);
        atmoe_safetensors_writer_free(w);
    }
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_OUT_OF_RANGE,
                         "labels_heldout of row 3 is 9");
    ck_assert(!exists(out));

    /* y and labels both; y alone; labels without a head; nothing but
     * ignored rows. */
    save_labels(data, x, y, labels, task, N, 0);
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_INVALID_ARGUMENT, "both y and labels");
    ck_assert(!exists(out));
    save_data(data, x, D0, y, task, N);
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_NOT_FOUND, "labels [N] (I32)");
    ck_assert(!exists(out));
    save_labels(data, x, NULL, labels, task, N, 0);
    atmoe_manifest *plain = open_manifest(&f);
    ck_assert_fails_with(atmoe_train_stage1(CTX, plain, data, &c, out), CTX,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "the manifest has no \"head\"");
    ck_assert_fails_with(atmoe_train_stage2(CTX, plain, data, &c, out, NULL),
                         CTX, ATMOE_STATUS_INVALID_ARGUMENT,
                         "the manifest has no \"head\"");
    ck_assert(!exists(out));
    atmoe_manifest_free(plain);
    int32_t none[N];
    for (int n = 0; n < N; n++)
        none[n] = task[n] == 1 ? IGN : labels[n];
    save_labels(data, x, NULL, none, task, N, 0);
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "task 1 (adapter");
    ck_assert_msg(strstr(atmoe_errmsg(CTX), "whose label is not ignored"),
                  "%s", atmoe_errmsg(CTX));
    ck_assert(!exists(out));
    for (int n = 0; n < N; n++)
        none[n] = IGN;
    save_labels(data, x, NULL, none, task, N, 0);
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "every row of labels is the ignore index -1");
    ck_assert(!exists(out));
    atmoe_manifest_free(m);

    /* The head itself: a width other than the stack's output, an ignore
     * index that is a class, a key the head does not take. */
    save_labels(data, x, NULL, labels, task, N, 0);
    write_head_manifest(&f, "wide.json", "{\"tensor\": \"wide.weight\"}");
    m = open_named(&f, "wide.json");
    ck_assert_fails_with(atmoe_train_stage1(CTX, m, data, &c, out), CTX,
                         ATMOE_STATUS_SHAPE_MISMATCH,
                         "head: tensor wide.weight of");
    ck_assert_msg(strstr(atmoe_errmsg(CTX),
                         "is [5, 8]; the head must be [classes, 7]"),
                  "%s", atmoe_errmsg(CTX));
    ck_assert(!exists(out));
    atmoe_manifest_free(m);
    write_head_manifest(&f, "class.json",
                        "{\"tensor\": \"head.weight\", \"ignore_index\": 2}");
    m = open_named(&f, "class.json");
    ck_assert_fails_with(atmoe_manifest_check(m), CTX,
                         ATMOE_STATUS_INVALID_ARGUMENT,
                         "head.ignore_index is 2, a class of the head's 5");
    atmoe_manifest_free(m);
    write_head_manifest(&f, "bias.json",
                        "{\"tensor\": \"head.weight\", \"bias\": \"wide.weight\"}");
    m = open_named(&f, "bias.json");
    ck_assert_fails_with(atmoe_manifest_check(m), CTX,
                         ATMOE_STATUS_SHAPE_MISMATCH, "head.bias: tensor");
    atmoe_manifest_free(m);
    char text[2048], path[600];
    head_manifest(text, sizeof text, "base.safetensors",
                  "{\"tensor\": \"head.weight\", \"dtype\": \"f16\"}");
    snprintf(path, sizeof path, "%s/key.json", f.dir);
    test_write_file(path, text, strlen(text));
    ck_assert_fails_with(atmoe_manifest_open(CTX, path, &m), CTX,
                         ATMOE_STATUS_FORMAT_ERROR,
                         "head: unknown key \"dtype\"");
    free(x);
    free(y);
    test_rmdir_r(f.dir);
}
END_TEST

static void setup(void)
{
    CTX = test_context();
}

static void teardown(void)
{
    atmoe_context_free(CTX);
}

static Suite *recipe_suite(void)
{
    Suite *s = suite_create("recipe");
    TCase *tc = tcase_create("stage1");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_stage1_round_trip);
    tcase_add_test(tc, test_stage1_bad_input);
    tcase_add_test(tc, test_stage2_round_trip);
    tcase_add_test(tc, test_stage1_resume);
    tcase_add_test(tc, test_trex_round_trip);
    tcase_add_test(tc, test_stage1_labels);
    tcase_add_test(tc, test_labels_ignored_rows);
    tcase_add_test(tc, test_stage2_labels);
    tcase_add_test(tc, test_labels_bad_input);
    tcase_add_test(tc, test_head_forms);
    tcase_add_test(tc, test_trex_no_progress);
    tcase_add_test(tc, test_trex_embeddings);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(recipe_suite());
}
