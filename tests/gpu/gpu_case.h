/* gpu_case.h: what the GPU tests share: the skip rule, a seeded generator, and one reshard
 * case (a model config, a source layout over host buffers of random bits, the planner's
 * plan) rebuilt identically from its seed in every process that needs it, so the three
 * processes of test_cuda_ipc agree on it without passing it around.
 *
 * A case places each parameter either whole in buffer 0 or FSDP2-sharded over W ranks
 * (rank f in buffer f + 1), each with its own dtype, at offsets that are element-aligned
 * but often not 16-byte aligned; the buffers hold random bits (NaN and subnormal patterns
 * included), so every conversion path runs on every kind of value.
 */
#ifndef RLB_TESTS_GPU_CASE_H
#define RLB_TESTS_GPU_CASE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "model/config.h"
#include "model/params.h"
#include "model/plan.h"
#include "model/source.h"
#include "model/tp_layout.h"

#define GC_MAX_W 8   /* FSDP ranks a case may have */
#define GC_POISON 0x5a /* byte every destination holds before a run */

/* Exit code of a test that cannot run here. */
#define GC_SKIP 77

/* A CUDA runtime call that must succeed, in a cmocka test. */
#define CHECK_CUDA(call) assert_int_equal((int)(call), (int)cudaSuccess)

/* 1 when a GPU is visible. Initializes CUDA in the calling process. */
static inline int gc_have_gpu(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

static inline uint64_t gc_rng(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull); /* splitmix64 */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [lo, hi]. */
static inline int64_t gc_rnd(uint64_t *s, int64_t lo, int64_t hi)
{
    return lo + (int64_t)(gc_rng(s) % (uint64_t)(hi - lo + 1));
}

static const rlb_dtype gc_float_dtypes[3] = {RLB_DTYPE_F32, RLB_DTYPE_BF16, RLB_DTYPE_F16};

typedef struct gc_case {
    rlb_model_config cfg;      /* the model */
    rlb_param_list pl;         /* its parameters */
    rlb_source src;            /* where they live */
    int W;                     /* FSDP ranks */
    int T, R;                  /* TP size, replicas */
    rlb_dtype dt;              /* destination dtype */
    uint32_t n_buf;            /* source buffers: W + 1 */
    uint64_t size[GC_MAX_W + 1]; /* bytes of each source buffer */
    uint8_t *mem[GC_MAX_W + 1];  /* host contents of each source buffer */
    rlb_plan plan;             /* the planner's plan */
} gc_case;

/* A small random model the planner accepts with some TP size. */
static inline void gc_random_config(rlb_model_config *c, uint64_t *s, int medium)
{
    static const int kv_choices[] = {1, 2, 4, 8};
    rlb__config_tiny(c);
    c->arch = gc_rng(s) % 2 ? RLB_ARCH_QWEN2 : RLB_ARCH_LLAMA;
    c->attn_bias = c->arch == RLB_ARCH_QWEN2;
    c->n_kv_heads = kv_choices[gc_rng(s) % 4];
    c->n_heads = c->n_kv_heads * gc_rnd(s, 1, 4);
    c->head_dim = medium ? 64 : 2 * gc_rnd(s, 1, 8);
    c->hidden = medium ? 8 * gc_rnd(s, 32, 96) : gc_rnd(s, 1, 70);
    c->intermediate = medium ? 64 * gc_rnd(s, 8, 40) : gc_rnd(s, 1, 90);
    c->n_layers = gc_rnd(s, 1, 3);
    c->vocab = medium ? gc_rnd(s, 1000, 3000) : gc_rnd(s, 1, 300);
    c->tie_embeddings = (int)(gc_rng(s) % 2);
}

/* Next placement of `bytes` in buffer b: element-aligned, 16-byte aligned only sometimes. */
static inline uint64_t gc_place(gc_case *g, uint32_t b, uint64_t bytes, uint64_t esz,
                                uint64_t *s)
{
    uint64_t off = (g->size[b] + 15) / 16 * 16 + esz * (uint64_t)gc_rnd(s, 0, 3) * (gc_rng(s) % 2);
    g->size[b] = off + bytes;
    return off;
}

/* Builds case `seed` (medium: larger shapes, for longer rows and more work items).
 * Returns 0 or the failing call's RLB_E* code with `err` saying why. */
static inline int gc_build(gc_case *g, uint64_t seed, int medium, char *err, size_t errlen)
{
    uint64_t s = seed;
    memset(g, 0, sizeof(*g));
    int rc;
    for (;;) { /* draw until some TP size > 1 fits, so the split paths run */
        gc_random_config(&g->cfg, &s, medium);
        int valid[3], n = 0;
        for (int T = 2; T <= 8; T *= 2)
            if (rlb__tp_check(&g->cfg, T, NULL, 0) == 0)
                valid[n++] = T;
        if (n) {
            g->T = valid[gc_rng(&s) % (uint64_t)n];
            break;
        }
    }
    g->R = (int)gc_rnd(&s, 1, 2);
    g->W = (int)gc_rnd(&s, 1, GC_MAX_W);
    g->dt = gc_float_dtypes[gc_rng(&s) % 3];
    g->n_buf = (uint32_t)g->W + 1;
    if ((rc = rlb__params_init(&g->pl, &g->cfg, err, errlen)))
        return rc;
    const int64_t np = g->pl.n;
    rlb_dtype *pdt = calloc((size_t)np, sizeof *pdt);
    uint8_t *fsdp = calloc((size_t)np, 1);
    rlb_src_loc *loc = calloc((size_t)np * GC_MAX_W, sizeof *loc);
    if (!pdt || !fsdp || !loc) {
        rc = RLB_ENOMEM;
        goto out;
    }
    for (int64_t p = 0; p < np; p++) { /* first pass: placements and buffer sizes */
        const rlb_param *pp = &g->pl.params[p];
        pdt[p] = gc_float_dtypes[gc_rng(&s) % 3];
        fsdp[p] = gc_rng(&s) % 4 != 0;
        uint64_t esz = rlb_dtype_size(pdt[p]), cols = (uint64_t)pp->cols;
        if (!fsdp[p]) {
            loc[p * GC_MAX_W] = (rlb_src_loc){0, gc_place(g, 0, rlb__param_numel(pp) * esz, esz, &s)};
            continue;
        }
        uint64_t W = (uint64_t)g->W, d0 = (uint64_t)pp->rows, c = (d0 + W - 1) / W;
        for (uint32_t f = 0; f < W; f++) {
            uint64_t n_f = f * c >= d0 ? 0 : (d0 - f * c < c ? d0 - f * c : c);
            loc[p * GC_MAX_W + f] =
                n_f ? (rlb_src_loc){f + 1, gc_place(g, f + 1, n_f * cols * esz, esz, &s)}
                    : (rlb_src_loc){RLB_SRC_NO_BUFFER, 0};
        }
    }
    if ((rc = rlb__source_init(&g->src, &g->pl)))
        goto out;
    for (uint32_t b = 0; b < g->n_buf; b++) {
        g->size[b] += 16; /* never empty */
        g->mem[b] = malloc(g->size[b]);
        if (!g->mem[b]) {
            rc = RLB_ENOMEM;
            goto out;
        }
        for (uint64_t i = 0; i < g->size[b]; i++)
            g->mem[b][i] = (uint8_t)gc_rng(&s);
        if ((rc = rlb__source_add_buffer(&g->src, g->size[b])) != (int)b)
            goto out;
    }
    for (int64_t p = 0; p < np; p++) {
        const rlb_param *pp = &g->pl.params[p];
        int64_t shape[2] = {pp->rows, pp->cols};
        rc = fsdp[p] ? rlb__source_add_fsdp2(&g->src, pp->name, pp->ndim, shape, pdt[p], g->W,
                                             &loc[p * GC_MAX_W], err, errlen)
                     : rlb__source_add_full(&g->src, pp->name, pp->ndim, shape, pdt[p],
                                            loc[p * GC_MAX_W].buffer, loc[p * GC_MAX_W].offset,
                                            err, errlen);
        if (rc)
            goto out;
    }
    rlb_target tgt = {.tp_size = g->T, .replicas = g->R, .dtype = g->dt};
    rc = rlb__plan_build(&g->src, &tgt, &g->plan, err, errlen);
out:
    free(pdt);
    free(fsdp);
    free(loc);
    return rc;
}

static inline void gc_free(gc_case *g)
{
    rlb__plan_free(&g->plan);
    rlb__source_free(&g->src);
    rlb__params_free(&g->pl);
    for (uint32_t b = 0; b < g->n_buf; b++)
        free(g->mem[b]);
}

static inline const char *gc_describe(const gc_case *g, char *buf, size_t len)
{
    snprintf(buf, len, "D %lld I %lld H %lld KV %lld hd %lld L %lld V %lld tie %d bias %d | "
             "W %d -> T %d x %d %s, %llu ops",
             (long long)g->cfg.hidden, (long long)g->cfg.intermediate,
             (long long)g->cfg.n_heads, (long long)g->cfg.n_kv_heads,
             (long long)g->cfg.head_dim, (long long)g->cfg.n_layers, (long long)g->cfg.vocab,
             g->cfg.tie_embeddings, g->cfg.attn_bias, g->W, g->T, g->R, rlb_dtype_name(g->dt),
             (unsigned long long)g->plan.n_ops);
    return buf;
}

#endif /* RLB_TESTS_GPU_CASE_H */
