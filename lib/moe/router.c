/* The grouped router's host side: configuration, masks and fixed weights,
 * and the graph node that runs cl/router.cl. */
#include <config.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "moe/experts.h"
#include "moe/router.h"
#include "graph/graph.h"
#include "base/log.h"
#include "device/program.h"
#include "device/tuning.h"

void atm_router_retain(atmoe_router *router)
{
    router->refs++;
}

ATMOE_API void atmoe_router_free(atmoe_router *r)
{
    if (r == NULL || --r->refs > 0)
        return;
    for (int i = 0; i < 6; i++)
        atmoe_tensor_free(r->dev[i]);
    atm_free(r->group_mask);
    atm_free(r->expert_mask);
    atm_free(r->group_fixed);
    atm_free(r->expert_fixed);
    atm_free(r->slot_of_expert);
    atm_free(r->counts);
    atmoe_experts_free(r->set);
    atm_free(r);
}

ATMOE_API atmoe_status atmoe_router_new(atmoe_experts *set,
                                        atmoe_router_form form, float tau_g,
                                        float tau_d, int top_k_groups,
                                        int top_k_experts,
                                        atmoe_router **router)
{
    const char *fn = __func__;
    if (router)
        *router = NULL;
    ATM_CHECK_NULL(NULL, set);
    atmoe_context *ctx = set->ctx;
    ATM_CHECK_NULL(ctx, router);
    if (form != ATMOE_ROUTER_PROJECTED && form != ATMOE_ROUTER_SCALED)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: form %d is not an atmoe_router_form", fn,
                        (int)form);
    if (!(tau_g > 0.0f) || !(tau_d > 0.0f) || isinf(tau_g) || isinf(tau_d))
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: temperatures must be finite and > 0 (tau_g %g, "
                        "tau_d %g)", fn, tau_g, tau_d);
    if (set->dense_r2)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: a dense (T-REX) set has no groups to route; its "
                        "gates come from the graph", fn);
    size_t G = set->groups, M = set->max_group;
    size_t E = set->count - (size_t)set->has_general;
    if (top_k_groups < 0 || (size_t)top_k_groups > G || top_k_experts < 0 ||
        (size_t)top_k_experts > M)
        return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: top_k_groups %d must be 0 to %zu and "
                        "top_k_experts %d 0 to %zu (0 keeps all)", fn,
                        top_k_groups, G, top_k_experts, M);
    /* Sealed only once everything is known to be right: a refused call
     * leaves the set open. */
    atmoe_status st = atm_experts_seal(set);
    if (st != ATMOE_STATUS_OK)
        return st;

    atmoe_router *r = atm_calloc(1, sizeof *r);
    if (r == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", fn);
    r->ctx = ctx;
    r->refs = 1;
    r->set = set;
    atm_experts_retain(set);
    r->form = form;
    r->tau_g = tau_g;
    r->tau_d = tau_d;
    r->top_k_groups = top_k_groups;
    r->top_k_experts = top_k_experts;
    r->counts = atm_calloc(G, sizeof *r->counts);
    r->group_mask = atm_malloc(G * sizeof *r->group_mask);
    r->expert_mask = atm_malloc(G * M * sizeof *r->expert_mask);
    r->group_fixed = atm_malloc(G * sizeof *r->group_fixed);
    r->expert_fixed = atm_malloc(G * M * sizeof *r->expert_fixed);
    r->slot_of_expert = atm_malloc(E * sizeof *r->slot_of_expert);
    if (!r->counts || !r->group_mask || !r->expert_mask || !r->group_fixed ||
        !r->expert_fixed || !r->slot_of_expert) {
        atmoe_router_free(r);
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", fn);
    }
    for (size_t g = 0; g < G; g++) {
        r->group_mask[g] = 1;
        r->group_fixed[g] = NAN;
    }
    for (size_t i = 0; i < G * M; i++) {
        r->expert_mask[i] = 1;
        r->expert_fixed[i] = NAN;
    }
    for (size_t e = 0; e < E; e++) {
        const atm_expert *x = &set->experts[e];
        r->counts[x->group]++;
        r->slot_of_expert[e] = x->group * (int)M + x->slot;
    }
    /* Device copies of the control arrays, made once: computes only write
     * them when they change. */
    const struct {
        atmoe_dtype dtype;
        size_t n;
        const void *data;
    } arrays[6] = {{ATMOE_DTYPE_I32, G, r->counts},
                   {ATMOE_DTYPE_I32, G, r->group_mask},
                   {ATMOE_DTYPE_I32, G * M, r->expert_mask},
                   {ATMOE_DTYPE_F32, G, r->group_fixed},
                   {ATMOE_DTYPE_F32, G * M, r->expert_fixed},
                   {ATMOE_DTYPE_I32, E, r->slot_of_expert}};
    for (int i = 0; i < 6 && st == ATMOE_STATUS_OK; i++)
        st = atmoe_tensor_new(ctx, arrays[i].dtype, 1, &arrays[i].n,
                              &r->dev[i]);
    if (st != ATMOE_STATUS_OK) {
        atmoe_router_free(r);
        return st;
    }
    r->dirty = 1;
    snprintf(r->options, sizeof r->options,
             "-DNG=%zu -DMMAX=%zu -DFORM=%d -DTOPK_G=%d -DTOPK_E=%d", G, M,
             form == ATMOE_ROUTER_SCALED, top_k_groups, top_k_experts);
    *router = r;
    return ATMOE_STATUS_OK;
}

static atmoe_status check_target(atmoe_router *r, const char *fn, int group,
                                 int expert)
{
    const atmoe_experts *set = r->set;
    if (group < 0 || (size_t)group >= set->groups)
        return atm_fail(r->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: group %d is out of range (%zu groups)", fn, group,
                        set->groups);
    if (expert < -1 || expert >= r->counts[group])
        return atm_fail(r->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: expert %d is out of range: group %d has %d "
                        "(-1 names the whole group)", fn, expert, group,
                        r->counts[group]);
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_router_set_mask(atmoe_router *r, int group,
                                             int expert, int enabled)
{
    ATM_CHECK_NULL(NULL, r);
    atmoe_status st = check_target(r, __func__, group, expert);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (expert < 0)
        r->group_mask[group] = enabled != 0;
    else
        r->expert_mask[group * r->set->max_group + (size_t)expert] =
            enabled != 0;
    r->dirty = 1;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_router_set_fixed(atmoe_router *r, int group,
                                              int expert, float weight)
{
    ATM_CHECK_NULL(NULL, r);
    atmoe_status st = check_target(r, __func__, group, expert);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (!isnan(weight) && !(weight >= 0.0f && weight <= 1.0f))
        return atm_fail(r->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: a fixed weight is in [0, 1] (NaN frees it), "
                        "not %g", __func__, weight);
    size_t M = r->set->max_group;
    float *target = expert < 0 ? &r->group_fixed[group]
                               : &r->expert_fixed[group * M + (size_t)expert];
    /* Fixed weights of one level of a group must leave room: at most 1. */
    float old = *target, sum = 0.0f;
    *target = weight;
    size_t first = expert < 0 ? 0 : group * M;
    size_t n = expert < 0 ? r->set->groups : M;
    const float *level = expert < 0 ? r->group_fixed : r->expert_fixed;
    for (size_t i = first; i < first + n; i++)
        if (!isnan(level[i]))
            sum += level[i];
    if (sum > 1.0f + 1e-6f) {
        *target = old;
        return atm_fail(r->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the fixed weights of %s would add up to %g, "
                        "more than 1", __func__,
                        expert < 0 ? "the groups" : "the group's experts",
                        sum);
    }
    r->dirty = 1;
    return ATMOE_STATUS_OK;
}

atmoe_status atm_router_upload(atmoe_router *r)
{
    if (!r->dirty)
        return ATMOE_STATUS_OK;
    size_t G = r->set->groups, M = r->set->max_group;
    size_t E = r->set->count - (size_t)r->set->has_general;
    const void *data[6] = {r->counts,      r->group_mask,   r->expert_mask,
                           r->group_fixed, r->expert_fixed, r->slot_of_expert};
    size_t n[6] = {G, G, G * M, G, G * M, E};
    for (int i = 0; i < 6; i++) {
        atmoe_status st = atmoe_tensor_write(r->dev[i], data[i], n[i] * 4);
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    r->dirty = 0;
    return ATMOE_STATUS_OK;
}

/* ---------------------------------------------------------------- graph */

/* The work-items that share a row (kernels.router.WG, default 64). */
#define ROUTER_WG(g) atm_param_work_group((g)->ctx, ATM_PARAM_ROUTER_WG)

ATMOE_API atmoe_status atmoe_graph_router(atmoe_graph *g, atmoe_node h,
                                          atmoe_router *router,
                                          atmoe_node w_g, atmoe_node w_d,
                                          atmoe_node *a, atmoe_node *d,
                                          atmoe_node *w)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, g);
    ATM_CHECK_NULL(g->ctx, router);
    if (router->ctx != g->ctx)
        return atm_fail(g->ctx, ATMOE_STATUS_WRONG_CONTEXT,
                        "%s: the router belongs to another context", fn);
    const atm_node *hn, *gn, *dn;
    atmoe_status st;
    if ((st = atm_graph_get_node(g, h, fn, "h", &hn)) ||
        (st = atm_graph_get_node(g, w_g, fn, "w_g", &gn)) ||
        (st = atm_graph_get_node(g, w_d, fn, "w_d", &dn)))
        return st;
    const atmoe_experts *set = router->set;
    size_t G = set->groups, M = set->max_group;
    size_t E = set->count - (size_t)set->has_general;
    int projected = router->form == ATMOE_ROUTER_PROJECTED;
    size_t want_d[2] = {projected ? set->d_in : G, projected ? G * M : M};
    char b1[160], b2[160];
    if (hn->dtype != ATMOE_DTYPE_F32)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: h must be f32; it is %s", fn,
                        atm_node_desc(hn, b1, sizeof b1));
    /* The weights are read as stored; the logits are f32 whatever. */
    if (atm_weight_type(gn->dtype) < 0 || atm_weight_type(dn->dtype) < 0)
        return atm_fail(g->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: w_g and %s must be f32, f16 or bf16; they are "
                        "%s and %s", fn, projected ? "w_d" : "v_d",
                        atm_node_desc(gn, b1, sizeof b1),
                        atm_node_desc(dn, b2, sizeof b2));
    if (hn->ndim != 2 || hn->shape[1] != set->d_in || hn->batch_dim > 0)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: h must be [rows, %zu] (d_in of the expert set); "
                        "it is %s", fn, set->d_in,
                        atm_node_desc(hn, b1, sizeof b1));
    if (gn->ndim != 2 || gn->shape[0] != set->d_in || gn->shape[1] != G ||
        gn->batch_dim >= 0)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: w_g must be [%zu, %zu] (d_in, groups); it is %s",
                        fn, set->d_in, G, atm_node_desc(gn, b1, sizeof b1));
    if (dn->ndim != 2 || dn->shape[0] != want_d[0] ||
        dn->shape[1] != want_d[1] || dn->batch_dim >= 0)
        return atm_fail(g->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s must be [%zu, %zu] for the %s form; it is %s",
                        fn, projected ? "w_d" : "v_d", want_d[0], want_d[1],
                        projected ? "projected" : "scaled",
                        atm_node_desc(dn, b2, sizeof b2));

    size_t rows = hn->shape[0];
    size_t shape_w[2] = {rows, E}, shape_a[2] = {rows, G},
           shape_d[2] = {rows, G * M};
    atm_node p;
    atm_node_init(&p, &atm_op_router, ATMOE_DTYPE_F32, 2, shape_w);
    p.batch_dim = hn->batch_dim;
    p.batch_factor = hn->batch_factor;
    p.src[0] = h;
    p.src[1] = w_g;
    p.src[2] = w_d;
    p.nsrc = 3;
    size_t mark = g->count;
    atmoe_node wid, aid, did;
    if ((st = atm_graph_push(g, &p, NULL, fn, &wid)) != ATMOE_STATUS_OK)
        return st;
    atm_node q = p;
    q.op = &atm_op_secondary;
    q.label = "router_groups";
    q.src[0] = wid;
    q.src[1] = q.src[2] = ATMOE_NODE_NONE;
    q.nsrc = 1;
    memcpy(q.shape, shape_a, sizeof shape_a);
    if ((st = atm_graph_push(g, &q, NULL, fn, &aid)) == ATMOE_STATUS_OK) {
        memcpy(q.shape, shape_d, sizeof shape_d);
        q.label = "router_within";
        st = atm_graph_push(g, &q, NULL, fn, &did);
    }
    if (st != ATMOE_STATUS_OK) {
        atm_graph_truncate(g, mark); /* the three go in together or not */
        return st;
    }
    g->nodes[wid].co[0] = aid;
    g->nodes[wid].co[1] = did;
    ATM_NODE_PARAMS(router_params, &g->nodes[wid])->router = router;
    atm_router_retain(router);
    if (a)
        *a = aid;
    if (d)
        *d = did;
    if (w)
        *w = wid;
    return ATMOE_STATUS_OK;
}

/* The router's build options, with the storage types of the node's w_g
 * and w_d. */
static void router_options(const atmoe_graph *g, const atm_node *n,
                           char *buf, size_t size)
{
    const atmoe_router *r = ATM_NODE_PARAMS(router_params, n)->router;
    snprintf(buf, size, "%s -DWG=%d -DLPI=%u -DGT=%d -DDT=%d", r->options,
             (int)ATM_NODE_PARAMS(router_params, n)->wg,
             ATM_NODE_PARAMS(router_params, n)->lpi,
             atm_weight_type(g->nodes[n->src[1]].dtype),
             atm_weight_type(g->nodes[n->src[2]].dtype));
}

static atmoe_status router_prepare(atmoe_graph *g, atm_node *n)
{
    char options[192];
    /* The launch uses the size the kernel was built for, whatever the
     * parameters in force later (reqd_work_group_size). */
    router_params *rp = ATM_NODE_PARAMS(router_params, n);
    rp->wg = ROUTER_WG(g);
    /* kernels.router.LPI, at most the logits there are (a pass takes
     * w_g's or w_d's columns, the larger count bounds it), halved until its
     * partial sums (LPI x WG floats) take at most half the local
     * memory. */
    const atmoe_experts *set = rp->router->set;
    size_t most = set->groups;
    if (rp->router->form == ATMOE_ROUTER_PROJECTED &&
        set->groups * set->max_group > most)
        most = set->groups * set->max_group;
    size_t lpi = (size_t)atm_param_get(g->ctx, ATM_PARAM_ROUTER_LPI);
    if (lpi > most)
        lpi = most;
    while (lpi > 1 && lpi * rp->wg * sizeof(float) >
                          g->ctx->device->info.local_mem_bytes / 2)
        lpi /= 2;
    rp->lpi = (unsigned)lpi;
    router_options(g, n, options, sizeof options);
    return atm_node_kernel(g, n, 0, "router", options, "grouped_router");
}

static atmoe_status router_run(atmoe_graph *g, atm_node *n, cl_event *ev,
                               cl_event *last)
{
    (void)last;
    atmoe_router *r = ATM_NODE_PARAMS(router_params, n)->router;
    atmoe_status st = atm_router_upload(r);
    if (st != ATMOE_STATUS_OK)
        return st;
    cl_kernel k = n->kernel[0];
    const atmoe_tensor *h = &g->nodes[n->src[0]].rt;
    const atmoe_tensor *wg = &g->nodes[n->src[1]].rt;
    const atmoe_tensor *wd = &g->nodes[n->src[2]].rt;
    const atmoe_tensor *a = &g->nodes[n->co[0]].rt;
    const atmoe_tensor *d = &g->nodes[n->co[1]].rt;
    const atmoe_tensor *w = &n->rt;
    atm_args args = {k, 0, CL_SUCCESS};
    atm_arg_tensor(&args, h);
    atm_arg_ulong(&args, h->shape[1]);
    atm_arg_tensor(&args, wg);
    atm_arg_tensor(&args, wd);
    for (int j = 0; j < 6; j++)
        atm_arg_buffer(&args, r->dev[j]->buffer);
    atm_arg_int(&args, (cl_int)w->shape[1]);
    atm_arg_float(&args, r->tau_g);
    atm_arg_float(&args, r->tau_d);
    atm_arg_tensor(&args, a);
    atm_arg_tensor(&args, d);
    atm_arg_tensor(&args, w);
    if (args.err != CL_SUCCESS)
        return atm_fail(g->ctx, ATMOE_STATUS_OPENCL_ERROR,
                        "clSetKernelArg(grouped_router) for node '%s' "
                        "failed: %s (%d)", n->name,
                        atm_cl_error_name(args.err), (int)args.err);
    /* A work-group per row: not atm_node_launch's 1-D geometry. */
    size_t local = ATM_NODE_PARAMS(router_params, n)->wg;
    size_t global = h->shape[0] * local;
    cl_int err = clEnqueueNDRangeKernel(g->ctx->queue, k, 1, NULL, &global,
                                        &local, 0, NULL, ev);
    if (err != CL_SUCCESS)
        return atm_fail_cl(g->ctx, err, "clEnqueueNDRangeKernel(grouped_router)");
    return ATMOE_STATUS_OK;
}

static void router_cost(const atmoe_graph *g, const atm_node *n,
                        uint64_t *bytes, uint64_t *flops)
{
    (void)bytes;
    const atmoe_router *r = ATM_NODE_PARAMS(router_params, n)->router;
    const atmoe_tensor *h = atm_src_rt(g, n, 0), *d = atm_src_rt(g, n, 2);
    uint64_t hc = atm_tensor_count(h);
    *flops = 2 * hc * (r->form == ATMOE_ROUTER_PROJECTED ? d->shape[1] : 0) +
             2 * hc * r->set->groups;
}

static void router_release(atm_node *n)
{
    atmoe_router_free(ATM_NODE_PARAMS(router_params, n)->router);
}

const atm_op atm_op_router = {
    .name = "router",
    .prepare = router_prepare,
    .run = router_run,
    .cost = router_cost,
    .release = router_release,
    .backward = atm_router_backward,
};
