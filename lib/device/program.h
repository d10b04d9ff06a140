/* OpenCL programs: sources (embedded at build time, overridable through
 * ATMOE_KERNEL_DIR), builds with options, and their caches in memory and on
 * disk. */
#ifndef ATMOE_PROGRAM_H
#define ATMOE_PROGRAM_H

#include "device/context.h"

typedef struct atm_embedded_source {
    const char *name; /* file name without ".cl" */
    const char *text;
    size_t size;
} atm_embedded_source;

/* Generated from the files in cl/ by build-aux/embed-cl.sh. */
extern const atm_embedded_source atm_embedded_sources[];
extern const size_t atm_embedded_source_count;

/* The source of program `name` as a malloc'd, NUL-terminated copy. */
atmoe_status atm_source_get(atmoe_context *ctx, const char *name, char **text,
                            size_t *size);

/* The built program `name` with build options `options` (may be ""),
 * exactly as given, from the context's cache, the disk cache, or a fresh
 * build. */
atmoe_status atm_program_get(atmoe_context *ctx, const char *name,
                             const char *options, cl_program *program);

/* Kernel `kernel` of that program, created once per context. */
atmoe_status atm_kernel_get(atmoe_context *ctx, const char *program,
                            const char *options, const char *kernel,
                            cl_kernel *out);

/* Reads ATMOE_KERNEL_DIR into ctx->programs, at context creation. */
void atm_programs_init(atmoe_context *ctx);
void atm_programs_release(atmoe_context *ctx);

/* Disk cache (cache.c). */
void atm_cache_init(atmoe_context *ctx);
/* A malloc'd binary for key, or NULL on a miss or a rejected file. */
unsigned char *atm_cache_load(atmoe_context *ctx, const char *name,
                              const char *key, size_t *size);
void atm_cache_store(atmoe_context *ctx, const char *name, const char *key,
                     const unsigned char *binary, size_t size);
uint64_t atm_hash64(const void *data, size_t size);

#endif
