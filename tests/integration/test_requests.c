/* test_requests: requests and control messages the bridge used to take silently now get a
 * clear answer, and the bridge keeps serving:
 *   - a stop id outside the vocabulary, or max_tokens past the model's length, is refused
 *     naming the field (it was accepted, or cut to the model length without a word);
 *   - workers put to sleep by a peer that then disconnects are woken (they slept forever);
 *   - a tool (an observer) may not shut the bridge down; a trainer rank may;
 *   - a trainer rank of another world size is refused with the bridge's code and reason
 *     (it was told "connection to the bridge lost");
 *   - a request before any weights exist is refused with RLB_ENOTREADY (it was answered
 *     from the zeros of workers started without a checkpoint).
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

static void test_refused_fields(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    int32_t prompt[3] = {1, 2, 3}, stop[2] = {7, 250};
    assert_int_equal(h_start_simple(&r, &t, RLB_SYNC_PAUSE, 1), 0);
    h_request q;
    h_request_greedy(&q, prompt, 3, MAX_TOKENS);
    q.sp.stop_token_ids = stop;
    q.sp.n_stop_token_ids = 2;
    rlb_result *res = NULL;
    assert_int_equal(rlb_generate(t.c, &q.req, 10000, &res), RLB_EINVAL);
    fprintf(stderr, "%s\n", rlb_last_error(t.c));
    assert_non_null(strstr(rlb_last_error(t.c), "stop id 1 is 250"));
    q.sp.n_stop_token_ids = 1;
    q.sp.max_tokens = 100000;
    assert_int_equal(rlb_generate(t.c, &q.req, 10000, &res), RLB_ETOOBIG);
    fprintf(stderr, "%s\n", rlb_last_error(t.c));
    assert_non_null(strstr(rlb_last_error(t.c), "max_tokens 100000"));
    q.sp.max_tokens = 509; /* 3 + 509 = 512, the tiny model's length: allowed */
    assert_int_equal(rlb_generate(t.c, &q.req, 20000, &res), 0);
    rlb_result_free(res);
    assert_int_equal(h_check_greedy(&r, t.c, 1, 1, prompt, 3, MAX_TOKENS), 0);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

static void test_sleeper_gone_wakes(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    rlb_client *tool;
    int32_t prompt[2] = {4, 2};
    assert_int_equal(h_start_simple(&r, &t, RLB_SYNC_PAUSE, 1), 0);
    assert_int_equal(h_connect(&r, 0, 0, &tool), 0);
    assert_int_equal(rlb_sleep(tool), 0);
    assert_int_equal(h_wait_stat(t.c, "asleep", 1, 10), 0);
    rlb_close(tool);
    assert_int_equal(h_wait_stat(t.c, "asleep", 0, 10), 0);
    assert_int_equal(h_check_greedy(&r, t.c, 1, 1, prompt, 2, MAX_TOKENS), 0);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

static void test_shutdown_by_tool_refused(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    int32_t prompt[2] = {5, 3};
    int code = 0;
    assert_int_equal(h_start_simple(&r, &t, RLB_SYNC_PAUSE, 1), 0);
    rlb_msg bye = {.type = RLB_MSG_SHUTDOWN};
    assert_int_equal(h_raw_tool(&r, &bye, &code), RLB_MSG_ERROR);
    assert_int_equal(code, RLB_EPROTO);
    assert_int_equal(h_check_greedy(&r, t.c, 1, 1, prompt, 2, MAX_TOKENS), 0);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

/* Before the first version, workers that started without a checkpoint hold zeros: a
 * request is refused with RLB_ENOTREADY (it was answered from the zeros), and one that asks
 * for version 1 is held until version 1 commits. */
static void test_no_weights_yet(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    int32_t prompt[3] = {3, 1, 4};
    assert_int_equal(h_start_unpublished(&r, &t, RLB_SYNC_PAUSE, 1, 1), 0);
    rlb_result *res = NULL;
    assert_int_equal(h_generate(t.c, prompt, 3, MAX_TOKENS, &res), RLB_ENOTREADY);
    fprintf(stderr, "refusal: %s\n", rlb_last_error(t.c));
    assert_non_null(strstr(rlb_last_error(t.c), "the workers hold no weights yet"));
    assert_null(res);
    h_request q;
    h_request_greedy(&q, prompt, 3, MAX_TOKENS);
    q.req.min_weight_version = 1;
    rlb_ticket tk;
    assert_int_equal(rlb_generate_submit(t.c, &q.req, &tk), 0);
    assert_int_equal(rlb_generate_wait(t.c, tk, 300, &res), RLB_ETIMEDOUT); /* held */
    assert_int_equal(rlb_publish(t.c, 1, NULL), 0);
    assert_int_equal(rlb_generate_wait(t.c, tk, 20000, &res), 0);
    assert_int_equal(h_check_result(&r, res, 1, 1, prompt, 3, MAX_TOKENS), 0);
    rlb_result_free(res);
    assert_int_equal(h_check_greedy(&r, t.c, 1, 1, prompt, 3, MAX_TOKENS), 0);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

/* A trainer rank of another world size than the bridge's trainers is refused with the
 * bridge's code and reason, not as a dead peer. */
static void test_other_world_refused(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    rlb_client *c = NULL;
    int32_t prompt[2] = {6, 4};
    assert_int_equal(h_start_simple(&r, &t, RLB_SYNC_PAUSE, 1), 0);
    int rc = h_connect(&r, 0, 2, &c);
    fprintf(stderr, "refusal: %s (%s)\n", rlb_last_error(NULL), rlb_strerror(rc));
    assert_int_equal(rc, RLB_EINVAL);
    assert_null(c);
    assert_non_null(strstr(rlb_last_error(NULL), "bridge refused hello"));
    assert_non_null(strstr(rlb_last_error(NULL), "trainer world 2, but this bridge's trainer "
                                                 "world is 1"));
    assert_int_equal(h_check_greedy(&r, t.c, 1, 1, prompt, 2, MAX_TOKENS), 0);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    setenv("RLB_THREADS", "1", 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_refused_fields, h_teardown),
        cmocka_unit_test_teardown(test_sleeper_gone_wakes, h_teardown),
        cmocka_unit_test_teardown(test_shutdown_by_tool_refused, h_teardown),
        cmocka_unit_test_teardown(test_other_world_refused, h_teardown),
        cmocka_unit_test_teardown(test_no_weights_yet, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
