/* Small helpers for the JSON files the library reads (PEFT configs,
 * manifests), all through jansson. */
#ifndef ATMOE_JSON_H
#define ATMOE_JSON_H

#include <jansson.h>

/* "an object", "a string", "an integer", "true", ...: what a message says
 * was found where something else was expected. */
const char *atm_json_kind(const json_t *value);

#endif
