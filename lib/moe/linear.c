/* Launches of cl/linear.cl for the operations of this layer (linear.h):
 * the tile of each batch, the kernels' build options and their arguments. */
#include <config.h>

#include <stdio.h>

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
 * within 10% of the best tile from 4 to 512 tokens.  The block comes from
 * the "linear" entry of the tuning database when it has one: 8 x 8 was the
 * best of 4 to 64 at 64 and 512 tokens on PoCL. */
typedef struct linear_shape {
    size_t rows, tokens; /* the tile */
    size_t sr, st;       /* the block */
} linear_shape;

static linear_shape linear_shape_for(size_t T, unsigned sr, unsigned st)
{
    linear_shape s = {T <= 2 ? 8 : 4, T <= 2 ? T : 4, sr, st};
    return s;
}

int atm_linear_slot(int first, size_t T)
{
    return first + (T == 1 ? 0 : T == 2 ? 1 : 2);
}

atmoe_status atm_linear_kernel(atmoe_graph *g, atm_node *n, int first,
                               size_t b, int wt, int bt, unsigned sr,
                               unsigned st)
{
    linear_shape s = linear_shape_for(b, sr, st);
    char options[96];
    snprintf(options, sizeof options,
             "-DROWS=%zu -DTB=%zu -DSR=%zu -DST=%zu -DWT=%d -DBT=%d", s.rows,
             s.tokens, s.sr, s.st, wt, bt);
    return atm_node_kernel(g, n, atm_linear_slot(first, b), "linear", options,
                           "linear");
}

atmoe_status atm_linear_run(atmoe_graph *g, const atm_node *n, size_t T,
                            int first, unsigned sr, unsigned st,
                            const atm_linear_call *c, cl_event *ev)
{
    linear_shape shape = linear_shape_for(T, sr, st);
    /* Unused buffers are bound to x: kernels need a valid cl_mem. */
    const atmoe_tensor *bias = c->bias ? c->bias : c->x;
    atm_args args = {n->kernel[atm_linear_slot(first, T)], 0, CL_SUCCESS};
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
