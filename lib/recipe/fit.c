/* The training loop the recipes share: shuffle by seed, micro-batches,
 * accumulation, optimiser steps, progress, and the trained loss. */
#include <config.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/error.h"
#include "recipe/recipe.h"

/* The least part of the initial loss a run from the start must gain. */
#define ATM_RECIPE_MIN_PROGRESS 1e-4

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

/* The buffers of one batch: inputs, targets (y or labels), indexes. */
typedef struct bufs {
    float *x, *y;
    int32_t *labels, *index;
} bufs;

/* Computes the graph on rows[0 .. take) of the data; *loss its loss,
 * *counted the rows it is a mean over (those not ignored). */
static atmoe_status batch(const atm_recipe_fit *f, const atm_recipe_data *d,
                          int held, const size_t *rows, size_t take,
                          const bufs *b, float *loss, size_t *counted)
{
    atmoe_status st;
    if (f->index != ATMOE_NODE_NONE) {
        const int32_t *of = held ? f->held_index_of : f->index_of;
        for (size_t i = 0; i < take; i++)
            b->index[i] = of[rows[i]];
        if ((st = atmoe_graph_set_input(f->g, f->index, b->index,
                                        take * sizeof *b->index, take)))
            return st;
    }
    size_t di = d->d_in, dout = d->d_out;
    const float *x = held ? d->hx : d->x;
    for (size_t i = 0; i < take; i++)
        memcpy(b->x + i * di, x + rows[i] * di, di * sizeof *b->x);
    if (d->classes) {
        const int32_t *l = held ? d->hlabels : d->labels;
        *counted = 0;
        for (size_t i = 0; i < take; i++) {
            b->labels[i] = l[rows[i]];
            *counted += b->labels[i] != d->ignore_index;
        }
        st = atmoe_graph_set_input(f->g, f->y, b->labels,
                                   take * sizeof *b->labels, take);
    } else {
        const float *y = held ? d->hy : d->y;
        for (size_t i = 0; i < take; i++)
            memcpy(b->y + i * dout, y + rows[i] * dout, dout * sizeof *b->y);
        *counted = take;
        st = atmoe_graph_set_input(f->g, f->y, b->y,
                                   take * dout * sizeof *b->y, take);
    }
    if (st != ATMOE_STATUS_OK ||
        (st = atmoe_graph_set_input(f->g, f->x, b->x, take * di * sizeof *b->x,
                                    take)) ||
        (st = atmoe_graph_compute(f->g, take)))
        return st;
    return atmoe_graph_read(f->g, f->loss, loss, sizeof *loss);
}

/* The mean loss over n rows of the training (held 0) or held-out set:
 * each batch's mean weighted by the rows it counted, so that ignored rows
 * weigh nothing (NaN when every row is ignored). */
static atmoe_status mean_loss(const atm_recipe_fit *f,
                              const atm_recipe_data *d, int held,
                              const size_t *rows, size_t n, size_t B,
                              const bufs *b, double *mean)
{
    double total = 0;
    size_t all = 0;
    for (size_t p0 = 0; p0 < n; p0 += B) {
        size_t take = n - p0 < B ? n - p0 : B, counted;
        float l;
        atmoe_status st = batch(f, d, held, rows + p0, take, b, &l, &counted);
        if (st != ATMOE_STATUS_OK)
            return st;
        total += (double)l * (double)counted;
        all += counted;
    }
    *mean = all ? total / (double)all : NAN;
    return ATMOE_STATUS_OK;
}

/* Loads the checkpoint at path into opt; *done is the steps it had run
 * (taken and skipped), read from its metadata. */
static atmoe_status resume(atmoe_context *ctx, const char *fn,
                           atmoe_optimizer *opt, const char *path,
                           uint64_t *done)
{
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(ctx, path, &f);
    if (st != ATMOE_STATUS_OK)
        return st;
    const char *step, *skipped;
    if (atmoe_safetensors_get_metadata(f, "atmoe.step", &step) ||
        atmoe_safetensors_get_metadata(f, "atmoe.skipped", &skipped)) {
        atmoe_safetensors_free(f);
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: %s is not an optimiser checkpoint (no step "
                        "counts)", fn, path);
    }
    *done = strtoull(step, NULL, 10) + strtoull(skipped, NULL, 10);
    atmoe_safetensors_free(f);
    return atmoe_optimizer_load(opt, path);
}

atmoe_status atm_recipe_fit_run(atmoe_context *ctx, const char *fn,
                                const atm_recipe_fit *f,
                                const atm_recipe_data *d,
                                const atmoe_train_config *cfg,
                                double *final_loss)
{
    size_t B = cfg->batch, n_rows = f->n_rows;
    atmoe_optimizer_config oc = cfg->optimizer;
    size_t per_epoch = (n_rows + B - 1) / B;
    uint64_t steps = cfg->steps
                         ? cfg->steps
                         : ((uint64_t)per_epoch * cfg->epochs +
                            oc.accumulation - 1) / oc.accumulation;
    if (oc.schedule == ATMOE_SCHEDULE_COSINE && oc.total_steps == 0)
        oc.total_steps = steps;
    atmoe_optimizer *opt = NULL;
    char *ckpt = NULL;
    bufs b = {atm_malloc(B * d->d_in * sizeof *b.x),
              atm_malloc(B * d->d_out * sizeof *b.y),
              atm_malloc(B * sizeof *b.labels),
              atm_malloc(B * sizeof *b.index)};
    atmoe_status st;
    if (b.x == NULL || b.y == NULL || b.labels == NULL || b.index == NULL) {
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      "%s: out of host memory", fn);
        goto out;
    }
    if ((st = atmoe_graph_backward(f->g, f->loss)) ||
        (st = atmoe_graph_plan(f->g, 0)) ||
        (st = atmoe_optimizer_new(f->g, &oc, &opt)))
        goto out;
    if (cfg->checkpoint) {
        size_t len = strlen(cfg->checkpoint) + 24;
        if ((ckpt = atm_malloc(len)) == NULL) {
            st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                          "%s: out of host memory", fn);
            goto out;
        }
        if (f->models > 1)
            snprintf(ckpt, len, "%s.%zu", cfg->checkpoint, f->model);
        else
            snprintf(ckpt, len, "%s", cfg->checkpoint);
    }
    uint64_t done = 0;
    if (ckpt && cfg->resume && access(ckpt, F_OK) == 0 &&
        (st = resume(ctx, fn, opt, ckpt, &done)))
        goto out;
    /* The loss of the weights training starts from, over the rows the
     * trained loss is measured on: a run from the start that does not
     * lower it has failed (below), however its steps went. */
    double initial = NAN;
    if (done == 0 &&
        (st = mean_loss(f, d, 0, f->rows, n_rows, B, &b, &initial)))
        goto out;
    uint64_t skipped = 0, skipped_here = 0;
    char why[160] = "";

    /* Each model its own stream, so that a model's run does not depend on
     * how many came before it. */
    uint64_t state = cfg->seed ^ (0x632be59bd9b4e019ull * (f->model + 1));
    size_t pos = n_rows; /* shuffled before the first micro-batch */
    double t0 = now_s();
    uint64_t tokens = 0;
    /* A resumed run replays the shuffles of the steps it skips, so that
     * the next micro-batches are those the uninterrupted run takes. */
    for (uint64_t step = 1; step <= done && step <= steps; step++)
        for (unsigned mb = 0; mb < oc.accumulation; mb++) {
            if (pos >= n_rows) {
                shuffle(f->rows, n_rows, &state);
                pos = 0;
            }
            pos += n_rows - pos < B ? n_rows - pos : B;
        }
    for (uint64_t step = done + 1; step <= steps; step++) {
        double sum = 0;
        for (unsigned mb = 0; mb < oc.accumulation; mb++) {
            if (pos >= n_rows) {
                shuffle(f->rows, n_rows, &state);
                pos = 0;
            }
            size_t take = n_rows - pos < B ? n_rows - pos : B;
            float l;
            size_t counted;
            if ((st = batch(f, d, 0, f->rows + pos, take, &b, &l,
                            &counted)) ||
                (oc.accumulation > 1 &&
                 (st = atmoe_optimizer_accumulate(opt))))
                goto out;
            pos += take;
            tokens += take;
            sum += l;
        }
        atmoe_optimizer_report rep;
        float mean = (float)(sum / oc.accumulation);
        st = atmoe_optimizer_step(opt, mean, &rep);
        /* A step skipped as not finite changes nothing: training goes on,
         * the optimiser counts it, and the progress and the end say so. */
        if (st != ATMOE_STATUS_OK && st != ATMOE_STATUS_NOT_FINITE)
            goto out;
        if (st == ATMOE_STATUS_NOT_FINITE) {
            skipped_here++;
            if (!why[0])
                snprintf(why, sizeof why, "%s", atmoe_errmsg(ctx));
        }
        skipped = rep.skipped;
        st = ATMOE_STATUS_OK;
        if (ckpt && cfg->checkpoint_every && step % cfg->checkpoint_every == 0 &&
            step < steps && (st = atmoe_optimizer_save(opt, ckpt)))
            goto out;
        if (cfg->progress) {
            double el = now_s() - t0;
            atmoe_train_progress p = {
                .model = f->model, .models = f->models, .adapter = f->name,
                .step = step, .steps = steps, .loss = mean, .lr = rep.lr,
                .grad_norm = rep.grad_norm,
                .tokens_per_second = el > 0 ? (double)tokens / el : 0,
                .seconds = el, .done = 0, .heldout_loss = NAN,
                .skipped = skipped, .initial_loss = (float)initial};
            if (cfg->progress(&p, cfg->user)) {
                if (ckpt && (st = atmoe_optimizer_save(opt, ckpt)))
                    goto out;
                st = atm_fail(ctx, ATMOE_STATUS_CANCELLED,
                              "%s: stopped by the progress callback at "
                              "step %llu of %s; nothing written", fn,
                              (unsigned long long)step, f->name);
                goto out;
            }
        }
    }

    if (ckpt && done < steps && (st = atmoe_optimizer_save(opt, ckpt)))
        goto out;

    /* The trained weights' loss over all the rows (the forward of the same
     * graph; its gradients are not used). */
    double total, held = NAN;
    if ((st = mean_loss(f, d, 0, f->rows, n_rows, B, &b, &total)) ||
        (f->n_held &&
         (st = mean_loss(f, d, 1, f->held, f->n_held, B, &b, &held))))
        goto out;
    if (cfg->progress) {
        double el = now_s() - t0;
        atmoe_train_progress p = {
            .model = f->model, .models = f->models, .adapter = f->name,
            .step = steps, .steps = steps, .loss = (float)total,
            .tokens_per_second = el > 0 ? (double)tokens / el : 0,
            .seconds = el, .done = 1, .heldout_loss = (float)held,
            .skipped = skipped, .initial_loss = (float)initial};
        cfg->progress(&p, cfg->user);
    }
    /* A run from the start must have trained: every step skipped, or a
     * trained loss that is not finite or not below the initial one by
     * ATM_RECIPE_MIN_PROGRESS of it, fails (nothing is written), naming
     * the skipped steps.  The margin is far above the rounding of the two
     * means (their batches differ: about 1e-7 of them) and far below what
     * any step that trains gives; a closed T-REX gate leaves the loss
     * within 1e-7 of the initial. */
    uint64_t ran = steps - done;
    if (done == 0 && ran > 0) {
        if (skipped_here == ran) {
            st = atm_fail(ctx, ATMOE_STATUS_NOT_FINITE,
                          "%s: %s: all %llu steps skipped as not finite, "
                          "nothing trained (the first: %s)", fn, f->name,
                          (unsigned long long)ran, why);
            goto out;
        }
        if (!isfinite(total) ||
            !(total < initial * (1 - ATM_RECIPE_MIN_PROGRESS))) {
            st = atm_fail(ctx, isfinite(total) ? ATMOE_STATUS_NO_PROGRESS
                                               : ATMOE_STATUS_NOT_FINITE,
                          "%s: %s: training made no progress: loss %.9g "
                          "over its rows after %llu steps, %.9g before "
                          "(less than %g of it gained; %llu steps skipped "
                          "as not finite)", fn, f->name, total,
                          (unsigned long long)ran, initial,
                          ATM_RECIPE_MIN_PROGRESS,
                          (unsigned long long)skipped_here);
            goto out;
        }
    }
    if (final_loss)
        *final_loss = total;
out:
    atm_free(ckpt);
    atmoe_optimizer_free(opt);
    atm_free(b.x);
    atm_free(b.y);
    atm_free(b.labels);
    atm_free(b.index);
    return st;
}
