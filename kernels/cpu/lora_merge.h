/* lora_merge.h: the LoRA half of a plan on the CPU (DESIGN §10): gathers every adapter
 * factor into an f32 stage, then writes each merge's block once as base + scale * L * R,
 * the base coming straight from the sources through the merge's own copy ops.
 *
 * rlb__plan_exec_cpu calls this after its copies when the plan has adapters; nothing else
 * needs to. Each destination row of a merge is built in f32 (the base widened exactly from
 * its source dtype, then + sum_k l_k R(k, :) with l = scale * L(i, :)) and rounded to the
 * destination dtype once, to nearest even: one pass over the destination, one rounding.
 */
#ifndef RLB_KERNELS_CPU_LORA_MERGE_H
#define RLB_KERNELS_CPU_LORA_MERGE_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/cpu/plan_exec.h"
#include "model/plan.h"

/* Checks the plan's stage ops against the sources and the stage, and its merges (with
 * their copies) against the buffers and the stage, before anything is written. Returns 0
 * or RLB_EINVAL naming the op. */
int rlb__lora_check_cpu(const rlb_plan *plan, const uint64_t *src_len, const uint64_t *dst_len,
                        char *err, size_t errlen);

/* Runs the stage ops and the merges of a checked plan (after its copy ops), on
 * `threads` threads as rlb__plan_exec_cpu, with the stage in `scratch` (grown to fit) or,
 * when it is NULL, in memory of this call. With `nonfinite` (an array of plan->n_merges,
 * zeroed by the caller) each merge's count of NaN / Inf values written is added at its
 * index. Returns 0, RLB_ENOMEM, or the gather's error. */
int rlb__lora_merge_cpu(const rlb_plan *plan, const void *const *src, const uint64_t *src_len,
                        void *const *dst, rlb_exec_scratch *scratch, int threads,
                        uint64_t *nonfinite, char *err, size_t errlen);

#endif /* RLB_KERNELS_CPU_LORA_MERGE_H */
