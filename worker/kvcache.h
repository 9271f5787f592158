/* kvcache.h: the paged KV cache of one TP rank (vLLM's PagedAttention memory model).
 *
 * Memory is cut into blocks of `block_tokens` token slots; a block holds, for every layer,
 * the keys and values of this rank's kvt kv heads: k and v are each
 * [n_blocks][n_layers][kvt][block_tokens][hd] elements. A sequence owns a block table (the
 * ids of its blocks in position order): position p lives in block table[p / block_tokens],
 * slot p % block_tokens. Free blocks sit on a stack. The number of blocks comes from a
 * byte budget. Blocks carry a reference count so the samples of one prompt share its full
 * blocks (rlb__kv_fork).
 *
 * Allocation is all-or-nothing: rlb__kv_reserve either extends a table to cover the asked
 * positions or changes nothing and returns RLB_EAGAIN, so the scheduler can wait or
 * preempt; a sequence's cache is never partially overwritten or silently cut.
 * rlb__kv_sleep frees the storage (every block must be free); rlb__kv_wake allocates it
 * again with the same geometry.
 *
 * The storage comes from the engine backend (worker/ebackend.h, rlb_kv_mem): host float32
 * for the CPU backend, device memory of the compute dtype for CUDA. This file never reads
 * or writes the elements itself; it only hands out block ids and asks the backend to copy
 * a block for a fork.
 */
#ifndef RLB_WORKER_KVCACHE_H
#define RLB_WORKER_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "worker/ebackend.h"

typedef struct rlb_kvcache {
    int64_t n_layers;     /* decoder layers */
    int64_t kvt;          /* kv heads on this rank */
    int64_t hd;           /* head dim */
    int64_t block_tokens; /* token slots per block */
    int64_t n_blocks;     /* blocks in the pool */
    int64_t block_floats; /* elements of k (or v) per block and layer: kvt * block_tokens * hd */
    rlb_kv_mem mem;       /* where the storage comes from */
    void *k;              /* [n_blocks][n_layers][block_floats] elements; NULL while asleep */
    void *v;              /* same shape as k */
    int32_t *free_stack;  /* [n_blocks] ids of free blocks, n_free of them */
    int64_t n_free;       /* free blocks */
    int32_t *refs;        /* [n_blocks] tables holding each block */
} rlb_kvcache;

/* The blocks a sequence owns, in position order. */
typedef struct rlb_block_table {
    int32_t *ids;  /* [cap] block ids */
    int64_t n;     /* blocks in use */
    int64_t cap;   /* allocated entries */
} rlb_block_table;

/* Bytes one block of float32 elements takes (k and v, all layers). */
uint64_t rlb__kv_block_bytes(int64_t n_layers, int64_t kvt, int64_t hd, int64_t block_tokens);
/* Sets up a pool of floor(budget / block bytes) blocks of float32 in host memory. Returns
 * 0, RLB_EINVAL (a size < 1) RLB_ETOOBIG (the budget holds no block) or RLB_ENOMEM. */
int rlb__kv_init(rlb_kvcache *kv, int64_t n_layers, int64_t kvt, int64_t hd,
                 int64_t block_tokens, uint64_t budget_bytes);
/* The same with the storage (and its element size) from `mem`, e.g. a backend's
 * kv_mem(). */
int rlb__kv_init_mem(rlb_kvcache *kv, int64_t n_layers, int64_t kvt, int64_t hd,
                     int64_t block_tokens, uint64_t budget_bytes, const rlb_kv_mem *mem);
/* Host float32 storage (malloc), the CPU backend's and rlb__kv_init's. */
rlb_kv_mem rlb__kv_host_mem(void);
/* Bytes of one block of this cache (k and v, all layers). */
uint64_t rlb__kv_bytes_per_block(const rlb_kvcache *kv);
void rlb__kv_free(rlb_kvcache *kv);
/* Frees k/v storage; every block must be free (RLB_EINVAL otherwise). Returns 0. */
int rlb__kv_sleep(rlb_kvcache *kv);
/* Allocates the storage again (no-op when awake). Returns 0 or RLB_ENOMEM. */
int rlb__kv_wake(rlb_kvcache *kv);

/* Blocks needed to hold `tokens` positions. */
int64_t rlb__kv_blocks_for(const rlb_kvcache *kv, int64_t tokens);
/* Extends `t` so it covers positions [0, tokens). Returns 0, RLB_EAGAIN (not enough free
 * blocks; nothing changed) or RLB_ENOMEM. */
int rlb__kv_reserve(rlb_kvcache *kv, rlb_block_table *t, int64_t tokens);
/* Makes the empty table `dst` hold positions [0, tokens) of `src`: the full blocks are
 * shared (nobody writes into a full block again), the partly filled last block is copied
 * into a fresh one that dst owns. Returns 0, RLB_EAGAIN (no free block for the copy;
 * nothing changed) or RLB_ENOMEM. */
int rlb__kv_fork(rlb_kvcache *kv, rlb_block_table *dst, const rlb_block_table *src,
                 int64_t tokens);
/* Drops the table's references (blocks no one holds return to the free stack) and empties
 * it; its array is kept for reuse. */
void rlb__kv_release(rlb_kvcache *kv, rlb_block_table *t);
void rlb__kv_table_free(rlb_block_table *t);

/* Keys / values of `block` in `layer`, [kvt][block_tokens][hd], of a float32 host cache
 * (the CPU backend's). */
static inline float *rlb__kv_k(const rlb_kvcache *kv, int32_t block, int64_t layer)
{
    return (float *)kv->k + ((int64_t)block * kv->n_layers + layer) * kv->block_floats;
}
static inline float *rlb__kv_v(const rlb_kvcache *kv, int32_t block, int64_t layer)
{
    return (float *)kv->v + ((int64_t)block * kv->n_layers + layer) * kv->block_floats;
}

#endif /* RLB_WORKER_KVCACHE_H */
