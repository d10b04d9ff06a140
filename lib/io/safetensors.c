#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/error.h"
#include "base/file.h"
#include "base/half.h"
#include "io/safetensors.h"

/* ------------------------------------------------------------ the format */

/* rank is the dtype's place in the reference implementation's list, which
 * orders dtypes by alignment; writers sort by it. */
static const struct {
    const char *name;
    unsigned size;
    unsigned rank;
} dtypes[] = {
    [ATMOE_SAFETENSORS_BOOL] = {"BOOL", 1, 0},    [ATMOE_SAFETENSORS_U8] = {"U8", 1, 1},
    [ATMOE_SAFETENSORS_I8] = {"I8", 1, 2},        [ATMOE_SAFETENSORS_F8_E5M2] = {"F8_E5M2", 1, 3},
    [ATMOE_SAFETENSORS_F8_E4M3] = {"F8_E4M3", 1, 4}, [ATMOE_SAFETENSORS_I16] = {"I16", 2, 5},
    [ATMOE_SAFETENSORS_U16] = {"U16", 2, 6},      [ATMOE_SAFETENSORS_F16] = {"F16", 2, 7},
    [ATMOE_SAFETENSORS_BF16] = {"BF16", 2, 8},    [ATMOE_SAFETENSORS_I32] = {"I32", 4, 9},
    [ATMOE_SAFETENSORS_U32] = {"U32", 4, 10},     [ATMOE_SAFETENSORS_F32] = {"F32", 4, 11},
    [ATMOE_SAFETENSORS_F64] = {"F64", 8, 12},     [ATMOE_SAFETENSORS_I64] = {"I64", 8, 13},
    [ATMOE_SAFETENSORS_U64] = {"U64", 8, 14},
};
#define N_DTYPES (sizeof dtypes / sizeof dtypes[0])

int atm_st_dtype_valid(atmoe_safetensors_dtype dtype)
{
    return (unsigned)dtype < N_DTYPES;
}

unsigned atm_st_dtype_size(atmoe_safetensors_dtype dtype)
{
    return atm_st_dtype_valid(dtype) ? dtypes[dtype].size : 0;
}

unsigned atm_st_dtype_rank(atmoe_safetensors_dtype dtype)
{
    return atm_st_dtype_valid(dtype) ? dtypes[dtype].rank : 0;
}

ATMOE_API const char *atmoe_safetensors_dtype_name(atmoe_safetensors_dtype dtype)
{
    return atm_st_dtype_valid(dtype) ? dtypes[dtype].name : ATM_UNKNOWN_NAME;
}

int atm_st_shape_count(int ndim, const uint64_t *shape, atmoe_safetensors_dtype dtype,
                       uint64_t *count, uint64_t *nbytes)
{
    uint64_t n = 1;
    for (int i = 0; i < ndim; i++)
        if (__builtin_mul_overflow(n, shape[i], &n))
            return -1;
    *count = n;
    return __builtin_mul_overflow(n, (uint64_t)atm_st_dtype_size(dtype),
                                  nbytes)
               ? -1
               : 0;
}

const char *atm_st_shape_string(int ndim, const uint64_t *shape, char *buf,
                                size_t size)
{
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%" PRIu64,
                                 i ? ", " : "", shape[i]);
    if (used < size)
        snprintf(buf + used, size - used, "]");
    return buf;
}

/* ---------------------------------------------------------------- reader */

typedef struct st_entry {
    atmoe_safetensors_tensor t;
    uint64_t begin, end; /* relative to the start of the data */
} st_entry;

struct atmoe_safetensors {
    atmoe_context *ctx;
    char *label;
    void *map; /* NULL when the caller owns the bytes */
    size_t map_size;
    json_t *header;   /* owns the names and the metadata strings */
    json_t *metadata; /* borrowed from header; NULL when absent */
    size_t count;
    st_entry *entries; /* in the order of their data */
    const st_entry **by_name; /* names ascending */
};

static const char open_fn[] = "atmoe_safetensors_open";

static uint64_t load_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* A non-negative JSON integer. */
static int json_u64(const json_t *v, uint64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return -1;
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

static atmoe_status parse_metadata(atmoe_safetensors *f, json_t *meta)
{
    if (json_is_null(meta))
        return ATMOE_STATUS_OK;
    if (!json_is_object(meta))
        return atm_fail(f->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: %s: __metadata__ is not a JSON object", open_fn,
                        f->label);
    const char *key;
    json_t *value;
    json_object_foreach(meta, key, value) {
        if (!json_is_string(value))
            return atm_fail(f->ctx, ATMOE_STATUS_FORMAT_ERROR,
                            "%s: %s: __metadata__ value of '%s' is not a "
                            "string",
                            open_fn, f->label, key);
    }
    f->metadata = meta;
    return ATMOE_STATUS_OK;
}

/* Checks one tensor's entry on its own: its fields, and that its byte
 * range holds exactly shape x dtype size. */
static atmoe_status parse_entry(atmoe_safetensors *f, const char *name,
                                json_t *info, st_entry *e)
{
    const atmoe_context *ctx = f->ctx;
    const atmoe_status bad = ATMOE_STATUS_FORMAT_ERROR;
    e->t.name = name;
    if (!json_is_object(info))
        return atm_fail(ctx, bad, "%s: %s: tensor '%s': its entry is not a "
                        "JSON object", open_fn, f->label, name);

    json_t *dtype = json_object_get(info, "dtype");
    if (!json_is_string(dtype))
        return atm_fail(ctx, bad, "%s: %s: tensor '%s': dtype is %s", open_fn,
                        f->label, name,
                        dtype ? "not a string" : "missing");
    size_t d = 0;
    while (d < N_DTYPES && strcmp(dtypes[d].name, json_string_value(dtype)))
        d++;
    if (d == N_DTYPES)
        return atm_fail(ctx, bad, "%s: %s: tensor '%s': unknown dtype '%s'",
                        open_fn, f->label, name, json_string_value(dtype));
    e->t.dtype = (atmoe_safetensors_dtype)d;

    json_t *shape = json_object_get(info, "shape");
    if (!json_is_array(shape))
        return atm_fail(ctx, bad, "%s: %s: tensor '%s': shape is %s", open_fn,
                        f->label, name,
                        shape ? "not an array" : "missing");
    if (json_array_size(shape) > ATMOE_SAFETENSORS_MAX_DIMS)
        return atm_fail(ctx, bad, "%s: %s: tensor '%s': shape has %zu "
                        "dimensions, more than the %d this library reads",
                        open_fn, f->label, name, json_array_size(shape),
                        ATMOE_SAFETENSORS_MAX_DIMS);
    e->t.ndim = (int)json_array_size(shape);
    for (int i = 0; i < e->t.ndim; i++)
        if (json_u64(json_array_get(shape, (size_t)i), &e->t.shape[i]))
            return atm_fail(ctx, bad, "%s: %s: tensor '%s': dimension %d of "
                            "the shape is not a non-negative integer",
                            open_fn, f->label, name, i);

    json_t *offsets = json_object_get(info, "data_offsets");
    if (!json_is_array(offsets) || json_array_size(offsets) != 2 ||
        json_u64(json_array_get(offsets, 0), &e->begin) ||
        json_u64(json_array_get(offsets, 1), &e->end))
        return atm_fail(ctx, bad, "%s: %s: tensor '%s': data_offsets is %s",
                        open_fn, f->label, name,
                        offsets ? "not two non-negative integers"
                                : "missing");
    if (e->end < e->begin)
        return atm_fail(ctx, bad, "%s: %s: tensor '%s': data_offsets [%" PRIu64
                        ", %" PRIu64 "] end before they begin",
                        open_fn, f->label, name, e->begin, e->end);

    char sbuf[256];
    if (atm_st_shape_count(e->t.ndim, e->t.shape, e->t.dtype, &e->t.count,
                           &e->t.nbytes))
        return atm_fail(ctx, bad, "%s: %s: tensor '%s': the byte count of "
                        "shape %s of %s overflows 64 bits",
                        open_fn, f->label, name,
                        atm_st_shape_string(e->t.ndim, e->t.shape, sbuf,
                                            sizeof sbuf),
                        dtypes[d].name);
    if (e->end - e->begin != e->t.nbytes)
        return atm_fail(ctx, bad, "%s: %s: tensor '%s': data_offsets [%" PRIu64
                        ", %" PRIu64 "] hold %" PRIu64 " bytes, but shape %s "
                        "of %s needs %" PRIu64,
                        open_fn, f->label, name, e->begin, e->end,
                        e->end - e->begin,
                        atm_st_shape_string(e->t.ndim, e->t.shape, sbuf,
                                            sizeof sbuf),
                        dtypes[d].name, e->t.nbytes);
    return ATMOE_STATUS_OK;
}

static int by_offsets(const void *a, const void *b)
{
    const st_entry *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return strcmp(x->t.name, y->t.name);
}

static int by_name_cmp(const void *a, const void *b)
{
    return strcmp((*(const st_entry *const *)a)->t.name,
                  (*(const st_entry *const *)b)->t.name);
}

/* With the entries in offset order, their ranges must tile the data from
 * its first byte to the file's last, as the reference requires. */
static atmoe_status check_layout(const atmoe_safetensors *f,
                                 uint64_t data_size)
{
    uint64_t start = 0;
    for (size_t i = 0; i < f->count; i++) {
        const st_entry *e = &f->entries[i];
        if (e->begin != start) {
            if (i == 0)
                return atm_fail(f->ctx, ATMOE_STATUS_FORMAT_ERROR,
                                "%s: %s: tensor '%s': the data starts at "
                                "offset %" PRIu64 ", not 0",
                                open_fn, f->label, e->t.name, e->begin);
            return atm_fail(f->ctx, ATMOE_STATUS_FORMAT_ERROR,
                            "%s: %s: tensor '%s': data_offsets [%" PRIu64
                            ", %" PRIu64 "] %s tensor '%s', which ends at %"
                            PRIu64,
                            open_fn, f->label, e->t.name, e->begin, e->end,
                            e->begin < start ? "overlap"
                                             : "leave a gap after",
                            f->entries[i - 1].t.name, start);
        }
        if (e->end > data_size)
            return atm_fail(f->ctx, ATMOE_STATUS_FORMAT_ERROR,
                            "%s: %s: tensor '%s': data_offsets [%" PRIu64
                            ", %" PRIu64 "] reach past the end of the data (%"
                            PRIu64 " bytes)",
                            open_fn, f->label, e->t.name, e->begin, e->end,
                            data_size);
        start = e->end;
    }
    if (start != data_size)
        return atm_fail(f->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: %s: the last %" PRIu64 " bytes of data belong "
                        "to no tensor",
                        open_fn, f->label, data_size - start);
    return ATMOE_STATUS_OK;
}

static atmoe_status parse_header(atmoe_safetensors *f, const unsigned char *p,
                                 size_t size)
{
    if (size < 8)
        return atm_fail(f->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: %s: the file is %zu bytes, too short for the "
                        "8-byte header length",
                        open_fn, f->label, size);
    uint64_t n = load_le64(p);
    if (n > ATM_ST_MAX_HEADER)
        return atm_fail(f->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: %s: the header length %" PRIu64 " is over the "
                        "format's limit of %u bytes",
                        open_fn, f->label, n, ATM_ST_MAX_HEADER);
    if (n > size - 8)
        return atm_fail(f->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: %s: the header length %" PRIu64 " reaches past "
                        "the end of the file (%zu bytes)",
                        open_fn, f->label, n, size);

    json_error_t jerr;
    f->header = json_loadb((const char *)p + 8, (size_t)n,
                           JSON_REJECT_DUPLICATES, &jerr);
    if (f->header == NULL)
        return atm_fail(f->ctx,
                        json_error_code(&jerr) == json_error_out_of_memory
                            ? ATMOE_STATUS_HOST_OUT_OF_MEMORY
                            : ATMOE_STATUS_FORMAT_ERROR,
                        "%s: %s: the header is not valid JSON: %s (byte %d)",
                        open_fn, f->label, jerr.text, jerr.position);
    if (!json_is_object(f->header))
        return atm_fail(f->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: %s: the header is not a JSON object", open_fn,
                        f->label);

    size_t total = json_object_size(f->header);
    f->entries = atm_calloc(total ? total : 1, sizeof *f->entries);
    f->by_name = atm_calloc(total ? total : 1, sizeof *f->by_name);
    if (f->entries == NULL || f->by_name == NULL)
        return atm_fail(f->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: %s: no memory for %zu tensors", open_fn,
                        f->label, total);
    const char *key;
    json_t *value;
    json_object_foreach(f->header, key, value) {
        atmoe_status st =
            strcmp(key, "__metadata__") == 0
                ? parse_metadata(f, value)
                : parse_entry(f, key, value, &f->entries[f->count++]);
        if (st != ATMOE_STATUS_OK)
            return st;
    }

    qsort(f->entries, f->count, sizeof *f->entries, by_offsets);
    atmoe_status st = check_layout(f, size - 8 - n);
    if (st != ATMOE_STATUS_OK)
        return st;
    const unsigned char *data = p + 8 + n;
    for (size_t i = 0; i < f->count; i++) {
        f->entries[i].t.data = data + f->entries[i].begin;
        f->by_name[i] = &f->entries[i];
    }
    qsort(f->by_name, f->count, sizeof *f->by_name, by_name_cmp);
    return ATMOE_STATUS_OK;
}

atmoe_status atm_safetensors_parse(atmoe_context *ctx, const char *label,
                                   const void *data, size_t size,
                                   atmoe_safetensors **file)
{
    *file = NULL;
    atmoe_safetensors *f = atm_calloc(1, sizeof *f);
    if (f == NULL || (f->label = atm_strdup(label)) == NULL) {
        atm_free(f);
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: %s: no memory", open_fn, label);
    }
    f->ctx = ctx;
    atmoe_status st = parse_header(f, data, size);
    if (st != ATMOE_STATUS_OK) {
        atmoe_safetensors_free(f);
        return st;
    }
    *file = f;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_safetensors_open(atmoe_context *ctx,
                                              const char *path,
                                              atmoe_safetensors **file)
{
    ATM_CHECK_NULL(ctx, file);
    *file = NULL;
    ATM_CHECK_NULL(ctx, path);
    size_t size;
    int fd = atm_file_open_fd(path, &size);
    if (fd < 0) {
        int e = errno;
        if (e == EISDIR || e == EINVAL)
            return atm_fail(ctx, ATMOE_STATUS_IO_ERROR,
                            "%s: '%s' is not a regular file", __func__,
                            path);
        return atm_fail(ctx,
                        e == ENOENT ? ATMOE_STATUS_NOT_FOUND
                                    : ATMOE_STATUS_IO_ERROR,
                        "%s: cannot open '%s': %s", __func__, path,
                        strerror(e));
    }
    void *map = NULL;
    if (size > 0) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(fd);
            return atm_fail(ctx, ATMOE_STATUS_IO_ERROR,
                            "%s: cannot map '%s' (%zu bytes): %s", __func__,
                            path, size, strerror(e));
        }
    }
    close(fd);
    atmoe_status st = atm_safetensors_parse(ctx, path, map, size, file);
    if (st != ATMOE_STATUS_OK) {
        if (map)
            munmap(map, size);
        return st;
    }
    (*file)->map = map;
    (*file)->map_size = size;
    return ATMOE_STATUS_OK;
}

ATMOE_API void atmoe_safetensors_free(atmoe_safetensors *file)
{
    if (file == NULL)
        return;
    if (file->map)
        munmap(file->map, file->map_size);
    json_decref(file->header);
    atm_free(file->entries);
    atm_free(file->by_name);
    atm_free(file->label);
    atm_free(file);
}

ATMOE_API atmoe_status atmoe_safetensors_get_count(const atmoe_safetensors *file,
                                               size_t *count)
{
    ATM_CHECK_NULL(NULL, file);
    ATM_CHECK_NULL(file->ctx, count);
    *count = file->count;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_safetensors_get(const atmoe_safetensors *file,
                                             size_t index,
                                             atmoe_safetensors_tensor *tensor)
{
    ATM_CHECK_NULL(NULL, file);
    ATM_CHECK_NULL(file->ctx, tensor);
    if (index >= file->count)
        return atm_fail(file->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: index %zu, but %s holds %zu tensors", __func__,
                        index, file->label, file->count);
    *tensor = file->entries[index].t;
    return ATMOE_STATUS_OK;
}

static const st_entry *find_entry(const atmoe_safetensors *file,
                                  const char *name)
{
    size_t lo = 0, hi = file->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const st_entry *e = file->by_name[mid];
        int c = strcmp(name, e->t.name);
        if (c == 0)
            return e;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

ATMOE_API atmoe_status atmoe_safetensors_find(const atmoe_safetensors *file,
                                              const char *name,
                                              atmoe_safetensors_tensor *tensor)
{
    ATM_CHECK_NULL(NULL, file);
    ATM_CHECK_NULL(file->ctx, name);
    ATM_CHECK_NULL(file->ctx, tensor);
    const st_entry *e = find_entry(file, name);
    if (e == NULL)
        return atm_fail(file->ctx, ATMOE_STATUS_NOT_FOUND,
                        "%s: %s has no tensor '%s'", __func__, file->label,
                        name);
    *tensor = e->t;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_safetensors_read_f32(
    const atmoe_safetensors *file, const char *name, float *dst, size_t count)
{
    ATM_CHECK_NULL(NULL, file);
    ATM_CHECK_NULL(file->ctx, name);
    const st_entry *e = find_entry(file, name);
    if (e == NULL)
        return atm_fail(file->ctx, ATMOE_STATUS_NOT_FOUND,
                        "%s: %s has no tensor '%s'", __func__, file->label,
                        name);
    const atmoe_safetensors_tensor *t = &e->t;
    if (t->dtype != ATMOE_SAFETENSORS_F32 && t->dtype != ATMOE_SAFETENSORS_F16 &&
        t->dtype != ATMOE_SAFETENSORS_BF16 && t->dtype != ATMOE_SAFETENSORS_F64)
        return atm_fail(file->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: tensor '%s' of %s is %s; only F32, F16, BF16 "
                        "and F64 convert to f32",
                        __func__, name, file->label,
                        atmoe_safetensors_dtype_name(t->dtype));
    if (count != t->count)
        return atm_fail(file->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: tensor '%s' of %s has %" PRIu64 " elements, "
                        "count is %zu",
                        __func__, name, file->label, t->count, count);
    if (count > 0)
        ATM_CHECK_NULL(file->ctx, dst);
    const unsigned char *p = t->data;
    for (size_t i = 0; i < count; i++) {
        switch (t->dtype) {
        case ATMOE_SAFETENSORS_F16:
            dst[i] = atm_f16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
            break;
        case ATMOE_SAFETENSORS_BF16:
            dst[i] = atm_bf16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
            break;
        case ATMOE_SAFETENSORS_F32: {
            uint32_t u = 0;
            for (int b = 3; b >= 0; b--)
                u = u << 8 | p[4 * i + (size_t)b];
            memcpy(&dst[i], &u, sizeof u);
            break;
        }
        default: {
            uint64_t u = load_le64(p + 8 * i);
            double v;
            memcpy(&v, &u, sizeof v);
            dst[i] = (float)v;
            break;
        }
        }
    }
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_safetensors_get_metadata(
    const atmoe_safetensors *file, const char *key, const char **value)
{
    ATM_CHECK_NULL(NULL, file);
    ATM_CHECK_NULL(file->ctx, key);
    ATM_CHECK_NULL(file->ctx, value);
    json_t *v = file->metadata ? json_object_get(file->metadata, key) : NULL;
    if (v == NULL)
        return atm_fail(file->ctx, ATMOE_STATUS_NOT_FOUND,
                        "%s: %s has no metadata key '%s'%s", __func__,
                        file->label, key,
                        file->metadata ? "" : " (no __metadata__ at all)");
    *value = json_string_value(v);
    return ATMOE_STATUS_OK;
}
