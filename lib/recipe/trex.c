/* T-REX (atmoe_train_trex): the rank-1 experts of a manifest's stack (A,
 * B, the router and the gates) trained jointly over the frozen base, each
 * row routed with its sample's intuition scores; out come the trained
 * weights and a manifest that atmoe run applies as it is. */
#include <config.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "base/alloc.h"
#include "base/error.h"
#include "io/manifest.h"
#include "recipe/recipe.h"

#define FN "atmoe_train_trex"

/* The samples of path: sample [N] (I32, each in [0, S)), with held_n
 * sample_heldout [held_n] too, and their intuition as *table [S, W]:
 * scores [S, K] when the file has them (they win, as in atmoe run), else
 * embeddings [S, D] (*embeddings set), which the graph scores against the
 * manifest's centroids as atmoe_manifest_build_with does. */
static atmoe_status read_samples(atmoe_context *ctx, const atmoe_manifest *mf,
                                 const char *path, size_t n, size_t held_n,
                                 int32_t **sample, int32_t **held,
                                 float **table, size_t *S, size_t *W,
                                 int *embeddings)
{
    atmoe_safetensors *f;
    atmoe_status st = atmoe_safetensors_open(ctx, path, &f);
    if (st != ATMOE_STATUS_OK)
        return st;
    atmoe_safetensors_tensor s, c, h;
    *embeddings = atmoe_safetensors_find(f, "scores", &c) != ATMOE_STATUS_OK;
    const char *what = *embeddings ? "embeddings" : "scores";
    if (atmoe_safetensors_find(f, "sample", &s) ||
        (*embeddings && atmoe_safetensors_find(f, what, &c))) {
        st = atm_fail(ctx, ATMOE_STATUS_NOT_FOUND,
                      FN ": %s: T-REX needs sample [N] (I32) and the "
                      "samples' intuition: scores [S, K] (atmoe cluster "
                      "--assign writes them) or embeddings [S, D] (scored "
                      "against the manifest's centroids)", path);
        goto out;
    }
    if (s.ndim != 1 || s.shape[0] != n || s.dtype != ATMOE_SAFETENSORS_I32 ||
        c.ndim != 2 || c.shape[0] == 0 || c.shape[1] == 0) {
        st = atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                      FN ": %s: sample must be I32 [%zu] and %s [S, %s]",
                      path, n, what, *embeddings ? "D" : "K");
        goto out;
    }
    if (*embeddings && mf->centroids.file == NULL) {
        st = atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                      FN ": %s: the data holds embeddings but the manifest "
                      "names no centroids to score them (its \"centroids\" "
                      "key, atmoe-manifest(5); atmoe cluster writes them), "
                      "nor does the data hold scores", path);
        goto out;
    }
    if (*embeddings && c.shape[1] != mf->embedding_dim) {
        st = atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                      FN ": %s: embeddings [%llu, %llu] must be [S, %zu], "
                      "as wide as the manifest's centroids [%zu, %zu]",
                      path, (unsigned long long)c.shape[0],
                      (unsigned long long)c.shape[1], mf->embedding_dim,
                      mf->clusters, mf->embedding_dim);
        goto out;
    }
    int has_held = held_n &&
                   atmoe_safetensors_find(f, "sample_heldout", &h) ==
                       ATMOE_STATUS_OK;
    if (held_n && (!has_held || h.ndim != 1 || h.shape[0] != held_n ||
                   h.dtype != ATMOE_SAFETENSORS_I32)) {
        st = atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                      FN ": %s: the held-out rows need sample_heldout I32 "
                      "[%zu]", path, held_n);
        goto out;
    }
    *S = (size_t)c.shape[0];
    *W = (size_t)c.shape[1];
    *sample = atm_malloc(n * sizeof **sample);
    *held = atm_malloc((held_n ? held_n : 1) * sizeof **held);
    *table = atm_malloc(*S * *W * sizeof **table);
    if (*sample == NULL || *held == NULL || *table == NULL) {
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      FN ": out of host memory");
        goto out;
    }
    if ((st = atmoe_safetensors_read_f32(f, what, *table, *S * *W)))
        goto out;
    memcpy(*sample, s.data, n * sizeof **sample);
    if (held_n)
        memcpy(*held, h.data, held_n * sizeof **held);
    for (size_t r = 0; r < n + held_n; r++) {
        int32_t v = r < n ? (*sample)[r] : (*held)[r - n];
        if (v < 0 || (size_t)v >= *S) {
            st = atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                          FN ": %s: %s of row %zu is %d, outside [0, %zu) "
                          "(the rows of %s)", path,
                          r < n ? "sample" : "sample_heldout",
                          r < n ? r : r - n, (int)v, *S, what);
            goto out;
        }
    }
    for (size_t r = 0; r < *S; r++) {
        double sq = 0;
        for (size_t i = 0; i < *W; i++) {
            float v = (*table)[r * *W + i];
            if (!isfinite(v)) {
                st = atm_fail(ctx, ATMOE_STATUS_NOT_FINITE,
                              FN ": %s: %s row %zu, column %zu is not "
                              "finite", path, what, r, i);
                goto out;
            }
            sq += (double)v * v;
        }
        /* The graph divides by max(norm, 1e-12) (atmoe_graph_l2norm): a
         * row below it would score as if not normalised. */
        if (*embeddings && !(sqrt(sq) > 1e-12)) {
            st = atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                          FN ": %s: embeddings row %zu has norm %g: it "
                          "cannot be L2-normalised", path, r, sqrt(sq));
            goto out;
        }
    }
out:
    atmoe_safetensors_free(f);
    return st;
}

/* The weights of rank-1 module m into the writer: trained ones of an
 * output module from the graph, the others' as the manifest has them
 * (zeros when absent). */
static atmoe_status add_rank1(atmoe_context *ctx, atmoe_graph *g,
                              const atm_mmodule *m,
                              atmoe_safetensors_writer *w)
{
    const char *what[5] = {"a", "b", "w_r", "w_om", "w_c"};
    const atm_mref *refs[5] = {&m->a, &m->b, &m->w_r, &m->w_om, &m->w_c};
    uint64_t shapes[5][2] = {{m->r1, m->d_in}, {m->d_out, m->r2},
                             {m->E, m->d_in}, {1, 0}, {1, 0}};
    atmoe_status st = ATMOE_STATUS_OK;
    for (int k = 0; k < 5 && st == ATMOE_STATUS_OK; k++) {
        if (k == 2 && m->routing == ATMOE_MOR1E_ROUTE_INTUITION)
            continue;
        size_t n = (size_t)(shapes[k][0] * (shapes[k][1] ? shapes[k][1] : 1));
        float *buf = atm_calloc(2 * n, sizeof *buf);
        char name[256];
        atm_recipe_tensor_name(name, sizeof name, m, what[k]);
        if (buf == NULL)
            return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                            FN ": out of host memory");
        if (m->is_output) {
            st = atmoe_graph_read_trainable(g, name, buf, n);
        } else if (refs[k]->file) {
            atmoe_safetensors *f;
            if ((st = atmoe_safetensors_open(ctx, refs[k]->file, &f)) ==
                ATMOE_STATUS_OK) {
                st = atmoe_safetensors_read_f32(
                    f, refs[k]->tensor, refs[k]->transposed ? buf + n : buf,
                    n);
                atmoe_safetensors_free(f);
            }
            if (st == ATMOE_STATUS_OK && refs[k]->transposed)
                for (size_t i = 0; i < shapes[k][0]; i++)
                    for (size_t j = 0; j < shapes[k][1]; j++)
                        buf[i * shapes[k][1] + j] =
                            buf[n + j * shapes[k][0] + i];
        }
        if (st == ATMOE_STATUS_OK)
            st = atmoe_safetensors_writer_add_f32(
                w, name, ATMOE_SAFETENSORS_F32, shapes[k][1] ? 2 : 1,
                shapes[k], buf);
        atm_free(buf);
    }
    return st;
}

/* A run that did not train (st, its message in ctx): when a gate of an
 * output module saturated, the message says so.  The gates enter as
 * sigmoid(100 w) (SPEC section 4), and an AdamW step moves w by about lr
 * whatever the gradient's size: at lr 0.1 a gate's logit moves by about
 * 10 a step, so that after a few steps the main gate c is 0 to float
 * precision, and with it the gradient of every weight behind it. */
static atmoe_status explain_gates(atmoe_context *ctx, atmoe_graph *g,
                                  const atmoe_manifest *mf,
                                  const atmoe_train_config *cfg,
                                  atmoe_status st)
{
    char msg[1024], gates[512] = "";
    snprintf(msg, sizeof msg, "%s", atmoe_errmsg(ctx));
    size_t len = 0;
    for (size_t i = 0; i < mf->count; i++) {
        const atm_mmodule *m = &mf->modules[i];
        if (!m->rank1 || !m->is_output)
            continue;
        const char *what[2] = {"w_c", "w_om"}, *gate[2] = {"c", "om"};
        for (int k = 0; k < 2; k++) {
            char name[256];
            float w;
            atm_recipe_tensor_name(name, sizeof name, m, what[k]);
            if (atmoe_graph_read_trainable(g, name, &w, 1) != ATMOE_STATUS_OK)
                continue;
            double v = 1 / (1 + exp(-100.0 * (double)w));
            if ((v < 1e-3 || v > 1 - 1e-3) && len < sizeof gates - 1)
                len += (size_t)snprintf(
                    gates + len, sizeof gates - len, "%s%s = %.3g (%s %.4g)",
                    len ? ", " : "", gate[k], v, name, (double)w);
        }
    }
    if (!gates[0])
        return st;
    return atm_fail(ctx, st,
                    "%s; the gates saturated: %s.  A gate is sigmoid(100 w) "
                    "and an AdamW step moves w by about lr (%g here), so "
                    "that c near 0 stops the gradients of everything behind "
                    "it: a lower lr or a warm-up keeps the gates alive (the "
                    "reference trains at 5e-5 with 100 warm-up steps)",
                    msg, gates, (double)cfg->optimizer.lr);
}

atmoe_status atmoe_train_trex(atmoe_context *ctx, atmoe_manifest *manifest,
                              const char *data_path,
                              const atmoe_train_config *config,
                              const char *output, double *final_loss)
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
    int rank1 = 0;
    for (size_t i = 0; i < manifest->count; i++)
        rank1 |= manifest->modules[i].rank1 && manifest->modules[i].is_output;
    if (!rank1)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        FN ": the manifest has no rank-1 output module to "
                        "train (\"rank1\" in atmoe-manifest(5))");
    atm_recipe_data d;
    if ((st = atm_recipe_read_data(ctx, FN, data_path, manifest, -1, &d)))
        return st;
    int32_t *sample = NULL, *hsample = NULL;
    float *scores = NULL;
    size_t S = 0, K = 0;
    atmoe_graph *g = NULL;
    atmoe_safetensors_writer *w = NULL;
    size_t *rows = atm_malloc(d.n * sizeof *rows);
    size_t *held = atm_malloc((d.hn ? d.hn : 1) * sizeof *held);
    if (rows == NULL || held == NULL) {
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      FN ": out of host memory");
        goto out;
    }
    int emb = 0;
    if ((st = read_samples(ctx, manifest, data_path, d.n, d.hn, &sample,
                           &hsample, &scores, &S, &K, &emb)))
        goto out;
    for (size_t r = 0; r < d.n; r++)
        rows[r] = r;
    for (size_t r = 0; r < d.hn; r++)
        held[r] = r;
    atmoe_node x, y, gi, sc, out, loss;
    size_t xs[2] = {config->batch, d.d_in};
    size_t is[1] = {config->batch}, ss[2] = {S, K};
    if ((st = atmoe_graph_new(ctx, &g)) ||
        (st = atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 1, &x)) ||
        (st = atmoe_graph_input(g, "gate_index", ATMOE_DTYPE_I32, 1, is, 1,
                                &gi)) ||
        (st = atmoe_graph_constant(g, emb ? "embeddings" : "scores",
                                   ATMOE_DTYPE_F32, 2, ss, scores, &sc)))
        goto out;
    /* Embeddings are scored in the graph, by the same nodes as in atmoe
     * run, so that training and inference see the same scores. */
    atmoe_manifest_inputs in = {ATMOE_NODE_NONE, gi,
                                emb ? sc : ATMOE_NODE_NONE,
                                emb ? ATMOE_NODE_NONE : sc};
    atm_manifest_set_train_rank1(manifest, 1);
    st = atmoe_manifest_build_with(manifest, g, x, &in, NULL, NULL, NULL,
                                   &out);
    atm_manifest_set_train_rank1(manifest, 0);
    if (st != ATMOE_STATUS_OK ||
        (st = atm_recipe_loss(manifest, g, config->batch, out, &y, &loss)))
        goto out;
    atm_recipe_fit fit = {.g = g, .x = x, .y = y, .loss = loss,
                          .rows = rows, .n_rows = d.n, .held = held,
                          .n_held = d.hn, .model = 0, .models = 1,
                          .name = "the rank-1 experts", .index = gi,
                          .index_of = sample, .held_index_of = hsample};
    if ((st = atm_recipe_fit_run(ctx, FN, &fit, &d, config, final_loss))) {
        if (st == ATMOE_STATUS_NO_PROGRESS || st == ATMOE_STATUS_NOT_FINITE)
            st = explain_gates(ctx, g, manifest, config, st);
        goto out;
    }

    /* Only now is anything written, the manifest last. */
    if ((st = atmoe_safetensors_writer_new(ctx, &w)))
        goto out;
    for (size_t i = 0; i < manifest->count; i++)
        if (manifest->modules[i].rank1 &&
            (st = add_rank1(ctx, g, &manifest->modules[i], w)))
            goto out;
    st = atm_recipe_write_result(ctx, FN, output, w, "trex.safetensors",
                                 manifest);
out:
    atmoe_safetensors_writer_free(w);
    atmoe_graph_free(g);
    atm_recipe_data_free(&d);
    atm_free(sample);
    atm_free(hsample);
    atm_free(scores);
    atm_free(rows);
    atm_free(held);
    return st;
}
