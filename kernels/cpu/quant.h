/* quant.h: post-load quantization on the CPU (vLLM's process_weights_after_loading), the
 * reference the CUDA kernels in kernels/cuda must match bit for bit.
 *
 * Inputs are a row-major [rows, cols] tensor of f32, bf16 or f16. All arithmetic is f32:
 *   int8 weight-only, per output channel (row): amax_r = max|w[r,:]|, scale_r = amax_r/127,
 *     q = clamp(rint(w / scale_r), -127, 127) (division, round half to even); a row of
 *     zeros gets scale 0 and q = 0.
 *   fp8 e4m3 (OCP "fn": no inf, max 448), per tensor: scale = amax/448 over the whole
 *     tensor; per channel: scale_r = amax_r/448. q = e4m3(clamp(w / scale, -448, 448)),
 *     round to nearest even, subnormals kept; scale 0 gives q = 0.
 * NaN weights are left out of every amax; they quantize to int8 0 and e4m3 NaN (with the
 * weight's sign; an infinite weight under an infinite scale gives that NaN too).
 * Outputs go into caller-owned buffers allocated once, so running twice gives the same
 * bytes at the same addresses. Functions return 0, RLB_EINVAL or RLB_EDTYPE.
 */
#ifndef RLB_KERNELS_CPU_QUANT_H
#define RLB_KERNELS_CPU_QUANT_H

#include <stdint.h>

#include "kernels/cpu/quant_scalar.h"
#include "rlb/rlb.h"

/* q: [rows*cols] int8, scale: [rows] f32. */
int rlb__quant_int8_rows(const void *w, rlb_dtype dtype, int64_t rows, int64_t cols,
                         int8_t *q, float *scale);
/* q: [rows*cols] e4m3 bytes; scale: [1] (per tensor) or [rows] (per channel). */
int rlb__quant_fp8_tensor(const void *w, rlb_dtype dtype, int64_t rows, int64_t cols,
                          uint8_t *q, float *scale);
int rlb__quant_fp8_rows(const void *w, rlb_dtype dtype, int64_t rows, int64_t cols,
                        uint8_t *q, float *scale);
/* The per-element operations (rlb__f32_to_e4m3, rlb__e4m3_to_f32, ...) are in
 * quant_scalar.h, shared with the CUDA kernels. */

#endif /* RLB_KERNELS_CPU_QUANT_H */
