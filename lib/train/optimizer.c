/* The optimiser: AdamW and SGD over every trainable weight of a graph,
 * with clipping by global norm, accumulation of micro-batches and the
 * learning-rate schedule (cl/optimizer.cl holds the kernels). */
#include <config.h>

#include <math.h>
#include <string.h>

#include "base/alloc.h"
#include "base/error.h"
#include "device/program.h"
#include "device/tuning.h"
#include "train/optimizer.h"

/* Work-items of a sum-of-squares group (SUMSQ_GROUP in the kernel) and the
 * elements a group covers at least before an entry gets another, up to a
 * number of groups that keeps the final sum one group's work. */
#define SUMSQ_GROUP 64
#define SUMSQ_SPAN 4096
#define SUMSQ_MAX_GROUPS 64

/* torch.nn.utils.clip_grad_norm_'s guard against a zero norm. */
#define CLIP_EPS 1e-6

const char *atm_opt_kind_name(atmoe_optimizer_kind kind)
{
    return kind == ATMOE_OPTIMIZER_ADAMW ? "adamw"
           : kind == ATMOE_OPTIMIZER_SGD ? "sgd"
                                         : ATM_UNKNOWN_NAME;
}

size_t atm_opt_state_count(const atmoe_optimizer *opt)
{
    if (opt->cfg.kind == ATMOE_OPTIMIZER_ADAMW)
        return 2;
    return opt->cfg.momentum > 0.0f ? 1 : 0;
}

const char *atm_opt_state_prefix(const atmoe_optimizer *opt, size_t i)
{
    if (opt->cfg.kind == ATMOE_OPTIMIZER_ADAMW)
        return i == 0 ? "adam_m" : "adam_v";
    return "sgd_momentum";
}

cl_mem atm_opt_state_buffer(const atmoe_optimizer *opt, size_t i)
{
    return i == 0 ? opt->m : opt->v;
}

ATMOE_API atmoe_status atmoe_optimizer_config_default(
    atmoe_optimizer_config *config)
{
    ATM_CHECK_NULL(NULL, config);
    memset(config, 0, sizeof *config);
    config->kind = ATMOE_OPTIMIZER_ADAMW;
    config->lr = 1e-3f;
    config->beta1 = 0.9f;
    config->beta2 = 0.999f;
    config->eps = 1e-8f;
    config->momentum = 0.0f;
    config->weight_decay = 0.01f;
    config->max_grad_norm = 0.0f;
    config->schedule = ATMOE_SCHEDULE_CONSTANT;
    config->warmup_steps = 0;
    config->total_steps = 0;
    config->min_lr = 0.0f;
    config->accumulation = 1;
    return ATMOE_STATUS_OK;
}

static int in_unit(float x) /* [0, 1), and not NaN */
{
    return x >= 0.0f && x < 1.0f;
}

static atmoe_status check_config(atmoe_context *ctx,
                                 const atmoe_optimizer_config *c,
                                 const char *fn)
{
    atmoe_status bad = ATMOE_STATUS_INVALID_ARGUMENT;
    if (c->kind != ATMOE_OPTIMIZER_ADAMW && c->kind != ATMOE_OPTIMIZER_SGD)
        return atm_fail(ctx, bad, "%s: unknown optimiser kind %d", fn,
                        (int)c->kind);
    if (!(c->lr > 0.0f) || !isfinite(c->lr))
        return atm_fail(ctx, bad, "%s: lr must be finite and > 0, not %g",
                        fn, (double)c->lr);
    if (c->kind == ATMOE_OPTIMIZER_ADAMW) {
        if (!in_unit(c->beta1) || !in_unit(c->beta2))
            return atm_fail(ctx, bad,
                            "%s: betas must be in [0, 1), not (%g, %g)", fn,
                            (double)c->beta1, (double)c->beta2);
        if (!(c->eps > 0.0f) || !isfinite(c->eps))
            return atm_fail(ctx, bad, "%s: eps must be finite and > 0, not "
                            "%g", fn, (double)c->eps);
    } else if (!in_unit(c->momentum)) {
        return atm_fail(ctx, bad, "%s: momentum must be in [0, 1), not %g",
                        fn, (double)c->momentum);
    }
    if (!(c->weight_decay >= 0.0f) || !isfinite(c->weight_decay))
        return atm_fail(ctx, bad, "%s: weight_decay must be finite and >= 0, "
                        "not %g", fn, (double)c->weight_decay);
    if (!(c->max_grad_norm >= 0.0f) || !isfinite(c->max_grad_norm))
        return atm_fail(ctx, bad, "%s: max_grad_norm must be finite and >= 0 "
                        "(0: no clipping), not %g", fn,
                        (double)c->max_grad_norm);
    if (c->accumulation < 1)
        return atm_fail(ctx, bad, "%s: accumulation must be 1 or more "
                        "micro-batches per step", fn);
    if (c->schedule == ATMOE_SCHEDULE_COSINE) {
        if (c->total_steps <= c->warmup_steps)
            return atm_fail(ctx, bad, "%s: the cosine schedule needs "
                            "total_steps (%llu) > warmup_steps (%llu)", fn,
                            (unsigned long long)c->total_steps,
                            (unsigned long long)c->warmup_steps);
        if (!(c->min_lr >= 0.0f && c->min_lr <= c->lr))
            return atm_fail(ctx, bad, "%s: min_lr must be in [0, lr = %g], "
                            "not %g", fn, (double)c->lr, (double)c->min_lr);
    } else if (c->schedule != ATMOE_SCHEDULE_CONSTANT) {
        return atm_fail(ctx, bad, "%s: unknown schedule %d", fn,
                        (int)c->schedule);
    }
    return ATMOE_STATUS_OK;
}

/* The learning rate of step t >= 1, in double as the tests' reference. */
static double schedule_lr(const atmoe_optimizer_config *c, uint64_t t)
{
    double lr = c->lr;
    if (c->warmup_steps > 0 && t <= c->warmup_steps)
        return lr * (double)t / (double)c->warmup_steps;
    if (c->schedule == ATMOE_SCHEDULE_CONSTANT)
        return lr;
    double p = (double)(t - c->warmup_steps) /
               (double)(c->total_steps - c->warmup_steps);
    if (p > 1.0)
        p = 1.0;
    double lo = c->min_lr;
    return lo + 0.5 * (lr - lo) * (1.0 + cos(M_PI * p));
}

ATMOE_API atmoe_status atmoe_optimizer_get_lr(const atmoe_optimizer *opt,
                                              uint64_t step, float *lr)
{
    ATM_CHECK_NULL(NULL, opt);
    ATM_CHECK_NULL(opt->ctx, lr);
    if (step == 0)
        return atm_fail(opt->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: steps count from 1", __func__);
    *lr = (float)schedule_lr(&opt->cfg, step);
    return ATMOE_STATUS_OK;
}

ATMOE_API void atmoe_optimizer_free(atmoe_optimizer *opt)
{
    if (opt == NULL)
        return;
    cl_mem bufs[4] = {opt->m, opt->v, opt->acc, opt->partials};
    for (int i = 0; i < 4; i++)
        if (bufs[i])
            clReleaseMemObject(bufs[i]);
    atm_free(opt->entries);
    atm_free(opt);
}

static atmoe_status zeroed_buffer(atmoe_context *ctx, size_t count,
                                  cl_mem *buf, const char *what)
{
    atmoe_status st = atm_buffer_new(ctx, count * sizeof(float), buf, what);
    if (st != ATMOE_STATUS_OK)
        return st;
    cl_float zero = 0.0f;
    cl_int err = clEnqueueFillBuffer(ctx->queue, *buf, &zero, sizeof zero, 0,
                                     count * sizeof(float), 0, NULL, NULL);
    if (err != CL_SUCCESS)
        return atm_fail_cl(ctx, err, "clEnqueueFillBuffer");
    return ATMOE_STATUS_OK;
}

/* Copies the registry into opt->entries and lays out the state. */
static atmoe_status take_entries(atmoe_optimizer *opt, const char *fn)
{
    atmoe_graph *g = opt->graph;
    opt->count = atm_graph_trainable_count(g);
    if (opt->count == 0)
        return atm_fail(opt->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: nothing to train: the graph has no trainable "
                        "weight (its backward pass registers them)", fn);
    opt->entries = atm_calloc(opt->count, sizeof *opt->entries);
    if (opt->entries == NULL)
        return atm_fail(opt->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", fn);
    for (size_t i = 0; i < opt->count; i++) {
        const atm_trainable *t = atm_graph_trainable_at(g, i);
        const atm_node *gn = &g->nodes[t->grad];
        /* The gradient is read after the compute. */
        if (!atm_graph_value_kept(g, t->grad))
            return atm_fail(opt->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                            "%s: the gradient '%s' of trainable '%s' is not "
                            "kept after a compute (its memory is reused; an "
                            "output's is not)", fn, gn->name, t->name);
        atm_opt_entry *e = &opt->entries[i];
        memcpy(e->name, t->name, sizeof e->name);
        e->param = t->buffer;
        e->param_offset = t->offset;
        e->ndim = t->ndim;
        memcpy(e->shape, t->shape, sizeof e->shape);
        e->count = t->count;
        e->registry_index = i;
        e->state_offset = opt->total;
        opt->total += t->count;
        e->groups = (t->count + SUMSQ_SPAN - 1) / SUMSQ_SPAN;
        if (e->groups > SUMSQ_MAX_GROUPS)
            e->groups = SUMSQ_MAX_GROUPS;
        e->slot = opt->slots;
        opt->slots += e->groups;
        if (t->count > opt->max_count)
            opt->max_count = t->count;
    }
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_optimizer_new(
    atmoe_graph *graph, const atmoe_optimizer_config *config,
    atmoe_optimizer **opt)
{
    ATM_CHECK_NULL(NULL, graph);
    ATM_CHECK_NULL(graph->ctx, config);
    ATM_CHECK_NULL(graph->ctx, opt);
    *opt = NULL;
    atmoe_context *ctx = graph->ctx;
    atmoe_status st = check_config(ctx, config, __func__);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (!atm_graph_is_planned(graph))
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the graph is not planned (atmoe_graph_plan, "
                        "after its backward pass)", __func__);
    atmoe_optimizer *o = atm_calloc(1, sizeof *o);
    if (o == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", __func__);
    o->graph = graph;
    o->ctx = ctx;
    o->cfg = *config;
    st = take_entries(o, __func__);
    const char *update = config->kind == ATMOE_OPTIMIZER_ADAMW
                             ? "optimizer_adamw"
                             : "optimizer_sgd";
    if (st == ATMOE_STATUS_OK)
        st = atm_kernel_get(ctx, "optimizer", "", "optimizer_sumsq",
                            &o->k_sumsq);
    if (st == ATMOE_STATUS_OK)
        st = atm_kernel_get(ctx, "optimizer", "", "optimizer_sum", &o->k_sum);
    if (st == ATMOE_STATUS_OK)
        st = atm_kernel_get(ctx, "optimizer", "", "optimizer_accumulate",
                            &o->k_accumulate);
    if (st == ATMOE_STATUS_OK)
        st = atm_kernel_get(ctx, "optimizer", "", update, &o->k_update);
    if (st == ATMOE_STATUS_OK && atm_opt_state_count(o) >= 1)
        st = zeroed_buffer(ctx, o->total, &o->m, "atmoe_optimizer_new: m");
    if (st == ATMOE_STATUS_OK && atm_opt_state_count(o) >= 2)
        st = zeroed_buffer(ctx, o->total, &o->v, "atmoe_optimizer_new: v");
    if (st == ATMOE_STATUS_OK && config->accumulation > 1)
        st = zeroed_buffer(ctx, o->total, &o->acc,
                           "atmoe_optimizer_new: accumulator");
    if (st == ATMOE_STATUS_OK)
        st = zeroed_buffer(ctx, o->slots + 1, &o->partials,
                           "atmoe_optimizer_new: partial sums");
    if (st != ATMOE_STATUS_OK) {
        atmoe_optimizer_free(o);
        return st;
    }
    *opt = o;
    return ATMOE_STATUS_OK;
}

/* Entry e's registry entry, which must still be the one the optimiser was
 * made over. */
static atmoe_status live_entry(const atmoe_optimizer *opt,
                               const atm_opt_entry *e, const char *fn,
                               const atm_trainable **out)
{
    const atm_trainable *t = atm_graph_trainable_at(opt->graph,
                                                    e->registry_index);
    if (t == NULL || strcmp(t->name, e->name) != 0 || t->count != e->count)
        return atm_fail(opt->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the graph's trainable weights changed since the "
                        "optimiser was made ('%s')", fn, e->name);
    *out = t;
    return ATMOE_STATUS_OK;
}

/* The gradient of entry e: the accumulator, or its node after the last
 * compute. */
static atmoe_status gradient_of(const atmoe_optimizer *opt,
                                const atm_opt_entry *e, int from_acc,
                                const char *fn, cl_mem *buf, size_t *off)
{
    if (from_acc) {
        *buf = opt->acc;
        *off = e->state_offset;
        return ATMOE_STATUS_OK;
    }
    const atm_trainable *t = NULL;
    atmoe_status st = live_entry(opt, e, fn, &t);
    if (st != ATMOE_STATUS_OK)
        return st;
    return atm_trainable_grad_tensor(opt->graph, t, fn, buf, off);
}

#define ARG(k, i, v) clSetKernelArg((k), (i), sizeof(v), &(v))

/* The work-groups of the element-wise launches (accumulate, update): the
 * tuned "optimizer" WG, 64 by default as they always had.  The norm's
 * reduction keeps SUMSQ_GROUP, which its kernels are compiled for. */
static size_t update_group(const atmoe_optimizer *opt)
{
    return atm_param_work_group(opt->ctx, ATM_PARAM_OPTIMIZER_WG);
}

/* Entries that follow each other in their weights' buffer, their
 * gradients' and the state (the A of consecutive experts in a stacked set,
 * with gradients in one node) are updated by one launch: a run. */
typedef struct opt_run {
    cl_mem param, grad;
    size_t param_offset, grad_offset, state_offset, count;
    size_t end; /* the entry after the run */
} opt_run;

/* The run that starts at entry i; with_param 0 ignores the weights'
 * buffers (accumulation reads gradients only). */
static atmoe_status next_run(const atmoe_optimizer *opt, size_t i,
                             int from_acc, int with_param, const char *fn,
                             opt_run *run)
{
    const atm_opt_entry *e = &opt->entries[i];
    atmoe_status st = gradient_of(opt, e, from_acc, fn, &run->grad,
                                  &run->grad_offset);
    if (st != ATMOE_STATUS_OK)
        return st;
    run->param = e->param;
    run->param_offset = e->param_offset;
    run->state_offset = e->state_offset;
    run->count = e->count;
    for (run->end = i + 1; run->end < opt->count; run->end++) {
        const atm_opt_entry *n = &opt->entries[run->end];
        cl_mem g;
        size_t goff;
        st = gradient_of(opt, n, from_acc, fn, &g, &goff);
        if (st != ATMOE_STATUS_OK)
            return st;
        if (g != run->grad || goff != run->grad_offset + run->count ||
            n->state_offset != run->state_offset + run->count ||
            (with_param &&
             (n->param != run->param ||
              n->param_offset != run->param_offset + run->count)))
            break;
        run->count += n->count;
    }
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_optimizer_accumulate(atmoe_optimizer *opt)
{
    ATM_CHECK_NULL(NULL, opt);
    if (opt->pending >= opt->cfg.accumulation)
        return atm_fail(opt->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: %u micro-batches already accumulated, as many "
                        "as a step takes (atmoe_optimizer_step)", __func__,
                        opt->pending);
    cl_int first = opt->pending == 0;
    for (size_t i = 0; i < opt->count;) {
        opt_run r;
        atmoe_status st = next_run(opt, i, 0, 0, __func__, &r);
        if (st != ATMOE_STATUS_OK)
            return st;
        i = r.end;
        if (opt->cfg.accumulation == 1)
            continue; /* the step reads the node itself */
        cl_kernel k = opt->k_accumulate;
        cl_ulong aoff = r.state_offset, go = r.grad_offset, n = r.count;
        cl_int err = ARG(k, 0, opt->acc) | ARG(k, 1, aoff) |
                     ARG(k, 2, r.grad) | ARG(k, 3, go) | ARG(k, 4, n) |
                     ARG(k, 5, first);
        if (err != CL_SUCCESS)
            return atm_fail_cl(opt->ctx, err, "optimizer_accumulate");
        st = atm_launch_1d_local(opt->ctx, k, r.count, update_group(opt),
                                 "optimizer_accumulate", NULL);
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    opt->pending++;
    return ATMOE_STATUS_OK;
}

/* The sum of squares of the gradients, on the device: partial sums per
 * entry, then one work-group adds them into partials[slots], the one float
 * a step waits for. */
static atmoe_status sum_squares(atmoe_optimizer *opt, int from_acc,
                                double *out)
{
    const char *fn = "atmoe_optimizer_step";
    cl_kernel k = opt->k_sumsq;
    for (size_t i = 0; i < opt->count; i++) {
        const atm_opt_entry *e = &opt->entries[i];
        cl_mem g;
        size_t goff;
        atmoe_status st = gradient_of(opt, e, from_acc, fn, &g, &goff);
        if (st != ATMOE_STATUS_OK)
            return st;
        cl_ulong go = goff, n = e->count, slot = e->slot;
        cl_int err = ARG(k, 0, g) | ARG(k, 1, go) | ARG(k, 2, n) |
                     ARG(k, 3, opt->partials) | ARG(k, 4, slot);
        if (err != CL_SUCCESS)
            return atm_fail_cl(opt->ctx, err, "optimizer_sumsq");
        st = atm_launch_1d_local(opt->ctx, k, e->groups * SUMSQ_GROUP,
                                 SUMSQ_GROUP, "optimizer_sumsq", NULL);
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    cl_ulong n = opt->slots;
    cl_int err = ARG(opt->k_sum, 0, opt->partials) | ARG(opt->k_sum, 1, n) |
                 ARG(opt->k_sum, 2, opt->partials) | ARG(opt->k_sum, 3, n);
    if (err != CL_SUCCESS)
        return atm_fail_cl(opt->ctx, err, "optimizer_sum");
    atmoe_status st = atm_launch_1d_local(opt->ctx, opt->k_sum, SUMSQ_GROUP,
                                          SUMSQ_GROUP, "optimizer_sum", NULL);
    if (st != ATMOE_STATUS_OK)
        return st;
    cl_float total;
    err = clEnqueueReadBuffer(opt->ctx->queue, opt->partials, CL_TRUE,
                              opt->slots * sizeof(float), sizeof total,
                              &total, 0, NULL, NULL);
    if (err != CL_SUCCESS)
        return atm_fail_cl(opt->ctx, err, "clEnqueueReadBuffer");
    *out = total;
    return ATMOE_STATUS_OK;
}

static atmoe_status skip(atmoe_optimizer *opt, const char *what, double value,
                         double norm, atmoe_optimizer_report *report)
{
    opt->pending = 0;
    opt->skipped++;
    if (report) {
        report->step = opt->step;
        report->skipped = opt->skipped;
        report->lr = 0.0f;
        report->grad_norm = (float)norm;
        report->clip = 1.0f;
    }
    return atm_fail(opt->ctx, ATMOE_STATUS_NOT_FINITE,
                    "atmoe_optimizer_step: the %s is %g: step %llu skipped "
                    "(%llu skipped in all), nothing updated", what, value,
                    (unsigned long long)(opt->step + 1),
                    (unsigned long long)opt->skipped);
}

ATMOE_API atmoe_status atmoe_optimizer_step(atmoe_optimizer *opt, float loss,
                                            atmoe_optimizer_report *report)
{
    ATM_CHECK_NULL(NULL, opt);
    const char *fn = __func__;
    const atmoe_optimizer_config *c = &opt->cfg;
    int from_acc = c->accumulation > 1;
    if (from_acc && opt->pending != c->accumulation)
        return atm_fail(opt->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: %u of the %u micro-batches of a step "
                        "accumulated (atmoe_optimizer_accumulate)", fn,
                        opt->pending, c->accumulation);
    if (!isfinite(loss))
        return skip(opt, "loss", loss, NAN, report);

    double ss = 0.0;
    atmoe_status st = sum_squares(opt, from_acc, &ss);
    if (st != ATMOE_STATUS_OK)
        return st;
    /* The mean of the micro-batches' gradients is acc / accumulation. */
    double norm = sqrt(ss) / (double)c->accumulation;
    if (!isfinite(norm))
        return skip(opt, "gradient norm", norm, norm, report);
    double clip = 1.0;
    if (c->max_grad_norm > 0.0f) {
        clip = (double)c->max_grad_norm / (norm + CLIP_EPS);
        if (clip > 1.0)
            clip = 1.0;
    }

    uint64_t t = opt->step + 1;
    cl_float lr = (cl_float)schedule_lr(c, t);
    cl_float gs = (cl_float)(clip / (double)c->accumulation);
    cl_float b1 = c->beta1, b2 = c->beta2, eps = c->eps;
    cl_float wd = c->weight_decay, mu = c->momentum;
    cl_float bc1 = (cl_float)(1.0 - pow((double)c->beta1, (double)t));
    cl_float bc2 = (cl_float)(1.0 - pow((double)c->beta2, (double)t));
    cl_kernel k = opt->k_update;
    for (size_t i = 0; i < opt->count;) {
        opt_run run;
        st = next_run(opt, i, from_acc, 1, fn, &run);
        if (st != ATMOE_STATUS_OK)
            return st;
        i = run.end;
        cl_ulong po = run.param_offset, go = run.grad_offset;
        cl_ulong so = run.state_offset, n = run.count;
        cl_int err;
        if (c->kind == ATMOE_OPTIMIZER_ADAMW) {
            err = ARG(k, 0, run.param) | ARG(k, 1, po) | ARG(k, 2, run.grad) |
                  ARG(k, 3, go) | ARG(k, 4, opt->m) | ARG(k, 5, opt->v) |
                  ARG(k, 6, so) | ARG(k, 7, n) | ARG(k, 8, gs) |
                  ARG(k, 9, lr) | ARG(k, 10, b1) | ARG(k, 11, b2) |
                  ARG(k, 12, eps) | ARG(k, 13, wd) | ARG(k, 14, bc1) |
                  ARG(k, 15, bc2);
        } else {
            /* Without momentum the kernel never touches m: any buffer. */
            cl_mem m = opt->m ? opt->m : opt->partials;
            err = ARG(k, 0, run.param) | ARG(k, 1, po) | ARG(k, 2, run.grad) |
                  ARG(k, 3, go) | ARG(k, 4, m) | ARG(k, 5, so) |
                  ARG(k, 6, n) | ARG(k, 7, gs) | ARG(k, 8, lr) |
                  ARG(k, 9, mu) | ARG(k, 10, wd);
        }
        if (err != CL_SUCCESS)
            return atm_fail_cl(opt->ctx, err, "optimizer update");
        st = atm_launch_1d_local(opt->ctx, k, run.count, update_group(opt),
                                 "optimizer update", NULL);
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    clFlush(opt->ctx->queue);
    opt->step = t;
    opt->pending = 0;
    if (report) {
        report->step = opt->step;
        report->skipped = opt->skipped;
        report->lr = lr;
        report->grad_norm = (float)norm;
        report->clip = (float)clip;
    }
    return ATMOE_STATUS_OK;
}
