/* The context: one device with its OpenCL context and queue, composed of
 * the modules it owns -- its programs and kernels (program.c), its disk
 * cache (cache.c), its tuning and parameters in force (tuning.c) and its
 * message sink (base/error.h) -- each with a part of its own below. */
#ifndef ATMOE_CONTEXT_H
#define ATMOE_CONTEXT_H

#include <limits.h>

#include "device/device.h"
#include "device/params.h"

typedef struct atm_program_entry {
    char *name;    /* the .cl file's base name, "tensor" */
    char *options; /* build options */
    cl_program program;
} atm_program_entry;

typedef struct atm_kernel_entry {
    cl_program program;
    char *name;
    cl_kernel kernel;
} atm_kernel_entry;

/* program.c: where sources come from, and what was built from them. */
typedef struct atm_programs {
    char kernel_dir[PATH_MAX]; /* ATMOE_KERNEL_DIR when the context was
                                  made; "" for the embedded sources */
    atm_program_entry *programs;
    size_t program_count, program_capacity;
    atm_kernel_entry *kernels;
    size_t kernel_count, kernel_capacity;
} atm_programs;

struct atmoe_context {
    const atm_device *device;
    cl_context cl;
    cl_command_queue queue;
    size_t base_align; /* bytes; CL_DEVICE_MEM_BASE_ADDR_ALIGN */
    atmoe_memory_stats memory;

    atm_programs programs;   /* program.c */
    atmoe_cache_stats cache; /* cache.c: the disk cache and the counts of
                                both caches */
    atm_tuning tuning;       /* tuning.c */
    atm_errsink errors;      /* atmoe_errmsg(ctx) */

};

/* Creates a read-write device buffer and counts it in ctx->memory; `what`
 * names the caller in the error message. */
atmoe_status atm_buffer_new(atmoe_context *ctx, size_t bytes, cl_mem *buffer,
                            const char *what);

#endif
