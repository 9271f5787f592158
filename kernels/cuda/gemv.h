/* gemv.h: the decode GEMV of the CUDA engine backend, for steps of 1..8 rows:
 *
 *   y[b, j] = sum_c x[b, c] * W[j, c]          b < n <= RLB_EO_GEMV_MAX_ROWS, j < m, c < k
 *
 * W [m, k] and x [n, k] in one dtype (bf16, fp16 or fp32), float32 accumulation, y [n, m]
 * float32. Optional fusions (rlb_eo_gemv_fuse):
 *   norm      x is not given in the compute dtype: it is rmsnorm(X) * nw of the float32
 *             residual stream X [n, k], i.e. y[b, j] = inv_b * sum_c W[j, c] (nw[c] X[b, c])
 *             with inv_b = 1 / sqrtf(sum_c X[b, c]^2 / k + eps), the sum of squares taken
 *             by the GEMV's own pass over X (no separate norm kernel, no H buffer);
 *   residual  R[b, j] += y[b, j] as well (the residual add of o_proj / down_proj);
 *   swiglu out  W is gate_up's [gate; up] (m even): besides y, write the activation
 *             act[b, j] = T(silu(y[b, j]) * y[b, m / 2 + j]) [n, m / 2], rounded as
 *             rlb__eo_swiglu rounds it, so down_proj's GEMV reads it in T, once per block,
 *             instead of both float32 halves with an exponential per element. Not with
 *             residual.
 *
 * Batch invariance: every output is reduced in an order that depends only on k and the
 * dtype (each thread's chunks in ascending order, a fixed warp butterfly, the warps in
 * order), never on n or on the other rows, so a row's result is bitwise the same alone or
 * among 8 (the test checks it).
 *
 * Returns 0, RLB_EINVAL (n outside 0..8: larger batches are cuBLASLt's; swiglu out with an
 * odd m or with residual), RLB_EDTYPE or
 * RLB_ECUDA. Check: tests/gpu/test_cuda_engine_ops (test_gemv: against a double-precision
 * reference on random data, 1B / 8B layer shapes and odd k; the fusions; alone vs batched
 * bitwise); speed: rlb-bench-engine --device cuda --gemv.
 */
#ifndef RLB_KERNELS_CUDA_GEMV_H
#define RLB_KERNELS_CUDA_GEMV_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "rlb/rlb.h"

#ifdef __cplusplus
extern "C" {
#endif

#define RLB_EO_GEMV_MAX_ROWS 8 /* the most x rows one GEMV serves */

typedef struct rlb_eo_gemv_fuse {
    const float *norm_x; /* not NULL: the input is rmsnorm(norm_x [n, k]) * norm_w */
    const void *norm_w;  /* [k] norm weight in the compute dtype */
    float eps;           /* rmsnorm epsilon */
    float *residual;     /* not NULL: residual [n, m] += y */
    void *swiglu_out;    /* not NULL: [n, m / 2] in the compute dtype, the activation of this
                          * gate_up product, T(silu(y[b, c]) * y[b, m / 2 + c]) rounded to
                          * the compute dtype as rlb__eo_swiglu rounds it */
} rlb_eo_gemv_fuse;

/* y[n, m] = x[n, k] . w[m, k]^T (fuse may be NULL; with fuse->norm_x, x is ignored). */
int rlb__eo_gemv(cudaStream_t stream, const void *w, rlb_dtype dt, int64_t m, int64_t k,
                 const void *x, int64_t n, const rlb_eo_gemv_fuse *fuse, float *y);

#ifdef __cplusplus
}
#endif
#endif /* RLB_KERNELS_CUDA_GEMV_H */
