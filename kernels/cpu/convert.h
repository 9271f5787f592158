/* convert.h: scalar conversions between f32, bf16 and f16, round to nearest even.
 *
 * These are the CPU reference every executor (CPU threads, CUDA kernels) must match bit for
 * bit. NaN stays NaN (quiet), infinities and signed zeros are kept, f16 subnormals are
 * produced and read exactly. Header-only so the executor's inner loops inline them.
 */
#ifndef RLB_KERNELS_CPU_CONVERT_H
#define RLB_KERNELS_CPU_CONVERT_H

#include <stdint.h>
#include <string.h>

#include "rlb/rlb.h"

static inline uint32_t rlb__f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float rlb__bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float rlb__bf16_to_f32(uint16_t h)
{
    return rlb__bits_f32((uint32_t)h << 16);
}

static inline uint16_t rlb__f32_to_bf16(float f)
{
    uint32_t u = rlb__f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep sign, force a quiet payload */
        return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

static inline float rlb__f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) /* inf / NaN */
        return rlb__bits_f32(sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0));
    if (exp == 0) {
        if (man == 0)
            return rlb__bits_f32(sign);
        /* subnormal: man * 2^-24, exact in f32 */
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return rlb__bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t rlb__f32_to_f16(float f)
{
    uint32_t u = rlb__f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) /* NaN */
        return (uint16_t)(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
    if (abs >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (abs < 0x38800000u) { /* below 2^-14: f16 subnormal or zero */
        if (abs < 0x33000000u) /* below 2^-25: rounds to zero */
            return sign;
        uint32_t e = abs >> 23;
        uint32_t m = (abs & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14..24 for the remaining range */
        uint32_t half = 1u << (shift - 1);
        uint32_t rest = m & ((1u << shift) - 1u);
        uint32_t r = m >> shift;
        if (rest > half || (rest == half && (r & 1u)))
            r++;
        return (uint16_t)(sign | r);
    }
    /* normal: rebias exponent, round mantissa 23 -> 10 bits, carry may bump the exponent */
    uint32_t v = abs - 0x38000000u;
    v += 0xfffu + ((v >> 13) & 1u);
    return (uint16_t)(sign | (v >> 13));
}

/* n elements of dtype (F32, BF16 or F16; anything else is read as F16) at s -> f32.
 * Loads use memcpy because source offsets need not be aligned. */
static inline void rlb__row_to_f32(float *out, const uint8_t *s, uint64_t n, uint8_t dtype)
{
    uint16_t h;
    switch (dtype) {
    case RLB_DTYPE_F32:
        memcpy(out, s, n * 4);
        break;
    case RLB_DTYPE_BF16:
        for (uint64_t i = 0; i < n; i++) {
            memcpy(&h, s + 2 * i, 2);
            out[i] = rlb__bf16_to_f32(h);
        }
        break;
    default: /* F16: the only other dtype the plan checks let through */
        for (uint64_t i = 0; i < n; i++) {
            memcpy(&h, s + 2 * i, 2);
            out[i] = rlb__f16_to_f32(h);
        }
        break;
    }
}

/* n f32 values -> dtype elements at d, rounding to nearest even. */
static inline void rlb__row_from_f32(uint8_t *d, const float *in, uint64_t n, uint8_t dtype)
{
    uint16_t h;
    switch (dtype) {
    case RLB_DTYPE_F32:
        memcpy(d, in, n * 4);
        break;
    case RLB_DTYPE_BF16:
        for (uint64_t i = 0; i < n; i++) {
            h = rlb__f32_to_bf16(in[i]);
            memcpy(d + 2 * i, &h, 2);
        }
        break;
    default:
        for (uint64_t i = 0; i < n; i++) {
            h = rlb__f32_to_f16(in[i]);
            memcpy(d + 2 * i, &h, 2);
        }
        break;
    }
}

/* Non-finite (NaN or infinite) values among n elements of dtype (F32, BF16 or F16) at d:
 * an all-ones exponent. The loops are branch-free so the compiler vectorizes them. */
static inline uint64_t rlb__row_nonfinite(const uint8_t *d, uint64_t n, uint8_t dtype)
{
    uint64_t bad = 0;
    if (dtype == RLB_DTYPE_F32) {
        for (uint64_t i = 0; i < n; i++) {
            uint32_t x;
            memcpy(&x, d + 4 * i, 4);
            bad += (x & 0x7f800000u) == 0x7f800000u;
        }
        return bad;
    }
    uint16_t mask = dtype == RLB_DTYPE_BF16 ? 0x7f80u : 0x7c00u; /* else F16 */
    for (uint64_t i = 0; i < n; i++) {
        uint16_t x;
        memcpy(&x, d + 2 * i, 2);
        bad += (x & mask) == mask;
    }
    return bad;
}

#endif /* RLB_KERNELS_CPU_CONVERT_H */
