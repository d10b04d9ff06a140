/* The grouped router node's parameters, shared by its forward (router.c)
 * and its backward (router_backward.c). */
#ifndef ATMOE_ROUTER_H
#define ATMOE_ROUTER_H

#include "graph/graph.h"
#include "moe/experts.h"

/* The router node's parameters (atm_node.p). */
typedef struct router_params {
    atmoe_router *router; /* a reference */
    size_t wg; /* the work-group its kernel was built for (prepare) */
    unsigned lpi; /* the logits a pass computes, as built (prepare) */
} router_params;

extern const atm_op atm_op_router;

/* The router row's backward (op.h's contract). */
atmoe_status atm_router_backward(atmoe_graph *g, int node,
                                 const int *grad_out,
                                 const unsigned char *need, int *grad_in);

#endif
