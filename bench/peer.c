/* The PyTorch peer (--peer torch): bench/peer_torch.py, run by a Python
 * that has torch, computes every workload's layer the way a PyTorch user
 * would, on the same weights and inputs, and its results join the table as
 * the variant torch, checked against the fused outputs.
 *
 * The exchange, in a private directory the bench removes afterwards:
 *
 *   spec.json   written by the bench: {"protocol": 1, "threads": N,
 *               "reps": R, "warmup": W, "workloads": [...]}, each workload
 *               with its kind ("atmoe" or "trex"), shapes, constants, seed
 *               and draws (how its weights were drawn, in order), and its
 *               runs [{"T": T, "output": PATH}]
 *   PATH        written by the peer: a run's y, T x d float32 in the
 *               machine's byte order
 *
 * and on the peer's stdout one JSON object per line:
 *
 *   {"event": "probe", "python": V, "torch": B, "numpy": B}   (--probe)
 *   {"event": "start", "python": V, "torch": V, "threads": N,
 *    "blas": the BLAS libraries it loaded}
 *   {"event": "run", "workload": W, "T": T}                   before a run
 *   {"event": "result", "workload": W, "T": T, "median_ms": M,
 *    "min_ms": M, "max_ms": M}
 *   {"event": "error", "message": M}                          then it exits
 *
 * FLOPs and bytes are the fused variant's, counted from the same shapes. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

/* Found by peer_probe(), used by every peer_run(). */
static char *peer_python, *peer_script;

void peer_keep(device_run *d, size_t index, const float *y, size_t count)
{
    if (d->n_refs == d->cap_refs) {
        d->cap_refs = d->cap_refs ? 2 * d->cap_refs : 8;
        d->refs = xrealloc(d->refs, d->cap_refs, sizeof *d->refs);
    }
    peer_ref *r = &d->refs[d->n_refs++];
    r->result = index;
    r->count = count;
    r->y = xcalloc(count, sizeof *r->y);
    memcpy(r->y, y, count * sizeof *y);
}

static void free_refs(device_run *d)
{
    for (size_t i = 0; i < d->n_refs; i++)
        free(d->refs[i].y);
    free(d->refs);
    d->refs = NULL;
    d->n_refs = d->cap_refs = 0;
}

void peer_free(device_run *d)
{
    free_refs(d);
    json_decref(d->peer_workloads);
    json_decref(d->peer_info);
    d->peer_workloads = d->peer_info = NULL;
}

void peer_end(void)
{
    free(peer_python);
    free(peer_script);
    peer_python = peer_script = NULL;
}

/* The next JSON object the peer printed, or NULL at the end.  Lines that
 * are not JSON objects are passed on to stderr. */
static json_t *next_line(FILE *f, char **buf, size_t *cap)
{
    ssize_t len;
    while ((len = getline(buf, cap, f)) >= 0) {
        json_error_t jerr;
        json_t *obj = json_loads(*buf, JSON_DISABLE_EOF_CHECK, &jerr);
        if (json_is_object(obj))
            return obj;
        json_decref(obj);
        if (len > 0 && strspn(*buf, " \t\r\n") != (size_t)len)
            fprintf(stderr, PROGRAM ": torch peer: %s%s", *buf,
                    (*buf)[len - 1] == '\n' ? "" : "\n");
    }
    return NULL;
}

static const char *event_of(json_t *obj)
{
    const char *e = json_string_value(json_object_get(obj, "event"));
    return e ? e : "";
}

int peer_probe(void)
{
    peer_end();
    peer_python = find_program("ATMOE_BENCH_PYTHON", DEFAULT_PYTHON,
                               "the peer's Python");
    if (peer_python == NULL)
        return -1;
    peer_script = find_data_file(PEER_SCRIPT);
    if (peer_script == NULL)
        return -1;
    char *argv[] = {peer_python, peer_script, "--probe", NULL};
    pid_t pid;
    FILE *out;
    if (spawn_program(argv, &pid, &out))
        return -1;
    char *buf = NULL;
    size_t cap = 0;
    json_t *obj, *probe = NULL;
    while ((obj = next_line(out, &buf, &cap)) != NULL) {
        if (probe == NULL && strcmp(event_of(obj), "probe") == 0)
            probe = obj;
        else
            json_decref(obj);
    }
    free(buf);
    fclose(out);
    int status = wait_program(pid);
    int rc = 0;
    if (probe == NULL || status != 0) {
        rc = set_error("%s %s --probe failed (exit status %d)", peer_python,
                       peer_script, status);
    } else {
        int torch = json_is_true(json_object_get(probe, "torch"));
        int numpy = json_is_true(json_object_get(probe, "numpy"));
        if (!torch || !numpy)
            rc = set_error(
                "%s (Python %s) cannot import %s: install python3-torch "
                "(Debian's package, which brings numpy), or set "
                "ATMOE_BENCH_PYTHON to a Python that has torch",
                peer_python,
                json_string_value(json_object_get(probe, "python")),
                !torch && !numpy ? "torch nor numpy"
                : !torch         ? "torch"
                                 : "numpy");
    }
    json_decref(probe);
    return rc;
}

/* The spec's workload object named `name`. */
static json_t *spec_workload(const device_run *d, const char *name)
{
    size_t i;
    json_t *w;
    json_array_foreach(d->peer_workloads, i, w)
    {
        const char *n = json_string_value(json_object_get(w, "name"));
        if (n && strcmp(n, name) == 0)
            return w;
    }
    return NULL;
}

/* Writes the spec: every kept fused run becomes a run of its workload,
 * its output a file in dir. */
static int write_spec(device_run *d, const char *dir, int reps, int warmup,
                      const char *path)
{
    for (size_t k = 0; k < d->n_refs; k++) {
        const result *r = &d->results[d->refs[k].result];
        json_t *w = spec_workload(d, r->workload);
        if (w == NULL)
            return set_error("no spec for workload %s", r->workload);
        json_t *runs = json_object_get(w, "runs");
        if (runs == NULL) {
            runs = json_array();
            json_object_set_new(w, "runs", runs);
        }
        char out[PATH_MAX];
        snprintf(out, sizeof out, "%s/%s-%zu.f32", dir, r->workload, r->T);
        json_array_append_new(runs, json_pack("{s:I, s:s}", "T",
                                              (json_int_t)r->T, "output",
                                              out));
    }
    json_t *spec = json_pack("{s:i, s:I, s:i, s:i, s:O}", "protocol", 1,
                             "threads", (json_int_t)d->info.compute_units,
                             "reps", reps, "warmup", warmup, "workloads",
                             d->peer_workloads);
    int rc = spec ? json_dump_file(spec, path, 0) : -1;
    json_decref(spec);
    return rc == 0 ? 0 : set_error("cannot write %s", path);
}

/* Reads count floats from path, exactly. */
static float *read_output(const char *path, size_t count)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        set_error("%s: %s", path, strerror(errno));
        return NULL;
    }
    float *y = xcalloc(count + 1, sizeof *y);
    size_t got = fread(y, sizeof *y, count + 1, f);
    fclose(f);
    if (got != count) {
        set_error("%s holds %zu floats, not %zu", path, got, count);
        free(y);
        return NULL;
    }
    return y;
}

/* A result line: the torch result beside its fused one, checked. */
static void take_result(device_run *d, json_t *obj, const char *dir,
                        int *done)
{
    const char *wl = json_string_value(json_object_get(obj, "workload"));
    json_int_t T = json_integer_value(json_object_get(obj, "T"));
    size_t k = 0;
    while (k < d->n_refs &&
           !(wl && strcmp(d->results[d->refs[k].result].workload, wl) == 0 &&
             (json_int_t)d->results[d->refs[k].result].T == T))
        k++;
    if (k == d->n_refs || done[k]) {
        fprintf(stderr, PROGRAM ": %s: torch peer: an unexpected result "
                "(%s T=%lld)\n", d->info.name, wl ? wl : "?", (long long)T);
        d->failures++;
        return;
    }
    done[k] = 1;
    const result fused = d->results[d->refs[k].result];
    result *r = push_result(d);
    *r = fused;
    r->variant = VARIANT_TORCH;
    r->host_measured = 0; /* PyTorch is not the library */
    r->host_ms_median = NAN;
    r->host_allocations_max = 0;
    r->median_ms = json_number_value(json_object_get(obj, "median_ms"));
    r->min_ms = json_number_value(json_object_get(obj, "min_ms"));
    r->max_ms = json_number_value(json_object_get(obj, "max_ms"));
    set_rates(r, &d->c);
    r->ratio_to_fused = r->median_ms / fused.median_ms;
    r->max_rel_diff = NAN;

    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s-%zu.f32", dir, fused.workload,
             fused.T);
    float *y = read_output(path, d->refs[k].count);
    if (y == NULL) {
        fprintf(stderr, PROGRAM ": %s: %s T=%zu torch: %s\n", d->info.name,
                fused.workload, fused.T, errbuf);
        d->failures++;
        return;
    }
    double diff = r->max_rel_diff = rel_diff(y, d->refs[k].y, d->refs[k].count);
    free(y);
    if (diff > CHECK_TOLERANCE || isnan(diff)) {
        fprintf(stderr,
                PROGRAM ": %s: %s T=%zu torch differs from fused by %.2e "
                "(relative; tolerance %.0e)\n",
                d->info.name, fused.workload, fused.T, diff, CHECK_TOLERANCE);
        d->failures++;
    }
}

/* Reads the peer's lines until it ends; returns whether it reported an
 * error itself. */
static int read_peer(device_run *d, FILE *out, const char *dir, int *done,
                     progress *prog)
{
    char *buf = NULL;
    size_t cap = 0;
    int reported = 0;
    json_t *obj;
    while ((obj = next_line(out, &buf, &cap)) != NULL) {
        const char *ev = event_of(obj);
        if (strcmp(ev, "start") == 0) {
            json_decref(d->peer_info);
            d->peer_info = json_pack(
                "{s:s, s:O?, s:O?, s:O?, s:O?}", "name", "torch", "torch",
                json_object_get(obj, "torch"), "python",
                json_object_get(obj, "python"), "threads",
                json_object_get(obj, "threads"), "blas",
                json_object_get(obj, "blas"));
        } else if (strcmp(ev, "run") == 0) {
            const char *wl =
                json_string_value(json_object_get(obj, "workload"));
            progress_show(prog, wl ? wl : "?",
                          (size_t)json_integer_value(json_object_get(obj, "T")),
                          VARIANT_TORCH, "running");
        } else if (strcmp(ev, "result") == 0) {
            take_result(d, obj, dir, done);
            prog->done++;
        } else if (strcmp(ev, "error") == 0) {
            const char *m = json_string_value(json_object_get(obj, "message"));
            progress_clear(prog);
            fprintf(stderr, PROGRAM ": %s: torch peer: %s\n", d->info.name,
                    m ? m : "an error without a message");
            d->failures++;
            reported = 1;
        }
        json_decref(obj);
    }
    free(buf);
    return reported;
}

void peer_run(device_run *d, int reps, int warmup, progress *prog)
{
    if (d->n_refs == 0) /* no fused run to compare with */
        return;
    const result *first = &d->results[d->refs[0].result];
    progress_show(prog, first->workload, first->T, VARIANT_TORCH,
                  "starting PyTorch");
    char *dir = make_temp_dir();
    if (dir == NULL) {
        progress_clear(prog);
        fprintf(stderr, PROGRAM ": %s: torch peer: %s\n", d->info.name,
                errbuf);
        d->failures++;
        free_refs(d);
        return;
    }
    int *done = xcalloc(d->n_refs, sizeof *done);
    char spec[PATH_MAX];
    snprintf(spec, sizeof spec, "%s/spec.json", dir);
    char *argv[] = {peer_python, peer_script, "--spec", spec, NULL};
    pid_t pid;
    FILE *out = NULL;
    if (write_spec(d, dir, reps, warmup, spec) ||
        spawn_program(argv, &pid, &out)) {
        progress_clear(prog);
        fprintf(stderr, PROGRAM ": %s: torch peer: %s\n", d->info.name,
                errbuf);
        d->failures++;
    } else {
        int reported = read_peer(d, out, dir, done, prog);
        fclose(out);
        int status = wait_program(pid);
        progress_clear(prog);
        if (status != 0 && !reported) {
            fprintf(stderr, PROGRAM ": %s: torch peer: %s %s ended with "
                    "status %d\n", d->info.name, peer_python, peer_script,
                    status);
            d->failures++;
        }
        for (size_t k = 0; k < d->n_refs; k++)
            if (!done[k]) {
                const result *r = &d->results[d->refs[k].result];
                fprintf(stderr, PROGRAM ": %s: %s T=%zu torch: no result\n",
                        d->info.name, r->workload, r->T);
                d->failures++;
            }
    }
    free(done);
    remove_temp_dir(dir);
    free(dir);
    free_refs(d);
}
