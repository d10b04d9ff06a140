/* atmoe inspect PATH: describes a PEFT adapter (a directory, or its
 * adapter_config.json), a safetensors file or a layer manifest, and the
 * problems found in it: non-finite values, a manifest whose files do not
 * fit.  Problems make the exit status 1. */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"

/* Non-finite values among n floats. */
static size_t non_finite(const float *x, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += !isfinite(x[i]);
    return k;
}

static int all_zero(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (x[i] != 0.0f)
            return 0;
    return 1;
}

/* Prints a finding about an input: a problem (counted, and the command
 * fails) or, with problems NULL, a note. */
static void finding(size_t *problems, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void finding(size_t *problems, const char *fmt, ...)
{
    if (problems)
        (*problems)++;
    printf("  %s: ", problems ? "problem" : "note");
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}

static int inspect_adapter(const char *path)
{
    atmoe_adapter *ad;
    atmoe_status st = atmoe_adapter_open(NULL, path, &ad);
    if (st != ATMOE_STATUS_OK)
        return cli_fail(path, st, NULL);
    atmoe_adapter_info info;
    atmoe_adapter_get_info(ad, &info);
    printf("PEFT LoRA adapter %s\n", path);
    printf("  base model %s; r %zu, lora_alpha %g, use_rslora %s, "
           "fan_in_fan_out %s\n",
           *info.base_model ? info.base_model : "(not named)", info.r,
           info.alpha, info.use_rslora ? "true" : "false",
           info.fan_in_fan_out ? "true" : "false");
    printf("  %zu target(s):\n  %5s  %-44s %4s %6s %6s %8s %10s\n",
           info.targets, "layer", "module", "rank", "d_in", "d_out", "alpha",
           "scale");
    for (size_t i = 0; i < info.targets; i++) {
        atmoe_adapter_target t;
        atmoe_adapter_get_target(ad, i, &t);
        printf("  %5d  %-44s %4zu %6zu %6zu %8g %10g\n", t.layer, t.module,
               t.rank, t.d_in, t.d_out, t.alpha, t.scale);
    }
    size_t problems = 0;
    int rc = EXIT_OK;
    for (size_t i = 0; i < info.targets && rc == EXIT_OK; i++) {
        atmoe_adapter_target t;
        atmoe_adapter_get_target(ad, i, &t);
        size_t na = t.rank * t.d_in, nb = t.d_out * t.rank;
        float *a = malloc(na * sizeof *a), *b = malloc(nb * sizeof *b);
        if (a == NULL || b == NULL)
            rc = cli_out_of_memory(path);
        else if ((st = atmoe_adapter_read(ad, i, a, na, b, nb)) !=
                 ATMOE_STATUS_OK)
            rc = cli_fail(path, st, NULL);
        if (rc == EXIT_OK && non_finite(a, na))
            finding(&problems, "%s: %zu non-finite value(s) in lora_A",
                    t.module, non_finite(a, na));
        if (rc == EXIT_OK && non_finite(b, nb))
            finding(&problems, "%s: %zu non-finite value(s) in lora_B",
                    t.module, non_finite(b, nb));
        if (rc == EXIT_OK && all_zero(b, nb))
            finding(NULL, "%s: lora_B is all zero, as PEFT initialises it: "
                          "the target adds nothing until trained", t.module);
        free(a);
        free(b);
    }
    atmoe_adapter_free(ad);
    if (rc == EXIT_OK)
        printf("%zu problem(s)\n", problems);
    return rc != EXIT_OK ? rc : problems ? EXIT_FAILED : EXIT_OK;
}

static int inspect_safetensors(const char *path)
{
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(NULL, path, &f);
    if (st != ATMOE_STATUS_OK)
        return cli_fail(path, st, NULL);
    size_t n;
    atmoe_safetensors_get_count(f, &n);
    const char *format;
    printf("safetensors file %s: %zu tensor(s)", path, n);
    if (atmoe_safetensors_get_metadata(f, "format", &format) ==
        ATMOE_STATUS_OK)
        printf(", format \"%s\"", format);
    printf("\n  %-52s %-7s %s\n", "tensor", "dtype", "shape");
    size_t problems = 0;
    int rc = EXIT_OK;
    for (size_t i = 0; i < n && rc == EXIT_OK; i++) {
        atmoe_safetensors_tensor t;
        atmoe_safetensors_get(f, i, &t);
        char shape[160] = "[";
        size_t k = 1;
        for (int d = 0; d < t.ndim && k < sizeof shape; d++)
            k += (size_t)snprintf(shape + k, sizeof shape - k, "%s%llu",
                                  d ? ", " : "",
                                  (unsigned long long)t.shape[d]);
        if (k < sizeof shape - 1)
            strcat(shape, "]");
        printf("  %-52s %-7s %s\n", t.name, atmoe_safetensors_dtype_name(t.dtype),
               shape);
        if (t.dtype != ATMOE_SAFETENSORS_F32 && t.dtype != ATMOE_SAFETENSORS_F16 &&
            t.dtype != ATMOE_SAFETENSORS_BF16 && t.dtype != ATMOE_SAFETENSORS_F64)
            continue;
        float *x = malloc((t.count ? t.count : 1) * sizeof *x);
        if (x == NULL)
            rc = cli_out_of_memory(path);
        else if ((st = atmoe_safetensors_read_f32(f, t.name, x, t.count)) !=
                 ATMOE_STATUS_OK)
            rc = cli_fail(path, st, NULL);
        else if (non_finite(x, t.count))
            finding(&problems, "%s: %zu non-finite value(s) (as f32)",
                    t.name, non_finite(x, t.count));
        free(x);
    }
    atmoe_safetensors_free(f);
    if (rc == EXIT_OK)
        printf("%zu problem(s)\n", problems);
    return rc != EXIT_OK ? rc : problems ? EXIT_FAILED : EXIT_OK;
}

/* A tensor of a module, with its type in the file and on the device once
 * the manifest is checked (s not NULL). */
static void print_tensor(const char *key, const atmoe_manifest_tensor *t,
                         const atmoe_manifest_storage *s, int which)
{
    if (!t->file)
        return;
    printf("      %-7s %s in %s%s", key, t->tensor, t->file,
           t->transposed ? " (stored [in, out])" : "");
    if (s) {
        const atmoe_safetensors_dtype file[4] = {s->weight_file, s->bias_file,
                                                 s->w_g_file, s->w_d_file};
        const atmoe_dtype dev[4] = {s->weight, s->bias, s->w_g, s->w_d};
        printf(", %s as %s", atmoe_safetensors_dtype_name(file[which]),
               atmoe_dtype_name(dev[which]));
    }
    printf("\n");
}

static int inspect_manifest(const char *path)
{
    atmoe_manifest *m;
    atmoe_status st = atmoe_manifest_open(NULL, path, &m);
    if (st != ATMOE_STATUS_OK)
        return cli_fail(path, st, NULL);
    /* A manifest whose files do not fit is described all the same, with
     * what the check found. */
    atmoe_status checked = atmoe_manifest_check(m);
    char why[1024] = "";
    if (checked != ATMOE_STATUS_OK)
        snprintf(why, sizeof why, "%s", atmoe_errmsg(NULL));
    atmoe_manifest_info info;
    atmoe_manifest_get_info(m, &info);
    printf("layer manifest %s: %zu layer(s), %zu module(s)", path,
           info.layers, info.modules);
    if (info.checked)
        printf(", %zu -> %zu features", info.d_in, info.d_out);
    printf("\n");
    if (info.centroids_file) {
        printf("  centroids %s in %s", info.centroids_tensor,
               info.centroids_file);
        if (info.checked)
            printf(": %zu clusters of %zu", info.clusters,
                   info.embedding_dim);
        printf("\n");
    }
    if (info.head_file) {
        printf("  head %s in %s", info.head_tensor, info.head_file);
        if (info.checked)
            printf(": %zu classes", info.classes);
        printf(", ignore index %d\n", info.ignore_index);
    }
    size_t last_layer = 0;
    uint64_t device_bytes = 0;
    for (size_t i = 0; i < info.modules; i++) {
        atmoe_manifest_module mod;
        atmoe_manifest_get_module(m, i, &mod);
        atmoe_manifest_storage storage, *s = NULL;
        if (info.checked &&
            atmoe_manifest_get_storage(m, i, &storage) == ATMOE_STATUS_OK) {
            s = &storage;
            device_bytes += s->device_bytes;
        }
        if (i == 0 || mod.layer != last_layer)
            printf("  layer %zu (model layer %d)\n", mod.layer,
                   mod.model_layer);
        last_layer = mod.layer;
        printf("    %s%s", mod.name, mod.is_output ? " (output)" : "");
        if (info.checked)
            printf(": %zu -> %zu", mod.d_in, mod.d_out);
        if (mod.rank1) {
            static const char *const routing[] = {"router and intuition",
                                                  "router only",
                                                  "intuition only"};
            printf(", rank-1 experts %s", mod.variant == ATMOE_MOR1E_V1
                                              ? "v1" : "v2");
            if (info.checked)
                printf(" (r1 %zu, r2 %zu, %zu experts)", mod.r1, mod.r2,
                       mod.rank1_experts);
            printf("\n");
            print_tensor("weight", &mod.weight, s, 0);
            print_tensor("bias", &mod.bias, s, 1);
            printf("      gates   %s, k_router %g, k_intuition %g, top-k %d "
                   "(0: all)\n", routing[mod.routing], mod.k_router,
                   mod.k_intuition, mod.top_k);
            print_tensor("a", &mod.a, NULL, 0);
            print_tensor("b", &mod.b, NULL, 0);
            print_tensor("w_r", &mod.w_r, NULL, 0);
            print_tensor("w_om", &mod.w_om, NULL, 0);
            print_tensor("w_c", &mod.w_c, NULL, 0);
            print_tensor("map", &mod.score_map, NULL, 0);
            if ((!mod.w_r.file && mod.routing != ATMOE_MOR1E_ROUTE_INTUITION) ||
                !mod.w_om.file || !mod.w_c.file)
                printf("      (absent w_r, w_om, w_c are zeros)\n");
            continue;
        }
        printf(", c %g", mod.c);
        if (s)
            printf(", %llu bytes on the device",
                   (unsigned long long)s->device_bytes);
        printf("\n");
        print_tensor("weight", &mod.weight, s, 0);
        print_tensor("bias", &mod.bias, s, 1);
        printf("      router  %s, tau_g %g, tau_d %g, top-k groups %d, "
               "experts %d (0: all)\n",
               mod.form == ATMOE_ROUTER_SCALED ? "scaled" : "projected",
               mod.tau_g, mod.tau_d, mod.top_k_groups, mod.top_k_experts);
        print_tensor("w_g", &mod.w_g, s, 2);
        print_tensor(mod.form == ATMOE_ROUTER_SCALED ? "v_d" : "w_d",
                     &mod.w_d, s, 3);
        if (!mod.w_g.file || !mod.w_d.file)
            printf("      (absent router tensors are zeros)\n");
        if (mod.masks || mod.fixed)
            printf("      %zu mask(s), %zu fixed weight(s)\n", mod.masks,
                   mod.fixed);
        for (size_t e = 0; e < mod.experts + (size_t)mod.has_general; e++) {
            atmoe_manifest_expert x;
            atmoe_manifest_get_expert(m, i, e, &x);
            if (x.group >= 0)
                printf("      group %d.%d ", x.group, x.position);
            else
                printf("      general (lambda %g) ", mod.lambda);
            printf("%s: layer %d, %s", x.adapter, x.layer, x.module);
            if (x.target)
                printf(" -> %s, rank %zu, alpha %g, scale %g%s", x.target,
                       x.rank, x.alpha, x.scale,
                       x.flags & ATMOE_EXPERT_RSLORA ? " (rsLoRA)" : "");
            printf("\n");
        }
        if (s)
            printf("      experts A %s as %s, B %s as %s\n",
                   atmoe_safetensors_dtype_name(s->a_file),
                   atmoe_dtype_name(s->a),
                   atmoe_safetensors_dtype_name(s->b_file),
                   atmoe_dtype_name(s->b));
    }
    if (info.checked)
        printf("  device memory of the weights: %llu bytes (%.2f MiB), "
               "without the graph's activations\n",
               (unsigned long long)device_bytes,
               (double)device_bytes / (1024.0 * 1024.0));
    atmoe_manifest_free(m);
    if (checked != ATMOE_STATUS_OK) {
        printf("  problem: %s: %s\n1 problem(s)\n", atmoe_status_name(checked),
               why);
        return EXIT_FAILED;
    }
    printf("0 problem(s)\n");
    return EXIT_OK;
}

/* Whether a file is JSON text (a manifest) rather than a safetensors file,
 * whose first eight bytes are a binary length. */
static int looks_like_json(const char *path)
{
    FILE *f = fopen(path, "rb");
    int c = EOF;
    if (f) {
        while ((c = fgetc(f)) != EOF && isspace(c))
            ;
        fclose(f);
    }
    return c == '{';
}

static int inspect(int argc, char **argv)
{
    if (argc != 2 || argv[1][0] == '-') {
        fprintf(stderr, "usage: atmoe inspect PATH  (a PEFT adapter "
                        "directory, a safetensors file or a manifest)\n");
        return EXIT_USAGE;
    }
    const char *path = argv[1];
    struct stat sb;
    if (stat(path, &sb) != 0) {
        perror(path);
        return EXIT_FAILED;
    }
    if (S_ISDIR(sb.st_mode))
        return inspect_adapter(path);
    /* Opening a FIFO to sniff its first byte would wait for a writer. */
    if (!S_ISREG(sb.st_mode)) {
        fprintf(stderr, "atmoe inspect: %s: not a regular file\n", path);
        return EXIT_FAILED;
    }
    /* An adapter named by its config file. */
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    if (strcmp(base, "adapter_config.json") == 0) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%.*s", (int)(base - path), path);
        return inspect_adapter(*dir ? dir : ".");
    }
    return looks_like_json(path) ? inspect_manifest(path)
                                 : inspect_safetensors(path);
}

const cli_command cmd_inspect = {
    "inspect", inspect,
    "PATH  describe an adapter, a safetensors file or a manifest"};
