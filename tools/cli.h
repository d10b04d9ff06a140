/* What the subcommands of atmoe share: the exit statuses, the shape of a
 * subcommand in the table of tools/atmoe.c, and the helpers that report
 * failures and parse options the same way in every subcommand. */
#ifndef ATMOE_CLI_H
#define ATMOE_CLI_H

#include "atmoe.h"

/* Exit statuses (atmoe(1)). */
enum { EXIT_OK = 0, EXIT_FAILED = 1, EXIT_USAGE = 2 };

/* A subcommand: tools/cmd_NAME.c defines cmd_NAME, and the table of
 * tools/atmoe.c lists it.  run gets the arguments from the subcommand's
 * name on (argv[0] is the name); help follows the name in the usage. */
typedef struct cli_command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} cli_command;

/* Prints that host memory ran out while doing `what`; returns
 * EXIT_FAILED. */
int cli_out_of_memory(const char *what);

/* Prints a failed library call: what, the status and the library's detail
 * (of ctx, or of the thread with ctx NULL); returns EXIT_FAILED. */
int cli_fail(const char *what, atmoe_status st, const atmoe_context *ctx);

/* Opens a context on the device that selection D names (NULL: the
 * default).  Returns EXIT_OK, or EXIT_FAILED after saying why not. */
int cli_open_device(const char *device, atmoe_context **ctx);

/* Takes "--name VALUE" or "--name=VALUE" at argv[*i]: 1 when it matched
 * (the value in *value, *i moved past it), 0 when argv[*i] is another
 * argument, -1 (after a message naming subcommand cmd) when the value is
 * missing. */
int cli_option(const char *cmd, int argc, char **argv, int *i,
               const char *name, const char **value);

#endif
