/* atmoe run MANIFEST --input X --output Y [--trace T] [--device D]: applies
 * a manifest's layers to the tokens of X and writes every module's output
 * (and, with a head, its logits), and with --trace the routers' gates, as
 * safetensors files.  Rank-1
 * modules read the samples' instruction embeddings or intuition scores
 * from X. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"

typedef struct run_inputs {
    float *x, *router_input, *samples;
    int32_t *gate_index;
    size_t tokens, rows; /* rows of router_input, 0 without */
    int has_index;
    /* Rank-1 modules: "embeddings" [S, D] or "scores" [S, K]. */
    const char *samples_name; /* NULL without either */
    size_t sample_rows, sample_cols;
} run_inputs;

/* Reads x [T, d_in], router_input [S, d_in], gate_index [T], and
 * embeddings [S, D] or scores [S, K] when the file has them. */
static int read_inputs(const char *path, const atmoe_manifest_info *info,
                       run_inputs *in)
{
    size_t d_in = info->d_in;
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(NULL, path, &f);
    if (st != ATMOE_STATUS_OK)
        return cli_fail(path, st, NULL);
    int rc = EXIT_OK;
    atmoe_safetensors_tensor x, r, g, e;
    int has_r = atmoe_safetensors_find(f, "router_input", &r) == ATMOE_STATUS_OK;
    int has_g = atmoe_safetensors_find(f, "gate_index", &g) == ATMOE_STATUS_OK;
    /* Scores win over embeddings, as atmoe_manifest_build_with says. */
    in->samples_name =
        atmoe_safetensors_find(f, "scores", &e) == ATMOE_STATUS_OK ? "scores"
        : atmoe_safetensors_find(f, "embeddings", &e) == ATMOE_STATUS_OK
            ? "embeddings"
            : NULL;
    int has_e = in->samples_name != NULL;
    if ((st = atmoe_safetensors_find(f, "x", &x)) != ATMOE_STATUS_OK) {
        rc = cli_fail(path, st, NULL);
    } else if (x.ndim != 2 || x.shape[1] != d_in || x.shape[0] == 0 ||
               x.shape[0] > INT32_MAX) {
        fprintf(stderr, "atmoe run: %s: tensor x must be [T, %zu], T >= 1\n",
                path, d_in);
        rc = EXIT_FAILED;
    } else if (has_r != has_g && !has_e) {
        fprintf(stderr, "atmoe run: %s: router_input and gate_index go "
                        "together (one router row per sequence, one index "
                        "per token)\n", path);
        rc = EXIT_FAILED;
    } else if (has_e && (e.ndim != 2 || e.shape[0] == 0 || e.shape[1] == 0 ||
                         e.shape[0] > INT32_MAX || e.shape[1] > INT32_MAX ||
                         (!strcmp(in->samples_name, "embeddings") &&
                          e.shape[1] != info->embedding_dim))) {
        fprintf(stderr, "atmoe run: %s: tensor %s must be [S, %s]\n", path,
                in->samples_name,
                strcmp(in->samples_name, "embeddings") ? "K"
                : info->embedding_dim ? "D of the manifest's centroids"
                                      : "D (and the manifest names no "
                                        "centroids)");
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
        in->has_index = has_g;
        in->sample_rows = has_e ? e.shape[0] : 0;
        in->sample_cols = has_e ? e.shape[1] : 0;
        in->x = malloc(in->tokens * d_in * sizeof *in->x);
        if (has_r)
            in->router_input = malloc(in->rows * d_in * sizeof *in->router_input);
        if (has_g)
            in->gate_index = malloc(in->tokens * sizeof *in->gate_index);
        if (has_e)
            in->samples = malloc(in->sample_rows * in->sample_cols *
                                 sizeof *in->samples);
        if (in->x == NULL || (has_r && in->router_input == NULL) ||
            (has_g && in->gate_index == NULL) || (has_e && in->samples == NULL))
            rc = cli_out_of_memory(path);
    }
    if (rc == EXIT_OK &&
        ((st = atmoe_safetensors_read_f32(f, "x", in->x, in->tokens * d_in)) ||
         (has_r && (st = atmoe_safetensors_read_f32(f, "router_input",
                                                    in->router_input,
                                                    in->rows * d_in))) ||
         (has_e && (st = atmoe_safetensors_read_f32(
                        f, in->samples_name, in->samples,
                        in->sample_rows * in->sample_cols)))))
        rc = cli_fail(path, st, NULL);
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

/* Removes the PATH.tmp-PID files that a killed run left beside path:
 * those whose process no longer exists (a live run's, or another user's,
 * stay). */
static void remove_stale_temps(const char *path)
{
    char *copy = strdup(path);
    if (copy == NULL)
        return;
    char *slash = strrchr(copy, '/');
    const char *dir = slash ? (slash == copy ? "/" : copy) : ".";
    const char *base = slash ? slash + 1 : copy;
    if (slash)
        *slash = '\0';
    size_t len = strlen(base);
    DIR *d = opendir(dir);
    if (d == NULL) {
        free(copy);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        const char *name = e->d_name;
        if (strncmp(name, base, len) != 0 ||
            strncmp(name + len, ".tmp-", 5) != 0)
            continue;
        char *end;
        long pid = strtol(name + len + 5, &end, 10);
        if (*end != '\0' || end == name + len + 5 || pid <= 0 ||
            pid == (long)getpid() ||
            kill((pid_t)pid, 0) == 0 || errno != ESRCH)
            continue;
        char full[4096];
        struct stat sb;
        if (snprintf(full, sizeof full, "%s/%s", dir, name) <
                (int)sizeof full &&
            lstat(full, &sb) == 0 && S_ISREG(sb.st_mode) &&
            sb.st_uid == getuid())
            remove(full);
    }
    closedir(d);
    free(copy);
}

/* PATH.tmp-PID: beside PATH, so that renaming it is atomic.  Those of runs
 * that were killed before their rename go first. */
static char *temp_name(const char *path)
{
    remove_stale_temps(path);
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
/* Whether a file may be renamed over path: absent or not a directory (a
 * rename over a directory fails, and must not fail after the first one). */
static int destination_ok(const char *path)
{
    struct stat sb;
    if (stat(path, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return 1;
    fprintf(stderr, "atmoe run: cannot write %s: it is a directory; nothing "
            "written\n", path);
    return 0;
}

static int rename_both(const char *from_out, const char *out,
                       const char *from_tr, const char *tr)
{
    /* Every destination checked before the first rename: both or
     * neither. */
    if (!destination_ok(out) || (tr && !destination_ok(tr)))
        return EXIT_FAILED;
    if (tr && strcmp(out, tr) == 0) {
        fprintf(stderr, "atmoe run: --output and --trace name the same file "
                "%s; nothing written\n", out);
        return EXIT_FAILED;
    }
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

/* A module's traces, named as trace_names says: a, d and w of a router,
 * or p, gates, load and importance of rank-1 experts; ATMOE_NODE_NONE
 * where it has none. */
enum { TRACES = 7 };
static const char *const trace_names[TRACES] = {"a", "d", "w", "p", "gates",
                                                "load", "importance"};

static void trace_nodes(const atmoe_layer_trace *t,
                        const atmoe_mor1e_trace *r, atmoe_node out[TRACES])
{
    const atmoe_node all[TRACES] = {t->a, t->d, t->w, r->p, r->gates,
                                    r->load, r->importance};
    memcpy(out, all, sizeof all);
}

static int run_usage(void)
{
    fprintf(stderr, "usage: atmoe run MANIFEST --input X.safetensors --output "
                    "Y.safetensors [--trace T.safetensors] [--device D]\n");
    return EXIT_USAGE;
}

static int run(int argc, char **argv)
{
    const char *manifest = NULL, *input = NULL, *output = NULL, *trace = NULL;
    const char *device = NULL;
    for (int i = 1; i < argc; i++) {
        int r;
        if ((r = cli_option("run", argc, argv, &i, "--input", &input)) ||
            (r = cli_option("run", argc, argv, &i, "--output", &output)) ||
            (r = cli_option("run", argc, argv, &i, "--trace", &trace)) ||
            (r = cli_option("run", argc, argv, &i, "--device", &device))) {
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
        return cli_fail(manifest, st, NULL);
    atmoe_manifest_info info;
    atmoe_manifest_get_info(m, &info);
    run_inputs in = {0};
    int rc = read_inputs(input, &info, &in);
    atmoe_context *ctx = NULL;
    atmoe_graph *g = NULL;
    atmoe_safetensors_writer *out = NULL, *tr = NULL;
    atmoe_node *ys = malloc(info.modules * sizeof *ys);
    atmoe_layer_trace *ts = malloc(info.modules * sizeof *ts);
    atmoe_mor1e_trace *rts = malloc(info.modules * sizeof *rts);
    float *buf = NULL;
    const char *what = "building the graph";
    if (rc == EXIT_OK && (ys == NULL || ts == NULL || rts == NULL))
        rc = cli_out_of_memory("atmoe run");
    if (rc == EXIT_OK)
        rc = cli_open_device(device, &ctx);
    if (rc != EXIT_OK)
        goto out;
    atmoe_node x, rin = ATMOE_NODE_NONE, gix = ATMOE_NODE_NONE,
                  smp = ATMOE_NODE_NONE, y;
    size_t xs[2] = {in.tokens, info.d_in}, rs[2] = {in.rows, info.d_in};
    size_t ss[2] = {in.sample_rows, in.sample_cols};
    if ((st = atmoe_graph_new(ctx, &g)) ||
        (st = atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &x)) ||
        (in.rows && (st = atmoe_graph_input(g, "router_input", ATMOE_DTYPE_F32,
                                            2, rs, 0, &rin))) ||
        (in.has_index && (st = atmoe_graph_input(g, "gate_index",
                                                 ATMOE_DTYPE_I32, 1, xs, 0,
                                                 &gix))) ||
        (in.samples_name &&
         (st = atmoe_graph_input(g, in.samples_name, ATMOE_DTYPE_F32, 2, ss,
                                 0, &smp))))
        goto fail;
    int scores = in.samples_name && strcmp(in.samples_name, "scores") == 0;
    atmoe_manifest_inputs mi = {rin, gix, scores ? ATMOE_NODE_NONE : smp,
                                scores ? smp : ATMOE_NODE_NONE};
    if ((st = atmoe_manifest_build_with(m, g, x, &mi, ys, ts, rts, &y)))
        goto fail;
    /* A classification's logits, what the trainer's cross-entropy reads. */
    atmoe_node logits = ATMOE_NODE_NONE;
    if (info.head_file &&
        ((st = atmoe_manifest_build_head(m, g, y, &logits)) ||
         (st = atmoe_graph_mark_output(g, logits))))
        goto fail;
    for (size_t i = 0; i < info.modules && st == ATMOE_STATUS_OK; i++) {
        st = atmoe_graph_mark_output(g, ys[i]);
        atmoe_node tn[TRACES];
        trace_nodes(&ts[i], &rts[i], tn);
        for (int k = 0; trace && k < TRACES && st == ATMOE_STATUS_OK; k++)
            if (tn[k] != ATMOE_NODE_NONE)
                st = atmoe_graph_mark_output(g, tn[k]);
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
        (in.has_index && (st = atmoe_graph_set_input(
                              g, gix, in.gate_index,
                              in.tokens * sizeof(int32_t), 0))) ||
        (in.samples_name &&
         (st = atmoe_graph_set_input(g, smp, in.samples,
                                     in.sample_rows * in.sample_cols *
                                         sizeof(float),
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
    if (logits != ATMOE_NODE_NONE) {
        int nd;
        uint64_t sh[ATMOE_MAX_DIMS];
        largest = node_count(g, logits, &nd, sh);
    }
    for (size_t i = 0; i < info.modules; i++) {
        atmoe_node tn[TRACES + 1];
        tn[0] = ys[i];
        trace_nodes(&ts[i], &rts[i], tn + 1);
        for (int k = 0; k < (trace ? TRACES + 1 : 1); k++) {
            if (tn[k] == ATMOE_NODE_NONE)
                continue;
            int nd;
            uint64_t sh[ATMOE_MAX_DIMS];
            size_t n = node_count(g, tn[k], &nd, sh);
            largest = n > largest ? n : largest;
        }
    }
    if ((buf = malloc(largest * sizeof *buf)) == NULL) {
        rc = cli_out_of_memory(what);
        goto out;
    }
    if ((st = atmoe_safetensors_writer_new(ctx, &out)) ||
        (st = save_node(g, y, out, "y", buf)) ||
        (logits != ATMOE_NODE_NONE &&
         (st = save_node(g, logits, out, "logits", buf))) ||
        (trace && (st = atmoe_safetensors_writer_new(ctx, &tr))))
        goto fail;
    for (size_t i = 0; i < info.modules && st == ATMOE_STATUS_OK; i++) {
        atmoe_manifest_module mod;
        char name[256];
        atmoe_manifest_get_module(m, i, &mod);
        snprintf(name, sizeof name, "layers.%zu.%s", mod.layer, mod.name);
        st = save_node(g, ys[i], out, name, buf);
        atmoe_node tn[TRACES];
        trace_nodes(&ts[i], &rts[i], tn);
        for (int k = 0; trace && k < TRACES && st == ATMOE_STATUS_OK; k++) {
            if (tn[k] == ATMOE_NODE_NONE)
                continue;
            snprintf(name, sizeof name, "layers.%zu.%s.%s", mod.layer,
                     mod.name, trace_names[k]);
            st = save_node(g, tn[k], tr, name, buf);
        }
    }
    /* Both files or neither: each is saved beside its place under a
     * temporary name, and renamed once both are whole. */
    char *tmp_out = temp_name(output), *tmp_tr = trace ? temp_name(trace) : NULL;
    if (tmp_out == NULL || (trace && tmp_tr == NULL)) {
        free(tmp_out);
        free(tmp_tr);
        rc = cli_out_of_memory(what);
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
    rc = cli_fail(what, st, ctx);
out:
    atmoe_safetensors_writer_free(out);
    atmoe_safetensors_writer_free(tr);
    atmoe_graph_free(g);
    atmoe_context_free(ctx);
    atmoe_manifest_free(m);
    free(ys);
    free(ts);
    free(rts);
    free(buf);
    free(in.x);
    free(in.router_input);
    free(in.gate_index);
    free(in.samples);
    return rc;
}

const cli_command cmd_run = {
    "run", run,
    "MANIFEST --input X --output Y [--trace T] [--device D]  apply a "
    "manifest's layers"};
