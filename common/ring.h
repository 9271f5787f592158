/* ring.h: single-producer/single-consumer byte ring in shared memory (DESIGN §7).
 *
 * A ring is a wire format laid out in any memory the caller provides (malloc for tests, a
 * shm segment between processes): rlb__ring_memsize() says how many bytes, rlb__ring_init()
 * writes the header, and each side then attaches a process-local handle to it. Records are
 * {u32 len, u32 type|flags, u64 seq, payload}, 8-byte aligned; a padding record fills the
 * tail of the data area at wrap so every record is contiguous.
 *
 *   writer: claim(len) -> pointer + capacity to fill in place -> commit(type, used)  (or abort)
 *   reader: peek -> pointer + len into the ring -> release
 *
 * Messages of any size go through rlb__ring_send / rlb__ring_recv. One larger than
 * rlb__ring_frag_max streams as fragments of at most that size, each committed as soon as it
 * is filled, so the receiver copies fragment k out while the sender fills k+1 (a message
 * never waits for room for all of itself). rlb__ring_recv reassembles it into a buffer that
 * grows with the bytes that arrive; rlb__ring_recv_part hands its fragments out in place.
 *
 * Waiting: a side spins for spin_us, then sleeps on its process-shared semaphore in the
 * segment, in slices of slice_ms, rechecking its peer's liveness between slices. The other
 * side posts the semaphore only when the sleeper has announced that it sleeps. Every wait is
 * bounded by its timeout. Where the peer is a process that may write the segment with
 * anything (a client), the semaphores are not used at all: rlb__ring_set_wake_fds gives
 * each side an eventfd to sleep on and the peer's eventfd to write, which no peer can
 * corrupt, and which an event loop can poll with its other fds (rlb__ring_arm).
 *
 * Wake-ups are batched inside a fragmented message: the sender wakes a sleeping receiver at
 * the message's first and last fragment and once per quarter of the ring in between, the
 * receiver wakes a sleeping sender once per quarter of the ring it frees and at the
 * message's end, and either side first wakes its peer when it is about to wait itself, so
 * both are never asleep with work for the other pending. A side that is awake is never
 * woken (no system call), whatever the fragment count.
 *
 * The reader never trusts the segment: every index and length read from shared memory is
 * checked against the capacity, and a value no honest peer writes yields RLB_ECORRUPT (after
 * which the handle refuses further use), never an access outside the mapping.
 *
 * Functions return 0 or a negative RLB_E* code. A handle is used by one thread at a time.
 */
#ifndef RLB_COMMON_RING_H
#define RLB_COMMON_RING_H

#include <semaphore.h>
#include <stddef.h>
#include <stdint.h>

/* ---- Wire format --------------------------------------------------------------------- */

#define RLB_RING_MAGIC 0x31474e4952424c52ull /* "RLBRING1", little-endian */
#define RLB_RING_CACHELINE 64
#define RLB_RING_ALIGN 8u           /* every record starts and ends on this boundary */
#define RLB_RING_MIN_CAPACITY 4096u /* smallest data area; capacities are powers of two */
#define RLB_RING_MAX_CAPACITY (1ull << 40)

/* Record type word: the low 24 bits are the caller's message type, the high bits flags. */
#define RLB_RING_TYPE_MASK 0x00ffffffu
#define RLB_RING_F_FIRST (1u << 24) /* first fragment; payload opens with the u64 total length */
#define RLB_RING_F_MORE (1u << 25)  /* a middle fragment */
#define RLB_RING_F_LAST (1u << 26)  /* the final fragment */
#define RLB_RING_F_PAD (1u << 31)   /* padding: skip `len` bytes (its own header included) */
#define RLB_RING_F_FRAG (RLB_RING_F_FIRST | RLB_RING_F_MORE | RLB_RING_F_LAST)

typedef struct rlb__ring_rec {
    uint32_t len;  /* payload bytes after this header; for padding, bytes the pad covers */
    uint32_t type; /* message type | RLB_RING_F_* flags */
    uint64_t seq;  /* 0, 1, 2, ... per ring over data records; absent from padding */
} rlb__ring_rec;

/* Bytes a padding record needs: its len and type words (padding has no seq). */
#define RLB_RING_PAD_MIN 8u

/* One side of the ring: the line its owner writes on every operation... */
typedef struct rlb__ring_side_hot {
    uint64_t index;        /* producer: bytes committed; consumer: bytes released (monotonic) */
    uint64_t heartbeat_ns; /* CLOCK_MONOTONIC of the owner's last wait slice or beat */
    int32_t pid;           /* owner's pid, 0 until a process attaches this side */
    uint32_t closed;       /* 1 once the owner detached; the peer stops waiting for it */
    uint8_t pad_[RLB_RING_CACHELINE - 24];
} rlb__ring_side_hot;

/* ...and the line its peer reads on every operation, written by the owner only to sleep. */
typedef struct rlb__ring_side_wake {
    uint32_t sleeping; /* 1 while the owner may be blocked on sem; the peer then posts */
    uint32_t reserved_;
    sem_t sem; /* process-shared; the owner sleeps on it, the peer posts it */
    uint8_t pad_[RLB_RING_CACHELINE - 8 - sizeof(sem_t)];
} rlb__ring_side_wake;

typedef struct rlb__ring_shared {
    uint64_t magic;       /* RLB_RING_MAGIC */
    uint32_t abi_version; /* RLB_ABI_VERSION of the creator */
    uint32_t hdr_bytes;   /* sizeof(rlb__ring_shared): the data area starts here */
    uint64_t capacity;    /* bytes in the data area, a power of two */
    int32_t creator_pid;  /* process that ran rlb__ring_init */
    uint8_t pad_[RLB_RING_CACHELINE - 28];
    rlb__ring_side_hot prod;
    rlb__ring_side_wake prod_wake; /* the producer sleeps here when the ring is full */
    rlb__ring_side_hot cons;
    rlb__ring_side_wake cons_wake; /* the consumer sleeps here when the ring is empty */
} rlb__ring_shared;

_Static_assert(sizeof(rlb__ring_rec) == 16, "record header is 16 bytes");
_Static_assert(sizeof(sem_t) <= RLB_RING_CACHELINE - 8, "sem_t fits its cache line");
_Static_assert(sizeof(rlb__ring_side_hot) == RLB_RING_CACHELINE, "hot line is one line");
_Static_assert(sizeof(rlb__ring_side_wake) == RLB_RING_CACHELINE, "wake line is one line");
_Static_assert(offsetof(rlb__ring_shared, prod) == 1 * RLB_RING_CACHELINE, "prod offset");
_Static_assert(offsetof(rlb__ring_shared, prod_wake) == 2 * RLB_RING_CACHELINE, "prod_wake");
_Static_assert(offsetof(rlb__ring_shared, cons) == 3 * RLB_RING_CACHELINE, "cons offset");
_Static_assert(offsetof(rlb__ring_shared, cons_wake) == 4 * RLB_RING_CACHELINE, "cons_wake");
_Static_assert(sizeof(rlb__ring_shared) == 5 * RLB_RING_CACHELINE, "header is 5 lines");

/* ---- Process-local handle ------------------------------------------------------------ */

typedef enum rlb_ring_role { RLB_RING_PRODUCER = 1, RLB_RING_CONSUMER = 2 } rlb_ring_role;

/* Returns 1 while the peer is alive, 0 once it is known dead. Called between wait slices. */
typedef int (*rlb_ring_alive_fn)(void *arg);

typedef struct rlb_ring {
    rlb__ring_shared *shm;   /* header in the mapping */
    uint8_t *data;           /* data area: capacity bytes after the header */
    uint64_t capacity;       /* copied from the header once validated; never re-read */
    rlb_ring_role role;      /* which side this handle drives */
    uint64_t index;          /* our own index; the shared copy is written, never read back */
    uint64_t peer_index;     /* last validated value of the peer's index */
    uint64_t seq;            /* producer: seq of the next record; consumer: seq expected */
    uint64_t claim_at;       /* producer: index where the claimed record starts (after pad) */
    uint64_t claim_cap;      /* producer: payload capacity handed out; 0 = no claim open */
    uint64_t peek_bytes;     /* consumer: size of the record handed out by peek; 0 = none */
    int claim_open;          /* producer: a claim awaits commit or abort */
    int error;               /* sticky: RLB_ECORRUPT once corruption was seen, RLB_EINVAL
                                after close; every later call fails with it */
    int64_t spin_ns;         /* spin this long before sleeping (RLB_SPIN_US) */
    int64_t slice_ns;        /* longest single sleep before a liveness check (RLB_WAIT_SLICE_MS) */
    rlb_ring_alive_fn alive; /* liveness callback, or NULL to check the peer's pid */
    void *alive_arg;         /* passed to alive */
    int wait_fd;             /* eventfd we sleep on instead of our semaphore, or -1 */
    int wake_fd;             /* eventfd we write instead of posting the peer's, or -1 */
    uint64_t unwoken;        /* bytes committed (producer) or freed (consumer) since we last
                                woke the peer: the batch a deferred wake-up still owes */
} rlb_ring;

/* A record handed out by peek or recv. */
typedef struct rlb_ring_msg {
    const void *data; /* payload; for peek it points into the ring (valid until release) */
    size_t len;       /* payload bytes */
    uint32_t type;    /* caller's message type (flags removed) */
    uint32_t flags;   /* RLB_RING_F_FIRST/MORE/LAST for fragments from peek, else 0 */
    uint64_t seq;     /* record sequence number */
} rlb_ring_msg;

/* Bytes of memory a ring of `capacity` data bytes needs (header included), or 0 when the
 * capacity is not a power of two within [RLB_RING_MIN_CAPACITY, RLB_RING_MAX_CAPACITY]. */
size_t rlb__ring_memsize(uint64_t capacity);

/* Lays out an empty ring in mem (rlb__ring_memsize(capacity) bytes, 64-byte aligned) and
 * initialises its two process-shared semaphores. Returns 0, RLB_EINVAL or RLB_EIO. */
int rlb__ring_init(void *mem, uint64_t capacity);

/* Validates the ring in mem (mem_size bytes of mapping: magic, ABI version, capacity against
 * mem_size, indices) and attaches handle r as `role`, recording our pid and a heartbeat.
 * Returns 0, RLB_EINVAL (bad arguments), RLB_EVERSION, RLB_ECORRUPT or RLB_EEXIST (that side
 * is already attached). Wait parameters come from RLB_SPIN_US and RLB_WAIT_SLICE_MS; the
 * caller may change r->spin_ns and r->slice_ns afterwards. */
int rlb__ring_attach(rlb_ring *r, void *mem, size_t mem_size, rlb_ring_role role);

/* Marks our side closed and wakes the peer, which then sees RLB_EPEERDEAD once it has
 * drained what was committed. The memory stays mapped; unmapping is the caller's. */
void rlb__ring_close(rlb_ring *r);

/* Liveness of the peer, checked between wait slices: fn(arg) if set, otherwise the peer's
 * pid from the header (signal 0). */
void rlb__ring_set_liveness(rlb_ring *r, rlb_ring_alive_fn fn, void *arg);

/* Switches the ring's wake-up from the semaphores in the segment to two eventfds (borrowed,
 * not closed by the ring): we sleep on wait_fd and write wake_fd to wake the peer. Both
 * sides of a ring must use the same mechanism. Call it right after attach. */
void rlb__ring_set_wake_fds(rlb_ring *r, int wait_fd, int wake_fd);

/* For an event loop that sleeps in poll() over wait_fd (eventfd mode): announces that we
 * are about to sleep until the peer commits (consumer) or frees room for `need` payload
 * bytes (producer), then checks the condition once more. Returns 1 when it already holds
 * (nothing is announced: do not sleep), 0 when the peer will write wait_fd on its next
 * commit or release, or a negative code. rlb__ring_disarm withdraws the announcement
 * after the sleep. */
int rlb__ring_arm(rlb_ring *r, size_t need);
void rlb__ring_disarm(rlb_ring *r);

/* Refreshes our heartbeat; long-running owners call it from their loop. */
void rlb__ring_heartbeat(rlb_ring *r);
/* Milliseconds since the peer's last heartbeat (INT64_MAX before the peer attached). */
int64_t rlb__ring_peer_idle_ms(const rlb_ring *r);

/* Largest payload of one record: capacity/2 minus the header, so a record fits whatever the
 * write position once the ring is empty. */
size_t rlb__ring_max_payload(const rlb_ring *r);

/* Largest message rlb__ring_send writes as one record, and the largest fragment of a longer
 * one: RLB_RING_FRAG_BYTES, or rlb__ring_max_payload of a ring too small for that. */
#define RLB_RING_FRAG_BYTES (256u << 10)
size_t rlb__ring_frag_max(const rlb_ring *r);

/* Producer. Claims a record of at least len payload bytes, waiting up to timeout_ms (0 = do
 * not wait) for space. On success *data points at the payload in the ring and *cap (>= len)
 * is how much of it may be filled. Returns 0, RLB_EAGAIN / RLB_ETIMEDOUT (no space in time),
 * RLB_ETOOBIG (len > max payload), RLB_EPEERDEAD, RLB_ECORRUPT or RLB_EINVAL (a claim is
 * already open, or wrong role). */
int rlb__ring_claim(rlb_ring *r, size_t len, int timeout_ms, void **data, size_t *cap);
/* Publishes the claimed record with `used` (<= cap) payload bytes and message type `type`
 * (<= RLB_RING_TYPE_MASK), waking the consumer if it sleeps. Returns 0 or RLB_EINVAL. */
int rlb__ring_commit(rlb_ring *r, uint32_t type, size_t used);
/* Gives the claimed space back. Nothing of a claim is visible before commit in a
 * single-producer ring, so the slot simply becomes free again (no padding is published and
 * the consumer is not woken). */
void rlb__ring_abort(rlb_ring *r);

/* Consumer. Hands out the next data record (skipping padding), waiting up to timeout_ms.
 * msg->data points into the ring until rlb__ring_release. Peeking again without release
 * returns the same record. Returns 0, RLB_EAGAIN / RLB_ETIMEDOUT (empty), RLB_EPEERDEAD
 * (empty and the producer died or closed), RLB_ECORRUPT or RLB_EINVAL. */
int rlb__ring_peek(rlb_ring *r, int timeout_ms, rlb_ring_msg *msg);
/* Frees the record handed out by peek, waking the producer if it sleeps for space.
 * Returns 0 or RLB_EINVAL (nothing peeked). */
int rlb__ring_release(rlb_ring *r);

/* ---- Messages of any size ------------------------------------------------------------- */

/* Copies buf into the ring as one record, or as FIRST/MORE/LAST fragments (each committed as
 * soon as it is filled) when it is larger than rlb__ring_frag_max. timeout_ms bounds the
 * whole message. A failure after the first fragment leaves a partial message that the
 * receiver discards when the next one starts. Returns 0, RLB_ETIMEDOUT, RLB_EPEERDEAD,
 * RLB_ECORRUPT, RLB_ETOOBIG (len > 2^40) or RLB_EINVAL. */
int rlb__ring_send(rlb_ring *r, uint32_t type, const void *buf, size_t len, int timeout_ms);

/* rlb__ring_send resumable: sends buf from byte *off on, advancing *off past every record
 * committed, and returns 0 once the whole message is in the ring. A message of at most
 * rlb__ring_frag_max bytes goes whole or not at all; a larger one as fragments, so with
 * timeout_ms 0 an event loop streams a large message into a slow reader's ring without ever
 * waiting: RLB_EAGAIN (or RLB_ETIMEDOUT) with *off where to resume once the reader freed
 * room. Start with *off = 0; resume only with the same type, buf and len. Other returns as
 * rlb__ring_send. */
int rlb__ring_send_from(rlb_ring *r, uint32_t type, const void *buf, size_t len, size_t *off,
                        int timeout_ms);
/* Payload bytes the next record of a message of len bytes sent from *off needs in the ring
 * (what rlb__ring_arm of a producer waiting to resume should ask for). */
size_t rlb__ring_send_need(const rlb_ring *r, size_t len, size_t off);

/* Reassembly state of a receiver. Zero it, set max_msg, and free it with rlb__ring_rx_free. */
typedef struct rlb_ring_rx {
    size_t max_msg;   /* largest message accepted; larger ones are skipped with RLB_ETOOBIG */
    uint8_t *buf;     /* reassembly buffer, grown with realloc up to max_msg */
    size_t buf_cap;   /* bytes allocated in buf */
    size_t have;      /* bytes of the current fragmented message received so far */
    size_t total;     /* its announced length (checked against the fragments, never
                         trusted for an allocation) */
    uint32_t type;    /* its message type */
    int state;        /* idle, assembling, handing out parts, or skipping the rest of a
                         message (ring.c) */
    int holds_record; /* the last message or part returned still points into the ring */
    int private_copy; /* set by the owner: every message is copied out of the ring into
                         buf before it is returned, so a peer that rewrites a record after
                         it was committed cannot change what the caller decodes */
} rlb_ring_rx;

/* Receives the next whole message, waiting up to timeout_ms in all. A message sent as one
 * record is returned in place (msg->data points into the ring), unless rx->private_copy
 * asks for a copy; a fragmented one is reassembled into rx->buf, each fragment copied out
 * and freed as it arrives. msg stays valid until the next rlb__ring_recv or
 * rlb__ring_recv_done. Returns 0, RLB_EAGAIN / RLB_ETIMEDOUT, RLB_EPEERDEAD (a partial
 * message is discarded), RLB_ETOOBIG (a message over rx->max_msg was skipped; the next call
 * goes on with the following one), RLB_ENOMEM, RLB_ECORRUPT or RLB_EINVAL. */
int rlb__ring_recv(rlb_ring *r, rlb_ring_rx *rx, int timeout_ms, rlb_ring_msg *msg);

/* A part of a message handed out in place by rlb__ring_recv_part. */
typedef struct rlb_ring_part {
    const void *data; /* bytes [off, off + len) of the message, in the ring until the next
                         rlb__ring_recv_part or rlb__ring_recv_done */
    size_t len;       /* bytes in this part */
    size_t off;       /* where they lie in the message; 0 starts a message */
    size_t total;     /* the message's length as its first record announced it; the parts
                         are checked to add up to it exactly */
    uint32_t type;    /* the message's type */
    int last;         /* 1 when this part ends the message */
} rlb_ring_part;

/* Receives the next part of a message without copying it: a message sent as one record is
 * one part (off 0, last 1), a fragmented one a part per fragment, in order, each handed out
 * as soon as the sender committed it. The part handed out before is released first. Parts
 * are always in place (rx->private_copy does not apply): a consumer that needs the bytes in
 * one piece, or its own copy, uses rlb__ring_recv instead. One rx follows one of the two
 * calls for a whole message (switching midway is RLB_EINVAL).
 * Returns 0, RLB_EAGAIN / RLB_ETIMEDOUT (the message goes on at the next call), RLB_EABORTED
 * (the sender left the message in progress unfinished and started another: drop what its
 * parts gave; the next call returns the new one), RLB_EPEERDEAD (likewise dropped: the
 * sender is gone), RLB_ETOOBIG (a message over rx->max_msg was skipped), RLB_ECORRUPT (a
 * fragment header no honest sender writes: lengths that do not add up, a fragment of
 * another type or outside a message) or RLB_EINVAL. */
int rlb__ring_recv_part(rlb_ring *r, rlb_ring_rx *rx, int timeout_ms, rlb_ring_part *part);

/* Ends the view of the last received message or part, releasing its record if it was in
 * place. */
void rlb__ring_recv_done(rlb_ring *r, rlb_ring_rx *rx);
/* Frees rx's buffer and resets its state (max_msg is kept). */
void rlb__ring_rx_free(rlb_ring_rx *rx);

#endif /* RLB_COMMON_RING_H */
