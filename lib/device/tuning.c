#include <config.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "base/alloc.h"
#include "base/env.h"
#include "base/file.h"
#include "base/log.h"
#include "device/blas.h"
#include "device/tuning.h"

#define DB_VERSION 1
#define MAX_PARAMS 16
#define MAX_DEVICES 64
#define ERR_SIZE 512

/* ---------------------------------------------------------------- sets */

/* The CLBlast kernels behind SGEMM, the only routine the library calls, with
 * the exact parameter names CLBlast 1.5 expects for each (it refuses an
 * override that leaves one out). */
typedef struct param_rule {
    const char *name;
    json_int_t lo, hi;
} param_rule;

typedef int (*set_check_fn)(const json_t *set, char *err);

typedef struct kernel_rule {
    const char *kernel;
    const param_rule *params;
    size_t count;
    set_check_fn check;
} kernel_rule;

#define FLAG(n) {n, 0, 1}
#define SIZE(n) {n, 1, 1 << 16}
#define WIDTH(n) {n, 1, 16}

static const param_rule xgemm_params[] = {
    FLAG("GEMMK"), SIZE("KREG"), SIZE("KWG"), SIZE("KWI"), SIZE("MDIMA"),
    SIZE("MDIMC"), SIZE("MWG"), SIZE("NDIMB"), SIZE("NDIMC"), SIZE("NWG"),
    FLAG("SA"), FLAG("SB"), FLAG("STRM"), FLAG("STRN"), WIDTH("VWM"),
    WIDTH("VWN")};
static const param_rule direct_params[] = {
    SIZE("KWID"), SIZE("MDIMAD"), SIZE("MDIMCD"), SIZE("NDIMBD"),
    SIZE("NDIMCD"), FLAG("PADA"), FLAG("PADB"), WIDTH("VWMD"),
    WIDTH("VWND"), SIZE("WGD")};
static const param_rule routine_params[] = {
    {"XGEMM_MIN_INDIRECT_SIZE", 0, 1 << 20}};
static const param_rule copy_params[] = {
    SIZE("COPY_DIMX"), SIZE("COPY_DIMY"), WIDTH("COPY_VW"), SIZE("COPY_WPT")};
static const param_rule pad_params[] = {
    SIZE("PAD_DIMX"), SIZE("PAD_DIMY"), SIZE("PAD_WPTX"), SIZE("PAD_WPTY")};
static const param_rule transpose_params[] = {
    SIZE("TRA_DIM"), FLAG("TRA_PAD"), FLAG("TRA_SHUFFLE"), WIDTH("TRA_WPT")};
static const param_rule padtranspose_params[] = {
    FLAG("PADTRA_PAD"), SIZE("PADTRA_TILE"), SIZE("PADTRA_WPT")};

static json_int_t pv(const json_t *set, const char *name)
{
    return json_integer_value(json_object_get(set, name));
}

static int bad(char *err, const char *fmt, ...) ATM_PRINTF(2, 3);
static int bad(char *err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, ERR_SIZE, fmt, ap);
    va_end(ap);
    return -1;
}

static int is_pow2(json_int_t v)
{
    return v > 0 && (v & (v - 1)) == 0;
}

/* a % (b * c) == 0, named for the message. */
static int multiple(const json_t *s, const char *a, const char *b,
                    const char *c, char *err)
{
    json_int_t d = pv(s, b) * (c ? pv(s, c) : 1);
    if (pv(s, a) % d == 0)
        return 0;
    return bad(err, "%s (%lld) is not a multiple of %s%s%s (%lld)", a,
               (long long)pv(s, a), b, c ? "*" : "", c ? c : "",
               (long long)d);
}

/* The constraints of CLBlast's own Xgemm tuner (src/tuning/kernels/
 * xgemm.hpp): whole tiles per thread and per loading thread, and for each
 * kernel the shape of the space its tuner explores; and one more that the
 * GEMM routine, unlike the tuner's bare kernel, needs. */
static int check_xgemm(const json_t *s, char *err)
{
    if (!is_pow2(pv(s, "VWM")) || !is_pow2(pv(s, "VWN")))
        return bad(err, "VWM and VWN must be powers of two");
    if (multiple(s, "KWG", "KWI", NULL, err) ||
        multiple(s, "MWG", "MDIMC", "VWM", err) ||
        multiple(s, "NWG", "NDIMC", "VWN", err) ||
        multiple(s, "MWG", "MDIMA", "VWM", err) ||
        multiple(s, "NWG", "NDIMB", "VWN", err))
        return -1;
    json_int_t threads = pv(s, "MDIMC") * pv(s, "NDIMC");
    if (pv(s, "GEMMK") == 0) {
        if (pv(s, "KREG") != 1)
            return bad(err, "KREG must be 1 when GEMMK is 0");
        if (threads % pv(s, "MDIMA") || threads % pv(s, "NDIMB"))
            return bad(err, "MDIMC*NDIMC (%lld) must be a multiple of MDIMA "
                       "and of NDIMB", (long long)threads);
        json_int_t kdima = threads / pv(s, "MDIMA");
        json_int_t kdimb = threads / pv(s, "NDIMB");
        if (pv(s, "KWG") % kdima || pv(s, "KWG") % kdimb)
            return bad(err, "KWG (%lld) must be a multiple of MDIMC*NDIMC/"
                       "MDIMA (%lld) and of MDIMC*NDIMC/NDIMB (%lld)",
                       (long long)pv(s, "KWG"), (long long)kdima,
                       (long long)kdimb);
        return 0;
    }
    if (pv(s, "KWG") != 1 || pv(s, "KWI") != 1 || pv(s, "SA") || pv(s, "SB") ||
        pv(s, "STRM") || pv(s, "STRN"))
        return bad(err, "GEMMK 1 takes KWG 1, KWI 1 and SA, SB, STRM, STRN 0");
    if (pv(s, "MDIMA") != pv(s, "MDIMC") || pv(s, "NDIMB") != pv(s, "NDIMC"))
        return bad(err, "GEMMK 1 takes MDIMA = MDIMC and NDIMB = NDIMC");
    /* CLBlast 1.5 sizes the launch of this kernel with MWG along the
     * dimension the kernel tiles by NWG: unequal tiles run work-groups past
     * the end of C, which corrupts memory (seen on PoCL). */
    if (pv(s, "MWG") != pv(s, "NWG"))
        return bad(err, "GEMMK 1 takes MWG = NWG (%lld and %lld here)",
                   (long long)pv(s, "MWG"), (long long)pv(s, "NWG"));
    return multiple(s, "KREG", "VWN", NULL, err);
}

/* The constraints of CLBlast's XgemmDirect tuner. */
static int check_direct(const json_t *s, char *err)
{
    if (!is_pow2(pv(s, "VWMD")) || !is_pow2(pv(s, "VWND")))
        return bad(err, "VWMD and VWND must be powers of two");
    if (multiple(s, "WGD", "KWID", NULL, err) ||
        multiple(s, "WGD", "MDIMCD", "VWMD", err) ||
        multiple(s, "WGD", "NDIMCD", "VWND", err) ||
        multiple(s, "WGD", "MDIMAD", "VWMD", err) ||
        multiple(s, "WGD", "NDIMBD", "VWND", err))
        return -1;
    json_int_t threads = pv(s, "MDIMCD") * pv(s, "NDIMCD");
    if (threads % pv(s, "MDIMAD") || threads % pv(s, "NDIMBD"))
        return bad(err, "MDIMCD*NDIMCD (%lld) must be a multiple of MDIMAD "
                   "and of NDIMBD", (long long)threads);
    if (pv(s, "WGD") % (threads / pv(s, "MDIMAD")) ||
        pv(s, "WGD") % (threads / pv(s, "NDIMBD")))
        return bad(err, "WGD (%lld) must be a multiple of MDIMCD*NDIMCD/MDIMAD "
                   "and of MDIMCD*NDIMCD/NDIMBD", (long long)pv(s, "WGD"));
    return 0;
}

#define RULE(k, p, c) {k, p, sizeof p / sizeof p[0], c}
static const kernel_rule kernel_rules[] = {
    RULE("Copy", copy_params, NULL),
    RULE("GemmRoutine", routine_params, NULL),
    RULE("Pad", pad_params, NULL),
    RULE("Padtranspose", padtranspose_params, NULL),
    RULE("Transpose", transpose_params, NULL),
    RULE("Xgemm", xgemm_params, check_xgemm),
    RULE("XgemmDirect", direct_params, check_direct),
};

static const kernel_rule *find_rule(const char *kernel)
{
    for (size_t i = 0; i < sizeof kernel_rules / sizeof kernel_rules[0]; i++)
        if (strcmp(kernel_rules[i].kernel, kernel) == 0)
            return &kernel_rules[i];
    return NULL;
}

static int check_clblast_set(const char *kernel, const json_t *set, char *err)
{
    const kernel_rule *r = find_rule(kernel);
    if (r == NULL)
        return bad(err, "'%s' is not a CLBlast kernel behind SGEMM (Xgemm, "
                   "XgemmDirect, GemmRoutine, Copy, Pad, Transpose, "
                   "Padtranspose)", kernel);
    if (!json_is_object(set))
        return bad(err, "%s is not an object of parameters", kernel);
    const char *name;
    json_t *v;
    json_object_foreach((json_t *)set, name, v) {
        size_t i = 0;
        while (i < r->count && strcmp(r->params[i].name, name) != 0)
            i++;
        if (i == r->count)
            return bad(err, "%s has no parameter '%s'", kernel, name);
        if (!json_is_integer(v))
            return bad(err, "%s.%s is not an integer", kernel, name);
        json_int_t x = json_integer_value(v);
        if (x < r->params[i].lo || x > r->params[i].hi)
            return bad(err, "%s.%s = %lld is outside [%lld, %lld]", kernel,
                       name, (long long)x, (long long)r->params[i].lo,
                       (long long)r->params[i].hi);
    }
    for (size_t i = 0; i < r->count; i++)
        if (json_object_get(set, r->params[i].name) == NULL)
            return bad(err, "%s lacks parameter %s (CLBlast needs all of "
                       "them)", kernel, r->params[i].name);
    if (r->check && r->check(set, err) != 0) {
        char detail[ERR_SIZE];
        snprintf(detail, sizeof detail, "%s", err);
        return bad(err, "%s: %s", kernel, detail);
    }
    return 0;
}

/* The tile of C a GEMM work-group holds in registers, and its share a
 * thread.  OpenCL reports no register file, so the bounds are CLBlast's
 * own tuners' spaces with room to spare: tiles of at most 128 x 128 (here
 * 256 x 256), at most 64 x 64 values a thread (GEMMK 1 over 2 x 2
 * threads).  A 1024 x 1024 tile passes every other check, spills to
 * memory, pads each matrix to its size, and makes the first GEMM take
 * minutes. */
#define MAX_TILE_VALUES (256 * 256)
#define MAX_THREAD_VALUES (64 * 64)

/* What a set asks of the device, which a file cannot be checked against:
 * threads per work-group, bytes of local memory, and registers (whose
 * limit no device reports: the bounds above). */
static int check_on_device(const char *kernel, const json_t *s,
                           const atmoe_device_info *dev, char *err)
{
    json_int_t threads = 1, local = 0, tile = 0;
    if (strcmp(kernel, "Xgemm") == 0) {
        threads = pv(s, "MDIMC") * pv(s, "NDIMC");
        local = 4 * pv(s, "KWG") *
                (pv(s, "SA") * pv(s, "MWG") + pv(s, "SB") * pv(s, "NWG"));
        tile = pv(s, "MWG") * pv(s, "NWG");
    } else if (strcmp(kernel, "XgemmDirect") == 0) {
        threads = pv(s, "MDIMCD") * pv(s, "NDIMCD");
        local = 4 * pv(s, "WGD") *
                (2 * pv(s, "WGD") + pv(s, "PADA") + pv(s, "PADB"));
        tile = pv(s, "WGD") * pv(s, "WGD");
    } else if (strcmp(kernel, "Copy") == 0) {
        threads = pv(s, "COPY_DIMX") * pv(s, "COPY_DIMY");
    } else if (strcmp(kernel, "Pad") == 0) {
        threads = pv(s, "PAD_DIMX") * pv(s, "PAD_DIMY");
    } else if (strcmp(kernel, "Transpose") == 0) {
        json_int_t t = pv(s, "TRA_DIM") * pv(s, "TRA_WPT");
        threads = pv(s, "TRA_DIM") * pv(s, "TRA_DIM");
        local = 4 * t * (t + pv(s, "TRA_PAD"));
    } else if (strcmp(kernel, "Padtranspose") == 0) {
        json_int_t t = pv(s, "PADTRA_TILE") * pv(s, "PADTRA_WPT");
        threads = pv(s, "PADTRA_TILE") * pv(s, "PADTRA_TILE");
        local = 4 * t * (t + pv(s, "PADTRA_PAD"));
    }
    if ((uint64_t)threads > dev->max_work_group_size)
        return bad(err, "%s needs work-groups of %lld threads, more than %s "
                   "allows (%zu)", kernel, (long long)threads, dev->name,
                   dev->max_work_group_size);
    if ((uint64_t)local > dev->local_mem_bytes)
        return bad(err, "%s needs %lld bytes of local memory, more than %s "
                   "has (%llu)", kernel, (long long)local, dev->name,
                   (unsigned long long)dev->local_mem_bytes);
    if (tile > MAX_TILE_VALUES)
        return bad(err, "%s's tile of C holds %lld values, more than the %d "
                   "a work-group keeps in registers", kernel, (long long)tile,
                   MAX_TILE_VALUES);
    if (tile / threads > MAX_THREAD_VALUES)
        return bad(err, "%s gives each thread %lld values of C, more than "
                   "the %d that fit in its registers", kernel,
                   (long long)(tile / threads), MAX_THREAD_VALUES);
    return 0;
}

/* ---------------------------------------------------------------- params */

/* Where a parameter's value in force came from (atm_tuning.from). */
typedef enum param_from {
    FROM_DEFAULT,
    FROM_ENTRY,
    FROM_ENV,
    FROM_FALLBACK /* the value in force of the row's fallback */
} param_from;

/* The parameters of the library's own programs: the schema of the
 * "kernels" section of databases and explicit sets, the defaults, and the
 * variables that override them.  One row a parameter. */
typedef struct param_row {
    const char *program, *name; /* kernels.<program>.<name> */
    long lo, hi;                /* the integers it may take */
    long def_cpu, def_other;    /* the default on CPU devices, elsewhere */
    atm_env_var env;            /* ATM_ENV_NONE: no variable */
    int fallback;               /* a row earlier in the table whose value
                                   in force is the default, or -1 */
} param_row;

static const param_row param_rows[ATM_PARAM_COUNT_] = {
    /* Blocks of SR x ST tiles that a work-item of cl/linear.cl walks: 8 x 8
     * was the best of 4 to 64 at 64 and 512 tokens on PoCL. */
    [ATM_PARAM_LINEAR_SR] = {"linear", "SR", 1, 256, 8, 8, ATM_ENV_NONE, -1},
    [ATM_PARAM_LINEAR_ST] = {"linear", "ST", 1, 256, 8, 8, ATM_ENV_NONE, -1},
    /* The largest batch cl/linear.cl runs rather than CLBlast's GEMMs.  On
     * a CPU device it ran 4-5 times faster than CLBlast 1.5.3 with its
     * default parameters on PoCL 3.1, decode and prefill alike; elsewhere
     * reading the weights once bounds small batches, and GEMM tiling only
     * adds to it, up to about 16 tokens; the tile variant (from
     * TILE_MIN_TOKENS) reads them once a tile of tokens and fuses the
     * expand, up to an untuned 64 tokens before CLBlast's tuned GEMMs. */
    [ATM_PARAM_LINEAR_MAX_TOKENS] = {"linear", "MAX_TOKENS", 1, LONG_MAX,
                                     LONG_MAX, 64, ATM_ENV_LINEAR_MAX_TOKENS,
                                     -1},
    /* Work-group sizes, 64 as the library always had: the router's items
     * per row (a tree reduction over them), and the 1-D launches of the
     * mixture's mix and fold kernels.  Powers of two are used as they
     * are, others rounded down (atm_param_work_group). */
    [ATM_PARAM_ROUTER_WG] = {"router", "WG", 1, 1024, 64, 64, ATM_ENV_NONE,
                             -1},
    [ATM_PARAM_MIXTURE_WG] = {"mixture", "WG", 1, 1024, 64, 64,
                              ATM_ENV_NONE, -1},
    /* The blocks by the storage type of W: a half-precision row is half
     * the bytes, so a block of more rows may fit the same cache.  Without
     * a typed entry, the untyped one (or its default) holds: databases
     * written before weights had types apply to every type. */
    [ATM_PARAM_LINEAR_F32_SR] = {"linear.f32", "SR", 1, 256, 8, 8,
                                 ATM_ENV_NONE, ATM_PARAM_LINEAR_SR},
    [ATM_PARAM_LINEAR_F32_ST] = {"linear.f32", "ST", 1, 256, 8, 8,
                                 ATM_ENV_NONE, ATM_PARAM_LINEAR_ST},
    [ATM_PARAM_LINEAR_F16_SR] = {"linear.f16", "SR", 1, 256, 8, 8,
                                 ATM_ENV_NONE, ATM_PARAM_LINEAR_SR},
    [ATM_PARAM_LINEAR_F16_ST] = {"linear.f16", "ST", 1, 256, 8, 8,
                                 ATM_ENV_NONE, ATM_PARAM_LINEAR_ST},
    [ATM_PARAM_LINEAR_BF16_SR] = {"linear.bf16", "SR", 1, 256, 8, 8,
                                  ATM_ENV_NONE, ATM_PARAM_LINEAR_SR},
    [ATM_PARAM_LINEAR_BF16_ST] = {"linear.bf16", "ST", 1, 256, 8, 8,
                                  ATM_ENV_NONE, ATM_PARAM_LINEAR_ST},
    /* The variant of the linear route: 0 the CPU-shaped cl/linear.cl
     * (work-items own whole rows), 1 the group variant cl/linear_gpu.cl (a
     * work-group of GROUP_SIZE items shares the reductions of GROUP_ROWS
     * rows).  GPUs and other devices start on the group variant with
     * untuned sizes; moe/linear.c fits them to the device's work-group
     * size and local memory. */
    [ATM_PARAM_LINEAR_VARIANT] = {"linear", "VARIANT", 0, 1, 0, 1,
                                  ATM_ENV_LINEAR_VARIANT, -1},
    [ATM_PARAM_LINEAR_GROUP_SIZE] = {"linear", "GROUP_SIZE", 1, 1024, 64,
                                     128, ATM_ENV_NONE, -1},
    [ATM_PARAM_LINEAR_GROUP_ROWS] = {"linear", "GROUP_ROWS", 1, 16, 4, 4,
                                     ATM_ENV_NONE, -1},
    [ATM_PARAM_LINEAR_Q8_SR] = {"linear.q8", "SR", 1, 256, 8, 8,
                                ATM_ENV_NONE, ATM_PARAM_LINEAR_SR},
    [ATM_PARAM_LINEAR_Q8_ST] = {"linear.q8", "ST", 1, 256, 8, 8,
                                ATM_ENV_NONE, ATM_PARAM_LINEAR_ST},
    /* The work-groups of k-means' passes and of the optimiser's
     * element-wise updates: 64, what they always had. */
    [ATM_PARAM_KMEANS_WG] = {"kmeans", "WG", 1, 1024, 64, 64, ATM_ENV_NONE,
                             -1},
    [ATM_PARAM_OPTIMIZER_WG] = {"optimizer", "WG", 1, 1024, 64, 64,
                                ATM_ENV_NONE, -1},
    /* The mix's work-items: VW channels (a vector; moe/mixture.c rounds
     * it down to 1, 2, 4, 8 or 16) of TPI tokens.  1 x 1, an element an
     * item, as the kernel always had; 16 x 8 ran it 2.6 times faster on
     * PoCL at T = 512 (8 experts of rank 16). */
    [ATM_PARAM_MIXTURE_VW] = {"mixture", "VW", 1, 16, 1, 1, ATM_ENV_NONE, -1},
    [ATM_PARAM_MIXTURE_TPI] = {"mixture", "TPI", 1, 64, 1, 1, ATM_ENV_NONE,
                               -1},
    /* The router's logits a pass over h: 1, a pass (and a tree) a logit,
     * as the kernel always had; more read h and the weights' rows once
     * for several (moe/router.c keeps the partial sums within half the
     * local memory). */
    [ATM_PARAM_ROUTER_LPI] = {"router", "LPI", 1, 64, 1, 1, ATM_ENV_NONE, -1},
    /* The fused mixture at small batches: one launch rather than three,
     * u and z in local memory, on GPUs and other devices by default
     * (where a launch costs microseconds; the group variant's shape), not
     * on CPUs, where its work-group trees cost more than the launches it
     * saves.  moe/mixture.c applies it within its limits: W0 not in
     * 8-bit blocks, and u and z for FUSED_MAX_TOKENS tokens (and the
     * trees' partial sums) within half the local memory.  Its groups of
     * FUSED_GS items are 128 as the group variant's, 16 on CPUs (where it
     * runs only forced, for tests: a driver loops over a group's items
     * between barriers). */
    [ATM_PARAM_MIXTURE_VARIANT] = {"mixture", "VARIANT", 0, 1, 0, 1,
                                   ATM_ENV_MIXTURE_VARIANT, -1},
    [ATM_PARAM_MIXTURE_FUSED_MAX_TOKENS] = {"mixture", "FUSED_MAX_TOKENS",
                                            1, 64, 16, 16, ATM_ENV_NONE, -1},
    [ATM_PARAM_MIXTURE_FUSED_ROWS] = {"mixture", "FUSED_ROWS", 1, 4096, 64,
                                      64, ATM_ENV_NONE, -1},
    [ATM_PARAM_MIXTURE_FUSED_GS] = {"mixture", "FUSED_GS", 1, 1024, 16, 128,
                                    ATM_ENV_NONE, -1},
    /* The tile variant (cl/linear_tile.cl) from TILE_MIN_TOKENS tokens up
     * to MAX_TOKENS: off on CPU devices, where cl/linear.cl's rows in
     * registers run faster than staging through local memory (which a CPU
     * driver keeps in the same caches); from 8 tokens elsewhere, where a
     * work-group reading each element of W once per 64 tokens rather than
     * once per output tile is what prefill needs.  The tile's sizes are
     * untuned starting points: 64 x 64 outputs a group, 16 of k a chunk,
     * 4 x 4 a work-item (256 work-items, 8.3 KB of local memory).
     * moe/linear.c refuses, at planning, sizes whose work-item block does
     * not divide the tile or whose group or local memory the device
     * lacks. */
    [ATM_PARAM_LINEAR_TILE_MIN_TOKENS] = {"linear", "TILE_MIN_TOKENS", 1,
                                          LONG_MAX, LONG_MAX, 8,
                                          ATM_ENV_LINEAR_TILE_MIN_TOKENS, -1},
    [ATM_PARAM_LINEAR_TILE_TOKENS] = {"linear", "TILE_TOKENS", 1, 128, 64,
                                      64, ATM_ENV_NONE, -1},
    [ATM_PARAM_LINEAR_TILE_ROWS] = {"linear", "TILE_ROWS", 1, 128, 64, 64,
                                    ATM_ENV_NONE, -1},
    [ATM_PARAM_LINEAR_TILE_K] = {"linear", "TILE_K", 1, 64, 16, 16,
                                 ATM_ENV_NONE, -1},
    [ATM_PARAM_LINEAR_TILE_WT] = {"linear", "TILE_WT", 1, 16, 4, 4,
                                  ATM_ENV_NONE, -1},
    [ATM_PARAM_LINEAR_TILE_WR] = {"linear", "TILE_WR", 1, 16, 4, 4,
                                  ATM_ENV_NONE, -1},
    /* cl/linear.cl's vector width: 0 takes the device's native float
     * width (CL_DEVICE_NATIVE_VECTOR_WIDTH_FLOAT: a CPU driver's SIMD
     * registers), so that its tile of sums fits them; 16 or 8 (any value
     * below 16) forces one. */
    [ATM_PARAM_LINEAR_VECTOR_WIDTH] = {"linear", "VECTOR_WIDTH", 0, 16, 0, 0,
                                       ATM_ENV_NONE, -1},
};

static const param_row *find_param(const char *program, const char *name)
{
    for (size_t i = 0; i < ATM_PARAM_COUNT_; i++)
        if (strcmp(param_rows[i].program, program) == 0 &&
            (name == NULL || strcmp(param_rows[i].name, name) == 0))
            return &param_rows[i];
    return NULL;
}

/* "in [1, 256]", or "of at least 1" for a parameter without a limit. */
static void range_text(const param_row *r, char *out, size_t size)
{
    if (r->hi == LONG_MAX)
        snprintf(out, size, "of at least %ld", r->lo);
    else
        snprintf(out, size, "in [%ld, %ld]", r->lo, r->hi);
}

/* The names listed by the table for program, or (program NULL) the
 * programs it has, each once: "SR, ST, MAX_TOKENS". */
static void names_text(const char *program, char *out, size_t size)
{
    size_t at = 0;
    out[0] = '\0';
    for (size_t i = 0; i < ATM_PARAM_COUNT_; i++) {
        const param_row *r = &param_rows[i];
        if (program ? strcmp(r->program, program) != 0
                    : find_param(r->program, NULL) != r)
            continue;
        at += (size_t)snprintf(out + at, size - at, "%s%s", at ? ", " : "",
                               program ? r->name : r->program);
        if (at >= size)
            return;
    }
}

/* kernels.<program>.<name> = v against the table. */
static int check_param(const char *program, const char *name, const json_t *v,
                       char *err)
{
    const param_row *r = find_param(program, name);
    char text[256];
    if (r == NULL) {
        names_text(program, text, sizeof text);
        return bad(err, "kernels.%s has no parameter '%s' (it has %s)",
                   program, name, text);
    }
    range_text(r, text, sizeof text);
    if (!json_is_integer(v))
        return bad(err, "kernels.%s.%s is not an integer %s", program, name,
                   text);
    json_int_t x = json_integer_value(v);
    if (x < r->lo || x > r->hi)
        return bad(err, "kernels.%s.%s = %lld is not an integer %s", program,
                   name, (long long)x, text);
    return 0;
}

/* Refuses a fault (lenient NULL: the message is in err, -1), or logs it
 * under lenient, the file and entry being read, and drops key from obj, so
 * that one bad key costs that key alone. */
static int refuse_or_drop(json_t *obj, const char *key, const char *lenient,
                          const char *err)
{
    if (lenient == NULL)
        return -1;
    atm_log(ATMOE_LOG_WARNING, "%s: %s; that key is ignored", lenient, err);
    json_object_del(obj, key);
    return 0;
}

/* The "kernels" section of the entry or explicit set obj. */
static int check_kernels(json_t *obj, const char *lenient, char *err)
{
    json_t *kn = json_object_get(obj, "kernels");
    if (kn && !json_is_object(kn)) {
        bad(err, "kernels is not an object of programs");
        return refuse_or_drop(obj, "kernels", lenient, err);
    }
    const char *program;
    json_t *set;
    void *tmp;
    json_object_foreach_safe(kn, tmp, program, set) {
        char text[256];
        int fault = 0;
        if (find_param(program, NULL) == NULL) {
            names_text(NULL, text, sizeof text);
            fault = bad(err, "kernels: '%s' is not a program with tuned "
                        "parameters (%s)", program, text);
        } else if (!json_is_object(set)) {
            fault = bad(err, "kernels.%s is not an object of parameters",
                        program);
        }
        if (fault) {
            if (refuse_or_drop(kn, program, lenient, err) != 0)
                return -1;
            continue;
        }
        const char *name;
        json_t *v;
        void *tmp2;
        json_object_foreach_safe(set, tmp2, name, v)
            if (check_param(program, name, v, err) != 0 &&
                refuse_or_drop(set, name, lenient, err) != 0)
                return -1;
    }
    return 0;
}

/* The "clblast" and "kernels" sections of an entry or an explicit set;
 * allowed lists the other keys the object may have.  lenient: see
 * refuse_or_drop. */
static int check_params(json_t *obj, const char *const *allowed,
                        const char *lenient, char *err)
{
    if (!json_is_object(obj))
        return bad(err, "not a JSON object");
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v) {
        int known = strcmp(key, "clblast") == 0 ||
                    strcmp(key, "kernels") == 0 || strcmp(key, "info") == 0;
        for (size_t i = 0; allowed && allowed[i] && !known; i++)
            known = strcmp(key, allowed[i]) == 0;
        if (!known)
            return bad(err, "unknown field '%s'", key);
    }
    json_t *info = json_object_get(obj, "info");
    if (info && !json_is_object(info))
        return bad(err, "info is not an object");
    json_t *cl = json_object_get(obj, "clblast");
    if (cl && !json_is_object(cl))
        return bad(err, "clblast is not an object of kernels");
    json_object_foreach(cl, key, v)
        if (check_clblast_set(key, v, err) != 0)
            return -1;
    return check_kernels(obj, lenient, err);
}

/* ---------------------------------------------------------------- files */

static const char *const entry_keys[] = {"device", "vendor", "type", "driver",
                                         NULL};

static const char *str_field(const json_t *e, const char *key)
{
    return json_string_value(json_object_get(e, key));
}

static int same_key(const json_t *a, const json_t *b)
{
    for (int i = 0; entry_keys[i]; i++) {
        const char *x = str_field(a, entry_keys[i]);
        const char *y = str_field(b, entry_keys[i]);
        if ((x == NULL) != (y == NULL) || (x && strcmp(x, y) != 0))
            return 0;
    }
    return 1;
}

static int known_name(const char *s, const char *(*fn)(int), int count)
{
    for (int i = 0; i < count; i++)
        if (strcmp(s, fn(i)) == 0)
            return 1;
    return 0;
}

static const char *vendor_at(int i)
{
    return atmoe_vendor_name((atmoe_vendor)i);
}

static const char *type_at(int i)
{
    return atmoe_device_type_name((atmoe_device_type)i);
}

static int check_entry(json_t *e, const char *lenient, char *err)
{
    if (!json_is_object(e))
        return bad(err, "not a JSON object");
    for (int i = 0; entry_keys[i]; i++) {
        json_t *v = json_object_get(e, entry_keys[i]);
        if (v && (!json_is_string(v) || json_string_length(v) == 0))
            return bad(err, "%s is not a non-empty string", entry_keys[i]);
    }
    const char *vendor = str_field(e, "vendor"), *type = str_field(e, "type");
    if (vendor == NULL || type == NULL)
        return bad(err, "an entry needs a vendor and a type");
    if (!known_name(vendor, vendor_at, ATMOE_VENDOR_POCL + 1))
        return bad(err, "vendor '%s' is not one of AMD, Intel, NVIDIA, PoCL, "
                   "other", vendor);
    if (!known_name(type, type_at, ATMOE_DEVICE_TYPE_ACCELERATOR + 1))
        return bad(err, "type '%s' is not one of CPU, GPU, accelerator, other",
                   type);
    if (str_field(e, "driver") && !str_field(e, "device"))
        return bad(err, "a driver needs a device");
    return check_params(e, entry_keys, lenient, err);
}

/* "device 'X', driver 'Y'" or "vendor PoCL, type CPU", for messages. */
static void describe_entry(const json_t *e, char *out, size_t size)
{
    const char *dev = str_field(e, "device"), *drv = str_field(e, "driver");
    if (dev)
        snprintf(out, size, "device '%s'%s%s%s", dev, drv ? ", driver '" : "",
                 drv ? drv : "", drv ? "'" : "");
    else
        snprintf(out, size, "vendor %s, type %s", str_field(e, "vendor"),
                 str_field(e, "type"));
}

/* A whole database; file (NULL: strict) names it in the warnings of a
 * lenient check (refuse_or_drop). */
static int check_db(json_t *root, const char *file, char *err)
{
    if (!json_is_object(root))
        return bad(err, "the top level is not a JSON object");
    json_t *ver = json_object_get(root, "atmoe_tuning");
    if (!json_is_integer(ver))
        return bad(err, "no \"atmoe_tuning\" version number");
    if (json_integer_value(ver) != DB_VERSION)
        return bad(err, "format version %lld; this library reads version %d",
                   (long long)json_integer_value(ver), DB_VERSION);
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v)
        if (strcmp(key, "atmoe_tuning") != 0 && strcmp(key, "entries") != 0)
            return bad(err, "unknown field '%s'", key);
    json_t *entries = json_object_get(root, "entries");
    if (!json_is_array(entries))
        return bad(err, "\"entries\" is not an array");
    for (size_t i = 0; i < json_array_size(entries); i++) {
        json_t *e = json_array_get(entries, i);
        char detail[ERR_SIZE], where[ERR_SIZE];
        if (file)
            snprintf(where, sizeof where, "tuning database %s, entry %zu",
                     file, i);
        if (check_entry(e, file ? where : NULL, detail) != 0)
            return bad(err, "entry %zu: %s", i, detail);
        for (size_t j = 0; j < i; j++)
            if (same_key(json_array_get(entries, j), e)) {
                char what[600];
                describe_entry(e, what, sizeof what);
                return bad(err, "entries %zu and %zu have the same key (%s)",
                           j, i, what);
            }
    }
    return 0;
}

typedef enum load_result { LOAD_OK, LOAD_MISSING, LOAD_BAD, LOAD_IO } load_result;

/* Reads and checks a database; the message says why on LOAD_BAD.
 * Leniently (for the databases a context reads), a fault in a "kernels"
 * section is logged and drops the key at fault alone. */
static load_result load_db(const char *path, int lenient, json_t **root,
                           char *err)
{
    *root = NULL;
    /* The regular-file open: a FIFO at the path would block every
     * context creation. */
    FILE *f = atm_file_open_regular(path);
    if (f == NULL) {
        if (errno == ENOENT || errno == ENOTDIR)
            return LOAD_MISSING;
        bad(err, "cannot read: %s", atm_file_strerror(errno));
        return LOAD_IO;
    }
    json_error_t je;
    json_t *r = json_loadf(f, JSON_REJECT_DUPLICATES, &je);
    fclose(f);
    if (r == NULL) {
        bad(err, "line %d: %s", je.line, je.text);
        return LOAD_BAD;
    }
    if (check_db(r, lenient ? path : NULL, err) != 0) {
        json_decref(r);
        return LOAD_BAD;
    }
    *root = r;
    return LOAD_OK;
}

/* Why the user's database has no path, for the callers that report it:
 * the status and the message's tail. */
static atmoe_status user_path_why(atm_path_status ps, size_t need,
                                  size_t size, char *why)
{
    switch (ps) {
    case ATM_PATH_OK:
        break;
    case ATM_PATH_EMPTY:
        snprintf(why, ERR_SIZE, "ATMOE_TUNING_FILE is set but empty: no user "
                 "database");
        return ATMOE_STATUS_NOT_FOUND;
    case ATM_PATH_NONE:
        snprintf(why, ERR_SIZE, "neither ATMOE_TUNING_FILE, XDG_DATA_HOME nor "
                 "HOME is set");
        return ATMOE_STATUS_NOT_FOUND;
    case ATM_PATH_TOO_LONG:
        snprintf(why, ERR_SIZE, "the path needs %zu bytes, the buffer holds "
                 "%zu", need, size);
        return ATMOE_STATUS_OUT_OF_RANGE;
    }
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_tuning_get_user_path(char *path, size_t size)
{
    ATM_CHECK_NULL(NULL, path);
    if (size == 0)
        return atm_fail(NULL, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_tuning_get_user_path: size is 0");
    size_t need = 0;
    char why[ERR_SIZE];
    atmoe_status st = user_path_why(
        atm_env_tuning_user_path(path, size, &need), need, size, why);
    if (st != ATMOE_STATUS_OK)
        return atm_fail(NULL, st, "atmoe_tuning_get_user_path: %s", why);
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_tuning_check(const char *path, size_t *entries)
{
    ATM_CHECK_NULL(NULL, path);
    json_t *root;
    char err[ERR_SIZE];
    load_result r = load_db(path, 0, &root, err);
    if (r == LOAD_MISSING)
        return atm_fail(NULL, ATMOE_STATUS_IO_ERROR,
                        "atmoe_tuning_check: %s: no such file", path);
    if (r == LOAD_IO)
        return atm_fail(NULL, ATMOE_STATUS_IO_ERROR,
                        "atmoe_tuning_check: %s: %s", path, err);
    if (r == LOAD_BAD)
        return atm_fail(NULL, ATMOE_STATUS_FORMAT_ERROR,
                        "atmoe_tuning_check: %s: %s", path, err);
    if (entries)
        *entries = json_array_size(json_object_get(root, "entries"));
    json_decref(root);
    return ATMOE_STATUS_OK;
}

static atmoe_status write_db(const char *path, json_t *root)
{
    char tmp[4096 + ATM_FILE_TMP_EXTRA];
    if (atm_mkdir_parent(path, 0755) != 0)
        return atm_fail(NULL, ATMOE_STATUS_IO_ERROR,
                        "atmoe_tuning_save: cannot create the directory of "
                        "%s: %s", path, strerror(errno));
    FILE *f = atm_file_begin(path, tmp, sizeof tmp);
    if (f == NULL)
        return atm_fail(NULL, ATMOE_STATUS_IO_ERROR,
                        "atmoe_tuning_save: cannot write %s: %s", path,
                        strerror(errno));
    int ok = json_dumpf(root, f, JSON_INDENT(2)) == 0 && fputc('\n', f) != EOF;
    if (atm_file_commit(f, tmp, path, ok) != 0)
        return atm_fail(NULL, ATMOE_STATUS_IO_ERROR,
                        "atmoe_tuning_save: cannot write %s: %s", path,
                        strerror(errno));
    return ATMOE_STATUS_OK;
}

/* params as a checked JSON object (the caller's reference). */
static atmoe_status parse_params(const atmoe_context *ctx, const char *fn,
                                 const char *params, json_t **out)
{
    json_error_t je;
    json_t *obj = json_loads(params, JSON_REJECT_DUPLICATES, &je);
    if (obj == NULL)
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: params are not JSON: column %d: %s", fn,
                        je.column, je.text);
    char err[ERR_SIZE];
    if (check_params(obj, NULL, NULL, err) != 0) {
        json_decref(obj);
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR, "%s: params: %s", fn,
                        err);
    }
    *out = obj;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_tuning_save(const char *path,
                                         const atmoe_device_info *device,
                                         const char *params)
{
    ATM_CHECK_NULL(NULL, device);
    ATM_CHECK_NULL(NULL, params);
    char user[4096];
    if (path == NULL) {
        size_t need = 0;
        char why[ERR_SIZE];
        atmoe_status st = user_path_why(
            atm_env_tuning_user_path(user, sizeof user, &need), need,
            sizeof user, why);
        if (st != ATMOE_STATUS_OK)
            return atm_fail(NULL, st, "atmoe_tuning_save: no path given, "
                            "and %s", why);
        path = user;
    }
    if ((unsigned)device->vendor > ATMOE_VENDOR_POCL ||
        (unsigned)device->type > ATMOE_DEVICE_TYPE_ACCELERATOR ||
        device->name[0] == '\0' || device->driver_version[0] == '\0')
        return atm_fail(NULL, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_tuning_save: the device has no name, driver "
                        "version, vendor or type to key the entry by");
    json_t *set;
    atmoe_status st = parse_params(NULL, "atmoe_tuning_save", params, &set);
    if (st != ATMOE_STATUS_OK)
        return st;

    json_t *root = NULL;
    char err[ERR_SIZE];
    load_result r = load_db(path, 0, &root, err);
    if (r == LOAD_IO) {
        json_decref(set);
        return atm_fail(NULL, ATMOE_STATUS_IO_ERROR,
                        "atmoe_tuning_save: %s: %s; it is left as it is",
                        path, err);
    }
    if (r == LOAD_BAD) {
        json_decref(set);
        return atm_fail(NULL, ATMOE_STATUS_FORMAT_ERROR,
                        "atmoe_tuning_save: %s is not a tuning database (%s); "
                        "it is left as it is", path, err);
    }
    if (r == LOAD_MISSING)
        root = json_pack("{s:i, s:[]}", "atmoe_tuning", DB_VERSION, "entries");
    json_t *entry = json_pack("{s:s, s:s, s:s, s:s}", "device", device->name,
                              "vendor", atmoe_vendor_name(device->vendor),
                              "type", atmoe_device_type_name(device->type),
                              "driver", device->driver_version);
    if (root == NULL || entry == NULL || json_object_update(entry, set) != 0) {
        json_decref(root);
        json_decref(entry);
        json_decref(set);
        return atm_fail(NULL, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "atmoe_tuning_save: out of host memory");
    }
    json_decref(set);
    json_t *entries = json_object_get(root, "entries");
    for (size_t i = json_array_size(entries); i-- > 0;)
        if (same_key(json_array_get(entries, i), entry))
            json_array_remove(entries, i);
    st = ATMOE_STATUS_OK;
    if (json_array_append_new(entries, entry) != 0)
        st = atm_fail(NULL, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      "atmoe_tuning_save: out of host memory");
    else if (check_db(root, NULL, err) != 0)
        st = atm_fail(NULL, ATMOE_STATUS_FORMAT_ERROR,
                      "atmoe_tuning_save: the new entry is refused: %s", err);
    else
        st = write_db(path, root);
    json_decref(root);
    return st;
}

/* ---------------------------------------------------------------- lookup */

static const char *const match_names[] = {"", "vendor+type", "device",
                                          "device+driver"};

/* 0 when e does not match dev, else 1 (vendor and type), 2 (device under
 * any driver) or 3 (device and driver): higher is more specific. */
static int specificity(const json_t *e, const atmoe_device_info *dev)
{
    const char *dn = str_field(e, "device"), *dr = str_field(e, "driver");
    if (strcmp(str_field(e, "vendor"), atmoe_vendor_name(dev->vendor)) != 0 ||
        strcmp(str_field(e, "type"), atmoe_device_type_name(dev->type)) != 0 ||
        (dn && strcmp(dn, dev->name) != 0) ||
        (dr && strcmp(dr, dev->driver_version) != 0))
        return 0;
    return 1 + (dn != NULL) + (dr != NULL);
}

/* Adds to resolved (section -> kernel -> {match, file, values}) every set
 * of e that is at least as specific as the one already there (ties are
 * entries of the same key, which resolve() never passes twice). */
static void take_sets(json_t *resolved, const json_t *e, int spec,
                      const char *file, const char *database)
{
    /* Where the entry came from, for atmoe params: which database, the
     * host it was tuned on (atmoe-tune records it), and whether it is a
     * shipped starting point rather than a tuned entry. */
    const json_t *info = json_object_get(e, "info");
    json_t *host = json_object_get(info, "host");
    int untuned = json_is_true(json_object_get(info, "untuned"));
    static const char *const sections[] = {"clblast", "kernels"};
    for (int s = 0; s < 2; s++) {
        json_t *out = json_object_get(resolved, sections[s]);
        const char *kernel;
        json_t *set;
        json_object_foreach(json_object_get(e, sections[s]), kernel, set) {
            json_t *have = json_object_get(out, kernel);
            json_t *have_spec = json_object_get(have, "spec");
            if (have && json_integer_value(have_spec) > spec)
                continue;
            json_t *rec = json_pack("{s:s, s:s, s:i, s:O, s:s, s:b}",
                                    "match", match_names[spec], "file", file,
                                    "spec", spec, "values", set, "database",
                                    database, "untuned", untuned);
            if (rec && json_is_string(host))
                json_object_set(rec, "host", host);
            json_object_set_new(out, kernel, rec);
        }
    }
}

/* Reads one database for resolve(); NULL when it is absent or unusable
 * (logged). */
static json_t *load_logged(const char *path)
{
    json_t *root = NULL;
    char err[ERR_SIZE];
    load_result r =
        path && *path ? load_db(path, 1, &root, err) : LOAD_MISSING;
    if (r == LOAD_BAD || r == LOAD_IO)
        atm_log(ATMOE_LOG_WARNING, "tuning database %s is ignored: %s", path,
                err);
    return root;
}

static int has_key(const json_t *root, const json_t *e)
{
    size_t i;
    json_t *u;
    json_array_foreach(json_object_get(root, "entries"), i, u)
        if (same_key(u, e))
            return 1;
    return 0;
}

/* The sets in force for dev from the system and user databases, or NULL
 * when out of memory.  A user entry replaces the system entry of the same
 * key whole. */
static json_t *resolve(const atmoe_device_info *dev)
{
    json_t *resolved = json_pack("{s:{}, s:{}}", "clblast", "kernels");
    if (resolved == NULL)
        return NULL;
    /* No user database is no failure here: the path is asked of the
     * environment directly, which reports to no sink. */
    char user_path[4096];
    const char *paths[2] = {atm_env_tuning_system_path(), NULL};
    if (atm_env_tuning_user_path(user_path, sizeof user_path, NULL) ==
        ATM_PATH_OK)
        paths[1] = user_path;
    json_t *roots[2] = {load_logged(paths[0]), load_logged(paths[1])};
    for (int f = 0; f < 2; f++) {
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(roots[f], "entries"), i, e) {
            int spec = specificity(e, dev);
            if (spec > 0 && (f == 1 || !has_key(roots[1], e)))
                take_sets(resolved, e, spec, paths[f],
                          f == 0 ? "system" : "user");
        }
    }
    json_decref(roots[0]);
    json_decref(roots[1]);
    return resolved;
}

/* ---------------------------------------------------------------- values */

/* Each parameter's variable, read once when the context is made (as
 * ATMOE_LINEAR_MAX_TOKENS always was); a value that is not one the
 * parameter may take is logged and ignored. */
static void read_env(atm_tuning *t)
{
    for (size_t p = 0; p < ATM_PARAM_COUNT_; p++) {
        const param_row *r = &param_rows[p];
        const char *text = atm_env_get(r->env);
        t->has_env[p] = 0;
        if (text == NULL || *text == '\0')
            continue;
        char *end, range[64];
        errno = 0;
        long long v = strtoll(text, &end, 10);
        if (*end == '\0' && errno == 0 && v >= r->lo && v <= r->hi) {
            t->env_value[p] = (long)v;
            t->has_env[p] = 1;
            continue;
        }
        range_text(r, range, sizeof range);
        atm_log(ATMOE_LOG_WARNING, "%s=%s is not an integer %s; ignored",
                atm_env_name(r->env), text, range);
    }
}

/* The values in force, from the environment, the records of t->kernels
 * (checked against the table when they were read) and the defaults. */
static void resolve_values(atm_tuning *t, const atmoe_device_info *dev)
{
    for (size_t p = 0; p < ATM_PARAM_COUNT_; p++) {
        const param_row *r = &param_rows[p];
        json_t *v = json_object_get(
            json_object_get(json_object_get(t->kernels, r->program),
                            "values"),
            r->name);
        if (t->has_env[p]) {
            t->value[p] = t->env_value[p];
            t->from[p] = FROM_ENV;
        } else if (json_is_integer(v)) {
            t->value[p] = (long)json_integer_value(v);
            t->from[p] = FROM_ENTRY;
        } else if (r->fallback >= 0) {
            /* Resolved already: the table lists it first. */
            t->value[p] = t->value[r->fallback];
            t->from[p] = t->from[r->fallback] == FROM_DEFAULT ? FROM_DEFAULT
                                                              : FROM_FALLBACK;
        } else {
            t->value[p] = dev->type == ATMOE_DEVICE_TYPE_CPU ? r->def_cpu
                                                             : r->def_other;
            t->from[p] = FROM_DEFAULT;
        }
    }
}

long atm_param_get(const atmoe_context *ctx, atm_param p)
{
    /* Callers pass an enum constant; a value outside it reads the first
     * row rather than past the array. */
    return ctx->tuning.value[(unsigned)p < ATM_PARAM_COUNT_ ? p : 0];
}

size_t atm_param_work_group(const atmoe_context *ctx, atm_param p)
{
    long v = atm_param_get(ctx, p);
    size_t max = ctx->device->info.max_work_group_size;
    size_t wg = 1;
    while (wg * 2 <= (size_t)v && wg * 2 <= max)
        wg *= 2;
    return wg;
}

int atm_param_is_default(const atmoe_context *ctx, atm_param p)
{
    return ctx->tuning.from[(unsigned)p < ATM_PARAM_COUNT_ ? p : 0] ==
           FROM_DEFAULT;
}

long atm_param_linear_block(const atmoe_context *ctx, atmoe_dtype dtype,
                            int st)
{
    switch (dtype) {
    case ATMOE_DTYPE_F32:
        return atm_param_get(ctx, st ? ATM_PARAM_LINEAR_F32_ST
                                     : ATM_PARAM_LINEAR_F32_SR);
    case ATMOE_DTYPE_F16:
        return atm_param_get(ctx, st ? ATM_PARAM_LINEAR_F16_ST
                                     : ATM_PARAM_LINEAR_F16_SR);
    case ATMOE_DTYPE_BF16:
        return atm_param_get(ctx, st ? ATM_PARAM_LINEAR_BF16_ST
                                     : ATM_PARAM_LINEAR_BF16_SR);
    case ATMOE_DTYPE_Q8:
        return atm_param_get(ctx, st ? ATM_PARAM_LINEAR_Q8_ST
                                     : ATM_PARAM_LINEAR_Q8_SR);
    case ATMOE_DTYPE_I32:
        break;
    }
    return atm_param_get(ctx, st ? ATM_PARAM_LINEAR_ST : ATM_PARAM_LINEAR_SR);
}

/* ---------------------------------------------------------------- state */

/* CLBlast's overrides outlive contexts, so what has been applied to each
 * device is remembered for the process: get_params reports it, and
 * "default" is refused once there is something it could not undo. */
static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    cl_device_id id;
    json_t *clblast; /* kernel -> {match, file, values} */
} applied[MAX_DEVICES];
static size_t applied_count;

/* The device's record, created when missing; call with state_lock held. */
static json_t *device_record(cl_device_id id)
{
    for (size_t i = 0; i < applied_count; i++)
        if (applied[i].id == id)
            return applied[i].clblast;
    if (applied_count == MAX_DEVICES)
        return NULL;
    json_t *rec = json_object();
    if (rec) {
        applied[applied_count].id = id;
        applied[applied_count++].clblast = rec;
    }
    return rec;
}

/* A copy of the device's record (an empty object when it has none). */
static json_t *device_record_copy(cl_device_id id)
{
    pthread_mutex_lock(&state_lock);
    json_t *rec = NULL;
    for (size_t i = 0; i < applied_count; i++)
        if (applied[i].id == id)
            rec = json_deep_copy(applied[i].clblast);
    pthread_mutex_unlock(&state_lock);
    return rec ? rec : json_object();
}

/* Hands one CLBlast set to CLBlast after checking it against the device;
 * the message says why not otherwise.  CLBlast's refusal reaches err
 * alone: the calls that skip a set succeed, and a success leaves the
 * context's message as it was. */
static int override_set(atmoe_context *ctx, const char *kernel,
                        const json_t *rec, char *err)
{
    const json_t *values = json_object_get(rec, "values");
    if (check_on_device(kernel, values, &ctx->device->info, err) != 0)
        return -1;
    const char *names[MAX_PARAMS];
    size_t vals[MAX_PARAMS], n = 0;
    const char *name;
    json_t *v;
    json_object_foreach((json_t *)values, name, v) {
        names[n] = name;
        vals[n++] = (size_t)json_integer_value(v);
    }
    atm_errsink before = ctx->errors;
    atmoe_status st = atm_blas_override(ctx, kernel, n, names, vals);
    if (st != ATMOE_STATUS_OK) {
        bad(err, "%s", ctx->errors.text);
        ctx->errors = before;
        return -1;
    }
    pthread_mutex_lock(&state_lock);
    json_t *dev = device_record(ctx->device->id);
    if (dev) {
        json_t *keep = json_deep_copy(rec);
        json_object_del(keep, "spec");
        json_object_set_new(dev, kernel, keep);
    }
    pthread_mutex_unlock(&state_lock);
    return 0;
}

/* The kernels' records in force become kernels (a reference taken) and
 * the values are resolved again. */
static void use_kernels(atmoe_context *ctx, json_t *kernels, const char *mode)
{
    json_decref(ctx->tuning.kernels);
    ctx->tuning.kernels = json_incref(kernels);
    ctx->tuning.mode = mode;
    resolve_values(&ctx->tuning, &ctx->device->info);
}

/* Applies resolved sets: CLBlast's to the device, the kernels' to ctx.
 * Sets the device cannot take are logged and skipped; the count of
 * skipped sets is returned. */
static int apply(atmoe_context *ctx, json_t *resolved, const char *mode)
{
    int skipped = 0;
    const char *kernel;
    json_t *rec;
    json_object_foreach(json_object_get(resolved, "clblast"), kernel, rec) {
        char err[ERR_SIZE];
        if (override_set(ctx, kernel, rec, err) != 0) {
            atm_log(ATMOE_LOG_WARNING, "tuned %s parameters from %s not "
                    "applied: %s", kernel,
                    json_string_value(json_object_get(rec, "file")), err);
            skipped++;
        }
    }
    use_kernels(ctx, json_object_get(resolved, "kernels"), mode);
    return skipped;
}

void atm_tuning_init(atmoe_context *ctx)
{
    read_env(&ctx->tuning);
    use_kernels(ctx, NULL, "default");
    const char *env = atm_env_get(ATM_ENV_PARAMS);
    if (env && strcmp(env, "default") == 0) {
        json_t *rec = device_record_copy(ctx->device->id);
        if (json_object_size(rec) > 0)
            atm_log(ATMOE_LOG_WARNING, "ATMOE_PARAMS=default, but CLBlast "
                    "parameters applied earlier in this process stay in "
                    "force on %s", ctx->device->info.name);
        json_decref(rec);
        return;
    }
    if (env && *env && strcmp(env, "tuned") != 0)
        atm_log(ATMOE_LOG_WARNING, "ATMOE_PARAMS=%s is neither 'tuned' nor "
                "'default'; using the tuned parameters", env);
    json_t *resolved = resolve(&ctx->device->info);
    if (resolved == NULL) {
        atm_log(ATMOE_LOG_WARNING, "no tuning: out of host memory");
        return;
    }
    apply(ctx, resolved, "tuned");
    json_decref(resolved);
}

void atm_tuning_release(atmoe_context *ctx)
{
    json_decref(ctx->tuning.kernels);
    ctx->tuning.kernels = NULL;
}

ATMOE_API atmoe_status atmoe_context_set_params(atmoe_context *ctx,
                                                const char *params)
{
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, params);
    if (strcmp(params, "default") == 0) {
        json_t *rec = device_record_copy(ctx->device->id);
        const char *kernel = NULL;
        void *it = json_object_iter(rec);
        if (it)
            kernel = json_object_iter_key(it);
        atmoe_status st = ATMOE_STATUS_OK;
        if (kernel)
            st = atm_fail(ctx, ATMOE_STATUS_NOT_SUPPORTED,
                          "atmoe_context_set_params: CLBlast's %s parameters "
                          "on %s were overridden earlier in this process, and "
                          "CLBlast cannot restore its built-in values (set "
                          "ATMOE_PARAMS=default before the first context "
                          "instead)", kernel, ctx->device->info.name);
        json_decref(rec);
        if (st != ATMOE_STATUS_OK)
            return st;
        use_kernels(ctx, NULL, "default");
        return ATMOE_STATUS_OK;
    }
    json_t *resolved;
    const char *mode = "tuned";
    if (strcmp(params, "tuned") == 0) {
        resolved = resolve(&ctx->device->info);
    } else if (params[0] == '{') {
        json_t *set;
        atmoe_status st = parse_params(ctx, __func__, params, &set);
        if (st != ATMOE_STATUS_OK)
            return st;
        resolved = json_pack("{s:{}, s:{}}", "clblast", "kernels");
        if (resolved)
            take_sets(resolved, set, 0, "", "explicit");
        json_decref(set);
        mode = "custom";
    } else {
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_context_set_params: params '%.64s' is neither "
                        "\"tuned\", \"default\" nor a JSON object", params);
    }
    if (resolved == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "atmoe_context_set_params: out of host memory");
    if (strcmp(mode, "custom") == 0) {
        /* An explicit set must take whole: a tuner timing it would
         * otherwise time something else. */
        const char *kernel;
        json_t *rec;
        json_object_foreach(json_object_get(resolved, "clblast"), kernel, rec) {
            char err[ERR_SIZE];
            if (check_on_device(kernel, json_object_get(rec, "values"),
                                &ctx->device->info, err) != 0) {
                json_decref(resolved);
                return atm_fail(ctx, ATMOE_STATUS_NOT_SUPPORTED,
                                "atmoe_context_set_params: %s", err);
            }
        }
    }
    int skipped = apply(ctx, resolved, mode);
    json_decref(resolved);
    if (skipped && strcmp(mode, "custom") == 0)
        return atm_fail(ctx, ATMOE_STATUS_BLAS_ERROR,
                        "atmoe_context_set_params: CLBlast refused %d of the "
                        "sets (see the log)", skipped);
    return ATMOE_STATUS_OK;
}

/* The origin of a record (take_sets) in its public form: "database"
 * (system, user or explicit), "untuned" (a shipped class default, an
 * untuned starting point) and "host" (the machine atmoe-tune ran on,
 * when the entry says). */
static void add_origin(json_t *out, const json_t *rec)
{
    json_t *v;
    if (out == NULL)
        return;
    if ((v = json_object_get(rec, "database")))
        json_object_set(out, "database", v);
    if ((v = json_object_get(rec, "untuned")))
        json_object_set(out, "untuned", v);
    if ((v = json_object_get(rec, "host")))
        json_object_set(out, "host", v);
}

/* The public form of a record: match ("explicit" for a set given
 * directly), file, and values under values_name. */
static json_t *public_record(const json_t *rec, const char *values_name,
                             json_t *values)
{
    const char *match = json_string_value(json_object_get(rec, "match"));
    json_t *out = json_pack("{s:s, s:O, s:o}", "match",
                            *match ? match : "explicit", "file",
                            json_object_get(rec, "file"), values_name, values);
    add_origin(out, rec);
    return out;
}

/* CLBlast's records as they are. */
static json_t *public_clblast(json_t *section)
{
    json_t *out = json_object();
    const char *kernel;
    json_t *rec;
    json_object_foreach(section, kernel, rec)
        json_object_set_new(out, kernel,
                            public_record(rec, "params",
                                          json_incref(json_object_get(
                                              rec, "values"))));
    return out;
}

/* The library's programs whose parameters do not all stand at their
 * defaults: the values in force of every parameter ("defines") and where
 * each came from ("from": the variable's name, "database", "explicit" or
 * "default"), beside the record that matched (match "none" when values
 * came from the environment alone). */
static int listed(const atm_tuning *t, const char *program)
{
    if (json_object_get(t->kernels, program))
        return 1;
    for (size_t p = 0; p < ATM_PARAM_COUNT_; p++)
        if (strcmp(param_rows[p].program, program) == 0 &&
            t->from[p] == FROM_ENV)
            return 1;
    return 0;
}

static json_t *public_kernels(const atm_tuning *t)
{
    json_t *out = json_object();
    for (size_t p = 0; p < ATM_PARAM_COUNT_; p++) {
        const param_row *r = &param_rows[p];
        json_t *rec = json_object_get(t->kernels, r->program);
        if (!listed(t, r->program))
            continue;
        json_t *prog = json_object_get(out, r->program);
        if (prog == NULL) {
            prog = rec ? public_record(rec, "defines", json_object())
                       : json_pack("{s:s, s:s, s:{}}", "match", "none",
                                   "file", "", "defines");
            json_object_set_new(prog, "from", json_object());
            json_object_set_new(out, r->program, prog);
        }
        const char *from = t->from[p] == FROM_ENV ? atm_env_name(r->env)
                           : t->from[p] == FROM_DEFAULT ? "default"
                           : t->from[p] == FROM_FALLBACK
                               ? param_rows[r->fallback].program
                           : strcmp(t->mode, "custom") == 0 ? "explicit"
                                                             : "database";
        json_object_set_new(json_object_get(prog, "defines"), r->name,
                            json_integer(t->value[p]));
        json_object_set_new(json_object_get(prog, "from"), r->name,
                            json_string(from));
    }
    return out;
}

/* For every program of the table and every CLBlast kernel in force,
 * where its parameters came from as a whole: "environment" when a
 * variable sets one of them, else the record's database ("system",
 * "user", "explicit"), else "default" (the library's built-in values);
 * with the record's origin (add_origin) and match.  atmoe params reads
 * this to say which entry each kernel used. */
static json_t *public_sources(const atm_tuning *t, json_t *clblast)
{
    json_t *out = json_object();
    for (size_t p = 0; p < ATM_PARAM_COUNT_ && out; p++) {
        const param_row *r = &param_rows[p];
        json_t *src = json_object_get(out, r->program);
        if (src == NULL) {
            json_t *rec = json_object_get(t->kernels, r->program);
            src = json_pack("{s:s}", "from", "default");
            if (rec) {
                const char *match =
                    json_string_value(json_object_get(rec, "match"));
                json_object_set_new(src, "match",
                                    json_string(*match ? match : "explicit"));
                json_object_set(src, "file", json_object_get(rec, "file"));
                json_object_set_new(
                    src, "from",
                    json_string(strcmp(t->mode, "custom") == 0
                                    ? "explicit"
                                    : json_string_value(json_object_get(
                                          rec, "database"))
                                          ? json_string_value(json_object_get(
                                                rec, "database"))
                                          : "database"));
                add_origin(src, rec);
            }
            json_object_set_new(out, r->program, src);
        }
        if (t->from[p] == FROM_ENV)
            json_object_set_new(src, "from", json_string("environment"));
        else if (t->from[p] == FROM_FALLBACK &&
                 json_object_get(t->kernels, r->program) == NULL) {
            /* No record of its own: the values of the row's fallback
             * (linear.f32 takes linear's), said as "as PROGRAM". */
            json_object_set_new(src, "from", json_string("fallback"));
            json_object_set_new(src, "as",
                                json_string(param_rows[r->fallback].program));
        }
    }
    const char *kernel;
    json_t *rec;
    json_object_foreach(clblast, kernel, rec) {
        char name[64];
        snprintf(name, sizeof name, "clblast.%s", kernel);
        const char *match = json_string_value(json_object_get(rec, "match"));
        json_t *db = json_object_get(rec, "database");
        json_t *src = json_pack("{s:s, s:s, s:O}", "from",
                                json_is_string(db) ? json_string_value(db)
                                                   : "database",
                                "match", match && *match ? match : "explicit",
                                "file", json_object_get(rec, "file"));
        add_origin(src, rec);
        json_object_set_new(out, name, src);
    }
    return out;
}

ATMOE_API atmoe_status atmoe_context_get_params(const atmoe_context *ctx,
                                                char *json, size_t size,
                                                size_t *needed)
{
    ATM_CHECK_NULL(NULL, ctx);
    /* json NULL with size 0 asks for the size alone, as snprintf does. */
    if (json == NULL && (size != 0 || needed == NULL))
        return atm_fail(ctx, ATMOE_STATUS_NULL_POINTER,
                        "atmoe_context_get_params: json is NULL; a size query "
                        "passes size 0 and needed");
    json_t *rec = device_record_copy(ctx->device->id);
    json_t *out = json_pack("{s:s, s:o, s:o, s:o}", "mode", ctx->tuning.mode,
                            "clblast", public_clblast(rec), "kernels",
                            public_kernels(&ctx->tuning), "sources",
                            public_sources(&ctx->tuning, rec));
    json_decref(rec);
    char *text = out ? json_dumps(out, JSON_INDENT(2)) : NULL;
    json_decref(out);
    if (text == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "atmoe_context_get_params: out of host memory");
    size_t len = strlen(text) + 1;
    if (needed)
        *needed = len;
    atmoe_status st = ATMOE_STATUS_OK;
    if (json == NULL)
        ; /* the size alone */
    else if (len > size)
        st = atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                      "atmoe_context_get_params: the description needs %zu "
                      "bytes, the buffer holds %zu", len, size);
    else
        memcpy(json, text, len);
    atm_free(text);
    return st;
}
