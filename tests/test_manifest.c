/* Tests of layer manifests (include/atmoe.h, "Layer manifests";
 * atmoe-manifest(5)):
 *
 *   - the fixture tests/fixtures/manifest/manifest.json parsed, described
 *     and checked: every module, expert, rank and scale;
 *   - its stack built into a graph and computed on the fixture's inputs
 *     (per-token routing, and one router row per sequence) against the
 *     float64 outputs and router traces make_adapters.py computed;
 *   - malformed manifests, each refused with FORMAT_ERROR and a message
 *     naming its JSON path; manifests whose files do not fit, each refused
 *     at the check with the status and the path;
 *   - a failed build leaves the graph as it was; arguments checked.
 *
 * Tolerance of the computed outputs: |got - want| <= 1e-5 max(1, max
 * |want|) over each tensor.  Each module sums at most 13 products in its
 * base GEMM and 4 in a shrink, in f32 (n eps of the sum of |terms|, 2e-6
 * at most here, where the sums of |terms| stay below 4 max |y|), and the
 * router's softmax weights carry a few eps; three layers compound it to
 * well under 1e-5 (the largest error seen is 3e-7). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define TOL 1e-5

#define FAILS ck_assert_fails_with
#define OK(expr) ck_assert_status((expr), NULL)

static char DIR_[4096];  /* tests/fixtures/manifest */
static char PATH_[4200]; /* its manifest.json */

static void setup(void)
{
    snprintf(DIR_, sizeof DIR_, "%s/fixtures/manifest", TEST_SRCDIR);
    snprintf(PATH_, sizeof PATH_, "%s/manifest.json", DIR_);
}

static atmoe_manifest *open_fixture(void)
{
    atmoe_manifest *m = NULL;
    OK(atmoe_manifest_open(NULL, PATH_, &m));
    return m;
}

/* ------------------------------------------------------------------------ */
/* The fixture                                                               */
/* ------------------------------------------------------------------------ */

START_TEST(test_describe)
{
    atmoe_manifest *m = open_fixture();
    atmoe_manifest_info info;
    OK(atmoe_manifest_get_info(m, &info));
    ck_assert_uint_eq(info.layers, 3);
    ck_assert_uint_eq(info.modules, 5);
    ck_assert_int_eq(info.checked, 0);
    ck_assert_uint_eq(info.d_in, 0);

    static const struct {
        size_t layer;
        int model_layer;
        const char *name;
        int is_output;
        size_t groups, experts;
        int has_general;
        float lambda, c;
        atmoe_router_form form;
        float tau_g, tau_d;
        int top_k_groups, top_k_experts;
        size_t masks, fixed, d_in, d_out;
    } want[] = {
        {0, 0, "q_proj", 1, 2, 3, 1, 0.75f, 1, ATMOE_ROUTER_PROJECTED, 0.7f,
         1.3f, 0, 0, 0, 0, 13, 13},
        {0, 0, "v_proj", 0, 2, 3, 0, 1, 1, ATMOE_ROUTER_SCALED, 1, 1, 1, 0, 0,
         0, 13, 7},
        {1, 1, "q_proj", 1, 1, 3, 0, 1, 1, ATMOE_ROUTER_PROJECTED, 1, 1, 0, 1,
         1, 0, 13, 13},
        {1, 1, "v_proj", 0, 2, 2, 0, 1, 0.5f, ATMOE_ROUTER_PROJECTED, 1, 1, 0,
         0, 0, 1, 13, 7},
        {2, 2, "c_attn", 1, 1, 1, 0, 1, 1, ATMOE_ROUTER_PROJECTED, 1, 1, 0, 0,
         0, 0, 13, 10},
    };
    for (int checked = 0; checked < 2; checked++) {
        for (size_t i = 0; i < 5; i++) {
            atmoe_manifest_module mod;
            OK(atmoe_manifest_get_module(m, i, &mod));
            ck_assert_uint_eq(mod.layer, want[i].layer);
            ck_assert_int_eq(mod.model_layer, want[i].model_layer);
            ck_assert_str_eq(mod.name, want[i].name);
            ck_assert_int_eq(mod.is_output, want[i].is_output);
            ck_assert_uint_eq(mod.groups, want[i].groups);
            ck_assert_uint_eq(mod.experts, want[i].experts);
            ck_assert_int_eq(mod.has_general, want[i].has_general);
            ck_assert_float_eq(mod.lambda, want[i].lambda);
            ck_assert_float_eq(mod.c, want[i].c);
            ck_assert_int_eq(mod.form, want[i].form);
            ck_assert_float_eq(mod.tau_g, want[i].tau_g);
            ck_assert_float_eq(mod.tau_d, want[i].tau_d);
            ck_assert_int_eq(mod.top_k_groups, want[i].top_k_groups);
            ck_assert_int_eq(mod.top_k_experts, want[i].top_k_experts);
            ck_assert_uint_eq(mod.masks, want[i].masks);
            ck_assert_uint_eq(mod.fixed, want[i].fixed);
            ck_assert_uint_eq(mod.d_in, checked ? want[i].d_in : 0);
            ck_assert_uint_eq(mod.d_out, checked ? want[i].d_out : 0);
            /* Paths resolved against the manifest's directory. */
            ck_assert_ptr_nonnull(mod.weight.file);
            ck_assert_ptr_nonnull(strstr(mod.weight.file, DIR_));
            ck_assert_ptr_nonnull(strstr(mod.weight.file, "/base.safetensors"));
            ck_assert_int_eq(mod.weight.transposed, i == 4);
            ck_assert(i == 0 ? mod.bias.file != NULL : mod.bias.file == NULL);
            ck_assert(i == 4 ? mod.w_g.file == NULL && mod.w_d.file == NULL
                             : mod.w_g.file != NULL && mod.w_d.file != NULL);
        }
        if (!checked) {
            OK(atmoe_manifest_check(m));
            OK(atmoe_manifest_check(m));
        }
    }
    OK(atmoe_manifest_get_info(m, &info));
    ck_assert_int_eq(info.checked, 1);
    ck_assert_uint_eq(info.d_in, 13);
    ck_assert_uint_eq(info.d_out, 10);

    /* Module 0: groups [[math, code], [style]], general LoRA; ranks,
     * alphas and scales as the adapters give them for layer 0's q_proj. */
    static const struct {
        int group, position;
        const char *adapter;
        size_t rank;
        float alpha, scale;
        unsigned flags;
    } experts[] = {
        {0, 0, "/../peft/math", 4, 8, 2, 0},
        {0, 1, "/../peft/code", 4, 16, 4, 0},
        {1, 0, "/../peft/style", 4, 6, 3, ATMOE_EXPERT_RSLORA},
        {-1, 0, "/../peft/general", 2, 2, 1, 0},
    };
    for (size_t e = 0; e < 4; e++) {
        atmoe_manifest_expert x;
        OK(atmoe_manifest_get_expert(m, 0, e, &x));
        ck_assert_int_eq(x.group, experts[e].group);
        ck_assert_int_eq(x.position, experts[e].position);
        ck_assert_ptr_nonnull(strstr(x.adapter, experts[e].adapter));
        ck_assert_int_eq(x.layer, 0);
        ck_assert_str_eq(x.module, "q_proj");
        ck_assert_str_eq(x.target, "model.layers.0.self_attn.q_proj");
        ck_assert_uint_eq(x.rank, experts[e].rank);
        ck_assert_float_eq(x.alpha, experts[e].alpha);
        ck_assert_float_eq(x.scale, experts[e].scale);
        ck_assert_uint_eq(x.flags, experts[e].flags);
    }
    /* The override of layer 2: layer 0 of the GPT-2 adapter. */
    atmoe_manifest_expert x;
    OK(atmoe_manifest_get_expert(m, 4, 0, &x));
    ck_assert_int_eq(x.layer, 0);
    ck_assert_str_eq(x.module, "c_attn");
    ck_assert_str_eq(x.target, "transformer.h.0.attn.c_attn");
    FAILS(atmoe_manifest_get_expert(m, 4, 1, &x), NULL,
          ATMOE_STATUS_OUT_OF_RANGE, "1 expert(s)");
    FAILS(atmoe_manifest_get_expert(m, 5, 0, &x), NULL,
          ATMOE_STATUS_OUT_OF_RANGE, "module 5");
    atmoe_manifest_module mod;
    FAILS(atmoe_manifest_get_module(m, 5, &mod), NULL,
          ATMOE_STATUS_OUT_OF_RANGE, "5 module(s)");
    atmoe_manifest_free(m);
}
END_TEST

/* Reads tensor name of a safetensors file (f32, widened). */
static float *read_tensor(const char *file, const char *name, size_t *rows,
                          size_t *cols)
{
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", DIR_, file);
    atmoe_safetensors *f;
    OK(atmoe_safetensors_open(NULL, path, &f));
    atmoe_safetensors_tensor t;
    ck_assert_status(atmoe_safetensors_find(f, name, &t), NULL);
    *rows = t.shape[0];
    *cols = t.ndim > 1 ? t.shape[1] : 1;
    float *data = malloc(t.count * sizeof *data);
    OK(atmoe_safetensors_read_f32(f, name, data, t.count));
    atmoe_safetensors_free(f);
    return data;
}

/* gate_index, stored I64 as PyTorch writes it. */
static int32_t *read_indexes(const char *file, size_t count)
{
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", DIR_, file);
    atmoe_safetensors *f;
    OK(atmoe_safetensors_open(NULL, path, &f));
    atmoe_safetensors_tensor t;
    OK(atmoe_safetensors_find(f, "gate_index", &t));
    ck_assert_int_eq(t.dtype, ATMOE_SAFETENSORS_I64);
    ck_assert_uint_eq(t.count, count);
    int32_t *idx = malloc(count * sizeof *idx);
    for (size_t i = 0; i < count; i++) {
        int64_t v;
        memcpy(&v, (const char *)t.data + 8 * i, sizeof v);
        idx[i] = (int32_t)v;
    }
    atmoe_safetensors_free(f);
    return idx;
}

static void expect_close(const char *what, atmoe_graph *g, atmoe_node node,
                         const char *expected_file, const char *key)
{
    size_t rows, cols;
    float *want = read_tensor(expected_file, key, &rows, &cols);
    int ndim;
    size_t shape[ATMOE_MAX_DIMS];
    ck_assert_status(atmoe_graph_get_shape(g, node, &ndim, shape, NULL), NULL);
    ck_assert_int_eq(ndim, 2);
    ck_assert_uint_eq(shape[0], rows);
    ck_assert_uint_eq(shape[1], cols);
    float *got = malloc(rows * cols * sizeof *got);
    test_poison(got, rows * cols);
    ck_assert_status(atmoe_graph_read(g, node, got, rows * cols * sizeof *got),
                     NULL);
    double peak = 1.0;
    for (size_t i = 0; i < rows * cols; i++)
        peak = fmax(peak, fabs(want[i]));
    for (size_t i = 0; i < rows * cols; i++) {
        double e = fabs((double)got[i] - want[i]);
        ck_assert_msg(isfinite(got[i]) && e <= TOL * peak,
                      "%s %s[%zu, %zu] = %.9g, reference %.9g: error %.3g "
                      "(tolerance %g of %g)",
                      what, key, i / cols, i % cols, got[i], want[i], e, TOL,
                      peak);
    }
    free(want);
    free(got);
}

/* The fixture's manifest with root_keys ("\"dtype\": \"f32\", ") put
 * first in its top-level object. */
static atmoe_manifest *open_fixture_with(const char *root_keys)
{
    size_t size;
    char *text = test_read_file(PATH_, &size);
    char *brace = strchr(text, '{');
    ck_assert_ptr_nonnull(brace);
    size_t n = size + strlen(root_keys) + 1;
    char *json = malloc(n);
    ck_assert_ptr_nonnull(json);
    snprintf(json, n, "{%s%s", root_keys, brace + 1);
    atmoe_manifest *m = NULL;
    OK(atmoe_manifest_parse(NULL, json, strlen(json), DIR_, &m));
    free(json);
    free(text);
    return m;
}

/* Runs the fixture's stack (with root_keys, when not NULL) on input file
 * and compares every module's output and trace with the reference. */
static void run_fixture_with(const char *input, const char *expected,
                             const char *root_keys)
{
    atmoe_context *ctx = test_context();
    atmoe_manifest *m = root_keys ? open_fixture_with(root_keys)
                                  : open_fixture();
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t T, d, S = 0;
    float *x = read_tensor(input, "x", &T, &d);
    float *rin = NULL;
    int32_t *gix = NULL;
    atmoe_node xn, rn = ATMOE_NODE_NONE, gn = ATMOE_NODE_NONE, y;
    size_t xs[2] = {T, d};
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &xn),
                     ctx);
    if (strstr(input, "seq")) {
        rin = read_tensor(input, "router_input", &S, &d);
        gix = read_indexes(input, T);
        size_t rs[2] = {S, d};
        ck_assert_status(atmoe_graph_input(g, "r", ATMOE_DTYPE_F32, 2, rs, 0,
                                           &rn), ctx);
        ck_assert_status(atmoe_graph_input(g, "gi", ATMOE_DTYPE_I32, 1, &T, 0,
                                           &gn), ctx);
    }
    atmoe_node outs[5];
    atmoe_layer_trace traces[5];
    ck_assert_status(atmoe_manifest_build(m, g, xn, rn, gn, outs, traces, &y),
                     ctx);
    ck_assert_int_eq(y, outs[4]);
    for (int i = 0; i < 5; i++) {
        ck_assert_status(atmoe_graph_mark_output(g, outs[i]), ctx);
        ck_assert_status(atmoe_graph_mark_output(g, traces[i].a), ctx);
        ck_assert_status(atmoe_graph_mark_output(g, traces[i].d), ctx);
        ck_assert_status(atmoe_graph_mark_output(g, traces[i].w), ctx);
    }
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    ck_assert_status(atmoe_graph_set_input(g, xn, x, T * d * sizeof *x, 0),
                     ctx);
    if (rin) {
        ck_assert_status(atmoe_graph_set_input(g, rn, rin,
                                               S * d * sizeof *rin, 0), ctx);
        ck_assert_status(atmoe_graph_set_input(g, gn, gix, T * sizeof *gix, 0),
                         ctx);
    }
    ck_assert_status(atmoe_graph_compute(g, 0), ctx);
    static const char *const names[5] = {"layers.0.q_proj", "layers.0.v_proj",
                                         "layers.1.q_proj", "layers.1.v_proj",
                                         "layers.2.c_attn"};
    for (int i = 0; i < 5; i++) {
        char key[64];
        expect_close(input, g, outs[i], expected, names[i]);
        const atmoe_node tn[3] = {traces[i].a, traces[i].d, traces[i].w};
        for (int k = 0; k < 3; k++) {
            snprintf(key, sizeof key, "%s.%c", names[i], "adw"[k]);
            expect_close(input, g, tn[k], expected, key);
        }
    }
    expect_close(input, g, y, expected, "y");
    /* The graph holds what it needs: the manifest may go first. */
    atmoe_manifest_free(m);
    ck_assert_status(atmoe_graph_compute(g, 0), ctx);
    expect_close(input, g, y, expected, "y");
    free(x);
    free(rin);
    free(gix);
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
}

static void run_fixture(const char *input, const char *expected)
{
    run_fixture_with(input, expected, NULL);
}

START_TEST(test_run_tokens)
{
    run_fixture("x.safetensors", "expected.safetensors");
}
END_TEST

START_TEST(test_run_sequences)
{
    run_fixture("x-seq.safetensors", "expected-seq.safetensors");
}
END_TEST

/* The fixture's weights converted to f32 on loading: the same results
 * (the reference computes with the stored values, which f32 holds
 * exactly). */
START_TEST(test_run_converted)
{
    run_fixture_with("x.safetensors", "expected.safetensors",
                     "\"dtype\": \"f32\", ");
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Storage types                                                             */
/* ------------------------------------------------------------------------ */

static atmoe_dtype device_of(atmoe_safetensors_dtype d)
{
    return d == ATMOE_SAFETENSORS_F16    ? ATMOE_DTYPE_F16
           : d == ATMOE_SAFETENSORS_BF16 ? ATMOE_DTYPE_BF16
                                         : ATMOE_DTYPE_F32;
}

static atmoe_safetensors_dtype file_dtype(const atmoe_manifest_tensor *t)
{
    if (t->file == NULL)
        return ATMOE_SAFETENSORS_F32;
    atmoe_safetensors *f;
    atmoe_safetensors_tensor st;
    OK(atmoe_safetensors_open(NULL, t->file, &f));
    OK(atmoe_safetensors_find(f, t->tensor, &st));
    atmoe_safetensors_free(f);
    return st.dtype;
}

/* Builds m into a fresh graph and returns the device bytes that took,
 * after checking each module's storage: as its files store it (convert 0)
 * or converted to convert. */
static uint64_t expect_storage(atmoe_manifest *m, int convert,
                               atmoe_dtype to)
{
    atmoe_context *ctx = test_context();
    OK(atmoe_manifest_check(m));
    atmoe_manifest_info info;
    OK(atmoe_manifest_get_info(m, &info));
    uint64_t want = 0;
    int halves = 0;
    for (size_t i = 0; i < info.modules; i++) {
        atmoe_manifest_module mod;
        atmoe_manifest_storage s;
        OK(atmoe_manifest_get_module(m, i, &mod));
        memset(&s, 0xff, sizeof s);
        OK(atmoe_manifest_get_storage(m, i, &s));
        const atmoe_manifest_tensor *ts[4] = {&mod.weight, &mod.bias,
                                              &mod.w_g, &mod.w_d};
        const atmoe_safetensors_dtype fs[4] = {s.weight_file, s.bias_file,
                                               s.w_g_file, s.w_d_file};
        const atmoe_dtype ds[4] = {s.weight, s.bias, s.w_g, s.w_d};
        for (int k = 0; k < 4; k++) {
            ck_assert_int_eq(fs[k], file_dtype(ts[k]));
            /* The bias is f32 whatever is asked; absent tensors too. */
            atmoe_dtype d = k == 1 || ts[k]->file == NULL ? ATMOE_DTYPE_F32
                            : convert ? to
                                      : device_of(fs[k]);
            ck_assert_msg(ds[k] == d, "module %zu tensor %d: %s, not %s", i,
                          k, atmoe_dtype_name(ds[k]), atmoe_dtype_name(d));
            halves += ds[k] != ATMOE_DTYPE_F32;
        }
        ck_assert(s.a == (convert ? to : device_of(s.a_file)));
        ck_assert(s.b == (convert ? to : device_of(s.b_file)));
        want += s.device_bytes;
    }
    /* The fixture stores two base weights in half precision. */
    ck_assert(convert ? (to == ATMOE_DTYPE_F32) == (halves == 0)
                      : halves >= 2);
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t xs[2] = {5, info.d_in};
    atmoe_node x, y;
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &x),
                     ctx);
    atmoe_memory_stats before, after;
    ck_assert_status(atmoe_context_get_memory_stats(ctx, &before), ctx);
    ck_assert_status(atmoe_manifest_build(m, g, x, ATMOE_NODE_NONE,
                                          ATMOE_NODE_NONE, NULL, NULL, &y),
                     ctx);
    ck_assert_status(atmoe_context_get_memory_stats(ctx, &after), ctx);
    ck_assert_uint_eq(after.allocated_bytes - before.allocated_bytes, want);
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
    return want;
}

/* Each tensor kept as its file stores it, or converted as the manifest
 * asks (a default at the top, per tensor, for the experts), and the
 * device memory each module takes: what building it allocates. */
START_TEST(test_storage)
{
    atmoe_manifest *m = open_fixture();
    atmoe_manifest_storage s;
    FAILS(atmoe_manifest_get_storage(m, 0, &s), NULL,
          ATMOE_STATUS_INVALID_ARGUMENT, "not checked");
    OK(atmoe_manifest_check(m));
    FAILS(atmoe_manifest_get_storage(m, 99, &s), NULL,
          ATMOE_STATUS_OUT_OF_RANGE, "module 99");
    FAILS(atmoe_manifest_get_storage(m, 0, NULL), NULL,
          ATMOE_STATUS_NULL_POINTER, "storage");
    FAILS(atmoe_manifest_get_storage(NULL, 0, &s), NULL,
          ATMOE_STATUS_NULL_POINTER, "manifest");
    uint64_t stored = expect_storage(m, 0, ATMOE_DTYPE_F32);
    atmoe_manifest_free(m);
    m = open_fixture_with("\"dtype\": \"f32\", ");
    uint64_t f32 = expect_storage(m, 1, ATMOE_DTYPE_F32);
    atmoe_manifest_free(m);
    m = open_fixture_with("\"dtype\": \"bf16\", ");
    uint64_t bf16 = expect_storage(m, 1, ATMOE_DTYPE_BF16);
    atmoe_manifest_free(m);
    ck_assert(bf16 < stored && stored < f32);

    /* Per tensor and for the experts, over the default. */
    static const char one[] =
        "{\"version\": 1, \"weights\": \"base.safetensors\", \"dtype\": "
        "\"f32\", \"layers\": [{\"modules\": {\"q_proj\": {\"weight\": "
        "{\"tensor\": \"model.layers.0.self_attn.q_proj.weight\", "
        "\"dtype\": \"f16\"}, \"experts_dtype\": \"bf16\", \"groups\": "
        "[[\"../peft/math\"], [\"../peft/code\"]], \"router\": {\"w_g\": {\"file\": "
        "\"router.safetensors\", \"tensor\": \"layers.0.v_proj.w_g\", "
        "\"dtype\": \"stored\"}}}}}]}";
    OK(atmoe_manifest_parse(NULL, one, strlen(one), DIR_, &m));
    OK(atmoe_manifest_check(m));
    OK(atmoe_manifest_get_storage(m, 0, &s));
    ck_assert(s.weight == ATMOE_DTYPE_F16 && s.a == ATMOE_DTYPE_BF16 &&
              s.b == ATMOE_DTYPE_BF16 &&
              s.w_g == device_of(s.w_g_file) && s.w_d == ATMOE_DTYPE_F32);
    atmoe_manifest_free(m);

    /* The base weight in 8-bit blocks: 36 bytes a block of 32 per row,
     * against 2 bytes an element in f16. */
    uint64_t f16_bytes = s.device_bytes;
    static const char q8[] =
        "{\"version\": 1, \"weights\": \"base.safetensors\", \"dtype\": "
        "\"f32\", \"layers\": [{\"modules\": {\"q_proj\": {\"weight\": "
        "{\"tensor\": \"model.layers.0.self_attn.q_proj.weight\", "
        "\"dtype\": \"q8\"}, \"experts_dtype\": \"bf16\", \"groups\": "
        "[[\"../peft/math\"], [\"../peft/code\"]], \"router\": {\"w_g\": {\"file\": "
        "\"router.safetensors\", \"tensor\": \"layers.0.v_proj.w_g\", "
        "\"dtype\": \"stored\"}}}}}]}";
    OK(atmoe_manifest_parse(NULL, q8, strlen(q8), DIR_, &m));
    OK(atmoe_manifest_check(m));
    OK(atmoe_manifest_get_storage(m, 0, &s));
    ck_assert(s.weight == ATMOE_DTYPE_Q8);
    atmoe_manifest_module mod;
    OK(atmoe_manifest_get_module(m, 0, &mod));
    ck_assert_uint_eq(f16_bytes - s.device_bytes,
                      2 * mod.d_out * mod.d_in -
                          mod.d_out * ((mod.d_in + 31) / 32) * 36);
    atmoe_manifest_free(m);
}
END_TEST

/* A manifest of one module over a weight file of the test's own (w [13,
 * 13] and a bias [13] of the given types and values) and the fixture's
 * math adapter; root and ref are extra keys at the top and in the
 * weight's entry. */
static atmoe_status build_one(const char *dir, atmoe_safetensors_dtype wt,
                              const float *w, const char *root,
                              const char *ref, const char *groups,
                              atmoe_context *ctx)
{
    char path[4200], json[16384];
    snprintf(path, sizeof path, "%s/w.safetensors", dir);
    atmoe_safetensors_writer *wr;
    uint64_t shape[2] = {13, 13};
    OK(atmoe_safetensors_writer_new(NULL, &wr));
    if (wt == ATMOE_SAFETENSORS_F64) {
        double d[169];
        for (int i = 0; i < 169; i++)
            d[i] = w[i];
        OK(atmoe_safetensors_writer_add(wr, "w", wt, 2, shape, d));
    } else {
        OK(atmoe_safetensors_writer_add_f32(wr, "w", wt, 2, shape, w));
    }
    float bias[13];
    for (int i = 0; i < 13; i++)
        bias[i] = (float)(i - 6) / 8.0f;
    OK(atmoe_safetensors_writer_add_f32(wr, "b", ATMOE_SAFETENSORS_F16, 1,
                                        shape, bias));
    OK(atmoe_safetensors_writer_save(wr, path));
    atmoe_safetensors_writer_free(wr);
    snprintf(json, sizeof json,
             "{\"version\": 1, \"weights\": \"%s\"%s, \"layers\": [{"
             "\"modules\": {\"q_proj\": {\"weight\": {\"tensor\": \"w\"%s}, "
             "\"bias\": \"b\", \"groups\": [[\"%s/%s\"]]}}}]}",
             path, root, ref, DIR_, groups);
    atmoe_manifest *m;
    OK(atmoe_manifest_parse(NULL, json, strlen(json), DIR_, &m));
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t xs[2] = {3, 13};
    atmoe_node x, y;
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &x),
                     ctx);
    atmoe_node marker = test_marker(ctx, g);
    atmoe_status st = atmoe_manifest_build(m, g, x, ATMOE_NODE_NONE,
                                           ATMOE_NODE_NONE, NULL, NULL, &y);
    if (st != ATMOE_STATUS_OK) /* a failed build leaves the graph as it was */
        ck_assert_int_eq(test_marker(ctx, g), marker + 1);
    atmoe_graph_free(g);
    atmoe_manifest_free(m);
    return st;
}

/* NaN and infinities, in a half-precision file or made by a conversion,
 * are refused with the tensor and the element, unless the manifest allows
 * them; F64 cannot be held as stored; the bias stays f32. */
START_TEST(test_nonfinite)
{
    atmoe_context *ctx = test_context();
    char dir[4096];
    test_mkdtemp(dir, sizeof dir, "nonfinite");
    float w[169];
    for (int i = 0; i < 169; i++)
        w[i] = (float)((i % 17) - 8) / 16.0f;
    ck_assert_status(build_one(dir, ATMOE_SAFETENSORS_BF16, w, "", "",
                               "../peft/math", ctx), ctx);
    w[1 * 13 + 2] = INFINITY;
    FAILS(build_one(dir, ATMOE_SAFETENSORS_BF16, w, "", "", "../peft/math",
                    ctx),
          ctx, ATMOE_STATUS_FORMAT_ERROR,
          "layers[0].modules.q_proj: tensor w of");
    ck_assert_msg(strstr(atmoe_errmsg(ctx), "element [1, 2] is inf in bf16"),
                  "%s", atmoe_errmsg(ctx));
    ck_assert_status(build_one(dir, ATMOE_SAFETENSORS_BF16, w,
                               ", \"allow_nonfinite\": true", "",
                               "../peft/math", ctx), ctx);
    w[1 * 13 + 2] = NAN;
    FAILS(build_one(dir, ATMOE_SAFETENSORS_F16, w, "", "", "../peft/math",
                    ctx),
          ctx, ATMOE_STATUS_FORMAT_ERROR, "element [1, 2] is nan in f16");
    w[1 * 13 + 2] = 0.5f;

    /* f32 values past f16's range become infinities when converted. */
    w[3] = 70000.0f;
    ck_assert_status(build_one(dir, ATMOE_SAFETENSORS_F32, w, "", "",
                               "../peft/math", ctx), ctx);
    FAILS(build_one(dir, ATMOE_SAFETENSORS_F32, w, "",
                    ", \"dtype\": \"f16\"", "../peft/math", ctx),
          ctx, ATMOE_STATUS_FORMAT_ERROR,
          "element [0, 3] is inf (from 70000) in f16");
    ck_assert_status(build_one(dir, ATMOE_SAFETENSORS_F32, w, "",
                               ", \"dtype\": \"bf16\"", "../peft/math",
                               ctx), ctx);
    w[3] = 0.25f;

    /* W0 in 8-bit blocks, quantised at load; an infinity is refused there
     * too (it would make its block's scale NaN). */
    ck_assert_status(build_one(dir, ATMOE_SAFETENSORS_BF16, w, "",
                               ", \"dtype\": \"q8\"", "../peft/math", ctx),
                     ctx);
    w[5] = -INFINITY;
    FAILS(build_one(dir, ATMOE_SAFETENSORS_F32, w, "",
                    ", \"dtype\": \"q8\"", "../peft/math", ctx),
          ctx, ATMOE_STATUS_FORMAT_ERROR, "element [0, 5] is -inf in q8");
    w[5] = 0.125f;

    /* F64 kept as stored: no device type holds it. */
    FAILS(build_one(dir, ATMOE_SAFETENSORS_F64, w, "", "", "../peft/math",
                    ctx),
          ctx, ATMOE_STATUS_NOT_SUPPORTED,
          "is F64, which the device cannot hold");
    ck_assert_status(build_one(dir, ATMOE_SAFETENSORS_F64, w,
                               ", \"dtype\": \"f32\"", "", "../peft/math",
                               ctx), ctx);

    /* The bias is f32 on the device whatever the default asks (its file
     * stores it in f16 here); test_misfit refuses half asked of it. */
    ck_assert_status(build_one(dir, ATMOE_SAFETENSORS_F16, w,
                               ", \"dtype\": \"bf16\"", "", "../peft/math",
                               ctx), ctx);

    /* A NaN in an adapter: its target and element. */
    FAILS(build_one(dir, ATMOE_SAFETENSORS_F32, w, "", "", "../peft-nan",
                    ctx),
          ctx, ATMOE_STATUS_FORMAT_ERROR, "lora_B of");
    ck_assert_msg(strstr(atmoe_errmsg(ctx), "element [1, 1] is nan in f32"),
                  "%s", atmoe_errmsg(ctx));
    ck_assert_status(build_one(dir, ATMOE_SAFETENSORS_F32, w,
                               ", \"allow_nonfinite\": true", "",
                               "../peft-nan", ctx), ctx);
    test_rmdir_r(dir);
    atmoe_context_free(ctx);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Malformed manifests                                                       */
/* ------------------------------------------------------------------------ */

/* A valid one-layer manifest with one substitution: {"q": ...} stands for
 * the module, and %s is replaced by the case's text. */
#define MODULE(body)                                                          \
    "{\"version\": 1, \"weights\": \"base.safetensors\", \"layers\": [{"    \
    "\"modules\": {\"q_proj\": {\"weight\": \"w\", \"groups\": "             \
    "[[\"a\", \"b\"], [\"c\"]]" body "}}}]}"

static const struct {
    const char *json;
    const char *says;
} MALFORMED[] = {
    {"", "not JSON"},
    {"{\"version\": 1,}", "not JSON"},
    {"[1]", "the manifest: must be an object, not an array"},
    {"{}", "version: is missing"},
    {"{\"version\": 2, \"layers\": []}", "version: is 2"},
    {"{\"version\": \"1\"}", "version: must be an integer, not a string"},
    {"{\"version\": 1}", "layers: is missing"},
    {"{\"version\": 1, \"version\": 1}", "duplicate"},
    {"{\"version\": 1, \"extra\": 0, \"layers\": []}",
     "unknown key \"extra\""},
    {"{\"version\": 1, \"layers\": []}", "layers: must be a non-empty list"},
    {"{\"version\": 1, \"layers\": {}}", "layers: must be a non-empty list"},
    {"{\"version\": 1, \"layers\": [3]}", "layers[0]: must be an object"},
    {"{\"version\": 1, \"layers\": [{}]}", "layers[0].modules: is missing"},
    {"{\"version\": 1, \"layers\": [{\"modules\": {}}]}",
     "layers[0].modules: must be a non-empty object"},
    {"{\"version\": 1, \"layers\": [{\"index\": -1, \"modules\": {}}]}",
     "layers[0].index: is -1"},
    {"{\"version\": 1, \"layers\": [{\"modules\": {\"a\": {}, \"b\": {}}}]}",
     "layers[0].output: is missing"},
    {"{\"version\": 1, \"layers\": [{\"output\": \"c\", \"modules\": "
     "{\"a\": {}, \"b\": {}}}]}",
     "layers[0].output: names \"c\""},
    {"{\"version\": 1, \"layers\": [{\"modules\": {\"q\": []}}]}",
     "layers[0].modules.q: must be an object"},
    {"{\"version\": 1, \"layers\": [{\"modules\": {\"q\": {}}}]}",
     "layers[0].modules.q.weight: is missing"},
    {"{\"version\": 1, \"layers\": [{\"modules\": {\"q\": {\"weight\": "
     "\"w\"}}}]}",
     "no top-level \"weights\""},
    {"{\"version\": 1, \"weights\": \"\", \"layers\": []}",
     "weights: is empty"},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": \"w\"}}}]}",
     "layers[0].modules.q.groups: is missing"},
    {MODULE(", \"weight\": 1"), "duplicate"},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": 5}}}]}",
     "layers[0].modules.q.weight: must be a tensor name"},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": {\"file\": \"f\"}}}}]}",
     "layers[0].modules.q.weight.tensor: is missing"},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": {\"tensor\": \"t\", \"transposed\": 1}}}}]}",
     "layers[0].modules.q.weight.transposed: must be true or false"},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": {\"tensor\": \"t\", \"dtype\": \"F16\"}}}}]}",
     "layers[0].modules.q.weight.dtype: is \"F16\"; the storage types are "
     "\"stored\""},
    {"{\"version\": 1, \"weights\": \"f\", \"dtype\": \"f64\", \"layers\": "
     "[{\"modules\": {\"q\": {\"weight\": \"w\"}}}]}",
     "dtype: is \"f64\""},
    {"{\"version\": 1, \"weights\": \"f\", \"dtype\": 16, \"layers\": "
     "[{\"modules\": {\"q\": {\"weight\": \"w\"}}}]}",
     "dtype: must be a string"},
    {"{\"version\": 1, \"weights\": \"f\", \"allow_nonfinite\": 1, "
     "\"layers\": [{\"modules\": {\"q\": {\"weight\": \"w\"}}}]}",
     "allow_nonfinite: must be true or false"},
    {MODULE(", \"experts_dtype\": \"q8\""),
     "layers[0].modules.q_proj.experts_dtype: is \"q8\""},
    {"{\"version\": 1, \"weights\": \"f\", \"dtype\": \"q8\", \"layers\": "
     "[{\"modules\": {\"q\": {\"weight\": \"w\"}}}]}",
     "dtype: is \"q8\"; 8-bit blocks hold a module's base weight only"},
    {MODULE(", \"bias\": {\"tensor\": \"b\", \"dtype\": \"q8\"}"),
     "layers[0].modules.q_proj.bias.dtype: is \"q8\""},
    {MODULE(", \"bias\": {\"tensor\": \"b\", \"transposed\": true}"),
     "layers[0].modules.q_proj.bias: unknown key \"transposed\""},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": \"w\", \"groups\": []}}}]}",
     "layers[0].modules.q.groups: must be a non-empty list"},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": \"w\", \"groups\": [\"a\"]}}}]}",
     "layers[0].modules.q.groups[0]: must be a non-empty list of experts"},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": \"w\", \"groups\": [[]]}}}]}",
     "groups[0]: must be a non-empty list of experts, not an empty list"},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": \"w\", \"groups\": [[\"a\", 5]]}}}]}",
     "layers[0].modules.q.groups[0][1]: must be an adapter directory"},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": \"w\", \"groups\": [[{\"layer\": 1}]]}}}]}",
     "groups[0][0].adapter: is missing"},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": \"w\", \"groups\": [[{\"adapter\": \"a\", "
     "\"layer\": \"1\"}]]}}}]}",
     "groups[0][0].layer: must be an integer, not a string"},
    {"{\"version\": 1, \"weights\": \"f\", \"layers\": [{\"modules\": "
     "{\"q\": {\"weight\": \"w\", \"groups\": [[{\"adapter\": \"a\", "
     "\"lambda\": 0.5}]]}}}]}",
     "groups[0][0]: unknown key \"lambda\""},
    {MODULE(", \"general\": \"g\""),
     "layers[0].modules.q_proj.general: must be an object"},
    {MODULE(", \"general\": {\"adapter\": \"g\"}"),
     "layers[0].modules.q_proj.general.lambda: is missing"},
    {MODULE(", \"general\": {\"adapter\": \"g\", \"lambda\": 1.5}"),
     "layers[0].modules.q_proj.general.lambda: is 1.5, must be 0 to 1"},
    {MODULE(", \"c\": \"x\""), "layers[0].modules.q_proj.c: must be a number"},
    {MODULE(", \"c\": 1e39"), "layers[0].modules.q_proj.c: is 1e+39"},
    {MODULE(", \"router\": 1"), "layers[0].modules.q_proj.router: must be an "
                                "object"},
    {MODULE(", \"router\": {\"tau_g\": \"1\"}"),
     "layers[0].modules.q_proj.router.tau_g: must be a number, not a string"},
    {MODULE(", \"router\": {\"tau_d\": 0}"),
     "layers[0].modules.q_proj.router.tau_d: is 0, must be finite and above "
     "0"},
    {MODULE(", \"router\": {\"tau_g\": -1}"), "router.tau_g: is -1"},
    {MODULE(", \"router\": {\"form\": \"dense\"}"),
     "layers[0].modules.q_proj.router.form: is \"dense\""},
    {MODULE(", \"router\": {\"form\": 0}"),
     "router.form: must be a string"},
    {MODULE(", \"router\": {\"v_d\": \"v\"}"),
     "router.v_d: belongs to the scaled form"},
    {MODULE(", \"router\": {\"form\": \"scaled\", \"w_d\": \"v\"}"),
     "router.w_d: belongs to the projected form"},
    {MODULE(", \"router\": {\"top_k_groups\": 3}"),
     "router.top_k_groups: is 3, must be 0 to 2"},
    {MODULE(", \"router\": {\"top_k_experts\": 1.5}"),
     "router.top_k_experts: must be an integer"},
    {MODULE(", \"router\": {\"top_k_experts\": -1}"),
     "router.top_k_experts: is -1"},
    {MODULE(", \"router\": {\"w_g\": [1]}"), "router.w_g: must be a tensor "
                                             "name"},
    {MODULE(", \"router\": {\"masks\": {}}"),
     "router.masks: must be a list of objects"},
    {MODULE(", \"router\": {\"masks\": [1]}"),
     "router.masks[0]: must be an object"},
    {MODULE(", \"router\": {\"masks\": [{}]}"),
     "router.masks[0].group: is missing"},
    {MODULE(", \"router\": {\"masks\": [{\"group\": 2}]}"),
     "router.masks[0].group: is 2, must be 0 to 1"},
    {MODULE(", \"router\": {\"masks\": [{\"group\": 1, \"expert\": 1}]}"),
     "router.masks[0].expert: is 1, must be -1 to 0"},
    {MODULE(", \"router\": {\"masks\": [{\"group\": 0, \"weight\": 1}]}"),
     "router.masks[0]: unknown key \"weight\""},
    {MODULE(", \"router\": {\"fixed\": [{\"group\": 0}]}"),
     "router.fixed[0].weight: is missing"},
    {MODULE(", \"router\": {\"fixed\": [{\"group\": 0, \"weight\": 2}]}"),
     "router.fixed[0].weight: is 2, must be 0 to 1"},
    {MODULE(", \"router\": {\"fixed\": [{\"group\": 0, \"expert\": 2, "
            "\"weight\": 0.5}]}"),
     "router.fixed[0].expert: is 2, must be -1 to 1"},
    {MODULE(", \"extra\": 1"), "layers[0].modules.q_proj: unknown key "
                               "\"extra\""},
    {"{\"version\": 1, \"layers\": [{\"modules\": {\"\": {}}}]}",
     "1 to 128 characters"},
    {"{\"version\": 1, \"weights\": \"a\\u0000b\", \"layers\": []}",
     "not JSON"},
};

START_TEST(test_malformed)
{
    atmoe_context *ctx = test_context();
    for (size_t k = 0; k < sizeof MALFORMED / sizeof MALFORMED[0]; k++) {
        const char *json = MALFORMED[k].json;
        atmoe_manifest *m = (atmoe_manifest *)&k;
        atmoe_status st = atmoe_manifest_parse(ctx, json, strlen(json), DIR_,
                                               &m);
        ck_assert_msg(st == ATMOE_STATUS_FORMAT_ERROR,
                      "case %zu (%s) -> %s: %s", k, json,
                      atmoe_status_name(st), atmoe_errmsg(ctx));
        ck_assert_msg(strstr(atmoe_errmsg(ctx), MALFORMED[k].says) != NULL,
                      "case %zu: message \"%s\" does not mention \"%s\"", k,
                      atmoe_errmsg(ctx), MALFORMED[k].says);
        ck_assert_ptr_null(m);
    }
    /* The base case itself parses. */
    static const char good[] = MODULE("");
    atmoe_manifest *m;
    ck_assert_status(atmoe_manifest_parse(ctx, good, strlen(good), NULL, &m),
                     ctx);
    atmoe_manifest_module mod;
    ck_assert_status(atmoe_manifest_get_module(m, 0, &mod), ctx);
    /* Without a directory, paths stay as written. */
    ck_assert_str_eq(mod.weight.file, "base.safetensors");
    atmoe_manifest_expert x;
    ck_assert_status(atmoe_manifest_get_expert(m, 0, 2, &x), ctx);
    ck_assert_str_eq(x.adapter, "c");
    ck_assert_int_eq(x.group, 1);
    ck_assert_ptr_null(x.target);
    atmoe_manifest_free(m);
    /* The message of a file names it. */
    FAILS(atmoe_manifest_open(ctx, DIR_, &m), ctx, ATMOE_STATUS_IO_ERROR,
          DIR_);
    char missing[4300];
    snprintf(missing, sizeof missing, "%s/missing.json", DIR_);
    FAILS(atmoe_manifest_open(ctx, missing, &m), ctx, ATMOE_STATUS_NOT_FOUND,
          "missing.json");
    snprintf(missing, sizeof missing, "%s/x.safetensors", DIR_);
    FAILS(atmoe_manifest_open(ctx, missing, &m), ctx,
          ATMOE_STATUS_FORMAT_ERROR, "x.safetensors: the manifest is not JSON");
    atmoe_context_free(ctx);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Manifests whose files do not fit                                          */
/* ------------------------------------------------------------------------ */

/* One layer, q_proj of layer 0, on the fixture's files, with parts
 * replaced (printf arguments: weight, groups, router, extra). */
static const char LAYER[] =
    "{\"version\": 1, \"weights\": \"base.safetensors\", \"layers\": [{"
    "\"modules\": {\"q_proj\": {\"weight\": %s, \"groups\": %s, \"router\": "
    "%s%s}}}%s]}";

#define W0 "\"model.layers.0.self_attn.q_proj.weight\""
#define GROUPS "[[\"../peft/math\"], [\"../peft/code\"]]"
#define ROUTER "{\"w_g\": {\"file\": \"router.safetensors\", \"tensor\": " \
               "\"layers.0.v_proj.w_g\"}}"

static const struct {
    const char *weight, *groups, *router, *extra, *more;
    atmoe_status status;
    const char *says;
} MISFIT[] = {
    {"\"no.such.tensor\"", GROUPS, "{}", "", "", ATMOE_STATUS_NOT_FOUND,
     "layers[0].modules.q_proj.weight"},
    {"{\"file\": \"missing.safetensors\", \"tensor\": \"w\"}", GROUPS, "{}",
     "", "", ATMOE_STATUS_NOT_FOUND, "missing.safetensors"},
    {"{\"file\": \"manifest.json\", \"tensor\": \"w\"}", GROUPS, "{}", "", "",
     ATMOE_STATUS_FORMAT_ERROR, "manifest.json"},
    {"\"model.layers.0.self_attn.q_proj.bias\"", GROUPS, "{}", "", "",
     ATMOE_STATUS_SHAPE_MISMATCH, "is [13], the module needs 2-D"},
    {W0, "[[\"../peft/missing\"]]", "{}", "", "", ATMOE_STATUS_NOT_FOUND,
     "layers[0].modules.q_proj.groups[0][0]"},
    {W0, "[[\"../peft-bad/dora\"]]", "{}", "", "", ATMOE_STATUS_NOT_SUPPORTED,
     "DoRA"},
    {W0, "[[{\"adapter\": \"../peft/math\", \"layer\": 7}]]", "{}", "", "",
     ATMOE_STATUS_NOT_FOUND, "no target \"q_proj\" in layer 7"},
    {W0, "[[{\"adapter\": \"../peft/math\", \"module\": \"v_proj\"}]]", "{}",
     "", "", ATMOE_STATUS_SHAPE_MISMATCH, "maps 13 -> 7"},
    {W0, "[[{\"adapter\": \"../peft/gpt2\", \"module\": \"c_attn\"}]]", "{}",
     "", "", ATMOE_STATUS_SHAPE_MISMATCH, "13 -> 10"},
    {W0, GROUPS, ROUTER, "", "", ATMOE_STATUS_OK, ""},
    {W0, "[[\"../peft/math\", \"../peft/code\", \"../peft/style\"]]", ROUTER,
     "", "", ATMOE_STATUS_SHAPE_MISMATCH, "router.w_g: tensor "
                                          "layers.0.v_proj.w_g"},
    {W0, "[[\"../peft/math\"], [\"../peft/code\", \"../peft/style\"]]",
     "{\"form\": \"scaled\", \"v_d\": {\"file\": \"router.safetensors\", "
     "\"tensor\": \"layers.0.v_proj.v_d\"}}",
     "", "", ATMOE_STATUS_OK, ""},
    {W0, GROUPS,
     "{\"w_d\": {\"file\": \"router.safetensors\", \"tensor\": "
     "\"layers.0.v_proj.v_d\"}}",
     "", "", ATMOE_STATUS_SHAPE_MISMATCH, "needs [13, 2]"},
    {W0, GROUPS, "{}", ", \"bias\": \"model.layers.0.self_attn.v_proj.weight\"",
     "", ATMOE_STATUS_SHAPE_MISMATCH, "bias"},
    {W0, GROUPS, "{}", ", \"bias\": {\"tensor\": "
     "\"model.layers.0.self_attn.q_proj.bias\", \"dtype\": \"f16\"}",
     "", ATMOE_STATUS_NOT_SUPPORTED, "bias: the bias is held in f32"},
    /* A second layer whose input is not the first one's output (7). */
    {"\"model.layers.0.self_attn.v_proj.weight\"",
     "[[{\"adapter\": \"../peft/math\", \"module\": \"v_proj\"}]]", "{}",
     "", ", {\"modules\": {\"q_proj\": {\"weight\": " W0 ", \"groups\": "
     "[[\"../peft/math\"]]}}}",
     ATMOE_STATUS_SHAPE_MISMATCH, "layers[1].modules.q_proj: the weight "
                                  "takes 13 features, but the output of "
                                  "layers[0].modules.q_proj gives 7"},
    {W0, GROUPS, "{}", "",
     ", {\"modules\": {\"c_attn\": {\"weight\": {\"tensor\": "
     "\"transformer.h.0.attn.c_attn.weight\", \"transposed\": true}, "
     "\"groups\": [[{\"adapter\": \"../peft/gpt2\", \"layer\": 0}]]}}}",
     ATMOE_STATUS_OK, ""},
};

START_TEST(test_misfit)
{
    for (size_t k = 0; k < sizeof MISFIT / sizeof MISFIT[0]; k++) {
        char json[4096];
        snprintf(json, sizeof json, LAYER, MISFIT[k].weight, MISFIT[k].groups,
                 MISFIT[k].router, MISFIT[k].extra, MISFIT[k].more);
        atmoe_manifest *m;
        ck_assert_status(atmoe_manifest_parse(NULL, json, strlen(json), DIR_,
                                              &m), NULL);
        atmoe_status st = atmoe_manifest_check(m);
        ck_assert_msg(st == MISFIT[k].status, "case %zu -> %s: %s", k,
                      atmoe_status_name(st), atmoe_errmsg(NULL));
        if (st != ATMOE_STATUS_OK)
            ck_assert_msg(strstr(atmoe_errmsg(NULL), MISFIT[k].says) != NULL,
                          "case %zu: message \"%s\" does not mention \"%s\"",
                          k, atmoe_errmsg(NULL), MISFIT[k].says);
        atmoe_manifest_info info;
        OK(atmoe_manifest_get_info(m, &info));
        ck_assert_int_eq(info.checked, st == ATMOE_STATUS_OK);
        atmoe_manifest_free(m);
    }
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Building                                                                  */
/* ------------------------------------------------------------------------ */

START_TEST(test_build_failures)
{
    atmoe_context *ctx = test_context();
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    size_t s12[2] = {3, 12}, s13[2] = {3, 13}, s3 = 3;
    atmoe_node x12, x13, r13, gi, y = 77;
    ck_assert_status(atmoe_graph_input(g, "x12", ATMOE_DTYPE_F32, 2, s12, 0,
                                       &x12), ctx);
    ck_assert_status(atmoe_graph_input(g, "x13", ATMOE_DTYPE_F32, 2, s13, 0,
                                       &x13), ctx);
    ck_assert_status(atmoe_graph_input(g, "r13", ATMOE_DTYPE_F32, 2, s13, 0,
                                       &r13), ctx);
    ck_assert_status(atmoe_graph_input(g, "gi", ATMOE_DTYPE_I32, 1, &s3, 0,
                                       &gi), ctx);
    atmoe_manifest *m = open_fixture();
    atmoe_node outs[5] = {-5, -5, -5, -5, -5};

    /* Refused calls leave no node behind and touch no output. */
    ck_assert_fails_clean(
        g,
        atmoe_manifest_build(m, g, x12, ATMOE_NODE_NONE, ATMOE_NODE_NONE, outs,
                             NULL, &y),
        ctx, ATMOE_STATUS_SHAPE_MISMATCH, "layers[0].modules.q_proj");
    ck_assert_fails_clean(
        g,
        atmoe_manifest_build(m, g, x13, r13, ATMOE_NODE_NONE, outs, NULL, &y),
        ctx, ATMOE_STATUS_INVALID_ARGUMENT, "gate_index");
    ck_assert_int_eq(y, 77);
    ck_assert_int_eq(outs[0], -5);

    /* A manifest whose check fails reports to the graph's context. */
    static const char bad[] =
        "{\"version\": 1, \"layers\": [{\"modules\": {\"q\": {\"weight\": "
        "{\"file\": \"nothing.safetensors\", \"tensor\": \"w\"}, "
        "\"groups\": [[\"a\"]]}}}]}";
    atmoe_manifest *mb;
    OK(atmoe_manifest_parse(NULL, bad, strlen(bad), DIR_, &mb));
    FAILS(atmoe_manifest_build(mb, g, x13, ATMOE_NODE_NONE, ATMOE_NODE_NONE,
                               NULL, NULL, &y),
          ctx, ATMOE_STATUS_NOT_FOUND, "nothing.safetensors");
    atmoe_manifest_free(mb);

    FAILS(atmoe_manifest_build(NULL, g, x13, ATMOE_NODE_NONE, ATMOE_NODE_NONE,
                               NULL, NULL, &y),
          NULL, ATMOE_STATUS_NULL_POINTER, "'manifest'");
    FAILS(atmoe_manifest_build(m, NULL, x13, ATMOE_NODE_NONE, ATMOE_NODE_NONE,
                               NULL, NULL, &y),
          NULL, ATMOE_STATUS_NULL_POINTER, "'graph'");
    FAILS(atmoe_manifest_build(m, g, x13, ATMOE_NODE_NONE, ATMOE_NODE_NONE,
                               NULL, NULL, NULL),
          ctx, ATMOE_STATUS_NULL_POINTER, "'y'");

    /* Twice into one graph: two independent stacks. */
    atmoe_node y1, y2;
    ck_assert_status(atmoe_manifest_build(m, g, x13, r13, gi, NULL, NULL, &y1),
                     ctx);
    ck_assert_status(atmoe_manifest_build(m, g, x13, ATMOE_NODE_NONE,
                                          ATMOE_NODE_NONE, outs, NULL, &y2),
                     ctx);
    ck_assert_int_ne(y1, y2);
    ck_assert_int_eq(outs[4], y2);
    atmoe_manifest_free(m);
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_arguments)
{
    atmoe_manifest *m;
    atmoe_manifest_info info;
    FAILS(atmoe_manifest_open(NULL, NULL, &m), NULL,
          ATMOE_STATUS_NULL_POINTER, "'path'");
    FAILS(atmoe_manifest_open(NULL, PATH_, NULL), NULL,
          ATMOE_STATUS_NULL_POINTER, "'manifest'");
    FAILS(atmoe_manifest_parse(NULL, NULL, 0, NULL, &m), NULL,
          ATMOE_STATUS_NULL_POINTER, "'text'");
    FAILS(atmoe_manifest_get_info(NULL, &info), NULL,
          ATMOE_STATUS_NULL_POINTER, "'manifest'");
    FAILS(atmoe_manifest_check(NULL), NULL, ATMOE_STATUS_NULL_POINTER,
          "'manifest'");
    m = open_fixture();
    FAILS(atmoe_manifest_get_info(m, NULL), NULL, ATMOE_STATUS_NULL_POINTER,
          "'info'");
    FAILS(atmoe_manifest_get_module(m, 0, NULL), NULL,
          ATMOE_STATUS_NULL_POINTER, "'module'");
    FAILS(atmoe_manifest_get_expert(m, 0, 0, NULL), NULL,
          ATMOE_STATUS_NULL_POINTER, "'expert'");
    atmoe_manifest_free(m);
    atmoe_manifest_free(NULL);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("manifest");
    TCase *tc = tcase_create("parse");
    tcase_add_checked_fixture(tc, setup, NULL);
    tcase_add_test(tc, test_describe);
    tcase_add_test(tc, test_malformed);
    tcase_add_test(tc, test_misfit);
    tcase_add_test(tc, test_arguments);
    suite_add_tcase(s, tc);
    tc = tcase_create("build");
    tcase_add_checked_fixture(tc, setup, NULL);
    tcase_add_test(tc, test_run_tokens);
    tcase_add_test(tc, test_run_sequences);
    tcase_add_test(tc, test_run_converted);
    tcase_add_test(tc, test_storage);
    tcase_add_test(tc, test_nonfinite);
    tcase_add_test(tc, test_build_failures);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}
