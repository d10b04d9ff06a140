/* The context: one device, its OpenCL context and queue, the program cache
 * and the last error message. */
#ifndef ATMOE_CONTEXT_H
#define ATMOE_CONTEXT_H

#include <limits.h>

#include "device/device.h"

typedef struct atm_program_entry {
    char *name;    /* the .cl file's base name, "tensor" */
    char *options; /* build options */
    cl_program program;
} atm_program_entry;

struct atm_tuning; /* tuning.c */

typedef struct atm_kernel_entry {
    cl_program program;
    char *name;
    cl_kernel kernel;
} atm_kernel_entry;

struct atmoe_context {
    const atm_device *device;
    cl_context cl;
    cl_command_queue queue;

    atm_program_entry *programs;
    size_t program_count, program_capacity;
    atm_kernel_entry *kernels;
    size_t kernel_count, kernel_capacity;

    atmoe_cache_stats cache;
    char kernel_dir[PATH_MAX]; /* ATMOE_KERNEL_DIR when the context was
                                  made; "" for the embedded sources */
    atmoe_memory_stats memory;
    size_t base_align; /* bytes; CL_DEVICE_MEM_BASE_ADDR_ALIGN */
    size_t linear_max_tokens; /* ATMOE_LINEAR_MAX_TOKENS, 0 when unset
                                 (lib/mixture.c) */
    struct atm_tuning *tuning; /* the parameters in force (tuning.h) */

    char errmsg[ATM_ERRMSG_SIZE];
};

/* Creates a read-write device buffer and counts it in ctx->memory; `what`
 * names the caller in the error message. */
atmoe_status atm_buffer_new(atmoe_context *ctx, size_t bytes, cl_mem *buffer,
                            const char *what);

#endif
