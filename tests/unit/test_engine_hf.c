/* test_engine_hf: the CPU engine against HF transformers' own float32 outputs
 * (tests/fixtures, made by make_fixtures.py with LlamaForCausalLM / Qwen2ForCausalLM).
 *
 * Every fixture is loaded from its checkpoint directory through the loader (planner +
 * CPU executor) at TP 1, 2 and 4, each rank its own process over shared memory, and:
 *   - the forward pass over prompt + HF's greedy tokens, run in three chunks through a
 *     paged cache of 4-token blocks, gives logits within LOGIT_TOL of HF's
 *     (max |ours - HF| / max(1, max |HF|) per row), and every rank the same bytes;
 *   - the engine's greedy decoding reproduces HF's 32 greedy tokens for both prompts in
 *     one batch, with logprobs within LOGPROB_TOL of log_softmax(HF logits) (computed
 *     here in double) and, at TP 2 and 4, within TP_LOGPROB_TOL of TP 1's, relative to
 *     max(1, |logprob|) (issue 4);
 *   - int8 post-load processing gives logits within INT8_TOL of HF's fp32 logits, two
 *     fresh engines give identical bytes, and running post-load processing again leaves
 *     the int8 buffers and the logits unchanged. The tolerance: with one int8 scale per
 *     row, the worst row of these random models is off by about 3% of its largest logit;
 *     6% leaves room without hiding a wrong scale or a skipped dequantization, which are
 *     off by far more.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "rlb/rlb.h"
#include "tests/unit/engine_util.h"
#include "worker/backend_cpu.h"
#include "worker/engine.h"
#include "worker/loader.h"

#define LOGIT_TOL 1e-4
#define LOGPROB_TOL 1e-4
#define TP_LOGPROB_TOL 1e-5
#define INT8_TOL 0.06
#define MAX_ROWS 48  /* prompt + greedy rows of the longest fixture prompt */
#define MAX_V 320    /* largest fixture vocabulary */
#define KV_BYTES (4u << 20)

typedef struct hf_out {
    float logits[FX_MAX_PROMPTS][MAX_ROWS * MAX_V]; /* forward over prompt + HF greedy */
    float logits2[FX_MAX_PROMPTS][MAX_ROWS * MAX_V]; /* the same after a second post-load */
    uint64_t i8_hash[2];                 /* int8 buffers after post-load once and twice */
    int32_t tokens[FX_MAX_PROMPTS][FX_MAX_IDS]; /* engine greedy tokens */
    float logprobs[FX_MAX_PROMPTS][FX_MAX_IDS]; /* their logprobs */
    int64_t n_tokens[FX_MAX_PROMPTS];    /* tokens generated */
} hf_out;

typedef struct hf_arg {
    const fixture *fx; /* the reference */
    int tp;            /* T */
    rlb_quant quant;   /* post-load processing */
} hf_arg;

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * UINT64_C(0x100000001b3);
    return h;
}

static uint64_t i8_hash(const rlb_forward *f)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    int64_t n;
    const rlb_i8_weight *const *list = rlb__ebackend_cpu_i8(f->b, &n);
    for (int64_t i = 0; i < n; i++) {
        const rlb_i8_weight *w = list[i];
        h = fnv(h, w->q, (size_t)(w->rows * w->cols));
        h = fnv(h, w->scale, (size_t)w->rows * sizeof(float));
    }
    return h;
}

/* Runs prompt + HF greedy tokens through the forward pass in three chunks (5 tokens,
 * 1 token, the rest) over a fresh block table, every row's logits kept. */
static int forward_chunks(rlb_engine *e, rlb_kvcache *kv, const fx_prompt *p, float *logits)
{
    int32_t seq[MAX_ROWS];
    int64_t n = p->logits_rows, V = rlb__engine_forward(e)->vocab;
    memcpy(seq, p->ids, (size_t)p->n_ids * sizeof *seq);
    memcpy(seq + p->n_ids, p->greedy, (size_t)p->n_greedy * sizeof *seq);
    rlb_block_table t = {0};
    int rc = rlb__kv_reserve(kv, &t, n);
    int64_t cuts[4] = {0, 5, 6, n};
    for (int c = 0; c < 3 && rc == 0; c++) {
        rlb_fwd_span sp = {.tokens = seq + cuts[c], .n = cuts[c + 1] - cuts[c],
                           .pos0 = cuts[c], .blocks = &t, .logits = RLB_FWD_LOGITS_ALL};
        rc = rlb__forward_run(rlb__engine_forward(e), kv, &sp, 1, logits + cuts[c] * V);
    }
    rlb__kv_release(kv, &t);
    rlb__kv_table_free(&t);
    return rc;
}

/* Greedy generation of every prompt in one batch, 8 tokens per step (chunked prefill). */
static int engine_greedy(rlb_engine *e, const fixture *fx, hf_out *out)
{
    for (int i = 0; i < fx->n_prompts; i++) {
        const fx_prompt *p = &fx->prompts[i];
        rlb_gen_request q = {.id = (uint64_t)i, .prompt = p->ids, .prompt_len = p->n_ids,
                             .n = 1, .max_tokens = (int32_t)p->n_greedy,
                             .sampling = {.temperature = 0.0f, .top_p = 1.0f},
                             .logprobs = 1};
        int rc = rlb__engine_add(e, &q);
        if (rc)
            return rc;
    }
    int rc = engine_run_all(e);
    if (rc)
        return rc;
    rlb_gen_result *r;
    while (rlb__engine_pop(e, &r) == 0) {
        int i = (int)r->id;
        const rlb_gen_sample *s = &r->samples[0];
        out->n_tokens[i] = s->n_tokens <= FX_MAX_IDS ? s->n_tokens : FX_MAX_IDS;
        memcpy(out->tokens[i], s->tokens, (size_t)out->n_tokens[i] * sizeof(int32_t));
        memcpy(out->logprobs[i], s->logprobs, (size_t)out->n_tokens[i] * sizeof(float));
        rlb__gen_result_free(r);
    }
    return 0;
}

static int hf_rank(int rank, rlb_tp_comm *comm, void *argp, void *outp)
{
    const hf_arg *a = argp;
    hf_out *out = outp;
    char err[512];
    rlb_loaded m;
    int rc = rlb__load_checkpoint(a->fx->dir, a->tp, rank, &m, err, sizeof err);
    if (rc) {
        fprintf(stderr, "rank %d: load %s: %s\n", rank, a->fx->dir, err);
        return rc;
    }
    rlb_engine_opts o = RLB_ENGINE_OPTS_INIT;
    o.kv_bytes = KV_BYTES;
    o.block_tokens = 4;
    o.max_batch_tokens = 8;
    o.quant = a->quant;
    o.threads = 1;
    rlb_engine *e = NULL;
    rlb_kvcache kv = {0};
    rlb_forward *f;
    if ((rc = rlb__engine_create(&m.layout, m.weights, comm, &o, &e)))
        goto out;
    f = rlb__engine_forward(e);
    if ((rc = rlb__kv_init(&kv, m.layout.cfg.n_layers, m.layout.kvt, m.layout.cfg.head_dim, 4,
                           KV_BYTES)))
        goto out;
    for (int i = 0; i < a->fx->n_prompts && !rc; i++)
        rc = forward_chunks(e, &kv, &a->fx->prompts[i], out->logits[i]);
    if (rc || (rc = engine_greedy(e, a->fx, out)))
        goto out;
    if (a->quant == RLB_QUANT_INT8) {
        out->i8_hash[0] = i8_hash(f);
        if ((rc = rlb__engine_reload(e)))
            goto out;
        out->i8_hash[1] = i8_hash(f);
        for (int i = 0; i < a->fx->n_prompts && !rc; i++)
            rc = forward_chunks(e, &kv, &a->fx->prompts[i], out->logits2[i]);
    }
out:
    if (rc)
        fprintf(stderr, "rank %d: %s\n", rank, rlb_strerror(rc));
    rlb__kv_free(&kv);
    rlb__engine_destroy(e);
    rlb__loaded_free(&m);
    return rc;
}

/* log_softmax(row)[tok] in double. */
static double ref_logprob(const float *row, int64_t V, int32_t tok)
{
    double mx = row[0], sum = 0.0;
    for (int64_t i = 1; i < V; i++)
        mx = row[i] > mx ? row[i] : mx;
    for (int64_t i = 0; i < V; i++)
        sum += exp((double)row[i] - mx);
    return (double)row[tok] - mx - log(sum);
}

/* The worst row error of rank output `o` against HF. */
static double worst_row_err(const fixture *fx, const float (*logits)[MAX_ROWS * MAX_V])
{
    double worst = 0.0;
    for (int i = 0; i < fx->n_prompts; i++) {
        const fx_prompt *p = &fx->prompts[i];
        for (int64_t r = 0; r < p->logits_rows; r++) {
            double e = rel_err(logits[i] + r * fx->vocab, p->logits + r * fx->vocab, fx->vocab);
            worst = e > worst ? e : worst;
        }
    }
    return worst;
}

static void check_fixture(const char *name)
{
    fixture fx;
    assert_int_equal(fx_load(name, &fx), 0);
    assert_true(fx.vocab <= MAX_V);
    hf_out *tp1 = NULL;
    for (int T = 1; T <= 4; T *= 2) {
        hf_arg a = {.fx = &fx, .tp = T, .quant = RLB_QUANT_NONE};
        void *outs;
        assert_int_equal(tp_run(T, hf_rank, &a, sizeof(hf_out), &outs), 0);
        hf_out *o = outs;
        double err = worst_row_err(&fx, o->logits);
        printf("%s TP %d: worst logits row error %.3g (bound %.0e)\n", name, T, err, LOGIT_TOL);
        assert_true(err <= LOGIT_TOL);
        for (int r = 1; r < T; r++) {
            const hf_out *or = tp_out(outs, r, sizeof(hf_out));
            assert_memory_equal(or->logits, o->logits, sizeof o->logits);
            assert_memory_equal(or->tokens, o->tokens, sizeof o->tokens);
            assert_memory_equal(or->logprobs, o->logprobs, sizeof o->logprobs);
        }
        for (int i = 0; i < fx.n_prompts; i++) {
            const fx_prompt *p = &fx.prompts[i];
            assert_int_equal(o->n_tokens[i], p->n_greedy);
            assert_memory_equal(o->tokens[i], p->greedy, (size_t)p->n_greedy * sizeof(int32_t));
            for (int64_t k = 0; k < p->n_greedy; k++) {
                const float *row = p->logits + (p->n_ids - 1 + k) * fx.vocab;
                double ref = ref_logprob(row, fx.vocab, p->greedy[k]);
                assert_true(fabs(o->logprobs[i][k] - ref) <= LOGPROB_TOL);
                if (tp1)
                    assert_true(fabs(o->logprobs[i][k] - tp1->logprobs[i][k]) <=
                                TP_LOGPROB_TOL * fmax(1.0, fabs(tp1->logprobs[i][k])));
            }
        }
        if (T == 1)
            tp1 = o;
        else
            tp_outs_free(outs, T, sizeof(hf_out));
    }
    tp_outs_free(tp1, 1, sizeof(hf_out));
    fx_free(&fx);
}

static void check_int8(const char *name, int T)
{
    fixture fx;
    assert_int_equal(fx_load(name, &fx), 0);
    hf_arg a = {.fx = &fx, .tp = T, .quant = RLB_QUANT_INT8};
    void *first, *second;
    assert_int_equal(tp_run(T, hf_rank, &a, sizeof(hf_out), &first), 0);
    assert_int_equal(tp_run(T, hf_rank, &a, sizeof(hf_out), &second), 0);
    const hf_out *o = first, *o2 = second;
    double err = worst_row_err(&fx, o->logits);
    printf("%s int8 TP %d: worst logits row error %.3g (bound %.2g)\n", name, T, err, INT8_TOL);
    assert_true(err <= INT8_TOL);
    assert_true(err > LOGIT_TOL); /* the int8 path really ran */
    /* Deterministic: a second engine gives the same bytes. */
    assert_memory_equal(o->logits, o2->logits, sizeof o->logits);
    assert_memory_equal(o->tokens, o2->tokens, sizeof o->tokens);
    /* Twice = once. */
    assert_true(o->i8_hash[0] == o->i8_hash[1]);
    assert_memory_equal(o->logits, o->logits2, sizeof o->logits);
    tp_outs_free(first, T, sizeof(hf_out));
    tp_outs_free(second, T, sizeof(hf_out));
    fx_free(&fx);
}

static void test_llama_gqa(void **state)
{
    (void)state;
    check_fixture("llama_gqa");
}

static void test_qwen2_tied(void **state)
{
    (void)state;
    check_fixture("qwen2_tied");
}

static void test_int8_llama(void **state)
{
    (void)state;
    check_int8("llama_gqa", 1);
    check_int8("llama_gqa", 2);
}

static void test_int8_qwen2(void **state)
{
    (void)state;
    check_int8("qwen2_tied", 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama_gqa),
        cmocka_unit_test(test_qwen2_tied),
        cmocka_unit_test(test_int8_llama),
        cmocka_unit_test(test_int8_qwen2),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
