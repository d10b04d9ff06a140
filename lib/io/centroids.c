/* Centroid files: a safetensors file with the tensor "centroids" [K, D]
 * and the clustering's objective in its metadata, written and read through
 * the library's own safetensors writer and reader. */
#include <config.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "base/alloc.h"
#include "tensor/tensor.h"

#define TENSOR "centroids"
#define OBJECTIVE "objective"

ATMOE_API atmoe_status atmoe_centroids_save(const atmoe_tensor *centroids,
                                            double objective,
                                            const char *path)
{
    static const char fn[] = "atmoe_centroids_save";
    ATM_CHECK_NULL(NULL, centroids);
    atmoe_context *ctx = centroids->ctx;
    ATM_CHECK_NULL(ctx, path);
    char buf[96];
    if (centroids->dtype != ATMOE_DTYPE_F32 || centroids->ndim != 2)
        return atm_fail(ctx, centroids->dtype != ATMOE_DTYPE_F32
                                 ? ATMOE_STATUS_DTYPE_MISMATCH
                                 : ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: centroids are %s %s, must be f32 [K, D]", fn,
                        atmoe_dtype_name(centroids->dtype),
                        atm_shape_string(centroids->ndim, centroids->shape,
                                         buf, sizeof buf));
    size_t count = atm_tensor_count(centroids);
    float *host = atm_malloc(count * sizeof *host);
    if (host == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: no host memory for %zu centroid values", fn,
                        count);
    atmoe_safetensors_writer *w = NULL;
    atmoe_status st = atmoe_tensor_read(centroids, host, count * 4);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_new(ctx, &w);
    uint64_t shape[2] = {centroids->shape[0], centroids->shape[1]};
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_add_f32(w, TENSOR, ATMOE_SAFETENSORS_F32,
                                              2, shape, host);
    if (st == ATMOE_STATUS_OK && !isnan(objective)) {
        /* %.17g: the double reads back to the same bits. */
        char text[40];
        snprintf(text, sizeof text, "%.17g", objective);
        st = atmoe_safetensors_writer_set_metadata(w, OBJECTIVE, text);
    }
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_save(w, path);
    atmoe_safetensors_writer_free(w);
    atm_free(host);
    return st;
}

ATMOE_API atmoe_status atmoe_centroids_load(atmoe_context *ctx,
                                            const char *path,
                                            atmoe_tensor **centroids,
                                            double *objective)
{
    static const char fn[] = "atmoe_centroids_load";
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, path);
    ATM_CHECK_NULL(ctx, centroids);
    *centroids = NULL;
    atmoe_safetensors *file;
    atmoe_status st = atmoe_safetensors_open(ctx, path, &file);
    if (st != ATMOE_STATUS_OK)
        return st;
    atmoe_safetensors_tensor t = {0};
    double obj = NAN;
    const char *text;
    st = atmoe_safetensors_find(file, TENSOR, &t);
    if (st == ATMOE_STATUS_OK && (t.ndim != 2 || t.count == 0))
        st = atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                      "%s: %s: tensor \"" TENSOR "\" must be [K, D] with K "
                      "and D at least 1", fn, path);
    if (st == ATMOE_STATUS_OK &&
        atmoe_safetensors_get_metadata(file, OBJECTIVE, &text) ==
            ATMOE_STATUS_OK) {
        char *end;
        errno = 0;
        obj = strtod(text, &end);
        if (end == text || *end != '\0' || errno == ERANGE)
            st = atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                          "%s: %s: metadata \"" OBJECTIVE "\" is \"%s\", "
                          "not a number", fn, path, text);
    }
    float *host = NULL;
    if (st == ATMOE_STATUS_OK) {
        host = atm_malloc(t.count * sizeof *host);
        if (host == NULL)
            st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                          "%s: no host memory for %llu centroid values", fn,
                          (unsigned long long)t.count);
    }
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_read_f32(file, TENSOR, host, t.count);
    atmoe_tensor *c = NULL;
    size_t shape[2] = {(size_t)t.shape[0], (size_t)t.shape[1]};
    if (st == ATMOE_STATUS_OK)
        st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, &c);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_tensor_write(c, host, t.count * sizeof *host);
    atm_free(host);
    atmoe_safetensors_free(file);
    if (st != ATMOE_STATUS_OK) {
        atmoe_tensor_free(c);
        return st;
    }
    *centroids = c;
    if (objective)
        *objective = obj;
    return ATMOE_STATUS_OK;
}
