/* Helpers shared by the test programs: deterministic random data, poison
 * values, float64 comparisons, and temporary directories. */
#ifndef ATMOE_TESTUTIL_H
#define ATMOE_TESTUTIL_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "atmoe.h"

/* Fails the test with the status name and the context's message. */
#define ck_assert_status(expr, ctx)                                           \
    do {                                                                      \
        atmoe_status st_ = (expr);                                            \
        ck_assert_msg(st_ == ATMOE_STATUS_OK, "%s -> %s: %s", #expr,          \
                      atmoe_status_name(st_), atmoe_errmsg(ctx));             \
    } while (0)

/* Asserts a given failure status and a non-empty message. */
#define ck_assert_fails(expr, ctx, want)                                      \
    do {                                                                      \
        atmoe_status st_ = (expr);                                            \
        ck_assert_msg(st_ == (want), "%s -> %s, expected %s", #expr,          \
                      atmoe_status_name(st_), atmoe_status_name(want));       \
        ck_assert_msg(atmoe_errmsg(ctx)[0] != '\0',                           \
                      "%s failed without a message", #expr);                  \
    } while (0)

/* A failure with the wanted status and a message naming what is wrong
 * (sub), so that a stale message from an earlier failure cannot pass. */
#define ck_assert_fails_with(expr, ctx, want, sub)                            \
    do {                                                                      \
        atmoe_status st_ = (expr);                                            \
        ck_assert_msg(st_ == (want), "%s -> %s, expected %s (%s)", #expr,     \
                      atmoe_status_name(st_), atmoe_status_name(want),        \
                      atmoe_errmsg(ctx));                                     \
        const char *m_ = atmoe_errmsg(ctx);                                   \
        ck_assert_msg(m_[0] != '\0' && strstr(m_, (sub)) != NULL,             \
                      "%s: message \"%s\" does not mention \"%s\"", #expr,    \
                      m_, (sub));                                             \
    } while (0)

/* ck_assert_fails_with, and the call left no node behind in the graph g:
 * the node added after it gets the id next to the one added before. */
#define ck_assert_fails_clean(g, expr, ctx, want, sub)                        \
    do {                                                                      \
        atmoe_node m0_ = test_marker(ctx, g);                                 \
        ck_assert_fails_with(expr, ctx, want, sub);                           \
        atmoe_node m1_ = test_marker(ctx, g);                                 \
        ck_assert_msg(m1_ == m0_ + 1,                                         \
                      "%s left %d node(s) behind in the graph", #expr,        \
                      (int)(m1_ - m0_ - 1));                                  \
    } while (0)

typedef struct test_rng {
    uint64_t state;
} test_rng;

void test_rng_seed(test_rng *rng, uint64_t seed);
/* Uniform in [lo, hi). */
double test_uniform(test_rng *rng, double lo, double hi);
void test_fill_uniform(test_rng *rng, float *x, size_t n, double lo,
                       double hi);

/* Poison for outputs: a NaN that no kernel computes by accident. */
void test_poison(float *x, size_t n);

/* Largest |got - want| / max(|want|, floor) over n elements; +inf when any
 * element of got is NaN or infinite, so that NaN never passes. */
double test_max_rel_err(const float *got, const double *want, size_t n,
                        double floor);

/* The whole file at path, with a NUL after its last byte so that a text
 * file reads as a string; its size in *size unless size is NULL.  The
 * caller frees it. */
void *test_read_file(const char *path, size_t *size);
/* Creates or replaces the file at path with size bytes of data. */
void test_write_file(const char *path, const void *data, size_t size);

/* A fresh empty directory under ATMOE_TEST_TMPDIR (or /tmp); the caller
 * removes it with test_rmdir_r. */
void test_mkdtemp(char *path, size_t size, const char *tag);
void test_rmdir_r(const char *path);

/* Opens the default device, failing the test when it cannot. */
atmoe_context *test_context(void);

/* Adds a throwaway constant to g (of ctx) and returns its id: the graph's
 * node count before it, seen through the public API. */
atmoe_node test_marker(atmoe_context *ctx, atmoe_graph *g);

/* Runs the suite and returns the process exit code. */
int test_run_suite(Suite *s);

#endif
