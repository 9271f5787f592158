/* test_ring: the SPSC ring (common/ring.c) in one process, on malloc'ed memory.
 *
 * Positions, padding and record counts are worked out by hand from the wire format in
 * ring.h (16-byte header + payload rounded up to 8; a padding record fills the rest of the
 * data area at wrap; one record is at most capacity/2 - 16 payload bytes; a message over
 * rlb__ring_frag_max goes as fragments of at most that). Corruption tests write hostile
 * records and indices straight into the segment and expect RLB_ECORRUPT.
 *
 *   test_ring                      the unit tests
 *   test_ring --write-corpus DIR   write the ring fuzzer's seeds (tests/fuzz/corpus/ring)
 */
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/clock.h"
#include "common/ring.h"
#include "rlb/rlb.h"
#include "tests/fuzz/fuzz_ring.h"

#define CAP 4096u
#define HDR 16u

typedef struct fixture {
    void *mem;     /* the segment: header + data area */
    rlb_ring prod; /* producer handle */
    rlb_ring cons; /* consumer handle */
} fixture;

static fixture *make(uint64_t cap)
{
    fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    size_t size = rlb__ring_memsize(cap);
    assert_true(size > 0);
    f->mem = aligned_alloc(64, size);
    assert_non_null(f->mem);
    assert_int_equal(rlb__ring_init(f->mem, cap), 0);
    assert_int_equal(rlb__ring_attach(&f->prod, f->mem, size, RLB_RING_PRODUCER), 0);
    assert_int_equal(rlb__ring_attach(&f->cons, f->mem, size, RLB_RING_CONSUMER), 0);
    return f;
}

static void destroy(fixture *f)
{
    free(f->mem);
    free(f);
}

static rlb__ring_shared *hdr(fixture *f)
{
    return f->mem;
}

static uint8_t *data(fixture *f)
{
    return (uint8_t *)f->mem + sizeof(rlb__ring_shared);
}

/* Claims len bytes, fills them with `fill`, commits as `type`. */
static void put(fixture *f, uint32_t type, size_t len, uint8_t fill)
{
    void *p;
    size_t cap;
    assert_int_equal(rlb__ring_claim(&f->prod, len, 0, &p, &cap), 0);
    assert_true(cap >= len);
    memset(p, fill, len);
    assert_int_equal(rlb__ring_commit(&f->prod, type, len), 0);
}

/* Peeks the next record, checks type, length, seq and fill, releases it. */
static void get(fixture *f, uint32_t type, size_t len, uint8_t fill, uint64_t seq)
{
    rlb_ring_msg m;
    assert_int_equal(rlb__ring_peek(&f->cons, 0, &m), 0);
    assert_int_equal(m.type, type);
    assert_int_equal(m.len, len);
    assert_int_equal(m.flags, 0);
    assert_int_equal(m.seq, seq);
    for (size_t i = 0; i < len; i++)
        assert_int_equal(((const uint8_t *)m.data)[i], fill);
    assert_int_equal(rlb__ring_release(&f->cons), 0);
}

/* Writes a record header by hand at data offset pos (the wire format of ring.h). */
static void raw_record(fixture *f, uint64_t pos, uint32_t len, uint32_t type, uint64_t seq)
{
    memcpy(data(f) + pos, &len, 4);
    memcpy(data(f) + pos + 4, &type, 4);
    memcpy(data(f) + pos + 8, &seq, 8);
}

static void test_memsize(void **state)
{
    assert_int_equal(rlb__ring_memsize(4096), 320 + 4096);
    assert_int_equal(rlb__ring_memsize(1u << 20), 320 + (1u << 20));
    assert_int_equal(rlb__ring_memsize(4095), 0);
    assert_int_equal(rlb__ring_memsize(6144), 0);
    assert_int_equal(rlb__ring_memsize(2048), 0);
    assert_int_equal(rlb__ring_memsize(0), 0);
    assert_int_equal(rlb__ring_memsize(1ull << 41), 0);
    void *mem = aligned_alloc(64, 320 + 4096);
    assert_int_equal(rlb__ring_init(mem, 1000), RLB_EINVAL);
    assert_int_equal(rlb__ring_init((uint8_t *)mem + 8, 4096), RLB_EINVAL);
    assert_int_equal(rlb__ring_init(NULL, 4096), RLB_EINVAL);
    free(mem);
}

static void test_attach_validates(void **state)
{
    fixture *f = make(CAP);
    size_t size = rlb__ring_memsize(CAP);
    rlb_ring r;
    /* Each side attaches once. */
    assert_int_equal(rlb__ring_attach(&r, f->mem, size, RLB_RING_PRODUCER), RLB_EEXIST);
    assert_int_equal(rlb__ring_attach(&r, f->mem, size, RLB_RING_CONSUMER), RLB_EEXIST);
    hdr(f)->cons.pid = 0;
    /* The mapping must hold the whole data area. */
    assert_int_equal(rlb__ring_attach(&r, f->mem, size - 8, RLB_RING_CONSUMER), RLB_ECORRUPT);
    assert_int_equal(rlb__ring_attach(&r, f->mem, size, 3), RLB_EINVAL);
    hdr(f)->abi_version = RLB_ABI_VERSION + 1;
    assert_int_equal(rlb__ring_attach(&r, f->mem, size, RLB_RING_CONSUMER), RLB_EVERSION);
    hdr(f)->abi_version = RLB_ABI_VERSION;
    hdr(f)->capacity = CAP + 8;
    assert_int_equal(rlb__ring_attach(&r, f->mem, size, RLB_RING_CONSUMER), RLB_ECORRUPT);
    hdr(f)->capacity = CAP * 2;
    assert_int_equal(rlb__ring_attach(&r, f->mem, size, RLB_RING_CONSUMER), RLB_ECORRUPT);
    hdr(f)->capacity = CAP;
    hdr(f)->prod.index = CAP + 8;
    assert_int_equal(rlb__ring_attach(&r, f->mem, size, RLB_RING_CONSUMER), RLB_ECORRUPT);
    hdr(f)->prod.index = 0;
    hdr(f)->magic ^= 1;
    assert_int_equal(rlb__ring_attach(&r, f->mem, size, RLB_RING_CONSUMER), RLB_ECORRUPT);
    hdr(f)->magic ^= 1;
    assert_int_equal(rlb__ring_attach(&r, f->mem, size, RLB_RING_CONSUMER), 0);
    assert_int_equal(hdr(f)->cons.pid, getpid());
    destroy(f);
}

static void test_empty(void **state)
{
    fixture *f = make(CAP);
    rlb_ring_msg m;
    assert_int_equal(rlb__ring_peek(&f->cons, 0, &m), RLB_EAGAIN);
    f->cons.spin_ns = 1000000;
    int64_t t0 = rlb__clock_ms();
    assert_int_equal(rlb__ring_peek(&f->cons, 30, &m), RLB_ETIMEDOUT);
    int64_t waited = rlb__clock_ms() - t0;
    assert_true(waited >= 30 && waited < 1000);
    assert_int_equal(rlb__ring_release(&f->cons), RLB_EINVAL);
    /* Wrong side and bad arguments. */
    void *p;
    size_t cap;
    assert_int_equal(rlb__ring_claim(&f->cons, 8, 0, &p, &cap), RLB_EINVAL);
    assert_int_equal(rlb__ring_peek(&f->prod, 0, &m), RLB_EINVAL);
    assert_int_equal(rlb__ring_claim(&f->prod, 8, -1, &p, &cap), RLB_EINVAL);
    destroy(f);
}

static void test_roundtrip(void **state)
{
    fixture *f = make(CAP);
    put(f, 7, 5, 0xab);
    put(f, RLB_RING_TYPE_MASK, 0, 0);
    put(f, 0, 64, 0x11);
    /* Records sit back to back: 16+8, 16+0, 16+64. */
    assert_int_equal(hdr(f)->prod.index, 24 + 16 + 80);
    rlb_ring_msg m1, m2;
    assert_int_equal(rlb__ring_peek(&f->cons, 0, &m1), 0);
    assert_int_equal(rlb__ring_peek(&f->cons, 0, &m2), 0); /* same record again */
    assert_ptr_equal(m1.data, m2.data);
    assert_ptr_equal(m1.data, data(f) + HDR);
    get(f, 7, 5, 0xab, 0);
    get(f, RLB_RING_TYPE_MASK, 0, 0, 1);
    get(f, 0, 64, 0x11, 2);
    assert_int_equal(hdr(f)->cons.index, 120);
    assert_int_equal(rlb__ring_peek(&f->cons, 0, &m1), RLB_EAGAIN);
    destroy(f);
}

static void test_commit_rules(void **state)
{
    fixture *f = make(CAP);
    void *p, *q;
    size_t cap;
    assert_int_equal(rlb__ring_commit(&f->prod, 1, 0), RLB_EINVAL); /* no claim */
    /* On an empty ring the room is one whole record: capacity/2 - 16. */
    assert_int_equal(rlb__ring_max_payload(&f->prod), CAP / 2 - HDR);
    assert_int_equal(rlb__ring_claim(&f->prod, 0, 0, &p, &cap), 0);
    assert_int_equal(cap, CAP / 2 - HDR);
    assert_int_equal(rlb__ring_claim(&f->prod, 0, 0, &q, &cap), RLB_EINVAL); /* one at a time */
    assert_int_equal(rlb__ring_commit(&f->prod, 1, cap + 1), RLB_EINVAL);
    assert_int_equal(rlb__ring_commit(&f->prod, RLB_RING_F_PAD | 1, 4), RLB_EINVAL);
    assert_int_equal(rlb__ring_commit(&f->prod, RLB_RING_F_FIRST, 4), RLB_EINVAL);
    /* Committing less than was claimed leaves the rest free: next record at 16 + 8. */
    assert_int_equal(rlb__ring_commit(&f->prod, 1, 5), 0);
    assert_int_equal(rlb__ring_claim(&f->prod, 3, 0, &q, &cap), 0);
    assert_ptr_equal(q, data(f) + 24 + HDR);
    rlb__ring_abort(&f->prod);
    assert_int_equal(rlb__ring_claim(&f->prod, CAP / 2 - HDR + 1, 0, &q, &cap), RLB_ETOOBIG);
    destroy(f);
}

static void test_abort(void **state)
{
    fixture *f = make(CAP);
    void *p, *q;
    size_t cap;
    rlb_ring_msg m;
    assert_int_equal(rlb__ring_claim(&f->prod, 100, 0, &p, &cap), 0);
    memset(p, 0x5a, 100);
    rlb__ring_abort(&f->prod);
    /* Nothing was published, no sequence number was spent, and the slot is free again. */
    assert_int_equal(hdr(f)->prod.index, 0);
    assert_int_equal(rlb__ring_peek(&f->cons, 0, &m), RLB_EAGAIN);
    assert_int_equal(rlb__ring_claim(&f->prod, 10, 0, &q, &cap), 0);
    assert_ptr_equal(p, q);
    memset(q, 0x33, 10);
    assert_int_equal(rlb__ring_commit(&f->prod, 2, 10), 0);
    get(f, 2, 10, 0x33, 0);
    rlb__ring_abort(&f->prod); /* no claim open: no effect */
    assert_int_equal(rlb__ring_commit(&f->prod, 2, 0), RLB_EINVAL);
    destroy(f);
}

static void test_full(void **state)
{
    fixture *f = make(CAP);
    /* 100-byte payloads take 16 + 104 = 120 bytes: 34 records fill 4080 of 4096 bytes. */
    int n = 0;
    void *p;
    size_t cap;
    while (rlb__ring_claim(&f->prod, 100, 0, &p, &cap) == 0) {
        memset(p, n, 100);
        assert_int_equal(rlb__ring_commit(&f->prod, 3, 100), 0);
        n++;
    }
    assert_int_equal(n, 34);
    assert_int_equal(rlb__ring_claim(&f->prod, 100, 0, &p, &cap), RLB_EAGAIN);
    /* A bounded wait on a full ring times out. */
    f->prod.spin_ns = 0;
    int64_t t0 = rlb__clock_ms();
    assert_int_equal(rlb__ring_claim(&f->prod, 100, 20, &p, &cap), RLB_ETIMEDOUT);
    assert_true(rlb__clock_ms() - t0 >= 20);
    /* The 16 bytes left hold an empty record, but not a 1-byte one. */
    assert_int_equal(rlb__ring_claim(&f->prod, 0, 0, &p, &cap), 0);
    assert_int_equal(cap, 0);
    rlb__ring_abort(&f->prod);
    assert_int_equal(rlb__ring_claim(&f->prod, 1, 0, &p, &cap), RLB_EAGAIN);
    /* Freeing the first record leaves 136 bytes: 16 of padding at the end plus a 120-byte
     * record at the start fit, a 128-byte one (108 bytes of payload) does not. */
    get(f, 3, 100, 0, 0);
    assert_int_equal(rlb__ring_claim(&f->prod, 108, 0, &p, &cap), RLB_EAGAIN);
    assert_int_equal(rlb__ring_claim(&f->prod, 100, 0, &p, &cap), 0);
    assert_ptr_equal(p, data(f) + HDR); /* wrapped to the start */
    assert_int_equal(cap, 104);
    destroy(f);
}

static void test_wrap_padding(void **state)
{
    fixture *f = make(CAP);
    /* Four 1000-byte records (1016 bytes each) end at 4064: 32 bytes before the end. */
    for (int i = 0; i < 4; i++)
        put(f, 1, 1000, (uint8_t)i);
    for (int i = 0; i < 4; i++)
        get(f, 1, 1000, (uint8_t)i, (uint64_t)i);
    put(f, 9, 40, 0x77);
    uint32_t w[2];
    memcpy(w, data(f) + 4064, 8);
    assert_int_equal(w[0], 32);
    assert_int_equal(w[1], RLB_RING_F_PAD);
    assert_int_equal(hdr(f)->prod.index, 4096 + 56);
    get(f, 9, 40, 0x77, 4);
    assert_int_equal(hdr(f)->cons.index, 4096 + 56);

    /* From 56, three 1016-byte records and a 984-byte one (968 of payload) end at 4088,
     * 8 bytes before the end: the padding is then a bare 8-byte {len, type}. */
    for (int i = 0; i < 3; i++)
        put(f, 1, 1000, (uint8_t)i);
    put(f, 2, 968, 0xee);
    assert_int_equal(hdr(f)->prod.index, 4096 + 4088);
    for (int i = 0; i < 3; i++)
        get(f, 1, 1000, (uint8_t)i, 5 + (uint64_t)i);
    get(f, 2, 968, 0xee, 8);
    put(f, 4, 0, 0);
    memcpy(w, data(f) + 4088, 8);
    assert_int_equal(w[0], 8);
    assert_int_equal(w[1], RLB_RING_F_PAD);
    assert_int_equal(hdr(f)->prod.index, 2 * 4096 + 16);
    get(f, 4, 0, 0, 9);
    destroy(f);
}

/* Fills the whole message with a byte pattern that depends on position and seed. */
static void pattern(uint8_t *p, size_t len, uint32_t seed)
{
    for (size_t i = 0; i < len; i++)
        p[i] = (uint8_t)((i * 2654435761u + seed) >> 13);
}

static void test_fragments_fit(void **state)
{
    /* 64 KiB ring: one record holds 32752 bytes; 40000 bytes go as FIRST + LAST. */
    fixture *f = make(65536);
    size_t len = 40000;
    uint8_t *msg = malloc(len);
    pattern(msg, len, 1);
    assert_int_equal(rlb__ring_send(&f->prod, 5, msg, len, 0), 0);
    rlb_ring_msg m;
    assert_int_equal(rlb__ring_peek(&f->cons, 0, &m), 0);
    assert_int_equal(m.flags, RLB_RING_F_FIRST);
    assert_int_equal(m.type, 5);
    assert_int_equal(m.len, 32752);
    uint64_t total;
    memcpy(&total, m.data, 8);
    assert_int_equal(total, len);
    assert_memory_equal((const uint8_t *)m.data + 8, msg, 32744);
    assert_int_equal(rlb__ring_release(&f->cons), 0);
    assert_int_equal(rlb__ring_peek(&f->cons, 0, &m), 0);
    assert_int_equal(m.flags, RLB_RING_F_LAST);
    assert_int_equal(m.len, len - 32744);
    assert_memory_equal(m.data, msg + 32744, len - 32744);
    assert_int_equal(rlb__ring_release(&f->cons), 0);

    /* The same message through recv, and a small one after it, returned in place. */
    rlb_ring_rx rx = {.max_msg = 1 << 20};
    assert_int_equal(rlb__ring_send(&f->prod, 5, msg, len, 0), 0);
    assert_int_equal(rlb__ring_send(&f->prod, 6, msg, 100, 0), 0);
    assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), 0);
    assert_int_equal(m.type, 5);
    assert_int_equal(m.len, len);
    assert_ptr_equal(m.data, rx.buf);
    assert_memory_equal(m.data, msg, len);
    assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), 0);
    assert_int_equal(m.type, 6);
    assert_int_equal(m.len, 100);
    assert_true((const uint8_t *)m.data > data(f) && (const uint8_t *)m.data < data(f) + 65536);
    assert_memory_equal(m.data, msg, 100);
    rlb__ring_recv_done(&f->cons, &rx);
    assert_int_equal(hdr(f)->cons.index, hdr(f)->prod.index);
    assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), RLB_EAGAIN);
    rlb__ring_rx_free(&rx);
    free(msg);
    destroy(f);
}

typedef struct sender {
    rlb_ring *ring;     /* producer handle */
    const uint8_t *msg; /* message to send */
    size_t len;         /* its length */
    int count;          /* how many times */
    int rc;             /* first failure, or 0 */
} sender;

static void *send_thread(void *arg)
{
    sender *s = arg;
    for (int i = 0; i < s->count && s->rc == 0; i++)
        s->rc = rlb__ring_send(s->ring, 8, s->msg, s->len, 10000);
    return NULL;
}

static void test_fragments_stream(void **state)
{
    /* A 1 MiB message through a 4 KiB ring: ~500 fragments, FIRST, MOREs, LAST. */
    fixture *f = make(CAP);
    size_t len = 1 << 20;
    uint8_t *msg = malloc(len);
    pattern(msg, len, 2);
    sender s = {.ring = &f->prod, .msg = msg, .len = len, .count = 2};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, send_thread, &s), 0);
    rlb_ring_rx rx = {.max_msg = len};
    for (int i = 0; i < 2; i++) {
        rlb_ring_msg m;
        assert_int_equal(rlb__ring_recv(&f->cons, &rx, 10000, &m), 0);
        assert_int_equal(m.type, 8);
        assert_int_equal(m.len, len);
        assert_memory_equal(m.data, msg, len);
    }
    pthread_join(t, NULL);
    assert_int_equal(s.rc, 0);
    assert_true(f->prod.seq > 2 * (len / (CAP / 2)));
    rlb__ring_rx_free(&rx);
    free(msg);
    destroy(f);
}

/* Sends a message over the receiver's limit, then a small one. */
static void *send_big_then_small(void *arg)
{
    sender *s = arg;
    s->rc = rlb__ring_send(s->ring, 8, s->msg, s->len, 10000);
    if (s->rc == 0)
        s->rc = rlb__ring_send(s->ring, 4, s->msg, 1000, 10000);
    return NULL;
}

static void test_fragments_limits(void **state)
{
    fixture *f = make(CAP);
    size_t len = 10000;
    uint8_t *msg = malloc(len);
    pattern(msg, len, 3);
    rlb_ring_rx rx = {.max_msg = 5000};
    rlb_ring_msg m;
    sender s = {.ring = &f->prod, .msg = msg, .len = len};
    pthread_t t;

    /* Over the receiver's limit: skipped with RLB_ETOOBIG, the next message arrives. */
    assert_int_equal(pthread_create(&t, NULL, send_big_then_small, &s), 0);
    assert_int_equal(rlb__ring_recv(&f->cons, &rx, 10000, &m), RLB_ETOOBIG);
    assert_int_equal(rlb__ring_recv(&f->cons, &rx, 10000, &m), 0);
    pthread_join(t, NULL);
    assert_int_equal(s.rc, 0);
    assert_int_equal(m.type, 4);
    assert_int_equal(m.len, 1000);
    assert_memory_equal(m.data, msg, 1000);
    assert_int_equal(rlb__ring_send(&f->cons, 1, msg, 1, 0), RLB_EINVAL); /* consumer */
    /* A whole record over the limit is skipped too. */
    assert_int_equal(rlb__ring_send(&f->prod, 4, msg, 1000, 0), 0);
    rx.max_msg = 999;
    assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), RLB_ETOOBIG);
    assert_int_equal(hdr(f)->cons.index, hdr(f)->prod.index);

    /* A send that runs out of room midway leaves a partial message; the receiver drops it
     * when the next message starts. */
    rx.max_msg = len;
    assert_int_equal(rlb__ring_send(&f->prod, 7, msg, len, 0), RLB_EAGAIN);
    assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), RLB_EAGAIN);
    assert_true(rx.have > 0 && rx.have < len);
    assert_int_equal(rlb__ring_send(&f->prod, 3, msg + 1, 50, 0), 0);
    assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), 0);
    assert_int_equal(m.type, 3);
    assert_int_equal(m.len, 50);
    assert_memory_equal(m.data, msg + 1, 50);
    assert_int_equal(rx.have, 0);
    rlb__ring_recv_done(&f->cons, &rx);
    rlb__ring_rx_free(&rx);
    free(msg);
    destroy(f);
}

static void test_close_and_liveness(void **state)
{
    fixture *f = make(CAP);
    rlb_ring_msg m;
    put(f, 1, 10, 1);
    rlb__ring_close(&f->prod);
    /* What was committed is still delivered, then the consumer learns the producer left. */
    get(f, 1, 10, 1, 0);
    assert_int_equal(rlb__ring_peek(&f->cons, 1000, &m), RLB_EPEERDEAD);
    void *p;
    size_t cap;
    assert_int_equal(rlb__ring_claim(&f->prod, 1, 0, &p, &cap), RLB_EINVAL); /* closed */
    destroy(f);
}

static int dead(void *arg)
{
    (*(int *)arg)++;
    return 0;
}

static void test_liveness_callback(void **state)
{
    fixture *f = make(CAP);
    int calls = 0;
    rlb_ring_msg m;
    rlb__ring_set_liveness(&f->cons, dead, &calls);
    f->cons.spin_ns = 0;
    int64_t t0 = rlb__clock_ms();
    assert_int_equal(rlb__ring_peek(&f->cons, 5000, &m), RLB_EPEERDEAD);
    assert_true(rlb__clock_ms() - t0 < 1000);
    assert_int_equal(calls, 1);
    /* The producer side checks the consumer the same way when the ring is full. */
    rlb__ring_set_liveness(&f->prod, dead, &calls);
    while (rlb__ring_send(&f->prod, 1, NULL, 0, 0) == 0)
        ;
    assert_int_equal(rlb__ring_send(&f->prod, 1, NULL, 0, 5000), RLB_EPEERDEAD);
    assert_int_equal(calls, 2);
    /* Heartbeats: the peer attached just now. */
    assert_true(rlb__ring_peer_idle_ms(&f->cons) < 1000);
    hdr(f)->prod.pid = 0;
    assert_int_equal(rlb__ring_peer_idle_ms(&f->cons), INT64_MAX);
    destroy(f);
}

typedef struct late_put {
    fixture *f;   /* ring */
    int delay_ms; /* sleep before committing */
} late_put;

static void *late_put_thread(void *arg)
{
    late_put *lp = arg;
    usleep((useconds_t)lp->delay_ms * 1000);
    put(lp->f, 1, 8, 0x42);
    return NULL;
}

/* The consumer sleeps with no spin and slices of 10 s: only the producer's wake-up can
 * end its wait in time. */
static void sleep_until_put(fixture *f)
{
    f->cons.spin_ns = 0;
    f->cons.slice_ns = 10000000000;
    late_put lp = {f, 50};
    pthread_t t;
    int64_t t0 = rlb__clock_ms();
    assert_int_equal(pthread_create(&t, NULL, late_put_thread, &lp), 0);
    rlb_ring_msg m;
    assert_int_equal(rlb__ring_peek(&f->cons, 5000, &m), 0);
    int64_t waited = rlb__clock_ms() - t0;
    pthread_join(t, NULL);
    assert_true(waited >= 50 && waited < 2000);
    assert_int_equal(m.len, 8);
    assert_int_equal(rlb__ring_release(&f->cons), 0);
    assert_int_equal(hdr(f)->cons_wake.sleeping, 0);
}

static void test_sleep_wake(void **state)
{
    fixture *f = make(CAP);
    sleep_until_put(f);
    destroy(f);
}

/* A message four rings long streamed without ever waiting: the sender resumes where the
 * full ring stopped it, the receiver assembles as room frees. */
static void test_send_from_resumes(void **state)
{
    fixture *f = make(CAP);
    size_t len = 4 * CAP;
    uint8_t *msg = malloc(len);
    assert_non_null(msg);
    for (size_t i = 0; i < len; i++)
        msg[i] = (uint8_t)(i * 7 + 3);
    rlb_ring_rx rx = {.max_msg = 1 << 20};
    rlb_ring_msg m;
    size_t off = 0;
    int rc, stops = 0;
    while ((rc = rlb__ring_send_from(&f->prod, 9, msg, len, &off, 0)) == RLB_EAGAIN) {
        stops++;
        assert_true(off > 0 && off < len);
        assert_true(rlb__ring_send_need(&f->prod, len, off) <= rlb__ring_max_payload(&f->prod));
        assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), RLB_EAGAIN);
    }
    assert_int_equal(rc, 0);
    assert_int_equal(off, len);
    assert_true(stops >= 3);
    assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), 0);
    assert_int_equal(m.type, 9);
    assert_int_equal(m.len, len);
    assert_memory_equal(m.data, msg, len);
    rlb__ring_recv_done(&f->cons, &rx);
    rlb__ring_rx_free(&rx);
    free(msg);
    destroy(f);
}

/* Fragments are bounded by rlb__ring_frag_max, not by the record limit: in a 2 MiB ring
 * (records up to 1 MiB) a 600 KiB message goes as 256 KiB fragments; one of exactly
 * 256 KiB still goes whole. */
static void test_fragments_bounded(void **state)
{
    fixture *f = make(2u << 20);
    size_t frag = RLB_RING_FRAG_BYTES, len = 600u << 10;
    assert_int_equal(rlb__ring_frag_max(&f->prod), frag);
    assert_int_equal(rlb__ring_max_payload(&f->prod), (1u << 20) - HDR);
    uint8_t *msg = malloc(len);
    pattern(msg, len, 4);
    assert_int_equal(rlb__ring_send(&f->prod, 5, msg, len, 0), 0);
    assert_int_equal(rlb__ring_send(&f->prod, 6, msg, frag, 0), 0);
    static const struct {
        uint32_t flags;
        size_t len;
    } want[] = {{RLB_RING_F_FIRST, RLB_RING_FRAG_BYTES},
                {RLB_RING_F_MORE, RLB_RING_FRAG_BYTES},
                {RLB_RING_F_LAST, (600u << 10) + 8 - 2 * RLB_RING_FRAG_BYTES},
                {0, RLB_RING_FRAG_BYTES}};
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        rlb_ring_msg m;
        assert_int_equal(rlb__ring_peek(&f->cons, 0, &m), 0);
        assert_int_equal(m.flags, want[i].flags);
        assert_int_equal(m.len, want[i].len);
        assert_int_equal(rlb__ring_release(&f->cons), 0);
    }
    /* The smallest ring keeps its record limit as the fragment bound. */
    fixture *g = make(CAP);
    assert_int_equal(rlb__ring_frag_max(&g->prod), CAP / 2 - HDR);
    destroy(g);
    free(msg);
    destroy(f);
}

/* take_part: a length, and so whether the part is the last, that depends on where the ring
 * wraps. */
#define ANY_LEN SIZE_MAX
#define ANY_LAST (-1)

/* Receives the next part with recv_part (no wait) and checks where it lies. */
static rlb_ring_part take_part(fixture *f, rlb_ring_rx *rx, size_t off, size_t len,
                               size_t total, int last)
{
    rlb_ring_part p;
    assert_int_equal(rlb__ring_recv_part(&f->cons, rx, 0, &p), 0);
    assert_int_equal(p.off, off);
    if (len != ANY_LEN)
        assert_int_equal(p.len, len);
    len = p.len;
    assert_int_equal(p.total, total);
    if (last != ANY_LAST)
        assert_int_equal(p.last, last);
    const uint8_t *at = p.data;
    assert_true(at >= data(f) && at + len <= data(f) + CAP); /* in place */
    return p;
}

/* Takes the parts of an unfinished message of `total` bytes that are in the ring, checking
 * that they follow one another; returns the bytes they hold, fewer than total. */
static size_t take_parts(fixture *f, rlb_ring_rx *rx, size_t total)
{
    size_t got = 0;
    rlb_ring_part p;
    int rc;
    while ((rc = rlb__ring_recv_part(&f->cons, rx, 0, &p)) == 0) {
        assert_int_equal(p.off, got);
        assert_int_equal(p.total, total);
        assert_false(p.last);
        got += p.len;
    }
    assert_int_equal(rc, RLB_EAGAIN);
    assert_true(got < total);
    return got;
}

/* rlb__ring_recv_part hands a message out in place, fragment by fragment; a message the
 * sender leaves unfinished, a mix of the two receive calls, an oversized message and a
 * sender that goes away mid-message each get their named code. */
static void test_parts(void **state)
{
    fixture *f = make(CAP);
    size_t len = 3000, first = CAP / 2 - HDR - 8; /* 2024 bytes ride with the total */
    uint8_t *msg = malloc(10000);
    pattern(msg, 10000, 5);
    rlb_ring_rx rx = {.max_msg = 1 << 20};
    rlb_ring_part p;

    assert_int_equal(rlb__ring_send(&f->prod, 4, msg, len, 0), 0);
    assert_int_equal(rlb__ring_send(&f->prod, 6, msg, 100, 0), 0);
    p = take_part(f, &rx, 0, first, len, 0);
    assert_int_equal(p.type, 4);
    assert_memory_equal(p.data, msg, first);
    p = take_part(f, &rx, first, len - first, len, 1);
    assert_memory_equal(p.data, msg + first, len - first);
    p = take_part(f, &rx, 0, 100, 100, 1); /* a whole record is one part */
    assert_int_equal(p.type, 6);
    assert_memory_equal(p.data, msg, 100);
    assert_int_equal(rlb__ring_recv_part(&f->cons, &rx, 0, &p), RLB_EAGAIN);
    assert_int_equal(hdr(f)->cons.index, hdr(f)->prod.index); /* every part released */

    /* The sender runs out of room midway and starts another message: the parts given so
     * far are to be dropped (RLB_EABORTED), then the new message comes. */
    assert_int_equal(rlb__ring_send(&f->prod, 7, msg, 10000, 0), RLB_EAGAIN);
    assert_true(take_parts(f, &rx, 10000) > 0);
    assert_int_equal(rlb__ring_send(&f->prod, 3, msg + 1, 50, 0), 0);
    assert_int_equal(rlb__ring_recv_part(&f->cons, &rx, 0, &p), RLB_EABORTED);
    p = take_part(f, &rx, 0, 50, 50, 1);
    assert_int_equal(p.type, 3);
    assert_memory_equal(p.data, msg + 1, 50);

    /* One message, one call: recv may not take over a message recv_part began. */
    assert_int_equal(rlb__ring_send(&f->prod, 7, msg, len, 0), 0);
    p = take_part(f, &rx, 0, ANY_LEN, len, 0);
    rlb_ring_msg m;
    assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), RLB_EINVAL);
    while (!p.last)
        p = take_part(f, &rx, p.off + p.len, ANY_LEN, len, ANY_LAST);
    assert_int_equal(p.off + p.len, len);

    /* A fragmented message over max_msg is skipped whole, and the next one comes. */
    rx.max_msg = 2500;
    assert_int_equal(rlb__ring_send(&f->prod, 7, msg, len, 0), 0);
    assert_int_equal(rlb__ring_send(&f->prod, 8, msg, 20, 0), 0);
    assert_int_equal(rlb__ring_recv_part(&f->cons, &rx, 0, &p), RLB_ETOOBIG);
    take_part(f, &rx, 0, 20, 20, 1);

    /* The sender closes midway: the consumer learns it, and the message is dropped. */
    rx.max_msg = 1 << 20;
    assert_int_equal(rlb__ring_send(&f->prod, 7, msg, 10000, 0), RLB_EAGAIN);
    rlb__ring_close(&f->prod);
    assert_true(take_parts(f, &rx, 10000) > 0);
    assert_int_equal(rlb__ring_recv_part(&f->cons, &rx, 1000, &p), RLB_EPEERDEAD);
    assert_int_equal(rx.have, 0);
    assert_int_equal(hdr(f)->cons.index, hdr(f)->prod.index);
    rlb__ring_rx_free(&rx);
    free(msg);
    destroy(f);
}

/* The same wait through eventfds, with garbage over both semaphores: nobody touches them. */
static void test_sleep_wake_eventfd(void **state)
{
    fixture *f = make(CAP);
    int cons_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int prod_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    assert_true(cons_fd >= 0 && prod_fd >= 0);
    rlb__ring_set_wake_fds(&f->cons, cons_fd, prod_fd);
    rlb__ring_set_wake_fds(&f->prod, prod_fd, cons_fd);
    memset(&hdr(f)->prod_wake.sem, 0xa5, sizeof(sem_t));
    memset(&hdr(f)->cons_wake.sem, 0xa5, sizeof(sem_t));
    sleep_until_put(f);
    /* An event loop's sleep: armed on an empty ring, the next commit writes the fd. */
    struct pollfd p = {.fd = cons_fd, .events = POLLIN};
    assert_int_equal(rlb__ring_arm(&f->cons, 0), 0);
    assert_int_equal(poll(&p, 1, 0), 0);
    put(f, 1, 8, 0x5a);
    assert_int_equal(poll(&p, 1, 0), 1);
    rlb__ring_disarm(&f->cons);
    assert_int_equal(rlb__ring_arm(&f->cons, 0), 1); /* data waits: no sleep */
    rlb__ring_close(&f->prod);
    close(cons_fd);
    close(prod_fd);
    destroy(f);
}

/* With private_copy a received message is the receiver's own: a producer that rewrites the
 * record after committing it changes nothing the receiver already holds. */
static void test_private_copy(void **state)
{
    fixture *f = make(CAP);
    rlb_ring_rx rx = {.max_msg = 1 << 20, .private_copy = 1};
    rlb_ring_msg m;
    put(f, 3, 40, 0x11);
    assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), 0);
    assert_int_equal(m.len, 40);
    assert_true((const uint8_t *)m.data < data(f) || (const uint8_t *)m.data >= data(f) + CAP);
    memset(data(f), 0xee, CAP); /* the producer rewrites everything */
    for (size_t i = 0; i < m.len; i++)
        assert_int_equal(((const uint8_t *)m.data)[i], 0x11);
    /* The record was released at once: the producer has its room back. */
    assert_int_equal(hdr(f)->cons.index, hdr(f)->prod.index);
    rlb__ring_recv_done(&f->cons, &rx);
    rlb__ring_rx_free(&rx);
    destroy(f);
}

/* ---- Corruption: values no honest producer writes ---------------------------------- */

/* Receives from f with recv, or with recv_part when `parts`, until RLB_ECORRUPT. */
static void expect_corrupt_as(fixture *f, int parts)
{
    rlb_ring_msg m;
    rlb_ring_rx rx = {.max_msg = 1 << 20};
    if (parts) {
        rlb_ring_part p;
        int rc;
        while ((rc = rlb__ring_recv_part(&f->cons, &rx, 0, &p)) == 0)
            ;
        assert_int_equal(rc, RLB_ECORRUPT);
    } else {
        assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), RLB_ECORRUPT);
    }
    /* Sticky: the handle refuses further use. */
    assert_int_equal(rlb__ring_peek(&f->cons, 0, &m), RLB_ECORRUPT);
    rlb__ring_rx_free(&rx);
    destroy(f);
}

static void expect_corrupt(fixture *f)
{
    expect_corrupt_as(f, 0);
}

static void test_corrupt_indices(void **state)
{
    fixture *f = make(CAP);
    hdr(f)->prod.index = CAP + 8; /* more than the capacity ahead */
    expect_corrupt(f);
    f = make(CAP);
    hdr(f)->prod.index = 12; /* unaligned */
    expect_corrupt(f);
    f = make(CAP);
    hdr(f)->prod.index = (uint64_t)-8; /* behind the consumer */
    expect_corrupt(f);
    /* The tail moving backwards. */
    f = make(CAP);
    put(f, 1, 8, 1);
    put(f, 1, 8, 2);
    rlb_ring_msg m;
    assert_int_equal(rlb__ring_peek(&f->cons, 0, &m), 0);
    assert_int_equal(rlb__ring_release(&f->cons), 0);
    hdr(f)->prod.index = 24;
    get(f, 1, 8, 2, 1); /* cached: the record below the old tail is still good */
    expect_corrupt(f);
    /* The consumer index seen by the producer: ahead of the tail. */
    f = make(CAP);
    void *p;
    size_t cap;
    for (int i = 0; i < 34; i++)
        put(f, 1, 100, 0);
    hdr(f)->cons.index = 8192;
    assert_int_equal(rlb__ring_claim(&f->prod, 100, 0, &p, &cap), RLB_ECORRUPT);
    assert_int_equal(rlb__ring_claim(&f->prod, 0, 0, &p, &cap), RLB_ECORRUPT);
    destroy(f);
}

static void test_corrupt_records(void **state)
{
    static const struct {
        uint32_t len, type;
        uint64_t seq, tail;
    } bad[] = {
        {4081, 1, 0, 4096},                     /* payload past the end of the data area */
        {100, 1, 0, 64},                         /* payload past the tail */
        {2048, 1, 0, 4096},                      /* over the one-record limit (2032) */
        {8, 1, 5, 24},                           /* out of sequence */
        {8, 1 | RLB_RING_F_FIRST | RLB_RING_F_LAST, 0, 24}, /* two fragment flags */
        {8, 1 | (1u << 28), 0, 24},              /* unknown flag */
        {12, RLB_RING_F_PAD, 0, 64},             /* padding not a multiple of 8 */
        {4, RLB_RING_F_PAD, 0, 64},              /* padding shorter than its header */
        {128, RLB_RING_F_PAD, 0, 64},            /* padding past the tail */
        {8, RLB_RING_F_PAD | 3, 0, 64},          /* padding with a type */
        {4, 1 | RLB_RING_F_FIRST, 0, 24},        /* first fragment without its length */
        {8, 1 | RLB_RING_F_MORE, 0, 24},         /* fragment outside a message */
        {8, 1 | RLB_RING_F_LAST, 0, 24},         /* fragment outside a message */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        fixture *f = make(CAP);
        raw_record(f, 0, bad[i].len, bad[i].type, bad[i].seq);
        hdr(f)->prod.index = bad[i].tail;
        expect_corrupt(f);
    }
    /* A record that starts 8 bytes before the end cannot hold a 16-byte header. */
    fixture *f = make(CAP);
    hdr(f)->prod.index = hdr(f)->cons.index = 4088;
    hdr(f)->cons.pid = 0;
    assert_int_equal(rlb__ring_attach(&f->cons, f->mem, rlb__ring_memsize(CAP),
                                      RLB_RING_CONSUMER), 0);
    memcpy(data(f) + 4088, &(uint32_t){0}, 4);
    memcpy(data(f) + 4092, &(uint32_t){1}, 4);
    hdr(f)->prod.index = 4096 + 16;
    expect_corrupt(f);
}

static void test_corrupt_fragments(void **state)
{
    /* A FIRST record of 16 bytes (u64 total + 8 bytes) at 0, then (len 0 = none) a second
     * fragment at 32 whose length or type does not fit the announced total. */
    static const struct {
        uint64_t total;
        uint32_t len2, type2;
    } bad[] = {
        {100, 50, 1 | RLB_RING_F_LAST}, /* LAST brings 50 of the 92 bytes left */
        {100, 92, 1 | RLB_RING_F_MORE}, /* a MORE that already reaches the total */
        {100, 92, 2 | RLB_RING_F_LAST}, /* a fragment of another message type */
        {8, 0, 0},                      /* total no larger than the first fragment's bytes */
    };
    for (size_t i = 0; i < 2 * sizeof(bad) / sizeof(bad[0]); i++) {
        size_t b = i / 2;
        fixture *f = make(CAP);
        raw_record(f, 0, 16, 1 | RLB_RING_F_FIRST, 0);
        memcpy(data(f) + 16, &bad[b].total, 8);
        hdr(f)->prod.index = 32;
        if (bad[b].len2) {
            raw_record(f, 32, bad[b].len2, bad[b].type2, 1);
            hdr(f)->prod.index = 32 + 16 + ((bad[b].len2 + 7u) & ~7u);
        }
        expect_corrupt_as(f, (int)(i % 2));
    }
    /* A header rewritten in a real stream: the second fragment's type word now says FIRST
     * and LAST at once. */
    for (int parts = 0; parts < 2; parts++) {
        fixture *f = make(CAP);
        uint8_t msg[5000] = {0};
        assert_int_equal(rlb__ring_send(&f->prod, 2, msg, sizeof(msg), 0), RLB_EAGAIN);
        uint32_t type = 2 | RLB_RING_F_FIRST | RLB_RING_F_LAST;
        memcpy(data(f) + CAP / 2 + 4, &type, 4);
        expect_corrupt_as(f, parts);
    }
}

/* A first fragment that announces 1 TiB costs no memory beyond the bytes that came: the
 * buffer grows with them, and the lie shows as soon as the fragments stop adding up. */
static void test_lying_total(void **state)
{
    for (int parts = 0; parts < 2; parts++) {
        fixture *f = make(CAP);
        uint64_t total = 1ull << 40;
        raw_record(f, 0, 16, 1 | RLB_RING_F_FIRST, 0);
        memcpy(data(f) + 16, &total, 8);
        hdr(f)->prod.index = 32;
        rlb_ring_rx rx = {.max_msg = SIZE_MAX};
        rlb_ring_msg m;
        rlb_ring_part p;
        if (parts) {
            assert_int_equal(rlb__ring_recv_part(&f->cons, &rx, 0, &p), 0);
            assert_int_equal(p.total, total);
            assert_int_equal(p.len, 8);
        } else {
            assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), RLB_EAGAIN);
        }
        assert_true(rx.buf_cap <= 8);
        raw_record(f, 32, 8, 1 | RLB_RING_F_LAST, 1); /* "the end", 2^40 - 16 bytes early */
        hdr(f)->prod.index = 56;
        if (parts)
            assert_int_equal(rlb__ring_recv_part(&f->cons, &rx, 0, &p), RLB_ECORRUPT);
        else
            assert_int_equal(rlb__ring_recv(&f->cons, &rx, 0, &m), RLB_ECORRUPT);
        assert_true(rx.buf_cap <= 8);
        rlb__ring_rx_free(&rx);
        destroy(f);
    }
}

/* ---- Seed corpus of the ring fuzzer (tests/fuzz/fuzz_ring.h) ----------------------- */

/* One seed: a ring written by the real producer from index `start`, as the fuzzer's
 * consumer (or, with FUZZ_RING_PRODUCER, producer) will find it. */
typedef struct seed {
    const char *name;     /* file name in the corpus */
    uint32_t mode;        /* FUZZ_RING_* */
    uint32_t param;       /* max_msg, or the producer's size seed */
    uint64_t start;       /* both indices before writing */
    uint64_t cons_index;  /* consumer index to record, when not start */
    uint32_t sizes[6];    /* records to claim and commit (0-terminated after the first) */
    uint32_t send;        /* then one message of this many bytes through rlb__ring_send */
    uint32_t after;       /* then one more record of this size (0: none) */
} seed;

static const seed seeds[] = {
    {"01-records", 0, 0, 0, 0, {1, 7, 8, 100, 500, 0}, 0, 0},
    {"02-records-recv", FUZZ_RING_RECV, 1u << 20, 0, 0, {1, 7, 8, 100, 500, 0}, 0, 0},
    /* A 40-byte record leaves 8 bytes before the end: a bare padding record. */
    {"03-wrap", 0, 0, FUZZ_RING_CAP - 48, 0, {24, 100, 60, 0}, 0, 0},
    {"04-fragments", FUZZ_RING_RECV, 1u << 20, 0, 0, {0}, 3000, 10},
    {"05-fragments-wrap", FUZZ_RING_RECV, 1u << 20, FUZZ_RING_CAP - 1000, 0, {0}, 3000, 0},
    {"06-oversized", FUZZ_RING_RECV, 100, 0, 0, {0}, 3000, 10},
    {"07-producer", FUZZ_RING_PRODUCER, 12345, 2048, 1024, {0}, 0, 0},
    {"08-parts", FUZZ_RING_PARTS, 1u << 20, FUZZ_RING_CAP - 1000, 0, {100, 0}, 3000, 10},
};

/* Writes the fuzz input of seed d into out (sizeof(fuzz_ring_prefix) + FUZZ_RING_CAP
 * bytes); returns its length with trailing zero bytes cut (the fuzzer restores them). */
static size_t build_seed(const seed *d, uint8_t *out)
{
    size_t size = rlb__ring_memsize(FUZZ_RING_CAP);
    uint8_t *mem = aligned_alloc(64, size);
    assert_non_null(mem);
    memset(mem, 0, size); /* the seed holds the whole data area: no heap garbage in it */
    assert_int_equal(rlb__ring_init(mem, FUZZ_RING_CAP), 0);
    rlb__ring_shared *h = (rlb__ring_shared *)mem;
    h->prod.index = d->start;
    h->cons.index = d->start;
    rlb_ring prod;
    assert_int_equal(rlb__ring_attach(&prod, mem, size, RLB_RING_PRODUCER), 0);
    uint8_t msg[3000];
    for (int i = 0; i < 6 && d->sizes[i]; i++) {
        void *p;
        size_t cap;
        assert_int_equal(rlb__ring_claim(&prod, d->sizes[i], 0, &p, &cap), 0);
        pattern(p, d->sizes[i], (uint32_t)i);
        assert_int_equal(rlb__ring_commit(&prod, (uint32_t)i + 1, d->sizes[i]), 0);
    }
    if (d->send) {
        pattern(msg, d->send, 99);
        assert_int_equal(rlb__ring_send(&prod, 7, msg, d->send, 0), 0);
    }
    if (d->after) {
        pattern(msg, d->after, 100);
        assert_int_equal(rlb__ring_send(&prod, 8, msg, d->after, 0), 0);
    }
    fuzz_ring_prefix px = {.prod_index = h->prod.index,
                           .cons_index = d->cons_index ? d->cons_index : d->start,
                           .mode = d->mode,
                           .param = d->param};
    memcpy(out, &px, sizeof(px));
    memcpy(out + sizeof(px), mem + sizeof(rlb__ring_shared), FUZZ_RING_CAP);
    free(mem);
    size_t len = sizeof(px) + FUZZ_RING_CAP;
    while (len > sizeof(px) && out[len - 1] == 0)
        len--;
    return len;
}

/* test_ring --write-corpus DIR: writes the seeds. Returns the exit code. */
static int write_corpus(const char *dir)
{
    static uint8_t buf[sizeof(fuzz_ring_prefix) + FUZZ_RING_CAP];
    for (size_t i = 0; i < sizeof(seeds) / sizeof(seeds[0]); i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", dir, seeds[i].name);
        size_t len = build_seed(&seeds[i], buf);
        FILE *fp = fopen(path, "wb");
        if (!fp || fwrite(buf, 1, len, fp) != len || fclose(fp) != 0) {
            fprintf(stderr, "cannot write %s\n", path);
            return 1;
        }
    }
    return 0;
}

static void test_corpus_current(void **state)
{
    /* The committed seeds are what the producer writes today: a change of the wire
     * format shows here, and the corpus is rewritten with --write-corpus. */
    static uint8_t want[sizeof(fuzz_ring_prefix) + FUZZ_RING_CAP];
    static uint8_t have[sizeof(want) + 1];
    for (size_t i = 0; i < sizeof(seeds) / sizeof(seeds[0]); i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", RLB_RING_CORPUS, seeds[i].name);
        size_t len = build_seed(&seeds[i], want);
        FILE *fp = fopen(path, "rb");
        if (!fp)
            fail_msg("missing seed %s", path);
        size_t got = fread(have, 1, sizeof(have), fp);
        fclose(fp);
        if (got != len || memcmp(have, want, len) != 0)
            fail_msg("seed %s is stale: run test_ring --write-corpus %s", path,
                     RLB_RING_CORPUS);
    }
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--write-corpus") == 0)
        return write_corpus(argv[2]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memsize),
        cmocka_unit_test(test_attach_validates),
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_commit_rules),
        cmocka_unit_test(test_abort),
        cmocka_unit_test(test_full),
        cmocka_unit_test(test_wrap_padding),
        cmocka_unit_test(test_fragments_fit),
        cmocka_unit_test(test_fragments_stream),
        cmocka_unit_test(test_fragments_limits),
        cmocka_unit_test(test_close_and_liveness),
        cmocka_unit_test(test_liveness_callback),
        cmocka_unit_test(test_sleep_wake),
        cmocka_unit_test(test_sleep_wake_eventfd),
        cmocka_unit_test(test_send_from_resumes),
        cmocka_unit_test(test_fragments_bounded),
        cmocka_unit_test(test_parts),
        cmocka_unit_test(test_private_copy),
        cmocka_unit_test(test_corrupt_indices),
        cmocka_unit_test(test_corrupt_records),
        cmocka_unit_test(test_corrupt_fragments),
        cmocka_unit_test(test_lying_total),
        cmocka_unit_test(test_corpus_current),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
