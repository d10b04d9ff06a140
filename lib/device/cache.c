/* The on-disk program cache.  A file holds one compiled binary behind a
 * header that repeats the whole key and a checksum of the binary, so a file
 * from another device, driver, source or option set, or a damaged one, is
 * recognised and rebuilt instead of being handed to the driver. */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/file.h"
#include "base/log.h"
#include "device/program.h"

#define CACHE_MAGIC "ATMOEPC1"
/* A compiled program larger than this is not something we wrote. */
#define CACHE_MAX_FILE ((uint64_t)512 << 20)

typedef struct cache_header {
    char magic[8];
    uint32_t key_size;
    uint32_t reserved;
    uint64_t binary_size;
    uint64_t binary_hash;
} cache_header;

/* FNV-1a: for file names and integrity, not against an adversary (the
 * whole key is compared, and a changed binary is rebuilt, never run). */
uint64_t atm_hash64(const void *data, size_t size)
{
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < size; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static int mkdir_p(const char *dir)
{
    char path[PATH_MAX];
    size_t n = strlen(dir);
    if (n == 0 || n >= sizeof path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(path, dir, n + 1);
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, 0700) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    if (mkdir(path, 0700) != 0 && errno != EEXIST)
        return -1;
    struct stat sb;
    if (stat(path, &sb) != 0)
        return -1;
    if (!S_ISDIR(sb.st_mode)) {
        errno = ENOTDIR;
        return -1;
    }
    return access(path, W_OK | X_OK);
}

static void disable(atmoe_context *ctx)
{
    ctx->cache.disk_enabled = 0;
    ctx->cache.dir[0] = '\0';
}

ATMOE_API atmoe_status atmoe_context_set_cache_dir(atmoe_context *ctx,
                                                   const char *dir)
{
    ATM_CHECK_NULL(NULL, ctx);
    if (dir == NULL || *dir == '\0') {
        disable(ctx);
        return ATMOE_STATUS_OK;
    }
    if (strlen(dir) >= sizeof ctx->cache.dir - 32) {
        disable(ctx);
        atm_log(ATMOE_LOG_WARNING, "program cache directory name too long; "
                "disk cache off");
        return atm_fail(ctx, ATMOE_STATUS_IO_ERROR,
                        "cache directory name is too long (%zu bytes); "
                        "disk cache off", strlen(dir));
    }
    if (mkdir_p(dir) != 0) {
        int e = errno;
        disable(ctx);
        atm_log(ATMOE_LOG_WARNING, "program cache %s unusable (%s); "
                "disk cache off", dir, strerror(e));
        return atm_fail(ctx, ATMOE_STATUS_IO_ERROR,
                        "cannot use %s as the program cache: %s; "
                        "disk cache off", dir, strerror(e));
    }
    snprintf(ctx->cache.dir, sizeof ctx->cache.dir, "%s", dir);
    ctx->cache.disk_enabled = 1;
    return ATMOE_STATUS_OK;
}

void atm_cache_init(atmoe_context *ctx)
{
    char dir[PATH_MAX];
    const char *env = getenv("ATMOE_CACHE_DIR");
    const char *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    if (env)
        snprintf(dir, sizeof dir, "%s", env); /* "" switches the cache off */
    else if (xdg && *xdg == '/')
        snprintf(dir, sizeof dir, "%s/atmoe", xdg);
    else if (home && *home)
        snprintf(dir, sizeof dir, "%s/.cache/atmoe", home);
    else
        dir[0] = '\0';
    /* An unusable directory is logged and leaves the cache off; the context
     * works without it, so the status is not passed on. */
    if (atmoe_context_set_cache_dir(ctx, dir) != ATMOE_STATUS_OK)
        ctx->errmsg[0] = '\0';
}

static void entry_path(const atmoe_context *ctx, const char *name,
                       const char *key, char *path, size_t size)
{
    snprintf(path, size, "%s/%s-%016llx.bin", ctx->cache.dir, name,
             (unsigned long long)atm_hash64(key, strlen(key)));
}

static unsigned char *reject(atmoe_context *ctx, const char *path,
                             const char *why, FILE *f, unsigned char *buf)
{
    atm_log(ATMOE_LOG_WARNING, "program cache file %s rejected: %s", path, why);
    ctx->cache.disk_rejected++;
    if (f)
        fclose(f);
    atm_free(buf);
    return NULL;
}

unsigned char *atm_cache_load(atmoe_context *ctx, const char *name,
                              const char *key, size_t *size)
{
    char path[PATH_MAX + 64];
    entry_path(ctx, name, key, path, sizeof path);
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL; /* a miss */

    cache_header h;
    struct stat sb;
    size_t key_size = strlen(key);
    if (fstat(fileno(f), &sb) != 0 || fread(&h, sizeof h, 1, f) != 1)
        return reject(ctx, path, "shorter than its header", f, NULL);
    if (memcmp(h.magic, CACHE_MAGIC, sizeof h.magic) != 0)
        return reject(ctx, path, "not an atmoe cache file", f, NULL);
    if (h.key_size != key_size || h.binary_size == 0 ||
        h.binary_size > CACHE_MAX_FILE ||
        (uint64_t)sb.st_size != sizeof h + key_size + h.binary_size)
        return reject(ctx, path, "sizes disagree with the file", f, NULL);

    unsigned char *buf = atm_malloc(key_size + (size_t)h.binary_size);
    if (buf == NULL)
        return reject(ctx, path, "out of host memory", f, NULL);
    if (fread(buf, 1, key_size + (size_t)h.binary_size, f) !=
        key_size + h.binary_size)
        return reject(ctx, path, "truncated", f, buf);
    if (memcmp(buf, key, key_size) != 0)
        return reject(ctx, path, "written for another source, device or "
                      "driver", f, buf);
    if (atm_hash64(buf + key_size, (size_t)h.binary_size) != h.binary_hash)
        return reject(ctx, path, "checksum mismatch", f, buf);
    fclose(f);

    memmove(buf, buf + key_size, (size_t)h.binary_size);
    *size = (size_t)h.binary_size;
    return buf;
}

void atm_cache_store(atmoe_context *ctx, const char *name, const char *key,
                     const unsigned char *binary, size_t size)
{
    char path[PATH_MAX + 64], tmp[PATH_MAX + 80];
    entry_path(ctx, name, key, path, sizeof path);

    cache_header h;
    memcpy(h.magic, CACHE_MAGIC, sizeof h.magic);
    h.key_size = (uint32_t)strlen(key);
    h.reserved = 0;
    h.binary_size = size;
    h.binary_hash = atm_hash64(binary, size);

    FILE *f = atm_file_begin(path, tmp, sizeof tmp);
    if (f == NULL) {
        atm_log(ATMOE_LOG_WARNING, "cannot write to the program cache %s: %s",
                ctx->cache.dir, strerror(errno));
        return;
    }
    int ok = fwrite(&h, sizeof h, 1, f) == 1 &&
             fwrite(key, 1, h.key_size, f) == h.key_size &&
             fwrite(binary, 1, size, f) == size;
    if (atm_file_commit(f, tmp, path, ok) != 0) {
        atm_log(ATMOE_LOG_WARNING, "cannot store %s in the program cache: %s",
                name, strerror(errno));
        return;
    }
    ctx->cache.disk_writes++;
}
