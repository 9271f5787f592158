/* lora_merge.c: the CPU LoRA merge (see lora_merge.h).
 *
 * The stage is one aligned f32 block per run, filled by running the plan's stage ops as a
 * plan of their own (one destination: the stage), so the gathers get the copy executor's
 * threads and conversions. The merges are then cut into items of rows, which threads claim
 * through one counter as the copy executor's do; items write disjoint rows because merges
 * do (one per local tensor block), and join publishes them.
 *
 * The update is not a BLAS call: with r small (8..64), a GEMM library spends its time
 * packing and waking its own threads (which compete with ours), while a row-at-a-time
 * update keeps the row, the r values of scale * L(i, :) and VEC columns of the sum in cache
 * and registers, and fuses the widening and rounding of BF16 rows into the same pass (F16
 * rows go through the scalar converters). Each element is summed in f32 as
 * base + l_0 R(0, j) + l_1 R(1, j) + ... in that order.
 */
#include "kernels/cpu/lora_merge.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/atomics.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/plan_exec.h"
#include "model/config.h"

/* Products and sums stay separate roundings on every compiler and clone (see CLONES): GCC
 * in -std=c11 mode never contracts them, Clang needs telling. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

#define VEC 64                /* columns of a row updated together, in registers */
#define MIN_GRAIN (1u << 18)  /* destination elements (~0.2 ms at r 16): smaller items cost
                               * more in thread start-up than they win */
#define ITEMS_PER_THREAD 8    /* items per thread, so uneven merges still balance */

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

/* Per-thread scratch, sized for the largest merge. */
typedef struct row_scratch {
    float *acc;   /* one F16 destination row widened to f32 */
    float *l;     /* scale * L(i, :) */
    float *rpack; /* R packed row-major [rank, cols] when it is stored transposed */
} row_scratch;

/* Work item: rows [row0, row0 + rows) of merge `merge`. */
typedef struct merge_item {
    uint64_t merge, row0, rows;
} merge_item;

typedef struct merge_ctx {
    const rlb_plan *plan;
    void *const *dst;
    const uint8_t *stage;
    const merge_item *items;
    uint64_t n_items;
    uint64_t next;         /* next unclaimed item; claimed with rlb_fetch_add */
    uint64_t max_cols;     /* scratch sizes */
    uint64_t max_rank;
} merge_ctx;

/* 16 floats: GCC / Clang vector extensions, lowered to zmm, ymm pairs or xmm quads by the
 * clone being compiled; memcpy does the unaligned loads and stores. */
typedef float vf16 __attribute__((vector_size(64)));
_Static_assert(VEC == 64, "update_row holds VEC columns in four 16-float accumulators");

/* row[0..n) += sum_k l[k] * R[k * ldr + 0..n) for a row of F32 (bf16 = 0) or BF16
 * (bf16 = 1) elements, VEC columns at a time, held in four independent vector
 * accumulators through the rank loop (so the adds do not wait on each other), then rounded back (round to nearest even, as kernels/cpu/convert.h). Inlined
 * into one clone per instruction set below. */
static inline __attribute__((always_inline)) void update_row(uint8_t *row, int bf16,
                                                            const float *restrict l,
                                                            const float *restrict R,
                                                            uint64_t ldr, uint64_t r,
                                                            uint64_t n)
{
    uint64_t j = 0;
    for (; j + VEC <= n; j += VEC) {
        float f[VEC];
        uint16_t h[VEC];
        if (bf16) {
            memcpy(h, row + 2 * j, sizeof h);
            for (int v = 0; v < VEC; v++)
                f[v] = rlb__bf16_to_f32(h[v]);
        } else {
            memcpy(f, row + 4 * j, sizeof f);
        }
        vf16 a0, a1, a2, a3, x0, x1, x2, x3;
        memcpy(&a0, f, 64);
        memcpy(&a1, f + 16, 64);
        memcpy(&a2, f + 32, 64);
        memcpy(&a3, f + 48, 64);
        for (uint64_t k = 0; k < r; k++) {
            const float *rk = R + k * ldr + j;
            memcpy(&x0, rk, 64);
            memcpy(&x1, rk + 16, 64);
            memcpy(&x2, rk + 32, 64);
            memcpy(&x3, rk + 48, 64);
            a0 += l[k] * x0;
            a1 += l[k] * x1;
            a2 += l[k] * x2;
            a3 += l[k] * x3;
        }
        memcpy(f, &a0, 64);
        memcpy(f + 16, &a1, 64);
        memcpy(f + 32, &a2, 64);
        memcpy(f + 48, &a3, 64);
        if (bf16) {
            for (int v = 0; v < VEC; v++)
                h[v] = rlb__f32_to_bf16(f[v]);
            memcpy(row + 2 * j, h, sizeof h);
        } else {
            memcpy(row + 4 * j, f, sizeof f);
        }
    }
    for (; j < n; j++) {
        float a;
        uint16_t h;
        if (bf16) {
            memcpy(&h, row + 2 * j, 2);
            a = rlb__bf16_to_f32(h);
        } else {
            memcpy(&a, row + 4 * j, 4);
        }
        for (uint64_t k = 0; k < r; k++)
            a += l[k] * R[k * ldr + j];
        if (bf16) {
            h = rlb__f32_to_bf16(a);
            memcpy(row + 2 * j, &h, 2);
        } else {
            memcpy(row + 4 * j, &a, 4);
        }
    }
}

/* The ifunc clones: the widest vectors the CPU has, chosen once at load. Every clone adds
 * the same products in the same order without contracting them into FMAs (see the pragma
 * above), so all give the same bits. Sanitizer builds take the baseline only: an
 * ifunc resolver runs before the sanitizer runtime is up. */
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define RLB_NO_CLONES 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || defined(RLB_NO_CLONES) || \
    !defined(__x86_64__)
#define CLONES
#else
#define CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#endif

CLONES static void update_row_f32(uint8_t *row, const float *l, const float *R, uint64_t ldr,
                                  uint64_t r, uint64_t n)
{
    update_row(row, 0, l, R, ldr, r, n);
}

CLONES static void update_row_bf16(uint8_t *row, const float *l, const float *R, uint64_t ldr,
                                   uint64_t r, uint64_t n)
{
    update_row(row, 1, l, R, ldr, r, n);
}

/* Rows [i0, i1) of merge m: each destination row is read once (widened unless it is F32),
 * gets its rank-r update and is written once (rounded to the destination dtype). */
static void merge_rows(const rlb_merge_op *m, uint8_t *dst, const uint8_t *stage,
                       uint64_t i0, uint64_t i1, row_scratch *w)
{
    const float *L = (const float *)(const void *)(stage + m->l_offset);
    const float *R = (const float *)(const void *)(stage + m->r_offset);
    uint64_t n = m->cols, r = m->rank, ldr = m->r_ld;
    if (m->flags & RLB_MERGE_R_TRANS) {
        for (uint64_t k = 0; k < r; k++)
            for (uint64_t j = 0; j < n; j++)
                w->rpack[k * n + j] = R[j * ldr + k];
        R = w->rpack;
        ldr = n;
    }
    int ltrans = (m->flags & RLB_MERGE_L_TRANS) != 0;
    uint8_t *c = dst + m->dst_offset;
    for (uint64_t i = i0; i < i1; i++) {
        uint8_t *row = c + i * m->dst_stride;
        for (uint64_t k = 0; k < r; k++)
            w->l[k] = m->scale * (ltrans ? L[k * m->l_ld + i] : L[i * m->l_ld + k]);
        if (m->dst_dtype == RLB_DTYPE_F32) {
            update_row_f32(row, w->l, R, ldr, r, n);
        } else if (m->dst_dtype == RLB_DTYPE_BF16) {
            update_row_bf16(row, w->l, R, ldr, r, n);
        } else { /* F16: widen, update, round, through the scalar converters */
            rlb__row_to_f32(w->acc, row, n, m->dst_dtype);
            update_row_f32((uint8_t *)w->acc, w->l, R, ldr, r, n);
            rlb__row_from_f32(row, w->acc, n, m->dst_dtype);
        }
    }
}

static void *merge_worker(void *arg)
{
    merge_ctx *c = arg;
    row_scratch w = {malloc(c->max_cols * sizeof(float) + 1), malloc(c->max_rank * sizeof(float) + 1),
                 malloc(c->max_rank * c->max_cols * sizeof(float) + 1)};
    /* Without scratch this thread leaves the items to the others (run_merges notices when
     * none could take them). */
    if (w.acc && w.l && w.rpack) {
        for (;;) {
            uint64_t i = rlb_fetch_add(&c->next, 1);
            if (i >= c->n_items)
                break;
            const merge_item *it = &c->items[i];
            const rlb_merge_op *m = &c->plan->merges[it->merge];
            merge_rows(m, c->dst[m->dst_ref], c->stage, it->row0, it->row0 + it->rows, &w);
        }
    }
    free(w.acc);
    free(w.l);
    free(w.rpack);
    return NULL;
}

/* Cuts the merges into items of about `grain` destination elements. With items == NULL
 * only counts them. */
static uint64_t split_merges(const rlb_plan *plan, uint64_t grain, merge_item *items)
{
    uint64_t n = 0;
    for (uint64_t i = 0; i < plan->n_merges; i++) {
        const rlb_merge_op *m = &plan->merges[i];
        uint64_t step = grain / m->cols ? grain / m->cols : 1;
        for (uint64_t r = 0; r < m->rows; r += step, n++)
            if (items)
                items[n] = (merge_item){i, r, m->rows - r < step ? m->rows - r : step};
    }
    return n;
}

/* Runs every merge on `threads` threads (this one included). Returns 0 or RLB_ENOMEM. */
static int run_merges(const rlb_plan *plan, void *const *dst, const uint8_t *stage,
                      int threads)
{
    merge_ctx c = {.plan = plan, .dst = dst, .stage = stage};
    uint64_t total = 0;
    for (uint64_t i = 0; i < plan->n_merges; i++) {
        const rlb_merge_op *m = &plan->merges[i];
        c.max_cols = m->cols > c.max_cols ? m->cols : c.max_cols;
        c.max_rank = m->rank > c.max_rank ? m->rank : c.max_rank;
        total += m->rows * m->cols;
    }
    int n_threads = rlb__exec_threads(threads);
    uint64_t grain = total / ((uint64_t)n_threads * ITEMS_PER_THREAD);
    grain = grain < MIN_GRAIN ? MIN_GRAIN : grain;
    c.n_items = split_merges(plan, grain, NULL);
    merge_item *items = malloc(c.n_items * sizeof(*items) + 1);
    if (!items)
        return RLB_ENOMEM;
    split_merges(plan, grain, items);
    c.items = items;
    if ((uint64_t)n_threads > c.n_items)
        n_threads = c.n_items ? (int)c.n_items : 1;
    pthread_t tid[64];
    int started = 0;
    for (; started < n_threads - 1 && started < 64; started++)
        if (pthread_create(&tid[started], NULL, merge_worker, &c) != 0)
            break; /* fewer helpers only means slower */
    merge_worker(&c);
    for (int i = 0; i < started; i++)
        pthread_join(tid[i], NULL);
    free(items);
    /* Items are left only when every thread lacked memory for its scratch. */
    return c.next < c.n_items ? RLB_ENOMEM : 0;
}

void rlb__exec_scratch_free(rlb_exec_scratch *scratch)
{
    free(scratch->stage);
    *scratch = (rlb_exec_scratch){0};
}

/* Makes s->stage hold at least `bytes`. Returns 0 or RLB_ENOMEM (s keeps what it had). */
static int stage_fit(rlb_exec_scratch *s, uint64_t bytes)
{
    if (s->stage && s->stage_bytes >= bytes)
        return 0;
    uint64_t size = (bytes + 63) / 64 * 64 + 64; /* aligned_alloc wants a multiple of 64 */
    void *stage = aligned_alloc(64, (size_t)size);
    if (!stage)
        return RLB_ENOMEM;
    free(s->stage);
    *s = (rlb_exec_scratch){stage, size};
    return 0;
}

int rlb__lora_merge_cpu(const rlb_plan *plan, const void *const *src, const uint64_t *src_len,
                        void *const *dst, rlb_exec_scratch *scratch, int threads, char *err,
                        size_t errlen)
{
    if (!plan->n_merges && !plan->n_stage_ops)
        return 0;
    rlb_exec_scratch own = {0};
    rlb_exec_scratch *s = scratch ? scratch : &own;
    uint64_t stage_bytes = plan->stage_bytes;
    uint64_t first[2] = {0, plan->n_stage_ops};
    int rc = stage_fit(s, stage_bytes);
    if (rc < 0) {
        rlb__model_err(err, errlen, rc, "plan exec: no memory for the adapter stage");
        goto out;
    }
    rlb_plan gather = {.n_src = plan->n_src, .n_dst = 1, .src_bytes = (uint64_t *)src_len,
                       .dst_bytes = &stage_bytes, .dst_first_op = first,
                       .n_ops = plan->n_stage_ops, .ops = plan->stage_ops,
                       .bytes_written = stage_bytes};
    rc = rlb__plan_exec_cpu(&gather, src, src_len, &s->stage, &stage_bytes, threads, err,
                            errlen);
    if (rc == 0 && (rc = run_merges(plan, dst, s->stage, threads)) < 0)
        rlb__model_err(err, errlen, rc, "plan exec: no memory for the merges");
out:
    rlb__exec_scratch_free(&own);
    return rc;
}
