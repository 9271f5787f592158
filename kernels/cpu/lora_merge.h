/* lora_merge.h: the LoRA half of a plan on the CPU (DESIGN §10): gathers every adapter
 * factor into an f32 stage, then adds scale * L * R onto each merge's destination block,
 * which the plan's copy ops filled with the pristine base just before.
 *
 * rlb__plan_exec_cpu calls this after its copies when the plan has adapters; nothing else
 * needs to. Each destination row of a merge is read once, gets base + sum_k l_k R(k, :) in
 * f32 with l = scale * L(i, :), and is written once: in place for F32, widened and rounded
 * to nearest even once for BF16 / F16. The base there is the copy's value in the
 * destination dtype, so a base registered in that dtype gets one rounding in all and a
 * wider base two (the copy's and the sum's); tests hold both to those bounds.
 */
#ifndef RLB_KERNELS_CPU_LORA_MERGE_H
#define RLB_KERNELS_CPU_LORA_MERGE_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/cpu/plan_exec.h"
#include "model/plan.h"

/* Checks the plan's stage ops against the sources and the stage, and its merges against
 * the destinations and the stage, before anything is written. Returns 0 or RLB_EINVAL
 * naming the op. */
int rlb__lora_check_cpu(const rlb_plan *plan, const uint64_t *src_len, const uint64_t *dst_len,
                        char *err, size_t errlen);

/* Runs the stage ops and the merges of a checked plan whose copy ops already ran, on
 * `threads` threads as rlb__plan_exec_cpu, with the stage in `scratch` (grown to fit) or,
 * when it is NULL, in memory of this call. Returns 0, RLB_ENOMEM, or the gather's error. */
int rlb__lora_merge_cpu(const rlb_plan *plan, const void *const *src, const uint64_t *src_len,
                        void *const *dst, rlb_exec_scratch *scratch, int threads, char *err,
                        size_t errlen);

#endif /* RLB_KERNELS_CPU_LORA_MERGE_H */
