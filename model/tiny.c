/* tiny.c: the built-in tiny demo model, small enough that the CPU engine runs it in
 * milliseconds and tests can check every element, yet shaped to catch layout mistakes:
 * grouped-query attention (H 4, KV 2), a vocabulary that is not a multiple of 64 (so
 * padding rows exist) and an intermediate size that divides every TP size up to 8.
 */
#include "model/config.h"

void rlb__config_tiny(rlb_model_config *cfg)
{
    *cfg = (rlb_model_config){
        .arch = RLB_ARCH_LLAMA,
        .hidden = 64,
        .intermediate = 192,
        .n_heads = 4,
        .n_kv_heads = 2,
        .head_dim = 16,
        .n_layers = 2,
        .vocab = 250,
        .max_pos = 512,
        .rms_eps = 1e-5,
        .rope_theta = 10000.0,
        .rope_type = RLB_ROPE_DEFAULT,
        .tie_embeddings = 0,
        .attn_bias = 0,
        .dtype = RLB_DTYPE_F32,
    };
}
