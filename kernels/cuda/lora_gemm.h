/* lora_gemm.h: LoRA merges written as cuBLASLt products (kernels/cuda/lora_merge.h,
 * RLB_LORA_MERGE=gemm), for the rectangles of a merge's block whose base is one bf16 source
 * read in place.
 *
 * A product writes, row-major, D[rows, cols] = scale * L[rows, kp] R[kp, cols] + C[rows, cols]
 * with L and R the factors packed in bf16 (zeros past the rank), C the base in its source
 * (rows ldc elements apart: a TP shard of a trainer's whole rows), D the rectangle in its
 * destination (rows ldd apart), f32 accumulation and one rounding to bf16. In cuBLASLt's
 * column-major terms: D^T (cols x rows) = scale * R^T (cols x kp, ld ldr) L^T (kp x rows,
 * ld kp) + C^T. Each shape (with the alignment of its four addresses) takes the fastest of
 * the first 4 algorithms cuBLASLt's heuristic offers, timed on its first product at the
 * first run after a set; that run also captures every product into a CUDA graph, which each
 * run then launches (one call instead of one per product: the bridge thread's time).
 *
 * Check: tests/gpu/test_cuda_lora (test_gemm, through the executor, against the CPU executor
 * and a double-precision reference); speed: rlb-bench-reshard-gpu --lora,
 * rlb-bench-sync --device cuda --lora.
 *
 * Every function returns 0 or a negative RLB_E* code (RLB_ECUDA when cuBLASLt refuses; the
 * refusal is logged and described in err, which may be NULL).
 */
#ifndef RLB_KERNELS_CUDA_LORA_GEMM_H
#define RLB_KERNELS_CUDA_LORA_GEMM_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct rlb_lora_product {
    const void *l;      /* L's row of the rectangle's first row: rows of kp bf16 */
    const void *r;      /* R's column of its first column: kp rows of ldr bf16 */
    const void *c;      /* its base: rows of ldc bf16 */
    void *d;            /* its place in the destination: rows of ldd bf16 */
    uint64_t rows, cols, kp, ldr, ldc, ldd;
    float scale;
} rlb_lora_product;

typedef struct rlb_lora_gemm rlb_lora_gemm;

/* A cuBLASLt handle and its workspace on the current device. */
int rlb__lora_gemm_create(rlb_lora_gemm **out, char *err, size_t errlen);
/* Makes p[0, n) the products each run launches (copied; layouts made and algorithms chosen
 * here, replacing the last set's). */
int rlb__lora_gemm_set(rlb_lora_gemm *g, const rlb_lora_product *p, uint64_t n, char *err,
                       size_t errlen);
/* Launches every product on `stream` (current device: g's). The first run after a set
 * times the algorithms (writing the destinations, which it then writes again) and waits for
 * `stream`. */
int rlb__lora_gemm_run(rlb_lora_gemm *g, cudaStream_t stream);
/* Bytes of device memory held (the workspace). */
uint64_t rlb__lora_gemm_device_bytes(const rlb_lora_gemm *g);
void rlb__lora_gemm_free(rlb_lora_gemm *g);

#ifdef __cplusplus
}
#endif

#endif /* RLB_KERNELS_CUDA_LORA_GEMM_H */
