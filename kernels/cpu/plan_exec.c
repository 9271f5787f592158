/* plan_exec.c: the CPU reshard executor (see plan_exec.h).
 *
 * The ops are cut into work items of about `grain` destination bytes (an op's rows, or
 * the elements of a one-row op, in slices) before any thread starts; threads then claim
 * items through one shared counter until none are left. Items write disjoint destination
 * bytes because the plan's ops do, so threads need no other synchronization: thread
 * creation publishes the item list and join publishes the written bytes.
 *
 * Conversions go through a small f32 block: src elements -> f32 (exact for bf16 / f16),
 * then f32 -> dst with the round-to-nearest-even of convert.h, one rounding in all. Loads
 * and stores use memcpy because source offsets need not be aligned.
 *
 * Counting non-finite values (rlb__plan_exec_cpu_counted) is fused into the copy: each
 * block of at most BLOCK elements is written, then its destination bytes, still in L1, are
 * tested with an exponent mask, so no second pass over the buffers is made. A thread adds
 * an item's count to its op's counter with one atomic add per item, and only when the count
 * is not zero. LoRA merges count the same way, each block row range as it is rounded into
 * the destination (kernels/cpu/lora_merge.c).
 */
#include "kernels/cpu/plan_exec.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/atomics.h"
#include "common/env.h"
#include "common/log.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/lora_merge.h"
#include "model/config.h"

#define MAX_THREADS 64
#define MIN_GRAIN (1u << 20)  /* bytes: below this, splitting costs more than it wins */
#define ITEMS_PER_THREAD 8    /* slices per thread, so uneven ops still balance */
#define BLOCK 256             /* elements converted per f32 staging block */

typedef struct work_item {
    uint64_t op;    /* index into plan->ops */
    uint64_t row0;  /* first row of the op this item does */
    uint64_t rows;  /* rows it does */
    uint64_t elem0; /* first element within each row */
    uint64_t elems; /* elements per row it does */
} work_item;

typedef struct exec_ctx {
    const rlb_plan *plan;    /* the plan being run */
    const void *const *src;  /* [n_src] source bases */
    void *const *dst;        /* [n_dst] destination bases */
    const work_item *items;  /* all items, built before the threads start */
    uint64_t n_items;        /* entries in items[] */
    uint64_t next;           /* next unclaimed item; claimed with rlb_fetch_add */
    uint64_t *nonfinite;     /* [n_ops] non-finite values written per op, or NULL */
} exec_ctx;

/* Runs one item; returns the non-finite values it wrote (0 when not counting). */
static uint64_t run_item(const exec_ctx *c, const work_item *w)
{
    const rlb_copy_op *op = &c->plan->ops[w->op];
    uint64_t des = rlb_dtype_size((rlb_dtype)op->dst_dtype);
    uint8_t *d = (uint8_t *)c->dst[op->dst_ref] + op->dst_offset + w->row0 * op->dst_stride +
                 w->elem0 * des;
    if (op->src_ref == RLB_PLAN_ZERO_SRC) {
        for (uint64_t r = 0; r < w->rows; r++)
            memset(d + r * op->dst_stride, 0, w->elems * des);
        return 0;
    }
    uint64_t ses = rlb_dtype_size((rlb_dtype)op->src_dtype), bad = 0;
    const uint8_t *s = (const uint8_t *)c->src[op->src_ref] + op->src_offset +
                       w->row0 * op->src_stride + w->elem0 * ses;
    for (uint64_t r = 0; r < w->rows; r++) {
        const uint8_t *sr = s + r * op->src_stride;
        uint8_t *dr = d + r * op->dst_stride;
        if (op->src_dtype == op->dst_dtype && !c->nonfinite) {
            memcpy(dr, sr, w->elems * des);
            continue;
        }
        float block[BLOCK];
        for (uint64_t e = 0; e < w->elems; e += BLOCK) {
            uint64_t n = w->elems - e < BLOCK ? w->elems - e : BLOCK;
            if (op->src_dtype == op->dst_dtype) {
                memcpy(dr + e * des, sr + e * ses, n * des);
            } else {
                rlb__row_to_f32(block, sr + e * ses, n, op->src_dtype);
                rlb__row_from_f32(dr + e * des, block, n, op->dst_dtype);
            }
            if (c->nonfinite)
                bad += rlb__row_nonfinite(dr + e * des, n, op->dst_dtype);
        }
    }
    return bad;
}

static void *worker(void *arg)
{
    exec_ctx *c = arg;
    for (;;) {
        uint64_t i = rlb_fetch_add(&c->next, 1);
        if (i >= c->n_items)
            return NULL;
        uint64_t bad = run_item(c, &c->items[i]);
        if (bad)
            rlb_fetch_add(&c->nonfinite[c->items[i].op], bad);
    }
}

/* Cuts the plan into items of about `grain` destination bytes. With items == NULL only
 * counts them. Returns the number of items. */
static uint64_t split(const rlb_plan *plan, uint64_t grain, work_item *items)
{
    uint64_t n = 0;
    for (uint64_t i = 0; i < plan->n_ops; i++) {
        const rlb_copy_op *op = &plan->ops[i];
        uint64_t des = rlb_dtype_size((rlb_dtype)op->dst_dtype);
        uint64_t row_bytes = op->row_elems * des;
        if (op->rows > 1) {
            uint64_t step = grain / row_bytes ? grain / row_bytes : 1; /* rows per item */
            for (uint64_t r = 0; r < op->rows; r += step, n++)
                if (items)
                    items[n] = (work_item){i, r, op->rows - r < step ? op->rows - r : step, 0,
                                           op->row_elems};
        } else {
            uint64_t step = grain / des; /* elements per item */
            for (uint64_t e = 0; e < op->row_elems; e += step, n++)
                if (items)
                    items[n] = (work_item){i, 0, 1, e,
                                           op->row_elems - e < step ? op->row_elems - e : step};
        }
    }
    return n;
}

int rlb__exec_threads(int threads)
{
    long long n = threads > 0 ? threads : rlb__env_int(RLB_KNOB_THREADS);
    if (n <= 0)
        n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : (int)n;
}

static int check_bindings(const rlb_plan *plan, const void *const *src, const uint64_t *src_len,
                          void *const *dst, const uint64_t *dst_len, char *err, size_t errlen)
{
    if (!plan || (plan->n_ops && !plan->ops) || (plan->n_src && (!src || !src_len)) ||
        !dst || !dst_len)
        return rlb__model_err(err, errlen, RLB_EINVAL, "plan exec: NULL plan or buffer table");
    for (uint32_t i = 0; i < plan->n_src; i++)
        if (!src[i] && src_len[i])
            return rlb__model_err(err, errlen, RLB_EINVAL, "plan exec: source %u is NULL", i);
    for (uint32_t d = 0; d < plan->n_dst; d++)
        if (!dst[d] && dst_len[d])
            return rlb__model_err(err, errlen, RLB_EINVAL, "plan exec: destination %u is NULL",
                                  d);
    for (uint64_t i = 0; i < plan->n_ops; i++) {
        int rc = rlb__plan_check_op(&plan->ops[i], i, plan->n_src, src_len, plan->n_dst,
                                    dst_len, err, errlen);
        if (rc)
            return rc;
    }
    return rlb__lora_check_cpu(plan, src_len, dst_len, err, errlen);
}

int rlb__plan_exec_cpu(const rlb_plan *plan, const void *const *src, const uint64_t *src_len,
                       void *const *dst, const uint64_t *dst_len, int threads, char *err,
                       size_t errlen)
{
    return rlb__plan_exec_cpu_counted(plan, src, src_len, dst, dst_len, threads, NULL, NULL,
                                      err, errlen);
}

int rlb__plan_exec_cpu_counted(const rlb_plan *plan, const void *const *src,
                               const uint64_t *src_len, void *const *dst,
                               const uint64_t *dst_len, int threads, rlb_exec_scratch *scratch,
                               uint64_t *nonfinite, char *err, size_t errlen)
{
    int rc = check_bindings(plan, src, src_len, dst, dst_len, err, errlen);
    if (rc)
        return rc;
    int n_threads = rlb__exec_threads(threads);
    uint64_t grain = plan->bytes_written / ((uint64_t)n_threads * ITEMS_PER_THREAD);
    grain = grain < MIN_GRAIN ? MIN_GRAIN : grain;
    exec_ctx c = {.plan = plan, .src = src, .dst = dst, .n_items = split(plan, grain, NULL),
                  .nonfinite = nonfinite};
    if (nonfinite)
        memset(nonfinite, 0, (size_t)(plan->n_ops + plan->n_merges) * sizeof(*nonfinite));
    work_item *items = malloc((size_t)c.n_items * sizeof *items + 1);
    if (!items)
        return rlb__model_err(err, errlen, RLB_ENOMEM, "plan exec: out of memory");
    split(plan, grain, items);
    c.items = items;
    if ((uint64_t)n_threads > c.n_items)
        n_threads = c.n_items ? (int)c.n_items : 1;

    pthread_t tid[MAX_THREADS];
    int started = 0;
    for (; started < n_threads - 1; started++)
        if (pthread_create(&tid[started], NULL, worker, &c) != 0) {
            /* Fewer helpers only means slower: this thread does the rest. */
            RLB_LOG_WARN(RLB_SUB_PLAN, "plan exec: could only start %d of %d threads", started,
                         n_threads - 1);
            break;
        }
    worker(&c);
    for (int i = 0; i < started; i++)
        pthread_join(tid[i], NULL);
    free(items);
    /* The adapted weights' blocks, which the copies above left to their merges. */
    return rlb__lora_merge_cpu(plan, src, src_len, dst, scratch, threads,
                               nonfinite ? nonfinite + plan->n_ops : NULL, err, errlen);
}
