/* test_poison: poisoned weights (a diverged RL step) must not take serving down.
 *
 *   - By default a version holding NaN / Inf is aborted by the sync, which counts them
 *     while it copies; the abort names each tensor and its count, and generation goes on
 *     with the committed version (staged) until a clean version lands.
 *   - With RLB_NONFINITE=allow such a version commits. A NaN in the final norm makes every
 *     logit NaN: the request fails with RLB_ENONFINITE, named, and the workers keep
 *     serving: the next clean version generates on the same processes.
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

static void test_poisoned_version_aborted(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    int32_t prompt[3] = {4, 8, 15};
    assert_int_equal(h_start_simple(&r, &t, RLB_SYNC_STAGED, 1), 0);
    h_trainer_fill(&t, 2);
    assert_int_equal(h_trainer_poison3(&t), 0);
    assert_int_equal(rlb_publish(t.c, 2, NULL), RLB_EABORTED);
    assert_int_equal(h_poison3_named(rlb_last_error(t.c)), 0);
    /* Serving goes on with version 1, then a clean version 3 lands. */
    assert_int_equal(h_check_greedy(&r, t.c, 1, 1, prompt, 3, MAX_TOKENS), 0);
    h_trainer_fill(&t, 3);
    assert_int_equal(rlb_publish(t.c, 3, NULL), 0);
    assert_int_equal(h_check_greedy(&r, t.c, 3, 1, prompt, 3, MAX_TOKENS), 0);
    assert_true(h_stat(t.c, "aborts") == 1);
    assert_true(h_stat(t.c, "replicas_up") == 1);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

static void test_poisoned_version_allowed(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    int32_t prompt[3] = {16, 23, 42};
    setenv("RLB_NONFINITE", "allow", 1); /* the forked bridge inherits it */
    assert_int_equal(h_start_simple(&r, &t, RLB_SYNC_PAUSE, 2), 0);
    unsetenv("RLB_NONFINITE");
    h_trainer_fill(&t, 2);
    assert_int_equal(h_trainer_poison(&t, "model.norm.weight", 0, __builtin_nanf("")), 0);
    assert_int_equal(rlb_publish(t.c, 2, NULL), 0);
    /* Every logit is NaN: each request fails with a named error, on either replica. */
    for (int i = 0; i < 4; i++) {
        rlb_result *res = NULL;
        assert_int_equal(h_generate(t.c, prompt, 3, MAX_TOKENS, &res), RLB_ENONFINITE);
        assert_non_null(strstr(rlb_last_error(t.c), "NaN"));
    }
    fprintf(stderr, "refusal: %s\n", rlb_last_error(t.c));
    /* The same worker processes serve the next clean version. */
    for (int i = 0; i < r.n_workers; i++)
        assert_int_equal(kill(r.workers[i], 0), 0);
    assert_true(h_stat(t.c, "replicas_up") == 2);
    h_trainer_fill(&t, 3);
    assert_int_equal(rlb_publish(t.c, 3, NULL), 0);
    for (int i = 0; i < 4; i++)
        assert_int_equal(h_check_greedy(&r, t.c, 3, 1, prompt, 3, MAX_TOKENS), 0);
    assert_true(h_stat(t.c, "retried") == 0);
    assert_true(h_stat(t.c, "replicas_up") == 2);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    setenv("RLB_THREADS", "1", 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_poisoned_version_aborted, h_teardown),
        cmocka_unit_test_teardown(test_poisoned_version_allowed, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
