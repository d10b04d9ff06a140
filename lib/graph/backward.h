/* Reverse mode: what an operation's backward (op.h) builds its gradient
 * nodes with, beside the public builders of the graph's operations. */
#ifndef ATMOE_GRAPH_BACKWARD_H
#define ATMOE_GRAPH_BACKWARD_H

#include "graph/graph.h"

/* The function name gradient nodes are built under, for messages. */
#define ATM_BACKWARD_FN "atmoe_graph_backward"

/* An f32 node of op with the shape and batch of node `like`, and no
 * operand yet: the proto of a gradient node. */
void atm_grad_proto(const atmoe_graph *g, const atm_op *op, int like,
                    atm_node *p);
/* Pushes a gradient node built from proto p into *out. */
atmoe_status atm_grad_push(atmoe_graph *g, const atm_node *p, int *out);

/* dy summed over the dimensions along which node `like` was broadcast
 * (numpy's rules, aligned on the right), over the rows of the batch when
 * like is not batched and dy is: a node of like's shape and batch.  dy
 * itself when shapes and batch already agree. */
atmoe_status atm_grad_sum_to(atmoe_graph *g, int dy, int like, int *out);
/* Zeros of node like's shape and batch. */
atmoe_status atm_grad_zeros(atmoe_graph *g, int like, int *out);

#endif
