/* The loss every recipe trains with (atm_recipe_loss): regression or,
 * through the manifest's linear head, classification. */
#include <config.h>

#include "base/error.h"
#include "recipe/recipe.h"

atmoe_status atm_recipe_loss(atmoe_manifest *mf, atmoe_graph *g,
                             size_t batch, atmoe_node out,
                             atmoe_node *target, atmoe_node *loss)
{
    atmoe_status st;
    if (mf->head.file == NULL) {
        size_t ys[2] = {batch, mf->d_out};
        if ((st = atmoe_graph_input(g, "y", ATMOE_DTYPE_F32, 2, ys, 1,
                                    target)))
            return st;
        return atmoe_graph_loss_mse(g, out, *target, loss);
    }
    size_t ls[1] = {batch};
    atmoe_node logits;
    if ((st = atmoe_graph_input(g, "labels", ATMOE_DTYPE_I32, 1, ls, 1,
                                target)) ||
        (st = atmoe_manifest_build_head(mf, g, out, &logits)))
        return st;
    return atmoe_graph_loss_cross_entropy(g, logits, *target,
                                          mf->ignore_index, loss);
}
