/* libFuzzer target for the layer manifest parser: the bytes are a
 * manifest's text, parsed by atmoe_manifest_parse as atmoe_manifest_open
 * parses a file.  A manifest that parses must describe itself
 * consistently: modules layer by layer with exactly one output each,
 * every number in the range atmoe-manifest(5) gives, every expert in a
 * group that exists at the position its order gives, every path and name
 * a string.  Anything else is a crash to report.  Parsing opens no file:
 * the files a manifest names are only opened by atmoe_manifest_check. */
#include <config.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "atmoe.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REQUIRE(cond)                                                         \
    do {                                                                      \
        if (!(cond))                                                          \
            __builtin_trap();                                                 \
    } while (0)

static void check_tensor(const atmoe_manifest_tensor *t)
{
    REQUIRE((t->file == NULL) == (t->tensor == NULL));
    if (t->file)
        REQUIRE(t->file[0] != '\0' && t->tensor[0] != '\0');
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    atmoe_manifest *m = NULL;
    if (atmoe_manifest_parse(NULL, (const char *)data, size, "dir", &m) !=
        ATMOE_STATUS_OK) {
        REQUIRE(m == NULL);
        return 0;
    }
    atmoe_manifest_info info;
    REQUIRE(atmoe_manifest_get_info(m, &info) == ATMOE_STATUS_OK);
    REQUIRE(info.layers >= 1 && info.modules >= info.layers);
    REQUIRE(!info.checked && info.d_in == 0 && info.d_out == 0);
    size_t layer = 0, outputs = 0;
    for (size_t i = 0; i < info.modules; i++) {
        atmoe_manifest_module mod;
        REQUIRE(atmoe_manifest_get_module(m, i, &mod) == ATMOE_STATUS_OK);
        if (mod.layer != layer) {
            REQUIRE(mod.layer == layer + 1 && outputs == 1);
            layer = mod.layer;
            outputs = 0;
        }
        outputs += mod.is_output != 0;
        REQUIRE(mod.name && mod.name[0] != '\0' && mod.model_layer >= 0);
        REQUIRE(mod.weight.file != NULL);
        check_tensor(&mod.weight);
        check_tensor(&mod.bias);
        check_tensor(&mod.w_g);
        check_tensor(&mod.w_d);
        REQUIRE(mod.groups >= 1 && mod.experts >= mod.groups);
        REQUIRE(mod.lambda >= 0.0f && mod.lambda <= 1.0f);
        REQUIRE(isfinite(mod.c) && mod.tau_g > 0.0f && mod.tau_d > 0.0f &&
                isfinite(mod.tau_g) && isfinite(mod.tau_d));
        REQUIRE(mod.form == ATMOE_ROUTER_PROJECTED ||
                mod.form == ATMOE_ROUTER_SCALED);
        REQUIRE(mod.top_k_groups >= 0 &&
                (size_t)mod.top_k_groups <= mod.groups);
        REQUIRE(mod.top_k_experts >= 0 &&
                (size_t)mod.top_k_experts <= mod.experts);
        REQUIRE(mod.d_in == 0 && mod.d_out == 0);
        int group = 0, position = -1;
        size_t count = mod.experts + (size_t)mod.has_general;
        for (size_t e = 0; e < count; e++) {
            atmoe_manifest_expert x;
            REQUIRE(atmoe_manifest_get_expert(m, i, e, &x) ==
                    ATMOE_STATUS_OK);
            REQUIRE(x.adapter && x.adapter[0] && x.module && x.module[0]);
            REQUIRE(x.target == NULL && x.rank == 0 && x.layer >= -1);
            if (e == mod.experts) {
                REQUIRE(x.group == -1);
                continue;
            }
            if (x.group != group) {
                REQUIRE(x.group == group + 1 && x.position == 0);
                group = x.group;
            } else {
                REQUIRE(x.position == position + 1);
            }
            position = x.position;
        }
        REQUIRE((size_t)group + 1 == mod.groups);
        atmoe_manifest_expert x;
        REQUIRE(atmoe_manifest_get_expert(m, i, count, &x) ==
                ATMOE_STATUS_OUT_OF_RANGE);
    }
    REQUIRE(layer + 1 == info.layers && outputs == 1);
    atmoe_manifest_module mod;
    REQUIRE(atmoe_manifest_get_module(m, info.modules, &mod) ==
            ATMOE_STATUS_OUT_OF_RANGE);
    atmoe_manifest_free(m);
    return 0;
}
