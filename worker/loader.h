/* loader.h: a HF checkpoint directory (config.json + safetensors) into one TP rank's
 * weight buffer.
 *
 * The checkpoint is treated as a "full" source (DESIGN §4): every safetensors file is one
 * source buffer, every tensor a whole parameter at its file offset. The reshard planner
 * (model/plan.h) maps it onto the TP layout of rank t of T with float32 elements, and the
 * CPU executor (kernels/cpu/plan_exec.h) runs only the ops that write rank t's buffer, so
 * loading is the same code path as a weight sync from a trainer. Tensors the model does
 * not have are refused by name, except buffers HF checkpoints sometimes carry that hold no
 * weights (rotary_emb.inv_freq); a tied model's lm_head.weight is dropped.
 */
#ifndef RLB_WORKER_LOADER_H
#define RLB_WORKER_LOADER_H

#include <stddef.h>

#include "model/config.h"
#include "model/tp_layout.h"

typedef struct rlb_loaded {
    rlb_tp_layout layout; /* rank t's layout (its cfg is the checkpoint's config) */
    void *weights;        /* [layout.total_bytes] weights of layout.dtype, 64-byte aligned */
} rlb_loaded;

/* Fills `weights` (layout->total_bytes, float32 layout) from the checkpoint in `dir`.
 * `threads` <= 0 takes the RLB_THREADS knob. Returns 0, RLB_ENOTFOUND (no checkpoint, a
 * tensor missing), RLB_ESHAPE (a shape differs from the config), RLB_EDTYPE, RLB_EINVAL
 * (unknown tensor, malformed file) or RLB_ENOMEM, `err` naming the file or tensor. */
int rlb__load_weights(const char *dir, const rlb_tp_layout *layout, void *weights, int threads,
                      char *err, size_t errlen);
/* Config, layout and a freshly allocated buffer for rank t of T. Returns 0, an error of
 * the two functions above, or RLB_EUNSUPPORTED (T does not fit the model). */
int rlb__load_checkpoint(const char *dir, int tp_size, int tp_rank, rlb_loaded *out, char *err,
                         size_t errlen);
/* The same with a buffer of `dtype` elements (F32, BF16, F16: what a GPU backend uploads). */
int rlb__load_checkpoint_as(const char *dir, int tp_size, int tp_rank, rlb_dtype dtype,
                            rlb_loaded *out, char *err, size_t errlen);
void rlb__loaded_free(rlb_loaded *m);

#endif /* RLB_WORKER_LOADER_H */
