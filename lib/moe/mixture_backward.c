/* The backward of the fused mixture, fused like its forward.
 *
 * The forward (mixture.c) is y = x W0^T + bias + c B_all z, with
 * u = x A_all^T [T, R] and z = M(gates) u [T, Z] (Z = R, or r2 for the
 * dense mix).  With dy = dL/dy given:
 *
 *   dz = c dy B_all                (y is linear in z with factor c B_all)
 *   du = M(gates)^T dz             (z is linear in u: block and diagonal
 *                                  scale each channel by scale * gate, so
 *                                  du_r = dz_r scale_r gate_r; dense
 *                                  z = G^T u, so du = G dz)
 *   dB_all^T = c z^T dy = (c z)^T dy       [Z, d_out], B as the set stores
 *   dA_all   = du^T x                       [R, d_in]
 *   dx       = dy W0 + du A_all     (both paths from x: base and shrink)
 *   dW0      = dy^T x,  dbias = sum over tokens of dy
 *   dgates   z is linear in each gate: block, gate e of token t multiplies
 *            the channels of expert e, so dg[e] = sum_{r in e} dz_r u_r
 *            scale_r (the general LoRA has gate 1 and no column); diagonal
 *            dg[r] = dz_r u_r scale_r; dense dG[i, j] = u_i dz_j.  A gate
 *            row serves every token that reads it, so its gradient is the
 *            sum over those tokens (all of them for a single row, a
 *            sequence's for per-sequence rows).  Tokens whose gate_index
 *            is out of range read no row and give none.
 *   gate_index is an integer and c a float parameter: no gradient.
 *
 * The exact same formulas hold whatever path the forward took (merged,
 * CLBlast or ours): merging only reassociates the products.  u and dz,
 * the rank-R intermediates, live in the scratch of one node, which runs
 * the two GEMMs that make them and the mix's adjoint (du, c z) and
 * d(gates) kernels; the products with the large matrices (dA_all, dB_all,
 * dx, dW0) are graph matmul nodes, so every GEMM of the backward runs
 * through CLBlast whatever the forward route, over all experts at once,
 * never one per expert. */
#include <config.h>

#include <stdio.h>
#include <string.h>

#include "device/blas.h"
#include "device/params.h"
#include "graph/trainable.h"
#include "moe/linear.h"
#include "moe/mixture.h"

/* The node computing du [T, R] (its result), c z [T, Z] (co[0]) and
 * d(gates) (co[1], when wanted). */
typedef struct mixture_bw_params {
    atmoe_experts *experts; /* a reference */
    atmoe_mix mix;
    float c;
    /* u and dz through cl/linear.cl (as the forward's shrink) for batches
     * up to linear_upto, with c = 1 (the kernel has no factor on its
     * product; CLBlast's GEMM takes c otherwise); the blocks in force for
     * A's storage type and for f32 (B^T). */
    size_t linear_upto;
    atm_linear_tune lin[2];
} mixture_bw_params;

/* Operands of the node. */
enum { S_X, S_GATES, S_INDEX, S_DY };
/* Kernel slots: the mix's adjoint and the gates' gradient, then
 * cl/linear.cl's for u and for dz, three each (batches of 1, 2, 3+). */
enum { K_ADJOINT, K_GATES, K_U1, K_DZ1 = K_U1 + ATM_LINEAR_SLOTS };

static const atm_op atm_op_mixture_backward, atm_op_column_sum;
static atmoe_status push(atmoe_graph *g, const atm_node *p, const char *name,
                         atmoe_node *out);

static size_t z_width(const atmoe_experts *set)
{
    return set->dense_r2 ? set->dense_r2 : set->total_rank;
}

static const char *adjoint_name(atmoe_mix mix)
{
    switch (mix) {
    case ATMOE_MIX_BLOCK: return "adjoint_block";
    case ATMOE_MIX_DIAGONAL: return "adjoint_diagonal";
    case ATMOE_MIX_DENSE: break;
    }
    return "adjoint_dense";
}

static atmoe_status bw_prepare(atmoe_graph *g, atm_node *n)
{
    mixture_bw_params *bp = ATM_NODE_PARAMS(mixture_bw_params, n);
    const atmoe_experts *set = bp->experts;
    atmoe_status st = atm_node_kernel(g, n, K_ADJOINT, "mixture_backward",
                                      NULL, adjoint_name(bp->mix));
    if (st == ATMOE_STATUS_OK && n->co[1] != ATMOE_NODE_NONE)
        st = atm_node_kernel(g, n, K_GATES, "mixture_backward", NULL,
                             "gates_grad");
    /* The forward's route rule (mixture.c): CLBlast's GEMMs of these
     * skinny products ([T, d] x [d, R]) run at a third of cl/linear.cl's
     * rate on PoCL (atmoe-bench's train-step). */
    long upto = atm_param_get(g->ctx, ATM_PARAM_LINEAR_MAX_TOKENS);
    int at = atm_weight_type(set->a_dtype);
    bp->linear_upto = upto >= 1 && bp->c == 1.0f && at >= 0 ? (size_t)upto
                                                             : 0;
    atm_linear_tune_get(g->ctx, set->a_dtype, &bp->lin[0]);
    atm_linear_tune_get(g->ctx, ATMOE_DTYPE_F32, &bp->lin[1]);
    size_t T = g->nodes[n->src[S_X]].shape[0];
    if (st == ATMOE_STATUS_OK)
        st = atm_linear_kernels(g, n, K_U1, T, bp->linear_upto, at, 0,
                                &bp->lin[0]);
    if (st == ATMOE_STATUS_OK)
        st = atm_linear_kernels(g, n, K_DZ1, T, bp->linear_upto, 0, 0,
                                &bp->lin[1]);
    return st;
}

/* u [T, R] then dz [T, Z], f32, in the node's scratch. */
static size_t bw_scratch(const atmoe_graph *g, const atm_node *n)
{
    const atmoe_experts *set =
        ATM_NODE_PARAMS(mixture_bw_params, n)->experts;
    size_t T = g->nodes[n->src[S_X]].shape[0];
    return T * (set->total_rank + z_width(set)) * sizeof(float);
}

/* u = x A_all^T and dz = c dy B_all (B_all^T is the set's bt). */
static atm_gemm bw_gemm(const atmoe_graph *g, const atm_node *n, int which)
{
    const mixture_bw_params *bp = ATM_NODE_PARAMS(mixture_bw_params, n);
    const atmoe_experts *set = bp->experts;
    const atmoe_tensor *x = atm_src_rt(g, n, S_X), *dy = atm_src_rt(g, n, S_DY);
    size_t T = x->shape[0], R = set->total_rank, Z = z_width(set);
    size_t u_off = n->work_offset / sizeof(float), dz_off = u_off + T * R;
    if (which == 0)
        return (atm_gemm){0, 1, T, R, set->d_in, 1.0f, 0.0f, x->buffer,
                          set->a->buffer, g->arena, x->offset, set->d_in,
                          set->a->offset, set->d_in, u_off, R};
    return (atm_gemm){0, 1, T, Z, set->d_out, bp->c, 0.0f, dy->buffer,
                      set->bt->buffer, g->arena, dy->offset, set->d_out,
                      set->bt->offset, set->d_out, dz_off, Z};
}

static size_t bw_gemm_scratch(atmoe_graph *g, const atm_node *n)
{
    size_t need = 0;
    for (int i = 0; i < 2; i++) {
        atm_gemm p = bw_gemm(g, n, i);
        size_t bytes = atm_graph_sgemm_scratch(g, &p);
        if (bytes > need)
            need = bytes;
    }
    return need;
}

/* has_index as cl/mixture.cl reads it: 0 a row per token, 1 by
 * gate_index, 2 one row for all. */
static int index_mode(const atmoe_graph *g, const atm_node *n)
{
    const atm_node *gates = &g->nodes[n->src[S_GATES]];
    if (n->src[S_INDEX] != ATMOE_NODE_NONE)
        return 1;
    return gates->shape[0] == 1 && gates->batch_dim < 0 ? 2 : 0;
}

static atmoe_status bw_run(atmoe_graph *g, atm_node *n, cl_event *first,
                           cl_event *last)
{
    const mixture_bw_params *bp = ATM_NODE_PARAMS(mixture_bw_params, n);
    const atmoe_experts *set = bp->experts;
    const atmoe_tensor *gates = atm_src_rt(g, n, S_GATES);
    const atmoe_tensor *index = atm_src_rt(g, n, S_INDEX);
    size_t T = atm_src_rt(g, n, S_X)->shape[0];
    size_t R = set->total_rank, Z = z_width(set);
    size_t u_off = n->work_offset / sizeof(float), dz_off = u_off + T * R;
    int mode = index_mode(g, n);
    /* The dense mix's width argument is r2; the others' the gates'. */
    size_t width = set->dense_r2 ? set->dense_r2 : gates->shape[1];
    const atmoe_tensor *cz = &g->nodes[n->co[0]].rt;
    atmoe_status st;
    if (T <= bp->linear_upto) {
        /* u = x A_all^T and dz = dy (B_all^T)^T (c = 1), as the forward's
         * shrink. */
        const atmoe_tensor *x = atm_src_rt(g, n, S_X);
        const atmoe_tensor *dy = atm_src_rt(g, n, S_DY);
        atm_linear_call cu = {g->arena, set->a->buffer, NULL, u_off,
                              set->a->offset, 0, x, NULL, NULL,
                              R, set->d_in, 0, 0.0f};
        atm_linear_call cd = {g->arena, set->bt->buffer, NULL, dz_off,
                              set->bt->offset, 0, dy, NULL, NULL,
                              Z, set->d_out, 0, 0.0f};
        if ((st = atm_linear_run(g, n, T, K_U1, &bp->lin[0], &cu, first)) ||
            (st = atm_linear_run(g, n, T, K_DZ1, &bp->lin[1], &cd, NULL)))
            return st;
    } else {
        atm_gemm shrink = bw_gemm(g, n, 0), back = bw_gemm(g, n, 1);
        if ((st = atm_graph_sgemm(g, &shrink, first)) ||
            (st = atm_graph_sgemm(g, &back, NULL)))
            return st;
    }

    atm_args a = {n->kernel[K_ADJOINT], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, cz);
    atm_arg_buffer(&a, g->arena);
    atm_arg_ulong(&a, u_off);
    atm_arg_buffer(&a, g->arena);
    atm_arg_ulong(&a, dz_off);
    atm_arg_tensor(&a, gates);
    atm_arg_ulong(&a, width);
    atm_arg_tensor(&a, index ? index : gates); /* a placeholder */
    atm_arg_int(&a, mode);
    atm_arg_buffer(&a, set->chan_expert->buffer);
    atm_arg_buffer(&a, set->chan_scale->buffer);
    atm_arg_ulong(&a, T);
    atm_arg_ulong(&a, R);
    atm_arg_ulong(&a, gates->shape[0]);
    atm_arg_float(&a, bp->c);
    size_t span = R > Z ? R : Z;
    int with_gates = n->co[1] != ATMOE_NODE_NONE;
    if ((st = atm_node_launch(g, n, &a, adjoint_name(bp->mix), T * span,
                              with_gates ? NULL : last)) ||
        !with_gates)
        return st;

    const atmoe_tensor *dg = &g->nodes[n->co[1]].rt;
    atm_args k = {n->kernel[K_GATES], 0, CL_SUCCESS};
    atm_arg_tensor(&k, dg);
    atm_arg_buffer(&k, g->arena);
    atm_arg_ulong(&k, u_off);
    atm_arg_buffer(&k, g->arena);
    atm_arg_ulong(&k, dz_off);
    atm_arg_ulong(&k, gates->shape[1]);
    atm_arg_tensor(&k, index ? index : gates);
    atm_arg_int(&k, mode);
    atm_arg_int(&k, bp->mix == ATMOE_MIX_BLOCK      ? 0
                    : bp->mix == ATMOE_MIX_DIAGONAL ? 1
                                                    : 2);
    atm_arg_buffer(&k, set->chan_expert->buffer);
    atm_arg_buffer(&k, set->chan_scale->buffer);
    atm_arg_ulong(&k, T);
    atm_arg_ulong(&k, R);
    atm_arg_ulong(&k, Z);
    atm_arg_ulong(&k, gates->shape[0]);
    return atm_node_launch(g, n, &k, "gates_grad", atm_tensor_count(gates),
                           last);
}

static void bw_cost(const atmoe_graph *g, const atm_node *n, uint64_t *bytes,
                    uint64_t *flops)
{
    (void)bytes;
    const atmoe_experts *set =
        ATM_NODE_PARAMS(mixture_bw_params, n)->experts;
    uint64_t T = g->nodes[n->src[S_X]].rt.shape[0];
    uint64_t R = set->total_rank, Z = z_width(set);
    *flops = 2 * T * (R * set->d_in + Z * set->d_out) +
             (set->dense_r2 ? 6 * T * R * Z : 4 * T * R);
}

static void bw_release(atm_node *n)
{
    atmoe_experts_free(ATM_NODE_PARAMS(mixture_bw_params, n)->experts);
}

static const atm_op atm_op_mixture_backward = {
    .name = "mixture_backward",
    .flags = ATM_OPF_MARKER,
    .prepare = bw_prepare,
    .scratch = bw_scratch,
    .gemm_scratch = bw_gemm_scratch,
    .run = bw_run,
    .cost = bw_cost,
    .release = bw_release,
};

/* out [cols] = the column sums of x [rows, cols] (the bias's gradient). */
static atmoe_status column_sum_run(atmoe_graph *g, atm_node *n,
                                   cl_event *first, cl_event *last)
{
    (void)last;
    const atmoe_tensor *x = atm_src_rt(g, n, 0);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, x);
    atm_arg_ulong(&a, x->shape[0]);
    atm_arg_ulong(&a, x->shape[1]);
    return atm_node_launch(g, n, &a, "column_sum", x->shape[1], first);
}

static void column_sum_cost(const atmoe_graph *g, const atm_node *n,
                            uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    *flops = atm_tensor_count(atm_src_rt(g, n, 0));
}

static const atm_op atm_op_column_sum = {
    .name = "column_sum",
    .program = "mixture_backward",
    .kernel = "column_sum",
    .run = column_sum_run,
    .cost = column_sum_cost,
};

/* ------------------------------------------------------------ building */

atmoe_status atm_graph_column_sum(atmoe_graph *g, atmoe_node x, int ndim,
                                  const size_t *shape, const char *name,
                                  atmoe_node *out)
{
    atm_node p;
    atm_node_init(&p, &atm_op_column_sum, ATMOE_DTYPE_F32, ndim, shape);
    p.src[0] = x;
    p.nsrc = 1;
    return push(g, &p, name, out);
}

/* Pushes p as name, or under a default name when a node has it already
 * (a second backward pass over the same graph). */
static atmoe_status push(atmoe_graph *g, const atm_node *p, const char *name,
                         atmoe_node *out)
{
    if (name && atm_graph_lookup(g, name) != ATMOE_NODE_NONE)
        name = NULL;
    return atm_graph_push(g, p, name, "mixture backward", out);
}

/* The node of du, c z and d(gates) (when with_gates). */
static atmoe_status add_core(atmoe_graph *g, int node, atmoe_node dy,
                             int with_gates, atmoe_node *du, atmoe_node *cz,
                             atmoe_node *dgates)
{
    const atm_node *n = &g->nodes[node];
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    atmoe_experts *set = mp->experts;
    const atm_node *x = &g->nodes[n->src[0]];
    const atm_node *gates = &g->nodes[n->src[3]];
    size_t T = x->shape[0];
    size_t shape_u[2] = {T, set->total_rank}, shape_z[2] = {T, z_width(set)};
    char name[ATM_NODE_NAME_SIZE];
    atm_node p;
    atm_node_init(&p, &atm_op_mixture_backward, ATMOE_DTYPE_F32, 2, shape_u);
    p.batch_dim = x->batch_dim;
    p.batch_factor = x->batch_factor;
    p.src[S_X] = n->src[0];
    p.src[S_GATES] = n->src[3];
    p.src[S_INDEX] = n->src[4];
    p.src[S_DY] = dy;
    p.nsrc = 4;
    mixture_bw_params *bp = ATM_NODE_PARAMS(mixture_bw_params, &p);
    bp->experts = set;
    bp->mix = mp->mix;
    bp->c = mp->c;
    atm_node q = p;
    atmoe_node id, zid, gid = ATMOE_NODE_NONE;
    snprintf(name, sizeof name, "%.40s/du", n->name);
    atmoe_status st = push(g, &p, name, &id);
    if (st != ATMOE_STATUS_OK)
        return st;
    /* Pushed: the node holds a reference from here on (its release drops
     * it if the backward is truncated away). */
    atm_experts_retain(set);
    q.op = &atm_op_secondary;
    q.label = "mixture_cz";
    q.src[0] = id;
    q.src[1] = q.src[2] = q.src[3] = ATMOE_NODE_NONE;
    q.nsrc = 1;
    memset(q.p.user, 0, sizeof q.p.user);
    memcpy(q.shape, shape_z, sizeof shape_z);
    snprintf(name, sizeof name, "%.40s/cz", g->nodes[node].name);
    if ((st = push(g, &q, name, &zid)) != ATMOE_STATUS_OK)
        return st;
    if (with_gates) {
        gates = &g->nodes[g->nodes[node].src[3]];
        q.label = "mixture_dgates";
        q.ndim = gates->ndim;
        memcpy(q.shape, gates->shape, sizeof q.shape);
        q.batch_dim = gates->batch_dim;
        q.batch_factor = gates->batch_factor;
        snprintf(name, sizeof name, "%.40s/dgates", g->nodes[node].name);
        if ((st = push(g, &q, name, &gid)) != ATMOE_STATUS_OK)
            return st;
    }
    g->nodes[id].co[0] = zid;
    g->nodes[id].co[1] = gid;
    *du = id;
    *cz = zid;
    *dgates = gid;
    return ATMOE_STATUS_OK;
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

/* Registers the trainable A or B_T of every expert whose flags ask for
 * `flag`, gradients in rows of grad (dA_all [R, d_in] or
 * dB_all^T [Z, d_out]). */
static atmoe_status register_experts(atmoe_graph *g, int node,
                                     unsigned flag, atmoe_node grad)
{
    const atm_node *n = &g->nodes[node];
    const atmoe_experts *set = ATM_NODE_PARAMS(mixture_params, n)->experts;
    int is_a = flag == ATMOE_TRAIN_A;
    size_t cols = is_a ? set->d_in : set->d_out;
    const atmoe_tensor *store = is_a ? set->a : set->bt;
    size_t E = set->count - (size_t)set->has_general;
    for (size_t i = 0; i < set->count; i++) {
        const atm_expert *e = &set->experts[i];
        if (!(e->train & flag))
            continue;
        atm_trainable t;
        memset(&t, 0, sizeof t);
        char who[32];
        if (set->dense_r2)
            snprintf(who, sizeof who, "dense");
        else if (i == E && set->has_general)
            snprintf(who, sizeof who, "general");
        else
            snprintf(who, sizeof who, "expert%zu", i);
        int len = snprintf(t.name, sizeof t.name, "%s/%s/%s", n->name, who,
                           is_a ? "A" : "B_T");
        if (len < 0 || (size_t)len >= sizeof t.name)
            return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                            "mixture backward: the name of '%s''s trainable "
                            "%s is longer than %d characters", n->name, who,
                            ATM_TRAINABLE_NAME_SIZE - 1);
        /* The dense set's up vectors are r2 rows, not the rank's. */
        size_t rows = !is_a && set->dense_r2 ? set->dense_r2 : e->rank;
        t.buffer = store->buffer;
        t.offset = store->offset + e->offset * cols;
        t.ndim = 2;
        t.shape[0] = rows;
        t.shape[1] = cols;
        t.count = rows * cols;
        t.grad = grad;
        t.grad_offset = e->offset * cols;
        atmoe_status st =
            atm_graph_add_trainable(g, &t, "mixture backward");
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    return ATMOE_STATUS_OK;
}

static atmoe_status build(atmoe_graph *g, int node, atmoe_node dy,
                          const unsigned char *need, int *grad_in)
{
    const atm_node *n = &g->nodes[node];
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    atmoe_experts *set = mp->experts;
    char base[ATM_NODE_NAME_SIZE];
    snprintf(base, sizeof base, "%s", n->name);
    atmoe_node x = n->src[0], w0 = n->src[1], bias = n->src[2];
    atmoe_dtype w0_dtype = mp->w0_dtype;
    int train_a = 0, train_b = 0;
    for (size_t i = 0; i < set->count; i++) {
        train_a |= !!(set->experts[i].train & ATMOE_TRAIN_A);
        train_b |= !!(set->experts[i].train & ATMOE_TRAIN_B);
    }
    int want_dx = need[0], want_dgates = need[3];
    /* The rank-R products of the backward run through CLBlast over the
     * set's stored A and B^T, in f32 only (atmoe_experts_set_dtype). */
    if ((train_a || train_b || want_dx || want_dgates) &&
        (set->a_dtype != ATMOE_DTYPE_F32 || set->b_dtype != ATMOE_DTYPE_F32))
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "mixture backward '%s': the experts are stored as "
                        "%s (A) and %s (B); gradients through them need f32 "
                        "storage (atmoe_experts_set_dtype)", base,
                        atmoe_dtype_name(set->a_dtype),
                        atmoe_dtype_name(set->b_dtype));
    atmoe_status st;
    atmoe_node du = ATMOE_NODE_NONE, cz = ATMOE_NODE_NONE,
               dg = ATMOE_NODE_NONE, t;

    /* The rank-R work only when something reads it: a set with nothing
     * trainable, no dx and no d(gates) wanted runs none. */
    if (train_a || train_b || want_dx || want_dgates) {
        if ((st = add_core(g, node, dy, want_dgates, &du, &cz, &dg)))
            return st;
    }
    if (train_a) {
        if ((st = matmul(g, du, x, ATMOE_MATMUL_TRANSPOSE_A, base, "dA_all",
                         &t)) ||
            (st = register_experts(g, node, ATMOE_TRAIN_A, t)))
            return st;
    }
    if (train_b) {
        if ((st = matmul(g, cz, dy, ATMOE_MATMUL_TRANSPOSE_A, base,
                         "dB_all_T", &t)) ||
            (st = register_experts(g, node, ATMOE_TRAIN_B, t)))
            return st;
    }
    if (want_dx) {
        /* dx = dy W0 + du A_all; A_all enters the graph as a parameter
         * over the set's storage (a view: no copy). */
        atmoe_node w = w0, a_all, base_part, lora_part;
        if (w0_dtype != ATMOE_DTYPE_F32 &&
            (st = atmoe_graph_cast(g, w0, ATMOE_DTYPE_F32, &w)))
            return st;
        if ((st = matmul(g, dy, w, 0, base, "dx_base", &base_part)) ||
            (st = atmoe_graph_parameter(g, NULL, set->a, &a_all)) ||
            (st = matmul(g, du, a_all, 0, base, "dx_lora", &lora_part)) ||
            (st = atmoe_graph_add(g, base_part, lora_part, &t)))
            return st;
        grad_in[0] = t;
    }
    if (need[1]) {
        if ((st = matmul(g, dy, x, ATMOE_MATMUL_TRANSPOSE_A, base, "dW0",
                         &t)))
            return st;
        grad_in[1] = t;
    }
    if (need[2] && bias != ATMOE_NODE_NONE) {
        size_t d_out = set->d_out;
        char name[ATM_NODE_NAME_SIZE];
        snprintf(name, sizeof name, "%.40s/dbias", base);
        if ((st = atm_graph_column_sum(g, dy, 1, &d_out, name, &t)))
            return st;
        grad_in[2] = t;
    }
    if (want_dgates)
        grad_in[3] = dg;
    return ATMOE_STATUS_OK;
}

atmoe_status atm_mixture_backward(atmoe_graph *g, int node,
                                  const int *grad_out,
                                  const unsigned char *need, int *grad_in)
{
    const atm_node *n = &g->nodes[node];
    int nsrc = n->nsrc;
    for (int i = 0; i < nsrc; i++)
        grad_in[i] = ATMOE_NODE_NONE;
    atmoe_node dy = grad_out[0];
    if (dy == ATMOE_NODE_NONE)
        return ATMOE_STATUS_OK; /* nothing downstream reads y */
    const atm_node *dn = &g->nodes[dy];
    if (dn->dtype != ATMOE_DTYPE_F32 || dn->ndim != 2 ||
        dn->shape[0] != n->shape[0] || dn->shape[1] != n->shape[1] ||
        dn->batch_dim != n->batch_dim) {
        char b1[160], b2[160];
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "mixture backward: dL/dy must be f32 of the shape "
                        "and batch of %s; it is %s",
                        atm_node_desc(n, b1, sizeof b1),
                        atm_node_desc(dn, b2, sizeof b2));
    }
    /* All or nothing: a failure takes every node (and registry entry)
     * this call added out again. */
    size_t mark = g->count;
    int got[ATM_MAX_SRC];
    for (int i = 0; i < ATM_MAX_SRC; i++)
        got[i] = ATMOE_NODE_NONE;
    atmoe_status st = build(g, node, dy, need, got);
    if (st != ATMOE_STATUS_OK) {
        atm_graph_truncate(g, mark);
        return st;
    }
    for (int i = 0; i < nsrc; i++)
        grad_in[i] = need[i] ? got[i] : ATMOE_NODE_NONE;
    return ATMOE_STATUS_OK;
}
