/* Launches of cl/linear.cl, y = x W^T (+ bias) (+ alpha z B^T), shared by
 * the operations of this layer that run a shrink or a base projection with
 * its expand fused in: the mixture (mixture.c) and the rank-1 expert layer
 * (mor1e.c). */
#ifndef ATMOE_MOE_LINEAR_H
#define ATMOE_MOE_LINEAR_H

#include "graph/graph.h"

/* Whether cl/linear.cl reads a weight of this storage type (f32, f16,
 * bf16), and its code there (-DWT / -DBT: 0, 1, 2); -1 for none.  The
 * router's kernels (cl/router.cl) and the expert sets use the same codes. */
int atm_weight_type(atmoe_dtype dtype);
/* The same for a base weight W, which cl/linear.cl also reads in 8-bit
 * blocks (q8, code 3; its offsets in bytes); experts and the router's
 * weights are not q8, so they ask atm_weight_type. */
int atm_base_weight_type(atmoe_dtype dtype);

/* A node's kernels of cl/linear.cl come in three slots from `first`: for
 * batches of 1, 2 and 3+ tokens (their tiles differ).  The slot of a batch
 * of T tokens. */
int atm_linear_slot(int first, size_t T);

/* Builds, at planning, the kernel for batches of b tokens into the slot of
 * first, its W and its expand's B read as storage types wt and bt
 * (atm_weight_type), with the tuned block sr x st. */
atmoe_status atm_linear_kernel(atmoe_graph *g, atm_node *n, int first,
                               size_t b, int wt, int bt, unsigned sr,
                               unsigned st);

/* One product: y [T, rows] = x [T, k] w^T (+ bias) (+ alpha z b^T with
 * z [T, zw], b [rows, zw]); w and z may lie in the arena, hence buffers
 * and offsets (in elements). */
typedef struct atm_linear_call {
    cl_mem y, w, z;
    size_t y_offset, w_offset, z_offset;
    const atmoe_tensor *x, *bias, *b;
    size_t rows, k, zw;
    float alpha;
} atm_linear_call;

/* Enqueues c for T tokens with the kernel of atm_linear_kernel(first) for
 * that batch, built with the same sr and st. */
atmoe_status atm_linear_run(atmoe_graph *g, const atm_node *n, size_t T,
                            int first, unsigned sr, unsigned st,
                            const atm_linear_call *c, cl_event *ev);

#endif
