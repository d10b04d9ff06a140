/* The fused mixture node's parameters, shared by its forward (mixture.c)
 * and its backward (mixture_backward.c). */
#ifndef ATMOE_MIXTURE_H
#define ATMOE_MIXTURE_H

#include "graph/graph.h"
#include "moe/experts.h"
#include "moe/linear.h"

/* The mixture node's parameters (atm_node.p), and what planning decided. */
typedef struct mixture_params {
    atmoe_experts *experts; /* a reference */
    atmoe_mix mix;
    atmoe_merge merge;
    float c;
    atmoe_dtype w0_dtype; /* as stored: read so by cl/linear.cl */
    /* The parameters of the linear route's products in force (tuning, by
     * the storage type of the weight each product reads: the variant and
     * the blocks of its tiles): the shrink's (A_all), the base's (W0) and
     * the merged product's (W', f32). */
    atm_linear_tune lin[3];
    /* Routes: a batch of T tokens runs merged when T >= merge_from, and
     * through cl/linear.cl when T <= linear_upto (else CLBlast). */
    size_t merge_from, linear_upto;
    /* The work-items of the block and diagonal mix kernel as built:
     * mix_vw channels of mix_tpi tokens (kernels.mixture.VW, TPI); the
     * dense mix has one output an item. */
    unsigned mix_vw, mix_tpi;
    /* The fused variant (kernels.mixture.VARIANT 1): batches of at most
     * fused_upto tokens (0: none) run cl/mixture.cl's mixture_fused, a
     * work-group of fused_gs items for every fused_rows rows of y. */
    size_t fused_upto, fused_rows;
    unsigned fused_gs;
} mixture_params;

extern const atm_op atm_op_mixture;

/* The mixture row's backward (op.h's contract). */
atmoe_status atm_mixture_backward(atmoe_graph *g, int node,
                                  const int *grad_out,
                                  const unsigned char *need, int *grad_in);

/* A node of shape [ndim, shape] (count: x's columns) holding the column
 * sums of x [rows, cols] over its rows: the gradient of a weight that
 * every row shares (a bias, the router's V_D).  name may be NULL. */
atmoe_status atm_graph_column_sum(atmoe_graph *g, atmoe_node x, int ndim,
                                  const size_t *shape, const char *name,
                                  atmoe_node *out);

#endif
