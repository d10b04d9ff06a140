/* Where the recipes write their results, so that a failed run leaves no
 * partial output: a directory that does not exist yet is built under a
 * temporary name beside it and renamed into place once complete. */
#include <config.h>

#define _XOPEN_SOURCE 700
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/error.h"
#include "recipe/recipe.h"

atmoe_status atm_recipe_output_begin(atmoe_context *ctx, const char *fn,
                                     const char *output,
                                     atm_recipe_output *o)
{
    struct stat sb;
    memset(o, 0, sizeof *o);
    o->final = output;
    size_t len = strlen(output) + 40;
    if ((o->dir = atm_malloc(len)) == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", fn);
    if (stat(output, &sb) == 0) {
        if (!S_ISDIR(sb.st_mode)) {
            atm_free(o->dir);
            o->dir = NULL;
            return atm_fail(ctx, ATMOE_STATUS_IO_ERROR,
                            "%s: %s exists and is not a directory", fn,
                            output);
        }
        snprintf(o->dir, len, "%s", output);
        return ATMOE_STATUS_OK;
    }
    snprintf(o->dir, len, "%s.partial-%ld", output, (long)getpid());
    if (mkdir(o->dir, 0777) != 0) {
        atmoe_status st = atm_fail(ctx, ATMOE_STATUS_IO_ERROR,
                                   "%s: cannot create %s: %s", fn, o->dir,
                                   strerror(errno));
        atm_free(o->dir);
        o->dir = NULL;
        return st;
    }
    o->fresh = 1;
    return ATMOE_STATUS_OK;
}

static int remove_entry(const char *path, const struct stat *sb, int flag,
                        struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

atmoe_status atm_recipe_output_end(atmoe_context *ctx, const char *fn,
                                   atm_recipe_output *o, atmoe_status st)
{
    if (o->dir == NULL)
        return st;
    if (o->fresh && st == ATMOE_STATUS_OK && rename(o->dir, o->final) != 0)
        st = atm_fail(ctx, ATMOE_STATUS_IO_ERROR,
                      "%s: cannot rename %s to %s: %s", fn, o->dir, o->final,
                      strerror(errno));
    if (o->fresh && st != ATMOE_STATUS_OK)
        nftw(o->dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    atm_free(o->dir);
    o->dir = NULL;
    return st;
}

atmoe_status atm_recipe_write_result(atmoe_context *ctx, const char *fn,
                                     const char *output,
                                     atmoe_safetensors_writer *w,
                                     const char *weights_file,
                                     const atmoe_manifest *mf)
{
    atm_recipe_output o;
    atmoe_status st = atm_recipe_output_begin(ctx, fn, output, &o);
    if (st != ATMOE_STATUS_OK)
        return st;
    size_t size = strlen(o.dir) + strlen(weights_file) + 32;
    char *path = atm_malloc(size);
    if (path == NULL)
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      "%s: out of host memory", fn);
    if (st == ATMOE_STATUS_OK) {
        snprintf(path, size, "%s/%s", o.dir, weights_file);
        st = atmoe_safetensors_writer_save(w, path);
    }
    if (st == ATMOE_STATUS_OK) {
        snprintf(path, size, "%s/manifest.json", o.dir);
        st = atm_recipe_write_manifest(ctx, fn, mf, path);
    }
    atm_free(path);
    return atm_recipe_output_end(ctx, fn, &o, st);
}
