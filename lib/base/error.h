/* Status reporting inside the library: every failure goes through atm_fail()
 * so that the returned status and the message from atmoe_errmsg() agree. */
#ifndef ATMOE_ERROR_H
#define ATMOE_ERROR_H

#include <CL/cl.h>

#include "atmoe.h"

#define ATM_ERRMSG_SIZE 8192

/* What every name function (atmoe_status_name, atmoe_strerror,
 * atmoe_dtype_name, ...) returns for a value outside its enum: one answer,
 * never NULL, never a real name. */
#define ATM_UNKNOWN_NAME "unknown"

#if defined(__GNUC__)
#define ATM_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define ATM_PRINTF(f, a)
#endif

/* Records the message for ctx (or for this thread when ctx is NULL), logs it
 * at debug level, and returns status so callers can write
 * `return atm_fail(ctx, ATMOE_STATUS_..., "...")`. */
atmoe_status atm_fail(const atmoe_context *ctx, atmoe_status status,
                      const char *fmt, ...) ATM_PRINTF(3, 4);

/* For a failed OpenCL call: maps allocation failures to the out-of-memory
 * statuses, everything else to ATMOE_STATUS_OPENCL_ERROR, and names the error
 * ("clCreateBuffer failed: CL_MEM_OBJECT_ALLOCATION_FAILURE (-4)"). */
atmoe_status atm_fail_cl(const atmoe_context *ctx, cl_int err,
                         const char *what);

/* "CL_OUT_OF_RESOURCES"; "unknown OpenCL error" for codes outside the list. */
const char *atm_cl_error_name(cl_int err);

/* The buffer that atmoe_errmsg(ctx) returns; each context owns one. */
char *atm_context_errbuf(const atmoe_context *ctx);

#define ATM_CHECK_NULL(ctx, ptr)                                              \
    do {                                                                      \
        if ((ptr) == NULL)                                                    \
            return atm_fail((ctx), ATMOE_STATUS_NULL_POINTER,                 \
                            "%s: argument '%s' is NULL", __func__, #ptr);     \
    } while (0)

#endif
