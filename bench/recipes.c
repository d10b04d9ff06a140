/* The recipe workloads of atmoe-bench: the training step loop of each
 * recipe (atmoe_train_stage1, atmoe_train_stage2, atmoe_train_trex) timed
 * through the public calls, and with --peer torch the same loop in PyTorch
 * (bench/peer_train_torch.py) on the same weights and rows.
 *
 * One layer of width d over a frozen W0, at the train-step size of SPEC
 * section 6 (T = 256 rows a step, d = 2048; the small scale d = 512,
 * T = 64):
 *
 *   recipe-stage1  each of 8 rank-16 LoRA experts (4 groups of 2) trained
 *                  alone on its task's rows (the plain-LoRA step)
 *   recipe-stage2  the router (W_G [d, 4], W_D [d, 8]) of the AT-MoE
 *                  layer over the 8 frozen experts, on every row
 *   recipe-trex    the rank-1 experts of T-REX v2 (r1 = 4, r2 = 8, E = 32:
 *                  A, B, W_r, w_om, w_c), each row routed with its
 *                  sample's 32 intuition scores
 *
 * AdamW with atmoe_train_config_default's values (torch.optim.AdamW's,
 * weight decay 0.01) at lr 1e-3.  A step is the recipe's own: the batch's
 * rows gathered on the host, the compute (forward and backward), the loss
 * read back, the optimiser step.  Its time is the difference between the
 * progress callback's clocks of consecutive steps, so that reading the
 * files, planning, the losses over all the rows before and after, and
 * writing the result are not in it; each model's first --warmup steps are
 * not counted, the next --reps are.  The peer times the same steps with
 * time.perf_counter() (gather, forward, MSE, backward, loss.item(), AdamW
 * step, zero_grad).  FLOPs are those of the GEMMs of a step (see
 * recipe_flops); bytes W0's and the activations' once each, a lower bound.
 *
 * The files, in a private directory removed afterwards: base.safetensors
 * (w0), the experts' PEFT adapters e0 ... e7, manifest.json, the rank-1
 * weights trex-w.safetensors and trex.json, data.safetensors (x, y, task,
 * sample, scores) and peer.safetensors, every tensor the peer needs under
 * plain names. */
#define _XOPEN_SOURCE 700

#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bench.h"

#define PEER_TRAIN_SCRIPT "peer_train_torch.py"

enum { R_E = 8, R_G = 4, R_M = 2, R_RANK = 16, T_R1 = 4, T_R2 = 8,
       T_E = T_R1 * T_R2, T_S = 64 };
#define R_LR 1e-3f

static const char *const recipe_names[] = {"recipe-stage1", "recipe-stage2",
                                           "recipe-trex"};

int recipe_index(const char *workload)
{
    for (int i = 0; i < 3; i++)
        if (strcmp(workload, recipe_names[i]) == 0)
            return i;
    return -1;
}

/* The step's shapes at a scale. */
static void recipe_shape(int full, size_t *T, size_t *d)
{
    *T = full ? 256 : 64;
    *d = full ? 2048 : 512;
}

/* The GEMMs of one step of recipe k over T rows of width d (2 FLOPs a
 * multiply-add): W0 x, then
 *   stage1: A x, B u forward; dB, du, dA backward            10 T d r
 *   stage2: every expert forward (2 T d R both ways), the router (2 T d
 *           (G + G M)), and backward each expert's B^T dy and the
 *           router's gradients                 6 T d R + 4 T d G (1 + M)
 *   trex:   A x and W_r x stacked, B z forward; dB, dz, dA, dW_r
 *           backward                           2 T d (2 r1 + 2 E + 3 r2)
 * x needs no gradient (one layer), so W0's backward is not counted. */
static double recipe_flops(int k, size_t T, size_t d)
{
    double t = (double)T, dd = (double)d, base = 2 * t * dd * dd;
    if (k == 0)
        return base + 10 * t * dd * R_RANK;
    if (k == 1)
        return base + 6 * t * dd * R_E * R_RANK +
               4 * t * dd * R_G * (1 + R_M);
    return base + 2 * t * dd * (2 * T_R1 + 2 * T_E + 3 * T_R2);
}

static void fill(float *p, size_t n, float scale, uint64_t *state)
{
    for (size_t i = 0; i < n; i++)
        p[i] = scale * (float)uniform(state);
}

static int lib_fail(const atmoe_context *ctx, atmoe_status st,
                    const char *what)
{
    const char *detail = atmoe_errmsg(ctx);
    return set_error("%s: %s%s%s", what, atmoe_strerror(st),
                     *detail ? ": " : "", detail);
}

static int write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (f == NULL || fputs(text, f) < 0 || fclose(f) != 0)
        return set_error("cannot write %s: %s", path, strerror(errno));
    return 0;
}

/* The problem of every recipe, written into dir. */
static int write_problem(const char *dir, size_t T, size_t d)
{
    uint64_t state = 0x7ec1be5ull;
    size_t n = (size_t)R_E * T; /* stage 1: T rows a task */
    float *w0 = xcalloc(d * d, sizeof *w0);
    float *x = xcalloc(n * d, sizeof *x), *y = xcalloc(n * d, sizeof *y);
    float *a = xcalloc((size_t)R_E * R_RANK * d, sizeof *a);
    float *b = xcalloc((size_t)R_E * d * R_RANK, sizeof *b);
    float *ta = xcalloc((size_t)T_R1 * d, sizeof *ta);
    float *tb = xcalloc(d * T_R2, sizeof *tb);
    float *scores = xcalloc((size_t)T_S * T_E, sizeof *scores);
    int32_t *task = xcalloc(n, sizeof *task), *sample = xcalloc(n, sizeof *sample);
    char path[4096];
    int rc = 0;
    atmoe_status st = ATMOE_STATUS_OK;
    atmoe_safetensors_writer *w = NULL, *pw = NULL;
    fill(w0, d * d, 1.0f / sqrtf((float)d), &state);
    fill(x, n * d, 1.0f, &state);
    /* Targets: x through W0 and a shift of each task's own, cheap to make
     * and far from what the start gives. */
    for (size_t i = 0; i < n; i++) {
        task[i] = (int32_t)(i % R_E);
        sample[i] = (int32_t)(i % T_S);
        for (size_t j = 0; j < d; j++)
            y[i * d + j] = 0.5f * x[i * d + j] +
                           0.1f * (float)((task[i] + (int)j) % 5);
    }
    fill(a, (size_t)R_E * R_RANK * d, 1.0f / sqrtf((float)d), &state);
    fill(b, (size_t)R_E * d * R_RANK, 0.01f, &state);
    fill(ta, (size_t)T_R1 * d, 1.0f / sqrtf((float)d), &state);
    for (size_t i = 0; i < (size_t)T_S * T_E; i++)
        scores[i] = 0.5f + 0.5f * (float)uniform(&state);

    uint64_t sw[2] = {d, d}, sx[2] = {n, d}, sn[1] = {n};
    uint64_t sa[2] = {T_R1, d}, sb[2] = {d, T_R2}, ss[2] = {T_S, T_E};
    uint64_t sea[2] = {(uint64_t)R_E * R_RANK, d}, seb[2] = {(uint64_t)R_E * d, R_RANK};
#define ADD(wr, name, shape, data)                                           \
    (st = atmoe_safetensors_writer_add_f32(wr, name, ATMOE_SAFETENSORS_F32,  \
                                           2, shape, data))
#define ADDI(wr, name, data)                                                 \
    (st = atmoe_safetensors_writer_add(wr, name, ATMOE_SAFETENSORS_I32, 1,   \
                                       sn, data))
    if ((st = atmoe_safetensors_writer_new(NULL, &w)) ||
        (st = atmoe_safetensors_writer_new(NULL, &pw)) ||
        ADD(w, "w0", sw, w0) ||
        (snprintf(path, sizeof path, "%s/base.safetensors", dir),
         st = atmoe_safetensors_writer_save(w, path)))
        goto out;
    atmoe_safetensors_writer_free(w);
    w = NULL;
    if ((st = atmoe_safetensors_writer_new(NULL, &w)) ||
        ADD(w, "w0", sw, w0) || ADD(w, "a", sa, ta) ||
        ADD(w, "b", sb, tb) ||
        (snprintf(path, sizeof path, "%s/trex-w.safetensors", dir),
         st = atmoe_safetensors_writer_save(w, path)))
        goto out;
    atmoe_safetensors_writer_free(w);
    w = NULL;
    if ((st = atmoe_safetensors_writer_new(NULL, &w)) ||
        ADD(w, "x", sx, x) || ADD(w, "y", sx, y) || ADDI(w, "task", task) ||
        ADDI(w, "sample", sample) || ADD(w, "scores", ss, scores) ||
        (snprintf(path, sizeof path, "%s/data.safetensors", dir),
         st = atmoe_safetensors_writer_save(w, path)))
        goto out;
    /* The peer's copy: the same values under plain names; the experts'
     * A and B stacked, expert e's rows e R .. (e + 1) R. */
    if (ADD(pw, "w0", sw, w0) || ADD(pw, "x", sx, x) || ADD(pw, "y", sx, y) ||
        ADDI(pw, "task", task) || ADDI(pw, "sample", sample) ||
        ADD(pw, "scores", ss, scores) || ADD(pw, "experts_a", sea, a) ||
        ADD(pw, "experts_b", seb, b) || ADD(pw, "trex_a", sa, ta) ||
        ADD(pw, "trex_b", sb, tb) ||
        (snprintf(path, sizeof path, "%s/peer.safetensors", dir),
         st = atmoe_safetensors_writer_save(pw, path)))
        goto out;
    for (int e = 0; e < R_E && st == ATMOE_STATUS_OK; e++) {
        atmoe_adapter *ad;
        if ((st = atmoe_adapter_new(NULL, &ad)))
            break;
        st = atmoe_adapter_set(ad, "model.layers.0.proj", R_RANK, d, d,
                               a + (size_t)e * R_RANK * d,
                               b + (size_t)e * d * R_RANK,
                               2.0f * R_RANK, 0);
        snprintf(path, sizeof path, "%s/e%d", dir, e);
        if (st == ATMOE_STATUS_OK)
            st = atmoe_adapter_save(ad, path, ATMOE_SAFETENSORS_F32);
        atmoe_adapter_free(ad);
    }
    if (st != ATMOE_STATUS_OK)
        goto out;
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    if ((rc = write_text(path,
             "{\"version\": 1, \"weights\": \"base.safetensors\", "
             "\"layers\": [{\"modules\": {\"proj\": {\"weight\": \"w0\", "
             "\"groups\": [[\"e0\", \"e1\"], [\"e2\", \"e3\"], "
             "[\"e4\", \"e5\"], [\"e6\", \"e7\"]]}}}]}\n")))
        goto out;
    snprintf(path, sizeof path, "%s/trex.json", dir);
    rc = write_text(path,
        "{\"version\": 1, \"weights\": \"trex-w.safetensors\", "
        "\"layers\": [{\"modules\": {\"proj\": {\"weight\": \"w0\", "
        "\"rank1\": {\"a\": \"a\", \"b\": \"b\", \"variant\": \"v2\"}}}}]}\n");
#undef ADD
#undef ADDI
out:
    if (st != ATMOE_STATUS_OK)
        rc = lib_fail(NULL, st, "writing the recipes' problem");
    atmoe_safetensors_writer_free(w);
    atmoe_safetensors_writer_free(pw);
    free(w0);
    free(x);
    free(y);
    free(a);
    free(b);
    free(ta);
    free(tb);
    free(scores);
    free(task);
    free(sample);
    return rc;
}

/* The step times a run of a recipe hears. */
typedef struct step_times {
    double *ms;
    size_t n, cap;
    double last; /* the clock of the model's previous step */
    uint64_t warmup;
    uint64_t skipped;
} step_times;

static int on_step(const atmoe_train_progress *p, void *user)
{
    step_times *s = user;
    if (p->done) {
        s->last = 0;
        s->skipped += p->skipped;
        return 0;
    }
    double dt = p->seconds - s->last;
    s->last = p->seconds;
    if (p->step > s->warmup) {
        if (s->n == s->cap) {
            s->cap = s->cap ? 2 * s->cap : 64;
            s->ms = xrealloc(s->ms, s->cap, sizeof *s->ms);
        }
        s->ms[s->n++] = 1e3 * dt;
    }
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void fill_times(result *r, double *ms, size_t n)
{
    qsort(ms, n, sizeof *ms, cmp_double);
    r->min_ms = ms[0];
    r->max_ms = ms[n - 1];
    r->median_ms = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
}

/* Runs recipe k in dir with the library; its step times into s. */
static int run_library(atmoe_context *ctx, int k, const char *dir, size_t T,
                       int reps, int warmup, step_times *s)
{
    char manifest[4096], data[4096], out[4096];
    snprintf(manifest, sizeof manifest, "%s/%s", dir,
             k == 2 ? "trex.json" : "manifest.json");
    snprintf(data, sizeof data, "%s/data.safetensors", dir);
    snprintf(out, sizeof out, "%s/out-%d", dir, k);
    atmoe_train_config cfg;
    atmoe_train_config_default(&cfg);
    cfg.optimizer.lr = R_LR;
    cfg.batch = T;
    cfg.steps = (uint64_t)(warmup + reps);
    cfg.progress = on_step;
    cfg.user = s;
    s->warmup = (uint64_t)warmup;
    atmoe_manifest *m;
    atmoe_status st = atmoe_manifest_open(ctx, manifest, &m);
    if (st == ATMOE_STATUS_OK) {
        double loss;
        st = k == 0   ? atmoe_train_stage1(ctx, m, data, &cfg, out)
             : k == 1 ? atmoe_train_stage2(ctx, m, data, &cfg, out, &loss)
                      : atmoe_train_trex(ctx, m, data, &cfg, out, &loss);
        atmoe_manifest_free(m);
    }
    /* A few steps at this rate may not lower the loss by the recipes'
     * margin: the steps ran and were timed all the same. */
    if (st == ATMOE_STATUS_NO_PROGRESS)
        st = ATMOE_STATUS_OK;
    if (st != ATMOE_STATUS_OK)
        return lib_fail(ctx, st, recipe_names[k]);
    if (s->n == 0)
        return set_error("%s: no step timed", recipe_names[k]);
    return 0;
}

/* Runs the peer's loop of recipe k on dir's files; its median, minimum
 * and maximum step times into r. */
static int run_peer(int k, const char *dir, size_t T, int reps, int warmup,
                    int threads, result *r, json_t **info)
{
    char *python = find_program("ATMOE_BENCH_PYTHON", DEFAULT_PYTHON,
                                "the peer's Python");
    char *script = python ? find_data_file(PEER_TRAIN_SCRIPT) : NULL;
    if (script == NULL) {
        free(python);
        return -1;
    }
    char ts[32], tr[32], rs[32], ws[32], th[32], lr[32];
    snprintf(ts, sizeof ts, "%zu", T);
    snprintf(rs, sizeof rs, "%d", reps);
    snprintf(ws, sizeof ws, "%d", warmup);
    snprintf(th, sizeof th, "%d", threads);
    snprintf(lr, sizeof lr, "%g", (double)R_LR);
    snprintf(tr, sizeof tr, "%s", recipe_names[k] + strlen("recipe-"));
    char *argv[] = {python, script, "--recipe", tr, "--dir", (char *)dir,
                    "--batch", ts, "--reps", rs, "--warmup", ws,
                    "--threads", th, "--lr", lr, NULL};
    pid_t pid;
    FILE *out;
    int rc = spawn_program(argv, &pid, &out);
    json_t *res = NULL;
    if (rc == 0) {
        char line[8192];
        while (fgets(line, sizeof line, out)) {
            json_t *obj = json_loads(line, 0, NULL);
            const char *ev =
                json_string_value(json_object_get(obj, "event"));
            if (ev && strcmp(ev, "result") == 0 && res == NULL) {
                res = obj;
            } else if (ev && strcmp(ev, "error") == 0) {
                set_error("%s %s: %s", python, script,
                          json_string_value(json_object_get(obj, "message")));
                rc = -1;
                json_decref(obj);
            } else {
                if (obj == NULL)
                    fputs(line, stderr);
                json_decref(obj);
            }
        }
        fclose(out);
        int status = wait_program(pid);
        if (rc == 0 && (status != 0 || res == NULL))
            rc = set_error("%s %s --recipe %s ended with status %d and no "
                           "result", python, script, tr, status);
    }
    if (rc == 0) {
        r->median_ms = json_number_value(json_object_get(res, "median_ms"));
        r->min_ms = json_number_value(json_object_get(res, "min_ms"));
        r->max_ms = json_number_value(json_object_get(res, "max_ms"));
        if (*info == NULL)
            *info = json_pack("{s:O?, s:O?, s:O?, s:O?, s:O?}", "torch",
                              json_object_get(res, "torch"), "python",
                              json_object_get(res, "python"), "threads",
                              json_object_get(res, "threads"), "blas",
                              json_object_get(res, "blas"),
                              "omp_wait_policy",
                              json_object_get(res, "omp_wait_policy"));
    }
    json_decref(res);
    free(python);
    free(script);
    return rc;
}

static int remove_entry(const char *path, const struct stat *st, int flag,
                        struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

void recipe_run(atmoe_context *ctx, device_run *d, int k, size_t index,
                int full, int reps, int warmup, int peer, progress *prog)
{
    size_t T, dd;
    recipe_shape(full, &T, &dd);
    const char *name = recipe_names[k];
    char *dir = make_temp_dir();
    step_times s = {0};
    if (dir == NULL || write_problem(dir, T, dd)) {
        fprintf(stderr, PROGRAM ": %s: %s: %s\n", d->info.name, name, errbuf);
        d->failures++;
        goto out;
    }
    result proto = {0};
    proto.workload = name;
    proto.workload_index = index;
    proto.scale = full ? "full" : "small";
    proto.T = T;
    proto.d_in = proto.d_out = dd;
    proto.experts = k == 2 ? T_E : R_E;
    proto.rank = k == 2 ? 1 : R_RANK;
    proto.total_rank = k == 2 ? T_R1 : (size_t)R_E * R_RANK;
    proto.r1 = k == 2 ? T_R1 : 0;
    proto.r2 = k == 2 ? T_R2 : 0;
    proto.flops = recipe_flops(k, T, dd);
    proto.bytes = 4.0 * ((double)dd * dd + 4.0 * (double)T * dd);
    proto.max_rel_diff = NAN;
    progress_show(prog, name, T, VARIANT_FUSED, "training");
    double lib_ms = NAN;
    if (run_library(ctx, k, dir, T, reps, warmup, &s)) {
        progress_clear(prog);
        fprintf(stderr, PROGRAM ": %s: %s: %s\n", d->info.name, name, errbuf);
        d->failures++;
    } else {
        result *r = push_result(d);
        *r = proto;
        r->variant = VARIANT_FUSED;
        fill_times(r, s.ms, s.n);
        /* The recipe's host time is not separated from the device's:
         * no host figures (null in the JSON, as the peer's). */
        r->host_measured = 0;
        set_rates(r, &d->c);
        lib_ms = r->median_ms;
        r->ratio_to_fused = 1;
        if (s.skipped)
            fprintf(stderr, PROGRAM ": %s: %s: %llu steps skipped as not "
                            "finite\n", d->info.name, name,
                    (unsigned long long)s.skipped);
    }
    prog->done++;
    if (peer) {
        progress_show(prog, name, T, VARIANT_TORCH, "training in PyTorch");
        result pr = proto;
        if (run_peer(k, dir, T, reps, warmup, (int)d->info.compute_units,
                     &pr, &d->peer_info)) {
            progress_clear(prog);
            fprintf(stderr, PROGRAM ": %s: %s torch: %s\n", d->info.name,
                    name, errbuf);
            d->failures++;
        } else {
            result *r = push_result(d);
            *r = pr;
            r->variant = VARIANT_TORCH;
            set_rates(r, &d->c);
            r->ratio_to_fused = r->median_ms / lib_ms;
        }
        prog->done++;
    }
out:
    progress_clear(prog);
    free(s.ms);
    if (dir)
        nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
}
