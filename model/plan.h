/* plan.h: a reshard plan, the flat list of 2-D strided copies that moves every element of
 * every source shard to its place in every worker's weight buffer (DESIGN §4, "Plan").
 *
 * The plan is a wire format between the planner (model/plan.c), the CPU executor
 * (kernels/cpu) and the CUDA executor (kernels/cuda, which uploads ops[] as is): fixed-width
 * fields, byte offsets not pointers, 64 bytes per op. Sources and destinations are indices
 * into tables the caller binds to memory at execution time; the plan itself holds no
 * addresses, so it is built once per registration and run every step.
 */
#ifndef RLB_MODEL_PLAN_H
#define RLB_MODEL_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "rlb/rlb.h"

/* src_ref value of an op that writes zeros (vocabulary padding rows) instead of copying. */
#define RLB_PLAN_ZERO_SRC UINT32_MAX

typedef struct rlb_copy_op {
    uint32_t src_ref;    /* index into the plan's sources, or RLB_PLAN_ZERO_SRC */
    uint32_t dst_ref;    /* index into the plan's destinations (worker buffers) */
    uint8_t src_dtype;   /* rlb_dtype of the source elements (ignored for zero ops) */
    uint8_t dst_dtype;   /* rlb_dtype of the destination elements */
    uint8_t reserved[6]; /* zero */
    uint64_t src_offset; /* byte offset of the first source row */
    uint64_t src_stride; /* bytes from one source row to the next */
    uint64_t dst_offset; /* byte offset of the first destination row */
    uint64_t dst_stride; /* bytes from one destination row to the next */
    uint64_t rows;       /* number of rows */
    uint64_t row_elems;  /* elements per row */
} rlb_copy_op;
_Static_assert(sizeof(rlb_copy_op) == 64, "rlb_copy_op is a 64-byte wire record");

typedef struct rlb_plan {
    uint32_t n_src;      /* number of source buffers the plan reads */
    uint32_t n_dst;      /* number of destination buffers (worker weight buffers) */
    uint64_t *src_bytes; /* [n_src] bytes each source must hold at least */
    uint64_t *dst_bytes; /* [n_dst] bytes each destination must hold at least */
    uint64_t n_ops;      /* entries in ops[] */
    rlb_copy_op *ops;    /* the copies, merged into the longest runs possible */
    uint64_t bytes_read;    /* sum of source bytes the ops read */
    uint64_t bytes_written; /* sum of destination bytes the ops write */
} rlb_plan;

void rlb__plan_free(rlb_plan *plan);

#endif /* RLB_MODEL_PLAN_H */
