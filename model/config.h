/* config.h: a Llama / Qwen2-family model's hyper-parameters, as read from a HF config.json.
 *
 * Pure logic: rlb__config_parse works on a buffer so a fuzzer can drive it; _load reads a
 * file and calls it. Errors name the offending field or architecture in `err`.
 *
 * What is accepted: architectures[0] LlamaForCausalLM or Qwen2ForCausalLM (or, without
 * `architectures`, model_type llama / qwen2); RoPE default or llama3, given top-level
 * (rope_theta + rope_scaling) or under rope_parameters (transformers 5). Refused with
 * RLB_EUNSUPPORTED, by name: other architectures and rope types, Llama with
 * attention_bias or mlp_bias true (we carry no o / MLP biases), hidden_act other than silu,
 * Qwen2 with use_sliding_window true, and quantization_config (quantized checkpoints).
 * Defaults when absent: num_key_value_heads = H, head_dim = D/H, rope_theta = 10000,
 * tie_word_embeddings = false, dtype float32.
 */
#ifndef RLB_MODEL_CONFIG_H
#define RLB_MODEL_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "rlb/rlb.h"

/* Largest accepted size of any dimension (D, I, V, H, hd, layers, positions): keeps every
 * product downstream (V * D * 8 bytes, ...) far inside int64_t. */
#define RLB_CONFIG_MAX_DIM (INT64_C(1) << 24)

typedef enum rlb_arch {
    RLB_ARCH_LLAMA = 0, /* LlamaForCausalLM */
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
/* Reads DIR/config.json (a HF checkpoint directory). Returns 0 or the reader's error, `err`
 * saying what. */
int rlb__config_load_dir(const char *dir, rlb_model_config *cfg, char *err, size_t errlen);
/* Checks internal consistency: sizes positive and at most RLB_CONFIG_MAX_DIM, H % KV == 0,
 * hd even, eps / theta positive and finite, llama3 factors sane, dtype F32/BF16/F16.
 * Returns 0 or RLB_EINVAL with `err` naming the field. */
int rlb__config_validate(const rlb_model_config *cfg, char *err, size_t errlen);
/* The built-in tiny demo model (Llama, D 64, I 192, H 4, KV 2, hd 16, 2 layers, V 250,
 * untied, rope_theta 1e4, rms_eps 1e-5, max_pos 512, F32). Always valid. */
void rlb__config_tiny(rlb_model_config *cfg);
/* "LlamaForCausalLM" / "Qwen2ForCausalLM", or "?" outside the enum. */
const char *rlb__config_arch_name(rlb_arch arch);

/* Shared by the model/ readers: formats a message into err[errlen] (when err is non-NULL
 * and errlen > 0) and returns `code`, so a failure reads `return rlb__model_err(...)`. */
int rlb__model_err(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif /* RLB_MODEL_CONFIG_H */
