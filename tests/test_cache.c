/* The program cache: memory hits, builds, disk writes and disk hits; damaged
 * and foreign cache files; unusable and disabled cache directories; the
 * default directory; and ATMOE_KERNEL_DIR, which replaces the embedded
 * kernel sources.
 *
 * Every test works below a fresh temporary directory of its own, so the
 * counters it sees do not depend on what earlier runs left behind. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

/* ------------------------------------------------------------- fixture */

/* The variables the library reads; every test leaves them as it found them
 * (with CK_FORK=no the tests share one process). */
static const char *const env_names[] = {"ATMOE_CACHE_DIR", "ATMOE_KERNEL_DIR",
                                        "XDG_CACHE_HOME", "HOME"};
enum { ENV_COUNT = sizeof env_names / sizeof env_names[0] };
static char *env_saved[ENV_COUNT];
static int env_was_set[ENV_COUNT];

static char root[PATH_MAX]; /* this test's temporary directory */

static void setup(void)
{
    for (int i = 0; i < ENV_COUNT; i++) {
        const char *v = getenv(env_names[i]);
        env_was_set[i] = v != NULL;
        env_saved[i] = v ? strdup(v) : NULL;
    }
    unsetenv("ATMOE_KERNEL_DIR");
    test_mkdtemp(root, sizeof root, "cache");
}

static void teardown(void)
{
    for (int i = 0; i < ENV_COUNT; i++) {
        if (env_was_set[i])
            setenv(env_names[i], env_saved[i], 1);
        else
            unsetenv(env_names[i]);
        free(env_saved[i]);
        env_saved[i] = NULL;
    }
    atmoe_log_set(NULL, NULL, ATMOE_LOG_ERROR);
    test_rmdir_r(root);
}

/* ------------------------------------------------------------- helpers */

/* Collects warnings: an unusable cache directory is logged, not returned. */
static struct {
    int warnings;
    char last[1024];
} warned;

static void record_warning(atmoe_log_level level, const char *message,
                           void *user)
{
    (void)user;
    if (level < ATMOE_LOG_WARNING)
        return;
    warned.warnings++;
    snprintf(warned.last, sizeof warned.last, "%s", message);
}

static void path_in(char *out, size_t size, const char *dir, const char *name)
{
    int n = snprintf(out, size, "%s/%s", dir, name);
    ck_assert_msg(n > 0 && (size_t)n < size, "path too long");
}

/* A context whose disk cache is dir (through ATMOE_CACHE_DIR, as a user
 * would set it). */
static atmoe_context *context_on(const char *dir)
{
    ck_assert_int_eq(setenv("ATMOE_CACHE_DIR", dir, 1), 0);
    atmoe_context *ctx = test_context();
    /* An unusable directory is not an error, so it leaves no message. */
    ck_assert_str_eq(atmoe_errmsg(ctx), "");
    return ctx;
}

static atmoe_cache_stats stats_of(const atmoe_context *ctx)
{
    atmoe_cache_stats s;
    memset(&s, 0xA5, sizeof s);
    ck_assert_status(atmoe_context_get_cache_stats(ctx, &s), ctx);
    ck_assert_msg(memchr(s.dir, '\0', sizeof s.dir) != NULL,
                  "stats.dir is not terminated");
    return s;
}

/* Runs fill_f32 (the one kernel these tests need) on a small tensor and
 * checks every element read back. */
static void fill_expect(atmoe_context *ctx, double value, float want)
{
    enum { N = 37 };
    size_t shape[1] = {N};
    float back[N];
    atmoe_tensor *t = NULL;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 1, shape, &t),
                     ctx);
    ck_assert_status(atmoe_tensor_fill(t, value), ctx);
    test_poison(back, N);
    ck_assert_status(atmoe_tensor_read(t, back, sizeof back), ctx);
    atmoe_tensor_free(t);
    for (int i = 0; i < N; i++)
        ck_assert_msg(back[i] == want, "element %d = %g, want %g", i,
                      back[i], want);
}

static void fill_ok(atmoe_context *ctx, double value)
{
    fill_expect(ctx, value, (float)value);
}

/* Lists dir: the number of *.bin files (the path of the last one in bin)
 * and fails on anything else, such as a temporary file left by a store. */
static int count_bins(const char *dir, char *bin, size_t size)
{
    DIR *d = opendir(dir);
    ck_assert_msg(d != NULL, "opendir(%s): %s", dir, strerror(errno));
    int bins = 0;
    char stray[256] = "";
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        size_t n = strlen(e->d_name);
        if (n > 4 && e->d_name[0] != '.' &&
            strcmp(e->d_name + n - 4, ".bin") == 0) {
            bins++;
            if (bin)
                path_in(bin, size, dir, e->d_name);
        } else if (stray[0] == '\0') {
            snprintf(stray, sizeof stray, "%s", e->d_name);
        }
    }
    closedir(d);
    ck_assert_msg(stray[0] == '\0', "stray file '%s' in the cache %s", stray,
                  dir);
    return bins;
}

static void spew_text(const char *path, const char *text)
{
    test_write_file(path, text, strlen(text));
}

static int is_dir(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

/* --------------------------------------------- miss, build, store, hits */

START_TEST(test_build_store_and_hits)
{
    char dir[PATH_MAX];
    /* Two levels that do not exist yet: the library creates them. */
    path_in(dir, sizeof dir, root, "new/cache");
    atmoe_context *ctx = context_on(dir);
    atmoe_cache_stats s = stats_of(ctx);
    ck_assert_int_eq(s.disk_enabled, 1);
    ck_assert_str_eq(s.dir, dir);
    ck_assert(is_dir(dir));
    ck_assert_uint_eq(s.memory_hits, 0);
    ck_assert_uint_eq(s.disk_hits, 0);
    ck_assert_uint_eq(s.builds, 0);
    ck_assert_uint_eq(s.disk_writes, 0);
    ck_assert_uint_eq(s.disk_rejected, 0);
    ck_assert_int_eq(count_bins(dir, NULL, 0), 0);

    /* A miss everywhere: built from source and stored. */
    fill_ok(ctx, 2.0);
    s = stats_of(ctx);
    ck_assert_uint_eq(s.builds, 1);
    ck_assert_uint_eq(s.disk_writes, 1);
    ck_assert_uint_eq(s.disk_hits, 0);
    ck_assert_uint_eq(s.disk_rejected, 0);
    uint64_t mem = s.memory_hits;
    ck_assert_int_eq(count_bins(dir, NULL, 0), 1);

    /* The same program again: found in memory, nothing built or stored. */
    fill_ok(ctx, -3.25);
    s = stats_of(ctx);
    ck_assert_uint_gt(s.memory_hits, mem);
    ck_assert_uint_eq(s.builds, 1);
    ck_assert_uint_eq(s.disk_writes, 1);
    ck_assert_uint_eq(s.disk_hits, 0);
    atmoe_context_free(ctx);

    /* A new context on the same directory loads the binary. */
    ctx = context_on(dir);
    fill_ok(ctx, 0.5);
    s = stats_of(ctx);
    ck_assert_uint_eq(s.disk_hits, 1);
    ck_assert_uint_eq(s.builds, 0);
    ck_assert_uint_eq(s.disk_writes, 0);
    ck_assert_uint_eq(s.disk_rejected, 0);
    fill_ok(ctx, 1e6);
    s = stats_of(ctx);
    ck_assert_uint_ge(s.memory_hits, 1);
    ck_assert_uint_eq(s.disk_hits, 1);
    atmoe_context_free(ctx);

    /* Stores leave only finished entries: no temporary files. */
    ck_assert_int_eq(count_bins(dir, NULL, 0), 1);
}
END_TEST

START_TEST(test_contexts_share_directory)
{
    /* Two live contexts on one directory: the second finds what the first
     * stored while the first is still open. */
    char dir[PATH_MAX];
    path_in(dir, sizeof dir, root, "shared");
    atmoe_context *a = context_on(dir);
    atmoe_context *b = context_on(dir);
    fill_ok(a, 4.0);
    fill_ok(b, 5.0);
    atmoe_cache_stats sa = stats_of(a), sb = stats_of(b);
    ck_assert_uint_eq(sa.builds, 1);
    ck_assert_uint_eq(sa.disk_writes, 1);
    ck_assert_uint_eq(sb.builds, 0);
    ck_assert_uint_eq(sb.disk_hits, 1);
    atmoe_context_free(a);
    atmoe_context_free(b);
    ck_assert_int_eq(count_bins(dir, NULL, 0), 1);
}
END_TEST

/* ------------------------------------------------------ damaged entries */

/* The file layout the tests below damage on purpose (cache.c): a 32-byte
 * header (magic, key size, reserved, binary size, binary hash), the key
 * text, then the binary. */
#define HEADER_SIZE 32

static uint64_t fnv1a(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

enum corruption {
    FLIP_MIDDLE,   /* bytes inverted in the middle of the binary */
    TRUNCATE_HALF, /* cut to half its size */
    TRUNCATE_TINY, /* shorter than the header */
    EMPTY,         /* zero bytes */
    GARBAGE,       /* not a cache file at all */
    FOREIGN_KEY,   /* valid header, one byte of the key changed */
    BAD_BINARY,    /* consistent file whose binary the driver refuses */
    CORRUPTION_COUNT
};

static const char *const corruption_names[] = {
    "flip-middle", "truncate-half", "truncate-tiny", "empty",
    "garbage",     "foreign-key",   "bad-binary"};

static void corrupt(const char *path, enum corruption how)
{
    size_t size;
    unsigned char *buf = test_read_file(path, &size);
    ck_assert_msg(size > HEADER_SIZE + 64 && memcmp(buf, "ATMOEPC1", 8) == 0,
                  "%s does not look like a cache file", path);
    uint32_t key_size;
    memcpy(&key_size, buf + 8, sizeof key_size);
    ck_assert_msg(HEADER_SIZE + (size_t)key_size < size,
                  "the cache file layout changed; update this test");

    switch (how) {
    case FLIP_MIDDLE: {
        size_t mid = size / 2, span = 16;
        for (size_t i = mid; i < mid + span && i < size; i++)
            buf[i] ^= 0xFF;
        test_write_file(path, buf, size);
        break;
    }
    case TRUNCATE_HALF:
        ck_assert_int_eq(truncate(path, (off_t)(size / 2)), 0);
        break;
    case TRUNCATE_TINY:
        ck_assert_int_eq(truncate(path, 12), 0);
        break;
    case EMPTY:
        ck_assert_int_eq(truncate(path, 0), 0);
        break;
    case GARBAGE: {
        for (size_t i = 0; i < size; i++)
            buf[i] = (unsigned char)(i * 131 + 7);
        test_write_file(path, buf, size);
        break;
    }
    case FOREIGN_KEY: {
        /* As if written for another device: the name in the key differs
         * by one byte, the header stays valid, and the file name (a hash
         * of the real key) still points the loader at it. */
        unsigned char *key = buf + HEADER_SIZE;
        unsigned char *at = memmem(key, key_size, "\ndevice=", 8);
        ck_assert_msg(at != NULL, "no device line in the key");
        at[8] ^= 0x20; /* flips the case of the first letter */
        test_write_file(path, buf, size);
        break;
    }
    case BAD_BINARY: {
        /* Every check the loader makes passes: key, sizes, checksum.  Only
         * the driver can tell the binary is not a program. */
        size_t bin_off = HEADER_SIZE + key_size;
        size_t bin_size = 4096;
        unsigned char *out = malloc(bin_off + bin_size);
        ck_assert_ptr_nonnull(out);
        memcpy(out, buf, bin_off);
        for (size_t i = 0; i < bin_size; i++)
            out[bin_off + i] = (unsigned char)(i * 37 + 11);
        uint64_t bsize = bin_size, hash = fnv1a(out + bin_off, bin_size);
        memcpy(out + 16, &bsize, sizeof bsize);
        memcpy(out + 24, &hash, sizeof hash);
        test_write_file(path, out, bin_off + bin_size);
        free(out);
        break;
    }
    default:
        ck_abort_msg("unknown corruption %d", (int)how);
    }
    free(buf);
}

START_TEST(test_corrupt_entry)
{
    enum corruption how = (enum corruption)_i;
    char dir[PATH_MAX], bin[PATH_MAX * 2], bin_after[PATH_MAX * 2];
    path_in(dir, sizeof dir, root, "c");

    atmoe_context *ctx = context_on(dir);
    fill_ok(ctx, 1.0);
    ck_assert_uint_eq(stats_of(ctx).disk_writes, 1);
    atmoe_context_free(ctx);
    ck_assert_int_eq(count_bins(dir, bin, sizeof bin), 1);

    corrupt(bin, how);

    /* Rejected, rebuilt, and the numbers are right. */
    ctx = context_on(dir);
    fill_ok(ctx, 2.5);
    atmoe_cache_stats s = stats_of(ctx);
    ck_assert_msg(s.builds == 1 && s.disk_rejected >= 1 && s.disk_hits == 0,
                  "%s: builds %llu, rejected %llu, disk hits %llu",
                  corruption_names[how], (unsigned long long)s.builds,
                  (unsigned long long)s.disk_rejected,
                  (unsigned long long)s.disk_hits);
    /* The rebuilt binary replaced the damaged file. */
    ck_assert_uint_eq(s.disk_writes, 1);
    atmoe_context_free(ctx);
    ck_assert_int_eq(count_bins(dir, bin_after, sizeof bin_after), 1);
    ck_assert_str_eq(bin_after, bin);

    /* And it is valid again: the next context loads it. */
    ctx = context_on(dir);
    fill_ok(ctx, -7.0);
    s = stats_of(ctx);
    ck_assert_uint_eq(s.disk_hits, 1);
    ck_assert_uint_eq(s.builds, 0);
    ck_assert_uint_eq(s.disk_rejected, 0);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_stray_file_ignored)
{
    /* Files that are not entries (another tool's, a leftover temporary)
     * neither break loading nor get loaded. */
    char dir[PATH_MAX], junk[PATH_MAX * 2];
    path_in(dir, sizeof dir, root, "c");
    ck_assert_int_eq(mkdir(dir, 0700), 0);
    path_in(junk, sizeof junk, dir, "tensor-0000000000000000.bin");
    spew_text(junk, "not a cache entry");
    atmoe_context *ctx = context_on(dir);
    fill_ok(ctx, 3.0);
    atmoe_cache_stats s = stats_of(ctx);
    ck_assert_uint_eq(s.builds, 1);
    ck_assert_uint_eq(s.disk_rejected, 0);
    atmoe_context_free(ctx);
    ck_assert_int_eq(count_bins(dir, NULL, 0), 2);
}
END_TEST

/* -------------------------------------------------- unusable directories */

START_TEST(test_unwritable_env_dir)
{
    /* Tests run as root, for whom permissions stop nothing; a directory
     * below a regular file cannot be created by anyone. */
    char afile[PATH_MAX], bad[PATH_MAX * 2];
    path_in(afile, sizeof afile, root, "afile");
    spew_text(afile, "a file, not a directory\n");
    path_in(bad, sizeof bad, afile, "sub");

    memset(&warned, 0, sizeof warned);
    ck_assert_status(atmoe_log_set(record_warning, NULL, ATMOE_LOG_WARNING),
                     NULL);
    /* Succeeds without a message for the caller, but says so in the log. */
    atmoe_context *ctx = context_on(bad);
    ck_assert_status(atmoe_log_set(NULL, NULL, ATMOE_LOG_ERROR), NULL);
    ck_assert_msg(warned.warnings >= 1, "unusable cache dir not logged");
    ck_assert_msg(strstr(warned.last, bad) != NULL, "warning: %s",
                  warned.last);
    atmoe_cache_stats s = stats_of(ctx);
    ck_assert_int_eq(s.disk_enabled, 0);
    ck_assert_str_eq(s.dir, "");

    /* Kernels still work, built in memory and stored nowhere. */
    fill_ok(ctx, 6.0);
    s = stats_of(ctx);
    ck_assert_uint_eq(s.builds, 1);
    ck_assert_uint_eq(s.disk_writes, 0);
    ck_assert_uint_eq(s.disk_hits, 0);
    fill_ok(ctx, 6.5);
    ck_assert_uint_eq(stats_of(ctx).builds, 1);

    /* The same path through the API is an IO_ERROR that says why. */
    ck_assert_fails(atmoe_context_set_cache_dir(ctx, bad), ctx,
                    ATMOE_STATUS_IO_ERROR);
    ck_assert_msg(strstr(atmoe_errmsg(ctx), bad) != NULL, "message: %s",
                  atmoe_errmsg(ctx));
    ck_assert_int_eq(stats_of(ctx).disk_enabled, 0);
    /* So is a regular file named as the directory. */
    ck_assert_fails(atmoe_context_set_cache_dir(ctx, afile), ctx,
                    ATMOE_STATUS_IO_ERROR);
    ck_assert_int_eq(stats_of(ctx).disk_enabled, 0);
    /* The context stays usable. */
    fill_ok(ctx, 8.0);
    atmoe_context_free(ctx);

    /* Nothing was created or replaced on the way. */
    struct stat sb;
    ck_assert_int_eq(stat(afile, &sb), 0);
    ck_assert(S_ISREG(sb.st_mode));
}
END_TEST

START_TEST(test_set_cache_dir)
{
    char good[PATH_MAX], afile[PATH_MAX], bad[PATH_MAX * 2];
    path_in(good, sizeof good, root, "set/here");
    path_in(afile, sizeof afile, root, "afile");
    spew_text(afile, "x");
    path_in(bad, sizeof bad, afile, "sub");

    atmoe_context *ctx = context_on(""); /* starts without a disk cache */
    ck_assert_int_eq(stats_of(ctx).disk_enabled, 0);

    /* A usable directory (created on demand) switches the cache on, and
     * stores go there. */
    ck_assert_status(atmoe_context_set_cache_dir(ctx, good), ctx);
    atmoe_cache_stats s = stats_of(ctx);
    ck_assert_int_eq(s.disk_enabled, 1);
    ck_assert_str_eq(s.dir, good);
    ck_assert(is_dir(good));
    fill_ok(ctx, 1.25);
    s = stats_of(ctx);
    ck_assert_uint_eq(s.builds, 1);
    ck_assert_uint_eq(s.disk_writes, 1);
    ck_assert_int_eq(count_bins(good, NULL, 0), 1);

    /* An unusable one switches it off, says why, breaks nothing. */
    ck_assert_fails(atmoe_context_set_cache_dir(ctx, bad), ctx,
                    ATMOE_STATUS_IO_ERROR);
    s = stats_of(ctx);
    ck_assert_int_eq(s.disk_enabled, 0);
    ck_assert_str_eq(s.dir, "");
    fill_ok(ctx, 2.25);

    /* Back on, then NULL switches it off without complaint. */
    ck_assert_status(atmoe_context_set_cache_dir(ctx, good), ctx);
    ck_assert_int_eq(stats_of(ctx).disk_enabled, 1);
    ck_assert_status(atmoe_context_set_cache_dir(ctx, NULL), ctx);
    s = stats_of(ctx);
    ck_assert_int_eq(s.disk_enabled, 0);
    ck_assert_str_eq(s.dir, "");

    /* A name too long for the stats is refused rather than cut. */
    char longdir[1024];
    int n = snprintf(longdir, sizeof longdir, "%s/", root);
    memset(longdir + n, 'd', sizeof longdir - (size_t)n - 1);
    longdir[sizeof longdir - 1] = '\0';
    ck_assert_fails(atmoe_context_set_cache_dir(ctx, longdir), ctx,
                    ATMOE_STATUS_IO_ERROR);
    ck_assert_int_eq(stats_of(ctx).disk_enabled, 0);

    /* Counters describe the context's life, not the directory's. */
    s = stats_of(ctx);
    ck_assert_uint_eq(s.builds, 1);
    ck_assert_uint_eq(s.disk_writes, 1);
    fill_ok(ctx, 3.25);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_env_empty_disables)
{
    atmoe_context *ctx = context_on("");
    atmoe_cache_stats s = stats_of(ctx);
    ck_assert_int_eq(s.disk_enabled, 0);
    ck_assert_str_eq(s.dir, "");
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_default_dir)
{
    /* Without ATMOE_CACHE_DIR: $XDG_CACHE_HOME/atmoe, else
     * $HOME/.cache/atmoe.  Opening a context needs no kernel. */
    char xdg[PATH_MAX], home[PATH_MAX], want[PATH_MAX * 2];
    path_in(xdg, sizeof xdg, root, "xdg");
    path_in(home, sizeof home, root, "home");
    unsetenv("ATMOE_CACHE_DIR");

    ck_assert_int_eq(setenv("XDG_CACHE_HOME", xdg, 1), 0);
    ck_assert_int_eq(setenv("HOME", home, 1), 0);
    atmoe_context *ctx = test_context();
    path_in(want, sizeof want, xdg, "atmoe");
    atmoe_cache_stats s = stats_of(ctx);
    ck_assert_int_eq(s.disk_enabled, 1);
    ck_assert_str_eq(s.dir, want);
    ck_assert(is_dir(want));
    atmoe_context_free(ctx);

    /* A relative XDG_CACHE_HOME is invalid by the XDG rules: ignored. */
    const char *xdgs[] = {NULL, "", "relative/cache"};
    for (size_t i = 0; i < sizeof xdgs / sizeof xdgs[0]; i++) {
        if (xdgs[i])
            ck_assert_int_eq(setenv("XDG_CACHE_HOME", xdgs[i], 1), 0);
        else
            unsetenv("XDG_CACHE_HOME");
        ctx = test_context();
        path_in(want, sizeof want, home, ".cache/atmoe");
        s = stats_of(ctx);
        ck_assert_int_eq(s.disk_enabled, 1);
        ck_assert_str_eq(s.dir, want);
        atmoe_context_free(ctx);
    }
    ck_assert(is_dir(want));
}
END_TEST

/* ------------------------------------------------------ ATMOE_KERNEL_DIR */

/* A tensor.cl of our own whose fill_f32 has the real kernel's signature but
 * writes value + 1, so that its use is visible in the numbers. */
static const char plus_one_source[] =
    "inline ulong element_offset(ulong i, uint4 shape, ulong4 stride)\n"
    "{\n"
    "    ulong i3 = i % shape.w;\n"
    "    i /= shape.w;\n"
    "    ulong i2 = i % shape.z;\n"
    "    i /= shape.z;\n"
    "    ulong i1 = i % shape.y;\n"
    "    ulong i0 = i / shape.y;\n"
    "    return i0 * stride.x + i1 * stride.y + i2 * stride.z +\n"
    "           i3 * stride.w;\n"
    "}\n"
    "\n"
    "__kernel void fill_f32(__global float *dst, ulong dst_offset,\n"
    "                       ulong4 dst_stride, uint4 shape, ulong count,\n"
    "                       float value)\n"
    "{\n"
    "    ulong i = get_global_id(0);\n"
    "    if (i >= count)\n"
    "        return;\n"
    "    dst[dst_offset + element_offset(i, shape, dst_stride)] =\n"
    "        value + 1.0f;\n"
    "}\n";

static const char broken_source[] =
    "__kernel void fill_f32(__global float *dst, ulong dst_offset,\n"
    "                       ulong4 dst_stride, uint4 shape, ulong count,\n"
    "                       float value)\n"
    "{\n"
    "    dst[0] = atmoe_test_undeclared_identifier;\n"
    "}\n";

static void write_kernel_dir(char *kdir, size_t size, const char *name,
                             const char *source)
{
    char file[PATH_MAX * 2];
    path_in(kdir, size, root, name);
    ck_assert_int_eq(mkdir(kdir, 0700), 0);
    if (source) {
        path_in(file, sizeof file, kdir, "tensor.cl");
        spew_text(file, source);
    }
}

START_TEST(test_kernel_dir_override)
{
    char kdir[PATH_MAX], empty[PATH_MAX], cache[PATH_MAX];
    write_kernel_dir(kdir, sizeof kdir, "kernels", plus_one_source);
    write_kernel_dir(empty, sizeof empty, "no-kernels", NULL);
    /* A fresh cache, so no binary of the real source can answer. */
    path_in(cache, sizeof cache, root, "kc");

    /* The variable stays set until the kernels are built: sources are
     * read when a program is first needed. */
    ck_assert_int_eq(setenv("ATMOE_KERNEL_DIR", kdir, 1), 0);
    atmoe_context *ctx = context_on(cache);
    fill_expect(ctx, 2.0, 3.0f);
    atmoe_cache_stats s = stats_of(ctx);
    ck_assert_uint_eq(s.builds, 1);
    ck_assert_uint_eq(s.disk_writes, 1);
    atmoe_context_free(ctx);

    /* The override's binary is cached like any other. */
    ctx = context_on(cache);
    fill_expect(ctx, 2.0, 3.0f);
    ck_assert_uint_eq(stats_of(ctx).disk_hits, 1);
    atmoe_context_free(ctx);

    /* Without the variable the embedded source is back, and the cache key
     * tells the two binaries apart. */
    unsetenv("ATMOE_KERNEL_DIR");
    ctx = context_on(cache);
    fill_expect(ctx, 2.0, 2.0f);
    s = stats_of(ctx);
    ck_assert_uint_eq(s.builds, 1);
    ck_assert_uint_eq(s.disk_hits, 0);
    atmoe_context_free(ctx);
    ck_assert_int_eq(count_bins(cache, NULL, 0), 2);

    /* A kernel directory without tensor.cl falls back to the embedded
     * source (and so finds its cached binary). */
    ck_assert_int_eq(setenv("ATMOE_KERNEL_DIR", empty, 1), 0);
    ctx = context_on(cache);
    fill_expect(ctx, 2.0, 2.0f);
    ck_assert_uint_eq(stats_of(ctx).disk_hits, 1);
    atmoe_context_free(ctx);
    unsetenv("ATMOE_KERNEL_DIR");
}
END_TEST

START_TEST(test_kernel_dir_build_failure)
{
    char kdir[PATH_MAX], cache[PATH_MAX];
    write_kernel_dir(kdir, sizeof kdir, "broken", broken_source);
    path_in(cache, sizeof cache, root, "bc");
    ck_assert_int_eq(setenv("ATMOE_KERNEL_DIR", kdir, 1), 0);
    atmoe_context *ctx = context_on(cache);

    size_t shape[1] = {16};
    atmoe_tensor *t = NULL;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 1, shape, &t),
                     ctx);
    ck_assert_fails(atmoe_tensor_fill(t, 1.0), ctx,
                    ATMOE_STATUS_BUILD_FAILED);
    /* The compiler's own words, naming the culprit, reach the caller. */
    const char *msg = atmoe_errmsg(ctx);
    ck_assert_msg(strstr(msg, "atmoe_test_undeclared_identifier") != NULL,
                  "no build log in the message: %s", msg);
    ck_assert_msg(strstr(msg, "tensor") != NULL, "program not named: %s",
                  msg);

    /* A failure is not cached: the next call tries again and fails the
     * same way. */
    ck_assert_fails(atmoe_tensor_fill(t, 1.0), ctx,
                    ATMOE_STATUS_BUILD_FAILED);
    atmoe_cache_stats s = stats_of(ctx);
    ck_assert_uint_eq(s.builds, 0);
    ck_assert_uint_eq(s.disk_writes, 0);
    ck_assert_uint_eq(s.memory_hits, 0);
    ck_assert_int_eq(count_bins(cache, NULL, 0), 0);

    /* What needs no kernel still works. */
    float in[16], out[16];
    for (int i = 0; i < 16; i++)
        in[i] = (float)i;
    ck_assert_status(atmoe_tensor_write(t, in, sizeof in), ctx);
    ck_assert_status(atmoe_tensor_read(t, out, sizeof out), ctx);
    ck_assert_mem_eq(in, out, sizeof in);
    atmoe_tensor_free(t);
    atmoe_context_free(ctx);
    unsetenv("ATMOE_KERNEL_DIR");
}
END_TEST

/* ------------------------------------------------ trust and special files */

/* Another user's uid for chown: only root can give files away, so the
 * tests that need it check nothing for others. */
#define OTHER_UID 65534

/* A directory that group or others may write is not used, whether from the
 * environment or through the API, and the log says why (issue 16). */
START_TEST(test_group_writable_dir)
{
    char dir[PATH_MAX];
    path_in(dir, sizeof dir, root, "shared");
    ck_assert_int_eq(mkdir(dir, 0700), 0);
    ck_assert_int_eq(chmod(dir, 0770), 0);
    memset(&warned, 0, sizeof warned);
    ck_assert_status(atmoe_log_set(record_warning, NULL, ATMOE_LOG_WARNING),
                     NULL);
    atmoe_context *ctx = context_on(dir);
    ck_assert_msg(strstr(warned.last, "writable by group or others") != NULL,
                  "warning: %s", warned.last);
    ck_assert_int_eq(stats_of(ctx).disk_enabled, 0);
    fill_ok(ctx, 1.5);
    ck_assert_uint_eq(stats_of(ctx).disk_writes, 0);
    ck_assert_fails(atmoe_context_set_cache_dir(ctx, dir), ctx,
                    ATMOE_STATUS_IO_ERROR);
    ck_assert_ptr_nonnull(strstr(atmoe_errmsg(ctx), "group or others"));
    /* Made private, it is used. */
    ck_assert_int_eq(chmod(dir, 0700), 0);
    ck_assert_status(atmoe_context_set_cache_dir(ctx, dir), ctx);
    ck_assert_int_eq(stats_of(ctx).disk_enabled, 1);
    atmoe_context_free(ctx);
    ck_assert_int_eq(count_bins(dir, NULL, 0), 0);
}
END_TEST

/* A directory of another user is not used; an entry of another user in
 * our own directory (a forged one: right key, right checksum) is not
 * run but rebuilt. */
START_TEST(test_foreign_owner)
{
    if (geteuid() != 0)
        return; /* cannot give a file away */
    char dir[PATH_MAX], bin[PATH_MAX * 2];
    path_in(dir, sizeof dir, root, "theirs");
    ck_assert_int_eq(mkdir(dir, 0700), 0);
    ck_assert_int_eq(chown(dir, OTHER_UID, OTHER_UID), 0);
    memset(&warned, 0, sizeof warned);
    ck_assert_status(atmoe_log_set(record_warning, NULL, ATMOE_LOG_WARNING),
                     NULL);
    atmoe_context *ctx = context_on(dir);
    ck_assert_msg(strstr(warned.last, "not by this user") != NULL,
                  "warning: %s", warned.last);
    ck_assert_int_eq(stats_of(ctx).disk_enabled, 0);
    atmoe_context_free(ctx);

    path_in(dir, sizeof dir, root, "ours");
    ctx = context_on(dir);
    fill_ok(ctx, 1.0);
    atmoe_context_free(ctx);
    ck_assert_int_eq(count_bins(dir, bin, sizeof bin), 1);
    ck_assert_int_eq(chown(bin, OTHER_UID, OTHER_UID), 0);
    ctx = context_on(dir);
    fill_ok(ctx, 2.0);
    atmoe_cache_stats st = stats_of(ctx);
    ck_assert_uint_eq(st.disk_hits, 0);
    ck_assert_uint_eq(st.disk_rejected, 1);
    ck_assert_uint_eq(st.builds, 1);
    ck_assert_msg(strstr(warned.last, "not owned by this user") != NULL,
                  "warning: %s", warned.last);
    atmoe_context_free(ctx);
    /* The rebuilt entry replaced it, and is ours. */
    struct stat sb;
    ck_assert_int_eq(stat(bin, &sb), 0);
    ck_assert_uint_eq(sb.st_uid, geteuid());
}
END_TEST

/* A FIFO or a directory at an entry's path is rejected at once, never
 * waited on or read. */
START_TEST(test_special_entry)
{
    char dir[PATH_MAX], bin[PATH_MAX * 2];
    path_in(dir, sizeof dir, root, "c");
    atmoe_context *ctx = context_on(dir);
    fill_ok(ctx, 1.0);
    atmoe_context_free(ctx);
    ck_assert_int_eq(count_bins(dir, bin, sizeof bin), 1);
    for (int k = 0; k < 2; k++) {
        ck_assert_int_eq(unlink(bin), 0);
        ck_assert_int_eq(k == 0 ? mkfifo(bin, 0600) : mkdir(bin, 0700), 0);
        alarm(60); /* a hang fails the test instead of the run */
        ctx = context_on(dir);
        fill_ok(ctx, 2.0);
        alarm(0);
        atmoe_cache_stats st = stats_of(ctx);
        ck_assert_uint_eq(st.disk_rejected, 1);
        ck_assert_uint_eq(st.builds, 1);
        atmoe_context_free(ctx);
        if (k == 1)
            ck_assert_int_eq(rmdir(bin), 0);
    }
}
END_TEST

/* A kernel source in ATMOE_KERNEL_DIR that is a FIFO or a directory is an
 * I/O error that says what it is (a directory read as out of host memory
 * before). */
START_TEST(test_kernel_dir_special_file)
{
    char kdir[PATH_MAX], file[PATH_MAX * 2], cache[PATH_MAX];
    write_kernel_dir(kdir, sizeof kdir, "special", NULL);
    path_in(file, sizeof file, kdir, "tensor.cl");
    path_in(cache, sizeof cache, root, "sc");
    ck_assert_int_eq(setenv("ATMOE_KERNEL_DIR", kdir, 1), 0);
    static const char *const says[] = {"not a regular file", "directory"};
    for (int k = 0; k < 2; k++) {
        ck_assert_int_eq(k == 0 ? mkfifo(file, 0600) : mkdir(file, 0700), 0);
        atmoe_context *ctx = context_on(cache);
        size_t shape[1] = {5};
        atmoe_tensor *t = NULL;
        ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 1, shape, &t),
                         ctx);
        alarm(60);
        ck_assert_fails(atmoe_tensor_fill(t, 1.0), ctx,
                        ATMOE_STATUS_IO_ERROR);
        alarm(0);
        ck_assert_msg(strstr(atmoe_errmsg(ctx), says[k]) != NULL,
                      "message: %s", atmoe_errmsg(ctx));
        ck_assert_ptr_nonnull(strstr(atmoe_errmsg(ctx), file));
        atmoe_tensor_free(t);
        atmoe_context_free(ctx);
        ck_assert_int_eq(k == 0 ? unlink(file) : rmdir(file), 0);
    }
    unsetenv("ATMOE_KERNEL_DIR");
}
END_TEST

static Suite *cache_suite(void)
{
    Suite *s = suite_create("cache");

    TCase *tc = tcase_create("hits");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_build_store_and_hits);
    tcase_add_test(tc, test_contexts_share_directory);
    suite_add_tcase(s, tc);

    tc = tcase_create("corrupt");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_loop_test(tc, test_corrupt_entry, 0, CORRUPTION_COUNT);
    tcase_add_test(tc, test_stray_file_ignored);
    suite_add_tcase(s, tc);

    tc = tcase_create("directory");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_unwritable_env_dir);
    tcase_add_test(tc, test_set_cache_dir);
    tcase_add_test(tc, test_env_empty_disables);
    tcase_add_test(tc, test_default_dir);
    suite_add_tcase(s, tc);

    tc = tcase_create("kernel_dir");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_kernel_dir_override);
    tcase_add_test(tc, test_kernel_dir_build_failure);
    tcase_add_test(tc, test_kernel_dir_special_file);
    suite_add_tcase(s, tc);

    tc = tcase_create("trust");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_group_writable_dir);
    tcase_add_test(tc, test_foreign_owner);
    tcase_add_test(tc, test_special_entry);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(cache_suite());
}
