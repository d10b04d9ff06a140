/* The helpers that every file of atmoe-bench leans on (bench/bench.h):
 * the detail of the last failure, host memory, the bench's data files and
 * the mode of the files it writes, results and their rates, and the
 * progress line.  It depends on nothing of the bench but bench.h, so that
 * peer.c, plot.c and process.c sit beside atmoe-bench.c, not under it. */
#define _POSIX_C_SOURCE 200809L

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"

char errbuf[2048];

int set_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, sizeof errbuf, fmt, ap);
    va_end(ap);
    return -1;
}

static void out_of_memory(void)
{
    fprintf(stderr, PROGRAM ": out of host memory\n");
    exit(EXIT_RUNTIME);
}

void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (p == NULL)
        out_of_memory();
    return p;
}

void *xrealloc(void *p, size_t n, size_t size)
{
    void *q = realloc(p, (n ? n : 1) * size);
    if (q == NULL)
        out_of_memory();
    return q;
}

mode_t file_mode = 0644;

static int readable(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f)
        fclose(f);
    return f != NULL;
}

char *find_data_file(const char *name)
{
    char cand[4][PATH_MAX + 64];
    int n = 0;
    const char *env = getenv("ATMOE_BENCH_DATADIR");
    if (env && *env) {
        snprintf(cand[n++], sizeof cand[0], "%s/%s", env, name);
    } else {
        if (*ATMOE_BENCH_DATADIR)
            snprintf(cand[n++], sizeof cand[0], "%s/%s", ATMOE_BENCH_DATADIR,
                     name);
        char exe[PATH_MAX];
        ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (len > 0) {
            exe[len] = '\0';
            char *slash = strrchr(exe, '/');
            if (slash) {
                *slash = '\0';
                snprintf(cand[n++], sizeof cand[0], "%s/%s", exe, name);
                snprintf(cand[n++], sizeof cand[0], "%s/../%s", exe, name);
            }
        }
    }
    for (int i = 0; i < n; i++)
        if (readable(cand[i]))
            return strdup(cand[i]);
    char *p = errbuf;
    size_t left = sizeof errbuf;
    int w = snprintf(p, left, "%s is not in", name);
    for (int i = 0; i < n && w > 0 && (size_t)w < left; i++) {
        p += w;
        left -= (size_t)w;
        w = snprintf(p, left, "%s %s", i ? "," : "", cand[i]);
    }
    if (w > 0 && (size_t)w < left)
        snprintf(p + w, left - (size_t)w,
                 "; set ATMOE_BENCH_DATADIR to the directory that holds it");
    return NULL;
}

const char *const variant_names[N_VARIANTS] = {"fused", "unfused", "merged",
                                               "torch"};

result *push_result(device_run *d)
{
    if (d->n == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 16;
        d->results = xrealloc(d->results, d->cap, sizeof *d->results);
    }
    memset(&d->results[d->n], 0, sizeof d->results[0]);
    return &d->results[d->n++];
}

void set_rates(result *r, const ceilings *c)
{
    double sec = r->median_ms * 1e-3;
    r->gflops = r->flops / sec * 1e-9;
    r->gbs = r->bytes / sec * 1e-9;
    double bound = fmax(r->flops / (c->gflops * 1e9),
                        r->bytes / (c->read_gbs * 1e9));
    r->roofline = bound / sec;
}

/* A norm-wise difference that does not blow up on outputs near zero. */
double rel_diff(const float *y, const float *ref, size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double diff = fabs((double)y[i] - (double)ref[i]);
        if (!(diff <= num)) /* catches NaN too */
            num = isnan(diff) ? INFINITY : diff;
        if (fabs((double)ref[i]) > den)
            den = fabs((double)ref[i]);
    }
    return den > 0.0 ? num / den : num;
}

json_t *json_num(double v)
{
    return isfinite(v) ? json_real(v) : json_null();
}

void progress_show(const progress *p, const char *workload, size_t T,
                   variant v, const char *stage)
{
    if (!p->on)
        return;
    fprintf(stderr, "\r\033[K[%zu/%zu] %s: %s T=%zu %s: %s", p->done + 1,
            p->total, p->device, workload, T, variant_names[v], stage);
    fflush(stderr);
}

void progress_clear(const progress *p)
{
    if (p->on) {
        fprintf(stderr, "\r\033[K");
        fflush(stderr);
    }
}
