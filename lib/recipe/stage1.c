/* AT-MoE's first stage (atmoe_train_stage1): every adapter directory a
 * manifest names trained as a plain LoRA over the stack, the base frozen,
 * on its own task's rows, and written as a PEFT adapter.  The recipe
 * layer stands above train and io: it only composes their public calls. */
#include <config.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "atmoe.h"
#include "base/alloc.h"
#include "base/error.h"
#include "recipe/recipe.h"

#define FN "atmoe_train_stage1"

/* One model of the stage: an adapter directory of the manifest. */
typedef struct model {
    const char *dir;
    const char *base; /* its last path component: the output's name */
    int general;
    int task;          /* its task id (-1 for the general LoRA) */
    atmoe_adapter *out;
} model;

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
                                size_t n_models, const atm_recipe_data *d,
                                const atmoe_train_config *cfg)
{
    model *mdl = &models[k];
    size_t d_in = sk->mods[0].d_in, B = cfg->batch;
    atmoe_adapter *in = NULL;
    atmoe_graph *g = NULL;
    atmoe_optimizer *opt = NULL;
    size_t *rows = NULL, *held = NULL, n_held = 0;
    float *a = NULL, *bt = NULL, *b = NULL;
    slot *slots = atm_calloc(sk->layers, sizeof *slots);
    size_t n_slots = 0, n_rows = 0, big = 0;
    atmoe_status st;
    if (slots == NULL)
        goto oom;
    for (size_t r = 0; r < d->n; r++)
        n_rows += mdl->general || d->task[r] == mdl->task;
    rows = atm_malloc(n_rows * sizeof *rows);
    if (rows == NULL)
        goto oom;
    n_rows = 0;
    for (size_t r = 0; r < d->n; r++)
        if (mdl->general || d->task[r] == mdl->task)
            rows[n_rows++] = r;
    for (size_t r = 0; r < d->hn; r++)
        n_held += mdl->general || d->htask[r] == mdl->task;
    if (n_held && (held = atm_malloc(n_held * sizeof *held)) == NULL)
        goto oom;
    n_held = 0;
    for (size_t r = 0; r < d->hn; r++)
        if (mdl->general || d->htask[r] == mdl->task)
            held[n_held++] = r;

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
    size_t xs[2] = {B, d_in};
    if ((st = atmoe_graph_new(ctx, &g)) ||
        (st = atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 1, &x)))
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
    if ((st = atm_recipe_loss(mf, g, B, cur, &y, &loss)))
        goto out;
    atm_recipe_fit fit = {.g = g, .x = x, .y = y, .loss = loss,
                          .rows = rows, .n_rows = n_rows, .held = held,
                          .n_held = n_held, .model = k, .models = n_models,
                          .name = mdl->dir, .index = ATMOE_NODE_NONE};
    if ((st = atm_recipe_fit_run(ctx, FN, &fit, d, cfg, NULL)))
        goto out;

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
    atm_free(held);
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
    atmoe_status st = atm_recipe_check_config(ctx, FN, config);
    if (st != ATMOE_STATUS_OK || (st = atmoe_manifest_check(manifest)))
        return st;
    atmoe_manifest_info info;
    atmoe_manifest_get_info(manifest, &info);

    stack sk = {0};
    model *models = NULL;
    size_t n_models = 0;
    int tasks = 0;
    atm_recipe_data d = {0};
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
    if ((st = atm_recipe_read_data(ctx, FN, data_path, manifest, tasks,
                                   &d)))
        goto out;
    for (size_t k = 0; k < n_models; k++) {
        if (models[k].general)
            continue;
        /* Rows whose label is ignored train nothing. */
        size_t rows = 0;
        for (size_t r = 0; r < d.n; r++)
            rows += d.task[r] == models[k].task &&
                    (d.labels == NULL || d.labels[r] != d.ignore_index);
        if (rows == 0) {
            st = atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                          FN ": %s: task %d (adapter %s) has no rows%s",
                          data_path, models[k].task, models[k].dir,
                          d.labels ? " whose label is not ignored" : "");
            goto out;
        }
    }
    for (size_t k = 0; k < n_models; k++)
        if ((st = train_model(ctx, manifest, &sk, models, k, n_models, &d,
                              config)))
            goto out;

    /* Everything trained: only now is anything written. */
    atm_recipe_output o;
    if ((st = atm_recipe_output_begin(ctx, FN, output, &o)))
        goto out;
    for (size_t k = 0; k < n_models && st == ATMOE_STATUS_OK; k++) {
        size_t len = strlen(o.dir) + base_len(models[k].base) + 2;
        char *dir = atm_malloc(len);
        if (dir == NULL) {
            st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                          FN ": out of host memory");
            break;
        }
        snprintf(dir, len, "%s/%.*s", o.dir, (int)base_len(models[k].base),
                 models[k].base);
        st = atmoe_adapter_save(models[k].out, dir, ATMOE_SAFETENSORS_F32);
        atm_free(dir);
    }
    st = atm_recipe_output_end(ctx, FN, &o, st);
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
    atm_recipe_data_free(&d);
    return st;
}
