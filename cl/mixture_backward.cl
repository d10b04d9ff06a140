/* The backward of the mix step (lib/moe/mixture_backward.c gives the
 * formulas): from u = x A_all^T and dz = c dy B_all (both [T, .], f32),
 * the rank channels' gradient du = M(gates)^T dz, the scaled mix output
 * cz = c M(gates) u that dB_all^T = cz^T dy needs, and d(gates).
 *
 * Gate rows and channels follow cl/mixture.cl: chan_expert[r] is the
 * expert of channel r (-1: the general LoRA), chan_scale[r] its scale with
 * lambda folded in; has_index 0: a gate row per token, 1: gate_index names
 * the row, 2: one row for all tokens. */

/* The gate row of token t, gate_rows for none (cl/mixture.cl's gate_row:
 * programs are built one file each, so it is repeated here). */
inline ulong bw_gate_row(__global const int *gate_index, int has_index,
                         ulong t, ulong gate_rows)
{
    if (has_index != 1)
        return has_index == 2 ? 0 : t;
    int i = gate_index[t];
    return i >= 0 && (ulong)i < gate_rows ? (ulong)i : gate_rows;
}

/* The gate of channel r in row (NULL: none) as cl/mixture.cl's
 * channel_gate. */
inline float bw_channel_gate(__global const float *row, int diagonal, int e,
                             ulong r)
{
    if (!diagonal && e < 0)
        return 1.0f;
    return row ? row[diagonal ? r : (ulong)e] : 0.0f;
}

/* Block and diagonal mixes: per channel, z = u * scale * gate, so
 * du = dz * scale * gate and cz = c * u * scale * gate. */
inline void adjoint_gated(__global float *du, ulong du_offset,
                          __global float *cz, ulong cz_offset,
                          __global const float *u, ulong u_offset,
                          __global const float *dz, ulong dz_offset,
                          __global const float *gates, ulong gates_offset,
                          ulong width, __global const int *gate_index,
                          int has_index, __global const int *chan_expert,
                          __global const float *chan_scale, ulong tokens,
                          ulong rank, ulong gate_rows, float c, int diagonal)
{
    ulong i = get_global_id(0);
    if (i >= tokens * rank)
        return;
    ulong t = i / rank, r = i % rank;
    ulong g = bw_gate_row(gate_index, has_index, t, gate_rows);
    __global const float *row =
        g < gate_rows ? gates + gates_offset + g * width : 0;
    float m = chan_scale[r] * bw_channel_gate(row, diagonal, chan_expert[r], r);
    du[du_offset + i] = dz[dz_offset + i] * m;
    cz[cz_offset + i] = c * u[u_offset + i] * m;
}

__kernel void adjoint_block(__global float *du, ulong du_offset,
                            __global float *cz, ulong cz_offset,
                            __global const float *u, ulong u_offset,
                            __global const float *dz, ulong dz_offset,
                            __global const float *gates, ulong gates_offset,
                            ulong width, __global const int *gate_index,
                            ulong gate_index_offset, int has_index,
                            __global const int *chan_expert,
                            __global const float *chan_scale, ulong tokens,
                            ulong rank, ulong gate_rows, float c)
{
    adjoint_gated(du, du_offset, cz, cz_offset, u, u_offset, dz, dz_offset,
                  gates, gates_offset, width, gate_index + gate_index_offset,
                  has_index, chan_expert, chan_scale, tokens, rank, gate_rows,
                  c, 0);
}

__kernel void adjoint_diagonal(__global float *du, ulong du_offset,
                               __global float *cz, ulong cz_offset,
                               __global const float *u, ulong u_offset,
                               __global const float *dz, ulong dz_offset,
                               __global const float *gates,
                               ulong gates_offset, ulong width,
                               __global const int *gate_index,
                               ulong gate_index_offset, int has_index,
                               __global const int *chan_expert,
                               __global const float *chan_scale,
                               ulong tokens, ulong rank, ulong gate_rows,
                               float c)
{
    adjoint_gated(du, du_offset, cz, cz_offset, u, u_offset, dz, dz_offset,
                  gates, gates_offset, width, gate_index + gate_index_offset,
                  has_index, chan_expert, chan_scale, tokens, rank, gate_rows,
                  c, 1);
}

/* Dense mix, G = the token's gate row as [r1, r2] (rank r1, width r2):
 * z = G^T u, so du = G dz and cz = c G^T u.  Work-items cover
 * [T, max(r1, r2)]. */
__kernel void adjoint_dense(__global float *du, ulong du_offset,
                            __global float *cz, ulong cz_offset,
                            __global const float *u, ulong u_offset,
                            __global const float *dz, ulong dz_offset,
                            __global const float *gates, ulong gates_offset,
                            ulong width, __global const int *gate_index,
                            ulong gate_index_offset, int has_index,
                            __global const int *chan_expert,
                            __global const float *chan_scale, ulong tokens,
                            ulong rank, ulong gate_rows, float c)
{
    ulong span = rank > width ? rank : width;
    ulong i = get_global_id(0);
    if (i >= tokens * span)
        return;
    ulong t = i / span, k = i % span;
    ulong g = bw_gate_row(gate_index + gate_index_offset, has_index, t,
                          gate_rows);
    __global const float *row =
        g < gate_rows ? gates + gates_offset + g * rank * width : 0;
    if (k < rank) {
        float acc = 0.0f;
        if (row)
            for (ulong j = 0; j < width; j++)
                acc += row[k * width + j] * dz[dz_offset + t * width + j];
        du[du_offset + t * rank + k] = acc;
    }
    if (k < width) {
        float acc = 0.0f;
        if (row)
            for (ulong r = 0; r < rank; r++)
                acc += row[r * width + k] * u[u_offset + t * rank + r];
        cz[cz_offset + t * width + k] = c * acc;
    }
}

/* d(gates): one work-item per gate element, summing over the tokens that
 * read its row (all of them for a single row, those whose gate_index names
 * it for per-sequence rows, its own token for per-token rows), so that no
 * two work-items write one element and no atomics are needed.  mix: 0
 * block (element [row, e]: sum over e's channels of dz u scale; the
 * general LoRA has no gate), 1 diagonal ([row, r]: dz u scale of channel
 * r), 2 dense ([row, i * r2 + j]: u_i dz_j).  z_width is R, or r2. */
__kernel void gates_grad(__global float *dg, ulong dg_offset,
                         __global const float *u, ulong u_offset,
                         __global const float *dz, ulong dz_offset,
                         ulong width, __global const int *gate_index,
                         ulong gate_index_offset, int has_index, int mix,
                         __global const int *chan_expert,
                         __global const float *chan_scale, ulong tokens,
                         ulong rank, ulong z_width, ulong gate_rows)
{
    ulong i = get_global_id(0);
    if (i >= gate_rows * width)
        return;
    ulong gr = i / width, col = i % width;
    gate_index += gate_index_offset;
    ulong t0 = 0, t1 = tokens;
    if (has_index == 0) {
        t0 = gr;
        t1 = gr + 1;
    }
    float acc = 0.0f;
    for (ulong t = t0; t < t1; t++) {
        if (bw_gate_row(gate_index, has_index, t, gate_rows) != gr)
            continue;
        __global const float *ut = u + u_offset + t * rank;
        __global const float *dzt = dz + dz_offset + t * z_width;
        if (mix == 2) {
            acc += ut[col / z_width] * dzt[col % z_width];
        } else if (mix == 1) {
            acc += dzt[col] * ut[col] * chan_scale[col];
        } else {
            for (ulong r = 0; r < rank; r++)
                if (chan_expert[r] == (int)col)
                    acc += dzt[r] * ut[r] * chan_scale[r];
        }
    }
    dg[dg_offset + i] = acc;
}

/* out[j] = sum over rows of x [rows, cols]: the bias's gradient. */
__kernel void column_sum(__global float *out, ulong out_offset,
                         __global const float *x, ulong x_offset,
                         ulong rows, ulong cols)
{
    ulong j = get_global_id(0);
    if (j >= cols)
        return;
    float acc = 0.0f;
    for (ulong t = 0; t < rows; t++)
        acc += x[x_offset + t * cols + j];
    out[out_offset + j] = acc;
}
