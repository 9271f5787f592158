/* plan_exec.h: runs a reshard plan (model/plan.h) on one GPU, in one kernel launch.
 *
 * Upload (once per registration) copies the plan's ops that write to this GPU's
 * destinations to the device as they are, plus one 48-byte work descriptor per op that
 * says how the op is cut into work items of at most RLB_CUDA_ITEM_BYTES (whole rows
 * grouped, or long rows split into segments) and a coarse item -> op index (4 bytes per 64
 * items). Bind records the device addresses of the plan's sources and destinations (local
 * memory, a peer GPU's through an IPC mapping, or mapped host memory) in a device-resident
 * table. Run is one launch with one block per item: 16-byte vector loads and stores where
 * both sides are aligned (a scalar head and tail otherwise), f32 / bf16 / f16 conversion
 * fused, bit-identical to kernels/cpu/convert.h; same-dtype ops are byte copies, zero ops
 * write zeros. The executor's device memory is ops + descriptors + pointer tables + the
 * coarse index, in one allocation: 112 bytes per op, 8 per buffer, 1 per 16 KiB moved
 * (Llama-3-8B, FSDP2 8 -> TP 2: 3360 ops, 254k items, 383 KiB; rlb-bench-reshard-gpu
 * prints it), far under the 64 MiB a pause-mode sync may add.
 *
 * Sources on another GPU are read through peer access, in the same launch. Where the two
 * GPUs have no peer path, or where the plan's peer mode is RLB_CUDA_PEER_STAGED (default:
 * the RLB_CUDA_PEER knob), such a source is staged instead: each run copies it, in windows,
 * through two local staging buffers of RLB_CUDA_STAGE_BYTES each (default 16 MiB, so 32 MiB
 * of device memory with the plan's tables, under the 64 MiB rule) with cudaMemcpyPeerAsync
 * (which the driver routes through host memory where there is no peer path) and runs the
 * ops reading it on the local copy, one launch per window, copies overlapping launches
 * (plan_stage.h says how windows are cut). Destinations must be local or reachable peer to
 * peer: the plan runs on the destinations' GPU.
 *
 * Every function returns 0 or a negative RLB_E* code. A refused plan or buffer is
 * described in `err` (may be NULL); a failed CUDA call is named in the log. None leaves the
 * caller's current device changed.
 */
#ifndef RLB_KERNELS_CUDA_PLAN_EXEC_H
#define RLB_KERNELS_CUDA_PLAN_EXEC_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/plan_stage.h"

#ifdef __cplusplus
#ifndef _Static_assert
#define _Static_assert static_assert /* model/plan.h is C11; nvcc reads it as C++ */
#endif
extern "C" { /* model/plan.h has no C++ guard of its own */
#endif
#include "model/plan.h"

#define RLB_CUDA_ITEM_BYTES 65536u /* largest side (source or destination) of one work item */

typedef struct rlb_cuda_plan rlb_cuda_plan;

/* One buffer bound to a plan source or destination. */
typedef struct rlb_cuda_buf {
    void *ptr;      /* address usable by kernels on the plan's device; NULL for an unused ref */
    uint64_t bytes; /* bytes addressable from ptr */
} rlb_cuda_buf;

/* Uploads to `device` the ops of `plan` whose destination d has dst_sel[d] != 0 (dst_sel
 * NULL: every op). Checks each such op first (rlb__plan_check_op against plan->src_bytes /
 * dst_bytes, and offsets / strides on element boundaries): RLB_EINVAL naming the op.
 * RLB_EUNSUPPORTED for a plan with LoRA merges: their weights would get the base alone
 * (kernels/cuda/lora_merge.h runs merges; upload the copy ops here without them).
 * RLB_ENOMEM / RLB_ECUDA when the device refuses. */
int rlb__cuda_plan_upload(const rlb_plan *plan, int device, const uint8_t *dst_sel,
                          rlb_cuda_plan **out, char *err, size_t errlen);
/* Sets how sources on another GPU are read and (stage_bytes != 0: a multiple of 256, at
 * least RLB_STAGE_MIN_BYTES) the size of each staging buffer; both default to the knobs
 * RLB_CUDA_PEER and RLB_CUDA_STAGE_BYTES read at upload. Unbinds: takes effect at the next
 * bind. RLB_EINVAL for a bad mode or size. */
int rlb__cuda_plan_set_peer_mode(rlb_cuda_plan *cp, rlb_cuda_peer_mode mode,
                                 uint64_t stage_bytes);
/* Binds plan->n_src sources and plan->n_dst destinations. Every ref an uploaded op uses
 * needs a non-NULL pointer covering the plan's byte count and aligned to its widest
 * element (RLB_EINVAL otherwise). A source on another GPU is read peer to peer (access is
 * enabled here) or staged (see above; the staging buffers are allocated by the first bind
 * that stages); a destination on another GPU needs a peer path (RLB_EUNSUPPORTED). May be
 * called again to rebind. */
int rlb__cuda_plan_bind(rlb_cuda_plan *cp, const rlb_cuda_buf *src, const rlb_cuda_buf *dst,
                        char *err, size_t errlen);
/* Launches the whole plan on `stream` (asynchronous; the caller orders and waits): one
 * launch, or with staged sources, one launch for the rest and one per staging window, the
 * copies on a stream of the plan's own and ordered before `stream`'s completion. The
 * sources must stay unchanged until then. RLB_EINVAL before a bind. */
int rlb__cuda_plan_run(rlb_cuda_plan *cp, cudaStream_t stream);
/* on != 0: the runs from now on count the non-finite values (NaN / Inf: an all-ones
 * exponent, as kernels/cpu counts them) each op writes, at no extra pass; 0: they don't
 * (the default). Returns 0, or RLB_ENOMEM / RLB_ECUDA allocating the counts. */
int rlb__cuda_plan_count(rlb_cuda_plan *cp, int on);
/* Adds, once a counted run's stream is done, each op's count to nonfinite[i], i its index
 * in the uploaded plan ([plan->n_ops]; ops not uploaded add nothing). Nothing when counting
 * is off. */
void rlb__cuda_plan_counts(const rlb_cuda_plan *cp, uint64_t *nonfinite);
void rlb__cuda_plan_free(rlb_cuda_plan *cp);

/* Bytes of device memory the plan holds (ops, descriptors, pointer tables, staging
 * buffers). */
uint64_t rlb__cuda_plan_device_bytes(const rlb_cuda_plan *cp);
/* The device's table of the bound addresses, sources [0, n_src) then destinations (a ref the
 * plan does not use: NULL), on the plan's GPU; kept at the same place from bind to bind.
 * NULL before the first upload. */
char *const *rlb__cuda_plan_bound_ptrs(const rlb_cuda_plan *cp);
/* 1 when the last bind stages some source (read from a GPU without a peer path): its
 * address is then not one a kernel of the plan's GPU may read. */
int rlb__cuda_plan_staging(const rlb_cuda_plan *cp);
/* Work items of one run (what the launch's blocks share out). */
uint64_t rlb__cuda_plan_items(const rlb_cuda_plan *cp);
/* Bytes one run copies into staging buffers (0 when the bind stages nothing) and, in
 * *windows (may be NULL), the windows it copies them in. */
uint64_t rlb__cuda_plan_staged_bytes(const rlb_cuda_plan *cp, uint32_t *windows);

#ifdef __cplusplus
}
#endif
#endif /* RLB_KERNELS_CUDA_PLAN_EXEC_H */
