/* atmoe-tune: searches CLBlast's SGEMM kernel parameters for one device and
 * stores the best set in a tuning database (see atmoe-tune(1)).
 *
 * The GEMM timed is the library's base projection, y = x W^T with x
 * [T, d] and W [d, d] row-major (atmoe_graph_matmul with
 * ATMOE_MATMUL_TRANSPOSE_B), for T = 16, 64 and 512 at d = 1024 ("small")
 * and d = 4096 ("full").  The search runs in phases, each a random sample of
 * one kernel's space under a share of the time budget:
 *
 *   baseline  CLBlast's built-in parameters (the process starts with
 *             ATMOE_PARAMS=default); their results, checked against float64
 *             on sampled elements, are the reference for every candidate
 *   xgemm     Xgemm sets, every shape forced onto the indirect path (the
 *             kernel that needs its operands copied, padded and transposed)
 *   direct    XgemmDirect sets with the best Xgemm, every shape of at most
 *             64 x 4096 x 4096 forced onto the direct path (one kernel that
 *             reads the operands as they are)
 *   final     the best of both with the XGEMM_MIN_INDIRECT_SIZE that sends
 *             each shape to its faster path, timed and checked again
 *
 * A candidate counts only when every shape it ran matches the reference; its
 * time per shape is the median of --runs runs after one warm-up, measured by
 * the wall clock around atmoe_graph_compute() and atmoe_context_finish().
 * Candidates are ranked by the geometric mean over the shapes of their
 * speed-up over the baseline.  Parameter spaces and constraints are those of
 * CLBlast's own tuners; the library checks each set
 * (atmoe_context_set_params refuses one that breaks a constraint), so the
 * sampler draws until a set is accepted.
 *
 * Only the public API of include/atmoe.h is used, and jansson for the sets. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <jansson.h>

#include "atmoe.h"

#define PROGRAM "atmoe-tune"
#define EXIT_RUNTIME 1
#define EXIT_USAGE 2

#define MAX_SHAPES 6
#define MAX_TRIED 4096
#define SAMPLE_CHECKS 64
/* Largest |y - ref| over the largest |ref|: summation order differs
 * between kernels by far less; a wrong tile is off by O(1). */
#define REF_TOL 1e-4
/* |y - exact| over sum |x w| for the float64 samples of the baseline. */
#define EXACT_TOL 1e-4
/* A shape whose first timed run is this much slower than the best known
 * for it is not timed further. */
#define PRUNE_FACTOR 2.0
#define MIN_SAMPLE_S 0.1
/* Forces every shape onto one path through XGEMM_MIN_INDIRECT_SIZE: GEMMs
 * with m n k below its cube run the direct kernel. */
#define ALL_INDIRECT 0
#define ALL_DIRECT (1 << 20)
#define DIRECT_MAX_WORK (64.0 * 4096 * 4096)
/* A set is kept only when it beats CLBlast's defaults by more than this
 * factor: less is within the noise of a few runs. */
#define MIN_GAIN 1.03
/* ... and when no shape it was searched on is slower than with CLBlast's
 * defaults by more than this factor: a geometric mean alone would trade a
 * shape's loss for another's gain. */
#define NO_HARM 1.10

/* ------------------------------------------------------------------------ */
/* Options and helpers                                                       */
/* ------------------------------------------------------------------------ */

typedef struct options {
    const char *device;
    const char *output; /* NULL: the user's database */
    double budget_s;
    int runs;
    int direct;
    int compare_layout;
    int dry_run;
    int quiet;
    int small, full;
    unsigned long seed;
    int cpu_clock;
} options;

static int quiet;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    if (quiet)
        return;
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static int lib_fail(const atmoe_context *ctx, atmoe_status st,
                    const char *what)
{
    fprintf(stderr, PROGRAM ": %s: %s: %s\n", what, atmoe_status_name(st),
            atmoe_errmsg(ctx));
    return EXIT_RUNTIME;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Processor time of the whole process (the driver's worker threads
 * included), user and system. */
static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec +
           (double)ru.ru_stime.tv_sec + 1e-6 * (double)ru.ru_stime.tv_usec;
}

/* With --clock cpu a run's time is the processor time it took over the
 * device's compute units: what it would take alone on a CPU device whose
 * cores it keeps busy, however many other processes share them. */
static int use_cpu_clock;
static double cpu_units = 1;

static double clock_s(void)
{
    return use_cpu_clock ? cpu_s() / cpu_units : now_s();
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* splitmix64: reproducible from --seed on every platform. */
static uint64_t rng_state;

static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rng_uniform(void)
{
    return (float)((double)(rng_next() >> 11) * 0x1p-53 * 2.0 - 1.0);
}

static int pick(const int *values, int n)
{
    return values[rng_next() % (uint64_t)n];
}

/* ------------------------------------------------------------------------ */
/* Shapes: data, graphs, references                                          */
/* ------------------------------------------------------------------------ */

typedef struct shape {
    size_t t, d;
    float *x;         /* [t, d] */
    float *ref;       /* [t, d]: the baseline's result */
    atmoe_tensor *w;  /* [d, d] as W, shared by the shapes of one d */
    atmoe_tensor *wt; /* [d, d] as W^T, for --compare-layout */
    int owns_w;
    int base_direct;  /* the baseline ran the direct kernel */
    double base_s, base_nn_s, final_nn_s;
} shape;

static double gflops(const shape *s, double seconds)
{
    return 2.0 * (double)s->t * (double)s->d * (double)s->d / seconds * 1e-9;
}

/* One shape's result: its median time, or why it has none. */
typedef enum outcome { RUN_OK, RUN_SLOW, RUN_WRONG, RUN_FAILED } outcome;

typedef struct timing {
    outcome out;
    double s;      /* median seconds (RUN_OK) */
    double err;    /* normalised difference from the reference */
    size_t scratch; /* CLBlast scratch bytes the plan reserved */
} timing;

/* The graph y = x W^T (or x W^T held as W^T with transposed = 0). */
static atmoe_status build_graph(atmoe_context *ctx, const shape *s,
                                int transposed, atmoe_graph **out,
                                atmoe_node *xn, atmoe_node *yn)
{
    atmoe_graph *g;
    atmoe_status st = atmoe_graph_new(ctx, &g);
    if (st != ATMOE_STATUS_OK)
        return st;
    size_t shape_x[2] = {s->t, s->d};
    atmoe_node wn;
    if ((st = atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, shape_x, 0, xn)) ||
        (st = atmoe_graph_parameter(g, "w", transposed ? s->w : s->wt, &wn)) ||
        (st = atmoe_graph_matmul(g, *xn, wn, ATMOE_NODE_NONE,
                                 transposed ? ATMOE_MATMUL_TRANSPOSE_B : 0,
                                 yn)) ||
        (st = atmoe_graph_output(g, *yn)) || (st = atmoe_graph_plan(g, 0))) {
        atmoe_graph_free(g);
        return st;
    }
    *out = g;
    return ATMOE_STATUS_OK;
}

static double max_diff(const float *y, const float *ref, size_t n)
{
    double worst = 0, scale = 1e-30;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)y[i] - (double)ref[i]);
        if (!(d <= worst))
            worst = isnan(d) ? INFINITY : d;
        if (fabs((double)ref[i]) > scale)
            scale = fabs((double)ref[i]);
    }
    return worst / scale;
}

/* Sampled elements of y against float64 dot products. */
static double exact_diff(const shape *s, const float *y, const float *w)
{
    double worst = 0;
    for (int k = 0; k < SAMPLE_CHECKS; k++) {
        size_t i = rng_next() % s->t, j = rng_next() % s->d;
        double dot = 0, mag = 1e-30;
        for (size_t c = 0; c < s->d; c++) {
            double p = (double)s->x[i * s->d + c] * (double)w[j * s->d + c];
            dot += p;
            mag += fabs(p);
        }
        double e = fabs((double)y[i * s->d + j] - dot) / mag;
        if (!(e <= worst))
            worst = isnan(e) ? INFINITY : e;
    }
    return worst;
}

/* Runs shape s once as planned and times it; ref NULL keeps the result as
 * the reference.  best is the fastest time known for the shape (0: none). */
static timing run_shape(atmoe_context *ctx, shape *s, int transposed,
                        int runs, double best)
{
    timing r = {RUN_FAILED, 0, 0, 0};
    atmoe_graph *g;
    atmoe_node xn, yn;
    atmoe_status st = build_graph(ctx, s, transposed, &g, &xn, &yn);
    if (st != ATMOE_STATUS_OK) {
        say("      T=%zu d=%zu: %s: %s\n", s->t, s->d, atmoe_status_name(st),
            atmoe_errmsg(ctx));
        return r;
    }
    size_t n = s->t * s->d;
    float *y = malloc(n * sizeof *y);
    double times[64];
    atmoe_graph_memory mem;
    if (y == NULL || atmoe_graph_get_memory(g, &mem) != ATMOE_STATUS_OK)
        goto out;
    r.scratch = (size_t)mem.gemm_scratch_bytes;
    for (size_t i = 0; i < n; i++)
        y[i] = NAN;
    double t_first = now_s();
    if ((st = atmoe_graph_set_input(g, xn, s->x, n * sizeof *s->x, 0)) ||
        (st = atmoe_graph_compute(g, 0)) ||
        (st = atmoe_graph_read(g, yn, y, n * sizeof *y))) {
        say("      T=%zu d=%zu: %s: %s\n", s->t, s->d, atmoe_status_name(st),
            atmoe_errmsg(ctx));
        goto out;
    }
    if (s->ref == NULL) {
        s->ref = y;
        y = NULL;
    } else {
        r.err = max_diff(y, s->ref, n);
        if (!(r.err <= REF_TOL)) {
            r.out = RUN_WRONG;
            goto out;
        }
    }
    /* A sample lasts at least MIN_SAMPLE_S, so that short GEMMs are timed
     * well above the clock's resolution (the processor clock advances in
     * scheduler ticks). */
    t_first = now_s() - t_first;
    int inner = t_first >= MIN_SAMPLE_S ? 1 : (int)ceil(MIN_SAMPLE_S / t_first);
    if (inner > 1000)
        inner = 1000;
    for (int k = 0; k < runs; k++) {
        double t0 = clock_s();
        for (int j = 0; j < inner; j++)
            if ((st = atmoe_graph_compute(g, 0)) != ATMOE_STATUS_OK)
                break;
        if (st != ATMOE_STATUS_OK || (st = atmoe_context_finish(ctx))) {
            say("      T=%zu d=%zu: %s: %s\n", s->t, s->d,
                atmoe_status_name(st), atmoe_errmsg(ctx));
            goto out;
        }
        times[k] = (clock_s() - t0) / inner;
        if (k == 0 && best > 0 && times[0] > PRUNE_FACTOR * best) {
            r.out = RUN_SLOW;
            r.s = times[0];
            goto out;
        }
    }
    r.s = median(times, runs);
    r.out = RUN_OK;
out:
    free(y);
    atmoe_graph_free(g);
    return r;
}

/* ------------------------------------------------------------------------ */
/* Candidates                                                                */
/* ------------------------------------------------------------------------ */

typedef struct result {
    json_t *set;      /* {"clblast": {...}} */
    timing t[MAX_SHAPES];
    double score;     /* geometric-mean speed-up over the baseline */
    int valid;
} result;

typedef struct tuner {
    atmoe_context *ctx;
    options opt;
    shape shapes[MAX_SHAPES];
    int nshapes;
    double start, deadline;
    double other[MAX_SHAPES]; /* the other path's time per shape, or 0 */
    char *tried[MAX_TRIED];
    int ntried;
    int evaluated, refused, wrong, failed;
} tuner;

static int seen(tuner *tu, const char *text)
{
    for (int i = 0; i < tu->ntried; i++)
        if (strcmp(tu->tried[i], text) == 0)
            return 1;
    if (tu->ntried < MAX_TRIED)
        tu->tried[tu->ntried++] = strdup(text);
    return 0;
}

static json_t *with_threshold(json_t *clblast, int min_indirect)
{
    json_object_set_new(clblast, "GemmRoutine",
                        json_pack("{s:i}", "XGEMM_MIN_INDIRECT_SIZE",
                                  min_indirect));
    return json_pack("{s:o}", "clblast", clblast);
}

/* The space of CLBlast's tuner for the Xgemm kernel (GEMMK 0, variation 2)
 * and for its GEMMK 1 kernel (variation 12, square tiles: see the library's
 * constraints). */
static json_t *sample_xgemm(void)
{
    static const int mwg0[] = {16, 32, 64, 128}, kwg0[] = {16, 32},
                     dim0[] = {8, 16, 32}, vw[] = {1, 2, 4, 8},
                     flag[] = {0, 1};
    static const int mwg1[] = {8, 16, 32, 64, 128}, dim1[] = {2, 4, 8, 16, 32},
                     kreg[] = {1, 2, 4, 8, 16};
    if (rng_next() % 2 == 0)
        return json_pack(
            "{s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, "
            "s:i, s:i, s:i, s:i}",
            "GEMMK", 0, "KREG", 1, "KWG", pick(kwg0, 2), "KWI", 2, "MDIMA",
            pick(dim0, 3), "MDIMC", pick(dim0, 3), "MWG", pick(mwg0, 4),
            "NDIMB", pick(dim0, 3), "NDIMC", pick(dim0, 3), "NWG",
            pick(mwg0, 4), "SA", pick(flag, 2), "SB", pick(flag, 2), "STRM",
            pick(flag, 2), "STRN", pick(flag, 2), "VWM", pick(vw, 4), "VWN",
            pick(vw, 4));
    int mdim = pick(dim1, 5), ndim = pick(dim1, 5), wg = pick(mwg1, 5);
    return json_pack(
        "{s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, "
        "s:i, s:i, s:i}",
        "GEMMK", 1, "KREG", pick(kreg, 5), "KWG", 1, "KWI", 1, "MDIMA", mdim,
        "MDIMC", mdim, "MWG", wg, "NDIMB", ndim, "NDIMC", ndim, "NWG", wg,
        "SA", 0, "SB", 0, "STRM", 0, "STRN", 0, "VWM",
        pick(vw, 4), "VWN", pick(vw, 4));
}

/* The space of CLBlast's XgemmDirect tuner (variation 2). */
static json_t *sample_direct(void)
{
    static const int wgd[] = {8, 16, 32, 64}, dim[] = {8, 16, 32},
                     kwid[] = {2, 8, 16}, vw[] = {1, 2, 4, 8}, flag[] = {0, 1};
    return json_pack("{s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i}",
                     "KWID", pick(kwid, 3), "MDIMAD", pick(dim, 3), "MDIMCD",
                     pick(dim, 3), "NDIMBD", pick(dim, 3), "NDIMCD",
                     pick(dim, 3), "PADA", pick(flag, 2), "PADB",
                     pick(flag, 2), "VWMD", pick(vw, 4), "VWND", pick(vw, 4),
                     "WGD", pick(wgd, 4));
}

/* A search phase times one path; a shape will in the end run on whichever
 * path is faster, so a candidate is scored by the time its shape would
 * take: its own, or the other path's (tu->other) when that is faster. */
static void score(tuner *tu, result *r)
{
    double logsum = 0;
    int n = 0;
    for (int i = 0; i < tu->nshapes; i++) {
        double t = r->t[i].out == RUN_OK || r->t[i].out == RUN_SLOW
                       ? r->t[i].s
                       : 0;
        if (tu->other[i] > 0 && (t == 0 || tu->other[i] < t))
            t = tu->other[i];
        if (t > 0) {
            logsum += log(tu->shapes[i].base_s / t);
            n++;
        }
    }
    r->score = n ? exp(logsum / n) : 0;
}

/* Applies set and runs the shapes that want(shape) selects; best holds the
 * fastest time known per shape.  0 when the library refused the set. */
static int evaluate(tuner *tu, json_t *set, const char *label,
                    int (*want)(const shape *), const double *best,
                    result *r)
{
    memset(r, 0, sizeof *r);
    char *text = json_dumps(set, JSON_COMPACT | JSON_SORT_KEYS);
    if (text == NULL)
        return 0;
    atmoe_status st = atmoe_context_set_params(tu->ctx, text);
    free(text);
    if (st != ATMOE_STATUS_OK) {
        tu->refused++;
        return 0;
    }
    tu->evaluated++;
    r->set = json_incref(set);
    r->valid = 1;
    double t0 = now_s();
    say("  %-8s", label);
    for (int i = 0; i < tu->nshapes; i++) {
        shape *s = &tu->shapes[i];
        if (want && !want(s)) {
            r->t[i].out = RUN_FAILED;
            say("        -");
            continue;
        }
        r->t[i] = run_shape(tu->ctx, s, 1, tu->opt.runs, best ? best[i] : 0);
        switch (r->t[i].out) {
        case RUN_OK:
            say(" %8.1f", gflops(s, r->t[i].s));
            break;
        case RUN_SLOW:
            say("     slow");
            break;
        case RUN_WRONG:
            say("    WRONG");
            r->valid = 0;
            break;
        case RUN_FAILED:
            say("   failed");
            r->valid = 0;
            break;
        }
        if (!r->valid)
            break;
    }
    int wrong = 0;
    for (int i = 0; i < tu->nshapes; i++)
        if (r->t[i].out == RUN_WRONG) {
            say("  (off by %.1e)", r->t[i].err);
            wrong = 1;
        }
    if (r->valid)
        score(tu, r);
    else if (wrong)
        tu->wrong++;
    else
        tu->failed++;
    say("  %s%.2fx  %.0f s\n", r->valid ? "" : "rejected ",
        r->valid ? r->score : 0.0, now_s() - t0);
    return 1;
}

static void result_clear(result *r)
{
    json_decref(r->set);
    memset(r, 0, sizeof *r);
}

static int direct_shape(const shape *s)
{
    return (double)s->t * (double)s->d * (double)s->d <= DIRECT_MAX_WORK;
}

/* Samples kernel sets with make() until the phase's deadline; best holds
 * the best result so far (its set the clblast object passed to wrap). */
static void search(tuner *tu, const char *label, double deadline,
                   json_t *(*make)(void), const char *kernel,
                   const json_t *fixed, int min_indirect,
                   int (*want)(const shape *), result *best)
{
    double fastest[MAX_SHAPES];
    for (int i = 0; i < tu->nshapes; i++)
        fastest[i] = tu->shapes[i].base_s;
    int first = 1;
    while (first || now_s() < deadline) {
        json_t *params = NULL;
        char *text = NULL;
        for (int tries = 0; tries < 100000 && params == NULL; tries++) {
            params = make();
            free(text);
            text = json_dumps(params, JSON_COMPACT | JSON_SORT_KEYS);
            json_t *cl = json_deep_copy(fixed);
            json_object_set(cl, kernel, params);
            json_t *set = with_threshold(cl, min_indirect);
            char *full = json_dumps(set, JSON_COMPACT | JSON_SORT_KEYS);
            atmoe_status st = atmoe_context_set_params(tu->ctx, full);
            free(full);
            json_decref(set);
            if (st != ATMOE_STATUS_OK)
                tu->refused++;
            if (st != ATMOE_STATUS_OK || seen(tu, text)) {
                json_decref(params);
                params = NULL;
            }
        }
        free(text);
        if (params == NULL)
            break;
        text = json_dumps(params, JSON_COMPACT | JSON_SORT_KEYS);
        say("  %s %s\n", kernel, text ? text : "");
        free(text);
        json_t *cl = json_deep_copy(fixed);
        json_object_set_new(cl, kernel, params);
        json_t *set = with_threshold(cl, min_indirect);
        result r;
        if (evaluate(tu, set, label, want, fastest, &r) && r.valid &&
            r.score > best->score) {
            result_clear(best);
            *best = r;
            for (int i = 0; i < tu->nshapes; i++)
                if (r.t[i].out == RUN_OK && r.t[i].s < fastest[i])
                    fastest[i] = r.t[i].s;
        } else {
            result_clear(&r);
        }
        json_decref(set);
        first = 0;
    }
}

/* How the final set routes shapes: CLBlast's own threshold (no
 * GemmRoutine set; every shape on the baseline's path), or a threshold of
 * our own, with CLBlast's XgemmDirect parameters or the best found. */
typedef struct route {
    int own_threshold; /* 0: CLBlast's */
    int threshold;
    int tuned_direct;
    double logsum;     /* sum over shapes of log(speed-up) */
} route;

static double shape_mnk(const shape *s)
{
    return (double)s->t * (double)s->d * (double)s->d;
}

static int timed(const timing *t)
{
    return t->out == RUN_OK || t->out == RUN_SLOW;
}

/* Scores a routing: every shape must have a time on its path and be no
 * more than NO_HARM slower than the baseline, or the routing is out. */
static int score_route(const tuner *tu, const result *indirect,
                       const result *direct, route *r)
{
    r->logsum = 0;
    for (int i = 0; i < tu->nshapes; i++) {
        const shape *s = &tu->shapes[i];
        int go_direct = r->own_threshold
                            ? shape_mnk(s) < (double)r->threshold *
                                                 r->threshold * r->threshold
                            : s->base_direct;
        const timing *t = go_direct ? &direct->t[i] : &indirect->t[i];
        if (!timed(t) || t->s > NO_HARM * s->base_s)
            return 0;
        r->logsum += log(s->base_s / t->s);
    }
    return 1;
}

/* The best routing for the best Xgemm set (and XgemmDirect set, when the
 * direct phase found one).  Thresholds are tried only at measured shapes:
 * each shape in turn is the smallest that runs indirect, or every measured
 * shape runs direct and only larger GEMMs indirect.  GEMMs smaller than
 * every measured shape (the library's expert and router GEMMs) thus stay
 * direct.  0 when no routing keeps every shape within NO_HARM of the
 * baseline. */
static int pick_route(const tuner *tu, const result *indirect,
                      const result *direct, route *best)
{
    /* CLBlast's XgemmDirect parameters keep the baseline's direct times. */
    result builtin;
    memset(&builtin, 0, sizeof builtin);
    for (int i = 0; i < tu->nshapes; i++)
        builtin.t[i] = tu->shapes[i].base_direct
                           ? (timing){RUN_OK, tu->shapes[i].base_s, 0, 0}
                           : (timing){RUN_FAILED, 0, 0, 0};
    int found = 0;
    route r = {0, 0, 0, 0};
    if (score_route(tu, indirect, &builtin, &r)) {
        *best = r;
        found = 1;
    }
    double top = 0;
    for (int i = 0; i < tu->nshapes; i++)
        if (shape_mnk(&tu->shapes[i]) > top)
            top = shape_mnk(&tu->shapes[i]);
    for (int dset = 0; dset < (direct->set ? 2 : 1); dset++) {
        for (int c = -1; c < tu->nshapes; c++) {
            r.own_threshold = 1;
            r.tuned_direct = dset;
            r.threshold = (int)floor(cbrt(c < 0 ? top
                                                : shape_mnk(&tu->shapes[c])));
            if (c < 0)
                r.threshold++;
            if (score_route(tu, indirect, dset ? direct : &builtin, &r) &&
                (!found || r.logsum > best->logsum)) {
                *best = r;
                found = 1;
            }
        }
    }
    return found;
}

/* Whether every shape of r ran within NO_HARM of the baseline. */
static int harmless(const tuner *tu, const result *r)
{
    for (int i = 0; i < tu->nshapes; i++)
        if (r->t[i].out != RUN_OK ||
            r->t[i].s > NO_HARM * tu->shapes[i].base_s)
            return 0;
    return 1;
}

/* ------------------------------------------------------------------------ */
/* The run                                                                   */
/* ------------------------------------------------------------------------ */

static int setup_shapes(tuner *tu)
{
    static const size_t ts[] = {16, 64, 512};
    size_t ds[2];
    int nd = 0;
    if (tu->opt.small)
        ds[nd++] = 1024;
    if (tu->opt.full)
        ds[nd++] = 4096;
    for (int k = 0; k < nd; k++) {
        size_t d = ds[k], shp[2] = {d, d};
        float *w = malloc(d * d * sizeof *w), *wt = NULL;
        atmoe_tensor *tw = NULL, *twt = NULL;
        atmoe_status st;
        if (w == NULL)
            return EXIT_RUNTIME;
        for (size_t i = 0; i < d * d; i++)
            w[i] = rng_uniform();
        if ((st = atmoe_tensor_new(tu->ctx, ATMOE_DTYPE_F32, 2, shp, &tw)) ||
            (st = atmoe_tensor_write(tw, w, d * d * sizeof *w))) {
            free(w);
            return lib_fail(tu->ctx, st, "making the weight");
        }
        if (tu->opt.compare_layout) {
            wt = malloc(d * d * sizeof *wt);
            if (wt == NULL)
                return EXIT_RUNTIME;
            for (size_t i = 0; i < d; i++)
                for (size_t j = 0; j < d; j++)
                    wt[j * d + i] = w[i * d + j];
            if ((st = atmoe_tensor_new(tu->ctx, ATMOE_DTYPE_F32, 2, shp,
                                       &twt)) ||
                (st = atmoe_tensor_write(twt, wt, d * d * sizeof *wt))) {
                free(w);
                free(wt);
                return lib_fail(tu->ctx, st, "making the transposed weight");
            }
            free(wt);
        }
        for (int j = 0; j < 3; j++) {
            shape *s = &tu->shapes[tu->nshapes++];
            memset(s, 0, sizeof *s);
            s->t = ts[j];
            s->d = d;
            s->w = tw;
            s->wt = twt;
            s->owns_w = j == 0;
            s->x = malloc(s->t * d * sizeof *s->x);
            if (s->x == NULL) {
                free(w);
                return EXIT_RUNTIME;
            }
            for (size_t i = 0; i < s->t * d; i++)
                s->x[i] = rng_uniform();
        }
        /* The baseline is the reference, so it is checked against float64
         * first (on sampled elements; a full float64 GEMM at d = 4096 would
         * take minutes). */
        for (int j = tu->nshapes - 3; j < tu->nshapes; j++) {
            shape *s = &tu->shapes[j];
            timing t = run_shape(tu->ctx, s, 1, tu->opt.runs, 0);
            if (t.out != RUN_OK) {
                free(w);
                fprintf(stderr, PROGRAM ": the baseline GEMM at T=%zu d=%zu "
                        "failed\n", s->t, d);
                return EXIT_RUNTIME;
            }
            double e = exact_diff(s, s->ref, w);
            if (!(e <= EXACT_TOL)) {
                free(w);
                fprintf(stderr, PROGRAM ": CLBlast's own result at T=%zu "
                        "d=%zu is off float64 by %.2e: nothing to tune "
                        "against\n", s->t, d, e);
                return EXIT_RUNTIME;
            }
            s->base_s = t.s;
            s->base_direct = t.scratch == 0;
            say("  baseline T=%-4zu d=%zu  %8.1f GFLOP/s  %s path  (float64 "
                "check %.1e)\n", s->t, d, gflops(s, t.s),
                s->base_direct ? "direct" : "indirect", e);
            if (tu->opt.compare_layout) {
                timing nn = run_shape(tu->ctx, s, 0, tu->opt.runs, 0);
                s->base_nn_s = nn.out == RUN_OK ? nn.s : 0;
            }
        }
        free(w);
    }
    return 0;
}

/* The entry of the output database for this device, as a candidate. */
static json_t *previous_set(const char *path, const atmoe_device_info *dev)
{
    json_t *root = json_load_file(path, 0, NULL), *found = NULL;
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(root, "entries"), i, e) {
        const char *dn = json_string_value(json_object_get(e, "device"));
        const char *dr = json_string_value(json_object_get(e, "driver"));
        json_t *cl = json_object_get(e, "clblast");
        if (dn && dr && strcmp(dn, dev->name) == 0 &&
            strcmp(dr, dev->driver_version) == 0 && json_object_size(cl) > 0)
            found = json_pack("{s:O}", "clblast", cl);
    }
    json_decref(root);
    return found;
}

static json_t *shape_report(const tuner *tu, const result *final)
{
    json_t *arr = json_array();
    for (int i = 0; i < tu->nshapes; i++) {
        const shape *s = &tu->shapes[i];
        json_t *o = json_pack("{s:I, s:I, s:f}", "T", (json_int_t)s->t, "d",
                              (json_int_t)s->d, "default_gflops",
                              gflops(s, s->base_s));
        if (final && final->t[i].out == RUN_OK)
            json_object_set_new(o, "tuned_gflops",
                                json_real(gflops(s, final->t[i].s)));
        json_array_append_new(arr, o);
    }
    return arr;
}

static int tune(options *opt)
{
    tuner tu;
    memset(&tu, 0, sizeof tu);
    tu.opt = *opt;
    tu.start = now_s();
    rng_state = opt->seed;
    /* Candidates are measured against CLBlast's own parameters, whatever a
     * database says. */
    setenv("ATMOE_PARAMS", "default", 1);
    atmoe_status st = atmoe_context_new(&tu.ctx, opt->device);
    if (st != ATMOE_STATUS_OK)
        return lib_fail(NULL, st, "opening the device");
    atmoe_device_info dev;
    atmoe_context_get_device(tu.ctx, &dev);
    use_cpu_clock = opt->cpu_clock;
    cpu_units = dev.compute_units ? dev.compute_units : 1;
    char user[4096];
    const char *out_path = opt->output;
    if (out_path == NULL) {
        if ((st = atmoe_tuning_user_path(user, sizeof user)) !=
            ATMOE_STATUS_OK) {
            atmoe_context_free(tu.ctx);
            return lib_fail(NULL, st, "finding the user database");
        }
        out_path = user;
    }
    /* A database that would refuse the entry is found out before the
     * minutes of measuring, not after. */
    FILE *probe = fopen(out_path, "r");
    if (probe) {
        fclose(probe);
        if ((st = atmoe_tuning_check(out_path, NULL)) != ATMOE_STATUS_OK) {
            atmoe_context_free(tu.ctx);
            return lib_fail(NULL, st, "the output database");
        }
    }
    say("tuning SGEMM on %s (%s, driver %s), budget %.0f s, seed %lu, %s "
        "clock\n", dev.name, atmoe_vendor_name(dev.vendor),
        dev.driver_version, opt->budget_s, opt->seed,
        opt->cpu_clock ? "processor" : "wall");
    say("GFLOP/s per shape (y = x W^T, row-major):\n");
    int rc = setup_shapes(&tu);
    result best_x = {0}, best_d = {0}, final = {0}, prev = {0};
    json_t *entry = NULL;
    if (rc != 0)
        goto out;
    say("  %-8s", "shape");
    for (int i = 0; i < tu.nshapes; i++)
        say(" %5zu/%zuk", tu.shapes[i].t, tu.shapes[i].d / 1024);
    say("   (T/d)\n");

    double budget_end = tu.start + opt->budget_s;
    double left = budget_end - now_s();
    double xgemm_end = now_s() + (opt->direct ? 0.65 : 1.0) * left;
    /* The shapes CLBlast runs direct by default keep that time if the
     * indirect path cannot beat it. */
    for (int i = 0; i < tu.nshapes; i++)
        tu.other[i] = tu.shapes[i].base_direct ? tu.shapes[i].base_s : 0;
    json_t *none = json_object();
    search(&tu, "xgemm", xgemm_end, sample_xgemm, "Xgemm", none, ALL_INDIRECT,
           NULL, &best_x);
    json_decref(none);
    if (!best_x.set) {
        fprintf(stderr, PROGRAM ": no Xgemm candidate could be measured\n");
        rc = EXIT_RUNTIME;
        goto out;
    }
    json_t *xgemm = json_object_get(json_object_get(best_x.set, "clblast"),
                                    "Xgemm");
    json_t *fixed = json_pack("{s:O}", "Xgemm", xgemm);
    for (int i = 0; i < tu.nshapes; i++)
        tu.other[i] = best_x.t[i].out == RUN_OK || best_x.t[i].out == RUN_SLOW
                          ? best_x.t[i].s
                          : 0;
    if (opt->direct)
        search(&tu, "direct", budget_end, sample_direct, "XgemmDirect", fixed,
               ALL_DIRECT, direct_shape, &best_d);

    route rt;
    if (!pick_route(&tu, &best_x, &best_d, &rt)) {
        json_decref(fixed);
        say("no set keeps every shape within %.0f%% of CLBlast's own "
            "parameters\n", 100 * (NO_HARM - 1));
    } else {
        json_t *cl = json_deep_copy(fixed);
        json_decref(fixed);
        if (rt.tuned_direct)
            json_object_set(cl, "XgemmDirect",
                            json_object_get(json_object_get(best_d.set,
                                                            "clblast"),
                                            "XgemmDirect"));
        json_t *final_set = rt.own_threshold
                                ? with_threshold(cl, rt.threshold)
                                : json_pack("{s:o}", "clblast", cl);
        if (rt.own_threshold)
            say("final: XGEMM_MIN_INDIRECT_SIZE %d, %s XgemmDirect\n",
                rt.threshold, rt.tuned_direct ? "tuned" : "CLBlast's");
        else
            say("final: CLBlast's XGEMM_MIN_INDIRECT_SIZE and XgemmDirect\n");
        memset(tu.other, 0, sizeof tu.other);
        evaluate(&tu, final_set, "final", NULL, NULL, &final);
        json_decref(final_set);
    }

    json_t *old = previous_set(out_path, &dev);
    if (old) {
        evaluate(&tu, old, "previous", NULL, NULL, &prev);
        json_decref(old);
    }
    const result *keep = NULL;
    if (final.valid && final.score > MIN_GAIN)
        keep = &final;
    if (prev.valid && prev.score >= (keep ? keep->score : 1.0) &&
        harmless(&tu, &prev))
        keep = &prev;

    if (opt->compare_layout && keep) {
        /* Parameters are already the final set's when no previous entry
         * was timed after it. */
        char *text = json_dumps(keep->set, JSON_COMPACT);
        st = atmoe_context_set_params(tu.ctx, text);
        free(text);
        for (int i = 0; st == ATMOE_STATUS_OK && i < tu.nshapes; i++) {
            timing nn = run_shape(tu.ctx, &tu.shapes[i], 0, opt->runs, 0);
            tu.shapes[i].final_nn_s = nn.out == RUN_OK ? nn.s : 0;
        }
    }

    say("\n%-12s %9s %9s", "shape", "default", "tuned");
    if (opt->compare_layout)
        say(" %9s %9s", "dflt W^T", "tuned W^T");
    say("   GFLOP/s (W^T: weight stored transposed, no TransB)\n");
    for (int i = 0; i < tu.nshapes; i++) {
        shape *s = &tu.shapes[i];
        say("T=%-4zu d=%-4zu %9.1f %9.1f", s->t, s->d, gflops(s, s->base_s),
            keep && keep->t[i].out == RUN_OK ? gflops(s, keep->t[i].s)
                                             : gflops(s, s->base_s));
        if (opt->compare_layout)
            say(" %9.1f %9.1f",
                s->base_nn_s > 0 ? gflops(s, s->base_nn_s) : 0.0,
                s->final_nn_s > 0 ? gflops(s, s->final_nn_s) : 0.0);
        say("\n");
    }
    say("%d candidates timed (%d draws refused by the constraints), %d "
        "wrong, %d failed; %.0f s\n", tu.evaluated, tu.refused, tu.wrong, tu.failed,
        now_s() - tu.start);

    time_t now = time(NULL);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    char tool[64];
    snprintf(tool, sizeof tool, PROGRAM " %s", atmoe_version());
    entry = keep ? json_deep_copy(keep->set) : json_object();
    json_object_set_new(
        entry, "info",
        json_pack("{s:s, s:s, s:s, s:f, s:f, s:{s:i, s:i, s:i, s:i}, s:o}",
                  "tool", tool, "date", date, "result",
                  keep == &prev    ? "the previous entry stays the best"
                  : keep == &final ? "tuned parameters"
                                   : "CLBlast's built-in parameters were "
                                     "the fastest",
                  "budget_s", opt->budget_s, "speedup",
                  keep ? keep->score : 1.0, "candidates", "timed",
                  tu.evaluated, "refused", tu.refused, "wrong", tu.wrong,
                  "failed", tu.failed, "shapes", shape_report(&tu, keep)));
    say("geometric-mean speed-up over CLBlast's defaults: %.2fx\n",
        keep ? keep->score : 1.0);
    if (opt->dry_run) {
        char *text = json_dumps(entry, JSON_INDENT(2));
        say("dry run, %s left as it is; the entry would be:\n%s\n", out_path,
            text ? text : "");
        free(text);
    } else {
        char *text = json_dumps(entry, JSON_COMPACT);
        st = text ? atmoe_tuning_save(out_path, &dev, text)
                  : ATMOE_STATUS_HOST_OUT_OF_MEMORY;
        free(text);
        if (st != ATMOE_STATUS_OK)
            rc = lib_fail(NULL, st, "saving the entry");
        else
            say("entry for %s written to %s\n", dev.name, out_path);
    }
out:
    json_decref(entry);
    result_clear(&best_x);
    result_clear(&best_d);
    result_clear(&final);
    result_clear(&prev);
    for (int i = 0; i < tu.nshapes; i++) {
        if (tu.shapes[i].owns_w) {
            atmoe_tensor_free(tu.shapes[i].w);
            atmoe_tensor_free(tu.shapes[i].wt);
        }
        free(tu.shapes[i].x);
        free(tu.shapes[i].ref);
    }
    for (int i = 0; i < tu.ntried; i++)
        free(tu.tried[i]);
    atmoe_context_free(tu.ctx);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Command line                                                              */
/* ------------------------------------------------------------------------ */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: " PROGRAM " [--device D] [--budget-s S] [--sizes "
            "small|full|all]\n"
            "                  [--runs N] [--seed N] [--no-direct] "
            "[--compare-layout]\n"
            "                  [--clock wall|cpu] [--output FILE] [--dry-run] "
            "[--quiet]\n"
            "       " PROGRAM " --check FILE\n"
            "\n"
            "Searches CLBlast's SGEMM parameters for a device and stores the "
            "best set in\nthe user's tuning database (see " PROGRAM "(1)).\n");
}

static int parse_number(const char *flag, const char *text, double lo,
                        double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || end == text || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, PROGRAM ": %s wants a number in [%g, %g], not '%s'\n",
                flag, lo, hi, text);
        return -1;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    options opt = {NULL, NULL, 300, 3, 1, 0, 0, 0, 1, 1, 1, 0};
    const char *check = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        double num;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--no-direct") == 0) {
            opt.direct = 0;
        } else if (strcmp(a, "--compare-layout") == 0) {
            opt.compare_layout = 1;
        } else if (strcmp(a, "--dry-run") == 0) {
            opt.dry_run = 1;
        } else if (strcmp(a, "--quiet") == 0) {
            opt.quiet = 1;
        } else if (v == NULL) {
            fprintf(stderr, PROGRAM ": unknown option or missing value: "
                    "'%s'\n", a);
            usage(stderr);
            return EXIT_USAGE;
        } else if (strcmp(a, "--device") == 0) {
            opt.device = argv[++i];
        } else if (strcmp(a, "--output") == 0) {
            opt.output = argv[++i];
        } else if (strcmp(a, "--check") == 0) {
            check = argv[++i];
        } else if (strcmp(a, "--budget-s") == 0) {
            if (parse_number(a, argv[++i], 0, 86400, &opt.budget_s))
                return EXIT_USAGE;
        } else if (strcmp(a, "--runs") == 0) {
            if (parse_number(a, argv[++i], 1, 63, &num))
                return EXIT_USAGE;
            opt.runs = (int)num;
        } else if (strcmp(a, "--seed") == 0) {
            if (parse_number(a, argv[++i], 0, 4294967295.0, &num))
                return EXIT_USAGE;
            opt.seed = (unsigned long)num;
        } else if (strcmp(a, "--clock") == 0) {
            v = argv[++i];
            if (strcmp(v, "wall") != 0 && strcmp(v, "cpu") != 0) {
                fprintf(stderr, PROGRAM ": --clock is wall or cpu, not "
                        "'%s'\n", v);
                return EXIT_USAGE;
            }
            opt.cpu_clock = strcmp(v, "cpu") == 0;
        } else if (strcmp(a, "--sizes") == 0) {
            v = argv[++i];
            opt.small = strcmp(v, "small") == 0 || strcmp(v, "all") == 0;
            opt.full = strcmp(v, "full") == 0 || strcmp(v, "all") == 0;
            if (!opt.small && !opt.full) {
                fprintf(stderr, PROGRAM ": --sizes is small, full or all, "
                        "not '%s'\n", v);
                return EXIT_USAGE;
            }
        } else {
            fprintf(stderr, PROGRAM ": unknown option '%s'\n", a);
            usage(stderr);
            return EXIT_USAGE;
        }
    }
    quiet = opt.quiet;
    if (check) {
        size_t n = 0;
        atmoe_status st = atmoe_tuning_check(check, &n);
        if (st != ATMOE_STATUS_OK) {
            fprintf(stderr, PROGRAM ": %s\n", atmoe_errmsg(NULL));
            return EXIT_RUNTIME;
        }
        printf("%s: a valid tuning database with %zu entr%s\n", check, n,
               n == 1 ? "y" : "ies");
        return 0;
    }
    return tune(&opt);
}
