/* The trainable weights of a graph and where their gradients are: the
 * registry that the backward pass fills and the optimiser reads.
 *
 * An entry is a range of f32 elements of a device buffer (a graph
 * parameter's tensor, or one expert's A or B inside its set's stacked
 * buffers) and the node (with an element offset) whose value after a
 * compute is dL/d(that range).  The backward pass registers graph
 * parameters marked trainable; operations whose weights live outside the
 * graph (the mixture's experts) register theirs from their row's backward
 * (op.h).  Entries are released with the graph; a plan or a truncation
 * that drops an entry's gradient node drops the entry with it. */
#ifndef ATMOE_GRAPH_TRAINABLE_H
#define ATMOE_GRAPH_TRAINABLE_H

#include "graph/graph.h"

#define ATM_TRAINABLE_NAME_SIZE 96

typedef struct atm_trainable {
    char name[ATM_TRAINABLE_NAME_SIZE]; /* unique in the graph: "w_g",
                                           "layer0.experts.3.A" */
    cl_mem buffer;      /* the weight's storage (not owned) */
    size_t offset;      /* in elements of f32 */
    int ndim;
    size_t shape[ATMOE_MAX_DIMS]; /* of the range, for checkpoints */
    size_t count;       /* elements, the product of shape */
    int grad;           /* node holding the gradient */
    size_t grad_offset; /* in elements of that node */
} atm_trainable;

/* Adds an entry (copied); ATMOE_STATUS_INVALID_ARGUMENT for a name already
 * registered, a count of 0 or a gradient node of fewer elements than
 * grad_offset + count. */
atmoe_status atm_graph_add_trainable(atmoe_graph *g, const atm_trainable *t,
                                     const char *fn);
size_t atm_graph_trainable_count(const atmoe_graph *g);
/* Entry i < count, or NULL. */
const atm_trainable *atm_graph_trainable_at(const atmoe_graph *g, size_t i);
/* The entry named name, or NULL. */
const atm_trainable *atm_graph_trainable_find(const atmoe_graph *g,
                                              const char *name);
/* Whether the value of node id of a planned graph is still in its memory
 * after a compute: an input, or a node whose block is pinned (an output's)
 * and that no later operation overwrote in place. */
int atm_graph_value_kept(const atmoe_graph *g, int id);
/* Where entry t's gradient is after the last compute (buffer, element
 * offset); INVALID_ARGUMENT with a message naming fn when the graph is not
 * planned or nothing was computed since. */
atmoe_status atm_trainable_grad_tensor(const atmoe_graph *g,
                                       const atm_trainable *t,
                                       const char *fn, cl_mem *buffer,
                                       size_t *offset);
/* Forgets every entry (a new backward pass). */
void atm_graph_trainables_clear(atmoe_graph *g);
/* Forgets the entries whose gradient node is count or later (the graph is
 * truncated to count nodes). */
void atm_graph_trainables_drop_from(atmoe_graph *g, size_t count);

#endif
