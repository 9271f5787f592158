/* plan_ref.h: the tests' own description of a model's parameters and of a TP worker's
 * buffer, written straight from DESIGN §4 and the HF naming, independent of model/params.c,
 * model/tp_layout.c and model/plan.c (which the tests check against it).
 *
 *   ref_model_init    parameter names and shapes (plus, on request, the lm_head.weight a
 *                     source may still send for a tied model)
 *   ref_tensors       a worker's local tensors: shapes, 256-byte aligned offsets, in the
 *                     documented buffer order
 *   ref_origin        which global (parameter, row, col) a local element holds, or zero
 */
#ifndef RLB_TESTS_PLAN_REF_H
#define RLB_TESTS_PLAN_REF_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "model/config.h"
#include "model/tp_layout.h"

enum {
    P_EMBED, P_FINAL_NORM, P_HEAD, P_IN_NORM, P_Q, P_K, P_V, P_QB, P_KB, P_VB, P_O,
    P_POST_NORM, P_GATE, P_UP, P_DOWN, P_KINDS
};

typedef struct ref_param {
    char name[80];
    int which;       /* P_* */
    int layer;       /* -1 for globals */
    int ndim;        /* 1 or 2 */
    int64_t rows;    /* d0 */
    int64_t cols;    /* d1, 1 for vectors */
    int dropped;     /* lm_head.weight of a tied model: sent by the source, never used */
} ref_param;

typedef struct ref_model {
    rlb_model_config cfg;
    int n;            /* entries in p[] */
    ref_param *p;     /* every parameter, in no particular order */
    int *idx;         /* [(layers + 1) * P_KINDS]: index into p[], or -1 */
} ref_model;

static inline void ref_add(ref_model *m, int which, int layer, const char *name, int ndim,
                           int64_t rows, int64_t cols)
{
    ref_param *p = &m->p[m->n];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->which = which;
    p->layer = layer;
    p->ndim = ndim;
    p->rows = rows;
    p->cols = ndim == 1 ? 1 : cols;
    p->dropped = m->cfg.tie_embeddings && which == P_HEAD;
    m->idx[(layer + 1) * P_KINDS + which] = m->n++;
}

static inline void ref_model_init(ref_model *m, const rlb_model_config *c, int with_tied_head)
{
    int L = (int)c->n_layers;
    m->cfg = *c;
    m->n = 0;
    m->p = calloc((size_t)(3 + 12 * L), sizeof *m->p);
    m->idx = malloc((size_t)(L + 1) * P_KINDS * sizeof *m->idx);
    for (int i = 0; i < (L + 1) * P_KINDS; i++)
        m->idx[i] = -1;
    int64_t D = c->hidden, V = c->vocab, hd = c->head_dim;
    ref_add(m, P_EMBED, -1, "model.embed_tokens.weight", 2, V, D);
    ref_add(m, P_FINAL_NORM, -1, "model.norm.weight", 1, D, 1);
    if (!c->tie_embeddings || with_tied_head)
        ref_add(m, P_HEAD, -1, "lm_head.weight", 2, V, D);
    static const struct {
        int which;
        const char *suffix;
    } per_layer[] = {
        {P_IN_NORM, "input_layernorm.weight"}, {P_Q, "self_attn.q_proj.weight"},
        {P_K, "self_attn.k_proj.weight"},      {P_V, "self_attn.v_proj.weight"},
        {P_QB, "self_attn.q_proj.bias"},       {P_KB, "self_attn.k_proj.bias"},
        {P_VB, "self_attn.v_proj.bias"},       {P_O, "self_attn.o_proj.weight"},
        {P_POST_NORM, "post_attention_layernorm.weight"},
        {P_GATE, "mlp.gate_proj.weight"},      {P_UP, "mlp.up_proj.weight"},
        {P_DOWN, "mlp.down_proj.weight"},
    };
    for (int l = 0; l < L; l++)
        for (size_t k = 0; k < sizeof per_layer / sizeof per_layer[0]; k++) {
            int w = per_layer[k].which;
            int bias = w == P_QB || w == P_KB || w == P_VB;
            if (bias && !c->attn_bias)
                continue;
            int64_t qdim = c->n_heads * hd, kvdim = c->n_kv_heads * hd;
            int64_t rows = w == P_Q || w == P_QB ? qdim
                           : w == P_K || w == P_V || w == P_KB || w == P_VB ? kvdim
                           : w == P_GATE || w == P_UP ? c->intermediate
                                                      : D;
            int64_t cols = w == P_O ? qdim : w == P_DOWN ? c->intermediate : D;
            int vector = bias || w == P_IN_NORM || w == P_POST_NORM;
            char name[80];
            snprintf(name, sizeof name, "model.layers.%d.%s", l, per_layer[k].suffix);
            ref_add(m, w, l, name, vector ? 1 : 2, rows, cols);
        }
}

static inline void ref_model_free(ref_model *m)
{
    free(m->p);
    free(m->idx);
}

typedef struct ref_tensor {
    rlb_wkind kind;
    int layer;
    int64_t rows, cols;
    uint64_t offset;
} ref_tensor;

/* Fills out[] (room for 3 + 7 * layers) with a TP-T worker's tensors in buffer order;
 * returns how many and sets *total to the buffer size (a multiple of 256). */
static inline int ref_tensors(const rlb_model_config *c, int T, uint64_t esz, ref_tensor *out,
                              uint64_t *total)
{
    int64_t hd = c->head_dim, Hq = c->n_heads / T;
    int64_t KVt = c->n_kv_heads >= T ? c->n_kv_heads / T : 1;
    int64_t Vp = (c->vocab + 63) / 64 * 64, D = c->hidden, It = c->intermediate / T;
    int n = 0;
    uint64_t end = 0;
#define REF_T(k, l, r, cl)                                                                 \
    do {                                                                                   \
        uint64_t off = (end + 255) / 256 * 256;                                            \
        out[n++] = (ref_tensor){(k), (l), (r), (cl), off};                                 \
        end = off + (uint64_t)(r) * (uint64_t)(cl) * esz;                                  \
    } while (0)
    REF_T(RLB_W_EMBED, -1, Vp / T, D);
    REF_T(RLB_W_FINAL_NORM, -1, D, 1);
    if (!c->tie_embeddings)
        REF_T(RLB_W_LM_HEAD, -1, Vp / T, D);
    for (int l = 0; l < c->n_layers; l++) {
        REF_T(RLB_W_ATTN_NORM, l, D, 1);
        REF_T(RLB_W_QKV, l, (Hq + 2 * KVt) * hd, D);
        if (c->attn_bias)
            REF_T(RLB_W_QKV_BIAS, l, (Hq + 2 * KVt) * hd, 1);
        REF_T(RLB_W_O, l, D, Hq * hd);
        REF_T(RLB_W_MLP_NORM, l, D, 1);
        REF_T(RLB_W_GATE_UP, l, 2 * It, D);
        REF_T(RLB_W_DOWN, l, D, It);
    }
#undef REF_T
    *total = (end + 255) / 256 * 256;
    return n;
}

/* The global element that local element (lrow, lcol) of tensor `kind` on rank t of T
 * holds: sets *which, *grow, *gcol and returns 1, or returns 0 for a zero (padding) row. */
static inline int ref_origin(const rlb_model_config *c, int T, int t, rlb_wkind kind,
                             int64_t lrow, int64_t lcol, int *which, int64_t *grow,
                             int64_t *gcol)
{
    int64_t hd = c->head_dim, Hq = c->n_heads / T, It = c->intermediate / T;
    int64_t KVt, kv0;
    if (c->n_kv_heads >= T) {
        KVt = c->n_kv_heads / T;
        kv0 = t * KVt;
    } else {
        KVt = 1;
        kv0 = t / (T / c->n_kv_heads);
    }
    int64_t Vp = (c->vocab + 63) / 64 * 64;
    *gcol = lcol;
    switch (kind) {
    case RLB_W_EMBED:
    case RLB_W_LM_HEAD:
        *which = kind == RLB_W_EMBED ? P_EMBED : P_HEAD;
        *grow = t * (Vp / T) + lrow;
        return *grow < c->vocab;
    case RLB_W_FINAL_NORM:
    case RLB_W_ATTN_NORM:
    case RLB_W_MLP_NORM:
        *which = kind == RLB_W_FINAL_NORM ? P_FINAL_NORM
                 : kind == RLB_W_ATTN_NORM ? P_IN_NORM
                                           : P_POST_NORM;
        *grow = lrow;
        return 1;
    case RLB_W_QKV:
    case RLB_W_QKV_BIAS: {
        int bias = kind == RLB_W_QKV_BIAS;
        if (lrow < Hq * hd) {
            *which = bias ? P_QB : P_Q;
            *grow = t * Hq * hd + lrow;
        } else if (lrow < (Hq + KVt) * hd) {
            *which = bias ? P_KB : P_K;
            *grow = kv0 * hd + lrow - Hq * hd;
        } else {
            *which = bias ? P_VB : P_V;
            *grow = kv0 * hd + lrow - (Hq + KVt) * hd;
        }
        return 1;
    }
    case RLB_W_O:
        *which = P_O;
        *grow = lrow;
        *gcol = t * Hq * hd + lcol;
        return 1;
    case RLB_W_GATE_UP:
        *which = lrow < It ? P_GATE : P_UP;
        *grow = t * It + (lrow < It ? lrow : lrow - It);
        return 1;
    case RLB_W_DOWN:
        *which = P_DOWN;
        *grow = lrow;
        *gcol = t * It + lcol;
        return 1;
    default:
        abort();
    }
}

#endif /* RLB_TESTS_PLAN_REF_H */
