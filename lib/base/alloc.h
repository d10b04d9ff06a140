/* Host memory: every allocation of the library goes through these, so that
 * it can be counted (a compute must make none: atmoe_graph_get_compute_stats
 * reports it, and a test checks it) and, in tests, made to fail. */
#ifndef ATMOE_ALLOC_H
#define ATMOE_ALLOC_H

#include <stddef.h>
#include <stdint.h>

void *atm_malloc(size_t size);
void *atm_calloc(size_t count, size_t size);
void *atm_realloc(void *p, size_t size);
char *atm_strdup(const char *s);
void atm_free(void *p);

/* Allocations (malloc, calloc, realloc, strdup) this thread has made
 * through the functions above since it started. */
uint64_t atm_alloc_count(void);

/* Tests only: makes the nth allocation of the process from now fail (0:
 * none), and with persist every one after it too; the environment's
 * ATMOE_TEST_FAIL_ALLOC=N (or N+) does the same from the start. */
void atm_alloc_fail_at(uint64_t n, int persist);

/* Allocations of the process through these functions since the start or
 * the last atm_alloc_fail_at. */
uint64_t atm_alloc_process_count(void);

#endif
