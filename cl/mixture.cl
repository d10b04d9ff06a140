/* The mix step of shrink -> mix -> expand (SPEC section 2): z = M(x) u for
 * the rank channels of the stacked experts, one work-item per element.
 *
 * u and z are [T, R] (fp32 whatever the weights' storage).  Channel r
 * belongs to expert chan_expert[r] (-1: the general LoRA) and carries
 * chan_scale[r] = s_e * lambda (or s_p * (1 - lambda)).  Gates have one row
 * per token, or one row per sequence with gate_index naming each token's
 * row, or one row for all tokens. */

/* has_index: 0 one gate row per token, 1 gate_index names the row, 2 one
 * row for every token.  An index outside [0, gate_rows) gives gate_rows,
 * which callers treat as "no gates": the token gets the base projection
 * (and the general LoRA) only. */
inline ulong gate_row(__global const int *gate_index, int has_index, ulong t,
                      ulong gate_rows)
{
    if (has_index != 1)
        return has_index == 2 ? 0 : t;
    int i = gate_index[t];
    return i >= 0 && (ulong)i < gate_rows ? (ulong)i : gate_rows;
}

/* Block-diagonal: one gate per expert, gates [rows, E]. */
__kernel void mix_block(__global float *z, ulong z_offset,
                        __global const float *u, ulong u_offset,
                        __global const float *gates, ulong gates_offset,
                        ulong n_experts, __global const int *gate_index,
                        ulong gate_index_offset, int has_index,
                        __global const int *chan_expert,
                        __global const float *chan_scale, ulong tokens,
                        ulong rank, ulong gate_rows)
{
    ulong i = get_global_id(0);
    if (i >= tokens * rank)
        return;
    ulong t = i / rank, r = i % rank;
    int e = chan_expert[r];
    ulong row = gate_row(gate_index + gate_index_offset, has_index, t,
                         gate_rows);
    float gate = 1.0f;
    if (e >= 0)
        gate = row < gate_rows
                   ? gates[gates_offset + row * n_experts + (ulong)e]
                   : 0.0f;
    z[z_offset + i] = u[u_offset + i] * chan_scale[r] * gate;
}

/* Diagonal: one gate per rank channel, gates [rows, R]. */
__kernel void mix_diagonal(__global float *z, ulong z_offset,
                           __global const float *u, ulong u_offset,
                           __global const float *gates, ulong gates_offset,
                           ulong unused, __global const int *gate_index,
                           ulong gate_index_offset, int has_index,
                           __global const int *chan_expert,
                           __global const float *chan_scale, ulong tokens,
                           ulong rank, ulong gate_rows)
{
    ulong i = get_global_id(0);
    if (i >= tokens * rank)
        return;
    ulong t = i / rank, r = i % rank;
    ulong row = gate_row(gate_index + gate_index_offset, has_index, t,
                         gate_rows);
    float gate = row < gate_rows ? gates[gates_offset + row * rank + r] : 0.0f;
    z[z_offset + i] = u[u_offset + i] * chan_scale[r] * gate;
}

/* Dense (T-REX mix-and-match): z[t, j] = sum_i G[i, j] u[t, i] with
 * G = gates row reshaped to [r1, r2] row-major; here rank is r1 and
 * width r2, and the work-items cover [T, r2]. */
__kernel void mix_dense(__global float *z, ulong z_offset,
                        __global const float *u, ulong u_offset,
                        __global const float *gates, ulong gates_offset,
                        ulong width, __global const int *gate_index,
                        ulong gate_index_offset, int has_index,
                        __global const int *chan_expert,
                        __global const float *chan_scale, ulong tokens,
                        ulong rank, ulong gate_rows)
{
    ulong i = get_global_id(0);
    if (i >= tokens * width)
        return;
    ulong t = i / width, j = i % width;
    ulong g = gate_row(gate_index + gate_index_offset, has_index, t, gate_rows);
    float acc = 0.0f;
    if (g < gate_rows) {
        __global const float *row = gates + gates_offset + g * rank * width;
        __global const float *ut = u + u_offset + t * rank;
        for (ulong r = 0; r < rank; r++)
            acc += row[r * width + j] * ut[r];
    }
    z[z_offset + i] = acc;
}

/* The merge path: when every token has the same gates (one gate row), the
 * mixture folds into the base weight, W' = W0 + c B_all M A_all, and the
 * layer is one GEMM.  This kernel makes M A_all: a = A_all [R, d_in] and
 * the out rows are [z_width, d_in] (z_width = R, or r2 for the dense mix).
 * mix: 0 block, 1 diagonal, 2 dense; gates is the single gate row. */
__kernel void fold_gates(__global float *out, ulong out_offset,
                         __global const float *a, __global const float *gates,
                         ulong gates_offset, int mix,
                         __global const int *chan_expert,
                         __global const float *chan_scale, ulong d_in,
                         ulong rank, ulong z_width)
{
    ulong i = get_global_id(0);
    if (i >= z_width * d_in)
        return;
    ulong j = i / d_in, k = i % d_in;
    gates += gates_offset;
    float v;
    if (mix == 2) {
        v = 0.0f;
        for (ulong r = 0; r < rank; r++)
            v += gates[r * z_width + j] * a[r * d_in + k];
    } else {
        int e = chan_expert[j];
        float gate = mix == 1 ? gates[j] : (e >= 0 ? gates[e] : 1.0f);
        v = a[j * d_in + k] * chan_scale[j] * gate;
    }
    out[out_offset + i] = v;
}
