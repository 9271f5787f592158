/* lora_gemm.c: LoRA merges as cuBLASLt products (lora_gemm.h). */
#include "kernels/cuda/lora_gemm.h"

#include <stdlib.h>
#include <string.h>

#include <cublasLt.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/lt_check.h"

#define WORKSPACE_BYTES (32u << 20)
#define CANDIDATES 4 /* algorithms of the heuristic timed per shape */

/* A shape and the alignment of its four addresses, with its layouts and algorithm. */
typedef struct lt_shape {
    uint64_t rows, cols, kp, ldr, ldc, ldd;
    uint32_t align[4]; /* bytes: R, L, C, D */
    cublasLtMatrixLayout_t a, b, c, d;
    cublasLtMatmulAlgo_t algo[CANDIDATES]; /* the heuristic's, best first; [0] is used */
    int n_algo;
    uint64_t first;                        /* its first product */
} lt_shape;

struct rlb_lora_gemm {
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t op;
    void *workspace;
    rlb_lora_product *p; /* [n] */
    uint32_t *shape_of;  /* [n] index in shapes */
    uint64_t n;
    lt_shape *shapes;
    uint64_t n_shapes;
    int ready;              /* tuned, and the graph made if one could be */
    cudaStream_t cap;       /* where the products are captured */
    cudaGraphExec_t graph;  /* every product, in order (NULL: launched one by one) */
};

/* The largest power of two up to 256 dividing address x. */
static uint32_t align_of(const void *x)
{
    uint32_t a = 256;
    while (a > 1 && (uintptr_t)x % a)
        a /= 2;
    return a;
}

static void shapes_free(rlb_lora_gemm *g)
{
    for (uint64_t i = 0; i < g->n_shapes; i++) {
        lt_shape *s = &g->shapes[i];
        cublasLtMatrixLayoutDestroy(s->a);
        cublasLtMatrixLayoutDestroy(s->b);
        cublasLtMatrixLayoutDestroy(s->c);
        cublasLtMatrixLayoutDestroy(s->d);
    }
    free(g->shapes);
    free(g->p);
    free(g->shape_of);
    if (g->graph)
        cudaGraphExecDestroy(g->graph);
    g->graph = NULL;
    g->ready = 0;
    g->shapes = NULL;
    g->p = NULL;
    g->shape_of = NULL;
    g->n = g->n_shapes = 0;
}

int rlb__lora_gemm_create(rlb_lora_gemm **out, char *err, size_t errlen)
{
    int rc = 0;
    rlb_lora_gemm *g = calloc(1, sizeof *g);
    if (!out || !g) {
        free(g);
        return out ? RLB_ENOMEM : RLB_EINVAL;
    }
    *out = NULL;
    RLB_LT_CHECK_ERR(cublasLtCreate(&g->lt), rc, err);
    RLB_LT_CHECK_ERR(cublasLtMatmulDescCreate(&g->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), rc, err);
    RLB_CUDA_CHECK(cudaMalloc(&g->workspace, WORKSPACE_BYTES), rc, err);
    RLB_CUDA_CHECK(cudaStreamCreateWithFlags(&g->cap, cudaStreamNonBlocking), rc, err);
    *out = g;
    return 0;
err:
    rlb__lora_gemm_free(g);
    return rc;
}

/* Fills s's layouts and algorithm (its shape and alignments set). */
static int shape_init(rlb_lora_gemm *g, lt_shape *s, char *err, size_t errlen)
{
    int rc = 0, found = 0;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t res[CANDIDATES];
    uint64_t ws = WORKSPACE_BYTES;
    static const cublasLtMatmulPreferenceAttributes_t aligns[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    RLB_LT_CHECK_ERR(
        cublasLtMatrixLayoutCreate(&s->a, CUDA_R_16BF, s->cols, s->kp, (int64_t)s->ldr), rc, out);
    RLB_LT_CHECK_ERR(cublasLtMatrixLayoutCreate(&s->b, CUDA_R_16BF, s->kp, s->rows, (int64_t)s->kp),
                     rc, out);
    RLB_LT_CHECK_ERR(
        cublasLtMatrixLayoutCreate(&s->c, CUDA_R_16BF, s->cols, s->rows, (int64_t)s->ldc), rc, out);
    RLB_LT_CHECK_ERR(
        cublasLtMatrixLayoutCreate(&s->d, CUDA_R_16BF, s->cols, s->rows, (int64_t)s->ldd), rc, out);
    RLB_LT_CHECK_ERR(cublasLtMatmulPreferenceCreate(&pref), rc, out);
    RLB_LT_CHECK_ERR(cublasLtMatmulPreferenceSetAttribute(
                         pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws),
                     rc, out);
    for (int k = 0; k < 4; k++)
        RLB_LT_CHECK_ERR(
            cublasLtMatmulPreferenceSetAttribute(pref, aligns[k], &s->align[k], sizeof s->align[k]),
            rc, out);
    RLB_LT_CHECK_ERR(cublasLtMatmulAlgoGetHeuristic(g->lt, g->op, s->a, s->b, s->c, s->d, pref,
                                                    CANDIDATES, res, &found),
                     rc, out);
    if (!found) {
        rlb__cuda_err(err, errlen,
                      "cuBLASLt has no algorithm for a LoRA merge of %llu x %llu "
                      "at rank %llu",
                      (unsigned long long)s->rows, (unsigned long long)s->cols,
                      (unsigned long long)s->kp);
        rc = RLB_ECUDA;
        goto out;
    }
    for (int k = 0; k < found && k < CANDIDATES; k++)
        s->algo[k] = res[k].algo;
    s->n_algo = found < CANDIDATES ? found : CANDIDATES;
out:
    if (pref)
        cublasLtMatmulPreferenceDestroy(pref);
    return rc;
}

int rlb__lora_gemm_set(rlb_lora_gemm *g, const rlb_lora_product *p, uint64_t n, char *err,
                       size_t errlen)
{
    if (!g || (n && !p))
        return RLB_EINVAL;
    shapes_free(g);
    int rc = 0;
    g->p = malloc((n + 1) * sizeof *g->p);
    g->shape_of = malloc((n + 1) * sizeof *g->shape_of);
    g->shapes = calloc(n + 1, sizeof *g->shapes);
    if (!g->p || !g->shape_of || !g->shapes) {
        shapes_free(g);
        return RLB_ENOMEM;
    }
    memcpy(g->p, p, n * sizeof *p);
    g->n = n;
    for (uint64_t i = 0; i < n && !rc; i++) {
        const rlb_lora_product *q = &p[i];
        lt_shape want = {.rows = q->rows, .cols = q->cols, .kp = q->kp, .ldr = q->ldr,
                         .ldc = q->ldc, .ldd = q->ldd,
                         .align = {align_of(q->r), align_of(q->l), align_of(q->c),
                                   align_of(q->d)}};
        uint64_t s = 0;
        while (s < g->n_shapes &&
               (g->shapes[s].rows != want.rows || g->shapes[s].cols != want.cols ||
                g->shapes[s].kp != want.kp || g->shapes[s].ldr != want.ldr ||
                g->shapes[s].ldc != want.ldc || g->shapes[s].ldd != want.ldd ||
                memcmp(g->shapes[s].align, want.align, sizeof want.align)))
            s++;
        if (s == g->n_shapes) {
            g->shapes[s] = want;
            g->shapes[s].first = i;
            g->n_shapes++;
            rc = shape_init(g, &g->shapes[s], err, errlen);
        }
        g->shape_of[i] = (uint32_t)s;
    }
    if (rc)
        shapes_free(g);
    return rc;
}

/* Launches product i with the algorithm at its shape's algo[k]. */
static cublasStatus_t launch(rlb_lora_gemm *g, uint64_t i, int k, cudaStream_t stream)
{
    static const float one = 1.0f;
    const rlb_lora_product *q = &g->p[i];
    const lt_shape *s = &g->shapes[g->shape_of[i]];
    return cublasLtMatmul(g->lt, g->op, &q->scale, q->r, s->a, q->l, s->b, &one, q->c, s->c,
                          q->d, s->d, &s->algo[k], g->workspace, WORKSPACE_BYTES, stream);
}

/* Each shape's candidates timed on its first product (warmed once, then twice timed), the
 * fastest moved to algo[0]. The products write their destinations, which the run then
 * writes again. Synchronizes `stream`. */
static int tune(rlb_lora_gemm *g, cudaStream_t stream, char *err, size_t errlen)
{
    cudaEvent_t e0 = NULL, e1 = NULL;
    int rc = 0;
    RLB_CUDA_CHECK(cudaEventCreate(&e0), rc, out);
    RLB_CUDA_CHECK(cudaEventCreate(&e1), rc, out);
    for (uint64_t s = 0; s < g->n_shapes; s++) {
        lt_shape *sh = &g->shapes[s];
        float best = -1.0f;
        int pick = 0;
        if (sh->n_algo < 2)
            continue;
        for (int k = 0; k < sh->n_algo; k++) {
            float ms = 0.0f;
            /* an algorithm cuBLASLt refuses to run here is passed over */
            if (launch(g, sh->first, k, stream) != CUBLAS_STATUS_SUCCESS)
                continue;
            RLB_CUDA_CHECK(cudaEventRecord(e0, stream), rc, out);
            for (int r = 0; r < 2; r++)
                RLB_LT_CHECK_ERR(launch(g, sh->first, k, stream), rc, out);
            RLB_CUDA_CHECK(cudaEventRecord(e1, stream), rc, out);
            RLB_CUDA_CHECK(cudaEventSynchronize(e1), rc, out);
            RLB_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1), rc, out);
            if (best < 0.0f || ms < best)
                best = ms, pick = k;
        }
        const cublasLtMatmulAlgo_t a = sh->algo[0];
        sh->algo[0] = sh->algo[pick];
        sh->algo[pick] = a;
    }
out:
    if (e0)
        cudaEventDestroy(e0);
    if (e1)
        cudaEventDestroy(e1);
    return rc;
}

/* Every product captured in order into g->graph; where capture fails, none (the run then
 * launches them one by one). */
static void capture(rlb_lora_gemm *g)
{
    cudaGraph_t graph = NULL;
    if (cudaStreamBeginCapture(g->cap, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        cudaGetLastError();
        return;
    }
    int ok = 1;
    for (uint64_t i = 0; i < g->n && ok; i++)
        ok = launch(g, i, 0, g->cap) == CUBLAS_STATUS_SUCCESS;
    if (cudaStreamEndCapture(g->cap, &graph) != cudaSuccess || !ok ||
        cudaGraphInstantiate(&g->graph, graph, 0) != cudaSuccess) {
        cudaGetLastError();
        RLB_LOG_WARN(RLB_SUB_KERNEL, "the LoRA products could not be captured in a graph; "
                     "launched one by one");
        g->graph = NULL;
    }
    if (graph)
        cudaGraphDestroy(graph);
}

int rlb__lora_gemm_run(rlb_lora_gemm *g, cudaStream_t stream)
{
    if (!g)
        return RLB_EINVAL;
    char *err = NULL;
    size_t errlen = 0;
    int rc = 0;
    if (!g->ready && g->n) {
        RLB_CHECK(tune(g, stream, err, errlen));
        capture(g);
        g->ready = 1;
    }
    if (g->graph) {
        RLB_CUDA_CHECK(cudaGraphLaunch(g->graph, stream), rc, out);
        return 0;
    }
    for (uint64_t i = 0; i < g->n; i++)
        RLB_LT_CHECK_ERR(launch(g, i, 0, stream), rc, out);
out:
    return rc;
}

uint64_t rlb__lora_gemm_device_bytes(const rlb_lora_gemm *g)
{
    return g ? WORKSPACE_BYTES : 0;
}

void rlb__lora_gemm_free(rlb_lora_gemm *g)
{
    if (!g)
        return;
    shapes_free(g);
    if (g->op)
        cublasLtMatmulDescDestroy(g->op);
    if (g->lt)
        cublasLtDestroy(g->lt);
    if (g->cap)
        cudaStreamDestroy(g->cap);
    cudaFree(g->workspace);
    free(g);
}
