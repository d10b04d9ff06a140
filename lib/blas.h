/* CLBlast status codes in our status list. */
#ifndef ATMOE_BLAS_H
#define ATMOE_BLAS_H

#include <clblast_c.h>

#include "error.h"

/* OpenCL errors that CLBlast passes through keep their OpenCL names and map
 * to the out-of-memory statuses like any other OpenCL call. */
atmoe_status atm_fail_blas(const atmoe_context *ctx, CLBlastStatusCode code,
                           const char *what);

#endif
