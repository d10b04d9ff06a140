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
