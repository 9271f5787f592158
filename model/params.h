/* params.h: the canonical list of a model's parameters, as HF names them, with each one's
 * role in the tensor-parallel layout (DESIGN §4).
 *
 * For a Llama / Qwen2 config the list is, in this order:
 *   model.embed_tokens.weight                        [V, D]        vocab-parallel -> embed
 *   per layer i, prefix model.layers.i.:
 *     input_layernorm.weight                         [D]           replicated -> attn_norm
 *     self_attn.q_proj.weight                        [H*hd, D]     qkv rows, q part
 *     self_attn.k_proj.weight / v_proj.weight        [KV*hd, D]    qkv rows, k / v part
 *     self_attn.{q,k,v}_proj.bias (Qwen2)            [H*hd] / [KV*hd]  qkv_bias, same parts
 *     self_attn.o_proj.weight                        [D, H*hd]     row-parallel (cols split)
 *     post_attention_layernorm.weight                [D]           replicated -> mlp_norm
 *     mlp.gate_proj.weight / up_proj.weight          [I, D]        gate_up rows, gate / up
 *     mlp.down_proj.weight                           [D, I]        row-parallel (cols split)
 *   model.norm.weight                                [D]           replicated -> final_norm
 *   lm_head.weight (untied only)                     [V, D]        vocab-parallel -> lm_head
 *
 * Shapes are kept as [rows, cols] with cols == 1 for vectors (ndim says which the HF tensor
 * is). rlb__param_region says where a parameter's elements land in one TP rank's local
 * tensor: a rectangle of global rows x cols that maps onto a rectangle of the local tensor,
 * plus (vocab-parallel only) the local rows past V that must be zero. Name lookup is a hash
 * table, O(1) per name.
 */
#ifndef RLB_MODEL_PARAMS_H
#define RLB_MODEL_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#include "model/config.h"
#include "model/tp_layout.h"

/* Room for the longest HF parameter name, NUL included: 13 + 8 digits (layers are below
 * RLB_CONFIG_MAX_DIM) + 32 for ".post_attention_layernorm.weight" + 1 = 54. */
#define RLB_PARAM_NAME_MAX 64

typedef enum rlb_param_role {
    RLB_ROLE_REPLICATED = 0, /* norms: the whole vector on every rank */
    RLB_ROLE_VOCAB,          /* embed, lm_head: rows split over T, padded to Vp with zeros */
    RLB_ROLE_QKV_Q,          /* q_proj weight/bias: first Hq*hd rows of the fused qkv */
    RLB_ROLE_QKV_K,          /* k_proj weight/bias: next KVt*hd rows */
    RLB_ROLE_QKV_V,          /* v_proj weight/bias: last KVt*hd rows */
    RLB_ROLE_GATE,           /* gate_proj: first I/T rows of the fused gate_up */
    RLB_ROLE_UP,             /* up_proj: last I/T rows of the fused gate_up */
    RLB_ROLE_ROW_PARALLEL,   /* o_proj, down_proj: columns split over T */
    RLB_ROLE_LORA_A,         /* a LoRA adapter's A: in no local tensor, merged (model/lora.h) */
    RLB_ROLE_LORA_B          /* a LoRA adapter's B: likewise */
} rlb_param_role;

typedef struct rlb_param {
    char name[RLB_PARAM_NAME_MAX]; /* HF name, e.g. "model.layers.3.self_attn.q_proj.weight" */
    int32_t layer;                 /* decoder layer, -1 for embed / final norm / lm_head */
    int32_t ndim;                  /* 1 (vector) or 2 (matrix), as the HF tensor has it */
    int64_t rows;                  /* global d0 */
    int64_t cols;                  /* global d1; 1 for vectors */
    rlb_wkind target;              /* local tensor of the TP layout it lands in */
    rlb_param_role role;           /* how its rows / cols spread over TP ranks */
} rlb_param;

/* A LoRA adapter of one weight (model/lora.h): the workers get base + scale * B * A. */
typedef struct rlb_param_adapter {
    int64_t base;  /* the weight it adapts (index into params[]) */
    int64_t a;     /* its A factor: [rank, in] ([rank, V] for the embedding) */
    int64_t b;     /* its B factor: [out, rank] ([D, rank] for the embedding) */
    int64_t rank;  /* r */
    float scale;   /* alpha / r, or alpha / sqrt(r) for rsLoRA */
} rlb_param_adapter;

typedef struct rlb_param_list {
    rlb_model_config cfg; /* copy of the model config the list was built for */
    int64_t n;            /* entries in params[] */
    rlb_param *params;    /* canonical order (above), then adapter factors in the order added */
    int64_t cap;          /* allocated entries of params[] */
    uint32_t hash_cap;    /* slots in hash[], a power of two >= 2n */
    int32_t *hash;        /* open addressing on the name: index into params[], -1 empty */
    int64_t n_adapters;   /* entries in adapters[] */
    rlb_param_adapter *adapters; /* LoRA adapters added with rlb__params_add_adapter */
} rlb_param_list;

/* Where parameter p lands in TP rank t's local tensor `target`: global rows
 * [row0, row0+n_rows) x cols [col0, col0+n_cols) go to local rows [lrow0, ..) x local cols
 * [lcol0, ..) of a local tensor with `local_cols` columns. Local rows
 * [zero_row0, zero_row0+n_zero_rows), all columns, hold zeros (vocabulary padding). */
typedef struct rlb_param_region {
    int64_t row0, n_rows; /* global rows of the parameter this rank holds */
    int64_t col0, n_cols; /* global columns of the parameter this rank holds */
    int64_t lrow0;        /* local row of global row row0 */
    int64_t lcol0;        /* local column of global column col0 */
    int64_t local_cols;   /* columns of the local tensor (its row length in elements) */
    int64_t zero_row0;    /* first local padding row (vocab-parallel only) */
    int64_t n_zero_rows;  /* padding rows; 0 for every other role */
} rlb_param_region;

/* Builds the list for `cfg`. Returns 0, RLB_EINVAL (config fails rlb__config_validate,
 * `err` names the field) or RLB_ENOMEM. `err` may be NULL. */
int rlb__params_init(rlb_param_list *list, const rlb_model_config *cfg, char *err,
                     size_t errlen);
void rlb__params_free(rlb_param_list *list);
/* Index of the parameter called `name` (NUL-terminated), or -1 when the model has none. */
int64_t rlb__params_find(const rlb_param_list *list, const char *name);
/* 1 when `name` is a tensor a source may carry but the model does not use, so it is
 * dropped rather than refused: lm_head.weight of a model with tied embeddings, and a LoRA
 * factor of a weight that has no adapter in the list (model/lora.h). */
int rlb__params_is_dropped(const rlb_param_list *list, const char *name);
/* Makes room for `more` appended parameters. Returns 0 or RLB_ENOMEM (the list keeps its
 * entries either way). */
int rlb__params_reserve(rlb_param_list *list, int64_t more);
/* Appends `p`, whose name is not in the list yet, to the list and its name index, in room
 * made by rlb__params_reserve. */
void rlb__params_append(rlb_param_list *list, const rlb_param *p);
/* Element count rows * cols of a parameter. */
uint64_t rlb__param_numel(const rlb_param *p);

/* FSDP1 with one wrap unit per decoder layer and one for the rest (embeddings, final norm,
 * head), as the tests and `rlb stress` shard the model: the unit of parameter p, 0 for the
 * rest, 1 + layer otherwise. */
int rlb__param_fsdp1_unit(const rlb_param *p);
/* One piece of an FSDP1 flat layout: parameter p (its list index; -1 for padding) occupies
 * flat elements [start, start + numel). */
typedef void (*rlb_flat_piece_fn)(void *arg, int64_t p, uint64_t start, uint64_t numel);
/* The flat layout of unit `unit` (DESIGN §4, FSDP1 source): the unit's parameters in list
 * order, each start aligned to a multiple of `align` elements (use_orig_params; 1 = none)
 * with padding before it, the total padded to a multiple of `world`. Calls piece (when not
 * NULL) for every parameter and padding run in flat order; returns the padded total. */
uint64_t rlb__params_fsdp1_walk(const rlb_param_list *list, int unit, uint32_t align,
                                uint32_t world, rlb_flat_piece_fn piece, void *arg);
/* Fills `r` for parameter p on the layout's TP rank (DESIGN §4 table). `layout` must be
 * built for the list's config. */
void rlb__param_region(const rlb_param *p, const rlb_tp_layout *layout, rlb_param_region *r);

#endif /* RLB_MODEL_PARAMS_H */
