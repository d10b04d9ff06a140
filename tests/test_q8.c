/* Tests of 8-bit blocks (ATMOE_DTYPE_Q8, atmoe.h "8-bit blocks"): their
 * sizes, quantisation from f32, bf16 and f16 against a host reference
 * (int8 values and scales bitwise), dequantisation, NaN and infinity, and
 * the refusals of what a q8 tensor cannot be.  The mixture's reads of a
 * q8 W0 on every route are in tests/test_moe.c (test_every_batch_q8). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define QB ATMOE_Q8_BLOCK
#define QBYTES ATMOE_Q8_BLOCK_BYTES

static size_t q8_bytes(size_t rows, size_t n)
{
    return rows * ((n + QB - 1) / QB) * QBYTES;
}

/* The reference blocks of x [rows, n] (the values as stored): d = max|x|
 * / 127 in float, q = x / d rounded half away from zero, the padding 0. */
static void ref_quantise(const float *x, size_t rows, size_t n, uint8_t *out)
{
    size_t nb = (n + QB - 1) / QB;
    memset(out, 0, q8_bytes(rows, n));
    for (size_t r = 0; r < rows; r++)
        for (size_t b = 0; b < nb; b++) {
            uint8_t *blk = out + (r * nb + b) * QBYTES;
            size_t len = n - b * QB < QB ? n - b * QB : QB;
            const float *v = x + r * n + b * QB;
            float amax = 0.0f;
            int finite = 1;
            for (size_t j = 0; j < len; j++) {
                finite &= isfinite(v[j]) != 0;
                amax = fmaxf(amax, fabsf(v[j]));
            }
            float d = finite ? amax / 127.0f : NAN;
            memcpy(blk, &d, sizeof d);
            for (size_t j = 0; j < len; j++) {
                float q = d > 0.0f ? roundf(v[j] / d) : 0.0f;
                blk[4 + j] = (uint8_t)(int8_t)fmaxf(-127.0f, fminf(127.0f, q));
            }
        }
}

static float block_scale(const uint8_t *blk)
{
    float d;
    memcpy(&d, blk, sizeof d);
    return d;
}

/* src [rows, n] of dtype sdt from random data (a row of zeros, one of a
 * large and small magnitude mix); its stored values read back as f32. */
static atmoe_tensor *source(atmoe_context *ctx, atmoe_dtype sdt, size_t rows,
                            size_t n, test_rng *rng, float *stored)
{
    size_t shape[2] = {rows, n}, count = rows * n;
    float *x = malloc(count * sizeof *x);
    ck_assert(x);
    test_fill_uniform(rng, x, count, -3, 3);
    for (size_t j = 0; j < n; j++)
        x[j] = 0.0f; /* a zero row: d = 0 and q = 0 */
    if (rows > 2)
        for (size_t j = 0; j < n; j++)
            x[2 * n + j] *= j % 5 == 0 ? 100.0f : 0.01f;
    atmoe_tensor *f, *s;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, &f), ctx);
    ck_assert_status(atmoe_tensor_new(ctx, sdt, 2, shape, &s), ctx);
    ck_assert_status(atmoe_tensor_write(f, x, count * sizeof *x), ctx);
    ck_assert_status(atmoe_tensor_copy(s, f), ctx);
    ck_assert_status(atmoe_tensor_copy(f, s), ctx);
    ck_assert_status(atmoe_tensor_read(f, stored, count * sizeof *x), ctx);
    atmoe_tensor_free(f);
    free(x);
    return s;
}

/* Every source type at odd row lengths (53: a block and 21, 97: three
 * and 1, 7: one partial block) and a whole one (64). */
START_TEST(test_quantise_reference)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 808);
    static const atmoe_dtype src[] = {ATMOE_DTYPE_F32, ATMOE_DTYPE_BF16,
                                      ATMOE_DTYPE_F16};
    static const size_t shapes[][2] = {{5, 53}, {3, 97}, {4, 7}, {3, 64}};
    for (size_t si = 0; si < 3; si++)
        for (size_t k = 0; k < 4; k++) {
            size_t rows = shapes[k][0], n = shapes[k][1], count = rows * n;
            size_t shape[2] = {rows, n}, bytes = q8_bytes(rows, n);
            float *x = malloc(count * sizeof *x);
            uint8_t *want = malloc(bytes), *got = malloc(bytes);
            ck_assert(x && want && got);
            atmoe_tensor *s = source(ctx, src[si], rows, n, &rng, x);
            atmoe_tensor *q;
            ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_Q8, 2, shape,
                                              &q), ctx);
            size_t b;
            ck_assert_status(atmoe_tensor_get_bytes(q, &b), ctx);
            ck_assert_uint_eq(b, bytes);
            /* Poisoned: 0xff scales are NaN, so an unwritten block fails. */
            memset(got, 0xff, bytes);
            ck_assert_status(atmoe_tensor_write(q, got, bytes), ctx);
            ck_assert_status(atmoe_tensor_copy(q, s), ctx);
            ck_assert_status(atmoe_tensor_read(q, got, bytes), ctx);
            ref_quantise(x, rows, n, want);
            for (size_t i = 0; i < bytes; i += QBYTES) {
                float dg = block_scale(got + i), dw = block_scale(want + i);
                ck_assert_msg(memcmp(&dg, &dw, 4) == 0,
                              "%s [%zu, %zu] block %zu: scale %a, want %a",
                              atmoe_dtype_name(src[si]), rows, n, i / QBYTES,
                              dg, dw);
                for (size_t j = 4; j < QBYTES; j++)
                    ck_assert_msg(got[i + j] == want[i + j],
                                  "%s [%zu, %zu] block %zu value %zu: %d, "
                                  "want %d", atmoe_dtype_name(src[si]), rows,
                                  n, i / QBYTES, j - 4, (int8_t)got[i + j],
                                  (int8_t)want[i + j]);
            }
            /* Every value within half a step of the data (and of the
             * float rounding of x / d, which may fall either side of a
             * tie: 1e-3 of a step). */
            size_t nb = (n + QB - 1) / QB;
            for (size_t r = 0; r < rows; r++)
                for (size_t c = 0; c < n; c++) {
                    const uint8_t *blk = got + (r * nb + c / QB) * QBYTES;
                    double d = block_scale(blk);
                    double v = (int8_t)blk[4 + c % QB] * d;
                    ck_assert_msg(fabs(v - x[r * n + c]) <= 0.5 * d * (1 + 1e-3),
                                  "[%zu, %zu]: %g for %g (scale %g)", r, c, v,
                                  x[r * n + c], d);
                }

            /* Dequantised into f32 (q d, exactly as the host forms it),
             * bf16 and f16 (that rounded once more). */
            static const atmoe_dtype dst[] = {ATMOE_DTYPE_F32,
                                              ATMOE_DTYPE_BF16,
                                              ATMOE_DTYPE_F16};
            static const double tol[] = {0, 1.0 / 256, 1.0 / 2048};
            for (size_t di = 0; di < 3; di++) {
                atmoe_tensor *o, *f;
                ck_assert_status(atmoe_tensor_new(ctx, dst[di], 2, shape, &o),
                                 ctx);
                ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2,
                                                  shape, &f), ctx);
                ck_assert_status(atmoe_tensor_fill(o, NAN), ctx);
                ck_assert_status(atmoe_tensor_copy(o, q), ctx);
                ck_assert_status(atmoe_tensor_copy(f, o), ctx);
                float *back = malloc(count * sizeof *back);
                ck_assert(back);
                test_poison(back, count);
                ck_assert_status(atmoe_tensor_read(f, back, count * 4), ctx);
                for (size_t r = 0; r < rows; r++)
                    for (size_t c = 0; c < n; c++) {
                        const uint8_t *blk = got + (r * nb + c / QB) * QBYTES;
                        float w = (float)(int8_t)blk[4 + c % QB] *
                                  block_scale(blk);
                        float g = back[r * n + c];
                        ck_assert_msg(!isnan(g) &&
                                          fabs(g - w) <= tol[di] * fabs(w),
                                      "dequantised to %s [%zu, %zu]: %g, "
                                      "want %g", atmoe_dtype_name(dst[di]), r,
                                      c, g, w);
                    }
                free(back);
                atmoe_tensor_free(o);
                atmoe_tensor_free(f);
            }
            atmoe_tensor_free(q);
            atmoe_tensor_free(s);
            free(x);
            free(want);
            free(got);
        }
    atmoe_context_free(ctx);
}
END_TEST

/* A NaN or an infinity makes its block's scale NaN (never a finite
 * weight); the row's other blocks are untouched. */
START_TEST(test_quantise_not_finite)
{
    atmoe_context *ctx = test_context();
    const size_t n = 70, shape[2] = {2, 70};
    float x[140];
    for (size_t i = 0; i < 140; i++)
        x[i] = (float)((int)(i % 13) - 6) * 0.25f;
    x[40] = NAN;       /* row 0, block 1 */
    x[70 + 5] = INFINITY; /* row 1, block 0 */
    atmoe_tensor *f, *q;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, &f), ctx);
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_Q8, 2, shape, &q), ctx);
    ck_assert_status(atmoe_tensor_write(f, x, sizeof x), ctx);
    ck_assert_status(atmoe_tensor_copy(q, f), ctx);
    ck_assert_status(atmoe_tensor_fill(f, 0.0), ctx);
    ck_assert_status(atmoe_tensor_copy(f, q), ctx);
    float back[140];
    ck_assert_status(atmoe_tensor_read(f, back, sizeof back), ctx);
    for (size_t i = 0; i < 140; i++) {
        size_t r = i / n, b = (i % n) / QB;
        int bad = (r == 0 && b == 1) || (r == 1 && b == 0);
        ck_assert_msg(bad ? isnan(back[i]) : isfinite(back[i]),
                      "element %zu: %g", i, back[i]);
    }
    atmoe_tensor_free(f);
    atmoe_tensor_free(q);
    atmoe_context_free(ctx);
}
END_TEST

/* Sizes and raw blocks: the dtype has no per-element size, a tensor's
 * bytes are whole blocks per row, and raw writes read back as written. */
START_TEST(test_bytes_and_raw)
{
    atmoe_context *ctx = test_context();
    ck_assert_uint_eq(atmoe_dtype_size(ATMOE_DTYPE_Q8), 0);
    ck_assert_str_eq(atmoe_dtype_name(ATMOE_DTYPE_Q8), "q8");
    const size_t s3[3] = {2, 3, 33}, s1[1] = {31};
    atmoe_tensor *q, *v;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_Q8, 3, s3, &q), ctx);
    size_t b;
    ck_assert_status(atmoe_tensor_get_bytes(q, &b), ctx);
    ck_assert_uint_eq(b, 6 * 2 * QBYTES);
    uint8_t raw[6 * 2 * QBYTES], back[sizeof raw];
    for (size_t i = 0; i < sizeof raw; i++)
        raw[i] = (uint8_t)(i * 37 + 11);
    ck_assert_status(atmoe_tensor_write(q, raw, sizeof raw), ctx);
    ck_assert_status(atmoe_tensor_read(q, back, sizeof back), ctx);
    ck_assert(memcmp(raw, back, sizeof raw) == 0);
    ck_assert_fails(atmoe_tensor_write(q, raw, 2 * 3 * 33), ctx,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    /* The whole of it is its one view. */
    const size_t zero[3] = {0, 0, 0}, part[3] = {1, 3, 33};
    ck_assert_status(atmoe_tensor_view(q, zero, s3, &v), ctx);
    atmoe_tensor_free(v);
    ck_assert_fails(atmoe_tensor_view(q, zero, part, &v), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);
    atmoe_tensor_free(q);
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_Q8, 1, s1, &q), ctx);
    ck_assert_status(atmoe_tensor_get_bytes(q, &b), ctx);
    ck_assert_uint_eq(b, QBYTES);
    atmoe_tensor_free(q);
    /* Rows of one element take a block each: a count within the element
     * bound whose blocks overflow is refused. */
    const size_t huge[2] = {SIZE_MAX / 16, 1};
    ck_assert_fails_with(atmoe_tensor_new(ctx, ATMOE_DTYPE_Q8, 2, huge, &q),
                         ctx, ATMOE_STATUS_OUT_OF_RANGE, "overflow");
    atmoe_context_free(ctx);
}
END_TEST

/* What a q8 tensor is not: reshaped, filled, copied into q8 or i32, a
 * graph's input or constant, an expert set's storage, an element-wise or
 * layout operand; a cast to f32 dequantises it. */
START_TEST(test_refusals)
{
    atmoe_context *ctx = test_context();
    const size_t s[2] = {3, 45}, r[2] = {45, 3};
    atmoe_tensor *q, *q2, *i, *t;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_Q8, 2, s, &q), ctx);
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_Q8, 2, s, &q2), ctx);
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_I32, 2, s, &i), ctx);
    ck_assert_fails_with(atmoe_tensor_reshape(q, 2, r, &t), ctx,
                         ATMOE_STATUS_DTYPE_MISMATCH, "q8");
    ck_assert_fails_with(atmoe_tensor_fill(q, 1.0), ctx,
                         ATMOE_STATUS_DTYPE_MISMATCH, "q8");
    ck_assert_fails(atmoe_tensor_copy(q2, q), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);
    ck_assert_fails(atmoe_tensor_copy(i, q), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);
    ck_assert_fails(atmoe_tensor_copy(q, i), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);

    /* A weight from f32 data, through a graph: cast to f32 reads it
     * dequantised; layout and element-wise operations refuse it. */
    float x[135], back[135], want[135];
    for (size_t k = 0; k < 135; k++)
        x[k] = (float)sin((double)k * 0.7) * 2.0f;
    atmoe_tensor *f;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, s, &f), ctx);
    ck_assert_status(atmoe_tensor_write(f, x, sizeof x), ctx);
    ck_assert_status(atmoe_tensor_copy(q, f), ctx);
    ck_assert_status(atmoe_tensor_copy(f, q), ctx);
    ck_assert_status(atmoe_tensor_read(f, want, sizeof want), ctx);
    atmoe_graph *g;
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    atmoe_node w, c, o;
    ck_assert_status(atmoe_graph_parameter(g, "w", q, &w), ctx);
    ck_assert_fails_with(atmoe_graph_input(g, "x", ATMOE_DTYPE_Q8, 2, s, 0,
                                           &o), ctx,
                         ATMOE_STATUS_DTYPE_MISMATCH, "q8");
    ck_assert_fails_with(atmoe_graph_constant(g, "k", ATMOE_DTYPE_Q8, 2, s,
                                              x, &o), ctx,
                         ATMOE_STATUS_DTYPE_MISMATCH, "q8");
    ck_assert_fails_with(atmoe_graph_transpose(g, w, 0, 1, &o), ctx,
                         ATMOE_STATUS_DTYPE_MISMATCH, "q8");
    ck_assert_fails_with(atmoe_graph_reshape(g, w, 2, r, &o), ctx,
                         ATMOE_STATUS_DTYPE_MISMATCH, "q8");
    ck_assert_fails_with(atmoe_graph_add(g, w, w, &o), ctx,
                         ATMOE_STATUS_DTYPE_MISMATCH, "q8");
    ck_assert_fails(atmoe_graph_cast(g, w, ATMOE_DTYPE_Q8, &o), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);
    ck_assert_status(atmoe_graph_cast(g, w, ATMOE_DTYPE_F32, &c), ctx);
    ck_assert_status(atmoe_graph_mark_output(g, c), ctx);
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    ck_assert_status(atmoe_graph_compute(g, 0), ctx);
    test_poison(back, 135);
    ck_assert_status(atmoe_graph_read(g, c, back, sizeof back), ctx);
    ck_assert(memcmp(back, want, sizeof back) == 0);
    atmoe_graph_free(g);

    /* Expert sets keep f32, f16 or bf16. */
    atmoe_experts *set;
    ck_assert_status(atmoe_experts_new(ctx, 45, 3, &set), ctx);
    ck_assert_fails(atmoe_experts_set_dtype(set, ATMOE_DTYPE_Q8,
                                            ATMOE_DTYPE_F32), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);
    ck_assert_fails(atmoe_experts_set_dtype(set, ATMOE_DTYPE_F32,
                                            ATMOE_DTYPE_Q8), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);
    atmoe_experts_free(set);
    atmoe_tensor_free(f);
    atmoe_tensor_free(q);
    atmoe_tensor_free(q2);
    atmoe_tensor_free(i);
    atmoe_context_free(ctx);
}
END_TEST

static Suite *q8_suite(void)
{
    Suite *s = suite_create("q8");
    TCase *tc = tcase_create("quantise");
    tcase_add_test(tc, test_quantise_reference);
    tcase_add_test(tc, test_quantise_not_finite);
    tcase_add_test(tc, test_bytes_and_raw);
    suite_add_tcase(s, tc);
    tc = tcase_create("bad_input");
    tcase_add_test(tc, test_refusals);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(q8_suite());
}
