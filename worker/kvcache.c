/* kvcache.c: block pool, free stack, reference counts and block tables of the paged KV
 * cache (see kvcache.h). Check: tests/unit/test_engine_kv.c. */
#include "worker/kvcache.h"

#include <stdlib.h>
#include <string.h>

#include "rlb/rlb.h"

uint64_t rlb__kv_block_bytes(int64_t n_layers, int64_t kvt, int64_t hd, int64_t block_tokens)
{
    return 2u * (uint64_t)n_layers * (uint64_t)kvt * (uint64_t)block_tokens * (uint64_t)hd *
           sizeof(float);
}

/* Host float32 storage: what rlb__kv_init uses, and the CPU backend's kv_mem. */
static void *host_alloc(void *ctx, uint64_t bytes)
{
    void *p = NULL;
    /* 64-byte alignment: every block starts on a cache line (block_floats * 4 is a
     * multiple of 64 for the usual head dims, and nothing breaks when it is not). */
    return posix_memalign(&p, 64, bytes ? bytes : 64) ? NULL : p;
}

static void host_release(void *ctx, void *p, uint64_t bytes)
{
    free(p);
}

static int host_copy(void *ctx, void *dst, const void *src, uint64_t bytes)
{
    memcpy(dst, src, bytes);
    return 0;
}

rlb_kv_mem rlb__kv_host_mem(void)
{
    return (rlb_kv_mem){.alloc = host_alloc, .release = host_release, .copy = host_copy,
                        .elem_bytes = sizeof(float)};
}

static uint64_t storage_bytes(const rlb_kvcache *kv)
{
    return (uint64_t)kv->n_blocks * (uint64_t)kv->n_layers * (uint64_t)kv->block_floats *
           kv->mem.elem_bytes;
}

static void release_storage(rlb_kvcache *kv)
{
    if (kv->k)
        kv->mem.release(kv->mem.ctx, kv->k, storage_bytes(kv));
    if (kv->v)
        kv->mem.release(kv->mem.ctx, kv->v, storage_bytes(kv));
    kv->k = kv->v = NULL;
}

static int alloc_storage(rlb_kvcache *kv)
{
    kv->k = kv->mem.alloc(kv->mem.ctx, storage_bytes(kv));
    kv->v = kv->k ? kv->mem.alloc(kv->mem.ctx, storage_bytes(kv)) : NULL;
    if (!kv->v) {
        release_storage(kv);
        return RLB_ENOMEM;
    }
    return 0;
}

uint64_t rlb__kv_bytes_per_block(const rlb_kvcache *kv)
{
    return 2u * (uint64_t)kv->n_layers * (uint64_t)kv->block_floats * kv->mem.elem_bytes;
}

int rlb__kv_init(rlb_kvcache *kv, int64_t n_layers, int64_t kvt, int64_t hd,
                 int64_t block_tokens, uint64_t budget_bytes)
{
    rlb_kv_mem mem = rlb__kv_host_mem();
    return rlb__kv_init_mem(kv, n_layers, kvt, hd, block_tokens, budget_bytes, &mem);
}

int rlb__kv_init_mem(rlb_kvcache *kv, int64_t n_layers, int64_t kvt, int64_t hd,
                     int64_t block_tokens, uint64_t budget_bytes, const rlb_kv_mem *mem)
{
    memset(kv, 0, sizeof *kv);
    if (n_layers < 1 || kvt < 1 || hd < 1 || block_tokens < 1 || !mem || !mem->alloc ||
        !mem->release || !mem->copy || mem->elem_bytes == 0)
        return RLB_EINVAL;
    kv->mem = *mem;
    uint64_t per_block = 2u * (uint64_t)n_layers * (uint64_t)kvt * (uint64_t)block_tokens *
                         (uint64_t)hd * mem->elem_bytes;
    uint64_t n = budget_bytes / per_block;
    if (n < 1)
        return RLB_ETOOBIG;
    if (n > INT32_MAX)
        n = INT32_MAX;
    kv->n_layers = n_layers;
    kv->kvt = kvt;
    kv->hd = hd;
    kv->block_tokens = block_tokens;
    kv->n_blocks = (int64_t)n;
    kv->block_floats = kvt * block_tokens * hd;
    kv->free_stack = malloc((size_t)n * sizeof *kv->free_stack);
    kv->refs = calloc((size_t)n, sizeof *kv->refs);
    if (!kv->free_stack || !kv->refs || alloc_storage(kv)) {
        rlb__kv_free(kv);
        return RLB_ENOMEM;
    }
    /* Lowest ids on top of the stack, so a fresh cache hands out blocks 0, 1, 2, ... */
    for (int64_t i = 0; i < kv->n_blocks; i++)
        kv->free_stack[i] = (int32_t)(kv->n_blocks - 1 - i);
    kv->n_free = kv->n_blocks;
    return 0;
}

void rlb__kv_free(rlb_kvcache *kv)
{
    release_storage(kv);
    free(kv->free_stack);
    free(kv->refs);
    memset(kv, 0, sizeof *kv);
}

int rlb__kv_sleep(rlb_kvcache *kv)
{
    if (kv->n_free != kv->n_blocks)
        return RLB_EINVAL;
    release_storage(kv);
    return 0;
}

int rlb__kv_wake(rlb_kvcache *kv)
{
    return kv->k ? 0 : alloc_storage(kv);
}

int64_t rlb__kv_blocks_for(const rlb_kvcache *kv, int64_t tokens)
{
    return (tokens + kv->block_tokens - 1) / kv->block_tokens;
}

static int table_grow(rlb_block_table *t, int64_t need)
{
    if (t->cap >= need)
        return 0;
    int64_t cap = t->cap ? t->cap : 4;
    while (cap < need)
        cap *= 2;
    int32_t *ids = realloc(t->ids, (size_t)cap * sizeof *ids);
    if (!ids)
        return RLB_ENOMEM;
    t->ids = ids;
    t->cap = cap;
    return 0;
}

static int32_t pop_free(rlb_kvcache *kv)
{
    int32_t id = kv->free_stack[--kv->n_free];
    kv->refs[id] = 1;
    return id;
}

int rlb__kv_reserve(rlb_kvcache *kv, rlb_block_table *t, int64_t tokens)
{
    int64_t need = rlb__kv_blocks_for(kv, tokens);
    if (need <= t->n)
        return 0;
    if (need - t->n > kv->n_free)
        return RLB_EAGAIN;
    if (table_grow(t, need))
        return RLB_ENOMEM;
    while (t->n < need)
        t->ids[t->n++] = pop_free(kv);
    return 0;
}

int rlb__kv_fork(rlb_kvcache *kv, rlb_block_table *dst, const rlb_block_table *src,
                 int64_t tokens)
{
    int64_t full = tokens / kv->block_tokens;
    int partial = tokens % kv->block_tokens != 0;
    if (partial && kv->n_free < 1)
        return RLB_EAGAIN;
    if (table_grow(dst, full + partial))
        return RLB_ENOMEM;
    for (int64_t i = 0; i < full; i++) {
        dst->ids[i] = src->ids[i];
        kv->refs[src->ids[i]]++;
    }
    dst->n = full;
    if (partial) {
        int32_t from = src->ids[full], to = pop_free(kv);
        uint64_t bytes = (uint64_t)kv->n_layers * (uint64_t)kv->block_floats * kv->mem.elem_bytes;
        char *k = kv->k, *v = kv->v;
        int rc = kv->mem.copy(kv->mem.ctx, k + (uint64_t)to * bytes, k + (uint64_t)from * bytes,
                              bytes);
        if (!rc)
            rc = kv->mem.copy(kv->mem.ctx, v + (uint64_t)to * bytes, v + (uint64_t)from * bytes,
                              bytes);
        if (rc) {
            kv->refs[to] = 0;
            kv->free_stack[kv->n_free++] = to;
            rlb__kv_release(kv, dst);
            return rc;
        }
        dst->ids[dst->n++] = to;
    }
    return 0;
}

void rlb__kv_release(rlb_kvcache *kv, rlb_block_table *t)
{
    for (int64_t i = 0; i < t->n; i++)
        if (--kv->refs[t->ids[i]] == 0)
            kv->free_stack[kv->n_free++] = t->ids[i];
    t->n = 0;
}

void rlb__kv_table_free(rlb_block_table *t)
{
    free(t->ids);
    memset(t, 0, sizeof *t);
}
