/* Compute graphs: nodes as metadata (graph.c and the builders beside each
 * operation's row, op.h), the memory plan (plan.c) and the executor
 * (compute.c). */
#ifndef ATMOE_GRAPH_H
#define ATMOE_GRAPH_H

#include "graph/op.h"
#include "tensor/tensor.h"

#define ATM_NODE_NAME_SIZE 64
#define ATM_MAX_SRC 6 /* the router's backward reads six */
/* Kernel handles a node keeps from planning on (the mixture uses most). */
#define ATM_NODE_KERNELS 20
#define ATM_NODE_USER_BYTES 160

/* The parameters of node n as the struct `type` of its operation. */
#define ATM_NODE_PARAMS(type, n)                                              \
    ((type *)(void *)(n)->p.user +                                            \
     0 * sizeof(char[sizeof(type) <= ATM_NODE_USER_BYTES ? 1 : -1]))

struct atm_node {
    const atm_op *op;
    char name[ATM_NODE_NAME_SIZE];
    atmoe_dtype dtype;
    int ndim;
    size_t shape[ATMOE_MAX_DIMS]; /* at the planned (largest) batch */
    int batch_dim;                /* -1: not batched */
    size_t batch_factor;          /* shape[batch_dim] / planned batch */
    int src[ATM_MAX_SRC];         /* ATMOE_NODE_NONE when absent */
    int nsrc;
    int co[2]; /* secondary outputs (topk: indices; router: a, d) */
    const char *label; /* secondary outputs: what they hold, for dumps and
                          profiles ("topk_indices"); static storage */

    /* The operation's parameters: the member its row reads. */
    union {
        unsigned matmul_flags;          /* ATMOE_MATMUL_* */
        float alpha;                    /* scale */
        struct {
            int dim;
            float eps;
        } reduce; /* softmax, mean, l2norm; norms (dim: the last) */
        struct {
            int dim, k;
        } topk;
        size_t start[ATMOE_MAX_DIMS]; /* view */
        struct {
            int dim0, dim1;
        } transpose;
        int concat_dim;
        /* Operations of the layers above (lib/moe) and outside the library
         * keep a struct of their own here (ATM_NODE_PARAMS). */
        unsigned char user[ATM_NODE_USER_BYTES];
    } p;

    atmoe_tensor *storage; /* parameters and constants */
    int is_output;
    int trainable; /* parameters (and inputs asking for their gradient):
                      backward computes dL/d(this node) */
    int trains_outside; /* its operation trains weights that live outside
                           the graph (a mixture's trainable experts): the
                           backward pass starts from it as from a
                           trainable node, without a gradient of its own */

    /* The plan. */
    int needed;
    int owner;     /* node whose memory this one uses (itself, or the
                      source of a reshape or of an in-place operation) */
    int last_use;  /* position in the order of the last reader of this
                      node's memory (owners only) */
    int pinned;
    size_t bytes;  /* at the planned batch */
    size_t offset; /* in the arena, bytes */
    size_t work_bytes; /* scratch the operation needs while it runs */
    size_t work_offset;
    /* From prepare; the context owns them. */
    cl_kernel kernel[ATM_NODE_KERNELS];

    /* Computing. */
    size_t rows_set;    /* inputs: rows of the last set_input (1 when not
                           batched); 0 before the first */
    atmoe_tensor rt;    /* the node's tensor at the computed batch */
    cl_event event;     /* profiling: the node's first command */
    cl_event event_last; /* and its last, when it has several */
};

struct atmoe_graph {
    atmoe_context *ctx;
    atm_node *nodes;
    size_t count, capacity;
    size_t max_batch; /* planned batch of batched inputs; 0: none yet */

    int planned;
    size_t planned_count; /* nodes when planned: a plan holds while no node
                             is added (a refused operation's nodes come out
                             again, and the plan with them holds) */
    unsigned plan_flags;
    int *order;
    size_t order_count;
    cl_mem arena;
    atmoe_graph_memory memory;

    size_t batch;       /* of the last compute; 0 before the first */
    /* CLBlast's scratch for GEMMs that pad or transpose their operands,
     * sized at planning by asking every node (atm_op.gemm_scratch), so that
     * computing allocates nothing. */
    cl_mem gemm_temp;
    size_t gemm_temp_bytes;
    int profiling;
    atmoe_compute_stats stats; /* of the last compute */

    /* Training (graph/trainable.h): the registry of trainable weights and
     * their gradient nodes. */
    struct atm_trainable *trainables;
    size_t trainable_count, trainable_capacity;
    /* Reverse mode (graph/backward.c): whether atmoe_graph_backward has
     * built the gradients (once per graph), and then the gradient node of
     * each of the grad_of_count nodes that existed before it
     * (ATMOE_NODE_NONE: none; kept for trainable nodes). */
    int backward_built;
    int *grad_of;
    size_t grad_of_count;
};

/* The name of node n's operation, or its label (secondary outputs). */
const char *atm_node_op_name(const atm_node *n);

/* Validates a node id for graph g (message set on failure). */
atmoe_status atm_graph_check_node(const atmoe_graph *g, atmoe_node n,
                                  const char *fn, const char *operand);

void atm_graph_unplan(atmoe_graph *g);
/* Whether the plan is current: made, and no node added since. */
int atm_graph_is_planned(const atmoe_graph *g);
/* Drops the nodes from count on, releasing what they hold: an operation
 * that adds several nodes adds all or none. */
void atm_graph_truncate(atmoe_graph *g, size_t count);

/* A node of op with a result of dtype and shape, no operand yet. */
void atm_node_init(atm_node *p, const atm_op *op, atmoe_dtype dtype,
                   int ndim, const size_t *shape);
/* Appends a copy of proto, named name (NULL or "": a default name). */
atmoe_status atm_graph_push(atmoe_graph *g, const atm_node *proto,
                            const char *name, const char *fn,
                            atmoe_node *out);
atmoe_status atm_graph_get_node(const atmoe_graph *g, atmoe_node id,
                                const char *fn, const char *operand,
                                const atm_node **n);
/* "'name' (op dtype [shape])", for messages. */
const char *atm_node_desc(const atm_node *n, char *buf, size_t size);
/* The node named name, or ATMOE_NODE_NONE; sets no message. */
atmoe_node atm_graph_lookup(const atmoe_graph *g, const char *name);

/* Checks that builders share (graph.c). */
/* ATMOE_STATUS_DTYPE_MISMATCH for a q8 operand (8-bit blocks are read by
 * the mixture and converted by a cast, not moved or viewed by layout
 * operations, whose element offsets they do not have). */
atmoe_status atm_refuse_q8(const atmoe_graph *g, const char *fn,
                           const char *operand, const atm_node *n);
atmoe_status atm_want_f32(const atmoe_graph *g, const char *fn,
                          const char *operand, const atm_node *n);
atmoe_status atm_resolve_dim(const atmoe_graph *g, const char *fn,
                             const atm_node *n, int dim, int *out);
atmoe_status atm_check_shape_args(const atmoe_graph *g, const char *fn,
                                  atmoe_dtype dtype, int ndim,
                                  const size_t *shape);
/* An f32 node of op with x's shape and batch, x (node xid) its one
 * operand. */
void atm_node_like(atm_node *p, const atm_op *op, const atm_node *x,
                   atmoe_node xid);
/* The same after checking that x is an f32 node of g. */
atmoe_status atm_unary_proto(const atmoe_graph *g, const atm_op *op,
                             atmoe_node x, const char *fn, atm_node *p);
/* Pushes p under a default name into *out (out NULL: NULL_POINTER). */
atmoe_status atm_graph_finish(atmoe_graph *g, const atm_node *p,
                              const char *fn, atmoe_node *out);

/* The runtime tensor of operand i of n, or NULL when it is absent. */
static inline const atmoe_tensor *atm_src_rt(const atmoe_graph *g,
                                             const atm_node *n, int i)
{
    return n->src[i] < 0 ? NULL : &g->nodes[n->src[i]].rt;
}

/* Kernel arguments, set in order; the first failure is kept and reported
 * by atm_node_launch, which runs a 1-D kernel for node n. */
typedef struct atm_args {
    cl_kernel k;
    cl_uint next;
    cl_int err;
} atm_args;

void atm_arg(atm_args *a, size_t size, const void *value);
/* A tensor is passed as its buffer and its element offset. */
void atm_arg_tensor(atm_args *a, const atmoe_tensor *t);
void atm_arg_buffer(atm_args *a, cl_mem buffer);
void atm_arg_ulong(atm_args *a, cl_ulong v);
void atm_arg_int(atm_args *a, cl_int v);
void atm_arg_float(atm_args *a, cl_float v);
/* Runs a->k over work_items in work-groups of 64; kernel names it in
 * messages. */
atmoe_status atm_node_launch(atmoe_graph *g, const atm_node *n, atm_args *a,
                             const char *kernel, size_t work_items,
                             cl_event *ev);
/* The same with work-groups of `local` work-items (0: the driver's
 * choice). */
atmoe_status atm_node_launch_local(atmoe_graph *g, const atm_node *n,
                                   atm_args *a, const char *kernel,
                                   size_t work_items, size_t local,
                                   cl_event *ev);
/* At planning: kernel `kernel` of program `program` built with options
 * (NULL: none) into slot of node n. */
atmoe_status atm_node_kernel(atmoe_graph *g, atm_node *n, int slot,
                             const char *program, const char *options,
                             const char *kernel);

/* GEMMs of operations, with the plan's CLBlast scratch, and the scratch
 * one needs (ops_matmul.c). */
struct atm_gemm;
atmoe_status atm_graph_sgemm(atmoe_graph *g, const struct atm_gemm *p,
                             cl_event *event);
size_t atm_graph_sgemm_scratch(atmoe_graph *g, const struct atm_gemm *p);

/* Sets node n's runtime tensor (rt) for a batch. */
void atm_node_set_runtime(atmoe_graph *g, atm_node *n, size_t batch);
/* Bytes moved and FLOPs of node n at its runtime shapes. */
void atm_node_cost(const atmoe_graph *g, const atm_node *n, uint64_t *bytes,
                   uint64_t *flops);

#endif
