/* Reductions along a dimension (cl/reduce.cl): softmax, top-k, mean, L2
 * normalisation, and the norms over the last dimension, RMSNorm and
 * LayerNorm. */
#include <config.h>

#include <stdio.h>
#include <string.h>

#include "graph/backward.h"
#include "graph/graph.h"

/* Outer, n, inner around dimension d of t. */
static void split3(const atmoe_tensor *t, int d, cl_ulong *outer, cl_ulong *n,
                   cl_ulong *inner)
{
    *outer = *inner = 1;
    for (int i = 0; i < d; i++)
        *outer *= t->shape[i];
    *n = t->shape[d];
    for (int i = d + 1; i < t->ndim; i++)
        *inner *= t->shape[i];
}

/* softmax, mean and l2norm: one work-item per (outer, inner) line. */
static atmoe_status along_run(atmoe_graph *g, atm_node *n, cl_event *first,
                              cl_event *last)
{
    (void)last;
    const atmoe_tensor *x = atm_src_rt(g, n, 0);
    cl_ulong outer, len, inner;
    split3(x, n->p.reduce.dim, &outer, &len, &inner);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, x);
    atm_arg_ulong(&a, outer);
    atm_arg_ulong(&a, len);
    atm_arg_ulong(&a, inner);
    if (n->op == &atm_op_l2norm)
        atm_arg_float(&a, n->p.reduce.eps);
    return atm_node_launch(g, n, &a, n->op->name, outer * inner, first);
}

static atmoe_status topk_run(atmoe_graph *g, atm_node *n, cl_event *first,
                             cl_event *last)
{
    (void)last;
    const atmoe_tensor *x = atm_src_rt(g, n, 0);
    atm_node *ix = &g->nodes[n->co[0]];
    cl_ulong outer, len, inner;
    /* The kernel writes both; the planner places the indices whenever topk
     * runs, needed or not. */
    split3(x, n->p.topk.dim, &outer, &len, &inner);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, &ix->rt);
    atm_arg_tensor(&a, x);
    atm_arg_ulong(&a, outer);
    atm_arg_ulong(&a, len);
    atm_arg_ulong(&a, inner);
    atm_arg_ulong(&a, (cl_ulong)n->p.topk.k);
    return atm_node_launch(g, n, &a, n->op->name, outer * inner, first);
}

static atmoe_status norm_run(atmoe_graph *g, atm_node *n, cl_event *first,
                             cl_event *last)
{
    (void)last;
    const atmoe_tensor *x = atm_src_rt(g, n, 0);
    const atmoe_tensor *w = atm_src_rt(g, n, 1), *bias = atm_src_rt(g, n, 2);
    cl_ulong outer, len, inner;
    split3(x, x->ndim - 1, &outer, &len, &inner);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, x);
    atm_arg_tensor(&a, w ? w : x);
    atm_arg_int(&a, w != NULL);
    if (n->op == &atm_op_layernorm) {
        atm_arg_tensor(&a, bias ? bias : x);
        atm_arg_int(&a, bias != NULL);
    }
    atm_arg_ulong(&a, outer);
    atm_arg_ulong(&a, len);
    atm_arg_float(&a, n->p.reduce.eps);
    return atm_node_launch(g, n, &a, n->op->name, outer, first);
}

static void five_flops(const atmoe_graph *g, const atm_node *n,
                       uint64_t *bytes, uint64_t *flops)
{
    (void)g;
    (void)bytes;
    *flops = 5 * atm_tensor_count(&n->rt);
}

static void three_flops(const atmoe_graph *g, const atm_node *n,
                        uint64_t *bytes, uint64_t *flops)
{
    (void)g;
    (void)bytes;
    *flops = 3 * atm_tensor_count(&n->rt);
}

static void mean_cost(const atmoe_graph *g, const atm_node *n,
                      uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    *flops = atm_tensor_count(atm_src_rt(g, n, 0));
}

static void topk_cost(const atmoe_graph *g, const atm_node *n,
                      uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    *flops = atm_tensor_count(atm_src_rt(g, n, 0)) * (uint64_t)n->p.topk.k;
}

/* ---------------------------------------------------------------- backward */

static const atm_op atm_op_softmax_backward, atm_op_topk_backward,
    atm_op_mean_backward, atm_op_l2norm_backward, atm_op_rmsnorm_backward,
    atm_op_layernorm_backward;

/* The backward rows (cl/backward.cl) run over their result's lines: the
 * shape of the forward's operand x, around the forward's dimension. */
static atmoe_status line_backward_run(atmoe_graph *g, atm_node *n,
                                      cl_event *first, cl_event *last)
{
    (void)last;
    cl_ulong outer, len, inner;
    int dim = n->p.reduce.dim;
    if (n->op == &atm_op_topk_backward)
        dim = n->p.topk.dim;
    split3(&n->rt, dim, &outer, &len, &inner);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, atm_src_rt(g, n, 0));
    if (n->nsrc > 1)
        atm_arg_tensor(&a, atm_src_rt(g, n, 1));
    atm_arg_ulong(&a, outer);
    atm_arg_ulong(&a, len);
    atm_arg_ulong(&a, inner);
    if (n->op == &atm_op_l2norm_backward)
        atm_arg_float(&a, n->p.reduce.eps);
    if (n->op == &atm_op_topk_backward)
        atm_arg_ulong(&a, (cl_ulong)n->p.topk.k);
    size_t items = n->op == &atm_op_mean_backward ? outer * len * inner
                                                  : outer * inner;
    return atm_node_launch(g, n, &a, n->op->name, items, first);
}

static atmoe_status norm_backward_run(atmoe_graph *g, atm_node *n,
                                      cl_event *first, cl_event *last)
{
    (void)last;
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *w = atm_src_rt(g, n, 1);
    cl_ulong outer, len, inner;
    split3(x, x->ndim - 1, &outer, &len, &inner);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, x);
    atm_arg_tensor(&a, w ? w : x);
    atm_arg_int(&a, w != NULL);
    atm_arg_tensor(&a, atm_src_rt(g, n, 2));
    atm_arg_ulong(&a, outer);
    atm_arg_ulong(&a, len);
    atm_arg_float(&a, n->p.reduce.eps);
    return atm_node_launch(g, n, &a, n->op->name, outer, first);
}

#define BACKWARD_OP(row, opname, kname, run_fn)                               \
    static const atm_op row = {.name = opname,                                      \
                        .program = "backward",                               \
                        .kernel = kname,                                     \
                        .run = run_fn}

BACKWARD_OP(atm_op_softmax_backward, "softmax_backward",
            "softmax_backward_f32", line_backward_run);
BACKWARD_OP(atm_op_topk_backward, "topk_backward", "topk_backward_f32",
            line_backward_run);
BACKWARD_OP(atm_op_mean_backward, "mean_backward", "mean_backward_f32",
            line_backward_run);
BACKWARD_OP(atm_op_l2norm_backward, "l2norm_backward", "l2norm_backward_f32",
            line_backward_run);
BACKWARD_OP(atm_op_rmsnorm_backward, "rmsnorm_backward",
            "rmsnorm_backward_f32", norm_backward_run);
BACKWARD_OP(atm_op_layernorm_backward, "layernorm_backward",
            "layernorm_backward_f32", norm_backward_run);

/* A node of row op shaped like x (the forward's operand 0) over the
 * operands a and b, with the forward node's parameters. */
static atmoe_status line_node(atmoe_graph *g, const atm_op *op, int node,
                              int a, int b, int *out)
{
    atm_node p;
    atm_grad_proto(g, op, g->nodes[node].src[0], &p);
    p.p = g->nodes[node].p;
    p.src[0] = a;
    p.src[1] = b;
    p.nsrc = b == ATMOE_NODE_NONE ? 1 : 2;
    return atm_grad_push(g, &p, out);
}

/* From the result y: dx = y (dy - sum(dy y)). */
static atmoe_status softmax_backward(atmoe_graph *g, int node,
                                     const int *gout,
                                     const unsigned char *need, int *gin)
{
    (void)need;
    return line_node(g, &atm_op_softmax_backward, node, node, gout[0],
                     &gin[0]);
}

/* Only the kept entries get a gradient; the indices (gout[1]) none. */
static atmoe_status topk_backward(atmoe_graph *g, int node, const int *gout,
                                  const unsigned char *need, int *gin)
{
    (void)need;
    if (gout[0] == ATMOE_NODE_NONE)
        return ATMOE_STATUS_OK;
    return line_node(g, &atm_op_topk_backward, node, gout[0],
                     g->nodes[node].co[0], &gin[0]);
}

static atmoe_status mean_backward(atmoe_graph *g, int node, const int *gout,
                                  const unsigned char *need, int *gin)
{
    (void)need;
    return line_node(g, &atm_op_mean_backward, node, gout[0],
                     ATMOE_NODE_NONE, &gin[0]);
}

static atmoe_status l2norm_backward(atmoe_graph *g, int node,
                                    const int *gout,
                                    const unsigned char *need, int *gin)
{
    (void)need;
    return line_node(g, &atm_op_l2norm_backward, node,
                     g->nodes[node].src[0], gout[0], &gin[0]);
}

/* dx by a row of cl/backward.cl; the weight's gradient as the sum over
 * rows of dy xhat, with xhat the norm without weight and bias (a forward
 * node of the same operation); the bias's as the sum of dy. */
static atmoe_status norm_backward(atmoe_graph *g, int node, const int *gout,
                                  const unsigned char *need, int *gin)
{
    const atm_node *n = &g->nodes[node];
    int layer = n->op == &atm_op_layernorm;
    int x = n->src[0], w = n->src[1], bias = n->src[2], dy = gout[0];
    float eps = n->p.reduce.eps;
    atmoe_status st = ATMOE_STATUS_OK;
    if (need[0]) {
        atm_node p;
        atm_grad_proto(g, layer ? &atm_op_layernorm_backward
                                : &atm_op_rmsnorm_backward, x, &p);
        p.p.reduce = n->p.reduce;
        p.src[0] = x;
        p.src[1] = w;
        p.src[2] = dy;
        p.nsrc = 3;
        st = atm_grad_push(g, &p, &gin[0]);
    }
    if (st == ATMOE_STATUS_OK && need[1]) {
        atmoe_node xhat, t;
        st = layer ? atmoe_graph_layernorm(g, x, ATMOE_NODE_NONE,
                                           ATMOE_NODE_NONE, eps, &xhat)
                   : atmoe_graph_rmsnorm(g, x, ATMOE_NODE_NONE, eps, &xhat);
        if (st == ATMOE_STATUS_OK)
            st = atmoe_graph_mul(g, dy, xhat, &t);
        if (st == ATMOE_STATUS_OK)
            st = atm_grad_sum_to(g, t, w, &gin[1]);
    }
    if (st == ATMOE_STATUS_OK && need[2])
        st = atm_grad_sum_to(g, dy, bias, &gin[2]);
    return st;
}

#define REDUCE_OP(row, opname, kname, run_fn, cost_fn, fl, bw)                \
    const atm_op row = {.name = opname,                                      \
                        .flags = (fl),                                       \
                        .program = "reduce",                                 \
                        .kernel = kname,                                     \
                        .run = run_fn,                                       \
                        .cost = cost_fn,                                     \
                        .backward = bw}

REDUCE_OP(atm_op_softmax, "softmax", "softmax_f32", along_run, five_flops,
          ATM_OPF_INPLACE, softmax_backward);
REDUCE_OP(atm_op_mean, "mean", "mean_f32", along_run, mean_cost, 0,
          mean_backward);
REDUCE_OP(atm_op_l2norm, "l2norm", "l2norm_f32", along_run, three_flops,
          ATM_OPF_INPLACE, l2norm_backward);
REDUCE_OP(atm_op_topk, "topk", "topk_f32", topk_run, topk_cost, 0,
          topk_backward);
REDUCE_OP(atm_op_rmsnorm, "rmsnorm", "rmsnorm_f32", norm_run, three_flops,
          ATM_OPF_INPLACE, norm_backward);
REDUCE_OP(atm_op_layernorm, "layernorm", "layernorm_f32", norm_run,
          five_flops, ATM_OPF_INPLACE, norm_backward);

/* ---------------------------------------------------------------- builders */

ATMOE_API atmoe_status atmoe_graph_softmax(atmoe_graph *g, atmoe_node x,
                                           int dim, atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    atm_node p;
    atmoe_status st = atm_unary_proto(g, &atm_op_softmax, x, __func__, &p);
    if (st == ATMOE_STATUS_OK)
        st = atm_resolve_dim(g, __func__, &g->nodes[x], dim, &p.p.reduce.dim);
    return st != ATMOE_STATUS_OK ? st : atm_graph_finish(g, &p, __func__, out);
}

ATMOE_API atmoe_status atmoe_graph_l2norm(atmoe_graph *g, atmoe_node x,
                                          int dim, float eps, atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    atm_node p;
    atmoe_status st = atm_unary_proto(g, &atm_op_l2norm, x, __func__, &p);
    if (st == ATMOE_STATUS_OK)
        st = atm_resolve_dim(g, __func__, &g->nodes[x], dim, &p.p.reduce.dim);
    if (st == ATMOE_STATUS_OK && !(eps >= 0))
        st = atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                      "%s: eps must be >= 0, it is %g", __func__, eps);
    p.p.reduce.eps = eps;
    return st != ATMOE_STATUS_OK ? st : atm_graph_finish(g, &p, __func__, out);
}

ATMOE_API atmoe_status atmoe_graph_topk(atmoe_graph *g, atmoe_node x, int k,
                                        int dim, atmoe_node *values,
                                        atmoe_node *indices)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    if (values == NULL && indices == NULL)
        return atm_fail(g->ctx, ATMOE_STATUS_NULL_POINTER,
                        "%s: values and indices are both NULL", fn);
    atm_node p;
    atmoe_status st = atm_unary_proto(g, &atm_op_topk, x, fn, &p);
    if (st == ATMOE_STATUS_OK)
        st = atm_resolve_dim(g, fn, &g->nodes[x], dim, &p.p.topk.dim);
    if (st != ATMOE_STATUS_OK)
        return st;
    const atm_node *xn = &g->nodes[x];
    char d[160];
    if (p.p.topk.dim == xn->batch_dim)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: dimension %d of %s is the batch", fn, dim,
                        atm_node_desc(xn, d, sizeof d));
    if (k < 1 || (size_t)k > xn->shape[p.p.topk.dim])
        return atm_fail(g->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: k is %d, must be 1 to %zu for %s", fn, k,
                        xn->shape[p.p.topk.dim], atm_node_desc(xn, d, sizeof d));
    p.p.topk.k = k;
    p.shape[p.p.topk.dim] = (size_t)k;
    atmoe_node v, ix;
    if ((st = atm_graph_push(g, &p, NULL, fn, &v)) != ATMOE_STATUS_OK)
        return st;
    atm_node q = g->nodes[v];
    q.op = &atm_op_secondary;
    q.label = "topk_indices";
    q.dtype = ATMOE_DTYPE_I32;
    q.src[0] = v;
    q.nsrc = 1;
    /* "<values>.indices" when that fits and is free, else a default. */
    char name[ATM_NODE_NAME_SIZE + 16];
    snprintf(name, sizeof name, "%s.indices", g->nodes[v].name);
    int usable = strlen(name) < ATM_NODE_NAME_SIZE &&
                 atm_graph_lookup(g, name) == ATMOE_NODE_NONE;
    if ((st = atm_graph_push(g, &q, usable ? name : NULL, fn, &ix)) !=
        ATMOE_STATUS_OK) {
        atm_graph_truncate(g, (size_t)v); /* the pair goes in whole */
        return st;
    }
    g->nodes[v].co[0] = ix;
    if (values)
        *values = v;
    if (indices)
        *indices = ix;
    return ATMOE_STATUS_OK;
}

static atmoe_status norm(atmoe_graph *g, const atm_op *op, atmoe_node x,
                         atmoe_node weight, atmoe_node bias, float eps,
                         const char *fn, atmoe_node *out)
{
    if (g == NULL)
        return atm_fail(NULL, ATMOE_STATUS_NULL_POINTER,
                        "%s: argument 'graph' is NULL", fn);
    atm_node p;
    atmoe_status st = atm_unary_proto(g, op, x, fn, &p);
    if (st != ATMOE_STATUS_OK)
        return st;
    const atm_node *xn = &g->nodes[x];
    size_t len = xn->shape[xn->ndim - 1];
    char d[160], e[160];
    if (xn->batch_dim == xn->ndim - 1)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: the last dimension of %s is the batch", fn,
                        atm_node_desc(xn, d, sizeof d));
    if (!(eps >= 0))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: eps must be >= 0, it is %g", fn, eps);
    atmoe_node opt[2] = {weight, bias};
    const char *what[2] = {"weight", "bias"};
    for (int i = 0; i < 2; i++) {
        if (opt[i] == ATMOE_NODE_NONE)
            continue;
        const atm_node *wn;
        if ((st = atm_graph_get_node(g, opt[i], fn, what[i], &wn)) ||
            (st = atm_want_f32(g, fn, what[i], wn)))
            return st;
        if (wn->ndim != 1 || wn->shape[0] != len || wn->batch_dim >= 0)
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: %s must be [%zu] to match x %s; it is %s", fn,
                            what[i], len, atm_node_desc(xn, d, sizeof d),
                            atm_node_desc(wn, e, sizeof e));
    }
    p.src[1] = weight;
    p.src[2] = bias;
    p.nsrc = 3;
    p.p.reduce.eps = eps;
    p.p.reduce.dim = xn->ndim - 1;
    return atm_graph_finish(g, &p, fn, out);
}

ATMOE_API atmoe_status atmoe_graph_rmsnorm(atmoe_graph *g, atmoe_node x,
                                           atmoe_node weight, float eps,
                                           atmoe_node *out)
{
    return norm(g, &atm_op_rmsnorm, x, weight, ATMOE_NODE_NONE, eps,
                "atmoe_graph_rmsnorm", out);
}

ATMOE_API atmoe_status atmoe_graph_layernorm(atmoe_graph *g, atmoe_node x,
                                             atmoe_node weight,
                                             atmoe_node bias, float eps,
                                             atmoe_node *out)
{
    return norm(g, &atm_op_layernorm, x, weight, bias, eps,
                "atmoe_graph_layernorm", out);
}

ATMOE_API atmoe_status atmoe_graph_mean(atmoe_graph *g, atmoe_node x, int dim,
                                        atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    atm_node p;
    atmoe_status st = atm_unary_proto(g, &atm_op_mean, x, __func__, &p);
    int d;
    if (st == ATMOE_STATUS_OK)
        st = atm_resolve_dim(g, __func__, &g->nodes[x], dim, &d);
    if (st != ATMOE_STATUS_OK)
        return st;
    const atm_node *xn = &g->nodes[x];
    if (xn->ndim == 1) {
        p.shape[0] = 1; /* the mean of a vector is a 1-element vector */
    } else {
        p.ndim = xn->ndim - 1;
        for (int i = d; i < p.ndim; i++)
            p.shape[i] = xn->shape[i + 1];
        p.shape[p.ndim] = 0;
    }
    if (xn->batch_dim == d)
        p.batch_dim = -1;
    else if (xn->batch_dim > d)
        p.batch_dim = xn->batch_dim - 1;
    if (p.batch_dim < 0)
        p.batch_factor = 0;
    p.p.reduce.dim = d;
    return atm_graph_finish(g, &p, __func__, out);
}
