/* The backward of the grouped router (lib/moe/router_backward.c gives the
 * formulas): for each row, from the forward's final group weights a [NG]
 * and within-group weights d [NG*MMAX] (0 for dropped groups) and the
 * upstream gradients dL/dw, dL/da, dL/dd (each optional), the gradients of
 * the group logits h W_G (glg [rows, NG]) and of the within-group logits
 * (gl [rows, NG*MMAX]: of h W_D in the projected form; in the scaled form
 * a[g] times that of L[g,m] = a[g] V_D[g,m], the row's share of dV_D).
 *
 * One work-item per row: NG and MMAX are small and set at build time (the
 * forward's options, cl/router.cl). */

/* The gradient of logits x (temperature tau) from gv = dL/dv, where v are
 * the final weights of one softmax level: v = room * softmax(x / tau)
 * over the free kept entries (the renormalisation after top-k, and the
 * share left by fixed weights, in one), so that
 *   dL/dx_k = v_k / tau * (gv_k - sum_free gv_i v_i / sum_free v_i).
 * Fixed entries are constants, masked and dropped ones have v = 0: none
 * gets a gradient.  sum_free v_i is room, 0 when no free weight is left. */
inline void level_grad(const float *v, const float *gv, float *gx,
                       __global const float *fixed, int n, float tau)
{
    float num = 0.0f, den = 0.0f;
    for (int i = 0; i < n; i++)
        if (isnan(fixed[i])) {
            num += gv[i] * v[i];
            den += v[i];
        }
    float mean = den > 0.0f ? num / den : 0.0f;
    for (int i = 0; i < n; i++)
        gx[i] = isnan(fixed[i]) && den > 0.0f ? v[i] / tau * (gv[i] - mean)
                                              : 0.0f;
}

__kernel void router_backward(
    __global const float *a, ulong a_offset, __global const float *d,
    ulong d_offset, __global const float *dw, ulong dw_offset, int has_dw,
    __global const float *da, ulong da_offset, int has_da,
    __global const float *dd, ulong dd_offset, int has_dd,
    __global const float *v_d, ulong v_d_offset,
    __global const int *counts, __global const float *group_fixed,
    __global const float *expert_fixed, __global const int *slot_of_expert,
    int n_experts, float tau_g, float tau_d, ulong rows,
    __global float *glg, ulong glg_offset, __global float *gl,
    ulong gl_offset)
{
    ulong row = get_global_id(0);
    if (row >= rows)
        return;
    a += a_offset + row * NG;
    d += d_offset + row * NG * MMAX;
    float av[NG], ga[NG], dv[NG * MMAX], gd[NG * MMAX];
    for (int g = 0; g < NG; g++) {
        av[g] = a[g];
        ga[g] = has_da ? da[da_offset + row * NG + g] : 0.0f;
    }
    for (int s = 0; s < NG * MMAX; s++) {
        dv[s] = d[s];
        gd[s] = has_dd ? dd[dd_offset + row * NG * MMAX + s] : 0.0f;
    }
    /* w[e] = a[g] d[g,m]. */
    if (has_dw)
        for (int e = 0; e < n_experts; e++) {
            int slot = slot_of_expert[e], g = slot / MMAX;
            float gw = dw[dw_offset + row * n_experts + e];
            ga[g] += gw * dv[slot];
            gd[slot] += gw * av[g];
        }
    /* Within each group: its logits' gradient; in the scaled form the
     * logits a[g] V_D[g,m] pass some of it on to a[g]. */
    for (int g = 0; g < NG; g++) {
        float gx[MMAX];
        level_grad(dv + g * MMAX, gd + g * MMAX, gx,
                   expert_fixed + g * MMAX, MMAX, tau_d);
        for (int m = 0; m < MMAX; m++) {
            float x = m < counts[g] ? gx[m] : 0.0f;
#if FORM == 0
            gl[gl_offset + row * NG * MMAX + g * MMAX + m] = x;
#else
            ga[g] += x * v_d[v_d_offset + g * MMAX + m];
            gl[gl_offset + row * NG * MMAX + g * MMAX + m] = x * av[g];
#endif
        }
    }
    float gx[NG];
    level_grad(av, ga, gx, group_fixed, NG, tau_g);
    for (int g = 0; g < NG; g++)
        glg[glg_offset + row * NG + g] = gx[g];
}
