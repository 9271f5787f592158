/* lora_case.h: the LoRA test cases and their independent reference, shared by the CPU
 * test (tests/unit/test_lora.c) and the CUDA one (tests/gpu/test_cuda_lora.c).
 *
 * A case is a small model (plan_ref.h's names and shapes) whose tensors hold values drawn
 * exactly in the source dtype and kept in doubles, with an adapter of A and B on every
 * adaptable weight (the seven targets, the embedding, an untied lm_head), registered as
 * full tensors, FSDP2 shards (LC_W ranks, uneven, some empty) or one FSDP1 unit (alignment
 * padding holding NaN). lc_check_worker compares a worker buffer element by element with
 * W + s * B * A computed here in double (for the embedding, PEFT's transpose), sharing no
 * code with the planner or the executors. Include after cmocka.h.
 */
#ifndef RLB_TESTS_LORA_CASE_H
#define RLB_TESTS_LORA_CASE_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/lora.h"
#include "model/params.h"
#include "model/plan.h"
#include "model/source.h"
#include "tests/unit/plan_ref.h"
#include "tests/unit/ref_convert.h"

static inline void lc_small_config(rlb_model_config *c, int qwen_tied)
{
    rlb__config_tiny(c);
    c->arch = qwen_tied ? RLB_ARCH_QWEN2 : RLB_ARCH_LLAMA;
    c->attn_bias = c->tie_embeddings = qwen_tied;
    c->hidden = 32;
    c->intermediate = 48;
    c->n_heads = 4;
    c->n_kv_heads = qwen_tied ? 1 : 2;
    c->head_dim = 8;
    c->n_layers = 2;
    c->vocab = 100;
}

enum { LC_FULL, LC_FSDP2, LC_FSDP1 };
#define LC_W 3 /* FSDP world: uneven rows, and ranks with nothing of a rank-2 A */

typedef struct lc_tens {
    char name[96];
    int ndim;
    int64_t rows, cols;
    double *val; /* global values, row-major, each exact in the source dtype */
} lc_tens;

typedef struct lc_case {
    rlb_model_config cfg;
    ref_model m;
    int n;          /* tensors: m.n base tensors, then A, B of each adapter */
    lc_tens *t;
    int *ad;        /* [m.n]: index of the base tensor's A factor (B follows), or -1 */
    float *scale;   /* [m.n]: the adapter's scale */
    int64_t *rank;  /* [m.n]: its rank */
    rlb_dtype sdt;  /* source dtype */
    int mode;       /* M_* */
    uint8_t **buf;  /* source buffers */
    uint64_t *blen;
    int nbuf;
    uint64_t *where; /* full / FSDP1: flat element offset of tensor i in its layout */
} lc_case;

static inline uint64_t lc_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

/* A value in [-amp, amp] exact in dtype, keyed by (seed, tensor, element). */
static inline double lc_draw(uint64_t seed, int ti, uint64_t e, double amp, rlb_dtype dtype)
{
    uint64_t h = lc_mix64(seed ^ (uint64_t)ti << 40 ^ e);
    double x = ((double)(h % 20001) / 10000.0 - 1.0) * amp;
    return ref_value(ref_bits((double)(float)x, dtype), dtype);
}

static inline void lc_fill(lc_case *c, uint64_t seed, int adapters_only)
{
    for (int i = adapters_only ? c->m.n : 0; i < c->n; i++) {
        uint64_t n = (uint64_t)(c->t[i].rows * c->t[i].cols);
        for (uint64_t e = 0; e < n; e++)
            c->t[i].val[e] = lc_draw(seed, i, e, i < c->m.n ? 1.0 : 0.5, c->sdt);
    }
}

static inline void lc_put(uint8_t *p, double v, rlb_dtype dt)
{
    uint32_t bits = ref_bits(v, dt);
    memcpy(p, &bits, rlb_dtype_size(dt)); /* little-endian: the low bytes */
}

static inline uint64_t lc_fsdp2_rows(int64_t d0, int f, uint64_t *first)
{
    uint64_t c = ((uint64_t)d0 + LC_W - 1) / LC_W;
    *first = (uint64_t)f * c;
    return *first >= (uint64_t)d0 ? 0 : ((uint64_t)d0 - *first < c ? (uint64_t)d0 - *first : c);
}

/* FSDP1: each tensor starts at a multiple of this many elements (use_orig_params). */
static inline uint64_t lc_fsdp1_align(rlb_dtype dt)
{
    return 16 / rlb_dtype_size(dt);
}

/* Writes every tensor's values into the source buffers of the case's layout. */
static inline void lc_write_sources(lc_case *c)
{
    uint64_t es = rlb_dtype_size(c->sdt);
    uint64_t off[LC_W] = {0};
    for (int i = 0; i < c->n; i++) {
        const lc_tens *t = &c->t[i];
        uint64_t n = (uint64_t)(t->rows * t->cols);
        if (c->mode == LC_FSDP2) {
            for (int f = 0; f < LC_W; f++) {
                uint64_t first, rows = lc_fsdp2_rows(t->rows, f, &first);
                for (uint64_t e = 0; e < rows * (uint64_t)t->cols; e++)
                    lc_put(c->buf[f] + off[f] + e * es, t->val[first * (uint64_t)t->cols + e],
                        c->sdt);
                off[f] += rows * (uint64_t)t->cols * es;
            }
            continue;
        }
        uint64_t chunk = c->mode == LC_FSDP1 ? c->blen[0] / es : UINT64_MAX;
        for (uint64_t e = 0; e < n; e++) {
            uint64_t pos = c->where[i] + e;
            lc_put(c->buf[pos / chunk] + pos % chunk * es, t->val[e], c->sdt);
        }
    }
}

/* Builds the buffers and registers every tensor with `src` (buffers added first). */
static inline void lc_register_sources(lc_case *c, rlb_source *src, int alloc)
{
    uint64_t es = rlb_dtype_size(c->sdt);
    if (alloc) {
        c->where = calloc((size_t)c->n, sizeof *c->where);
        c->nbuf = c->mode == LC_FULL ? 1 : LC_W;
        c->buf = calloc((size_t)c->nbuf, sizeof *c->buf);
        c->blen = calloc((size_t)c->nbuf, sizeof *c->blen);
        uint64_t pos = 0;
        for (int i = 0; i < c->n; i++) {
            uint64_t n = (uint64_t)(c->t[i].rows * c->t[i].cols);
            if (c->mode == LC_FSDP1)
                pos = (pos + lc_fsdp1_align(c->sdt) - 1) / lc_fsdp1_align(c->sdt) * lc_fsdp1_align(c->sdt);
            c->where[i] = pos;
            pos += n;
            if (c->mode == LC_FSDP2)
                for (int f = 0; f < LC_W; f++) {
                    uint64_t first;
                    c->blen[f] += lc_fsdp2_rows(c->t[i].rows, f, &first) * (uint64_t)c->t[i].cols * es;
                }
        }
        if (c->mode == LC_FULL)
            c->blen[0] = pos * es;
        if (c->mode == LC_FSDP1)
            for (int f = 0; f < LC_W; f++)
                c->blen[f] = (pos + LC_W - 1) / LC_W * es;
        for (int b = 0; b < c->nbuf; b++) {
            c->buf[b] = malloc(c->blen[b] + 1);
            memset(c->buf[b], 0xff, c->blen[b] + 1); /* NaN in every dtype: padding */
        }
    }
    for (int b = 0; b < c->nbuf; b++)
        assert_int_equal(rlb__source_add_buffer(src, c->blen[b]), b);
    char err[256] = "";
    if (c->mode == LC_FULL) {
        for (int i = 0; i < c->n; i++) {
            int64_t shape[2] = {c->t[i].rows, c->t[i].cols};
            if (rlb__source_add_full(src, c->t[i].name, c->t[i].ndim, shape, c->sdt, 0,
                                     c->where[i] * es, err, sizeof err))
                fail_msg("add_full: %s", err);
        }
        return;
    }
    if (c->mode == LC_FSDP2) {
        uint64_t off[LC_W] = {0};
        for (int i = 0; i < c->n; i++) {
            rlb_src_loc ranks[LC_W];
            for (int f = 0; f < LC_W; f++) {
                uint64_t first, rows = lc_fsdp2_rows(c->t[i].rows, f, &first);
                ranks[f] = (rlb_src_loc){rows ? (uint32_t)f : RLB_SRC_NO_BUFFER, off[f]};
                off[f] += rows * (uint64_t)c->t[i].cols * es;
            }
            int64_t shape[2] = {c->t[i].rows, c->t[i].cols};
            if (rlb__source_add_fsdp2(src, c->t[i].name, c->t[i].ndim, shape, c->sdt, LC_W,
                                      ranks, err, sizeof err))
                fail_msg("add_fsdp2: %s", err);
        }
        return;
    }
    rlb_flat_entry *ent = calloc((size_t)c->n * 2 + 1, sizeof *ent);
    uint64_t pos = 0;
    int ne = 0;
    for (int i = 0; i < c->n; i++) {
        if (c->where[i] > pos)
            ent[ne++] = (rlb_flat_entry){.numel = c->where[i] - pos};
        uint64_t n = (uint64_t)(c->t[i].rows * c->t[i].cols);
        ent[ne++] = (rlb_flat_entry){.name = c->t[i].name, .ndim = c->t[i].ndim,
                                     .shape = {c->t[i].rows, c->t[i].cols}, .numel = n};
        pos = c->where[i] + n;
    }
    uint64_t chunk = c->blen[0] / es;
    if (chunk * LC_W > pos)
        ent[ne++] = (rlb_flat_entry){.numel = chunk * LC_W - pos};
    rlb_src_loc ranks[LC_W];
    for (int f = 0; f < LC_W; f++)
        ranks[f] = (rlb_src_loc){(uint32_t)f, 0};
    rlb_flat_unit u = {.dtype = c->sdt, .world = LC_W, .chunk_numel = chunk,
                       .n_entries = (uint64_t)ne, .entries = ent, .ranks = ranks};
    if (rlb__source_add_fsdp1(src, &u, err, sizeof err))
        fail_msg("add_fsdp1: %s", err);
    free(ent);
}

static inline int lc_adapted_kind(int which)
{
    return which == P_Q || which == P_K || which == P_V || which == P_O || which == P_GATE ||
           which == P_UP || which == P_DOWN || which == P_EMBED || which == P_HEAD;
}

/* The case's tensors: the base (plan_ref.h's names and shapes), then A and B of every
 * adaptable weight, of rank `rank`, or (rank 0) ranks 1..4 varying by weight. */
static inline void lc_init(lc_case *c, int qwen_tied, int mode, rlb_dtype sdt, int wide, int64_t rank)
{
    memset(c, 0, sizeof *c);
    lc_small_config(&c->cfg, qwen_tied);
    if (wide) { /* enough rows that the executor splits the merges over threads */
        c->cfg.hidden = 256;
        c->cfg.intermediate = 512;
        c->cfg.head_dim = 64;
        c->cfg.vocab = 1000;
    }
    ref_model_init(&c->m, &c->cfg, 0);
    c->mode = mode;
    c->sdt = sdt;
    int nb = c->m.n;
    c->t = calloc((size_t)nb * 3, sizeof *c->t);
    c->ad = malloc((size_t)nb * sizeof *c->ad);
    c->scale = calloc((size_t)nb, sizeof *c->scale);
    c->rank = calloc((size_t)nb, sizeof *c->rank);
    c->n = nb;
    for (int i = 0; i < nb; i++) {
        const ref_param *p = &c->m.p[i];
        c->t[i] = (lc_tens){.ndim = p->ndim, .rows = p->rows, .cols = p->cols};
        snprintf(c->t[i].name, sizeof c->t[i].name, "%s", p->name);
        c->ad[i] = -1;
    }
    for (int i = 0; i < nb; i++) {
        const ref_param *p = &c->m.p[i];
        if (!lc_adapted_kind(p->which))
            continue;
        int64_t r = rank ? rank : 1 + (i % 4);
        int embed = p->which == P_EMBED;
        c->ad[i] = c->n;
        c->rank[i] = r;
        c->scale[i] = (float)(i % 2 ? 8.0 / sqrt((double)r) : 8.0 / (double)r);
        size_t len = strlen(p->name) - strlen(".weight");
        lc_tens *a = &c->t[c->n++], *b = &c->t[c->n++];
        *a = (lc_tens){.ndim = 2, .rows = r, .cols = embed ? p->rows : p->cols};
        *b = (lc_tens){.ndim = 2, .rows = embed ? p->cols : p->rows, .cols = r};
        snprintf(a->name, sizeof a->name, "%.*s.lora_A.weight", (int)len, p->name);
        snprintf(b->name, sizeof b->name, "%.*s.lora_B.weight", (int)len, p->name);
    }
    for (int i = 0; i < c->n; i++)
        c->t[i].val = malloc((size_t)(c->t[i].rows * c->t[i].cols) * sizeof(double));
}

static inline void lc_free(lc_case *c)
{
    for (int i = 0; i < c->n; i++)
        free(c->t[i].val);
    for (int b = 0; b < c->nbuf; b++)
        free(c->buf[b]);
    free(c->buf);
    free(c->blen);
    free(c->where);
    free(c->t);
    free(c->ad);
    free(c->scale);
    free(c->rank);
    ref_model_free(&c->m);
}

/* Checks every element of worker buffer dst (TP rank t of T, dtype ddt) against the
 * reference; with_adapters 0 wants the plain base, bit for bit. A merged element must be
 * within tol of W + s * B * A: the f32 sums' error, (r + 4) 2^-23 (|W| + |s| sum |B A|
 * terms|), plus for a bf16 / f16 destination one rounding of the result (2^-8 / 2^-11 of it:
 * at least half an ulp) and, with base_rounded (an executor that rounds the base to ddt
 * before it merges: the CUDA one), one rounding of the base. With peer (another executor's
 * buffer for the same plan, or NULL), every unmerged element must hold peer's bits and
 * every merged one be within 2 tol of peer's. Returns the merged elements whose bits differ
 * from peer's. */
static inline uint64_t lc_check_worker(const lc_case *c, int T, int t, rlb_dtype ddt,
                                const uint8_t *dst, int with_adapters, int base_rounded,
                                const uint8_t *peer)
{
    ref_tensor rt[3 + 7 * 8];
    uint64_t total, es = rlb_dtype_size(ddt), differ = 0;
    int nt = ref_tensors(&c->cfg, T, es, rt, &total);
    int64_t V = c->cfg.vocab;
    int round_exp = ddt == RLB_DTYPE_BF16 ? -8 : -11;
    for (int k = 0; k < nt; k++)
        for (int64_t lr = 0; lr < rt[k].rows; lr++)
            for (int64_t lc = 0; lc < rt[k].cols; lc++) {
                uint64_t at = rt[k].offset + (uint64_t)(lr * rt[k].cols + lc) * es;
                uint32_t bits = 0, pbits = 0;
                memcpy(&bits, dst + at, es);
                if (peer)
                    memcpy(&pbits, peer + at, es);
                double got = ref_value(bits, ddt);
                int which;
                int64_t gr, gc;
                if (!ref_origin(&c->cfg, T, t, rt[k].kind, lr, lc, &which, &gr, &gc)) {
                    if (bits || (peer && pbits))
                        fail_msg("T%d t%d tensor %d: padding row %lld is not zero", T, t, k,
                                 (long long)lr);
                    continue;
                }
                int pi = c->m.idx[(rt[k].layer + 1) * P_KINDS + which];
                double w = c->t[pi].val[gr * c->t[pi].cols + gc];
                int ai = with_adapters ? c->ad[pi] : -1;
                if (ai < 0) {
                    if (bits != ref_bits(w, ddt) || (peer && pbits != bits))
                        fail_msg("T%d t%d %s[%lld, %lld]: %.9g, base is %.9g", T, t,
                                 c->t[pi].name, (long long)gr, (long long)gc, got, w);
                    continue;
                }
                const lc_tens *A = &c->t[ai], *B = &c->t[ai + 1];
                int64_t r = c->rank[pi];
                double s = c->scale[pi], sum = 0, mag = 0;
                for (int64_t j = 0; j < r; j++) {
                    double term = which == P_EMBED ? A->val[j * V + gr] * B->val[gc * r + j]
                                                   : B->val[gr * r + j] * A->val[j * A->cols + gc];
                    sum += term;
                    mag += fabs(term);
                }
                double ref = w + s * sum;
                double tol = (double)(r + 4) * ldexp(fabs(w) + fabs(s) * mag, -23);
                if (ddt != RLB_DTYPE_F32) /* one rounding of the sum, whatever the base's dtype */
                    tol += ldexp(fabs(ref), round_exp);
                if (ddt != RLB_DTYPE_F32 && base_rounded)
                    tol += ldexp(fabs(w), round_exp);
                if (!(fabs(got - ref) <= tol))
                    fail_msg("T%d t%d %s[%lld, %lld]: %.9g, W + sBA is %.9g (tol %.3g)", T, t,
                             c->t[pi].name, (long long)gr, (long long)gc, got, ref, tol);
                if (!peer)
                    continue;
                double other = ref_value(pbits, ddt);
                if (!(fabs(got - other) <= 2 * tol))
                    fail_msg("T%d t%d %s[%lld, %lld]: %.9g, the other executor wrote %.9g "
                             "(W + sBA is %.9g, tol %.3g)", T, t, c->t[pi].name, (long long)gr,
                             (long long)gc, got, other, ref, tol);
                differ += bits != pbits;
            }
    return differ;
}

/* A case's two plans for one target, over the same source buffers: with every adapter
 * declared (plan), and with none (base: the factors are then dropped, so it is the plain
 * reshard of the base). Allocates the case's buffers. */
typedef struct lc_plans {
    rlb_param_list pl, plain; /* parameter lists with and without the adapters */
    rlb_source src, psrc;     /* the case's buffers registered with each */
    rlb_plan plan, base;      /* their plans */
} lc_plans;

static inline void lc_plans_build(lc_case *c, const rlb_target *tgt, lc_plans *p)
{
    char err[256] = "";
    assert_int_equal(rlb__params_init(&p->pl, &c->cfg, NULL, 0), 0);
    assert_int_equal(rlb__params_init(&p->plain, &c->cfg, NULL, 0), 0);
    for (int i = 0; i < c->m.n; i++)
        if (c->ad[i] >= 0 && rlb__params_add_adapter(&p->pl, c->t[i].name, c->rank[i],
                                                     c->scale[i], err, sizeof err))
            fail_msg("add_adapter: %s", err);
    assert_int_equal(rlb__source_init(&p->src, &p->pl), 0);
    assert_int_equal(rlb__source_init(&p->psrc, &p->plain), 0);
    lc_register_sources(c, &p->src, 1);
    lc_register_sources(c, &p->psrc, 0);
    if (rlb__plan_build(&p->src, tgt, &p->plan, err, sizeof err) ||
        rlb__plan_build(&p->psrc, tgt, &p->base, err, sizeof err))
        fail_msg("plan: %s", err);
    assert_true(p->plan.n_merges > 0 && p->plan.stage_bytes > 0);
    assert_int_equal(p->base.n_merges, 0);
}

static inline void lc_plans_free(lc_plans *p)
{
    rlb__plan_free(&p->plan);
    rlb__plan_free(&p->base);
    rlb__source_free(&p->src);
    rlb__source_free(&p->psrc);
    rlb__params_free(&p->pl);
    rlb__params_free(&p->plain);
}

#endif /* RLB_TESTS_LORA_CASE_H */
