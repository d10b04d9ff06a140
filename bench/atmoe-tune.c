/* atmoe-tune: searches the kernel parameters of one device and stores the
 * best in a tuning database (see atmoe-tune(1)): CLBlast's SGEMM
 * parameters, those of the library's own products (cl/linear.cl), here,
 * and the library's other tunable kernels, one row each of the table in
 * tune_kernels.c (the router, the mixture, the group variant of the
 * products, k-means, the optimiser), which run as phases of their own
 * names; tune_effort.c runs all of them step by step (--effort).
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
 * (the "clblast" phases), and for the mixture node (atmoe_graph_mixture: 8
 * experts in 4 groups of rank 16, block mix, a gate row per token) at the
 * same T and d:
 *
 *   blocks    the SR x ST blocks of tiles that cl/linear.cl's work-items
 *             walk together, against the library's 8 x 8, whose result is
 *             checked against float64 and is the reference
 *   boundary  MAX_TOKENS, the largest batch that cl/linear.cl runs rather
 *             than CLBlast: both paths timed at T = 16 to 512, in a child
 *             process that applies the chosen sets over CLBlast's built-in
 *             ones, as a fresh process using the entry would
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
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "atmoe.h"
#include "measure.h"
#include "tune_effort.h"
#include "tune_kernels.h"

#define PROGRAM "atmoe-tune"
#define EXIT_RUNTIME 1
#define EXIT_USAGE 2

#define MAX_SHAPES 8
#define MAX_MIX 12
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

/* The mixture the linear phases time: 8 experts in 4 groups, of rank 16
 * and scale alpha / rank = 2. */
#define MIX_EXPERTS 8
#define MIX_GROUPS 4
#define MIX_RANK 16
#define MIX_ALPHA (2.0f * MIX_RANK)
/* MAX_TOKENS above every batch timed (cl/linear.cl runs them all) and
 * below (CLBlast runs them all). */
#define ALL_LINEAR (1 << 20)
#define ALL_CLBLAST 1
/* The library's blocks when the database has none. */
#define BASE_SR 8
#define BASE_ST 8
/* cl/linear.cl keeps the batches up to the largest T timed at which it is
 * slower than CLBlast by no more than this factor... */
#define LINEAR_SLACK 1.10
/* ... and at least these: below, reading the weights once bounds both. */
#define MIN_MAX_TOKENS 16
/* The blocks phase's share of the budget when the CLBlast phases run too:
 * its 19 candidates each cost seconds, CLBlast's tens of seconds. */
#define BLOCKS_SHARE 0.25
/* How the child that times the boundary marks its result line. */
#define RESULT_MARK "@boundary "

/* ------------------------------------------------------------------------ */
/* Options and helpers                                                       */
/* ------------------------------------------------------------------------ */

/* What --phases selects. */
#define PHASE_CLBLAST 1u
#define PHASE_BLOCKS 2u
#define PHASE_BOUNDARY 4u
#define PHASE_LINEAR (PHASE_BLOCKS | PHASE_BOUNDARY)
#define PHASE_ALL (PHASE_CLBLAST | PHASE_LINEAR)
/* The rows of tune_kernels.c's table (opt.rows says which): not in
 * "all", whose runs keep the length they had; --effort runs each. */
#define PHASE_TABLE 8u

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
    unsigned phases;
    const char *child; /* the boundary's set, in the child that times it */
    /* The storage type of the mixture's weights (W0, A_all, B_all) the
     * blocks are tuned for: f32 tunes the untyped "linear" program, f16
     * and bf16 their own "linear.f16" and "linear.bf16". */
    atmoe_dtype dtype;
    unsigned rows;       /* the table's rows (bit i: tk_at(i)) */
    int full_space;      /* --space full: the rows' full candidate lists */
    const char *step;    /* --step, from --effort */
} options;

/* The program whose blocks a run tunes. */
static const char *blocks_program(const options *opt)
{
    return opt->dtype == ATMOE_DTYPE_F16    ? "linear.f16"
           : opt->dtype == ATMOE_DTYPE_BF16 ? "linear.bf16"
                                            : "linear";
}

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

/* splitmix64: reproducible from --seed on every platform. */
static uint64_t rng_state;

static uint64_t rng_next(void)
{
    return splitmix64(&rng_state);
}

static float rng_uniform(void)
{
    return (float)uniform(&rng_state);
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
        (st = atmoe_graph_mark_output(g, *yn)) || (st = atmoe_graph_plan(g, 0))) {
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

/* An input of a planned graph and the host data it takes. */
typedef struct feed {
    atmoe_node node;
    const float *data;
    size_t count;
} feed;

/* Fills g's inputs, runs it once and checks its output yn (n elements)
 * against *ref, or keeps it as *ref when that is NULL; then times it.
 * best is the fastest time known for the shape (0: none); what names the
 * shape in messages. */
static timing time_graph(atmoe_context *ctx, atmoe_graph *g, const feed *in,
                         int nin, atmoe_node yn, size_t n, float **ref,
                         int runs, double best, const char *what)
{
    timing r = {RUN_FAILED, 0, 0, 0};
    float *y = malloc(n * sizeof *y);
    double times[64];
    atmoe_status st = ATMOE_STATUS_OK;
    if (y == NULL)
        return r;
    for (size_t i = 0; i < n; i++)
        y[i] = NAN;
    double t_first = now_s();
    for (int i = 0; i < nin && st == ATMOE_STATUS_OK; i++)
        st = atmoe_graph_set_input(g, in[i].node, in[i].data,
                                   in[i].count * sizeof *in[i].data, 0);
    if (st || (st = atmoe_graph_compute(g, 0)) ||
        (st = atmoe_graph_read(g, yn, y, n * sizeof *y))) {
        say("      %s: %s: %s\n", what, atmoe_status_name(st),
            atmoe_errmsg(ctx));
        goto out;
    }
    if (*ref == NULL) {
        *ref = y;
        y = NULL;
    } else {
        r.err = max_diff(y, *ref, n);
        if (!(r.err <= REF_TOL)) {
            r.out = RUN_WRONG;
            goto out;
        }
    }
    /* A sample lasts at least MIN_SAMPLE_S, so that short runs are timed
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
            say("      %s: %s: %s\n", what, atmoe_status_name(st),
                atmoe_errmsg(ctx));
            goto out;
        }
        times[k] = (clock_s() - t0) / inner;
        if (k == 0 && best > 0 && times[0] > PRUNE_FACTOR * best) {
            r.out = RUN_SLOW;
            r.s = times[0];
            goto out;
        }
    }
    r.s = median(times, (size_t)runs);
    r.out = RUN_OK;
out:
    free(y);
    return r;
}

/* Runs shape s once as planned and times it; a shape without a reference
 * keeps its result as the reference.  best is the fastest time known for
 * the shape (0: none). */
static timing run_shape(atmoe_context *ctx, shape *s, int transposed,
                        int runs, double best)
{
    timing r = {RUN_FAILED, 0, 0, 0};
    char what[64];
    snprintf(what, sizeof what, "T=%zu d=%zu", s->t, s->d);
    atmoe_graph *g;
    atmoe_node xn, yn;
    atmoe_status st = build_graph(ctx, s, transposed, &g, &xn, &yn);
    if (st != ATMOE_STATUS_OK) {
        say("      %s: %s: %s\n", what, atmoe_status_name(st),
            atmoe_errmsg(ctx));
        return r;
    }
    atmoe_graph_memory mem;
    if (atmoe_graph_get_memory(g, &mem) == ATMOE_STATUS_OK) {
        feed in = {xn, s->x, s->t * s->d};
        r = time_graph(ctx, g, &in, 1, yn, s->t * s->d, &s->ref, runs, best,
                       what);
        r.scratch = (size_t)mem.gemm_scratch_bytes;
    }
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

/* One size of the mixture: its base weight and expert set, and while the
 * baseline is checked their host copies (A [E][rank][d], B [E][d][rank]). */
typedef struct mix_data {
    size_t d;
    atmoe_tensor *w0;
    atmoe_experts *set;
    float *w0h, *a, *b;
} mix_data;

typedef struct mix_shape {
    size_t t;
    mix_data *data;
    float *x;     /* [t, d] */
    float *gates; /* [t, MIX_EXPERTS] */
    float *ref;   /* [t, d]: the baseline's result */
    double base_s;
} mix_shape;

/* A set of cl/linear.cl's blocks and its times on the mixture shapes. */
typedef struct blocks_result {
    int sr, st;
    timing t[MAX_MIX];
    double score; /* geometric-mean speed-up over 8 x 8 */
    int valid;
} blocks_result;

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
    mix_data mdata[2];
    int nmdata;
    mix_shape mix[MAX_MIX];
    int nmix;
    json_t *kernels_base; /* the entry's macros of the other programs */
    int blocks_timed, blocks_wrong, blocks_failed;
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
        /* The candidate's name in the journal: the kernel's set. */
        char *cand = json_dumps(params, JSON_COMPACT | JSON_SORT_KEYS);
        char name[1024], why[64];
        snprintf(name, sizeof name, "%s %s", kernel, cand ? cand : "");
        free(cand);
        json_t *cl = json_deep_copy(fixed);
        json_object_set_new(cl, kernel, params);
        json_t *set = with_threshold(cl, min_indirect);
        result r;
        int lost = journal_begin(name, why, sizeof why);
        if (lost)
            say("  skipped: it %s an earlier run of this step\n", why);
        int ok = !lost && evaluate(tu, set, label, want, fastest, &r);
        if (!lost)
            journal_end();
        if (lost) {
            json_decref(set);
            continue;
        }
        if (ok && r.valid && r.score > best->score) {
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

/* Whether r sends shape s to XgemmDirect. */
static int routes_direct(const shape *s, const route *r)
{
    return r->own_threshold ? shape_mnk(s) < (double)r->threshold *
                                                 r->threshold * r->threshold
                            : s->base_direct;
}

/* Scores a routing: every shape must have a time on its path and be no
 * more than NO_HARM slower than the baseline, or the routing is out. */
static int score_route(const tuner *tu, const result *indirect,
                       const result *direct, route *r)
{
    r->logsum = 0;
    for (int i = 0; i < tu->nshapes; i++) {
        const shape *s = &tu->shapes[i];
        const timing *t = routes_direct(s, r) ? &direct->t[i]
                                              : &indirect->t[i];
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
/* The mixture: cl/linear.cl's blocks, and its boundary with CLBlast         */
/* ------------------------------------------------------------------------ */

static const char *self_name = PROGRAM; /* argv[0], to run the child */

static double mix_gflops(size_t t, size_t d, double seconds)
{
    double T = (double)t, D = (double)d, R = MIX_EXPERTS * MIX_RANK;
    return (2.0 * T * D * D + 4.0 * T * R * D) / seconds * 1e-9;
}

/* The macros of the tuned program with blocks sr x st, and of "linear"
 * with max_tokens (0: none), over the entry's macros of the other
 * programs (the untyped "linear" blocks among them when the run tunes a
 * typed program). */
static json_t *linear_kernels(const tuner *tu, int sr, int st,
                              long max_tokens)
{
    json_t *k = tu->kernels_base ? json_deep_copy(tu->kernels_base)
                                 : json_object();
    const char *program = blocks_program(&tu->opt);
    json_object_set_new(k, program,
                        json_pack("{s:i, s:i}", "SR", sr, "ST", st));
    json_t *lin = json_object_get(k, "linear");
    if (lin == NULL) {
        lin = json_object();
        json_object_set_new(k, "linear", lin);
    }
    if (max_tokens > 0)
        json_object_set_new(lin, "MAX_TOKENS", json_integer(max_tokens));
    if (json_object_size(lin) == 0)
        json_object_del(k, "linear");
    return k;
}

/* Applies the linear macros, with CLBlast's sets clblast when not NULL
 * (without, CLBlast keeps what it has). */
static atmoe_status apply_linear(tuner *tu, const json_t *clblast, int sr,
                                 int st, long max_tokens)
{
    json_t *set = json_pack("{s:o}", "kernels",
                            linear_kernels(tu, sr, st, max_tokens));
    if (set && clblast)
        json_object_set(set, "clblast", (json_t *)clblast);
    char *text = set ? json_dumps(set, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(set);
    atmoe_status s = text ? atmoe_context_set_params(tu->ctx, text)
                          : ATMOE_STATUS_HOST_OUT_OF_MEMORY;
    free(text);
    return s;
}

/* The mixture of shape m: y = x W0^T + B_all M(gates) A_all x, a gate row
 * per token, no bias, c = 1. */
static atmoe_status build_mixture(atmoe_context *ctx, const mix_shape *m,
                                  atmoe_graph **out, feed in[2],
                                  atmoe_node *yn)
{
    atmoe_graph *g;
    atmoe_status st = atmoe_graph_new(ctx, &g);
    if (st != ATMOE_STATUS_OK)
        return st;
    size_t d = m->data->d, xs[2] = {m->t, d}, gs[2] = {m->t, MIX_EXPERTS};
    atmoe_node w0;
    if ((st = atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0,
                                &in[0].node)) ||
        (st = atmoe_graph_input(g, "gates", ATMOE_DTYPE_F32, 2, gs, 0,
                                &in[1].node)) ||
        (st = atmoe_graph_parameter(g, "w0", m->data->w0, &w0)) ||
        (st = atmoe_graph_mixture(g, in[0].node, w0, ATMOE_NODE_NONE,
                                  m->data->set, ATMOE_MIX_BLOCK, in[1].node,
                                  ATMOE_NODE_NONE, 1.0f, yn)) ||
        (st = atmoe_graph_mark_output(g, *yn)) || (st = atmoe_graph_plan(g, 0))) {
        atmoe_graph_free(g);
        return st;
    }
    in[0].data = m->x;
    in[0].count = m->t * d;
    in[1].data = m->gates;
    in[1].count = m->t * MIX_EXPERTS;
    *out = g;
    return ATMOE_STATUS_OK;
}

/* Plans the mixture of m with the parameters in force and times it (see
 * time_graph). */
static timing run_mix(tuner *tu, mix_shape *m, double best)
{
    timing r = {RUN_FAILED, 0, 0, 0};
    char what[64];
    snprintf(what, sizeof what, "mixture T=%zu d=%zu", m->t, m->data->d);
    atmoe_graph *g;
    feed in[2];
    atmoe_node yn;
    atmoe_status st = build_mixture(tu->ctx, m, &g, in, &yn);
    if (st != ATMOE_STATUS_OK) {
        say("      %s: %s: %s\n", what, atmoe_status_name(st),
            atmoe_errmsg(tu->ctx));
        return r;
    }
    r = time_graph(tu->ctx, g, in, 2, yn, m->t * m->data->d, &m->ref,
                   tu->opt.runs, best, what);
    atmoe_graph_free(g);
    return r;
}

/* Sampled elements of the mixture's y against float64: the base dot
 * product plus each expert's gated s_e B_e (A_e x), over the sum of the
 * magnitudes of their terms. */
static double exact_mix_diff(const mix_shape *m, const float *y)
{
    const mix_data *md = m->data;
    size_t d = md->d;
    const double scale = MIX_ALPHA / MIX_RANK;
    double worst = 0;
    for (int k = 0; k < SAMPLE_CHECKS; k++) {
        size_t i = rng_next() % m->t, j = rng_next() % d;
        const float *x = m->x + i * d;
        double dot = 0, mag = 1e-30;
        for (size_t c = 0; c < d; c++) {
            double p = (double)x[c] * (double)md->w0h[j * d + c];
            dot += p;
            mag += fabs(p);
        }
        for (size_t e = 0; e < MIX_EXPERTS; e++) {
            double g = scale * (double)m->gates[i * MIX_EXPERTS + e];
            for (size_t r = 0; r < MIX_RANK; r++) {
                const float *a = md->a + (e * MIX_RANK + r) * d;
                double u = 0, um = 0;
                for (size_t c = 0; c < d; c++) {
                    double p = (double)a[c] * (double)x[c];
                    u += p;
                    um += fabs(p);
                }
                double coef = g * (double)md->b[(e * d + j) * MIX_RANK + r];
                dot += coef * u;
                mag += fabs(coef) * um;
            }
        }
        double err = fabs((double)y[i * d + j] - dot) / mag;
        if (!(err <= worst))
            worst = isnan(err) ? INFINITY : err;
    }
    return worst;
}

static void free_host_copies(mix_data *md)
{
    free(md->w0h);
    free(md->a);
    free(md->b);
    md->w0h = md->a = md->b = NULL;
}

static void free_mix(tuner *tu)
{
    for (int i = 0; i < tu->nmix; i++) {
        free(tu->mix[i].x);
        free(tu->mix[i].gates);
        free(tu->mix[i].ref);
    }
    for (int i = 0; i < tu->nmdata; i++) {
        free_host_copies(&tu->mdata[i]);
        atmoe_tensor_free(tu->mdata[i].w0);
        atmoe_experts_free(tu->mdata[i].set);
    }
}

/* *t (f32) replaced by its copy in dtype, and host (its values) rounded
 * to match, so that the float64 check computes with the weights as
 * stored. */
static atmoe_status store_as(atmoe_context *ctx, atmoe_dtype dtype,
                             atmoe_tensor **t, float *host)
{
    if (dtype == ATMOE_DTYPE_F32)
        return ATMOE_STATUS_OK;
    int ndim;
    size_t dims[ATMOE_MAX_DIMS], n = 1;
    atmoe_tensor *h;
    atmoe_status st = atmoe_tensor_get_shape(*t, &ndim, dims);
    for (int i = 0; i < ndim; i++)
        n *= dims[i];
    if (st == ATMOE_STATUS_OK &&
        (st = atmoe_tensor_new(ctx, dtype, ndim, dims, &h)) ==
            ATMOE_STATUS_OK) {
        if ((st = atmoe_tensor_copy(h, *t)) == ATMOE_STATUS_OK &&
            (st = atmoe_tensor_copy(*t, h)) == ATMOE_STATUS_OK)
            st = atmoe_tensor_read(*t, host, n * sizeof *host);
        atmoe_tensor_free(*t);
        *t = h;
    }
    return st;
}

/* n host values rounded to what dtype holds, through the device. */
static atmoe_status round_as(atmoe_context *ctx, atmoe_dtype dtype,
                             float *v, size_t n)
{
    if (dtype == ATMOE_DTYPE_F32)
        return ATMOE_STATUS_OK;
    atmoe_tensor *t;
    atmoe_status st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 1, &n, &t);
    if (st != ATMOE_STATUS_OK)
        return st;
    if ((st = atmoe_tensor_write(t, v, n * sizeof *v)) == ATMOE_STATUS_OK)
        st = store_as(ctx, dtype, &t, v);
    atmoe_tensor_free(t);
    return st;
}

/* The widths d (= d_in = d_out) that --sizes asks for, into ds[2]; their
 * count. */
static int tuned_widths(const tuner *tu, size_t ds[2])
{
    int nd = 0;
    if (tu->opt.small)
        ds[nd++] = 1024;
    if (tu->opt.full)
        ds[nd++] = 4096;
    return nd;
}

/* The weights and expert set of width d, and a mixture shape per T of ts.
 * With check, each shape runs once with the parameters in force, the
 * baseline: its result, checked against float64 on sampled elements,
 * becomes the reference, and its time the baseline's. */
static int setup_width(tuner *tu, size_t d, const size_t *ts, int nt,
                       int check)
{
    mix_data *md = &tu->mdata[tu->nmdata++];
    size_t shp[2] = {d, d};
    md->d = d;
    size_t na = (size_t)MIX_EXPERTS * MIX_RANK * d;
    md->w0h = malloc(d * d * sizeof *md->w0h);
    md->a = malloc(na * sizeof *md->a);
    md->b = malloc(na * sizeof *md->b);
    if (md->w0h == NULL || md->a == NULL || md->b == NULL) {
        fprintf(stderr, PROGRAM ": out of host memory\n");
        return EXIT_RUNTIME;
    }
    float sd = 1.0f / sqrtf((float)d), sr = 1.0f / sqrtf(MIX_RANK);
    for (size_t i = 0; i < d * d; i++)
        md->w0h[i] = sd * rng_uniform();
    for (size_t i = 0; i < na; i++) {
        md->a[i] = sd * rng_uniform();
        md->b[i] = sr * rng_uniform();
    }
    atmoe_status st;
    if ((st = atmoe_tensor_new(tu->ctx, ATMOE_DTYPE_F32, 2, shp,
                               &md->w0)) ||
        (st = atmoe_tensor_write(md->w0, md->w0h,
                                 d * d * sizeof *md->w0h)) ||
        (st = store_as(tu->ctx, tu->opt.dtype, &md->w0, md->w0h)) ||
        (st = round_as(tu->ctx, tu->opt.dtype, md->a, na)) ||
        (st = round_as(tu->ctx, tu->opt.dtype, md->b, na)) ||
        (st = atmoe_experts_new(tu->ctx, d, d, &md->set)) ||
        (st = atmoe_experts_set_dtype(md->set, tu->opt.dtype,
                                      tu->opt.dtype)))
        return lib_fail(tu->ctx, st, "making the mixture's weights");
    for (size_t e = 0; e < MIX_EXPERTS; e++)
        if ((st = atmoe_experts_add(
                 md->set, (int)(e / (MIX_EXPERTS / MIX_GROUPS)), MIX_RANK,
                 md->a + e * MIX_RANK * d, md->b + e * d * MIX_RANK,
                 MIX_ALPHA, 0, NULL)) != ATMOE_STATUS_OK)
            return lib_fail(tu->ctx, st, "adding an expert");
    for (int j = 0; j < nt; j++) {
        mix_shape *m = &tu->mix[tu->nmix++];
        memset(m, 0, sizeof *m);
        m->t = ts[j];
        m->data = md;
        m->x = malloc(m->t * d * sizeof *m->x);
        m->gates = malloc(m->t * MIX_EXPERTS * sizeof *m->gates);
        if (m->x == NULL || m->gates == NULL) {
            fprintf(stderr, PROGRAM ": out of host memory\n");
            return EXIT_RUNTIME;
        }
        for (size_t i = 0; i < m->t * d; i++)
            m->x[i] = rng_uniform();
        for (size_t i = 0; i < m->t * MIX_EXPERTS; i++)
            m->gates[i] = (rng_uniform() + 1.0f) / (2.0f * MIX_EXPERTS);
        if (!check)
            continue;
        timing t = run_mix(tu, m, 0);
        if (t.out != RUN_OK) {
            fprintf(stderr, PROGRAM ": the mixture at T=%zu d=%zu "
                    "failed with the library's blocks\n", m->t, d);
            return EXIT_RUNTIME;
        }
        double e = exact_mix_diff(m, m->ref);
        if (!(e <= EXACT_TOL)) {
            fprintf(stderr, PROGRAM ": the mixture at T=%zu d=%zu is "
                    "off float64 by %.2e with the library's blocks: "
                    "nothing to tune against\n", m->t, d, e);
            return EXIT_RUNTIME;
        }
        m->base_s = t.s;
        say("  baseline T=%-4zu d=%zu  %8.1f GFLOP/s  (float64 check "
            "%.1e)\n", m->t, d, mix_gflops(m->t, d, t.s), e);
    }
    free_host_copies(md);
    return 0;
}

/* setup_width for each width --sizes asks for. */
static int setup_mix(tuner *tu, const size_t *ts, int nt, int check)
{
    size_t ds[2];
    int nd = tuned_widths(tu, ds);
    for (int k = 0; k < nd; k++) {
        int rc = setup_width(tu, ds[k], ts, nt, check);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Applies blocks sr x st and times every mixture shape; best holds the
 * fastest time known per shape (NULL: none).  0 when the library refused
 * the blocks. */
static int evaluate_blocks(tuner *tu, int sr, int st, const double *best,
                           blocks_result *r)
{
    memset(r, 0, sizeof *r);
    r->sr = sr;
    r->st = st;
    char label[16];
    snprintf(label, sizeof label, "%dx%d", sr, st);
    if (apply_linear(tu, NULL, sr, st, ALL_LINEAR) != ATMOE_STATUS_OK) {
        say("  %-8s refused: %s\n", label, atmoe_errmsg(tu->ctx));
        tu->blocks_failed++;
        return 0;
    }
    tu->blocks_timed++;
    r->valid = 1;
    double t0 = now_s();
    say("  %-8s", label);
    for (int i = 0; i < tu->nmix && r->valid; i++) {
        mix_shape *m = &tu->mix[i];
        r->t[i] = run_mix(tu, m, best ? best[i] : 0);
        switch (r->t[i].out) {
        case RUN_OK:
            say(" %8.1f", mix_gflops(m->t, m->data->d, r->t[i].s));
            break;
        case RUN_SLOW:
            say("     slow");
            break;
        case RUN_WRONG:
            say("    WRONG  (off by %.1e)", r->t[i].err);
            r->valid = 0;
            tu->blocks_wrong++;
            break;
        case RUN_FAILED:
            say("   failed");
            r->valid = 0;
            tu->blocks_failed++;
            break;
        }
    }
    if (r->valid) {
        double logsum = 0;
        for (int i = 0; i < tu->nmix; i++)
            logsum += log(tu->mix[i].base_s / r->t[i].s);
        r->score = exp(logsum / tu->nmix);
    }
    say("  %s%.2fx  %.0f s\n", r->valid ? "" : "rejected ",
        r->valid ? r->score : 0.0, now_s() - t0);
    return 1;
}

/* Whether every shape of r ran within NO_HARM of 8 x 8. */
static int blocks_harmless(const tuner *tu, const blocks_result *r)
{
    for (int i = 0; i < tu->nmix; i++)
        if (r->t[i].out != RUN_OK || r->t[i].s > NO_HARM * tu->mix[i].base_s)
            return 0;
    return 1;
}

/* The blocks phase: 8 x 8 as the baseline, then the previous entry's
 * blocks and the others of {2..32} x {2..16} in random order until the
 * deadline (one at least).  The best, when at least MIN_GAIN faster, is
 * timed again after 8 x 8, and kept only if it still is and slows no shape
 * by more than NO_HARM: the best of many noisy timings is flattered by
 * its noise.  *best gets the blocks kept, with their last times. */
static int tune_blocks(tuner *tu, double deadline, int prev_sr, int prev_st,
                       blocks_result *best)
{
    static const size_t ts[] = {16, 64, 512};
    static const int srs[] = {2, 4, 8, 16, 32}, sts[] = {2, 4, 8, 16};
    atmoe_status s = apply_linear(tu, NULL, BASE_SR, BASE_ST, ALL_LINEAR);
    if (s != ATMOE_STATUS_OK)
        return lib_fail(tu->ctx, s, "applying cl/linear.cl's blocks");
    say("linear blocks: GFLOP/s of the mixture per shape (block mix, %d "
        "experts of rank %d, cl/linear.cl for every batch):\n",
        MIX_EXPERTS, MIX_RANK);
    int rc = setup_mix(tu, ts, 3, 1);
    /* Blocks that keep a d = 1024 W0 (4 MiB) in cache can thrash it at the
     * SPEC's d = 4096 (64 MiB): quick's ST = 16 was 3% faster at 1024 and
     * 9 to 20% slower at prefill and mor1e's T = 512.  So the largest batch
     * at 4096 is always timed. */
    if (rc == 0 && !tu->opt.full)
        rc = setup_width(tu, 4096, &ts[2], 1, 1);
    if (rc != 0)
        return rc;
    say("  %-8s", "blocks");
    for (int i = 0; i < tu->nmix; i++)
        say(" %5zu/%zuk", tu->mix[i].t, tu->mix[i].data->d / 1024);
    say("   (T/d)\n");

    int cand[32][2], n = 0;
    if (prev_sr > 0 && prev_st > 0 &&
        !(prev_sr == BASE_SR && prev_st == BASE_ST)) {
        cand[n][0] = prev_sr;
        cand[n++][1] = prev_st;
    }
    int first_drawn = n;
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++)
            if (!(srs[i] == BASE_SR && sts[j] == BASE_ST) &&
                !(srs[i] == prev_sr && sts[j] == prev_st)) {
                cand[n][0] = srs[i];
                cand[n++][1] = sts[j];
            }
    for (int i = n - 1; i > first_drawn; i--) {
        uint64_t span = (uint64_t)(i - first_drawn + 1);
        int j = first_drawn + (int)(rng_next() % span);
        int s0 = cand[i][0], s1 = cand[i][1];
        cand[i][0] = cand[j][0];
        cand[i][1] = cand[j][1];
        cand[j][0] = s0;
        cand[j][1] = s1;
    }

    blocks_result top;
    memset(&top, 0, sizeof top);
    top.sr = BASE_SR;
    top.st = BASE_ST;
    top.score = 1.0;
    top.valid = 1;
    double fastest[MAX_MIX];
    for (int i = 0; i < tu->nmix; i++) {
        fastest[i] = tu->mix[i].base_s;
        top.t[i] = (timing){RUN_OK, tu->mix[i].base_s, 0, 0};
    }
    *best = top;
    for (int c = 0, ran = 0; c < n && (ran == 0 || now_s() < deadline);
         c++) {
        blocks_result r;
        char label[48], why[64];
        snprintf(label, sizeof label, "SR=%d,ST=%d", cand[c][0], cand[c][1]);
        if (journal_begin(label, why, sizeof why)) {
            say("  %-8s skipped: it %s an earlier run of this step\n", label,
                why);
            continue;
        }
        int ok = evaluate_blocks(tu, cand[c][0], cand[c][1], fastest, &r);
        journal_end();
        ran++;
        if (!ok || !r.valid)
            continue;
        for (int i = 0; i < tu->nmix; i++)
            if (r.t[i].out == RUN_OK && r.t[i].s < fastest[i])
                fastest[i] = r.t[i].s;
        if (r.score > top.score)
            top = r;
    }
    if (top.sr == BASE_SR && top.st == BASE_ST) {
        say("no blocks beat 8x8\n");
        return 0;
    }
    if (!(top.score >= MIN_GAIN)) {
        say("the best blocks, %dx%d, are %.2fx 8x8: within the noise, 8x8 "
            "stays\n", top.sr, top.st, top.score);
        return 0;
    }
    say("confirming %dx%d: both timed again, 8x8 first (its ratio is to "
        "its first times)\n", top.sr, top.st);
    blocks_result base, again;
    if (!evaluate_blocks(tu, BASE_SR, BASE_ST, NULL, &base) || !base.valid) {
        say("8x8 failed the second time: 8x8 stays\n");
        return 0;
    }
    for (int i = 0; i < tu->nmix; i++)
        tu->mix[i].base_s = base.t[i].s;
    base.score = 1.0;
    *best = base;
    if (!evaluate_blocks(tu, top.sr, top.st, NULL, &again) || !again.valid ||
        !(again.score >= MIN_GAIN) || !blocks_harmless(tu, &again)) {
        say("%dx%d is not confirmed (%.2fx, or a shape more than %.0f%% "
            "slower): 8x8 stays\n", top.sr, top.st,
            again.valid ? again.score : 0.0, 100 * (NO_HARM - 1));
        return 0;
    }
    *best = again;
    return 0;
}

/* The boundary, in the child process (--boundary-child SET): SET's CLBlast
 * sets over CLBlast's built-in ones and its blocks; every mixture shape at
 * T = 16 to 512 timed on cl/linear.cl and on CLBlast, whose results must
 * agree.  The times go to stdout as one JSON line after RESULT_MARK. */
static int boundary_child(const options *opt)
{
    static const size_t ts[] = {16, 32, 64, 128, 256, 512};
    tuner tu;
    memset(&tu, 0, sizeof tu);
    tu.opt = *opt;
    rng_state = opt->seed;
    json_t *set = json_loads(opt->child, 0, NULL);
    json_t *lin = json_object_get(json_object_get(set, "kernels"), "linear");
    json_t *v;
    int sr = (v = json_object_get(lin, "SR")) ? (int)json_integer_value(v)
                                              : BASE_SR;
    int st = (v = json_object_get(lin, "ST")) ? (int)json_integer_value(v)
                                              : BASE_ST;
    if (set == NULL || sr < 1 || st < 1) {
        json_decref(set);
        fprintf(stderr, PROGRAM ": --boundary-child wants the set of "
                "atmoe-tune's boundary phase\n");
        return EXIT_USAGE;
    }
    tu.kernels_base = json_deep_copy(json_object_get(set, "kernels"));
    json_object_del(tu.kernels_base, "linear");
    json_t *points = json_array();
    int rc = EXIT_RUNTIME;
    atmoe_status s = atmoe_context_new(opt->device, &tu.ctx);
    if (s != ATMOE_STATUS_OK) {
        lib_fail(NULL, s, "opening the device");
        goto out;
    }
    atmoe_device_info dev;
    atmoe_context_get_device(tu.ctx, &dev);
    use_cpu_clock = opt->cpu_clock;
    cpu_units = dev.compute_units ? dev.compute_units : 1;
    if ((s = apply_linear(&tu, json_object_get(set, "clblast"), sr, st,
                          ALL_LINEAR)) != ATMOE_STATUS_OK) {
        lib_fail(tu.ctx, s, "applying the boundary's set");
        goto out;
    }
    if (setup_mix(&tu, ts, 6, 0) != 0)
        goto out;
    for (int i = 0; i < tu.nmix; i++) {
        mix_shape *m = &tu.mix[i];
        timing t[2];
        for (int p = 0; p < 2; p++) {
            if ((s = apply_linear(&tu, NULL, sr, st,
                                  p ? ALL_CLBLAST : ALL_LINEAR)) !=
                ATMOE_STATUS_OK) {
                lib_fail(tu.ctx, s, "applying the boundary's set");
                goto out;
            }
            t[p] = run_mix(&tu, m, 0);
        }
        if (t[0].out != RUN_OK || t[1].out != RUN_OK) {
            fprintf(stderr, PROGRAM ": the mixture at T=%zu d=%zu %s on "
                    "%s\n", m->t, m->data->d,
                    t[0].out == RUN_OK && t[1].out == RUN_WRONG
                        ? "differs between cl/linear.cl and CLBlast"
                        : "failed",
                    t[0].out != RUN_OK ? "cl/linear.cl" : "CLBlast");
            goto out;
        }
        say("  T=%-4zu d=%-4zu %9.1f %9.1f   %.2f\n", m->t, m->data->d,
            mix_gflops(m->t, m->data->d, t[0].s),
            mix_gflops(m->t, m->data->d, t[1].s), t[0].s / t[1].s);
        json_array_append_new(points,
                              json_pack("{s:I, s:I, s:f, s:f}", "T",
                                        (json_int_t)m->t, "d",
                                        (json_int_t)m->data->d, "linear_s",
                                        t[0].s, "clblast_s", t[1].s));
    }
    char *text = json_dumps(points, JSON_COMPACT);
    if (text) {
        printf(RESULT_MARK "%s\n", text);
        fflush(stdout);
        rc = 0;
    }
    free(text);
out:
    json_decref(points);
    json_decref(set);
    json_decref(tu.kernels_base);
    free_mix(&tu);
    atmoe_context_free(tu.ctx);
    return rc;
}

extern char **environ;

/* Runs the boundary's child with CLBlast's sets clblast (NULL: its
 * built-in ones) and blocks sr x st; its progress goes on to stdout, its
 * points (an array of {T, d, linear_s, clblast_s}) to *points.  A fresh
 * process, because CLBlast cannot go back to its built-in parameters: the
 * kernels the chosen sets leave out have those of the last candidate
 * here. */
static int spawn_boundary(const tuner *tu, const json_t *clblast, int sr,
                          int st, json_t **points)
{
    *points = NULL;
    json_t *set = json_pack("{s:o}", "kernels", linear_kernels(tu, sr, st, 0));
    if (set && clblast)
        json_object_set(set, "clblast", (json_t *)clblast);
    char *text = set ? json_dumps(set, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(set);
    if (text == NULL)
        return -1;
    char runs[16], seed[32];
    snprintf(runs, sizeof runs, "%d", tu->opt.runs);
    snprintf(seed, sizeof seed, "%lu", tu->opt.seed);
    const char *argv[20];
    int n = 0;
    argv[n++] = self_name;
    argv[n++] = "--boundary-child";
    argv[n++] = text;
    argv[n++] = "--sizes";
    argv[n++] = tu->opt.small && tu->opt.full ? "all"
                : tu->opt.small               ? "small"
                                              : "full";
    argv[n++] = "--runs";
    argv[n++] = runs;
    argv[n++] = "--seed";
    argv[n++] = seed;
    argv[n++] = "--clock";
    argv[n++] = tu->opt.cpu_clock ? "cpu" : "wall";
    if (tu->opt.device) {
        argv[n++] = "--device";
        argv[n++] = tu->opt.device;
    }
    if (tu->opt.quiet)
        argv[n++] = "--quiet";
    argv[n] = NULL;

    int fds[2];
    if (pipe(fds) != 0) {
        free(text);
        return -1;
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&fa, fds[0]);
    posix_spawn_file_actions_addclose(&fa, fds[1]);
    pid_t pid;
    /* Linux names the running program in /proc; elsewhere argv[0] is
     * looked up as the shell did. */
    int err = access("/proc/self/exe", X_OK) == 0
                  ? posix_spawn(&pid, "/proc/self/exe", &fa, NULL,
                                (char *const *)argv, environ)
                  : posix_spawnp(&pid, self_name, &fa, NULL,
                                 (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    free(text);
    close(fds[1]);
    if (err != 0) {
        close(fds[0]);
        fprintf(stderr, PROGRAM ": cannot run %s: %s\n", self_name,
                strerror(err));
        return -1;
    }
    FILE *f = fdopen(fds[0], "r");
    char *line = NULL;
    size_t cap = 0;
    size_t mark = strlen(RESULT_MARK);
    while (f && getline(&line, &cap, f) > 0) {
        if (strncmp(line, RESULT_MARK, mark) == 0) {
            json_decref(*points);
            *points = json_loads(line + mark, 0, NULL);
        } else {
            say("%s", line);
        }
    }
    free(line);
    if (f)
        fclose(f);
    else
        close(fds[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
        !json_is_array(*points)) {
        json_decref(*points);
        *points = NULL;
        return -1;
    }
    return 0;
}

/* MAX_TOKENS from the boundary's points: the largest T up to which
 * cl/linear.cl is slower than CLBlast by no more than LINEAR_SLACK (the
 * geometric mean over the sizes of their time ratios), at least
 * MIN_MAX_TOKENS; 0 (no limit) when it is nowhere slower by more. */
static long pick_max_tokens(const json_t *points)
{
    static const size_t ts[] = {16, 32, 64, 128, 256, 512};
    long max = 0;
    say("  %-6s linear/CLBlast time (geometric mean over the sizes)\n", "T");
    for (int k = 0; k < 6; k++) {
        double logsum = 0;
        int n = 0;
        size_t i;
        json_t *p;
        json_array_foreach(points, i, p) {
            if ((size_t)json_integer_value(json_object_get(p, "T")) != ts[k])
                continue;
            logsum += log(json_number_value(json_object_get(p, "linear_s")) /
                          json_number_value(json_object_get(p, "clblast_s")));
            n++;
        }
        if (n == 0)
            continue;
        double ratio = exp(logsum / n);
        say("  %-6zu %.2f%s\n", ts[k], ratio,
            ratio > LINEAR_SLACK ? "  CLBlast from here" : "");
        if (ratio > LINEAR_SLACK)
            return max > MIN_MAX_TOKENS ? max : MIN_MAX_TOKENS;
        max = (long)ts[k];
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The run                                                                   */
/* ------------------------------------------------------------------------ */

/* The GEMMs timed: T = 16, 64 and 512 at each width --sizes asks for,
 * and decode's T = 1 and 16 at the SPEC's d = 4096.  CLBlast routes by the
 * volume m n k alone and Xgemm pads T to whole tiles, so a threshold that
 * sends T = 16 at d = 1024 indirect sends T = 1 at d = 4096 (the same
 * volume) there too: a quick run's routing, timed at d = 1024 only, made
 * the decode GEMMs 2x slower. */
static int setup_shapes(tuner *tu)
{
    static const size_t wide[] = {1, 16, 64, 512}, narrow[] = {16, 64, 512},
                        decode[] = {1, 16};
    size_t ds[3];
    int nd = tuned_widths(tu, ds);
    if (ds[nd - 1] != 4096)
        ds[nd++] = 4096;
    for (int k = 0; k < nd; k++) {
        size_t d = ds[k], shp[2] = {d, d};
        const size_t *ts = d != 4096 ? narrow
                           : tu->opt.full ? wide
                                          : decode;
        int nt = d != 4096 ? 3 : tu->opt.full ? 4 : 2, first = tu->nshapes;
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
        for (int j = 0; j < nt; j++) {
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
        for (int j = first; j < tu->nshapes; j++) {
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

/* The output database's entry for this device and driver (a copy), or
 * NULL. */
static json_t *previous_entry(const char *path, const atmoe_device_info *dev)
{
    json_t *root = json_load_file(path, 0, NULL), *found = NULL;
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(root, "entries"), i, e) {
        const char *dn = json_string_value(json_object_get(e, "device"));
        const char *dr = json_string_value(json_object_get(e, "driver"));
        if (dn && dr && strcmp(dn, dev->name) == 0 &&
            strcmp(dr, dev->driver_version) == 0) {
            json_decref(found);
            found = json_deep_copy(e);
        }
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

static json_t *blocks_report(const tuner *tu, const blocks_result *b)
{
    json_t *arr = json_array();
    for (int i = 0; i < tu->nmix; i++) {
        const mix_shape *m = &tu->mix[i];
        json_array_append_new(
            arr, json_pack("{s:I, s:I, s:f, s:f}", "T", (json_int_t)m->t, "d",
                           (json_int_t)m->data->d, "default_gflops",
                           mix_gflops(m->t, m->data->d, m->base_s),
                           "tuned_gflops",
                           mix_gflops(m->t, m->data->d, b->t[i].s)));
    }
    return json_pack("{s:i, s:i, s:f, s:{s:i, s:i, s:i}, s:o}", "SR", b->sr,
                     "ST", b->st, "speedup", b->score, "candidates", "timed",
                     tu->blocks_timed, "wrong", tu->blocks_wrong, "failed",
                     tu->blocks_failed, "shapes", arr);
}

static json_t *boundary_report(const json_t *points, long max_tokens)
{
    json_t *arr = json_array();
    size_t i;
    json_t *p;
    json_array_foreach(points, i, p) {
        size_t t = (size_t)json_integer_value(json_object_get(p, "T"));
        size_t d = (size_t)json_integer_value(json_object_get(p, "d"));
        json_array_append_new(
            arr,
            json_pack("{s:I, s:I, s:f, s:f}", "T", (json_int_t)t, "d",
                      (json_int_t)d, "linear_gflops",
                      mix_gflops(t, d, json_number_value(
                                           json_object_get(p, "linear_s"))),
                      "clblast_gflops",
                      mix_gflops(t, d, json_number_value(
                                           json_object_get(p, "clblast_s")))));
    }
    json_t *o = json_pack("{s:o}", "points", arr);
    json_object_set_new(o, "MAX_TOKENS", max_tokens > 0
                                             ? json_integer(max_tokens)
                                             : json_string("unlimited"));
    return o;
}

/* What the CLBlast phases leave: keep points to the set kept (NULL:
 * CLBlast's built-in parameters). */
typedef struct clblast_run {
    result best_x, best_d, final, prev;
    const result *keep;
} clblast_run;

/* The xgemm, direct and final phases, after the baseline, until
 * budget_end; prev_entry's CLBlast sets are timed too. */
static int tune_clblast(tuner *tu, double budget_end, const json_t *prev_entry,
                        clblast_run *cr)
{
    const options *opt = &tu->opt;
    double left = budget_end - now_s();
    double xgemm_end = now_s() + (opt->direct ? 0.65 : 1.0) * left;
    /* The shapes CLBlast runs direct by default keep that time if the
     * indirect path cannot beat it. */
    for (int i = 0; i < tu->nshapes; i++)
        tu->other[i] = tu->shapes[i].base_direct ? tu->shapes[i].base_s : 0;
    json_t *none = json_object();
    search(tu, "xgemm", xgemm_end, sample_xgemm, "Xgemm", none, ALL_INDIRECT,
           NULL, &cr->best_x);
    json_decref(none);
    if (!cr->best_x.set) {
        fprintf(stderr, PROGRAM ": no Xgemm candidate could be measured\n");
        return EXIT_RUNTIME;
    }
    json_t *xgemm = json_object_get(json_object_get(cr->best_x.set, "clblast"),
                                    "Xgemm");
    json_t *fixed = json_pack("{s:O}", "Xgemm", xgemm);
    for (int i = 0; i < tu->nshapes; i++)
        tu->other[i] = timed(&cr->best_x.t[i]) ? cr->best_x.t[i].s : 0;
    if (opt->direct)
        search(tu, "direct", budget_end, sample_direct, "XgemmDirect", fixed,
               ALL_DIRECT, direct_shape, &cr->best_d);

    route rt;
    if (!pick_route(tu, &cr->best_x, &cr->best_d, &rt)) {
        json_decref(fixed);
        say("no set keeps every shape within %.0f%% of CLBlast's own "
            "parameters\n", 100 * (NO_HARM - 1));
    } else {
        /* The Xgemm set goes into the entry only when a measured shape
         * runs it: else it would serve only the GEMMs larger than every
         * shape timed (d = 4096 after --sizes small), where nothing
         * showed it faster than CLBlast's own (the best of a sample that
         * was slow on every shape is still the best). */
        int uses_xgemm = 0;
        for (int i = 0; i < tu->nshapes; i++)
            uses_xgemm |= !routes_direct(&tu->shapes[i], &rt);
        json_t *cl = uses_xgemm ? json_deep_copy(fixed) : json_object();
        json_decref(fixed);
        if (!uses_xgemm)
            say("no shape runs the Xgemm set: CLBlast's own stays for the "
                "GEMMs the route sends indirect\n");
        if (rt.tuned_direct)
            json_object_set(cl, "XgemmDirect",
                            json_object_get(json_object_get(cr->best_d.set,
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
        memset(tu->other, 0, sizeof tu->other);
        evaluate(tu, final_set, "final", NULL, NULL, &cr->final);
        json_decref(final_set);
    }

    json_t *old_cl = json_object_get(prev_entry, "clblast");
    if (json_object_size(old_cl) > 0) {
        json_t *old = json_pack("{s:O}", "clblast", old_cl);
        evaluate(tu, old, "previous", NULL, NULL, &cr->prev);
        json_decref(old);
    }
    cr->keep = NULL;
    /* Timed again, the final set must still slow no shape past NO_HARM
     * (the routing was scored on the phases' times). */
    if (cr->final.valid && cr->final.score > MIN_GAIN) {
        if (harmless(tu, &cr->final))
            cr->keep = &cr->final;
        else
            say("the final set slows a shape by more than %.0f%% timed "
                "again: CLBlast's own parameters stay\n",
                100 * (NO_HARM - 1));
    }
    if (cr->prev.valid &&
        cr->prev.score >= (cr->keep ? cr->keep->score : 1.0) &&
        harmless(tu, &cr->prev))
        cr->keep = &cr->prev;
    const result *keep = cr->keep;

    if (opt->compare_layout && keep) {
        /* Parameters are already the final set's when no previous entry
         * was timed after it. */
        char *text = json_dumps(keep->set, JSON_COMPACT);
        atmoe_status st = atmoe_context_set_params(tu->ctx, text);
        free(text);
        for (int i = 0; st == ATMOE_STATUS_OK && i < tu->nshapes; i++) {
            timing nn = run_shape(tu->ctx, &tu->shapes[i], 0, opt->runs, 0);
            tu->shapes[i].final_nn_s = nn.out == RUN_OK ? nn.s : 0;
        }
    }

    say("\n%-12s %9s %9s", "shape", "default", "tuned");
    if (opt->compare_layout)
        say(" %9s %9s", "dflt W^T", "tuned W^T");
    say("   GFLOP/s (W^T: weight stored transposed, no TransB)\n");
    for (int i = 0; i < tu->nshapes; i++) {
        shape *s = &tu->shapes[i];
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
        "wrong, %d failed; %.0f s\n", tu->evaluated, tu->refused, tu->wrong,
        tu->failed, now_s() - tu->start);
    say("geometric-mean speed-up over CLBlast's defaults: %.2fx\n",
        keep ? keep->score : 1.0);
    return 0;
}

static void phases_text(const options *opt, char *out, size_t size)
{
    unsigned phases = opt->phases;
    size_t at = (size_t)snprintf(out, size, "%s%s%s",
                                 phases & PHASE_CLBLAST ? ",clblast" : "",
                                 phases & PHASE_BLOCKS ? ",blocks" : "",
                                 phases & PHASE_BOUNDARY ? ",boundary" : "");
    for (int i = 0; i < tk_count() && at < size; i++)
        if ((phases & PHASE_TABLE) && (opt->rows & (1u << i)))
            at += (size_t)snprintf(out + at, size - at, ",%s",
                                   tk_at(i)->name);
    memmove(out, out + 1, strlen(out));
}

/* The table's rows that opt selects, each until its share of what is left
 * of the budget; their values and reports into out's kernels and info. */
static int tune_table(tuner *tu, double budget_end, json_t *out)
{
    tk_env env = {tu->ctx, tu->opt.runs, tu->opt.small, tu->opt.full,
                  tu->opt.full_space, &rng_state, clock_s, tu->kernels_base,
                  tu->opt.quiet, tu->opt.step != NULL};
    int left = 0;
    for (int i = 0; i < tk_count(); i++)
        left += (tu->opt.rows >> i) & 1u;
    for (int i = 0; i < tk_count(); i++) {
        if (!(tu->opt.rows & (1u << i)))
            continue;
        double end = now_s() + (budget_end - now_s()) / left--;
        int rc = tk_tune(tk_at(i), &env, end, out);
        if (rc != 0)
            return EXIT_RUNTIME;
    }
    return 0;
}

/* What the table's rows wrote into from: into entry's kernels (their
 * parameters beside the others of each program) and info. */
static void table_into_entry(const json_t *from, json_t *entry)
{
    json_t *kernels = json_object_get(entry, "kernels");
    if (!json_is_object(kernels)) {
        kernels = json_object();
        json_object_set_new(entry, "kernels", kernels);
    }
    const char *program;
    json_t *set;
    json_object_foreach(json_object_get(from, "kernels"), program, set) {
        json_t *prog = json_object_get(kernels, program);
        if (!json_is_object(prog)) {
            prog = json_object();
            json_object_set_new(kernels, program, prog);
        }
        json_object_update(prog, set);
    }
    json_t *info = json_object_get(entry, "info");
    if (json_is_object(info))
        json_object_update(info, json_object_get(from, "info"));
}

/* The new entry: the previous one with what this run tuned in place of
 * what it had (info included), so that a run of some phases keeps the
 * others' results. */
static json_t *make_entry(const tuner *tu, const json_t *prev,
                          const clblast_run *cr, const blocks_result *blocks,
                          const json_t *points, long max_tokens)
{
    const options *opt = &tu->opt;
    json_t *entry = prev ? json_deep_copy(prev) : json_object();
    static const char *const keys[] = {"device", "vendor", "type", "driver"};
    for (int i = 0; i < 4; i++)
        json_object_del(entry, keys[i]);

    if (opt->phases & PHASE_CLBLAST) {
        if (cr->keep)
            json_object_set(entry, "clblast",
                            json_object_get(cr->keep->set, "clblast"));
        else
            json_object_del(entry, "clblast");
    }
    json_t *kernels = json_object_get(entry, "kernels");
    if (!json_is_object(kernels)) {
        kernels = json_object();
        json_object_set_new(entry, "kernels", kernels);
    }
    const char *program = blocks_program(opt);
    json_t *blk = json_object_get(kernels, program);
    if (!json_is_object(blk)) {
        blk = json_object();
        json_object_set_new(kernels, program, blk);
    }
    if (opt->phases & PHASE_BLOCKS) {
        json_object_set_new(blk, "SR", json_integer(blocks->sr));
        json_object_set_new(blk, "ST", json_integer(blocks->st));
    }
    if (json_object_size(blk) == 0)
        json_object_del(kernels, program);
    json_t *lin = json_object_get(kernels, "linear");
    if (!json_is_object(lin)) {
        lin = json_object();
        json_object_set_new(kernels, "linear", lin);
    }
    if (points) {
        if (max_tokens > 0)
            json_object_set_new(lin, "MAX_TOKENS", json_integer(max_tokens));
        else
            json_object_del(lin, "MAX_TOKENS");
    }
    if (json_object_size(lin) == 0)
        json_object_del(kernels, "linear");
    if (json_object_size(kernels) == 0)
        json_object_del(entry, "kernels");

    json_t *info = json_object_get(entry, "info");
    if (!json_is_object(info)) {
        info = json_object();
        json_object_set_new(entry, "info", info);
    }
    time_t now = time(NULL);
    char date[32], tool[64], phases[64];
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    snprintf(tool, sizeof tool, PROGRAM " %s", atmoe_version());
    phases_text(opt, phases, sizeof phases);
    json_object_set_new(info, "tool", json_string(tool));
    json_object_set_new(info, "date", json_string(date));
    json_object_set_new(info, "budget_s", json_real(opt->budget_s));
    json_object_set_new(info, "phases", json_string(phases));
    /* The machine the entry was tuned on: atmoe params tells an entry
     * tuned here from one copied from elsewhere. */
    char host[256];
    if (gethostname(host, sizeof host) == 0) {
        host[sizeof host - 1] = '\0';
        json_object_set_new(info, "host", json_string(host));
    }
    if (opt->phases & PHASE_CLBLAST) {
        const result *keep = cr->keep;
        json_t *c = json_pack(
            "{s:s, s:f, s:{s:i, s:i, s:i, s:i}, s:o}", "result",
                      keep == &cr->prev    ? "the previous entry stays the "
                                             "best"
                      : keep == &cr->final ? "tuned parameters"
                                           : "CLBlast's built-in parameters "
                                             "were the fastest",
                      "speedup", keep ? keep->score : 1.0, "candidates",
                      "timed", tu->evaluated, "refused", tu->refused, "wrong",
                      tu->wrong, "failed", tu->failed, "shapes",
                      shape_report(tu, keep));
        json_object_update(info, c);
        json_decref(c);
    }
    if (opt->phases & PHASE_LINEAR) {
        json_t *li = json_object_get(info, program);
        if (!json_is_object(li)) {
            li = json_object();
            json_object_set_new(info, program, li);
        }
        if (opt->phases & PHASE_BLOCKS)
            json_object_set_new(li, "blocks", blocks_report(tu, blocks));
        if (points)
            json_object_set_new(li, "boundary",
                                boundary_report(points, max_tokens));
    }
    return entry;
}

static int tune(options *opt)
{
    tuner tu;
    memset(&tu, 0, sizeof tu);
    tu.opt = *opt;
    tu.start = now_s();
    rng_state = opt->seed;
    /* Candidates are measured against CLBlast's own parameters and the
     * library's own blocks and boundary, whatever a database or the
     * environment says; the boundary's child inherits both. */
    setenv("ATMOE_PARAMS", "default", 1);
    if (getenv("ATMOE_LINEAR_MAX_TOKENS")) {
        say("ATMOE_LINEAR_MAX_TOKENS is ignored: the tuner sets the boundary "
            "itself\n");
        unsetenv("ATMOE_LINEAR_MAX_TOKENS");
    }
    atmoe_status st = atmoe_context_new(opt->device, &tu.ctx);
    if (st != ATMOE_STATUS_OK)
        return lib_fail(NULL, st, "opening the device");
    atmoe_device_info dev;
    atmoe_context_get_device(tu.ctx, &dev);
    use_cpu_clock = opt->cpu_clock;
    cpu_units = dev.compute_units ? dev.compute_units : 1;
    char user[4096];
    const char *out_path = opt->output;
    if (out_path == NULL) {
        if ((st = atmoe_tuning_get_user_path(user, sizeof user)) !=
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
    json_t *prev = previous_entry(out_path, &dev);
    json_t *prev_lin = json_object_get(json_object_get(prev, "kernels"),
                                       blocks_program(opt));
    json_t *v;
    int prev_sr = json_is_integer(v = json_object_get(prev_lin, "SR"))
                      ? (int)json_integer_value(v)
                      : 0;
    int prev_st = json_is_integer(v = json_object_get(prev_lin, "ST"))
                      ? (int)json_integer_value(v)
                      : 0;
    if (prev_sr < 1 || prev_sr > 256 || prev_st < 1 || prev_st > 256)
        prev_sr = prev_st = 0;
    tu.kernels_base = json_deep_copy(json_object_get(prev, "kernels"));
    if (opt->phases == PHASE_TABLE) {
        /* The rows run with what the entry has (the blocks tuned before
         * among it), their own parameters replaced (tune_kernels.c). */
    } else if (opt->dtype == ATMOE_DTYPE_F32) {
        json_object_del(tu.kernels_base, "linear");
    } else {
        json_object_del(tu.kernels_base, blocks_program(opt));
    }

    char phases[256];
    phases_text(opt, phases, sizeof phases);
    say("tuning %s on %s (%s, driver %s), budget %.0f s, seed %lu, %s "
        "clock, weights in %s (%s)\n", phases, dev.name,
        atmoe_vendor_name(dev.vendor), dev.driver_version, opt->budget_s,
        opt->seed, opt->cpu_clock ? "processor" : "wall",
        atmoe_dtype_name(opt->dtype), blocks_program(opt));
    double budget_end = tu.start + opt->budget_s;
    clblast_run cr;
    memset(&cr, 0, sizeof cr);
    blocks_result blocks;
    memset(&blocks, 0, sizeof blocks);
    json_t *entry = NULL, *points = NULL, *table = json_object();
    long max_tokens = 0;
    int rc = 0;

    if (opt->phases & PHASE_CLBLAST) {
        say("GFLOP/s per shape (y = x W^T, row-major):\n");
        if ((rc = setup_shapes(&tu)) != 0)
            goto out;
        say("  %-8s", "shape");
        for (int i = 0; i < tu.nshapes; i++)
            say(" %5zu/%zuk", tu.shapes[i].t, tu.shapes[i].d / 1024);
        say("   (T/d)\n");
    }
    if (opt->phases & PHASE_BLOCKS) {
        double share = opt->phases & PHASE_CLBLAST ? BLOCKS_SHARE : 1.0;
        double end = now_s() + share * (budget_end - now_s());
        if ((rc = tune_blocks(&tu, end, prev_sr, prev_st, &blocks)) != 0)
            goto out;
        say("linear blocks: %dx%d, %.2fx 8x8 (geometric mean)\n", blocks.sr,
            blocks.st, blocks.score);
    }
    if (opt->phases & PHASE_CLBLAST) {
        if (tu.nmix > 0)
            say("\nCLBlast:\n");
        if ((rc = tune_clblast(&tu, budget_end, prev, &cr)) != 0)
            goto out;
    }
    if (opt->phases & PHASE_BOUNDARY) {
        int sr = opt->phases & PHASE_BLOCKS ? blocks.sr
                 : prev_sr                  ? prev_sr
                                            : BASE_SR;
        int bst = opt->phases & PHASE_BLOCKS ? blocks.st
                  : prev_st                  ? prev_st
                                             : BASE_ST;
        const json_t *cl = opt->phases & PHASE_CLBLAST
                               ? (cr.keep ? json_object_get(cr.keep->set,
                                                            "clblast")
                                          : NULL)
                               : json_object_get(prev, "clblast");
        if (json_object_size(cl) == 0)
            cl = NULL;
        say("\nlinear boundary: GFLOP/s of the mixture on cl/linear.cl "
            "(%dx%d blocks) and on CLBlast (%s):\n", sr, bst,
            cl ? "the chosen sets" : "its built-in parameters");
        say("  %-6s %-6s %9s %9s   %s\n", "T", "d", "linear", "CLBlast",
            "time ratio");
        if (spawn_boundary(&tu, cl, sr, bst, &points) != 0) {
            fprintf(stderr, PROGRAM ": the boundary phase failed; the entry "
                    "keeps its MAX_TOKENS\n");
            rc = EXIT_RUNTIME;
        } else {
            max_tokens = pick_max_tokens(points);
            if (max_tokens > 0)
                say("linear boundary: MAX_TOKENS %ld\n", max_tokens);
            else
                say("linear boundary: no MAX_TOKENS (cl/linear.cl runs "
                    "every batch)\n");
        }
    }

    if (opt->phases & PHASE_TABLE) {
        if ((rc = tune_table(&tu, budget_end, table)) != 0)
            goto out;
    }
    entry = make_entry(&tu, prev, &cr, &blocks, points, max_tokens);
    if (entry && (opt->phases & PHASE_TABLE))
        table_into_entry(table, entry);
    /* The candidates of this step that crashed or hung an earlier run of
     * it (the --effort driver's journal), in the report. */
    json_t *lost = journal_lost();
    json_t *einfo = entry ? json_object_get(entry, "info") : NULL;
    if (json_is_object(einfo) && opt->step) {
        json_t *all = json_object_get(einfo, "lost_candidates");
        if (!json_is_object(all)) {
            all = json_object();
            json_object_set_new(einfo, "lost_candidates", all);
        }
        if (lost)
            json_object_set(all, opt->step, lost);
        else
            json_object_del(all, opt->step);
        if (json_object_size(all) == 0)
            json_object_del(einfo, "lost_candidates");
    }
    json_decref(lost);
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
            say("entry for %s written to %s (%.0f s)\n", dev.name, out_path,
                now_s() - tu.start);
    }
out:
    json_decref(entry);
    json_decref(table);
    json_decref(points);
    json_decref(prev);
    json_decref(tu.kernels_base);
    result_clear(&cr.best_x);
    result_clear(&cr.best_d);
    result_clear(&cr.final);
    result_clear(&cr.prev);
    for (int i = 0; i < tu.nshapes; i++) {
        if (tu.shapes[i].owns_w) {
            atmoe_tensor_free(tu.shapes[i].w);
            atmoe_tensor_free(tu.shapes[i].wt);
        }
        free(tu.shapes[i].x);
        free(tu.shapes[i].ref);
    }
    free_mix(&tu);
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
            "                  [--phases LIST] [--runs N] [--seed N] "
            "[--no-direct]\n"
            "                  [--compare-layout] [--clock wall|cpu] "
            "[--output FILE]\n"
            "                  [--dtype f32|f16|bf16] [--dry-run] [--quiet]\n"
            "       " PROGRAM " --effort quick|normal|exhaustive [--resume] "
            "[--device D | --all-devices]\n"
            "                  [--output FILE] [--seed N] [--clock wall|cpu] "
            "[--quiet]\n"
            "       " PROGRAM " --check FILE\n"
            "\n"
            "Searches CLBlast's SGEMM parameters and those of the library's "
            "linear kernel\nfor a device and stores the best in the user's "
            "tuning database (see\n" PROGRAM "(1)).  LIST: comma-separated "
            "clblast, blocks, boundary, linear\n(blocks,boundary), groups "
            "(the router's and the mixture's work-groups) or all\n"
            "(clblast,blocks,boundary: the default), or the library's "
            "kernels by name:\n");
    for (int i = 0; i < tk_count(); i++)
        fprintf(f, "  %-14s %s\n", tk_at(i)->name, tk_at(i)->what);
    fprintf(f,
            "--dtype f16 or bf16 tunes the blocks of products over weights "
            "of that type\n(linear.f16, linear.bf16) alone.\n"
            "--effort tunes every kernel with parameters, for every weight "
            "type, step by\nstep, with a checkpoint after each step that "
            "--resume continues from.\n");
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

/* A comma-separated list of phase names: the phases, and the table's
 * rows (tune_kernels.c) by name; "groups" is router,mixture. */
static int parse_phases(const char *text, unsigned *out, unsigned *rows)
{
    static const struct {
        const char *name;
        unsigned bits;
    } names[] = {{"clblast", PHASE_CLBLAST}, {"blocks", PHASE_BLOCKS},
                 {"boundary", PHASE_BOUNDARY}, {"linear", PHASE_LINEAR},
                 {"all", PHASE_ALL}};
    unsigned bits = 0, r = 0;
    const char *p = text;
    for (;;) {
        size_t n = strcspn(p, ",");
        char name[64];
        snprintf(name, sizeof name, "%.*s", (int)(n < 63 ? n : 63), p);
        size_t k = 0;
        while (k < sizeof names / sizeof names[0] &&
               strcmp(name, names[k].name) != 0)
            k++;
        int row = -1;
        for (int i = 0; i < tk_count() && row < 0; i++)
            if (strcmp(name, tk_at(i)->name) == 0)
                row = i;
        if (k < sizeof names / sizeof names[0]) {
            bits |= names[k].bits;
        } else if (row >= 0) {
            bits |= PHASE_TABLE;
            r |= 1u << row;
        } else if (strcmp(name, "groups") == 0) {
            bits |= PHASE_TABLE;
            for (int i = 0; i < tk_count(); i++)
                if (strcmp(tk_at(i)->name, "router") == 0 ||
                    strcmp(tk_at(i)->name, "mixture") == 0)
                    r |= 1u << i;
        } else {
            char rows_text[256];
            size_t at = 0;
            rows_text[0] = '\0';
            for (int i = 0; i < tk_count() && at < sizeof rows_text; i++)
                at += (size_t)snprintf(rows_text + at, sizeof rows_text - at,
                                       "%s, ", tk_at(i)->name);
            fprintf(stderr, PROGRAM ": --phases takes clblast, blocks, "
                    "boundary, linear, all, groups (router,mixture) or a "
                    "kernel of the table (%sseparated by commas), not "
                    "'%s'\n", rows_text, text);
            return -1;
        }
        if (p[n] == '\0')
            break;
        p += n + 1;
    }
    *out = bits;
    *rows = r;
    return 0;
}

int main(int argc, char **argv)
{
    options opt = {NULL, NULL, 300, 3, 1, 0, 0, 0, 1, 1, 1, 0, PHASE_ALL,
                   NULL, ATMOE_DTYPE_F32, 0, 1, NULL};
    const char *journal = NULL;
    int phases_given = 0;
    self_name = argv[0];
    const char *check = NULL;
    effort_args eff = {argv[0], NULL, NULL, 0, NULL, 0, 0, 0, 0};
    const char *step = NULL;
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
        } else if (strcmp(a, "--resume") == 0) {
            eff.resume = 1;
        } else if (strcmp(a, "--all-devices") == 0) {
            eff.all_devices = 1;
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
        } else if (strcmp(a, "--effort") == 0) {
            eff.effort = argv[++i];
            if (!effort_known(eff.effort)) {
                fprintf(stderr, PROGRAM ": --effort is quick, normal or "
                        "exhaustive, not '%s'\n", eff.effort);
                return EXIT_USAGE;
            }
        } else if (strcmp(a, "--step") == 0) {
            step = argv[++i];
        } else if (strcmp(a, "--journal") == 0) {
            journal = argv[++i];
        } else if (strcmp(a, "--space") == 0) {
            v = argv[++i];
            if (strcmp(v, "quick") != 0 && strcmp(v, "full") != 0) {
                fprintf(stderr, PROGRAM ": --space is quick or full, not "
                        "'%s'\n", v);
                return EXIT_USAGE;
            }
            opt.full_space = strcmp(v, "full") == 0;
        } else if (strcmp(a, "--boundary-child") == 0) {
            opt.child = argv[++i];
        } else if (strcmp(a, "--phases") == 0) {
            if (parse_phases(argv[++i], &opt.phases, &opt.rows))
                return EXIT_USAGE;
            phases_given = 1;
        } else if (strcmp(a, "--dtype") == 0) {
            v = argv[++i];
            if (strcmp(v, "f32") == 0)
                opt.dtype = ATMOE_DTYPE_F32;
            else if (strcmp(v, "f16") == 0)
                opt.dtype = ATMOE_DTYPE_F16;
            else if (strcmp(v, "bf16") == 0)
                opt.dtype = ATMOE_DTYPE_BF16;
            else {
                fprintf(stderr, PROGRAM ": --dtype is f32, f16 or bf16, not "
                        "'%s'\n", v);
                return EXIT_USAGE;
            }
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
    /* CLBlast reads f32 and the boundary is untyped: a run for half
     * weights tunes their blocks alone. */
    if (opt.dtype != ATMOE_DTYPE_F32) {
        if (phases_given && opt.phases != PHASE_BLOCKS) {
            fprintf(stderr, PROGRAM ": --dtype %s tunes the blocks alone "
                    "(--phases blocks)\n", atmoe_dtype_name(opt.dtype));
            return EXIT_USAGE;
        }
        opt.phases = PHASE_BLOCKS;
    }
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
    if (opt.child)
        return boundary_child(&opt);
    if ((eff.resume || eff.all_devices) && eff.effort == NULL) {
        fprintf(stderr, PROGRAM ": %s goes with --effort\n",
                eff.resume ? "--resume" : "--all-devices");
        return EXIT_USAGE;
    }
    if (eff.effort) {
        if (phases_given || opt.dtype != ATMOE_DTYPE_F32) {
            fprintf(stderr, PROGRAM ": --effort runs every phase for every "
                    "weight type; it takes no --phases or --dtype\n");
            return EXIT_USAGE;
        }
        if (eff.all_devices && opt.device) {
            fprintf(stderr, PROGRAM ": --all-devices or --device, not "
                    "both\n");
            return EXIT_USAGE;
        }
        char user[4096];
        if (opt.output == NULL) {
            atmoe_status st = atmoe_tuning_get_user_path(user, sizeof user);
            if (st != ATMOE_STATUS_OK)
                return lib_fail(NULL, st, "finding the user database");
            opt.output = user;
        }
        eff.device = opt.device;
        eff.output = opt.output;
        eff.seed = opt.seed;
        eff.cpu_clock = opt.cpu_clock;
        eff.quiet = opt.quiet;
        return tune_effort(&eff);
    }
    if (step)
        effort_test_knob(step);
    opt.step = step;
    journal_open(journal, opt.device, step);
    return tune(&opt);
}
