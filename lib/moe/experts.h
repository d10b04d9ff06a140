/* Expert sets and routers: the host side of AT-MoE's experts (experts.c)
 * and grouped router (router.c). */
#ifndef ATMOE_EXPERTS_H
#define ATMOE_EXPERTS_H

#include "tensor/tensor.h"
#include "moe/linear.h" /* atm_weight_type */

typedef struct atm_expert {
    int group;     /* -1 for the general LoRA */
    int slot;      /* position within its group */
    size_t rank;
    size_t offset; /* first row in the stacked A (and B^T) */
    float scale;   /* alpha / rank or alpha / sqrt(rank) */
    float alpha;   /* as given, for reading the expert back */
    unsigned flags;
    unsigned train; /* ATMOE_TRAIN_A | ATMOE_TRAIN_B; 0: frozen */
} atm_expert;

struct atmoe_experts {
    atmoe_context *ctx;
    int refs;
    size_t d_in, d_out;
    atm_expert *experts; /* the general LoRA, when set, is the last */
    size_t count, capacity;
    int has_general;
    float lambda;
    size_t groups, max_group, total_rank;
    float *a_host;  /* [total_rank, d_in] until sealed */
    float *bt_host; /* [total_rank, d_out]: B transposed, so that the
                       expand reads rank rows of length d_out */
    size_t dense_r2; /* a dense (T-REX) set: the up vectors' count */
    /* Storage types of A_all (a) and B_all (b), atmoe_experts_set_dtype:
     * the fused kernels read them as stored.  bt, which only CLBlast's
     * GEMMs read, stays f32 and holds the rounded values, so that every
     * route computes with the same weights. */
    atmoe_dtype a_dtype, b_dtype;
    int sealed;
    atmoe_tensor *a;   /* device copies, made when sealed */
    atmoe_tensor *bt;
    atmoe_tensor *b;   /* B_all [d_out, up] as well: cl/linear.cl reads a
                          row of it with each row of W0 */
    atmoe_tensor *chan_expert; /* i32 [R]: expert of each rank channel */
    atmoe_tensor *chan_scale;  /* f32 [R]: its scale, with lambda or
                                  1 - lambda folded in */
};


/* Whether some expert of the set has a trainable B: the optimiser then
 * updates the transposed copy bt only, so the forward must not read b
 * (cl/linear.cl's copy), which goes stale. */
int atm_experts_trains_b(const atmoe_experts *set);
/* Whether some weight of the set (A or B of any expert) is trainable. */
int atm_experts_trains(const atmoe_experts *set);

/* Uploads the set and forbids further additions. */
atmoe_status atm_experts_seal(atmoe_experts *set);
void atm_experts_retain(atmoe_experts *set);

struct atmoe_router {
    atmoe_context *ctx;
    int refs;
    atmoe_experts *set;
    atmoe_router_form form;
    float tau_g, tau_d;
    int top_k_groups, top_k_experts;
    int *group_mask, *expert_mask;      /* [G], [G*M_max] */
    float *group_fixed, *expert_fixed;  /* NaN: free */
    int *slot_of_expert;                /* [E]: g*M_max + m */
    int *counts;                        /* [G] */
    int dirty;                          /* host control changed */
    /* Device copies of the arrays above, in the order the router kernel
     * takes them: counts, group_mask, expert_mask, group_fixed,
     * expert_fixed, slot_of_expert. */
    atmoe_tensor *dev[6];
    char options[128];     /* program build options */
};

void atm_router_retain(atmoe_router *router);
/* Copies masks and fixed weights to the device if they changed. */
atmoe_status atm_router_upload(atmoe_router *router);

#endif
