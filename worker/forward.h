/* forward.h: the forward pass of a Llama / Qwen2 model on one TP rank, over an engine
 * backend (worker/ebackend.h):
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
 * This file only lays out the step (tokens, positions, KV slots, block tables, which rows
 * want logits) and walks the layers; the backend does the arithmetic, on the CPU or a GPU.
 * Post-load processing belongs to the backend (rlb__forward_postload asks it to run again
 * after new weights land in the buffer; running it twice gives the same bytes as once).
 */
#ifndef RLB_WORKER_FORWARD_H
#define RLB_WORKER_FORWARD_H

#include <stdint.h>

#include "model/tp_layout.h"
#include "worker/ebackend.h"
#include "worker/kvcache.h"
#include "common/tp_comm.h"

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

typedef struct rlb_forward {
    rlb_model_config cfg;   /* the model */
    rlb_ebackend *b;        /* the backend (owned) */
    int64_t vocab;          /* V */
    rlb_ebatch batch;       /* the step being run; its arrays point into `meta` */
    void *meta;             /* host arrays of the batch, grown on demand */
    uint64_t meta_bytes;    /* size of meta */
} rlb_forward;

/* Binds the forward pass to a CPU backend over rank comm->rank's float32 weights (see
 * rlb__ebackend_cpu_create). Returns 0 or the backend's error. */
int rlb__forward_init(rlb_forward *f, const rlb_tp_layout *layout, const void *weights,
                      rlb_tp_comm *comm, rlb_quant quant);
/* Binds the forward pass to backend `b`, which it owns from now on (also on failure).
 * Returns 0 or RLB_EINVAL (NULL). */
int rlb__forward_init_on(rlb_forward *f, rlb_ebackend *b);
void rlb__forward_free(rlb_forward *f);
/* Re-runs post-load processing from the weight buffer. */
int rlb__forward_postload(rlb_forward *f);
/* Points the forward pass at another buffer of the same layout (every tensor at the same
 * offset in `weights`) and re-runs post-load processing from it; the old buffer is not
 * read again. Returns 0, RLB_EINVAL (NULL weights) or an error of the processing. */
int rlb__forward_set_weights(rlb_forward *f, const void *weights);
/* Runs the spans up to their logits, which stay in the backend for rlb__forward_sample or
 * rlb__forward_read_logits. Collective over the TP ranks (every rank passes the same
 * spans). Returns 0, RLB_EINVAL (a token id outside [0, V), a span the blocks do not
 * cover), RLB_ENOMEM or an error of the backend. */
int rlb__forward_step(rlb_forward *f, rlb_kvcache *kv, const rlb_fwd_span *spans,
                      int64_t n_spans);
/* The step's logits, [rows, V] in span order (rlb__forward_logit_rows rows). */
int rlb__forward_read_logits(rlb_forward *f, float *logits);
/* Samples jobs[i] from the step's logits into tokens[i], logprobs[i]. */
int rlb__forward_sample(rlb_forward *f, const rlb_sample_job *jobs, int64_t n, int32_t *tokens,
                        float *logprobs);
/* rlb__forward_step, then the asked-for logits, [rows, V] in span order, into `logits`. */
int rlb__forward_run(rlb_forward *f, rlb_kvcache *kv, const rlb_fwd_span *spans,
                     int64_t n_spans, float *logits);
/* Number of logits rows the spans ask for. */
int64_t rlb__forward_logit_rows(const rlb_fwd_span *spans, int64_t n_spans);

#endif /* RLB_WORKER_FORWARD_H */
