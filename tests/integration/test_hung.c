/* test_hung: a worker that is alive but hung (SIGSTOP here; a deadlock or a stuck
 * collective look the same from outside: no heartbeat) is treated as dead once its
 * heartbeat is older than RLB_PEER_TIMEOUT_MS, so no phase waits for it forever:
 *   - LOAD: a sync whose load a stopped worker never answers aborts, and the next publish
 *     commits on the other replica;
 *   - DRAIN: a request running on a stopped worker is retried elsewhere, so the drain and
 *     the sync finish;
 * and a stopped worker that wakes finds its connection closed and exits.
 */
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

#include "common/clock.h"
#include "tests/integration/bridge_harness.h"

#define MAX_TOKENS 8
#define TIMEOUT_MS 600

/* Bridge and two TP-1 replicas with a short peer timeout; version 1 committed. */
static void start(h_run *r, h_trainer *t)
{
    char ms[16];
    snprintf(ms, sizeof(ms), "%d", TIMEOUT_MS);
    setenv("RLB_PEER_TIMEOUT_MS", ms, 1);
    setenv("RLB_HEARTBEAT_MS", "50", 1);
    assert_int_equal(h_start_simple(r, t, RLB_SYNC_PAUSE, 2), 0);
}

static void test_load_bounded(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    int32_t prompt[3] = {2, 7, 18};
    start(&r, &t);
    kill(r.workers[0], SIGSTOP);
    h_trainer_fill(&t, 2);
    double t0 = rlb__clock_s();
    int rc = rlb_publish(t.c, 2, NULL);
    double took = rlb__clock_s() - t0;
    fprintf(stderr, "publish with a stopped worker: %s after %.2f s (%s)\n", rlb_strerror(rc),
            took, rc ? rlb_last_error(t.c) : "");
    assert_int_equal(rc, RLB_EABORTED);
    assert_non_null(strstr(rlb_last_error(t.c), "no heartbeat"));
    assert_true(took < 5 * TIMEOUT_MS / 1000.0 + 1);
    assert_true(h_stat(t.c, "replicas_up") == 1);
    assert_int_equal(rlb_publish(t.c, 2, NULL), 0);
    assert_int_equal(h_check_greedy(&r, t.c, 2, 1, prompt, 3, MAX_TOKENS), 0);
    kill(r.workers[0], SIGCONT); /* it finds its connection closed and exits */
    assert_int_equal(h_reap_worker(&r, 0, 10), 0);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

static void test_drain_bounded(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    int32_t prompt[3] = {28, 18, 28};
    start(&r, &t);
    kill(r.workers[0], SIGSTOP);
    h_request q;
    h_request_greedy(&q, prompt, 3, MAX_TOKENS);
    rlb_ticket tk;
    assert_int_equal(rlb_generate_submit(t.c, &q.req, &tk), 0); /* to replica 0: a tie */
    assert_int_equal(h_wait_stat(t.c, "inflight", 1, 10), 0);
    h_trainer_fill(&t, 2);
    double t0 = rlb__clock_s();
    assert_int_equal(rlb_publish(t.c, 2, NULL), 0);
    assert_true(rlb__clock_s() - t0 < 5 * TIMEOUT_MS / 1000.0 + 1);
    rlb_result *res;
    assert_int_equal(rlb_generate_wait(t.c, tk, 10000, &res), 0);
    /* Retried after the drain gave up on the stopped worker: either version is right. */
    uint64_t v = rlb_result_sample(res, 0)->weight_version;
    assert_true(v == 1 || v == 2);
    assert_int_equal(h_check_result(&r, res, v, 1, prompt, 3, MAX_TOKENS), 0);
    rlb_result_free(res);
    assert_true(h_stat(t.c, "retried") == 1);
    kill(r.workers[0], SIGCONT); /* it finds its connection closed and exits */
    assert_int_equal(h_reap_worker(&r, 0, 10), 0);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    setenv("RLB_THREADS", "1", 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_load_bounded, h_teardown),
        cmocka_unit_test_teardown(test_drain_bounded, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
