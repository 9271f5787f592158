/* quant.c: CPU reference of post-load quantization (int8 and fp8 e4m3); see quant.h for
 * the exact formulas. Check: tests/unit/test_quant (cmocka) compares against values worked
 * out by hand and against a brute-force nearest-value search over all 256 e4m3 codes. */
#include "kernels/cpu/quant.h"

#include <math.h>
#include <stddef.h>

#include "kernels/cpu/convert.h"

static int load_f32(const void *w, rlb_dtype dtype, size_t i, float *out)
{
    switch (dtype) {
    case RLB_DTYPE_F32: *out = ((const float *)w)[i]; return 0;
    case RLB_DTYPE_BF16: *out = rlb__bf16_to_f32(((const uint16_t *)w)[i]); return 0;
    case RLB_DTYPE_F16: *out = rlb__f16_to_f32(((const uint16_t *)w)[i]); return 0;
    default: return RLB_EDTYPE;
    }
}

static int check_args(const void *w, rlb_dtype dtype, int64_t rows, int64_t cols,
                      const void *q, const float *scale)
{
    if (!w || !q || !scale || rows < 0 || cols < 0)
        return RLB_EINVAL;
    if (dtype != RLB_DTYPE_F32 && dtype != RLB_DTYPE_BF16 && dtype != RLB_DTYPE_F16)
        return RLB_EDTYPE;
    return 0;
}

static float amax_range(const void *w, rlb_dtype dtype, size_t begin, size_t end)
{
    float m = 0.0f, v;
    for (size_t i = begin; i < end; i++) {
        load_f32(w, dtype, i, &v);
        v = fabsf(v);
        if (v > m)
            m = v;
    }
    return m;
}

int rlb__quant_int8_rows(const void *w, rlb_dtype dtype, int64_t rows, int64_t cols,
                         int8_t *q, float *scale)
{
    int rc = check_args(w, dtype, rows, cols, q, scale);
    if (rc)
        return rc;
    for (int64_t r = 0; r < rows; r++) {
        size_t base = (size_t)r * (size_t)cols;
        float s = amax_range(w, dtype, base, base + (size_t)cols) / 127.0f;
        scale[r] = s;
        for (int64_t c = 0; c < cols; c++) {
            float v;
            load_f32(w, dtype, base + (size_t)c, &v);
            float x = s > 0.0f ? rintf(v / s) : 0.0f;
            x = x > 127.0f ? 127.0f : (x < -127.0f ? -127.0f : x);
            q[base + (size_t)c] = (int8_t)x;
        }
    }
    return 0;
}

uint8_t rlb__f32_to_e4m3(float f)
{
    uint32_t u = rlb__f32_bits(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u)
        return sign | 0x7fu;
    float a = rlb__bits_f32(abs);
    if (a >= 448.0f) /* saturate (the "fn" format has no infinity) */
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

float rlb__e4m3_to_f32(uint8_t q)
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

static void fp8_range(const void *w, rlb_dtype dtype, size_t begin, size_t end, float s,
                      uint8_t *q)
{
    for (size_t i = begin; i < end; i++) {
        float v;
        load_f32(w, dtype, i, &v);
        float x = s > 0.0f ? v / s : 0.0f;
        x = x > 448.0f ? 448.0f : (x < -448.0f ? -448.0f : x);
        q[i] = rlb__f32_to_e4m3(x);
    }
}

int rlb__quant_fp8_tensor(const void *w, rlb_dtype dtype, int64_t rows, int64_t cols,
                          uint8_t *q, float *scale)
{
    int rc = check_args(w, dtype, rows, cols, q, scale);
    if (rc)
        return rc;
    size_t n = (size_t)rows * (size_t)cols;
    float s = amax_range(w, dtype, 0, n) / 448.0f;
    scale[0] = s;
    fp8_range(w, dtype, 0, n, s, q);
    return 0;
}

int rlb__quant_fp8_rows(const void *w, rlb_dtype dtype, int64_t rows, int64_t cols,
                        uint8_t *q, float *scale)
{
    int rc = check_args(w, dtype, rows, cols, q, scale);
    if (rc)
        return rc;
    for (int64_t r = 0; r < rows; r++) {
        size_t base = (size_t)r * (size_t)cols;
        float s = amax_range(w, dtype, base, base + (size_t)cols) / 448.0f;
        scale[r] = s;
        fp8_range(w, dtype, base, base + (size_t)cols, s, q);
    }
    return 0;
}
