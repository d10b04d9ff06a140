/* atmoe-kmeans-bench: Lloyd iterations of atmoe_kmeans on N x D points
 * (100,000 x 768, K = 32 at full scale, SPEC's T-REX clustering), their
 * seconds per iteration against the device's copy bandwidth, and the same
 * iterations in scikit-learn's KMeans from the same initial centroids.
 *
 * A program of its own rather than a workload of atmoe-bench: that one
 * times planned graphs in variants (fused, unfused, merged, PyTorch) with
 * a roofline of FLOPs and bytes per compute, and k-means is an iterative
 * algorithm that the host steers between device passes; none of that
 * machinery fits.  It shares bench/common.c (data files, errors),
 * bench/process.c (running the peer) and bench/measure.c (the clock, the
 * data's splitmix64 stream).
 *
 * The bandwidth figure is the least an iteration must move, the points
 * read once (N D 4 bytes), over the measured seconds, as a fraction of
 * what atmoe_tensor_copy reaches on the device (bytes read plus written
 * over its time): a ceiling measured with the library's own kernels. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

typedef struct opts {
    size_t n, d, k;
    unsigned iterations;
    const char *device, *peer, *scale;
} opts;

static int usage(FILE *f, int rc)
{
    fprintf(f,
            "usage: atmoe-kmeans-bench [--scale full|small] [--n N] [--d D] "
            "[--k K]\n"
            "         [--iterations I] [--device D] [--peer sklearn]\n"
            "Times Lloyd iterations of atmoe_kmeans from the first K points "
            "as centroids.\n"
            "  --scale full   100000 x 768 points, K = 32 (the default)\n"
            "  --scale small  4099 x 97 points, K = 7 (for tests)\n"
            "  --iterations I at most I iterations (default 10)\n"
            "  --peer sklearn also time scikit-learn's KMeans (lloyd) on "
            "the same points\n"
            "                 (ATMOE_BENCH_PYTHON names the Python, default "
            DEFAULT_PYTHON ";\n"
            "                 threads follow OMP_NUM_THREADS, set to the "
            "device's compute units\n"
            "                 when unset)\n");
    return rc;
}

static int parse_size(const char *name, const char *v, size_t *out)
{
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (*v == '\0' || *v == '-' || *end || errno || x == 0 || x > (1u << 30))
        return set_error("%s '%s' must be an integer from 1 to 2^30", name,
                         v);
    *out = (size_t)x;
    return 0;
}

static int parse(int argc, char **argv, opts *o)
{
    o->n = 100000;
    o->d = 768;
    o->k = 32;
    o->iterations = 10;
    o->scale = "full";
    size_t it = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0)
            exit(usage(stdout, 0));
        if (v == NULL)
            return set_error("unknown argument or missing value: '%s'", a);
        if (strcmp(a, "--scale") == 0) {
            if (strcmp(v, "small") == 0) {
                o->n = 4099, o->d = 97, o->k = 7;
            } else if (strcmp(v, "full") != 0) {
                return set_error("--scale '%s': full or small", v);
            }
            o->scale = v;
        } else if (strcmp(a, "--n") == 0) {
            if (parse_size(a, v, &o->n))
                return -1;
        } else if (strcmp(a, "--d") == 0) {
            if (parse_size(a, v, &o->d))
                return -1;
        } else if (strcmp(a, "--k") == 0) {
            if (parse_size(a, v, &o->k))
                return -1;
        } else if (strcmp(a, "--iterations") == 0) {
            if (parse_size(a, v, &it))
                return -1;
            o->iterations = (unsigned)it;
        } else if (strcmp(a, "--device") == 0) {
            o->device = v;
        } else if (strcmp(a, "--peer") == 0) {
            if (strcmp(v, "sklearn") != 0)
                return set_error("--peer '%s': the peer is sklearn", v);
            o->peer = v;
        } else {
            return set_error("unknown argument '%s'", a);
        }
        i++;
    }
    if (o->k > o->n)
        return set_error("--k %zu is more than the %zu points", o->k, o->n);
    return 0;
}

/* Points around K centres in [-1, 1)^D with noise of twice that, from the
 * measure.h stream: overlapping clusters, so that Lloyd takes a number of
 * iterations to settle rather than two. */
static float *make_points(const opts *o)
{
    float *x = xcalloc(o->n * o->d, sizeof *x);
    float *c = xcalloc(o->k * o->d, sizeof *c);
    uint64_t s = 12;
    for (size_t i = 0; i < o->k * o->d; i++)
        c[i] = (float)uniform(&s);
    for (size_t i = 0; i < o->n; i++) {
        size_t q = i < o->k ? i : splitmix64(&s) % o->k;
        for (size_t j = 0; j < o->d; j++)
            x[i * o->d + j] = c[q * o->d + j] + 2.0f * (float)uniform(&s);
    }
    free(c);
    return x;
}

typedef struct timing {
    double t[4096];
    unsigned count;
} timing;

static int on_iteration(const atmoe_kmeans_progress *p, void *user)
{
    (void)p;
    timing *t = user;
    if (t->count < sizeof t->t / sizeof t->t[0])
        t->t[t->count++] = now_s();
    return 0;
}

/* The best of a few copies on the device of 256 MiB, read plus written
 * per second: large enough that no cache holds it and the launch does not
 * count. */
static double copy_gbs(atmoe_context *ctx)
{
    size_t shape[1] = {(size_t)64 << 20};
    atmoe_tensor *dst, *flat;
    if (atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 1, shape, &dst))
        return NAN;
    if (atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 1, shape, &flat) ||
        atmoe_tensor_fill(flat, 1.0)) {
        atmoe_tensor_free(dst);
        return NAN;
    }
    size_t count = shape[0];
    double best = INFINITY;
    for (int r = 0; r < 6; r++) {
        double t0 = now_s();
        if (atmoe_tensor_copy(dst, flat) || atmoe_context_finish(ctx))
            break;
        double t = now_s() - t0;
        if (r > 0 && t < best)
            best = t;
    }
    atmoe_tensor_free(flat);
    atmoe_tensor_free(dst);
    return 2.0 * (double)count * 4 / best / 1e9;
}

typedef struct peer_out {
    double seconds_per_iteration, objective;
    int iterations, threads;
    char version[32];
} peer_out;

static int run_peer(const opts *o, const float *x, unsigned cus,
                    peer_out *p)
{
    char *script = find_data_file("peer_sklearn.py");
    if (script == NULL)
        return -1;
    char *python = find_program("ATMOE_BENCH_PYTHON", DEFAULT_PYTHON,
                                "the scikit-learn peer");
    if (python == NULL) {
        free(script);
        return -1;
    }
    char *dir = make_temp_dir();
    int rc = -1;
    char path[4096], n[32], d[32], k[32], it[32], threads[16];
    snprintf(path, sizeof path, "%s/points.f32", dir ? dir : "/nonexistent");
    FILE *f = dir ? fopen(path, "wb") : NULL;
    if (f == NULL || fwrite(x, sizeof *x, o->n * o->d, f) != o->n * o->d) {
        set_error("cannot write the peer's points to %s", path);
        if (f)
            fclose(f);
        goto out;
    }
    if (fclose(f) != 0) {
        set_error("cannot write the peer's points to %s", path);
        goto out;
    }
    snprintf(n, sizeof n, "%zu", o->n);
    snprintf(d, sizeof d, "%zu", o->d);
    snprintf(k, sizeof k, "%zu", o->k);
    snprintf(it, sizeof it, "%u", o->iterations);
    snprintf(threads, sizeof threads, "%u", cus);
    /* The same threads as the device, unless the caller chose. */
    if (getenv("OMP_NUM_THREADS") == NULL)
        setenv("OMP_NUM_THREADS", threads, 1);
    char *argv[] = {python, script, path, n, d, k, it, NULL};
    pid_t pid;
    FILE *out;
    if (spawn_program(argv, &pid, &out))
        goto out;
    char line[4096] = "";
    size_t got = fread(line, 1, sizeof line - 1, out);
    line[got] = '\0';
    fclose(out);
    int status = wait_program(pid);
    if (status != 0) {
        set_error("the peer exited with status %d", status);
        goto out;
    }
    json_error_t err;
    json_t *j = json_loads(line, 0, &err);
    if (j == NULL) {
        set_error("the peer printed no JSON: %s", err.text);
        goto out;
    }
    p->seconds_per_iteration =
        json_number_value(json_object_get(j, "seconds_per_iteration"));
    p->objective = json_number_value(json_object_get(j, "objective"));
    p->iterations = (int)json_integer_value(json_object_get(j, "iterations"));
    p->threads = (int)json_integer_value(json_object_get(j, "threads"));
    const char *v = json_string_value(json_object_get(j, "sklearn"));
    snprintf(p->version, sizeof p->version, "%s", v ? v : "?");
    json_decref(j);
    rc = 0;
out:
    if (dir)
        remove_temp_dir(dir);
    free(dir);
    free(python);
    free(script);
    return rc;
}

int main(int argc, char **argv)
{
    opts o = {0};
    if (parse(argc, argv, &o)) {
        fprintf(stderr, "atmoe-kmeans-bench: %s\n", errbuf);
        return usage(stderr, EXIT_USAGE);
    }
    atmoe_context *ctx;
    atmoe_status st = atmoe_context_new(o.device, &ctx);
    if (st != ATMOE_STATUS_OK) {
        fprintf(stderr, "atmoe-kmeans-bench: %s\n", atmoe_errmsg(NULL));
        return EXIT_RUNTIME;
    }
    atmoe_device_info info;
    atmoe_context_get_device(ctx, &info);
    float *x = make_points(&o);
    size_t xs[2] = {o.n, o.d}, cs[2] = {o.k, o.d};
    atmoe_tensor *tx = NULL, *tc = NULL;
    timing t = {{0}, 0};
    atmoe_kmeans_options ko = {.k = o.k, .max_iterations = o.iterations,
                               .tolerance = 0, .init_given = 1,
                               .progress = on_iteration, .user = &t};
    atmoe_kmeans_result r;
    double t0 = 0, t1 = 0;
    int rc = EXIT_RUNTIME;
    if ((st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, xs, &tx)) ||
        (st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, cs, &tc)) ||
        (st = atmoe_tensor_write(tx, x, o.n * o.d * sizeof *x)))
        goto fail;
    /* A warm-up run of one iteration builds the kernels and CLBlast's. */
    ko.max_iterations = 1;
    if ((st = atmoe_tensor_write(tc, x, o.k * o.d * sizeof *x)) ||
        (st = atmoe_kmeans(ctx, tx, &ko, tc, NULL, &r)))
        goto fail;
    ko.max_iterations = o.iterations;
    t.count = 0;
    if ((st = atmoe_tensor_write(tc, x, o.k * o.d * sizeof *x)))
        goto fail;
    t0 = now_s();
    if ((st = atmoe_kmeans(ctx, tx, &ko, tc, NULL, &r)))
        goto fail;
    t1 = now_s();
    double gbs = copy_gbs(ctx);
    /* Between the first and the last iteration's callbacks: whole
     * iterations, without the setup and the first assignment. */
    double per_it = t.count > 1 ? (t.t[t.count - 1] - t.t[0]) / (t.count - 1)
                                : (t1 - t0) / (t.count ? t.count : 1);
    double min_bytes = (double)o.n * o.d * 4;
    double eff = min_bytes / per_it / 1e9;
    printf("device          %s (%u compute units)\n", info.name,
           info.compute_units);
    printf("points          %zu x %zu, K = %zu (scale %s)\n", o.n, o.d, o.k,
           o.scale);
    printf("atmoe           %u iteration(s)%s, %.4f s per iteration "
           "(%.3f s the whole call), objective %.9g\n",
           r.iterations, r.converged ? " (converged)" : "", per_it, t1 - t0,
           r.objective);
    printf("bandwidth       %.2f GB/s of the points read once per "
           "iteration (%.0f MB), copy ceiling %.2f GB/s: %.1f%%\n",
           eff, min_bytes / 1e6, gbs, 100.0 * eff / gbs);
    rc = 0;
    if (o.peer) {
        peer_out p;
        if (run_peer(&o, x, info.compute_units, &p)) {
            fprintf(stderr, "atmoe-kmeans-bench: peer: %s\n", errbuf);
            rc = EXIT_RUNTIME;
        } else {
            printf("sklearn %-7s %d iteration(s), %.4f s per iteration, "
                   "objective %.9g, %d thread(s)\n",
                   p.version, p.iterations, p.seconds_per_iteration,
                   p.objective, p.threads);
            printf("ratio           sklearn / atmoe per iteration: %.2fx\n",
                   p.seconds_per_iteration / per_it);
        }
    }
    goto out;
fail:
    fprintf(stderr, "atmoe-kmeans-bench: %s: %s\n", atmoe_status_name(st),
            atmoe_errmsg(ctx));
out:
    atmoe_tensor_free(tx);
    atmoe_tensor_free(tc);
    atmoe_context_free(ctx);
    free(x);
    return rc;
}
