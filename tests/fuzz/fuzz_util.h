/* Helpers of the fuzz targets that read files: a private directory per
 * process, files written whole, and the last message. */
#ifndef ATMOE_FUZZ_UTIL_H
#define ATMOE_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>

#define REQUIRE(cond)                                                         \
    do {                                                                      \
        if (!(cond))                                                          \
            __builtin_trap();                                                 \
    } while (0)

/* dir/name below a directory of this process's own, made at first use. */
const char *fuzz_path(char *out, size_t size, const char *name);

/* mkdir that tolerates an existing directory (traps otherwise). */
void fuzz_mkdir(const char *path);

/* Writes the file whole (traps when it cannot). */
void fuzz_write(const char *path, const void *data, size_t size);

/* The message of the last failure (the stubs' atm_fail keeps it). */
const char *fuzz_message(void);

#endif
