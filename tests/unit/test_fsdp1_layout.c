/* test_fsdp1_layout: rlb__params_fsdp1_walk, the FSDP1 flat layout the integration tests and
 * `rlb stress` register (one unit per decoder layer, one for the rest), on the tiny model.
 * The expected pieces are worked out by hand from the shapes in model/params.h (D 64, I 192,
 * H 4, KV 2, hd 16, V 250, untied) with an alignment of 7 elements, so that nearly every
 * start needs padding, and a world of 5, so that the total does too.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "model/config.h"
#include "model/params.h"

typedef struct piece {
    const char *name; /* NULL: padding */
    uint64_t start, numel;
} piece;

typedef struct seen {
    const rlb_param_list *l;
    piece got[32];
    int n;
} seen;

static void record(void *arg, int64_t p, uint64_t start, uint64_t numel)
{
    seen *s = arg;
    assert_true(s->n < 32);
    s->got[s->n++] = (piece){p < 0 ? NULL : s->l->params[p].name, start, numel};
}

static void expect_unit(const rlb_param_list *l, int unit, uint32_t align, uint32_t world,
                        const piece *want, int n_want, uint64_t total)
{
    seen s = {.l = l};
    assert_int_equal(rlb__params_fsdp1_walk(l, unit, align, world, record, &s), total);
    assert_int_equal(rlb__params_fsdp1_walk(l, unit, align, world, NULL, NULL), total);
    assert_int_equal(s.n, n_want);
    for (int i = 0; i < n_want; i++) {
        if (want[i].name)
            assert_string_equal(s.got[i].name, want[i].name);
        else
            assert_null(s.got[i].name);
        assert_int_equal(s.got[i].start, want[i].start);
        assert_int_equal(s.got[i].numel, want[i].numel);
    }
}

static void test_tiny_units(void **state)
{
    (void)state;
    rlb_model_config cfg;
    rlb__config_tiny(&cfg);
    rlb_param_list l;
    assert_int_equal(rlb__params_init(&l, &cfg, NULL, 0), 0);
    /* Unit 0: embed [250, 64], final norm [64], lm_head [250, 64]. */
    const piece unit0[] = {
        {"model.embed_tokens.weight", 0, 16000}, {NULL, 16000, 2},
        {"model.norm.weight", 16002, 64},         {NULL, 16066, 6},
        {"lm_head.weight", 16072, 16000},         {NULL, 32072, 3},
    };
    expect_unit(&l, 0, 7, 5, unit0, 6, 32075);
    /* Unit 1: layer 0, its parameters in list order. */
    const piece unit1[] = {
        {"model.layers.0.input_layernorm.weight", 0, 64},
        {NULL, 64, 6},
        {"model.layers.0.self_attn.q_proj.weight", 70, 4096},
        {NULL, 4166, 6},
        {"model.layers.0.self_attn.k_proj.weight", 4172, 2048},
        {NULL, 6220, 3},
        {"model.layers.0.self_attn.v_proj.weight", 6223, 2048},
        {NULL, 8271, 3},
        {"model.layers.0.self_attn.o_proj.weight", 8274, 4096},
        {NULL, 12370, 6},
        {"model.layers.0.post_attention_layernorm.weight", 12376, 64},
        {NULL, 12440, 6},
        {"model.layers.0.mlp.gate_proj.weight", 12446, 12288},
        {NULL, 24734, 4},
        {"model.layers.0.mlp.up_proj.weight", 24738, 12288},
        {NULL, 37026, 4},
        {"model.layers.0.mlp.down_proj.weight", 37030, 12288},
        {NULL, 49318, 2},
    };
    expect_unit(&l, 1, 7, 5, unit1, 18, 49320);
    /* No alignment and one rank: the parameters back to back, no padding at all. */
    const piece packed[] = {
        {"model.embed_tokens.weight", 0, 16000},
        {"model.norm.weight", 16000, 64},
        {"lm_head.weight", 16064, 16000},
    };
    expect_unit(&l, 0, 1, 1, packed, 3, 32064);
    expect_unit(&l, 0, 0, 1, packed, 3, 32064);
    /* A unit past the last layer holds nothing. */
    expect_unit(&l, 3, 7, 5, NULL, 0, 0);
    rlb__params_free(&l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_tiny_units)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
