/* quant.h: post-load quantization on the GPU (DESIGN §4, "Post-load processing"), the twin
 * of kernels/cpu/quant.h: the same formulas, the same bits (both sides run the per-element
 * arithmetic of kernels/cpu/quant_scalar.h).
 *
 * A worker quantizes many tensors after every sync (qkv, o, gate_up, down of each layer), so
 * the unit of work is a set: the list of tensors is described once (rlb__cuda_quant_create
 * uploads it, and allocates the per-tensor amax scratch), and each run is three stream
 * operations whatever the tensor count: a memset of the scratch, one amax launch over every
 * per-tensor entry, one quantize launch over every entry. Inputs, outputs and scales are
 * caller-owned device buffers given at creation and never reallocated, so the device
 * pointers a captured CUDA graph holds stay valid across versions, and running twice gives
 * the same bytes.
 *
 * Functions return 0 or a negative RLB_E* code; a refused tensor is described in `err` (may
 * be NULL), a failed CUDA call is named in the log. None leaves the current device changed.
 */
#ifndef RLB_KERNELS_CUDA_QUANT_H
#define RLB_KERNELS_CUDA_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "rlb/rlb.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum rlb_quant_kind {
    RLB_QUANT_FP8_TENSOR = 0, /* e4m3, one scale (amax/448) for the whole tensor */
    RLB_QUANT_FP8_ROWS = 1,   /* e4m3, one scale (row amax/448) per row (output channel) */
    RLB_QUANT_INT8_ROWS = 2,  /* int8 weight-only, one scale (row amax/127) per row */
} rlb_quant_kind;

/* One tensor to quantize: a row-major [rows, cols] device tensor. */
typedef struct rlb_cuda_quant_tensor {
    const void *w;       /* device: [rows * cols] input elements */
    rlb_dtype dtype;     /* F32, BF16 or F16 */
    int64_t rows;        /* output channels */
    int64_t cols;        /* elements per row */
    rlb_quant_kind kind; /* RLB_QUANT_* */
    void *q;             /* device: [rows * cols] e4m3 or int8 output bytes */
    float *scale;        /* device: [1] (FP8_TENSOR) or [rows] scales */
} rlb_cuda_quant_tensor;

typedef struct rlb_cuda_quant rlb_cuda_quant;

/* Describes `n` tensors on `device` (pointers must be device memory there or reachable from
 * it). RLB_EINVAL (NULL pointer, negative or overflowing shape, unknown kind), RLB_EDTYPE,
 * RLB_ENOMEM / RLB_ECUDA. Empty tensors are allowed and do nothing. */
int rlb__cuda_quant_create(int device, const rlb_cuda_quant_tensor *t, uint32_t n,
                           rlb_cuda_quant **out, char *err, size_t errlen);
/* Quantizes every tensor of the set on `stream` (asynchronous; the caller orders and
 * waits). Runs on the same stream must not overlap (they share the amax scratch). */
int rlb__cuda_quant_run(rlb_cuda_quant *qs, cudaStream_t stream);
void rlb__cuda_quant_free(rlb_cuda_quant *qs);
/* Bytes of device memory the set holds (descriptors and amax scratch). */
uint64_t rlb__cuda_quant_device_bytes(const rlb_cuda_quant *qs);

#ifdef __cplusplus
}
#endif
#endif /* RLB_KERNELS_CUDA_QUANT_H */
