/* fuzz_ring: libFuzzer target for the ring's reader (and writer) over a corrupted segment
 * (common/ring.c), built with AddressSanitizer and UndefinedBehaviorSanitizer.
 *
 * The input (fuzz_ring.h) is what a hostile peer could leave in shared memory: indices,
 * capacity and every byte of the data area. The ring lives in a heap block of exactly
 * rlb__ring_memsize bytes, so any access outside the segment is an ASan report. The
 * consumer must hand out only records that lie inside the data area (or, reassembled,
 * inside its own buffer and within max_msg; or, in parts, inside the data area and in order
 * within a message of at most max_msg), and otherwise fail with one of its documented
 * codes; RLB_ECORRUPT must then stick. The producer, facing a hostile consumer index, must
 * only hand out slots inside the data area.
 *
 *   fuzz_ring -max_total_time=60 WORK_DIR tests/fuzz/corpus/ring
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/ring.h"
#include "rlb/rlb.h"
#include "tests/fuzz/fuzz_ring.h"

#define STEPS 64 /* operations per input: enough to walk a 4 KiB ring several times */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Reads every byte of a handed-out buffer, so ASan sees any that lies outside. */
static void touch(const void *p, size_t len)
{
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < len; i++)
        sink ^= ((const uint8_t *)p)[i];
    (void)sink;
}

static int inside(const rlb_ring *r, const void *p, size_t len)
{
    const uint8_t *b = p;
    return b >= r->data && len <= r->capacity && b + len <= r->data + r->capacity;
}

/* After RLB_ECORRUPT every call must fail the same way. */
static void check_sticky(rlb_ring *r)
{
    rlb_ring_msg m;
    if (rlb__ring_peek(r, 0, &m) != RLB_ECORRUPT)
        abort();
}

static void drive_peek(rlb_ring *r)
{
    for (int i = 0; i < STEPS; i++) {
        rlb_ring_msg m;
        int rc = rlb__ring_peek(r, 0, &m);
        if (rc == RLB_EAGAIN)
            return;
        if (rc == RLB_ECORRUPT) {
            check_sticky(r);
            return;
        }
        if (rc != 0 || !inside(r, m.data, m.len) ||
            (m.flags & ~(uint32_t)RLB_RING_F_FRAG) || m.type > RLB_RING_TYPE_MASK)
            abort();
        touch(m.data, m.len);
        if (rlb__ring_release(r) != 0)
            abort();
    }
}

static void drive_recv(rlb_ring *r, size_t max_msg)
{
    rlb_ring_rx rx = {.max_msg = max_msg};
    for (int i = 0; i < STEPS; i++) {
        rlb_ring_msg m;
        int rc = rlb__ring_recv(r, &rx, 0, &m);
        if (rc == RLB_ETOOBIG)
            continue; /* a message over max_msg was skipped: the next call goes on */
        if (rc == RLB_EAGAIN)
            break;
        if (rc == RLB_ECORRUPT) {
            check_sticky(r);
            break;
        }
        int whole = m.data == rx.buf && m.len == rx.total;
        if (rc != 0 || m.len > max_msg || !(inside(r, m.data, m.len) || whole))
            abort();
        touch(m.data, m.len);
    }
    rlb__ring_recv_done(r, &rx);
    rlb__ring_rx_free(&rx);
}

static void drive_parts(rlb_ring *r, size_t max_msg)
{
    rlb_ring_rx rx = {.max_msg = max_msg};
    size_t next = 0; /* where the next part of an unfinished message must start */
    for (int i = 0; i < STEPS; i++) {
        rlb_ring_part p;
        int rc = rlb__ring_recv_part(r, &rx, 0, &p);
        if (rc == RLB_ETOOBIG || rc == RLB_EABORTED) {
            next = 0; /* skipped, or dropped: the next part starts a message */
            continue;
        }
        if (rc == RLB_EAGAIN)
            break;
        if (rc == RLB_ECORRUPT) {
            check_sticky(r);
            break;
        }
        if (rc != 0 || !inside(r, p.data, p.len) || p.off != next || p.total > max_msg ||
            p.len > p.total - p.off || (p.last && p.off + p.len != p.total))
            abort();
        touch(p.data, p.len);
        next = p.last ? 0 : p.off + p.len;
    }
    rlb__ring_recv_done(r, &rx);
    rlb__ring_rx_free(&rx);
}

/* Claims records of pseudo-random sizes (and sends messages larger than a record) as long
 * as the hostile consumer index lets it. */
static void drive_produce(rlb_ring *r, uint32_t seed)
{
    static uint8_t big[3 * FUZZ_RING_CAP];
    uint64_t x = seed | 1ull;
    for (int i = 0; i < STEPS; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        size_t len = (size_t)(x >> 33) % (FUZZ_RING_CAP / 2);
        int rc;
        if (i % 8 == 7) {
            rc = rlb__ring_send(r, 1, big, (size_t)(x >> 20) % sizeof(big), 0);
        } else {
            void *slot;
            size_t cap;
            rc = rlb__ring_claim(r, len, 0, &slot, &cap);
            if (rc == 0) {
                if (cap < len || !inside(r, slot, cap))
                    abort();
                memset(slot, 0xa5, cap);
                rc = rlb__ring_commit(r, 1, len);
                if (rc != 0)
                    abort();
            }
        }
        if (rc == RLB_ECORRUPT)
            return;
        if (rc != 0 && rc != RLB_EAGAIN && rc != RLB_ETOOBIG)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_ring_prefix p = {0};
    size_t head = size < sizeof(p) ? size : sizeof(p);
    memcpy(&p, data, head);
    size_t body = size - head < FUZZ_RING_CAP ? size - head : FUZZ_RING_CAP;

    size_t memsize = rlb__ring_memsize(FUZZ_RING_CAP);
    uint8_t *mem = aligned_alloc(RLB_RING_CACHELINE, memsize);
    if (!mem || rlb__ring_init(mem, FUZZ_RING_CAP) != 0)
        abort();
    rlb__ring_shared *s = (rlb__ring_shared *)mem;
    s->prod.index = p.prod_index;
    s->cons.index = p.cons_index;
    if (p.capacity)
        s->capacity = p.capacity;
    memset(mem + sizeof(*s), 0, FUZZ_RING_CAP);
    memcpy(mem + sizeof(*s), data + head, body);

    rlb_ring r;
    int producer = (p.mode & FUZZ_RING_PRODUCER) != 0;
    int rc = rlb__ring_attach(&r, mem, memsize,
                              producer ? RLB_RING_PRODUCER : RLB_RING_CONSUMER);
    if (rc == 0 && producer)
        drive_produce(&r, p.param);
    else if (rc == 0 && (p.mode & FUZZ_RING_PARTS))
        drive_parts(&r, p.param);
    else if (rc == 0 && (p.mode & FUZZ_RING_RECV))
        drive_recv(&r, p.param);
    else if (rc == 0)
        drive_peek(&r);
    else if (rc != RLB_ECORRUPT)
        abort(); /* the header is ours: only the fuzzed fields can be refused */
    sem_destroy(&s->prod_wake.sem);
    sem_destroy(&s->cons_wake.sem);
    free(mem);
    return 0;
}
