/* convert.cuh: device twins of kernels/cpu/convert.h (f32 <-> bf16 / f16, round to nearest
 * even, NaN kept quiet with its sign and top payload bits, f16 subnormals exact).
 *
 * The hardware conversions (__float2bfloat16_rn, cvt.rn.f16.f32) round the same way but
 * canonicalize NaN payloads, and the executors must agree bit for bit, so these repeat
 * convert.h's integer recipes step for step. Keep the two in step: test_cuda_plan_exec
 * pushes every bf16 and f16 pattern and a dense sweep of f32 patterns through the GPU
 * executor and compares with convert.h. The element types are tagged so overloads pick the
 * conversion: rlb__bf16_t and rlb__f16_t are 16-bit patterns, float is f32.
 */
#ifndef RLB_KERNELS_CUDA_CONVERT_CUH
#define RLB_KERNELS_CUDA_CONVERT_CUH

#include <stdint.h>

struct rlb__bf16_t {
    uint16_t bits; /* bf16 pattern */
};
struct rlb__f16_t {
    uint16_t bits; /* IEEE binary16 pattern */
};

__device__ __forceinline__ float rlb__d_to_f32(float f)
{
    return f;
}

__device__ __forceinline__ float rlb__d_to_f32(rlb__bf16_t h)
{
    return __uint_as_float((uint32_t)h.bits << 16);
}

__device__ __forceinline__ float rlb__d_to_f32(rlb__f16_t h)
{
    uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
    uint32_t exp = (h.bits >> 10) & 0x1fu;
    uint32_t man = h.bits & 0x3ffu;
    if (exp == 0x1f) /* inf / NaN */
        return __uint_as_float(sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0));
    if (exp == 0) {
        if (man == 0)
            return __uint_as_float(sign);
        float v = (float)man * 5.9604644775390625e-08f; /* man * 2^-24, exact */
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

__device__ __forceinline__ void rlb__d_from_f32(float f, float *out)
{
    *out = f;
}

__device__ __forceinline__ void rlb__d_from_f32(float f, rlb__bf16_t *out)
{
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) { /* NaN: keep sign, force a quiet payload */
        out->bits = (uint16_t)((u >> 16) | 0x0040u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    out->bits = (uint16_t)(u >> 16);
}

__device__ __forceinline__ void rlb__d_from_f32(float f, rlb__f16_t *out)
{
    uint32_t u = __float_as_uint(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) { /* NaN */
        out->bits = (uint16_t)(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
        return;
    }
    if (abs >= 0x477ff000u) { /* rounds to >= 65520: inf */
        out->bits = (uint16_t)(sign | 0x7c00u);
        return;
    }
    if (abs < 0x38800000u) { /* below 2^-14: subnormal or zero */
        if (abs < 0x33000000u) {
            out->bits = sign;
            return;
        }
        uint32_t e = abs >> 23;
        uint32_t m = (abs & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e;
        uint32_t half = 1u << (shift - 1);
        uint32_t rest = m & ((1u << shift) - 1u);
        uint32_t r = m >> shift;
        if (rest > half || (rest == half && (r & 1u)))
            r++;
        out->bits = (uint16_t)(sign | r);
        return;
    }
    uint32_t v = abs - 0x38000000u;
    v += 0xfffu + ((v >> 13) & 1u);
    out->bits = (uint16_t)(sign | (v >> 13));
}

/* One element from S to D through f32 (every S widens to f32 exactly). */
template <typename S, typename D>
__device__ __forceinline__ D rlb__d_convert(S s)
{
    D d;
    rlb__d_from_f32(rlb__d_to_f32(s), &d);
    return d;
}

#endif /* RLB_KERNELS_CUDA_CONVERT_CUH */
