/* base.c: the frozen base a bridge serves from a checkpoint (DESIGN §10).
 *
 * With opts->base_dir set (`rlb bridge --model DIR --base`), the bridge maps the checkpoint
 * once, read-only, for its whole life, and every model parameter that no trainer rank
 * registered is planned from there, each mapped file being one plan source. A LoRA trainer
 * then registers only its adapters: every sync copies the pristine base from the mapping
 * and merges onto it, and the workers hold nothing but their tensor-parallel buffers.
 * Tensors a trainer registers take precedence over the checkpoint's.
 */
#include <stdio.h>

#include "bridge/bridge_int.h"
#include "common/log.h"
#include "model/safetensors.h"

int br_base_open(bridge *b, char *err, size_t errlen)
{
    if (!b->opts->base_dir)
        return 0;
    int rc = rlb__st_open(b->opts->base_dir, &b->base, err, errlen);
    if (rc == 0)
        RLB_LOG_INFO(RLB_SUB_BRIDGE, "base checkpoint %s mapped: %zu tensors in %u files",
                     b->opts->base_dir, rlb__st_count(b->base), rlb__st_file_count(b->base));
    return rc;
}

void br_base_close(bridge *b)
{
    rlb__st_close(b->base);
    b->base = NULL;
}

int br_base_add(bridge *b, char *err, size_t errlen)
{
    if (!b->base)
        return 0;
    const rlb_param_list *pl = &b->params;
    for (int64_t i = 0; i < pl->n; i++) {
        const rlb_param *p = &pl->params[i];
        if (b->source.added[i] || p->role == RLB_ROLE_LORA_A || p->role == RLB_ROLE_LORA_B)
            continue;
        const rlb_st_tensor *t = rlb__st_find(b->base, p->name);
        if (!t) {
            snprintf(b->reg_missing, sizeof(b->reg_missing), "tensor '%s': neither registered "
                     "nor in the base checkpoint", p->name);
            return 1;
        }
        uint64_t len;
        const void *file = rlb__st_file_base(b->base, t->file, &len);
        uint32_t buffer;
        int rc = br_source_buffer(b, file, len, &buffer);
        if (rc == 0)
            rc = rlb__source_add_full(&b->source, p->name, t->ndim, t->shape, t->dtype, buffer,
                                      t->file_offset, err, errlen);
        if (rc < 0)
            return rc;
    }
    return 0;
}
