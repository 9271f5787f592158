/* tp_comm.h: collectives among the T tensor-parallel ranks of one replica (DESIGN §1: the
 * CPU backend all-reduces through shared memory; the GPU backend will plug NCCL in here).
 *
 * A communicator is a small vtable, so the engine does not know the transport:
 *   allreduce_sum(buf, n)       buf[i] = sum over ranks of buf[i]. Every rank adds the
 *                               ranks' values in rank order 0..T-1, so all ranks end with
 *                               bit-identical results (they then sample identically).
 *   allgather(send, n, recv)    recv[r * n + i] = rank r's send[i], for every rank.
 * Both are collective: every rank calls them in the same order with the same n.
 * They return 0, RLB_EPEERDEAD (a rank died or left), RLB_ETIMEDOUT (a rank stayed away
 * longer than the timeout) or RLB_EINVAL. Once one fails the communicator stays failed.
 *
 * Implementations: rlb__tp_comm_local (T = 1; copies only) and the shared-memory one
 * below, for T processes mapping one region (MAP_SHARED | MAP_ANONYMOUS before fork, or a
 * memfd passed around). Placement is separate from allocation: the creator sizes the
 * region with rlb__tp_shm_memsize, formats it once with rlb__tp_shm_init, then each rank
 * attaches. Every wait is bounded: waiters sleep on a futex in slices of RLB_WAIT_SLICE_MS
 * and between slices check each peer's liveness (a process-shared robust mutex the peer
 * holds while attached: a dead holder makes it "owner dead") and the overall timeout.
 * The liveness mutex belongs to the thread that attached; keep that thread alive while the
 * communicator is in use.
 */
#ifndef RLB_COMMON_TP_COMM_H
#define RLB_COMMON_TP_COMM_H

#include <stddef.h>
#include <stdint.h>

typedef struct rlb_tp_comm rlb_tp_comm;

typedef struct rlb_tp_comm_ops {
    int (*allreduce_sum)(rlb_tp_comm *comm, float *buf, size_t n);
    int (*allgather)(rlb_tp_comm *comm, const float *send, size_t n, float *recv);
    void (*destroy)(rlb_tp_comm *comm);
} rlb_tp_comm_ops;

struct rlb_tp_comm {
    const rlb_tp_comm_ops *ops; /* the transport */
    int rank;                   /* this rank, 0 .. size - 1 */
    int size;                   /* T */
};

static inline int rlb__tp_allreduce_sum(rlb_tp_comm *comm, float *buf, size_t n)
{
    return comm->ops->allreduce_sum(comm, buf, n);
}
static inline int rlb__tp_allgather(rlb_tp_comm *comm, const float *send, size_t n,
                                    float *recv)
{
    return comm->ops->allgather(comm, send, n, recv);
}
/* Destroys any communicator (NULL is accepted). */
void rlb__tp_comm_destroy(rlb_tp_comm *comm);

/* The single-rank communicator. Returns 0 or RLB_ENOMEM. */
int rlb__tp_comm_local(rlb_tp_comm **out);

/* ---- Shared memory ------------------------------------------------------------------- */

/* Bytes a region for `size` ranks exchanging up to `slot_floats` floats per call needs
 * (larger calls are split), or 0 for bad arguments. */
size_t rlb__tp_shm_memsize(int size, size_t slot_floats);
/* Formats `mem` (len bytes, 64-byte aligned, zero or garbage) for `size` ranks. Call once,
 * before any rank attaches. Returns 0, RLB_EINVAL or RLB_EIO (mutex setup failed). */
int rlb__tp_shm_init(void *mem, size_t len, int size, size_t slot_floats);
/* Attaches rank `rank` to a formatted region. `timeout_ms` bounds each collective's wait
 * for the peers (<= 0: the RLB_TP_TIMEOUT_MS knob). Returns 0, RLB_EINVAL (bad region or
 * rank), RLB_EEXIST (the rank is already attached), RLB_EPEERDEAD (a previous holder of
 * this rank died: the region is spoiled) or RLB_ENOMEM. */
int rlb__tp_comm_shm_attach(void *mem, size_t len, int rank, int timeout_ms,
                            rlb_tp_comm **out);

#endif /* RLB_COMMON_TP_COMM_H */
