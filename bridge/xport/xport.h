/* xport.h: the transport seam between the bridges of different nodes, the way NCCL's net
 * plugins and ggml-backend draw theirs: a versioned struct of function pointers
 * (rlb_xport_iface_v1) plus an opaque context, one constructor per implementation. The
 * cross-node exchange calls only through it and never includes an implementation's header.
 *
 * Model: each node's bridge holds one endpoint; endpoints learn each other's addresses
 * through the rendezvous store (rlb__xport_connect_all) and then move byte ranges with
 * tagged, asynchronous sends and receives, completed by test/progress, as UCX's tag API and
 * NCCL's isend/irecv/test do. A (peer, tag) pair matches one send with one receive; the
 * caller keeps a buffer untouched until its request completes. Implementations:
 *   ucx  host memory through UCX (xport_ucx.c; shm and tcp on one machine, RDMA on
 *        clusters), built where libucx-dev is present (RLB_HAVE_UCX).
 *   nccl GPU memory through NCCL's send / receive (xport_nccl.c), built in CUDA builds
 *        where NCCL is found (RLB_HAVE_NCCL_XPORT). NCCL has no tags: a pair's operations
 *        match in the order each side posts them, and a request completes with the group
 *        of requests that were queued with it (xport_nccl.c says what that asks of a
 *        caller).
 *
 * Memory: a transport allocates what it receives into (mem_alloc: host memory for ucx, device
 * memory of its GPU for nccl), so the exchange's staging is memory the transport can fill and
 * the reshard executor can read. A transport moving device memory also orders its sends after
 * the trainers' publish events (after_events): their kernels wrote what is sent.
 *
 * Failures: where the implementation can tell, a peer that dies makes its pending and later
 * requests fail with RLB_EPEERDEAD; where it cannot, the wait's no-progress timeout ends
 * it. Either way no waiter is left waiting for bytes that cannot come.
 */
#ifndef RLB_BRIDGE_XPORT_H
#define RLB_BRIDGE_XPORT_H

#include <stddef.h>
#include <stdint.h>

#include "common/store.h"

typedef struct rlb_xreq rlb_xreq; /* one pending send or receive */

typedef struct rlb_xport_iface_v1 {
    const char *name;
    /* This endpoint's address, for the other nodes (len bytes into buf of cap). */
    int (*address)(void *ctx, void *buf, size_t cap, size_t *len);
    /* Opens the connection to node peer at the address it published. */
    int (*connect)(void *ctx, int peer, const void *addr, size_t len);
    /* Starts sending len bytes at buf to peer under tag; *req completes it. */
    int (*isend)(void *ctx, int peer, uint64_t tag, const void *buf, size_t len, rlb_xreq **req);
    /* Starts receiving exactly len bytes from peer under tag into buf. */
    int (*irecv)(void *ctx, int peer, uint64_t tag, void *buf, size_t len, rlb_xreq **req);
    /* Makes progress and checks req: 0 when done (req is freed), RLB_EAGAIN while pending,
     * or the request's error (req is freed). */
    int (*test)(void *ctx, rlb_xreq *req);
    /* Cancels and frees a pending request (after a failure elsewhere). */
    void (*cancel)(void *ctx, rlb_xreq *req);
    /* Closes every connection and frees the context. */
    void (*destroy)(void *ctx);
    /* Allocates bytes (zeroed) this transport receives into: 0, RLB_ENOMEM or RLB_ECUDA. */
    int (*mem_alloc)(void *ctx, size_t bytes, void **out);
    /* Frees what mem_alloc gave (after every request using it completed). NULL is a no-op. */
    void (*mem_free)(void *ctx, void *p);
    /* Sends posted from now on start after the work ordered before these interprocess
     * events (cudaIpcEventHandle_t, 64 bytes each) completed. NULL where the transport moves
     * host memory only (nothing to wait for). 0 or RLB_ECUDA. */
    int (*after_events)(void *ctx, const uint8_t (*events)[64], uint32_t n);
    /* 128-bit digests (out[2 i], out[2 i + 1]) of n byte ranges (ptr[i], len[i]) of the
     * memory this transport moves, taken after the events of after_events: whether a chunk
     * changed since it was last sent (xnode_delta.h). NULL where that memory is the host's
     * (the exchange hashes it itself). 0 or a negative code. */
    int (*digest)(void *ctx, const void *const *ptr, const uint64_t *len, uint32_t n,
                  uint64_t *out);
} rlb_xport_iface_v1;

typedef struct rlb_xport {
    const rlb_xport_iface_v1 *iface; /* the implementation */
    void *ctx;                       /* its state */
    int node, nnodes;                /* this node and the job's nodes */
} rlb_xport;

/* The host-memory transport over UCX, for node `node` of `nnodes` (built only where UCX is:
 * RLB_HAVE_UCX). peer_errors: UCX detects dead peers itself (tcp only between processes of
 * one machine); 0: shared memory allowed, a dead peer shows as no progress. */
int rlb__xport_ucx_create(int node, int nnodes, int peer_errors, rlb_xport **out);

/* The GPU-memory transport over NCCL for node `node` of `nnodes`, on CUDA device `device`
 * (built only with CUDA and NCCL: RLB_HAVE_NCCL_XPORT). Its communicator is made by the
 * last connect (rlb__xport_connect_all), which returns once every node made it. Returns 0,
 * RLB_EINVAL, RLB_EUNSUPPORTED (the GPU is not usable) or RLB_ENOMEM. */
int rlb__xport_nccl_create(int node, int nnodes, int device, rlb_xport **out);
/* The CUDA ordinal of the GPU holding device memory at p (mapped in this process), or
 * RLB_EINVAL when p is not device memory (built with the nccl transport only). */
int rlb__xport_nccl_device_of(const void *p);

/* Publishes this endpoint's address under "<prefix>/addr/<node>" and connects to every
 * other node's, waiting up to timeout_ms for them. */
int rlb__xport_connect_all(rlb_xport *x, rlb_store *store, const char *prefix, int timeout_ms);
/* Waits for every request of reqs (n, NULL entries skipped) while they progress: it gives up
 * when no request completed for timeout_ms (so a long transfer of many chunks is not cut
 * short, and a dead peer is). On a failure or the timeout cancels the rest. Returns 0, the
 * first error, or RLB_ETIMEDOUT. */
int rlb__xport_wait_all(rlb_xport *x, rlb_xreq **reqs, int n, int timeout_ms);
/* Frees the transport. NULL is a no-op. */
void rlb__xport_destroy(rlb_xport *x);

#endif /* RLB_BRIDGE_XPORT_H */
