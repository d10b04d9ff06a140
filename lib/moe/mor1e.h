/* The rank-1 expert layer's route node parameters, shared by its forward
 * (mor1e.c) and its backward (mor1e_backward.c), and the rows' backwards. */
#ifndef ATMOE_MOR1E_H
#define ATMOE_MOR1E_H

#include "graph/graph.h"

/* The route node's parameters: what cl/mor1e.cl needs beyond its
 * operands (u_all, scores, gate_index, w_om, w_c). */
typedef struct atm_mor1e_route {
    size_t r1, r2, E;
    int dense, has_router, has_scores;
    float k_router, k_intuition;
    int top_k;
} atm_mor1e_route;

/* The backwards of the shrink, route and expand rows (op.h's contract). */
atmoe_status atm_mor1e_shrink_backward(atmoe_graph *g, int node,
                                       const int *grad_out,
                                       const unsigned char *need,
                                       int *grad_in);
atmoe_status atm_mor1e_route_backward(atmoe_graph *g, int node,
                                      const int *grad_out,
                                      const unsigned char *need,
                                      int *grad_in);
atmoe_status atm_mor1e_expand_backward(atmoe_graph *g, int node,
                                       const int *grad_out,
                                       const unsigned char *need,
                                       int *grad_in);

#endif
