/* The manifests the recipes write: the stack they were given, every path
 * made absolute, with the trained weights in the output directory's
 * router.safetensors (AT-MoE routers) and trex.safetensors (rank-1
 * modules). */
#include <config.h>

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "base/alloc.h"
#include "base/error.h"
#include "base/file.h"
#include "io/manifest.h"
#include "recipe/recipe.h"

/* The absolute form of a path the manifest resolved, so that the new
 * manifest, in another directory, names the same files. */
static json_t *abs_path(const char *path)
{
    char buf[PATH_MAX];
    return json_string(realpath(path, buf) ? buf : path);
}

const char *atm_recipe_tensor_name(char *buf, size_t size,
                                 const atm_mmodule *m, const char *what)
{
    snprintf(buf, size, "layers.%zu.%s.%s", m->layer, m->name, what);
    return buf;
}

static json_t *expert_json(const atm_mexpert *e)
{
    json_t *o = json_object();
    json_object_set_new(o, "adapter", abs_path(e->adapter));
    json_object_set_new(o, "layer", json_integer(e->layer));
    json_object_set_new(o, "module", json_string(e->module));
    return o;
}

static json_t *ref_json(const atm_mref *r)
{
    json_t *o = json_object();
    json_object_set_new(o, "file", abs_path(r->file));
    json_object_set_new(o, "tensor", json_string(r->tensor));
    if (r->transposed)
        json_object_set_new(o, "transposed", json_true());
    return o;
}

static json_t *trex_ref(const atm_mmodule *m, const char *what)
{
    char buf[256];
    json_t *o = json_object();
    json_object_set_new(o, "file", json_string("trex.safetensors"));
    json_object_set_new(o, "tensor", json_string(atm_recipe_tensor_name(
                                         buf, sizeof buf, m, what)));
    return o;
}

/* A rank-1 module: its weights in trex.safetensors, the score map where
 * the manifest had it. */
static json_t *rank1_json(const atm_mmodule *m)
{
    json_t *o = json_object(), *r = json_object();
    json_object_set_new(o, "weight", ref_json(&m->weight));
    if (m->bias.file)
        json_object_set_new(o, "bias", ref_json(&m->bias));
    static const char *const routing[] = {"both", "router", "intuition"};
    json_object_set_new(r, "variant", json_string(m->variant == ATMOE_MOR1E_V2
                                                      ? "v2"
                                                      : "v1"));
    json_object_set_new(r, "routing", json_string(routing[m->routing]));
    json_object_set_new(r, "a", trex_ref(m, "a"));
    json_object_set_new(r, "b", trex_ref(m, "b"));
    if (m->routing != ATMOE_MOR1E_ROUTE_INTUITION)
        json_object_set_new(r, "w_r", trex_ref(m, "w_r"));
    json_object_set_new(r, "w_om", trex_ref(m, "w_om"));
    json_object_set_new(r, "w_c", trex_ref(m, "w_c"));
    if (m->score_map.file)
        json_object_set_new(r, "score_map", ref_json(&m->score_map));
    json_object_set_new(r, "k_router", json_real(m->k_router));
    json_object_set_new(r, "k_intuition", json_real(m->k_intuition));
    json_object_set_new(r, "top_k", json_integer(m->top_k));
    json_object_set_new(o, "rank1", r);
    return o;
}

static json_t *module_json(const atm_mmodule *m)
{
    char buf[256];
    if (m->rank1)
        return rank1_json(m);
    json_t *o = json_object(), *groups = json_array();
    json_object_set_new(o, "weight", ref_json(&m->weight));
    if (m->bias.file)
        json_object_set_new(o, "bias", ref_json(&m->bias));
    for (size_t g = 0; g < m->groups; g++) {
        json_t *grp = json_array();
        for (size_t i = 0; i < m->count; i++)
            if (m->experts[i].group == (int)g)
                json_array_append_new(grp, expert_json(&m->experts[i]));
        json_array_append_new(groups, grp);
    }
    json_object_set_new(o, "groups", groups);
    for (size_t i = 0; i < m->count; i++)
        if (m->experts[i].group < 0) {
            json_t *gen = expert_json(&m->experts[i]);
            json_object_set_new(gen, "lambda", json_real(m->lambda));
            json_object_set_new(o, "general", gen);
        }
    json_object_set_new(o, "c", json_real(m->c));
    json_t *r = json_object();
    int scaled = m->form == ATMOE_ROUTER_SCALED;
    json_object_set_new(r, "form", json_string(scaled ? "scaled"
                                                      : "projected"));
    json_object_set_new(r, "tau_g", json_real(m->tau_g));
    json_object_set_new(r, "tau_d", json_real(m->tau_d));
    json_object_set_new(r, "top_k_groups", json_integer(m->top_k_groups));
    json_object_set_new(r, "top_k_experts", json_integer(m->top_k_experts));
    json_t *wg = json_object(), *wd = json_object();
    json_object_set_new(wg, "file", json_string("router.safetensors"));
    json_object_set_new(wg, "tensor",
                        json_string(atm_recipe_tensor_name(buf, sizeof buf, m, "w_g")));
    json_object_set_new(wd, "file", json_string("router.safetensors"));
    json_object_set_new(wd, "tensor",
                        json_string(atm_recipe_tensor_name(buf, sizeof buf, m,
                                                  scaled ? "v_d" : "w_d")));
    json_object_set_new(r, "w_g", wg);
    json_object_set_new(r, scaled ? "v_d" : "w_d", wd);
    if (m->n_masks) {
        json_t *a = json_array();
        for (size_t i = 0; i < m->n_masks; i++)
            json_array_append_new(a, json_pack("{s:i,s:i}", "group",
                                               m->masks[i].group, "expert",
                                               m->masks[i].expert));
        json_object_set_new(r, "masks", a);
    }
    if (m->n_fixed) {
        json_t *a = json_array();
        for (size_t i = 0; i < m->n_fixed; i++)
            json_array_append_new(
                a, json_pack("{s:i,s:i,s:f}", "group", m->fixed[i].group,
                             "expert", m->fixed[i].expert, "weight",
                             (double)m->fixed[i].weight));
        json_object_set_new(r, "fixed", a);
    }
    json_object_set_new(o, "router", r);
    return o;
}

static json_t *manifest_json(const atmoe_manifest *mf)
{
    json_t *root = json_object(), *layers = json_array();
    json_object_set_new(root, "version", json_integer(1));
    json_object_set_new(root, "description",
                        json_string("routers trained by atmoe_train_stage2"));
    for (size_t l = 0; l < mf->layers; l++) {
        json_t *layer = json_object(), *mods = json_object();
        for (size_t i = 0; i < mf->count; i++) {
            const atm_mmodule *m = &mf->modules[i];
            if (m->layer != l)
                continue;
            json_object_set_new(layer, "index", json_integer(m->model_layer));
            json_object_set_new(mods, m->name, module_json(m));
            if (m->is_output)
                json_object_set_new(layer, "output", json_string(m->name));
        }
        json_object_set_new(layer, "modules", mods);
        json_array_append_new(layers, layer);
    }
    json_object_set_new(root, "layers", layers);
    if (mf->centroids.file)
        json_object_set_new(root, "centroids", ref_json(&mf->centroids));
    if (mf->head.file) {
        json_t *h = ref_json(&mf->head);
        if (mf->head_bias.file)
            json_object_set_new(h, "bias", ref_json(&mf->head_bias));
        json_object_set_new(h, "ignore_index", json_integer(mf->ignore_index));
        json_object_set_new(root, "head", h);
    }
    return root;
}

atmoe_status atm_recipe_write_manifest(atmoe_context *ctx, const char *fn,
                                       const atmoe_manifest *mf,
                                       const char *path)
{
    size_t tmp_size = strlen(path) + ATM_FILE_TMP_EXTRA;
    char *tmp = atm_malloc(tmp_size);
    json_t *root = manifest_json(mf);
    atmoe_status st = ATMOE_STATUS_OK;
    FILE *f = NULL;
    if (tmp == NULL || root == NULL)
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      "%s: out of host memory", fn);
    else if ((f = atm_file_begin(path, tmp, tmp_size)) == NULL)
        st = atm_fail(ctx, ATMOE_STATUS_IO_ERROR, "%s: cannot write %s: %s",
                      fn, path, strerror(errno));
    if (f) {
        int ok = json_dumpf(root, f, JSON_INDENT(2) | JSON_SORT_KEYS |
                                         JSON_REAL_PRECISION(9)) == 0 &&
                 fputc('\n', f) != EOF;
        if (atm_file_commit(f, tmp, path, ok) != 0 || !ok)
            st = atm_fail(ctx, ATMOE_STATUS_IO_ERROR,
                          "%s: cannot write %s: %s", fn, path,
                          strerror(errno ? errno : EIO));
    }
    json_decref(root);
    atm_free(tmp);
    return st;
}

