/* The fused mixture node: y = x W0^T (+ bias) + c * B_all M(gates) A_all x
 * (SPEC section 2), as a base GEMM, a shrink GEMM over the stacked experts,
 * one mix kernel and an expand GEMM accumulating onto the base. */
#include <config.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "device/blas.h"
#include "moe/experts.h"
#include "graph/graph.h"
#include "base/log.h"
#include "device/program.h"
#include "device/tuning.h"

static const char *mix_name(atmoe_mix mix)
{
    switch (mix) {
    case ATMOE_MIX_BLOCK: return "mix_block";
    case ATMOE_MIX_DIAGONAL: return "mix_diagonal";
    case ATMOE_MIX_DENSE: break;
    }
    return "mix_dense";
}

/* Which batches run the products of cl/linear.cl rather than CLBlast's
 * GEMMs: up to ATMOE_LINEAR_MAX_TOKENS when it is set, else up to the
 * tuning database's "linear" MAX_TOKENS, else every batch on a CPU device,
 * where they ran 4-5 times faster than CLBlast 1.5.3 with its default
 * parameters on PoCL 3.1 (decode and prefill alike), and batches of up to
 * 16 tokens elsewhere, where reading the weights once bounds the product
 * and GEMM tiling only adds to it. */
static int runs_linear(const atmoe_graph *g, size_t T)
{
    const atmoe_context *ctx = g->ctx;
    if (ctx->linear_max_tokens)
        return T <= ctx->linear_max_tokens;
    long tuned = atm_tuning_kernel_value(ctx, "linear", "MAX_TOKENS", 0);
    if (tuned > 0)
        return T <= (unsigned long)tuned;
    return T <= 16 || ctx->device->info.type == ATMOE_DEVICE_TYPE_CPU;
}

/* The shape of a launch of cl/linear.cl for T tokens: the tile, rows and
 * tokens per work-item, and the block of SR x ST tiles walked together.
 * The launch size depends on all four, so the host chooses them and passes
 * them as build options.
 *
 * The tile: one token streams 8 rows; more tokens share each row load, up
 * to a 4 x 4 tile of float16 sums, which fills half of AVX-512's
 * registers.  Larger tiles spill; on PoCL 3.1 (2-core AVX-512) 4 x 4 was
 * within 10% of the best tile from 4 to 512 tokens.  The block comes from
 * the "linear" entry of the tuning database when it has one: 8 x 8 was the
 * best of 4 to 64 at 64 and 512 tokens on PoCL. */
typedef struct linear_shape {
    size_t rows, tokens; /* the tile */
    size_t sr, st;       /* the block */
} linear_shape;

static linear_shape linear_shape_for(const atmoe_context *ctx, size_t T)
{
    long r = atm_tuning_kernel_value(ctx, "linear", "SR", 8);
    long t = atm_tuning_kernel_value(ctx, "linear", "ST", 8);
    linear_shape s = {T <= 2 ? 8 : 4, T <= 2 ? T : 4,
                      r >= 1 && r <= 256 ? (size_t)r : 8,
                      t >= 1 && t <= 256 ? (size_t)t : 8};
    return s;
}

static void linear_options(const linear_shape *s, char *options,
                           size_t size)
{
    snprintf(options, size, "-DROWS=%zu -DTB=%zu -DSR=%zu -DST=%zu",
             s->rows, s->tokens, s->sr, s->st);
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

/* Whether a batch of T tokens runs merged (see atmoe_graph_mixture_set_merge
 * for the cost rule). */
static int runs_merged(const atmoe_graph *g, const atm_node *n, size_t T)
{
    if (!mergeable(g, n) || n->merge == ATMOE_MERGE_NEVER)
        return 0;
    if (n->merge == ATMOE_MERGE_ALWAYS)
        return 1;
    const atmoe_experts *set = n->experts;
    double din = (double)set->d_in, dout = (double)set->d_out;
    double R = (double)set->total_rank, Z = (double)z_width(set);
    return (double)T * (R * din + Z * dout) > (Z + 1.0) * din * dout;
}

/* Scratch while the node runs: u [T, R] and z [T, Z] unmerged; the folded
 * experts [Z, d_in] and W' [d_out, d_in] merged. */
static size_t work_bytes(const atmoe_graph *g, const atm_node *n)
{
    const atmoe_experts *set = n->experts;
    size_t T = g->nodes[n->src[0]].shape[0];
    size_t unmerged = T * (set->total_rank + z_width(set));
    size_t merged = 0;
    if (runs_merged(g, n, T)) /* then smaller batches may too */
        merged = (z_width(set) + set->d_out) * set->d_in;
    return (unmerged > merged ? unmerged : merged) * sizeof(float);
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
    if (xn->dtype != ATMOE_DTYPE_F32 || wn->dtype != ATMOE_DTYPE_F32 ||
        gn->dtype != ATMOE_DTYPE_F32 || (bn && bn->dtype != ATMOE_DTYPE_F32))
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: x, w0, bias and gates must be f32", fn);
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
    atm_node_init(&p, ATM_OP_MIXTURE, ATMOE_DTYPE_F32, 2, shape);
    p.batch_dim = xn->batch_dim;
    p.batch_factor = xn->batch_factor;
    p.src[0] = x;
    p.src[1] = w0;
    p.src[2] = bias;
    p.src[3] = gates;
    p.src[4] = gate_index;
    p.nsrc = 5;
    p.mix = mix;
    p.alpha = c;
    p.merge = ATMOE_MERGE_AUTO;
    p.experts = set;
    p.work_bytes = work_bytes(g, &p);
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
    if (n->op != ATM_OP_MIXTURE)
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
    if (n->merge != mode) {
        atm_graph_unplan(g);
        n->merge = mode;
        n->work_bytes = work_bytes(g, n);
    }
    return ATMOE_STATUS_OK;
}

atmoe_status atm_mixture_node_prepare(atmoe_graph *g, const atm_node *n)
{
    cl_kernel k;
    atmoe_status st = atm_kernel_get(g->ctx, "mixture", "", mix_name(n->mix),
                                     &k);
    /* Every batch up to the planned one may run: build each tile one of
     * them can use. */
    static const size_t tile_batches[] = {1, 2, 3};
    size_t T = g->nodes[n->src[0]].shape[0];
    for (size_t i = 0; i < 3 && st == ATMOE_STATUS_OK; i++) {
        char options[64];
        if (tile_batches[i] > T)
            break;
        linear_shape shape = linear_shape_for(g->ctx, tile_batches[i]);
        linear_options(&shape, options, sizeof options);
        st = atm_kernel_get(g->ctx, "linear", options, "linear", &k);
    }
    if (st == ATMOE_STATUS_OK && mergeable(g, n))
        st = atm_kernel_get(g->ctx, "mixture", "", "fold_gates", &k);
    if (st == ATMOE_STATUS_OK && (n->src[2] != ATMOE_NODE_NONE || mergeable(g, n)))
        st = atm_kernel_get(g->ctx, "tensor", "", "copy_f32_f32", &k);
    return st;
}

static atmoe_status gemm(atmoe_graph *g, int trans_b, size_t m, size_t n,
                         size_t k, float alpha, const atmoe_tensor *a,
                         const atmoe_tensor *b, size_t b_ld, float beta,
                         cl_mem c, size_t c_offset, cl_event *ev)
{
    atm_gemm p = {0, trans_b, m, n, k, alpha, beta, a->buffer, b->buffer,
                  c, a->offset, k, b->offset, b_ld, c_offset, n};
    return atm_graph_sgemm(g, &p, ev);
}

/* One product of cl/linear.cl: y [T, rows] = x [T, k] w^T (+ bias)
 * (+ alpha z b^T with z [T, zw], b [rows, zw]); w and z may lie in the
 * arena, hence buffers and offsets. */
typedef struct linear_call {
    cl_mem y, w, z;
    size_t y_offset, w_offset, z_offset;
    const atmoe_tensor *x, *bias, *b;
    size_t rows, k, zw;
    float alpha;
} linear_call;

static atmoe_status linear(atmoe_graph *g, const atm_node *n, size_t T,
                           const linear_call *c, cl_event *ev)
{
    char options[64];
    cl_kernel k;
    linear_shape shape = linear_shape_for(g->ctx, T);
    linear_options(&shape, options, sizeof options);
    atmoe_status st = atm_kernel_get(g->ctx, "linear", options, "linear", &k);
    if (st != ATMOE_STATUS_OK)
        return st;
    /* Unused buffers are bound to x: kernels need a valid cl_mem. */
    const atmoe_tensor *bias = c->bias ? c->bias : c->x;
    atm_args args = {k, 0, CL_SUCCESS};
    atm_arg_buffer(&args, c->y);
    atm_arg_ulong(&args, c->y_offset);
    atm_arg_tensor(&args, c->x);
    atm_arg_buffer(&args, c->w);
    atm_arg_ulong(&args, c->w_offset);
    atm_arg_ulong(&args, c->rows);
    atm_arg_ulong(&args, c->k);
    atm_arg_ulong(&args, T);
    atm_arg_tensor(&args, bias);
    atm_arg_int(&args, c->bias != NULL);
    atm_arg_buffer(&args, c->zw ? c->z : c->x->buffer);
    atm_arg_ulong(&args, c->z_offset);
    atm_arg_tensor(&args, c->zw ? c->b : c->x);
    atm_arg_ulong(&args, c->zw);
    atm_arg_float(&args, c->alpha);
    /* Whole blocks of SR x st tiles, as the kernel walks them. */
    size_t row_tiles = (c->rows + shape.rows - 1) / shape.rows;
    size_t token_tiles = (T + shape.tokens - 1) / shape.tokens;
    size_t bt = token_tiles < shape.st ? token_tiles : shape.st;
    size_t items = (row_tiles + shape.sr - 1) / shape.sr * shape.sr *
                   ((token_tiles + bt - 1) / bt * bt);
    /* CPU drivers run a work-group's items in a loop; one item per group
     * lets each core take whole rows.  GPUs choose their own grouping. */
    size_t local =
        g->ctx->device->info.type == ATMOE_DEVICE_TYPE_CPU ? 1 : 0;
    return atm_node_launch_local(g, n, &args, "linear", items, local, ev);
}

/* y = bias; y += x W'^T with W' = W0 + c B_all M A_all made in scratch. */
static atmoe_status run_merged(atmoe_graph *g, atm_node *n, cl_event *first,
                               cl_event *last)
{
    const atmoe_experts *set = n->experts;
    const atmoe_tensor *x = &g->nodes[n->src[0]].rt;
    const atmoe_tensor *w0 = &g->nodes[n->src[1]].rt;
    const atmoe_tensor *bias =
        n->src[2] != ATMOE_NODE_NONE ? &g->nodes[n->src[2]].rt : NULL;
    const atmoe_tensor *gates = &g->nodes[n->src[3]].rt;
    atmoe_tensor *y = &n->rt;
    size_t T = x->shape[0], d_in = set->d_in, d_out = set->d_out;
    size_t R = set->total_rank, Z = z_width(set);
    atmoe_status st;

    /* Folded experts M A_all [Z, d_in], then W' [d_out, d_in] after them. */
    size_t fold_off = n->work_offset / sizeof(float);
    atmoe_tensor w = *w0;
    w.buffer = g->arena;
    w.offset = fold_off + Z * d_in;
    cl_kernel k;
    if ((st = atm_kernel_get(g->ctx, "mixture", "", "fold_gates", &k)) !=
        ATMOE_STATUS_OK)
        return st;
    atm_args args = {k, 0, CL_SUCCESS};
    atm_arg_buffer(&args, g->arena);
    atm_arg_ulong(&args, fold_off);
    atm_arg_buffer(&args, set->a->buffer);
    atm_arg_tensor(&args, gates);
    atm_arg_int(&args, n->mix == ATMOE_MIX_BLOCK      ? 0
                       : n->mix == ATMOE_MIX_DIAGONAL ? 1
                                                      : 2);
    atm_arg_buffer(&args, set->chan_expert->buffer);
    atm_arg_buffer(&args, set->chan_scale->buffer);
    atm_arg_ulong(&args, d_in);
    atm_arg_ulong(&args, R);
    atm_arg_ulong(&args, Z);
    if ((st = atm_node_launch(g, n, &args, "fold_gates", Z * d_in, first)) ||
        (st = atm_tensor_copy(&w, w0, NULL)))
        return st;
    atm_gemm merge = {1, 0, d_out, d_in, Z, n->alpha, 1.0f,
                      set->bt->buffer, g->arena, g->arena, set->bt->offset,
                      d_out, fold_off, d_in, w.offset, d_in};
    if ((st = atm_graph_sgemm(g, &merge, NULL)) != ATMOE_STATUS_OK)
        return st;

    if (runs_linear(g, T)) {
        linear_call c = {y->buffer, w.buffer, NULL, y->offset, w.offset, 0,
                         x, bias, NULL, d_out, d_in, 0, 0.0f};
        return linear(g, n, T, &c, last);
    }
    float beta = 0.0f;
    if (bias) {
        if ((st = atm_tensor_broadcast_rows(y, bias, NULL)) !=
            ATMOE_STATUS_OK)
            return st;
        beta = 1.0f;
    }
    return gemm(g, 1, T, d_out, d_in, 1.0f, x, &w, d_in, beta, y->buffer,
                y->offset, last);
}

/* z = M(gates) u for T tokens, u and z in the node's scratch. */
static atmoe_status mix(atmoe_graph *g, const atm_node *n, size_t T,
                        size_t u_off, size_t z_off)
{
    const atmoe_experts *set = n->experts;
    const atmoe_tensor *gates = &g->nodes[n->src[3]].rt;
    const atmoe_tensor *index =
        n->src[4] != ATMOE_NODE_NONE ? &g->nodes[n->src[4]].rt : NULL;
    cl_kernel k;
    atmoe_status st = atm_kernel_get(g->ctx, "mixture", "", mix_name(n->mix),
                                     &k);
    if (st != ATMOE_STATUS_OK)
        return st;
    /* The dense mix's width argument is r2; the others' the gates'.  The
     * index buffer is a placeholder when there is no gate_index. */
    atm_args args = {k, 0, CL_SUCCESS};
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
    return atm_node_launch(g, n, &args, mix_name(n->mix), T * z_width(set),
                           NULL);
}

/* u = x A_all^T, z = M u, then y = x W0^T + bias + c z B_all^T in one
 * pass over W0 and B_all. */
static atmoe_status run_linear(atmoe_graph *g, atm_node *n, size_t T,
                             cl_event *first, cl_event *last)
{
    const atmoe_experts *set = n->experts;
    const atmoe_tensor *x = &g->nodes[n->src[0]].rt;
    const atmoe_tensor *w0 = &g->nodes[n->src[1]].rt;
    size_t u_off = n->work_offset / sizeof(float);
    size_t z_off = u_off + T * set->total_rank;
    linear_call shrink = {g->arena, set->a->buffer, NULL, u_off,
                        set->a->offset, 0, x, NULL, NULL,
                        set->total_rank, set->d_in, 0, 0.0f};
    linear_call base = {n->rt.buffer, w0->buffer, g->arena, n->rt.offset,
                      w0->offset, z_off, x,
                      n->src[2] != ATMOE_NODE_NONE ? &g->nodes[n->src[2]].rt
                                                   : NULL,
                      set->b, set->d_out, set->d_in, z_width(set), n->alpha};
    atmoe_status st;
    if ((st = linear(g, n, T, &shrink, first)) != ATMOE_STATUS_OK ||
        (st = mix(g, n, T, u_off, z_off)) != ATMOE_STATUS_OK)
        return st;
    return linear(g, n, T, &base, last);
}

atmoe_status atm_mixture_node_run(atmoe_graph *g, atm_node *n,
                                  cl_event *first, cl_event *last)
{
    const atmoe_experts *set = n->experts;
    const atmoe_tensor *x = &g->nodes[n->src[0]].rt;
    const atmoe_tensor *w0 = &g->nodes[n->src[1]].rt;
    const atmoe_tensor *bias =
        n->src[2] != ATMOE_NODE_NONE ? &g->nodes[n->src[2]].rt : NULL;
    atmoe_tensor *y = &n->rt;
    size_t T = x->shape[0], d_in = set->d_in, d_out = set->d_out;
    size_t R = set->total_rank;
    atmoe_status st;

    if (runs_merged(g, n, T)) {
        st = run_merged(g, n, first, last);
        /* The sizing pass goes on to the unmerged GEMMs: smaller batches
         * run them. */
        if (st != ATMOE_STATUS_OK || !g->sizing)
            return st;
    }
    if (runs_linear(g, T))
        return run_linear(g, n, T, first, last);

    /* Base: y = bias (broadcast) then y += x W0^T. */
    float beta = 0.0f;
    if (bias) {
        if ((st = atm_tensor_broadcast_rows(y, bias, first)) !=
            ATMOE_STATUS_OK)
            return st;
        first = NULL;
        beta = 1.0f;
    }
    if ((st = gemm(g, 1, T, d_out, d_in, 1.0f, x, w0, d_in, beta, y->buffer,
                   y->offset, first)) != ATMOE_STATUS_OK)
        return st;

    /* Shrink: u = x A_all^T, [T, R], in the node's scratch. */
    size_t u_off = n->work_offset / sizeof(float), z_off = u_off + T * R;
    atmoe_tensor u = *y;
    u.offset = u_off;
    if ((st = gemm(g, 1, T, R, d_in, 1.0f, x, set->a, d_in, 0.0f, g->arena,
                   u_off, NULL)) != ATMOE_STATUS_OK)
        return st;

    /* Mix: z = M(gates) u. */
    if ((st = mix(g, n, T, u_off, z_off)) != ATMOE_STATUS_OK)
        return st;

    /* Expand: y += c z B_all^T, with B stored transposed [Z, d_out]. */
    atmoe_tensor z = u;
    z.offset = z_off;
    return gemm(g, 0, T, d_out, z_width(set), n->alpha, &z, set->bt, d_out,
                1.0f, y->buffer, y->offset, last);
}

void atm_mixture_node_cost(const atmoe_graph *g, const atm_node *n,
                           uint64_t *bytes, uint64_t *flops)
{
    const atmoe_experts *set = n->experts;
    uint64_t T = g->nodes[n->src[0]].rt.shape[0];
    uint64_t din = set->d_in, dout = set->d_out, R = set->total_rank;
    uint64_t Z = set->dense_r2 ? set->dense_r2 : R;
    *flops = 2 * T * dout * din + 2 * T * (R * din + Z * dout) +
             (set->dense_r2 ? 2 * T * R * Z : T * R);
    /* Weights once, activations in and out, gates. */
    *bytes = 4 * (dout * din + R * din + Z * dout + T * (din + dout) +
                  T * g->nodes[n->src[3]].rt.shape[1]);
}
