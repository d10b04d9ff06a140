/* Layer manifests: the files they name, opened once each and checked
 * against each other, and the stack they describe added to a graph. */
#include <config.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/half.h"
#include "graph/graph.h"
#include "base/log.h"
#include "io/adapter.h"
#include "io/manifest.h"

/* Re-reports the message of a failed call under the JSON path of the
 * entry that led to it. */
static atmoe_status at(const atmoe_context *ctx, atmoe_status st,
                       const char *where, const char *what)
{
    char detail[ATM_ERRMSG_SIZE / 2];
    snprintf(detail, sizeof detail, "%s", atmoe_errmsg(ctx));
    return atm_fail(ctx, st, "%s%s%s: %s", where, *what ? "." : "", what,
                    detail);
}

static atmoe_status oom(const atmoe_context *ctx, const char *fn)
{
    return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                    "%s: out of host memory", fn);
}

/* ------------------------------------------------------------------------ */
/* Files                                                                     */
/* ------------------------------------------------------------------------ */

static atmoe_status open_file(atmoe_manifest *mf, const char *path,
                              atmoe_safetensors **file)
{
    for (size_t i = 0; i < mf->n_files; i++)
        if (strcmp(mf->files[i].path, path) == 0) {
            *file = mf->files[i].file;
            return ATMOE_STATUS_OK;
        }
    atm_mfile *grown = atm_realloc(mf->files, (mf->n_files + 1) * sizeof *grown);
    if (grown == NULL)
        return oom(mf->ctx, "atmoe_manifest_check");
    mf->files = grown;
    atm_mfile *f = &mf->files[mf->n_files];
    if ((f->path = atm_malloc(strlen(path) + 1)) == NULL)
        return oom(mf->ctx, "atmoe_manifest_check");
    strcpy(f->path, path);
    atmoe_status st = atmoe_safetensors_open(mf->ctx, path, &f->file);
    if (st != ATMOE_STATUS_OK) {
        atm_free(f->path);
        return st;
    }
    mf->n_files++;
    *file = f->file;
    return ATMOE_STATUS_OK;
}

static atmoe_status open_adapter(atmoe_manifest *mf, const char *path,
                                 size_t *index)
{
    for (size_t i = 0; i < mf->n_adapters; i++)
        if (strcmp(mf->adapters[i].path, path) == 0) {
            *index = i;
            return ATMOE_STATUS_OK;
        }
    atm_madapter *grown =
        atm_realloc(mf->adapters, (mf->n_adapters + 1) * sizeof *grown);
    if (grown == NULL)
        return oom(mf->ctx, "atmoe_manifest_check");
    mf->adapters = grown;
    atm_madapter *a = &mf->adapters[mf->n_adapters];
    if ((a->path = atm_malloc(strlen(path) + 1)) == NULL)
        return oom(mf->ctx, "atmoe_manifest_check");
    strcpy(a->path, path);
    atmoe_status st = atmoe_adapter_open(mf->ctx, path, &a->adapter);
    if (st != ATMOE_STATUS_OK) {
        atm_free(a->path);
        return st;
    }
    *index = mf->n_adapters++;
    return ATMOE_STATUS_OK;
}

/* Finds ref's tensor and checks it is floating point with the shape
 * wanted (rows or cols 0: any), and that the device can hold it as the
 * manifest asks; *t receives it, ref its file's and its device's types.
 * where (a JSON path) and key name it in messages. */
static atmoe_status find_tensor_at(atmoe_manifest *mf, const char *where,
                                   const char *key, atm_mref *ref,
                                   int ndim, size_t rows, size_t cols,
                                   atmoe_safetensors_tensor *t)
{
    atmoe_safetensors *file;
    atmoe_status st = open_file(mf, ref->file, &file);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_find(file, ref->tensor, t);
    if (st != ATMOE_STATUS_OK)
        return at(mf->ctx, st, where, key);
    if (t->dtype != ATMOE_SAFETENSORS_F32 && t->dtype != ATMOE_SAFETENSORS_F16 &&
        t->dtype != ATMOE_SAFETENSORS_BF16 && t->dtype != ATMOE_SAFETENSORS_F64)
        return atm_fail(mf->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s.%s: tensor %s of %s is %s, not a floating-point "
                        "type", where, key, ref->tensor, ref->file,
                        atmoe_safetensors_dtype_name(t->dtype));
    int asked = ref->dtype == ATM_DTYPE_INHERIT ? mf->dtype : ref->dtype;
    int device = atm_manifest_device_dtype(asked, t->dtype);
    if (device < 0)
        return atm_fail(mf->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                        "%s.%s: tensor %s of %s is %s, which the device "
                        "cannot hold; \"dtype\": \"f32\" (or \"f16\", "
                        "\"bf16\") converts it", where, key, ref->tensor,
                        ref->file, atmoe_safetensors_dtype_name(t->dtype));
    ref->stored = t->dtype;
    ref->device = (atmoe_dtype)device;
    size_t want[2] = {rows, cols};
    int ok = t->ndim == ndim;
    for (int i = 0; i < ndim && ok; i++)
        ok = t->shape[i] > 0 && t->shape[i] <= UINT32_MAX &&
             (want[i] == 0 || t->shape[i] == want[i]);
    if (!ok) {
        char got[96] = "", exp[64];
        size_t n = 0;
        for (int i = 0; i < t->ndim && n < sizeof got; i++)
            n += (size_t)snprintf(got + n, sizeof got - n, "%s%llu",
                                  i ? ", " : "",
                                  (unsigned long long)t->shape[i]);
        if (ndim == 1)
            snprintf(exp, sizeof exp, "[%zu]", rows);
        else if (rows && cols)
            snprintf(exp, sizeof exp, "[%zu, %zu]", rows, cols);
        else
            snprintf(exp, sizeof exp, "2-D");
        return atm_fail(mf->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s.%s: tensor %s of %s is [%s], the module needs "
                        "%s", where, key, ref->tensor, ref->file, got,
                        exp);
    }
    return ATMOE_STATUS_OK;
}

static atmoe_status find_tensor(atmoe_manifest *mf, const atm_mmodule *m,
                                const char *key, atm_mref *ref,
                                int ndim, size_t rows, size_t cols,
                                atmoe_safetensors_tensor *t)
{
    return find_tensor_at(mf, m->where, key, ref, ndim, rows, cols, t);
}

/* The tensors of a rank-1 module: A [r1, d_in], B [d_out, r2], W_r
 * [E, d_in], the gates [1], the score map [K, E]; v1 with r1 = r2, top_k
 * at most E, and K = E without a map when the centroids give K. */
static atmoe_status check_rank1(atmoe_manifest *mf, atm_mmodule *m)
{
    atmoe_safetensors_tensor t;
    atmoe_status st;
    if ((st = find_tensor(mf, m, "rank1.a", &m->a, 2, 0, m->d_in, &t)))
        return st;
    m->r1 = t.shape[0];
    if ((st = find_tensor(mf, m, "rank1.b", &m->b, 2, m->d_out, 0, &t)))
        return st;
    m->r2 = t.shape[1];
    if (m->variant == ATMOE_MOR1E_V1 && m->r1 != m->r2)
        return atm_fail(mf->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s.rank1: v1 needs r1 = r2; a has %zu down vectors "
                        "and b %zu up vectors", m->where, m->r1, m->r2);
    m->E = m->variant == ATMOE_MOR1E_V1 ? m->r1 : m->r1 * m->r2;
    if (m->top_k < 0 || (size_t)m->top_k > m->E)
        return atm_fail(mf->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s.rank1.top_k: is %d, more than the %zu experts",
                        m->where, m->top_k, m->E);
    if ((m->w_r.file &&
         (st = find_tensor(mf, m, "rank1.w_r", &m->w_r, 2, m->E, m->d_in,
                           &t))) ||
        (m->w_om.file &&
         (st = find_tensor(mf, m, "rank1.w_om", &m->w_om, 1, 1, 0, &t))) ||
        (m->w_c.file &&
         (st = find_tensor(mf, m, "rank1.w_c", &m->w_c, 1, 1, 0, &t))))
        return st;
    if (m->score_map.file &&
        (st = find_tensor(mf, m, "rank1.score_map", &m->score_map, 2,
                          mf->clusters, m->E, &t)))
        return st;
    if (!m->score_map.file && mf->centroids.file &&
        m->routing != ATMOE_MOR1E_ROUTE_ROUTER && mf->clusters != m->E)
        return atm_fail(mf->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s.rank1: the centroids hold %zu clusters for %zu "
                        "experts; give a score_map [%zu, %zu]", m->where,
                        mf->clusters, m->E, mf->clusters, m->E);
    return ATMOE_STATUS_OK;
}

static atmoe_status check_module(atmoe_manifest *mf, atm_mmodule *m)
{
    atmoe_safetensors_tensor t;
    m->total_rank = 0; /* a check that failed may have begun the sum */
    atmoe_status st = find_tensor(mf, m, "weight", &m->weight, 2, 0, 0, &t);
    if (st != ATMOE_STATUS_OK)
        return st;
    /* A Conv1D weight is stored [in, out]. */
    m->d_in = m->weight.transposed ? t.shape[0] : t.shape[1];
    m->d_out = m->weight.transposed ? t.shape[1] : t.shape[0];
    if (m->bias.file) {
        /* The mixture adds its bias in f32: any type converts to it. */
        if (m->bias.dtype == ATMOE_DTYPE_F16 ||
            m->bias.dtype == ATMOE_DTYPE_BF16)
            return atm_fail(mf->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                            "%s.bias: the bias is held in f32 (the mixture "
                            "adds it in f32), not %s", m->where,
                            atmoe_dtype_name((atmoe_dtype)m->bias.dtype));
        int keep = m->bias.dtype;
        m->bias.dtype = ATMOE_DTYPE_F32;
        st = find_tensor(mf, m, "bias", &m->bias, 1, m->d_out, 0, &t);
        m->bias.dtype = keep;
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    /* 8-bit blocks are read by the mixture (cl/linear.cl), not by the
     * rank-1 layer's kernels. */
    if (m->rank1 && m->weight.device == ATMOE_DTYPE_Q8)
        return atm_fail(mf->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                        "%s.weight: a rank-1 module's base weight is f32, "
                        "f16 or bf16, not q8", m->where);
    if (m->rank1)
        return check_rank1(mf, m);
    for (size_t i = 0; i < m->count; i++) {
        atm_mexpert *e = &m->experts[i];
        char key[64];
        if (e->group < 0)
            snprintf(key, sizeof key, "general");
        else
            snprintf(key, sizeof key, "groups[%d][%d]", e->group,
                     e->position);
        if ((st = open_adapter(mf, e->adapter, &e->adapter_index)) ||
            (st = atmoe_adapter_find(mf->adapters[e->adapter_index].adapter,
                                     e->layer, e->module, &e->target)))
            return at(mf->ctx, st, m->where, key);
        atmoe_adapter_target tg;
        if ((st = atmoe_adapter_get_target(
                 mf->adapters[e->adapter_index].adapter, e->target, &tg)))
            return st;
        if (tg.d_in != m->d_in || tg.d_out != m->d_out)
            return atm_fail(mf->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s.%s: %s of adapter %s maps %zu -> %zu "
                            "features; the module's weight, %zu -> %zu",
                            m->where, key, tg.module, e->adapter, tg.d_in,
                            tg.d_out, m->d_in, m->d_out);
        if (tg.rank > m->d_in || tg.rank > m->d_out)
            return atm_fail(mf->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "%s.%s: %s of adapter %s has rank %zu, more "
                            "than min(d_in %zu, d_out %zu)", m->where, key,
                            tg.module, e->adapter, tg.rank, m->d_in,
                            m->d_out);
        m->total_rank += tg.rank;
        /* One set holds every expert of the module: kept as stored, A
         * (and B) take the adapters' type when they all agree, else f32,
         * which holds f16 and bf16 exactly. */
        atmoe_safetensors_dtype sa, sb;
        if ((st = atm_adapter_stored_dtypes(
                 mf->adapters[e->adapter_index].adapter, e->target, &sa,
                 &sb)))
            return at(mf->ctx, st, m->where, key);
        if (i == 0) {
            m->a_stored = sa;
            m->b_stored = sb;
        }
        if (sa != m->a_stored)
            m->a_stored = ATMOE_SAFETENSORS_F32;
        if (sb != m->b_stored)
            m->b_stored = ATMOE_SAFETENSORS_F32;
    }
    int asked = m->experts_dtype == ATM_DTYPE_INHERIT ? mf->dtype
                                                       : m->experts_dtype;
    int da = atm_manifest_device_dtype(asked, m->a_stored);
    int db = atm_manifest_device_dtype(asked, m->b_stored);
    if (m->count && (da < 0 || db < 0))
        return atm_fail(mf->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                        "%s: the experts' %s matrices are %s, which the "
                        "device cannot hold; \"experts_dtype\": \"f32\" (or "
                        "\"f16\", \"bf16\") converts them", m->where,
                        da < 0 ? "A" : "B",
                        atmoe_safetensors_dtype_name(da < 0 ? m->a_stored
                                                            : m->b_stored));
    m->a_dtype = da < 0 ? ATMOE_DTYPE_F32 : (atmoe_dtype)da;
    m->b_dtype = db < 0 ? ATMOE_DTYPE_F32 : (atmoe_dtype)db;
    size_t G = m->groups, M = m->max_group;
    int scaled = m->form == ATMOE_ROUTER_SCALED;
    if (m->w_g.file && (st = find_tensor(mf, m, "router.w_g", &m->w_g, 2,
                                         m->d_in, G, &t)))
        return st;
    if (m->w_d.file &&
        (st = find_tensor(mf, m, scaled ? "router.v_d" : "router.w_d",
                          &m->w_d, 2, scaled ? G : m->d_in,
                          scaled ? M : G * M, &t)))
        return st;
    return ATMOE_STATUS_OK;
}

/* The head: W [classes, d_out] (any width of classes, d_out the stack's
 * output), bias [classes], and an ignore index that is no class. */
static atmoe_status check_head(atmoe_manifest *mf, size_t d_out)
{
    atm_mref *w = &mf->head;
    if (w->file == NULL)
        return ATMOE_STATUS_OK;
    atmoe_safetensors_tensor t;
    atmoe_status st = find_tensor_at(mf, "head", "", w, 2, 0, 0, &t);
    if (st != ATMOE_STATUS_OK)
        return st;
    size_t rows = (size_t)t.shape[0], cols = (size_t)t.shape[1];
    size_t classes = w->transposed ? cols : rows;
    if ((w->transposed ? rows : cols) != d_out)
        return atm_fail(mf->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "head: tensor %s of %s is [%zu, %zu]%s; the head "
                        "must be [classes, %zu] (the stack's output width)%s",
                        w->tensor, w->file, rows, cols,
                        w->transposed ? " (read transposed)" : "", d_out,
                        w->transposed ? ", stored [d_out, classes]" : "");
    if (classes > INT32_MAX)
        return atm_fail(mf->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "head: tensor %s of %s has %zu classes, above "
                        "int32 labels", w->tensor, w->file, classes);
    if (mf->head_bias.file &&
        (st = find_tensor_at(mf, "head", "bias", &mf->head_bias, 1, classes,
                             0, &t)))
        return st;
    if (mf->ignore_index >= 0 && (size_t)mf->ignore_index < classes)
        return atm_fail(mf->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "head.ignore_index is %d, a class of the head's %zu: "
                        "it must lie outside [0, %zu)", mf->ignore_index,
                        classes, classes);
    mf->classes = classes;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_manifest_check(atmoe_manifest *manifest)
{
    ATM_CHECK_NULL(NULL, manifest);
    if (manifest->checked)
        return ATMOE_STATUS_OK;
    if (manifest->centroids.file) {
        atmoe_safetensors *file;
        atmoe_safetensors_tensor t;
        atmoe_status st = open_file(manifest, manifest->centroids.file, &file);
        if (st == ATMOE_STATUS_OK)
            st = atmoe_safetensors_find(file, manifest->centroids.tensor, &t);
        if (st != ATMOE_STATUS_OK)
            return at(manifest->ctx, st, "centroids", "");
        if (t.ndim != 2 || t.shape[0] == 0 || t.shape[1] == 0 ||
            t.shape[0] > UINT32_MAX || t.shape[1] > UINT32_MAX)
            return atm_fail(manifest->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                            "centroids: tensor %s of %s must be [K, D]",
                            manifest->centroids.tensor,
                            manifest->centroids.file);
        manifest->clusters = t.shape[0];
        manifest->embedding_dim = t.shape[1];
    }
    for (size_t i = 0; i < manifest->count; i++) {
        atmoe_status st = check_module(manifest, &manifest->modules[i]);
        if (st != ATMOE_STATUS_OK)
            return st;
    }
    /* Every module of a layer reads the layer's input: for the first
     * layer the stack's input, as wide as its first module takes; then
     * the previous layer's output module's result. */
    const atm_mmodule *source = &manifest->modules[0];
    size_t width = source->d_in;
    int from_output = 0;
    for (size_t i = 0; i < manifest->count;) {
        const atm_mmodule *out = NULL;
        size_t l = manifest->modules[i].layer;
        for (; i < manifest->count && manifest->modules[i].layer == l; i++) {
            const atm_mmodule *m = &manifest->modules[i];
            if (m->d_in != width)
                return atm_fail(manifest->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                                "%s: the weight takes %zu features, but %s "
                                "%s %s %zu", m->where, m->d_in,
                                from_output ? "the output of" : "the input, as",
                                source->where,
                                from_output ? "gives" : "takes it, has",
                                width);
            if (m->is_output)
                out = m;
        }
        source = out;
        width = out->d_out;
        from_output = 1;
    }
    manifest->d_in = manifest->modules[0].d_in;
    manifest->d_out = width;
    atmoe_status st = check_head(manifest, width);
    if (st != ATMOE_STATUS_OK)
        return st;
    manifest->checked = 1;
    return ATMOE_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* Building                                                                  */
/* ------------------------------------------------------------------------ */

/* x as the device type holds it, widened back. */
static float held(atmoe_dtype dtype, float x)
{
    if (dtype == ATMOE_DTYPE_F16)
        return atm_f16_to_f32(atm_f32_to_f16(x));
    if (dtype == ATMOE_DTYPE_BF16)
        return atm_bf16_to_f32(atm_f32_to_bf16(x));
    return x;
}

/* Refuses a NaN or an infinity among the n values of what (a tensor
 * description) as dtype will hold them, unless the manifest allows them:
 * a half-precision file's Inf, or an f32 value past f16's range, would
 * otherwise turn a layer's output into NaN without a word.  cols (0: 1-D)
 * places the element. */
static atmoe_status check_finite(const atmoe_manifest *mf,
                                 const atmoe_context *ctx, const char *what,
                                 const float *v, size_t n, size_t cols,
                                 atmoe_dtype dtype)
{
    if (mf->allow_nonfinite)
        return ATMOE_STATUS_OK;
    for (size_t i = 0; i < n; i++) {
        float h = held(dtype, v[i]);
        if (isfinite(h))
            continue;
        char where[64];
        if (cols)
            snprintf(where, sizeof where, "[%zu, %zu]", i / cols, i % cols);
        else
            snprintf(where, sizeof where, "[%zu]", i);
        char from[48] = "";
        if (isfinite(v[i])) /* finite in the file, not as held */
            snprintf(from, sizeof from, " (from %g)", (double)v[i]);
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: element %s is %g%s in %s; "
                        "\"allow_nonfinite\": true lets such values through",
                        what, where, (double)h, from, atmoe_dtype_name(dtype));
    }
    return ATMOE_STATUS_OK;
}

/* A parameter node holding data [rows, cols] (f32) in 8-bit blocks,
 * quantised on the device (atmoe.h, "8-bit blocks"); the graph keeps the
 * q8 tensor, the f32 one goes once the copy is done. */
static atmoe_status add_q8(atmoe_graph *g, const float *data, size_t rows,
                           size_t cols, atmoe_node *node)
{
    size_t shape[2] = {rows, cols};
    atmoe_tensor *f = NULL, *q = NULL;
    atmoe_status st;
    if ((st = atmoe_tensor_new(g->ctx, ATMOE_DTYPE_F32, 2, shape, &f)) ==
            ATMOE_STATUS_OK &&
        (st = atmoe_tensor_new(g->ctx, ATMOE_DTYPE_Q8, 2, shape, &q)) ==
            ATMOE_STATUS_OK &&
        (st = atmoe_tensor_write(f, data, rows * cols * sizeof *data)) ==
            ATMOE_STATUS_OK &&
        (st = atmoe_tensor_copy(q, f)) == ATMOE_STATUS_OK &&
        (st = atmoe_context_finish(g->ctx)) == ATMOE_STATUS_OK)
        st = atmoe_graph_parameter(g, NULL, q, node);
    atmoe_tensor_free(f);
    atmoe_tensor_free(q);
    return st;
}

/* A constant node holding ref's tensor [rows, cols] (cols 0: 1-D) in the
 * device type the check chose, transposed from [cols, rows] when ref says
 * so; f32 zeros when ref is empty.  The file's values are read as f32
 * (which holds f16 and bf16 exactly) and narrowed again, so that a tensor
 * kept as stored arrives bit for bit. */
/* A tensor the manifest names, as a constant of the graph, or with
 * train_name as a trainable f32 parameter of that name (routers' weights
 * for training, atm_manifest_set_train_routers). */
static atmoe_status add_tensor(atmoe_manifest *mf, atmoe_graph *g,
                               const atm_mref *ref, size_t rows, size_t cols,
                               const char *train_name, atmoe_node *node)
{
    size_t n = rows * (cols ? cols : 1);
    atmoe_dtype dtype = ref->file ? ref->device : ATMOE_DTYPE_F32;
    int halfs = dtype == ATMOE_DTYPE_F16 || dtype == ATMOE_DTYPE_BF16;
    float *data = atm_calloc(n, sizeof *data);
    float *t = ref->transposed ? atm_malloc(n * sizeof *t) : NULL;
    uint16_t *half = halfs ? atm_malloc(n * sizeof *half) : NULL;
    atmoe_status st = ATMOE_STATUS_OK;
    if (data == NULL || (ref->transposed && t == NULL) ||
        (halfs && half == NULL))
        st = oom(g->ctx, "atmoe_manifest_build");
    atmoe_safetensors *file = NULL;
    if (st == ATMOE_STATUS_OK && ref->file) {
        if ((st = open_file(mf, ref->file, &file)) == ATMOE_STATUS_OK)
            st = atmoe_safetensors_read_f32(file, ref->tensor, t ? t : data,
                                            n);
        /* These two report on the manifest's context; the caller reads the
         * graph's.  Only their failures are carried over: the one above is
         * on the graph's already, and mf->ctx holds whatever it last said. */
        if (st != ATMOE_STATUS_OK && g->ctx != mf->ctx)
            st = atm_fail(g->ctx, st, "%s", atmoe_errmsg(mf->ctx));
    }
    if (st == ATMOE_STATUS_OK && t)
        for (size_t i = 0; i < rows; i++)
            for (size_t j = 0; j < cols; j++)
                data[i * cols + j] = t[j * rows + i];
    if (st == ATMOE_STATUS_OK && ref->file) {
        char what[256];
        /* Elements are placed as the module holds them, [d_out, d_in]. */
        snprintf(what, sizeof what, "tensor %s of %s%s", ref->tensor,
                 ref->file, ref->transposed ? " (read transposed)" : "");
        st = check_finite(mf, g->ctx, what, data, n, cols, dtype);
    }
    for (size_t i = 0; st == ATMOE_STATUS_OK && half && i < n; i++)
        half[i] = dtype == ATMOE_DTYPE_F16 ? atm_f32_to_f16(data[i])
                                           : atm_f32_to_bf16(data[i]);
    size_t shape[2] = {rows, cols};
    if (st == ATMOE_STATUS_OK && train_name) {
        atmoe_tensor *tensor = NULL;
        /* The graph keeps the tensor's storage; the handle goes. */
        if ((st = atmoe_tensor_new(g->ctx, ATMOE_DTYPE_F32, cols ? 2 : 1,
                                   shape, &tensor)) == ATMOE_STATUS_OK &&
            (st = atmoe_tensor_write(tensor, data, n * sizeof *data)) ==
                ATMOE_STATUS_OK &&
            (st = atmoe_graph_parameter(g, train_name, tensor, node)) ==
                ATMOE_STATUS_OK)
            st = atmoe_graph_set_trainable(g, *node, 1);
        atmoe_tensor_free(tensor);
    } else if (st == ATMOE_STATUS_OK && dtype == ATMOE_DTYPE_Q8) {
        st = add_q8(g, data, rows, cols, node);
    } else if (st == ATMOE_STATUS_OK)
        st = atmoe_graph_constant(g, NULL, dtype, cols ? 2 : 1, shape,
                                  half ? (const void *)half
                                       : (const void *)data,
                                  node);
    atm_free(data);
    atm_free(t);
    atm_free(half);
    return st;
}

/* The module's expert set, stored as the check chose, and its router,
 * with its masks and fixed weights. */
static atmoe_status make_router(atmoe_manifest *mf, atmoe_graph *g,
                                const atm_mmodule *m, atmoe_experts **set,
                                atmoe_router **router)
{
    atmoe_status st = atmoe_experts_new(g->ctx, m->d_in, m->d_out, set);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_experts_set_dtype(*set, m->a_dtype, m->b_dtype);
    for (size_t i = 0; i < m->count && st == ATMOE_STATUS_OK; i++) {
        const atm_mexpert *e = &m->experts[i];
        const atmoe_adapter *ad = mf->adapters[e->adapter_index].adapter;
        atmoe_adapter_target t;
        if ((st = atmoe_adapter_get_target(ad, e->target, &t)) != ATMOE_STATUS_OK)
            break;
        size_t na = t.rank * t.d_in, nb = t.d_out * t.rank;
        float *a = atm_malloc(na * sizeof *a);
        float *b = atm_malloc(nb * sizeof *b);
        if (a == NULL || b == NULL)
            st = oom(g->ctx, "atmoe_manifest_build");
        if (st == ATMOE_STATUS_OK &&
            (st = atmoe_adapter_read(ad, e->target, a, na, b, nb)) &&
            g->ctx != mf->ctx)
            st = atm_fail(g->ctx, st, "%s", atmoe_errmsg(mf->ctx));
        char what[256];
        snprintf(what, sizeof what, "lora_A of %s in %s", t.module,
                 e->adapter);
        if (st == ATMOE_STATUS_OK)
            st = check_finite(mf, g->ctx, what, a, na, t.d_in, m->a_dtype);
        snprintf(what, sizeof what, "lora_B of %s in %s", t.module,
                 e->adapter);
        if (st == ATMOE_STATUS_OK)
            st = check_finite(mf, g->ctx, what, b, nb, t.rank, m->b_dtype);
        if (st == ATMOE_STATUS_OK && e->group >= 0)
            st = atmoe_experts_add(*set, e->group, t.rank, a, b, t.alpha,
                                   t.flags, NULL);
        else if (st == ATMOE_STATUS_OK)
            st = atmoe_experts_set_general(*set, t.rank, a, b, t.alpha,
                                           t.flags, m->lambda);
        atm_free(a);
        atm_free(b);
    }
    if (st == ATMOE_STATUS_OK)
        st = atmoe_router_new(*set, m->form, m->tau_g, m->tau_d,
                              m->top_k_groups, m->top_k_experts, router);
    for (size_t i = 0; i < m->n_masks && st == ATMOE_STATUS_OK; i++)
        st = atmoe_router_set_mask(*router, m->masks[i].group,
                                   m->masks[i].expert, 0);
    for (size_t i = 0; i < m->n_fixed && st == ATMOE_STATUS_OK; i++)
        st = atmoe_router_set_fixed(*router, m->fixed[i].group,
                                    m->fixed[i].expert, m->fixed[i].weight);
    return st;
}

static atmoe_status add_module(atmoe_manifest *mf, atmoe_graph *g,
                               const atm_mmodule *m, atmoe_node x,
                               atmoe_node router_input, atmoe_node gate_index,
                               atmoe_node *y, atmoe_layer_trace *trace)
{
    atmoe_experts *set = NULL;
    atmoe_router *router = NULL;
    atmoe_layer layer = {.w0 = ATMOE_NODE_NONE,
                         .bias = ATMOE_NODE_NONE,
                         .router_input = router_input,
                         .gate_index = gate_index,
                         .c = m->c};
    int scaled = m->form == ATMOE_ROUTER_SCALED;
    size_t G = m->groups, M = m->max_group;
    /* Training the routers: only those of output modules reach a loss on
     * the stack's output. */
    int train = mf->train_routers && m->is_output;
    char wg_name[ATM_NODE_NAME_SIZE], wd_name[ATM_NODE_NAME_SIZE];
    snprintf(wg_name, sizeof wg_name, "layers.%zu.%s.w_g", m->layer, m->name);
    snprintf(wd_name, sizeof wd_name, "layers.%zu.%s.%s", m->layer, m->name,
             scaled ? "v_d" : "w_d");
    atmoe_status st = make_router(mf, g, m, &set, &router);
    if (st == ATMOE_STATUS_OK)
        st = add_tensor(mf, g, &m->weight, m->d_out, m->d_in, NULL,
                        &layer.w0);
    if (st == ATMOE_STATUS_OK && m->bias.file)
        st = add_tensor(mf, g, &m->bias, m->d_out, 0, NULL, &layer.bias);
    if (st == ATMOE_STATUS_OK)
        st = add_tensor(mf, g, &m->w_g, m->d_in, G,
                        train ? wg_name : NULL, &layer.w_g);
    if (st == ATMOE_STATUS_OK)
        st = add_tensor(mf, g, &m->w_d, scaled ? G : m->d_in,
                        scaled ? M : G * M, train ? wd_name : NULL,
                        &layer.w_d);
    layer.experts = set;
    layer.router = router;
    if (st == ATMOE_STATUS_OK)
        st = atmoe_graph_moe_layer(g, x, &layer, y, trace);
    /* The graph holds what it uses. */
    atmoe_router_free(router);
    atmoe_experts_free(set);
    return st;
}

/* A rank-1 module over x, scored by scores (NONE: none). */
static atmoe_status add_rank1(atmoe_manifest *mf, atmoe_graph *g,
                              const atm_mmodule *m, atmoe_node x,
                              atmoe_node scores, atmoe_node gate_index,
                              atmoe_node *y, atmoe_mor1e_trace *trace)
{
    int router = m->routing != ATMOE_MOR1E_ROUTE_INTUITION;
    int intuition = m->routing != ATMOE_MOR1E_ROUTE_ROUTER;
    atmoe_mor1e_layer L = {
        .w0 = ATMOE_NODE_NONE, .bias = ATMOE_NODE_NONE, .a = ATMOE_NODE_NONE,
        .b = ATMOE_NODE_NONE, .w_r = ATMOE_NODE_NONE,
        .w_om = ATMOE_NODE_NONE, .w_c = ATMOE_NODE_NONE,
        .scores = intuition ? scores : ATMOE_NODE_NONE,
        .score_map = ATMOE_NODE_NONE,
        .gate_index = intuition ? gate_index : ATMOE_NODE_NONE,
        .variant = m->variant, .routing = m->routing,
        .k_router = m->k_router, .k_intuition = m->k_intuition,
        .top_k = m->top_k};
    if (intuition && scores == ATMOE_NODE_NONE)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "the module's routing uses the intuition: its "
                        "samples need scores, or embeddings and the "
                        "manifest's centroids (atmoe_manifest_build_with)");
    /* Absent W_r, w_om and w_c are zeros: the reference initialisation.
     * Trained (T-REX), those of an output module are parameters. */
    int train = mf->train_rank1 && m->is_output;
    char na[ATM_NODE_NAME_SIZE], nb[ATM_NODE_NAME_SIZE],
        nr[ATM_NODE_NAME_SIZE], no[ATM_NODE_NAME_SIZE],
        nc[ATM_NODE_NAME_SIZE];
    snprintf(na, sizeof na, "layers.%zu.%s.a", m->layer, m->name);
    snprintf(nb, sizeof nb, "layers.%zu.%s.b", m->layer, m->name);
    snprintf(nr, sizeof nr, "layers.%zu.%s.w_r", m->layer, m->name);
    snprintf(no, sizeof no, "layers.%zu.%s.w_om", m->layer, m->name);
    snprintf(nc, sizeof nc, "layers.%zu.%s.w_c", m->layer, m->name);
    atmoe_status st;
    if ((st = add_tensor(mf, g, &m->weight, m->d_out, m->d_in, NULL,
                         &L.w0)) ||
        (m->bias.file &&
         (st = add_tensor(mf, g, &m->bias, m->d_out, 0, NULL, &L.bias))) ||
        (st = add_tensor(mf, g, &m->a, m->r1, m->d_in, train ? na : NULL,
                         &L.a)) ||
        (st = add_tensor(mf, g, &m->b, m->d_out, m->r2, train ? nb : NULL,
                         &L.b)) ||
        (router && (st = add_tensor(mf, g, &m->w_r, m->E, m->d_in,
                                    train ? nr : NULL, &L.w_r))) ||
        (st = add_tensor(mf, g, &m->w_om, 1, 0, train ? no : NULL,
                         &L.w_om)) ||
        (st = add_tensor(mf, g, &m->w_c, 1, 0, train ? nc : NULL, &L.w_c)))
        return st;
    if (m->score_map.file) {
        size_t K = g->nodes[scores].shape[1];
        if ((st = add_tensor(mf, g, &m->score_map, K, m->E, NULL,
                             &L.score_map)))
            return st;
    }
    return atmoe_graph_mor1e_layer(g, x, &L, y, trace);
}

/* The samples' scores: given, or C e from L2-normalised embeddings. */
static atmoe_status sample_scores(atmoe_manifest *mf, atmoe_graph *g,
                                  const atmoe_manifest_inputs *in,
                                  atmoe_node *scores)
{
    *scores = in->scores;
    if (in->scores != ATMOE_NODE_NONE || in->embeddings == ATMOE_NODE_NONE)
        return ATMOE_STATUS_OK;
    if (mf->centroids.file == NULL)
        return atm_fail(g->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_manifest_build_with: embeddings are given but "
                        "the manifest names no centroids to score them");
    atmoe_node c, e;
    atmoe_status st;
    if ((st = add_tensor(mf, g, &mf->centroids, mf->clusters,
                         mf->embedding_dim, NULL, &c)) ||
        (st = atmoe_graph_l2norm(g, in->embeddings, -1, 1e-12f, &e)))
        return st;
    return atmoe_graph_matmul(g, e, c, ATMOE_NODE_NONE,
                              ATMOE_MATMUL_TRANSPOSE_B, scores);
}

ATMOE_API atmoe_status atmoe_manifest_build(atmoe_manifest *manifest,
                                            atmoe_graph *graph, atmoe_node x,
                                            atmoe_node router_input,
                                            atmoe_node gate_index,
                                            atmoe_node *outputs,
                                            atmoe_layer_trace *traces,
                                            atmoe_node *y)
{
    atmoe_manifest_inputs in = {router_input, gate_index, ATMOE_NODE_NONE,
                                ATMOE_NODE_NONE};
    return atmoe_manifest_build_with(manifest, graph, x, &in, outputs, traces,
                                     NULL, y);
}

ATMOE_API atmoe_status atmoe_manifest_build_with(
    atmoe_manifest *manifest, atmoe_graph *graph, atmoe_node x,
    const atmoe_manifest_inputs *inputs, atmoe_node *outputs,
    atmoe_layer_trace *traces, atmoe_mor1e_trace *rank1_traces,
    atmoe_node *y)
{
    ATM_CHECK_NULL(NULL, manifest);
    ATM_CHECK_NULL(manifest->ctx, graph);
    ATM_CHECK_NULL(graph->ctx, inputs);
    ATM_CHECK_NULL(graph->ctx, y);
    atmoe_status st = atmoe_manifest_check(manifest);
    if (st != ATMOE_STATUS_OK)
        return graph->ctx == manifest->ctx
                   ? st
                   : atm_fail(graph->ctx, st, "%s", atmoe_errmsg(manifest->ctx));
    /* Outputs and traces reach the caller only when every module went in. */
    atmoe_node *outs = atm_malloc(manifest->count * sizeof *outs);
    atmoe_layer_trace *ts = atm_malloc(manifest->count * sizeof *ts);
    atmoe_mor1e_trace *rs = atm_malloc(manifest->count * sizeof *rs);
    if (outs == NULL || ts == NULL || rs == NULL) {
        atm_free(outs);
        atm_free(ts);
        atm_free(rs);
        return oom(graph->ctx, "atmoe_manifest_build");
    }
    size_t mark = graph->count;
    atmoe_node h = x, next = x, scores = ATMOE_NODE_NONE;
    static const atmoe_layer_trace no_trace = {ATMOE_NODE_NONE,
                                               ATMOE_NODE_NONE,
                                               ATMOE_NODE_NONE};
    static const atmoe_mor1e_trace no_rank1 = {
        ATMOE_NODE_NONE, ATMOE_NODE_NONE, ATMOE_NODE_NONE, ATMOE_NODE_NONE};
    /* The samples are scored once, for every layer.  gate_index goes to
     * modules of LoRA experts with their router_input (or, in a manifest
     * without rank-1 modules, to be refused there without it). */
    int any_rank1 = 0, intuition = 0;
    for (size_t i = 0; i < manifest->count; i++) {
        const atm_mmodule *m = &manifest->modules[i];
        any_rank1 |= m->rank1;
        intuition |= m->rank1 && m->routing != ATMOE_MOR1E_ROUTE_ROUTER;
    }
    atmoe_node lora_index =
        inputs->router_input != ATMOE_NODE_NONE || !any_rank1
            ? inputs->gate_index
            : ATMOE_NODE_NONE;
    if (intuition)
        st = sample_scores(manifest, graph, inputs, &scores);
    for (size_t i = 0; i < manifest->count && st == ATMOE_STATUS_OK; i++) {
        const atm_mmodule *m = &manifest->modules[i];
        if (i > 0 && m->layer != manifest->modules[i - 1].layer)
            h = next;
        ts[i] = no_trace;
        rs[i] = no_rank1;
        if (m->rank1)
            st = add_rank1(manifest, graph, m, h, scores, inputs->gate_index,
                           &outs[i], &rs[i]);
        else
            st = add_module(manifest, graph, m, h, inputs->router_input,
                            lora_index, &outs[i], &ts[i]);
        if (st != ATMOE_STATUS_OK)
            st = at(graph->ctx, st, m->where, "");
        else if (m->is_output)
            next = outs[i];
    }
    if (st == ATMOE_STATUS_OK && outputs)
        memcpy(outputs, outs, manifest->count * sizeof *outs);
    if (st == ATMOE_STATUS_OK && traces)
        memcpy(traces, ts, manifest->count * sizeof *ts);
    if (st == ATMOE_STATUS_OK && rank1_traces)
        memcpy(rank1_traces, rs, manifest->count * sizeof *rs);
    atm_free(outs);
    atm_free(ts);
    atm_free(rs);
    if (st != ATMOE_STATUS_OK) {
        atm_graph_truncate(graph, mark);
        return st;
    }
    *y = next;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_manifest_build_head(atmoe_manifest *manifest,
                                                 atmoe_graph *graph,
                                                 atmoe_node y,
                                                 atmoe_node *logits)
{
    ATM_CHECK_NULL(NULL, manifest);
    ATM_CHECK_NULL(manifest->ctx, graph);
    ATM_CHECK_NULL(graph->ctx, logits);
    atmoe_status st = atmoe_manifest_check(manifest);
    if (st != ATMOE_STATUS_OK)
        return graph->ctx == manifest->ctx
                   ? st
                   : atm_fail(graph->ctx, st, "%s", atmoe_errmsg(manifest->ctx));
    if (manifest->head.file == NULL)
        return atm_fail(graph->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "atmoe_manifest_build_head: the manifest has no "
                        "\"head\"");
    size_t mark = graph->count;
    atmoe_node w, b = ATMOE_NODE_NONE;
    if ((st = add_tensor(manifest, graph, &manifest->head, manifest->classes,
                         manifest->d_out, NULL, &w)) ||
        (manifest->head_bias.file &&
         (st = add_tensor(manifest, graph, &manifest->head_bias,
                          manifest->classes, 0, NULL, &b))) ||
        (st = atmoe_graph_matmul(graph, y, w, b, ATMOE_MATMUL_TRANSPOSE_B,
                                 logits))) {
        atm_graph_truncate(graph, mark);
        return st;
    }
    return ATMOE_STATUS_OK;
}

void atm_manifest_set_train_routers(atmoe_manifest *manifest, int on)
{
    manifest->train_routers = on != 0;
}

void atm_manifest_set_train_rank1(atmoe_manifest *manifest, int on)
{
    manifest->train_rank1 = on != 0;
}
