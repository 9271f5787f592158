/* lora_merge.h: the LoRA half of a plan on one GPU (DESIGN §10), the twin of
 * kernels/cpu/lora_merge.h.
 *
 * For the merges whose destination is selected, a run does, in order on the caller's stream:
 *   1. the adapter stage: the plan's stage ops gather every factor, whole and as f32, into
 *      a stage buffer on this GPU (a plan of its own, kernels/cuda/plan_exec.h, whose one
 *      destination is the stage);
 *   2. the merge, fused (RLB_LORA_MERGE=fused): one pass over each block,
 *      C = base + scale * L * R, the base read from the merge's sources where its base
 *      copies (the plan's merge_copies) would read it, widened to f32, the rank-r product
 *      summed in f32 (L scaled first, as the CPU does: l_k = scale * L(i, k), then
 *      base + l_0 R(0, j) + l_1 R(1, j) + ..., each step one fused multiply-add), rounded
 *      once to the destination dtype, the non-finite values written counted per merge.
 *      Each merged element is read once from its source and written once: the merge costs
 *      what the copy of the same weight would, plus the product. Where every factor came
 *      from bf16 (the stage then holds bf16 values exactly) the product runs on tensor
 *      cores instead: exact bf16 products summed in f32 in the tensor core's order, then
 *      C = base + scale * (L * R), one rounding (the same error bound, not the same bits;
 *      RLB_LORA_MERGE=fused-fma keeps the multiply-adds).
 *   2'. RLB_LORA_MERGE=gemm (the default): as fused, but each merge whose base is one bf16
 *      source read in whole rows, in pieces of RLB_LORA_GEMM_MIN_BYTES or more (a full or
 *      FSDP2 trainer's large bf16 weights into bf16 workers), with bf16 factors, is
 *      written as cuBLASLt products instead (kernels/cuda/lora_gemm.h: one per piece of
 *      its base, C the base in its source, D the block, the same f32 sums on tensor cores
 *      and one rounding), after the fused launch of the rest. cuBLASLt cannot count what
 *      it writes, so such a merge's non-finite values are counted from its inputs: the
 *      largest |L| and |R| of each run (taken while the factors are packed) and the
 *      largest |base| (scanned once a bind: the base beside adapters is frozen, DESIGN
 *      §10) bound every value it writes; where a factor or the base is non-finite, or the
 *      bound reaches 3e38, what it wrote is read back and counted. A base changed between
 *      binds is not rescanned.
 * Separate (RLB_LORA_MERGE=separate, and always where a base source is staged from a GPU
 * without a peer path, which leaves no address a kernel may read): the base copies first
 * (as a plan of their own: local, peer, IPC-mapped, mapped host and staged sources alike),
 * then the same arithmetic in place over each block. The base comes from the sources every
 * run, so no version builds on the last. Where a base's source dtype is wider than the
 * destination's (f32 master weights into bf16 workers), the separate path rounds the base
 * once in its copy and the merged value once more, where the CPU and the fused path round
 * once: the two may then differ by one unit in the last place of the base; otherwise all
 * three differ only by the order of f32 roundings in the product.
 *
 * Device memory: the stage (plan->stage_bytes: every factor in f32, e.g. Llama-3.1-8B with
 * rank 16 on all seven targets, 168 MiB; rank 64, 671 MiB), the two plans' tables, 96 bytes
 * per merge, a count per merge, and for the fused merge each block's base as pieces
 * (40 bytes per rectangle of a base copy) with an index per 64-row band; on tensor cores
 * also the factors packed in bf16 (half the stage, plus padding to whole tiles); for the
 * products 48 bytes per piece, 12 per merge and cuBLASLt's 32 MiB workspace. Kept from
 * run to run with the upload.
 *
 * Every function returns 0 or a negative RLB_E* code; a refused plan or buffer is described
 * in `err` (may be NULL). None leaves the caller's current device changed.
 */
#ifndef RLB_KERNELS_CUDA_LORA_MERGE_H
#define RLB_KERNELS_CUDA_LORA_MERGE_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "kernels/cuda/plan_exec.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct rlb_cuda_lora rlb_cuda_lora;

/* Uploads to `device` the merges of `plan` whose destination d has dst_sel[d] != 0 (dst_sel
 * NULL: every merge), with their base copies and the plan's stage ops, after checking them
 * (rlb__plan_check_merge and rlb__plan_check_op against plan->src_bytes / dst_bytes; stage
 * ops copying into f32). *out is NULL when no merge is selected. RLB_EINVAL naming the
 * merge or op, RLB_ETOOBIG (more tiles than one launch has blocks), RLB_ENOMEM /
 * RLB_ECUDA when the device refuses. */
int rlb__cuda_lora_upload(const rlb_plan *plan, int device, const uint8_t *dst_sel,
                          rlb_cuda_lora **out, char *err, size_t errlen);
/* Binds plan->n_src sources and plan->n_dst destinations, as rlb__cuda_plan_bind (the
 * destinations of the selected merges must be GPU memory this device reaches). */
int rlb__cuda_lora_bind(rlb_cuda_lora *cl, const rlb_cuda_buf *src, const rlb_cuda_buf *dst,
                        char *err, size_t errlen);
/* Launches the base copies, the stage gather and the merges on `stream`, and the copy of
 * the counts back to host memory (asynchronous). RLB_EINVAL before a bind. */
int rlb__cuda_lora_run(rlb_cuda_lora *cl, cudaStream_t stream);
/* Once the run's stream is done: adds each merge's count of non-finite values written to
 * nonfinite[m], m its index in the uploaded plan's merges[]. */
void rlb__cuda_lora_counts(const rlb_cuda_lora *cl, uint64_t *nonfinite);
void rlb__cuda_lora_free(rlb_cuda_lora *cl);

/* How the runs write the merges (kernels/cuda/cuda_check.h): fused (RLB_LORA_FUSED_FMA or
 * later) where RLB_LORA_MERGE is not separate, every merge's base copies are pieces of its
 * block the kernel reads, and the bound sources are not staged; on tensor cores where every
 * factor is bf16; RLB_LORA_GEMM where some merge is written as cuBLASLt products. */
rlb_lora_merge_mode rlb__cuda_lora_mode(const rlb_cuda_lora *cl);
/* The merges the runs write as cuBLASLt products (0 unless the mode is RLB_LORA_GEMM). */
uint64_t rlb__cuda_lora_products(const rlb_cuda_lora *cl);
/* Merges uploaded, and bytes of device memory held (stage, plans, tables). */
uint64_t rlb__cuda_lora_merges(const rlb_cuda_lora *cl);
uint64_t rlb__cuda_lora_device_bytes(const rlb_cuda_lora *cl);

#ifdef __cplusplus
}
#endif
#endif /* RLB_KERNELS_CUDA_LORA_MERGE_H */
