/* libFuzzer target for the program cache's file format (device/cache.c):
 * the bytes become a cache entry for a fixed program name and key, loaded
 * as a context loads one before handing it to the driver.  The first byte
 * chooses repairs that let the fuzzer past the checks it cannot forge:
 * bit 0 rewrites the key in the file to the one wanted, bit 1 the sizes,
 * bit 2 the checksum (FNV-1a, not against an adversary).  A load may
 * return a binary only when the file holds exactly the header, the key
 * and that binary with its checksum; anything else must be rejected, and
 * counted.  A crash, a leak or a wrong acceptance is a bug. */
#include <config.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device/context.h"
#include "base/alloc.h"
#include "device/program.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NAME "fuzz"
#define KEY "source=fuzz|options=-cl-std=CL1.2|device=fuzz|driver=1"
#define HEADER 32 /* magic, key size, reserved, binary size, binary hash */

static unsigned char file[1 << 16];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size - 1 > sizeof file)
        return 0;
    unsigned repair = data[0];
    size_t n = size - 1, key_size = strlen(KEY);
    memcpy(file, data + 1, n);
    if ((repair & 1) && n >= HEADER + key_size)
        memcpy(file + HEADER, KEY, key_size);
    if ((repair & 2) && n >= HEADER + key_size) {
        uint32_t k = (uint32_t)key_size;
        uint64_t b = n - HEADER - key_size;
        memcpy(file + 8, &k, sizeof k);
        memcpy(file + 16, &b, sizeof b);
    }
    if ((repair & 4) && n >= HEADER + key_size) {
        uint64_t h = atm_hash64(file + HEADER + key_size,
                                n - HEADER - key_size);
        memcpy(file + 24, &h, sizeof h);
    }

    static atmoe_context ctx;
    char dir[256], path[512];
    fuzz_path(dir, sizeof dir, "cache");
    fuzz_mkdir(dir);
    snprintf(ctx.cache.dir, sizeof ctx.cache.dir, "%s", dir);
    ctx.cache.disk_enabled = 1;
    snprintf(path, sizeof path, "%s/%s-%016llx.bin", dir, NAME,
             (unsigned long long)atm_hash64(KEY, key_size));
    fuzz_write(path, file, n);

    uint64_t rejected = ctx.cache.disk_rejected;
    size_t got = 0;
    unsigned char *bin = atm_cache_load(&ctx, NAME, KEY, &got);
    if (bin == NULL) {
        REQUIRE(ctx.cache.disk_rejected == rejected + 1);
        return 0;
    }
    /* Accepted: the file is exactly header, key and binary. */
    REQUIRE(ctx.cache.disk_rejected == rejected);
    REQUIRE(n == HEADER + key_size + got && got > 0);
    REQUIRE(memcmp(file, "ATMOEPC1", 8) == 0);
    REQUIRE(memcmp(file + HEADER, KEY, key_size) == 0);
    REQUIRE(memcmp(bin, file + HEADER + key_size, got) == 0);
    uint64_t h;
    memcpy(&h, file + 24, sizeof h);
    REQUIRE(h == atm_hash64(bin, got));
    atm_free(bin);
    return 0;
}
