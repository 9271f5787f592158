/* lora.c: LoRA adapters in the parameter list (see lora.h). */
#include "model/lora.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char suffix_weight[] = ".weight";

int rlb__lora_adaptable(const rlb_param_list *list, int64_t base)
{
    if (base < 0 || base >= list->n)
        return 0;
    const rlb_param *p = &list->params[base];
    if (p->ndim != 2)
        return 0;
    switch (p->role) {
    case RLB_ROLE_VOCAB:
    case RLB_ROLE_QKV_Q:
    case RLB_ROLE_QKV_K:
    case RLB_ROLE_QKV_V:
    case RLB_ROLE_GATE:
    case RLB_ROLE_UP:
    case RLB_ROLE_ROW_PARALLEL:
        return 1;
    default:
        return 0;
    }
}

const rlb_param_adapter *rlb__params_adapter_of(const rlb_param_list *list, int64_t base)
{
    for (int64_t i = 0; i < list->n_adapters; i++)
        if (list->adapters[i].base == base)
            return &list->adapters[i];
    return NULL;
}

int rlb__lora_split_name(const char *name, char *target, size_t cap, rlb_lora_factor *factor)
{
    static const char a[] = ".lora_A.weight", b[] = ".lora_B.weight";
    size_t n = name ? strlen(name) : 0, k = sizeof a - 1;
    if (n <= k)
        return RLB_EINVAL;
    if (!strcmp(name + n - k, a))
        *factor = RLB_LORA_A;
    else if (!strcmp(name + n - k, b))
        *factor = RLB_LORA_B;
    else
        return RLB_EINVAL;
    int w = snprintf(target, cap, "%.*s%s", (int)(n - k), name, suffix_weight);
    return w < 0 || (size_t)w >= cap ? RLB_ETOOBIG : 0;
}

/* Names "<module>.lora_A.weight" / ".lora_B.weight" of weight p's factors. */
static int factor_name(const rlb_param *p, rlb_lora_factor f, char *out, size_t cap)
{
    size_t n = strlen(p->name), k = sizeof suffix_weight - 1;
    if (n <= k || strcmp(p->name + n - k, suffix_weight))
        return RLB_EINVAL;
    int w = snprintf(out, cap, "%.*s.lora_%c.weight", (int)(n - k), p->name,
                     f == RLB_LORA_A ? 'A' : 'B');
    return w < 0 || (size_t)w >= cap ? RLB_ETOOBIG : 0;
}

int rlb__params_add_adapter(rlb_param_list *list, const char *target, int64_t rank,
                            float scale, char *err, size_t errlen)
{
    int64_t base = rlb__params_find(list, target);
    if (base < 0)
        return rlb__model_err(err, errlen, RLB_ENOTFOUND, "adapter of '%s': no such weight",
                              target ? target : "(null)");
    const rlb_param *w = &list->params[base];
    if (!rlb__lora_adaptable(list, base))
        return rlb__model_err(err, errlen, RLB_EINVAL, "adapter of '%s': only the 2-D "
                              "weights of q, k, v, o, gate, up, down, embed and lm_head take "
                              "LoRA adapters", target);
    if (rlb__params_adapter_of(list, base))
        return rlb__model_err(err, errlen, RLB_EEXIST, "adapter of '%s': it has one already",
                              target);
    int64_t lim = w->rows < w->cols ? w->rows : w->cols;
    if (rank < 1 || rank > lim || !isfinite(scale))
        return rlb__model_err(err, errlen, RLB_EINVAL, "adapter of '%s': rank %lld must be in "
                              "[1, %lld] and the scale finite (%g)", target, (long long)rank,
                              (long long)lim, (double)scale);
    /* Linear weights are [out, in]: A [r, in], B [out, r]. PEFT's embedding adapter is the
     * transpose: A [r, V], B [D, r]. */
    int embed = w->target == RLB_W_EMBED;
    rlb_param fa = {.layer = w->layer, .ndim = 2, .rows = rank,
                    .cols = embed ? w->rows : w->cols, .target = w->target,
                    .role = RLB_ROLE_LORA_A};
    rlb_param fb = {.layer = w->layer, .ndim = 2, .rows = embed ? w->cols : w->rows,
                    .cols = rank, .target = w->target, .role = RLB_ROLE_LORA_B};
    if (factor_name(w, RLB_LORA_A, fa.name, sizeof fa.name) ||
        factor_name(w, RLB_LORA_B, fb.name, sizeof fb.name))
        return rlb__model_err(err, errlen, RLB_EINVAL, "adapter of '%s': the weight's name "
                              "does not end in .weight", target);
    rlb_param_adapter *grown = realloc(list->adapters,
                                       (size_t)(list->n_adapters + 1) * sizeof *grown);
    if (!grown)
        return rlb__model_err(err, errlen, RLB_ENOMEM, "adapter of '%s': out of memory",
                              target);
    list->adapters = grown; /* a larger block than needed is harmless if the rest fails */
    int64_t n0 = list->n;
    if (rlb__params_reserve(list, 2))
        return rlb__model_err(err, errlen, RLB_ENOMEM, "adapter of '%s': out of memory",
                              target);
    rlb__params_append(list, &fa);
    rlb__params_append(list, &fb);
    list->adapters[list->n_adapters++] = (rlb_param_adapter){
        .base = base, .a = n0, .b = n0 + 1, .rank = rank, .scale = scale};
    return 0;
}
