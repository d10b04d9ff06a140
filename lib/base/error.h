/* Status reporting inside the library: every failure goes through atm_fail()
 * so that the returned status and the message from atmoe_errmsg() agree. */
#ifndef ATMOE_ERROR_H
#define ATMOE_ERROR_H

#include <stdarg.h>

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

/* Where the message of a failed call goes: each context embeds one, and
 * each thread has one for the calls it makes without a context.  A call
 * writes to one sink, and only when it fails: a success leaves the sink as
 * it found it. */
typedef struct atm_errsink {
    char text[ATM_ERRMSG_SIZE];
} atm_errsink;

/* The calling thread's sink. */
atm_errsink *atm_errsink_thread(void);

/* Records the message in sink, logs it at debug level, and returns status
 * so callers can write `return atm_errsink_fail(sink, ...)`. */
atmoe_status atm_errsink_fail(atm_errsink *sink, atmoe_status status,
                              const char *fmt, ...) ATM_PRINTF(3, 4);
atmoe_status atm_errsink_vfail(atm_errsink *sink, atmoe_status status,
                               const char *fmt, va_list ap) ATM_PRINTF(3, 0);

/* The status of a failed OpenCL call: allocation failures map to the
 * out-of-memory statuses, everything else to ATMOE_STATUS_OPENCL_ERROR. */
atmoe_status atm_cl_status(cl_int err);

/* "CL_OUT_OF_RESOURCES"; "unknown OpenCL error" for codes outside the list. */
const char *atm_cl_error_name(cl_int err);

/* The reporting of every layer above this one, on a context's sink (or
 * the thread's when ctx is NULL).  Defined in device/context.c, the one
 * place that knows where a context keeps its sink; code in base/ reports
 * through atm_errsink_fail. */
atmoe_status atm_fail(const atmoe_context *ctx, atmoe_status status,
                      const char *fmt, ...) ATM_PRINTF(3, 4);

/* For a failed OpenCL call: atm_cl_status's status, and a message naming
 * the error ("clCreateBuffer failed: CL_MEM_OBJECT_ALLOCATION_FAILURE
 * (-4)").  Defined in device/context.c beside atm_fail. */
atmoe_status atm_fail_cl(const atmoe_context *ctx, cl_int err,
                         const char *what);

#define ATM_CHECK_NULL(ctx, ptr)                                              \
    do {                                                                      \
        if ((ptr) == NULL)                                                    \
            return atm_fail((ctx), ATMOE_STATUS_NULL_POINTER,                 \
                            "%s: argument '%s' is NULL", __func__, #ptr);     \
    } while (0)

#endif
