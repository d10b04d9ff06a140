/* Checkpoints of an optimiser: its weights and moments as safetensors,
 * its counts and configuration in the metadata.  A load checks the whole
 * file against the optimiser before it changes anything. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/error.h"
#include "train/optimizer.h"

#define KEY_FORMAT "format"
#define FORMAT_NAME "atmoe-optimizer"
#define KEY_KIND "atmoe.optimizer"
#define KEY_STEP "atmoe.step"
#define KEY_SKIPPED "atmoe.skipped"
#define KEY_CONFIG "atmoe.config"
/* "sgd_momentum/" and a registry name. */
#define TENSOR_NAME_SIZE (16 + ATM_TRAINABLE_NAME_SIZE)

/* Tensor j of entry e: j = 0 its values, j >= 1 moment j - 1. */
static const char *tensor_name(const atmoe_optimizer *opt,
                               const atm_opt_entry *e, size_t j, char *buf)
{
    snprintf(buf, TENSOR_NAME_SIZE, "%s/%s",
             j == 0 ? "param" : atm_opt_state_prefix(opt, j - 1), e->name);
    return buf;
}

static atmoe_status read_range(atmoe_context *ctx, cl_mem buf, size_t off,
                               size_t count, float *dst)
{
    cl_int err = clEnqueueReadBuffer(ctx->queue, buf, CL_TRUE,
                                     off * sizeof(float),
                                     count * sizeof(float), dst, 0, NULL,
                                     NULL);
    return err == CL_SUCCESS ? ATMOE_STATUS_OK
                             : atm_fail_cl(ctx, err, "clEnqueueReadBuffer");
}

static atmoe_status write_config(const atmoe_optimizer *opt,
                                 atmoe_safetensors_writer *w)
{
    const atmoe_optimizer_config *c = &opt->cfg;
    char text[512], step[32], skipped[32];
    snprintf(text, sizeof text,
             "{\"kind\": \"%s\", \"lr\": %.9g, \"beta1\": %.9g, "
             "\"beta2\": %.9g, \"eps\": %.9g, \"momentum\": %.9g, "
             "\"weight_decay\": %.9g, \"max_grad_norm\": %.9g, "
             "\"schedule\": \"%s\", \"warmup_steps\": %" PRIu64 ", "
             "\"total_steps\": %" PRIu64 ", \"min_lr\": %.9g, "
             "\"accumulation\": %u}",
             atm_opt_kind_name(c->kind), (double)c->lr, (double)c->beta1,
             (double)c->beta2, (double)c->eps, (double)c->momentum,
             (double)c->weight_decay, (double)c->max_grad_norm,
             c->schedule == ATMOE_SCHEDULE_COSINE ? "cosine" : "constant",
             c->warmup_steps, c->total_steps, (double)c->min_lr,
             c->accumulation);
    snprintf(step, sizeof step, "%" PRIu64, opt->step);
    snprintf(skipped, sizeof skipped, "%" PRIu64, opt->skipped);
    atmoe_status st = atmoe_safetensors_writer_set_metadata(w, KEY_FORMAT,
                                                            FORMAT_NAME);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_set_metadata(
            w, KEY_KIND, atm_opt_kind_name(c->kind));
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_set_metadata(w, KEY_STEP, step);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_set_metadata(w, KEY_SKIPPED, skipped);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_set_metadata(w, KEY_CONFIG, text);
    return st;
}

ATMOE_API atmoe_status atmoe_optimizer_save(atmoe_optimizer *opt,
                                            const char *path)
{
    ATM_CHECK_NULL(NULL, opt);
    ATM_CHECK_NULL(opt->ctx, path);
    atmoe_context *ctx = opt->ctx;
    if (opt->pending > 0 && opt->cfg.accumulation > 1)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: %u micro-batches of a step are accumulated; "
                        "a checkpoint holds no accumulator (save between "
                        "steps)", __func__, opt->pending);
    float *stage = atm_malloc(opt->max_count * sizeof *stage);
    atmoe_safetensors_writer *w = NULL;
    atmoe_status st = stage == NULL
                          ? atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                                     "%s: out of host memory", __func__)
                          : atmoe_safetensors_writer_new(ctx, &w);
    size_t per = 1 + atm_opt_state_count(opt);
    for (size_t i = 0; i < opt->count && st == ATMOE_STATUS_OK; i++) {
        const atm_opt_entry *e = &opt->entries[i];
        uint64_t shape[ATMOE_SAFETENSORS_MAX_DIMS];
        for (int d = 0; d < e->ndim; d++)
            shape[d] = e->shape[d];
        for (size_t j = 0; j < per && st == ATMOE_STATUS_OK; j++) {
            char name[TENSOR_NAME_SIZE];
            if (j == 0)
                st = read_range(ctx, e->param, e->param_offset, e->count,
                                stage);
            else
                st = read_range(ctx, atm_opt_state_buffer(opt, j - 1),
                                e->state_offset, e->count, stage);
            if (st == ATMOE_STATUS_OK)
                st = atmoe_safetensors_writer_add_f32(
                    w, tensor_name(opt, e, j, name), ATMOE_SAFETENSORS_F32,
                    e->ndim, shape, stage);
        }
    }
    if (st == ATMOE_STATUS_OK)
        st = write_config(opt, w);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_save(w, path);
    atmoe_safetensors_writer_free(w);
    atm_free(stage);
    return st;
}

static atmoe_status parse_count(atmoe_context *ctx, const char *path,
                                const atmoe_safetensors *f, const char *key,
                                uint64_t *out)
{
    const char *v;
    if (atmoe_safetensors_get_metadata(f, key, &v) != ATMOE_STATUS_OK)
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "atmoe_optimizer_load: %s: no '%s' in the metadata",
                        path, key);
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    if (v[0] < '0' || v[0] > '9' || *end != '\0' || errno != 0)
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "atmoe_optimizer_load: %s: '%s' is \"%s\", not a "
                        "count", path, key, v);
    *out = n;
    return ATMOE_STATUS_OK;
}

/* Every check of a load, before anything changes. */
static atmoe_status check_file(atmoe_optimizer *opt, const char *path,
                               const atmoe_safetensors *f, uint64_t *step,
                               uint64_t *skipped)
{
    atmoe_context *ctx = opt->ctx;
    const char *fn = "atmoe_optimizer_load";
    const char *v;
    if (atmoe_safetensors_get_metadata(f, KEY_FORMAT, &v) != ATMOE_STATUS_OK ||
        strcmp(v, FORMAT_NAME) != 0)
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: %s is not an optimiser checkpoint (no "
                        "\"" KEY_FORMAT "\": \"" FORMAT_NAME "\" in its "
                        "metadata)", fn, path);
    const char *kind = atm_opt_kind_name(opt->cfg.kind);
    if (atmoe_safetensors_get_metadata(f, KEY_KIND, &v) != ATMOE_STATUS_OK ||
        strcmp(v, kind) != 0)
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: %s is a checkpoint of another optimiser, not "
                        "%s", fn, path, kind);
    atmoe_status st = parse_count(ctx, path, f, KEY_STEP, step);
    if (st == ATMOE_STATUS_OK)
        st = parse_count(ctx, path, f, KEY_SKIPPED, skipped);
    if (st != ATMOE_STATUS_OK)
        return st;

    size_t per = 1 + atm_opt_state_count(opt);
    for (size_t i = 0; i < opt->count; i++) {
        const atm_opt_entry *e = &opt->entries[i];
        for (size_t j = 0; j < per; j++) {
            char name[TENSOR_NAME_SIZE];
            atmoe_safetensors_tensor t;
            tensor_name(opt, e, j, name);
            if (atmoe_safetensors_find(f, name, &t) != ATMOE_STATUS_OK)
                return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                                "%s: %s has no tensor '%s'", fn, path, name);
            if (t.dtype != ATMOE_SAFETENSORS_F32)
                return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                                "%s: %s: '%s' is %s, not F32", fn, path,
                                name, atmoe_safetensors_dtype_name(t.dtype));
            int same = t.ndim == e->ndim;
            for (int d = 0; same && d < e->ndim; d++)
                same = t.shape[d] == e->shape[d];
            if (!same) {
                char want[64], got[64];
                size_t ts[ATMOE_SAFETENSORS_MAX_DIMS];
                for (int d = 0; d < t.ndim; d++)
                    ts[d] = (size_t)t.shape[d];
                atm_shape_string(e->ndim, e->shape, want, sizeof want);
                atm_shape_string(t.ndim, ts, got, sizeof got);
                return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                                "%s: %s: '%s' is %s, the graph's is %s", fn,
                                path, name, got, want);
            }
        }
    }
    /* Every tensor the file holds was matched above once: any more is a
     * weight this graph does not have. */
    size_t n;
    st = atmoe_safetensors_get_count(f, &n);
    if (st == ATMOE_STATUS_OK && n != opt->count * per) {
        for (size_t k = 0; k < n; k++) {
            atmoe_safetensors_tensor t;
            if (atmoe_safetensors_get(f, k, &t) != ATMOE_STATUS_OK)
                continue;
            const char *slash = strchr(t.name, '/');
            const atm_trainable *tr =
                slash ? atm_graph_trainable_find(opt->graph, slash + 1)
                      : NULL;
            if (tr == NULL)
                return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                                "%s: %s holds '%s', which is not a weight "
                                "of the graph", fn, path, t.name);
        }
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: %s holds %zu tensors, not the %zu of this "
                        "optimiser", fn, path, n, opt->count * per);
    }
    return st;
}

static atmoe_status write_range(atmoe_context *ctx, cl_mem buf, size_t off,
                                size_t count, const float *src)
{
    cl_int err = clEnqueueWriteBuffer(ctx->queue, buf, CL_TRUE,
                                      off * sizeof(float),
                                      count * sizeof(float), src, 0, NULL,
                                      NULL);
    return err == CL_SUCCESS ? ATMOE_STATUS_OK
                             : atm_fail_cl(ctx, err, "clEnqueueWriteBuffer");
}

ATMOE_API atmoe_status atmoe_optimizer_load(atmoe_optimizer *opt,
                                            const char *path)
{
    ATM_CHECK_NULL(NULL, opt);
    ATM_CHECK_NULL(opt->ctx, path);
    atmoe_context *ctx = opt->ctx;
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(ctx, path, &f);
    if (st != ATMOE_STATUS_OK)
        return st;
    uint64_t step = 0, skipped = 0;
    st = check_file(opt, path, f, &step, &skipped);
    float *stage = NULL;
    if (st == ATMOE_STATUS_OK &&
        (stage = atm_malloc(opt->max_count * sizeof *stage)) == NULL)
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      "%s: out of host memory", __func__);
    size_t per = 1 + atm_opt_state_count(opt);
    for (size_t i = 0; i < opt->count && st == ATMOE_STATUS_OK; i++) {
        const atm_opt_entry *e = &opt->entries[i];
        for (size_t j = 0; j < per && st == ATMOE_STATUS_OK; j++) {
            char name[TENSOR_NAME_SIZE];
            st = atmoe_safetensors_read_f32(f, tensor_name(opt, e, j, name),
                                            stage, e->count);
            if (st != ATMOE_STATUS_OK)
                break;
            if (j == 0)
                st = write_range(ctx, e->param, e->param_offset, e->count,
                                 stage);
            else
                st = write_range(ctx, atm_opt_state_buffer(opt, j - 1),
                                 e->state_offset, e->count, stage);
        }
    }
    if (st == ATMOE_STATUS_OK) {
        opt->step = step;
        opt->skipped = skipped;
        opt->pending = 0;
    }
    atm_free(stage);
    atmoe_safetensors_free(f);
    return st;
}
