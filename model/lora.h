/* lora.h: LoRA adapters as parameters of the model, and PEFT's names for them (DESIGN §10).
 *
 * An adapter of a weight W [out, in] (q, k, v, o, gate, up or down of a layer, lm_head) is
 * two more parameters named after W's module, with HF naming:
 *   <module>.lora_A.weight   [r, in]
 *   <module>.lora_B.weight   [out, r]
 * and the workers get W + s * B * A, where s = alpha / r (alpha / sqrt(r) with rsLoRA).
 * The embedding follows PEFT's nn.Embedding adapter: A [r, V], B [D, r], and the delta is
 * (B * A)^T, so its rows are tokens like W's.
 *
 * Adapters are added to a parameter list after rlb__params_init (rlb__params_add_adapter),
 * so a source registers their factors like any tensor (full, FSDP2, or entries of an FSDP1
 * unit) and the planner finds them there; a factor of a weight that has no adapter in the
 * list is dropped rather than refused (rlb__params_is_dropped), so taking the adapters out
 * of the list serves the base again without touching what the trainer registered.
 *
 * rlb_peft_to_hf (include/rlb/rlb.h, client/lora.c) maps a PEFT model's parameter names to
 * these.
 */
#ifndef RLB_MODEL_LORA_H
#define RLB_MODEL_LORA_H

#include <stddef.h>
#include <stdint.h>

#include "model/params.h"

/* Which factor of an adapter a name is. */
typedef enum rlb_lora_factor { RLB_LORA_A = 0, RLB_LORA_B = 1 } rlb_lora_factor;

/* 1 when parameter `base` of the list may carry an adapter (a 2-D weight: q, k, v, o,
 * gate, up, down, embed, lm_head), 0 otherwise. */
int rlb__lora_adaptable(const rlb_param_list *list, int64_t base);

/* Adds an adapter of rank r and scale s to the weight called `target` (its HF name,
 * "model.layers.0.self_attn.q_proj.weight"): its A and B factors become parameters of the
 * list. Returns 0, or with `err` naming the target: RLB_ENOTFOUND (no such weight),
 * RLB_EINVAL (not adaptable, r outside [1, min(out, in)], s not finite), RLB_EEXIST (it has
 * an adapter already), RLB_ENOMEM (the list is unchanged on every failure). */
int rlb__params_add_adapter(rlb_param_list *list, const char *target, int64_t rank,
                            float scale, char *err, size_t errlen);

/* The adapter of weight `base`, or NULL when it has none. */
const rlb_param_adapter *rlb__params_adapter_of(const rlb_param_list *list, int64_t base);

/* Splits an adapter factor's name "<module>.lora_A.weight" / ".lora_B.weight" into the
 * name of the weight it adapts ("<module>.weight", into target[cap]) and its factor.
 * Returns 0, or RLB_EINVAL when `name` is not a factor's name, RLB_ETOOBIG when target is
 * too small. */
int rlb__lora_split_name(const char *name, char *target, size_t cap, rlb_lora_factor *factor);

#endif /* RLB_MODEL_LORA_H */
