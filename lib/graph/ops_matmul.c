/* matmul: C = op(A) op(B) (+ bias), through CLBlast; and the GEMMs of
 * other operations, with the plan's CLBlast scratch. */
#include <config.h>

#include "device/blas.h"
#include "graph/backward.h"
#include "graph/graph.h"

enum { K_COPY }; /* kernel slots: the bias's broadcast copy */

atmoe_status atm_graph_sgemm(atmoe_graph *g, const atm_gemm *p,
                             cl_event *event)
{
    return atm_sgemm(g->ctx, p, g->gemm_temp, g->gemm_temp_bytes, event);
}

size_t atm_graph_sgemm_scratch(atmoe_graph *g, const atm_gemm *p)
{
    size_t bytes = 0;
    /* A size CLBlast cannot tell is no scratch: the call itself then makes
     * its own, or reports the same failure when the node runs. */
    if (atm_sgemm_scratch(g->ctx, p, &bytes) != ATMOE_STATUS_OK)
        bytes = 0;
    return bytes;
}

/* The node's GEMM at its runtime shapes: beta 1 over a bias copied in. */
static atm_gemm matmul_gemm(const atmoe_graph *g, const atm_node *n)
{
    const atmoe_tensor *a = atm_src_rt(g, n, 0), *b = atm_src_rt(g, n, 1);
    const atmoe_tensor *c = &n->rt;
    int ta = !!(n->p.matmul_flags & ATMOE_MATMUL_TRANSPOSE_A);
    int tb = !!(n->p.matmul_flags & ATMOE_MATMUL_TRANSPOSE_B);
    size_t m = c->shape[0], cols = c->shape[1], k = a->shape[!ta];
    float beta = n->src[2] != ATMOE_NODE_NONE ? 1.0f : 0.0f;
    atm_gemm p = {ta, tb, m, cols, k, 1.0f, beta, a->buffer, b->buffer,
                  c->buffer, a->offset, a->shape[1], b->offset, b->shape[1],
                  c->offset, cols};
    return p;
}

static atmoe_status matmul_prepare(atmoe_graph *g, atm_node *n)
{
    if (n->src[2] == ATMOE_NODE_NONE)
        return ATMOE_STATUS_OK;
    return atm_copy_kernel(g->ctx, ATMOE_DTYPE_F32, ATMOE_DTYPE_F32,
                           &n->kernel[K_COPY]);
}

static size_t matmul_gemm_scratch(atmoe_graph *g, const atm_node *n)
{
    atm_gemm p = matmul_gemm(g, n);
    return atm_graph_sgemm_scratch(g, &p);
}

static atmoe_status matmul_run(atmoe_graph *g, atm_node *n, cl_event *first,
                               cl_event *last)
{
    const atmoe_tensor *bias = atm_src_rt(g, n, 2);
    if (bias) {
        /* The bias goes into C first, and the GEMM accumulates onto it
         * with beta = 1. */
        atmoe_status st =
            atm_tensor_broadcast_rows(n->kernel[K_COPY], &n->rt, bias, first);
        if (st != ATMOE_STATUS_OK)
            return st;
        first = NULL;
    }
    /* Without a bias the GEMM is the node's first command, with one its
     * last. */
    atm_gemm p = matmul_gemm(g, n);
    return atm_graph_sgemm(g, &p, first ? first : last);
}

static void matmul_cost(const atmoe_graph *g, const atm_node *n,
                        uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    const atmoe_tensor *a = atm_src_rt(g, n, 0);
    uint64_t count = atm_tensor_count(&n->rt);
    uint64_t k = a->shape[!(n->p.matmul_flags & ATMOE_MATMUL_TRANSPOSE_A)];
    *flops = 2 * count * k + (n->src[2] != ATMOE_NODE_NONE ? count : 0);
}

/* C = op(A) op(B) + bias, with dC:
 *   dA = dC op(B)^T   (stored transposed when A is: op(B) dC^T),
 *   dB = op(A)^T dC   (stored transposed when B is: dC^T op(A)),
 * each one GEMM whose transpose flags fold the cases; dbias = dC summed
 * over rows.  A batch in the rows of C meets the batched operand's rows in
 * dA; an unbatched weight's gradient sums over the batch in its GEMM. */
static atmoe_status matmul_backward(atmoe_graph *g, int node,
                                    const int *gout, const unsigned char *need,
                                    int *gin)
{
    const atm_node *n = &g->nodes[node];
    int a = n->src[0], b = n->src[1], bias = n->src[2], dc = gout[0];
    unsigned f = n->p.matmul_flags;
    int ta = !!(f & ATMOE_MATMUL_TRANSPOSE_A);
    int tb = !!(f & ATMOE_MATMUL_TRANSPOSE_B);
    const unsigned TA = ATMOE_MATMUL_TRANSPOSE_A, TB = ATMOE_MATMUL_TRANSPOSE_B;
    atmoe_status st = ATMOE_STATUS_OK;
    if (need[0])
        st = ta ? atmoe_graph_matmul(g, b, dc, ATMOE_NODE_NONE,
                                     tb ? TA | TB : TB, &gin[0])
                : atmoe_graph_matmul(g, dc, b, ATMOE_NODE_NONE, tb ? 0 : TB,
                                     &gin[0]);
    if (st == ATMOE_STATUS_OK && need[1])
        st = tb ? atmoe_graph_matmul(g, dc, a, ATMOE_NODE_NONE,
                                     ta ? TA | TB : TA, &gin[1])
                : atmoe_graph_matmul(g, a, dc, ATMOE_NODE_NONE, ta ? 0 : TA,
                                     &gin[1]);
    if (st == ATMOE_STATUS_OK && need[2])
        st = atm_grad_sum_to(g, dc, bias, &gin[2]);
    return st;
}

const atm_op atm_op_matmul = {
    .name = "matmul",
    .flags = ATM_OPF_MARKER,
    .prepare = matmul_prepare,
    .gemm_scratch = matmul_gemm_scratch,
    .run = matmul_run,
    .cost = matmul_cost,
    .backward = matmul_backward,
};

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
                        "%s: operands must be f32: a is %s, b is %s "
                        "(atmoe_graph_cast converts f16 and bf16 to f32)",
                        fn, atm_node_desc(an, da, sizeof da),
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
    atm_node_init(&p, &atm_op_matmul, ATMOE_DTYPE_F32, 2, shape);
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
    p.p.matmul_flags = flags;
    return atm_graph_finish(g, &p, fn, out);
}

