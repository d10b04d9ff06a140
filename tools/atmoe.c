/* atmoe: the command-line front end of the library.
 *
 *   atmoe devices                 list every OpenCL device the library sees
 *   atmoe selfcheck [--device D]  run the library's kernels and CLBlast on a
 *                                 device against a float64 host reference
 *   atmoe inspect PATH            describe a PEFT adapter, a safetensors
 *                                 file or a layer manifest, and its problems
 *   atmoe run MANIFEST --input X --output Y [--trace T] [--device D]
 *                                 apply a manifest's layers to X
 *   atmoe params [--device D]     print the tuned parameters a context on
 *                                 the device uses, and where they come from
 *   atmoe version
 *
 * Subcommands are a table, so that train and cluster join it as they are
 * written; options are parsed by one helper that every subcommand shares. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "atmoe.h"

/* Exit statuses (atmoe(1)). */
enum { EXIT_OK = 0, EXIT_FAILED = 1, EXIT_USAGE = 2 };

static int out_of_memory(const char *what)
{
    fprintf(stderr, "atmoe: %s: out of host memory\n", what);
    return EXIT_FAILED;
}

static int fail(const char *what, atmoe_status st, const atmoe_context *ctx)
{
    const char *detail = atmoe_errmsg(ctx);
    fprintf(stderr, "atmoe: %s: %s%s%s\n", what, atmoe_strerror(st),
            *detail ? ": " : "", detail);
    return EXIT_FAILED;
}

/* Takes "--name VALUE" or "--name=VALUE" at argv[*i]: 1 when it matched
 * (the value in *value, *i moved past it), 0 when argv[*i] is another
 * argument, -1 (after a message) when the value is missing. */
static int option(const char *cmd, int argc, char **argv, int *i,
                  const char *name, const char **value)
{
    size_t n = strlen(name);
    if (strncmp(argv[*i], name, n) != 0)
        return 0;
    if (argv[*i][n] == '=') {
        *value = argv[*i] + n + 1;
        return 1;
    }
    if (argv[*i][n] != '\0')
        return 0;
    if (*i + 1 >= argc) {
        fprintf(stderr, "atmoe %s: %s needs a value\n", cmd, name);
        return -1;
    }
    *value = argv[++*i];
    return 1;
}

static int cmd_devices(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "atmoe devices: unexpected argument '%s'\n", argv[1]);
        return EXIT_USAGE;
    }
    size_t n, def = (size_t)-1;
    atmoe_status st = atmoe_device_get_count(&n);
    if (st != ATMOE_STATUS_OK)
        return fail("listing devices", st, NULL);
    if (n == 0) {
        printf("no OpenCL device found (install an OpenCL driver, for "
               "example pocl-opencl-icd)\n");
        return EXIT_FAILED;
    }
    if (atmoe_device_get_default(&def) != ATMOE_STATUS_OK)
        fprintf(stderr, "atmoe: %s\n", atmoe_errmsg(NULL));
    printf("%-3s %-1s %-40s %-7s %-11s %4s %9s %9s %4s %4s\n", "#", "",
           "device", "vendor", "type", "CUs", "mem MiB", "alloc MiB", "fp16",
           "fp64");
    for (size_t i = 0; i < n; i++) {
        atmoe_device_info d;
        if ((st = atmoe_device_get_info(i, &d)) != ATMOE_STATUS_OK)
            return fail("describing a device", st, NULL);
        printf("%-3zu %-1s %-40.40s %-7s %-11s %4u %9llu %9llu %4s %4s\n", i,
               i == def ? "*" : "", d.name, atmoe_vendor_name(d.vendor),
               atmoe_device_type_name(d.type), d.compute_units,
               (unsigned long long)(d.global_mem_bytes >> 20),
               (unsigned long long)(d.max_alloc_bytes >> 20),
               d.fp16 ? "yes" : "no", d.fp64 ? "yes" : "no");
        printf("      %s, driver %s\n", d.platform_version, d.driver_version);
    }
    printf("* the default device (ATMOE_DEVICE overrides it)\n");
    return EXIT_OK;
}

static int cmd_selfcheck(int argc, char **argv)
{
    const char *device = NULL;
    for (int i = 1; i < argc; i++) {
        int r = option("selfcheck", argc, argv, &i, "--device", &device);
        if (r < 0)
            return EXIT_USAGE;
        if (r == 0) {
            fprintf(stderr, "atmoe selfcheck: unexpected argument '%s'\n",
                    argv[i]);
            return EXIT_USAGE;
        }
    }
    atmoe_context *ctx;
    atmoe_status st = atmoe_context_new(device, &ctx);
    if (st != ATMOE_STATUS_OK)
        return fail("opening the device", st, NULL);
    atmoe_device_info d;
    atmoe_context_get_device(ctx, &d);
    double err = 0;
    st = atmoe_context_selfcheck(ctx, &err);
    int rc = EXIT_OK;
    if (st != ATMOE_STATUS_OK)
        rc = fail("selfcheck", st, ctx);
    else
        printf("selfcheck passed on %s (%s): tensor copies and CLBlast SGEMM "
               "agree with float64, max relative error %.2e\n",
               d.name, atmoe_vendor_name(d.vendor), err);
    atmoe_context_free(ctx);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* inspect                                                                   */
/* ------------------------------------------------------------------------ */

/* Non-finite values among n floats. */
static size_t non_finite(const float *x, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += !isfinite(x[i]);
    return k;
}

static int all_zero(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (x[i] != 0.0f)
            return 0;
    return 1;
}

/* Prints a finding about an input: a problem (counted, and the command
 * fails) or, with problems NULL, a note. */
static void finding(size_t *problems, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void finding(size_t *problems, const char *fmt, ...)
{
    if (problems)
        (*problems)++;
    printf("  %s: ", problems ? "problem" : "note");
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}

static int inspect_adapter(const char *path)
{
    atmoe_adapter *ad;
    atmoe_status st = atmoe_adapter_open(NULL, path, &ad);
    if (st != ATMOE_STATUS_OK)
        return fail(path, st, NULL);
    atmoe_adapter_info info;
    atmoe_adapter_get_info(ad, &info);
    printf("PEFT LoRA adapter %s\n", path);
    printf("  base model %s; r %zu, lora_alpha %g, use_rslora %s, "
           "fan_in_fan_out %s\n",
           *info.base_model ? info.base_model : "(not named)", info.r,
           info.alpha, info.use_rslora ? "true" : "false",
           info.fan_in_fan_out ? "true" : "false");
    printf("  %zu target(s):\n  %5s  %-44s %4s %6s %6s %8s %10s\n",
           info.targets, "layer", "module", "rank", "d_in", "d_out", "alpha",
           "scale");
    for (size_t i = 0; i < info.targets; i++) {
        atmoe_adapter_target t;
        atmoe_adapter_get_target(ad, i, &t);
        printf("  %5d  %-44s %4zu %6zu %6zu %8g %10g\n", t.layer, t.module,
               t.rank, t.d_in, t.d_out, t.alpha, t.scale);
    }
    size_t problems = 0;
    int rc = EXIT_OK;
    for (size_t i = 0; i < info.targets && rc == EXIT_OK; i++) {
        atmoe_adapter_target t;
        atmoe_adapter_get_target(ad, i, &t);
        size_t na = t.rank * t.d_in, nb = t.d_out * t.rank;
        float *a = malloc(na * sizeof *a), *b = malloc(nb * sizeof *b);
        if (a == NULL || b == NULL)
            rc = out_of_memory(path);
        else if ((st = atmoe_adapter_read(ad, i, a, na, b, nb)) !=
                 ATMOE_STATUS_OK)
            rc = fail(path, st, NULL);
        if (rc == EXIT_OK && non_finite(a, na))
            finding(&problems, "%s: %zu non-finite value(s) in lora_A",
                    t.module, non_finite(a, na));
        if (rc == EXIT_OK && non_finite(b, nb))
            finding(&problems, "%s: %zu non-finite value(s) in lora_B",
                    t.module, non_finite(b, nb));
        if (rc == EXIT_OK && all_zero(b, nb))
            finding(NULL, "%s: lora_B is all zero, as PEFT initialises it: "
                          "the target adds nothing until trained", t.module);
        free(a);
        free(b);
    }
    atmoe_adapter_free(ad);
    if (rc == EXIT_OK)
        printf("%zu problem(s)\n", problems);
    return rc != EXIT_OK ? rc : problems ? EXIT_FAILED : EXIT_OK;
}

static int inspect_safetensors(const char *path)
{
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(NULL, path, &f);
    if (st != ATMOE_STATUS_OK)
        return fail(path, st, NULL);
    size_t n;
    atmoe_safetensors_get_count(f, &n);
    const char *format;
    printf("safetensors file %s: %zu tensor(s)", path, n);
    if (atmoe_safetensors_get_metadata(f, "format", &format) ==
        ATMOE_STATUS_OK)
        printf(", format \"%s\"", format);
    printf("\n  %-52s %-7s %s\n", "tensor", "dtype", "shape");
    size_t problems = 0;
    int rc = EXIT_OK;
    for (size_t i = 0; i < n && rc == EXIT_OK; i++) {
        atmoe_safetensors_tensor t;
        atmoe_safetensors_get(f, i, &t);
        char shape[160] = "[";
        size_t k = 1;
        for (int d = 0; d < t.ndim && k < sizeof shape; d++)
            k += (size_t)snprintf(shape + k, sizeof shape - k, "%s%llu",
                                  d ? ", " : "",
                                  (unsigned long long)t.shape[d]);
        if (k < sizeof shape - 1)
            strcat(shape, "]");
        printf("  %-52s %-7s %s\n", t.name, atmoe_safetensors_dtype_name(t.dtype),
               shape);
        if (t.dtype != ATMOE_SAFETENSORS_F32 && t.dtype != ATMOE_SAFETENSORS_F16 &&
            t.dtype != ATMOE_SAFETENSORS_BF16 && t.dtype != ATMOE_SAFETENSORS_F64)
            continue;
        float *x = malloc((t.count ? t.count : 1) * sizeof *x);
        if (x == NULL)
            rc = out_of_memory(path);
        else if ((st = atmoe_safetensors_read_f32(f, t.name, x, t.count)) !=
                 ATMOE_STATUS_OK)
            rc = fail(path, st, NULL);
        else if (non_finite(x, t.count))
            finding(&problems, "%s: %zu non-finite value(s) (as f32)",
                    t.name, non_finite(x, t.count));
        free(x);
    }
    atmoe_safetensors_free(f);
    if (rc == EXIT_OK)
        printf("%zu problem(s)\n", problems);
    return rc != EXIT_OK ? rc : problems ? EXIT_FAILED : EXIT_OK;
}

static void print_tensor(const char *key, const atmoe_manifest_tensor *t)
{
    if (t->file)
        printf("      %-7s %s in %s%s\n", key, t->tensor, t->file,
               t->transposed ? " (stored [in, out])" : "");
}

static int inspect_manifest(const char *path)
{
    atmoe_manifest *m;
    atmoe_status st = atmoe_manifest_open(NULL, path, &m);
    if (st != ATMOE_STATUS_OK)
        return fail(path, st, NULL);
    /* A manifest whose files do not fit is described all the same, with
     * what the check found. */
    atmoe_status checked = atmoe_manifest_check(m);
    char why[1024] = "";
    if (checked != ATMOE_STATUS_OK)
        snprintf(why, sizeof why, "%s", atmoe_errmsg(NULL));
    atmoe_manifest_info info;
    atmoe_manifest_get_info(m, &info);
    printf("layer manifest %s: %zu layer(s), %zu module(s)", path,
           info.layers, info.modules);
    if (info.checked)
        printf(", %zu -> %zu features", info.d_in, info.d_out);
    printf("\n");
    size_t last_layer = 0;
    for (size_t i = 0; i < info.modules; i++) {
        atmoe_manifest_module mod;
        atmoe_manifest_get_module(m, i, &mod);
        if (i == 0 || mod.layer != last_layer)
            printf("  layer %zu (model layer %d)\n", mod.layer,
                   mod.model_layer);
        last_layer = mod.layer;
        printf("    %s%s", mod.name, mod.is_output ? " (output)" : "");
        if (info.checked)
            printf(": %zu -> %zu", mod.d_in, mod.d_out);
        printf(", c %g\n", mod.c);
        print_tensor("weight", &mod.weight);
        print_tensor("bias", &mod.bias);
        printf("      router  %s, tau_g %g, tau_d %g, top-k groups %d, "
               "experts %d (0: all)\n",
               mod.form == ATMOE_ROUTER_SCALED ? "scaled" : "projected",
               mod.tau_g, mod.tau_d, mod.top_k_groups, mod.top_k_experts);
        print_tensor("w_g", &mod.w_g);
        print_tensor(mod.form == ATMOE_ROUTER_SCALED ? "v_d" : "w_d",
                     &mod.w_d);
        if (!mod.w_g.file || !mod.w_d.file)
            printf("      (absent router tensors are zeros)\n");
        if (mod.masks || mod.fixed)
            printf("      %zu mask(s), %zu fixed weight(s)\n", mod.masks,
                   mod.fixed);
        for (size_t e = 0; e < mod.experts + (size_t)mod.has_general; e++) {
            atmoe_manifest_expert x;
            atmoe_manifest_get_expert(m, i, e, &x);
            if (x.group >= 0)
                printf("      group %d.%d ", x.group, x.position);
            else
                printf("      general (lambda %g) ", mod.lambda);
            printf("%s: layer %d, %s", x.adapter, x.layer, x.module);
            if (x.target)
                printf(" -> %s, rank %zu, alpha %g, scale %g%s", x.target,
                       x.rank, x.alpha, x.scale,
                       x.flags & ATMOE_EXPERT_RSLORA ? " (rsLoRA)" : "");
            printf("\n");
        }
    }
    atmoe_manifest_free(m);
    if (checked != ATMOE_STATUS_OK) {
        printf("  problem: %s: %s\n1 problem(s)\n", atmoe_status_name(checked),
               why);
        return EXIT_FAILED;
    }
    printf("0 problem(s)\n");
    return EXIT_OK;
}

/* Whether a file is JSON text (a manifest) rather than a safetensors file,
 * whose first eight bytes are a binary length. */
static int looks_like_json(const char *path)
{
    FILE *f = fopen(path, "rb");
    int c = EOF;
    if (f) {
        while ((c = fgetc(f)) != EOF && isspace(c))
            ;
        fclose(f);
    }
    return c == '{';
}

static int cmd_inspect(int argc, char **argv)
{
    if (argc != 2 || argv[1][0] == '-') {
        fprintf(stderr, "usage: atmoe inspect PATH  (a PEFT adapter "
                        "directory, a safetensors file or a manifest)\n");
        return EXIT_USAGE;
    }
    const char *path = argv[1];
    struct stat sb;
    if (stat(path, &sb) != 0) {
        perror(path);
        return EXIT_FAILED;
    }
    if (S_ISDIR(sb.st_mode))
        return inspect_adapter(path);
    /* An adapter named by its config file. */
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    if (strcmp(base, "adapter_config.json") == 0) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%.*s", (int)(base - path), path);
        return inspect_adapter(*dir ? dir : ".");
    }
    return looks_like_json(path) ? inspect_manifest(path)
                                 : inspect_safetensors(path);
}

/* ------------------------------------------------------------------------ */
/* run                                                                       */
/* ------------------------------------------------------------------------ */

typedef struct run_inputs {
    float *x, *router_input;
    int32_t *gate_index;
    size_t tokens, rows; /* rows of router_input, 0 without */
} run_inputs;

/* Reads x [T, d_in], and router_input [S, d_in] with gate_index [T] when
 * the file has them. */
static int read_inputs(const char *path, size_t d_in, run_inputs *in)
{
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(NULL, path, &f);
    if (st != ATMOE_STATUS_OK)
        return fail(path, st, NULL);
    int rc = EXIT_OK;
    atmoe_safetensors_tensor x, r, g;
    int has_r = atmoe_safetensors_find(f, "router_input", &r) == ATMOE_STATUS_OK;
    int has_g = atmoe_safetensors_find(f, "gate_index", &g) == ATMOE_STATUS_OK;
    if ((st = atmoe_safetensors_find(f, "x", &x)) != ATMOE_STATUS_OK) {
        rc = fail(path, st, NULL);
    } else if (x.ndim != 2 || x.shape[1] != d_in || x.shape[0] == 0 ||
               x.shape[0] > INT32_MAX) {
        fprintf(stderr, "atmoe run: %s: tensor x must be [T, %zu], T >= 1\n",
                path, d_in);
        rc = EXIT_FAILED;
    } else if (has_r != has_g) {
        fprintf(stderr, "atmoe run: %s: router_input and gate_index go "
                        "together (one router row per sequence, one index "
                        "per token)\n", path);
        rc = EXIT_FAILED;
    } else if (has_r && (r.ndim != 2 || r.shape[1] != d_in || r.shape[0] == 0 ||
                         r.shape[0] > INT32_MAX)) {
        fprintf(stderr, "atmoe run: %s: tensor router_input must be [S, %zu]\n",
                path, d_in);
        rc = EXIT_FAILED;
    } else if (has_g && (g.ndim != 1 || g.shape[0] != x.shape[0] ||
                         (g.dtype != ATMOE_SAFETENSORS_I32 && g.dtype != ATMOE_SAFETENSORS_I64))) {
        fprintf(stderr, "atmoe run: %s: tensor gate_index must be I32 or I64 "
                        "[%llu], one per token of x\n", path,
                (unsigned long long)x.shape[0]);
        rc = EXIT_FAILED;
    }
    if (rc == EXIT_OK) {
        in->tokens = x.shape[0];
        in->rows = has_r ? r.shape[0] : 0;
        in->x = malloc(in->tokens * d_in * sizeof *in->x);
        if (has_r) {
            in->router_input = malloc(in->rows * d_in * sizeof *in->router_input);
            in->gate_index = malloc(in->tokens * sizeof *in->gate_index);
        }
        if (in->x == NULL || (has_r && (in->router_input == NULL ||
                                        in->gate_index == NULL)))
            rc = out_of_memory(path);
    }
    if (rc == EXIT_OK &&
        ((st = atmoe_safetensors_read_f32(f, "x", in->x, in->tokens * d_in)) ||
         (has_r && (st = atmoe_safetensors_read_f32(f, "router_input",
                                                    in->router_input,
                                                    in->rows * d_in)))))
        rc = fail(path, st, NULL);
    /* Indexes are little-endian, as stored; out-of-range ones route a
     * token to no gate row, as atmoe_graph_mixture says. */
    for (size_t t = 0; rc == EXIT_OK && has_g && t < in->tokens; t++) {
        const unsigned char *p = (const unsigned char *)g.data +
                                 t * (g.dtype == ATMOE_SAFETENSORS_I64 ? 8 : 4);
        uint64_t u = 0;
        for (int b = (g.dtype == ATMOE_SAFETENSORS_I64 ? 8 : 4) - 1; b >= 0; b--)
            u = u << 8 | p[b];
        int64_t v = g.dtype == ATMOE_SAFETENSORS_I64 ? (int64_t)u : (int32_t)(uint32_t)u;
        if (v < INT32_MIN || v > INT32_MAX) {
            fprintf(stderr, "atmoe run: %s: gate_index[%zu] is %lld, outside "
                            "int32\n", path, t, (long long)v);
            rc = EXIT_FAILED;
        }
        in->gate_index[t] = (int32_t)v;
    }
    atmoe_safetensors_free(f);
    return rc;
}

/* Elements of a node (its planned shape). */
static size_t node_count(atmoe_graph *g, atmoe_node node, int *ndim,
                         uint64_t *shape)
{
    size_t s[ATMOE_MAX_DIMS], count = 1;
    if (atmoe_graph_get_shape(g, node, ndim, s, NULL) != ATMOE_STATUS_OK)
        return 0;
    for (int i = 0; i < *ndim; i++) {
        count *= s[i];
        shape[i] = s[i];
    }
    return count;
}

/* Adds node's result under name, through buf (large enough for it). */
static atmoe_status save_node(atmoe_graph *g, atmoe_node node,
                              atmoe_safetensors_writer *w, const char *name,
                              float *buf)
{
    int ndim = 0;
    uint64_t shape[ATMOE_MAX_DIMS];
    size_t count = node_count(g, node, &ndim, shape);
    atmoe_status st = atmoe_graph_read(g, node, buf, count * sizeof *buf);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_add_f32(w, name, ATMOE_SAFETENSORS_F32, ndim,
                                              shape, buf);
    return st;
}

/* PATH.tmp-PID: beside PATH, so that renaming it is atomic. */
static char *temp_name(const char *path)
{
    size_t n = strlen(path) + 32;
    char *t = malloc(n);
    if (t)
        snprintf(t, n, "%s.tmp-%ld", path, (long)getpid());
    return t;
}

/* Renames the saved trace (when from_tr is not NULL), then the output,
 * into place.  Two renames cannot be one step: the output goes last, so
 * that a failure between them leaves the old output with a new trace,
 * never a new output with a trace of an older run. */
static int rename_both(const char *from_out, const char *out,
                       const char *from_tr, const char *tr)
{
    const char *from = from_tr, *to = tr;
    if (from_tr == NULL || rename(from_tr, tr) == 0) {
        if (rename(from_out, out) == 0)
            return EXIT_OK;
        from = from_out;
        to = out;
    }
    fprintf(stderr, "atmoe run: cannot rename %s to %s: %s\n", from, to,
            strerror(errno));
    return EXIT_FAILED;
}

static int run_usage(void)
{
    fprintf(stderr, "usage: atmoe run MANIFEST --input X.safetensors --output "
                    "Y.safetensors [--trace T.safetensors] [--device D]\n");
    return EXIT_USAGE;
}

static int cmd_run(int argc, char **argv)
{
    const char *manifest = NULL, *input = NULL, *output = NULL, *trace = NULL;
    const char *device = NULL;
    for (int i = 1; i < argc; i++) {
        int r;
        if ((r = option("run", argc, argv, &i, "--input", &input)) ||
            (r = option("run", argc, argv, &i, "--output", &output)) ||
            (r = option("run", argc, argv, &i, "--trace", &trace)) ||
            (r = option("run", argc, argv, &i, "--device", &device))) {
            if (r < 0)
                return EXIT_USAGE;
        } else if (argv[i][0] == '-' || manifest) {
            fprintf(stderr, "atmoe run: unexpected argument '%s'\n", argv[i]);
            return run_usage();
        } else {
            manifest = argv[i];
        }
    }
    if (manifest == NULL || input == NULL || output == NULL)
        return run_usage();

    /* Files first: a bad manifest or input fails before the device opens. */
    atmoe_manifest *m;
    atmoe_status st = atmoe_manifest_open(NULL, manifest, &m);
    if (st == ATMOE_STATUS_OK && (st = atmoe_manifest_check(m)))
        atmoe_manifest_free(m);
    if (st != ATMOE_STATUS_OK)
        return fail(manifest, st, NULL);
    atmoe_manifest_info info;
    atmoe_manifest_get_info(m, &info);
    run_inputs in = {0};
    int rc = read_inputs(input, info.d_in, &in);
    atmoe_context *ctx = NULL;
    atmoe_graph *g = NULL;
    atmoe_safetensors_writer *out = NULL, *tr = NULL;
    atmoe_node *ys = malloc(info.modules * sizeof *ys);
    atmoe_layer_trace *ts = malloc(info.modules * sizeof *ts);
    float *buf = NULL;
    const char *what = "opening the device";
    if (rc == EXIT_OK && (ys == NULL || ts == NULL))
        rc = out_of_memory("atmoe run");
    if (rc != EXIT_OK)
        goto out;
    if ((st = atmoe_context_new(device, &ctx)) != ATMOE_STATUS_OK) {
        rc = fail(what, st, NULL);
        goto out;
    }
    what = "building the graph";
    atmoe_node x, rin = ATMOE_NODE_NONE, gix = ATMOE_NODE_NONE, y;
    size_t xs[2] = {in.tokens, info.d_in}, rs[2] = {in.rows, info.d_in};
    if ((st = atmoe_graph_new(ctx, &g)) ||
        (st = atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &x)) ||
        (in.rows && (st = atmoe_graph_input(g, "router_input", ATMOE_DTYPE_F32,
                                            2, rs, 0, &rin))) ||
        (in.rows && (st = atmoe_graph_input(g, "gate_index", ATMOE_DTYPE_I32,
                                            1, xs, 0, &gix))) ||
        (st = atmoe_manifest_build(m, g, x, rin, gix, ys, ts, &y)))
        goto fail;
    for (size_t i = 0; i < info.modules && st == ATMOE_STATUS_OK; i++) {
        st = atmoe_graph_mark_output(g, ys[i]);
        if (trace && st == ATMOE_STATUS_OK &&
            (st = atmoe_graph_mark_output(g, ts[i].a)) == ATMOE_STATUS_OK &&
            (st = atmoe_graph_mark_output(g, ts[i].d)) == ATMOE_STATUS_OK)
            st = atmoe_graph_mark_output(g, ts[i].w);
    }
    if (st != ATMOE_STATUS_OK)
        goto fail;
    what = "computing";
    struct timespec t0, t1;
    if ((st = atmoe_graph_plan(g, 0)) ||
        (st = atmoe_graph_set_input(g, x, in.x,
                                    in.tokens * info.d_in * sizeof *in.x, 0)) ||
        (in.rows &&
         (st = atmoe_graph_set_input(g, rin, in.router_input,
                                     in.rows * info.d_in * sizeof(float), 0))) ||
        (in.rows && (st = atmoe_graph_set_input(g, gix, in.gate_index,
                                                in.tokens * sizeof(int32_t),
                                                0))) ||
        (st = atmoe_context_finish(ctx)))
        goto fail;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if ((st = atmoe_graph_compute(g, 0)) || (st = atmoe_context_finish(ctx)))
        goto fail;
    clock_gettime(CLOCK_MONOTONIC, &t1);

    what = "writing the outputs";
    /* One buffer, for the largest result read back. */
    size_t largest = 0;
    for (size_t i = 0; i < info.modules; i++) {
        const atmoe_node tn[4] = {ys[i], ts[i].a, ts[i].d, ts[i].w};
        for (int k = 0; k < (trace ? 4 : 1); k++) {
            int nd;
            uint64_t sh[ATMOE_MAX_DIMS];
            size_t n = node_count(g, tn[k], &nd, sh);
            largest = n > largest ? n : largest;
        }
    }
    if ((buf = malloc(largest * sizeof *buf)) == NULL) {
        rc = out_of_memory(what);
        goto out;
    }
    if ((st = atmoe_safetensors_writer_new(ctx, &out)) ||
        (st = save_node(g, y, out, "y", buf)) ||
        (trace && (st = atmoe_safetensors_writer_new(ctx, &tr))))
        goto fail;
    for (size_t i = 0; i < info.modules && st == ATMOE_STATUS_OK; i++) {
        atmoe_manifest_module mod;
        char name[256];
        atmoe_manifest_get_module(m, i, &mod);
        snprintf(name, sizeof name, "layers.%zu.%s", mod.layer, mod.name);
        st = save_node(g, ys[i], out, name, buf);
        const atmoe_node tn[3] = {ts[i].a, ts[i].d, ts[i].w};
        for (int k = 0; trace && k < 3 && st == ATMOE_STATUS_OK; k++) {
            snprintf(name, sizeof name, "layers.%zu.%s.%c", mod.layer,
                     mod.name, "adw"[k]);
            st = save_node(g, tn[k], tr, name, buf);
        }
    }
    /* Both files or neither: each is saved beside its place under a
     * temporary name, and renamed once both are whole. */
    char *tmp_out = temp_name(output), *tmp_tr = trace ? temp_name(trace) : NULL;
    if (tmp_out == NULL || (trace && tmp_tr == NULL)) {
        free(tmp_out);
        free(tmp_tr);
        rc = out_of_memory(what);
        goto out;
    }
    st = atmoe_safetensors_writer_save(out, tmp_out);
    if (st == ATMOE_STATUS_OK && trace)
        st = atmoe_safetensors_writer_save(tr, tmp_tr);
    if (st == ATMOE_STATUS_OK)
        rc = rename_both(tmp_out, output, tmp_tr, trace);
    if (st != ATMOE_STATUS_OK || rc != EXIT_OK) {
        remove(tmp_out);
        if (tmp_tr)
            remove(tmp_tr);
    }
    free(tmp_out);
    free(tmp_tr);
    if (st != ATMOE_STATUS_OK)
        goto fail;
    if (rc != EXIT_OK)
        goto out;
    atmoe_device_info d;
    atmoe_context_get_device(ctx, &d);
    printf("ran %zu layer(s), %zu module(s) on %zu token(s) on %s: %.3f ms "
           "(planned before); wrote %s%s%s\n",
           info.layers, info.modules, in.tokens, d.name,
           (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6,
           output, trace ? " and " : "", trace ? trace : "");
    goto out;
fail:
    rc = fail(what, st, ctx);
out:
    atmoe_safetensors_writer_free(out);
    atmoe_safetensors_writer_free(tr);
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
    atmoe_manifest_free(m);
    free(ys);
    free(ts);
    free(buf);
    free(in.x);
    free(in.router_input);
    free(in.gate_index);
    return rc;
}

static int cmd_params(int argc, char **argv)
{
    const char *device = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--device") == 0 && i + 1 < argc)
            device = argv[++i];
        else if (strncmp(argv[i], "--device=", 9) == 0)
            device = argv[i] + 9;
        else {
            fprintf(stderr, "atmoe params: unexpected argument '%s'\n",
                    argv[i]);
            return 2;
        }
    }
    atmoe_context *ctx;
    atmoe_status st = atmoe_context_new(device, &ctx);
    if (st != ATMOE_STATUS_OK)
        return fail("opening the device", st, NULL);
    size_t need = 0;
    char probe[1];
    atmoe_context_get_params(ctx, probe, sizeof probe, &need);
    char *text = need ? malloc(need) : NULL;
    int rc = 0;
    if (text == NULL)
        rc = fail("describing the parameters", ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                  NULL);
    else if ((st = atmoe_context_get_params(ctx, text, need, NULL)) !=
             ATMOE_STATUS_OK)
        rc = fail("describing the parameters", st, ctx);
    else
        printf("%s\n", text);
    free(text);
    atmoe_context_free(ctx);
    return rc;
}

static int cmd_version(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "atmoe version: unexpected argument '%s'\n", argv[1]);
        return EXIT_USAGE;
    }
    printf("atmoe %s\n", atmoe_version());
    return EXIT_OK;
}

static const struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} commands[] = {
    {"devices", cmd_devices, "list the OpenCL devices"},
    {"selfcheck", cmd_selfcheck,
     "[--device D]  check a device's numbers against float64"},
    {"inspect", cmd_inspect,
     "PATH  describe an adapter, a safetensors file or a manifest"},
    {"run", cmd_run,
     "MANIFEST --input X --output Y [--trace T] [--device D]  apply a "
     "manifest's layers"},
    {"params", cmd_params,
     "[--device D]  print the tuned parameters in force (atmoe-tune(1))"},
    {"version", cmd_version, "print the library version"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: atmoe COMMAND [ARGS]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\nD is a device selection: an index, gpu, cpu, or part of a "
               "name (see atmoe(1)).\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return EXIT_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return EXIT_OK;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0)
            return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "atmoe: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return EXIT_USAGE;
}
