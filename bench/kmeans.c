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
 * read once (N D 4 bytes), over the measured seconds, as a fraction of the
 * device's read bandwidth, measured with atmoe-bench's own kernel
 * (bench/ceilings.cl).  An iteration reads the points twice (the fused
 * assignment, then the sums), so 50% of the ceiling is what it could
 * reach if it were bound by memory; at K = 32 its FLOPs bind it first on
 * a CPU. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <CL/cl.h>

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

/* Points uniform in [-1, 1)^D from the measure.h stream: no clusters to
 * find, so that Lloyd runs its iterations instead of settling after two,
 * and the timing is of whole iterations. */
static float *make_points(const opts *o)
{
    float *x = xcalloc(o->n * o->d, sizeof *x);
    uint64_t s = 12;
    for (size_t i = 0; i < o->n * o->d; i++)
        x[i] = (float)uniform(&s);
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

/* The device's read bandwidth, measured as atmoe-bench measures it: the
 * read_bandwidth kernel of bench/ceilings.cl over a buffer twice the
 * points' size, at least 256 MiB (past any cache) and at most 1 GiB (less
 * where the device holds less), 8 work-groups per compute unit of 256 or
 * 1 work-items, whichever runs faster, the best of five timed runs after
 * a warm-up.  Bytes per second, or NaN with errbuf set. */
static double read_gbs(const atmoe_device_info *info, uint64_t points)
{
    cl_platform_id plats[16];
    cl_uint np = 0;
    cl_device_id dev = NULL;
    size_t seen = 0;
    clGetPlatformIDs(16, plats, &np);
    for (cl_uint i = 0; i < np && dev == NULL; i++) {
        cl_device_id ids[64];
        cl_uint nd = 0;
        if (clGetDeviceIDs(plats[i], CL_DEVICE_TYPE_ALL, 64, ids, &nd))
            continue;
        if (info->index < seen + nd)
            dev = ids[info->index - seen];
        seen += nd;
    }
    if (dev == NULL) {
        set_error("device %zu is not in the OpenCL device list",
                  info->index);
        return NAN;
    }
    char *path = find_data_file("ceilings.cl");
    size_t size = 0;
    char *text = NULL;
    FILE *f = path ? fopen(path, "rb") : NULL;
    if (f) {
        fseek(f, 0, SEEK_END);
        size = (size_t)ftell(f);
        rewind(f);
        text = xcalloc(size + 1, 1);
        if (fread(text, 1, size, f) != size)
            size = 0;
        fclose(f);
    }
    free(path);
    if (size == 0) {
        free(text);
        if (path)
            set_error("cannot read ceilings.cl");
        return NAN;
    }
    cl_int err;
    double gbs = NAN;
    cl_context cx = clCreateContext(NULL, 1, &dev, NULL, NULL, &err);
    cl_command_queue q = err ? NULL : clCreateCommandQueue(cx, dev, 0, &err);
    const char *src = text;
    cl_program prog =
        err ? NULL : clCreateProgramWithSource(cx, 1, &src, &size, &err);
    if (!err)
        err = clBuildProgram(prog, 1, &dev, "-DVEC=4", NULL, NULL);
    cl_kernel k = err ? NULL : clCreateKernel(prog, "read_bandwidth", &err);
    uint64_t bytes = 2 * points;
    if (bytes < (uint64_t)256 << 20)
        bytes = (uint64_t)256 << 20;
    if (bytes > (uint64_t)1 << 30)
        bytes = (uint64_t)1 << 30;
    if (bytes > info->max_alloc_bytes)
        bytes = info->max_alloc_bytes;
    if (bytes > info->global_mem_bytes / 2)
        bytes = info->global_mem_bytes / 2;
    size_t groups = 8 * (info->compute_units ? info->compute_units : 1);
    size_t locals[2] = {info->max_work_group_size < 256
                            ? info->max_work_group_size
                            : 256,
                        1};
    cl_ulong per_group = bytes / 16 / groups;
    per_group -= per_group % (4 * locals[0]);
    bytes = per_group * groups * 16;
    cl_mem in = err ? NULL
                    : clCreateBuffer(cx, CL_MEM_READ_ONLY, bytes, NULL, &err);
    cl_mem out = err ? NULL
                     : clCreateBuffer(cx, CL_MEM_WRITE_ONLY,
                                      groups * locals[0] * sizeof(float),
                                      NULL, &err);
    float one = 1.0f;
    if (!err)
        err = clEnqueueFillBuffer(q, in, &one, sizeof one, 0, bytes, 0, NULL,
                                  NULL);
    if (!err)
        err = clSetKernelArg(k, 0, sizeof in, &in);
    if (!err)
        err = clSetKernelArg(k, 1, sizeof per_group, &per_group);
    if (!err)
        err = clSetKernelArg(k, 2, sizeof out, &out);
    double best = INFINITY;
    for (int l = 0; l < 2 && !err; l++) {
        size_t global = groups * locals[l];
        for (int r = 0; r < 6 && !err; r++) {
            double t0 = now_s();
            err = clEnqueueNDRangeKernel(q, k, 1, NULL, &global, &locals[l],
                                         0, NULL, NULL);
            if (!err)
                err = clFinish(q);
            double t = now_s() - t0;
            if (r > 0 && t < best)
                best = t;
        }
    }
    if (err)
        set_error("the read-bandwidth kernel failed (OpenCL error %d)", err);
    else
        gbs = (double)bytes / best / 1e9;
    if (in)
        clReleaseMemObject(in);
    if (out)
        clReleaseMemObject(out);
    if (k)
        clReleaseKernel(k);
    if (prog)
        clReleaseProgram(prog);
    if (q)
        clReleaseCommandQueue(q);
    if (cx)
        clReleaseContext(cx);
    free(text);
    return gbs;
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
    /* Between the first and the last iteration's callbacks: whole
     * iterations, without the setup and the first assignment. */
    double per_it = t.count > 1 ? (t.t[t.count - 1] - t.t[0]) / (t.count - 1)
                                : (t1 - t0) / (t.count ? t.count : 1);
    unsigned timed = t.count;
    /* k-means++ seeding, once: a run of one iteration from the seeds; its
     * first callback comes after the seeding, the first assignment and
     * one iteration. */
    atmoe_kmeans_options so = ko;
    so.init_given = 0;
    so.max_iterations = 1;
    so.seed = 1;
    t.count = 0;
    double s0 = now_s();
    if ((st = atmoe_kmeans(ctx, tx, &so, tc, NULL, NULL)))
        goto fail;
    double seeding = t.t[0] - s0 - per_it;
    double gbs = read_gbs(&info, (uint64_t)o.n * o.d * 4);
    if (isnan(gbs))
        fprintf(stderr, "atmoe-kmeans-bench: no read ceiling: %s\n",
                errbuf);
    double min_bytes = (double)o.n * o.d * 4;
    double eff = min_bytes / per_it / 1e9;
    printf("device          %s (%u compute units)\n", info.name,
           info.compute_units);
    printf("points          %zu x %zu, K = %zu (scale %s)\n", o.n, o.d, o.k,
           o.scale);
    printf("atmoe           %u iteration(s)%s, %.4f s per iteration "
           "(%.3f s the whole call), objective %.9g\n",
           timed, r.converged ? " (converged)" : "", per_it, t1 - t0,
           r.objective);
    printf("seeding         k-means++ %.3f s (%zu passes over the points, "
           "and the first assignment)\n", seeding, o.k - 1);
    printf("bandwidth       %.2f GB/s of the points read once per "
           "iteration (%.0f MB), read ceiling %.2f GB/s: %.1f%%\n",
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
