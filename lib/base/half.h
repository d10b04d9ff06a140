/* 16-bit floating-point formats on the host: IEEE 754 binary16 (f16) and
 * bfloat16 (bf16), as bit patterns.  Narrowing rounds to nearest, ties to
 * even; widening is exact.  Infinities keep their sign, NaNs stay NaN
 * (quiet, with the sign and the top payload bits kept), and f16
 * subnormals are produced and read. */
#ifndef ATMOE_HALF_H
#define ATMOE_HALF_H

#include <stdint.h>

uint16_t atm_f32_to_f16(float x);
float atm_f16_to_f32(uint16_t h);
uint16_t atm_f32_to_bf16(float x);
float atm_bf16_to_f32(uint16_t h);

#endif
