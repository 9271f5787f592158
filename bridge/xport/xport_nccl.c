/* xport_nccl.c: the GPU-memory transport over NCCL's point-to-point operations (xport.h).
 * One communicator of nnodes ranks (rank = node) on one GPU per bridge, one stream.
 *
 * Bootstrap through the seam: node 0's address is an ncclUniqueId, the others' a placeholder
 * byte; rlb__xport_connect_all passes them through the rendezvous store, and the last
 * connect of each node (every other node's address seen) runs ncclCommInitRank, which
 * returns once every node called it.
 *
 * Requests: NCCL has no tags and matches a pair's sends and receives in the order they are
 * issued, so each side must post its operations with a peer in the same order (the exchange
 * does: both sides walk the receiver's chunks in order; the tag is checked against nothing).
 * isend / irecv queue a request; the next test launches every queued one as one NCCL group
 * (so sends and receives between two nodes never wait on each other's launch order) followed
 * by an event, and a request is done when its group's event is. A request therefore
 * completes with its whole group: a caller that posts more only after some complete (a
 * bounded window) must put operations whose peers wait on each other in one group.
 * Buffers are device memory of this endpoint's GPU.
 *
 * Memory and order: staging is device memory of the endpoint's GPU (mem_alloc); sends read the
 * trainers' tensors, which their kernels wrote before each publish recorded an interprocess
 * event, so the stream waits on those events (after_events) before the next group, and the
 * chunks' digests (kernels/cuda/digest.h) are taken on the same stream after them.
 *
 * Failures: NCCL reports a dead peer or a broken connection as the communicator's async
 * error (ncclCommGetAsyncError), which fails every pending request; a launched operation
 * cannot be cancelled, so cancelling one aborts the communicator (the transport is then
 * unusable, like a dead peer).
 */
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "bridge/xport/xport.h"
#include "common/log.h"
#include "kernels/cuda/digest.h"
#include "rlb/rlb.h"

_Static_assert(sizeof(cudaIpcEventHandle_t) == 64, "a publish event handle is 64 bytes");

typedef struct nccl_group {
    cudaEvent_t done; /* recorded on the stream after the group */
    int refs;         /* requests of the group not freed yet */
} nccl_group;

typedef struct nccl_ctx {
    int node, nnodes;    /* this node (NCCL rank) and the job's nodes */
    int device;          /* the GPU */
    ncclUniqueId id;     /* node 0's, for the communicator */
    int have_id;         /* id is set (node 0: made; others: received) */
    int seen;            /* other nodes' addresses seen */
    ncclComm_t comm;     /* NULL until every address was seen */
    cudaStream_t stream; /* every operation's */
    int broken;          /* the communicator failed or was aborted */
    rlb_xreq **queued;   /* posted, not launched yet */
    int n_queued, cap_queued;
} nccl_ctx;

struct rlb_xreq {
    nccl_ctx *c;        /* owner */
    int send;           /* a send (else a receive) */
    int peer;           /* the other node */
    void *buf;          /* device memory */
    size_t len;         /* bytes */
    nccl_group *group;  /* launched in; NULL while queued */
};

static int from_nccl(ncclResult_t r)
{
    switch (r) {
    case ncclSuccess: return 0;
    case ncclInProgress: return RLB_EAGAIN;
    case ncclInvalidArgument:
    case ncclInvalidUsage: return RLB_EINVAL;
    case ncclRemoteError:
    case ncclSystemError: return RLB_EPEERDEAD;
    default: return RLB_EIO;
    }
}

static void group_unref(nccl_group *g)
{
    if (g && --g->refs == 0) {
        cudaEventDestroy(g->done);
        free(g);
    }
}

static void release(rlb_xreq *r)
{
    group_unref(r->group);
    free(r);
}

static int nccl_address(void *ctx, void *buf, size_t cap, size_t *len)
{
    nccl_ctx *c = ctx;
    if (c->node != 0) { /* only node 0's id matters: a placeholder byte */
        if (cap < 1)
            return RLB_ETOOBIG;
        *(uint8_t *)buf = 0;
        *len = 1;
        return 0;
    }
    if (!c->have_id) {
        ncclResult_t r = ncclGetUniqueId(&c->id);
        if (r != ncclSuccess)
            return from_nccl(r);
        c->have_id = 1;
    }
    if (cap < sizeof(c->id))
        return RLB_ETOOBIG;
    memcpy(buf, &c->id, sizeof(c->id));
    *len = sizeof(c->id);
    return 0;
}

static int nccl_connect(void *ctx, int peer, const void *addr, size_t len)
{
    nccl_ctx *c = ctx;
    if (peer < 0 || peer >= c->nnodes || peer == c->node || c->comm)
        return RLB_EINVAL;
    if (peer == 0) {
        if (len != sizeof(c->id))
            return RLB_EPROTO;
        memcpy(&c->id, addr, sizeof(c->id));
        c->have_id = 1;
    }
    if (++c->seen < c->nnodes - 1)
        return 0;
    if (!c->have_id || cudaSetDevice(c->device) != cudaSuccess)
        return RLB_EINVAL;
    ncclResult_t r = ncclCommInitRank(&c->comm, c->nnodes, c->id, c->node);
    if (r != ncclSuccess) {
        RLB_LOG_ERROR(RLB_SUB_BRIDGE, "xport nccl: node %d: ncclCommInitRank: %s", c->node,
                      ncclGetErrorString(r));
        c->comm = NULL;
        return from_nccl(r);
    }
    return 0;
}

static int enqueue(nccl_ctx *c, int send, int peer, void *buf, size_t len, rlb_xreq **req)
{
    if (!c->comm || peer < 0 || peer >= c->nnodes || peer == c->node || (len && !buf))
        return RLB_EINVAL;
    if (c->broken)
        return RLB_EPEERDEAD;
    if (c->n_queued == c->cap_queued) {
        int cap = c->cap_queued ? 2 * c->cap_queued : 64;
        rlb_xreq **q = realloc(c->queued, (size_t)cap * sizeof(*q));
        if (!q)
            return RLB_ENOMEM;
        c->queued = q;
        c->cap_queued = cap;
    }
    rlb_xreq *r = calloc(1, sizeof(*r));
    if (!r)
        return RLB_ENOMEM;
    *r = (rlb_xreq){.c = c, .send = send, .peer = peer, .buf = buf, .len = len};
    c->queued[c->n_queued++] = r;
    *req = r;
    return 0;
}

static int nccl_isend(void *ctx, int peer, uint64_t tag, const void *buf, size_t len,
                      rlb_xreq **req)
{
    (void)tag; /* NCCL matches in order */
    return enqueue(ctx, 1, peer, (void *)buf, len, req);
}

static int nccl_irecv(void *ctx, int peer, uint64_t tag, void *buf, size_t len, rlb_xreq **req)
{
    (void)tag;
    return enqueue(ctx, 0, peer, buf, len, req);
}

/* Launches every queued request as one group, then its event. */
static int launch(nccl_ctx *c)
{
    if (!c->n_queued)
        return 0;
    nccl_group *g = calloc(1, sizeof(*g));
    if (!g)
        return RLB_ENOMEM;
    if (cudaSetDevice(c->device) != cudaSuccess ||
        cudaEventCreateWithFlags(&g->done, cudaEventDisableTiming) != cudaSuccess) {
        free(g);
        return RLB_EIO;
    }
    ncclResult_t r = ncclGroupStart();
    for (int i = 0; i < c->n_queued && r == ncclSuccess; i++) {
        rlb_xreq *q = c->queued[i];
        r = q->send ? ncclSend(q->buf, q->len, ncclUint8, q->peer, c->comm, c->stream)
                    : ncclRecv(q->buf, q->len, ncclUint8, q->peer, c->comm, c->stream);
    }
    ncclResult_t e = ncclGroupEnd();
    r = r == ncclSuccess ? e : r;
    if (r == ncclSuccess && cudaEventRecord(g->done, c->stream) != cudaSuccess)
        r = ncclUnhandledCudaError;
    if (r != ncclSuccess) {
        RLB_LOG_ERROR(RLB_SUB_BRIDGE, "xport nccl: node %d: a group of %d operations failed "
                      "to launch: %s", c->node, c->n_queued, ncclGetErrorString(r));
        cudaEventDestroy(g->done);
        free(g);
        c->broken = 1;
        return from_nccl(r);
    }
    for (int i = 0; i < c->n_queued; i++) {
        c->queued[i]->group = g;
        g->refs++;
    }
    c->n_queued = 0;
    return 0;
}

/* Takes a request that failed out of the queue (if it is still there) and frees it. */
static void drop(nccl_ctx *c, rlb_xreq *r)
{
    for (int i = 0; i < c->n_queued; i++)
        if (c->queued[i] == r)
            c->queued[i] = c->queued[--c->n_queued];
    release(r);
}

static int nccl_test(void *ctx, rlb_xreq *r)
{
    nccl_ctx *c = ctx;
    int rc = c->broken || !c->comm ? RLB_EPEERDEAD : launch(c);
    if (rc == 0 && r->group) {
        cudaError_t e = cudaEventQuery(r->group->done);
        if (e == cudaSuccess) {
            release(r);
            return 0;
        }
        if (e != cudaErrorNotReady)
            rc = RLB_EIO;
    }
    ncclResult_t async = ncclSuccess;
    if (rc == 0 && ncclCommGetAsyncError(c->comm, &async) == ncclSuccess &&
        async != ncclSuccess && async != ncclInProgress) {
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "xport nccl: node %d: %s", c->node,
                     ncclGetErrorString(async));
        c->broken = 1;
        rc = from_nccl(async);
    }
    if (rc == 0)
        return RLB_EAGAIN;
    drop(c, r);
    return rc;
}

static void nccl_cancel(void *ctx, rlb_xreq *r)
{
    nccl_ctx *c = ctx;
    if (r->group && cudaEventQuery(r->group->done) == cudaErrorNotReady && c->comm) {
        /* launched operations cannot be called back: the communicator goes */
        ncclCommAbort(c->comm);
        c->comm = NULL;
        c->broken = 1;
    }
    drop(c, r);
}

static void nccl_destroy(void *ctx)
{
    nccl_ctx *c = ctx;
    cudaSetDevice(c->device);
    for (int i = 0; i < c->n_queued; i++)
        free(c->queued[i]);
    if (c->comm && c->broken)
        ncclCommAbort(c->comm);
    else if (c->comm && cudaStreamSynchronize(c->stream) == cudaSuccess)
        ncclCommDestroy(c->comm);
    else if (c->comm)
        ncclCommAbort(c->comm);
    if (c->stream)
        cudaStreamDestroy(c->stream);
    free(c->queued);
    free(c);
}

static int nccl_mem_alloc(void *ctx, size_t bytes, void **out)
{
    nccl_ctx *c = ctx;
    *out = NULL;
    if (cudaSetDevice(c->device) != cudaSuccess)
        return RLB_ECUDA;
    cudaError_t e = cudaMalloc(out, bytes ? bytes : 1);
    if (e == cudaSuccess)
        e = cudaMemset(*out, 0, bytes);
    if (e == cudaSuccess)
        return 0;
    RLB_LOG_ERROR(RLB_SUB_BRIDGE, "xport nccl: node %d: %zu bytes of staging on GPU %d: %s",
                  c->node, bytes, c->device, cudaGetErrorString(e));
    cudaFree(*out);
    cudaGetLastError();
    *out = NULL;
    return e == cudaErrorMemoryAllocation ? RLB_ENOMEM : RLB_ECUDA;
}

static void nccl_mem_free(void *ctx, void *p)
{
    nccl_ctx *c = ctx;
    if (!p)
        return;
    cudaSetDevice(c->device);
    cudaFree(p);
}

static int nccl_after_events(void *ctx, const uint8_t (*events)[64], uint32_t n)
{
    nccl_ctx *c = ctx;
    if (cudaSetDevice(c->device) != cudaSuccess)
        return RLB_ECUDA;
    for (uint32_t i = 0; i < n; i++) {
        cudaIpcEventHandle_t h;
        cudaEvent_t ev;
        memcpy(&h, events[i], sizeof(h));
        cudaError_t e = cudaIpcOpenEventHandle(&ev, h);
        if (e == cudaSuccess) {
            e = cudaStreamWaitEvent(c->stream, ev, 0);
            cudaEventDestroy(ev); /* the wait is enqueued: it holds what it needs */
        }
        if (e != cudaSuccess) {
            RLB_LOG_ERROR(RLB_SUB_BRIDGE, "xport nccl: node %d: a trainer's publish event: %s",
                          c->node, cudaGetErrorString(e));
            cudaGetLastError();
            return RLB_ECUDA;
        }
    }
    return 0;
}

static int nccl_digest(void *ctx, const void *const *ptr, const uint64_t *len, uint32_t n,
                       uint64_t *out)
{
    nccl_ctx *c = ctx;
    if (cudaSetDevice(c->device) != cudaSuccess)
        return RLB_ECUDA;
    return rlb__cuda_digest(ptr, len, n, out, c->stream); /* after the trainers' events */
}

int rlb__xport_nccl_device_of(const void *p)
{
    struct cudaPointerAttributes at;
    if (!p || cudaPointerGetAttributes(&at, p) != cudaSuccess) {
        cudaGetLastError();
        return RLB_EINVAL;
    }
    return at.type == cudaMemoryTypeDevice ? at.device : RLB_EINVAL;
}

static const rlb_xport_iface_v1 nccl_iface = {
    .name = "nccl",
    .address = nccl_address,
    .connect = nccl_connect,
    .isend = nccl_isend,
    .irecv = nccl_irecv,
    .test = nccl_test,
    .cancel = nccl_cancel,
    .destroy = nccl_destroy,
    .mem_alloc = nccl_mem_alloc,
    .mem_free = nccl_mem_free,
    .after_events = nccl_after_events,
    .digest = nccl_digest,
};

int rlb__xport_nccl_create(int node, int nnodes, int device, rlb_xport **out)
{
    *out = NULL;
    if (nnodes < 1 || node < 0 || node >= nnodes || device < 0)
        return RLB_EINVAL;
    rlb_xport *x = calloc(1, sizeof(*x));
    nccl_ctx *c = calloc(1, sizeof(*c));
    if (!x || !c) {
        free(x);
        free(c);
        return RLB_ENOMEM;
    }
    *c = (nccl_ctx){.node = node, .nnodes = nnodes, .device = device};
    if (cudaSetDevice(device) != cudaSuccess ||
        cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking) != cudaSuccess) {
        RLB_LOG_ERROR(RLB_SUB_BRIDGE, "xport nccl: node %d: GPU %d is not usable", node, device);
        free(x);
        free(c);
        return RLB_EUNSUPPORTED;
    }
    *x = (rlb_xport){.iface = &nccl_iface, .ctx = c, .node = node, .nnodes = nnodes};
    *out = x;
    return 0;
}
