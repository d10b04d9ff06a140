/* What the files of atmoe-bench share.  bench/common.c holds the helpers
 * they all use (the last failure's detail, memory, data files, results and
 * their rates, the progress line); bench/process.c finds and runs other
 * programs; bench/peer.c runs the PyTorch peer; bench/plot.c draws the
 * figure through gnuplot.  Each of them depends only on what is declared
 * here; bench/atmoe-bench.c, which holds the workloads, the ceilings and
 * the reports, sits on top and defines nothing the others use. */
#ifndef ATMOE_BENCH_H
#define ATMOE_BENCH_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include <jansson.h>

#include "atmoe.h"
#include "measure.h"

#define PROGRAM "atmoe-bench"

/* The installed data directory (bench/bench.am passes it). */
#ifndef ATMOE_BENCH_DATADIR
#define ATMOE_BENCH_DATADIR ""
#endif

/* The peer's script, a data file found as ceilings.cl is, and the Python
 * that runs it unless ATMOE_BENCH_PYTHON names another: Debian's, where
 * python3-torch installs (a python3 found first in PATH may lack it). */
#define PEER_SCRIPT "peer_torch.py"
#define DEFAULT_PYTHON "/usr/bin/python3"

/* Exit statuses. */
#define EXIT_RUNTIME 1
#define EXIT_USAGE 2

/* A variant whose output differs from its reference by more than this
 * (relative to the largest output) is flagged: fp32 GEMMs of d = 4096 in
 * different orders stay far below it. */
#define CHECK_TOLERANCE 1e-3

typedef enum variant {
    VARIANT_FUSED,
    VARIANT_UNFUSED,
    VARIANT_MERGED,
    VARIANT_TORCH, /* the PyTorch peer (bench/peer_torch.py) */
    N_VARIANTS
} variant;

extern const char *const variant_names[N_VARIANTS];

typedef struct result {
    const char *workload;
    size_t workload_index; /* the table's order, for sorting */
    const char *scale;
    variant variant;
    size_t T, d_in, d_out, experts, rank, total_rank;
    size_t r1, r2; /* a T-REX adapter's vectors; 0 for AT-MoE */
    double median_ms, min_ms, max_ms;
    /* The library's own figures of a compute (atmoe_graph_get_compute_stats)
     * over the timed ones: the median host time and the most host
     * allocations.  The peer's runs have none (host_measured 0). */
    int host_measured;
    double host_ms_median;
    uint64_t host_allocations_max;
    double flops, bytes, gflops, gbs, roofline;
    double ratio_to_fused; /* median / fused median (NaN without fused) */
    double max_rel_diff;   /* against the reference (NaN for fused) */
} result;

typedef struct ceilings {
    double read_gbs, read_mib, cache_mib;
    double gflops;
    int fma_vec;
    double gemm_gflops;
    size_t gemm_n;
    double launch_us, sync_us;
    double h2d_gbs, d2h_gbs;
    double transfer_mib;
} ceilings;

/* A fused run's output, kept for the peer's run of the same work to be
 * checked against, and the fused result it belongs to. */
typedef struct peer_ref {
    size_t result;
    float *y;
    size_t count;
} peer_ref;

typedef struct device_run {
    atmoe_device_info info;
    ceilings c;
    result *results;
    size_t n, cap;
    int ok;       /* ceilings measured: the device has a report */
    int failures; /* runs that failed */
    const char *pocl_affinity; /* POCL_AFFINITY of a PoCL device, or NULL */
    char params[16];           /* the context's parameters: "tuned",
                                  "default" or "custom" */
    int tuned_sets;            /* whether a tuned set is in force */
    atmoe_dtype w0_dtype;      /* --dtype: W0 as the fused and merged
                                  variants store it */
    size_t layer_d;            /* d of the scale's layers (the header's
                                  memory of W0) */
    /* With --peer: the spec's workloads, one object each, the fused
     * outputs, and what the peer said about itself (NULL before it ran). */
    json_t *peer_workloads;
    peer_ref *refs;
    size_t n_refs, cap_refs;
    json_t *peer_info;
} device_run;

/* --- bench/common.c */

/* A progress line on stderr when it is a terminal. */
typedef struct progress {
    int on;
    size_t done, total;
    const char *device;
} progress;

void progress_show(const progress *p, const char *workload, size_t T,
                   variant v, const char *stage);
void progress_clear(const progress *p);

/* The detail of the last failure, which set_error() fills; it returns -1. */
extern char errbuf[2048];
int set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* calloc and realloc (of n elements of size bytes) that end the program
 * with a message when memory runs out. */
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n, size_t size);
/* max |y - ref| / max |ref|; NaN anywhere gives infinity. */
double rel_diff(const float *y, const float *ref, size_t n);
/* A new zeroed result at the end of d's list. */
result *push_result(device_run *d);
/* GFLOP/s, GB/s and the fraction of the roofline bound from a result's
 * flops, bytes and median time. */
void set_rates(result *r, const ceilings *c);
/* A finite number, or null (jansson refuses NaN and infinities). */
json_t *json_num(double v);

/* 0666 less the umask: the mode of every file the bench writes. */
extern mode_t file_mode;

/* Finds a data file of the bench (ceilings.cl, peer_torch.py):
 * $ATMOE_BENCH_DATADIR when set, else the installed data directory, else
 * beside the executable (or one level up, past libtool's .libs).  Returns
 * a path to free, or NULL with errbuf set. */
char *find_data_file(const char *name);

/* --- bench/process.c */

/* The program an environment variable names (a path, or a name looked up
 * in PATH), else `fallback` (the same).  Returns a path to free, or NULL
 * with errbuf set; `what` names the program in the message. */
char *find_program(const char *env_var, const char *fallback,
                   const char *what);
/* Starts argv[0] (a path) with argv; with out non-NULL its stdout comes
 * back through *out.  stdin is /dev/null, stderr is ours. */
int spawn_program(char *const argv[], pid_t *pid, FILE **out);
/* Waits for a program; returns its exit status, or 128 + the signal that
 * ended it, or -1 with errbuf set. */
int wait_program(pid_t pid);
/* A private directory under $TMPDIR (or /tmp); a path to free. */
char *make_temp_dir(void);
/* Removes a directory made by make_temp_dir() and the files in it. */
void remove_temp_dir(const char *dir);

/* --- bench/peer.c */

/* Keeps a copy of the output of fused result number `index` (count
 * floats), for the peer's run of the same work to be checked against. */
void peer_keep(device_run *d, size_t index, const float *y, size_t count);
/* Checks up front that the peer can run (its Python and its modules), so
 * that a long run does not end in a missing module.  Returns 0, or -1 with
 * errbuf set. */
int peer_probe(void);
/* Runs the peer over the workloads recorded in d, adds a result of variant
 * torch for every run, checked against the fused output.  Failures are
 * reported on stderr and counted in d->failures. */
void peer_run(device_run *d, int reps, int warmup, progress *prog);
/* Frees what the peer's spec, references and report in d hold. */
void peer_free(device_run *d);
/* Forgets what peer_probe() found. */
void peer_end(void);

/* --- bench/recipes.c */

/* Which recipe workload name is (0 recipe-stage1, 1 recipe-stage2, 2
 * recipe-trex), or -1. */
int recipe_index(const char *workload);
/* Times recipe k's training step loop with the library, and with peer
 * the same loop in PyTorch (bench/peer_train_torch.py) on the same files,
 * adding a result of variant fused and one of variant torch to d (table
 * index `index`).  Failures are reported on stderr and counted in
 * d->failures. */
void recipe_run(atmoe_context *ctx, device_run *d, int k, size_t index,
                int full, int reps, int warmup, int peer, progress *prog);

/* --- bench/plot.c */

/* Checks --plot's path (an .svg or .png name) and finds gnuplot.  Returns
 * 0, EXIT_USAGE for a name of another kind, EXIT_RUNTIME when gnuplot is
 * missing or the path cannot be written; errbuf holds why. */
int plot_check(const char *path);
/* Draws the roofline and the bars of every device that ran into path,
 * atomically.  Returns 0 or -1 with errbuf set. */
int plot_write(const char *path, const device_run *runs, size_t n);

#endif
