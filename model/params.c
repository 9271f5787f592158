/* params.c: the canonical parameter list of a Llama / Qwen2 model, its name index, and the
 * mapping of each parameter onto a TP rank's local tensors (DESIGN §4 table). */
#include "model/params.h"

#include "model/lora.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char lm_head_name[] = "lm_head.weight";

/* FNV-1a: names differ mostly in a few middle characters (layer digits, proj letter), which
 * it spreads well enough for a table at most half full. */
static uint64_t name_hash(const char *s)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * UINT64_C(0x100000001b3);
    return h;
}

static void hash_insert(int32_t *hash, uint32_t cap, const char *name, int32_t index)
{
    uint32_t slot = (uint32_t)name_hash(name) & (cap - 1);
    while (hash[slot] >= 0)
        slot = (slot + 1) & (cap - 1);
    hash[slot] = index;
}

static void add(rlb_param_list *list, const char *name, int32_t layer, int32_t ndim,
                int64_t rows, int64_t cols, rlb_wkind target, rlb_param_role role)
{
    rlb_param *p = &list->params[list->n++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->layer = layer;
    p->ndim = ndim;
    p->rows = rows;
    p->cols = cols;
    p->target = target;
    p->role = role;
}

static void add_layer(rlb_param_list *list, int32_t i)
{
    const rlb_model_config *c = &list->cfg;
    int64_t D = c->hidden, qdim = c->n_heads * c->head_dim, kvdim = c->n_kv_heads * c->head_dim;
    char name[RLB_PARAM_NAME_MAX];
#define LAYER_NAME(suffix) (snprintf(name, sizeof name, "model.layers.%d." suffix, (int)i), name)
    add(list, LAYER_NAME("input_layernorm.weight"), i, 1, D, 1, RLB_W_ATTN_NORM,
        RLB_ROLE_REPLICATED);
    add(list, LAYER_NAME("self_attn.q_proj.weight"), i, 2, qdim, D, RLB_W_QKV, RLB_ROLE_QKV_Q);
    add(list, LAYER_NAME("self_attn.k_proj.weight"), i, 2, kvdim, D, RLB_W_QKV, RLB_ROLE_QKV_K);
    add(list, LAYER_NAME("self_attn.v_proj.weight"), i, 2, kvdim, D, RLB_W_QKV, RLB_ROLE_QKV_V);
    if (c->attn_bias) {
        add(list, LAYER_NAME("self_attn.q_proj.bias"), i, 1, qdim, 1, RLB_W_QKV_BIAS,
            RLB_ROLE_QKV_Q);
        add(list, LAYER_NAME("self_attn.k_proj.bias"), i, 1, kvdim, 1, RLB_W_QKV_BIAS,
            RLB_ROLE_QKV_K);
        add(list, LAYER_NAME("self_attn.v_proj.bias"), i, 1, kvdim, 1, RLB_W_QKV_BIAS,
            RLB_ROLE_QKV_V);
    }
    add(list, LAYER_NAME("self_attn.o_proj.weight"), i, 2, D, qdim, RLB_W_O,
        RLB_ROLE_ROW_PARALLEL);
    add(list, LAYER_NAME("post_attention_layernorm.weight"), i, 1, D, 1, RLB_W_MLP_NORM,
        RLB_ROLE_REPLICATED);
    add(list, LAYER_NAME("mlp.gate_proj.weight"), i, 2, c->intermediate, D, RLB_W_GATE_UP,
        RLB_ROLE_GATE);
    add(list, LAYER_NAME("mlp.up_proj.weight"), i, 2, c->intermediate, D, RLB_W_GATE_UP,
        RLB_ROLE_UP);
    add(list, LAYER_NAME("mlp.down_proj.weight"), i, 2, D, c->intermediate, RLB_W_DOWN,
        RLB_ROLE_ROW_PARALLEL);
#undef LAYER_NAME
}

int rlb__params_init(rlb_param_list *list, const rlb_model_config *cfg, char *err,
                     size_t errlen)
{
    int rc = rlb__config_validate(cfg, err, errlen);
    if (rc)
        return rc;
    *list = (rlb_param_list){.cfg = *cfg};
    size_t per_layer = cfg->attn_bias ? 12 : 9;
    size_t max_params = 3 + (size_t)cfg->n_layers * per_layer;
    uint32_t cap = 16;
    while (cap < 2 * max_params)
        cap *= 2;
    list->params = malloc(max_params * sizeof *list->params);
    list->cap = (int64_t)max_params;
    list->hash = malloc((size_t)cap * sizeof *list->hash);
    if (!list->params || !list->hash) {
        rlb__params_free(list);
        return rlb__model_err(err, errlen, RLB_ENOMEM, "parameter list: out of memory");
    }
    list->hash_cap = cap;
    memset(list->hash, 0xff, (size_t)cap * sizeof *list->hash); /* every slot -1 */

    int64_t D = cfg->hidden, V = cfg->vocab;
    add(list, "model.embed_tokens.weight", -1, 2, V, D, RLB_W_EMBED, RLB_ROLE_VOCAB);
    for (int32_t i = 0; i < cfg->n_layers; i++)
        add_layer(list, i);
    add(list, "model.norm.weight", -1, 1, D, 1, RLB_W_FINAL_NORM, RLB_ROLE_REPLICATED);
    if (!cfg->tie_embeddings)
        add(list, lm_head_name, -1, 2, V, D, RLB_W_LM_HEAD, RLB_ROLE_VOCAB);

    for (int64_t i = 0; i < list->n; i++)
        hash_insert(list->hash, cap, list->params[i].name, (int32_t)i);
    return 0;
}

void rlb__params_free(rlb_param_list *list)
{
    free(list->params);
    free(list->hash);
    free(list->adapters);
    list->params = NULL;
    list->hash = NULL;
    list->adapters = NULL;
    list->n = list->cap = list->n_adapters = 0;
    list->hash_cap = 0;
}

int rlb__params_reserve(rlb_param_list *list, int64_t more)
{
    if (list->n + more > list->cap) {
        int64_t cap = list->n + more + list->cap;
        rlb_param *grown = realloc(list->params, (size_t)cap * sizeof *grown);
        if (!grown)
            return RLB_ENOMEM;
        list->params = grown;
        list->cap = cap;
    }
    /* Keep the table at most half full, so probes stay short. */
    uint32_t cap = list->hash_cap;
    while (2 * (uint64_t)(list->n + more) > cap)
        cap *= 2;
    if (cap == list->hash_cap)
        return 0;
    int32_t *hash = malloc((size_t)cap * sizeof *hash);
    if (!hash)
        return RLB_ENOMEM;
    memset(hash, 0xff, (size_t)cap * sizeof *hash);
    for (int64_t i = 0; i < list->n; i++)
        hash_insert(hash, cap, list->params[i].name, (int32_t)i);
    free(list->hash);
    list->hash = hash;
    list->hash_cap = cap;
    return 0;
}

void rlb__params_append(rlb_param_list *list, const rlb_param *p)
{
    list->params[list->n] = *p;
    hash_insert(list->hash, list->hash_cap, p->name, (int32_t)list->n);
    list->n++;
}

int64_t rlb__params_find(const rlb_param_list *list, const char *name)
{
    if (!name || !list->hash_cap)
        return -1;
    uint32_t mask = list->hash_cap - 1;
    for (uint32_t slot = (uint32_t)name_hash(name) & mask;; slot = (slot + 1) & mask) {
        int32_t i = list->hash[slot];
        if (i < 0)
            return -1;
        if (strcmp(list->params[i].name, name) == 0)
            return i;
    }
}

int rlb__params_is_dropped(const rlb_param_list *list, const char *name)
{
    if (!name)
        return 0;
    if (list->cfg.tie_embeddings && strcmp(name, lm_head_name) == 0)
        return 1;
    char target[RLB_PARAM_NAME_MAX];
    rlb_lora_factor f;
    return rlb__params_find(list, name) < 0 &&
           rlb__lora_split_name(name, target, sizeof target, &f) == 0 &&
           rlb__params_find(list, target) >= 0;
}

uint64_t rlb__param_numel(const rlb_param *p)
{
    return (uint64_t)p->rows * (uint64_t)p->cols;
}

int rlb__param_fsdp1_unit(const rlb_param *p)
{
    return p->layer < 0 ? 0 : 1 + p->layer;
}

uint64_t rlb__params_fsdp1_walk(const rlb_param_list *list, int unit, uint32_t align,
                                uint32_t world, rlb_flat_piece_fn piece, void *arg)
{
    uint64_t at = 0;
    for (int64_t p = 0; p < list->n; p++) {
        if (rlb__param_fsdp1_unit(&list->params[p]) != unit)
            continue;
        uint64_t pad = align > 1 ? (align - at % align) % align : 0;
        if (pad && piece)
            piece(arg, -1, at, pad);
        at += pad;
        uint64_t n = rlb__param_numel(&list->params[p]);
        if (piece)
            piece(arg, p, at, n);
        at += n;
    }
    uint64_t total = (at + world - 1) / world * world;
    if (total > at && piece)
        piece(arg, -1, at, total - at);
    return total;
}

void rlb__param_region(const rlb_param *p, const rlb_tp_layout *l, rlb_param_region *r)
{
    int64_t T = l->tp_size, t = l->tp_rank, hd = l->cfg.head_dim;
    /* Default: every row and column, at the local tensor's origin. */
    *r = (rlb_param_region){.n_rows = p->rows, .n_cols = p->cols, .local_cols = p->cols};
    switch (p->role) {
    case RLB_ROLE_REPLICATED:
    case RLB_ROLE_LORA_A: /* adapter factors are read whole by the merges */
    case RLB_ROLE_LORA_B:
        break;
    case RLB_ROLE_VOCAB: {
        int64_t per = l->vp / T, first = t * per;
        int64_t valid = p->rows - first;
        valid = valid < 0 ? 0 : valid > per ? per : valid;
        r->row0 = first;
        r->n_rows = valid;
        r->zero_row0 = valid;
        r->n_zero_rows = per - valid;
        break;
    }
    case RLB_ROLE_QKV_Q:
        r->row0 = t * l->hq * hd;
        r->n_rows = l->hq * hd;
        break;
    case RLB_ROLE_QKV_K:
    case RLB_ROLE_QKV_V:
        r->row0 = l->kv0 * hd;
        r->n_rows = l->kvt * hd;
        r->lrow0 = (l->hq + (p->role == RLB_ROLE_QKV_V ? l->kvt : 0)) * hd;
        break;
    case RLB_ROLE_GATE:
    case RLB_ROLE_UP: {
        int64_t per = p->rows / T;
        r->row0 = t * per;
        r->n_rows = per;
        r->lrow0 = p->role == RLB_ROLE_UP ? per : 0;
        break;
    }
    case RLB_ROLE_ROW_PARALLEL: {
        int64_t per = p->cols / T;
        r->col0 = t * per;
        r->n_cols = per;
        r->local_cols = per;
        break;
    }
    }
}
