/* cuda_check.h: what every file of kernels/cuda shares: the check macros of common/check.h for CUDA runtime and driver calls, usable
 * from C and CUDA C++. Each logs the failing call with CUDA's own error name, stores an
 * RLB_E* code in rc (RLB_ENOMEM for an allocation failure, RLB_ECUDA otherwise) and jumps
 * to the unwinding label:
 *
 *   RLB_CUDA_CHECK(call, rc, label)   runtime API call returning cudaError_t
 *   RLB_CU_CHECK(call, rc, label)     driver API call returning CUresult (logged by number:
 *                                     code that links no driver symbol runs, and skips,
 *                                     on machines without libcuda)
 *
 * rlb__cuda_enter / rlb__cuda_leave make a device current for one API call and give the
 * caller's current device back, so no function of kernels/cuda changes it behind a caller.
 *
 * rlb_cuda_peer_mode says how memory on another GPU is read (by the IPC cache, which maps
 * it, and by the plan executor, which reads it); both take their default from the
 * RLB_CUDA_PEER knob, and a caller gives both the same mode.
 */
#ifndef RLB_KERNELS_CUDA_CUDA_CHECK_H
#define RLB_KERNELS_CUDA_CUDA_CHECK_H

#include <stddef.h>

#include <cuda.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "common/check.h"
#include "common/log.h"
#include "rlb/rlb.h"

#define RLB_CUDA_CHECK(call, rc, label)                                                  \
    do {                                                                                 \
        cudaError_t rlb__cu_err = (call);                                                \
        if (rlb__cu_err != cudaSuccess) {                                                \
            RLB_LOG_ERROR(RLB_SUB_KERNEL, "%s: %s", #call, cudaGetErrorString(rlb__cu_err)); \
            (rc) = rlb__cu_err == cudaErrorMemoryAllocation ? RLB_ENOMEM : RLB_ECUDA;     \
            goto label;                                                                  \
        }                                                                                \
    } while (0)

#define RLB_CU_CHECK(call, rc, label)                                                    \
    do {                                                                                 \
        CUresult rlb__cu_res = (call);                                                   \
        if (rlb__cu_res != CUDA_SUCCESS) {                                               \
            RLB_LOG_ERROR(RLB_SUB_KERNEL, "%s: CUresult %d", #call, (int)rlb__cu_res);    \
            (rc) = rlb__cu_res == CUDA_ERROR_OUT_OF_MEMORY ? RLB_ENOMEM : RLB_ECUDA;      \
            goto label;                                                                  \
        }                                                                                \
    } while (0)

/* How a GPU reads memory that lives on another GPU. */
typedef enum rlb_cuda_peer_mode {
    RLB_CUDA_PEER_AUTO = 0,   /* peer access where the two GPUs have a peer path, staged
                               * copies (cudaMemcpyPeerAsync into local memory) otherwise */
    RLB_CUDA_PEER_STAGED = 1, /* staged copies always: where peer access is broken, and in
                               * tests of the fallback on machines that have peer access */
} rlb_cuda_peer_mode;

/* The RLB_CUDA_PEER knob ("auto" or "staged"; another value is logged and read as auto). */
rlb_cuda_peer_mode rlb__cuda_peer_mode_env(void);

/* How the LoRA merges of a GPU are written (kernels/cuda/lora_merge.h), each way one value
 * of the RLB_LORA_MERGE knob; a later way falls back to an earlier one where its
 * conditions fail (see rlb__cuda_lora_mode). */
typedef enum rlb_lora_merge_mode {
    RLB_LORA_SEPARATE = 0, /* "separate": the base copies, then the product over each block */
    RLB_LORA_FUSED_FMA = 1, /* "fused-fma": one pass, the product in f32 multiply-adds */
    RLB_LORA_FUSED_TC = 2, /* "fused": one pass, the product on tensor cores (bf16 factors) */
    RLB_LORA_GEMM = 3,     /* "gemm": as fused, the large whole-row bf16 merges as cuBLASLt
                            * products */
} rlb_lora_merge_mode;

/* The RLB_LORA_MERGE knob (another value is logged and read as "fused"). */
rlb_lora_merge_mode rlb__cuda_lora_merge_env(void);

/* The driver API function `name` with CUDA 12.0's signature, looked up through the runtime
 * rather than linked, so programs load (and skip) on machines without a driver. Returns 0
 * or RLB_ECUDA. */
int rlb__cuda_driver_fn(const char *name, void **fn);

/* Formats a refusal into err[errlen] (err may be NULL) and logs it at error level. */
void rlb__cuda_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Makes `device` current and stores the previous one in *prev. Returns 0 or RLB_ECUDA. */
static inline int rlb__cuda_enter(int device, int *prev)
{
    int rc = 0;
    RLB_CUDA_CHECK(cudaGetDevice(prev), rc, out);
    if (*prev != device)
        RLB_CUDA_CHECK(cudaSetDevice(device), rc, out);
out:
    return rc;
}

static inline void rlb__cuda_leave(int prev)
{
    int cur;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev)
        cudaSetDevice(prev);
}

#ifdef __cplusplus
}
#endif
#endif /* RLB_KERNELS_CUDA_CUDA_CHECK_H */
