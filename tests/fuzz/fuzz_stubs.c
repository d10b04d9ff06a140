/* What the fuzz targets need of the library besides the code they test:
 * atm_fail formats its message as the library's does (so bad format
 * arguments still show up) without the context and logging machinery. */
#include <config.h>

#include <stdarg.h>
#include <stdio.h>

#include "base/error.h"

atmoe_status atm_fail(const atmoe_context *ctx, atmoe_status status,
                      const char *fmt, ...)
{
    static char buf[ATM_ERRMSG_SIZE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return status;
}
