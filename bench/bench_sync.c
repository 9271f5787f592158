/* bench_sync.c: rlb-bench-sync, the weight sync of the CPU backend end to end (issue 5).
 *
 * For each case a bridge (pause mode) and the workers of one replica of TP size T run as
 * processes; this process is a trainer rank (librlb) that registers every parameter FULL
 * in float32 shared memory and publishes N versions. Per sync it reports
 *   sync_ms     the bridge's time from the publish to the commit (synced.ms): plan
 *               execution into the workers' buffers, load, post-load processing, commit
 *   GB/s        bytes written into worker buffers / sync_ms
 *   memcpy_ms   the peer: one plain memcpy of the same number of bytes, same run
 *   control_ms  the bridge thread's own CPU time per sync, the copy excluded (the copy
 *               runs on the copy thread): what the orchestration costs
 * Cases: the demo (tiny) model; a ~100M-parameter Llama; a small model with 300 tensors
 * (33 layers) at TP 1, 2 and 4 for control_ms (target <= 1 ms, flat in T).
 * Ends with one JSON line. Run: build/rlb-bench-sync [--quick]; `--device cuda` runs the
 * GPU benchmark of bench_sync_cuda.c (CUDA builds).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bridge/bridge.h"
#include "common/clock.h"
#include "model/config.h"
#include "model/params.h"
#include "rlb/rlb.h"
#include "worker/daemon.h"

typedef struct bcase {
    const char *name;
    rlb_model_config cfg;
    uint32_t tp;
    int versions;
    /* results */
    uint64_t params, tensors, bytes;
    double sync_ms, memcpy_ms, control_ms;
} bcase;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    return v[n / 2];
}

static double memcpy_ms(uint64_t bytes)
{
    char *a = malloc(bytes), *b = malloc(bytes);
    if (!a || !b) {
        free(a);
        free(b);
        return -1;
    }
    memset(a, 1, bytes);
    memset(b, 2, bytes);
    double best = 1e30;
    for (int i = 0; i < 5; i++) {
        double t0 = rlb__clock_s();
        memcpy(b, a, bytes);
        double ms = (rlb__clock_s() - t0) * 1e3;
        best = ms < best ? ms : best;
    }
    volatile char sink = b[bytes / 2];
    (void)sink;
    free(a);
    free(b);
    return best;
}

static double stat_of(rlb_client *c, const char *name)
{
    rlb_stat_list *l;
    double v = -1;
    if (rlb_bridge_stats(c, &l) == 0) {
        rlb_stat_list_find(l, name, &v);
        rlb_stat_list_free(l);
    }
    return v;
}

/* Runs one case; fills its results. Returns 0 or -1. */
static int run_case(bcase *bc, const char *sock)
{
    pid_t pids[8];
    int n = 0, rc = -1;
    pids[n] = fork();
    if (pids[n] == 0) {
        static volatile sig_atomic_t stop;
        rlb__daemon_stop_on_signals(&stop);
        rlb_bridge_opts o = RLB_BRIDGE_OPTS_INIT;
        o.socket_path = sock;
        o.cfg = bc->cfg;
        o.stop = &stop;
        _exit(rlb__bridge_run(&o) ? 1 : 0);
    }
    n++;
    usleep(200000);
    for (uint32_t t = 0; t < bc->tp; t++) {
        pids[n] = fork();
        if (pids[n] == 0) {
            rlb_worker_opts o = RLB_WORKER_OPTS_INIT;
            o.socket_path = sock;
            o.tp_rank = t;
            o.tp_size = bc->tp;
            o.cfg = &bc->cfg;
            o.kv_bytes = 4u << 20;
            o.threads = 1;
            _exit(rlb__worker_run(&o) ? 1 : 0);
        }
        n++;
    }
    rlb_param_list pl;
    rlb_client *c = NULL;
    rlb_tensor_desc *d = NULL;
    rlb_client_options co;
    rlb_client_options_init(&co);
    co.socket = sock;
    if (rlb__params_init(&pl, &bc->cfg, NULL, 0) != 0)
        goto out;
    if (rlb_connect(&co, &c) != 0)
        goto out;
    bc->tensors = (uint64_t)pl.n;
    bc->params = 0;
    for (int64_t p = 0; p < pl.n; p++)
        bc->params += rlb__param_numel(&pl.params[p]);
    float *mem;
    if (rlb_alloc_host(c, bc->params * 4, (void **)&mem) != 0)
        goto out;
    d = calloc((size_t)pl.n, sizeof(*d));
    uint64_t at = 0;
    for (int64_t p = 0; p < pl.n; p++) {
        rlb_tensor_desc_init(&d[p]);
        d[p].name = pl.params[p].name;
        d[p].ndim = (uint32_t)pl.params[p].ndim;
        d[p].shape[0] = (uint64_t)pl.params[p].rows;
        d[p].shape[1] = (uint64_t)pl.params[p].cols;
        d[p].data = mem + at;
        at += rlb__param_numel(&pl.params[p]);
    }
    for (uint64_t i = 0; i < bc->params; i++)
        mem[i] = (float)(i % 1000) * 1e-3f;
    if (rlb_register(c, d, (size_t)pl.n) != 0) {
        fprintf(stderr, "register: %s\n", rlb_last_error(c));
        goto out;
    }
    double sync[64], control[64];
    for (int v = 1; v <= bc->versions; v++) {
        rlb_sync_stats st = {.struct_size = sizeof(st)};
        if (rlb_publish(c, (uint64_t)v, &st) != 0) {
            fprintf(stderr, "publish: %s\n", rlb_last_error(c));
            goto out;
        }
        sync[v - 1] = st.ms;
        control[v - 1] = stat_of(c, "control_ms_per_sync");
        bc->bytes = st.bytes;
    }
    bc->sync_ms = median(sync, bc->versions);
    bc->control_ms = median(control, bc->versions);
    bc->memcpy_ms = memcpy_ms(bc->bytes);
    rc = 0;
out:
    free(d);
    rlb_close(c);
    rlb__params_free(&pl);
    kill(pids[0], SIGTERM);
    for (int i = 0; i < n; i++)
        waitpid(pids[i], NULL, 0);
    return rc;
}

#ifdef RLB_BENCH_CUDA
int rlb__bench_sync_cuda(int argc, char **argv); /* bench_sync_cuda.c */
#endif

int main(int argc, char **argv)
{
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--device") && !strcmp(argv[i + 1], "cuda")) {
#ifdef RLB_BENCH_CUDA
            return rlb__bench_sync_cuda(argc, argv);
#else
            fprintf(stderr, "rlb-bench-sync: this build has no CUDA\n");
            return 1;
#endif
        }
    int quick = argc > 1 && !strcmp(argv[1], "--quick");
    signal(SIGPIPE, SIG_IGN);
    char dir[] = "/tmp/rlb-bench-sync-XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    char sock[96];
    snprintf(sock, sizeof(sock), "%s/bridge.sock", dir);
    rlb_model_config tiny, big, many;
    rlb__config_tiny(&tiny);
    big = tiny; /* ~105M parameters: Llama D 768, 8 layers, V 32000 */
    big.hidden = 768;
    big.intermediate = 2048;
    big.n_heads = 12;
    big.n_kv_heads = 12;
    big.head_dim = 64;
    big.n_layers = 8;
    big.vocab = 32000;
    many = tiny; /* 1 + 33 * 9 + 2 = 300 tensors */
    many.n_layers = 33;
    bcase cases[] = {
        {"demo", tiny, 1, 20, 0, 0, 0, 0, 0, 0},
        {"llama-100M", big, 1, quick ? 3 : 7, 0, 0, 0, 0, 0, 0},
        {"300-tensors", many, 1, 20, 0, 0, 0, 0, 0, 0},
        {"300-tensors", many, 2, 20, 0, 0, 0, 0, 0, 0},
        {"300-tensors", many, 4, 20, 0, 0, 0, 0, 0, 0},
    };
    int n = (int)(sizeof(cases) / sizeof(cases[0]));
    printf("%-12s %10s %8s %3s %12s %10s %8s %10s %8s %11s\n", "model", "params", "tensors",
           "TP", "bytes", "sync_ms", "GB/s", "memcpy_ms", "ratio", "control_ms");
    for (int i = 0; i < n; i++) {
        bcase *bc = &cases[i];
        if (run_case(bc, sock) != 0) {
            fprintf(stderr, "case %s TP %u failed\n", bc->name, bc->tp);
            rmdir(dir);
            return 1;
        }
        printf("%-12s %10llu %8llu %3u %12llu %10.3f %8.2f %10.3f %8.2f %11.3f\n", bc->name,
               (unsigned long long)bc->params, (unsigned long long)bc->tensors, bc->tp,
               (unsigned long long)bc->bytes, bc->sync_ms, bc->bytes / (bc->sync_ms * 1e6),
               bc->memcpy_ms, bc->sync_ms / bc->memcpy_ms, bc->control_ms);
    }
    printf("{\"bench\": \"sync\", \"demo_sync_ms\": %.4f, \"demo_memcpy_ms\": %.4f, "
           "\"llama100m_sync_ms\": %.3f, \"llama100m_memcpy_ms\": %.3f, \"llama100m_gbps\": %.3f, "
           "\"control_ms_per_sync\": {\"tp1\": %.4f, \"tp2\": %.4f, \"tp4\": %.4f}, "
           "\"control_target_ms\": 1.0}\n",
           cases[0].sync_ms, cases[0].memcpy_ms, cases[1].sync_ms, cases[1].memcpy_ms,
           cases[1].bytes / (cases[1].sync_ms * 1e6), cases[2].control_ms, cases[3].control_ms,
           cases[4].control_ms);
    rmdir(dir);
    return 0;
}
