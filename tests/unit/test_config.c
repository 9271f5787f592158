/* test_config.c: the HF config.json reader against real-world config texts.
 *
 * The accepted texts copy the structure of the public Llama-3.1-8B and Qwen2-0.5B
 * config.json files (and the transformers 5 rewrite with rope_parameters); the expected
 * values are written by hand from those files. Every refusal is checked for its code and
 * for the field or architecture named in the message. Mutations of a good config are made
 * with jansson directly, independent of the reader under test. The directory given as the
 * first argument (tests/fuzz/corpus/config) also holds config.json files saved by
 * transformers 5.17 itself (LlamaConfig with llama3 RoPE, Qwen2Config tied), read here
 * through rlb__config_load.
 */
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "model/config.h"

static const char LLAMA31_8B[] =
    "{\n"
    "  \"architectures\": [\"LlamaForCausalLM\"],\n"
    "  \"attention_bias\": false,\n"
    "  \"attention_dropout\": 0.0,\n"
    "  \"bos_token_id\": 128000,\n"
    "  \"eos_token_id\": 128001,\n"
    "  \"hidden_act\": \"silu\",\n"
    "  \"hidden_size\": 4096,\n"
    "  \"initializer_range\": 0.02,\n"
    "  \"intermediate_size\": 14336,\n"
    "  \"max_position_embeddings\": 131072,\n"
    "  \"mlp_bias\": false,\n"
    "  \"model_type\": \"llama\",\n"
    "  \"num_attention_heads\": 32,\n"
    "  \"num_hidden_layers\": 32,\n"
    "  \"num_key_value_heads\": 8,\n"
    "  \"pretraining_tp\": 1,\n"
    "  \"rms_norm_eps\": 1e-05,\n"
    "  \"rope_scaling\": {\n"
    "    \"factor\": 8.0,\n"
    "    \"low_freq_factor\": 1.0,\n"
    "    \"high_freq_factor\": 4.0,\n"
    "    \"original_max_position_embeddings\": 8192,\n"
    "    \"rope_type\": \"llama3\"\n"
    "  },\n"
    "  \"rope_theta\": 500000.0,\n"
    "  \"tie_word_embeddings\": false,\n"
    "  \"torch_dtype\": \"bfloat16\",\n"
    "  \"transformers_version\": \"4.43.0.dev0\",\n"
    "  \"use_cache\": true,\n"
    "  \"vocab_size\": 128256\n"
    "}\n";

/* The same model as transformers 5 saves it: dtype and rope_parameters. */
static const char LLAMA31_8B_V5[] =
    "{\n"
    "  \"architectures\": [\"LlamaForCausalLM\"],\n"
    "  \"attention_bias\": false,\n"
    "  \"attention_dropout\": 0.0,\n"
    "  \"bos_token_id\": 128000,\n"
    "  \"dtype\": \"bfloat16\",\n"
    "  \"eos_token_id\": 128001,\n"
    "  \"head_dim\": 128,\n"
    "  \"hidden_act\": \"silu\",\n"
    "  \"hidden_size\": 4096,\n"
    "  \"initializer_range\": 0.02,\n"
    "  \"intermediate_size\": 14336,\n"
    "  \"max_position_embeddings\": 131072,\n"
    "  \"mlp_bias\": false,\n"
    "  \"model_type\": \"llama\",\n"
    "  \"num_attention_heads\": 32,\n"
    "  \"num_hidden_layers\": 32,\n"
    "  \"num_key_value_heads\": 8,\n"
    "  \"pretraining_tp\": 1,\n"
    "  \"rms_norm_eps\": 1e-05,\n"
    "  \"rope_parameters\": {\n"
    "    \"factor\": 8.0,\n"
    "    \"high_freq_factor\": 4.0,\n"
    "    \"low_freq_factor\": 1.0,\n"
    "    \"original_max_position_embeddings\": 8192,\n"
    "    \"rope_theta\": 500000.0,\n"
    "    \"rope_type\": \"llama3\"\n"
    "  },\n"
    "  \"tie_word_embeddings\": false,\n"
    "  \"transformers_version\": \"5.0.0\",\n"
    "  \"use_cache\": true,\n"
    "  \"vocab_size\": 128256\n"
    "}\n";

static const char QWEN2_05B[] =
    "{\n"
    "  \"architectures\": [\"Qwen2ForCausalLM\"],\n"
    "  \"attention_dropout\": 0.0,\n"
    "  \"bos_token_id\": 151643,\n"
    "  \"eos_token_id\": 151643,\n"
    "  \"hidden_act\": \"silu\",\n"
    "  \"hidden_size\": 896,\n"
    "  \"initializer_range\": 0.02,\n"
    "  \"intermediate_size\": 4864,\n"
    "  \"max_position_embeddings\": 32768,\n"
    "  \"max_window_layers\": 24,\n"
    "  \"model_type\": \"qwen2\",\n"
    "  \"num_attention_heads\": 14,\n"
    "  \"num_hidden_layers\": 24,\n"
    "  \"num_key_value_heads\": 2,\n"
    "  \"rms_norm_eps\": 1e-06,\n"
    "  \"rope_scaling\": null,\n"
    "  \"rope_theta\": 1000000.0,\n"
    "  \"sliding_window\": 32768,\n"
    "  \"tie_word_embeddings\": true,\n"
    "  \"torch_dtype\": \"bfloat16\",\n"
    "  \"transformers_version\": \"4.40.1\",\n"
    "  \"use_cache\": true,\n"
    "  \"use_sliding_window\": false,\n"
    "  \"vocab_size\": 151936\n"
    "}\n";

static int parse(const char *json, rlb_model_config *cfg, char *err, size_t errlen)
{
    return rlb__config_parse(json, strlen(json), cfg, err, errlen);
}

/* Parses and requires failure with `code` and a message containing `needle`. */
static void expect_fail(const char *json, int code, const char *needle)
{
    rlb_model_config cfg;
    char err[256] = "";
    int rc = parse(json, &cfg, err, sizeof(err));
    if (rc != code || !strstr(err, needle))
        print_error("input %.120s...\n  rc %d (want %d), err '%s' (want '%s')\n", json, rc,
                    code, err, needle);
    assert_int_equal(rc, code);
    assert_non_null(strstr(err, needle));
}

/* Text of `base` with `key` (a/b for nested keys) set to `value` (a JSON text), or removed
 * when value is NULL. The caller frees the result. */
static char *mutate(const char *base, const char *key, const char *value)
{
    json_error_t jerr;
    json_t *root = json_loads(base, 0, &jerr);
    assert_non_null(root);
    json_t *obj = root;
    char path[128];
    snprintf(path, sizeof(path), "%s", key);
    char *slash = strchr(path, '/');
    if (slash) {
        *slash = 0;
        obj = json_object_get(root, path);
        assert_non_null(obj);
        key = slash + 1;
    }
    if (value) {
        json_t *v = json_loads(value, JSON_DECODE_ANY, &jerr);
        assert_non_null(v);
        json_object_set_new(obj, key, v);
    } else {
        assert_int_equal(json_object_del(obj, key), 0);
    }
    char *text = json_dumps(root, 0);
    json_decref(root);
    assert_non_null(text);
    return text;
}

static void expect_mutation_fails(const char *base, const char *key, const char *value,
                                  int code, const char *needle)
{
    char *text = mutate(base, key, value);
    expect_fail(text, code, needle);
    free(text);
}

static void check_llama31_8b(const rlb_model_config *c)
{
    assert_int_equal(c->arch, RLB_ARCH_LLAMA);
    assert_int_equal(c->hidden, 4096);
    assert_int_equal(c->intermediate, 14336);
    assert_int_equal(c->n_heads, 32);
    assert_int_equal(c->n_kv_heads, 8);
    assert_int_equal(c->head_dim, 128);
    assert_int_equal(c->n_layers, 32);
    assert_int_equal(c->vocab, 128256);
    assert_int_equal(c->max_pos, 131072);
    assert_true(c->rms_eps == 1e-05);
    assert_true(c->rope_theta == 500000.0);
    assert_int_equal(c->rope_type, RLB_ROPE_LLAMA3);
    assert_true(c->rope_factor == 8.0);
    assert_true(c->rope_low_freq_factor == 1.0);
    assert_true(c->rope_high_freq_factor == 4.0);
    assert_int_equal(c->rope_orig_max_pos, 8192);
    assert_int_equal(c->tie_embeddings, 0);
    assert_int_equal(c->attn_bias, 0);
    assert_int_equal(c->dtype, RLB_DTYPE_BF16);
}

static void test_llama31_legacy_rope(void **state)
{
    rlb_model_config c;
    char err[256] = "";
    assert_int_equal(parse(LLAMA31_8B, &c, err, sizeof(err)), 0);
    check_llama31_8b(&c);
}

static void test_llama31_rope_parameters(void **state)
{
    rlb_model_config c;
    char err[256] = "";
    assert_int_equal(parse(LLAMA31_8B_V5, &c, err, sizeof(err)), 0);
    check_llama31_8b(&c);
    /* A top-level rope_theta beside rope_parameters must agree with it. */
    char *same = mutate(LLAMA31_8B_V5, "rope_theta", "500000");
    assert_int_equal(parse(same, &c, err, sizeof(err)), 0);
    free(same);
    expect_mutation_fails(LLAMA31_8B_V5, "rope_theta", "10000.0", RLB_EINVAL, "rope_theta");
    expect_mutation_fails(LLAMA31_8B_V5, "rope_parameters/rope_theta", NULL, RLB_EINVAL,
                          "rope_parameters.rope_theta");
    /* transformers 5 writes plain RoPE as rope_type "default". */
    char *plain = mutate(QWEN2_05B, "rope_parameters",
                         "{\"rope_theta\": 1000000.0, \"rope_type\": \"default\"}");
    assert_int_equal(parse(plain, &c, err, sizeof(err)), 0);
    assert_int_equal(c.rope_type, RLB_ROPE_DEFAULT);
    assert_true(c.rope_theta == 1e6);
    free(plain);
}

static void test_qwen2_tied(void **state)
{
    rlb_model_config c;
    char err[256] = "";
    assert_int_equal(parse(QWEN2_05B, &c, err, sizeof(err)), 0);
    assert_int_equal(c.arch, RLB_ARCH_QWEN2);
    assert_int_equal(c.hidden, 896);
    assert_int_equal(c.intermediate, 4864);
    assert_int_equal(c.n_heads, 14);
    assert_int_equal(c.n_kv_heads, 2);
    assert_int_equal(c.head_dim, 64);
    assert_int_equal(c.n_layers, 24);
    assert_int_equal(c.vocab, 151936);
    assert_int_equal(c.max_pos, 32768);
    assert_true(c.rms_eps == 1e-06);
    assert_true(c.rope_theta == 1000000.0);
    assert_int_equal(c.rope_type, RLB_ROPE_DEFAULT);
    assert_int_equal(c.tie_embeddings, 1);
    assert_int_equal(c.attn_bias, 1);
    assert_int_equal(c.dtype, RLB_DTYPE_BF16);
    assert_string_equal(rlb__config_arch_name(c.arch), "Qwen2ForCausalLM");
}

static void test_head_dim_not_d_over_h(void **state)
{
    /* Qwen3-0.6B-like shapes on the Llama architecture: D 1024, H 16, head_dim 128. */
    char *a = mutate(LLAMA31_8B, "hidden_size", "1024");
    char *b = mutate(a, "num_attention_heads", "16");
    char *text = mutate(b, "head_dim", "128");
    rlb_model_config c;
    char err[256] = "";
    assert_int_equal(parse(text, &c, err, sizeof(err)), 0);
    assert_int_equal(c.hidden, 1024);
    assert_int_equal(c.n_heads, 16);
    assert_int_equal(c.head_dim, 128);
    /* Without head_dim it is D/H. */
    assert_int_equal(parse(b, &c, err, sizeof(err)), 0);
    assert_int_equal(c.head_dim, 64);
    /* head_dim null means absent, as HF writes it. */
    char *null_hd = mutate(b, "head_dim", "null");
    assert_int_equal(parse(null_hd, &c, err, sizeof(err)), 0);
    assert_int_equal(c.head_dim, 64);
    /* D not a multiple of H and no head_dim: no default exists. */
    expect_mutation_fails(b, "hidden_size", "1000", RLB_EINVAL, "head_dim");
    free(a);
    free(b);
    free(text);
    free(null_hd);
}

static void test_dtypes_and_defaults(void **state)
{
    rlb_model_config c;
    char err[256] = "";
    char *f16 = mutate(LLAMA31_8B, "torch_dtype", "\"float16\"");
    assert_int_equal(parse(f16, &c, err, sizeof(err)), 0);
    assert_int_equal(c.dtype, RLB_DTYPE_F16);
    /* "dtype" (transformers 5) wins over the older torch_dtype. */
    char *both = mutate(f16, "dtype", "\"float32\"");
    assert_int_equal(parse(both, &c, err, sizeof(err)), 0);
    assert_int_equal(c.dtype, RLB_DTYPE_F32);
    expect_mutation_fails(LLAMA31_8B, "torch_dtype", "\"float64\"", RLB_EUNSUPPORTED,
                          "float64");

    /* Optional fields take HF's defaults: KV = H, rope_theta 1e4, untied, float32,
     * default RoPE. model_type alone names the architecture. */
    char *min = mutate(
        "{\"model_type\": \"llama\", \"hidden_size\": 256, \"intermediate_size\": 512,"
        " \"num_attention_heads\": 8, \"num_hidden_layers\": 2, \"vocab_size\": 1000,"
        " \"rms_norm_eps\": 1e-6, \"max_position_embeddings\": 2048}",
        "use_cache", "true");
    assert_int_equal(parse(min, &c, err, sizeof(err)), 0);
    assert_int_equal(c.arch, RLB_ARCH_LLAMA);
    assert_int_equal(c.n_kv_heads, 8);
    assert_int_equal(c.head_dim, 32);
    assert_true(c.rope_theta == 10000.0);
    assert_int_equal(c.rope_type, RLB_ROPE_DEFAULT);
    assert_int_equal(c.tie_embeddings, 0);
    assert_int_equal(c.attn_bias, 0);
    assert_int_equal(c.dtype, RLB_DTYPE_F32);
    char *qwen = mutate(min, "model_type", "\"qwen2\"");
    assert_int_equal(parse(qwen, &c, err, sizeof(err)), 0);
    assert_int_equal(c.arch, RLB_ARCH_QWEN2);
    assert_int_equal(c.attn_bias, 1);
    /* Older checkpoints wrote the rope type under "type". */
    char *old = mutate(LLAMA31_8B, "rope_scaling",
                       "{\"type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0,"
                       " \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192}");
    assert_int_equal(parse(old, &c, err, sizeof(err)), 0);
    assert_int_equal(c.rope_type, RLB_ROPE_LLAMA3);
    free(f16);
    free(both);
    free(min);
    free(qwen);
    free(old);
}

static void test_missing_required_fields(void **state)
{
    static const char *const required[] = {
        "hidden_size",       "intermediate_size", "num_attention_heads",
        "num_hidden_layers", "vocab_size",        "rms_norm_eps",
        "max_position_embeddings",
    };
    for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++) {
        expect_mutation_fails(LLAMA31_8B, required[i], NULL, RLB_EINVAL, required[i]);
        /* null is the same as absent. */
        expect_mutation_fails(QWEN2_05B, required[i], "null", RLB_EINVAL, required[i]);
    }
    static const char *const llama3_fields[] = {"factor", "low_freq_factor",
                                                "high_freq_factor",
                                                "original_max_position_embeddings"};
    for (size_t i = 0; i < 4; i++) {
        char path[96], needle[96];
        snprintf(path, sizeof(path), "rope_scaling/%s", llama3_fields[i]);
        snprintf(needle, sizeof(needle), "rope_scaling.%s", llama3_fields[i]);
        expect_mutation_fails(LLAMA31_8B, path, NULL, RLB_EINVAL, needle);
        snprintf(path, sizeof(path), "rope_parameters/%s", llama3_fields[i]);
        snprintf(needle, sizeof(needle), "rope_parameters.%s", llama3_fields[i]);
        expect_mutation_fails(LLAMA31_8B_V5, path, NULL, RLB_EINVAL, needle);
    }
    expect_mutation_fails(LLAMA31_8B, "rope_scaling/rope_type", NULL, RLB_EINVAL,
                          "rope_scaling.rope_type");
    char *a = mutate(LLAMA31_8B, "architectures", NULL);
    expect_mutation_fails(a, "model_type", NULL, RLB_EINVAL, "architectures");
    free(a);
}

static void test_wrong_types(void **state)
{
    static const struct {
        const char *key, *value, *needle;
    } cases[] = {
        {"hidden_size", "\"4096\"", "'hidden_size' must be an integer"},
        {"vocab_size", "128256.5", "'vocab_size' must be an integer"},
        {"num_key_value_heads", "[8]", "'num_key_value_heads' must be an integer"},
        {"head_dim", "true", "'head_dim' must be an integer"},
        {"rms_norm_eps", "\"1e-5\"", "'rms_norm_eps' must be a number"},
        {"rope_theta", "{}", "'rope_theta' must be a number"},
        {"tie_word_embeddings", "0", "'tie_word_embeddings' must be a boolean"},
        {"attention_bias", "\"no\"", "'attention_bias' must be a boolean"},
        {"rope_scaling", "8.0", "'rope_scaling' must be an object"},
        {"rope_parameters", "[]", "'rope_parameters' must be an object"},
        {"rope_scaling/factor", "\"8\"", "'rope_scaling.factor' must be a number"},
        {"rope_scaling/original_max_position_embeddings", "8192.0",
         "'rope_scaling.original_max_position_embeddings' must be an integer"},
        {"torch_dtype", "16", "'torch_dtype' must be a string"},
        {"model_type", "1", "'model_type' must be a string"},
        {"hidden_act", "false", "'hidden_act' must be a string"},
        {"architectures", "\"LlamaForCausalLM\"", "'architectures' must be a non-empty"},
        {"architectures", "[]", "'architectures' must be a non-empty"},
        {"architectures", "[7]", "'architectures[0]' must be a string"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        expect_mutation_fails(LLAMA31_8B, cases[i].key, cases[i].value, RLB_EINVAL,
                              cases[i].needle);
}

static void test_unsupported_architectures(void **state)
{
    expect_mutation_fails(LLAMA31_8B, "architectures", "[\"MistralForCausalLM\"]",
                          RLB_EUNSUPPORTED, "'MistralForCausalLM'");
    expect_mutation_fails(QWEN2_05B, "architectures", "[\"Qwen2MoeForCausalLM\"]",
                          RLB_EUNSUPPORTED, "'Qwen2MoeForCausalLM'");
    char *a = mutate(LLAMA31_8B, "architectures", NULL);
    expect_mutation_fails(a, "model_type", "\"gemma\"", RLB_EUNSUPPORTED, "'gemma'");
    free(a);
    expect_mutation_fails(LLAMA31_8B, "model_type", "\"qwen2\"", RLB_EINVAL,
                          "model_type 'qwen2' does not match");
    /* Features we would get wrong are refused by name. */
    expect_mutation_fails(LLAMA31_8B, "attention_bias", "true", RLB_EUNSUPPORTED,
                          "attention_bias");
    expect_mutation_fails(LLAMA31_8B, "mlp_bias", "true", RLB_EUNSUPPORTED, "mlp_bias");
    expect_mutation_fails(LLAMA31_8B, "hidden_act", "\"gelu\"", RLB_EUNSUPPORTED, "gelu");
    expect_mutation_fails(QWEN2_05B, "use_sliding_window", "true", RLB_EUNSUPPORTED,
                          "use_sliding_window");
    expect_mutation_fails(LLAMA31_8B, "quantization_config",
                          "{\"quant_method\": \"fbgemm_fp8\"}", RLB_EUNSUPPORTED,
                          "quantization_config");
}

static void test_unsupported_rope_types(void **state)
{
    expect_mutation_fails(LLAMA31_8B, "rope_scaling/rope_type", "\"yarn\"", RLB_EUNSUPPORTED,
                          "'yarn'");
    expect_mutation_fails(LLAMA31_8B, "rope_scaling",
                          "{\"type\": \"dynamic\", \"factor\": 2.0}", RLB_EUNSUPPORTED,
                          "'dynamic'");
    expect_mutation_fails(LLAMA31_8B_V5, "rope_parameters/rope_type", "\"longrope\"",
                          RLB_EUNSUPPORTED, "'longrope'");
    expect_mutation_fails(QWEN2_05B, "rope_scaling", "{\"type\": \"linear\", \"factor\": 4}",
                          RLB_EUNSUPPORTED, "'linear'");
}

static void test_bad_documents(void **state)
{
    expect_fail("", RLB_EINVAL, "invalid JSON");
    expect_fail("{\"hidden_size\": 4096,", RLB_EINVAL, "invalid JSON");
    expect_fail("[1, 2]", RLB_EINVAL, "must be a JSON object");
    expect_fail("{} {}", RLB_EINVAL, "invalid JSON");
    expect_fail("{\"hidden_size\": 1, \"hidden_size\": 2}", RLB_EINVAL, "duplicate");
    /* A NUL inside the buffer ends nothing: the length given is what is parsed. */
    rlb_model_config c;
    char text[sizeof(QWEN2_05B) + 4];
    memcpy(text, QWEN2_05B, sizeof(QWEN2_05B));
    assert_int_equal(rlb__config_parse(text, sizeof(QWEN2_05B), &c, NULL, 0), RLB_EINVAL);
    assert_int_equal(rlb__config_parse(text, sizeof(QWEN2_05B) - 1, &c, NULL, 0), 0);
    assert_int_equal(rlb__config_parse(NULL, 0, &c, NULL, 0), RLB_EINVAL);
    /* A tiny error buffer is filled, truncated, never overrun. */
    char small[8];
    memset(small, 'x', sizeof(small));
    assert_int_equal(parse("[]", &c, small, 4), RLB_EINVAL);
    assert_int_equal(strlen(small), 3);
    assert_int_equal(small[4], 'x');
}

static void test_validate(void **state)
{
    static const struct {
        const char *key, *value, *needle;
    } cases[] = {
        {"hidden_size", "0", "'hidden_size' is 0"},
        {"intermediate_size", "-14336", "'intermediate_size' is -14336"},
        {"num_hidden_layers", "0", "num_hidden_layers"},
        {"vocab_size", "16777217", "'vocab_size' is 16777217"},
        {"max_position_embeddings", "0", "max_position_embeddings"},
        {"num_attention_heads", "0", "'num_attention_heads' is 0"},
        {"num_key_value_heads", "0", "'num_key_value_heads' is 0"},
        {"num_key_value_heads", "5", "not a multiple of 'num_key_value_heads' 5"},
        {"head_dim", "127", "'head_dim' 127 must be even"},
        {"rms_norm_eps", "0", "rms_norm_eps"},
        {"rms_norm_eps", "-1e-5", "rms_norm_eps"},
        {"rope_theta", "0.0", "rope_theta"},
        {"rope_scaling/factor", "0", "factor"},
        {"rope_scaling/high_freq_factor", "1.0", "high_freq_factor"},
        {"rope_scaling/original_max_position_embeddings", "0", "original_max_position"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        expect_mutation_fails(LLAMA31_8B, cases[i].key, cases[i].value, RLB_EINVAL,
                              cases[i].needle);

    rlb_model_config c;
    char err[256];
    rlb__config_tiny(&c);
    assert_int_equal(rlb__config_validate(&c, err, sizeof(err)), 0);
    c.rope_theta = INFINITY;
    assert_int_equal(rlb__config_validate(&c, err, sizeof(err)), RLB_EINVAL);
    rlb__config_tiny(&c);
    c.rms_eps = NAN;
    assert_int_equal(rlb__config_validate(&c, err, sizeof(err)), RLB_EINVAL);
    rlb__config_tiny(&c);
    c.dtype = RLB_DTYPE_I8;
    assert_int_equal(rlb__config_validate(&c, err, sizeof(err)), RLB_EINVAL);
    assert_non_null(strstr(err, "I8"));
    rlb__config_tiny(&c);
    c.arch = (rlb_arch)7;
    assert_int_equal(rlb__config_validate(&c, err, sizeof(err)), RLB_EINVAL);
    assert_int_equal(rlb__config_validate(NULL, err, sizeof(err)), RLB_EINVAL);
}

static void test_tiny(void **state)
{
    rlb_model_config c;
    rlb__config_tiny(&c);
    assert_int_equal(c.arch, RLB_ARCH_LLAMA);
    assert_int_equal(c.hidden, 64);
    assert_int_equal(c.n_heads, 4);
    assert_int_equal(c.n_kv_heads, 2);
    assert_int_equal(c.head_dim, 16);
    assert_int_equal(c.n_layers, 2);
    assert_int_equal(c.vocab, 250);
    assert_int_not_equal(c.vocab % 64, 0); /* padding rows exist */
    for (int T = 1; T <= 8; T *= 2)
        assert_int_equal(c.intermediate % T, 0);
    assert_int_equal(c.tie_embeddings, 0);
    assert_int_equal(c.dtype, RLB_DTYPE_F32);
}

static void test_load(void **state)
{
    rlb_model_config c;
    char err[256] = "";
    char dir[] = "/tmp/rlb-test-config-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[sizeof(dir) + 16];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    assert_int_equal(rlb__config_load(path, &c, err, sizeof(err)), RLB_ENOTFOUND);
    assert_non_null(strstr(err, "config.json"));
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(LLAMA31_8B, f);
    fclose(f);
    assert_int_equal(rlb__config_load(path, &c, err, sizeof(err)), 0);
    check_llama31_8b(&c);
    f = fopen(path, "w");
    fputs("{\"architectures\": [\"Phi3ForCausalLM\"]}", f);
    fclose(f);
    assert_int_equal(rlb__config_load(path, &c, err, sizeof(err)), RLB_EUNSUPPORTED);
    assert_non_null(strstr(err, "Phi3ForCausalLM"));
    f = fopen(path, "w");
    fputs("{\"architectures\": ", f);
    fclose(f);
    assert_int_equal(rlb__config_load(path, &c, err, sizeof(err)), RLB_EINVAL);
    assert_non_null(strstr(err, path));
    unlink(path);
    rmdir(dir);
}

static const char *corpus_dir; /* argv[1]: files saved by transformers, or NULL */

static void load_saved(const char *name, rlb_model_config *c)
{
    if (!corpus_dir)
        skip();
    char path[512], err[256] = "";
    snprintf(path, sizeof(path), "%s/%s", corpus_dir, name);
    int rc = rlb__config_load(path, c, err, sizeof(err));
    if (rc)
        print_error("%s: %s\n", path, err);
    assert_int_equal(rc, 0);
}

static void test_saved_by_transformers5(void **state)
{
    rlb_model_config c;
    load_saved("transformers5_llama3.json", &c);
    assert_int_equal(c.arch, RLB_ARCH_LLAMA);
    assert_int_equal(c.hidden, 64);
    assert_int_equal(c.intermediate, 192);
    assert_int_equal(c.n_heads, 4);
    assert_int_equal(c.n_kv_heads, 2);
    assert_int_equal(c.head_dim, 16);
    assert_int_equal(c.n_layers, 2);
    assert_int_equal(c.vocab, 250);
    assert_int_equal(c.max_pos, 512);
    assert_true(c.rms_eps == 1e-05);
    assert_true(c.rope_theta == 500000.0);
    assert_int_equal(c.rope_type, RLB_ROPE_LLAMA3);
    assert_true(c.rope_factor == 8.0);
    assert_true(c.rope_low_freq_factor == 1.0);
    assert_true(c.rope_high_freq_factor == 4.0);
    assert_int_equal(c.rope_orig_max_pos, 256);
    assert_int_equal(c.tie_embeddings, 0);
    assert_int_equal(c.attn_bias, 0);
    assert_int_equal(c.dtype, RLB_DTYPE_BF16);

    load_saved("transformers5_qwen2.json", &c);
    assert_int_equal(c.arch, RLB_ARCH_QWEN2);
    assert_int_equal(c.intermediate, 128);
    assert_int_equal(c.head_dim, 16);
    assert_true(c.rms_eps == 1e-06);
    assert_true(c.rope_theta == 1000000.0);
    assert_int_equal(c.rope_type, RLB_ROPE_DEFAULT);
    assert_int_equal(c.tie_embeddings, 1);
    assert_int_equal(c.attn_bias, 1);
    assert_int_equal(c.dtype, RLB_DTYPE_BF16);
}

int main(int argc, char **argv)
{
    corpus_dir = argc > 1 ? argv[1] : NULL;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama31_legacy_rope),
        cmocka_unit_test(test_llama31_rope_parameters),
        cmocka_unit_test(test_qwen2_tied),
        cmocka_unit_test(test_head_dim_not_d_over_h),
        cmocka_unit_test(test_dtypes_and_defaults),
        cmocka_unit_test(test_missing_required_fields),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_unsupported_architectures),
        cmocka_unit_test(test_unsupported_rope_types),
        cmocka_unit_test(test_bad_documents),
        cmocka_unit_test(test_validate),
        cmocka_unit_test(test_tiny),
        cmocka_unit_test(test_load),
        cmocka_unit_test(test_saved_by_transformers5),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
