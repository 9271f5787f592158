/* test_ring_threads: one producer thread and one consumer thread over a ring in malloc'ed
 * memory, passing a stream of random-size messages (some fragmented) whose every byte the
 * consumer checks (tests/unit/ring_traffic.h). Run under TSan (-DRLB_TSAN=ON) it checks that
 * the acquire/release pairs publish what they must; one case spins, one makes both sides
 * sleep on their semaphores at every wait. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "common/ring.h"
#include "rlb/rlb.h"
#include "tests/unit/ring_traffic.h"

#define CAP (16u * 1024)

typedef struct producer {
    rlb_ring ring;        /* producer handle */
    const traffic *t;     /* stream to send */
    int rc;               /* traffic_produce's result */
} producer;

static void *produce(void *arg)
{
    producer *p = arg;
    p->rc = traffic_produce(&p->ring, p->t);
    return NULL;
}

/* Streams `count` messages; spin_ns applies to both sides (0: sleep at once). */
static void run(uint64_t seed, uint64_t count, int64_t spin_ns)
{
    size_t size = rlb__ring_memsize(CAP);
    void *mem = aligned_alloc(64, size);
    assert_non_null(mem);
    assert_int_equal(rlb__ring_init(mem, CAP), 0);
    traffic t = {.seed = seed, .count = count, .big = 3 * CAP, .timeout_ms = 10000};
    producer p = {.t = &t};
    rlb_ring cons;
    assert_int_equal(rlb__ring_attach(&p.ring, mem, size, RLB_RING_PRODUCER), 0);
    assert_int_equal(rlb__ring_attach(&cons, mem, size, RLB_RING_CONSUMER), 0);
    p.ring.spin_ns = cons.spin_ns = spin_ns;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, produce, &p), 0);
    uint64_t bad = 0;
    int rc = traffic_consume(&cons, &t, &bad);
    pthread_join(th, NULL);
    if (rc == 1)
        fail_msg("message %llu differs", (unsigned long long)bad);
    assert_int_equal(rc, 0);
    assert_int_equal(p.rc, 0);
    /* Everything sent was consumed: the indices meet. */
    assert_int_equal(((rlb__ring_shared *)mem)->prod.index, ((rlb__ring_shared *)mem)->cons.index);
    free(mem);
}

static void test_spinning(void **state)
{
    run(1, 200000, 50000);
}

static void test_sleeping(void **state)
{
    run(2, 20000, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spinning),
        cmocka_unit_test(test_sleeping),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
