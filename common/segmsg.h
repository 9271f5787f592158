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
 * the receiver imports it with the CUDA driver on the GPU the referring tensor (or the
 * worker's hello) names, instead of mapping it.
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
#define RLB_SEG_MAGIC_VMM 0x56474553u /* "SEGV": a CUDA VMM allocation's fd
                                         (cuMemExportToShareableHandle), not mappable by mmap;
                                         bytes is the allocation's size */
#define RLB_SEG_ID_WEIGHTS 1u     /* a worker's weight buffer */
#define RLB_SEG_ID_WEIGHTS_B 2u   /* a worker's second weight buffer (staged mode) */
#define RLB_SEG_ID_BRIDGE 0x80000000u /* first id of segments the bridge hands out */

typedef struct rlb__seg_msg {
    uint32_t magic;  /* RLB_SEG_MAGIC */
    uint32_t id;     /* segment id, >= 1 (what rlb_mem_ref.fd_index holds) */
    uint64_t bytes;  /* segment size; the receiver maps exactly this much (fstat must agree) */
} rlb__seg_msg;
_Static_assert(sizeof(rlb__seg_msg) == 16, "segment message is 16 bytes");

#endif /* RLB_COMMON_SEGMSG_H */
