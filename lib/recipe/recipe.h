/* What the recipes share: their training data (data.c) and the loop that
 * fits a graph's trainable weights to it (fit.c). */
#ifndef ATMOE_RECIPE_H
#define ATMOE_RECIPE_H

#include <stddef.h>
#include <stdint.h>

#include "atmoe.h"
#include "io/manifest.h"

/* A training set on the host: x [n, d_in], and y [n, d_out] (regression)
 * or, when the manifest has a head (classes > 0), labels [n] (classes or
 * ignore_index); task [n] (NULL when not read). */
typedef struct atm_recipe_data {
    float *x, *y;
    int32_t *labels, *task;
    size_t n, d_in, d_out;
    size_t classes; /* 0: regression on y */
    int ignore_index;
    /* The held-out rows x_heldout, y_heldout or labels_heldout, and
     * task_heldout, when the file has them (hn 0 otherwise). */
    float *hx, *hy;
    int32_t *hlabels, *htask;
    size_t hn;
} atm_recipe_data;

/* Reads x, y (or, with the manifest's head, labels: I32, each a class or
 * the ignore index) and, with tasks >= 0, task (I32, each in [0,
 * tasks)), and the same of the held-out rows when x_heldout is there,
 * from the safetensors file at path, refusing widths other than the
 * checked manifest's, NaN or infinite values and labels out of range,
 * naming the row, and a file whose targets do not match the manifest (y
 * and labels both, labels without a head).  fn prefixes the messages. */
atmoe_status atm_recipe_read_data(atmoe_context *ctx, const char *fn,
                                  const char *path, const atmoe_manifest *mf,
                                  int tasks, atm_recipe_data *d);
void atm_recipe_data_free(atm_recipe_data *d);

atmoe_status atm_recipe_check_config(atmoe_context *ctx, const char *fn,
                                     const atmoe_train_config *config);

/* The loss the recipes train the stack's output out [batch, d_out] with
 * (loss.c): with the manifest's head, the cross-entropy of the head's
 * logits against labels (I32 [batch]; rows whose label is the head's
 * ignore index left out of the mean), else the mean squared error
 * against y [batch, d_out].  *target is the batched input the fit fills
 * with each batch's targets, *loss the scalar. */
atmoe_status atm_recipe_loss(atmoe_manifest *mf, atmoe_graph *g,
                             size_t batch, atmoe_node out,
                             atmoe_node *target, atmoe_node *loss);

/* A graph to fit: inputs x [batch, d_in] and the targets y (batched: y
 * [batch, d_out] or labels [batch], atm_recipe_loss), a scalar loss not
 * yet differentiated, the rows of the data it trains on (shuffled in
 * place), and how progress names it. */
typedef struct atm_recipe_fit {
    atmoe_graph *g;
    atmoe_node x, y, loss;
    size_t *rows;
    size_t n_rows;
    const size_t *held; /* rows of the held-out set it is measured on */
    size_t n_held;
    size_t model, models;
    const char *name;
    /* An i32 input [batch] filled per row from index (training rows) and
     * held_index (held-out rows), or ATMOE_NODE_NONE: each row's sample
     * for T-REX's intuition scores. */
    atmoe_node index;
    const int32_t *index_of, *held_index_of;
} atm_recipe_fit;

/* Builds the backward pass, plans, and trains for the configured steps;
 * then *final_loss (may be NULL) is the mean loss over all the rows (for
 * a classification, over the rows not ignored), and the progress callback
 * hears it with done, with the held-out loss.  The trained weights stay in
 * the graph (atmoe_graph_read_trainable). */
atmoe_status atm_recipe_fit_run(atmoe_context *ctx, const char *fn,
                                const atm_recipe_fit *f,
                                const atm_recipe_data *d,
                                const atmoe_train_config *config,
                                double *final_loss);

/* Where a recipe writes (output.c): output itself when it exists (its
 * files replaced one by one, each atomically), else a fresh directory
 * beside it renamed to output once everything is written and removed on
 * failure, so that a failed run leaves no partial output.  Write into
 * dir; end returns st, or the rename's failure. */
typedef struct atm_recipe_output {
    char *dir;
    const char *final;
    int fresh;
} atm_recipe_output;

atmoe_status atm_recipe_output_begin(atmoe_context *ctx, const char *fn,
                                     const char *output,
                                     atm_recipe_output *o);
atmoe_status atm_recipe_output_end(atmoe_context *ctx, const char *fn,
                                   atm_recipe_output *o, atmoe_status st);

/* "layers.<layer>.<module>.<what>" into buf: the names of trained weights
 * in the graph and in the files the recipes write. */
const char *atm_recipe_tensor_name(char *buf, size_t size,
                                   const atm_mmodule *m, const char *what);

/* Writes the manifest mf to path (atomically) with every path absolute,
 * the routers of AT-MoE modules in router.safetensors and the weights of
 * rank-1 modules in trex.safetensors beside it. */
atmoe_status atm_recipe_write_manifest(atmoe_context *ctx, const char *fn,
                                       const atmoe_manifest *mf,
                                       const char *path);

/* A trained result into the directory output, whole or not at all
 * (atm_recipe_output): the weights w as weights_file, then the manifest
 * mf beside them (atm_recipe_write_manifest), last, so that it never
 * names a file that is not there. */
atmoe_status atm_recipe_write_result(atmoe_context *ctx, const char *fn,
                                     const char *output,
                                     atmoe_safetensors_writer *w,
                                     const char *weights_file,
                                     const atmoe_manifest *mf);

#endif
