/* plan_stage.h: the staged fallback of the CUDA reshard executor, planned on the host.
 *
 * A source on another GPU that the executing GPU cannot read peer to peer (or every such
 * source, when staging is forced) is read through two staging buffers of `cap` bytes in
 * the executing GPU's memory. The staged ops are cut into pieces whose source bytes (first
 * byte of the first row to the last byte of the last row) fit a staging buffer: rows are
 * grouped, and rows longer than a buffer are first split into column segments. Pieces are
 * sorted by source and position and packed into windows: a window is a set of contiguous
 * byte ranges of sources (copies: one cudaMemcpyPeerAsync each; pieces of one source that
 * overlap or lie close together share a copy) placed in one staging buffer, plus the
 * pieces rewritten to read from it. Windows alternate between the two buffers, so the copy
 * of window w + 1 overlaps the kernel of window w.
 *
 * A copy lands at the source address's offset modulo 16 within the staging buffer (each
 * buffer is 256-byte aligned), so a piece keeps the 16-byte alignment its rows had and the
 * executor's vector path runs on staged data as it does on the original.
 *
 * Pure host code with no CUDA call: tests/gpu/test_cuda_stage replays windows with memcpy
 * and the CPU executor where no GPU is present.
 */
#ifndef RLB_KERNELS_CUDA_PLAN_STAGE_H
#define RLB_KERNELS_CUDA_PLAN_STAGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#ifndef _Static_assert
#define _Static_assert static_assert /* model/plan.h is C11; nvcc reads it as C++ */
#endif
extern "C" {
#endif
#include "model/plan.h"

#define RLB_STAGE_MIN_BYTES 4096u /* smallest staging buffer (must also be a multiple of 256) */

/* One contiguous range of a source copied into a staging buffer. */
typedef struct rlb_stage_copy {
    uint32_t src_ref;      /* plan source it reads */
    uint32_t buf;          /* staging buffer it fills (0 or 1) */
    uint64_t src_offset;   /* first source byte */
    uint64_t stage_offset; /* where that byte lands in the staging buffer */
    uint64_t bytes;        /* bytes copied */
} rlb_stage_copy;

/* One fill of a staging buffer and the ops that read it. */
typedef struct rlb_stage_window {
    uint32_t buf;        /* staging buffer: window index % 2 */
    uint64_t first_op;   /* its ops are ops[first_op, first_op + n_ops) */
    uint64_t n_ops;      /* >= 1 */
    uint64_t first_copy; /* its copies are copies[first_copy, first_copy + n_copies) */
    uint64_t n_copies;   /* >= 1 */
} rlb_stage_window;

typedef struct rlb_stage_plan {
    uint64_t cap;              /* bytes of each staging buffer */
    uint64_t n_ops;            /* entries in ops[] */
    rlb_copy_op *ops;          /* staged pieces: src_ref is the staging buffer (0 or 1),
                                * src_offset a byte offset inside it */
    uint64_t *op_of;           /* [n_ops] index in the planned ops of the op each piece
                                * was cut from */
    uint64_t n_copies;         /* entries in copies[] */
    rlb_stage_copy *copies;    /* in window order */
    uint32_t n_windows;        /* entries in windows[] */
    rlb_stage_window *windows; /* in execution order */
    uint64_t bytes_copied;     /* sum of the copies' bytes (gaps between rows included) */
} rlb_stage_plan;

/* Plans the staged execution of the ops among ops[0, n) that read a source s with
 * staged[s] != 0 (zero ops never do), through two buffers of `cap` bytes. src_phase[s] is
 * source s's base address modulo 16. Ops must already be checked (rlb__plan_check_op) with
 * offsets and strides on element boundaries. Returns 0 (an empty plan when no op is
 * staged), RLB_EINVAL (cap below RLB_STAGE_MIN_BYTES or not a multiple of 256, a NULL
 * argument), RLB_ETOOBIG (over 2^32 pieces) or RLB_ENOMEM. */
int rlb__stage_build(const rlb_copy_op *ops, uint64_t n, uint32_t n_src, const uint8_t *staged,
                     const uint8_t *src_phase, uint64_t cap, rlb_stage_plan *out);
void rlb__stage_free(rlb_stage_plan *sp);

#ifdef __cplusplus
}
#endif
#endif /* RLB_KERNELS_CUDA_PLAN_STAGE_H */
