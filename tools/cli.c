/* The helpers of tools/cli.h. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

int cli_out_of_memory(const char *what)
{
    fprintf(stderr, "atmoe: %s: out of host memory\n", what);
    return EXIT_FAILED;
}

int cli_fail(const char *what, atmoe_status st, const atmoe_context *ctx)
{
    const char *detail = atmoe_errmsg(ctx);
    fprintf(stderr, "atmoe: %s: %s%s%s\n", what, atmoe_strerror(st),
            *detail ? ": " : "", detail);
    return EXIT_FAILED;
}

int cli_open_device(const char *device, atmoe_context **ctx)
{
    atmoe_status st = atmoe_context_new(device, ctx);
    return st == ATMOE_STATUS_OK ? EXIT_OK
                                 : cli_fail("opening the device", st, NULL);
}

int cli_option(const char *cmd, int argc, char **argv, int *i,
               const char *name, const char **value)
{
    size_t n = strlen(name);
    if (strncmp(argv[*i], name, n) != 0)
        return 0;
    if (argv[*i][n] == '=') {
        *value = argv[*i] + n + 1;
        return 1;
    }
    if (argv[*i][n] != '\0')
        return 0;
    if (*i + 1 >= argc) {
        fprintf(stderr, "atmoe %s: %s needs a value\n", cmd, name);
        return -1;
    }
    *value = argv[++*i];
    return 1;
}
