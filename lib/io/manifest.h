/* Layer manifests: the parsed JSON (manifest.c), and the files it names,
 * checked and added to a graph (manifest_build.c). */
#ifndef ATMOE_MANIFEST_H
#define ATMOE_MANIFEST_H

#include "base/error.h"

/* How a weight is held on the device, as a manifest asks ("dtype"): as
 * the manifest's default says, as the file stores it, or converted to an
 * atmoe_dtype (f32, f16, bf16). */
#define ATM_DTYPE_INHERIT (-2)
#define ATM_DTYPE_STORED (-1)

typedef struct atm_mref {
    char *file;   /* resolved; NULL when the entry is absent */
    char *tensor;
    int transposed;
    int dtype;    /* asked: ATM_DTYPE_INHERIT, ATM_DTYPE_STORED or a type */
    /* Set by the check: the file's type and the device's. */
    atmoe_safetensors_dtype stored;
    atmoe_dtype device;
} atm_mref;

typedef struct atm_mexpert {
    int group;    /* -1 for the general LoRA */
    int position;
    char *adapter;
    int layer;
    char *module;
    /* Set by the check. */
    size_t adapter_index; /* in the manifest's open adapters */
    size_t target;
} atm_mexpert;

typedef struct atm_mcontrol {
    int group, expert; /* expert -1: the whole group */
    float weight;      /* fixed weights only */
} atm_mcontrol;

typedef struct atm_mmodule {
    char *where; /* its JSON path, for messages */
    size_t layer;
    int model_layer;
    char *name;
    int is_output;
    atm_mref weight, bias, w_g, w_d;
    atm_mexpert *experts; /* groups in order, the general LoRA last */
    size_t count;         /* entries of experts, the general LoRA included */
    size_t groups, max_group;
    int has_general;
    float lambda, c;
    atmoe_router_form form;
    float tau_g, tau_d;
    int top_k_groups, top_k_experts;
    atm_mcontrol *masks, *fixed;
    size_t n_masks, n_fixed;
    size_t d_in, d_out; /* set by the check */
    int experts_dtype;  /* asked for A and B ("experts_dtype") */
    /* Set by the check: the adapters' A and B types (when they all agree;
     * else F32), and the expert set's storage. */
    atmoe_safetensors_dtype a_stored, b_stored;
    atmoe_dtype a_dtype, b_dtype;
    size_t total_rank; /* of the experts and the general LoRA */
    /* A rank-1 expert module ("rank1"; atmoe_graph_mor1e_layer) instead of
     * groups of LoRA experts. */
    int rank1;
    atmoe_mor1e_variant variant;
    atmoe_mor1e_routing routing;
    atm_mref a, b, w_r, w_om, w_c, score_map;
    float k_router, k_intuition;
    int top_k;
    size_t r1, r2, E; /* set by the check */
} atm_mmodule;

typedef struct atm_mfile {
    char *path;
    atmoe_safetensors *file;
} atm_mfile;

typedef struct atm_madapter {
    char *path;
    atmoe_adapter *adapter;
} atm_madapter;

struct atmoe_manifest {
    atmoe_context *ctx;
    atm_mmodule *modules;
    size_t count, layers;
    int checked;
    size_t d_in, d_out;
    atm_mfile *files;
    size_t n_files;
    atm_madapter *adapters;
    size_t n_adapters;
    int dtype;           /* the default of every weight ("dtype") */
    int allow_nonfinite; /* "allow_nonfinite": NaN and Inf pass */
    /* The clustering's centroids C [K, D] that score the samples of rank-1
     * modules; K and D set by the check. */
    atm_mref centroids;
    size_t clusters, embedding_dim;
    /* The linear head W [classes, d_out] and bias [classes] of a
     * classification ("head"; file NULL without), held as f32; classes
     * set by the check. */
    atm_mref head, head_bias;
    size_t classes;
    int ignore_index;
    int train_routers; /* atm_manifest_set_train_routers */
    int train_rank1;   /* atm_manifest_set_train_rank1 */
};

/* With on, atmoe_manifest_build adds the routers' w_g and w_d (v_d) of
 * output modules as trainable f32 parameters named
 * "layers.<layer>.<module>.w_g" and ".w_d" (".v_d"), for training the
 * routers (stage 2 of AT-MoE); else as constants. */
void atm_manifest_set_train_routers(atmoe_manifest *manifest, int on);

/* With on, atmoe_manifest_build adds a, b, w_r, w_om and w_c of rank-1
 * output modules as trainable f32 parameters named
 * "layers.<layer>.<module>.a" and so on (T-REX's training); else as
 * constants. */
void atm_manifest_set_train_rank1(atmoe_manifest *manifest, int on);

/* The device type of a weight the file stores as stored, asked as asked
 * (after inheriting); -1 for a type the device cannot hold (F64 kept as
 * stored). */
int atm_manifest_device_dtype(int asked, atmoe_safetensors_dtype stored);

#endif
