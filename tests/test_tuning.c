/* Tuning databases: parsing (valid files, malformed ones logged and
 * ignored), the user copy winning over the system copy, the lookup order
 * (device and driver, device, vendor and type), the path of the user copy,
 * saving entries, ATMOE_PARAMS=default, and a GEMM under a non-default
 * CLBlast parameter set checked against float64 on both of CLBlast's
 * paths.
 *
 * CLBlast's overrides last for the process, so the test that needs
 * CLBlast's built-in parameters comes first (tests share one process when
 * CK_FORK=no), and the lookup tests use "kernels" sections only (the
 * parameters of cl/linear.cl), which stay within their context. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "testutil.h"

/* A valid, non-default Xgemm set (CLBlast's GEMMK 0 kernel). */
#define XGEMM_SET                                                             \
    "{\"GEMMK\": 0, \"KREG\": 1, \"KWG\": 16, \"KWI\": 2, \"MDIMA\": 8, "     \
    "\"MDIMC\": 8, \"MWG\": 32, \"NDIMB\": 16, \"NDIMC\": 16, \"NWG\": 64, " \
    "\"SA\": 1, \"SB\": 0, \"STRM\": 0, \"STRN\": 1, \"VWM\": 2, \"VWN\": 4}"
#define DIRECT_SET                                                            \
    "{\"KWID\": 2, \"MDIMAD\": 8, \"MDIMCD\": 8, \"NDIMBD\": 8, "            \
    "\"NDIMCD\": 8, \"PADA\": 1, \"PADB\": 0, \"VWMD\": 2, \"VWND\": 1, "    \
    "\"WGD\": 16}"

static char tmpdir[4096];
static char sys_path[4200], user_path[4200];
static atmoe_device_info dev;

/* Warnings the library logged, one per line. */
static char logged[16384];

static void collect(atmoe_log_level level, const char *message, void *user)
{
    (void)user;
    if (level < ATMOE_LOG_WARNING)
        return;
    size_t at = strlen(logged);
    snprintf(logged + at, sizeof logged - at, "%s\n", message);
}

static void write_file(const char *path, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void write_file(const char *path, const char *fmt, ...)
{
    FILE *f = fopen(path, "w");
    ck_assert_msg(f != NULL, "cannot write %s", path);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    ck_assert_int_eq(fclose(f), 0);
}

/* Each test gets empty system and user databases of its own, read through
 * the environment, and the device's identity for writing entries. */
static void setup(void)
{
    test_mkdtemp(tmpdir, sizeof tmpdir, "tuning");
    snprintf(sys_path, sizeof sys_path, "%s/system.json", tmpdir);
    snprintf(user_path, sizeof user_path, "%s/user.json", tmpdir);
    setenv("ATMOE_TUNING_SYSTEM_FILE", sys_path, 1);
    setenv("ATMOE_TUNING_FILE", user_path, 1);
    unsetenv("ATMOE_PARAMS");
    size_t index;
    ck_assert_status(atmoe_device_get_default(&index), NULL);
    ck_assert_status(atmoe_device_get_info(index, &dev), NULL);
    logged[0] = '\0';
    ck_assert_status(atmoe_log_set(collect, NULL, ATMOE_LOG_WARNING), NULL);
}

static void teardown(void)
{
    atmoe_log_set(NULL, NULL, ATMOE_LOG_ERROR);
    unsetenv("ATMOE_PARAMS");
    test_rmdir_r(tmpdir);
}

/* The parameters in force on ctx, parsed. */
static json_t *params_of(atmoe_context *ctx)
{
    size_t need = 0;
    char small[4];
    ck_assert_fails(atmoe_context_get_params(ctx, small, sizeof small, &need),
                    ctx, ATMOE_STATUS_OUT_OF_RANGE);
    ck_assert_uint_gt(need, sizeof small);
    char *text = malloc(need);
    ck_assert_ptr_nonnull(text);
    ck_assert_status(atmoe_context_get_params(ctx, text, need, NULL), ctx);
    json_error_t je;
    json_t *p = json_loads(text, 0, &je);
    ck_assert_msg(p != NULL, "get_params gave no JSON: %s\n%s", je.text, text);
    free(text);
    return p;
}

/* kernels.<program>.defines.<name> in force on ctx, or -1 when the
 * program is not listed (every parameter at its default). */
static long long define_of(atmoe_context *ctx, const char *program,
                           const char *name, char *match, size_t size)
{
    json_t *p = params_of(ctx);
    json_t *k = json_object_get(json_object_get(p, "kernels"), program);
    json_t *v = json_object_get(json_object_get(k, "defines"), name);
    long long out = v ? json_integer_value(v) : -1;
    if (match)
        snprintf(match, size, "%s",
                 k ? json_string_value(json_object_get(k, "match")) : "");
    json_decref(p);
    return out;
}

/* kernels.<program>.from.<name>: where the value in force came from, or
 * "" when the program is not listed. */
static void from_of(atmoe_context *ctx, const char *program, const char *name,
                    char *from, size_t size)
{
    json_t *p = params_of(ctx);
    json_t *k = json_object_get(json_object_get(p, "kernels"), program);
    const char *v = json_string_value(
        json_object_get(json_object_get(k, "from"), name));
    snprintf(from, size, "%s", v ? v : "");
    json_decref(p);
}

/* An entry line: key fields then a "kernels" section setting SR of
 * program "linear" (value: 1 to 256). */
static void entry(char *out, size_t size, const char *device,
                  const char *driver, int value)
{
    char key[1024] = "";
    if (device)
        snprintf(key, sizeof key, "\"device\": \"%s\", ", device);
    if (driver)
        snprintf(key + strlen(key), sizeof key - strlen(key),
                 "\"driver\": \"%s\", ", driver);
    snprintf(out, size,
             "{%s\"vendor\": \"%s\", \"type\": \"%s\", \"kernels\": "
             "{\"linear\": {\"SR\": %d}}}",
             key, atmoe_vendor_name(dev.vendor),
             atmoe_device_type_name(dev.type), value);
}

/* y = x W^T (+ nothing) for odd shapes through the graph, against float64,
 * with the output poisoned before it is read. */
static void check_gemm(atmoe_context *ctx, size_t t, size_t d_in,
                       size_t d_out)
{
    test_rng rng;
    test_rng_seed(&rng, 1000 + t);
    float *x = malloc(t * d_in * sizeof *x), *w = malloc(d_out * d_in * sizeof *w);
    float *y = malloc(t * d_out * sizeof *y);
    double *ref = malloc(t * d_out * sizeof *ref);
    ck_assert(x && w && y && ref);
    test_fill_uniform(&rng, x, t * d_in, -1, 1);
    test_fill_uniform(&rng, w, d_out * d_in, -1, 1);
    for (size_t i = 0; i < t; i++)
        for (size_t j = 0; j < d_out; j++) {
            double s = 0;
            for (size_t k = 0; k < d_in; k++)
                s += (double)x[i * d_in + k] * w[j * d_in + k];
            ref[i * d_out + j] = s;
        }
    atmoe_graph *g;
    atmoe_node xn, wn, yn;
    size_t xs[2] = {t, d_in}, ws[2] = {d_out, d_in};
    ck_assert_status(atmoe_graph_new(ctx, &g), ctx);
    ck_assert_status(atmoe_graph_input(g, "x", ATMOE_DTYPE_F32, 2, xs, 0, &xn),
                     ctx);
    ck_assert_status(atmoe_graph_constant(g, "w", ATMOE_DTYPE_F32, 2, ws, w,
                                          &wn), ctx);
    ck_assert_status(atmoe_graph_matmul(g, xn, wn, ATMOE_NODE_NONE,
                                        ATMOE_MATMUL_TRANSPOSE_B, &yn), ctx);
    ck_assert_status(atmoe_graph_mark_output(g, yn), ctx);
    ck_assert_status(atmoe_graph_plan(g, 0), ctx);
    ck_assert_status(atmoe_graph_set_input(g, xn, x, t * d_in * sizeof *x, 0),
                     ctx);
    ck_assert_status(atmoe_graph_compute(g, 0), ctx);
    test_poison(y, t * d_out);
    ck_assert_status(atmoe_graph_read(g, yn, y, t * d_out * sizeof *y), ctx);
    /* fp32 sums of d_in products of values in [-1, 1]. */
    double err = test_max_rel_err(y, ref, t * d_out, 1.0);
    ck_assert_msg(err < 1e-5, "T=%zu %zux%zu: relative error %g", t, d_in,
                  d_out, err);
    atmoe_graph_free(g);
    free(x);
    free(w);
    free(y);
    free(ref);
}

/* ---------------------------------------------------------------- tests */

START_TEST(test_params_default_env)
{
    write_file(user_path,
               "{\"atmoe_tuning\": 1, \"entries\": [{\"device\": \"%s\", "
               "\"vendor\": \"%s\", \"type\": \"%s\", \"clblast\": "
               "{\"Xgemm\": " XGEMM_SET "}}]}\n",
               dev.name, atmoe_vendor_name(dev.vendor),
               atmoe_device_type_name(dev.type));
    setenv("ATMOE_PARAMS", "default", 1);
    atmoe_context *ctx = test_context();
    json_t *p = params_of(ctx);
    ck_assert_str_eq(json_string_value(json_object_get(p, "mode")), "default");
    ck_assert_uint_eq(json_object_size(json_object_get(p, "clblast")), 0);
    json_decref(p);
    /* Nothing was overridden, so asking for the defaults again works. */
    ck_assert_status(atmoe_context_set_params(ctx, "default"), ctx);
    check_gemm(ctx, 3, 5, 7);
    atmoe_context_free(ctx);
    ck_assert_str_eq(logged, "");
}
END_TEST

START_TEST(test_check_valid)
{
    char a[2048], b[2048], c[2048];
    entry(a, sizeof a, NULL, NULL, 1);
    entry(b, sizeof b, dev.name, NULL, 2);
    entry(c, sizeof c, dev.name, "some driver", 3);
    write_file(sys_path,
               "{\"atmoe_tuning\": 1, \"entries\": [%s, %s, %s, "
               "{\"vendor\": \"NVIDIA\", \"type\": \"GPU\", \"clblast\": "
               "{\"Xgemm\": " XGEMM_SET ", \"XgemmDirect\": " DIRECT_SET
               ", \"GemmRoutine\": {\"XGEMM_MIN_INDIRECT_SIZE\": 512}}, "
               "\"info\": {\"by\": \"hand\"}}]}\n",
               a, b, c);
    size_t n = 0;
    ck_assert_status(atmoe_tuning_check(sys_path, &n), NULL);
    ck_assert_uint_eq(n, 4);
    ck_assert_status(atmoe_tuning_check(sys_path, NULL), NULL);

    write_file(sys_path, "{\"atmoe_tuning\": 1, \"entries\": []}");
    ck_assert_status(atmoe_tuning_check(sys_path, &n), NULL);
    ck_assert_uint_eq(n, 0);

    /* The database installed with the library is valid. */
    const char *srcdir = getenv("srcdir");
    char shipped[4200];
    snprintf(shipped, sizeof shipped, "%s/data/tuning.json",
             srcdir ? srcdir : ".");
    ck_assert_status(atmoe_tuning_check(shipped, NULL), NULL);

    ck_assert_fails(atmoe_tuning_check(user_path, NULL), NULL,
                    ATMOE_STATUS_IO_ERROR);
    ck_assert_fails(atmoe_tuning_check(NULL, NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
}
END_TEST

/* Malformed databases: refused by atmoe_tuning_check with a message naming
 * the fault, and ignored with a warning by a context, which still works. */
START_TEST(test_malformed)
{
    static const struct {
        const char *text, *says;
    } bad[] = {
        {"{\"atmoe_tuning\": 1, \"entries\": [", "line"},
        {"[]", "top level"},
        {"{\"entries\": []}", "version"},
        {"{\"atmoe_tuning\": 2, \"entries\": []}", "version 2"},
        {"{\"atmoe_tuning\": 1, \"entries\": {}}", "entries"},
        {"{\"atmoe_tuning\": 1, \"entries\": [], \"extra\": 1}", "extra"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"type\": \"CPU\"}]}",
         "vendor"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"ACME\", "
         "\"type\": \"CPU\"}]}", "ACME"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"driver\": \"3\"}]}", "driver needs a device"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"clblas\": {}}]}", "clblas"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\"}, {\"vendor\": \"PoCL\", \"type\": \"CPU\"}]}",
         "same key"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"clblast\": {\"Xgemv\": {}}}]}", "Xgemv"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"clblast\": {\"GemmRoutine\": {}}}]}",
         "XGEMM_MIN_INDIRECT_SIZE"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"clblast\": {\"GemmRoutine\": "
         "{\"XGEMM_MIN_INDIRECT_SIZE\": -1}}}]}", "outside"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"clblast\": {\"GemmRoutine\": "
         "{\"XGEMM_MIN_INDIRECT_SIZE\": 1.5}}}]}", "integer"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"clblast\": {\"Copy\": {\"COPY_DIMX\": 8, "
         "\"COPY_DIMY\": 8, \"COPY_VW\": 4, \"COPY_WPT\": 1, \"X\": 1}}}]}",
         "no parameter 'X'"},
        /* MWG 48 is not a multiple of MDIMC * VWM = 32 */
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"clblast\": {\"Xgemm\": {\"GEMMK\": 0, "
         "\"KREG\": 1, \"KWG\": 16, \"KWI\": 2, \"MDIMA\": 8, \"MDIMC\": 8, "
         "\"MWG\": 48, \"NDIMB\": 16, \"NDIMC\": 16, \"NWG\": 64, \"SA\": 1, "
         "\"SB\": 0, \"STRM\": 0, \"STRN\": 1, \"VWM\": 4, \"VWN\": 4}}}]}",
         "MWG (48) is not a multiple of MDIMC*VWM"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": {\"SR\": \"1 -DB\"}}}]}",
         "kernels.linear.SR is not an integer in [1, 256]"},
        /* GEMMK 1 with unequal tiles: CLBlast 1.5 writes past C */
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"clblast\": {\"Xgemm\": {\"GEMMK\": 1, "
         "\"KREG\": 4, \"KWG\": 1, \"KWI\": 1, \"MDIMA\": 8, \"MDIMC\": 8, "
         "\"MWG\": 64, \"NDIMB\": 8, \"NDIMC\": 8, \"NWG\": 128, \"SA\": 0, "
         "\"SB\": 0, \"STRM\": 0, \"STRN\": 0, \"VWM\": 4, \"VWN\": 4}}}]}",
         "MWG = NWG"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": {\"2A\": 1}}}]}",
         "kernels.linear has no parameter '2A'"},
        /* The "kernels" section has the schema of the parameter table: a
         * program it lists, names it has, values in their ranges. */
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"probe\": {\"A\": 1}}}]}",
         "'probe' is not a program with tuned parameters (linear, "
         "router, mixture, "
         "linear.f32, linear.f16, linear.bf16, linear.q8, kmeans, "
         "optimizer)"},
        /* A typed program has the blocks alone: the boundary with
         * CLBlast is the untyped program's. */
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear.bf16\": "
         "{\"MAX_TOKENS\": 4}}}]}",
         "kernels.linear.bf16 has no parameter 'MAX_TOKENS' (it has SR, ST)"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear.q4\": {\"SR\": 4}}}]}",
         "'linear.q4' is not a program"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": {\"SRR\": 4}}}]}",
         "no parameter 'SRR' (it has SR, ST, MAX_TOKENS, VARIANT, "
         "GROUP_SIZE, GROUP_ROWS, TILE_MIN_TOKENS, TILE_TOKENS, TILE_ROWS, "
         "TILE_K, TILE_WT, TILE_WR, VECTOR_WIDTH)"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": "
         "{\"TILE_K\": 65}}}]}",
         "kernels.linear.TILE_K = 65 is not an integer in [1, 64]"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": {\"SR\": 0}}}]}",
         "kernels.linear.SR = 0 is not an integer in [1, 256]"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": {\"ST\": 257}}}]}",
         "kernels.linear.ST = 257"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": "
         "{\"MAX_TOKENS\": 0}}}]}",
         "kernels.linear.MAX_TOKENS = 0 is not an integer of at least 1"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": "
         "{\"VARIANT\": 2}}}]}",
         "kernels.linear.VARIANT = 2 is not an integer in [0, 1]"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": "
         "{\"GROUP_SIZE\": 0}}}]}",
         "kernels.linear.GROUP_SIZE = 0 is not an integer in [1, 1024]"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": "
         "{\"GROUP_ROWS\": 17}}}]}",
         "kernels.linear.GROUP_ROWS = 17 is not an integer in [1, 16]"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": {\"ROWS\": 2}}}]}",
         "no parameter 'ROWS'"},
        /* The mix's items, the router's passes, the fused variant. */
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"mixture\": {\"VW\": 17}}}]}",
         "kernels.mixture.VW = 17 is not an integer in [1, 16]"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"mixture\": {\"TPI\": 0}}}]}",
         "kernels.mixture.TPI = 0 is not an integer in [1, 64]"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"router\": {\"LPI\": 65}}}]}",
         "kernels.router.LPI = 65 is not an integer in [1, 64]"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"mixture\": "
         "{\"VARIANT\": 2}}}]}",
         "kernels.mixture.VARIANT = 2 is not an integer in [0, 1]"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"mixture\": "
         "{\"FUSED_MAX_TOKENS\": 65}}}]}",
         "kernels.mixture.FUSED_MAX_TOKENS = 65 is not an integer in [1, 64]"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"mixture\": {\"WGG\": 2}}}]}",
         "kernels.mixture has no parameter 'WGG' (it has WG, VW, TPI, "
         "VARIANT, FUSED_MAX_TOKENS, FUSED_ROWS, FUSED_GS)"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": {\"linear\": 3}}]}",
         "kernels.linear is not an object"},
        {"{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"PoCL\", "
         "\"type\": \"CPU\", \"kernels\": []}]}",
         "kernels is not an object"},
    };
    char good[2048];
    entry(good, sizeof good, dev.name, NULL, 5);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_file(user_path, "%s", bad[i].text);
        ck_assert_fails(atmoe_tuning_check(user_path, NULL), NULL,
                        ATMOE_STATUS_FORMAT_ERROR);
        ck_assert_msg(strstr(atmoe_errmsg(NULL), bad[i].says) != NULL,
                      "case %zu: '%s' does not say '%s'", i,
                      atmoe_errmsg(NULL), bad[i].says);
        ck_assert_msg(strstr(atmoe_errmsg(NULL), user_path) != NULL,
                      "case %zu: the message does not name the file", i);
    }

    /* A context ignores the bad user copy, warns, and still reads the
     * system copy and computes. */
    write_file(sys_path, "{\"atmoe_tuning\": 1, \"entries\": [%s]}", good);
    write_file(user_path, "%s", bad[16].text); /* the MWG case */
    logged[0] = '\0';
    atmoe_context *ctx = test_context();
    ck_assert_msg(strstr(logged, user_path) && strstr(logged, "ignored"),
                  "no warning naming the ignored file: '%s'", logged);
    ck_assert_int_eq(define_of(ctx, "linear", "SR", NULL, 0), 5);
    check_gemm(ctx, 3, 5, 7);
    atmoe_context_free(ctx);

    /* An unreadable path (a directory) is one more malformed file. */
    write_file(user_path, "{\"atmoe_tuning\": 1, \"entries\": []}");
    setenv("ATMOE_TUNING_SYSTEM_FILE", tmpdir, 1);
    logged[0] = '\0';
    ctx = test_context();
    ck_assert_msg(strstr(logged, tmpdir) != NULL, "no warning: '%s'", logged);
    ck_assert_int_eq(define_of(ctx, "linear", "SR", NULL, 0), -1);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_user_wins)
{
    char s2[2048], u1[2048];
    entry(s2, sizeof s2, NULL, NULL, 2);
    entry(u1, sizeof u1, dev.name, NULL, 7);
    /* The system's device entry also sets ST: the user's entry of the
     * same key replaces it whole. */
    write_file(sys_path,
               "{\"atmoe_tuning\": 1, \"entries\": [{\"device\": \"%s\", "
               "\"vendor\": \"%s\", \"type\": \"%s\", \"kernels\": "
               "{\"linear\": {\"SR\": 1, \"ST\": 4}}}, %s]}",
               dev.name, atmoe_vendor_name(dev.vendor),
               atmoe_device_type_name(dev.type), s2);
    write_file(user_path, "{\"atmoe_tuning\": 1, \"entries\": [%s]}", u1);
    atmoe_context *ctx = test_context();
    char match[64];
    ck_assert_int_eq(define_of(ctx, "linear", "SR", match,
                               sizeof match), 7);
    ck_assert_str_eq(match, "device");
    /* ST is not the system's 4 but the default. */
    char from[64];
    ck_assert_int_eq(define_of(ctx, "linear", "ST", NULL, 0), 8);
    from_of(ctx, "linear", "ST", from, sizeof from);
    ck_assert_str_eq(from, "default");
    from_of(ctx, "linear", "SR", from, sizeof from);
    ck_assert_str_eq(from, "database");
    json_t *p = params_of(ctx);
    ck_assert_str_eq(json_string_value(json_object_get(
                         json_object_get(json_object_get(p, "kernels"),
                                         "linear"),
                         "file")),
                     user_path);
    json_decref(p);
    atmoe_context_free(ctx);

    /* Without the user copy, the system's entry is back. */
    unlink(user_path);
    ctx = test_context();
    ck_assert_int_eq(define_of(ctx, "linear", "SR", NULL, 0), 1);
    ck_assert_int_eq(define_of(ctx, "linear", "ST", NULL, 0), 4);
    atmoe_context_free(ctx);
    ck_assert_str_eq(logged, "");
}
END_TEST

START_TEST(test_lookup_order)
{
    static const struct {
        int vendor_type, device, other_driver, this_driver, other_device;
        long long want;
        const char *match;
    } cases[] = {
        {0, 0, 0, 0, 0, -1, ""},
        {0, 0, 0, 0, 1, -1, ""},
        {1, 0, 0, 0, 1, 1, "vendor+type"},
        {1, 1, 0, 0, 1, 2, "device"},
        {1, 1, 1, 0, 1, 2, "device"},
        {1, 1, 1, 1, 1, 4, "device+driver"},
        {0, 0, 0, 1, 0, 4, "device+driver"},
        {0, 0, 1, 0, 0, -1, ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char list[8192] = "", e[2048];
        int n = 0;
#define ADD(cond, dname, drv, value)                                          \
        if (cond) {                                                           \
            entry(e, sizeof e, dname, drv, value);                            \
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", \
                     n++ ? ", " : "", e);                                     \
        }
        ADD(cases[i].vendor_type, NULL, NULL, 1);
        ADD(cases[i].device, dev.name, NULL, 2);
        ADD(cases[i].other_driver, dev.name, "not this driver", 3);
        ADD(cases[i].this_driver, dev.name, dev.driver_version, 4);
        ADD(cases[i].other_device, "not this device", NULL, 5);
#undef ADD
        /* Half the cases from the system copy, half from the user's. */
        write_file(i % 2 ? sys_path : user_path,
                   "{\"atmoe_tuning\": 1, \"entries\": [%s]}", list);
        write_file(i % 2 ? user_path : sys_path,
                   "{\"atmoe_tuning\": 1, \"entries\": []}");
        atmoe_context *ctx = test_context();
        char match[64];
        long long got = define_of(ctx, "linear", "SR", match,
                                  sizeof match);
        ck_assert_msg(got == cases[i].want, "case %zu: SR = %lld, "
                      "want %lld", i, got, cases[i].want);
        ck_assert_msg(strcmp(match, cases[i].match) == 0,
                      "case %zu: match '%s', want '%s'", i, match,
                      cases[i].match);
        /* set_params("tuned") reads the files again. */
        write_file(user_path, "{\"atmoe_tuning\": 1, \"entries\": []}");
        write_file(sys_path, "{\"atmoe_tuning\": 1, \"entries\": []}");
        ck_assert_status(atmoe_context_set_params(ctx, "tuned"), ctx);
        ck_assert_int_eq(define_of(ctx, "linear", "SR", NULL, 0), -1);
        atmoe_context_free(ctx);
    }
    ck_assert_str_eq(logged, "");
}
END_TEST

/* One batch of T tokens of a block mixture with one expert, on ctx, in a
 * graph of its own (planned under the parameters then in force), against
 * float64: y = x W0^T + c g (alpha / rank) (x A^T) B^T. */
static void check_mixture(atmoe_context *ctx)
{
    enum { T = 1, DI = 8, DO = 5, R = 2 };
    test_rng rng;
    test_rng_seed(&rng, 77);
    float x[T * DI], w0[DO * DI], a[R * DI], b[DO * R], g[T], y[T * DO];
    test_fill_uniform(&rng, x, T * DI, -1, 1);
    test_fill_uniform(&rng, w0, DO * DI, -1, 1);
    test_fill_uniform(&rng, a, R * DI, -1, 1);
    test_fill_uniform(&rng, b, DO * R, -1, 1);
    test_fill_uniform(&rng, g, T, 0, 1);
    const float alpha = 4, c = 0.5f;
    double ref[T * DO];
    for (int t = 0; t < T; t++)
        for (int o = 0; o < DO; o++) {
            double base = 0, lora = 0;
            for (int k = 0; k < DI; k++)
                base += (double)x[t * DI + k] * w0[o * DI + k];
            for (int r = 0; r < R; r++) {
                double u = 0;
                for (int k = 0; k < DI; k++)
                    u += (double)x[t * DI + k] * a[r * DI + k];
                lora += u * b[o * R + r];
            }
            ref[t * DO + o] = base + c * g[t] * (alpha / R) * lora;
        }
    atmoe_experts *set;
    ck_assert_status(atmoe_experts_new(ctx, DI, DO, &set), ctx);
    ck_assert_status(atmoe_experts_add(set, 0, R, a, b, alpha, 0, NULL), ctx);
    atmoe_graph *gr;
    atmoe_node xn, gn, wn, yn;
    size_t xs[2] = {T, DI}, gs[2] = {T, 1}, ws[2] = {DO, DI};
    ck_assert_status(atmoe_graph_new(ctx, &gr), ctx);
    ck_assert_status(atmoe_graph_input(gr, "x", ATMOE_DTYPE_F32, 2, xs, 1,
                                       &xn), ctx);
    ck_assert_status(atmoe_graph_input(gr, "g", ATMOE_DTYPE_F32, 2, gs, 1,
                                       &gn), ctx);
    ck_assert_status(atmoe_graph_constant(gr, "w0", ATMOE_DTYPE_F32, 2, ws,
                                          w0, &wn), ctx);
    ck_assert_status(atmoe_graph_mixture(gr, xn, wn, ATMOE_NODE_NONE, set,
                                         ATMOE_MIX_BLOCK, gn, ATMOE_NODE_NONE,
                                         c, &yn), ctx);
    ck_assert_status(atmoe_graph_mark_output(gr, yn), ctx);
    ck_assert_status(atmoe_graph_plan(gr, 0), ctx);
    ck_assert_status(atmoe_graph_set_input(gr, xn, x, sizeof x, T), ctx);
    ck_assert_status(atmoe_graph_set_input(gr, gn, g, sizeof g, T), ctx);
    ck_assert_status(atmoe_graph_compute(gr, T), ctx);
    test_poison(y, T * DO);
    ck_assert_status(atmoe_graph_read(gr, yn, y, sizeof y), ctx);
    double err = test_max_rel_err(y, ref, T * DO, 1.0);
    ck_assert_msg(err < 1e-5, "mixture: relative error %g", err);
    atmoe_graph_free(gr);
    atmoe_experts_free(set);
}

/* The parameters of "linear" reach the build of cl/linear.cl, through the
 * options its caller writes from atm_param_get: other values build the
 * program again, the same values find it built, and either computes
 * right. */
START_TEST(test_linear_params_build)
{
    write_file(sys_path,
               "{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"%s\", "
               "\"type\": \"%s\", \"kernels\": {\"linear\": "
               "{\"SR\": 2, \"ST\": 1}}}]}",
               atmoe_vendor_name(dev.vendor),
               atmoe_device_type_name(dev.type));
    atmoe_context *ctx = test_context();
    ck_assert_status(atmoe_context_set_cache_dir(ctx, NULL), ctx);
    ck_assert_int_eq(define_of(ctx, "linear", "SR", NULL, 0), 2);
    ck_assert_int_eq(define_of(ctx, "linear", "ST", NULL, 0), 1);
    check_mixture(ctx);
    atmoe_cache_stats before, after;
    ck_assert_status(atmoe_context_get_cache_stats(ctx, &before), ctx);
    ck_assert_uint_ge(before.builds, 1);

    /* The same values as an explicit set: nothing to build. */
    ck_assert_status(atmoe_context_set_params(
                         ctx, "{\"kernels\": {\"linear\": {\"SR\": 2, "
                              "\"ST\": 1}}}"), ctx);
    check_mixture(ctx);
    ck_assert_status(atmoe_context_get_cache_stats(ctx, &after), ctx);
    ck_assert_uint_eq(after.builds, before.builds);

    /* Other values: cl/linear.cl once more. */
    ck_assert_status(atmoe_context_set_params(
                         ctx, "{\"kernels\": {\"linear\": {\"SR\": 4}}}"),
                     ctx);
    check_mixture(ctx);
    ck_assert_status(atmoe_context_get_cache_stats(ctx, &after), ctx);
    ck_assert_uint_eq(after.builds, before.builds + 1);
    json_t *p = params_of(ctx);
    ck_assert_str_eq(json_string_value(json_object_get(p, "mode")), "custom");
    json_decref(p);
    char from[64];
    from_of(ctx, "linear", "SR", from, sizeof from);
    ck_assert_str_eq(from, "explicit");
    ck_assert_int_eq(define_of(ctx, "linear", "ST", NULL, 0), 8);
    atmoe_context_free(ctx);
    ck_assert_str_eq(logged, "");
}
END_TEST

/* The blocks keyed by W's storage type: a typed program ("linear.bf16")
 * wins for its type; without one the untyped "linear" holds (databases
 * written before weights had types apply to every type), which
 * atmoe_context_get_params reports as where the value came from.  A set
 * for another type builds nothing new for an f32 mixture; one for f32
 * builds cl/linear.cl again. */
START_TEST(test_linear_params_by_type)
{
    atmoe_context *ctx = test_context();
    ck_assert_status(atmoe_context_set_cache_dir(ctx, NULL), ctx);
    ck_assert_status(atmoe_context_set_params(
                         ctx, "{\"kernels\": {\"linear\": {\"SR\": 2, "
                              "\"ST\": 1}}}"), ctx);
    check_mixture(ctx);
    atmoe_cache_stats before, after;
    ck_assert_status(atmoe_context_get_cache_stats(ctx, &before), ctx);
    ck_assert_int_eq(define_of(ctx, "linear.bf16", "SR", NULL, 0), -1);

    ck_assert_status(atmoe_context_set_params(
                         ctx, "{\"kernels\": {\"linear\": {\"SR\": 2, "
                              "\"ST\": 1}, \"linear.bf16\": {\"SR\": 3}}}"),
                     ctx);
    ck_assert_int_eq(define_of(ctx, "linear.bf16", "SR", NULL, 0), 3);
    ck_assert_int_eq(define_of(ctx, "linear.bf16", "ST", NULL, 0), 1);
    char from[64];
    from_of(ctx, "linear.bf16", "ST", from, sizeof from);
    ck_assert_str_eq(from, "linear");
    from_of(ctx, "linear.bf16", "SR", from, sizeof from);
    ck_assert_str_eq(from, "explicit");
    ck_assert_int_eq(define_of(ctx, "linear.f32", "SR", NULL, 0), -1);
    ck_assert_int_eq(define_of(ctx, "linear.q8", "SR", NULL, 0), -1);
    check_mixture(ctx);
    ck_assert_status(atmoe_context_get_cache_stats(ctx, &after), ctx);
    ck_assert_uint_eq(after.builds, before.builds);

    ck_assert_status(atmoe_context_set_params(
                         ctx, "{\"kernels\": {\"linear\": {\"SR\": 2, "
                              "\"ST\": 1}, \"linear.f32\": {\"SR\": 3}}}"),
                     ctx);
    check_mixture(ctx);
    ck_assert_status(atmoe_context_get_cache_stats(ctx, &after), ctx);
    ck_assert_uint_eq(after.builds, before.builds + 1);

    /* 8-bit blocks have their own program too. */
    ck_assert_status(atmoe_context_set_params(
                         ctx, "{\"kernels\": {\"linear\": {\"SR\": 2, "
                              "\"ST\": 1}, \"linear.q8\": {\"ST\": 5}}}"),
                     ctx);
    ck_assert_int_eq(define_of(ctx, "linear.q8", "ST", NULL, 0), 5);
    ck_assert_int_eq(define_of(ctx, "linear.q8", "SR", NULL, 0), 2);
    from_of(ctx, "linear.q8", "SR", from, sizeof from);
    ck_assert_str_eq(from, "linear");
    atmoe_context_free(ctx);
    ck_assert_str_eq(logged, "");
}
END_TEST

/* A database read by a context loses only the keys of its "kernels"
 * sections at fault, each named in a warning; the same file is refused by
 * atmoe_tuning_check, and the same set by atmoe_context_set_params, which
 * then changes nothing. */
START_TEST(test_kernels_schema)
{
    write_file(sys_path,
               "{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"%s\", "
               "\"type\": \"%s\", \"kernels\": {\"linear\": "
               "{\"SRR\": 4, \"SR\": 0, \"ST\": 3, \"MAX_TOKENS\": 12}, "
               "\"probe\": {\"A\": 1}}}]}",
               atmoe_vendor_name(dev.vendor),
               atmoe_device_type_name(dev.type));
    ck_assert_fails(atmoe_tuning_check(sys_path, NULL), NULL,
                    ATMOE_STATUS_FORMAT_ERROR);
    ck_assert_msg(strstr(atmoe_errmsg(NULL), "SRR") != NULL, "message: %s",
                  atmoe_errmsg(NULL));

    atmoe_context *ctx = test_context();
    ck_assert_str_eq(atmoe_errmsg(ctx), "");
    ck_assert_msg(strstr(logged, "'SRR'") && strstr(logged, "linear.SR = 0")
                  && strstr(logged, "'probe'") && strstr(logged, sys_path),
                  "warnings do not name the keys and the file: '%s'", logged);
    char from[64];
    ck_assert_int_eq(define_of(ctx, "linear", "ST", NULL, 0), 3);
    ck_assert_int_eq(define_of(ctx, "linear", "MAX_TOKENS", NULL, 0), 12);
    ck_assert_int_eq(define_of(ctx, "linear", "SR", NULL, 0), 8);
    from_of(ctx, "linear", "SR", from, sizeof from);
    ck_assert_str_eq(from, "default");
    json_t *p = params_of(ctx);
    ck_assert_ptr_null(json_object_get(json_object_get(p, "kernels"),
                                       "probe"));
    json_decref(p);

    static const struct {
        const char *set, *says;
    } refused[] = {
        {"{\"kernels\": {\"linear\": {\"SRR\": 1}}}", "'SRR'"},
        {"{\"kernels\": {\"linear\": {\"ST\": 0}}}", "kernels.linear.ST = 0"},
        {"{\"kernels\": {\"linear\": {\"SR\": 3, \"ST\": 3, \"ROWS\": 2}}}",
         "'ROWS'"},
        {"{\"kernels\": {\"linear\": {\"MAX_TOKENS\": 2.5}}}",
         "kernels.linear.MAX_TOKENS is not an integer"},
        {"{\"kernels\": {\"tensor\": {\"X\": 1}}}", "'tensor'"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        ck_assert_fails(atmoe_context_set_params(ctx, refused[i].set), ctx,
                        ATMOE_STATUS_FORMAT_ERROR);
        ck_assert_msg(strstr(atmoe_errmsg(ctx), refused[i].says) != NULL,
                      "case %zu: '%s' does not say '%s'", i,
                      atmoe_errmsg(ctx), refused[i].says);
        ck_assert_int_eq(define_of(ctx, "linear", "ST", NULL, 0), 3);
        p = params_of(ctx);
        ck_assert_str_eq(json_string_value(json_object_get(p, "mode")),
                         "tuned");
        json_decref(p);
    }
    atmoe_context_free(ctx);
}
END_TEST

/* sources.<program>.<field> of the parameters in force, or "" (a
 * boolean as "true" or "false"). */
static void source_of(atmoe_context *ctx, const char *program,
                      const char *field, char *out, size_t size)
{
    json_t *p = params_of(ctx);
    json_t *v = json_object_get(
        json_object_get(json_object_get(p, "sources"), program), field);
    snprintf(out, size, "%s",
             json_is_string(v)  ? json_string_value(v)
             : json_is_true(v)  ? "true"
             : json_is_false(v) ? "false"
                                : "");
    json_decref(p);
}

/* The sources section says, for each program with parameters and each
 * CLBlast kernel in force, where its parameters came from: a shipped class
 * default (a vendor+type entry whose info says untuned) in the system
 * database, a tuned entry of the user's with the host it was tuned on,
 * another program's values (linear.f32 takes linear's), or the built-in
 * defaults; an explicit set says so. */
START_TEST(test_param_sources)
{
    write_file(sys_path,
               "{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"%s\", "
               "\"type\": \"%s\", \"kernels\": {\"linear\": {\"SR\": 8}}, "
               "\"info\": {\"untuned\": true}}]}",
               atmoe_vendor_name(dev.vendor),
               atmoe_device_type_name(dev.type));
    write_file(user_path,
               "{\"atmoe_tuning\": 1, \"entries\": [{\"device\": \"%s\", "
               "\"driver\": \"%s\", \"vendor\": \"%s\", \"type\": \"%s\", "
               "\"kernels\": {\"router\": {\"WG\": 8}}, "
               "\"info\": {\"host\": \"tuner-host\"}}]}",
               dev.name, dev.driver_version, atmoe_vendor_name(dev.vendor),
               atmoe_device_type_name(dev.type));
    atmoe_context *ctx = test_context();
    char v[4200];
    source_of(ctx, "linear", "from", v, sizeof v);
    ck_assert_str_eq(v, "system");
    source_of(ctx, "linear", "match", v, sizeof v);
    ck_assert_str_eq(v, "vendor+type");
    source_of(ctx, "linear", "untuned", v, sizeof v);
    ck_assert_str_eq(v, "true");
    source_of(ctx, "linear", "file", v, sizeof v);
    ck_assert_str_eq(v, sys_path);
    source_of(ctx, "router", "from", v, sizeof v);
    ck_assert_str_eq(v, "user");
    source_of(ctx, "router", "match", v, sizeof v);
    ck_assert_str_eq(v, "device+driver");
    source_of(ctx, "router", "host", v, sizeof v);
    ck_assert_str_eq(v, "tuner-host");
    source_of(ctx, "router", "untuned", v, sizeof v);
    ck_assert_str_eq(v, "false");
    source_of(ctx, "linear.f32", "from", v, sizeof v);
    ck_assert_str_eq(v, "fallback");
    source_of(ctx, "linear.f32", "as", v, sizeof v);
    ck_assert_str_eq(v, "linear");
    source_of(ctx, "mixture", "from", v, sizeof v);
    ck_assert_str_eq(v, "default");
    ck_assert_int_eq(define_of(ctx, "router", "WG", NULL, 0), 8);

    ck_assert_status(atmoe_context_set_params(
                         ctx, "{\"kernels\": {\"mixture\": {\"WG\": 16}}}"),
                     ctx);
    source_of(ctx, "mixture", "from", v, sizeof v);
    ck_assert_str_eq(v, "explicit");
    source_of(ctx, "router", "from", v, sizeof v);
    ck_assert_str_eq(v, "default");
    atmoe_context_free(ctx);

    /* Off: every program at its defaults. */
    setenv("ATMOE_PARAMS", "default", 1);
    ctx = test_context();
    source_of(ctx, "router", "from", v, sizeof v);
    ck_assert_str_eq(v, "default");
    source_of(ctx, "linear", "from", v, sizeof v);
    ck_assert_str_eq(v, "default");
    atmoe_context_free(ctx);
}
END_TEST

/* ATMOE_LINEAR_MAX_TOKENS wins over the databases and an explicit set; it
 * is read when the context is made; a value MAX_TOKENS may not take is
 * logged and ignored. */
START_TEST(test_param_env)
{
    write_file(sys_path,
               "{\"atmoe_tuning\": 1, \"entries\": [{\"vendor\": \"%s\", "
               "\"type\": \"%s\", \"kernels\": {\"linear\": "
               "{\"MAX_TOKENS\": 5}}}]}",
               atmoe_vendor_name(dev.vendor),
               atmoe_device_type_name(dev.type));
    setenv("ATMOE_LINEAR_MAX_TOKENS", "12", 1);
    atmoe_context *ctx = test_context();
    unsetenv("ATMOE_LINEAR_MAX_TOKENS");
    char from[64];
    ck_assert_int_eq(define_of(ctx, "linear", "MAX_TOKENS", NULL, 0), 12);
    from_of(ctx, "linear", "MAX_TOKENS", from, sizeof from);
    ck_assert_str_eq(from, "ATMOE_LINEAR_MAX_TOKENS");
    ck_assert_status(atmoe_context_set_params(
                         ctx, "{\"kernels\": {\"linear\": {\"MAX_TOKENS\": "
                              "3, \"SR\": 16}}}"), ctx);
    ck_assert_int_eq(define_of(ctx, "linear", "MAX_TOKENS", NULL, 0), 12);
    ck_assert_int_eq(define_of(ctx, "linear", "SR", NULL, 0), 16);
    ck_assert_status(atmoe_context_set_params(ctx, "tuned"), ctx);
    ck_assert_int_eq(define_of(ctx, "linear", "MAX_TOKENS", NULL, 0), 12);
    atmoe_context_free(ctx);
    ck_assert_str_eq(logged, "");

    /* Without the variable the database's value is in force. */
    ctx = test_context();
    ck_assert_int_eq(define_of(ctx, "linear", "MAX_TOKENS", NULL, 0), 5);
    atmoe_context_free(ctx);

    /* With the database empty too, the program runs on its defaults and
     * is not listed; the variable alone lists it, defaults beside it. */
    write_file(sys_path, "{\"atmoe_tuning\": 1, \"entries\": []}");
    ctx = test_context();
    ck_assert_int_eq(define_of(ctx, "linear", "SR", NULL, 0), -1);
    atmoe_context_free(ctx);
    setenv("ATMOE_LINEAR_MAX_TOKENS", "7", 1);
    ctx = test_context();
    unsetenv("ATMOE_LINEAR_MAX_TOKENS");
    char match[64];
    ck_assert_int_eq(define_of(ctx, "linear", "MAX_TOKENS", match,
                               sizeof match), 7);
    ck_assert_str_eq(match, "none");
    ck_assert_int_eq(define_of(ctx, "linear", "SR", NULL, 0), 8);
    ck_assert_int_eq(define_of(ctx, "linear", "ST", NULL, 0), 8);
    atmoe_context_free(ctx);

    /* ATMOE_LINEAR_VARIANT the same way: it wins over an explicit set,
     * and a value VARIANT may not take is logged and ignored; CPU devices
     * default to the CPU-shaped variant, others to the group one. */
    setenv("ATMOE_LINEAR_VARIANT", "1", 1);
    ctx = test_context();
    unsetenv("ATMOE_LINEAR_VARIANT");
    ck_assert_int_eq(define_of(ctx, "linear", "VARIANT", NULL, 0), 1);
    from_of(ctx, "linear", "VARIANT", from, sizeof from);
    ck_assert_str_eq(from, "ATMOE_LINEAR_VARIANT");
    ck_assert_status(atmoe_context_set_params(
                         ctx, "{\"kernels\": {\"linear\": {\"VARIANT\": "
                              "0, \"GROUP_SIZE\": 32}}}"), ctx);
    ck_assert_int_eq(define_of(ctx, "linear", "VARIANT", NULL, 0), 1);
    ck_assert_int_eq(define_of(ctx, "linear", "GROUP_SIZE", NULL, 0), 32);
    atmoe_context_free(ctx);
    logged[0] = '\0';
    setenv("ATMOE_LINEAR_VARIANT", "2", 1);
    setenv("ATMOE_LINEAR_MAX_TOKENS", "7", 1); /* lists the defaults */
    ctx = test_context();
    unsetenv("ATMOE_LINEAR_VARIANT");
    unsetenv("ATMOE_LINEAR_MAX_TOKENS");
    ck_assert_msg(strstr(logged, "ATMOE_LINEAR_VARIANT=2") &&
                  strstr(logged, "ignored"), "'2' not refused: '%s'", logged);
    ck_assert_int_eq(define_of(ctx, "linear", "VARIANT", NULL, 0),
                     dev.type == ATMOE_DEVICE_TYPE_CPU ? 0 : 1);
    atmoe_context_free(ctx);

    /* ATMOE_MIXTURE_VARIANT likewise for the mixture's fused variant. */
    setenv("ATMOE_MIXTURE_VARIANT", "1", 1);
    ctx = test_context();
    unsetenv("ATMOE_MIXTURE_VARIANT");
    ck_assert_int_eq(define_of(ctx, "mixture", "VARIANT", NULL, 0), 1);
    from_of(ctx, "mixture", "VARIANT", from, sizeof from);
    ck_assert_str_eq(from, "ATMOE_MIXTURE_VARIANT");
    ck_assert_status(atmoe_context_set_params(
                         ctx, "{\"kernels\": {\"mixture\": {\"VARIANT\": "
                              "0, \"FUSED_GS\": 32}}}"), ctx);
    ck_assert_int_eq(define_of(ctx, "mixture", "VARIANT", NULL, 0), 1);
    ck_assert_int_eq(define_of(ctx, "mixture", "FUSED_GS", NULL, 0), 32);
    atmoe_context_free(ctx);
    logged[0] = '\0';
    setenv("ATMOE_MIXTURE_VARIANT", "2", 1);
    ctx = test_context();
    unsetenv("ATMOE_MIXTURE_VARIANT");
    ck_assert_msg(strstr(logged, "ATMOE_MIXTURE_VARIANT=2") &&
                  strstr(logged, "ignored"), "'2' not refused: '%s'", logged);
    /* A set naming the program lists its values, VARIANT the default. */
    ck_assert_status(atmoe_context_set_params(
                         ctx, "{\"kernels\": {\"mixture\": {\"WG\": 64}}}"),
                     ctx);
    ck_assert_int_eq(define_of(ctx, "mixture", "VARIANT", NULL, 0),
                     dev.type == ATMOE_DEVICE_TYPE_CPU ? 0 : 1);
    atmoe_context_free(ctx);

    static const char *const refused[] = {"0", "-3", "12x", "1.5"};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        logged[0] = '\0';
        setenv("ATMOE_LINEAR_MAX_TOKENS", refused[i], 1);
        ctx = test_context();
        unsetenv("ATMOE_LINEAR_MAX_TOKENS");
        ck_assert_msg(strstr(logged, "ATMOE_LINEAR_MAX_TOKENS") &&
                      strstr(logged, "ignored"),
                      "'%s' not refused: '%s'", refused[i], logged);
        ck_assert_str_eq(atmoe_errmsg(ctx), "");
        ck_assert_int_eq(define_of(ctx, "linear", "MAX_TOKENS", NULL, 0), -1);
        atmoe_context_free(ctx);
    }
}
END_TEST

/* A non-default CLBlast set changes no number: odd shapes on the indirect
 * path (Xgemm with its pad and transpose kernels) and on the direct path
 * (XgemmDirect), against float64. */
START_TEST(test_explicit_set_numerics)
{
    atmoe_context *ctx = test_context();
    /* m n k >= 40^3 runs indirect, smaller ones direct. */
    ck_assert_status(
        atmoe_context_set_params(
            ctx, "{\"clblast\": {\"Xgemm\": " XGEMM_SET ", \"XgemmDirect\": "
                 DIRECT_SET ", \"GemmRoutine\": "
                 "{\"XGEMM_MIN_INDIRECT_SIZE\": 40}}}"),
        ctx);
    json_t *p = params_of(ctx);
    ck_assert_str_eq(json_string_value(json_object_get(p, "mode")), "custom");
    json_t *x = json_object_get(json_object_get(p, "clblast"), "Xgemm");
    ck_assert_str_eq(json_string_value(json_object_get(x, "match")),
                     "explicit");
    ck_assert_int_eq(json_integer_value(json_object_get(
                         json_object_get(x, "params"), "MWG")), 32);
    json_decref(p);
    check_gemm(ctx, 37, 131, 77); /* indirect */
    check_gemm(ctx, 5, 9, 7);     /* direct */
    check_gemm(ctx, 70, 33, 65);  /* indirect, every size padded */

    /* The defaults cannot come back in this process. */
    ck_assert_fails(atmoe_context_set_params(ctx, "default"), ctx,
                    ATMOE_STATUS_NOT_SUPPORTED);
    ck_assert_ptr_nonnull(strstr(atmoe_errmsg(ctx), "Xgemm"));
    /* A second context on the device reports the same sets in force. */
    atmoe_context *other = test_context();
    p = params_of(other);
    ck_assert_str_eq(json_string_value(json_object_get(p, "mode")), "tuned");
    ck_assert_ptr_nonnull(json_object_get(json_object_get(p, "clblast"),
                                          "XgemmDirect"));
    json_decref(p);
    atmoe_context_free(other);
    atmoe_context_free(ctx);
}
END_TEST

START_TEST(test_set_params_errors)
{
    atmoe_context *ctx = test_context();
    ck_assert_fails(atmoe_context_set_params(NULL, "tuned"), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_context_set_params(ctx, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_context_set_params(ctx, "fastest"), ctx,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    ck_assert_fails(atmoe_context_set_params(ctx, "{\"clblast\": "), ctx,
                    ATMOE_STATUS_FORMAT_ERROR);
    ck_assert_fails(atmoe_context_set_params(ctx, "{\"vendor\": \"PoCL\"}"),
                    ctx, ATMOE_STATUS_FORMAT_ERROR);
    ck_assert_fails(atmoe_context_set_params(
                        ctx, "{\"clblast\": {\"XgemmDirect\": {\"WGD\": 8}}}"),
                    ctx, ATMOE_STATUS_FORMAT_ERROR);
    ck_assert_ptr_nonnull(strstr(atmoe_errmsg(ctx), "KWID"));
    /* Valid in form, but more local memory than any device here has. */
    char text[1024];
    snprintf(text, sizeof text,
             "{\"clblast\": {\"XgemmDirect\": {\"KWID\": 2, \"MDIMAD\": 8, "
             "\"MDIMCD\": 8, \"NDIMBD\": 8, \"NDIMCD\": 8, \"PADA\": 0, "
             "\"PADB\": 0, \"VWMD\": 1, \"VWND\": 1, \"WGD\": %d}}}",
             8192);
    ck_assert_fails(atmoe_context_set_params(ctx, text), ctx,
                    ATMOE_STATUS_NOT_SUPPORTED);
    ck_assert_ptr_nonnull(strstr(atmoe_errmsg(ctx), "local memory"));
    /* A 1024 x 1024 tile over 16 x 16 threads: valid in form, within the
     * work-group size, no local memory, but far more of C than registers
     * hold (issue 16: the first GEMM took minutes). */
    ck_assert_fails(
        atmoe_context_set_params(
            ctx, "{\"clblast\": {\"Xgemm\": {\"GEMMK\": 0, \"KREG\": 1, "
                 "\"KWG\": 16, \"KWI\": 2, \"MDIMA\": 16, \"MDIMC\": 16, "
                 "\"MWG\": 1024, \"NDIMB\": 16, \"NDIMC\": 16, "
                 "\"NWG\": 1024, \"SA\": 0, \"SB\": 0, \"STRM\": 0, "
                 "\"STRN\": 0, \"VWM\": 1, \"VWN\": 1}}}"),
        ctx, ATMOE_STATUS_NOT_SUPPORTED);
    ck_assert_ptr_nonnull(strstr(atmoe_errmsg(ctx), "tile of C holds 1048576"));
    /* 256 x 256 over 2 x 2 threads: within the bound on tiles, but 128 x
     * 128 values a thread, past the 64 x 64 of CLBlast's tuner. */
    ck_assert_fails(
        atmoe_context_set_params(
            ctx, "{\"clblast\": {\"Xgemm\": {\"GEMMK\": 1, \"KREG\": 1, "
                 "\"KWG\": 1, \"KWI\": 1, \"MDIMA\": 2, \"MDIMC\": 2, "
                 "\"MWG\": 256, \"NDIMB\": 2, \"NDIMC\": 2, "
                 "\"NWG\": 256, \"SA\": 0, \"SB\": 0, \"STRM\": 0, "
                 "\"STRN\": 0, \"VWM\": 1, \"VWN\": 1}}}"),
        ctx, ATMOE_STATUS_NOT_SUPPORTED);
    ck_assert_ptr_nonnull(strstr(atmoe_errmsg(ctx), "16384 values of C"));
    /* Refused sets changed nothing. */
    json_t *p = params_of(ctx);
    ck_assert_uint_eq(json_object_size(json_object_get(p, "clblast")), 0);
    json_decref(p);

    char buf[8];
    ck_assert_fails(atmoe_context_get_params(NULL, buf, sizeof buf, NULL),
                    NULL, ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_context_get_params(ctx, NULL, 0, NULL), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    /* A size query: NULL and 0 give the size alone. */
    size_t need = 0, need2 = 0;
    ck_assert_fails(atmoe_context_get_params(ctx, NULL, 8, &need), ctx,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_status(atmoe_context_get_params(ctx, NULL, 0, &need), ctx);
    ck_assert_uint_gt(need, 2);
    char *desc = malloc(need);
    ck_assert_ptr_nonnull(desc);
    ck_assert_status(atmoe_context_get_params(ctx, desc, need, &need2), ctx);
    ck_assert_uint_eq(need2, need);
    ck_assert_uint_eq(strlen(desc) + 1, need);
    free(desc);
    atmoe_context_free(ctx);
}
END_TEST

/* Sets or unsets (value NULL) an environment variable. */
static void set_env(const char *name, const char *value)
{
    if (value)
        setenv(name, value, 1);
    else
        unsetenv(name);
}

START_TEST(test_user_path)
{
    char path[4096], want[4300];
    char *home = getenv("HOME"), *xdg = getenv("XDG_DATA_HOME");
    home = home ? strdup(home) : NULL;
    xdg = xdg ? strdup(xdg) : NULL;
    setenv("ATMOE_TUNING_FILE", "/somewhere/t.json", 1);
    ck_assert_status(atmoe_tuning_get_user_path(path, sizeof path), NULL);
    ck_assert_str_eq(path, "/somewhere/t.json");
    ck_assert_fails(atmoe_tuning_get_user_path(path, 5), NULL,
                    ATMOE_STATUS_OUT_OF_RANGE);
    ck_assert_fails(atmoe_tuning_get_user_path(path, 0), NULL,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    ck_assert_fails(atmoe_tuning_get_user_path(NULL, 10), NULL,
                    ATMOE_STATUS_NULL_POINTER);

    unsetenv("ATMOE_TUNING_FILE");
    setenv("XDG_DATA_HOME", "/xdg", 1);
    ck_assert_status(atmoe_tuning_get_user_path(path, sizeof path), NULL);
    ck_assert_str_eq(path, "/xdg/atmoe/tuning.json");

    setenv("XDG_DATA_HOME", "relative", 1);
    setenv("HOME", tmpdir, 1);
    ck_assert_status(atmoe_tuning_get_user_path(path, sizeof path), NULL);
    snprintf(want, sizeof want, "%s/.local/share/atmoe/tuning.json", tmpdir);
    ck_assert_str_eq(path, want);

    unsetenv("XDG_DATA_HOME");
    unsetenv("HOME");
    ck_assert_fails(atmoe_tuning_get_user_path(path, sizeof path), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    setenv("ATMOE_TUNING_FILE", "", 1);
    ck_assert_fails(atmoe_tuning_get_user_path(path, sizeof path), NULL,
                    ATMOE_STATUS_NOT_FOUND);
    set_env("HOME", home);
    set_env("XDG_DATA_HOME", xdg);
    free(home);
    free(xdg);
}
END_TEST

START_TEST(test_save)
{
    char path[4300];
    snprintf(path, sizeof path, "%s/new/dir/tuning.json", tmpdir);
    const char *set1 = "{\"kernels\": {\"linear\": {\"SR\": 1}}, "
                       "\"info\": {\"by\": \"test\"}}";
    ck_assert_status(atmoe_tuning_save(path, &dev, set1), NULL);
    size_t n = 0;
    ck_assert_status(atmoe_tuning_check(path, &n), NULL);
    ck_assert_uint_eq(n, 1);

    /* The same device again replaces its entry; another device adds one. */
    ck_assert_status(atmoe_tuning_save(
                         path, &dev,
                         "{\"clblast\": {\"Xgemm\": " XGEMM_SET "}}"),
                     NULL);
    atmoe_device_info other = dev;
    snprintf(other.name, sizeof other.name, "another device");
    ck_assert_status(atmoe_tuning_save(path, &other, set1), NULL);
    json_t *root = json_load_file(path, 0, NULL);
    ck_assert_ptr_nonnull(root);
    json_t *entries = json_object_get(root, "entries");
    ck_assert_uint_eq(json_array_size(entries), 2);
    json_t *e0 = json_array_get(entries, 0);
    ck_assert_str_eq(json_string_value(json_object_get(e0, "device")),
                     dev.name);
    ck_assert_str_eq(json_string_value(json_object_get(e0, "driver")),
                     dev.driver_version);
    ck_assert_ptr_nonnull(json_object_get(e0, "clblast"));
    ck_assert_ptr_null(json_object_get(e0, "kernels"));
    json_decref(root);

    /* The saved entry is what a context on the device then uses. */
    setenv("ATMOE_TUNING_FILE", path, 1);
    ck_assert_status(atmoe_tuning_save(NULL, &dev, set1), NULL);
    atmoe_context *ctx = test_context();
    char match[64];
    ck_assert_int_eq(define_of(ctx, "linear", "SR", match,
                               sizeof match), 1);
    ck_assert_str_eq(match, "device+driver");
    atmoe_context_free(ctx);

    /* Refusals leave the file alone. */
    ck_assert_fails(atmoe_tuning_save(path, &dev, "{\"clblast\": 3}"), NULL,
                    ATMOE_STATUS_FORMAT_ERROR);
    ck_assert_fails(atmoe_tuning_save(path, &dev, "{\"device\": \"x\"}"),
                    NULL, ATMOE_STATUS_FORMAT_ERROR);
    ck_assert_fails(atmoe_tuning_save(path, NULL, set1), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    ck_assert_fails(atmoe_tuning_save(path, &dev, NULL), NULL,
                    ATMOE_STATUS_NULL_POINTER);
    atmoe_device_info nameless = dev;
    nameless.name[0] = '\0';
    ck_assert_fails(atmoe_tuning_save(path, &nameless, set1), NULL,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    atmoe_device_info alien = dev;
    alien.vendor = (atmoe_vendor)99;
    ck_assert_fails(atmoe_tuning_save(path, &alien, set1), NULL,
                    ATMOE_STATUS_INVALID_ARGUMENT);
    write_file(user_path, "not json");
    ck_assert_fails(atmoe_tuning_save(user_path, &dev, set1), NULL,
                    ATMOE_STATUS_FORMAT_ERROR);
    FILE *f = fopen(user_path, "r");
    char back[16] = "";
    ck_assert_ptr_nonnull(fgets(back, sizeof back, f));
    fclose(f);
    ck_assert_str_eq(back, "not json");
    snprintf(path, sizeof path, "%s/file/below", user_path);
    ck_assert_fails(atmoe_tuning_save(path, &dev, set1), NULL,
                    ATMOE_STATUS_IO_ERROR);
}
END_TEST

/* A FIFO, a directory or a device where a database should be is an I/O
 * error for the calls that read it and is ignored (logged) by a context,
 * never waited on (issue 16: a FIFO as ATMOE_TUNING_FILE hung every
 * command). */
START_TEST(test_special_files)
{
    char fifo[4300], dir[4300];
    snprintf(fifo, sizeof fifo, "%s/fifo.json", tmpdir);
    snprintf(dir, sizeof dir, "%s/dir.json", tmpdir);
    ck_assert_int_eq(mkfifo(fifo, 0600), 0);
    ck_assert_int_eq(mkdir(dir, 0700), 0);
    const char *const paths[] = {fifo, dir, "/dev/null"};
    const char *const says[] = {"not a regular file", "directory",
                                "not a regular file"};
    const char *set = "{\"kernels\": {\"linear\": {\"SR\": 1}}}";
    alarm(60); /* a hang fails the test instead of the run */
    for (int k = 0; k < 3; k++) {
        ck_assert_fails(atmoe_tuning_check(paths[k], NULL), NULL,
                        ATMOE_STATUS_IO_ERROR);
        ck_assert_msg(strstr(atmoe_errmsg(NULL), says[k]) != NULL,
                      "message: %s", atmoe_errmsg(NULL));
        ck_assert_fails(atmoe_tuning_save(paths[k], &dev, set), NULL,
                        ATMOE_STATUS_IO_ERROR);
        setenv("ATMOE_TUNING_FILE", paths[k], 1);
        setenv("ATMOE_TUNING_SYSTEM_FILE", paths[(k + 1) % 3], 1);
        logged[0] = '\0';
        atmoe_context *ctx = test_context();
        ck_assert_msg(strstr(logged, "is ignored") != NULL, "log: %s", logged);
        atmoe_context_free(ctx);
    }
    alarm(0);
    struct stat sb;
    ck_assert_int_eq(stat(fifo, &sb), 0);
    ck_assert(S_ISFIFO(sb.st_mode));
}
END_TEST

/* Sets a file's modification time seconds ago. */
static void age(const char *path, long seconds)
{
    struct timespec t[2];
    clock_gettime(CLOCK_REALTIME, &t[0]);
    t[0].tv_sec -= seconds;
    t[1] = t[0];
    ck_assert_int_eq(utimensat(AT_FDCWD, path, t, 0), 0);
}

/* A killed writer's temporary is removed by the next save to the same
 * path; a live writer's, another path's and names not of the library's
 * making are left alone (issue 16). */
START_TEST(test_stale_temporaries)
{
    pid_t child = fork();
    if (child == 0)
        _exit(0);
    ck_assert_int_eq(waitpid(child, NULL, 0), child);
    long dead = (long)child, self = (long)getpid();
    static const struct {
        int pid;           /* 0: dead, 1: this process, 2: init */
        const char *tail;  /* after "<path>" */
        long age;          /* seconds */
        int removed;
    } cases[] = {
        {0, ".atmoe-%ld-aB3dE9", 120, 1},         /* dead writer */
        {0, ".atmoe-%ld-fresh1", 0, 0},           /* dead, but just written */
        {1, ".atmoe-%ld-live01", 3600, 0},        /* a live writer */
        {2, ".atmoe-%ld-pidRe1", 3 * 86400, 1},   /* a day untouched */
        {0, ".atmoe-%ld-toolong1", 120, 0},       /* not our naming */
        {0, ".backup", 120, 0},                   /* the user's own */
    };
    char target[4300], names[6][4400];
    snprintf(target, sizeof target, "%s/t.json", tmpdir);
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char tail[64];
        long pid = cases[k].pid == 0 ? dead : cases[k].pid == 1 ? self : 1;
        snprintf(tail, sizeof tail, cases[k].tail, pid);
        snprintf(names[k], sizeof names[k], "%s%s", target, tail);
        write_file(names[k], "partial");
        age(names[k], cases[k].age);
    }
    char other[4400];
    snprintf(other, sizeof other, "%s/u.json.atmoe-%ld-aB3dE9", tmpdir, dead);
    write_file(other, "partial");
    age(other, 120);
    ck_assert_status(atmoe_tuning_save(target, &dev,
                                       "{\"kernels\": {\"linear\": "
                                       "{\"SR\": 1}}}"),
                     NULL);
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++)
        ck_assert_msg((access(names[k], F_OK) != 0) == cases[k].removed,
                      "%s: %s", names[k],
                      cases[k].removed ? "left" : "removed");
    ck_assert_int_eq(access(other, F_OK), 0);
    ck_assert_status(atmoe_tuning_check(target, NULL), NULL);
}
END_TEST

static Suite *tuning_suite(void)
{
    Suite *s = suite_create("tuning");
    /* First: it needs CLBlast's built-in parameters. */
    TCase *tc = tcase_create("defaults");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_params_default_env);
    suite_add_tcase(s, tc);

    tc = tcase_create("database");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_check_valid);
    tcase_add_test(tc, test_malformed);
    tcase_add_test(tc, test_user_wins);
    tcase_add_test(tc, test_lookup_order);
    tcase_add_test(tc, test_user_path);
    tcase_add_test(tc, test_save);
    tcase_add_test(tc, test_special_files);
    tcase_add_test(tc, test_stale_temporaries);
    suite_add_tcase(s, tc);

    tc = tcase_create("apply");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_linear_params_build);
    tcase_add_test(tc, test_linear_params_by_type);
    tcase_add_test(tc, test_kernels_schema);
    tcase_add_test(tc, test_param_sources);
    tcase_add_test(tc, test_param_env);
    tcase_add_test(tc, test_set_params_errors);
    tcase_add_test(tc, test_explicit_set_numerics);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run_suite(tuning_suite());
}
