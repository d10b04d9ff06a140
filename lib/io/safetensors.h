/* The safetensors parser, reachable without a file so that the fuzz
 * target (tests/fuzz) runs the very code atmoe_safetensors_open uses. */
#ifndef ATMOE_SAFETENSORS_H
#define ATMOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "atmoe.h"

/* The format's limit on the JSON header, as in the reference reader. */
#define ATM_ST_MAX_HEADER 100000000u

/* Parses and checks a whole safetensors file held at data (size bytes),
 * which must stay valid and unchanged until the result is closed; label
 * names the file in messages.  Closing the result does not release data. */
atmoe_status atm_safetensors_parse(atmoe_context *ctx, const char *label,
                                   const void *data, size_t size,
                                   atmoe_safetensors **file);

/* The dtype table, shared with the writer.  size is 0 and rank 0 for a
 * value outside atmoe_safetensors_dtype; rank orders dtypes as the reference
 * implementation lists them (by alignment). */
int atm_st_dtype_valid(atmoe_safetensors_dtype dtype);
unsigned atm_st_dtype_size(atmoe_safetensors_dtype dtype);
unsigned atm_st_dtype_rank(atmoe_safetensors_dtype dtype);

/* The element and byte counts of a shape; -1 when either overflows 64
 * bits. */
int atm_st_shape_count(int ndim, const uint64_t *shape, atmoe_safetensors_dtype dtype,
                       uint64_t *count, uint64_t *nbytes);

/* "[2, 3]", truncated to size bytes. */
const char *atm_st_shape_string(int ndim, const uint64_t *shape, char *buf,
                                size_t size);

#endif
