#include <config.h>

#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"

/* Per thread: a context is used by one thread at a time, so the difference
 * over a call is that call's own allocations whatever other threads do. */
static _Thread_local uint64_t alloc_count;

void *atm_malloc(size_t size)
{
    alloc_count++;
    return malloc(size);
}

void *atm_calloc(size_t count, size_t size)
{
    alloc_count++;
    return calloc(count, size);
}

void *atm_realloc(void *p, size_t size)
{
    alloc_count++;
    return realloc(p, size);
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
