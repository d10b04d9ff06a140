/* What the file-reading fuzz targets need of the library besides the code
 * they test: atm_fail keeps its message for the target to check (as the
 * library's does, so bad format arguments still show up), the log goes
 * nowhere, and CLBlast is never reached (a call traps). */
#include <config.h>

#include <stdarg.h>
#include <stdio.h>

#include "atmoe.h"
#include "base/error.h"
#include "fuzz_util.h"

static char message[ATM_ERRMSG_SIZE];

atmoe_status atm_fail(const atmoe_context *ctx, atmoe_status status,
                      const char *fmt, ...)
{
    (void)ctx;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    return status;
}

const char *fuzz_message(void)
{
    return message;
}

const char *atmoe_errmsg(const atmoe_context *ctx)
{
    (void)ctx;
    return message;
}

void atm_log(atmoe_log_level level, const char *fmt, ...)
{
    (void)level;
    char buf[ATM_ERRMSG_SIZE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
}

#ifdef FUZZ_TUNING
#include "device/blas.h"

atmoe_status atm_blas_override(atmoe_context *ctx, const char *kernel,
                               size_t count, const char **names,
                               const size_t *values)
{
    (void)ctx, (void)kernel, (void)count, (void)names, (void)values;
    __builtin_trap();
}

/* The device list is never read: no device is opened. */
atmoe_status atm_fail_cl(const atmoe_context *ctx, cl_int err,
                         const char *what)
{
    (void)ctx, (void)err, (void)what;
    __builtin_trap();
}
#endif

#ifdef FUZZ_ADAPTER
/* Adapters are only opened and read: nothing becomes an expert. */
atmoe_status atmoe_experts_add(atmoe_experts *set, int group, size_t rank,
                               const float *a, const float *b, float alpha,
                               unsigned flags, int *index)
{
    (void)set, (void)group, (void)rank, (void)a, (void)b, (void)alpha,
        (void)flags, (void)index;
    __builtin_trap();
}
#endif
