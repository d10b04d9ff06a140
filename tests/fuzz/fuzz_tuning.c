/* libFuzzer target for the tuning database (atmoe-tune(1)'s file, read by
 * every context and by atmoe_tuning_check): the bytes are the file's
 * contents, written to a private file and checked.  A database that
 * passes must say how many entries it holds, and a save over it must keep
 * it valid; one that fails must say why.  Anything else (a crash, a leak,
 * a hang) is a bug.  No device is opened: the checks against a device's
 * limits run when a context applies a set. */
#include <config.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "atmoe.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[256];
    fuzz_write(fuzz_path(path, sizeof path, "tuning.json"), data, size);
    size_t entries = (size_t)-1;
    atmoe_status st = atmoe_tuning_check(path, &entries);
    if (st != ATMOE_STATUS_OK) {
        REQUIRE(st == ATMOE_STATUS_FORMAT_ERROR);
        REQUIRE(fuzz_message()[0] != '\0');
        return 0;
    }
    REQUIRE(entries != (size_t)-1);
    /* A valid database takes a save and stays valid, one entry more at
     * most. */
    atmoe_device_info dev;
    memset(&dev, 0, sizeof dev);
    snprintf(dev.name, sizeof dev.name, "fuzz device");
    snprintf(dev.driver_version, sizeof dev.driver_version, "1.0");
    dev.vendor = ATMOE_VENDOR_POCL;
    dev.type = ATMOE_DEVICE_TYPE_CPU;
    st = atmoe_tuning_save(path, &dev,
                           "{\"kernels\": {\"linear\": {\"SR\": 1}}}");
    REQUIRE(st == ATMOE_STATUS_OK);
    size_t after = 0;
    REQUIRE(atmoe_tuning_check(path, &after) == ATMOE_STATUS_OK);
    REQUIRE(after == entries || after == entries + 1);
    return 0;
}
