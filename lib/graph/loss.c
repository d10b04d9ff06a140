/* Losses as graph operations (cl/loss.cl): mean squared error,
 * cross-entropy over logits with an ignore index, and the load-balancing
 * loss over router weights; each a scalar [1] node with its backward. */
#include <config.h>

#include "graph/backward.h"
#include "graph/graph.h"

#define LOSS_WG 64 /* cl/loss.cl's work-group */

typedef struct ce_params {
    int ignore_index;
} ce_params;

enum { K_FIRST, K_SECOND }; /* kernel slots of the two-kernel backwards */

static atmoe_status one_group(atmoe_graph *g, atm_node *n, atm_args *a,
                              cl_event *ev)
{
    return atm_node_launch_local(g, n, a, n->op->kernel, LOSS_WG, LOSS_WG,
                                 ev);
}

static cl_ulong rows_of(const atmoe_tensor *t)
{
    return t->shape[0];
}

/* ---------------------------------------------------------------- MSE */

static atmoe_status mse_run(atmoe_graph *g, atm_node *n, cl_event *first,
                            cl_event *last)
{
    (void)last;
    const atmoe_tensor *p = atm_src_rt(g, n, 0);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, p);
    atm_arg_tensor(&a, atm_src_rt(g, n, 1));
    atm_arg_ulong(&a, atm_tensor_count(p));
    return one_group(g, n, &a, first);
}

static atmoe_status mse_backward_run(atmoe_graph *g, atm_node *n,
                                     cl_event *first, cl_event *last)
{
    (void)last;
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    for (int i = 0; i < 3; i++)
        atm_arg_tensor(&a, atm_src_rt(g, n, i));
    atm_arg_ulong(&a, atm_tensor_count(&n->rt));
    return atm_node_launch(g, n, &a, n->op->name, atm_tensor_count(&n->rt),
                           first);
}

static const atm_op atm_op_mse_backward = {.name = "loss_mse_backward",
                                           .program = "loss",
                                           .kernel = "mse_backward_f32",
                                           .run = mse_backward_run};

/* d/dpred = 2 (pred - target) / count dL; d/dtarget its negative. */
static atmoe_status mse_backward(atmoe_graph *g, int node, const int *gout,
                                 const unsigned char *need, int *gin)
{
    atm_node p;
    const atm_node *n = &g->nodes[node];
    atm_grad_proto(g, &atm_op_mse_backward, n->src[0], &p);
    p.src[0] = n->src[0];
    p.src[1] = n->src[1];
    p.src[2] = gout[0];
    p.nsrc = 3;
    int dp;
    atmoe_status st = atm_grad_push(g, &p, &dp);
    if (st == ATMOE_STATUS_OK && need[0])
        gin[0] = dp;
    if (st == ATMOE_STATUS_OK && need[1])
        st = atmoe_graph_scale(g, dp, -1.0f, &gin[1]);
    return st;
}

static void mse_cost(const atmoe_graph *g, const atm_node *n,
                     uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    *flops = 3 * atm_tensor_count(atm_src_rt(g, n, 0));
}

const atm_op atm_op_loss_mse = {.name = "loss_mse",
                                .program = "loss",
                                .kernel = "mse_f32",
                                .run = mse_run,
                                .cost = mse_cost,
                                .backward = mse_backward};

/* ---------------------------------------------------------------- cross-entropy */

static atmoe_status ce_run(atmoe_graph *g, atm_node *n, cl_event *first,
                           cl_event *last)
{
    (void)last;
    const atmoe_tensor *x = atm_src_rt(g, n, 0);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, x);
    atm_arg_tensor(&a, atm_src_rt(g, n, 1));
    atm_arg_ulong(&a, rows_of(x));
    atm_arg_ulong(&a, x->shape[1]);
    atm_arg_int(&a, ATM_NODE_PARAMS(ce_params, n)->ignore_index);
    return one_group(g, n, &a, first);
}

static atmoe_status ce_backward_prepare(atmoe_graph *g, atm_node *n)
{
    return atm_node_kernel(g, n, K_SECOND, "loss", NULL,
                           "cross_entropy_backward_f32");
}

/* The count of rows that are not ignored, between the two kernels. */
static size_t one_float(const atmoe_graph *g, const atm_node *n)
{
    (void)g;
    (void)n;
    return sizeof(float);
}

static atmoe_status ce_backward_run(atmoe_graph *g, atm_node *n,
                                    cl_event *first, cl_event *last)
{
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *labels = atm_src_rt(g, n, 1);
    cl_ulong work = n->work_offset / sizeof(float);
    int ignore = ATM_NODE_PARAMS(ce_params, n)->ignore_index;
    atm_args a = {n->kernel[K_FIRST], 0, CL_SUCCESS};
    atm_arg_buffer(&a, g->arena);
    atm_arg_ulong(&a, work);
    atm_arg_tensor(&a, labels);
    atm_arg_ulong(&a, rows_of(x));
    atm_arg_int(&a, ignore);
    atmoe_status st = atm_node_launch_local(g, n, &a, "cross_entropy_count_f32",
                                            LOSS_WG, LOSS_WG, first);
    if (st != ATMOE_STATUS_OK)
        return st;
    atm_args b = {n->kernel[K_SECOND], 0, CL_SUCCESS};
    atm_arg_tensor(&b, &n->rt);
    atm_arg_tensor(&b, x);
    atm_arg_tensor(&b, labels);
    atm_arg_tensor(&b, atm_src_rt(g, n, 2));
    atm_arg_buffer(&b, g->arena);
    atm_arg_ulong(&b, work);
    atm_arg_ulong(&b, rows_of(x));
    atm_arg_ulong(&b, x->shape[1]);
    atm_arg_int(&b, ignore);
    return atm_node_launch(g, n, &b, "cross_entropy_backward_f32",
                           rows_of(x), last);
}

static const atm_op atm_op_ce_backward = {.name = "loss_cross_entropy_backward",
                                          .program = "loss",
                                          .kernel = "cross_entropy_count_f32",
                                          .prepare = ce_backward_prepare,
                                          .scratch = one_float,
                                          .run = ce_backward_run};

static atmoe_status ce_backward(atmoe_graph *g, int node, const int *gout,
                                const unsigned char *need, int *gin)
{
    (void)need;
    atm_node p;
    const atm_node *n = &g->nodes[node];
    atm_grad_proto(g, &atm_op_ce_backward, n->src[0], &p);
    p.p = n->p;
    p.src[0] = n->src[0];
    p.src[1] = n->src[1];
    p.src[2] = gout[0];
    p.nsrc = 3;
    return atm_grad_push(g, &p, &gin[0]);
}

static void ce_cost(const atmoe_graph *g, const atm_node *n, uint64_t *bytes,
                    uint64_t *flops)
{
    (void)bytes;
    *flops = 4 * atm_tensor_count(atm_src_rt(g, n, 0));
}

const atm_op atm_op_loss_cross_entropy = {.name = "loss_cross_entropy",
                                          .program = "loss",
                                          .kernel = "cross_entropy_f32",
                                          .run = ce_run,
                                          .cost = ce_cost,
                                          .backward = ce_backward};

/* ---------------------------------------------------------------- load balance */

static atmoe_status lb_run(atmoe_graph *g, atm_node *n, cl_event *first,
                           cl_event *last)
{
    (void)last;
    const atmoe_tensor *w = atm_src_rt(g, n, 0);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, w);
    atm_arg_ulong(&a, rows_of(w));
    atm_arg_ulong(&a, w->shape[1]);
    return one_group(g, n, &a, first);
}

static atmoe_status lb_backward_prepare(atmoe_graph *g, atm_node *n)
{
    return atm_node_kernel(g, n, K_SECOND, "loss", NULL,
                           "load_balance_backward_f32");
}

/* The per-expert top-1 counts, between the two kernels. */
static size_t expert_floats(const atmoe_graph *g, const atm_node *n)
{
    (void)g;
    return n->shape[1] * sizeof(float);
}

static atmoe_status lb_backward_run(atmoe_graph *g, atm_node *n,
                                    cl_event *first, cl_event *last)
{
    const atmoe_tensor *w = atm_src_rt(g, n, 0);
    cl_ulong work = n->work_offset / sizeof(float), experts = w->shape[1];
    atm_args a = {n->kernel[K_FIRST], 0, CL_SUCCESS};
    atm_arg_buffer(&a, g->arena);
    atm_arg_ulong(&a, work);
    atm_arg_tensor(&a, w);
    atm_arg_ulong(&a, rows_of(w));
    atm_arg_ulong(&a, experts);
    atmoe_status st = atm_node_launch(g, n, &a, "load_balance_count_f32",
                                      experts, first);
    if (st != ATMOE_STATUS_OK)
        return st;
    atm_args b = {n->kernel[K_SECOND], 0, CL_SUCCESS};
    atm_arg_tensor(&b, &n->rt);
    atm_arg_buffer(&b, g->arena);
    atm_arg_ulong(&b, work);
    atm_arg_tensor(&b, atm_src_rt(g, n, 1));
    atm_arg_ulong(&b, rows_of(w));
    atm_arg_ulong(&b, experts);
    return atm_node_launch(g, n, &b, "load_balance_backward_f32",
                           atm_tensor_count(w), last);
}

static const atm_op atm_op_lb_backward = {.name = "loss_load_balance_backward",
                                          .program = "loss",
                                          .kernel = "load_balance_count_f32",
                                          .prepare = lb_backward_prepare,
                                          .scratch = expert_floats,
                                          .run = lb_backward_run};

/* Through P only: the top-1 fractions f are counts, with no gradient. */
static atmoe_status lb_backward(atmoe_graph *g, int node, const int *gout,
                                const unsigned char *need, int *gin)
{
    (void)need;
    atm_node p;
    const atm_node *n = &g->nodes[node];
    atm_grad_proto(g, &atm_op_lb_backward, n->src[0], &p);
    p.src[0] = n->src[0];
    p.src[1] = gout[0];
    p.nsrc = 2;
    return atm_grad_push(g, &p, &gin[0]);
}

static void lb_cost(const atmoe_graph *g, const atm_node *n, uint64_t *bytes,
                    uint64_t *flops)
{
    (void)bytes;
    const atmoe_tensor *w = atm_src_rt(g, n, 0);
    *flops = 2 * atm_tensor_count(w) * w->shape[1];
}

const atm_op atm_op_loss_load_balance = {.name = "loss_load_balance",
                                         .program = "loss",
                                         .kernel = "load_balance_f32",
                                         .run = lb_run,
                                         .cost = lb_cost,
                                         .backward = lb_backward};

/* ---------------------------------------------------------------- builders */

/* A scalar [1] node of op, not batched. */
static void scalar_proto(atm_node *p, const atm_op *op)
{
    static const size_t one[1] = {1};
    atm_node_init(p, op, ATMOE_DTYPE_F32, 1, one);
}

ATMOE_API atmoe_status atmoe_graph_loss_mse(atmoe_graph *g, atmoe_node pred,
                                            atmoe_node target,
                                            atmoe_node *loss)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    const atm_node *pn, *tn;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, pred, fn, "pred", &pn)) ||
        (st = atm_graph_get_node(g, target, fn, "target", &tn)) ||
        (st = atm_want_f32(g, fn, "pred", pn)) ||
        (st = atm_want_f32(g, fn, "target", tn)))
        return st;
    char a[160], b[160];
    int same = pn->ndim == tn->ndim && pn->batch_dim == tn->batch_dim &&
               (pn->batch_dim < 0 || pn->batch_factor == tn->batch_factor);
    for (int i = 0; same && i < pn->ndim; i++)
        same = pn->shape[i] == tn->shape[i];
    if (!same)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: pred %s and target %s must have one shape and "
                        "batch", fn, atm_node_desc(pn, a, sizeof a),
                        atm_node_desc(tn, b, sizeof b));
    atm_node p;
    scalar_proto(&p, &atm_op_loss_mse);
    p.src[0] = pred;
    p.src[1] = target;
    p.nsrc = 2;
    return atm_graph_finish(g, &p, fn, loss);
}

ATMOE_API atmoe_status atmoe_graph_loss_cross_entropy(atmoe_graph *g,
                                                      atmoe_node logits,
                                                      atmoe_node labels,
                                                      int ignore_index,
                                                      atmoe_node *loss)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    const atm_node *xn, *ln;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, logits, fn, "logits", &xn)) ||
        (st = atm_graph_get_node(g, labels, fn, "labels", &ln)) ||
        (st = atm_want_f32(g, fn, "logits", xn)))
        return st;
    char a[160], b[160];
    if (ln->dtype != ATMOE_DTYPE_I32)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: labels %s must be i32", fn,
                        atm_node_desc(ln, a, sizeof a));
    if (xn->ndim != 2 || xn->batch_dim == 1)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: logits %s must be [T, C], batched in T if at "
                        "all", fn, atm_node_desc(xn, a, sizeof a));
    if (ln->ndim != 1 || ln->shape[0] != xn->shape[0] ||
        ln->batch_dim != xn->batch_dim ||
        (ln->batch_dim >= 0 && ln->batch_factor != xn->batch_factor))
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: labels %s must be [%zu], one per row of logits "
                        "%s, batched as they are", fn,
                        atm_node_desc(ln, a, sizeof a), xn->shape[0],
                        atm_node_desc(xn, b, sizeof b));
    atm_node p;
    scalar_proto(&p, &atm_op_loss_cross_entropy);
    ATM_NODE_PARAMS(ce_params, &p)->ignore_index = ignore_index;
    p.src[0] = logits;
    p.src[1] = labels;
    p.nsrc = 2;
    return atm_graph_finish(g, &p, fn, loss);
}

ATMOE_API atmoe_status atmoe_graph_loss_load_balance(atmoe_graph *g,
                                                     atmoe_node router_weights,
                                                     atmoe_node *loss)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    const atm_node *wn;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, router_weights, fn, "router_weights",
                                 &wn)) ||
        (st = atm_want_f32(g, fn, "router_weights", wn)))
        return st;
    char a[160];
    if (wn->ndim != 2 || wn->batch_dim == 1)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: router_weights %s must be [T, E], batched in T "
                        "if at all", fn, atm_node_desc(wn, a, sizeof a));
    atm_node p;
    scalar_proto(&p, &atm_op_loss_load_balance);
    p.src[0] = router_weights;
    p.nsrc = 1;
    return atm_graph_finish(g, &p, fn, loss);
}
