/* atmoe params: the parameters a context on the device runs with, and
 * where they come from (atmoe_context_get_params, atmoe-tune(1)). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static int params(int argc, char **argv)
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
    else
        printf("%s\n", text);
    free(text);
    atmoe_context_free(ctx);
    return rc;
}

const cli_command cmd_params = {
    "params", params,
    "[--device D]  print the tuned parameters in force (atmoe-tune(1))"};
