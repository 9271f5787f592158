/* test_xnode_gate: the gate in front of the exchange between nodes (bridge/xnode.h) under
 * the timings a restart of the trainers brings, on two bridges of this machine (one CPU
 * worker and one trainer rank each, FSDP2 over both) that meet through a store this test
 * serves and reads, so it can act at exact points of the protocol.
 *
 * - rejoin: node 1's trainer dies after version 2's gate opened, and its restarted trainer
 *   publishes 2 again before node 0 has settled that attempt (node 0's worker is held with
 *   SIGSTOP, so node 0's local sync is not done yet). Node 1 must wait for the next attempt
 *   instead of running the opened one's exchange again, alone: there it made no progress,
 *   hit its bound and broke the exchange for the rest of the job. Version 2 then commits on
 *   both nodes once node 0's trainer publishes it again, and 3 after it.
 * - slow publisher: node 1's trainer publishes version 2 longer after node 0's than the
 *   exchange's no-progress bound (a restart that takes its time): node 0 waits at the gate,
 *   since node 1's bridge is alive, and the version commits.
 */
#include <inttypes.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/store.h"
#include "tests/integration/bridge_harness.h"

#define RUN_ID "xnode-gate-test"
#define PEER_TIMEOUT "3000" /* ms; the exchange gives up after 1 s more without progress */

/* The job: the store and both nodes, each with its worker and trainer rank. */
typedef struct job {
    rlb_store_server *srv;
    rlb_store *st;      /* the test's own client of the store */
    h_run r[2];
    h_child t[2];       /* trainer rank n on node n */
} job;

static void job_start(job *j)
{
    memset(j, 0, sizeof(*j));
    assert_int_equal(rlb__store_server_start("127.0.0.1", 0, RUN_ID, &j->srv), 0);
    int port = rlb__store_server_port(j->srv);
    assert_int_equal(rlb__store_connect("127.0.0.1", port, RUN_ID, 10000, &j->st, NULL, 0), 0);
    for (int n = 0; n < 2; n++) {
        h_node node = {.nnodes = 2, .node = n, .first_rank = (uint32_t)n, .n_ranks = 1,
                       .store_port = port, .run_id = RUN_ID};
        assert_int_equal(h_start_node(&j->r[n], RLB_SYNC_PAUSE, &node), 0);
        assert_int_equal(h_workers(&j->r[n], 1, 1), 0);
    }
    for (int n = 0; n < 2; n++)
        assert_int_equal(h_child_start(&j->r[n], &j->t[n], (uint32_t)n, 2, H_FSDP2), 0);
}

static void job_stop(job *j)
{
    for (int n = 0; n < 2; n++)
        h_child_stop(&j->t[n]);
    h_cleanup();
    rlb__store_close(j->st);
    rlb__store_server_stop(j->srv);
}

/* Waits for both trainers' publish results and checks they are want. */
static void results(job *j, int want)
{
    int rc;
    for (int n = 0; n < 2; n++) {
        assert_int_equal(h_child_result(&j->t[n], &rc), 0);
        assert_int_equal(rc, want);
    }
}

/* Publishes v on both trainers at once and checks both results are want. */
static void publish(job *j, uint64_t v, int want)
{
    for (int n = 0; n < 2; n++)
        assert_int_equal(h_child_publish(&j->t[n], v), 0);
    results(j, want);
}

/* Waits up to 10 s for the integer at key to reach at least want. */
static void wait_count(job *j, const char *key, int64_t want)
{
    int64_t v = 0;
    for (int i = 0; i < 10000 && v < want; i++) {
        assert_int_equal(rlb__store_add(j->st, key, 0, &v), 0);
        if (v < want)
            usleep(1000);
    }
    assert_true(v >= want);
}

static void test_rejoin(void **state)
{
    job j;
    char val[256];
    size_t len;
    int rc;
    job_start(&j);
    publish(&j, 1, 0);
    pid_t w0 = j.r[0].workers[0], w1 = j.r[1].workers[0];
    /* Neither node can finish its local sync of 2: both stay short of prepared. */
    kill(w0, SIGSTOP);
    kill(w1, SIGSTOP);
    for (int n = 0; n < 2; n++)
        assert_int_equal(h_child_publish(&j.t[n], 2), 0);
    /* Both nodes are in the exchange of 2's first attempt. */
    assert_int_equal(rlb__store_wait(j.st, "x/2.0/go", 10000, val, sizeof(val), &len), 0);
    assert_memory_equal(val, "on", 2);
    wait_count(&j, "x/2.0/in", 2);
    /* Node 1's trainer dies: node 1 leaves the attempt (its state says abort). */
    kill(j.t[1].pid, SIGKILL);
    h_child_stop(&j.t[1]);
    assert_int_equal(rlb__store_wait(j.st, "x/2.0/state/1", 10000, val, sizeof(val), &len), 0);
    assert_memory_equal(val, "abort", 5);
    kill(w1, SIGCONT);
    /* Restarted, it publishes 2 again while node 0 has not decided the first attempt. */
    assert_int_equal(h_child_start(&j.r[1], &j.t[1], 1, 2, H_FSDP2), 0);
    assert_int_equal(h_child_publish(&j.t[1], 2), 0);
    usleep(1200 * 1000);
    assert_int_equal(rlb__store_get(j.st, "x/2/cur", val, sizeof(val), &len), RLB_ENOTFOUND);
    /* Node 0 loads, decides the abort of the first attempt; its trainer publishes 2 again
     * and the second attempt runs on both nodes. */
    kill(w0, SIGCONT);
    assert_int_equal(h_child_result(&j.t[0], &rc), 0);
    assert_int_equal(rc, RLB_EABORTED);
    assert_int_equal(h_child_publish(&j.t[0], 2), 0);
    results(&j, 0);
    publish(&j, 3, 0);
    job_stop(&j);
    (void)state;
}

static void test_slow_publisher(void **state)
{
    job j;
    job_start(&j);
    publish(&j, 1, 0);
    assert_int_equal(h_child_publish(&j.t[0], 2), 0);
    usleep((atoi(PEER_TIMEOUT) + 2500) * 1000);
    assert_int_equal(h_child_publish(&j.t[1], 2), 0);
    results(&j, 0);
    publish(&j, 3, 0);
    job_stop(&j);
    (void)state;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* a killed trainer's command pipe */
    setenv("RLB_PEER_TIMEOUT_MS", PEER_TIMEOUT, 1);
    setenv("RLB_THREADS", "1", 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_rejoin, h_teardown),
        cmocka_unit_test_teardown(test_slow_publisher, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
