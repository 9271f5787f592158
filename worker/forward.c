/* forward.c: one TP rank's forward pass over a batch of spans (see forward.h). The math
 * of each step lives in kernels/cpu/ops.c; this file binds weights, walks the layers,
 * moves keys and values between the rows and the paged cache, and runs the collectives.
 * Check: tests/unit/test_engine_hf.c (logits against HF transformers, TP 1/2/4, int8). */
#include "worker/forward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"
#include "rlb/rlb.h"

/* Query tokens of one span attended at a time: bounds the scores buffer to
 * ATTN_CHUNK * grp * context floats. */
#define ATTN_CHUNK 64

/* The per-batch buffers, carved out of f->scratch for the current capacities. */
typedef struct fwd_bufs {
    float *x;      /* [rows, D] residual stream */
    float *h;      /* [rows, D] normed input of a block */
    float *qkv;    /* [rows, qkv_rows] */
    float *attn;   /* [rows, hq * hd] attention output */
    float *proj;   /* [rows, D] o_proj / down_proj output */
    float *gu;     /* [rows, 2 * inter] */
    float *act;    /* [rows, inter] */
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
} fwd_bufs;

static int64_t max3(int64_t a, int64_t b, int64_t c)
{
    int64_t m = a > b ? a : b;
    return m > c ? m : c;
}

/* Lays the buffers out for (rows, out, ctx); with base == NULL only sums the size.
 * Returns the bytes needed. */
static uint64_t carve(const rlb_forward *f, int64_t rows, int64_t out, int64_t ctx,
                      char *base, fwd_bufs *b)
{
    int64_t half = f->hd / 2, T = f->comm->size;
    int64_t kmax = max3(f->D, f->hq * f->hd, f->inter);
    int64_t i8 = f->quant == RLB_QUANT_INT8
                     ? rlb__matmul_i8_scratch(rows > out ? rows : out, kmax)
                     : 0;
    struct {
        float **p;
        int64_t n;
    } parts[] = {
        {&b->x, rows * f->D},
        {&b->h, rows * f->D},
        {&b->qkv, rows * f->qkv_rows},
        {&b->attn, rows * f->hq * f->hd},
        {&b->proj, rows * f->D},
        {&b->gu, rows * 2 * f->inter},
        {&b->act, rows * f->inter},
        {&b->cosv, rows * half},
        {&b->sinv, rows * half},
        {&b->i8s, i8},
        {&b->kbuf, ctx * f->hd},
        {&b->vbuf, ctx * f->hd},
        {&b->qpack, ATTN_CHUNK * f->grp * f->hd},
        {&b->opack, ATTN_CHUNK * f->grp * f->hd},
        {&b->scores, ATTN_CHUNK * f->grp * ctx},
        {&b->sel, out * f->D},
        {&b->loc, out * f->vp_local},
        {&b->gath, T * out * f->vp_local},
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

static int scratch_reserve(rlb_forward *f, int64_t rows, int64_t out, int64_t ctx,
                           fwd_bufs *b)
{
    if (rows > f->cap_rows || out > f->cap_out || ctx > f->cap_ctx || !f->scratch) {
        int64_t r = rows > f->cap_rows ? rows : f->cap_rows;
        int64_t o = out > f->cap_out ? out : f->cap_out;
        int64_t c = ctx > f->cap_ctx ? ctx : f->cap_ctx;
        uint64_t bytes = carve(f, r, o, c, NULL, b);
        void *mem = NULL;
        if (posix_memalign(&mem, 64, bytes ? bytes : 64))
            return RLB_ENOMEM;
        free(f->scratch);
        f->scratch = mem;
        f->scratch_bytes = bytes;
        f->cap_rows = r;
        f->cap_out = o;
        f->cap_ctx = c;
    }
    carve(f, f->cap_rows, f->cap_out, f->cap_ctx, f->scratch, b);
    return 0;
}

static const float *tensor_ptr(const rlb_tp_layout *l, const void *w, rlb_wkind kind,
                               int layer)
{
    const rlb_local_tensor *t = rlb__tp_layout_find(l, kind, layer);
    return t ? (const float *)((const char *)w + t->offset) : NULL;
}

static uint64_t align64(uint64_t n)
{
    return (n + 63) / 64 * 64;
}

/* Lists the int8 copies (qkv, o, gate_up, down per layer, then the LM head) with their
 * float32 sources and carves one arena for all of them. Returns 0 or RLB_ENOMEM. */
static int i8_alloc(rlb_forward *f)
{
    int64_t nl = f->cfg.n_layers;
    f->n_i8 = 4 * nl + 1;
    f->i8_jobs = calloc((size_t)f->n_i8, sizeof *f->i8_jobs);
    if (!f->i8_jobs)
        return RLB_ENOMEM;
    for (int64_t l = 0; l < nl; l++) {
        rlb_fwd_layer *L = &f->layers[l];
        L->qkv8 = (rlb_i8_weight){.rows = f->qkv_rows, .cols = f->D};
        L->o8 = (rlb_i8_weight){.rows = f->D, .cols = f->hq * f->hd};
        L->gate_up8 = (rlb_i8_weight){.rows = 2 * f->inter, .cols = f->D};
        L->down8 = (rlb_i8_weight){.rows = f->D, .cols = f->inter};
        f->i8_jobs[4 * l + 0] = (rlb_i8_job){L->qkv, &L->qkv8};
        f->i8_jobs[4 * l + 1] = (rlb_i8_job){L->o, &L->o8};
        f->i8_jobs[4 * l + 2] = (rlb_i8_job){L->gate_up, &L->gate_up8};
        f->i8_jobs[4 * l + 3] = (rlb_i8_job){L->down, &L->down8};
    }
    f->head8 = (rlb_i8_weight){.rows = f->vp_local, .cols = f->D};
    f->i8_jobs[4 * nl] = (rlb_i8_job){f->head, &f->head8};
    uint64_t bytes = 0;
    for (int64_t i = 0; i < f->n_i8; i++) {
        const rlb_i8_weight *w = f->i8_jobs[i].w;
        bytes += align64((uint64_t)(w->rows * w->cols)) + align64((uint64_t)w->rows * 4);
    }
    if (posix_memalign(&f->i8_arena, 64, bytes)) {
        f->i8_arena = NULL;
        return RLB_ENOMEM;
    }
    char *p = f->i8_arena;
    for (int64_t i = 0; i < f->n_i8; i++) {
        rlb_i8_weight *w = f->i8_jobs[i].w;
        w->q = (int8_t *)p;
        p += align64((uint64_t)(w->rows * w->cols));
        w->scale = (float *)p;
        p += align64((uint64_t)w->rows * 4);
    }
    return 0;
}

int rlb__forward_postload(rlb_forward *f)
{
    for (int64_t i = 0; i < f->n_i8; i++) {
        rlb_i8_weight *w = f->i8_jobs[i].w;
        int rc = rlb__quant_int8_rows(f->i8_jobs[i].src, RLB_DTYPE_F32, w->rows, w->cols, w->q,
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

int rlb__forward_set_weights(rlb_forward *f, const void *weights)
{
    if (!weights)
        return RLB_EINVAL;
    const void *old = f->weights;
    f->embed = rebase(f->embed, old, weights);
    f->final_norm = rebase(f->final_norm, old, weights);
    f->head = rebase(f->head, old, weights);
    for (int64_t l = 0; l < f->cfg.n_layers; l++) {
        rlb_fwd_layer *L = &f->layers[l];
        const float **ptrs[] = {&L->attn_norm, &L->qkv, &L->qkv_bias, &L->o,
                                &L->mlp_norm, &L->gate_up, &L->down};
        for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++)
            *ptrs[i] = rebase(*ptrs[i], old, weights);
    }
    for (int64_t i = 0; i < f->n_i8; i++)
        f->i8_jobs[i].src = rebase(f->i8_jobs[i].src, old, weights);
    f->weights = weights;
    return rlb__forward_postload(f);
}

int rlb__forward_init(rlb_forward *f, const rlb_tp_layout *layout, const void *weights,
                      rlb_tp_comm *comm, rlb_quant quant)
{
    memset(f, 0, sizeof *f);
    if (!layout || !weights || !comm || layout->tp_size != comm->size ||
        layout->tp_rank != comm->rank || (quant != RLB_QUANT_NONE && quant != RLB_QUANT_INT8))
        return RLB_EINVAL;
    if (layout->dtype != RLB_DTYPE_F32)
        return RLB_EDTYPE;
    const rlb_model_config *cfg = &layout->cfg;
    f->cfg = *cfg;
    f->comm = comm;
    f->quant = quant;
    f->D = cfg->hidden;
    f->hd = cfg->head_dim;
    f->hq = layout->hq;
    f->kvt = layout->kvt;
    f->grp = layout->hq / layout->kvt;
    f->qkv_rows = (layout->hq + 2 * layout->kvt) * cfg->head_dim;
    f->inter = cfg->intermediate / layout->tp_size;
    f->vocab = cfg->vocab;
    f->vp_local = layout->vp / layout->tp_size;
    f->vocab0 = layout->tp_rank * f->vp_local;
    f->attn_scale = (float)pow((double)cfg->head_dim, -0.5);
    f->weights = weights;
    f->embed = tensor_ptr(layout, weights, RLB_W_EMBED, -1);
    f->final_norm = tensor_ptr(layout, weights, RLB_W_FINAL_NORM, -1);
    f->head = cfg->tie_embeddings ? f->embed : tensor_ptr(layout, weights, RLB_W_LM_HEAD, -1);
    f->inv_freq = malloc((size_t)(f->hd / 2 + 1) * sizeof *f->inv_freq);
    f->layers = calloc((size_t)cfg->n_layers, sizeof *f->layers);
    if (!f->inv_freq || !f->layers) {
        rlb__forward_free(f);
        return RLB_ENOMEM;
    }
    int rc = rlb__rope_inv_freq(cfg, f->inv_freq);
    if (rc) {
        rlb__forward_free(f);
        return rc;
    }
    for (int l = 0; l < cfg->n_layers; l++) {
        rlb_fwd_layer *L = &f->layers[l];
        L->attn_norm = tensor_ptr(layout, weights, RLB_W_ATTN_NORM, l);
        L->qkv = tensor_ptr(layout, weights, RLB_W_QKV, l);
        L->qkv_bias = tensor_ptr(layout, weights, RLB_W_QKV_BIAS, l);
        L->o = tensor_ptr(layout, weights, RLB_W_O, l);
        L->mlp_norm = tensor_ptr(layout, weights, RLB_W_MLP_NORM, l);
        L->gate_up = tensor_ptr(layout, weights, RLB_W_GATE_UP, l);
        L->down = tensor_ptr(layout, weights, RLB_W_DOWN, l);
    }
    if (quant == RLB_QUANT_INT8) {
        if ((rc = i8_alloc(f)) || (rc = rlb__forward_postload(f))) {
            rlb__forward_free(f);
            return rc;
        }
    }
    return 0;
}

void rlb__forward_free(rlb_forward *f)
{
    free(f->inv_freq);
    free(f->layers);
    free(f->i8_jobs);
    free(f->i8_arena);
    free(f->scratch);
    memset(f, 0, sizeof *f);
}

/* y[n, w_rows] = x[n, k] . W^T + beta * y, from the int8 copy when there is one. */
static void linear(const rlb_forward *f, const float *w, const rlb_i8_weight *w8,
                   const float *x, int64_t n, int64_t k, int64_t w_rows, float beta, float *y,
                   float *i8s)
{
    if (w8->q)
        rlb__matmul_i8(x, n, k, w8->q, w8->scale, w_rows, beta, y, i8s);
    else
        rlb__matmul(x, n, k, w, w_rows, beta, y);
}

int64_t rlb__forward_logit_rows(const rlb_fwd_span *spans, int64_t n_spans)
{
    int64_t out = 0;
    for (int64_t s = 0; s < n_spans; s++)
        out += spans[s].logits == RLB_FWD_LOGITS_ALL    ? spans[s].n
               : spans[s].logits == RLB_FWD_LOGITS_LAST ? 1
                                                         : 0;
    return out;
}

static int check_spans(const rlb_forward *f, const rlb_kvcache *kv, const rlb_fwd_span *spans,
                       int64_t n_spans, int64_t *rows, int64_t *ctx)
{
    *rows = *ctx = 0;
    for (int64_t s = 0; s < n_spans; s++) {
        const rlb_fwd_span *sp = &spans[s];
        if (sp->n < 1 || sp->pos0 < 0 || !sp->tokens || !sp->blocks ||
            rlb__kv_blocks_for(kv, sp->pos0 + sp->n) > sp->blocks->n)
            return RLB_EINVAL;
        for (int64_t i = 0; i < sp->n; i++)
            if (sp->tokens[i] < 0 || sp->tokens[i] >= f->vocab)
                return RLB_EINVAL;
        *rows += sp->n;
        if (sp->pos0 + sp->n > *ctx)
            *ctx = sp->pos0 + sp->n;
    }
    return 0;
}

/* x rows = this rank's embedding rows (zero for ids another rank holds), then summed. */
static int embed_rows(const rlb_forward *f, const rlb_fwd_span *spans, int64_t n_spans,
                      float *x, int64_t rows)
{
    int64_t r = 0;
    for (int64_t s = 0; s < n_spans; s++)
        for (int64_t i = 0; i < spans[s].n; i++, r++) {
            int64_t local = spans[s].tokens[i] - f->vocab0;
            if (local >= 0 && local < f->vp_local)
                memcpy(x + r * f->D, f->embed + local * f->D, (size_t)f->D * sizeof(float));
            else
                memset(x + r * f->D, 0, (size_t)f->D * sizeof(float));
        }
    return f->comm->size > 1 ? rlb__tp_allreduce_sum(f->comm, x, (size_t)(rows * f->D)) : 0;
}

/* RoPE on the q and k heads of each row, then the row's k and v into its cache slot. */
static void rope_and_store(const rlb_forward *f, rlb_kvcache *kv, const rlb_fwd_span *spans,
                           int64_t n_spans, int64_t layer, fwd_bufs *b)
{
    int64_t half = f->hd / 2, bt = kv->block_tokens, r = 0;
    for (int64_t s = 0; s < n_spans; s++)
        for (int64_t i = 0; i < spans[s].n; i++, r++) {
            float *row = b->qkv + r * f->qkv_rows;
            float *kr = row + f->hq * f->hd, *vr = kr + f->kvt * f->hd;
            rlb__rope_apply(row, f->hq, f->hd, b->cosv + r * half, b->sinv + r * half);
            rlb__rope_apply(kr, f->kvt, f->hd, b->cosv + r * half, b->sinv + r * half);
            int64_t pos = spans[s].pos0 + i;
            int32_t blk = spans[s].blocks->ids[pos / bt];
            int64_t slot = pos % bt;
            for (int64_t h = 0; h < f->kvt; h++) {
                size_t off = (size_t)((h * bt + slot) * f->hd);
                memcpy(rlb__kv_k(kv, blk, layer) + off, kr + h * f->hd,
                       (size_t)f->hd * sizeof(float));
                memcpy(rlb__kv_v(kv, blk, layer) + off, vr + h * f->hd,
                       (size_t)f->hd * sizeof(float));
            }
        }
}

/* Causal attention of every span, one kv head at a time: gather its keys and values from
 * the blocks into rows, then attend query chunks of up to ATTN_CHUNK tokens. */
static void attend(const rlb_forward *f, const rlb_kvcache *kv, const rlb_fwd_span *spans,
                   int64_t n_spans, int64_t layer, fwd_bufs *b)
{
    int64_t hd = f->hd, bt = kv->block_tokens, row0 = 0;
    size_t head_bytes = (size_t)hd * sizeof(float);
    for (int64_t s = 0; s < n_spans; row0 += spans[s].n, s++) {
        const rlb_fwd_span *sp = &spans[s];
        int64_t ctx = sp->pos0 + sp->n;
        for (int64_t g = 0; g < f->kvt; g++) {
            for (int64_t blk = 0; blk * bt < ctx; blk++) {
                int64_t cnt = ctx - blk * bt < bt ? ctx - blk * bt : bt;
                int32_t id = sp->blocks->ids[blk];
                size_t off = (size_t)(g * bt * hd);
                memcpy(b->kbuf + blk * bt * hd, rlb__kv_k(kv, id, layer) + off,
                       (size_t)cnt * head_bytes);
                memcpy(b->vbuf + blk * bt * hd, rlb__kv_v(kv, id, layer) + off,
                       (size_t)cnt * head_bytes);
            }
            for (int64_t c0 = 0; c0 < sp->n; c0 += ATTN_CHUNK) {
                int64_t nc = sp->n - c0 < ATTN_CHUNK ? sp->n - c0 : ATTN_CHUNK;
                for (int64_t i = 0; i < nc; i++)
                    memcpy(b->qpack + i * f->grp * hd,
                           b->qkv + (row0 + c0 + i) * f->qkv_rows + g * f->grp * hd,
                           (size_t)f->grp * head_bytes);
                rlb__attention_causal(b->qpack, nc, f->grp, hd, sp->pos0 + c0, b->kbuf,
                                      b->vbuf, f->attn_scale, b->scores, b->opack);
                for (int64_t i = 0; i < nc; i++)
                    memcpy(b->attn + (row0 + c0 + i) * f->hq * hd + g * f->grp * hd,
                           b->opack + i * f->grp * hd, (size_t)f->grp * head_bytes);
            }
        }
    }
}

static void add_rows(float *x, const float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = x[i] + y[i];
}

static int run_layer(rlb_forward *f, rlb_kvcache *kv, const rlb_fwd_span *spans,
                     int64_t n_spans, int64_t layer, int64_t rows, fwd_bufs *b)
{
    const rlb_fwd_layer *L = &f->layers[layer];
    int64_t D = f->D;
    float eps = (float)f->cfg.rms_eps;
    int rc;

    rlb__rmsnorm(b->x, L->attn_norm, rows, D, eps, b->h);
    if (L->qkv_bias)
        for (int64_t r = 0; r < rows; r++)
            memcpy(b->qkv + r * f->qkv_rows, L->qkv_bias, (size_t)f->qkv_rows * sizeof(float));
    linear(f, L->qkv, &L->qkv8, b->h, rows, D, f->qkv_rows, L->qkv_bias ? 1.0f : 0.0f, b->qkv,
           b->i8s);
    rope_and_store(f, kv, spans, n_spans, layer, b);
    attend(f, kv, spans, n_spans, layer, b);
    linear(f, L->o, &L->o8, b->attn, rows, f->hq * f->hd, D, 0.0f, b->proj, b->i8s);
    if ((rc = rlb__tp_allreduce_sum(f->comm, b->proj, (size_t)(rows * D))))
        return rc;
    add_rows(b->x, b->proj, rows * D);

    rlb__rmsnorm(b->x, L->mlp_norm, rows, D, eps, b->h);
    linear(f, L->gate_up, &L->gate_up8, b->h, rows, D, 2 * f->inter, 0.0f, b->gu, b->i8s);
    rlb__swiglu(b->gu, rows, f->inter, b->act);
    linear(f, L->down, &L->down8, b->act, rows, f->inter, D, 0.0f, b->proj, b->i8s);
    if ((rc = rlb__tp_allreduce_sum(f->comm, b->proj, (size_t)(rows * D))))
        return rc;
    add_rows(b->x, b->proj, rows * D);
    return 0;
}

/* Final norm and LM head for the wanted rows; gathers the ranks' vocabulary slices. */
static int head_logits(rlb_forward *f, const rlb_fwd_span *spans, int64_t n_spans,
                       int64_t out, fwd_bufs *b, float *logits)
{
    int64_t D = f->D, r = 0, o = 0;
    for (int64_t s = 0; s < n_spans; r += spans[s].n, s++) {
        if (spans[s].logits == RLB_FWD_LOGITS_ALL) {
            memcpy(b->sel + o * D, b->x + r * D, (size_t)(spans[s].n * D) * sizeof(float));
            o += spans[s].n;
        } else if (spans[s].logits == RLB_FWD_LOGITS_LAST) {
            memcpy(b->sel + o * D, b->x + (r + spans[s].n - 1) * D, (size_t)D * sizeof(float));
            o++;
        }
    }
    if (out == 0)
        return 0;
    rlb__rmsnorm(b->sel, f->final_norm, out, D, (float)f->cfg.rms_eps, b->sel);
    linear(f, f->head, &f->head8, b->sel, out, D, f->vp_local, 0.0f, b->loc, b->i8s);
    int64_t T = f->comm->size, vl = f->vp_local;
    int rc = rlb__tp_allgather(f->comm, b->loc, (size_t)(out * vl), b->gath);
    if (rc)
        return rc;
    /* gath is [T][out][vl]; row o's logits are the ranks' slices side by side, cut at V. */
    for (int64_t row = 0; row < out; row++)
        for (int64_t t = 0; t < T && t * vl < f->vocab; t++) {
            int64_t n = f->vocab - t * vl < vl ? f->vocab - t * vl : vl;
            memcpy(logits + row * f->vocab + t * vl, b->gath + (t * out + row) * vl,
                   (size_t)n * sizeof(float));
        }
    return 0;
}

int rlb__forward_run(rlb_forward *f, rlb_kvcache *kv, const rlb_fwd_span *spans,
                     int64_t n_spans, float *logits)
{
    int64_t rows, ctx;
    if (!kv->k || kv->n_layers != f->cfg.n_layers || kv->kvt != f->kvt || kv->hd != f->hd)
        return RLB_EINVAL;
    int rc = check_spans(f, kv, spans, n_spans, &rows, &ctx);
    if (rc || rows == 0)
        return rc;
    int64_t out = rlb__forward_logit_rows(spans, n_spans);
    fwd_bufs b;
    if ((rc = scratch_reserve(f, rows, out, ctx, &b)))
        return rc;
    int64_t half = f->hd / 2, r = 0;
    for (int64_t s = 0; s < n_spans; s++)
        for (int64_t i = 0; i < spans[s].n; i++, r++)
            rlb__rope_cos_sin(f->inv_freq, half, spans[s].pos0 + i, b.cosv + r * half,
                              b.sinv + r * half);
    if ((rc = embed_rows(f, spans, n_spans, b.x, rows)))
        return rc;
    for (int64_t l = 0; l < f->cfg.n_layers; l++)
        if ((rc = run_layer(f, kv, spans, n_spans, l, rows, &b)))
            return rc;
    return head_logits(f, spans, n_spans, out, &b, logits);
}
