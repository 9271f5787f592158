/* bench_engine: rlb-bench-engine, the CPU engine's decode and prefill speed on a ~50M
 * parameter Llama (D 512, I 1536, H 8, KV 4, hd 64, 10 layers, V 32000, tied embeddings:
 * 47.9M parameters) with random weights placed through the TP layout, TP 1.
 *
 *   decode_bB_tok_s     B sequences (16-token prompts, prefilled first) decoding together:
 *                       tokens per second over DECODE_STEPS steps after WARM_STEPS
 *   weight GB/s         the float32 (or int8 + scales) matrix bytes one decode step must
 *                       read (qkv, o, gate_up, down, LM head) times steps per second
 *   memcpy_gbs          the peer: bytes per second one memcpy of a 256 MiB buffer copies,
 *                       best of 5, in the same run
 *   decode_b1_fraction_of_memcpy_bw   batch-1 weight GB/s over memcpy_gbs (target >= 0.5)
 *   prefill_tok_s       one 512-token prompt, one step
 *   int8_vs_fp32_speedup   batch-1 decode tokens/s with quant int8 over fp32
 *   sample_ms           one rlb__sample_token at temperature 1 over a 128256-token row
 *                       of random logits, against its peer in the same run: the race of
 *                       sample.h with the log of every token (sample_naive_ms); both must
 *                       draw the same tokens
 * OpenBLAS threads follow the RLB_THREADS knob (0 = every core). Prints a table, then one
 * JSON line. `--device cuda` runs bench_engine_cuda.c's GPU benchmark instead.
 * Build: cmake --build BUILD --target rlb-bench-engine; run BUILD/bench/...
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/env.h"
#include "kernels/cpu/noise.h"
#include "kernels/cpu/sample.h"
#include "rlb/rlb.h"
#include "worker/engine.h"

#define PROMPT 16
#define WARM_STEPS 2
#define DECODE_STEPS 16
#define PREFILL 512
#define MEMCPY_BYTES (256u << 20)

static void die(const char *what, int rc)
{
    fprintf(stderr, "rlb-bench-engine: %s: %s\n", what, rlb_strerror(rc));
    exit(1);
}

static void bench_config(rlb_model_config *c)
{
    rlb__config_tiny(c);
    c->hidden = 512;
    c->intermediate = 1536;
    c->n_heads = 8;
    c->n_kv_heads = 4;
    c->head_dim = 64;
    c->n_layers = 10;
    c->vocab = 32000;
    c->max_pos = 2048;
    c->tie_embeddings = 1;
}

/* Random weights: matrices uniform in +-1/sqrt(cols), norm weights 1. */
static void fill_weights(const rlb_tp_layout *l, float *w)
{
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int64_t i = 0; i < l->n_tensors; i++) {
        const rlb_local_tensor *t = &l->tensors[i];
        float *p = w + t->offset / sizeof(float);
        int64_t n = t->rows * t->cols;
        int norm = t->kind == RLB_W_FINAL_NORM || t->kind == RLB_W_ATTN_NORM ||
                   t->kind == RLB_W_MLP_NORM;
        float amp = 2.0f / sqrtf((float)t->cols);
        for (int64_t j = 0; j < n; j++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            p[j] = norm ? 1.0f : amp * ((float)(x >> 40) / 16777216.0f - 0.5f);
        }
    }
}

/* Bytes of matrix weights one forward step reads, float32 or int8 + row scales. */
static double step_weight_bytes(const rlb_tp_layout *l, rlb_quant quant)
{
    double bytes = 0.0;
    for (int64_t i = 0; i < l->n_tensors; i++) {
        const rlb_local_tensor *t = &l->tensors[i];
        int matrix = t->kind == RLB_W_QKV || t->kind == RLB_W_O || t->kind == RLB_W_GATE_UP ||
                     t->kind == RLB_W_DOWN || t->kind == RLB_W_LM_HEAD ||
                     (t->kind == RLB_W_EMBED && l->cfg.tie_embeddings);
        if (matrix)
            bytes += quant == RLB_QUANT_INT8 ? (double)(t->rows * t->cols) + 4.0 * t->rows
                                             : (double)t->bytes;
    }
    return bytes;
}

static double memcpy_gbs(void)
{
    char *a = malloc(MEMCPY_BYTES), *b = malloc(MEMCPY_BYTES);
    if (!a || !b)
        die("memcpy buffers", RLB_ENOMEM);
    memset(a, 1, MEMCPY_BYTES);
    memset(b, 2, MEMCPY_BYTES);
    double best = 1e30;
    for (int r = 0; r < 5; r++) {
        double t0 = rlb__clock_s();
        memcpy(b, a, MEMCPY_BYTES);
        double t = rlb__clock_s() - t0;
        best = t < best ? t : best;
        a[r] = b[MEMCPY_BYTES - 1 - r]; /* keeps the copies observable */
    }
    free(a);
    free(b);
    return MEMCPY_BYTES / best / 1e9;
}

typedef struct run_stats {
    double tok_s;   /* tokens per second */
    double step_ms; /* milliseconds per step */
} run_stats;

static rlb_engine *make_engine(const rlb_tp_layout *l, const float *w, rlb_tp_comm *comm,
                               rlb_quant quant)
{
    rlb_engine_opts o = RLB_ENGINE_OPTS_INIT;
    o.kv_bytes = 256u << 20;
    o.max_batch_tokens = PREFILL;
    o.quant = quant;
    rlb_engine *e;
    int rc = rlb__engine_create(l, w, comm, &o, &e);
    if (rc)
        die("engine", rc);
    return e;
}

/* B sequences decode together; only steps after prefill and warm-up are timed. */
static run_stats decode(rlb_engine *e, int B)
{
    int32_t prompt[PROMPT];
    for (int i = 0; i < B; i++) {
        for (int k = 0; k < PROMPT; k++)
            prompt[k] = (i * 131 + k * 17) % 32000;
        rlb_gen_request q = {.id = (uint64_t)i, .prompt = prompt, .prompt_len = PROMPT,
                             .n = 1, .max_tokens = 1 + WARM_STEPS + DECODE_STEPS,
                             .sampling = {.temperature = 0.0f, .top_p = 1.0f}};
        int rc = rlb__engine_add(e, &q);
        if (rc)
            die("add", rc);
    }
    int rc = rlb__engine_step(e); /* prefill: every prompt fits one step */
    for (int s = 0; s < WARM_STEPS && rc >= 0; s++)
        rc = rlb__engine_step(e);
    double t0 = rlb__clock_s();
    for (int s = 0; s < DECODE_STEPS && rc >= 0; s++)
        rc = rlb__engine_step(e);
    double t = rlb__clock_s() - t0;
    if (rc < 0)
        die("step", rc);
    rlb_gen_result *r;
    while (rlb__engine_pop(e, &r) == 0)
        rlb__gen_result_free(r);
    return (run_stats){B * DECODE_STEPS / t, t / DECODE_STEPS * 1e3};
}

static run_stats prefill(rlb_engine *e)
{
    int32_t prompt[PREFILL];
    for (int k = 0; k < PREFILL; k++)
        prompt[k] = (k * 7919) % 32000;
    rlb_gen_request q = {.id = 999, .prompt = prompt, .prompt_len = PREFILL, .n = 1,
                         .max_tokens = 1, .sampling = {.temperature = 0.0f, .top_p = 1.0f}};
    int rc = rlb__engine_add(e, &q);
    if (rc)
        die("add", rc);
    double t0 = rlb__clock_s();
    rc = rlb__engine_step(e);
    double t = rlb__clock_s() - t0;
    if (rc < 0)
        die("prefill", rc);
    rlb_gen_result *r;
    while (rlb__engine_pop(e, &r) == 0)
        rlb__gen_result_free(r);
    return (run_stats){PREFILL / t, t * 1e3};
}

/* The peer of the sampler: p = expf(z - max z), then the first largest p / -log(u) with
 * every token's log taken. */
static int32_t naive_race(const float *x, int64_t V, uint64_t seed, int64_t pos, float *p)
{
    float zmax = -INFINITY;
    for (int64_t i = 0; i < V; i++)
        zmax = x[i] > zmax ? x[i] : zmax;
    for (int64_t i = 0; i < V; i++)
        p[i] = expf(x[i] - zmax);
    const uint64_t prefix = rlb__noise_prefix(seed, 0, pos);
    double best = -1.0;
    int32_t tok = 0;
    for (int64_t i = 0; i < V; i++) {
        const double score = (double)p[i] / -log(rlb__bits_to_uniform(rlb__noise_token(prefix, i)));
        if (score > best) {
            best = score;
            tok = (int32_t)i;
        }
    }
    return tok;
}

/* ms per draw of rlb__sample_token (*ours) and of naive_race (*peer) on one row. */
static void bench_sample(double *ours, double *peer)
{
    enum { V = 128256, DRAWS = 100 };
    float *x = malloc(V * sizeof *x), *p = malloc(V * sizeof *p);
    if (!x || !p)
        die("sample", RLB_ENOMEM);
    uint64_t s = 12345;
    for (int64_t i = 0; i < V; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(s >> 11) * 0x1.0p-53 * 8.0 - 4.0);
    }
    rlb_sample_ws ws = {0};
    const rlb_sampling sp = {.temperature = 1.0f, .top_p = 1.0f, .seed = 7};
    int32_t toks[DRAWS];
    double t0 = rlb__clock_s();
    for (int d = 0; d < DRAWS; d++) {
        float lp;
        int rc = rlb__sample_token(x, V, &sp, 0, d, &ws, &toks[d], &lp);
        if (rc)
            die("sample", rc);
    }
    double t1 = rlb__clock_s();
    for (int d = 0; d < DRAWS; d++)
        if (naive_race(x, V, sp.seed, d, p) != toks[d])
            die("sample: the sampler and the naive race drew different tokens", RLB_EINVAL);
    double t2 = rlb__clock_s();
    *ours = (t1 - t0) * 1e3 / DRAWS;
    *peer = (t2 - t1) * 1e3 / DRAWS;
    rlb__sample_ws_free(&ws);
    free(x);
    free(p);
}

#ifdef RLB_BENCH_CUDA
int rlb__bench_engine_cuda(int argc, char **argv); /* bench_engine_cuda.c */
#endif

int main(int argc, char **argv)
{
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--device") && !strcmp(argv[i + 1], "cuda")) {
#ifdef RLB_BENCH_CUDA
            return rlb__bench_engine_cuda(argc, argv);
#else
            fprintf(stderr, "rlb-bench-engine: this build has no CUDA\n");
            return 77;
#endif
        }
    rlb_model_config cfg;
    bench_config(&cfg);
    rlb_tp_layout layout;
    int rc = rlb__tp_layout_init(&layout, &cfg, 1, 0, RLB_DTYPE_F32);
    if (rc)
        die("layout", rc);
    float *w;
    if (posix_memalign((void **)&w, 64, layout.total_bytes))
        die("weights", RLB_ENOMEM);
    memset(w, 0, layout.total_bytes);
    fill_weights(&layout, w);
    rlb_tp_comm *comm;
    if ((rc = rlb__tp_comm_local(&comm)))
        die("comm", rc);
    double params = 0.0;
    for (int64_t i = 0; i < layout.n_tensors; i++)
        params += (double)(layout.tensors[i].rows * layout.tensors[i].cols);

    long long threads = rlb__env_int(RLB_KNOB_THREADS);
    if (threads <= 0)
        threads = sysconf(_SC_NPROCESSORS_ONLN);
    double bw = memcpy_gbs();
    double wb32 = step_weight_bytes(&layout, RLB_QUANT_NONE);
    double wb8 = step_weight_bytes(&layout, RLB_QUANT_INT8);
    rlb_engine *e = make_engine(&layout, w, comm, RLB_QUANT_NONE);
    const int batches[3] = {1, 8, 32};
    run_stats dec[3];
    for (int i = 0; i < 3; i++)
        dec[i] = decode(e, batches[i]);
    run_stats pre = prefill(e);
    rlb__engine_destroy(e);
    e = make_engine(&layout, w, comm, RLB_QUANT_INT8);
    run_stats dec8 = decode(e, 1);
    rlb__engine_destroy(e);
    double sample_ms, naive_ms;
    bench_sample(&sample_ms, &naive_ms);

    printf("rlb-bench-engine: %.1fM parameters (padded vocab), %.1f MB fp32 / %.1f MB int8 "
           "matrix bytes per step, %lld BLAS threads\n",
           params / 1e6, wb32 / 1e6, wb8 / 1e6, threads);
    printf("%-22s %12s %10s %14s\n", "case", "tokens/s", "ms/step", "weight GB/s");
    printf("%-22s %12s %10s %14.2f\n", "memcpy (peer)", "-", "-", bw);
    for (int i = 0; i < 3; i++) {
        char name[32];
        snprintf(name, sizeof name, "decode fp32 batch %d", batches[i]);
        printf("%-22s %12.1f %10.2f %14.2f\n", name, dec[i].tok_s, dec[i].step_ms,
               wb32 / (dec[i].step_ms / 1e3) / 1e9);
    }
    printf("%-22s %12.1f %10.2f %14.2f\n", "decode int8 batch 1", dec8.tok_s, dec8.step_ms,
           wb8 / (dec8.step_ms / 1e3) / 1e9);
    printf("%-22s %12.1f %10.2f %14s\n", "prefill fp32 512", pre.tok_s, pre.step_ms, "-");
    double b1_gbs = wb32 / (dec[0].step_ms / 1e3) / 1e9;
    printf("decode_b1_fraction_of_memcpy_bw %.3f (target >= 0.5), int8_vs_fp32_speedup %.2f\n",
           b1_gbs / bw, dec8.tok_s / dec[0].tok_s);
    printf("sample 128256 tokens: %.3f ms per draw, the naive race %.3f ms (%.2fx)\n",
           sample_ms, naive_ms, naive_ms / sample_ms);
    printf("{\"bench\":\"engine\",\"params_m\":%.1f,\"threads\":%lld,\"memcpy_gbs\":%.2f,"
           "\"decode_b1_tok_s\":%.1f,\"decode_b8_tok_s\":%.1f,\"decode_b32_tok_s\":%.1f,"
           "\"prefill_tok_s\":%.1f,\"decode_b1_weight_gbs\":%.2f,"
           "\"decode_b1_fraction_of_memcpy_bw\":%.3f,\"int8_decode_b1_tok_s\":%.1f,"
           "\"int8_vs_fp32_speedup\":%.2f,\"sample_ms\":%.3f,\"sample_naive_ms\":%.3f}\n",
           params / 1e6, threads, bw, dec[0].tok_s, dec[1].tok_s, dec[2].tok_s, pre.tok_s,
           b1_gbs, b1_gbs / bw, dec8.tok_s, dec8.tok_s / dec[0].tok_s, sample_ms, naive_ms);
    rlb__tp_comm_destroy(comm);
    rlb__tp_layout_free(&layout);
    free(w);
    return 0;
}
