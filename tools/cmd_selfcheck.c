/* atmoe selfcheck: the library's kernels and CLBlast on a device against
 * a float64 host reference (atmoe_context_selfcheck). */
#include <stdio.h>

#include "cli.h"

static int selfcheck(int argc, char **argv)
{
    const char *device = NULL;
    for (int i = 1; i < argc; i++) {
        int r = cli_option("selfcheck", argc, argv, &i, "--device", &device);
        if (r < 0)
            return EXIT_USAGE;
        if (r == 0) {
            fprintf(stderr, "atmoe selfcheck: unexpected argument '%s'\n",
                    argv[i]);
            return EXIT_USAGE;
        }
    }
    atmoe_context *ctx;
    if (cli_open_device(device, &ctx) != EXIT_OK)
        return EXIT_FAILED;
    atmoe_device_info d;
    atmoe_context_get_device(ctx, &d);
    double err = 0;
    atmoe_status st = atmoe_context_selfcheck(ctx, &err);
    int rc = EXIT_OK;
    if (st != ATMOE_STATUS_OK)
        rc = cli_fail("selfcheck", st, ctx);
    else
        printf("selfcheck passed on %s (%s): tensor copies and CLBlast SGEMM "
               "agree with float64, max relative error %.2e\n",
               d.name, atmoe_vendor_name(d.vendor), err);
    atmoe_context_free(ctx);
    return rc;
}

const cli_command cmd_selfcheck = {
    "selfcheck", selfcheck,
    "[--device D]  check a device's numbers against float64"};
