/* The backward of the grouped router (SPEC section 3; the forward is
 * cl/router.cl).
 *
 * Per row, the forward makes group logits lg = h W_G and, in the
 * projected form, within-group logits ld = h W_D.  Each level (the groups;
 * the experts of one group) turns its logits x into weights v in three
 * steps: a softmax over the active entries, top-k among the free ones, and
 * the fixed weights' override, where the free kept entries share
 * room = 1 - (sum of the kept fixed weights) in proportion to their
 * softmax weights.  Together, for a free kept entry,
 *
 *   v_k = room * exp(x_k / tau) / sum_{free kept i} exp(x_i / tau)
 *
 * (the softmax's own normaliser cancels: entries dropped by top-k or
 * masked do not enter it), and v is a constant for fixed, masked and
 * dropped entries (the choice of the kept set is piecewise constant: no
 * gradient flows through it).  The derivative of a softmax scaled by
 * room, with room = sum_{free} v_i, gives
 *
 *   dL/dx_k = v_k / tau * (g_k - sum_{free} g_i v_i / sum_{free} v_i)
 *
 * for free entries (dropped and masked ones have v_k = 0 and get 0), and
 * no gradient to fixed ones.  The renormalisation after top-k is what the
 * subtracted mean accounts for.
 *
 * The final weights w[e] = a[g] d[g,m] give g_a[g] += dw[e] d[g,m] and
 * g_d[g,m] += dw[e] a[g], added to dL/da and dL/dd when those outputs are
 * read.  d of a dropped group is reported as 0, a constant: its entries
 * have v = 0 and pass nothing on.  In the scaled form the within-group
 * logits are L[g,m] = a[g] V_D[g,m] with the FINAL a, so
 * dV_D[g,m] = sum_rows a[g] dL/dL[g,m] and a[g] gets sum_m dL/dL[g,m]
 * V_D[g,m] before the group level's step.  Then, over the rows,
 *
 *   dW_G = h^T dlg,  dW_D = h^T dld (projected),
 *   dh   = dlg W_G^T (+ dld W_D^T, projected).
 *
 * The per-row work (both levels) is one kernel, cl/router_backward.cl,
 * reading the forward's a and d; the products with h and the weights are
 * graph matmul nodes (CLBlast), and dV_D a column sum. */
#include <config.h>

#include <stdio.h>
#include <string.h>

#include "moe/mixture.h"
#include "moe/router.h"

/* Operands of the node. */
enum { S_A, S_D, S_DW, S_DA, S_DD, S_VD };

/* The node computing dlg [rows, G] (its result) and dld [rows, G*M]
 * (co[0]; in the scaled form a[g] dL/dL[g,m]). */
typedef struct router_bw_params {
    atmoe_router *router; /* a reference */
} router_bw_params;

static atmoe_status rbw_prepare(atmoe_graph *g, atm_node *n)
{
    const atmoe_router *r = ATM_NODE_PARAMS(router_bw_params, n)->router;
    return atm_node_kernel(g, n, 0, "router_backward", r->options,
                           "router_backward");
}

/* An optional operand as a tensor and its flag; absent ones are bound to
 * a (a kernel needs a valid cl_mem). */
static void optional(atm_args *args, const atmoe_graph *g, const atm_node *n,
                     int i)
{
    const atmoe_tensor *t = atm_src_rt(g, n, i);
    atm_arg_tensor(args, t ? t : atm_src_rt(g, n, S_A));
    atm_arg_int(args, t != NULL);
}

static atmoe_status rbw_run(atmoe_graph *g, atm_node *n, cl_event *first,
                            cl_event *last)
{
    (void)last;
    atmoe_router *r = ATM_NODE_PARAMS(router_bw_params, n)->router;
    atmoe_status st = atm_router_upload(r);
    if (st != ATMOE_STATUS_OK)
        return st;
    const atmoe_tensor *a = atm_src_rt(g, n, S_A);
    const atmoe_tensor *vd = atm_src_rt(g, n, S_VD);
    size_t rows = a->shape[0];
    atm_args args = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&args, a);
    atm_arg_tensor(&args, atm_src_rt(g, n, S_D));
    optional(&args, g, n, S_DW);
    optional(&args, g, n, S_DA);
    optional(&args, g, n, S_DD);
    atm_arg_tensor(&args, vd ? vd : a);
    atm_arg_buffer(&args, r->dev[0]->buffer); /* counts */
    atm_arg_buffer(&args, r->dev[3]->buffer); /* group_fixed */
    atm_arg_buffer(&args, r->dev[4]->buffer); /* expert_fixed */
    atm_arg_buffer(&args, r->dev[5]->buffer); /* slot_of_expert */
    atm_arg_int(&args,
                (cl_int)(r->set->count - (size_t)r->set->has_general));
    atm_arg_float(&args, r->tau_g);
    atm_arg_float(&args, r->tau_d);
    atm_arg_ulong(&args, rows);
    atm_arg_tensor(&args, &n->rt);
    atm_arg_tensor(&args, &g->nodes[n->co[0]].rt);
    return atm_node_launch(g, n, &args, "router_backward", rows, first);
}

static void rbw_cost(const atmoe_graph *g, const atm_node *n,
                     uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    const atmoe_router *r = ATM_NODE_PARAMS(router_bw_params, n)->router;
    uint64_t rows = atm_src_rt(g, n, S_A)->shape[0];
    uint64_t G = r->set->groups, M = r->set->max_group;
    *flops = rows * (8 * G * M + 6 * G);
}

static void rbw_release(atm_node *n)
{
    atmoe_router_free(ATM_NODE_PARAMS(router_bw_params, n)->router);
}

static const atm_op atm_op_router_backward = {
    .name = "router_backward",
    .prepare = rbw_prepare,
    .run = rbw_run,
    .cost = rbw_cost,
    .release = rbw_release,
};

/* ------------------------------------------------------------ building */

/* Names a node base/what unless a node has that name (a second backward
 * pass), which keeps the default. */
static atmoe_status name_node(atmoe_graph *g, atmoe_node id, const char *base,
                              const char *what)
{
    char name[ATM_NODE_NAME_SIZE];
    snprintf(name, sizeof name, "%.40s/%s", base, what);
    if (atm_graph_lookup(g, name) != ATMOE_NODE_NONE)
        return ATMOE_STATUS_OK;
    return atmoe_graph_set_name(g, id, name);
}

static atmoe_status add_core(atmoe_graph *g, int node, const int *grad_out,
                             atmoe_node *dlg, atmoe_node *dld)
{
    const atm_node *n = &g->nodes[node];
    atmoe_router *r = ATM_NODE_PARAMS(router_params, n)->router;
    size_t G = r->set->groups, M = r->set->max_group;
    size_t rows = n->shape[0];
    size_t shape_g[2] = {rows, G}, shape_d[2] = {rows, G * M};
    atm_node p;
    atm_node_init(&p, &atm_op_router_backward, ATMOE_DTYPE_F32, 2, shape_g);
    p.batch_dim = n->batch_dim;
    p.batch_factor = n->batch_factor;
    p.src[S_A] = n->co[0];
    p.src[S_D] = n->co[1];
    p.src[S_DW] = grad_out[0];
    p.src[S_DA] = grad_out[1];
    p.src[S_DD] = grad_out[2];
    p.src[S_VD] = r->form == ATMOE_ROUTER_SCALED ? n->src[2] : ATMOE_NODE_NONE;
    p.nsrc = 6;
    ATM_NODE_PARAMS(router_bw_params, &p)->router = r;
    char base[ATM_NODE_NAME_SIZE];
    snprintf(base, sizeof base, "%s", n->name);
    atmoe_node id, co;
    atmoe_status st = atm_graph_push(g, &p, NULL, "router backward", &id);
    if (st != ATMOE_STATUS_OK)
        return st;
    atm_router_retain(r); /* the node's release drops it */
    atm_node q = p;
    q.op = &atm_op_secondary;
    q.label = "router_within_logits_grad";
    for (int i = 0; i < ATM_MAX_SRC; i++)
        q.src[i] = ATMOE_NODE_NONE;
    q.src[0] = id;
    q.nsrc = 1;
    memset(q.p.user, 0, sizeof q.p.user);
    memcpy(q.shape, shape_d, sizeof shape_d);
    if ((st = atm_graph_push(g, &q, NULL, "router backward", &co)) ||
        (st = name_node(g, id, base, "dlogits_groups")) ||
        (st = name_node(g, co, base, "dlogits_within")))
        return st;
    g->nodes[id].co[0] = co;
    *dlg = id;
    *dld = co;
    return ATMOE_STATUS_OK;
}

static atmoe_status matmul(atmoe_graph *g, atmoe_node a, atmoe_node b,
                           unsigned flags, const char *base,
                           const char *what, atmoe_node *out)
{
    atmoe_status st = atmoe_graph_matmul(g, a, b, ATMOE_NODE_NONE, flags, out);
    return st != ATMOE_STATUS_OK ? st : name_node(g, *out, base, what);
}

static atmoe_status build(atmoe_graph *g, int node, const int *grad_out,
                          const unsigned char *need, int *grad_in)
{
    const atm_node *n = &g->nodes[node];
    const atmoe_router *r = ATM_NODE_PARAMS(router_params, n)->router;
    int projected = r->form == ATMOE_ROUTER_PROJECTED;
    size_t G = r->set->groups, M = r->set->max_group;
    atmoe_node h = n->src[0], wg = n->src[1], wd = n->src[2];
    char base[ATM_NODE_NAME_SIZE];
    snprintf(base, sizeof base, "%s", n->name);
    atmoe_node dlg, dld, t, u;
    atmoe_status st = add_core(g, node, grad_out, &dlg, &dld);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (need[0]) {
        if ((st = matmul(g, dlg, wg, ATMOE_MATMUL_TRANSPOSE_B, base,
                         "dh_groups", &t)))
            return st;
        if (projected &&
            ((st = matmul(g, dld, wd, ATMOE_MATMUL_TRANSPOSE_B, base,
                          "dh_within", &u)) ||
             (st = atmoe_graph_add(g, t, u, &t))))
            return st;
        grad_in[0] = t;
    }
    if (need[1]) {
        if ((st = matmul(g, h, dlg, ATMOE_MATMUL_TRANSPOSE_A, base, "dW_G",
                         &t)))
            return st;
        grad_in[1] = t;
    }
    if (need[2]) {
        if (projected)
            st = matmul(g, h, dld, ATMOE_MATMUL_TRANSPOSE_A, base, "dW_D", &t);
        else {
            size_t shape[2] = {G, M};
            char name[ATM_NODE_NAME_SIZE];
            snprintf(name, sizeof name, "%.40s/dV_D", base);
            st = atm_graph_column_sum(g, dld, 2, shape, name, &t);
        }
        if (st != ATMOE_STATUS_OK)
            return st;
        grad_in[2] = t;
    }
    return ATMOE_STATUS_OK;
}

/* Checks that upstream gradient i has the shape and batch of the output
 * it belongs to. */
static atmoe_status check_grad(const atmoe_graph *g, int of, int grad,
                               const char *what)
{
    if (grad == ATMOE_NODE_NONE)
        return ATMOE_STATUS_OK;
    const atm_node *o = &g->nodes[of], *d = &g->nodes[grad];
    if (d->dtype == ATMOE_DTYPE_F32 && d->ndim == 2 &&
        d->shape[0] == o->shape[0] && d->shape[1] == o->shape[1] &&
        d->batch_dim == o->batch_dim)
        return ATMOE_STATUS_OK;
    char b1[160], b2[160];
    return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                    "router backward: dL/d%s must be f32 of the shape and "
                    "batch of %s; it is %s", what,
                    atm_node_desc(o, b1, sizeof b1),
                    atm_node_desc(d, b2, sizeof b2));
}

atmoe_status atm_router_backward(atmoe_graph *g, int node,
                                 const int *grad_out,
                                 const unsigned char *need, int *grad_in)
{
    const atm_node *n = &g->nodes[node];
    for (int i = 0; i < n->nsrc; i++)
        grad_in[i] = ATMOE_NODE_NONE;
    if (grad_out[0] == ATMOE_NODE_NONE && grad_out[1] == ATMOE_NODE_NONE &&
        grad_out[2] == ATMOE_NODE_NONE)
        return ATMOE_STATUS_OK; /* no output of the router is read */
    if (!need[0] && !need[1] && !need[2])
        return ATMOE_STATUS_OK;
    atmoe_status st;
    if ((st = check_grad(g, node, grad_out[0], "w")) ||
        (st = check_grad(g, n->co[0], grad_out[1], "a")) ||
        (st = check_grad(g, n->co[1], grad_out[2], "d")))
        return st;
    /* All or nothing: a failure takes this call's nodes out again. */
    size_t mark = g->count;
    int got[ATM_MAX_SRC];
    for (int i = 0; i < ATM_MAX_SRC; i++)
        got[i] = ATMOE_NODE_NONE;
    st = build(g, node, grad_out, need, got);
    if (st != ATMOE_STATUS_OK) {
        atm_graph_truncate(g, mark);
        return st;
    }
    for (int i = 0; i < 3; i++)
        grad_in[i] = need[i] ? got[i] : ATMOE_NODE_NONE;
    return ATMOE_STATUS_OK;
}
