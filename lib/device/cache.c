/* The on-disk program cache.  A file holds one compiled binary behind a
 * header that repeats the whole key and a checksum of the binary, so a file
 * from another device, driver, source or option set, or a damaged one, is
 * recognised and rebuilt instead of being handed to the driver. */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/env.h"
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

static void disable(atmoe_context *ctx)
{
    ctx->cache.disk_enabled = 0;
    ctx->cache.dir[0] = '\0';
}

/* Makes dir the disk cache, or turns the disk cache off and says why in
 * why (size WHY_SIZE); reports to no sink, so that context creation can
 * log the reason where atmoe_context_set_cache_dir returns it. */
#define WHY_SIZE (PATH_MAX + 128)
static int use_dir(atmoe_context *ctx, const char *dir, char *why)
{
    if (strlen(dir) >= sizeof ctx->cache.dir - 32) {
        disable(ctx);
        snprintf(why, WHY_SIZE, "cache directory name is too long (%zu "
                 "bytes); disk cache off", strlen(dir));
        return -1;
    }
    /* Private: compiled programs carry native code and are run without
     * further checks than the key and checksum, so nobody else may write
     * them.  As ssh does with ~/.ssh: the directory must be the user's own
     * and writable by nobody else, or it is not used at all. */
    if (atm_mkdir_p(dir, 0700) != 0 || access(dir, W_OK | X_OK) != 0) {
        int e = errno;
        disable(ctx);
        snprintf(why, WHY_SIZE, "cannot use %s as the program cache: %s; "
                 "disk cache off", dir, strerror(e));
        return -1;
    }
    struct stat sb;
    if (stat(dir, &sb) != 0) {
        int e = errno;
        disable(ctx);
        snprintf(why, WHY_SIZE, "cannot use %s as the program cache: %s; "
                 "disk cache off", dir, strerror(e));
        return -1;
    }
    if (sb.st_uid != geteuid()) {
        disable(ctx);
        snprintf(why, WHY_SIZE, "the program cache %s is owned by uid %ld, "
                 "not by this user (uid %ld), and its programs would run as "
                 "this user; disk cache off", dir, (long)sb.st_uid,
                 (long)geteuid());
        return -1;
    }
    if ((sb.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
        disable(ctx);
        snprintf(why, WHY_SIZE, "the program cache %s is writable by group "
                 "or others (mode %03o), who could replace its programs; "
                 "disk cache off (chmod go-w to use it)", dir,
                 (unsigned)(sb.st_mode & 0777));
        return -1;
    }
    snprintf(ctx->cache.dir, sizeof ctx->cache.dir, "%s", dir);
    ctx->cache.disk_enabled = 1;
    return 0;
}

ATMOE_API atmoe_status atmoe_context_set_cache_dir(atmoe_context *ctx,
                                                   const char *dir)
{
    ATM_CHECK_NULL(NULL, ctx);
    if (dir == NULL || *dir == '\0') {
        disable(ctx);
        return ATMOE_STATUS_OK;
    }
    char why[WHY_SIZE];
    if (use_dir(ctx, dir, why) != 0) {
        atm_log(ATMOE_LOG_WARNING, "%s", why);
        return atm_fail(ctx, ATMOE_STATUS_IO_ERROR, "%s", why);
    }
    return ATMOE_STATUS_OK;
}

void atm_cache_init(atmoe_context *ctx)
{
    char dir[PATH_MAX], why[WHY_SIZE];
    size_t need = 0;
    atm_path_status ps = atm_env_cache_dir(dir, sizeof dir, &need);
    /* An unusable directory is logged and leaves the cache off; the context
     * works without it, so it is no failure of atmoe_context_new. */
    if (ps == ATM_PATH_TOO_LONG)
        atm_log(ATMOE_LOG_WARNING, "the program cache's directory name needs "
                "%zu bytes, more than %zu; disk cache off", need, sizeof dir);
    else if (ps == ATM_PATH_OK && use_dir(ctx, dir, why) != 0)
        atm_log(ATMOE_LOG_WARNING, "%s", why);
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
    /* The regular-file open: a FIFO at an entry's path would block. */
    FILE *f = atm_file_open_regular(path);
    if (f == NULL) {
        if (errno == ENOENT)
            return NULL; /* a miss */
        return reject(ctx, path, atm_file_strerror(errno), NULL, NULL);
    }

    cache_header h;
    struct stat sb;
    size_t key_size = strlen(key);
    if (fstat(fileno(f), &sb) != 0)
        return reject(ctx, path, strerror(errno), f, NULL);
    /* Another user's entry in our directory (put there before it was
     * ours, or by root) is not run. */
    if (sb.st_uid != geteuid())
        return reject(ctx, path, "not owned by this user", f, NULL);
    if (fread(&h, sizeof h, 1, f) != 1)
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
    char path[PATH_MAX + 64], tmp[PATH_MAX + 64 + ATM_FILE_TMP_EXTRA];
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
