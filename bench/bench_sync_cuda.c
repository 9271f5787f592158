/* bench_sync_cuda.c: `rlb-bench-sync --device cuda`, the whole GPU weight sync, publish to
 * commit, on one GPU (issue 11's benchmark).
 *
 * For each case an `rlb bridge` (pause mode) and one `rlb worker --device cuda` (bf16
 * weights; fp8 post-load in the fp8 case) run as processes of the `rlb` program next to
 * this one, on a config.json of the shape written here (the worker's weights come with the
 * first sync: --no-weights). This process is the trainer: it holds every parameter FULL in
 * one cudaMalloc allocation (bf16, or fp32 master weights), registers them as device
 * tensors (the library exports the allocation's CUDA IPC handle) and publishes N versions
 * with rlb_publish_stream on its stream, touching the weights on that stream before each
 * publish so the bridge really waits on the trainer's event. Per case:
 *   sync_ms     the bridge's publish-to-commit time (synced.ms): event wait, the CUDA
 *               executor's reshard into the worker's VMM weights, post-load processing on
 *               the worker's GPU, the round trips, the commit
 *   floor_ms    the device copy floor of the same bytes: (bytes read + bytes written) over
 *               the device-to-device copy bandwidth measured in the same run
 *   control_ms  the bridge thread's own CPU time per sync (target <= 1 ms)
 *   phases      where sync_ms went (the bridge's stats): launch (last publish to the copy
 *               launched: event wait set-up, bind, upload), copy (launched to seen done by
 *               the loop; gpu: the executor's GPU-event time of the copy itself), load
 *               (loads sent to commit: post-load processing and the round trips)
 * The torch peer (../shared/device/torch_reshard_baseline.py) runs in the same device call
 * (scripts/gpu-check.sh sync). Shapes: Llama-3.2-1B and Llama-3.1-8B. Last line: JSON.
 *
 * `--lora` runs the LoRA sync instead (DESIGN §10; issue 14), on the 8B shape: the trainer
 * also declares an adapter of rank r (alpha 2r) on q, k, v, o, gate, up and down of every
 * layer and registers its bf16 factors beside the frozen bf16 base (one allocation), and
 * each version changes only the factors; the bridge copies the base and merges the
 * adapters on the worker's GPU (kernels/cuda/lora_merge.h). Cases: the full-weight bf16
 * sync, then adapters of rank 16 and 64, in the same run; it prints each adapter sync over
 * the full one (target <= 1.3). The peer, PEFT's merge_and_unload() plus a copy into the
 * worker's layout in torch (bench/peft_merge_peer.py), prints its times as this program's
 * arguments on its last line, so one device call runs both:
 *     build/rlb-bench-sync --device cuda --lora $(python3 bench/peft_merge_peer.py | tail -1)
 * (`--peer R:MS`, once per rank), and the ratios to it are printed too.
 *
 * `--vmm`: the trainer's memory is mapped with the VMM API instead (cuMemCreate with a
 * POSIX fd handle, as PyTorch allocates under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:
 * True), which the library exports as a VMM fd rather than a CUDA IPC handle: the same sync
 * over the other way a trainer's memory reaches the bridge.
 */
#include <limits.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime_api.h>

#include "bench/bench_vmm.h"
#include "common/clock.h"
#include "model/config.h"
#include "model/params.h"
#include "rlb/rlb.h"

extern char **environ;

int rlb__bench_sync_cuda(int argc, char **argv);

typedef struct scase {
    const char *name;  /* shape */
    int big;           /* 8B shape */
    rlb_dtype src;     /* trainer dtype */
    const char *quant; /* worker post-load */
    int lora_rank;     /* rank of the adapters on the seven targets (0: none) */
    /* results */
    uint64_t bytes_read, bytes_written;
    double sync_ms, floor_ms, control_ms;
    double launch_ms, copy_wall_ms, copy_gpu_ms, load_ms; /* medians of the phases */
} scase;

/* The trainer's memory: one cudaMalloc allocation, or (--vmm) one VMM mapping. */
static int trainer_vmm;

typedef struct trainer_mem {
    void *p;           /* the memory */
    rlb_bench_vmm vmm; /* --vmm: its mapping */
} trainer_mem;

static int trainer_alloc(trainer_mem *t, size_t bytes)
{
    memset(t, 0, sizeof *t);
    if (!trainer_vmm)
        return cudaMalloc(&t->p, bytes) == cudaSuccess ? 0 : -1;
    if (rlb__bench_vmm_alloc(&t->vmm, bytes) != 0)
        return -1;
    t->p = t->vmm.p;
    return 0;
}

static void trainer_free(trainer_mem *t)
{
    if (!trainer_vmm)
        cudaFree(t->p);
    else
        rlb__bench_vmm_free(&t->vmm);
    t->p = NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void shape(rlb_model_config *c, int big)
{
    rlb__config_tiny(c);
    c->hidden = big ? 4096 : 2048;
    c->intermediate = big ? 14336 : 8192;
    c->n_layers = big ? 32 : 16;
    c->n_heads = 32;
    c->n_kv_heads = 8;
    c->head_dim = c->hidden / 32;
    c->vocab = 128256;
    c->max_pos = 8192;
    c->rope_theta = 500000.0;
    c->tie_embeddings = !big;
}

static int write_config(const char *dir, const rlb_model_config *c)
{
    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f, "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", "
            "\"hidden_size\": %lld, \"intermediate_size\": %lld, \"num_hidden_layers\": %lld, "
            "\"num_attention_heads\": %lld, \"num_key_value_heads\": %lld, \"head_dim\": %lld, "
            "\"vocab_size\": %lld, \"max_position_embeddings\": %lld, \"rms_norm_eps\": 1e-05, "
            "\"rope_theta\": %.1f, \"tie_word_embeddings\": %s, \"hidden_act\": \"silu\", "
            "\"torch_dtype\": \"bfloat16\"}\n",
            (long long)c->hidden, (long long)c->intermediate, (long long)c->n_layers,
            (long long)c->n_heads, (long long)c->n_kv_heads, (long long)c->head_dim,
            (long long)c->vocab, (long long)c->max_pos, c->rope_theta,
            c->tie_embeddings ? "true" : "false");
    return fclose(f) == 0 ? 0 : -1;
}

/* The seven targets of a layer's LoRA adapters. */
static const char *const lora_targets[] = {"self_attn.q_proj", "self_attn.k_proj",
                                           "self_attn.v_proj", "self_attn.o_proj",
                                           "mlp.gate_proj",    "mlp.up_proj",
                                           "mlp.down_proj"};
#define N_LORA_TARGETS (sizeof lora_targets / sizeof lora_targets[0])

/* One adapted weight of the LoRA cases: its name and its factors' names and shapes. */
typedef struct adapter {
    char target[96], a[96], b[96];
    int64_t rows, cols; /* the weight's [out, in] */
} adapter;

/* The adapters of a rank-r case on every layer of pl's model, declared with c. Returns
 * their count (*out, to free) or -1. */
static int declare_adapters(rlb_client *c, const rlb_param_list *pl, int r, adapter **out)
{
    int n = (int)(N_LORA_TARGETS * (size_t)pl->cfg.n_layers);
    adapter *ad = calloc((size_t)n, sizeof *ad);
    rlb_lora_desc *ld = calloc((size_t)n, sizeof *ld);
    int rc = ad && ld ? 0 : -1;
    for (int k = 0; k < n && rc == 0; k++) {
        int layer = k / (int)N_LORA_TARGETS;
        const char *t = lora_targets[k % N_LORA_TARGETS];
        snprintf(ad[k].target, sizeof ad[k].target, "model.layers.%d.%s.weight", layer, t);
        snprintf(ad[k].a, sizeof ad[k].a, "model.layers.%d.%s.lora_A.weight", layer, t);
        snprintf(ad[k].b, sizeof ad[k].b, "model.layers.%d.%s.lora_B.weight", layer, t);
        int64_t p = rlb__params_find(pl, ad[k].target);
        rc = p < 0 ? -1 : 0;
        if (rc == 0) {
            ad[k].rows = pl->params[p].rows;
            ad[k].cols = pl->params[p].cols;
        }
        rlb_lora_desc_init(&ld[k]);
        ld[k].target = ad[k].target;
        ld[k].rank = (uint32_t)r;
        ld[k].alpha = 2.0f * (float)r;
    }
    if (rc == 0 && rlb_register_lora(c, ld, (size_t)n) != 0) {
        fprintf(stderr, "register_lora: %s\n", rlb_last_error(c));
        rc = -1;
    }
    free(ld);
    if (rc) {
        free(ad);
        return -1;
    }
    *out = ad;
    return n;
}

static pid_t spawn(char *const argv[])
{
    pid_t pid;
    return posix_spawn(&pid, argv[0], NULL, NULL, argv, environ) == 0 ? pid : -1;
}

/* The bridge's stats names[0..n) into v[] (-1 where missing), from one stats round trip. */
static void stats_of(rlb_client *c, const char *const *names, int n, double *v)
{
    rlb_stat_list *l;
    for (int i = 0; i < n; i++)
        v[i] = -1;
    if (rlb_bridge_stats(c, &l) == 0) {
        for (int i = 0; i < n; i++)
            rlb_stat_list_find(l, names[i], &v[i]);
        rlb_stat_list_free(l);
    }
}

static double stat_of(rlb_client *c, const char *name)
{
    double v;
    stats_of(c, &name, 1, &v);
    return v;
}

/* Device-to-device copy bandwidth, bytes read + written per second (GB/s). */
static double copy_gbs(void)
{
    const size_t n = (size_t)2 << 30;
    void *a = NULL, *b = NULL;
    cudaEvent_t e0, e1;
    float best = 1e30f;
    if (cudaMalloc(&a, n) || cudaMalloc(&b, n))
        goto out;
    cudaMemset(a, 1, n);
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int i = 0; i < 6; i++) {
        float ms;
        cudaEventRecord(e0, 0);
        cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, 0);
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        cudaEventElapsedTime(&ms, e0, e1);
        if (i && ms < best)
            best = ms;
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
out:
    cudaFree(a);
    cudaFree(b);
    return best < 1e29f ? 2.0 * (double)n / (best * 1e6) : -1;
}

/* Runs one case with `rlb` at rlb_bin; fills its results. Returns 0 or -1. */
static int run_case(scase *sc, const char *rlb_bin, const char *dir, int versions, double gbs)
{
    rlb_model_config cfg;
    shape(&cfg, sc->big);
    char model[PATH_MAX / 2], sock[PATH_MAX / 2];
    snprintf(model, sizeof model, "%s/%s", dir, sc->name);
    snprintf(sock, sizeof sock, "%s/bridge", dir);
    mkdir(model, 0700);
    if (write_config(model, &cfg) < 0)
        return -1;
    char *bridge[] = {(char *)rlb_bin, "bridge", "--socket", sock, "--model", model, "--mode",
                      "pause", NULL};
    char *worker[] = {(char *)rlb_bin, "worker", "--bridge", sock, "--model", model,
                      "--no-weights", "--device", "cuda", "--dtype", "bf16", "--kv-mb", "256",
                      "--quant", (char *)sc->quant, NULL};
    pid_t pids[2] = {spawn(bridge), -1};
    for (double t0 = rlb__clock_s(); access(sock, F_OK) != 0 && rlb__clock_s() - t0 < 30;)
        usleep(20000);
    pids[1] = spawn(worker);
    int rc = -1;
    rlb_param_list pl = {0};
    rlb_client *c = NULL;
    rlb_tensor_desc *d = NULL;
    adapter *ad = NULL;
    int n_ad = 0;
    trainer_mem tm = {0};
    void *mem = NULL;
    cudaStream_t st = NULL;
    rlb_client_options co;
    rlb_client_options_init(&co);
    co.socket = sock;
    co.connect_timeout_ms = 30000;
    if (pids[0] < 0 || pids[1] < 0 || rlb__params_init(&pl, &cfg, NULL, 0) != 0 ||
        rlb_connect(&co, &c) != 0)
        goto out;
    size_t esz = rlb_dtype_size(sc->src);
    uint64_t numel = 0, factors = 0;
    for (int64_t p = 0; p < pl.n; p++)
        numel += rlb__param_numel(&pl.params[p]);
    if (sc->lora_rank && (n_ad = declare_adapters(c, &pl, sc->lora_rank, &ad)) < 0)
        goto out;
    for (int k = 0; k < n_ad; k++)
        factors += (uint64_t)sc->lora_rank * (uint64_t)(ad[k].rows + ad[k].cols);
    if (trainer_alloc(&tm, (numel + factors) * esz) != 0 || cudaStreamCreate(&st) != cudaSuccess)
        goto out;
    mem = tm.p;
    /* Not zeros: small values of every exponent a weight has (and factors whose products
     * stay small). */
    cudaMemset(mem, 0x3c, (numel + factors) * esz);
    d = calloc((size_t)pl.n + 2 * (size_t)n_ad, sizeof(*d));
    uint64_t at = 0;
    for (int64_t p = 0; p < pl.n; p++) {
        rlb_tensor_desc_init(&d[p]);
        d[p].name = pl.params[p].name;
        d[p].dtype = sc->src;
        d[p].ndim = (uint32_t)pl.params[p].ndim;
        d[p].shape[0] = (uint64_t)pl.params[p].rows;
        d[p].shape[1] = (uint64_t)pl.params[p].cols;
        d[p].data = (char *)mem + at * esz;
        d[p].device = RLB_DEVICE_CUDA;
        d[p].cuda_device = 0;
        at += rlb__param_numel(&pl.params[p]);
    }
    for (int k = 0; k < n_ad; k++) /* A [r, in], then B [out, r] */
        for (int f = 0; f < 2; f++) {
            rlb_tensor_desc *t = &d[pl.n + 2 * k + f];
            rlb_tensor_desc_init(t);
            t->name = f ? ad[k].b : ad[k].a;
            t->dtype = sc->src;
            t->ndim = 2;
            t->shape[0] = f ? (uint64_t)ad[k].rows : (uint64_t)sc->lora_rank;
            t->shape[1] = f ? (uint64_t)sc->lora_rank : (uint64_t)ad[k].cols;
            t->data = (char *)mem + at * esz;
            t->device = RLB_DEVICE_CUDA;
            t->cuda_device = 0;
            at += t->shape[0] * t->shape[1];
        }
    if (rlb_register(c, d, (size_t)pl.n + 2 * (size_t)n_ad) != 0) {
        fprintf(stderr, "register: %s\n", rlb_last_error(c));
        goto out;
    }
    for (double t0 = rlb__clock_s(); stat_of(c, "replicas_up") < 1; usleep(50000))
        if (rlb__clock_s() - t0 > 300) {
            fprintf(stderr, "the GPU worker did not come up\n");
            goto out;
        }
    /* the bridge's figures of each sync: its CPU time, then where the time went */
    enum { N_FIG = 5 };
    static const char *const fig_stat[N_FIG] = {"control_ms_per_sync", "last_launch_ms",
                                                "last_copy_wall_ms", "last_copy_ms",
                                                "last_load_ms"};
    double *const fig_out[N_FIG] = {&sc->control_ms, &sc->launch_ms, &sc->copy_wall_ms,
                                    &sc->copy_gpu_ms, &sc->load_ms};
    double sync[32], fig[32][N_FIG];
    for (int v = 1; v <= versions; v++) {
        /* The trainer's last write of the step, on its stream: a weight, or with adapters a
         * factor (the base stays frozen). */
        cudaMemsetAsync((char *)mem + (n_ad ? numel * esz : 0), 0x3c + v, esz, st);
        rlb_sync_stats ss = {.struct_size = sizeof(ss)};
        if (rlb_publish_stream(c, (uint64_t)v, st, &ss) != 0) {
            fprintf(stderr, "publish: %s\n", rlb_last_error(c));
            goto out;
        }
        sync[v - 1] = ss.ms;
        stats_of(c, fig_stat, N_FIG, fig[v - 1]);
        sc->bytes_written = ss.bytes;
    }
    /* The first sync uploads the plan; the median of the rest is the steady state. */
    qsort(sync + 1, (size_t)(versions - 1), sizeof(double), cmp_double);
    sc->sync_ms = sync[1 + (versions - 1) / 2];
    for (int k = 0; k < N_FIG; k++) {
        double col[32];
        for (int v = 1; v < versions; v++)
            col[v - 1] = fig[v][k];
        qsort(col, (size_t)(versions - 1), sizeof(double), cmp_double);
        *fig_out[k] = col[(versions - 1) / 2];
    }
    sc->bytes_read = (numel + factors) * esz;
    sc->floor_ms = (double)(sc->bytes_read + sc->bytes_written) / (gbs * 1e6);
    rc = 0;
out:
    free(d);
    free(ad);
    rlb_close(c);
    trainer_free(&tm);
    if (st)
        cudaStreamDestroy(st);
    rlb__params_free(&pl);
    for (int i = 1; i >= 0; i--)
        if (pids[i] > 0) {
            kill(pids[i], SIGTERM);
            waitpid(pids[i], NULL, 0);
        }
    return rc;
}

/* The peer's time for rank r (--peer r:ms), or a negative number. */
static double peer_of(const int *rank, const double *ms, int n, int r)
{
    for (int i = 0; i < n; i++)
        if (rank[i] == r)
            return ms[i];
    return -1;
}

/* The LoRA cases' ratios, then their JSON line: cases[0] is the full sync. */
static void report_lora(const scase *cases, int ncase, const char *device, double gbs,
                        const int *peer_rank, const double *peer_ms, int n_peer)
{
    double full = cases[0].sync_ms;
    for (int i = 1; i < ncase; i++) {
        double peer = peer_of(peer_rank, peer_ms, n_peer, cases[i].lora_rank);
        printf("adapters rank %d: %.3f ms, %.3f x the full bf16 sync (target <= 1.3)",
               cases[i].lora_rank, cases[i].sync_ms, cases[i].sync_ms / full);
        if (peer > 0)
            printf("; PEFT merge_and_unload + copy peer %.3f ms: %.3f x it", peer,
                   cases[i].sync_ms / peer);
        printf("\n");
    }
    printf("{\"bench\": \"sync_cuda_lora\", \"device\": \"%s\", \"copy_gbs\": %.1f, "
           "\"full_ms\": %.3f", device, gbs, full);
    for (int i = 1; i < ncase; i++) {
        double peer = peer_of(peer_rank, peer_ms, n_peer, cases[i].lora_rank);
        printf(", \"r%d\": {\"sync_ms\": %.3f, \"vs_full\": %.3f, \"control_ms\": %.4f",
               cases[i].lora_rank, cases[i].sync_ms, cases[i].sync_ms / full,
               cases[i].control_ms);
        if (peer > 0)
            printf(", \"peer_ms\": %.3f, \"vs_peer\": %.3f", peer, cases[i].sync_ms / peer);
        printf("}");
    }
    printf("}\n");
}

int rlb__bench_sync_cuda(int argc, char **argv)
{
    int versions = 6, only_1b = 0, lora = 0, n_peer = 0, peer_rank[8];
    double peer_ms[8];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            versions = 3;
        else if (!strcmp(argv[i], "--shape") && i + 1 < argc)
            only_1b = !strcmp(argv[++i], "1b");
        else if (!strcmp(argv[i], "--lora"))
            lora = 1;
        else if (!strcmp(argv[i], "--vmm"))
            trainer_vmm = 1;
        else if (!strcmp(argv[i], "--peer") && i + 1 < argc && n_peer < 8 &&
                 sscanf(argv[++i], "%d:%lf", &peer_rank[n_peer], &peer_ms[n_peer]) == 2)
            n_peer++;
    }
    char self[PATH_MAX], rlb_bin[PATH_MAX + 8];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0)
        return 1;
    self[n] = 0;
    *strrchr(self, '/') = 0; /* the build tree, where `rlb` is too */
    snprintf(rlb_bin, sizeof rlb_bin, "%s/rlb", self);
    if (access(rlb_bin, X_OK) != 0) {
        fprintf(stderr, "rlb-bench-sync --device cuda: no rlb program at %s\n", rlb_bin);
        return 1;
    }
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) {
        fprintf(stderr, "rlb-bench-sync --device cuda: no GPU visible\n");
        return 77;
    }
    struct cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    signal(SIGPIPE, SIG_IGN);
    char dir[] = "/tmp/rlb-bench-sync-cuda-XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    double gbs = copy_gbs();
    scase plain[] = {
        {.name = "llama3.2-1b", .src = RLB_DTYPE_BF16, .quant = "none"},
        {.name = "llama3.2-1b", .src = RLB_DTYPE_F32, .quant = "none"},
        {.name = "llama3.1-8b", .big = 1, .src = RLB_DTYPE_BF16, .quant = "none"},
        {.name = "llama3.1-8b", .big = 1, .src = RLB_DTYPE_F32, .quant = "none"},
        {.name = "llama3.1-8b", .big = 1, .src = RLB_DTYPE_BF16, .quant = "fp8"},
    };
    scase adapted[] = {
        {.name = "llama3.1-8b", .big = 1, .src = RLB_DTYPE_BF16, .quant = "none"},
        {.name = "llama3.1-8b", .big = 1, .src = RLB_DTYPE_BF16, .quant = "none", .lora_rank = 16},
        {.name = "llama3.1-8b", .big = 1, .src = RLB_DTYPE_BF16, .quant = "none", .lora_rank = 64},
    };
    scase *cases = lora ? adapted : plain;
    int ncase = lora ? (int)(sizeof(adapted) / sizeof(adapted[0]))
                : only_1b ? 2 : (int)(sizeof(plain) / sizeof(plain[0]));
    if (trainer_vmm && rlb__bench_vmm_init() != 0) {
        fprintf(stderr, "rlb-bench-sync --device cuda --vmm: no VMM driver functions\n");
        return 1;
    }
    printf("device %s, copy %.0f GB/s (read + write), trainer memory %s\n", prop.name, gbs,
           trainer_vmm ? "VMM (exported as fds)" : "cudaMalloc (exported as CUDA IPC handles)");
    printf("%-12s %5s %5s %4s %12s %12s %9s %9s %8s %11s\n", "model", "src", "quant", "lora",
           "read", "written", "sync_ms", "floor_ms", "x_floor", "control_ms");
    for (int i = 0; i < ncase; i++) {
        scase *sc = &cases[i];
        if (run_case(sc, rlb_bin, dir, versions, gbs) != 0) {
            fprintf(stderr, "case %s %s lora %d failed\n", sc->name, rlb_dtype_name(sc->src),
                    sc->lora_rank);
            continue;
        }
        printf("%-12s %5s %5s %4d %12llu %12llu %9.3f %9.3f %8.3f %11.3f\n", sc->name,
               rlb_dtype_name(sc->src), sc->quant, sc->lora_rank,
               (unsigned long long)sc->bytes_read, (unsigned long long)sc->bytes_written,
               sc->sync_ms, sc->floor_ms, sc->sync_ms / sc->floor_ms, sc->control_ms);
        printf("%12s phases: launch %.3f ms, copy %.3f ms (GPU events %.3f ms), load + "
               "commit %.3f ms\n", "", sc->launch_ms, sc->copy_wall_ms, sc->copy_gpu_ms,
               sc->load_ms);
        fflush(stdout);
    }
    if (lora) {
        report_lora(cases, ncase, prop.name, gbs, peer_rank, peer_ms, n_peer);
    } else {
        printf("{\"bench\": \"sync_cuda\", \"device\": \"%s\", \"trainer_memory\": \"%s\", "
               "\"copy_gbs\": %.1f", prop.name, trainer_vmm ? "vmm" : "cudaMalloc", gbs);
        for (int i = 0; i < ncase; i++)
            printf(", \"%s_%s_%s\": {\"sync_ms\": %.3f, \"floor_ms\": %.3f, "
                   "\"control_ms\": %.4f, \"launch_ms\": %.3f, \"copy_ms\": %.3f, "
                   "\"copy_gpu_ms\": %.3f, \"load_ms\": %.3f}", cases[i].name,
                   rlb_dtype_name(cases[i].src), cases[i].quant, cases[i].sync_ms,
                   cases[i].floor_ms, cases[i].control_ms, cases[i].launch_ms,
                   cases[i].copy_wall_ms, cases[i].copy_gpu_ms, cases[i].load_ms);
        printf("}\n");
    }
    char model[PATH_MAX + 64];
    for (int i = 0; i < ncase; i++) {
        snprintf(model, sizeof model, "%s/%s/config.json", dir, cases[i].name);
        unlink(model);
        snprintf(model, sizeof model, "%s/%s", dir, cases[i].name);
        rmdir(model);
    }
    rmdir(dir);
    return 0;
}
