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
    atm_free(d->task);
    atm_free(d->hx);
    atm_free(d->hy);
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

/* One set of rows: x<suffix>, y<suffix> and task<suffix>. */
static atmoe_status read_set(atmoe_context *ctx, const char *fn,
                             const char *path, atmoe_safetensors *f,
                             const char *suffix, size_t d_in, size_t d_out,
                             int tasks, float **xo, float **yo,
                             int32_t **to, size_t *no)
{
    char xn[32], yn[32], tn[32];
    snprintf(xn, sizeof xn, "x%s", suffix);
    snprintf(yn, sizeof yn, "y%s", suffix);
    snprintf(tn, sizeof tn, "task%s", suffix);
    atmoe_safetensors_tensor x, y, t;
    if (atmoe_safetensors_find(f, xn, &x) || atmoe_safetensors_find(f, yn, &y) ||
        (tasks >= 0 && atmoe_safetensors_find(f, tn, &t)))
        return atm_fail(ctx, ATMOE_STATUS_NOT_FOUND,
                        "%s: %s: the data needs tensors %s [N, d_in], %s [N, "
                        "d_out]%s%s%s", fn, path, xn, yn,
                        tasks >= 0 ? " and " : "", tasks >= 0 ? tn : "",
                        tasks >= 0 ? " [N]" : "");
    size_t n = x.ndim == 2 ? (size_t)x.shape[0] : 0;
    if (x.ndim != 2 || x.shape[1] != d_in || n == 0)
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s: %s must be [N, %zu] (the manifest's input "
                        "width), N >= 1", fn, path, xn, d_in);
    if (y.ndim != 2 || y.shape[0] != n || y.shape[1] != d_out)
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s: %s must be [%zu, %zu] (%s's rows, the "
                        "manifest's output width)", fn, path, yn, n, d_out,
                        xn);
    if (tasks >= 0 && (t.ndim != 1 || t.shape[0] != n ||
                       t.dtype != ATMOE_SAFETENSORS_I32))
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s: %s must be I32 [%zu], one per row of %s",
                        fn, path, tn, n, xn);
    *no = n;
    *xo = atm_malloc(n * d_in * sizeof **xo);
    *yo = atm_malloc(n * d_out * sizeof **yo);
    *to = tasks >= 0 ? atm_malloc(n * sizeof **to) : NULL;
    if (*xo == NULL || *yo == NULL || (tasks >= 0 && *to == NULL))
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory for %zu rows", fn, n);
    atmoe_status st;
    if ((st = atmoe_safetensors_read_f32(f, xn, *xo, n * d_in)) ||
        (st = atmoe_safetensors_read_f32(f, yn, *yo, n * d_out)) ||
        (st = check_rows(ctx, fn, path, xn, *xo, n, d_in)) ||
        (st = check_rows(ctx, fn, path, yn, *yo, n, d_out)))
        return st;
    if (tasks >= 0) {
        memcpy(*to, t.data, n * sizeof **to);
        for (size_t r = 0; r < n; r++)
            if ((*to)[r] < 0 || (*to)[r] >= tasks)
                return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                                "%s: %s: %s of row %zu is %d, outside [0, "
                                "%d) (the manifest's experts)", fn, path, tn,
                                r, (int)(*to)[r], tasks);
    }
    return ATMOE_STATUS_OK;
}

atmoe_status atm_recipe_read_data(atmoe_context *ctx, const char *fn,
                                  const char *path, size_t d_in,
                                  size_t d_out, int tasks,
                                  atm_recipe_data *d)
{
    memset(d, 0, sizeof *d);
    d->d_in = d_in;
    d->d_out = d_out;
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(ctx, path, &f);
    if (st != ATMOE_STATUS_OK)
        return st;
    atmoe_safetensors_tensor probe;
    st = read_set(ctx, fn, path, f, "", d_in, d_out, tasks, &d->x, &d->y,
                  &d->task, &d->n);
    if (st == ATMOE_STATUS_OK &&
        atmoe_safetensors_find(f, "x_heldout", &probe) == ATMOE_STATUS_OK)
        st = read_set(ctx, fn, path, f, "_heldout", d_in, d_out, tasks,
                      &d->hx, &d->hy, &d->htask, &d->hn);
    atmoe_safetensors_free(f);
    if (st != ATMOE_STATUS_OK)
        atm_recipe_data_free(d);
    return st;
}
