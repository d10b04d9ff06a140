#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/env.h"
#include "base/file.h"
#include "base/log.h"
#include "device/program.h"

void atm_programs_init(atmoe_context *ctx)
{
    /* Read once, so that every program of the context comes from the same
     * place whatever the environment does later. */
    const char *dir = atm_env_get(ATM_ENV_KERNEL_DIR);
    if (dir == NULL || *dir == '\0')
        return;
    snprintf(ctx->programs.kernel_dir, sizeof ctx->programs.kernel_dir, "%s",
             dir);
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        atm_log(ATMOE_LOG_WARNING, "ATMOE_KERNEL_DIR=%s is not a directory; "
                "using the embedded kernels", dir);
}

static atmoe_status read_override(atmoe_context *ctx, const char *path,
                                  char **text, size_t *size)
{
    /* The regular-file open: a FIFO there would block, and a directory
     * would read as a file of absurd size. */
    size_t len = 0;
    int fd = atm_file_open_fd(path, &len);
    if (fd < 0)
        return errno == ENOENT ? ATMOE_STATUS_NOT_SUPPORTED
                               : atm_fail(ctx, ATMOE_STATUS_IO_ERROR,
                                          "cannot open kernel source %s: %s",
                                          path, atm_file_strerror(errno));
    atmoe_status st = ATMOE_STATUS_OK;
    char *buf = atm_malloc(len + 1);
    if (buf == NULL) {
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      "out of host memory reading %s", path);
        goto out;
    }
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    if (got != len) {
        atm_free(buf);
        st = atm_fail(ctx, ATMOE_STATUS_IO_ERROR, "short read on %s", path);
        goto out;
    }
    buf[len] = '\0';
    *text = buf;
    *size = len;
out:
    close(fd);
    return st;
}

atmoe_status atm_source_get(atmoe_context *ctx, const char *name, char **text,
                            size_t *size)
{
    const char *dir = ctx->programs.kernel_dir;
    if (*dir) {
        char path[PATH_MAX + 64];
        snprintf(path, sizeof path, "%s/%s.cl", dir, name);
        atmoe_status st = read_override(ctx, path, text, size);
        if (st == ATMOE_STATUS_OK) {
            atm_log(ATMOE_LOG_DEBUG, "kernel source %s from %s", name, path);
            return st;
        }
        if (st != ATMOE_STATUS_NOT_SUPPORTED)
            return st;
    }
    for (size_t i = 0; i < atm_embedded_source_count; i++) {
        const atm_embedded_source *s = &atm_embedded_sources[i];
        if (strcmp(s->name, name) != 0)
            continue;
        char *copy = atm_malloc(s->size + 1);
        if (copy == NULL)
            return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                            "out of host memory for kernel source %s", name);
        memcpy(copy, s->text, s->size);
        copy[s->size] = '\0';
        *text = copy;
        *size = s->size;
        return ATMOE_STATUS_OK;
    }
    return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                    "no kernel source named '%s'", name);
}

/* Everything that decides whether a compiled binary can be reused. */
static char *make_key(const atmoe_context *ctx, const char *name,
                      const char *source, size_t size, const char *options)
{
    const atmoe_device_info *d = &ctx->device->info;
    const char *fmt = "atmoe program cache 1\nprogram=%s\nsource=%016llx:%zu\n"
                      "options=%s\ndevice=%s\nvendor=%s\ndriver=%s\n"
                      "platform=%s/%s\n";
    unsigned long long h = (unsigned long long)atm_hash64(source, size);
    int n = snprintf(NULL, 0, fmt, name, h, size, options, d->raw_name,
                     d->vendor_name, d->driver_version, d->platform_name,
                     d->platform_version);
    char *key = atm_malloc((size_t)n + 1);
    if (key)
        snprintf(key, (size_t)n + 1, fmt, name, h, size, options, d->raw_name,
                 d->vendor_name, d->driver_version, d->platform_name,
                 d->platform_version);
    return key;
}

static atmoe_status build_failed(atmoe_context *ctx, cl_program prog,
                                 const char *name, const char *options,
                                 cl_int err)
{
    size_t log_size = 0;
    char *log = NULL;
    if (clGetProgramBuildInfo(prog, ctx->device->id, CL_PROGRAM_BUILD_LOG, 0,
                              NULL, &log_size) == CL_SUCCESS &&
        log_size > 0 && (log = atm_malloc(log_size + 1)) != NULL) {
        if (clGetProgramBuildInfo(prog, ctx->device->id, CL_PROGRAM_BUILD_LOG,
                                  log_size, log, NULL) != CL_SUCCESS)
            log[0] = '\0';
        log[log_size] = '\0';
    }
    atmoe_status st = atm_fail(ctx, ATMOE_STATUS_BUILD_FAILED,
                               "building program '%s' with options '%s' "
                               "failed: %s (%d); build log:\n%s",
                               name, options, atm_cl_error_name(err), (int)err,
                               log ? log : "(none)");
    atm_free(log);
    return st;
}

/* The binary of a freshly built program, for the disk cache. */
static unsigned char *program_binary(const atmoe_context *ctx, cl_program prog,
                                     size_t *size)
{
    size_t n = 0;
    if (clGetProgramInfo(prog, CL_PROGRAM_BINARY_SIZES, sizeof n, &n, NULL) !=
            CL_SUCCESS ||
        n == 0)
        return NULL;
    unsigned char *bin = atm_malloc(n);
    if (bin == NULL)
        return NULL;
    if (clGetProgramInfo(prog, CL_PROGRAM_BINARIES, sizeof bin, &bin, NULL) !=
        CL_SUCCESS) {
        atm_free(bin);
        return NULL;
    }
    *size = n;
    return bin;
}

static cl_program from_binary(atmoe_context *ctx, const unsigned char *bin,
                              size_t size, const char *options)
{
    cl_int err, bin_status;
    cl_program prog = clCreateProgramWithBinary(
        ctx->cl, 1, &ctx->device->id, &size, &bin, &bin_status, &err);
    if (err != CL_SUCCESS || bin_status != CL_SUCCESS) {
        if (prog)
            clReleaseProgram(prog);
        return NULL;
    }
    if (clBuildProgram(prog, 1, &ctx->device->id, options, NULL, NULL) !=
        CL_SUCCESS) {
        clReleaseProgram(prog);
        return NULL;
    }
    return prog;
}

static atmoe_status build(atmoe_context *ctx, const char *name,
                          const char *options, cl_program *out)
{
    char *source = NULL, *key = NULL;
    size_t size = 0;
    cl_program prog = NULL;
    atmoe_status st = atm_source_get(ctx, name, &source, &size);
    if (st != ATMOE_STATUS_OK)
        return st;
    key = make_key(ctx, name, source, size, options);
    if (key == NULL) {
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      "out of host memory building '%s'", name);
        goto out;
    }

    if (ctx->cache.disk_enabled) {
        size_t bin_size = 0;
        unsigned char *bin = atm_cache_load(ctx, name, key, &bin_size);
        if (bin) {
            prog = from_binary(ctx, bin, bin_size, options);
            atm_free(bin);
            if (prog) {
                ctx->cache.disk_hits++;
                goto out;
            }
            ctx->cache.disk_rejected++;
            atm_log(ATMOE_LOG_WARNING,
                    "cached binary of '%s' was refused by the driver; "
                    "rebuilding", name);
        }
    }

    cl_int err;
    const char *src = source;
    prog = clCreateProgramWithSource(ctx->cl, 1, &src, &size, &err);
    if (err != CL_SUCCESS) {
        st = atm_fail_cl(ctx, err, "clCreateProgramWithSource");
        goto out;
    }
    err = clBuildProgram(prog, 1, &ctx->device->id, options, NULL, NULL);
    if (err != CL_SUCCESS) {
        st = build_failed(ctx, prog, name, options, err);
        clReleaseProgram(prog);
        prog = NULL;
        goto out;
    }
    ctx->cache.builds++;
    atm_log(ATMOE_LOG_INFO, "built program '%s' (%s)", name, options);
    if (ctx->cache.disk_enabled) {
        size_t bin_size = 0;
        unsigned char *bin = program_binary(ctx, prog, &bin_size);
        if (bin)
            atm_cache_store(ctx, name, key, bin, bin_size);
        atm_free(bin);
    }
out:
    atm_free(source);
    atm_free(key);
    *out = prog;
    return st;
}

static int grow(void **array, size_t *capacity, size_t count, size_t elem)
{
    if (count < *capacity)
        return 1;
    size_t cap = *capacity ? *capacity * 2 : 8;
    void *p = atm_realloc(*array, cap * elem);
    if (p == NULL)
        return 0;
    *array = p;
    *capacity = cap;
    return 1;
}

/* Programs are built with exactly the options their caller passes: a
 * caller whose kernels take tuned parameters reads them (atm_param_get)
 * and writes them into its options, so that both caches tell the builds
 * apart and the launch geometry agrees with the build. */
atmoe_status atm_program_get(atmoe_context *ctx, const char *name,
                             const char *options, cl_program *program)
{
    atm_programs *ps = &ctx->programs;
    for (size_t i = 0; i < ps->program_count; i++) {
        atm_program_entry *e = &ps->programs[i];
        if (strcmp(e->name, name) == 0 && strcmp(e->options, options) == 0) {
            ctx->cache.memory_hits++;
            *program = e->program;
            return ATMOE_STATUS_OK;
        }
    }
    atm_program_entry e = {atm_strdup(name), atm_strdup(options), NULL};
    if (e.name == NULL || e.options == NULL ||
        !grow((void **)&ps->programs, &ps->program_capacity, ps->program_count,
              sizeof *ps->programs)) {
        atm_free(e.name);
        atm_free(e.options);
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "out of host memory for the program cache");
    }
    atmoe_status st = build(ctx, name, options, &e.program);
    if (st != ATMOE_STATUS_OK) {
        atm_free(e.name);
        atm_free(e.options);
        return st;
    }
    ps->programs[ps->program_count++] = e;
    *program = e.program;
    return ATMOE_STATUS_OK;
}

atmoe_status atm_kernel_get(atmoe_context *ctx, const char *program,
                            const char *options, const char *kernel,
                            cl_kernel *out)
{
    cl_program prog;
    atmoe_status st = atm_program_get(ctx, program, options, &prog);
    if (st != ATMOE_STATUS_OK)
        return st;
    atm_programs *ps = &ctx->programs;
    for (size_t i = 0; i < ps->kernel_count; i++) {
        atm_kernel_entry *e = &ps->kernels[i];
        if (e->program == prog && strcmp(e->name, kernel) == 0) {
            *out = e->kernel;
            return ATMOE_STATUS_OK;
        }
    }
    if (!grow((void **)&ps->kernels, &ps->kernel_capacity, ps->kernel_count,
              sizeof *ps->kernels))
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "out of host memory for the kernel cache");
    cl_int err;
    cl_kernel k = clCreateKernel(prog, kernel, &err);
    if (err != CL_SUCCESS)
        return atm_fail(ctx, ATMOE_STATUS_OPENCL_ERROR,
                        "clCreateKernel('%s' in program '%s') failed: %s (%d)",
                        kernel, program, atm_cl_error_name(err), (int)err);
    char *name = atm_strdup(kernel);
    if (name == NULL) {
        clReleaseKernel(k);
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "out of host memory for the kernel cache");
    }
    ps->kernels[ps->kernel_count++] = (atm_kernel_entry){prog, name, k};
    *out = k;
    return ATMOE_STATUS_OK;
}

void atm_programs_release(atmoe_context *ctx)
{
    atm_programs *ps = &ctx->programs;
    for (size_t i = 0; i < ps->kernel_count; i++) {
        clReleaseKernel(ps->kernels[i].kernel);
        atm_free(ps->kernels[i].name);
    }
    for (size_t i = 0; i < ps->program_count; i++) {
        clReleaseProgram(ps->programs[i].program);
        atm_free(ps->programs[i].name);
        atm_free(ps->programs[i].options);
    }
    atm_free(ps->kernels);
    atm_free(ps->programs);
    ps->kernels = NULL;
    ps->programs = NULL;
    ps->kernel_count = ps->program_count = 0;
    ps->kernel_capacity = ps->program_capacity = 0;
}
