/* config.h: a Llama / Qwen2-family model's hyper-parameters, as read from a HF config.json.
 *
 * Pure logic: rlb__config_parse works on a buffer so a fuzzer can drive it; _load reads a
 * file and calls it. Errors name the offending field or architecture in `err`.
 */
#ifndef RLB_MODEL_CONFIG_H
#define RLB_MODEL_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "rlb/rlb.h"

typedef enum rlb_arch {
    RLB_ARCH_LLAMA = 0, /* LlamaForCausalLM (also Mistral-style configs without sliding window) */
    RLB_ARCH_QWEN2 = 1  /* Qwen2ForCausalLM: q/k/v bias, no o bias */
} rlb_arch;

typedef enum rlb_rope_type {
    RLB_ROPE_DEFAULT = 0, /* inv_freq = theta^(-2i/hd) */
    RLB_ROPE_LLAMA3 = 1   /* Llama 3.1 frequency scaling (factor, low/high freq factors) */
} rlb_rope_type;

typedef struct rlb_model_config {
    rlb_arch arch;
    int64_t hidden;        /* D: hidden_size */
    int64_t intermediate;  /* I: intermediate_size */
    int64_t n_heads;       /* H: num_attention_heads */
    int64_t n_kv_heads;    /* KV: num_key_value_heads (defaults to H) */
    int64_t head_dim;      /* hd: head_dim, or D/H when absent */
    int64_t n_layers;      /* num_hidden_layers */
    int64_t vocab;         /* V: vocab_size */
    int64_t max_pos;       /* max_position_embeddings */
    double rms_eps;        /* rms_norm_eps */
    double rope_theta;     /* rope_theta (top level or rope_parameters) */
    rlb_rope_type rope_type;
    double rope_factor;           /* llama3: factor */
    double rope_low_freq_factor;  /* llama3: low_freq_factor */
    double rope_high_freq_factor; /* llama3: high_freq_factor */
    int64_t rope_orig_max_pos;    /* llama3: original_max_position_embeddings */
    int tie_embeddings;    /* tie_word_embeddings: LM head reads the embedding */
    int attn_bias;         /* q/k/v projections carry a bias (Qwen2) */
    rlb_dtype dtype;       /* dtype (or torch_dtype) of the checkpoint */
} rlb_model_config;

/* Parses config.json text. Returns 0, or RLB_EINVAL / RLB_EUNSUPPORTED with `err` naming
 * the field or architecture. `err` may be NULL. */
int rlb__config_parse(const char *json, size_t len, rlb_model_config *cfg, char *err,
                      size_t errlen);
/* Reads and parses a config.json file (RLB_ENOTFOUND when it is missing). */
int rlb__config_load(const char *path, rlb_model_config *cfg, char *err, size_t errlen);
/* Checks internal consistency (positive sizes, H % KV == 0, ...). Returns 0 or RLB_EINVAL. */
int rlb__config_validate(const rlb_model_config *cfg, char *err, size_t errlen);

#endif /* RLB_MODEL_CONFIG_H */
