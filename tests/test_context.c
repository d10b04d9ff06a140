/* Contexts: several at once, from several threads, the device they report,
 * the selfcheck, finish, per-context messages and argument checks. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

static void assert_same_device(const atmoe_device_info *a,
                               const atmoe_device_info *b)
{
    /* Field by field: struct copies need not copy padding. */
    ck_assert_uint_eq(a->index, b->index);
    ck_assert_str_eq(a->name, b->name);
    ck_assert_str_eq(a->raw_name, b->raw_name);
    ck_assert_str_eq(a->vendor_name, b->vendor_name);
    ck_assert_str_eq(a->platform_name, b->platform_name);
    ck_assert_str_eq(a->platform_version, b->platform_version);
    ck_assert_str_eq(a->driver_version, b->driver_version);
    ck_assert_int_eq(a->vendor, b->vendor);
    ck_assert_int_eq(a->type, b->type);
    ck_assert_uint_eq(a->compute_units, b->compute_units);
    ck_assert_uint_eq(a->global_mem_bytes, b->global_mem_bytes);
    ck_assert_uint_eq(a->max_alloc_bytes, b->max_alloc_bytes);
    ck_assert_uint_eq(a->local_mem_bytes, b->local_mem_bytes);
    ck_assert_uint_eq(a->max_work_group_size, b->max_work_group_size);
    ck_assert_int_eq(a->fp16, b->fp16);
    ck_assert_int_eq(a->fp64, b->fp64);
}

/* Fills a small tensor on ctx and reads it back. */
static void fill_and_check(atmoe_context *ctx, double value)
{
    enum { N = 45 };
    size_t shape[1] = {N};
    float back[N];
    atmoe_tensor *t = NULL;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 1, shape, &t),
                     ctx);
    ck_assert_status(atmoe_tensor_fill(t, value), ctx);
    test_poison(back, N);
    ck_assert_status(atmoe_tensor_read(t, back, sizeof back), ctx);
    for (int i = 0; i < N; i++)
        ck_assert_msg(back[i] == (float)value, "element %d = %g, want %g", i,
                      back[i], value);
    atmoe_tensor_free(t);
}

START_TEST(test_several_contexts)
{
    enum { C = 3 };
    atmoe_context *ctx[C] = {NULL};
    for (int i = 0; i < C; i++) {
        ctx[i] = test_context();
        ck_assert_ptr_nonnull(ctx[i]);
        for (int j = 0; j < i; j++)
            ck_assert_ptr_ne(ctx[i], ctx[j]);
        /* A fresh context has no message. */
        ck_assert_str_eq(atmoe_errmsg(ctx[i]), "");
    }
    /* All usable at once, and freed out of creation order. */
    for (int i = 0; i < C; i++)
        fill_and_check(ctx[i], 1.5 + i);
    atmoe_context_free(ctx[1]);
    fill_and_check(ctx[0], -2.0);
    fill_and_check(ctx[2], 7.0);
    atmoe_context_free(ctx[2]);
    atmoe_context_free(ctx[0]);
}
END_TEST

START_TEST(test_context_by_selection)
{
    size_t n = 0;
    ck_assert_status(atmoe_device_get_count(&n), NULL);
    for (size_t i = 0; i < n; i++) {
        char sel[32];
        snprintf(sel, sizeof sel, "%zu", i);
        atmoe_context *ctx = NULL;
        ck_assert_status(atmoe_context_new(sel, &ctx), NULL);
        atmoe_device_info got, want;
        ck_assert_status(atmoe_context_get_device(ctx, &got), ctx);
        ck_assert_status(atmoe_device_get_info(i, &want), NULL);
        assert_same_device(&got, &want);
        atmoe_context_free(ctx);
    }
    /* NULL means the default device. */
    size_t def = 0;
    ck_assert_status(atmoe_device_get_default(&def), NULL);
    atmoe_context *ctx = test_context();
    atmoe_device_info got, want;
    ck_assert_status(atmoe_context_get_device(ctx, &got), ctx);
    ck_assert_status(atmoe_device_get_info(def, &want), NULL);
    assert_same_device(&got, &want);
    atmoe_context_free(ctx);

    /* A selection that matches nothing leaves *ctx NULL. */
    ctx = (atmoe_context *)&def;
    ck_assert_fails(atmoe_context_new("no-such-device-xyz", &ctx), NULL,
                    ATMOE_STATUS_DEVICE_NOT_FOUND);
    ck_assert_ptr_null(ctx);
    ck_assert_msg(strstr(atmoe_errmsg(NULL), "no-such-device-xyz") != NULL,
                  "message: %s", atmoe_errmsg(NULL));
}
END_TEST

START_TEST(test_selfcheck)
{
    atmoe_context *ctx = test_context();
    double err = NAN;
    ck_assert_status(atmoe_context_selfcheck(ctx, &err), ctx);
    ck_assert_msg(isfinite(err) && err >= 0 && err < 1e-3,
                  "max_rel_err = %g", err);
    /* max_rel_err may be NULL. */
    ck_assert_status(atmoe_context_selfcheck(ctx, NULL), ctx);
    ck_assert_str_eq(atmoe_errmsg(ctx), "");
    atmoe_context_free(ctx);
}
END_TEST

typedef struct selfcheck_job {
    atmoe_context *ctx;
    atmoe_status status;
    double err;
    char msg[1024];
} selfcheck_job;

static void *selfcheck_thread(void *arg)
{
    selfcheck_job *job = arg;
    job->err = NAN;
    job->status = atmoe_context_selfcheck(job->ctx, &job->err);
    if (job->status == ATMOE_STATUS_OK)
        job->status = atmoe_context_finish(job->ctx);
    snprintf(job->msg, sizeof job->msg, "%s", atmoe_errmsg(job->ctx));
    return NULL;
}

START_TEST(test_concurrent_selfcheck)
{
    /* Two contexts, each used by one thread, concurrently: the library's
     * shared state (device list, log, CLBlast's caches) must cope.  The
     * Check assertions stay on this thread. */
    enum { T = 2 };
    selfcheck_job job[T];
    pthread_t t[T];
    memset(job, 0, sizeof job);
    for (int i = 0; i < T; i++)
        job[i].ctx = test_context();
    for (int i = 0; i < T; i++)
        ck_assert_int_eq(pthread_create(&t[i], NULL, selfcheck_thread,
                                        &job[i]), 0);
    for (int i = 0; i < T; i++)
        ck_assert_int_eq(pthread_join(t[i], NULL), 0);
    for (int i = 0; i < T; i++) {
        ck_assert_msg(job[i].status == ATMOE_STATUS_OK,
                      "thread %d: %s: %s", i,
                      atmoe_status_name(job[i].status), job[i].msg);
        ck_assert_msg(isfinite(job[i].err) && job[i].err < 1e-3,
                      "thread %d: max_rel_err = %g", i, job[i].err);
    }
    /* The same data and seed give the same answer on both. */
    ck_assert_double_eq(job[0].err, job[1].err);
    for (int i = 0; i < T; i++)
        atmoe_context_free(job[i].ctx);
}
END_TEST

START_TEST(test_finish)
{
    atmoe_context *ctx = test_context();
    /* With nothing enqueued, and after work. */
    ck_assert_status(atmoe_context_finish(ctx), ctx);
    size_t shape[2] = {64, 33};
    atmoe_tensor *t = NULL;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, &t),
                     ctx);
    for (int i = 0; i < 4; i++)
        ck_assert_status(atmoe_tensor_fill(t, i), ctx);
    ck_assert_status(atmoe_context_finish(ctx), ctx);
    ck_assert_status(atmoe_context_finish(ctx), ctx);
    atmoe_tensor_free(t);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_free_null)
{
    atmoe_context_free(NULL);
}
END_TEST

START_TEST(test_null_arguments)
{
    atmoe_device_info info;
    atmoe_cache_stats stats;
    double err;

    /* Without a context the message goes to the thread. */
    ck_assert_fails(atmoe_context_new(NULL, NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_context_get_device(NULL, &info), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_context_set_cache_dir(NULL, "/tmp"), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_context_set_cache_dir(NULL, NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_context_finish(NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_context_get_cache_stats(NULL, &stats), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_context_selfcheck(NULL, &err), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_context_selfcheck(NULL, NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);

    /* With a context, on the context, naming the argument. */
    atmoe_context *ctx = test_context();
    ck_assert_fails(atmoe_context_get_device(ctx, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_msg(strstr(atmoe_errmsg(ctx), "info") != NULL, "message: %s",
                  atmoe_errmsg(ctx));
    ck_assert_fails(atmoe_context_get_cache_stats(ctx, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_msg(strstr(atmoe_errmsg(ctx), "stats") != NULL, "message: %s",
                  atmoe_errmsg(ctx));
    /* A failed call leaves the context usable. */
    ck_assert_status(atmoe_context_get_device(ctx, &info), ctx);
    ck_assert_status(atmoe_context_finish(ctx), ctx);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_errmsg_per_context)
{
    atmoe_context *a = test_context();
    atmoe_context *b = test_context();
    ck_assert_str_eq(atmoe_errmsg(a), "");
    ck_assert_str_eq(atmoe_errmsg(b), "");

    /* A thread message that context failures must not touch. */
    ck_assert_int_eq(atmoe_device_get_count(NULL), ATMOE_STATUS_NULL_POINTER);
    char thread_msg[1024];
    snprintf(thread_msg, sizeof thread_msg, "%s", atmoe_errmsg(NULL));

    ck_assert_fails(atmoe_context_get_cache_stats(a, NULL), a,
                    ATMOE_STATUS_NULL_POINTER);
    char msg_a[1024];
    snprintf(msg_a, sizeof msg_a, "%s", atmoe_errmsg(a));
    ck_assert_str_eq(atmoe_errmsg(b), "");
    ck_assert_str_eq(atmoe_errmsg(NULL), thread_msg);

    /* A different failure on b leaves a's message alone. */
    size_t shape[1] = {0};
    atmoe_tensor *t = NULL;
    atmoe_status st = atmoe_tensor_new(b, ATMOE_DTYPE_F32, 1, shape, &t);
    ck_assert_int_ne(st, ATMOE_STATUS_OK);
    ck_assert_ptr_null(t);
    ck_assert(atmoe_errmsg(b)[0] != '\0');
    ck_assert_str_ne(atmoe_errmsg(b), msg_a);
    ck_assert_str_eq(atmoe_errmsg(a), msg_a);
    ck_assert_str_eq(atmoe_errmsg(NULL), thread_msg);

    atmoe_context_free(a);
    atmoe_context_free(b);
}
END_TEST

/* Sets or unsets (value NULL) an environment variable. */
static void set_env(const char *name, const char *value)
{
    if (value)
        ck_assert_int_eq(setenv(name, value, 1), 0);
    else
        ck_assert_int_eq(unsetenv(name), 0);
}

/* A copy of a variable's value, NULL when unset (free it). */
static char *save_env(const char *name)
{
    const char *v = getenv(name);
    return v ? strdup(v) : NULL;
}

static void *new_context_thread(void *arg)
{
    char *msg = arg;
    atmoe_context *ctx = NULL;
    atmoe_status st = atmoe_context_new(NULL, &ctx);
    /* The thread's own message, which nothing else has touched. */
    snprintf(msg, 1024, "%s%s", st == ATMOE_STATUS_OK ? "" : "failed: ",
             atmoe_errmsg(NULL));
    atmoe_context_free(ctx);
    return NULL;
}

/* A successful atmoe_context_new leaves the thread's message as it was:
 * on a thread with an earlier failure, that failure's message; on a fresh
 * thread, "" (checked there). */
static void assert_new_leaves_no_message(const char *why)
{
    ck_assert_int_eq(atmoe_device_get_count(NULL), ATMOE_STATUS_NULL_POINTER);
    char before[1024];
    snprintf(before, sizeof before, "%s", atmoe_errmsg(NULL));
    atmoe_context *ctx = test_context();
    ck_assert_msg(strcmp(atmoe_errmsg(NULL), before) == 0,
                  "%s: the message became '%s'", why, atmoe_errmsg(NULL));
    ck_assert_str_eq(atmoe_errmsg(ctx), "");
    atmoe_context_free(ctx);

    char fresh[1024] = "not run";
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, new_context_thread, fresh), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    ck_assert_msg(fresh[0] == '\0', "%s: a fresh thread's message is '%s'",
                  why, fresh);
}

/* Without a user tuning database (ATMOE_TUNING_FILE set but empty, or no
 * HOME to find one in) a context is made as usual, and that is no failure
 * to leave a message about. */
START_TEST(test_new_without_user_database)
{
    static const char *const names[] = {"ATMOE_TUNING_FILE", "XDG_DATA_HOME",
                                        "HOME"};
    char *saved[3];
    for (int i = 0; i < 3; i++)
        saved[i] = save_env(names[i]);

    set_env("ATMOE_TUNING_FILE", "");
    assert_new_leaves_no_message("ATMOE_TUNING_FILE empty");

    set_env("ATMOE_TUNING_FILE", NULL);
    set_env("XDG_DATA_HOME", NULL);
    set_env("HOME", NULL);
    assert_new_leaves_no_message("HOME unset");

    for (int i = 0; i < 3; i++) {
        set_env(names[i], saved[i]);
        free(saved[i]);
    }
}
END_TEST

static Suite *context_suite(void)
{
    Suite *s = suite_create("context");

    TCase *tc = tcase_create("lifetime");
    tcase_add_test(tc, test_several_contexts);
    tcase_add_test(tc, test_context_by_selection);
    tcase_add_test(tc, test_free_null);
    tcase_add_test(tc, test_finish);
    suite_add_tcase(s, tc);

    tc = tcase_create("selfcheck");
    tcase_add_test(tc, test_selfcheck);
    tcase_add_test(tc, test_concurrent_selfcheck);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_test(tc, test_null_arguments);
    tcase_add_test(tc, test_errmsg_per_context);
    tcase_add_test(tc, test_new_without_user_database);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(context_suite());
}
