/* test_retry: a request whose worker dies is retried once on another replica; when that
 * worker dies too, the request fails with RLB_EABORTED instead of moving on until every
 * replica is gone.
 *
 * The workers are stopped (SIGSTOP) before the request goes out, so it sits in the ring of
 * the replica the bridge picked (the least loaded, the first on a tie: replica 0, then 1
 * after a death) and the kills land while it is in flight, whatever the machine's speed.
 * The peer timeout is raised so that the stopped workers are not declared hung meanwhile.
 *
 * When no replica is left the request fails with RLB_ENOREPLICA, which is not the
 * RLB_EPEERDEAD of a bridge that died.
 */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/integration/bridge_harness.h"

static const int32_t prompt[3] = {9, 8, 7};

/* `replicas` TP-1 replicas with version 1 committed and the peer timeout raised; every
 * worker stopped, and a greedy request of `prompt` in flight on replica 0 (ticket *tk). */
static void start_stopped(h_run *r, h_trainer *t, uint32_t replicas, rlb_ticket *tk)
{
    setenv("RLB_PEER_TIMEOUT_MS", "60000", 1);
    assert_int_equal(h_start_simple(r, t, RLB_SYNC_PAUSE, replicas), 0);
    for (uint32_t i = 0; i < replicas; i++)
        kill(r->workers[i], SIGSTOP);
    h_request q;
    h_request_greedy(&q, prompt, 3, 8);
    assert_int_equal(rlb_generate_submit(t->c, &q.req, tk), 0);
    assert_int_equal(h_wait_stat(t->c, "inflight", 1, 10), 0);
}

static void test_retried_once(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    rlb_ticket tk;
    start_stopped(&r, &t, 3, &tk);
    kill(r.workers[0], SIGKILL);
    assert_int_equal(h_wait_stat(t.c, "retried", 1, 10), 0);
    kill(r.workers[1], SIGKILL);
    rlb_result *res = NULL;
    assert_int_equal(rlb_generate_wait(t.c, tk, 10000, &res), RLB_EABORTED);
    fprintf(stderr, "refusal: %s\n", rlb_last_error(t.c));
    assert_non_null(strstr(rlb_last_error(t.c), "not retried twice"));
    assert_true(h_stat(t.c, "failed") == 1);
    /* The last replica serves the next request. */
    kill(r.workers[2], SIGCONT);
    assert_true(h_stat(t.c, "replicas_up") == 1);
    assert_int_equal(h_check_greedy(&r, t.c, 1, 1, prompt, 3, 8), 0);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
    unsetenv("RLB_PEER_TIMEOUT_MS");
}

/* The last replica dies under a request: it fails with RLB_ENOREPLICA, and so does the
 * next request, at once; the bridge dying is told apart from that, as RLB_EPEERDEAD. */
static void test_no_replica_then_no_bridge(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    rlb_ticket tk;
    start_stopped(&r, &t, 1, &tk);
    h_kill_worker(&r, 0);
    rlb_result *res = NULL;
    assert_int_equal(rlb_generate_wait(t.c, tk, 10000, &res), RLB_ENOREPLICA);
    fprintf(stderr, "in flight: %s\n", rlb_last_error(t.c));
    assert_non_null(strstr(rlb_last_error(t.c), "its worker died and no other replica is live"));
    assert_int_equal(h_generate(t.c, prompt, 3, 8, &res), RLB_ENOREPLICA);
    fprintf(stderr, "next: %s\n", rlb_last_error(t.c));
    assert_non_null(strstr(rlb_last_error(t.c), "no live worker replica"));
    kill(r.bridge, SIGKILL);
    assert_int_equal(h_generate(t.c, prompt, 3, 8, &res), RLB_EPEERDEAD);
    fprintf(stderr, "bridge gone: %s\n", rlb_last_error(t.c));
    assert_non_null(strstr(rlb_last_error(t.c), "connection to the bridge lost"));
    assert_null(res);
    h_trainer_close(&t);
    unsetenv("RLB_PEER_TIMEOUT_MS");
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    setenv("RLB_THREADS", "1", 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_retried_once, h_teardown),
        cmocka_unit_test_teardown(test_no_replica_then_no_bridge, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
