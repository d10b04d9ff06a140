/* Reverse mode: atmoe_graph_backward extends a graph with the gradient of a
 * scalar loss with respect to every trainable node, the way ggml's
 * ggml_build_backward_expand does: backwards from the loss in creation
 * order (a topological order), only through nodes on a path from a
 * trainable node to the loss, each operation's row adding the nodes of its
 * operands' gradients (op.h), contributions of several readers summed with
 * add nodes.  Gradient nodes are ordinary nodes: the planner places them in
 * the forward's arena and a training step allocates nothing.  The
 * engine's own building blocks (sums over broadcast dimensions, zeros)
 * are the rows below. */
#include <config.h>

#include <stdio.h>
#include <string.h>

#include "base/alloc.h"
#include "graph/backward.h"
#include "graph/trainable.h"

/* ------------------------------------------------------ building blocks */

/* Pads a runtime shape to four dimensions on the left. */
static cl_uint4 shape4(const atmoe_tensor *t)
{
    cl_uint4 s;
    int pad = 4 - t->ndim;
    for (int i = 0; i < 4; i++)
        s.s[i] = i < pad ? 1 : (cl_uint)t->shape[i - pad];
    return s;
}

static atmoe_status sum_to_run(atmoe_graph *g, atm_node *n, cl_event *first,
                               cl_event *last)
{
    (void)last;
    const atmoe_tensor *x = atm_src_rt(g, n, 0), *out = &n->rt;
    cl_uint4 xs = shape4(x), os = shape4(out);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, out);
    atm_arg_tensor(&a, x);
    atm_arg(&a, sizeof xs, &xs);
    atm_arg(&a, sizeof os, &os);
    atm_arg_ulong(&a, atm_tensor_count(out));
    return atm_node_launch(g, n, &a, n->op->name, atm_tensor_count(out),
                           first);
}

static atmoe_status zeros_run(atmoe_graph *g, atm_node *n, cl_event *first,
                              cl_event *last)
{
    (void)last;
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_ulong(&a, atm_tensor_count(&n->rt));
    return atm_node_launch(g, n, &a, n->op->name, atm_tensor_count(&n->rt),
                           first);
}

static void sum_to_cost(const atmoe_graph *g, const atm_node *n,
                        uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    *flops = atm_tensor_count(atm_src_rt(g, n, 0));
}

/* Gradients of gradients are not built: these rows have no backward. */
static const atm_op atm_op_sum_to = {.name = "sum_to",
                                     .program = "backward",
                                     .kernel = "sum_to_f32",
                                     .run = sum_to_run,
                                     .cost = sum_to_cost};
static const atm_op atm_op_zeros = {.name = "zeros",
                                    .program = "backward",
                                    .kernel = "zero_f32",
                                    .run = zeros_run};

void atm_grad_proto(const atmoe_graph *g, const atm_op *op, int like,
                    atm_node *p)
{
    const atm_node *l = &g->nodes[like];
    atm_node_init(p, op, ATMOE_DTYPE_F32, l->ndim, l->shape);
    p->batch_dim = l->batch_dim;
    p->batch_factor = l->batch_factor;
}

atmoe_status atm_grad_push(atmoe_graph *g, const atm_node *p, int *out)
{
    return atm_graph_push(g, p, NULL, ATM_BACKWARD_FN, out);
}

static int same_layout(const atm_node *a, const atm_node *b)
{
    if (a->ndim != b->ndim || a->batch_dim != b->batch_dim ||
        (a->batch_dim >= 0 && a->batch_factor != b->batch_factor))
        return 0;
    return memcmp(a->shape, b->shape, (size_t)a->ndim * sizeof *a->shape) ==
           0;
}

atmoe_status atm_grad_sum_to(atmoe_graph *g, int dy, int like, int *out)
{
    const atm_node *d = &g->nodes[dy], *l = &g->nodes[like];
    if (same_layout(d, l)) {
        *out = dy;
        return ATMOE_STATUS_OK;
    }
    char a[160], b[160];
    int ok = d->ndim >= l->ndim;
    for (int i = 0; ok && i < l->ndim; i++) {
        size_t e = l->shape[i], f = d->shape[i + d->ndim - l->ndim];
        ok = e == f || e == 1;
    }
    if (!ok)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: gradient %s does not sum to operand %s",
                        ATM_BACKWARD_FN, atm_node_desc(d, a, sizeof a),
                        atm_node_desc(l, b, sizeof b));
    atm_node p;
    atm_grad_proto(g, &atm_op_sum_to, like, &p);
    p.src[0] = dy;
    p.nsrc = 1;
    return atm_grad_push(g, &p, out);
}

atmoe_status atm_grad_zeros(atmoe_graph *g, int like, int *out)
{
    atm_node p;
    atm_grad_proto(g, &atm_op_zeros, like, &p);
    return atm_grad_push(g, &p, out);
}

/* ------------------------------------------------------ trainable nodes */

ATMOE_API atmoe_status atmoe_graph_set_trainable(atmoe_graph *g,
                                                 atmoe_node node,
                                                 int trainable)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = __func__;
    atmoe_status st = atm_graph_check_node(g, node, fn, "node");
    if (st != ATMOE_STATUS_OK)
        return st;
    atm_node *n = &g->nodes[node];
    char d[160];
    if (g->backward_built)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the graph's gradients are built already "
                        "(atmoe_graph_backward); mark trainable nodes "
                        "before", fn);
    if (n->op != &atm_op_parameter && n->op != &atm_op_input)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: %s is not a parameter or an input; only those "
                        "can be trainable", fn, atm_node_desc(n, d, sizeof d));
    if (n->dtype != ATMOE_DTYPE_F32)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: %s is not f32; gradients are f32", fn,
                        atm_node_desc(n, d, sizeof d));
    n->trainable = trainable != 0;
    return ATMOE_STATUS_OK;
}

/* ------------------------------------------------------ the engine */

static size_t elements(const atm_node *n)
{
    size_t c = 1;
    for (int i = 0; i < n->ndim; i++)
        c *= n->shape[i];
    return c;
}

/* grad[s] += contribution, checked against the operand's layout. */
static atmoe_status accumulate(atmoe_graph *g, int *grad, int reader,
                               int operand, int s, int contribution)
{
    const atm_node *c = &g->nodes[contribution], *o = &g->nodes[s];
    char a[160], b[160];
    if (c->dtype != ATMOE_DTYPE_F32 || !same_layout(c, o))
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: the backward of %s gave %s for operand %d %s "
                        "(gradients are f32 nodes of the operand's shape "
                        "and batch)", ATM_BACKWARD_FN,
                        g->nodes[reader].op->name,
                        atm_node_desc(c, a, sizeof a), operand,
                        atm_node_desc(o, b, sizeof b));
    if (grad[s] == ATMOE_NODE_NONE) {
        grad[s] = contribution;
        return ATMOE_STATUS_OK;
    }
    return atmoe_graph_add(g, grad[s], contribution, &grad[s]);
}

/* The gradient nodes, from the loss back; on_path says which nodes lie on
 * a path from a trainable node to the loss. */
static atmoe_status reverse(atmoe_graph *g, int loss,
                            const unsigned char *on_path, int *grad)
{
    for (int i = loss; i >= 0; i--) {
        if (!on_path[i])
            continue;
        const atm_node *n = &g->nodes[i];
        /* A secondary output's gradient goes to its source's backward. */
        if (n->op->flags & ATM_OPF_SECONDARY)
            continue;
        int gout[3] = {grad[i], ATMOE_NODE_NONE, ATMOE_NODE_NONE};
        for (int j = 0; j < 2; j++)
            if (n->co[j] != ATMOE_NODE_NONE)
                gout[j + 1] = grad[n->co[j]];
        if (gout[0] == ATMOE_NODE_NONE && gout[1] == ATMOE_NODE_NONE &&
            gout[2] == ATMOE_NODE_NONE)
            continue;
        unsigned char need[ATM_MAX_SRC] = {0};
        int any = 0;
        for (int j = 0; j < n->nsrc; j++) {
            int s = n->src[j];
            need[j] = s != ATMOE_NODE_NONE && on_path[s] &&
                      g->nodes[s].dtype != ATMOE_DTYPE_I32;
            any |= need[j];
        }
        if (!any && !n->trains_outside)
            continue;
        char d[160];
        if (n->op->backward == NULL)
            return atm_fail(g->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                            "%s: operation '%s' of node %s, on the path from "
                            "a trainable node to the loss, has no backward",
                            ATM_BACKWARD_FN, atm_node_op_name(n),
                            atm_node_desc(n, d, sizeof d));
        int gin[ATM_MAX_SRC];
        for (int j = 0; j < ATM_MAX_SRC; j++)
            gin[j] = ATMOE_NODE_NONE;
        atmoe_status st = n->op->backward(g, i, gout, need, gin);
        if (st != ATMOE_STATUS_OK)
            return st;
        n = &g->nodes[i];
        for (int j = 0; j < n->nsrc; j++) {
            if (!need[j] || gin[j] == ATMOE_NODE_NONE)
                continue;
            st = accumulate(g, grad, i, j, n->src[j], gin[j]);
            if (st != ATMOE_STATUS_OK)
                return st;
            n = &g->nodes[i];
        }
    }
    return ATMOE_STATUS_OK;
}

/* Outputs, names and registry entries for the gradients of trainable
 * nodes. */
static atmoe_status publish(atmoe_graph *g, int loss, size_t count,
                            const int *grad)
{
    atmoe_status st = ATMOE_STATUS_OK;
    for (size_t i = 0; i < count && st == ATMOE_STATUS_OK; i++) {
        const atm_node *n = &g->nodes[i];
        if (!n->trainable || grad[i] == ATMOE_NODE_NONE)
            continue;
        /* "<name>.grad" for atmoe_graph_find, when the node is one of
         * ours, that fits and is free. */
        char name[ATM_NODE_NAME_SIZE + 8];
        snprintf(name, sizeof name, "%s.grad", n->name);
        if ((size_t)grad[i] >= count && strlen(name) < ATM_NODE_NAME_SIZE &&
            atm_graph_lookup(g, name) == ATMOE_NODE_NONE &&
            strstr(g->nodes[grad[i]].name, ".grad") == NULL)
            snprintf(g->nodes[grad[i]].name, ATM_NODE_NAME_SIZE, "%s", name);
        if (n->op != &atm_op_parameter)
            continue;
        atm_trainable t;
        memset(&t, 0, sizeof t);
        snprintf(t.name, sizeof t.name, "%s", n->name);
        t.buffer = n->storage->buffer;
        t.offset = n->storage->offset;
        t.ndim = n->ndim;
        memcpy(t.shape, n->shape, (size_t)n->ndim * sizeof *n->shape);
        t.count = elements(n);
        t.grad = grad[i];
        t.grad_offset = 0;
        st = atm_graph_add_trainable(g, &t, ATM_BACKWARD_FN);
    }
    /* Every registered gradient (the mixture's experts' too) and the loss
     * are outputs: the plan keeps them after a compute. */
    for (size_t i = 0; i < count && st == ATMOE_STATUS_OK; i++)
        if (g->nodes[i].trainable && grad[i] != ATMOE_NODE_NONE)
            st = atmoe_graph_mark_output(g, grad[i]);
    for (size_t i = 0; i < g->trainable_count && st == ATMOE_STATUS_OK; i++)
        st = atmoe_graph_mark_output(g, g->trainables[i].grad);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_graph_mark_output(g, loss);
    return st;
}

ATMOE_API atmoe_status atmoe_graph_backward(atmoe_graph *g, atmoe_node loss)
{
    ATM_CHECK_NULL(NULL, g);
    const char *fn = ATM_BACKWARD_FN;
    const atm_node *ln;
    atmoe_status st = atm_graph_get_node(g, loss, fn, "loss", &ln);
    if (st != ATMOE_STATUS_OK)
        return st;
    char d[160];
    if (g->backward_built)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the graph's gradients are built already; a "
                        "graph has one backward pass (build a new graph for "
                        "another loss or other trainable nodes)", fn);
    if (ln->dtype != ATMOE_DTYPE_F32)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: the loss %s must be f32", fn,
                        atm_node_desc(ln, d, sizeof d));
    if (elements(ln) != 1 || ln->batch_dim >= 0)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: the loss %s must be a scalar: one element, "
                        "not batched (atmoe_graph_mean reduces to one)", fn,
                        atm_node_desc(ln, d, sizeof d));

    size_t count = g->count;
    unsigned char *on_path = atm_calloc(count ? count : 1, 2);
    int *grad = atm_malloc(count * sizeof *grad);
    if (on_path == NULL || grad == NULL) {
        atm_free(on_path);
        atm_free(grad);
        return atm_fail(g->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", fn);
    }
    /* Reached from a trainable node (forwards), and read by the loss
     * (backwards): on a path between them. */
    unsigned char *reach = on_path + count;
    for (size_t i = 0; i < count; i++) {
        const atm_node *n = &g->nodes[i];
        reach[i] = (unsigned char)(n->trainable || n->trains_outside);
        for (int j = 0; j < n->nsrc; j++)
            if (n->src[j] != ATMOE_NODE_NONE && reach[n->src[j]])
                reach[i] = 1;
        grad[i] = ATMOE_NODE_NONE;
    }
    on_path[loss] = 1;
    for (int i = loss; i >= 0; i--) {
        const atm_node *n = &g->nodes[i];
        if (!on_path[i])
            continue;
        for (int j = 0; j < n->nsrc; j++)
            if (n->src[j] != ATMOE_NODE_NONE)
                on_path[n->src[j]] = 1;
    }
    for (size_t i = 0; i < count; i++)
        on_path[i] &= reach[i];

    if (!on_path[loss]) {
        st = atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                      "%s: nothing trainable reaches the loss %s "
                      "(atmoe_graph_set_trainable marks parameters and "
                      "inputs)", fn, atm_node_desc(&g->nodes[loss], d,
                                                   sizeof d));
    } else {
        static const size_t one_shape[1] = {1};
        static const float one = 1.0f;
        /* dL/dL = 1: the seed of reverse mode. */
        st = atmoe_graph_constant(g, NULL, ATMOE_DTYPE_F32, 1, one_shape,
                                  &one, &grad[loss]);
        if (st == ATMOE_STATUS_OK)
            st = reverse(g, loss, on_path, grad);
        if (st == ATMOE_STATUS_OK)
            st = publish(g, loss, count, grad);
    }
    atm_free(on_path);
    if (st != ATMOE_STATUS_OK) {
        /* All or nothing: the nodes and entries added go again (marking
         * outputs comes last and does not fail on nodes of the graph). */
        atm_graph_truncate(g, count);
        atm_free(grad);
        return st;
    }
    g->grad_of = grad;
    g->grad_of_count = count;
    g->backward_built = 1;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_get_grad(const atmoe_graph *g,
                                            atmoe_node node,
                                            atmoe_node *grad)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, grad);
    const char *fn = __func__;
    atmoe_status st = atm_graph_check_node(g, node, fn, "node");
    if (st != ATMOE_STATUS_OK)
        return st;
    const atm_node *n = &g->nodes[node];
    char d[160];
    if (!g->backward_built)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the graph has no gradients yet "
                        "(atmoe_graph_backward builds them)", fn);
    if ((size_t)node >= g->grad_of_count || !n->trainable)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: %s is not trainable (atmoe_graph_set_trainable "
                        "before atmoe_graph_backward)", fn,
                        atm_node_desc(n, d, sizeof d));
    if (g->grad_of[node] == ATMOE_NODE_NONE)
        return atm_fail(g->ctx, ATMOE_STATUS_NOT_FOUND,
                        "%s: trainable %s does not reach the loss: it has no "
                        "gradient", fn, atm_node_desc(n, d, sizeof d));
    *grad = g->grad_of[node];
    return ATMOE_STATUS_OK;
}
