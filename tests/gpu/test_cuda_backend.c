/* test_cuda_backend: the CUDA engine backend (worker/backend_cuda.h) against the CPU backend
 * (worker/backend_cpu.h, the reference) through the same forward pass (worker/forward.h),
 * on random models (fresh seed, printed; RLB_TEST_SEED repeats it):
 *   - fp32 weights, head_dim 24 / 64 / 128, GQA and MQA, Qwen2 biases, tied embeddings:
 *     the same script of steps (two prompts, one chunked, then decode steps with greedy
 *     tokens of the reference) gives logits within 1e-4 of the CPU's (max |d| / max(1,
 *     max |ref|)), and the same greedy tokens;
 *   - decode steps through CUDA graphs (captured, then replayed) give the same bytes as the
 *     same backend with graphs off, and as a backend that runs RoPE and the cache store
 *     inside the attention kernel in every decode step (fused_rope 1);
 *   - sampling on the GPU (greedy, temperature, top-k, top-p) gives what rlb__sample_token
 *     gives on the logits the GPU computed, logprobs within 1e-5;
 *   - int8 post-load copies: within 1e-4 of the CPU backend's int8 (same quantized bytes);
 *     fp8 per tensor / per channel: within 0.15 of the fp32 CPU logits; bf16 weights:
 *     within 0.05;
 *   - weights sleep / wake and KV sleep / wake: the same logits after as before, and
 *     sleeping the KV cache gives at least 95% of its bytes back (cudaMemGetInfo);
 *   - whole model on the HF fixtures (tests/fixtures), fp32 weights, through the engine
 *     (rlb__engine_create_on): logits within 1e-4 of HF's, greedy tokens identical;
 *   - the same in bf16 against HF's bf16 on a GPU (make_bf16_fixtures.py): HF's first 8
 *     greedy tokens identical, logits within 3x the distance bf16 moves HF from fp32;
 *   - batch-invariant mode, bf16: one sequence's logits (prompt and decode steps) alone and
 *     among 2 and 16 others of mixed lengths are bitwise identical;
 *   - decode steps of 12 rows (bucket 16: cuBLASLt products whose algorithms were timed
 *     before the capture, and without that timing): within 1e-4 of the CPU backend.
 * Exits 77 where no GPU is visible.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "kernels/cpu/convert.h"
#include "kernels/cpu/sample.h"
#include "tests/gpu/gpu_case.h"
#include "tests/unit/engine_util.h"
#include "worker/backend_cpu.h"
#include "worker/backend_cuda.h"
#include "worker/forward.h"
#include "worker/kvcache.h"
#include "worker/loader.h"

#define PROMPT_A 37
#define PROMPT_B 5
#define DECODE_STEPS 8
#define MAX_V 512
#define BLOCK_TOKENS 16

static uint64_t g_seed;

static float frand(uint64_t *s, float lo, float hi)
{
    return lo + (hi - lo) * (float)((double)(gc_rng(s) >> 11) * 0x1.0p-53);
}

typedef struct model {
    rlb_model_config cfg;
    rlb_tp_layout l32; /* float32 layout */
    float *w32;        /* its random weights */
} model;

static void make_model(model *m, uint64_t *s, int64_t hd, int64_t kv, int tie, int bias)
{
    rlb__config_tiny(&m->cfg);
    m->cfg.arch = bias ? RLB_ARCH_QWEN2 : RLB_ARCH_LLAMA;
    m->cfg.attn_bias = bias;
    m->cfg.hidden = 128;
    m->cfg.intermediate = 256;
    m->cfg.n_heads = 4;
    m->cfg.n_kv_heads = kv;
    m->cfg.head_dim = hd;
    m->cfg.n_layers = 2;
    m->cfg.vocab = 300;
    m->cfg.max_pos = 1024;
    m->cfg.tie_embeddings = tie;
    assert_int_equal(rlb__tp_layout_init(&m->l32, &m->cfg, 1, 0, RLB_DTYPE_F32), 0);
    m->w32 = calloc(1, m->l32.total_bytes);
    for (int64_t i = 0; i < m->l32.n_tensors; i++) {
        const rlb_local_tensor *t = &m->l32.tensors[i];
        float *w = (float *)((char *)m->w32 + t->offset);
        int norm = t->kind == RLB_W_ATTN_NORM || t->kind == RLB_W_MLP_NORM ||
                   t->kind == RLB_W_FINAL_NORM;
        float a = t->cols > 1 ? 1.0f / sqrtf((float)t->cols) : 0.1f;
        for (int64_t j = 0; j < t->rows * t->cols; j++)
            w[j] = norm ? frand(s, 0.9f, 1.1f)
                        : t->kind == RLB_W_EMBED ? frand(s, -1, 1) : frand(s, -a, a) * 1.7f;
    }
}

static void free_model(model *m)
{
    free(m->w32);
    rlb__tp_layout_free(&m->l32);
}

/* float32 weights (layout l32, TP 1) in the 16-bit dtype dt, and their layout. */
static void *to_half(const rlb_tp_layout *l32, const void *w32, rlb_dtype dt, rlb_tp_layout *l)
{
    assert_int_equal(rlb__tp_layout_init(l, &l32->cfg, 1, 0, dt), 0);
    uint8_t *w = calloc(1, l->total_bytes);
    for (int64_t i = 0; i < l32->n_tensors; i++) {
        const rlb_local_tensor *t = &l32->tensors[i];
        const rlb_local_tensor *u = rlb__tp_layout_find(l, t->kind, t->layer);
        const float *src = (const float *)((const char *)w32 + t->offset);
        for (int64_t j = 0; j < t->rows * t->cols; j++) {
            uint16_t h = dt == RLB_DTYPE_BF16 ? rlb__f32_to_bf16(src[j]) : rlb__f32_to_f16(src[j]);
            memcpy(w + u->offset + 2 * j, &h, 2);
        }
    }
    return w;
}

/* The model's weights in dtype dt and their layout. */
static void *convert_weights(const model *m, rlb_dtype dt, rlb_tp_layout *l)
{
    return to_half(&m->l32, m->w32, dt, l);
}

/* A forward pass over one backend with its own KV cache and the two sequences' tables. */
typedef struct runner {
    rlb_forward f;
    rlb_kvcache kv;
    rlb_block_table tab[2];
} runner;

static void runner_init(runner *r, rlb_ebackend *b, const model *m)
{
    memset(r, 0, sizeof *r);
    rlb_kv_mem mem = b->iface->kv_mem(b);
    assert_int_equal(rlb__forward_init_on(&r->f, b), 0);
    uint64_t per_block = 2ull * (uint64_t)(m->cfg.n_layers * m->l32.kvt * BLOCK_TOKENS *
                                           m->cfg.head_dim) * mem.elem_bytes;
    assert_int_equal(rlb__kv_init_mem(&r->kv, m->cfg.n_layers, m->l32.kvt, m->cfg.head_dim,
                                      BLOCK_TOKENS, 64 * per_block, &mem),
                     0);
}

static void runner_free(runner *r)
{
    for (int i = 0; i < 2; i++) {
        rlb__kv_release(&r->kv, &r->tab[i]);
        rlb__kv_table_free(&r->tab[i]);
    }
    rlb__kv_free(&r->kv);
    rlb__forward_free(&r->f);
}

/* The script: tokens of both sequences (prompts, then the greedy tokens of the reference
 * filled in as it goes). */
typedef struct script {
    int32_t a[PROMPT_A + DECODE_STEPS], b[PROMPT_B + DECODE_STEPS];
} script;

/* Logits of every step: step 0 (A's first chunk, B's prompt: B's last row), step 1 (A's
 * second chunk, all rows), then DECODE_STEPS steps of two rows. */
#define SCRIPT_ROWS (1 + (PROMPT_A - 20) + 2 * DECODE_STEPS)

static int64_t argmax(const float *x, int64_t n)
{
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

/* Runs the script; when `fill`, the greedy tokens come from these logits. */
static void run_script(runner *r, script *sc, int fill, float *logits)
{
    const int64_t V = r->f.cfg.vocab;
    assert_int_equal(rlb__kv_reserve(&r->kv, &r->tab[0], PROMPT_A + DECODE_STEPS), 0);
    assert_int_equal(rlb__kv_reserve(&r->kv, &r->tab[1], PROMPT_B + DECODE_STEPS), 0);
    rlb_fwd_span s0[2] = {
        {.tokens = sc->a, .n = 20, .pos0 = 0, .blocks = &r->tab[0], .logits = RLB_FWD_LOGITS_NONE},
        {.tokens = sc->b, .n = PROMPT_B, .pos0 = 0, .blocks = &r->tab[1], .logits = RLB_FWD_LOGITS_LAST},
    };
    assert_int_equal(rlb__forward_run(&r->f, &r->kv, s0, 2, logits), 0);
    float *row = logits + V;
    rlb_fwd_span s1 = {.tokens = sc->a + 20, .n = PROMPT_A - 20, .pos0 = 20, .blocks = &r->tab[0],
                       .logits = RLB_FWD_LOGITS_ALL};
    assert_int_equal(rlb__forward_run(&r->f, &r->kv, &s1, 1, row), 0);
    if (fill) {
        sc->a[PROMPT_A] = (int32_t)argmax(row + (PROMPT_A - 21) * V, V);
        sc->b[PROMPT_B] = (int32_t)argmax(logits, V);
    }
    row += (PROMPT_A - 20) * V;
    for (int d = 0; d < DECODE_STEPS; d++, row += 2 * V) {
        rlb_fwd_span sd[2] = {
            {.tokens = sc->a + PROMPT_A + d, .n = 1, .pos0 = PROMPT_A + d, .blocks = &r->tab[0],
             .logits = RLB_FWD_LOGITS_LAST},
            {.tokens = sc->b + PROMPT_B + d, .n = 1, .pos0 = PROMPT_B + d, .blocks = &r->tab[1],
             .logits = RLB_FWD_LOGITS_LAST},
        };
        assert_int_equal(rlb__forward_run(&r->f, &r->kv, sd, 2, row), 0);
        if (fill && d + 1 < DECODE_STEPS) {
            sc->a[PROMPT_A + d + 1] = (int32_t)argmax(row, V);
            sc->b[PROMPT_B + d + 1] = (int32_t)argmax(row + V, V);
        }
    }
    for (int i = 0; i < 2; i++)
        rlb__kv_release(&r->kv, &r->tab[i]);
}

static void random_script(script *sc, uint64_t *s, int64_t V)
{
    for (int i = 0; i < PROMPT_A; i++)
        sc->a[i] = (int32_t)gc_rnd(s, 0, V - 1);
    for (int i = 0; i < PROMPT_B; i++)
        sc->b[i] = (int32_t)gc_rnd(s, 0, V - 1);
}

static rlb_ebackend *cpu_backend(const model *m, rlb_tp_comm *comm, rlb_quant q)
{
    rlb_ebackend *b = NULL;
    assert_int_equal(rlb__ebackend_cpu_create(&m->l32, m->w32, comm, q, &b), 0);
    return b;
}

static rlb_ebackend *cuda_backend_rope(const rlb_tp_layout *l, const void *w, rlb_quant q,
                                      int graphs, int fused_rope)
{
    rlb_cuda_backend_opts o = RLB_CUDA_BACKEND_OPTS_INIT;
    o.quant = q;
    o.graphs = graphs;
    o.fused_rope = fused_rope;
    o.max_batch_tokens = 64;
    o.max_seqs = 8;
    o.max_logit_rows = 64; /* the script asks for every row's logits */
    rlb_ebackend *b = NULL;
    assert_int_equal(rlb__ebackend_cuda_create(l, w, &o, &b), 0);
    return b;
}

static rlb_ebackend *cuda_backend(const rlb_tp_layout *l, const void *w, rlb_quant q, int graphs)
{
    return cuda_backend_rope(l, w, q, graphs, 0);
}

/* max |a - ref| / max(1, max |ref|) over the rows of the script, each row by itself. */
static double script_err(const float *a, const float *ref, int64_t V)
{
    double worst = 0;
    for (int64_t r = 0; r < SCRIPT_ROWS; r++) {
        double e = rel_err(a + r * V, ref + r * V, V);
        worst = e > worst ? e : worst;
    }
    return worst;
}

static void test_fp32_against_cpu(void **state)
{
    (void)state;
    static const int64_t shapes[6][4] = {/* hd, kv, tie, bias */
                                         {24, 2, 0, 0}, {64, 1, 1, 0}, {128, 4, 0, 1},
                                         {64, 2, 1, 1}, {24, 1, 0, 1}, {128, 2, 1, 0}};
    uint64_t s = g_seed ^ 11;
    rlb_tp_comm *comm;
    assert_int_equal(rlb__tp_comm_local(&comm), 0);
    for (int i = 0; i < 6; i++) {
        model m;
        make_model(&m, &s, shapes[i][0], shapes[i][1], (int)shapes[i][2], (int)shapes[i][3]);
        const int64_t V = m.cfg.vocab;
        script sc;
        random_script(&sc, &s, V);
        float *ref = malloc((size_t)(SCRIPT_ROWS * V) * 4), *got = malloc((size_t)(SCRIPT_ROWS * V) * 4);
        float *eager = malloc((size_t)(SCRIPT_ROWS * V) * 4);
        runner rc, rg, re;
        runner_init(&rc, cpu_backend(&m, comm, RLB_QUANT_NONE), &m);
        run_script(&rc, &sc, 1, ref);
        runner_init(&rg, cuda_backend(&m.l32, m.w32, RLB_QUANT_NONE, 1), &m);
        run_script(&rg, &sc, 0, got);
        double e = script_err(got, ref, V);
        printf("fp32 hd %lld kv %lld tie %lld bias %lld: rel err %.3g\n", (long long)shapes[i][0],
               (long long)shapes[i][1], (long long)shapes[i][2], (long long)shapes[i][3], e);
        assert_true(e <= 1e-4);
        for (int64_t r = 0; r < SCRIPT_ROWS; r++)
            assert_int_equal(argmax(got + r * V, V), argmax(ref + r * V, V));
        /* the same script again on the same backend: graphs now replay */
        run_script(&rg, &sc, 0, eager);
        assert_memory_equal(eager, got, (size_t)(SCRIPT_ROWS * V) * 4);
        runner_init(&re, cuda_backend(&m.l32, m.w32, RLB_QUANT_NONE, 0), &m);
        run_script(&re, &sc, 0, eager);
        assert_memory_equal(eager, got, (size_t)(SCRIPT_ROWS * V) * 4);
        /* RoPE inside the attention kernel at every decode step (here two rows, several
         * splits, where the default keeps rope_store): the same bytes, graphs or not */
        for (int graphs = 0; graphs < 2; graphs++) {
            runner rf;
            runner_init(&rf, cuda_backend_rope(&m.l32, m.w32, RLB_QUANT_NONE, graphs, 1), &m);
            run_script(&rf, &sc, 0, eager);
            assert_memory_equal(eager, got, (size_t)(SCRIPT_ROWS * V) * 4);
            runner_free(&rf);
        }
        runner_free(&rc);
        runner_free(&rg);
        runner_free(&re);
        free(ref);
        free(got);
        free(eager);
        free_model(&m);
    }
    rlb__tp_comm_destroy(comm);
}

/* WIDE sequences of WIDE_PROMPT tokens, then WIDE_STEPS decode steps of WIDE rows (given
 * tokens), on backend b: the decode steps' logits, [WIDE_STEPS][WIDE][V]. */
#define WIDE 12
#define WIDE_PROMPT 9
#define WIDE_STEPS 3
static void wide_decode(rlb_ebackend *b, const model *m, const int32_t *tok, float *logits)
{
    runner r;
    runner_init(&r, b, m);
    const int64_t len = WIDE_PROMPT + WIDE_STEPS, V = m->cfg.vocab;
    rlb_block_table tab[WIDE];
    rlb_fwd_span sp[WIDE];
    memset(tab, 0, sizeof tab);
    for (int i = 0; i < WIDE; i++) {
        assert_int_equal(rlb__kv_reserve(&r.kv, &tab[i], len), 0);
        sp[i] = (rlb_fwd_span){.tokens = tok + i * len, .n = WIDE_PROMPT, .pos0 = 0,
                               .blocks = &tab[i], .logits = RLB_FWD_LOGITS_NONE};
    }
    assert_int_equal(rlb__forward_run(&r.f, &r.kv, sp, WIDE, NULL), 0);
    for (int d = 0; d < WIDE_STEPS; d++) {
        for (int i = 0; i < WIDE; i++)
            sp[i] = (rlb_fwd_span){.tokens = tok + i * len + WIDE_PROMPT + d, .n = 1,
                                   .pos0 = WIDE_PROMPT + d, .blocks = &tab[i],
                                   .logits = RLB_FWD_LOGITS_LAST};
        assert_int_equal(rlb__forward_run(&r.f, &r.kv, sp, WIDE, logits + d * WIDE * V), 0);
    }
    for (int i = 0; i < WIDE; i++) {
        rlb__kv_release(&r.kv, &tab[i]);
        rlb__kv_table_free(&tab[i]);
    }
    runner_free(&r);
}

static void test_wide_decode(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 14;
    model m;
    make_model(&m, &s, 64, 2, 0, 1);
    const int64_t V = m.cfg.vocab, len = WIDE_PROMPT + WIDE_STEPS, n = WIDE_STEPS * WIDE * V;
    int32_t tok[WIDE * (WIDE_PROMPT + WIDE_STEPS)];
    for (int64_t i = 0; i < WIDE * len; i++)
        tok[i] = (int32_t)gc_rnd(&s, 0, V - 1);
    rlb_tp_comm *comm;
    assert_int_equal(rlb__tp_comm_local(&comm), 0);
    float *ref = malloc((size_t)n * 4), *got = malloc((size_t)n * 4);
    wide_decode(cpu_backend(&m, comm, RLB_QUANT_NONE), &m, tok, ref);
    for (int tune = 0; tune > -2; tune--) {
        rlb_cuda_backend_opts o = RLB_CUDA_BACKEND_OPTS_INIT;
        o.max_batch_tokens = WIDE * WIDE_PROMPT;
        o.max_seqs = 16;
        o.gemm_tune = tune;
        rlb_ebackend *b = NULL;
        assert_int_equal(rlb__ebackend_cuda_create(&m.l32, m.w32, &o, &b), 0);
        wide_decode(b, &m, tok, got);
        double worst = 0;
        for (int64_t r = 0; r < WIDE_STEPS * WIDE; r++) {
            const double e = rel_err(got + r * V, ref + r * V, V);
            worst = e > worst ? e : worst;
        }
        printf("decode of %d rows, GEMM algorithms %s: rel err %.3g\n", WIDE,
               tune ? "the heuristic's" : "timed", worst);
        assert_true(worst <= 1e-4);
    }
    free(ref);
    free(got);
    rlb__tp_comm_destroy(comm);
    free_model(&m);
}

static void test_sampling_and_sleep(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 12;
    model m;
    make_model(&m, &s, 64, 2, 0, 0);
    const int64_t V = m.cfg.vocab;
    script sc;
    random_script(&sc, &s, V);
    for (int i = 0; i < DECODE_STEPS; i++)
        sc.a[PROMPT_A + i] = sc.b[PROMPT_B + i] = (int32_t)gc_rnd(&s, 0, V - 1);
    runner r;
    rlb_ebackend *b = cuda_backend(&m.l32, m.w32, RLB_QUANT_NONE, 1);
    runner_init(&r, b, &m);
    float *before = malloc((size_t)(SCRIPT_ROWS * V) * 4), *after = malloc((size_t)(SCRIPT_ROWS * V) * 4);
    run_script(&r, &sc, 0, before);

    /* sampling of the last step's two rows (the logits stay on the device) */
    float logits[2 * MAX_V];
    memcpy(logits, before + (SCRIPT_ROWS - 2) * V, (size_t)(2 * V) * 4);
    rlb_sample_ws ws = {0};
    for (int t = 0; t < 64; t++) {
        rlb_sample_job jobs[2];
        for (int j = 0; j < 2; j++)
            jobs[j] = (rlb_sample_job){
                .row = j,
                .sp = {.temperature = t % 4 == 0 ? 0.0f : frand(&s, 0.2f, 2.0f),
                       .top_k = t % 3 == 1 ? (int32_t)gc_rnd(&s, 1, 50) : 0,
                       .top_p = t % 5 == 2 ? frand(&s, 0.1f, 0.99f) : 1.0f,
                       .seed = gc_rng(&s)},
                .sample = (uint64_t)t, .pos = gc_rnd(&s, 0, 900)};
        int32_t tok[2];
        float lp[2];
        assert_int_equal(b->iface->sample(b, jobs, 2, tok, lp), 0);
        for (int j = 0; j < 2; j++) {
            int32_t rt;
            float rlp;
            assert_int_equal(rlb__sample_token(logits + j * V, V, &jobs[j].sp, jobs[j].sample,
                                               jobs[j].pos, &ws, &rt, &rlp), 0);
            assert_int_equal(tok[j], rt);
            assert_true(fabsf(lp[j] - rlp) <= 1e-5f * fmaxf(1.0f, fabsf(rlp)));
        }
    }
    rlb__sample_ws_free(&ws);

    /* weights sleep / wake (the bound host copy restores them), KV sleep / wake */
    assert_int_equal(b->iface->weights_sleep(b), 0);
    assert_int_equal(b->iface->weights_wake(b), 0);
    size_t free0, free1, free2, total;
    assert_int_equal(cudaMemGetInfo(&free0, &total), cudaSuccess);
    assert_int_equal(rlb__kv_sleep(&r.kv), 0);
    assert_int_equal(cudaMemGetInfo(&free1, &total), cudaSuccess);
    const uint64_t kv_bytes = (uint64_t)r.kv.n_blocks * rlb__kv_bytes_per_block(&r.kv);
    printf("KV sleep gave back %.1f MiB of %.1f MiB\n", (double)(free1 - free0) / (1 << 20),
           (double)kv_bytes / (1 << 20));
    assert_true((double)(free1 - free0) >= 0.95 * (double)kv_bytes);
    assert_int_equal(rlb__kv_wake(&r.kv), 0);
    assert_int_equal(cudaMemGetInfo(&free2, &total), cudaSuccess);
    assert_true(free2 < free1);
    run_script(&r, &sc, 0, after);
    assert_memory_equal(after, before, (size_t)(SCRIPT_ROWS * V) * 4);
    runner_free(&r);
    free(before);
    free(after);
    free_model(&m);
}

static void test_quantized_and_bf16(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 13;
    rlb_tp_comm *comm;
    assert_int_equal(rlb__tp_comm_local(&comm), 0);
    model m;
    make_model(&m, &s, 64, 2, 1, 0);
    const int64_t V = m.cfg.vocab;
    script sc;
    random_script(&sc, &s, V);
    float *ref = malloc((size_t)(SCRIPT_ROWS * V) * 4), *got = malloc((size_t)(SCRIPT_ROWS * V) * 4);
    float *ref8 = malloc((size_t)(SCRIPT_ROWS * V) * 4);
    runner rc, r8, rg;
    runner_init(&rc, cpu_backend(&m, comm, RLB_QUANT_NONE), &m);
    run_script(&rc, &sc, 1, ref);
    runner_init(&r8, cpu_backend(&m, comm, RLB_QUANT_INT8), &m);
    run_script(&r8, &sc, 0, ref8);

    runner_init(&rg, cuda_backend(&m.l32, m.w32, RLB_QUANT_INT8, 1), &m);
    run_script(&rg, &sc, 0, got);
    double e = script_err(got, ref8, V);
    printf("int8 against the CPU's int8: rel err %.3g\n", e);
    assert_true(e <= 1e-4);
    assert_int_equal(rlb__forward_postload(&rg.f), 0); /* twice = once */
    float *again = malloc((size_t)(SCRIPT_ROWS * V) * 4);
    run_script(&rg, &sc, 0, again);
    assert_memory_equal(again, got, (size_t)(SCRIPT_ROWS * V) * 4);
    runner_free(&rg);

    static const rlb_quant fp8[2] = {RLB_QUANT_FP8, RLB_QUANT_FP8_CHANNEL};
    for (int i = 0; i < 2; i++) {
        runner_init(&rg, cuda_backend(&m.l32, m.w32, fp8[i], 1), &m);
        run_script(&rg, &sc, 0, got);
        e = script_err(got, ref, V);
        printf("%s against fp32: rel err %.3g\n", rlb__quant_name(fp8[i]), e);
        assert_true(e <= 0.15);
        runner_free(&rg);
    }
    rlb_tp_layout l16;
    void *w16 = convert_weights(&m, RLB_DTYPE_BF16, &l16);
    runner_init(&rg, cuda_backend(&l16, w16, RLB_QUANT_NONE, 1), &m);
    run_script(&rg, &sc, 0, got);
    e = script_err(got, ref, V);
    printf("bf16 against fp32: rel err %.3g\n", e);
    assert_true(e <= 0.05);
    runner_free(&rg);
    rlb__tp_layout_free(&l16);
    free(w16);
    runner_free(&rc);
    runner_free(&r8);
    free(ref);
    free(ref8);
    free(got);
    free(again);
    free_model(&m);
    rlb__tp_comm_destroy(comm);
}

/* Whole model on one HF fixture, fp32 weights on the GPU, through the engine. */
static void hf_fixture(const char *name)
{
    fixture fx;
    assert_int_equal(fx_load(name, &fx), 0);
    rlb_loaded m;
    char err[256];
    assert_int_equal(rlb__load_checkpoint(fx.dir, 1, 0, &m, err, sizeof err), 0);
    rlb_engine_opts o = RLB_ENGINE_OPTS_INIT;
    o.kv_bytes = 4u << 20;
    o.block_tokens = 4;
    o.max_batch_tokens = 64; /* the backend's step maximum (cuda_backend) */
    o.max_seqs = 8;
    rlb_engine *e;
    assert_int_equal(rlb__engine_create_on(cuda_backend(&m.layout, m.weights, RLB_QUANT_NONE, 1),
                                           &o, &e),
                     0);
    const int64_t V = fx.vocab;
    for (int i = 0; i < fx.n_prompts; i++) {
        const fx_prompt *p = &fx.prompts[i];
        rlb_gen_request q = {.id = (uint64_t)i, .prompt = p->ids, .prompt_len = p->n_ids,
                             .n = 1, .max_tokens = (int32_t)p->n_greedy,
                             .sampling = {.temperature = 0.0f, .top_p = 1.0f}, .logprobs = 1};
        assert_int_equal(rlb__engine_add(e, &q), 0);
    }
    assert_int_equal(engine_run_all(e), 0);
    rlb_gen_result *r;
    int seen = 0;
    while (rlb__engine_pop(e, &r) == 0) {
        const fx_prompt *p = &fx.prompts[r->id];
        assert_int_equal(r->samples[0].n_tokens, p->n_greedy);
        assert_memory_equal(r->samples[0].tokens, p->greedy, (size_t)p->n_greedy * 4);
        rlb__gen_result_free(r);
        seen++;
    }
    assert_int_equal(seen, fx.n_prompts);
    /* logits of prompt + greedy in one chunk and then row by row, against HF's */
    rlb_forward *f = rlb__engine_forward(e);
    rlb_kvcache kv;
    rlb_ebackend *b = f->b;
    rlb_kv_mem mem = b->iface->kv_mem(b);
    assert_int_equal(rlb__kv_init_mem(&kv, m.layout.cfg.n_layers, m.layout.kvt,
                                      m.layout.cfg.head_dim, 4, 1u << 20, &mem),
                     0);
    for (int i = 0; i < fx.n_prompts; i++) {
        const fx_prompt *p = &fx.prompts[i];
        int32_t seq[2 * FX_MAX_IDS];
        memcpy(seq, p->ids, (size_t)p->n_ids * 4);
        memcpy(seq + p->n_ids, p->greedy, (size_t)p->n_greedy * 4);
        const int64_t n = p->logits_rows;
        float *lg = malloc((size_t)(n * V) * 4);
        rlb_block_table t = {0};
        assert_int_equal(rlb__kv_reserve(&kv, &t, n), 0);
        int64_t cut = p->n_ids;
        rlb_fwd_span a = {.tokens = seq, .n = cut, .pos0 = 0, .blocks = &t,
                          .logits = RLB_FWD_LOGITS_ALL};
        assert_int_equal(rlb__forward_run(f, &kv, &a, 1, lg), 0);
        for (int64_t r2 = cut; r2 < n; r2++) {
            rlb_fwd_span d = {.tokens = seq + r2, .n = 1, .pos0 = r2, .blocks = &t,
                              .logits = RLB_FWD_LOGITS_LAST};
            assert_int_equal(rlb__forward_run(f, &kv, &d, 1, lg + r2 * V), 0);
        }
        double worst = 0;
        for (int64_t r2 = 0; r2 < n; r2++) {
            double er = rel_err(lg + r2 * V, p->logits + r2 * V, V);
            worst = er > worst ? er : worst;
        }
        printf("%s prompt %d: logits rel err %.3g over %lld rows\n", name, i, worst, (long long)n);
        assert_true(worst <= 1e-4);
        rlb__kv_release(&kv, &t);
        rlb__kv_table_free(&t);
        free(lg);
    }
    rlb__kv_free(&kv);
    rlb__engine_destroy(e);
    rlb__loaded_free(&m);
    fx_free(&fx);
}

static void test_hf_fixtures(void **state)
{
    (void)state;
    hf_fixture("llama_gqa");
    hf_fixture("qwen2_tied");
}

/* Whole model on one HF fixture in bf16 against HF's own bf16 run on a GPU
 * (make_bf16_fixtures.py): HF's first bf16 greedy tokens identical, and every logit of the
 * prompt + fp32-greedy rows within 3x the yardstick (the largest distance bf16 moves HF
 * itself from its fp32 logits): the two bf16 computations round in different places (HF
 * rounds every activation to bf16; the engine keeps the residual stream and accumulations
 * in fp32), so neither is exact, and the bound says they differ by no more than bf16
 * rounding does. Returns 0, or 1 when the fixture has no bf16 reference yet. */
static int hf_fixture_bf16(const char *name)
{
    fixture fx;
    assert_int_equal(fx_load(name, &fx), 0);
    fx_bf16 hb;
    int have = fx_load_bf16(&fx, &hb);
    assert_true(have >= 0);
    if (have == 1) {
        fx_free(&fx);
        return 1;
    }
    rlb_loaded m;
    char err[256];
    assert_int_equal(rlb__load_checkpoint(fx.dir, 1, 0, &m, err, sizeof err), 0);
    rlb_tp_layout l16;
    void *w16 = to_half(&m.layout, m.weights, RLB_DTYPE_BF16, &l16);
    rlb_engine_opts o = RLB_ENGINE_OPTS_INIT;
    o.kv_bytes = 4u << 20;
    o.block_tokens = 4;
    o.max_batch_tokens = 64;
    o.max_seqs = 8;
    rlb_engine *e;
    assert_int_equal(rlb__engine_create_on(cuda_backend(&l16, w16, RLB_QUANT_NONE, 1), &o, &e),
                     0);
    for (int i = 0; i < fx.n_prompts; i++) {
        const fx_prompt *p = &fx.prompts[i];
        rlb_gen_request q = {.id = (uint64_t)i, .prompt = p->ids, .prompt_len = p->n_ids,
                             .n = 1, .max_tokens = (int32_t)hb.n_greedy[i],
                             .sampling = {.temperature = 0.0f, .top_p = 1.0f}};
        assert_int_equal(rlb__engine_add(e, &q), 0);
    }
    assert_int_equal(engine_run_all(e), 0);
    rlb_gen_result *r;
    int seen = 0;
    while (rlb__engine_pop(e, &r) == 0) {
        const int i = (int)r->id;
        if (r->samples[0].n_tokens != hb.n_greedy[i] ||
            memcmp(r->samples[0].tokens, hb.greedy[i], (size_t)hb.n_greedy[i] * 4)) {
            fprintf(stderr, "%s bf16 prompt %d: greedy tokens differ from HF's bf16:", name, i);
            for (int64_t t = 0; t < r->samples[0].n_tokens; t++)
                fprintf(stderr, " %d/%d", r->samples[0].tokens[t], hb.greedy[i][t]);
            fprintf(stderr, "\n");
        }
        assert_int_equal(r->samples[0].n_tokens, hb.n_greedy[i]);
        assert_memory_equal(r->samples[0].tokens, hb.greedy[i], (size_t)hb.n_greedy[i] * 4);
        rlb__gen_result_free(r);
        seen++;
    }
    assert_int_equal(seen, fx.n_prompts);
    rlb_forward *f = rlb__engine_forward(e);
    rlb_kvcache kv;
    rlb_kv_mem mem = f->b->iface->kv_mem(f->b);
    assert_int_equal(rlb__kv_init_mem(&kv, m.layout.cfg.n_layers, m.layout.kvt,
                                      m.layout.cfg.head_dim, 4, 1u << 20, &mem),
                     0);
    const int64_t V = fx.vocab;
    for (int i = 0; i < fx.n_prompts; i++) {
        const fx_prompt *p = &fx.prompts[i];
        int32_t seq[2 * FX_MAX_IDS];
        memcpy(seq, p->ids, (size_t)p->n_ids * 4);
        memcpy(seq + p->n_ids, p->greedy, (size_t)p->n_greedy * 4);
        const int64_t n = p->logits_rows;
        float *lg = malloc((size_t)(n * V) * 4);
        rlb_block_table t = {0};
        assert_int_equal(rlb__kv_reserve(&kv, &t, n), 0);
        rlb_fwd_span a = {.tokens = seq, .n = n, .pos0 = 0, .blocks = &t,
                          .logits = RLB_FWD_LOGITS_ALL};
        assert_int_equal(rlb__forward_run(f, &kv, &a, 1, lg), 0);
        double worst = 0, vs32 = 0;
        for (int64_t j = 0; j < n * V; j++) {
            double d = fabs((double)lg[j] - hb.logits[i][j]);
            double d32 = fabs((double)lg[j] - p->logits[j]);
            worst = d > worst || isnan(d) ? d : worst;
            vs32 = d32 > vs32 ? d32 : vs32;
        }
        printf("%s bf16 prompt %d: max |engine - HF bf16| %.4g, |engine - HF fp32| %.4g, "
               "yardstick %.4g\n", name, i, worst, vs32, hb.yardstick);
        assert_true(worst <= 3.0 * hb.yardstick);
        rlb__kv_release(&kv, &t);
        rlb__kv_table_free(&t);
        free(lg);
    }
    rlb__kv_free(&kv);
    rlb__engine_destroy(e);
    rlb__tp_layout_free(&l16);
    free(w16);
    rlb__loaded_free(&m);
    free(hb.all_logits);
    fx_free(&fx);
    return 0;
}

static void test_hf_bf16(void **state)
{
    (void)state;
    int missing = hf_fixture_bf16("llama_gqa") + hf_fixture_bf16("qwen2_tied");
    if (missing)
        printf("test_hf_bf16: %d fixture(s) have no reference_bf16.json yet (made on a GPU "
               "machine by tests/fixtures/make_bf16_fixtures.py); not compared\n", missing);
}

/* Batch-invariant mode: sequence S (a 13-token prompt, then 4 decode steps) alone, then
 * in steps with 2 and with 16 other sequences of mixed lengths (prompts of 1..40 tokens,
 * later chunks of 1..3 tokens), placed before and after it: S's logits rows are bitwise the
 * same every time. bf16 weights, graphs on (the alone decode steps replay a graph). */
#define INV_PROMPT 13
#define INV_DECODE 4
#define INV_MAX_SEQS 17

static void run_invariant(rlb_ebackend *b, const model *m, int others, uint64_t *s,
                          const int32_t *seq, float *out)
{
    const int64_t V = m->cfg.vocab;
    rlb_forward f;
    rlb_kvcache kv;
    rlb_block_table tab[INV_MAX_SEQS];
    int32_t toks[INV_MAX_SEQS][64];
    int64_t done[INV_MAX_SEQS];
    memset(tab, 0, sizeof tab);
    rlb_kv_mem mem = b->iface->kv_mem(b);
    assert_int_equal(rlb__forward_init_on(&f, b), 0);
    uint64_t per_block = 2ull * (uint64_t)(m->cfg.n_layers * m->l32.kvt * BLOCK_TOKENS *
                                           m->cfg.head_dim) * mem.elem_bytes;
    assert_int_equal(rlb__kv_init_mem(&kv, m->cfg.n_layers, m->l32.kvt, m->cfg.head_dim,
                                      BLOCK_TOKENS, INV_MAX_SEQS * 4 * per_block, &mem),
                     0);
    const int me = others / 2; /* S's place among the spans */
    for (int q = 0; q <= others; q++) {
        for (int i = 0; i < 64; i++)
            toks[q][i] = q == me ? (i < INV_PROMPT + INV_DECODE ? seq[i] : 0)
                                 : (int32_t)gc_rnd(s, 0, V - 1);
        done[q] = 0;
        assert_int_equal(rlb__kv_reserve(&kv, &tab[q], 64), 0);
    }
    float *logits = malloc((size_t)(64 * INV_MAX_SEQS) * (size_t)V * 4);
    float *o = out;
    for (int step = 0; step <= INV_DECODE; step++) {
        rlb_fwd_span sp[INV_MAX_SEQS];
        int64_t before = 0; /* logits rows of the spans before S's */
        for (int q = 0; q <= others; q++) {
            int64_t n = q == me ? (step == 0 ? INV_PROMPT : 1)
                                : (step == 0 ? gc_rnd(s, 1, 40) : gc_rnd(s, 1, 3));
            int all = q == me && step == 0;
            sp[q] = (rlb_fwd_span){.tokens = toks[q] + done[q], .n = n, .pos0 = done[q],
                                   .blocks = &tab[q],
                                   .logits = all ? RLB_FWD_LOGITS_ALL : RLB_FWD_LOGITS_LAST};
            if (q < me)
                before += 1;
            done[q] += n;
        }
        assert_int_equal(rlb__forward_run(&f, &kv, sp, others + 1, logits), 0);
        const int64_t mine = step == 0 ? INV_PROMPT : 1;
        memcpy(o, logits + before * V, (size_t)(mine * V) * 4);
        o += mine * V;
    }
    free(logits);
    for (int q = 0; q <= others; q++) {
        rlb__kv_release(&kv, &tab[q]);
        rlb__kv_table_free(&tab[q]);
    }
    rlb__kv_free(&kv);
    f.b = NULL; /* the caller's backend serves the next run: the pass must not destroy it */
    rlb__forward_free(&f);
}

static void test_batch_invariant(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 0x1b;
    model m;
    make_model(&m, &s, 64, 2, 0, 1);
    rlb_tp_layout l16;
    void *w16 = convert_weights(&m, RLB_DTYPE_BF16, &l16);
    rlb_cuda_backend_opts o = RLB_CUDA_BACKEND_OPTS_INIT;
    o.batch_invariant = 1;
    o.max_batch_tokens = 1024;
    o.max_seqs = INV_MAX_SEQS;
    o.max_logit_rows = INV_MAX_SEQS + INV_PROMPT;
    rlb_ebackend *b = NULL;
    assert_int_equal(rlb__ebackend_cuda_create(&l16, w16, &o, &b), 0);
    const int64_t V = m.cfg.vocab, rows = INV_PROMPT + INV_DECODE;
    int32_t seq[INV_PROMPT + INV_DECODE];
    for (int i = 0; i < INV_PROMPT + INV_DECODE; i++)
        seq[i] = (int32_t)gc_rnd(&s, 0, V - 1);
    float *alone = malloc((size_t)(rows * V) * 4), *mixed = malloc((size_t)(rows * V) * 4);
    run_invariant(b, &m, 0, &s, seq, alone);
    static const int others[2] = {2, 16};
    for (int t = 0; t < 2; t++) {
        run_invariant(b, &m, others[t], &s, seq, mixed);
        for (int64_t r = 0; r < rows; r++)
            if (memcmp(alone + r * V, mixed + r * V, (size_t)V * 4)) {
                fprintf(stderr, "batch-invariant: row %lld of the sequence differs with %d "
                        "others (relative error %.3g), seed %llu\n", (long long)r, others[t],
                        rel_err(mixed + r * V, alone + r * V, V),
                        (unsigned long long)g_seed);
                fail();
            }
    }
    free(alone);
    free(mixed);
    b->iface->destroy(b);
    free(w16);
    rlb__tp_layout_free(&l16);
    free_model(&m);
}

int main(void)
{
    if (!gc_have_gpu()) {
        fprintf(stderr, "test_cuda_backend: no GPU visible, skipping\n");
        return GC_SKIP;
    }
    const char *env = getenv("RLB_TEST_SEED");
    g_seed = env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL);
    printf("test_cuda_backend: seed %llu (RLB_TEST_SEED repeats it)\n",
           (unsigned long long)g_seed);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp32_against_cpu),
        cmocka_unit_test(test_sampling_and_sleep),
        cmocka_unit_test(test_quantized_and_bf16),
        cmocka_unit_test(test_hf_fixtures),
        cmocka_unit_test(test_hf_bf16),
        cmocka_unit_test(test_batch_invariant),
        cmocka_unit_test(test_wide_decode),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
