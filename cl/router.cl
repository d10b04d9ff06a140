/* The AT-MoE grouped router (SPEC section 3), one kernel for all of it.
 *
 * For each row r of the router input h (a token's hidden state, or a
 * sequence's pooled instruction embedding):
 *
 *   a      = softmax(h W_G / tau_g) over the active groups
 *   L[g,m] = (h W_D)[g*MMAX + m]             (PROJECTED)
 *          = a[g] V_D[g,m]                   (SCALED, the paper's form)
 *   d[g,:] = softmax(L[g,:] / tau_d) over the active experts of group g
 *   w[g,m] = a[g] d[g,m]
 *
 * with masks (switched-off groups and experts get weight 0 and the others
 * share the mass), top-k groups and top-k experts per group (renormalised
 * over the kept ones), and fixed weights that override the router: a fixed
 * group (or expert) gets its weight, the free ones share what is left in
 * proportion to the router's weights.  A group whose experts are all masked
 * counts as masked.  When no group is active every weight is 0.
 *
 * Compile-time parameters (the host sets them from the expert set):
 *   NG      number of groups          MMAX   largest group's expert count
 *   FORM    0 projected, 1 scaled     TOPK_G, TOPK_E  0 means keep all
 *   WG      work-group size: a work-group owns a row and its work-items
 *           split the d_in-long dot products (a power of two)
 *   LPI     logits a pass over the row of h computes (kernels.router.LPI;
 *           1 as the kernel always had: a pass, and a tree, a logit)
 *   GT, DT  storage types of w_g and of w_d (or v_d): 0 f32, 1 f16,
 *           2 bf16, as in cl/linear.cl; read as stored and widened in
 *           registers, every sum and logit in f32 (SPEC section 2) */

#ifndef WG
#define WG 64
#endif
#ifndef LPI
#define LPI 1
#endif
#ifndef TOPK_G
#define TOPK_G 0
#endif
#ifndef TOPK_E
#define TOPK_E 0
#endif

#ifndef GT
#define GT 0
#endif
#ifndef DT
#define DT 0
#endif

/* A router weight of storage type t: its element type and element i of p
 * as f32. */
#define RSTORE_0 float
#define RSTORE_1 half
#define RSTORE_2 ushort
#define RSTORE_(t) RSTORE_##t
#define RSTORE(t) RSTORE_(t)
#define RLOAD_0(p, i) ((p)[i])
#define RLOAD_1(p, i) vload_half((i), (p))
#define RLOAD_2(p, i) as_float((uint)(p)[i] << 16)
#define RLOAD_(t, p, i) RLOAD_##t(p, i)
#define RLOAD(t, p, i) RLOAD_(t, p, i)

#define NL (FORM == 0 ? NG + NG * MMAX : NG) /* logits from h */

/* Keeps the k largest of v[0..n) among those with keep[i] set, clearing
 * keep for the others; of equal values the lower index stays. */
inline void keep_top(const float *v, int *keep, int n, int k)
{
    if (k <= 0)
        return;
    int kept = 0;
    for (int i = 0; i < n; i++)
        kept += keep[i];
    for (; kept > k; kept--) {
        int worst = -1;
        for (int i = 0; i < n; i++)
            if (keep[i] && (worst < 0 || v[i] <= v[worst]))
                worst = i;
        keep[worst] = 0;
    }
}

/* softmax(x / tau) over the entries with keep set; the rest get 0. */
inline void masked_softmax(float *x, const int *keep, int n, float tau)
{
    float m = -INFINITY;
    for (int i = 0; i < n; i++)
        if (keep[i])
            m = fmax(m, x[i] / tau);
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = keep[i] ? exp(x[i] / tau - m) : 0.0f;
        sum += x[i];
    }
    /* NaN logits make NaN weights: the trace shows them, rather than a
     * silent zero. */
    for (int i = 0; i < n; i++)
        x[i] = sum > 0.0f || isnan(sum) ? x[i] / sum : 0.0f;
}

/* Sets fixed entries (fixed[i] not NaN) to their value, clears the ones
 * not kept, and rescales the free kept ones to share 1 - (sum of the fixed
 * ones) in proportion to their weights: the renormalisation after top-k and
 * the override of fixed weights in one step. */
inline void apply_fixed(float *v, const int *keep, __global const float *fixed,
                        int n)
{
    float fixed_sum = 0.0f, free_sum = 0.0f;
    for (int i = 0; i < n; i++) {
        if (!keep[i])
            continue;
        if (isnan(fixed[i]))
            free_sum += v[i];
        else
            fixed_sum += fixed[i];
    }
    float room = fmax(1.0f - fixed_sum, 0.0f);
    for (int i = 0; i < n; i++) {
        if (!keep[i])
            v[i] = 0.0f;
        else if (!isnan(fixed[i]))
            v[i] = fixed[i];
        else
            v[i] = free_sum > 0.0f || isnan(free_sum) ? v[i] * room / free_sum
                                                      : 0.0f;
    }
}

/* acc[j] += h[k] * w[at] for the count logits j of a pass over the
 * items' elements k of the row of h, w of storage type t. */
#define ROUTER_PASS(t, w, at, count)                                          \
    do {                                                                      \
        for (ulong k = lid; k < d_in; k += WG) {                              \
            float hk = h[k];                                                  \
            _Pragma("unroll") for (int j = 0; j < (count); j++)               \
                acc[j] += hk * RLOAD(t, w, at);                               \
        }                                                                     \
    } while (0)

/* h [rows, d_in]; w_g [d_in, NG]; w_d [d_in, NG*MMAX] (PROJECTED) or
 * v_d [NG, MMAX] (SCALED); counts [NG]; masks and fixed weights [NG] and
 * [NG*MMAX] (mask 0 = off; fixed NaN = free); slot_of_expert [E] maps the
 * expert order of w to g*MMAX + m.  Outputs a [rows, NG], d [rows,
 * NG*MMAX], w [rows, E]. */
__kernel __attribute__((reqd_work_group_size(WG, 1, 1))) void
grouped_router(__global const float *h, ulong h_offset, ulong d_in,
               __global const RSTORE(GT) *w_g, ulong w_g_offset,
               __global const RSTORE(DT) *w_d, ulong w_d_offset,
               __global const int *counts, __global const int *group_mask,
               __global const int *expert_mask,
               __global const float *group_fixed,
               __global const float *expert_fixed,
               __global const int *slot_of_expert, int n_experts, float tau_g,
               float tau_d, __global float *a_out, ulong a_offset,
               __global float *d_out, ulong d_offset, __global float *w_out,
               ulong w_offset)
{
    __local float partial[LPI][WG];
    __local float logits[NL];
    const int lid = get_local_id(0);
    const ulong row = get_group_id(0);
    h += h_offset + row * d_in;
    w_g += w_g_offset;
    w_d += w_d_offset;

    /* The dot products h . column for every logit: work-items split d_in,
     * consecutive items on consecutive elements of h, LPI logits (columns
     * of w_g, then of w_d) at a time, so that a pass over the row of h
     * reads each of its elements once for LPI logits and LPI neighbouring
     * elements of the weights' row.  Each logit's sum runs in the same
     * order whatever LPI: the results do not depend on it. */
    int n;
    for (int c0 = 0; c0 < NL; c0 += n) {
        /* A pass stays within w_g's columns or within w_d's. */
        n = min(LPI, c0 < NG ? NG - c0 : NL - c0);
        float acc[LPI];
#pragma unroll
        for (int j = 0; j < LPI; j++)
            acc[j] = 0.0f;
        /* Every pass's count is known to the compiler (the sums stay in
         * registers): LPI, or the remainder of w_g's or w_d's columns. */
        if (c0 < NG && n == LPI)
            ROUTER_PASS(GT, w_g, k * NG + c0 + j, LPI);
        else if (c0 < NG)
            ROUTER_PASS(GT, w_g, k * NG + c0 + j, NG % LPI);
        else if (n == LPI)
            ROUTER_PASS(DT, w_d, k * (NG * MMAX) + (c0 - NG + j), LPI);
        else
            ROUTER_PASS(DT, w_d, k * (NG * MMAX) + (c0 - NG + j),
                        (NL - NG) % LPI);
        for (int j = 0; j < n; j++)
            partial[j][lid] = acc[j];
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int s = WG / 2; s > 0; s >>= 1) {
            if (lid < s)
                for (int j = 0; j < n; j++)
                    partial[j][lid] += partial[j][lid + s];
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        if (lid == 0)
            for (int j = 0; j < n; j++)
                logits[c0 + j] = partial[j][0];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid != 0)
        return;

    /* Group weights. */
    float a[NG];
    int keep_g[NG];
    for (int g = 0; g < NG; g++) {
        int any = 0;
        for (int m = 0; m < counts[g]; m++)
            any |= expert_mask[g * MMAX + m];
        keep_g[g] = group_mask[g] && any;
        a[g] = logits[g];
    }
    masked_softmax(a, keep_g, NG, tau_g);
    /* Fixed groups are always kept; top-k chooses among the free ones. */
    int free_g[NG];
    for (int g = 0; g < NG; g++)
        free_g[g] = keep_g[g] && isnan(group_fixed[g]);
    keep_top(a, free_g, NG, TOPK_G);
    for (int g = 0; g < NG; g++)
        keep_g[g] = free_g[g] || (keep_g[g] && !isnan(group_fixed[g]));
    apply_fixed(a, keep_g, group_fixed, NG);

    /* Within-group weights. */
    float d[MMAX];
    int keep_e[MMAX];
    for (int g = 0; g < NG; g++) {
        for (int m = 0; m < MMAX; m++) {
            keep_e[m] = m < counts[g] && expert_mask[g * MMAX + m];
#if FORM == 0
            d[m] = logits[NG + g * MMAX + m];
#else
            d[m] = a[g] * RLOAD(DT, w_d, g * MMAX + m);
#endif
        }
        masked_softmax(d, keep_e, MMAX, tau_d);
        int free_e[MMAX];
        for (int m = 0; m < MMAX; m++)
            free_e[m] = keep_e[m] && isnan(expert_fixed[g * MMAX + m]);
        keep_top(d, free_e, MMAX, TOPK_E);
        for (int m = 0; m < MMAX; m++)
            keep_e[m] = free_e[m] ||
                        (keep_e[m] && !isnan(expert_fixed[g * MMAX + m]));
        apply_fixed(d, keep_e, expert_fixed + g * MMAX, MMAX);
        for (int m = 0; m < MMAX; m++)
            d_out[d_offset + row * NG * MMAX + g * MMAX + m] =
                keep_g[g] ? d[m] : 0.0f;
        a_out[a_offset + row * NG + g] = a[g];
    }
    for (int e = 0; e < n_experts; e++) {
        int slot = slot_of_expert[e];
        w_out[w_offset + row * n_experts + e] =
            a[slot / MMAX] * d_out[d_offset + row * NG * MMAX + slot];
    }
}
