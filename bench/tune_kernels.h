/* atmoe-tune: the library's own tunable kernels as a table (see
 * tune_kernels.c).  A row names the database program and its parameters,
 * their candidate values per effort, the device's constraints on them, a
 * workload at canonical shapes and the tolerance within which every
 * candidate's output must match the reference configuration's (the
 * library's defaults) before its time counts.  Adding a tunable kernel is
 * adding a row. */
#ifndef ATMOE_BENCH_TUNE_KERNELS_H
#define ATMOE_BENCH_TUNE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "atmoe.h"

#define TK_MAX_PARAMS 5
#define TK_MAX_VALUES 16
#define TK_MAX_SHAPES 4

/* What the tuner lends a row's search. */
typedef struct tk_env {
    atmoe_context *ctx;
    int runs;         /* timed runs per shape, after the checked first run */
    int small, full;  /* --sizes */
    int full_space;   /* the candidate values of normal and exhaustive */
    uint64_t *rng;    /* the tuner's splitmix64 stream */
    double (*clock)(void); /* what a run's time is measured by */
    /* The entry's kernels section so far: every run applies it, with the
     * row's own parameters replaced. */
    const json_t *kernels_base;
    int quiet;
    /* A step of --effort: there a row that CPU devices leave off is
     * skipped on them (asked for by --phases, it runs, forced). */
    int effort_step;
} tk_env;

typedef struct tk_kernel tk_kernel;

/* A workload: the data of its canonical shapes (made once), and for each
 * shape what the parameters in force change (a plan), one run, and its
 * output, which the search compares with the reference's. */
typedef struct tk_workload {
    /* Makes the shapes the sizes ask for: their count (at most
     * TK_MAX_SHAPES), each one's name and output size; -1 on failure, with
     * a message on stderr.  *state is freed by teardown either way. */
    int (*setup)(const tk_env *env, const tk_kernel *row, void **state,
                 char names[][48], size_t *out_count);
    /* Shape i with the parameters in force (plans, makes the optimiser). */
    atmoe_status (*prepare)(void *state, int i);
    /* One run of shape i, finished on the device. */
    atmoe_status (*run)(void *state, int i);
    /* Shape i's output since its last run into out (out_count floats). */
    atmoe_status (*read)(void *state, int i, float *out);
    void (*release)(void *state, int i);
    void (*teardown)(void *state);
} tk_workload;

typedef struct tk_param {
    const char *name;         /* kernels.<program>.<name> */
    int def_cpu, def_other;   /* the library's defaults (lib/device/tuning.c):
                                 the reference configuration */
    int quick[TK_MAX_VALUES]; /* candidates at --effort test and quick,
                                 0-terminated */
    int full[TK_MAX_VALUES];  /* at normal and exhaustive, and alone */
} tk_param;

struct tk_kernel {
    const char *name;    /* the step and --phases name */
    const char *program; /* the database program */
    const char *what;    /* for the progress lines */
    tk_param params[TK_MAX_PARAMS];
    /* Macros of program every run takes, the reference's included: what
     * makes the parameters matter (the variant that reads them). */
    const char *fixed;
    /* The device's constraints on values (in the order of params): 0 when
     * it can run them, else -1 with why. */
    int (*fits)(const int *values, const atmoe_device_info *dev, char *why,
                size_t size);
    const tk_workload *work;
    const size_t *ts; /* the batches a mixture or router workload times */
    int nts;
    /* The variant that fixed forces is one the library runs on CPU
     * devices only when asked (tuning.c's defaults by device type): there
     * --effort skips the row, its defaults kept. */
    int off_on_cpus;
    double tol;   /* largest |y - ref| over the largest |ref| */
    double share; /* its weight in --effort's budget for the table's rows
                     (they share it in proportion) */
};

int tk_count(void);
const tk_kernel *tk_at(int i);
/* The row named name, or NULL. */
const tk_kernel *tk_find(const char *name);

/* Searches row's space until deadline (one candidate at least beyond the
 * reference) and writes the values kept into entry's kernels section and
 * the search's report into its info (info.<row name>).  0, or 1 when the
 * reference itself fails (nothing to tune against). */
int tk_tune(const tk_kernel *row, const tk_env *env, double deadline,
            json_t *entry);

#endif
