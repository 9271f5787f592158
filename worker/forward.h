/* forward.h: the forward pass of a Llama / Qwen2 model on one TP rank of the CPU backend.
 *
 * It reads the rank's weights in place from the worker weight buffer (float32, laid out by
 * model/tp_layout.h) and runs a batch of sequence spans through the model:
 *   embedding  vocab-parallel rows of this rank, zero for other ranks' tokens, all-reduced
 *   per layer  x += allreduce(o_proj(attention(rope(qkv(rmsnorm(x))))))
 *              x += allreduce(down(swiglu(gate_up(rmsnorm(x)))))
 *   head       rmsnorm, this rank's Vp/T logits (LM head, or the embedding when tied),
 *              all-gathered and cut to the V real ids
 * Each span is n consecutive tokens of one sequence starting at position pos0, with the
 * keys / values of positions 0..pos0-1 already in its KV blocks; the span's own keys and
 * values are written into the blocks as it runs (so prefill chunks and decode steps are the
 * same operation). Rows need no padding; the batch is the concatenation of the spans.
 *
 * Post-load processing (quant = int8): qkv, o, gate_up, down and the LM head are quantized
 * per output row (rlb__quant_int8_rows) into buffers allocated once at init; the matrix
 * products then read the int8 copies. Embedding, norms and biases stay float32.
 * rlb__forward_postload must run again after new weights land in the buffer; running it
 * twice gives the same bytes as once.
 */
#ifndef RLB_WORKER_FORWARD_H
#define RLB_WORKER_FORWARD_H

#include <stdint.h>

#include "model/tp_layout.h"
#include "worker/kvcache.h"
#include "worker/tp_comm.h"

typedef enum rlb_quant {
    RLB_QUANT_NONE = 0, /* float32 weights as loaded */
    RLB_QUANT_INT8 = 1  /* int8 weight-only, one scale per output row */
} rlb_quant;

/* Logits a span asks for. */
typedef enum rlb_fwd_logits {
    RLB_FWD_LOGITS_NONE = 0, /* a prefill chunk that does not end the prompt */
    RLB_FWD_LOGITS_LAST = 1, /* the span's last token (next-token distribution) */
    RLB_FWD_LOGITS_ALL = 2   /* every token of the span (prompt logprobs, tests) */
} rlb_fwd_logits;

typedef struct rlb_fwd_span {
    const int32_t *tokens;         /* [n] ids of positions pos0 .. pos0 + n - 1 */
    int64_t n;                     /* tokens in the span, >= 1 */
    int64_t pos0;                  /* position of tokens[0] */
    const rlb_block_table *blocks; /* the sequence's blocks, covering [0, pos0 + n) */
    rlb_fwd_logits logits;         /* which rows' logits to return */
} rlb_fwd_span;

/* An int8 copy of one local matrix. */
typedef struct rlb_i8_weight {
    int8_t *q;      /* [rows * cols], inside the forward state's arena */
    float *scale;   /* [rows] */
    int64_t rows;   /* output rows */
    int64_t cols;   /* input columns */
} rlb_i8_weight;

/* One matrix post-load processing quantizes: its float32 source and its int8 copy. */
typedef struct rlb_i8_job {
    const float *src;  /* [rows, cols] in the weight buffer */
    rlb_i8_weight *w;  /* where the int8 copy lives */
} rlb_i8_job;

/* Pointers into the weight buffer for one decoder layer, plus its int8 copies. */
typedef struct rlb_fwd_layer {
    const float *attn_norm, *qkv, *qkv_bias, *o, *mlp_norm, *gate_up, *down; /* bias may be NULL */
    rlb_i8_weight qkv8, o8, gate_up8, down8; /* q == NULL unless quant is int8 */
} rlb_fwd_layer;

typedef struct rlb_forward {
    rlb_model_config cfg;   /* the model */
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
    const void *weights;    /* the weight buffer every pointer below points into */
    const float *embed, *final_norm, *head; /* head = lm_head or embed (tied) */
    rlb_i8_weight head8;    /* int8 LM head (quant int8) */
    rlb_fwd_layer *layers;  /* [n_layers] */
    rlb_i8_job *i8_jobs;    /* [n_i8] what post-load processing quantizes (int8 only) */
    int64_t n_i8;           /* entries in i8_jobs */
    void *i8_arena;         /* every int8 buffer and scale, allocated once */
    void *scratch;          /* per-batch buffers, grown on demand */
    uint64_t scratch_bytes; /* size of scratch */
    int64_t cap_rows, cap_out, cap_ctx; /* what scratch is sized for */
} rlb_forward;

/* Binds the forward pass to rank comm->rank's weights: `weights` (layout->total_bytes,
 * float32) must stay valid and is only read. Allocates the int8 buffers when quant is
 * int8 and runs post-load processing once. Returns 0, RLB_EINVAL (layout and comm disagree,
 * NULL weights), RLB_EDTYPE (buffer not float32), RLB_EUNSUPPORTED (rope type) or
 * RLB_ENOMEM. */
int rlb__forward_init(rlb_forward *f, const rlb_tp_layout *layout, const void *weights,
                      rlb_tp_comm *comm, rlb_quant quant);
void rlb__forward_free(rlb_forward *f);
/* Re-runs post-load processing from the weight buffer (a no-op for quant none). */
int rlb__forward_postload(rlb_forward *f);
/* Points the forward pass at another buffer of the same layout (every tensor at the same
 * offset in `weights`) and re-runs post-load processing from it; the old buffer is not
 * read again. Returns 0, RLB_EINVAL (NULL weights) or an error of the processing. */
int rlb__forward_set_weights(rlb_forward *f, const void *weights);
/* Runs the spans; writes the asked-for logits, [rows, V] in span order, to `logits`.
 * Collective over the TP ranks (every rank passes the same spans). Returns 0, RLB_EINVAL
 * (a token id outside [0, V), a span the blocks do not cover), RLB_ENOMEM or a
 * communicator error. */
int rlb__forward_run(rlb_forward *f, rlb_kvcache *kv, const rlb_fwd_span *spans,
                     int64_t n_spans, float *logits);
/* Number of logits rows the spans ask for. */
int64_t rlb__forward_logit_rows(const rlb_fwd_span *spans, int64_t n_spans);

#endif /* RLB_WORKER_FORWARD_H */
