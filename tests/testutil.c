#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ftw.h>
#include <unistd.h>

#include "testutil.h"

void test_rng_seed(test_rng *rng, uint64_t seed)
{
    rng->state = seed * 0x9E3779B97F4A7C15ull + 1;
}

double test_uniform(test_rng *rng, double lo, double hi)
{
    uint64_t x = rng->state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng->state = x;
    double u = (double)((x * 0x2545F4914F6CDD1Dull) >> 11) /
               9007199254740992.0;
    return lo + (hi - lo) * u;
}

void test_fill_uniform(test_rng *rng, float *x, size_t n, double lo, double hi)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)test_uniform(rng, lo, hi);
}

void test_poison(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = NAN;
}

double test_max_rel_err(const float *got, const double *want, size_t n,
                        double floor)
{
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            return INFINITY;
        double e = fabs(got[i] - want[i]) / fmax(fabs(want[i]), floor);
        if (e > worst)
            worst = e;
    }
    return worst;
}

void *test_read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "fopen(%s): %s", path, strerror(errno));
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    ck_assert_int_ge(n, 0);
    rewind(f);
    unsigned char *buf = malloc((size_t)n + 1);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    buf[n] = '\0';
    if (size)
        *size = (size_t)n;
    return buf;
}

void test_write_file(const char *path, const void *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "fopen(%s): %s", path, strerror(errno));
    ck_assert_uint_eq(fwrite(data, 1, size, f), size);
    ck_assert_int_eq(fclose(f), 0);
}

void test_mkdtemp(char *path, size_t size, const char *tag)
{
    const char *base = getenv("ATMOE_TEST_TMPDIR");
    snprintf(path, size, "%s/tmp-%s-XXXXXX", base && *base ? base : "/tmp",
             tag);
    ck_assert_msg(mkdtemp(path) != NULL, "mkdtemp(%s) failed", path);
}

static int remove_entry(const char *path, const struct stat *sb, int flag,
                        struct FTW *ftw)
{
    return remove(path);
}

void test_rmdir_r(const char *path)
{
    nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

atmoe_context *test_context(void)
{
    atmoe_context *ctx = NULL;
    atmoe_status st = atmoe_context_new(NULL, &ctx);
    ck_assert_msg(st == ATMOE_STATUS_OK, "atmoe_context_new: %s: %s",
                  atmoe_status_name(st), atmoe_errmsg(NULL));
    return ctx;
}

atmoe_node test_marker(atmoe_context *ctx, atmoe_graph *g)
{
    static const float one = 1.0f;
    size_t shape[1] = {1};
    atmoe_node n = ATMOE_NODE_NONE;
    ck_assert_status(
        atmoe_graph_constant(g, NULL, ATMOE_DTYPE_F32, 1, shape, &one, &n),
        ctx);
    return n;
}

int test_run_suite(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
