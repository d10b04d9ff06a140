/* safetensors files: reading files built byte by byte here, the f16 and
 * bf16 conversions against float64 references of the rounding, and the
 * statuses and messages of every misuse.  No OpenCL device is needed
 * except where a context's message is checked. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static void write_bytes(const char *path, const void *bytes, size_t n)
{
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "fopen(%s): %s", path, strerror(errno));
    ck_assert_uint_eq(fwrite(bytes, 1, n, f), n);
    ck_assert_int_eq(fclose(f), 0);
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
    write_bytes(path, buf, 8 + h + n);
    free(buf);
}

static void put_le(unsigned char *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t float_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static atmoe_safetensors *open_ok(const char *path)
{
    atmoe_safetensors *f = NULL;
    ck_assert_status(atmoe_safetensors_open(NULL, path, &f), NULL);
    ck_assert_ptr_nonnull(f);
    return f;
}

/* ------------------------------------------- float64 rounding references */

static double ref_f16_value(uint16_t h)
{
    int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    double v = exp == 31   ? (man ? NAN : INFINITY)
               : exp == 0 ? ldexp(man, -24)
                          : ldexp(man + 1024, exp - 25);
    return (h & 0x8000) ? -v : v;
}

static double ref_bf16_value(uint16_t h)
{
    int exp = (h >> 7) & 0xff, man = h & 0x7f;
    double v = exp == 255  ? (man ? NAN : INFINITY)
               : exp == 0 ? ldexp(man, -133)
                          : ldexp(man + 128, exp - 134);
    return (h & 0x8000) ? -v : v;
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
    ck_assert_status(atmoe_safetensors_count(f, &n), NULL);
    ck_assert_uint_eq(n, 6);

    /* Listed in the order of their data; ties (the zero-size tensor at the
     * end) by name. */
    const char *order[] = {"w", "h", "b", "d", "s", "empty"};
    atmoe_st_tensor t;
    for (size_t i = 0; i < n; i++) {
        ck_assert_status(atmoe_safetensors_get(f, i, &t), NULL);
        ck_assert_str_eq(t.name, order[i]);
    }
    ck_assert_fails(atmoe_safetensors_get(f, n, &t), NULL,
                    ATMOE_STATUS_OUT_OF_RANGE);

    ck_assert_status(atmoe_safetensors_find(f, "w", &t), NULL);
    ck_assert_int_eq(t.dtype, ATMOE_ST_F32);
    ck_assert_int_eq(t.ndim, 2);
    ck_assert_uint_eq(t.shape[0], 2);
    ck_assert_uint_eq(t.shape[1], 3);
    ck_assert_uint_eq(t.count, 6);
    ck_assert_uint_eq(t.nbytes, 24);
    ck_assert_int_eq(memcmp(t.data, data, 24), 0);

    ck_assert_status(atmoe_safetensors_find(f, "s", &t), NULL);
    ck_assert_int_eq(t.dtype, ATMOE_ST_I32);
    ck_assert_int_eq(t.ndim, 0);
    ck_assert_uint_eq(t.count, 1);
    ck_assert_uint_eq(t.nbytes, 4);
    ck_assert_int_eq(memcmp(t.data, data + 42, 4), 0);

    ck_assert_status(atmoe_safetensors_find(f, "empty", &t), NULL);
    ck_assert_int_eq(t.dtype, ATMOE_ST_U8);
    ck_assert_int_eq(t.ndim, 2);
    ck_assert_uint_eq(t.shape[0], 0);
    ck_assert_uint_eq(t.shape[1], 5);
    ck_assert_uint_eq(t.count, 0);
    ck_assert_uint_eq(t.nbytes, 0);

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
    atmoe_safetensors_close(f);
}
END_TEST

/* The smallest files: no tensors at all, with and without metadata. */
START_TEST(test_read_empty)
{
    const char *path = tmp_path("empty.safetensors");
    write_st(path, "{}      ", NULL, 0);
    atmoe_safetensors *f = open_ok(path);
    size_t n = 99;
    ck_assert_status(atmoe_safetensors_count(f, &n), NULL);
    ck_assert_uint_eq(n, 0);
    atmoe_st_tensor t;
    ck_assert_fails(atmoe_safetensors_get(f, 0, &t), NULL,
                    ATMOE_STATUS_OUT_OF_RANGE);
    ck_assert_fails(atmoe_safetensors_find(f, "x", &t), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    const char *value;
    ck_assert_fails(atmoe_safetensors_get_metadata(f, "format", &value), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    atmoe_safetensors_close(f);

    /* A null __metadata__ is no metadata, as in the reference reader. */
    write_st(path, "{\"__metadata__\":null}", NULL, 0);
    f = open_ok(path);
    ck_assert_fails(atmoe_safetensors_get_metadata(f, "format", &value), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    atmoe_safetensors_close(f);
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
            assert_same_value(got[h],
                              kind ? ref_bf16_value((uint16_t)h)
                                   : ref_f16_value((uint16_t)h),
                              names[kind], h);
        free(got);
        atmoe_safetensors_close(f);
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
    write_bytes(tmp_path("zero.safetensors"), "", 0);
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
    atmoe_st_tensor t;
    float x;
    const char *v;
    ck_assert_fails(atmoe_safetensors_count(NULL, &n), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_safetensors_count(f, NULL), NULL,
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
    atmoe_safetensors_close(f);
    atmoe_safetensors_close(NULL);
}
END_TEST

START_TEST(test_dtype_names)
{
    const char *want[] = {"BOOL", "U8",  "I8",  "F8_E4M3", "F8_E5M2",
                          "I16",  "U16", "F16", "BF16",    "I32",
                          "U32",  "F32", "I64", "U64",     "F64"};
    for (int d = ATMOE_ST_BOOL; d <= ATMOE_ST_F64; d++)
        ck_assert_str_eq(atmoe_st_dtype_name((atmoe_st_dtype)d), want[d]);
    ck_assert_str_eq(atmoe_st_dtype_name((atmoe_st_dtype)(ATMOE_ST_F64 + 1)),
                     "?");
    ck_assert_str_eq(atmoe_st_dtype_name((atmoe_st_dtype)-1), "?");
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
    return s;
}

int main(void)
{
    return test_run_suite(safetensors_suite());
}
