/* test_plan_misuse: every way a caller can get the planner, its source layouts, the plan
 * wire form or the CPU executor wrong must end in a clear error, never a crash or a silent
 * partial result.
 *
 *   source   unknown / duplicate / missing tensors, shape and dtype mismatches, buffers and
 *            extents that do not exist, FSDP2 ranks missing, FSDP1 metadata that does not
 *            add up; a refused call leaves the source as it was (the same call, fixed,
 *            then succeeds)
 *   target   T that the heads, kv heads or intermediate size do not allow, bad replicas /
 *            dtype
 *   executor ops outside their buffers, overlapping rows, overflowing extents, bad refs
 *            and dtypes: refused before any byte is written; and a hand-built plan of
 *            large ops, split over threads, against a naive element loop, with its
 *            non-finite values counted per op
 *   wire     truncated buffers, any bit flip of the header, tables and ops that disagree
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cpu/plan_exec.h"
#include "model/params.h"
#include "model/plan.h"
#include "model/source.h"
#include "tests/unit/ref_convert.h"

#define POISON 0x5a

/* A Qwen2 model (biases), untied, small enough that a whole plan is a few kilobytes. */
static void small_config(rlb_model_config *c)
{
    rlb__config_tiny(c);
    c->arch = RLB_ARCH_QWEN2;
    c->attn_bias = 1;
    c->hidden = 8;
    c->intermediate = 16;
    c->n_heads = 4;
    c->n_kv_heads = 2;
    c->head_dim = 4;
    c->n_layers = 2;
    c->vocab = 100;
    c->tie_embeddings = 0;
}

/* The model's parameters and a source with one buffer that holds every tensor whole
 * (F32, back to back) and room for FSDP experiments in buffers 1.. */
typedef struct fixture {
    rlb_model_config cfg;
    rlb_param_list pl;
    rlb_source src;
    uint64_t full_bytes; /* size of buffer 0 */
    char err[256];
} fixture;

static void fixture_init(fixture *fx, int add_all)
{
    memset(fx, 0, sizeof *fx);
    small_config(&fx->cfg);
    assert_int_equal(rlb__params_init(&fx->pl, &fx->cfg, NULL, 0), 0);
    assert_int_equal(rlb__source_init(&fx->src, &fx->pl), 0);
    for (int64_t i = 0; i < fx->pl.n; i++)
        fx->full_bytes += rlb__param_numel(&fx->pl.params[i]) * 4;
    assert_int_equal(rlb__source_add_buffer(&fx->src, fx->full_bytes), 0);
    for (uint64_t off = 0, i = 0; add_all && i < (uint64_t)fx->pl.n; i++) {
        const rlb_param *p = &fx->pl.params[i];
        int64_t shape[2] = {p->rows, p->cols};
        int rc = rlb__source_add_full(&fx->src, p->name, p->ndim, shape, RLB_DTYPE_F32, 0, off,
                                      fx->err, sizeof fx->err);
        if (rc)
            fail_msg("%s: %s", p->name, fx->err);
        off += rlb__param_numel(p) * 4;
    }
}

static void fixture_free(fixture *fx)
{
    rlb__source_free(&fx->src);
    rlb__params_free(&fx->pl);
}

/* rc must be `want` and err must mention `needle`. */
static void expect_err(int rc, int want, const char *err, const char *needle)
{
    if (rc != want)
        fail_msg("got %s (%d), want %s: %s", rlb_strerror(rc), rc, rlb_strerror(want), err);
    if (needle && !strstr(err, needle))
        fail_msg("error '%s' does not mention '%s'", err, needle);
}

/* The source must be exactly as it was: same pieces, same parameters placed. */
typedef struct source_snapshot {
    uint64_t n_pieces;
    uint8_t added[256];
} source_snapshot;

static void snapshot(const rlb_source *s, source_snapshot *out)
{
    assert_true(s->params->n <= (int64_t)sizeof out->added);
    out->n_pieces = s->n_pieces;
    memcpy(out->added, s->added, (size_t)s->params->n);
}

static void expect_unchanged(const rlb_source *s, const source_snapshot *before)
{
    assert_int_equal(s->n_pieces, before->n_pieces);
    assert_memory_equal(s->added, before->added, (size_t)s->params->n);
}

/* ---- source ------------------------------------------------------------------------------ */

static void test_source_full_misuse(void **state)
{
    (void)state;
    fixture fx;
    fixture_init(&fx, 0);
    source_snapshot snap;
    snapshot(&fx.src, &snap);
    char *err = fx.err;
    size_t el = sizeof fx.err;
    const char *q = "model.layers.1.self_attn.q_proj.weight";
    int64_t good[2] = {16, 8}, wrong_rows[2] = {12, 8}, wrong_cols[2] = {16, 9};

    expect_err(rlb__source_add_full(&fx.src, "model.layers.2.self_attn.q_proj.weight", 2, good,
                                    RLB_DTYPE_F32, 0, 0, err, el),
               RLB_ENOTFOUND, err, "model.layers.2.self_attn.q_proj.weight");
    expect_err(rlb__source_add_full(&fx.src, "model.layers.1.self_attn.o_proj.bias", 1, good,
                                    RLB_DTYPE_F32, 0, 0, err, el),
               RLB_ENOTFOUND, err, "o_proj.bias");
    expect_err(rlb__source_add_full(&fx.src, q, 2, wrong_rows, RLB_DTYPE_F32, 0, 0, err, el),
               RLB_ESHAPE, err, "[12, 8]");
    assert_non_null(strstr(err, "[16, 8]")); /* what the config says */
    assert_non_null(strstr(err, q));
    expect_err(rlb__source_add_full(&fx.src, q, 2, wrong_cols, RLB_DTYPE_F32, 0, 0, err, el),
               RLB_ESHAPE, err, q);
    expect_err(rlb__source_add_full(&fx.src, q, 1, good, RLB_DTYPE_F32, 0, 0, err, el),
               RLB_ESHAPE, err, q);
    expect_err(rlb__source_add_full(&fx.src, q, 2, NULL, RLB_DTYPE_F32, 0, 0, err, el),
               RLB_ESHAPE, err, q);
    expect_err(rlb__source_add_full(&fx.src, q, 2, good, RLB_DTYPE_I8, 0, 0, err, el),
               RLB_EDTYPE, err, q);
    expect_err(rlb__source_add_full(&fx.src, q, 2, good, RLB_DTYPE_F32, 7, 0, err, el),
               RLB_EINVAL, err, "buffer 7");
    expect_err(rlb__source_add_full(&fx.src, q, 2, good, RLB_DTYPE_F32, 0, fx.full_bytes - 511,
                                    err, el),
               RLB_EINVAL, err, q);
    expect_err(rlb__source_add_full(&fx.src, q, 2, good, RLB_DTYPE_F32, 0, UINT64_MAX - 8, err,
                                    el),
               RLB_EINVAL, err, q);
    expect_err(rlb__source_add_full(&fx.src, NULL, 2, good, RLB_DTYPE_F32, 0, 0, err, el),
               RLB_EINVAL, err, "name");
    expect_unchanged(&fx.src, &snap);

    /* The last byte that fits is fine; the same tensor again is a duplicate. */
    assert_int_equal(rlb__source_add_full(&fx.src, q, 2, good, RLB_DTYPE_BF16, 0,
                                          fx.full_bytes - 256, err, el),
                     0);
    expect_err(rlb__source_add_full(&fx.src, q, 2, good, RLB_DTYPE_F32, 0, 0, err, el),
               RLB_EEXIST, err, q);
    rlb_src_loc ranks[2] = {{0, 0}, {0, 256}};
    expect_err(rlb__source_add_fsdp2(&fx.src, q, 2, good, RLB_DTYPE_F32, 2, ranks, err, el),
               RLB_EEXIST, err, q);
    fixture_free(&fx);
}

static void test_source_missing(void **state)
{
    (void)state;
    fixture fx;
    fixture_init(&fx, 1);
    assert_int_equal(rlb__source_check(&fx.src, fx.err, sizeof fx.err), 0);
    fixture_free(&fx);

    /* Everything but one tensor: the check and the planner both name it. */
    fixture_init(&fx, 0);
    uint64_t off = 0;
    for (int64_t i = 0; i < fx.pl.n; i++) {
        const rlb_param *p = &fx.pl.params[i];
        int64_t shape[2] = {p->rows, p->cols};
        if (strcmp(p->name, "model.layers.1.self_attn.v_proj.bias") != 0)
            assert_int_equal(rlb__source_add_full(&fx.src, p->name, p->ndim, shape,
                                                  RLB_DTYPE_F32, 0, off, NULL, 0),
                             0);
        off += rlb__param_numel(p) * 4;
    }
    expect_err(rlb__source_check(&fx.src, fx.err, sizeof fx.err), RLB_ENOTFOUND, fx.err,
               "model.layers.1.self_attn.v_proj.bias");
    rlb_plan plan;
    rlb_target tgt = {.tp_size = 1, .replicas = 1, .dtype = RLB_DTYPE_BF16};
    expect_err(rlb__plan_build(&fx.src, &tgt, &plan, fx.err, sizeof fx.err), RLB_ENOTFOUND,
               fx.err, "model.layers.1.self_attn.v_proj.bias");
    assert_null(plan.ops);
    fixture_free(&fx);
}

static void test_source_fsdp2_misuse(void **state)
{
    (void)state;
    fixture fx;
    fixture_init(&fx, 0);
    char *err = fx.err;
    size_t el = sizeof fx.err;
    /* k_proj: [8, 8] over W = 3: c = 3, ranks hold 3, 3, 2 rows (24, 24, 16 elements). */
    const char *k = "model.layers.0.self_attn.k_proj.weight";
    int64_t shape[2] = {8, 8};
    int b1 = rlb__source_add_buffer(&fx.src, 128), b2 = rlb__source_add_buffer(&fx.src, 96);
    int b3 = rlb__source_add_buffer(&fx.src, 64);
    rlb_src_loc ranks[3] = {{(uint32_t)b1, 0}, {(uint32_t)b2, 0}, {(uint32_t)b3, 0}};
    source_snapshot snap;
    snapshot(&fx.src, &snap);

    expect_err(rlb__source_add_fsdp2(&fx.src, k, 2, shape, RLB_DTYPE_F32, 0, ranks, err, el),
               RLB_EINVAL, err, k);
    expect_err(rlb__source_add_fsdp2(&fx.src, k, 2, shape, RLB_DTYPE_F32, 3, NULL, err, el),
               RLB_EINVAL, err, k);
    expect_err(rlb__source_add_fsdp2(&fx.src, k, 2, shape, RLB_DTYPE_U8, 3, ranks, err, el),
               RLB_EDTYPE, err, k);
    ranks[1].buffer = RLB_SRC_NO_BUFFER;
    expect_err(rlb__source_add_fsdp2(&fx.src, k, 2, shape, RLB_DTYPE_F32, 3, ranks, err, el),
               RLB_EINVAL, err, "rank 1 of 3");
    assert_non_null(strstr(err, "rows [3, 6)"));
    ranks[1].buffer = (uint32_t)b2;
    ranks[2].offset = 4; /* 16 elements of F32 from byte 4 end at 68 > 64 */
    expect_err(rlb__source_add_fsdp2(&fx.src, k, 2, shape, RLB_DTYPE_F32, 3, ranks, err, el),
               RLB_EINVAL, err, "rank 2 of 3");
    /* W = 2 wants 4 rows (128 bytes) per rank: buffer 3 is too small for rank 1. */
    rlb_src_loc two[2] = {{(uint32_t)b1, 0}, {(uint32_t)b3, 0}};
    expect_err(rlb__source_add_fsdp2(&fx.src, k, 2, shape, RLB_DTYPE_F32, 2, two, err, el),
               RLB_EINVAL, err, "rank 1 of 2");
    expect_unchanged(&fx.src, &snap);

    /* Fixed, it goes in; ranks past d0 (W = 12 > 8 rows) may name nothing. */
    ranks[2].offset = 0;
    assert_int_equal(rlb__source_add_fsdp2(&fx.src, k, 2, shape, RLB_DTYPE_F32, 3, ranks, err,
                                           el),
                     0);
    assert_int_equal(fx.src.n_pieces, snap.n_pieces + 3);
    const char *v = "model.layers.0.self_attn.v_proj.weight";
    rlb_src_loc wide[12];
    for (int f = 0; f < 12; f++)
        wide[f] = f < 8 ? (rlb_src_loc){(uint32_t)b1, (uint64_t)f * 32 % 96}
                        : (rlb_src_loc){RLB_SRC_NO_BUFFER, 0};
    assert_int_equal(rlb__source_add_fsdp2(&fx.src, v, 2, shape, RLB_DTYPE_F32, 12, wide, err,
                                           el),
                     0);
    assert_int_equal(fx.src.n_pieces, snap.n_pieces + 3 + 8);
    fixture_free(&fx);
}

static void test_source_fsdp1_misuse(void **state)
{
    (void)state;
    fixture fx;
    fixture_init(&fx, 0);
    char *err = fx.err;
    size_t el = sizeof fx.err;
    /* norm [8] + k bias [8] + gate [16, 8] + 2 padding elements = 146 over W = 2: chunks of
     * 73 BF16 elements (146 bytes), the gate split 57 / 71 across the ranks. */
    rlb_flat_entry e[4] = {
        {"model.layers.0.input_layernorm.weight", 1, {8, 0}, 8},
        {"model.layers.0.self_attn.k_proj.bias", 1, {8, 0}, 8},
        {"model.layers.0.mlp.gate_proj.weight", 2, {16, 8}, 128},
        {NULL, 0, {0, 0}, 2},
    };
    int b1 = rlb__source_add_buffer(&fx.src, 73 * 2), b2 = rlb__source_add_buffer(&fx.src, 146);
    rlb_src_loc ranks[2] = {{(uint32_t)b1, 0}, {(uint32_t)b2, 0}};
    rlb_flat_unit u = {.dtype = RLB_DTYPE_BF16, .world = 2, .chunk_numel = 73, .n_entries = 4,
                       .entries = e, .ranks = ranks};
    source_snapshot snap;
    snapshot(&fx.src, &snap);

    u.chunk_numel = 72;
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EINVAL, err, "chunk_numel 72");
    u.chunk_numel = 73;
    u.world = 0;
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EINVAL, err, "world");
    u.world = 3; /* 146 over 3 ranks is 49 per rank, not 73 */
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EINVAL, err, "chunk_numel 73");
    u.world = 2;
    u.dtype = RLB_DTYPE_I32;
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EDTYPE, err, "FSDP1");
    u.dtype = RLB_DTYPE_F32; /* 73 F32 elements do not fit 146-byte chunks */
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EINVAL, err, "rank 0 of 2");
    u.dtype = RLB_DTYPE_BF16;
    ranks[1].buffer = RLB_SRC_NO_BUFFER;
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EINVAL, err,
               "rank 1 of 2 is missing");
    ranks[1].buffer = (uint32_t)b2;
    ranks[1].offset = 2;
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EINVAL, err, "rank 1 of 2");
    ranks[1].offset = 0;

    /* Entries whose own numbers disagree, or that disagree with the model. */
    e[2].numel = 120;
    e[3].numel = 10;
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EINVAL, err,
               "mlp.gate_proj.weight' has numel 120");
    e[2].numel = 128;
    e[3].numel = 2;
    e[2].shape[0] = 8;
    e[2].numel = 64;
    e[3].numel = 66;
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_ESHAPE, err,
               "mlp.gate_proj.weight");
    e[2].shape[0] = 16;
    e[2].numel = 128;
    e[3].numel = 2;
    e[1].name = "model.layers.0.input_layernorm.weight"; /* twice in one unit */
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EEXIST, err,
               "input_layernorm.weight");
    e[1].name = "model.layers.0.self_attn.k_proj.biass";
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_ENOTFOUND, err, "biass");
    e[1].name = "model.layers.0.self_attn.k_proj.bias";
    e[0].ndim = 3;
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EINVAL, err,
               "input_layernorm.weight");
    e[0].ndim = 1;
    u.n_entries = 0;
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EINVAL, err, "entries");
    u.n_entries = 4;
    expect_unchanged(&fx.src, &snap);

    /* The unit as it should be: the norm and bias in rank 0, gate split across the ranks
     * (57 elements in rank 0, 71 in rank 1). A second unit naming any of them is a
     * duplicate and changes nothing. */
    assert_int_equal(rlb__source_add_fsdp1(&fx.src, &u, err, el), 0);
    assert_int_equal(fx.src.n_pieces, snap.n_pieces + 4);
    snapshot(&fx.src, &snap);
    expect_err(rlb__source_add_fsdp1(&fx.src, &u, err, el), RLB_EEXIST, err,
               "input_layernorm.weight");
    expect_unchanged(&fx.src, &snap);
    fixture_free(&fx);
}

/* ---- target ------------------------------------------------------------------------------ */

static void test_target_misuse(void **state)
{
    (void)state;
    fixture fx;
    fixture_init(&fx, 1);
    rlb_plan plan;
    char *err = fx.err;
    size_t el = sizeof fx.err;
    rlb_target tgt = {.tp_size = 8, .replicas = 1, .dtype = RLB_DTYPE_BF16};
    /* H = 4: T = 8 and T = 3 do not divide the heads. */
    expect_err(rlb__plan_build(&fx.src, &tgt, &plan, err, el), RLB_EUNSUPPORTED, err,
               "num_attention_heads 4");
    tgt.tp_size = 3;
    expect_err(rlb__plan_build(&fx.src, &tgt, &plan, err, el), RLB_EUNSUPPORTED, err,
               "num_attention_heads");
    tgt.tp_size = 0;
    expect_err(rlb__plan_build(&fx.src, &tgt, &plan, err, el), RLB_EINVAL, err, "TP 0");
    tgt.tp_size = 2;
    tgt.replicas = 0;
    expect_err(rlb__plan_build(&fx.src, &tgt, &plan, err, el), RLB_EINVAL, err, "replicas");
    tgt.replicas = 1;
    tgt.dtype = RLB_DTYPE_F8E4M3;
    expect_err(rlb__plan_build(&fx.src, &tgt, &plan, err, el), RLB_EDTYPE, err, "dtype");
    expect_err(rlb__plan_build(&fx.src, NULL, &plan, err, el), RLB_EINVAL, err, "NULL");
    fixture_free(&fx);

    /* The kv-head and intermediate rules, straight on rlb__tp_check. */
    rlb_model_config c;
    small_config(&c);
    c.n_heads = 12;
    c.n_kv_heads = 3; /* T = 2: 3 % 2 and 2 % 3 both non-zero */
    c.intermediate = 24;
    c.vocab = 192; /* Vp = 192: divisible by 3 */
    expect_err(rlb__tp_check(&c, 2, err, el), RLB_EUNSUPPORTED, err, "num_key_value_heads 3");
    assert_int_equal(rlb__tp_check(&c, 3, NULL, 0), 0);
    c.intermediate = 20;
    expect_err(rlb__tp_check(&c, 3, err, el), RLB_EUNSUPPORTED, err, "intermediate_size 20");
    c.n_kv_heads = 5; /* invalid config: 12 % 5 */
    expect_err(rlb__tp_check(&c, 1, err, el), RLB_EINVAL, err, "num_key_value_heads");
}

/* ---- executor ---------------------------------------------------------------------------- */

typedef struct bound_plan {
    rlb_plan plan;
    void *src[1];
    uint64_t src_len[1];
    void *dst[2];
    uint64_t dst_len[2];
    uint8_t *poisoned; /* what the destinations hold before a run */
} bound_plan;

/* A T = 2 BF16 plan of the fixture, with its buffers. */
static void bind_plan(fixture *fx, bound_plan *b)
{
    rlb_target tgt = {.tp_size = 2, .replicas = 1, .dtype = RLB_DTYPE_BF16};
    memset(b, 0, sizeof *b);
    int rc = rlb__plan_build(&fx->src, &tgt, &b->plan, fx->err, sizeof fx->err);
    if (rc)
        fail_msg("plan build: %s", fx->err);
    b->src_len[0] = fx->full_bytes;
    b->src[0] = malloc(fx->full_bytes);
    memset(b->src[0], 0x3f, fx->full_bytes); /* 0x3f3f3f3f: 0.75, finite */
    for (int d = 0; d < 2; d++) {
        b->dst_len[d] = b->plan.dst_bytes[d];
        b->dst[d] = malloc(b->dst_len[d]);
        memset(b->dst[d], POISON, b->dst_len[d]);
    }
    b->poisoned = malloc(b->dst_len[0] + b->dst_len[1]);
    memset(b->poisoned, POISON, b->dst_len[0] + b->dst_len[1]);
}

static void unbind_plan(bound_plan *b)
{
    free(b->src[0]);
    free(b->dst[0]);
    free(b->dst[1]);
    free(b->poisoned);
    rlb__plan_free(&b->plan);
}

static int exec(bound_plan *b, char *err, size_t el)
{
    return rlb__plan_exec_cpu(&b->plan, (const void *const *)b->src, b->src_len, b->dst,
                              b->dst_len, 2, err, el);
}

static void expect_untouched(const bound_plan *b)
{
    assert_memory_equal(b->dst[0], b->poisoned, b->dst_len[0]);
    assert_memory_equal(b->dst[1], b->poisoned, b->dst_len[1]);
}

static void test_exec_rejects_bad_ops(void **state)
{
    (void)state;
    fixture fx;
    fixture_init(&fx, 1);
    bound_plan b;
    bind_plan(&fx, &b);
    char *err = fx.err;
    size_t el = sizeof fx.err;
    uint64_t last = b.plan.n_ops - 1;
    rlb_copy_op *op = &b.plan.ops[last], saved = *op;
    char name[32];
    snprintf(name, sizeof name, "op %llu", (unsigned long long)last);

    /* Each fault on the last op: earlier, valid ops must not have run either. */
    for (int fault = 0;; fault++) {
        *op = saved;
        switch (fault) {
        case 0: op->dst_offset = b.dst_len[op->dst_ref]; break;
        case 1: op->rows += b.dst_len[op->dst_ref] / (op->dst_stride ? op->dst_stride : 1); break;
        case 2: op->src_offset = b.src_len[0] - 1; break;
        case 3: op->dst_ref = 2; break;
        case 4: op->src_ref = 1; break;
        case 5: op->rows = 0; break;
        case 6: op->row_elems = 0; break;
        case 7: op->dst_dtype = RLB_DTYPE_I8; break;
        case 8: op->src_dtype = 9; break;
        case 9: op->reserved[3] = 1; break;
        case 10: op->rows = 2; op->dst_stride = 2; op->row_elems = 2; break; /* rows overlap */
        case 11: op->dst_offset = UINT64_MAX - 1; break;
        case 12: op->rows = 3; op->dst_stride = UINT64_MAX / 2; op->row_elems = 1; break;
        case 13: op->row_elems = UINT64_MAX / 2 + 1; break;
        case 14: op->rows = 3; op->src_stride = UINT64_MAX / 2; break;
        default: goto done;
        }
        expect_err(exec(&b, err, el), RLB_EINVAL, err, name);
        expect_untouched(&b);
    }
done:
    *op = saved;
    /* Bindings that are too short or missing. */
    uint64_t len = b.dst_len[1];
    b.dst_len[1] = 0;
    expect_err(exec(&b, err, el), RLB_EINVAL, err, "destination 1");
    b.dst_len[1] = len;
    len = b.src_len[0];
    b.src_len[0] = len - 1; /* the fixture's last tensor ends at the buffer's end */
    expect_err(exec(&b, err, el), RLB_EINVAL, err, "source 0");
    b.src_len[0] = len;
    void *keep = b.dst[0];
    b.dst[0] = NULL;
    expect_err(exec(&b, err, el), RLB_EINVAL, err, "destination 0 is NULL");
    b.dst[0] = keep;
    expect_err(rlb__plan_exec_cpu(&b.plan, NULL, b.src_len, b.dst, b.dst_len, 1, err, el),
               RLB_EINVAL, err, "NULL");
    expect_untouched(&b);

    /* Unharmed, it runs, and then every destination has been written. */
    assert_int_equal(exec(&b, err, el), 0);
    assert_memory_not_equal(b.dst[0], b.poisoned, b.dst_len[0]);
    unbind_plan(&b);
    fixture_free(&fx);
}

/* Large hand-built ops, which the executor cuts into many items, against a naive loop. */
typedef struct big_op {
    uint8_t src_dtype, dst_dtype;
    int zero;
    uint64_t rows, row_elems, src_gap, dst_gap; /* gaps: bytes between rows */
} big_op;

static void test_exec_large_ops_split(void **state)
{
    (void)state;
    static const big_op shapes[] = {
        {RLB_DTYPE_F32, RLB_DTYPE_F32, 0, 1, 700001, 0, 0},     /* 2.8 MB memcpy row */
        {RLB_DTYPE_F32, RLB_DTYPE_BF16, 0, 1, 800003, 0, 0},    /* one-row conversion */
        {RLB_DTYPE_BF16, RLB_DTYPE_F16, 0, 450, 3001, 6, 10},   /* rows with gaps */
        {RLB_DTYPE_F16, RLB_DTYPE_F16, 1, 300, 5000, 0, 4},     /* zero rows */
        {RLB_DTYPE_BF16, RLB_DTYPE_F32, 0, 2, 300001, 2, 8},    /* two long rows */
        {RLB_DTYPE_F16, RLB_DTYPE_BF16, 0, 5, 7, 0, 0},         /* small, contiguous */
    };
    enum { N = sizeof shapes / sizeof shapes[0] };
    rlb_copy_op ops[N];
    uint64_t src_len = 3, dst_len = 1; /* odd starts: nothing is aligned */
    for (int i = 0; i < N; i++) {
        const big_op *s = &shapes[i];
        uint64_t ses = s->zero ? 0 : rlb_dtype_size(s->src_dtype);
        uint64_t des = rlb_dtype_size(s->dst_dtype);
        ops[i] = (rlb_copy_op){
            .src_ref = s->zero ? RLB_PLAN_ZERO_SRC : 0, .dst_ref = 0,
            .src_dtype = s->zero ? s->dst_dtype : s->src_dtype, .dst_dtype = s->dst_dtype,
            .src_offset = s->zero ? 0 : src_len, .src_stride = s->row_elems * ses + s->src_gap,
            .dst_offset = dst_len, .dst_stride = s->row_elems * des + s->dst_gap,
            .rows = s->rows, .row_elems = s->row_elems,
        };
        if (!s->zero)
            src_len += s->rows * ops[i].src_stride;
        dst_len += s->rows * ops[i].dst_stride + 5;
    }
    uint8_t *src = malloc(src_len);
    uint64_t seed = 77;
    for (uint64_t i = 0; i < src_len; i++) {
        seed = seed * UINT64_C(6364136223846793005) + 1442695040888963407u;
        src[i] = (uint8_t)(seed >> 56);
    }
    /* Keep every element finite (NaN payloads are not the point here): clear the top
     * exponent bit of each 16-bit half and of each f32, wherever the element starts. */
    for (int i = 0; i < N; i++) {
        if (shapes[i].zero)
            continue;
        uint64_t ses = rlb_dtype_size(ops[i].src_dtype);
        for (uint64_t r = 0; r < ops[i].rows; r++)
            for (uint64_t e = 0; e < ops[i].row_elems; e++)
                src[ops[i].src_offset + r * ops[i].src_stride + e * ses + ses - 1] &= 0xbf;
    }

    /* Expected image: poison, then each op by the naive element loop. */
    uint8_t *want = malloc(dst_len), *got = malloc(dst_len);
    memset(want, POISON, dst_len);
    for (int i = 0; i < N; i++) {
        const rlb_copy_op *op = &ops[i];
        uint64_t ses = rlb_dtype_size(op->src_dtype), des = rlb_dtype_size(op->dst_dtype);
        for (uint64_t r = 0; r < op->rows; r++)
            for (uint64_t e = 0; e < op->row_elems; e++) {
                uint32_t bits = 0, out = 0;
                if (op->src_ref != RLB_PLAN_ZERO_SRC) {
                    memcpy(&bits, src + op->src_offset + r * op->src_stride + e * ses, ses);
                    out = op->src_dtype == op->dst_dtype
                              ? bits
                              : ref_bits(ref_value(bits, op->src_dtype), op->dst_dtype);
                }
                memcpy(want + op->dst_offset + r * op->dst_stride + e * des, &out, des);
            }
    }
    uint64_t first[2] = {0, N}, bytes_written = 0;
    for (int i = 0; i < N; i++)
        bytes_written += ops[i].rows * ops[i].row_elems * rlb_dtype_size(ops[i].dst_dtype);
    rlb_plan plan = {.n_src = 1, .n_dst = 1, .src_bytes = &src_len, .dst_bytes = &dst_len,
                     .dst_first_op = first, .n_ops = N, .ops = ops,
                     .bytes_written = bytes_written};
    const void *srcs[1] = {src};
    void *dsts[1] = {got};
    char err[256] = "";
    static const int threads[] = {1, 2, 3, 8};
    for (size_t k = 0; k < sizeof threads / sizeof threads[0]; k++) {
        memset(got, POISON, dst_len);
        int rc = rlb__plan_exec_cpu(&plan, srcs, &src_len, dsts, &dst_len, threads[k], err,
                                    sizeof err);
        if (rc)
            fail_msg("%d threads: %s", threads[k], err);
        if (memcmp(got, want, dst_len) != 0) {
            uint64_t at = 0;
            while (got[at] == want[at])
                at++;
            fail_msg("%d threads: byte %llu is 0x%02x, want 0x%02x", threads[k],
                     (unsigned long long)at, got[at], want[at]);
        }
    }

    /* Poison: an Inf or a NaN in about one element in 997 of each op. The counting run
     * reports exactly those per op (zero ops none), for any thread count, and what it
     * wrote holds exactly that many non-finite values. */
    uint64_t want_bad[N] = {0}, bad[N];
    for (int i = 0; i < N; i++) {
        if (shapes[i].zero)
            continue;
        uint64_t ses = rlb_dtype_size(ops[i].src_dtype);
        for (uint64_t r = 0; r < ops[i].rows; r++)
            for (uint64_t e = 0; e < ops[i].row_elems; e++) {
                uint64_t k = r * ops[i].row_elems + e;
                if (k % 997 != (uint64_t)i % 7)
                    continue;
                int nan = (int)(want_bad[i]++ & 1);
                uint32_t bits = ops[i].src_dtype == RLB_DTYPE_F32    ? (nan ? 0x7fc00001u : 0xff800000u)
                                : ops[i].src_dtype == RLB_DTYPE_BF16 ? (nan ? 0x7fc1u : 0xff80u)
                                                                     : (nan ? 0x7e01u : 0xfc00u);
                memcpy(src + ops[i].src_offset + r * ops[i].src_stride + e * ses, &bits, ses);
            }
    }
    for (size_t k = 0; k < sizeof threads / sizeof threads[0]; k++) {
        memset(bad, 0xab, sizeof bad);
        int rc = rlb__plan_exec_cpu_counted(&plan, srcs, &src_len, dsts, &dst_len, threads[k],
                                            NULL, bad, err, sizeof err);
        if (rc)
            fail_msg("%d threads: %s", threads[k], err);
        for (int i = 0; i < N; i++) {
            const rlb_copy_op *op = &ops[i];
            uint64_t des = rlb_dtype_size(op->dst_dtype), seen = 0;
            for (uint64_t r = 0; r < op->rows; r++)
                for (uint64_t e = 0; e < op->row_elems; e++) {
                    uint32_t bits = 0;
                    memcpy(&bits, got + op->dst_offset + r * op->dst_stride + e * des, des);
                    seen += !isfinite(ref_value(bits, op->dst_dtype));
                }
            if (bad[i] != want_bad[i] || seen != want_bad[i])
                fail_msg("%d threads, op %d: counted %llu, wrote %llu, want %llu", threads[k],
                         i, (unsigned long long)bad[i], (unsigned long long)seen,
                         (unsigned long long)want_bad[i]);
        }
    }
    free(src);
    free(want);
    free(got);
}

/* ---- wire form --------------------------------------------------------------------------- */

static void test_wire_corruption(void **state)
{
    (void)state;
    fixture fx;
    fixture_init(&fx, 1);
    bound_plan b;
    bind_plan(&fx, &b);
    char *err = fx.err;
    size_t el = sizeof fx.err;
    uint64_t len = rlb__plan_serialized_size(&b.plan);
    uint8_t *good = malloc(len), *buf = malloc(len + 64);
    assert_int_equal(rlb__plan_serialize(&b.plan, good, len), 0);
    rlb_plan out;
    rlb_plan_wire_header h;
    memcpy(&h, good, sizeof h);
    uint64_t *tables = (uint64_t *)(buf + sizeof h); /* src_bytes, dst_bytes, dst_first_op */
    rlb_copy_op *ops = (rlb_copy_op *)(buf + h.ops_offset);
    assert_int_equal(h.n_src, 1);
    assert_int_equal(h.n_dst, 2);

    /* The intact buffer reads back, also with trailing bytes after it. */
    memcpy(buf, good, len);
    assert_int_equal(rlb__plan_deserialize(buf, len + 64, &out, err, el), 0);
    rlb__plan_free(&out);

    /* Truncated anywhere. */
    expect_err(rlb__plan_deserialize(buf, 10, &out, err, el), RLB_EINVAL, err, "too short");
    expect_err(rlb__plan_deserialize(buf, len - 1, &out, err, el), RLB_EINVAL, err,
               "do not add up");
    expect_err(rlb__plan_deserialize(NULL, len, &out, err, el), RLB_EINVAL, err, NULL);

    /* Every single-bit flip of the header is refused (each field is checked). */
    for (unsigned bit = 0; bit < 8 * sizeof h; bit++) {
        memcpy(buf, good, len);
        buf[bit / 8] ^= (uint8_t)(1u << bit % 8);
        int rc = rlb__plan_deserialize(buf, len, &out, err, el);
        if (rc != RLB_EINVAL && rc != RLB_EVERSION)
            fail_msg("header bit %u flipped: accepted (rc %d)", bit, rc);
        assert_null(out.ops);
    }
    memcpy(buf, good, len);
    buf[offsetof(rlb_plan_wire_header, version)] = 2;
    expect_err(rlb__plan_deserialize(buf, len, &out, err, el), RLB_EVERSION, err, "version 2");

    /* Tables and ops that disagree with each other. */
    static const char *const want_msg[] = {
        "reads past source 0", "writes past destination 0", "do not cover",
        "decreasing", "in destination 0's range but writes 1", "writes past destination 1",
        "empty", "reserved", "before the previous op's end",
    };
    uint64_t n0 = b.plan.dst_first_op[1];
    for (int fault = 0; fault < (int)(sizeof want_msg / sizeof want_msg[0]); fault++) {
        memcpy(buf, good, len);
        switch (fault) {
        case 0: tables[0] = 1; break;                         /* src_bytes[0] */
        case 1: tables[1] = 256; break;                       /* dst_bytes[0] */
        case 2: tables[3 + 2] = h.n_ops - 1; break;           /* dst_first_op[2] */
        case 3: tables[3 + 1] = h.n_ops + 7; break;           /* dst_first_op[1] */
        case 4: tables[3 + 1] = n0 + 1; break;                /* rank 1's first op in 0 */
        case 5: ops[h.n_ops - 1].dst_offset = b.plan.dst_bytes[1]; break;
        case 6: ops[0].rows = 0; break;
        case 7: ops[n0].reserved[5] = 0x80; break;
        case 8: ops[1].dst_offset = ops[0].dst_offset; break; /* writes op 0's bytes again */
        }
        expect_err(rlb__plan_deserialize(buf, len, &out, err, el), RLB_EINVAL, err,
                   want_msg[fault]);
    }
    /* A change that keeps every op valid still breaks the byte totals. */
    memcpy(buf, good, len);
    ops[0].row_elems -= 1;
    expect_err(rlb__plan_deserialize(buf, len, &out, err, el), RLB_EINVAL, err, "byte totals");

    /* Random byte damage past the header: refused, or a plan that passes every check. */
    uint64_t s = 99;
    for (int i = 0; i < 3000; i++) {
        memcpy(buf, good, len);
        s = s * UINT64_C(6364136223846793005) + 1442695040888963407u;
        uint64_t at = sizeof h + (s >> 33) % (len - sizeof h);
        buf[at] ^= (uint8_t)(1 + (s >> 20) % 255);
        if (rlb__plan_deserialize(buf, len, &out, err, el) == 0) {
            for (uint64_t k = 0; k < out.n_ops; k++)
                assert_int_equal(rlb__plan_check_op(&out.ops[k], k, out.n_src, out.src_bytes,
                                                    out.n_dst, out.dst_bytes, NULL, 0),
                                 0);
            rlb__plan_free(&out);
        }
    }
    free(good);
    free(buf);
    unbind_plan(&b);
    fixture_free(&fx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_source_full_misuse),   cmocka_unit_test(test_source_missing),
        cmocka_unit_test(test_source_fsdp2_misuse),  cmocka_unit_test(test_source_fsdp1_misuse),
        cmocka_unit_test(test_target_misuse),        cmocka_unit_test(test_exec_rejects_bad_ops),
        cmocka_unit_test(test_exec_large_ops_split), cmocka_unit_test(test_wire_corruption),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
