/* PEFT's module-name patterns (target_modules, rank_pattern keys,
 * layers_pattern, ...): Python regular expressions, read here as POSIX
 * extended ones. */
#ifndef ATMOE_PATTERN_H
#define ATMOE_PATTERN_H

#include "base/error.h"

/* Whether text matches form with %s replaced by the translated pattern
 * ("^(.*\\.)?(%s)$" is PEFT's rank_pattern rule); *matched receives it.
 * FORMAT_ERROR (naming what, the config key) when the pattern does not
 * compile. */
atmoe_status atm_pattern_match(const atmoe_context *ctx, const char *what,
                               const char *form, const char *pattern,
                               const char *text, int *matched);

#endif
