/* atmoe devices: every OpenCL device the library sees, the default one
 * marked. */
#include <stdio.h>

#include "cli.h"

static int devices(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "atmoe devices: unexpected argument '%s'\n", argv[1]);
        return EXIT_USAGE;
    }
    size_t n, def = (size_t)-1;
    atmoe_status st = atmoe_device_get_count(&n);
    if (st != ATMOE_STATUS_OK)
        return cli_fail("listing devices", st, NULL);
    if (n == 0) {
        printf("no OpenCL device found (install an OpenCL driver, for "
               "example pocl-opencl-icd)\n");
        return EXIT_FAILED;
    }
    if (atmoe_device_get_default(&def) != ATMOE_STATUS_OK)
        fprintf(stderr, "atmoe: %s\n", atmoe_errmsg(NULL));
    printf("%-3s %-1s %-40s %-7s %-11s %4s %9s %9s %4s %4s\n", "#", "",
           "device", "vendor", "type", "CUs", "mem MiB", "alloc MiB", "fp16",
           "fp64");
    for (size_t i = 0; i < n; i++) {
        atmoe_device_info d;
        if ((st = atmoe_device_get_info(i, &d)) != ATMOE_STATUS_OK)
            return cli_fail("describing a device", st, NULL);
        printf("%-3zu %-1s %-40.40s %-7s %-11s %4u %9llu %9llu %4s %4s\n", i,
               i == def ? "*" : "", d.name, atmoe_vendor_name(d.vendor),
               atmoe_device_type_name(d.type), d.compute_units,
               (unsigned long long)(d.global_mem_bytes >> 20),
               (unsigned long long)(d.max_alloc_bytes >> 20),
               d.fp16 ? "yes" : "no", d.fp64 ? "yes" : "no");
        printf("      %s, driver %s\n", d.platform_version, d.driver_version);
    }
    printf("* the default device (ATMOE_DEVICE overrides it)\n");
    return EXIT_OK;
}

const cli_command cmd_devices = {"devices", devices,
                                 "list the OpenCL devices"};
