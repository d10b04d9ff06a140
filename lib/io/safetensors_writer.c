#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/error.h"
#include "base/file.h"
#include "base/half.h"
#include "io/safetensors.h"

typedef struct st_pending {
    char *name;
    atmoe_safetensors_dtype dtype;
    int ndim;
    uint64_t shape[ATMOE_SAFETENSORS_MAX_DIMS];
    uint64_t nbytes;
    unsigned char *data; /* NULL when nbytes is 0 */
} st_pending;

struct atmoe_safetensors_writer {
    atmoe_context *ctx;
    st_pending *tensors;
    size_t count, capacity;
    json_t *names;    /* the names taken, for duplicate checks */
    json_t *metadata; /* NULL until a key is set */
};

ATMOE_API atmoe_status atmoe_safetensors_writer_new(
    atmoe_context *ctx, atmoe_safetensors_writer **writer)
{
    ATM_CHECK_NULL(ctx, writer);
    *writer = NULL;
    atmoe_safetensors_writer *w = atm_calloc(1, sizeof *w);
    if (w == NULL || (w->names = json_object()) == NULL) {
        atm_free(w);
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: no memory", __func__);
    }
    w->ctx = ctx;
    *writer = w;
    return ATMOE_STATUS_OK;
}

ATMOE_API void atmoe_safetensors_writer_free(atmoe_safetensors_writer *writer)
{
    if (writer == NULL)
        return;
    for (size_t i = 0; i < writer->count; i++) {
        atm_free(writer->tensors[i].name);
        atm_free(writer->tensors[i].data);
    }
    atm_free(writer->tensors);
    json_decref(writer->names);
    json_decref(writer->metadata);
    atm_free(writer);
}

/* Strict UTF-8 (no overlong forms, surrogates or values past U+10FFFF):
 * what jansson accepts in keys and strings, so what a reader can load. */
static int utf8_valid(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned c = *p++;
        int more;
        unsigned lo = 0x80, hi = 0xbf;
        if (c < 0x80)
            continue;
        if (c >= 0xc2 && c <= 0xdf)
            more = 1;
        else if (c >= 0xe0 && c <= 0xef) {
            more = 2;
            if (c == 0xe0)
                lo = 0xa0;
            else if (c == 0xed)
                hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            more = 3;
            if (c == 0xf0)
                lo = 0x90;
            else if (c == 0xf4)
                hi = 0x8f;
        } else
            return 0;
        for (int i = 0; i < more; i++, p++) {
            if (*p < lo || *p > hi)
                return 0;
            lo = 0x80;
            hi = 0xbf;
        }
    }
    return 1;
}

/* Checks a tensor about to be added; fn names the public caller. */
static atmoe_status check_tensor(const atmoe_safetensors_writer *w,
                                 const char *fn, const char *name,
                                 atmoe_safetensors_dtype dtype, int ndim,
                                 const uint64_t *shape, const void *data,
                                 uint64_t *nbytes)
{
    const atmoe_context *ctx = w->ctx;
    if (name == NULL)
        return atm_fail(ctx, ATMOE_STATUS_NULL_POINTER,
                        "%s: argument 'name' is NULL", fn);
    const char *why = name[0] == '\0'                      ? "empty"
                      : strcmp(name, "__metadata__") == 0 ? "reserved"
                      : !utf8_valid(name)                 ? "not valid UTF-8"
                                                          : NULL;
    if (why)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the tensor name '%s' is %s", fn, name, why);
    if (json_object_get(w->names, name))
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: a tensor named '%s' is already added", fn, name);
    if (!atm_st_dtype_valid(dtype))
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: tensor '%s': dtype %d is not an atmoe_safetensors_dtype",
                        fn, name, (int)dtype);
    if (ndim < 0 || ndim > ATMOE_SAFETENSORS_MAX_DIMS)
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: tensor '%s': ndim is %d, must be 0 to %d", fn,
                        name, ndim, ATMOE_SAFETENSORS_MAX_DIMS);
    if (ndim > 0 && shape == NULL)
        return atm_fail(ctx, ATMOE_STATUS_NULL_POINTER,
                        "%s: tensor '%s': argument 'shape' is NULL", fn, name);
    /* JSON integers as jansson reads them stop at INT64_MAX. */
    for (int i = 0; i < ndim; i++)
        if (shape[i] > INT64_MAX)
            return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                            "%s: tensor '%s': dimension %d is %" PRIu64
                            ", over the format's largest integer",
                            fn, name, i, shape[i]);
    uint64_t count;
    char sbuf[256];
    if (atm_st_shape_count(ndim, shape, dtype, &count, nbytes) ||
        *nbytes > SIZE_MAX || *nbytes > INT64_MAX)
        return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: tensor '%s': shape %s of %s is too large", fn,
                        name, atm_st_shape_string(ndim, shape, sbuf,
                                                  sizeof sbuf),
                        atmoe_safetensors_dtype_name(dtype));
    if (*nbytes > 0 && data == NULL)
        return atm_fail(ctx, ATMOE_STATUS_NULL_POINTER,
                        "%s: tensor '%s': argument 'data' is NULL", fn, name);
    return ATMOE_STATUS_OK;
}

/* Takes bytes (malloc'ed, or NULL when nbytes is 0) into the writer; frees
 * them on failure. */
static atmoe_status append(atmoe_safetensors_writer *w, const char *fn,
                           const char *name, atmoe_safetensors_dtype dtype, int ndim,
                           const uint64_t *shape, uint64_t nbytes,
                           unsigned char *bytes)
{
    if (w->count == w->capacity) {
        size_t cap = w->capacity ? 2 * w->capacity : 16;
        st_pending *t = atm_realloc(w->tensors, cap * sizeof *t);
        if (t == NULL)
            goto oom;
        w->tensors = t;
        w->capacity = cap;
    }
    st_pending *t = &w->tensors[w->count];
    memset(t, 0, sizeof *t);
    if ((t->name = atm_strdup(name)) == NULL)
        goto oom;
    if (json_object_set_new(w->names, name, json_null()) != 0) {
        atm_free(t->name);
        goto oom;
    }
    t->dtype = dtype;
    t->ndim = ndim;
    if (ndim > 0)
        memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    t->nbytes = nbytes;
    t->data = bytes;
    w->count++;
    return ATMOE_STATUS_OK;
oom:
    atm_free(bytes);
    return atm_fail(w->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                    "%s: tensor '%s': no memory", fn, name);
}

/* A tensor's copy of nbytes (NULL for none). */
static atmoe_status alloc_bytes(const atmoe_safetensors_writer *writer,
                                const char *fn, const char *name,
                                uint64_t nbytes, unsigned char **bytes)
{
    *bytes = NULL;
    if (nbytes > 0 && (*bytes = atm_malloc((size_t)nbytes)) == NULL)
        return atm_fail(writer->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: tensor '%s': no memory for %" PRIu64 " bytes",
                        fn, name, nbytes);
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_safetensors_writer_add(
    atmoe_safetensors_writer *writer, const char *name, atmoe_safetensors_dtype dtype,
    int ndim, const uint64_t *shape, const void *data)
{
    ATM_CHECK_NULL(NULL, writer);
    uint64_t nbytes;
    atmoe_status st = check_tensor(writer, __func__, name, dtype, ndim, shape,
                                   data, &nbytes);
    if (st != ATMOE_STATUS_OK)
        return st;
    unsigned char *bytes = NULL;
    if ((st = alloc_bytes(writer, __func__, name, nbytes, &bytes)) !=
        ATMOE_STATUS_OK)
        return st;
    if (nbytes > 0)
        memcpy(bytes, data, (size_t)nbytes);
    return append(writer, __func__, name, dtype, ndim, shape, nbytes, bytes);
}

ATMOE_API atmoe_status atmoe_safetensors_writer_add_f32(
    atmoe_safetensors_writer *writer, const char *name, atmoe_safetensors_dtype stored,
    int ndim, const uint64_t *shape, const float *data)
{
    ATM_CHECK_NULL(NULL, writer);
    uint64_t nbytes;
    atmoe_status st = check_tensor(writer, __func__, name, stored, ndim,
                                   shape, data, &nbytes);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (stored != ATMOE_SAFETENSORS_F32 && stored != ATMOE_SAFETENSORS_F16 &&
        stored != ATMOE_SAFETENSORS_BF16)
        return atm_fail(writer->ctx, ATMOE_STATUS_DTYPE_MISMATCH,
                        "%s: tensor '%s': f32 data is stored as F32, F16 or "
                        "BF16, not %s",
                        __func__, name, atmoe_safetensors_dtype_name(stored));
    unsigned char *bytes = NULL;
    if ((st = alloc_bytes(writer, __func__, name, nbytes, &bytes)) !=
        ATMOE_STATUS_OK)
        return st;
    if (nbytes > 0) {
        size_t size = atm_st_dtype_size(stored), n = (size_t)nbytes / size;
        for (size_t i = 0; i < n; i++) {
            uint32_t u;
            if (stored == ATMOE_SAFETENSORS_F16)
                u = atm_f32_to_f16(data[i]);
            else if (stored == ATMOE_SAFETENSORS_BF16)
                u = atm_f32_to_bf16(data[i]);
            else
                memcpy(&u, &data[i], sizeof u);
            for (size_t b = 0; b < size; b++)
                bytes[i * size + b] = (unsigned char)(u >> (8 * b));
        }
    }
    return append(writer, __func__, name, stored, ndim, shape, nbytes, bytes);
}

ATMOE_API atmoe_status atmoe_safetensors_writer_set_metadata(
    atmoe_safetensors_writer *writer, const char *key, const char *value)
{
    ATM_CHECK_NULL(NULL, writer);
    ATM_CHECK_NULL(writer->ctx, key);
    ATM_CHECK_NULL(writer->ctx, value);
    if (!utf8_valid(key) || !utf8_valid(value))
        return atm_fail(writer->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the %s of metadata key '%s' is not valid UTF-8",
                        __func__, utf8_valid(key) ? "value" : "name", key);
    if (writer->metadata == NULL && (writer->metadata = json_object()) == NULL)
        goto oom;
    if (json_object_set_new(writer->metadata, key, json_string(value)) != 0)
        goto oom;
    return ATMOE_STATUS_OK;
oom:
    return atm_fail(writer->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                    "%s: metadata key '%s': no memory", __func__, key);
}

/* The reference writer's order: dtypes by descending alignment rank, then
 * names, so that every tensor's data is aligned to its element size once
 * the header is padded to 8 bytes. */
static int save_order(const void *a, const void *b)
{
    const st_pending *x = *(const st_pending *const *)a;
    const st_pending *y = *(const st_pending *const *)b;
    unsigned rx = atm_st_dtype_rank(x->dtype), ry = atm_st_dtype_rank(y->dtype);
    if (rx != ry)
        return rx > ry ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int by_key(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A copy of a JSON object with its keys in ascending order, so that the
 * file does not depend on the order the keys were set in. */
static json_t *sorted_copy(json_t *obj)
{
    size_t n = json_object_size(obj), i = 0;
    const char **keys = atm_malloc((n ? n : 1) * sizeof *keys);
    json_t *copy = keys ? json_object() : NULL;
    if (copy) {
        const char *key;
        json_t *value;
        json_object_foreach(obj, key, value) keys[i++] = key;
        qsort(keys, n, sizeof *keys, by_key);
        for (i = 0; i < n; i++)
            if (json_object_set(copy, keys[i],
                                json_object_get(obj, keys[i])) != 0) {
                json_decref(copy);
                copy = NULL;
                break;
            }
    }
    atm_free(keys);
    return copy;
}

static json_t *shape_array(const st_pending *t)
{
    json_t *shape = json_array();
    for (int d = 0; shape && d < t->ndim; d++)
        if (json_array_append_new(shape,
                                  json_integer((json_int_t)t->shape[d]))) {
            json_decref(shape);
            shape = NULL;
        }
    return shape;
}

/* jansson's _set_new and _append_new take the value's reference also when
 * they fail, or when the value is NULL, so one test covers every step. */
static json_t *tensor_info(const st_pending *t, uint64_t offset)
{
    json_t *info = json_object();
    if (info == NULL ||
        json_object_set_new(info, "dtype",
                            json_string(atmoe_safetensors_dtype_name(t->dtype))) ||
        json_object_set_new(info, "shape", shape_array(t)) ||
        json_object_set_new(info, "data_offsets",
                            json_pack("[I, I]", (json_int_t)offset,
                                      (json_int_t)(offset + t->nbytes)))) {
        json_decref(info);
        return NULL;
    }
    return info;
}

/* The header object: __metadata__ first, then the tensors in the order of
 * their data, each as dtype, shape, data_offsets.  NULL when memory runs
 * out. */
static json_t *build_header(const atmoe_safetensors_writer *w,
                            st_pending *const *order)
{
    json_t *root = json_object();
    if (root && w->metadata &&
        json_object_set_new(root, "__metadata__", sorted_copy(w->metadata)))
        goto fail;
    uint64_t offset = 0;
    for (size_t i = 0; root && i < w->count; i++) {
        if (json_object_set_new(root, order[i]->name,
                                tensor_info(order[i], offset)) != 0)
            goto fail;
        offset += order[i]->nbytes;
    }
    return root;
fail:
    json_decref(root);
    return NULL;
}

ATMOE_API atmoe_status atmoe_safetensors_writer_save(
    atmoe_safetensors_writer *writer, const char *path)
{
    ATM_CHECK_NULL(NULL, writer);
    const atmoe_context *ctx = writer->ctx;
    ATM_CHECK_NULL(ctx, path);
    if (path[0] == '\0')
        return atm_fail(ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the path is empty", __func__);

    st_pending **order =
        atm_malloc((writer->count ? writer->count : 1) * sizeof *order);
    if (order == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: %s: no memory", __func__, path);
    for (size_t i = 0; i < writer->count; i++)
        order[i] = &writer->tensors[i];
    qsort(order, writer->count, sizeof *order, save_order);

    json_t *header = build_header(writer, order);
    char *text = header ? json_dumps(header, JSON_COMPACT) : NULL;
    json_decref(header);
    if (text == NULL) {
        atm_free(order);
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: %s: no memory for the header", __func__, path);
    }
    size_t len = strlen(text), padded = (len + 7) / 8 * 8;
    if (padded > ATM_ST_MAX_HEADER) {
        atm_free(text);
        atm_free(order);
        return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: %s: the header would be %zu bytes, over the "
                        "format's limit of %u",
                        __func__, path, padded, ATM_ST_MAX_HEADER);
    }

    atmoe_status st = ATMOE_STATUS_OK;
    size_t tmp_size = strlen(path) + ATM_FILE_TMP_EXTRA;
    char *tmp = atm_malloc(tmp_size);
    FILE *f = tmp ? atm_file_begin(path, tmp, tmp_size) : NULL;
    if (tmp == NULL)
        st = atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                      "%s: %s: no memory", __func__, path);
    else if (f == NULL)
        st = atm_fail(ctx, ATMOE_STATUS_IO_ERROR,
                      "%s: cannot create a file beside '%s': %s", __func__,
                      path, strerror(errno));
    else {
        unsigned char n8[8];
        for (int i = 0; i < 8; i++)
            n8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
        int ok = fwrite(n8, 1, 8, f) == 8 && fwrite(text, 1, len, f) == len;
        for (size_t i = len; ok && i < padded; i++)
            ok = fputc(' ', f) != EOF;
        for (size_t i = 0; ok && i < writer->count; i++)
            ok = order[i]->nbytes == 0 ||
                 fwrite(order[i]->data, 1, (size_t)order[i]->nbytes, f) ==
                     order[i]->nbytes;
        if (atm_file_commit(f, tmp, path, ok) != 0)
            st = atm_fail(ctx, ATMOE_STATUS_IO_ERROR,
                          "%s: cannot write '%s': %s", __func__, path,
                          strerror(errno));
    }
    atm_free(tmp);
    atm_free(text);
    atm_free(order);
    return st;
}
