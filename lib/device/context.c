#include <config.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/alloc.h"
#include "device/context.h"
#include "base/log.h"
#include "device/program.h"
#include "device/tuning.h"

char *atm_context_errbuf(const atmoe_context *ctx)
{
    /* The message is the one mutable part of a context that const-taking
     * getters may still set when they fail. */
    return (char *)ctx->errmsg;
}

ATMOE_API const char *atmoe_version(void)
{
    return PACKAGE_VERSION;
}

/* ATMOE_LINEAR_MAX_TOKENS, read once: mixtures of up to this many tokens
 * run cl/linear.cl instead of CLBlast (lib/mixture.c says why), whatever
 * the device and its tuning; 0 when unset. */
static size_t linear_max_tokens(void)
{
    const char *env = getenv("ATMOE_LINEAR_MAX_TOKENS");
    if (env == NULL || *env == '\0')
        return 0;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(env, &end, 10);
    if (*end == '\0' && errno == 0 && env[0] != '-' && v > 0)
        return v > SIZE_MAX ? SIZE_MAX : (size_t)v;
    atm_log(ATMOE_LOG_WARNING, "ATMOE_LINEAR_MAX_TOKENS=%s is not a token "
            "count of at least 1; ignored", env);
    return 0;
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

    atm_cache_init(ctx);
    /* Read once, so that every program of the context comes from the same
     * place whatever the environment does later. */
    const char *kdir = getenv("ATMOE_KERNEL_DIR");
    if (kdir && *kdir) {
        snprintf(ctx->kernel_dir, sizeof ctx->kernel_dir, "%s", kdir);
        struct stat sb;
        if (stat(kdir, &sb) != 0 || !S_ISDIR(sb.st_mode))
            atm_log(ATMOE_LOG_WARNING, "ATMOE_KERNEL_DIR=%s is not a "
                    "directory; using the embedded kernels", kdir);
    }
    ctx->linear_max_tokens = linear_max_tokens();
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
