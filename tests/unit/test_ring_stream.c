/* test_ring_stream: large messages streamed through the ring (common/ring.c) as fragments.
 *
 *   wake batching   both sides of an 8 MiB ring as event loops over their eventfds: the
 *                   wake-ups each side receives stay a few per 4 MiB message, far fewer
 *                   than its sixteen fragments.
 */
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/ring.h"
#include "rlb/rlb.h"

#define BATCH_CAP (8u << 20)        /* ring of the wake-batching test (RLB_RING_BYTES) */
#define BATCH_LEN (4u << 20)        /* its messages */
#define BATCH_N 16                  /* how many */
#define WAIT_MS 20000               /* bound on every wait: a stuck test fails, never hangs */

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
        cmocka_unit_test(test_wake_batching),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
