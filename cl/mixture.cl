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

/* The gate of rank channel r, of expert e (-1: the general LoRA), in the
 * gate row `row` (NULL: the token has none): the channel's own gate with
 * the diagonal mix; its expert's with the block mix, where the general
 * LoRA has no gate and counts fully. */
inline float channel_gate(__global const float *row, int diagonal, int e,
                          ulong r)
{
    if (!diagonal && e < 0)
        return 1.0f;
    return row ? row[diagonal ? r : (ulong)e] : 0.0f;
}

/* The shape of a work-item of the block and diagonal mixes (build options
 * from kernels.mixture.VW and TPI): VW consecutive rank channels of TPI
 * consecutive tokens, the channels' scales and experts loaded once for its
 * tokens and the channels moved as one vector.  1 x 1 is one element an
 * item, as the kernel always had; on PoCL (AVX-512) 16 x 8 ran the mix at
 * T = 512 in less than half the time, most of which went to each
 * element's own division into token and channel and to its own loads. */
#ifndef VW
#define VW 1
#endif
#ifndef TPI
#define TPI 1
#endif
#define MIX_CAT_(a, b) a##b
#define MIX_CAT(a, b) MIX_CAT_(a, b)
#if VW == 1
#define MIX_FLOATV float
#define MIX_VLOAD(p) (*(p))
#define MIX_VSTORE(v, p) (*(p) = (v))
#else
#define MIX_FLOATV MIX_CAT(float, VW)
#define MIX_VLOAD(p) MIX_CAT(vload, VW)(0, p)
#define MIX_VSTORE(v, p) MIX_CAT(vstore, VW)(v, 0, p)
#endif

/* z = u * scale * gate for every rank channel of every token; gate rows
 * are width wide.  Work-item i covers the channels [c VW, c VW + VW) of
 * the tokens [b TPI, b TPI + TPI), c = i % chunks and b = i / chunks with
 * chunks = ceil(rank / VW) (the host launches ceil(tokens / TPI) chunks
 * items); a last chunk of fewer than VW channels goes one by one. */
inline void mix_gated(__global float *z, ulong z_offset,
                      __global const float *u, ulong u_offset,
                      __global const float *gates, ulong gates_offset,
                      ulong width, __global const int *gate_index,
                      int has_index, __global const int *chan_expert,
                      __global const float *chan_scale, ulong tokens,
                      ulong rank, ulong gate_rows, int diagonal)
{
    ulong chunks = (rank + VW - 1) / VW;
    ulong i = get_global_id(0);
    ulong r0 = i % chunks * VW, t0 = i / chunks * TPI;
    if (t0 >= tokens)
        return;
    if (r0 + VW <= rank) {
        MIX_FLOATV scale = MIX_VLOAD(chan_scale + r0);
        int expert[VW];
#pragma unroll
        for (int j = 0; j < VW; j++)
            expert[j] = chan_expert[r0 + j];
#pragma unroll
        for (int k = 0; k < TPI; k++) {
            ulong t = t0 + k;
            if (t >= tokens)
                break;
            ulong g = gate_row(gate_index, has_index, t, gate_rows);
            __global const float *row =
                g < gate_rows ? gates + gates_offset + g * width : 0;
            float gate[VW];
#pragma unroll
            for (int j = 0; j < VW; j++)
                gate[j] = channel_gate(row, diagonal, expert[j], r0 + j);
            ulong at = t * rank + r0;
            MIX_VSTORE(MIX_VLOAD(u + u_offset + at) * scale *
                           MIX_VLOAD(gate),
                       z + z_offset + at);
        }
        return;
    }
    for (int k = 0; k < TPI; k++) {
        ulong t = t0 + k;
        if (t >= tokens)
            break;
        ulong g = gate_row(gate_index, has_index, t, gate_rows);
        __global const float *row =
            g < gate_rows ? gates + gates_offset + g * width : 0;
        for (ulong r = r0; r < rank; r++)
            z[z_offset + t * rank + r] =
                u[u_offset + t * rank + r] * chan_scale[r] *
                channel_gate(row, diagonal, chan_expert[r], r);
    }
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
    mix_gated(z, z_offset, u, u_offset, gates, gates_offset, n_experts,
              gate_index + gate_index_offset, has_index, chan_expert,
              chan_scale, tokens, rank, gate_rows, 0);
}

/* Diagonal: one gate per rank channel, gates [rows, R]. */
__kernel void mix_diagonal(__global float *z, ulong z_offset,
                           __global const float *u, ulong u_offset,
                           __global const float *gates, ulong gates_offset,
                           ulong width, __global const int *gate_index,
                           ulong gate_index_offset, int has_index,
                           __global const int *chan_expert,
                           __global const float *chan_scale, ulong tokens,
                           ulong rank, ulong gate_rows)
{
    mix_gated(z, z_offset, u, u_offset, gates, gates_offset, width,
              gate_index + gate_index_offset, has_index, chan_expert,
              chan_scale, tokens, rank, gate_rows, 1);
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

/* A_all's storage type for fold_gates (AT: 0 f32, 1 f16, 2 bf16, as in
 * cl/linear.cl), read as stored and widened in registers. */
#ifndef AT
#define AT 0
#endif
#if AT == 1
#define A_STORE half
#define A_LOAD(p, i) vload_half((i), (p))
#elif AT == 2
#define A_STORE ushort
#define A_LOAD(p, i) as_float((uint)(p)[i] << 16)
#else
#define A_STORE float
#define A_LOAD(p, i) ((p)[i])
#endif

/* The merge path: when every token has the same gates (one gate row), the
 * mixture folds into the base weight, W' = W0 + c B_all M A_all, and the
 * layer is one GEMM.  This kernel makes M A_all: a = A_all [R, d_in] and
 * the out rows are [z_width, d_in] (z_width = R, or r2 for the dense mix).
 * mix: 0 block, 1 diagonal, 2 dense; gates is the single gate row. */
__kernel void fold_gates(__global float *out, ulong out_offset,
                         __global const A_STORE *a, __global const float *gates,
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
            v += gates[r * z_width + j] * A_LOAD(a, r * d_in + k);
    } else {
        v = A_LOAD(a, j * d_in + k) * chan_scale[j] *
            channel_gate(gates, mix == 1, chan_expert[j], j);
    }
    out[out_offset + i] = v;
}
