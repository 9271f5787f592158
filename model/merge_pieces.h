/* merge_pieces.h: a LoRA merge's base as rectangles of its block (DESIGN §10), the form in
 * which the fused CUDA merge (kernels/cuda/lora_merge.h) reads each merged element's base
 * straight from its source instead of from a copy of it in the destination.
 *
 * A merge's base copies (plan->merge_copies[copy_first .. + n_copies)) write exactly its
 * block C[rows, cols] (whole rows of its destination, row stride cols elements). Each copy
 * becomes one or more pieces: rows [i0, i1) x columns [j0, j1) of C, whose element (i, j)
 * is at byte src_off + (i - i0) * src_stride + (j - j0) * (size of src_dtype) of source
 * src_ref (RLB_PLAN_ZERO_SRC: zeros). A copy whose rows are rows of C is one piece; a copy
 * whose runs cross rows of C (an FSDP1 flat shard) is cut into each run's head, whole rows
 * and tail. Check: tests/unit/test_lora.c (test_merge_pieces: every element of every block
 * against the copies applied one element at a time).
 */
#ifndef RLB_MODEL_MERGE_PIECES_H
#define RLB_MODEL_MERGE_PIECES_H

#include <stdint.h>

#include "model/plan.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct rlb_merge_piece {
    uint64_t src_off;    /* byte offset of element (i0, j0) in the source */
    uint64_t src_stride; /* bytes from one of its rows to the next in the source */
    uint32_t i0, i1;     /* rows of C */
    uint32_t j0, j1;     /* columns of C */
    uint32_t src_ref;    /* source index, or RLB_PLAN_ZERO_SRC */
    uint32_t src_dtype;  /* rlb_dtype of the source elements: F32, BF16 or F16 (0 for zeros) */
} rlb_merge_piece;
_Static_assert(sizeof(rlb_merge_piece) == 40, "rlb_merge_piece is uploaded as is");

typedef struct rlb_piece_list {
    rlb_merge_piece *p;
    uint64_t n, cap;
} rlb_piece_list;

/* Appends to l the pieces of merge m of plan, sorted by (i0, j0). Returns 0 when they tile
 * its block exactly (inside it, no overlap, no gap), 1 when its copies are not such pieces
 * (another destination or dtype, a source dtype other than F32 / BF16 / F16, a run the
 * block cannot hold, more than 4096 rows of runs across rows, a gap or an overlap: l is
 * then left as it was), or RLB_ENOMEM. */
int rlb__merge_pieces(const rlb_plan *plan, const rlb_merge_op *m, rlb_piece_list *l);
void rlb__piece_list_free(rlb_piece_list *l);

#ifdef __cplusplus
}
#endif

#endif /* RLB_MODEL_MERGE_PIECES_H */
