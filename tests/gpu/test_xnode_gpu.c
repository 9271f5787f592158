/* test_xnode_gpu: the bridges of a multi-node job (bridge/xnode.h) whose trainers hold their
 * tensors in GPU memory: such bridges move the trainers' shards node to node through NCCL
 * (bridge/xport/xport_nccl.c) into GPU staging that the CUDA executor reads.
 *
 * Two nodes on this machine, each a bridge forked by the test (h_start_node), one rlb-worker
 * on the CUDA backend (TP 1, float32 weights, so the CPU engine is its reference) and one
 * trainer rank in a child process whose tensors are a device copy of its shards
 * (h_trainer_dev, cudaMalloc'ed): rank n of world 2 on node n. The bridges meet through a
 * rendezvous store this test serves. Both nodes use GPU 0: NCCL refuses two ranks of one
 * communicator on one GPU of one host, and it tells hosts apart by a hash of NCCL_HOSTID, so
 * each bridge starts with its own NCCL_HOSTID and NCCL_SOCKET_IFNAME=lo; NCCL then takes
 * the two nodes for two hosts and moves the bytes through its socket transport over
 * loopback, as between the bridges of two machines.
 *
 * - FSDP2 over both ranks, 4 versions; FSDP1, 3 versions: each version commits on both
 *   nodes, bytes came from the other node, and the greedy tokens served through each node's
 *   bridge equal `rlb generate --device cpu` on a checkpoint of that version's weights.
 * - LoRA adapters (rank 4) on every target of every layer, FSDP2 over both ranks, 3 versions:
 *   the greedy tokens equal `rlb generate` on a checkpoint of W + s * B * A (computed here in
 *   double), and from version 2 on each node receives exactly the factor bytes the other
 *   node's rank holds (the base's chunks hashed on the GPU, found unchanged, not sent).
 * - a dead peer: node 0's trainer waits in version 2 (node 1's has not published it) when
 *   node 1's bridge is killed with SIGKILL: node 0's publish fails within
 *   RLB_PEER_TIMEOUT_MS (3 s here) and a few seconds, and node 0's bridge still answers and
 *   stops cleanly.
 *
 * The test process never initializes CUDA (a CUDA context does not survive fork, and it
 * forks the bridges, workers and trainers): a probe child counts the GPUs, and the device
 * hooks run in the trainers' processes only. Exits 77 where no GPU is visible.
 */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <cuda_runtime_api.h>

#include "common/clock.h"
#include "common/store.h"
#include "tests/gpu/gpu_probe.h"
#include "model/lora.h"
#include "model/params.h"
#include "tests/integration/bridge_harness.h"

#define RUN_ID "xnode-gpu-test"
#define PEER_TIMEOUT_MS 3000
#define SLACK_S 5.0 /* seconds past RLB_PEER_TIMEOUT_MS a publish may take to fail */
#define MAX_TOKENS 8
#define SKIP 77
#define LORA_RANK 4
#define LORA_ALPHA 8.0f

static const int32_t prompt[3] = {5, 17, 42};

/* ---- The trainers' device memory (run in the trainer processes only) ----------------- */

static int cuda_alloc(size_t bytes, void **ptr)
{
    return cudaMalloc(ptr, bytes) == cudaSuccess ? 0 : -1;
}

/* Synchronous: the bytes are on the device when it returns (a copy from pageable memory may
 * return before its DMA ends). */
static int cuda_upload(void *dst, const void *src, size_t bytes)
{
    return cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice) == cudaSuccess &&
                   cudaDeviceSynchronize() == cudaSuccess
               ? 0
               : -1;
}

static void cuda_free(void *ptr)
{
    cudaFree(ptr);
}

static const h_dev_ops cuda_ops = {.alloc = cuda_alloc, .upload = cuda_upload,
                                   .free = cuda_free};

/* ---- The job --------------------------------------------------------------------------- */

/* The store and both nodes, each with its worker, trainer rank and an observer client. */
typedef struct job {
    rlb_store_server *srv;
    h_run r[2];
    h_child t[2];        /* trainer rank n on node n */
    rlb_client *tool[2]; /* generates and reads counters through node n's bridge */
} job;

/* Starts node n's bridge as a host of its own to NCCL (the top comment says why): the
 * forked bridge inherits NCCL_HOSTID and NCCL_SOCKET_IFNAME, which are restored after. */
static void start_node(job *j, int n, int port)
{
    static const char *const names[2] = {"NCCL_HOSTID", "NCCL_SOCKET_IFNAME"};
    char *saved[2], host[64];
    for (int i = 0; i < 2; i++)
        saved[i] = getenv(names[i]) ? strdup(getenv(names[i])) : NULL;
    snprintf(host, sizeof(host), "rlb-xnode-gpu-test-node-%d", n);
    setenv("NCCL_HOSTID", host, 1);
    setenv("NCCL_SOCKET_IFNAME", "lo", 1);
    h_node node = {.nnodes = 2, .node = n, .first_rank = (uint32_t)n, .n_ranks = 1,
                   .store_port = port, .run_id = RUN_ID};
    int rc = h_start_node(&j->r[n], RLB_SYNC_PAUSE, &node);
    for (int i = 0; i < 2; i++) {
        if (saved[i])
            setenv(names[i], saved[i], 1);
        else
            unsetenv(names[i]);
        free(saved[i]);
    }
    assert_int_equal(rc, 0);
}

/* list NULL: the tiny model's parameters (h_child_start); else that list, valued by value. */
static void job_start_list(job *j, h_layout layout, const rlb_param_list *list,
                           h_value_fn value)
{
    memset(j, 0, sizeof(*j));
    h_worker_device = RLB_DEVICE_CUDA;
    h_trainer_dev = &cuda_ops;
    assert_int_equal(rlb__store_server_start("127.0.0.1", 0, RUN_ID, &j->srv), 0);
    int port = rlb__store_server_port(j->srv);
    for (int n = 0; n < 2; n++) {
        start_node(j, n, port);
        assert_int_equal(h_workers(&j->r[n], 1, 1), 0);
    }
    for (int n = 0; n < 2; n++) {
        assert_int_equal(h_connect(&j->r[n], 0, 0, &j->tool[n]), 0);
        assert_int_equal(h_wait_workers(&j->r[n], j->tool[n], 1, 1), 0);
    }
    for (int n = 0; n < 2; n++)
        assert_int_equal(list ? h_child_start_list(&j->r[n], &j->t[n], (uint32_t)n, 2, layout,
                                                   list, value)
                              : h_child_start(&j->r[n], &j->t[n], (uint32_t)n, 2, layout),
                         0);
}

static void job_start(job *j, h_layout layout)
{
    job_start_list(j, layout, NULL, NULL);
}

static void job_stop(job *j)
{
    for (int n = 0; n < 2; n++) {
        h_child_stop(&j->t[n]);
        rlb_close(j->tool[n]);
    }
    h_cleanup();
    rlb__store_server_stop(j->srv);
}

/* Publishes v on both trainers at once; both must commit it. */
static void publish(job *j, uint64_t v)
{
    for (int n = 0; n < 2; n++)
        assert_int_equal(h_child_publish(&j->t[n], v), 0);
    for (int n = 0; n < 2; n++) {
        int rc = -1;
        assert_int_equal(h_child_result(&j->t[n], &rc), 0);
        if (rc)
            fprintf(stderr, "node %d: publish %llu: %s\n", n, (unsigned long long)v,
                    rlb_strerror(rc));
        assert_int_equal(rc, 0);
    }
}

/* versions versions in layout: after each commit, bytes came from the other node and each
 * node's bridge serves that version's reference tokens. */
static void sync_versions(h_layout layout, uint64_t versions)
{
    job j;
    double received[2] = {0, 0};
    job_start(&j, layout);
    for (uint64_t v = 1; v <= versions; v++) {
        publish(&j, v);
        for (int n = 0; n < 2; n++) {
            double now = h_stat(j.tool[n], "xnode_bytes_received");
            assert_true(now > received[n]);
            received[n] = now;
            assert_int_equal(h_check_greedy(&j.r[n], j.tool[n], v, 1, prompt, 3, MAX_TOKENS),
                             0);
        }
    }
    job_stop(&j);
}

static void test_fsdp2(void **state)
{
    sync_versions(H_FSDP2, 4);
    (void)state;
}

static void test_fsdp1(void **state)
{
    sync_versions(H_FSDP1, 3);
    (void)state;
}

/* ---- LoRA: only the adapters cross after the first version ------------------------------ */

/* Version v's merged weights W + s * B * A, in double, rounded once to float (every tiny
 * parameter, for h_reference_weights). */
static float **merged_weights(const rlb_param_list *l, uint64_t v)
{
    const rlb_param_list *tiny = h_params();
    float **data = calloc((size_t)tiny->n, sizeof(*data));
    for (int64_t p = 0; p < tiny->n; p++) {
        uint64_t numel = rlb__param_numel(&tiny->params[p]);
        data[p] = malloc(numel * sizeof(float));
        for (uint64_t i = 0; i < numel; i++)
            data[p][i] = h_weight(1, p, i);
    }
    for (int64_t k = 0; k < l->n_adapters; k++) {
        const rlb_param_adapter *a = &l->adapters[k];
        const rlb_param *w = &l->params[a->base];
        const char *an = l->params[a->a].name, *bn = l->params[a->b].name;
        for (int64_t o = 0; o < w->rows; o++)
            for (int64_t c = 0; c < w->cols; c++) {
                double sum = 0;
                for (int64_t j = 0; j < a->rank; j++)
                    sum += (double)h_factor_value(v, bn, (uint64_t)(o * a->rank + j)) *
                           (double)h_factor_value(v, an, (uint64_t)(j * w->cols + c));
                float *e = &data[a->base][o * w->cols + c];
                *e = (float)((double)h_weight(1, a->base, (uint64_t)(o * w->cols + c)) +
                             (double)a->scale * sum);
            }
    }
    return data;
}

/* LoRA adapters on every target of every layer, FSDP2 over both nodes' ranks, 3 versions:
 * each node's bridge serves W + s * B * A of the version, and from version 2 on each node
 * receives exactly the factor bytes the other node's rank holds (the base's chunks are
 * unchanged on the GPU: their digests say so, and the manifests skip them). */
static void test_lora(void **state)
{
    rlb_param_list list;
    char err[256] = "", name[96];
    const rlb_param_list *tiny = h_params();
    assert_int_equal(rlb__params_init(&list, &tiny->cfg, err, sizeof(err)), 0);
    for (int layer = 0; layer < (int)list.cfg.n_layers; layer++)
        for (size_t k = 0; k < H_LORA_TARGETS; k++) {
            snprintf(name, sizeof(name), "model.layers.%d.%s.weight", layer, h_lora_targets[k]);
            assert_int_equal(rlb__params_add_adapter(&list, name, LORA_RANK,
                                                     LORA_ALPHA / LORA_RANK, err, sizeof(err)),
                             0);
        }
    /* the factor bytes FSDP2 rank f holds */
    h_trainer shape = {.world = 2, .layout = H_FSDP2, .list = &list};
    uint64_t factors[2] = {0, 0};
    for (int64_t p = 0; p < list.n; p++)
        if (list.params[p].role == RLB_ROLE_LORA_A || list.params[p].role == RLB_ROLE_LORA_B)
            for (uint32_t f = 0; f < 2; f++)
                factors[f] += h_shard_bytes(&shape, p, f);
    job j;
    double received[2] = {0, 0};
    job_start_list(&j, H_FSDP2, &list, h_lora_value);
    int32_t got[64], want[64];
    for (uint64_t v = 1; v <= 3; v++) {
        publish(&j, v);
        float **merged = merged_weights(&list, v);
        char tag[32];
        snprintf(tag, sizeof(tag), "lora%llu", (unsigned long long)v);
        int nw = h_reference_weights(&j.r[0], tag, merged, 1, prompt, 3, MAX_TOKENS, want, 64);
        for (int64_t p = 0; p < tiny->n; p++)
            free(merged[p]);
        free(merged);
        assert_true(nw > 0);
        for (int n = 0; n < 2; n++) {
            double now = h_stat(j.tool[n], "xnode_bytes_received");
            fprintf(stderr, "version %llu: node %d received %.0f bytes (the other rank's "
                    "factors: %llu)\n", (unsigned long long)v, n, now - received[n],
                    (unsigned long long)factors[1 - n]);
            if (v > 1)
                assert_true(now - received[n] == (double)factors[1 - n]);
            else
                assert_true(now - received[n] > (double)factors[1 - n]);
            received[n] = now;
            int ng = h_greedy(j.tool[n], v, prompt, 3, MAX_TOKENS, got, 64);
            assert_int_equal(ng, nw);
            assert_memory_equal(got, want, sizeof(int32_t) * (size_t)nw);
        }
    }
    job_stop(&j);
    rlb__params_free(&list);
    (void)state;
}

/* Node 1's bridge dies while node 0's trainer waits in version 2: node 0 gives up on the
 * dead peer within the bound, and its bridge lives on. */
static void test_peer_killed(void **state)
{
    job j;
    int rc = 0;
    job_start(&j, H_FSDP2);
    publish(&j, 1);
    assert_int_equal(h_child_publish(&j.t[0], 2), 0);
    usleep(500 * 1000); /* node 0's bridge holds version 2 for node 1 */
    double t0 = rlb__clock_s();
    kill(j.r[1].bridge, SIGKILL);
    assert_int_equal(h_child_result(&j.t[0], &rc), 0);
    double took = rlb__clock_s() - t0;
    fprintf(stderr, "node 0's publish of version 2: %s, %.1f s after node 1's bridge died\n",
            rlb_strerror(rc), took);
    assert_int_not_equal(rc, 0);
    assert_true(took < PEER_TIMEOUT_MS / 1000.0 + SLACK_S);
    assert_true(h_stat(j.tool[0], "workers") == 1);
    for (int n = 0; n < 2; n++)
        h_child_stop(&j.t[n]);
    rlb_close(j.tool[1]);
    /* SIGTERM: it must exit by itself, its socket and shared memory gone. */
    assert_int_equal(h_stop(&j.r[0], j.tool[0]), 0);
    rlb__store_server_stop(j.srv);
    (void)state;
}

int main(void)
{
    if (gp_count_gpus() < 1) {
        printf("test_xnode_gpu: no GPU visible: skipped\n");
        return SKIP;
    }
    signal(SIGPIPE, SIG_IGN); /* a dead trainer's command pipe */
    char timeout[16];
    snprintf(timeout, sizeof(timeout), "%d", PEER_TIMEOUT_MS);
    setenv("RLB_PEER_TIMEOUT_MS", timeout, 1);
    setenv("RLB_THREADS", "1", 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_fsdp2, h_teardown),
        cmocka_unit_test_teardown(test_fsdp1, h_teardown),
        cmocka_unit_test_teardown(test_lora, h_teardown),
        cmocka_unit_test_teardown(test_peer_killed, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
