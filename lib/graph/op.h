/* The table of operations: every operation of a graph is one row (an
 * atm_op), defined in the file that holds its code, beside the public
 * function that adds it to a graph.  The generic graph (building, planning,
 * computing, dumps) knows operations only through their rows, so adding one
 * means writing its builder and its row, nothing else (lib/README).
 *
 * A node's life, as the generic code drives it:
 *   build    the builder checks operands and parameters, fills a node with
 *            its shape, dtype, batch and parameters (atm_node's union) and
 *            pushes it (atm_graph_push);
 *   plan     for every node an output needs, in creation order: its
 *            row's kernel, then prepare (further kernels built and kept in
 *            the node, routes decided),
 *            then scratch (arena bytes it needs while it runs); memory is
 *            assigned; then gemm_scratch (the CLBlast scratch its GEMMs
 *            need at the planned batch, with the offsets of the plan);
 *   compute  run, with each node's runtime tensor (rt) set for the batch:
 *            enqueues commands only, through the handles prepare kept;
 *   profile  cost, at the computed batch;
 *   free     release, for what the node's parameters hold (references).
 */
#ifndef ATMOE_GRAPH_OP_H
#define ATMOE_GRAPH_OP_H

#include <stdint.h>

#include "tensor/tensor.h"

typedef struct atm_node atm_node;

/* Flags of a row. */
enum {
    /* May write its result over its first operand's memory when that
     * operand dies with it: each work-item reads its elements before it
     * writes them and never reads another's afterwards. */
    ATM_OPF_INPLACE = 1u << 0,
    /* ... and that holds even when another operand shares the first one's
     * memory in the same layout (element-wise binary operations). */
    ATM_OPF_ELEMENTWISE = 1u << 1,
    /* The result is its first operand's memory seen in another shape. */
    ATM_OPF_ALIAS = 1u << 2,
    /* A graph input: placed before every intermediate, filled by the
     * caller. */
    ATM_OPF_INPUT = 1u << 3,
    /* A further output of its source's kernel: placed when the source is,
     * written by the source's run. */
    ATM_OPF_SECONDARY = 1u << 4,
    /* Runs several commands, the first of which may not take an event
     * (CLBlast): profiling opens the node with a marker. */
    ATM_OPF_MARKER = 1u << 5,
};

typedef struct atm_op {
    const char *name; /* for messages, dumps and profiles */
    unsigned flags;   /* ATM_OPF_* */
    /* An operation that runs a kernel of ours names it: planning builds it
     * (no build options) into the node's kernel[0] before prepare. */
    const char *program, *kernel;
    /* Planning: builds the kernels the node will run at any batch up to
     * the planned one, keeps their handles in the node and decides its
     * routes.  NULL: nothing to prepare. */
    atmoe_status (*prepare)(atmoe_graph *g, atm_node *n);
    /* Bytes of arena scratch the node needs while it runs, at the planned
     * batch (after prepare).  NULL: none. */
    size_t (*scratch)(const atmoe_graph *g, const atm_node *n);
    /* Bytes of CLBlast scratch its GEMMs need at the planned batch, with
     * the runtime tensors of the plan set.  NULL: it runs no GEMM. */
    size_t (*gemm_scratch)(atmoe_graph *g, const atm_node *n);
    /* Enqueues the node's commands; first receives the event of its first
     * command and last that of its last when it has several (either may be
     * NULL).  NULL: nothing to compute (inputs, storage, aliases). */
    atmoe_status (*run)(atmoe_graph *g, atm_node *n, cl_event *first,
                        cl_event *last);
    /* FLOPs at the runtime shapes; bytes arrive as the operands read and
     * the result written, and may be corrected.  NULL: no FLOPs. */
    void (*cost)(const atmoe_graph *g, const atm_node *n, uint64_t *bytes,
                 uint64_t *flops);
    /* Releases what the node's parameters hold.  NULL: nothing. */
    void (*release)(atm_node *n);
    /* Reverse mode (lib/graph/backward.c drives it): adds to g the nodes
     * of the gradient of node `node` (an index: adding nodes may move
     * g->nodes, so re-read the node after each push).  grad_out[0] holds
     * dL/d(the node's result) and grad_out[1], grad_out[2] dL/d(its
     * secondary outputs co[0], co[1]), each ATMOE_NODE_NONE when nothing
     * downstream of the loss reads it.  For each operand i < nsrc with
     * need[i] non-zero, sets grad_in[i] to a node of the operand's shape
     * and batch holding its contribution to dL/d(operand), or
     * ATMOE_NODE_NONE when it has none (integer operands, indices); the
     * engine sums contributions of several readers.  Operations whose
     * weights live outside the graph (the mixture's experts) register
     * their gradients with atm_graph_add_trainable (graph/trainable.h).
     * NULL: the operation has no gradient (backward through it fails with
     * ATMOE_STATUS_NOT_SUPPORTED). */
    atmoe_status (*backward)(atmoe_graph *g, int node, const int *grad_out,
                             const unsigned char *need, int *grad_in);
} atm_op;

/* The rows of the library's operations, each defined beside its code. */
extern const atm_op atm_op_input, atm_op_parameter, atm_op_constant,
    atm_op_secondary;
extern const atm_op atm_op_matmul;                                /* ops_matmul.c */
extern const atm_op atm_op_add, atm_op_mul, atm_op_scale, atm_op_silu,
    atm_op_gelu, atm_op_sigmoid;                                  /* ops_elementwise.c */
extern const atm_op atm_op_softmax, atm_op_topk, atm_op_rmsnorm,
    atm_op_layernorm, atm_op_mean, atm_op_l2norm;                 /* ops_reduce.c */
extern const atm_op atm_op_gather_rows, atm_op_scatter_add_rows;  /* ops_rows.c */
extern const atm_op atm_op_reshape, atm_op_view, atm_op_transpose,
    atm_op_concat, atm_op_cast;                                   /* ops_layout.c */
extern const atm_op atm_op_loss_mse, atm_op_loss_cross_entropy,
    atm_op_loss_load_balance;                                     /* loss.c */
/* The MoE layer's rows (router, mixture) live in lib/moe, above this
 * layer, which never names them. */

#endif
