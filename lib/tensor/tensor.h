/* Tensors: a retained OpenCL buffer, an element offset into it, a shape and
 * row-major strides (in elements).  A view shares its parent's buffer. */
#ifndef ATMOE_TENSOR_H
#define ATMOE_TENSOR_H

#include "device/context.h"

struct atmoe_tensor {
    atmoe_context *ctx;
    cl_mem buffer;
    atmoe_dtype dtype;
    int ndim;
    size_t shape[ATMOE_MAX_DIMS];
    size_t stride[ATMOE_MAX_DIMS];
    size_t offset;
};

size_t atm_tensor_count(const atmoe_tensor *t);
/* The bytes of a dense tensor of this dtype and shape: count x dtype size,
 * or for q8 the rows' whole blocks (atmoe.h, "8-bit blocks"); 0 for a
 * dtype outside the enum. */
size_t atm_dtype_bytes(atmoe_dtype dtype, int ndim, const size_t *shape);
size_t atm_tensor_bytes(const atmoe_tensor *t);
int atm_tensor_is_contiguous(const atmoe_tensor *t);
/* "[37, 53]" into buf, for messages. */
const char *atm_shape_string(int ndim, const size_t *shape, char *buf,
                             size_t size);

/* dst = src for checked operands of the same shape (see atmoe_tensor_copy);
 * event (may be NULL) receives the kernel's event. */
atmoe_status atm_tensor_copy(const atmoe_tensor *dst, const atmoe_tensor *src,
                             cl_event *event);

/* The kernel that copies src-dtype elements to dst-dtype ones, built at
 * planning; atm_tensor_copy_with runs it without a lookup. */
atmoe_status atm_copy_kernel(atmoe_context *ctx, atmoe_dtype dst,
                             atmoe_dtype src, cl_kernel *k);
atmoe_status atm_tensor_copy_with(cl_kernel k, const atmoe_tensor *dst,
                                  const atmoe_tensor *src, cl_event *event);

/* Every row of the 2-D dst = the 1-D row (a bias before a GEMM that
 * accumulates with beta = 1): a copy whose source row stride is 0, with
 * the f32 copy kernel k. */
atmoe_status atm_tensor_broadcast_rows(cl_kernel k, const atmoe_tensor *dst,
                                       const atmoe_tensor *row,
                                       cl_event *event);

/* Enqueues a 1-D kernel over count work-items (rounded up to whole groups;
 * kernels check their bound). */
atmoe_status atm_launch_1d(atmoe_context *ctx, cl_kernel k, size_t count,
                           const char *name, cl_event *event);
/* The same with work-groups of `local` work-items; 0 lets the driver
 * choose (count is then the global size as it is). */
atmoe_status atm_launch_1d_local(atmoe_context *ctx, cl_kernel k,
                                 size_t count, size_t local, const char *name,
                                 cl_event *event);

#endif
