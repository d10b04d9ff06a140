/* Temporary: the parameter resolver over today's tuning lookups, until
 * lib/device/tuning.h has atm_param_get. */
#ifndef ATMOE_PARAMS_COMPAT_H
#define ATMOE_PARAMS_COMPAT_H

#include <limits.h>

#include "device/tuning.h"

typedef enum atm_param {
    ATM_PARAM_LINEAR_SR,
    ATM_PARAM_LINEAR_ST,
    ATM_PARAM_LINEAR_MAX_TOKENS,
} atm_param;

static inline long atm_param_get(const atmoe_context *ctx, atm_param p)
{
    long v;
    switch (p) {
    case ATM_PARAM_LINEAR_SR:
    case ATM_PARAM_LINEAR_ST:
        v = atm_tuning_kernel_value(ctx, "linear",
                                    p == ATM_PARAM_LINEAR_SR ? "SR" : "ST", 8);
        return v >= 1 && v <= 256 ? v : 8;
    case ATM_PARAM_LINEAR_MAX_TOKENS:
        if (ctx->linear_max_tokens)
            return (long)ctx->linear_max_tokens;
        v = atm_tuning_kernel_value(ctx, "linear", "MAX_TOKENS", 0);
        if (v > 0)
            return v;
        return ctx->device->info.type == ATMOE_DEVICE_TYPE_CPU ? LONG_MAX
                                                               : 16;
    }
    return 0;
}

#endif
