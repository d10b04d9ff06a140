/* atmoe: the command-line front end of the library.
 *
 *   atmoe devices                 list every OpenCL device the library sees
 *   atmoe selfcheck [--device D]  run the library's kernels and CLBlast on a
 *                                 device against a float64 host reference
 *   atmoe inspect PATH            describe a PEFT adapter, a safetensors
 *                                 file or a layer manifest, and its problems
 *   atmoe run MANIFEST --input X --output Y [--trace T] [--device D]
 *                                 apply a manifest's layers to X
 *   atmoe params [--device D]     print the tuned parameters a context on
 *                                 the device uses, and where they come from
 *   atmoe version
 *
 * This file holds the usage and the table of subcommands only: each
 * subcommand is a file of its own, tools/cmd_NAME.c, and what several of
 * them use is in tools/cli.c. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

/* The subcommands, in the order the usage lists them.  A new one is its
 * file, which defines cli_command cmd_NAME, and a row here. */
#define COMMANDS(ROW)                                                        \
    ROW(devices)                                                             \
    ROW(selfcheck)                                                           \
    ROW(inspect)                                                             \
    ROW(run)                                                                 \
    ROW(cluster)                                                             \
    ROW(train)                                                               \
    ROW(params)                                                              \
    ROW(version)

#define DECLARE(name) extern const cli_command cmd_##name;
COMMANDS(DECLARE)
#define ENTRY(name) &cmd_##name,
static const cli_command *const commands[] = {COMMANDS(ENTRY)};
#define N_COMMANDS (sizeof commands / sizeof commands[0])

static void usage(FILE *f)
{
    fprintf(f, "usage: atmoe COMMAND [ARGS]\n\ncommands:\n");
    for (size_t i = 0; i < N_COMMANDS; i++)
        fprintf(f, "  %-10s %s\n", commands[i]->name, commands[i]->help);
    fprintf(f, "\nD is a device selection: an index, gpu, cpu, or part of a "
               "name (see atmoe(1)).\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return EXIT_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return EXIT_OK;
    }
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (strcmp(argv[1], commands[i]->name) == 0)
            return commands[i]->run(argc - 1, argv + 1);
    fprintf(stderr, "atmoe: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return EXIT_USAGE;
}
