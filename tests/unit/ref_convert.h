/* ref_convert.h: a reference for bf16 / f16 <-> f32 conversion written from the number
 * formats themselves, independent of kernels/cpu/convert.h (which the tests check against
 * it). A small float with E exponent bits and M mantissa bits is decoded with ldexp; a
 * value is encoded by scaling it so that one unit in the last place of its binade (or of
 * the subnormal range) is 1, rounding with rint (round half to even, the default mode),
 * and scaling back, all in double, where every step is exact.
 *
 * NaN is left to the callers: they check NaN-ness, sign and quietness, not payload bits.
 */
#ifndef RLB_TESTS_REF_CONVERT_H
#define RLB_TESTS_REF_CONVERT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "rlb/rlb.h"

/* Exponent and mantissa widths of the 16-bit formats. */
#define REF_BF16_E 8
#define REF_BF16_M 7
#define REF_F16_E 5
#define REF_F16_M 10

static inline double ref_decode16(uint16_t h, int ebits, int mbits)
{
    int bias = (1 << (ebits - 1)) - 1;
    int e = (h >> mbits) & ((1 << ebits) - 1);
    int m = h & ((1 << mbits) - 1);
    double v;
    if (e == (1 << ebits) - 1)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp(m, 1 - bias - mbits);
    else
        v = ldexp(m + (1 << mbits), e - bias - mbits);
    return (h >> 15) ? -v : v;
}

/* Rounds a non-NaN double holding an f32 value to the 16-bit format, half to even. */
static inline uint16_t ref_encode16(double x, int ebits, int mbits)
{
    int bias = (1 << (ebits - 1)) - 1, emin = 1 - bias;
    uint16_t sign = signbit(x) ? 0x8000u : 0;
    uint16_t inf = (uint16_t)(sign | (((1u << ebits) - 1) << mbits));
    double a = fabs(x);
    if (isinf(a))
        return inf;
    if (a == 0)
        return sign;
    int e;
    frexp(a, &e); /* a in [2^(e-1), 2^e) */
    int q = (e - 1 > emin ? e - 1 : emin) - mbits; /* exponent of one unit in the last place */
    double v = ldexp(rint(ldexp(a, -q)), q);
    if (v >= ldexp(1.0, bias + 1))
        return inf;
    if (v < ldexp(1.0, emin)) /* subnormal (or zero): the units are the mantissa */
        return (uint16_t)(sign | (uint16_t)ldexp(v, mbits - emin));
    frexp(v, &e);
    uint32_t man = (uint32_t)ldexp(v, mbits - (e - 1)) - (1u << mbits);
    return (uint16_t)(sign | ((uint32_t)(e - 1 + bias) << mbits) | man);
}

static inline float ref_f32_of_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t ref_bits_of_f32(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* The value of an element of `dtype` (F32, BF16 or F16) stored in the low bits of `bits`. */
static inline double ref_value(uint32_t bits, rlb_dtype dtype)
{
    if (dtype == RLB_DTYPE_F32)
        return ref_f32_of_bits(bits);
    return dtype == RLB_DTYPE_BF16 ? ref_decode16((uint16_t)bits, REF_BF16_E, REF_BF16_M)
                                   : ref_decode16((uint16_t)bits, REF_F16_E, REF_F16_M);
}

/* The bits of non-NaN value x (exactly an f32) stored as `dtype`, rounded half to even. */
static inline uint32_t ref_bits(double x, rlb_dtype dtype)
{
    if (dtype == RLB_DTYPE_F32)
        return ref_bits_of_f32((float)x);
    return dtype == RLB_DTYPE_BF16 ? ref_encode16(x, REF_BF16_E, REF_BF16_M)
                                   : ref_encode16(x, REF_F16_E, REF_F16_M);
}

#endif /* RLB_TESTS_REF_CONVERT_H */
