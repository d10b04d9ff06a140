/* Building graphs: nodes, shape and dtype inference, names, dumps. */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/file.h"
#include "graph/graph.h"
#include "base/log.h"

static const char *const op_names[ATM_OP_COUNT_] = {
    [ATM_OP_INPUT] = "input",
    [ATM_OP_PARAMETER] = "parameter",
    [ATM_OP_CONSTANT] = "constant",
    [ATM_OP_MATMUL] = "matmul",
    [ATM_OP_ADD] = "add",
    [ATM_OP_MUL] = "mul",
    [ATM_OP_SCALE] = "scale",
    [ATM_OP_SILU] = "silu",
    [ATM_OP_GELU] = "gelu",
    [ATM_OP_SIGMOID] = "sigmoid",
    [ATM_OP_SOFTMAX] = "softmax",
    [ATM_OP_TOPK] = "topk",
    [ATM_OP_SECONDARY] = "secondary",
    [ATM_OP_RMSNORM] = "rmsnorm",
    [ATM_OP_LAYERNORM] = "layernorm",
    [ATM_OP_MEAN] = "mean",
    [ATM_OP_L2NORM] = "l2norm",
    [ATM_OP_GATHER_ROWS] = "gather_rows",
    [ATM_OP_SCATTER_ADD_ROWS] = "scatter_add_rows",
    [ATM_OP_RESHAPE] = "reshape",
    [ATM_OP_VIEW] = "view",
    [ATM_OP_TRANSPOSE] = "transpose",
    [ATM_OP_CONCAT] = "concat",
    [ATM_OP_CAST] = "cast",
    [ATM_OP_ROUTER] = "router",
    [ATM_OP_MIXTURE] = "mixture",
};

const char *atm_op_name(atm_op op)
{
    return (unsigned)op < ATM_OP_COUNT_ ? op_names[op] : "?";
}

const char *atm_node_op_name(const atm_node *n)
{
    return n->label ? n->label : atm_op_name(n->op);
}

/* Element-wise operations and row-wise ones whose work-items read each
 * element before writing it, and never read another's afterwards. */
int atm_op_inplace(atm_op op)
{
    switch (op) {
    case ATM_OP_ADD:
    case ATM_OP_MUL:
    case ATM_OP_SCALE:
    case ATM_OP_SILU:
    case ATM_OP_GELU:
    case ATM_OP_SIGMOID:
    case ATM_OP_SOFTMAX:
    case ATM_OP_RMSNORM:
    case ATM_OP_LAYERNORM:
    case ATM_OP_L2NORM:
    case ATM_OP_SCATTER_ADD_ROWS:
        return 1;
    default:
        return 0;
    }
}

ATMOE_API atmoe_status atmoe_graph_new(atmoe_context *ctx, atmoe_graph **graph)
{
    if (graph)
        *graph = NULL;
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, graph);
    atmoe_graph *g = atm_calloc(1, sizeof *g);
    if (g == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "atmoe_graph_new: out of host memory");
    g->ctx = ctx;
    *graph = g;
    return ATMOE_STATUS_OK;
}

void atm_graph_truncate(atmoe_graph *g, size_t count)
{
    while (g->count > count) {
        atm_node *n = &g->nodes[--g->count];
        atmoe_tensor_free(n->storage);
        atmoe_router_free(n->router);
        atmoe_experts_free(n->experts);
    }
}

ATMOE_API void atmoe_graph_free(atmoe_graph *g)
{
    if (g == NULL)
        return;
    atm_graph_unplan(g);
    atm_graph_truncate(g, 0);
    atm_free(g->nodes);
    atm_free(g);
}

atmoe_status atm_graph_check_node(const atmoe_graph *g, atmoe_node n,
                                  const char *fn, const char *operand)
{
    if (n < 0 || (size_t)n >= g->count)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: operand %s is node %d, not a node of this graph "
                        "(%zu nodes)", fn, operand, n, g->count);
    return ATMOE_STATUS_OK;
}

const char *atm_node_desc(const atm_node *n, char *buf, size_t size)
{
    char shape[96];
    snprintf(buf, size, "'%s' (%s %s %s)", n->name, atm_node_op_name(n),
             atmoe_dtype_name(n->dtype),
             atm_shape_string(n->ndim, n->shape, shape, sizeof shape));
    return buf;
}

/* The node named name, or ATMOE_NODE_NONE; sets no message. */
static atmoe_node lookup(const atmoe_graph *g, const char *name)
{
    for (size_t i = 0; i < g->count; i++)
        if (strcmp(g->nodes[i].name, name) == 0)
            return (atmoe_node)i;
    return ATMOE_NODE_NONE;
}

static atmoe_status name_taken(const atmoe_graph *g, const char *name,
                               const char *fn)
{
    atmoe_node found = lookup(g, name);
    if (found != ATMOE_NODE_NONE)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the name '%s' is taken by node %d", fn, name,
                        found);
    return ATMOE_STATUS_OK;
}

/* Appends a node of op with the given result; fills in a default name. */
atmoe_status atm_graph_push(atmoe_graph *g, const atm_node *proto,
                            const char *name, const char *fn,
                            atmoe_node *out)
{
    if (name && strlen(name) >= ATM_NODE_NAME_SIZE)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: name '%.20s...' is longer than %d bytes", fn,
                        name, ATM_NODE_NAME_SIZE - 1);
    if (name && *name) {
        atmoe_status st = name_taken(g, name, fn);
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    if (g->count == g->capacity) {
        size_t cap = g->capacity ? g->capacity * 2 : 32;
        atm_node *p = atm_realloc(g->nodes, cap * sizeof *p);
        if (p == NULL)
            return atm_fail(g->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                            "%s: out of host memory", fn);
        g->nodes = p;
        g->capacity = cap;
    }
    atm_node *n = &g->nodes[g->count];
    *n = *proto;
    if (name && *name) {
        snprintf(n->name, sizeof n->name, "%s", name);
    } else {
        /* "<op>_<id>", with a suffix when a caller's name took it. */
        snprintf(n->name, sizeof n->name, "%s_%zu", atm_node_op_name(n),
                 g->count);
        for (int k = 1; lookup(g, n->name) != ATMOE_NODE_NONE; k++)
            snprintf(n->name, sizeof n->name, "%s_%zu_%d",
                     atm_node_op_name(n), g->count, k);
    }
    n->co[0] = n->co[1] = ATMOE_NODE_NONE;
    *out = (atmoe_node)g->count++;
    return ATMOE_STATUS_OK;
}

void atm_node_init(atm_node *p, atm_op op, atmoe_dtype dtype, int ndim,
                   const size_t *shape)
{
    memset(p, 0, sizeof *p);
    p->op = op;
    p->dtype = dtype;
    p->ndim = ndim;
    memcpy(p->shape, shape, (size_t)ndim * sizeof *shape);
    p->batch_dim = -1;
    for (int i = 0; i < ATM_MAX_SRC; i++)
        p->src[i] = ATMOE_NODE_NONE;
}

static atmoe_status check_shape_args(const atmoe_graph *g, const char *fn,
                                     atmoe_dtype dtype, int ndim,
                                     const size_t *shape)
{
    if (atmoe_dtype_size(dtype) == 0)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: dtype %d is not an atmoe_dtype", fn, (int)dtype);
    if (ndim < 1 || ndim > ATMOE_MAX_DIMS)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: ndim is %d, must be 1 to %d", fn, ndim,
                        ATMOE_MAX_DIMS);
    size_t count = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] == 0)
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: dimension %d of the shape is 0", fn, i);
        if (count > SIZE_MAX / 8 / shape[i])
            return atm_fail(g->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                            "%s: the shape's element count overflows", fn);
        count *= shape[i];
    }
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_input(atmoe_graph *g, const char *name,
                                         atmoe_dtype dtype, int ndim,
                                         const size_t *shape, int batched,
                                         atmoe_node *node)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, shape);
    ATM_CHECK_NULL(g->ctx, node);
    atmoe_status st = check_shape_args(g, __func__, dtype, ndim, shape);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (batched && g->max_batch && shape[0] != g->max_batch)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "atmoe_graph_input '%s': batch %zu differs from the "
                        "graph's batch %zu (every batched input shares one)",
                        name ? name : "", shape[0], g->max_batch);
    atm_node p;
    atm_node_init(&p, ATM_OP_INPUT, dtype, ndim, shape);
    if (batched) {
        p.batch_dim = 0;
        p.batch_factor = 1;
    }
    st = atm_graph_push(g, &p, name, __func__, node);
    if (st == ATMOE_STATUS_OK && batched)
        g->max_batch = shape[0];
    return st;
}

static atmoe_status add_storage(atmoe_graph *g, atm_op op, const char *name,
                                atmoe_tensor *t, const char *fn,
                                atmoe_node *node)
{
    atm_node p;
    atm_node_init(&p, op, t->dtype, t->ndim, t->shape);
    atmoe_status st = atm_graph_push(g, &p, name, fn, node);
    if (st != ATMOE_STATUS_OK)
        return st;
    g->nodes[*node].storage = t;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_parameter(atmoe_graph *g, const char *name,
                                             atmoe_tensor *tensor,
                                             atmoe_node *node)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, tensor);
    ATM_CHECK_NULL(g->ctx, node);
    if (tensor->ctx != g->ctx)
        return atm_fail(g->ctx, ATMOE_STATUS_WRONG_CONTEXT,
                        "atmoe_graph_parameter '%s': the tensor belongs to "
                        "another context", name ? name : "");
    if (!atm_tensor_is_contiguous(tensor))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_graph_parameter '%s': the tensor is a "
                        "non-contiguous view; copy it first",
                        name ? name : "");
    /* A view of our own keeps the storage alive after the caller frees its
     * handle. */
    atmoe_tensor *own;
    size_t start[ATMOE_MAX_DIMS] = {0};
    atmoe_status st = atmoe_tensor_view(tensor, start, tensor->shape, &own);
    if (st != ATMOE_STATUS_OK)
        return st;
    st = add_storage(g, ATM_OP_PARAMETER, name, own, __func__, node);
    if (st != ATMOE_STATUS_OK)
        atmoe_tensor_free(own);
    return st;
}

ATMOE_API atmoe_status atmoe_graph_constant(atmoe_graph *g, const char *name,
                                            atmoe_dtype dtype, int ndim,
                                            const size_t *shape,
                                            const void *data, atmoe_node *node)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, shape);
    ATM_CHECK_NULL(g->ctx, data);
    ATM_CHECK_NULL(g->ctx, node);
    atmoe_status st = check_shape_args(g, __func__, dtype, ndim, shape);
    if (st != ATMOE_STATUS_OK)
        return st;
    atmoe_tensor *t;
    st = atmoe_tensor_new(g->ctx, dtype, ndim, shape, &t);
    if (st != ATMOE_STATUS_OK)
        return st;
    st = atmoe_tensor_write(t, data, atm_tensor_count(t) * atmoe_dtype_size(dtype));
    if (st == ATMOE_STATUS_OK)
        st = add_storage(g, ATM_OP_CONSTANT, name, t, __func__, node);
    if (st != ATMOE_STATUS_OK)
        atmoe_tensor_free(t);
    return st;
}

/* ---------------------------------------------------------------- checks */

atmoe_status atm_graph_get_node(const atmoe_graph *g, atmoe_node id,
                                const char *fn, const char *operand,
                                const atm_node **n)
{
    atmoe_status st = atm_graph_check_node(g, id, fn, operand);
    if (st == ATMOE_STATUS_OK)
        *n = &g->nodes[id];
    return st;
}

static atmoe_status want_f32(const atmoe_graph *g, const char *fn,
                               const char *operand, const atm_node *n)
{
    char d[160];
    if (n->dtype != ATMOE_DTYPE_F32)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: operand %s is %s; it must be f32%s", fn, operand,
                        atm_node_desc(n, d, sizeof d),
                        n->dtype == ATMOE_DTYPE_F16
                            ? " (atmoe_graph_cast converts f16 to f32)"
                            : "");
    return ATMOE_STATUS_OK;
}

static atmoe_status resolve_dim(const atmoe_graph *g, const char *fn,
                                const atm_node *n, int dim, int *out)
{
    int d = dim < 0 ? dim + n->ndim : dim;
    char buf[160];
    if (d < 0 || d >= n->ndim)
        return atm_fail(g->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: dimension %d is out of range for %s", fn, dim,
                        atm_node_desc(n, buf, sizeof buf));
    *out = d;
    return ATMOE_STATUS_OK;
}

static void unary_proto(atm_node *p, atm_op op, const atm_node *x,
                        atmoe_node xid)
{
    atm_node_init(p, op, ATMOE_DTYPE_F32, x->ndim, x->shape);
    p->batch_dim = x->batch_dim;
    p->batch_factor = x->batch_factor;
    p->src[0] = xid;
    p->nsrc = 1;
}

static atmoe_status unary(atmoe_graph *g, atm_op op, atmoe_node x,
                          const char *fn, atm_node *p)
{
    const atm_node *xn;
    atmoe_status st = atm_graph_get_node(g, x, fn, "x", &xn);
    if (st == ATMOE_STATUS_OK)
        st = want_f32(g, fn, "x", xn);
    if (st == ATMOE_STATUS_OK)
        unary_proto(p, op, xn, x);
    return st;
}

static atmoe_status finish(atmoe_graph *g, const atm_node *p, const char *fn,
                           atmoe_node *out)
{
    if (out == NULL)
        return atm_fail(g->ctx, ATMOE_STATUS_NULL_POINTER,
                        "%s: argument 'out' is NULL", fn);
    return atm_graph_push(g, p, NULL, fn, out);
}

/* ---------------------------------------------------------------- ops */

ATMOE_API atmoe_status atmoe_graph_matmul(atmoe_graph *g, atmoe_node a,
                                          atmoe_node b, atmoe_node bias,
                                          unsigned flags, atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = "atmoe_graph_matmul";
    const atm_node *an, *bn, *cn = NULL;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, a, fn, "a", &an)) ||
        (st = atm_graph_get_node(g, b, fn, "b", &bn)) ||
        (bias != ATMOE_NODE_NONE && (st = atm_graph_get_node(g, bias, fn, "bias", &cn))))
        return st;
    if (flags & ~(ATMOE_MATMUL_TRANSPOSE_A | ATMOE_MATMUL_TRANSPOSE_B))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: unknown flags 0x%x", fn, flags);
    char da[160], db[160];
    if (cn && cn->dtype != ATMOE_DTYPE_F32)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: bias must be f32, it is %s", fn,
                        atm_node_desc(cn, da, sizeof da));
    if (an->dtype != ATMOE_DTYPE_F32 || bn->dtype != ATMOE_DTYPE_F32)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: operands must be f32: a is %s, b is %s", fn,
                        atm_node_desc(an, da, sizeof da),
                        atm_node_desc(bn, db, sizeof db));
    if (an->ndim != 2 || bn->ndim != 2)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: a and b must be 2-D: a is %s, b is %s", fn,
                        atm_node_desc(an, da, sizeof da),
                        atm_node_desc(bn, db, sizeof db));
    int ta = !!(flags & ATMOE_MATMUL_TRANSPOSE_A);
    int tb = !!(flags & ATMOE_MATMUL_TRANSPOSE_B);
    size_t m = an->shape[ta], ka = an->shape[!ta];
    size_t kb = bn->shape[tb], n = bn->shape[!tb];
    if (ka != kb)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: inner dimensions differ: op(a) is [%zu, %zu] "
                        "from a %s, op(b) is [%zu, %zu] from b %s", fn, m, ka,
                        atm_node_desc(an, da, sizeof da), kb, n,
                        atm_node_desc(bn, db, sizeof db));
    int a_batch_k = an->batch_dim >= 0 && an->batch_dim == !ta;
    int b_batch_k = bn->batch_dim >= 0 && bn->batch_dim == tb;
    if (a_batch_k != b_batch_k)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: the inner dimension is batched in one operand "
                        "only: a is %s, b is %s", fn,
                        atm_node_desc(an, da, sizeof da),
                        atm_node_desc(bn, db, sizeof db));
    if (cn && (cn->ndim != 1 || cn->shape[0] != n))
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: bias must be [%zu], it is %s", fn, n,
                        atm_node_desc(cn, da, sizeof da));
    if (cn && cn->batch_dim >= 0)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: bias must not be batched", fn);
    size_t shape[2] = {m, n};
    atm_node p;
    atm_node_init(&p, ATM_OP_MATMUL, ATMOE_DTYPE_F32, 2, shape);
    if (an->batch_dim == ta && an->batch_dim >= 0) {
        p.batch_dim = 0;
        p.batch_factor = an->batch_factor;
    } else if (bn->batch_dim == !tb && bn->batch_dim >= 0) {
        p.batch_dim = 1;
        p.batch_factor = bn->batch_factor;
    }
    if (an->batch_dim == ta && an->batch_dim >= 0 && bn->batch_dim == !tb &&
        bn->batch_dim >= 0)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: both the rows of op(a) and the columns of op(b) "
                        "are batched", fn);
    p.src[0] = a;
    p.src[1] = b;
    p.src[2] = bias;
    p.nsrc = 3;
    p.flags = flags;
    return finish(g, &p, fn, out);
}

/* numpy broadcasting of a and b, aligned on the right. */
static atmoe_status binary(atmoe_graph *g, atm_op op, atmoe_node a,
                           atmoe_node b, const char *fn, atmoe_node *out)
{
    if (g == NULL)
        return atm_fail(NULL, ATMOE_STATUS_NULL_POINTER,
                        "%s: argument 'graph' is NULL", fn);
    const atm_node *an, *bn;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, a, fn, "a", &an)) ||
        (st = atm_graph_get_node(g, b, fn, "b", &bn)) ||
        (st = want_f32(g, fn, "a", an)) || (st = want_f32(g, fn, "b", bn)))
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
    return finish(g, &p, fn, out);
}

ATMOE_API atmoe_status atmoe_graph_add(atmoe_graph *g, atmoe_node a,
                                       atmoe_node b, atmoe_node *out)
{
    return binary(g, ATM_OP_ADD, a, b, "atmoe_graph_add", out);
}

ATMOE_API atmoe_status atmoe_graph_mul(atmoe_graph *g, atmoe_node a,
                                       atmoe_node b, atmoe_node *out)
{
    return binary(g, ATM_OP_MUL, a, b, "atmoe_graph_mul", out);
}

ATMOE_API atmoe_status atmoe_graph_scale(atmoe_graph *g, atmoe_node x,
                                         float alpha, atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    atm_node p;
    atmoe_status st = unary(g, ATM_OP_SCALE, x, __func__, &p);
    if (st != ATMOE_STATUS_OK)
        return st;
    p.alpha = alpha;
    return finish(g, &p, __func__, out);
}

#define DEFINE_UNARY(fname, OP)                                               \
    ATMOE_API atmoe_status fname(atmoe_graph *g, atmoe_node x,                \
                                 atmoe_node *out)                             \
    {                                                                         \
        ATM_CHECK_NULL(NULL, g);                                              \
        atm_node p;                                                           \
        atmoe_status st = unary(g, OP, x, #fname, &p);                        \
        return st != ATMOE_STATUS_OK ? st : finish(g, &p, #fname, out);       \
    }

DEFINE_UNARY(atmoe_graph_silu, ATM_OP_SILU)
DEFINE_UNARY(atmoe_graph_gelu, ATM_OP_GELU)
DEFINE_UNARY(atmoe_graph_sigmoid, ATM_OP_SIGMOID)

ATMOE_API atmoe_status atmoe_graph_softmax(atmoe_graph *g, atmoe_node x,
                                           int dim, atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    atm_node p;
    atmoe_status st = unary(g, ATM_OP_SOFTMAX, x, __func__, &p);
    if (st == ATMOE_STATUS_OK)
        st = resolve_dim(g, __func__, &g->nodes[x], dim, &p.dim);
    return st != ATMOE_STATUS_OK ? st : finish(g, &p, __func__, out);
}

ATMOE_API atmoe_status atmoe_graph_l2norm(atmoe_graph *g, atmoe_node x,
                                          int dim, float eps, atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    atm_node p;
    atmoe_status st = unary(g, ATM_OP_L2NORM, x, __func__, &p);
    if (st == ATMOE_STATUS_OK)
        st = resolve_dim(g, __func__, &g->nodes[x], dim, &p.dim);
    if (st == ATMOE_STATUS_OK && !(eps >= 0))
        st = atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                      "%s: eps must be >= 0, it is %g", __func__, eps);
    p.eps = eps;
    return st != ATMOE_STATUS_OK ? st : finish(g, &p, __func__, out);
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
    atmoe_status st = unary(g, ATM_OP_TOPK, x, fn, &p);
    if (st == ATMOE_STATUS_OK)
        st = resolve_dim(g, fn, &g->nodes[x], dim, &p.dim);
    if (st != ATMOE_STATUS_OK)
        return st;
    const atm_node *xn = &g->nodes[x];
    char d[160];
    if (p.dim == xn->batch_dim)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: dimension %d of %s is the batch", fn, dim,
                        atm_node_desc(xn, d, sizeof d));
    if (k < 1 || (size_t)k > xn->shape[p.dim])
        return atm_fail(g->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: k is %d, must be 1 to %zu for %s", fn, k,
                        xn->shape[p.dim], atm_node_desc(xn, d, sizeof d));
    p.k = k;
    p.shape[p.dim] = (size_t)k;
    atmoe_node v, ix;
    if ((st = atm_graph_push(g, &p, NULL, fn, &v)) != ATMOE_STATUS_OK)
        return st;
    atm_node q = g->nodes[v];
    q.op = ATM_OP_SECONDARY;
    q.label = "topk_indices";
    q.dtype = ATMOE_DTYPE_I32;
    q.src[0] = v;
    q.nsrc = 1;
    /* "<values>.indices" when that fits and is free, else a default. */
    char name[ATM_NODE_NAME_SIZE + 16];
    snprintf(name, sizeof name, "%s.indices", g->nodes[v].name);
    int usable = strlen(name) < ATM_NODE_NAME_SIZE &&
                 lookup(g, name) == ATMOE_NODE_NONE;
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

static atmoe_status norm(atmoe_graph *g, atm_op op, atmoe_node x,
                         atmoe_node weight, atmoe_node bias, float eps,
                         const char *fn, atmoe_node *out)
{
    if (g == NULL)
        return atm_fail(NULL, ATMOE_STATUS_NULL_POINTER,
                        "%s: argument 'graph' is NULL", fn);
    atm_node p;
    atmoe_status st = unary(g, op, x, fn, &p);
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
            (st = want_f32(g, fn, what[i], wn)))
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
    p.eps = eps;
    p.dim = xn->ndim - 1;
    return finish(g, &p, fn, out);
}

ATMOE_API atmoe_status atmoe_graph_rmsnorm(atmoe_graph *g, atmoe_node x,
                                           atmoe_node weight, float eps,
                                           atmoe_node *out)
{
    return norm(g, ATM_OP_RMSNORM, x, weight, ATMOE_NODE_NONE, eps,
                "atmoe_graph_rmsnorm", out);
}

ATMOE_API atmoe_status atmoe_graph_layernorm(atmoe_graph *g, atmoe_node x,
                                             atmoe_node weight,
                                             atmoe_node bias, float eps,
                                             atmoe_node *out)
{
    return norm(g, ATM_OP_LAYERNORM, x, weight, bias, eps,
                "atmoe_graph_layernorm", out);
}

ATMOE_API atmoe_status atmoe_graph_mean(atmoe_graph *g, atmoe_node x, int dim,
                                        atmoe_node *out)
{
    ATM_CHECK_NULL(NULL, g);
    atm_node p;
    atmoe_status st = unary(g, ATM_OP_MEAN, x, __func__, &p);
    int d;
    if (st == ATMOE_STATUS_OK)
        st = resolve_dim(g, __func__, &g->nodes[x], dim, &d);
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
    p.dim = d;
    return finish(g, &p, __func__, out);
}

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
        (st = want_f32(g, fn, "table", tn)))
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
    atm_node_init(&p, ATM_OP_GATHER_ROWS, ATMOE_DTYPE_F32, tn->ndim, tn->shape);
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
    return finish(g, &p, fn, out);
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
        (st = want_f32(g, fn, "dst", dn)) ||
        (st = want_f32(g, fn, "src", sn)))
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
    unary_proto(&p, ATM_OP_SCATTER_ADD_ROWS, dn, dst);
    p.src[1] = indices;
    p.src[2] = src;
    p.nsrc = 3;
    return finish(g, &p, fn, out);
}

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
        st = check_shape_args(g, fn, xn->dtype, ndim, shape);
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
    atm_node_init(&p, ATM_OP_RESHAPE, xn->dtype, ndim, shape);
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
    return finish(g, &p, fn, out);
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
    atm_node_init(&p, ATM_OP_VIEW, xn->dtype, xn->ndim, shape);
    p.batch_dim = xn->batch_dim;
    p.batch_factor = xn->batch_factor;
    memcpy(p.start, start, (size_t)xn->ndim * sizeof *start);
    p.src[0] = x;
    p.nsrc = 1;
    return finish(g, &p, fn, out);
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
        (st = resolve_dim(g, fn, xn, dim0, &d0)) ||
        (st = resolve_dim(g, fn, xn, dim1, &d1)))
        return st;
    atm_node p;
    atm_node_init(&p, ATM_OP_TRANSPOSE, xn->dtype, xn->ndim, xn->shape);
    p.shape[d0] = xn->shape[d1];
    p.shape[d1] = xn->shape[d0];
    p.batch_dim = xn->batch_dim == d0   ? d1
                  : xn->batch_dim == d1 ? d0
                                        : xn->batch_dim;
    p.batch_factor = xn->batch_factor;
    p.dim = d0;
    p.dim1 = d1;
    p.src[0] = x;
    p.nsrc = 1;
    return finish(g, &p, fn, out);
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
        (st = resolve_dim(g, fn, an, dim, &d)))
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
    atm_node_init(&p, ATM_OP_CONCAT, an->dtype, an->ndim, an->shape);
    p.shape[d] = an->shape[d] + bn->shape[d];
    p.batch_dim = an->batch_dim;
    p.batch_factor = an->batch_factor;
    p.dim = d;
    p.src[0] = a;
    p.src[1] = b;
    p.nsrc = 2;
    return finish(g, &p, fn, out);
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
    if (atmoe_dtype_size(dtype) == 0 ||
        (dtype == ATMOE_DTYPE_I32) != (xn->dtype == ATMOE_DTYPE_I32))
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: cannot convert %s to dtype %d (f32 and f16 "
                        "convert into each other, i32 into itself)", fn,
                        atm_node_desc(xn, d, sizeof d), (int)dtype);
    atm_node p;
    atm_node_init(&p, ATM_OP_CAST, dtype, xn->ndim, xn->shape);
    p.batch_dim = xn->batch_dim;
    p.batch_factor = xn->batch_factor;
    p.src[0] = x;
    p.nsrc = 1;
    return finish(g, &p, fn, out);
}

/* ---------------------------------------------------------------- names */

ATMOE_API atmoe_status atmoe_graph_set_name(atmoe_graph *g, atmoe_node node,
                                            const char *name)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, name);
    atmoe_status st = atm_graph_check_node(g, node, __func__, "node");
    if (st != ATMOE_STATUS_OK)
        return st;
    if (*name == '\0' || strlen(name) >= ATM_NODE_NAME_SIZE)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: a name has 1 to %d bytes", __func__,
                        ATM_NODE_NAME_SIZE - 1);
    atmoe_node found = lookup(g, name);
    if (found != ATMOE_NODE_NONE && found != node)
        return name_taken(g, name, __func__);
    snprintf(g->nodes[node].name, ATM_NODE_NAME_SIZE, "%s", name);
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_find(const atmoe_graph *g, const char *name,
                                        atmoe_node *node)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, name);
    ATM_CHECK_NULL(g->ctx, node);
    *node = lookup(g, name);
    if (*node == ATMOE_NODE_NONE)
        return atm_fail(g->ctx, ATMOE_STATUS_NOT_FOUND,
                        "atmoe_graph_find: no node is named '%s'", name);
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_get_shape(const atmoe_graph *g,
                                             atmoe_node node, int *ndim,
                                             size_t *shape, atmoe_dtype *dtype)
{
    ATM_CHECK_NULL(NULL, g);
    atmoe_status st = atm_graph_check_node(g, node, __func__, "node");
    if (st != ATMOE_STATUS_OK)
        return st;
    const atm_node *n = &g->nodes[node];
    if (ndim)
        *ndim = n->ndim;
    if (shape)
        memcpy(shape, n->shape, (size_t)n->ndim * sizeof *shape);
    if (dtype)
        *dtype = n->dtype;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_mark_output(atmoe_graph *g, atmoe_node node)
{
    ATM_CHECK_NULL(NULL, g);
    atmoe_status st = atm_graph_check_node(g, node, __func__, "node");
    if (st != ATMOE_STATUS_OK)
        return st;
    if (!g->nodes[node].is_output) {
        atm_graph_unplan(g);
        g->nodes[node].is_output = 1;
    }
    return ATMOE_STATUS_OK;
}

/* ---------------------------------------------------------------- dumps */

static void dump_text(const atmoe_graph *g, FILE *f)
{
    char s[96];
    fprintf(f, "graph: %zu nodes", g->count);
    if (g->max_batch)
        fprintf(f, ", batch %zu", g->max_batch);
    if (atm_graph_is_planned(g))
        fprintf(f, ", %zu computed, arena %llu bytes (intermediates %llu)",
                g->order_count, (unsigned long long)g->memory.arena_bytes,
                (unsigned long long)g->memory.intermediate_bytes);
    fputc('\n', f);
    for (size_t i = 0; i < g->count; i++) {
        const atm_node *n = &g->nodes[i];
        fprintf(f, "%4zu %-20s %-16s %s %-20s", i, n->name, atm_node_op_name(n),
                atmoe_dtype_name(n->dtype),
                atm_shape_string(n->ndim, n->shape, s, sizeof s));
        for (int j = 0; j < n->nsrc; j++)
            if (n->src[j] != ATMOE_NODE_NONE)
                fprintf(f, " %%%d", n->src[j]);
        if (n->batch_dim >= 0)
            fprintf(f, " batch@%d", n->batch_dim);
        if (n->is_output)
            fprintf(f, " output");
        if (atm_graph_is_planned(g) && n->needed) {
            if (n->storage)
                fprintf(f, " [own storage]");
            else if (n->owner != (int)i)
                fprintf(f, " [shares %%%d]", n->owner);
            else
                fprintf(f, " [arena %zu +%zu%s]", n->offset, n->bytes,
                        n->pinned ? " pinned" : "");
        } else if (atm_graph_is_planned(g)) {
            fprintf(f, " [not needed]");
        }
        fputc('\n', f);
    }
}

static void dump_dot(const atmoe_graph *g, FILE *f)
{
    char s[96];
    fprintf(f, "digraph atmoe {\n  rankdir=TB;\n  node [shape=record, "
               "fontname=\"monospace\"];\n");
    for (size_t i = 0; i < g->count; i++) {
        const atm_node *n = &g->nodes[i];
        const char *color = n->op == ATM_OP_INPUT       ? "lightblue"
                            : n->storage != NULL        ? "lightgrey"
                            : n->is_output              ? "palegreen"
                            : (atm_graph_is_planned(g) && !n->needed) ? "white"
                                                         : "lightyellow";
        fprintf(f, "  n%zu [style=filled, fillcolor=%s, label=\"{%s|%s %s %s",
                i, color, n->name, atm_node_op_name(n),
                atmoe_dtype_name(n->dtype),
                atm_shape_string(n->ndim, n->shape, s, sizeof s));
        if (atm_graph_is_planned(g) && n->needed && n->storage == NULL &&
            n->owner == (int)i)
            fprintf(f, "|arena %zu +%zu", n->offset, n->bytes);
        fprintf(f, "}\"];\n");
        for (int j = 0; j < n->nsrc; j++)
            if (n->src[j] != ATMOE_NODE_NONE)
                fprintf(f, "  n%d -> n%zu;\n", n->src[j], i);
    }
    if (atm_graph_is_planned(g))
        fprintf(f, "  label=\"arena %llu bytes, intermediates %llu bytes\";\n",
                (unsigned long long)g->memory.arena_bytes,
                (unsigned long long)g->memory.intermediate_bytes);
    fprintf(f, "}\n");
}

ATMOE_API atmoe_status atmoe_graph_dump(const atmoe_graph *g, const char *path,
                                        atmoe_dump_format format)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, path);
    if (format != ATMOE_DUMP_TEXT && format != ATMOE_DUMP_DOT)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_graph_dump: format %d is not an "
                        "atmoe_dump_format", (int)format);
    char tmp[PATH_MAX];
    FILE *f = atm_file_begin(path, tmp, sizeof tmp);
    if (f == NULL)
        return atm_fail(g->ctx, ATMOE_STATUS_IO_ERROR,
                        "atmoe_graph_dump: cannot write next to %s: %s", path,
                        strerror(errno));
    if (format == ATMOE_DUMP_TEXT)
        dump_text(g, f);
    else
        dump_dot(g, f);
    if (atm_file_commit(f, tmp, path, 1) != 0)
        return atm_fail(g->ctx, ATMOE_STATUS_IO_ERROR,
                        "atmoe_graph_dump: writing %s failed: %s", path,
                        strerror(errno));
    return ATMOE_STATUS_OK;
}
