/* atmoe train stage1|stage2 MANIFEST --data D --output DIR [options]: the
 * training recipes (atmoe_train_stage1, atmoe_train_stage2) with a
 * progress line on a terminal, a JSON log and a summary; and atmoe train
 * demo: the synthetic multitask problem that shows what routing buys
 * (tools/train_demo.c). */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "train_demo.h"

/* Ctrl-C asks the recipe to stop at the next step boundary. */
static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

typedef struct train_view {
    int tty;
    FILE *log;
    int failed_log;
} train_view;

/* v as JSON: a number, or null when it is not finite. */
static void json_number(char *buf, size_t size, float v)
{
    if (isfinite(v))
        snprintf(buf, size, "%.9g", (double)v);
    else
        snprintf(buf, size, "null");
}

static int on_progress(const atmoe_train_progress *p, void *user)
{
    train_view *v = user;
    /* JSON has no NaN: a model without held-out rows, a skipped step's
     * loss or norm and a resumed run's initial loss log null. */
    char held[32], loss[32], norm[32], initial[32];
    json_number(held, sizeof held, p->done ? p->heldout_loss : NAN);
    json_number(loss, sizeof loss, p->loss);
    json_number(norm, sizeof norm, p->grad_norm);
    json_number(initial, sizeof initial, p->initial_loss);
    if (v->log && !v->failed_log &&
        fprintf(v->log,
                "{\"model\": %zu, \"adapter\": \"%s\", \"step\": %llu, "
                "\"steps\": %llu, \"loss\": %s, \"lr\": %.9g, "
                "\"grad_norm\": %s, \"tokens_per_second\": %.6g, "
                "\"seconds\": %.6g, \"done\": %s, \"heldout_loss\": %s, "
                "\"skipped\": %llu, \"initial_loss\": %s}\n",
                p->model, p->adapter ? p->adapter : "",
                (unsigned long long)p->step, (unsigned long long)p->steps,
                loss, (double)p->lr, norm, p->tokens_per_second, p->seconds,
                p->done ? "true" : "false", held,
                (unsigned long long)p->skipped, initial) < 0)
        v->failed_log = 1;
    if (p->done) {
        if (v->tty)
            fputs("\r\033[K", stderr);
        char before[48] = "";
        if (isfinite(p->initial_loss))
            snprintf(before, sizeof before, " (%.6g before)",
                     (double)p->initial_loss);
        fprintf(stderr, "atmoe train: %s: loss %.6g over its rows%s, "
                        "held-out %.6g, after %llu steps (%llu skipped as "
                        "not finite), %.0f rows/s, %.1f s\n",
                p->adapter, (double)p->loss, before, (double)p->heldout_loss,
                (unsigned long long)p->steps, (unsigned long long)p->skipped,
                p->tokens_per_second, p->seconds);
        return 0;
    }
    if (v->tty) {
        double left = p->step ? p->seconds / (double)p->step *
                                    (double)(p->steps - p->step)
                              : 0;
        fprintf(stderr, "\r\033[K[%zu/%zu] step %llu/%llu loss %.5g "
                        "%.0f rows/s %.0f s left",
                p->model + 1, p->models, (unsigned long long)p->step,
                (unsigned long long)p->steps, (double)p->loss,
                p->tokens_per_second, left);
        if (p->skipped)
            fprintf(stderr, " (%llu skipped)",
                    (unsigned long long)p->skipped);
    }
    return interrupted != 0;
}

static int usage(void)
{
    fprintf(stderr,
            "usage: atmoe train stage1|stage2|trex MANIFEST --data D.safetensors "
            "--output DIR\n"
            "         [--lr X] [--schedule constant|cosine] [--warmup N]\n"
            "         [--steps N | --epochs N] [--batch N] [--accumulation N]\n"
            "         [--clip X] [--weight-decay X] [--seed S] [--log FILE]\n"
            "         [--checkpoint FILE [--checkpoint-every N] [--resume]]\n"
            "         [--device D]\n"
            "  D holds x [N, d_in] and y [N, d_out] (mean squared error), or\n"
            "  labels [N] (I32) when MANIFEST has a \"head\" (cross-entropy\n"
            "  over its logits); x_heldout and y_heldout or labels_heldout\n"
            "  are measured after training\n"
            "       atmoe train demo [--json FILE] [--seed S] [--rows N] "
            "[--device D]\n");
    return EXIT_USAGE;
}

/* Parses a number into *out; 0 when it is not one within [lo, hi]. */
static int number(const char *name, const char *s, double lo, double hi,
                  double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "atmoe train: %s '%s' must be a number in [%g, %g]\n",
                name, s, lo, hi);
        return 0;
    }
    *out = v;
    return 1;
}

static int run(int argc, char **argv)
{
    if (argc < 2)
        return usage();
    const char *stage = argv[1];
    int demo = strcmp(stage, "demo") == 0;
    if (!demo && strcmp(stage, "stage1") && strcmp(stage, "stage2") &&
        strcmp(stage, "trex")) {
        fprintf(stderr, "atmoe train: unknown recipe '%s' (stage1, stage2, "
                        "trex or demo)\n", stage);
        return usage();
    }
    const char *manifest = NULL, *data = NULL, *output = NULL, *device = NULL;
    enum { OPTS = 13 };
    const char *opt[OPTS] = {NULL};
    static const char *const names[OPTS] = {
        "--lr", "--schedule", "--steps", "--epochs", "--batch",
        "--accumulation", "--clip", "--weight-decay", "--seed", "--log",
        "--warmup", "--checkpoint", "--checkpoint-every"};
    int resume = 0;
    const char *json = NULL, *rows = NULL;
    for (int i = 2; i < argc; i++) {
        int r = 0;
        if ((r = cli_option("train", argc, argv, &i, "--data", &data)) ||
            (r = cli_option("train", argc, argv, &i, "--output", &output)) ||
            (r = cli_option("train", argc, argv, &i, "--device", &device)) ||
            (r = cli_option("train", argc, argv, &i, "--json", &json)) ||
            (r = cli_option("train", argc, argv, &i, "--rows", &rows))) {
            if (r < 0)
                return EXIT_USAGE;
            continue;
        }
        if (strcmp(argv[i], "--resume") == 0) {
            resume = 1;
            continue;
        }
        for (int k = 0; k < OPTS && r == 0; k++)
            r = cli_option("train", argc, argv, &i, names[k], &opt[k]);
        if (r < 0)
            return EXIT_USAGE;
        if (r)
            continue;
        if (argv[i][0] == '-' || manifest || demo) {
            fprintf(stderr, "atmoe train: unexpected argument '%s'\n",
                    argv[i]);
            return usage();
        }
        manifest = argv[i];
    }
    atmoe_train_config cfg;
    atmoe_train_config_default(&cfg);
    double v;
    if (opt[8]) {
        if (!number("--seed", opt[8], 0, 9007199254740992.0, &v))
            return EXIT_USAGE;
        cfg.seed = (uint64_t)v;
    }
    if (demo) {
        if (manifest || data || output) {
            fprintf(stderr, "atmoe train demo: takes --json, --seed, --rows "
                            "and --device only\n");
            return usage();
        }
        size_t n = 0;
        if (rows) {
            if (!number("--rows", rows, 8, 100000, &v))
                return EXIT_USAGE;
            n = (size_t)v;
        }
        atmoe_context *ctx;
        int rc = cli_open_device(device, &ctx);
        if (rc != EXIT_OK)
            return rc;
        rc = train_demo(ctx, cfg.seed, n, json);
        atmoe_context_free(ctx);
        return rc;
    }
    if (json || rows) {
        fprintf(stderr, "atmoe train: --json and --rows are the demo's\n");
        return usage();
    }
    if (manifest == NULL || data == NULL || output == NULL)
        return usage();
    if (opt[0]) {
        if (!number("--lr", opt[0], 1e-12, 1e6, &v))
            return EXIT_USAGE;
        cfg.optimizer.lr = (float)v;
    }
    if (opt[1]) {
        if (strcmp(opt[1], "constant") == 0) {
            cfg.optimizer.schedule = ATMOE_SCHEDULE_CONSTANT;
        } else if (strcmp(opt[1], "cosine") == 0) {
            cfg.optimizer.schedule = ATMOE_SCHEDULE_COSINE;
        } else {
            fprintf(stderr, "atmoe train: --schedule '%s' must be constant "
                            "or cosine\n", opt[1]);
            return EXIT_USAGE;
        }
    }
    if (opt[2]) {
        if (!number("--steps", opt[2], 1, 1e12, &v))
            return EXIT_USAGE;
        cfg.steps = (uint64_t)v;
    }
    if (opt[3]) {
        if (opt[2]) {
            fprintf(stderr, "atmoe train: --steps or --epochs, not both\n");
            return EXIT_USAGE;
        }
        if (!number("--epochs", opt[3], 1, 1e6, &v))
            return EXIT_USAGE;
        cfg.epochs = (unsigned)v;
    }
    if (opt[4]) {
        if (!number("--batch", opt[4], 1, 1 << 20, &v))
            return EXIT_USAGE;
        cfg.batch = (size_t)v;
    }
    if (opt[5]) {
        if (!number("--accumulation", opt[5], 1, 1 << 16, &v))
            return EXIT_USAGE;
        cfg.optimizer.accumulation = (unsigned)v;
    }
    if (opt[6]) {
        if (!number("--clip", opt[6], 0, 1e30, &v))
            return EXIT_USAGE;
        cfg.optimizer.max_grad_norm = (float)v;
    }
    if (opt[7]) {
        if (!number("--weight-decay", opt[7], 0, 1e6, &v))
            return EXIT_USAGE;
        cfg.optimizer.weight_decay = (float)v;
    }
    if (opt[10]) {
        if (!number("--warmup", opt[10], 0, 1e12, &v))
            return EXIT_USAGE;
        cfg.optimizer.warmup_steps = (uint64_t)v;
    }
    if (opt[12]) {
        if (!number("--checkpoint-every", opt[12], 1, 1e12, &v))
            return EXIT_USAGE;
        cfg.checkpoint_every = (uint64_t)v;
    }
    if ((opt[12] || resume) && !opt[11]) {
        fprintf(stderr, "atmoe train: --checkpoint-every and --resume need "
                        "--checkpoint FILE\n");
        return EXIT_USAGE;
    }
    cfg.checkpoint = opt[11];
    cfg.resume = resume;
    train_view view = {isatty(STDERR_FILENO), NULL, 0};
    if (opt[9] && (view.log = fopen(opt[9], "w")) == NULL) {
        fprintf(stderr, "atmoe train: cannot write %s: %s\n", opt[9],
                strerror(errno));
        return EXIT_FAILED;
    }
    cfg.progress = on_progress;
    cfg.user = &view;

    atmoe_manifest *m;
    atmoe_status st = atmoe_manifest_open(NULL, manifest, &m);
    if (st != ATMOE_STATUS_OK) {
        if (view.log)
            fclose(view.log);
        return cli_fail(manifest, st, NULL);
    }
    atmoe_context *ctx;
    int rc = cli_open_device(device, &ctx);
    if (rc != EXIT_OK) {
        atmoe_manifest_free(m);
        if (view.log)
            fclose(view.log);
        return rc;
    }
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigaction(SIGINT, &sa, &old);
    double loss = 0;
    int trex = strcmp(stage, "trex") == 0;
    if (trex)
        st = atmoe_train_trex(ctx, m, data, &cfg, output, &loss);
    else if (stage[5] == '1')
        st = atmoe_train_stage1(ctx, m, data, &cfg, output);
    else
        st = atmoe_train_stage2(ctx, m, data, &cfg, output, &loss);
    sigaction(SIGINT, &old, NULL);
    atmoe_manifest_info info;
    atmoe_manifest_get_info(m, &info);
    const char *kind = info.head_file ? "cross-entropy" : "loss";
    if (view.tty)
        fputs("\r\033[K", stderr);
    if (st == ATMOE_STATUS_CANCELLED && interrupted) {
        fprintf(stderr, "atmoe train: interrupted at a step boundary; "
                        "%s\n",
                cfg.checkpoint ? "checkpoint written, --resume continues"
                               : "nothing written");
        rc = EXIT_FAILED;
    } else if (st != ATMOE_STATUS_OK) {
        /* The manifest's check reports on the thread's message. */
        rc = cli_fail(stage, st,
                      atmoe_errmsg(ctx)[0] ? (const atmoe_context *)ctx
                                           : NULL);
    } else if (trex) {
        printf("rank-1 experts trained: %s %.6g over %s; manifest "
               "%s/manifest.json\n", kind, loss, data, output);
    } else if (stage[5] == '2') {
        printf("routers trained: %s %.6g over %s; manifest %s/manifest.json"
               "\n", kind, loss, data, output);
    } else {
        printf("experts trained: adapters in %s\n", output);
    }
    if (view.log && (fclose(view.log) != 0 || view.failed_log) &&
        rc == EXIT_OK) {
        fprintf(stderr, "atmoe train: cannot write %s\n", opt[9]);
        rc = EXIT_FAILED;
    }
    atmoe_context_free(ctx);
    atmoe_manifest_free(m);
    return rc;
}

const cli_command cmd_train = {
    "train", run,
    "stage1|stage2|trex MANIFEST --data D --output DIR [options] | demo",
};
