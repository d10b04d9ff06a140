/* libFuzzer target for PEFT adapter directories, the config and the
 * weights together: the first two bytes (little-endian) give the length
 * of adapter_config.json, which follows; the rest is
 * adapter_model.safetensors.  Both are written to a private directory
 * and opened as atmoe_adapter_open opens a user's download.  An adapter
 * that opens must describe every target consistently and read each one's
 * A and B whole; one that fails must say why.  Anything else is a bug. */
#include <config.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "atmoe.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Weights larger than this are read only in part: the fuzzer's files are
 * small, but a header may claim a large tensor over a short file. */
#define MAX_READ ((size_t)1 << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t n = (size_t)data[0] | (size_t)data[1] << 8;
    if (n > size - 2)
        n = size - 2;
    char dir[256], path[300];
    fuzz_path(dir, sizeof dir, "adapter");
    fuzz_mkdir(dir);
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    fuzz_write(path, data + 2, n);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    fuzz_write(path, data + 2 + n, size - 2 - n);

    atmoe_adapter *ad = NULL;
    atmoe_status st = atmoe_adapter_open(NULL, dir, &ad);
    if (st != ATMOE_STATUS_OK) {
        REQUIRE(ad == NULL);
        REQUIRE(fuzz_message()[0] != '\0');
        REQUIRE(st == ATMOE_STATUS_FORMAT_ERROR ||
                st == ATMOE_STATUS_NOT_SUPPORTED ||
                st == ATMOE_STATUS_NOT_FOUND || st == ATMOE_STATUS_IO_ERROR ||
                st == ATMOE_STATUS_OUT_OF_RANGE ||
                st == ATMOE_STATUS_HOST_OUT_OF_MEMORY);
        return 0;
    }
    atmoe_adapter_info info;
    REQUIRE(atmoe_adapter_get_info(ad, &info) == ATMOE_STATUS_OK);
    REQUIRE(info.targets >= 1 && info.base_model && info.dir);
    for (size_t i = 0; i < info.targets; i++) {
        atmoe_adapter_target t;
        REQUIRE(atmoe_adapter_get_target(ad, i, &t) == ATMOE_STATUS_OK);
        REQUIRE(t.module && t.module[0] && t.name && t.name[0]);
        REQUIRE(t.rank >= 1 && t.d_in >= 1 && t.d_out >= 1 && t.layer >= -1);
        REQUIRE(!isnan(t.scale));
        size_t found;
        st = atmoe_adapter_find(ad, t.layer, t.module, &found);
        REQUIRE(st == ATMOE_STATUS_OK || st == ATMOE_STATUS_INVALID_ARGUMENT);
        REQUIRE(st != ATMOE_STATUS_OK || found == i);
        if (t.rank * t.d_in > MAX_READ || t.rank * t.d_out > MAX_READ)
            continue;
        float *a = malloc(t.rank * t.d_in * sizeof *a);
        float *b = malloc(t.rank * t.d_out * sizeof *b);
        REQUIRE(a && b);
        REQUIRE(atmoe_adapter_read(ad, i, a, t.rank * t.d_in, b,
                                   t.rank * t.d_out) == ATMOE_STATUS_OK);
        free(a);
        free(b);
    }
    atmoe_adapter_target t;
    REQUIRE(atmoe_adapter_get_target(ad, info.targets, &t) ==
            ATMOE_STATUS_OUT_OF_RANGE);
    atmoe_adapter_free(ad);
    return 0;
}
