/* bench_reshard_gpu: rlb-bench-reshard-gpu, the CUDA weight path at Llama-3-8B size on one
 * GPU (DESIGN §4, issue 6).
 *
 * Reshards FSDP2 shards of 8 ranks (each rank's shards packed in one buffer) into the two
 * TP-2 worker buffers (vLLM layout) with the CUDA executor: bf16 -> bf16, and f32 master
 * weights -> bf16. Its peers, in the same run: a device-to-device cudaMemcpy of the bytes
 * the plan writes (the copy floor: bytes read + written over the memcpy's read + write
 * bandwidth), and the PyTorch baseline (../shared/device/torch_reshard_baseline.py,
 * run just before in the same device call; its output is passed with --torch-log). Then
 * fp8 e4m3 post-processing of the resulting TP tensors (qkv, o, gate_up, down of every
 * layer on both ranks): per tensor (two passes: amax, then quantize; floor = 2 reads + 1
 * write) and per channel (one pass; floor = 1 read + 1 write).
 *
 * --peer (two GPUs): the FSDP2 shards spread over both GPUs (rank f on GPU f % 2), TP rank
 * d's buffer on GPU d; each GPU runs the part of the plan writing its own rank (half its
 * sources on the other GPU), both at once: through peer access, and through the staged
 * fallback (forced); against cudaMemcpyPeer, both directions at once, of the bytes each
 * GPU writes and of the bytes it reads from the other GPU.
 *
 * --lora: the same plan with LoRA adapters of rank 16 and 64 (alpha 2r) on q, k, v, o, gate,
 * up and down of every layer (FSDP2 factors like every other tensor): the copies plus the
 * GPU merge (kernels/cuda/lora_merge.h: f32 stage gather, then the fused merge writing base
 * + s*B*A once) against the plain plan's copy, and the merge part alone against its floor
 * (the merged blocks' base read and the blocks written once, at the copy's bandwidth); the
 * separate merge (RLB_LORA_MERGE=separate: base copies, then the merge in place) and the
 * merges as cuBLASLt products where their base allows (RLB_LORA_MERGE=gemm) beside it
 * -- the kernel-level view of `rlb-bench-sync --device cuda --lora`.
 *
 * --mem: the copy of `rlb-bench-sync --device cuda` (every tensor whole in one buffer ->
 * TP 1, bf16, counting NaN/Inf as the bridge does) between each kind of memory a sync
 * meets: cudaMalloc, cuMemCreate (VMM, what the GPU worker's weights are), and VMM memory
 * imported through its POSIX fd into a second mapping (what the bridge writes through), and
 * another process's cudaMalloc opened through CUDA IPC (what the bridge reads a trainer's
 * weights through); each against a cudaMemcpy between the same two buffers, back to back
 * and after an idle GPU (a sync's copy starts from idle) -- where the sync's copy loses to
 * the floor, by kind of memory.
 *
 * Prints a table, then one JSON line. Usage:
 *   rlb-bench-reshard-gpu [--torch-log FILE] [--iters N] [--peer | --lora | --mem]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <spawn.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include "bench/bench_cuda.h"
#include "bench/bench_vmm.h"
#include "common/cli_args.h"
#include "common/clock.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/lora_merge.h"
#include "kernels/cuda/plan_exec.h"
#include "kernels/cuda/quant.h"
#include "model/config.h"
#include "model/lora.h"
#include "model/params.h"
#include "model/plan.h"
#include "model/source.h"
#include "model/tp_layout.h"

extern char **environ;

#define W 8  /* FSDP ranks */
#define T 2  /* TP ranks */
#define PLAN_MEM_LIMIT (64ull << 20) /* extra device memory a pause-mode sync may take */

#define RC(call)                                                                           \
    do {                                                                                   \
        int rc_ = (call);                                                                  \
        if (rc_) {                                                                         \
            fprintf(stderr, "%s:%d: %s: %s %s\n", __FILE__, __LINE__, #call,               \
                    rlb_strerror(rc_), err);                                               \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static char err[512];
static int iters = 10;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* What one timed work does: a plan run, a memcpy or a quantization set. */
typedef struct work {
    rlb_cuda_plan *plan;    /* run this plan (then lora's merges, when set), or */
    rlb_cuda_lora *lora;    /* these merges alone, or */
    rlb_cuda_quant *quant;  /* this quantization set, or */
    void *cp_dst;           /* this memcpy (a peer copy when the devices differ) */
    const void *cp_src;
    uint64_t cp_bytes;
    int cp_dst_dev, cp_src_dev; /* GPUs of cp_dst and cp_src */
    cudaStream_t st;        /* stream (0: the current device's default) */
} work;

static void launch(const work *w)
{
    if (w->plan || w->lora) {
        if (w->plan)
            RC(rlb__cuda_plan_run(w->plan, w->st));
        if (w->lora)
            RC(rlb__cuda_lora_run(w->lora, w->st));
    } else if (w->quant)
        RC(rlb__cuda_quant_run(w->quant, w->st));
    else if (w->cp_dst_dev != w->cp_src_dev)
        CK(cudaMemcpyPeerAsync(w->cp_dst, w->cp_dst_dev, w->cp_src, w->cp_src_dev, w->cp_bytes,
                               w->st));
    else
        CK(cudaMemcpyAsync(w->cp_dst, w->cp_src, w->cp_bytes, cudaMemcpyDeviceToDevice, w->st));
}

/* Median GPU time (ms) of `iters` runs, each bracketed by events: after two warm-ups, back
 * to back (gap_us 0), or each after gap_us of an idle GPU (a sync's copy starts from idle). */
static double time_runs(const work *w, unsigned gap_us)
{
    cudaEvent_t a, b;
    double ms[64];
    int n = iters < 64 ? iters : 64;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    if (!gap_us) {
        launch(w);
        launch(w);
    }
    for (int i = 0; i < n; i++) {
        float t;
        if (gap_us) {
            CK(cudaDeviceSynchronize());
            usleep(gap_us);
        }
        CK(cudaEventRecord(a, 0));
        launch(w);
        CK(cudaEventRecord(b, 0));
        CK(cudaEventSynchronize(b));
        CK(cudaEventElapsedTime(&t, a, b));
        ms[i] = t;
    }
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    qsort(ms, (size_t)n, sizeof ms[0], cmp_double);
    return ms[n / 2];
}

static double time_median(const work *w)
{
    return time_runs(w, 0);
}

static void llama3_8b(rlb_model_config *c)
{
    rlb__config_tiny(c);
    c->hidden = 4096;
    c->intermediate = 14336;
    c->n_heads = 32;
    c->n_kv_heads = 8;
    c->head_dim = 128;
    c->n_layers = 32;
    c->vocab = 128256;
    c->max_pos = 8192;
    c->rope_theta = 500000.0;
}

/* FSDP2 source of every parameter in `dt`: rank f's shards packed in buffer f, each
 * 256-byte aligned; *bytes gets each buffer's size. */
static void fsdp2_source(const rlb_param_list *pl, rlb_dtype dt, rlb_source *src,
                         uint64_t bytes[W])
{
    const uint64_t esz = rlb_dtype_size(dt);
    rlb_src_loc *loc = calloc((size_t)pl->n * W, sizeof *loc);
    if (!loc)
        exit(1);
    memset(bytes, 0, W * sizeof bytes[0]);
    for (int64_t p = 0; p < pl->n; p++) {
        uint64_t d0 = (uint64_t)pl->params[p].rows, c = (d0 + W - 1) / W;
        for (uint32_t f = 0; f < W; f++) {
            uint64_t n_f = f * c >= d0 ? 0 : (d0 - f * c < c ? d0 - f * c : c);
            loc[p * W + f] = (rlb_src_loc){n_f ? f : RLB_SRC_NO_BUFFER, bytes[f]};
            bytes[f] = (bytes[f] + n_f * (uint64_t)pl->params[p].cols * esz + 255) / 256 * 256;
        }
    }
    RC(rlb__source_init(src, pl));
    for (uint32_t f = 0; f < W; f++)
        if (rlb__source_add_buffer(src, bytes[f]) != (int)f)
            exit(1);
    for (int64_t p = 0; p < pl->n; p++) {
        const rlb_param *pp = &pl->params[p];
        int64_t shape[2] = {pp->rows, pp->cols};
        RC(rlb__source_add_fsdp2(src, pp->name, pp->ndim, shape, dt, W, &loc[p * W], err,
                                 sizeof err));
    }
    free(loc);
}

typedef struct result {
    double ms, floor_ms, upload_ms, launch_us, plan_ms;
    double counted_ms; /* the same plan counting non-finite values (what the bridge runs) */
    uint64_t read, written, plan_dev_bytes, items, n_ops;
} result;

/* Plans, uploads and times one source dtype; copy_gbs is the memcpy's read+write GB/s.
 * When dst_out is non-NULL the destination buffers stay allocated for the caller. */
static result run_case(const rlb_param_list *pl, rlb_dtype sdt, double *copy_gbs,
                       char **dst_out, rlb_tp_layout *lay)
{
    result r = {0};
    rlb_source src;
    uint64_t sbytes[W], soff[W + 1] = {0};
    fsdp2_source(pl, sdt, &src, sbytes);
    for (int f = 0; f < W; f++)
        soff[f + 1] = soff[f] + sbytes[f];
    rlb_target tgt = {.tp_size = T, .replicas = 1, .dtype = RLB_DTYPE_BF16};
    rlb_plan plan;
    double t0 = rlb__clock_ms_f();
    RC(rlb__plan_build(&src, &tgt, &plan, err, sizeof err));
    r.plan_ms = rlb__clock_ms_f() - t0;
    char *sbase, *dbase;
    uint64_t doff[T + 1] = {0};
    for (int d = 0; d < T; d++)
        doff[d + 1] = doff[d] + (plan.dst_bytes[d] + 255) / 256 * 256;
    CK(cudaMalloc((void **)&sbase, soff[W]));
    CK(cudaMalloc((void **)&dbase, doff[T]));
    CK(cudaMemset(sbase, 0x3c, soff[W])); /* finite values in every dtype */
    CK(cudaMemset(dbase, 0, doff[T]));
    rlb_cuda_buf sb[W], db[T];
    for (int f = 0; f < W; f++)
        sb[f] = (rlb_cuda_buf){sbase + soff[f], sbytes[f]};
    for (int d = 0; d < T; d++)
        db[d] = (rlb_cuda_buf){dbase + doff[d], plan.dst_bytes[d]};
    CK(cudaDeviceSynchronize());

    rlb_cuda_plan *cp = NULL;
    t0 = rlb__clock_ms_f();
    RC(rlb__cuda_plan_upload(&plan, 0, NULL, &cp, err, sizeof err));
    RC(rlb__cuda_plan_bind(cp, sb, db, err, sizeof err));
    r.upload_ms = rlb__clock_ms_f() - t0;
    work w = {.plan = cp};
    launch(&w); /* first launch loads the module */
    CK(cudaDeviceSynchronize());
    t0 = rlb__clock_ms_f();
    launch(&w);
    r.launch_us = (rlb__clock_ms_f() - t0) * 1e3;
    CK(cudaDeviceSynchronize());
    r.ms = time_median(&w);
    RC(rlb__cuda_plan_count(cp, 1));
    r.counted_ms = time_median(&w);
    RC(rlb__cuda_plan_count(cp, 0));
    r.read = plan.bytes_read;
    r.written = plan.bytes_written;
    r.plan_dev_bytes = rlb__cuda_plan_device_bytes(cp);
    r.items = rlb__cuda_plan_items(cp);
    r.n_ops = plan.n_ops;

    if (*copy_gbs == 0) { /* the floor: a plain copy of the model's bytes */
        uint64_t n = plan.bytes_written < soff[W] ? plan.bytes_written : soff[W];
        work cw = {.cp_dst = dbase, .cp_src = sbase, .cp_bytes = n};
        double cms = time_median(&cw);
        *copy_gbs = 2.0 * (double)n / cms / 1e6;
        printf("%-28s %8.2f GB %8.2f GB %9.3f %9.0f\n", "d2d cudaMemcpy (floor)", n / 1e9,
               n / 1e9, cms, *copy_gbs);
    }
    r.floor_ms = (double)(r.read + r.written) / (*copy_gbs * 1e6);
    rlb__cuda_plan_free(cp);
    if (dst_out) {
        *dst_out = dbase;
        RC(rlb__tp_layout_init(&lay[0], &pl->cfg, T, 0, RLB_DTYPE_BF16));
        RC(rlb__tp_layout_init(&lay[1], &pl->cfg, T, 1, RLB_DTYPE_BF16));
        if (lay[0].total_bytes != plan.dst_bytes[0] || doff[1] < lay[0].total_bytes) {
            fprintf(stderr, "layout and plan disagree on the buffer size\n");
            exit(1);
        }
    } else {
        CK(cudaFree(dbase));
    }
    CK(cudaFree(sbase));
    rlb__plan_free(&plan);
    rlb__source_free(&src);
    return r;
}

typedef struct fp8_result {
    double tensor_ms, rows_ms;
    uint64_t in_bytes, out_bytes, dev_bytes;
} fp8_result;

/* fp8 of the linear tensors of both TP buffers (dbase: rank 0's buffer, rank 1's at
 * stride1), per tensor and per channel, into outputs allocated once. */
static fp8_result fp8_case(char *dbase, uint64_t stride1, const rlb_tp_layout *lay)
{
    static const rlb_wkind kinds[] = {RLB_W_QKV, RLB_W_O, RLB_W_GATE_UP, RLB_W_DOWN};
    fp8_result r = {0};
    const int n_layers = (int)lay[0].cfg.n_layers;
    const uint32_t n = (uint32_t)(T * n_layers * 4);
    rlb_cuda_quant_tensor *t = calloc(n, sizeof *t);
    uint64_t q_total = 0, s_total = 0;
    uint32_t k = 0;
    for (int rank = 0; rank < T; rank++)
        for (int l = 0; l < n_layers; l++)
            for (int j = 0; j < 4; j++, k++) {
                const rlb_local_tensor *lt = rlb__tp_layout_find(&lay[rank], kinds[j], l);
                t[k] = (rlb_cuda_quant_tensor){
                    .w = dbase + (uint64_t)rank * stride1 + lt->offset, .dtype = RLB_DTYPE_BF16,
                    .rows = lt->rows, .cols = lt->cols, .kind = RLB_QUANT_FP8_TENSOR};
                r.in_bytes += lt->bytes;
                q_total += (uint64_t)(lt->rows * lt->cols + 255) / 256 * 256;
                s_total += (uint64_t)lt->rows;
            }
    r.out_bytes = r.in_bytes / 2;
    uint8_t *q;
    float *sc;
    CK(cudaMalloc((void **)&q, q_total));
    CK(cudaMalloc((void **)&sc, s_total * sizeof(float)));
    for (int pass = 0; pass < 2; pass++) {
        uint64_t qo = 0, so = 0;
        for (k = 0; k < n; k++) {
            t[k].kind = pass ? RLB_QUANT_FP8_ROWS : RLB_QUANT_FP8_TENSOR;
            t[k].q = q + qo;
            t[k].scale = sc + so;
            qo += (uint64_t)(t[k].rows * t[k].cols + 255) / 256 * 256;
            so += (uint64_t)t[k].rows;
        }
        rlb_cuda_quant *qs = NULL;
        RC(rlb__cuda_quant_create(0, t, n, &qs, err, sizeof err));
        work w = {.quant = qs};
        double ms = time_median(&w);
        if (pass)
            r.rows_ms = ms;
        else
            r.tensor_ms = ms;
        r.dev_bytes = rlb__cuda_quant_device_bytes(qs);
        rlb__cuda_quant_free(qs);
    }
    CK(cudaFree(q));
    CK(cudaFree(sc));
    free(t);
    return r;
}

/* Reads "median X ms" of the torch reshard line and of the d2d line from the baseline's
 * output. Returns 0 when both are found. */
static int read_torch_log(const char *path, double *torch_ms, double *torch_copy_ms)
{
    FILE *f = fopen(path, "r");
    char line[512];
    *torch_ms = *torch_copy_ms = 0;
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        const char *m = strstr(line, "median ");
        double v;
        if (!m || sscanf(m, "median %lf", &v) != 1)
            continue;
        if (strstr(line, "torch reshard"))
            *torch_ms = v;
        else if (strstr(line, "d2d copy"))
            *torch_copy_ms = v;
    }
    fclose(f);
    return *torch_ms > 0 && *torch_copy_ms > 0 ? 0 : -1;
}

/* ---- --peer: two GPUs ---------------------------------------------------------------- */

/* Both GPUs' works started together, `iters` times after two warm-ups; ms[g] gets GPU g's
 * median (events on its own stream). */
static void time_two(const work w[2], double ms[2])
{
    cudaEvent_t a[2], b[2];
    double t[2][64];
    const int n = iters < 64 ? iters : 64;
    for (int g = 0; g < 2; g++) {
        CK(cudaSetDevice(g));
        CK(cudaEventCreate(&a[g]));
        CK(cudaEventCreate(&b[g]));
    }
    for (int i = -2; i < n; i++) {
        for (int g = 0; g < 2; g++) {
            CK(cudaSetDevice(g));
            CK(cudaEventRecord(a[g], w[g].st));
            launch(&w[g]);
            CK(cudaEventRecord(b[g], w[g].st));
        }
        for (int g = 0; g < 2; g++) {
            float x;
            CK(cudaSetDevice(g));
            CK(cudaEventSynchronize(b[g]));
            CK(cudaEventElapsedTime(&x, a[g], b[g]));
            if (i >= 0)
                t[g][i] = x;
        }
    }
    for (int g = 0; g < 2; g++) {
        CK(cudaSetDevice(g));
        CK(cudaEventDestroy(a[g]));
        CK(cudaEventDestroy(b[g]));
        qsort(t[g], (size_t)n, sizeof t[g][0], cmp_double);
        ms[g] = t[g][n / 2];
    }
    CK(cudaSetDevice(0));
}

typedef struct peer_result {
    double ms[2];          /* median run time on each GPU, both running */
    double upload_ms;      /* upload + bind of both parts */
    uint64_t staged[2];    /* bytes each GPU copies through its staging buffers per run */
    uint32_t windows[2];   /* staging windows per run */
    uint64_t dev_bytes[2]; /* device memory each GPU's plan holds (staging included) */
} peer_result;

/* Uploads each GPU's part of `plan` (destination d on GPU d), binds it in `mode` and times
 * both parts running at once. */
static peer_result peer_case(const rlb_plan *plan, const rlb_cuda_buf *sb, const rlb_cuda_buf *db,
                             const cudaStream_t st[2], rlb_cuda_peer_mode mode)
{
    peer_result r = {0};
    rlb_cuda_plan *cp[2];
    work w[2];
    double t0 = rlb__clock_ms_f();
    for (int g = 0; g < 2; g++) {
        uint8_t sel[T] = {0};
        sel[g] = 1;
        RC(rlb__cuda_plan_upload(plan, g, sel, &cp[g], err, sizeof err));
        RC(rlb__cuda_plan_set_peer_mode(cp[g], mode, 0));
        RC(rlb__cuda_plan_bind(cp[g], sb, db, err, sizeof err));
        w[g] = (work){.plan = cp[g], .st = st[g]};
    }
    r.upload_ms = rlb__clock_ms_f() - t0;
    time_two(w, r.ms);
    for (int g = 0; g < 2; g++) {
        r.staged[g] = rlb__cuda_plan_staged_bytes(cp[g], &r.windows[g]);
        r.dev_bytes[g] = rlb__cuda_plan_device_bytes(cp[g]);
        rlb__cuda_plan_free(cp[g]);
    }
    return r;
}

/* Peer access between the two GPUs on or off: without it cudaMemcpyPeer is routed through
 * host memory, as on machines where the GPUs have no peer path. */
static void set_peer_access(int on)
{
    for (int g = 0; g < 2; g++) {
        CK(cudaSetDevice(g));
        cudaError_t e = on ? cudaDeviceEnablePeerAccess(1 - g, 0) : cudaDeviceDisablePeerAccess(1 - g);
        if (e == cudaErrorPeerAccessAlreadyEnabled || e == cudaErrorPeerAccessNotEnabled)
            cudaGetLastError(); /* already as wanted; reset the error state */
        else
            CK(e);
    }
    CK(cudaSetDevice(0));
}

typedef struct copy_result {
    double w_bytes[2]; /* bytes of the written-bytes copy (capped at the other GPU's sources) */
    double w_ms[2];    /* its median time, both directions at once */
    double r_ms[2];    /* the same for the bytes each GPU reads from the other */
} copy_result;

/* cudaMemcpyPeer into each GPU from the other's sources: of the bytes the GPU's part
 * writes, then of the bytes it reads remotely, both directions at once. */
static copy_result peer_copies(char *const dbase[2], char *const sbase[2], const uint64_t stotal[2],
                               const double wr[2], const double remote[2], const cudaStream_t st[2])
{
    copy_result r;
    work cw[2], cr[2];
    for (int g = 0; g < 2; g++) {
        uint64_t n = (uint64_t)wr[g] < stotal[1 - g] ? (uint64_t)wr[g] : stotal[1 - g];
        r.w_bytes[g] = (double)n;
        cw[g] = (work){.cp_dst = dbase[g], .cp_src = sbase[1 - g], .cp_bytes = n,
                       .cp_dst_dev = g, .cp_src_dev = 1 - g, .st = st[g]};
        cr[g] = cw[g];
        cr[g].cp_bytes = (uint64_t)remote[g];
    }
    time_two(cw, r.w_ms);
    time_two(cr, r.r_ms);
    return r;
}

/* One table line of a plan run on GPU g; staged (may be NULL) adds its staging figures. */
static void peer_row(const char *name, int g, const double rd[2], const double wr[2],
                     const double remote[2], double ms, double vs_copy, const peer_result *staged)
{
    printf("%-26s %3d %9.2f %9.2f %9.2f %9.3f %9.0f %10.0f %8.2fx", name, g, rd[g] / 1e9,
           wr[g] / 1e9, remote[g] / 1e9, ms, (rd[g] + wr[g]) / ms / 1e6, wr[g] / ms / 1e6,
           vs_copy);
    if (staged)
        printf("  (%.2f GB staged in %u windows)", staged->staged[g] / 1e9, staged->windows[g]);
    printf("\n");
}

static int peer_main(const rlb_param_list *pl, const char *dev_name, int ndev)
{
    if (ndev < 2) {
        fprintf(stderr, "rlb-bench-reshard-gpu --peer: 2 GPUs needed, %d visible\n", ndev);
        return 77;
    }
    int can01 = 0, can10 = 0;
    CK(cudaDeviceCanAccessPeer(&can01, 0, 1));
    CK(cudaDeviceCanAccessPeer(&can10, 1, 0));
    const int peer_path = can01 && can10;
    rlb_source src;
    rlb_plan plan;
    uint64_t sbytes[W], soff[W], stotal[2] = {0, 0};
    fsdp2_source(pl, RLB_DTYPE_BF16, &src, sbytes);
    rlb_target tgt = {.tp_size = T, .replicas = 1, .dtype = RLB_DTYPE_BF16};
    RC(rlb__plan_build(&src, &tgt, &plan, err, sizeof err));
    for (int f = 0; f < W; f++) { /* FSDP rank f's shards on GPU f % 2 */
        soff[f] = stotal[f % 2];
        stotal[f % 2] += (sbytes[f] + 255) / 256 * 256;
    }
    char *sbase[2], *dbase[2];
    cudaStream_t st[2];
    for (int g = 0; g < 2; g++) {
        CK(cudaSetDevice(g));
        CK(cudaMalloc((void **)&sbase[g], stotal[g]));
        CK(cudaMalloc((void **)&dbase[g], plan.dst_bytes[g]));
        CK(cudaMemset(sbase[g], 0x3c, stotal[g]));
        CK(cudaMemset(dbase[g], 0, plan.dst_bytes[g]));
        CK(cudaStreamCreateWithFlags(&st[g], cudaStreamNonBlocking));
        CK(cudaDeviceSynchronize());
    }
    CK(cudaSetDevice(0));
    rlb_cuda_buf sb[W], db[T];
    for (int f = 0; f < W; f++)
        sb[f] = (rlb_cuda_buf){sbase[f % 2] + soff[f], sbytes[f]};
    for (int d = 0; d < T; d++)
        db[d] = (rlb_cuda_buf){dbase[d], plan.dst_bytes[d]};
    /* bytes of each GPU's part: read, written, and read from the other GPU */
    double rd[2] = {0, 0}, wr[2] = {0, 0}, remote[2] = {0, 0};
    for (uint64_t i = 0; i < plan.n_ops; i++) {
        const rlb_copy_op *op = &plan.ops[i];
        const int g = (int)op->dst_ref;
        const double n = (double)op->rows * (double)op->row_elems;
        wr[g] += n * (double)rlb_dtype_size((rlb_dtype)op->dst_dtype);
        if (op->src_ref == RLB_PLAN_ZERO_SRC)
            continue;
        rd[g] += n * (double)rlb_dtype_size((rlb_dtype)op->src_dtype);
        if ((int)(op->src_ref % 2) != g)
            remote[g] += n * (double)rlb_dtype_size((rlb_dtype)op->src_dtype);
    }
    printf("rlb-bench-reshard-gpu --peer on 2x %s: Llama-3-8B shapes, FSDP2 %d (rank f on GPU "
           "f %% 2) -> TP %d (rank d on GPU d), bf16 -> bf16, both GPUs at once; peer access: "
           "%s; median of %d\n", dev_name, W, T, peer_path ? "yes" : "no", iters);
    printf("%-26s %3s %9s %9s %9s %9s %9s %10s %9s\n", "case", "GPU", "read GB", "wrote GB",
           "remote GB", "ms", "GB/s r+w", "wrote GB/s", "vs copy");

    copy_result c_on = {0}, c_off;
    peer_result pr = {0}, sr = {0}, hr;
    if (peer_path) {
        set_peer_access(1);
        c_on = peer_copies(dbase, sbase, stotal, wr, remote, st);
        pr = peer_case(&plan, sb, db, st, RLB_CUDA_PEER_AUTO);
        sr = peer_case(&plan, sb, db, st, RLB_CUDA_PEER_STAGED);
        set_peer_access(0);
    }
    c_off = peer_copies(dbase, sbase, stotal, wr, remote, st);
    hr = peer_case(&plan, sb, db, st, RLB_CUDA_PEER_STAGED);

    double p_gbs[2], p_ratio[2], p_link[2], s_gbs[2], s_ratio[2], h_gbs[2], h_ratio[2];
    double c_gbs[2], c_rgbs[2], h_cgbs[2], s_staged[2], s_windows[2], s_dev[2];
    for (int g = 0; g < 2; g++) {
        /* the copies move w_bytes; scaled to the plan's written bytes for the ratios */
        const double on_ms = peer_path ? c_on.w_ms[g] * wr[g] / c_on.w_bytes[g] : 0;
        const double off_ms = c_off.w_ms[g] * wr[g] / c_off.w_bytes[g];
        c_gbs[g] = peer_path ? c_on.w_bytes[g] / c_on.w_ms[g] / 1e6 : 0;
        c_rgbs[g] = peer_path ? remote[g] / c_on.r_ms[g] / 1e6 : 0;
        h_cgbs[g] = c_off.w_bytes[g] / c_off.w_ms[g] / 1e6;
        p_gbs[g] = peer_path ? (rd[g] + wr[g]) / pr.ms[g] / 1e6 : 0;
        p_ratio[g] = peer_path ? on_ms / pr.ms[g] : 0;
        p_link[g] = peer_path ? c_on.r_ms[g] / pr.ms[g] : 0;
        s_gbs[g] = peer_path ? (rd[g] + wr[g]) / sr.ms[g] / 1e6 : 0;
        s_ratio[g] = peer_path ? on_ms / sr.ms[g] : 0;
        h_gbs[g] = (rd[g] + wr[g]) / hr.ms[g] / 1e6;
        h_ratio[g] = off_ms / hr.ms[g];
        s_staged[g] = (double)hr.staged[g];
        s_windows[g] = hr.windows[g];
        s_dev[g] = (double)hr.dev_bytes[g];
    }
    for (int g = 0; peer_path && g < 2; g++)
        peer_row("rlb peer access", g, rd, wr, remote, pr.ms[g], p_ratio[g], NULL);
    for (int g = 0; peer_path && g < 2; g++)
        peer_row("rlb staged, peer copies", g, rd, wr, remote, sr.ms[g], s_ratio[g], &sr);
    for (int g = 0; g < 2; g++)
        peer_row("rlb staged, host copies", g, rd, wr, remote, hr.ms[g], h_ratio[g], &hr);
    const copy_result *cs[2] = {&c_on, &c_off};
    static const char *cname[2][2] = {{"memcpyPeer written, peer", "memcpyPeer remote, peer"},
                                      {"memcpyPeer written, host", "memcpyPeer remote, host"}};
    for (int k = peer_path ? 0 : 1; k < 2; k++)
        for (int g = 0; g < 2; g++) {
            printf("%-26s %3d %9s %9.2f %9s %9.3f %9s %10.0f\n", cname[k][0], g, "",
                   cs[k]->w_bytes[g] / 1e9, "", cs[k]->w_ms[g], "",
                   cs[k]->w_bytes[g] / cs[k]->w_ms[g] / 1e6);
            printf("%-26s %3d %9s %9s %9.2f %9.3f %9s %10.0f\n", cname[k][1], g, "", "",
                   remote[g] / 1e9, cs[k]->r_ms[g], "", remote[g] / cs[k]->r_ms[g] / 1e6);
        }
    printf("vs copy: cudaMemcpyPeer time of the GPU's written bytes (same peer access setting) "
           "over the plan's time; 'host': peer access disabled, copies routed through host "
           "memory as where the GPUs have no peer path. Upload + bind of both parts: peer "
           "%.3f ms, staged %.3f ms; staged plan device memory %.1f / %.1f MiB\n", pr.upload_ms,
           hr.upload_ms, s_dev[0] / 1048576.0, s_dev[1] / 1048576.0);

    printf("{\"bench\":\"reshard_gpu_peer\",\"device\":\"2x %s\",\"model\":\"llama3-8b\","
           "\"fsdp\":%d,\"tp\":%d,\"peer_access\":%s,", dev_name, W, T,
           peer_path ? "true" : "false");
    const struct {
        const char *key;
        const double *v;
    } pairs[] = {
        {"bytes_read", rd}, {"bytes_written", wr}, {"bytes_remote", remote},
        {"peer_ms", pr.ms}, {"peer_gbs_per_gpu", p_gbs}, {"peer_vs_memcpy_peer", p_ratio},
        {"peer_fraction_of_link_floor", p_link}, {"memcpy_peer_written_ms", c_on.w_ms},
        {"memcpy_peer_written_gbs", c_gbs}, {"memcpy_peer_remote_gbs", c_rgbs},
        {"staged_ms", sr.ms}, {"staged_gbs_per_gpu", s_gbs}, {"staged_vs_memcpy_peer", s_ratio},
        {"staged_host_ms", hr.ms}, {"staged_host_gbs_per_gpu", h_gbs},
        {"staged_host_vs_memcpy_peer_host", h_ratio}, {"memcpy_peer_host_written_gbs", h_cgbs},
        {"staged_bytes", s_staged}, {"staged_windows", s_windows},
        {"staged_device_bytes", s_dev},
    };
    const size_t n_pairs = sizeof pairs / sizeof pairs[0];
    for (size_t k = 0; k < n_pairs; k++)
        printf("\"%s\":[%.3f,%.3f]%s", pairs[k].key, pairs[k].v[0], pairs[k].v[1],
               k + 1 < n_pairs ? "," : "");
    printf("}\n");
    for (int g = 0; g < 2; g++) {
        CK(cudaSetDevice(g));
        CK(cudaFree(sbase[g]));
        CK(cudaFree(dbase[g]));
        CK(cudaStreamDestroy(st[g]));
    }
    CK(cudaSetDevice(0));
    rlb__plan_free(&plan);
    rlb__source_free(&src);
    return 0;
}

/* --lora: the plan with adapters of rank r against the plain plan's copy (full). */
typedef struct lora_result {
    int rank;
    double ms, merge_ms, merge_floor_ms; /* fused (RLB_LORA_MERGE=fused) */
    double fma_ms, fma_merge_ms;         /* fused-fma: the product in f32 multiply-adds */
    double sep_ms, sep_merge_ms;         /* separate: base copies, then the merge in place */
    double gemm_ms, gemm_merge_ms;       /* gemm: the merges as cuBLASLt products */
    rlb_lora_merge_mode mode;            /* rlb__cuda_lora_mode of the merges */
    uint64_t products, n_merges;         /* gemm: merges written as products, of all */
    uint64_t read, written, merged_bytes, dev_bytes;
} lora_result;

static lora_result lora_case(const rlb_param_list *pl, int rank, double copy_gbs)
{
    static const char *const targets[] = {"self_attn.q_proj", "self_attn.k_proj",
                                          "self_attn.v_proj", "self_attn.o_proj",
                                          "mlp.gate_proj",    "mlp.up_proj", "mlp.down_proj"};
    lora_result r = {.rank = rank};
    rlb_param_list lp;
    RC(rlb__params_init(&lp, &pl->cfg, err, sizeof err));
    char name[96];
    for (int64_t l = 0; l < pl->cfg.n_layers; l++)
        for (size_t k = 0; k < sizeof targets / sizeof targets[0]; k++) {
            snprintf(name, sizeof name, "model.layers.%lld.%s.weight", (long long)l, targets[k]);
            RC(rlb__params_add_adapter(&lp, name, rank, 2.0f, err, sizeof err));
        }
    rlb_source src;
    uint64_t sbytes[W], soff[W + 1] = {0}, doff[T + 1] = {0};
    fsdp2_source(&lp, RLB_DTYPE_BF16, &src, sbytes);
    for (int f = 0; f < W; f++)
        soff[f + 1] = soff[f] + sbytes[f];
    rlb_target tgt = {.tp_size = T, .replicas = 1, .dtype = RLB_DTYPE_BF16};
    rlb_plan plan;
    RC(rlb__plan_build(&src, &tgt, &plan, err, sizeof err));
    for (int d = 0; d < T; d++)
        doff[d + 1] = doff[d] + (plan.dst_bytes[d] + 255) / 256 * 256;
    char *sbase, *dbase;
    CK(cudaMalloc((void **)&sbase, soff[W]));
    CK(cudaMalloc((void **)&dbase, doff[T]));
    CK(cudaMemset(sbase, 0x3c, soff[W])); /* bf16 0.0115: merged values stay small */
    rlb_cuda_buf sb[W], db[T];
    for (int f = 0; f < W; f++)
        sb[f] = (rlb_cuda_buf){sbase + soff[f], sbytes[f]};
    for (int d = 0; d < T; d++)
        db[d] = (rlb_cuda_buf){dbase + doff[d], plan.dst_bytes[d]};
    /* The copy ops alone go to the plan executor; the merges (with their base copies) to
     * lora_merge, as the CUDA executor splits them. */
    rlb_plan copies = {.n_src = plan.n_src, .n_dst = plan.n_dst, .src_bytes = plan.src_bytes,
                       .dst_bytes = plan.dst_bytes, .n_ops = plan.n_ops, .ops = plan.ops};
    rlb_cuda_plan *cp = NULL;
    RC(rlb__cuda_plan_upload(&copies, 0, NULL, &cp, err, sizeof err));
    RC(rlb__cuda_plan_bind(cp, sb, db, err, sizeof err));
    static const char *const how[4] = {"separate", "fused-fma", "fused", "gemm"};
    double *const ms[4][2] = {{&r.sep_ms, &r.sep_merge_ms}, {&r.fma_ms, &r.fma_merge_ms},
                              {&r.ms, &r.merge_ms}, {&r.gemm_ms, &r.gemm_merge_ms}};
    for (int k = 0; k < 4; k++) {
        setenv("RLB_LORA_MERGE", how[k], 1);
        rlb_cuda_lora *cl = NULL;
        RC(rlb__cuda_lora_upload(&plan, 0, NULL, &cl, err, sizeof err));
        RC(rlb__cuda_lora_bind(cl, sb, db, err, sizeof err));
        work all = {.plan = cp, .lora = cl}, merges = {.lora = cl};
        *ms[k][0] = time_median(&all);
        *ms[k][1] = time_median(&merges);
        if (k == 2) {
            r.mode = rlb__cuda_lora_mode(cl);
            r.dev_bytes = rlb__cuda_plan_device_bytes(cp) + rlb__cuda_lora_device_bytes(cl);
        }
        if (k == 3)
            r.products = rlb__cuda_lora_products(cl);
        rlb__cuda_lora_free(cl);
    }
    unsetenv("RLB_LORA_MERGE");
    r.n_merges = plan.n_merges;
    for (uint64_t i = 0; i < plan.n_merges; i++)
        r.merged_bytes += plan.merges[i].rows * plan.merges[i].cols * 2;
    r.merge_floor_ms = 2.0 * (double)r.merged_bytes / (copy_gbs * 1e6);
    r.read = plan.bytes_read;
    r.written = plan.bytes_written;
    rlb__cuda_plan_free(cp);
    CK(cudaFree(sbase));
    CK(cudaFree(dbase));
    rlb__plan_free(&plan);
    rlb__source_free(&src);
    rlb__params_free(&lp);
    return r;
}

static int lora_main(const rlb_param_list *pl, const char *dev_name)
{
    printf("rlb-bench-reshard-gpu --lora on %s: Llama-3-8B shapes, FSDP2 %d -> TP %d bf16 on "
           "one GPU, median of %d\n", dev_name, W, T, iters);
    printf("%-28s %11s %11s %9s %9s %9s %7s\n", "case", "read", "written", "ms", "GB/s",
           "floor ms", "floor");
    double copy_gbs = 0;
    result full = run_case(pl, RLB_DTYPE_BF16, &copy_gbs, NULL, NULL);
    printf("%-28s %8.2f GB %8.2f GB %9.3f %9.0f %9.3f %6.1f%%\n", "rlb bf16 -> bf16 (full)",
           full.read / 1e9, full.written / 1e9, full.ms, (full.read + full.written) / full.ms / 1e6,
           full.floor_ms, 100 * full.floor_ms / full.ms);
    lora_result lr[2] = {lora_case(pl, 16, copy_gbs), lora_case(pl, 64, copy_gbs)};
    for (int i = 0; i < 2; i++) {
        char label[64];
        snprintf(label, sizeof label, "rlb bf16 + LoRA rank %d", lr[i].rank);
        printf("%-28s %8.2f GB %8.2f GB %9.3f %9.0f %9s %7s  %.3f x full%s\n", label,
               lr[i].read / 1e9, lr[i].written / 1e9, lr[i].ms,
               (lr[i].read + lr[i].written) / lr[i].ms / 1e6, "", "", lr[i].ms / full.ms,
               lr[i].mode >= RLB_LORA_FUSED_TC    ? " (tensor cores)"
               : lr[i].mode == RLB_LORA_FUSED_FMA ? " (multiply-adds)"
                               : " (NOT fused: the merges ran separately)");
        snprintf(label, sizeof label, "  merges alone, rank %d", lr[i].rank);
        printf("%-28s %8.2f GB %8.2f GB %9.3f %9s %9.3f %6.1f%%  (fused: base from the "
               "sources + s*B*A, written once; %.0f MiB of device memory)\n", label,
               lr[i].merged_bytes / 1e9, lr[i].merged_bytes / 1e9, lr[i].merge_ms, "",
               lr[i].merge_floor_ms, 100 * lr[i].merge_floor_ms / lr[i].merge_ms,
               lr[i].dev_bytes / 1048576.0);
        snprintf(label, sizeof label, "  fused-fma, rank %d", lr[i].rank);
        printf("%-28s %8s %11s %9.3f %9s %9s %7s  %.3f x full; merges alone %.3f ms (the "
               "product in f32 multiply-adds)\n", label, "", "", lr[i].fma_ms, "", "", "",
               lr[i].fma_ms / full.ms, lr[i].fma_merge_ms);
        snprintf(label, sizeof label, "  separate, rank %d", lr[i].rank);
        printf("%-28s %8s %11s %9.3f %9s %9s %7s  %.3f x full; merges alone %.3f ms (base "
               "copies, stage, merge in place)\n", label, "", "", lr[i].sep_ms, "", "", "",
               lr[i].sep_ms / full.ms, lr[i].sep_merge_ms);
        snprintf(label, sizeof label, "  gemm, rank %d", lr[i].rank);
        printf("%-28s %8s %11s %9.3f %9s %9s %7s  %.3f x full; merges alone %.3f ms, %.1f%% "
               "of the floor (%llu of %llu merges as cuBLASLt products)\n", label, "", "",
               lr[i].gemm_ms, "", "", "", lr[i].gemm_ms / full.ms, lr[i].gemm_merge_ms,
               100 * lr[i].merge_floor_ms / lr[i].gemm_merge_ms,
               (unsigned long long)lr[i].products, (unsigned long long)lr[i].n_merges);
    }
    printf("{\"bench\":\"reshard_gpu_lora\",\"device\":\"%s\",\"model\":\"llama3-8b\","
           "\"fsdp\":%d,\"tp\":%d,\"copy_gbs\":%.1f,\"full_ms\":%.3f", dev_name, W, T,
           copy_gbs, full.ms);
    for (int i = 0; i < 2; i++)
        printf(",\"r%d\":{\"fused\":%d,\"ms\":%.3f,\"vs_full\":%.3f,\"merges_ms\":%.3f,"
               "\"merge_floor_ms\":%.3f,\"device_bytes\":%llu,\"fma_ms\":%.3f,"
               "\"fma_merges_ms\":%.3f,\"separate_ms\":%.3f,\"separate_merges_ms\":%.3f,"
               "\"gemm_ms\":%.3f,\"gemm_merges_ms\":%.3f,\"gemm_products\":%llu}",
               lr[i].rank, (int)lr[i].mode, lr[i].ms, lr[i].ms / full.ms, lr[i].merge_ms,
               lr[i].merge_floor_ms, (unsigned long long)lr[i].dev_bytes, lr[i].fma_ms,
               lr[i].fma_merge_ms, lr[i].sep_ms, lr[i].sep_merge_ms, lr[i].gemm_ms,
               lr[i].gemm_merge_ms, (unsigned long long)lr[i].products);
    printf("}\n");
    return 0;
}


/* ---- --mem: the sync's copy by kind of memory ---------------------------------------- */

/* --mem-child BYTES: the other process of the IPC case: cudaMalloc, fill, the CUDA IPC
 * handle to stdout, then hold the memory until stdin closes. */
static int mem_child(uint64_t bytes)
{
    void *p;
    cudaIpcMemHandle_t h;
    CK(cudaMalloc(&p, bytes));
    CK(cudaMemset(p, 0x3c, bytes));
    CK(cudaDeviceSynchronize());
    CK(cudaIpcGetMemHandle(&h, p));
    if (write(1, &h, sizeof h) != (ssize_t)sizeof h)
        return 1;
    char c;
    while (read(0, &c, 1) > 0)
        ;
    return 0;
}

/* Memory of another process: spawns this program with --mem-child and opens its handle;
 * *to_child is the pipe whose closing ends it. */
static char *ipc_source(uint64_t bytes, int *to_child, pid_t *pid)
{
    int in[2], out[2];
    char arg[32];
    snprintf(arg, sizeof arg, "%llu", (unsigned long long)bytes);
    if (pipe(in) || pipe(out))
        exit(1);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addclose(&fa, in[1]);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    char *argv[] = {"rlb-bench-reshard-gpu", "--mem-child", arg, NULL};
    if (posix_spawn(pid, "/proc/self/exe", &fa, NULL, argv, environ) != 0)
        exit(1);
    posix_spawn_file_actions_destroy(&fa);
    close(in[0]);
    close(out[1]);
    cudaIpcMemHandle_t h;
    size_t got = 0;
    while (got < sizeof h) {
        ssize_t n = read(out[0], (char *)&h + got, sizeof h - got);
        if (n <= 0) {
            fprintf(stderr, "the IPC child gave no handle\n");
            exit(1);
        }
        got += (size_t)n;
    }
    close(out[0]);
    void *p;
    CK(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
    *to_child = in[1];
    return p;
}

static int mem_main(const rlb_param_list *pl, const char *dev_name)
{
    if (rlb__bench_vmm_init() != 0)
        exit(1);
    const uint64_t esz = 2;
    rlb_source src;
    RC(rlb__source_init(&src, pl));
    uint64_t sbytes = 0;
    for (int64_t p = 0; p < pl->n; p++)
        sbytes = (sbytes + rlb__param_numel(&pl->params[p]) * esz + 255) / 256 * 256;
    if (rlb__source_add_buffer(&src, sbytes) != 0)
        exit(1);
    uint64_t at = 0;
    for (int64_t p = 0; p < pl->n; p++) {
        const rlb_param *pp = &pl->params[p];
        int64_t shape[2] = {pp->rows, pp->cols};
        RC(rlb__source_add_full(&src, pp->name, pp->ndim, shape, RLB_DTYPE_BF16, 0, at, err,
                                sizeof err));
        at = (at + rlb__param_numel(pp) * esz + 255) / 256 * 256;
    }
    rlb_target tgt = {.tp_size = 1, .replicas = 1, .dtype = RLB_DTYPE_BF16};
    rlb_plan plan;
    RC(rlb__plan_build(&src, &tgt, &plan, err, sizeof err));
    const uint64_t dbytes = plan.dst_bytes[0];
    /* sources: [0] cudaMalloc, [1] VMM, [2] another process's cudaMalloc through CUDA IPC;
     * destinations: [0] cudaMalloc, [1] VMM, [2] the VMM buffer mapped again through its
     * fd (the bridge's view of a GPU worker's weights) */
    char *s_buf[3], *d_buf[3];
    CK(cudaMalloc((void **)&s_buf[0], sbytes));
    CK(cudaMalloc((void **)&d_buf[0], dbytes));
    rlb_bench_vmm s_vmm, d_vmm, d_again;
    if (rlb__bench_vmm_alloc(&s_vmm, sbytes) || rlb__bench_vmm_alloc(&d_vmm, dbytes) ||
        rlb__bench_vmm_remap(&d_vmm, &d_again)) {
        fprintf(stderr, "VMM memory: cuMemCreate, mapping or the fd round trip failed\n");
        exit(1);
    }
    s_buf[1] = s_vmm.p;
    d_buf[1] = d_vmm.p;
    d_buf[2] = d_again.p;
    int to_child = -1;
    pid_t child;
    s_buf[2] = ipc_source(sbytes, &to_child, &child);
    for (int i = 0; i < 2; i++)
        CK(cudaMemset(s_buf[i], 0x3c, sbytes));
    CK(cudaMemset(d_buf[0], 0, dbytes));
    CK(cudaMemset(d_buf[1], 0, dbytes));
    CK(cudaDeviceSynchronize());
    static const char *const s_name[3] = {"cudaMalloc", "VMM", "CUDA IPC"};
    static const char *const d_name[3] = {"cudaMalloc", "VMM", "VMM via fd"};
    static const int pairs[][2] = {{0, 0}, {0, 1}, {0, 2}, {1, 1}, {1, 2}, {2, 0}, {2, 2}};
    enum { N_PAIRS = sizeof pairs / sizeof pairs[0] };
    const unsigned gap_us = 20000;
    double kms[N_PAIRS], cms[N_PAIRS], ims[N_PAIRS];
    printf("rlb-bench-reshard-gpu --mem on %s: Llama-3-8B, every tensor whole -> TP 1 (bf16, "
           "%llu ops), median of %d; idle: each run after %u ms of an idle GPU\n", dev_name,
           (unsigned long long)plan.n_ops, iters, gap_us / 1000);
    printf("%-12s %-12s %10s %10s %8s %10s %10s %10s\n", "source", "destination", "copy ms",
           "memcpy ms", "GB/s", "of memcpy", "idle ms", "of memcpy");
    for (int i = 0; i < N_PAIRS; i++) {
        rlb_cuda_plan *cp = NULL;
        rlb_cuda_buf sb = {s_buf[pairs[i][0]], sbytes}, db = {d_buf[pairs[i][1]], dbytes};
        RC(rlb__cuda_plan_upload(&plan, 0, NULL, &cp, err, sizeof err));
        RC(rlb__cuda_plan_bind(cp, &sb, &db, err, sizeof err));
        RC(rlb__cuda_plan_count(cp, 1));
        work w = {.plan = cp}, c = {.cp_dst = db.ptr, .cp_src = sb.ptr, .cp_bytes = dbytes};
        kms[i] = time_median(&w);
        cms[i] = time_median(&c);
        ims[i] = time_runs(&w, gap_us);
        rlb__cuda_plan_free(cp);
        printf("%-12s %-12s %10.3f %10.3f %8.0f %9.1f%% %10.3f %9.1f%%\n", s_name[pairs[i][0]],
               d_name[pairs[i][1]], kms[i], cms[i], 2.0 * dbytes / kms[i] / 1e6,
               100 * cms[i] / kms[i], ims[i], 100 * cms[i] / ims[i]);
    }
    printf("{\"bench\":\"reshard_gpu_mem\",\"device\":\"%s\",\"bytes\":%llu", dev_name,
           (unsigned long long)dbytes);
    for (int i = 0; i < N_PAIRS; i++)
        printf(",\"%d%d_copy_ms\":%.3f,\"%d%d_memcpy_ms\":%.3f,\"%d%d_idle_ms\":%.3f",
               pairs[i][0], pairs[i][1], kms[i], pairs[i][0], pairs[i][1], cms[i], pairs[i][0],
               pairs[i][1], ims[i]);
    printf("}\n");
    CK(cudaIpcCloseMemHandle(s_buf[2]));
    close(to_child);
    waitpid(child, NULL, 0);
    rlb__plan_free(&plan);
    rlb__source_free(&src);
    return 0;
}

int main(int argc, char **argv)
{
    const char *torch_log = NULL;
    int peer = 0, lora = 0, mem = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--torch-log") && i + 1 < argc)
            torch_log = argv[++i];
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc) {
            long v;
            if (rlb__cli_long("bench-reshard-gpu", "iters", argv[++i], 1, 1000000, &v))
                return 2;
            iters = (int)v;
        }
        else if (!strcmp(argv[i], "--peer"))
            peer = 1;
        else if (!strcmp(argv[i], "--lora"))
            lora = 1;
        else if (!strcmp(argv[i], "--mem"))
            mem = 1;
        else if (!strcmp(argv[i], "--mem-child") && i + 1 < argc)
            return mem_child(strtoull(argv[i + 1], NULL, 10));
        else {
            fprintf(stderr, "usage: %s [--torch-log FILE] [--iters N] "
                    "[--peer | --lora | --mem]\n", argv[0]);
            return 2;
        }
    }
    if (iters < 1)
        iters = 1;
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        fprintf(stderr, "rlb-bench-reshard-gpu: no GPU visible\n");
        return 77;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    rlb_model_config cfg;
    llama3_8b(&cfg);
    rlb_param_list pl;
    RC(rlb__params_init(&pl, &cfg, err, sizeof err));
    if (peer || lora || mem) {
        int rc = peer   ? peer_main(&pl, prop.name, ndev)
                 : lora ? lora_main(&pl, prop.name)
                        : mem_main(&pl, prop.name);
        rlb__params_free(&pl);
        return rc;
    }
    printf("rlb-bench-reshard-gpu on %s: Llama-3-8B shapes, FSDP2 %d -> TP %d on one GPU, "
           "median of %d\n", prop.name, W, T, iters);
    printf("%-28s %11s %11s %9s %9s %9s %7s\n", "case", "read", "written", "ms", "GB/s",
           "floor ms", "floor");

    double copy_gbs = 0;
    char *dbase = NULL;
    rlb_tp_layout lay[T];
    result bf = run_case(&pl, RLB_DTYPE_BF16, &copy_gbs, &dbase, lay);
    printf("%-28s %8.2f GB %8.2f GB %9.3f %9.0f %9.3f %6.1f%%\n", "rlb bf16 -> bf16",
           bf.read / 1e9, bf.written / 1e9, bf.ms, (bf.read + bf.written) / bf.ms / 1e6,
           bf.floor_ms, 100 * bf.floor_ms / bf.ms);
    printf("%-28s %8.2f GB %8.2f GB %9.3f %9.0f %9.3f %6.1f%%\n", "  counting NaN/Inf",
           bf.read / 1e9, bf.written / 1e9, bf.counted_ms,
           (bf.read + bf.written) / bf.counted_ms / 1e6, bf.floor_ms,
           100 * bf.floor_ms / bf.counted_ms);
    uint64_t stride1 = (lay[0].total_bytes + 255) / 256 * 256;
    fp8_result f8 = fp8_case(dbase, stride1, lay);
    CK(cudaFree(dbase));
    rlb__tp_layout_free(&lay[0]);
    rlb__tp_layout_free(&lay[1]);
    result f32 = run_case(&pl, RLB_DTYPE_F32, &copy_gbs, NULL, NULL);
    printf("%-28s %8.2f GB %8.2f GB %9.3f %9.0f %9.3f %6.1f%%\n", "rlb f32 -> bf16",
           f32.read / 1e9, f32.written / 1e9, f32.ms, (f32.read + f32.written) / f32.ms / 1e6,
           f32.floor_ms, 100 * f32.floor_ms / f32.ms);
    printf("%-28s %8.2f GB %8.2f GB %9.3f %9.0f %9.3f %6.1f%%\n", "  counting NaN/Inf",
           f32.read / 1e9, f32.written / 1e9, f32.counted_ms,
           (f32.read + f32.written) / f32.counted_ms / 1e6, f32.floor_ms,
           100 * f32.floor_ms / f32.counted_ms);
    double f8t_floor = (2.0 * f8.in_bytes + f8.out_bytes) / (copy_gbs * 1e6);
    double f8r_floor = ((double)f8.in_bytes + f8.out_bytes) / (copy_gbs * 1e6);
    printf("%-28s %8.2f GB %8.2f GB %9.3f %9.0f %9.3f %6.1f%%\n", "fp8 per-tensor (2 reads)",
           2 * f8.in_bytes / 1e9, f8.out_bytes / 1e9, f8.tensor_ms,
           (2.0 * f8.in_bytes + f8.out_bytes) / f8.tensor_ms / 1e6, f8t_floor,
           100 * f8t_floor / f8.tensor_ms);
    printf("%-28s %8.2f GB %8.2f GB %9.3f %9.0f %9.3f %6.1f%%\n", "fp8 per-channel",
           f8.in_bytes / 1e9, f8.out_bytes / 1e9, f8.rows_ms,
           ((double)f8.in_bytes + f8.out_bytes) / f8.rows_ms / 1e6, f8r_floor,
           100 * f8r_floor / f8.rows_ms);

    double torch_ms = 0, torch_copy_ms = 0;
    int have_torch = torch_log && read_torch_log(torch_log, &torch_ms, &torch_copy_ms) == 0;
    if (have_torch)
        printf("%-28s %8.2f GB %8.2f GB %9.3f %9.0f  (its d2d copy: %.3f ms)\n",
               "torch cat+narrow+copy", bf.read / 1e9, bf.written / 1e9, torch_ms,
               (bf.read + bf.written) / torch_ms / 1e6, torch_copy_ms);
    else
        printf("torch baseline: no --torch-log given or it could not be read\n");
    printf("plan: %llu ops, %llu work items, %.1f KiB of device memory (limit %llu MiB); "
           "host planning %.1f ms; upload + bind %.3f ms; launch %.1f us; fp8 set %.1f KiB\n",
           (unsigned long long)bf.n_ops, (unsigned long long)bf.items, bf.plan_dev_bytes / 1024.0,
           PLAN_MEM_LIMIT >> 20, bf.plan_ms, bf.upload_ms, bf.launch_us, f8.dev_bytes / 1024.0);

    printf("{\"bench\":\"reshard_gpu\",\"device\":\"%s\",\"model\":\"llama3-8b\",\"fsdp\":%d,"
           "\"tp\":%d,\"bytes_read\":%llu,\"bytes_written\":%llu,\"bf16_ms\":%.3f,"
           "\"f32_ms\":%.3f,\"copy_gbs\":%.1f,\"fraction_of_copy_floor\":%.3f,"
           "\"f32_fraction_of_copy_floor\":%.3f,\"torch_ms\":%.3f,\"speedup_vs_torch\":%.2f,"
           "\"upload_ms\":%.3f,\"launch_us\":%.1f,\"plan_device_bytes\":%llu,"
           "\"fp8_tensor_ms\":%.3f,\"fp8_tensor_vs_floor\":%.3f,\"fp8_rows_ms\":%.3f,"
           "\"fp8_rows_vs_floor\":%.3f,\"bf16_counted_ms\":%.3f,\"f32_counted_ms\":%.3f}\n",
           prop.name, W, T, (unsigned long long)bf.read, (unsigned long long)bf.written, bf.ms,
           f32.ms, copy_gbs, bf.floor_ms / bf.ms, f32.floor_ms / f32.ms, torch_ms,
           have_torch ? torch_ms / bf.ms : 0.0, bf.upload_ms, bf.launch_us,
           (unsigned long long)bf.plan_dev_bytes, f8.tensor_ms, f8.tensor_ms / f8t_floor,
           f8.rows_ms, f8.rows_ms / f8r_floor, bf.counted_ms, f32.counted_ms);
    rlb__params_free(&pl);
    return 0;
}
