/* Expert sets: LoRA experts stacked for the fused mixture. */
#include <config.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/half.h"
#include "moe/experts.h"
#include "base/log.h"

/* x as the storage type holds it (f32, f16 or bf16), widened back. */
static float stored_value(atmoe_dtype dtype, float x)
{
    if (dtype == ATMOE_DTYPE_F16)
        return atm_f16_to_f32(atm_f32_to_f16(x));
    if (dtype == ATMOE_DTYPE_BF16)
        return atm_bf16_to_f32(atm_f32_to_bf16(x));
    return x;
}

ATMOE_API atmoe_status atmoe_experts_new(atmoe_context *ctx, size_t d_in,
                                         size_t d_out, atmoe_experts **set)
{
    if (set)
        *set = NULL;
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, set);
    if (d_in == 0 || d_out == 0 || d_in > UINT32_MAX || d_out > UINT32_MAX)
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "atmoe_experts_new: d_in %zu and d_out %zu must be 1 "
                        "to 2^32-1", d_in, d_out);
    atmoe_experts *s = atm_calloc(1, sizeof *s);
    if (s == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "atmoe_experts_new: out of host memory");
    s->ctx = ctx;
    s->refs = 1;
    s->d_in = d_in;
    s->d_out = d_out;
    s->lambda = 1.0f;
    *set = s;
    return ATMOE_STATUS_OK;
}

void atm_experts_retain(atmoe_experts *set)
{
    set->refs++;
}

ATMOE_API void atmoe_experts_free(atmoe_experts *set)
{
    if (set == NULL || --set->refs > 0)
        return;
    atmoe_tensor_free(set->a);
    atmoe_tensor_free(set->bt);
    atmoe_tensor_free(set->b);
    atmoe_tensor_free(set->chan_expert);
    atmoe_tensor_free(set->chan_scale);
    atm_free(set->a_host);
    atm_free(set->bt_host);
    atm_free(set->experts);
    atm_free(set);
}

static atmoe_status check_lora(atmoe_experts *set, const char *fn,
                               size_t rank, const float *a, const float *b,
                               float alpha, unsigned flags)
{
    atmoe_context *ctx = set->ctx;
    if (a == NULL || b == NULL)
        return atm_fail(ctx, ATMOE_STATUS_NULL_POINTER,
                        "%s: argument '%s' is NULL", fn, a ? "b" : "a");
    if (set->sealed)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the expert set is in use by a router or a graph "
                        "and can no longer change; build a new set", fn);
    if (set->dense_r2)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the set holds a dense (T-REX) adapter and takes "
                        "nothing else", fn);
    if (rank == 0 || rank > set->d_in || rank > set->d_out)
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: rank %zu must be 1 to min(d_in %zu, d_out %zu)",
                        fn, rank, set->d_in, set->d_out);
    if (!isfinite(alpha))
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: alpha is %g", fn, alpha);
    if (flags & ~ATMOE_EXPERT_RSLORA)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: unknown flags 0x%x", fn, flags);
    return ATMOE_STATUS_OK;
}

/* Appends rank rows to the stacked host copies: A as is, B transposed. */
static atmoe_status append(atmoe_experts *set, const char *fn, size_t rank,
                           const float *a, const float *b, size_t *offset)
{
    size_t r0 = set->total_rank, r1 = r0 + rank;
    float *na = atm_realloc(set->a_host, r1 * set->d_in * sizeof *na);
    if (na)
        set->a_host = na;
    float *nb = na ? atm_realloc(set->bt_host, r1 * set->d_out * sizeof *nb) : NULL;
    if (nb)
        set->bt_host = nb;
    if (na == NULL || nb == NULL)
        return atm_fail(set->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", fn);
    memcpy(na + r0 * set->d_in, a, rank * set->d_in * sizeof *a);
    for (size_t r = 0; r < rank; r++)
        for (size_t j = 0; j < set->d_out; j++)
            nb[(r0 + r) * set->d_out + j] = b[j * rank + r];
    *offset = r0;
    set->total_rank = r1;
    return ATMOE_STATUS_OK;
}

static float lora_scale(size_t rank, float alpha, unsigned flags)
{
    return flags & ATMOE_EXPERT_RSLORA ? alpha / sqrtf((float)rank)
                                       : alpha / (float)rank;
}

static atmoe_status grow(atmoe_experts *set, const char *fn)
{
    if (set->count < set->capacity)
        return ATMOE_STATUS_OK;
    size_t cap = set->capacity ? set->capacity * 2 : 8;
    atm_expert *p = atm_realloc(set->experts, cap * sizeof *p);
    if (p == NULL)
        return atm_fail(set->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", fn);
    set->experts = p;
    set->capacity = cap;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_experts_add(atmoe_experts *set, int group,
                                         size_t rank, const float *a,
                                         const float *b, float alpha,
                                         unsigned flags, int *index)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, set);
    atmoe_status st = check_lora(set, fn, rank, a, b, alpha, flags);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (group < 0 || (size_t)group > set->groups)
        return atm_fail(set->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: group %d; groups are numbered densely, so the "
                        "next may be 0 to %zu", fn, group, set->groups);
    if ((st = grow(set, fn)) != ATMOE_STATUS_OK)
        return st;
    /* The general LoRA stays last: new experts go before it. */
    atm_expert general;
    if (set->has_general)
        general = set->experts[--set->count];
    atm_expert e = {group, 0, rank, 0, lora_scale(rank, alpha, flags), alpha,
                    flags, 0};
    for (size_t i = 0; i < set->count; i++)
        e.slot += set->experts[i].group == group;
    st = append(set, fn, rank, a, b, &e.offset);
    if (st == ATMOE_STATUS_OK) {
        set->experts[set->count++] = e;
        if ((size_t)group == set->groups)
            set->groups++;
        if ((size_t)e.slot + 1 > set->max_group)
            set->max_group = (size_t)e.slot + 1;
        if (index)
            *index = (int)set->count - 1;
    }
    if (set->has_general)
        set->experts[set->count++] = general;
    return st;
}

ATMOE_API atmoe_status atmoe_experts_set_general(atmoe_experts *set,
                                                 size_t rank, const float *a,
                                                 const float *b, float alpha,
                                                 unsigned flags, float lambda)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, set);
    atmoe_status st = check_lora(set, fn, rank, a, b, alpha, flags);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (!(lambda >= 0.0f && lambda <= 1.0f))
        return atm_fail(set->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: lambda is %g, must be in [0, 1]", fn, lambda);
    if (set->has_general)
        return atm_fail(set->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the set has a general LoRA already", fn);
    if ((st = grow(set, fn)) != ATMOE_STATUS_OK)
        return st;
    atm_expert e = {-1, 0, rank, 0, lora_scale(rank, alpha, flags), alpha,
                    flags, 0};
    if ((st = append(set, fn, rank, a, b, &e.offset)) != ATMOE_STATUS_OK)
        return st;
    set->experts[set->count++] = e;
    set->has_general = 1;
    set->lambda = lambda;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_experts_set_dense(atmoe_experts *set, size_t r1,
                                               const float *a, size_t r2,
                                               const float *b)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, set);
    atmoe_status st = check_lora(set, fn, r1, a, b, 1.0f, 0);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (set->count > 0)
        return atm_fail(set->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the set has experts already; a dense adapter "
                        "needs a set of its own", fn);
    if (r2 == 0 || r2 > set->d_out)
        return atm_fail(set->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: r2 %zu must be 1 to d_out %zu", fn, r2,
                        set->d_out);
    if ((st = grow(set, fn)) != ATMOE_STATUS_OK)
        return st;
    float *na = atm_malloc(r1 * set->d_in * sizeof *na);
    float *nb = atm_malloc(r2 * set->d_out * sizeof *nb);
    if (na == NULL || nb == NULL) {
        atm_free(na);
        atm_free(nb);
        return atm_fail(set->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", fn);
    }
    memcpy(na, a, r1 * set->d_in * sizeof *a);
    for (size_t r = 0; r < r2; r++)
        for (size_t j = 0; j < set->d_out; j++)
            nb[r * set->d_out + j] = b[j * r2 + r];
    set->a_host = na;
    set->bt_host = nb;
    set->total_rank = r1;
    set->dense_r2 = r2;
    set->experts[set->count++] = (atm_expert){0, 0, r1, 0, 1.0f, 1.0f, 0, 0};
    set->groups = set->max_group = 1;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_experts_get_info(const atmoe_experts *set,
                                              atmoe_experts_info *info)
{
    ATM_CHECK_NULL(NULL, set);
    ATM_CHECK_NULL(set->ctx, info);
    info->d_in = set->d_in;
    info->d_out = set->d_out;
    info->experts = set->count - (size_t)set->has_general;
    info->groups = set->groups;
    info->max_group = set->max_group;
    info->total_rank = set->total_rank;
    info->dense_r2 = set->dense_r2;
    info->has_general = set->has_general;
    info->lambda = set->lambda;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_experts_set_dtype(atmoe_experts *set,
                                               atmoe_dtype a_dtype,
                                               atmoe_dtype b_dtype)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, set);
    if (atm_weight_type(a_dtype) < 0 || atm_weight_type(b_dtype) < 0)
        return atm_fail(set->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: A_all and B_all are stored as f32, f16 or bf16, "
                        "not %s and %s", fn, atmoe_dtype_name(a_dtype),
                        atmoe_dtype_name(b_dtype));
    if (set->sealed)
        return atm_fail(set->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the expert set is in use by a router or a graph "
                        "and its storage can no longer change", fn);
    for (size_t i = 0; i < set->count; i++)
        if (set->experts[i].train &&
            (a_dtype != ATMOE_DTYPE_F32 || b_dtype != ATMOE_DTYPE_F32))
            return atm_fail(set->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                            "%s: expert %zu is trainable, and training "
                            "needs f32 storage", fn, i);
    set->a_dtype = a_dtype;
    set->b_dtype = b_dtype;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_experts_get_dtype(const atmoe_experts *set,
                                               atmoe_dtype *a_dtype,
                                               atmoe_dtype *b_dtype)
{
    ATM_CHECK_NULL(NULL, set);
    if (a_dtype)
        *a_dtype = set->a_dtype;
    if (b_dtype)
        *b_dtype = set->b_dtype;
    return ATMOE_STATUS_OK;
}

/* Copies rows [row0, row0 + rows) of a device matrix of cols columns,
 * widened to f32 from its storage type. */
static atmoe_status read_rows(atmoe_tensor *t, size_t row0, size_t rows,
                              size_t cols, float *dst)
{
    size_t start[2] = {row0, 0}, shape[2] = {rows, cols}, n = rows * cols;
    atmoe_tensor *view;
    atmoe_status st = atmoe_tensor_view(t, start, shape, &view);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (t->dtype == ATMOE_DTYPE_F32) {
        st = atmoe_tensor_read(view, dst, n * sizeof *dst);
    } else {
        /* Narrow elements fit in the caller's array; widened from the
         * last down, so that none is overwritten before it is read (f32
         * i covers narrow elements 2i and 2i + 1, consumed already). */
        unsigned char *raw = (unsigned char *)dst;
        st = atmoe_tensor_read(view, raw, n * sizeof(uint16_t));
        for (size_t i = n; st == ATMOE_STATUS_OK && i-- > 0;) {
            uint16_t h;
            memcpy(&h, raw + i * sizeof h, sizeof h);
            dst[i] = t->dtype == ATMOE_DTYPE_F16 ? atm_f16_to_f32(h)
                                                 : atm_bf16_to_f32(h);
        }
    }
    atmoe_tensor_free(view);
    return st;
}

ATMOE_API atmoe_status atmoe_experts_get_expert(const atmoe_experts *set,
                                                size_t index,
                                                atmoe_expert_info *info,
                                                float *a, size_t a_count,
                                                float *b, size_t b_count)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, set);
    atmoe_context *ctx = set->ctx;
    if (set->dense_r2)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: a dense (T-REX) set holds shared vectors, not "
                        "experts", fn);
    if (index >= set->count)
        return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: index %zu; the set has %zu expert(s)%s", fn,
                        index, set->count - (size_t)set->has_general,
                        set->has_general ? " and the general LoRA after them"
                                         : "");
    const atm_expert *e = &set->experts[index];
    size_t na = e->rank * set->d_in, nb = set->d_out * e->rank;
    if ((a && a_count != na) || (b && b_count != nb))
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: expert %zu has A [%zu, %zu] and B [%zu, %zu]: "
                        "%zu and %zu elements, not %zu and %zu", fn, index,
                        e->rank, set->d_in, set->d_out, e->rank, na, nb,
                        a_count, b_count);
    float *bt = NULL;
    if (b && set->sealed && (bt = atm_malloc(nb * sizeof *bt)) == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", fn);
    atmoe_status st = ATMOE_STATUS_OK;
    if (a && set->sealed)
        st = read_rows(set->a, e->offset, e->rank, set->d_in, a);
    else if (a)
        memcpy(a, set->a_host + e->offset * set->d_in, na * sizeof *a);
    if (b && st == ATMOE_STATUS_OK && set->sealed)
        st = read_rows(set->bt, e->offset, e->rank, set->d_out, bt);
    /* The set keeps B transposed (rank rows of d_out). */
    const float *src = bt ? bt : set->bt_host + e->offset * set->d_out;
    if (b && st == ATMOE_STATUS_OK)
        for (size_t r = 0; r < e->rank; r++)
            for (size_t j = 0; j < set->d_out; j++)
                b[j * e->rank + r] = src[r * set->d_out + j];
    atm_free(bt);
    if (st == ATMOE_STATUS_OK && info)
        *info = (atmoe_expert_info){e->group, e->slot, e->rank, e->alpha,
                                    e->flags, e->scale};
    return st;
}

static atmoe_status upload(atmoe_context *ctx, atmoe_dtype dtype, size_t rows,
                           size_t cols, const void *data, atmoe_tensor **out)
{
    size_t shape[2] = {rows, cols};
    atmoe_status st = atmoe_tensor_new(ctx, dtype, cols ? 2 : 1, shape, out);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_tensor_write(*out, data,
                                rows * (cols ? cols : 1) * atmoe_dtype_size(dtype));
    return st;
}

/* Uploads f32 rows [rows, cols] as storage type dtype (f32, f16, bf16). */
static atmoe_status upload_as(atmoe_context *ctx, atmoe_dtype dtype,
                              size_t rows, size_t cols, const float *data,
                              atmoe_tensor **out)
{
    if (dtype == ATMOE_DTYPE_F32)
        return upload(ctx, dtype, rows, cols, data, out);
    size_t n = rows * cols;
    uint16_t *h = atm_malloc(n * sizeof *h);
    if (h == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "sealing the expert set: out of host memory");
    for (size_t i = 0; i < n; i++)
        h[i] = dtype == ATMOE_DTYPE_F16 ? atm_f32_to_f16(data[i])
                                        : atm_f32_to_bf16(data[i]);
    atmoe_status st = upload(ctx, dtype, rows, cols, h, out);
    atm_free(h);
    return st;
}

atmoe_status atm_experts_seal(atmoe_experts *set)
{
    if (set->sealed)
        return ATMOE_STATUS_OK;
    atmoe_context *ctx = set->ctx;
    size_t experts = set->count - (size_t)set->has_general;
    if (experts == 0)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "the expert set has no expert (atmoe_experts_add)");
    size_t R = set->total_rank;
    size_t up = set->dense_r2 ? set->dense_r2 : R;
    int *chan_e = atm_malloc(R * sizeof *chan_e);
    float *chan_s = atm_malloc(R * sizeof *chan_s);
    float *b = atm_malloc(up * set->d_out * sizeof *b);
    atmoe_status st = ATMOE_STATUS_OK;
    if (chan_e == NULL || chan_s == NULL || b == NULL) {
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      "sealing the expert set: out of host memory");
        goto out;
    }
    for (size_t i = 0; i < set->count; i++) {
        const atm_expert *e = &set->experts[i];
        int general = e->group < 0;
        for (size_t r = 0; r < e->rank; r++) {
            chan_e[e->offset + r] = general ? -1 : (int)i;
            chan_s[e->offset + r] =
                e->scale * (general ? 1.0f - set->lambda : set->lambda);
        }
    }
    /* The weights as stored: B's f32 copies (bt, for CLBlast) hold the
     * rounded values too. */
    for (size_t i = 0; i < up * set->d_out; i++)
        set->bt_host[i] = stored_value(set->b_dtype, set->bt_host[i]);
    for (size_t r = 0; r < up; r++)
        for (size_t j = 0; j < set->d_out; j++)
            b[j * up + r] = set->bt_host[r * set->d_out + j];
    if ((st = upload_as(ctx, set->a_dtype, R, set->d_in, set->a_host,
                        &set->a)) ||
        (st = upload(ctx, ATMOE_DTYPE_F32, up, set->d_out, set->bt_host,
                     &set->bt)) ||
        (st = upload_as(ctx, set->b_dtype, set->d_out, up, b, &set->b)) ||
        (st = upload(ctx, ATMOE_DTYPE_I32, R, 0, chan_e, &set->chan_expert)) ||
        (st = upload(ctx, ATMOE_DTYPE_F32, R, 0, chan_s, &set->chan_scale)))
        goto out;
    set->sealed = 1;
    /* The device copies are what the mixture reads from now on. */
    atm_free(set->a_host);
    atm_free(set->bt_host);
    set->a_host = set->bt_host = NULL;
out:
    if (!set->sealed) {
        atmoe_tensor_free(set->a);
        atmoe_tensor_free(set->bt);
        atmoe_tensor_free(set->b);
        atmoe_tensor_free(set->chan_expert);
        atmoe_tensor_free(set->chan_scale);
        set->a = set->bt = set->b = set->chan_expert = set->chan_scale = NULL;
    }
    atm_free(b);
    atm_free(chan_e);
    atm_free(chan_s);
    return st;
}

/* ---------------------------------------------------------------- training */

int atm_experts_trains_b(const atmoe_experts *set)
{
    for (size_t i = 0; i < set->count; i++)
        if (set->experts[i].train & ATMOE_TRAIN_B)
            return 1;
    return 0;
}

int atm_experts_trains(const atmoe_experts *set)
{
    for (size_t i = 0; i < set->count; i++)
        if (set->experts[i].train)
            return 1;
    return 0;
}

/* b = (bt)^T on the device, through the host: the set's second copy of B,
 * which cl/linear.cl reads, made current again once no B trains (the
 * optimiser updates bt only).  Not a compute: it may allocate. */
static atmoe_status resync_b(atmoe_experts *set, const char *fn)
{
    size_t up = set->dense_r2 ? set->dense_r2 : set->total_rank;
    size_t n = up * set->d_out;
    float *bt = atm_malloc(n * sizeof *bt), *b = atm_malloc(n * sizeof *b);
    atmoe_status st = ATMOE_STATUS_OK;
    if (bt == NULL || b == NULL)
        st = atm_fail(set->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      "%s: out of host memory", fn);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_tensor_read(set->bt, bt, n * sizeof *bt);
    if (st == ATMOE_STATUS_OK) {
        for (size_t r = 0; r < up; r++)
            for (size_t j = 0; j < set->d_out; j++)
                b[j * up + r] = bt[r * set->d_out + j];
        st = atmoe_tensor_write(set->b, b, n * sizeof *b);
    }
    atm_free(bt);
    atm_free(b);
    return st;
}

ATMOE_API atmoe_status atmoe_experts_set_trainable(atmoe_experts *set,
                                                   size_t index,
                                                   unsigned what)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, set);
    atmoe_context *ctx = set->ctx;
    if (what & ~(ATMOE_TRAIN_A | ATMOE_TRAIN_B))
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: unknown flags 0x%x (ATMOE_TRAIN_A, "
                        "ATMOE_TRAIN_B)", fn, what);
    if (index >= set->count)
        return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: index %zu; the set has %zu expert(s)%s", fn,
                        index, set->count - (size_t)set->has_general,
                        set->has_general ? " and the general LoRA after them"
                        : set->dense_r2 ? " (a dense set: index 0 is its "
                                          "down and up vectors)"
                                        : "");
    /* The optimiser updates the stored elements in place with f32
     * arithmetic: weights kept in another type could not take it. */
    if (what &&
        (set->a_dtype != ATMOE_DTYPE_F32 || set->b_dtype != ATMOE_DTYPE_F32))
        return atm_fail(ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: the set stores its experts as %s (A) and %s "
                        "(B); training needs f32 storage", fn,
                        atmoe_dtype_name(set->a_dtype),
                        atmoe_dtype_name(set->b_dtype));
    int trained_b = atm_experts_trains_b(set);
    set->experts[index].train = what;
    if (trained_b && !atm_experts_trains_b(set) && set->sealed)
        return resync_b(set, fn);
    return ATMOE_STATUS_OK;
}
