/* segmsg.h: how a shared-memory segment's fd travels to the bridge, and how a memory
 * reference names it afterwards (DESIGN §3, kind HOST_SHM).
 *
 * The fd goes over the connection's socket (rlb__conn_send_fds) with one rlb__seg_msg as
 * the datagram's payload and exactly one fd attached. The sender picks the segment id:
 * unique per connection, from 1 up, never reused while the segment is registered. A
 * memory reference of kind RLB_MEM_HOST_SHM then names the segment by that id in its
 * fd_index field, with offset and length inside it.
 *
 * The socket and the ring are two channels, so the fd is always sent BEFORE the first ring
 * message that refers to it; a receiver that meets an unknown segment id drains the socket
 * (bounded by RLB_PEER_TIMEOUT_MS) before it answers RLB_ENOTFOUND.
 *
 * A segment with magic RLB_SEG_MAGIC_VMM is device memory (DESIGN §3, kind CUDA_VMM_FD):
 * a virtual range made of n physical chunks (cuMemCreate allocations mapped back to back,
 * as PyTorch's expandable segments grow), each exported as a POSIX fd
 * (cuMemExportToShareableHandle). The datagram is the rlb__seg_msg followed by n uint64
 * chunk sizes in address order, with the n fds attached in the same order (1 <= n <=
 * RLB_SEG_VMM_MAX_CHUNKS); `bytes` is their sum. The receiver imports the chunks with the
 * CUDA driver and maps them back to back on the GPU the referring tensor (or the worker's
 * hello) names, instead of mmapping anything.
 *
 * Well-known ids from workers: a worker sends its weight buffer as segment 1 right after
 * its hello, and, in staged sync mode, its second weight buffer as segment 2. Segments the
 * bridge sends to a peer (a CPU tensor-parallel communicator, say) use ids from
 * RLB_SEG_ID_BRIDGE up, so the two directions never collide.
 */
#ifndef RLB_COMMON_SEGMSG_H
#define RLB_COMMON_SEGMSG_H

#include <stdint.h>

#define RLB_SEG_MAGIC 0x4d474553u /* "SEGM" */
#define RLB_SEG_MAGIC_VMM 0x56474553u /* "SEGV": CUDA VMM chunks (see above) */
#define RLB_SEG_VMM_MAX_CHUNKS 32u /* chunks (fds) in one VMM segment message; the
                                      most RLB_CONN_MAX_FDS lets one message carry */
#define RLB_SEG_ID_WEIGHTS 1u     /* a worker's weight buffer */
#define RLB_SEG_ID_WEIGHTS_B 2u   /* a worker's second weight buffer (staged mode) */
#define RLB_SEG_ID_BRIDGE 0x80000000u /* first id of segments the bridge hands out */

typedef struct rlb__seg_msg {
    uint32_t magic;  /* RLB_SEG_MAGIC, or RLB_SEG_MAGIC_VMM followed by the chunk sizes */
    uint32_t id;     /* segment id, >= 1 (what rlb_mem_ref.fd_index holds) */
    uint64_t bytes;  /* segment size; the receiver maps exactly this much (fstat must agree;
                        VMM: the sum of the chunk sizes) */
} rlb__seg_msg;
_Static_assert(sizeof(rlb__seg_msg) == 16, "segment message is 16 bytes");

#endif /* RLB_COMMON_SEGMSG_H */
