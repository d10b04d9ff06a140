#include <config.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/log.h"
#include "device/program.h"
#include "tensor/tensor.h"

ATMOE_API const char *atmoe_dtype_name(atmoe_dtype dtype)
{
    switch (dtype) {
    case ATMOE_DTYPE_F32: return "f32";
    case ATMOE_DTYPE_F16: return "f16";
    case ATMOE_DTYPE_I32: return "i32";
    case ATMOE_DTYPE_BF16: return "bf16";
    case ATMOE_DTYPE_Q8: return "q8";
    }
    return ATM_UNKNOWN_NAME;
}

ATMOE_API size_t atmoe_dtype_size(atmoe_dtype dtype)
{
    switch (dtype) {
    case ATMOE_DTYPE_F32: return 4;
    case ATMOE_DTYPE_F16: return 2;
    case ATMOE_DTYPE_I32: return 4;
    case ATMOE_DTYPE_BF16: return 2;
    case ATMOE_DTYPE_Q8: break; /* blocks: atm_dtype_bytes */
    }
    return 0;
}

size_t atm_dtype_bytes(atmoe_dtype dtype, int ndim, const size_t *shape)
{
    size_t n = 1;
    for (int i = 0; i + 1 < ndim; i++)
        n *= shape[i];
    size_t row = ndim > 0 ? shape[ndim - 1] : 1;
    if (dtype == ATMOE_DTYPE_Q8)
        return n * ((row + ATMOE_Q8_BLOCK - 1) / ATMOE_Q8_BLOCK) *
               ATMOE_Q8_BLOCK_BYTES;
    return n * row * atmoe_dtype_size(dtype);
}

const char *atm_shape_string(int ndim, const size_t *shape, char *buf,
                             size_t size)
{
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%zu",
                                 i ? ", " : "", shape[i]);
    if (used < size)
        snprintf(buf + used, size - used, "]");
    return buf;
}

size_t atm_tensor_count(const atmoe_tensor *t)
{
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= t->shape[i];
    return n;
}

size_t atm_tensor_bytes(const atmoe_tensor *t)
{
    return atm_dtype_bytes(t->dtype, t->ndim, t->shape);
}

int atm_tensor_is_contiguous(const atmoe_tensor *t)
{
    size_t expect = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->stride[i] != expect)
            return 0;
        expect *= t->shape[i];
    }
    return 1;
}

/* Checks ndim and every dimension, and that the element count fits. */
static atmoe_status check_shape(const atmoe_context *ctx, const char *fn,
                                int ndim, const size_t *shape, size_t *count)
{
    if (ndim < 1 || ndim > ATMOE_MAX_DIMS)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: ndim is %d, must be 1 to %d", fn, ndim,
                        ATMOE_MAX_DIMS);
    size_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] == 0)
            return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: dimension %d of the shape is 0", fn, i);
        if (n > SIZE_MAX / 8 / shape[i])
            return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                            "%s: the shape's element count overflows", fn);
        n *= shape[i];
    }
    *count = n;
    return ATMOE_STATUS_OK;
}

static atmoe_tensor *tensor_alloc(atmoe_context *ctx, const char *fn)
{
    atmoe_tensor *t = atm_calloc(1, sizeof *t);
    if (t == NULL)
        atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                 "%s: out of host memory", fn);
    return t;
}

ATMOE_API atmoe_status atmoe_tensor_new(atmoe_context *ctx, atmoe_dtype dtype,
                                        int ndim, const size_t *shape,
                                        atmoe_tensor **tensor)
{
    if (tensor)
        *tensor = NULL;
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, tensor);
    ATM_CHECK_NULL(ctx, shape);
    size_t esize = atmoe_dtype_size(dtype);
    if (esize == 0 && dtype != ATMOE_DTYPE_Q8)
        return atm_fail(ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "atmoe_tensor_new: dtype %d is not an atmoe_dtype",
                        (int)dtype);
    size_t count;
    atmoe_status st = check_shape(ctx, __func__, ndim, shape, &count);
    if (st != ATMOE_STATUS_OK)
        return st;

    /* check_shape bounds count x 8; a q8 row of n elements takes
     * ceil(n / 32) x 36 bytes, up to 36 for one element, so its bound is
     * checked here. */
    if (dtype == ATMOE_DTYPE_Q8 &&
        count / shape[ndim - 1] >
            SIZE_MAX / ATMOE_Q8_BLOCK_BYTES /
                ((shape[ndim - 1] + ATMOE_Q8_BLOCK - 1) / ATMOE_Q8_BLOCK))
        return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "atmoe_tensor_new: the q8 shape's bytes overflow");
    size_t bytes = atm_dtype_bytes(dtype, ndim, shape);
    atmoe_tensor *t = tensor_alloc(ctx, __func__);
    if (t == NULL)
        return ATMOE_STATUS_HOST_OUT_OF_MEMORY;
    char what[160], sbuf[128];
    snprintf(what, sizeof what, "atmoe_tensor_new: %s %s",
             atmoe_dtype_name(dtype),
             atm_shape_string(ndim, shape, sbuf, sizeof sbuf));
    st = atm_buffer_new(ctx, bytes, &t->buffer, what);
    if (st != ATMOE_STATUS_OK) {
        atm_free(t);
        return st;
    }
    t->ctx = ctx;
    t->dtype = dtype;
    t->ndim = ndim;
    size_t stride = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        t->shape[i] = shape[i];
        t->stride[i] = stride;
        stride *= shape[i];
    }
    *tensor = t;
    return ATMOE_STATUS_OK;
}

static atmoe_tensor *view_of(const atmoe_tensor *parent, const char *fn)
{
    atmoe_tensor *v = tensor_alloc(parent->ctx, fn);
    if (v == NULL)
        return NULL;
    *v = *parent;
    clRetainMemObject(v->buffer);
    return v;
}

ATMOE_API atmoe_status atmoe_tensor_view(atmoe_tensor *parent,
                                         const size_t *start,
                                         const size_t *shape,
                                         atmoe_tensor **view)
{
    if (view)
        *view = NULL;
    ATM_CHECK_NULL(NULL, parent);
    atmoe_context *ctx = parent->ctx;
    ATM_CHECK_NULL(ctx, view);
    ATM_CHECK_NULL(ctx, start);
    ATM_CHECK_NULL(ctx, shape);
    /* A q8 tensor's rows are whole blocks, so its one view is all of it
     * (another handle, as a graph's parameter keeps). */
    if (parent->dtype == ATMOE_DTYPE_Q8)
        for (int i = 0; i < parent->ndim; i++)
            if (start[i] != 0 || shape[i] != parent->shape[i])
                return atm_fail(ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                                "atmoe_tensor_view: a q8 tensor has no views "
                                "but the whole of it (its rows are whole "
                                "blocks); copy it to f32 first");
    char pbuf[128], sbuf[128];
    size_t offset = parent->offset;
    for (int i = 0; i < parent->ndim; i++) {
        if (shape[i] == 0 || start[i] >= parent->shape[i] ||
            shape[i] > parent->shape[i] - start[i])
            return atm_fail(
                ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                "atmoe_tensor_view: a block of shape %s starting at %zu in "
                "dimension %d does not fit in the parent's shape %s",
                atm_shape_string(parent->ndim, shape, sbuf, sizeof sbuf),
                start[i], i,
                atm_shape_string(parent->ndim, parent->shape, pbuf,
                                 sizeof pbuf));
        offset += start[i] * parent->stride[i];
    }
    atmoe_tensor *v = view_of(parent, __func__);
    if (v == NULL)
        return ATMOE_STATUS_HOST_OUT_OF_MEMORY;
    memcpy(v->shape, shape, (size_t)parent->ndim * sizeof *shape);
    v->offset = offset;
    *view = v;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_tensor_reshape(atmoe_tensor *tensor, int ndim,
                                            const size_t *shape,
                                            atmoe_tensor **view)
{
    if (view)
        *view = NULL;
    ATM_CHECK_NULL(NULL, tensor);
    atmoe_context *ctx = tensor->ctx;
    ATM_CHECK_NULL(ctx, view);
    ATM_CHECK_NULL(ctx, shape);
    if (tensor->dtype == ATMOE_DTYPE_Q8)
        return atm_fail(ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "atmoe_tensor_reshape: a q8 tensor cannot be "
                        "reshaped (its rows are whole blocks)");
    size_t count;
    atmoe_status st = check_shape(ctx, __func__, ndim, shape, &count);
    if (st != ATMOE_STATUS_OK)
        return st;
    char a[128], b[128];
    if (count != atm_tensor_count(tensor))
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "atmoe_tensor_reshape: %s has %zu elements, %s has %zu",
                        atm_shape_string(tensor->ndim, tensor->shape, a,
                                         sizeof a),
                        atm_tensor_count(tensor),
                        atm_shape_string(ndim, shape, b, sizeof b), count);
    if (!atm_tensor_is_contiguous(tensor))
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_tensor_reshape: the tensor is a view that is "
                        "not contiguous; copy it first");
    atmoe_tensor *v = view_of(tensor, __func__);
    if (v == NULL)
        return ATMOE_STATUS_HOST_OUT_OF_MEMORY;
    v->ndim = ndim;
    size_t stride = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        v->shape[i] = shape[i];
        v->stride[i] = stride;
        stride *= shape[i];
    }
    for (int i = ndim; i < ATMOE_MAX_DIMS; i++)
        v->shape[i] = v->stride[i] = 0;
    *view = v;
    return ATMOE_STATUS_OK;
}

ATMOE_API void atmoe_tensor_free(atmoe_tensor *tensor)
{
    if (tensor == NULL)
        return;
    clReleaseMemObject(tensor->buffer);
    atm_free(tensor);
}

ATMOE_API atmoe_status atmoe_tensor_get_shape(const atmoe_tensor *tensor,
                                              int *ndim, size_t *shape)
{
    ATM_CHECK_NULL(NULL, tensor);
    ATM_CHECK_NULL(tensor->ctx, ndim);
    ATM_CHECK_NULL(tensor->ctx, shape);
    *ndim = tensor->ndim;
    memcpy(shape, tensor->shape, (size_t)tensor->ndim * sizeof *shape);
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_tensor_get_dtype(const atmoe_tensor *tensor,
                                              atmoe_dtype *dtype)
{
    ATM_CHECK_NULL(NULL, tensor);
    ATM_CHECK_NULL(tensor->ctx, dtype);
    *dtype = tensor->dtype;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_tensor_get_count(const atmoe_tensor *tensor,
                                              size_t *count)
{
    ATM_CHECK_NULL(NULL, tensor);
    ATM_CHECK_NULL(tensor->ctx, count);
    *count = atm_tensor_count(tensor);
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_tensor_get_bytes(const atmoe_tensor *tensor,
                                              size_t *bytes)
{
    ATM_CHECK_NULL(NULL, tensor);
    ATM_CHECK_NULL(tensor->ctx, bytes);
    *bytes = atm_tensor_bytes(tensor);
    return ATMOE_STATUS_OK;
}

/* Moves a tensor's elements between the device and dense host memory.
 * The innermost stride is always 1 (views keep it), so the elements form
 * rows, and clEnqueue{Read,Write}BufferRect moves up to a 3-D block of rows
 * in one call; a 4-D tensor is moved as a loop over its first dimension. */
static atmoe_status transfer(const atmoe_tensor *t, void *host, size_t bytes,
                             int write, const char *fn)
{
    atmoe_context *ctx = t->ctx;
    size_t es = atmoe_dtype_size(t->dtype);
    size_t want = atm_tensor_bytes(t);
    char sbuf[128];
    if (bytes != want)
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %zu bytes given, the %s tensor %s holds %zu",
                        fn, bytes, atmoe_dtype_name(t->dtype),
                        atm_shape_string(t->ndim, t->shape, sbuf, sizeof sbuf),
                        want);
    cl_int err;
    /* A q8 tensor has no views, so it is always whole, from offset 0. */
    if (t->dtype == ATMOE_DTYPE_Q8 || atm_tensor_is_contiguous(t)) {
        err = write ? clEnqueueWriteBuffer(ctx->queue, t->buffer, CL_TRUE,
                                           t->offset * es, bytes, host, 0,
                                           NULL, NULL)
                    : clEnqueueReadBuffer(ctx->queue, t->buffer, CL_TRUE,
                                          t->offset * es, bytes, host, 0, NULL,
                                          NULL);
        return err == CL_SUCCESS
                   ? ATMOE_STATUS_OK
                   : atm_fail_cl(ctx, err, write ? "clEnqueueWriteBuffer"
                                                 : "clEnqueueReadBuffer");
    }

    /* Pad to 4-D (s[0] the outer loop, s[1..3] the rectangle) after
     * dropping dimensions of size 1, which carry no pitch; the innermost
     * stays, since it is the one with stride 1. */
    size_t s[4] = {1, 1, 1, 1}, st[4] = {0, 0, 0, 1};
    int n = 4;
    for (int i = t->ndim - 1; i >= 0; i--)
        if (i == t->ndim - 1 || t->shape[i] != 1) {
            n--;
            s[n] = t->shape[i];
            st[n] = t->stride[i];
        }
    size_t region[3] = {s[3] * es, s[2], s[1]};
    size_t host_row = s[3] * es, host_slice = s[2] * s[3] * es;
    size_t buf_row = s[2] > 1 ? st[2] * es : host_row;
    size_t buf_slice = s[1] > 1 ? st[1] * es : buf_row * s[2];
    size_t zero[3] = {0, 0, 0};
    for (size_t i = 0; i < s[0]; i++) {
        size_t origin[3] = {(t->offset + i * st[0]) * es, 0, 0};
        char *h = (char *)host + i * host_slice * s[1];
        err = write ? clEnqueueWriteBufferRect(ctx->queue, t->buffer, CL_TRUE,
                                               origin, zero, region, buf_row,
                                               buf_slice, host_row, host_slice,
                                               h, 0, NULL, NULL)
                    : clEnqueueReadBufferRect(ctx->queue, t->buffer, CL_TRUE,
                                              origin, zero, region, buf_row,
                                              buf_slice, host_row, host_slice,
                                              h, 0, NULL, NULL);
        if (err != CL_SUCCESS)
            return atm_fail_cl(ctx, err, write ? "clEnqueueWriteBufferRect"
                                               : "clEnqueueReadBufferRect");
    }
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_tensor_write(atmoe_tensor *tensor,
                                          const void *src, size_t bytes)
{
    ATM_CHECK_NULL(NULL, tensor);
    ATM_CHECK_NULL(tensor->ctx, src);
    return transfer(tensor, (void *)src, bytes, 1, __func__);
}

ATMOE_API atmoe_status atmoe_tensor_read(const atmoe_tensor *tensor,
                                         void *dst, size_t bytes)
{
    ATM_CHECK_NULL(NULL, tensor);
    ATM_CHECK_NULL(tensor->ctx, dst);
    return transfer(tensor, dst, bytes, 0, __func__);
}

/* Kernel arguments that describe a tensor's elements in the 4-D padded
 * form of cl/tensor.cl. */
typedef struct layout4 {
    cl_ulong offset;
    cl_ulong4 stride;
    cl_uint4 shape;
} layout4;

static atmoe_status layout_of(const atmoe_tensor *t, layout4 *l)
{
    int pad = 4 - t->ndim;
    memset(l, 0, sizeof *l);
    l->offset = t->offset;
    for (int i = 0; i < 4; i++)
        l->shape.s[i] = 1;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] > UINT32_MAX)
            return atm_fail(t->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                            "dimension %d (%zu) is too large for the element "
                            "kernels", i, t->shape[i]);
        l->shape.s[pad + i] = (cl_uint)t->shape[i];
        l->stride.s[pad + i] = t->stride[i];
    }
    return ATMOE_STATUS_OK;
}

atmoe_status atm_launch_1d(atmoe_context *ctx, cl_kernel k, size_t count,
                           const char *name, cl_event *event)
{
    return atm_launch_1d_local(ctx, k, count, 64, name, event);
}

atmoe_status atm_launch_1d_local(atmoe_context *ctx, cl_kernel k,
                                 size_t count, size_t local, const char *name,
                                 cl_event *event)
{
    size_t global = local ? (count + local - 1) / local * local : count;
    cl_int err = clEnqueueNDRangeKernel(ctx->queue, k, 1, NULL, &global,
                                        local ? &local : NULL, 0, NULL,
                                        event);
    if (err != CL_SUCCESS) {
        char what[96];
        snprintf(what, sizeof what, "clEnqueueNDRangeKernel(%s)", name);
        return atm_fail_cl(ctx, err, what);
    }
    return ATMOE_STATUS_OK;
}

#define SET_ARG(k, i, v) clSetKernelArg((k), (i), sizeof(v), &(v))

ATMOE_API atmoe_status atmoe_tensor_fill(atmoe_tensor *tensor, double value)
{
    ATM_CHECK_NULL(NULL, tensor);
    atmoe_context *ctx = tensor->ctx;
    if (tensor->dtype == ATMOE_DTYPE_Q8)
        return atm_fail(ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "atmoe_tensor_fill: a q8 tensor is not filled; fill "
                        "an f32 one and copy it");
    if (isnan(value) && tensor->dtype == ATMOE_DTYPE_I32)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_tensor_fill: NaN cannot fill an i32 tensor");
    if (tensor->dtype == ATMOE_DTYPE_I32 &&
        !(value >= INT32_MIN && value <= INT32_MAX))
        return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "atmoe_tensor_fill: %g does not fit an i32 tensor",
                        value);
    char name[16];
    snprintf(name, sizeof name, "fill_%s", atmoe_dtype_name(tensor->dtype));
    cl_kernel k;
    layout4 l;
    atmoe_status st = layout_of(tensor, &l);
    if (st == ATMOE_STATUS_OK)
        st = atm_kernel_get(ctx, "tensor", "", name, &k);
    if (st != ATMOE_STATUS_OK)
        return st;
    cl_ulong count = atm_tensor_count(tensor);
    cl_int err = SET_ARG(k, 0, tensor->buffer);
    err |= SET_ARG(k, 1, l.offset);
    err |= SET_ARG(k, 2, l.stride);
    err |= SET_ARG(k, 3, l.shape);
    err |= SET_ARG(k, 4, count);
    if (tensor->dtype == ATMOE_DTYPE_I32) {
        cl_int v = (cl_int)value;
        err |= SET_ARG(k, 5, v);
    } else {
        cl_float v = (cl_float)value;
        err |= SET_ARG(k, 5, v);
    }
    if (err != CL_SUCCESS)
        return atm_fail(ctx, ATMOE_STATUS_OPENCL_ERROR,
                        "clSetKernelArg(%s) failed", name);
    return atm_launch_1d(ctx, k, count, name, NULL);
}

ATMOE_API atmoe_status atmoe_tensor_copy(atmoe_tensor *dst,
                                         const atmoe_tensor *src)
{
    ATM_CHECK_NULL(NULL, dst);
    atmoe_context *ctx = dst->ctx;
    ATM_CHECK_NULL(ctx, src);
    if (src->ctx != ctx)
        return atm_fail(ctx, ATMOE_STATUS_WRONG_CONTEXT,
                        "atmoe_tensor_copy: src and dst belong to different "
                        "contexts");
    char a[128], b[128];
    if (src->ndim != dst->ndim ||
        memcmp(src->shape, dst->shape, (size_t)src->ndim * sizeof(size_t)))
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "atmoe_tensor_copy: dst shape %s, src shape %s",
                        atm_shape_string(dst->ndim, dst->shape, a, sizeof a),
                        atm_shape_string(src->ndim, src->shape, b, sizeof b));
    if ((src->dtype == ATMOE_DTYPE_I32) != (dst->dtype == ATMOE_DTYPE_I32) ||
        (src->dtype == ATMOE_DTYPE_Q8 && dst->dtype == ATMOE_DTYPE_Q8))
        return atm_fail(ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "atmoe_tensor_copy: cannot convert %s to %s",
                        atmoe_dtype_name(src->dtype),
                        atmoe_dtype_name(dst->dtype));
    return atm_tensor_copy(dst, src, NULL);
}

atmoe_status atm_copy_kernel(atmoe_context *ctx, atmoe_dtype dst,
                             atmoe_dtype src, cl_kernel *k)
{
    char name[32];
    snprintf(name, sizeof name, "copy_%s_%s", atmoe_dtype_name(dst),
             atmoe_dtype_name(src));
    return atm_kernel_get(ctx, "tensor", "", name, k);
}

atmoe_status atm_tensor_copy(const atmoe_tensor *dst, const atmoe_tensor *src,
                             cl_event *event)
{
    cl_kernel k;
    atmoe_status st = atm_copy_kernel(dst->ctx, dst->dtype, src->dtype, &k);
    return st != ATMOE_STATUS_OK ? st
                                 : atm_tensor_copy_with(k, dst, src, event);
}

atmoe_status atm_tensor_copy_with(cl_kernel k, const atmoe_tensor *dst,
                                  const atmoe_tensor *src, cl_event *event)
{
    atmoe_context *ctx = dst->ctx;
    layout4 ld, ls;
    atmoe_status st = layout_of(dst, &ld);
    if (st == ATMOE_STATUS_OK)
        st = layout_of(src, &ls);
    if (st != ATMOE_STATUS_OK)
        return st;
    /* Quantising runs one work-item per block of q8 dst (the block's
     * scale needs all of it); every other copy one per element. */
    cl_ulong count = atm_tensor_count(dst);
    if (dst->dtype == ATMOE_DTYPE_Q8) {
        size_t row = dst->shape[dst->ndim - 1];
        count = count / row *
                ((row + ATMOE_Q8_BLOCK - 1) / ATMOE_Q8_BLOCK);
    }
    cl_int err = SET_ARG(k, 0, dst->buffer);
    err |= SET_ARG(k, 1, ld.offset);
    err |= SET_ARG(k, 2, ld.stride);
    err |= SET_ARG(k, 3, src->buffer);
    err |= SET_ARG(k, 4, ls.offset);
    err |= SET_ARG(k, 5, ls.stride);
    err |= SET_ARG(k, 6, ld.shape);
    err |= SET_ARG(k, 7, count);
    if (err != CL_SUCCESS)
        return atm_fail(ctx, ATMOE_STATUS_OPENCL_ERROR,
                        "clSetKernelArg(copy %s to %s) failed",
                        atmoe_dtype_name(src->dtype),
                        atmoe_dtype_name(dst->dtype));
    return atm_launch_1d(ctx, k, count, "copy", event);
}

atmoe_status atm_tensor_broadcast_rows(cl_kernel k, const atmoe_tensor *dst,
                                       const atmoe_tensor *row,
                                       cl_event *event)
{
    atmoe_tensor rows = *row;
    rows.ndim = 2;
    rows.shape[0] = dst->shape[0];
    rows.shape[1] = dst->shape[1];
    rows.stride[0] = 0;
    rows.stride[1] = 1;
    return atm_tensor_copy_with(k, dst, &rows, event);
}
