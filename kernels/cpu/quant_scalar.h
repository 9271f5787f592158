/* quant_scalar.h: the per-element arithmetic of post-load quantization, written once for
 * both the CPU reference (kernels/cpu/quant.c) and the CUDA kernels (kernels/cuda/quant.cu).
 *
 * Under nvcc every function here is compiled for host and device, so both sides run the
 * same f32 operations in the same order (IEEE division, rintf = round half to even) and
 * produce the same bits by construction (except the e4m3 encoding, which the fp8 kernel
 * leaves to the hardware's cvt with the same rounding); the GPU test compares them. The formulas
 * (quant.h): int8 q = clamp(rint(w / s), -127, 127); fp8 q = e4m3(clamp(w / s, -448, 448));
 * s = amax / 127 or amax / 448; a zero scale gives q = 0. NaN inputs never raise an amax
 * (v > m is false for NaN), as in a plain C loop; a NaN weight gives int8 0 and the e4m3
 * NaN code (sign | 0x7f), as does an infinite weight when the scale is infinite too; an e4m3
 * NaN code always carries the weight's sign.
 */
#ifndef RLB_KERNELS_CPU_QUANT_SCALAR_H
#define RLB_KERNELS_CPU_QUANT_SCALAR_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define RLB__HD __host__ __device__
#else
#define RLB__HD
#endif

#define RLB_INT8_QMAX 127.0f /* int8 weight-only: symmetric range [-127, 127] */
#define RLB_E4M3_MAX 448.0f  /* largest finite e4m3fn value */

/* Running max of |v|; a NaN v leaves m unchanged. */
static inline RLB__HD float rlb__amax_step(float m, float v)
{
    v = fabsf(v);
    return v > m ? v : m;
}

/* e4m3fn encode: saturates to +-448 (the format has no infinity), rounds to nearest even,
 * keeps subnormals (units of 2^-9), NaN -> sign | 0x7f. */
static inline RLB__HD uint8_t rlb__f32_to_e4m3(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u)
        return sign | 0x7fu;
    float a = fabsf(f);
    if (a >= RLB_E4M3_MAX)
        return sign | 0x7eu;
    if (a < 0.015625f) /* below 2^-6: subnormal, units of 2^-9; 8 units is the min normal */
        return sign | (uint8_t)rintf(a * 512.0f);
    /* normal: round the 23-bit mantissa to 3 bits, ties to even; a carry bumps the exponent */
    uint32_t v = abs + 0x7ffffu + ((abs >> 20) & 1u);
    uint32_t e = (v >> 23) - 127u + 7u;
    uint32_t m = (v >> 20) & 7u;
    if (e > 15u || (e == 15u && m == 7u))
        return sign | 0x7eu;
    return sign | (uint8_t)(e << 3 | m);
}

/* e4m3fn decode: 0x7f / 0xff are NaN. */
static inline RLB__HD float rlb__e4m3_to_f32(uint8_t q)
{
    uint32_t e = (q >> 3) & 15u, m = q & 7u;
    float v;
    if (e == 15u && m == 7u)
        v = NAN;
    else if (e == 0)
        v = (float)m * 0.001953125f; /* m * 2^-9 */
    else
        v = ldexpf(1.0f + (float)m / 8.0f, (int)e - 7);
    return (q & 0x80u) ? -v : v;
}

static inline RLB__HD int8_t rlb__quant_int8_value(float v, float scale)
{
    float x = scale > 0.0f ? rintf(v / scale) : 0.0f;
    /* NaN passes neither comparison; it becomes 0 so the conversion to int8 is defined */
    x = x > RLB_INT8_QMAX ? RLB_INT8_QMAX : (x < -RLB_INT8_QMAX ? -RLB_INT8_QMAX : x);
    return (int8_t)(x == x ? x : 0.0f);
}

static inline RLB__HD uint8_t rlb__quant_fp8_value(float v, float scale)
{
    float x = scale > 0.0f ? v / scale : 0.0f;
    if (x != x) { /* NaN weight, or inf / inf: a NaN made by the division has no portable
                   * sign (x86 makes it negative, CUDA positive), so take the weight's */
        uint32_t u;
        memcpy(&u, &v, 4);
        return (uint8_t)(((u >> 24) & 0x80u) | 0x7fu);
    }
    x = x > RLB_E4M3_MAX ? RLB_E4M3_MAX : (x < -RLB_E4M3_MAX ? -RLB_E4M3_MAX : x);
    return rlb__f32_to_e4m3(x);
}

#endif /* RLB_KERNELS_CPU_QUANT_SCALAR_H */
