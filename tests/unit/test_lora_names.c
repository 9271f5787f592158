/* test_lora_names: rlb_peft_to_hf, the mapping of a PEFT model's parameter names (plain,
 * FSDP1-wrapped, compiled, other adapters, DoRA) to the HF names the bridge uses. A pure
 * function: no bridge needed. The Python package's register_peft relies on it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "rlb/rlb.h"

/* rlb_peft_to_hf(peft, adapter) returns rc; hf is the name it gives, or (rc < 0) words
 * rlb_last_error(NULL) must hold. */
static void expect_peft(const char *peft, const char *adapter, int rc, const char *hf)
{
    char out[128];
    int got = rlb_peft_to_hf(peft, adapter, out, sizeof out);
    const char *err = rlb_last_error(NULL);
    if (got != rc)
        fail_msg("'%s': rc %d, expected %d", peft, got, rc);
    if (rc == 0 && (strcmp(out, hf) || *err))
        fail_msg("'%s' -> '%s' (error text '%s'), expected '%s'", peft, out, err, hf);
    if (rc < 0 && !strstr(err, hf))
        fail_msg("'%s': error text '%s' does not say '%s'", peft, err, hf);
}

static void test_peft_names(void **state)
{
    (void)state;
    expect_peft("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight",
                "default", 0, "model.layers.3.self_attn.q_proj.lora_A.weight");
    expect_peft("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight", NULL, 0,
                "model.layers.0.mlp.down_proj.lora_B.weight");
    expect_peft("base_model.model.model.layers.12.mlp.up_proj.base_layer.weight", "default", 0,
                "model.layers.12.mlp.up_proj.weight");
    expect_peft("base_model.model.model.embed_tokens.lora_embedding_A.default", "default", 0,
                "model.embed_tokens.lora_A.weight");
    expect_peft("base_model.model.model.embed_tokens.lora_embedding_B.default", NULL, 0,
                "model.embed_tokens.lora_B.weight");
    expect_peft("base_model.model.model.embed_tokens.base_layer.weight", NULL, 0,
                "model.embed_tokens.weight");
    expect_peft("base_model.model.lm_head.lora_A.default.weight", NULL, 0,
                "lm_head.lora_A.weight");
    expect_peft("base_model.model.model.norm.weight", "default", 0, "model.norm.weight");
    /* FSDP1 / activation checkpointing / torch.compile wrappers in the path. */
    expect_peft("_fsdp_wrapped_module.base_model.model.model.layers.1._fsdp_wrapped_module."
                "_checkpoint_wrapped_module.self_attn.o_proj.lora_A.default.weight",
                "default", 0, "model.layers.1.self_attn.o_proj.lora_A.weight");
    expect_peft("_orig_mod.base_model.model.model.layers.2.self_attn.v_proj.lora_B.ft.weight",
                "ft", 0, "model.layers.2.self_attn.v_proj.lora_B.weight");
    /* Already HF: unchanged. */
    expect_peft("model.layers.0.self_attn.k_proj.weight", NULL, 0,
                "model.layers.0.self_attn.k_proj.weight");
    /* Another adapter's factor, DoRA, malformed names, a short buffer. */
    expect_peft("base_model.model.model.layers.0.self_attn.q_proj.lora_A.other.weight",
                "default", RLB_ENOTFOUND, "a factor of adapter 'other', not of 'default'");
    expect_peft("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector."
                "default.weight", NULL, RLB_EUNSUPPORTED, "DoRA's lora_magnitude_vector");
    expect_peft("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", NULL,
                RLB_EINVAL, "a LoRA factor ends in lora_A.<adapter>.weight");
    expect_peft("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.bias", NULL,
                RLB_EINVAL, "lora_A.default.bias': a LoRA factor ends in");
    expect_peft("base_model.model.model..norm.weight", NULL, RLB_EINVAL, "an empty segment");
    expect_peft("model.norm.", NULL, RLB_EINVAL, "'model.norm.' ends in a dot");
    expect_peft("", NULL, RLB_EINVAL, "a name and room for the result are needed");
    expect_peft("base_model.model.", NULL, RLB_EINVAL, "'base_model.model.' names no module");
    char small[8];
    assert_int_equal(rlb_peft_to_hf("base_model.model.model.norm.weight", NULL, small,
                                    sizeof small), RLB_ETOOBIG);
    assert_non_null(strstr(rlb_last_error(NULL), "needs more than 8 bytes"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_peft_names)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
