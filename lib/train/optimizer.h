/* The optimiser's state, shared by its steps (optimizer.c) and its
 * checkpoints (checkpoint.c). */
#ifndef ATMOE_TRAIN_OPTIMIZER_H
#define ATMOE_TRAIN_OPTIMIZER_H

#include "graph/trainable.h"

/* One trainable weight as the optimiser saw it when it was made: its
 * storage, its gradient node, and where its moments, its accumulator and
 * its partial sums of squares are. */
typedef struct atm_opt_entry {
    char name[ATM_TRAINABLE_NAME_SIZE];
    cl_mem param;
    size_t param_offset; /* elements */
    int ndim;
    size_t shape[ATMOE_MAX_DIMS];
    size_t count;
    size_t registry_index; /* in the graph's registry, for the gradient */
    size_t state_offset;   /* elements of m, v and acc */
    size_t slot, groups;   /* partials[slot, slot + groups) */
} atm_opt_entry;

struct atmoe_optimizer {
    atmoe_graph *graph;
    atmoe_context *ctx;
    atmoe_optimizer_config cfg;
    atm_opt_entry *entries;
    size_t count;
    size_t total;    /* elements over all entries */
    size_t max_count; /* of one entry: the checkpoints' staging buffer */
    cl_mem m, v;     /* AdamW: both; SGD with momentum: m; else none */
    cl_mem acc;      /* accumulation > 1 */
    cl_mem partials; /* slots partial sums, then the total */
    size_t slots;
    cl_kernel k_sumsq, k_sum, k_accumulate, k_update;
    uint64_t step, skipped;
    unsigned pending; /* micro-batches accumulated since the last step */
};

/* How many moment tensors an entry has in a checkpoint, and their prefixes
 * ("adam_m", ...). */
size_t atm_opt_state_count(const atmoe_optimizer *opt);
const char *atm_opt_state_prefix(const atmoe_optimizer *opt, size_t i);
/* The device buffer of moment i. */
cl_mem atm_opt_state_buffer(const atmoe_optimizer *opt, size_t i);
const char *atm_opt_kind_name(atmoe_optimizer_kind kind);

#endif
