/* atmoe cluster EMBEDDINGS --k K --output CENTROIDS: k-means of a
 * safetensors file's embeddings [N, D] on the device, written as the
 * centroids [K, D] with the objective in the metadata; and atmoe cluster
 * --assign CENTROIDS EMBEDDINGS --output A: each embedding's cluster and
 * its scores C e.  Ctrl-C stops a clustering between iterations, and no
 * output file is written. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

static int cluster_usage(void)
{
    fprintf(stderr,
            "usage: atmoe cluster EMBEDDINGS.safetensors --k K --output "
            "CENTROIDS.safetensors\n"
            "         [--tensor NAME] [--seed S] [--restarts R] "
            "[--iterations I]\n"
            "         [--tolerance T] [--normalize] [--progress] "
            "[--device D]\n"
            "       atmoe cluster --assign CENTROIDS.safetensors "
            "EMBEDDINGS.safetensors\n"
            "         --output A.safetensors [--tensor NAME] [--normalize] "
            "[--device D]\n");
    return EXIT_USAGE;
}

/* An unsigned decimal within [lo, hi] for option name. */
static int parse_count(const char *name, const char *text, unsigned long long lo,
                       unsigned long long hi, unsigned long long *value)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (*text == '\0' || *text == '-' || *end != '\0' || errno == ERANGE ||
        v < lo || v > hi) {
        fprintf(stderr, "atmoe cluster: %s '%s' must be an integer from %llu "
                        "to %llu\n", name, text, lo, hi);
        return -1;
    }
    *value = v;
    return 0;
}

/* The embeddings [N, D] of tensor name in path, as f32, into a new tensor
 * of ctx. */
static int read_embeddings(atmoe_context *ctx, const char *path,
                           const char *name, atmoe_tensor **out)
{
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(ctx, path, &f);
    if (st != ATMOE_STATUS_OK)
        return cli_fail(path, st, ctx);
    atmoe_safetensors_tensor t;
    int rc = EXIT_OK;
    float *host = NULL;
    if ((st = atmoe_safetensors_find(f, name, &t)) != ATMOE_STATUS_OK) {
        rc = cli_fail(path, st, ctx);
    } else if (t.ndim != 2 || t.count == 0) {
        char shape[64] = "[]";
        if (t.ndim == 2)
            snprintf(shape, sizeof shape, "[%llu, %llu]",
                     (unsigned long long)t.shape[0],
                     (unsigned long long)t.shape[1]);
        else
            snprintf(shape, sizeof shape, "of %d dimension(s)", t.ndim);
        fprintf(stderr, "atmoe cluster: %s: tensor %s is %s, must be [N, D] "
                        "with N and D at least 1 (no embeddings to cluster)\n",
                path, name, shape);
        rc = EXIT_FAILED;
    } else if ((host = malloc(t.count * sizeof *host)) == NULL) {
        rc = cli_out_of_memory(path);
    } else if ((st = atmoe_safetensors_read_f32(f, name, host, t.count)) !=
               ATMOE_STATUS_OK) {
        rc = cli_fail(path, st, ctx);
    } else {
        size_t shape[2] = {(size_t)t.shape[0], (size_t)t.shape[1]};
        if ((st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, out)) ||
            (st = atmoe_tensor_write(*out, host, t.count * sizeof *host)))
            rc = cli_fail(path, st, ctx);
    }
    free(host);
    atmoe_safetensors_free(f);
    return rc;
}

typedef struct progress_state {
    int show;
} progress_state;

static int on_progress(const atmoe_kmeans_progress *p, void *user)
{
    const progress_state *s = user;
    if (s->show)
        fprintf(stderr, "atmoe cluster: run %u iteration %u objective %.9g "
                        "change %.3g%s\n", p->restart + 1, p->iteration,
                p->objective, p->change,
                p->reseeded ? " (empty clusters re-seeded)" : "");
    return interrupted != 0;
}

static int do_cluster(atmoe_context *ctx, const char *input,
                      const char *tensor, const char *output,
                      atmoe_kmeans_options *o, int show)
{
    atmoe_tensor *x = NULL, *c = NULL;
    int rc = read_embeddings(ctx, input, tensor, &x);
    if (rc != EXIT_OK)
        return rc;
    size_t shape[ATMOE_MAX_DIMS];
    int nd;
    atmoe_tensor_get_shape(x, &nd, shape);
    size_t cs[2] = {o->k, shape[1]};
    progress_state ps = {show};
    o->progress = on_progress;
    o->user = &ps;
    atmoe_kmeans_result r;
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old);
    atmoe_status st;
    if ((st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, cs, &c)) ||
        (st = atmoe_kmeans(ctx, x, o, c, NULL, &r))) {
        sigaction(SIGINT, &old, NULL);
        if (st == ATMOE_STATUS_CANCELLED)
            fprintf(stderr, "atmoe cluster: interrupted; %s not written\n",
                    output);
        rc = st == ATMOE_STATUS_CANCELLED ? EXIT_FAILED
                                          : cli_fail("k-means", st, ctx);
    } else {
        sigaction(SIGINT, &old, NULL);
        if ((st = atmoe_centroids_save(c, r.objective, output)))
            rc = cli_fail(output, st, ctx);
        else
            printf("%zu points, %zu clusters: objective %.9g after %u "
                   "iteration(s) (%s) of the best of %u run(s)%s\n",
                   shape[0], o->k, r.objective, r.iterations,
                   r.converged ? "converged" : "iteration cap", r.restarts,
                   r.reseeded ? ", empty clusters re-seeded" : "");
    }
    atmoe_tensor_free(c);
    atmoe_tensor_free(x);
    return rc;
}

static int do_assign(atmoe_context *ctx, const char *centroids,
                     const char *input, const char *tensor,
                     const char *output, int normalize)
{
    atmoe_tensor *c = NULL, *x = NULL, *a = NULL, *s = NULL;
    atmoe_safetensors_writer *w = NULL;
    int32_t *ha = NULL;
    float *hs = NULL;
    atmoe_status st = atmoe_centroids_load(ctx, centroids, &c, NULL);
    if (st != ATMOE_STATUS_OK)
        return cli_fail(centroids, st, ctx);
    int rc = read_embeddings(ctx, input, tensor, &x);
    size_t xs[ATMOE_MAX_DIMS], cs[ATMOE_MAX_DIMS];
    int nd;
    if (rc == EXIT_OK) {
        atmoe_tensor_get_shape(x, &nd, xs);
        atmoe_tensor_get_shape(c, &nd, cs);
        if (cs[1] != xs[1]) {
            fprintf(stderr, "atmoe cluster: %s holds centroids of width %zu, "
                            "%s embeddings of width %zu\n",
                    centroids, cs[1], input, xs[1]);
            rc = EXIT_FAILED;
        }
    }
    if (rc != EXIT_OK)
        goto out;
    size_t n = xs[0], k = cs[0];
    size_t ss[2] = {n, k};
    uint64_t an[1] = {n}, sn[2] = {n, k};
    ha = malloc(n * sizeof *ha);
    hs = malloc(n * k * sizeof *hs);
    if (ha == NULL || hs == NULL) {
        rc = cli_out_of_memory(output);
        goto out;
    }
    if ((normalize && (st = atmoe_embeddings_normalize(ctx, x, x))) ||
        (st = atmoe_tensor_new(ctx, ATMOE_DTYPE_I32, 1, xs, &a)) ||
        (st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, ss, &s)) ||
        (st = atmoe_kmeans_assign(ctx, c, x, a, s)) ||
        (st = atmoe_tensor_read(a, ha, n * sizeof *ha)) ||
        (st = atmoe_tensor_read(s, hs, n * k * sizeof *hs))) {
        rc = cli_fail("assigning", st, ctx);
        goto out;
    }
    if ((st = atmoe_safetensors_writer_new(ctx, &w)) ||
        (st = atmoe_safetensors_writer_add(w, "assignments",
                                           ATMOE_SAFETENSORS_I32, 1, an, ha)) ||
        (st = atmoe_safetensors_writer_add_f32(w, "scores",
                                               ATMOE_SAFETENSORS_F32, 2, sn,
                                               hs)) ||
        (st = atmoe_safetensors_writer_save(w, output)))
        rc = cli_fail(output, st, ctx);
    else
        printf("%zu points assigned to %zu clusters\n", n, k);
out:
    atmoe_safetensors_writer_free(w);
    free(ha);
    free(hs);
    atmoe_tensor_free(s);
    atmoe_tensor_free(a);
    atmoe_tensor_free(x);
    atmoe_tensor_free(c);
    return rc;
}

static int run(int argc, char **argv)
{
    const char *input = NULL, *output = NULL, *assign = NULL, *device = NULL;
    const char *tensor = "embeddings", *k = NULL, *seed = NULL;
    const char *restarts = NULL, *iterations = NULL, *tolerance = NULL;
    int normalize = 0, progress = isatty(STDERR_FILENO);
    for (int i = 1; i < argc; i++) {
        int r;
        if ((r = cli_option("cluster", argc, argv, &i, "--output", &output)) ||
            (r = cli_option("cluster", argc, argv, &i, "--assign", &assign)) ||
            (r = cli_option("cluster", argc, argv, &i, "--tensor", &tensor)) ||
            (r = cli_option("cluster", argc, argv, &i, "--k", &k)) ||
            (r = cli_option("cluster", argc, argv, &i, "--seed", &seed)) ||
            (r = cli_option("cluster", argc, argv, &i, "--restarts",
                            &restarts)) ||
            (r = cli_option("cluster", argc, argv, &i, "--iterations",
                            &iterations)) ||
            (r = cli_option("cluster", argc, argv, &i, "--tolerance",
                            &tolerance)) ||
            (r = cli_option("cluster", argc, argv, &i, "--device", &device))) {
            if (r < 0)
                return EXIT_USAGE;
        } else if (strcmp(argv[i], "--normalize") == 0) {
            normalize = 1;
        } else if (strcmp(argv[i], "--progress") == 0) {
            progress = 1;
        } else if (argv[i][0] == '-' || input) {
            fprintf(stderr, "atmoe cluster: unexpected argument '%s'\n",
                    argv[i]);
            return cluster_usage();
        } else {
            input = argv[i];
        }
    }
    if (input == NULL || output == NULL || (assign == NULL && k == NULL))
        return cluster_usage();
    if (assign && (k || seed || restarts || iterations || tolerance)) {
        fprintf(stderr, "atmoe cluster: --assign takes no clustering "
                        "options (--k, --seed, --restarts, --iterations, "
                        "--tolerance)\n");
        return EXIT_USAGE;
    }
    atmoe_kmeans_options o = {0};
    o.normalize = normalize;
    o.tolerance = 1e-4;
    unsigned long long v;
    if (k) {
        if (parse_count("--k", k, 1, SIZE_MAX, &v))
            return EXIT_USAGE;
        o.k = (size_t)v;
    }
    if (seed) {
        if (parse_count("--seed", seed, 0, UINT64_MAX, &v))
            return EXIT_USAGE;
        o.seed = v;
    }
    if (restarts) {
        if (parse_count("--restarts", restarts, 1, UINT_MAX, &v))
            return EXIT_USAGE;
        o.restarts = (unsigned)v;
    }
    if (iterations) {
        if (parse_count("--iterations", iterations, 1, UINT_MAX, &v))
            return EXIT_USAGE;
        o.max_iterations = (unsigned)v;
    }
    if (tolerance) {
        char *end;
        errno = 0;
        o.tolerance = strtod(tolerance, &end);
        if (*end != '\0' || end == tolerance || errno == ERANGE ||
            !(o.tolerance >= 0.0) || isinf(o.tolerance)) {
            fprintf(stderr, "atmoe cluster: --tolerance '%s' must be a "
                            "number of at least 0\n", tolerance);
            return EXIT_USAGE;
        }
    }
    atmoe_context *ctx;
    int rc = cli_open_device(device, &ctx);
    if (rc != EXIT_OK)
        return rc;
    rc = assign ? do_assign(ctx, assign, input, tensor, output, normalize)
                : do_cluster(ctx, input, tensor, output, &o, progress);
    atmoe_context_free(ctx);
    return rc;
}

const cli_command cmd_cluster = {
    "cluster", run,
    "EMBEDDINGS --k K --output C | --assign C EMBEDDINGS --output A",
};
