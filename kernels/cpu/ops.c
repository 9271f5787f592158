/* ops.c: float32 transformer operations of the CPU engine (see ops.h for the formulas).
 * Matrix products go through OpenBLAS; the elementwise steps follow HF's operation order
 * and float32 rounding points, so that logits agree with PyTorch to float32 precision.
 * Check: tests/unit/test_engine_ops.c. */
#include "kernels/cpu/ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "rlb/rlb.h"

void rlb__matmul(const float *x, int64_t n, int64_t k, const float *w, int64_t m, float beta,
                 float *y)
{
    if (n <= 0 || m <= 0)
        return;
    /* One row is a matrix-vector product: sgemv streams W once, where sgemm would first
     * pack all of W into a copy (twice the memory traffic at batch 1). */
    if (n == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)m, (int)k, 1.0f, w, (int)k, x, 1, beta,
                    y, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)m, (int)k, 1.0f, x,
                    (int)k, w, (int)k, beta, y, (int)m);
}

void rlb__rmsnorm(const float *x, const float *w, int64_t n, int64_t d, float eps, float *y)
{
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        /* HF: variance = x.pow(2).mean(-1) in float32, x * rsqrt(variance + eps), then the
         * weight multiplies the normalized value. The sum of squares is accumulated in
         * double, the closest to any float32 reduction order. */
        double ss = 0.0;
        for (int64_t i = 0; i < d; i++)
            ss += (double)xr[i] * (double)xr[i];
        float var = (float)(ss / (double)d);
        float inv = 1.0f / sqrtf(var + eps);
        for (int64_t i = 0; i < d; i++)
            yr[i] = w[i] * (xr[i] * inv);
    }
}

int rlb__rope_inv_freq(const rlb_model_config *cfg, float *inv_freq)
{
    int64_t hd = cfg->head_dim, half = hd / 2;
    /* HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), every step in float32. */
    for (int64_t i = 0; i < half; i++) {
        float e = (float)(2 * i) / (float)hd;
        inv_freq[i] = 1.0f / powf((float)cfg->rope_theta, e);
    }
    if (cfg->rope_type == RLB_ROPE_DEFAULT)
        return 0;
    if (cfg->rope_type != RLB_ROPE_LLAMA3)
        return RLB_EUNSUPPORTED;
    /* HF _compute_llama3_parameters: the wavelength thresholds are Python floats compared
     * with a float32 tensor (so rounded to float32); the rest is float32 tensor math. */
    float factor = (float)cfg->rope_factor;
    float low = (float)cfg->rope_low_freq_factor;
    float old_ctx = (float)cfg->rope_orig_max_pos;
    float low_wavelen = (float)((double)cfg->rope_orig_max_pos / cfg->rope_low_freq_factor);
    float high_wavelen = (float)((double)cfg->rope_orig_max_pos / cfg->rope_high_freq_factor);
    float span = (float)(cfg->rope_high_freq_factor - cfg->rope_low_freq_factor);
    float two_pi = (float)(2.0 * M_PI);
    for (int64_t i = 0; i < half; i++) {
        float f = inv_freq[i];
        float wavelen = two_pi / f;
        float scaled = wavelen > low_wavelen ? f / factor : f;
        if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
            float smooth = (old_ctx / wavelen - low) / span;
            scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
        }
        inv_freq[i] = scaled;
    }
    return 0;
}

void rlb__rope_cos_sin(const float *inv_freq, int64_t half, int64_t pos, float *cos_out,
                       float *sin_out)
{
    /* HF: freqs = inv_freq @ position_ids in float32 (a product rounded to float32), then
     * cos / sin of it; attention_scaling is 1 for the default and llama3 types. */
    for (int64_t i = 0; i < half; i++) {
        float angle = inv_freq[i] * (float)pos;
        cos_out[i] = cosf(angle);
        sin_out[i] = sinf(angle);
    }
}

void rlb__rope_apply(float *x, int64_t n_heads, int64_t hd, const float *cos_v,
                     const float *sin_v)
{
    int64_t half = hd / 2;
    for (int64_t h = 0; h < n_heads; h++) {
        float *xh = x + h * hd;
        for (int64_t i = 0; i < half; i++) {
            /* x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1). */
            float x1 = xh[i], x2 = xh[i + half];
            xh[i] = x1 * cos_v[i] + (-x2) * sin_v[i];
            xh[i + half] = x2 * cos_v[i] + x1 * sin_v[i];
        }
    }
}

void rlb__swiglu(const float *gu, int64_t n, int64_t inter, float *out)
{
    for (int64_t r = 0; r < n; r++) {
        const float *g = gu + r * 2 * inter, *u = g + inter;
        float *o = out + r * inter;
        for (int64_t i = 0; i < inter; i++)
            o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

void rlb__softmax_inplace(float *x, int64_t len)
{
    float mx = -INFINITY;
    for (int64_t i = 0; i < len; i++)
        mx = x[i] > mx ? x[i] : mx;
    float sum = 0.0f;
    for (int64_t i = 0; i < len; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = 1.0f / sum;
    for (int64_t i = 0; i < len; i++)
        x[i] *= inv;
}

void rlb__attention_causal(const float *q, int64_t n, int64_t grp, int64_t hd, int64_t pos0,
                           const float *k, const float *v, float scale, float *scores,
                           float *out)
{
    int64_t ctx = pos0 + n, rows = n * grp;
    /* scores = (q . k^T) * scale, as HF's eager attention scales the product. */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)ctx, (int)hd, scale,
                q, (int)hd, k, (int)hd, 0.0f, scores, (int)ctx);
    for (int64_t r = 0; r < rows; r++) {
        int64_t len = pos0 + r / grp + 1; /* causal: keys up to the row's own position */
        float *s = scores + r * ctx;
        rlb__softmax_inplace(s, len);
        memset(s + len, 0, (size_t)(ctx - len) * sizeof *s);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)hd, (int)ctx, 1.0f,
                scores, (int)ctx, v, (int)hd, 0.0f, out, (int)hd);
}
