#include <config.h>

#include <string.h>

#include "base/half.h"

static uint32_t f32_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static float f32_from_bits(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* q shifted right by s (1 <= s <= 31), rounded to nearest, ties to even. */
static uint32_t shift_round_even(uint32_t q, unsigned s)
{
    uint32_t kept = q >> s, rest = q & ((1u << s) - 1), half = 1u << (s - 1);
    if (rest > half || (rest == half && (kept & 1)))
        kept++;
    return kept;
}

uint16_t atm_f32_to_f16(float x)
{
    uint32_t u = f32_bits(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffff;
    if (a > 0x7f800000) /* NaN: quiet, so that the payload cannot vanish */
        return (uint16_t)(sign | 0x7e00 | ((a >> 13) & 0x3ff));
    /* 65520 is halfway between 65504, the largest half, and 65536: it and
     * everything above round to infinity. */
    if (a >= 0x477ff000)
        return (uint16_t)(sign | 0x7c00);
    unsigned e = a >> 23;
    if (e < 113) {
        /* Below 2^-14: a subnormal half, in units of 2^-24.  Under 2^-25
         * (e < 102) everything rounds to zero, 2^-25 itself to even. */
        if (e < 102)
            return sign;
        uint32_t m = (a & 0x7fffff) | 0x800000;
        return (uint16_t)(sign | shift_round_even(m, 126 - e));
    }
    /* A carry out of the mantissa lands in the exponent, as it should. */
    return (uint16_t)(sign | shift_round_even(a - (112u << 23), 13));
}

float atm_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {
        float v = (float)m * 0x1p-24f; /* exact: m has 10 bits */
        return sign ? -v : v;
    }
    if (e == 31)
        return f32_from_bits(sign | 0x7f800000 | (m << 13));
    return f32_from_bits(sign | ((e + 112) << 23) | (m << 13));
}

uint16_t atm_f32_to_bf16(float x)
{
    uint32_t u = f32_bits(x);
    if ((u & 0x7fffffff) > 0x7f800000)
        return (uint16_t)((u >> 16) | 0x40);
    /* Finite values past the largest bf16 by half an ulp or more carry
     * into the exponent and become infinity, as rounding requires. */
    return (uint16_t)(shift_round_even(u, 16));
}

float atm_bf16_to_f32(uint16_t h)
{
    return f32_from_bits((uint32_t)h << 16);
}
