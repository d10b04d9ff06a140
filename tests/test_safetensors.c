/* safetensors files: reading files built byte by byte here, the f16 and
 * bf16 conversions against float64 references of the rounding, and the
 * statuses and messages of every misuse.  No OpenCL device is needed
 * except where a context's message is checked. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

/* ------------------------------------------------------------- fixture */

static char root[PATH_MAX]; /* this test's temporary directory */

static void setup(void)
{
    test_mkdtemp(root, sizeof root, "safetensors");
}

static void teardown(void)
{
    test_rmdir_r(root);
}

/* ------------------------------------------------------------- helpers */

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    ck_assert_ptr_nonnull(p);
    return p;
}

static const char *tmp_path(const char *name)
{
    static char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", root, name);
    return path;
}

/* A file of the given header text (not padded) and data bytes. */
static void write_st(const char *path, const char *header, const void *data,
                     size_t n)
{
    size_t h = strlen(header);
    unsigned char *buf = xmalloc(8 + h + n);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)h >> (8 * i));
    memcpy(buf + 8, header, h);
    if (n)
        memcpy(buf + 8 + h, data, n);
    test_write_file(path, buf, 8 + h + n);
    free(buf);
}

static void put_le(unsigned char *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint16_t get_le16(const unsigned char *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t float_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static float bits_float(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* The names in root, sorted and joined with spaces: what a failed save
 * must leave unchanged. */
static char *list_dir(const char *dir)
{
    struct dirent **names;
    int n = scandir(dir, &names, NULL, alphasort);
    ck_assert_int_ge(n, 0);
    size_t size = 1;
    for (int i = 0; i < n; i++)
        size += strlen(names[i]->d_name) + 1;
    char *out = xmalloc(size);
    out[0] = '\0';
    for (int i = 0; i < n; i++) {
        strcat(out, names[i]->d_name);
        strcat(out, " ");
        free(names[i]);
    }
    free(names);
    return out;
}

/* The files at a and b hold the same bytes. */
static void assert_same_files(const char *a, const char *b)
{
    size_t size_a, size_b;
    unsigned char *bytes_a = test_read_file(a, &size_a);
    unsigned char *bytes_b = test_read_file(b, &size_b);
    ck_assert_msg(size_a == size_b && memcmp(bytes_a, bytes_b, size_a) == 0,
                  "%s and %s differ: %zu and %zu bytes", a, b, size_a,
                  size_b);
    free(bytes_a);
    free(bytes_b);
}

/* The tensor's dtype and shape, and its bytes exactly want (nbytes of
 * them). */
static void assert_bytes(const atmoe_safetensors *f, const char *name,
                         atmoe_safetensors_dtype dtype, int ndim,
                         const uint64_t *shape, const void *want,
                         size_t nbytes)
{
    atmoe_safetensors_tensor t;
    ck_assert_status(atmoe_safetensors_find(f, name, &t), NULL);
    ck_assert_msg(t.dtype == dtype, "%s: dtype %s", name,
                  atmoe_safetensors_dtype_name(t.dtype));
    ck_assert_int_eq(t.ndim, ndim);
    uint64_t count = 1;
    for (int i = 0; i < ndim; i++) {
        ck_assert_uint_eq(t.shape[i], shape[i]);
        count *= shape[i];
    }
    ck_assert_uint_eq(t.count, count);
    ck_assert_uint_eq(t.nbytes, nbytes);
    ck_assert_msg(memcmp(t.data, want, nbytes) == 0, "%s: wrong bytes", name);
}

static atmoe_safetensors *open_ok(const char *path)
{
    atmoe_safetensors *f = NULL;
    ck_assert_status(atmoe_safetensors_open(NULL, path, &f), NULL);
    ck_assert_ptr_nonnull(f);
    return f;
}

/* ------------------------------------------- float64 rounding references */

/* The 16-bit formats, named by their mantissa bits: f16 has 5 exponent and
 * 10 mantissa bits, bf16 has f32's 8 exponent bits and 7 mantissa bits. */
enum { F16_MAN = 10, BF16_MAN = 7 };

/* The value of the 16-bit pattern h of the format with man_bits mantissa
 * bits. */
static double ref_half_value(uint16_t h, int man_bits)
{
    int exp_max = (1 << (15 - man_bits)) - 1, bias = exp_max / 2;
    int exp = (h >> man_bits) & exp_max, man = h & ((1 << man_bits) - 1);
    double v = exp == exp_max ? (man ? NAN : INFINITY)
               : exp == 0     ? ldexp(man, 1 - bias - man_bits)
                              : ldexp(man + (1 << man_bits),
                                      exp - bias - man_bits);
    return (h & 0x8000) ? -v : v;
}

/* The pattern of the format with man_bits mantissa bits nearest x, ties to
 * even (x is finite or infinite, not NaN). */
static uint16_t ref_half(double x, int man_bits)
{
    int exp_max = (1 << (15 - man_bits)) - 1, bias = exp_max / 2;
    uint16_t sign = signbit(x) ? 0x8000 : 0;
    double a = fabs(x);
    /* halfway between the largest finite value, (2 - 2^-man_bits) 2^bias,
     * and 2^(bias + 1), and above (65520 for f16) */
    if (a >= ldexp(2 - ldexp(1, -man_bits - 1), bias))
        return sign | (uint16_t)(exp_max << man_bits);
    /* exponent of the ulp's binade; subnormals share the least normal one */
    int k = 1 - bias;
    if (a > 0) {
        int e;
        frexp(a, &e);
        if (e - 1 > k)
            k = e - 1;
    }
    double r = nearbyint(ldexp(a, man_bits - k)); /* ties to even */
    return (uint16_t)(sign |
                      (unsigned)(((k + bias - 1) << man_bits) + (int)r));
}

/* got equals the float64 want exactly, NaN matching NaN of the same sign. */
static void assert_same_value(float got, double want, const char *what,
                              unsigned pattern)
{
    if (isnan(want)) {
        ck_assert_msg(isnan(got) && !signbit(got) == !signbit(want),
                      "%s 0x%04x: got %g, want %sNaN", what, pattern, got,
                      signbit(want) ? "-" : "");
        return;
    }
    ck_assert_msg((double)got == want && !signbit(got) == !signbit(want),
                  "%s 0x%04x: got %.9g, want %.9g", what, pattern, got, want);
}

/* ------------------------------------------------------------- reading */

/* One file with every shape rule exercised: a scalar, a zero-size
 * dimension, odd shapes, and a header whose order differs from the data's
 * and that is not padded. */
START_TEST(test_read_basic)
{
    const char *hdr =
        "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
        "\"__metadata__\":{\"format\":\"pt\",\"note\":\"\\u00e9t\\u00e9\"},"
        "\"empty\":{\"shape\":[0,5],\"dtype\":\"U8\","
        "\"data_offsets\":[46,46]},"
        "\"s\":{\"dtype\":\"I32\",\"shape\":[],\"data_offsets\":[42,46]},"
        "\"h\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[24,30]},"
        "\"b\":{\"dtype\":\"BF16\",\"shape\":[1,1,2],"
        "\"data_offsets\":[30,34]},"
        "\"d\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[34,42]}}";
    unsigned char data[46];
    const float w[6] = {1.5f, -2.25f, 0.0f, 3e-8f, -1e30f, 7.0f};
    for (int i = 0; i < 6; i++)
        put_le(data + 4 * i, float_bits(w[i]), 4);
    put_le(data + 24, 0x3c00, 2); /* 1 */
    put_le(data + 26, 0xc500, 2); /* -5 */
    put_le(data + 28, 0x0001, 2); /* 2^-24 */
    put_le(data + 30, 0x3f80, 2); /* 1 */
    put_le(data + 32, 0xc2f7, 2); /* -123.5 */
    double dv = -0.1;
    uint64_t du;
    memcpy(&du, &dv, sizeof du);
    put_le(data + 34, du, 8);
    put_le(data + 42, (uint32_t)-77, 4);
    const char *path = tmp_path("basic.safetensors");
    write_st(path, hdr, data, sizeof data);

    atmoe_safetensors *f = open_ok(path);
    size_t n = 0;
    ck_assert_status(atmoe_safetensors_get_count(f, &n), NULL);
    ck_assert_uint_eq(n, 6);

    /* Listed in the order of their data; ties (the zero-size tensor at the
     * end) by name. */
    const char *order[] = {"w", "h", "b", "d", "s", "empty"};
    atmoe_safetensors_tensor t;
    for (size_t i = 0; i < n; i++) {
        ck_assert_status(atmoe_safetensors_get(f, i, &t), NULL);
        ck_assert_str_eq(t.name, order[i]);
    }
    ck_assert_fails(atmoe_safetensors_get(f, n, &t), NULL,
                    ATMOE_STATUS_OUT_OF_RANGE);

    assert_bytes(f, "w", ATMOE_SAFETENSORS_F32, 2, (uint64_t[]){2, 3}, data, 24);
    assert_bytes(f, "s", ATMOE_SAFETENSORS_I32, 0, NULL, data + 42, 4);
    assert_bytes(f, "empty", ATMOE_SAFETENSORS_U8, 2, (uint64_t[]){0, 5}, data, 0);

    float got[6];
    test_poison(got, 6);
    ck_assert_status(atmoe_safetensors_read_f32(f, "w", got, 6), NULL);
    for (int i = 0; i < 6; i++)
        ck_assert_uint_eq(float_bits(got[i]), float_bits(w[i]));
    test_poison(got, 6);
    ck_assert_status(atmoe_safetensors_read_f32(f, "h", got, 3), NULL);
    ck_assert(got[0] == 1.0f && got[1] == -5.0f && got[2] == 0x1p-24f);
    ck_assert_status(atmoe_safetensors_read_f32(f, "b", got, 2), NULL);
    ck_assert(got[0] == 1.0f && got[1] == -123.5f);
    ck_assert_status(atmoe_safetensors_read_f32(f, "d", got, 1), NULL);
    ck_assert(got[0] == (float)-0.1);

    ck_assert_fails(atmoe_safetensors_read_f32(f, "s", got, 1), NULL,
                    ATMOE_STATUS_DTYPE_MISMATCH);
    ck_assert_fails(atmoe_safetensors_read_f32(f, "w", got, 5), NULL,
                    ATMOE_STATUS_SHAPE_MISMATCH);
    ck_assert_fails(atmoe_safetensors_read_f32(f, "nope", got, 1), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    ck_assert_msg(strstr(atmoe_errmsg(NULL), "nope") != NULL, "message: %s",
                  atmoe_errmsg(NULL));

    const char *value = NULL;
    ck_assert_status(atmoe_safetensors_get_metadata(f, "format", &value),
                     NULL);
    ck_assert_str_eq(value, "pt");
    ck_assert_status(atmoe_safetensors_get_metadata(f, "note", &value), NULL);
    ck_assert_str_eq(value, "\xc3\xa9t\xc3\xa9");
    ck_assert_fails(atmoe_safetensors_get_metadata(f, "w", &value), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    ck_assert_fails(atmoe_safetensors_find(f, "", &t), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    ck_assert_fails(atmoe_safetensors_find(f, "__metadata__", &t), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    atmoe_safetensors_free(f);
}
END_TEST

/* The smallest files: no tensors at all, with and without metadata. */
START_TEST(test_read_empty)
{
    const char *path = tmp_path("empty.safetensors");
    write_st(path, "{}      ", NULL, 0);
    atmoe_safetensors *f = open_ok(path);
    size_t n = 99;
    ck_assert_status(atmoe_safetensors_get_count(f, &n), NULL);
    ck_assert_uint_eq(n, 0);
    atmoe_safetensors_tensor t;
    ck_assert_fails(atmoe_safetensors_get(f, 0, &t), NULL,
                    ATMOE_STATUS_OUT_OF_RANGE);
    ck_assert_fails(atmoe_safetensors_find(f, "x", &t), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    const char *value;
    ck_assert_fails(atmoe_safetensors_get_metadata(f, "format", &value), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    atmoe_safetensors_free(f);

    /* A null __metadata__ is no metadata, as in the reference reader. */
    write_st(path, "{\"__metadata__\":null}", NULL, 0);
    f = open_ok(path);
    ck_assert_fails(atmoe_safetensors_get_metadata(f, "format", &value), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    atmoe_safetensors_free(f);
}
END_TEST

/* Every f16 pattern read as f32 equals its exact value; likewise every
 * bf16 pattern. */
START_TEST(test_read_all_halves)
{
    const char *names[2] = {"F16", "BF16"};
    for (int kind = 0; kind < 2; kind++) {
        char header[160];
        snprintf(header, sizeof header,
                 "{\"x\":{\"dtype\":\"%s\",\"shape\":[256,256],"
                 "\"data_offsets\":[0,131072]}}",
                 names[kind]);
        unsigned char *data = xmalloc(131072);
        for (unsigned h = 0; h < 65536; h++)
            put_le(data + 2 * h, h, 2);
        const char *path = tmp_path("halves.safetensors");
        write_st(path, header, data, 131072);
        free(data);

        atmoe_safetensors *f = open_ok(path);
        float *got = xmalloc(65536 * sizeof *got);
        test_poison(got, 65536);
        ck_assert_status(atmoe_safetensors_read_f32(f, "x", got, 65536),
                         NULL);
        for (unsigned h = 0; h < 65536; h++)
            assert_same_value(
                got[h], ref_half_value((uint16_t)h, kind ? BF16_MAN : F16_MAN),
                names[kind], h);
        free(got);
        atmoe_safetensors_free(f);
    }
}
END_TEST

START_TEST(test_open_errors)
{
    atmoe_safetensors *f = (atmoe_safetensors *)&f;
    ck_assert_fails(atmoe_safetensors_open(NULL, tmp_path("missing"), &f),
                    NULL, ATMOE_STATUS_NOT_FOUND);
    ck_assert_ptr_null(f);
    ck_assert_msg(strstr(atmoe_errmsg(NULL), "missing") != NULL,
                  "message: %s", atmoe_errmsg(NULL));
    f = (atmoe_safetensors *)&f;
    ck_assert_fails(atmoe_safetensors_open(NULL, root, &f), NULL,
                    ATMOE_STATUS_IO_ERROR);
    ck_assert_ptr_null(f);
    ck_assert_fails(atmoe_safetensors_open(NULL, NULL, &f), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_open(NULL, root, NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);

    /* An empty file is a format error, not an I/O one. */
    test_write_file(tmp_path("zero.safetensors"), "", 0);
    ck_assert_fails(
        atmoe_safetensors_open(NULL, tmp_path("zero.safetensors"), &f), NULL,
        ATMOE_STATUS_FORMAT_ERROR);
    ck_assert_ptr_null(f);

    /* A file the process may not read (unless it runs as root). */
    const char *path = tmp_path("secret.safetensors");
    write_st(path, "{}", NULL, 0);
    ck_assert_int_eq(chmod(path, 0), 0);
    if (access(path, R_OK) != 0)
        ck_assert_fails(atmoe_safetensors_open(NULL, path, &f), NULL,
                        ATMOE_STATUS_IO_ERROR);
}
END_TEST

START_TEST(test_null_arguments)
{
    const char *path = tmp_path("one.safetensors");
    unsigned char four[4] = {0};
    write_st(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],"
                   "\"data_offsets\":[0,4]}}",
             four, 4);
    atmoe_safetensors *f = open_ok(path);
    size_t n;
    atmoe_safetensors_tensor t;
    float x;
    const char *v;
    ck_assert_fails(atmoe_safetensors_get_count(NULL, &n), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_get_count(f, NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_get(NULL, 0, &t), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_get(f, 0, NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_find(NULL, "a", &t), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_find(f, NULL, &t), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_find(f, "a", NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_read_f32(NULL, "a", &x, 1), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_read_f32(f, NULL, &x, 1), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_read_f32(f, "a", NULL, 1), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_get_metadata(NULL, "k", &v), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_get_metadata(f, NULL, &v), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_get_metadata(f, "k", NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    atmoe_safetensors_free(f);
    atmoe_safetensors_free(NULL);
}
END_TEST

START_TEST(test_dtype_names)
{
    const char *want[] = {"BOOL", "U8",  "I8",  "F8_E4M3", "F8_E5M2",
                          "I16",  "U16", "F16", "BF16",    "I32",
                          "U32",  "F32", "I64", "U64",     "F64"};
    for (int d = ATMOE_SAFETENSORS_BOOL; d <= ATMOE_SAFETENSORS_F64; d++)
        ck_assert_str_eq(atmoe_safetensors_dtype_name((atmoe_safetensors_dtype)d), want[d]);
    ck_assert_str_eq(atmoe_safetensors_dtype_name((atmoe_safetensors_dtype)(ATMOE_SAFETENSORS_F64 + 1)),
                     "unknown");
    ck_assert_str_eq(atmoe_safetensors_dtype_name((atmoe_safetensors_dtype)-1), "unknown");
}
END_TEST

/* With a context, messages go to it and name the file and the rule. */
START_TEST(test_context_message)
{
    atmoe_context *ctx = test_context();
    const char *path = tmp_path("bad.safetensors");
    write_st(path, "{\"a\":{\"dtype\":\"Q4\",\"shape\":[1],"
                   "\"data_offsets\":[0,1]}}",
             "x", 1);
    atmoe_safetensors *f;
    ck_assert_fails(atmoe_safetensors_open(ctx, path, &f), ctx,
                    ATMOE_STATUS_FORMAT_ERROR);
    const char *msg = atmoe_errmsg(ctx);
    ck_assert_msg(strstr(msg, path) && strstr(msg, "'a'") &&
                      strstr(msg, "Q4"),
                  "message: %s", msg);
    atmoe_context_free(ctx);
}
END_TEST

/* ------------------------------------------------------------- writing */

static atmoe_safetensors_writer *writer_ok(void)
{
    atmoe_safetensors_writer *w = NULL;
    ck_assert_status(atmoe_safetensors_writer_new(NULL, &w), NULL);
    ck_assert_ptr_nonnull(w);
    return w;
}

/* Shapes with a scalar, zero-size dimensions, odd sizes and every rank up
 * to the largest. */
static const struct {
    int ndim;
    uint64_t shape[ATMOE_SAFETENSORS_MAX_DIMS];
} shapes[] = {
    {0, {0}},       {1, {0}},       {3, {3, 0, 2}},
    {1, {7}},       {2, {3, 5}},    {4, {2, 3, 5, 1}},
    {ATMOE_SAFETENSORS_MAX_DIMS, {1, 2, 1, 3, 1, 2, 1, 1}},
};
enum { N_SHAPES = sizeof shapes / sizeof shapes[0] };

/* The reference writer's place of a dtype (its enum, by alignment). */
static int ref_rank(atmoe_safetensors_dtype d)
{
    static const int rank[] = {
        [ATMOE_SAFETENSORS_BOOL] = 0,    [ATMOE_SAFETENSORS_U8] = 1,      [ATMOE_SAFETENSORS_I8] = 2,
        [ATMOE_SAFETENSORS_F8_E5M2] = 3, [ATMOE_SAFETENSORS_F8_E4M3] = 4, [ATMOE_SAFETENSORS_I16] = 5,
        [ATMOE_SAFETENSORS_U16] = 6,     [ATMOE_SAFETENSORS_F16] = 7,     [ATMOE_SAFETENSORS_BF16] = 8,
        [ATMOE_SAFETENSORS_I32] = 9,     [ATMOE_SAFETENSORS_U32] = 10,    [ATMOE_SAFETENSORS_F32] = 11,
        [ATMOE_SAFETENSORS_F64] = 12,    [ATMOE_SAFETENSORS_I64] = 13,    [ATMOE_SAFETENSORS_U64] = 14};
    return rank[d];
}

static const unsigned dtype_size[] = {1, 1, 1, 1, 1, 2, 2, 2,
                                      2, 4, 4, 4, 8, 8, 8};

/* Every dtype in every shape, random bytes, in one file: read back
 * exactly, in the reference writer's order, aligned, with a padded
 * header. */
START_TEST(test_roundtrip_all_dtypes)
{
    test_rng rng;
    test_rng_seed(&rng, 42);
    atmoe_safetensors_writer *w = writer_ok();
    enum { N = (ATMOE_SAFETENSORS_F64 + 1) * N_SHAPES };
    unsigned char *bytes[N];
    uint64_t nbytes[N];
    /* Added in an order of their own, so the writer must sort. */
    for (int k = N - 1; k >= 0; k--) {
        int d = k / N_SHAPES, s = k % N_SHAPES;
        uint64_t count = 1;
        for (int i = 0; i < shapes[s].ndim; i++)
            count *= shapes[s].shape[i];
        nbytes[k] = count * dtype_size[d];
        bytes[k] = xmalloc(nbytes[k]);
        for (uint64_t i = 0; i < nbytes[k]; i++)
            bytes[k][i] = (unsigned char)test_uniform(&rng, 0, 256);
        char name[32];
        snprintf(name, sizeof name, "t%02d.%s", s,
                 atmoe_safetensors_dtype_name((atmoe_safetensors_dtype)d));
        ck_assert_status(atmoe_safetensors_writer_add(
                             w, name, (atmoe_safetensors_dtype)d, shapes[s].ndim,
                             shapes[s].shape, bytes[k]),
                         NULL);
    }
    /* A copy: the next tmp_path reuses its buffer. */
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s", tmp_path("all.safetensors"));
    ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
    /* Saved twice: the writer stays usable and the files agree. */
    const char *again = tmp_path("again.safetensors");
    ck_assert_status(atmoe_safetensors_writer_save(w, again), NULL);
    atmoe_safetensors_writer_free(w);

    assert_same_files(path, again);
    size_t size;
    unsigned char *file = test_read_file(path, &size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | file[i];
    ck_assert_uint_eq(hlen % 8, 0);
    ck_assert(hlen + 8 <= size);
    ck_assert_msg(file[8] == '{', "the header starts with %c", file[8]);
    ck_assert_ptr_null(memchr(file + 8, '\n', hlen));

    atmoe_safetensors *f = open_ok(path);
    size_t n;
    ck_assert_status(atmoe_safetensors_get_count(f, &n), NULL);
    ck_assert_uint_eq(n, N);
    atmoe_safetensors_tensor prev = {0};
    for (size_t i = 0; i < n; i++) {
        atmoe_safetensors_tensor t;
        ck_assert_status(atmoe_safetensors_get(f, i, &t), NULL);
        int s, d = -1;
        char dname[16];
        ck_assert_int_eq(sscanf(t.name, "t%02d.%15s", &s, dname), 2);
        for (int j = 0; j <= ATMOE_SAFETENSORS_F64; j++)
            if (!strcmp(dname, atmoe_safetensors_dtype_name((atmoe_safetensors_dtype)j)))
                d = j;
        int k = d * N_SHAPES + s;
        ck_assert_int_eq(t.dtype, d);
        ck_assert_int_eq(t.ndim, shapes[s].ndim);
        for (int j = 0; j < t.ndim; j++)
            ck_assert_uint_eq(t.shape[j], shapes[s].shape[j]);
        ck_assert_uint_eq(t.nbytes, nbytes[k]);
        ck_assert_uint_eq(t.count * dtype_size[d], nbytes[k]);
        ck_assert_int_eq(memcmp(t.data, bytes[k], nbytes[k]), 0);
        ck_assert_uint_eq((uintptr_t)t.data % dtype_size[d], 0);
        if (i > 0) {
            int r = ref_rank(t.dtype), pr = ref_rank(prev.dtype);
            ck_assert_msg(r < pr || (r == pr && strcmp(prev.name, t.name) < 0),
                          "'%s' is saved after '%s'", t.name, prev.name);
        }
        prev = t;
    }
    atmoe_safetensors_free(f);
    for (int k = 0; k < N; k++)
        free(bytes[k]);
    free(file);
}
END_TEST

/* f32 data stored as F32, F16 and BF16: the stored patterns are the
 * float64 reference's nearest-even roundings, special values included, and
 * read back as their exact values. */
START_TEST(test_roundtrip_f32)
{
    enum { N = 4099 };
    float *x = xmalloc(N * sizeof *x);
    test_rng rng;
    test_rng_seed(&rng, 7);
    const float special[] = {0.0f,           -0.0f,         INFINITY,
                             -INFINITY,      NAN,           -NAN,
                             65504.0f,       65519.99f,     65520.0f,
                             -65520.0f,      0x1p-24f,      0x1p-25f,
                             0x1.000002p-25f, 0x1.8p-24f,   0x1.4p-24f,
                             0x1.ffcp-15f,   0x1.ffep-15f,  0x1p-14f,
                             3.4028235e38f,  -3.4028235e38f, 0x1.fep127f,
                             0x1p-149f,      0x1.0101p0f,   0x1.0180p0f,
                             0x1.0080p0f,    1.0f + 0x1p-11f, 1e-45f};
    int n_special = sizeof special / sizeof special[0];
    for (int i = 0; i < N; i++) {
        if (i < n_special) {
            x[i] = special[i];
            continue;
        }
        /* Random bit patterns cover every binade, subnormals and NaN
         * payloads; ties appear through the low-bit masks. */
        uint32_t u = (uint32_t)test_uniform(&rng, 0, 4294967296.0);
        if (i % 3 == 0)
            u &= 0xffffe000u | (u & 0x1000u); /* f16 ties and exact */
        if (i % 3 == 1)
            u &= 0xffff8000u | (u & 0x8000u); /* bf16 ties and exact */
        x[i] = bits_float(u);
    }
    uint64_t shape[2] = {1, N};
    atmoe_safetensors_writer *w = writer_ok();
    ck_assert_status(atmoe_safetensors_writer_add_f32(w, "f32", ATMOE_SAFETENSORS_F32,
                                                      2, shape, x),
                     NULL);
    ck_assert_status(atmoe_safetensors_writer_add_f32(w, "f16", ATMOE_SAFETENSORS_F16,
                                                      2, shape, x),
                     NULL);
    ck_assert_status(atmoe_safetensors_writer_add_f32(w, "bf16",
                                                      ATMOE_SAFETENSORS_BF16, 2, shape,
                                                      x),
                     NULL);
    const char *path = tmp_path("f32.safetensors");
    ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
    atmoe_safetensors_writer_free(w);

    atmoe_safetensors *f = open_ok(path);
    atmoe_safetensors_tensor t16, tb16, t32;
    ck_assert_status(atmoe_safetensors_find(f, "f16", &t16), NULL);
    ck_assert_status(atmoe_safetensors_find(f, "bf16", &tb16), NULL);
    ck_assert_status(atmoe_safetensors_find(f, "f32", &t32), NULL);
    ck_assert_int_eq(t16.dtype, ATMOE_SAFETENSORS_F16);
    ck_assert_int_eq(tb16.dtype, ATMOE_SAFETENSORS_BF16);
    ck_assert_int_eq(memcmp(t32.data, x, N * sizeof *x), 0);
    for (int i = 0; i < N; i++) {
        uint16_t h = get_le16((const unsigned char *)t16.data + 2 * i);
        uint16_t b = get_le16((const unsigned char *)tb16.data + 2 * i);
        if (isnan(x[i])) {
            ck_assert_msg((h & 0x7c00) == 0x7c00 && (h & 0x3ff) &&
                              !(h & 0x8000) == !signbit(x[i]),
                          "f16 of NaN 0x%08x is 0x%04x", float_bits(x[i]), h);
            ck_assert_msg((b & 0x7f80) == 0x7f80 && (b & 0x7f) &&
                              !(b & 0x8000) == !signbit(x[i]),
                          "bf16 of NaN 0x%08x is 0x%04x", float_bits(x[i]),
                          b);
            continue;
        }
        uint16_t want_h = ref_half(x[i], F16_MAN);
        uint16_t want_b = ref_half(x[i], BF16_MAN);
        ck_assert_msg(h == want_h, "f16 of %a (0x%08x): 0x%04x, want 0x%04x",
                      x[i], float_bits(x[i]), h, want_h);
        ck_assert_msg(b == want_b, "bf16 of %a (0x%08x): 0x%04x, want 0x%04x",
                      x[i], float_bits(x[i]), b, want_b);
    }
    float *got = xmalloc(N * sizeof *got);
    const char *names[] = {"f32", "f16", "bf16"};
    for (int k = 0; k < 3; k++) {
        test_poison(got, N);
        ck_assert_status(atmoe_safetensors_read_f32(f, names[k], got, N),
                         NULL);
        for (int i = 0; i < N; i++) {
            double want = x[i];
            if (k > 0 && !isnan(x[i])) {
                int man_bits = k == 1 ? F16_MAN : BF16_MAN;
                want = ref_half_value(ref_half(x[i], man_bits), man_bits);
            }
            assert_same_value(got[i], want, names[k], (unsigned)i);
        }
    }
    free(got);
    free(x);
    atmoe_safetensors_free(f);
}
END_TEST

/* Metadata: keys sorted in the file whatever the order they were set in, a
 * key set twice keeps its last value, and no __metadata__ at all unless
 * one was set. */
START_TEST(test_metadata)
{
    atmoe_safetensors_writer *w = writer_ok();
    uint8_t one = 1;
    ck_assert_status(atmoe_safetensors_writer_add(w, "x", ATMOE_SAFETENSORS_U8, 0,
                                                  NULL, &one),
                     NULL);
    const char *path = tmp_path("plain.safetensors");
    ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
    size_t size;
    unsigned char *file = test_read_file(path, &size);
    ck_assert_ptr_null(memmem(file, size, "__metadata__", 12));
    free(file);

    ck_assert_status(atmoe_safetensors_writer_set_metadata(w, "zeta", "1"),
                     NULL);
    ck_assert_status(atmoe_safetensors_writer_set_metadata(w, "alpha", "x"),
                     NULL);
    ck_assert_status(atmoe_safetensors_writer_set_metadata(w, "zeta", "2"),
                     NULL);
    ck_assert_status(atmoe_safetensors_writer_set_metadata(w, "", ""), NULL);
    ck_assert_status(atmoe_safetensors_writer_set_metadata(
                         w, "q\"uote", "line\nbreak \xe2\x82\xac"),
                     NULL);
    ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
    atmoe_safetensors_writer_free(w);

    file = test_read_file(path, &size);
    const char *want = "{\"__metadata__\":{\"\":\"\",\"alpha\":\"x\","
                       "\"q\\\"uote\":\"line\\nbreak \xe2\x82\xac\","
                       "\"zeta\":\"2\"},\"x\":";
    ck_assert_msg(size > 8 + strlen(want) &&
                      memcmp(file + 8, want, strlen(want)) == 0,
                  "header: %.*s", (int)size - 8, (const char *)file + 8);
    free(file);

    atmoe_safetensors *f = open_ok(path);
    const char *v;
    ck_assert_status(atmoe_safetensors_get_metadata(f, "zeta", &v), NULL);
    ck_assert_str_eq(v, "2");
    ck_assert_status(atmoe_safetensors_get_metadata(f, "q\"uote", &v), NULL);
    ck_assert_str_eq(v, "line\nbreak \xe2\x82\xac");
    ck_assert_status(atmoe_safetensors_get_metadata(f, "", &v), NULL);
    ck_assert_str_eq(v, "");
    ck_assert_fails(atmoe_safetensors_get_metadata(f, "beta", &v), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    atmoe_safetensors_free(f);
}
END_TEST

/* The byte-exact files the reference implementation's own tests expect for
 * one f32 tensor (with and without header padding) and for no tensor. */
START_TEST(test_reference_bytes)
{
    static const struct {
        const char *name;
        int ndim;
        uint64_t shape[4];
        const char *meta;
        const char *header;
    } cases[] = {
        {"attn.0", 3, {1, 2, 3}, NULL,
         "{\"attn.0\":{\"dtype\":\"F32\",\"shape\":[1,2,3],"
         "\"data_offsets\":[0,24]}}"},
        {"attn0", 4, {1, 1, 2, 3}, NULL,
         "{\"attn0\":{\"dtype\":\"F32\",\"shape\":[1,1,2,3],"
         "\"data_offsets\":[0,24]}}       "},
        {NULL, 0, {0}, NULL, "{}      "},
        {NULL, 0, {0}, "pt",
         "{\"__metadata__\":{\"framework\":\"pt\"}}     "},
    };
    const float data[6] = {0, 1, 2, 3, 4, 5};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        atmoe_safetensors_writer *w = writer_ok();
        if (cases[c].name)
            ck_assert_status(atmoe_safetensors_writer_add_f32(
                                 w, cases[c].name, ATMOE_SAFETENSORS_F32,
                                 cases[c].ndim, cases[c].shape, data),
                             NULL);
        if (cases[c].meta)
            ck_assert_status(atmoe_safetensors_writer_set_metadata(
                                 w, "framework", cases[c].meta),
                             NULL);
        const char *path = tmp_path("ref.safetensors");
        ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
        atmoe_safetensors_writer_free(w);

        size_t hlen = strlen(cases[c].header);
        size_t dlen = cases[c].name ? sizeof data : 0;
        unsigned char *want = xmalloc(8 + hlen + dlen);
        put_le(want, hlen, 8);
        memcpy(want + 8, cases[c].header, hlen);
        for (size_t i = 0; i < dlen / 4; i++)
            put_le(want + 8 + hlen + 4 * i, float_bits(data[i]), 4);
        size_t size;
        unsigned char *got = test_read_file(path, &size);
        ck_assert_msg(size == 8 + hlen + dlen &&
                          memcmp(got, want, size) == 0,
                      "case %zu: got %zu bytes: %.*s", c, size,
                      (int)(size > 8 ? size - 8 : 0),
                      (const char *)got + 8);
        free(got);
        free(want);
    }
}
END_TEST

/* Every misuse of the writer: a clear status, a message, and nothing
 * added. */
START_TEST(test_writer_misuse)
{
    atmoe_safetensors_writer *w = writer_ok();
    const uint64_t shape[2] = {2, 3};
    const float x[6] = {0};
    const atmoe_status null = ATMOE_STATUS_NULL_POINTER,
                       inval = ATMOE_STATUS_INVALID_ARGUMENT,
                       range = ATMOE_STATUS_OUT_OF_RANGE;
    ck_assert_fails(atmoe_safetensors_writer_new(NULL, NULL), NULL, null);
    ck_assert_fails(atmoe_safetensors_writer_add(NULL, "a", ATMOE_SAFETENSORS_F32, 2,
                                                 shape, x),
                    NULL, null);
    ck_assert_fails(atmoe_safetensors_writer_add(w, NULL, ATMOE_SAFETENSORS_F32, 2,
                                                 shape, x),
                    NULL, null);
    ck_assert_fails(atmoe_safetensors_writer_add(w, "a", ATMOE_SAFETENSORS_F32, 2,
                                                 NULL, x),
                    NULL, null);
    ck_assert_fails(atmoe_safetensors_writer_add(w, "a", ATMOE_SAFETENSORS_F32, 2,
                                                 shape, NULL),
                    NULL, null);
    ck_assert_fails(atmoe_safetensors_writer_add(w, "", ATMOE_SAFETENSORS_F32, 2,
                                                 shape, x),
                    NULL, inval);
    ck_assert_fails(atmoe_safetensors_writer_add(w, "__metadata__",
                                                 ATMOE_SAFETENSORS_F32, 2, shape, x),
                    NULL, inval);
    ck_assert_fails(atmoe_safetensors_writer_add(w, "bad\xff", ATMOE_SAFETENSORS_F32,
                                                 2, shape, x),
                    NULL, inval);
    ck_assert_fails(atmoe_safetensors_writer_add(w, "\xed\xa0\x80",
                                                 ATMOE_SAFETENSORS_F32, 2, shape, x),
                    NULL, inval); /* a UTF-16 surrogate */
    ck_assert_fails(atmoe_safetensors_writer_add(w, "\xc0\xaf", ATMOE_SAFETENSORS_F32,
                                                 2, shape, x),
                    NULL, inval); /* overlong */
    ck_assert_fails(atmoe_safetensors_writer_add(
                        w, "a", (atmoe_safetensors_dtype)(ATMOE_SAFETENSORS_F64 + 1), 2, shape,
                        x),
                    NULL, inval);
    ck_assert_fails(atmoe_safetensors_writer_add(w, "a", (atmoe_safetensors_dtype)-1,
                                                 2, shape, x),
                    NULL, inval);
    ck_assert_fails(atmoe_safetensors_writer_add(w, "a", ATMOE_SAFETENSORS_F32, -1,
                                                 shape, x),
                    NULL, inval);
    ck_assert_fails(atmoe_safetensors_writer_add(w, "a", ATMOE_SAFETENSORS_F32,
                                                 ATMOE_SAFETENSORS_MAX_DIMS + 1, shape,
                                                 x),
                    NULL, inval);
    const uint64_t huge[3] = {UINT64_C(1) << 32, UINT64_C(1) << 32, 2};
    ck_assert_fails(atmoe_safetensors_writer_add(w, "a", ATMOE_SAFETENSORS_U8, 3, huge,
                                                 x),
                    NULL, range);
    const uint64_t big[1] = {UINT64_C(1) << 62};
    ck_assert_fails(atmoe_safetensors_writer_add(w, "a", ATMOE_SAFETENSORS_F32, 1, big,
                                                 x),
                    NULL, range); /* the bytes overflow */
    const uint64_t past[2] = {UINT64_C(1) << 63, 0};
    ck_assert_fails(atmoe_safetensors_writer_add(w, "a", ATMOE_SAFETENSORS_F32, 2,
                                                 past, x),
                    NULL, range); /* no JSON integer holds the dimension */
    ck_assert_fails(atmoe_safetensors_writer_add_f32(w, "a", ATMOE_SAFETENSORS_I32, 2,
                                                     shape, x),
                    NULL, ATMOE_STATUS_DTYPE_MISMATCH);
    ck_assert_fails(atmoe_safetensors_writer_add_f32(w, "a", ATMOE_SAFETENSORS_F64, 2,
                                                     shape, x),
                    NULL, ATMOE_STATUS_DTYPE_MISMATCH);
    ck_assert_fails(atmoe_safetensors_writer_add_f32(NULL, "a", ATMOE_SAFETENSORS_F32,
                                                     2, shape, x),
                    NULL, null);
    ck_assert_fails(atmoe_safetensors_writer_add_f32(w, NULL, ATMOE_SAFETENSORS_F32, 2,
                                                     shape, x),
                    NULL, null);
    ck_assert_fails(atmoe_safetensors_writer_add_f32(w, "a", ATMOE_SAFETENSORS_F16, 2,
                                                     shape, NULL),
                    NULL, null);

    /* Duplicates, whichever function added the first. */
    ck_assert_status(atmoe_safetensors_writer_add_f32(w, "a", ATMOE_SAFETENSORS_F16, 2,
                                                      shape, x),
                     NULL);
    ck_assert_fails(atmoe_safetensors_writer_add(w, "a", ATMOE_SAFETENSORS_F32, 2,
                                                 shape, x),
                    NULL, inval);
    ck_assert_msg(strstr(atmoe_errmsg(NULL), "'a'"), "message: %s",
                  atmoe_errmsg(NULL));
    ck_assert_fails(atmoe_safetensors_writer_add_f32(w, "a", ATMOE_SAFETENSORS_BF16, 2,
                                                     shape, x),
                    NULL, inval);
    /* Data may be NULL when there are no bytes. */
    const uint64_t none[1] = {0};
    ck_assert_status(atmoe_safetensors_writer_add(w, "z", ATMOE_SAFETENSORS_I64, 1,
                                                  none, NULL),
                     NULL);
    ck_assert_status(atmoe_safetensors_writer_add_f32(w, "z16", ATMOE_SAFETENSORS_F16,
                                                      1, none, NULL),
                     NULL);

    ck_assert_fails(atmoe_safetensors_writer_set_metadata(NULL, "k", "v"),
                    NULL, null);
    ck_assert_fails(atmoe_safetensors_writer_set_metadata(w, NULL, "v"), NULL,
                    null);
    ck_assert_fails(atmoe_safetensors_writer_set_metadata(w, "k", NULL), NULL,
                    null);
    ck_assert_fails(atmoe_safetensors_writer_set_metadata(w, "k\xfe", "v"),
                    NULL, inval);
    ck_assert_fails(atmoe_safetensors_writer_set_metadata(w, "k", "\x80"),
                    NULL, inval);
    ck_assert_fails(atmoe_safetensors_writer_save(NULL, "x"), NULL, null);
    ck_assert_fails(atmoe_safetensors_writer_save(w, NULL), NULL, null);
    ck_assert_fails(atmoe_safetensors_writer_save(w, ""), NULL, inval);

    /* Only the three good tensors and no metadata reached the file. */
    const char *path = tmp_path("misuse.safetensors");
    ck_assert_status(atmoe_safetensors_writer_save(w, path), NULL);
    atmoe_safetensors_writer_free(w);
    atmoe_safetensors_writer_free(NULL);
    atmoe_safetensors *f = open_ok(path);
    size_t n;
    ck_assert_status(atmoe_safetensors_get_count(f, &n), NULL);
    ck_assert_uint_eq(n, 3);
    atmoe_safetensors_tensor t;
    ck_assert_status(atmoe_safetensors_find(f, "a", &t), NULL);
    ck_assert_int_eq(t.dtype, ATMOE_SAFETENSORS_F16);
    const char *v;
    ck_assert_fails(atmoe_safetensors_get_metadata(f, "k", &v), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    atmoe_safetensors_free(f);
}
END_TEST

/* A save that fails leaves the directory as it was: no new file, no
 * temporary file, and an existing file of that name untouched. */
START_TEST(test_save_failures)
{
    atmoe_safetensors_writer *w = writer_ok();
    enum { N = 4096 };
    float *x = xmalloc(N * sizeof *x);
    for (int i = 0; i < N; i++)
        x[i] = (float)i;
    const uint64_t shape[1] = {N};
    ck_assert_status(atmoe_safetensors_writer_add_f32(w, "x", ATMOE_SAFETENSORS_F32, 1,
                                                      shape, x),
                     NULL);
    free(x);
    const char *old = "old contents";
    test_write_file(tmp_path("keep.safetensors"), old, strlen(old));
    test_write_file(tmp_path("plain"), "", 0);
    char *before = list_dir(root);

    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/missing/x.safetensors", root);
    ck_assert_fails(atmoe_safetensors_writer_save(w, path), NULL,
                    ATMOE_STATUS_IO_ERROR);
    ck_assert_msg(strstr(atmoe_errmsg(NULL), path), "message: %s",
                  atmoe_errmsg(NULL));
    snprintf(path, sizeof path, "%s/plain/x.safetensors", root);
    ck_assert_fails(atmoe_safetensors_writer_save(w, path), NULL,
                    ATMOE_STATUS_IO_ERROR);
    /* The rename over a directory fails after the whole file is written. */
    ck_assert_int_eq(mkdir(tmp_path("dir.safetensors"), 0755), 0);
    free(before);
    before = list_dir(root);
    ck_assert_fails(
        atmoe_safetensors_writer_save(w, tmp_path("dir.safetensors")), NULL,
        ATMOE_STATUS_IO_ERROR);
    char *after = list_dir(root);
    ck_assert_str_eq(after, before);
    free(after);

    /* A directory the process may not write to (unless it runs as root,
     * which the write-limit case below covers). */
    ck_assert_int_eq(mkdir(tmp_path("ro"), 0555), 0);
    if (access(tmp_path("ro"), W_OK) != 0) {
        snprintf(path, sizeof path, "%s/ro/x.safetensors", root);
        ck_assert_fails(atmoe_safetensors_writer_save(w, path), NULL,
                        ATMOE_STATUS_IO_ERROR);
        char *ro = list_dir(tmp_path("ro"));
        ck_assert_str_eq(ro, ". .. ");
        free(ro);
    }
    free(before);
    before = list_dir(root);

    /* A write that fails part way (the file size limit stops it), over an
     * existing file and as a new one. */
    struct rlimit saved, small;
    ck_assert_int_eq(getrlimit(RLIMIT_FSIZE, &saved), 0);
    small = saved;
    small.rlim_cur = 1000;
    void (*handler)(int) = signal(SIGXFSZ, SIG_IGN);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &small), 0);
    atmoe_status st1 =
        atmoe_safetensors_writer_save(w, tmp_path("keep.safetensors"));
    atmoe_status st2 =
        atmoe_safetensors_writer_save(w, tmp_path("new.safetensors"));
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &saved), 0);
    signal(SIGXFSZ, handler);
    ck_assert_int_eq(st1, ATMOE_STATUS_IO_ERROR);
    ck_assert_int_eq(st2, ATMOE_STATUS_IO_ERROR);
    after = list_dir(root);
    ck_assert_str_eq(after, before);
    free(after);
    free(before);
    size_t size;
    unsigned char *kept = test_read_file(tmp_path("keep.safetensors"), &size);
    ck_assert_uint_eq(size, strlen(old));
    ck_assert_int_eq(memcmp(kept, old, size), 0);
    free(kept);

    /* The same writer then saves. */
    ck_assert_status(
        atmoe_safetensors_writer_save(w, tmp_path("keep.safetensors")), NULL);
    atmoe_safetensors_writer_free(w);
    atmoe_safetensors *f = open_ok(tmp_path("keep.safetensors"));
    atmoe_safetensors_free(f);
}
END_TEST

/* ------------------------------------------------ fixtures and corpus */

/* Files made by tests/fixtures/make_fixtures.py: good ones follow the
 * reference writer's rules, so rewriting what was read must give the same
 * bytes. */
static const char *fixture(const char *dir, const char *name)
{
    static char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s/%s.safetensors", TEST_SRCDIR, dir,
             name);
    return path;
}

/* Rewrites every tensor of file and the given metadata keys, and compares
 * the result with the file at path. */
static void assert_rewrites_same(const atmoe_safetensors *f, const char *path,
                                 const char *const *keys)
{
    atmoe_safetensors_writer *w = writer_ok();
    size_t n;
    ck_assert_status(atmoe_safetensors_get_count(f, &n), NULL);
    for (size_t i = 0; i < n; i++) {
        atmoe_safetensors_tensor t;
        ck_assert_status(atmoe_safetensors_get(f, i, &t), NULL);
        ck_assert_status(atmoe_safetensors_writer_add(w, t.name, t.dtype,
                                                      t.ndim, t.shape,
                                                      t.data),
                         NULL);
    }
    for (; keys && *keys; keys++) {
        const char *v;
        ck_assert_status(atmoe_safetensors_get_metadata(f, *keys, &v), NULL);
        ck_assert_status(atmoe_safetensors_writer_set_metadata(w, *keys, v),
                         NULL);
    }
    const char *out = tmp_path("rewritten.safetensors");
    ck_assert_status(atmoe_safetensors_writer_save(w, out), NULL);
    atmoe_safetensors_writer_free(w);
    assert_same_files(path, out);
}

static void assert_floats(const atmoe_safetensors *f, const char *name,
                          const float *want, size_t n)
{
    float got[8];
    test_poison(got, 8);
    ck_assert_status(atmoe_safetensors_read_f32(f, name, got, n), NULL);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(float_bits(got[i]) == float_bits(want[i]),
                      "%s[%zu]: got %a, want %a", name, i, got[i], want[i]);
}

START_TEST(test_fixture_reference)
{
    const char *names[] = {"reference-f32", "reference-padded"};
    const float want[6] = {0, 1, 2, 3, 4, 5};
    for (int k = 0; k < 2; k++) {
        const char *path = fixture("fixtures", names[k]);
        atmoe_safetensors *f = open_ok(path);
        size_t n;
        ck_assert_status(atmoe_safetensors_get_count(f, &n), NULL);
        ck_assert_uint_eq(n, 1);
        atmoe_safetensors_tensor t;
        ck_assert_status(atmoe_safetensors_get(f, 0, &t), NULL);
        ck_assert_str_eq(t.name, k ? "attn0" : "attn.0");
        ck_assert_int_eq(t.ndim, 3 + k);
        ck_assert_uint_eq(t.count, 6);
        assert_floats(f, t.name, want, 6);
        assert_rewrites_same(f, path, NULL);
        atmoe_safetensors_free(f);
    }

    const char *path = fixture("fixtures", "empty");
    atmoe_safetensors *f = open_ok(path);
    assert_rewrites_same(f, path, NULL);
    atmoe_safetensors_free(f);

    path = fixture("fixtures", "metadata-only");
    f = open_ok(path);
    const char *v;
    ck_assert_status(atmoe_safetensors_get_metadata(f, "framework", &v),
                     NULL);
    ck_assert_str_eq(v, "pt");
    const char *keys[] = {"framework", NULL};
    assert_rewrites_same(f, path, keys);
    atmoe_safetensors_free(f);
}
END_TEST

START_TEST(test_fixture_all_dtypes)
{
    const char *path = fixture("fixtures", "all-dtypes");
    atmoe_safetensors *f = open_ok(path);
    size_t n;
    ck_assert_status(atmoe_safetensors_get_count(f, &n), NULL);
    ck_assert_uint_eq(n, 16);

    const uint8_t b[4] = {1, 0, 0, 1}, u8[5] = {0, 1, 127, 128, 255};
    const int8_t i8[5] = {-128, -1, 0, 1, 127};
    const uint8_t e5m2[2] = {0x3c, 0x7b}, e4m3[3] = {0x38, 0xb8, 0x7e};
    unsigned char buf[16];
    assert_bytes(f, "bool", ATMOE_SAFETENSORS_BOOL, 2, (uint64_t[]){2, 2}, b, 4);
    assert_bytes(f, "u8", ATMOE_SAFETENSORS_U8, 1, (uint64_t[]){5}, u8, 5);
    assert_bytes(f, "i8", ATMOE_SAFETENSORS_I8, 1, (uint64_t[]){5}, i8, 5);
    assert_bytes(f, "f8_e5m2", ATMOE_SAFETENSORS_F8_E5M2, 1, (uint64_t[]){2}, e5m2, 2);
    assert_bytes(f, "f8_e4m3", ATMOE_SAFETENSORS_F8_E4M3, 1, (uint64_t[]){3}, e4m3, 3);
    const int16_t i16[3] = {-32768, -2, 32767};
    for (int i = 0; i < 3; i++)
        put_le(buf + 2 * i, (uint16_t)i16[i], 2);
    assert_bytes(f, "i16", ATMOE_SAFETENSORS_I16, 1, (uint64_t[]){3}, buf, 6);
    const uint16_t u16[3] = {0, 513, 65535};
    for (int i = 0; i < 3; i++)
        put_le(buf + 2 * i, u16[i], 2);
    assert_bytes(f, "u16", ATMOE_SAFETENSORS_U16, 2, (uint64_t[]){1, 3}, buf, 6);
    put_le(buf, (uint32_t)-123456789, 4);
    assert_bytes(f, "i32", ATMOE_SAFETENSORS_I32, 0, NULL, buf, 4);
    put_le(buf, 0, 4);
    put_le(buf + 4, 4294967295u, 4);
    assert_bytes(f, "u32", ATMOE_SAFETENSORS_U32, 1, (uint64_t[]){2}, buf, 8);
    put_le(buf, UINT64_C(1) << 63, 8);
    put_le(buf + 8, INT64_MAX, 8);
    assert_bytes(f, "i64", ATMOE_SAFETENSORS_I64, 1, (uint64_t[]){2}, buf, 16);
    put_le(buf, UINT64_MAX, 8);
    assert_bytes(f, "u64", ATMOE_SAFETENSORS_U64, 1, (uint64_t[]){1}, buf, 8);
    assert_bytes(f, "empty", ATMOE_SAFETENSORS_F32, 2, (uint64_t[]){0, 4}, buf, 0);

    const float f16[6] = {1.0f, -2.5f, 65504.0f, 0x1p-24f, INFINITY, -0.0f};
    const float bf16[3] = {1.0f, -3.140625f, 0x1p100f};
    const float f32[4] = {0.5f, -1.25f, 1e-40f, 3.4028234663852886e38f};
    const float f64[2] = {(float)-0.1, 2.5f};
    assert_floats(f, "f16", f16, 6);
    assert_floats(f, "bf16", bf16, 3);
    assert_floats(f, "f32", f32, 4);
    assert_floats(f, "f64", f64, 2);
    assert_floats(f, "empty", NULL, 0);

    const char *v;
    ck_assert_status(atmoe_safetensors_get_metadata(f, "source", &v), NULL);
    ck_assert_str_eq(v, "make_fixtures.py");
    const char *keys[] = {"format", "source", NULL};
    assert_rewrites_same(f, path, keys);
    atmoe_safetensors_free(f);
}
END_TEST

/* Older writers: data in name order, so not aligned, and a header in yet
 * another order, unpadded. */
START_TEST(test_fixture_legacy)
{
    atmoe_safetensors *f = open_ok(fixture("fixtures", "legacy-order"));
    const char *order[] = {"a", "b", "c"};
    for (size_t i = 0; i < 3; i++) {
        atmoe_safetensors_tensor t;
        ck_assert_status(atmoe_safetensors_get(f, i, &t), NULL);
        ck_assert_str_eq(t.name, order[i]);
    }
    const uint8_t a[3] = {7, 8, 9};
    assert_bytes(f, "a", ATMOE_SAFETENSORS_U8, 1, (uint64_t[]){3}, a, 3);
    assert_floats(f, "b", (const float[]){1.5f, -2.0f}, 2);
    unsigned char c[2];
    put_le(c, (uint16_t)-300, 2);
    assert_bytes(f, "c", ATMOE_SAFETENSORS_I16, 1, (uint64_t[]){1}, c, 2);
    atmoe_safetensors_free(f);
}
END_TEST

/* The malformed corpus, each with the words its message must hold. */
static const struct {
    const char *name;
    atmoe_status status;
    const char *words;
} bad_files[] = {
    {"empty-file", ATMOE_STATUS_FORMAT_ERROR, "too short"},
    {"short-length", ATMOE_STATUS_FORMAT_ERROR, "too short"},
    {"truncated-header", ATMOE_STATUS_FORMAT_ERROR, "past the end"},
    {"length-past-end", ATMOE_STATUS_FORMAT_ERROR, "past the end"},
    {"length-over-limit", ATMOE_STATUS_FORMAT_ERROR, "limit"},
    {"length-max", ATMOE_STATUS_FORMAT_ERROR, "limit"},
    {"empty-header", ATMOE_STATUS_FORMAT_ERROR, "not valid JSON"},
    {"invalid-json", ATMOE_STATUS_FORMAT_ERROR, "not valid JSON"},
    {"invalid-utf8", ATMOE_STATUS_FORMAT_ERROR, "not valid JSON"},
    {"nul-in-header", ATMOE_STATUS_FORMAT_ERROR, "not valid JSON"},
    {"trailing-garbage", ATMOE_STATUS_FORMAT_ERROR, "not valid JSON"},
    {"not-object", ATMOE_STATUS_FORMAT_ERROR, "not a JSON object"},
    {"header-string", ATMOE_STATUS_FORMAT_ERROR, "not valid JSON"},
    {"deep-nesting", ATMOE_STATUS_FORMAT_ERROR, "not valid JSON"},
    {"duplicate-name", ATMOE_STATUS_FORMAT_ERROR, "duplicate"},
    {"duplicate-metadata-key", ATMOE_STATUS_FORMAT_ERROR, "duplicate"},
    {"metadata-not-object", ATMOE_STATUS_FORMAT_ERROR, "__metadata__"},
    {"metadata-value-number", ATMOE_STATUS_FORMAT_ERROR, "'n'"},
    {"entry-not-object", ATMOE_STATUS_FORMAT_ERROR, "'a'"},
    {"missing-dtype", ATMOE_STATUS_FORMAT_ERROR, "dtype is missing"},
    {"missing-shape", ATMOE_STATUS_FORMAT_ERROR, "shape is missing"},
    {"missing-offsets", ATMOE_STATUS_FORMAT_ERROR, "data_offsets is missing"},
    {"dtype-number", ATMOE_STATUS_FORMAT_ERROR, "not a string"},
    {"unknown-dtype", ATMOE_STATUS_FORMAT_ERROR, "unknown dtype 'F128'"},
    {"lowercase-dtype", ATMOE_STATUS_FORMAT_ERROR, "unknown dtype 'f32'"},
    {"shape-not-array", ATMOE_STATUS_FORMAT_ERROR, "not an array"},
    {"shape-negative", ATMOE_STATUS_FORMAT_ERROR, "dimension 0"},
    {"shape-real", ATMOE_STATUS_FORMAT_ERROR, "dimension 0"},
    {"shape-string", ATMOE_STATUS_FORMAT_ERROR, "dimension 0"},
    {"shape-nine-dims", ATMOE_STATUS_FORMAT_ERROR, "9 dimensions"},
    {"shape-too-big", ATMOE_STATUS_FORMAT_ERROR, "not valid JSON"},
    {"shape-overflow", ATMOE_STATUS_FORMAT_ERROR, "overflows"},
    {"bytes-overflow", ATMOE_STATUS_FORMAT_ERROR, "overflows"},
    {"offsets-one", ATMOE_STATUS_FORMAT_ERROR, "two non-negative integers"},
    {"offsets-three", ATMOE_STATUS_FORMAT_ERROR, "two non-negative integers"},
    {"offsets-negative", ATMOE_STATUS_FORMAT_ERROR,
     "two non-negative integers"},
    {"offsets-real", ATMOE_STATUS_FORMAT_ERROR, "two non-negative integers"},
    {"offsets-reversed", ATMOE_STATUS_FORMAT_ERROR, "end before"},
    {"size-mismatch", ATMOE_STATUS_FORMAT_ERROR, "needs 8"},
    {"overlap", ATMOE_STATUS_FORMAT_ERROR, "overlap"},
    {"gap", ATMOE_STATUS_FORMAT_ERROR, "gap"},
    {"not-from-zero", ATMOE_STATUS_FORMAT_ERROR, "not 0"},
    {"offsets-past-end", ATMOE_STATUS_FORMAT_ERROR, "past the end"},
    {"data-after-end", ATMOE_STATUS_FORMAT_ERROR, "no tensor"},
    {"data-without-tensors", ATMOE_STATUS_FORMAT_ERROR, "no tensor"},
};
enum { N_BAD = sizeof bad_files / sizeof bad_files[0] };

START_TEST(test_bad_file)
{
    const char *path = fixture("safetensors-bad", bad_files[_i].name);
    ck_assert_msg(access(path, R_OK) == 0, "%s is missing", path);
    atmoe_safetensors *f = (atmoe_safetensors *)&f;
    atmoe_status st = atmoe_safetensors_open(NULL, path, &f);
    const char *msg = atmoe_errmsg(NULL);
    ck_assert_msg(st == bad_files[_i].status, "%s: %s (%s), want %s",
                  bad_files[_i].name, atmoe_status_name(st), msg,
                  atmoe_status_name(bad_files[_i].status));
    ck_assert_ptr_null(f);
    ck_assert_msg(strstr(msg, path) && strstr(msg, bad_files[_i].words),
                  "%s: the message does not name the file and '%s': %s",
                  bad_files[_i].name, bad_files[_i].words, msg);
}
END_TEST

/* Every file of the corpus is listed above, so none goes untested. */
START_TEST(test_bad_corpus_listed)
{
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/safetensors-bad", TEST_SRCDIR);
    struct dirent **names;
    int n = scandir(dir, &names, NULL, alphasort);
    ck_assert_msg(n >= 0, "%s: %s", dir, strerror(errno));
    int files = 0;
    for (int i = 0; i < n; i++) {
        const char *name = names[i]->d_name;
        size_t len = strlen(name);
        if (len > 12 && !strcmp(name + len - 12, ".safetensors")) {
            files++;
            int listed = 0;
            for (int k = 0; k < N_BAD; k++)
                listed |= strlen(bad_files[k].name) == len - 12 &&
                          !strncmp(bad_files[k].name, name, len - 12);
            ck_assert_msg(listed, "%s is not listed in bad_files", name);
        }
        free(names[i]);
    }
    free(names);
    ck_assert_int_eq(files, N_BAD);
}
END_TEST

Suite *safetensors_suite(void);
Suite *safetensors_suite(void)
{
    Suite *s = suite_create("safetensors");

    TCase *tc = tcase_create("read");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_read_basic);
    tcase_add_test(tc, test_read_empty);
    tcase_add_test(tc, test_read_all_halves);
    tcase_add_test(tc, test_open_errors);
    tcase_add_test(tc, test_null_arguments);
    tcase_add_test(tc, test_dtype_names);
    tcase_add_test(tc, test_context_message);
    suite_add_tcase(s, tc);

    tc = tcase_create("write");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_roundtrip_all_dtypes);
    tcase_add_test(tc, test_roundtrip_f32);
    tcase_add_test(tc, test_metadata);
    tcase_add_test(tc, test_reference_bytes);
    tcase_add_test(tc, test_writer_misuse);
    tcase_add_test(tc, test_save_failures);
    suite_add_tcase(s, tc);

    tc = tcase_create("files");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_fixture_reference);
    tcase_add_test(tc, test_fixture_all_dtypes);
    tcase_add_test(tc, test_fixture_legacy);
    tcase_add_loop_test(tc, test_bad_file, 0, N_BAD);
    tcase_add_test(tc, test_bad_corpus_listed);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(safetensors_suite());
}
