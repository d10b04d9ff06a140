/* What atmoe-bench and atmoe-tune both measure with: the monotonic clock,
 * the median of repeated timings, and splitmix64, the stream their weights
 * and inputs are drawn from (a counter, so the same numbers on every
 * machine, and in bench/peer_torch.py). */
#ifndef ATMOE_BENCH_MEASURE_H
#define ATMOE_BENCH_MEASURE_H

#include <stddef.h>
#include <stdint.h>

/* Seconds on the monotonic clock. */
double now_s(void);

/* Sorts v and returns its median. */
double median(double *v, size_t n);

/* The next number of the splitmix64 stream at *state. */
uint64_t splitmix64(uint64_t *state);

/* The next number of the stream, uniform in [-1, 1): its top 53 bits. */
double uniform(uint64_t *state);

#endif
