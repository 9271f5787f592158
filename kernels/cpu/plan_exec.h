/* plan_exec.h: runs a reshard plan (model/plan.h) on the CPU, the reference every other
 * executor must match byte for byte.
 *
 * The caller binds the plan's source and destination indices to memory: src[i] / src_len[i]
 * for i < plan->n_src, dst[d] / dst_len[d] for d < plan->n_dst. Before touching any byte,
 * every op is checked against those lengths (rlb__plan_check_op); a bad op fails the whole
 * call with RLB_EINVAL naming it and nothing is written. Then a few threads share the work,
 * split by bytes (an op larger than a share is cut by rows, or by elements when it is one
 * row): memcpy for same-dtype rows, a round-to-nearest-even convert loop otherwise
 * (kernels/cpu/convert.h), memset for zero ops. A plan from rlb__plan_build writes each
 * planned destination byte exactly once and nothing else; sources are only read and may be
 * unaligned. A plan with LoRA adapters then runs its merges, which write the adapted
 * weights' blocks (kernels/cpu/lora_merge.h); its stage ops, merges and their copies are
 * checked with the ops, up front.
 */
#ifndef RLB_KERNELS_CPU_PLAN_EXEC_H
#define RLB_KERNELS_CPU_PLAN_EXEC_H

#include <stddef.h>
#include <stdint.h>

#include "model/plan.h"

/* Memory a caller may keep across runs (zeroed at first, freed with rlb__exec_scratch_free):
 * the f32 stage of a plan with LoRA adapters, grown to fit, so that it is not allocated and
 * faulted in on every run. Used by one run at a time. */
typedef struct rlb_exec_scratch {
    void *stage;          /* 64-byte aligned, or NULL */
    uint64_t stage_bytes; /* its size */
} rlb_exec_scratch;

void rlb__exec_scratch_free(rlb_exec_scratch *scratch);

/* Executes `plan`. `threads` <= 0 takes the RLB_THREADS knob (0 there = online cores); a
 * thread that cannot start leaves its share to the others. Returns 0, RLB_EINVAL (an op or
 * merge outside its buffers, a NULL buffer; `err` names the op) or RLB_ENOMEM. `err` may be
 * NULL. */
int rlb__plan_exec_cpu(const rlb_plan *plan, const void *const *src, const uint64_t *src_len,
                       void *const *dst, const uint64_t *dst_len, int threads, char *err,
                       size_t errlen);
/* The same with the caller's scratch (NULL: memory of this call only), also counting the
 * non-finite values (NaN, +-inf) written, fused into the copy and the merges when
 * `nonfinite` is not NULL: nonfinite (an array of plan->n_ops + plan->n_merges, zeroed here)
 * receives op i's count at [i] and merge m's (its whole block) at [plan->n_ops + m] once
 * the call returns 0; zero ops write none. A poisoned trainer step, or a poisoned adapter,
 * shows up here before any worker reads the version. */
int rlb__plan_exec_cpu_counted(const rlb_plan *plan, const void *const *src,
                               const uint64_t *src_len, void *const *dst,
                               const uint64_t *dst_len, int threads, rlb_exec_scratch *scratch,
                               uint64_t *nonfinite, char *err, size_t errlen);

/* Threads an executor call uses for `threads` (as above): 1..64. */
int rlb__exec_threads(int threads);

#endif /* RLB_KERNELS_CPU_PLAN_EXEC_H */
