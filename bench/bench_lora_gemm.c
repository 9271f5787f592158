/* bench_lora_gemm: rlb-bench-lora-gemm, whether cuBLASLt can write a LoRA merge
 * (base + s*B*A, DESIGN §10) at the copy rate: the question behind issue 14's target that
 * an adapter sync take at most 1.3x a full one.
 *
 * For every layer of the Llama-3-8B shape and each of the seven targets, TP rank 0 of 2 in
 * bf16: one cuBLASLt product D = s * B A + C with C the base block (rows of the TP shard
 * for q, k, v, gate, up; its columns for o and down, read with the full row's stride) and D
 * a separate destination (the worker's shard), f32 accumulation, rank 16 and 64. Every block
 * has buffers of its own (the 224 products cycle through ~8 GB), so C comes from DRAM as in
 * a sync. The floor is the same as rlb-bench-reshard-gpu --lora's merge floor: the blocks'
 * base read and their destination written once, at the bandwidth of a device-to-device
 * cudaMemcpy of the same bytes measured in the same run (the peer). For each shape the first
 * RLB_GEMM_ALGOS heuristic algorithms are timed and the fastest kept, as the GPU worker's
 * decode products are.
 *
 * Checks one product of each shape against a double-precision reference on the host (max
 * |diff| printed; the run fails past 2 bf16 ulps of the result).
 *
 * Prints a table, then one JSON line. Usage: rlb-bench-lora-gemm [--iters N]
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include "bench/bench_cuda.h"
#include "common/clock.h"

#define LAYERS 32
#define TP 2
#define N_TARGETS 7
#define MAX_ALGOS 8

#define CL(x)                                                                                  \
    do {                                                                                       \
        cublasStatus_t s_ = (x);                                                               \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                     \
            fprintf(stderr, "%s:%d: cublasLt status %d\n", __FILE__, __LINE__, (int)s_);      \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

/* A target of a layer: the full weight [out, in]; column-parallel targets split out, the
 * row-parallel ones (o, down) split in. */
typedef struct target {
    const char *name;
    int64_t out, in;
    int row_parallel;
} target;

static const target targets[N_TARGETS] = {
    {"q", 4096, 4096, 0},    {"k", 1024, 4096, 0},     {"v", 1024, 4096, 0},
    {"o", 4096, 4096, 1},    {"gate", 14336, 4096, 0}, {"up", 14336, 4096, 0},
    {"down", 4096, 14336, 1},
};

/* One product, row-major: D[M, N] = s * B[M, r] A[r, N] + C[M, N], C's rows ldc apart. In
 * cuBLASLt's column-major terms: D^T (N x M) = A^T (N x r, ld N) * B^T (r x M, ld r) + C^T. */
typedef struct shape {
    int64_t m, n, ldc; /* rows and columns of the TP block, C's row stride */
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc, ld;
    cublasLtMatmulAlgo_t algo;
} shape;

static void shape_init(shape *s, const target *t, int r)
{
    s->m = t->row_parallel ? t->out : t->out / TP;
    s->n = t->row_parallel ? t->in / TP : t->in;
    s->ldc = t->in; /* the trainer's rows are whole */
    CL(cublasLtMatmulDescCreate(&s->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CL(cublasLtMatrixLayoutCreate(&s->la, CUDA_R_16BF, (uint64_t)s->n, (uint64_t)r, s->n));
    CL(cublasLtMatrixLayoutCreate(&s->lb, CUDA_R_16BF, (uint64_t)r, (uint64_t)s->m, r));
    CL(cublasLtMatrixLayoutCreate(&s->lc, CUDA_R_16BF, (uint64_t)s->n, (uint64_t)s->m, s->ldc));
    CL(cublasLtMatrixLayoutCreate(&s->ld, CUDA_R_16BF, (uint64_t)s->n, (uint64_t)s->m, s->n));
}

/* Device buffers of one block: C (ldc-strided rows), D, A, B. */
typedef struct block {
    const shape *s;
    uint16_t *c, *d, *a, *b;
} block;

static void run_block(cublasLtHandle_t lt, const block *k, const cublasLtMatmulAlgo_t *algo,
                      float scale, void *ws, size_t ws_bytes, cudaStream_t st)
{
    const shape *s = k->s;
    const float beta = 1.0f;
    CL(cublasLtMatmul(lt, s->op, &scale, k->a, s->la, k->b, s->lb, &beta, k->c, s->lc, k->d,
                      s->ld, algo, ws, ws_bytes, st));
}

static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even (finite values only here) */
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static float frand(uint64_t *z)
{
    *z = *z * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((*z >> 40) & 0xffffff) / 16777216.0f - 0.5f;
}

/* Fills n bf16 values at d with uniform values in [-amp/2, amp/2). */
static void fill(uint16_t *d, size_t n, float amp, uint64_t seed)
{
    uint16_t *h = malloc(n * sizeof(*h));
    uint64_t z = seed;
    for (size_t i = 0; i < n; i++)
        h[i] = to_bf16(frand(&z) * amp);
    CK(cudaMemcpy(d, h, n * sizeof(*h), cudaMemcpyHostToDevice));
    free(h);
}

/* Max |D - (C + s B A)| over block k (double reference), in units of D's bf16 ulp. */
static double check_block(const block *k, int r, float scale)
{
    const shape *s = k->s;
    size_t nc = (size_t)s->m * (size_t)s->ldc, nd = (size_t)s->m * (size_t)s->n;
    uint16_t *c = malloc(nc * 2), *d = malloc(nd * 2), *a = malloc((size_t)r * s->n * 2),
                  *b = malloc((size_t)s->m * r * 2);
    CK(cudaMemcpy(c, k->c, nc * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(d, k->d, nd * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(a, k->a, (size_t)r * s->n * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b, k->b, (size_t)s->m * r * 2, cudaMemcpyDeviceToHost));
    double worst = 0;
    for (int64_t i = 0; i < s->m; i += 97)
        for (int64_t j = 0; j < s->n; j += 13) {
            double acc = 0;
            for (int q = 0; q < r; q++)
                acc += (double)from_bf16(b[i * r + q]) *
                       (double)from_bf16(a[(int64_t)q * s->n + j]);
            double want = (double)from_bf16(c[i * s->ldc + j]) + scale * acc;
            double got = from_bf16(d[i * s->n + j]);
            int e;
            frexp(want, &e);
            double ulp = ldexp(1.0, e - 8); /* bf16: 8 bits of significand */
            double diff = fabs(got - want) / ulp;
            worst = diff > worst ? diff : worst;
        }
    free(c);
    free(d);
    free(a);
    free(b);
    return worst;
}

int main(int argc, char **argv)
{
    int iters = 5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--iters") && i + 1 < argc) {
            iters = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: %s [--iters N]\n", argv[0]);
            return 2;
        }
    }
    const char *env = getenv("RLB_GEMM_ALGOS");
    int n_algos = env ? atoi(env) : 4;
    n_algos = n_algos < 1 ? 1 : n_algos > MAX_ALGOS ? MAX_ALGOS : n_algos;
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    cublasLtHandle_t lt;
    CL(cublasLtCreate(&lt));
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    size_t ws_bytes = 32u << 20;
    void *ws;
    CK(cudaMalloc(&ws, ws_bytes));
    printf("rlb-bench-lora-gemm on %s: Llama-3-8B shapes, TP rank 0 of %d, bf16, %d layers x "
           "%d targets, best of %d, %d heuristic algorithms timed per shape\n",
           prop.name, TP, LAYERS, N_TARGETS, iters, n_algos);
    const int ranks[2] = {16, 64};
    double ms_out[2] = {0}, frac_out[2] = {0}, copy_gbs = 0;
    for (int ri = 0; ri < 2; ri++) {
        int r = ranks[ri];
        float scale = 2.0f; /* alpha 2r */
        shape shapes[N_TARGETS];
        for (int t = 0; t < N_TARGETS; t++)
            shape_init(&shapes[t], &targets[t], r);
        block *blocks = calloc(LAYERS * N_TARGETS, sizeof(*blocks));
        uint64_t merged = 0; /* destination bytes: the base read, D written */
        for (int l = 0; l < LAYERS; l++)
            for (int t = 0; t < N_TARGETS; t++) {
                block *k = &blocks[l * N_TARGETS + t];
                const shape *s = &shapes[t];
                k->s = s;
                size_t nc = (size_t)s->m * (size_t)s->ldc, nd = (size_t)s->m * (size_t)s->n;
                CK(cudaMalloc((void **)&k->c, nc * 2));
                CK(cudaMalloc((void **)&k->d, nd * 2));
                CK(cudaMalloc((void **)&k->a, (size_t)r * s->n * 2));
                CK(cudaMalloc((void **)&k->b, (size_t)s->m * r * 2));
                if (l == 0) {
                    fill(k->c, nc, 1.0f, 11 + (uint64_t)t);
                    fill(k->a, (size_t)r * s->n, 0.1f, 23 + (uint64_t)t);
                    fill(k->b, (size_t)s->m * r, 0.1f, 37 + (uint64_t)t);
                } else {
                    CK(cudaMemset(k->c, 0, nc * 2));
                    CK(cudaMemset(k->a, 0, (size_t)r * s->n * 2));
                    CK(cudaMemset(k->b, 0, (size_t)s->m * r * 2));
                }
                merged += nd * 2;
            }
        /* the best of the first n_algos heuristic algorithms per shape, over every layer */
        for (int t = 0; t < N_TARGETS; t++) {
            shape *s = &shapes[t];
            cublasLtMatmulPreference_t pref;
            CL(cublasLtMatmulPreferenceCreate(&pref));
            CL(cublasLtMatmulPreferenceSetAttribute(
                pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes)));
            cublasLtMatmulHeuristicResult_t res[MAX_ALGOS];
            int found = 0;
            CL(cublasLtMatmulAlgoGetHeuristic(lt, s->op, s->la, s->lb, s->lc, s->ld, pref,
                                              n_algos, res, &found));
            cublasLtMatmulPreferenceDestroy(pref);
            if (found == 0) {
                fprintf(stderr, "no cuBLASLt algorithm for %s (%lld x %lld, rank %d)\n",
                        targets[t].name, (long long)s->m, (long long)s->n, r);
                return 1;
            }
            float best = 1e30f;
            for (int a = 0; a < found; a++) {
                float ms = 0;
                for (int l = 0; l < LAYERS; l++) /* warm */
                    run_block(lt, &blocks[l * N_TARGETS + t], &res[a].algo, scale, ws,
                              ws_bytes, st);
                CK(cudaEventRecord(e0, st));
                for (int l = 0; l < LAYERS; l++)
                    run_block(lt, &blocks[l * N_TARGETS + t], &res[a].algo, scale, ws,
                              ws_bytes, st);
                CK(cudaEventRecord(e1, st));
                CK(cudaEventSynchronize(e1));
                CK(cudaEventElapsedTime(&ms, e0, e1));
                if (ms < best) {
                    best = ms;
                    s->algo = res[a].algo;
                }
            }
            uint64_t bytes = 2ull * (uint64_t)s->m * (uint64_t)s->n * 2 * LAYERS;
            printf("  rank %2d %-5s %6lld x %-6lld %d algorithms, best %.3f ms for %d layers "
                   "(%.0f GB/s of base read + merged written)\n",
                   r, targets[t].name, (long long)s->m, (long long)s->n, found, best, LAYERS,
                   (double)bytes / (best * 1e6));
        }
        /* the peer: a device-to-device copy of the merged bytes, into the destinations */
        if (copy_gbs == 0) {
            char *src, *dst;
            CK(cudaMalloc((void **)&src, merged));
            CK(cudaMalloc((void **)&dst, merged));
            CK(cudaMemset(src, 1, merged));
            float best = 1e30f;
            for (int it = 0; it < iters + 1; it++) {
                float ms = 0;
                CK(cudaEventRecord(e0, st));
                CK(cudaMemcpyAsync(dst, src, merged, cudaMemcpyDeviceToDevice, st));
                CK(cudaEventRecord(e1, st));
                CK(cudaEventSynchronize(e1));
                CK(cudaEventElapsedTime(&ms, e0, e1));
                if (it > 0 && ms < best)
                    best = ms;
            }
            copy_gbs = 2.0 * (double)merged / (best * 1e6);
            printf("  peer: cudaMemcpy of %.3f GB: %.3f ms, %.0f GB/s read + written\n",
                   (double)merged / 1e9, best, copy_gbs);
            CK(cudaFree(src));
            CK(cudaFree(dst));
        }
        float best = 1e30f;
        for (int it = 0; it < iters + 1; it++) {
            float ms = 0;
            CK(cudaEventRecord(e0, st));
            for (int b = 0; b < LAYERS * N_TARGETS; b++)
                run_block(lt, &blocks[b], &blocks[b].s->algo, scale, ws, ws_bytes, st);
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            CK(cudaEventElapsedTime(&ms, e0, e1));
            if (it > 0 && ms < best)
                best = ms;
        }
        double floor_ms = 2.0 * (double)merged / (copy_gbs * 1e6);
        double worst = 0;
        for (int t = 0; t < N_TARGETS; t++) {
            double w = check_block(&blocks[t], r, scale);
            worst = w > worst ? w : worst;
        }
        printf("rank %d: %d products, merged %.3f GB: %.3f ms, floor %.3f ms (%.1f %% of it); "
               "max |diff| %.2f bf16 ulp against the double reference\n",
               r, LAYERS * N_TARGETS, (double)merged / 1e9, best, floor_ms,
               100.0 * floor_ms / best, worst);
        if (worst > 2.0) {
            fprintf(stderr, "rank %d: a product is off by %.2f ulp\n", r, worst);
            return 1;
        }
        ms_out[ri] = best;
        frac_out[ri] = floor_ms / best;
        for (int b = 0; b < LAYERS * N_TARGETS; b++) {
            cudaFree(blocks[b].c);
            cudaFree(blocks[b].d);
            cudaFree(blocks[b].a);
            cudaFree(blocks[b].b);
        }
        free(blocks);
        for (int t = 0; t < N_TARGETS; t++) {
            cublasLtMatrixLayoutDestroy(shapes[t].la);
            cublasLtMatrixLayoutDestroy(shapes[t].lb);
            cublasLtMatrixLayoutDestroy(shapes[t].lc);
            cublasLtMatrixLayoutDestroy(shapes[t].ld);
            cublasLtMatmulDescDestroy(shapes[t].op);
        }
    }
    printf("{\"bench\":\"lora_gemm\",\"device\":\"%s\",\"copy_gbs\":%.1f,"
           "\"r16_ms\":%.3f,\"r16_of_floor\":%.3f,\"r64_ms\":%.3f,\"r64_of_floor\":%.3f}\n",
           prop.name, copy_gbs, ms_out[0], frac_out[0], ms_out[1], frac_out[1]);
    cublasLtDestroy(lt);
    return 0;
}
