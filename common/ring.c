/* ring.c: the SPSC byte ring of ring.h: placement, attach, claim/commit, peek/release, the
 * bounded sleep/wake handshake, and streaming of large messages as fragments.
 *
 * Invariants the producer keeps (and the consumer checks, trusting nothing):
 *   cons.index <= prod.index <= cons.index + capacity, both multiples of RLB_RING_ALIGN;
 *   every record lies inside the data area without wrapping; data records are numbered
 *   0, 1, 2, ...; a record's size is 16 + align8(len) and its payload at most max_payload.
 * Each side keeps its own index in the handle and only writes the shared copy, so a hostile
 * peer cannot move our position; the peer's index is re-validated on every load.
 */
#include "common/ring.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/atomics.h"
#include "common/clock.h"
#include "common/env.h"
#include "common/log.h"
#include "rlb/rlb.h"

#define REC_HDR ((uint64_t)sizeof(rlb__ring_rec))
/* Largest payload of one record regardless of capacity: the len field is 32 bits. */
#define MAX_RECORD_PAYLOAD (1ull << 31)
/* Largest message rlb__ring_send accepts (what a u64 total length and sane memory allow). */
#define MAX_MESSAGE (1ull << 40)
/* Spin iterations between two reads of the clock. */
#define SPIN_CLOCK_EVERY 16
/* Inside a fragmented message a sleeping peer is woken once per capacity >> this many bytes
 * (ring.h): often enough that it works while we go on, rarely enough that a message of
 * many fragments costs a few system calls, not one per fragment. */
#define WAKE_BATCH_SHIFT 2

/* What a receiver is doing: nothing, copying a fragmented message into its buffer
 * (rlb__ring_recv), handing one out in parts (rlb__ring_recv_part), or skipping the rest of
 * one (over max_msg, or out of memory). */
enum { RX_IDLE = 0, RX_ASSEMBLING, RX_PARTS, RX_SKIPPING };

static uint64_t align_up(uint64_t n)
{
    return (n + RLB_RING_ALIGN - 1) & ~(uint64_t)(RLB_RING_ALIGN - 1);
}

static uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* Deadline for a wait of timeout_ms; 0 means "do not wait" (CLOCK_MONOTONIC is never 0). */
static int64_t deadline_after(int timeout_ms)
{
    return timeout_ms == 0 ? 0 : rlb__clock_ns() + (int64_t)timeout_ms * 1000000;
}

static rlb__ring_side_hot *own_hot(const rlb_ring *r)
{
    return r->role == RLB_RING_PRODUCER ? &r->shm->prod : &r->shm->cons;
}

static rlb__ring_side_hot *peer_hot(const rlb_ring *r)
{
    return r->role == RLB_RING_PRODUCER ? &r->shm->cons : &r->shm->prod;
}

static rlb__ring_side_wake *own_wake(const rlb_ring *r)
{
    return r->role == RLB_RING_PRODUCER ? &r->shm->prod_wake : &r->shm->cons_wake;
}

static rlb__ring_side_wake *peer_wake(const rlb_ring *r)
{
    return r->role == RLB_RING_PRODUCER ? &r->shm->cons_wake : &r->shm->prod_wake;
}

/* Records a value no honest peer writes; the handle refuses every later call. */
static int corrupt(rlb_ring *r, const char *what, uint64_t value)
{
    RLB_LOG_ERROR(RLB_SUB_RING, "corrupt ring (%s side): %s (%llu)",
                  r->role == RLB_RING_PRODUCER ? "producer" : "consumer", what,
                  (unsigned long long)value);
    r->error = RLB_ECORRUPT;
    return RLB_ECORRUPT;
}

size_t rlb__ring_memsize(uint64_t capacity)
{
    if (capacity < RLB_RING_MIN_CAPACITY || capacity > RLB_RING_MAX_CAPACITY ||
        (capacity & (capacity - 1)) != 0)
        return 0;
    return sizeof(rlb__ring_shared) + (size_t)capacity;
}

int rlb__ring_init(void *mem, uint64_t capacity)
{
    if (!mem || rlb__ring_memsize(capacity) == 0 || (uintptr_t)mem % RLB_RING_CACHELINE)
        return RLB_EINVAL;
    rlb__ring_shared *s = mem;
    memset(s, 0, sizeof(*s));
    s->abi_version = RLB_ABI_VERSION;
    s->hdr_bytes = (uint32_t)sizeof(*s);
    s->capacity = capacity;
    s->creator_pid = (int32_t)getpid();
    if (sem_init(&s->prod_wake.sem, 1, 0) != 0 || sem_init(&s->cons_wake.sem, 1, 0) != 0) {
        RLB_LOG_ERROR(RLB_SUB_RING, "sem_init: %s", strerror(errno));
        return RLB_EIO;
    }
    /* Pairs with the load_acquire of magic in rlb__ring_attach: publishes the header and
     * the semaphores written above. */
    rlb_store_release(&s->magic, RLB_RING_MAGIC);
    return 0;
}

int rlb__ring_attach(rlb_ring *r, void *mem, size_t mem_size, rlb_ring_role role)
{
    if (!r || !mem || mem_size < sizeof(rlb__ring_shared) || (uintptr_t)mem % RLB_RING_CACHELINE ||
        (role != RLB_RING_PRODUCER && role != RLB_RING_CONSUMER))
        return RLB_EINVAL;
    memset(r, 0, sizeof(*r));
    r->shm = mem;
    r->role = role;
    r->wait_fd = -1;
    r->wake_fd = -1;
    /* Pairs with the store_release of magic in rlb__ring_init. */
    if (rlb_load_acquire(&r->shm->magic) != RLB_RING_MAGIC)
        return corrupt(r, "bad magic", 0);
    if (rlb_load_relaxed(&r->shm->abi_version) != RLB_ABI_VERSION ||
        rlb_load_relaxed(&r->shm->hdr_bytes) != sizeof(rlb__ring_shared)) {
        RLB_LOG_ERROR(RLB_SUB_RING, "ring ABI %u (header %u bytes), ours %u (%zu bytes)",
                      rlb_load_relaxed(&r->shm->abi_version),
                      rlb_load_relaxed(&r->shm->hdr_bytes), RLB_ABI_VERSION,
                      sizeof(rlb__ring_shared));
        r->error = RLB_EVERSION;
        return RLB_EVERSION;
    }
    uint64_t cap = rlb_load_relaxed(&r->shm->capacity);
    size_t need = rlb__ring_memsize(cap);
    if (need == 0 || need > mem_size)
        return corrupt(r, "capacity does not fit the mapping", cap);
    r->capacity = cap;
    r->data = (uint8_t *)mem + sizeof(rlb__ring_shared);

    /* Pair with the store_release of each index (commit / release): the indices a previous
     * owner left behind, consistent with the records they cover. */
    uint64_t tail = rlb_load_acquire(&r->shm->prod.index);
    uint64_t head = rlb_load_acquire(&r->shm->cons.index);
    if (tail - head > cap || tail % RLB_RING_ALIGN || head % RLB_RING_ALIGN)
        return corrupt(r, "indices out of range", tail - head);
    r->index = role == RLB_RING_PRODUCER ? tail : head;
    r->peer_index = role == RLB_RING_PRODUCER ? head : tail;

    /* A misuse check, not a lock: two handles on one side break the SPSC contract. */
    if (rlb_load_relaxed(&own_hot(r)->pid) != 0) {
        RLB_LOG_ERROR(RLB_SUB_RING, "ring %s side already attached by pid %d",
                      role == RLB_RING_PRODUCER ? "producer" : "consumer",
                      (int)rlb_load_relaxed(&own_hot(r)->pid));
        r->error = RLB_EEXIST;
        return RLB_EEXIST;
    }
    rlb_store_relaxed(&own_hot(r)->pid, (int32_t)getpid());
    rlb__ring_heartbeat(r);

    long long spin_us = rlb__env_int(RLB_KNOB_SPIN_US);
    long long slice_ms = rlb__env_int(RLB_KNOB_WAIT_SLICE_MS);
    r->spin_ns = spin_us > 0 ? spin_us * 1000 : 0;
    r->slice_ns = (slice_ms > 0 ? slice_ms : 1) * 1000000;
    return 0;
}

void rlb__ring_set_liveness(rlb_ring *r, rlb_ring_alive_fn fn, void *arg)
{
    r->alive = fn;
    r->alive_arg = arg;
}

void rlb__ring_set_wake_fds(rlb_ring *r, int wait_fd, int wake_fd)
{
    r->wait_fd = wait_fd;
    r->wake_fd = wake_fd;
}

void rlb__ring_heartbeat(rlb_ring *r)
{
    rlb_store_relaxed(&own_hot(r)->heartbeat_ns, (uint64_t)rlb__clock_ns());
}

int64_t rlb__ring_peer_idle_ms(const rlb_ring *r)
{
    if (rlb_load_relaxed(&peer_hot(r)->pid) == 0)
        return INT64_MAX;
    int64_t beat = (int64_t)rlb_load_relaxed(&peer_hot(r)->heartbeat_ns);
    int64_t idle = rlb__clock_ns() - beat;
    return idle < 0 ? 0 : idle / 1000000;
}

size_t rlb__ring_max_payload(const rlb_ring *r)
{
    return (size_t)min_u64(r->capacity / 2 - REC_HDR, MAX_RECORD_PAYLOAD);
}

size_t rlb__ring_frag_max(const rlb_ring *r)
{
    return (size_t)min_u64(rlb__ring_max_payload(r), RLB_RING_FRAG_BYTES);
}

/* Wakes a sleeping peer: one write to its eventfd (a full counter only means it is
 * already woken), or a post of its semaphore in the segment. */
static void signal_peer(rlb_ring *r)
{
    if (r->wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t n;
        do {
            n = write(r->wake_fd, &one, sizeof(one));
        } while (n < 0 && errno == EINTR);
        return;
    }
    sem_post(&peer_wake(r)->sem);
}

/* Wakes the peer if it announced that it sleeps on its semaphore (or eventfd).
 *
 * The sleep/wake handshake needs no fence: every write of a `sleeping` flag is an exchange
 * (a read-modify-write, acquire and release). Our exchange here comes after our index store;
 * the sleeper's exchange to 1 comes before its index load (sleep_slice). The two exchanges
 * are ordered on the flag: if ours comes second it reads 1 and we post; if the sleeper's
 * comes second it reads from our release, so it then sees our new index and does not sleep.
 * The exchange is unconditional: a plain load first would break that argument. */
static void wake_peer(rlb_ring *r)
{
    rlb__ring_side_wake *w = peer_wake(r);
    r->unwoken = 0;
    /* Pairs with the exchange to 1 in sleep_slice: see above. */
    if (rlb_exchange(&w->sleeping, 0u))
        signal_peer(r);
}

/* Wakes the peer for `bytes` we just committed or freed: at once, or, `batched` (inside a
 * fragmented message), once a batch of them accumulated (ring.h). Skipping the exchange is
 * what defers it: a peer that announced its sleep stays announced, so the exchange that
 * pays the debt (a later batch, the message's end, or wake_owed before we wait) still
 * finds it and wakes it. */
static void wake_for(rlb_ring *r, uint64_t bytes, int batched)
{
    r->unwoken += bytes;
    if (!batched || r->unwoken >= r->capacity >> WAKE_BATCH_SHIFT)
        wake_peer(r);
}

/* Pays a deferred wake-up. Called before we wait for the peer (or return to an event loop
 * that will): a peer asleep on work we deferred would otherwise never give us ours. */
static void wake_owed(rlb_ring *r)
{
    if (r->unwoken)
        wake_peer(r);
}

void rlb__ring_close(rlb_ring *r)
{
    if (!r || !r->shm || r->error == RLB_EINVAL)
        return;
    /* Pairs with the load_acquire of closed in peer_alive: every record committed (or
     * released) before this store is final when the peer sees the side closed. */
    rlb_store_release(&own_hot(r)->closed, 1u);
    /* Posted whether or not the peer announced a sleep, so it rechecks at once. */
    rlb_exchange(&peer_wake(r)->sleeping, 0u);
    signal_peer(r);
    r->error = RLB_EINVAL;
}

/* 1 while the peer may still act on the ring, 0 once it closed its side or died. */
static int peer_alive(const rlb_ring *r)
{
    if (rlb_load_acquire(&peer_hot(r)->closed))
        return 0;
    if (r->alive)
        return r->alive(r->alive_arg) != 0;
    int32_t pid = rlb_load_relaxed(&peer_hot(r)->pid);
    return pid <= 0 || kill(pid, 0) == 0 || errno != ESRCH;
}

/* Producer: loads and validates the consumer's index. Returns 0 or RLB_ECORRUPT. */
static int refresh_head(rlb_ring *r)
{
    /* Pairs with the store_release in release_bytes: the consumer is done reading every
     * byte below this index, so we may overwrite it. */
    uint64_t head = rlb_load_acquire(&r->shm->cons.index);
    /* peer_index <= head <= our tail, in modular arithmetic. */
    if (head - r->peer_index > r->index - r->peer_index || head % RLB_RING_ALIGN)
        return corrupt(r, "consumer index out of range", head);
    r->peer_index = head;
    return 0;
}

/* Consumer: loads and validates the producer's index. Returns 0 or RLB_ECORRUPT. */
static int refresh_tail(rlb_ring *r)
{
    /* Pairs with the store_release in commit_record: every record below this index is
     * completely written. */
    uint64_t tail = rlb_load_acquire(&r->shm->prod.index);
    /* head <= tail <= head + capacity, in modular arithmetic. We reload only once we have
     * consumed up to the old tail (head == old tail), so this also refuses a tail that
     * moved backwards. */
    if (tail - r->index > r->capacity || tail % RLB_RING_ALIGN)
        return corrupt(r, "producer index out of range", tail);
    r->peer_index = tail;
    return 0;
}

/* Producer: where a record of `need` bytes goes. Returns 1 and sets *at (index of the
 * record, past any wrap padding) and *room (bytes usable from there) when it fits now,
 * 0 when it does not, or RLB_ECORRUPT. */
static int place_record(rlb_ring *r, uint64_t need, uint64_t *at, uint64_t *room)
{
    for (int fresh = 0; fresh < 2; fresh++) {
        uint64_t free_bytes = r->capacity - (r->index - r->peer_index);
        uint64_t to_end = r->capacity - (r->index & (r->capacity - 1));
        if (to_end >= need && free_bytes >= need) {
            *at = r->index;
            *room = min_u64(to_end, free_bytes);
            return 1;
        }
        if (to_end < need && free_bytes >= to_end + need) {
            *at = r->index + to_end;
            *room = free_bytes - to_end;
            return 1;
        }
        /* Our cached view of the consumer is stale at most: reload it once. */
        if (fresh == 0) {
            int rc = refresh_head(r);
            if (rc < 0)
                return rc;
        }
    }
    return 0;
}

/* Consumer: 1 when a record is waiting, 0 when the ring is empty, or RLB_ECORRUPT. */
static int data_waiting(rlb_ring *r)
{
    if (r->peer_index != r->index)
        return 1;
    int rc = refresh_tail(r);
    return rc < 0 ? rc : r->peer_index != r->index;
}

/* The condition a side waits for: data (consumer) or room for `need` bytes (producer). */
static int ready(rlb_ring *r, uint64_t need)
{
    uint64_t at, room;
    return r->role == RLB_RING_CONSUMER ? data_waiting(r) : place_record(r, need, &at, &room);
}

/* Sleeps on our eventfd until `until` (CLOCK_MONOTONIC ns) or a write, then empties it. */
static void sleep_fd(int fd, int64_t until)
{
    int64_t left = until - rlb__clock_ns();
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (left > 0 && poll(&p, 1, (int)((left + 999999) / 1000000)) > 0) {
        uint64_t count;
        (void)!read(fd, &count, sizeof(count)); /* non-blocking: at most empties it */
    }
}

/* One sleep on our semaphore (or eventfd) of at most slice_ns, unless the condition turned
 * true after we announced the sleep. Returns 1 (ready), 0 (slept; check again) or a
 * negative code. */
static int sleep_slice(rlb_ring *r, uint64_t need, int64_t deadline)
{
    rlb__ring_side_wake *w = own_wake(r);
    /* Pairs with the exchange in wake_peer: after it, either the peer's exchange reads our
     * 1 and posts, or ours read from the peer's and the index it published is visible to
     * the check below. */
    rlb_exchange(&w->sleeping, 1u);
    int rc = ready(r, need);
    if (rc == 0) {
        int64_t until = rlb__clock_ns() + r->slice_ns;
        if (until > deadline)
            until = deadline;
        struct timespec ts = {.tv_sec = until / 1000000000, .tv_nsec = until % 1000000000};
        if (r->wait_fd >= 0) {
            sleep_fd(r->wait_fd, until);
        } else if (sem_clockwait(&w->sem, CLOCK_MONOTONIC, &ts) != 0 && errno != ETIMEDOUT &&
                   errno != EINTR) {
            rlb_exchange(&w->sleeping, 0u);
            return corrupt(r, "semaphore unusable (errno)", (uint64_t)errno);
        }
    }
    rlb_exchange(&w->sleeping, 0u);
    return rc;
}

int rlb__ring_arm(rlb_ring *r, size_t need)
{
    if (!r || !r->shm || r->error)
        return r && r->error ? r->error : RLB_EINVAL;
    uint64_t bytes = r->role == RLB_RING_PRODUCER ? REC_HDR + align_up(need) : 0;
    wake_owed(r);
    /* Pairs with the exchange in wake_peer, as in sleep_slice. */
    rlb_exchange(&own_wake(r)->sleeping, 1u);
    int rc = ready(r, bytes);
    if (rc != 0)
        rlb_exchange(&own_wake(r)->sleeping, 0u);
    return rc;
}

void rlb__ring_disarm(rlb_ring *r)
{
    if (r && r->shm && !r->error)
        rlb_exchange(&own_wake(r)->sleeping, 0u);
}

/* Waits until ready(r, need) or the deadline (0 = do not wait): spins for spin_ns, then
 * sleeps in slices, rechecking the peer's liveness between them. Returns 0, RLB_EAGAIN,
 * RLB_ETIMEDOUT, RLB_EPEERDEAD or RLB_ECORRUPT. */
static int wait_ready(rlb_ring *r, uint64_t need, int64_t deadline)
{
    int rc = ready(r, need);
    if (rc != 0)
        return rc < 0 ? rc : 0;
    wake_owed(r);
    if (deadline == 0)
        return RLB_EAGAIN;

    int64_t now = rlb__clock_ns();
    int64_t spin_end = now + r->spin_ns < deadline ? now + r->spin_ns : deadline;
    for (unsigned i = 1; now < spin_end; i++) {
        rlb_cpu_relax();
        rc = ready(r, need);
        if (rc != 0)
            return rc < 0 ? rc : 0;
        if (i % SPIN_CLOCK_EVERY == 0)
            now = rlb__clock_ns();
    }
    for (;;) {
        rlb__ring_heartbeat(r);
        if (!peer_alive(r)) {
            /* The peer may have committed (or released) just before it went away. */
            rc = ready(r, need);
            return rc < 0 ? rc : (rc ? 0 : RLB_EPEERDEAD);
        }
        if (rlb__clock_ns() >= deadline)
            return RLB_ETIMEDOUT;
        rc = sleep_slice(r, need, deadline);
        if (rc != 0)
            return rc < 0 ? rc : 0;
    }
}

static int usable(const rlb_ring *r, rlb_ring_role role)
{
    if (!r || !r->shm || r->role != role)
        return RLB_EINVAL;
    return r->error;
}

static int claim_until(rlb_ring *r, size_t len, int64_t deadline, void **data, size_t *cap)
{
    uint64_t need = REC_HDR + align_up(len);
    int rc = wait_ready(r, need, deadline);
    if (rc < 0)
        return rc;
    uint64_t at, room;
    rc = place_record(r, need, &at, &room);
    if (rc <= 0) /* wait_ready saw room and only we consume it: cannot happen */
        return rc < 0 ? rc : RLB_EAGAIN;
    r->claim_at = at;
    r->claim_cap = min_u64(room - REC_HDR, rlb__ring_max_payload(r));
    r->claim_open = 1;
    *data = r->data + (at & (r->capacity - 1)) + REC_HDR;
    *cap = (size_t)r->claim_cap;
    return 0;
}

int rlb__ring_claim(rlb_ring *r, size_t len, int timeout_ms, void **data, size_t *cap)
{
    int rc = usable(r, RLB_RING_PRODUCER);
    if (rc < 0)
        return rc;
    if (!data || !cap || r->claim_open || timeout_ms < 0)
        return RLB_EINVAL;
    if (len > rlb__ring_max_payload(r))
        return RLB_ETOOBIG;
    return claim_until(r, len, deadline_after(timeout_ms), data, cap);
}

/* Publishes the open claim as a record of `used` payload bytes with type word type_flags,
 * waking the consumer at once, or batched for a fragment in the middle of a message. */
static void commit_record(rlb_ring *r, uint32_t type_flags, size_t used, int batched)
{
    uint64_t mask = r->capacity - 1;
    if (r->claim_at != r->index) {
        rlb__ring_rec pad = {.len = (uint32_t)(r->claim_at - r->index), .type = RLB_RING_F_PAD};
        memcpy(r->data + (r->index & mask), &pad, RLB_RING_PAD_MIN);
    }
    rlb__ring_rec rec = {.len = (uint32_t)used, .type = type_flags, .seq = r->seq++};
    memcpy(r->data + (r->claim_at & mask), &rec, sizeof(rec));
    r->index = r->claim_at + REC_HDR + align_up(used);
    r->claim_open = 0;
    /* Pairs with the load_acquire in refresh_tail: publishes the padding, the record
     * header and the payload the caller filled in. */
    rlb_store_release(&r->shm->prod.index, r->index);
    wake_for(r, REC_HDR + align_up(used), batched);
}

int rlb__ring_commit(rlb_ring *r, uint32_t type, size_t used)
{
    int rc = usable(r, RLB_RING_PRODUCER);
    if (rc < 0)
        return rc;
    if (!r->claim_open || used > r->claim_cap || (type & ~RLB_RING_TYPE_MASK))
        return RLB_EINVAL;
    commit_record(r, type, used, 0);
    return 0;
}

void rlb__ring_abort(rlb_ring *r)
{
    if (r)
        r->claim_open = 0;
}

/* Consumer: frees `bytes` at our index and tells a producer that sleeps for room, at once
 * or batched (a fragment in the middle of a message). */
static void release_bytes(rlb_ring *r, uint64_t bytes, int batched)
{
    r->index += bytes;
    /* Pairs with the load_acquire in refresh_head: we are done reading below this index. */
    rlb_store_release(&r->shm->cons.index, r->index);
    wake_for(r, bytes, batched);
}

/* Consumer: decodes the record at our index (a record is waiting). Returns 1 after skipping
 * padding, 0 with msg filled for a data record, or RLB_ECORRUPT. */
static int read_record(rlb_ring *r, rlb_ring_msg *msg)
{
    uint64_t pos = r->index & (r->capacity - 1);
    uint64_t limit = min_u64(r->peer_index - r->index, r->capacity - pos);
    const uint8_t *at = r->data + pos;
    rlb__ring_rec rec;
    /* One copy of the header out of shared memory: the checks below and every later use
     * see the same values even if the peer rewrites them meanwhile. */
    memcpy(&rec, at, RLB_RING_PAD_MIN);
    if (rec.type & RLB_RING_F_PAD) {
        if (rec.type != RLB_RING_F_PAD || rec.len < RLB_RING_PAD_MIN ||
            rec.len % RLB_RING_ALIGN || rec.len > limit)
            return corrupt(r, "bad padding record", rec.len);
        release_bytes(r, rec.len, 0);
        return 1;
    }
    if (limit < REC_HDR)
        return corrupt(r, "record header past the end", limit);
    memcpy(&rec.seq, at + offsetof(rlb__ring_rec, seq), sizeof(rec.seq));
    uint64_t size = REC_HDR + align_up(rec.len);
    if (size > limit || rec.len > rlb__ring_max_payload(r))
        return corrupt(r, "record length out of range", rec.len);
    uint32_t flags = rec.type & ~RLB_RING_TYPE_MASK;
    if (flags != 0 && flags != RLB_RING_F_FIRST && flags != RLB_RING_F_MORE &&
        flags != RLB_RING_F_LAST)
        return corrupt(r, "bad record flags", flags);
    if (rec.seq != r->seq)
        return corrupt(r, "record out of sequence", rec.seq);
    msg->data = at + REC_HDR;
    msg->len = rec.len;
    msg->type = rec.type & RLB_RING_TYPE_MASK;
    msg->flags = flags;
    msg->seq = rec.seq;
    r->peek_bytes = size;
    return 0;
}

static int peek_until(rlb_ring *r, int64_t deadline, rlb_ring_msg *msg)
{
    for (;;) {
        int rc = wait_ready(r, 0, deadline);
        if (rc < 0)
            return rc;
        rc = read_record(r, msg);
        if (rc <= 0)
            return rc;
    }
}

int rlb__ring_peek(rlb_ring *r, int timeout_ms, rlb_ring_msg *msg)
{
    int rc = usable(r, RLB_RING_CONSUMER);
    if (rc < 0)
        return rc;
    if (!msg || timeout_ms < 0)
        return RLB_EINVAL;
    return peek_until(r, deadline_after(timeout_ms), msg);
}

/* Frees the record peek handed out (there is one); see release_bytes for `batched`. */
static void release_record(rlb_ring *r, int batched)
{
    r->seq++;
    release_bytes(r, r->peek_bytes, batched);
    r->peek_bytes = 0;
}

int rlb__ring_release(rlb_ring *r)
{
    int rc = usable(r, RLB_RING_CONSUMER);
    if (rc < 0)
        return rc;
    if (r->peek_bytes == 0)
        return RLB_EINVAL;
    release_record(r, 0);
    return 0;
}

/* ---- Fragmentation ------------------------------------------------------------------- */

/* What send_record writes: a whole message, or which part of a fragmented one. */
enum { PART_WHOLE, PART_FIRST, PART_REST };

/* Claims one record of at least min_len payload bytes, fills it with the u64 total length
 * (PART_FIRST only) and as much of src[0..len) as fits in a fragment, and commits it flagged
 * for `part`: a PART_REST record that holds all the rest is the LAST fragment. Returns the
 * bytes of src written, or a negative code. */
static long long send_record(rlb_ring *r, uint32_t type, int part, const uint8_t *src,
                             size_t len, size_t min_len, int64_t deadline)
{
    void *slot;
    size_t cap;
    int rc = claim_until(r, min_len, deadline, &slot, &cap);
    if (rc < 0)
        return rc;
    /* At most one fragment per record, so the consumer gets to work on it while we fill
     * the next one. */
    size_t room = cap < rlb__ring_frag_max(r) ? cap : rlb__ring_frag_max(r);
    uint64_t total = len;
    size_t hdr_len = part == PART_FIRST ? sizeof(total) : 0;
    size_t n = room - hdr_len < len ? room - hdr_len : len;
    uint32_t flags = part == PART_WHOLE   ? 0
                     : part == PART_FIRST ? RLB_RING_F_FIRST
                     : n == len           ? RLB_RING_F_LAST
                                          : RLB_RING_F_MORE;
    memcpy(slot, &total, hdr_len);
    if (n) /* src may be NULL for an empty message */
        memcpy((uint8_t *)slot + hdr_len, src, n);
    commit_record(r, type | flags, hdr_len + n, flags == RLB_RING_F_MORE);
    return (long long)n;
}

size_t rlb__ring_send_need(const rlb_ring *r, size_t len, size_t off)
{
    size_t frag_max = rlb__ring_frag_max(r);
    if (len <= frag_max)
        return len;
    /* Fragments take whatever room is free, but not less than an eighth of a fragment, so
     * a lagging consumer does not turn a message into a stream of tiny records. The first
     * one also carries the total length, which frag_max < len keeps from being last. */
    size_t frag_min = frag_max / 8;
    size_t want = (off == 0 ? sizeof(uint64_t) : 0) + (len - off);
    return want < frag_min ? want : frag_min;
}

int rlb__ring_send_from(rlb_ring *r, uint32_t type, const void *buf, size_t len, size_t *off,
                        int timeout_ms)
{
    int rc = usable(r, RLB_RING_PRODUCER);
    if (rc < 0)
        return rc;
    int whole = len <= rlb__ring_frag_max(r);
    if ((!buf && len) || !off || *off > len || (*off && whole) || r->claim_open ||
        timeout_ms < 0 || (type & ~RLB_RING_TYPE_MASK))
        return RLB_EINVAL;
    if (len > MAX_MESSAGE)
        return RLB_ETOOBIG;
    int64_t deadline = deadline_after(timeout_ms);
    const uint8_t *src = buf;
    do {
        int part = whole ? PART_WHOLE : *off == 0 ? PART_FIRST : PART_REST;
        long long n = send_record(r, type, part, src + *off, len - *off,
                                  rlb__ring_send_need(r, len, *off), deadline);
        if (n < 0)
            return (int)n;
        *off += (size_t)n;
    } while (*off < len);
    return 0;
}

int rlb__ring_send(rlb_ring *r, uint32_t type, const void *buf, size_t len, int timeout_ms)
{
    size_t off = 0;
    return rlb__ring_send_from(r, type, buf, len, &off, timeout_ms);
}

/* ---- Receiving: parts, and reassembly over them -------------------------------------- */

/* Drops a partially received message; `why` says what ended it (logged). */
static void rx_discard(rlb_ring_rx *rx, const char *why)
{
    if (rx->state == RX_ASSEMBLING || rx->state == RX_PARTS)
        RLB_LOG_WARN(RLB_SUB_RING, "discarding a partial message (%zu of %zu bytes): %s",
                     rx->have, rx->total, why);
    rx->state = RX_IDLE;
    rx->have = 0;
    rx->total = 0;
}

/* Frees the record rx holds, if any: batched while its message goes on, at once after its
 * last part (the producer may wait for that room to send the next message). */
static void rx_release(rlb_ring *r, rlb_ring_rx *rx)
{
    if (rx->holds_record) {
        rx->holds_record = 0;
        release_record(r, rx->state != RX_IDLE);
    }
}

/* Takes the peeked record m as the next part of what rx receives in `mode` (RX_ASSEMBLING
 * or RX_PARTS), checking it against the message so far: lengths must add up to the total
 * the first fragment announced, and a fragment keeps the first one's type. Returns 0 with
 * *part set and the record held, 1 when the record was skipped (released), RLB_EABORTED
 * (a new message starts while one is unfinished; the record stays for the next call),
 * RLB_ETOOBIG or RLB_ECORRUPT. */
static int take_record(rlb_ring *r, rlb_ring_rx *rx, int mode, const rlb_ring_msg *m,
                       rlb_ring_part *part)
{
    int starts = m->flags == 0 || m->flags == RLB_RING_F_FIRST;
    int last = m->flags == 0 || m->flags == RLB_RING_F_LAST;
    if (starts && (rx->state == RX_ASSEMBLING || rx->state == RX_PARTS)) {
        rx_discard(rx, "the sender started another message");
        return RLB_EABORTED;
    }
    if (starts) {
        rx->state = RX_IDLE; /* the rest of a message being skipped never came */
    } else if (rx->state == RX_SKIPPING) {
        if (last)
            rx->state = RX_IDLE;
        release_record(r, !last);
        return 1;
    } else if (rx->state == RX_IDLE) {
        return corrupt(r, "fragment outside a message", m->seq);
    }

    uint64_t total = m->len;
    size_t skip = 0; /* bytes of the record before the message's: the first's total */
    if (m->flags == RLB_RING_F_FIRST) {
        if (m->len < sizeof(total))
            return corrupt(r, "first fragment without a length", m->len);
        memcpy(&total, m->data, sizeof(total));
        skip = sizeof(total);
        if (total <= m->len - skip)
            return corrupt(r, "fragmented message shorter than its first fragment", total);
    }
    if (starts) {
        if (total > rx->max_msg) {
            RLB_LOG_WARN(RLB_SUB_RING, "skipping a %llu-byte message (limit %zu)",
                         (unsigned long long)total, rx->max_msg);
            rx->state = last ? RX_IDLE : RX_SKIPPING;
            release_record(r, 0);
            return RLB_ETOOBIG;
        }
        rx->total = (size_t)total;
        rx->have = 0;
        rx->type = m->type;
    } else {
        if (m->type != rx->type)
            return corrupt(r, "fragment of another message type", m->type);
        size_t left = rx->total - rx->have;
        if (last ? m->len != left : m->len >= left)
            return corrupt(r, "fragment lengths do not add up", m->len);
    }
    *part = (rlb_ring_part){.data = (const uint8_t *)m->data + skip,
                            .len = m->len - skip,
                            .off = rx->have,
                            .total = rx->total,
                            .type = rx->type,
                            .last = last};
    rx->have = last ? 0 : rx->have + part->len; /* bytes of a message still in progress */
    rx->state = last ? RX_IDLE : mode;
    rx->holds_record = 1;
    return 0;
}

/* The next part of a message for `mode` (see take_record), waiting until the deadline.
 * Returns 0, RLB_EABORTED, RLB_ETOOBIG or a code of peek; a message cut short by the
 * producer's death or by corruption is discarded. */
static int next_part(rlb_ring *r, rlb_ring_rx *rx, int mode, int64_t deadline,
                     rlb_ring_part *part)
{
    for (;;) {
        rlb_ring_msg m;
        int rc = peek_until(r, deadline, &m);
        if (rc == 0)
            rc = take_record(r, rx, mode, &m, part);
        if (rc == RLB_EPEERDEAD || rc == RLB_ECORRUPT)
            rx_discard(rx, rlb_strerror(rc));
        if (rc != 1)
            return rc;
    }
}

/* Starts a receive in `mode`: checks the arguments (out: where the caller wants the
 * result; a message begun with one call is finished with the same one), then frees the
 * record handed out before. Returns 0 or a negative code. */
static int rx_begin(rlb_ring *r, rlb_ring_rx *rx, int mode, int timeout_ms, const void *out)
{
    int rc = usable(r, RLB_RING_CONSUMER);
    if (rc < 0)
        return rc;
    int other = mode == RX_PARTS ? RX_ASSEMBLING : RX_PARTS;
    if (!rx || !out || timeout_ms < 0 || rx->state == other)
        return RLB_EINVAL;
    rx_release(r, rx);
    return 0;
}

/* Makes rx->buf hold at least `need` bytes of the rx->total being assembled. It grows
 * with the bytes that really arrived (doubling, capped at the total), never on the
 * declared total alone: a corrupt or hostile length costs no memory until its bytes come.
 * Returns 0 or RLB_ENOMEM. */
static int rx_reserve(rlb_ring_rx *rx, size_t need)
{
    if (need <= rx->buf_cap)
        return 0;
    size_t cap = rx->buf_cap * 2 > need ? rx->buf_cap * 2 : need;
    if (cap > rx->total)
        cap = rx->total;
    uint8_t *grown = realloc(rx->buf, cap);
    if (!grown)
        return RLB_ENOMEM;
    rx->buf = grown;
    rx->buf_cap = cap;
    return 0;
}

/* Copies a whole one-record message into rx->buf and releases its record, so what the
 * caller reads is ours alone. Returns 0 with *msg pointing at the copy, or RLB_ENOMEM (the
 * message is skipped). */
static int rx_copy_out(rlb_ring *r, rlb_ring_rx *rx, rlb_ring_msg *msg)
{
    if (msg->len > rx->buf_cap) {
        uint8_t *grown = realloc(rx->buf, msg->len);
        if (!grown) {
            rx_release(r, rx);
            return RLB_ENOMEM;
        }
        rx->buf = grown;
        rx->buf_cap = msg->len;
    }
    if (msg->len)
        memcpy(rx->buf, msg->data, msg->len);
    msg->data = rx->buf;
    rx_release(r, rx);
    return 0;
}

void rlb__ring_recv_done(rlb_ring *r, rlb_ring_rx *rx)
{
    if (rx && rx->holds_record) {
        rx_release(r, rx);
        wake_owed(r);
    }
}

void rlb__ring_rx_free(rlb_ring_rx *rx)
{
    if (!rx)
        return;
    free(rx->buf);
    size_t max_msg = rx->max_msg;
    memset(rx, 0, sizeof(*rx));
    rx->max_msg = max_msg;
}

int rlb__ring_recv_part(rlb_ring *r, rlb_ring_rx *rx, int timeout_ms, rlb_ring_part *part)
{
    int rc = rx_begin(r, rx, RX_PARTS, timeout_ms, part);
    if (rc < 0)
        return rc;
    return next_part(r, rx, RX_PARTS, deadline_after(timeout_ms), part);
}

int rlb__ring_recv(rlb_ring *r, rlb_ring_rx *rx, int timeout_ms, rlb_ring_msg *msg)
{
    int rc = rx_begin(r, rx, RX_ASSEMBLING, timeout_ms, msg);
    if (rc < 0)
        return rc;
    int64_t deadline = deadline_after(timeout_ms);
    for (;;) {
        rlb_ring_part p;
        rc = next_part(r, rx, RX_ASSEMBLING, deadline, &p);
        if (rc == RLB_EABORTED)
            continue; /* nothing of the dropped message was handed out */
        if (rc < 0)
            return rc;
        /* While a record is held, the ring's seq is that record's. */
        *msg = (rlb_ring_msg){.data = p.data, .len = p.len, .type = p.type, .seq = r->seq};
        if (p.off == 0 && p.last)
            return rx->private_copy ? rx_copy_out(r, rx, msg) : 0;
        rc = rx_reserve(rx, p.off + p.len);
        if (rc < 0) {
            if (!p.last)
                rx->state = RX_SKIPPING; /* the rest of the message is skipped */
            rx_release(r, rx);
            return rc;
        }
        if (p.len) /* buf may still be NULL when every fragment so far was empty */
            memcpy(rx->buf + p.off, p.data, p.len);
        rx_release(r, rx);
        if (p.last) {
            msg->data = rx->buf;
            msg->len = rx->total;
            return 0;
        }
    }
}
