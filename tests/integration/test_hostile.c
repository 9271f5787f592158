/* test_hostile: peers that attack the shared memory they share with the bridge:
 *   - a trainer whose shard memory is an unsealed memfd, truncated before its publish
 *     (what it could do under the copy): the bridge refuses the segment at registration,
 *     naming the missing seals, the version aborts with a reason, and the bridge serves on;
 *   - rlb_alloc_host of more than the machine holds is refused, naming the limit;
 *   - a peer that writes garbage over the wake-up lines (semaphores) of its rings, then over
 *     the whole ring headers: the bridge never posts a semaphore in memory a peer can
 *     write, so it neither aborts nor hangs; it drops that peer and serves the others.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>

#include "client/client_internal.h"
#include "common/conn.h"
#include "common/segmsg.h"
#include "tests/integration/bridge_harness.h"

#define MAX_TOKENS 8

/* The fd of the last unsealed allocation (the test truncates it). */
static int unsealed_fd = -1;

/* rlb_alloc_host as a careless or hostile trainer would write it: a memfd without seals,
 * passed to the bridge like any allocation (the library sends its fd with the first
 * register that uses it). */
static int unsealed_alloc(rlb_client *c, size_t bytes, void **ptr)
{
    size_t size = (bytes + 4095) / 4096 * 4096;
    int fd = memfd_create("test-unsealed", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0)
        return RLB_EIO;
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mem == MAP_FAILED)
        return RLB_EIO;
    uint32_t id;
    unsealed_fd = fd;
    *ptr = mem;
    return rlb__host_adopt(c, fd, mem, bytes, 0, &id);
}

static void test_truncated_segment(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    rlb_client *tool;
    int32_t prompt[3] = {5, 9, 2};
    assert_int_equal(h_start(&r, RLB_SYNC_PAUSE), 0);
    assert_int_equal(h_workers_loaded(&r, 1, 1, 0), 0); /* they serve with no version */
    h_alloc = unsealed_alloc;
    int rc = h_trainer_open(&r, &t, 0, 1, H_FSDP2);
    h_alloc = rlb_alloc_host;
    fprintf(stderr, "register from an unsealed segment: %s (%s)\n", rlb_strerror(rc),
            rc ? rlb_last_error(t.c) : "");
    assert_int_equal(rc, RLB_EPERM);
    assert_non_null(strstr(rlb_last_error(t.c), "F_SEAL_SHRINK"));
    /* What it could do under the copy had the bridge mapped the segment. */
    assert_int_equal(ftruncate(unsealed_fd, 0), 0);
    rc = rlb_publish(t.c, 1, NULL);
    fprintf(stderr, "publish after the truncation: %s (%s)\n", rlb_strerror(rc),
            rlb_last_error(t.c));
    assert_int_equal(rc, RLB_EABORTED);
    assert_null(strstr(rlb_last_error(t.c), "peer died"));
    /* The bridge serves on. */
    assert_int_equal(h_connect(&r, 0, 0, &tool), 0);
    assert_int_equal(h_wait_workers(&r, tool, 1, 1), 0);
    assert_int_equal(h_check_greedy(&r, tool, 0, 1, prompt, 3, MAX_TOKENS), 0);
    /* More than the machine holds: refused at once, naming the limit (the reservation
     * would otherwise run until the OOM killer ends the trainer). */
    void *huge = NULL;
    assert_int_equal(rlb_alloc_host(t.c, (size_t)1 << 50, &huge), RLB_ENOMEM);
    fprintf(stderr, "rlb_alloc_host(1 << 50): %s\n", rlb_last_error(t.c));
    assert_non_null(strstr(rlb_last_error(t.c), "more than"));
    assert_null(huge);
    close(unsealed_fd);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, tool), 0);
}

/* Packs m and sends it on a raw connection. */
static int raw_send(rlb_conn *c, const rlb_msg *m)
{
    uint8_t buf[4096];
    size_t len;
    int rc = rlb__msg_pack(m, buf, sizeof(buf), &len);
    return rc < 0 ? rc : rlb__ring_send(rlb__conn_tx(c), m->type, buf, len, 2000);
}

/* Writes garbage over both rings' wake-up lines (sleeping flags and semaphores), or over
 * their whole headers. */
static void scribble(rlb_conn *c, int whole)
{
    rlb_ring *rings[2] = {rlb__conn_tx(c), rlb__conn_rx(c)};
    for (int i = 0; i < 2; i++) {
        rlb__ring_shared *s = rings[i]->shm;
        if (whole) {
            memset(s, 0xa5, sizeof(*s));
        } else {
            memset(&s->prod_wake, 0xa5, sizeof(s->prod_wake));
            memset(&s->cons_wake, 0xa5, sizeof(s->cons_wake));
        }
    }
}

static void publish(h_trainer *t, uint64_t v)
{
    h_trainer_fill(t, v);
    assert_int_equal(rlb_publish(t->c, v, NULL), 0);
}

static void test_scribbled_rings(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    int32_t prompt[3] = {7, 1, 30};
    assert_int_equal(h_start(&r, RLB_SYNC_PAUSE), 0);
    assert_int_equal(h_workers(&r, 1, 1), 0);
    assert_int_equal(h_trainer_open(&r, &t, 0, 1, H_FSDP2), 0);
    assert_int_equal(h_wait_workers(&r, t.c, 1, 1), 0);
    double peers = h_stat(t.c, "peers");

    /* Garbage over the semaphores, then a hello: the bridge's welcome wakes us through our
     * eventfd, never through the semaphore. */
    rlb_conn *c;
    assert_int_equal(rlb__conn_connect(r.sock, 5000, &c), 0);
    assert_int_equal(h_wait_stat(t.c, "peers", peers + 1, 5), 0);
    scribble(c, 0);
    rlb_msg hello = {.type = RLB_MSG_HELLO,
                     .hello = {.abi_version = RLB_ABI_VERSION, .role = RLB_ROLE_TOOL}};
    assert_int_equal(raw_send(c, &hello), 0);
    rlb_ring_rx rx = {.max_msg = 1 << 20};
    rlb_ring_msg rm;
    assert_int_equal(rlb__ring_recv(rlb__conn_rx(c), &rx, 5000, &rm), 0);
    rlb__ring_recv_done(rlb__conn_rx(c), &rx);
    publish(&t, 2);

    /* Garbage over everything: the bridge finds the ring corrupt and drops us. */
    scribble(c, 1);
    assert_int_equal(h_wait_stat(t.c, "peers", peers, 5), 0);
    publish(&t, 3);
    assert_int_equal(h_check_greedy(&r, t.c, 3, 1, prompt, 3, MAX_TOKENS), 0);
    rlb__ring_rx_free(&rx);
    rlb__conn_close(c);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_truncated_segment, h_teardown),
        cmocka_unit_test_teardown(test_scribbled_rings, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
