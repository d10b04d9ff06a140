/* Planning: which nodes run, in which order, and where in one device arena
 * each intermediate lives.  Memory is handed out best fit from a free list;
 * a node's memory is released after its last reader (counting the readers
 * of reshapes that share it), and an operation that allows it writes over
 * its first operand when that operand dies with it. */
#include <config.h>

#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "graph/graph.h"
#include "base/log.h"

typedef struct block {
    size_t offset, size;
} block;

typedef struct allocator {
    block *free;
    size_t count, capacity;
    size_t end; /* arena size so far */
    size_t align;
} allocator;

static size_t round_up(size_t x, size_t a)
{
    return (x + a - 1) / a * a;
}

static size_t take(allocator *al, size_t size)
{
    size = round_up(size, al->align);
    size_t best = SIZE_MAX;
    for (size_t i = 0; i < al->count; i++)
        if (al->free[i].size >= size &&
            (best == SIZE_MAX || al->free[i].size < al->free[best].size))
            best = i;
    if (best != SIZE_MAX) {
        size_t off = al->free[best].offset;
        al->free[best].offset += size;
        al->free[best].size -= size;
        if (al->free[best].size == 0) {
            memmove(&al->free[best], &al->free[best + 1],
                    (al->count - best - 1) * sizeof *al->free);
            al->count--;
        }
        return off;
    }
    /* A free block at the end of the arena grows instead of being skipped. */
    if (al->count && al->free[al->count - 1].offset +
                             al->free[al->count - 1].size == al->end) {
        size_t off = al->free[--al->count].offset;
        al->end = off + size;
        return off;
    }
    size_t off = al->end;
    al->end += size;
    return off;
}

/* Returns a block to the free list, kept sorted and coalesced. */
static int give(allocator *al, size_t offset, size_t size)
{
    size = round_up(size, al->align);
    size_t i = 0;
    while (i < al->count && al->free[i].offset < offset)
        i++;
    int merge_prev = i > 0 && al->free[i - 1].offset + al->free[i - 1].size ==
                                  offset;
    int merge_next = i < al->count && offset + size == al->free[i].offset;
    if (merge_prev && merge_next) {
        al->free[i - 1].size += size + al->free[i].size;
        memmove(&al->free[i], &al->free[i + 1],
                (al->count - i - 1) * sizeof *al->free);
        al->count--;
    } else if (merge_prev) {
        al->free[i - 1].size += size;
    } else if (merge_next) {
        al->free[i].offset = offset;
        al->free[i].size += size;
    } else {
        if (al->count == al->capacity) {
            size_t cap = al->capacity ? al->capacity * 2 : 16;
            block *p = atm_realloc(al->free, cap * sizeof *p);
            if (p == NULL)
                return 0;
            al->free = p;
            al->capacity = cap;
        }
        memmove(&al->free[i + 1], &al->free[i],
                (al->count - i) * sizeof *al->free);
        al->free[i] = (block){offset, size};
        al->count++;
    }
    return 1;
}

int atm_graph_is_planned(const atmoe_graph *g)
{
    return g->planned && g->count == g->planned_count;
}

void atm_graph_unplan(atmoe_graph *g)
{
    if (!g->planned)
        return;
    for (size_t i = 0; i < g->count; i++) {
        atm_node *n = &g->nodes[i];
        if (n->event)
            clReleaseEvent(n->event);
        if (n->event_last)
            clReleaseEvent(n->event_last);
        n->event = n->event_last = NULL;
        n->rows_set = 0;
    }
    if (g->arena)
        clReleaseMemObject(g->arena);
    if (g->gemm_temp)
        clReleaseMemObject(g->gemm_temp);
    g->arena = g->gemm_temp = NULL;
    g->gemm_temp_bytes = 0;
    atm_free(g->order);
    g->order = NULL;
    g->order_count = 0;
    g->planned = 0;
    g->batch = 0;
    memset(&g->memory, 0, sizeof g->memory);
}

static size_t node_bytes(const atm_node *n)
{
    size_t count = 1;
    for (int i = 0; i < n->ndim; i++)
        count *= n->shape[i];
    return count * atmoe_dtype_size(n->dtype);
}

/* Marks what the outputs need, walking back from them; creation order is
 * already a topological order, since an operation only names nodes that
 * existed before it. */
static size_t mark_needed(atmoe_graph *g)
{
    for (size_t i = 0; i < g->count; i++)
        g->nodes[i].needed = g->nodes[i].is_output;
    for (size_t i = g->count; i-- > 0;) {
        atm_node *n = &g->nodes[i];
        if (!n->needed)
            continue;
        for (int j = 0; j < n->nsrc; j++)
            if (n->src[j] != ATMOE_NODE_NONE)
                g->nodes[n->src[j]].needed = 1;
    }
    size_t count = 0;
    for (size_t i = 0; i < g->count; i++) {
        atm_node *n = &g->nodes[i];
        /* A kernel writes all its outputs, needed or not. */
        for (int j = 0; j < 2; j++)
            if (n->needed && n->co[j] != ATMOE_NODE_NONE)
                g->nodes[n->co[j]].needed = 1;
        count += n->needed;
    }
    return count;
}

static int has_storage(const atm_node *n)
{
    return n->storage != NULL;
}

/* Whether another operand of n reads the memory of its first operand in
 * another layout, which writing the result over it would corrupt.  The
 * same layout is fine for element-wise add and mul: each element is read
 * before it is written, by the work-item that writes it. */
static int operand_shared(const atmoe_graph *g, const atm_node *n)
{
    int owner = g->nodes[n->src[0]].owner;
    for (int j = 1; j < n->nsrc; j++) {
        if (n->src[j] == ATMOE_NODE_NONE || g->nodes[n->src[j]].owner != owner)
            continue;
        const atm_node *o = &g->nodes[n->src[j]];
        int same = (n->op->flags & ATM_OPF_ELEMENTWISE) &&
                   o->ndim == n->ndim &&
                   memcmp(o->shape, n->shape, (size_t)n->ndim *
                                                  sizeof *n->shape) == 0;
        if (!same)
            return 1;
    }
    return 0;
}

static atmoe_status assign_memory(atmoe_graph *g, unsigned flags)
{
    allocator al = {NULL, 0, 0, 0, 256};
    if (g->ctx->base_align > al.align)
        al.align = g->ctx->base_align;
    atmoe_graph_memory *mem = &g->memory;

    /* Owners and liveness. */
    for (size_t k = 0; k < g->order_count; k++) {
        atm_node *n = &g->nodes[g->order[k]];
        n->owner = g->order[k];
        n->last_use = (int)k;
        n->pinned = (n->op->flags & ATM_OPF_INPUT) != 0;
        n->bytes = node_bytes(n);
        n->offset = 0;
        if (n->op->flags & ATM_OPF_ALIAS)
            n->owner = g->nodes[n->src[0]].owner;
        for (int j = 0; j < n->nsrc; j++)
            if (n->src[j] != ATMOE_NODE_NONE) {
                atm_node *o = &g->nodes[g->nodes[n->src[j]].owner];
                if (o->last_use < (int)k)
                    o->last_use = (int)k;
            }
    }
    for (size_t k = 0; k < g->order_count; k++) {
        atm_node *n = &g->nodes[g->order[k]];
        if (n->is_output)
            g->nodes[n->owner].pinned = 1;
    }

    /* Inputs first: they hold data from set_input until the compute that
     * reads them, so no intermediate that runs before their first reader
     * may share their memory. */
    for (size_t k = 0; k < g->order_count; k++) {
        atm_node *n = &g->nodes[g->order[k]];
        if (n->op->flags & ATM_OPF_INPUT)
            n->offset = take(&al, n->bytes);
    }

    atmoe_status st = ATMOE_STATUS_OK;
    for (size_t k = 0; k < g->order_count; k++) {
        int id = g->order[k];
        atm_node *n = &g->nodes[id];
        if (has_storage(n) || n->owner != id)
            goto release;
        mem->intermediate_bytes += round_up(n->bytes, al.align);
        if (n->pinned)
            mem->pinned_bytes += round_up(n->bytes, al.align);
        if (n->op->flags & (ATM_OPF_SECONDARY | ATM_OPF_INPUT))
            goto release; /* placed already, or with the node writing it */

        /* In place: the first operand's memory, when this node is its last
         * reader, holds enough, and is ours to overwrite. */
        atm_node *s = n->nsrc ? &g->nodes[g->nodes[n->src[0]].owner] : NULL;
        if (!(flags & (ATMOE_PLAN_NO_INPLACE | ATMOE_PLAN_NO_REUSE)) &&
            (n->op->flags & ATM_OPF_INPLACE) && s && !has_storage(s) && !s->pinned &&
            s->last_use == (int)k && s->bytes >= n->bytes &&
            g->nodes[n->src[0]].dtype == n->dtype &&
            round_up(s->bytes, al.align) == round_up(n->bytes, al.align) &&
            !operand_shared(g, n)) {
            n->offset = s->offset;
            /* This node now owns the block; the operand's owner must not
             * free it at this step. */
            s->last_use = -1;
            for (size_t m = 0; m < g->order_count; m++)
                if (g->nodes[g->order[m]].owner == (int)(s - g->nodes))
                    g->nodes[g->order[m]].owner = id;
            s->owner = id;
        } else {
            n->offset = take(&al, n->bytes);
        }
        for (int j = 0; j < 2; j++)
            if (n->co[j] != ATMOE_NODE_NONE) {
                atm_node *co = &g->nodes[n->co[j]];
                co->offset = take(&al, co->bytes);
            }
        /* Scratch lives for this step only (for all of the plan with
         * NO_REUSE). */
        if (n->work_bytes) {
            mem->intermediate_bytes += round_up(n->work_bytes, al.align);
            n->work_offset = take(&al, n->work_bytes);
            if (!(flags & ATMOE_PLAN_NO_REUSE) &&
                !give(&al, n->work_offset, n->work_bytes)) {
                st = atm_fail(g->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                              "atmoe_graph_plan: out of host memory");
                break;
            }
        }

    release:
        if (flags & ATMOE_PLAN_NO_REUSE)
            continue;
        /* Free every owner whose last reader is this step. */
        for (int j = -1; j < n->nsrc; j++) {
            int src = j < 0 ? id : n->src[j];
            if (src == ATMOE_NODE_NONE)
                continue;
            atm_node *o = &g->nodes[g->nodes[src].owner];
            if (o->last_use == (int)k && !o->pinned && !has_storage(o)) {
                o->last_use = -1; /* freed once */
                if (!give(&al, o->offset, o->bytes)) {
                    st = atm_fail(g->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                                  "atmoe_graph_plan: out of host memory");
                    break;
                }
            }
        }
        if (st != ATMOE_STATUS_OK)
            break;
    }
    atm_free(al.free);
    mem->arena_bytes = al.end;
    return st;
}

/* Builds each node's kernels and decides its routes, then asks it for
 * the arena scratch it needs while it runs (both at the planned batch). */
static atmoe_status prepare_nodes(atmoe_graph *g)
{
    for (size_t k = 0; k < g->order_count; k++) {
        atm_node *n = &g->nodes[g->order[k]];
        const atm_op *op = n->op;
        atmoe_status st = ATMOE_STATUS_OK;
        memset(n->kernel, 0, sizeof n->kernel);
        if (op->program)
            st = atm_node_kernel(g, n, 0, op->program, NULL, op->kernel);
        if (st == ATMOE_STATUS_OK && op->prepare)
            st = op->prepare(g, n);
        if (st != ATMOE_STATUS_OK)
            return st;
        n->work_bytes = op->scratch ? op->scratch(g, n) : 0;
    }
    return ATMOE_STATUS_OK;
}

/* The CLBlast scratch of the largest need over every node at the largest
 * batch, with the plan's offsets: CLBlast pads or transposes operands in
 * it, and would otherwise allocate device memory on every call. */
static atmoe_status size_gemm_scratch(atmoe_graph *g)
{
    size_t batch = g->max_batch ? g->max_batch : 1, need = 0;
    for (size_t k = 0; k < g->order_count; k++)
        atm_node_set_runtime(g, &g->nodes[g->order[k]], batch);
    for (size_t k = 0; k < g->order_count; k++) {
        atm_node *n = &g->nodes[g->order[k]];
        if (n->op->gemm_scratch) {
            size_t bytes = n->op->gemm_scratch(g, n);
            if (bytes > need)
                need = bytes;
        }
    }
    g->gemm_temp_bytes = need;
    g->memory.gemm_scratch_bytes = need;
    if (need == 0)
        return ATMOE_STATUS_OK;
    return atm_buffer_new(g->ctx, need, &g->gemm_temp,
                          "atmoe_graph_plan: GEMM scratch");
}

ATMOE_API atmoe_status atmoe_graph_plan(atmoe_graph *g, unsigned flags)
{
    ATM_CHECK_NULL(NULL, g);
    if (flags & ~(ATMOE_PLAN_NO_REUSE | ATMOE_PLAN_NO_INPLACE))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_graph_plan: unknown flags 0x%x", flags);
    atm_graph_unplan(g);
    size_t needed = mark_needed(g);
    if (needed == 0)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_graph_plan: the graph has no output "
                        "(atmoe_graph_mark_output marks one)");
    g->order = atm_malloc(needed * sizeof *g->order);
    if (g->order == NULL)
        return atm_fail(g->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "atmoe_graph_plan: out of host memory");
    for (size_t i = 0; i < g->count; i++)
        if (g->nodes[i].needed)
            g->order[g->order_count++] = (int)i;
    g->memory.nodes_computed = g->order_count;
    g->planned_count = g->count;
    g->planned = 1; /* so that a failure below unplans what was made */
    g->plan_flags = flags;

    /* Kernels, routes and scratch now, so that computing decides nothing
     * and allocates nothing. */
    atmoe_status st = prepare_nodes(g);
    if (st == ATMOE_STATUS_OK)
        st = assign_memory(g, flags);
    if (st == ATMOE_STATUS_OK && g->memory.arena_bytes > 0) {
        st = atm_buffer_new(g->ctx, g->memory.arena_bytes, &g->arena,
                            "atmoe_graph_plan: the arena");
    }
    if (st == ATMOE_STATUS_OK)
        st = size_gemm_scratch(g);
    if (st != ATMOE_STATUS_OK) {
        atm_graph_unplan(g);
        return st;
    }
    atm_log(ATMOE_LOG_DEBUG, "graph planned: %zu of %zu nodes, arena %llu "
            "bytes for %llu bytes of intermediates", g->order_count, g->count,
            (unsigned long long)g->memory.arena_bytes,
            (unsigned long long)g->memory.intermediate_bytes);
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_get_memory(const atmoe_graph *g,
                                              atmoe_graph_memory *memory)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, memory);
    if (!atm_graph_is_planned(g))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_graph_get_memory: the graph is not planned");
    *memory = g->memory;
    return ATMOE_STATUS_OK;
}
