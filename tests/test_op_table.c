/* The seams of the graph engine: an operation added through the table
 * alone, by this program and not the library, plans and computes like the
 * library's own; and a planned graph computes without a host allocation of
 * the library.  Links the library's objects (lib/libatmoe_core.la) to reach
 * its internal headers. */
#include <config.h>

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "testutil.h"

/* ------------------------------------------------------ a toy operation */

/* y = a x + b element-wise, with scratch of its own: the kernel writes
 * a x into the node's scratch, then the result from it, so that the
 * scratch the row asks for must be where planning put it. */
static const char toy_source[] =
    "__kernel void toy(__global float *y, ulong y_off,\n"
    "                  __global const float *x, ulong x_off,\n"
    "                  __global float *work, ulong work_off,\n"
    "                  ulong n, float a, float b)\n"
    "{\n"
    "    size_t i = get_global_id(0);\n"
    "    if (i >= n) return;\n"
    "    work[work_off + i] = a * x[x_off + i];\n"
    "    y[y_off + i] = work[work_off + i] + b;\n"
    "}\n";

typedef struct toy_params {
    float a, b;
    cl_program program; /* the node owns these */
} toy_params;

static int toy_prepared, toy_runs, toy_releases;

static atmoe_status toy_prepare(atmoe_graph *g, atm_node *n)
{
    toy_params *tp = ATM_NODE_PARAMS(toy_params, n);
    const char *src = toy_source;
    cl_int err;
    if (tp->program == NULL) {
        tp->program = clCreateProgramWithSource(g->ctx->cl, 1, &src, NULL,
                                                &err);
        if (err != CL_SUCCESS)
            return atm_fail_cl(g->ctx, err, "toy: clCreateProgramWithSource");
        err = clBuildProgram(tp->program, 1, &g->ctx->device->id, "", NULL,
                             NULL);
        if (err != CL_SUCCESS)
            return atm_fail_cl(g->ctx, err, "toy: clBuildProgram");
    }
    if (n->kernel[0] == NULL) {
        n->kernel[0] = clCreateKernel(tp->program, "toy", &err);
        if (err != CL_SUCCESS)
            return atm_fail_cl(g->ctx, err, "toy: clCreateKernel");
    }
    toy_prepared++;
    return ATMOE_STATUS_OK;
}

static size_t toy_scratch(const atmoe_graph *g, const atm_node *n)
{
    (void)g;
    size_t count = 1;
    for (int i = 0; i < n->ndim; i++)
        count *= n->shape[i];
    return count * sizeof(float);
}

static atmoe_status toy_run(atmoe_graph *g, atm_node *n, cl_event *first,
                            cl_event *last)
{
    (void)last;
    const toy_params *tp = ATM_NODE_PARAMS(toy_params, n);
    const atmoe_tensor *x = atm_src_rt(g, n, 0);
    size_t count = atm_tensor_count(&n->rt);
    atm_args a = {n->kernel[0], 0, CL_SUCCESS};
    atm_arg_tensor(&a, &n->rt);
    atm_arg_tensor(&a, x);
    atm_arg_buffer(&a, g->arena);
    atm_arg_ulong(&a, n->work_offset / sizeof(float));
    atm_arg_ulong(&a, count);
    atm_arg_float(&a, tp->a);
    atm_arg_float(&a, tp->b);
    toy_runs++;
    return atm_node_launch(g, n, &a, "toy", count, first);
}

static void toy_cost(const atmoe_graph *g, const atm_node *n,
                     uint64_t *bytes, uint64_t *flops)
{
    (void)g;
    (void)bytes;
    *flops = 2 * atm_tensor_count(&n->rt);
}

/* The node holds a kernel made outside the context's cache: it releases
 * it with its program. */
static void toy_release(atm_node *n)
{
    toy_params *tp = ATM_NODE_PARAMS(toy_params, n);
    if (n->kernel[0])
        clReleaseKernel(n->kernel[0]);
    if (tp->program)
        clReleaseProgram(tp->program);
    toy_releases++;
}

static const atm_op toy_op = {
    .name = "toy",
    .flags = ATM_OPF_INPLACE,
    .prepare = toy_prepare,
    .scratch = toy_scratch,
    .run = toy_run,
    .cost = toy_cost,
    .release = toy_release,
};

/* The builder, as a library operation's would be. */
static atmoe_status graph_toy(atmoe_graph *g, atmoe_node x, float a, float b,
                              atmoe_node *out)
{
    atm_node p;
    atmoe_status st = atm_unary_proto(g, &toy_op, x, "graph_toy", &p);
    if (st != ATMOE_STATUS_OK)
        return st;
    toy_params *tp = ATM_NODE_PARAMS(toy_params, &p);
    tp->a = a;
    tp->b = b;
    tp->program = NULL;
    return atm_graph_finish(g, &p, "graph_toy", out);
}

START_TEST(test_toy_operation)
{
    enum { T = 19, D = 37 };
    atmoe_context *ctx;
    ck_assert_status(atmoe_context_new(NULL, &ctx), NULL);
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t shape[2] = {T, D};
    atmoe_node x, s, y, z;
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, shape, 1,
                                       &x), ctx);
    /* Between two library operations, so that memory flows through it. */
    ck_assert_status(atmoe_graph_silu(g, x, &s), ctx);
    ck_assert_status(graph_toy(g, s, -1.75f, 0.5f, &y), ctx);
    ck_assert_status(atmoe_graph_scale(g, y, 3.0f, &z), ctx);
    ck_assert_status(atmoe_graph_mark_output(g, z), ctx);
    toy_prepared = toy_runs = toy_releases = 0;
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    ck_assert_int_eq(toy_prepared, 1);
    ck_assert_int_eq(toy_runs, 0); /* planning runs nothing */
    ck_assert_uint_eq(g->nodes[y].work_bytes, T * D * sizeof(float));

    /* The dump and the profile name it from its row. */
    ck_assert_str_eq(atm_node_op_name(&g->nodes[y]), "toy");

    test_rng rng;
    test_rng_seed(&rng, 41);
    static float xs[T * D], got[T * D];
    static double want[T * D];
    test_fill_uniform(&rng, xs, T * D, -3.0, 3.0);
    static const size_t batches[] = {T, 13, 2, 1};
    for (size_t bi = 0; bi < sizeof batches / sizeof batches[0]; bi++) {
        size_t rows = batches[bi];
        /* Poison the arena, so that an element the kernels do not write
         * fails. */
        cl_float nan = NAN;
        ck_assert_int_eq(clEnqueueFillBuffer(ctx->queue, g->arena, &nan,
                                             sizeof nan, 0,
                                             g->memory.arena_bytes, 0, NULL,
                                             NULL), CL_SUCCESS);
        ck_assert_status(atmoe_graph_set_input(g, x, xs,
                                               rows * D * sizeof(float),
                                               rows), ctx);
        ck_assert_status(atmoe_graph_compute(g, rows), ctx);
        test_poison(got, T * D);
        ck_assert_status(atmoe_graph_read(g, z, got,
                                          rows * D * sizeof(float)), ctx);
        for (size_t i = 0; i < rows * D; i++) {
            double v = xs[i];
            double silu = v / (1.0 + exp(-v));
            want[i] = 3.0 * (-1.75 * silu + 0.5);
        }
        /* Relative to max(|want|, 1): the result crosses zero. */
        double err = test_max_rel_err(got, want, rows * D, 1.0);
        ck_assert_msg(err < 1e-5, "rows %zu: relative error %g", rows, err);
        atmoe_compute_stats cs;
        ck_assert_status(atmoe_graph_get_compute_stats(g, &cs), ctx);
        ck_assert_uint_eq(cs.host_allocations, 0);
        ck_assert_uint_eq(cs.batch, rows);
    }
    ck_assert_int_eq(toy_prepared, 1);

    /* Profiles come from the row's cost. */
    ck_assert_status(atmoe_graph_set_profiling(g, 1), ctx);
    ck_assert_status(atmoe_graph_set_input(g, x, xs, 4 * D * sizeof(float),
                                           4), ctx);
    ck_assert_status(atmoe_graph_compute(g, 4), ctx);
    atmoe_graph_memory mem;
    ck_assert_status(atmoe_graph_get_memory(g, &mem), ctx);
    int seen = 0;
    for (size_t i = 0; i < mem.nodes_computed; i++) {
        atmoe_node_profile pr;
        ck_assert_status(atmoe_graph_get_profile(g, i, &pr), ctx);
        if (strcmp(pr.op, "toy") == 0) {
            seen = 1;
            ck_assert_uint_eq(pr.flops, 2 * 4 * D);
            ck_assert_uint_eq(pr.bytes, 2 * 4 * D * sizeof(float));
        }
    }
    ck_assert(seen);

    atmoe_graph_free(g);
    ck_assert_int_eq(toy_releases, 1);
    atmoe_context_free(ctx);
}
END_TEST

/* -------------------------------------------- computing allocates nothing */

static atmoe_tensor *tensor_of(atmoe_context *ctx, test_rng *rng, size_t r,
                               size_t c, double scale)
{
    size_t shape[2] = {r, c};
    atmoe_tensor *t;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, &t),
                     ctx);
    float *data = malloc(r * c * sizeof *data);
    ck_assert_ptr_nonnull(data);
    test_fill_uniform(rng, data, r * c, -scale, scale);
    ck_assert_status(atmoe_tensor_write(t, data, r * c * sizeof *data), ctx);
    free(data);
    return t;
}

/* An AT-MoE layer between graph operations of every family, computed at
 * batches that take each route of the mixture (our kernels, CLBlast past
 * ATMOE_LINEAR_MAX_TOKENS, merged): no compute allocates on the host. */
START_TEST(test_compute_allocates_nothing)
{
    enum { T = 23, D_IN = 29, D_OUT = 31, E = 3 };
    /* Batches past 5 go to CLBlast. */
    setenv("ATMOE_LINEAR_MAX_TOKENS", "5", 1);
    atmoe_context *ctx;
    ck_assert_status(atmoe_context_new(NULL, &ctx), NULL);
    unsetenv("ATMOE_LINEAR_MAX_TOKENS");
    test_rng rng;
    test_rng_seed(&rng, 7);

    atmoe_experts *set;
    ck_assert_status(atmoe_experts_new(ctx, D_IN, D_OUT, &set), ctx);
    static const size_t rank[E] = {3, 2, 4};
    for (int e = 0; e < E; e++) {
        float a[4 * D_IN], b[D_OUT * 4];
        test_fill_uniform(&rng, a, rank[e] * D_IN, -0.5, 0.5);
        test_fill_uniform(&rng, b, D_OUT * rank[e], -0.5, 0.5);
        ck_assert_status(atmoe_experts_add(set, e < 2 ? 0 : 1, rank[e], a, b,
                                           4.0f, 0, NULL), ctx);
    }
    atmoe_router *router;
    ck_assert_status(atmoe_router_new(set, ATMOE_ROUTER_PROJECTED, 1.0f,
                                      1.0f, 0, 0, &router), ctx);
    atmoe_tensor *w0 = tensor_of(ctx, &rng, D_OUT, D_IN, 0.5);
    atmoe_tensor *wg = tensor_of(ctx, &rng, D_IN, 2, 1.0);
    atmoe_tensor *wd = tensor_of(ctx, &rng, D_IN, 2 * 2, 1.0);
    atmoe_tensor *head = tensor_of(ctx, &rng, D_OUT, 7, 0.5);

    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t xs[2] = {T, D_IN};
    atmoe_node x, n1, w0n, wgn, wdn, hn, y, h, k, ki, m, cat, v;
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 1,
                                       &x), ctx);
    ck_assert_status(atmoe_graph_parameter(g, "w0", w0, &w0n), ctx);
    ck_assert_status(atmoe_graph_parameter(g, "w_g", wg, &wgn), ctx);
    ck_assert_status(atmoe_graph_parameter(g, "w_d", wd, &wdn), ctx);
    ck_assert_status(atmoe_graph_parameter(g, "head", head, &hn), ctx);
    ck_assert_status(atmoe_graph_rmsnorm(g, x, ATMOE_NODE_NONE, 1e-5f, &n1),
                     ctx);
    atmoe_layer layer = {.w0 = w0n, .bias = ATMOE_NODE_NONE, .experts = set,
                         .router = router, .w_g = wgn, .w_d = wdn,
                         .router_input = ATMOE_NODE_NONE,
                         .gate_index = ATMOE_NODE_NONE, .c = 1.0f};
    atmoe_layer_trace trace;
    ck_assert_status(atmoe_graph_moe_layer(g, n1, &layer, &y, &trace), ctx);
    ck_assert_status(atmoe_graph_gelu(g, y, &h), ctx);
    ck_assert_status(atmoe_graph_matmul(g, h, hn, ATMOE_NODE_NONE, 0, &m),
                     ctx);
    ck_assert_status(atmoe_graph_softmax(g, m, -1, &m), ctx);
    ck_assert_status(atmoe_graph_topk(g, m, 2, -1, &k, &ki), ctx);
    ck_assert_status(atmoe_graph_concat(g, m, k, 1, &cat), ctx);
    size_t start[2] = {0, 1}, vs[2] = {T, 5};
    ck_assert_status(atmoe_graph_view(g, cat, start, vs, &v), ctx);
    ck_assert_status(atmoe_graph_mark_output(g, v), ctx);
    ck_assert_status(atmoe_graph_mark_output(g, trace.w), ctx);
    ck_assert_status(atmoe_graph_mark_output(g, ki), ctx);

    /* A single gate row makes the mixture mergeable: a second graph with
     * the merged route. */
    atmoe_graph *gm;
    ck_assert_status(atmoe_graph_new(ctx, &gm), ctx);
    size_t gs[2] = {1, E};
    float gate[E] = {0.5f, 0.25f, 0.25f};
    atmoe_node xm, w0m, gn, ym;
    ck_assert_status(atmoe_graph_input(gm, "x", ATMOE_DTYPE_F32, 2, xs, 1,
                                       &xm), ctx);
    ck_assert_status(atmoe_graph_parameter(gm, "w0", w0, &w0m), ctx);
    ck_assert_status(atmoe_graph_constant(gm, "gates", ATMOE_DTYPE_F32, 2,
                                          gs, gate, &gn), ctx);
    ck_assert_status(atmoe_graph_mixture(gm, xm, w0m, ATMOE_NODE_NONE, set,
                                         ATMOE_MIX_BLOCK, gn,
                                         ATMOE_NODE_NONE, 1.0f, &ym), ctx);
    ck_assert_status(atmoe_graph_mixture_set_merge(gm, ym,
                                                   ATMOE_MERGE_ALWAYS), ctx);
    ck_assert_status(atmoe_graph_mark_output(gm, ym), ctx);

    atmoe_graph *graphs[2] = {g, gm};
    atmoe_node inputs[2] = {x, xm};
    static float xdata[T * D_IN];
    test_fill_uniform(&rng, xdata, T * D_IN, -1.0, 1.0);
    for (int i = 0; i < 2; i++) {
        ck_assert_status(atmoe_graph_plan(graphs[i], 0), ctx);
        static const size_t batches[] = {1, 2, 3, 5, 6, 17, T};
        for (size_t b = 0; b < sizeof batches / sizeof batches[0]; b++) {
            size_t rows = batches[b];
            ck_assert_status(atmoe_graph_set_input(graphs[i], inputs[i],
                                                   xdata,
                                                   rows * D_IN * sizeof(float),
                                                   rows), ctx);
            for (int rep = 0; rep < 2; rep++) {
                ck_assert_status(atmoe_graph_compute(graphs[i], rows), ctx);
                atmoe_compute_stats cs;
                ck_assert_status(atmoe_graph_get_compute_stats(graphs[i],
                                                               &cs), ctx);
                ck_assert_msg(cs.host_allocations == 0,
                              "graph %d, batch %zu: %llu host allocations "
                              "during a compute", i, rows,
                              (unsigned long long)cs.host_allocations);
                ck_assert(cs.host_ms >= 0.0);
            }
        }
        ck_assert_status(atmoe_context_finish(ctx), ctx);
    }
    atmoe_compute_stats cs;
    atmoe_graph *fresh;
    ck_assert_status(atmoe_graph_new(ctx, &fresh), ctx);
    ck_assert_fails(atmoe_graph_get_compute_stats(fresh, &cs), ctx,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    ck_assert_fails(atmoe_graph_get_compute_stats(g, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_graph_get_compute_stats(NULL, &cs), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    atmoe_graph_free(fresh);
    atmoe_graph_free(gm);
    atmoe_graph_free(g);
    atmoe_tensor_free(w0);
    atmoe_tensor_free(wg);
    atmoe_tensor_free(wd);
    atmoe_tensor_free(head);
    atmoe_router_free(router);
    atmoe_experts_free(set);
    atmoe_context_free(ctx);
}
END_TEST

static Suite *op_table_suite(void)
{
    Suite *s = suite_create("op_table");
    TCase *tc = tcase_create("seams");
    tcase_add_test(tc, test_toy_operation);
    tcase_add_test(tc, test_compute_allocates_nothing);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(op_table_suite());
}
