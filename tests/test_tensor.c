/* Tests of the tensor API: round trips, views, reshape, fill and copy on the
 * default device, with the kernels really running there.
 *
 * Every read goes into a host buffer poisoned first with values that cannot
 * match the expected result (NaN for f32, the bitwise complement of the
 * expected bytes for f16 and i32), so an element the library forgets to
 * write always fails.  Views are checked against host slices computed
 * independently here, and writes through views are checked over the whole
 * parent, so that a stray write outside the block fails too.  Half precision
 * is checked bit for bit against a float64-based round-to-nearest-even
 * reference. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* ------------------------------------------------------------------------ */
/* Host helpers                                                              */
/* ------------------------------------------------------------------------ */

static const atmoe_dtype all_dtypes[] = {ATMOE_DTYPE_F32, ATMOE_DTYPE_F16,
                                         ATMOE_DTYPE_I32};
#define N_DTYPES (sizeof all_dtypes / sizeof all_dtypes[0])

static size_t shape_count(int ndim, const size_t *shape)
{
    size_t n = 1;
    for (int i = 0; i < ndim; i++)
        n *= shape[i];
    return n;
}

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    ck_assert_msg(p != NULL, "out of host memory (%zu bytes)", bytes);
    return p;
}

/* The value of a half's bits, exactly (every half is a double). */
static double half_to_double(uint16_t h)
{
    int exp = (h >> 10) & 0x1f;
    int man = h & 0x3ff;
    double v;
    if (exp == 0)
        v = ldexp(man, -24);
    else if (exp == 31)
        v = man ? NAN : INFINITY;
    else
        v = ldexp(man + 1024, exp - 25);
    return (h & 0x8000) ? -v : v;
}

/* The half nearest x, ties to even, rounded once from the exact value.
 * k is the exponent of x's binade, clamped to the smallest normal one so
 * that subnormals share its quantum of 2^-24; scaling x so that one quantum
 * is 1 turns the rounding into nearbyint (round-to-nearest-even by default),
 * and ((k + 14) << 10) + r encodes normals and subnormals alike, a carry into
 * the next binade included. */
static uint16_t half_from_double(double x)
{
    uint16_t sign = signbit(x) ? 0x8000 : 0;
    if (isnan(x))
        return 0x7e00;
    double a = fabs(x);
    if (a >= 65520.0) /* halfway between 65504 and 2^16, ties to even: inf */
        return sign | 0x7c00;
    int k = -14;
    if (a > 0) {
        int e;
        frexp(a, &e);
        if (e - 1 > k)
            k = e - 1;
    }
    double r = nearbyint(ldexp(a, 10 - k));
    return (uint16_t)(sign | (unsigned)(((k + 14) << 10) + (int)r));
}

static uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* The element's bits as a number, for messages. */
static unsigned long element_bits(const void *p, size_t es)
{
    if (es == 2) {
        uint16_t h;
        memcpy(&h, p, 2);
        return h;
    }
    uint32_t u;
    memcpy(&u, p, 4);
    return u;
}

/* Fails at the first element whose bytes differ, naming it. */
static void expect_same(const void *got, const void *want, size_t n,
                        size_t es, const char *what)
{
    const unsigned char *g = got, *w = want;
    for (size_t i = 0; i < n; i++)
        if (memcmp(g + i * es, w + i * es, es) != 0)
            ck_abort_msg("%s: element %zu of %zu is 0x%lx, expected 0x%lx",
                         what, i, n, element_bits(g + i * es, es),
                         element_bits(w + i * es, es));
}

/* Poison for a read whose expected bytes are known: every byte flipped, so
 * that no element can pass without having been written. */
static void poison_unlike(void *dst, const void *want, size_t bytes)
{
    unsigned char *d = dst;
    const unsigned char *w = want;
    for (size_t i = 0; i < bytes; i++)
        d[i] = (unsigned char)~w[i];
}

/* Random data of a dtype: floats in [-4, 4), halves rounded from such
 * floats, integers over the whole i32 range. */
static void random_data(test_rng *rng, atmoe_dtype dtype, void *x, size_t n)
{
    if (dtype == ATMOE_DTYPE_F32) {
        test_fill_uniform(rng, x, n, -4, 4);
    } else if (dtype == ATMOE_DTYPE_F16) {
        uint16_t *h = x;
        for (size_t i = 0; i < n; i++)
            h[i] = half_from_double(test_uniform(rng, -4, 4));
    } else {
        int32_t *v = x;
        for (size_t i = 0; i < n; i++)
            v[i] = (int32_t)floor(test_uniform(rng, -2147483648.0,
                                               2147483648.0));
    }
}

/* The element a fill with value must leave, in the dtype's bytes. */
static void fill_bits(atmoe_dtype dtype, double value, void *out)
{
    if (dtype == ATMOE_DTYPE_F32) {
        float f = (float)value;
        memcpy(out, &f, 4);
    } else if (dtype == ATMOE_DTYPE_F16) {
        uint16_t h = half_from_double(value);
        memcpy(out, &h, 2);
    } else {
        int32_t v = (int32_t)value;
        memcpy(out, &v, 4);
    }
}

/* Offset, in elements of a dense row-major array of shape pshape, of
 * element i (in row-major order) of the block at start[] of shape[]. */
static size_t block_offset(size_t i, int ndim, const size_t *pshape,
                           const size_t *start, const size_t *shape)
{
    size_t off = 0, stride = 1;
    for (int d = ndim - 1; d >= 0; d--) {
        off += (start[d] + i % shape[d]) * stride;
        i /= shape[d];
        stride *= pshape[d];
    }
    return off;
}

/* Copies a block of a dense host array out into dense memory... */
static void host_gather(const void *parent, int ndim, const size_t *pshape,
                        const size_t *start, const size_t *shape, size_t es,
                        void *out)
{
    size_t n = shape_count(ndim, shape);
    for (size_t i = 0; i < n; i++)
        memcpy((char *)out + i * es,
               (const char *)parent +
                   block_offset(i, ndim, pshape, start, shape) * es,
               es);
}

/* ...and back in. */
static void host_scatter(void *parent, int ndim, const size_t *pshape,
                         const size_t *start, const size_t *shape, size_t es,
                         const void *in)
{
    size_t n = shape_count(ndim, shape);
    for (size_t i = 0; i < n; i++)
        memcpy((char *)parent +
                   block_offset(i, ndim, pshape, start, shape) * es,
               (const char *)in + i * es, es);
}

/* Sets every element of a block of a dense host array to one value. */
static void host_fill_block(void *parent, int ndim, const size_t *pshape,
                            const size_t *start, const size_t *shape,
                            size_t es, const void *value)
{
    size_t n = shape_count(ndim, shape);
    for (size_t i = 0; i < n; i++)
        memcpy((char *)parent +
                   block_offset(i, ndim, pshape, start, shape) * es,
               value, es);
}

/* Reads a whole tensor into a poisoned buffer and compares it with want. */
static void expect_tensor(atmoe_context *ctx, const atmoe_tensor *t,
                          const void *want, size_t n, atmoe_dtype dtype,
                          const char *what)
{
    size_t es = atmoe_dtype_size(dtype);
    void *got = xmalloc(n * es);
    if (dtype == ATMOE_DTYPE_F32)
        test_poison(got, n);
    else
        poison_unlike(got, want, n * es);
    ck_assert_status(atmoe_tensor_read(t, got, n * es), ctx);
    expect_same(got, want, n, es, what);
    free(got);
}

/* Creates a tensor and writes data into it. */
static atmoe_tensor *new_tensor_with(atmoe_context *ctx, atmoe_dtype dtype,
                                     int ndim, const size_t *shape,
                                     const void *data)
{
    atmoe_tensor *t = NULL;
    ck_assert_status(atmoe_tensor_new(ctx, dtype, ndim, shape, &t), ctx);
    ck_assert_ptr_nonnull(t);
    if (data != NULL)
        ck_assert_status(atmoe_tensor_write(t, data,
                                            shape_count(ndim, shape) *
                                                atmoe_dtype_size(dtype)),
                         ctx);
    return t;
}

/* Asserts a tensor's shape, dtype and count through the getters. */
static void expect_shape(atmoe_context *ctx, const atmoe_tensor *t,
                         atmoe_dtype dtype, int ndim, const size_t *shape)
{
    int got_ndim = -1;
    size_t got_shape[ATMOE_MAX_DIMS], count = 0;
    atmoe_dtype got_dtype = (atmoe_dtype)-1;
    for (int i = 0; i < ATMOE_MAX_DIMS; i++)
        got_shape[i] = SIZE_MAX - (size_t)i;
    ck_assert_status(atmoe_tensor_get_shape(t, &got_ndim, got_shape), ctx);
    ck_assert_int_eq(got_ndim, ndim);
    for (int i = 0; i < ndim; i++)
        ck_assert_msg(got_shape[i] == shape[i],
                      "dimension %d is %zu, expected %zu", i, got_shape[i],
                      shape[i]);
    /* atmoe_tensor_get_shape(3): the entries past ndim are left alone. */
    for (int i = ndim; i < ATMOE_MAX_DIMS; i++)
        ck_assert_msg(got_shape[i] == SIZE_MAX - (size_t)i,
                      "get_shape wrote entry %d past ndim %d", i, ndim);
    ck_assert_status(atmoe_tensor_get_dtype(t, &got_dtype), ctx);
    ck_assert_int_eq(got_dtype, dtype);
    ck_assert_status(atmoe_tensor_get_count(t, &count), ctx);
    ck_assert_uint_eq(count, shape_count(ndim, shape));
}

/* Set into an out pointer before a call that must fail, which must reset
 * it to NULL (the man pages promise that); never dereferenced. */
static char not_a_tensor;
#define SENTINEL ((atmoe_tensor *)(void *)&not_a_tensor)

/* ck_assert_fails for a call with an out pointer, which must come back
 * NULL. */
#define ck_assert_fails_out(expr, ctx, want, out)                             \
    do {                                                                      \
        (out) = SENTINEL;                                                     \
        ck_assert_fails(expr, ctx, want);                                     \
        ck_assert_msg((out) == NULL, "%s left %s set", #expr, #out);          \
    } while (0)

/* Shapes for round trips: odd sizes in 1 to 4 dimensions. */
static const struct {
    int ndim;
    size_t shape[ATMOE_MAX_DIMS];
} odd_shapes[] = {
    {1, {37}},
    {2, {13, 29}},
    {3, {3, 7, 11}},
    {4, {2, 3, 5, 7}},
    {4, {1, 1, 1, 1}},
};
#define N_ODD_SHAPES (sizeof odd_shapes / sizeof odd_shapes[0])

/* Blocks of parents for the view tests: odd starts and shapes, blocks that
 * are contiguous and blocks that are not, and size-1 dimensions at the start,
 * in the middle and at the end (which the strided transfers drop or keep). */
typedef struct view_case {
    int ndim;
    size_t parent[ATMOE_MAX_DIMS];
    size_t start[ATMOE_MAX_DIMS];
    size_t shape[ATMOE_MAX_DIMS];
} view_case;

static const view_case view_cases[] = {
    {1, {37}, {5}, {19}},
    {2, {13, 29}, {3, 5}, {7, 11}},
    {2, {13, 29}, {12, 0}, {1, 29}},  /* the last row: contiguous */
    {2, {13, 29}, {0, 28}, {13, 1}},  /* the last column */
    {3, {5, 6, 7}, {1, 2, 3}, {3, 3, 4}},
    {3, {5, 6, 7}, {1, 2, 3}, {3, 1, 4}}, /* size 1 in the middle */
    {3, {5, 6, 7}, {1, 2, 3}, {2, 4, 1}}, /* size 1 at the end */
    {3, {5, 6, 7}, {1, 0, 0}, {3, 6, 7}}, /* whole planes: contiguous */
    {3, {5, 6, 7}, {2, 1, 0}, {2, 4, 7}}, /* whole rows, not contiguous */
    {3, {5, 6, 7}, {4, 5, 6}, {1, 1, 1}}, /* the last element */
    {4, {3, 4, 5, 7}, {1, 1, 2, 3}, {2, 3, 3, 4}},
    {4, {2, 3, 5, 7}, {0, 1, 1, 2}, {2, 1, 3, 4}},
    {4, {2, 3, 5, 7}, {1, 0, 2, 1}, {1, 3, 1, 5}},
    {4, {2, 3, 5, 7}, {0, 2, 4, 6}, {2, 1, 1, 1}},
};
#define N_VIEW_CASES (sizeof view_cases / sizeof view_cases[0])

/* ------------------------------------------------------------------------ */
/* Round trips                                                               */
/* ------------------------------------------------------------------------ */

START_TEST(test_roundtrip_f32)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 1);
    for (size_t c = 0; c < N_ODD_SHAPES; c++) {
        int ndim = odd_shapes[c].ndim;
        const size_t *shape = odd_shapes[c].shape;
        size_t n = shape_count(ndim, shape);
        float *x = xmalloc(n * sizeof *x);
        test_fill_uniform(&rng, x, n, -4, 4);
        atmoe_tensor *t = new_tensor_with(ctx, ATMOE_DTYPE_F32, ndim, shape,
                                          x);
        expect_shape(ctx, t, ATMOE_DTYPE_F32, ndim, shape);
        char what[64];
        snprintf(what, sizeof what, "f32 round trip, shape %zu", c);
        expect_tensor(ctx, t, x, n, ATMOE_DTYPE_F32, what);
        atmoe_tensor_free(t);
        free(x);
    }
    atmoe_context_free(ctx);
}
END_TEST

/* Raw half bits go through untouched: NaNs with payloads, infinities,
 * subnormals and negative zero included. */
START_TEST(test_roundtrip_f16)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 2);
    static const uint16_t special[] = {0x0000, 0x8000, 0x0001, 0x03ff, 0x0400,
                                       0x3c00, 0x7bff, 0x7c00, 0xfc00, 0x7c01,
                                       0x7e00, 0xffff};
    for (size_t c = 0; c < N_ODD_SHAPES; c++) {
        int ndim = odd_shapes[c].ndim;
        const size_t *shape = odd_shapes[c].shape;
        size_t n = shape_count(ndim, shape);
        uint16_t *x = xmalloc(n * sizeof *x);
        for (size_t i = 0; i < n; i++)
            x[i] = i < sizeof special / sizeof special[0]
                       ? special[i]
                       : (uint16_t)test_uniform(&rng, 0, 65536);
        atmoe_tensor *t = new_tensor_with(ctx, ATMOE_DTYPE_F16, ndim, shape,
                                          x);
        expect_shape(ctx, t, ATMOE_DTYPE_F16, ndim, shape);
        char what[64];
        snprintf(what, sizeof what, "f16 round trip, shape %zu", c);
        expect_tensor(ctx, t, x, n, ATMOE_DTYPE_F16, what);
        atmoe_tensor_free(t);
        free(x);
    }
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_roundtrip_i32)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 3);
    for (size_t c = 0; c < N_ODD_SHAPES; c++) {
        int ndim = odd_shapes[c].ndim;
        const size_t *shape = odd_shapes[c].shape;
        size_t n = shape_count(ndim, shape);
        int32_t *x = xmalloc(n * sizeof *x);
        random_data(&rng, ATMOE_DTYPE_I32, x, n);
        x[0] = INT32_MIN;
        if (n > 2) {
            x[1] = INT32_MAX;
            x[2] = -1;
        }
        atmoe_tensor *t = new_tensor_with(ctx, ATMOE_DTYPE_I32, ndim, shape,
                                          x);
        expect_shape(ctx, t, ATMOE_DTYPE_I32, ndim, shape);
        char what[64];
        snprintf(what, sizeof what, "i32 round trip, shape %zu", c);
        expect_tensor(ctx, t, x, n, ATMOE_DTYPE_I32, what);
        atmoe_tensor_free(t);
        free(x);
    }
    atmoe_context_free(ctx);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Views                                                                     */
/* ------------------------------------------------------------------------ */

/* Reading a view gives the host slice; writing through it changes the
 * parent in the block and nowhere else; for every case and dtype. */
START_TEST(test_view_read_write)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 4);
    for (size_t c = 0; c < N_VIEW_CASES; c++) {
        const view_case *vc = &view_cases[c];
        size_t np = shape_count(vc->ndim, vc->parent);
        size_t nv = shape_count(vc->ndim, vc->shape);
        for (size_t d = 0; d < N_DTYPES; d++) {
            atmoe_dtype dtype = all_dtypes[d];
            size_t es = atmoe_dtype_size(dtype);
            char *host = xmalloc(np * es);
            char *slice = xmalloc(nv * es);
            char *block = xmalloc(nv * es);
            char what[96];
            random_data(&rng, dtype, host, np);
            atmoe_tensor *p = new_tensor_with(ctx, dtype, vc->ndim,
                                              vc->parent, host);
            atmoe_tensor *v = NULL;
            ck_assert_status(atmoe_tensor_view(p, vc->start, vc->shape, &v),
                             ctx);
            expect_shape(ctx, v, dtype, vc->ndim, vc->shape);

            host_gather(host, vc->ndim, vc->parent, vc->start, vc->shape, es,
                        slice);
            snprintf(what, sizeof what, "read of view case %zu (%s)", c,
                     atmoe_dtype_name(dtype));
            expect_tensor(ctx, v, slice, nv, dtype, what);

            random_data(&rng, dtype, block, nv);
            ck_assert_status(atmoe_tensor_write(v, block, nv * es), ctx);
            host_scatter(host, vc->ndim, vc->parent, vc->start, vc->shape, es,
                         block);
            snprintf(what, sizeof what,
                     "parent after a write to view case %zu (%s)", c,
                     atmoe_dtype_name(dtype));
            expect_tensor(ctx, p, host, np, dtype, what);
            snprintf(what, sizeof what, "view case %zu (%s) after its write",
                     c, atmoe_dtype_name(dtype));
            expect_tensor(ctx, v, block, nv, dtype, what);

            atmoe_tensor_free(v);
            atmoe_tensor_free(p);
            free(block);
            free(slice);
            free(host);
        }
    }
    atmoe_context_free(ctx);
}
END_TEST

/* A view of a view adds the starts up, and writes through it land in the
 * original parent. */
START_TEST(test_view_of_view)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 5);
    const size_t pshape[3] = {5, 6, 7};
    const size_t s1[3] = {1, 1, 1}, sh1[3] = {4, 5, 5};
    const size_t s2[3] = {1, 2, 1}, sh2[3] = {2, 3, 3};
    const size_t total[3] = {2, 3, 2}; /* s1 + s2 in the parent */
    size_t np = shape_count(3, pshape), n2 = shape_count(3, sh2);
    float *host = xmalloc(np * sizeof *host);
    float *want = xmalloc(n2 * sizeof *want);
    test_fill_uniform(&rng, host, np, -4, 4);
    atmoe_tensor *p = new_tensor_with(ctx, ATMOE_DTYPE_F32, 3, pshape, host);
    atmoe_tensor *v1 = NULL, *v2 = NULL;
    ck_assert_status(atmoe_tensor_view(p, s1, sh1, &v1), ctx);
    ck_assert_status(atmoe_tensor_view(v1, s2, sh2, &v2), ctx);
    expect_shape(ctx, v2, ATMOE_DTYPE_F32, 3, sh2);
    host_gather(host, 3, pshape, total, sh2, 4, want);
    expect_tensor(ctx, v2, want, n2, ATMOE_DTYPE_F32, "view of a view");

    test_fill_uniform(&rng, want, n2, -4, 4);
    ck_assert_status(atmoe_tensor_write(v2, want, n2 * sizeof *want), ctx);
    host_scatter(host, 3, pshape, total, sh2, 4, want);
    expect_tensor(ctx, p, host, np, ATMOE_DTYPE_F32,
                  "parent after a write through a view of a view");

    /* A view of a view must still fit the inner view, not just the parent. */
    const size_t s3[3] = {3, 0, 0}, sh3[3] = {2, 1, 1};
    atmoe_tensor *v3 = NULL;
    ck_assert_fails_out(atmoe_tensor_view(v1, s3, sh3, &v3),
                        ctx, ATMOE_STATUS_SHAPE_MISMATCH, v3);

    atmoe_tensor_free(v2);
    atmoe_tensor_free(v1);
    atmoe_tensor_free(p);
    free(want);
    free(host);
    atmoe_context_free(ctx);
}
END_TEST

/* A view keeps its parent's storage alive. */
START_TEST(test_view_outlives_parent)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 6);
    const size_t pshape[2] = {13, 29}, start[2] = {3, 5}, shape[2] = {7, 11};
    const size_t start2[2] = {2, 3}, shape2[2] = {3, 5};
    size_t np = shape_count(2, pshape), nv = shape_count(2, shape);
    size_t n2 = shape_count(2, shape2);
    float *host = xmalloc(np * sizeof *host);
    float *want = xmalloc(nv * sizeof *want);
    float *want2 = xmalloc(n2 * sizeof *want2);
    test_fill_uniform(&rng, host, np, -4, 4);
    atmoe_tensor *p = new_tensor_with(ctx, ATMOE_DTYPE_F32, 2, pshape, host);
    atmoe_tensor *v = NULL, *v2 = NULL;
    ck_assert_status(atmoe_tensor_view(p, start, shape, &v), ctx);
    atmoe_tensor_free(p);

    host_gather(host, 2, pshape, start, shape, 4, want);
    expect_tensor(ctx, v, want, nv, ATMOE_DTYPE_F32,
                  "view read after its parent was freed");
    test_fill_uniform(&rng, want, nv, -4, 4);
    ck_assert_status(atmoe_tensor_write(v, want, nv * sizeof *want), ctx);
    expect_tensor(ctx, v, want, nv, ATMOE_DTYPE_F32,
                  "view written after its parent was freed");

    /* And a view of the orphan still works, fill and all. */
    ck_assert_status(atmoe_tensor_view(v, start2, shape2, &v2), ctx);
    host_gather(want, 2, shape, start2, shape2, 4, want2);
    expect_tensor(ctx, v2, want2, n2, ATMOE_DTYPE_F32,
                  "view of a view whose parent was freed");
    atmoe_tensor_free(v);
    ck_assert_status(atmoe_tensor_fill(v2, 2.5), ctx);
    for (size_t i = 0; i < n2; i++)
        want2[i] = 2.5f;
    expect_tensor(ctx, v2, want2, n2, ATMOE_DTYPE_F32,
                  "fill of the last view of a freed parent");
    atmoe_tensor_free(v2);
    free(want2);
    free(want);
    free(host);
    atmoe_context_free(ctx);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Reshape                                                                   */
/* ------------------------------------------------------------------------ */

START_TEST(test_reshape_contiguous)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 7);
    const size_t shape[3] = {3, 7, 11};
    size_t n = shape_count(3, shape);
    float *x = xmalloc(n * sizeof *x);
    test_fill_uniform(&rng, x, n, -4, 4);
    atmoe_tensor *t = new_tensor_with(ctx, ATMOE_DTYPE_F32, 3, shape, x);

    static const struct {
        int ndim;
        size_t shape[ATMOE_MAX_DIMS];
    } targets[] = {
        {1, {231}}, {2, {21, 11}}, {3, {7, 3, 11}}, {4, {3, 7, 1, 11}},
        {4, {1, 1, 1, 231}},
    };
    for (size_t c = 0; c < sizeof targets / sizeof targets[0]; c++) {
        atmoe_tensor *r = NULL;
        ck_assert_status(atmoe_tensor_reshape(t, targets[c].ndim,
                                              targets[c].shape, &r),
                         ctx);
        expect_shape(ctx, r, ATMOE_DTYPE_F32, targets[c].ndim,
                     targets[c].shape);
        char what[64];
        snprintf(what, sizeof what, "reshape %zu", c);
        expect_tensor(ctx, r, x, n, ATMOE_DTYPE_F32, what);
        atmoe_tensor_free(r);
    }

    /* A reshape shares storage: a write through it shows in the original,
     * and a view of a reshape addresses the new shape. */
    const size_t flat[2] = {21, 11}, vstart[2] = {4, 2}, vshape[2] = {9, 5};
    atmoe_tensor *r = NULL, *rv = NULL;
    ck_assert_status(atmoe_tensor_reshape(t, 2, flat, &r), ctx);
    test_fill_uniform(&rng, x, n, -4, 4);
    ck_assert_status(atmoe_tensor_write(r, x, n * sizeof *x), ctx);
    expect_tensor(ctx, t, x, n, ATMOE_DTYPE_F32,
                  "original after a write through the reshape");
    ck_assert_status(atmoe_tensor_view(r, vstart, vshape, &rv), ctx);
    float *slice = xmalloc(shape_count(2, vshape) * sizeof *slice);
    host_gather(x, 2, flat, vstart, vshape, 4, slice);
    expect_tensor(ctx, rv, slice, shape_count(2, vshape), ATMOE_DTYPE_F32,
                  "view of a reshape");
    free(slice);
    atmoe_tensor_free(rv);

    /* The reshape outlives the original. */
    atmoe_tensor_free(t);
    expect_tensor(ctx, r, x, n, ATMOE_DTYPE_F32,
                  "reshape read after the original was freed");
    atmoe_tensor_free(r);
    free(x);
    atmoe_context_free(ctx);
}
END_TEST

/* Views that happen to be contiguous (whole rows, or one run) may be
 * reshaped, and keep their offset into the parent. */
START_TEST(test_reshape_contiguous_view)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 8);
    const size_t pshape[3] = {5, 6, 7};
    size_t np = shape_count(3, pshape);
    int32_t *host = xmalloc(np * sizeof *host);
    random_data(&rng, ATMOE_DTYPE_I32, host, np);
    atmoe_tensor *p = new_tensor_with(ctx, ATMOE_DTYPE_I32, 3, pshape, host);

    static const struct {
        size_t start[3], shape[3];
        int ndim;
        size_t reshape[ATMOE_MAX_DIMS];
    } cases[] = {
        {{1, 0, 0}, {3, 6, 7}, 2, {9, 14}},
        {{2, 1, 0}, {1, 4, 7}, 1, {28}},
        {{1, 2, 3}, {1, 1, 4}, 2, {2, 2}},
        {{4, 5, 6}, {1, 1, 1}, 4, {1, 1, 1, 1}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        size_t nv = shape_count(3, cases[c].shape);
        int32_t *want = xmalloc(nv * sizeof *want);
        atmoe_tensor *v = NULL, *r = NULL;
        ck_assert_status(atmoe_tensor_view(p, cases[c].start, cases[c].shape,
                                           &v),
                         ctx);
        ck_assert_status(atmoe_tensor_reshape(v, cases[c].ndim,
                                              cases[c].reshape, &r),
                         ctx);
        expect_shape(ctx, r, ATMOE_DTYPE_I32, cases[c].ndim,
                     cases[c].reshape);
        host_gather(host, 3, pshape, cases[c].start, cases[c].shape, 4, want);
        char what[64];
        snprintf(what, sizeof what, "reshape of contiguous view %zu", c);
        expect_tensor(ctx, r, want, nv, ATMOE_DTYPE_I32, what);
        atmoe_tensor_free(r);
        atmoe_tensor_free(v);
        free(want);
    }
    atmoe_tensor_free(p);
    free(host);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_reshape_refusals)
{
    atmoe_context *ctx = test_context();
    const size_t pshape[3] = {5, 6, 7};
    atmoe_tensor *p = NULL;
    ck_assert_status(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 3, pshape, &p),
                     ctx);

    /* Not contiguous: rows of a block, a column, a size-1 middle. */
    static const struct {
        size_t start[3], shape[3];
        size_t flat;
    } views[] = {
        {{1, 2, 3}, {3, 3, 4}, 36},
        {{0, 0, 6}, {5, 6, 1}, 30},
        {{1, 2, 3}, {3, 1, 4}, 12},
        {{2, 1, 0}, {2, 4, 7}, 56},
    };
    for (size_t c = 0; c < sizeof views / sizeof views[0]; c++) {
        atmoe_tensor *v = NULL, *r = NULL;
        ck_assert_status(atmoe_tensor_view(p, views[c].start, views[c].shape,
                                           &v),
                         ctx);
        ck_assert_fails_out(atmoe_tensor_reshape(v, 1, &views[c].flat, &r),
                            ctx, ATMOE_STATUS_INVALID_ARGUMENT, r);
        atmoe_tensor_free(v);
    }

    /* Wrong element counts. */
    const size_t fewer[1] = {209}, more[2] = {211, 1}, other[3] = {7, 6, 6};
    atmoe_tensor *r = NULL;
    ck_assert_fails_out(atmoe_tensor_reshape(p, 1, fewer, &r),
                        ctx, ATMOE_STATUS_SHAPE_MISMATCH, r);
    ck_assert_fails_out(atmoe_tensor_reshape(p, 2, more, &r),
                        ctx, ATMOE_STATUS_SHAPE_MISMATCH, r);
    ck_assert_fails_out(atmoe_tensor_reshape(p, 3, other, &r),
                        ctx, ATMOE_STATUS_SHAPE_MISMATCH, r);

    /* Bad ranks and dimensions, as for atmoe_tensor_new. */
    const size_t five[5] = {210, 1, 1, 1, 1}, zero[2] = {210, 0};
    const size_t huge[4] = {65536, 65536, 65536, 65536};
    ck_assert_fails_out(atmoe_tensor_reshape(p, 0, five, &r),
                        ctx, ATMOE_STATUS_INVALID_ARGUMENT, r);
    ck_assert_fails_out(atmoe_tensor_reshape(p, 5, five, &r),
                        ctx, ATMOE_STATUS_INVALID_ARGUMENT, r);
    ck_assert_fails_out(atmoe_tensor_reshape(p, 2, zero, &r),
                        ctx, ATMOE_STATUS_SHAPE_MISMATCH, r);
    ck_assert_fails_out(atmoe_tensor_reshape(p, 4, huge, &r),
                        ctx, ATMOE_STATUS_OUT_OF_RANGE, r);

    atmoe_tensor_free(p);
    atmoe_context_free(ctx);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Fill                                                                      */
/* ------------------------------------------------------------------------ */

START_TEST(test_fill_whole)
{
    atmoe_context *ctx = test_context();
    static const struct {
        atmoe_dtype dtype;
        double value;
    } fills[] = {
        {ATMOE_DTYPE_F32, -1.75},      {ATMOE_DTYPE_F32, 0.1},
        {ATMOE_DTYPE_F32, 3.0e38},     {ATMOE_DTYPE_F16, -2.5},
        {ATMOE_DTYPE_F16, 0.1},        {ATMOE_DTYPE_F16, 1.0e-6},
        {ATMOE_DTYPE_F16, 65504.0},    {ATMOE_DTYPE_I32, -7},
        {ATMOE_DTYPE_I32, 2147483647}, {ATMOE_DTYPE_I32, -2147483648.0},
    };
    for (size_t s = 0; s < N_ODD_SHAPES; s++) {
        int ndim = odd_shapes[s].ndim;
        const size_t *shape = odd_shapes[s].shape;
        size_t n = shape_count(ndim, shape);
        for (size_t f = 0; f < sizeof fills / sizeof fills[0]; f++) {
            atmoe_dtype dtype = fills[f].dtype;
            size_t es = atmoe_dtype_size(dtype);
            unsigned char value[4];
            fill_bits(dtype, fills[f].value, value);
            char *want = xmalloc(n * es);
            for (size_t i = 0; i < n; i++)
                memcpy(want + i * es, value, es);
            atmoe_tensor *t = new_tensor_with(ctx, dtype, ndim, shape, NULL);
            ck_assert_status(atmoe_tensor_fill(t, fills[f].value), ctx);
            char what[96];
            snprintf(what, sizeof what, "fill %s with %g, shape %zu",
                     atmoe_dtype_name(dtype), fills[f].value, s);
            expect_tensor(ctx, t, want, n, dtype, what);
            atmoe_tensor_free(t);
            free(want);
        }
    }
    atmoe_context_free(ctx);
}
END_TEST

/* Filling a view changes its block and leaves the rest of the parent as it
 * was. */
START_TEST(test_fill_view)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 9);
    for (size_t c = 0; c < N_VIEW_CASES; c++) {
        const view_case *vc = &view_cases[c];
        size_t np = shape_count(vc->ndim, vc->parent);
        for (size_t d = 0; d < N_DTYPES; d++) {
            atmoe_dtype dtype = all_dtypes[d];
            size_t es = atmoe_dtype_size(dtype);
            double value = dtype == ATMOE_DTYPE_I32 ? -12345.0 : -3.25;
            unsigned char bits[4];
            fill_bits(dtype, value, bits);
            char *host = xmalloc(np * es);
            random_data(&rng, dtype, host, np);
            atmoe_tensor *p = new_tensor_with(ctx, dtype, vc->ndim,
                                              vc->parent, host);
            atmoe_tensor *v = NULL;
            ck_assert_status(atmoe_tensor_view(p, vc->start, vc->shape, &v),
                             ctx);
            ck_assert_status(atmoe_tensor_fill(v, value), ctx);
            host_fill_block(host, vc->ndim, vc->parent, vc->start, vc->shape,
                            es, bits);
            char what[96];
            snprintf(what, sizeof what, "parent after filling view case %zu "
                     "(%s)", c, atmoe_dtype_name(dtype));
            expect_tensor(ctx, p, host, np, dtype, what);
            atmoe_tensor_free(v);
            atmoe_tensor_free(p);
            free(host);
        }
    }
    atmoe_context_free(ctx);
}
END_TEST

/* atmoe_tensor_fill(3) rounds an f16 fill value to a float first, then to
 * the nearest half with ties to even.  These values sit where that differs
 * from rounding the double once (a hair off a tie between two halves lands
 * on the tie as a float), so they pin the documented two-step rule; the
 * rest check ties to even and overflow. */
START_TEST(test_fill_f16_rounding)
{
    atmoe_context *ctx = test_context();
    static const struct {
        double value;
        uint16_t want;
    } cases[] = {
        {1.0 + 0x1p-11 + 0x1p-40, 0x3c00},    /* once: 0x3c01 */
        {-(1.0 + 0x3p-11 - 0x1p-40), 0xbc02}, /* once: 0xbc01 */
        {0x1p-25 + 0x1p-50, 0x0000},          /* once: 0x0001 */
        {65519.999, 0x7c00},                  /* once: 0x7bff */
        {1.0 + 0x1p-11, 0x3c00},              /* a tie: even */
        {1.0 + 0x3p-11, 0x3c02},              /* a tie: even, upwards */
        {65519.0, 0x7bff},                    /* just below overflow */
        {65520.0, 0x7c00},                    /* the tie to infinity */
        {-1.0e6, 0xfc00},                     /* beyond the range */
        {0x1p-24, 0x0001},                    /* the smallest subnormal */
    };
    /* Every case is run and the wrong ones listed before the test fails,
     * so that the report is complete and nothing leaks under CK_FORK=no. */
    char wrong[1024] = "";
    size_t used = 0;
    const size_t shape[1] = {37};
    uint16_t got[37];
    atmoe_tensor *t = new_tensor_with(ctx, ATMOE_DTYPE_F16, 1, shape, NULL);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ck_assert_uint_eq(half_from_double((float)cases[c].value),
                          cases[c].want);
        for (size_t i = 0; i < 37; i++)
            got[i] = (uint16_t)~cases[c].want;
        ck_assert_status(atmoe_tensor_fill(t, cases[c].value), ctx);
        ck_assert_status(atmoe_tensor_read(t, got, sizeof got), ctx);
        for (size_t i = 0; i < 37; i++)
            if (got[i] != cases[c].want) {
                if (used < sizeof wrong)
                    used += (size_t)snprintf(
                        wrong + used, sizeof wrong - used,
                        " %a -> 0x%04x (element %zu), expected 0x%04x;",
                        cases[c].value, got[i], i, cases[c].want);
                break;
            }
    }
    atmoe_tensor_free(t);
    atmoe_context_free(ctx);
    ck_assert_msg(wrong[0] == '\0', "f16 fills rounded wrongly:%s", wrong);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Copy                                                                      */
/* ------------------------------------------------------------------------ */

/* Where a view sits: its parent's shape and its start in it. */
typedef struct placed {
    size_t pshape[ATMOE_MAX_DIMS];
    size_t start[ATMOE_MAX_DIMS];
} placed;

/* A view of a fresh parent placed as pl says, the parent written with data
 * (dense, of the parent's shape; NULL leaves it unwritten). */
static atmoe_tensor *placed_view(atmoe_context *ctx, atmoe_dtype dtype,
                                 int ndim, const placed *pl,
                                 const size_t *shape, const void *data,
                                 atmoe_tensor **parent)
{
    atmoe_tensor *v = NULL;
    *parent = new_tensor_with(ctx, dtype, ndim, pl->pshape, data);
    ck_assert_status(atmoe_tensor_view(*parent, pl->start, shape, &v), ctx);
    return v;
}

/* f32 -> f16 -> f32 between views of parents of different shapes, so that
 * source and destination strides differ. */
typedef struct copy_case {
    int ndim;
    size_t shape[ATMOE_MAX_DIMS];
    placed src, mid, dst;
} copy_case;

static const copy_case copy_cases[] = {
    {1, {37}, {{41}, {3}}, {{40}, {1}}, {{50}, {13}}},
    {2, {7, 11}, {{13, 29}, {3, 5}}, {{9, 12}, {1, 1}}, {{8, 15}, {1, 3}}},
    {3, {3, 3, 4}, {{5, 6, 7}, {1, 2, 3}}, {{4, 5, 9}, {0, 1, 2}},
     {{6, 4, 5}, {2, 0, 1}}},
    {3, {3, 1, 4}, {{5, 6, 7}, {1, 2, 3}}, {{3, 3, 5}, {0, 2, 1}},
     {{4, 1, 4}, {1, 0, 0}}},
    {4, {2, 3, 3, 4}, {{3, 4, 5, 7}, {1, 1, 2, 3}},
     {{2, 5, 4, 9}, {0, 2, 1, 5}}, {{4, 3, 3, 5}, {1, 0, 0, 1}}},
};
#define N_COPY_CASES (sizeof copy_cases / sizeof copy_cases[0])

START_TEST(test_copy_f32_f16_f32)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 10);
    for (size_t c = 0; c < N_COPY_CASES; c++) {
        const copy_case *cc = &copy_cases[c];
        int ndim = cc->ndim;
        size_t n = shape_count(ndim, cc->shape);
        size_t ns = shape_count(ndim, cc->src.pshape);
        size_t nm = shape_count(ndim, cc->mid.pshape);
        size_t nd = shape_count(ndim, cc->dst.pshape);
        float *src = xmalloc(ns * sizeof *src);
        uint16_t *mid = xmalloc(nm * sizeof *mid);
        float *dst = xmalloc(nd * sizeof *dst);
        float *block = xmalloc(n * sizeof *block);
        float *got = xmalloc(n * sizeof *got);
        double *ref = xmalloc(n * sizeof *ref);
        uint16_t *halves = xmalloc(n * sizeof *halves);
        test_fill_uniform(&rng, src, ns, -4, 4);
        random_data(&rng, ATMOE_DTYPE_F16, mid, nm);
        test_fill_uniform(&rng, dst, nd, -4, 4);

        atmoe_tensor *ps, *pm, *pd;
        atmoe_tensor *vs = placed_view(ctx, ATMOE_DTYPE_F32, ndim, &cc->src,
                                       cc->shape, src, &ps);
        atmoe_tensor *vm = placed_view(ctx, ATMOE_DTYPE_F16, ndim, &cc->mid,
                                       cc->shape, mid, &pm);
        atmoe_tensor *vd = placed_view(ctx, ATMOE_DTYPE_F32, ndim, &cc->dst,
                                       cc->shape, dst, &pd);
        ck_assert_status(atmoe_tensor_copy(vm, vs), ctx);
        ck_assert_status(atmoe_tensor_copy(vd, vm), ctx);

        /* The float64 reference is the source itself: one rounding to half
         * costs at most 2^-11 relative, and below the smallest normal half
         * (2^-14) at most 2^-25 absolute, hence the floor. */
        host_gather(src, ndim, cc->src.pshape, cc->src.start, cc->shape, 4,
                    block);
        for (size_t i = 0; i < n; i++) {
            ref[i] = block[i];
            halves[i] = half_from_double(block[i]);
        }
        test_poison(got, n);
        ck_assert_status(atmoe_tensor_read(vd, got, n * sizeof *got), ctx);
        double err = test_max_rel_err(got, ref, n, 0x1p-14);
        ck_assert_msg(err <= 0x1p-11,
                      "copy case %zu: f32 -> f16 -> f32 relative error %g "
                      "above 2^-11", c, err);

        /* Bit for bit: the halves are the nearest ones, and back in f32 they
         * are exact. */
        for (size_t i = 0; i < n; i++)
            block[i] = (float)half_to_double(halves[i]);
        char what[96];
        snprintf(what, sizeof what, "copy case %zu: f16 -> f32", c);
        expect_same(got, block, n, 4, what);
        host_scatter(mid, ndim, cc->mid.pshape, cc->mid.start, cc->shape, 2,
                     halves);
        snprintf(what, sizeof what, "copy case %zu: f16 parent", c);
        expect_tensor(ctx, pm, mid, nm, ATMOE_DTYPE_F16, what);
        host_scatter(dst, ndim, cc->dst.pshape, cc->dst.start, cc->shape, 4,
                     block);
        snprintf(what, sizeof what, "copy case %zu: f32 destination parent",
                 c);
        expect_tensor(ctx, pd, dst, nd, ATMOE_DTYPE_F32, what);
        snprintf(what, sizeof what, "copy case %zu: f32 source parent", c);
        expect_tensor(ctx, ps, src, ns, ATMOE_DTYPE_F32, what);

        atmoe_tensor_free(vs);
        atmoe_tensor_free(vm);
        atmoe_tensor_free(vd);
        atmoe_tensor_free(ps);
        atmoe_tensor_free(pm);
        atmoe_tensor_free(pd);
        free(halves);
        free(ref);
        free(got);
        free(block);
        free(dst);
        free(mid);
        free(src);
    }
    atmoe_context_free(ctx);
}
END_TEST

/* Every half converts to its exact f32 value, and f32 values at, beside
 * and between halves convert to the nearest half with ties to even, through
 * subnormals and overflow. */
/* bf16 -> f32 over every bit pattern is exact (the upper half of an f32),
 * f32 -> bf16 rounds to the nearest, ties to even, against a float64
 * reference of the two neighbours; a NaN stays a NaN; then bf16 <-> f16
 * through f32. */
static uint16_t bf16_reference(float x)
{
    uint32_t u = float_bits(x);
    if (isnan(x))
        return (uint16_t)((u >> 16) | 0x40);
    if (isinf(x))
        return (uint16_t)(u >> 16);
    uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
    float flo, fhi;
    uint32_t ulo = (uint32_t)lo << 16, uhi = (uint32_t)hi << 16;
    memcpy(&flo, &ulo, 4);
    memcpy(&fhi, &uhi, 4);
    double dlo = fabs((double)x - (double)flo);
    /* The upper neighbour of the largest finite bf16 magnitude is
     * infinity: its distance counts as if it were 2^128. */
    double dhi = isinf(fhi) ? fabs(ldexp(x < 0 ? -1.0 : 1.0, 128) - x)
                            : fabs((double)fhi - (double)x);
    if (dlo < dhi || (dlo == dhi && (lo & 1) == 0))
        return lo;
    return hi;
}

START_TEST(test_copy_bf16_conversions)
{
    atmoe_context *ctx = test_context();
    const size_t nb = 65537;
    uint16_t *b = xmalloc(nb * sizeof *b);
    float *f = xmalloc(nb * sizeof *f);
    for (size_t i = 0; i < nb; i++)
        b[i] = (uint16_t)i;
    atmoe_tensor *tb = new_tensor_with(ctx, ATMOE_DTYPE_BF16, 1, &nb, b);
    atmoe_tensor *tf = new_tensor_with(ctx, ATMOE_DTYPE_F32, 1, &nb, NULL);
    ck_assert_status(atmoe_tensor_copy(tf, tb), ctx);
    test_poison(f, nb);
    ck_assert_status(atmoe_tensor_read(tf, f, nb * sizeof *f), ctx);
    for (size_t i = 0; i < nb; i++)
        ck_assert_msg(float_bits(f[i]) == (uint32_t)b[i] << 16 ||
                          (isnan(f[i]) && (b[i] & 0x7fff) > 0x7f80),
                      "bf16 0x%04x became %a", b[i], f[i]);
    atmoe_tensor_free(tb);
    atmoe_tensor_free(tf);

    /* f32 -> bf16: every bf16 magnitude, the midpoints to its neighbour
     * (ties) and the floats beside them, random floats, the specials. */
    size_t cap = 0x7f80 * 8 + 4096 + 8, n = 0;
    float *x = xmalloc(cap * sizeof *x);
    for (uint32_t m = 0; m < 0x7f80; m++) {
        uint32_t mid = (m << 16) | 0x8000;
        float fm, fa;
        uint32_t a = m << 16;
        memcpy(&fm, &mid, 4);
        memcpy(&fa, &a, 4);
        float around[4] = {fa, fm, nextafterf(fm, 0.0f),
                           nextafterf(fm, INFINITY)};
        for (int k = 0; k < 4; k++) {
            x[n++] = around[k];
            x[n++] = -around[k];
        }
    }
    test_rng rng;
    test_rng_seed(&rng, 16);
    for (int i = 0; i < 4096; i++)
        x[n++] = (float)test_uniform(&rng, -1e6, 1e6);
    x[n++] = INFINITY;
    x[n++] = -INFINITY;
    x[n++] = FLT_MAX;
    x[n++] = NAN;
    x[n++] = 1.0f;
    ck_assert_uint_le(n, cap);
    uint16_t *got = xmalloc(n * sizeof *got);
    tf = new_tensor_with(ctx, ATMOE_DTYPE_F32, 1, &n, x);
    tb = new_tensor_with(ctx, ATMOE_DTYPE_BF16, 1, &n, NULL);
    ck_assert_status(atmoe_tensor_copy(tb, tf), ctx);
    memset(got, 0xff, n * sizeof *got);
    ck_assert_status(atmoe_tensor_read(tb, got, n * sizeof *got), ctx);
    for (size_t i = 0; i < n; i++) {
        if (isnan(x[i])) {
            ck_assert_msg((got[i] & 0x7fff) > 0x7f80,
                          "NaN became bf16 0x%04x", got[i]);
            continue;
        }
        uint16_t want = bf16_reference(x[i]);
        ck_assert_msg(got[i] == want,
                      "f32 %a (element %zu) became bf16 0x%04x, expected "
                      "0x%04x", x[i], i, got[i], want);
    }
    ck_assert_uint_eq(got[n - 1], 0x3f80);

    /* bf16 -> f16 -> bf16 of values both hold exactly. */
    static const float exact[] = {0.0f, 1.0f, -2.5f, 0.125f, 1024.0f,
                                  -0.375f, 3.0f};
    size_t ne = sizeof exact / sizeof exact[0];
    uint16_t eb[7], back[7];
    for (size_t i = 0; i < ne; i++)
        eb[i] = bf16_reference(exact[i]);
    tb = new_tensor_with(ctx, ATMOE_DTYPE_BF16, 1, &ne, eb);
    atmoe_tensor *th = new_tensor_with(ctx, ATMOE_DTYPE_F16, 1, &ne, NULL);
    atmoe_tensor *tb2 = new_tensor_with(ctx, ATMOE_DTYPE_BF16, 1, &ne, NULL);
    ck_assert_status(atmoe_tensor_copy(th, tb), ctx);
    ck_assert_status(atmoe_tensor_copy(tb2, th), ctx);
    memset(back, 0xff, sizeof back);
    ck_assert_status(atmoe_tensor_read(tb2, back, ne * sizeof *back), ctx);
    for (size_t i = 0; i < ne; i++)
        ck_assert_uint_eq(back[i], eb[i]);
    /* A bf16 fill rounds its value. */
    ck_assert_status(atmoe_tensor_fill(tb2, 1.00390625), ctx);
    ck_assert_status(atmoe_tensor_read(tb2, back, ne * sizeof *back), ctx);
    ck_assert_uint_eq(back[0], 0x3f80); /* a tie, to the even 1.0 */
    atmoe_tensor_free(tb);
    atmoe_tensor_free(th);
    atmoe_tensor_free(tb2);
    atmoe_tensor_free(tf);
    free(x);
    free(got);
    free(f);
    free(b);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_copy_f16_conversions)
{
    /* First the reference itself: it must return every half it is given. */
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7fff) > 0x7c00)
            continue;
        ck_assert_msg(half_from_double(half_to_double((uint16_t)h)) == h,
                      "reference half conversion breaks 0x%04x", h);
    }

    atmoe_context *ctx = test_context();

    /* f16 -> f32 over every bit pattern; 65537, so the last wraps. */
    const size_t nh = 65537;
    uint16_t *h = xmalloc(nh * sizeof *h);
    float *f = xmalloc(nh * sizeof *f);
    for (size_t i = 0; i < nh; i++)
        h[i] = (uint16_t)i;
    atmoe_tensor *th = new_tensor_with(ctx, ATMOE_DTYPE_F16, 1, &nh, h);
    atmoe_tensor *tf = new_tensor_with(ctx, ATMOE_DTYPE_F32, 1, &nh, NULL);
    ck_assert_status(atmoe_tensor_copy(tf, th), ctx);
    test_poison(f, nh);
    ck_assert_status(atmoe_tensor_read(tf, f, nh * sizeof *f), ctx);
    for (size_t i = 0; i < nh; i++) {
        double want = half_to_double(h[i]);
        if (isnan(want))
            ck_assert_msg(isnan(f[i]), "half 0x%04x (NaN) became %g", h[i],
                          f[i]);
        else
            ck_assert_msg(float_bits(f[i]) == float_bits((float)want),
                          "half 0x%04x became %a, expected %a", h[i], f[i],
                          want);
    }
    atmoe_tensor_free(th);
    atmoe_tensor_free(tf);
    free(f);
    free(h);

    /* f32 -> f16: for each finite half of either sign, the half itself, the
     * midpoint to the next one up in magnitude (exact in f32), and the
     * floats on either side of the midpoint; then infinities and NaN. */
    size_t cap = 2 * 0x7c00 * 4 + 8, n = 0;
    float *x = xmalloc(cap * sizeof *x);
    for (uint32_t m = 0; m < 0x7c00; m++) {
        double a = half_to_double((uint16_t)m);
        double b = m + 1 == 0x7c00 ? 65536.0
                                   : half_to_double((uint16_t)(m + 1));
        float mid = (float)((a + b) / 2);
        float around[4] = {(float)a, mid, nextafterf(mid, 0.0f),
                           nextafterf(mid, INFINITY)};
        for (int k = 0; k < 4; k++) {
            x[n++] = around[k];
            x[n++] = -around[k];
        }
    }
    x[n++] = INFINITY;
    x[n++] = -INFINITY;
    x[n++] = FLT_MAX;
    x[n++] = -FLT_MAX;
    x[n++] = 1e-30f;
    x[n++] = -1e-30f;
    x[n++] = NAN;
    x[n++] = 1.0f;
    ck_assert_uint_le(n, cap);
    uint16_t *got = xmalloc(n * sizeof *got);
    tf = new_tensor_with(ctx, ATMOE_DTYPE_F32, 1, &n, x);
    th = new_tensor_with(ctx, ATMOE_DTYPE_F16, 1, &n, NULL);
    ck_assert_status(atmoe_tensor_copy(th, tf), ctx);
    memset(got, 0xff, n * sizeof *got);
    ck_assert_status(atmoe_tensor_read(th, got, n * sizeof *got), ctx);
    for (size_t i = 0; i < n; i++) {
        if (isnan(x[i])) {
            ck_assert_msg((got[i] & 0x7fff) > 0x7c00,
                          "NaN became half 0x%04x", got[i]);
            continue;
        }
        uint16_t want = half_from_double(x[i]);
        ck_assert_msg(got[i] == want,
                      "f32 %a (element %zu) became half 0x%04x, expected "
                      "0x%04x", x[i], i, got[i], want);
    }
    /* The last element is 1.0, so the 0xffff poison cannot pass anywhere. */
    ck_assert_uint_eq(got[n - 1], 0x3c00);
    atmoe_tensor_free(th);
    atmoe_tensor_free(tf);
    free(got);
    free(x);
    atmoe_context_free(ctx);
}
END_TEST

/* Same-dtype copies move bits unchanged between views of different
 * strides, and touch nothing outside the destination block. */
START_TEST(test_copy_exact)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 11);
    for (size_t d = 0; d < N_DTYPES; d++) {
        atmoe_dtype dtype = all_dtypes[d];
        size_t es = atmoe_dtype_size(dtype);
        for (size_t c = 0; c < N_COPY_CASES; c++) {
            const copy_case *cc = &copy_cases[c];
            int ndim = cc->ndim;
            size_t n = shape_count(ndim, cc->shape);
            size_t ns = shape_count(ndim, cc->src.pshape);
            size_t nd = shape_count(ndim, cc->dst.pshape);
            char *src = xmalloc(ns * es), *dst = xmalloc(nd * es);
            char *block = xmalloc(n * es);
            random_data(&rng, dtype, src, ns);
            random_data(&rng, dtype, dst, nd);
            if (dtype == ATMOE_DTYPE_F16) {
                /* Subnormals and signed zeros must survive too. */
                const uint16_t edge[4] = {0x0001, 0x83ff, 0x8000, 0x7bff};
                for (size_t i = 0; i < 4 && i < n; i++)
                    memcpy(src + block_offset(i, ndim, cc->src.pshape,
                                              cc->src.start, cc->shape) * es,
                           &edge[i], es);
            }
            atmoe_tensor *ps, *pd;
            atmoe_tensor *vs = placed_view(ctx, dtype, ndim, &cc->src,
                                           cc->shape, src, &ps);
            atmoe_tensor *vd = placed_view(ctx, dtype, ndim, &cc->dst,
                                           cc->shape, dst, &pd);
            ck_assert_status(atmoe_tensor_copy(vd, vs), ctx);
            host_gather(src, ndim, cc->src.pshape, cc->src.start, cc->shape,
                        es, block);
            host_scatter(dst, ndim, cc->dst.pshape, cc->dst.start, cc->shape,
                         es, block);
            char what[96];
            snprintf(what, sizeof what, "%s copy case %zu, destination parent",
                     atmoe_dtype_name(dtype), c);
            expect_tensor(ctx, pd, dst, nd, dtype, what);
            snprintf(what, sizeof what, "%s copy case %zu, destination view",
                     atmoe_dtype_name(dtype), c);
            expect_tensor(ctx, vd, block, n, dtype, what);
            atmoe_tensor_free(vs);
            atmoe_tensor_free(vd);
            atmoe_tensor_free(ps);
            atmoe_tensor_free(pd);
            free(block);
            free(dst);
            free(src);
        }
    }
    atmoe_context_free(ctx);
}
END_TEST

/* atmoe_tensor_free(3) does not wait for the device: commands enqueued
 * before a free still complete, whether the freed handle was a copy's
 * source, a fill's view or the last handle on a buffer. */
START_TEST(test_free_while_enqueued)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 14);
    const size_t shape[2] = {13, 29};
    size_t n = shape_count(2, shape);
    float *x = xmalloc(n * sizeof *x), *want = xmalloc(n * sizeof *want);
    test_fill_uniform(&rng, x, n, -4, 4);

    /* f32 -> f16 -> f32 with each source freed right after its copy. */
    atmoe_tensor *src = new_tensor_with(ctx, ATMOE_DTYPE_F32, 2, shape, x);
    atmoe_tensor *half = new_tensor_with(ctx, ATMOE_DTYPE_F16, 2, shape, NULL);
    atmoe_tensor *dst = new_tensor_with(ctx, ATMOE_DTYPE_F32, 2, shape, NULL);
    ck_assert_status(atmoe_tensor_copy(half, src), ctx);
    atmoe_tensor_free(src);
    ck_assert_status(atmoe_tensor_copy(dst, half), ctx);
    atmoe_tensor_free(half);
    for (size_t i = 0; i < n; i++)
        want[i] = (float)half_to_double(half_from_double(x[i]));
    expect_tensor(ctx, dst, want, n, ATMOE_DTYPE_F32,
                  "copies whose sources were freed while enqueued");

    /* A fill through a view freed straight after it. */
    const size_t start[2] = {2, 3}, vshape[2] = {9, 17};
    atmoe_tensor *v = NULL;
    ck_assert_status(atmoe_tensor_view(dst, start, vshape, &v), ctx);
    ck_assert_status(atmoe_tensor_fill(v, -0.75), ctx);
    atmoe_tensor_free(v);
    const float value = -0.75f;
    host_fill_block(want, 2, shape, start, vshape, 4, &value);
    expect_tensor(ctx, dst, want, n, ATMOE_DTYPE_F32,
                  "fill through a view freed while enqueued");

    /* The last handle on a buffer freed under a pending copy out of it. */
    atmoe_tensor *last = new_tensor_with(ctx, ATMOE_DTYPE_F32, 2, shape, x);
    ck_assert_status(atmoe_tensor_copy(dst, last), ctx);
    atmoe_tensor_free(last);
    expect_tensor(ctx, dst, x, n, ATMOE_DTYPE_F32,
                  "copy from a tensor freed while enqueued");

    atmoe_tensor_free(dst);
    free(want);
    free(x);
    atmoe_context_free(ctx);
}
END_TEST

/* Refused copies fail with the right status and leave dst alone. */
START_TEST(test_copy_refusals)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 12);
    const size_t s34[2] = {3, 4}, s43[2] = {4, 3}, s35[2] = {3, 5};
    const size_t s12[1] = {12}, s134[3] = {1, 3, 4};
    float x[12];
    int32_t k[12];
    test_fill_uniform(&rng, x, 12, -4, 4);
    random_data(&rng, ATMOE_DTYPE_I32, k, 12);
    atmoe_tensor *f = new_tensor_with(ctx, ATMOE_DTYPE_F32, 2, s34, x);
    atmoe_tensor *h = new_tensor_with(ctx, ATMOE_DTYPE_F16, 2, s34, NULL);
    atmoe_tensor *ti = new_tensor_with(ctx, ATMOE_DTYPE_I32, 2, s34, k);

    ck_assert_fails(atmoe_tensor_copy(f, ti), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);
    ck_assert_fails(atmoe_tensor_copy(ti, f), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);
    ck_assert_fails(atmoe_tensor_copy(h, ti), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);
    ck_assert_fails(atmoe_tensor_copy(ti, h), ctx,
                    ATMOE_STATUS_DTYPE_MISMATCH);

    /* Transposed, wider, same count in another rank: all mismatches. */
    const size_t *others[] = {s43, s35, s12, s134};
    const int ranks[] = {2, 2, 1, 3};
    for (size_t c = 0; c < 4; c++) {
        atmoe_tensor *o = new_tensor_with(ctx, ATMOE_DTYPE_F32, ranks[c],
                                          others[c], NULL);
        ck_assert_fails(atmoe_tensor_copy(o, f), ctx,
                        ATMOE_STATUS_SHAPE_MISMATCH);
        ck_assert_fails(atmoe_tensor_copy(f, o), ctx,
                        ATMOE_STATUS_SHAPE_MISMATCH);
        atmoe_tensor_free(o);
    }
    ck_assert_status(atmoe_context_finish(ctx), ctx);
    expect_tensor(ctx, f, x, 12, ATMOE_DTYPE_F32, "f32 after refused copies");
    expect_tensor(ctx, ti, k, 12, ATMOE_DTYPE_I32, "i32 after refused copies");

    atmoe_tensor_free(f);
    atmoe_tensor_free(h);
    atmoe_tensor_free(ti);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_copy_wrong_context)
{
    atmoe_context *c1 = test_context();
    atmoe_context *c2 = test_context();
    const size_t shape[2] = {3, 5};
    atmoe_tensor *a = new_tensor_with(c1, ATMOE_DTYPE_F32, 2, shape, NULL);
    atmoe_tensor *b = new_tensor_with(c2, ATMOE_DTYPE_F32, 2, shape, NULL);
    atmoe_tensor *bh = new_tensor_with(c2, ATMOE_DTYPE_F16, 2, shape, NULL);
    ck_assert_fails(atmoe_tensor_copy(a, b), c1, ATMOE_STATUS_WRONG_CONTEXT);
    ck_assert_fails(atmoe_tensor_copy(b, a), c2, ATMOE_STATUS_WRONG_CONTEXT);
    ck_assert_fails(atmoe_tensor_copy(bh, a), c2, ATMOE_STATUS_WRONG_CONTEXT);
    atmoe_tensor_free(bh);
    atmoe_tensor_free(b);
    atmoe_tensor_free(a);
    atmoe_context_free(c2);
    atmoe_context_free(c1);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Bad input                                                                 */
/* ------------------------------------------------------------------------ */

/* A NULL pointer argument: the status, and a message that names the
 * argument (the header promises "which argument"). */
#define ck_assert_null_arg(expr, ctx, arg)                                    \
    do {                                                                      \
        ck_assert_fails(expr, ctx, ATMOE_STATUS_NULL_POINTER);                \
        ck_assert_msg(strstr(atmoe_errmsg(ctx), arg) != NULL,                 \
                      "%s: message \"%s\" does not name '%s'", #expr,         \
                      atmoe_errmsg(ctx), arg);                                \
    } while (0)

START_TEST(test_null_pointers)
{
    atmoe_context *ctx = test_context();
    const size_t shape[2] = {3, 5}, start[2] = {1, 1}, vshape[2] = {2, 3};
    const size_t flat[1] = {15};
    atmoe_tensor *t = new_tensor_with(ctx, ATMOE_DTYPE_F32, 2, shape, NULL);
    atmoe_tensor *out = NULL;
    float buf[15];
    int ndim;
    size_t dims[ATMOE_MAX_DIMS], count;
    atmoe_dtype dtype;

    /* Without a tensor there is no context: the message is the thread's. */
    ck_assert_null_arg(atmoe_tensor_new(NULL, ATMOE_DTYPE_F32, 2, shape, &out),
                       NULL, "ctx");
    out = SENTINEL;
    ck_assert_null_arg(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, NULL, &out),
                       ctx, "shape");
    ck_assert_ptr_null(out);
    ck_assert_null_arg(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 2, shape, NULL),
                       ctx, "tensor");

    ck_assert_null_arg(atmoe_tensor_view(NULL, start, vshape, &out), NULL,
                       "parent");
    out = SENTINEL;
    ck_assert_null_arg(atmoe_tensor_view(t, NULL, vshape, &out), ctx, "start");
    ck_assert_ptr_null(out);
    out = SENTINEL;
    ck_assert_null_arg(atmoe_tensor_view(t, start, NULL, &out), ctx, "shape");
    ck_assert_ptr_null(out);
    ck_assert_null_arg(atmoe_tensor_view(t, start, vshape, NULL), ctx, "view");

    ck_assert_null_arg(atmoe_tensor_reshape(NULL, 1, flat, &out), NULL,
                       "tensor");
    out = SENTINEL;
    ck_assert_null_arg(atmoe_tensor_reshape(t, 1, NULL, &out), ctx, "shape");
    ck_assert_ptr_null(out);
    ck_assert_null_arg(atmoe_tensor_reshape(t, 1, flat, NULL), ctx, "view");

    ck_assert_null_arg(atmoe_tensor_get_shape(NULL, &ndim, dims), NULL,
                       "tensor");
    ck_assert_null_arg(atmoe_tensor_get_shape(t, NULL, dims), ctx, "ndim");
    ck_assert_null_arg(atmoe_tensor_get_shape(t, &ndim, NULL), ctx, "shape");
    ck_assert_null_arg(atmoe_tensor_get_dtype(NULL, &dtype), NULL, "tensor");
    ck_assert_null_arg(atmoe_tensor_get_dtype(t, NULL), ctx, "dtype");
    ck_assert_null_arg(atmoe_tensor_get_count(NULL, &count), NULL, "tensor");
    ck_assert_null_arg(atmoe_tensor_get_count(t, NULL), ctx, "count");

    ck_assert_null_arg(atmoe_tensor_write(NULL, buf, sizeof buf), NULL,
                       "tensor");
    ck_assert_null_arg(atmoe_tensor_write(t, NULL, sizeof buf), ctx, "src");
    ck_assert_null_arg(atmoe_tensor_read(NULL, buf, sizeof buf), NULL,
                       "tensor");
    ck_assert_null_arg(atmoe_tensor_read(t, NULL, sizeof buf), ctx, "dst");

    ck_assert_null_arg(atmoe_tensor_fill(NULL, 1.0), NULL, "tensor");
    ck_assert_null_arg(atmoe_tensor_copy(NULL, t), NULL, "dst");
    ck_assert_null_arg(atmoe_tensor_copy(t, NULL), ctx, "src");

    atmoe_tensor_free(NULL); /* a no-op */

    /* The context is still fine after all that. */
    ck_assert_status(atmoe_tensor_fill(t, 0.5), ctx);
    for (size_t i = 0; i < 15; i++)
        buf[i] = 0.5f;
    expect_tensor(ctx, t, buf, 15, ATMOE_DTYPE_F32, "fill after bad calls");
    atmoe_tensor_free(t);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_bad_shapes)
{
    atmoe_context *ctx = test_context();
    const size_t five[5] = {3, 5, 7, 2, 3};
    atmoe_tensor *t = NULL;

    ck_assert_fails_out(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 0, five, &t),
                        ctx, ATMOE_STATUS_INVALID_ARGUMENT, t);
    ck_assert_fails_out(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 5, five, &t),
                        ctx, ATMOE_STATUS_INVALID_ARGUMENT, t);
    ck_assert_fails_out(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, -1, five, &t),
                        ctx, ATMOE_STATUS_INVALID_ARGUMENT, t);

    /* A zero anywhere is a shape error (atmoe_tensor_new(3)). */
    const size_t zeros[3][3] = {{0, 5, 7}, {3, 0, 7}, {3, 5, 0}};
    for (int z = 0; z < 3; z++) {
        ck_assert_fails_out(atmoe_tensor_new(ctx, ATMOE_DTYPE_I32, 3, zeros[z],
                                             &t),
                            ctx, ATMOE_STATUS_SHAPE_MISMATCH, t);
    }

    /* Element counts that overflow size_t. */
    const size_t over4[4] = {65536, 65536, 65536, 65536};
    const size_t over2[2] = {SIZE_MAX / 2 + 1, 2};
    const size_t over2b[2] = {3, SIZE_MAX / 3 + 1};
    ck_assert_fails_out(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 4, over4, &t),
                        ctx, ATMOE_STATUS_OUT_OF_RANGE, t);
    ck_assert_fails_out(atmoe_tensor_new(ctx, ATMOE_DTYPE_F16, 2, over2, &t),
                        ctx, ATMOE_STATUS_OUT_OF_RANGE, t);
    ck_assert_fails_out(atmoe_tensor_new(ctx, ATMOE_DTYPE_I32, 2, over2b, &t),
                        ctx, ATMOE_STATUS_OUT_OF_RANGE, t);

    /* A count that fits while its bytes do not: out of range or out of
     * device memory are both honest answers; success is not. */
    const size_t bytes_over[1] = {SIZE_MAX / 2};
    t = SENTINEL;
    atmoe_status st = atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 1, bytes_over,
                                       &t);
    ck_assert_msg(st == ATMOE_STATUS_OUT_OF_RANGE ||
                      st == ATMOE_STATUS_DEVICE_OUT_OF_MEMORY,
                  "SIZE_MAX / 2 floats -> %s", atmoe_status_name(st));
    ck_assert_ptr_null(t);

    /* Not an atmoe_dtype. */
    const size_t shape[2] = {3, 5};
    ck_assert_fails_out(atmoe_tensor_new(ctx, (atmoe_dtype)99, 2, shape, &t),
                        ctx, ATMOE_STATUS_DTYPE_MISMATCH, t);
    ck_assert_fails_out(atmoe_tensor_new(ctx, (atmoe_dtype)-1, 2, shape, &t),
                        ctx, ATMOE_STATUS_DTYPE_MISMATCH, t);
    atmoe_context_free(ctx);
}
END_TEST

/* More than any device can hold: refused up front, with a message. */
START_TEST(test_too_large)
{
    atmoe_context *ctx = test_context();
    atmoe_tensor *t = NULL;
#if SIZE_MAX > 0xffffffffu
    const size_t big1[1] = {(size_t)1 << 40};
    const size_t big2[2] = {(size_t)1 << 20, (size_t)1 << 20};
#else
    const size_t big1[1] = {(size_t)1 << 28};
    const size_t big2[2] = {(size_t)1 << 14, (size_t)1 << 14};
#endif
    ck_assert_fails_out(atmoe_tensor_new(ctx, ATMOE_DTYPE_F32, 1, big1, &t),
                        ctx, ATMOE_STATUS_DEVICE_OUT_OF_MEMORY, t);
    ck_assert_fails_out(atmoe_tensor_new(ctx, ATMOE_DTYPE_I32, 2, big2, &t),
                        ctx, ATMOE_STATUS_DEVICE_OUT_OF_MEMORY, t);

    /* The context still works afterwards. */
    const size_t shape[1] = {37};
    float x[37];
    for (size_t i = 0; i < 37; i++)
        x[i] = (float)i - 18.5f;
    t = new_tensor_with(ctx, ATMOE_DTYPE_F32, 1, shape, x);
    expect_tensor(ctx, t, x, 37, ATMOE_DTYPE_F32, "tensor after a refusal");
    atmoe_tensor_free(t);
    atmoe_context_free(ctx);
}
END_TEST

/* Byte counts other than count x dtype size are refused, and a refused read
 * leaves the host buffer untouched, a refused write the tensor. */
START_TEST(test_wrong_bytes)
{
    atmoe_context *ctx = test_context();
    test_rng rng;
    test_rng_seed(&rng, 13);
    const size_t pshape[3] = {5, 6, 7}, start[3] = {1, 2, 3};
    const size_t vshape[3] = {3, 3, 4};
    for (size_t d = 0; d < N_DTYPES; d++) {
        atmoe_dtype dtype = all_dtypes[d];
        size_t es = atmoe_dtype_size(dtype);
        size_t np = shape_count(3, pshape), nv = shape_count(3, vshape);
        char *host = xmalloc(np * es), *other = xmalloc(np * es);
        char *before = xmalloc(np * es);
        random_data(&rng, dtype, host, np);
        random_data(&rng, dtype, other, np);
        atmoe_tensor *p = new_tensor_with(ctx, dtype, 3, pshape, host);
        atmoe_tensor *v = NULL;
        ck_assert_status(atmoe_tensor_view(p, start, vshape, &v), ctx);

        /* One element short or over, one byte off, nothing, and the parent's
         * size given for the view. */
        const size_t tries[2][5] = {
            {np * es - es, np * es + es, np * es - 1, 0, np * es / 2},
            {nv * es - es, nv * es + es, nv * es + 1, 0, np * es},
        };
        atmoe_tensor *ts[2] = {p, v};
        for (int w = 0; w < 2; w++)
            for (int k = 0; k < 5; k++) {
                ck_assert_fails(atmoe_tensor_write(ts[w], other, tries[w][k]),
                                ctx, ATMOE_STATUS_SHAPE_MISMATCH);
                memcpy(before, other, np * es);
                ck_assert_fails(atmoe_tensor_read(ts[w], other, tries[w][k]),
                                ctx, ATMOE_STATUS_SHAPE_MISMATCH);
                ck_assert_msg(memcmp(before, other, np * es) == 0,
                              "a refused read changed the host buffer");
            }
        expect_tensor(ctx, p, host, np, dtype, "parent after refused writes");
        atmoe_tensor_free(v);
        atmoe_tensor_free(p);
        free(before);
        free(other);
        free(host);
    }
    atmoe_context_free(ctx);
}
END_TEST

/* Blocks that do not fit their parent. */
START_TEST(test_bad_views)
{
    atmoe_context *ctx = test_context();
    const size_t pshape[3] = {5, 6, 7};
    atmoe_tensor *p = new_tensor_with(ctx, ATMOE_DTYPE_F32, 3, pshape, NULL);
    static const struct {
        size_t start[3], shape[3];
    } bad[] = {
        {{0, 0, 0}, {6, 6, 7}},        /* too big */
        {{1, 0, 0}, {5, 6, 7}},        /* runs off the end */
        {{0, 2, 3}, {1, 4, 5}},        /* runs off in the last dimension */
        {{5, 0, 0}, {1, 1, 1}},        /* starts past the end */
        {{0, 0, 7}, {1, 1, 1}},
        {{0, 0, 0}, {1, 0, 1}},        /* a zero dimension */
        {{SIZE_MAX, 0, 0}, {2, 1, 1}}, /* start + shape wraps around */
        {{1, 0, 0}, {SIZE_MAX, 1, 1}},
    };
    for (size_t c = 0; c < sizeof bad / sizeof bad[0]; c++) {
        atmoe_tensor *v = SENTINEL;
        atmoe_status st = atmoe_tensor_view(p, bad[c].start, bad[c].shape, &v);
        ck_assert_msg(st == ATMOE_STATUS_SHAPE_MISMATCH,
                      "bad view %zu -> %s, expected SHAPE_MISMATCH", c,
                      atmoe_status_name(st));
        ck_assert_msg(atmoe_errmsg(ctx)[0] != '\0',
                      "bad view %zu failed without a message", c);
        ck_assert_ptr_null(v);
    }
    atmoe_tensor_free(p);
    atmoe_context_free(ctx);
}
END_TEST

/* NaN has no i32 value. */
START_TEST(test_fill_i32_nan)
{
    atmoe_context *ctx = test_context();
    const size_t shape[1] = {37};
    int32_t x[37];
    for (size_t i = 0; i < 37; i++)
        x[i] = (int32_t)i * 7919 - 100000;
    atmoe_tensor *t = new_tensor_with(ctx, ATMOE_DTYPE_I32, 1, shape, x);
    ck_assert_fails(atmoe_tensor_fill(t, NAN), ctx,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    expect_tensor(ctx, t, x, 37, ATMOE_DTYPE_I32, "i32 after a NaN fill");
    atmoe_tensor_free(t);
    atmoe_context_free(ctx);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Getters                                                                   */
/* ------------------------------------------------------------------------ */

START_TEST(test_getters)
{
    atmoe_context *ctx = test_context();
    for (size_t d = 0; d < N_DTYPES; d++)
        for (size_t s = 0; s < N_ODD_SHAPES; s++) {
            atmoe_tensor *t = new_tensor_with(ctx, all_dtypes[d],
                                              odd_shapes[s].ndim,
                                              odd_shapes[s].shape, NULL);
            expect_shape(ctx, t, all_dtypes[d], odd_shapes[s].ndim,
                         odd_shapes[s].shape);
            atmoe_tensor_free(t);
        }

    /* Views and reshapes report their own shape and their parent's dtype. */
    const size_t pshape[4] = {2, 3, 5, 7}, start[4] = {1, 0, 2, 1};
    const size_t vshape[4] = {1, 3, 1, 5}, flat[2] = {15, 14};
    atmoe_tensor *p = new_tensor_with(ctx, ATMOE_DTYPE_F16, 4, pshape, NULL);
    atmoe_tensor *v = NULL, *r = NULL;
    ck_assert_status(atmoe_tensor_view(p, start, vshape, &v), ctx);
    expect_shape(ctx, v, ATMOE_DTYPE_F16, 4, vshape);
    ck_assert_status(atmoe_tensor_reshape(p, 2, flat, &r), ctx);
    expect_shape(ctx, r, ATMOE_DTYPE_F16, 2, flat);
    atmoe_tensor_free(r);
    atmoe_tensor_free(v);
    atmoe_tensor_free(p);

    /* The dtype helpers the tests lean on. */
    ck_assert_str_eq(atmoe_dtype_name(ATMOE_DTYPE_F32), "f32");
    ck_assert_str_eq(atmoe_dtype_name(ATMOE_DTYPE_F16), "f16");
    ck_assert_str_eq(atmoe_dtype_name(ATMOE_DTYPE_I32), "i32");
    ck_assert_str_eq(atmoe_dtype_name((atmoe_dtype)99), "unknown");
    ck_assert_uint_eq(atmoe_dtype_size(ATMOE_DTYPE_F32), 4);
    ck_assert_uint_eq(atmoe_dtype_size(ATMOE_DTYPE_F16), 2);
    ck_assert_str_eq(atmoe_dtype_name(ATMOE_DTYPE_BF16), "bf16");
    ck_assert_uint_eq(atmoe_dtype_size(ATMOE_DTYPE_BF16), 2);
    ck_assert_uint_eq(atmoe_dtype_size(ATMOE_DTYPE_I32), 4);
    ck_assert_uint_eq(atmoe_dtype_size((atmoe_dtype)99), 0);
    atmoe_context_free(ctx);
}
END_TEST

static Suite *tensor_suite(void)
{
    Suite *s = suite_create("tensor");

    TCase *tc = tcase_create("roundtrip");
    tcase_add_test(tc, test_roundtrip_f32);
    tcase_add_test(tc, test_roundtrip_f16);
    tcase_add_test(tc, test_roundtrip_i32);
    tcase_add_test(tc, test_getters);
    suite_add_tcase(s, tc);

    tc = tcase_create("view");
    tcase_add_test(tc, test_view_read_write);
    tcase_add_test(tc, test_view_of_view);
    tcase_add_test(tc, test_view_outlives_parent);
    tcase_add_test(tc, test_reshape_contiguous);
    tcase_add_test(tc, test_reshape_contiguous_view);
    tcase_add_test(tc, test_reshape_refusals);
    suite_add_tcase(s, tc);

    tc = tcase_create("fill");
    tcase_add_test(tc, test_fill_whole);
    tcase_add_test(tc, test_fill_view);
    tcase_add_test(tc, test_fill_f16_rounding);
    tcase_add_test(tc, test_fill_i32_nan);
    suite_add_tcase(s, tc);

    tc = tcase_create("copy");
    tcase_add_test(tc, test_copy_f32_f16_f32);
    tcase_add_test(tc, test_copy_f16_conversions);
    tcase_add_test(tc, test_copy_bf16_conversions);
    tcase_add_test(tc, test_copy_exact);
    tcase_add_test(tc, test_copy_refusals);
    tcase_add_test(tc, test_copy_wrong_context);
    tcase_add_test(tc, test_free_while_enqueued);
    suite_add_tcase(s, tc);

    tc = tcase_create("bad_input");
    tcase_add_test(tc, test_null_pointers);
    tcase_add_test(tc, test_bad_shapes);
    tcase_add_test(tc, test_too_large);
    tcase_add_test(tc, test_wrong_bytes);
    tcase_add_test(tc, test_bad_views);
    suite_add_tcase(s, tc);

    return s;
}

int main(void)
{
    return test_run_suite(tensor_suite());
}
