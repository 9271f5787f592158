/* quant.c: CPU reference of post-load quantization (int8 and fp8 e4m3); see quant.h for
 * the exact formulas and quant_scalar.h for the per-element arithmetic. Check:
 * tests/unit/test_quant (cmocka) compares against values worked out by hand and against a
 * brute-force nearest-value search over all 256 e4m3 codes. */
#include "kernels/cpu/quant.h"

#include <stddef.h>

#include "kernels/cpu/convert.h"

static float load_f32(const void *w, rlb_dtype dtype, size_t i)
{
    switch (dtype) {
    case RLB_DTYPE_BF16: return rlb__bf16_to_f32(((const uint16_t *)w)[i]);
    case RLB_DTYPE_F16: return rlb__f16_to_f32(((const uint16_t *)w)[i]);
    default: return ((const float *)w)[i]; /* check_args admitted only the three */
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
    float m = 0.0f;
    for (size_t i = begin; i < end; i++)
        m = rlb__amax_step(m, load_f32(w, dtype, i));
    return m;
}

static void fp8_range(const void *w, rlb_dtype dtype, size_t begin, size_t end, float s,
                      uint8_t *q)
{
    for (size_t i = begin; i < end; i++)
        q[i] = rlb__quant_fp8_value(load_f32(w, dtype, i), s);
}

int rlb__quant_int8_rows(const void *w, rlb_dtype dtype, int64_t rows, int64_t cols,
                         int8_t *q, float *scale)
{
    int rc = check_args(w, dtype, rows, cols, q, scale);
    if (rc)
        return rc;
    for (int64_t r = 0; r < rows; r++) {
        size_t base = (size_t)r * (size_t)cols;
        float s = amax_range(w, dtype, base, base + (size_t)cols) / RLB_INT8_QMAX;
        scale[r] = s;
        for (size_t i = base; i < base + (size_t)cols; i++)
            q[i] = rlb__quant_int8_value(load_f32(w, dtype, i), s);
    }
    return 0;
}

int rlb__quant_fp8_tensor(const void *w, rlb_dtype dtype, int64_t rows, int64_t cols,
                          uint8_t *q, float *scale)
{
    int rc = check_args(w, dtype, rows, cols, q, scale);
    if (rc)
        return rc;
    size_t n = (size_t)rows * (size_t)cols;
    float s = amax_range(w, dtype, 0, n) / RLB_E4M3_MAX;
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
        float s = amax_range(w, dtype, base, base + (size_t)cols) / RLB_E4M3_MAX;
        scale[r] = s;
        fp8_range(w, dtype, base, base + (size_t)cols, s, q);
    }
    return 0;
}
