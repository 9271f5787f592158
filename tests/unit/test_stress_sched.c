/* test_stress_sched: the fault schedule of `rlb stress` is a function of its seed alone, so
 * `--seed N` replays a failing run's faults: the same seed gives the same events, another
 * seed other ones, the events are in time order within the duration, each kind arrives at
 * about its rate, and leaving kinds out does not move the others.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "launch/stress.h"

#define DURATION_MS (30 * 60 * 1000)

/* Field by field: the struct's tail padding holds nothing. */
static int same_event(const rlb_stress_event *a, const rlb_stress_event *b)
{
    return a->at_ms == b->at_ms && a->kind == b->kind && a->target == b->target &&
           a->arg == b->arg;
}

static int same_schedule(const rlb_stress_event *a, int na, const rlb_stress_event *b, int nb)
{
    for (int i = 0; na == nb && i < na; i++)
        if (!same_event(&a[i], &b[i]))
            return 0;
    return na == nb;
}

static void test_same_seed_same_schedule(void **state)
{
    (void)state;
    rlb_stress_event *a, *b, *c;
    int na = rlb__stress_schedule(12345, DURATION_MS, RLB_FAULTS_ALL, &a);
    int nb = rlb__stress_schedule(12345, DURATION_MS, RLB_FAULTS_ALL, &b);
    int nc = rlb__stress_schedule(12346, DURATION_MS, RLB_FAULTS_ALL, &c);
    assert_true(na > 1000);
    assert_true(same_schedule(a, na, b, nb));
    assert_false(same_schedule(a, na, c, nc));
    for (int i = 0; i < na; i++) {
        assert_true(a[i].at_ms >= 0 && a[i].at_ms < DURATION_MS);
        assert_true(a[i].kind < RLB_FAULT_COUNT_);
        if (i)
            assert_true(a[i - 1].at_ms <= a[i].at_ms);
    }
    free(a);
    free(b);
    free(c);
}

static void test_rates_and_kinds(void **state)
{
    (void)state;
    rlb_stress_event *all, *some;
    int n = rlb__stress_schedule(7, DURATION_MS, RLB_FAULTS_ALL, &all);
    int count[RLB_FAULT_COUNT_] = {0};
    for (int i = 0; i < n; i++)
        count[all[i].kind]++;
    for (uint32_t k = 0; k < RLB_FAULT_COUNT_; k++) {
        double want = rlb__stress_fault_rate(k) * 30;
        assert_true(count[k] > want * 0.7 && count[k] < want * 1.3);
    }
    /* Without the kills, the other kinds keep their moments. */
    uint32_t mask;
    assert_int_equal(rlb__stress_parse_faults("poison,garbage", &mask, NULL, 0), 0);
    assert_int_equal(mask, 1u << RLB_FAULT_POISON | 1u << RLB_FAULT_GARBAGE);
    int m = rlb__stress_schedule(7, DURATION_MS, mask, &some);
    assert_int_equal(m, count[RLB_FAULT_POISON] + count[RLB_FAULT_GARBAGE]);
    for (int i = 0, j = 0; i < n; i++)
        if (mask >> all[i].kind & 1)
            assert_true(same_event(&all[i], &some[j++]));
    free(all);
    free(some);
    char err[64];
    assert_int_equal(rlb__stress_parse_faults("poison,nope", &mask, err, sizeof(err)), RLB_EINVAL);
    assert_non_null(strstr(err, "nope"));
    assert_int_equal(rlb__stress_parse_faults("none", &mask, NULL, 0), 0);
    assert_int_equal(mask, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_seed_same_schedule),
        cmocka_unit_test(test_rates_and_kinds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
