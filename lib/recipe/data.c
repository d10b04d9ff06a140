/* The recipes' training data and configuration. */
#include <config.h>

#include <math.h>
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

atmoe_status atm_recipe_read_data(atmoe_context *ctx, const char *fn,
                                  const char *path, size_t d_in,
                                  size_t d_out, int tasks,
                                  atm_recipe_data *d)
{
    memset(d, 0, sizeof *d);
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(ctx, path, &f);
    if (st != ATMOE_STATUS_OK)
        return st;
    atmoe_safetensors_tensor x, y, t;
    if (atmoe_safetensors_find(f, "x", &x) ||
        atmoe_safetensors_find(f, "y", &y) ||
        (tasks >= 0 && atmoe_safetensors_find(f, "task", &t))) {
        st = atm_fail(ctx, ATMOE_STATUS_NOT_FOUND,
                      "%s: %s: the data needs tensors x [N, d_in], y [N, "
                      "d_out]%s", fn, path, tasks >= 0 ? " and task [N]" : "");
        goto out;
    }
    size_t n = x.ndim == 2 ? (size_t)x.shape[0] : 0;
    if (x.ndim != 2 || x.shape[1] != d_in || n == 0) {
        st = atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                      "%s: %s: x must be [N, %zu] (the manifest's input "
                      "width), N >= 1", fn, path, d_in);
        goto out;
    }
    if (y.ndim != 2 || y.shape[0] != n || y.shape[1] != d_out) {
        st = atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                      "%s: %s: y must be [%zu, %zu] (x's rows, the "
                      "manifest's output width)", fn, path, n, d_out);
        goto out;
    }
    if (tasks >= 0 && (t.ndim != 1 || t.shape[0] != n ||
                       t.dtype != ATMOE_SAFETENSORS_I32)) {
        st = atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                      "%s: %s: task must be I32 [%zu], one per row of x", fn,
                      path, n);
        goto out;
    }
    d->n = n;
    d->d_in = d_in;
    d->d_out = d_out;
    d->x = atm_malloc(n * d_in * sizeof *d->x);
    d->y = atm_malloc(n * d_out * sizeof *d->y);
    d->task = tasks >= 0 ? atm_malloc(n * sizeof *d->task) : NULL;
    if (d->x == NULL || d->y == NULL || (tasks >= 0 && d->task == NULL)) {
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      "%s: out of host memory for %zu rows", fn, n);
        goto out;
    }
    if ((st = atmoe_safetensors_read_f32(f, "x", d->x, n * d_in)) ||
        (st = atmoe_safetensors_read_f32(f, "y", d->y, n * d_out)) ||
        (st = check_rows(ctx, fn, path, "x", d->x, n, d_in)) ||
        (st = check_rows(ctx, fn, path, "y", d->y, n, d_out)))
        goto out;
    if (tasks >= 0) {
        memcpy(d->task, t.data, n * sizeof *d->task);
        for (size_t r = 0; r < n; r++)
            if (d->task[r] < 0 || d->task[r] >= tasks) {
                st = atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                              "%s: %s: task of row %zu is %d, outside [0, "
                              "%d) (the manifest's experts)", fn, path, r,
                              (int)d->task[r], tasks);
                goto out;
            }
    }
out:
    atmoe_safetensors_free(f);
    if (st != ATMOE_STATUS_OK)
        atm_recipe_data_free(d);
    return st;
}
