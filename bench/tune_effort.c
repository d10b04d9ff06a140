/* atmoe-tune --effort: the search of every kernel with parameters on a
 * device, as steps that each run one phase of the tuner (atmoe-tune
 * --phases ... --output DB) in a child process:
 *
 *   blocks.f32   cl/linear.cl's blocks for f32 weights ("linear")
 *   router, mixture, linear.group, mixture.fused, linear.tile, kmeans,
 *   optimizer    the rows of tune_kernels.c's table, one step each
 *   clblast      CLBlast's Xgemm and XgemmDirect (not at --effort test)
 *   boundary     MAX_TOKENS, with the blocks and sets found before
 *   blocks.f16   the blocks for f16 weights ("linear.f16")
 *   blocks.bf16  the blocks for bf16 weights ("linear.bf16")
 *
 * Each step saves its result into the database before the next starts (a
 * later step reads the entry the earlier ones wrote, as a run of some
 * phases always did), and after each the checkpoint DB.progress is
 * written atomically: which steps are done.  --resume continues after the
 * last step done, so an interrupted run (a driver that hangs the machine,
 * a Ctrl-C) loses one step at most.  A step whose child crashes, or runs
 * past its time limit (then it is killed), is skipped: the entry keeps
 * what it had for that kernel, and the search goes on.  Within a step,
 * each candidate is journalled in the checkpoint before it runs (see
 * journal_begin): when the child dies in a candidate, or that candidate
 * runs past its own limit, the candidate is recorded in the checkpoint
 * ("candidates": crashed or timed out) and the step runs again, skipping
 * it, up to MAX_RESTARTS times a step.
 *
 * The efforts differ in sizes, runs per candidate and budgets; quick aims
 * at 270 s a device, within 5 minutes on a 2-core CPU: the budgets add up
 * to 170 s, the rest is compiling, the checks and the boundary's fixed
 * timings, and when the steps so far took longer than planned (a loaded
 * machine) the budgets of the steps left shrink to fit (see tune_effort);
 * a step runs one candidate beyond its reference whatever its budget. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
#define PROGRESS_VERSION 1
#define PROGRESS_SUFFIX ".progress"
#define MAX_STEPS 256
#define MAX_RESTARTS 4
/* A candidate's time limit (ATMOE_TUNE_CANDIDATE_TIMEOUT_S replaces it,
 * for tests): compiling and checking one takes seconds, timing it a few
 * more; minutes mean a hang. */
#define CANDIDATE_LIMIT_S 180

extern char **environ;

typedef struct effort_def {
    const char *name;
    const char *sizes;
    int runs;
    int clblast;                  /* the CLBlast step runs */
    double blocks_s, clblast_s, half_s; /* budgets */
    double kernels_s; /* of the table's rows together (their shares) */
    int full_space;   /* the rows' full lists of candidate values */
    double limit_extra_s;         /* a step's time limit past its budget */
    double total_s; /* the whole search's target per device (0: none) */
} effort_def;

/* test: seconds, for the test suite (no CLBlast search: it takes tens of
 * seconds before its first candidate). */
static const effort_def efforts[] = {
    {"test", "small", 1, 0, 0, 0, 0, 0, 0, 120, 0},
    {"quick", "small", 3, 1, 20, 60, 15, 70, 0, 300, 270},
    {"normal", "all", 3, 1, 60, 600, 60, 150, 1, 900, 0},
    {"exhaustive", "all", 5, 1, 300, 3600, 300, 600, 1, 1800, 0},
};

static const effort_def *find_effort(const char *name)
{
    for (size_t i = 0; i < sizeof efforts / sizeof efforts[0]; i++)
        if (strcmp(efforts[i].name, name) == 0)
            return &efforts[i];
    return NULL;
}

int effort_known(const char *name)
{
    return find_effort(name) != NULL;
}

void effort_test_knob(const char *step)
{
    const char *hang = getenv("ATMOE_TUNE_TEST_HANG");
    const char *crash = getenv("ATMOE_TUNE_TEST_CRASH");
    if (crash && strcmp(crash, step) == 0)
        abort();
    if (hang && strcmp(hang, step) == 0)
        for (;;)
            pause();
}

typedef struct step {
    char device[32]; /* the selection the child gets: the device's index */
    char key[96];    /* "DEVICE NAME": its candidates in the journal */
    char label[320]; /* "0 NAME: blocks.f32", the checkpoint's record */
    const char *name, *phases, *dtype;
    double budget_s;
} step;

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

/* The child running now, for the signal handler: an interrupted driver
 * takes its step with it rather than leave it writing the database
 * beside a resumed run. */
static volatile pid_t running_child = 0;

static void on_signal(int sig)
{
    pid_t pid = running_child;
    if (pid > 0)
        kill(pid, SIGKILL);
    _exit(128 + sig);
}

typedef struct step_def {
    const char *name, *phases, *dtype;
    double budget;
    int on;
} step_def;

static int add_steps(step *steps, int n, const effort_def *e, size_t index,
                     const char *name)
{
    step_def defs[4 + 2 + 16] = {
        {"blocks.f32", "blocks", "f32", e->blocks_s, 1},
    };
    size_t nd = 1;
    /* The table's rows, each under its own name (a phase too), sharing
     * kernels_s by their shares: a row added takes its part of it.  They
     * run before CLBlast's search, which compiles a program a candidate
     * (seconds each on a CPU) and so overruns its budget most: the
     * budgets left shrink after an overrun, and the rows' few candidates
     * (the router's and the mix's gains are the largest of a quick
     * search) should not pay for it.  The boundary needs CLBlast's sets,
     * so it follows them. */
    double shares = 0;
    for (int r = 0; r < tk_count(); r++)
        shares += tk_at(r)->share;
    for (int r = 0; r < tk_count() && nd < 1 + 16; r++, nd++) {
        const tk_kernel *k = tk_at(r);
        defs[nd].name = defs[nd].phases = k->name;
        defs[nd].dtype = "f32";
        defs[nd].budget = shares > 0 ? e->kernels_s * k->share / shares : 0;
        defs[nd].on = 1;
    }
    defs[nd++] = (step_def){"clblast", "clblast", "f32", e->clblast_s,
                            e->clblast};
    defs[nd++] = (step_def){"boundary", "boundary", "f32", 0, 1};
    defs[nd++] = (step_def){"blocks.f16", "blocks", "f16", e->half_s, 1};
    defs[nd++] = (step_def){"blocks.bf16", "blocks", "bf16", e->half_s, 1};
    for (size_t i = 0; i < nd; i++) {
        if (!defs[i].on || n == MAX_STEPS)
            continue;
        step *s = &steps[n++];
        snprintf(s->device, sizeof s->device, "%zu", index);
        snprintf(s->label, sizeof s->label, "%zu %s: %s", index, name,
                 defs[i].name);
        snprintf(s->key, sizeof s->key, "%zu %s", index, defs[i].name);
        s->name = defs[i].name;
        s->phases = defs[i].phases;
        s->dtype = defs[i].dtype;
        s->budget_s = defs[i].budget;
    }
    return n;
}

/* The checkpoint: the steps, the effort and seed they were made for, and
 * how many are done. */
static json_t *progress_new(const effort_args *a, const step *steps, int n)
{
    json_t *labels = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(labels, json_string(steps[i].label));
    return json_pack("{s:i, s:s, s:I, s:o, s:i, s:[], s:[]}",
                     "atmoe_tune_progress", PROGRESS_VERSION, "effort",
                     a->effort, "seed", (json_int_t)a->seed, "steps", labels,
                     "done", 0, "skipped", "candidates");
}

/* Written whole or not at all: a temporary file beside it, synced, then
 * renamed over it. */
static int progress_write(const char *path, const json_t *p)
{
    char tmp[4200 + 8];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return -1;
    int ok = json_dumpf(p, f, JSON_INDENT(2)) == 0 && fputc('\n', f) != EOF &&
             fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        return -1;
    }
    return 0;
}

/* The checkpoint at path when it was made for the same steps, effort and
 * seed; NULL (and why in *why) otherwise. */
static json_t *progress_read(const char *path, const json_t *fresh,
                             const char **why)
{
    json_t *p = json_load_file(path, 0, NULL);
    *why = NULL;
    if (p == NULL) {
        *why = "no checkpoint";
    } else if (json_integer_value(json_object_get(p, "atmoe_tune_progress")) !=
                   PROGRESS_VERSION ||
               !json_equal(json_object_get(p, "effort"),
                           json_object_get(fresh, "effort")) ||
               !json_equal(json_object_get(p, "seed"),
                           json_object_get(fresh, "seed")) ||
               !json_equal(json_object_get(p, "steps"),
                           json_object_get(fresh, "steps")) ||
               !json_is_integer(json_object_get(p, "done")) ||
               !json_is_array(json_object_get(p, "skipped"))) {
        *why = "the checkpoint is of another effort, seed or set of devices";
    }
    if (*why) {
        json_decref(p);
        return NULL;
    }
    /* Checkpoints written before candidates were journalled. */
    if (!json_is_array(json_object_get(p, "candidates")))
        json_object_set_new(p, "candidates", json_array());
    return p;
}

/* ------------------------------------------------------------- journal */

/* In the step's child. */
static const char *journal_path;
static char journal_key[96], journal_step[64];
static int journal_index; /* candidates begun, skipped ones included */

void journal_open(const char *path, const char *device, const char *name)
{
    journal_path = path;
    snprintf(journal_key, sizeof journal_key, "%s %s", device ? device : "0",
             name ? name : "");
    snprintf(journal_step, sizeof journal_step, "%s", name ? name : "");
}

/* ATMOE_TUNE_TEST_CANDIDATE_CRASH or _HANG = STEP:N names this step's
 * candidate n. */
static int knob_names(const char *var, int n)
{
    const char *v = getenv(var);
    const char *colon = v ? strrchr(v, ':') : NULL;
    if (colon == NULL || journal_step[0] == '\0')
        return 0;
    size_t len = (size_t)(colon - v);
    return len == strlen(journal_step) &&
           strncmp(v, journal_step, len) == 0 && atoi(colon + 1) == n;
}

/* The recorded loss of this step's candidate label, or NULL. */
static const char *lost_result(const json_t *p, const char *label)
{
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(p, "candidates"), i, c) {
        const char *sk = json_string_value(json_object_get(c, "step"));
        const char *cand = json_string_value(json_object_get(c, "candidate"));
        if (sk && cand && strcmp(sk, journal_key) == 0 &&
            strcmp(cand, label) == 0)
            return json_string_value(json_object_get(c, "result"));
    }
    return NULL;
}

int journal_begin(const char *label, char *why, size_t size)
{
    int n = ++journal_index;
    if (journal_path) {
        json_t *p = json_load_file(journal_path, 0, NULL);
        const char *lost = p ? lost_result(p, label) : NULL;
        if (lost) {
            snprintf(why, size, "%s", lost);
            json_decref(p);
            return 1;
        }
        if (p) {
            json_object_set_new(p, "running",
                                json_pack("{s:s, s:s}", "step", journal_key,
                                          "candidate", label));
            if (progress_write(journal_path, p) != 0)
                fprintf(stderr, PROGRAM ": cannot journal candidate %s in "
                        "%s: %s\n", label, journal_path, strerror(errno));
            json_decref(p);
        }
    }
    if (knob_names("ATMOE_TUNE_TEST_CANDIDATE_CRASH", n))
        abort();
    if (knob_names("ATMOE_TUNE_TEST_CANDIDATE_HANG", n))
        for (;;)
            pause();
    return 0;
}

void journal_end(void)
{
    if (journal_path == NULL)
        return;
    json_t *p = json_load_file(journal_path, 0, NULL);
    if (p && json_object_get(p, "running")) {
        json_object_del(p, "running");
        progress_write(journal_path, p);
    }
    json_decref(p);
}

json_t *journal_lost(void)
{
    if (journal_path == NULL)
        return NULL;
    json_t *p = json_load_file(journal_path, 0, NULL), *out = json_array();
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(p, "candidates"), i, c) {
        const char *sk = json_string_value(json_object_get(c, "step"));
        if (sk && strcmp(sk, journal_key) == 0)
            json_array_append_new(
                out, json_pack("{s:O, s:O}", "candidate",
                               json_object_get(c, "candidate"), "result",
                               json_object_get(c, "result")));
    }
    json_decref(p);
    if (json_array_size(out) == 0) {
        json_decref(out);
        return NULL;
    }
    return out;
}

/* How a step's child ended. */
typedef enum step_end {
    STEP_OK,
    STEP_FAILED,     /* it exited with an error, or could not start */
    STEP_CRASHED,    /* a signal */
    STEP_TIMED_OUT,  /* killed at the step's limit */
    STEP_CAND_LIMIT  /* killed at its candidate's limit */
} step_end;

/* The candidate the checkpoint at path journals as running, as text
 * (empty: none), into out. */
static void running_of(const char *path, char *out, size_t size)
{
    out[0] = '\0';
    json_t *p = json_load_file(path, 0, NULL);
    json_t *r = json_object_get(p, "running");
    const char *st = json_string_value(json_object_get(r, "step"));
    const char *c = json_string_value(json_object_get(r, "candidate"));
    if (st && c)
        snprintf(out, size, "%s\n%s", st, c);
    json_decref(p);
}

/* Runs one step in a child and waits for it at most limit_s seconds, and
 * for each candidate it journals in the checkpoint at journal at most
 * cand_s; what happened in why. */
static step_end run_step(const effort_args *a, const effort_def *e,
                         const step *s, const char *journal, double limit_s,
                         double cand_s, char *why, size_t why_size)
{
    char budget[32], runs[16], seed[32];
    snprintf(budget, sizeof budget, "%g", s->budget_s);
    snprintf(runs, sizeof runs, "%d", e->runs);
    snprintf(seed, sizeof seed, "%lu", a->seed);
    const char *argv[40];
    int n = 0;
    argv[n++] = a->self;
    argv[n++] = "--step";
    argv[n++] = s->name;
    argv[n++] = "--phases";
    argv[n++] = s->phases;
    argv[n++] = "--dtype";
    argv[n++] = s->dtype;
    argv[n++] = "--budget-s";
    argv[n++] = budget;
    argv[n++] = "--sizes";
    argv[n++] = e->sizes;
    argv[n++] = "--runs";
    argv[n++] = runs;
    argv[n++] = "--seed";
    argv[n++] = seed;
    argv[n++] = "--clock";
    argv[n++] = a->cpu_clock ? "cpu" : "wall";
    argv[n++] = "--device";
    argv[n++] = s->device;
    argv[n++] = "--output";
    argv[n++] = a->output;
    argv[n++] = "--journal";
    argv[n++] = journal;
    argv[n++] = "--space";
    argv[n++] = e->full_space ? "full" : "quick";
    if (a->quiet)
        argv[n++] = "--quiet";
    argv[n] = NULL;
    pid_t pid;
    int err = access("/proc/self/exe", X_OK) == 0
                  ? posix_spawn(&pid, "/proc/self/exe", NULL, NULL,
                                (char *const *)argv, environ)
                  : posix_spawnp(&pid, a->self, NULL, NULL,
                                 (char *const *)argv, environ);
    if (err != 0) {
        snprintf(why, why_size, "cannot run %s: %s", a->self, strerror(err));
        return STEP_FAILED;
    }
    running_child = pid;
    double end = now_s() + limit_s, next_look = 0, cand_since = 0;
    char cand[512] = "", now_cand[512];
    int status = 0;
    step_end killed = STEP_OK;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid || (r < 0 && errno != EINTR))
            break;
        double t = now_s();
        /* The journal, read twice a second: a candidate journalled for
         * longer than cand_s hangs. */
        if (t >= next_look) {
            next_look = t + 0.5;
            running_of(journal, now_cand, sizeof now_cand);
            if (strcmp(now_cand, cand) != 0) {
                snprintf(cand, sizeof cand, "%s", now_cand);
                cand_since = t;
            }
            if (cand[0] && t - cand_since > cand_s)
                killed = STEP_CAND_LIMIT;
        }
        if (t > end)
            killed = STEP_TIMED_OUT;
        if (killed != STEP_OK) {
            kill(pid, SIGKILL);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
            break;
        }
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    running_child = 0;
    if (killed == STEP_CAND_LIMIT) {
        snprintf(why, why_size, "a candidate ran past its limit of %.0f s "
                 "and was killed", cand_s);
        return killed;
    }
    if (killed == STEP_TIMED_OUT) {
        snprintf(why, why_size, "it ran past its limit of %.0f s and was "
                 "killed", limit_s);
        return killed;
    }
    if (WIFSIGNALED(status)) {
        snprintf(why, why_size, "it crashed (signal %d)", WTERMSIG(status));
        return STEP_CRASHED;
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        snprintf(why, why_size, "it exited %d", WEXITSTATUS(status));
        return STEP_FAILED;
    }
    return STEP_OK;
}

/* After a step's child ended: the candidates it journalled (from the
 * checkpoint on disk) into progress; when it died in one (end: crashed or
 * killed) and "running" names it, that one is recorded as lost and *lost
 * gets its name.  Returns 1 when a candidate was recorded. */
static int take_journal(const char *path, json_t *progress, const step *s,
                        step_end end, char *lost, size_t size)
{
    json_t *disk = json_load_file(path, 0, NULL);
    json_t *cands = json_object_get(disk, "candidates");
    if (json_is_array(cands))
        json_object_set(progress, "candidates", cands);
    json_t *r = json_object_get(disk, "running");
    const char *st = json_string_value(json_object_get(r, "step"));
    const char *c = json_string_value(json_object_get(r, "candidate"));
    int recorded = 0;
    if (end != STEP_OK && end != STEP_FAILED && st && c &&
        strcmp(st, s->key) == 0) {
        json_array_append_new(
            json_object_get(progress, "candidates"),
            json_pack("{s:s, s:s, s:s}", "step", st, "candidate", c, "result",
                      end == STEP_CRASHED ? "crashed" : "timed out"));
        snprintf(lost, size, "%s", c);
        recorded = 1;
    }
    json_decref(disk);
    return recorded;
}

/* A candidate's time limit. */
static double candidate_limit(void)
{
    const char *env = getenv("ATMOE_TUNE_CANDIDATE_TIMEOUT_S");
    if (env && *env) {
        char *end;
        double v = strtod(env, &end);
        if (*end == '\0' && v > 0)
            return v;
    }
    return CANDIDATE_LIMIT_S;
}

/* A step's time limit: its budget, thrice (the phases overrun a budget by
 * their last candidate and their confirmations), and room for compiles;
 * ATMOE_TUNE_STEP_TIMEOUT_S replaces it (for tests). */
static double step_limit(const effort_def *e, const step *s)
{
    const char *env = getenv("ATMOE_TUNE_STEP_TIMEOUT_S");
    if (env && *env) {
        char *end;
        double v = strtod(env, &end);
        if (*end == '\0' && v > 0)
            return v;
    }
    return 3 * s->budget_s + e->limit_extra_s;
}

/* What the step left in the database for its device: the kernel's values,
 * for the progress lines ("best so far"). */
static void say_result(const effort_args *a, const step *s)
{
    if (quiet)
        return;
    atmoe_device_info dev;
    size_t index = strtoul(s->device, NULL, 10);
    if (atmoe_device_get_info(index, &dev) != ATMOE_STATUS_OK)
        return;
    json_t *root = json_load_file(a->output, 0, NULL);
    size_t i;
    json_t *e, *found = NULL;
    json_array_foreach(json_object_get(root, "entries"), i, e) {
        const char *dn = json_string_value(json_object_get(e, "device"));
        const char *dr = json_string_value(json_object_get(e, "driver"));
        if (dn && dr && strcmp(dn, dev.name) == 0 &&
            strcmp(dr, dev.driver_version) == 0)
            found = e;
    }
    const tk_kernel *row = tk_find(s->name);
    if (row) {
        /* A row's parameters of its program. */
        json_t *prog = json_object_get(json_object_get(found, "kernels"),
                                       row->program);
        json_t *mine = json_object();
        for (int p = 0; p < TK_MAX_PARAMS && row->params[p].name; p++) {
            json_t *v = json_object_get(prog, row->params[p].name);
            if (v)
                json_object_set(mine, row->params[p].name, v);
        }
        char *text = json_object_size(mine)
                         ? json_dumps(mine, JSON_COMPACT)
                         : NULL;
        say("  best so far for %s: %s\n", s->name,
            text ? text : "the library's defaults");
        free(text);
        json_decref(mine);
        json_decref(root);
        return;
    }
    const char *program = strcmp(s->name, "blocks.f16") == 0    ? "linear.f16"
                          : strcmp(s->name, "blocks.bf16") == 0 ? "linear.bf16"
                                                                : "linear";
    json_t *v = strcmp(s->name, "clblast") == 0
                    ? json_object_get(found, "clblast")
                    : json_object_get(json_object_get(found, "kernels"),
                                      program);
    char *text = v ? json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    say("  best so far for %s: %s\n", s->name,
        text ? text : "the library's defaults");
    free(text);
    json_decref(root);
}

int tune_effort(const effort_args *a)
{
    quiet = a->quiet;
    const effort_def *e = find_effort(a->effort);
    if (e == NULL)
        return EXIT_RUNTIME;
    static step steps[MAX_STEPS];
    int n = 0;
    if (a->all_devices) {
        size_t count = 0;
        atmoe_status st = atmoe_device_get_count(&count);
        if (st != ATMOE_STATUS_OK) {
            fprintf(stderr, PROGRAM ": listing the devices: %s\n",
                    atmoe_errmsg(NULL));
            return EXIT_RUNTIME;
        }
        if (count == 0) {
            say("no OpenCL device: nothing to tune\n");
            return 0;
        }
        for (size_t i = 0; i < count; i++) {
            atmoe_device_info dev;
            if (atmoe_device_get_info(i, &dev) == ATMOE_STATUS_OK)
                n = add_steps(steps, n, e, i, dev.name);
        }
    } else {
        size_t index = 0;
        atmoe_status st = a->device ? atmoe_device_find(a->device, &index)
                                    : atmoe_device_get_default(&index);
        atmoe_device_info dev;
        if (st == ATMOE_STATUS_OK)
            st = atmoe_device_get_info(index, &dev);
        if (st != ATMOE_STATUS_OK) {
            fprintf(stderr, PROGRAM ": finding the device: %s: %s\n",
                    atmoe_status_name(st), atmoe_errmsg(NULL));
            return EXIT_RUNTIME;
        }
        n = add_steps(steps, n, e, index, dev.name);
    }

    char path[4200];
    snprintf(path, sizeof path, "%s" PROGRESS_SUFFIX, a->output);
    json_t *progress = progress_new(a, steps, n);
    if (progress == NULL)
        return EXIT_RUNTIME;
    int first = 0;
    if (a->resume) {
        const char *why;
        json_t *old = progress_read(path, progress, &why);
        if (old) {
            json_decref(progress);
            progress = old;
            first = (int)json_integer_value(json_object_get(old, "done"));
            if (first < 0 || first > n)
                first = 0;
            say("resuming the %s search at step %d of %d (checkpoint %s)\n",
                a->effort, first + 1, n, path);
        } else {
            say("nothing to resume (%s): the %s search starts at its first "
                "step\n", why, a->effort);
        }
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    double start = now_s(), overhead = 0;
    int ran = 0, failed = 0;
    size_t devices = 1;
    for (int i = 1; i < n; i++)
        devices += strcmp(steps[i].device, steps[i - 1].device) != 0;
    for (int i = first; i < n; i++) {
        /* The target: budgets of the steps left scaled down so that they
         * and the time past its budget that each step took so far fit in
         * what is left of total_s per device. */
        if (e->total_s > 0 && ran > 0) {
            double per = overhead / ran, want = 0;
            for (int j = i; j < n; j++)
                want += steps[j].budget_s;
            double room = e->total_s * (double)devices - (now_s() - start) -
                          per * (n - i);
            /* At least 0.3: the later steps' candidates cost a second or
             * two each, and a budget of 0 leaves them one. */
            double scale = want > 0 && room < want
                               ? (room > 0.3 * want ? room / want : 0.3)
                               : 1;
            if (scale < 1) {
                for (int j = i; j < n; j++)
                    steps[j].budget_s *= scale;
                say("(the steps so far took longer than planned: the budgets "
                    "left are scaled by %.2f to end near %.0f s)\n", scale,
                    e->total_s * (double)devices);
            }
        }
        /* Time left: the budgets to come, and the time past its budget
         * that each step took so far (a guess before the first). */
        double left = 0;
        for (int j = i; j < n; j++)
            left += steps[j].budget_s +
                    (ran ? overhead / ran : 10.0);
        say("\n[%d/%d] %s: budget %.0f s; about %.0f s left, %.0f s "
            "spent\n", i + 1, n, steps[i].label, steps[i].budget_s, left,
            now_s() - start);
        double t0 = now_s();
        char why[256];
        step_end end;
        for (int attempt = 0;; attempt++) {
            /* The child reads and writes the checkpoint's journal: it is
             * on disk before the child starts, without the candidate a
             * killed run left running (--resume), which this child did
             * not run. */
            json_object_del(progress, "running");
            if (progress_write(path, progress) != 0)
                fprintf(stderr, PROGRAM ": cannot write the checkpoint %s: "
                        "%s\n", path, strerror(errno));
            end = run_step(a, e, &steps[i], path, step_limit(e, &steps[i]),
                           candidate_limit(), why, sizeof why);
            char lost[512];
            if (!take_journal(path, progress, &steps[i], end, lost,
                              sizeof lost))
                break;
            fprintf(stderr, PROGRAM ": step %s: candidate %s skipped: %s\n",
                    steps[i].label, lost, why);
            if (attempt == MAX_RESTARTS) {
                snprintf(why, sizeof why, "%d of its candidates were lost",
                         attempt + 1);
                break;
            }
            say("  the step runs again, without %s\n", lost);
        }
        if (end != STEP_OK) {
            fprintf(stderr, PROGRAM ": step %s skipped: %s; the entry keeps "
                    "what it had for it\n", steps[i].label, why);
            json_array_append_new(json_object_get(progress, "skipped"),
                                  json_string(steps[i].label));
            failed++;
        } else {
            say_result(a, &steps[i]);
        }
        double took = now_s() - t0;
        overhead += took > steps[i].budget_s ? took - steps[i].budget_s : 0;
        ran++;
        json_object_set_new(progress, "done", json_integer(i + 1));
        if (progress_write(path, progress) != 0)
            fprintf(stderr, PROGRAM ": cannot write the checkpoint %s: %s\n",
                    path, strerror(errno));
    }
    json_decref(progress);
    /* Done: nothing is left to resume. */
    remove(path);
    say("\n%s search done: %d step%s run, %d skipped, %.0f s; database %s\n",
        a->effort, ran, ran == 1 ? "" : "s", failed, now_s() - start,
        a->output);
    return failed == n - first && n > first ? EXIT_RUNTIME : 0;
}
