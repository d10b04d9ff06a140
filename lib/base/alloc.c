#include <config.h>

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/env.h"

/* Per thread: a context is used by one thread at a time, so the difference
 * over a call is that call's own allocations whatever other threads do. */
static _Thread_local uint64_t alloc_count;

/* Failure injection, for tests only (as SQLite injects allocation
 * failures): with ATMOE_TEST_FAIL_ALLOC=N the Nth allocation of the
 * process through these functions fails, and with ATMOE_TEST_FAIL_ALLOC=N+
 * every one from the Nth on.  Read once, at the first allocation. */
static pthread_once_t inject_once = PTHREAD_ONCE_INIT;
static uint64_t inject_at, inject_persist;
static _Atomic uint64_t process_count;

static void inject_init(void)
{
    const char *v = atm_env_get(ATM_ENV_TEST_FAIL_ALLOC);
    if (v == NULL || *v == '\0')
        return;
    char *end;
    unsigned long long n = strtoull(v, &end, 10);
    inject_at = n;
    inject_persist = *end == '+';
}

static int inject(void)
{
    pthread_once(&inject_once, inject_init);
    uint64_t n = ++process_count;
    return inject_at != 0 &&
           (n == inject_at || (inject_persist && n > inject_at));
}

void atm_alloc_fail_at(uint64_t n, int persist)
{
    pthread_once(&inject_once, inject_init);
    process_count = 0;
    inject_at = n;
    inject_persist = persist != 0;
}

uint64_t atm_alloc_process_count(void)
{
    return process_count;
}

void *atm_malloc(size_t size)
{
    alloc_count++;
    return inject() ? NULL : malloc(size);
}

void *atm_calloc(size_t count, size_t size)
{
    alloc_count++;
    return inject() ? NULL : calloc(count, size);
}

void *atm_realloc(void *p, size_t size)
{
    alloc_count++;
    return inject() ? NULL : realloc(p, size);
}

char *atm_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = atm_malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

void atm_free(void *p)
{
    free(p);
}

uint64_t atm_alloc_count(void)
{
    return alloc_count;
}
