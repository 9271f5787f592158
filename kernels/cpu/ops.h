/* ops.h: the transformer operations of the CPU engine (worker/forward.c), in float32, each
 * computed the way HF transformers computes it so that logits match a PyTorch reference:
 *
 *   matmul      y[n, m] = x[n, k] . W[m, k]^T (+ beta * y): nn.Linear; cblas_sgemv for one
 *               row, cblas_sgemm otherwise
 *   matmul_i8   the same with W = q[m, k] * scale[m] (int8 weight-only, one scale per
 *               output row), dequantized on the fly: y = scale[r] * sum_c q[r, c] * x[c]
 *   rmsnorm     y = w * (x * rsqrt(mean(x^2) + eps))  (HF LlamaRMSNorm, float32 throughout)
 *   rope        rotate_half form: pairs (i, i + hd/2), inv_freq_i = 1 / theta^(2i/hd) in
 *               float32, angle = float(inv_freq_i * pos); llama3 frequency scaling
 *   swiglu      silu(gate) * up, silu(x) = x / (1 + exp(-x))
 *   attention   causal softmax(q k^T * hd^-1/2) v for the query heads that share one kv head
 *
 * Nothing here knows about paging or tensor parallelism: the caller gathers a sequence's
 * keys and values into contiguous rows. Check: tests/unit/test_engine_ops.c compares each
 * against a naive loop written from these formulas (double accumulation).
 */
#ifndef RLB_KERNELS_CPU_OPS_H
#define RLB_KERNELS_CPU_OPS_H

#include <stdint.h>

#include "model/config.h"

/* y[n, m] = x[n, k] . w[m, k]^T + beta * y (beta 0: y is only written). Row strides are
 * k for x and w, m for y. */
void rlb__matmul(const float *x, int64_t n, int64_t k, const float *w, int64_t m, float beta,
                 float *y);

/* Scratch floats rlb__matmul_i8 needs for n rows of x and a weight of k columns. */
int64_t rlb__matmul_i8_scratch(int64_t n, int64_t k);
/* y[n, m] = (x[n, k] . q[m, k]^T) * scale[m] + beta * y. `scratch` holds
 * rlb__matmul_i8_scratch(n, k) floats (may be NULL when that is 0). A few rows at a time
 * use a dequantizing dot product; many rows dequantize tiles of q for cblas_sgemm. */
void rlb__matmul_i8(const float *x, int64_t n, int64_t k, const int8_t *q, const float *scale,
                    int64_t m, float beta, float *y, float *scratch);

/* y[n, d] = rmsnorm(x[n, d]) * w[d]. y may equal x. */
void rlb__rmsnorm(const float *x, const float *w, int64_t n, int64_t d, float eps, float *y);

/* inv_freq[hd/2] of the config's RoPE (default or llama3 scaling), as HF computes it.
 * Returns 0 or RLB_EUNSUPPORTED for an unknown rope type. */
int rlb__rope_inv_freq(const rlb_model_config *cfg, float *inv_freq);
/* cos/sin[half] of angle inv_freq[i] * pos for one position. */
void rlb__rope_cos_sin(const float *inv_freq, int64_t half, int64_t pos, float *cos_out,
                       float *sin_out);
/* Rotates n_heads consecutive heads of hd floats in place (pairs i and i + hd/2). */
void rlb__rope_apply(float *x, int64_t n_heads, int64_t hd, const float *cos_v,
                     const float *sin_v);

/* out[n, inter] = silu(gu[:, :inter]) * gu[:, inter:], gu rows of 2*inter floats. */
void rlb__swiglu(const float *gu, int64_t n, int64_t inter, float *out);

/* Causal attention of the query heads that share one kv head. q: [n * grp, hd], row
 * r = i * grp + g is query head g of token i, at position pos0 + i; k, v: [pos0 + n, hd]
 * (keys of positions 0 .. pos0 + n - 1). Row r attends to keys 0 .. pos0 + i. Writes
 * out[n * grp, hd]. `scores` holds n * grp * (pos0 + n) floats. */
void rlb__attention_causal(const float *q, int64_t n, int64_t grp, int64_t hd, int64_t pos0,
                           const float *k, const float *v, float scale, float *scores,
                           float *out);

/* Row-wise max-subtracted softmax in place over len floats (torch.softmax's order). */
void rlb__softmax_inplace(float *x, int64_t len);

#endif /* RLB_KERNELS_CPU_OPS_H */
