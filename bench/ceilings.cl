/* Micro-kernels that measure a device's own ceilings for atmoe-bench: the
 * global-memory read bandwidth and the FP32 FMA rate that the roofline of
 * every workload is drawn against, and the cost of a kernel launch.
 *
 * Compile-time parameter (fma_peak only):
 *   VEC     vector width of the FMA chains (1, 2, 4, 8 or 16).  The host
 *           builds every width and keeps the fastest: GPUs want scalar
 *           work-items, CPU drivers may only fill their SIMD lanes with
 *           explicit vectors. */

#ifndef VEC
#define VEC 4
#endif

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#if VEC == 1
typedef float vec_t;
#else
typedef CAT(float, VEC) vec_t;
#endif

/* Every work-group reads its own contiguous block of per_group float4s, its
 * work-items side by side: coalesced on a GPU (work-groups of 256), a plain
 * stream on a CPU (work-groups of 1, whose drivers run a work-group's items
 * one after another).  Four sums keep four loads in flight; per_group is a
 * multiple of 4 x the work-group size.  The sums are stored so that the
 * compiler keeps the loads. */
__kernel void read_bandwidth(__global const float4 *src, ulong per_group,
                             __global float *out)
{
    const ulong lid = get_local_id(0), lsize = get_local_size(0);
    __global const float4 *p = src + get_group_id(0) * per_group;
    float4 s0 = (float4)(0.0f), s1 = s0, s2 = s0, s3 = s0;
    for (ulong i = lid; i < per_group; i += 4 * lsize) {
        s0 += p[i];
        s1 += p[i + lsize];
        s2 += p[i + 2 * lsize];
        s3 += p[i + 3 * lsize];
    }
    const float4 s = (s0 + s1) + (s2 + s3);
    out[get_global_id(0)] = s.x + s.y + s.z + s.w;
}

/* Eight independent FMA chains per work-item, enough to cover the FMA
 * latency on every device we know; m and c come from the host so that the
 * chains cannot be folded.  Each iteration is 8 x VEC FMAs = 16 x VEC
 * floating-point operations. */
__kernel void fma_peak(__global vec_t *out, int iterations, float m, float c)
{
    const float s = (float)get_global_id(0) * 1e-7f;
    vec_t a0 = (vec_t)(s), a1 = (vec_t)(s + 0.1f), a2 = (vec_t)(s + 0.2f),
          a3 = (vec_t)(s + 0.3f), a4 = (vec_t)(s + 0.4f),
          a5 = (vec_t)(s + 0.5f), a6 = (vec_t)(s + 0.6f),
          a7 = (vec_t)(s + 0.7f);
    const vec_t vm = (vec_t)(m), vc = (vec_t)(c);
    for (int i = 0; i < iterations; i++) {
        a0 = fma(a0, vm, vc);
        a1 = fma(a1, vm, vc);
        a2 = fma(a2, vm, vc);
        a3 = fma(a3, vm, vc);
        a4 = fma(a4, vm, vc);
        a5 = fma(a5, vm, vc);
        a6 = fma(a6, vm, vc);
        a7 = fma(a7, vm, vc);
    }
    out[get_global_id(0)] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

/* Does nothing: its enqueue-to-completion time is the launch cost. */
__kernel void empty_kernel(__global float *out)
{
    if (get_global_id(0) == (size_t)-1)
        out[0] = 0.0f;
}
