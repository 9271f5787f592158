/* cuda_check.c: the one formatter of refusals for kernels/cuda and the peer-mode knob
 * (cuda_check.h). */
#include "kernels/cuda/cuda_check.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common/env.h"

void rlb__cuda_err(char *err, size_t errlen, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    RLB_LOG_ERROR(RLB_SUB_KERNEL, "%s", line);
    if (err && errlen)
        snprintf(err, errlen, "%s", line);
}

rlb_cuda_peer_mode rlb__cuda_peer_mode_env(void)
{
    const char *v = rlb__env_str(RLB_KNOB_CUDA_PEER);
    if (strcmp(v, "staged") == 0)
        return RLB_CUDA_PEER_STAGED;
    if (strcmp(v, "auto") != 0)
        RLB_LOG_WARN(RLB_SUB_KERNEL, "RLB_CUDA_PEER=%s: auto or staged expected; using auto", v);
    return RLB_CUDA_PEER_AUTO;
}

rlb_lora_merge_mode rlb__cuda_lora_merge_env(void)
{
    const char *v = rlb__env_str(RLB_KNOB_LORA_MERGE);
    if (strcmp(v, "separate") == 0)
        return RLB_LORA_SEPARATE;
    if (strcmp(v, "fused-fma") == 0)
        return RLB_LORA_FUSED_FMA;
    if (strcmp(v, "gemm") == 0)
        return RLB_LORA_GEMM;
    if (strcmp(v, "fused") != 0)
        RLB_LOG_WARN(RLB_SUB_KERNEL, "RLB_LORA_MERGE=%s: gemm, fused, fused-fma or separate "
                     "expected; using fused", v);
    return RLB_LORA_FUSED_TC;
}

int rlb__cuda_driver_fn(const char *name, void **fn)
{
    enum cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    cudaError_t e = cudaGetDriverEntryPointByVersion(name, fn, 12000, cudaEnableDefault, &q);
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
        RLB_LOG_ERROR(RLB_SUB_KERNEL, "driver function %s: %s (query %d)", name,
                      cudaGetErrorString(e), (int)q);
        return RLB_ECUDA;
    }
    return 0;
}
