/* test_xnode_delta.c: the records a sender keeps of what a peer's whole staging holds
 * (bridge/xnode_delta.h): a chunk is skipped only when the peer holds the attempt the
 * records describe and its bytes did not change; a decision cut short, or a reset (a new
 * plan), leaves no records to skip by; each peer's records are its own.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "bridge/xnode_delta.h"

static const xn_attempt none = {0}, a1 = {.v = 1, .k = 0}, a2 = {.v = 2, .k = 0},
                        a2b = {.v = 2, .k = 1};

static void test_attempt_text(void **state)
{
    (void)state;
    char buf[32];
    assert_int_equal(xn_attempt_format(a2b, buf, sizeof(buf)), 3);
    assert_string_equal(buf, "2.1");
    assert_true(xn_attempt_same(xn_attempt_parse(buf), a2b));
    assert_int_equal(xn_attempt_format(none, buf, sizeof(buf)), 1);
    assert_string_equal(buf, "0");
    assert_true(xn_attempt_same(xn_attempt_parse(buf), none));
    assert_false(xn_attempt_same(a2, a2b));
    assert_true(xn_attempt_same((xn_attempt){.v = 0, .k = 7}, none));
    const char *bad[] = {"", "2", "2.", ".1", "2.1x", "x", "0.3", "2.99999999999"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(xn_attempt_parse(bad[i]).v, 0);
}

/* Decides chunks 0 and 1 (to peer 1) of attempt now, the peer holding `have`, with the
 * bytes base[] and factor[]; returns which must go (bit 0: chunk 0, bit 1: chunk 1). */
static int decide(xn_delta *d, xn_attempt have, xn_attempt now, const uint8_t *base,
                  const uint8_t *factor)
{
    int held = xn_delta_open(d, 1, have);
    int go = xn_delta_changed(d, 0, held, base, 64);
    go |= xn_delta_changed(d, 1, held, factor, 64) << 1;
    xn_delta_close(d, 1, now);
    return go;
}

static void test_skip_rules(void **state)
{
    (void)state;
    uint8_t base[64], factor[64];
    memset(base, 1, sizeof(base));
    memset(factor, 2, sizeof(factor));
    xn_delta d = {0};
    assert_int_equal(xn_delta_reset(&d, 3, 3), 0);
    assert_int_equal(decide(&d, none, a1, base, factor), 3); /* nothing held yet */
    factor[5] = 9;
    assert_int_equal(decide(&d, a1, a2, base, factor), 2);   /* only the factor changed */
    assert_int_equal(decide(&d, a1, a2b, base, factor), 3);  /* the peer missed attempt a2 */
    assert_int_equal(decide(&d, a2b, (xn_attempt){.v = 3}, base, factor), 0);

    /* A decision cut short (no close) leaves no records: everything goes next time. */
    xn_attempt a3 = {.v = 3};
    int held = xn_delta_open(&d, 1, a3);
    assert_true(held);
    assert_int_equal(xn_delta_changed(&d, 0, held, base, 64), 0);
    assert_int_equal(decide(&d, a3, (xn_attempt){.v = 4}, base, factor), 3);

    /* Another peer's records are its own: chunk 2 to peer 2. */
    assert_int_equal(xn_delta_open(&d, 2, none), 0);
    assert_int_equal(xn_delta_changed(&d, 2, 0, base, 64), 1);
    xn_delta_close(&d, 2, (xn_attempt){.v = 4});
    assert_int_equal(xn_delta_open(&d, 2, (xn_attempt){.v = 4}), 1);
    assert_int_equal(xn_delta_changed(&d, 2, 1, base, 64), 0);
    xn_delta_close(&d, 2, (xn_attempt){.v = 5});

    /* A new plan forgets every record; the receiver's staging holds nothing either. */
    d.have = a3;
    assert_int_equal(xn_delta_reset(&d, 3, 3), 0);
    assert_int_equal(d.have.v, 0);
    assert_int_equal(xn_delta_open(&d, 2, (xn_attempt){.v = 5}), 0);
    assert_int_equal(xn_delta_open(&d, 9, none), 0); /* no such peer */
    assert_int_equal(xn_delta_changed(&d, 7, 1, base, 64), 1); /* no such chunk */
    xn_delta_free(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attempt_text),
        cmocka_unit_test(test_skip_rules),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
