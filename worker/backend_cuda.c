/* backend_cuda.c: the engine backend on one GPU (backend_cuda.h, ebackend.h). Every op is
 * issued on one stream; results come back in sample / read_logits, which synchronize.
 *
 * Fixed addresses: weights, post-load copies and KV storage are VMM mappings (reserve,
 * create, map), the step's buffers and its metadata are allocated once for the largest step
 * the options allow, and `begin` copies the batch's metadata into those buffers (pinned
 * staging, one cudaMemcpyAsync). So a decode step captured in a CUDA graph replays against
 * any later batch of its bucket: the graph holds only addresses and the bucket's sizes.
 *
 * Staged syncs (opts.weight_buffers 2): a second weight buffer, allocated and exportable
 * like the first, which the bridge writes while the first serves. set_weights of either
 * buffer's address switches the forward pass to it: post-load processing runs from it into
 * the one set of post-load copies, then the decode graphs, which hold the old buffer's
 * addresses, are dropped and captured again on first use (re-capture was chosen over a
 * device-side table of weight pointers, which every kernel would have to read through: a
 * switch happens once per version, a capture costs one step per bucket).
 * A decode batch is padded to its bucket with rows at position -1 (they see no key and
 * their slot -1 stores nothing) whose spans have one row and whose logits are never read.
 *
 * The residual add is deferred: add(X, P) is remembered and issued fused with the next
 * rmsnorm of X (rlb__eo_add_rmsnorm), or alone before any other op.
 *
 * Steps of at most RLB_EO_GEMV_MAX_ROWS rows (decode at small batch) multiply through the
 * GEMV of kernels/cuda/gemv.h instead of cuBLASLt, and defer two more ops so that it can
 * absorb them: rmsnorm(X -> H) is remembered and the linear that reads H next runs the
 * GEMV with the norm fused (it reads X); a linear into PROJ at TP 1 is remembered and the
 * add(X, PROJ) that follows runs it with the residual add fused (X += y in its epilogue).
 * The gate_up GEMV writes swiglu(GU) into ACT as well (one block has both halves of each
 * output), so swiglu has nothing left to do and down reads ACT in the compute dtype (where
 * gate_up did not run on the GEMV, the swiglu kernel runs). In a decode step (every span
 * one token) whose attention runs one key split (large batches;
 * opts.fused_rope 1: every decode step, -1: none) rope_store is remembered too, and the
 * attention kernel of its layer rotates q and k and stores the step's keys and values
 * itself, with the same bits as the two kernels (so batch-invariant mode keeps it). Where
 * the keys are split it stays a kernel of its own: fused there, a batch-1 step measured
 * slower (BENCHMARKS.md). Outside batch-invariant mode a decode step attends with the
 * tensor-core decode kernel where it applies (bf16 cache, head_dim 64 or 128, at most 16 q
 * heads per kv head; rlb_eo_attn.one_row), a sum in another order than the classic
 * kernel's (opts.classic_attention 1 keeps the classic one). Any other op first issues
 * what is pending in its plain form, so every op keeps the meaning ebackend.h gives it.
 * Per layer that leaves GEMV qkv, (rope_store,) attention, GEMV o, GEMV gate_up and GEMV
 * down; the final norm fuses into the LM head likewise.
 *
 * The engine's kernels launch with programmatic dependent launch (kernels/cuda/pdl.cuh;
 * RLB_CUDA_PDL=0 turns it off): each may start while the one before it finishes, and the
 * GEMV streams its first weights before it waits.
 *
 * GEMMs: cuBLASLt, y[n, m] = x[n, k] . W[m, k]^T as the column-major product
 * W^T(k x m, transposed) x X(k x n) -> Y(m x n), inputs in the weights' dtype, float32
 * accumulation and output (CUBLAS_COMPUTE_32F, no TF32, for fp32 weights); one plan per
 * shape, cached. With post-load copies, rlb__eo_matmul_wq instead.
 *
 * A decode graph bucket's products (opts.gemm_tune 0) take the fastest of the first
 * TUNE_ALGOS candidates of the heuristic, each timed once per shape before the bucket's
 * capture on the step's own buffers, every layer's weight in turn as a step reads them (so
 * not from L2). The heuristic's first choice was up to 7 % slower at 256 rows
 * (rlb-bench-engine --gemm-sweep; BENCHMARKS.md). A product made outside a capture of a
 * bucket (prefill, graphs off) keeps the heuristic's choice: timing every row count of
 * chunked prefill would cost more than it gains.
 *
 * Batch-invariant mode (opts.batch_invariant): every product, whatever its row count, runs
 * through cuBLASLt with the algorithm its heuristic picks for (m, max rows, k), found once
 * per (m, k) among those without split-K reduction and with split-K forced to 1, so an
 * output's k-reduction does not depend on how many rows the step has; no GEMV and no
 * fusion that only small steps get; attention with one key split always (the split count
 * otherwise follows the step's size). Norms, RoPE, the cache and sampling work per row
 * already. What it costs: rlb-bench-engine --device cuda (decode_b1_batch_invariant_tok_s).
 *
 * Check: tests/gpu/test_cuda_backend.c (against the CPU backend through the interface, and
 * whole-model HF fixtures), bench/bench_engine_cuda.c.
 */
#include "worker/backend_cuda.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <cublasLt.h>
#include <cuda.h>
#include <cuda_runtime_api.h>
#ifdef RLB_HAVE_NCCL
#include <nccl.h>
#endif

#include "common/env.h"
#include "common/log.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/sample.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/engine_ops.h"
#include "kernels/cuda/gemv.h"
#include "kernels/cuda/lt_check.h"
#include "kernels/cuda/quant.h"
#include "worker/kvcache.h"

#define MAX_KV_REGIONS 8     /* kv_mem allocations (the KV cache makes one or two) */
#define MAX_BUCKETS 80       /* decode graph buckets */
#define GEMM_PLANS 256       /* cached cuBLASLt plans */
#define LT_WORKSPACE (32u << 20)
#define TUNE_ALGOS 8         /* the heuristic's candidates a decode product times */
#define TUNE_MARGIN 0.98f    /* another candidate replaces the heuristic's first when it
                              * takes less than this fraction of its time (not on noise) */

/* One VMM allocation: a reserved address range and, while mapped, its physical memory. */
typedef struct vmm_region {
    CUdeviceptr va;                 /* reserved base; 0 when unused */
    uint64_t size;                  /* reserved and mapped bytes (granularity multiple) */
    uint64_t asked;                 /* bytes the caller asked for */
    CUmemGenericAllocationHandle h; /* physical memory while mapped */
    int mapped;                     /* 1 while h is mapped at va */
    int exportable;                 /* 1 when h was made with a POSIX fd handle type */
} vmm_region;

/* A post-load copy of one matrix. */
typedef struct wq_copy {
    void *q;        /* [rows * cols] int8 / e4m3 */
    float *scale;   /* [rows] or [1] */
    int64_t rows, cols;
} wq_copy;

typedef struct gemm_plan {
    int64_t m, n, k, ldc;          /* the shape (0: unused entry) */
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
    int tuned;                     /* 1: algo was chosen by timing (plan_tune) */
} gemm_plan;

/* The device metadata of one step; the pinned staging has the same layout. */
typedef struct step_meta {
    int32_t *tokens;       /* [R] */
    int32_t *pos;          /* [R] */
    int64_t *slot;         /* [R] */
    int32_t *span_row0;    /* [S] */
    int32_t *span_n;       /* [S] */
    int32_t *span_qb0;     /* [S + 1] */
    int32_t *out_rows;     /* [O] */
    int32_t *bt_stride;    /* [1] entries per span in block_tables this step */
    int32_t *block_tables; /* [S * B] entries, [spans][stride]: last, so a copy stops
                            * after the used ones */
} step_meta;

/* What sampling exchanges with the device. */
typedef struct sample_io {
    rlb_eo_sample_job *jobs; /* [O] */
    int32_t *tokens;         /* [O] */
    float *logprobs;         /* [O] */
    int32_t *status;         /* [O] */
} sample_io;

typedef struct cuda_backend {
    rlb_ebackend base;
    rlb_cuda_backend_opts opts;
    int device, sms;
    cudaStream_t stream;
    cudaEvent_t meta_done; /* the last metadata copy has read the staging */
    cublasLtHandle_t lt;
    void *lt_ws;
    gemm_plan plans[GEMM_PLANS];
    rlb_dtype dt; /* compute dtype = weights' dtype */
    size_t esz;
    int64_t D, hd, hq, kvt, grp, qkv_rows, inter, V, vl, vocab0, n_layers;
    int64_t R, S, B, O; /* maximum rows, spans, blocks per span (on average), logits rows */
    float eps, attn_scale;
    int T, rank;

    vmm_region wreg[2];       /* weight buffers: one, or two for staged syncs */
    int n_wreg;               /* weight buffers allocated */
    int live;                 /* the one the forward pass reads */
    vmm_region qreg;          /* post-load copies (of the live buffer) */
    const void *host_weights; /* bound host copy, or NULL */
    wq_copy *wq;              /* [(n_layers + 1) * RLB_W_KIND_COUNT_] (q NULL: none) */
    rlb_cuda_quant *qset[2];  /* post-load processing from weight buffer i into qreg */
    int weights_asleep;

    void *buf[RLB_EBUF_COUNT_];
    void *hsel;               /* [O, D] normed rows of the logits (compute dtype) */
    float *loc, *gath;        /* T > 1: [O, vl], [T, O, vl] */
    float *logits;            /* [O, V] */
    float *partial;           /* attention split workspace */
    void *sample_work;        /* rlb__eo_sample's per-chunk partials */
    int64_t ws_vectors;
    float *inv_freq;          /* [hd / 2] */
    void *dmeta_mem, *hmeta_mem; /* device metadata and its pinned staging */
    uint64_t meta_bytes;
    step_meta dmeta, hmeta;
    void *dio_mem, *hio_mem;
    sample_io dio, hio;
    float *hrow;              /* [V] pinned: a row sampled on the host */
    rlb_sample_ws ws;

    /* the step */
    int64_t rows, n_spans, out, real_out, qblocks, splits, bt_stride;
    rlb_eo_cache cache;
    int have_step;
    int pending_add;          /* an rlb_ebuf added into X and not yet issued, or -1 */
    const void *pending_norm; /* GEMV step: norm weight of an rmsnorm(X -> H) not yet
                               * issued, or NULL */
    int pending_proj_kind;    /* GEMV step, TP 1: weight kind of a linear into PROJ not yet
                               * issued (the add into X fuses with it), or -1 */
    int pending_proj_layer;   /* its layer */
    int pending_proj_src;     /* its input buffer */
    int act_ready;            /* GEMV step: the gate_up GEMV wrote swiglu(GU) into ACT too,
                               * so the swiglu op has nothing left to do */
    int fuse_rope;            /* decode step: rope_store is deferred to the attention */
    int one_row;              /* decode step, every span one row: rlb_eo_attn.one_row */
    int pending_rope;         /* the layer of a deferred rope_store, or -1 */
    int bucket;               /* graph bucket of the step, or -1 */
    int capturing;

    int64_t n_buckets;
    int64_t bucket_size[MAX_BUCKETS];
    cudaGraphExec_t graphs[MAX_BUCKETS];

    vmm_region kvreg[MAX_KV_REGIONS];
#ifdef RLB_HAVE_NCCL
    ncclComm_t nccl;
#endif
} cuda_backend;

static cuda_backend *cb(rlb_ebackend *b)
{
    return (cuda_backend *)b;
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

/* ---- VMM -------------------------------------------------------------------------------- */

/* The driver's VMM functions, looked up through the runtime rather than linked (as
 * kernels/cuda/ipc.c does), so programs linking this backend load on machines without a
 * driver and skip there. */
static struct vmm_api {
    CUresult (*granularity)(size_t *, const CUmemAllocationProp *,
                            CUmemAllocationGranularity_flags);
    CUresult (*create)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                       unsigned long long);
    CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                    unsigned long long);
    CUresult (*set_access)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*unmap)(CUdeviceptr, size_t);
    CUresult (*release)(CUmemGenericAllocationHandle);
    CUresult (*reserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*addr_free)(CUdeviceptr, size_t);
    CUresult (*export_fd)(void *, CUmemGenericAllocationHandle, CUmemAllocationHandleType,
                          unsigned long long);
} drv;
static pthread_once_t drv_once = PTHREAD_ONCE_INIT;
static int drv_rc;

static void drv_load(void)
{
    static const char *names[] = {"cuMemGetAllocationGranularity", "cuMemCreate", "cuMemMap",
                                  "cuMemSetAccess", "cuMemUnmap", "cuMemRelease",
                                  "cuMemAddressReserve", "cuMemAddressFree",
                                  "cuMemExportToShareableHandle"};
    void **slots[] = {(void **)&drv.granularity, (void **)&drv.create, (void **)&drv.map,
                      (void **)&drv.set_access, (void **)&drv.unmap, (void **)&drv.release,
                      (void **)&drv.reserve, (void **)&drv.addr_free, (void **)&drv.export_fd};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        enum cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
        cudaError_t e = cudaGetDriverEntryPointByVersion(names[i], slots[i], 12000,
                                                         cudaEnableDefault, &q);
        if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
            RLB_LOG_ERROR(RLB_SUB_ENGINE, "driver function %s: %s (query %d)", names[i],
                          cudaGetErrorString(e), (int)q);
            drv_rc = RLB_ECUDA;
            return;
        }
    }
}

static uint64_t vmm_granularity(int device)
{
    CUmemAllocationProp prop = {0};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    size_t g = 0;
    if (drv.granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) !=
            CUDA_SUCCESS ||
        g == 0)
        g = 2u << 20;
    return g;
}

/* Creates physical memory for r and maps it at r->va, readable and writable by device. */
static int vmm_map(vmm_region *r, int device)
{
    int rc = 0;
    CUmemAllocationProp prop = {0};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    r->exportable = 1;
    CUresult cr = drv.create(&r->h, r->size, &prop, 0);
    if (cr == CUDA_ERROR_NOT_SUPPORTED || cr == CUDA_ERROR_INVALID_VALUE) {
        RLB_LOG_WARN(RLB_SUB_ENGINE, "cuMemCreate with an fd handle type refused (%d); the "
                     "memory will not be exportable", (int)cr);
        prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
        r->exportable = 0;
        cr = drv.create(&r->h, r->size, &prop, 0);
    }
    if (cr != CUDA_SUCCESS) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "cuMemCreate(%llu bytes): CUresult %d",
                      (unsigned long long)r->size, (int)cr);
        return cr == CUDA_ERROR_OUT_OF_MEMORY ? RLB_ENOMEM : RLB_ECUDA;
    }
    RLB_CU_CHECK(drv.map(r->va, r->size, 0, r->h, 0), rc, err_release);
    CUmemAccessDesc acc = {0};
    acc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    acc.location.id = device;
    acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    RLB_CU_CHECK(drv.set_access(r->va, r->size, &acc, 1), rc, err_unmap);
    r->mapped = 1;
    return 0;
err_unmap:
    drv.unmap(r->va, r->size);
err_release:
    drv.release(r->h);
    return rc;
}

static void vmm_unmap(vmm_region *r)
{
    if (!r->mapped)
        return;
    drv.unmap(r->va, r->size);
    drv.release(r->h);
    r->mapped = 0;
}

/* Reserves an address range of `bytes` (rounded to the granularity) and maps it. */
static int vmm_alloc(vmm_region *r, uint64_t bytes, int device)
{
    int rc = 0;
    memset(r, 0, sizeof *r);
    r->asked = bytes;
    r->size = align_up(bytes ? bytes : 1, vmm_granularity(device));
    RLB_CU_CHECK(drv.reserve(&r->va, r->size, 0, 0, 0), rc, err);
    if ((rc = vmm_map(r, device))) {
        drv.addr_free(r->va, r->size);
        goto err;
    }
    return 0;
err:
    memset(r, 0, sizeof *r);
    return rc;
}

static void vmm_free(vmm_region *r)
{
    if (!r->va)
        return;
    vmm_unmap(r);
    drv.addr_free(r->va, r->size);
    memset(r, 0, sizeof *r);
}

/* ---- Errors inside a step ------------------------------------------------------------------ */

/* A failed op ends a capture in progress (the graph is dropped), so the stream is usable. */
static int step_fail(cuda_backend *c, int rc)
{
    if (rc && c->capturing) {
        cudaGraph_t g = NULL;
        cudaStreamEndCapture(c->stream, &g);
        if (g)
            cudaGraphDestroy(g);
        cudaGetLastError();
        c->capturing = 0;
    }
    return rc;
}

/* ---- Weights ------------------------------------------------------------------------------- */

/* The weight of (kind, layer) in weight buffer `buf`, or NULL. */
static const void *wptr_in(const cuda_backend *c, int buf, rlb_wkind kind, int layer)
{
    const rlb_local_tensor *t = rlb__tp_layout_find(c->base.layout, kind, layer);
    return t ? (const void *)(uintptr_t)(c->wreg[buf].va + t->offset) : NULL;
}

/* The weight of (kind, layer) the forward pass reads. */
static const void *wptr(const cuda_backend *c, rlb_wkind kind, int layer)
{
    return wptr_in(c, c->live, kind, layer);
}

static wq_copy *wq_of(cuda_backend *c, rlb_wkind kind, int layer)
{
    return c->wq ? &c->wq[(int64_t)(layer + 1) * RLB_W_KIND_COUNT_ + kind] : NULL;
}

static rlb_wkind head_kind(const cuda_backend *c)
{
    return c->base.layout->cfg.tie_embeddings ? RLB_W_EMBED : RLB_W_LM_HEAD;
}

/* The matrices post-load processing quantizes: (kind, layer) pairs. */
static int64_t quant_targets(const cuda_backend *c, rlb_wkind *kinds, int *layers)
{
    static const rlb_wkind per_layer[4] = {RLB_W_QKV, RLB_W_O, RLB_W_GATE_UP, RLB_W_DOWN};
    int64_t n = 0;
    for (int l = 0; l < c->n_layers; l++)
        for (int i = 0; i < 4; i++) {
            kinds[n] = per_layer[i];
            layers[n++] = l;
        }
    kinds[n] = head_kind(c);
    layers[n++] = -1;
    return n;
}

/* Lays out the post-load copies in a VMM region of their own and describes one quant set
 * per weight buffer, each writing the same copies. */
static int quant_setup(cuda_backend *c)
{
    const int64_t n_max = 4 * c->n_layers + 1;
    rlb_wkind *kinds = malloc((size_t)n_max * sizeof *kinds);
    int *layers = malloc((size_t)n_max * sizeof *layers);
    rlb_cuda_quant_tensor *qt = calloc((size_t)n_max, sizeof *qt);
    c->wq = calloc((size_t)(c->n_layers + 1) * RLB_W_KIND_COUNT_, sizeof *c->wq);
    int rc = 0;
    if (!kinds || !layers || !qt || !c->wq) {
        rc = RLB_ENOMEM;
        goto out;
    }
    const int64_t n = quant_targets(c, kinds, layers);
    const rlb_quant_kind qk = c->opts.quant == RLB_QUANT_INT8 ? RLB_QUANT_INT8_ROWS
                              : c->opts.quant == RLB_QUANT_FP8 ? RLB_QUANT_FP8_TENSOR
                                                                  : RLB_QUANT_FP8_ROWS;
    uint64_t bytes = 0;
    for (int pass = 0; pass < 2; pass++) {
        uint64_t off = 0;
        for (int64_t i = 0; i < n; i++) {
            const rlb_local_tensor *t = rlb__tp_layout_find(c->base.layout, kinds[i], layers[i]);
            wq_copy *w = wq_of(c, kinds[i], layers[i]);
            uint64_t qoff = off, soff = align_up(qoff + (uint64_t)(t->rows * t->cols), 256);
            off = align_up(soff + (qk == RLB_QUANT_FP8_TENSOR ? 4 : (uint64_t)t->rows * 4), 256);
            if (pass == 0)
                continue;
            *w = (wq_copy){(void *)(uintptr_t)(c->qreg.va + qoff),
                           (float *)(uintptr_t)(c->qreg.va + soff), t->rows, t->cols};
            qt[i] = (rlb_cuda_quant_tensor){NULL, c->dt, t->rows, t->cols, qk, w->q,
                                            w->scale};
        }
        if (pass == 0) {
            bytes = off;
            if ((rc = vmm_alloc(&c->qreg, bytes, c->device)))
                goto out;
        }
    }
    for (int b = 0; b < c->n_wreg && rc == 0; b++) {
        char err[256];
        for (int64_t i = 0; i < n; i++)
            qt[i].w = wptr_in(c, b, kinds[i], layers[i]);
        rc = rlb__cuda_quant_create(c->device, qt, (uint32_t)n, &c->qset[b], err, sizeof err);
    }
out:
    free(kinds);
    free(layers);
    free(qt);
    return rc;
}

static int upload(cuda_backend *c, const void *host)
{
    int rc = 0;
    RLB_CUDA_CHECK(cudaMemcpyAsync((void *)(uintptr_t)c->wreg[c->live].va, host,
                                   c->base.layout->total_bytes, cudaMemcpyHostToDevice,
                                   c->stream),
                   rc, out);
out:
    return rc;
}

/* Post-load processing from weight buffer `buf` (the bound host copy uploaded into the
 * live buffer first), waited for. */
static int postload_from(cuda_backend *c, int buf)
{
    int rc = 0;
    if (c->weights_asleep)
        return RLB_EINVAL;
    if (c->host_weights && (rc = upload(c, c->host_weights)))
        return rc;
    if (c->qset[buf] && (rc = rlb__cuda_quant_run(c->qset[buf], c->stream)))
        return rc;
    RLB_CUDA_CHECK(cudaStreamSynchronize(c->stream), rc, out);
out:
    return rc;
}

static int do_postload(cuda_backend *c)
{
    return postload_from(c, c->live);
}

static int be_postload(rlb_ebackend *b)
{
    return do_postload(cb(b));
}

/* Drops every captured decode graph (they hold the addresses of the weights they read);
 * each is captured again on its bucket's next step. */
static void drop_graphs(cuda_backend *c)
{
    for (int64_t i = 0; i < MAX_BUCKETS; i++)
        if (c->graphs[i]) {
            cudaGraphExecDestroy(c->graphs[i]);
            c->graphs[i] = NULL;
        }
}

/* Makes weight buffer `buf` the one the forward pass reads (a staged sync's switch): its
 * post-load processing runs first, into the one set of post-load copies (the engine
 * switches only between steps, so nothing reads them meanwhile); then the decode graphs,
 * which hold the previous buffer's addresses, are dropped. On failure the live buffer
 * stays, but its copies may be half rewritten: the caller binds it again (set_weights of
 * the live buffer runs its post-load processing anew). */
static int switch_weights(cuda_backend *c, int buf)
{
    int rc = postload_from(c, buf);
    if (rc)
        return rc;
    if (buf != c->live) {
        c->live = buf;
        drop_graphs(c);
    }
    return 0;
}

/* `weights` is one of the backend's own weight buffers (a device address): the forward
 * pass switches to it; anything else is a host copy of the layout, bound and uploaded into
 * the live buffer at every post-load processing. */
static int be_set_weights(rlb_ebackend *b, const void *weights)
{
    cuda_backend *c = cb(b);
    if (!weights)
        return RLB_EINVAL;
    for (int i = 0; i < c->n_wreg; i++)
        if ((uintptr_t)weights == c->wreg[i].va)
            return switch_weights(c, i);
    c->host_weights = weights;
    return do_postload(c);
}

/* ---- GEMM ---------------------------------------------------------------------------------- */

static cudaDataType_t cuda_type(rlb_dtype dt)
{
    return dt == RLB_DTYPE_BF16 ? CUDA_R_16BF : dt == RLB_DTYPE_F16 ? CUDA_R_16F : CUDA_R_32F;
}

static void plan_destroy(gemm_plan *p)
{
    if (!p->m)
        return;
    cublasLtMatrixLayoutDestroy(p->a);
    cublasLtMatrixLayoutDestroy(p->b);
    cublasLtMatrixLayoutDestroy(p->c);
    cublasLtMatmulDescDestroy(p->op);
    memset(p, 0, sizeof *p);
}

/* Batch-invariant mode: the algorithm of (m, maximum rows, p->k) among those without a
 * split-K reduction, split-K forced to 1, checked against p's own row count. The heuristic
 * is a function of the shape, so every row count of (m, k) gets the same algorithm. */
static int invariant_algo(cuda_backend *c, gemm_plan *p, int64_t m,
                          cublasLtMatmulPreference_t pref, cublasLtMatmulHeuristicResult_t *res,
                          int *found)
{
    int rc = 0;
    cublasLtMatrixLayout_t b = NULL, y = NULL;
    const cudaDataType_t in = cuda_type(c->dt);
    const uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
    const int32_t one = 1;
    *found = 0;
    RLB_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
                     pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &none, sizeof none),
                 rc, out);
    RLB_LT_CHECK(cublasLtMatrixLayoutCreate(&b, in, (uint64_t)p->k, (uint64_t)c->R, p->k), rc, out);
    RLB_LT_CHECK(cublasLtMatrixLayoutCreate(&y, CUDA_R_32F, (uint64_t)m, (uint64_t)c->R, m), rc,
                 out);
    RLB_LT_CHECK(cublasLtMatmulAlgoGetHeuristic(c->lt, p->op, p->a, b, y, y, pref, 1, res, found),
                 rc, out);
    if (!*found)
        goto out;
    RLB_LT_CHECK(cublasLtMatmulAlgoConfigSetAttribute(&res->algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
                                                      &one, sizeof one),
                 rc, out);
    if (cublasLtMatmulAlgoCheck(c->lt, p->op, p->a, p->b, p->c, p->c, &res->algo, res) !=
        CUBLAS_STATUS_SUCCESS) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "batch-invariant GEMM: the algorithm of %lld x %lld x "
                      "%lld does not take %lld rows", (long long)m, (long long)c->R,
                      (long long)p->k, (long long)p->n);
        *found = 0;
    }
out:
    if (b)
        cublasLtMatrixLayoutDestroy(b);
    if (y)
        cublasLtMatrixLayoutDestroy(y);
    return rc;
}

/* The cached plan of (m, n, k, ldc), made on first use. */
static int plan_get(cuda_backend *c, int64_t m, int64_t n, int64_t k, int64_t ldc,
                    gemm_plan **out)
{
    int64_t h = (m * 31 + n * 17 + k * 7 + ldc) % GEMM_PLANS;
    gemm_plan *p = NULL;
    for (int64_t i = 0; i < GEMM_PLANS; i++) {
        gemm_plan *q = &c->plans[(h + i) % GEMM_PLANS];
        if (q->m == m && q->n == n && q->k == k && q->ldc == ldc) {
            *out = q;
            return 0;
        }
        if (!q->m) {
            p = q;
            break;
        }
    }
    if (!p) { /* full: reuse the home slot */
        p = &c->plans[h];
        plan_destroy(p);
    }
    int rc = 0;
    cublasLtMatmulPreference_t pref = NULL;
    const cudaDataType_t in = cuda_type(c->dt);
    const cublasOperation_t tr = CUBLAS_OP_T, nt = CUBLAS_OP_N;
    p->n = n, p->k = k; /* p->m stays 0 (an unused entry) until the plan is complete */
    RLB_LT_CHECK(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), rc, err);
    RLB_LT_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &tr, sizeof tr),
                 rc, err_op);
    RLB_LT_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof nt),
                 rc, err_op);
    RLB_LT_CHECK(cublasLtMatrixLayoutCreate(&p->a, in, (uint64_t)k, (uint64_t)m, k), rc, err_op);
    RLB_LT_CHECK(cublasLtMatrixLayoutCreate(&p->b, in, (uint64_t)k, (uint64_t)n, k), rc, err_a);
    RLB_LT_CHECK(cublasLtMatrixLayoutCreate(&p->c, CUDA_R_32F, (uint64_t)m, (uint64_t)n, ldc), rc,
                 err_b);
    RLB_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref), rc, err_c);
    uint64_t ws = LT_WORKSPACE;
    RLB_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
                     pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws),
                 rc, err_pref);
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    if (c->opts.batch_invariant) {
        if ((rc = invariant_algo(c, p, m, pref, &res, &found)))
            goto err_pref;
    } else {
        RLB_LT_CHECK(cublasLtMatmulAlgoGetHeuristic(c->lt, p->op, p->a, p->b, p->c, p->c, pref, 1,
                                                    &res, &found),
                     rc, err_pref);
    }
    if (!found) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "cuBLASLt has no algorithm for %lld x %lld x %lld",
                      (long long)m, (long long)n, (long long)k);
        rc = RLB_ECUDA;
        goto err_pref;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    p->algo = res.algo;
    p->m = m, p->n = n, p->k = k, p->ldc = ldc;
    *out = p;
    return 0;
err_pref:
    cublasLtMatmulPreferenceDestroy(pref);
err_c:
    cublasLtMatrixLayoutDestroy(p->c);
err_b:
    cublasLtMatrixLayoutDestroy(p->b);
err_a:
    cublasLtMatrixLayoutDestroy(p->a);
err_op:
    cublasLtMatmulDescDestroy(p->op);
err:
    memset(p, 0, sizeof *p);
    return rc;
}

/* Times the first TUNE_ALGOS candidates of p's heuristic, y = x . w[i]^T for the nw
 * weights in turn (one untimed product first: a refused or failing candidate drops out;
 * then the best of two timed passes), and keeps the fastest in p->algo, the heuristic's
 * first unless another is faster by more than TUNE_MARGIN. Outside a capture only: it
 * waits on the stream. */
static int plan_tune(cuda_backend *c, gemm_plan *p, const void *const *w, int nw,
                     const void *x, float *y)
{
    int rc = 0, found = 0, pick = 0;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t res[TUNE_ALGOS];
    cudaEvent_t ev[2] = {NULL, NULL};
    float t[TUNE_ALGOS];
    const float one = 1.0f, zero = 0.0f;
    uint64_t ws = LT_WORKSPACE;
    RLB_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref), rc, out);
    RLB_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
                     pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws),
                 rc, out);
    RLB_LT_CHECK(cublasLtMatmulAlgoGetHeuristic(c->lt, p->op, p->a, p->b, p->c, p->c, pref,
                                                TUNE_ALGOS, res, &found),
                 rc, out);
    RLB_CUDA_CHECK(cudaEventCreate(&ev[0]), rc, out);
    RLB_CUDA_CHECK(cudaEventCreate(&ev[1]), rc, out);
    for (int a = 0; a < found; a++) {
        t[a] = INFINITY;
        if (cublasLtMatmul(c->lt, p->op, &one, w[0], p->a, x, p->b, &zero, y, p->c, y, p->c,
                           &res[a].algo, c->lt_ws, LT_WORKSPACE,
                           c->stream) != CUBLAS_STATUS_SUCCESS)
            continue;
        for (int pass = 0; pass < 2; pass++) {
            float ms = 0.0f;
            int bad = 0;
            RLB_CUDA_CHECK(cudaEventRecord(ev[0], c->stream), rc, out);
            for (int i = 0; i < nw && !bad; i++)
                bad = cublasLtMatmul(c->lt, p->op, &one, w[i], p->a, x, p->b, &zero, y, p->c, y,
                                     p->c, &res[a].algo, c->lt_ws, LT_WORKSPACE,
                                     c->stream) != CUBLAS_STATUS_SUCCESS;
            RLB_CUDA_CHECK(cudaEventRecord(ev[1], c->stream), rc, out);
            RLB_CUDA_CHECK(cudaEventSynchronize(ev[1]), rc, out);
            RLB_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]), rc, out);
            if (bad) {
                t[a] = INFINITY;
                break;
            }
            t[a] = ms < t[a] ? ms : t[a];
        }
        if (a > 0 && t[a] < t[pick] && (pick > 0 || t[a] < TUNE_MARGIN * t[0]))
            pick = a;
    }
    if (found > 0 && isfinite(t[pick])) {
        p->algo = res[pick].algo;
        RLB_LOG_DEBUG(RLB_SUB_ENGINE,
                      "GEMM %lld x %lld x %lld: candidate %d of %d, %.1f us (the heuristic's "
                      "first %.1f us)", (long long)p->m, (long long)p->n, (long long)p->k, pick,
                      found, 1e3 * t[pick] / nw, 1e3 * t[0] / nw);
    }
    p->tuned = 1;
out:
    for (int i = 0; i < 2; i++)
        if (ev[i])
            cudaEventDestroy(ev[i]);
    if (pref)
        cublasLtMatmulPreferenceDestroy(pref);
    return rc;
}

/* 1 when a product of n rows runs on the GEMV (kernels/cuda/gemv.h): few rows, weights
 * without a post-load copy (those have their own weight-only kernel). */
static int gemv_rows(const cuda_backend *c, int64_t n, const wq_copy *q)
{
    return n <= RLB_EO_GEMV_MAX_ROWS && !c->opts.no_gemv && !c->opts.batch_invariant &&
           !(q && q->q);
}

/* y[n, m] (row stride ldc) = x[n, k] . w[m, k]^T, from the post-load copy when there is. */
static int matmul(cuda_backend *c, const void *w, const wq_copy *q, const void *x, int64_t n,
                  int64_t k, int64_t m, int64_t ldc, float *y)
{
    if (n <= 0)
        return 0;
    if (gemv_rows(c, n, q) && ldc == m)
        return rlb__eo_gemv(c->stream, w, c->dt, m, k, x, n, NULL, y);
    if (q && q->q) {
        if (ldc != m)
            return RLB_EINVAL;
        return rlb__eo_matmul_wq(c->stream, x, c->dt, n, k, q->q,
                                 c->opts.quant == RLB_QUANT_INT8 ? RLB_DTYPE_I8
                                                                   : RLB_DTYPE_F8E4M3,
                                 q->scale, c->opts.quant != RLB_QUANT_FP8, m, y);
    }
    gemm_plan *p;
    int rc = plan_get(c, m, n, k, ldc, &p);
    if (rc)
        return rc;
    const float one = 1.0f, zero = 0.0f;
    RLB_LT_CHECK(cublasLtMatmul(c->lt, p->op, &one, w, p->a, x, p->b, &zero, y, p->c, y, p->c,
                                &p->algo, c->lt_ws, LT_WORKSPACE, c->stream),
                 rc, out);
out:
    return rc;
}

/* ---- The step ------------------------------------------------------------------------------- */

static int64_t buf_width(const cuda_backend *c, rlb_ebuf e)
{
    switch (e) {
    case RLB_EBUF_QKV:
        return c->qkv_rows;
    case RLB_EBUF_ATTN:
        return c->hq * c->hd;
    case RLB_EBUF_GU:
        return 2 * c->inter;
    case RLB_EBUF_ACT:
        return c->inter;
    default:
        return c->D;
    }
}

/* 1 for the buffers in the compute dtype (inputs of matrix products). */
static int buf_is_compute(rlb_ebuf e)
{
    return e == RLB_EBUF_H || e == RLB_EBUF_ATTN || e == RLB_EBUF_ACT;
}

/* dst = src . W^T (+ the QKV bias) for the weight of (kind, layer), fuse as given (NULL:
 * none; only on the GEMV). */
static int linear_issue(cuda_backend *c, rlb_wkind w, int layer, rlb_ebuf src, rlb_ebuf dst,
                        const rlb_eo_gemv_fuse *fuse)
{
    const rlb_local_tensor *t = rlb__tp_layout_find(c->base.layout, w, layer);
    int rc = fuse ? rlb__eo_gemv(c->stream, wptr(c, w, layer), c->dt, t->rows, t->cols,
                                 c->buf[src], c->rows, fuse, c->buf[dst])
                  : matmul(c, wptr(c, w, layer), wq_of(c, w, layer), c->buf[src], c->rows,
                           t->cols, t->rows, t->rows, c->buf[dst]);
    const void *bias = w == RLB_W_QKV ? wptr(c, RLB_W_QKV_BIAS, layer) : NULL;
    if (!rc && bias)
        rc = rlb__eo_bias_add(c->stream, c->buf[dst], bias, c->dt, c->rows, t->rows);
    return rc;
}

/* Issues, in its plain form, whatever op was deferred for a fusion that did not come. */
static int flush_pending(cuda_backend *c)
{
    int rc = 0;
    if (c->pending_rope >= 0) {
        const int layer = c->pending_rope;
        c->pending_rope = -1;
        rc = rlb__eo_rope_store(c->stream, c->buf[RLB_EBUF_QKV], c->rows, c->hq, c->dmeta.pos,
                                c->inv_freq, c->dmeta.slot, &c->cache, layer);
    }
    if (!rc && c->pending_norm) {
        const void *w = c->pending_norm;
        c->pending_norm = NULL;
        rc = rlb__eo_rmsnorm(c->stream, c->buf[RLB_EBUF_X], NULL, w, c->dt, c->rows, c->D,
                             c->eps, c->buf[RLB_EBUF_H], c->dt);
    }
    if (!rc && c->pending_proj_kind >= 0) {
        const rlb_wkind w = (rlb_wkind)c->pending_proj_kind;
        c->pending_proj_kind = -1;
        rc = linear_issue(c, w, c->pending_proj_layer, (rlb_ebuf)c->pending_proj_src,
                          RLB_EBUF_PROJ, NULL);
    }
    if (!rc && c->pending_add >= 0) {
        int src = c->pending_add;
        c->pending_add = -1;
        rc = rlb__eo_add(c->stream, c->buf[RLB_EBUF_X], c->buf[src], c->rows * c->D);
    }
    return rc;
}

/* The smallest bucket holding n decode rows, or -1. */
static int bucket_of(const cuda_backend *c, int64_t n)
{
    for (int64_t i = 0; i < c->n_buckets; i++)
        if (c->bucket_size[i] >= n)
            return (int)i;
    return -1;
}

static int abort_capture(cuda_backend *c)
{
    enum cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(c->stream, &st) == cudaSuccess &&
        st != cudaStreamCaptureStatusNone)
        c->capturing = 1;
    return step_fail(c, c->capturing ? RLB_ECUDA : 0);
}

/* 1 once a T > 1 backend has its group's communicator. */
static int tp_joined(const cuda_backend *c)
{
#ifdef RLB_HAVE_NCCL
    return c->nccl != NULL;
#else
    (void)c;
    return 0;
#endif
}

static int be_begin(rlb_ebackend *b, const rlb_ebatch *bt, struct rlb_kvcache *kv)
{
    cuda_backend *c = cb(b);
    int rc = 0;
    abort_capture(c);
    c->have_step = 0;
    c->pending_add = -1;
    c->pending_norm = NULL;
    c->pending_proj_kind = -1;
    c->act_ready = 0;
    c->pending_rope = -1;
    if (!bt || !kv || !kv->k || bt->rows < 1 || bt->n_spans < 1 || bt->out < 0 ||
        bt->out > bt->rows || kv->n_layers != c->n_layers || kv->kvt != c->kvt ||
        kv->hd != c->hd)
        return RLB_EINVAL;
    if (c->weights_asleep)
        return RLB_EINVAL;
    if (c->T > 1 && !tp_joined(c)) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "TP rank %d of %d has not joined its group's NCCL "
                      "communicator (rlb__cuda_backend_join_tp)", c->rank, c->T);
        return RLB_EINVAL;
    }
    if (bt->rows > c->R || bt->n_spans > c->S || bt->out > c->O ||
        bt->max_blocks * bt->n_spans > c->B * c->S) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE,
                      "step of %lld rows, %lld spans, %lld logits rows, %lld blocks per span "
                      "exceeds the backend's maximum (%lld, %lld, %lld, %lld on average)",
                      (long long)bt->rows, (long long)bt->n_spans, (long long)bt->out,
                      (long long)bt->max_blocks, (long long)c->R, (long long)c->S,
                      (long long)c->O, (long long)c->B);
        return RLB_ETOOBIG;
    }
    for (int64_t r = 0; r < bt->rows; r++)
        if (bt->tokens[r] < 0 || bt->tokens[r] >= c->V)
            return RLB_EINVAL;
    const int one_token_spans = bt->decode_only && bt->n_spans == bt->rows; /* decode */
    const int graphable = c->opts.graphs && one_token_spans && bt->out == bt->rows;
    c->bucket = graphable ? bucket_of(c, bt->rows) : -1;
    const int64_t rows = c->bucket >= 0 ? c->bucket_size[c->bucket] : bt->rows;
    const int64_t spans = c->bucket >= 0 ? rows : bt->n_spans;
    const int64_t out = c->bucket >= 0 ? rows : bt->out;

    /* the previous copy must have read the staging before it is rewritten */
    RLB_CUDA_CHECK(cudaEventSynchronize(c->meta_done), rc, out);
    step_meta *h = &c->hmeta;
    memcpy(h->tokens, bt->tokens, (size_t)bt->rows * 4);
    memcpy(h->pos, bt->pos, (size_t)bt->rows * 4);
    memcpy(h->slot, bt->slot, (size_t)bt->rows * 8);
    memcpy(h->span_row0, bt->span_row0, (size_t)bt->n_spans * 4);
    memcpy(h->span_n, bt->span_n, (size_t)bt->n_spans * 4);
    for (int64_t r = bt->rows; r < rows; r++) { /* padding rows: one-row spans */
        h->tokens[r] = 0;
        h->pos[r] = -1;
        h->slot[r] = -1;
        h->span_row0[r] = (int32_t)r;
        h->span_n[r] = 1;
    }
    /* the tables keep the batch's own stride (at least 1, for the padding spans) */
    const int64_t stride = bt->max_blocks > 0 ? bt->max_blocks : 1;
    if (stride * spans > c->B * c->S)
        return RLB_ETOOBIG;
    int64_t qb = 0, grp = c->grp;
    h->bt_stride[0] = (int32_t)stride;
    memcpy(h->block_tables, bt->block_tables, (size_t)(bt->n_spans * bt->max_blocks) * 4);
    for (int64_t s = 0; s < spans; s++) {
        h->span_qb0[s] = (int32_t)qb;
        qb += rlb__eo_attn_qblocks(h->span_n[s], grp);
        if (s >= bt->n_spans)
            h->block_tables[s * stride] = 0;
    }
    h->span_qb0[spans] = (int32_t)qb;
    for (int64_t o = 0; o < out; o++)
        h->out_rows[o] = o < bt->out ? bt->out_rows[o] : (int32_t)o;
    const uint64_t used =
        (uint64_t)((char *)(h->block_tables + spans * stride) - (char *)c->hmeta_mem);
    RLB_CUDA_CHECK(cudaMemcpyAsync(c->dmeta_mem, c->hmeta_mem, used, cudaMemcpyHostToDevice,
                                   c->stream),
                   rc, out);
    RLB_CUDA_CHECK(cudaEventRecord(c->meta_done, c->stream), rc, out);

    c->rows = rows;
    c->n_spans = spans;
    c->out = out;
    c->real_out = bt->out;
    c->qblocks = qb;
    c->bt_stride = stride;
    c->splits = c->opts.batch_invariant
                    ? 1
                    : rlb__eo_attn_splits(qb * c->kvt, bt->decode_only ? 0 : bt->max_ctx, c->sms,
                                          rows, c->hq, c->ws_vectors);
    /* not in batch-invariant mode: the kernel choice would depend on the step's other rows */
    c->one_row = one_token_spans && !c->opts.batch_invariant && c->opts.classic_attention != 1;
    c->fuse_rope = one_token_spans &&
                   (c->opts.fused_rope > 0 || (c->opts.fused_rope == 0 && c->splits == 1));
    c->cache = (rlb_eo_cache){kv->k, kv->v, c->dt, c->n_layers, c->kvt,
                              c->hd, kv->block_tokens};
    c->have_step = 1;
out:
    return rc;
}

/* Before a bucket's capture: the plans of its cuBLASLt products (those linear_issue and
 * be_logits issue in a decode step of c->rows rows), each timed once (plan_tune). */
static int tune_bucket(cuda_backend *c)
{
    static const struct {
        rlb_wkind w;
        rlb_ebuf src, dst;
    } lin[4] = {{RLB_W_QKV, RLB_EBUF_H, RLB_EBUF_QKV},
                {RLB_W_O, RLB_EBUF_ATTN, RLB_EBUF_PROJ},
                {RLB_W_GATE_UP, RLB_EBUF_H, RLB_EBUF_GU},
                {RLB_W_DOWN, RLB_EBUF_ACT, RLB_EBUF_PROJ}};
    if (c->opts.batch_invariant || c->opts.gemm_tune < 0 || gemv_rows(c, c->rows, NULL))
        return 0;
    const void **w = malloc((size_t)c->n_layers * sizeof *w);
    if (!w)
        return RLB_ENOMEM;
    int rc = 0;
    gemm_plan *p;
    for (int i = 0; i < 4 && !rc; i++) {
        const rlb_local_tensor *t = rlb__tp_layout_find(c->base.layout, lin[i].w, 0);
        const wq_copy *q = wq_of(c, lin[i].w, 0);
        if (!t || (q && q->q) || (rc = plan_get(c, t->rows, c->rows, t->cols, t->rows, &p)) ||
            p->tuned)
            continue;
        for (int l = 0; l < c->n_layers; l++)
            w[l] = wptr(c, lin[i].w, l);
        rc = plan_tune(c, p, w, c->n_layers, c->buf[lin[i].src], c->buf[lin[i].dst]);
    }
    free(w);
    const rlb_wkind hk = head_kind(c);
    const wq_copy *q = wq_of(c, hk, -1);
    const int64_t m = c->T == 1 ? c->V : c->vl;
    if (rc || (q && q->q) || (rc = plan_get(c, m, c->out, c->D, m, &p)) || p->tuned)
        return rc;
    const void *head = wptr(c, hk, -1);
    return plan_tune(c, p, &head, 1, c->hsel, c->T == 1 ? c->logits : c->loc);
}

static int be_graph_begin(rlb_ebackend *b)
{
    cuda_backend *c = cb(b);
    int rc = 0;
    if (!c->have_step || c->bucket < 0)
        return 0;
    if (c->graphs[c->bucket])
        return 1;
    if ((rc = tune_bucket(c)))
        return rc;
    RLB_CUDA_CHECK(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal), rc,
                   out);
    c->capturing = 1;
out:
    return rc;
}

static int be_graph_end(rlb_ebackend *b)
{
    cuda_backend *c = cb(b);
    int rc = 0;
    if (!c->have_step || c->bucket < 0)
        return 0;
    if (c->capturing) {
        if ((rc = flush_pending(c)))
            return step_fail(c, rc);
        cudaGraph_t g = NULL;
        c->capturing = 0;
        RLB_CUDA_CHECK(cudaStreamEndCapture(c->stream, &g), rc, out);
        cudaError_t e = cudaGraphInstantiate(&c->graphs[c->bucket], g, 0);
        cudaGraphDestroy(g);
        if (e != cudaSuccess) {
            RLB_LOG_ERROR(RLB_SUB_ENGINE, "graph of bucket %lld: %s",
                          (long long)c->bucket_size[c->bucket], cudaGetErrorString(e));
            c->graphs[c->bucket] = NULL;
            return RLB_ECUDA;
        }
        RLB_LOG_DEBUG(RLB_SUB_ENGINE, "captured the decode graph of batch bucket %lld",
                      (long long)c->bucket_size[c->bucket]);
    }
    RLB_CUDA_CHECK(cudaGraphLaunch(c->graphs[c->bucket], c->stream), rc, out);
out:
    return rc;
}

static int be_embed(rlb_ebackend *b)
{
    cuda_backend *c = cb(b);
    int rc = flush_pending(c);
    if (!rc)
        rc = rlb__eo_embed(c->stream, wptr(c, RLB_W_EMBED, -1), c->dt, c->vocab0, c->vl, c->D,
                           c->dmeta.tokens, c->rows, c->buf[RLB_EBUF_X]);
    if (!rc && c->T > 1)
        rc = b->iface->allreduce(b, RLB_EBUF_X);
    return step_fail(c, rc);
}

static int be_rmsnorm(rlb_ebackend *b, rlb_ebuf src, rlb_wkind w, int layer, rlb_ebuf dst)
{
    cuda_backend *c = cb(b);
    const void *wp = wptr(c, w, w == RLB_W_FINAL_NORM ? -1 : layer);
    if (src != RLB_EBUF_X || !wp || (dst != RLB_EBUF_X && dst != RLB_EBUF_H))
        return step_fail(c, RLB_EINVAL);
    const rlb_dtype ydt = dst == RLB_EBUF_H ? c->dt : RLB_DTYPE_F32;
    /* the pending add into X is this norm's to absorb: flush_pending would issue it alone
     * (what else is pending came after it and does not touch X) */
    const int a = c->pending_add;
    c->pending_add = -1;
    int rc = flush_pending(c);
    if (rc)
        return step_fail(c, rc);
    if (dst == RLB_EBUF_H && a < 0 && gemv_rows(c, c->rows, NULL)) {
        c->pending_norm = wp; /* the next linear from H reads X with the norm fused */
        return 0;
    }
    if (a >= 0) {
        rc = rlb__eo_add_rmsnorm(c->stream, c->buf[RLB_EBUF_X], c->buf[a], wp, c->dt, c->rows,
                                 c->D, c->eps, c->buf[dst], ydt);
    } else {
        rc = rlb__eo_rmsnorm(c->stream, c->buf[RLB_EBUF_X], NULL, wp, c->dt, c->rows, c->D,
                             c->eps, c->buf[dst], ydt);
    }
    return step_fail(c, rc);
}

static int be_linear(rlb_ebackend *b, rlb_wkind w, int layer, rlb_ebuf src, rlb_ebuf dst)
{
    cuda_backend *c = cb(b);
    const rlb_local_tensor *t = rlb__tp_layout_find(b->layout, w, layer);
    if (!t || !buf_is_compute(src) || buf_is_compute(dst) || t->cols != buf_width(c, src) ||
        t->rows != buf_width(c, dst))
        return step_fail(c, RLB_EINVAL);
    const int gemv = gemv_rows(c, c->rows, wq_of(c, w, layer));
    /* gate_up on the GEMV writes the activation down_proj reads as well */
    void *act = gemv && w == RLB_W_GATE_UP && dst == RLB_EBUF_GU ? c->buf[RLB_EBUF_ACT] : NULL;
    if (gemv && src == RLB_EBUF_H && c->pending_norm) {
        rlb_eo_gemv_fuse f = {.norm_x = c->buf[RLB_EBUF_X], .norm_w = c->pending_norm,
                              .eps = c->eps, .swiglu_out = act};
        c->pending_norm = NULL;
        c->act_ready = act != NULL;
        return step_fail(c, linear_issue(c, w, layer, src, dst, &f));
    }
    int rc = flush_pending(c);
    if (!rc && gemv && dst == RLB_EBUF_PROJ && c->T == 1 && w != RLB_W_QKV) {
        c->pending_proj_kind = (int)w; /* the add(X, PROJ) that follows fuses with it */
        c->pending_proj_layer = layer;
        c->pending_proj_src = (int)src;
        return 0;
    }
    rlb_eo_gemv_fuse f = {.swiglu_out = act};
    c->act_ready = act != NULL;
    if (!rc)
        rc = linear_issue(c, w, layer, src, dst, act ? &f : NULL);
    return step_fail(c, rc);
}

static int be_rope_store(rlb_ebackend *b, int layer)
{
    cuda_backend *c = cb(b);
    int rc = flush_pending(c);
    if (!rc && c->fuse_rope)
        c->pending_rope = layer; /* the attention kernel of this layer does it */
    else if (!rc)
        rc = rlb__eo_rope_store(c->stream, c->buf[RLB_EBUF_QKV], c->rows, c->hq, c->dmeta.pos,
                                c->inv_freq, c->dmeta.slot, &c->cache, layer);
    return step_fail(c, rc);
}

static int be_attention(rlb_ebackend *b, int layer)
{
    cuda_backend *c = cb(b);
    const int rope = c->pending_rope == layer;
    if (rope)
        c->pending_rope = -1;
    int rc = flush_pending(c);
    rlb_eo_attn a = {
        .qkv = c->buf[RLB_EBUF_QKV],
        .pos = c->dmeta.pos,
        .rows = c->rows,
        .hq = c->hq,
        .n_spans = c->n_spans,
        .span_row0 = c->dmeta.span_row0,
        .span_n = c->dmeta.span_n,
        .span_qb0 = c->dmeta.span_qb0,
        .qblocks = c->qblocks,
        .block_tables = c->dmeta.block_tables,
        .bt_stride = c->bt_stride,
        .bt_stride_dev = c->dmeta.bt_stride,
        .scale = c->attn_scale,
        .splits = c->splits,
        .partial = c->partial,
        .inv_freq = rope ? c->inv_freq : NULL,
        .slot = rope ? c->dmeta.slot : NULL,
        .out = c->buf[RLB_EBUF_ATTN],
        .out_dt = c->dt,
        .one_row = c->one_row,
    };
    if (!rc)
        rc = rlb__eo_attention(c->stream, &a, &c->cache, layer);
    return step_fail(c, rc);
}

static int be_swiglu(rlb_ebackend *b)
{
    cuda_backend *c = cb(b);
    int rc = flush_pending(c);
    if (!rc && c->act_ready) {
        c->act_ready = 0; /* the gate_up GEMV wrote ACT */
        return 0;
    }
    if (!rc)
        rc = rlb__eo_swiglu(c->stream, c->buf[RLB_EBUF_GU], c->rows, c->inter,
                            c->buf[RLB_EBUF_ACT], c->dt);
    return step_fail(c, rc);
}

static int be_add(rlb_ebackend *b, rlb_ebuf dst, rlb_ebuf src)
{
    cuda_backend *c = cb(b);
    if (buf_is_compute(dst) || buf_is_compute(src) || buf_width(c, dst) != c->D ||
        buf_width(c, src) != c->D || dst == src)
        return step_fail(c, RLB_EINVAL);
    if (dst == RLB_EBUF_X && src == RLB_EBUF_PROJ && c->pending_proj_kind >= 0 &&
        !c->pending_norm && c->pending_add < 0) {
        rlb_eo_gemv_fuse f = {.residual = c->buf[RLB_EBUF_X]};
        const rlb_wkind w = (rlb_wkind)c->pending_proj_kind;
        c->pending_proj_kind = -1;
        return step_fail(c, linear_issue(c, w, c->pending_proj_layer,
                                         (rlb_ebuf)c->pending_proj_src, RLB_EBUF_PROJ, &f));
    }
    int rc = flush_pending(c);
    if (rc)
        return step_fail(c, rc);
    if (dst == RLB_EBUF_X) {
        c->pending_add = src;
        return 0;
    }
    return step_fail(c, rlb__eo_add(c->stream, c->buf[dst], c->buf[src], c->rows * c->D));
}

static int be_allreduce(rlb_ebackend *b, rlb_ebuf buf)
{
    cuda_backend *c = cb(b);
    if (buf_is_compute(buf))
        return step_fail(c, RLB_EINVAL);
    if (c->T == 1) /* nothing to sum: deferred ops stay deferred */
        return 0;
    int rc = flush_pending(c);
    if (rc)
        return step_fail(c, rc);
#ifdef RLB_HAVE_NCCL
    ncclResult_t nr = ncclAllReduce(c->buf[buf], c->buf[buf],
                                    (size_t)(c->rows * buf_width(c, buf)), ncclFloat, ncclSum,
                                    c->nccl, c->stream);
    if (nr != ncclSuccess) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "ncclAllReduce: %s", ncclGetErrorString(nr));
        rc = RLB_ECUDA;
    }
#else
    rc = RLB_EUNSUPPORTED;
#endif
    return step_fail(c, rc);
}

static int be_logits(rlb_ebackend *b)
{
    cuda_backend *c = cb(b);
    int rc = flush_pending(c);
    if (rc || c->out == 0)
        return step_fail(c, rc);
    const rlb_wkind hk = head_kind(c);
    if (c->T == 1 && c->out == c->rows && gemv_rows(c, c->out, wq_of(c, hk, -1))) {
        /* out == rows: every row's logits, in order (out_rows ascends), so X is the input */
        rlb_eo_gemv_fuse f = {.norm_x = c->buf[RLB_EBUF_X],
                              .norm_w = wptr(c, RLB_W_FINAL_NORM, -1), .eps = c->eps};
        return step_fail(c, rlb__eo_gemv(c->stream, wptr(c, hk, -1), c->dt, c->V, c->D, NULL,
                                         c->out, &f, c->logits));
    }
    rc = rlb__eo_rmsnorm(c->stream, c->buf[RLB_EBUF_X], c->dmeta.out_rows,
                         wptr(c, RLB_W_FINAL_NORM, -1), c->dt, c->out, c->D, c->eps, c->hsel,
                         c->dt);
    if (!rc && c->T == 1)
        rc = matmul(c, wptr(c, hk, -1), wq_of(c, hk, -1), c->hsel, c->out, c->D, c->V, c->V,
                    c->logits);
    if (rc || c->T == 1)
        return step_fail(c, rc);
    rc = matmul(c, wptr(c, hk, -1), wq_of(c, hk, -1), c->hsel, c->out, c->D, c->vl, c->vl,
                c->loc);
#ifdef RLB_HAVE_NCCL
    if (!rc) {
        ncclResult_t nr = ncclAllGather(c->loc, c->gath, (size_t)(c->out * c->vl), ncclFloat,
                                        c->nccl, c->stream);
        if (nr != ncclSuccess) {
            RLB_LOG_ERROR(RLB_SUB_ENGINE, "ncclAllGather: %s", ncclGetErrorString(nr));
            rc = RLB_ECUDA;
        }
    }
#endif
    if (!rc)
        rc = rlb__eo_cut_logits(c->stream, c->gath, c->T, c->out, c->vl, c->V, c->logits);
    return step_fail(c, rc);
}

static int sync_step(cuda_backend *c)
{
    int rc = 0;
    RLB_CUDA_CHECK(cudaStreamSynchronize(c->stream), rc, out);
out:
    return rc;
}

static int be_read_logits(rlb_ebackend *b, float *host)
{
    cuda_backend *c = cb(b);
    int rc = 0;
    if (!c->have_step || c->capturing || !host)
        return RLB_EINVAL;
    if (c->real_out)
        RLB_CUDA_CHECK(cudaMemcpyAsync(host, c->logits, (size_t)(c->real_out * c->V) * 4,
                                       cudaMemcpyDeviceToHost, c->stream),
                       rc, out);
    rc = sync_step(c);
out:
    return rc;
}

/* Every job samples on the GPU; a row the kernel refuses (a non-finite logit) is sampled
 * again on the host, whose rules for NaN and infinities (sample.h) decide it. */
static int be_sample(rlb_ebackend *b, const rlb_sample_job *jobs, int64_t n, int32_t *tokens,
                     float *logprobs)
{
    cuda_backend *c = cb(b);
    int rc = 0;
    if (!c->have_step || c->capturing || n < 0 || n > c->O || (n && (!jobs || !tokens)))
        return RLB_EINVAL;
    for (int64_t j = 0; j < n; j++) {
        if (jobs[j].row < 0 || jobs[j].row >= c->real_out || rlb__sampling_check(&jobs[j].sp))
            return RLB_EINVAL;
        c->hio.jobs[j] = (rlb_eo_sample_job){.row = jobs[j].row,
                                             .temperature = jobs[j].sp.temperature,
                                             .top_k = jobs[j].sp.top_k,
                                             .seed = jobs[j].sp.seed,
                                             .sample = jobs[j].sample,
                                             .pos = jobs[j].pos,
                                             .top_p = jobs[j].sp.top_p};
    }
    if (n) {
        RLB_CUDA_CHECK(cudaMemcpyAsync(c->dio.jobs, c->hio.jobs, (size_t)n * sizeof *c->dio.jobs,
                                       cudaMemcpyHostToDevice, c->stream),
                       rc, out);
        if ((rc = rlb__eo_sample(c->stream, c->logits, c->V, c->dio.jobs, n, c->sample_work,
                                 c->dio.tokens, c->dio.logprobs, c->dio.status)))
            return rc;
        /* tokens, logprobs and status are consecutive [O] arrays in both regions */
        RLB_CUDA_CHECK(cudaMemcpyAsync(c->hio.tokens, c->dio.tokens,
                                       (size_t)((char *)(c->dio.status + c->O) -
                                                (char *)c->dio.tokens),
                                       cudaMemcpyDeviceToHost, c->stream),
                       rc, out);
    }
    if ((rc = sync_step(c)))
        return rc;
    for (int64_t j = 0; j < n; j++) {
        float lp = c->hio.logprobs[j];
        tokens[j] = c->hio.tokens[j];
        if (c->hio.status[j]) {
            RLB_CUDA_CHECK(cudaMemcpy(c->hrow, c->logits + jobs[j].row * c->V,
                                      (size_t)c->V * 4, cudaMemcpyDeviceToHost),
                           rc, out);
            if ((rc = rlb__sample_token(c->hrow, c->V, &jobs[j].sp, jobs[j].sample, jobs[j].pos,
                                        &c->ws, &tokens[j], &lp)))
                return rc;
        }
        if (logprobs)
            logprobs[j] = lp;
    }
out:
    return rc;
}

/* ---- KV storage ---------------------------------------------------------------------------- */

static void *kv_alloc(void *ctx, uint64_t bytes)
{
    cuda_backend *c = ctx;
    vmm_region *free_slot = NULL;
    for (int i = 0; i < MAX_KV_REGIONS; i++) {
        vmm_region *r = &c->kvreg[i];
        if (r->va && !r->mapped && r->asked == bytes) /* wake: the same address again */
            return vmm_map(r, c->device) ? NULL : (void *)(uintptr_t)r->va;
        if (!r->va && !free_slot)
            free_slot = r;
    }
    if (!free_slot || vmm_alloc(free_slot, bytes, c->device))
        return NULL;
    RLB_LOG_INFO(RLB_SUB_ENGINE, "KV storage: %.1f MiB mapped at a fixed address",
                 (double)free_slot->size / (1 << 20));
    return (void *)(uintptr_t)free_slot->va;
}

static void kv_release(void *ctx, void *p, uint64_t bytes)
{
    cuda_backend *c = ctx;
    cudaStreamSynchronize(c->stream);
    for (int i = 0; i < MAX_KV_REGIONS; i++)
        if (c->kvreg[i].va == (CUdeviceptr)(uintptr_t)p && c->kvreg[i].asked == bytes)
            vmm_unmap(&c->kvreg[i]);
}

static int kv_copy(void *ctx, void *dst, const void *src, uint64_t bytes)
{
    cuda_backend *c = ctx;
    int rc = 0;
    RLB_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream), rc,
                   out);
out:
    return rc;
}

static rlb_kv_mem be_kv_mem(rlb_ebackend *b)
{
    return (rlb_kv_mem){kv_alloc, kv_release, kv_copy, b, (uint32_t)cb(b)->esz};
}

static int be_weights_sleep(rlb_ebackend *b)
{
    cuda_backend *c = cb(b);
    int rc = sync_step(c);
    if (rc)
        return rc;
    for (int i = 0; i < c->n_wreg; i++)
        vmm_unmap(&c->wreg[i]);
    vmm_unmap(&c->qreg);
    c->weights_asleep = 1;
    return 0;
}

static int be_weights_wake(rlb_ebackend *b)
{
    cuda_backend *c = cb(b);
    int rc;
    if (!c->weights_asleep)
        return 0;
    int mapped = 0;
    while (mapped < c->n_wreg && (rc = vmm_map(&c->wreg[mapped], c->device)) == 0)
        mapped++;
    if (mapped == c->n_wreg && c->qreg.va)
        rc = vmm_map(&c->qreg, c->device);
    if (rc) {
        while (mapped > 0)
            vmm_unmap(&c->wreg[--mapped]);
        return rc;
    }
    c->weights_asleep = 0;
    /* a bound host copy restores the bytes; otherwise the next sync rewrites them */
    return c->host_weights ? do_postload(c) : 0;
}

/* ---- Creation -------------------------------------------------------------------------------- */

static void be_destroy(rlb_ebackend *b)
{
    cuda_backend *c = cb(b);
    if (!c)
        return;
    int prev = 0;
    if (rlb__cuda_enter(c->device, &prev))
        return;
    if (c->stream) {
        abort_capture(c);
        cudaStreamSynchronize(c->stream);
    }
    for (int64_t i = 0; i < MAX_BUCKETS; i++)
        if (c->graphs[i])
            cudaGraphExecDestroy(c->graphs[i]);
    for (int i = 0; i < GEMM_PLANS; i++)
        plan_destroy(&c->plans[i]);
#ifdef RLB_HAVE_NCCL
    if (c->nccl)
        ncclCommDestroy(c->nccl);
#endif
    for (int i = 0; i < 2; i++)
        rlb__cuda_quant_free(c->qset[i]);
    for (int i = 0; i < RLB_EBUF_COUNT_; i++)
        cudaFree(c->buf[i]);
    cudaFree(c->hsel);
    cudaFree(c->loc);
    cudaFree(c->gath);
    cudaFree(c->logits);
    cudaFree(c->partial);
    cudaFree(c->sample_work);
    cudaFree(c->inv_freq);
    cudaFree(c->dmeta_mem);
    cudaFree(c->dio_mem);
    cudaFreeHost(c->hmeta_mem);
    cudaFreeHost(c->hio_mem);
    cudaFreeHost(c->hrow);
    cudaFree(c->lt_ws);
    if (c->lt)
        cublasLtDestroy(c->lt);
    if (c->meta_done)
        cudaEventDestroy(c->meta_done);
    if (c->stream)
        cudaStreamDestroy(c->stream);
    for (int i = 0; i < MAX_KV_REGIONS; i++)
        vmm_free(&c->kvreg[i]);
    for (int i = 0; i < 2; i++)
        vmm_free(&c->wreg[i]);
    vmm_free(&c->qreg);
    rlb__sample_ws_free(&c->ws);
    free(c->wq);
    free(c);
    rlb__cuda_leave(prev);
}

/* Carves `n` arrays of the given byte sizes out of base (256-byte aligned starts); with
 * base NULL only sums. Returns the total. */
static uint64_t carve(char *base, void **ptrs[], const uint64_t *sizes, int n)
{
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        if (base)
            *ptrs[i] = base + off;
        off = align_up(off + sizes[i], 256);
    }
    return off;
}

static int alloc_step_buffers(cuda_backend *c, uint64_t *bytes)
{
    int rc = 0;
    const int64_t R = c->R, O = c->O;
    for (int e = 0; e < RLB_EBUF_COUNT_; e++) {
        uint64_t n = (uint64_t)(R * buf_width(c, (rlb_ebuf)e)) *
                     (buf_is_compute((rlb_ebuf)e) ? c->esz : 4);
        RLB_CUDA_CHECK(cudaMalloc(&c->buf[e], n), rc, out);
        *bytes += n;
    }
    c->ws_vectors = c->hq * (R + 2 * (int64_t)c->sms + RLB_EO_MAX_SPLITS);
    uint64_t sizes[] = {(uint64_t)(O * c->D) * c->esz, (uint64_t)(O * c->V) * 4,
                        (uint64_t)(c->ws_vectors * (c->hd + 2)) * 4,
                        (uint64_t)(c->hd / 2 + 1) * 4, rlb__eo_sample_work_bytes(O)};
    void **ptrs[] = {&c->hsel, (void **)&c->logits, (void **)&c->partial, (void **)&c->inv_freq,
                     &c->sample_work};
    for (int i = 0; i < 5; i++) {
        RLB_CUDA_CHECK(cudaMalloc(ptrs[i], sizes[i]), rc, out);
        *bytes += sizes[i];
    }
    if (c->T > 1) {
        RLB_CUDA_CHECK(cudaMalloc((void **)&c->loc, (uint64_t)(O * c->vl) * 4), rc, out);
        RLB_CUDA_CHECK(cudaMalloc((void **)&c->gath, (uint64_t)(c->T * O * c->vl) * 4), rc, out);
        *bytes += (uint64_t)((1 + c->T) * O * c->vl) * 4;
    }
    const int64_t S = c->S, B = c->B;
    uint64_t msz[] = {(uint64_t)R * 4, (uint64_t)R * 4, (uint64_t)R * 8, (uint64_t)S * 4,
                      (uint64_t)S * 4, (uint64_t)(S + 1) * 4, (uint64_t)O * 4, 4,
                      (uint64_t)(S * B) * 4};
    void **dm[] = {(void **)&c->dmeta.tokens, (void **)&c->dmeta.pos, (void **)&c->dmeta.slot,
                   (void **)&c->dmeta.span_row0, (void **)&c->dmeta.span_n,
                   (void **)&c->dmeta.span_qb0, (void **)&c->dmeta.out_rows,
                   (void **)&c->dmeta.bt_stride, (void **)&c->dmeta.block_tables};
    void **hm[] = {(void **)&c->hmeta.tokens, (void **)&c->hmeta.pos, (void **)&c->hmeta.slot,
                   (void **)&c->hmeta.span_row0, (void **)&c->hmeta.span_n,
                   (void **)&c->hmeta.span_qb0, (void **)&c->hmeta.out_rows,
                   (void **)&c->hmeta.bt_stride, (void **)&c->hmeta.block_tables};
    c->meta_bytes = carve(NULL, dm, msz, 9);
    RLB_CUDA_CHECK(cudaMalloc(&c->dmeta_mem, c->meta_bytes), rc, out);
    RLB_CUDA_CHECK(cudaMallocHost(&c->hmeta_mem, c->meta_bytes), rc, out);
    carve(c->dmeta_mem, dm, msz, 9);
    carve(c->hmeta_mem, hm, msz, 9);
    uint64_t isz[] = {(uint64_t)O * sizeof(rlb_eo_sample_job), (uint64_t)O * 4,
                      (uint64_t)O * 4, (uint64_t)O * 4};
    /* tokens, logprobs and status back to back: one copy brings all three home */
    uint64_t io_bytes = align_up(isz[0], 256) + 3 * (uint64_t)O * 4;
    RLB_CUDA_CHECK(cudaMalloc(&c->dio_mem, io_bytes), rc, out);
    RLB_CUDA_CHECK(cudaMallocHost(&c->hio_mem, io_bytes), rc, out);
    sample_io *ios[2] = {&c->dio, &c->hio};
    char *mems[2] = {c->dio_mem, c->hio_mem};
    for (int i = 0; i < 2; i++) {
        ios[i]->jobs = (rlb_eo_sample_job *)mems[i];
        ios[i]->tokens = (int32_t *)(mems[i] + align_up(isz[0], 256));
        ios[i]->logprobs = (float *)(ios[i]->tokens + O);
        ios[i]->status = (int32_t *)(ios[i]->logprobs + O);
    }
    RLB_CUDA_CHECK(cudaMallocHost((void **)&c->hrow, (size_t)c->V * 4), rc, out);
    *bytes += c->meta_bytes + io_bytes;
out:
    return rc;
}

#ifdef RLB_HAVE_NCCL
/* The TP group's NCCL communicator from `id` (NCCL_UNIQUE_ID_BYTES; every rank passes the
 * same), on the backend's device (current). */
static int init_nccl(cuda_backend *c, const void *id_bytes)
{
    ncclUniqueId id;
    memcpy(&id, id_bytes, sizeof id);
    ncclResult_t nr = ncclCommInitRank(&c->nccl, c->T, id, c->rank);
    if (nr != ncclSuccess) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "ncclCommInitRank(rank %d of %d on GPU %d): %s%s",
                      c->rank, c->T, c->device, ncclGetErrorString(nr),
                      nr == ncclInvalidUsage ? " (NCCL takes one GPU per rank: is another "
                                               "rank of the group on the same GPU?)" : "");
        c->nccl = NULL;
        return RLB_ECUDA;
    }
    return 0;
}
#endif

/* The unique id travels as floats through the group's own communicator: a status (1: rank 0
 * made an id), then the id's bytes. */
#define ID_FLOATS (1 + (128 + sizeof(float) - 1) / sizeof(float))

int rlb__cuda_backend_join_tp(rlb_ebackend *b, rlb_tp_comm *comm)
{
    cuda_backend *c = cb(b);
    if (c->T == 1)
        return 0;
    if (!comm || comm->size != c->T || comm->rank != c->rank)
        return RLB_EINVAL;
#ifdef RLB_HAVE_NCCL
    if (c->nccl)
        return 0;
    _Static_assert(sizeof(ncclUniqueId) <= (ID_FLOATS - 1) * sizeof(float), "id room");
    float send[ID_FLOATS] = {0};
    float *recv = calloc((size_t)c->T * ID_FLOATS, sizeof *recv);
    if (!recv)
        return RLB_ENOMEM;
    if (c->rank == 0) {
        ncclUniqueId id;
        ncclResult_t nr = ncclGetUniqueId(&id);
        if (nr == ncclSuccess) {
            send[0] = 1.0f;
            memcpy(send + 1, &id, sizeof id);
        } else {
            RLB_LOG_ERROR(RLB_SUB_ENGINE, "ncclGetUniqueId: %s", ncclGetErrorString(nr));
        }
    }
    /* Every rank takes part even when rank 0 failed, so none waits for the others. */
    int rc = rlb__tp_allgather(comm, send, ID_FLOATS, recv);
    if (rc == 0 && recv[0] != 1.0f) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "TP rank 0 could not make the group's NCCL id");
        rc = RLB_ECUDA;
    }
    int prev;
    if (rc == 0 && (rc = rlb__cuda_enter(c->device, &prev)) == 0) {
        rc = init_nccl(c, recv + 1);
        rlb__cuda_leave(prev);
    }
    free(recv);
    if (rc == 0)
        RLB_LOG_INFO(RLB_SUB_ENGINE, "TP rank %d of %d joined the group's NCCL communicator "
                     "on GPU %d", c->rank, c->T, c->device);
    return rc;
#else
    RLB_LOG_ERROR(RLB_SUB_ENGINE, "TP %d: this build has no NCCL", c->T);
    return RLB_EUNSUPPORTED;
#endif
}

static const rlb_ebackend_iface_v1 cuda_iface = {
    .name = "cuda",
    .destroy = be_destroy,
    .postload = be_postload,
    .set_weights = be_set_weights,
    .begin = be_begin,
    .graph_begin = be_graph_begin,
    .graph_end = be_graph_end,
    .embed = be_embed,
    .rmsnorm = be_rmsnorm,
    .linear = be_linear,
    .rope_store = be_rope_store,
    .attention = be_attention,
    .swiglu = be_swiglu,
    .add = be_add,
    .allreduce = be_allreduce,
    .logits = be_logits,
    .read_logits = be_read_logits,
    .sample = be_sample,
    .kv_mem = be_kv_mem,
    .weights_sleep = be_weights_sleep,
    .weights_wake = be_weights_wake,
};

static int check_layout(const rlb_tp_layout *l)
{
    if (l->dtype != RLB_DTYPE_F32 && l->dtype != RLB_DTYPE_BF16 && l->dtype != RLB_DTYPE_F16) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "CUDA backend: weights of dtype %s (f32, bf16, f16 only)",
                      rlb_dtype_name(l->dtype));
        return RLB_EDTYPE;
    }
    if (!rlb__eo_head_dim_supported(l->cfg.head_dim)) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE,
                      "CUDA backend: head_dim %lld has no attention kernel (16, 24, 64 and 128 do)",
                      (long long)l->cfg.head_dim);
        return RLB_EUNSUPPORTED;
    }
    return 0;
}

/* Fails with RLB_ENOMEM, saying how much is needed and free, when `need` bytes do not fit. */
static int check_free(const char *what, uint64_t need)
{
    size_t free_b = 0, total = 0;
    if (cudaMemGetInfo(&free_b, &total) != cudaSuccess)
        return RLB_ECUDA;
    if (need <= free_b)
        return 0;
    RLB_LOG_ERROR(RLB_SUB_ENGINE,
                  "not enough device memory for %s: %.1f MiB needed, %.1f MiB free of %.1f MiB",
                  what, (double)need / (1 << 20), (double)free_b / (1 << 20),
                  (double)total / (1 << 20));
    return RLB_ENOMEM;
}

static void make_buckets(cuda_backend *c)
{
    const int64_t cap = c->S < c->O ? (c->S < c->R ? c->S : c->R) : (c->O < c->R ? c->O : c->R);
    c->n_buckets = 0;
    for (int64_t s = 1; s <= cap && c->n_buckets < MAX_BUCKETS; s = s < 8 ? 2 * s : s + 8)
        c->bucket_size[c->n_buckets++] = s;
    if (c->n_buckets < MAX_BUCKETS && (c->n_buckets == 0 || c->bucket_size[c->n_buckets - 1] < cap))
        c->bucket_size[c->n_buckets++] = cap;
}

int rlb__ebackend_cuda_create(const rlb_tp_layout *layout, const void *host_weights,
                              const rlb_cuda_backend_opts *opts, rlb_ebackend **out)
{
    *out = NULL;
    if (!layout || !opts || opts->struct_size < sizeof *opts || opts->quant < RLB_QUANT_NONE ||
        opts->quant > RLB_QUANT_FP8_CHANNEL)
        return RLB_EINVAL;
    int rc = check_layout(layout), prev = 0;
    if (rc)
        return rc;
    if ((rc = rlb__cuda_enter(opts->device, &prev)))
        return rc;
    cuda_backend *c = calloc(1, sizeof *c);
    if (!c) {
        rlb__cuda_leave(prev);
        return RLB_ENOMEM;
    }
    const rlb_model_config *cfg = &layout->cfg;
    rlb__eo_set_pdl(rlb__env_int(RLB_KNOB_CUDA_PDL) != 0);
    c->base.iface = &cuda_iface;
    c->base.layout = layout;
    c->opts = *opts;
    c->device = opts->device;
    c->dt = layout->dtype;
    c->esz = rlb_dtype_size(c->dt);
    c->D = cfg->hidden;
    c->hd = cfg->head_dim;
    c->hq = layout->hq;
    c->kvt = layout->kvt;
    c->grp = layout->hq / layout->kvt;
    c->qkv_rows = (layout->hq + 2 * layout->kvt) * cfg->head_dim;
    c->inter = cfg->intermediate / layout->tp_size;
    c->V = cfg->vocab;
    c->vl = layout->vp / layout->tp_size;
    c->vocab0 = layout->tp_rank * c->vl;
    c->n_layers = cfg->n_layers;
    c->T = layout->tp_size;
    c->rank = layout->tp_rank;
    c->eps = (float)cfg->rms_eps;
    c->attn_scale = (float)pow((double)cfg->head_dim, -0.5);
    c->R = opts->max_batch_tokens > 0 ? opts->max_batch_tokens : 2048;
    c->S = opts->max_seqs > 0 ? opts->max_seqs : 256;
    /* Blocks of 4 tokens and up: the engine's block size is not known here. */
    c->B = opts->max_blocks_per_seq > 0 ? opts->max_blocks_per_seq
                                        : (cfg->max_pos + 3) / 4 + 1;
    c->O = opts->max_logit_rows > 0 ? opts->max_logit_rows : c->S;
    c->S = c->S < c->R ? c->S : c->R;
    c->pending_add = -1;
    c->pending_proj_kind = -1;
    c->bucket = -1;
    make_buckets(c);
    uint64_t act_bytes = 0;
    float *inv = malloc((size_t)(c->hd / 2 + 1) * sizeof *inv);
    if (!inv) {
        rc = RLB_ENOMEM;
        goto err;
    }
    if ((rc = rlb__rope_inv_freq(cfg, inv))) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "CUDA backend: unsupported rope type");
        goto err_inv;
    }
    RLB_CUDA_CHECK(cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, c->device),
                   rc, err_inv);
    pthread_once(&drv_once, drv_load);
    if ((rc = drv_rc))
        goto err_inv;
    RLB_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), rc, err_inv);
    RLB_CUDA_CHECK(cudaEventCreateWithFlags(&c->meta_done, cudaEventDisableTiming), rc, err_inv);
    c->n_wreg = opts->weight_buffers > 1 ? 2 : 1;
    if ((rc = check_free("the weights", (uint64_t)c->n_wreg * layout->total_bytes)))
        goto err_inv;
    for (int i = 0; i < c->n_wreg; i++)
        if ((rc = vmm_alloc(&c->wreg[i], layout->total_bytes, c->device)))
            goto err_inv;
    if (opts->quant != RLB_QUANT_NONE && (rc = quant_setup(c)))
        goto err_inv;
    if ((rc = alloc_step_buffers(c, &act_bytes)))
        goto err_inv;
    RLB_CUDA_CHECK(cudaMemcpy(c->inv_freq, inv, (size_t)(c->hd / 2) * 4, cudaMemcpyHostToDevice),
                   rc, err_inv);
    RLB_LT_CHECK(cublasLtCreate(&c->lt), rc, err_inv);
    RLB_CUDA_CHECK(cudaMalloc(&c->lt_ws, LT_WORKSPACE), rc, err_inv);
    c->host_weights = host_weights;
    if ((rc = do_postload(c)))
        goto err_inv;
    size_t free_b = 0, total = 0;
    cudaMemGetInfo(&free_b, &total);
    RLB_LOG_INFO(RLB_SUB_ENGINE,
                 "CUDA backend on device %d, rank %d of %d: weights %d x %.1f MiB (%s), "
                 "post-load copies %.1f MiB, step buffers %.1f MiB for %lld rows / %lld spans "
                 "/ %lld logits rows, cuBLASLt workspace %u MiB, decode graphs %s (%lld "
                 "buckets up to %lld, captured on first use); %.1f MiB free of %.1f MiB for "
                 "the KV cache", c->device, c->rank, c->T, c->n_wreg,
                 (double)c->wreg[0].size / (1 << 20),
                 rlb_dtype_name(c->dt), (double)c->qreg.size / (1 << 20),
                 (double)act_bytes / (1 << 20), (long long)c->R, (long long)c->S,
                 (long long)c->O, LT_WORKSPACE >> 20, opts->graphs ? "on" : "off",
                 (long long)c->n_buckets,
                 (long long)(c->n_buckets ? c->bucket_size[c->n_buckets - 1] : 0),
                 (double)free_b / (1 << 20), (double)total / (1 << 20));
    free(inv);
    rlb__cuda_leave(prev);
    *out = &c->base;
    return 0;
err_inv:
    free(inv);
err:
    rlb__cuda_leave(prev);
    be_destroy(&c->base);
    return rc;
}

void *rlb__cuda_backend_weights(rlb_ebackend *b, int buffer)
{
    cuda_backend *c = cb(b);
    return buffer >= 0 && buffer < c->n_wreg ? (void *)(uintptr_t)c->wreg[buffer].va : NULL;
}

int rlb__cuda_backend_upload(rlb_ebackend *b, const void *host)
{
    cuda_backend *c = cb(b);
    if (!host || c->weights_asleep)
        return RLB_EINVAL;
    int rc = upload(c, host);
    if (rc)
        return rc;
    const void *bound = c->host_weights;
    c->host_weights = NULL;
    rc = do_postload(c);
    c->host_weights = bound;
    return rc;
}

int rlb__cuda_backend_export_fd(rlb_ebackend *b, int buffer, int *fd, uint64_t *bytes)
{
    cuda_backend *c = cb(b);
    int rc = 0;
    if (buffer < 0 || buffer >= c->n_wreg)
        return RLB_EINVAL;
    const vmm_region *r = &c->wreg[buffer];
    if (!r->mapped || !r->exportable)
        return RLB_EUNSUPPORTED;
    RLB_CU_CHECK(drv.export_fd(fd, r->h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0), rc, out);
    *bytes = r->size;
out:
    return rc;
}

uint64_t rlb__cuda_backend_kv_budget(rlb_ebackend *b, double gpu_memory_utilization)
{
    cuda_backend *c = cb(b);
    int prev = 0;
    size_t free_b = 0, total = 0;
    if (rlb__cuda_enter(c->device, &prev))
        return 0;
    cudaError_t e = cudaMemGetInfo(&free_b, &total);
    rlb__cuda_leave(prev);
    if (e != cudaSuccess || !(gpu_memory_utilization > 0.0 && gpu_memory_utilization <= 1.0))
        return 0;
    double allowed = (double)total * gpu_memory_utilization, used = (double)(total - free_b);
    return allowed > used ? (uint64_t)(allowed - used) : 0;
}
