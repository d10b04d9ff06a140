/* AT-MoE layers and stacks of them, composed from the router and the
 * mixture nodes. */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "moe/experts.h"
#include "graph/graph.h"
#include "base/log.h"

ATMOE_API atmoe_status atmoe_graph_moe_layer(atmoe_graph *g, atmoe_node x,
                                             const atmoe_layer *layer,
                                             atmoe_node *y,
                                             atmoe_layer_trace *trace)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, layer);
    ATM_CHECK_NULL(g->ctx, y);
    ATM_CHECK_NULL(g->ctx, layer->experts);
    ATM_CHECK_NULL(g->ctx, layer->router);
    if (layer->router->set != layer->experts)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the router was made for another expert set", fn);
    int per_sequence = layer->router_input != ATMOE_NODE_NONE;
    if (per_sequence != (layer->gate_index != ATMOE_NODE_NONE))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: router_input and gate_index go together (one "
                        "router row per sequence, one index per token)", fn);
    /* A failure part way leaves no half-built layer behind. */
    size_t mark = g->count;
    atmoe_layer_trace t;
    atmoe_status st = atmoe_graph_router(
        g, per_sequence ? layer->router_input : x, layer->router, layer->w_g,
        layer->w_d, &t.a, &t.d, &t.w);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_graph_mixture(g, x, layer->w0, layer->bias, layer->experts,
                                 ATMOE_MIX_BLOCK, t.w, layer->gate_index,
                                 layer->c, y);
    if (st != ATMOE_STATUS_OK) {
        atm_graph_truncate(g, mark);
        return st;
    }
    if (trace)
        *trace = t;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_moe_stack(atmoe_graph *g, atmoe_node x,
                                             const atmoe_layer *layers,
                                             size_t n, atmoe_node *y,
                                             atmoe_layer_trace *traces)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, layers);
    ATM_CHECK_NULL(g->ctx, y);
    if (n == 0)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_graph_moe_stack: no layer");
    atmoe_node h = x;
    size_t mark = g->count;
    /* Traces reach the caller only when every layer went in. */
    atmoe_layer_trace *t = traces ? atm_malloc(n * sizeof *t) : NULL;
    if (traces && t == NULL)
        return atm_fail(g->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "atmoe_graph_moe_stack: out of host memory");
    for (size_t l = 0; l < n; l++) {
        atmoe_status st = atmoe_graph_moe_layer(g, h, &layers[l], &h,
                                                t ? &t[l] : NULL);
        if (st != ATMOE_STATUS_OK) {
            atm_free(t);
            char detail[ATM_ERRMSG_SIZE / 2];
            snprintf(detail, sizeof detail, "%s", atmoe_errmsg(g->ctx));
            atm_graph_truncate(g, mark);
            return atm_fail(g->ctx, st, "atmoe_graph_moe_stack: layer %zu: %s",
                            l, detail);
        }
    }
    if (t)
        memcpy(traces, t, n * sizeof *t);
    atm_free(t);
    *y = h;
    return ATMOE_STATUS_OK;
}
