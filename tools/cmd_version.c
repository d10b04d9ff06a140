/* atmoe version: the version of the library it runs on. */
#include <stdio.h>

#include "cli.h"

static int version(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "atmoe version: unexpected argument '%s'\n", argv[1]);
        return EXIT_USAGE;
    }
    printf("atmoe %s\n", atmoe_version());
    return EXIT_OK;
}

const cli_command cmd_version = {"version", version,
                                 "print the library version"};
