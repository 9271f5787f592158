/* tp_layout.h: where each local tensor of one tensor-parallel worker lives in its weight
 * buffer. The shapes and row/column mapping are DESIGN §4's table (vLLM's TP layout):
 *
 *   qkv      [(Hq+2KVt)hd, D]  q rows of heads t*Hq.., then k rows of kv heads kv0.., then v
 *   qkv_bias [(Hq+2KVt)hd]     Qwen2 only, same row order
 *   o        [D, Hq*hd]        col c -> global col t*Hq*hd + c
 *   gate_up  [2I/T, D]         gate rows t*I/T.., then up rows t*I/T..
 *   down     [D, I/T]          col c -> global col t*I/T + c
 *   embed, lm_head [Vp/T, D]   row r -> token t*Vp/T + r, Vp = ceil(V/64)*64, zero past V
 *   norms    [D]               replicated
 *
 * Hq = H/T. KV >= T: KVt = KV/T, kv0 = t*KVt. KV < T: KVt = 1, kv0 = t/(T/KV).
 * A worker's buffer holds all its tensors, each at a 256-byte aligned offset, in the order
 * embed, final_norm, lm_head (untied only), then per layer attn_norm, qkv, qkv_bias (Qwen2),
 * o, mlp_norm, gate_up, down. Vectors have cols == 1.
 */
#ifndef RLB_MODEL_TP_LAYOUT_H
#define RLB_MODEL_TP_LAYOUT_H

#include <stdint.h>

#include "model/config.h"

#define RLB_TP_ALIGN 256u   /* byte alignment of every local tensor in a worker buffer */
#define RLB_VOCAB_PAD 64    /* vocabulary rows are padded to a multiple of this */

typedef enum rlb_wkind {
    RLB_W_EMBED = 0,  /* global: [Vp/T, D] */
    RLB_W_FINAL_NORM, /* global: [D] */
    RLB_W_LM_HEAD,    /* global: [Vp/T, D]; absent when embeddings are tied */
    RLB_W_ATTN_NORM,  /* per layer: input_layernorm [D] */
    RLB_W_QKV,        /* per layer: [(Hq+2KVt)hd, D] */
    RLB_W_QKV_BIAS,   /* per layer: [(Hq+2KVt)hd]; Qwen2 only */
    RLB_W_O,          /* per layer: [D, Hq*hd] */
    RLB_W_MLP_NORM,   /* per layer: post_attention_layernorm [D] */
    RLB_W_GATE_UP,    /* per layer: [2I/T, D] */
    RLB_W_DOWN,       /* per layer: [D, I/T] */
    RLB_W_KIND_COUNT_
} rlb_wkind;

typedef struct rlb_local_tensor {
    rlb_wkind kind;
    int32_t layer;   /* layer index, -1 for the global tensors */
    int64_t rows;    /* first dimension */
    int64_t cols;    /* second dimension; 1 for vectors */
    uint64_t offset; /* byte offset in the worker's weight buffer (RLB_TP_ALIGN-aligned) */
    uint64_t bytes;  /* rows * cols * dtype size */
} rlb_local_tensor;

typedef struct rlb_tp_layout {
    rlb_model_config cfg;      /* copy of the model config */
    int32_t tp_size;           /* T */
    int32_t tp_rank;           /* t */
    rlb_dtype dtype;           /* element type of the buffer */
    int64_t hq;                /* query heads per rank, H/T */
    int64_t kvt;               /* kv heads per rank */
    int64_t kv0;               /* first global kv head of this rank */
    int64_t vp;                /* padded vocabulary Vp, a multiple of RLB_VOCAB_PAD */
    int64_t n_tensors;         /* entries in tensors[] */
    rlb_local_tensor *tensors; /* in buffer order */
    int32_t *index;            /* [(n_layers + 1) * RLB_W_KIND_COUNT_] -> tensors[] or -1 */
    uint64_t total_bytes;      /* size the worker buffer must have */
} rlb_tp_layout;

/* Checks that T is a valid TP size for the model: H%T==0, I%T==0, KV%T==0 or T%KV==0,
 * and Vp%T==0 (as vLLM requires). Returns 0, RLB_EINVAL (the config itself fails
 * rlb__config_validate) or RLB_EUNSUPPORTED, with `err` saying which rule fails (`err` may
 * be NULL). */
int rlb__tp_check(const rlb_model_config *cfg, int tp_size, char *err, size_t errlen);
/* Builds the layout of rank t of T for a buffer of `dtype` elements. Returns 0,
 * RLB_EUNSUPPORTED (bad T), RLB_EINVAL (bad config or rank) or RLB_ENOMEM. */
int rlb__tp_layout_init(rlb_tp_layout *layout, const rlb_model_config *cfg, int tp_size,
                        int tp_rank, rlb_dtype dtype);
void rlb__tp_layout_free(rlb_tp_layout *layout);
/* The tensor of `kind` in `layer` (-1 for globals), or NULL when the model has none. */
const rlb_local_tensor *rlb__tp_layout_find(const rlb_tp_layout *layout, rlb_wkind kind,
                                            int layer);
/* Padded vocabulary Vp = ceil(V/64)*64. */
int64_t rlb__tp_vocab_padded(int64_t vocab);

#endif /* RLB_MODEL_TP_LAYOUT_H */
