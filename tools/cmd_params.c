/* atmoe params: the parameters a context on the device runs with, and
 * where they come from (atmoe_context_get_params, atmoe-tune(1)): first
 * one line a kernel saying which entry its parameters came from and
 * whether that entry was tuned on this machine, then the whole
 * description as JSON (--json: the JSON alone). */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "cli.h"

/* One kernel's line from its "sources" record. */
static void say_source(const char *kernel, const json_t *src,
                       const char *host)
{
    const char *from = json_string_value(json_object_get(src, "from"));
    const char *match = json_string_value(json_object_get(src, "match"));
    const char *file = json_string_value(json_object_get(src, "file"));
    const char *tuned_on = json_string_value(json_object_get(src, "host"));
    int untuned = json_is_true(json_object_get(src, "untuned"));
    if (from == NULL || strcmp(from, "default") == 0) {
        printf("  %-22s the library's built-in defaults (untuned)\n", kernel);
        return;
    }
    if (strcmp(from, "fallback") == 0) {
        printf("  %-22s as %s (no entry of its own)\n", kernel,
               json_string_value(json_object_get(src, "as")));
        return;
    }
    if (strcmp(from, "environment") == 0) {
        printf("  %-22s set by the environment (ATMOE_* variables)\n",
               kernel);
        return;
    }
    if (strcmp(from, "explicit") == 0) {
        printf("  %-22s an explicit set (atmoe_context_set_params)\n",
               kernel);
        return;
    }
    const char *tuned =
        untuned ? "a shipped class default, an untuned starting point"
        : tuned_on == NULL
            ? "tuned, not on this machine as far as the entry says"
        : host && strcmp(tuned_on, host) == 0 ? "tuned on this machine"
                                              : "tuned on another machine";
    printf("  %-22s %s database %s, entry by %s: %s", kernel, from,
           file ? file : "?", match ? match : "?", tuned);
    if (tuned_on && !untuned && !(host && strcmp(tuned_on, host) == 0))
        printf(" (%s)", tuned_on);
    printf("\n");
}

static int params(int argc, char **argv)
{
    const char *device = NULL;
    int json_only = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--device") == 0 && i + 1 < argc)
            device = argv[++i];
        else if (strncmp(argv[i], "--device=", 9) == 0)
            device = argv[i] + 9;
        else if (strcmp(argv[i], "--json") == 0)
            json_only = 1;
        else {
            fprintf(stderr, "atmoe params: unexpected argument '%s'\n",
                    argv[i]);
            return EXIT_USAGE;
        }
    }
    atmoe_context *ctx;
    if (cli_open_device(device, &ctx) != EXIT_OK)
        return EXIT_FAILED;
    atmoe_status st;
    size_t need = 0;
    char probe[1];
    atmoe_context_get_params(ctx, probe, sizeof probe, &need);
    char *text = need ? malloc(need) : NULL;
    int rc = EXIT_OK;
    if (text == NULL)
        rc = cli_fail("describing the parameters",
                      ATMOE_STATUS_HOST_OUT_OF_MEMORY, NULL);
    else if ((st = atmoe_context_get_params(ctx, text, need, NULL)) !=
             ATMOE_STATUS_OK)
        rc = cli_fail("describing the parameters", st, ctx);
    else {
        json_t *p = json_loads(text, 0, NULL);
        json_t *sources = json_object_get(p, "sources");
        if (!json_only && json_is_object(sources)) {
            char host[256];
            int have_host = gethostname(host, sizeof host) == 0;
            host[sizeof host - 1] = '\0';
            atmoe_device_info dev;
            atmoe_context_get_device(ctx, &dev);
            printf("%s (%s %s, driver %s): parameters in force (%s)\n",
                   dev.name, atmoe_vendor_name(dev.vendor),
                   atmoe_device_type_name(dev.type), dev.driver_version,
                   json_string_value(json_object_get(p, "mode")));
            const char *kernel;
            json_t *src;
            json_object_foreach(sources, kernel, src)
                say_source(kernel, src, have_host ? host : NULL);
            if (json_object_get(sources, "clblast.Xgemm") == NULL)
                printf("  %-22s CLBlast's built-in parameters (untuned)\n",
                       "clblast");
            printf("\n");
        }
        json_decref(p);
        printf("%s\n", text);
    }
    free(text);
    atmoe_context_free(ctx);
    return rc;
}

const cli_command cmd_params = {
    "params", params,
    "[--device D] [--json]  the parameters in force and which entry each "
    "kernel's came from (atmoe-tune(1))"};
