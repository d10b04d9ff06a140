/* Tensors: a retained OpenCL buffer, an element offset into it, a shape and
 * row-major strides (in elements).  A view shares its parent's buffer. */
#ifndef ATMOE_TENSOR_H
#define ATMOE_TENSOR_H

#include "context.h"

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
int atm_tensor_is_contiguous(const atmoe_tensor *t);
/* "[37, 53]" into buf, for messages. */
const char *atm_shape_string(int ndim, const size_t *shape, char *buf,
                             size_t size);

#endif
