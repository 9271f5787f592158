/* test_xport_nccl: the NCCL transport between bridges (bridge/xport/xport_nccl.c) moving GPU
 * memory between two endpoints, each its own process, meeting through a rendezvous store
 * this test serves (the NCCL unique id goes through it).
 *
 * With two GPUs or more, node 0 is on GPU 0 and node 1 on GPU 1, and NCCL moves the bytes
 * within the host (peer access or shared memory). With one GPU both nodes are on GPU 0: NCCL
 * refuses two ranks of one communicator on one GPU of one host ("Duplicate GPU detected"),
 * and it tells hosts apart by a hash of NCCL_HOSTID where that is set, so each node process
 * sets its own NCCL_HOSTID ("rlb-xport-test-node-<n>") and NCCL_SOCKET_IFNAME=lo before any
 * CUDA or NCCL call (unless the environment sets them already): NCCL then takes the nodes
 * for two hosts and moves the bytes through its socket transport over loopback, as between
 * the bridges of two machines.
 *
 * Each node fills a device buffer with its own byte pattern and, in one go, posts the
 * receives of the other node's buffer and the sends of its own in chunks (the last one
 * short), both directions at once as the exchange does; then again one chunk at a time, each
 * waited for before the next (successive groups must match in order). Every received byte
 * is checked against the sender's pattern.
 *
 * The parent never touches CUDA (a process that forks after initializing CUDA may not use it
 * in the child): a probe child counts the GPUs. Exits 77 where no GPU is visible.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda_runtime_api.h>

#include "bridge/xport/xport.h"
#include "common/store.h"
#include "tests/gpu/gpu_probe.h"
#include "rlb/rlb.h"

#define RUN_ID "xport-nccl-test"
#define BYTES ((size_t)(40u << 20) + 4097) /* five chunks, the last one short */
#define CHUNK ((size_t)8 << 20)
#define N_CHUNKS ((int)((BYTES + CHUNK - 1) / CHUNK))
#define TIMEOUT_MS 60000
#define SKIP 77

static uint8_t pattern(int node, size_t i)
{
    return (uint8_t)(i * 131 + (i >> 13) + (size_t)node * 7 + 3);
}

static size_t chunk_len(int k)
{
    size_t off = (size_t)k * CHUNK;
    return BYTES - off < CHUNK ? BYTES - off : CHUNK;
}

/* Posts chunk k's receive from and send to the other node. */
static int post(rlb_xport *x, int k, uint8_t *recv, const uint8_t *send, rlb_xreq **reqs)
{
    int peer = 1 - x->node;
    size_t off = (size_t)k * CHUNK;
    int rc = x->iface->irecv(x->ctx, peer, (uint64_t)k, recv + off, chunk_len(k), &reqs[0]);
    if (rc == 0)
        rc = x->iface->isend(x->ctx, peer, (uint64_t)k, send + off, chunk_len(k), &reqs[1]);
    return rc;
}

/* Copies the received buffer back and compares it with the other node's pattern. Returns 0
 * or 1 (the first wrong byte printed). */
static int check(int node, const uint8_t *recv, uint8_t *host, const char *round)
{
    if (cudaMemcpy(host, recv, BYTES, cudaMemcpyDeviceToHost) != cudaSuccess)
        return fprintf(stderr, "node %d: copy back failed\n", node), 1;
    for (size_t i = 0; i < BYTES; i++)
        if (host[i] != pattern(1 - node, i)) {
            fprintf(stderr, "node %d, %s: byte %zu is %u, want %u\n", node, round, i, host[i],
                    pattern(1 - node, i));
            return 1;
        }
    return 0;
}

static int node_main(int node, int device, int port)
{
    rlb_store *st = NULL;
    rlb_xport *x = NULL;
    uint8_t *send = NULL, *recv = NULL, *host = malloc(BYTES);
    rlb_xreq *reqs[2 * N_CHUNKS];
    int rc = rlb__store_connect("127.0.0.1", port, RUN_ID, 10000, &st, NULL, 0);
    if (rc == 0)
        rc = rlb__xport_nccl_create(node, 2, device, &x);
    if (rc == 0)
        rc = rlb__xport_connect_all(x, st, "nccl", TIMEOUT_MS);
    if (rc < 0 || !host)
        return fprintf(stderr, "node %d: transport: %s\n", node, rlb_strerror(rc)), 1;
    if (cudaMalloc((void **)&send, BYTES) != cudaSuccess ||
        cudaMalloc((void **)&recv, BYTES) != cudaSuccess)
        return fprintf(stderr, "node %d: cudaMalloc failed\n", node), 1;
    for (size_t i = 0; i < BYTES; i++)
        host[i] = pattern(node, i);
    if (cudaMemcpy(send, host, BYTES, cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaMemset(recv, 0, BYTES) != cudaSuccess)
        return fprintf(stderr, "node %d: fill failed\n", node), 1;
    for (int k = 0; k < N_CHUNKS && rc == 0; k++)
        rc = post(x, k, recv, send, &reqs[2 * k]);
    if (rc == 0)
        rc = rlb__xport_wait_all(x, reqs, 2 * N_CHUNKS, TIMEOUT_MS);
    if (rc < 0)
        return fprintf(stderr, "node %d: all at once: %s\n", node, rlb_strerror(rc)), 1;
    int bad = check(node, recv, host, "all at once");
    cudaMemset(recv, 0, BYTES);
    for (int k = 0; k < N_CHUNKS && rc == 0 && !bad; k++) {
        rc = post(x, k, recv, send, reqs);
        if (rc == 0)
            rc = rlb__xport_wait_all(x, reqs, 2, TIMEOUT_MS);
    }
    if (rc < 0)
        return fprintf(stderr, "node %d: one at a time: %s\n", node, rlb_strerror(rc)), 1;
    bad = bad || check(node, recv, host, "one at a time");
    cudaFree(send);
    cudaFree(recv);
    free(host);
    rlb__xport_destroy(x);
    rlb__store_close(st);
    return bad;
}

/* One GPU: makes this node process a host of its own for NCCL, reached over loopback
 * (the top comment says why). Values the environment set stay. */
static void own_host(int node)
{
    char id[64];
    snprintf(id, sizeof(id), "rlb-xport-test-node-%d", node);
    setenv("NCCL_HOSTID", id, 0);
    setenv("NCCL_SOCKET_IFNAME", "lo", 0);
}

int main(void)
{
    int gpus = gp_count_gpus();
    if (gpus < 1) {
        printf("test_xport_nccl: no GPU visible: skipped\n");
        return SKIP;
    }
    if (gpus == 1)
        printf("test_xport_nccl: one GPU: both nodes on GPU 0, two hosts over loopback\n");
    rlb_store_server *srv = NULL;
    if (rlb__store_server_start("127.0.0.1", 0, RUN_ID, &srv) < 0)
        return fprintf(stderr, "cannot start the store\n"), 1;
    int port = rlb__store_server_port(srv);
    pid_t pid[2];
    for (int node = 0; node < 2; node++)
        if ((pid[node] = fork()) == 0) {
            alarm(120);
            if (gpus == 1)
                own_host(node);
            _exit(node_main(node, gpus == 1 ? 0 : node, port));
        }
    int ok = 1;
    for (int node = 0; node < 2; node++) {
        int st = 0;
        waitpid(pid[node], &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "node %d failed (status %d)\n", node, st);
            ok = 0;
        }
    }
    rlb__store_server_stop(srv);
    printf("test_xport_nccl: %s\n", ok ? "every byte arrived, both ways, in both rounds"
                                       : "FAILED");
    return ok ? 0 : 1;
}
