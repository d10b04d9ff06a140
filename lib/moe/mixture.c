/* The fused mixture node: y = x W0^T (+ bias) + c * B_all M(gates) A_all x
 * (SPEC section 2), as three launches of ours (shrink, mix, then base and
 * expand in one pass over W0 and B_all), or through CLBlast's GEMMs past a
 * tuned batch, or merged into W' = W0 + c B_all M A_all when one gate row
 * serves every token and that costs less.  Which of them a batch takes is
 * decided when the graph is planned. */
#include <config.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "device/blas.h"
#include "device/tuning.h"
#include "graph/graph.h"
#include "moe/experts.h"
#include "moe/mixture.h"
#include "moe/linear.h"


/* Kernel slots: the linear route's (moe/linear.h: 1, 2 and 3+ tokens,
 * then the tile) over the experts' A (the shrink), over W0 (the base and
 * expand), and over the merged W' in f32 when A is stored in half
 * precision (else the shrink's serve), the mix, the fold of the merge
 * path, the f32 copy, and the copies of W0 and of A into f32 (for CLBlast
 * and the merge path, when they are stored in half precision). */
enum {
    K_SHRINK1,
    K_BASE1 = K_SHRINK1 + ATM_LINEAR_SLOTS,
    K_MIX = K_BASE1 + ATM_LINEAR_SLOTS, K_FOLD, K_COPY, K_W0_F32,
    K_MERGED1,
    K_A_F32 = K_MERGED1 + ATM_LINEAR_SLOTS,
    /* The fused variant's, for 1, 2 and 3+ tokens (fused_slot). */
    K_FUSED1, K_FUSED2, K_FUSED3
};

/* The fused variant's rows of registers (those of cl/linear_gpu.cl's
 * default GROUP_ROWS). */
#define FUSED_GR 4

static int fused_slot(size_t T)
{
    return K_FUSED1 + (T == 1 ? 0 : T == 2 ? 1 : 2);
}

static const char *mix_name(atmoe_mix mix)
{
    switch (mix) {
    case ATMOE_MIX_BLOCK: return "mix_block";
    case ATMOE_MIX_DIAGONAL: return "mix_diagonal";
    case ATMOE_MIX_DENSE: break;
    }
    return "mix_dense";
}

/* The blocks' index of the product whose kernels start at slot first. */
static int block_of(int first)
{
    return first == K_SHRINK1 ? 0 : first == K_BASE1 ? 1 : 2;
}

/* Whether every token uses the same (single) gate row. */
static int mergeable(const atmoe_graph *g, const atm_node *n)
{
    const atm_node *gates = &g->nodes[n->src[3]];
    return n->src[4] == ATMOE_NODE_NONE && gates->shape[0] == 1 &&
           gates->batch_dim < 0;
}

static size_t z_width(const atmoe_experts *set)
{
    return set->dense_r2 ? set->dense_r2 : set->total_rank;
}

/* The smallest batch that runs merged (SIZE_MAX: none).  Merging pays when
 * T (R d_in + Z d_out) > (Z + 1) d_in d_out: folding the experts into W'
 * costs (Z + 1) d_in d_out, and saves the shrink and expand of T tokens
 * (see atmoe_graph_mixture_set_merge). */
static size_t merge_from(const atmoe_graph *g, const atm_node *n)
{
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    if (!mergeable(g, n) || mp->merge == ATMOE_MERGE_NEVER)
        return SIZE_MAX;
    if (mp->merge == ATMOE_MERGE_ALWAYS)
        return 1;
    const atmoe_experts *set = mp->experts;
    double din = (double)set->d_in, dout = (double)set->d_out;
    double R = (double)set->total_rank, Z = (double)z_width(set);
    double t = (Z + 1.0) * din * dout / (R * din + Z * dout);
    return t >= (double)(SIZE_MAX / 2) ? SIZE_MAX : (size_t)floor(t) + 1;
}

ATMOE_API atmoe_status atmoe_graph_mixture(atmoe_graph *g, atmoe_node x,
                                           atmoe_node w0, atmoe_node bias,
                                           atmoe_experts *set, atmoe_mix mix,
                                           atmoe_node gates,
                                           atmoe_node gate_index, float c,
                                           atmoe_node *y)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, set);
    ATM_CHECK_NULL(g->ctx, y);
    if (set->ctx != g->ctx)
        return atm_fail(g->ctx, ATMOE_STATUS_WRONG_CONTEXT,
                        "%s: the expert set belongs to another context", fn);
    if (mix != ATMOE_MIX_BLOCK && mix != ATMOE_MIX_DIAGONAL &&
        mix != ATMOE_MIX_DENSE)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: mix %d is not an atmoe_mix", fn, (int)mix);
    if ((mix == ATMOE_MIX_DENSE) != (set->dense_r2 != 0))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the dense mix takes a dense set "
                        "(atmoe_experts_set_dense), and a dense set only the "
                        "dense mix", fn);
    const atm_node *xn, *wn, *gn, *bn = NULL, *in = NULL;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, x, fn, "x", &xn)) ||
        (st = atm_graph_get_node(g, w0, fn, "w0", &wn)) ||
        (st = atm_graph_get_node(g, gates, fn, "gates", &gn)) ||
        (bias != ATMOE_NODE_NONE &&
         (st = atm_graph_get_node(g, bias, fn, "bias", &bn))) ||
        (gate_index != ATMOE_NODE_NONE &&
         (st = atm_graph_get_node(g, gate_index, fn, "gate_index", &in))))
        return st;

    char b1[160], b2[160];
    size_t d_in = set->d_in, d_out = set->d_out;
    size_t E = set->count - (size_t)set->has_general;
    size_t width = mix == ATMOE_MIX_BLOCK      ? E
                   : mix == ATMOE_MIX_DIAGONAL ? set->total_rank
                                               : set->total_rank * set->dense_r2;
    if (xn->dtype != ATMOE_DTYPE_F32 || gn->dtype != ATMOE_DTYPE_F32 ||
        (bn && bn->dtype != ATMOE_DTYPE_F32))
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: x, bias and gates must be f32", fn);
    if (atm_base_weight_type(wn->dtype) < 0)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: w0 must be f32, f16, bf16 or q8; it is %s", fn,
                        atm_node_desc(wn, b1, sizeof b1));
    if (xn->ndim != 2 || xn->shape[1] != d_in || xn->batch_dim > 0)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: x must be [T, %zu] (d_in of the expert set); it "
                        "is %s", fn, d_in, atm_node_desc(xn, b1, sizeof b1));
    if (wn->ndim != 2 || wn->shape[0] != d_out || wn->shape[1] != d_in ||
        wn->batch_dim >= 0)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: w0 must be [%zu, %zu] (d_out, d_in of the expert "
                        "set); it is %s", fn, d_out, d_in,
                        atm_node_desc(wn, b1, sizeof b1));
    if (bn && (bn->ndim != 1 || bn->shape[0] != d_out || bn->batch_dim >= 0))
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: bias must be [%zu]; it is %s", fn, d_out,
                        atm_node_desc(bn, b1, sizeof b1));
    if (gn->ndim != 2 || gn->shape[1] != width)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: gates must be [rows, %zu] (%s); it is %s", fn,
                        width,
                        mix == ATMOE_MIX_BLOCK      ? "one per expert"
                        : mix == ATMOE_MIX_DIAGONAL ? "one per rank channel"
                                                    : "r1 x r2 per row",
                        atm_node_desc(gn, b1, sizeof b1));
    int broadcast = in == NULL && gn->shape[0] == 1 && gn->batch_dim < 0;
    if (in && in->dtype != ATMOE_DTYPE_I32)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: gate_index must be i32; it is %s", fn,
                        atm_node_desc(in, b1, sizeof b1));
    if (!isfinite(c))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: c is %g", fn, c);
    if (in) {
        if (in->ndim != 1 ||
            in->shape[0] != xn->shape[0] || in->batch_dim != xn->batch_dim)
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: gate_index must be i32 [%zu], batched like "
                            "x %s; it is %s", fn, xn->shape[0],
                            atm_node_desc(xn, b1, sizeof b1),
                            atm_node_desc(in, b2, sizeof b2));
    } else if (!broadcast && (gn->shape[0] != xn->shape[0] ||
                              gn->batch_dim != xn->batch_dim)) {
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: without gate_index, gates need one row per token "
                        "of x %s, or a single row; they are %s", fn,
                        atm_node_desc(xn, b1, sizeof b1),
                        atm_node_desc(gn, b2, sizeof b2));
    }

    size_t shape[2] = {xn->shape[0], d_out};
    atm_node p;
    atm_node_init(&p, &atm_op_mixture, ATMOE_DTYPE_F32, 2, shape);
    p.batch_dim = xn->batch_dim;
    p.batch_factor = xn->batch_factor;
    p.src[0] = x;
    p.src[1] = w0;
    p.src[2] = bias;
    p.src[3] = gates;
    p.src[4] = gate_index;
    p.nsrc = 5;
    mixture_params *mp = ATM_NODE_PARAMS(mixture_params, &p);
    mp->experts = set;
    mp->mix = mix;
    mp->c = c;
    mp->merge = ATMOE_MERGE_AUTO;
    mp->w0_dtype = wn->dtype;
    /* Without it, a loss whose only trainable weights are the experts'
     * would find nothing trainable upstream of it. */
    p.trains_outside = atm_experts_trains(set);
    /* Sealed only once the node is known to be right: a refused call
     * leaves the set open. */
    if ((st = atm_experts_seal(set)) != ATMOE_STATUS_OK)
        return st;
    atmoe_node id;
    if ((st = atm_graph_push(g, &p, NULL, fn, &id)) != ATMOE_STATUS_OK)
        return st;
    atm_experts_retain(set);
    *y = id;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_mixture_set_merge(atmoe_graph *g,
                                                     atmoe_node mixture,
                                                     atmoe_merge mode)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, g);
    atmoe_status st = atm_graph_check_node(g, mixture, fn, "mixture");
    if (st != ATMOE_STATUS_OK)
        return st;
    atm_node *n = &g->nodes[mixture];
    if (n->op != &atm_op_mixture)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: node '%s' is a %s, not a mixture", fn, n->name,
                        atm_node_op_name(n));
    if (mode != ATMOE_MERGE_AUTO && mode != ATMOE_MERGE_NEVER &&
        mode != ATMOE_MERGE_ALWAYS)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: mode %d is not an atmoe_merge", fn, (int)mode);
    if (mode == ATMOE_MERGE_ALWAYS && !mergeable(g, n))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: '%s' has gates per token or per sequence; only "
                        "a single gate row can be merged", fn, n->name);
    mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    if (mp->merge != mode) {
        atm_graph_unplan(g);
        mp->merge = mode;
    }
    return ATMOE_STATUS_OK;
}

/* ---------------------------------------------------------------- plan */

/* The linear route's kernels for every batch up to T into the slots of
 * first (K_SHRINK1, K_BASE1 or K_MERGED1), its W and B read as storage
 * types wt and bt, with the parameters of that product. */
static atmoe_status linear_kernels(atmoe_graph *g, atm_node *n, int first,
                                   size_t T, int wt, int bt)
{
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    int k = block_of(first);
    return atm_linear_kernels(g, n, first, T, mp->linear_upto, wt, bt,
                              &mp->lin[k]);
}

/* The mix kernel's work-items in force (kernels.mixture.VW and TPI): VW
 * rounded down to a vector width OpenCL has (1, 2, 4, 8, 16); the dense
 * mix keeps an output an item. */
static void mix_shape(const atmoe_context *ctx, mixture_params *mp)
{
    long vw = atm_param_get(ctx, ATM_PARAM_MIXTURE_VW);
    mp->mix_vw = 1;
    while (mp->mix_vw * 2 <= (unsigned long)vw && mp->mix_vw < 16)
        mp->mix_vw *= 2;
    mp->mix_tpi = (unsigned)atm_param_get(ctx, ATM_PARAM_MIXTURE_TPI);
    if (mp->mix == ATMOE_MIX_DENSE)
        mp->mix_vw = mp->mix_tpi = 1;
}

/* The fused variant's shape in force for a graph planned at T tokens
 * (mp->fused_upto 0: the variant is off, or out of its limits): batches up
 * to kernels.mixture.FUSED_MAX_TOKENS of the linear route, W0 not in
 * 8-bit blocks (cl/mixture.cl reads f32, f16 and bf16), u and z of that
 * many tokens within half the local memory with the partial sums of a
 * group (FUSED_GS rounded down to a power of two the device allows,
 * halved until they fit); each group at least R rows of y, so that the
 * shrink it repeats reads no more of A_all than the group reads of W0. */
static void fused_shape(const atmoe_context *ctx, size_t T,
                        mixture_params *mp)
{
    const atmoe_device_info *dev = &ctx->device->info;
    const atmoe_experts *set = mp->experts;
    mp->fused_upto = 0;
    if (atm_param_get(ctx, ATM_PARAM_MIXTURE_VARIANT) != 1 ||
        mp->w0_dtype == ATMOE_DTYPE_Q8)
        return;
    size_t upto =
        (size_t)atm_param_get(ctx, ATM_PARAM_MIXTURE_FUSED_MAX_TOKENS);
    if (upto > mp->linear_upto)
        upto = mp->linear_upto;
    if (upto > T)
        upto = T;
    uint64_t half = dev->local_mem_bytes / 2;
    uint64_t uz = (uint64_t)upto * (set->total_rank + z_width(set)) *
                  sizeof(float);
    long want = atm_param_get(ctx, ATM_PARAM_MIXTURE_FUSED_GS);
    size_t gs = 1;
    while (gs * 2 <= (size_t)want && gs * 2 <= dev->max_work_group_size)
        gs *= 2;
    while (gs > 1 && uz + (uint64_t)FUSED_GR * 4 * gs * sizeof(float) > half)
        gs /= 2;
    if (upto == 0 || uz + (uint64_t)FUSED_GR * 4 * gs * sizeof(float) > half)
        return;
    size_t rows = (size_t)atm_param_get(ctx, ATM_PARAM_MIXTURE_FUSED_ROWS);
    if (rows < set->total_rank)
        rows = set->total_rank;
    mp->fused_rows = (rows + FUSED_GR - 1) / FUSED_GR * FUSED_GR;
    mp->fused_gs = (unsigned)gs;
    mp->fused_upto = upto;
}

/* The fused kernel for batches of b tokens (a tile of 1, 2 or 4) into
 * its slot; a driver that runs fewer items a group of it than planned
 * leaves the fused variant off (the three launches serve). */
static atmoe_status fused_kernel(atmoe_graph *g, atm_node *n, size_t b)
{
    mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    const atmoe_experts *set = mp->experts;
    char options[128];
    snprintf(options, sizeof options,
             "-DFUSED -DGS=%u -DGR=%d -DTB=%zu -DMIX=%d -DAT=%d -DWT=%d "
             "-DBT=%d",
             mp->fused_gs, FUSED_GR, b <= 2 ? b : (size_t)4,
             mp->mix == ATMOE_MIX_BLOCK      ? 0
             : mp->mix == ATMOE_MIX_DIAGONAL ? 1
                                             : 2,
             atm_weight_type(set->a_dtype), atm_weight_type(mp->w0_dtype),
             atm_weight_type(set->b_dtype));
    int slot = fused_slot(b);
    atmoe_status st =
        atm_node_kernel(g, n, slot, "mixture", options, "mixture_fused");
    if (st != ATMOE_STATUS_OK)
        return st;
    size_t most = 0;
    cl_int err = clGetKernelWorkGroupInfo(n->kernel[slot], g->ctx->device->id,
                                          CL_KERNEL_WORK_GROUP_SIZE,
                                          sizeof most, &most, NULL);
    if (err == CL_SUCCESS && most < mp->fused_gs)
        mp->fused_upto = 0;
    return ATMOE_STATUS_OK;
}

/* The routes and the kernels every batch up to the planned one may use. */
static atmoe_status mixture_prepare(atmoe_graph *g, atm_node *n)
{
    mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    size_t T = g->nodes[n->src[0]].shape[0];
    long upto = atm_param_get(g->ctx, ATM_PARAM_LINEAR_MAX_TOKENS);
    const atmoe_dtype read[3] = {mp->experts->a_dtype, mp->w0_dtype,
                                 ATMOE_DTYPE_F32};
    for (int i = 0; i < 3; i++)
        atm_linear_tune_get(g->ctx, read[i], &mp->lin[i]);
    mp->linear_upto = upto >= 1 ? (size_t)upto : 0;
    /* cl/linear.cl reads the set's second copy of B, which the optimiser
     * does not update (experts.h): while a B trains, the linear route
     * refreshes it from B^T before each run (sync_b; training keeps B in
     * f32), with the f32 copy kernel prepared below for any f32 B, so
     * that a B made trainable after planning is refreshed too.  CLBlast's
     * route would cost four times the linear one on PoCL (atmoe-bench's
     * train-step). */
    if (atm_experts_trains_b(mp->experts) &&
        mp->experts->b_dtype != ATMOE_DTYPE_F32)
        mp->linear_upto = 0;
    mp->merge_from = merge_from(g, n);

    const atmoe_experts *set = mp->experts;
    int at = atm_weight_type(set->a_dtype);
    mix_shape(g->ctx, mp);
    char mix_options[32];
    snprintf(mix_options, sizeof mix_options, "-DVW=%u -DTPI=%u", mp->mix_vw,
             mp->mix_tpi);
    atmoe_status st = atm_node_kernel(g, n, K_MIX, "mixture", mix_options,
                                      mix_name(mp->mix));
    /* The shrink reads A_all, the base W0 and B_all, each as stored. */
    if (st == ATMOE_STATUS_OK)
        st = linear_kernels(g, n, K_SHRINK1, T, at, 0);
    if (st == ATMOE_STATUS_OK)
        st = linear_kernels(g, n, K_BASE1, T,
                            atm_base_weight_type(mp->w0_dtype),
                            atm_weight_type(set->b_dtype));
    if (st == ATMOE_STATUS_OK && at != 0 && mp->merge_from <= T)
        st = linear_kernels(g, n, K_MERGED1, T, 0, 0);
    if (st == ATMOE_STATUS_OK && mp->w0_dtype != ATMOE_DTYPE_F32 &&
        (mp->merge_from <= T || T > mp->linear_upto))
        st = atm_copy_kernel(g->ctx, ATMOE_DTYPE_F32, mp->w0_dtype,
                             &n->kernel[K_W0_F32]);
    if (st == ATMOE_STATUS_OK && at != 0 && T > mp->linear_upto)
        st = atm_copy_kernel(g->ctx, ATMOE_DTYPE_F32, set->a_dtype,
                             &n->kernel[K_A_F32]);
    if (st == ATMOE_STATUS_OK && mp->merge_from <= T) {
        /* The fold reads A_all as stored too. */
        char options[16];
        snprintf(options, sizeof options, "-DAT=%d", at);
        st = atm_node_kernel(g, n, K_FOLD, "mixture", options, "fold_gates");
    }
    fused_shape(g->ctx, T, mp);
    for (size_t b = 1; b <= 3 && b <= mp->fused_upto && st == ATMOE_STATUS_OK;
         b++)
        st = fused_kernel(g, n, b);
    if (st == ATMOE_STATUS_OK &&
        (n->src[2] != ATMOE_NODE_NONE || mp->merge_from <= T ||
         (mp->linear_upto > 0 && set->b_dtype == ATMOE_DTYPE_F32)))
        st = atm_copy_kernel(g->ctx, ATMOE_DTYPE_F32, ATMOE_DTYPE_F32,
                             &n->kernel[K_COPY]);
    return st;
}

/* Scratch while the node runs: u [T, R] and z [T, Z] unmerged (then the
 * f32 copies of W0 and of A_all that CLBlast reads when they are stored
 * in half precision); the folded experts [Z, d_in] and W' [d_out, d_in]
 * merged. */
static size_t mixture_scratch(const atmoe_graph *g, const atm_node *n)
{
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    const atmoe_experts *set = mp->experts;
    size_t T = g->nodes[n->src[0]].shape[0];
    size_t unmerged = T * (set->total_rank + z_width(set));
    /* CLBlast reads W0 in f32: a half-precision W0 is converted after u
     * and z for batches that take it. */
    if (mp->w0_dtype != ATMOE_DTYPE_F32 && T > mp->linear_upto)
        unmerged += set->d_out * set->d_in;
    if (set->a_dtype != ATMOE_DTYPE_F32 && T > mp->linear_upto)
        unmerged += set->total_rank * set->d_in;
    size_t merged = 0;
    if (mp->merge_from <= T)
        merged = (z_width(set) + set->d_out) * set->d_in;
    return (unmerged > merged ? unmerged : merged) * sizeof(float);
}

/* ---------------------------------------------------------------- GEMMs */

/* The GEMMs of the CLBlast and merged routes at the runtime shapes, shared
 * by the runs and by the plan's question of their scratch.  B_all is kept
 * transposed [Z, d_out], the folded experts and W' in the node's scratch
 * (see run_merged). */
enum { G_BASE, G_SHRINK, G_EXPAND, G_MERGE, G_FINAL, G_COUNT };

static atm_gemm mixture_gemm(const atmoe_graph *g, const atm_node *n,
                             int which)
{
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    const atmoe_experts *set = mp->experts;
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *w0 = atm_src_rt(g, n, 1);
    const atmoe_tensor *y = &n->rt;
    size_t T = x->shape[0], d_in = set->d_in, d_out = set->d_out;
    size_t R = set->total_rank, Z = z_width(set);
    size_t u_off = n->work_offset / sizeof(float), z_off = u_off + T * R;
    size_t fold_off = u_off, w_off = fold_off + Z * d_in;
    /* The f32 copies of W0 and A_all after u and z, when CLBlast needs
     * them (see mixture_scratch). */
    size_t w0_off = z_off + T * Z;
    size_t a_off =
        w0_off + (mp->w0_dtype != ATMOE_DTYPE_F32 ? d_out * d_in : 0);
    float beta = n->src[2] != ATMOE_NODE_NONE ? 1.0f : 0.0f;
    atm_gemm p;
    switch (which) {
    case G_BASE: /* y (+)= x W0^T; W0 in f32, or its f32 copy */
        if (mp->w0_dtype == ATMOE_DTYPE_F32)
            p = (atm_gemm){0, 1, T, d_out, d_in, 1.0f, beta, x->buffer,
                           w0->buffer, y->buffer, x->offset, d_in,
                           w0->offset, d_in, y->offset, d_out};
        else
            p = (atm_gemm){0, 1, T, d_out, d_in, 1.0f, beta, x->buffer,
                           g->arena, y->buffer, x->offset, d_in, w0_off,
                           d_in, y->offset, d_out};
        break;
    case G_SHRINK: /* u = x A_all^T; A_all in f32, or its f32 copy */
        if (set->a_dtype == ATMOE_DTYPE_F32)
            p = (atm_gemm){0, 1, T, R, d_in, 1.0f, 0.0f, x->buffer,
                           set->a->buffer, g->arena, x->offset, d_in,
                           set->a->offset, d_in, u_off, R};
        else
            p = (atm_gemm){0, 1, T, R, d_in, 1.0f, 0.0f, x->buffer,
                           g->arena, g->arena, x->offset, d_in, a_off, d_in,
                           u_off, R};
        break;
    case G_EXPAND: /* y += c z B_all^T */
        p = (atm_gemm){0, 0, T, d_out, Z, mp->c, 1.0f, g->arena,
                       set->bt->buffer, y->buffer, z_off, Z,
                       set->bt->offset, d_out, y->offset, d_out};
        break;
    case G_MERGE: /* W' += c B_all (M A_all), W' a copy of W0 */
        p = (atm_gemm){1, 0, d_out, d_in, Z, mp->c, 1.0f, set->bt->buffer,
                       g->arena, g->arena, set->bt->offset, d_out, fold_off,
                       d_in, w_off, d_in};
        break;
    default: /* G_FINAL: y (+)= x W'^T */
        p = (atm_gemm){0, 1, T, d_out, d_in, 1.0f, beta, x->buffer,
                       g->arena, y->buffer, x->offset, d_in, w_off, d_in,
                       y->offset, d_out};
        break;
    }
    return p;
}

static size_t mixture_gemm_scratch(atmoe_graph *g, const atm_node *n)
{
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    size_t T = g->nodes[n->src[0]].rt.shape[0], need = 0;
    int uses[G_COUNT] = {0};
    uses[G_BASE] = uses[G_SHRINK] = uses[G_EXPAND] = T > mp->linear_upto;
    uses[G_MERGE] = mp->merge_from <= T;
    uses[G_FINAL] = uses[G_MERGE] && T > mp->linear_upto;
    for (int i = 0; i < G_COUNT; i++) {
        if (!uses[i])
            continue;
        atm_gemm p = mixture_gemm(g, n, i);
        size_t bytes = atm_graph_sgemm_scratch(g, &p);
        if (bytes > need)
            need = bytes;
    }
    return need;
}

/* ---------------------------------------------------------------- runs */

/* One product of cl/linear.cl with the kernels of linear_kernel(first). */
static atmoe_status linear(atmoe_graph *g, const atm_node *n, size_t T,
                           int first, const atm_linear_call *c, cl_event *ev)
{
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    int k = block_of(first);
    return atm_linear_run(g, n, T, first, &mp->lin[k], c, ev);
}

/* z = M(gates) u for T tokens, u and z in the node's scratch. */
static atmoe_status mix(atmoe_graph *g, const atm_node *n, size_t T,
                        size_t u_off, size_t z_off)
{
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    const atmoe_experts *set = mp->experts;
    const atmoe_tensor *gates = atm_src_rt(g, n, 3);
    const atmoe_tensor *index = atm_src_rt(g, n, 4);
    /* The dense mix's width argument is r2; the others' the gates'.  The
     * index buffer is a placeholder when there is no gate_index. */
    atm_args args = {n->kernel[K_MIX], 0, CL_SUCCESS};
    atm_arg_buffer(&args, g->arena);
    atm_arg_ulong(&args, z_off);
    atm_arg_buffer(&args, g->arena);
    atm_arg_ulong(&args, u_off);
    atm_arg_tensor(&args, gates);
    atm_arg_ulong(&args, set->dense_r2 ? set->dense_r2 : gates->shape[1]);
    atm_arg_tensor(&args, index ? index : gates);
    atm_arg_int(&args, index ? 1 : mergeable(g, n) ? 2 : 0);
    atm_arg_buffer(&args, set->chan_expert->buffer);
    atm_arg_buffer(&args, set->chan_scale->buffer);
    atm_arg_ulong(&args, T);
    atm_arg_ulong(&args, set->total_rank);
    atm_arg_ulong(&args, gates->shape[0]);
    /* The block and diagonal mixes' items each cover mix_vw channels of
     * mix_tpi tokens (the dense mix 1 x 1: an output an item). */
    size_t chunks = (z_width(set) + mp->mix_vw - 1) / mp->mix_vw;
    size_t items = (T + mp->mix_tpi - 1) / mp->mix_tpi * chunks;
    return atm_node_launch_local(g, n, &args, mix_name(mp->mix), items,
                                 atm_param_work_group(g->ctx,
                                                      ATM_PARAM_MIXTURE_WG),
                                 NULL);
}

/* y = bias; y += x W'^T with W' = W0 + c B_all M A_all made in scratch. */
static atmoe_status run_merged(atmoe_graph *g, atm_node *n, cl_event *first,
                               cl_event *last)
{
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    const atmoe_experts *set = mp->experts;
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *w0 = atm_src_rt(g, n, 1);
    const atmoe_tensor *bias = atm_src_rt(g, n, 2);
    const atmoe_tensor *gates = atm_src_rt(g, n, 3);
    atmoe_tensor *y = &n->rt;
    size_t T = x->shape[0], d_in = set->d_in, d_out = set->d_out;
    size_t R = set->total_rank, Z = z_width(set);
    atmoe_status st;

    /* Folded experts M A_all [Z, d_in], then W' [d_out, d_in] after them. */
    size_t fold_off = n->work_offset / sizeof(float);
    atmoe_tensor w = *w0;
    w.dtype = ATMOE_DTYPE_F32; /* W' (the copy kernels read the type) */
    w.buffer = g->arena;
    w.offset = fold_off + Z * d_in;
    atm_args args = {n->kernel[K_FOLD], 0, CL_SUCCESS};
    atm_arg_buffer(&args, g->arena);
    atm_arg_ulong(&args, fold_off);
    atm_arg_buffer(&args, set->a->buffer);
    atm_arg_tensor(&args, gates);
    atm_arg_int(&args, mp->mix == ATMOE_MIX_BLOCK      ? 0
                       : mp->mix == ATMOE_MIX_DIAGONAL ? 1
                                                       : 2);
    atm_arg_buffer(&args, set->chan_expert->buffer);
    atm_arg_buffer(&args, set->chan_scale->buffer);
    atm_arg_ulong(&args, d_in);
    atm_arg_ulong(&args, R);
    atm_arg_ulong(&args, Z);
    atm_gemm merge = mixture_gemm(g, n, G_MERGE);
    if ((st = atm_node_launch_local(
             g, n, &args, "fold_gates", Z * d_in,
             atm_param_work_group(g->ctx, ATM_PARAM_MIXTURE_WG), first)) ||
        (st = atm_tensor_copy_with(mp->w0_dtype == ATMOE_DTYPE_F32
                                       ? n->kernel[K_COPY]
                                       : n->kernel[K_W0_F32],
                                   &w, w0, NULL)) ||
        (st = atm_graph_sgemm(g, &merge, NULL)))
        return st;

    if (T <= mp->linear_upto) {
        /* W' is f32 whatever W0's type: the shrink's kernels read it, or
         * their f32 twins when A_all is stored in half precision. */
        atm_linear_call c = {y->buffer, w.buffer, NULL, y->offset, w.offset, 0,
                         x, bias, NULL, d_out, d_in, 0, 0.0f};
        int slot = set->a_dtype == ATMOE_DTYPE_F32 ? K_SHRINK1 : K_MERGED1;
        return linear(g, n, T, slot, &c, last);
    }
    if (bias &&
        (st = atm_tensor_broadcast_rows(n->kernel[K_COPY], y, bias, NULL)))
        return st;
    atm_gemm final = mixture_gemm(g, n, G_FINAL);
    return atm_graph_sgemm(g, &final, last);
}

/* y = x W0^T + bias + c B_all M(gates) A_all x in one launch of
 * mixture_fused (u and z in its local memory). */
static atmoe_status run_fused(atmoe_graph *g, const atm_node *n, size_t T,
                              cl_event *first, cl_event *last)
{
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    const atmoe_experts *set = mp->experts;
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *w0 = atm_src_rt(g, n, 1);
    const atmoe_tensor *bias = atm_src_rt(g, n, 2);
    const atmoe_tensor *gates = atm_src_rt(g, n, 3);
    const atmoe_tensor *index = atm_src_rt(g, n, 4);
    /* One event for the node: its first command is its last. */
    cl_event *ev = first ? first : last;
    atm_args args = {n->kernel[fused_slot(T)], 0, CL_SUCCESS};
    atm_arg_tensor(&args, &n->rt);
    atm_arg_tensor(&args, x);
    atm_arg_tensor(&args, set->a);
    atm_arg_tensor(&args, w0);
    atm_arg_tensor(&args, set->b);
    /* Unused buffers are bound to x: kernels need a valid cl_mem. */
    atm_arg_tensor(&args, bias ? bias : x);
    atm_arg_int(&args, bias != NULL);
    atm_arg_tensor(&args, gates);
    atm_arg_ulong(&args, set->dense_r2 ? set->total_rank * set->dense_r2
                                       : gates->shape[1]);
    atm_arg_tensor(&args, index ? index : gates);
    atm_arg_int(&args, index ? 1 : mergeable(g, n) ? 2 : 0);
    atm_arg_buffer(&args, set->chan_expert->buffer);
    atm_arg_buffer(&args, set->chan_scale->buffer);
    atm_arg_ulong(&args, T);
    atm_arg_ulong(&args, set->d_in);
    atm_arg_ulong(&args, set->d_out);
    atm_arg_ulong(&args, gates->shape[0]);
    atm_arg_ulong(&args, mp->fused_rows);
    atm_arg_float(&args, mp->c);
    atm_arg_ulong(&args, set->total_rank);
    atm_arg_ulong(&args, z_width(set));
    /* u and z of this batch in local memory (within the limit
     * fused_shape checked for fused_upto tokens). */
    atm_arg(&args, T * set->total_rank * sizeof(float), NULL);
    atm_arg(&args, T * z_width(set) * sizeof(float), NULL);
    size_t groups = (set->d_out + mp->fused_rows - 1) / mp->fused_rows;
    atmoe_status st = atm_node_launch_local(g, n, &args, "mixture_fused",
                                            groups * mp->fused_gs,
                                            mp->fused_gs, ev);
    if (st == ATMOE_STATUS_OK && first && last) {
        /* Profiling reads the node's time from its first to its last
         * event: both are the one launch. */
        clRetainEvent(*first);
        *last = *first;
    }
    return st;
}

/* u = x A_all^T, z = M u, then y = x W0^T + bias + c z B_all^T in one
 * pass over W0 and B_all. */
static atmoe_status run_linear(atmoe_graph *g, atm_node *n, size_t T,
                               cl_event *first, cl_event *last)
{
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    const atmoe_experts *set = mp->experts;
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *w0 = atm_src_rt(g, n, 1);
    size_t u_off = n->work_offset / sizeof(float);
    size_t z_off = u_off + T * set->total_rank;
    atm_linear_call shrink = {g->arena, set->a->buffer, NULL, u_off,
                              set->a->offset, 0, x, NULL, NULL,
                              set->total_rank, set->d_in, 0, 0.0f};
    atm_linear_call base = {n->rt.buffer, w0->buffer, g->arena,
                            n->rt.offset, w0->offset, z_off, x,
                            atm_src_rt(g, n, 2), set->b, set->d_out,
                            set->d_in, z_width(set), mp->c};
    atmoe_status st;
    if (T <= mp->fused_upto)
        return run_fused(g, n, T, first, last);
    if ((st = linear(g, n, T, K_SHRINK1, &shrink, first)) !=
            ATMOE_STATUS_OK ||
        (st = mix(g, n, T, u_off, z_off)) != ATMOE_STATUS_OK)
        return st;
    return linear(g, n, T, K_BASE1, &base, last);
}

static atmoe_status mixture_run(atmoe_graph *g, atm_node *n, cl_event *first,
                                cl_event *last)
{
    const mixture_params *mp = ATM_NODE_PARAMS(mixture_params, n);
    const atmoe_tensor *bias = atm_src_rt(g, n, 2);
    size_t T = atm_src_rt(g, n, 0)->shape[0];
    atmoe_status st;
    if (T >= mp->merge_from)
        return run_merged(g, n, first, last);
    if (T <= mp->linear_upto) {
        const atmoe_experts *set = mp->experts;
        if (atm_experts_trains_b(set) && set->b_dtype == ATMOE_DTYPE_F32 &&
            n->kernel[K_COPY] != NULL) {
            /* sync_b: b [d_out, up] = bt^T, bt [up, d_out] read through a
             * transposed view. */
            atmoe_tensor src = *set->bt;
            src.shape[0] = set->bt->shape[1];
            src.shape[1] = set->bt->shape[0];
            src.stride[0] = set->bt->stride[1];
            src.stride[1] = set->bt->stride[0];
            if ((st = atm_tensor_copy_with(n->kernel[K_COPY], set->b, &src,
                                           first)))
                return st;
            first = NULL;
        } else if (atm_experts_trains_b(set)) {
            return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                            "mixture '%s': an expert's B became trainable "
                            "after the graph was planned; plan it again",
                            n->name);
        }
        return run_linear(g, n, T, first, last);
    }

    /* CLBlast: y = bias (broadcast), y += x W0^T, u = x A_all^T in the
     * node's scratch, z = M(gates) u, y += c z B_all^T. */
    if (bias) {
        if ((st = atm_tensor_broadcast_rows(n->kernel[K_COPY], &n->rt, bias,
                                            first)) != ATMOE_STATUS_OK)
            return st;
        first = NULL;
    }
    atm_gemm base = mixture_gemm(g, n, G_BASE);
    atm_gemm shrink = mixture_gemm(g, n, G_SHRINK);
    if (mp->w0_dtype != ATMOE_DTYPE_F32) {
        /* CLBlast reads f32: W0 converted into the scratch G_BASE reads. */
        const atmoe_tensor *w0 = atm_src_rt(g, n, 1);
        atmoe_tensor w = *w0;
        w.dtype = ATMOE_DTYPE_F32;
        w.buffer = g->arena;
        w.offset = base.b_offset;
        if ((st = atm_tensor_copy_with(n->kernel[K_W0_F32], &w, w0, NULL)))
            return st;
    }
    if (mp->experts->a_dtype != ATMOE_DTYPE_F32) {
        /* A_all likewise, into the scratch G_SHRINK reads. */
        const atmoe_tensor *a = mp->experts->a;
        atmoe_tensor w = *a;
        w.dtype = ATMOE_DTYPE_F32;
        w.buffer = g->arena;
        w.offset = shrink.b_offset;
        if ((st = atm_tensor_copy_with(n->kernel[K_A_F32], &w, a, NULL)))
            return st;
    }
    atm_gemm expand = mixture_gemm(g, n, G_EXPAND);
    size_t u_off = shrink.c_offset;
    if ((st = atm_graph_sgemm(g, &base, first)) ||
        (st = atm_graph_sgemm(g, &shrink, NULL)) ||
        (st = mix(g, n, T, u_off, expand.a_offset)))
        return st;
    return atm_graph_sgemm(g, &expand, last);
}

static void mixture_cost(const atmoe_graph *g, const atm_node *n,
                         uint64_t *bytes, uint64_t *flops)
{
    const atmoe_experts *set = ATM_NODE_PARAMS(mixture_params, n)->experts;
    uint64_t T = g->nodes[n->src[0]].rt.shape[0];
    uint64_t din = set->d_in, dout = set->d_out, R = set->total_rank;
    uint64_t Z = set->dense_r2 ? set->dense_r2 : R;
    *flops = 2 * T * dout * din + 2 * T * (R * din + Z * dout) +
             (set->dense_r2 ? 2 * T * R * Z : T * R);
    /* Weights once (as stored), activations in and out, gates. */
    const atm_node *w0 = &g->nodes[n->src[1]];
    *bytes = atm_dtype_bytes(w0->dtype, w0->ndim, w0->shape) +
             atmoe_dtype_size(set->a_dtype) * R * din +
             atmoe_dtype_size(set->b_dtype) * Z * dout +
             4 * (T * (din + dout) + T * g->nodes[n->src[3]].rt.shape[1]);
}

static void mixture_release(atm_node *n)
{
    atmoe_experts_free(ATM_NODE_PARAMS(mixture_params, n)->experts);
}

const atm_op atm_op_mixture = {
    .name = "mixture",
    .flags = ATM_OPF_MARKER,
    .prepare = mixture_prepare,
    .scratch = mixture_scratch,
    .gemm_scratch = mixture_gemm_scratch,
    .run = mixture_run,
    .cost = mixture_cost,
    .release = mixture_release,
    .backward = atm_mixture_backward,
};
