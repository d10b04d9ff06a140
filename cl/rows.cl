/* Row gathers and scatters on f32 tables, one work-item per element; every
 * buffer comes with an element offset. */

__kernel void gather_rows_f32(__global float *out, ulong out_offset,
                              __global const float *table, ulong table_offset,
                              __global const int *indices,
                              ulong indices_offset, ulong table_rows,
                              ulong row_len, ulong count)
{
    ulong e = get_global_id(0);
    if (e >= count)
        return;
    out += out_offset;
    table += table_offset;
    indices += indices_offset;
    ulong i = e / row_len, c = e % row_len;
    int r = indices[i];
    out[e] = (r >= 0 && (ulong)r < table_rows) ? table[(ulong)r * row_len + c]
                                               : 0.0f;
}

/* Float addition by compare-and-swap on the bits (OpenCL 1.2 has no atomic
 * float add), so repeated indices add up; their order is unspecified. */
inline void atomic_add_float(volatile __global float *p, float v)
{
    volatile __global int *bits = (volatile __global int *)p;
    int old = *bits, seen;
    do {
        seen = old;
        old = atomic_cmpxchg(bits, seen, as_int(as_float(seen) + v));
    } while (old != seen);
}

__kernel void scatter_add_rows_f32(__global float *out, ulong out_offset,
                                   __global const int *indices,
                                   ulong indices_offset,
                                   __global const float *src, ulong src_offset,
                                   ulong out_rows, ulong row_len, ulong count)
{
    ulong e = get_global_id(0);
    if (e >= count)
        return;
    out += out_offset;
    indices += indices_offset;
    src += src_offset;
    ulong i = e / row_len, c = e % row_len;
    int r = indices[i];
    if (r >= 0 && (ulong)r < out_rows)
        atomic_add_float(out + (ulong)r * row_len + c, src[e]);
}
