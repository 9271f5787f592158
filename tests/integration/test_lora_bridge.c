/* test_lora_bridge.c: LoRA adapters through the whole pipeline (DESIGN §10): a trainer rank
 * on the public API declares adapters on all seven targets of every layer, registers its
 * frozen base and the factors, and publishes versions in which only the adapters change; a
 * bridge and two TP workers (forked from the test, tiny model) serve them. After each
 * commit, greedy tokens must equal `rlb generate --tp 2` on a checkpoint the test writes
 * with the merged weights W + s * B * A (computed here in double), and after the adapters
 * are taken back the tokens must be the base's again, on the base checkpoint. The base comes
 * from the trainer's registered tensors, or from a checkpoint the bridge maps itself
 * (rlb_bridge_opts.base_dir), the trainer then registering only the factors (that case runs
 * in staged mode, the other in pause mode). Refusals: a factor of an undeclared weight, a
 * bad declaration, a version whose merged weights hold a NaN (one factor poisoned).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "model/params.h"
#include "tests/integration/bridge_harness.h"

#define MAX_TOKENS 8
#define RANK 4
#define ALPHA 8.0f
#define TP 2


/* One adapted weight: its base parameter and its factors' storage. */
typedef struct adapted {
    char weight[96], a_name[96], b_name[96];
    int64_t base;        /* parameter index */
    int64_t out, in;     /* W [out, in] */
    float *a, *b;        /* A [RANK, in], B [out, RANK], in the trainer's shared memory */
} adapted;

/* Factor values of version v: small, so the merged model stays well-conditioned, large
 * enough that it differs from the base. */
static float fval(uint64_t v, int k, int which, uint64_t i)
{
    uint64_t z = (v * 1000003u + (uint64_t)k * 97u + (uint64_t)which) * 0x9E3779B97F4A7C15ull + i;
    z = (z ^ (z >> 31)) * 0xBF58476D1CE4E5B9ull;
    z ^= z >> 29;
    return ((float)(z >> 40) / (float)(1u << 24) - 0.5f) * 0.5f;
}

static void fill_factors(adapted *ad, int n, uint64_t v)
{
    for (int k = 0; k < n; k++) {
        for (int64_t i = 0; i < RANK * ad[k].in; i++)
            ad[k].a[i] = fval(v, k, 0, (uint64_t)i);
        for (int64_t i = 0; i < ad[k].out * RANK; i++)
            ad[k].b[i] = fval(v, k, 1, (uint64_t)i);
    }
}

/* The merged weights of the current factors over the version-1 base, in double. */
static float **merged_weights(const adapted *ad, int n, double scale)
{
    const rlb_param_list *l = h_params();
    float **data = calloc((size_t)l->n, sizeof(*data));
    for (int64_t p = 0; p < l->n; p++) {
        uint64_t numel = rlb__param_numel(&l->params[p]);
        data[p] = malloc(numel * sizeof(float));
        for (uint64_t i = 0; i < numel; i++)
            data[p][i] = h_weight(1, p, i);
    }
    for (int k = 0; k < n; k++)
        for (int64_t o = 0; o < ad[k].out; o++)
            for (int64_t c = 0; c < ad[k].in; c++) {
                double sum = 0;
                for (int j = 0; j < RANK; j++)
                    sum += (double)ad[k].b[o * RANK + j] * (double)ad[k].a[j * ad[k].in + c];
                float *w = &data[ad[k].base][o * ad[k].in + c];
                *w = (float)((double)*w + scale * sum);
            }
    return data;
}

static void free_weights(float **data)
{
    for (int64_t p = 0; p < h_params()->n; p++)
        free(data[p]);
    free(data);
}

/* base_in_bridge 0: the trainer registers the base with its factors; 1: the bridge maps a
 * checkpoint of the base and the trainer registers only the factors. */
static void lora_sync(int base_in_bridge, rlb_sync_mode mode)
{
    h_run r;
    rlb_client *c;
    const rlb_param_list *l = h_params();
    assert_int_equal(base_in_bridge ? h_start_base(&r, mode, 1) : h_start(&r, mode), 0);
    assert_int_equal(h_workers(&r, 1, TP), 0);
    assert_int_equal(h_connect(&r, 0, 1, &c), 0);
    assert_int_equal(h_wait_workers(&r, c, TP, 1), 0);

    /* Memory: the base, then every factor. */
    int n_ad = (int)(H_LORA_TARGETS * (size_t)l->cfg.n_layers);
    adapted *ad = calloc((size_t)n_ad, sizeof(*ad));
    uint64_t floats = 0;
    for (int64_t p = 0; p < l->n; p++)
        floats += rlb__param_numel(&l->params[p]);
    for (int k = 0; k < n_ad; k++) {
        adapted *a = &ad[k];
        int layer = k / H_LORA_TARGETS;
        const char *target = h_lora_targets[k % H_LORA_TARGETS];
        snprintf(a->weight, sizeof a->weight, "model.layers.%d.%s.weight", layer, target);
        snprintf(a->a_name, sizeof a->a_name, "model.layers.%d.%s.lora_A.weight", layer, target);
        snprintf(a->b_name, sizeof a->b_name, "model.layers.%d.%s.lora_B.weight", layer, target);
        a->base = rlb__params_find(l, a->weight);
        assert_true(a->base >= 0);
        a->out = l->params[a->base].rows;
        a->in = l->params[a->base].cols;
        floats += (uint64_t)(RANK * a->in + a->out * RANK);
    }
    float *mem;
    assert_int_equal(rlb_alloc_host(c, floats * sizeof(float), (void **)&mem), 0);
    int n_desc = (int)l->n + 2 * n_ad;
    rlb_tensor_desc *d = calloc((size_t)n_desc, sizeof(*d));
    float *at = mem;
    for (int64_t p = 0; p < l->n; p++) {
        const rlb_param *q = &l->params[p];
        rlb_tensor_desc_init(&d[p]);
        d[p].name = q->name;
        d[p].ndim = (uint32_t)q->ndim;
        d[p].shape[0] = (uint64_t)q->rows;
        d[p].shape[1] = (uint64_t)q->cols;
        d[p].data = at;
        for (uint64_t i = 0; i < rlb__param_numel(q); i++)
            at[i] = h_weight(1, p, i); /* the frozen base: version 1's weights */
        at += rlb__param_numel(q);
    }
    for (int k = 0; k < n_ad; k++) {
        rlb_tensor_desc *da = &d[l->n + 2 * k], *db = da + 1;
        rlb_tensor_desc_init(da);
        rlb_tensor_desc_init(db);
        da->name = ad[k].a_name;
        da->ndim = 2;
        da->shape[0] = RANK;
        da->shape[1] = (uint64_t)ad[k].in;
        da->data = ad[k].a = at;
        at += RANK * ad[k].in;
        db->name = ad[k].b_name;
        db->ndim = 2;
        db->shape[0] = (uint64_t)ad[k].out;
        db->shape[1] = RANK;
        db->data = ad[k].b = at;
        at += ad[k].out * RANK;
    }

    /* A factor before its adapter is declared is refused; so are bad declarations. */
    assert_int_equal(rlb_register(c, &d[l->n], 1), RLB_ENOTFOUND);
    rlb_lora_desc bad;
    rlb_lora_desc_init(&bad);
    bad.target = "model.norm.weight";
    bad.rank = RANK;
    bad.alpha = ALPHA;
    assert_int_equal(rlb_register_lora(c, &bad, 1), RLB_EINVAL);
    bad.target = "model.layers.0.self_attn.q_proj.weight";
    bad.rank = 1000;
    assert_int_equal(rlb_register_lora(c, &bad, 1), RLB_EINVAL);

    rlb_lora_desc *ld = calloc((size_t)n_ad, sizeof(*ld));
    for (int k = 0; k < n_ad; k++) {
        rlb_lora_desc_init(&ld[k]);
        ld[k].target = ad[k].weight;
        ld[k].rank = RANK;
        ld[k].alpha = ALPHA;
    }
    /* A PEFT name for the base weight works as well. */
    ld[0].target = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight";
    assert_int_equal(rlb_register_lora(c, ld, (size_t)n_ad), 0);
    int first = base_in_bridge ? (int)l->n : 0;
    if (rlb_register(c, d + first, (size_t)(n_desc - first)))
        fail_msg("register: %s", rlb_last_error(c));

    int32_t prompt[3] = {5, 17, 42}, got[64], want[64], base_want[64];
    int nb = h_reference(&r, 1, TP, prompt, 3, MAX_TOKENS, base_want, 64);
    assert_true(nb > 0);
    int differs = 0;
    for (uint64_t v = 1; v <= 2; v++) {
        fill_factors(ad, n_ad, v);
        rlb_sync_stats st = {.struct_size = sizeof(st)};
        if (rlb_publish(c, v, &st))
            fail_msg("publish %llu: %s", (unsigned long long)v, rlb_last_error(c));
        int ng = h_greedy(c, v, prompt, 3, MAX_TOKENS, got, 64);
        float **merged = merged_weights(ad, n_ad, ALPHA / RANK);
        char tag[32];
        snprintf(tag, sizeof tag, "merged%llu", (unsigned long long)v);
        int nw = h_reference_weights(&r, tag, merged, TP, prompt, 3, MAX_TOKENS, want, 64);
        free_weights(merged);
        assert_int_equal(nw, ng);
        assert_memory_equal(want, got, sizeof(int32_t) * (size_t)nw);
        differs |= memcmp(got, base_want, sizeof(int32_t) * (size_t)nb) != 0;
    }
    assert_true(differs); /* the adapters changed what the model says */

    /* A NaN in one factor poisons a row of its merged weight: the version is aborted before
     * a worker loads it, the weight named with the count the merge wrote. */
    float keep = ad[0].b[0];
    ad[0].b[0] = __builtin_nanf("");
    assert_int_equal(rlb_publish(c, 3, NULL), RLB_EABORTED);
    char named[160];
    snprintf(named, sizeof named, "%s (LoRA-merged): %lld", ad[0].weight, (long long)ad[0].in);
    if (!strstr(rlb_last_error(c), named))
        fail_msg("abort names no '%s': %s", named, rlb_last_error(c));
    ad[0].b[0] = keep;

    /* Adapters taken back (the factors stay registered): the base again. */
    assert_int_equal(rlb_unregister_lora(c, NULL, 0), 0);
    assert_int_equal(rlb_publish(c, 4, NULL), 0);
    int ng = h_greedy(c, 4, prompt, 3, MAX_TOKENS, got, 64);
    assert_int_equal(ng, nb);
    assert_memory_equal(got, base_want, sizeof(int32_t) * (size_t)nb);

    free(ld);
    free(d);
    free(ad);
    rlb_close(c);
    assert_int_equal(h_stop(&r, NULL), 0);
}

static void test_lora_trainer_base(void **state)
{
    (void)state;
    lora_sync(0, RLB_SYNC_PAUSE);
}

static void test_lora_checkpoint_base(void **state)
{
    (void)state;
    lora_sync(1, RLB_SYNC_STAGED); /* and the double-buffered mode */
}

/* Two ranks declaring one weight must agree; a declaration is taken back only by its rank,
 * and lasts while some rank declares it. */
static void test_lora_declarations(void **state)
{
    (void)state;
    h_run r;
    rlb_client *c0, *c1;
    assert_int_equal(h_start(&r, RLB_SYNC_PAUSE), 0);
    assert_int_equal(h_connect(&r, 0, 2, &c0), 0);
    assert_int_equal(h_connect(&r, 1, 2, &c1), 0);
    rlb_lora_desc d;
    rlb_lora_desc_init(&d);
    d.target = "model.layers.1.mlp.down_proj.weight";
    d.rank = 8;
    d.alpha = 16;
    assert_int_equal(rlb_register_lora(c0, &d, 1), 0);
    d.rank = 4;
    assert_int_equal(rlb_register_lora(c1, &d, 1), RLB_EEXIST); /* another rank */
    d.rank = 8;
    d.rslora = 1;
    assert_int_equal(rlb_register_lora(c1, &d, 1), RLB_EEXIST); /* another scale */
    d.rslora = 0;
    assert_int_equal(rlb_register_lora(c1, &d, 1), 0);
    const char *t = d.target;
    assert_int_equal(rlb_unregister_lora(c0, &t, 1), 0);
    /* Rank 1 still declares it: rank 1's factor is accepted. */
    float *mem;
    assert_int_equal(rlb_alloc_host(c1, 8 * 192 * sizeof(float), (void **)&mem), 0);
    rlb_tensor_desc f;
    rlb_tensor_desc_init(&f);
    f.name = "model.layers.1.mlp.down_proj.lora_A.weight";
    f.ndim = 2;
    f.shape[0] = 8;
    f.shape[1] = 192;
    f.data = mem;
    assert_int_equal(rlb_register(c1, &f, 1), 0);
    assert_int_equal(rlb_unregister_lora(c0, &t, 1), RLB_ENOTFOUND); /* not rank 0's now */
    rlb_close(c1);
    rlb_close(c0);
    assert_int_equal(h_stop(&r, NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_lora_trainer_base, h_teardown),
        cmocka_unit_test_teardown(test_lora_checkpoint_base, h_teardown),
        cmocka_unit_test_teardown(test_lora_declarations, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
