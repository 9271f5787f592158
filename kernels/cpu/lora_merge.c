/* lora_merge.c: the CPU LoRA merge (see lora_merge.h).
 *
 * The stage is one aligned f32 block per run, filled by running the plan's stage ops as a
 * plan of their own (one destination: the stage), so the gathers get the copy executor's
 * threads and conversions. Merges then run one after another: each is one sgemm (or one
 * per tile of rows), and OpenBLAS spreads each over its own threads.
 */
#include "kernels/cpu/lora_merge.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/convert.h"
#include "kernels/cpu/plan_exec.h"
#include "model/config.h"

#define TILE_ELEMS (1u << 16) /* f32 elements of a tile for BF16 / F16 destinations */

int rlb__lora_check_cpu(const rlb_plan *plan, const uint64_t *src_len, const uint64_t *dst_len,
                        char *err, size_t errlen)
{
    if ((plan->n_stage_ops && !plan->stage_ops) || (plan->n_merges && !plan->merges))
        return rlb__model_err(err, errlen, RLB_EINVAL, "plan exec: NULL stage ops or merges");
    uint64_t stage = plan->stage_bytes;
    for (uint64_t i = 0; i < plan->n_stage_ops; i++) {
        const rlb_copy_op *op = &plan->stage_ops[i];
        int rc = op->src_ref == RLB_PLAN_ZERO_SRC || op->dst_dtype != RLB_DTYPE_F32
                     ? rlb__model_err(err, errlen, RLB_EINVAL, "plan stage op %llu: not a "
                                      "copy into f32", (unsigned long long)i)
                     : rlb__plan_check_op(op, i, plan->n_src, src_len, 1, &stage, err, errlen);
        if (rc)
            return rc;
    }
    for (uint64_t i = 0; i < plan->n_merges; i++) {
        int rc = rlb__plan_check_merge(&plan->merges[i], i, plan->n_dst, dst_len, stage, err,
                                       errlen);
        if (rc)
            return rc;
    }
    return 0;
}

/* C += scale * L * R for merge m, with C in `dst` and L, R in `stage`. */
static void merge_one(const rlb_merge_op *m, uint8_t *dst, const uint8_t *stage, float *tile)
{
    const float *L = (const float *)(stage + m->l_offset);
    const float *R = (const float *)(stage + m->r_offset);
    int ltrans = (m->flags & RLB_MERGE_L_TRANS) != 0;
    enum CBLAS_TRANSPOSE tl = ltrans ? CblasTrans : CblasNoTrans;
    enum CBLAS_TRANSPOSE tr = (m->flags & RLB_MERGE_R_TRANS) ? CblasTrans : CblasNoTrans;
    uint8_t *c = dst + m->dst_offset;
    int k = (int)m->rank, n = (int)m->cols;
    if (m->dst_dtype == RLB_DTYPE_F32 && (uintptr_t)c % 4 == 0 && m->dst_stride % 4 == 0) {
        cblas_sgemm(CblasRowMajor, tl, tr, (int)m->rows, n, k, m->scale, L, (int)m->l_ld, R,
                    (int)m->r_ld, 1.0f, (float *)(void *)c, (int)(m->dst_stride / 4));
        return;
    }
    uint64_t step = TILE_ELEMS / m->cols ? TILE_ELEMS / m->cols : 1;
    for (uint64_t i0 = 0; i0 < m->rows; i0 += step) {
        uint64_t rows = m->rows - i0 < step ? m->rows - i0 : step;
        for (uint64_t r = 0; r < rows; r++)
            rlb__row_to_f32(tile + r * m->cols, c + (i0 + r) * m->dst_stride, m->cols,
                            m->dst_dtype);
        /* Row i0 of L: a row offset when stored as is, a column offset when transposed. */
        const float *Li = ltrans ? L + i0 : L + i0 * m->l_ld;
        cblas_sgemm(CblasRowMajor, tl, tr, (int)rows, n, k, m->scale, Li, (int)m->l_ld, R,
                    (int)m->r_ld, 1.0f, tile, n);
        for (uint64_t r = 0; r < rows; r++)
            rlb__row_from_f32(c + (i0 + r) * m->dst_stride, tile + r * m->cols, m->cols,
                              m->dst_dtype);
    }
}

int rlb__lora_merge_cpu(const rlb_plan *plan, const void *const *src, const uint64_t *src_len,
                        void *const *dst, int threads, char *err, size_t errlen)
{
    if (!plan->n_merges && !plan->n_stage_ops)
        return 0;
    int rc = RLB_ENOMEM;
    uint64_t stage_bytes = plan->stage_bytes;
    uint64_t first[2] = {0, plan->n_stage_ops};
    /* A tile holds at least one row, however long. */
    uint64_t max_cols = 0;
    for (uint64_t i = 0; i < plan->n_merges; i++)
        max_cols = plan->merges[i].cols > max_cols ? plan->merges[i].cols : max_cols;
    size_t tile_elems = max_cols > TILE_ELEMS ? max_cols : TILE_ELEMS;
    void *stage = aligned_alloc(64, (stage_bytes + 63) / 64 * 64 + 64);
    float *tile = malloc(tile_elems * sizeof(float));
    if (!stage || !tile) {
        rlb__model_err(err, errlen, rc, "plan exec: no memory for the adapter stage");
        goto out;
    }
    rlb_plan gather = {.n_src = plan->n_src, .n_dst = 1, .src_bytes = (uint64_t *)src_len,
                       .dst_bytes = &stage_bytes, .dst_first_op = first,
                       .n_ops = plan->n_stage_ops, .ops = plan->stage_ops,
                       .bytes_written = stage_bytes};
    rc = rlb__plan_exec_cpu(&gather, src, src_len, &stage, &stage_bytes, threads, err, errlen);
    for (uint64_t i = 0; rc == 0 && i < plan->n_merges; i++)
        merge_one(&plan->merges[i], dst[plan->merges[i].dst_ref], stage, tile);
out:
    free(tile);
    free(stage);
    return rc;
}
