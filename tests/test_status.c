/* Status codes, error messages, logging, version and enum names: the parts
 * of the library that need no OpenCL device. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* The names and descriptions the header's list defines, expanded here
 * independently so that a table in the library that drifts from the list
 * is caught. */
static const char *const want_names[] = {
#define NAME_(name, text) #name,
    ATMOE_STATUS_MAP(NAME_)
#undef NAME_
};
static const char *const want_texts[] = {
#define TEXT_(name, text) text,
    ATMOE_STATUS_MAP(TEXT_)
#undef TEXT_
};

START_TEST(test_status_names_distinct)
{
    ck_assert_uint_eq(sizeof want_names / sizeof want_names[0],
                      ATMOE_STATUS_COUNT_);
    ck_assert_int_eq(ATMOE_STATUS_OK, 0);
    for (int i = 0; i < ATMOE_STATUS_COUNT_; i++) {
        const char *name = atmoe_status_name((atmoe_status)i);
        const char *text = atmoe_strerror((atmoe_status)i);
        ck_assert_ptr_nonnull(name);
        ck_assert_ptr_nonnull(text);
        ck_assert_msg(name[0] != '\0', "status %d has an empty name", i);
        ck_assert_msg(text[0] != '\0', "status %d has an empty text", i);
        ck_assert_str_eq(name, want_names[i]);
        ck_assert_str_eq(text, want_texts[i]);
        /* Names carry no prefix: "DEVICE_OUT_OF_MEMORY". */
        ck_assert_msg(strncmp(name, "ATMOE_", 6) != 0, "%s has a prefix",
                      name);
        for (int j = 0; j < i; j++) {
            ck_assert_msg(strcmp(name, atmoe_status_name((atmoe_status)j)),
                          "statuses %d and %d share the name %s", j, i, name);
            ck_assert_msg(strcmp(text, atmoe_strerror((atmoe_status)j)),
                          "statuses %d and %d share the text '%s'", j, i,
                          text);
        }
    }
    ck_assert_str_eq(atmoe_status_name(ATMOE_STATUS_DEVICE_OUT_OF_MEMORY),
                     "DEVICE_OUT_OF_MEMORY");
    ck_assert_str_eq(atmoe_strerror(ATMOE_STATUS_DEVICE_OUT_OF_MEMORY),
                     "device memory allocation failed");
}
END_TEST

START_TEST(test_status_out_of_range)
{
    /* Values a caller could get by casting garbage: past the end, far past
     * it, negative.  Each gives the same non-empty fallback, never NULL and
     * never the text of a real code. */
    const int bad[] = {ATMOE_STATUS_COUNT_, ATMOE_STATUS_COUNT_ + 1, 1000,
                       -1, -1000};
    const char *fallback_name = atmoe_status_name((atmoe_status)bad[0]);
    const char *fallback_text = atmoe_strerror((atmoe_status)bad[0]);
    ck_assert_ptr_nonnull(fallback_name);
    ck_assert_ptr_nonnull(fallback_text);
    ck_assert(fallback_name[0] != '\0');
    ck_assert(fallback_text[0] != '\0');
    /* The one answer of every name function outside its enum. */
    ck_assert_str_eq(fallback_name, "unknown");
    ck_assert_str_eq(fallback_text, "unknown");
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        const char *name = atmoe_status_name((atmoe_status)bad[k]);
        const char *text = atmoe_strerror((atmoe_status)bad[k]);
        ck_assert_ptr_nonnull(name);
        ck_assert_ptr_nonnull(text);
        ck_assert_str_eq(name, fallback_name);
        ck_assert_str_eq(text, fallback_text);
    }
    for (int i = 0; i < ATMOE_STATUS_COUNT_; i++) {
        ck_assert_str_ne(fallback_name, want_names[i]);
        ck_assert_str_ne(fallback_text, want_texts[i]);
    }
}
END_TEST

/* ---------------------------------------------------------------- errmsg */

typedef struct thread_probe {
    char before[256];    /* atmoe_errmsg(NULL) when the thread starts */
    atmoe_status status; /* of the failing call */
    char after[512];     /* atmoe_errmsg(NULL) after it */
} thread_probe;

/* Runs in a fresh thread, whose thread-local message nothing has touched
 * (with CK_FORK=no the main thread's message carries over between tests). */
static void *probe_thread(void *arg)
{
    thread_probe *p = arg;
    snprintf(p->before, sizeof p->before, "%s", atmoe_errmsg(NULL));
    p->status = atmoe_device_get_count(NULL);
    snprintf(p->after, sizeof p->after, "%s", atmoe_errmsg(NULL));
    return NULL;
}

static void run_probe(thread_probe *p)
{
    pthread_t t;
    memset(p, 0, sizeof *p);
    ck_assert_int_eq(pthread_create(&t, NULL, probe_thread, p), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
}

START_TEST(test_errmsg_fresh_thread)
{
    thread_probe p;
    run_probe(&p);
    ck_assert_str_eq(p.before, "");
    ck_assert_int_eq(p.status, ATMOE_STATUS_NULL_POINTER);
    ck_assert_msg(p.after[0] != '\0', "no message after a failure");
    /* The message names the argument that was NULL. */
    ck_assert_msg(strstr(p.after, "count") != NULL, "message: %s", p.after);
}
END_TEST

START_TEST(test_errmsg_never_null)
{
    ck_assert_ptr_nonnull(atmoe_errmsg(NULL));
    ck_assert_int_eq(atmoe_device_get_count(NULL), ATMOE_STATUS_NULL_POINTER);
    const char *msg = atmoe_errmsg(NULL);
    ck_assert_ptr_nonnull(msg);
    ck_assert(msg[0] != '\0');
}
END_TEST

START_TEST(test_errmsg_per_thread)
{
    /* A failure on this thread with a message the other thread's call
     * cannot produce. */
    ck_assert_int_eq(atmoe_log_set(NULL, NULL, (atmoe_log_level)77),
                     ATMOE_STATUS_INVALID_ARGUMENT);
    char mine[512];
    snprintf(mine, sizeof mine, "%s", atmoe_errmsg(NULL));
    ck_assert_msg(strstr(mine, "77") != NULL, "message: %s", mine);

    thread_probe p;
    run_probe(&p);
    /* The second thread did not see our message and has its own. */
    ck_assert_str_eq(p.before, "");
    ck_assert_int_eq(p.status, ATMOE_STATUS_NULL_POINTER);
    ck_assert_str_ne(p.after, mine);
    /* And its failure did not overwrite ours. */
    ck_assert_str_eq(atmoe_errmsg(NULL), mine);
}
END_TEST

/* ---------------------------------------------------------------- logging */

typedef struct log_record {
    pthread_mutex_t lock;
    int calls;
    int per_level[4];
    atmoe_log_level last_level;
    char last[1024];
} log_record;

static void record_log(atmoe_log_level level, const char *message, void *user)
{
    log_record *r = user;
    pthread_mutex_lock(&r->lock);
    r->calls++;
    if ((unsigned)level < 4)
        r->per_level[level]++;
    r->last_level = level;
    snprintf(r->last, sizeof r->last, "%s", message ? message : "(null)");
    pthread_mutex_unlock(&r->lock);
}

static void record_reset(log_record *r)
{
    pthread_mutex_lock(&r->lock);
    r->calls = 0;
    memset(r->per_level, 0, sizeof r->per_level);
    r->last[0] = '\0';
    pthread_mutex_unlock(&r->lock);
}

static log_record rec = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Logging is process-wide: put the default back so that later tests (in
 * the same process with CK_FORK=no) see no callback into freed state. */
static void log_teardown(void)
{
    atmoe_log_set(NULL, NULL, ATMOE_LOG_ERROR);
}

START_TEST(test_log_receives_failures)
{
    record_reset(&rec);
    ck_assert_status(atmoe_log_set(record_log, &rec, ATMOE_LOG_DEBUG), NULL);
    ck_assert_int_eq(rec.calls, 0);
    ck_assert_int_eq(atmoe_device_get_count(NULL), ATMOE_STATUS_NULL_POINTER);
    ck_assert_int_ge(rec.calls, 1);
    ck_assert_int_eq(rec.last_level, ATMOE_LOG_DEBUG);
    /* The log line carries the status and the same detail as errmsg. */
    ck_assert_msg(strstr(rec.last, "NULL_POINTER") != NULL, "log: %s",
                  rec.last);
    ck_assert_msg(strstr(rec.last, atmoe_errmsg(NULL)) != NULL,
                  "log '%s' lacks errmsg '%s'", rec.last, atmoe_errmsg(NULL));
}
END_TEST

START_TEST(test_log_level_filter)
{
    /* Failures are logged at DEBUG: any higher threshold hides them. */
    const atmoe_log_level above[] = {ATMOE_LOG_INFO, ATMOE_LOG_WARNING,
                                     ATMOE_LOG_ERROR};
    for (size_t i = 0; i < sizeof above / sizeof above[0]; i++) {
        record_reset(&rec);
        ck_assert_status(atmoe_log_set(record_log, &rec, above[i]), NULL);
        ck_assert_int_eq(atmoe_device_get_count(NULL), ATMOE_STATUS_NULL_POINTER);
        ck_assert_msg(rec.calls == 0, "min level %d let through: %s",
                      (int)above[i], rec.last);
    }
    record_reset(&rec);
    ck_assert_status(atmoe_log_set(record_log, &rec, ATMOE_LOG_DEBUG), NULL);
    ck_assert_int_eq(atmoe_device_get_count(NULL), ATMOE_STATUS_NULL_POINTER);
    ck_assert_int_eq(rec.per_level[ATMOE_LOG_DEBUG], 1);
}
END_TEST

START_TEST(test_log_invalid_level)
{
    record_reset(&rec);
    ck_assert_status(atmoe_log_set(record_log, &rec, ATMOE_LOG_DEBUG), NULL);
    const int bad[] = {ATMOE_LOG_ERROR + 1, 100, -1};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        log_record other = {.lock = PTHREAD_MUTEX_INITIALIZER};
        ck_assert_fails(atmoe_log_set(record_log, &other,
                                      (atmoe_log_level)bad[i]),
                        NULL, ATMOE_STATUS_INVALID_ARGUMENT);
        /* Refused means unchanged: the old callback, not the new one,
         * receives the refusal's own debug message. */
        ck_assert_int_eq(other.calls, 0);
    }
    ck_assert_int_eq(rec.calls, 3);
    ck_assert_fails(atmoe_log_set(NULL, NULL, (atmoe_log_level)-1), NULL,
                    ATMOE_STATUS_INVALID_ARGUMENT);
}
END_TEST

START_TEST(test_log_off)
{
    record_reset(&rec);
    ck_assert_status(atmoe_log_set(record_log, &rec, ATMOE_LOG_DEBUG), NULL);
    ck_assert_status(atmoe_log_set(NULL, &rec, ATMOE_LOG_DEBUG), NULL);
    ck_assert_int_eq(atmoe_device_get_count(NULL), ATMOE_STATUS_NULL_POINTER);
    ck_assert_int_eq(rec.calls, 0);
}
END_TEST

static void *fail_in_thread(void *arg)
{
    (void)arg;
    atmoe_device_get_count(NULL);
    return NULL;
}

START_TEST(test_log_from_other_thread)
{
    /* The callback is process-wide: a failure on another thread reaches
     * it too. */
    record_reset(&rec);
    ck_assert_status(atmoe_log_set(record_log, &rec, ATMOE_LOG_DEBUG), NULL);
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(pthread_create(&t[i], NULL, fail_in_thread, NULL), 0);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(pthread_join(t[i], NULL), 0);
    ck_assert_int_eq(rec.calls, 4);
}
END_TEST

/* ---------------------------------------------------------------- names */

START_TEST(test_version)
{
    char want[64];
    snprintf(want, sizeof want, "%d.%d.%d", ATMOE_VERSION_MAJOR,
             ATMOE_VERSION_MINOR, ATMOE_VERSION_PATCH);
    ck_assert_ptr_nonnull(atmoe_version());
    ck_assert_str_eq(atmoe_version(), want);
}
END_TEST

START_TEST(test_dtype)
{
    ck_assert_str_eq(atmoe_dtype_name(ATMOE_DTYPE_F32), "f32");
    ck_assert_str_eq(atmoe_dtype_name(ATMOE_DTYPE_F16), "f16");
    ck_assert_str_eq(atmoe_dtype_name(ATMOE_DTYPE_I32), "i32");
    ck_assert_uint_eq(atmoe_dtype_size(ATMOE_DTYPE_F32), 4);
    ck_assert_uint_eq(atmoe_dtype_size(ATMOE_DTYPE_F16), 2);
    ck_assert_uint_eq(atmoe_dtype_size(ATMOE_DTYPE_I32), 4);
    /* q8's elements are not whole bytes: its size is 0 (atmoe.h). */
    ck_assert_str_eq(atmoe_dtype_name(ATMOE_DTYPE_Q8), "q8");
    ck_assert_uint_eq(atmoe_dtype_size(ATMOE_DTYPE_Q8), 0);
    const int bad[] = {ATMOE_DTYPE_Q8 + 1, 99, -1};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_str_eq(atmoe_dtype_name((atmoe_dtype)bad[i]), "unknown");
        ck_assert_uint_eq(atmoe_dtype_size((atmoe_dtype)bad[i]), 0);
    }
}
END_TEST

START_TEST(test_vendor_names)
{
    ck_assert_str_eq(atmoe_vendor_name(ATMOE_VENDOR_AMD), "AMD");
    ck_assert_str_eq(atmoe_vendor_name(ATMOE_VENDOR_INTEL), "Intel");
    ck_assert_str_eq(atmoe_vendor_name(ATMOE_VENDOR_NVIDIA), "NVIDIA");
    ck_assert_str_eq(atmoe_vendor_name(ATMOE_VENDOR_POCL), "PoCL");
    ck_assert_str_eq(atmoe_vendor_name(ATMOE_VENDOR_OTHER), "other");
    /* A value outside the enum is "unknown", as for every name function. */
    ck_assert_str_eq(atmoe_vendor_name((atmoe_vendor)99), "unknown");
    ck_assert_str_eq(atmoe_vendor_name((atmoe_vendor)-1), "unknown");
}
END_TEST

START_TEST(test_device_type_names)
{
    ck_assert_str_eq(atmoe_device_type_name(ATMOE_DEVICE_TYPE_CPU), "CPU");
    ck_assert_str_eq(atmoe_device_type_name(ATMOE_DEVICE_TYPE_GPU), "GPU");
    ck_assert_str_eq(atmoe_device_type_name(ATMOE_DEVICE_TYPE_ACCELERATOR),
                     "accelerator");
    ck_assert_str_eq(atmoe_device_type_name(ATMOE_DEVICE_TYPE_OTHER),
                     "other");
    ck_assert_str_eq(atmoe_device_type_name((atmoe_device_type)99), "unknown");
    ck_assert_str_eq(atmoe_device_type_name((atmoe_device_type)-1), "unknown");
}
END_TEST

static Suite *status_suite(void)
{
    Suite *s = suite_create("status");

    TCase *tc = tcase_create("codes");
    tcase_add_test(tc, test_status_names_distinct);
    tcase_add_test(tc, test_status_out_of_range);
    suite_add_tcase(s, tc);

    tc = tcase_create("errmsg");
    tcase_add_test(tc, test_errmsg_fresh_thread);
    tcase_add_test(tc, test_errmsg_never_null);
    tcase_add_test(tc, test_errmsg_per_thread);
    suite_add_tcase(s, tc);

    tc = tcase_create("log");
    tcase_add_checked_fixture(tc, NULL, log_teardown);
    tcase_add_test(tc, test_log_receives_failures);
    tcase_add_test(tc, test_log_level_filter);
    tcase_add_test(tc, test_log_invalid_level);
    tcase_add_test(tc, test_log_off);
    tcase_add_test(tc, test_log_from_other_thread);
    suite_add_tcase(s, tc);

    tc = tcase_create("names");
    tcase_add_test(tc, test_version);
    tcase_add_test(tc, test_dtype);
    tcase_add_test(tc, test_vendor_names);
    tcase_add_test(tc, test_device_type_names);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(status_suite());
}
