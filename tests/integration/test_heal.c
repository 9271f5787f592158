/* test_heal: replicas heal. A worker restarted for a lost replica is accepted, gets the
 * committed version before it serves (copied from a live replica, or with the next sync
 * when none is live), and a replica can be added at run time. Each case ends with the
 * healed replica serving alone, checked against the reference for the committed version.
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

#define MAX_TOKENS 8

/* Publishes versions 1..n from the one trainer rank. */
static void publish_to(h_trainer *t, uint64_t n)
{
    for (uint64_t v = 1; v <= n; v++) {
        h_trainer_fill(t, v);
        assert_int_equal(rlb_publish(t->c, v, NULL), 0);
    }
}

/* Kills worker i, leaving the healed replica alone: it serves version 2, takes version 3
 * like any other replica, and the run stops cleanly. */
static void healed_serves_alone(h_run *r, h_trainer *t, int i, const int32_t *prompt)
{
    h_kill_worker(r, i);
    assert_int_equal(h_wait_stat(t->c, "replicas_up", 1, 20), 0);
    assert_int_equal(h_check_greedy(r, t->c, 2, 1, prompt, 3, MAX_TOKENS), 0);
    h_trainer_fill(t, 3);
    assert_int_equal(rlb_publish(t->c, 3, NULL), 0);
    assert_int_equal(h_check_greedy(r, t->c, 3, 1, prompt, 3, MAX_TOKENS), 0);
    h_trainer_close(t);
    assert_int_equal(h_stop(r, NULL), 0);
}

static void restart_heals(rlb_sync_mode mode)
{
    h_run r;
    h_trainer t;
    int32_t prompt[3] = {31, 41, 59};
    assert_int_equal(h_start_unpublished(&r, &t, mode, 2, 1), 0);
    publish_to(&t, 2);
    h_kill_worker(&r, 0);
    assert_int_equal(h_wait_stat(t.c, "workers", 1, 20), 0);
    assert_true(h_worker(&r, 0, 2, 0, 1) > 0);
    assert_int_equal(h_wait_stat(t.c, "replicas_up", 2, 20), 0);
    assert_true(h_stat(t.c, "heals") == 1);
    healed_serves_alone(&r, &t, 1, prompt); /* the restarted worker is the one left */
}

static void test_restart_heals_pause(void **state)
{
    (void)state;
    restart_heals(RLB_SYNC_PAUSE);
}

static void test_restart_heals_staged(void **state)
{
    (void)state;
    restart_heals(RLB_SYNC_STAGED);
}

/* The only replica (TP 2) dies: restarted, it has no live replica to copy from, so a
 * request waits until the next version lands in it. */
static void test_all_lost_next_sync(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    int32_t prompt[3] = {26, 53, 58};
    assert_int_equal(h_start_unpublished(&r, &t, RLB_SYNC_STAGED, 1, 2), 0);
    publish_to(&t, 1);
    h_kill_worker(&r, 1);
    assert_int_equal(h_wait_stat(t.c, "workers", 0, 20), 0);
    assert_true(h_worker(&r, 0, 1, 0, 2) > 0);
    assert_true(h_worker(&r, 0, 1, 1, 2) > 0);
    assert_int_equal(h_wait_stat(t.c, "replicas_joining", 1, 20), 0);
    h_request q;
    h_request_greedy(&q, prompt, 3, MAX_TOKENS);
    rlb_ticket tk;
    rlb_result *res = NULL;
    assert_int_equal(rlb_generate_submit(t.c, &q.req, &tk), 0);
    assert_int_equal(rlb_generate_wait(t.c, tk, 300, &res), RLB_ETIMEDOUT);
    h_trainer_fill(&t, 2);
    assert_int_equal(rlb_publish(t.c, 2, NULL), 0);
    assert_int_equal(rlb_generate_wait(t.c, tk, 20000, &res), 0);
    assert_int_equal(h_check_result(&r, res, 2, 2, prompt, 3, MAX_TOKENS), 0);
    rlb_result_free(res);
    assert_true(h_stat(t.c, "replicas_up") == 1);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

/* A replica added at run time joins with the committed version. */
static void test_new_replica(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    int32_t prompt[3] = {97, 93, 23};
    assert_int_equal(h_start_unpublished(&r, &t, RLB_SYNC_PAUSE, 1, 1), 0);
    publish_to(&t, 2);
    assert_true(h_worker(&r, 1, 2, 0, 1) > 0);
    assert_int_equal(h_wait_stat(t.c, "replicas_up", 2, 20), 0);
    healed_serves_alone(&r, &t, 0, prompt); /* the added replica is the one left */
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    setenv("RLB_THREADS", "1", 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_restart_heals_pause, h_teardown),
        cmocka_unit_test_teardown(test_restart_heals_staged, h_teardown),
        cmocka_unit_test_teardown(test_all_lost_next_sync, h_teardown),
        cmocka_unit_test_teardown(test_new_replica, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
