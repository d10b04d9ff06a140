/* The float64 host reference of expert sets and the AT-MoE grouped router,
 * and the helpers tests/test_moe.c and tests/test_moe_layer.c share. */
#ifndef ATMOE_MOE_REFERENCE_H
#define ATMOE_MOE_REFERENCE_H

#include <stddef.h>

#include "testutil.h"

/* Top-k on random data: a kept and a dropped weight this close would make
 * the choice depend on rounding, so the reference refuses such test data
 * (ties constructed on purpose are exactly equal and allowed). */
#define NEAR_TIE 1e-4

#define MAXE 16 /* experts per set in these tests */
#define MAXG 8  /* groups */
#define MAXM 8  /* experts per group */

extern atmoe_context *CTX; /* the context of the running test */
extern test_rng RNG;

#define OK(expr) ck_assert_status((expr), CTX)

/* Host buffers (alloc_d NaN-poisoned), failing the test when out of
 * memory; n may be 0. */
float *alloc_uniform(size_t n, double lo, double hi);
double *alloc_d(size_t n);
double *to_double(const float *p, size_t n);

/* A graph input [rows, cols] (batched: rows is the batch dimension), a
 * constant [rows, cols] (cols 0: a vector [rows]), and a node's output read into a NaN-poisoned
 * host buffer of count floats. */
atmoe_node input2(atmoe_graph *g, const char *name, atmoe_dtype dtype,
                  size_t rows, size_t cols, int batched);
atmoe_node const2(atmoe_graph *g, atmoe_dtype dtype, size_t rows,
                  size_t cols, const void *data);
float *read_out(atmoe_graph *g, atmoe_node n, size_t count);

/* v rounded in place to what dtype holds (f32: unchanged), through the
 * library's own conversion on the device; returns v's elements as dtype
 * stores them (malloc'd), the data of a graph constant. */
void *stored(atmoe_dtype dtype, float *v, size_t n);

/* |got - want| <= tol * scale everywhere (NaN fails). */
void expect_scaled(const char *what, const float *got, const double *want,
                   const double *scale, size_t rows, size_t cols, double tol);

/* An expert set on the host: its LoRA experts and optional general LoRA. */
typedef struct model {
    size_t d_in, d_out;
    int n; /* experts, without the general LoRA */
    int group[MAXE];
    size_t rank[MAXE];
    float alpha[MAXE];
    unsigned flags[MAXE];
    float *A[MAXE], *B[MAXE]; /* [rank, d_in], [d_out, rank] */
    int has_general, general_first;
    size_t rank_p;
    float alpha_p, lambda;
    unsigned flags_p;
    float *Ap, *Bp;
    /* derived */
    int G, M, count[MAXG], slot[MAXE];
    size_t R; /* sum of the experts' ranks (general LoRA not counted) */
} model;

/* Random experts (flags NULL: all 0) with lambda 1 and no general LoRA. */
void model_init(model *m, size_t d_in, size_t d_out, int n, const int *group,
                const size_t *rank, const unsigned *flags);
/* A random general LoRA, given to the library before the experts (first)
 * or after them. */
void model_general(model *m, size_t rank, unsigned flags, float lambda,
                   int first);
void model_free(model *m);
/* The library's set for m, its info checked against m. */
atmoe_experts *model_build(const model *m);
/* alpha / rank, or alpha / sqrt(rank) for rsLoRA. */
double ref_scale(size_t rank, float alpha, unsigned flags);

/* A router's configuration, mirrored on the host. */
typedef struct rcfg {
    atmoe_router_form form;
    float tau_g, tau_d;
    int topk_g, topk_e;
    int gmask[MAXG], emask[MAXG * MAXM]; /* [g * MAXM + m] */
    float gfix[MAXG], efix[MAXG * MAXM]; /* NaN: free */
} rcfg;

/* A router on set, with everything active and free, mirrored in c. */
atmoe_router *router_make(atmoe_experts *set, rcfg *c, atmoe_router_form form,
                          float tau_g, float tau_d, int topk_g, int topk_e);

/* Softmax of x / tau over the entries with keep set, 0 elsewhere. */
void ref_softmax(double *x, const int *keep, int n, double tau);
/* Keeps the k largest of the entries with keep set (ties: lower index). */
void ref_keep_top(const double *v, int *keep, int n, int k);
/* Fixed weights override; the free kept ones share what is left. */
void ref_apply_fixed(double *v, const int *keep, const float *fixed, int n);
/* a [rows, G], d [rows, G*M], w [rows, n] for router input h [rows, d_in]
 * (float64); wd is W_D [d_in, G*M] (projected) or V_D [G, M] (scaled). */
void ref_router(const model *m, const rcfg *c, const double *h, size_t rows,
                const float *wg, const float *wd, double *a_out,
                double *d_out, double *w_out);

#endif
