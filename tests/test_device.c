/* Device enumeration and selection: the device list, every selection route,
 * the ATMOE_DEVICE override and argument checks.  The expected answers are
 * worked out from atmoe_device_get_info, so the tests hold on any machine
 * with at least one device (PoCL's CPU device here). */
#define _GNU_SOURCE
#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "testutil.h"

static int contains_nocase(const char *haystack, const char *needle)
{
    return strcasestr(haystack, needle) != NULL;
}

static int is_pocl(const atmoe_device_info *d)
{
    return contains_nocase(d->platform_name, "Portable Computing Language") ||
           contains_nocase(d->platform_name, "pocl");
}

static size_t device_count(void)
{
    size_t n = 0;
    ck_assert_status(atmoe_device_get_count(&n), NULL);
    return n;
}

static atmoe_device_info device_info(size_t index)
{
    atmoe_device_info info;
    memset(&info, 0xA5, sizeof info); /* nothing may survive from before */
    ck_assert_status(atmoe_device_get_info(index, &info), NULL);
    return info;
}

/* The first device of the given type, or -1. */
static long first_of_type(atmoe_device_type type)
{
    size_t n = device_count();
    for (size_t i = 0; i < n; i++)
        if (device_info(i).type == type)
            return (long)i;
    return -1;
}

/* Whether the tests run on CI (.ci/run sets CI=true, as CI services do),
 * where a missing device is a broken machine, not a reason to skip. */
static int on_ci(void)
{
    const char *v = getenv("CI");
    return v && *v && strcmp(v, "0") != 0 && strcasecmp(v, "false") != 0;
}

/* A test that needs PoCL's CPU device found none: on CI that fails the
 * test; elsewhere the test is skipped, saying so on stderr. */
static void pocl_missing(const char *test)
{
    static const char what[] =
        "PoCL's CPU device (Debian package pocl-opencl-icd) is missing";
    if (on_ci())
        ck_abort_msg("%s: %s", test, what);
    fprintf(stderr, "%s: skipped: %s\n", test, what);
}

/* ATMOE_DEVICE is process-wide; every test leaves it as it found it. */
static char *saved_device_env;

static void env_setup(void)
{
    const char *v = getenv("ATMOE_DEVICE");
    saved_device_env = v ? strdup(v) : NULL;
    unsetenv("ATMOE_DEVICE");
}

static void env_teardown(void)
{
    if (saved_device_env)
        setenv("ATMOE_DEVICE", saved_device_env, 1);
    else
        unsetenv("ATMOE_DEVICE");
    free(saved_device_env);
    saved_device_env = NULL;
}

/* -------------------------------------------------------------- the list */

START_TEST(test_count)
{
    size_t n = 12345;
    ck_assert_status(atmoe_device_get_count(&n), NULL);
    ck_assert_msg(n >= 1, "no OpenCL device (is pocl-opencl-icd installed?)");
    ck_assert_msg(n <= 64, "implausible device count %zu", n);
    /* The list is enumerated once: a second call agrees. */
    size_t again = 0;
    ck_assert_status(atmoe_device_get_count(&again), NULL);
    ck_assert_uint_eq(n, again);
}
END_TEST

static void check_terminated(const char *field, size_t size, const char *what)
{
    ck_assert_msg(memchr(field, '\0', size) != NULL, "%s is not terminated",
                  what);
}

START_TEST(test_info_filled)
{
    size_t n = device_count();
    for (size_t i = 0; i < n; i++) {
        atmoe_device_info d = device_info(i);
        check_terminated(d.name, sizeof d.name, "name");
        check_terminated(d.raw_name, sizeof d.raw_name, "raw_name");
        check_terminated(d.vendor_name, sizeof d.vendor_name, "vendor_name");
        check_terminated(d.platform_name, sizeof d.platform_name,
                         "platform_name");
        check_terminated(d.platform_version, sizeof d.platform_version,
                         "platform_version");
        check_terminated(d.driver_version, sizeof d.driver_version,
                         "driver_version");
        ck_assert_uint_eq(d.index, i);
        ck_assert_msg(d.name[0] != '\0', "device %zu has no name", i);
        ck_assert_msg(d.raw_name[0] != '\0', "device %zu has no raw name", i);
        ck_assert_msg(d.platform_name[0] != '\0', "device %zu: no platform",
                      i);
        ck_assert_uint_gt(d.compute_units, 0);
        ck_assert_uint_gt(d.global_mem_bytes, 0);
        ck_assert_uint_gt(d.max_alloc_bytes, 0);
        ck_assert_uint_le(d.max_alloc_bytes, d.global_mem_bytes);
        ck_assert_uint_gt(d.max_work_group_size, 0);
        ck_assert(d.fp16 == 0 || d.fp16 == 1);
        ck_assert(d.fp64 == 0 || d.fp64 == 1);
        ck_assert_msg((unsigned)d.vendor <= ATMOE_VENDOR_POCL,
                      "vendor %d outside the enum", (int)d.vendor);
        ck_assert_msg((unsigned)d.type <= ATMOE_DEVICE_TYPE_ACCELERATOR,
                      "type %d outside the enum", (int)d.type);

        /* The normalised name differs from the driver's only by PoCL's
         * "pthread-" prefix. */
        if (strncmp(d.raw_name, "pthread-", 8) == 0)
            ck_assert_str_eq(d.name, d.raw_name + 8);
        else
            ck_assert_str_eq(d.name, d.raw_name);
        ck_assert_msg(strncmp(d.name, "pthread-", 8) != 0,
                      "name '%s' keeps the pthread- prefix", d.name);

        /* The vendor enum agrees with the strings it was derived from. */
        if (is_pocl(&d))
            ck_assert_msg(d.vendor == ATMOE_VENDOR_POCL,
                          "platform '%s' classified as %s", d.platform_name,
                          atmoe_vendor_name(d.vendor));
        else if (d.vendor == ATMOE_VENDOR_NVIDIA)
            ck_assert(contains_nocase(d.vendor_name, "nvidia"));
        else if (d.vendor == ATMOE_VENDOR_INTEL)
            ck_assert(contains_nocase(d.vendor_name, "intel"));
        else if (d.vendor == ATMOE_VENDOR_AMD)
            ck_assert(contains_nocase(d.vendor_name, "amd") ||
                      contains_nocase(d.vendor_name, "advanced micro"));
        else
            ck_assert_msg(d.vendor == ATMOE_VENDOR_OTHER,
                          "non-PoCL platform '%s' classified as PoCL",
                          d.platform_name);

        /* PoCL's pthread (CPU) driver is a CPU device. */
        if (is_pocl(&d) && strncmp(d.raw_name, "pthread-", 8) == 0)
            ck_assert_msg(d.type == ATMOE_DEVICE_TYPE_CPU,
                          "PoCL pthread device of type %s",
                          atmoe_device_type_name(d.type));
    }
}
END_TEST

START_TEST(test_info_out_of_range)
{
    size_t n = device_count();
    atmoe_device_info d;
    atmoe_status st = atmoe_device_get_info(n, &d);
    ck_assert_msg(st == ATMOE_STATUS_DEVICE_NOT_FOUND ||
                      st == ATMOE_STATUS_OUT_OF_RANGE,
                  "get_info(count) -> %s", atmoe_status_name(st));
    ck_assert(atmoe_errmsg(NULL)[0] != '\0');
    st = atmoe_device_get_info((size_t)-1, &d);
    ck_assert(st == ATMOE_STATUS_DEVICE_NOT_FOUND ||
              st == ATMOE_STATUS_OUT_OF_RANGE);
}
END_TEST

typedef struct enum_probe {
    atmoe_status status;
    size_t count;
    size_t found;
    char name[256];
} enum_probe;

static void *enumerate_thread(void *arg)
{
    enum_probe *p = arg;
    atmoe_device_info d;
    p->status = atmoe_device_get_count(&p->count);
    if (p->status == ATMOE_STATUS_OK)
        p->status = atmoe_device_get_info(0, &d);
    if (p->status == ATMOE_STATUS_OK) {
        snprintf(p->name, sizeof p->name, "%s", d.name);
        p->status = atmoe_device_find("0", &p->found);
    }
    return NULL;
}

START_TEST(test_concurrent_first_use)
{
    /* The first call enumerates (each test runs in a fresh process with
     * CK_FORK): racing threads must all see the same complete list. */
    enum { T = 6 };
    pthread_t t[T];
    enum_probe p[T];
    memset(p, 0, sizeof p);
    for (int i = 0; i < T; i++)
        ck_assert_int_eq(pthread_create(&t[i], NULL, enumerate_thread, &p[i]),
                         0);
    for (int i = 0; i < T; i++)
        ck_assert_int_eq(pthread_join(t[i], NULL), 0);
    for (int i = 0; i < T; i++) {
        ck_assert_int_eq(p[i].status, ATMOE_STATUS_OK);
        ck_assert_uint_ge(p[i].count, 1);
        ck_assert_uint_eq(p[i].count, p[0].count);
        ck_assert_uint_eq(p[i].found, 0);
        ck_assert_str_eq(p[i].name, p[0].name);
    }
}
END_TEST

/* ---------------------------------------------------------------- find */

static size_t find_ok(const char *sel)
{
    size_t index = 9999;
    atmoe_status st = atmoe_device_find(sel, &index);
    ck_assert_msg(st == ATMOE_STATUS_OK, "find('%s') -> %s: %s", sel,
                  atmoe_status_name(st), atmoe_errmsg(NULL));
    ck_assert_uint_lt(index, device_count());
    return index;
}

static void find_fails(const char *sel, atmoe_status want, const char *quote)
{
    size_t index = 0;
    atmoe_status st = atmoe_device_find(sel, &index);
    ck_assert_msg(st == want, "find('%s') -> %s, expected %s", sel,
                  atmoe_status_name(st), atmoe_status_name(want));
    const char *msg = atmoe_errmsg(NULL);
    ck_assert_msg(msg[0] != '\0', "find('%s') failed without a message",
                  sel);
    if (quote)
        ck_assert_msg(strstr(msg, quote) != NULL,
                      "message for '%s' does not quote '%s': %s", sel, quote,
                      msg);
}

START_TEST(test_find_index)
{
    size_t n = device_count();
    for (size_t i = 0; i < n; i++) {
        char sel[32];
        snprintf(sel, sizeof sel, "%zu", i);
        ck_assert_uint_eq(find_ok(sel), i);
    }
    ck_assert_uint_eq(find_ok("0"), 0);
    find_fails("999", ATMOE_STATUS_DEVICE_NOT_FOUND, "999");
    char past[32];
    snprintf(past, sizeof past, "%zu", n);
    find_fails(past, ATMOE_STATUS_DEVICE_NOT_FOUND, past);
    /* Too many digits for a size_t: not a wrapped-around small index. */
    find_fails("99999999999999999999999999", ATMOE_STATUS_DEVICE_NOT_FOUND,
               NULL);
}
END_TEST

START_TEST(test_find_default)
{
    size_t def = 9999;
    ck_assert_status(atmoe_device_get_default(&def), NULL);
    ck_assert_uint_lt(def, device_count());
    ck_assert_uint_eq(find_ok("default"), def);
    ck_assert_uint_eq(find_ok(""), def);
    /* The documented preference: first GPU, else first CPU, else 0. */
    long gpu = first_of_type(ATMOE_DEVICE_TYPE_GPU);
    long cpu = first_of_type(ATMOE_DEVICE_TYPE_CPU);
    size_t want = gpu >= 0 ? (size_t)gpu : cpu >= 0 ? (size_t)cpu : 0;
    ck_assert_uint_eq(def, want);
}
END_TEST

START_TEST(test_find_type)
{
    static const struct {
        const char *word;
        atmoe_device_type type;
    } types[] = {{"cpu", ATMOE_DEVICE_TYPE_CPU},
                 {"gpu", ATMOE_DEVICE_TYPE_GPU},
                 {"accelerator", ATMOE_DEVICE_TYPE_ACCELERATOR}};
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        long want = first_of_type(types[t].type);
        if (want >= 0) {
            size_t got = find_ok(types[t].word);
            ck_assert_uint_eq(got, (size_t)want);
            ck_assert_int_eq(device_info(got).type, types[t].type);
        } else {
            /* No fallback to another type: asking for a GPU on a
             * CPU-only machine is an error that says so. */
            find_fails(types[t].word, ATMOE_STATUS_DEVICE_NOT_FOUND,
                       types[t].word);
        }
    }
    /* PoCL's pthread device is a CPU: where PoCL is, "cpu" finds one. */
    size_t n = device_count();
    for (size_t i = 0; i < n; i++) {
        atmoe_device_info d = device_info(i);
        if (is_pocl(&d) && strncmp(d.raw_name, "pthread-", 8) == 0)
            ck_assert_int_ge(first_of_type(ATMOE_DEVICE_TYPE_CPU), 0);
    }
}
END_TEST

START_TEST(test_find_name)
{
    size_t n = device_count();
    atmoe_device_info d0 = device_info(0);
    /* A piece of the real name, case swapped, so that only a
     * case-insensitive substring match finds it. */
    size_t len = strlen(d0.name);
    size_t from = len > 4 ? 1 : 0;
    size_t take = len - from < 6 ? len - from : 6;
    char piece[16] = {0};
    memcpy(piece, d0.name + from, take);
    for (char *p = piece; *p; p++)
        *p = islower((unsigned char)*p) ? (char)toupper((unsigned char)*p)
                                        : (char)tolower((unsigned char)*p);
    char sel[32];
    snprintf(sel, sizeof sel, "name:%s", piece);
    size_t want = n;
    for (size_t i = 0; i < n && want == n; i++) {
        atmoe_device_info d = device_info(i);
        if (contains_nocase(d.name, piece) ||
            contains_nocase(d.raw_name, piece))
            want = i;
    }
    ck_assert_uint_eq(want, 0); /* device 0 contains it */
    ck_assert_uint_eq(find_ok(sel), want);
    /* Without the prefix the same text finds the same device. */
    ck_assert_uint_eq(find_ok(piece), want);
    /* The whole normalised name, exactly. */
    snprintf(sel, sizeof sel, "name:%.26s", d0.name);
    ck_assert_uint_eq(find_ok(sel), 0);

    find_fails("name:no-such-device-xyz", ATMOE_STATUS_DEVICE_NOT_FOUND,
               "no-such-device-xyz");
}
END_TEST

START_TEST(test_find_name_only)
{
    /* "name:" restricts the match to the device name: a platform word that
     * no device name contains matches nothing. */
    size_t n = device_count();
    for (size_t i = 0; i < n; i++) {
        atmoe_device_info d = device_info(i);
        if (contains_nocase(d.raw_name, "Portable"))
            return; /* cannot tell on this machine */
    }
    int any_pocl = 0;
    for (size_t i = 0; i < n; i++) {
        atmoe_device_info d = device_info(i);
        any_pocl |= contains_nocase(d.platform_name, "Portable");
    }
    if (!any_pocl) {
        pocl_missing("test_find_name_only");
        return;
    }
    find_ok("Portable");
    find_fails("name:Portable", ATMOE_STATUS_DEVICE_NOT_FOUND, "Portable");
}
END_TEST

START_TEST(test_find_vendor_platform)
{
    size_t n = device_count();
    long pocl = -1;
    for (size_t i = 0; i < n && pocl < 0; i++) {
        atmoe_device_info d = device_info(i);
        if (d.vendor == ATMOE_VENDOR_POCL)
            pocl = (long)i;
    }
    /* "pocl" is in the vendor enum's name, "Portable" in the platform's;
     * matching ignores case.  The first match may be a device before the
     * PoCL one only if it matches too.  Without PoCL, the first device's
     * platform name serves. */
    char platform[64];
    snprintf(platform, sizeof platform, "%.20s", device_info(0).platform_name);
    const char *pocl_sels[] = {"pocl", "PoCL", "POCL", "Portable",
                               "portable computing"};
    const char *other_sels[] = {platform};
    const char **sels = pocl >= 0 ? pocl_sels : other_sels;
    size_t nsel = pocl >= 0 ? sizeof pocl_sels / sizeof pocl_sels[0] : 1;
    size_t last = pocl >= 0 ? (size_t)pocl : 0;
    for (size_t k = 0; k < nsel; k++) {
        size_t got = find_ok(sels[k]);
        ck_assert_uint_le(got, last);
        atmoe_device_info d = device_info(got);
        ck_assert_msg(contains_nocase(d.raw_name, sels[k]) ||
                          contains_nocase(d.vendor_name, sels[k]) ||
                          contains_nocase(d.platform_name, sels[k]) ||
                          contains_nocase(atmoe_vendor_name(d.vendor),
                                          sels[k]),
                      "'%s' picked device %zu (%s), which does not match",
                      sels[k], got, d.name);
    }
}
END_TEST

START_TEST(test_find_nothing)
{
    find_fails("no-such-device-xyz", ATMOE_STATUS_DEVICE_NOT_FOUND,
               "no-such-device-xyz");
}
END_TEST

/* ---------------------------------------------------------- ATMOE_DEVICE */

START_TEST(test_env_valid)
{
    size_t n = device_count();
    size_t last = n - 1;
    char sel[32];
    snprintf(sel, sizeof sel, "%zu", last);
    ck_assert_int_eq(setenv("ATMOE_DEVICE", sel, 1), 0);
    size_t idx = 9999;
    ck_assert_status(atmoe_device_get_default(&idx), NULL);
    ck_assert_uint_eq(idx, last);
    /* "default" and "" go through the variable too. */
    ck_assert_uint_eq(find_ok("default"), last);
    ck_assert_uint_eq(find_ok(""), last);

    /* The context picks it when no device is named... */
    atmoe_context *ctx = NULL;
    ck_assert_status(atmoe_context_new(NULL, &ctx), NULL);
    atmoe_device_info d;
    ck_assert_status(atmoe_context_get_device(ctx, &d), ctx);
    ck_assert_uint_eq(d.index, last);
    atmoe_context_free(ctx);

    /* ...and a selection string, not only an index. */
    ck_assert_int_eq(setenv("ATMOE_DEVICE", "cpu", 1), 0);
    ck_assert_status(atmoe_device_get_default(&idx), NULL);
    ck_assert_uint_eq(idx, (size_t)first_of_type(ATMOE_DEVICE_TYPE_CPU));

    /* An empty value or "default" means "not set". */
    unsetenv("ATMOE_DEVICE");
    size_t plain = 0;
    ck_assert_status(atmoe_device_get_default(&plain), NULL);
    ck_assert_int_eq(setenv("ATMOE_DEVICE", "", 1), 0);
    ck_assert_status(atmoe_device_get_default(&idx), NULL);
    ck_assert_uint_eq(idx, plain);
    ck_assert_int_eq(setenv("ATMOE_DEVICE", "default", 1), 0);
    ck_assert_status(atmoe_device_get_default(&idx), NULL);
    ck_assert_uint_eq(idx, plain);
}
END_TEST

START_TEST(test_env_invalid)
{
    const char *bad[] = {"no-such-device-xyz", "999", "name:no-such-xyz"};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        ck_assert_int_eq(setenv("ATMOE_DEVICE", bad[k], 1), 0);
        size_t idx = 0;
        /* An error that names the variable, never a silent fallback. */
        ck_assert_fails(atmoe_device_get_default(&idx), NULL,
                        ATMOE_STATUS_DEVICE_NOT_FOUND);
        ck_assert_msg(strstr(atmoe_errmsg(NULL), "ATMOE_DEVICE") != NULL,
                      "message does not name ATMOE_DEVICE: %s",
                      atmoe_errmsg(NULL));
        ck_assert_fails(atmoe_device_find("default", &idx), NULL,
                        ATMOE_STATUS_DEVICE_NOT_FOUND);
        ck_assert_fails(atmoe_device_find("", &idx), NULL,
                        ATMOE_STATUS_DEVICE_NOT_FOUND);

        atmoe_context *ctx = (atmoe_context *)&idx; /* must be reset */
        ck_assert_fails(atmoe_context_new(NULL, &ctx), NULL,
                        ATMOE_STATUS_DEVICE_NOT_FOUND);
        ck_assert_ptr_null(ctx);
        ck_assert_msg(strstr(atmoe_errmsg(NULL), "ATMOE_DEVICE") != NULL,
                      "message does not name ATMOE_DEVICE: %s",
                      atmoe_errmsg(NULL));
        ck_assert_fails(atmoe_context_new("default", &ctx), NULL,
                        ATMOE_STATUS_DEVICE_NOT_FOUND);
        ck_assert_ptr_null(ctx);

        /* An explicit selection does not consult the variable. */
        ck_assert_uint_eq(find_ok("0"), 0);
        ck_assert_status(atmoe_context_new("0", &ctx), NULL);
        ck_assert_ptr_nonnull(ctx);
        atmoe_context_free(ctx);
    }
}
END_TEST

/* ---------------------------------------------------------------- NULLs */

START_TEST(test_null_arguments)
{
    size_t idx;
    ck_assert_fails(atmoe_device_get_count(NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_device_get_info(0, NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_device_find(NULL, &idx), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_device_find("0", NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_device_get_default(NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_context_new("0", NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    /* The argument checks come before anything else. */
    ck_assert_fails(atmoe_device_get_info(99999, NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
}
END_TEST

static Suite *device_suite(void)
{
    Suite *s = suite_create("device");

    TCase *tc = tcase_create("list");
    tcase_add_test(tc, test_count);
    tcase_add_test(tc, test_info_filled);
    tcase_add_test(tc, test_info_out_of_range);
    tcase_add_test(tc, test_concurrent_first_use);
    suite_add_tcase(s, tc);

    tc = tcase_create("find");
    tcase_add_checked_fixture(tc, env_setup, env_teardown);
    tcase_add_test(tc, test_find_index);
    tcase_add_test(tc, test_find_default);
    tcase_add_test(tc, test_find_type);
    tcase_add_test(tc, test_find_name);
    tcase_add_test(tc, test_find_name_only);
    tcase_add_test(tc, test_find_vendor_platform);
    tcase_add_test(tc, test_find_nothing);
    suite_add_tcase(s, tc);

    tc = tcase_create("env");
    tcase_add_checked_fixture(tc, env_setup, env_teardown);
    tcase_add_test(tc, test_env_valid);
    tcase_add_test(tc, test_env_invalid);
    suite_add_tcase(s, tc);

    tc = tcase_create("null");
    tcase_add_test(tc, test_null_arguments);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(device_suite());
}
