/* Small scenarios for the fault-injection sweeps of tests/test_faults.sh:
 * each uses the library as an application would, frees everything it
 * made, and ends with exit status 0, or 1 after printing the failing
 * call's status and message.  Anything else (a signal, an abort) is what
 * the sweeps look for.  Shapes are small and odd.
 *
 *   scenario context            a context, a tensor filled and read
 *   scenario plan               a graph (matmul through CLBlast, softmax,
 *                               RMSNorm) planned, not run
 *   scenario layer              an AT-MoE layer planned, computed, read
 *   scenario manifest M X       manifest M applied to x of file X
 *   scenario tune DIR           an explicit CLBlast set, a GEMM, and the
 *                               set saved to DIR/tuning.json
 *
 * Linked with lib/libatmoe_core.la, so that it can also report the
 * library's host allocations (ATMOE_TEST_FAIL_ALLOC sweeps): with
 * SCENARIO_COUNT set it prints "allocations N" at the end. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "atmoe.h"
#include "base/alloc.h"

static const char *scenario;
static atmoe_context *ctx;

/* Reports a failed call; returns 1 for the exit status. */
static int failed(const char *what, atmoe_status st)
{
    const char *msg = atmoe_errmsg(ctx);
    if (msg == NULL || *msg == '\0')
        msg = atmoe_errmsg(NULL);
    fprintf(stderr, "scenario %s: %s: %s: %s\n", scenario, what,
            atmoe_status_name(st), msg && *msg ? msg : "(no message)");
    return 1;
}

#define TRY(call)                                                            \
    do {                                                                     \
        atmoe_status st_ = (call);                                           \
        if (st_ != ATMOE_STATUS_OK) {                                        \
            rc = failed(#call, st_);                                         \
            goto out;                                                        \
        }                                                                    \
    } while (0)

static float *random_floats(size_t n, unsigned seed)
{
    float *v = malloc(n * sizeof *v);
    if (v == NULL)
        return NULL;
    uint32_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        v[i] = (float)((s >> 8) / 16777216.0 - 0.5);
    }
    return v;
}

static int run_context(void)
{
    int rc = 0;
    atmoe_tensor *t = NULL;
    size_t shape[2] = {5, 7};
    float back[35];
    TRY(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, &t));
    TRY(atmoe_tensor_fill(t, 1.25));
    TRY(atmoe_tensor_read(t, back, sizeof back));
    if (back[34] != 1.25f) {
        fprintf(stderr, "scenario context: wrong result %g\n", back[34]);
        rc = 2;
    }
out:
    atmoe_tensor_free(t);
    return rc;
}

/* x [T, D] -> matmul with W [E, D]^T -> softmax -> RMSNorm. */
static int run_plan(void)
{
    enum { T = 5, D = 11, E = 9 };
    int rc = 0;
    atmoe_graph *g = NULL;
    float *w = random_floats(E * D, 3), *gamma = random_floats(E, 4);
    if (w == NULL || gamma == NULL) {
        rc = 1;
        goto out;
    }
    size_t xs[2] = {T, D}, ws[2] = {E, D}, gs[1] = {E};
    atmoe_node x, nw, ng, h, s, y;
    TRY(atmoe_graph_new(ctx, &g));
    TRY(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &x));
    TRY(atmoe_graph_constant(g, "w", ATMOE_DTYPE_F32, 2, ws, w, &nw));
    TRY(atmoe_graph_constant(g, "gamma", ATMOE_DTYPE_F32, 1, gs, gamma, &ng));
    TRY(atmoe_graph_matmul(g, x, nw, ATMOE_NODE_NONE,
                           ATMOE_MATMUL_TRANSPOSE_B, &h));
    TRY(atmoe_graph_softmax(g, h, -1, &s));
    TRY(atmoe_graph_rmsnorm(g, s, ng, 1e-5f, &y));
    TRY(atmoe_graph_mark_output(g, y));
    TRY(atmoe_graph_plan(g, 0));
out:
    atmoe_graph_free(g);
    free(w);
    free(gamma);
    return rc;
}

/* One AT-MoE layer over 3 experts in 2 groups with a general LoRA. */
static int run_layer(void)
{
    enum { T = 7, DI = 13, DO = 11, G = 2, MMAX = 2 };
    static const size_t ranks[3] = {2, 3, 1};
    static const int groups[3] = {0, 0, 1};
    int rc = 0;
    atmoe_experts *set = NULL;
    atmoe_router *router = NULL;
    atmoe_graph *g = NULL;
    float *buf = random_floats(4096, 7), *x = random_floats(T * DI, 8);
    float y_host[T * DO];
    if (buf == NULL || x == NULL) {
        rc = 1;
        goto out;
    }
    TRY(atmoe_experts_new(ctx, DI, DO, &set));
    for (int e = 0; e < 3; e++)
        TRY(atmoe_experts_add(set, groups[e], ranks[e], buf + 100 * e,
                              buf + 1000 + 100 * e, 4.0f, 0, NULL));
    TRY(atmoe_experts_set_general(set, 2, buf + 2000, buf + 2500, 2.0f, 0,
                                  0.75f));
    TRY(atmoe_router_new(set, ATMOE_ROUTER_PROJECTED, 1.0f, 1.0f, 0, 0,
                         &router));
    size_t xs[2] = {T, DI}, w0s[2] = {DO, DI}, wgs[2] = {DI, G},
           wds[2] = {DI, G * MMAX};
    atmoe_node nx, y;
    atmoe_layer layer = {.bias = ATMOE_NODE_NONE,
                         .experts = set,
                         .router = router,
                         .router_input = ATMOE_NODE_NONE,
                         .gate_index = ATMOE_NODE_NONE,
                         .c = 1.0f};
    atmoe_layer_trace tr;
    TRY(atmoe_graph_new(ctx, &g));
    TRY(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &nx));
    TRY(atmoe_graph_constant(g, "w0", ATMOE_DTYPE_F32, 2, w0s, buf + 3000,
                             &layer.w0));
    TRY(atmoe_graph_constant(g, "w_g", ATMOE_DTYPE_F32, 2, wgs, buf + 3200,
                             &layer.w_g));
    TRY(atmoe_graph_constant(g, "w_d", ATMOE_DTYPE_F32, 2, wds, buf + 3300,
                             &layer.w_d));
    TRY(atmoe_graph_moe_layer(g, nx, &layer, &y, &tr));
    TRY(atmoe_graph_mark_output(g, y));
    TRY(atmoe_graph_mark_output(g, tr.w));
    TRY(atmoe_graph_plan(g, 0));
    TRY(atmoe_graph_set_input(g, nx, x, T * DI * sizeof *x, 0));
    TRY(atmoe_graph_compute(g, 0));
    TRY(atmoe_graph_read(g, y, y_host, sizeof y_host));
out:
    atmoe_graph_free(g);
    atmoe_router_free(router);
    atmoe_experts_free(set);
    free(buf);
    free(x);
    return rc;
}

static int run_manifest(const char *path, const char *input)
{
    int rc = 0;
    atmoe_manifest *m = NULL;
    atmoe_safetensors *f = NULL;
    atmoe_graph *g = NULL;
    float *x = NULL, *y_host = NULL;
    atmoe_manifest_info info;
    atmoe_safetensors_tensor xt;
    TRY(atmoe_manifest_open(ctx, path, &m));
    TRY(atmoe_manifest_check(m));
    TRY(atmoe_manifest_get_info(m, &info));
    TRY(atmoe_safetensors_open(ctx, input, &f));
    TRY(atmoe_safetensors_find(f, "x", &xt));
    size_t tokens = xt.shape[0];
    x = malloc(tokens * info.d_in * sizeof *x);
    if (x == NULL) {
        rc = 1;
        goto out;
    }
    TRY(atmoe_safetensors_read_f32(f, "x", x, tokens * info.d_in));
    size_t xs[2] = {tokens, info.d_in};
    atmoe_node nx, y;
    TRY(atmoe_graph_new(ctx, &g));
    TRY(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &nx));
    TRY(atmoe_manifest_build(m, g, nx, ATMOE_NODE_NONE, ATMOE_NODE_NONE,
                             NULL, NULL, &y));
    TRY(atmoe_graph_mark_output(g, y));
    TRY(atmoe_graph_plan(g, 0));
    TRY(atmoe_graph_set_input(g, nx, x, tokens * info.d_in * sizeof *x, 0));
    TRY(atmoe_graph_compute(g, 0));
    int ndim;
    size_t shape[ATMOE_MAX_DIMS];
    TRY(atmoe_graph_get_shape(g, y, &ndim, shape, NULL));
    size_t count = 1;
    for (int i = 0; i < ndim; i++)
        count *= shape[i];
    y_host = malloc(count * sizeof *y_host);
    if (y_host == NULL) {
        rc = 1;
        goto out;
    }
    TRY(atmoe_graph_read(g, y, y_host, count * sizeof *y_host));
out:
    atmoe_graph_free(g);
    atmoe_manifest_free(m);
    atmoe_safetensors_free(f);
    free(x);
    free(y_host);
    return rc;
}

/* A tuning run in small: apply a candidate set, time nothing, run a GEMM
 * with it, save the winner. */
static int run_tune(const char *dir)
{
    enum { M = 9, N = 7, K = 13 };
    static const char *set =
        "{\"clblast\": {\"Xgemm\": {\"GEMMK\": 0, \"KREG\": 1, \"KWG\": 16, "
        "\"KWI\": 2, \"MDIMA\": 8, \"MDIMC\": 8, \"MWG\": 32, \"NDIMB\": 8, "
        "\"NDIMC\": 8, \"NWG\": 32, \"SA\": 0, \"SB\": 0, \"STRM\": 0, "
        "\"STRN\": 0, \"VWM\": 1, \"VWN\": 1}, \"GemmRoutine\": "
        "{\"XGEMM_MIN_INDIRECT_SIZE\": 1}}}";
    int rc = 0;
    atmoe_graph *g = NULL;
    float *a = random_floats(M * K, 11), *b = random_floats(K * N, 12);
    float c[M * N];
    char path[4096];
    if (a == NULL || b == NULL) {
        rc = 1;
        goto out;
    }
    snprintf(path, sizeof path, "%s/tuning.json", dir);
    size_t as[2] = {M, K}, bs[2] = {K, N};
    atmoe_node na, nb, nc;
    TRY(atmoe_context_set_params(ctx, set));
    TRY(atmoe_graph_new(ctx, &g));
    TRY(atmoe_graph_input(g, "a", ATMOE_DTYPE_F32, 2, as, 0, &na));
    TRY(atmoe_graph_constant(g, "b", ATMOE_DTYPE_F32, 2, bs, b, &nb));
    TRY(atmoe_graph_matmul(g, na, nb, ATMOE_NODE_NONE, 0, &nc));
    TRY(atmoe_graph_mark_output(g, nc));
    TRY(atmoe_graph_plan(g, 0));
    TRY(atmoe_graph_set_input(g, na, a, sizeof(float) * M * K, 0));
    TRY(atmoe_graph_compute(g, 0));
    TRY(atmoe_graph_read(g, nc, c, sizeof c));
    atmoe_device_info dev;
    TRY(atmoe_context_get_device(ctx, &dev));
    TRY(atmoe_tuning_save(path, &dev, set));
out:
    atmoe_graph_free(g);
    free(a);
    free(b);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: scenario context|plan|layer|manifest M X|"
                        "tune DIR\n");
        return 2;
    }
    scenario = argv[1];
    int rc = 0;
    atmoe_status st = atmoe_context_new(NULL, &ctx);
    if (st != ATMOE_STATUS_OK) {
        ctx = NULL;
        rc = failed("atmoe_context_new", st);
    } else if (strcmp(scenario, "context") == 0) {
        rc = run_context();
    } else if (strcmp(scenario, "plan") == 0) {
        rc = run_plan();
    } else if (strcmp(scenario, "layer") == 0) {
        rc = run_layer();
    } else if (strcmp(scenario, "manifest") == 0 && argc == 4) {
        rc = run_manifest(argv[2], argv[3]);
    } else if (strcmp(scenario, "tune") == 0 && argc == 3) {
        rc = run_tune(argv[2]);
    } else {
        fprintf(stderr, "scenario: unknown scenario '%s'\n", scenario);
        rc = 2;
    }
    atmoe_context_free(ctx);
    if (getenv("SCENARIO_COUNT"))
        printf("allocations %llu\n",
               (unsigned long long)atm_alloc_process_count());
    return rc;
}
