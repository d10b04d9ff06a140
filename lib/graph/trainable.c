/* The registry of a graph's trainable weights (trainable.h). */
#include <config.h>

#include <string.h>

#include "base/alloc.h"
#include "base/error.h"
#include "graph/trainable.h"

static size_t node_count(const atm_node *n)
{
    size_t c = 1;
    for (int i = 0; i < n->ndim; i++)
        c *= n->shape[i];
    return c;
}

atmoe_status atm_graph_add_trainable(atmoe_graph *g, const atm_trainable *t,
                                     const char *fn)
{
    if (t->count == 0 || t->buffer == NULL)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: trainable '%s' has no elements", fn, t->name);
    if (memchr(t->name, '\0', sizeof t->name) == NULL || t->name[0] == '\0')
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: a trainable needs a name", fn);
    if (atm_graph_trainable_find(g, t->name) != NULL)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: trainable '%s' is registered twice", fn,
                        t->name);
    if (t->grad < 0 || (size_t)t->grad >= g->count ||
        node_count(&g->nodes[t->grad]) < t->grad_offset + t->count)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the gradient of trainable '%s' is not a node "
                        "of %zu elements or more", fn, t->name,
                        t->grad_offset + t->count);
    if (g->trainable_count == g->trainable_capacity) {
        size_t cap = g->trainable_capacity ? 2 * g->trainable_capacity : 16;
        atm_trainable *p = atm_realloc(g->trainables, cap * sizeof *p);
        if (p == NULL)
            return atm_fail(g->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                            "%s: out of host memory", fn);
        g->trainables = p;
        g->trainable_capacity = cap;
    }
    g->trainables[g->trainable_count++] = *t;
    return ATMOE_STATUS_OK;
}

size_t atm_graph_trainable_count(const atmoe_graph *g)
{
    return g->trainable_count;
}

const atm_trainable *atm_graph_trainable_at(const atmoe_graph *g, size_t i)
{
    return i < g->trainable_count ? &g->trainables[i] : NULL;
}

const atm_trainable *atm_graph_trainable_find(const atmoe_graph *g,
                                              const char *name)
{
    for (size_t i = 0; i < g->trainable_count; i++)
        if (strcmp(g->trainables[i].name, name) == 0)
            return &g->trainables[i];
    return NULL;
}

void atm_graph_trainables_clear(atmoe_graph *g)
{
    g->trainable_count = 0;
}

void atm_graph_trainables_drop_from(atmoe_graph *g, size_t count)
{
    size_t kept = 0;
    for (size_t i = 0; i < g->trainable_count; i++)
        if ((size_t)g->trainables[i].grad < count)
            g->trainables[kept++] = g->trainables[i];
    g->trainable_count = kept;
}

/* ------------------------------------------------ the public accessors */

ATMOE_API atmoe_status atmoe_graph_get_trainable_count(
    const atmoe_graph *graph, size_t *count)
{
    ATM_CHECK_NULL(NULL, graph);
    ATM_CHECK_NULL(graph->ctx, count);
    *count = graph->trainable_count;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_get_trainable(const atmoe_graph *graph,
                                                 size_t index,
                                                 atmoe_trainable_info *info)
{
    ATM_CHECK_NULL(NULL, graph);
    ATM_CHECK_NULL(graph->ctx, info);
    const atm_trainable *t = atm_graph_trainable_at(graph, index);
    if (t == NULL)
        return atm_fail(graph->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: index %zu, but the graph has %zu trainable "
                        "weights", __func__, index, graph->trainable_count);
    memset(info, 0, sizeof *info);
    info->name = t->name;
    info->ndim = t->ndim;
    memcpy(info->shape, t->shape, sizeof info->shape);
    info->count = t->count;
    return ATMOE_STATUS_OK;
}

/* The entry named name, whose count must be count. */
static atmoe_status find_sized(const atmoe_graph *g, const char *name,
                               size_t count, const char *fn,
                               const atm_trainable **out)
{
    const atm_trainable *t = atm_graph_trainable_find(g, name);
    if (t == NULL)
        return atm_fail(g->ctx, ATMOE_STATUS_NOT_FOUND,
                        "%s: the graph has no trainable weight '%s'", fn,
                        name);
    if (count != t->count)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: trainable '%s' holds %zu elements, not %zu", fn,
                        name, t->count, count);
    *out = t;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_read_trainable(atmoe_graph *graph,
                                                  const char *name,
                                                  float *data, size_t count)
{
    ATM_CHECK_NULL(NULL, graph);
    ATM_CHECK_NULL(graph->ctx, name);
    ATM_CHECK_NULL(graph->ctx, data);
    const atm_trainable *t;
    atmoe_status st = find_sized(graph, name, count, __func__, &t);
    if (st != ATMOE_STATUS_OK)
        return st;
    cl_int err = clEnqueueReadBuffer(graph->ctx->queue, t->buffer, CL_TRUE,
                                     t->offset * sizeof(float),
                                     count * sizeof(float), data, 0, NULL,
                                     NULL);
    if (err != CL_SUCCESS)
        return atm_fail_cl(graph->ctx, err, "atmoe_graph_read_trainable");
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_write_trainable(atmoe_graph *graph,
                                                   const char *name,
                                                   const float *data,
                                                   size_t count)
{
    ATM_CHECK_NULL(NULL, graph);
    ATM_CHECK_NULL(graph->ctx, name);
    ATM_CHECK_NULL(graph->ctx, data);
    const atm_trainable *t;
    atmoe_status st = find_sized(graph, name, count, __func__, &t);
    if (st != ATMOE_STATUS_OK)
        return st;
    cl_int err = clEnqueueWriteBuffer(graph->ctx->queue, t->buffer, CL_TRUE,
                                      t->offset * sizeof(float),
                                      count * sizeof(float), data, 0, NULL,
                                      NULL);
    if (err != CL_SUCCESS)
        return atm_fail_cl(graph->ctx, err, "atmoe_graph_write_trainable");
    return ATMOE_STATUS_OK;
}

/* Position of node id in the computed order, or -1. */
static long order_pos(const atmoe_graph *g, int id)
{
    for (size_t k = 0; k < g->order_count; k++)
        if (g->order[k] == id)
            return (long)k;
    return -1;
}

int atm_graph_value_kept(const atmoe_graph *g, int id)
{
    const atm_node *n = &g->nodes[id];
    if (!n->needed)
        return 0;
    if (n->op->flags & ATM_OPF_INPUT)
        return 1;
    /* An operation in place on n takes its block over and becomes the
     * owner of n and of everything in it: n's value lasts only while its
     * owner is n itself or a node before it, and the block is pinned. */
    const atm_node *o = &g->nodes[n->owner];
    return o->pinned && order_pos(g, n->owner) <= order_pos(g, id);
}

atmoe_status atm_trainable_grad_tensor(const atmoe_graph *g,
                                       const atm_trainable *t,
                                       const char *fn, cl_mem *buffer,
                                       size_t *offset)
{
    if (!atm_graph_is_planned(g))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the graph is not planned (atmoe_graph_plan)", fn);
    if (g->batch == 0)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: nothing computed since the graph was planned, "
                        "so there is no gradient of '%s'", fn, t->name);
    const atm_node *n = &g->nodes[t->grad];
    *buffer = n->rt.buffer;
    *offset = n->rt.offset + t->grad_offset;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_read_gradient(atmoe_graph *graph,
                                                 const char *name,
                                                 float *data, size_t count)
{
    ATM_CHECK_NULL(NULL, graph);
    ATM_CHECK_NULL(graph->ctx, name);
    ATM_CHECK_NULL(graph->ctx, data);
    const atm_trainable *t;
    atmoe_status st = find_sized(graph, name, count, __func__, &t);
    cl_mem buf = NULL;
    size_t off = 0;
    if (st == ATMOE_STATUS_OK)
        st = atm_trainable_grad_tensor(graph, t, __func__, &buf, &off);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (!atm_graph_value_kept(graph, t->grad))
        return atm_fail(graph->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the gradient '%s' of trainable '%s' is not kept "
                        "after a compute (its memory is reused)", __func__,
                        graph->nodes[t->grad].name, name);
    cl_int err = clEnqueueReadBuffer(graph->ctx->queue, buf, CL_TRUE,
                                     off * sizeof(float),
                                     count * sizeof(float), data, 0, NULL,
                                     NULL);
    if (err != CL_SUCCESS)
        return atm_fail_cl(graph->ctx, err, "atmoe_graph_read_gradient");
    return ATMOE_STATUS_OK;
}
