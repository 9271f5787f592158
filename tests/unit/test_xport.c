/* test_xport: the cross-node transport (bridge/xport) over UCX, nodes as processes of this
 * machine meeting through a real rendezvous store.
 *
 * - 2 and 3 nodes, striped all-to-all: every node sends its own 12 MiB in 1 MiB chunks
 *   (tags = chunk index) to every other node, with all requests in flight at once, and
 *   checks every byte it receives against the sender's pattern;
 * - kill -9 of a node that was to send: with UCX's peer failure handling the receiver's
 *   wait fails with RLB_EPEERDEAD at once; without it (shared memory) with RLB_ETIMEDOUT
 *   after its 3 s without progress, no later than 2 s past it.
 * No UCX in this build: exit 77 (skip).
 */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "bridge/xport/xport.h"
#include "common/clock.h"
#include "common/store.h"
#include "rlb/rlb.h"

#define SHARD (12u << 20)
#define CHUNK (1u << 20)
#define NCHUNK (SHARD / CHUNK)

static uint8_t pattern(int node, size_t i)
{
    return (uint8_t)(i * 131 + (i >> 12) * 7 + (size_t)node * 53 + 1);
}

/* Node `node`'s endpoint, connected to every other node's; NULL (the step that failed
 * printed) otherwise. The bounds are generous: ctest runs this beside heavy tests on a
 * machine of two cores. */
static rlb_xport *join(int port, const char *run, int node, int nnodes, int peer_errors)
{
    rlb_store *st = NULL;
    rlb_xport *x = NULL;
    const char *step = "store connect";
    int rc = rlb__store_connect("127.0.0.1", port, run, 30000, &st, NULL, 0);
    if (rc == 0) {
        step = "UCX endpoint";
        rc = rlb__xport_ucx_create(node, nnodes, peer_errors, &x);
    }
    if (rc == 0) {
        step = "connect to every node";
        rc = rlb__xport_connect_all(x, st, "xport", 30000);
    }
    if (rc < 0) {
        fprintf(stderr, "node %d of %d: %s: %s\n", node, nnodes, step, rlb_strerror(rc));
        rlb__xport_destroy(x);
        x = NULL;
    }
    rlb__store_close(st);
    return x;
}

/* One node of the all-to-all; returns the process exit status. */
static int node_main(int port, int node, int nnodes)
{
    rlb_xport *x = join(port, "a2a", node, nnodes, 0);
    if (!x)
        return 10;
    uint8_t *mine = malloc(SHARD), *theirs = malloc((size_t)SHARD * nnodes);
    rlb_xreq **reqs = calloc((size_t)(2 * NCHUNK * nnodes), sizeof(*reqs));
    int n = 0, rc = 0;
    for (size_t i = 0; i < SHARD; i++)
        mine[i] = pattern(node, i);
    for (int p = 0; p < nnodes && rc == 0; p++) {
        if (p == node)
            continue;
        for (unsigned k = 0; k < NCHUNK && rc == 0; k++) {
            rc = x->iface->irecv(x->ctx, p, k, theirs + (size_t)p * SHARD + (size_t)k * CHUNK,
                                 CHUNK, &reqs[n++]);
            if (rc == 0)
                rc = x->iface->isend(x->ctx, p, k, mine + (size_t)k * CHUNK, CHUNK, &reqs[n++]);
        }
    }
    if (rc == 0)
        rc = rlb__xport_wait_all(x, reqs, n, 20000);
    for (int p = 0; p < nnodes && rc == 0; p++)
        for (size_t i = 0; p != node && i < SHARD && rc == 0; i++)
            if (theirs[(size_t)p * SHARD + i] != pattern(p, i)) {
                fprintf(stderr, "node %d: byte %zu from node %d differs\n", node, i, p);
                rc = 11;
            }
    /* every node finishes receiving before any endpoint closes */
    rlb_store *st = NULL;
    int64_t v = 0;
    char b[8];
    size_t len;
    if (rlb__store_connect("127.0.0.1", port, "a2a", 5000, &st, NULL, 0) == 0) {
        rlb__store_add(st, "finished", 1, &v);
        if (v == nnodes)
            rlb__store_set(st, "all", "1", 1);
        rlb__store_wait(st, "all", 10000, b, sizeof(b), &len);
        rlb__store_close(st);
    }
    rlb__xport_destroy(x);
    free(mine);
    free(theirs);
    free(reqs);
    return rc < 0 ? 12 : rc;
}

static void all_to_all(int nnodes)
{
    rlb_store_server *s = NULL;
    assert_int_equal(rlb__store_server_start("127.0.0.1", 0, "a2a", &s), 0);
    int port = rlb__store_server_port(s);
    pid_t pid[3];
    for (int i = 0; i < nnodes; i++) {
        pid[i] = fork();
        if (pid[i] == 0)
            _exit(node_main(port, i, nnodes));
    }
    for (int i = 0; i < nnodes; i++) {
        int st;
        assert_int_equal(waitpid(pid[i], &st, 0), pid[i]);
        assert_true(WIFEXITED(st));
        assert_int_equal(WEXITSTATUS(st), 0);
    }
    rlb__store_server_stop(s);
}

static void test_two_nodes(void **state)
{
    all_to_all(2);
}

static void test_three_nodes(void **state)
{
    all_to_all(3);
}

/* Node 1 connects and is killed before it sends; node 0 waits on a receive from it. */
static void sender_killed(int peer_errors)
{
    rlb_store_server *s = NULL;
    assert_int_equal(rlb__store_server_start("127.0.0.1", 0, "kill", &s), 0);
    int port = rlb__store_server_port(s);
    int ready[2];
    assert_int_equal(pipe(ready), 0);
    pid_t victim = fork();
    if (victim == 0) {
        rlb_xport *x = join(port, "kill", 1, 2, peer_errors);
        char b = x ? 1 : 0;
        ssize_t w = write(ready[1], &b, 1);
        (void)w;
        pause(); /* connected, never sends: killed here */
        _exit(0);
    }
    rlb_xport *x = join(port, "kill", 0, 2, peer_errors);
    assert_non_null(x);
    char b = 0;
    assert_int_equal(read(ready[0], &b, 1), 1);
    assert_int_equal(b, 1);
    uint8_t *buf = malloc(8u << 20);
    rlb_xreq *req = NULL;
    assert_int_equal(x->iface->irecv(x->ctx, 1, 7, buf, 8u << 20, &req), 0);
    kill(victim, SIGKILL);
    waitpid(victim, NULL, 0);
    long long t0 = rlb__clock_ms();
    int rc = rlb__xport_wait_all(x, &req, 1, 3000);
    long long took = rlb__clock_ms() - t0;
    fprintf(stderr, "receiver saw %s after %lld ms\n", rlb_strerror(rc), took);
    if (peer_errors) { /* UCX tells at once */
        assert_int_equal(rc, RLB_EPEERDEAD);
        assert_true(took < 2000);
    } else { /* no progress for the timeout */
        assert_int_equal(rc, RLB_ETIMEDOUT);
        assert_true(took >= 2900 && took < 3000 + 2000);
    }
    rlb__xport_destroy(x);
    free(buf);
    close(ready[0]);
    close(ready[1]);
    rlb__store_server_stop(s);
}

static void test_sender_killed_peer_errors(void **state)
{
    sender_killed(1);
}

static void test_sender_killed_shm(void **state)
{
    sender_killed(0);
}

int main(void)
{
    /* Under a sanitizer UCX's transports were seen to hang in the full suite (alone, with
     * its memory hooks off, they pass): a known issue, left open, so the test skips there. */
    if (getenv("RLB_TEST_SANITIZED")) {
        fprintf(stderr, "test_xport: skipped under a sanitizer (UCX hangs there)\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_nodes),
        cmocka_unit_test(test_three_nodes),
        cmocka_unit_test(test_sender_killed_peer_errors),
        cmocka_unit_test(test_sender_killed_shm),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
