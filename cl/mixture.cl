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

#ifdef FUSED
/* The fused variant for small batches (kernels.mixture.VARIANT 1, at most
 * kernels.mixture.FUSED_MAX_TOKENS tokens), shaped for GPUs:
 * y = x W0^T (+ bias) + alpha B_all M(gates) A_all x in one launch, u and
 * z in local memory rather than in global memory between three launches.
 *
 * A work-group of GS work-items (a power of two) owns rows_per_group
 * consecutive rows of y for every token.  It first makes u [tokens, R] =
 * x A_all^T for the whole batch itself (every group the same: A_all is
 * read once a group, from cache after the first, which the host bounds
 * by giving each group at least R rows, so that a group reads no more of
 * A_all than of W0), then z [tokens, Z] = M u, then its rows: the base
 * product and the expand summed in the same registers, one tree over
 * local memory, one store.  The products share cl/linear_gpu.cl's shape:
 * item l reads the 4-element blocks l, l + GS, ... of a row (coalesced),
 * GR rows by TB tokens of partial sums in registers, rows and tokens past
 * the end read again from the last valid one and not stored.
 *
 * Build options: GS, GR, TB (1, 2 or 4), MIX (0 block, 1 diagonal, 2
 * dense) and the storage types AT (A_all, as above), WT (W0) and BT
 * (B_all): 0 f32, 1 f16, 2 bf16, read as stored, every sum f32.  The
 * shapes are arguments, and so are u [tokens, R] and z [tokens, Z] in
 * local memory (R the total rank, Z z's width: R, or r2 for the dense
 * mix, whose rank is r1 = R), sized by the host for the batch: one build
 * serves every expert set and batch. */
#ifndef WT
#define WT 0
#endif
#ifndef BT
#define BT 0
#endif
#define FSTORE_0 float
#define FSTORE_1 half
#define FSTORE_2 ushort
#define FSTORE_(t) FSTORE_##t
#define FSTORE(t) FSTORE_(t)
#define FLOAD4_0(i, p) vload4((i), (p))
#define FLOAD4_1(i, p) vload_half4((i), (p))
#define FLOAD4_2(i, p) as_float4(convert_uint4(vload4((i), (p))) << 16)
#define FLOAD1_0(i, p) ((p)[i])
#define FLOAD1_1(i, p) vload_half((i), (p))
#define FLOAD1_2(i, p) as_float((uint)(p)[i] << 16)
#define FLOAD4_(t, i, p) FLOAD4_##t(i, p)
#define FLOAD1_(t, i, p) FLOAD1_##t(i, p)
#define FLOAD1(t, i, p) FLOAD1_(t, i, p)

/* acc[r][t] += the partial dot product (items' share) of a's row at
 * arow[r] and x's row at xrow[t], n elements, a of storage type T. */
#define DEFINE_FUSED_DOT(name, T)                                             \
    inline void name(float acc[GR][TB], __global const FSTORE(T) *a,          \
                     const ulong arow[GR], __global const float *v,           \
                     const ulong vrow[TB], ulong n, ulong lid)                \
    {                                                                         \
        float4 s[GR][TB];                                                     \
        _Pragma("unroll") for (int r = 0; r < GR; r++)                        \
            _Pragma("unroll") for (int t = 0; t < TB; t++)                    \
                s[r][t] = (float4)(0.0f);                                     \
        ulong blocks = n / 4;                                                 \
        for (ulong i = lid; i < blocks; i += GS) {                            \
            float4 vv[TB];                                                    \
            _Pragma("unroll") for (int t = 0; t < TB; t++)                    \
                vv[t] = vload4(i, v + vrow[t]);                               \
            _Pragma("unroll") for (int r = 0; r < GR; r++) {                  \
                float4 av = FLOAD4_(T, i, a + arow[r]);                       \
                _Pragma("unroll") for (int t = 0; t < TB; t++)                \
                    s[r][t] = fma(av, vv[t], s[r][t]);                        \
            }                                                                 \
        }                                                                     \
        float tail[GR][TB];                                                   \
        _Pragma("unroll") for (int r = 0; r < GR; r++)                        \
            _Pragma("unroll") for (int t = 0; t < TB; t++)                    \
                tail[r][t] = 0.0f;                                            \
        for (ulong i = blocks * 4 + lid; i < n; i += GS)                      \
            _Pragma("unroll") for (int r = 0; r < GR; r++) {                  \
                float av = FLOAD1_(T, arow[r] + i, a);                        \
                _Pragma("unroll") for (int t = 0; t < TB; t++)                \
                    tail[r][t] = fma(av, v[vrow[t] + i], tail[r][t]);         \
            }                                                                 \
        _Pragma("unroll") for (int r = 0; r < GR; r++)                        \
            _Pragma("unroll") for (int t = 0; t < TB; t++) {                  \
                float4 q = s[r][t];                                           \
                acc[r][t] += (q.x + q.y) + (q.z + q.w) + tail[r][t];          \
            }                                                                 \
    }

DEFINE_FUSED_DOT(fused_dot_a, AT)
DEFINE_FUSED_DOT(fused_dot_w, WT)

/* Sums part[q][0..GS) into part[q][0] for the GR x TB outputs q (every
 * item has written its column; every item returns once the sums are
 * there). */
inline void fused_tree(__local float part[GR * TB][GS], ulong lid)
{
    barrier(CLK_LOCAL_MEM_FENCE);
    for (ulong s = GS / 2; s > 0; s >>= 1) {
        if (lid < s)
            for (int q = 0; q < GR * TB; q++)
                part[q][lid] += part[q][lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
}

__kernel __attribute__((reqd_work_group_size(GS, 1, 1))) void
mixture_fused(__global float *y, ulong y_offset, __global const float *x,
              ulong x_offset, __global const A_STORE *a, ulong a_offset,
              __global const FSTORE(WT) *w, ulong w_offset,
              __global const FSTORE(BT) *b, ulong b_offset,
              __global const float *bias, ulong bias_offset, int has_bias,
              __global const float *gates, ulong gates_offset, ulong width,
              __global const int *gate_index, ulong gate_index_offset,
              int has_index, __global const int *chan_expert,
              __global const float *chan_scale, ulong tokens, ulong d_in,
              ulong d_out, ulong gate_rows, ulong rows_per_group,
              float alpha, ulong R, ulong Z, __local float *u,
              __local float *z)
{
    __local float part[GR * TB][GS];
    ulong lid = get_local_id(0);
    gate_index += gate_index_offset;

    /* u = x A_all^T, GR channels by TB tokens at a time. */
    for (ulong r0 = 0; r0 < R; r0 += GR) {
        ulong arow[GR];
#pragma unroll
        for (int r = 0; r < GR; r++)
            arow[r] = a_offset + min(r0 + r, R - 1) * d_in;
        for (ulong t0 = 0; t0 < tokens; t0 += TB) {
            ulong xrow[TB];
#pragma unroll
            for (int t = 0; t < TB; t++)
                xrow[t] = x_offset + min(t0 + t, tokens - 1) * d_in;
            float acc[GR][TB];
#pragma unroll
            for (int r = 0; r < GR; r++)
#pragma unroll
                for (int t = 0; t < TB; t++)
                    acc[r][t] = 0.0f;
            fused_dot_a(acc, a, arow, x, xrow, d_in, lid);
#pragma unroll
            for (int r = 0; r < GR; r++)
#pragma unroll
                for (int t = 0; t < TB; t++)
                    part[r * TB + t][lid] = acc[r][t];
            fused_tree(part, lid);
            for (ulong q = lid; q < GR * TB; q += GS) {
                ulong r = r0 + q / TB, t = t0 + q % TB;
                if (r < R && t < tokens)
                    u[t * R + r] = part[q][0];
            }
            barrier(CLK_LOCAL_MEM_FENCE);
        }
    }

    /* z = M(gates) u, as mix_block, mix_diagonal and mix_dense do. */
    for (ulong i = lid; i < tokens * Z; i += GS) {
        ulong t = i / Z, j = i % Z;
        ulong g = gate_row(gate_index, has_index, t, gate_rows);
        __global const float *row =
            g < gate_rows ? gates + gates_offset + g * width : 0;
#if MIX == 2
        float acc = 0.0f;
        if (row)
            for (ulong r = 0; r < R; r++)
                acc += row[r * Z + j] * u[t * R + r];
        z[i] = acc;
#else
        z[i] = u[t * R + j] * chan_scale[j] *
               channel_gate(row, MIX == 1, chan_expert[j], j);
#endif
    }
    barrier(CLK_LOCAL_MEM_FENCE);

    /* The group's rows: y = x W0^T (+ bias) + alpha z B_all^T. */
    ulong first = get_group_id(0) * rows_per_group;
    ulong end = min(first + rows_per_group, d_out);
    for (ulong r0 = first; r0 < end; r0 += GR) {
        ulong wrow[GR], brow[GR];
#pragma unroll
        for (int r = 0; r < GR; r++) {
            ulong row = min(r0 + r, end - 1);
            wrow[r] = w_offset + row * d_in;
            brow[r] = b_offset + row * Z;
        }
        for (ulong t0 = 0; t0 < tokens; t0 += TB) {
            ulong xrow[TB];
#pragma unroll
            for (int t = 0; t < TB; t++)
                xrow[t] = x_offset + min(t0 + t, tokens - 1) * d_in;
            float acc[GR][TB];
#pragma unroll
            for (int r = 0; r < GR; r++)
#pragma unroll
                for (int t = 0; t < TB; t++)
                    acc[r][t] = 0.0f;
            fused_dot_w(acc, w, wrow, x, xrow, d_in, lid);
            /* The expand's share: channels lid, lid + GS, ... of z. */
            float ex[GR][TB];
#pragma unroll
            for (int r = 0; r < GR; r++)
#pragma unroll
                for (int t = 0; t < TB; t++)
                    ex[r][t] = 0.0f;
            for (ulong j = lid; j < Z; j += GS)
#pragma unroll
                for (int r = 0; r < GR; r++) {
                    float bv = FLOAD1(BT, brow[r] + j, b);
#pragma unroll
                    for (int t = 0; t < TB; t++)
                        ex[r][t] = fma(
                            bv, z[min(t0 + t, tokens - 1) * Z + j],
                            ex[r][t]);
                }
#pragma unroll
            for (int r = 0; r < GR; r++)
#pragma unroll
                for (int t = 0; t < TB; t++)
                    part[r * TB + t][lid] = fma(alpha, ex[r][t], acc[r][t]);
            fused_tree(part, lid);
            for (ulong q = lid; q < GR * TB; q += GS) {
                ulong row = r0 + q / TB, tok = t0 + q % TB;
                if (row < end && tok < tokens)
                    y[y_offset + tok * d_out + row] =
                        part[q][0] +
                        (has_bias ? bias[bias_offset + row] : 0.0f);
            }
            /* part is written again only after every item read its sum. */
            barrier(CLK_LOCAL_MEM_FENCE);
        }
    }
}
#endif
