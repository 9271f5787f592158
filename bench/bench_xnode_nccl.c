/* bench_xnode_nccl.c: `rlb-bench-xnode --nccl`, the NCCL transport between bridges
 * (bridge/xport/xport_nccl.c) moving GPU memory from node 0 (GPU 0) to node 1 (GPU 1),
 * against an NCCL all-gather on the same two GPUs in the same run, reported as its bus
 * bandwidth the way nccl-tests does (algorithm bandwidth x (n - 1) / n).
 *
 * Two processes meet through a store this process serves (which never touches CUDA, so its
 * children may). The transport run posts every chunk (C MiB) of N MiB at once on both sides
 * as the exchange does, timed by node 1 from a barrier to the last chunk in place, node 1
 * checking the first and last byte of every chunk; the all-gather runs on a communicator of
 * its own over the same GPUs, each rank contributing N/2 MiB (N MiB gathered), timed around
 * a stream synchronize after one warm-up. Best of R runs each. Ratio: xnode_nccl_ratio =
 * transport GB/s / all-gather bus GB/s.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "bench/bench_xnode.h"
#include "bridge/xport/xport.h"
#include "common/clock.h"
#include "common/store.h"
#include "rlb/rlb.h"

#define RUN_ID "xnode-nccl-bench"
#define TIMEOUT_MS 120000
#define SENT 0xa5 /* every byte node 0 sends */

/* Both nodes reach barrier `name` (bounded by TIMEOUT_MS). */
static int barrier(rlb_store *st, const char *name)
{
    int64_t n = 0;
    int rc = rlb__store_add(st, name, 1, &n);
    for (int i = 0; rc == 0 && n < 2 && i < TIMEOUT_MS * 10; i++) {
        usleep(100);
        rc = rlb__store_add(st, name, 0, &n);
    }
    return rc < 0 ? rc : n >= 2 ? 0 : RLB_ETIMEDOUT;
}

/* One transport run of `bytes` in chunks; node 1 returns its time in *secs and checks the
 * first and last byte of each chunk. */
static int xport_run(rlb_xport *x, rlb_store *st, uint8_t *buf, size_t bytes, size_t chunk,
                     int run, double *secs)
{
    int n = (int)((bytes + chunk - 1) / chunk), rc = 0;
    rlb_xreq **reqs = calloc((size_t)n, sizeof(*reqs));
    char name[32];
    if (!reqs)
        return RLB_ENOMEM;
    if (x->node == 1 && cudaMemset(buf, 0, bytes) != cudaSuccess)
        rc = RLB_EIO;
    snprintf(name, sizeof(name), "xrun/%d", run);
    if (rc == 0)
        rc = barrier(st, name);
    double t0 = rlb__clock_s();
    for (int k = 0; k < n && rc == 0; k++) {
        size_t off = (size_t)k * chunk, len = bytes - off < chunk ? bytes - off : chunk;
        rc = x->node == 0 ? x->iface->isend(x->ctx, 1, (uint64_t)k, buf + off, len, &reqs[k])
                          : x->iface->irecv(x->ctx, 0, (uint64_t)k, buf + off, len, &reqs[k]);
    }
    if (rc == 0)
        rc = rlb__xport_wait_all(x, reqs, n, TIMEOUT_MS);
    *secs = rlb__clock_s() - t0;
    for (int k = 0; k < n && rc == 0 && x->node == 1; k++) {
        size_t off = (size_t)k * chunk, last = (off + chunk < bytes ? off + chunk : bytes) - 1;
        uint8_t a = 0, z = 0;
        if (cudaMemcpy(&a, buf + off, 1, cudaMemcpyDeviceToHost) != cudaSuccess ||
            cudaMemcpy(&z, buf + last, 1, cudaMemcpyDeviceToHost) != cudaSuccess ||
            a != SENT || z != SENT)
            rc = RLB_ECORRUPT;
    }
    free(reqs);
    return rc;
}

/* The all-gather's communicator, its own id through the store. */
static int allgather_comm(rlb_store *st, int node, ncclComm_t *comm)
{
    ncclUniqueId id;
    size_t len = 0;
    int rc = 0;
    if (node == 0)
        rc = ncclGetUniqueId(&id) == ncclSuccess ? rlb__store_set(st, "ag_id", &id, sizeof(id))
                                                : RLB_EIO;
    else
        rc = rlb__store_wait(st, "ag_id", TIMEOUT_MS, &id, sizeof(id), &len);
    if (rc == 0 && ncclCommInitRank(comm, 2, id, node) != ncclSuccess)
        rc = RLB_EIO;
    return rc;
}

/* One all-gather of `bytes` gathered (bytes / 2 from each rank); its time in *secs. */
static int allgather_run(ncclComm_t comm, cudaStream_t s, uint8_t *buf, size_t bytes, int node,
                         double *secs)
{
    size_t part = bytes / 2;
    double t0 = rlb__clock_s();
    if (ncclAllGather(buf + (size_t)node * part, buf, part, ncclUint8, comm, s) != ncclSuccess ||
        cudaStreamSynchronize(s) != cudaSuccess)
        return RLB_EIO;
    *secs = rlb__clock_s() - t0;
    return 0;
}

static int die(int node, const char *what, int rc)
{
    fprintf(stderr, "rlb-bench-xnode --nccl: node %d: %s: %s\n", node, what, rlb_strerror(rc));
    return 1;
}

typedef struct nccl_bench {
    size_t bytes, chunk;
    int runs;
} nccl_bench;

/* One node's whole benchmark; node 1 writes "xport_best allgather_best" to out_fd. */
static int node_main(int node, int port, void *arg, int out_fd)
{
    const nccl_bench *nb = arg;
    const size_t bytes = nb->bytes, chunk = nb->chunk;
    const int runs = nb->runs;
    rlb_store *st = NULL;
    rlb_xport *x = NULL;
    ncclComm_t ag = NULL;
    cudaStream_t s;
    uint8_t *buf = NULL;
    int rc = rlb__store_connect("127.0.0.1", port, RUN_ID, 10000, &st, NULL, 0);
    if (rc < 0)
        return die(node, "store", rc);
    if ((rc = rlb__xport_nccl_create(node, 2, node, &x)) < 0 ||
        (rc = rlb__xport_connect_all(x, st, "bench", TIMEOUT_MS)) < 0)
        return die(node, "transport", rc);
    if (cudaMalloc((void **)&buf, bytes) != cudaSuccess ||
        cudaMemset(buf, node == 0 ? SENT : 0, bytes) != cudaSuccess ||
        cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess)
        return die(node, "GPU buffer", RLB_ENOMEM);
    if ((rc = allgather_comm(st, node, &ag)) < 0)
        return die(node, "all-gather communicator", rc);
    double best_x = 1e30, best_a = 1e30, t;
    for (int run = 0; run < runs; run++) {
        if ((rc = xport_run(x, st, buf, bytes, chunk, run, &t)) < 0)
            return die(node, "transport run", rc);
        best_x = t < best_x ? t : best_x;
    }
    char name[32];
    for (int run = -1; run < runs; run++) { /* run -1: the warm-up */
        snprintf(name, sizeof(name), "agrun/%d", run);
        if ((rc = barrier(st, name)) < 0 || (rc = allgather_run(ag, s, buf, bytes, node, &t)) < 0)
            return die(node, "all-gather run", rc);
        best_a = run >= 0 && t < best_a ? t : best_a;
    }
    if (node == 1)
        dprintf(out_fd, "%.9f %.9f\n", best_x, best_a);
    barrier(st, "done"); /* neither leaves the communicators while the other still uses them */
    ncclCommDestroy(ag);
    cudaStreamDestroy(s);
    cudaFree(buf);
    rlb__xport_destroy(x);
    rlb__store_close(st);
    return 0;
}

int rlb__bench_xnode_nccl(size_t bytes, size_t chunk, int runs)
{
    nccl_bench nb = {bytes, chunk, runs};
    double bx, ba;
    if (rlb__bench_xnode_pair("rlb-bench-xnode --nccl (two GPUs are needed)", RUN_ID, node_main,
                              &nb, &bx, &ba))
        return 1;
    double gb = (double)bytes / 1e9, gx = gb / bx, bus = gb / ba * (2 - 1) / 2;
    printf("rlb-bench-xnode --nccl: %.2f GB from GPU 0 (node 0) to GPU 1 (node 1), chunks of "
           "%zu MiB, best of %d\n", gb, chunk >> 20, runs);
    printf("%-40s %10s %10s\n", "path", "seconds", "GB/s");
    printf("%-40s %10.4f %10.2f\n", "rlb xport (NCCL send/recv)", bx, gx);
    printf("%-40s %10.4f %10.2f\n", "NCCL all-gather, bus bandwidth", ba, bus);
    printf("%-40s %10.2f\n", "xnode_nccl_ratio (xport / all-gather bus)", gx / bus);
    printf("{\"bench\":\"xnode_nccl\",\"bytes\":%zu,\"chunk\":%zu,\"xport_gbs\":%.3f,"
           "\"allgather_bus_gbs\":%.3f,\"xnode_nccl_ratio\":%.3f}\n", bytes, chunk, gx, bus,
           gx / bus);
    return 0;
}
