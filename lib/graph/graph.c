/* Building graphs: nodes, names and dumps, the leaves (inputs, parameters,
 * constants, secondary outputs) and the checks every builder shares.  Each
 * operation's builder lives beside its row (op.h). */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/file.h"
#include "graph/graph.h"
#include "graph/trainable.h"
#include "base/log.h"

/* The leaves: rows with nothing to prepare or run.  A parameter or
 * constant holds storage of its own (atm_node.storage); an input is placed
 * first in the arena; a secondary output is written by its source. */
const atm_op atm_op_input = {.name = "input", .flags = ATM_OPF_INPUT};
const atm_op atm_op_parameter = {.name = "parameter"};
const atm_op atm_op_constant = {.name = "constant"};
const atm_op atm_op_secondary = {.name = "secondary",
                                 .flags = ATM_OPF_SECONDARY};

const char *atm_node_op_name(const atm_node *n)
{
    return n->label ? n->label : n->op->name;
}

ATMOE_API atmoe_status atmoe_graph_new(atmoe_context *ctx, atmoe_graph **graph)
{
    if (graph)
        *graph = NULL;
    ATM_CHECK_NULL(NULL, ctx);
    ATM_CHECK_NULL(ctx, graph);
    atmoe_graph *g = atm_calloc(1, sizeof *g);
    if (g == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "atmoe_graph_new: out of host memory");
    g->ctx = ctx;
    *graph = g;
    return ATMOE_STATUS_OK;
}

void atm_graph_truncate(atmoe_graph *g, size_t count)
{
    atm_graph_trainables_drop_from(g, count);
    while (g->count > count) {
        atm_node *n = &g->nodes[--g->count];
        atmoe_tensor_free(n->storage);
        if (n->op->release)
            n->op->release(n);
    }
}

ATMOE_API void atmoe_graph_free(atmoe_graph *g)
{
    if (g == NULL)
        return;
    atm_graph_unplan(g);
    atm_graph_truncate(g, 0);
    atm_free(g->trainables);
    atm_free(g->grad_of);
    atm_free(g->nodes);
    atm_free(g);
}

atmoe_status atm_graph_check_node(const atmoe_graph *g, atmoe_node n,
                                  const char *fn, const char *operand)
{
    if (n < 0 || (size_t)n >= g->count)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: operand %s is node %d, not a node of this graph "
                        "(%zu nodes)", fn, operand, n, g->count);
    return ATMOE_STATUS_OK;
}

const char *atm_node_desc(const atm_node *n, char *buf, size_t size)
{
    char shape[96];
    snprintf(buf, size, "'%s' (%s %s %s)", n->name, atm_node_op_name(n),
             atmoe_dtype_name(n->dtype),
             atm_shape_string(n->ndim, n->shape, shape, sizeof shape));
    return buf;
}

atmoe_node atm_graph_lookup(const atmoe_graph *g, const char *name)
{
    for (size_t i = 0; i < g->count; i++)
        if (strcmp(g->nodes[i].name, name) == 0)
            return (atmoe_node)i;
    return ATMOE_NODE_NONE;
}

static atmoe_status name_taken(const atmoe_graph *g, const char *name,
                               const char *fn)
{
    atmoe_node found = atm_graph_lookup(g, name);
    if (found != ATMOE_NODE_NONE)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the name '%s' is taken by node %d", fn, name,
                        found);
    return ATMOE_STATUS_OK;
}

/* Appends a node of op with the given result; fills in a default name. */
atmoe_status atm_graph_push(atmoe_graph *g, const atm_node *proto,
                            const char *name, const char *fn,
                            atmoe_node *out)
{
    if (name && strlen(name) >= ATM_NODE_NAME_SIZE)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: name '%.20s...' is longer than %d bytes", fn,
                        name, ATM_NODE_NAME_SIZE - 1);
    if (name && *name) {
        atmoe_status st = name_taken(g, name, fn);
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    if (g->count == g->capacity) {
        size_t cap = g->capacity ? g->capacity * 2 : 32;
        atm_node *p = atm_realloc(g->nodes, cap * sizeof *p);
        if (p == NULL)
            return atm_fail(g->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                            "%s: out of host memory", fn);
        g->nodes = p;
        g->capacity = cap;
    }
    atm_node *n = &g->nodes[g->count];
    *n = *proto;
    if (name && *name) {
        snprintf(n->name, sizeof n->name, "%s", name);
    } else {
        /* "<op>_<id>", with a suffix when a caller's name took it. */
        snprintf(n->name, sizeof n->name, "%s_%zu", atm_node_op_name(n),
                 g->count);
        for (int k = 1; atm_graph_lookup(g, n->name) != ATMOE_NODE_NONE; k++)
            snprintf(n->name, sizeof n->name, "%s_%zu_%d",
                     atm_node_op_name(n), g->count, k);
    }
    n->co[0] = n->co[1] = ATMOE_NODE_NONE;
    *out = (atmoe_node)g->count++;
    return ATMOE_STATUS_OK;
}

void atm_node_init(atm_node *p, const atm_op *op, atmoe_dtype dtype,
                   int ndim, const size_t *shape)
{
    memset(p, 0, sizeof *p);
    p->op = op;
    p->dtype = dtype;
    p->ndim = ndim;
    memcpy(p->shape, shape, (size_t)ndim * sizeof *shape);
    p->batch_dim = -1;
    for (int i = 0; i < ATM_MAX_SRC; i++)
        p->src[i] = ATMOE_NODE_NONE;
}

atmoe_status atm_check_shape_args(const atmoe_graph *g, const char *fn,
                                     atmoe_dtype dtype, int ndim,
                                     const size_t *shape)
{
    if (dtype == ATMOE_DTYPE_Q8)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: q8 is for weights (atmoe_graph_parameter of a "
                        "q8 tensor), not graph data", fn);
    if (atmoe_dtype_size(dtype) == 0)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: dtype %d is not an atmoe_dtype", fn, (int)dtype);
    if (ndim < 1 || ndim > ATMOE_MAX_DIMS)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: ndim is %d, must be 1 to %d", fn, ndim,
                        ATMOE_MAX_DIMS);
    size_t count = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] == 0)
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: dimension %d of the shape is 0", fn, i);
        if (count > SIZE_MAX / 8 / shape[i])
            return atm_fail(g->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                            "%s: the shape's element count overflows", fn);
        count *= shape[i];
    }
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_input(atmoe_graph *g, const char *name,
                                         atmoe_dtype dtype, int ndim,
                                         const size_t *shape, int batched,
                                         atmoe_node *node)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, shape);
    ATM_CHECK_NULL(g->ctx, node);
    atmoe_status st = atm_check_shape_args(g, __func__, dtype, ndim, shape);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (batched && g->max_batch && shape[0] != g->max_batch)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "atmoe_graph_input '%s': batch %zu differs from the "
                        "graph's batch %zu (every batched input shares one)",
                        name ? name : "", shape[0], g->max_batch);
    atm_node p;
    atm_node_init(&p, &atm_op_input, dtype, ndim, shape);
    if (batched) {
        p.batch_dim = 0;
        p.batch_factor = 1;
    }
    st = atm_graph_push(g, &p, name, __func__, node);
    if (st == ATMOE_STATUS_OK && batched)
        g->max_batch = shape[0];
    return st;
}

static atmoe_status add_storage(atmoe_graph *g, const atm_op *op, const char *name,
                                atmoe_tensor *t, const char *fn,
                                atmoe_node *node)
{
    atm_node p;
    atm_node_init(&p, op, t->dtype, t->ndim, t->shape);
    atmoe_status st = atm_graph_push(g, &p, name, fn, node);
    if (st != ATMOE_STATUS_OK)
        return st;
    g->nodes[*node].storage = t;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_parameter(atmoe_graph *g, const char *name,
                                             atmoe_tensor *tensor,
                                             atmoe_node *node)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, tensor);
    ATM_CHECK_NULL(g->ctx, node);
    if (tensor->ctx != g->ctx)
        return atm_fail(g->ctx, ATMOE_STATUS_WRONG_CONTEXT,
                        "atmoe_graph_parameter '%s': the tensor belongs to "
                        "another context", name ? name : "");
    if (!atm_tensor_is_contiguous(tensor))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_graph_parameter '%s': the tensor is a "
                        "non-contiguous view; copy it first",
                        name ? name : "");
    /* A view of our own keeps the storage alive after the caller frees its
     * handle. */
    atmoe_tensor *own;
    size_t start[ATMOE_MAX_DIMS] = {0};
    atmoe_status st = atmoe_tensor_view(tensor, start, tensor->shape, &own);
    if (st != ATMOE_STATUS_OK)
        return st;
    st = add_storage(g, &atm_op_parameter, name, own, __func__, node);
    if (st != ATMOE_STATUS_OK)
        atmoe_tensor_free(own);
    return st;
}

ATMOE_API atmoe_status atmoe_graph_constant(atmoe_graph *g, const char *name,
                                            atmoe_dtype dtype, int ndim,
                                            const size_t *shape,
                                            const void *data, atmoe_node *node)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, shape);
    ATM_CHECK_NULL(g->ctx, data);
    ATM_CHECK_NULL(g->ctx, node);
    atmoe_status st = atm_check_shape_args(g, __func__, dtype, ndim, shape);
    if (st != ATMOE_STATUS_OK)
        return st;
    atmoe_tensor *t;
    st = atmoe_tensor_new(g->ctx, dtype, ndim, shape, &t);
    if (st != ATMOE_STATUS_OK)
        return st;
    st = atmoe_tensor_write(t, data, atm_tensor_bytes(t));
    if (st == ATMOE_STATUS_OK)
        st = add_storage(g, &atm_op_constant, name, t, __func__, node);
    if (st != ATMOE_STATUS_OK)
        atmoe_tensor_free(t);
    return st;
}

/* ---------------------------------------------------------------- checks */

atmoe_status atm_graph_get_node(const atmoe_graph *g, atmoe_node id,
                                const char *fn, const char *operand,
                                const atm_node **n)
{
    atmoe_status st = atm_graph_check_node(g, id, fn, operand);
    if (st == ATMOE_STATUS_OK)
        *n = &g->nodes[id];
    return st;
}

atmoe_status atm_refuse_q8(const atmoe_graph *g, const char *fn,
                           const char *operand, const atm_node *n)
{
    char d[160];
    if (n->dtype == ATMOE_DTYPE_Q8)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: operand %s is %s; 8-bit blocks cannot be laid "
                        "out again (atmoe_graph_cast converts it to f32)",
                        fn, operand, atm_node_desc(n, d, sizeof d));
    return ATMOE_STATUS_OK;
}

atmoe_status atm_want_f32(const atmoe_graph *g, const char *fn,
                               const char *operand, const atm_node *n)
{
    char d[160];
    if (n->dtype != ATMOE_DTYPE_F32)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: operand %s is %s; it must be f32%s", fn, operand,
                        atm_node_desc(n, d, sizeof d),
                        n->dtype == ATMOE_DTYPE_F16 ||
                                n->dtype == ATMOE_DTYPE_BF16 ||
                                n->dtype == ATMOE_DTYPE_Q8
                            ? " (atmoe_graph_cast converts it to f32)"
                            : "");
    return ATMOE_STATUS_OK;
}

atmoe_status atm_resolve_dim(const atmoe_graph *g, const char *fn,
                                const atm_node *n, int dim, int *out)
{
    int d = dim < 0 ? dim + n->ndim : dim;
    char buf[160];
    if (d < 0 || d >= n->ndim)
        return atm_fail(g->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: dimension %d is out of range for %s", fn, dim,
                        atm_node_desc(n, buf, sizeof buf));
    *out = d;
    return ATMOE_STATUS_OK;
}

void atm_node_like(atm_node *p, const atm_op *op, const atm_node *x,
                   atmoe_node xid)
{
    atm_node_init(p, op, ATMOE_DTYPE_F32, x->ndim, x->shape);
    p->batch_dim = x->batch_dim;
    p->batch_factor = x->batch_factor;
    p->src[0] = xid;
    p->nsrc = 1;
}

atmoe_status atm_unary_proto(const atmoe_graph *g, const atm_op *op,
                             atmoe_node x, const char *fn, atm_node *p)
{
    const atm_node *xn;
    atmoe_status st = atm_graph_get_node(g, x, fn, "x", &xn);
    if (st == ATMOE_STATUS_OK)
        st = atm_want_f32(g, fn, "x", xn);
    if (st == ATMOE_STATUS_OK)
        atm_node_like(p, op, xn, x);
    return st;
}

atmoe_status atm_graph_finish(atmoe_graph *g, const atm_node *p,
                              const char *fn, atmoe_node *out)
{
    if (out == NULL)
        return atm_fail(g->ctx, ATMOE_STATUS_NULL_POINTER,
                        "%s: argument 'out' is NULL", fn);
    return atm_graph_push(g, p, NULL, fn, out);
}

/* ---------------------------------------------------------------- names */

ATMOE_API atmoe_status atmoe_graph_set_name(atmoe_graph *g, atmoe_node node,
                                            const char *name)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, name);
    atmoe_status st = atm_graph_check_node(g, node, __func__, "node");
    if (st != ATMOE_STATUS_OK)
        return st;
    if (*name == '\0' || strlen(name) >= ATM_NODE_NAME_SIZE)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: a name has 1 to %d bytes", __func__,
                        ATM_NODE_NAME_SIZE - 1);
    atmoe_node found = atm_graph_lookup(g, name);
    if (found != ATMOE_NODE_NONE && found != node)
        return name_taken(g, name, __func__);
    snprintf(g->nodes[node].name, ATM_NODE_NAME_SIZE, "%s", name);
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_find(const atmoe_graph *g, const char *name,
                                        atmoe_node *node)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, name);
    ATM_CHECK_NULL(g->ctx, node);
    *node = atm_graph_lookup(g, name);
    if (*node == ATMOE_NODE_NONE)
        return atm_fail(g->ctx, ATMOE_STATUS_NOT_FOUND,
                        "atmoe_graph_find: no node is named '%s'", name);
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_get_shape(const atmoe_graph *g,
                                             atmoe_node node, int *ndim,
                                             size_t *shape, atmoe_dtype *dtype)
{
    ATM_CHECK_NULL(NULL, g);
    atmoe_status st = atm_graph_check_node(g, node, __func__, "node");
    if (st != ATMOE_STATUS_OK)
        return st;
    const atm_node *n = &g->nodes[node];
    if (ndim)
        *ndim = n->ndim;
    if (shape)
        memcpy(shape, n->shape, (size_t)n->ndim * sizeof *shape);
    if (dtype)
        *dtype = n->dtype;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_mark_output(atmoe_graph *g, atmoe_node node)
{
    ATM_CHECK_NULL(NULL, g);
    atmoe_status st = atm_graph_check_node(g, node, __func__, "node");
    if (st != ATMOE_STATUS_OK)
        return st;
    if (!g->nodes[node].is_output) {
        atm_graph_unplan(g);
        g->nodes[node].is_output = 1;
    }
    return ATMOE_STATUS_OK;
}

/* ---------------------------------------------------------------- dumps */

static void dump_text(const atmoe_graph *g, FILE *f)
{
    char s[96];
    fprintf(f, "graph: %zu nodes", g->count);
    if (g->max_batch)
        fprintf(f, ", batch %zu", g->max_batch);
    if (atm_graph_is_planned(g))
        fprintf(f, ", %zu computed, arena %llu bytes (intermediates %llu)",
                g->order_count, (unsigned long long)g->memory.arena_bytes,
                (unsigned long long)g->memory.intermediate_bytes);
    fputc('\n', f);
    for (size_t i = 0; i < g->count; i++) {
        const atm_node *n = &g->nodes[i];
        fprintf(f, "%4zu %-20s %-16s %s %-20s", i, n->name, atm_node_op_name(n),
                atmoe_dtype_name(n->dtype),
                atm_shape_string(n->ndim, n->shape, s, sizeof s));
        for (int j = 0; j < n->nsrc; j++)
            if (n->src[j] != ATMOE_NODE_NONE)
                fprintf(f, " %%%d", n->src[j]);
        if (n->batch_dim >= 0)
            fprintf(f, " batch@%d", n->batch_dim);
        if (n->is_output)
            fprintf(f, " output");
        if (atm_graph_is_planned(g) && n->needed) {
            if (n->storage)
                fprintf(f, " [own storage]");
            else if (n->owner != (int)i)
                fprintf(f, " [shares %%%d]", n->owner);
            else
                fprintf(f, " [arena %zu +%zu%s]", n->offset, n->bytes,
                        n->pinned ? " pinned" : "");
        } else if (atm_graph_is_planned(g)) {
            fprintf(f, " [not needed]");
        }
        fputc('\n', f);
    }
}

static void dump_dot(const atmoe_graph *g, FILE *f)
{
    char s[96];
    fprintf(f, "digraph atmoe {\n  rankdir=TB;\n  node [shape=record, "
               "fontname=\"monospace\"];\n");
    for (size_t i = 0; i < g->count; i++) {
        const atm_node *n = &g->nodes[i];
        const char *color = (n->op->flags & ATM_OPF_INPUT)       ? "lightblue"
                            : n->storage != NULL        ? "lightgrey"
                            : n->is_output              ? "palegreen"
                            : (atm_graph_is_planned(g) && !n->needed) ? "white"
                                                         : "lightyellow";
        fprintf(f, "  n%zu [style=filled, fillcolor=%s, label=\"{%s|%s %s %s",
                i, color, n->name, atm_node_op_name(n),
                atmoe_dtype_name(n->dtype),
                atm_shape_string(n->ndim, n->shape, s, sizeof s));
        if (atm_graph_is_planned(g) && n->needed && n->storage == NULL &&
            n->owner == (int)i)
            fprintf(f, "|arena %zu +%zu", n->offset, n->bytes);
        fprintf(f, "}\"];\n");
        for (int j = 0; j < n->nsrc; j++)
            if (n->src[j] != ATMOE_NODE_NONE)
                fprintf(f, "  n%d -> n%zu;\n", n->src[j], i);
    }
    if (atm_graph_is_planned(g))
        fprintf(f, "  label=\"arena %llu bytes, intermediates %llu bytes\";\n",
                (unsigned long long)g->memory.arena_bytes,
                (unsigned long long)g->memory.intermediate_bytes);
    fprintf(f, "}\n");
}

ATMOE_API atmoe_status atmoe_graph_dump(const atmoe_graph *g, const char *path,
                                        atmoe_dump_format format)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, path);
    if (format != ATMOE_DUMP_TEXT && format != ATMOE_DUMP_DOT)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_graph_dump: format %d is not an "
                        "atmoe_dump_format", (int)format);
    char tmp[PATH_MAX];
    FILE *f = atm_file_begin(path, tmp, sizeof tmp);
    if (f == NULL)
        return atm_fail(g->ctx, ATMOE_STATUS_IO_ERROR,
                        "atmoe_graph_dump: cannot write next to %s: %s", path,
                        strerror(errno));
    if (format == ATMOE_DUMP_TEXT)
        dump_text(g, f);
    else
        dump_dot(g, f);
    if (atm_file_commit(f, tmp, path, 1) != 0)
        return atm_fail(g->ctx, ATMOE_STATUS_IO_ERROR,
                        "atmoe_graph_dump: writing %s failed: %s", path,
                        strerror(errno));
    return ATMOE_STATUS_OK;
}

