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

/* A LoRA merge (DESIGN §10): C[rows, cols] = base + scale * L[rows, rank] * R[rank, cols],
 * where C is a block of whole rows of destination dst_ref (one adapted weight's part of a
 * local tensor), the base is what the merge's own copy ops (merge_copies[copy_first ..
 * + n_copies), which write exactly the block) bring from the sources, and L, R are f32
 * matrices in the plan's adapter stage. Column-parallel targets take their TP rows of B (L)
 * times A (R); row-parallel ones B times their TP columns of A; the embedding's delta is
 * (B * A)^T, so there L = A^T and R = B^T, read transposed. An executor writes each block
 * once: base widened to f32, plus the product, rounded once to the destination dtype. */
#define RLB_MERGE_L_TRANS 1u /* L(i, k) is stored at l_offset + (k * l_ld + i) * 4 */
#define RLB_MERGE_R_TRANS 2u /* R(k, j) is stored at r_offset + (j * r_ld + k) * 4 */

typedef struct rlb_merge_op {
    uint32_t dst_ref;    /* destination index */
    uint8_t dst_dtype;   /* rlb_dtype of the destination elements */
    uint8_t flags;       /* RLB_MERGE_* */
    uint16_t reserved;   /* zero */
    float scale;         /* s: alpha / r or alpha / sqrt(r) */
    uint32_t rank;       /* r, the inner dimension */
    uint64_t dst_offset; /* byte offset of C(0, 0) */
    uint64_t dst_stride; /* bytes from one row of C to the next */
    uint64_t rows;       /* rows of C */
    uint64_t cols;       /* columns of C */
    uint64_t l_offset;   /* byte offset of L(0, 0) in the stage */
    uint64_t l_ld;       /* f32 elements between stored rows of L (of L^T when transposed) */
    uint64_t r_offset;   /* byte offset of R(0, 0) in the stage */
    uint64_t r_ld;       /* f32 elements between stored rows of R (of R^T when transposed) */
    uint64_t copy_first; /* its base copies: merge_copies[copy_first .. + n_copies) */
    uint64_t n_copies;
} rlb_merge_op;

typedef struct rlb_plan {
    uint32_t n_src;      /* number of source buffers the plan reads */
    uint32_t n_dst;      /* number of destination buffers (worker weight buffers) */
    uint64_t *src_bytes; /* [n_src] bytes each source must hold at least */
    uint64_t *dst_bytes; /* [n_dst] bytes each destination must hold at least */
    uint64_t *dst_first_op; /* [n_dst + 1] destination d's ops are
                             * ops[dst_first_op[d] .. dst_first_op[d + 1]) */
    uint64_t n_ops;      /* entries in ops[] */
    rlb_copy_op *ops;    /* the copies, merged into the longest runs possible */
    uint64_t bytes_read;    /* sum of source bytes the ops (and stage ops) read */
    uint64_t bytes_written; /* sum of destination bytes the ops write */
    /* LoRA adapters (zero / NULL without): every factor is gathered into one f32 stage of
     * stage_bytes by stage_ops (copies whose dst_ref 0 is the stage), then each merge writes
     * its block from its base copies (which ops[] leaves out) and the stage. */
    uint64_t stage_bytes;       /* bytes of the f32 adapter stage */
    uint64_t n_stage_ops;       /* entries in stage_ops[] */
    rlb_copy_op *stage_ops;     /* source pieces of the factors -> the stage */
    uint64_t n_merges;          /* entries in merges[] */
    rlb_merge_op *merges;       /* grouped by destination, like ops */
    uint64_t *dst_first_merge;  /* [n_dst + 1] destination d's merges are
                                 * merges[dst_first_merge[d] .. dst_first_merge[d + 1]) */
    uint64_t n_merge_copies;    /* entries in merge_copies[] */
    rlb_copy_op *merge_copies;  /* the adapted weights' base copies, grouped by merge */
} rlb_plan;

/* What the workers hold: D data-parallel replicas of a TP group of size T. Destination
 * index d = replica * T + t is a worker buffer laid out by rlb__tp_layout_init(cfg, T, t,
 * dtype). */
typedef struct rlb_target {
    int32_t tp_size;  /* T */
    int32_t replicas; /* D */
    rlb_dtype dtype;  /* element type of every worker buffer: F32, BF16 or F16 */
} rlb_target;

struct rlb_source;

/* Builds the plan that moves every parameter of `src` (its parameter list names the model)
 * into every destination of `tgt`, with vocabulary padding rows zeroed, and merges the
 * list's LoRA adapters (model/lora.h) onto their weights. Ops are grouped by
 * destination, in buffer order within each; a destination's bytes outside its local tensors
 * (alignment gaps) are not written. Returns 0, or RLB_EUNSUPPORTED (T does not fit the
 * heads), RLB_EINVAL (bad target), RLB_EDTYPE, RLB_ENOTFOUND (a parameter has no source
 * placement), RLB_ENOMEM; `err` (may be NULL) says what. */
int rlb__plan_build(const struct rlb_source *src, const rlb_target *tgt, rlb_plan *plan,
                    char *err, size_t errlen);
void rlb__plan_free(rlb_plan *plan);

/* Checks one op against buffer counts and lengths: refs in range, dtypes F32/BF16/F16,
 * rows and row_elems non-zero, destination rows not overlapping (dst_stride >= row bytes
 * when rows > 1), and the whole extent (computed without overflow) inside src_len[src_ref]
 * and dst_len[dst_ref]. Returns 0 or RLB_EINVAL with `err` naming op `index` and the fault.
 * Shared by the executors and rlb__plan_deserialize. */
int rlb__plan_check_op(const rlb_copy_op *op, uint64_t index, uint32_t n_src,
                       const uint64_t *src_len, uint32_t n_dst, const uint64_t *dst_len,
                       char *err, size_t errlen);

/* Serialized plan: one little-endian buffer for shipping to a GPU executor,
 *   header (rlb_plan_wire_header, 64 bytes) | src_bytes[n_src] | dst_bytes[n_dst] |
 *   dst_first_op[n_dst + 1] | padding to 64 | ops[n_ops]
 * so ops[] can be uploaded straight from the buffer (it starts 64-byte aligned relative to
 * the buffer). */
#define RLB_PLAN_MAGIC UINT64_C(0x314e414c50424c52) /* "RLBPLAN1" read as little-endian */
#define RLB_PLAN_VERSION 1u

typedef struct rlb_plan_wire_header {
    uint64_t magic;         /* RLB_PLAN_MAGIC */
    uint32_t version;       /* RLB_PLAN_VERSION */
    uint32_t header_bytes;  /* sizeof(rlb_plan_wire_header) */
    uint32_t n_src;         /* entries of src_bytes[] */
    uint32_t n_dst;         /* entries of dst_bytes[] (dst_first_op[] has n_dst + 1) */
    uint64_t n_ops;         /* entries of ops[] */
    uint64_t ops_offset;    /* byte offset of ops[] from the start of the buffer */
    uint64_t bytes_read;    /* as rlb_plan */
    uint64_t bytes_written; /* as rlb_plan */
    uint64_t total_bytes;   /* size of the whole serialized plan */
} rlb_plan_wire_header;
_Static_assert(sizeof(rlb_plan_wire_header) == 64, "plan wire header is 64 bytes");

/* Checks merge `index` of `plan` against the buffer lengths: dst_ref in range, dtype
 * F32/BF16/F16, no empty dimension, flags and reserved known, C whole rows (cols fill
 * dst_stride) inside dst_len[dst_ref], L and R inside the stage, and each of its copies
 * (rlb__plan_check_op) writing only inside C. Returns 0 or RLB_EINVAL with `err` naming the
 * merge. */
int rlb__plan_check_merge(const rlb_plan *plan, uint64_t index, const uint64_t *src_len,
                          const uint64_t *dst_len, char *err, size_t errlen);

/* Bytes rlb__plan_serialize writes for `plan`. */
uint64_t rlb__plan_serialized_size(const rlb_plan *plan);
/* Writes the plan into buf[len]. Returns 0, RLB_ETOOBIG when len is too small, or
 * RLB_EUNSUPPORTED for a plan with LoRA merges (the wire form carries copies only). */
int rlb__plan_serialize(const rlb_plan *plan, void *buf, uint64_t len);
/* Reads a serialized plan into `plan` (owning copies), checking the header (RLB_EVERSION
 * for another version), every count against len, the op grouping by destination, every op
 * with rlb__plan_check_op against the plan's own length tables, and that each destination's
 * ops come in order, each starting at or past the end of the one before (as the planner
 * writes them), so no two ops write the same byte. Returns 0, RLB_EINVAL,
 * RLB_EVERSION or RLB_ENOMEM; `err` says what. */
int rlb__plan_deserialize(const void *buf, uint64_t len, rlb_plan *plan, char *err,
                          size_t errlen);

#endif /* RLB_MODEL_PLAN_H */
