/* forward.c: one TP rank's forward pass over a batch of spans (see forward.h): lays the
 * step out for the backend, then walks embedding, layers and head through its interface.
 * Check: tests/unit/test_engine_hf.c (logits against HF transformers, TP 1/2/4, int8) and,
 * on a GPU, tests/gpu (the CUDA backend against the CPU backend). */
#include "worker/forward.h"

#include <stdlib.h>
#include <string.h>

#include "rlb/rlb.h"
#include "worker/backend_cpu.h"

int rlb__forward_init_on(rlb_forward *f, rlb_ebackend *b)
{
    memset(f, 0, sizeof *f);
    if (!b)
        return RLB_EINVAL;
    f->b = b;
    f->cfg = b->layout->cfg;
    f->vocab = f->cfg.vocab;
    return 0;
}

int rlb__forward_init(rlb_forward *f, const rlb_tp_layout *layout, const void *weights,
                      rlb_tp_comm *comm, rlb_quant quant)
{
    rlb_ebackend *b = NULL;
    memset(f, 0, sizeof *f);
    int rc = rlb__ebackend_cpu_create(layout, weights, comm, quant, &b);
    return rc ? rc : rlb__forward_init_on(f, b);
}

void rlb__forward_free(rlb_forward *f)
{
    if (f->b)
        f->b->iface->destroy(f->b);
    free(f->meta);
    memset(f, 0, sizeof *f);
}

int rlb__forward_postload(rlb_forward *f)
{
    return f->b->iface->postload(f->b);
}

int rlb__forward_set_weights(rlb_forward *f, const void *weights)
{
    return weights ? f->b->iface->set_weights(f->b, weights) : RLB_EINVAL;
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
                       int64_t n_spans, int64_t *rows, int64_t *ctx, int64_t *max_blocks)
{
    *rows = *ctx = *max_blocks = 0;
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
        if (sp->blocks->n > *max_blocks)
            *max_blocks = sp->blocks->n;
    }
    return 0;
}

/* Carves the batch's host arrays out of f->meta (grown when needed) and fills them. */
static int lay_out(rlb_forward *f, const rlb_kvcache *kv, const rlb_fwd_span *spans,
                   int64_t n_spans, int64_t rows, int64_t ctx, int64_t max_blocks)
{
    int64_t out = rlb__forward_logit_rows(spans, n_spans);
    uint64_t need = (uint64_t)rows * (4 + 4 + 8 + 4) + (uint64_t)n_spans * (4 + 4 + 4) +
                    (uint64_t)(n_spans * max_blocks) * 4 + (uint64_t)out * 4 + 64;
    if (need > f->meta_bytes) {
        void *m = realloc(f->meta, need);
        if (!m)
            return RLB_ENOMEM;
        f->meta = m;
        f->meta_bytes = need;
    }
    /* The int64 slots first, so they are 8-byte aligned. */
    int64_t *slot = f->meta;
    int32_t *p32 = (int32_t *)(slot + rows);
    int32_t *tokens = p32, *pos = tokens + rows, *row_span = pos + rows;
    int32_t *span_row0 = row_span + rows, *span_n = span_row0 + n_spans;
    int32_t *span_pos0 = span_n + n_spans, *tables = span_pos0 + n_spans;
    int32_t *out_rows = tables + n_spans * max_blocks;
    int64_t r = 0, o = 0, bt = kv->block_tokens;
    int decode_only = 1;
    for (int64_t s = 0; s < n_spans; s++) {
        const rlb_fwd_span *sp = &spans[s];
        span_row0[s] = (int32_t)r;
        span_n[s] = (int32_t)sp->n;
        span_pos0[s] = (int32_t)sp->pos0;
        decode_only &= sp->n == 1;
        memcpy(tables + s * max_blocks, sp->blocks->ids, (size_t)sp->blocks->n * sizeof(int32_t));
        for (int64_t k = sp->blocks->n; k < max_blocks; k++)
            tables[s * max_blocks + k] = 0;
        for (int64_t i = 0; i < sp->n; i++, r++) {
            int64_t p = sp->pos0 + i;
            tokens[r] = sp->tokens[i];
            pos[r] = (int32_t)p;
            slot[r] = (int64_t)sp->blocks->ids[p / bt] * bt + p % bt;
            row_span[r] = (int32_t)s;
            if (sp->logits == RLB_FWD_LOGITS_ALL ||
                (sp->logits == RLB_FWD_LOGITS_LAST && i == sp->n - 1))
                out_rows[o++] = (int32_t)r;
        }
    }
    f->batch = (rlb_ebatch){
        .rows = rows, .n_spans = n_spans, .out = out, .max_ctx = ctx,
        .max_blocks = max_blocks, .decode_only = decode_only, .tokens = tokens, .pos = pos,
        .slot = slot, .row_span = row_span, .span_row0 = span_row0, .span_n = span_n,
        .span_pos0 = span_pos0, .block_tables = tables, .out_rows = out_rows,
    };
    return 0;
}

static int run_layer(rlb_ebackend *b, int l)
{
    const rlb_ebackend_iface_v1 *i = b->iface;
    int rc;
    if ((rc = i->rmsnorm(b, RLB_EBUF_X, RLB_W_ATTN_NORM, l, RLB_EBUF_H)) ||
        (rc = i->linear(b, RLB_W_QKV, l, RLB_EBUF_H, RLB_EBUF_QKV)) ||
        (rc = i->rope_store(b, l)) || (rc = i->attention(b, l)) ||
        (rc = i->linear(b, RLB_W_O, l, RLB_EBUF_ATTN, RLB_EBUF_PROJ)) ||
        (rc = i->allreduce(b, RLB_EBUF_PROJ)) || (rc = i->add(b, RLB_EBUF_X, RLB_EBUF_PROJ)))
        return rc;
    if ((rc = i->rmsnorm(b, RLB_EBUF_X, RLB_W_MLP_NORM, l, RLB_EBUF_H)) ||
        (rc = i->linear(b, RLB_W_GATE_UP, l, RLB_EBUF_H, RLB_EBUF_GU)) ||
        (rc = i->swiglu(b)) || (rc = i->linear(b, RLB_W_DOWN, l, RLB_EBUF_ACT, RLB_EBUF_PROJ)) ||
        (rc = i->allreduce(b, RLB_EBUF_PROJ)) || (rc = i->add(b, RLB_EBUF_X, RLB_EBUF_PROJ)))
        return rc;
    return 0;
}

int rlb__forward_step(rlb_forward *f, rlb_kvcache *kv, const rlb_fwd_span *spans,
                      int64_t n_spans)
{
    int64_t rows, ctx, max_blocks;
    rlb_ebackend *b = f->b;
    const rlb_ebackend_iface_v1 *i = b->iface;
    if (!kv->k || kv->n_layers != f->cfg.n_layers || kv->kvt != b->layout->kvt ||
        kv->hd != f->cfg.head_dim)
        return RLB_EINVAL;
    int rc = check_spans(f, kv, spans, n_spans, &rows, &ctx, &max_blocks);
    if (rc || rows == 0) {
        f->batch.out = 0;
        return rc;
    }
    if ((rc = lay_out(f, kv, spans, n_spans, rows, ctx, max_blocks)) ||
        (rc = i->begin(b, &f->batch, kv)))
        return rc;
    int replay = i->graph_begin ? i->graph_begin(b) : 0;
    if (replay < 0)
        return replay;
    if (!replay) {
        if ((rc = i->embed(b)))
            return rc;
        for (int l = 0; l < f->cfg.n_layers; l++)
            if ((rc = run_layer(b, l)))
                return rc;
        if ((rc = i->logits(b)))
            return rc;
    }
    return i->graph_end ? i->graph_end(b) : 0;
}

int rlb__forward_read_logits(rlb_forward *f, float *logits)
{
    return f->batch.out ? f->b->iface->read_logits(f->b, logits) : 0;
}

int rlb__forward_sample(rlb_forward *f, const rlb_sample_job *jobs, int64_t n, int32_t *tokens,
                        float *logprobs)
{
    return n ? f->b->iface->sample(f->b, jobs, n, tokens, logprobs) : 0;
}

int rlb__forward_run(rlb_forward *f, rlb_kvcache *kv, const rlb_fwd_span *spans,
                     int64_t n_spans, float *logits)
{
    int rc = rlb__forward_step(f, kv, spans, n_spans);
    return rc ? rc : rlb__forward_read_logits(f, logits);
}

const char *rlb__quant_name(rlb_quant q)
{
    switch (q) {
    case RLB_QUANT_NONE: return "none";
    case RLB_QUANT_INT8: return "int8";
    case RLB_QUANT_FP8: return "fp8";
    case RLB_QUANT_FP8_CHANNEL: return "fp8-channel";
    }
    return NULL;
}

int rlb__quant_parse(const char *s, rlb_quant *out)
{
    for (int q = RLB_QUANT_NONE; q <= RLB_QUANT_FP8_CHANNEL; q++)
        if (s && !strcmp(s, rlb__quant_name((rlb_quant)q))) {
            *out = (rlb_quant)q;
            return 0;
        }
    return RLB_EINVAL;
}

int rlb__device_parse(const char *s, rlb_device *out)
{
    static const struct {
        const char *name;
        rlb_device device;
    } names[] = {{"auto", RLB_DEVICE_AUTO}, {"cpu", RLB_DEVICE_CPU}, {"cuda", RLB_DEVICE_CUDA}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (s && !strcmp(s, names[i].name)) {
            *out = names[i].device;
            return 0;
        }
    return RLB_EINVAL;
}
