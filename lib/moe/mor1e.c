/* The rank-1 expert layer of Intuition-MoR1E / T-REX (SPEC section 4) as
 * graph nodes, and its reference initialisation.
 *
 * A layer is four nodes of its own, each a seam a backward pass can take:
 *
 *   shrink  u_all [T, r1 + E] = x [A; W_r]^T: the router's logits in the
 *           same pass over x as the rank channels (W_r holds more
 *           parameters than A and B together, so its product dominates),
 *           A and W_r stacked in its scratch
 *   route   z [T, Z] = c M(g) u from u_all and the intuition scores, with
 *           p and g as secondary outputs (cl/mor1e.cl)
 *   expand  y = x W0^T + bias + B z, the base projection with the expand in
 *           one pass over W0 and B (cl/linear.cl, as the mixture's)
 *   stats   load and importance per expert, computed only when read
 *
 * With many tokens on a device where cl/linear.cl gives way to CLBlast
 * (the "linear" MAX_TOKENS parameter), shrink and expand run as GEMMs. */
#include <config.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/alloc.h"
#include "device/blas.h"
#include "device/tuning.h"
#include "graph/graph.h"
#include "moe/linear.h"
#include "moe/mor1e.h"

/* The parameters of the shrink and expand nodes: those of the linear
 * route's products (variant, blocks) and the largest batch it runs (then
 * CLBlast). */
typedef struct linear_params {
    atm_linear_tune lin;
    size_t linear_upto;
    atmoe_dtype w0_dtype; /* expand: W0 as stored */
} linear_params;

/* The route node's (moe/mor1e.h: its backward reads them too). */
typedef atm_mor1e_route route_params;

extern const atm_op atm_op_mor1e_shrink, atm_op_mor1e_route,
    atm_op_mor1e_expand, atm_op_mor1e_stats;

/* Kernel slots of the expand (the shrink uses the first ones): the linear
 * route's (moe/linear.h), the bias's broadcast and W0's copy into f32 for
 * CLBlast. */
enum { K_LIN1, K_COPY = K_LIN1 + ATM_LINEAR_SLOTS, K_W0_F32 };

/* The blocks are those tuned for products over a weight stored as w. */
static void linear_params_init(atmoe_graph *g, linear_params *lp,
                               atmoe_dtype w)
{
    long upto = atm_param_get(g->ctx, ATM_PARAM_LINEAR_MAX_TOKENS);
    atm_linear_tune_get(g->ctx, w, &lp->lin);
    lp->linear_upto = upto >= 1 ? (size_t)upto : 0;
}

/* The linear route's kernels for every batch up to T, W read as wt. */
static atmoe_status linear_kernels(atmoe_graph *g, atm_node *n, size_t T,
                                   int wt)
{
    linear_params *lp = ATM_NODE_PARAMS(linear_params, n);
    return atm_linear_kernels(g, n, K_LIN1, T, lp->linear_upto, wt, 0,
                              &lp->lin);
}

/* ---------------------------------------------------------------- shrink */

/* The shrink's operands are x, A and W_r (ATMOE_NODE_NONE with the router
 * off).  With the router, A and W_r are stacked into the node's scratch
 * before the one pass over x: two buffer copies (memcpy on CPU drivers;
 * graph nodes are dense), where a concat node's strided copy kernel cost
 * more than the shrink. */
static atmoe_status shrink_prepare(atmoe_graph *g, atm_node *n)
{
    linear_params *lp = ATM_NODE_PARAMS(linear_params, n);
    linear_params_init(g, lp, ATMOE_DTYPE_F32);
    return linear_kernels(g, n, g->nodes[n->src[0]].shape[0], 0);
}

static size_t shrink_scratch(const atmoe_graph *g, const atm_node *n)
{
    if (n->src[2] == ATMOE_NODE_NONE)
        return 0;
    const atm_node *a = &g->nodes[n->src[1]], *w_r = &g->nodes[n->src[2]];
    return (a->shape[0] + w_r->shape[0]) * a->shape[1] * sizeof(float);
}

/* The weight the shrink reads: A, or the stacked [A; W_r] in scratch. */
static atmoe_tensor shrink_weight(const atmoe_graph *g, const atm_node *n)
{
    atmoe_tensor w = *atm_src_rt(g, n, 1);
    if (n->src[2] != ATMOE_NODE_NONE) {
        w.buffer = g->arena;
        w.offset = n->work_offset / sizeof(float);
        w.shape[0] += atm_src_rt(g, n, 2)->shape[0];
        w.stride[0] = w.shape[1];
        w.stride[1] = 1;
    }
    return w;
}

/* dst (in the arena) = src, both dense. */
static atmoe_status stack_copy(atmoe_graph *g, const atmoe_tensor *dst,
                               const atmoe_tensor *src, cl_event *ev)
{
    cl_int err = clEnqueueCopyBuffer(
        g->ctx->queue, src->buffer, dst->buffer, src->offset * sizeof(float),
        dst->offset * sizeof(float), atm_tensor_count(src) * sizeof(float),
        0, NULL, ev);
    if (err != CL_SUCCESS)
        return atm_fail_cl(g->ctx, err, "clEnqueueCopyBuffer(mor1e_shrink)");
    return ATMOE_STATUS_OK;
}

static atm_gemm shrink_gemm(const atmoe_graph *g, const atm_node *n)
{
    const atmoe_tensor *x = atm_src_rt(g, n, 0);
    atmoe_tensor w = shrink_weight(g, n);
    size_t T = x->shape[0], U = w.shape[0], k = w.shape[1];
    return (atm_gemm){0, 1, T, U, k, 1.0f, 0.0f, x->buffer, w.buffer,
                      n->rt.buffer, x->offset, k, w.offset, k,
                      n->rt.offset, U};
}

static size_t shrink_gemm_scratch(atmoe_graph *g, const atm_node *n)
{
    const linear_params *lp = ATM_NODE_PARAMS(linear_params, n);
    if (g->nodes[n->src[0]].rt.shape[0] <= lp->linear_upto)
        return 0;
    atm_gemm p = shrink_gemm(g, n);
    return atm_graph_sgemm_scratch(g, &p);
}

static atmoe_status shrink_run(atmoe_graph *g, atm_node *n, cl_event *first,
                               cl_event *last)
{
    const linear_params *lp = ATM_NODE_PARAMS(linear_params, n);
    const atmoe_tensor *x = atm_src_rt(g, n, 0);
    atmoe_tensor w = shrink_weight(g, n);
    size_t T = x->shape[0];
    atmoe_status st;
    (void)last;
    if (n->src[2] != ATMOE_NODE_NONE) {
        const atmoe_tensor *a = atm_src_rt(g, n, 1);
        const atmoe_tensor *w_r = atm_src_rt(g, n, 2);
        atmoe_tensor top = w, bottom = w;
        top.shape[0] = a->shape[0];
        bottom.shape[0] = w_r->shape[0];
        bottom.offset += a->shape[0] * a->shape[1];
        if ((st = stack_copy(g, &top, a, first)) ||
            (st = stack_copy(g, &bottom, w_r, NULL)))
            return st;
        first = NULL;
    }
    if (T > lp->linear_upto) {
        atm_gemm p = shrink_gemm(g, n);
        return atm_graph_sgemm(g, &p, first ? first : last);
    }
    atm_linear_call c = {n->rt.buffer, w.buffer, NULL, n->rt.offset,
                         w.offset, 0, x, NULL, NULL, w.shape[0],
                         w.shape[1], 0, 0.0f};
    return atm_linear_run(g, n, T, K_LIN1, &lp->lin, &c,
                          first ? first : last);
}

static void shrink_cost(const atmoe_graph *g, const atm_node *n,
                        uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    *flops = 2 * (uint64_t)atm_tensor_count(&n->rt) *
             g->nodes[n->src[1]].rt.shape[1];
}

const atm_op atm_op_mor1e_shrink = {
    .name = "mor1e_shrink",
    .flags = ATM_OPF_MARKER,
    .prepare = shrink_prepare,
    .scratch = shrink_scratch,
    .gemm_scratch = shrink_gemm_scratch,
    .run = shrink_run,
    .cost = shrink_cost,
    .backward = atm_mor1e_shrink_backward,
};

/* ---------------------------------------------------------------- route */

static atmoe_status route_run(atmoe_graph *g, atm_node *n, cl_event *first,
                              cl_event *last)
{
    (void)last;
    const route_params *rp = ATM_NODE_PARAMS(route_params, n);
    const atmoe_tensor *u = atm_src_rt(g, n, 0), *s = atm_src_rt(g, n, 1);
    const atmoe_tensor *index = atm_src_rt(g, n, 2);
    const atmoe_tensor *w_om = atm_src_rt(g, n, 3), *w_c = atm_src_rt(g, n, 4);
    const atmoe_tensor *gates = &g->nodes[n->co[1]].rt;
    const atmoe_tensor *p = n->co[0] >= 0 ? &g->nodes[n->co[0]].rt : gates;
    size_t T = u->shape[0];
    int mode = index ? 1 : s && s->shape[0] == 1 &&
                                   g->nodes[n->src[1]].batch_dim < 0
                               ? 2
                               : 0;
    /* Absent operands are bound to u: kernels need a valid cl_mem. */
    atm_args args = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&args, &n->rt);
    atm_arg_tensor(&args, p);
    atm_arg_tensor(&args, gates);
    atm_arg_tensor(&args, u);
    atm_arg_ulong(&args, u->shape[1]);
    atm_arg_tensor(&args, s ? s : u);
    atm_arg_ulong(&args, s ? s->shape[0] : 0);
    atm_arg_int(&args, mode);
    atm_arg_tensor(&args, index ? index : u);
    atm_arg_tensor(&args, w_om);
    atm_arg_tensor(&args, w_c);
    atm_arg_int(&args, rp->has_router);
    atm_arg_int(&args, rp->has_scores);
    atm_arg_int(&args, rp->dense);
    atm_arg_float(&args, rp->k_router);
    atm_arg_float(&args, rp->k_intuition);
    atm_arg_ulong(&args, (cl_ulong)rp->top_k);
    atm_arg_ulong(&args, T);
    atm_arg_ulong(&args, rp->r1);
    atm_arg_ulong(&args, rp->r2);
    atm_arg_ulong(&args, rp->E);
    return atm_node_launch(g, n, &args, "mor1e_route", T, first);
}

static void route_cost(const atmoe_graph *g, const atm_node *n,
                       uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    const route_params *rp = ATM_NODE_PARAMS(route_params, n);
    uint64_t T = g->nodes[n->src[0]].rt.shape[0];
    /* softmax, the gate's two products and sum, the mix and c */
    *flops = T * (rp->has_router ? 3 * rp->E : 0) + 3 * T * rp->E +
             2 * T * rp->E + T * (rp->dense ? rp->r2 : rp->r1);
}

const atm_op atm_op_mor1e_route = {
    .name = "mor1e_route",
    .program = "mor1e",
    .kernel = "mor1e_route",
    .run = route_run,
    .cost = route_cost,
    .backward = atm_mor1e_route_backward,
};

/* ---------------------------------------------------------------- expand */

static atmoe_status expand_prepare(atmoe_graph *g, atm_node *n)
{
    linear_params *lp = ATM_NODE_PARAMS(linear_params, n);
    linear_params_init(g, lp, lp->w0_dtype);
    size_t T = g->nodes[n->src[0]].shape[0];
    atmoe_status st =
        linear_kernels(g, n, T, atm_weight_type(lp->w0_dtype));
    if (st == ATMOE_STATUS_OK && T > lp->linear_upto) {
        if (lp->w0_dtype != ATMOE_DTYPE_F32)
            st = atm_copy_kernel(g->ctx, ATMOE_DTYPE_F32, lp->w0_dtype,
                                 &n->kernel[K_W0_F32]);
        if (st == ATMOE_STATUS_OK && n->src[2] != ATMOE_NODE_NONE)
            st = atm_copy_kernel(g->ctx, ATMOE_DTYPE_F32, ATMOE_DTYPE_F32,
                                 &n->kernel[K_COPY]);
    }
    return st;
}

/* CLBlast reads f32: a half-precision W0 is converted into scratch for the
 * batches that take it. */
static size_t expand_scratch(const atmoe_graph *g, const atm_node *n)
{
    const linear_params *lp = ATM_NODE_PARAMS(linear_params, n);
    const atm_node *w0 = &g->nodes[n->src[1]];
    if (lp->w0_dtype == ATMOE_DTYPE_F32 ||
        g->nodes[n->src[0]].shape[0] <= lp->linear_upto)
        return 0;
    return w0->shape[0] * w0->shape[1] * sizeof(float);
}

enum { G_BASE, G_EXPAND };

static atm_gemm expand_gemm(const atmoe_graph *g, const atm_node *n,
                            int which)
{
    const linear_params *lp = ATM_NODE_PARAMS(linear_params, n);
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *w0 = atm_src_rt(g, n, 1);
    const atmoe_tensor *z = atm_src_rt(g, n, 3), *b = atm_src_rt(g, n, 4);
    const atmoe_tensor *y = &n->rt;
    size_t T = x->shape[0], d_in = x->shape[1], d_out = y->shape[1];
    size_t Z = z->shape[1];
    if (which == G_EXPAND) /* y += z B^T */
        return (atm_gemm){0, 1, T, d_out, Z, 1.0f, 1.0f, z->buffer,
                          b->buffer, y->buffer, z->offset, Z, b->offset, Z,
                          y->offset, d_out};
    float beta = n->src[2] != ATMOE_NODE_NONE ? 1.0f : 0.0f;
    int f32 = lp->w0_dtype == ATMOE_DTYPE_F32;
    return (atm_gemm){0, 1, T, d_out, d_in, 1.0f, beta, x->buffer,
                      f32 ? w0->buffer : g->arena, y->buffer, x->offset, d_in,
                      f32 ? w0->offset : n->work_offset / sizeof(float), d_in,
                      y->offset, d_out};
}

static size_t expand_gemm_scratch(atmoe_graph *g, const atm_node *n)
{
    const linear_params *lp = ATM_NODE_PARAMS(linear_params, n);
    if (g->nodes[n->src[0]].rt.shape[0] <= lp->linear_upto)
        return 0;
    size_t need = 0;
    for (int i = G_BASE; i <= G_EXPAND; i++) {
        atm_gemm p = expand_gemm(g, n, i);
        size_t bytes = atm_graph_sgemm_scratch(g, &p);
        if (bytes > need)
            need = bytes;
    }
    return need;
}

static atmoe_status expand_run(atmoe_graph *g, atm_node *n, cl_event *first,
                               cl_event *last)
{
    const linear_params *lp = ATM_NODE_PARAMS(linear_params, n);
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *w0 = atm_src_rt(g, n, 1);
    const atmoe_tensor *bias = atm_src_rt(g, n, 2);
    const atmoe_tensor *z = atm_src_rt(g, n, 3), *b = atm_src_rt(g, n, 4);
    size_t T = x->shape[0];
    atmoe_status st;
    if (T <= lp->linear_upto) {
        atm_linear_call c = {n->rt.buffer, w0->buffer, z->buffer,
                             n->rt.offset, w0->offset, z->offset, x, bias,
                             b, n->rt.shape[1], x->shape[1], z->shape[1],
                             1.0f};
        /* The node's only command: with profiling, its event is the
         * first's, or the last's after the marker that opens the node. */
        return atm_linear_run(g, n, T, K_LIN1, &lp->lin, &c,
                              first ? first : last);
    }
    /* CLBlast: y = bias (broadcast), y += x W0^T, y += z B^T. */
    if (bias) {
        if ((st = atm_tensor_broadcast_rows(n->kernel[K_COPY], &n->rt, bias,
                                            first)) != ATMOE_STATUS_OK)
            return st;
        first = NULL;
    }
    atm_gemm base = expand_gemm(g, n, G_BASE);
    if (lp->w0_dtype != ATMOE_DTYPE_F32) {
        atmoe_tensor w = *w0;
        w.dtype = ATMOE_DTYPE_F32;
        w.buffer = g->arena;
        w.offset = base.b_offset;
        if ((st = atm_tensor_copy_with(n->kernel[K_W0_F32], &w, w0, first)))
            return st;
        first = NULL;
    }
    atm_gemm expand = expand_gemm(g, n, G_EXPAND);
    if ((st = atm_graph_sgemm(g, &base, first)) != ATMOE_STATUS_OK)
        return st;
    return atm_graph_sgemm(g, &expand, last);
}

static void expand_cost(const atmoe_graph *g, const atm_node *n,
                        uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *z = atm_src_rt(g, n, 3);
    uint64_t T = x->shape[0], d_out = n->rt.shape[1];
    *flops = 2 * T * d_out * (x->shape[1] + z->shape[1]) +
             (n->src[2] != ATMOE_NODE_NONE ? T * d_out : 0);
}

const atm_op atm_op_mor1e_expand = {
    .name = "mor1e_expand",
    .flags = ATM_OPF_MARKER,
    .prepare = expand_prepare,
    .scratch = expand_scratch,
    .gemm_scratch = expand_gemm_scratch,
    .run = expand_run,
    .cost = expand_cost,
    .backward = atm_mor1e_expand_backward,
};

/* ---------------------------------------------------------------- stats */

static atmoe_status stats_run(atmoe_graph *g, atm_node *n, cl_event *first,
                              cl_event *last)
{
    (void)last;
    const atmoe_tensor *gates = atm_src_rt(g, n, 0), *p = atm_src_rt(g, n, 1);
    const atmoe_tensor *imp = n->co[0] >= 0 ? &g->nodes[n->co[0]].rt : &n->rt;
    size_t E = n->rt.shape[0];
    atm_args args = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&args, &n->rt);
    atm_arg_tensor(&args, imp);
    atm_arg_tensor(&args, gates);
    atm_arg_tensor(&args, p ? p : gates);
    atm_arg_int(&args, p != NULL);
    atm_arg_ulong(&args, gates->shape[0]);
    atm_arg_ulong(&args, E);
    return atm_node_launch(g, n, &args, "mor1e_stats", E, first);
}

const atm_op atm_op_mor1e_stats = {
    .name = "mor1e_stats",
    .program = "mor1e",
    .kernel = "mor1e_stats",
    .run = stats_run,
};

/* ---------------------------------------------------------------- build */

/* A 2-D f32 node [rows, cols] unbatched; cols or rows of 0 take any. */
static atmoe_status want_matrix(const atmoe_graph *g, const char *fn,
                                const char *what, const atm_node *n,
                                size_t rows, size_t cols, const char *why)
{
    char b[160];
    if (n->dtype != ATMOE_DTYPE_F32)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: %s must be f32; it is %s", fn, what,
                        atm_node_desc(n, b, sizeof b));
    if (n->ndim != 2 || (rows && n->shape[0] != rows) ||
        (cols && n->shape[1] != cols) || n->batch_dim >= 0 ||
        n->shape[0] == 0 || n->shape[1] == 0)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s must be an unbatched f32 [%s]; it is %s", fn,
                        what, why, atm_node_desc(n, b, sizeof b));
    return ATMOE_STATUS_OK;
}

static atmoe_status want_scalar(const atmoe_graph *g, const char *fn,
                                const char *what, const atm_node *n)
{
    char b[160];
    if (n->dtype != ATMOE_DTYPE_F32 || n->ndim != 1 || n->shape[0] != 1 ||
        n->batch_dim >= 0)
        return atm_fail(g->ctx,
                        n->dtype != ATMOE_DTYPE_F32
                            ? ATMOE_STATUS_DTYPE_MISMATCH
                            : ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s must be an unbatched f32 [1]; it is %s", fn,
                        what, atm_node_desc(n, b, sizeof b));
    return ATMOE_STATUS_OK;
}

/* Everything the builder checks, then the nodes it adds. */
typedef struct layer_nodes {
    const atm_node *x, *w0, *bias, *a, *b, *w_r, *w_om, *w_c, *scores, *map,
        *index;
    size_t T, d_in, d_out, r1, r2, E;
} layer_nodes;

static atmoe_status check_layer(const atmoe_graph *g, atmoe_node x,
                                const atmoe_mor1e_layer *L, layer_nodes *n)
{
    const char *fn = "atmoe_graph_mor1e_layer";
    char b1[160], b2[160], want[64];
    atmoe_status st;
    memset(n, 0, sizeof *n);
    if (L->variant != ATMOE_MOR1E_V1 && L->variant != ATMOE_MOR1E_V2)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: variant %d is not an atmoe_mor1e_variant", fn,
                        (int)L->variant);
    if (L->routing != ATMOE_MOR1E_ROUTE_BOTH &&
        L->routing != ATMOE_MOR1E_ROUTE_ROUTER &&
        L->routing != ATMOE_MOR1E_ROUTE_INTUITION)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: routing %d is not an atmoe_mor1e_routing", fn,
                        (int)L->routing);
    if (!isfinite(L->k_router) || !isfinite(L->k_intuition))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: k_router (%g) and k_intuition (%g) must be "
                        "finite", fn, L->k_router, L->k_intuition);
    int router = L->routing != ATMOE_MOR1E_ROUTE_INTUITION;
    int intuition = L->routing != ATMOE_MOR1E_ROUTE_ROUTER;
    if (router != (L->w_r != ATMOE_NODE_NONE))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: %s", fn,
                        router ? "w_r is ATMOE_NODE_NONE but the router is on"
                               : "w_r is given but the routing is "
                                 "ATMOE_MOR1E_ROUTE_INTUITION (router off); "
                                 "pass ATMOE_NODE_NONE");
    if (intuition != (L->scores != ATMOE_NODE_NONE) ||
        (!intuition && (L->score_map != ATMOE_NODE_NONE ||
                        L->gate_index != ATMOE_NODE_NONE)))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: %s", fn,
                        intuition ? "scores is ATMOE_NODE_NONE but the "
                                    "intuition is on"
                                  : "scores, score_map and gate_index are "
                                    "given but the routing is "
                                    "ATMOE_MOR1E_ROUTE_ROUTER (no intuition)");
    if ((st = atm_graph_get_node(g, x, fn, "x", &n->x)) ||
        (st = atm_graph_get_node(g, L->w0, fn, "w0", &n->w0)) ||
        (st = atm_graph_get_node(g, L->a, fn, "a", &n->a)) ||
        (st = atm_graph_get_node(g, L->b, fn, "b", &n->b)) ||
        (st = atm_graph_get_node(g, L->w_om, fn, "w_om", &n->w_om)) ||
        (st = atm_graph_get_node(g, L->w_c, fn, "w_c", &n->w_c)) ||
        (L->bias != ATMOE_NODE_NONE &&
         (st = atm_graph_get_node(g, L->bias, fn, "bias", &n->bias))) ||
        (router && (st = atm_graph_get_node(g, L->w_r, fn, "w_r", &n->w_r))) ||
        (intuition &&
         (st = atm_graph_get_node(g, L->scores, fn, "scores", &n->scores))) ||
        (L->score_map != ATMOE_NODE_NONE &&
         (st = atm_graph_get_node(g, L->score_map, fn, "score_map",
                                  &n->map))) ||
        (L->gate_index != ATMOE_NODE_NONE &&
         (st = atm_graph_get_node(g, L->gate_index, fn, "gate_index",
                                  &n->index))))
        return st;

    if (n->x->dtype != ATMOE_DTYPE_F32 || n->x->ndim != 2 ||
        n->x->batch_dim > 0 || n->x->shape[1] == 0)
        return atm_fail(g->ctx,
                        n->x->dtype != ATMOE_DTYPE_F32
                            ? ATMOE_STATUS_DTYPE_MISMATCH
                            : ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: x must be f32 [T, d_in]; it is %s", fn,
                        atm_node_desc(n->x, b1, sizeof b1));
    n->T = n->x->shape[0];
    n->d_in = n->x->shape[1];
    snprintf(want, sizeof want, "r1, %zu (d_in)", n->d_in);
    if ((st = want_matrix(g, fn, "a", n->a, 0, n->d_in, want)))
        return st;
    n->r1 = n->a->shape[0];
    if ((st = want_matrix(g, fn, "b", n->b, 0, 0, "d_out, r2 (up vectors)")))
        return st;
    n->d_out = n->b->shape[0];
    n->r2 = n->b->shape[1];
    if (L->variant == ATMOE_MOR1E_V1 && n->r1 != n->r2)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: v1 needs r1 = r2 (one rank-1 expert per channel); "
                        "a %s has r1 = %zu and b %s r2 = %zu", fn,
                        atm_node_desc(n->a, b1, sizeof b1), n->r1,
                        atm_node_desc(n->b, b2, sizeof b2), n->r2);
    n->E = L->variant == ATMOE_MOR1E_V1 ? n->r1 : n->r1 * n->r2;
    if (atm_weight_type(n->w0->dtype) < 0 || n->w0->ndim != 2 ||
        n->w0->shape[0] != n->d_out || n->w0->shape[1] != n->d_in ||
        n->w0->batch_dim >= 0)
        return atm_fail(g->ctx,
                        atm_weight_type(n->w0->dtype) < 0
                            ? ATMOE_STATUS_DTYPE_MISMATCH
                            : ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: w0 must be f32, f16 or bf16 [%zu, %zu] (d_out "
                        "of b, d_in of x); it is %s", fn, n->d_out, n->d_in,
                        atm_node_desc(n->w0, b1, sizeof b1));
    if (n->bias && (n->bias->dtype != ATMOE_DTYPE_F32 || n->bias->ndim != 1 ||
                    n->bias->shape[0] != n->d_out || n->bias->batch_dim >= 0))
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: bias must be f32 [%zu]; it is %s", fn, n->d_out,
                        atm_node_desc(n->bias, b1, sizeof b1));
    snprintf(want, sizeof want, "%zu, %zu (E, d_in)", n->E, n->d_in);
    if (n->w_r && (st = want_matrix(g, fn, "w_r", n->w_r, n->E, n->d_in,
                                    want)))
        return st;
    if ((st = want_scalar(g, fn, "w_om", n->w_om)) ||
        (st = want_scalar(g, fn, "w_c", n->w_c)))
        return st;
    if (L->top_k < 0 || (size_t)L->top_k > n->E)
        return atm_fail(g->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: top_k is %d, must be 0 (all) to %zu (E)", fn,
                        L->top_k, n->E);
    if (!intuition)
        return ATMOE_STATUS_OK;

    const atm_node *s = n->scores;
    if (s->dtype != ATMOE_DTYPE_F32 || s->ndim != 2 || s->batch_dim > 0)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: scores must be f32 [rows, K]; it is %s", fn,
                        atm_node_desc(s, b1, sizeof b1));
    size_t K = s->shape[1];
    if (n->map) {
        if (n->map->dtype != ATMOE_DTYPE_F32 || n->map->ndim != 2 ||
            n->map->shape[0] != K || n->map->shape[1] != n->E ||
            n->map->batch_dim >= 0)
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: score_map must be an unbatched f32 [%zu, "
                            "%zu] (K of scores %s, E); it is %s", fn, K,
                            n->E, atm_node_desc(s, b1, sizeof b1),
                            atm_node_desc(n->map, b2, sizeof b2));
    } else if (K != n->E) {
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: scores %s have K = %zu columns but there are "
                        "E = %zu experts: give a score_map [K, E]", fn,
                        atm_node_desc(s, b1, sizeof b1), K, n->E);
    }
    if (n->index) {
        if (n->index->dtype != ATMOE_DTYPE_I32 || n->index->ndim != 1 ||
            n->index->shape[0] != n->T ||
            n->index->batch_dim != n->x->batch_dim)
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: gate_index must be i32 [%zu], batched like "
                            "x %s; it is %s", fn, n->T,
                            atm_node_desc(n->x, b1, sizeof b1),
                            atm_node_desc(n->index, b2, sizeof b2));
        if (s->batch_dim >= 0)
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: with gate_index, scores hold one row per "
                            "sample and must not be batched; they are %s",
                            fn, atm_node_desc(s, b1, sizeof b1));
    } else if (!(s->shape[0] == 1 && s->batch_dim < 0) &&
               (s->shape[0] != n->T || s->batch_dim != n->x->batch_dim)) {
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: without gate_index, scores need one row per "
                        "token of x %s, or a single row; they are %s", fn,
                        atm_node_desc(n->x, b1, sizeof b1),
                        atm_node_desc(s, b2, sizeof b2));
    }
    return ATMOE_STATUS_OK;
}

/* A secondary output of node src, of the shape given. */
static atmoe_status push_secondary(atmoe_graph *g, atmoe_node src,
                                   const char *label, int ndim,
                                   const size_t *shape, const char *fn,
                                   atmoe_node *out)
{
    atm_node q = g->nodes[src];
    q.op = &atm_op_secondary;
    q.label = label;
    q.ndim = ndim;
    memcpy(q.shape, shape, (size_t)ndim * sizeof *shape);
    if (ndim == 1)
        q.batch_dim = -1, q.batch_factor = 1;
    q.src[0] = src;
    for (int i = 1; i < ATM_MAX_SRC; i++)
        q.src[i] = ATMOE_NODE_NONE;
    q.nsrc = 1;
    q.co[0] = q.co[1] = ATMOE_NODE_NONE;
    return atm_graph_push(g, &q, NULL, fn, out);
}

static atmoe_status build_layer(atmoe_graph *g, atmoe_node x,
                                const atmoe_mor1e_layer *L,
                                const layer_nodes *c, atmoe_node *y,
                                atmoe_mor1e_trace *trace)
{
    const char *fn = "atmoe_graph_mor1e_layer";
    int router = c->w_r != NULL, dense = L->variant == ATMOE_MOR1E_V2;
    /* c's node pointers die with the first push (g->nodes may move). */
    const int has_scores = c->scores != NULL, has_map = c->map != NULL;
    const int bdim = c->x->batch_dim;
    const size_t bfac = c->x->batch_factor;
    const atmoe_dtype w0_dtype = c->w0->dtype;
    atmoe_status st;
    atmoe_node s = L->scores, u, z, pid = ATMOE_NODE_NONE, gid,
               load, imp = ATMOE_NODE_NONE;
    if (has_map && (st = atmoe_graph_matmul(g, L->scores, L->score_map,
                                           ATMOE_NODE_NONE, 0, &s)))
        return st;

    size_t U = c->r1 + (router ? c->E : 0), Z = dense ? c->r2 : c->r1;
    size_t su[2] = {c->T, U}, sz[2] = {c->T, Z}, sg[2] = {c->T, c->E},
           se[1] = {c->E};
    atm_node p;
    atm_node_init(&p, &atm_op_mor1e_shrink, ATMOE_DTYPE_F32, 2, su);
    p.batch_dim = bdim;
    p.batch_factor = bfac;
    p.src[0] = x;
    p.src[1] = L->a;
    p.src[2] = router ? L->w_r : ATMOE_NODE_NONE;
    p.nsrc = 3;
    if ((st = atm_graph_push(g, &p, NULL, fn, &u)))
        return st;

    atm_node_init(&p, &atm_op_mor1e_route, ATMOE_DTYPE_F32, 2, sz);
    p.batch_dim = bdim;
    p.batch_factor = bfac;
    p.src[0] = u;
    p.src[1] = has_scores ? s : ATMOE_NODE_NONE;
    p.src[2] = L->gate_index;
    p.src[3] = L->w_om;
    p.src[4] = L->w_c;
    p.nsrc = 5;
    route_params *rp = ATM_NODE_PARAMS(route_params, &p);
    *rp = (route_params){c->r1, c->r2, c->E, dense, router,
                         has_scores, L->k_router, L->k_intuition,
                         L->top_k};
    if ((st = atm_graph_push(g, &p, NULL, fn, &z)) ||
        (router && (st = push_secondary(g, z, "mor1e_p", 2, sg, fn, &pid))) ||
        (st = push_secondary(g, z, "mor1e_gates", 2, sg, fn, &gid)))
        return st;
    g->nodes[z].co[0] = pid;
    g->nodes[z].co[1] = gid;

    atm_node_init(&p, &atm_op_mor1e_expand, ATMOE_DTYPE_F32, 2,
                  (size_t[2]){c->T, c->d_out});
    p.batch_dim = bdim;
    p.batch_factor = bfac;
    p.src[0] = x;
    p.src[1] = L->w0;
    p.src[2] = L->bias;
    p.src[3] = z;
    p.src[4] = L->b;
    p.nsrc = 5;
    ATM_NODE_PARAMS(linear_params, &p)->w0_dtype = w0_dtype;
    if ((st = atm_graph_push(g, &p, NULL, fn, y)))
        return st;

    atm_node_init(&p, &atm_op_mor1e_stats, ATMOE_DTYPE_F32, 1, se);
    p.src[0] = gid;
    p.src[1] = pid;
    p.nsrc = 2;
    if ((st = atm_graph_push(g, &p, NULL, fn, &load)) ||
        (router &&
         (st = push_secondary(g, load, "mor1e_importance", 1, se, fn, &imp))))
        return st;
    g->nodes[load].co[0] = imp;
    if (trace)
        *trace = (atmoe_mor1e_trace){pid, gid, load, imp};
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_mor1e_layer(atmoe_graph *g, atmoe_node x,
                                               const atmoe_mor1e_layer *layer,
                                               atmoe_node *y,
                                               atmoe_mor1e_trace *trace)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, layer);
    ATM_CHECK_NULL(g->ctx, y);
    layer_nodes c;
    atmoe_status st = check_layer(g, x, layer, &c);
    if (st != ATMOE_STATUS_OK)
        return st;
    /* A failure part way leaves no half-built layer behind. */
    size_t mark = g->count;
    atmoe_node out;
    atmoe_mor1e_trace t;
    if ((st = build_layer(g, x, layer, &c, &out, &t)) != ATMOE_STATUS_OK) {
        atm_graph_truncate(g, mark);
        return st;
    }
    *y = out;
    if (trace)
        *trace = t;
    return ATMOE_STATUS_OK;
}

/* ---------------------------------------------------------------- init */

/* splitmix64: the stream of a seed, the same on every platform. */
static uint64_t next_u64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static atmoe_status init_check(atmoe_context *ctx, const atmoe_tensor *t,
                               const char *what)
{
    if (t == NULL)
        return ATMOE_STATUS_OK;
    if (t->ctx != ctx)
        return atm_fail(ctx, ATMOE_STATUS_WRONG_CONTEXT,
                        "atmoe_mor1e_init: %s belongs to another context",
                        what);
    if (t->dtype != ATMOE_DTYPE_F32)
        return atm_fail(ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "atmoe_mor1e_init: %s must be f32; it is %s", what,
                        atmoe_dtype_name(t->dtype));
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_mor1e_init(atmoe_tensor *a, atmoe_tensor *b,
                                        atmoe_tensor *w_r,
                                        atmoe_tensor *w_om,
                                        atmoe_tensor *w_c, uint64_t seed)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, a);
    atmoe_context *ctx = a->ctx;
    atmoe_status st;
    if ((st = init_check(ctx, a, "a")) || (st = init_check(ctx, b, "b")) ||
        (st = init_check(ctx, w_r, "w_r")) ||
        (st = init_check(ctx, w_om, "w_om")) ||
        (st = init_check(ctx, w_c, "w_c")))
        return st;
    if (a->ndim != 2 || a->shape[0] == 0 || a->shape[1] == 0 ||
        !atm_tensor_is_contiguous(a)) {
        char buf[64];
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: a must be a dense [r1, d_in]; it is %s", fn,
                        atm_shape_string(a->ndim, a->shape, buf, sizeof buf));
    }
    size_t count = a->shape[0] * a->shape[1];
    float *host = atm_malloc(count * sizeof *host);
    if (host == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", fn);
    /* kaiming_uniform_(a = sqrt(5)): gain sqrt(2 / (1 + 5)), bound
     * gain sqrt(3 / fan_in) = 1 / sqrt(fan_in). */
    double bound = 1.0 / sqrt((double)a->shape[1]);
    uint64_t state = seed;
    for (size_t i = 0; i < count; i++) {
        double u = (double)(next_u64(&state) >> 11) * 0x1.0p-53;
        host[i] = (float)((2.0 * u - 1.0) * bound);
    }
    st = atmoe_tensor_write(a, host, count * sizeof *host);
    atm_free(host);
    atmoe_tensor *zero[4] = {b, w_r, w_om, w_c};
    for (int i = 0; i < 4 && st == ATMOE_STATUS_OK; i++)
        if (zero[i])
            st = atmoe_tensor_fill(zero[i], 0.0);
    return st;
}
