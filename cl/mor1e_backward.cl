/* The backward of the rank-1 expert layer's route (cl/mor1e.cl's
 * mor1e_route; the derivation is at the top of lib/moe/mor1e_backward.c).
 *
 * mor1e_route_backward: one work-item per token, as the forward.  It
 * recomputes the token's softmax p, its gates g0 and the top-k choice with
 * the forward's very expressions (so the kept set is the forward's, bit
 * for bit), then writes, from dz = dL/dz:
 *
 *   d_all [T, r1 + E]   du in [0, r1), d(logits) in [r1, r1 + E): the
 *                       shrink's backward takes both in one GEMM
 *   parts [T, 2]        the token's share of dL/dw_om and dL/dw_c
 *   ds    [T, E]        dL/d(the token's score row), when wanted
 *
 * p is kept in the logits' columns of d_all until it is replaced by
 * d(logits): E is not known when the program is built, so the row cannot
 * live in private memory.
 *
 * mor1e_gates_sum: two work-items, the sums of parts' columns. */

inline float bw_gate_of(float kr_om, float ks_om, float p, float s)
{
    return kr_om * p + ks_om * s;
}

inline int bw_ranks_before(float v, ulong i, float tv, ulong ti)
{
    return v > tv || (v == tv && i <= ti);
}

__kernel void mor1e_route_backward(
    __global float *d_all, ulong d_all_offset, __global float *parts,
    ulong parts_offset, __global float *ds, ulong ds_offset, int want_ds,
    __global const float *u, ulong u_offset, ulong u_width,
    __global const float *dz, ulong dz_offset, __global const float *scores,
    ulong scores_offset, ulong score_rows, int score_mode,
    __global const int *gate_index, ulong gate_index_offset,
    __global const float *w_om, ulong w_om_offset, __global const float *w_c,
    ulong w_c_offset, int has_router, int has_scores, int dense,
    float k_router, float k_intuition, ulong top_k, ulong tokens, ulong r1,
    ulong r2, ulong E)
{
    ulong t = get_global_id(0);
    if (t >= tokens)
        return;
    __global const float *ut = u + u_offset + t * u_width;
    __global float *dt = d_all + d_all_offset + t * u_width;
    __global float *pt = dt + r1; /* p, then d(logits) */
    __global float *part = parts + parts_offset + 2 * t;
    __global float *dst = ds + ds_offset + t * E;
    ulong Z = dense ? r2 : r1;
    __global const float *dzt = dz + dz_offset + t * Z;

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
    for (ulong e = 0; e < E; e++)
        bad |= isnan(bw_gate_of(kr_om, ks_om, has_router ? pt[e] : 0.0f,
                                st ? st[e] : 0.0f));

    float tv = INFINITY;
    ulong ti = 0;
    int sparse = top_k > 0 && top_k < E && !bad;
    float inv = 1.0f;
    if (sparse) {
        int first = 1;
        for (ulong pass = 0; pass < top_k; pass++) {
            float bv = -INFINITY;
            ulong bi = E;
            for (ulong e = 0; e < E; e++) {
                float v = bw_gate_of(kr_om, ks_om,
                                     has_router ? pt[e] : 0.0f,
                                     st ? st[e] : 0.0f);
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
        if (has_router) {
            float kept = 0.0f;
            for (ulong e = 0; e < E; e++)
                if (bw_ranks_before(bw_gate_of(kr_om, ks_om, pt[e],
                                               st ? st[e] : 0.0f),
                                    e, tv, ti))
                    kept += pt[e];
            inv = 1.0f / kept;
        }
    }
    if (bad) {
        for (ulong j = 0; j < u_width; j++)
            dt[j] = NAN;
        part[0] = part[1] = NAN;
        if (want_ds)
            for (ulong e = 0; e < E; e++)
                dst[e] = NAN;
        return;
    }

    /* The mix's adjoint: z = c M(g) u, so du = c M(g)^T dz, dg = c dz u
     * over the mix's pairs, dc = dz . M(g) u. */
    for (ulong i = 0; i < r1; i++)
        dt[i] = 0.0f;
    float dc = 0.0f, dkr = 0.0f, dks = 0.0f;
    for (ulong e = 0; e < E; e++) {
        float s = st ? st[e] : 0.0f;
        float p = has_router ? pt[e] : 0.0f;
        int keep = !sparse || bw_ranks_before(bw_gate_of(kr_om, ks_om, p, s),
                                              e, tv, ti);
        ulong i = dense ? e / r2 : e, j = dense ? e % r2 : e;
        float dzu = dzt[j] * ut[i];
        float q = p * inv;
        float gk = keep ? (sparse ? bw_gate_of(kr_om, ks_om, q, s)
                                  : bw_gate_of(kr_om, ks_om, p, s))
                        : 0.0f;
        float dg = keep ? c * dzu : 0.0f;
        dt[i] += c * gk * dzt[j];
        dc += gk * dzu;
        dkr += dg * q;
        dks += dg * s;
        if (want_ds)
            dst[e] = st ? ks_om * dg : 0.0f;
    }

    /* p: renormalised over the kept set (q = p / kept), then the
     * softmax's Jacobian. */
    if (has_router) {
        float sum_pdp = 0.0f;
        for (ulong pass = 0; pass < 2; pass++) {
            for (ulong e = 0; e < E; e++) {
                float s = st ? st[e] : 0.0f, p = pt[e];
                int keep = !sparse ||
                           bw_ranks_before(bw_gate_of(kr_om, ks_om, p, s), e,
                                           tv, ti);
                ulong i = dense ? e / r2 : e, j = dense ? e % r2 : e;
                float dg = keep ? c * dzt[j] * ut[i] : 0.0f;
                float dp = keep ? (sparse ? inv * kr_om * (dg - dkr)
                                          : kr_om * dg)
                                : 0.0f;
                if (pass == 0)
                    sum_pdp += p * dp;
                else
                    pt[e] = p * (dp - sum_pdp);
            }
        }
    }
    float dom = (has_router ? k_router * dkr : 0.0f) - k_intuition * dks;
    part[0] = dom * 100.0f * om * (1.0f - om);
    part[1] = dc * 100.0f * c * (1.0f - c);
}

__kernel void mor1e_gates_sum(__global float *d_om, ulong d_om_offset,
                              __global float *d_c, ulong d_c_offset,
                              __global const float *parts, ulong parts_offset,
                              ulong tokens)
{
    ulong k = get_global_id(0);
    if (k >= 2)
        return;
    float sum = 0.0f;
    for (ulong t = 0; t < tokens; t++)
        sum += parts[parts_offset + 2 * t + k];
    if (k == 0)
        d_om[d_om_offset] = sum;
    else
        d_c[d_c_offset] = sum;
}
