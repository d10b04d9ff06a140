/* CLBlast status codes in our status list. */
#ifndef ATMOE_BLAS_H
#define ATMOE_BLAS_H

#include <clblast_c.h>

#include "base/error.h"

/* OpenCL errors that CLBlast passes through keep their OpenCL names and map
 * to the out-of-memory statuses like any other OpenCL call. */
atmoe_status atm_fail_blas(const atmoe_context *ctx, CLBlastStatusCode code,
                           const char *what);

/* One row-major SGEMM: C = alpha op(A) op(B) + beta C (offsets and leading
 * dimensions in elements). */
typedef struct atm_gemm {
    int trans_a, trans_b;
    size_t m, n, k;
    float alpha, beta;
    cl_mem a, b, c;
    size_t a_offset, a_ld, b_offset, b_ld, c_offset, c_ld;
} atm_gemm;

/* Runs p through CLBlast, in temp when it holds the scratch CLBlast needs
 * (else CLBlast allocates its own).  Serialised over the process. */
atmoe_status atm_sgemm(atmoe_context *ctx, const atm_gemm *p, cl_mem temp,
                       size_t temp_bytes, cl_event *event);

/* The scratch bytes CLBlast needs to run p (0 when it needs none), asked
 * of CLBlastSGemmTempBufferSize: what a plan allocates once so that
 * computing allocates nothing. */
atmoe_status atm_sgemm_scratch(atmoe_context *ctx, const atm_gemm *p,
                               size_t *bytes);

/* Overrides CLBlast's single-precision parameters of kernel on ctx's
 * device, for the whole process (CLBlastOverrideParameters), under the lock
 * that serialises every CLBlast call. */
atmoe_status atm_blas_override(atmoe_context *ctx, const char *kernel,
                               size_t count, const char **names,
                               const size_t *values);

#endif
