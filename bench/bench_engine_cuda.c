/* bench_engine_cuda: `rlb-bench-engine --device cuda`, the CUDA engine backend's decode and
 * prefill speed on random-weight models of Llama-3.2-1B and Llama-3.1-8B shape, bf16, TP 1,
 * driven through the forward pass (worker/forward.h) with greedy sampling on the GPU:
 *
 *   decode_bB_tok_s       B sequences (PROMPT-token prompts, prefilled first) decoding NEW
 *                         tokens together: tokens per second over the steps after the first
 *                         (which captures the decode graph)
 *   copy_gbs              device-to-device copy of 2 GiB, bytes read + written per second,
 *                         best of 10 (hf_generate_baseline.py's measure), in the same run
 *   decode_b1_fraction_of_floor   (weight bytes + KV bytes read per step) / copy_gbs over
 *                         the measured batch-1 step time (1.0 = at the bandwidth floor)
 *   decode_b1_graphs_off_tok_s    batch 1 with CUDA graphs off
 *   decode_b1_pdl_off_tok_s       batch 1 without programmatic dependent launch
 *                         (RLB_CUDA_PDL=0, kernels/cuda/pdl.cuh)
 *   decode_b{1,32}_fp8_tok_s      --quant fp8 (weight-only e4m3, per tensor) at batch 1, 32
 *   gemm_tflops           a bf16 cuBLASLt GEMM of 8192^3 (fp32 accumulation), best of 10,
 *                         in the same run
 *   decode_bN_fraction_of_roofline   for the largest batch N: the step time the roofline
 *                         allows, max((weights + KV bytes read) / copy_gbs, FLOPs /
 *                         gemm_tflops), over the measured step time
 *   decode_b1_no_gemv_tok_s       batch 1 with cuBLASLt for every product instead of the
 *                         decode GEMV (kernels/cuda/gemv.h)
 *   decode_bB_attn_classic_tok_s  every batch with the classic attention kernel in decode
 *                         steps instead of the tensor-core decode kernel (--main-only
 *                         prints it too: the before and after of that kernel in one run)
 *   decode_bB_rope_unfused_tok_s  every batch with RoPE and the cache store as a kernel of
 *                         their own instead of inside the attention kernel (the backend
 *                         fuses them only in decode steps of one key split, the large
 *                         batches: elsewhere the two figures measure the same thing)
 *   decode_bN_gemm_untimed_tok_s  the largest batch N with the cuBLASLt heuristic's first
 *                         algorithm for every product (opts.gemm_tune -1), not the fastest
 *                         candidate timed before the bucket's capture
 *   decode_b{1,32}_batch_invariant_tok_s, prefill_batch_invariant_tok_s   the same in
 *                         batch-invariant mode (the first two batches of the list)
 *   prefill_tok_s         32 prompts of PROMPT tokens, 16 per step
 *   speedup_vs_hf_b1, speedup_vs_hf_b32   against HF `generate` on the same shape, from
 *                         --hf-log FILE: the output of ../shared/device/hf_generate_baseline.py
 *                         run just before in the same call (scripts/gpu-check.sh engine)
 * Options: --shape 1b|8b|both (both), --new N (256), --batches list (1,32,256), --main-only
 * (only the default configuration's decode: for a profiler's trace). RLB_BENCH_PROFILE=B:D
 * brackets decode step D of the first run at batch B with cudaProfilerStart/Stop (for
 * `ncu --profile-from-start off`: the kernels of one step, at context PROMPT + D).
 *
 * --gemv instead times the decode GEMV alone on each matrix of the shapes (qkv, o,
 * gate_up, down, LM head) at 1, 2, 4 and 8 rows, plain and with the fusions a decode step
 * uses: weight bytes read per second as a fraction of copy_gbs
 * (gemv_<shape>_<matrix>_<plain|fused>_n<rows>_frac). --gemm-sweep instead times every
 * algorithm cuBLASLt's heuristic offers for each matrix at the largest batch of the list.
 * Prints a table, then one JSON line. Exits 77 where no GPU is visible.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cublasLt.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>

#include "common/cli_args.h"
#include "common/clock.h"
#include "kernels/cuda/gemv.h"
#include "rlb/rlb.h"
#include "worker/backend_cuda.h"
#include "worker/forward.h"
#include "worker/kvcache.h"

#define PROMPT 128
#define BLOCK_TOKENS 16
#define MAX_BATCHES 8
#define FILL_BYTES (64u << 20)

int rlb__bench_engine_cuda(int argc, char **argv);

static void die(const char *what, int rc)
{
    fprintf(stderr, "rlb-bench-engine --device cuda: %s: %s\n", what, rlb_strerror(rc));
    exit(1);
}

static void shape_config(rlb_model_config *c, int big)
{
    rlb__config_tiny(c);
    c->hidden = big ? 4096 : 2048;
    c->intermediate = big ? 14336 : 8192;
    c->n_heads = 32;
    c->n_kv_heads = 8;
    c->head_dim = big ? 128 : 64;
    c->n_layers = big ? 32 : 16;
    c->vocab = 128256;
    c->max_pos = 4096;
    c->rope_theta = 500000.0;
    c->tie_embeddings = !big;
    c->dtype = RLB_DTYPE_BF16;
}

/* Bytes read per step: every matrix, the LM head (the embedding when tied), the norms. */
static uint64_t weight_read_bytes(const rlb_tp_layout *l)
{
    uint64_t n = 0;
    for (int64_t i = 0; i < l->n_tensors; i++)
        if (l->tensors[i].kind != RLB_W_EMBED || l->cfg.tie_embeddings)
            n += l->tensors[i].bytes;
    return n;
}

/* Random bf16 weights in [-0.02, 0.02], copied from one host chunk over the device buffer. */
static void fill_weights(rlb_ebackend *b, uint64_t bytes)
{
    static uint16_t *chunk;
    if (!chunk) {
        chunk = malloc(FILL_BYTES);
        uint64_t s = 0x1234;
        for (uint64_t i = 0; i < FILL_BYTES / 2; i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            float v = ((float)(s >> 40) / (float)(1 << 24) - 0.5f) * 0.04f;
            uint32_t u;
            memcpy(&u, &v, 4);
            chunk[i] = (uint16_t)(u >> 16);
        }
    }
    char *d = rlb__cuda_backend_weights(b, 0);
    for (uint64_t off = 0; off < bytes; off += FILL_BYTES) {
        uint64_t n = bytes - off < FILL_BYTES ? bytes - off : FILL_BYTES;
        if (cudaMemcpy(d + off, chunk, n, cudaMemcpyHostToDevice) != cudaSuccess)
            die("weight fill", RLB_ECUDA);
    }
    int rc = b->iface->postload(b);
    if (rc)
        die("postload", rc);
}

static double copy_gbs(void)
{
    const size_t n = 2ull << 30;
    void *x, *y;
    if (cudaMalloc(&x, n) != cudaSuccess || cudaMalloc(&y, n) != cudaSuccess)
        die("copy buffers", RLB_ENOMEM);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    cudaMemcpy(y, x, n, cudaMemcpyDeviceToDevice);
    double best = 0;
    for (int i = 0; i < 10; i++) {
        float ms;
        cudaEventRecord(e0, 0);
        cudaMemcpy(y, x, n, cudaMemcpyDeviceToDevice);
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        cudaEventElapsedTime(&ms, e0, e1);
        double g = 2.0 * (double)n / (ms * 1e-3) / 1e9;
        best = g > best ? g : best;
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(x);
    cudaFree(y);
    return best;
}

typedef struct bench_run {
    rlb_forward f;
    rlb_kvcache kv;
    rlb_block_table *tabs;
    int32_t *seq;      /* [batch][PROMPT + new] tokens */
    int64_t batch, new_tokens;
} bench_run;

/* Prefills `batch` prompts, at most 16 per step; returns the seconds it took. */
static double prefill(bench_run *r)
{
    const int64_t len = PROMPT + r->new_tokens;
    rlb_fwd_span sp[16];
    rlb_sample_job jobs[16];
    int32_t tok[16];
    double t0 = rlb__clock_s();
    for (int64_t s0 = 0; s0 < r->batch; s0 += 16) {
        int64_t n = r->batch - s0 < 16 ? r->batch - s0 : 16;
        for (int64_t i = 0; i < n; i++) {
            int rc = rlb__kv_reserve(&r->kv, &r->tabs[s0 + i], len);
            if (rc)
                die("kv reserve", rc);
            sp[i] = (rlb_fwd_span){.tokens = r->seq + (s0 + i) * len, .n = PROMPT, .pos0 = 0,
                                   .blocks = &r->tabs[s0 + i], .logits = RLB_FWD_LOGITS_LAST};
            jobs[i] = (rlb_sample_job){.row = i, .sp = {.top_p = 1.0f}, .pos = PROMPT};
        }
        int rc = rlb__forward_step(&r->f, &r->kv, sp, n);
        if (!rc)
            rc = rlb__forward_sample(&r->f, jobs, n, tok, NULL);
        if (rc)
            die("prefill", rc);
        for (int64_t i = 0; i < n; i++)
            r->seq[(s0 + i) * len + PROMPT] = tok[i];
    }
    return rlb__clock_s() - t0;
}

/* Decodes new_tokens - 1 steps; returns tokens per second over the steps after the first. */
static double decode(bench_run *r)
{
    const int64_t len = PROMPT + r->new_tokens, B = r->batch;
    rlb_fwd_span *sp = calloc((size_t)B, sizeof *sp);
    rlb_sample_job *jobs = calloc((size_t)B, sizeof *jobs);
    int32_t *tok = calloc((size_t)B, sizeof *tok);
    double t1 = 0;
    /* RLB_BENCH_PROFILE=B:D: the profiler's range is step D of the first run at batch B */
    static int profiled;
    long pb = 0, pd = -1;
    const char *prof = getenv("RLB_BENCH_PROFILE");
    if (prof && !profiled && sscanf(prof, "%ld:%ld", &pb, &pd) == 2 && pb == B)
        profiled = 1;
    else
        pd = -1;
    for (int64_t d = 0; d + 1 < r->new_tokens; d++) {
        if (d == 1)
            t1 = rlb__clock_s();
        if (d == pd)
            cudaProfilerStart();
        for (int64_t i = 0; i < B; i++) {
            sp[i] = (rlb_fwd_span){.tokens = r->seq + i * len + PROMPT + d, .n = 1,
                                   .pos0 = PROMPT + d, .blocks = &r->tabs[i],
                                   .logits = RLB_FWD_LOGITS_LAST};
            jobs[i] = (rlb_sample_job){.row = i, .sp = {.top_p = 1.0f}, .pos = PROMPT + d + 1};
        }
        int rc = rlb__forward_step(&r->f, &r->kv, sp, B);
        if (!rc)
            rc = rlb__forward_sample(&r->f, jobs, B, tok, NULL);
        if (rc)
            die("decode", rc);
        if (d == pd)
            cudaProfilerStop();
        for (int64_t i = 0; i < B; i++)
            r->seq[i * len + PROMPT + d + 1] = tok[i];
    }
    double dt = rlb__clock_s() - t1;
    free(sp);
    free(jobs);
    free(tok);
    return (double)B * (double)(r->new_tokens - 2) / dt;
}

/* Dense bf16 GEMM rate (fp32 accumulation) of cuBLASLt on an 8192^3 product, TFLOP/s. */
static double gemm_tflops(void)
{
    const int64_t n = 8192;
    void *a, *b, *c, *ws;
    const size_t ws_bytes = 32u << 20;
    if (cudaMalloc(&a, (size_t)(n * n) * 2) != cudaSuccess ||
        cudaMalloc(&b, (size_t)(n * n) * 2) != cudaSuccess ||
        cudaMalloc(&c, (size_t)(n * n) * 2) != cudaSuccess ||
        cudaMalloc(&ws, ws_bytes) != cudaSuccess)
        die("gemm buffers", RLB_ENOMEM);
    cudaMemset(a, 0, (size_t)(n * n) * 2);
    cudaMemset(b, 0, (size_t)(n * n) * 2);
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la;
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    if (cublasLtCreate(&lt) || cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) ||
        cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, (uint64_t)n, (uint64_t)n, n) ||
        cublasLtMatmulPreferenceCreate(&pref) ||
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &ws_bytes, sizeof ws_bytes) ||
        cublasLtMatmulAlgoGetHeuristic(lt, op, la, la, la, la, pref, 1, &heur, &found) ||
        !found)
        die("cuBLASLt GEMM setup", RLB_ECUDA);
    const float one = 1.0f, zero = 0.0f;
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    double best = 0;
    for (int i = 0; i < 11; i++) {
        cudaEventRecord(e0, 0);
        if (cublasLtMatmul(lt, op, &one, a, la, b, la, &zero, c, la, c, la, &heur.algo, ws,
                           ws_bytes, 0))
            die("cuBLASLt GEMM", RLB_ECUDA);
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        double t = 2.0 * (double)n * (double)n * (double)n / (ms * 1e-3) / 1e12;
        best = i > 0 && t > best ? t : best; /* the first call warms up */
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatmulDescDestroy(op);
    cublasLtDestroy(lt);
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
    cudaFree(ws);
    return best;
}

typedef struct shape_result {
    double tok_s[MAX_BATCHES], b1_graphs_off, b1_no_gemv, prefill_tok_s, fraction;
    double b1_pdl_off, fp8_tok_s[2], roofline_fraction, rope_unfused_tok_s[MAX_BATCHES];
    double classic_tok_s[MAX_BATCHES];
    double untimed_tok_s; /* the largest batch, GEMM algorithms not timed */
    double invariant_tok_s[2], invariant_prefill_tok_s; /* batch-invariant mode */
    uint64_t weight_bytes, kv_bytes_b1;
} shape_result;

/* The backend options of a run: graphs, the GEMV, batch invariance, quantization. */
static rlb_cuda_backend_opts run_opts(int graphs, int gemv, int invariant, rlb_quant quant)
{
    rlb_cuda_backend_opts o = RLB_CUDA_BACKEND_OPTS_INIT;
    o.graphs = graphs;
    o.no_gemv = !gemv;
    o.batch_invariant = invariant;
    o.quant = quant;
    return o;
}

/* One backend through the given batches; prefill measured at 32. */
static void run_shape(const rlb_tp_layout *l, rlb_cuda_backend_opts o, const int64_t *batches,
                      int nb, int64_t new_tokens, double *tok_s, double *prefill_tok_s)
{
    o.max_batch_tokens = 16 * PROMPT;
    o.max_seqs = 256;
    rlb_ebackend *b;
    int rc = rlb__ebackend_cuda_create(l, NULL, &o, &b);
    if (rc)
        die("backend", rc);
    fill_weights(b, l->total_bytes);
    bench_run r = {.new_tokens = new_tokens};
    if ((rc = rlb__forward_init_on(&r.f, b)))
        die("forward", rc);
    int64_t max_b = 0;
    for (int i = 0; i < nb; i++)
        max_b = batches[i] > max_b ? batches[i] : max_b;
    max_b = max_b > 32 ? max_b : 32;
    rlb_kv_mem mem = b->iface->kv_mem(b);
    const int64_t len = PROMPT + new_tokens;
    uint64_t per_block = 2ull * (uint64_t)(l->cfg.n_layers * l->kvt * BLOCK_TOKENS *
                                           l->cfg.head_dim) * mem.elem_bytes;
    uint64_t blocks = (uint64_t)(max_b * ((len + BLOCK_TOKENS - 1) / BLOCK_TOKENS));
    if ((rc = rlb__kv_init_mem(&r.kv, l->cfg.n_layers, l->kvt, l->cfg.head_dim, BLOCK_TOKENS,
                               blocks * per_block, &mem)))
        die("kv cache", rc);
    r.tabs = calloc((size_t)max_b, sizeof *r.tabs);
    r.seq = calloc((size_t)(max_b * len), sizeof *r.seq);
    for (int64_t i = 0; i < max_b * len; i++)
        r.seq[i] = (int32_t)((i * 7919) % l->cfg.vocab);
    for (int i = 0; i <= nb; i++) {
        r.batch = i < nb ? batches[i] : 32;
        double pt = prefill(&r);
        if (i < nb)
            tok_s[i] = decode(&r);
        else if (prefill_tok_s)
            *prefill_tok_s = 32.0 * PROMPT / pt;
        for (int64_t s = 0; s < r.batch; s++)
            rlb__kv_release(&r.kv, &r.tabs[s]);
    }
    for (int64_t s = 0; s < max_b; s++)
        rlb__kv_table_free(&r.tabs[s]);
    free(r.tabs);
    free(r.seq);
    rlb__kv_free(&r.kv);
    rlb__forward_free(&r.f);
}

/* The products of a decode step, [m, k] each: qkv, o, gate_up, down, the LM head. */
static const char *const kMatrix[5] = {"qkv", "o", "gate_up", "down", "head"};

static void step_matrices(int big, int64_t mk[5][2])
{
    rlb_model_config c;
    shape_config(&c, big);
    const int64_t hd = c.head_dim, q = (c.n_heads + 2 * c.n_kv_heads) * hd;
    const int64_t v[5][2] = {{q, c.hidden}, {c.hidden, c.n_heads * hd},
                             {2 * c.intermediate, c.hidden}, {c.hidden, c.intermediate},
                             {c.vocab, c.hidden}};
    memcpy(mk, v, sizeof v);
}

/* *copies bf16 copies of a [m, k] weight, at least 1 GiB in all, so a bench cycling through
 * them reads each from memory, not from L2 (a step reads each matrix once). */
static char *cycled_weights(int64_t m, int64_t k, int *copies)
{
    const size_t wbytes = (size_t)(m * k) * 2;
    *copies = (int)ceil(1024.0 * 1024 * 1024 / (double)wbytes);
    char *w;
    if (cudaMalloc((void **)&w, wbytes * (size_t)*copies) != cudaSuccess)
        die("cycled weights", RLB_ENOMEM);
    cudaMemset(w, 0x3c, wbytes * (size_t)*copies);
    return w;
}

/* --gemv: the decode GEMV alone on every matrix of the chosen shapes, plain (x given in
 * bf16) and in the fused form the decode step runs (qkv and the LM head with the rmsnorm of
 * the float32 stream, gate_up with it and writing the swiglu activation, o and down with the
 * residual add). The weights are cycled through copies of at least
 * 1 GiB in all, so no matrix is served from L2 across launches (a step reads each once). */
static int bench_gemv(const int *shapes, double gbs, char *json, size_t cap, int jn)
{
    static const int64_t rows_of[4] = {1, 2, 4, 8};
    cudaStream_t st;
    cudaEvent_t e0, e1;
    if (cudaStreamCreate(&st) != cudaSuccess || cudaEventCreate(&e0) != cudaSuccess ||
        cudaEventCreate(&e1) != cudaSuccess)
        die("stream", RLB_ECUDA);
    for (int big = 0; big < 2; big++) {
        if (!shapes[big])
            continue;
        int64_t mk[5][2];
        step_matrices(big, mk);
        for (int i = 0; i < 5; i++) {
            const int64_t m = mk[i][0], k = mk[i][1];
            const size_t wbytes = (size_t)(m * k) * 2;
            int copies;
            char *w = cycled_weights(m, k, &copies);
            void *x, *nw, *act;
            float *y, *xf, *res;
            if (cudaMalloc(&x, (size_t)(8 * k) * 2) != cudaSuccess ||
                cudaMalloc(&nw, (size_t)k * 2) != cudaSuccess ||
                cudaMalloc((void **)&xf, (size_t)(8 * k) * 4) != cudaSuccess ||
                cudaMalloc(&act, (size_t)(8 * m / 2) * 2) != cudaSuccess ||
                cudaMalloc((void **)&res, (size_t)(8 * m) * 4) != cudaSuccess ||
                cudaMalloc((void **)&y, (size_t)(8 * m) * 4) != cudaSuccess)
                die("gemv buffers", RLB_ENOMEM);
            cudaMemset(x, 0x3c, (size_t)(8 * k) * 2);
            cudaMemset(nw, 0x3c, (size_t)k * 2);
            cudaMemset(xf, 0, (size_t)(8 * k) * 4);
            cudaMemset(res, 0, (size_t)(8 * m) * 4);
            for (int fused = 0; fused < 2; fused++) {
                const rlb_eo_gemv_fuse norm = {.norm_x = xf, .norm_w = nw, .eps = 1e-5f};
                const rlb_eo_gemv_fuse add = {.residual = res};
                const rlb_eo_gemv_fuse gate_up = {
                    .norm_x = xf, .norm_w = nw, .eps = 1e-5f, .swiglu_out = act};
                const rlb_eo_gemv_fuse *f = !fused           ? NULL
                                            : i == 1 || i == 3 ? &add
                                            : i == 2           ? &gate_up
                                                               : &norm;
                for (int r = 0; r < 4; r++) {
                    const int64_t n = rows_of[r];
                    const int reps = copies > 20 ? copies : 20;
                    float ms = 0, best = 1e30f;
                    for (int t = 0; t < 3; t++) {
                        cudaEventRecord(e0, st);
                        for (int j = 0; j < reps; j++)
                            if (rlb__eo_gemv(st, w + (size_t)(j % copies) * wbytes,
                                             RLB_DTYPE_BF16, m, k, x, n, f, y))
                                die("gemv", RLB_ECUDA);
                        cudaEventRecord(e1, st);
                        cudaEventSynchronize(e1);
                        cudaEventElapsedTime(&ms, e0, e1);
                        best = ms < best ? ms : best;
                    }
                    /* the weights are what a step must read: the fraction is theirs */
                    const double sec = best * 1e-3 / reps;
                    const double g = (double)wbytes / sec / 1e9;
                    const char *form = fused ? "fused" : "plain";
                    printf("  gemv %s %-7s %s %6lld x %5lld, %lld rows: %8.1f us %7.0f GB/s  "
                           "%.3f of copy\n", big ? "8b" : "1b", kMatrix[i], form, (long long)m,
                           (long long)k, (long long)n, sec * 1e6, g, g / gbs);
                    jn += snprintf(json + jn, cap - (size_t)jn,
                                   ",\"gemv_%s_%s_%s_n%lld_frac\":%.3f", big ? "8b" : "1b",
                                   kMatrix[i], form, (long long)n, g / gbs);
                }
            }
            cudaFree(w);
            cudaFree(x);
            cudaFree(nw);
            cudaFree(xf);
            cudaFree(act);
            cudaFree(res);
            cudaFree(y);
        }
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaStreamDestroy(st);
    printf("%s}\n", json);
    return 0;
}

/* --gemm-sweep: every algorithm cuBLASLt's heuristic offers (up to 16) for each matrix of
 * the chosen shapes at the largest batch of the list, laid out as the backend lays its
 * products out (W^T (k x m) x X (k x n) -> float32 Y, CUBLAS_COMPUTE_32F), weights cycled
 * through 1 GiB of copies. Prints each algorithm's time and its fraction of the product's
 * roofline (the larger of weight bytes / copy_gbs and FLOPs / gemm_tflops), the heuristic's
 * first choice marked: whether choosing by measurement would pay. */
static int bench_gemm_sweep(const int *shapes, int64_t n, double gbs, double tflops)
{
    const size_t ws_bytes = 32u << 20;
    cublasLtHandle_t lt;
    cudaStream_t st;
    cudaEvent_t e0, e1;
    void *ws;
    if (cublasLtCreate(&lt) || cudaStreamCreate(&st) != cudaSuccess ||
        cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess ||
        cudaMalloc(&ws, ws_bytes) != cudaSuccess)
        die("gemm sweep setup", RLB_ECUDA);
    for (int big = 0; big < 2; big++) {
        if (!shapes[big])
            continue;
        int64_t mk[5][2];
        step_matrices(big, mk);
        for (int i = 0; i < 5; i++) {
            const int64_t m = mk[i][0], k = mk[i][1];
            const size_t wbytes = (size_t)(m * k) * 2;
            int copies;
            char *w = cycled_weights(m, k, &copies);
            void *x;
            float *y;
            if (cudaMalloc(&x, (size_t)(n * k) * 2) != cudaSuccess ||
                cudaMalloc((void **)&y, (size_t)(n * m) * 4) != cudaSuccess)
                die("gemm sweep buffers", RLB_ENOMEM);
            cudaMemset(x, 0x3c, (size_t)(n * k) * 2);
            cublasLtMatmulDesc_t op;
            cublasLtMatrixLayout_t la, lb, lc;
            cublasLtMatmulPreference_t pref;
            const cublasOperation_t tr = CUBLAS_OP_T, nt = CUBLAS_OP_N;
            cublasLtMatmulHeuristicResult_t heur[16];
            int found = 0;
            if (cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) ||
                cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &tr,
                                               sizeof tr) ||
                cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &nt,
                                               sizeof nt) ||
                cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, (uint64_t)k, (uint64_t)m, k) ||
                cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, (uint64_t)k, (uint64_t)n, k) ||
                cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, (uint64_t)m, (uint64_t)n, m) ||
                cublasLtMatmulPreferenceCreate(&pref) ||
                cublasLtMatmulPreferenceSetAttribute(
                    pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof ws_bytes) ||
                cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 16, heur, &found))
                die("gemm sweep plan", RLB_ECUDA);
            const double floor_s = fmax((double)wbytes / (gbs * 1e9),
                                        2.0 * (double)(m * n * k) / (tflops * 1e12));
            const float one = 1.0f, zero = 0.0f;
            double first = 0, fastest = 1e30;
            int at = -1;
            for (int a = 0; a < found; a++) {
                const int reps = copies > 20 ? copies : 20;
                float ms = 0, best = 1e30f;
                int bad = 0;
                for (int t = 0; t < 3 && !bad; t++) {
                    cudaEventRecord(e0, st);
                    for (int j = 0; j < reps && !bad; j++)
                        bad = cublasLtMatmul(lt, op, &one, w + (size_t)(j % copies) * wbytes,
                                             la, x, lb, &zero, y, lc, y, lc, &heur[a].algo, ws,
                                             ws_bytes, st) != CUBLAS_STATUS_SUCCESS;
                    cudaEventRecord(e1, st);
                    cudaEventSynchronize(e1);
                    cudaEventElapsedTime(&ms, e0, e1);
                    best = ms < best ? ms : best;
                }
                if (bad) {
                    printf("  sweep %s %-7s n %lld algo %2d: refused\n", big ? "8b" : "1b",
                           kMatrix[i], (long long)n, a);
                    continue;
                }
                const double sec = best * 1e-3 / reps;
                if (a == 0)
                    first = sec;
                if (sec < fastest) {
                    fastest = sec;
                    at = a;
                }
                int tile = 0, stages = 0, splitk = 0;
                size_t got;
                cublasLtMatmulAlgoConfigGetAttribute(&heur[a].algo, CUBLASLT_ALGO_CONFIG_TILE_ID,
                                                     &tile, sizeof tile, &got);
                cublasLtMatmulAlgoConfigGetAttribute(
                    &heur[a].algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages, &got);
                cublasLtMatmulAlgoConfigGetAttribute(&heur[a].algo,
                                                     CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk,
                                                     sizeof splitk, &got);
                printf("  sweep %s %-7s %6lld x %5lld, n %lld algo %2d%s: %8.1f us  %.3f of "
                       "roofline  (tile %d, stages %d, split-k %d)\n", big ? "8b" : "1b",
                       kMatrix[i], (long long)m, (long long)k, (long long)n, a,
                       a == 0 ? " (heuristic)" : "", sec * 1e6, floor_s / sec, tile, stages,
                       splitk);
            }
            if (at >= 0)
                printf("sweep %s %-7s n %lld: heuristic %.1f us (%.3f of roofline), fastest of "
                       "%d algo %d %.1f us (%.3f)\n", big ? "8b" : "1b", kMatrix[i], (long long)n,
                       first * 1e6, floor_s / first, found, at, fastest * 1e6,
                       floor_s / fastest);
            cublasLtMatmulPreferenceDestroy(pref);
            cublasLtMatrixLayoutDestroy(la);
            cublasLtMatrixLayoutDestroy(lb);
            cublasLtMatrixLayoutDestroy(lc);
            cublasLtMatmulDescDestroy(op);
            cudaFree(w);
            cudaFree(x);
            cudaFree(y);
        }
    }
    cudaFree(ws);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaStreamDestroy(st);
    cublasLtDestroy(lt);
    return 0;
}

/* The peer's result (../shared/device/hf_generate_baseline.py, run just before in the same
 * call, its output passed with --hf-log): the last line's shape and tokens/s at batches 1
 * and 32. Returns 0 when all three are found. */
typedef struct hf_peer {
    char shape[8];
    double b1, b32;
} hf_peer;

static int read_hf_log(const char *path, hf_peer *hf)
{
    FILE *f = fopen(path, "r");
    char line[2048];
    memset(hf, 0, sizeof *hf);
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        const char *p;
        if (!strstr(line, "\"bench\": \"hf_generate\""))
            continue;
        if ((p = strstr(line, "\"shape\": \"")))
            sscanf(p + strlen("\"shape\": \""), "%7[^\"]", hf->shape);
        if ((p = strstr(line, "\"hf_tok_s_b1\": ")))
            hf->b1 = strtod(p + strlen("\"hf_tok_s_b1\": "), NULL);
        if ((p = strstr(line, "\"hf_tok_s_b32\": ")))
            hf->b32 = strtod(p + strlen("\"hf_tok_s_b32\": "), NULL);
    }
    fclose(f);
    return hf->shape[0] && hf->b1 > 0 && hf->b32 > 0 ? 0 : -1;
}

int rlb__bench_engine_cuda(int argc, char **argv)
{
    int shapes[2] = {1, 1};
    int64_t new_tokens = 256, batches[MAX_BATCHES] = {1, 32, 256};
    int nb = 3, gemv_only = 0, main_only = 0, gemm_sweep = 0;
    const char *hf_log = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--device") && i + 1 < argc) {
            i++;
        } else if (!strcmp(argv[i], "--hf-log") && i + 1 < argc) {
            hf_log = argv[++i];
        } else if (!strcmp(argv[i], "--gemv")) {
            gemv_only = 1;
        } else if (!strcmp(argv[i], "--gemm-sweep")) {
            gemm_sweep = 1;
        } else if (!strcmp(argv[i], "--main-only")) {
            main_only = 1;
        } else if (!strcmp(argv[i], "--shape") && i + 1 < argc) {
            i++;
            shapes[0] = strcmp(argv[i], "8b") != 0;
            shapes[1] = strcmp(argv[i], "1b") != 0;
        } else if (!strcmp(argv[i], "--new") && i + 1 < argc) {
            long v;
            if (rlb__cli_long("bench-engine", "new", argv[++i], 3, 1 << 16, &v))
                return 2;
            new_tokens = v;
        } else if (!strcmp(argv[i], "--batches") && i + 1 < argc) {
            /* a comma-separated list, each a whole number in [1, 256] */
            char list[256];
            snprintf(list, sizeof list, "%s", argv[++i]);
            nb = 0;
            for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok;
                 tok = strtok_r(NULL, ",", &save)) {
                long v;
                if (nb == MAX_BATCHES)
                    return rlb__cli_bad("bench-engine", "batches", argv[i], "too many batches");
                if (rlb__cli_long("bench-engine", "batches", tok, 1, 256, &v))
                    return 2;
                batches[nb++] = v;
            }
            if (nb == 0)
                return rlb__cli_bad("bench-engine", "batches", argv[i], "no batch given");
        } else {
            fprintf(stderr, "usage: rlb-bench-engine --device cuda [--shape 1b|8b|both] "
                            "[--new N] [--batches 1,32,256] [--gemv] [--gemm-sweep] "
                            "[--main-only] [--hf-log FILE]\n");
            return 2;
        }
    }
    if (new_tokens < 3 || batches[0] != 1) {
        fprintf(stderr, "rlb-bench-engine: --new >= 3 and a batch list starting with 1\n");
        return 2;
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        fprintf(stderr, "rlb-bench-engine --device cuda: no GPU visible, skipping\n");
        return 77;
    }
    struct cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    const double gbs = copy_gbs();
    const double tflops = gemv_only ? 0 : gemm_tflops();
    printf("rlb-bench-engine --device cuda on %s: copy %.0f GB/s; prompt %d, %lld new tokens, "
           "bf16, TP 1\n", prop.name, gbs, PROMPT, (long long)new_tokens);
    char json[8192];
    int jn = snprintf(json, sizeof json, "{\"device\":\"%s\",\"copy_gbs\":%.1f", prop.name, gbs);
    if (!gemv_only)
        jn += snprintf(json + jn, sizeof json - (size_t)jn, ",\"gemm_tflops\":%.1f", tflops);
    if (gemv_only)
        return bench_gemv(shapes, gbs, json, sizeof json, jn);
    if (gemm_sweep)
        return bench_gemm_sweep(shapes, batches[nb - 1], gbs, tflops);
    static const char *names[2] = {"1b", "8b"};
    hf_peer hf;
    const int have_hf = hf_log && read_hf_log(hf_log, &hf) == 0;
    if (hf_log && !have_hf)
        printf("HF peer: %s could not be read (no speedup printed)\n", hf_log);
    int64_t at32 = -1; /* batch 32's place in the list */
    for (int i = 0; i < nb; i++)
        at32 = batches[i] == 32 ? i : at32;
    for (int big = 0; big < 2; big++) {
        if (!shapes[big])
            continue;
        rlb_model_config cfg;
        shape_config(&cfg, big);
        rlb_tp_layout l;
        int rc = rlb__tp_layout_init(&l, &cfg, 1, 0, RLB_DTYPE_BF16);
        if (rc)
            die("layout", rc);
        shape_result sr = {0};
        sr.weight_bytes = weight_read_bytes(&l);
        /* batch 1 reads the keys and values of its context: PROMPT + new / 2 on average */
        sr.kv_bytes_b1 = (uint64_t)(PROMPT + new_tokens / 2) * 2 * (uint64_t)cfg.n_layers *
                         (uint64_t)l.kvt * (uint64_t)cfg.head_dim * 2;
        const int ni = nb < 2 ? nb : 2;
        const rlb_quant none = RLB_QUANT_NONE;
        run_shape(&l, run_opts(1, 1, 0, none), batches, nb, new_tokens, sr.tok_s,
                  &sr.prefill_tok_s);
        rlb_cuda_backend_opts classic = run_opts(1, 1, 0, none);
        classic.classic_attention = 1;
        run_shape(&l, classic, batches, nb, new_tokens, sr.classic_tok_s, NULL);
        if (main_only) {
            for (int i = 0; i < nb; i++)
                printf("%s decode batch %-4lld %10.1f tok/s (classic attention %.1f)\n",
                       names[big], (long long)batches[i], sr.tok_s[i], sr.classic_tok_s[i]);
            rlb__tp_layout_free(&l);
            continue;
        }
        run_shape(&l, run_opts(0, 1, 0, none), batches, 1, new_tokens, &sr.b1_graphs_off,
                  NULL);
        run_shape(&l, run_opts(1, 0, 0, none), batches, 1, new_tokens, &sr.b1_no_gemv, NULL);
        run_shape(&l, run_opts(1, 1, 1, none), batches, ni, new_tokens, sr.invariant_tok_s,
                  &sr.invariant_prefill_tok_s);
        run_shape(&l, run_opts(1, 1, 0, RLB_QUANT_FP8), batches, ni, new_tokens, sr.fp8_tok_s,
                  NULL);
        setenv("RLB_CUDA_PDL", "0", 1); /* read when the backend starts */
        run_shape(&l, run_opts(1, 1, 0, none), batches, 1, new_tokens, &sr.b1_pdl_off, NULL);
        unsetenv("RLB_CUDA_PDL");
        rlb_cuda_backend_opts unfused = run_opts(1, 1, 0, none);
        unfused.fused_rope = -1;
        run_shape(&l, unfused, batches, nb, new_tokens, sr.rope_unfused_tok_s, NULL);
        rlb_cuda_backend_opts untimed = run_opts(1, 1, 0, none);
        untimed.gemm_tune = -1;
        run_shape(&l, untimed, batches + nb - 1, 1, new_tokens, &sr.untimed_tok_s, NULL);
        const double floor_s = (double)(sr.weight_bytes + sr.kv_bytes_b1) / (gbs * 1e9);
        sr.fraction = floor_s * sr.tok_s[0];
        /* the largest batch against the roofline: each of its B sequences reads its keys
         * and values (PROMPT + new / 2 on average) and spends 2 FLOPs per weight of every
         * matrix, plus 4 * context * head_dim per query head and layer in attention */
        const double B = (double)batches[nb - 1], ctx = PROMPT + new_tokens / 2.0;
        const double kv_bytes = B * (double)sr.kv_bytes_b1;
        const double flops =
            B * (2.0 * (double)(sr.weight_bytes - (uint64_t)l.cfg.hidden * 2 *
                                                      (uint64_t)(2 * l.cfg.n_layers + 1)) / 2.0 +
                 4.0 * ctx * (double)cfg.head_dim * (double)cfg.n_heads * cfg.n_layers);
        const double roof_s = fmax(((double)sr.weight_bytes + kv_bytes) / (gbs * 1e9),
                                   flops / (tflops * 1e12));
        sr.roofline_fraction = roof_s * sr.tok_s[nb - 1] / B;
        printf("%s: weights %.2f GB read per step; floor at batch 1 %.1f tok/s\n", names[big],
               (double)sr.weight_bytes / 1e9, 1.0 / floor_s);
        for (int i = 0; i < nb; i++)
            printf("  decode batch %-4lld %10.1f tok/s\n", (long long)batches[i], sr.tok_s[i]);
        printf("  decode batch 1, graphs off %10.1f tok/s\n", sr.b1_graphs_off);
        printf("  decode batch 1, cuBLASLt (no GEMV) %10.1f tok/s\n", sr.b1_no_gemv);
        printf("  decode batch 1, PDL off %10.1f tok/s\n", sr.b1_pdl_off);
        for (int i = 0; i < nb; i++)
            printf("  decode batch %-4lld RoPE unfused %10.1f tok/s\n", (long long)batches[i],
                   sr.rope_unfused_tok_s[i]);
        for (int i = 0; i < nb; i++)
            printf("  decode batch %-4lld classic attention %10.1f tok/s\n",
                   (long long)batches[i], sr.classic_tok_s[i]);
        for (int i = 0; i < ni; i++)
            printf("  decode batch %-4lld fp8 %10.1f tok/s\n", (long long)batches[i],
                   sr.fp8_tok_s[i]);
        printf("  decode batch %-4lld GEMM algorithms untimed %10.1f tok/s\n",
               (long long)batches[nb - 1], sr.untimed_tok_s);
        printf("  decode batch %lld: %.3f of the roofline (%.0f TFLOP/s GEMM)\n",
               (long long)batches[nb - 1], sr.roofline_fraction, tflops);
        for (int i = 0; i < ni; i++)
            printf("  decode batch %-4lld batch-invariant %10.1f tok/s\n", (long long)batches[i],
                   sr.invariant_tok_s[i]);
        printf("  prefill batch-invariant %10.1f tok/s\n", sr.invariant_prefill_tok_s);
        printf("  prefill %10.1f tok/s; decode_b1_fraction_of_floor %.3f\n", sr.prefill_tok_s,
               sr.fraction);
        jn += snprintf(json + jn, sizeof json - (size_t)jn,
                       ",\"%s\":{\"weight_bytes\":%llu,\"floor_tok_s_b1\":%.1f", names[big],
                       (unsigned long long)sr.weight_bytes, 1.0 / floor_s);
        for (int i = 0; i < nb; i++)
            jn += snprintf(json + jn, sizeof json - (size_t)jn, ",\"decode_b%lld_tok_s\":%.1f",
                           (long long)batches[i], sr.tok_s[i]);
        for (int i = 0; i < ni; i++)
            jn += snprintf(json + jn, sizeof json - (size_t)jn,
                           ",\"decode_b%lld_batch_invariant_tok_s\":%.1f",
                           (long long)batches[i], sr.invariant_tok_s[i]);
        for (int i = 0; i < ni; i++)
            jn += snprintf(json + jn, sizeof json - (size_t)jn, ",\"decode_b%lld_fp8_tok_s\":%.1f",
                           (long long)batches[i], sr.fp8_tok_s[i]);
        for (int i = 0; i < nb; i++)
            jn += snprintf(json + jn, sizeof json - (size_t)jn,
                           ",\"decode_b%lld_rope_unfused_tok_s\":%.1f", (long long)batches[i],
                           sr.rope_unfused_tok_s[i]);
        jn += snprintf(json + jn, sizeof json - (size_t)jn,
                       ",\"decode_b%lld_gemm_untimed_tok_s\":%.1f", (long long)batches[nb - 1],
                       sr.untimed_tok_s);
        for (int i = 0; i < nb; i++)
            jn += snprintf(json + jn, sizeof json - (size_t)jn,
                           ",\"decode_b%lld_attn_classic_tok_s\":%.1f", (long long)batches[i],
                           sr.classic_tok_s[i]);
        jn += snprintf(json + jn, sizeof json - (size_t)jn,
                       ",\"decode_b1_pdl_off_tok_s\":%.1f,\"decode_b%lld_fraction_of_roofline\":"
                       "%.3f", sr.b1_pdl_off, (long long)batches[nb - 1], sr.roofline_fraction);
        jn += snprintf(json + jn, sizeof json - (size_t)jn,
                       ",\"prefill_batch_invariant_tok_s\":%.1f", sr.invariant_prefill_tok_s);
        if (have_hf && !strcmp(hf.shape, names[big]) && at32 >= 0) {
            printf("  HF generate (same call): batch 1 %.1f, batch 32 %.1f tok/s; "
                   "speedup_vs_hf_b1 %.1f, speedup_vs_hf_b32 %.1f\n", hf.b1, hf.b32,
                   sr.tok_s[0] / hf.b1, sr.tok_s[at32] / hf.b32);
            jn += snprintf(json + jn, sizeof json - (size_t)jn,
                           ",\"hf_tok_s_b1\":%.1f,\"hf_tok_s_b32\":%.1f,\"speedup_vs_hf_b1\":%.1f,"
                           "\"speedup_vs_hf_b32\":%.1f", hf.b1, hf.b32, sr.tok_s[0] / hf.b1,
                           sr.tok_s[at32] / hf.b32);
        }
        jn += snprintf(json + jn, sizeof json - (size_t)jn,
                       ",\"decode_b1_graphs_off_tok_s\":%.1f,\"decode_b1_no_gemv_tok_s\":%.1f,"
                       "\"prefill_tok_s\":%.1f,\"decode_b1_fraction_of_floor\":%.3f}",
                       sr.b1_graphs_off, sr.b1_no_gemv, sr.prefill_tok_s, sr.fraction);
        rlb__tp_layout_free(&l);
    }
    printf("%s}\n", json);
    return 0;
}
