/* atmoe: the command-line front end of the library.
 *
 *   atmoe devices                 list every OpenCL device the library sees
 *   atmoe selfcheck [--device D]  run the library's kernels and CLBlast on a
 *                                 device against a float64 host reference
 *   atmoe params [--device D]     print the tuned parameters a context on
 *                                 the device uses, and where they come from
 *   atmoe version
 *
 * Subcommands are a table, so that inspect, run, train and cluster join it
 * as they are written. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "atmoe.h"

static int fail(const char *what, atmoe_status st, const atmoe_context *ctx)
{
    const char *detail = atmoe_errmsg(ctx);
    fprintf(stderr, "atmoe: %s: %s%s%s\n", what, atmoe_strerror(st),
            *detail ? ": " : "", detail);
    return 1;
}

static int cmd_devices(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "atmoe devices: unexpected argument '%s'\n", argv[1]);
        return 2;
    }
    size_t n, def = (size_t)-1;
    atmoe_status st = atmoe_device_count(&n);
    if (st != ATMOE_STATUS_OK)
        return fail("listing devices", st, NULL);
    if (n == 0) {
        printf("no OpenCL device found (install an OpenCL driver, for "
               "example pocl-opencl-icd)\n");
        return 1;
    }
    if (atmoe_device_default(&def) != ATMOE_STATUS_OK)
        fprintf(stderr, "atmoe: %s\n", atmoe_errmsg(NULL));
    printf("%-3s %-1s %-40s %-7s %-11s %4s %9s %9s %4s %4s\n", "#", "",
           "device", "vendor", "type", "CUs", "mem MiB", "alloc MiB", "fp16",
           "fp64");
    for (size_t i = 0; i < n; i++) {
        atmoe_device_info d;
        if ((st = atmoe_device_get_info(i, &d)) != ATMOE_STATUS_OK)
            return fail("describing a device", st, NULL);
        printf("%-3zu %-1s %-40.40s %-7s %-11s %4u %9llu %9llu %4s %4s\n", i,
               i == def ? "*" : "", d.name, atmoe_vendor_name(d.vendor),
               atmoe_device_type_name(d.type), d.compute_units,
               (unsigned long long)(d.global_mem_bytes >> 20),
               (unsigned long long)(d.max_alloc_bytes >> 20),
               d.fp16 ? "yes" : "no", d.fp64 ? "yes" : "no");
        printf("      %s, driver %s\n", d.platform_version, d.driver_version);
    }
    printf("* the default device (ATMOE_DEVICE overrides it)\n");
    return 0;
}

static int cmd_selfcheck(int argc, char **argv)
{
    const char *device = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--device") == 0 && i + 1 < argc)
            device = argv[++i];
        else if (strncmp(argv[i], "--device=", 9) == 0)
            device = argv[i] + 9;
        else {
            fprintf(stderr, "atmoe selfcheck: unexpected argument '%s'\n",
                    argv[i]);
            return 2;
        }
    }
    atmoe_context *ctx;
    atmoe_status st = atmoe_context_new(&ctx, device);
    if (st != ATMOE_STATUS_OK)
        return fail("opening the device", st, NULL);
    atmoe_device_info d;
    atmoe_context_get_device(ctx, &d);
    double err = 0;
    st = atmoe_context_selfcheck(ctx, &err);
    int rc = 0;
    if (st != ATMOE_STATUS_OK)
        rc = fail("selfcheck", st, ctx);
    else
        printf("selfcheck passed on %s (%s): tensor copies and CLBlast SGEMM "
               "agree with float64, max relative error %.2e\n",
               d.name, atmoe_vendor_name(d.vendor), err);
    atmoe_context_free(ctx);
    return rc;
}

static int cmd_params(int argc, char **argv)
{
    const char *device = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--device") == 0 && i + 1 < argc)
            device = argv[++i];
        else if (strncmp(argv[i], "--device=", 9) == 0)
            device = argv[i] + 9;
        else {
            fprintf(stderr, "atmoe params: unexpected argument '%s'\n",
                    argv[i]);
            return 2;
        }
    }
    atmoe_context *ctx;
    atmoe_status st = atmoe_context_new(&ctx, device);
    if (st != ATMOE_STATUS_OK)
        return fail("opening the device", st, NULL);
    size_t need = 0;
    char probe[1];
    atmoe_context_get_params(ctx, probe, sizeof probe, &need);
    char *text = need ? malloc(need) : NULL;
    int rc = 0;
    if (text == NULL)
        rc = fail("describing the parameters", ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                  NULL);
    else if ((st = atmoe_context_get_params(ctx, text, need, NULL)) !=
             ATMOE_STATUS_OK)
        rc = fail("describing the parameters", st, ctx);
    else
        printf("%s\n", text);
    free(text);
    atmoe_context_free(ctx);
    return rc;
}

static int cmd_version(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "atmoe version: unexpected argument '%s'\n", argv[1]);
        return 2;
    }
    printf("atmoe %s\n", atmoe_version());
    return 0;
}

static const struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} commands[] = {
    {"devices", cmd_devices, "list the OpenCL devices"},
    {"selfcheck", cmd_selfcheck,
     "[--device D]  check a device's numbers against float64"},
    {"params", cmd_params,
     "[--device D]  print the tuned parameters in force (atmoe-tune(1))"},
    {"version", cmd_version, "print the library version"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: atmoe COMMAND [ARGS]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\nD is a device selection: an index, gpu, cpu, or part of a "
               "name (see atmoe(1)).\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0)
            return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "atmoe: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
