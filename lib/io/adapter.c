/* PEFT LoRA adapters: adapter_config.json read and written through
 * jansson, adapter_model.safetensors through the library's safetensors
 * reader and writer, and the glue that turns a target into an expert. */
#include <config.h>

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/alloc.h"
#include "moe/experts.h"
#include "base/file.h"
#include "base/json.h"
#include "base/log.h"
#include "io/adapter.h"
#include "io/pattern.h"

#define CONFIG_NAME "adapter_config.json"
#define WEIGHTS_NAME "adapter_model.safetensors"
/* PEFT saves a LoRA model's weights under the wrapper's names. */
#define KEY_PREFIX "base_model.model."

typedef struct atm_target {
    char *module;
    size_t name_offset; /* where the part after the layer index starts */
    int layer;
    size_t rank, d_in, d_out;
    float alpha;
    unsigned flags;
    float scale;
    const char *a_name, *b_name; /* tensors of the file, or NULL */
    float *a, *b;                /* host copies from atmoe_adapter_set */
} atm_target;

struct atmoe_adapter {
    atmoe_context *ctx;
    char *dir;
    char *base_model;
    char *task_type;
    size_t r;
    float alpha;
    int use_rslora, fan_in_fan_out, from_file;
    char **layers_pattern; /* NULL-terminated, or NULL */
    char *what_layers;     /* "<config path>: layers_pattern" */
    atmoe_safetensors *file;
    atm_target *targets;
    size_t count, capacity;
};

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */
/* ------------------------------------------------------------------------ */

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = atm_malloc(n);
    if (p)
        memcpy(p, s, n);
    return p;
}

static char *join_path(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = atm_malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static atmoe_status oom(const atmoe_context *ctx, const char *fn)
{
    return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                    "%s: out of host memory", fn);
}

static int all_digits(const char *s, size_t n)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isdigit((unsigned char)s[i]))
            return 0;
    return 1;
}

/* Module paths in reading order: runs of digits compare as numbers, so
 * layer 2 comes before layer 10.  Names equal as numbers ("m.01" and
 * "m.1") are then ordered by strcmp, so that only equal names compare
 * equal. */
static int natural_cmp(const char *a, const char *b)
{
    const char *a0 = a, *b0 = b;
    while (*a && *b) {
        if (isdigit((unsigned char)*a) && isdigit((unsigned char)*b)) {
            while (*a == '0')
                a++;
            while (*b == '0')
                b++;
            size_t na = 0, nb = 0;
            while (isdigit((unsigned char)a[na]))
                na++;
            while (isdigit((unsigned char)b[nb]))
                nb++;
            if (na != nb)
                return na < nb ? -1 : 1;
            int c = strncmp(a, b, na);
            if (c != 0)
                return c;
            a += na;
            b += nb;
        } else {
            if (*a != *b)
                return (unsigned char)*a < (unsigned char)*b ? -1 : 1;
            a++;
            b++;
        }
    }
    if (*a || *b)
        return *a ? 1 : -1;
    return strcmp(a0, b0);
}

static float lora_scale(size_t rank, float alpha, unsigned flags)
{
    return flags & ATMOE_EXPERT_RSLORA ? alpha / sqrtf((float)rank)
                                       : alpha / (float)rank;
}

/* ------------------------------------------------------------------------ */
/* Layer indexes, as PEFT finds them                                         */
/* ------------------------------------------------------------------------ */

/* PEFT's rule for layers_to_transform: the digits in ".*\.[^.]*\.(\d+)\."
 * or, with layers_pattern, ".*\.PATTERN\.(\d+)\." (the last such
 * component, as Python's greedy match finds it).  *layer is -1 when there
 * is none; *name_offset is where the rest of the path starts. */
static atmoe_status layer_of(const atmoe_adapter *ad, const char *module,
                             int *layer, size_t *name_offset)
{
    *layer = -1;
    *name_offset = 0;
    size_t n = strlen(module);
    /* The path before a candidate index, which layers_pattern matches. */
    char *prefix = atm_malloc(n + 1);
    if (prefix == NULL)
        return oom(ad->ctx, "reading a module's layer index");
    atmoe_status st = ATMOE_STATUS_OK;
    const char *const *pats = (const char *const *)ad->layers_pattern;
    size_t npats = 0;
    while (pats && pats[npats])
        npats++;
    for (size_t p = 0; p < (npats ? npats : 1) && *layer < 0; p++) {
        /* A digits component [s, e) with a '.' after it and, for the
         * default rule, two components before it. */
        for (size_t e = n; e-- > 0 && *layer < 0;) {
            if (module[e] != '.')
                continue;
            size_t s = e;
            while (s > 0 && module[s - 1] != '.')
                s--;
            if (s == 0 || !all_digits(module + s, e - s))
                continue;
            memcpy(prefix, module, s - 1);
            prefix[s - 1] = '\0';
            int ok;
            if (npats)
                st = atm_pattern_match(ad->ctx, ad->what_layers,
                                       "^.*\\.(%s)$", pats[p], prefix, &ok);
            else
                ok = strchr(prefix, '.') != NULL;
            if (st != ATMOE_STATUS_OK)
                goto out;
            if (ok && e - s <= 9) {
                *layer = atoi(module + s);
                *name_offset = e + 1;
            }
        }
    }
out:
    atm_free(prefix);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Opening                                                                   */
/* ------------------------------------------------------------------------ */

ATMOE_API void atmoe_adapter_free(atmoe_adapter *adapter)
{
    if (adapter == NULL)
        return;
    for (size_t i = 0; i < adapter->count; i++) {
        atm_free(adapter->targets[i].module);
        atm_free(adapter->targets[i].a);
        atm_free(adapter->targets[i].b);
    }
    atm_free(adapter->targets);
    if (adapter->layers_pattern)
        for (char **p = adapter->layers_pattern; *p; p++)
            atm_free(*p);
    atm_free(adapter->layers_pattern);
    atm_free(adapter->what_layers);
    atmoe_safetensors_free(adapter->file);
    atm_free(adapter->dir);
    atm_free(adapter->base_model);
    atm_free(adapter->task_type);
    atm_free(adapter);
}

ATMOE_API atmoe_status atmoe_adapter_new(atmoe_context *ctx,
                                         atmoe_adapter **adapter)
{
    if (adapter)
        *adapter = NULL;
    ATM_CHECK_NULL(ctx, adapter);
    atmoe_adapter *ad = atm_calloc(1, sizeof *ad);
    if (ad == NULL || (ad->dir = dup_str("")) == NULL) {
        atm_free(ad);
        return oom(ctx, __func__);
    }
    ad->ctx = ctx;
    *adapter = ad;
    return ATMOE_STATUS_OK;
}

/* What opening knows of adapter_config.json while it reads the weights. */
typedef struct config {
    const char *path;
    const json_t *target_modules, *exclude_modules, *layers_to_transform;
    const json_t *rank_pattern, *alpha_pattern;
} config;

static atmoe_status bad_type(const atmoe_adapter *ad, const config *cf,
                             const char *key, const char *want,
                             const json_t *v)
{
    return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                    "%s: \"%s\" must be %s, not %s", cf->path, key, want,
                    atm_json_kind(v));
}

/* Features whose weights or arithmetic the library does not have. */
static atmoe_status refuse_features(const atmoe_adapter *ad, const config *cf,
                                    const json_t *root)
{
    static const struct {
        const char *key, *why;
    } features[] = {
        {"use_dora", "DoRA rescales each column of the adapted weight by a "
                     "trained magnitude vector"},
        {"lora_bias", "the adapter trains a bias on lora_B"},
        {"use_qalora", "QA-LoRA pools the input before lora_A"},
        {"modules_to_save", "the adapter replaces whole modules "
                            "(modules_to_save) besides its LoRA pairs"},
        {"trainable_token_indices", "the adapter trains embedding rows"},
        {"layer_replication", "the adapter duplicates base layers"},
        {"alora_invocation_tokens", "activated LoRA applies only after its "
                                    "invocation tokens"},
        {"target_parameters", "the adapter targets parameters (MoE expert "
                              "weights), not linear modules"},
    };
    for (size_t i = 0; i < sizeof features / sizeof features[0]; i++) {
        const json_t *v = json_object_get(root, features[i].key);
        int on = v && !json_is_null(v) && !json_is_false(v) &&
                 !(json_is_array(v) && json_array_size(v) == 0) &&
                 !(json_is_object(v) && json_object_size(v) == 0);
        if (on)
            return atm_fail(ad->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                            "%s: \"%s\" is set: %s, which the library does "
                            "not compute", cf->path, features[i].key,
                            features[i].why);
    }
    const json_t *bias = json_object_get(root, "bias");
    if (bias && !json_is_null(bias) &&
        !(json_is_string(bias) && strcmp(json_string_value(bias), "none") == 0))
        return atm_fail(ad->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                        "%s: \"bias\" is %s%s%s: the adapter trains biases "
                        "of the base model, which the library does not "
                        "apply (only \"none\" is supported)", cf->path,
                        json_is_string(bias) ? "\"" : "",
                        json_is_string(bias) ? json_string_value(bias)
                                             : atm_json_kind(bias),
                        json_is_string(bias) ? "\"" : "");
    return ATMOE_STATUS_OK;
}

/* A key that is a string, a list of strings, or null. */
static atmoe_status names_or_regex(const atmoe_adapter *ad, const config *cf,
                                   const json_t *root, const char *key,
                                   const json_t **out)
{
    const json_t *v = json_object_get(root, key);
    *out = NULL;
    if (v == NULL || json_is_null(v))
        return ATMOE_STATUS_OK;
    if (json_is_array(v)) {
        size_t i;
        const json_t *e;
        json_array_foreach(v, i, e)
            if (!json_is_string(e))
                return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                                "%s: \"%s\"[%zu] must be a string, not %s",
                                cf->path, key, i, atm_json_kind(e));
    } else if (!json_is_string(v)) {
        return bad_type(ad, cf, key, "a string, a list of strings or null",
                        v);
    }
    *out = v;
    return ATMOE_STATUS_OK;
}

static atmoe_status read_config(atmoe_adapter *ad, config *cf,
                                const json_t *root)
{
    if (!json_is_object(root))
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: the top level must be an object, not %s",
                        cf->path, atm_json_kind(root));
    const json_t *v = json_object_get(root, "peft_type");
    if (v == NULL || !json_is_string(v))
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: \"peft_type\" must be a string (\"LORA\")%s%s",
                        cf->path, v ? ", not " : " and is missing",
                        v ? atm_json_kind(v) : "");
    if (strcmp(json_string_value(v), "LORA") != 0)
        return atm_fail(ad->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                        "%s: peft_type is \"%s\": the library reads LoRA "
                        "adapters (\"LORA\") only", cf->path,
                        json_string_value(v));
    atmoe_status st = refuse_features(ad, cf, root);
    if (st != ATMOE_STATUS_OK)
        return st;

    /* PEFT's LoraConfig defaults: r 8, lora_alpha 8. */
    ad->r = 8;
    ad->alpha = 8.0f;
    if ((v = json_object_get(root, "r")) != NULL) {
        if (!json_is_integer(v) || json_integer_value(v) < 1 ||
            json_integer_value(v) > INT32_MAX)
            return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                            "%s: \"r\" must be a positive integer, not %s",
                            cf->path, atm_json_kind(v));
        ad->r = (size_t)json_integer_value(v);
    }
    if ((v = json_object_get(root, "lora_alpha")) != NULL) {
        if (!json_is_number(v) || !isfinite((float)json_number_value(v)))
            return bad_type(ad, cf, "lora_alpha", "a finite number", v);
        ad->alpha = (float)json_number_value(v);
    }
    static const char *const flags[] = {"use_rslora", "fan_in_fan_out"};
    int *dst[] = {&ad->use_rslora, &ad->fan_in_fan_out};
    for (int i = 0; i < 2; i++)
        if ((v = json_object_get(root, flags[i])) != NULL) {
            if (!json_is_boolean(v) && !json_is_null(v))
                return bad_type(ad, cf, flags[i], "true or false", v);
            *dst[i] = json_is_true(v);
        }
    static const char *const strings[] = {"base_model_name_or_path",
                                          "task_type"};
    char **sdst[] = {&ad->base_model, &ad->task_type};
    for (int i = 0; i < 2; i++)
        if ((v = json_object_get(root, strings[i])) != NULL &&
            !json_is_null(v)) {
            if (!json_is_string(v))
                return bad_type(ad, cf, strings[i], "a string or null", v);
            if ((*sdst[i] = dup_str(json_string_value(v))) == NULL)
                return oom(ad->ctx, "atmoe_adapter_open");
        }

    if ((st = names_or_regex(ad, cf, root, "target_modules",
                             &cf->target_modules)) ||
        (st = names_or_regex(ad, cf, root, "exclude_modules",
                             &cf->exclude_modules)))
        return st;
    const json_t *lp;
    if ((st = names_or_regex(ad, cf, root, "layers_pattern", &lp)))
        return st;
    if (lp) {
        size_t n = json_is_array(lp) ? json_array_size(lp) : 1;
        size_t wn = strlen(cf->path) + 32;
        if ((ad->what_layers = atm_malloc(wn)) == NULL)
            return oom(ad->ctx, "atmoe_adapter_open");
        snprintf(ad->what_layers, wn, "%s: layers_pattern", cf->path);
        if ((ad->layers_pattern = atm_calloc(n + 1, sizeof *ad->layers_pattern)) ==
            NULL)
            return oom(ad->ctx, "atmoe_adapter_open");
        for (size_t i = 0; i < n; i++) {
            const json_t *e = json_is_array(lp) ? json_array_get(lp, i) : lp;
            if ((ad->layers_pattern[i] = dup_str(json_string_value(e))) ==
                NULL)
                return oom(ad->ctx, "atmoe_adapter_open");
        }
    }
    v = json_object_get(root, "layers_to_transform");
    if (v && !json_is_null(v)) {
        int ok = json_is_integer(v) || json_is_array(v);
        size_t i;
        const json_t *e;
        if (json_is_array(v))
            json_array_foreach(v, i, e) ok &= json_is_integer(e);
        if (!ok)
            return bad_type(ad, cf, "layers_to_transform",
                            "an integer, a list of integers or null", v);
        cf->layers_to_transform = v;
    }
    static const char *const pats[] = {"rank_pattern", "alpha_pattern"};
    const json_t **pdst[] = {&cf->rank_pattern, &cf->alpha_pattern};
    for (int i = 0; i < 2; i++) {
        v = json_object_get(root, pats[i]);
        if (v == NULL || json_is_null(v))
            continue;
        if (!json_is_object(v))
            return bad_type(ad, cf, pats[i], "an object", v);
        const char *k;
        const json_t *e;
        json_object_foreach((json_t *)v, k, e) {
            int ok = i == 0 ? json_is_integer(e) && json_integer_value(e) >= 1 &&
                                  json_integer_value(e) <= INT32_MAX
                            : json_is_number(e) &&
                                  isfinite((float)json_number_value(e));
            if (!ok)
                return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                                "%s: \"%s\".\"%s\" must be %s, not %s",
                                cf->path, pats[i], k,
                                i == 0 ? "a positive integer"
                                       : "a finite number",
                                atm_json_kind(e));
        }
        *pdst[i] = v;
    }
    return ATMOE_STATUS_OK;
}

/* A name list selects a module it names whole or ends with ("q_proj" selects
 * "model.layers.0.self_attn.q_proj"); a string is a regular expression
 * that must match the whole path. */
static atmoe_status names_match(const atmoe_adapter *ad, const config *cf,
                                const char *key, const json_t *names,
                                const char *module, int *hit)
{
    *hit = 0;
    if (json_is_string(names)) {
        char what[4200];
        snprintf(what, sizeof what, "%s: %s", cf->path, key);
        return atm_pattern_match(ad->ctx, what, "^(%s)$",
                                 json_string_value(names), module, hit);
    }
    size_t i, n = strlen(module);
    const json_t *e;
    json_array_foreach(names, i, e) {
        const char *t = json_string_value(e);
        size_t k = strlen(t);
        if (strcmp(module, t) == 0 ||
            (n > k && module[n - k - 1] == '.' && strcmp(module + n - k, t) == 0))
            *hit = 1;
    }
    return ATMOE_STATUS_OK;
}

/* Whether PEFT, given this config, would have put a LoRA on module. */
static atmoe_status check_selected(const atmoe_adapter *ad, const config *cf,
                                   const atm_target *t)
{
    int hit = 1;
    atmoe_status st = ATMOE_STATUS_OK;
    const json_t *tm = cf->target_modules;
    if (tm && !(json_is_string(tm) &&
                strcmp(json_string_value(tm), "all-linear") == 0))
        st = names_match(ad, cf, "target_modules", tm, t->module, &hit);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (!hit)
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: the weights hold a LoRA for %s, which "
                        "target_modules does not select: PEFT would not "
                        "load it", cf->path, t->module);
    if (cf->exclude_modules &&
        (st = names_match(ad, cf, "exclude_modules", cf->exclude_modules,
                          t->module, &hit)) == ATMOE_STATUS_OK &&
        hit)
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: the weights hold a LoRA for %s, which "
                        "exclude_modules leaves out: PEFT would not load it",
                        cf->path, t->module);
    if (st != ATMOE_STATUS_OK)
        return st;
    /* PEFT applies layers_to_transform to name lists, not to a regex. */
    const json_t *lt = cf->layers_to_transform;
    if (lt == NULL || (tm && json_is_string(tm)))
        return ATMOE_STATUS_OK;
    hit = 0;
    size_t i;
    const json_t *e;
    if (json_is_integer(lt))
        hit = json_integer_value(lt) == t->layer;
    else
        json_array_foreach(lt, i, e) hit |= json_integer_value(e) == t->layer;
    if (t->layer < 0)
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: the weights hold a LoRA for %s, whose path has "
                        "no layer index for layers_to_transform: PEFT would "
                        "not load it", cf->path, t->module);
    if (!hit)
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: the weights hold a LoRA for %s, in layer %d, "
                        "which layers_to_transform leaves out: PEFT would "
                        "not load it", cf->path, t->module, t->layer);
    return ATMOE_STATUS_OK;
}

/* The value of the first pattern key that matches module, PEFT's
 * get_pattern_key(); NULL when none does. */
static atmoe_status pattern_value(const atmoe_adapter *ad, const config *cf,
                                  const char *key, const json_t *pats,
                                  const char *module, const json_t **value)
{
    *value = NULL;
    if (pats == NULL)
        return ATMOE_STATUS_OK;
    char what[4200];
    snprintf(what, sizeof what, "%s: %s", cf->path, key);
    const char *k;
    const json_t *e;
    json_object_foreach((json_t *)pats, k, e) {
        int hit;
        atmoe_status st = atm_pattern_match(ad->ctx, what, "^(.*\\.)?(%s)$",
                                            k, module, &hit);
        if (st != ATMOE_STATUS_OK)
            return st;
        if (hit) {
            *value = e;
            return ATMOE_STATUS_OK;
        }
    }
    return ATMOE_STATUS_OK;
}

static atmoe_status grow(atmoe_adapter *ad, const char *fn)
{
    if (ad->count < ad->capacity)
        return ATMOE_STATUS_OK;
    size_t cap = ad->capacity ? 2 * ad->capacity : 16;
    atm_target *p = atm_realloc(ad->targets, cap * sizeof *p);
    if (p == NULL)
        return oom(ad->ctx, fn);
    ad->targets = p;
    ad->capacity = cap;
    return ATMOE_STATUS_OK;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static int is_float_dtype(atmoe_safetensors_dtype d)
{
    return d == ATMOE_SAFETENSORS_F32 || d == ATMOE_SAFETENSORS_F16 || d == ATMOE_SAFETENSORS_BF16 ||
           d == ATMOE_SAFETENSORS_F64;
}

/* Sorts a tensor of the weights file into its target (made on first
 * sight), or refuses it. */
static atmoe_status take_tensor(atmoe_adapter *ad, const char *wpath,
                                const atmoe_safetensors_tensor *t)
{
    const char *fn = "atmoe_adapter_open";
    static const struct {
        const char *part, *why;
    } refused[] = {
        {".lora_embedding_A", "a LoRA on an embedding (lora_embedding_A/B) "
                              "looks rows up instead of multiplying"},
        {".lora_embedding_B", "a LoRA on an embedding (lora_embedding_A/B) "
                              "looks rows up instead of multiplying"},
        {".lora_magnitude_vector", "DoRA's magnitude vector rescales the "
                                   "adapted weight"},
        {".lora_A.bias", "lora_B carries a trained bias"},
        {".lora_B.bias", "lora_B carries a trained bias"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++)
        if (strstr(t->name, refused[i].part))
            return atm_fail(ad->ctx, ATMOE_STATUS_NOT_SUPPORTED,
                            "%s: tensor %s: %s, which the library does not "
                            "compute", wpath, t->name, refused[i].why);
    int is_b = ends_with(t->name, ".lora_B.weight");
    if (!is_b && !ends_with(t->name, ".lora_A.weight"))
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: tensor %s is not a LoRA weight (a name ending "
                        "in .lora_A.weight or .lora_B.weight)", wpath,
                        t->name);
    if (t->ndim != 2)
        return atm_fail(ad->ctx,
                        t->ndim > 2 ? ATMOE_STATUS_NOT_SUPPORTED
                                    : ATMOE_STATUS_FORMAT_ERROR,
                        "%s: tensor %s has %d dimension(s)%s", wpath, t->name,
                        t->ndim,
                        t->ndim > 2 ? ": a LoRA on a convolution, which the "
                                      "library does not compute"
                                    : ", not 2");
    if (!is_float_dtype(t->dtype))
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: tensor %s is %s, not a floating-point type "
                        "(F32, F16, BF16, F64)", wpath, t->name,
                        atmoe_safetensors_dtype_name(t->dtype));
    if (t->shape[0] == 0 || t->shape[1] == 0 || t->shape[0] > UINT32_MAX ||
        t->shape[1] > UINT32_MAX)
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: tensor %s has shape [%llu, %llu]", wpath,
                        t->name, (unsigned long long)t->shape[0],
                        (unsigned long long)t->shape[1]);
    const char *start = t->name;
    if (strncmp(start, KEY_PREFIX, strlen(KEY_PREFIX)) == 0)
        start += strlen(KEY_PREFIX);
    /* The suffix was checked on the whole name, so the part left once
     * the prefix is gone may be shorter than it. */
    size_t suffix = strlen(".lora_A.weight");
    size_t len = strlen(start) > suffix ? strlen(start) - suffix : 0;
    if (len == 0)
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: tensor %s names no module", wpath, t->name);
    atm_target *tg = NULL;
    for (size_t i = 0; i < ad->count && tg == NULL; i++)
        if (strncmp(ad->targets[i].module, start, len) == 0 &&
            ad->targets[i].module[len] == '\0')
            tg = &ad->targets[i];
    if (tg == NULL) {
        atmoe_status st = grow(ad, fn);
        if (st != ATMOE_STATUS_OK)
            return st;
        tg = &ad->targets[ad->count];
        memset(tg, 0, sizeof *tg);
        if ((tg->module = atm_malloc(len + 1)) == NULL)
            return oom(ad->ctx, fn);
        memcpy(tg->module, start, len);
        tg->module[len] = '\0';
        ad->count++;
    }
    if ((is_b ? tg->b_name : tg->a_name) != NULL)
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: tensors %s and %s are both lora_%c of module %s",
                        wpath, is_b ? tg->b_name : tg->a_name, t->name,
                        is_b ? 'B' : 'A', tg->module);
    /* A [r, in], B [out, r]. */
    if (is_b) {
        tg->b_name = t->name;
        tg->d_out = t->shape[0];
    } else {
        tg->a_name = t->name;
        tg->d_in = t->shape[1];
        tg->rank = t->shape[0];
    }
    return ATMOE_STATUS_OK;
}

static int cmp_targets(const void *a, const void *b)
{
    return natural_cmp(((const atm_target *)a)->module,
                       ((const atm_target *)b)->module);
}

/* Pairs, shapes, selection, rank and alpha of every target. */
static atmoe_status finish_target(atmoe_adapter *ad, const config *cf,
                                  const char *wpath, atm_target *t)
{
    if (t->a_name == NULL || t->b_name == NULL)
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: module %s has %s but no %s", wpath, t->module,
                        t->a_name ? "lora_A" : "lora_B",
                        t->a_name ? "lora_B" : "lora_A");
    atmoe_safetensors_tensor b;
    atmoe_status st = atmoe_safetensors_find(ad->file, t->b_name, &b);
    if (st != ATMOE_STATUS_OK)
        return st;
    if (b.shape[1] != t->rank)
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: module %s: lora_A is [%zu, %zu] and lora_B "
                        "[%llu, %llu]: their ranks differ", wpath, t->module,
                        t->rank, t->d_in, (unsigned long long)b.shape[0],
                        (unsigned long long)b.shape[1]);
    if ((st = layer_of(ad, t->module, &t->layer, &t->name_offset)) ||
        (st = check_selected(ad, cf, t)))
        return st;
    const json_t *rv, *av;
    if ((st = pattern_value(ad, cf, "rank_pattern", cf->rank_pattern,
                            t->module, &rv)) ||
        (st = pattern_value(ad, cf, "alpha_pattern", cf->alpha_pattern,
                            t->module, &av)))
        return st;
    size_t rank = rv ? (size_t)json_integer_value(rv) : ad->r;
    if (rank != t->rank)
        return atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: module %s has rank %zu in the weights, but the "
                        "config says %zu (%s)", cf->path, t->module, t->rank,
                        rank, rv ? "rank_pattern" : "r");
    t->alpha = av ? (float)json_number_value(av) : ad->alpha;
    t->flags = ad->use_rslora ? ATMOE_EXPERT_RSLORA : 0;
    t->scale = lora_scale(t->rank, t->alpha, t->flags);
    return ATMOE_STATUS_OK;
}

static atmoe_status open_into(atmoe_adapter *ad, const char *dir)
{
    const char *fn = "atmoe_adapter_open";
    char *cpath = join_path(dir, CONFIG_NAME);
    char *wpath = join_path(dir, WEIGHTS_NAME);
    json_t *root = NULL;
    atmoe_status st = ATMOE_STATUS_OK;
    if (cpath == NULL || wpath == NULL || (ad->dir = dup_str(dir)) == NULL) {
        st = oom(ad->ctx, fn);
        goto out;
    }
    config cf = {.path = cpath};
    FILE *f = atm_file_open_regular(cpath);
    if (f == NULL) {
        st = atm_fail(ad->ctx,
                      errno == ENOENT ? ATMOE_STATUS_NOT_FOUND
                                      : ATMOE_STATUS_IO_ERROR,
                      "%s: cannot read %s: %s%s", fn, cpath,
                      atm_file_strerror(errno),
                      errno == ENOENT ? " (is this a PEFT adapter directory?)"
                                      : "");
        goto out;
    }
    json_error_t jerr;
    root = json_loadf(f, JSON_REJECT_DUPLICATES, &jerr);
    fclose(f);
    if (root == NULL) {
        st = atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                      "%s:%d:%d: %s", cpath, jerr.line, jerr.column,
                      jerr.text);
        goto out;
    }
    if ((st = read_config(ad, &cf, root)) != ATMOE_STATUS_OK)
        goto out;
    if ((st = atmoe_safetensors_open(ad->ctx, wpath, &ad->file)) !=
        ATMOE_STATUS_OK)
        goto out;
    size_t n;
    if ((st = atmoe_safetensors_get_count(ad->file, &n)) != ATMOE_STATUS_OK)
        goto out;
    for (size_t i = 0; i < n && st == ATMOE_STATUS_OK; i++) {
        atmoe_safetensors_tensor t;
        if ((st = atmoe_safetensors_get(ad->file, i, &t)) == ATMOE_STATUS_OK)
            st = take_tensor(ad, wpath, &t);
    }
    if (st == ATMOE_STATUS_OK && ad->count == 0)
        st = atm_fail(ad->ctx, ATMOE_STATUS_FORMAT_ERROR,
                      "%s: holds no LoRA weight", wpath);
    if (st != ATMOE_STATUS_OK)
        goto out;
    qsort(ad->targets, ad->count, sizeof *ad->targets, cmp_targets);
    for (size_t i = 0; i < ad->count && st == ATMOE_STATUS_OK; i++)
        st = finish_target(ad, &cf, wpath, &ad->targets[i]);
    ad->from_file = 1;
out:
    json_decref(root);
    atm_free(cpath);
    atm_free(wpath);
    return st;
}

ATMOE_API atmoe_status atmoe_adapter_open(atmoe_context *ctx,
                                          const char *dir,
                                          atmoe_adapter **adapter)
{
    if (adapter)
        *adapter = NULL;
    ATM_CHECK_NULL(ctx, dir);
    ATM_CHECK_NULL(ctx, adapter);
    atmoe_adapter *ad = atm_calloc(1, sizeof *ad);
    if (ad == NULL)
        return oom(ctx, __func__);
    ad->ctx = ctx;
    atmoe_status st = open_into(ad, dir);
    if (st != ATMOE_STATUS_OK) {
        atmoe_adapter_free(ad);
        return st;
    }
    *adapter = ad;
    return ATMOE_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* Queries                                                                   */
/* ------------------------------------------------------------------------ */

ATMOE_API atmoe_status atmoe_adapter_get_info(const atmoe_adapter *adapter,
                                              atmoe_adapter_info *info)
{
    ATM_CHECK_NULL(NULL, adapter);
    ATM_CHECK_NULL(adapter->ctx, info);
    info->targets = adapter->count;
    info->r = adapter->r;
    info->alpha = adapter->alpha;
    info->use_rslora = adapter->use_rslora;
    if (!adapter->from_file) {
        const atm_target *t = adapter->count ? &adapter->targets[0] : NULL;
        info->r = t ? t->rank : 0;
        info->alpha = t ? t->alpha : 0.0f;
        info->use_rslora = t ? (t->flags & ATMOE_EXPERT_RSLORA) != 0 : 0;
    }
    info->fan_in_fan_out = adapter->fan_in_fan_out;
    info->base_model = adapter->base_model ? adapter->base_model : "";
    info->dir = adapter->dir;
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_adapter_get_target(const atmoe_adapter *adapter,
                                                size_t index,
                                                atmoe_adapter_target *target)
{
    ATM_CHECK_NULL(NULL, adapter);
    ATM_CHECK_NULL(adapter->ctx, target);
    if (index >= adapter->count)
        return atm_fail(adapter->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: index %zu; the adapter has %zu target(s)",
                        __func__, index, adapter->count);
    const atm_target *t = &adapter->targets[index];
    *target = (atmoe_adapter_target){t->module, t->module + t->name_offset,
                                     t->layer,  t->rank,
                                     t->d_in,   t->d_out,
                                     t->alpha,  t->flags,
                                     t->scale};
    return ATMOE_STATUS_OK;
}

ATMOE_API atmoe_status atmoe_adapter_find(const atmoe_adapter *adapter, int layer,
                                          const char *module, size_t *index)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, adapter);
    ATM_CHECK_NULL(adapter->ctx, module);
    ATM_CHECK_NULL(adapter->ctx, index);
    size_t k = strlen(module), found = adapter->count;
    for (size_t i = 0; i < adapter->count; i++) {
        const atm_target *t = &adapter->targets[i];
        size_t n = strlen(t->module);
        if (t->layer != layer ||
            !(strcmp(t->module, module) == 0 ||
              (n > k && t->module[n - k - 1] == '.' &&
               strcmp(t->module + n - k, module) == 0)))
            continue;
        if (found < adapter->count)
            return atm_fail(adapter->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                            "%s: \"%s\" in layer %d is ambiguous: %s and %s "
                            "both match; give more of the path", fn, module,
                            layer, adapter->targets[found].module, t->module);
        found = i;
    }
    if (found == adapter->count)
        return atm_fail(adapter->ctx, ATMOE_STATUS_NOT_FOUND,
                        "%s: the adapter%s%s has no target \"%s\" in %s %d",
                        fn, *adapter->dir ? " in " : "", adapter->dir, module,
                        layer < 0 ? "(no layer)" : "layer", layer);
    *index = found;
    return ATMOE_STATUS_OK;
}

/* Reads target t's weights into a and b (either may be NULL), reporting to
 * the adapter's context. */
static atmoe_status read_target(const atmoe_adapter *ad, const atm_target *t,
                                float *a, float *b)
{
    size_t na = t->rank * t->d_in, nb = t->d_out * t->rank;
    atmoe_status st = ATMOE_STATUS_OK;
    if (a && t->a)
        memcpy(a, t->a, na * sizeof *a);
    else if (a)
        st = atmoe_safetensors_read_f32(ad->file, t->a_name, a, na);
    if (st == ATMOE_STATUS_OK && b && t->b)
        memcpy(b, t->b, nb * sizeof *b);
    else if (st == ATMOE_STATUS_OK && b)
        st = atmoe_safetensors_read_f32(ad->file, t->b_name, b, nb);
    return st;
}

atmoe_status atm_adapter_stored_dtypes(const atmoe_adapter *ad, size_t index,
                                       atmoe_safetensors_dtype *a,
                                       atmoe_safetensors_dtype *b)
{
    const atm_target *t = &ad->targets[index];
    atmoe_safetensors_tensor st;
    atmoe_status s = ATMOE_STATUS_OK;
    *a = *b = ATMOE_SAFETENSORS_F32;
    if (t->a == NULL &&
        (s = atmoe_safetensors_find(ad->file, t->a_name, &st)) ==
            ATMOE_STATUS_OK)
        *a = st.dtype;
    if (s == ATMOE_STATUS_OK && t->b == NULL &&
        (s = atmoe_safetensors_find(ad->file, t->b_name, &st)) ==
            ATMOE_STATUS_OK)
        *b = st.dtype;
    return s;
}

ATMOE_API atmoe_status atmoe_adapter_read(const atmoe_adapter *adapter,
                                          size_t index, float *a,
                                          size_t a_count, float *b,
                                          size_t b_count)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, adapter);
    if (index >= adapter->count)
        return atm_fail(adapter->ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: index %zu; the adapter has %zu target(s)", fn,
                        index, adapter->count);
    const atm_target *t = &adapter->targets[index];
    size_t na = t->rank * t->d_in, nb = t->d_out * t->rank;
    if ((a && a_count != na) || (b && b_count != nb))
        return atm_fail(adapter->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s has A [%zu, %zu] and B [%zu, %zu]: %zu and "
                        "%zu elements, not %zu and %zu", fn, t->module,
                        t->rank, t->d_in, t->d_out, t->rank, na, nb, a_count,
                        b_count);
    return read_target(adapter, t, a, b);
}

/* ------------------------------------------------------------------------ */
/* Building and saving                                                       */
/* ------------------------------------------------------------------------ */

/* Module paths as PEFT's models name modules: dotted Python identifiers
 * and indexes, which also keeps them literal inside the pattern keys that
 * saving writes. */
static int valid_module(const char *m)
{
    if (*m == '\0' || *m == '.')
        return 0;
    for (const char *p = m; *p; p++) {
        if (*p == '.' && (p[1] == '.' || p[1] == '\0'))
            return 0;
        if (*p != '.' && *p != '_' && !isalnum((unsigned char)*p))
            return 0;
    }
    return 1;
}

ATMOE_API atmoe_status atmoe_adapter_set(atmoe_adapter *adapter,
                                         const char *module, size_t rank,
                                         size_t d_in, size_t d_out,
                                         const float *a, const float *b,
                                         float alpha, unsigned flags)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, adapter);
    ATM_CHECK_NULL(adapter->ctx, module);
    ATM_CHECK_NULL(adapter->ctx, a);
    ATM_CHECK_NULL(adapter->ctx, b);
    if (!valid_module(module))
        return atm_fail(adapter->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: module \"%s\" is not a module path (dotted "
                        "names of letters, digits and _)", fn, module);
    if (rank == 0 || d_in == 0 || d_out == 0 || rank > UINT32_MAX ||
        d_in > UINT32_MAX || d_out > UINT32_MAX ||
        rank > SIZE_MAX / sizeof(float) / (d_in > d_out ? d_in : d_out))
        return atm_fail(adapter->ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: rank %zu, d_in %zu and d_out %zu must be 1 to "
                        "2^32-1", fn, rank, d_in, d_out);
    if (!isfinite(alpha))
        return atm_fail(adapter->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: alpha is %g", fn, alpha);
    if (flags & ~ATMOE_EXPERT_RSLORA)
        return atm_fail(adapter->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: unknown flags 0x%x", fn, flags);
    atm_target t = {0};
    t.rank = rank;
    t.d_in = d_in;
    t.d_out = d_out;
    t.alpha = alpha;
    t.flags = flags;
    t.scale = lora_scale(rank, alpha, flags);
    t.module = dup_str(module);
    t.a = atm_malloc(rank * d_in * sizeof *t.a);
    t.b = atm_malloc(d_out * rank * sizeof *t.b);
    atmoe_status st = ATMOE_STATUS_OK;
    if (t.module == NULL || t.a == NULL || t.b == NULL)
        st = oom(adapter->ctx, fn);
    if (st == ATMOE_STATUS_OK)
        st = layer_of(adapter, module, &t.layer, &t.name_offset);
    size_t at = 0;
    while (at < adapter->count && natural_cmp(adapter->targets[at].module, module) < 0)
        at++;
    int replace = at < adapter->count && strcmp(adapter->targets[at].module, module) == 0;
    if (st == ATMOE_STATUS_OK && !replace)
        st = grow(adapter, fn);
    if (st != ATMOE_STATUS_OK) {
        atm_free(t.module);
        atm_free(t.a);
        atm_free(t.b);
        return st;
    }
    memcpy(t.a, a, rank * d_in * sizeof *t.a);
    memcpy(t.b, b, d_out * rank * sizeof *t.b);
    if (replace) {
        atm_free(adapter->targets[at].module);
        atm_free(adapter->targets[at].a);
        atm_free(adapter->targets[at].b);
    } else {
        memmove(&adapter->targets[at + 1], &adapter->targets[at],
                (adapter->count - at) * sizeof *adapter->targets);
        adapter->count++;
    }
    adapter->targets[at] = t;
    return ATMOE_STATUS_OK;
}

/* alpha as PEFT writes it: an integer when it is one. */
static json_t *json_alpha(float alpha)
{
    if (alpha == floorf(alpha) && fabsf(alpha) < 1e9f)
        return json_integer((json_int_t)alpha);
    return json_real(alpha);
}

/* The alpha that gives target t its scale under the config's scaling. */
static float alpha_for(const atm_target *t, int rslora)
{
    if (((t->flags & ATMOE_EXPERT_RSLORA) != 0) == (rslora != 0))
        return t->alpha;
    return rslora ? t->scale * sqrtf((float)t->rank)
                  : t->scale * (float)t->rank;
}

static int set_new(json_t *obj, const char *key, json_t *value)
{
    return value == NULL || json_object_set_new(obj, key, value) != 0;
}

static atmoe_status build_config(const atmoe_adapter *ad, json_t **out)
{
    size_t r = ad->r;
    float alpha = ad->alpha;
    int rslora = ad->use_rslora;
    if (!ad->from_file) {
        r = ad->targets[0].rank;
        rslora = (ad->targets[0].flags & ATMOE_EXPERT_RSLORA) != 0;
        alpha = ad->targets[0].alpha;
    }
    json_t *root = json_object(), *modules = json_array();
    json_t *ranks = json_object(), *alphas = json_object();
    int bad = root == NULL || modules == NULL || ranks == NULL ||
              alphas == NULL;
    for (size_t i = 0; i < ad->count && !bad; i++) {
        const atm_target *t = &ad->targets[i];
        float ta = alpha_for(t, rslora);
        bad |= json_array_append_new(modules, json_string(t->module)) != 0;
        if (t->rank != r)
            bad |= set_new(ranks, t->module, json_integer((json_int_t)t->rank));
        if (ta != alpha)
            bad |= set_new(alphas, t->module, json_alpha(ta));
    }
    if (!bad) {
        bad |= set_new(root, "peft_type", json_string("LORA"));
        bad |= set_new(root, "task_type", ad->task_type
                                              ? json_string(ad->task_type)
                                              : json_null());
        bad |= set_new(root, "base_model_name_or_path",
                       ad->base_model ? json_string(ad->base_model)
                                      : json_null());
        bad |= set_new(root, "revision", json_null());
        bad |= set_new(root, "inference_mode", json_true());
        bad |= set_new(root, "r", json_integer((json_int_t)r));
        bad |= set_new(root, "lora_alpha", json_alpha(alpha));
        bad |= set_new(root, "lora_dropout", json_real(0.0));
        bad |= set_new(root, "use_rslora", json_boolean(rslora));
        bad |= set_new(root, "fan_in_fan_out",
                       json_boolean(ad->fan_in_fan_out));
        bad |= set_new(root, "bias", json_string("none"));
        bad |= set_new(root, "init_lora_weights", json_true());
        bad |= set_new(root, "modules_to_save", json_null());
        bad |= set_new(root, "layers_to_transform", json_null());
        bad |= set_new(root, "layers_pattern", json_null());
        bad |= json_object_set(root, "target_modules", modules) != 0;
        bad |= json_object_set(root, "rank_pattern", ranks) != 0;
        bad |= json_object_set(root, "alpha_pattern", alphas) != 0;
    }
    json_decref(modules);
    json_decref(ranks);
    json_decref(alphas);
    if (bad) {
        json_decref(root);
        return oom(ad->ctx, "atmoe_adapter_save");
    }
    *out = root;
    return ATMOE_STATUS_OK;
}

static atmoe_status add_weights(const atmoe_adapter *ad,
                                atmoe_safetensors_writer *w,
                                atmoe_safetensors_dtype dtype)
{
    const char *fn = "atmoe_adapter_save";
    atmoe_status st = ATMOE_STATUS_OK;
    for (size_t i = 0; i < ad->count && st == ATMOE_STATUS_OK; i++) {
        const atm_target *t = &ad->targets[i];
        float *a = atm_malloc(t->rank * t->d_in * sizeof *a);
        float *b = atm_malloc(t->d_out * t->rank * sizeof *b);
        size_t n = strlen(KEY_PREFIX) + strlen(t->module) + 16;
        char *key = atm_malloc(n);
        if (a == NULL || b == NULL || key == NULL)
            st = oom(ad->ctx, fn);
        if (st == ATMOE_STATUS_OK)
            st = read_target(ad, t, a, b);
        uint64_t sa[2] = {t->rank, t->d_in}, sb[2] = {t->d_out, t->rank};
        if (st == ATMOE_STATUS_OK) {
            snprintf(key, n, KEY_PREFIX "%s.lora_A.weight", t->module);
            st = atmoe_safetensors_writer_add_f32(w, key, dtype, 2, sa, a);
        }
        if (st == ATMOE_STATUS_OK) {
            snprintf(key, n, KEY_PREFIX "%s.lora_B.weight", t->module);
            st = atmoe_safetensors_writer_add_f32(w, key, dtype, 2, sb, b);
        }
        atm_free(a);
        atm_free(b);
        atm_free(key);
    }
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_set_metadata(w, "format", "pt");
    return st;
}

ATMOE_API atmoe_status atmoe_adapter_save(const atmoe_adapter *adapter,
                                          const char *dir,
                                          atmoe_safetensors_dtype dtype)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, adapter);
    ATM_CHECK_NULL(adapter->ctx, dir);
    if (dtype != ATMOE_SAFETENSORS_F32 && dtype != ATMOE_SAFETENSORS_F16 &&
        dtype != ATMOE_SAFETENSORS_BF16)
        return atm_fail(adapter->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: weights are stored as F32, F16 or BF16, not %s",
                        fn, atmoe_safetensors_dtype_name(dtype));
    if (adapter->count == 0)
        return atm_fail(adapter->ctx, ATMOE_STATUS_INVALID_ARGUMENT,
                        "%s: the adapter has no target (atmoe_adapter_set)",
                        fn);
    /* A directory this call makes is removed again when the save fails
     * (rmdir removes only an empty one). */
    int made = mkdir(dir, 0777) == 0;
    if (!made && errno != EEXIST)
        return atm_fail(adapter->ctx, ATMOE_STATUS_IO_ERROR,
                        "%s: cannot create %s: %s", fn, dir, strerror(errno));
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return atm_fail(adapter->ctx, ATMOE_STATUS_IO_ERROR,
                        "%s: %s is not a directory", fn, dir);
    char *cpath = join_path(dir, CONFIG_NAME);
    char *wpath = join_path(dir, WEIGHTS_NAME);
    size_t tmp_size = cpath ? strlen(cpath) + ATM_FILE_TMP_EXTRA : 0;
    char *tmp = atm_malloc(tmp_size ? tmp_size : 1);
    json_t *root = NULL;
    atmoe_safetensors_writer *w = NULL;
    FILE *f = NULL;
    atmoe_status st = ATMOE_STATUS_OK;
    if (cpath == NULL || wpath == NULL || tmp == NULL)
        st = oom(adapter->ctx, fn);
    if (st == ATMOE_STATUS_OK)
        st = build_config(adapter, &root);
    if (st == ATMOE_STATUS_OK)
        st = atmoe_safetensors_writer_new(adapter->ctx, &w);
    if (st == ATMOE_STATUS_OK)
        st = add_weights(adapter, w, dtype);
    /* The config is written first and renamed into place last, so that a
     * failure anywhere leaves the directory as it was, or with new weights
     * under the old config at worst if that last rename fails. */
    if (st == ATMOE_STATUS_OK && (f = atm_file_begin(cpath, tmp, tmp_size)) ==
                                     NULL)
        st = atm_fail(adapter->ctx, ATMOE_STATUS_IO_ERROR,
                      "%s: cannot write %s: %s", fn, cpath, strerror(errno));
    if (st == ATMOE_STATUS_OK) {
        int ok = json_dumpf(root, f, JSON_INDENT(2) | JSON_SORT_KEYS |
                                         JSON_REAL_PRECISION(9)) == 0 &&
                 fputc('\n', f) != EOF;
        if (ok)
            st = atmoe_safetensors_writer_save(w, wpath);
        if (st == ATMOE_STATUS_OK && !ok)
            st = atm_fail(adapter->ctx, ATMOE_STATUS_IO_ERROR,
                          "%s: cannot write %s: %s", fn, cpath,
                          strerror(errno ? errno : EIO));
        if (atm_file_commit(f, tmp, cpath, st == ATMOE_STATUS_OK) != 0 &&
            st == ATMOE_STATUS_OK)
            st = atm_fail(adapter->ctx, ATMOE_STATUS_IO_ERROR,
                          "%s: cannot write %s: %s", fn, cpath,
                          strerror(errno));
    }
    atmoe_safetensors_writer_free(w);
    json_decref(root);
    atm_free(cpath);
    atm_free(wpath);
    atm_free(tmp);
    if (st != ATMOE_STATUS_OK && made)
        rmdir(dir);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Experts from adapters                                                     */
/* ------------------------------------------------------------------------ */

ATMOE_API atmoe_status atmoe_experts_add_adapter(atmoe_experts *set,
                                                 int group,
                                                 const atmoe_adapter *adapter,
                                                 size_t index, int *expert)
{
    const char *fn = __func__;
    ATM_CHECK_NULL(NULL, set);
    atmoe_context *ctx = set->ctx;
    ATM_CHECK_NULL(ctx, adapter);
    if (index >= adapter->count)
        return atm_fail(ctx, ATMOE_STATUS_OUT_OF_RANGE,
                        "%s: index %zu; the adapter has %zu target(s)", fn,
                        index, adapter->count);
    const atm_target *t = &adapter->targets[index];
    if (t->d_in != set->d_in || t->d_out != set->d_out)
        return atm_fail(ctx, ATMOE_STATUS_SHAPE_MISMATCH,
                        "%s: %s maps %zu -> %zu features; the set, %zu -> "
                        "%zu", fn, t->module, t->d_in, t->d_out, set->d_in,
                        set->d_out);
    float *a = atm_malloc(t->rank * t->d_in * sizeof *a);
    float *b = atm_malloc(t->d_out * t->rank * sizeof *b);
    atmoe_status st = ATMOE_STATUS_OK;
    if (a == NULL || b == NULL)
        st = oom(ctx, fn);
    if (st == ATMOE_STATUS_OK && (st = read_target(adapter, t, a, b)) &&
        adapter->ctx != ctx)
        st = atm_fail(ctx, st, "%s", atmoe_errmsg(adapter->ctx));
    if (st == ATMOE_STATUS_OK)
        st = atmoe_experts_add(set, group, t->rank, a, b, t->alpha, t->flags,
                               expert);
    atm_free(a);
    atm_free(b);
    return st;
}
