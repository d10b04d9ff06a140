/* Layout: reshape (an alias of its operand's memory), and the copies of
 * cl/tensor.cl that view, transpose, concatenate and convert. */
#include <config.h>

#include <string.h>

#include "graph/backward.h"
#include "graph/graph.h"

/* The copy kernel from the first operand's dtype to the node's. */
static atmoe_status copy_prepare(atmoe_graph *g, atm_node *n)
{
    return atm_copy_kernel(g->ctx, n->dtype, g->nodes[n->src[0]].dtype,
                           &n->kernel[0]);
}

static atmoe_status view_run(atmoe_graph *g, atm_node *n, cl_event *first,
                             cl_event *last)
{
    (void)last;
    const atmoe_tensor *x = atm_src_rt(g, n, 0);
    atmoe_tensor block = *x;
    for (int i = 0; i < x->ndim; i++) {
        block.offset += n->p.start[i] * x->stride[i];
        block.shape[i] = n->rt.shape[i];
    }
    return atm_tensor_copy_with(n->kernel[0], &n->rt, &block, first);
}

static atmoe_status cast_run(atmoe_graph *g, atm_node *n, cl_event *first,
                             cl_event *last)
{
    (void)last;
    return atm_tensor_copy_with(n->kernel[0], &n->rt, atm_src_rt(g, n, 0),
                                first);
}

static atmoe_status transpose_run(atmoe_graph *g, atm_node *n,
                                  cl_event *first, cl_event *last)
{
    (void)last;
    /* Reading x with its two strides exchanged is the transpose. */
    const atmoe_tensor *x = atm_src_rt(g, n, 0);
    int d0 = n->p.transpose.dim0, d1 = n->p.transpose.dim1;
    atmoe_tensor t = *x;
    t.shape[d0] = x->shape[d1];
    t.shape[d1] = x->shape[d0];
    t.stride[d0] = x->stride[d1];
    t.stride[d1] = x->stride[d0];
    return atm_tensor_copy_with(n->kernel[0], &n->rt, &t, first);
}

/* Copies src (any strides) into the block of dst that starts at start. */
static atmoe_status copy_into(cl_kernel k, const atmoe_tensor *dst,
                              const size_t *start, const atmoe_tensor *src,
                              cl_event *ev)
{
    atmoe_tensor block = *dst;
    for (int i = 0; i < dst->ndim; i++) {
        block.offset += start[i] * dst->stride[i];
        block.shape[i] = src->shape[i];
    }
    return atm_tensor_copy_with(k, &block, src, ev);
}

static atmoe_status concat_run(atmoe_graph *g, atm_node *n, cl_event *first,
                               cl_event *last)
{
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *y = atm_src_rt(g, n, 1);
    size_t start[ATMOE_MAX_DIMS] = {0};
    atmoe_status st = copy_into(n->kernel[0], &n->rt, start, x, first);
    if (st != ATMOE_STATUS_OK)
        return st;
    start[n->p.concat_dim] = x->shape[n->p.concat_dim];
    return copy_into(n->kernel[0], &n->rt, start, y, last);
}

/* ---------------------------------------------------------------- backward */

static atmoe_status reshape_backward(atmoe_graph *g, int node,
                                     const int *gout,
                                     const unsigned char *need, int *gin)
{
    (void)need;
    const atm_node *x = &g->nodes[g->nodes[node].src[0]];
    size_t shape[ATMOE_MAX_DIMS];
    int ndim = x->ndim;
    memcpy(shape, x->shape, sizeof shape);
    return atmoe_graph_reshape(g, gout[0], ndim, shape, &gin[0]);
}

static atmoe_status transpose_backward(atmoe_graph *g, int node,
                                       const int *gout,
                                       const unsigned char *need, int *gin)
{
    (void)need;
    const atm_node *n = &g->nodes[node];
    return atmoe_graph_transpose(g, gout[0], n->p.transpose.dim0,
                                 n->p.transpose.dim1, &gin[0]);
}

/* Each operand's block of dy. */
static atmoe_status concat_backward(atmoe_graph *g, int node,
                                    const int *gout,
                                    const unsigned char *need, int *gin)
{
    const atm_node *n = &g->nodes[node];
    int d = n->p.concat_dim;
    size_t start[ATMOE_MAX_DIMS] = {0}, shape[2][ATMOE_MAX_DIMS];
    size_t split = g->nodes[n->src[0]].shape[d];
    for (int i = 0; i < 2; i++)
        memcpy(shape[i], g->nodes[n->src[i]].shape, sizeof shape[i]);
    atmoe_status st = ATMOE_STATUS_OK;
    if (need[0])
        st = atmoe_graph_view(g, gout[0], start, shape[0], &gin[0]);
    start[d] = split;
    if (st == ATMOE_STATUS_OK && need[1])
        st = atmoe_graph_view(g, gout[0], start, shape[1], &gin[1]);
    return st;
}

/* Conversions between f32, f16 and bf16 pass the (f32) gradient through:
 * the rounding's derivative is taken as 1. */
static atmoe_status cast_backward(atmoe_graph *g, int node, const int *gout,
                                  const unsigned char *need, int *gin)
{
    (void)g;
    (void)node;
    (void)need;
    gin[0] = gout[0];
    return ATMOE_STATUS_OK;
}

/* A view's gradient: zeros, with dy in the view's block. */
static atmoe_status view_backward_prepare(atmoe_graph *g, atm_node *n)
{
    return atm_copy_kernel(g->ctx, ATMOE_DTYPE_F32, ATMOE_DTYPE_F32,
                           &n->kernel[1]);
}

static atmoe_status view_backward_run(atmoe_graph *g, atm_node *n,
                                      cl_event *first, cl_event *last)
{
    const atmoe_tensor *dy = atm_src_rt(g, n, 0);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_ulong(&a, atm_tensor_count(&n->rt));
    atmoe_status st = atm_node_launch(g, n, &a, "zero_f32",
                                      atm_tensor_count(&n->rt), first);
    if (st != ATMOE_STATUS_OK)
        return st;
    return copy_into(n->kernel[1], &n->rt, n->p.start, dy, last);
}

static const atm_op atm_op_view_backward = {
    .name = "view_backward",
    .program = "backward",
    .kernel = "zero_f32",
    .prepare = view_backward_prepare,
    .run = view_backward_run,
};

static atmoe_status view_backward(atmoe_graph *g, int node, const int *gout,
                                  const unsigned char *need, int *gin)
{
    (void)need;
    atm_node p;
    atm_grad_proto(g, &atm_op_view_backward, g->nodes[node].src[0], &p);
    memcpy(p.p.start, g->nodes[node].p.start, sizeof p.p.start);
    p.src[0] = gout[0];
    p.nsrc = 1;
    return atm_grad_push(g, &p, &gin[0]);
}

const atm_op atm_op_reshape = {.name = "reshape",
                               .flags = ATM_OPF_ALIAS,
                               .backward = reshape_backward};

#define COPY_OP(row, opname, run_fn, bw)                                      \
    const atm_op row = {.name = opname, .prepare = copy_prepare,              \
                        .run = run_fn, .backward = bw}

COPY_OP(atm_op_view, "view", view_run, view_backward);
COPY_OP(atm_op_transpose, "transpose", transpose_run, transpose_backward);
COPY_OP(atm_op_concat, "concat", concat_run, concat_backward);
COPY_OP(atm_op_cast, "cast", cast_run, cast_backward);

/* ---------------------------------------------------------------- builders */

ATMOE_API atmoe_status atmoe_graph_reshape(atmoe_graph *g, atmoe_node x,
                                           int ndim, const size_t *shape,
                                           atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    ATM_CHECK_NULL(g->ctx, shape);
    const atm_node *xn;
    atmoe_status st = atm_graph_get_node(g, x, fn, "x", &xn);
    if (st == ATMOE_STATUS_OK)
        st = atm_check_shape_args(g, fn, xn->dtype, ndim, shape);
    if (st != ATMOE_STATUS_OK)
        return st;
    size_t nx = 1, ny = 1;
    for (int i = 0; i < xn->ndim; i++)
        nx *= xn->shape[i];
    for (int i = 0; i < ndim; i++)
        ny *= shape[i];
    char d[160], s[96];
    if (nx != ny)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s has %zu elements, the shape %s has %zu", fn,
                        atm_node_desc(xn, d, sizeof d), nx,
                        atm_shape_string(ndim, shape, s, sizeof s), ny);
    atm_node p;
    atm_node_init(&p, &atm_op_reshape, xn->dtype, ndim, shape);
    if (xn->batch_dim >= 0) {
        /* The batch must stay the outermost dimension, for the rows of a
         * smaller batch to stay where a dense layout puts them. */
        if (xn->batch_dim != 0 || shape[0] % g->max_batch != 0)
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: %s is batched; the new shape %s must keep "
                            "the batch as a multiple of %zu in its first "
                            "dimension", fn, atm_node_desc(xn, d, sizeof d),
                            atm_shape_string(ndim, shape, s, sizeof s),
                            g->max_batch);
        p.batch_dim = 0;
        p.batch_factor = shape[0] / g->max_batch;
    }
    p.src[0] = x;
    p.nsrc = 1;
    return atm_graph_finish(g, &p, fn, out);
}

ATMOE_API atmoe_status atmoe_graph_view(atmoe_graph *g, atmoe_node x,
                                        const size_t *start,
                                        const size_t *shape, atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    ATM_CHECK_NULL(g->ctx, start);
    ATM_CHECK_NULL(g->ctx, shape);
    const atm_node *xn;
    atmoe_status st = atm_graph_get_node(g, x, fn, "x", &xn);
    if (st == ATMOE_STATUS_OK)
        st = atm_refuse_q8(g, fn, "x", xn);
    if (st != ATMOE_STATUS_OK)
        return st;
    char d[160], s[96];
    for (int i = 0; i < xn->ndim; i++) {
        if (shape[i] == 0 || start[i] >= xn->shape[i] ||
            shape[i] > xn->shape[i] - start[i])
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: a block of shape %s at %zu in dimension %d "
                            "does not fit in %s", fn,
                            atm_shape_string(xn->ndim, shape, s, sizeof s),
                            start[i], i, atm_node_desc(xn, d, sizeof d));
        if (i == xn->batch_dim && (start[i] != 0 || shape[i] != xn->shape[i]))
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: dimension %d of %s is the batch; a view "
                            "must keep all of it", fn, i,
                            atm_node_desc(xn, d, sizeof d));
    }
    atm_node p;
    atm_node_init(&p, &atm_op_view, xn->dtype, xn->ndim, shape);
    p.batch_dim = xn->batch_dim;
    p.batch_factor = xn->batch_factor;
    memcpy(p.p.start, start, (size_t)xn->ndim * sizeof *start);
    p.src[0] = x;
    p.nsrc = 1;
    return atm_graph_finish(g, &p, fn, out);
}

ATMOE_API atmoe_status atmoe_graph_transpose(atmoe_graph *g, atmoe_node x,
                                             int dim0, int dim1,
                                             atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    const atm_node *xn;
    int d0, d1;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, x, fn, "x", &xn)) ||
        (st = atm_refuse_q8(g, fn, "x", xn)) ||
        (st = atm_resolve_dim(g, fn, xn, dim0, &d0)) ||
        (st = atm_resolve_dim(g, fn, xn, dim1, &d1)))
        return st;
    atm_node p;
    atm_node_init(&p, &atm_op_transpose, xn->dtype, xn->ndim, xn->shape);
    p.shape[d0] = xn->shape[d1];
    p.shape[d1] = xn->shape[d0];
    p.batch_dim = xn->batch_dim == d0   ? d1
                  : xn->batch_dim == d1 ? d0
                                        : xn->batch_dim;
    p.batch_factor = xn->batch_factor;
    p.p.transpose.dim0 = d0;
    p.p.transpose.dim1 = d1;
    p.src[0] = x;
    p.nsrc = 1;
    return atm_graph_finish(g, &p, fn, out);
}

ATMOE_API atmoe_status atmoe_graph_concat(atmoe_graph *g, atmoe_node a,
                                          atmoe_node b, int dim,
                                          atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    const atm_node *an, *bn;
    int d;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, a, fn, "a", &an)) ||
        (st = atm_graph_get_node(g, b, fn, "b", &bn)) ||
        (st = atm_refuse_q8(g, fn, "a", an)) ||
        (st = atm_refuse_q8(g, fn, "b", bn)) ||
        (st = atm_resolve_dim(g, fn, an, dim, &d)))
        return st;
    char da[160], db[160];
    int ok = an->ndim == bn->ndim && an->dtype == bn->dtype &&
             an->batch_dim == bn->batch_dim &&
             an->batch_factor == bn->batch_factor && an->batch_dim != d;
    for (int i = 0; ok && i < an->ndim; i++)
        ok = i == d || an->shape[i] == bn->shape[i];
    if (!ok)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: a %s and b %s do not join along dimension %d "
                        "(dtypes, batch and every other dimension must "
                        "agree)", fn, atm_node_desc(an, da, sizeof da),
                        atm_node_desc(bn, db, sizeof db), dim);
    atm_node p;
    atm_node_init(&p, &atm_op_concat, an->dtype, an->ndim, an->shape);
    p.shape[d] = an->shape[d] + bn->shape[d];
    p.batch_dim = an->batch_dim;
    p.batch_factor = an->batch_factor;
    p.p.concat_dim = d;
    p.src[0] = a;
    p.src[1] = b;
    p.nsrc = 2;
    return atm_graph_finish(g, &p, fn, out);
}

ATMOE_API atmoe_status atmoe_graph_cast(atmoe_graph *g, atmoe_node x,
                                        atmoe_dtype dtype, atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    const atm_node *xn;
    atmoe_status st = atm_graph_get_node(g, x, fn, "x", &xn);
    if (st != ATMOE_STATUS_OK)
        return st;
    char d[160];
    /* A q8 x (a parameter) dequantises; nothing is cast into q8, whose
     * blocks a graph's arena does not hold. */
    if (atmoe_dtype_size(dtype) == 0 ||
        (dtype == ATMOE_DTYPE_I32) != (xn->dtype == ATMOE_DTYPE_I32))
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: cannot convert %s to dtype %d (f32, f16 and "
                        "bf16 convert into each other, q8 into any of them, "
                        "i32 into itself)", fn,
                        atm_node_desc(xn, d, sizeof d), (int)dtype);
    atm_node p;
    atm_node_init(&p, &atm_op_cast, dtype, xn->ndim, xn->shape);
    p.batch_dim = xn->batch_dim;
    p.batch_factor = xn->batch_factor;
    p.src[0] = x;
    p.nsrc = 1;
    return atm_graph_finish(g, &p, fn, out);
}
