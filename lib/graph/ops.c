/* The graph's operations on the device: which kernel each runs, with which
 * arguments, and what it costs.  Nodes reach here with runtime tensors (rt)
 * that are dense at the computed batch. */
#include <config.h>

#include <stdio.h>
#include <string.h>

#include "device/blas.h"
#include "moe/experts.h"
#include "graph/graph.h"
#include "base/log.h"
#include "device/program.h"

/* The program and kernel of each operation that runs one of ours. */
static const struct {
    const char *program, *kernel;
} op_kernels[ATM_OP_COUNT_] = {
    [ATM_OP_ADD] = {"elementwise", "add_f32"},
    [ATM_OP_MUL] = {"elementwise", "mul_f32"},
    [ATM_OP_SCALE] = {"elementwise", "scale_f32"},
    [ATM_OP_SILU] = {"elementwise", "silu_f32"},
    [ATM_OP_GELU] = {"elementwise", "gelu_f32"},
    [ATM_OP_SIGMOID] = {"elementwise", "sigmoid_f32"},
    [ATM_OP_SOFTMAX] = {"reduce", "softmax_f32"},
    [ATM_OP_TOPK] = {"reduce", "topk_f32"},
    [ATM_OP_RMSNORM] = {"reduce", "rmsnorm_f32"},
    [ATM_OP_LAYERNORM] = {"reduce", "layernorm_f32"},
    [ATM_OP_MEAN] = {"reduce", "mean_f32"},
    [ATM_OP_L2NORM] = {"reduce", "l2norm_f32"},
    [ATM_OP_GATHER_ROWS] = {"rows", "gather_rows_f32"},
    [ATM_OP_SCATTER_ADD_ROWS] = {"rows", "scatter_add_rows_f32"},
};

/* Operations that move data with the tensor copy kernel. */
static int uses_copy(atm_op op)
{
    return op == ATM_OP_VIEW || op == ATM_OP_TRANSPOSE || op == ATM_OP_CAST ||
           op == ATM_OP_CONCAT || op == ATM_OP_SCATTER_ADD_ROWS ||
           op == ATM_OP_MATMUL;
}

/* The copy kernel node n runs: from its first operand's dtype to its own
 * (a matmul's bias copy is f32 to f32). */
static void copy_kernel_name(const atmoe_graph *g, const atm_node *n,
                             char *name, size_t size)
{
    atmoe_dtype from = n->op == ATM_OP_MATMUL ? ATMOE_DTYPE_F32
                                              : g->nodes[n->src[0]].dtype;
    snprintf(name, size, "copy_%s_%s", atmoe_dtype_name(n->dtype),
             atmoe_dtype_name(from));
}

atmoe_status atm_node_prepare(atmoe_graph *g, const atm_node *n)
{
    if (n->op == ATM_OP_ROUTER)
        return atm_router_node_prepare(g, n);
    if (n->op == ATM_OP_MIXTURE)
        return atm_mixture_node_prepare(g, n);
    cl_kernel k;
    atmoe_status st = ATMOE_STATUS_OK;
    if (op_kernels[n->op].program)
        st = atm_kernel_get(g->ctx, op_kernels[n->op].program, "",
                            op_kernels[n->op].kernel, &k);
    if (st == ATMOE_STATUS_OK && uses_copy(n->op)) {
        char name[32];
        copy_kernel_name(g, n, name, sizeof name);
        st = atm_kernel_get(g->ctx, "tensor", "", name, &k);
    }
    return st;
}

void atm_arg(atm_args *a, size_t size, const void *value)
{
    cl_int err = clSetKernelArg(a->k, a->next++, size, value);
    if (a->err == CL_SUCCESS)
        a->err = err;
}

void atm_arg_tensor(atm_args *a, const atmoe_tensor *t)
{
    cl_ulong off = t->offset;
    atm_arg(a, sizeof t->buffer, &t->buffer);
    atm_arg(a, sizeof off, &off);
}

void atm_arg_buffer(atm_args *a, cl_mem buffer)
{
    atm_arg(a, sizeof buffer, &buffer);
}

void atm_arg_ulong(atm_args *a, cl_ulong v)
{
    atm_arg(a, sizeof v, &v);
}

void atm_arg_int(atm_args *a, cl_int v)
{
    atm_arg(a, sizeof v, &v);
}

void atm_arg_float(atm_args *a, cl_float v)
{
    atm_arg(a, sizeof v, &v);
}

atmoe_status atm_node_launch(atmoe_graph *g, const atm_node *n, atm_args *a,
                             const char *kernel, size_t work_items,
                             cl_event *ev)
{
    return atm_node_launch_local(g, n, a, kernel, work_items, 64, ev);
}

atmoe_status atm_node_launch_local(atmoe_graph *g, const atm_node *n,
                                   atm_args *a, const char *kernel,
                                   size_t work_items, size_t local,
                                   cl_event *ev)
{
    if (a->err != CL_SUCCESS)
        return atm_fail(g->ctx, ATMOE_STATUS_OPENCL_ERROR,
                        "clSetKernelArg(%s) for node '%s' failed: %s (%d)",
                        kernel, n->name, atm_cl_error_name(a->err),
                        (int)a->err);
    return atm_launch_1d_local(g->ctx, a->k, work_items, local, kernel, ev);
}

/* The graph's own operations name their kernel after the op. */
static atmoe_status launch(atmoe_graph *g, const atm_node *n, atm_args *a,
                           size_t work_items, cl_event *ev)
{
    return atm_node_launch(g, n, a, atm_op_name(n->op), work_items, ev);
}

static cl_kernel kernel_of(atmoe_graph *g, atm_op op)
{
    cl_kernel k = NULL;
    /* Built by atm_node_prepare at planning time; this is a lookup. */
    atm_kernel_get(g->ctx, op_kernels[op].program, "", op_kernels[op].kernel,
                   &k);
    return k;
}

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

static const atmoe_tensor *src_rt(const atmoe_graph *g, const atm_node *n,
                                  int i)
{
    return n->src[i] == ATMOE_NODE_NONE ? NULL : &g->nodes[n->src[i]].rt;
}

static atmoe_status run_matmul(atmoe_graph *g, atm_node *n, cl_event *first,
                               cl_event *last)
{
    const atmoe_tensor *a = src_rt(g, n, 0), *b = src_rt(g, n, 1);
    const atmoe_tensor *bias = src_rt(g, n, 2);
    atmoe_tensor *c = &n->rt;
    int ta = !!(n->flags & ATMOE_MATMUL_TRANSPOSE_A);
    int tb = !!(n->flags & ATMOE_MATMUL_TRANSPOSE_B);
    size_t m = c->shape[0], cols = c->shape[1], k = a->shape[!ta];
    float beta = 0.0f;
    if (bias) {
        /* The bias goes into C first, and the GEMM accumulates onto it
         * with beta = 1. */
        atmoe_status st = atm_tensor_broadcast_rows(c, bias, first);
        if (st != ATMOE_STATUS_OK)
            return st;
        beta = 1.0f;
        first = NULL;
    }
    /* Without a bias the GEMM is the node's first command, with one its
     * last. */
    cl_event *target = first ? first : last;
    atm_gemm p = {ta, tb, m, cols, k, 1.0f, beta, a->buffer, b->buffer,
                  c->buffer, a->offset, a->shape[1], b->offset, b->shape[1],
                  c->offset, cols};
    return atm_graph_sgemm(g, &p, target);
}

/* Copies src (any strides) into the block of dst that starts at start. */
static atmoe_status copy_into(const atmoe_tensor *dst, const size_t *start,
                              const atmoe_tensor *src, cl_event *ev)
{
    atmoe_tensor block = *dst;
    for (int i = 0; i < dst->ndim; i++) {
        block.offset += start[i] * dst->stride[i];
        block.shape[i] = src->shape[i];
    }
    return atm_tensor_copy(&block, src, ev);
}

atmoe_status atm_node_run(atmoe_graph *g, atm_node *n, cl_event *first,
                          cl_event *last)
{
    atmoe_tensor *out = &n->rt;
    const atmoe_tensor *x = src_rt(g, n, 0);
    cl_ulong outer, len, inner;
    atm_args a = {NULL, 0, CL_SUCCESS};
    if (op_kernels[n->op].program)
        a.k = kernel_of(g, n->op);
    cl_event *ev = first; /* single-kernel nodes: first is also last */

    switch (n->op) {
    case ATM_OP_INPUT:
    case ATM_OP_PARAMETER:
    case ATM_OP_CONSTANT:
    case ATM_OP_RESHAPE:
    case ATM_OP_SECONDARY:
        return ATMOE_STATUS_OK; /* nothing to compute */

    case ATM_OP_MATMUL:
        return run_matmul(g, n, first, last);

    case ATM_OP_ROUTER:
        return atm_router_node_run(g, n, ev);

    case ATM_OP_MIXTURE:
        return atm_mixture_node_run(g, n, first, last);

    case ATM_OP_ADD:
    case ATM_OP_MUL: {
        const atmoe_tensor *y = src_rt(g, n, 1);
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
        return launch(g, n, &a, atm_tensor_count(out), ev);
    }

    case ATM_OP_SCALE:
    case ATM_OP_SILU:
    case ATM_OP_GELU:
    case ATM_OP_SIGMOID:
        atm_arg_tensor(&a, out);
        atm_arg_tensor(&a, x);
        atm_arg_ulong(&a, atm_tensor_count(out));
        atm_arg_float(&a, n->alpha);
        return launch(g, n, &a, atm_tensor_count(out), ev);

    case ATM_OP_SOFTMAX:
    case ATM_OP_MEAN:
    case ATM_OP_L2NORM:
        split3(x, n->dim, &outer, &len, &inner);
        atm_arg_tensor(&a, out);
        atm_arg_tensor(&a, x);
        atm_arg_ulong(&a, outer);
        atm_arg_ulong(&a, len);
        atm_arg_ulong(&a, inner);
        if (n->op == ATM_OP_L2NORM)
            atm_arg_float(&a, n->eps);
        return launch(g, n, &a, outer * inner, ev);

    case ATM_OP_TOPK: {
        atm_node *ix = &g->nodes[n->co[0]];
        /* The kernel writes both; the planner places the indices whenever
         * topk runs, needed or not. */
        split3(x, n->dim, &outer, &len, &inner);
        atm_arg_tensor(&a, out);
        atm_arg_tensor(&a, &ix->rt);
        atm_arg_tensor(&a, x);
        atm_arg_ulong(&a, outer);
        atm_arg_ulong(&a, len);
        atm_arg_ulong(&a, inner);
        atm_arg_ulong(&a, (cl_ulong)n->k);
        return launch(g, n, &a, outer * inner, ev);
    }

    case ATM_OP_RMSNORM:
    case ATM_OP_LAYERNORM: {
        const atmoe_tensor *w = src_rt(g, n, 1), *bias = src_rt(g, n, 2);
        split3(x, x->ndim - 1, &outer, &len, &inner);
        atm_arg_tensor(&a, out);
        atm_arg_tensor(&a, x);
        atm_arg_tensor(&a, w ? w : x);
        atm_arg_int(&a, w != NULL);
        if (n->op == ATM_OP_LAYERNORM) {
            atm_arg_tensor(&a, bias ? bias : x);
            atm_arg_int(&a, bias != NULL);
        }
        atm_arg_ulong(&a, outer);
        atm_arg_ulong(&a, len);
        atm_arg_float(&a, n->eps);
        return launch(g, n, &a, outer, ev);
    }

    case ATM_OP_GATHER_ROWS: {
        const atmoe_tensor *idx = src_rt(g, n, 1);
        cl_ulong row = atm_tensor_count(x) / x->shape[0];
        atm_arg_tensor(&a, out);
        atm_arg_tensor(&a, x);
        atm_arg_tensor(&a, idx);
        atm_arg_ulong(&a, x->shape[0]);
        atm_arg_ulong(&a, row);
        atm_arg_ulong(&a, atm_tensor_count(out));
        return launch(g, n, &a, atm_tensor_count(out), ev);
    }

    case ATM_OP_SCATTER_ADD_ROWS: {
        const atmoe_tensor *idx = src_rt(g, n, 1), *src = src_rt(g, n, 2);
        /* Out-of-place: start from a copy of dst. */
        if (out->buffer != x->buffer || out->offset != x->offset) {
            atmoe_status st = atm_tensor_copy(out, x, first);
            if (st != ATMOE_STATUS_OK)
                return st;
            ev = last;
        }
        cl_ulong row = atm_tensor_count(out) / out->shape[0];
        atm_arg_tensor(&a, out);
        atm_arg_tensor(&a, idx);
        atm_arg_tensor(&a, src);
        atm_arg_ulong(&a, out->shape[0]);
        atm_arg_ulong(&a, row);
        atm_arg_ulong(&a, atm_tensor_count(src));
        return launch(g, n, &a, atm_tensor_count(src), ev);
    }

    case ATM_OP_VIEW: {
        atmoe_tensor block = *x;
        for (int i = 0; i < x->ndim; i++) {
            block.offset += n->start[i] * x->stride[i];
            block.shape[i] = out->shape[i];
        }
        return atm_tensor_copy(out, &block, ev);
    }

    case ATM_OP_CAST:
        return atm_tensor_copy(out, x, ev);

    case ATM_OP_TRANSPOSE: {
        /* Reading x with its two strides exchanged is the transpose. */
        atmoe_tensor t = *x;
        t.shape[n->dim] = x->shape[n->dim1];
        t.shape[n->dim1] = x->shape[n->dim];
        t.stride[n->dim] = x->stride[n->dim1];
        t.stride[n->dim1] = x->stride[n->dim];
        return atm_tensor_copy(out, &t, ev);
    }

    case ATM_OP_CONCAT: {
        const atmoe_tensor *y = src_rt(g, n, 1);
        size_t start[ATMOE_MAX_DIMS] = {0};
        atmoe_status st = copy_into(out, start, x, first);
        if (st != ATMOE_STATUS_OK)
            return st;
        start[n->dim] = x->shape[n->dim];
        return copy_into(out, start, y, last);
    }

    case ATM_OP_COUNT_:
        break;
    }
    return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                    "node '%s': unknown operation %d", n->name, (int)n->op);
}

void atm_node_cost(const atmoe_graph *g, const atm_node *n, uint64_t *bytes,
                   uint64_t *flops)
{
    const atmoe_tensor *out = &n->rt;
    uint64_t count = atm_tensor_count(out);
    uint64_t in = 0;
    for (int i = 0; i < n->nsrc; i++) {
        const atmoe_tensor *s = src_rt(g, n, i);
        if (s)
            in += atm_tensor_count(s) * atmoe_dtype_size(s->dtype);
    }
    *bytes = in + count * atmoe_dtype_size(out->dtype);
    *flops = 0;
    switch (n->op) {
    case ATM_OP_MATMUL: {
        const atmoe_tensor *a = src_rt(g, n, 0);
        uint64_t k = a->shape[!(n->flags & ATMOE_MATMUL_TRANSPOSE_A)];
        *flops = 2 * count * k + (n->src[2] != ATMOE_NODE_NONE ? count : 0);
        break;
    }
    case ATM_OP_ADD:
    case ATM_OP_MUL:
    case ATM_OP_SCALE:
        *flops = count;
        break;
    case ATM_OP_SILU:
    case ATM_OP_SIGMOID:
    case ATM_OP_GELU:
        *flops = 4 * count; /* an exp or erf, a divide, a multiply-add */
        break;
    case ATM_OP_SOFTMAX:
    case ATM_OP_LAYERNORM:
        *flops = 5 * count;
        break;
    case ATM_OP_RMSNORM:
    case ATM_OP_L2NORM:
        *flops = 3 * count;
        break;
    case ATM_OP_MEAN:
        *flops = atm_tensor_count(src_rt(g, n, 0));
        break;
    case ATM_OP_TOPK: {
        const atmoe_tensor *x = src_rt(g, n, 0);
        *flops = atm_tensor_count(x) * (uint64_t)n->k;
        break;
    }
    case ATM_OP_SCATTER_ADD_ROWS:
        *flops = atm_tensor_count(src_rt(g, n, 2));
        break;
    case ATM_OP_MIXTURE:
        atm_mixture_node_cost(g, n, bytes, flops);
        break;
    case ATM_OP_ROUTER: {
        const atmoe_tensor *h = src_rt(g, n, 0), *d = src_rt(g, n, 2);
        *flops = 2 * atm_tensor_count(h) * (uint64_t)(n->router->form ==
                                                       ATMOE_ROUTER_PROJECTED
                                                   ? d->shape[1]
                                                   : 0) +
                 2 * atm_tensor_count(h) * n->router->set->groups;
        break;
    }
    default:
        break;
    }
    if (n->op == ATM_OP_RESHAPE || n->op == ATM_OP_INPUT ||
        n->op == ATM_OP_PARAMETER || n->op == ATM_OP_CONSTANT ||
        n->op == ATM_OP_SECONDARY)
        *bytes = 0;
}
