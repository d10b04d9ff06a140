/* libFuzzer target for the safetensors parser: the bytes are a whole file,
 * parsed by the code atmoe_safetensors_open runs on its memory map.  A file
 * that parses must hold together: its tensors tile the data exactly, each
 * one's bytes lie inside the input, every name finds its own tensor, and
 * every float tensor converts.  Anything else is a crash to report. */
#include <config.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REQUIRE(cond)                                                         \
    do {                                                                      \
        if (!(cond))                                                          \
            __builtin_trap();                                                 \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    atmoe_safetensors *f = NULL;
    if (atm_safetensors_parse(NULL, "input", data, size, &f) !=
        ATMOE_STATUS_OK) {
        REQUIRE(f == NULL);
        return 0;
    }
    size_t n = 0;
    REQUIRE(atmoe_safetensors_get_count(f, &n) == ATMOE_STATUS_OK);
    uint64_t header = 0;
    for (int i = 7; i >= 0; i--)
        header = header << 8 | data[i];
    const uint8_t *next = data + 8 + header;
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < n; i++) {
        atmoe_safetensors_tensor t, u;
        REQUIRE(atmoe_safetensors_get(f, i, &t) == ATMOE_STATUS_OK);
        REQUIRE(t.data == next);
        REQUIRE(t.nbytes <= (uint64_t)(data + size - next));
        next += t.nbytes;
        if (t.nbytes > 0)
            sink ^= ((const uint8_t *)t.data)[0] ^
                    ((const uint8_t *)t.data)[t.nbytes - 1];
        REQUIRE(atmoe_safetensors_find(f, t.name, &u) == ATMOE_STATUS_OK);
        REQUIRE(u.data == t.data && u.nbytes == t.nbytes &&
                u.dtype == t.dtype);
        if (t.dtype == ATMOE_SAFETENSORS_F32 || t.dtype == ATMOE_SAFETENSORS_F16 ||
            t.dtype == ATMOE_SAFETENSORS_BF16 || t.dtype == ATMOE_SAFETENSORS_F64) {
            float *x = malloc(t.count ? t.count * sizeof *x : 1);
            REQUIRE(x != NULL);
            REQUIRE(atmoe_safetensors_read_f32(f, t.name, x, t.count) ==
                    ATMOE_STATUS_OK);
            free(x);
        }
    }
    REQUIRE(next == data + size);
    atmoe_safetensors_tensor t;
    REQUIRE(atmoe_safetensors_get(f, n, &t) == ATMOE_STATUS_OUT_OF_RANGE);
    const char *value;
    atmoe_status st = atmoe_safetensors_get_metadata(f, "format", &value);
    REQUIRE(st == ATMOE_STATUS_OK || st == ATMOE_STATUS_NOT_FOUND);
    if (st == ATMOE_STATUS_OK)
        sink ^= (uint8_t)strlen(value);
    atmoe_safetensors_free(f);
    return 0;
}
