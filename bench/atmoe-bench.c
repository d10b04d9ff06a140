/* atmoe-bench: the canonical workloads of SPEC section 6 on each device,
 * measured against that device's own ceilings.
 *
 * For every device it first measures the ceilings with micro-kernels of its
 * own (bench/ceilings.cl, read at run time): global-memory read bandwidth,
 * the FP32 FMA rate, the launch cost of a kernel and host-device transfer
 * bandwidth, plus the SGEMM rate the library reaches through CLBlast.  Then
 * it runs each workload in up to three variants:
 *
 *   fused     the library's AT-MoE layer (atmoe_graph_moe_layer): the
 *             grouped router kernel, then the fused mixture; for mor1e the
 *             rank-1 expert layer (atmoe_graph_mor1e_layer)
 *   unfused   what a user without the mixture would write with the same
 *             graph API: a CLBlast GEMM for the base, two GEMMs per expert
 *             (shrink and expand), scale, mul and add for the gating, and the
 *             router as matmul and softmax nodes; for mor1e the layer
 *             composed from graph operations: the T-REX router (matmul,
 *             softmax, scale, sigmoid, mul, add), then the dense mixture
 *   merged    one gate row for every token (per-sequence routing from a
 *             pooled embedding), the experts folded into the base weight on
 *             every compute (atmoe_graph_mixture_set_merge ALWAYS)
 *
 * and, with --peer torch, the same work in PyTorch (bench/peer.c).
 *
 * train-step times a training step instead of a forward: the layer, an MSE
 * loss against a target, atmoe_graph_backward (base frozen; experts' A and
 * B and the router's W_G and W_D trainable), a read of the loss and
 * atmoe_optimizer_step (AdamW).  fused is the AT-MoE layer, whose
 * gradients come from the router's and the mixture's own backward rows;
 * unfused the same composed graph as above, its gradients through the
 * generic engine's matmul, softmax, mul, view ... backwards; torch the
 * same layer under autograd with torch.optim.AdamW.  Its check compares
 * the first forward's y (before any step); after each variant the
 * router's and the unfused experts' weights are uploaded again, so that
 * the next variant starts from the same weights.
 *
 * Each run is timed by the wall clock around atmoe_graph_compute() and
 * atmoe_context_finish(), over --reps repetitions after --warmup ones, and
 * after each timed compute atmoe_graph_get_compute_stats() says what it cost
 * the host (the library's time and allocations in the call); the
 * FLOPs and bytes of a workload are counted analytically (see count_work),
 * so GFLOP/s and GB/s are rates of the same useful work for every variant.
 * Before it is timed, each unfused and merged run is checked against a
 * reference that computes the same thing another way.
 *
 * Only the public API of include/atmoe.h is used, plus plain OpenCL for the
 * ceiling micro-kernels. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CL/cl.h>
#include <jansson.h>

#include "atmoe.h"
#include "bench.h"

#define CEILINGS_FILE "ceilings.cl"

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */
/* ------------------------------------------------------------------------ */

/* Records a failed library call with the library's own detail. */
static int lib_error(const atmoe_context *ctx, atmoe_status st,
                     const char *what)
{
    const char *detail = atmoe_errmsg(ctx);
    return set_error("%s: %s%s%s", what, atmoe_strerror(st),
                     *detail ? ": " : "", detail);
}

/* n floats uniform in [-scale, scale), the next ones of the stream:
 * splitmix64, so that the weights are the same on every machine. */
static void fill_uniform(float *p, size_t n, float scale, uint64_t *state)
{
    for (size_t i = 0; i < n; i++)
        p[i] = scale * (float)uniform(state);
}

/* ------------------------------------------------------------------------ */
/* Workloads (SPEC section 6)                                                */
/* ------------------------------------------------------------------------ */

typedef struct workload_def {
    const char *name;
    int implemented;
    const char *summary;
} workload_def;

static const workload_def workloads[] = {
    {"decode", 1, "T = 1, 4, 16; 8 experts in 4 groups, rank 16"},
    {"prefill", 1, "T = 512; 8 experts in 4 groups, rank 16"},
    {"mor1e", 1, "T = 1, 16, 512; T-REX rank-1 experts, r1 = 4, r2 = 8 (E = 32)"},
    {"many-experts", 1,
     "T = 64; 64 experts in 8 groups, top-2 groups, ranks 8 to 64"},
    {"train-step", 1, "T = 256, d = 2048; forward, backward and AdamW"},
    /* The recipes' step loops (bench/recipes.c), run only when named. */
    {"recipe-stage1", 1,
     "T = 256, d = 2048; atmoe_train_stage1's step loop, 8 rank-16 LoRAs"},
    {"recipe-stage2", 1,
     "T = 256, d = 2048; atmoe_train_stage2's step loop, the router"},
    {"recipe-trex", 1,
     "T = 256, d = 2048; atmoe_train_trex's step loop, r1 = 4, r2 = 8"},
};
#define N_WORKLOADS (sizeof workloads / sizeof workloads[0])

/* A workload's shapes at one scale. */
typedef struct wl_shape {
    const char *name;
    size_t d;           /* d_in = d_out */
    size_t n_T, T[3];   /* token counts, one run each */
    size_t groups, per_group;
    int mixed_ranks;    /* ranks 8..64 mixed, else 16 for every expert */
    int top_k_groups;   /* 0 keeps all */
    size_t r1, r2;      /* a T-REX adapter (mor1e); 0 for AT-MoE */
    int train;          /* train-step: a training step, not a forward */
} wl_shape;

static const float TAU = 1.0f; /* both router temperatures */
static const float MIX_C = 1.0f; /* AT-MoE's gate on the experts' sum */

/* T-REX's gate constants k_r and k_s (SPEC section 4, from its reference
 * code), and its two scalar gate weights, set away from their initial 0 so
 * that om and c differ (om = sigmoid(0.4), c = sigmoid(-0.3)). */
static const float TREX_K_R = 32.0f, TREX_K_S = 4.0f;
static const float TREX_W_OM = 0.004f, TREX_W_C = -0.003f;

static wl_shape make_shape(size_t index, int full)
{
    wl_shape s = {workloads[index].name, full ? 4096 : 1024, 1, {0, 0, 0},
                  4, 2, 0, 0, 0, 0, 0};
    if (strcmp(s.name, "decode") == 0) {
        s.n_T = 3;
        s.T[0] = 1;
        s.T[1] = 4;
        s.T[2] = 16;
    } else if (strcmp(s.name, "prefill") == 0) {
        s.T[0] = 512;
    } else if (strcmp(s.name, "mor1e") == 0) {
        /* prefill, and the decode shapes of the same layer */
        s.n_T = 3;
        s.T[0] = 1;
        s.T[1] = 16;
        s.T[2] = 512;
        s.r1 = 4;
        s.r2 = 8;
        s.groups = 1;
        s.per_group = s.r1 * s.r2;
    } else if (strcmp(s.name, "train-step") == 0) {
        /* SPEC section 6: T = 256, d = 2048, 8 experts in 4 groups of
         * rank 16; the small scale keeps the shape at a quarter of d and
         * T (a step of tests/test_bench.sh). */
        s.train = 1;
        s.d = full ? 2048 : 512;
        s.T[0] = full ? 256 : 64;
    } else { /* many-experts */
        s.T[0] = 64;
        s.groups = 8;
        s.per_group = 8;
        s.mixed_ranks = 1;
        s.top_k_groups = 2;
    }
    return s;
}

/* Expert e of group e / per_group; mixed ranks cycle through 8, 16, 32 and
 * 64, shifted by the group so that every group holds every rank. */
static size_t expert_rank(const wl_shape *s, size_t e)
{
    static const size_t cycle[4] = {8, 16, 32, 64};
    return s->mixed_ranks ? cycle[(e + e / s->per_group) % 4] : 16;
}

/* One workload's weights, on the host and on the device.
 *
 * AT-MoE (every workload but mor1e): E experts, a[e] [r_e, d] and b[e]
 * [d, r_e] with their tensors ta and tb, and the router's W_G [d, G] and
 * W_D [d, G*M].
 *
 * T-REX (mor1e): the dense adapter A [r1, d] and B [d, r2], as an expert
 * set (the unfused and merged variants) and as tensors tda and tdb (the
 * fused layer's parameters); the router's W_r [E, d];
 * the intuition score s_b [1, E] of the one sequence; w_om and w_c; and a
 * bias, as T-REX wraps a linear layer that has one. */
typedef struct wl_data {
    wl_shape s;
    size_t E, R, T_max;
    size_t *rank;
    float *w0, *wg, *wd, *x, *h;
    float *target; /* train-step: the MSE's target [T_max, d] */
    float **a, **b;
    size_t n_a, n_b; /* entries of a and ta, of b and tb */
    atmoe_tensor *tw0, *twg, *twd, **ta, **tb;
    /* W0 as the library's variants store it (--dtype): tw0 itself for f32,
     * else a copy in that type; tw0 and w0 then hold its values in f32, so
     * that every variant and the peer compute with the same weights. */
    atmoe_dtype w0_dtype;
    atmoe_tensor *tw0s;
    float *bias, *wr, *sb, *dense_a, *dense_b;
    atmoe_tensor *tbias, *twr, *twom, *twc, *tda, *tdb;
    atmoe_experts *set;
    atmoe_router *router;
    uint64_t seed, state;
    json_t *draws; /* every draw in order: the peer's recipe */
} wl_data;

static void wl_free(wl_data *w)
{
    for (size_t i = 0; i < w->n_a; i++) {
        if (w->a)
            free(w->a[i]);
        if (w->ta)
            atmoe_tensor_free(w->ta[i]);
    }
    for (size_t i = 0; i < w->n_b; i++) {
        if (w->b)
            free(w->b[i]);
        if (w->tb)
            atmoe_tensor_free(w->tb[i]);
    }
    free(w->a);
    free(w->b);
    free(w->ta);
    free(w->tb);
    free(w->rank);
    free(w->w0);
    free(w->wg);
    free(w->wd);
    free(w->x);
    free(w->h);
    free(w->target);
    free(w->bias);
    free(w->wr);
    free(w->sb);
    free(w->dense_a);
    free(w->dense_b);
    atmoe_tensor_free(w->tw0);
    atmoe_tensor_free(w->tw0s);
    atmoe_tensor_free(w->twg);
    atmoe_tensor_free(w->twd);
    atmoe_tensor_free(w->tbias);
    atmoe_tensor_free(w->twr);
    atmoe_tensor_free(w->tda);
    atmoe_tensor_free(w->tdb);
    atmoe_tensor_free(w->twom);
    atmoe_tensor_free(w->twc);
    atmoe_router_free(w->router);
    atmoe_experts_free(w->set);
    json_decref(w->draws);
    memset(w, 0, sizeof *w);
}

static int upload_shape(atmoe_context *ctx, int ndim, const size_t *shape,
                        const float *data, atmoe_tensor **t)
{
    size_t count = 1;
    for (int i = 0; i < ndim; i++)
        count *= shape[i];
    atmoe_status st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, ndim, shape, t);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_tensor_write(*t, data, count * sizeof(float));
    return st == ATMOE_STATUS_OK ? 0 : lib_error(ctx, st, "uploading weights");
}

static int upload(atmoe_context *ctx, size_t rows, size_t cols,
                  const float *data, atmoe_tensor **t)
{
    size_t shape[2] = {rows, cols};
    return upload_shape(ctx, 2, shape, data, t);
}

/* rows x cols floats U(+-scale), the next ones of the workload's stream,
 * and a record of the draw (name, shape, scale) for the peer, which draws
 * the same numbers: splitmix64 is a counter, so the k-th number depends on
 * the seed and k alone. */
static float *draw(wl_data *w, const char *name, size_t rows, size_t cols,
                   float scale)
{
    float *p = xcalloc(rows * cols, sizeof *p);
    fill_uniform(p, rows * cols, scale, &w->state);
    json_array_append_new(w->draws,
                          json_pack("{s:s, s:[I, I], s:f}", "name", name,
                                    "shape", (json_int_t)rows,
                                    (json_int_t)cols, "scale", (double)scale));
    return p;
}

/* Random weights: W0, A and the router's weights ~ U(+-1/sqrt d), B ~
 * U(+-1/sqrt r) (non-zero, so that the experts change the result), x and
 * h ~ U(+-1). */
static int init_atmoe(atmoe_context *ctx, wl_data *w)
{
    const wl_shape *s = &w->s;
    size_t d = s->d, G = s->groups, M = s->per_group;
    w->E = w->n_a = w->n_b = G * M;
    w->rank = xcalloc(w->E, sizeof *w->rank);
    w->a = xcalloc(w->E, sizeof *w->a);
    w->b = xcalloc(w->E, sizeof *w->b);
    w->ta = xcalloc(w->E, sizeof *w->ta);
    w->tb = xcalloc(w->E, sizeof *w->tb);
    float sd = 1.0f / sqrtf((float)d);
    w->w0 = draw(w, "w0", d, d, sd);
    w->wg = draw(w, "w_g", d, G, sd);
    w->wd = draw(w, "w_d", d, G * M, sd);
    w->x = draw(w, "x", w->T_max, d, 1.0f);
    w->h = draw(w, "h", 1, d, 1.0f);
    if (s->train)
        w->target = draw(w, "target", w->T_max, d, 1.0f);

    atmoe_status st = atmoe_experts_new(ctx, d, d, &w->set);
    if (st != ATMOE_STATUS_OK)
        return lib_error(ctx, st, "creating the expert set");
    for (size_t e = 0; e < w->E; e++) {
        char name[32];
        size_t r = w->rank[e] = expert_rank(s, e);
        w->R += r;
        snprintf(name, sizeof name, "a%zu", e);
        w->a[e] = draw(w, name, r, d, sd);
        snprintf(name, sizeof name, "b%zu", e);
        w->b[e] = draw(w, name, d, r, 1.0f / sqrtf((float)r));
        /* Experts go in group by group, so that expert e is slot
         * (e / M) * M + e % M of the router, the layout the unfused router
         * builds with plain reshapes. */
        st = atmoe_experts_add(w->set, (int)(e / M), r, w->a[e], w->b[e],
                               2.0f * (float)r, 0, NULL);
        if (st != ATMOE_STATUS_OK)
            return lib_error(ctx, st, "adding an expert");
        if (upload(ctx, r, d, w->a[e], &w->ta[e]) ||
            upload(ctx, d, r, w->b[e], &w->tb[e]))
            return -1;
        if (s->train &&
            (st = atmoe_experts_set_trainable(w->set, e, ATMOE_TRAIN_A |
                                                             ATMOE_TRAIN_B)))
            return lib_error(ctx, st, "making an expert trainable");
    }
    st = atmoe_router_new(w->set, ATMOE_ROUTER_PROJECTED, TAU, TAU,
                          s->top_k_groups, 0, &w->router);
    if (st != ATMOE_STATUS_OK)
        return lib_error(ctx, st, "creating the router");
    if (upload(ctx, d, d, w->w0, &w->tw0) || upload(ctx, d, G, w->wg, &w->twg) ||
        upload(ctx, d, G * M, w->wd, &w->twd))
        return -1;
    return 0;
}

/* T-REX weights: W0, the bias, W_r and A ~ U(+-1/sqrt d), B ~
 * U(+-1/sqrt r2), x, h and s_b ~ U(+-1) (s_b stands for the cosine
 * similarities C e_b of SPEC section 4). */
static int init_trex(atmoe_context *ctx, wl_data *w)
{
    const wl_shape *s = &w->s;
    size_t d = s->d, r1 = s->r1, r2 = s->r2, one = 1;
    w->E = w->R = r1 * r2; /* rank-1 experts */
    float sd = 1.0f / sqrtf((float)d);
    w->w0 = draw(w, "w0", d, d, sd);
    w->bias = draw(w, "bias", 1, d, sd);
    w->wr = draw(w, "w_r", w->E, d, sd);
    w->x = draw(w, "x", w->T_max, d, 1.0f);
    w->h = draw(w, "h", 1, d, 1.0f);
    w->sb = draw(w, "s_b", 1, w->E, 1.0f);
    w->dense_a = draw(w, "a", r1, d, sd);
    w->dense_b = draw(w, "b", d, r2, 1.0f / sqrtf((float)r2));

    atmoe_status st = atmoe_experts_new(ctx, d, d, &w->set);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_experts_set_dense(w->set, r1, w->dense_a, r2, w->dense_b);
    if (st != ATMOE_STATUS_OK)
        return lib_error(ctx, st, "creating the T-REX adapter");
    if (upload(ctx, d, d, w->w0, &w->tw0) ||
        upload_shape(ctx, 1, &d, w->bias, &w->tbias) ||
        upload(ctx, w->E, d, w->wr, &w->twr) ||
        upload(ctx, r1, d, w->dense_a, &w->tda) ||
        upload(ctx, d, r2, w->dense_b, &w->tdb) ||
        upload_shape(ctx, 1, &one, &TREX_W_OM, &w->twom) ||
        upload_shape(ctx, 1, &one, &TREX_W_C, &w->twc))
        return -1;
    return 0;
}

/* A workload's weights from a fixed seed per workload. */
/* W0 rounded to its stored type (see wl_data), the draw's record saying
 * so for the peer. */
static int store_w0(atmoe_context *ctx, wl_data *w)
{
    if (w->w0_dtype == ATMOE_DTYPE_F32)
        return 0;
    size_t d = w->s.d, shape[2] = {d, d};
    atmoe_status st = atmoe_tensor_new(ctx, w->w0_dtype, 2, shape, &w->tw0s);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_tensor_copy(w->tw0s, w->tw0);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_tensor_copy(w->tw0, w->tw0s);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_tensor_read(w->tw0, w->w0, d * d * sizeof *w->w0);
    if (st != ATMOE_STATUS_OK)
        return lib_error(ctx, st, "storing W0");
    size_t i;
    json_t *rec;
    json_array_foreach(w->draws, i, rec)
        if (strcmp(json_string_value(json_object_get(rec, "name")), "w0") ==
            0)
            json_object_set_new(rec, "round",
                                json_string(atmoe_dtype_name(w->w0_dtype)));
    return 0;
}

static int wl_init(atmoe_context *ctx, const wl_shape *s, uint64_t seed,
                   atmoe_dtype w0_dtype,
                   wl_data *w)
{
    memset(w, 0, sizeof *w);
    w->s = *s;
    w->T_max = s->T[s->n_T - 1];
    w->seed = w->state = seed;
    w->draws = json_array();
    w->w0_dtype = w0_dtype;
    if (s->r1 ? init_trex(ctx, w) : init_atmoe(ctx, w))
        return -1;
    return store_w0(ctx, w);
}

/* The work of one run, counted from the shapes (not from what a variant
 * happens to execute), so that every variant is rated on the same work.
 * router_rows is the rows the router sees: T per token; 1 for the merged
 * variant's per-sequence row.
 *
 * AT-MoE, with d_in, d_out, T tokens, E experts of total rank R in G
 * groups of M:
 *
 *   FLOPs = 2 T d_in d_out                   base projection x W0^T
 *         + 2 T R (d_in + d_out)             shrink A_all x and expand B_all z
 *         + T R                              the gating of the R channels
 *         + 2 router_rows d_in G (1 + M)     router logits h W_G and h W_D
 *   (the router's softmaxes, O(rows G M), are left out)
 *
 *   bytes = s0 d_out d_in                    W0, read once (s0 bytes per
 *                                            weight as stored, --dtype;
 *                                            q8: 36 bytes a block of 32)
 *         + 4 (R (d_in + d_out)              every A_e and B_e, read once
 *            + d_in G (1 + M)                W_G and W_D, read once
 *            + T (d_in + d_out)              x read, y written
 *            + router_rows E                 gates written
 *            + (merged ? d_in : 0))          the pooled router input
 *
 * T-REX (mor1e), with r1 down and r2 up vectors and E = r1 r2 experts:
 *
 *   FLOPs = 2 T d_in d_out + T d_out         base projection and bias
 *         + 2 T (r1 d_in + r1 r2 + r2 d_out) shrink A x, mix G^T u, expand B z
 *         + 2 router_rows d_in E             router logits W_r h
 *         + 4 router_rows E                  k_r om p + k_s (1 - om) s_b, c
 *   (the softmax left out as above)
 *
 *   bytes = s0 d_out d_in                    W0 as stored (as above)
 *         + 4 (d_out                         the bias
 *            + r1 d_in + d_out r2            A and B
 *            + E d_in + E                    W_r and s_b
 *            + T (d_in + d_out)              x read, y written
 *            + router_rows E                 gates written
 *            + (merged ? d_in : 0))          the pooled router input
 *
 * This is the least traffic any implementation needs (every weight read
 * once, no intermediate leaving the chip), the bound the roofline takes.
 *
 * train-step adds to the forward's, with P = R (d_in + d_out) + d_in G
 * (1 + M) trainable weights (the base is frozen and x needs no gradient,
 * so nothing of the backward touches W0):
 *
 *   FLOPs += 3 T d_out                       the MSE and its gradient
 *          + 2 T R d_out                     dz = dy B_all
 *          + 2 T R                           d(gates) and du
 *          + 2 T R d_out + 2 T R d_in        dB = dy^T z, dA = du^T x
 *          + 2 T d_in G (1 + M)              dW_G and dW_D
 *          + 12 P                            AdamW (moments, bias
 *                                            corrections, decay, update)
 *   (the router's softmax backward, O(T G M), left out as above)
 *
 *   bytes += 4 (T d_out                      the target
 *             + T (d_in + d_out)             x and dy read again
 *             + P                            the gradients written
 *             + 7 P)                         AdamW: weight, gradient, m, v
 *                                            read, weight, m, v written */
static void count_work(const wl_data *w, size_t T, variant v, double *flops,
                       double *bytes)
{
    double d_in = (double)w->s.d, d_out = (double)w->s.d, t = (double)T;
    double R = (double)w->R, E = (double)w->E;
    double G = (double)w->s.groups, M = (double)w->s.per_group;
    double rows = v == VARIANT_MERGED ? 1.0 : t;
    double pooled = v == VARIANT_MERGED ? d_in : 0.0;
    /* W0's bytes per weight as stored (--dtype). */
    double w0b = w->w0_dtype == ATMOE_DTYPE_Q8
                     ? (double)ATMOE_Q8_BLOCK_BYTES / ATMOE_Q8_BLOCK
                     : (double)atmoe_dtype_size(w->w0_dtype);
    if (w->s.r1) {
        double r1 = (double)w->s.r1, r2 = (double)w->s.r2;
        *flops = 2.0 * t * d_in * d_out + t * d_out +
                 2.0 * t * (r1 * d_in + r1 * r2 + r2 * d_out) +
                 2.0 * rows * d_in * E + 4.0 * rows * E;
        *bytes = (w0b - 4.0) * d_out * d_in +
                 4.0 * (d_out * d_in + d_out + r1 * d_in + d_out * r2 +
                        E * d_in + E + t * (d_in + d_out) + rows * E + pooled);
        return;
    }
    *flops = 2.0 * t * d_in * d_out + 2.0 * t * R * (d_in + d_out) + t * R +
             2.0 * rows * d_in * G * (1.0 + M);
    *bytes = w0b * d_out * d_in +
             4.0 * (R * (d_in + d_out) + d_in * G * (1.0 + M) +
                    t * (d_in + d_out) + rows * E + pooled);
    if (w->s.train) {
        double P = R * (d_in + d_out) + d_in * G * (1.0 + M);
        *flops += 3.0 * t * d_out + 4.0 * t * R * d_out + 2.0 * t * R +
                  2.0 * t * R * d_in + 2.0 * t * d_in * G * (1.0 + M) +
                  12.0 * P;
        *bytes += 4.0 * (t * d_out + t * (d_in + d_out) + 8.0 * P);
    }
}

/* ------------------------------------------------------------------------ */
/* The variants as graphs                                                    */
/* ------------------------------------------------------------------------ */

typedef struct built {
    atmoe_graph *g;
    atmoe_node x, h, y; /* h: ATMOE_NODE_NONE unless merged */
    atmoe_node sb;      /* T-REX's intuition score, else ATMOE_NODE_NONE */
    atmoe_node target, loss; /* train-step, else ATMOE_NODE_NONE */
} built;

#define TRY(call)                                                            \
    do {                                                                     \
        if ((st = (call)) != ATMOE_STATUS_OK)                                \
            goto fail;                                                       \
    } while (0)

/* W0 as stored for the fused mixture, which reads f16 and bf16 as they
 * are; in f32 for graphs of matmul nodes. */
static atmoe_tensor *w0_stored(const wl_data *w)
{
    return w->tw0s ? w->tw0s : w->tw0;
}

static atmoe_status add_weights(atmoe_graph *g, const wl_data *w, int stored,
                                atmoe_node *w0, atmoe_node *wg,
                                atmoe_node *wd)
{
    atmoe_status st = atmoe_graph_parameter(g, "w0",
                                            stored ? w0_stored(w) : w->tw0,
                                            w0);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_graph_parameter(g, "w_g", w->twg, wg);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_graph_parameter(g, "w_d", w->twd, wd);
    return st;
}

/* fused: the AT-MoE layer, each token routed by its own hidden state. */
static atmoe_status build_fused(atmoe_graph *g, const wl_data *w, size_t T,
                                built *b)
{
    atmoe_status st;
    size_t xs[2] = {T, w->s.d};
    atmoe_layer layer = {ATMOE_NODE_NONE, ATMOE_NODE_NONE, w->set, w->router,
                         ATMOE_NODE_NONE, ATMOE_NODE_NONE, ATMOE_NODE_NONE,
                         ATMOE_NODE_NONE, MIX_C};
    TRY(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &b->x));
    TRY(add_weights(g, w, 1, &layer.w0, &layer.w_g, &layer.w_d));
    if (w->s.train) {
        TRY(atmoe_graph_set_trainable(g, layer.w_g, 1));
        TRY(atmoe_graph_set_trainable(g, layer.w_d, 1));
    }
    TRY(atmoe_graph_moe_layer(g, b->x, &layer, &b->y, NULL));
fail:
    return st;
}

/* merged: one router row (a pooled embedding h) gates every token; the
 * mixture folds the experts into W0 (mode ALWAYS), or, as the reference
 * the merged run is checked against, runs them unmerged (NEVER). */
static atmoe_status build_merged(atmoe_graph *g, const wl_data *w, size_t T,
                                 atmoe_merge mode, built *b)
{
    atmoe_status st;
    size_t xs[2] = {T, w->s.d}, hs[2] = {1, w->s.d};
    atmoe_node w0, wg, wd, gates;
    TRY(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &b->x));
    TRY(atmoe_graph_input(g, "h", ATMOE_DTYPE_F32, 2, hs, 0, &b->h));
    TRY(add_weights(g, w, 1, &w0, &wg, &wd));
    TRY(atmoe_graph_router(g, b->h, w->router, wg, wd, NULL, NULL, &gates));
    TRY(atmoe_graph_mixture(g, b->x, w0, ATMOE_NODE_NONE, w->set,
                            ATMOE_MIX_BLOCK, gates, ATMOE_NODE_NONE, MIX_C,
                            &b->y));
    TRY(atmoe_graph_mixture_set_merge(g, b->y, mode));
fail:
    return st;
}

/* A logit offset that no softmax survives, yet exact in sums with 0. */
#define MASKED_LOGIT 1e30f

/* unfused: the same layer from plain graph operations, as a user of a
 * GEMM library would write it.
 *
 *   a = softmax(x W_G / tau_g)       top-k groups: the other groups' logits
 *                                    pushed to -1e30 before the softmax
 *   d = softmax(reshape(x W_D, T, G, M) / tau_d, last dim)
 *   w = reshape(a[:, :, None] * d, T, E)
 *   y = x W0^T + sum_e ((x A_e^T) * (c s_e w[:, e])) B_e^T
 *
 * Top-k with only these operations: topk gives each token's k group
 * indices; gathering rows of the identity makes them one-hot rows, and a
 * GEMM with k stacked identities scaled by 1e30 sums them into a
 * [T, G] mask of 1e30 (kept) and 0, from which -1e30 is subtracted.  Every
 * step is exact, so the kept logits are untouched. */
static atmoe_status build_unfused(atmoe_graph *g, const wl_data *w, size_t T,
                                  built *b)
{
    atmoe_status st;
    const size_t d = w->s.d, G = w->s.groups, M = w->s.per_group, E = w->E;
    const size_t k = (size_t)w->s.top_k_groups;
    size_t xs[2] = {T, d};
    atmoe_node w0, wg, wd, lg, ld, a, dw, gates, y;
    float *eye = NULL, *stack = NULL, *neg = NULL;
    TRY(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &b->x));
    TRY(add_weights(g, w, 0, &w0, &wg, &wd));
    if (w->s.train) {
        TRY(atmoe_graph_set_trainable(g, wg, 1));
        TRY(atmoe_graph_set_trainable(g, wd, 1));
    }

    TRY(atmoe_graph_matmul(g, b->x, wg, ATMOE_NODE_NONE, 0, &lg));
    if (TAU != 1.0f)
        TRY(atmoe_graph_scale(g, lg, 1.0f / TAU, &lg));
    if (k > 0) {
        atmoe_node idx, flat, onehot, sel, eye_n, stack_n, neg_n, mask, off;
        eye = xcalloc(G * G, sizeof *eye);
        stack = xcalloc(k * G * G, sizeof *stack);
        neg = xcalloc(G, sizeof *neg);
        for (size_t i = 0; i < G; i++) {
            eye[i * G + i] = 1.0f;
            neg[i] = -MASKED_LOGIT;
            for (size_t j = 0; j < k; j++)
                stack[(j * G + i) * G + i] = MASKED_LOGIT;
        }
        size_t es[2] = {G, G}, ss[2] = {k * G, G}, ns[1] = {G};
        size_t fs[1] = {T * k}, os[2] = {T, k * G};
        TRY(atmoe_graph_topk(g, lg, (int)k, -1, NULL, &idx));
        TRY(atmoe_graph_reshape(g, idx, 1, fs, &flat));
        TRY(atmoe_graph_constant(g, "eye", ATMOE_DTYPE_F32, 2, es, eye,
                                 &eye_n));
        TRY(atmoe_graph_gather_rows(g, eye_n, flat, &onehot));
        TRY(atmoe_graph_reshape(g, onehot, 2, os, &sel));
        TRY(atmoe_graph_constant(g, "stack", ATMOE_DTYPE_F32, 2, ss, stack,
                                 &stack_n));
        TRY(atmoe_graph_matmul(g, sel, stack_n, ATMOE_NODE_NONE, 0, &mask));
        TRY(atmoe_graph_constant(g, "neg", ATMOE_DTYPE_F32, 1, ns, neg,
                                 &neg_n));
        TRY(atmoe_graph_add(g, mask, neg_n, &off));
        TRY(atmoe_graph_add(g, lg, off, &lg));
    }
    TRY(atmoe_graph_softmax(g, lg, -1, &a));

    size_t s3[3] = {T, G, M}, a3[3] = {T, G, 1}, s2[2] = {T, E};
    TRY(atmoe_graph_matmul(g, b->x, wd, ATMOE_NODE_NONE, 0, &ld));
    if (TAU != 1.0f)
        TRY(atmoe_graph_scale(g, ld, 1.0f / TAU, &ld));
    TRY(atmoe_graph_reshape(g, ld, 3, s3, &ld));
    TRY(atmoe_graph_softmax(g, ld, -1, &dw));
    TRY(atmoe_graph_reshape(g, a, 3, a3, &a));
    TRY(atmoe_graph_mul(g, a, dw, &gates));
    TRY(atmoe_graph_reshape(g, gates, 2, s2, &gates));

    TRY(atmoe_graph_matmul(g, b->x, w0, ATMOE_NODE_NONE,
                           ATMOE_MATMUL_TRANSPOSE_B, &y));
    for (size_t e = 0; e < E; e++) {
        char name[32];
        atmoe_node ae, be, gate, u, z, ye;
        size_t start[2] = {0, e}, one[2] = {T, 1};
        float s_e = 2.0f; /* alpha / r with alpha = 2 r */
        snprintf(name, sizeof name, "a%zu", e);
        TRY(atmoe_graph_parameter(g, name, w->ta[e], &ae));
        snprintf(name, sizeof name, "b%zu", e);
        TRY(atmoe_graph_parameter(g, name, w->tb[e], &be));
        if (w->s.train) {
            TRY(atmoe_graph_set_trainable(g, ae, 1));
            TRY(atmoe_graph_set_trainable(g, be, 1));
        }
        TRY(atmoe_graph_view(g, gates, start, one, &gate));
        TRY(atmoe_graph_scale(g, gate, MIX_C * s_e, &gate));
        TRY(atmoe_graph_matmul(g, b->x, ae, ATMOE_NODE_NONE,
                               ATMOE_MATMUL_TRANSPOSE_B, &u));
        TRY(atmoe_graph_mul(g, u, gate, &z));
        TRY(atmoe_graph_matmul(g, z, be, ATMOE_NODE_NONE,
                               ATMOE_MATMUL_TRANSPOSE_B, &ye));
        TRY(atmoe_graph_add(g, y, ye, &y));
    }
    b->y = y;
fail:
    free(eye);
    free(stack);
    free(neg);
    return st;
}

/* The T-REX router of SPEC section 4 from graph operations, over router
 * input h (x per token, or a pooled row per sequence):
 *
 *   p     = softmax(h W_r^T)
 *   om    = sigmoid(100 w_om)         1 - om as sigmoid(-100 w_om)
 *   g     = k_r om p + k_s (1 - om) s_b
 *   c     = sigmoid(100 w_c)
 *   gates = c g
 *
 * The main gate c goes into the gates, as atmoe_graph_mixture takes its c
 * as a number and w_c is a weight of the graph: c B (G^T u) = B ((c G)^T u).
 * s_b [1, E] is an input, one score per sequence. */
static atmoe_status build_trex_router(atmoe_graph *g, const wl_data *w,
                                      atmoe_node h, built *b,
                                      atmoe_node *gates)
{
    atmoe_status st;
    size_t ss[2] = {1, w->E};
    atmoe_node wr, wom, wc, logits, p, om, om_c, c, gr, gs, mix;
    TRY(atmoe_graph_input(g, "s_b", ATMOE_DTYPE_F32, 2, ss, 0, &b->sb));
    TRY(atmoe_graph_parameter(g, "w_r", w->twr, &wr));
    TRY(atmoe_graph_parameter(g, "w_om", w->twom, &wom));
    TRY(atmoe_graph_parameter(g, "w_c", w->twc, &wc));
    TRY(atmoe_graph_matmul(g, h, wr, ATMOE_NODE_NONE,
                           ATMOE_MATMUL_TRANSPOSE_B, &logits));
    TRY(atmoe_graph_softmax(g, logits, -1, &p));
    TRY(atmoe_graph_scale(g, wom, 100.0f, &om));
    TRY(atmoe_graph_sigmoid(g, om, &om));
    TRY(atmoe_graph_scale(g, wom, -100.0f, &om_c));
    TRY(atmoe_graph_sigmoid(g, om_c, &om_c));
    TRY(atmoe_graph_mul(g, p, om, &gr));
    TRY(atmoe_graph_scale(g, gr, TREX_K_R, &gr));
    TRY(atmoe_graph_mul(g, b->sb, om_c, &gs));
    TRY(atmoe_graph_scale(g, gs, TREX_K_S, &gs));
    TRY(atmoe_graph_add(g, gr, gs, &mix));
    TRY(atmoe_graph_scale(g, wc, 100.0f, &c));
    TRY(atmoe_graph_sigmoid(g, c, &c));
    TRY(atmoe_graph_mul(g, mix, c, gates));
fail:
    return st;
}

/* mor1e unfused: the router per token, then the dense mixture; merged: the
 * router on the pooled row h, its single gate row folded into W0 (or not,
 * for the reference). */
static atmoe_status build_trex_mixture(atmoe_graph *g, const wl_data *w,
                                       size_t T, int merged, atmoe_merge mode,
                                       built *b)
{
    atmoe_status st;
    size_t xs[2] = {T, w->s.d}, hs[2] = {1, w->s.d};
    atmoe_node w0, bias, gates;
    TRY(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &b->x));
    if (merged)
        TRY(atmoe_graph_input(g, "h", ATMOE_DTYPE_F32, 2, hs, 0, &b->h));
    TRY(atmoe_graph_parameter(g, "w0", w0_stored(w), &w0));
    TRY(atmoe_graph_parameter(g, "bias", w->tbias, &bias));
    TRY(build_trex_router(g, w, merged ? b->h : b->x, b, &gates));
    TRY(atmoe_graph_mixture(g, b->x, w0, bias, w->set, ATMOE_MIX_DENSE, gates,
                            ATMOE_NODE_NONE, 1.0f, &b->y));
    if (merged)
        TRY(atmoe_graph_mixture_set_merge(g, b->y, mode));
fail:
    return st;
}

/* mor1e fused: the library's rank-1 expert layer (atmoe_graph_mor1e_layer):
 * the router's logits in the shrink's pass over x, one kernel for the
 * router and the mix, then the base projection with the expand. */
static atmoe_status build_trex_layer(atmoe_graph *g, const wl_data *w,
                                     size_t T, built *b)
{
    atmoe_status st;
    size_t xs[2] = {T, w->s.d}, ss[2] = {1, w->E};
    atmoe_mor1e_layer L;
    memset(&L, 0, sizeof L);
    TRY(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &b->x));
    TRY(atmoe_graph_input(g, "s_b", ATMOE_DTYPE_F32, 2, ss, 0, &b->sb));
    TRY(atmoe_graph_parameter(g, "w0", w0_stored(w), &L.w0));
    TRY(atmoe_graph_parameter(g, "bias", w->tbias, &L.bias));
    TRY(atmoe_graph_parameter(g, "a", w->tda, &L.a));
    TRY(atmoe_graph_parameter(g, "b", w->tdb, &L.b));
    TRY(atmoe_graph_parameter(g, "w_r", w->twr, &L.w_r));
    TRY(atmoe_graph_parameter(g, "w_om", w->twom, &L.w_om));
    TRY(atmoe_graph_parameter(g, "w_c", w->twc, &L.w_c));
    L.scores = b->sb;
    L.score_map = ATMOE_NODE_NONE;
    L.gate_index = ATMOE_NODE_NONE;
    L.variant = ATMOE_MOR1E_V2;
    L.routing = ATMOE_MOR1E_ROUTE_BOTH;
    L.k_router = TREX_K_R;
    L.k_intuition = TREX_K_S;
    L.top_k = 0;
    TRY(atmoe_graph_mor1e_layer(g, b->x, &L, &b->y, NULL));
fail:
    return st;
}

/* Builds and plans one variant's graph.  merge picks the merged variant's
 * path (ALWAYS for the timed run, NEVER for its reference). */
static int build(atmoe_context *ctx, const wl_data *w, size_t T, variant v,
                 atmoe_merge merge, built *b)
{
    memset(b, 0, sizeof *b);
    b->h = b->sb = b->target = b->loss = ATMOE_NODE_NONE;
    atmoe_status st = atmoe_graph_new(ctx, &b->g);
    if (st != ATMOE_STATUS_OK)
        return lib_error(ctx, st, "creating a graph");
    if (w->s.r1 && v == VARIANT_FUSED)
        st = build_trex_layer(b->g, w, T, b);
    else if (w->s.r1 && v == VARIANT_UNFUSED)
        st = build_trex_mixture(b->g, w, T, 0, ATMOE_MERGE_NEVER, b);
    else if (w->s.r1)
        st = build_trex_mixture(b->g, w, T, v == VARIANT_MERGED, merge, b);
    else if (v == VARIANT_FUSED)
        st = build_fused(b->g, w, T, b);
    else if (v == VARIANT_UNFUSED)
        st = build_unfused(b->g, w, T, b);
    else
        st = build_merged(b->g, w, T, merge, b);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_graph_mark_output(b->g, b->y);
    if (st == ATMOE_STATUS_OK && w->s.train) {
        /* The loss and every trainable weight's gradient. */
        size_t ts[2] = {T, w->s.d};
        st = atmoe_graph_input(b->g, "target", ATMOE_DTYPE_F32, 2, ts, 0,
                               &b->target);
        if (st == ATMOE_STATUS_OK)
            st = atmoe_graph_loss_mse(b->g, b->y, b->target, &b->loss);
        if (st == ATMOE_STATUS_OK)
            st = atmoe_graph_backward(b->g, b->loss);
    }
    if (st != ATMOE_STATUS_OK) {
        lib_error(ctx, st, "building the graph");
        atmoe_graph_free(b->g);
        b->g = NULL;
        return -1;
    }
    if ((st = atmoe_graph_plan(b->g, 0)) != ATMOE_STATUS_OK) {
        lib_error(ctx, st, "planning the graph");
        atmoe_graph_free(b->g);
        b->g = NULL;
        return -1;
    }
    return 0;
}

static int set_inputs(atmoe_context *ctx, const wl_data *w, size_t T,
                      const built *b)
{
    atmoe_status st = atmoe_graph_set_input(
        b->g, b->x, w->x, T * w->s.d * sizeof(float), 0);
    if (st == ATMOE_STATUS_OK && b->h != ATMOE_NODE_NONE)
        st = atmoe_graph_set_input(b->g, b->h, w->h, w->s.d * sizeof(float),
                                   0);
    if (st == ATMOE_STATUS_OK && b->sb != ATMOE_NODE_NONE)
        st = atmoe_graph_set_input(b->g, b->sb, w->sb, w->E * sizeof(float),
                                   0);
    if (st == ATMOE_STATUS_OK && b->target != ATMOE_NODE_NONE)
        st = atmoe_graph_set_input(b->g, b->target, w->target,
                                   T * w->s.d * sizeof(float), 0);
    return st == ATMOE_STATUS_OK ? 0 : lib_error(ctx, st, "setting inputs");
}

static int compute_once(atmoe_context *ctx, atmoe_graph *g)
{
    atmoe_status st = atmoe_graph_compute(g, 0);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_context_finish(ctx);
    return st == ATMOE_STATUS_OK ? 0 : lib_error(ctx, st, "computing");
}

static int read_output(atmoe_context *ctx, const built *b, float *y,
                       size_t count)
{
    atmoe_status st = atmoe_graph_read(b->g, b->y, y, count * sizeof(float));
    return st == ATMOE_STATUS_OK ? 0 : lib_error(ctx, st, "reading y");
}

/* A training step of train-step: the compute (forward and backward), the
 * loss read back as a training loop reads it, and the AdamW step (which
 * waits for the gradient norm), finished. */
static int train_once(atmoe_context *ctx, const built *b,
                      atmoe_optimizer *opt)
{
    float loss = NAN;
    atmoe_status st = atmoe_graph_compute(b->g, 0);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_graph_read(b->g, b->loss, &loss, sizeof loss);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_optimizer_step(opt, loss, NULL);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_context_finish(ctx);
    return st == ATMOE_STATUS_OK ? 0 : lib_error(ctx, st, "a training step");
}

/* The weights a training step moves, uploaded again from the host: the
 * router's (every variant's) and the unfused experts' (the fused ones are
 * the set's own copy, which only the fused variant uses). */
static int restore_weights(atmoe_context *ctx, const wl_data *w)
{
    size_t d = w->s.d, G = w->s.groups, GM = G * w->s.per_group;
    atmoe_status st = atmoe_tensor_write(w->twg, w->wg, d * G * sizeof(float));
    if (st == ATMOE_STATUS_OK)
        st = atmoe_tensor_write(w->twd, w->wd, d * GM * sizeof(float));
    for (size_t e = 0; st == ATMOE_STATUS_OK && e < w->E; e++) {
        st = atmoe_tensor_write(w->ta[e], w->a[e],
                                w->rank[e] * d * sizeof(float));
        if (st == ATMOE_STATUS_OK)
            st = atmoe_tensor_write(w->tb[e], w->b[e],
                                    d * w->rank[e] * sizeof(float));
    }
    return st == ATMOE_STATUS_OK ? 0
                                 : lib_error(ctx, st, "restoring weights");
}

/* ------------------------------------------------------------------------ */
/* Parameters                                                                */
/* ------------------------------------------------------------------------ */

/* The mode of the parameters ctx runs with (atmoe_context_get_params),
 * and whether any tuned set is in force. */
static int params_mode(const atmoe_context *ctx, char *mode, size_t size)
{
    char text[16384];
    size_t need;
    snprintf(mode, size, "unknown");
    if (atmoe_context_get_params(ctx, text, sizeof text, &need) !=
        ATMOE_STATUS_OK)
        return 0;
    json_t *root = json_loads(text, 0, NULL);
    const char *m = json_string_value(json_object_get(root, "mode"));
    if (m)
        snprintf(mode, size, "%s", m);
    int sets = json_object_size(json_object_get(root, "clblast")) +
               json_object_size(json_object_get(root, "kernels")) > 0;
    json_decref(root);
    return sets;
}

/* ------------------------------------------------------------------------ */
/* Options                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct options {
    const char *device;
    int selected[N_WORKLOADS];
    int full;
    int reps, warmup;
    const char *json, *csv;
    int peer;         /* --peer torch */
    const char *plot; /* --plot FILE */
    const char *params; /* --params tuned|default, or NULL */
    atmoe_dtype w0_dtype; /* --dtype */
    int profile;      /* --profile N: the top N nodes of each fused run */
} options;

static void usage(FILE *f)
{
    fprintf(f,
        "usage: " PROGRAM " [OPTIONS]\n"
        "\n"
        "Runs the canonical workloads of the AT-MoE layer on a device and\n"
        "compares them with the device's own ceilings (read bandwidth, FP32\n"
        "FMA rate, launch cost), measured first by micro-kernels.\n"
        "\n"
        "options:\n"
        "  --device D           a device selection (an index, gpu, cpu, or\n"
        "                       part of a name), or \"all\" for every device\n"
        "                       side by side; default: the default device\n"
        "  --workload W[,W...]  workloads to run (default: all that are\n"
        "                       available but the recipe-* step loops)\n"
        "  --scale small|full   d = 1024 (default) or d = 4096 as in the SPEC\n"
        "  --reps N             timed repetitions per run (default 5)\n"
        "  --warmup N           untimed repetitions before them (default 2)\n"
        "  --json FILE          write the results as JSON (atomically)\n"
        "  --csv FILE           write the results as CSV (atomically)\n"
        "  --peer torch         also run every workload in PyTorch (the\n"
        "                       variant torch; needs python3-torch)\n"
        "  --plot FILE          draw a roofline and bars of the median times\n"
        "                       into FILE.svg or FILE.png (needs gnuplot)\n"
        "  --dtype f32|bf16|f16|q8  how the fused and merged variants store\n"
        "                       W0 (q8: 8-bit blocks, AT-MoE workloads only)\n"
        "                       (default f32); every variant computes with\n"
        "                       its values, the floor counts its bytes\n"
        "  --params tuned|default  the tuning databases' kernel parameters\n"
        "                       (default) or CLBlast's built-in ones: run\n"
        "                       once with each to compare them\n"
        "  --profile N          after each fused run, one more compute (or\n"
        "                       training step) with per-node profiling: its\n"
        "                       N costliest nodes, their share of the step,\n"
        "                       FLOPs and bytes\n"
        "  --list-devices       list the OpenCL devices and exit\n"
        "  --check-json FILE    check that FILE holds every field of the JSON\n"
        "                       contract and exit (0 when it does)\n"
        "  --help               show this text\n"
        "\n"
        "workloads:\n");
    for (size_t i = 0; i < N_WORKLOADS; i++)
        fprintf(f, "  %-13s %s%s\n", workloads[i].name, workloads[i].summary,
                workloads[i].implemented ? "" : " (not available yet)");
    fprintf(f,
        "\n"
        "variants: fused (atmoe_graph_moe_layer; for mor1e\n"
        "atmoe_graph_mor1e_layer), unfused (a GEMM per base and two per\n"
        "expert, the router from matmul and softmax nodes; for mor1e the\n"
        "router from graph operations and the dense mixture), merged (one gate row per sequence,\n"
        "experts folded into W0 every compute), torch (--peer torch: the\n"
        "same layer in PyTorch on the same weights, as many threads as the\n"
        "device has compute units).\n"
        "\n"
        "environment: ATMOE_BENCH_DATADIR, the directory of " CEILINGS_FILE
        " and\n" PEER_SCRIPT " (default " ATMOE_BENCH_DATADIR ");\n"
        "ATMOE_BENCH_PYTHON, the peer's Python (default " DEFAULT_PYTHON ");\n"
        "ATMOE_BENCH_GNUPLOT, gnuplot (default: gnuplot in PATH);\n"
        "ATMOE_DEVICE, the default device; POCL_AFFINITY (read, never set:\n"
        "1 pins PoCL's worker threads to cores).\n"
        "\n"
        "exit status: 0 success, 1 a run or an output failed, 2 usage.\n");
}

static int parse_count(const char *opt, const char *text, int min, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < min || v > 1000000) {
        fprintf(stderr, PROGRAM ": %s wants a whole number >= %d, not '%s'\n",
                opt, min, text);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_workloads(const char *list, int *selected)
{
    memset(selected, 0, N_WORKLOADS * sizeof *selected);
    char *copy = strdup(list);
    if (copy == NULL)
        return -1;
    int rc = 0, any = 0;
    char *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t;
         t = strtok_r(NULL, ",", &save)) {
        size_t i = 0;
        while (i < N_WORKLOADS && strcmp(t, workloads[i].name) != 0)
            i++;
        if (i == N_WORKLOADS) {
            fprintf(stderr, PROGRAM ": unknown workload '%s' (known:", t);
            for (size_t j = 0; j < N_WORKLOADS; j++)
                fprintf(stderr, " %s", workloads[j].name);
            fprintf(stderr, ")\n");
            rc = -1;
            break;
        }
        if (!workloads[i].implemented) {
            fprintf(stderr, PROGRAM ": workload %s is not available yet\n",
                    t);
            rc = -1;
            break;
        }
        selected[i] = 1;
        any = 1;
    }
    if (rc == 0 && !any) {
        fprintf(stderr, PROGRAM ": --workload needs at least one name\n");
        rc = -1;
    }
    free(copy);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Output files, written atomically                                          */
/* ------------------------------------------------------------------------ */

typedef int (*writer_fn)(FILE *f, void *arg);

/* Writes path through a temporary file in the same directory and a rename,
 * so that a reader never sees half a file.  fn NULL only checks that the
 * file could be written (the temporary file is removed). */
static int write_atomic(const char *path, writer_fn fn, void *arg)
{
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
        return set_error("%s is a directory", path);
    size_t len = strlen(path);
    char *tmp = xcalloc(len + 16, 1);
    snprintf(tmp, len + 16, "%s.tmp-XXXXXX", path);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        set_error("cannot create a file beside %s: %s", path,
                  strerror(errno));
        free(tmp);
        return -1;
    }
    FILE *f = fdopen(fd, "w");
    if (f == NULL) {
        set_error("%s: %s", tmp, strerror(errno));
        close(fd);
        unlink(tmp);
        free(tmp);
        return -1;
    }
    int rc = 0;
    if (fn == NULL) {
        fclose(f);
        unlink(tmp);
        free(tmp);
        return 0;
    }
    if (fchmod(fd, file_mode) != 0 || fn(f, arg) != 0 || fflush(f) != 0 ||
        ferror(f) || fsync(fd) != 0)
        rc = set_error("writing %s: %s", path,
                       errno ? strerror(errno) : "write error");
    if (fclose(f) != 0 && rc == 0)
        rc = set_error("writing %s: %s", path, strerror(errno));
    if (rc == 0 && rename(tmp, path) != 0)
        rc = set_error("renaming %s to %s: %s", tmp, path, strerror(errno));
    if (rc != 0)
        unlink(tmp);
    free(tmp);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Ceilings: our own micro-kernels on plain OpenCL                           */
/* ------------------------------------------------------------------------ */

static const char *cl_error_name(cl_int err)
{
    switch (err) {
    case CL_DEVICE_NOT_FOUND: return "CL_DEVICE_NOT_FOUND";
    case CL_MEM_OBJECT_ALLOCATION_FAILURE:
        return "CL_MEM_OBJECT_ALLOCATION_FAILURE";
    case CL_OUT_OF_RESOURCES: return "CL_OUT_OF_RESOURCES";
    case CL_OUT_OF_HOST_MEMORY: return "CL_OUT_OF_HOST_MEMORY";
    case CL_BUILD_PROGRAM_FAILURE: return "CL_BUILD_PROGRAM_FAILURE";
    case CL_INVALID_VALUE: return "CL_INVALID_VALUE";
    case CL_INVALID_BUFFER_SIZE: return "CL_INVALID_BUFFER_SIZE";
    case CL_INVALID_WORK_GROUP_SIZE: return "CL_INVALID_WORK_GROUP_SIZE";
    case CL_INVALID_KERNEL_ARGS: return "CL_INVALID_KERNEL_ARGS";
    default: return "an OpenCL error";
    }
}

static int cl_fail(cl_int err, const char *what)
{
    return set_error("%s failed: %s (%d)", what, cl_error_name(err),
                     (int)err);
}

/* The cl_device_id behind the library's device index.  The library does
 * not hand out its OpenCL handles, so we walk platforms and devices in its
 * order and check that the name agrees. */
static int find_cl_device(const atmoe_device_info *info, cl_device_id *out)
{
    cl_platform_id platforms[16];
    cl_uint nplat = 0;
    cl_int err = clGetPlatformIDs(16, platforms, &nplat);
    if (err != CL_SUCCESS)
        return cl_fail(err, "clGetPlatformIDs");
    size_t index = 0;
    for (cl_uint p = 0; p < nplat && p < 16; p++) {
        cl_device_id ids[64];
        cl_uint n = 0;
        if (clGetDeviceIDs(platforms[p], CL_DEVICE_TYPE_ALL, 64, ids, &n) !=
            CL_SUCCESS)
            continue;
        for (cl_uint i = 0; i < n && i < 64; i++, index++) {
            if (index != info->index)
                continue;
            char name[256] = "";
            clGetDeviceInfo(ids[i], CL_DEVICE_NAME, sizeof name - 1, name,
                            NULL);
            if (strcmp(name, info->raw_name) != 0)
                return set_error("OpenCL device %zu is '%s', the library's "
                                 "is '%s'", index, name, info->raw_name);
            *out = ids[i];
            return 0;
        }
    }
    return set_error("OpenCL device %zu not found", info->index);
}

/* The text of the ceiling kernels, or NULL with errbuf set. */
static char *load_ceilings_source(void)
{
    char *path = find_data_file(CEILINGS_FILE);
    if (path == NULL)
        return NULL;
    FILE *f = fopen(path, "rb");
    char *src = NULL;
    long size;
    if (f && fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) >= 0 &&
        fseek(f, 0, SEEK_SET) == 0) {
        src = xcalloc((size_t)size + 1, 1);
        if (fread(src, 1, (size_t)size, f) != (size_t)size) {
            free(src);
            src = NULL;
        }
    }
    if (f)
        fclose(f);
    if (src == NULL)
        set_error("cannot read %s", path);
    free(path);
    return src;
}

typedef struct cl_env {
    cl_device_id dev;
    cl_context cx;
    cl_command_queue q;
    const char *src;
} cl_env;

static int build_program(const cl_env *env, const char *flags,
                         cl_program *out)
{
    cl_int err;
    const char *src = env->src;
    cl_program p = clCreateProgramWithSource(env->cx, 1, &src, NULL, &err);
    if (err != CL_SUCCESS)
        return cl_fail(err, "clCreateProgramWithSource");
    err = clBuildProgram(p, 1, &env->dev, flags, NULL, NULL);
    if (err != CL_SUCCESS) {
        char log[1024] = "";
        clGetProgramBuildInfo(p, env->dev, CL_PROGRAM_BUILD_LOG,
                              sizeof log - 1, log, NULL);
        clReleaseProgram(p);
        return set_error("building " CEILINGS_FILE " (%s) failed: %s",
                         flags, log);
    }
    *out = p;
    return 0;
}

/* Runs a kernel and returns its device time in seconds (profiling
 * events). */
static int run_timed(const cl_env *env, cl_kernel k, size_t global,
                     const size_t *local, double *seconds)
{
    cl_event ev;
    cl_int err = clEnqueueNDRangeKernel(env->q, k, 1, NULL, &global, local, 0,
                                        NULL, &ev);
    if (err != CL_SUCCESS)
        return cl_fail(err, "clEnqueueNDRangeKernel");
    err = clWaitForEvents(1, &ev);
    cl_ulong t0 = 0, t1 = 0;
    if (err == CL_SUCCESS)
        err = clGetEventProfilingInfo(ev, CL_PROFILING_COMMAND_START,
                                      sizeof t0, &t0, NULL);
    if (err == CL_SUCCESS)
        err = clGetEventProfilingInfo(ev, CL_PROFILING_COMMAND_END,
                                      sizeof t1, &t1, NULL);
    clReleaseEvent(ev);
    if (err != CL_SUCCESS)
        return cl_fail(err, "timing a kernel");
    *seconds = 1e-9 * (double)(t1 - t0);
    return 0;
}

/* The largest cache in front of the device's memory: the driver's word
 * for it, or for a CPU device the host's last-level cache (CPU drivers
 * such as PoCL report none). */
static uint64_t device_cache_bytes(const cl_env *env,
                                   const atmoe_device_info *info)
{
    cl_ulong cache = 0;
    clGetDeviceInfo(env->dev, CL_DEVICE_GLOBAL_MEM_CACHE_SIZE, sizeof cache,
                    &cache, NULL);
    uint64_t bytes = cache;
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    if (info->type == ATMOE_DEVICE_TYPE_CPU) {
        long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
        long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
        if (l2 > 0 && (uint64_t)l2 > bytes)
            bytes = (uint64_t)l2;
        if (l3 > 0 && (uint64_t)l3 > bytes)
            bytes = (uint64_t)l3;
    }
#endif
    return bytes;
}

/* Read bandwidth over a buffer of at least 256 MiB and four times the
 * largest cache, so that it streams from memory (within half the device's
 * memory and its largest allocation).  Two shapes of the same kernel,
 * work-groups of 256 (a GPU's coalesced reads) and of 1 (a CPU's streams):
 * the best of 5 runs of the faster one. */
static int measure_read(const cl_env *env, const atmoe_device_info *info,
                        ceilings *c)
{
    uint64_t bytes = (uint64_t)256 << 20;
    uint64_t cache = device_cache_bytes(env, info);
    if (4 * cache > bytes)
        bytes = 4 * cache;
    uint64_t cap = info->max_alloc_bytes;
    if (info->global_mem_bytes / 2 < cap)
        cap = info->global_mem_bytes / 2;
    if (bytes > cap)
        bytes = cap;
    size_t locals[2] = {info->max_work_group_size < 256
                            ? info->max_work_group_size
                            : 256,
                        1};
    size_t groups = 8 * (info->compute_units ? info->compute_units : 1);
    uint64_t per_group = bytes / 16 / groups;
    per_group -= per_group % (4 * locals[0]);
    if (per_group == 0)
        return set_error("device memory too small for the read test");
    bytes = per_group * groups * 16;

    cl_int err;
    int rc = -1;
    cl_program p = NULL;
    cl_kernel k = NULL;
    cl_mem src = clCreateBuffer(env->cx, CL_MEM_READ_ONLY, bytes, NULL, &err);
    if (err != CL_SUCCESS)
        return cl_fail(err, "clCreateBuffer (read test)");
    cl_mem out = clCreateBuffer(env->cx, CL_MEM_WRITE_ONLY,
                                groups * locals[0] * sizeof(float), NULL,
                                &err);
    if (err != CL_SUCCESS) {
        clReleaseMemObject(src);
        return cl_fail(err, "clCreateBuffer (read test)");
    }
    float one = 1.0f;
    if ((err = clEnqueueFillBuffer(env->q, src, &one, sizeof one, 0, bytes, 0,
                                   NULL, NULL)) != CL_SUCCESS ||
        (err = clFinish(env->q)) != CL_SUCCESS) {
        cl_fail(err, "clEnqueueFillBuffer");
        goto done;
    }
    if (build_program(env, "-DVEC=4", &p))
        goto done;
    k = clCreateKernel(p, "read_bandwidth", &err);
    cl_ulong pg = per_group;
    if (err != CL_SUCCESS ||
        (err = clSetKernelArg(k, 0, sizeof src, &src)) != CL_SUCCESS ||
        (err = clSetKernelArg(k, 1, sizeof pg, &pg)) != CL_SUCCESS ||
        (err = clSetKernelArg(k, 2, sizeof out, &out)) != CL_SUCCESS) {
        cl_fail(err, "setting up read_bandwidth");
        goto done;
    }
    /* Probes over a sixteenth of the buffer pick the shape (the wrong one
     * can be 30 times slower), twice each in turn so that neither gains
     * from the cache the other filled; then the whole buffer is timed. */
    double best = INFINITY, t;
    size_t local = locals[0];
    cl_ulong probe = per_group / 16 - per_group / 16 % (4 * locals[0]);
    if (probe > 0 &&
        (err = clSetKernelArg(k, 1, sizeof probe, &probe)) != CL_SUCCESS) {
        cl_fail(err, "clSetKernelArg(read_bandwidth)");
        goto done;
    }
    for (int l = 0; l < 4 && probe > 0; l++) {
        if (run_timed(env, k, groups * locals[l % 2], &locals[l % 2], &t))
            goto done;
        if (t < best) {
            best = t;
            local = locals[l % 2];
        }
    }
    if ((err = clSetKernelArg(k, 1, sizeof pg, &pg)) != CL_SUCCESS) {
        cl_fail(err, "clSetKernelArg(read_bandwidth)");
        goto done;
    }
    best = INFINITY;
    for (int i = 0; i < 6; i++) {
        if (run_timed(env, k, groups * local, &local, &t))
            goto done;
        if (i > 0 && t < best) /* the first run warms up */
            best = t;
    }
    c->read_gbs = (double)bytes / best * 1e-9;
    c->read_mib = (double)bytes / (1 << 20);
    c->cache_mib = (double)cache / (1 << 20);
    rc = 0;
done:
    if (k)
        clReleaseKernel(k);
    if (p)
        clReleaseProgram(p);
    clReleaseMemObject(src);
    clReleaseMemObject(out);
    return rc;
}

/* The FP32 FMA rate: the kernel at every vector width, its iteration count
 * grown until a run takes 20 ms, the best of 3 runs of the best width. */
static int measure_fma(const cl_env *env, const atmoe_device_info *info,
                       ceilings *c)
{
    static const int widths[] = {1, 2, 4, 8, 16};
    size_t global = 2048 * (size_t)(info->compute_units ? info->compute_units
                                                        : 1);
    if (global < 8192)
        global = 8192;
    cl_int err;
    cl_mem out = clCreateBuffer(env->cx, CL_MEM_WRITE_ONLY,
                                global * 16 * sizeof(float), NULL, &err);
    if (err != CL_SUCCESS)
        return cl_fail(err, "clCreateBuffer (FMA test)");
    int rc = 0;
    c->gflops = 0.0;
    for (size_t wi = 0; wi < sizeof widths / sizeof widths[0] && rc == 0;
         wi++) {
        char opts[32];
        snprintf(opts, sizeof opts, "-DVEC=%d", widths[wi]);
        cl_program p;
        if (build_program(env, opts, &p)) {
            rc = -1;
            break;
        }
        cl_kernel k = clCreateKernel(p, "fma_peak", &err);
        cl_int iters = 64;
        float m = 0.9999f, add = 1e-4f;
        if (err != CL_SUCCESS ||
            (err = clSetKernelArg(k, 0, sizeof out, &out)) != CL_SUCCESS ||
            (err = clSetKernelArg(k, 2, sizeof m, &m)) != CL_SUCCESS ||
            (err = clSetKernelArg(k, 3, sizeof add, &add)) != CL_SUCCESS)
            rc = cl_fail(err, "setting up fma_peak");
        double t = 0.0;
        while (rc == 0) {
            if ((err = clSetKernelArg(k, 1, sizeof iters, &iters)) !=
                CL_SUCCESS) {
                rc = cl_fail(err, "clSetKernelArg(fma_peak)");
                break;
            }
            if ((rc = run_timed(env, k, global, NULL, &t)) != 0)
                break;
            if (t >= 0.02 || iters >= (1 << 24))
                break;
            double grow = t > 0.0 ? 0.03 / t : 16.0;
            iters = (cl_int)((double)iters * (grow < 2.0    ? 2.0
                                              : grow > 16.0 ? 16.0
                                                            : grow));
        }
        for (int r = 0; r < 3 && rc == 0; r++) {
            if ((rc = run_timed(env, k, global, NULL, &t)) != 0)
                break;
            double gf = 16.0 * widths[wi] * (double)iters * (double)global /
                        t * 1e-9;
            if (gf > c->gflops) {
                c->gflops = gf;
                c->fma_vec = widths[wi];
            }
        }
        if (k)
            clReleaseKernel(k);
        clReleaseProgram(p);
    }
    clReleaseMemObject(out);
    return rc;
}

/* Launch cost of an empty kernel: back to back in a queue (what a graph of
 * many nodes pays per node) and with a wait after each (what one compute
 * and finish pays once). */
static int measure_launch(const cl_env *env, ceilings *c)
{
    cl_int err;
    cl_program p;
    if (build_program(env, "-DVEC=4", &p))
        return -1;
    cl_mem out = clCreateBuffer(env->cx, CL_MEM_WRITE_ONLY, sizeof(float),
                                NULL, &err);
    if (err != CL_SUCCESS) {
        clReleaseProgram(p);
        return cl_fail(err, "clCreateBuffer (launch test)");
    }
    int rc = 0;
    cl_kernel k = clCreateKernel(p, "empty_kernel", &err);
    if (err == CL_SUCCESS)
        err = clSetKernelArg(k, 0, sizeof out, &out);
    size_t one = 1;
    const int back_to_back = 500, waited = 100;
    for (int i = 0; i < 20 && err == CL_SUCCESS; i++)
        err = clEnqueueNDRangeKernel(env->q, k, 1, NULL, &one, &one, 0, NULL,
                                     NULL);
    if (err == CL_SUCCESS)
        err = clFinish(env->q);
    double t0 = now_s();
    for (int i = 0; i < back_to_back && err == CL_SUCCESS; i++)
        err = clEnqueueNDRangeKernel(env->q, k, 1, NULL, &one, &one, 0, NULL,
                                     NULL);
    if (err == CL_SUCCESS)
        err = clFinish(env->q);
    double t1 = now_s();
    for (int i = 0; i < waited && err == CL_SUCCESS; i++) {
        err = clEnqueueNDRangeKernel(env->q, k, 1, NULL, &one, &one, 0, NULL,
                                     NULL);
        if (err == CL_SUCCESS)
            err = clFinish(env->q);
    }
    double t2 = now_s();
    if (err != CL_SUCCESS)
        rc = cl_fail(err, "launching empty_kernel");
    c->launch_us = (t1 - t0) / back_to_back * 1e6;
    c->sync_us = (t2 - t1) / waited * 1e6;
    if (k)
        clReleaseKernel(k);
    clReleaseMemObject(out);
    clReleaseProgram(p);
    return rc;
}

/* Blocking copies of 64 MiB between ordinary host memory and the device:
 * the best of 3 each way. */
static int measure_transfers(const cl_env *env, const atmoe_device_info *info,
                             ceilings *c)
{
    size_t bytes = (size_t)64 << 20;
    if (bytes > info->max_alloc_bytes / 2)
        bytes = (size_t)(info->max_alloc_bytes / 2);
    cl_int err;
    cl_mem buf = clCreateBuffer(env->cx, CL_MEM_READ_WRITE, bytes, NULL, &err);
    if (err != CL_SUCCESS)
        return cl_fail(err, "clCreateBuffer (transfer test)");
    unsigned char *host = xcalloc(bytes, 1);
    memset(host, 1, bytes);
    double best_w = INFINITY, best_r = INFINITY;
    for (int i = 0; i < 4 && err == CL_SUCCESS; i++) {
        double t0 = now_s();
        err = clEnqueueWriteBuffer(env->q, buf, CL_TRUE, 0, bytes, host, 0,
                                   NULL, NULL);
        double t1 = now_s();
        if (err == CL_SUCCESS)
            err = clEnqueueReadBuffer(env->q, buf, CL_TRUE, 0, bytes, host, 0,
                                      NULL, NULL);
        double t2 = now_s();
        if (i > 0 && t1 - t0 < best_w)
            best_w = t1 - t0;
        if (i > 0 && t2 - t1 < best_r)
            best_r = t2 - t1;
    }
    free(host);
    clReleaseMemObject(buf);
    if (err != CL_SUCCESS)
        return cl_fail(err, "copying between host and device");
    c->h2d_gbs = (double)bytes / best_w * 1e-9;
    c->d2h_gbs = (double)bytes / best_r * 1e-9;
    c->transfer_mib = (double)bytes / (1 << 20);
    return 0;
}

/* The SGEMM rate the library reaches (CLBlast behind atmoe_graph_matmul) on
 * n x n operands: the median of 3 after a warm-up.  Not a ceiling of the
 * roofline, but it says how far CLBlast is from the FMA rate. */
static int measure_gemm(atmoe_context *ctx, size_t n, ceilings *c)
{
    size_t shape[2] = {n, n};
    atmoe_tensor *a = NULL, *b = NULL;
    atmoe_graph *g = NULL;
    atmoe_node na, nb, y;
    atmoe_status st = ATMOE_STATUS_OK;
    int rc = -1;
    TRY(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, &a));
    TRY(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, &b));
    TRY(atmoe_tensor_fill(a, 0.5));
    TRY(atmoe_tensor_fill(b, 0.25));
    TRY(atmoe_graph_new(ctx, &g));
    TRY(atmoe_graph_parameter(g, "a", a, &na));
    TRY(atmoe_graph_parameter(g, "b", b, &nb));
    TRY(atmoe_graph_matmul(g, na, nb, ATMOE_NODE_NONE, 0, &y));
    TRY(atmoe_graph_mark_output(g, y));
    TRY(atmoe_graph_plan(g, 0));
    double t[3];
    for (int i = 0; i < 4; i++) {
        double t0 = now_s();
        TRY(atmoe_graph_compute(g, 0));
        TRY(atmoe_context_finish(ctx));
        if (i > 0)
            t[i - 1] = now_s() - t0;
    }
    c->gemm_n = n;
    c->gemm_gflops = 2.0 * (double)n * (double)n * (double)n /
                     median(t, 3) * 1e-9;
    rc = 0;
fail:
    if (rc != 0)
        lib_error(ctx, st, "timing SGEMM");
    atmoe_graph_free(g);
    atmoe_tensor_free(a);
    atmoe_tensor_free(b);
    return rc;
}

static int measure_ceilings(atmoe_context *ctx, const atmoe_device_info *info,
                            const char *src, size_t gemm_n, ceilings *c)
{
    cl_env env = {NULL, NULL, NULL, src};
    cl_int err;
    memset(c, 0, sizeof *c);
    if (find_cl_device(info, &env.dev))
        return -1;
    env.cx = clCreateContext(NULL, 1, &env.dev, NULL, NULL, &err);
    if (err != CL_SUCCESS)
        return cl_fail(err, "clCreateContext");
    env.q = clCreateCommandQueue(env.cx, env.dev, CL_QUEUE_PROFILING_ENABLE,
                                 &err);
    if (err != CL_SUCCESS) {
        clReleaseContext(env.cx);
        return cl_fail(err, "clCreateCommandQueue");
    }
    int rc = measure_read(&env, info, c);
    if (rc == 0)
        rc = measure_fma(&env, info, c);
    if (rc == 0)
        rc = measure_launch(&env, c);
    if (rc == 0)
        rc = measure_transfers(&env, info, c);
    clReleaseCommandQueue(env.q);
    clReleaseContext(env.cx);
    if (rc == 0)
        rc = measure_gemm(ctx, gemm_n, c);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Running                                                                   */
/* ------------------------------------------------------------------------ */

/* What the timed computes of one variant measured, one entry per rep: the
 * wall time of compute and finish, and the library's own host time in the
 * compute (atmoe_graph_get_compute_stats); and the most host allocations
 * the library made in one compute, which a plan is meant to make 0. */
typedef struct samples {
    double *wall_s, *host_ms;
    uint64_t host_allocations_max;
} samples;

/* --profile: one more compute (a training step for train-step) with
 * per-node profiling, then its costliest nodes to stdout: device time, the
 * share of the nodes' sum, and the FLOPs and bytes atmoe_graph_get_profile
 * counts, with their rates, so that each node's floor is at hand.  The
 * step's wall time is printed beside the nodes' sum: the rest is what runs
 * outside the graph (the loss read, the optimiser's kernels) and the gaps
 * between commands. */
static int cmp_prof(const void *a, const void *b)
{
    double x = ((const atmoe_node_profile *)a)->ms;
    double y = ((const atmoe_node_profile *)b)->ms;
    return (x < y) - (x > y);
}

static int print_profile(atmoe_context *ctx, const wl_data *w, size_t T,
                         const built *b, atmoe_optimizer *opt, int top)
{
    atmoe_status st = atmoe_graph_set_profiling(b->g, 1);
    if (st != ATMOE_STATUS_OK)
        return lib_error(ctx, st, "switching profiling on");
    double t0 = now_s();
    int rc = w->s.train ? train_once(ctx, b, opt) : compute_once(ctx, b->g);
    double wall_ms = (now_s() - t0) * 1e3;
    atmoe_graph_set_profiling(b->g, 0);
    if (rc)
        return rc;
    size_t n = 0, cap = 64;
    atmoe_node_profile *rows = xcalloc(cap, sizeof *rows);
    double sum = 0.0;
    for (size_t i = 0;; i++) {
        atmoe_node_profile p;
        st = atmoe_graph_get_profile(b->g, i, &p);
        if (st == ATMOE_STATUS_OUT_OF_RANGE)
            break;
        if (st != ATMOE_STATUS_OK) {
            free(rows);
            return lib_error(ctx, st, "reading a node's profile");
        }
        if (p.ms <= 0.0 && p.flops == 0)
            continue; /* inputs, parameters, views */
        if (n == cap)
            rows = xrealloc(rows, cap *= 2, sizeof *rows);
        rows[n++] = p;
        sum += p.ms;
    }
    qsort(rows, n, sizeof *rows, cmp_prof);
    printf("\nprofile: %s T=%zu fused: %s %.2f ms wall, %.2f ms in %zu "
           "nodes\n", w->s.name, T, w->s.train ? "step" : "compute",
           wall_ms, sum, n);
    printf("  %-34s %-18s %9s %6s %9s %9s %8s %7s\n", "node", "op", "ms", "%",
           "MFLOP", "MB", "GFLOP/s", "GB/s");
    for (size_t i = 0; i < n && i < (size_t)top; i++) {
        const atmoe_node_profile *p = &rows[i];
        double s = p->ms > 0.0 ? p->ms * 1e-3 : NAN;
        printf("  %-34.34s %-18.18s %9.3f %6.1f %9.2f %9.2f %8.2f %7.2f\n",
               p->name[0] ? p->name : "-", p->op, p->ms,
               sum > 0.0 ? 100.0 * p->ms / sum : 0.0, p->flops * 1e-6,
               p->bytes * 1e-6, p->flops * 1e-9 / s, p->bytes * 1e-9 / s);
    }
    free(rows);
    return 0;
}

/* Times one variant: build, plan, warm up, then reps timed computes, and
 * compares the output with a reference.  ref (T x d floats) is the fused
 * variant's output: fused writes it, unfused is checked against it.  The
 * merged variant routes differently (one row for every token), so it makes
 * its own reference: the same graph with the merge switched off. */
static int time_variant(atmoe_context *ctx, const wl_data *w, size_t T,
                        variant v, const options *o, progress *prog,
                        float *ref, samples *s, double *diff)
{
    size_t count = T * w->s.d;
    float *y = xcalloc(count, sizeof *y);
    float *mref = NULL;
    built b = {NULL, 0, 0, 0, 0, 0, 0};
    atmoe_optimizer *opt = NULL;
    int rc = -1;
    *diff = NAN;
    if (v == VARIANT_MERGED) {
        progress_show(prog, w->s.name, T, v, "reference");
        mref = xcalloc(count, sizeof *mref);
        if (build(ctx, w, T, v, ATMOE_MERGE_NEVER, &b) ||
            set_inputs(ctx, w, T, &b) || compute_once(ctx, b.g) ||
            read_output(ctx, &b, mref, count))
            goto done;
        atmoe_graph_free(b.g);
        b.g = NULL;
    }
    progress_show(prog, w->s.name, T, v, "planning");
    if (build(ctx, w, T, v, ATMOE_MERGE_ALWAYS, &b) ||
        set_inputs(ctx, w, T, &b))
        goto done;
    if (w->s.train) {
        /* torch.optim.AdamW's defaults, as the peer's. */
        atmoe_optimizer_config cfg;
        atmoe_status st = atmoe_optimizer_config_default(&cfg);
        if (st == ATMOE_STATUS_OK)
            st = atmoe_optimizer_new(b.g, &cfg, &opt);
        if (st != ATMOE_STATUS_OK) {
            lib_error(ctx, st, "creating the optimiser");
            goto done;
        }
        /* The check: y of the first forward, before any step moves the
         * weights. */
        if (train_once(ctx, &b, opt) || read_output(ctx, &b, y, count))
            goto done;
    }
    for (int i = 0; i < o->warmup; i++) {
        progress_show(prog, w->s.name, T, v, "warm-up");
        if (w->s.train ? train_once(ctx, &b, opt) : compute_once(ctx, b.g))
            goto done;
    }
    s->host_allocations_max = 0;
    for (int i = 0; i < o->reps; i++) {
        char stage[48];
        snprintf(stage, sizeof stage, "rep %d/%d", i + 1, o->reps);
        progress_show(prog, w->s.name, T, v, stage);
        double t0 = now_s();
        if (w->s.train ? train_once(ctx, &b, opt) : compute_once(ctx, b.g))
            goto done;
        s->wall_s[i] = now_s() - t0;
        atmoe_compute_stats cs;
        atmoe_status st = atmoe_graph_get_compute_stats(b.g, &cs);
        if (st != ATMOE_STATUS_OK) {
            lib_error(ctx, st, "reading the compute's host figures");
            goto done;
        }
        s->host_ms[i] = cs.host_ms;
        if (cs.host_allocations > s->host_allocations_max)
            s->host_allocations_max = cs.host_allocations;
    }
    if (!w->s.train && read_output(ctx, &b, y, count))
        goto done;
    if (o->profile && v == VARIANT_FUSED) {
        progress_clear(prog);
        if (print_profile(ctx, w, T, &b, opt, o->profile))
            goto done;
    }
    if (w->s.train && restore_weights(ctx, w))
        goto done;
    if (v == VARIANT_FUSED)
        memcpy(ref, y, count * sizeof *y);
    else
        *diff = rel_diff(y, v == VARIANT_MERGED ? mref : ref, count);
    rc = 0;
done:
    atmoe_optimizer_free(opt);
    atmoe_graph_free(b.g);
    free(y);
    free(mref);
    return rc;
}

/* The variants the library runs; the peer's come after them. */
#define N_LIB_VARIANTS VARIANT_TORCH

/* The peer's description of a workload: its kind, shapes and constants,
 * and the seed and draws that make its weights (see draw()); peer_run()
 * adds the runs. */
static json_t *peer_workload(const wl_data *w)
{
    if (w->s.r1)
        return json_pack(
            "{s:s, s:s, s:I, s:I, s:O, s:I, s:I, s:f, s:f, s:f, s:f}", "name",
            w->s.name, "kind", "trex", "seed", (json_int_t)w->seed, "d",
            (json_int_t)w->s.d, "draws", w->draws, "r1", (json_int_t)w->s.r1,
            "r2", (json_int_t)w->s.r2, "k_r", (double)TREX_K_R, "k_s",
            (double)TREX_K_S, "w_om", (double)TREX_W_OM, "w_c",
            (double)TREX_W_C);
    json_t *scales = json_array();
    for (size_t e = 0; e < w->E; e++) /* alpha / r with alpha = 2 r */
        json_array_append_new(scales,
                              json_real((double)(2.0f * (float)w->rank[e] /
                                                 (float)w->rank[e])));
    return json_pack(
        "{s:s, s:s, s:I, s:I, s:O, s:I, s:I, s:i, s:f, s:f, s:f, s:o, s:b}",
        "name", w->s.name, "kind", "atmoe", "seed", (json_int_t)w->seed, "d",
        (json_int_t)w->s.d, "draws", w->draws, "groups",
        (json_int_t)w->s.groups, "per_group", (json_int_t)w->s.per_group,
        "top_k_groups", w->s.top_k_groups, "tau_g", (double)TAU, "tau_d",
        (double)TAU, "c", (double)MIX_C, "scales", scales, "train",
        w->s.train);
}

static void run_workload(atmoe_context *ctx, const options *o, size_t wi,
                         device_run *d, progress *prog)
{
    int k = recipe_index(workloads[wi].name);
    if (k >= 0) {
        recipe_run(ctx, d, k, wi, o->full, o->reps, o->warmup, o->peer,
                   prog);
        return;
    }
    wl_shape s = make_shape(wi, o->full);
    if (s.r1 && d->w0_dtype == ATMOE_DTYPE_Q8) {
        /* The rank-1 layer reads no 8-bit blocks (atmoe_graph_mor1e_layer
         * refuses them): skipped, not failed. */
        progress_clear(prog);
        fprintf(stderr, PROGRAM ": %s: skipped: the rank-1 layer takes no "
                        "q8 W0\n", s.name);
        prog->done += s.n_T * N_LIB_VARIANTS;
        return;
    }
    wl_data w;
    if (wl_init(ctx, &s, 0x5eed0000u + wi, d->w0_dtype, &w)) {
        progress_clear(prog);
        fprintf(stderr, PROGRAM ": %s: %s: %s\n", d->info.name, s.name,
                errbuf);
        d->failures++;
        prog->done += s.n_T * N_LIB_VARIANTS;
        wl_free(&w);
        return;
    }
    if (o->peer)
        json_array_append_new(d->peer_workloads, peer_workload(&w));
    double *times = xcalloc((size_t)o->reps, sizeof *times);
    double *host_ms = xcalloc((size_t)o->reps, sizeof *host_ms);
    samples smp = {times, host_ms, 0};
    for (size_t ti = 0; ti < s.n_T; ti++) {
        size_t T = s.T[ti];
        float *ref = xcalloc(T * s.d, sizeof *ref);
        double fused_ms = NAN;
        for (int v = 0; v < N_LIB_VARIANTS; v++, prog->done++) {
            double diff;
            if (v == VARIANT_UNFUSED && isnan(fused_ms))
                continue; /* nothing to check it against */
            if (v == VARIANT_MERGED && s.train)
                continue; /* per-token routing is what trains */
            if (time_variant(ctx, &w, T, (variant)v, o, prog, ref, &smp,
                             &diff)) {
                progress_clear(prog);
                fprintf(stderr, PROGRAM ": %s: %s T=%zu %s: %s\n",
                        d->info.name, s.name, T, variant_names[v], errbuf);
                d->failures++;
                continue;
            }
            result *r = push_result(d);
            r->workload = s.name;
            r->workload_index = wi;
            r->scale = o->full ? "full" : "small";
            r->variant = (variant)v;
            r->T = T;
            r->d_in = r->d_out = s.d;
            r->experts = w.E;
            r->total_rank = w.R;
            r->rank = (w.R + w.E / 2) / w.E; /* the mean when mixed */
            r->r1 = s.r1;
            r->r2 = s.r2;
            r->min_ms = r->max_ms = times[0] * 1e3;
            for (int i = 1; i < o->reps; i++) {
                if (times[i] * 1e3 < r->min_ms)
                    r->min_ms = times[i] * 1e3;
                if (times[i] * 1e3 > r->max_ms)
                    r->max_ms = times[i] * 1e3;
            }
            r->median_ms = median(times, (size_t)o->reps) * 1e3;
            r->host_measured = 1;
            r->host_ms_median = median(host_ms, (size_t)o->reps);
            r->host_allocations_max = smp.host_allocations_max;
            count_work(&w, T, (variant)v, &r->flops, &r->bytes);
            set_rates(r, &d->c);
            if (v == VARIANT_FUSED) {
                fused_ms = r->median_ms;
                if (o->peer)
                    peer_keep(d, d->n - 1, ref, T * s.d);
            }
            r->ratio_to_fused = r->median_ms / fused_ms;
            r->max_rel_diff = diff;
            if (v != VARIANT_FUSED &&
                (diff > CHECK_TOLERANCE || isnan(diff))) {
                progress_clear(prog);
                fprintf(stderr,
                        PROGRAM ": %s: %s T=%zu %s differs from its "
                        "reference by %.2e (relative; tolerance %.0e)\n",
                        d->info.name, s.name, T, variant_names[v], diff,
                        CHECK_TOLERANCE);
                d->failures++;
            }
        }
        free(ref);
    }
    free(times);
    free(host_ms);
    wl_free(&w);
}

/* Table order: workload, then T, then variant. */
static int cmp_result(const void *a, const void *b)
{
    const result *x = a, *y = b;
    if (x->workload_index != y->workload_index)
        return x->workload_index < y->workload_index ? -1 : 1;
    if (x->T != y->T)
        return x->T < y->T ? -1 : 1;
    return (x->variant > y->variant) - (x->variant < y->variant);
}

static void run_device(const char *selection, const options *o,
                       const char *src, device_run *d)
{
    memset(d, 0, sizeof *d);
    d->w0_dtype = o->w0_dtype;
    d->layer_d = make_shape(0, o->full).d;
    atmoe_context *ctx;
    atmoe_status st = atmoe_context_new(selection, &ctx);
    if (st != ATMOE_STATUS_OK) {
        lib_error(NULL, st, "opening the device");
        fprintf(stderr, PROGRAM ": device '%s': %s\n", selection, errbuf);
        d->failures++;
        return;
    }
    atmoe_context_get_device(ctx, &d->info);
    d->pocl_affinity = getenv("POCL_AFFINITY");
    d->tuned_sets = params_mode(ctx, d->params, sizeof d->params);
    progress prog = {isatty(STDERR_FILENO), 0, 0, d->info.name};
    for (size_t i = 0; i < N_WORKLOADS; i++)
        if (o->selected[i])
            prog.total += recipe_index(workloads[i].name) >= 0
                              ? 1 + (o->peer ? 1 : 0)
                              : make_shape(i, o->full).n_T *
                                    (N_LIB_VARIANTS + (o->peer ? 1 : 0));
    if (prog.on) {
        fprintf(stderr, "%s: measuring the ceilings", d->info.name);
        fflush(stderr);
    }
    if (measure_ceilings(ctx, &d->info, src, o->full ? 2048 : 1024, &d->c)) {
        progress_clear(&prog);
        fprintf(stderr, PROGRAM ": %s: ceilings: %s\n", d->info.name, errbuf);
        d->failures++;
        atmoe_context_free(ctx);
        return;
    }
    d->ok = 1;
    if (o->peer)
        d->peer_workloads = json_array();
    for (size_t i = 0; i < N_WORKLOADS; i++)
        if (o->selected[i])
            run_workload(ctx, o, i, d, &prog);
    /* The library's buffers go back before the peer takes its memory. */
    atmoe_context_free(ctx);
    if (o->peer)
        peer_run(d, o->reps, o->warmup, &prog);
    progress_clear(&prog);
    if (d->n > 1)
        qsort(d->results, d->n, sizeof *d->results, cmp_result);
}

/* ------------------------------------------------------------------------ */
/* Reports                                                                   */
/* ------------------------------------------------------------------------ */

static void print_ceilings(const device_run *d)
{
    const ceilings *c = &d->c;
    printf("%s (%s %s, %u compute units, %s)\n", d->info.name,
           atmoe_vendor_name(d->info.vendor),
           atmoe_device_type_name(d->info.type), d->info.compute_units,
           d->info.platform_version);
    printf("  ceilings: read %.1f GB/s (%.0f MiB; cache %.0f MiB), FP32 FMA "
           "%.1f GFLOP/s (float%d chains),\n            SGEMM %.1f GFLOP/s "
           "(CLBlast, n = %zu)\n",
           c->read_gbs, c->read_mib, c->cache_mib, c->gflops, c->fma_vec,
           c->gemm_gflops, c->gemm_n);
    printf("            launch %.1f us queued, %.1f us with a wait;\n"
           "            host to device %.1f GB/s, device to host %.1f GB/s "
           "(%.0f MiB)\n",
           c->launch_us, c->sync_us, c->h2d_gbs, c->d2h_gbs,
           c->transfer_mib);
    /* The memory of one layer's W0 [d, d] as stored and in f32 (the
     * experts and the router stay f32, a few MiB beside it). */
    size_t dd = d->layer_d;
    double w0_mib =
        (d->w0_dtype == ATMOE_DTYPE_Q8
             ? (double)dd * ((dd + ATMOE_Q8_BLOCK - 1) / ATMOE_Q8_BLOCK) *
                   ATMOE_Q8_BLOCK_BYTES
             : (double)dd * dd * atmoe_dtype_size(d->w0_dtype)) /
        1048576.0;
    printf("  W0 stored as: %s (fused and merged variants): %.1f MiB a "
           "d = %zu layer, f32 %.1f MiB\n",
           atmoe_dtype_name(d->w0_dtype), w0_mib, dd,
           (double)dd * dd * 4 / 1048576.0);
    printf("  parameters: %s%s\n", d->params,
           strcmp(d->params, "default") == 0
               ? " (CLBlast's built-in sets; --params tuned for the tuning "
                 "databases')"
           : d->tuned_sets ? " (from the tuning databases; --params default "
                             "for CLBlast's built-in sets)"
                           : " (but no tuning database has an entry for this "
                             "device: see atmoe-tune(1))");
    if (d->info.vendor == ATMOE_VENDOR_POCL) {
        if (d->pocl_affinity)
            printf("  PoCL threads: POCL_AFFINITY=%s\n", d->pocl_affinity);
        else
            printf("  PoCL threads: POCL_AFFINITY is not set, so PoCL places "
                   "its worker threads\n                freely "
                   "(POCL_AFFINITY=1 pins them to cores; see "
                   "atmoe-bench(1))\n");
    }
    json_t *info = d->peer_info;
    if (info) {
        const char *torch = json_string_value(json_object_get(info, "torch"));
        const char *python =
            json_string_value(json_object_get(info, "python"));
        const char *blas = json_string_value(json_object_get(info, "blas"));
        const char *wait =
            json_string_value(json_object_get(info, "omp_wait_policy"));
        printf("  peer: PyTorch %s (Python %s), %d threads, BLAS %s%s%s\n",
               torch ? torch : "?", python ? python : "?",
               (int)json_integer_value(json_object_get(info, "threads")),
               blas ? blas : "?", wait ? ", OMP_WAIT_POLICY " : "",
               wait ? wait : "");
    }
}

static void print_results(const device_run *d)
{
    if (d->n == 0) {
        printf("\nno workload ran\n");
        return;
    }
    printf("\n%-12s %-5s %4s %-7s %10s %19s %8s %6s %8s %8s %8s %7s %8s\n",
           "workload", "scale", "T", "variant", "median ms", "min..max ms",
           "host ms", "allocs", "GFLOP/s", "GB/s", "roofline", "/fused",
           "check");
    for (size_t i = 0; i < d->n; i++) {
        const result *r = &d->results[i];
        char spread[40], host[24] = "-", allocs[24] = "-", ratio[16],
            check[16];
        snprintf(spread, sizeof spread, "%.3f..%.3f", r->min_ms, r->max_ms);
        if (r->host_measured) {
            snprintf(host, sizeof host, "%.3f", r->host_ms_median);
            snprintf(allocs, sizeof allocs, "%llu",
                     (unsigned long long)r->host_allocations_max);
        }
        if (isnan(r->ratio_to_fused) || r->variant == VARIANT_FUSED)
            snprintf(ratio, sizeof ratio, "-");
        else
            snprintf(ratio, sizeof ratio, "%.2fx", r->ratio_to_fused);
        if (isnan(r->max_rel_diff))
            snprintf(check, sizeof check, "-");
        else
            snprintf(check, sizeof check, "%.0e%s", r->max_rel_diff,
                     r->max_rel_diff > CHECK_TOLERANCE ? "!" : "");
        printf("%-12s %-5s %4zu %-7s %10.3f %19s %8s %6s %8.1f %8.1f %7.1f%% "
               "%7s %8s\n",
               r->workload, r->scale, r->T, variant_names[r->variant],
               r->median_ms, spread, host, allocs, r->gflops, r->gbs,
               100.0 * r->roofline, ratio, check);
    }
    printf("\nhost ms: median time a compute spent on the host (the "
           "library's overhead); allocs:\nthe most host allocations the "
           "library made in one compute; torch has neither;\n"
           "roofline: the bound max(FLOPs / FMA rate, bytes / read "
           "bandwidth) over the median time;\n/fused: median time over the "
           "fused variant's; check: largest difference from the reference,\n"
           "relative to the largest output (unfused and torch against fused, "
           "merged against\nthe unmerged mixture).\n");
    int train = 0;
    for (size_t i = 0; i < d->n; i++) {
        const result *r = &d->results[i];
        if (strcmp(r->workload, "train-step") != 0)
            continue;
        if (!train++)
            printf("\ntrain-step (a whole step: forward, backward, loss read, "
                   "AdamW):\n");
        printf("  %-7s T=%zu d=%zu: %10.0f tokens/s, %5.1f%% of the roofline"
               "\n", variant_names[r->variant], r->T, r->d_in,
               (double)r->T / r->median_ms * 1e3, 100.0 * r->roofline);
    }
    int recipes = 0;
    for (size_t i = 0; i < d->n; i++) {
        const result *r = &d->results[i];
        if (recipe_index(r->workload) < 0)
            continue;
        if (!recipes++)
            printf("\nrecipes (a step of the recipe's loop: the batch "
                   "gathered, forward, backward,\nloss read, AdamW; "
                   "fused is the library, torch the same loop in "
                   "PyTorch):\n");
        printf("  %-13s %-7s T=%zu d=%zu: %8.3f ms a step, %10.0f tokens/s"
               "%s", r->workload, variant_names[r->variant], r->T, r->d_in,
               r->median_ms, (double)r->T / r->median_ms * 1e3,
               r->variant == VARIANT_TORCH ? "" : "\n");
        if (r->variant == VARIANT_TORCH)
            printf(", torch / atmoe %.2fx\n", r->ratio_to_fused);
    }
}

/* One row per run, one column per device: median ms and roofline. */
static void print_comparison(const device_run *runs, size_t n)
{
    printf("\n%-12s %-5s %4s %-7s", "workload", "scale", "T", "variant");
    for (size_t j = 0; j < n; j++)
        if (runs[j].ok)
            printf(" | %-22.22s", runs[j].info.name);
    printf("\n");
    for (size_t j = 0; j < n; j++)
        if (runs[j].ok) {
            for (size_t i = 0; i < runs[j].n; i++) {
                const result *r = &runs[j].results[i];
                int seen = 0;
                for (size_t jj = 0; jj < j && !seen; jj++)
                    for (size_t ii = 0; ii < runs[jj].n && !seen; ii++) {
                        const result *q = &runs[jj].results[ii];
                        seen = runs[jj].ok &&
                               strcmp(q->workload, r->workload) == 0 &&
                               q->T == r->T && q->variant == r->variant;
                    }
                if (seen)
                    continue;
                printf("%-12s %-5s %4zu %-7s", r->workload, r->scale, r->T,
                       variant_names[r->variant]);
                for (size_t k = 0; k < n; k++) {
                    if (!runs[k].ok)
                        continue;
                    const result *m = NULL;
                    for (size_t ii = 0; ii < runs[k].n && !m; ii++) {
                        const result *q = &runs[k].results[ii];
                        if (strcmp(q->workload, r->workload) == 0 &&
                            q->T == r->T && q->variant == r->variant)
                            m = q;
                    }
                    if (m)
                        printf(" | %10.3f ms %6.1f%%", m->median_ms,
                               100.0 * m->roofline);
                    else
                        printf(" | %22s", "-");
                }
                printf("\n");
            }
        }
    printf("\n(each cell: median time, and the fraction of that device's "
           "roofline bound)\n");
}

static json_t *device_json(const options *o, const device_run *d)
{
    json_t *dev = json_pack(
        "{s:s, s:s, s:s, s:s, s:s, s:s, s:I}", "name", d->info.name, "vendor",
        atmoe_vendor_name(d->info.vendor), "type",
        atmoe_device_type_name(d->info.type), "raw_name", d->info.raw_name,
        "platform", d->info.platform_version, "driver",
        d->info.driver_version, "compute_units",
        (json_int_t)d->info.compute_units);
    if (d->info.vendor == ATMOE_VENDOR_POCL)
        json_object_set_new(dev, "pocl_affinity",
                            d->pocl_affinity ? json_string(d->pocl_affinity)
                                             : json_null());
    const ceilings *c = &d->c;
    json_t *ceil = json_pack(
        "{s:o, s:o, s:o, s:o, s:I, s:o, s:o, s:o, s:o, s:I, s:o}", "read_gbs",
        json_num(c->read_gbs), "gflops", json_num(c->gflops), "launch_us",
        json_num(c->launch_us), "sync_us", json_num(c->sync_us), "fma_vec",
        (json_int_t)c->fma_vec, "gemm_gflops", json_num(c->gemm_gflops),
        "h2d_gbs", json_num(c->h2d_gbs), "d2h_gbs", json_num(c->d2h_gbs),
        "read_mib", json_num(c->read_mib), "gemm_n", (json_int_t)c->gemm_n,
        "cache_mib", json_num(c->cache_mib));
    json_t *results = json_array();
    for (size_t i = 0; i < d->n; i++) {
        const result *r = &d->results[i];
        json_t *row = json_pack(
            "{s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:o, s:o, "
            "s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o}",
            "workload", r->workload, "scale", r->scale, "variant",
            variant_names[r->variant], "params", d->params, "T",
            (json_int_t)r->T, "d_in", (json_int_t)r->d_in, "d_out",
            (json_int_t)r->d_out, "experts", (json_int_t)r->experts, "rank",
            (json_int_t)r->rank, "total_rank", (json_int_t)r->total_rank,
            "median_ms", json_num(r->median_ms), "min_ms",
            json_num(r->min_ms), "max_ms", json_num(r->max_ms), "gflops",
            json_num(r->gflops), "gbs", json_num(r->gbs), "roofline",
            json_num(r->roofline), "flops", json_num(r->flops), "bytes",
            json_num(r->bytes), "ratio_to_fused",
            json_num(r->variant == VARIANT_FUSED ? NAN : r->ratio_to_fused),
            "max_rel_diff", json_num(r->max_rel_diff), "host_ms_median",
            json_num(r->host_measured ? r->host_ms_median : NAN),
            "host_allocations_max",
            r->host_measured
                ? json_integer((json_int_t)r->host_allocations_max)
                : json_null());
        if (row && r->r1) {
            json_object_set_new(row, "r1", json_integer((json_int_t)r->r1));
            json_object_set_new(row, "r2", json_integer((json_int_t)r->r2));
        }
        if (row && (strcmp(r->workload, "train-step") == 0 ||
                    recipe_index(r->workload) >= 0))
            json_object_set_new(row, "tokens_per_s",
                                json_num((double)r->T / r->median_ms * 1e3));
        if (row == NULL || json_array_append_new(results, row) != 0)
            return NULL;
    }
    json_t *obj = json_pack("{s:o, s:o, s:o, s:s, s:i, s:i, s:s}", "device",
                            dev, "ceilings", ceil, "results", results,
                            "atmoe_version", atmoe_version(), "reps", o->reps,
                            "warmup", o->warmup, "scale",
                            o->full ? "full" : "small");
    if (obj && d->peer_info)
        json_object_set(obj, "peer", d->peer_info);
    return obj;
}

typedef struct report {
    const options *o;
    const device_run *runs;
    size_t n;
    int all; /* --device all: a list of device objects */
} report;

static int write_json(FILE *f, void *arg)
{
    const report *rep = arg;
    json_t *root = rep->all ? json_array() : NULL;
    for (size_t i = 0; i < rep->n; i++) {
        if (!rep->runs[i].ok)
            continue;
        json_t *obj = device_json(rep->o, &rep->runs[i]);
        if (obj == NULL) {
            json_decref(root);
            errno = ENOMEM;
            return -1;
        }
        if (!rep->all) {
            root = obj;
            break;
        }
        json_array_append_new(root, obj);
    }
    if (root == NULL)
        root = json_object(); /* the only device failed: nothing to say */
    int rc = json_dumpf(root, f, JSON_INDENT(2) | JSON_REAL_PRECISION(8));
    json_decref(root);
    if (rc == 0 && fputc('\n', f) == EOF)
        rc = -1;
    return rc;
}

static void csv_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"')
            fputc('"', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

static void csv_number(FILE *f, double v)
{
    if (isfinite(v))
        fprintf(f, ",%.8g", v);
    else
        fputs(",", f);
}

static int write_csv(FILE *f, void *arg)
{
    const report *rep = arg;
    /* The host figures come last, so that the earlier columns keep their
     * places. */
    fputs("device,vendor,type,workload,scale,variant,params,T,d_in,d_out,"
          "experts,rank,total_rank,median_ms,min_ms,max_ms,gflops,gbs,"
          "roofline,ratio_to_fused,max_rel_diff,read_gbs,peak_gflops,"
          "launch_us,host_ms_median,host_allocations_max\n",
          f);
    for (size_t j = 0; j < rep->n; j++) {
        const device_run *d = &rep->runs[j];
        for (size_t i = 0; d->ok && i < d->n; i++) {
            const result *r = &d->results[i];
            csv_string(f, d->info.name);
            fputc(',', f);
            csv_string(f, atmoe_vendor_name(d->info.vendor));
            fputc(',', f);
            csv_string(f, atmoe_device_type_name(d->info.type));
            fprintf(f, ",%s,%s,%s,%s,%zu,%zu,%zu,%zu,%zu,%zu",
                    r->workload, r->scale, variant_names[r->variant],
                    d->params, r->T, r->d_in, r->d_out, r->experts, r->rank,
                    r->total_rank);
            csv_number(f, r->median_ms);
            csv_number(f, r->min_ms);
            csv_number(f, r->max_ms);
            csv_number(f, r->gflops);
            csv_number(f, r->gbs);
            csv_number(f, r->roofline);
            csv_number(f, r->variant == VARIANT_FUSED ? NAN
                                                      : r->ratio_to_fused);
            csv_number(f, r->max_rel_diff);
            csv_number(f, d->c.read_gbs);
            csv_number(f, d->c.gflops);
            csv_number(f, d->c.launch_us);
            csv_number(f, r->host_measured ? r->host_ms_median : NAN);
            if (r->host_measured)
                fprintf(f, ",%llu",
                        (unsigned long long)r->host_allocations_max);
            else
                fputc(',', f);
            fputc('\n', f);
        }
    }
    return ferror(f) ? -1 : 0;
}

/* --check-json: every field of the contract, with its type. */
static int check_fields(json_t *obj, const char *where, const char *const *names,
                        json_type type, int number)
{
    for (size_t i = 0; names[i]; i++) {
        json_t *v = json_object_get(obj, names[i]);
        int good = v && (number ? json_is_number(v) : json_typeof(v) == type);
        if (!good)
            return set_error("%s: field '%s' is %s", where, names[i],
                             v ? "of the wrong type" : "missing");
    }
    return 0;
}

static int check_device_object(json_t *obj, size_t index, size_t *results)
{
    static const char *const dev_str[] = {"name", "vendor", "type", NULL};
    static const char *const ceil_num[] = {"read_gbs", "gflops", "launch_us",
                                           NULL};
    static const char *const res_str[] = {"workload", "scale", "variant",
                                          "params", NULL};
    static const char *const res_int[] = {"T", "d_in", "d_out", "experts",
                                          "rank", NULL};
    static const char *const res_num[] = {"median_ms", "min_ms", "max_ms",
                                          "gflops", "gbs", "roofline", NULL};
    /* The library's host figures, which the peer's runs do not have: there
     * they are null. */
    static const char *const host_ms[] = {"host_ms_median", NULL};
    static const char *const host_allocs[] = {"host_allocations_max", NULL};
    static const char *const host_all[] = {"host_ms_median",
                                           "host_allocations_max", NULL};
    char where[64];
    snprintf(where, sizeof where, "device object %zu", index);
    if (!json_is_object(obj))
        return set_error("%s is not an object", where);
    json_t *dev = json_object_get(obj, "device");
    json_t *ceil = json_object_get(obj, "ceilings");
    json_t *res = json_object_get(obj, "results");
    if (!json_is_object(dev) || !json_is_object(ceil) || !json_is_array(res))
        return set_error("%s: wants objects 'device' and 'ceilings' and a "
                         "list 'results'", where);
    if (check_fields(dev, "device", dev_str, JSON_STRING, 0) ||
        check_fields(ceil, "ceilings", ceil_num, JSON_REAL, 1))
        return -1;
    for (size_t i = 0; i < json_array_size(res); i++) {
        json_t *r = json_array_get(res, i);
        snprintf(where, sizeof where, "device %zu, result %zu", index, i);
        if (!json_is_object(r))
            return set_error("%s is not an object", where);
        if (check_fields(r, where, res_str, JSON_STRING, 0) ||
            check_fields(r, where, res_int, JSON_INTEGER, 0) ||
            check_fields(r, where, res_num, JSON_REAL, 1))
            return -1;
        const char *name = json_string_value(json_object_get(r, "variant"));
        /* The recipes' steps have no compute stats of their own either. */
        const char *wl = json_string_value(json_object_get(r, "workload"));
        if (strcmp(name, variant_names[VARIANT_TORCH]) == 0 ||
            recipe_index(wl) >= 0
                ? check_fields(r, where, host_all, JSON_NULL, 0)
                : check_fields(r, where, host_ms, JSON_REAL, 1) ||
                      check_fields(r, where, host_allocs, JSON_INTEGER, 0))
            return -1;
    }
    *results += json_array_size(res);
    return 0;
}

static int check_json(const char *path)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (root == NULL) {
        fprintf(stderr, PROGRAM ": %s: line %d: %s\n", path, jerr.line,
                jerr.text);
        return EXIT_RUNTIME;
    }
    size_t devices = 0, results = 0;
    int rc = 0;
    if (json_is_array(root)) {
        for (size_t i = 0; i < json_array_size(root) && rc == 0; i++, devices++)
            rc = check_device_object(json_array_get(root, i), i, &results);
    } else {
        rc = check_device_object(root, 0, &results);
        devices = 1;
    }
    json_decref(root);
    if (rc != 0) {
        fprintf(stderr, PROGRAM ": %s: %s\n", path, errbuf);
        return EXIT_RUNTIME;
    }
    printf("%s: the JSON contract holds (%zu device%s, %zu results)\n", path,
           devices, devices == 1 ? "" : "s", results);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Main                                                                      */
/* ------------------------------------------------------------------------ */

static int list_devices(void)
{
    size_t n, def = (size_t)-1;
    atmoe_status st = atmoe_device_get_count(&n);
    if (st != ATMOE_STATUS_OK) {
        lib_error(NULL, st, "listing devices");
        fprintf(stderr, PROGRAM ": %s\n", errbuf);
        return EXIT_RUNTIME;
    }
    if (n == 0) {
        printf("no OpenCL device found\n");
        return EXIT_RUNTIME;
    }
    atmoe_device_get_default(&def);
    for (size_t i = 0; i < n; i++) {
        atmoe_device_info d;
        if ((st = atmoe_device_get_info(i, &d)) != ATMOE_STATUS_OK) {
            lib_error(NULL, st, "describing a device");
            fprintf(stderr, PROGRAM ": %s\n", errbuf);
            return EXIT_RUNTIME;
        }
        printf("%zu%s %s (%s %s, %u compute units, %s)\n", i,
               i == def ? "*" : " ", d.name, atmoe_vendor_name(d.vendor),
               atmoe_device_type_name(d.type), d.compute_units,
               d.platform_version);
    }
    printf("* the default device (ATMOE_DEVICE overrides it)\n");
    return 0;
}

/* Takes an option's value, from "--opt=value" or the next argument. */
static const char *opt_value(int argc, char **argv, int *i, const char *name)
{
    size_t len = strlen(name);
    if (strncmp(argv[*i], name, len) != 0)
        return NULL;
    if (argv[*i][len] == '=')
        return argv[*i] + len + 1;
    if (argv[*i][len] != '\0')
        return NULL;
    if (*i + 1 >= argc) {
        fprintf(stderr, PROGRAM ": %s needs a value\n", name);
        exit(EXIT_USAGE);
    }
    return argv[++*i];
}

int main(int argc, char **argv)
{
    mode_t mask = umask(0);
    umask(mask);
    file_mode = 0666 & ~mask;

    options o = {NULL, {0}, 0, 5, 2, NULL, NULL, 0, NULL, NULL, ATMOE_DTYPE_F32,
                 0};
    for (size_t i = 0; i < N_WORKLOADS; i++)
        o.selected[i] = workloads[i].implemented &&
                        recipe_index(workloads[i].name) < 0;
    const char *v;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--list-devices") == 0) {
            return list_devices();
        } else if ((v = opt_value(argc, argv, &i, "--check-json"))) {
            return check_json(v);
        } else if ((v = opt_value(argc, argv, &i, "--device"))) {
            o.device = v;
        } else if ((v = opt_value(argc, argv, &i, "--workload"))) {
            if (parse_workloads(v, o.selected))
                return EXIT_USAGE;
        } else if ((v = opt_value(argc, argv, &i, "--scale"))) {
            if (strcmp(v, "small") != 0 && strcmp(v, "full") != 0) {
                fprintf(stderr, PROGRAM ": --scale is small or full, not "
                                "'%s'\n", v);
                return EXIT_USAGE;
            }
            o.full = strcmp(v, "full") == 0;
        } else if ((v = opt_value(argc, argv, &i, "--reps"))) {
            if (parse_count("--reps", v, 1, &o.reps))
                return EXIT_USAGE;
        } else if ((v = opt_value(argc, argv, &i, "--warmup"))) {
            if (parse_count("--warmup", v, 0, &o.warmup))
                return EXIT_USAGE;
        } else if ((v = opt_value(argc, argv, &i, "--json"))) {
            o.json = v;
        } else if ((v = opt_value(argc, argv, &i, "--csv"))) {
            o.csv = v;
        } else if ((v = opt_value(argc, argv, &i, "--peer"))) {
            if (strcmp(v, "torch") != 0) {
                fprintf(stderr, PROGRAM ": --peer knows only 'torch', not "
                                "'%s'\n", v);
                return EXIT_USAGE;
            }
            o.peer = 1;
        } else if ((v = opt_value(argc, argv, &i, "--plot"))) {
            o.plot = v;
        } else if ((v = opt_value(argc, argv, &i, "--dtype"))) {
            if (strcmp(v, "f32") == 0)
                o.w0_dtype = ATMOE_DTYPE_F32;
            else if (strcmp(v, "bf16") == 0)
                o.w0_dtype = ATMOE_DTYPE_BF16;
            else if (strcmp(v, "f16") == 0)
                o.w0_dtype = ATMOE_DTYPE_F16;
            else if (strcmp(v, "q8") == 0)
                o.w0_dtype = ATMOE_DTYPE_Q8;
            else {
                fprintf(stderr, PROGRAM ": --dtype is f32, bf16, f16 or q8, "
                                "not '%s'\n", v);
                return EXIT_USAGE;
            }
        } else if ((v = opt_value(argc, argv, &i, "--profile"))) {
            if (parse_count("--profile", v, 1, &o.profile))
                return EXIT_USAGE;
        } else if ((v = opt_value(argc, argv, &i, "--params"))) {
            if (strcmp(v, "tuned") != 0 && strcmp(v, "default") != 0) {
                fprintf(stderr, PROGRAM ": --params is tuned or default, "
                                "not '%s'\n", v);
                return EXIT_USAGE;
            }
            o.params = v;
        } else {
            fprintf(stderr, PROGRAM ": unknown option '%s' (see --help)\n", a);
            return EXIT_USAGE;
        }
    }
    /* CLBlast cannot go back to its built-in sets once a context has
     * applied tuned ones, so the choice is made for the whole process
     * before the first context. */
    if (o.params && setenv("ATMOE_PARAMS", o.params, 1) != 0) {
        fprintf(stderr, PROGRAM ": setting ATMOE_PARAMS: %s\n",
                strerror(errno));
        return EXIT_RUNTIME;
    }
    if (o.plot) {
        int rc = plot_check(o.plot);
        if (rc != 0) {
            fprintf(stderr, PROGRAM ": --plot %s: %s\n", o.plot, errbuf);
            return rc;
        }
    }

    /* Devices first: a wrong name is a usage error, found before any work. */
    int all = o.device && strcmp(o.device, "all") == 0;
    size_t n_dev = 1, index;
    atmoe_status st;
    if (all) {
        st = atmoe_device_get_count(&n_dev);
        if (st == ATMOE_STATUS_OK && n_dev == 0)
            st = ATMOE_STATUS_NO_DEVICE;
    } else {
        st = o.device ? atmoe_device_find(o.device, &index)
                      : atmoe_device_get_default(&index);
    }
    if (st != ATMOE_STATUS_OK) {
        lib_error(NULL, st, "choosing the device");
        fprintf(stderr, PROGRAM ": %s\n", errbuf);
        return st == ATMOE_STATUS_DEVICE_NOT_FOUND ? EXIT_USAGE
                                                   : EXIT_RUNTIME;
    }
    /* Outputs next, so that a long run does not end in a path that cannot
     * be written. */
    const char *outs[2] = {o.json, o.csv}, *flags[2] = {"--json", "--csv"};
    for (int i = 0; i < 2; i++)
        if (outs[i] && write_atomic(outs[i], NULL, NULL)) {
            fprintf(stderr, PROGRAM ": %s %s: %s\n", flags[i], outs[i],
                    errbuf);
            return EXIT_RUNTIME;
        }
    if (o.peer && peer_probe()) {
        fprintf(stderr, PROGRAM ": --peer torch: %s\n", errbuf);
        return EXIT_RUNTIME;
    }
    char *src = load_ceilings_source();
    if (src == NULL) {
        fprintf(stderr, PROGRAM ": %s\n", errbuf);
        return EXIT_RUNTIME;
    }

    device_run *runs = xcalloc(n_dev, sizeof *runs);
    int failed = 0;
    for (size_t i = 0; i < n_dev; i++) {
        char sel[32];
        snprintf(sel, sizeof sel, "%zu", all ? i : index);
        run_device(sel, &o, src, &runs[i]);
        failed |= runs[i].failures > 0;
        if (runs[i].ok) {
            if (i > 0)
                printf("\n");
            print_ceilings(&runs[i]);
            if (!all)
                print_results(&runs[i]);
            fflush(stdout);
        }
    }
    if (all)
        print_comparison(runs, n_dev);
    free(src);

    report rep = {&o, runs, n_dev, all};
    if (o.json && write_atomic(o.json, write_json, &rep)) {
        fprintf(stderr, PROGRAM ": --json %s: %s\n", o.json, errbuf);
        failed = 1;
    }
    if (o.csv && write_atomic(o.csv, write_csv, &rep)) {
        fprintf(stderr, PROGRAM ": --csv %s: %s\n", o.csv, errbuf);
        failed = 1;
    }
    if (o.plot && plot_write(o.plot, runs, n_dev)) {
        fprintf(stderr, PROGRAM ": --plot %s: %s\n", o.plot, errbuf);
        failed = 1;
    }
    for (size_t i = 0; i < n_dev; i++) {
        peer_free(&runs[i]);
        free(runs[i].results);
    }
    peer_end();
    free(runs);
    return failed ? EXIT_RUNTIME : 0;
}
