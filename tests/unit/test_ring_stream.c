/* test_ring_stream: large messages streamed through the ring (common/ring.c) as fragments,
 * between two processes over a real shared-memory segment and between two threads.
 *
 *   random sizes    10^5 messages from a child to its parent over a 1 MiB ring, most small,
 *                   some up to 8 times the ring. Before it sends a message the writer puts
 *                   its length, type and a checksum of its own bytes into a table in shared
 *                   memory outside the ring; the reader checks what it got against that
 *                   entry, reading half the messages with rlb__ring_recv and half in parts
 *                   (rlb__ring_recv_part), each either waiting in the ring or as an event
 *                   loop polling its eventfd. Wake-ups go through eventfds, as on connections.
 *   writer killed   a writer killed (SIGKILL) in the middle of a message 16 times the ring:
 *                   the reader, through recv or in parts, gets RLB_EPEERDEAD, drops the
 *                   partial message and frees every fragment; its buffer grew only with the
 *                   bytes that came, never to the announced length.
 *   wake batching   both sides of an 8 MiB ring as event loops over their eventfds: the
 *                   wake-ups each side receives stay a few per 4 MiB message, far fewer
 *                   than its sixteen fragments.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/ring.h"
#include "common/shm.h"
#include "rlb/rlb.h"
#include "tests/unit/ring_traffic.h"

#define RING_CAP (1u << 20)         /* ring of the two-process tests */
#define RANDOM_N 100000             /* messages of the random-size test */
#define RANDOM_MAX (8u * RING_CAP)  /* longest of them */
#define KILLED_LEN (16u * RING_CAP) /* the message the killed writer was sending */
#define BATCH_CAP (8u << 20)        /* ring of the wake-batching test (RLB_RING_BYTES) */
#define BATCH_LEN (4u << 20)        /* its messages */
#define BATCH_N 16                  /* how many */
#define WAIT_MS 20000               /* bound on every wait: a stuck test fails, never hangs */

/* ---- A segment shared with a forked writer ------------------------------------------- */

typedef struct pair {
    size_t size;          /* bytes of the ring segment */
    void *mem;            /* the segment */
    int fd;               /* its memfd */
    int efd[2];           /* eventfds: [0] the reader sleeps on it, [1] the writer */
    traffic_child writer; /* the writer process */
    rlb_ring cons;        /* the reader's handle */
} pair;

static void pair_open(pair *p)
{
    memset(p, 0, sizeof(*p));
    p->size = rlb__ring_memsize(RING_CAP);
    assert_int_equal(rlb__shm_create(p->size, "test-ring-stream", &p->fd), 0);
    assert_int_equal(rlb__shm_map(p->fd, p->size, &p->mem), 0);
    assert_int_equal(rlb__ring_init(p->mem, RING_CAP), 0);
    for (int i = 0; i < 2; i++) {
        p->efd[i] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        assert_true(p->efd[i] >= 0);
    }
}

/* In the child: attaches the producer side, waking the reader through its eventfd. */
static int writer_attach(pair *p, rlb_ring *prod)
{
    int rc = rlb__ring_attach(prod, p->mem, p->size, RLB_RING_PRODUCER);
    if (rc == 0)
        rlb__ring_set_wake_fds(prod, p->efd[1], p->efd[0]);
    return rc;
}

/* In the parent, after the fork: attaches the consumer side. */
static void reader_attach(pair *p)
{
    assert_true(p->writer.pid > 0);
    assert_int_equal(rlb__ring_attach(&p->cons, p->mem, p->size, RLB_RING_CONSUMER), 0);
    rlb__ring_set_wake_fds(&p->cons, p->efd[0], p->efd[1]);
    rlb__ring_set_liveness(&p->cons, traffic_child_alive, &p->writer);
}

/* Reaps the writer (if still needed) and returns its wait status; frees the segment. */
static int pair_close(pair *p)
{
    traffic_child *w = &p->writer;
    if (!w->reaped)
        assert_int_equal(waitpid(w->pid, &w->status, 0), w->pid);
    rlb__shm_unmap(p->mem, p->size);
    close(p->fd);
    close(p->efd[0]);
    close(p->efd[1]);
    return w->status;
}

/* One sleep of an event loop on ring r's eventfd until the peer wakes it (or WAIT_MS):
 * armed for `need` bytes (rlb__ring_arm). Returns the wake-ups the eventfd counted. */
static uint64_t loop_sleep(rlb_ring *r, size_t need)
{
    int rc = rlb__ring_arm(r, need);
    assert_true(rc >= 0);
    if (rc == 1)
        return 0;
    struct pollfd pf = {.fd = r->wait_fd, .events = POLLIN};
    assert_int_equal(poll(&pf, 1, WAIT_MS), 1);
    uint64_t count = 0;
    assert_int_equal(read(r->wait_fd, &count, sizeof(count)), sizeof(count));
    rlb__ring_disarm(r);
    return count;
}

/* ---- Random sizes ------------------------------------------------------------------- */

typedef struct sent {
    uint64_t len;  /* message length */
    uint64_t type; /* message type */
    uint64_t sum;  /* checksum of the writer's bytes */
} sent;

/* A position-sensitive 64-bit checksum: words, then tail bytes, through a multiply chain. */
static uint64_t checksum(const uint8_t *p, size_t len)
{
    uint64_t h = 0x84222325cbf29ce4ull ^ len;
    size_t i = 0;
    for (; i + sizeof(uint64_t) <= len; i += sizeof(uint64_t)) {
        uint64_t w;
        memcpy(&w, p + i, sizeof(w));
        h = (h ^ w) * 0x100000001b3ull;
        h ^= h >> 29;
    }
    for (; i < len; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

/* Length of message i: most up to 256 bytes, 9% up to 64 KiB, 1% up to 1 MiB and 0.2% up
 * to RANDOM_MAX, eight rings. */
static size_t random_len(uint64_t *rng)
{
    uint64_t pick = traffic_rand(rng) % 1000, x = traffic_rand(rng);
    if (pick < 2)
        return (size_t)(x % (RANDOM_MAX + 1));
    if (pick < 12)
        return (size_t)(x % (RING_CAP + 1));
    if (pick < 100)
        return (size_t)(x % (64u << 10));
    return (size_t)(x % 257);
}

/* The writer: fills each message with fresh random bytes, records it in the table, then
 * sends it, every third one as an event loop (rlb__ring_send_from without waiting). */
static int random_writer(pair *p, sent *table)
{
    rlb_ring prod;
    uint8_t *buf = malloc(RANDOM_MAX);
    int rc = buf ? writer_attach(p, &prod) : RLB_ENOMEM;
    uint64_t rng = 7;
    for (uint64_t i = 0; i < RANDOM_N && rc == 0; i++) {
        size_t len = random_len(&rng);
        for (size_t k = 0; k < len; k += 8) {
            uint64_t v = traffic_rand(&rng);
            memcpy(buf + k, &v, len - k < 8 ? len - k : 8);
        }
        uint32_t type = (uint32_t)(i * 2654435761u) & RLB_RING_TYPE_MASK;
        table[i] = (sent){.len = len, .type = type, .sum = checksum(buf, len)};
        if (i % 3) {
            rc = rlb__ring_send(&prod, type, buf, len, WAIT_MS);
            continue;
        }
        size_t off = 0;
        while ((rc = rlb__ring_send_from(&prod, type, buf, len, &off, 0)) == RLB_EAGAIN) {
            size_t need = rlb__ring_send_need(&prod, len, off);
            int armed = rlb__ring_arm(&prod, need);
            struct pollfd pf = {.fd = prod.wait_fd, .events = POLLIN};
            if (armed == 0 && poll(&pf, 1, WAIT_MS) != 1)
                rc = RLB_ETIMEDOUT;
            uint64_t count;
            (void)!read(prod.wait_fd, &count, sizeof(count));
            rlb__ring_disarm(&prod);
            if (armed < 0 || rc == RLB_ETIMEDOUT)
                break;
        }
    }
    free(buf);
    return rc;
}

/* Receives message i in parts into buf, checking that they follow one another; returns its
 * length. Odd messages of the form 4k+1 are read as an event loop. */
static size_t read_parts(pair *p, rlb_ring_rx *rx, uint64_t i, uint8_t *buf, uint32_t *type)
{
    int loop = i % 4 == 1;
    rlb_ring_part part = {0};
    size_t off = 0;
    do {
        int rc = rlb__ring_recv_part(&p->cons, rx, loop ? 0 : WAIT_MS, &part);
        if (rc == RLB_EAGAIN && loop) {
            loop_sleep(&p->cons, 0);
            continue;
        }
        assert_int_equal(rc, 0);
        assert_int_equal(part.off, off);
        assert_true(part.total <= RANDOM_MAX && part.len <= part.total - off);
        memcpy(buf + off, part.data, part.len);
        off += part.len;
        *type = part.type;
    } while (!part.last);
    assert_int_equal(off, part.total);
    return off;
}

static void test_random_sizes(void **state)
{
    pair p;
    pair_open(&p);
    size_t table_bytes = RANDOM_N * sizeof(sent);
    sent *table = mmap(NULL, table_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                       -1, 0);
    assert_true(table != MAP_FAILED);
    p.writer.pid = fork();
    if (p.writer.pid == 0)
        _exit(random_writer(&p, table) == 0 ? 0 : 1);
    reader_attach(&p);

    uint8_t *buf = malloc(RANDOM_MAX);
    assert_non_null(buf);
    rlb_ring_rx rx = {.max_msg = RANDOM_MAX};
    size_t largest = 0;
    for (uint64_t i = 0; i < RANDOM_N; i++) {
        const uint8_t *got;
        size_t len;
        uint32_t type = 0;
        if (i % 2 == 0) {
            rlb_ring_msg m;
            int rc = rlb__ring_recv(&p.cons, &rx, WAIT_MS, &m);
            if (rc != 0)
                fail_msg("message %llu: %s", (unsigned long long)i, rlb_strerror(rc));
            got = m.data;
            len = m.len;
            type = m.type;
        } else {
            len = read_parts(&p, &rx, i, buf, &type);
            got = buf;
        }
        /* The table entry was written before the message was sent: the ring's release of
         * its index publishes it. */
        const sent *want = &table[i];
        if (len != want->len || type != want->type || checksum(got, len) != want->sum)
            fail_msg("message %llu differs (%zu bytes, %llu sent)", (unsigned long long)i,
                     len, (unsigned long long)want->len);
        if (len > largest)
            largest = len;
    }
    rlb__ring_recv_done(&p.cons, &rx);
    /* Reassembly grew with the messages and never past the largest one. */
    assert_true(largest > 4 * RING_CAP);
    assert_true(rx.buf_cap <= largest);
    rlb__ring_rx_free(&rx);
    free(buf);
    int st = pair_close(&p);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    munmap(table, table_bytes);
}

/* ---- Writer killed mid-message ------------------------------------------------------ */

/* Kills a writer stuck in a message of KILLED_LEN bytes once it has filled the ring, then
 * receives what it left, in parts (`parts`) or with rlb__ring_recv. */
static void killed_writer(int parts)
{
    pair p;
    pair_open(&p);
    p.writer.pid = fork();
    if (p.writer.pid == 0) {
        rlb_ring prod;
        uint8_t *msg = calloc(1, KILLED_LEN);
        if (msg && writer_attach(&p, &prod) == 0)
            rlb__ring_send(&prod, 3, msg, KILLED_LEN, WAIT_MS); /* blocks: nobody reads */
        _exit(1);
    }
    reader_attach(&p);
    /* Wait until the writer has filled the ring (less than a fragment free). */
    rlb__ring_shared *h = p.mem;
    struct timespec nap = {0, 1000000};
    for (int i = 0; i < WAIT_MS; i++) {
        uint64_t used = __atomic_load_n(&h->prod.index, __ATOMIC_ACQUIRE) - h->cons.index;
        if (used + RLB_RING_FRAG_BYTES + 16 > RING_CAP)
            break;
        nanosleep(&nap, NULL);
    }
    assert_int_equal(kill(p.writer.pid, SIGKILL), 0);
    assert_int_equal(waitpid(p.writer.pid, &p.writer.status, 0), p.writer.pid);
    p.writer.reaped = 1;
    assert_true(WIFSIGNALED(p.writer.status));

    rlb_ring_rx rx = {.max_msg = KILLED_LEN};
    size_t got = 0;
    int rc;
    if (parts) {
        rlb_ring_part part;
        while ((rc = rlb__ring_recv_part(&p.cons, &rx, WAIT_MS, &part)) == 0) {
            assert_int_equal(part.off, got);
            assert_int_equal(part.total, KILLED_LEN);
            assert_false(part.last);
            got += part.len;
        }
    } else {
        rlb_ring_msg m;
        rc = rlb__ring_recv(&p.cons, &rx, WAIT_MS, &m);
    }
    assert_int_equal(rc, RLB_EPEERDEAD);
    assert_int_equal(rx.have, 0); /* the partial message is dropped */
    assert_true(got < KILLED_LEN);
    /* Every fragment was freed, and the buffer held at most what came, doubled. */
    assert_int_equal(h->cons.index, h->prod.index);
    assert_true(rx.buf_cap <= 2 * RING_CAP);
    rlb__ring_rx_free(&rx);
    pair_close(&p);
}

static void test_writer_killed_recv(void **state)
{
    killed_writer(0);
}

static void test_writer_killed_parts(void **state)
{
    killed_writer(1);
}

/* ---- Wake batching ------------------------------------------------------------------ */

typedef struct batch_side {
    rlb_ring *ring;  /* this side's handle */
    uint8_t *msg;    /* BATCH_LEN bytes: source (producer) */
    uint64_t wakes;  /* wake-ups counted on our eventfd */
    int rc;          /* producer: first failure, or 0 */
} batch_side;

/* The producer as an event loop: rlb__ring_send_from without waiting, then a sleep on its
 * eventfd armed for the next record. */
static void *batch_producer(void *arg)
{
    batch_side *s = arg;
    for (uint64_t i = 0; i < BATCH_N && s->rc == 0; i++) {
        memcpy(s->msg, &i, sizeof(i));
        size_t off = 0;
        int rc;
        while ((rc = rlb__ring_send_from(s->ring, 1, s->msg, BATCH_LEN, &off, 0)) ==
               RLB_EAGAIN)
            s->wakes += loop_sleep(s->ring, rlb__ring_send_need(s->ring, BATCH_LEN, off));
        s->rc = rc;
    }
    return NULL;
}

static void test_wake_batching(void **state)
{
    size_t size = rlb__ring_memsize(BATCH_CAP);
    void *mem = aligned_alloc(64, size);
    assert_non_null(mem);
    assert_int_equal(rlb__ring_init(mem, BATCH_CAP), 0);
    rlb_ring prod, cons;
    assert_int_equal(rlb__ring_attach(&prod, mem, size, RLB_RING_PRODUCER), 0);
    assert_int_equal(rlb__ring_attach(&cons, mem, size, RLB_RING_CONSUMER), 0);
    int cons_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int prod_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    assert_true(cons_fd >= 0 && prod_fd >= 0);
    rlb__ring_set_wake_fds(&cons, cons_fd, prod_fd);
    rlb__ring_set_wake_fds(&prod, prod_fd, cons_fd);

    batch_side ps = {.ring = &prod, .msg = calloc(1, BATCH_LEN)};
    assert_non_null(ps.msg);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, batch_producer, &ps), 0);
    /* The consumer as an event loop: rlb__ring_recv without waiting, then a sleep. */
    rlb_ring_rx rx = {.max_msg = BATCH_LEN};
    uint64_t wakes = 0;
    for (uint64_t i = 0; i < BATCH_N;) {
        rlb_ring_msg m;
        int rc = rlb__ring_recv(&cons, &rx, 0, &m);
        if (rc == RLB_EAGAIN) {
            wakes += loop_sleep(&cons, 0);
            continue;
        }
        assert_int_equal(rc, 0);
        assert_int_equal(m.len, BATCH_LEN);
        assert_memory_equal(m.data, &i, sizeof(i));
        i++;
    }
    pthread_join(t, NULL);
    assert_int_equal(ps.rc, 0);
    uint64_t records = cons.seq, per_msg = BATCH_LEN / RLB_RING_FRAG_BYTES;
    assert_true(records >= BATCH_N * per_msg);
    /* A wake-up at a message's first and last fragment and once per quarter of the ring
     * (two per message here), plus one when a side waits with a wake-up still owed. */
    if (wakes > 4 * BATCH_N || ps.wakes > 4 * BATCH_N)
        fail_msg("%llu and %llu wake-ups for %llu records", (unsigned long long)wakes,
                 (unsigned long long)ps.wakes, (unsigned long long)records);
    rlb__ring_rx_free(&rx);
    free(ps.msg);
    close(cons_fd);
    close(prod_fd);
    free(mem);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_sizes),
        cmocka_unit_test(test_writer_killed_recv),
        cmocka_unit_test(test_writer_killed_parts),
        cmocka_unit_test(test_wake_batching),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
