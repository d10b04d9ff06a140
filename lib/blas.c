#include <config.h>

#include "blas.h"

atmoe_status atm_fail_blas(const atmoe_context *ctx, CLBlastStatusCode code,
                           const char *what)
{
    /* CLBlast's own codes start at -1024; above that they are OpenCL's. */
    if (code > -1000)
        return atm_fail_cl(ctx, (cl_int)code, what);
    return atm_fail(ctx, ATMOE_STATUS_BLAS_ERROR,
                    "%s failed: CLBlast status %d", what, (int)code);
}
