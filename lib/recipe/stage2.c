/* AT-MoE's second stage (atmoe_train_stage2): the experts and the base
 * frozen, the routers of the stack's output modules trained on the mixed
 * rows; out come a router safetensors file and a manifest that atmoe run
 * applies as it is. */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "base/alloc.h"
#include "base/error.h"
#include "io/manifest.h"
#include "recipe/recipe.h"

#define FN "atmoe_train_stage2"

/* The router weights of module m into the writer: the trained ones of an
 * output module from the graph, those of the others as the manifest has
 * them (zeros when absent). */
static atmoe_status add_router(atmoe_context *ctx, atmoe_graph *g,
                               const atm_mmodule *m,
                               atmoe_safetensors_writer *w, float *buf)
{
    int scaled = m->form == ATMOE_ROUTER_SCALED;
    size_t G = m->groups, M = m->max_group;
    const atm_mref *refs[2] = {&m->w_g, &m->w_d};
    const char *what[2] = {"w_g", scaled ? "v_d" : "w_d"};
    uint64_t shapes[2][2] = {{m->d_in, G},
                             {scaled ? G : m->d_in, scaled ? M : G * M}};
    for (int k = 0; k < 2; k++) {
        char name[256];
        size_t n = (size_t)(shapes[k][0] * shapes[k][1]);
        atm_recipe_tensor_name(name, sizeof name, m, what[k]);
        atmoe_status st = ATMOE_STATUS_OK;
        if (m->is_output) {
            st = atmoe_graph_read_trainable(g, name, buf, n);
        } else if (refs[k]->file) {
            atmoe_safetensors *f;
            float *t = buf + n;
            if ((st = atmoe_safetensors_open(ctx, refs[k]->file, &f)))
                return st;
            st = atmoe_safetensors_read_f32(f, refs[k]->tensor,
                                            refs[k]->transposed ? t : buf, n);
            atmoe_safetensors_free(f);
            if (st == ATMOE_STATUS_OK && refs[k]->transposed)
                for (size_t i = 0; i < shapes[k][0]; i++)
                    for (size_t j = 0; j < shapes[k][1]; j++)
                        buf[i * shapes[k][1] + j] = t[j * shapes[k][0] + i];
        } else {
            memset(buf, 0, n * sizeof *buf);
        }
        if (st == ATMOE_STATUS_OK)
            st = atmoe_safetensors_writer_add_f32(
                w, name, ATMOE_SAFETENSORS_F32, 2, shapes[k], buf);
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    return ATMOE_STATUS_OK;
}

atmoe_status atmoe_train_stage2(atmoe_context *ctx, atmoe_manifest *manifest,
                                const char *data_path,
                                const atmoe_train_config *config,
                                const char *output,
                                double *final_loss)
{
    if (ctx == NULL || manifest == NULL || data_path == NULL ||
        config == NULL || output == NULL)
        return atm_fail(ctx, ATMOE_STATUS_NULL_POINTER, FN ": %s is NULL",
                        ctx == NULL         ? "ctx"
                        : manifest == NULL  ? "manifest"
                        : data_path == NULL ? "data"
                        : config == NULL    ? "config"
                                            : "output");
    atmoe_status st = atm_recipe_check_config(ctx, FN, config);
    if (st != ATMOE_STATUS_OK || (st = atmoe_manifest_check(manifest)))
        return st;
    size_t largest = 0;
    for (size_t i = 0; i < manifest->count; i++) {
        const atm_mmodule *m = &manifest->modules[i];
        if (m->rank1)
            return atm_fail(ctx, ATMOE_STATUS_NOT_SUPPORTED,
                            FN ": module %s of layer %zu holds rank-1 "
                            "experts, which have no AT-MoE router (T-REX "
                            "trains them)", m->name, m->layer);
        size_t n = m->d_in * m->groups * m->max_group;
        largest = n > largest ? n : largest;
    }
    atm_recipe_data d;
    if ((st = atm_recipe_read_data(ctx, FN, data_path, manifest, -1, &d)))
        return st;
    atmoe_graph *g = NULL;
    atmoe_safetensors_writer *w = NULL;
    size_t *rows = atm_malloc(d.n * sizeof *rows);
    size_t *held = atm_malloc((d.hn ? d.hn : 1) * sizeof *held);
    float *buf = atm_malloc(2 * (largest ? largest : 1) * sizeof *buf);
    if (rows == NULL || held == NULL || buf == NULL) {
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      FN ": out of host memory");
        goto out;
    }
    for (size_t r = 0; r < d.n; r++)
        rows[r] = r;
    for (size_t r = 0; r < d.hn; r++)
        held[r] = r;
    atmoe_node x, y, out, loss;
    size_t xs[2] = {config->batch, d.d_in};
    if ((st = atmoe_graph_new(ctx, &g)) ||
        (st = atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 1, &x)))
        goto out;
    atm_manifest_set_train_routers(manifest, 1);
    st = atmoe_manifest_build(manifest, g, x, ATMOE_NODE_NONE,
                              ATMOE_NODE_NONE, NULL, NULL, &out);
    atm_manifest_set_train_routers(manifest, 0);
    if (st != ATMOE_STATUS_OK ||
        (st = atm_recipe_loss(manifest, g, config->batch, out, &y, &loss)))
        goto out;
    atm_recipe_fit fit = {.g = g, .x = x, .y = y, .loss = loss,
                          .rows = rows, .n_rows = d.n, .held = held,
                          .n_held = d.hn, .model = 0, .models = 1,
                          .name = "the routers",
                          .index = ATMOE_NODE_NONE};
    if ((st = atm_recipe_fit_run(ctx, FN, &fit, &d, config, final_loss)))
        goto out;

    /* Everything trained: only now is anything written, the manifest
     * last, so that it never names a router file that is not there. */
    if ((st = atmoe_safetensors_writer_new(ctx, &w)))
        goto out;
    for (size_t i = 0; i < manifest->count; i++)
        if ((st = add_router(ctx, g, &manifest->modules[i], w, buf)))
            goto out;
    st = atm_recipe_write_result(ctx, FN, output, w, "router.safetensors",
                                 manifest);
out:
    atmoe_safetensors_writer_free(w);
    atmoe_graph_free(g);
    atm_recipe_data_free(&d);
    atm_free(rows);
    atm_free(held);
    atm_free(buf);
    return st;
}
