#include <config.h>

#include <stdarg.h>
#include <stdio.h>

#include "base/alloc.h"
#include "device/context.h"
#include "base/log.h"
#include "device/program.h"
#include "device/tuning.h"

/* The sink a call on ctx reports to: the context's own, or the thread's
 * for a call that has no context.  A context's message is the one mutable
 * part of it that const-taking getters may still set when they fail. */
static atm_errsink *sink_of(const atmoe_context *ctx)
{
    return ctx ? (atm_errsink *)&ctx->errors : atm_errsink_thread();
}

ATMOE_API const char *atmoe_errmsg(const atmoe_context *ctx)
{
    return sink_of(ctx)->text;
}

atmoe_status atm_fail(const atmoe_context *ctx, atmoe_status status,
                      const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    atm_errsink_vfail(sink_of(ctx), status, fmt, ap);
    va_end(ap);
    return status;
}

atmoe_status atm_fail_cl(const atmoe_context *ctx, cl_int err,
                         const char *what)
{
    return atm_fail(ctx, atm_cl_status(err), "%s failed: %s (%d)", what,
                    atm_cl_error_name(err), (int)err);
}

ATMOE_API const char *atmoe_version(void)
{
    return PACKAGE_VERSION;
}

ATMOE_API atmoe_status atmoe_context_new(const char *device,
                                         atmoe_context **out)
{
    ATM_CHECK_NULL(NULL, out);
    *out = NULL;

    size_t index;
    atmoe_status st = atmoe_device_find(device ? device : "default", &index);
    if (st != ATMOE_STATUS_OK)
        return st;
    const atm_device *dev = NULL;
    st = atm_device_lookup(index, &dev);
    if (st != ATMOE_STATUS_OK)
        return st;

    atmoe_context *ctx = atm_calloc(1, sizeof *ctx);
    if (ctx == NULL)
        return atm_fail(NULL, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "atmoe_context_new: out of host memory");
    ctx->device = dev;

    cl_int err;
    cl_context_properties props[] = {
        CL_CONTEXT_PLATFORM, (cl_context_properties)dev->platform, 0};
    ctx->cl = clCreateContext(props, 1, &dev->id, NULL, NULL, &err);
    if (err != CL_SUCCESS) {
        st = atm_fail_cl(NULL, err, "clCreateContext");
        goto fail;
    }
    /* clCreateCommandQueue is deprecated in OpenCL 2.0 but is the call
     * every 1.2 driver has, which is what this library targets. */
    ctx->queue = clCreateCommandQueue(ctx->cl, dev->id,
                                      CL_QUEUE_PROFILING_ENABLE, &err);
    if (err != CL_SUCCESS) {
        st = atm_fail_cl(NULL, err, "clCreateCommandQueue");
        goto fail;
    }
    cl_uint align_bits = 0;
    clGetDeviceInfo(dev->id, CL_DEVICE_MEM_BASE_ADDR_ALIGN, sizeof align_bits,
                    &align_bits, NULL);
    ctx->base_align = align_bits >= 8 ? align_bits / 8 : 1;

    atm_programs_init(ctx);
    atm_cache_init(ctx);
    atm_tuning_init(ctx);
    atm_log(ATMOE_LOG_INFO, "context on device %zu: %s (%s)", index,
            dev->info.name, dev->info.platform_name);
    *out = ctx;
    return ATMOE_STATUS_OK;

fail:
    atmoe_context_free(ctx);
    return st;
}

ATMOE_API void atmoe_context_free(atmoe_context *ctx)
{
    if (ctx == NULL)
        return;
    if (ctx->queue)
        clFinish(ctx->queue);
    atm_programs_release(ctx);
    atm_tuning_release(ctx);
    if (ctx->queue)
        clReleaseCommandQueue(ctx->queue);
    if (ctx->cl)
        clReleaseContext(ctx->cl);
    atm_free(ctx);
}

ATMOE_API atmoe_status atmoe_context_get_device(const atmoe_context *ctx,
                                                atmoe_device_info *info)
{
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, info);
    *info = ctx->device->info;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_context_finish(atmoe_context *ctx)
{
    ATM_CHECK_NULL(NULL, ctx);
    cl_int err = clFinish(ctx->queue);
    if (err != CL_SUCCESS)
        return atm_fail_cl(ctx, err, "clFinish");
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_context_get_cache_stats(const atmoe_context *ctx,
                                                     atmoe_cache_stats *stats)
{
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, stats);
    *stats = ctx->cache;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_context_get_memory_stats(
    const atmoe_context *ctx, atmoe_memory_stats *stats)
{
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, stats);
    *stats = ctx->memory;
    return ATMOE_STATUS_OK;
}

atmoe_status atm_buffer_new(atmoe_context *ctx, size_t bytes, cl_mem *buffer,
                            const char *what)
{
    const atmoe_device_info *dev = &ctx->device->info;
    if (bytes > dev->max_alloc_bytes)
        return atm_fail(ctx, ATMOE_STATUS_DEVICE_OUT_OF_MEMORY,
                        "%s: %zu bytes is more than one allocation on %s may "
                        "hold (%llu bytes)", what, bytes, dev->name,
                        (unsigned long long)dev->max_alloc_bytes);
    cl_int err;
    *buffer = clCreateBuffer(ctx->cl, CL_MEM_READ_WRITE, bytes, NULL, &err);
    if (err != CL_SUCCESS) {
        *buffer = NULL;
        atmoe_status st = atm_fail_cl(ctx, err, "clCreateBuffer");
        char detail[256];
        snprintf(detail, sizeof detail, "%s", atmoe_errmsg(ctx));
        return atm_fail(ctx, st, "%s: %zu bytes: %s", what, bytes, detail);
    }
    ctx->memory.allocations++;
    ctx->memory.allocated_bytes += bytes;
    return ATMOE_STATUS_OK;
}
