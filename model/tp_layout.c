/* tp_layout.c: offsets and shapes of one TP rank's local tensors (DESIGN §4). */
#include "model/tp_layout.h"

#include <stdlib.h>

int64_t rlb__tp_vocab_padded(int64_t vocab)
{
    return (vocab + RLB_VOCAB_PAD - 1) / RLB_VOCAB_PAD * RLB_VOCAB_PAD;
}

int rlb__tp_check(const rlb_model_config *cfg, int T, char *err, size_t errlen)
{
    int rc = rlb__config_validate(cfg, err, errlen);
    if (rc)
        return rc;
    if (T < 1)
        return rlb__model_err(err, errlen, RLB_EUNSUPPORTED, "TP size %d must be >= 1", T);
    if (cfg->n_heads % T)
        return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                              "TP size %d does not divide num_attention_heads %lld", T,
                              (long long)cfg->n_heads);
    if (cfg->intermediate % T)
        return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                              "TP size %d does not divide intermediate_size %lld", T,
                              (long long)cfg->intermediate);
    if (cfg->n_kv_heads % T && T % cfg->n_kv_heads)
        return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                              "TP size %d and num_key_value_heads %lld: neither divides the other",
                              T, (long long)cfg->n_kv_heads);
    if (rlb__tp_vocab_padded(cfg->vocab) % T)
        return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                              "TP size %d does not divide the padded vocabulary %lld", T,
                              (long long)rlb__tp_vocab_padded(cfg->vocab));
    return 0;
}

static void add_tensor(rlb_tp_layout *l, rlb_wkind kind, int layer, int64_t rows, int64_t cols)
{
    size_t esz = rlb_dtype_size(l->dtype);
    rlb_local_tensor *t = &l->tensors[l->n_tensors];
    t->kind = kind;
    t->layer = layer;
    t->rows = rows;
    t->cols = cols;
    t->offset = (l->total_bytes + RLB_TP_ALIGN - 1) / RLB_TP_ALIGN * RLB_TP_ALIGN;
    t->bytes = (uint64_t)rows * (uint64_t)cols * esz;
    l->total_bytes = t->offset + t->bytes;
    l->index[(layer + 1) * RLB_W_KIND_COUNT_ + kind] = (int32_t)l->n_tensors;
    l->n_tensors++;
}

int rlb__tp_layout_init(rlb_tp_layout *l, const rlb_model_config *cfg, int T, int t,
                        rlb_dtype dtype)
{
    int rc = rlb__tp_check(cfg, T, NULL, 0);
    if (rc)
        return rc;
    if (t < 0 || t >= T || rlb_dtype_size(dtype) == 0 || cfg->n_layers < 1 ||
        cfg->hidden < 1 || cfg->head_dim < 1 || cfg->vocab < 1)
        return RLB_EINVAL;
    *l = (rlb_tp_layout){.cfg = *cfg, .tp_size = T, .tp_rank = t, .dtype = dtype};
    l->hq = cfg->n_heads / T;
    if (cfg->n_kv_heads >= T) {
        l->kvt = cfg->n_kv_heads / T;
        l->kv0 = t * l->kvt;
    } else {
        l->kvt = 1;
        l->kv0 = t / (T / cfg->n_kv_heads);
    }
    l->vp = rlb__tp_vocab_padded(cfg->vocab);

    int64_t nl = cfg->n_layers;
    size_t max_tensors = 3 + (size_t)nl * 7;
    size_t n_index = (size_t)(nl + 1) * RLB_W_KIND_COUNT_;
    l->tensors = calloc(max_tensors, sizeof *l->tensors);
    l->index = malloc(n_index * sizeof *l->index);
    if (!l->tensors || !l->index) {
        rlb__tp_layout_free(l);
        return RLB_ENOMEM;
    }
    for (size_t i = 0; i < n_index; i++)
        l->index[i] = -1;

    int64_t D = cfg->hidden, hd = cfg->head_dim;
    int64_t qkv_rows = (l->hq + 2 * l->kvt) * hd;
    add_tensor(l, RLB_W_EMBED, -1, l->vp / T, D);
    add_tensor(l, RLB_W_FINAL_NORM, -1, D, 1);
    if (!cfg->tie_embeddings)
        add_tensor(l, RLB_W_LM_HEAD, -1, l->vp / T, D);
    for (int i = 0; i < nl; i++) {
        add_tensor(l, RLB_W_ATTN_NORM, i, D, 1);
        add_tensor(l, RLB_W_QKV, i, qkv_rows, D);
        if (cfg->attn_bias)
            add_tensor(l, RLB_W_QKV_BIAS, i, qkv_rows, 1);
        add_tensor(l, RLB_W_O, i, D, l->hq * hd);
        add_tensor(l, RLB_W_MLP_NORM, i, D, 1);
        add_tensor(l, RLB_W_GATE_UP, i, 2 * cfg->intermediate / T, D);
        add_tensor(l, RLB_W_DOWN, i, D, cfg->intermediate / T);
    }
    l->total_bytes = (l->total_bytes + RLB_TP_ALIGN - 1) / RLB_TP_ALIGN * RLB_TP_ALIGN;
    return 0;
}

void rlb__tp_layout_free(rlb_tp_layout *l)
{
    free(l->tensors);
    free(l->index);
    l->tensors = NULL;
    l->index = NULL;
    l->n_tensors = 0;
}

const rlb_local_tensor *rlb__tp_layout_find(const rlb_tp_layout *l, rlb_wkind kind, int layer)
{
    if ((unsigned)kind >= RLB_W_KIND_COUNT_ || layer < -1 || layer >= l->cfg.n_layers)
        return NULL;
    int32_t i = l->index[(layer + 1) * RLB_W_KIND_COUNT_ + kind];
    return i < 0 ? NULL : &l->tensors[i];
}
