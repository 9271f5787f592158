/* backend_cpu.c: the CPU engine backend (see backend_cpu.h). The math of each op lives in
 * kernels/cpu/ops.c; this file binds the weights, keeps the int8 copies, sizes the step's
 * buffers, moves keys and values between the rows and the paged cache, and runs the
 * collectives. Check: tests/unit/test_engine_hf.c (logits against HF transformers, TP 1/2/4,
 * int8) and test_engine_batch.c. */
#include "worker/backend_cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"
#include "rlb/rlb.h"
#include "worker/kvcache.h"

/* Query tokens of one span attended at a time: bounds the scores buffer to
 * ATTN_CHUNK * grp * context floats. */
#define ATTN_CHUNK 64

/* The per-step buffers, carved out of scratch for the current capacities. */
typedef struct cpu_bufs {
    float *buf[RLB_EBUF_COUNT_]; /* the named activations of ebackend.h */
    float *cosv;   /* [rows, hd / 2] */
    float *sinv;   /* [rows, hd / 2] */
    float *i8s;    /* rlb__matmul_i8 scratch */
    float *kbuf;   /* [ctx, hd] one kv head's keys, gathered from the blocks */
    float *vbuf;   /* [ctx, hd] its values */
    float *qpack;  /* [ATTN_CHUNK * grp, hd] the query heads of that kv head */
    float *opack;  /* [ATTN_CHUNK * grp, hd] their attention output */
    float *scores; /* [ATTN_CHUNK * grp, ctx] */
    float *sel;    /* [out, D] rows whose logits are wanted */
    float *loc;    /* [out, vp_local] this rank's logits */
    float *gath;   /* [T, out, vp_local] every rank's logits */
    float *logits; /* [out, V] */
} cpu_bufs;

/* One matrix post-load processing quantizes: its float32 source and its int8 copy. */
typedef struct i8_job {
    const float *src;  /* [rows, cols] in the weight buffer */
    rlb_i8_weight *w;  /* where the int8 copy lives */
} i8_job;

/* The int8 copies of one decoder layer. */
typedef struct cpu_layer8 {
    rlb_i8_weight qkv, o, gate_up, down;
} cpu_layer8;

typedef struct cpu_backend {
    rlb_ebackend base;      /* iface + layout */
    rlb_tp_comm *comm;      /* this rank's communicator (borrowed) */
    rlb_quant quant;        /* post-load processing */
    int64_t D, hd, hq, kvt, grp; /* hidden, head dim, q heads, kv heads, q heads per kv head */
    int64_t qkv_rows;       /* (hq + 2 kvt) hd */
    int64_t inter;          /* I / T */
    int64_t vocab;          /* V */
    int64_t vp_local;       /* Vp / T vocabulary rows on this rank */
    int64_t vocab0;         /* first token id of this rank's rows */
    float attn_scale;       /* hd^-1/2 as HF rounds it */
    float *inv_freq;        /* [hd/2] RoPE frequencies */
    const void *weights;    /* the bound weight buffer */
    cpu_layer8 *l8;         /* [n_layers] int8 copies (quant int8) */
    rlb_i8_weight head8;    /* int8 LM head (quant int8) */
    i8_job *i8_jobs;        /* [n_i8] what post-load processing quantizes (int8 only) */
    const rlb_i8_weight **i8_list; /* [n_i8] the copies, for tests */
    int64_t n_i8;           /* entries in i8_jobs */
    void *i8_arena;         /* every int8 buffer and scale, allocated once */
    void *scratch;          /* per-step buffers, grown on demand */
    int64_t cap_rows, cap_out, cap_ctx; /* what scratch is sized for */
    cpu_bufs b;             /* the step's buffers */
    rlb_sample_ws ws;       /* sampling scratch */
    const rlb_ebatch *batch; /* the step (valid until its results are taken) */
    rlb_kvcache *kv;        /* the step's cache */
} cpu_backend;

static cpu_backend *cpu(rlb_ebackend *b)
{
    return (cpu_backend *)b;
}

static int64_t max3(int64_t a, int64_t b, int64_t c)
{
    int64_t m = a > b ? a : b;
    return m > c ? m : c;
}

/* Lays the buffers out for (rows, out, ctx); with base == NULL only sums the size.
 * Returns the bytes needed. */
static uint64_t carve(const cpu_backend *c, int64_t rows, int64_t out, int64_t ctx, char *base,
                      cpu_bufs *b)
{
    int64_t half = c->hd / 2, T = c->comm->size;
    int64_t kmax = max3(c->D, c->hq * c->hd, c->inter);
    int64_t i8 = c->quant == RLB_QUANT_INT8
                     ? rlb__matmul_i8_scratch(rows > out ? rows : out, kmax)
                     : 0;
    struct {
        float **p;
        int64_t n;
    } parts[] = {
        {&b->buf[RLB_EBUF_X], rows * c->D},
        {&b->buf[RLB_EBUF_H], rows * c->D},
        {&b->buf[RLB_EBUF_QKV], rows * c->qkv_rows},
        {&b->buf[RLB_EBUF_ATTN], rows * c->hq * c->hd},
        {&b->buf[RLB_EBUF_PROJ], rows * c->D},
        {&b->buf[RLB_EBUF_GU], rows * 2 * c->inter},
        {&b->buf[RLB_EBUF_ACT], rows * c->inter},
        {&b->cosv, rows * half},
        {&b->sinv, rows * half},
        {&b->i8s, i8},
        {&b->kbuf, ctx * c->hd},
        {&b->vbuf, ctx * c->hd},
        {&b->qpack, ATTN_CHUNK * c->grp * c->hd},
        {&b->opack, ATTN_CHUNK * c->grp * c->hd},
        {&b->scores, ATTN_CHUNK * c->grp * ctx},
        {&b->sel, out * c->D},
        {&b->loc, out * c->vp_local},
        {&b->gath, T * out * c->vp_local},
        {&b->logits, out * c->vocab},
    };
    uint64_t off = 0;
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        if (base)
            *parts[i].p = (float *)(base + off);
        /* 64-byte aligned starts, so no two buffers share a cache line. */
        off += ((uint64_t)parts[i].n * sizeof(float) + 63) & ~(uint64_t)63;
    }
    return off;
}

static int scratch_reserve(cpu_backend *c, int64_t rows, int64_t out, int64_t ctx)
{
    if (rows > c->cap_rows || out > c->cap_out || ctx > c->cap_ctx || !c->scratch) {
        int64_t r = rows > c->cap_rows ? rows : c->cap_rows;
        int64_t o = out > c->cap_out ? out : c->cap_out;
        int64_t x = ctx > c->cap_ctx ? ctx : c->cap_ctx;
        uint64_t bytes = carve(c, r, o, x, NULL, &c->b);
        void *mem = NULL;
        if (posix_memalign(&mem, 64, bytes ? bytes : 64))
            return RLB_ENOMEM;
        free(c->scratch);
        c->scratch = mem;
        c->cap_rows = r;
        c->cap_out = o;
        c->cap_ctx = x;
    }
    carve(c, c->cap_rows, c->cap_out, c->cap_ctx, c->scratch, &c->b);
    return 0;
}

/* The float32 tensor of (kind, layer) in the bound buffer; the LM head of a tied model is
 * the embedding. NULL when the model has none (a bias). */
static const float *weight(const cpu_backend *c, rlb_wkind kind, int layer)
{
    const rlb_tp_layout *l = c->base.layout;
    if (kind == RLB_W_LM_HEAD && l->cfg.tie_embeddings)
        kind = RLB_W_EMBED;
    const rlb_local_tensor *t = rlb__tp_layout_find(l, kind, layer);
    return t ? (const float *)((const char *)c->weights + t->offset) : NULL;
}

static uint64_t align64(uint64_t n)
{
    return (n + 63) / 64 * 64;
}

/* Lists the int8 copies (qkv, o, gate_up, down per layer, then the LM head) with their
 * float32 sources and carves one arena for all of them. Returns 0 or RLB_ENOMEM. */
static int i8_alloc(cpu_backend *c)
{
    int64_t nl = c->base.layout->cfg.n_layers;
    c->n_i8 = 4 * nl + 1;
    c->i8_jobs = calloc((size_t)c->n_i8, sizeof *c->i8_jobs);
    c->i8_list = calloc((size_t)c->n_i8, sizeof *c->i8_list);
    c->l8 = calloc((size_t)nl, sizeof *c->l8);
    if (!c->i8_jobs || !c->i8_list || !c->l8)
        return RLB_ENOMEM;
    for (int64_t l = 0; l < nl; l++) {
        cpu_layer8 *L = &c->l8[l];
        L->qkv = (rlb_i8_weight){.rows = c->qkv_rows, .cols = c->D};
        L->o = (rlb_i8_weight){.rows = c->D, .cols = c->hq * c->hd};
        L->gate_up = (rlb_i8_weight){.rows = 2 * c->inter, .cols = c->D};
        L->down = (rlb_i8_weight){.rows = c->D, .cols = c->inter};
        c->i8_jobs[4 * l + 0] = (i8_job){weight(c, RLB_W_QKV, (int)l), &L->qkv};
        c->i8_jobs[4 * l + 1] = (i8_job){weight(c, RLB_W_O, (int)l), &L->o};
        c->i8_jobs[4 * l + 2] = (i8_job){weight(c, RLB_W_GATE_UP, (int)l), &L->gate_up};
        c->i8_jobs[4 * l + 3] = (i8_job){weight(c, RLB_W_DOWN, (int)l), &L->down};
    }
    c->head8 = (rlb_i8_weight){.rows = c->vp_local, .cols = c->D};
    c->i8_jobs[4 * nl] = (i8_job){weight(c, RLB_W_LM_HEAD, -1), &c->head8};
    uint64_t bytes = 0;
    for (int64_t i = 0; i < c->n_i8; i++) {
        const rlb_i8_weight *w = c->i8_jobs[i].w;
        bytes += align64((uint64_t)(w->rows * w->cols)) + align64((uint64_t)w->rows * 4);
        c->i8_list[i] = w;
    }
    if (posix_memalign(&c->i8_arena, 64, bytes)) {
        c->i8_arena = NULL;
        return RLB_ENOMEM;
    }
    char *p = c->i8_arena;
    for (int64_t i = 0; i < c->n_i8; i++) {
        rlb_i8_weight *w = c->i8_jobs[i].w;
        w->q = (int8_t *)p;
        p += align64((uint64_t)(w->rows * w->cols));
        w->scale = (float *)p;
        p += align64((uint64_t)w->rows * 4);
    }
    return 0;
}

static int cpu_postload(rlb_ebackend *b)
{
    cpu_backend *c = cpu(b);
    for (int64_t i = 0; i < c->n_i8; i++) {
        rlb_i8_weight *w = c->i8_jobs[i].w;
        int rc = rlb__quant_int8_rows(c->i8_jobs[i].src, RLB_DTYPE_F32, w->rows, w->cols, w->q,
                                      w->scale);
        if (rc)
            return rc;
    }
    return 0;
}

/* p, a pointer into the buffer at `from`, moved to the same offset in `to`. */
static const float *rebase(const float *p, const void *from, const void *to)
{
    return p ? (const float *)((const char *)to + ((const char *)p - (const char *)from))
             : NULL;
}

static int cpu_set_weights(rlb_ebackend *b, const void *weights)
{
    cpu_backend *c = cpu(b);
    if (!weights)
        return RLB_EINVAL;
    for (int64_t i = 0; i < c->n_i8; i++)
        c->i8_jobs[i].src = rebase(c->i8_jobs[i].src, c->weights, weights);
    c->weights = weights;
    return cpu_postload(b);
}

static int cpu_begin(rlb_ebackend *b, const rlb_ebatch *batch, rlb_kvcache *kv)
{
    cpu_backend *c = cpu(b);
    if (!kv->k || kv->mem.elem_bytes != sizeof(float))
        return RLB_EINVAL;
    int rc = scratch_reserve(c, batch->rows, batch->out, batch->max_ctx);
    if (rc)
        return rc;
    c->batch = batch;
    c->kv = kv;
    int64_t half = c->hd / 2;
    for (int64_t r = 0; r < batch->rows; r++)
        rlb__rope_cos_sin(c->inv_freq, half, batch->pos[r], c->b.cosv + r * half,
                          c->b.sinv + r * half);
    return 0;
}

/* X rows = this rank's embedding rows (zero for ids another rank holds), then summed. */
static int cpu_embed(rlb_ebackend *b)
{
    cpu_backend *c = cpu(b);
    const float *embed = weight(c, RLB_W_EMBED, -1);
    float *x = c->b.buf[RLB_EBUF_X];
    for (int64_t r = 0; r < c->batch->rows; r++) {
        int64_t local = c->batch->tokens[r] - c->vocab0;
        if (local >= 0 && local < c->vp_local)
            memcpy(x + r * c->D, embed + local * c->D, (size_t)c->D * sizeof(float));
        else
            memset(x + r * c->D, 0, (size_t)c->D * sizeof(float));
    }
    return c->comm->size > 1
               ? rlb__tp_allreduce_sum(c->comm, x, (size_t)(c->batch->rows * c->D))
               : 0;
}

static int cpu_rmsnorm(rlb_ebackend *b, rlb_ebuf src, rlb_wkind w, int layer, rlb_ebuf dst)
{
    cpu_backend *c = cpu(b);
    rlb__rmsnorm(c->b.buf[src], weight(c, w, layer), c->batch->rows, c->D,
                 (float)b->layout->cfg.rms_eps, c->b.buf[dst]);
    return 0;
}

/* y[n, m] = x[n, k] . W^T + beta * y, from the int8 copy when there is one. */
static void matmul(const cpu_backend *c, const float *w, const rlb_i8_weight *w8,
                   const float *x, int64_t n, int64_t k, int64_t m, float beta, float *y)
{
    if (w8 && w8->q)
        rlb__matmul_i8(x, n, k, w8->q, w8->scale, m, beta, y, c->b.i8s);
    else
        rlb__matmul(x, n, k, w, m, beta, y);
}

static int cpu_linear(rlb_ebackend *b, rlb_wkind w, int layer, rlb_ebuf src, rlb_ebuf dst)
{
    cpu_backend *c = cpu(b);
    int64_t rows = c->batch->rows, k, m;
    const rlb_i8_weight *w8 = NULL;
    const cpu_layer8 *L = c->l8 ? &c->l8[layer] : NULL;
    switch (w) {
    case RLB_W_QKV: k = c->D, m = c->qkv_rows, w8 = L ? &L->qkv : NULL; break;
    case RLB_W_O: k = c->hq * c->hd, m = c->D, w8 = L ? &L->o : NULL; break;
    case RLB_W_GATE_UP: k = c->D, m = 2 * c->inter, w8 = L ? &L->gate_up : NULL; break;
    case RLB_W_DOWN: k = c->inter, m = c->D, w8 = L ? &L->down : NULL; break;
    default: return RLB_EINVAL;
    }
    float *y = c->b.buf[dst];
    const float *bias = w == RLB_W_QKV ? weight(c, RLB_W_QKV_BIAS, layer) : NULL;
    if (bias)
        for (int64_t r = 0; r < rows; r++)
            memcpy(y + r * m, bias, (size_t)m * sizeof(float));
    matmul(c, weight(c, w, layer), w8, c->b.buf[src], rows, k, m, bias ? 1.0f : 0.0f, y);
    return 0;
}

/* RoPE on the q and k heads of each row, then the row's k and v into its cache slot. */
static int cpu_rope_store(rlb_ebackend *b, int layer)
{
    cpu_backend *c = cpu(b);
    const rlb_ebatch *bt = c->batch;
    int64_t half = c->hd / 2, btok = c->kv->block_tokens;
    for (int64_t r = 0; r < bt->rows; r++) {
        float *row = c->b.buf[RLB_EBUF_QKV] + r * c->qkv_rows;
        float *kr = row + c->hq * c->hd, *vr = kr + c->kvt * c->hd;
        rlb__rope_apply(row, c->hq, c->hd, c->b.cosv + r * half, c->b.sinv + r * half);
        rlb__rope_apply(kr, c->kvt, c->hd, c->b.cosv + r * half, c->b.sinv + r * half);
        int32_t blk = (int32_t)(bt->slot[r] / btok);
        int64_t slot = bt->slot[r] % btok;
        for (int64_t h = 0; h < c->kvt; h++) {
            size_t off = (size_t)((h * btok + slot) * c->hd);
            memcpy(rlb__kv_k(c->kv, blk, layer) + off, kr + h * c->hd,
                   (size_t)c->hd * sizeof(float));
            memcpy(rlb__kv_v(c->kv, blk, layer) + off, vr + h * c->hd,
                   (size_t)c->hd * sizeof(float));
        }
    }
    return 0;
}

/* Causal attention of every span, one kv head at a time: gather its keys and values from
 * the blocks into rows, then attend query chunks of up to ATTN_CHUNK tokens. */
static int cpu_attention(rlb_ebackend *b, int layer)
{
    cpu_backend *c = cpu(b);
    const rlb_ebatch *bt = c->batch;
    cpu_bufs *B = &c->b;
    int64_t hd = c->hd, btok = c->kv->block_tokens;
    size_t head_bytes = (size_t)hd * sizeof(float);
    for (int64_t s = 0; s < bt->n_spans; s++) {
        int64_t n = bt->span_n[s], pos0 = bt->span_pos0[s], row0 = bt->span_row0[s];
        int64_t ctx = pos0 + n;
        const int32_t *table = bt->block_tables + s * bt->max_blocks;
        for (int64_t g = 0; g < c->kvt; g++) {
            for (int64_t blk = 0; blk * btok < ctx; blk++) {
                int64_t cnt = ctx - blk * btok < btok ? ctx - blk * btok : btok;
                size_t off = (size_t)(g * btok * hd);
                memcpy(B->kbuf + blk * btok * hd, rlb__kv_k(c->kv, table[blk], layer) + off,
                       (size_t)cnt * head_bytes);
                memcpy(B->vbuf + blk * btok * hd, rlb__kv_v(c->kv, table[blk], layer) + off,
                       (size_t)cnt * head_bytes);
            }
            for (int64_t c0 = 0; c0 < n; c0 += ATTN_CHUNK) {
                int64_t nc = n - c0 < ATTN_CHUNK ? n - c0 : ATTN_CHUNK;
                for (int64_t i = 0; i < nc; i++)
                    memcpy(B->qpack + i * c->grp * hd,
                           B->buf[RLB_EBUF_QKV] + (row0 + c0 + i) * c->qkv_rows +
                               g * c->grp * hd,
                           (size_t)c->grp * head_bytes);
                rlb__attention_causal(B->qpack, nc, c->grp, hd, pos0 + c0, B->kbuf, B->vbuf,
                                      c->attn_scale, B->scores, B->opack);
                for (int64_t i = 0; i < nc; i++)
                    memcpy(B->buf[RLB_EBUF_ATTN] + (row0 + c0 + i) * c->hq * hd +
                               g * c->grp * hd,
                           B->opack + i * c->grp * hd, (size_t)c->grp * head_bytes);
            }
        }
    }
    return 0;
}

static int cpu_swiglu(rlb_ebackend *b)
{
    cpu_backend *c = cpu(b);
    rlb__swiglu(c->b.buf[RLB_EBUF_GU], c->batch->rows, c->inter, c->b.buf[RLB_EBUF_ACT]);
    return 0;
}

static int cpu_add(rlb_ebackend *b, rlb_ebuf dst, rlb_ebuf src)
{
    cpu_backend *c = cpu(b);
    float *x = c->b.buf[dst];
    const float *y = c->b.buf[src];
    int64_t n = c->batch->rows * c->D;
    for (int64_t i = 0; i < n; i++)
        x[i] = x[i] + y[i];
    return 0;
}

static int cpu_allreduce(rlb_ebackend *b, rlb_ebuf buf)
{
    cpu_backend *c = cpu(b);
    if (c->comm->size == 1)
        return 0;
    return rlb__tp_allreduce_sum(c->comm, c->b.buf[buf], (size_t)(c->batch->rows * c->D));
}

/* Final norm and LM head for the wanted rows; gathers the ranks' vocabulary slices. */
static int cpu_logits(rlb_ebackend *b)
{
    cpu_backend *c = cpu(b);
    const rlb_ebatch *bt = c->batch;
    int64_t D = c->D, out = bt->out;
    if (out == 0)
        return 0;
    for (int64_t o = 0; o < out; o++)
        memcpy(c->b.sel + o * D, c->b.buf[RLB_EBUF_X] + (int64_t)bt->out_rows[o] * D,
               (size_t)D * sizeof(float));
    rlb__rmsnorm(c->b.sel, weight(c, RLB_W_FINAL_NORM, -1), out, D,
                 (float)b->layout->cfg.rms_eps, c->b.sel);
    matmul(c, weight(c, RLB_W_LM_HEAD, -1), c->n_i8 ? &c->head8 : NULL, c->b.sel, out, D,
           c->vp_local, 0.0f, c->b.loc);
    int64_t T = c->comm->size, vl = c->vp_local;
    int rc = rlb__tp_allgather(c->comm, c->b.loc, (size_t)(out * vl), c->b.gath);
    if (rc)
        return rc;
    /* gath is [T][out][vl]; row o's logits are the ranks' slices side by side, cut at V. */
    for (int64_t row = 0; row < out; row++)
        for (int64_t t = 0; t < T && t * vl < c->vocab; t++) {
            int64_t n = c->vocab - t * vl < vl ? c->vocab - t * vl : vl;
            memcpy(c->b.logits + row * c->vocab + t * vl, c->b.gath + (t * out + row) * vl,
                   (size_t)n * sizeof(float));
        }
    return 0;
}

static int cpu_read_logits(rlb_ebackend *b, float *host)
{
    cpu_backend *c = cpu(b);
    memcpy(host, c->b.logits, (size_t)(c->batch->out * c->vocab) * sizeof(float));
    return 0;
}

static int cpu_sample(rlb_ebackend *b, const rlb_sample_job *jobs, int64_t n, int32_t *tokens,
                      float *logprobs)
{
    cpu_backend *c = cpu(b);
    for (int64_t i = 0; i < n; i++) {
        if (jobs[i].row < 0 || jobs[i].row >= c->batch->out)
            return RLB_EINVAL;
        int rc = rlb__sample_token(c->b.logits + jobs[i].row * c->vocab, c->vocab, &jobs[i].sp,
                                   jobs[i].sample, jobs[i].pos, &c->ws, &tokens[i], &logprobs[i]);
        if (rc)
            return rc;
    }
    return 0;
}

static rlb_kv_mem cpu_kv_mem(rlb_ebackend *b)
{
    return rlb__kv_host_mem();
}

static void cpu_destroy(rlb_ebackend *b)
{
    cpu_backend *c = cpu(b);
    if (!c)
        return;
    free(c->inv_freq);
    free(c->l8);
    free(c->i8_jobs);
    free(c->i8_list);
    free(c->i8_arena);
    free(c->scratch);
    rlb__sample_ws_free(&c->ws);
    free(c);
}

static const rlb_ebackend_iface_v1 cpu_iface = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .postload = cpu_postload,
    .set_weights = cpu_set_weights,
    .begin = cpu_begin,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .linear = cpu_linear,
    .rope_store = cpu_rope_store,
    .attention = cpu_attention,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .allreduce = cpu_allreduce,
    .logits = cpu_logits,
    .read_logits = cpu_read_logits,
    .sample = cpu_sample,
    .kv_mem = cpu_kv_mem,
};

const rlb_i8_weight *const *rlb__ebackend_cpu_i8(const rlb_ebackend *b, int64_t *n)
{
    const cpu_backend *c = (const cpu_backend *)b;
    *n = c->n_i8;
    return c->i8_list;
}

int rlb__ebackend_cpu_create(const rlb_tp_layout *layout, const void *weights,
                             rlb_tp_comm *comm, rlb_quant quant, rlb_ebackend **out)
{
    if (!layout || !weights || !comm || !out || layout->tp_size != comm->size ||
        layout->tp_rank != comm->rank || (quant != RLB_QUANT_NONE && quant != RLB_QUANT_INT8))
        return RLB_EINVAL;
    if (layout->dtype != RLB_DTYPE_F32)
        return RLB_EDTYPE;
    cpu_backend *c = calloc(1, sizeof *c);
    if (!c)
        return RLB_ENOMEM;
    const rlb_model_config *cfg = &layout->cfg;
    c->base = (rlb_ebackend){.iface = &cpu_iface, .layout = layout};
    c->comm = comm;
    c->quant = quant;
    c->D = cfg->hidden;
    c->hd = cfg->head_dim;
    c->hq = layout->hq;
    c->kvt = layout->kvt;
    c->grp = layout->hq / layout->kvt;
    c->qkv_rows = (layout->hq + 2 * layout->kvt) * cfg->head_dim;
    c->inter = cfg->intermediate / layout->tp_size;
    c->vocab = cfg->vocab;
    c->vp_local = layout->vp / layout->tp_size;
    c->vocab0 = layout->tp_rank * c->vp_local;
    c->attn_scale = (float)pow((double)cfg->head_dim, -0.5);
    c->weights = weights;
    int rc = RLB_ENOMEM;
    c->inv_freq = malloc((size_t)(c->hd / 2 + 1) * sizeof *c->inv_freq);
    if (!c->inv_freq || (rc = rlb__rope_inv_freq(cfg, c->inv_freq)))
        goto fail;
    if (quant == RLB_QUANT_INT8 && ((rc = i8_alloc(c)) || (rc = cpu_postload(&c->base))))
        goto fail;
    *out = &c->base;
    return 0;
fail:
    cpu_destroy(&c->base);
    return rc;
}
