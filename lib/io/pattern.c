#include <config.h>

#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "io/pattern.h"

/* The Python spellings PEFT's users write most that POSIX lacks: \d, \D
 * and non-capturing groups.  Other escapes pass through (glibc knows \w,
 * \s, \b). */
static char *translate(const char *form, const char *p)
{
    size_t n = strlen(p), cap = strlen(form) + 6 * n + 1;
    char *body = atm_malloc(6 * n + 1), *out = atm_malloc(cap);
    if (body == NULL || out == NULL) {
        atm_free(body);
        atm_free(out);
        return NULL;
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\\' && (p[i + 1] == 'd' || p[i + 1] == 'D')) {
            const char *cls = p[i + 1] == 'd' ? "[0-9]" : "[^0-9]";
            memcpy(body + k, cls, strlen(cls));
            k += strlen(cls);
            i++;
        } else if (p[i] == '\\' && p[i + 1] != '\0') {
            body[k++] = p[i++];
            body[k++] = p[i];
        } else if (p[i] == '(' && p[i + 1] == '?' && p[i + 2] == ':') {
            body[k++] = '(';
            i += 2;
        } else {
            body[k++] = p[i];
        }
    }
    body[k] = '\0';
    snprintf(out, cap, form, body);
    atm_free(body);
    return out;
}

atmoe_status atm_pattern_match(const atmoe_context *ctx, const char *what,
                               const char *form, const char *pattern,
                               const char *text, int *matched)
{
    char *re_text = translate(form, pattern);
    if (re_text == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", what);
    regex_t re;
    int rc = regcomp(&re, re_text, REG_EXTENDED | REG_NOSUB);
    atm_free(re_text);
    if (rc != 0) {
        char why[128];
        regerror(rc, &re, why, sizeof why);
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: the pattern \"%s\" is not a regular expression "
                        "the library can read (POSIX extended, with \\d and "
                        "(?:): %s", what, pattern, why);
    }
    *matched = regexec(&re, text, 0, NULL, 0) == 0;
    regfree(&re);
    return ATMOE_STATUS_OK;
}
