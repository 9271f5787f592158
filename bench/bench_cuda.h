/* bench_cuda.h: what the GPU benchmarks share to stop at a failed CUDA call. */
#ifndef RLB_BENCH_CUDA_H
#define RLB_BENCH_CUDA_H

#include <stdio.h>
#include <stdlib.h>

#include <cuda_runtime_api.h>

/* Runs a CUDA runtime call; on failure prints where, the call and the error, and exits 1. */
#define CK(call)                                                                           \
    do {                                                                                   \
        cudaError_t e_ = (call);                                                           \
        if (e_ != cudaSuccess) {                                                           \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                  \
                    cudaGetErrorString(e_));                                               \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

#endif /* RLB_BENCH_CUDA_H */
