/* --plot FILE: one figure, drawn by gnuplot, with a column per device that
 * ran.  On top the device's roofline: log-log, arithmetic intensity
 * (counted FLOPs over counted bytes) against GFLOP/s, the read-bandwidth
 * slope meeting the FMA roof, CLBlast's SGEMM rate as a dashed line, and a
 * point per result, one marker and colour per variant, the fused points
 * labelled with their run.  Below it the median time of every run, a bar
 * per variant, on a log scale.
 *
 * gnuplot's data and script go into a private directory, removed after;
 * gnuplot draws into a temporary file beside FILE, renamed into place once
 * it succeeded, so FILE is never half drawn. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench.h"

/* Found by plot_check(). */
static char *gnuplot;

/* Colours and gnuplot point types of the variants, the same in both
 * plots. */
static const char *const variant_colour[N_VARIANTS] = {"#1f77b4", "#ff7f0e",
                                                       "#2ca02c", "#d62728"};
static const int variant_point[N_VARIANTS] = {7, 5, 9, 13};

/* Column width and height of the figure, in pixels (the SVG's units). */
#define COLUMN_WIDTH 900
#define FIGURE_HEIGHT 1300

static int is_svg(const char *path)
{
    const char *dot = strrchr(path, '.');
    return dot && strcasecmp(dot, ".svg") == 0;
}

static int is_png(const char *path)
{
    const char *dot = strrchr(path, '.');
    return dot && strcasecmp(dot, ".png") == 0;
}

/* A temporary file beside path, made and closed: gnuplot writes it. */
static char *temp_beside(const char *path)
{
    size_t len = strlen(path) + 16;
    char *tmp = xcalloc(len, 1);
    snprintf(tmp, len, "%s.tmp-XXXXXX", path);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        set_error("cannot create a file beside %s: %s", path,
                  strerror(errno));
        free(tmp);
        return NULL;
    }
    close(fd);
    return tmp;
}

int plot_check(const char *path)
{
    if (!is_svg(path) && !is_png(path)) {
        set_error("the plot is an SVG or a PNG image: name it FILE.svg or "
                  "FILE.png");
        return EXIT_USAGE;
    }
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        set_error("%s is a directory", path);
        return EXIT_RUNTIME;
    }
    free(gnuplot);
    gnuplot = find_program("ATMOE_BENCH_GNUPLOT", "gnuplot",
                           "drawing the plot");
    if (gnuplot == NULL)
        return EXIT_RUNTIME;
    char *tmp = temp_beside(path);
    if (tmp == NULL) {
        free(gnuplot);
        gnuplot = NULL;
        return EXIT_RUNTIME;
    }
    unlink(tmp);
    free(tmp);
    return 0;
}

/* s as a gnuplot single-quoted string (a quote doubled, nothing else
 * special). */
static void put_quoted(FILE *f, const char *s)
{
    fputc('\'', f);
    for (; *s; s++) {
        if (*s == '\'')
            fputc('\'', f);
        fputc(*s == '\n' ? ' ' : *s, f);
    }
    fputc('\'', f);
}

static void run_label(char *buf, size_t size, const result *r)
{
    snprintf(buf, size, "%s T=%zu", r->workload, r->T);
}

/* dir/name-j[-v].dat */
static void data_path(char *buf, size_t size, const char *dir,
                      const char *name, size_t j, int v)
{
    if (v < 0)
        snprintf(buf, size, "%s/%s-%zu.dat", dir, name, j);
    else
        snprintf(buf, size, "%s/%s-%zu-%d.dat", dir, name, j, v);
}

static FILE *open_data(const char *path)
{
    FILE *f = fopen(path, "w");
    if (f == NULL)
        set_error("%s: %s", path, strerror(errno));
    return f;
}

static int close_data(FILE *f, const char *path)
{
    int bad = ferror(f);
    if (fclose(f) != 0 || bad)
        return set_error("writing %s failed", path);
    return 0;
}

/* The roofline data of device j: a file per variant that has results, and
 * the labels of the fused points.  present[v] says which files exist. */
static int write_roofline_data(const char *dir, size_t j,
                               const device_run *d, int *present)
{
    char path[PATH_MAX];
    for (int v = 0; v < N_VARIANTS; v++) {
        present[v] = 0;
        for (size_t i = 0; i < d->n; i++)
            present[v] |= d->results[i].variant == (variant)v;
        if (!present[v])
            continue;
        data_path(path, sizeof path, dir, "roof", j, v);
        FILE *f = open_data(path);
        if (f == NULL)
            return -1;
        for (size_t i = 0; i < d->n; i++) {
            const result *r = &d->results[i];
            if (r->variant == (variant)v)
                fprintf(f, "%.6g %.6g\n", r->flops / r->bytes, r->gflops);
        }
        if (close_data(f, path))
            return -1;
    }
    data_path(path, sizeof path, dir, "labels", j, -1);
    FILE *f = open_data(path);
    if (f == NULL)
        return -1;
    for (size_t i = 0; i < d->n; i++) {
        const result *r = &d->results[i];
        char label[64];
        run_label(label, sizeof label, r);
        if (r->variant == VARIANT_FUSED)
            fprintf(f, "%.6g %.6g \"%s\"\n", r->flops / r->bytes, r->gflops,
                    label);
    }
    return close_data(f, path);
}

/* The bars of device j: a header of the present variants, then a row per
 * run (workload and T) with each variant's median, "-" where it is
 * missing. */
static int write_bar_data(const char *dir, size_t j, const device_run *d,
                          const int *present)
{
    char path[PATH_MAX];
    data_path(path, sizeof path, dir, "bars", j, -1);
    FILE *f = open_data(path);
    if (f == NULL)
        return -1;
    fputs("run", f);
    for (int v = 0; v < N_VARIANTS; v++)
        if (present[v])
            fprintf(f, " %s", variant_names[v]);
    fputc('\n', f);
    /* Results are sorted by workload, T and variant: a row per run. */
    for (size_t i = 0; i < d->n;) {
        const result *first = &d->results[i];
        double ms[N_VARIANTS];
        for (int v = 0; v < N_VARIANTS; v++)
            ms[v] = NAN;
        for (; i < d->n && d->results[i].workload_index ==
                               first->workload_index &&
               d->results[i].T == first->T;
             i++)
            ms[d->results[i].variant] = d->results[i].median_ms;
        char label[64];
        run_label(label, sizeof label, first);
        fprintf(f, "\"%s\"", label);
        for (int v = 0; v < N_VARIANTS; v++)
            if (present[v]) {
                if (isfinite(ms[v]))
                    fprintf(f, " %.6g", ms[v]);
                else
                    fputs(" -", f);
            }
        fputc('\n', f);
    }
    return close_data(f, path);
}

static void write_roofline_plot(FILE *f, const char *dir, size_t j,
                                const device_run *d, const int *present)
{
    const ceilings *c = &d->c;
    double ridge = c->gflops / c->read_gbs;
    double xmin = ridge, xmax = ridge, ymin = c->gflops, ymax = c->gflops;
    for (size_t i = 0; i < d->n; i++) {
        const result *r = &d->results[i];
        double ai = r->flops / r->bytes;
        xmin = fmin(xmin, ai);
        xmax = fmax(xmax, ai);
        if (r->gflops > 0.0)
            ymin = fmin(ymin, r->gflops);
        ymax = fmax(ymax, r->gflops);
    }
    char path[PATH_MAX];
    fputs("set title ", f);
    put_quoted(f, d->info.name);
    fputs(" . ': roofline'\n", f);
    fprintf(f,
            "set logscale xy\n"
            "set xtics auto rotate by 0\nset ytics auto\n"
            "set format x '%%g'\nset format y '%%g'\nset grid xtics ytics\n"
            "set xlabel 'arithmetic intensity (FLOP/byte, counted)'\n"
            "set ylabel 'GFLOP/s'\n"
            "set xrange [%.6g:%.6g]\nset yrange [%.6g:%.6g]\n"
            "set key bottom right opaque box\n"
            "bw = %.6g\npeak = %.6g\n"
            "roof(x) = x * bw < peak ? x * bw : peak\n"
            "plot roof(x) title sprintf('read %%.1f GB/s, FMA %%.1f GFLOP/s', "
            "bw, peak) lw 2 lc rgb 'black'",
            xmin / 3.0, xmax * 3.0, ymin / 3.0, ymax * 2.0, c->read_gbs,
            c->gflops);
    if (c->gemm_gflops > 0.0)
        fprintf(f,
                ", \\\n  %.6g title 'SGEMM (CLBlast, n = %zu) %.1f GFLOP/s' "
                "dt 2 lw 1.5 lc rgb 'gray40'",
                c->gemm_gflops, c->gemm_n, c->gemm_gflops);
    for (int v = 0; v < N_VARIANTS; v++) {
        if (!present[v])
            continue;
        data_path(path, sizeof path, dir, "roof", j, v);
        fputs(", \\\n  ", f);
        put_quoted(f, path);
        fprintf(f, " using 1:2 with points pt %d ps 1.6 lc rgb '%s' title '%s'",
                variant_point[v], variant_colour[v], variant_names[v]);
    }
    data_path(path, sizeof path, dir, "labels", j, -1);
    fputs(", \\\n  ", f);
    put_quoted(f, path);
    fputs(" using 1:2:3 with labels left offset 1,0.7 font ',9' notitle\n", f);
}

static void write_bar_plot(FILE *f, const char *dir, size_t j,
                           const device_run *d, const int *present)
{
    double ymin = INFINITY, ymax = 0.0;
    for (size_t i = 0; i < d->n; i++) {
        ymin = fmin(ymin, d->results[i].median_ms);
        ymax = fmax(ymax, d->results[i].median_ms);
    }
    char path[PATH_MAX];
    data_path(path, sizeof path, dir, "bars", j, -1);
    fputs("set title ", f);
    put_quoted(f, d->info.name);
    fputs(" . ': median time per run'\n", f);
    fprintf(f,
            "unset logscale x\nset logscale y\nset grid noxtics ytics\n"
            "set style data histograms\n"
            "set style histogram clustered gap 1\n"
            "set style fill solid 0.85 border -1\nset boxwidth 0.9\n"
            "set xtics rotate by 25 right nomirror\nset format y '%%g'\n"
            "unset xlabel\nset ylabel 'median ms (log scale)'\n"
            "set xrange [*:*]\nset yrange [%.6g:%.6g]\n"
            "set key top left opaque box\nplot",
            ymin / 2.0, ymax * 2.0);
    int col = 2, first = 1;
    for (int v = 0; v < N_VARIANTS; v++) {
        if (!present[v])
            continue;
        fputs(first ? " " : ", \\\n  ", f);
        put_quoted(f, first ? path : "");
        fprintf(f, " using %d%s title columnheader(%d) lc rgb '%s'", col,
                first ? ":xtic(1)" : "", col, variant_colour[v]);
        col++;
        first = 0;
    }
    fputc('\n', f);
}

/* The whole script: terminal, then the rooflines (the layout's first row),
 * then the bars. */
static int write_script(const char *script, const char *dir,
                        const char *image, int svg, const device_run *runs,
                        size_t n)
{
    size_t cols = 0;
    for (size_t j = 0; j < n; j++)
        cols += runs[j].ok && runs[j].n > 0;
    int(*present)[N_VARIANTS] = xcalloc(n ? n : 1, sizeof *present);
    for (size_t j = 0; j < n; j++)
        if (runs[j].ok && runs[j].n > 0 &&
            (write_roofline_data(dir, j, &runs[j], present[j]) ||
             write_bar_data(dir, j, &runs[j], present[j]))) {
            free(present);
            return -1;
        }
    FILE *f = open_data(script);
    if (f == NULL) {
        free(present);
        return -1;
    }
    int w = (int)(COLUMN_WIDTH * cols), h = FIGURE_HEIGHT;
    if (svg)
        fprintf(f, "set terminal svg size %d,%d dynamic noenhanced "
                   "font 'sans,12' background rgb 'white'\n", w, h);
    else
        fprintf(f, "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
                   "  set terminal pngcairo size %d,%d noenhanced "
                   "font 'sans,10'\n"
                   "} else {\n"
                   "  set terminal png size %d,%d noenhanced\n"
                   "}\n", w, h, w, h);
    fputs("set output ", f);
    put_quoted(f, image);
    fprintf(f, "\nset datafile missing '-'\nset samples 500\n"
               "set multiplot layout 2,%zu title 'atmoe-bench: counted work "
               "over median times (%s scale)'\n",
            cols, runs[0].n ? runs[0].results[0].scale : "");
    for (size_t j = 0; j < n; j++)
        if (runs[j].ok && runs[j].n > 0)
            write_roofline_plot(f, dir, j, &runs[j], present[j]);
    for (size_t j = 0; j < n; j++)
        if (runs[j].ok && runs[j].n > 0)
            write_bar_plot(f, dir, j, &runs[j], present[j]);
    fputs("unset multiplot\nset output\n", f);
    free(present);
    return close_data(f, script);
}

int plot_write(const char *path, const device_run *runs, size_t n)
{
    size_t cols = 0;
    for (size_t j = 0; j < n; j++)
        cols += runs[j].ok && runs[j].n > 0;
    char *dir = NULL, *image = NULL;
    int rc = cols == 0 ? set_error("no result to draw") : 0;
    if (rc == 0 && (dir = make_temp_dir()) == NULL)
        rc = -1;
    if (rc == 0 && (image = temp_beside(path)) == NULL)
        rc = -1;
    if (rc != 0) {
        if (dir)
            remove_temp_dir(dir);
        free(dir);
        free(gnuplot);
        gnuplot = NULL;
        return -1;
    }
    char script[PATH_MAX];
    snprintf(script, sizeof script, "%s/plot.gp", dir);
    rc = write_script(script, dir, image, is_svg(path), runs, n);
    if (rc == 0) {
        char *argv[] = {gnuplot, script, NULL};
        pid_t pid;
        int status = 0;
        if (spawn_program(argv, &pid, NULL) ||
            (status = wait_program(pid)) < 0)
            rc = -1;
        else if (status != 0)
            rc = set_error("%s ended with status %d", gnuplot, status);
    }
    struct stat sb;
    if (rc == 0 && (stat(image, &sb) != 0 || sb.st_size == 0))
        rc = set_error("gnuplot wrote no image");
    if (rc == 0 && chmod(image, file_mode) != 0)
        rc = set_error("%s: %s", image, strerror(errno));
    if (rc == 0 && rename(image, path) != 0)
        rc = set_error("renaming %s to %s: %s", image, path, strerror(errno));
    if (rc != 0)
        unlink(image);
    free(image);
    remove_temp_dir(dir);
    free(dir);
    free(gnuplot);
    gnuplot = NULL;
    return rc;
}
