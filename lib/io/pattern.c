#include <config.h>

#include <regex.h>
#include <stdint.h>
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

/* glibc's regcomp copies a sub-expression once for every count of a
 * counted repetition, nesting multiplies them, and it reports the result
 * only once gigabytes are spent: (((.{0,255}){0,255}){0,255}){0,255} takes
 * 20 s and 4 GB before failing.  So the pattern's length is bounded, and
 * so is the number of atoms it expands to with every {m,n} copied n
 * times; PEFT's patterns (alternations of module names, \d+) expand to
 * their own length. */
#define PATTERN_MAX_BYTES 1024
#define PATTERN_MAX_ATOMS 8192

/* The expanded size of the alternation at *p (up to ')' or the end);
 * saturates above PATTERN_MAX_ATOMS. */
static uint64_t expanded(const char **p, int depth);

static uint64_t capped(uint64_t v)
{
    return v > PATTERN_MAX_ATOMS ? PATTERN_MAX_ATOMS + 1 : v;
}

/* One atom at *p: a character, an escape, a bracket expression or a
 * group. */
static uint64_t atom(const char **p, int depth)
{
    const char *s = *p;
    uint64_t size = 1;
    if (*s == '(') {
        s++;
        size = depth > 64 ? PATTERN_MAX_ATOMS + 1 : expanded(&s, depth + 1);
        if (*s == ')')
            s++;
        size++;
    } else if (*s == '[') {
        s++;
        if (*s == '^')
            s++;
        if (*s == ']')
            s++;
        while (*s && *s != ']') {
            if (s[0] == '[' && (s[1] == ':' || s[1] == '.' || s[1] == '=')) {
                char close = s[1];
                s += 2;
                while (*s && !(s[0] == close && s[1] == ']'))
                    s++;
                if (*s)
                    s += 2;
            } else {
                s++;
            }
        }
        if (*s)
            s++;
    } else if (*s == '\\' && s[1]) {
        s += 2;
    } else {
        s++;
    }
    *p = s;
    return size;
}

/* The largest count of a bound {m}, {m,} or {m,n} at *p (past it), or 0
 * when *p holds none. */
static uint64_t bound(const char **p)
{
    const char *s = *p;
    if (*s != '{' || s[1] < '0' || s[1] > '9')
        return 0;
    uint64_t m = 0, n = 0;
    for (s++; *s >= '0' && *s <= '9'; s++)
        m = capped(m * 10 + (uint64_t)(*s - '0'));
    n = m;
    if (*s == ',') {
        s++;
        if (*s >= '0' && *s <= '9') {
            n = 0;
            for (; *s >= '0' && *s <= '9'; s++)
                n = capped(n * 10 + (uint64_t)(*s - '0'));
        } else {
            n = m + 1; /* {m,}: m copies and a loop */
        }
    }
    if (*s == '}')
        s++;
    *p = s;
    return n > m ? n : m;
}

static uint64_t expanded(const char **p, int depth)
{
    uint64_t total = 0, branch = 0;
    while (**p && **p != ')') {
        if (**p == '|') {
            (*p)++;
            total = capped(total + branch);
            branch = 0;
            continue;
        }
        uint64_t size = atom(p, depth);
        for (;;) {
            if (**p == '*' || **p == '+' || **p == '?') {
                (*p)++;
                size = capped(size + 1);
            } else if (**p == '{' && (*p)[1] >= '0' && (*p)[1] <= '9') {
                uint64_t n = bound(p);
                size = capped(size * (n ? n : 1) + 1);
            } else {
                break;
            }
        }
        branch = capped(branch + size);
    }
    return capped(total + branch);
}

/* NULL when re (as regcomp gets it) is within the bounds, else why not. */
static const char *too_large(const char *re)
{
    const char *p = re;
    uint64_t size = 0;
    while (*p) {
        size = capped(size + expanded(&p, 0));
        if (*p == ')')
            p++; /* unbalanced: regcomp says so */
    }
    return size > PATTERN_MAX_ATOMS ? "its counted repetitions ({m,n}) "
                                      "expand to more than 8192 atoms"
                                    : NULL;
}

atmoe_status atm_pattern_match(const atmoe_context *ctx, const char *what,
                               const char *form, const char *pattern,
                               const char *text, int *matched)
{
    if (strlen(pattern) > PATTERN_MAX_BYTES)
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: the pattern \"%.40s...\" is %zu bytes long, more "
                        "than the %d a module-name pattern may take", what,
                        pattern, strlen(pattern), PATTERN_MAX_BYTES);
    char *re_text = translate(form, pattern);
    if (re_text == NULL)
        return atm_fail(ctx, ATMOE_STATUS_HOST_OUT_OF_MEMORY,
                        "%s: out of host memory", what);
    const char *why_large = too_large(re_text);
    if (why_large) {
        atm_free(re_text);
        return atm_fail(ctx, ATMOE_STATUS_FORMAT_ERROR,
                        "%s: the pattern \"%s\" is refused: %s, past what "
                        "a module-name pattern needs (the automaton would "
                        "take gigabytes)", what, pattern, why_large);
    }
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
