/* The recipes' training data and configuration. */
#include <config.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/alloc.h"
#include "base/error.h"
#include "recipe/recipe.h"

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

atmoe_status atm_recipe_check_config(atmoe_context *ctx, const char *fn,
                                     const atmoe_train_config *c)
{
    if (c->batch == 0)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: batch must be at least 1", fn);
    if (c->steps == 0 && c->epochs == 0)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: steps or epochs must be positive", fn);
    if (c->optimizer.accumulation == 0)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: optimizer.accumulation must be at least 1", fn);
    return ATMOE_STATUS_OK;
}

void atm_recipe_data_free(atm_recipe_data *d)
{
    atm_free(d->x);
    atm_free(d->y);
    atm_free(d->labels);
    atm_free(d->task);
    atm_free(d->hx);
    atm_free(d->hy);
    atm_free(d->hlabels);
    atm_free(d->htask);
    memset(d, 0, sizeof *d);
}

static atmoe_status check_rows(atmoe_context *ctx, const char *fn,
                               const char *path, const char *name,
                               const float *v, size_t n, size_t w)
{
    for (size_t r = 0; r < n; r++)
        for (size_t i = 0; i < w; i++)
            if (!isfinite(v[r * w + i]))
                return atm_fail(ctx, ATMOE_STATUS_NOT_FINITE,
                                "%s: %s: %s row %zu, column %zu is not "
                                "finite", fn, path, name, r, i);
    return ATMOE_STATUS_OK;
}

/* I32 values v [n] of tensor name, each in [0, limit) or (ignore not
 * NULL) *ignore; what says what limit counts. */
static atmoe_status check_ids(atmoe_context *ctx, const char *fn,
                              const char *path, const char *name,
                              const int32_t *v, size_t n, size_t limit,
                              const int *ignore, const char *what)
{
    for (size_t r = 0; r < n; r++) {
        if ((v[r] >= 0 && (size_t)v[r] < limit) || (ignore && v[r] == *ignore))
            continue;
        char also[64] = "";
        if (ignore)
            snprintf(also, sizeof also, " and not the ignore index %d",
                     *ignore);
        return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: %s: %s of row %zu is %d, outside [0, %zu) (%s)%s",
                        fn, path, name, r, (int)v[r], limit, what, also);
    }
    return ATMOE_STATUS_OK;
}

/* One set of rows (held 0: the training set, 1: the held-out one): x,
 * then y or, with a head, labels, and task, each name with suffix. */
static atmoe_status read_set(atmoe_context *ctx, const char *fn,
                             const char *path, atmoe_safetensors *f,
                             int held, int tasks, atm_recipe_data *d)
{
    const char *suffix = held ? "_heldout" : "";
    char xn[32], yn[32], ln[32], tn[32];
    snprintf(xn, sizeof xn, "x%s", suffix);
    snprintf(yn, sizeof yn, "y%s", suffix);
    snprintf(ln, sizeof ln, "labels%s", suffix);
    snprintf(tn, sizeof tn, "task%s", suffix);
    size_t d_in = d->d_in, d_out = d->d_out;
    int classify = d->classes > 0;
    const char *target = classify ? ln : yn;
    char want[64];
    if (classify)
        snprintf(want, sizeof want, "%s [N] (I32)", ln);
    else
        snprintf(want, sizeof want, "%s [N, d_out]", yn);
    atmoe_safetensors_tensor x, y, t, probe;
    int has_y = atmoe_safetensors_find(f, yn, &probe) == ATMOE_STATUS_OK;
    int has_l = atmoe_safetensors_find(f, ln, &probe) == ATMOE_STATUS_OK;
    if (classify && has_y && has_l)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: %s: the data has both %s and %s; the manifest's "
                        "head trains on %s alone", fn, path, yn, ln, ln);
    if (!classify && has_l)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: %s: the data has %s, but the manifest has no "
                        "\"head\" to classify with (atmoe-manifest(5)); "
                        "without one the recipes fit %s [N, d_out]", fn,
                        path, ln, yn);
    if (atmoe_safetensors_find(f, xn, &x) ||
        atmoe_safetensors_find(f, target, &y) ||
        (tasks >= 0 && atmoe_safetensors_find(f, tn, &t)))
        return atm_fail(ctx, ATMOE_STATUS_NOT_FOUND,
                        "%s: %s: the data needs tensors %s [N, d_in], %s%s%s%s"
                        "%s", fn, path, xn, want,
                        tasks >= 0 ? " and " : "", tasks >= 0 ? tn : "",
                        tasks >= 0 ? " [N]" : "",
                        classify ? " (the manifest has a head)" : "");
    size_t n = x.ndim == 2 ? (size_t)x.shape[0] : 0;
    if (x.ndim != 2 || x.shape[1] != d_in || n == 0)
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s: %s must be [N, %zu] (the manifest's input "
                        "width), N >= 1", fn, path, xn, d_in);
    if (!classify && (y.ndim != 2 || y.shape[0] != n || y.shape[1] != d_out))
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s: %s must be [%zu, %zu] (%s's rows, the "
                        "manifest's output width)", fn, path, yn, n, d_out,
                        xn);
    if (classify && (y.ndim != 1 || y.shape[0] != n ||
                     y.dtype != ATMOE_SAFETENSORS_I32))
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s: %s must be I32 [%zu], one class per row of "
                        "%s", fn, path, ln, n, xn);
    if (tasks >= 0 && (t.ndim != 1 || t.shape[0] != n ||
                       t.dtype != ATMOE_SAFETENSORS_I32))
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s: %s must be I32 [%zu], one per row of %s",
                        fn, path, tn, n, xn);
    float **xo = held ? &d->hx : &d->x, **yo = held ? &d->hy : &d->y;
    int32_t **lo = held ? &d->hlabels : &d->labels;
    int32_t **to = held ? &d->htask : &d->task;
    *(held ? &d->hn : &d->n) = n;
    *xo = atm_malloc(n * d_in * sizeof **xo);
    if (classify)
        *lo = atm_malloc(n * sizeof **lo);
    else
        *yo = atm_malloc(n * d_out * sizeof **yo);
    *to = tasks >= 0 ? atm_malloc(n * sizeof **to) : NULL;
    if (*xo == NULL || (classify ? *lo == NULL : *yo == NULL) ||
        (tasks >= 0 && *to == NULL))
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory for %zu rows", fn, n);
    atmoe_status st;
    if ((st = atmoe_safetensors_read_f32(f, xn, *xo, n * d_in)) ||
        (st = check_rows(ctx, fn, path, xn, *xo, n, d_in)))
        return st;
    if (classify) {
        memcpy(*lo, y.data, n * sizeof **lo);
        if ((st = check_ids(ctx, fn, path, ln, *lo, n, d->classes,
                            &d->ignore_index, "the head's classes")))
            return st;
        size_t counted = 0;
        for (size_t r = 0; r < n; r++)
            counted += (*lo)[r] != d->ignore_index;
        if (counted == 0)
            return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                            "%s: %s: every row of %s is the ignore index %d: "
                            "no row to %s", fn, path, ln, d->ignore_index,
                            held ? "measure" : "train on");
    } else if ((st = atmoe_safetensors_read_f32(f, yn, *yo, n * d_out)) ||
               (st = check_rows(ctx, fn, path, yn, *yo, n, d_out))) {
        return st;
    }
    if (tasks >= 0) {
        memcpy(*to, t.data, n * sizeof **to);
        if ((st = check_ids(ctx, fn, path, tn, *to, n, (size_t)tasks, NULL,
                            "the manifest's experts")))
            return st;
    }
    return ATMOE_STATUS_OK;
}

atmoe_status atm_recipe_read_data(atmoe_context *ctx, const char *fn,
                                  const char *path, const atmoe_manifest *mf,
                                  int tasks, atm_recipe_data *d)
{
    memset(d, 0, sizeof *d);
    d->d_in = mf->d_in;
    d->d_out = mf->d_out;
    d->classes = mf->head.file ? mf->classes : 0;
    d->ignore_index = mf->ignore_index;
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(ctx, path, &f);
    if (st != ATMOE_STATUS_OK)
        return st;
    atmoe_safetensors_tensor probe;
    st = read_set(ctx, fn, path, f, 0, tasks, d);
    if (st == ATMOE_STATUS_OK &&
        atmoe_safetensors_find(f, "x_heldout", &probe) == ATMOE_STATUS_OK)
        st = read_set(ctx, fn, path, f, 1, tasks, d);
    atmoe_safetensors_free(f);
    if (st != ATMOE_STATUS_OK)
        atm_recipe_data_free(d);
    return st;
}
