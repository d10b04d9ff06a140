/* compare_outputs EXPECTED TOL GOT...: checks that every tensor of the
 * safetensors file EXPECTED (the float64 reference that
 * tests/fixtures/make_adapters.py computed) is in one of the GOT files
 * (what atmoe run wrote) with the same shape, and that
 *
 *     max |got - want| <= TOL * max(1, max |want|)
 *
 * over each tensor; NaN or infinity in got never passes.  Prints the worst
 * error of each tensor; exits 0 when all pass, 1 otherwise, 2 on a usage
 * error.  Uses the public API only. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "atmoe.h"

static int compare(const atmoe_safetensors_tensor *want, atmoe_safetensors *wf,
                   atmoe_safetensors *gf, double tol)
{
    atmoe_safetensors_tensor got;
    if (atmoe_safetensors_find(gf, want->name, &got) != ATMOE_STATUS_OK)
        return -1;
    if (got.ndim != want->ndim ||
        memcmp(got.shape, want->shape, sizeof got.shape) != 0) {
        printf("FAIL %s: the shapes differ\n", want->name);
        return 1;
    }
    size_t n = want->count;
    /* The reference is read as f32: its rounding, 6e-8 of each value, is
     * far below any tolerance used here. */
    float *w = malloc((n ? n : 1) * sizeof *w);
    float *g = malloc((n ? n : 1) * sizeof *g);
    int bad = w == NULL || g == NULL ||
              atmoe_safetensors_read_f32(wf, want->name, w, n) !=
                  ATMOE_STATUS_OK ||
              atmoe_safetensors_read_f32(gf, want->name, g, n) !=
                  ATMOE_STATUS_OK;
    double peak = 1.0, worst = 0.0;
    for (size_t i = 0; !bad && i < n; i++)
        peak = fmax(peak, fabs(w[i]));
    for (size_t i = 0; !bad && i < n; i++) {
        double e = isfinite(g[i]) ? fabs((double)g[i] - w[i]) : INFINITY;
        worst = fmax(worst, e);
    }
    int fails = bad || !(worst <= tol * peak);
    printf("%s %s: max error %.3g, %.3g of max(1, max |want|) (tolerance "
           "%g)\n", fails ? "FAIL" : "ok  ", want->name, worst, worst / peak,
           tol);
    free(w);
    free(g);
    return fails;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: compare_outputs EXPECTED TOL GOT...\n");
        return 2;
    }
    double tol = atof(argv[2]);
    atmoe_safetensors *wf;
    if (atmoe_safetensors_open(NULL, argv[1], &wf) != ATMOE_STATUS_OK) {
        fprintf(stderr, "%s\n", atmoe_errmsg(NULL));
        return 2;
    }
    int n_got = argc - 3, failed = 0;
    atmoe_safetensors **gf = calloc((size_t)n_got, sizeof *gf);
    if (gf == NULL) {
        atmoe_safetensors_free(wf);
        return 2;
    }
    for (int i = 0; i < n_got; i++)
        if (atmoe_safetensors_open(NULL, argv[3 + i], &gf[i]) !=
            ATMOE_STATUS_OK) {
            printf("FAIL %s\n", atmoe_errmsg(NULL));
            failed = 1;
        }
    size_t count = 0;
    atmoe_safetensors_get_count(wf, &count);
    for (size_t t = 0; !failed && t < count; t++) {
        atmoe_safetensors_tensor want;
        atmoe_safetensors_get(wf, t, &want);
        int r = -1;
        for (int i = 0; i < n_got && r < 0; i++)
            r = compare(&want, wf, gf[i], tol);
        if (r < 0)
            printf("FAIL %s: in none of the outputs\n", want.name);
        failed |= r != 0;
    }
    for (int i = 0; i < n_got; i++)
        atmoe_safetensors_free(gf[i]);
    free(gf);
    atmoe_safetensors_free(wf);
    return failed;
}
