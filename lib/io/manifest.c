/* Layer manifests: the JSON format of atmoe-manifest(5), parsed through
 * jansson and checked key by key, so that every refusal names its JSON
 * path. */
#include <config.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/file.h"
#include "base/json.h"
#include "base/log.h"
#include "io/manifest.h"
#include "tensor/tensor.h"

#define MANIFEST_VERSION 1
/* Bounds that keep every count an int and every message short; far above
 * any real stack. */
#define MAX_ITEMS 65536
#define PATH_SIZE 512

typedef struct parser {
    atmoe_context *ctx;
    const char *dir;     /* relative paths are resolved against it */
    char *weights;       /* the default weights file, resolved */
    char path[PATH_SIZE];
    size_t len;          /* of path */
} parser;

/* ------------------------------------------------------------------------ */
/* Paths and messages                                                        */
/* ------------------------------------------------------------------------ */

static size_t push(parser *p, const char *fmt, ...) ATM_PRINTF(2, 3);
static size_t push(parser *p, const char *fmt, ...)
{
    size_t old = p->len;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(p->path + p->len, PATH_SIZE - p->len, fmt, ap);
    va_end(ap);
    if (n > 0)
        p->len += (size_t)n < PATH_SIZE - p->len ? (size_t)n
                                                 : PATH_SIZE - 1 - p->len;
    return old;
}

static size_t push_key(parser *p, const char *key)
{
    return push(p, p->len ? ".%s" : "%s", key);
}

static void pop(parser *p, size_t len)
{
    p->len = len;
    p->path[len] = '\0';
}

static atmoe_status bad(const parser *p, const char *fmt, ...)
    ATM_PRINTF(2, 3);
static atmoe_status bad(const parser *p, const char *fmt, ...)
{
    char what[ATM_ERRMSG_SIZE / 2];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return atm_fail(p->ctx, ATMOE_STATUS_FORMAT_ERROR, "%s: %s",
                    p->len ? p->path : "the manifest", what);
}

static atmoe_status oom(const parser *p)
{
    return atm_fail(p->ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                    "reading the manifest: out of host memory");
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = atm_malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static char *resolve(const parser *p, const char *rel)
{
    if (rel[0] == '/' || p->dir == NULL || p->dir[0] == '\0')
        return dup_str(rel);
    size_t n = strlen(p->dir) + strlen(rel) + 2;
    char *s = atm_malloc(n);
    if (s)
        snprintf(s, n, "%s/%s", p->dir, rel);
    return s;
}

/* ------------------------------------------------------------------------ */
/* Typed members                                                             */
/* ------------------------------------------------------------------------ */

/* Refuses keys outside allowed (a NULL-terminated list), naming them all. */
static atmoe_status only_keys(parser *p, const json_t *obj,
                              const char *const *allowed)
{
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)obj, key, v) {
        int known = 0;
        for (const char *const *a = allowed; *a && !known; a++)
            known = strcmp(key, *a) == 0;
        if (known)
            continue;
        char list[256] = "";
        size_t n = 0;
        for (const char *const *a = allowed; *a; a++)
            n += (size_t)snprintf(list + n, n < sizeof list ? sizeof list - n
                                                            : 0,
                                  "%s%s", a == allowed ? "" : ", ", *a);
        return bad(p, "unknown key \"%s\" (known: %s)", key, list);
    }
    return ATMOE_STATUS_OK;
}

static atmoe_status expect_object(parser *p, const json_t *v)
{
    return json_is_object(v) ? ATMOE_STATUS_OK
                             : bad(p, "must be an object, not %s",
                                   atm_json_kind(v));
}

/* An integer member in [lo, hi]; absent gives def, or an error when
 * required. */
static atmoe_status get_int(parser *p, const json_t *obj, const char *key,
                            long long lo, long long hi, int required,
                            int def, int *out)
{
    const json_t *v = json_object_get(obj, key);
    size_t mark = push_key(p, key);
    atmoe_status st = ATMOE_STATUS_OK;
    *out = def;
    if (v == NULL && required)
        st = bad(p, "is missing");
    else if (v && !json_is_integer(v))
        st = bad(p, "must be an integer, not %s", atm_json_kind(v));
    else if (v && (json_integer_value(v) < lo || json_integer_value(v) > hi))
        st = bad(p, "is %lld, must be %lld to %lld",
                 (long long)json_integer_value(v), lo, hi);
    else if (v)
        *out = (int)json_integer_value(v);
    pop(p, mark);
    return st;
}

/* A number member that, as a float, is finite and in [lo, hi] (above lo
 * when lo_open). */
static atmoe_status get_num(parser *p, const json_t *obj, const char *key,
                            double lo, double hi, int lo_open, float def,
                            float *out)
{
    const json_t *v = json_object_get(obj, key);
    size_t mark = push_key(p, key);
    atmoe_status st = ATMOE_STATUS_OK;
    *out = def;
    if (v && !json_is_number(v)) {
        st = bad(p, "must be a number, not %s", atm_json_kind(v));
    } else if (v) {
        float x = (float)json_number_value(v);
        if (!isfinite(x) || x < lo || x > hi || (lo_open && x == lo)) {
            char range[64];
            if (isinf(lo) && isinf(hi))
                snprintf(range, sizeof range, "finite as a float");
            else if (isinf(hi))
                snprintf(range, sizeof range, "finite and above %g", lo);
            else
                snprintf(range, sizeof range, "%g to %g", lo, hi);
            st = bad(p, "is %g, must be %s", json_number_value(v), range);
        } else
            *out = x;
    }
    pop(p, mark);
    return st;
}

/* A non-empty string member; *out NULL when absent and not required. */
static atmoe_status get_str(parser *p, const json_t *obj, const char *key,
                            int required, const char **out)
{
    const json_t *v = json_object_get(obj, key);
    size_t mark = push_key(p, key);
    atmoe_status st = ATMOE_STATUS_OK;
    *out = NULL;
    if (v == NULL && required)
        st = bad(p, "is missing");
    else if (v && !json_is_string(v))
        st = bad(p, "must be a string, not %s", atm_json_kind(v));
    else if (v && json_string_length(v) == 0)
        st = bad(p, "is empty");
    else if (v && strlen(json_string_value(v)) != json_string_length(v))
        st = bad(p, "holds a NUL character");
    else if (v)
        *out = json_string_value(v);
    pop(p, mark);
    return st;
}

/* A storage member: "stored", "f32", "f16" or "bf16", and "q8" (8-bit
 * blocks) where allow_q8 says (a module's base weight); absent leaves
 * *out as it is. */
static atmoe_status get_dtype_q8(parser *p, const json_t *obj,
                                 const char *key, int allow_q8, int *out);

static atmoe_status get_dtype(parser *p, const json_t *obj, const char *key,
                              int *out)
{
    return get_dtype_q8(p, obj, key, 0, out);
}

static atmoe_status get_dtype_q8(parser *p, const json_t *obj,
                                 const char *key, int allow_q8, int *out)
{
    static const struct {
        const char *name;
        int dtype;
    } names[] = {{"stored", ATM_DTYPE_STORED},
                 {"f32", ATMOE_DTYPE_F32},
                 {"f16", ATMOE_DTYPE_F16},
                 {"bf16", ATMOE_DTYPE_BF16}};
    const char *v;
    atmoe_status st = get_str(p, obj, key, 0, &v);
    if (st != ATMOE_STATUS_OK || v == NULL)
        return st;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(v, names[i].name) == 0) {
            *out = names[i].dtype;
            return ATMOE_STATUS_OK;
        }
    size_t mark = push_key(p, key);
    if (strcmp(v, "q8") == 0) {
        if (allow_q8) {
            *out = ATMOE_DTYPE_Q8;
            pop(p, mark);
            return ATMOE_STATUS_OK;
        }
        st = bad(p, "is \"q8\"; 8-bit blocks hold a module's base weight "
                    "only (its \"weight\": {\"dtype\": \"q8\"})");
        pop(p, mark);
        return st;
    }
    st = bad(p, "is \"%s\"; the storage types are \"stored\" (as the "
                "file holds it), \"f32\", \"f16\" and \"bf16\"", v);
    pop(p, mark);
    return st;
}

int atm_manifest_device_dtype(int asked, atmoe_safetensors_dtype stored)
{
    if (asked != ATM_DTYPE_STORED)
        return asked;
    switch (stored) {
    case ATMOE_SAFETENSORS_F16: return ATMOE_DTYPE_F16;
    case ATMOE_SAFETENSORS_BF16: return ATMOE_DTYPE_BF16;
    case ATMOE_SAFETENSORS_F32: return ATMOE_DTYPE_F32;
    default: return -1;
    }
}

/* ------------------------------------------------------------------------ */
/* Entries                                                                   */
/* ------------------------------------------------------------------------ */

/* A tensor: "name" in the manifest's weights file, or {"file", "tensor",
 * "dtype"} (and "transposed" where allowed); null or absent leaves ref
 * empty. */
static atmoe_status parse_ref(parser *p, const json_t *obj, const char *key,
                              int allow_transposed, int required,
                              atm_mref *ref)
{
    const json_t *v = json_object_get(obj, key);
    size_t mark = push_key(p, key);
    atmoe_status st = ATMOE_STATUS_OK;
    const char *file = NULL, *tensor = NULL;
    ref->dtype = ATM_DTYPE_INHERIT;
    if (v == NULL || json_is_null(v)) {
        if (required)
            st = bad(p, "is missing");
        goto out;
    }
    if (json_is_string(v)) {
        pop(p, mark);
        if ((st = get_str(p, obj, key, 1, &tensor)) != ATMOE_STATUS_OK)
            return st;
        push_key(p, key);
    } else if (json_is_object(v)) {
        static const char *const keys[] = {"file", "tensor", "transposed",
                                           "dtype", NULL};
        static const char *const plain[] = {"file", "tensor", "dtype", NULL};
        if ((st = only_keys(p, v, allow_transposed ? keys : plain)) ||
            (st = get_str(p, v, "file", 0, &file)) ||
            (st = get_str(p, v, "tensor", 1, &tensor)) ||
            (st = get_dtype_q8(p, v, "dtype", strcmp(key, "weight") == 0,
                               &ref->dtype)))
            goto out;
        const json_t *t = json_object_get(v, "transposed");
        if (t && !json_is_boolean(t)) {
            push_key(p, "transposed");
            st = bad(p, "must be true or false, not %s", atm_json_kind(t));
            goto out;
        }
        ref->transposed = json_is_true(t);
    } else {
        st = bad(p, "must be a tensor name, an object {\"file\", "
                    "\"tensor\"} or null, not %s", atm_json_kind(v));
        goto out;
    }
    if (file == NULL && p->weights == NULL) {
        st = bad(p, "names tensor \"%s\" but no file, and the manifest has "
                    "no top-level \"weights\" file", tensor);
        goto out;
    }
    ref->file = file ? resolve(p, file) : dup_str(p->weights);
    ref->tensor = dup_str(tensor);
    if (ref->file == NULL || ref->tensor == NULL)
        st = oom(p);
out:
    pop(p, mark);
    return st;
}

/* An expert: "adapter-dir" or {"adapter", "layer", "module"} (and
 * "lambda" for the general LoRA). */
static atmoe_status parse_expert(parser *p, const json_t *v,
                                 const atm_mmodule *m, int general,
                                 atm_mexpert *e, float *lambda)
{
    const char *dir = NULL, *module = NULL;
    atmoe_status st;
    e->layer = m->model_layer;
    if (json_is_string(v) && !general) {
        if (json_string_length(v) == 0 ||
            strlen(json_string_value(v)) != json_string_length(v))
            return bad(p, "must name an adapter directory");
        dir = json_string_value(v);
    } else if (json_is_object(v)) {
        static const char *const keys[] = {"adapter", "layer", "module",
                                           NULL};
        static const char *const gkeys[] = {"adapter", "layer", "module",
                                            "lambda", NULL};
        if ((st = only_keys(p, v, general ? gkeys : keys)) ||
            (st = get_str(p, v, "adapter", 1, &dir)) ||
            (st = get_int(p, v, "layer", -1, INT_MAX, 0, m->model_layer,
                          &e->layer)) ||
            (st = get_str(p, v, "module", 0, &module)))
            return st;
        if (general) {
            if (json_object_get(v, "lambda") == NULL) {
                size_t mark = push_key(p, "lambda");
                st = bad(p, "is missing (the weight of the experts against "
                            "the general LoRA, 0 to 1)");
                pop(p, mark);
                return st;
            }
            if ((st = get_num(p, v, "lambda", 0.0, 1.0, 0, 1.0f, lambda)))
                return st;
        }
    } else {
        return bad(p, "must be %s, not %s",
                   general ? "an object {\"adapter\", \"lambda\", ...}"
                           : "an adapter directory or an object "
                             "{\"adapter\", \"layer\", \"module\"}",
                   atm_json_kind(v));
    }
    e->adapter = resolve(p, dir);
    e->module = dup_str(module ? module : m->name);
    if (e->adapter == NULL || e->module == NULL)
        return oom(p);
    return ATMOE_STATUS_OK;
}

static atmoe_status parse_groups(parser *p, const json_t *mod, atm_mmodule *m)
{
    const json_t *groups = json_object_get(mod, "groups");
    const json_t *general = json_object_get(mod, "general");
    size_t mark = push_key(p, "groups");
    atmoe_status st = ATMOE_STATUS_OK;
    if (groups == NULL) {
        st = bad(p, "is missing (a list of groups, each a list of adapter "
                    "directories)");
        goto out;
    }
    if (!json_is_array(groups) || json_array_size(groups) == 0 ||
        json_array_size(groups) > MAX_ITEMS) {
        st = bad(p, "must be a non-empty list of groups, not %s",
                 json_is_array(groups) ? "an empty list"
                                       : atm_json_kind(groups));
        goto out;
    }
    size_t total = 0, g;
    const json_t *grp;
    json_array_foreach(groups, g, grp) {
        size_t n = json_is_array(grp) ? json_array_size(grp) : 0;
        if (n == 0 || n > MAX_ITEMS) {
            push(p, "[%zu]", g);
            st = bad(p, "must be a non-empty list of experts, not %s",
                     json_is_array(grp) ? "an empty list"
                                        : atm_json_kind(grp));
            goto out;
        }
        total += n;
        if (n > m->max_group)
            m->max_group = n;
    }
    if (total > MAX_ITEMS) {
        st = bad(p, "holds %zu experts, more than %d", total, MAX_ITEMS);
        goto out;
    }
    m->groups = json_array_size(groups);
    m->count = total + (general != NULL && !json_is_null(general));
    if ((m->experts = atm_calloc(m->count, sizeof *m->experts)) == NULL) {
        st = oom(p);
        goto out;
    }
    size_t k = 0;
    json_array_foreach(groups, g, grp) {
        size_t i;
        const json_t *v;
        json_array_foreach(grp, i, v) {
            size_t at = push(p, "[%zu][%zu]", g, i);
            atm_mexpert *e = &m->experts[k++];
            e->group = (int)g;
            e->position = (int)i;
            st = parse_expert(p, v, m, 0, e, NULL);
            pop(p, at);
            if (st != ATMOE_STATUS_OK)
                goto out;
        }
    }
    pop(p, mark);
    if (k < m->count) {
        mark = push_key(p, "general");
        atm_mexpert *e = &m->experts[k];
        e->group = -1;
        m->has_general = 1;
        st = parse_expert(p, general, m, 1, e, &m->lambda);
    }
out:
    pop(p, mark);
    return st;
}

/* masks: [{"group", "expert"}], fixed: [{"group", "expert", "weight"}]. */
static atmoe_status parse_controls(parser *p, const json_t *router,
                                   const char *key, atm_mmodule *m,
                                   atm_mcontrol **out, size_t *count)
{
    const json_t *list = json_object_get(router, key);
    if (list == NULL)
        return ATMOE_STATUS_OK;
    size_t mark = push_key(p, key);
    atmoe_status st = ATMOE_STATUS_OK;
    int fixed = strcmp(key, "fixed") == 0;
    if (!json_is_array(list) || json_array_size(list) > MAX_ITEMS) {
        st = bad(p, "must be a list of objects, not %s", atm_json_kind(list));
        goto out;
    }
    *count = json_array_size(list);
    if (*count && (*out = atm_calloc(*count, sizeof **out)) == NULL) {
        st = oom(p);
        goto out;
    }
    size_t i;
    const json_t *v;
    json_array_foreach(list, i, v) {
        static const char *const mkeys[] = {"group", "expert", NULL};
        static const char *const fkeys[] = {"group", "expert", "weight",
                                            NULL};
        size_t at = push(p, "[%zu]", i);
        atm_mcontrol *c = &(*out)[i];
        if ((st = expect_object(p, v)) ||
            (st = only_keys(p, v, fixed ? fkeys : mkeys)) ||
            (st = get_int(p, v, "group", 0, (long long)m->groups - 1, 1, 0,
                          &c->group)))
            goto out;
        size_t size = 0;
        for (size_t e = 0; e < m->count; e++)
            size += m->experts[e].group == c->group;
        if ((st = get_int(p, v, "expert", -1, (long long)size - 1, 0, -1,
                          &c->expert)))
            goto out;
        if (fixed && json_object_get(v, "weight") == NULL) {
            push_key(p, "weight");
            st = bad(p, "is missing");
            goto out;
        }
        if (fixed && (st = get_num(p, v, "weight", 0.0, 1.0, 0, 0.0f,
                                   &c->weight)))
            goto out;
        pop(p, at);
    }
out:
    pop(p, mark);
    return st;
}

static atmoe_status parse_router(parser *p, const json_t *mod,
                                 atm_mmodule *m)
{
    const json_t *r = json_object_get(mod, "router");
    m->form = ATMOE_ROUTER_PROJECTED;
    m->tau_g = m->tau_d = 1.0f;
    if (r == NULL)
        return ATMOE_STATUS_OK;
    size_t mark = push_key(p, "router");
    static const char *const keys[] = {
        "form", "tau_g", "tau_d", "top_k_groups", "top_k_experts", "w_g",
        "w_d", "v_d", "masks", "fixed", NULL};
    const char *form = NULL;
    atmoe_status st;
    if ((st = expect_object(p, r)) || (st = only_keys(p, r, keys)) ||
        (st = get_str(p, r, "form", 0, &form)))
        goto out;
    if (form && strcmp(form, "scaled") == 0) {
        m->form = ATMOE_ROUTER_SCALED;
    } else if (form && strcmp(form, "projected") != 0) {
        push_key(p, "form");
        st = bad(p, "is \"%s\", must be \"projected\" or \"scaled\"", form);
        goto out;
    }
    const char *wrong = m->form == ATMOE_ROUTER_SCALED ? "w_d" : "v_d";
    if (json_object_get(r, wrong)) {
        push_key(p, wrong);
        st = bad(p, "belongs to the %s form; this router is %s",
                 m->form == ATMOE_ROUTER_SCALED ? "projected" : "scaled",
                 m->form == ATMOE_ROUTER_SCALED ? "scaled" : "projected");
        goto out;
    }
    if ((st = get_num(p, r, "tau_g", 0.0, INFINITY, 1, 1.0f, &m->tau_g)) ||
        (st = get_num(p, r, "tau_d", 0.0, INFINITY, 1, 1.0f, &m->tau_d)) ||
        (st = get_int(p, r, "top_k_groups", 0, (long long)m->groups, 0, 0,
                      &m->top_k_groups)) ||
        (st = get_int(p, r, "top_k_experts", 0, (long long)m->max_group, 0, 0,
                      &m->top_k_experts)) ||
        (st = parse_ref(p, r, "w_g", 0, 0, &m->w_g)) ||
        (st = parse_ref(p, r, m->form == ATMOE_ROUTER_SCALED ? "v_d" : "w_d",
                        0, 0, &m->w_d)) ||
        (st = parse_controls(p, r, "masks", m, &m->masks, &m->n_masks)) ||
        (st = parse_controls(p, r, "fixed", m, &m->fixed, &m->n_fixed)))
        goto out;
out:
    pop(p, mark);
    return st;
}

/* A string member that is one of names (NULL-terminated); *out its
 * index, def when absent. */
static atmoe_status get_choice(parser *p, const json_t *obj, const char *key,
                               const char *const *names, int def, int *out)
{
    const char *v;
    atmoe_status st = get_str(p, obj, key, 0, &v);
    *out = def;
    if (st != ATMOE_STATUS_OK || v == NULL)
        return st;
    for (int i = 0; names[i]; i++)
        if (strcmp(v, names[i]) == 0) {
            *out = i;
            return ATMOE_STATUS_OK;
        }
    size_t mark = push_key(p, key);
    char list[128] = "";
    size_t n = 0;
    for (int i = 0; names[i] && n < sizeof list; i++)
        n += (size_t)snprintf(list + n, sizeof list - n, "%s\"%s\"",
                              i ? ", " : "", names[i]);
    st = bad(p, "is \"%s\", must be one of %s", v, list);
    pop(p, mark);
    return st;
}

/* "rank1": {"variant", "routing", "a", "b", "w_r", "w_om", "w_c",
 * "score_map", "k_router", "k_intuition", "top_k"}. */
static atmoe_status parse_rank1(parser *p, const json_t *mod, atm_mmodule *m)
{
    static const char *const keys[] = {
        "variant", "routing", "a", "b", "w_r", "w_om", "w_c", "score_map",
        "k_router", "k_intuition", "top_k", NULL};
    static const char *const variants[] = {"v1", "v2", NULL};
    static const char *const routings[] = {"both", "router", "intuition",
                                           NULL};
    static const char *const other[] = {"groups", "general", "router", "c",
                                        NULL};
    const json_t *r = json_object_get(mod, "rank1");
    for (const char *const *k = other; *k; k++)
        if (json_object_get(mod, *k)) {
            size_t mark = push_key(p, *k);
            atmoe_status st = bad(p, "belongs to a module of LoRA experts; "
                                     "this one has \"rank1\" experts");
            pop(p, mark);
            return st;
        }
    size_t mark = push_key(p, "rank1");
    int variant, routing;
    atmoe_status st;
    m->rank1 = 1;
    if ((st = expect_object(p, r)) || (st = only_keys(p, r, keys)) ||
        (st = get_choice(p, r, "variant", variants, 1, &variant)) ||
        (st = get_choice(p, r, "routing", routings, 0, &routing)))
        goto out;
    m->variant = variant ? ATMOE_MOR1E_V2 : ATMOE_MOR1E_V1;
    m->routing = routing == 0   ? ATMOE_MOR1E_ROUTE_BOTH
                 : routing == 1 ? ATMOE_MOR1E_ROUTE_ROUTER
                                : ATMOE_MOR1E_ROUTE_INTUITION;
    if ((st = parse_ref(p, r, "a", 0, 1, &m->a)) ||
        (st = parse_ref(p, r, "b", 0, 1, &m->b)) ||
        (st = parse_ref(p, r, "w_r", 0, 0, &m->w_r)) ||
        (st = parse_ref(p, r, "w_om", 0, 0, &m->w_om)) ||
        (st = parse_ref(p, r, "w_c", 0, 0, &m->w_c)) ||
        (st = parse_ref(p, r, "score_map", 0, 0, &m->score_map)) ||
        (st = get_num(p, r, "k_router", -INFINITY, INFINITY, 0,
                      ATMOE_MOR1E_K_ROUTER, &m->k_router)) ||
        (st = get_num(p, r, "k_intuition", -INFINITY, INFINITY, 0,
                      ATMOE_MOR1E_K_INTUITION, &m->k_intuition)) ||
        (st = get_int(p, r, "top_k", 0, MAX_ITEMS, 0, 0, &m->top_k)))
        goto out;
    if (m->routing == ATMOE_MOR1E_ROUTE_INTUITION && m->w_r.file) {
        push_key(p, "w_r");
        st = bad(p, "is given but the routing is \"intuition\" (router "
                    "off)");
    } else if (m->routing == ATMOE_MOR1E_ROUTE_ROUTER && m->score_map.file) {
        push_key(p, "score_map");
        st = bad(p, "is given but the routing is \"router\" (no "
                    "intuition)");
    }
out:
    pop(p, mark);
    return st;
}

static atmoe_status parse_module(parser *p, const json_t *v, atm_mmodule *m)
{
    static const char *const keys[] = {"weight", "bias", "groups", "general",
                                       "router", "c", "experts_dtype", "rank1",
                                       NULL};
    atmoe_status st;
    m->lambda = 1.0f;
    m->experts_dtype = ATM_DTYPE_INHERIT;
    if ((st = expect_object(p, v)) || (st = only_keys(p, v, keys)) ||
        (st = get_dtype(p, v, "experts_dtype", &m->experts_dtype)) ||
        (st = parse_ref(p, v, "weight", 1, 1, &m->weight)) ||
        (st = parse_ref(p, v, "bias", 0, 0, &m->bias)))
        return st;
    if (json_object_get(v, "rank1"))
        st = parse_rank1(p, v, m);
    else if ((st = parse_groups(p, v, m)) == ATMOE_STATUS_OK &&
             (st = parse_router(p, v, m)) == ATMOE_STATUS_OK)
        st = get_num(p, v, "c", -INFINITY, INFINITY, 0, 1.0f, &m->c);
    if (st != ATMOE_STATUS_OK)
        return st;
    if ((m->where = dup_str(p->path)) == NULL)
        return oom(p);
    return ATMOE_STATUS_OK;
}

static atmoe_status parse_layer(parser *p, atmoe_manifest *mf,
                                const json_t *v, size_t l)
{
    static const char *const keys[] = {"index", "output", "modules", NULL};
    atmoe_status st;
    int index;
    const char *output;
    if ((st = expect_object(p, v)) || (st = only_keys(p, v, keys)) ||
        (st = get_int(p, v, "index", 0, INT_MAX, 0, l > INT_MAX ? 0 : (int)l,
                      &index)) ||
        (st = get_str(p, v, "output", 0, &output)))
        return st;
    const json_t *mods = json_object_get(v, "modules");
    size_t mark = push_key(p, "modules");
    if (mods == NULL) {
        st = bad(p, "is missing");
        goto out;
    }
    if (!json_is_object(mods) || json_object_size(mods) == 0 ||
        json_object_size(mods) > MAX_ITEMS) {
        st = bad(p, "must be a non-empty object of modules, not %s",
                 json_is_object(mods) ? "an empty one" : atm_json_kind(mods));
        goto out;
    }
    if (output == NULL && json_object_size(mods) > 1) {
        pop(p, mark);
        mark = push_key(p, "output");
        st = bad(p, "is missing: the layer has %zu modules, so it must say "
                    "which one's output the next layer reads",
                 json_object_size(mods));
        goto out;
    }
    if (output && json_object_get(mods, output) == NULL) {
        pop(p, mark);
        mark = push_key(p, "output");
        st = bad(p, "names \"%s\", which is not a module of this layer",
                 output);
        goto out;
    }
    if (mf->count + json_object_size(mods) > MAX_ITEMS) {
        st = bad(p, "the manifest holds more than %d modules", MAX_ITEMS);
        goto out;
    }
    atm_mmodule *grown = atm_realloc(mf->modules, (mf->count +
                                               json_object_size(mods)) *
                                                  sizeof *grown);
    if (grown == NULL) {
        st = oom(p);
        goto out;
    }
    mf->modules = grown;
    const char *name;
    const json_t *mv;
    json_object_foreach((json_t *)mods, name, mv) {
        atm_mmodule *m = &mf->modules[mf->count++];
        memset(m, 0, sizeof *m);
        m->layer = l;
        m->model_layer = index;
        m->is_output = output ? strcmp(name, output) == 0 : 1;
        if ((m->name = dup_str(name)) == NULL) {
            st = oom(p);
            goto out;
        }
        size_t at = push_key(p, name);
        if (name[0] == '\0' || strlen(name) > 128)
            st = bad(p, "a module name must be 1 to 128 characters");
        else
            st = parse_module(p, mv, m);
        pop(p, at);
        if (st != ATMOE_STATUS_OK)
            goto out;
    }
out:
    pop(p, mark);
    return st;
}

/* The linear head the recipes train a classification through: "name" in
 * the weights file, or {"file", "tensor", "transposed", "bias",
 * "ignore_index"}; W and its bias are always held as f32 (frozen). */
static atmoe_status parse_head(parser *p, atmoe_manifest *mf,
                               const json_t *root)
{
    static const char *const keys[] = {"file", "tensor", "transposed",
                                       "bias", "ignore_index", NULL};
    const json_t *v = json_object_get(root, "head");
    atmoe_status st = ATMOE_STATUS_OK;
    mf->ignore_index = -100;
    if (v && json_is_object(v)) {
        size_t mark = push_key(p, "head");
        const json_t *b = json_object_get(v, "bias");
        if ((st = only_keys(p, v, keys)) ||
            (st = get_int(p, v, "ignore_index", INT_MIN, INT_MAX, 0, -100,
                          &mf->ignore_index)))
            return st;
        if (b && json_is_object(b) && json_object_get(b, "dtype")) {
            push_key(p, "bias");
            return bad(p, "has a \"dtype\"; the head is held as f32");
        }
        if ((st = parse_ref(p, v, "bias", 0, 0, &mf->head_bias)))
            return st;
        pop(p, mark);
        /* W is an ordinary reference once the head's own keys are gone. */
        json_t *w = json_deep_copy(v), *wrap = json_object();
        if (w == NULL || wrap == NULL) {
            json_decref(w);
            json_decref(wrap);
            return oom(p);
        }
        json_object_del(w, "bias");
        json_object_del(w, "ignore_index");
        json_object_set_new(wrap, "head", w);
        st = parse_ref(p, wrap, "head", 1, 1, &mf->head);
        json_decref(wrap);
    } else if (v && !json_is_null(v)) {
        st = parse_ref(p, root, "head", 1, 0, &mf->head);
    }
    mf->head.dtype = ATMOE_DTYPE_F32;
    mf->head_bias.dtype = ATMOE_DTYPE_F32;
    return st;
}

static atmoe_status parse_root(parser *p, atmoe_manifest *mf,
                               const json_t *root)
{
    static const char *const keys[] = {"version", "description", "weights",
                                       "dtype", "allow_nonfinite", "centroids",
                                       "layers", "head", NULL};
    atmoe_status st;
    int version;
    const char *weights, *description;
    mf->dtype = ATM_DTYPE_STORED;
    if ((st = expect_object(p, root)) || (st = only_keys(p, root, keys)) ||
        (st = get_int(p, root, "version", INT_MIN, INT_MAX, 1, 0, &version)) ||
        (st = get_dtype(p, root, "dtype", &mf->dtype)))
        return st;
    const json_t *nf = json_object_get(root, "allow_nonfinite");
    if (nf && !json_is_boolean(nf)) {
        push_key(p, "allow_nonfinite");
        return bad(p, "must be true or false, not %s", atm_json_kind(nf));
    }
    mf->allow_nonfinite = json_is_true(nf);
    if (version != MANIFEST_VERSION) {
        push_key(p, "version");
        return bad(p, "is %d; this library reads version %d", version,
                   MANIFEST_VERSION);
    }
    if ((st = get_str(p, root, "description", 0, &description)) ||
        (st = get_str(p, root, "weights", 0, &weights)))
        return st;
    if (weights && (p->weights = resolve(p, weights)) == NULL)
        return oom(p);
    if ((st = parse_ref(p, root, "centroids", 0, 0, &mf->centroids)) ||
        (st = parse_head(p, mf, root)))
        return st;
    const json_t *layers = json_object_get(root, "layers");
    push_key(p, "layers");
    if (layers == NULL)
        return bad(p, "is missing");
    if (!json_is_array(layers) || json_array_size(layers) == 0 ||
        json_array_size(layers) > MAX_ITEMS)
        return bad(p, "must be a non-empty list of layers, not %s",
                   json_is_array(layers) ? "an empty list"
                                         : atm_json_kind(layers));
    size_t l;
    const json_t *v;
    json_array_foreach(layers, l, v) {
        size_t mark = push(p, "[%zu]", l);
        if ((st = parse_layer(p, mf, v, l)) != ATMOE_STATUS_OK)
            return st;
        pop(p, mark);
        mf->layers++;
    }
    return ATMOE_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* Public functions                                                          */
/* ------------------------------------------------------------------------ */

static void free_ref(atm_mref *r)
{
    atm_free(r->file);
    atm_free(r->tensor);
}

ATMOE_API void atmoe_manifest_free(atmoe_manifest *manifest)
{
    if (manifest == NULL)
        return;
    for (size_t i = 0; i < manifest->count; i++) {
        atm_mmodule *m = &manifest->modules[i];
        atm_free(m->where);
        atm_free(m->name);
        free_ref(&m->weight);
        free_ref(&m->bias);
        free_ref(&m->w_g);
        free_ref(&m->w_d);
        free_ref(&m->a);
        free_ref(&m->b);
        free_ref(&m->w_r);
        free_ref(&m->w_om);
        free_ref(&m->w_c);
        free_ref(&m->score_map);
        for (size_t e = 0; m->experts && e < m->count; e++) {
            atm_free(m->experts[e].adapter);
            atm_free(m->experts[e].module);
        }
        atm_free(m->experts);
        atm_free(m->masks);
        atm_free(m->fixed);
    }
    atm_free(manifest->modules);
    for (size_t i = 0; i < manifest->n_files; i++) {
        atm_free(manifest->files[i].path);
        atmoe_safetensors_free(manifest->files[i].file);
    }
    atm_free(manifest->files);
    for (size_t i = 0; i < manifest->n_adapters; i++) {
        atm_free(manifest->adapters[i].path);
        atmoe_adapter_free(manifest->adapters[i].adapter);
    }
    atm_free(manifest->adapters);
    free_ref(&manifest->centroids);
    free_ref(&manifest->head);
    free_ref(&manifest->head_bias);
    atm_free(manifest);
}

ATMOE_API atmoe_status atmoe_manifest_parse(atmoe_context *ctx,
                                            const char *text, size_t size,
                                            const char *dir,
                                            atmoe_manifest **manifest)
{
    if (manifest)
        *manifest = NULL;
    ATM_CHECK_NULL(ctx, text);
    ATM_CHECK_NULL(ctx, manifest);
    json_error_t jerr;
    json_t *root = json_loadb(text, size, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL)
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "the manifest is not JSON: line %d, column %d: %s",
                        jerr.line, jerr.column, jerr.text);
    parser p = {.ctx = ctx, .dir = dir};
    atmoe_manifest *mf = atm_calloc(1, sizeof *mf);
    atmoe_status st = mf ? parse_root(&p, mf, root) : oom(&p);
    json_decref(root);
    atm_free(p.weights);
    if (st != ATMOE_STATUS_OK) {
        atmoe_manifest_free(mf);
        return st;
    }
    mf->ctx = ctx;
    *manifest = mf;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_manifest_open(atmoe_context *ctx,
                                           const char *path,
                                           atmoe_manifest **manifest)
{
    const char *fn = __func__;
    if (manifest)
        *manifest = NULL;
    ATM_CHECK_NULL(ctx, path);
    ATM_CHECK_NULL(ctx, manifest);
    FILE *f = atm_file_open_regular(path);
    if (f == NULL)
        return atm_fail(ctx,
                        errno == ENOENT ? ATMOE_STATUS_NOT_FOUND
                                        : ATMOE_STATUS_IO_ERROR,
                        "%s: cannot read %s: %s", fn, path,
                        atm_file_strerror(errno));
    char *text = NULL;
    size_t size = 0, cap = 0;
    int err = 0;
    for (;;) {
        if (size == cap) {
            /* Manifests are small: 64 MiB is far beyond any real one. */
            if (cap >= ((size_t)64 << 20)) {
                err = EFBIG;
                break;
            }
            char *t = atm_realloc(text, cap = cap ? 2 * cap : 65536);
            if (t == NULL) {
                err = ENOMEM;
                break;
            }
            text = t;
        }
        size_t n = fread(text + size, 1, cap - size, f);
        size += n;
        if (n == 0) {
            if (ferror(f))
                err = errno ? errno : EIO;
            break;
        }
    }
    fclose(f);
    if (err) {
        atm_free(text);
        return atm_fail(ctx,
                        err == ENOMEM ? ATMOE_STATUS_HOST_OUT_OF_MEMORY
                                      : ATMOE_STATUS_IO_ERROR,
                        "%s: cannot read %s: %s", fn, path, strerror(err));
    }
    /* Paths inside are relative to the manifest's directory. */
    char *dir = dup_str(path);
    if (dir == NULL) {
        atm_free(text);
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", fn);
    }
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        slash[1] = '\0';
    else if (slash)
        *slash = '\0';
    atmoe_status st = atmoe_manifest_parse(ctx, text ? text : "", size,
                                           slash ? dir : NULL, manifest);
    if (st != ATMOE_STATUS_OK) {
        char detail[ATM_ERRMSG_SIZE / 2];
        snprintf(detail, sizeof detail, "%s", atmoe_errmsg(ctx));
        atm_fail(ctx, st, "%s: %s", path, detail);
    }
    atm_free(text);
    atm_free(dir);
    return st;
}

ATMOE_API atmoe_status atmoe_manifest_get_info(const atmoe_manifest *manifest,
                                               atmoe_manifest_info *info)
{
    ATM_CHECK_NULL(NULL, manifest);
    ATM_CHECK_NULL(manifest->ctx, info);
    info->layers = manifest->layers;
    info->modules = manifest->count;
    info->checked = manifest->checked;
    info->d_in = manifest->d_in;
    info->d_out = manifest->d_out;
    info->centroids_file = manifest->centroids.file;
    info->centroids_tensor = manifest->centroids.tensor;
    info->clusters = manifest->checked ? manifest->clusters : 0;
    info->embedding_dim = manifest->checked ? manifest->embedding_dim : 0;
    info->head_file = manifest->head.file;
    info->head_tensor = manifest->head.tensor;
    info->classes = manifest->checked ? manifest->classes : 0;
    info->ignore_index = manifest->ignore_index;
    return ATMOE_STATUS_OK;
}

static atmoe_manifest_tensor public_ref(const atm_mref *r)
{
    return (atmoe_manifest_tensor){r->file, r->tensor, r->transposed};
}

ATMOE_API atmoe_status atmoe_manifest_get_module(
    const atmoe_manifest *manifest, size_t index, atmoe_manifest_module *module)
{
    ATM_CHECK_NULL(NULL, manifest);
    ATM_CHECK_NULL(manifest->ctx, module);
    if (index >= manifest->count)
        return atm_fail(manifest->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: index %zu; the manifest has %zu module(s)",
                        __func__, index, manifest->count);
    const atm_mmodule *m = &manifest->modules[index];
    *module = (atmoe_manifest_module){
        .layer = m->layer,
        .model_layer = m->model_layer,
        .name = m->name,
        .is_output = m->is_output,
        .weight = public_ref(&m->weight),
        .bias = public_ref(&m->bias),
        .w_g = public_ref(&m->w_g),
        .w_d = public_ref(&m->w_d),
        .groups = m->groups,
        .experts = m->count - (size_t)m->has_general,
        .has_general = m->has_general,
        .lambda = m->lambda,
        .c = m->c,
        .form = m->form,
        .tau_g = m->tau_g,
        .tau_d = m->tau_d,
        .top_k_groups = m->top_k_groups,
        .top_k_experts = m->top_k_experts,
        .masks = m->n_masks,
        .fixed = m->n_fixed,
        .d_in = manifest->checked ? m->d_in : 0,
        .d_out = manifest->checked ? m->d_out : 0,
        .rank1 = m->rank1,
        .variant = m->variant,
        .routing = m->routing,
        .a = public_ref(&m->a),
        .b = public_ref(&m->b),
        .w_r = public_ref(&m->w_r),
        .w_om = public_ref(&m->w_om),
        .w_c = public_ref(&m->w_c),
        .score_map = public_ref(&m->score_map),
        .k_router = m->k_router,
        .k_intuition = m->k_intuition,
        .top_k = m->top_k,
        .r1 = manifest->checked ? m->r1 : 0,
        .r2 = manifest->checked ? m->r2 : 0,
        .rank1_experts = manifest->checked ? m->E : 0,
    };
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_manifest_get_expert(
    const atmoe_manifest *manifest, size_t module, size_t index,
    atmoe_manifest_expert *expert)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, manifest);
    ATM_CHECK_NULL(manifest->ctx, expert);
    if (module >= manifest->count)
        return atm_fail(manifest->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: module %zu; the manifest has %zu", fn, module,
                        manifest->count);
    const atm_mmodule *m = &manifest->modules[module];
    if (index >= m->count)
        return atm_fail(manifest->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: index %zu; module %s has %zu expert(s)%s", fn,
                        index, m->where, m->count - (size_t)m->has_general,
                        m->has_general ? " and a general LoRA" : "");
    const atm_mexpert *e = &m->experts[index];
    *expert = (atmoe_manifest_expert){e->group, e->position, e->adapter,
                                      e->layer, e->module, NULL, 0, 0.0f,
                                      0.0f, 0};
    if (manifest->checked) {
        atmoe_adapter_target t;
        atmoe_status st = atmoe_adapter_get_target(
            manifest->adapters[e->adapter_index].adapter, e->target, &t);
        if (st != ATMOE_STATUS_OK)
            return st;
        expert->target = t.module;
        expert->rank = t.rank;
        expert->alpha = t.alpha;
        expert->scale = t.scale;
        expert->flags = t.flags;
    }
    return ATMOE_STATUS_OK;
}

/* The bytes of a weight [rows, cols] as held (q8 in whole blocks per
 * row): absent ones are f32 zeros. */
static uint64_t ref_bytes(const atm_mref *r, uint64_t rows, uint64_t cols)
{
    size_t shape[2] = {(size_t)rows, (size_t)cols};
    return atm_dtype_bytes(r->file ? r->device : ATMOE_DTYPE_F32, 2, shape);
}

ATMOE_API atmoe_status atmoe_manifest_get_storage(
    const atmoe_manifest *manifest, size_t module,
    atmoe_manifest_storage *storage)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, manifest);
    ATM_CHECK_NULL(manifest->ctx, storage);
    if (!manifest->checked)
        return atm_fail(manifest->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the manifest is not checked yet "
                        "(atmoe_manifest_check)", fn);
    if (module >= manifest->count)
        return atm_fail(manifest->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: module %zu; the manifest has %zu", fn, module,
                        manifest->count);
    const atm_mmodule *m = &manifest->modules[module];
    const atm_mref *refs[4] = {&m->weight, &m->bias, &m->w_g, &m->w_d};
    atmoe_safetensors_dtype file[4];
    atmoe_dtype dev[4];
    for (int i = 0; i < 4; i++) {
        file[i] = refs[i]->file ? refs[i]->stored : ATMOE_SAFETENSORS_F32;
        dev[i] = refs[i]->file ? refs[i]->device : ATMOE_DTYPE_F32;
    }
    uint64_t din = m->d_in, dout = m->d_out, G = m->groups, M = m->max_group;
    uint64_t R = m->total_rank, E = m->count - (size_t)m->has_general;
    int scaled = m->form == ATMOE_ROUTER_SCALED;
    /* What atmoe_manifest_build allocates for the module: the constants,
     * the expert set's A_all, B_all and f32 B^T and its per-channel
     * arrays (experts.c), and the router's six control arrays
     * (router.c). */
    uint64_t bytes = ref_bytes(&m->weight, dout, din) +
                     (m->bias.file ? 4 * dout : 0) +
                     ref_bytes(&m->w_g, din, G) +
                     ref_bytes(&m->w_d, scaled ? G : din, scaled ? M : G * M) +
                     R * din * atmoe_dtype_size(m->a_dtype) +
                     R * dout * (atmoe_dtype_size(m->b_dtype) + 4) + 8 * R +
                     4 * (3 * G + 2 * G * M + E);
    *storage = (atmoe_manifest_storage){
        file[0], file[1], file[2], file[3], m->a_stored, m->b_stored,
        dev[0], dev[1], dev[2], dev[3], m->a_dtype, m->b_dtype, bytes};
    return ATMOE_STATUS_OK;
}
