#include <config.h>

#include <pthread.h>

#include "device/blas.h"
#include "device/context.h"

atmoe_status atm_fail_blas(const atmoe_context *ctx, CLBlastStatusCode code,
                           const char *what)
{
    /* CLBlast's own codes start at -1024; above that they are OpenCL's. */
    if (code > -1000)
        return atm_fail_cl(ctx, (cl_int)code, what);
    return atm_fail(ctx, ATMOE_STATUS_BLAS_ERROR,
                    "%s failed: CLBlast status %d", what, (int)code);
}

/* CLBlast's first use of a routine in a process builds and caches its
 * kernels, and two threads doing that at once for different contexts have
 * been seen to fail (status -2039) or crash on PoCL.  Calls only enqueue
 * work, so one lock over them costs little. */
static pthread_mutex_t blas_lock = PTHREAD_MUTEX_INITIALIZER;

static CLBlastTranspose transpose(int t)
{
    return t ? CLBlastTransposeYes : CLBlastTransposeNo;
}

/* The scratch CLBlast needs for p; the caller holds blas_lock. */
static CLBlastStatusCode temp_size(atmoe_context *ctx, const atm_gemm *p,
                                   size_t *need)
{
    *need = 0;
    return CLBlastSGemmTempBufferSize(
        CLBlastLayoutRowMajor, transpose(p->trans_a), transpose(p->trans_b),
        p->m, p->n, p->k, p->a_offset, p->a_ld, p->b_offset, p->b_ld,
        p->c_offset, p->c_ld, &ctx->queue, need);
}

atmoe_status atm_sgemm(atmoe_context *ctx, const atm_gemm *p, cl_mem temp,
                       size_t temp_bytes, cl_event *event)
{
    const CLBlastTranspose ta = transpose(p->trans_a);
    const CLBlastTranspose tb = transpose(p->trans_b);
    size_t need;
    pthread_mutex_lock(&blas_lock);
    CLBlastStatusCode bs = temp_size(ctx, p, &need);
    if (bs == CLBlastSuccess && need > 0 && temp && need <= temp_bytes)
        bs = CLBlastSgemmWithTempBuffer(
            CLBlastLayoutRowMajor, ta, tb, p->m, p->n, p->k, p->alpha, p->a,
            p->a_offset, p->a_ld, p->b, p->b_offset, p->b_ld, p->beta, p->c,
            p->c_offset, p->c_ld, &ctx->queue, event, temp);
    else if (bs == CLBlastSuccess) /* CLBlast makes its own scratch */
        bs = CLBlastSgemm(CLBlastLayoutRowMajor, ta, tb, p->m, p->n, p->k,
                          p->alpha, p->a, p->a_offset, p->a_ld, p->b,
                          p->b_offset, p->b_ld, p->beta, p->c, p->c_offset,
                          p->c_ld, &ctx->queue, event);
    pthread_mutex_unlock(&blas_lock);
    return bs == CLBlastSuccess ? ATMOE_STATUS_OK
                                : atm_fail_blas(ctx, bs, "CLBlastSgemm");
}

atmoe_status atm_blas_override(atmoe_context *ctx, const char *kernel,
                               size_t count, const char **names,
                               const size_t *values)
{
    pthread_mutex_lock(&blas_lock);
    CLBlastStatusCode bs = CLBlastOverrideParameters(
        ctx->device->id, kernel, CLBlastPrecisionSingle, count, names, values);
    pthread_mutex_unlock(&blas_lock);
    if (bs == CLBlastMissingOverrideParameter)
        return atm_fail(ctx, ATMOE_STATUS_BLAS_ERROR, "CLBlast wants more "
                        "parameters for %s than the set has", kernel);
    return bs == CLBlastSuccess ? ATMOE_STATUS_OK
                                : atm_fail_blas(ctx, bs,
                                                "CLBlastOverrideParameters");
}

atmoe_status atm_sgemm_scratch(atmoe_context *ctx, const atm_gemm *p,
                               size_t *bytes)
{
    pthread_mutex_lock(&blas_lock);
    CLBlastStatusCode bs = temp_size(ctx, p, bytes);
    pthread_mutex_unlock(&blas_lock);
    return bs == CLBlastSuccess
               ? ATMOE_STATUS_OK
               : atm_fail_blas(ctx, bs, "CLBlastSGemmTempBufferSize");
}
