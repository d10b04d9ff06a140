/* Launches of cl/linear.cl, its group variant cl/linear_gpu.cl and its
 * tile variant cl/linear_tile.cl for the operations of this layer
 * (linear.h): the variant, the tile of each batch, the kernels' build
 * options and their arguments. */
#include <config.h>

#include <limits.h>
#include <stdio.h>

#include "device/params.h"
#include "moe/linear.h"

int atm_weight_type(atmoe_dtype dtype)
{
    switch (dtype) {
    case ATMOE_DTYPE_F32: return 0;
    case ATMOE_DTYPE_F16: return 1;
    case ATMOE_DTYPE_BF16: return 2;
    case ATMOE_DTYPE_I32:
    case ATMOE_DTYPE_Q8: break;
    }
    return -1;
}

static size_t tile_items(const atm_linear_tune *t);
static size_t tile_local_bytes(const atm_linear_tune *t);

/* Whether the tile divides into work-items' blocks and its work-group and
 * local memory fit the device. */
static int tile_fits(const atm_linear_tune *t, const atmoe_device_info *dev)
{
    return t->tm % t->wm == 0 && t->tn % t->wn == 0 &&
           tile_items(t) <= dev->max_work_group_size &&
           tile_local_bytes(t) <= dev->local_mem_bytes;
}

/* The group variant's shape on this device: GROUP_SIZE rounded down to a
 * power of two (its tree halves it) and to the device's work-group size,
 * then halved until the GROUP_ROWS x 4 x GROUP_SIZE floats of its largest
 * tile (4 tokens) take at most half the local memory, so that the driver
 * keeps room for two groups a compute unit. */
void atm_linear_tune_get(const atmoe_context *ctx, atmoe_dtype dtype,
                         atm_linear_tune *t)
{
    const atmoe_device_info *dev = &ctx->device->info;
    long gs = atm_param_get(ctx, ATM_PARAM_LINEAR_GROUP_SIZE);
    long gr = atm_param_get(ctx, ATM_PARAM_LINEAR_GROUP_ROWS);
    unsigned log2 = 0;
    while ((2L << log2) <= gs && (2UL << log2) <= dev->max_work_group_size)
        log2++;
    while (log2 > 0 &&
           (uint64_t)gr * 4 * (1UL << log2) * sizeof(float) >
               dev->local_mem_bytes / 2)
        log2--;
    t->sr = (unsigned short)atm_param_linear_block(ctx, dtype, 0);
    t->st = (unsigned short)atm_param_linear_block(ctx, dtype, 1);
    /* cl/linear_gpu.cl reads f32, f16 and bf16; 8-bit blocks run on the
     * CPU-shaped kernel whatever the variant in force. */
    t->variant = atm_param_get(ctx, ATM_PARAM_LINEAR_VARIANT) == 1 &&
                         dtype != ATMOE_DTYPE_Q8
                     ? ATM_LINEAR_GROUP
                     : ATM_LINEAR_CPU;
    t->group_log2 = (unsigned char)log2;
    t->group_rows = (unsigned char)gr;
    /* cl/linear.cl's vectors: the parameter, else the device's native
     * float width (a CPU driver's SIMD width); 16 from 16, else 8. */
    long vw = atm_param_get(ctx, ATM_PARAM_LINEAR_VECTOR_WIDTH);
    if (vw == 0) {
        cl_uint native = 0;
        if (clGetDeviceInfo(ctx->device->id,
                            CL_DEVICE_NATIVE_VECTOR_WIDTH_FLOAT,
                            sizeof native, &native, NULL) != CL_SUCCESS)
            native = 16;
        vw = native;
    }
    t->vw = vw >= 16 ? 16 : 8;
    /* The tile's sizes as the table allows them (at most 128 each); their
     * fit to the device is checked when the kernel is built. */
    long from = atm_param_get(ctx, ATM_PARAM_LINEAR_TILE_MIN_TOKENS);
    t->tile_from = from < (long)UINT_MAX ? (unsigned)from : UINT_MAX;
    t->tm = (unsigned char)atm_param_get(ctx, ATM_PARAM_LINEAR_TILE_TOKENS);
    t->tn = (unsigned char)atm_param_get(ctx, ATM_PARAM_LINEAR_TILE_ROWS);
    t->tk = (unsigned char)atm_param_get(ctx, ATM_PARAM_LINEAR_TILE_K);
    t->wm = (unsigned char)atm_param_get(ctx, ATM_PARAM_LINEAR_TILE_WT);
    t->wn = (unsigned char)atm_param_get(ctx, ATM_PARAM_LINEAR_TILE_WR);
    /* The tile is on by default on GPUs: where that default tile does not
     * fit the device, its batches stay on the variant of the smaller ones
     * rather than fail to plan.  A tile asked for (TILE_MIN_TOKENS from a
     * database, a set or the environment) is checked, and refused, when
     * its kernel is built. */
    if (atm_param_is_default(ctx, ATM_PARAM_LINEAR_TILE_MIN_TOKENS) &&
        !tile_fits(t, dev))
        t->tile_from = UINT_MAX;
}

int atm_base_weight_type(atmoe_dtype dtype)
{
    return dtype == ATMOE_DTYPE_Q8 ? 3 : atm_weight_type(dtype);
}

/* The shape of a launch of cl/linear.cl for T tokens: the tile, rows and
 * tokens per work-item, and the block of SR x ST tiles walked together.
 * The launch size depends on all four, so the host chooses them and passes
 * them as build options.
 *
 * The tile: one token streams 8 rows; more tokens share each row load, up
 * to a 4 x 4 tile of float16 sums, which fills half of AVX-512's
 * registers.  Larger tiles spill; on PoCL 3.1 (2-core AVX-512) 4 x 4 was
 * within 10% of the best tile from 4 to 512 tokens.  With float8 vectors
 * (vw 8: AVX2's 16 registers) the tile is 4 x 3, twelve sums, three
 * tokens and a row: on PoCL 3.1 (2-core AVX2) it ran the rank-1 layer's
 * T = 512, d = 4096 product at 1.2 to 1.5 times the rate of 4 x 4 and as
 * fast as 5 x 2 or better, and 4 x 4 of float8 at 1.5 to 2.5 times that
 * of 4 x 4 of float16.  The block comes from the "linear" entry of the
 * tuning database when it has one: 8 x 8 was the best of 4 to 64 at 64
 * and 512 tokens on PoCL. */
typedef struct linear_shape {
    size_t rows, tokens; /* the tile */
    size_t sr, st;       /* the block */
} linear_shape;

static linear_shape linear_shape_for(size_t T, const atm_linear_tune *t)
{
    linear_shape s = {T <= 2 ? 8 : 4, T <= 2 ? T : t->vw == 16 ? 4 : 3,
                      t->sr, t->st};
    return s;
}

int atm_linear_slot(int first, size_t T, const atm_linear_tune *t)
{
    if (T >= t->tile_from)
        return first + 3;
    return first + (T == 1 ? 0 : T == 2 ? 1 : 2);
}

/* The tile's work-items and bytes of local memory (cl/linear_tile.cl: two
 * staging blocks of TK rows, each a word longer than the tile). */
static size_t tile_items(const atm_linear_tune *t)
{
    return (size_t)(t->tm / t->wm) * (t->tn / t->wn);
}

static size_t tile_local_bytes(const atm_linear_tune *t)
{
    return (size_t)t->tk * ((size_t)t->tm + 1 + t->tn + 1) * sizeof(float);
}

/* The tile variant's kernel into slot, after checking that the tile is
 * one the kernel and the device can run. */
static atmoe_status tile_kernel(atmoe_graph *g, atm_node *n, int slot,
                                int wt, int bt, const atm_linear_tune *t)
{
    const atmoe_device_info *dev = &g->ctx->device->info;
    if (t->tm % t->wm != 0 || t->tn % t->wn != 0)
        return atm_fail(g->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                        "linear_tile for node '%s': a work-item's block "
                        "(kernels.linear.TILE_WT = %u tokens, TILE_WR = %u "
                        "rows) does not divide the tile (TILE_TOKENS = %u, "
                        "TILE_ROWS = %u)",
                        n->name, (unsigned)t->wm, (unsigned)t->wn,
                        (unsigned)t->tm, (unsigned)t->tn);
    size_t items = tile_items(t), local = tile_local_bytes(t);
    if (items > dev->max_work_group_size)
        return atm_fail(g->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                        "linear_tile for node '%s': its tile needs "
                        "work-groups of %zu work-items (TILE_TOKENS / "
                        "TILE_WT x TILE_ROWS / TILE_WR), more than this "
                        "device allows (%zu)",
                        n->name, items, dev->max_work_group_size);
    if (local > dev->local_mem_bytes)
        return atm_fail(g->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                        "linear_tile for node '%s': its tile needs %zu bytes "
                        "of local memory (4 TILE_K (TILE_TOKENS + TILE_ROWS "
                        "+ 2)), more than this device has (%llu)",
                        n->name, local,
                        (unsigned long long)dev->local_mem_bytes);
    char options[128];
    snprintf(options, sizeof options,
             "-DTM=%u -DTN=%u -DTK=%u -DWM=%u -DWN=%u -DWT=%d -DBT=%d",
             (unsigned)t->tm, (unsigned)t->tn, (unsigned)t->tk,
             (unsigned)t->wm, (unsigned)t->wn, wt, bt);
    atmoe_status st =
        atm_node_kernel(g, n, slot, "linear_tile", options, "linear_tile");
    if (st != ATMOE_STATUS_OK)
        return st;
    /* The driver's own limit for this kernel (registers) may be lower
     * than the device's. */
    size_t most = 0;
    cl_int err = clGetKernelWorkGroupInfo(n->kernel[slot], g->ctx->device->id,
                                          CL_KERNEL_WORK_GROUP_SIZE,
                                          sizeof most, &most, NULL);
    if (err == CL_SUCCESS && most < items)
        return atm_fail(g->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                        "linear_tile for node '%s': %zu work-items a group, "
                        "this device runs at most %zu of this kernel; lower "
                        "kernels.linear.TILE_TOKENS or TILE_ROWS, or raise "
                        "TILE_WT or TILE_WR",
                        n->name, items, most);
    return ATMOE_STATUS_OK;
}

/* The group variant's token tile: that of cl/linear.cl at 1 and 2 tokens,
 * 4 beyond (the kernel walks the batch's tiles). */
static size_t group_tokens(size_t T)
{
    return T <= 2 ? T : 4;
}

/* The decode variant's kernel for batches of b tokens (1, 2 or 3). */
static atmoe_status decode_kernel(atmoe_graph *g, atm_node *n, int first,
                                  size_t b, int wt, int bt,
                                  const atm_linear_tune *t)
{
    char options[128];
    if (t->variant == ATM_LINEAR_GROUP) {
        snprintf(options, sizeof options,
                 "-DGS=%u -DGR=%u -DTB=%zu -DWT=%d -DBT=%d",
                 1U << t->group_log2, (unsigned)t->group_rows,
                 group_tokens(b), wt, bt);
        atmoe_status st = atm_node_kernel(g, n, first + (int)b - 1,
                                          "linear_gpu", options,
                                          "linear_group");
        if (st != ATMOE_STATUS_OK)
            return st;
        /* A driver may run fewer items a group for this kernel than the
         * device's limit (registers): say so at planning rather than fail
         * each launch. */
        size_t most = 0;
        cl_int err = clGetKernelWorkGroupInfo(
            n->kernel[first + (int)b - 1], g->ctx->device->id,
            CL_KERNEL_WORK_GROUP_SIZE, sizeof most, &most, NULL);
        if (err == CL_SUCCESS && most < (1UL << t->group_log2))
            return atm_fail(g->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                            "linear_group for node '%s': %u work-items a "
                            "group, this device runs at most %zu of this "
                            "kernel; lower kernels.linear.GROUP_SIZE",
                            n->name, 1U << t->group_log2, most);
        return ATMOE_STATUS_OK;
    }
    linear_shape s = linear_shape_for(b, t);
    snprintf(options, sizeof options,
             "-DROWS=%zu -DTB=%zu -DSR=%zu -DST=%zu -DVW=%u -DWT=%d -DBT=%d",
             s.rows, s.tokens, s.sr, s.st, (unsigned)t->vw, wt, bt);
    return atm_node_kernel(g, n, first + (int)b - 1, "linear", options,
                           "linear");
}

atmoe_status atm_linear_kernels(atmoe_graph *g, atm_node *n, int first,
                                size_t T, size_t upto, int wt, int bt,
                                const atm_linear_tune *t)
{
    size_t most = T < upto ? T : upto;
    atmoe_status st = ATMOE_STATUS_OK;
    /* Batches of 1, 2 and 3+ tokens below the tile's smallest. */
    for (size_t b = 1; b <= 3 && b <= most && b < t->tile_from; b++)
        if ((st = decode_kernel(g, n, first, b, wt, bt, t)) !=
            ATMOE_STATUS_OK)
            return st;
    if (t->tile_from <= most)
        st = tile_kernel(g, n, first + 3, wt, bt, t);
    return st;
}

atmoe_status atm_linear_run(atmoe_graph *g, const atm_node *n, size_t T,
                            int first, const atm_linear_tune *t,
                            const atm_linear_call *c, cl_event *ev)
{
    /* Unused buffers are bound to x: kernels need a valid cl_mem. */
    const atmoe_tensor *bias = c->bias ? c->bias : c->x;
    atm_args args = {n->kernel[atm_linear_slot(first, T, t)], 0,
                     CL_SUCCESS};
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
    if (T >= t->tile_from) {
        /* A group for every tile of TILE_TOKENS x TILE_ROWS outputs. */
        size_t groups = (c->rows + t->tn - 1) / t->tn * ((T + t->tm - 1) / t->tm);
        size_t items = tile_items(t);
        return atm_node_launch_local(g, n, &args, "linear_tile",
                                     groups * items, items, ev);
    }
    if (t->variant == ATM_LINEAR_GROUP) {
        /* A group of GS items for every GROUP_ROWS rows. */
        size_t gs = (size_t)1 << t->group_log2;
        size_t groups = (c->rows + t->group_rows - 1) / t->group_rows;
        return atm_node_launch_local(g, n, &args, "linear_group",
                                     groups * gs, gs, ev);
    }
    linear_shape shape = linear_shape_for(T, t);
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
