/* Rows picked by index (cl/rows.cl): gather, and scatter-add, the
 * operation that routes rows back (and the gradient of a gather). */
#include <config.h>

#include "graph/backward.h"
#include "graph/graph.h"

enum { K_ROWS, K_COPY }; /* kernel slots */

static atmoe_status gather_run(atmoe_graph *g, atm_node *n, cl_event *first,
                               cl_event *last)
{
    (void)last;
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *idx = atm_src_rt(g, n, 1);
    const atmoe_tensor *out = &n->rt;
    cl_ulong row = atm_tensor_count(x) / x->shape[0];
    atm_args a = {n->kernel[K_ROWS], 0, CL_SUCCESS};
    atm_arg_tensor(&a, out);
    atm_arg_tensor(&a, x);
    atm_arg_tensor(&a, idx);
    atm_arg_ulong(&a, x->shape[0]);
    atm_arg_ulong(&a, row);
    atm_arg_ulong(&a, atm_tensor_count(out));
    return atm_node_launch(g, n, &a, n->op->name, atm_tensor_count(out),
                           first);
}

static atmoe_status scatter_prepare(atmoe_graph *g, atm_node *n)
{
    return atm_copy_kernel(g->ctx, ATMOE_DTYPE_F32, ATMOE_DTYPE_F32,
                           &n->kernel[K_COPY]);
}

static atmoe_status scatter_run(atmoe_graph *g, atm_node *n, cl_event *first,
                                cl_event *last)
{
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *idx = atm_src_rt(g, n, 1);
    const atmoe_tensor *src = atm_src_rt(g, n, 2);
    const atmoe_tensor *out = &n->rt;
    cl_event *ev = first;
    /* Out of place: start from a copy of dst. */
    if (out->buffer != x->buffer || out->offset != x->offset) {
        atmoe_status st = atm_tensor_copy_with(n->kernel[K_COPY], out, x,
                                               first);
        if (st != ATMOE_STATUS_OK)
            return st;
        ev = last;
    }
    cl_ulong row = atm_tensor_count(out) / out->shape[0];
    atm_args a = {n->kernel[K_ROWS], 0, CL_SUCCESS};
    atm_arg_tensor(&a, out);
    atm_arg_tensor(&a, idx);
    atm_arg_tensor(&a, src);
    atm_arg_ulong(&a, out->shape[0]);
    atm_arg_ulong(&a, row);
    atm_arg_ulong(&a, atm_tensor_count(src));
    return atm_node_launch(g, n, &a, n->op->name, atm_tensor_count(src), ev);
}

static void scatter_cost(const atmoe_graph *g, const atm_node *n,
                         uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    *flops = atm_tensor_count(atm_src_rt(g, n, 2));
}

/* Gather and scatter-add are each other's adjoints: a gathered row's
 * gradient adds into its table row (repeated indices add up), a scattered
 * row's gradient is gathered back.  Indices out of range drop a row in
 * both directions; the indices themselves get no gradient. */
static atmoe_status gather_backward(atmoe_graph *g, int node, const int *gout,
                                    const unsigned char *need, int *gin)
{
    (void)need;
    int table = g->nodes[node].src[0], idx = g->nodes[node].src[1], z;
    atmoe_status st = atm_grad_zeros(g, table, &z);
    return st != ATMOE_STATUS_OK
               ? st
               : atmoe_graph_scatter_add_rows(g, z, idx, gout[0], &gin[0]);
}

static atmoe_status scatter_backward(atmoe_graph *g, int node,
                                     const int *gout,
                                     const unsigned char *need, int *gin)
{
    if (need[0])
        gin[0] = gout[0];
    if (need[2])
        return atmoe_graph_gather_rows(g, gout[0], g->nodes[node].src[1],
                                       &gin[2]);
    return ATMOE_STATUS_OK;
}

const atm_op atm_op_gather_rows = {
    .name = "gather_rows",
    .program = "rows",
    .kernel = "gather_rows_f32",
    .run = gather_run,
    .backward = gather_backward,
};

const atm_op atm_op_scatter_add_rows = {
    .name = "scatter_add_rows",
    .flags = ATM_OPF_INPLACE,
    .program = "rows",
    .kernel = "scatter_add_rows_f32",
    .prepare = scatter_prepare,
    .run = scatter_run,
    .cost = scatter_cost,
    .backward = scatter_backward,
};

/* ---------------------------------------------------------------- builders */

ATMOE_API atmoe_status atmoe_graph_gather_rows(atmoe_graph *g,
                                               atmoe_node table,
                                               atmoe_node indices,
                                               atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    const atm_node *tn, *in;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, table, fn, "table", &tn)) ||
        (st = atm_graph_get_node(g, indices, fn, "indices", &in)) ||
        (st = atm_want_f32(g, fn, "table", tn)))
        return st;
    char d[160];
    if (in->dtype != ATMOE_DTYPE_I32 || in->ndim != 1)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: indices must be a 1-D i32 node; it is %s", fn,
                        atm_node_desc(in, d, sizeof d));
    if (in->batch_dim >= 0 && tn->batch_dim > 0)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: the indices and the table %s are both batched; "
                        "the result can follow only one batch", fn,
                        atm_node_desc(tn, d, sizeof d));
    atm_node p;
    atm_node_init(&p, &atm_op_gather_rows, ATMOE_DTYPE_F32, tn->ndim, tn->shape);
    p.shape[0] = in->shape[0];
    if (in->batch_dim == 0) {
        p.batch_dim = 0;
        p.batch_factor = in->batch_factor;
    } else if (tn->batch_dim > 0) {
        p.batch_dim = tn->batch_dim;
        p.batch_factor = tn->batch_factor;
    }
    p.src[0] = table;
    p.src[1] = indices;
    p.nsrc = 2;
    return atm_graph_finish(g, &p, fn, out);
}

ATMOE_API atmoe_status atmoe_graph_scatter_add_rows(atmoe_graph *g,
                                                    atmoe_node dst,
                                                    atmoe_node indices,
                                                    atmoe_node src,
                                                    atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    const atm_node *dn, *in, *sn;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, dst, fn, "dst", &dn)) ||
        (st = atm_graph_get_node(g, indices, fn, "indices", &in)) ||
        (st = atm_graph_get_node(g, src, fn, "src", &sn)) ||
        (st = atm_want_f32(g, fn, "dst", dn)) ||
        (st = atm_want_f32(g, fn, "src", sn)))
        return st;
    char d[160], e[160];
    if (in->dtype != ATMOE_DTYPE_I32 || in->ndim != 1)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: indices must be a 1-D i32 node; it is %s", fn,
                        atm_node_desc(in, d, sizeof d));
    int same = sn->ndim == dn->ndim && sn->shape[0] == in->shape[0];
    for (int i = 1; same && i < dn->ndim; i++)
        same = sn->shape[i] == dn->shape[i];
    /* src's rows follow the indices; a batch elsewhere in src must be
     * dst's batch too. */
    if (!same || (in->batch_dim >= 0) != (sn->batch_dim == 0) ||
        (sn->batch_dim > 0 && sn->batch_dim != dn->batch_dim) ||
        (dn->batch_dim >= 0 && dn->batch_dim != 0 &&
         dn->batch_dim != sn->batch_dim))
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: src must have one row per index and dst's row "
                        "shape: dst is %s, src is %s, %zu indices", fn,
                        atm_node_desc(dn, d, sizeof d), atm_node_desc(sn, e, sizeof e),
                        in->shape[0]);
    atm_node p;
    atm_node_like(&p, &atm_op_scatter_add_rows, dn, dst);
    p.src[1] = indices;
    p.src[2] = src;
    p.nsrc = 3;
    return atm_graph_finish(g, &p, fn, out);
}
