/* atmoe_context_selfcheck: proves, on the context's device, that our own
 * kernels and CLBlast give the numbers a float64 host computation gives. */
#include <config.h>

#include <clblast_c.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "device/blas.h"
#include "base/log.h"
#include "tensor/tensor.h"

/* A small deterministic generator (xorshift64*), so a failure repeats. */
static double next_uniform(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return (double)((x * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0 *
               2.0 - 1.0;
}

/* Round-trip f32 -> f16 -> f32 through views: the f16 rounding bounds the
 * relative error by 2^-11 for values in the normal range. */
static atmoe_status check_copy(atmoe_context *ctx, uint64_t *rng,
                               double *worst)
{
    enum { R = 37, C = 53 };
    size_t shape[2] = {R, C}, big[2] = {R + 3, C + 5};
    size_t start[2] = {2, 3};
    float *host = atm_malloc(sizeof(float) * R * C * 2);
    atmoe_tensor *a = NULL, *h = NULL, *out = NULL, *view = NULL;
    atmoe_status st = ATMOE_STATUS_HOST_OUT_OF_MEMORY;
    if (host == NULL) {
        atm_fail(ctx, st, "selfcheck: out of host memory");
        goto out;
    }
    float *back = host + R * C;
    for (int i = 0; i < R * C; i++)
        host[i] = (float)(next_uniform(rng) * 4.0);
    if ((st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, &a)) ||
        (st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F16, 2, shape, &h)) ||
        (st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, big, &out)) ||
        (st = atmoe_tensor_view(out, start, shape, &view)) ||
        (st = atmoe_tensor_fill(out, NAN)) ||
        (st = atmoe_tensor_write(a, host, sizeof(float) * R * C)) ||
        (st = atmoe_tensor_copy(h, a)) || (st = atmoe_tensor_copy(view, h)) ||
        (st = atmoe_tensor_read(view, back, sizeof(float) * R * C)))
        goto out;
    for (int i = 0; i < R * C; i++) {
        double ref = host[i];
        double err = fabs(back[i] - ref) / fmax(fabs(ref), 1e-4);
        if (!(err <= 1.0 / 2048)) {
            st = atm_fail(ctx, ATMOE_STATUS_NUMERIC_ERROR,
                          "selfcheck: f32->f16->f32 copy of element %d gave "
                          "%g, expected %g", i, back[i], ref);
            goto out;
        }
        *worst = fmax(*worst, err);
    }
out:
    atmoe_tensor_free(view);
    atmoe_tensor_free(out);
    atmoe_tensor_free(h);
    atmoe_tensor_free(a);
    atm_free(host);
    return st;
}

/* C = A B through CLBlast, compared with float64 sums; the error of each
 * element is measured against sum |a_ik b_kj|, the scale its rounding
 * error grows with. */
static atmoe_status check_gemm(atmoe_context *ctx, uint64_t *rng,
                               double *worst)
{
    enum { M = 37, N = 41, K = 29 };
    size_t sa[2] = {M, K}, sb[2] = {K, N}, sc[2] = {M, N};
    float *ha = atm_malloc(sizeof(float) * (M * K + K * N + M * N));
    atmoe_tensor *a = NULL, *b = NULL, *c = NULL;
    atmoe_status st = ATMOE_STATUS_HOST_OUT_OF_MEMORY;
    if (ha == NULL) {
        atm_fail(ctx, st, "selfcheck: out of host memory");
        goto out;
    }
    float *hb = ha + M * K, *hc = hb + K * N;
    for (int i = 0; i < M * K; i++)
        ha[i] = (float)next_uniform(rng);
    for (int i = 0; i < K * N; i++)
        hb[i] = (float)next_uniform(rng);
    if ((st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, sa, &a)) ||
        (st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, sb, &b)) ||
        (st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, sc, &c)) ||
        (st = atmoe_tensor_write(a, ha, sizeof(float) * M * K)) ||
        (st = atmoe_tensor_write(b, hb, sizeof(float) * K * N)) ||
        (st = atmoe_tensor_fill(c, NAN)))
        goto out;
    atm_gemm p = {0, 0, M, N, K, 1.0f, 0.0f, a->buffer, b->buffer,
                  c->buffer, a->offset, K, b->offset, N, c->offset, N};
    if ((st = atm_sgemm(ctx, &p, NULL, 0, NULL)) ||
        (st = atmoe_tensor_read(c, hc, sizeof(float) * M * N)))
        goto out;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double ref = 0, scale = 0;
            for (int k = 0; k < K; k++) {
                ref += (double)ha[i * K + k] * hb[k * N + j];
                scale += fabs((double)ha[i * K + k] * hb[k * N + j]);
            }
            double err = fabs(hc[i * N + j] - ref) / fmax(scale, 1e-30);
            if (!(err <= 1e-5)) {
                st = atm_fail(ctx, ATMOE_STATUS_NUMERIC_ERROR,
                              "selfcheck: CLBlastSgemm C[%d][%d] = %g, "
                              "expected %g", i, j, hc[i * N + j], ref);
                goto out;
            }
            *worst = fmax(*worst, err);
        }
out:
    atmoe_tensor_free(c);
    atmoe_tensor_free(b);
    atmoe_tensor_free(a);
    atm_free(ha);
    return st;
}

ATMOE_API atmoe_status atmoe_context_selfcheck(atmoe_context *ctx,
                                               double *max_rel_err)
{
    ATM_CHECK_NULL(NULL, ctx);
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    double worst = 0;
    atmoe_status st = check_copy(ctx, &rng, &worst);
    if (st == ATMOE_STATUS_OK)
        st = check_gemm(ctx, &rng, &worst);
    if (max_rel_err)
        *max_rel_err = worst;
    if (st == ATMOE_STATUS_OK)
        atm_log(ATMOE_LOG_INFO, "selfcheck on %s passed (max rel err %.3g)",
                ctx->device->info.name, worst);
    return st;
}
