/* What the manifest parser links against but never calls while it only
 * parses: the adapters and files a manifest opens are opened by
 * atmoe_manifest_check, which the fuzz target does not run.  A call here
 * is a bug, so it traps. */
#include <config.h>

#include "atmoe.h"

const char *atmoe_errmsg(const atmoe_context *ctx)
{
    __builtin_trap();
}

void atmoe_adapter_free(atmoe_adapter *adapter)
{
    if (adapter)
        __builtin_trap();
}

void atmoe_safetensors_free(atmoe_safetensors *file)
{
    if (file)
        __builtin_trap();
}

atmoe_status atmoe_adapter_get_target(const atmoe_adapter *adapter,
                                      size_t index,
                                      atmoe_adapter_target *target)
{
    __builtin_trap();
}
