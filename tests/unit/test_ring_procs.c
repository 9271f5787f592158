/* test_ring_procs: two processes over a real shared-memory segment (rlb__shm_create):
 * the child produces 10^6 messages of random sizes (some fragmented), the parent checks
 * every byte of each (tests/unit/ring_traffic.h). The parent's liveness callback reaps the
 * child, so a crashed producer fails the test at once instead of at a timeout. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/ring.h"
#include "common/shm.h"
#include "rlb/rlb.h"
#include "tests/unit/ring_traffic.h"

#define CAP (64u * 1024)

static void test_million_messages(void **state)
{
    size_t size = rlb__ring_memsize(CAP);
    int fd;
    void *mem;
    assert_int_equal(rlb__shm_create(size, "test-ring", &fd), 0);
    assert_int_equal(rlb__shm_map(fd, size, &mem), 0);
    assert_int_equal(rlb__ring_init(mem, CAP), 0);
    traffic t = {.seed = 42, .count = 1000000, .big = 3 * CAP, .timeout_ms = 10000};

    traffic_child c = {.pid = fork()};
    assert_true(c.pid >= 0);
    if (c.pid == 0) {
        rlb_ring prod;
        int rc = rlb__ring_attach(&prod, mem, size, RLB_RING_PRODUCER);
        if (rc == 0)
            rc = traffic_produce(&prod, &t);
        _exit(rc == 0 ? 0 : 1);
    }
    rlb_ring cons;
    assert_int_equal(rlb__ring_attach(&cons, mem, size, RLB_RING_CONSUMER), 0);
    rlb__ring_set_liveness(&cons, traffic_child_alive, &c);
    uint64_t bad = 0;
    int rc = traffic_consume(&cons, &t, &bad);
    if (rc == 1)
        fail_msg("message %llu differs", (unsigned long long)bad);
    assert_int_equal(rc, 0);
    if (!c.reaped)
        assert_int_equal(waitpid(c.pid, &c.status, 0), c.pid);
    assert_true(WIFEXITED(c.status));
    assert_int_equal(WEXITSTATUS(c.status), 0);
    assert_int_equal(((rlb__ring_shared *)mem)->prod.index, ((rlb__ring_shared *)mem)->cons.index);
    rlb__shm_unmap(mem, size);
    close(fd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_million_messages),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
