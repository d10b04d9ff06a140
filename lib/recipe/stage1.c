/* AT-MoE's first stage (atmoe_train_stage1): every adapter directory a
 * manifest names trained as a plain LoRA over the stack, the base frozen,
 * on its own task's rows, and written as a PEFT adapter.  The recipe
 * layer stands above train and io: it only composes their public calls. */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "atmoe.h"
#include "base/alloc.h"
#include "base/error.h"

#define FN "atmoe_train_stage1"

atmoe_status atmoe_train_config_default(atmoe_train_config *config)
{
    if (config == NULL)
        return atm_fail(NULL, ATMOE_STATUS_NULL_POINTER,
                        "atmoe_train_config_default: config is NULL");
    memset(config, 0, sizeof *config);
    atmoe_optimizer_config_default(&config->optimizer);
    config->epochs = 1;
    config->batch = 32;
    return ATMOE_STATUS_OK;
}

/* One model of the stage: an adapter directory of the manifest. */
typedef struct model {
    const char *dir;
    const char *base; /* its last path component: the output's name */
    int general;
    int task;          /* its task id (-1 for the general LoRA) */
    atmoe_adapter *out;
} model;

typedef struct data {
    float *x, *y;
    int32_t *task;
    size_t n;
} data;

static const char *basename_of(const char *dir)
{
    size_t len = strlen(dir);
    while (len > 1 && dir[len - 1] == '/')
        len--;
    size_t i = len;
    while (i > 0 && dir[i - 1] != '/')
        i--;
    return dir + i;
}

static size_t base_len(const char *base)
{
    size_t n = strlen(base);
    while (n > 1 && base[n - 1] == '/')
        n--;
    return n;
}

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void shuffle(size_t *v, size_t n, uint64_t *state)
{
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(splitmix(state) % i);
        size_t t = v[i - 1];
        v[i - 1] = v[j];
        v[j] = t;
    }
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static atmoe_status check_config(atmoe_context *ctx,
                                 const atmoe_train_config *c)
{
    if (c->batch == 0)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        FN ": batch must be at least 1");
    if (c->steps == 0 && c->epochs == 0)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        FN ": steps or epochs must be positive");
    if (c->optimizer.accumulation == 0)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        FN ": optimizer.accumulation must be at least 1");
    return ATMOE_STATUS_OK;
}

/* Reads x [N, d_in], y [N, d_out] and task [N] (I32), refusing widths
 * that are not the manifest's, NaN or infinite values (naming the row) and
 * task ids outside [0, tasks). */
static atmoe_status read_data(atmoe_context *ctx, const char *path,
                              size_t d_in, size_t d_out, int tasks, data *d)
{
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(ctx, path, &f);
    if (st != ATMOE_STATUS_OK)
        return st;
    atmoe_safetensors_tensor x, y, t;
    if (atmoe_safetensors_find(f, "x", &x) || atmoe_safetensors_find(f, "y", &y) ||
        atmoe_safetensors_find(f, "task", &t)) {
        st = atm_fail(ctx, ATMOE_STATUS_NOT_FOUND,
                      FN ": %s: stage 1 needs tensors x [N, d_in], y [N, "
                      "d_out] and task [N]", path);
        goto out;
    }
    size_t n = x.ndim == 2 ? (size_t)x.shape[0] : 0;
    if (x.ndim != 2 || x.shape[1] != d_in || n == 0) {
        st = atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                      FN ": %s: x must be [N, %zu] (the manifest's input "
                      "width), N >= 1", path, d_in);
        goto out;
    }
    if (y.ndim != 2 || y.shape[0] != n || y.shape[1] != d_out) {
        st = atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                      FN ": %s: y must be [%zu, %zu] (x's rows, the "
                      "manifest's output width)", path, n, d_out);
        goto out;
    }
    if (t.ndim != 1 || t.shape[0] != n || t.dtype != ATMOE_SAFETENSORS_I32) {
        st = atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                      FN ": %s: task must be I32 [%zu], one per row of x",
                      path, n);
        goto out;
    }
    d->n = n;
    d->x = atm_malloc(n * d_in * sizeof *d->x);
    d->y = atm_malloc(n * d_out * sizeof *d->y);
    d->task = atm_malloc(n * sizeof *d->task);
    if (d->x == NULL || d->y == NULL || d->task == NULL) {
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      FN ": out of host memory for %zu rows", n);
        goto out;
    }
    if ((st = atmoe_safetensors_read_f32(f, "x", d->x, n * d_in)) ||
        (st = atmoe_safetensors_read_f32(f, "y", d->y, n * d_out)))
        goto out;
    memcpy(d->task, t.data, n * sizeof *d->task);
    for (size_t r = 0; r < n; r++) {
        for (size_t i = 0; i < d_in; i++)
            if (!isfinite(d->x[r * d_in + i])) {
                st = atm_fail(ctx, ATMOE_STATUS_NOT_FINITE,
                              FN ": %s: x row %zu, column %zu is not "
                              "finite", path, r, i);
                goto out;
            }
        for (size_t i = 0; i < d_out; i++)
            if (!isfinite(d->y[r * d_out + i])) {
                st = atm_fail(ctx, ATMOE_STATUS_NOT_FINITE,
                              FN ": %s: y row %zu, column %zu is not "
                              "finite", path, r, i);
                goto out;
            }
        if (d->task[r] < 0 || d->task[r] >= tasks) {
            st = atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                          FN ": %s: task of row %zu is %d, outside [0, %d) "
                          "(the manifest's experts)", path, r,
                          (int)d->task[r], tasks);
            goto out;
        }
    }
out:
    atmoe_safetensors_free(f);
    return st;
}

/* The base weight of a module as [d_out, d_in] f32 (transposed on the host
 * when the file stores [in, out]), and its bias or NULL. */
static atmoe_status read_base(atmoe_context *ctx,
                              const atmoe_manifest_module *m, float **w,
                              float **bias)
{
    size_t count = m->d_in * m->d_out;
    atmoe_safetensors *f = NULL;
    atmoe_status st;
    float *raw = atm_malloc(count * sizeof *raw);
    *w = atm_malloc(count * sizeof **w);
    *bias = NULL;
    if (raw == NULL || *w == NULL) {
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      FN ": out of host memory");
        goto out;
    }
    if ((st = atmoe_safetensors_open(ctx, m->weight.file, &f)) ||
        (st = atmoe_safetensors_read_f32(f, m->weight.tensor, raw, count)))
        goto out;
    if (m->weight.transposed)
        for (size_t o = 0; o < m->d_out; o++)
            for (size_t i = 0; i < m->d_in; i++)
                (*w)[o * m->d_in + i] = raw[i * m->d_out + o];
    else
        memcpy(*w, raw, count * sizeof *raw);
    if (m->bias.file) {
        atmoe_safetensors_free(f);
        f = NULL;
        if ((*bias = atm_malloc(m->d_out * sizeof **bias)) == NULL) {
            st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                          FN ": out of host memory");
            goto out;
        }
        if ((st = atmoe_safetensors_open(ctx, m->bias.file, &f)) ||
            (st = atmoe_safetensors_read_f32(f, m->bias.tensor, *bias,
                                             m->d_out)))
            goto out;
    }
out:
    atmoe_safetensors_free(f);
    atm_free(raw);
    return st;
}

/* A module of the stack that a model adapts: the adapter's target and the
 * trainables' names in the model's graph. */
typedef struct slot {
    size_t target;
    size_t rank, d_in, d_out;
    char name[32];
} slot;

typedef struct stack {
    size_t layers;
    atmoe_manifest_module *mods; /* the output module of every layer */
    size_t *index;               /* its module index in the manifest */
    float **w, **bias;
} stack;

/* Trains model k and leaves its adapter in mdl->out. */
static atmoe_status train_model(atmoe_context *ctx, atmoe_manifest *mf,
                                const stack *sk, model *models, size_t k,
                                size_t n_models, const data *d,
                                const atmoe_train_config *cfg)
{
    model *mdl = &models[k];
    const atmoe_manifest_module *first = &sk->mods[0];
    const atmoe_manifest_module *last = &sk->mods[sk->layers - 1];
    size_t d_in = first->d_in, d_out = last->d_out, B = cfg->batch;
    atmoe_adapter *in = NULL;
    atmoe_graph *g = NULL;
    atmoe_optimizer *opt = NULL;
    size_t *rows = NULL;
    float *xb = NULL, *yb = NULL, *a = NULL, *bt = NULL, *b = NULL;
    slot *slots = atm_calloc(sk->layers, sizeof *slots);
    size_t n_slots = 0, n_rows = 0, big = 0;
    atmoe_status st;
    if (slots == NULL)
        goto oom;
    for (size_t r = 0; r < d->n; r++)
        n_rows += mdl->general || d->task[r] == mdl->task;
    rows = atm_malloc(n_rows * sizeof *rows);
    xb = atm_malloc(B * d_in * sizeof *xb);
    yb = atm_malloc(B * d_out * sizeof *yb);
    if (rows == NULL || xb == NULL || yb == NULL)
        goto oom;
    n_rows = 0;
    for (size_t r = 0; r < d->n; r++)
        if (mdl->general || d->task[r] == mdl->task)
            rows[n_rows++] = r;

    if ((st = atmoe_adapter_open(ctx, mdl->dir, &in)) ||
        (st = atmoe_adapter_new(ctx, &mdl->out)))
        goto out;
    /* The output holds every target of the input; those the stack trains
     * are replaced below. */
    atmoe_adapter_info ai;
    atmoe_adapter_get_info(in, &ai);
    for (size_t t = 0; t < ai.targets; t++) {
        atmoe_adapter_target tg;
        atmoe_adapter_get_target(in, t, &tg);
        size_t an = tg.rank * tg.d_in, bn = tg.d_out * tg.rank;
        float *ta = atm_malloc(an * sizeof *ta), *tb = atm_malloc(bn * sizeof *tb);
        if (ta == NULL || tb == NULL) {
            atm_free(ta);
            atm_free(tb);
            goto oom;
        }
        st = atmoe_adapter_read(in, t, ta, an, tb, bn);
        if (st == ATMOE_STATUS_OK)
            st = atmoe_adapter_set(mdl->out, tg.module, tg.rank, tg.d_in,
                                   tg.d_out, ta, tb, tg.alpha, tg.flags);
        atm_free(ta);
        atm_free(tb);
        if (st != ATMOE_STATUS_OK)
            goto out;
    }

    atmoe_node x, y, cur, loss;
    size_t xs[2] = {B, d_in}, ys[2] = {B, d_out};
    if ((st = atmoe_graph_new(ctx, &g)) ||
        (st = atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 1, &x)) ||
        (st = atmoe_graph_input(g, "y", ATMOE_DTYPE_F32, 2, ys, 1, &y)))
        goto out;
    cur = x;
    for (size_t l = 0; l < sk->layers; l++) {
        const atmoe_manifest_module *m = &sk->mods[l];
        atmoe_node w0, bias = ATMOE_NODE_NONE, out;
        size_t ws[2] = {m->d_out, m->d_in}, bs[1] = {m->d_out};
        char name[32];
        snprintf(name, sizeof name, "layer%zu.w0", l);
        if ((st = atmoe_graph_constant(g, name, ATMOE_DTYPE_F32, 2, ws,
                                       sk->w[l], &w0)))
            goto out;
        snprintf(name, sizeof name, "layer%zu.bias", l);
        if (sk->bias[l] &&
            (st = atmoe_graph_constant(g, name, ATMOE_DTYPE_F32, 1, bs,
                                       sk->bias[l], &bias)))
            goto out;
        /* Does this model adapt the module? */
        atmoe_manifest_expert ex;
        int found = 0;
        size_t count = m->experts + (size_t)m->has_general;
        for (size_t e = 0; e < count && !found; e++) {
            atmoe_manifest_get_expert(mf, sk->index[l], e, &ex);
            found = strcmp(ex.adapter, mdl->dir) == 0;
        }
        if (!found) {
            if ((st = atmoe_graph_matmul(g, cur, w0, bias,
                                         ATMOE_MATMUL_TRANSPOSE_B, &out)))
                goto out;
            cur = out;
            continue;
        }
        slot *s = &slots[n_slots++];
        if ((st = atmoe_adapter_find(in, ex.layer, ex.module, &s->target)))
            goto out;
        atmoe_adapter_target tg;
        atmoe_adapter_get_target(in, s->target, &tg);
        s->rank = tg.rank;
        s->d_in = tg.d_in;
        s->d_out = tg.d_out;
        size_t an = tg.rank * tg.d_in, bn = tg.d_out * tg.rank;
        big = an > big ? an : big;
        big = bn > big ? bn : big;
        atm_free(a);
        atm_free(b);
        a = atm_malloc(an * sizeof *a);
        b = atm_malloc(bn * sizeof *b);
        if (a == NULL || b == NULL)
            goto oom;
        atmoe_experts *set = NULL;
        const float one = 1.0f;
        size_t gs[2] = {1, 1};
        atmoe_node gates;
        snprintf(s->name, sizeof s->name, "layer%zu", l);
        snprintf(name, sizeof name, "layer%zu.gates", l);
        if ((st = atmoe_adapter_read(in, s->target, a, an, b, bn)) ||
            (st = atmoe_experts_new(ctx, m->d_in, m->d_out, &set)) ||
            (st = atmoe_experts_add(set, 0, tg.rank, a, b, tg.alpha, tg.flags,
                                    NULL)) ||
            (st = atmoe_experts_set_trainable(set, 0,
                                              ATMOE_TRAIN_A | ATMOE_TRAIN_B)) ||
            (st = atmoe_graph_constant(g, name, ATMOE_DTYPE_F32, 2, gs, &one,
                                       &gates)) ||
            (st = atmoe_graph_mixture(g, cur, w0, bias, set, ATMOE_MIX_BLOCK,
                                      gates, ATMOE_NODE_NONE, 1.0f, &out)) ||
            (st = atmoe_graph_set_name(g, out, s->name)) ||
            (st = atmoe_graph_mixture_set_merge(g, out, ATMOE_MERGE_NEVER))) {
            atmoe_experts_free(set);
            goto out;
        }
        atmoe_experts_free(set);
        cur = out;
    }
    if (n_slots == 0) {
        st = atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                      FN ": adapter %s adapts no output module of the "
                      "stack: nothing of it reaches the loss", mdl->dir);
        goto out;
    }
    atmoe_optimizer_config oc = cfg->optimizer;
    size_t per_epoch = (n_rows + B - 1) / B;
    uint64_t steps = cfg->steps
                         ? cfg->steps
                         : ((uint64_t)per_epoch * cfg->epochs +
                            oc.accumulation - 1) / oc.accumulation;
    if (oc.schedule == ATMOE_SCHEDULE_COSINE && oc.total_steps == 0)
        oc.total_steps = steps;
    if ((st = atmoe_graph_loss_mse(g, cur, y, &loss)) ||
        (st = atmoe_graph_backward(g, loss)) || (st = atmoe_graph_plan(g, 0)) ||
        (st = atmoe_optimizer_new(g, &oc, &opt)))
        goto out;

    uint64_t state = cfg->seed ^ (0x632be59bd9b4e019ull * (k + 1));
    size_t pos = n_rows; /* shuffle before the first micro-batch */
    double t0 = now_s();
    uint64_t tokens = 0;
    for (uint64_t step = 1; step <= steps; step++) {
        double sum = 0;
        for (unsigned mb = 0; mb < oc.accumulation; mb++) {
            if (pos >= n_rows) {
                shuffle(rows, n_rows, &state);
                pos = 0;
            }
            size_t take = n_rows - pos < B ? n_rows - pos : B;
            for (size_t i = 0; i < take; i++) {
                size_t r = rows[pos + i];
                memcpy(xb + i * d_in, d->x + r * d_in, d_in * sizeof *xb);
                memcpy(yb + i * d_out, d->y + r * d_out, d_out * sizeof *yb);
            }
            pos += take;
            tokens += take;
            float l;
            if ((st = atmoe_graph_set_input(g, x, xb, take * d_in * sizeof *xb,
                                            take)) ||
                (st = atmoe_graph_set_input(g, y, yb,
                                            take * d_out * sizeof *yb, take)) ||
                (st = atmoe_graph_compute(g, take)) ||
                (st = atmoe_graph_read(g, loss, &l, sizeof l)) ||
                (oc.accumulation > 1 && (st = atmoe_optimizer_accumulate(opt))))
                goto out;
            sum += l;
        }
        atmoe_optimizer_report rep;
        float mean = (float)(sum / oc.accumulation);
        st = atmoe_optimizer_step(opt, mean, &rep);
        /* A step skipped as not finite changes nothing: training goes on,
         * and the report counts it. */
        if (st != ATMOE_STATUS_OK && st != ATMOE_STATUS_NOT_FINITE)
            goto out;
        st = ATMOE_STATUS_OK;
        if (cfg->progress) {
            double el = now_s() - t0;
            atmoe_train_progress p = {k, n_models, mdl->dir, step, steps,
                                      mean, rep.lr, rep.grad_norm,
                                      el > 0 ? (double)tokens / el : 0, el,
                                      0};
            if (cfg->progress(&p, cfg->user)) {
                st = atm_fail(ctx, ATMOE_STATUS_CANCELLED,
                              FN ": stopped by the progress callback at "
                              "step %llu of adapter %s; nothing written",
                              (unsigned long long)step, mdl->dir);
                goto out;
            }
        }
    }

    /* The trained model's loss over all its rows, as the saved adapter
     * gives it (the forward of the same graph). */
    double total = 0;
    for (size_t p0 = 0; p0 < n_rows; p0 += B) {
        size_t take = n_rows - p0 < B ? n_rows - p0 : B;
        for (size_t i = 0; i < take; i++) {
            size_t r = rows[p0 + i];
            memcpy(xb + i * d_in, d->x + r * d_in, d_in * sizeof *xb);
            memcpy(yb + i * d_out, d->y + r * d_out, d_out * sizeof *yb);
        }
        float l;
        if ((st = atmoe_graph_set_input(g, x, xb, take * d_in * sizeof *xb,
                                        take)) ||
            (st = atmoe_graph_set_input(g, y, yb, take * d_out * sizeof *yb,
                                        take)) ||
            (st = atmoe_graph_compute(g, take)) ||
            (st = atmoe_graph_read(g, loss, &l, sizeof l)))
            goto out;
        total += (double)l * (double)take;
    }

    atm_free(a);
    atm_free(b);
    a = atm_malloc(big * sizeof *a);
    b = atm_malloc(big * sizeof *b);
    bt = atm_malloc(big * sizeof *bt);
    if (a == NULL || b == NULL || bt == NULL)
        goto oom;
    for (size_t i = 0; i < n_slots; i++) {
        const slot *s = &slots[i];
        char an[64], bn[64];
        snprintf(an, sizeof an, "%s/expert0/A", s->name);
        snprintf(bn, sizeof bn, "%s/expert0/B_T", s->name);
        if ((st = atmoe_graph_read_trainable(g, an, a, s->rank * s->d_in)) ||
            (st = atmoe_graph_read_trainable(g, bn, bt, s->rank * s->d_out)))
            goto out;
        for (size_t o = 0; o < s->d_out; o++)
            for (size_t r = 0; r < s->rank; r++)
                b[o * s->rank + r] = bt[r * s->d_out + o];
        atmoe_adapter_target tg;
        atmoe_adapter_get_target(in, s->target, &tg);
        if ((st = atmoe_adapter_set(mdl->out, tg.module, s->rank, s->d_in,
                                    s->d_out, a, b, tg.alpha, tg.flags)))
            goto out;
    }
    if (cfg->progress) {
        double el = now_s() - t0;
        atmoe_train_progress p = {k, n_models, mdl->dir, steps, steps,
                                  (float)(total / (double)n_rows), 0, 0,
                                  el > 0 ? (double)tokens / el : 0, el, 1};
        cfg->progress(&p, cfg->user);
    }
    goto out;
oom:
    st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                  FN ": out of host memory");
out:
    atmoe_optimizer_free(opt);
    atmoe_graph_free(g);
    atmoe_adapter_free(in);
    atm_free(slots);
    atm_free(rows);
    atm_free(xb);
    atm_free(yb);
    atm_free(a);
    atm_free(b);
    atm_free(bt);
    return st;
}

atmoe_status atmoe_train_stage1(atmoe_context *ctx, atmoe_manifest *manifest,
                                const char *data_path,
                                const atmoe_train_config *config,
                                const char *output)
{
    if (ctx == NULL || manifest == NULL || data_path == NULL ||
        config == NULL || output == NULL)
        return atm_fail(ctx, ATMOE_STATUS_NULL_POINTER,
                        FN ": %s is NULL",
                        ctx == NULL        ? "ctx"
                        : manifest == NULL ? "manifest"
                        : data_path == NULL ? "data"
                        : config == NULL   ? "config"
                                           : "output");
    atmoe_status st = check_config(ctx, config);
    if (st != ATMOE_STATUS_OK || (st = atmoe_manifest_check(manifest)))
        return st;
    atmoe_manifest_info info;
    atmoe_manifest_get_info(manifest, &info);

    stack sk = {0};
    model *models = NULL;
    size_t n_models = 0;
    int tasks = 0;
    data d = {0};
    sk.mods = atm_calloc(info.layers, sizeof *sk.mods);
    sk.index = atm_calloc(info.layers, sizeof *sk.index);
    sk.w = atm_calloc(info.layers, sizeof *sk.w);
    sk.bias = atm_calloc(info.layers, sizeof *sk.bias);
    /* At most one model per expert entry. */
    size_t entries = 0;
    for (size_t i = 0; i < info.modules; i++) {
        atmoe_manifest_module m;
        atmoe_manifest_get_module(manifest, i, &m);
        entries += m.experts + (size_t)m.has_general;
    }
    models = atm_calloc(entries ? entries : 1, sizeof *models);
    if (sk.mods == NULL || sk.index == NULL || sk.w == NULL ||
        sk.bias == NULL || models == NULL) {
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      FN ": out of host memory");
        goto out;
    }
    /* The models, in the order their directories first appear; experts
     * number the tasks, the general LoRA trains on every row. */
    for (size_t i = 0; i < info.modules; i++) {
        atmoe_manifest_module m;
        atmoe_manifest_get_module(manifest, i, &m);
        if (m.rank1) {
            st = atm_fail(ctx, ATMOE_STATUS_NOT_SUPPORTED,
                          FN ": module %zu (%s of layer %zu) holds rank-1 "
                          "experts, which stage 1 does not train (T-REX "
                          "trains them jointly)", i, m.name, m.layer);
            goto out;
        }
        if (m.is_output) {
            sk.mods[m.layer] = m;
            sk.index[m.layer] = i;
        }
        for (size_t e = 0; e < m.experts + (size_t)m.has_general; e++) {
            atmoe_manifest_expert ex;
            atmoe_manifest_get_expert(manifest, i, e, &ex);
            size_t j = 0;
            while (j < n_models && strcmp(models[j].dir, ex.adapter))
                j++;
            int general = ex.group < 0;
            if (j < n_models) {
                if (models[j].general != general) {
                    st = atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                                  FN ": adapter %s is both an expert and a "
                                  "general LoRA: stage 1 cannot tell which "
                                  "rows train it", ex.adapter);
                    goto out;
                }
                continue;
            }
            for (size_t o = 0; o < n_models; o++) {
                size_t la = base_len(models[o].base);
                const char *bb = basename_of(ex.adapter);
                if (la == base_len(bb) && !strncmp(models[o].base, bb, la)) {
                    st = atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                                  FN ": adapters %s and %s share the "
                                  "directory name the output is written "
                                  "under", models[o].dir, ex.adapter);
                    goto out;
                }
            }
            models[n_models].dir = ex.adapter;
            models[n_models].base = basename_of(ex.adapter);
            models[n_models].general = general;
            models[n_models].task = general ? -1 : tasks++;
            n_models++;
        }
    }
    sk.layers = info.layers;
    if (tasks == 0) {
        st = atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                      FN ": the manifest names no expert adapter");
        goto out;
    }
    for (size_t l = 0; l < sk.layers; l++)
        if ((st = read_base(ctx, &sk.mods[l], &sk.w[l], &sk.bias[l])))
            goto out;
    if ((st = read_data(ctx, data_path, info.d_in, info.d_out, tasks, &d)))
        goto out;
    for (size_t k = 0; k < n_models; k++) {
        if (models[k].general)
            continue;
        size_t rows = 0;
        for (size_t r = 0; r < d.n; r++)
            rows += d.task[r] == models[k].task;
        if (rows == 0) {
            st = atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                          FN ": %s: task %d (adapter %s) has no rows",
                          data_path, models[k].task, models[k].dir);
            goto out;
        }
    }
    for (size_t k = 0; k < n_models; k++)
        if ((st = train_model(ctx, manifest, &sk, models, k, n_models, &d,
                              config)))
            goto out;

    /* Everything trained: only now is anything written. */
    if (mkdir(output, 0777) != 0 && errno != EEXIST) {
        st = atm_fail(ctx, ATMOE_STATUS_IO_ERROR, FN ": cannot create %s: %s",
                      output, strerror(errno));
        goto out;
    }
    for (size_t k = 0; k < n_models; k++) {
        size_t len = strlen(output) + base_len(models[k].base) + 2;
        char *dir = atm_malloc(len);
        if (dir == NULL) {
            st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                          FN ": out of host memory");
            goto out;
        }
        snprintf(dir, len, "%s/%.*s", output, (int)base_len(models[k].base),
                 models[k].base);
        st = atmoe_adapter_save(models[k].out, dir, ATMOE_SAFETENSORS_F32);
        atm_free(dir);
        if (st != ATMOE_STATUS_OK)
            goto out;
    }
out:
    for (size_t k = 0; k < n_models; k++)
        atmoe_adapter_free(models[k].out);
    atm_free(models);
    for (size_t l = 0; sk.w && l < info.layers; l++) {
        atm_free(sk.w[l]);
        atm_free(sk.bias[l]);
    }
    atm_free(sk.w);
    atm_free(sk.bias);
    atm_free(sk.mods);
    atm_free(sk.index);
    atm_free(d.x);
    atm_free(d.y);
    atm_free(d.task);
    return st;
}
