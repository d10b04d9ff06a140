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

/* A node's kernels of a product come in ATM_LINEAR_SLOTS slots from
 * `first`: the decode variant's for batches of 1, 2 and 3+ tokens (their
 * tiles differ), then the tile variant's (cl/linear_tile.cl) for batches
 * of at least tile_from tokens. */
#define ATM_LINEAR_SLOTS 4

/* The parameters of a product, as planning resolved them from the
 * tuning in force (they are kept in the node, so that a run launches what
 * planning built): the variant of the smaller batches (cl/linear.cl,
 * shaped for CPUs, or the group variant cl/linear_gpu.cl, shaped for
 * GPUs), the CPU variant's block SR x ST, the group variant's
 * 2^group_log2 work-items per group and rows per group, fitted to the
 * device's work-group size and local memory, and the tile variant's
 * smallest batch (UINT_MAX: none) and tile (tm tokens x tn rows a group, k
 * in chunks of tk, wm x wn a work-item), and the CPU variant's vector
 * width (vw, 8 or 16).  Twenty bytes: the mixture keeps three in its
 * node. */
enum { ATM_LINEAR_CPU, ATM_LINEAR_GROUP };
typedef struct atm_linear_tune {
    unsigned short sr, st;
    unsigned char variant, group_log2, group_rows;
    unsigned char tm, tn, tk, wm, wn, vw;
    unsigned tile_from;
} atm_linear_tune;

/* The slot of a batch of T tokens among those of first. */
int atm_linear_slot(int first, size_t T, const atm_linear_tune *t);

/* The parameters in force on ctx for a product over a weight stored as
 * dtype (its blocks are tuned by type, the variant is not). */
void atm_linear_tune_get(const atmoe_context *ctx, atmoe_dtype dtype,
                         atm_linear_tune *t);

/* Builds, at planning, the kernels of the slots of first that batches of
 * 1 to T tokens use (none past upto, the linear route's largest batch),
 * their W and their expand's B read as storage types wt and bt
 * (atm_weight_type), with the parameters t.  A tile the device cannot run
 * (its work-group or local memory too large) is refused here. */
atmoe_status atm_linear_kernels(atmoe_graph *g, atm_node *n, int first,
                                size_t T, size_t upto, int wt, int bt,
                                const atm_linear_tune *t);

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
 * that batch, built with the same t. */
atmoe_status atm_linear_run(atmoe_graph *g, const atm_node *n, size_t T,
                            int first, const atm_linear_tune *t,
                            const atm_linear_call *c, cl_event *ev);

#endif
