/* The optimiser against a float64 host AdamW and SGD, its schedule, its
 * skipped steps, its checkpoints, and the trainable weights by name.
 *
 * There is no backward pass under test here: each graph's registry of
 * trainable weights is filled by the test (atm_graph_add_trainable), every
 * gradient being a slice of one planned node, 0.5 x an input the test
 * sets (exact in f32), so that the optimiser reads gradient memory in the
 * planned arena after a compute as it will after a backward pass.  Links
 * the library's objects (lib/libatmoe_core.la) to reach the registry. */
#include <config.h>

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "graph/trainable.h"
#include "train/optimizer.h"
#include "testutil.h"

/* The parameters move by about lr per step from values in [-1, 1]: errors
 * relative to max(|want|, 0.1). */
#define TOL 1e-5
#define FLOOR 0.1

/* ------------------------------------------------------------ fixtures */

typedef struct spec {
    const char *name;
    int ndim;
    size_t shape[2];
    size_t lead_rows; /* the entry starts this many rows into its tensor,
                         as an expert's slice of a stacked buffer */
} spec;

/* Odd sizes; "big" takes three work-groups of the norm's reduction. */
static const spec specs[] = {
    {"w1", 2, {7, 13}, 0},
    {"bias", 1, {5, 0}, 0},
    {"experts.1.A", 2, {2, 11}, 1},
    {"big", 2, {37, 233}, 0},
};
#define NSPEC (sizeof specs / sizeof specs[0])
#define MAX_SPECS 8

static size_t spec_count(const spec *s)
{
    return s->ndim == 1 ? s->shape[0] : s->shape[0] * s->shape[1];
}

typedef struct fixture {
    atmoe_context *ctx;
    atmoe_graph *g;
    size_t n;                 /* entries */
    const spec *specs;
    atmoe_tensor *w[MAX_SPECS]; /* their storage */
    size_t offset[MAX_SPECS];      /* in the storage and ... */
    size_t grad_offset[MAX_SPECS]; /* ... in the gradient node */
    size_t total;             /* gradient elements */
    atmoe_node gin, grad;
} fixture;

/* A planned graph over entries s[0, n) whose gradient is one node, and
 * (when kept is 0) not an output.  Each entry has a tensor of its own, or,
 * packed, all follow each other in one tensor as in the gradient node, as
 * the experts of a set do (the optimiser updates them in one launch). */
static void fixture_make_packed(fixture *f, atmoe_context *ctx,
                                const spec *s, size_t n, int kept,
                                int packed)
{
    ck_assert_uint_le(n, MAX_SPECS);
    memset(f, 0, sizeof *f);
    f->ctx = ctx;
    f->n = n;
    f->specs = s;
    for (size_t i = 0; i < n; i++) {
        f->grad_offset[i] = f->total;
        f->total += spec_count(&s[i]);
    }
    ck_assert_status(atmoe_graph_new(ctx, &f->g), ctx);
    size_t shape[1] = {f->total};
    ck_assert_status(atmoe_graph_input(f->g, "gin", ATMOE_DTYPE_F32, 1, shape,
                                       0, &f->gin), ctx);
    ck_assert_status(atmoe_graph_scale(f->g, f->gin, 0.5f, &f->grad), ctx);
    /* A node after the gradient, so that the plan has memory to reuse. */
    atmoe_node other;
    ck_assert_status(atmoe_graph_silu(f->g, f->grad, &other), ctx);
    ck_assert_status(atmoe_graph_mark_output(f->g, other), ctx);
    if (kept)
        ck_assert_status(atmoe_graph_mark_output(f->g, f->grad), ctx);
    if (packed) {
        size_t ts[1] = {f->total};
        ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 1, ts,
                                          &f->w[0]), ctx);
    }
    for (size_t i = 0; i < n; i++) {
        size_t rows = s[i].ndim == 1 ? 1 : s[i].shape[0];
        size_t cols = s[i].ndim == 1 ? s[i].shape[0] : s[i].shape[1];
        size_t ts[2] = {rows + s[i].lead_rows, cols};
        if (!packed)
            ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, ts,
                                              &f->w[i]), ctx);
        f->offset[i] = packed ? f->grad_offset[i] : s[i].lead_rows * cols;
        atm_trainable t;
        memset(&t, 0, sizeof t);
        snprintf(t.name, sizeof t.name, "%s", s[i].name);
        t.buffer = f->w[packed ? 0 : i]->buffer;
        t.offset = f->offset[i];
        t.ndim = s[i].ndim;
        t.shape[0] = s[i].shape[0];
        t.shape[1] = s[i].shape[1];
        t.count = spec_count(&s[i]);
        t.grad = f->grad;
        t.grad_offset = f->grad_offset[i];
        ck_assert_status(atm_graph_add_trainable(f->g, &t, "test"), ctx);
    }
    ck_assert_status(atmoe_graph_plan(f->g, 0), ctx);
}

static void fixture_make(fixture *f, atmoe_context *ctx, const spec *s,
                         size_t n, int kept)
{
    fixture_make_packed(f, ctx, s, n, kept, 0);
}

static void fixture_free(fixture *f)
{
    atmoe_graph_free(f->g);
    for (size_t i = 0; i < f->n; i++)
        atmoe_tensor_free(f->w[i]);
}

/* Writes p (f->total values, entry after entry) into the entries. */
static void set_params(fixture *f, const float *p)
{
    for (size_t i = 0; i < f->n; i++)
        ck_assert_status(atmoe_graph_write_trainable(
                             f->g, f->specs[i].name, p + f->grad_offset[i],
                             spec_count(&f->specs[i])), f->ctx);
}

static void get_params(fixture *f, float *p)
{
    test_poison(p, f->total);
    for (size_t i = 0; i < f->n; i++)
        ck_assert_status(atmoe_graph_read_trainable(
                             f->g, f->specs[i].name, p + f->grad_offset[i],
                             spec_count(&f->specs[i])), f->ctx);
}

/* One micro-batch: the gradient node becomes 0.5 gin. */
static void compute_grad(fixture *f, const float *gin)
{
    ck_assert_status(atmoe_graph_set_input(f->g, f->gin, gin,
                                           f->total * sizeof(float), 0),
                     f->ctx);
    ck_assert_status(atmoe_graph_compute(f->g, 0), f->ctx);
}

/* ---------------------------------------------------- host references */

typedef struct host_opt {
    atmoe_optimizer_config c;
    size_t n;
    double *p, *m, *v;
    uint64_t t;
    double norm, clip, lr; /* of the last step */
} host_opt;

static double host_lr(const atmoe_optimizer_config *c, uint64_t t)
{
    if (c->warmup_steps > 0 && t <= c->warmup_steps)
        return c->lr * (double)t / (double)c->warmup_steps;
    if (c->schedule == ATMOE_SCHEDULE_CONSTANT)
        return c->lr;
    double p = (double)(t - c->warmup_steps) /
               (double)(c->total_steps - c->warmup_steps);
    p = p > 1.0 ? 1.0 : p;
    return c->min_lr + 0.5 * (c->lr - c->min_lr) * (1.0 + cos(M_PI * p));
}

static void host_init(host_opt *h, const atmoe_optimizer_config *c,
                      const float *p, size_t n)
{
    h->c = *c;
    h->n = n;
    h->p = calloc(n, sizeof *h->p);
    h->m = calloc(n, sizeof *h->m);
    h->v = calloc(n, sizeof *h->v);
    ck_assert(h->p && h->m && h->v);
    for (size_t i = 0; i < n; i++)
        h->p[i] = p[i];
    h->t = 0;
}

static void host_free(host_opt *h)
{
    free(h->p);
    free(h->m);
    free(h->v);
}

/* A step over micro-batches gin[0, k) (the device's gradient is
 * 0.5 gin), as torch: clip_grad_norm_ then AdamW or SGD. */
static void host_step(host_opt *h, const float *const *gin, unsigned k)
{
    const atmoe_optimizer_config *c = &h->c;
    double *g = calloc(h->n, sizeof *g);
    ck_assert_ptr_nonnull(g);
    double ss = 0.0;
    for (size_t i = 0; i < h->n; i++) {
        for (unsigned j = 0; j < k; j++)
            g[i] += 0.5 * gin[j][i];
        g[i] /= k;
        ss += g[i] * g[i];
    }
    h->norm = sqrt(ss);
    h->clip = 1.0;
    if (c->max_grad_norm > 0.0f) {
        h->clip = c->max_grad_norm / (h->norm + 1e-6);
        h->clip = h->clip > 1.0 ? 1.0 : h->clip;
    }
    h->t++;
    h->lr = host_lr(c, h->t);
    double lr = h->lr, wd = c->weight_decay;
    double bc1 = 1.0 - pow(c->beta1, (double)h->t);
    double bc2 = 1.0 - pow(c->beta2, (double)h->t);
    for (size_t i = 0; i < h->n; i++) {
        double gi = g[i] * h->clip;
        if (c->kind == ATMOE_OPTIMIZER_ADAMW) {
            h->m[i] = c->beta1 * h->m[i] + (1.0 - c->beta1) * gi;
            h->v[i] = c->beta2 * h->v[i] + (1.0 - c->beta2) * gi * gi;
            h->p[i] = h->p[i] * (1.0 - lr * wd) -
                      lr * (h->m[i] / bc1) / (sqrt(h->v[i] / bc2) + c->eps);
        } else {
            double d = gi;
            if (c->momentum > 0.0f) {
                h->m[i] = c->momentum * h->m[i] + gi;
                d = h->m[i];
            }
            h->p[i] = h->p[i] * (1.0 - lr * wd) - lr * d;
        }
    }
    free(g);
}

static void assert_params(fixture *f, const host_opt *h, const char *when)
{
    float *got = malloc(f->total * sizeof *got);
    ck_assert_ptr_nonnull(got);
    get_params(f, got);
    double err = test_max_rel_err(got, h->p, f->total, FLOOR);
    ck_assert_msg(err < TOL, "%s: parameters: relative error %g", when, err);
    free(got);
}

/* ------------------------------------------------------------- helpers */

static atmoe_optimizer_config adamw_config(void)
{
    atmoe_optimizer_config c;
    ck_assert_status(atmoe_optimizer_config_default(&c), NULL);
    c.lr = 2e-2f;
    c.weight_decay = 0.1f;
    return c;
}

/* n values in [-a, a). */
static float *random_values(test_rng *rng, size_t n, double a)
{
    float *x = malloc(n * sizeof *x);
    ck_assert_ptr_nonnull(x);
    test_fill_uniform(rng, x, n, -a, a);
    return x;
}

static void poison_buffer(atmoe_context *ctx, cl_mem buf, size_t count)
{
    cl_float nan = NAN;
    ck_assert_int_eq(clEnqueueFillBuffer(ctx->queue, buf, &nan, sizeof nan, 0,
                                         count * sizeof(float), 0, NULL, NULL),
                     CL_SUCCESS);
}

/* ------------------------------------------------------------- tests */

START_TEST(test_adamw_one_step)
{
    atmoe_context *ctx = test_context();
    fixture f;
    fixture_make(&f, ctx, specs, NSPEC, 1);
    test_rng rng;
    test_rng_seed(&rng, 11);
    float *p0 = random_values(&rng, f.total, 1.0);
    float *gin = random_values(&rng, f.total, 2.0);
    set_params(&f, p0);
    atmoe_optimizer_config c = adamw_config();
    atmoe_optimizer *opt;
    ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
    poison_buffer(ctx, opt->partials, opt->slots + 1);
    host_opt h;
    host_init(&h, &c, p0, f.total);

    /* With one micro-batch, the step reads the gradient node directly. */
    compute_grad(&f, gin);
    atmoe_optimizer_report r;
    memset(&r, 0xff, sizeof r);
    uint64_t a0 = atm_alloc_count();
    ck_assert_status(atmoe_optimizer_step(opt, 1.25f, &r), ctx);
    ck_assert_uint_eq(atm_alloc_count() - a0, 0);
    const float *gl[1] = {gin};
    host_step(&h, gl, 1);
    assert_params(&f, &h, "one step");
    ck_assert_uint_eq(r.step, 1);
    ck_assert_uint_eq(r.skipped, 0);
    ck_assert_float_eq(r.lr, c.lr);
    ck_assert_float_eq(r.clip, 1.0f);
    ck_assert_msg(fabs(r.grad_norm - h.norm) < 1e-5 * h.norm,
                  "norm %g, want %g", r.grad_norm, h.norm);

    /* The gradient by name is the node's slice. */
    for (size_t i = 0; i < f.n; i++) {
        size_t cnt = spec_count(&f.specs[i]);
        float got[8621];
        test_poison(got, cnt);
        ck_assert_status(atmoe_graph_read_gradient(f.g, f.specs[i].name, got,
                                                   cnt), ctx);
        for (size_t j = 0; j < cnt; j++)
            ck_assert_float_eq(got[j], 0.5f * gin[f.grad_offset[i] + j]);
    }

    /* An accumulate call with accumulation 1 is allowed and changes
     * nothing: the second step still matches. */
    float *gin2 = random_values(&rng, f.total, 2.0);
    compute_grad(&f, gin2);
    a0 = atm_alloc_count();
    ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
    ck_assert_status(atmoe_optimizer_step(opt, 1.0f, &r), ctx);
    ck_assert_uint_eq(atm_alloc_count() - a0, 0);
    gl[0] = gin2;
    host_step(&h, gl, 1);
    assert_params(&f, &h, "second step");
    ck_assert_uint_eq(r.step, 2);

    host_free(&h);
    free(p0);
    free(gin);
    free(gin2);
    atmoe_optimizer_free(opt);
    fixture_free(&f);
    atmoe_context_free(ctx);
}
END_TEST

/* Ten steps of three micro-batches each, clipped on some steps only, with
 * warm-up and cosine decay; the moments checked through a checkpoint. */
START_TEST(test_adamw_ten_steps)
{
    enum { STEPS = 10, MICRO = 3 };
    atmoe_context *ctx = test_context();
    for (int packed = 0; packed < 2; packed++) {
        fixture f;
        fixture_make_packed(&f, ctx, specs, NSPEC, 1, packed);
        test_rng rng;
        test_rng_seed(&rng, 12);
        float *p0 = random_values(&rng, f.total, 1.0);
        set_params(&f, p0);
        atmoe_optimizer_config c = adamw_config();
        c.beta1 = 0.8f;
        c.beta2 = 0.95f;
        c.eps = 1e-6f;
        c.max_grad_norm = 20.0f;
        c.schedule = ATMOE_SCHEDULE_COSINE;
        c.warmup_steps = 3;
        c.total_steps = STEPS;
        c.min_lr = 1e-3f;
        c.accumulation = MICRO;
        atmoe_optimizer *opt;
        ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
        /* The first micro-batch of a step overwrites the accumulator, and
         * every partial sum is written. */
        poison_buffer(ctx, opt->acc, opt->total);
        poison_buffer(ctx, opt->partials, opt->slots + 1);
        host_opt h;
        host_init(&h, &c, p0, f.total);
        int clipped = 0, unclipped = 0;
        for (int s = 0; s < STEPS; s++) {
            /* Gradient norms from about 10 to 35 around max_grad_norm. */
            double a = 0.35 + 0.2 * s;
            float *gin[MICRO];
            for (int k = 0; k < MICRO; k++) {
                gin[k] = random_values(&rng, f.total, a);
                compute_grad(&f, gin[k]);
                uint64_t a0 = atm_alloc_count();
                ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
                ck_assert_uint_eq(atm_alloc_count() - a0, 0);
            }
            atmoe_optimizer_report r;
            uint64_t a0 = atm_alloc_count();
            ck_assert_status(atmoe_optimizer_step(opt, 0.5f, &r), ctx);
            ck_assert_msg(atm_alloc_count() == a0,
                          "a step allocated on the host");
            host_step(&h, (const float *const *)gin, MICRO);
            char when[32];
            snprintf(when, sizeof when, "step %d", s + 1);
            assert_params(&f, &h, when);
            ck_assert_uint_eq(r.step, (uint64_t)s + 1);
            ck_assert_msg(fabs(r.lr - h.lr) <= 1e-6 * h.lr,
                          "%s: lr %g, want %g", when, r.lr, h.lr);
            ck_assert_msg(fabs(r.grad_norm - h.norm) <= 1e-5 * h.norm,
                          "%s: norm %g, want %g", when, r.grad_norm, h.norm);
            ck_assert_msg(fabs(r.clip - h.clip) <= 1e-6,
                          "%s: clip %g, want %g", when, r.clip, h.clip);
            clipped += h.clip < 1.0;
            unclipped += h.clip == 1.0;
            for (int k = 0; k < MICRO; k++)
                free(gin[k]);
        }
        ck_assert_msg(clipped > 0 && unclipped > 0, "clipped %d, unclipped %d",
                      clipped, unclipped);

        /* The moments, as a checkpoint holds them. */
        char dir[512], path[600];
        test_mkdtemp(dir, sizeof dir, "optimizer");
        snprintf(path, sizeof path, "%s/ckpt.safetensors", dir);
        ck_assert_status(atmoe_optimizer_save(opt, path), ctx);
        atmoe_safetensors *file;
        ck_assert_status(atmoe_safetensors_open(ctx, path, &file), ctx);
        float *got = malloc(8621 * sizeof *got);
        for (size_t i = 0; i < f.n; i++) {
            size_t cnt = spec_count(&f.specs[i]), o = f.grad_offset[i];
            char name[160];
            static const char *const pre[3] = {"param", "adam_m", "adam_v"};
            double *want[3] = {h.p + o, h.m + o, h.v + o};
            for (int j = 0; j < 3; j++) {
                snprintf(name, sizeof name, "%s/%s", pre[j], f.specs[i].name);
                test_poison(got, cnt);
                ck_assert_status(
                    atmoe_safetensors_read_f32(file, name, got, cnt), ctx);
                /* v is about g^2: relative to its own scale. */
                double err = test_max_rel_err(got, want[j], cnt,
                                              j == 2 ? 1e-2 : FLOOR);
                ck_assert_msg(err < TOL, "%s: relative error %g", name, err);
            }
        }
        const char *v;
        ck_assert_status(
            atmoe_safetensors_get_metadata(file, "atmoe.step", &v), ctx);
        ck_assert_str_eq(v, "10");
        ck_assert_status(
            atmoe_safetensors_get_metadata(file, "atmoe.optimizer", &v), ctx);
        ck_assert_str_eq(v, "adamw");
        atmoe_safetensors_free(file);
        free(got);
        test_rmdir_r(dir);

        host_free(&h);
        free(p0);
        atmoe_optimizer_free(opt);
        fixture_free(&f);
    }
    atmoe_context_free(ctx);
}
END_TEST

/* The tuned work-group of the element-wise launches ("optimizer" WG):
 * other sizes than the default 64, accumulate and update alike, still
 * match the float64 AdamW (the odd sizes leave partial groups). */
START_TEST(test_adamw_work_groups)
{
    enum { MICRO = 2 };
    static const int wgs[] = {1, 16, 512};
    atmoe_context *ctx = test_context();
    for (size_t w = 0; w < sizeof wgs / sizeof wgs[0]; w++) {
        char params[64];
        snprintf(params, sizeof params, "{\"kernels\": {\"optimizer\": "
                 "{\"WG\": %d}}}", wgs[w]);
        ck_assert_status(atmoe_context_set_params(ctx, params), ctx);
        fixture f;
        fixture_make(&f, ctx, specs, NSPEC, 1);
        test_rng rng;
        test_rng_seed(&rng, 40 + w);
        float *p0 = random_values(&rng, f.total, 1.0);
        set_params(&f, p0);
        atmoe_optimizer_config c = adamw_config();
        c.accumulation = MICRO;
        atmoe_optimizer *opt;
        ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
        poison_buffer(ctx, opt->acc, opt->total);
        host_opt h;
        host_init(&h, &c, p0, f.total);
        for (int s = 0; s < 2; s++) {
            float *gin[MICRO];
            for (int k = 0; k < MICRO; k++) {
                gin[k] = random_values(&rng, f.total, 2.0);
                compute_grad(&f, gin[k]);
                ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
            }
            ck_assert_status(atmoe_optimizer_step(opt, 1.0f, NULL), ctx);
            host_step(&h, (const float *const *)gin, MICRO);
            char when[48];
            snprintf(when, sizeof when, "WG %d, step %d", wgs[w], s + 1);
            assert_params(&f, &h, when);
            for (int k = 0; k < MICRO; k++)
                free(gin[k]);
        }
        host_free(&h);
        free(p0);
        atmoe_optimizer_free(opt);
        fixture_free(&f);
    }
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_sgd)
{
    atmoe_context *ctx = test_context();
    static const float momenta[2] = {0.0f, 0.9f};
    for (int mi = 0; mi < 2; mi++) {
        fixture f;
        fixture_make(&f, ctx, specs, NSPEC, 1);
        test_rng rng;
        test_rng_seed(&rng, 13 + mi);
        float *p0 = random_values(&rng, f.total, 1.0);
        set_params(&f, p0);
        atmoe_optimizer_config c = adamw_config();
        c.kind = ATMOE_OPTIMIZER_SGD;
        c.lr = 5e-2f;
        c.momentum = momenta[mi];
        c.weight_decay = 0.05f;
        c.warmup_steps = 2;
        atmoe_optimizer *opt;
        ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
        host_opt h;
        host_init(&h, &c, p0, f.total);
        for (int s = 0; s < 3; s++) {
            float *gin = random_values(&rng, f.total, 1.0);
            compute_grad(&f, gin);
            atmoe_optimizer_report r;
            uint64_t a0 = atm_alloc_count();
            ck_assert_status(atmoe_optimizer_step(opt, 0.0f, &r), ctx);
            ck_assert_uint_eq(atm_alloc_count() - a0, 0);
            const float *gl[1] = {gin};
            host_step(&h, gl, 1);
            assert_params(&f, &h, mi ? "SGD with momentum" : "SGD");
            free(gin);
        }
        /* The momentum buffer is checkpointed, plain SGD has none. */
        char dir[512], path[600];
        test_mkdtemp(dir, sizeof dir, "sgd");
        snprintf(path, sizeof path, "%s/sgd.safetensors", dir);
        ck_assert_status(atmoe_optimizer_save(opt, path), ctx);
        atmoe_safetensors *file;
        ck_assert_status(atmoe_safetensors_open(ctx, path, &file), ctx);
        size_t nt;
        ck_assert_status(atmoe_safetensors_get_count(file, &nt), ctx);
        ck_assert_uint_eq(nt, (mi ? 2 : 1) * f.n);
        if (mi) {
            float got[91];
            test_poison(got, 91);
            ck_assert_status(atmoe_safetensors_read_f32(
                                 file, "sgd_momentum/w1", got, 91), ctx);
            double err = test_max_rel_err(got, h.m, 91, FLOOR);
            ck_assert_msg(err < TOL, "momentum: relative error %g", err);
        }
        atmoe_safetensors_free(file);
        ck_assert_status(atmoe_optimizer_load(opt, path), ctx);
        test_rmdir_r(dir);
        host_free(&h);
        free(p0);
        atmoe_optimizer_free(opt);
        fixture_free(&f);
    }
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_schedule)
{
    atmoe_context *ctx = test_context();
    fixture f;
    fixture_make(&f, ctx, specs, 1, 1);
    atmoe_optimizer_config c = adamw_config();
    c.lr = 3e-3f;
    c.schedule = ATMOE_SCHEDULE_COSINE;
    c.warmup_steps = 4;
    c.total_steps = 13;
    c.min_lr = 2e-4f;
    atmoe_optimizer *opt;
    ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
    for (uint64_t t = 1; t <= 17; t++) {
        float lr;
        ck_assert_status(atmoe_optimizer_get_lr(opt, t, &lr), ctx);
        double want;
        if (t <= 4)
            want = (double)3e-3f * (double)t / 4.0;
        else if (t >= 13)
            want = (double)2e-4f;
        else
            want = (double)2e-4f + 0.5 * ((double)3e-3f - (double)2e-4f) *
                                       (1.0 + cos(M_PI * (t - 4) / 9.0));
        ck_assert_msg(fabs(lr - want) <= 1e-6 * want,
                      "step %llu: lr %.9g, want %.9g", (unsigned long long)t,
                      lr, want);
    }
    /* The peak at the end of the warm-up and the floor at total_steps. */
    float lr;
    ck_assert_status(atmoe_optimizer_get_lr(opt, 4, &lr), ctx);
    ck_assert_float_eq(lr, 3e-3f);
    ck_assert_status(atmoe_optimizer_get_lr(opt, 13, &lr), ctx);
    ck_assert_float_eq(lr, 2e-4f);
    ck_assert_fails_with(atmoe_optimizer_get_lr(opt, 0, &lr), ctx,
                         ATMOE_STATUS_OUT_OF_RANGE, "from 1");
    ck_assert_fails(atmoe_optimizer_get_lr(opt, 1, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    atmoe_optimizer_free(opt);

    /* Constant after a warm-up. */
    c.schedule = ATMOE_SCHEDULE_CONSTANT;
    c.warmup_steps = 3;
    ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
    for (uint64_t t = 1; t <= 6; t++) {
        ck_assert_status(atmoe_optimizer_get_lr(opt, t, &lr), ctx);
        double want = t <= 3 ? (double)3e-3f * (double)t / 3.0 : 3e-3f;
        ck_assert_msg(fabs(lr - want) <= 1e-7 * want, "constant, step %llu",
                      (unsigned long long)t);
    }
    atmoe_optimizer_free(opt);
    fixture_free(&f);
    atmoe_context_free(ctx);
}
END_TEST

/* Reads every value the optimiser keeps (parameters, m, v) through a
 * checkpoint: n floats into out. */
static float *snapshot(fixture *f, atmoe_optimizer *opt, size_t *n)
{
    float *p = malloc(3 * f->total * sizeof *p);
    ck_assert_ptr_nonnull(p);
    get_params(f, p);
    ck_assert_int_eq(clEnqueueReadBuffer(f->ctx->queue, opt->m, CL_TRUE, 0,
                                         opt->total * sizeof(float),
                                         p + f->total, 0, NULL, NULL),
                     CL_SUCCESS);
    ck_assert_int_eq(clEnqueueReadBuffer(f->ctx->queue, opt->v, CL_TRUE, 0,
                                         opt->total * sizeof(float),
                                         p + 2 * f->total, 0, NULL, NULL),
                     CL_SUCCESS);
    *n = 3 * f->total;
    return p;
}

/* A step whose loss or gradient norm is not finite changes nothing but the
 * skipped count, and drops its micro-batches. */
START_TEST(test_not_finite_skips)
{
    atmoe_context *ctx = test_context();
    fixture f;
    fixture_make(&f, ctx, specs, NSPEC, 1);
    test_rng rng;
    test_rng_seed(&rng, 14);
    float *p0 = random_values(&rng, f.total, 1.0);
    set_params(&f, p0);
    atmoe_optimizer_config c = adamw_config();
    c.accumulation = 2;
    c.max_grad_norm = 5.0f;
    atmoe_optimizer *opt;
    ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
    host_opt h;
    host_init(&h, &c, p0, f.total);
    float *g[2] = {random_values(&rng, f.total, 1.0),
                   random_values(&rng, f.total, 1.0)};
    for (int k = 0; k < 2; k++) {
        compute_grad(&f, g[k]);
        ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
    }
    ck_assert_status(atmoe_optimizer_step(opt, 1.0f, NULL), ctx);
    host_step(&h, (const float *const *)g, 2);

    size_t n;
    float *before = snapshot(&f, opt, &n);
    static const float bad[3] = {INFINITY, NAN, -INFINITY};
    for (int b = 0; b < 4; b++) {
        /* b < 3: one gradient element of the second micro-batch is bad;
         * b == 3: the loss is NaN. */
        float *gb = random_values(&rng, f.total, 1.0);
        compute_grad(&f, gb);
        ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
        if (b < 3)
            gb[f.grad_offset[3] + 1000 + b] = bad[b];
        compute_grad(&f, gb);
        ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
        atmoe_optimizer_report r;
        ck_assert_fails_with(atmoe_optimizer_step(opt, b < 3 ? 2.0f : NAN,
                                                  &r),
                             ctx, ATMOE_STATUS_NOT_FINITE,
                             b < 3 ? "gradient norm" : "loss");
        ck_assert_uint_eq(r.step, 1);
        ck_assert_uint_eq(r.skipped, (uint64_t)b + 1);
        ck_assert_float_eq(r.lr, 0.0f);
        size_t n2;
        float *after = snapshot(&f, opt, &n2);
        ck_assert_msg(memcmp(before, after, n * sizeof *before) == 0,
                      "a skipped step changed the parameters or moments");
        free(after);
        free(gb);
    }

    /* The micro-batches were dropped: the next step takes two fresh ones,
     * as step 2 with the moments of step 1. */
    float *g2[2] = {random_values(&rng, f.total, 1.0),
                    random_values(&rng, f.total, 1.0)};
    for (int k = 0; k < 2; k++) {
        compute_grad(&f, g2[k]);
        ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
    }
    atmoe_optimizer_report r;
    ck_assert_status(atmoe_optimizer_step(opt, 1.0f, &r), ctx);
    ck_assert_uint_eq(r.step, 2);
    ck_assert_uint_eq(r.skipped, 4);
    host_step(&h, (const float *const *)g2, 2);
    assert_params(&f, &h, "after the skipped steps");

    free(before);
    for (int k = 0; k < 2; k++) {
        free(g[k]);
        free(g2[k]);
    }
    host_free(&h);
    free(p0);
    atmoe_optimizer_free(opt);
    fixture_free(&f);
    atmoe_context_free(ctx);
}
END_TEST

/* Runs steps [from, to) of a fixed sequence of micro-batches. */
static void run_steps(fixture *f, atmoe_optimizer *opt, float *const *gins,
                      unsigned micro, int from, int to)
{
    for (int s = from; s < to; s++) {
        for (unsigned k = 0; k < micro; k++) {
            compute_grad(f, gins[s * micro + k]);
            ck_assert_status(atmoe_optimizer_accumulate(opt), f->ctx);
        }
        ck_assert_status(atmoe_optimizer_step(opt, 1.0f, NULL), f->ctx);
    }
}

START_TEST(test_resume_bit_for_bit)
{
    enum { STEPS = 6, MICRO = 2 };
    atmoe_context *ctx = test_context();
    fixture f;
    fixture_make_packed(&f, ctx, specs, NSPEC, 1, 1);
    test_rng rng;
    test_rng_seed(&rng, 15);
    float *p0 = random_values(&rng, f.total, 1.0);
    float *gins[STEPS * MICRO];
    for (int i = 0; i < STEPS * MICRO; i++)
        gins[i] = random_values(&rng, f.total, 1.0 + 0.3 * i);
    atmoe_optimizer_config c = adamw_config();
    c.max_grad_norm = 8.0f;
    c.schedule = ATMOE_SCHEDULE_COSINE;
    c.warmup_steps = 2;
    c.total_steps = STEPS;
    c.accumulation = MICRO;

    /* Uninterrupted. */
    set_params(&f, p0);
    atmoe_optimizer *opt;
    ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
    run_steps(&f, opt, gins, MICRO, 0, STEPS);
    size_t n;
    float *want = snapshot(&f, opt, &n);
    atmoe_optimizer_free(opt);

    /* Stopped after three steps, saved, restored into a new optimiser over
     * scrambled parameters. */
    char dir[512], path[600];
    test_mkdtemp(dir, sizeof dir, "resume");
    snprintf(path, sizeof path, "%s/ckpt.safetensors", dir);
    set_params(&f, p0);
    ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
    run_steps(&f, opt, gins, MICRO, 0, 3);
    ck_assert_status(atmoe_optimizer_save(opt, path), ctx);
    /* Not between the micro-batches of a step. */
    compute_grad(&f, gins[6]);
    ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
    ck_assert_fails_with(atmoe_optimizer_save(opt, path), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "micro-batches");
    atmoe_optimizer_free(opt);

    float *junk = random_values(&rng, f.total, 5.0);
    set_params(&f, junk);
    ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
    ck_assert_status(atmoe_optimizer_load(opt, path), ctx);
    run_steps(&f, opt, gins, MICRO, 3, STEPS);
    size_t n2;
    float *got = snapshot(&f, opt, &n2);
    ck_assert_msg(memcmp(want, got, n * sizeof *want) == 0,
                  "the resumed run differs from the uninterrupted one");
    /* The step count came back with the checkpoint. */
    compute_grad(&f, gins[0]);
    ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
    compute_grad(&f, gins[1]);
    ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
    atmoe_optimizer_report r;
    ck_assert_status(atmoe_optimizer_step(opt, 1.0f, &r), ctx);
    ck_assert_uint_eq(r.step, STEPS + 1);

    atmoe_optimizer_free(opt);
    test_rmdir_r(dir);
    free(want);
    free(got);
    free(junk);
    for (int i = 0; i < STEPS * MICRO; i++)
        free(gins[i]);
    free(p0);
    fixture_free(&f);
    atmoe_context_free(ctx);
}
END_TEST

/* A checkpoint of another graph or kind is refused and changes nothing. */
START_TEST(test_mismatched_checkpoint)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 16);
    char dir[512], path[600], other[600];
    test_mkdtemp(dir, sizeof dir, "mismatch");
    snprintf(path, sizeof path, "%s/ckpt.safetensors", dir);
    snprintf(other, sizeof other, "%s/other.safetensors", dir);

    fixture f;
    fixture_make(&f, ctx, specs, NSPEC, 1);
    float *p0 = random_values(&rng, f.total, 1.0);
    set_params(&f, p0);
    atmoe_optimizer_config c = adamw_config();
    atmoe_optimizer *opt;
    ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
    float *gin = random_values(&rng, f.total, 1.0);
    compute_grad(&f, gin);
    ck_assert_status(atmoe_optimizer_step(opt, 1.0f, NULL), ctx);
    ck_assert_status(atmoe_optimizer_save(opt, path), ctx);
    atmoe_optimizer_free(opt);
    fixture_free(&f);

    /* The same names with "big" transposed; without "big"; with one entry
     * more. */
    spec transposed[NSPEC], more[NSPEC + 1];
    memcpy(transposed, specs, sizeof specs);
    transposed[3].shape[0] = 233;
    transposed[3].shape[1] = 37;
    memcpy(more, specs, sizeof specs);
    more[NSPEC] = (spec){"extra", 1, {3, 0}, 0};
    struct {
        const spec *s;
        size_t n;
        atmoe_optimizer_kind kind;
        atmoe_status want;
        const char *sub;
    } cases[] = {
        {transposed, NSPEC, ATMOE_OPTIMIZER_ADAMW,
         ATMOE_STATUS_SHAPE_MISMATCH, "[37, 233]"},
        {specs, NSPEC - 1, ATMOE_OPTIMIZER_ADAMW, ATMOE_STATUS_FORMAT_ERROR,
         "big"},
        {more, NSPEC + 1, ATMOE_OPTIMIZER_ADAMW, ATMOE_STATUS_FORMAT_ERROR,
         "param/extra"},
        {specs, NSPEC, ATMOE_OPTIMIZER_SGD, ATMOE_STATUS_FORMAT_ERROR,
         "another optimiser"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        fixture_make(&f, ctx, cases[k].s, cases[k].n, 1);
        float *q = random_values(&rng, f.total, 1.0);
        set_params(&f, q);
        atmoe_optimizer_config ck = c;
        ck.kind = cases[k].kind;
        ck_assert_status(atmoe_optimizer_new(f.g, &ck, &opt), ctx);
        ck_assert_fails_with(atmoe_optimizer_load(opt, path), ctx,
                             cases[k].want, cases[k].sub);
        float *got = malloc(f.total * sizeof *got);
        get_params(&f, got);
        ck_assert_msg(memcmp(got, q, f.total * sizeof *q) == 0,
                      "case %zu: a refused load changed the parameters", k);
        /* Nor the step count. */
        compute_grad(&f, q);
        atmoe_optimizer_report r;
        ck_assert_status(atmoe_optimizer_step(opt, 1.0f, &r), ctx);
        ck_assert_uint_eq(r.step, 1);
        free(got);
        free(q);
        atmoe_optimizer_free(opt);
        fixture_free(&f);
    }

    /* A safetensors file that is no checkpoint, and no file at all. */
    atmoe_safetensors_writer *w;
    ck_assert_status(atmoe_safetensors_writer_new(ctx, &w), ctx);
    uint64_t shape[1] = {2};
    float two[2] = {1, 2};
    ck_assert_status(atmoe_safetensors_writer_add_f32(
                         w, "param/bias", ATMOE_SAFETENSORS_F32, 1, shape,
                         two), ctx);
    ck_assert_status(atmoe_safetensors_writer_save(w, other), ctx);
    atmoe_safetensors_writer_free(w);
    fixture_make(&f, ctx, specs, NSPEC, 1);
    ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
    ck_assert_fails_with(atmoe_optimizer_load(opt, other), ctx,
                         ATMOE_STATUS_FORMAT_ERROR, "not an optimiser");
    snprintf(other, sizeof other, "%s/missing.safetensors", dir);
    ck_assert_fails(atmoe_optimizer_load(opt, other), ctx,
                    ATMOE_STATUS_NOT_FOUND);
    ck_assert_fails(atmoe_optimizer_load(opt, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_optimizer_save(opt, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_optimizer_load(NULL, path), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    atmoe_optimizer_free(opt);
    fixture_free(&f);

    test_rmdir_r(dir);
    free(p0);
    free(gin);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_bad_configs)
{
    atmoe_context *ctx = test_context();
    fixture f;
    fixture_make(&f, ctx, specs, NSPEC, 1);
    atmoe_optimizer *opt = (atmoe_optimizer *)&f; /* must become NULL */
    struct {
        const char *field;
        float value;
        const char *sub;
    } cases[] = {
        {"lr", 0.0f, "lr"},
        {"lr", -1e-3f, "lr"},
        {"lr", NAN, "lr"},
        {"lr", INFINITY, "lr"},
        {"beta1", 1.0f, "betas"},
        {"beta1", -0.1f, "betas"},
        {"beta2", 1.0f, "betas"},
        {"beta2", NAN, "betas"},
        {"eps", 0.0f, "eps"},
        {"eps", -1e-8f, "eps"},
        {"weight_decay", -0.01f, "weight_decay"},
        {"max_grad_norm", -1.0f, "max_grad_norm"},
        {"momentum", 1.0f, "momentum"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        atmoe_optimizer_config c = adamw_config();
        float *field = strcmp(cases[k].field, "lr") == 0 ? &c.lr
                       : strcmp(cases[k].field, "beta1") == 0 ? &c.beta1
                       : strcmp(cases[k].field, "beta2") == 0 ? &c.beta2
                       : strcmp(cases[k].field, "eps") == 0 ? &c.eps
                       : strcmp(cases[k].field, "weight_decay") == 0
                           ? &c.weight_decay
                       : strcmp(cases[k].field, "max_grad_norm") == 0
                           ? &c.max_grad_norm
                           : &c.momentum;
        *field = cases[k].value;
        if (field == &c.momentum)
            c.kind = ATMOE_OPTIMIZER_SGD;
        ck_assert_fails_with(atmoe_optimizer_new(f.g, &c, &opt), ctx,
                             ATMOE_STATUS_INVALID_ARGUMENT, cases[k].sub);
        ck_assert_ptr_null(opt);
    }
    atmoe_optimizer_config c = adamw_config();
    c.accumulation = 0;
    ck_assert_fails_with(atmoe_optimizer_new(f.g, &c, &opt), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "accumulation");
    c = adamw_config();
    c.schedule = ATMOE_SCHEDULE_COSINE;
    c.warmup_steps = 10;
    c.total_steps = 10;
    ck_assert_fails_with(atmoe_optimizer_new(f.g, &c, &opt), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "total_steps");
    c.total_steps = 20;
    c.min_lr = 2 * c.lr;
    ck_assert_fails_with(atmoe_optimizer_new(f.g, &c, &opt), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "min_lr");
    c = adamw_config();
    c.kind = (atmoe_optimizer_kind)7;
    ck_assert_fails_with(atmoe_optimizer_new(f.g, &c, &opt), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "kind");
    c = adamw_config();
    c.schedule = (atmoe_schedule)9;
    ck_assert_fails_with(atmoe_optimizer_new(f.g, &c, &opt), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "schedule");
    c = adamw_config();
    ck_assert_fails(atmoe_optimizer_new(NULL, &c, &opt), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_optimizer_new(f.g, NULL, &opt), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_optimizer_new(f.g, &c, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_optimizer_config_default(NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_optimizer_step(NULL, 0.0f, NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_optimizer_accumulate(NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    atmoe_optimizer_free(NULL);

    /* Steps out of order: before any compute, before all micro-batches,
     * past them. */
    ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
    ck_assert_fails_with(atmoe_optimizer_step(opt, 1.0f, NULL), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "nothing computed");
    atmoe_optimizer_free(opt);
    c.accumulation = 2;
    ck_assert_status(atmoe_optimizer_new(f.g, &c, &opt), ctx);
    test_rng rng;
    test_rng_seed(&rng, 17);
    float *gin = random_values(&rng, f.total, 1.0);
    compute_grad(&f, gin);
    ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
    ck_assert_fails_with(atmoe_optimizer_step(opt, 1.0f, NULL), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "1 of the 2");
    ck_assert_status(atmoe_optimizer_accumulate(opt), ctx);
    ck_assert_fails_with(atmoe_optimizer_accumulate(opt), ctx,
                         ATMOE_STATUS_OUT_OF_RANGE, "already accumulated");
    ck_assert_status(atmoe_optimizer_step(opt, 1.0f, NULL), ctx);
    /* A new backward pass would change the registry under the
     * optimiser. */
    atm_graph_trainables_clear(f.g);
    ck_assert_fails_with(atmoe_optimizer_accumulate(opt), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "changed");
    atmoe_optimizer_free(opt);
    free(gin);
    fixture_free(&f);

    /* Nothing to train; not planned; a gradient not kept after compute. */
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t shape[1] = {3};
    atmoe_node x, y;
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 1, shape, 0,
                                       &x), ctx);
    ck_assert_status(atmoe_graph_silu(g, x, &y), ctx);
    ck_assert_status(atmoe_graph_mark_output(g, y), ctx);
    ck_assert_fails_with(atmoe_optimizer_new(g, &c, &opt), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "not planned");
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    ck_assert_fails_with(atmoe_optimizer_new(g, &c, &opt), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "nothing to train");
    atmoe_graph_free(g);
    /* There, an operation in place on the gradient overwrites it. */
    fixture_make(&f, ctx, specs, NSPEC, 0);
    ck_assert_fails_with(atmoe_optimizer_new(f.g, &c, &opt), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "not kept");
    gin = random_values(&rng, f.total, 1.0);
    compute_grad(&f, gin);
    float five[5];
    ck_assert_fails_with(atmoe_graph_read_gradient(f.g, "bias", five, 5),
                         ctx, ATMOE_STATUS_INVALID_ARGUMENT, "not kept");
    free(gin);
    fixture_free(&f);
    atmoe_context_free(ctx);
}
END_TEST

/* Trainable weights by name: listing, reading and writing a slice of a
 * stacked buffer without touching its neighbours, and bad requests. */
START_TEST(test_trainable_access)
{
    atmoe_context *ctx = test_context();
    fixture f;
    fixture_make(&f, ctx, specs, NSPEC, 1);
    size_t count;
    ck_assert_status(atmoe_graph_get_trainable_count(f.g, &count), ctx);
    ck_assert_uint_eq(count, NSPEC);
    for (size_t i = 0; i < NSPEC; i++) {
        atmoe_trainable_info info;
        ck_assert_status(atmoe_graph_get_trainable(f.g, i, &info), ctx);
        ck_assert_str_eq(info.name, specs[i].name);
        ck_assert_int_eq(info.ndim, specs[i].ndim);
        ck_assert_uint_eq(info.shape[0], specs[i].shape[0]);
        if (specs[i].ndim == 2)
            ck_assert_uint_eq(info.shape[1], specs[i].shape[1]);
        ck_assert_uint_eq(info.count, spec_count(&specs[i]));
    }
    atmoe_trainable_info info;
    ck_assert_fails_with(atmoe_graph_get_trainable(f.g, NSPEC, &info), ctx,
                         ATMOE_STATUS_OUT_OF_RANGE, "4 trainable");

    /* The slice is rows 1 and 2 of a [3, 11] tensor: row 0 stays. */
    enum { C = 11 };
    float whole[3 * C], back[3 * C], part[2 * C], got[2 * C];
    for (int i = 0; i < 3 * C; i++)
        whole[i] = (float)(i + 1) * 0.25f;
    ck_assert_status(atmoe_tensor_write(f.w[2], whole, sizeof whole), ctx);
    test_poison(got, 2 * C);
    ck_assert_status(atmoe_graph_read_trainable(f.g, "experts.1.A", got,
                                                2 * C), ctx);
    ck_assert(memcmp(got, whole + C, sizeof got) == 0);
    for (int i = 0; i < 2 * C; i++)
        part[i] = -(float)i - 0.5f;
    ck_assert_status(atmoe_graph_write_trainable(f.g, "experts.1.A", part,
                                                 2 * C), ctx);
    ck_assert_status(atmoe_tensor_read(f.w[2], back, sizeof back), ctx);
    ck_assert(memcmp(back, whole, C * sizeof(float)) == 0);
    ck_assert(memcmp(back + C, part, sizeof part) == 0);

    ck_assert_fails_with(atmoe_graph_read_trainable(f.g, "nope", got, 2 * C),
                         ctx, ATMOE_STATUS_NOT_FOUND, "nope");
    ck_assert_fails_with(atmoe_graph_write_trainable(f.g, "experts.1.A", part,
                                                     2 * C - 1),
                         ctx, ATMOE_STATUS_SHAPE_MISMATCH, "22 elements");
    ck_assert_fails_with(atmoe_graph_read_gradient(f.g, "bias", got, 5), ctx,
                         ATMOE_STATUS_INVALID_ARGUMENT, "nothing computed");
    ck_assert_fails(atmoe_graph_read_gradient(f.g, "bias", got, 4), ctx,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    ck_assert_fails(atmoe_graph_read_trainable(f.g, NULL, got, 4), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_graph_read_gradient(f.g, "bias", NULL, 5), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_graph_get_trainable_count(NULL, &count), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_graph_get_trainable(f.g, 0, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    fixture_free(&f);
    atmoe_context_free(ctx);
}
END_TEST

/* The whole loop on the device: the gradient of 0.5 ||w - t||^2 is a node
 * computed from the parameter w itself, which the optimiser updates in
 * place, so each compute sees the last step's weights.  AdamW with warm-up
 * and cosine decay brings the loss down by a factor of 1000 or more in 150
 * steps. */
START_TEST(test_fits_a_target)
{
    enum { R = 9, C = 17, STEPS = 150 };
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 18);
    float *w0 = random_values(&rng, R * C, 1.0);
    float *target = random_values(&rng, R * C, 1.0);
    size_t shape[2] = {R, C};
    atmoe_tensor *w;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, &w),
                     ctx);
    ck_assert_status(atmoe_tensor_write(w, w0, R * C * sizeof(float)), ctx);
    atmoe_graph *g;
    atmoe_node wn, tn, neg, d, sq, l1, loss;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    ck_assert_status(atmoe_graph_parameter(g, "w", w, &wn), ctx);
    ck_assert_status(atmoe_graph_constant(g, "t", ATMOE_DTYPE_F32, 2, shape,
                                          target, &tn), ctx);
    ck_assert_status(atmoe_graph_scale(g, tn, -1.0f, &neg), ctx);
    ck_assert_status(atmoe_graph_add(g, wn, neg, &d), ctx);
    ck_assert_status(atmoe_graph_mul(g, d, d, &sq), ctx);
    ck_assert_status(atmoe_graph_mean(g, sq, 1, &l1), ctx);
    ck_assert_status(atmoe_graph_mean(g, l1, 0, &loss), ctx);
    ck_assert_status(atmoe_graph_mark_output(g, d), ctx);
    ck_assert_status(atmoe_graph_mark_output(g, loss), ctx);
    atm_trainable t;
    memset(&t, 0, sizeof t);
    snprintf(t.name, sizeof t.name, "w");
    t.buffer = w->buffer;
    t.offset = w->offset;
    t.ndim = 2;
    t.shape[0] = R;
    t.shape[1] = C;
    t.count = R * C;
    t.grad = d;
    ck_assert_status(atm_graph_add_trainable(g, &t, "test"), ctx);
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);

    atmoe_optimizer_config c = adamw_config();
    c.lr = 0.05f;
    c.weight_decay = 0.0f;
    c.max_grad_norm = 5.0f;
    c.schedule = ATMOE_SCHEDULE_COSINE;
    c.warmup_steps = 5;
    c.total_steps = STEPS;
    c.min_lr = 1e-3f;
    atmoe_optimizer *opt;
    ck_assert_status(atmoe_optimizer_new(g, &c, &opt), ctx);
    float first = NAN, last = NAN;
    for (int s = 0; s < STEPS; s++) {
        ck_assert_status(atmoe_graph_compute(g, 0), ctx);
        float l;
        ck_assert_status(atmoe_graph_read(g, loss, &l, sizeof l), ctx);
        if (s == 0)
            first = l;
        last = l;
        ck_assert_status(atmoe_optimizer_step(opt, l, NULL), ctx);
    }
    ck_assert_msg(first > 0.1f && last < first / 1000.0f,
                  "the loss went from %g to %g in %d steps", first, last,
                  STEPS);
    atmoe_optimizer_free(opt);
    atmoe_graph_free(g);
    atmoe_tensor_free(w);
    free(w0);
    free(target);
    atmoe_context_free(ctx);
}
END_TEST

static Suite *optimizer_suite(void)
{
    Suite *s = suite_create("optimizer");
    TCase *tc = tcase_create("optimizer");
    tcase_add_test(tc, test_adamw_one_step);
    tcase_add_test(tc, test_adamw_ten_steps);
    tcase_add_test(tc, test_adamw_work_groups);
    tcase_add_test(tc, test_sgd);
    tcase_add_test(tc, test_schedule);
    tcase_add_test(tc, test_not_finite_skips);
    tcase_add_test(tc, test_resume_bit_for_bit);
    tcase_add_test(tc, test_mismatched_checkpoint);
    tcase_add_test(tc, test_bad_configs);
    tcase_add_test(tc, test_trainable_access);
    tcase_add_test(tc, test_fits_a_target);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(optimizer_suite());
}
