/* Compute graphs: nodes as metadata (graph.c), the memory plan
 * (graph_plan.c) and the executor (graph_compute.c). */
#ifndef ATMOE_GRAPH_H
#define ATMOE_GRAPH_H

#include "tensor/tensor.h"

#define ATM_NODE_NAME_SIZE 64
#define ATM_MAX_SRC 5

typedef enum atm_op {
    ATM_OP_INPUT,
    ATM_OP_PARAMETER,
    ATM_OP_CONSTANT,
    ATM_OP_MATMUL,
    ATM_OP_ADD,
    ATM_OP_MUL,
    ATM_OP_SCALE,
    ATM_OP_SILU,
    ATM_OP_GELU,
    ATM_OP_SIGMOID,
    ATM_OP_SOFTMAX,
    ATM_OP_TOPK,
    ATM_OP_SECONDARY, /* a second output, written by its source's kernel */
    ATM_OP_RMSNORM,
    ATM_OP_LAYERNORM,
    ATM_OP_MEAN,
    ATM_OP_L2NORM,
    ATM_OP_GATHER_ROWS,
    ATM_OP_SCATTER_ADD_ROWS,
    ATM_OP_RESHAPE,
    ATM_OP_VIEW,
    ATM_OP_TRANSPOSE,
    ATM_OP_CONCAT,
    ATM_OP_CAST,
    ATM_OP_ROUTER,
    ATM_OP_MIXTURE,
    ATM_OP_COUNT_
} atm_op;

typedef struct atm_node {
    atm_op op;
    char name[ATM_NODE_NAME_SIZE];
    atmoe_dtype dtype;
    int ndim;
    size_t shape[ATMOE_MAX_DIMS]; /* at the planned (largest) batch */
    int batch_dim;                /* -1: not batched */
    size_t batch_factor;          /* shape[batch_dim] / planned batch */
    int src[ATM_MAX_SRC];         /* ATMOE_NODE_NONE when absent */
    int nsrc;

    /* Operation parameters. */
    unsigned flags; /* matmul transposes */
    float alpha;    /* scale */
    float eps;      /* norms */
    int dim, dim1;  /* reductions, transpose, concat */
    int k;          /* topk */
    int co[2];      /* secondary outputs (topk: indices; router: a, d) */
    const char *label; /* secondary outputs: what they hold, for dumps and
                          profiles ("topk_indices"); static storage */
    size_t work_bytes; /* scratch the operation needs while it runs */
    size_t work_offset;
    atmoe_router *router;  /* ROUTER (a reference) */
    atmoe_experts *experts; /* MIXTURE (a reference) */
    atmoe_mix mix;
    atmoe_merge merge;
    size_t start[ATMOE_MAX_DIMS]; /* view */

    atmoe_tensor *storage; /* parameters and constants */
    int is_output;

    /* The plan. */
    int needed;
    int owner;     /* node whose memory this one uses (itself, or the
                      source of a reshape or of an in-place operation) */
    int last_use;  /* position in the order of the last reader of this
                      node's memory (owners only) */
    int pinned;
    size_t bytes;  /* at the planned batch */
    size_t offset; /* in the arena, bytes */

    /* Computing. */
    size_t rows_set;    /* inputs: rows of the last set_input (1 when not
                           batched); 0 before the first */
    atmoe_tensor rt;    /* the node's tensor at the computed batch */
    cl_event event;     /* profiling: the node's first command */
    cl_event event_last; /* and its last, when it has several */
} atm_node;

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
     * sized at planning by a pass over the plan at the largest batch, so
     * that computing allocates nothing. */
    cl_mem gemm_temp;
    size_t gemm_temp_bytes;
    int sizing; /* the planning pass is running */
    int profiling;
    atmoe_compute_stats stats; /* of the last compute */
};

/* The operation's name for messages, dumps and profiles. */
const char *atm_op_name(atm_op op);
/* The same for a node: a secondary output's label, else its op's name. */
const char *atm_node_op_name(const atm_node *n);
/* Whether op may write its result over its first operand's memory. */
int atm_op_inplace(atm_op op);

/* Validates a node id for graph g (message set on failure). */
atmoe_status atm_graph_check_node(const atmoe_graph *g, atmoe_node n,
                                  const char *fn, const char *operand);

void atm_graph_unplan(atmoe_graph *g);
/* Whether the plan is current: made, and no node added since. */
int atm_graph_is_planned(const atmoe_graph *g);
/* Drops the nodes from count on, releasing what they hold: an operation
 * that adds several nodes adds all or none. */
void atm_graph_truncate(atmoe_graph *g, size_t count);

/* Building blocks for operations defined outside graph.c. */
void atm_node_init(atm_node *p, atm_op op, atmoe_dtype dtype, int ndim,
                   const size_t *shape);
/* Appends a copy of proto, named name (NULL or "": a default name). */
atmoe_status atm_graph_push(atmoe_graph *g, const atm_node *proto,
                            const char *name, const char *fn,
                            atmoe_node *out);
atmoe_status atm_graph_get_node(const atmoe_graph *g, atmoe_node id,
                                const char *fn, const char *operand,
                                const atm_node **n);
/* "'name' (op dtype [shape])", for messages. */
const char *atm_node_desc(const atm_node *n, char *buf, size_t size);

/* atm_sgemm with the graph's GEMM scratch; while sizing, records the
 * scratch it needs. */
struct atm_gemm;
atmoe_status atm_graph_sgemm(atmoe_graph *g, const struct atm_gemm *p,
                             cl_event *event);

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
atmoe_status atm_node_launch(atmoe_graph *g, const atm_node *n, atm_args *a,
                             const char *kernel, size_t work_items,
                             cl_event *ev);
/* The same with work-groups of `local` work-items (0: the driver's
 * choice). */
atmoe_status atm_node_launch_local(atmoe_graph *g, const atm_node *n,
                                   atm_args *a, const char *kernel,
                                   size_t work_items, size_t local,
                                   cl_event *ev);

/* Operations defined beside their objects (router.c, mixture.c). */
atmoe_status atm_router_node_prepare(atmoe_graph *g, const atm_node *n);
atmoe_status atm_router_node_run(atmoe_graph *g, atm_node *n, cl_event *ev);
atmoe_status atm_mixture_node_prepare(atmoe_graph *g, const atm_node *n);
atmoe_status atm_mixture_node_run(atmoe_graph *g, atm_node *n,
                                  cl_event *first, cl_event *last);
void atm_mixture_node_cost(const atmoe_graph *g, const atm_node *n,
                           uint64_t *bytes, uint64_t *flops);

/* Sets node n's runtime tensor (rt) for a batch. */
void atm_node_set_runtime(atmoe_graph *g, atm_node *n, size_t batch);
/* Runs node n (its sources already ran) with the runtime tensors set. */
atmoe_status atm_node_run(atmoe_graph *g, atm_node *n, cl_event *first,
                          cl_event *last);
/* Kernels that node n will use, built ahead of the first compute. */
atmoe_status atm_node_prepare(atmoe_graph *g, const atm_node *n);
/* Bytes moved and FLOPs of node n at its runtime shapes. */
void atm_node_cost(const atmoe_graph *g, const atm_node *n, uint64_t *bytes,
                   uint64_t *flops);

#endif
