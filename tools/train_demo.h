/* atmoe train demo (tools/train_demo.c). */
#ifndef ATMOE_TRAIN_DEMO_H
#define ATMOE_TRAIN_DEMO_H

#include <stddef.h>
#include <stdint.h>

#include "atmoe.h"

/* Runs the demonstration on ctx: rows training rows per task (0: the
 * default), the table on stdout, and with json non-NULL the same as JSON
 * there.  Returns an exit status. */
int train_demo(atmoe_context *ctx, uint64_t seed, size_t rows,
               const char *json);

#endif
