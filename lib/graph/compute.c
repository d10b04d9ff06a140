/* Computing a planned graph: inputs in, kernels enqueued in order, outputs
 * read back, and per-node profiles. */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/alloc.h"
#include "graph/graph.h"
#include "base/log.h"

static atmoe_status need_plan(const atmoe_graph *g, const char *fn)
{
    if (!atm_graph_is_planned(g))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the graph is not planned (atmoe_graph_plan)", fn);
    return ATMOE_STATUS_OK;
}

/* The plan, and a compute since it was made. */
static atmoe_status need_compute(const atmoe_graph *g, const char *fn)
{
    atmoe_status st = need_plan(g, fn);
    if (st == ATMOE_STATUS_OK && g->batch == 0)
        st = atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                      "%s: nothing computed since the graph was planned", fn);
    return st;
}

/* The node's tensor at a batch: dense, in the arena at its owner's offset,
 * or the storage of a parameter or constant. */
void atm_node_set_runtime(atmoe_graph *g, atm_node *n, size_t batch)
{
    atmoe_tensor *t = &n->rt;
    if (n->storage) {
        *t = *n->storage;
        return;
    }
    const atm_node *owner = &g->nodes[n->owner];
    memset(t, 0, sizeof *t);
    t->ctx = g->ctx;
    t->dtype = n->dtype;
    t->ndim = n->ndim;
    if (owner->storage) { /* a reshape of a parameter or constant */
        t->buffer = owner->storage->buffer;
        t->offset = owner->storage->offset;
    } else {
        t->buffer = g->arena;
        t->offset = owner->offset / atmoe_dtype_size(n->dtype);
    }
    memcpy(t->shape, n->shape, sizeof t->shape);
    if (n->batch_dim >= 0)
        t->shape[n->batch_dim] = batch * n->batch_factor;
    size_t stride = 1;
    for (int i = n->ndim - 1; i >= 0; i--) {
        t->stride[i] = stride;
        stride *= t->shape[i];
    }
}

static atmoe_status get_input(atmoe_graph *g, atmoe_node id, const char *fn,
                              atm_node **out)
{
    atmoe_status st = need_plan(g, fn);
    if (st == ATMOE_STATUS_OK)
        st = atm_graph_check_node(g, id, fn, "input");
    if (st != ATMOE_STATUS_OK)
        return st;
    atm_node *n = &g->nodes[id];
    if (!(n->op->flags & ATM_OPF_INPUT))
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: node %d '%s' is a %s, not an input", fn, id,
                        n->name, atm_node_op_name(n));
    *out = n;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_set_input(atmoe_graph *g, atmoe_node input,
                                             const void *data, size_t bytes,
                                             size_t rows)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, data);
    atm_node *n = NULL;
    atmoe_status st = get_input(g, input, __func__, &n);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (n->batch_dim < 0 && rows != 0)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: input '%s' is not batched; rows must be 0",
                        __func__, n->name);
    if (n->batch_dim >= 0 && (rows == 0 || rows > g->max_batch))
        return atm_fail(g->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: input '%s' is batched: rows must be 1 to %zu, "
                        "not %zu", __func__, n->name, g->max_batch, rows);
    size_t want = atmoe_dtype_size(n->dtype);
    for (int i = 0; i < n->ndim; i++)
        want *= i == n->batch_dim ? rows * n->batch_factor : n->shape[i];
    if (bytes != want)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: input '%s' takes %zu bytes for %zu rows, not "
                        "%zu", __func__, n->name, want, rows, bytes);
    if (!n->needed) {
        n->rows_set = rows ? rows : 1;
        return ATMOE_STATUS_OK; /* no output reads it */
    }
    atm_node_set_runtime(g, n, rows);
    st = atmoe_tensor_write(&n->rt, data, bytes);
    if (st == ATMOE_STATUS_OK)
        n->rows_set = rows ? rows : 1;
    return st;
}

static void release_events(atmoe_graph *g)
{
    for (size_t k = 0; k < g->order_count; k++) {
        atm_node *n = &g->nodes[g->order[k]];
        if (n->event)
            clReleaseEvent(n->event);
        if (n->event_last)
            clReleaseEvent(n->event_last);
        n->event = n->event_last = NULL;
    }
}

ATMOE_API atmoe_status atmoe_graph_compute(atmoe_graph *g, size_t batch)
{
    ATM_CHECK_NULL(NULL, g);
    atmoe_status st = need_plan(g, __func__);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (g->max_batch == 0 && batch > 1)
        return atm_fail(g->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: batch %zu, but the graph has no batched input",
                        __func__, batch);
    if (batch > g->max_batch && g->max_batch)
        return atm_fail(g->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: batch %zu is larger than the planned %zu",
                        __func__, batch, g->max_batch);
    if (batch == 0)
        batch = g->max_batch ? g->max_batch : 1;
    for (size_t k = 0; k < g->order_count; k++) {
        atm_node *n = &g->nodes[g->order[k]];
        if (!(n->op->flags & ATM_OPF_INPUT))
            continue;
        if (n->rows_set == 0)
            return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                            "%s: input '%s' was never set", __func__,
                            n->name);
        if (n->batch_dim >= 0 && n->rows_set != batch)
            return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s: input '%s' holds %zu rows, the compute asks "
                            "for a batch of %zu", __func__, n->name,
                            n->rows_set, batch);
    }

    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t allocs0 = atm_alloc_count();
    release_events(g);
    for (size_t k = 0; k < g->order_count; k++)
        atm_node_set_runtime(g, &g->nodes[g->order[k]], batch);
    g->batch = 0;
    for (size_t k = 0; k < g->order_count; k++) {
        atm_node *n = &g->nodes[g->order[k]];
        if (n->op->run == NULL)
            continue; /* inputs, storage, aliases, secondary outputs */
        cl_event *first = g->profiling ? &n->event : NULL;
        if (g->profiling && (n->op->flags & ATM_OPF_MARKER)) {
            /* CLBlast's event is its last kernel's, and a GEMM may run
             * several (padding, transposing): a marker opens the node. */
            cl_int err = clEnqueueMarkerWithWaitList(g->ctx->queue, 0, NULL,
                                                     &n->event);
            if (err != CL_SUCCESS)
                return atm_fail_cl(g->ctx, err, "clEnqueueMarkerWithWaitList");
            first = NULL;
        }
        st = n->op->run(g, n, first, g->profiling ? &n->event_last : NULL);
        if (st != ATMOE_STATUS_OK) {
            char detail[ATM_ERRMSG_SIZE / 2];
            snprintf(detail, sizeof detail, "%s", atmoe_errmsg(g->ctx));
            return atm_fail(g->ctx, st, "computing node %d '%s' (%s): %s",
                            g->order[k], n->name, atm_node_op_name(n), detail);
        }
    }
    /* Commands go to the device now; reading a result waits for them. */
    clFlush(g->ctx->queue);
    g->batch = batch;
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    g->stats.host_ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 +
                       (double)(t1.tv_nsec - t0.tv_nsec) * 1e-6;
    g->stats.host_allocations = atm_alloc_count() - allocs0;
    g->stats.batch = batch;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_read(atmoe_graph *g, atmoe_node node,
                                        void *data, size_t bytes)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, data);
    atmoe_status st = need_plan(g, __func__);
    if (st == ATMOE_STATUS_OK)
        st = atm_graph_check_node(g, node, __func__, "node");
    if (st != ATMOE_STATUS_OK)
        return st;
    const atm_node *n = &g->nodes[node];
    if (!n->is_output)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: node '%s' is not an output (its memory is "
                        "reused; atmoe_graph_mark_output marks outputs)", __func__,
                        n->name);
    if (g->batch == 0)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: nothing computed since the graph was planned",
                        __func__);
    size_t want = atm_tensor_bytes(&n->rt);
    if (bytes != want)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: output '%s' holds %zu bytes at batch %zu, not "
                        "%zu", __func__, n->name, want, g->batch, bytes);
    return atmoe_tensor_read(&n->rt, data, bytes);
}

ATMOE_API atmoe_status atmoe_graph_get_compute_stats(
    const atmoe_graph *g, atmoe_compute_stats *stats)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, stats);
    atmoe_status st = need_compute(g, __func__);
    if (st != ATMOE_STATUS_OK)
        return st;
    *stats = g->stats;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_set_profiling(atmoe_graph *g, int on)
{
    ATM_CHECK_NULL(NULL, g);
    g->profiling = on != 0;
    return ATMOE_STATUS_OK;
}

void atm_node_cost(const atmoe_graph *g, const atm_node *n, uint64_t *bytes,
                   uint64_t *flops)
{
    *bytes = *flops = 0;
    if (n->op->run == NULL)
        return; /* moves nothing */
    uint64_t in = 0;
    for (int i = 0; i < n->nsrc; i++) {
        const atmoe_tensor *s = atm_src_rt(g, n, i);
        if (s)
            in += atm_tensor_bytes(s);
    }
    *bytes = in + atm_tensor_bytes(&n->rt);
    if (n->op->cost)
        n->op->cost(g, n, bytes, flops);
}

static atmoe_status event_time(atmoe_graph *g, cl_event ev,
                               cl_profiling_info what, cl_ulong *ns)
{
    cl_int err = clGetEventProfilingInfo(ev, what, sizeof *ns, ns, NULL);
    if (err != CL_SUCCESS)
        return atm_fail_cl(g->ctx, err, "clGetEventProfilingInfo");
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_graph_get_profile(atmoe_graph *g, size_t i,
                                               atmoe_node_profile *profile)
{
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, profile);
    atmoe_status st = need_compute(g, __func__);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (i >= g->order_count)
        return atm_fail(g->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: index %zu, the plan computes %zu nodes",
                        __func__, i, g->order_count);
    atm_node *n = &g->nodes[g->order[i]];
    memset(profile, 0, sizeof *profile);
    profile->node = g->order[i];
    snprintf(profile->name, sizeof profile->name, "%s", n->name);
    profile->op = atm_node_op_name(n);
    atm_node_cost(g, n, &profile->bytes, &profile->flops);
    if (n->event) {
        cl_event end = n->event_last ? n->event_last : n->event;
        cl_int err = clWaitForEvents(1, &end);
        if (err != CL_SUCCESS)
            return atm_fail_cl(g->ctx, err, "clWaitForEvents");
        cl_ulong t0, t1;
        if ((st = event_time(g, n->event, CL_PROFILING_COMMAND_START, &t0)) ||
            (st = event_time(g, end, CL_PROFILING_COMMAND_END, &t1)))
            return st;
        profile->ms = t1 > t0 ? (double)(t1 - t0) * 1e-6 : 0.0;
    }
    return ATMOE_STATUS_OK;
}
