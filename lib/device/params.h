/* The parameters of the library's own kernels, as one resolver gives them
 * (tuning.c, whose table describes each one: program, name, range, default
 * rule, environment variable).  Adding a parameter adds its value here and
 * its row there. */
#ifndef ATMOE_PARAMS_H
#define ATMOE_PARAMS_H

#include "atmoe.h"

typedef enum atm_param {
    ATM_PARAM_LINEAR_SR,         /* "linear" SR: rows-tiles per block, 1..256, default 8 */
    ATM_PARAM_LINEAR_ST,         /* "linear" ST: token-tiles per block, 1..256, default 8 */
    ATM_PARAM_LINEAR_MAX_TOKENS, /* "linear" MAX_TOKENS: batches up to this run cl/linear.cl, beyond it CLBlast; env ATMOE_LINEAR_MAX_TOKENS; default: no limit (LONG_MAX) on CPU devices, 64 elsewhere; >= 1 */
    /* Work-group sizes (atm_param_work_group rounds them to a power of
     * two the device allows): "router" WG, the items that share a row's
     * dot products in cl/router.cl, default 64; "mixture" WG, the
     * work-groups of cl/mixture.cl's mix and fold launches, default 64. */
    ATM_PARAM_ROUTER_WG, ATM_PARAM_MIXTURE_WG,
    /* The blocks of cl/linear.cl for one storage type of its weight W
     * ("linear.f32", "linear.f16", "linear.bf16"): by default the untyped
     * "linear" ones, so that a database without typed entries applies to
     * every type. */
    ATM_PARAM_LINEAR_F32_SR, ATM_PARAM_LINEAR_F32_ST,
    ATM_PARAM_LINEAR_F16_SR, ATM_PARAM_LINEAR_F16_ST,
    ATM_PARAM_LINEAR_BF16_SR, ATM_PARAM_LINEAR_BF16_ST,
    /* The variant of the linear route's products (moe/linear.c):
     * "linear" VARIANT 0 cl/linear.cl (CPU-shaped), 1 cl/linear_gpu.cl
     * (a work-group per GROUP_ROWS rows sharing their reductions over
     * GROUP_SIZE work-items); env ATMOE_LINEAR_VARIANT; default 0 on CPU
     * devices, 1 elsewhere. */
    ATM_PARAM_LINEAR_VARIANT, ATM_PARAM_LINEAR_GROUP_SIZE,
    ATM_PARAM_LINEAR_GROUP_ROWS,
    /* "linear.q8": W in 8-bit blocks (base weights only). */
    ATM_PARAM_LINEAR_Q8_SR, ATM_PARAM_LINEAR_Q8_ST,
    /* Work-group sizes (atm_param_work_group), default 64 as before:
     * "kmeans" WG, the 1-D passes of cl/kmeans.cl (lib/moe/cluster.c; not
     * partial_sums, whose groups of one spread the chunks); "optimizer"
     * WG, the element-wise launches of cl/optimizer.cl (accumulate and
     * the updates; the norm's reduction is compiled for its own size). */
    ATM_PARAM_KMEANS_WG, ATM_PARAM_OPTIMIZER_WG,
    /* The work-items of cl/mixture.cl's block and diagonal mixes: "mixture"
     * VW rank channels (1, 2, 4, 8 or 16; others rounded down) of TPI
     * tokens (1..64) each; default 1 x 1, an element an item. */
    ATM_PARAM_MIXTURE_VW, ATM_PARAM_MIXTURE_TPI,
    /* "router" LPI: the logits of cl/router.cl that one pass over a row
     * of h computes (1..64), default 1, a logit a pass. */
    ATM_PARAM_ROUTER_LPI,
    /* The mixture's variant at small batches (moe/mixture.c): "mixture"
     * VARIANT 0 three launches (shrink, mix, base with the expand), 1 one
     * launch of cl/mixture.cl's mixture_fused for batches of at most
     * FUSED_MAX_TOKENS (1..64) tokens, u and z in local memory, a
     * work-group of FUSED_GS items (a power of two) for every FUSED_ROWS
     * rows of y (at least the total rank); env ATMOE_MIXTURE_VARIANT;
     * default 0 on CPU devices, 1 elsewhere. */
    ATM_PARAM_MIXTURE_VARIANT, ATM_PARAM_MIXTURE_FUSED_MAX_TOKENS,
    ATM_PARAM_MIXTURE_FUSED_ROWS, ATM_PARAM_MIXTURE_FUSED_GS,
    /* The tile variant cl/linear_tile.cl (moe/linear.c): batches of at
     * least "linear" TILE_MIN_TOKENS tokens (and at most MAX_TOKENS) run
     * it, whatever VARIANT runs the smaller ones; env
     * ATMOE_LINEAR_TILE_MIN_TOKENS; default: never (LONG_MAX) on CPU
     * devices, 8 elsewhere.  Its tile: TILE_TOKENS x TILE_ROWS outputs a
     * work-group, k staged through local memory TILE_K at a time, each
     * work-item a TILE_WT x TILE_WR block (tokens x rows) of them. */
    ATM_PARAM_LINEAR_TILE_MIN_TOKENS, ATM_PARAM_LINEAR_TILE_TOKENS,
    ATM_PARAM_LINEAR_TILE_ROWS, ATM_PARAM_LINEAR_TILE_K,
    ATM_PARAM_LINEAR_TILE_WT, ATM_PARAM_LINEAR_TILE_WR,
    /* "linear" VECTOR_WIDTH: cl/linear.cl's vectors, 16 or 8 (below 16);
     * 0, the default, the device's native float width. */
    ATM_PARAM_LINEAR_VECTOR_WIDTH,
    ATM_PARAM_COUNT_
} atm_param;

/* The value in force on ctx: environment (where the parameter has a
 * variable), then the user database, then the system database, then the
 * default.  Resolved when the context is made and again by
 * atmoe_context_set_params; a lookup is an array read, allocates
 * nothing. */
long atm_param_get(const atmoe_context *ctx, atm_param p);

/* A work-group size parameter's value as a launch can take it: the
 * largest power of two at most the value and the device's largest
 * work-group, so that an entry written for another device still runs. */
size_t atm_param_work_group(const atmoe_context *ctx, atm_param p);

/* cl/linear.cl's block (SR, or ST when st) for a weight stored as dtype
 * (f32, f16, bf16 or q8; another reads the untyped one). */
long atm_param_linear_block(const atmoe_context *ctx, atmoe_dtype dtype,
                            int st);

/* Whether p's value in force is its default (no variable, entry or
 * explicit set gave it): a default that the device cannot run may give
 * way where an asked-for value is refused. */
int atm_param_is_default(const atmoe_context *ctx, atm_param p);

/* What the context keeps of the tuning (tuning.c): embedded in it, so that
 * the values in force exist whatever happened when it was made. */
typedef struct atm_tuning {
    const char *mode;       /* "tuned", "default" or "custom" */
    struct json_t *kernels; /* program -> {match, file, spec, values}: the
                               database records (or explicit set) in force */
    long value[ATM_PARAM_COUNT_];        /* what atm_param_get returns */
    unsigned char from[ATM_PARAM_COUNT_]; /* where each came from (tuning.c) */
    /* The environment's values, read once when the context is made, so
     * that atmoe_context_set_params resolves against the same ones. */
    long env_value[ATM_PARAM_COUNT_];
    unsigned char has_env[ATM_PARAM_COUNT_];
} atm_tuning;

#endif
