/* The backward of the rank-1 expert layer (mor1e.c), row by row: each of
 * the layer's nodes is a seam of reverse mode, so the engine chains them
 * and sums dx over the two paths from x (base and shrink).
 *
 * The forward, per token (cl/mor1e.cl):
 *
 *   u_all = x [A; W_r]^T = [u, l]        shrink
 *   p     = softmax(l),  om = sigmoid(100 w_om),  c = sigmoid(100 w_c)
 *   g0    = kr p + ks s,  kr = k_router om, ks = k_intuition (1 - om)
 *   top-k keeps the set K of the k largest g0; q = p / sum_K p
 *   g     = kr q + ks s on K, 0 elsewhere (no top-k: K all, q = p)
 *   z     = c M(g) u:  v1 z_e = g_e u_e;  v2 z_j = sum_i G[i, j] u_i
 *   y     = x W0^T + bias + z B^T         expand
 *
 * Expand: y is linear in each of x, W0, bias, z and B, so dz = dy B,
 * dB = dy^T z, dx = dy W0, dW0 = dy^T x, dbias = the column sums of dy:
 * graph matmul nodes (CLBlast), as the mixture's backward.
 *
 * Route: z is bilinear in (g, u) with factor c, so with m = M(g) u,
 * dc = dz . m, du = c M(g)^T dz and dg = c (dz u) over the mix's pairs
 * (v1 dg_e = c dz_e u_e, v2 dG[i, j] = c u_i dz_j).  The kept set is
 * piecewise constant in the inputs (no gradient flows through the
 * choice), and a dropped gate is the constant 0: only kept entries pass
 * dg on.  On K, g is linear in (kr, q, ks, s):
 *
 *   dkr = sum_K dg q,  dks = sum_K dg s,  ds = ks dg,  dq = kr dg;
 *   the renormalisation q = p / S, S = sum_K p, gives
 *     dp = (dq - sum_K dq q) / S = kr (dg - dkr) / S on K, 0 off it
 *   (no top-k: dp = dq); the softmax dl = p (.) (dp - sum p dp).
 *   om enters kr and ks: dom = k_router dkr - k_intuition dks, and
 *   dw_om = 100 om (1 - om) dom, dw_c = 100 c (1 - c) dc, summed over the
 *   tokens.
 *
 * One kernel (cl/mor1e_backward.cl) does all of the route's per-token
 * work, recomputing p and the top-k choice from u_all rather than reading
 * the forward's traces (a node reads at most six operands, and the
 * recomputation is the forward's own code, so it picks the same set),
 * and writes du and dl side by side as d_all = [du, dl] [T, r1 + E]: the
 * stacked shrink then makes d[A; W_r] = d_all^T x in one GEMM, and
 * dx = d_all [A; W_r] in another.  The token's shares of dw_om and dw_c
 * are summed by a second small kernel.  A score row shared by tokens
 * (one row for all, or a sample's row by gate_index) gets the sum of its
 * tokens' ds (a column sum, a scatter-add of rows).
 *
 * Not differentiated: the gate_index (integers) and the traces p and
 * gates when a loss reads them (ATMOE_STATUS_NOT_SUPPORTED). */
#include <config.h>

#include <stdio.h>
#include <string.h>

#include "graph/backward.h"
#include "moe/mixture.h"
#include "moe/mor1e.h"

/* The route backward's operands. */
enum { S_U, S_SCORES, S_INDEX, S_W_OM, S_W_C, S_DZ };

typedef struct route_bw_params {
    atm_mor1e_route rp;
    int want_ds;
} route_bw_params;

static const atm_op atm_op_mor1e_route_backward, atm_op_mor1e_gates_sum;

/* score_mode as cl/mor1e.cl reads it: 0 a row per token, 1 gate_index
 * names it, 2 one row for all. */
static int score_mode(const atmoe_graph *g, const atm_node *n)
{
    if (n->src[S_INDEX] != ATMOE_NODE_NONE)
        return 1;
    const atm_node *s = n->src[S_SCORES] != ATMOE_NODE_NONE
                            ? &g->nodes[n->src[S_SCORES]]
                            : NULL;
    return s && s->shape[0] == 1 && s->batch_dim < 0 ? 2 : 0;
}

static atmoe_status rbw_run(atmoe_graph *g, atm_node *n, cl_event *first,
                            cl_event *last)
{
    (void)last;
    const route_bw_params *bp = ATM_NODE_PARAMS(route_bw_params, n);
    const atm_mor1e_route *rp = &bp->rp;
    const atmoe_tensor *u = atm_src_rt(g, n, S_U);
    const atmoe_tensor *s = atm_src_rt(g, n, S_SCORES);
    const atmoe_tensor *index = atm_src_rt(g, n, S_INDEX);
    const atmoe_tensor *parts = &g->nodes[n->co[0]].rt;
    const atmoe_tensor *ds =
        n->co[1] != ATMOE_NODE_NONE ? &g->nodes[n->co[1]].rt : parts;
    size_t T = u->shape[0];
    /* Absent operands are bound to u: kernels need a valid cl_mem. */
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, parts);
    atm_arg_tensor(&a, ds);
    atm_arg_int(&a, n->co[1] != ATMOE_NODE_NONE);
    atm_arg_tensor(&a, u);
    atm_arg_ulong(&a, u->shape[1]);
    atm_arg_tensor(&a, atm_src_rt(g, n, S_DZ));
    atm_arg_tensor(&a, s ? s : u);
    atm_arg_ulong(&a, s ? s->shape[0] : 0);
    atm_arg_int(&a, score_mode(g, n));
    atm_arg_tensor(&a, index ? index : u);
    atm_arg_tensor(&a, atm_src_rt(g, n, S_W_OM));
    atm_arg_tensor(&a, atm_src_rt(g, n, S_W_C));
    atm_arg_int(&a, rp->has_router);
    atm_arg_int(&a, rp->has_scores);
    atm_arg_int(&a, rp->dense);
    atm_arg_float(&a, rp->k_router);
    atm_arg_float(&a, rp->k_intuition);
    atm_arg_ulong(&a, (cl_ulong)rp->top_k);
    atm_arg_ulong(&a, T);
    atm_arg_ulong(&a, rp->r1);
    atm_arg_ulong(&a, rp->r2);
    atm_arg_ulong(&a, rp->E);
    return atm_node_launch(g, n, &a, "mor1e_route_backward", T, first);
}

static void rbw_cost(const atmoe_graph *g, const atm_node *n,
                     uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    const atm_mor1e_route *rp = &ATM_NODE_PARAMS(route_bw_params, n)->rp;
    uint64_t T = g->nodes[n->src[S_U]].rt.shape[0];
    /* the softmax again, the gates (twice: the top-k's passes aside), the
     * mix's adjoint and the softmax's Jacobian (two passes) */
    *flops = T * rp->E * ((rp->has_router ? 3 + 12 : 0) + 6 + 10);
}

static const atm_op atm_op_mor1e_route_backward = {
    .name = "mor1e_route_backward",
    .program = "mor1e_backward",
    .kernel = "mor1e_route_backward",
    .run = rbw_run,
    .cost = rbw_cost,
};

static atmoe_status gsum_run(atmoe_graph *g, atm_node *n, cl_event *first,
                             cl_event *last)
{
    (void)last;
    const atmoe_tensor *parts = atm_src_rt(g, n, 0);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, &g->nodes[n->co[0]].rt);
    atm_arg_tensor(&a, parts);
    atm_arg_ulong(&a, parts->shape[0]);
    return atm_node_launch(g, n, &a, "mor1e_gates_sum", 2, first);
}

static void gsum_cost(const atmoe_graph *g, const atm_node *n,
                      uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    *flops = atm_tensor_count(atm_src_rt(g, n, 0));
}

static const atm_op atm_op_mor1e_gates_sum = {
    .name = "mor1e_gates_sum",
    .program = "mor1e_backward",
    .kernel = "mor1e_gates_sum",
    .run = gsum_run,
    .cost = gsum_cost,
};

/* ------------------------------------------------------------ building */

/* Pushes p as base/what, or under a default name when a node has that name
 * already (a second layer of the same name). */
static atmoe_status push(atmoe_graph *g, const atm_node *p, const char *base,
                         const char *what, atmoe_node *out)
{
    char name[ATM_NODE_NAME_SIZE];
    snprintf(name, sizeof name, "%.40s/%s", base, what);
    return atm_graph_push(g, p,
                          atm_graph_lookup(g, name) == ATMOE_NODE_NONE ? name
                                                                       : NULL,
                          ATM_BACKWARD_FN, out);
}

/* A secondary output of node src (shape[ndim]; batched as src when
 * batched). */
static atmoe_status push_secondary(atmoe_graph *g, atmoe_node src,
                                   const char *label, int ndim,
                                   const size_t *shape, int batched,
                                   const char *base, const char *what,
                                   atmoe_node *out)
{
    atm_node q = g->nodes[src];
    q.op = &atm_op_secondary;
    q.label = label;
    q.ndim = ndim;
    memcpy(q.shape, shape, (size_t)ndim * sizeof *shape);
    if (!batched)
        q.batch_dim = -1, q.batch_factor = 1;
    q.src[0] = src;
    for (int i = 1; i < ATM_MAX_SRC; i++)
        q.src[i] = ATMOE_NODE_NONE;
    q.nsrc = 1;
    q.co[0] = q.co[1] = ATMOE_NODE_NONE;
    memset(q.p.user, 0, sizeof q.p.user);
    return push(g, &q, base, what, out);
}

static atmoe_status matmul(atmoe_graph *g, atmoe_node a, atmoe_node b,
                           unsigned flags, const char *base,
                           const char *what, atmoe_node *out)
{
    atmoe_status st = atmoe_graph_matmul(g, a, b, ATMOE_NODE_NONE, flags, out);
    char name[ATM_NODE_NAME_SIZE];
    snprintf(name, sizeof name, "%.40s/%s", base, what);
    if (st == ATMOE_STATUS_OK && atm_graph_lookup(g, name) == ATMOE_NODE_NONE)
        st = atmoe_graph_set_name(g, *out, name);
    return st;
}

/* dL/d(result) must be f32 of the node's shape and batch. */
static atmoe_status check_grad(atmoe_graph *g, int node, int dy,
                               const char *what)
{
    const atm_node *n = &g->nodes[node], *d = &g->nodes[dy];
    if (d->dtype == ATMOE_DTYPE_F32 && d->ndim == n->ndim &&
        d->shape[0] == n->shape[0] && d->shape[1] == n->shape[1] &&
        d->batch_dim == n->batch_dim)
        return ATMOE_STATUS_OK;
    char b1[160], b2[160];
    return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                    "%s: dL/d%s must be f32 of the shape and batch of %s; "
                    "it is %s", ATM_BACKWARD_FN, what,
                    atm_node_desc(n, b1, sizeof b1),
                    atm_node_desc(d, b2, sizeof b2));
}

/* Runs build with grad_in cleared; all or nothing: a failure takes every
 * node this call added out again. */
typedef atmoe_status (*build_fn)(atmoe_graph *g, int node, const int *gout,
                                 const unsigned char *need, int *got);

static atmoe_status all_or_nothing(atmoe_graph *g, int node,
                                   const int *grad_out,
                                   const unsigned char *need, int *grad_in,
                                   build_fn build)
{
    int nsrc = g->nodes[node].nsrc;
    for (int i = 0; i < nsrc; i++)
        grad_in[i] = ATMOE_NODE_NONE;
    size_t mark = g->count;
    int got[ATM_MAX_SRC];
    for (int i = 0; i < ATM_MAX_SRC; i++)
        got[i] = ATMOE_NODE_NONE;
    atmoe_status st = build(g, node, grad_out, need, got);
    if (st != ATMOE_STATUS_OK) {
        atm_graph_truncate(g, mark);
        return st;
    }
    for (int i = 0; i < nsrc; i++)
        grad_in[i] = need[i] ? got[i] : ATMOE_NODE_NONE;
    return ATMOE_STATUS_OK;
}

/* ---------------------------------------------------------------- expand */

/* Operands x, W0, bias, z, B. */
static atmoe_status expand_build(atmoe_graph *g, int node, const int *gout,
                                 const unsigned char *need, int *got)
{
    const atm_node *n = &g->nodes[node];
    atmoe_node dy = gout[0], x = n->src[0], w0 = n->src[1],
               bias = n->src[2], z = n->src[3], b = n->src[4];
    size_t d_out = n->shape[1];
    char base[ATM_NODE_NAME_SIZE];
    snprintf(base, sizeof base, "%s", n->name);
    atmoe_status st;
    if ((st = check_grad(g, node, dy, "y")))
        return st;
    if (need[3] && (st = matmul(g, dy, b, 0, base, "dz", &got[3])))
        return st;
    if (need[4] && (st = matmul(g, dy, z, ATMOE_MATMUL_TRANSPOSE_A, base,
                                "dB", &got[4])))
        return st;
    if (need[0]) {
        /* f16 or bf16 storage of a frozen base: CLBlast reads f32. */
        atmoe_node w = w0;
        if (g->nodes[w0].dtype != ATMOE_DTYPE_F32 &&
            (st = atmoe_graph_cast(g, w0, ATMOE_DTYPE_F32, &w)))
            return st;
        if ((st = matmul(g, dy, w, 0, base, "dx_base", &got[0])))
            return st;
    }
    if (need[1] && (st = matmul(g, dy, x, ATMOE_MATMUL_TRANSPOSE_A, base,
                                "dW0", &got[1])))
        return st;
    if (need[2] && bias != ATMOE_NODE_NONE) {
        char name[ATM_NODE_NAME_SIZE];
        snprintf(name, sizeof name, "%.40s/dbias", base);
        if (atm_graph_lookup(g, name) != ATMOE_NODE_NONE)
            name[0] = '\0';
        if ((st = atm_graph_column_sum(g, dy, 1, &d_out, name[0] ? name : NULL,
                                       &got[2])))
            return st;
    }
    return ATMOE_STATUS_OK;
}

atmoe_status atm_mor1e_expand_backward(atmoe_graph *g, int node,
                                       const int *grad_out,
                                       const unsigned char *need,
                                       int *grad_in)
{
    if (grad_out[0] == ATMOE_NODE_NONE) {
        for (int i = 0; i < g->nodes[node].nsrc; i++)
            grad_in[i] = ATMOE_NODE_NONE;
        return ATMOE_STATUS_OK;
    }
    return all_or_nothing(g, node, grad_out, need, grad_in, expand_build);
}

/* ---------------------------------------------------------------- route */

/* Operands u_all, s, gate_index, w_om, w_c; co[0] p, co[1] gates. */
static atmoe_status route_build(atmoe_graph *g, int node, const int *gout,
                                const unsigned char *need, int *got)
{
    const atm_node *n = &g->nodes[node];
    /* A copy: pushes may move g->nodes. */
    const atm_mor1e_route rpv = *ATM_NODE_PARAMS(atm_mor1e_route, n),
                          *rp = &rpv;
    atmoe_node dz = gout[0];
    char base[ATM_NODE_NAME_SIZE];
    snprintf(base, sizeof base, "%s", n->name);
    atmoe_status st;
    if (gout[1] != ATMOE_NODE_NONE || gout[2] != ATMOE_NODE_NONE)
        return atm_fail(g->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                        "%s: the loss reads the %s trace of rank-1 layer "
                        "'%s'; gradients flow through its output y only",
                        ATM_BACKWARD_FN,
                        gout[1] != ATMOE_NODE_NONE ? "p" : "gates", base);
    if ((st = check_grad(g, node, dz, "z")))
        return st;
    int want_ds = need[S_SCORES] && rp->has_scores;
    int want_gates = need[S_W_OM] || need[S_W_C];
    if (!need[S_U] && !want_ds && !want_gates)
        return ATMOE_STATUS_OK;

    const atm_node *u = &g->nodes[n->src[S_U]];
    size_t T = u->shape[0];
    int batched = u->batch_dim >= 0;
    atm_node p;
    atm_grad_proto(g, &atm_op_mor1e_route_backward, n->src[S_U], &p);
    for (int i = 0; i < 5; i++)
        p.src[i] = n->src[i];
    p.src[S_DZ] = dz;
    p.nsrc = 6;
    route_bw_params *bp = ATM_NODE_PARAMS(route_bw_params, &p);
    bp->rp = *rp;
    bp->want_ds = want_ds;
    atmoe_node id, parts, ds = ATMOE_NODE_NONE;
    size_t sp[2] = {T, 2}, sd[2] = {T, rp->E};
    if ((st = push(g, &p, base, "d_all", &id)) ||
        (st = push_secondary(g, id, "mor1e_gate_parts", 2, sp, batched, base,
                             "gate_parts", &parts)) ||
        (want_ds && (st = push_secondary(g, id, "mor1e_ds", 2, sd, batched,
                                         base, "ds_tokens", &ds))))
        return st;
    g->nodes[id].co[0] = parts;
    g->nodes[id].co[1] = ds;
    got[S_U] = id;

    if (want_gates) {
        size_t one = 1;
        atm_node q;
        atm_node_init(&q, &atm_op_mor1e_gates_sum, ATMOE_DTYPE_F32, 1, &one);
        q.src[0] = parts;
        q.nsrc = 1;
        atmoe_node d_om, d_c;
        if ((st = push(g, &q, base, "dw_om", &d_om)) ||
            (st = push_secondary(g, d_om, "mor1e_dw_c", 1, &one, 0, base,
                                 "dw_c", &d_c)))
            return st;
        g->nodes[d_om].co[0] = d_c;
        got[S_W_OM] = d_om;
        got[S_W_C] = d_c;
    }

    if (want_ds) {
        n = &g->nodes[node];
        atmoe_node s = n->src[S_SCORES], index = n->src[S_INDEX];
        const atm_node *sn = &g->nodes[s];
        if (index != ATMOE_NODE_NONE) {
            /* A sample's row: the sum of its tokens'. */
            atmoe_node zero;
            if ((st = atm_grad_zeros(g, s, &zero)) ||
                (st = atmoe_graph_scatter_add_rows(g, zero, index, ds,
                                                   &got[S_SCORES])))
                return st;
        } else if (sn->shape[0] == 1 && sn->batch_dim < 0) {
            /* One row for all tokens. */
            char name[ATM_NODE_NAME_SIZE];
            size_t row[2] = {1, rp->E};
            snprintf(name, sizeof name, "%.40s/ds", base);
            if (atm_graph_lookup(g, name) != ATMOE_NODE_NONE)
                name[0] = '\0';
            if ((st = atm_graph_column_sum(g, ds, 2, row,
                                           name[0] ? name : NULL,
                                           &got[S_SCORES])))
                return st;
        } else {
            got[S_SCORES] = ds;
        }
    }
    return ATMOE_STATUS_OK;
}

atmoe_status atm_mor1e_route_backward(atmoe_graph *g, int node,
                                      const int *grad_out,
                                      const unsigned char *need,
                                      int *grad_in)
{
    return all_or_nothing(g, node, grad_out, need, grad_in, route_build);
}

/* ---------------------------------------------------------------- shrink */

/* Operands x, A, W_r (ATMOE_NODE_NONE with the router off). */
static atmoe_status shrink_build(atmoe_graph *g, int node, const int *gout,
                                 const unsigned char *need, int *got)
{
    const atm_node *n = &g->nodes[node];
    atmoe_node d_all = gout[0], x = n->src[0], a = n->src[1],
               w_r = n->src[2];
    char base[ATM_NODE_NAME_SIZE];
    snprintf(base, sizeof base, "%s", n->name);
    size_t r1 = g->nodes[a].shape[0], d_in = g->nodes[a].shape[1];
    size_t E = w_r != ATMOE_NODE_NONE ? g->nodes[w_r].shape[0] : 0;
    atmoe_status st;
    if ((st = check_grad(g, node, d_all, "u_all")))
        return st;
    int router = w_r != ATMOE_NODE_NONE;
    if (need[1] || (router && need[2])) {
        /* d[A; W_r] = d_all^T x: both weights in one GEMM. */
        atmoe_node dw;
        if ((st = matmul(g, d_all, x, ATMOE_MATMUL_TRANSPOSE_A, base,
                         router ? "dA_W_r" : "dA", &dw)))
            return st;
        if (!router) {
            got[1] = dw;
        } else {
            size_t top[2] = {0, 0}, at[2] = {r1, 0};
            if ((need[1] &&
                 (st = atmoe_graph_view(g, dw, top, (size_t[2]){r1, d_in},
                                        &got[1]))) ||
                (need[2] &&
                 (st = atmoe_graph_view(g, dw, at, (size_t[2]){E, d_in},
                                        &got[2]))))
                return st;
        }
    }
    if (need[0]) {
        /* dx = d_all [A; W_r]. */
        atmoe_node w = a;
        if (router && (st = atmoe_graph_concat(g, a, w_r, 0, &w)))
            return st;
        if ((st = matmul(g, d_all, w, 0, base, "dx_shrink", &got[0])))
            return st;
    }
    return ATMOE_STATUS_OK;
}

atmoe_status atm_mor1e_shrink_backward(atmoe_graph *g, int node,
                                       const int *grad_out,
                                       const unsigned char *need,
                                       int *grad_in)
{
    if (grad_out[0] == ATMOE_NODE_NONE) {
        for (int i = 0; i < g->nodes[node].nsrc; i++)
            grad_in[i] = ATMOE_NODE_NONE;
        return ATMOE_STATUS_OK;
    }
    return all_or_nothing(g, node, grad_out, need, grad_in, shrink_build);
}
