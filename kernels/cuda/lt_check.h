/* lt_check.h: the check macros of kernels/cuda/cuda_check.h for cuBLASLt calls (kept apart
 * so that only the files which use cuBLASLt include its header). Each logs the failing call
 * with cuBLASLt's name for its status, stores RLB_ENOMEM (an allocation failure) or
 * RLB_ECUDA in rc and jumps to the unwinding label:
 *
 *   RLB_LT_CHECK(call, rc, label)      logged under the kernels' subsystem
 *   RLB_LT_CHECK_ERR(call, rc, label)  logged, and written into the caller's `err` buffer
 *                                      of `errlen` bytes (both in scope) for its caller
 */
#ifndef RLB_KERNELS_CUDA_LT_CHECK_H
#define RLB_KERNELS_CUDA_LT_CHECK_H

#include <cublasLt.h>

#include "kernels/cuda/cuda_check.h"

#define RLB_LT_CHECK_TO(call, errbuf, errbuflen, rc, label)                              \
    do {                                                                                 \
        cublasStatus_t rlb__lt_st = (call);                                              \
        if (rlb__lt_st != CUBLAS_STATUS_SUCCESS) {                                       \
            rlb__cuda_err((errbuf), (errbuflen), "%s: %s", #call,                        \
                          cublasLtGetStatusName(rlb__lt_st));                            \
            (rc) = rlb__lt_st == CUBLAS_STATUS_ALLOC_FAILED ? RLB_ENOMEM : RLB_ECUDA;     \
            goto label;                                                                  \
        }                                                                                \
    } while (0)

#define RLB_LT_CHECK(call, rc, label) RLB_LT_CHECK_TO(call, NULL, 0, rc, label)
#define RLB_LT_CHECK_ERR(call, rc, label) RLB_LT_CHECK_TO(call, err, errlen, rc, label)

#endif
