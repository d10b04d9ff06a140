/* The rank-1 expert layer's router and mix (SPEC section 4), between its
 * shrink and its expand (cl/linear.cl runs both).
 *
 * mor1e_route: one work-item per token.  The shrink left u_all [T, U]:
 * the rank channels A x in columns [0, r1) and, when the router is on, the
 * router's logits W_r x in [r1, r1 + E) (W_r stacked under A, one pass over
 * x).  From them and the token's intuition score s [E] it forms
 *
 *   p = softmax(logits)
 *   g = k_router om p + k_intuition (1 - om) s     om = sigmoid(100 w_om)
 *
 * keeps the top_k largest g (ties: the lower expert), renormalises p over
 * them and forms g again, writes p and g (0 for a dropped expert), and
 * mixes the kept channels, z = c g (.) u (v1) or z = c G^T u (v2, G = g as
 * [r1, r2]), c = sigmoid(100 w_c): the expand then adds B z with alpha 1.
 * A NaN gate makes the token's z NaN rather than drop the expert quietly.
 * Rows of length E are read from global memory (they are the token's own
 * and stay in cache): E is not known when the program is built.
 *
 * mor1e_stats: one work-item per expert, over the tokens' p and g. */

inline float gate_of(float kr_om, float ks_om, float p, float s)
{
    return kr_om * p + ks_om * s;
}

/* Whether (v, i) comes before-or-at (tv, ti) in the order of top-k:
 * larger first, the lower index first among equals. */
inline int ranks_before(float v, ulong i, float tv, ulong ti)
{
    return v > tv || (v == tv && i <= ti);
}

__kernel void mor1e_route(__global float *z, ulong z_offset,
                          __global float *p, ulong p_offset,
                          __global float *gates, ulong gates_offset,
                          __global const float *u, ulong u_offset,
                          ulong u_width, __global const float *scores,
                          ulong scores_offset, ulong score_rows,
                          int score_mode, __global const int *gate_index,
                          ulong gate_index_offset,
                          __global const float *w_om, ulong w_om_offset,
                          __global const float *w_c, ulong w_c_offset,
                          int has_router, int has_scores, int dense,
                          float k_router, float k_intuition, ulong top_k,
                          ulong tokens, ulong r1, ulong r2, ulong E)
{
    ulong t = get_global_id(0);
    if (t >= tokens)
        return;
    __global const float *ut = u + u_offset + t * u_width;
    __global float *pt = p + p_offset + t * E;
    __global float *gt = gates + gates_offset + t * E;
    ulong Z = dense ? r2 : r1;
    __global float *zt = z + z_offset + t * Z;

    /* score_mode: 0 a row per token, 1 gate_index names it, 2 one row. */
    __global const float *st = 0;
    if (has_scores) {
        ulong row = score_mode == 2 ? 0 : t;
        if (score_mode == 1) {
            int i = gate_index[gate_index_offset + t];
            row = i >= 0 && (ulong)i < score_rows ? (ulong)i : score_rows;
        }
        if (row < score_rows)
            st = scores + scores_offset + row * E;
    }

    float om = 1.0f / (1.0f + exp(-100.0f * w_om[w_om_offset]));
    float c = 1.0f / (1.0f + exp(-100.0f * w_c[w_c_offset]));
    float kr_om = has_router ? k_router * om : 0.0f;
    float ks_om = k_intuition * (1.0f - om);

    if (has_router) {
        __global const float *lt = ut + r1;
        float m = lt[0];
        for (ulong e = 1; e < E; e++)
            m = fmax(m, lt[e]);
        float sum = 0.0f;
        for (ulong e = 0; e < E; e++) {
            float v = exp(lt[e] - m);
            pt[e] = v;
            sum += v;
        }
        float inv = 1.0f / sum;
        for (ulong e = 0; e < E; e++)
            pt[e] *= inv;
    }
    int bad = 0;
    for (ulong e = 0; e < E; e++) {
        float v = gate_of(kr_om, ks_om, has_router ? pt[e] : 0.0f,
                          st ? st[e] : 0.0f);
        bad |= isnan(v);
        gt[e] = v;
    }

    /* Top-k: the k-th of the order by k passes, each taking the first
     * (value, index) strictly after the previous one. */
    float tv = INFINITY;
    ulong ti = 0;
    int sparse = top_k > 0 && top_k < E && !bad;
    if (sparse) {
        int first = 1;
        for (ulong pass = 0; pass < top_k; pass++) {
            float bv = -INFINITY;
            ulong bi = E;
            for (ulong e = 0; e < E; e++) {
                float v = gt[e];
                int after = first || v < tv || (v == tv && e > ti);
                if (after && (bi == E || v > bv)) {
                    bv = v;
                    bi = e;
                }
            }
            tv = bv;
            ti = bi;
            first = 0;
        }
        float kept = 0.0f;
        if (has_router) {
            for (ulong e = 0; e < E; e++)
                if (ranks_before(gt[e], e, tv, ti))
                    kept += pt[e];
        }
        float inv = has_router ? 1.0f / kept : 0.0f;
        for (ulong e = 0; e < E; e++)
            gt[e] = ranks_before(gt[e], e, tv, ti)
                        ? gate_of(kr_om, ks_om,
                                  has_router ? pt[e] * inv : 0.0f,
                                  st ? st[e] : 0.0f)
                        : 0.0f;
    }

    for (ulong j = 0; j < Z; j++)
        zt[j] = bad ? NAN : 0.0f;
    if (bad)
        return;
    for (ulong e = 0; e < E; e++) {
        float v = gt[e];
        if (sparse && v == 0.0f) /* dropped: the mix skips it */
            continue;
        if (dense)
            zt[e % r2] += v * ut[e / r2];
        else
            zt[e] = v * ut[e];
    }
    for (ulong j = 0; j < Z; j++)
        zt[j] *= c;
}

/* load[e]: the fraction of tokens whose largest gate is e's (the lower
 * expert among equals); importance[e]: the mean of p over the tokens. */
__kernel void mor1e_stats(__global float *load, ulong load_offset,
                          __global float *importance,
                          ulong importance_offset,
                          __global const float *gates, ulong gates_offset,
                          __global const float *p, ulong p_offset,
                          int has_router, ulong tokens, ulong E)
{
    ulong e = get_global_id(0);
    if (e >= E)
        return;
    float count = 0.0f, sum = 0.0f;
    for (ulong t = 0; t < tokens; t++) {
        __global const float *gt = gates + gates_offset + t * E;
        ulong best = 0;
        for (ulong j = 1; j < E; j++)
            if (gt[j] > gt[best])
                best = j;
        count += best == e ? 1.0f : 0.0f;
        if (has_router)
            sum += p[p_offset + t * E + e];
    }
    float inv = tokens ? 1.0f / (float)tokens : 0.0f;
    load[load_offset + e] = count * inv;
    if (has_router)
        importance[importance_offset + e] = sum * inv;
}
