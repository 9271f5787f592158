/* config.c: reads a HF config.json (Llama and Qwen2 families) into rlb_model_config.
 *
 * The reader is strict on purpose: a field of the wrong type, a RoPE variant or an
 * architecture feature we would silently get wrong (an o bias, a sliding window, a
 * quantized checkpoint) is refused with a message naming it, because a config we half
 * understand produces a model that generates plausible garbage rather than an error.
 * Field names in messages are HF's, with the enclosing object as a prefix
 * ("rope_scaling.factor").
 */
#include "model/config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "common/check.h"

int rlb__model_err(char *err, size_t errlen, int code, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* The architectures we read: HF class name (architectures[0]) and model_type. */
static const struct {
    rlb_arch arch;
    const char *class_name;
    const char *model_type;
} arch_table[] = {
    {RLB_ARCH_LLAMA, "LlamaForCausalLM", "llama"},
    {RLB_ARCH_QWEN2, "Qwen2ForCausalLM", "qwen2"},
};
#define N_ARCH (sizeof(arch_table) / sizeof(arch_table[0]))

const char *rlb__config_arch_name(rlb_arch arch)
{
    for (size_t i = 0; i < N_ARCH; i++)
        if (arch_table[i].arch == arch)
            return arch_table[i].class_name;
    return "?";
}

/* A field reference for messages: scope is "" at top level or the enclosing object. */
typedef struct field {
    const char *scope; /* "" or e.g. "rope_scaling" */
    const char *key;   /* the key inside scope */
} field;

#define FIELD_FMT "'%s%s%s'"
#define FIELD_ARGS(f) (f).scope, (f).scope[0] ? "." : "", (f).key

static const char *json_type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* obj[key], or NULL when the key is absent or JSON null (HF writes null for "unset"). */
static json_t *lookup(const json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    return json_is_null(v) ? NULL : v;
}

static int missing(field f, char *err, size_t errlen)
{
    return rlb__model_err(err, errlen, RLB_EINVAL, "config.json: missing field " FIELD_FMT,
                          FIELD_ARGS(f));
}

static int wrong_type(field f, const json_t *v, const char *want, char *err, size_t errlen)
{
    return rlb__model_err(err, errlen, RLB_EINVAL,
                          "config.json: field " FIELD_FMT " must be %s, not %s",
                          FIELD_ARGS(f), want, json_type_name(v));
}

#define TYPE_BIT(t) (1u << (t))
#define TYPES_INT TYPE_BIT(JSON_INTEGER)
#define TYPES_NUM (TYPE_BIT(JSON_INTEGER) | TYPE_BIT(JSON_REAL))
#define TYPES_BOOL (TYPE_BIT(JSON_TRUE) | TYPE_BIT(JSON_FALSE))
#define TYPES_STR TYPE_BIT(JSON_STRING)

/* The field's value in *out and 1 when present; 0 when absent (RLB_EINVAL naming it if
 * `required`); RLB_EINVAL naming it when its JSON type is not in `types` (TYPE_BIT mask). */
static int get_value(const json_t *obj, field f, int required, unsigned types, const char *want,
                     json_t **out, char *err, size_t errlen)
{
    json_t *v = lookup(obj, f.key);
    if (!v)
        return required ? missing(f, err, errlen) : 0;
    if (!(types & TYPE_BIT(json_typeof(v))))
        return wrong_type(f, v, want, err, errlen);
    *out = v;
    return 1;
}

/* The typed readers: as get_value, storing the value in *out only when it returns 1, so
 * *out keeps the caller's default when the field is absent. */
static int get_int(const json_t *obj, field f, int required, int64_t *out, char *err,
                   size_t errlen)
{
    json_t *v = NULL;
    int rc = get_value(obj, f, required, TYPES_INT, "an integer", &v, err, errlen);
    if (rc == 1)
        *out = (int64_t)json_integer_value(v);
    return rc;
}

static int get_num(const json_t *obj, field f, int required, double *out, char *err,
                   size_t errlen)
{
    json_t *v = NULL;
    int rc = get_value(obj, f, required, TYPES_NUM, "a number", &v, err, errlen);
    if (rc == 1)
        *out = json_number_value(v);
    return rc;
}

static int get_bool(const json_t *obj, field f, int *out, char *err, size_t errlen)
{
    json_t *v = NULL;
    int rc = get_value(obj, f, 0, TYPES_BOOL, "a boolean", &v, err, errlen);
    if (rc == 1)
        *out = json_is_true(v);
    return rc;
}

static int get_str(const json_t *obj, field f, const char **out, char *err, size_t errlen)
{
    json_t *v = NULL;
    int rc = get_value(obj, f, 0, TYPES_STR, "a string", &v, err, errlen);
    if (rc == 1)
        *out = json_string_value(v);
    return rc;
}

/* architectures[0] decides; model_type alone is enough when architectures is absent, and
 * must agree with it when both are given. */
static int parse_arch(const json_t *root, rlb_model_config *cfg, char *err, size_t errlen)
{
    const char *model_type = NULL, *class_name = NULL;
    RLB_CHECK(get_str(root, (field){"", "model_type"}, &model_type, err, errlen));
    json_t *archs = lookup(root, "architectures");
    if (archs) {
        if (!json_is_array(archs) || json_array_size(archs) == 0)
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "config.json: field 'architectures' must be a non-empty "
                                  "array of strings");
        json_t *first = json_array_get(archs, 0);
        if (!json_is_string(first))
            return wrong_type((field){"", "architectures[0]"}, first, "a string", err,
                              errlen);
        class_name = json_string_value(first);
    } else if (!model_type) {
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "config.json: missing field 'architectures' (and no "
                              "'model_type')");
    }
    for (size_t i = 0; i < N_ARCH; i++) {
        if (class_name ? strcmp(class_name, arch_table[i].class_name) != 0
                       : strcmp(model_type, arch_table[i].model_type) != 0)
            continue;
        if (class_name && model_type && strcmp(model_type, arch_table[i].model_type) != 0)
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "config.json: model_type '%s' does not match "
                                  "architectures[0] '%s'",
                                  model_type, class_name);
        cfg->arch = arch_table[i].arch;
        return 0;
    }
    return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                          "config.json: unsupported architecture '%s' (supported: "
                          "LlamaForCausalLM, Qwen2ForCausalLM)",
                          class_name ? class_name : model_type);
}

/* Reads a RoPE parameter object: rope_scaling (legacy) or rope_parameters (transformers 5).
 * Its type is under "rope_type" or, in older files, "type". */
static int parse_rope_object(const json_t *obj, const char *scope, rlb_model_config *cfg,
                             char *err, size_t errlen)
{
    const char *type = NULL;
    RLB_CHECK(get_str(obj, (field){scope, "rope_type"}, &type, err, errlen));
    if (!type)
        RLB_CHECK(get_str(obj, (field){scope, "type"}, &type, err, errlen));
    if (!type)
        return missing((field){scope, "rope_type"}, err, errlen);
    if (strcmp(type, "default") == 0) {
        cfg->rope_type = RLB_ROPE_DEFAULT;
        return 0;
    }
    if (strcmp(type, "llama3") != 0)
        return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                              "config.json: unsupported rope type '%s' in '%s' (supported: "
                              "default, llama3)",
                              type, scope);
    cfg->rope_type = RLB_ROPE_LLAMA3;
    RLB_CHECK(get_num(obj, (field){scope, "factor"}, 1, &cfg->rope_factor, err, errlen));
    RLB_CHECK(get_num(obj, (field){scope, "low_freq_factor"}, 1, &cfg->rope_low_freq_factor, err,
                errlen));
    RLB_CHECK(get_num(obj, (field){scope, "high_freq_factor"}, 1, &cfg->rope_high_freq_factor, err,
                errlen));
    RLB_CHECK(get_int(obj, (field){scope, "original_max_position_embeddings"}, 1,
                &cfg->rope_orig_max_pos, err, errlen));
    return 0;
}

/* rope_parameters, when present, is authoritative (transformers 5 moves rope_theta into
 * it); a top-level rope_theta next to it must then agree. Otherwise the legacy top-level
 * rope_theta and optional rope_scaling apply. */
static int parse_rope(const json_t *root, rlb_model_config *cfg, char *err, size_t errlen)
{
    double top_theta = 0;
    int have_top = get_num(root, (field){"", "rope_theta"}, 0, &top_theta, err, errlen);
    RLB_CHECK(have_top);
    json_t *params = lookup(root, "rope_parameters");
    if (params) {
        if (!json_is_object(params))
            return wrong_type((field){"", "rope_parameters"}, params, "an object", err,
                              errlen);
        RLB_CHECK(get_num(params, (field){"rope_parameters", "rope_theta"}, 1, &cfg->rope_theta,
                    err, errlen));
        if (have_top && top_theta != cfg->rope_theta)
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "config.json: 'rope_theta' %g disagrees with "
                                  "'rope_parameters.rope_theta' %g",
                                  top_theta, cfg->rope_theta);
        return parse_rope_object(params, "rope_parameters", cfg, err, errlen);
    }
    if (have_top)
        cfg->rope_theta = top_theta;
    json_t *scaling = lookup(root, "rope_scaling");
    if (!scaling)
        return 0;
    if (!json_is_object(scaling))
        return wrong_type((field){"", "rope_scaling"}, scaling, "an object", err, errlen);
    return parse_rope_object(scaling, "rope_scaling", cfg, err, errlen);
}

/* "dtype" (transformers 5) or "torch_dtype" (older); float32 when neither is given. */
static int parse_dtype(const json_t *root, rlb_model_config *cfg, char *err, size_t errlen)
{
    static const struct {
        const char *name;
        rlb_dtype dtype;
    } dtypes[] = {
        {"float32", RLB_DTYPE_F32},
        {"bfloat16", RLB_DTYPE_BF16},
        {"float16", RLB_DTYPE_F16},
    };
    const char *key = lookup(root, "dtype") ? "dtype" : "torch_dtype";
    const char *name = NULL;
    RLB_CHECK(get_str(root, (field){"", key}, &name, err, errlen));
    cfg->dtype = RLB_DTYPE_F32;
    if (!name)
        return 0;
    for (size_t i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++) {
        if (strcmp(name, dtypes[i].name) == 0) {
            cfg->dtype = dtypes[i].dtype;
            return 0;
        }
    }
    return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                          "config.json: unsupported %s '%s' (supported: float32, bfloat16, "
                          "float16)",
                          key, name);
}

/* Features of the architecture we do not carry: refused rather than ignored. */
static int parse_features(const json_t *root, rlb_model_config *cfg, char *err,
                          size_t errlen)
{
    if (lookup(root, "quantization_config"))
        return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                              "config.json: quantized checkpoints ('quantization_config') "
                              "are not supported");
    const char *act = NULL;
    RLB_CHECK(get_str(root, (field){"", "hidden_act"}, &act, err, errlen));
    if (act && strcmp(act, "silu") != 0)
        return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                              "config.json: unsupported 'hidden_act' '%s' (only silu)", act);
    if (cfg->arch == RLB_ARCH_QWEN2) {
        /* Qwen2 always has q/k/v biases and never an o bias. */
        int sliding = 0;
        RLB_CHECK(get_bool(root, (field){"", "use_sliding_window"}, &sliding, err, errlen));
        if (sliding)
            return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                                  "config.json: 'use_sliding_window' true is not supported");
        cfg->attn_bias = 1;
        return 0;
    }
    /* Llama's attention_bias puts a bias on o_proj as well, and mlp_bias on the MLP; the TP
     * layout carries only q/k/v biases, so both are refused. */
    static const char *const llama_biases[] = {"attention_bias", "mlp_bias"};
    for (size_t i = 0; i < sizeof(llama_biases) / sizeof(llama_biases[0]); i++) {
        int on = 0;
        RLB_CHECK(get_bool(root, (field){"", llama_biases[i]}, &on, err, errlen));
        if (on)
            return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                                  "config.json: Llama with '%s' true is not supported",
                                  llama_biases[i]);
    }
    cfg->attn_bias = 0;
    return 0;
}

static int parse_sizes(const json_t *root, rlb_model_config *cfg, char *err, size_t errlen)
{
    const struct {
        const char *key;
        int64_t *out;
    } required[] = {
        {"hidden_size", &cfg->hidden},
        {"intermediate_size", &cfg->intermediate},
        {"num_attention_heads", &cfg->n_heads},
        {"num_hidden_layers", &cfg->n_layers},
        {"vocab_size", &cfg->vocab},
        {"max_position_embeddings", &cfg->max_pos},
    };
    for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++)
        RLB_CHECK(get_int(root, (field){"", required[i].key}, 1, required[i].out, err, errlen));
    RLB_CHECK(get_num(root, (field){"", "rms_norm_eps"}, 1, &cfg->rms_eps, err, errlen));
    cfg->n_kv_heads = cfg->n_heads;
    RLB_CHECK(get_int(root, (field){"", "num_key_value_heads"}, 0, &cfg->n_kv_heads, err, errlen));
    int have_hd = get_int(root, (field){"", "head_dim"}, 0, &cfg->head_dim, err, errlen);
    RLB_CHECK(have_hd);
    /* Without num_attention_heads >= 1 there is no default; validation names that field. */
    if (!have_hd && cfg->n_heads >= 1) {
        if (cfg->hidden % cfg->n_heads)
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "config.json: 'head_dim' is absent and 'hidden_size' %lld "
                                  "is not a multiple of 'num_attention_heads' %lld",
                                  (long long)cfg->hidden, (long long)cfg->n_heads);
        cfg->head_dim = cfg->hidden / cfg->n_heads;
    }
    cfg->tie_embeddings = 0;
    RLB_CHECK(get_bool(root, (field){"", "tie_word_embeddings"}, &cfg->tie_embeddings, err,
                 errlen));
    return 0;
}

/* Fills cfg from a parsed document; the caller owns `root`. */
static int parse_root(const json_t *root, rlb_model_config *cfg, char *err, size_t errlen)
{
    if (!json_is_object(root))
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "config.json: the document must be a JSON object, not %s",
                              json_type_name(root));
    *cfg = (rlb_model_config){.rope_theta = 10000.0, .rope_type = RLB_ROPE_DEFAULT};
    RLB_CHECK(parse_arch(root, cfg, err, errlen));
    RLB_CHECK(parse_features(root, cfg, err, errlen));
    RLB_CHECK(parse_sizes(root, cfg, err, errlen));
    RLB_CHECK(parse_rope(root, cfg, err, errlen));
    RLB_CHECK(parse_dtype(root, cfg, err, errlen));
    return rlb__config_validate(cfg, err, errlen);
}

static int json_failure(const json_error_t *jerr, const char *what, char *err, size_t errlen)
{
    return rlb__model_err(err, errlen, RLB_EINVAL, "%s: invalid JSON at line %d column %d: %s",
                          what, jerr->line, jerr->column, jerr->text);
}

int rlb__config_parse(const char *json, size_t len, rlb_model_config *cfg, char *err,
                      size_t errlen)
{
    if (!json || !cfg)
        return rlb__model_err(err, errlen, RLB_EINVAL, "config.json: NULL argument");
    json_error_t jerr;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return json_failure(&jerr, "config.json", err, errlen);
    int rc = parse_root(root, cfg, err, errlen);
    json_decref(root);
    return rc;
}

int rlb__config_load(const char *path, rlb_model_config *cfg, char *err, size_t errlen)
{
    if (!path || !cfg)
        return rlb__model_err(err, errlen, RLB_EINVAL, "config.json: NULL argument");
    struct stat st;
    if (stat(path, &st) != 0)
        return rlb__model_err(err, errlen, errno == ENOENT ? RLB_ENOTFOUND : RLB_EIO,
                              "%s: %s", path, strerror(errno));
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return json_failure(&jerr, path, err, errlen);
    int rc = parse_root(root, cfg, err, errlen);
    json_decref(root);
    return rc;
}

static int check_dim(const char *name, int64_t v, char *err, size_t errlen)
{
    if (v >= 1 && v <= RLB_CONFIG_MAX_DIM)
        return 0;
    return rlb__model_err(err, errlen, RLB_EINVAL, "config: '%s' is %lld, must be in 1..%lld",
                          name, (long long)v, (long long)RLB_CONFIG_MAX_DIM);
}

static int check_positive(const char *name, double v, char *err, size_t errlen)
{
    if (isfinite(v) && v > 0)
        return 0;
    return rlb__model_err(err, errlen, RLB_EINVAL,
                          "config: '%s' is %g, must be positive and finite", name, v);
}

int rlb__config_validate(const rlb_model_config *cfg, char *err, size_t errlen)
{
    if (!cfg)
        return rlb__model_err(err, errlen, RLB_EINVAL, "config: NULL argument");
    if (strcmp(rlb__config_arch_name(cfg->arch), "?") == 0)
        return rlb__model_err(err, errlen, RLB_EINVAL, "config: unknown architecture %d",
                              (int)cfg->arch);
    const struct {
        const char *name;
        int64_t v;
    } dims[] = {
        {"hidden_size", cfg->hidden},
        {"intermediate_size", cfg->intermediate},
        {"num_attention_heads", cfg->n_heads},
        {"num_key_value_heads", cfg->n_kv_heads},
        {"head_dim", cfg->head_dim},
        {"num_hidden_layers", cfg->n_layers},
        {"vocab_size", cfg->vocab},
        {"max_position_embeddings", cfg->max_pos},
    };
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++)
        RLB_CHECK(check_dim(dims[i].name, dims[i].v, err, errlen));
    if (cfg->n_heads % cfg->n_kv_heads)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "config: 'num_attention_heads' %lld is not a multiple of "
                              "'num_key_value_heads' %lld",
                              (long long)cfg->n_heads, (long long)cfg->n_kv_heads);
    if (cfg->head_dim % 2)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "config: 'head_dim' %lld must be even (RoPE rotates pairs)",
                              (long long)cfg->head_dim);
    RLB_CHECK(check_positive("rms_norm_eps", cfg->rms_eps, err, errlen));
    RLB_CHECK(check_positive("rope_theta", cfg->rope_theta, err, errlen));
    if (cfg->rope_type == RLB_ROPE_LLAMA3) {
        RLB_CHECK(check_positive("rope factor", cfg->rope_factor, err, errlen));
        RLB_CHECK(check_positive("rope low_freq_factor", cfg->rope_low_freq_factor, err, errlen));
        RLB_CHECK(check_dim("rope original_max_position_embeddings", cfg->rope_orig_max_pos, err,
                      errlen));
        /* The llama3 ramp divides by (high - low); equal factors make it 0/0. */
        if (!(cfg->rope_high_freq_factor > cfg->rope_low_freq_factor) ||
            !isfinite(cfg->rope_high_freq_factor))
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "config: rope high_freq_factor %g must be finite and above "
                                  "low_freq_factor %g",
                                  cfg->rope_high_freq_factor, cfg->rope_low_freq_factor);
    } else if (cfg->rope_type != RLB_ROPE_DEFAULT) {
        return rlb__model_err(err, errlen, RLB_EINVAL, "config: unknown rope type %d",
                              (int)cfg->rope_type);
    }
    if (cfg->dtype != RLB_DTYPE_F32 && cfg->dtype != RLB_DTYPE_BF16 &&
        cfg->dtype != RLB_DTYPE_F16)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "config: dtype %s is not a model dtype (F32, BF16, F16)",
                              rlb_dtype_name(cfg->dtype));
    return 0;
}

int rlb__config_load_dir(const char *dir, rlb_model_config *cfg, char *err, size_t errlen)
{
    char path[4096];
    if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path)
        return rlb__model_err(err, errlen, RLB_EINVAL, "checkpoint path too long: %s", dir);
    int rc = rlb__config_load(path, cfg, err, errlen);
    if (rc == RLB_ENOTFOUND && err && errlen)
        snprintf(err, errlen, "no config.json in %s", dir);
    return rc;
}
