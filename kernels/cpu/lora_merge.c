/* lora_merge.c: the CPU LoRA merge (see lora_merge.h).
 *
 * The stage is one aligned f32 block per run, filled by running the plan's stage ops as a
 * plan of their own (one destination: the stage), so the gathers get the copy executor's
 * threads and conversions. The merges are then cut into items of whole rows, which threads
 * claim through one counter as the copy executor's do. An item builds its rows in an f32
 * buffer: the parts of the merge's base copies that land in those rows (sliced by
 * destination bytes: a merge's block is whole rows, so its rows are one byte range),
 * widened from the source dtype; then each row's rank-r update; then one rounding into the
 * destination. Items write disjoint rows, and join publishes them.
 *
 * The update is not a BLAS call: with r small (8..64), a GEMM library spends its time
 * packing and waking its own threads (which compete with ours), while a row-at-a-time
 * update keeps the row, the r values of scale * L(i, :) and VEC columns of the sum in cache
 * and registers. Each element is summed in f32 as base + l_0 R(0, j) + l_1 R(1, j) + ...
 * in that order.
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
    if ((plan->n_stage_ops && !plan->stage_ops) || (plan->n_merges && !plan->merges) ||
        (plan->n_merge_copies && !plan->merge_copies))
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
        int rc = rlb__plan_check_merge(plan, i, src_len, dst_len, err, errlen);
        if (rc)
            return rc;
    }
    return 0;
}

/* Per-thread scratch, sized for the largest item. */
typedef struct row_scratch {
    float *acc;   /* the item's rows in f32 */
    float *l;     /* scale * L(i, :) */
    float *rpack; /* R packed row-major [rank, cols] when it is stored transposed */
} row_scratch;

/* Work item: rows [row0, row0 + rows) of merge `merge`. */
typedef struct merge_item {
    uint64_t merge, row0, rows;
} merge_item;

typedef struct merge_ctx {
    const rlb_plan *plan;
    const void *const *src;
    void *const *dst;
    const uint8_t *stage;
    const merge_item *items;
    uint64_t n_items;
    uint64_t next;       /* next unclaimed item; claimed with rlb_fetch_add */
    uint64_t max_elems;  /* scratch sizes: largest item, widest R, highest rank */
    uint64_t max_cols;
    uint64_t max_rank;
    uint64_t *nonfinite; /* [n_merges] non-finite values each merge wrote, or NULL */
} merge_ctx;

/* 16 floats: GCC / Clang vector extensions, lowered to zmm, ymm pairs or xmm quads by the
 * clone being compiled; memcpy does the unaligned loads and stores. */
typedef float vf16 __attribute__((vector_size(64)));
_Static_assert(VEC == 64, "update_row holds VEC columns in four 16-float accumulators");

/* The ifunc clones: the widest vectors the CPU has, chosen once at load. Every clone adds
 * the same products in the same order without contracting them into FMAs (see the pragma
 * above), so all give the same bits. Sanitizer builds take the baseline only: an ifunc
 * resolver runs before the sanitizer runtime is up. */
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

/* row[0..n) += sum_k l[k] * R[k * ldr + 0..n), VEC columns at a time held in four
 * independent vector accumulators through the rank loop (so the adds do not wait on each
 * other). */
CLONES static void update_row(float *restrict row, const float *restrict l,
                              const float *restrict R, uint64_t ldr, uint64_t r, uint64_t n)
{
    uint64_t j = 0;
    for (; j + VEC <= n; j += VEC) {
        vf16 a0, a1, a2, a3, x0, x1, x2, x3;
        memcpy(&a0, row + j, 64);
        memcpy(&a1, row + j + 16, 64);
        memcpy(&a2, row + j + 32, 64);
        memcpy(&a3, row + j + 48, 64);
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
        memcpy(row + j, &a0, 64);
        memcpy(row + j + 16, &a1, 64);
        memcpy(row + j + 32, &a2, 64);
        memcpy(row + j + 48, &a3, 64);
    }
    for (; j < n; j++) {
        float a = row[j];
        for (uint64_t k = 0; k < r; k++)
            a += l[k] * R[k * ldr + j];
        row[j] = a;
    }
}

/* n elements of dtype at s -> f32 (exact). BF16 in fixed blocks that vectorize. */
CLONES static void widen(float *restrict out, const uint8_t *restrict s, uint64_t n,
                         uint8_t dtype)
{
    uint64_t i = 0;
    if (dtype == RLB_DTYPE_BF16)
        for (; i + VEC <= n; i += VEC) {
            uint16_t h[VEC];
            memcpy(h, s + 2 * i, sizeof h);
            for (int v = 0; v < VEC; v++)
                out[i + v] = rlb__bf16_to_f32(h[v]);
        }
    rlb__row_to_f32(out + i, s + i * rlb_dtype_size((rlb_dtype)dtype), n - i, dtype);
}

/* n f32 values -> dtype elements at d, rounded to nearest even (kernels/cpu/convert.h).
 * BF16 in fixed blocks that vectorize. */
CLONES static void narrow(uint8_t *restrict d, const float *restrict in, uint64_t n,
                          uint8_t dtype)
{
    uint64_t i = 0;
    if (dtype == RLB_DTYPE_BF16)
        for (; i + VEC <= n; i += VEC) {
            uint16_t h[VEC];
            for (int v = 0; v < VEC; v++)
                h[v] = rlb__f32_to_bf16(in[i + v]);
            memcpy(d + 2 * i, h, sizeof h);
        }
    rlb__row_from_f32(d + i * rlb_dtype_size((rlb_dtype)dtype), in + i, n - i, dtype);
}

/* Widens into acc the bytes [b0, b1) of the destination that copy op writes (acc[0] is
 * byte b0; destination elements of des bytes). */
static void widen_slice(float *acc, const rlb_copy_op *op, const void *const *src,
                        uint64_t b0, uint64_t b1, uint64_t des)
{
    uint64_t rb = op->row_elems * des, off = op->dst_offset, s = op->dst_stride;
    uint64_t ses = rlb_dtype_size((rlb_dtype)op->src_dtype);
    if (b1 <= off)
        return;
    /* Op rows r with off + r*s + rb > b0 and off + r*s < b1 (rows are s >= rb apart). */
    uint64_t r0 = b0 < off + rb ? 0 : (s ? (b0 - off - rb) / s + 1 : op->rows);
    uint64_t r1 = op->rows == 1 ? 1 : (b1 - off + s - 1) / s;
    r1 = r1 < op->rows ? r1 : op->rows;
    for (uint64_t r = r0; r < r1; r++) {
        uint64_t a = off + r * s;
        uint64_t x0 = a > b0 ? a : b0, x1 = a + rb < b1 ? a + rb : b1;
        if (x0 >= x1)
            continue;
        const uint8_t *sp = (const uint8_t *)src[op->src_ref] + op->src_offset +
                            r * op->src_stride + (x0 - a) / des * ses;
        widen(acc + (x0 - b0) / des, sp, (x1 - x0) / des, op->src_dtype);
    }
}

/* Rows [i0, i1) of merge m: base from its copies, plus the rank-r update, written once.
 * Returns the non-finite values written when the run counts them (else 0). */
static uint64_t merge_rows(const merge_ctx *c, const rlb_merge_op *m, uint64_t i0, uint64_t i1,
                       row_scratch *w)
{
    const float *L = (const float *)(const void *)(c->stage + m->l_offset);
    const float *R = (const float *)(const void *)(c->stage + m->r_offset);
    uint64_t n = m->cols, r = m->rank, ldr = m->r_ld;
    uint64_t des = rlb_dtype_size((rlb_dtype)m->dst_dtype), row_bytes = n * des;
    if (m->flags & RLB_MERGE_R_TRANS) {
        for (uint64_t k = 0; k < r; k++)
            for (uint64_t j = 0; j < n; j++)
                w->rpack[k * n + j] = R[j * ldr + k];
        R = w->rpack;
        ldr = n;
    }
    /* The block is whole rows, row_bytes apart: rows [i0, i1) are bytes [b0, b1). */
    uint64_t b0 = m->dst_offset + i0 * row_bytes, b1 = m->dst_offset + i1 * row_bytes;
    memset(w->acc, 0, (i1 - i0) * n * sizeof(float));
    for (uint64_t k = m->copy_first; k < m->copy_first + m->n_copies; k++)
        widen_slice(w->acc, &c->plan->merge_copies[k], c->src, b0, b1, des);
    int ltrans = (m->flags & RLB_MERGE_L_TRANS) != 0;
    for (uint64_t i = i0; i < i1; i++) {
        for (uint64_t k = 0; k < r; k++)
            w->l[k] = m->scale * (ltrans ? L[k * m->l_ld + i] : L[i * m->l_ld + k]);
        update_row(w->acc + (i - i0) * n, w->l, R, ldr, r, n);
    }
    uint8_t *d = (uint8_t *)c->dst[m->dst_ref] + b0;
    narrow(d, w->acc, (i1 - i0) * n, m->dst_dtype);
    /* Counted from the rounded bytes (a finite f32 may overflow the destination dtype). */
    return c->nonfinite ? rlb__row_nonfinite(d, (i1 - i0) * n, m->dst_dtype) : 0;
}

static void *merge_worker(void *arg)
{
    merge_ctx *c = arg;
    row_scratch w = {malloc(c->max_elems * sizeof(float) + 1),
                     malloc(c->max_rank * sizeof(float) + 1),
                     malloc(c->max_rank * c->max_cols * sizeof(float) + 1)};
    /* Without scratch this thread leaves the items to the others (run_merges notices when
     * none could take them). */
    if (w.acc && w.l && w.rpack) {
        for (;;) {
            uint64_t i = rlb_fetch_add(&c->next, 1);
            if (i >= c->n_items)
                break;
            const merge_item *it = &c->items[i];
            uint64_t bad = merge_rows(c, &c->plan->merges[it->merge], it->row0,
                                      it->row0 + it->rows, &w);
            if (bad)
                rlb_fetch_add(&c->nonfinite[it->merge], bad);
        }
    }
    free(w.acc);
    free(w.l);
    free(w.rpack);
    return NULL;
}

/* Cuts the merges into items of about `grain` destination elements (whole rows). With
 * items == NULL only counts them. */
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

/* Runs every merge on `threads` threads (this one included), counting into nonfinite when
 * it is not NULL. Returns 0 or RLB_ENOMEM. */
static int run_merges(const rlb_plan *plan, const void *const *src, void *const *dst,
                      const uint8_t *stage, int threads, uint64_t *nonfinite)
{
    merge_ctx c = {.plan = plan, .src = src, .dst = dst, .stage = stage,
                   .nonfinite = nonfinite};
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
    for (uint64_t i = 0; i < c.n_items; i++) {
        uint64_t e = items[i].rows * plan->merges[items[i].merge].cols;
        c.max_elems = e > c.max_elems ? e : c.max_elems;
    }
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
                        void *const *dst, rlb_exec_scratch *scratch, int threads,
                        uint64_t *nonfinite, char *err, size_t errlen)
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
    if (rc == 0 && (rc = run_merges(plan, src, dst, s->stage, threads, nonfinite)) < 0)
        rlb__model_err(err, errlen, rc, "plan exec: no memory for the merges");
out:
    rlb__exec_scratch_free(&own);
    return rc;
}
