/* Element-wise operations: add and mul with numpy broadcasting, scale, and
 * the activations SiLU, GELU and sigmoid (cl/elementwise.cl). */
#include <config.h>

#include <string.h>

#include "graph/backward.h"
#include "graph/graph.h"

/* Pads an operand to the output's rank and gives broadcast dimensions
 * stride 0 (see cl/elementwise.cl). */
static void broadcast4(const atmoe_tensor *x, const atmoe_tensor *out,
                       cl_ulong4 *stride, cl_uint4 *shape)
{
    int pad = 4 - out->ndim, shift = out->ndim - x->ndim;
    memset(stride, 0, sizeof *stride);
    for (int i = 0; i < 4; i++)
        shape->s[i] = 1;
    for (int i = 0; i < out->ndim; i++) {
        shape->s[pad + i] = (cl_uint)out->shape[i];
        int xi = i - shift;
        if (xi >= 0 && x->shape[xi] != 1)
            stride->s[pad + i] = x->stride[xi];
    }
}

static atmoe_status binary_run(atmoe_graph *g, atm_node *n, cl_event *first,
                               cl_event *last)
{
    (void)last;
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *y = atm_src_rt(g, n, 1);
    const atmoe_tensor *out = &n->rt;
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    cl_ulong4 sx, sy;
    cl_uint4 shape;
    broadcast4(x, out, &sx, &shape);
    broadcast4(y, out, &sy, &shape);
    atm_arg_tensor(&a, out);
    atm_arg_tensor(&a, x);
    atm_arg(&a, sizeof sx, &sx);
    atm_arg_tensor(&a, y);
    atm_arg(&a, sizeof sy, &sy);
    atm_arg(&a, sizeof shape, &shape);
    atm_arg_ulong(&a, atm_tensor_count(out));
    return atm_node_launch(g, n, &a, n->op->name, atm_tensor_count(out),
                           first);
}

/* scale and the activations take the same arguments (alpha unused by the
 * activations). */
static atmoe_status unary_run(atmoe_graph *g, atm_node *n, cl_event *first,
                              cl_event *last)
{
    (void)last;
    const atmoe_tensor *out = &n->rt;
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, out);
    atm_arg_tensor(&a, atm_src_rt(g, n, 0));
    atm_arg_ulong(&a, atm_tensor_count(out));
    atm_arg_float(&a, n->p.alpha);
    return atm_node_launch(g, n, &a, n->op->name, atm_tensor_count(out),
                           first);
}

static void one_flop(const atmoe_graph *g, const atm_node *n,
                     uint64_t *bytes, uint64_t *flops)
{
    (void)g;
    (void)bytes;
    *flops = atm_tensor_count(&n->rt);
}

/* An exp or erf, a divide, a multiply-add. */
static void four_flops(const atmoe_graph *g, const atm_node *n,
                       uint64_t *bytes, uint64_t *flops)
{
    (void)g;
    (void)bytes;
    *flops = 4 * atm_tensor_count(&n->rt);
}

/* ---------------------------------------------------------------- backward */

/* d(a + b): dy, summed over what each operand was broadcast along. */
static atmoe_status add_backward(atmoe_graph *g, int node, const int *gout,
                                 const unsigned char *need, int *gin)
{
    for (int i = 0; i < 2; i++)
        if (need[i]) {
            atmoe_status st =
                atm_grad_sum_to(g, gout[0], g->nodes[node].src[i], &gin[i]);
            if (st != ATMOE_STATUS_OK)
                return st;
        }
    return ATMOE_STATUS_OK;
}

/* d(a b): dy b for a and dy a for b, each summed to its operand. */
static atmoe_status mul_backward(atmoe_graph *g, int node, const int *gout,
                                 const unsigned char *need, int *gin)
{
    for (int i = 0; i < 2; i++) {
        if (!need[i])
            continue;
        int self = g->nodes[node].src[i], other = g->nodes[node].src[1 - i];
        atmoe_node t;
        atmoe_status st = atmoe_graph_mul(g, gout[0], other, &t);
        if (st == ATMOE_STATUS_OK)
            st = atm_grad_sum_to(g, t, self, &gin[i]);
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    return ATMOE_STATUS_OK;
}

static atmoe_status scale_backward(atmoe_graph *g, int node, const int *gout,
                                   const unsigned char *need, int *gin)
{
    (void)need;
    return atmoe_graph_scale(g, gout[0], g->nodes[node].p.alpha, &gin[0]);
}

/* dx = dy f'(x): one node of the activation's backward row over dy (its
 * first operand, which it may overwrite) and x. */
static atmoe_status act_backward(atmoe_graph *g, const atm_op *op, int node,
                                 const int *gout, int *gin)
{
    atm_node p;
    int x = g->nodes[node].src[0];
    atm_grad_proto(g, op, x, &p);
    p.src[0] = gout[0];
    p.src[1] = x;
    p.nsrc = 2;
    return atm_grad_push(g, &p, &gin[0]);
}

static atmoe_status act_backward_run(atmoe_graph *g, atm_node *n,
                                     cl_event *first, cl_event *last)
{
    (void)last;
    const atmoe_tensor *out = &n->rt;
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, out);
    atm_arg_tensor(&a, atm_src_rt(g, n, 0));
    atm_arg_tensor(&a, atm_src_rt(g, n, 1));
    atm_arg_ulong(&a, atm_tensor_count(out));
    return atm_node_launch(g, n, &a, n->op->name, atm_tensor_count(out),
                           first);
}

#define ACT_BACKWARD_OP(row, opname, kname)                                   \
    static const atm_op row = {.name = opname,                               \
                               .flags = ATM_OPF_INPLACE | ATM_OPF_ELEMENTWISE, \
                               .program = "backward",                        \
                               .kernel = kname,                              \
                               .run = act_backward_run,                      \
                               .cost = four_flops}

ACT_BACKWARD_OP(atm_op_silu_backward, "silu_backward", "silu_backward_f32");
ACT_BACKWARD_OP(atm_op_gelu_backward, "gelu_backward", "gelu_backward_f32");
ACT_BACKWARD_OP(atm_op_sigmoid_backward, "sigmoid_backward",
                "sigmoid_backward_f32");

#define ACT_BACKWARD_FN(fname, row)                                           \
    static atmoe_status fname(atmoe_graph *g, int node, const int *gout,     \
                              const unsigned char *need, int *gin)            \
    {                                                                         \
        (void)need;                                                           \
        return act_backward(g, &row, node, gout, gin);                        \
    }

ACT_BACKWARD_FN(silu_backward, atm_op_silu_backward)
ACT_BACKWARD_FN(gelu_backward, atm_op_gelu_backward)
ACT_BACKWARD_FN(sigmoid_backward, atm_op_sigmoid_backward)

#define ELEMENTWISE_OP(row, opname, kname, run_fn, cost_fn, extra, bw)        \
    const atm_op row = {.name = opname,                                      \
                        .flags = ATM_OPF_INPLACE | (extra),                  \
                        .program = "elementwise",                            \
                        .kernel = kname,                                     \
                        .run = run_fn,                                       \
                        .cost = cost_fn,                                     \
                        .backward = bw}

ELEMENTWISE_OP(atm_op_add, "add", "add_f32", binary_run, one_flop,
               ATM_OPF_ELEMENTWISE, add_backward);
ELEMENTWISE_OP(atm_op_mul, "mul", "mul_f32", binary_run, one_flop,
               ATM_OPF_ELEMENTWISE, mul_backward);
ELEMENTWISE_OP(atm_op_scale, "scale", "scale_f32", unary_run, one_flop, 0,
               scale_backward);
ELEMENTWISE_OP(atm_op_silu, "silu", "silu_f32", unary_run, four_flops, 0,
               silu_backward);
ELEMENTWISE_OP(atm_op_gelu, "gelu", "gelu_f32", unary_run, four_flops, 0,
               gelu_backward);
ELEMENTWISE_OP(atm_op_sigmoid, "sigmoid", "sigmoid_f32", unary_run,
               four_flops, 0, sigmoid_backward);

/* ---------------------------------------------------------------- builders */

/* numpy broadcasting of a and b, aligned on the right. */
static atmoe_status binary(atmoe_graph *g, const atm_op *op, atmoe_node a,
                           atmoe_node b, const char *fn, atmoe_node *out)
{
    if (g == NULL)
        return atm_fail(NULL, ATMOE_STATUS_NULL_POINTER,
                        "%s: argument 'graph' is NULL", fn);
    const atm_node *an, *bn;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, a, fn, "a", &an)) ||
        (st = atm_graph_get_node(g, b, fn, "b", &bn)) ||
        (st = atm_want_f32(g, fn, "a", an)) || (st = atm_want_f32(g, fn, "b", bn)))
        return st;
    int nd = an->ndim > bn->ndim ? an->ndim : bn->ndim;
    size_t shape[ATMOE_MAX_DIMS];
    atm_node p;
    char da[160], db[160];
    int batch_dim = -1;
    size_t factor = 0;
    for (int i = 0; i < nd; i++) {
        int ia = i - (nd - an->ndim), ib = i - (nd - bn->ndim);
        size_t ea = ia >= 0 ? an->shape[ia] : 1;
        size_t eb = ib >= 0 ? bn->shape[ib] : 1;
        int ba = ia >= 0 && ia == an->batch_dim;
        int bb = ib >= 0 && ib == bn->batch_dim;
        if (ea != eb && ea != 1 && eb != 1)
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: shapes do not broadcast: a is %s, b is %s",
                            fn, atm_node_desc(an, da, sizeof da),
                            atm_node_desc(bn, db, sizeof db));
        /* A batched dimension must meet its twin or a broadcast 1: its
         * extent changes at run time. */
        if ((ba && !bb && eb != 1) || (bb && !ba && ea != 1) ||
            (ba && bb && an->batch_factor != bn->batch_factor))
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: a batched dimension meets a fixed one: a is "
                            "%s, b is %s", fn, atm_node_desc(an, da, sizeof da),
                            atm_node_desc(bn, db, sizeof db));
        if ((ba || bb) && batch_dim >= 0)
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: a and b are batched in different "
                            "dimensions: a is %s, b is %s", fn,
                            atm_node_desc(an, da, sizeof da),
                            atm_node_desc(bn, db, sizeof db));
        if (ba || bb) {
            batch_dim = i;
            factor = ba ? an->batch_factor : bn->batch_factor;
        }
        shape[i] = ea > eb ? ea : eb;
    }
    atm_node_init(&p, op, ATMOE_DTYPE_F32, nd, shape);
    p.batch_dim = batch_dim;
    p.batch_factor = factor;
    p.src[0] = a;
    p.src[1] = b;
    p.nsrc = 2;
    return atm_graph_finish(g, &p, fn, out);
}

ATMOE_API atmoe_status atmoe_graph_add(atmoe_graph *g, atmoe_node a,
                                       atmoe_node b, atmoe_node *out)
{
    return binary(g, &atm_op_add, a, b, "atmoe_graph_add", out);
}

ATMOE_API atmoe_status atmoe_graph_mul(atmoe_graph *g, atmoe_node a,
                                       atmoe_node b, atmoe_node *out)
{
    return binary(g, &atm_op_mul, a, b, "atmoe_graph_mul", out);
}

ATMOE_API atmoe_status atmoe_graph_scale(atmoe_graph *g, atmoe_node x,
                                         float alpha, atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    atm_node p;
    atmoe_status st = atm_unary_proto(g, &atm_op_scale, x, __func__, &p);
    if (st != ATMOE_STATUS_OK)
        return st;
    p.p.alpha = alpha;
    return atm_graph_finish(g, &p, __func__, out);
}

#define DEFINE_UNARY(fname, OP)                                               \
    ATMOE_API atmoe_status fname(atmoe_graph *g, atmoe_node x,                \
                                 atmoe_node *out)                             \
    {                                                                         \
        ATM_CHECK_NULL(NULL, g);                                              \
        atm_node p;                                                           \
        atmoe_status st = atm_unary_proto(g, OP, x, #fname, &p);                        \
        return st != ATMOE_STATUS_OK ? st : atm_graph_finish(g, &p, #fname, out);   \
    }

DEFINE_UNARY(atmoe_graph_silu, &atm_op_silu)
DEFINE_UNARY(atmoe_graph_gelu, &atm_op_gelu)
DEFINE_UNARY(atmoe_graph_sigmoid, &atm_op_sigmoid)
