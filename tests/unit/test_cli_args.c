/* test_cli_args.c: option values of the rlb subcommands (common/cli_args.h) are taken only
 * whole and in range:
 *   - integers, unsigned 64-bit seeds and finite numbers: what is accepted, and that
 *     trailing text, a sign where none may be, leading space, overflow and values out of
 *     range are refused with exit status 2 and *out left as it was;
 *   - `rlb stress` with each bad value: exit 2 and one line naming the option and the
 *     value (before this, --trainers -1 became 4294967295 trainers and --replicas 65536
 *     --tp 65536 overflowed past the worker limit); `rlb bridge`, `rlb worker`, `rlb
 *     demo` and the example trainer the demo runs (rlb-toy-trainer) likewise.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <cmocka.h>

#include "common/cli_args.h"

static void test_long(void **state)
{
    (void)state;
    long v = 7;
    assert_int_equal(rlb__cli_long("t", "n", "42", 0, 100, &v), 0);
    assert_int_equal(v, 42);
    assert_int_equal(rlb__cli_long("t", "n", "-5", -10, 10, &v), 0);
    assert_int_equal(v, -5);
    const char *bad[] = {"", "4x", "x4", " 4", "4 ", "101", "-1", "1e2", "99999999999999999999",
                         "0x10"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        v = 7;
        assert_int_equal(rlb__cli_long("t", "n", bad[i], 0, 100, &v), 2);
        assert_int_equal(v, 7);
    }
}

static void test_u64(void **state)
{
    (void)state;
    uint64_t v = 7;
    assert_int_equal(rlb__cli_u64("t", "seed", "18446744073709551615", 0, UINT64_MAX, &v), 0);
    assert_true(v == UINT64_MAX);
    assert_int_equal(rlb__cli_u64("t", "seed", "0x10", 0, UINT64_MAX, &v), 0);
    assert_true(v == 16);
    assert_int_equal(rlb__cli_u64("t", "n", "4096", 4096, 4096, &v), 0);
    assert_true(v == 4096);
    const char *bad[] = {"", "-1", "+1", " 1", "1x", "18446744073709551616", "0xg", "4095",
                         "4097"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        v = 7;
        assert_int_equal(rlb__cli_u64("t", "n", bad[i], i < 7 ? 0 : 4096,
                                      i < 7 ? UINT64_MAX : 4096, &v), 2);
        assert_true(v == 7);
    }
}

static void test_float(void **state)
{
    (void)state;
    float v = 7;
    assert_int_equal(rlb__cli_float("t", "p", "0.25", 0, 1, &v), 0);
    assert_true(v == 0.25f);
    const char *bad[] = {"", "nan", "inf", "1.5", "-0.1", "0.5x", " 0.5", "1e999"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        v = 7;
        assert_int_equal(rlb__cli_float("t", "p", bad[i], 0, 1, &v), 2);
        assert_true(v == 7);
    }
}

/* Runs `BIN ARGS`; expects exit 2 and `want` in what it printed. */
static void refuses(const char *bin, const char *args, const char *want)
{
    char cmd[512], out[1024] = "";
    snprintf(cmd, sizeof cmd, "%s %s 2>&1", bin, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    int st = pclose(p);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 2 || !strstr(out, want))
        fail_msg("%s %s: status %d, output '%s' (wanted exit 2 and '%s')", bin, args, st,
                 out, want);
}

static void rlb_refuses(const char *args, const char *want)
{
    refuses(RLB_BIN, args, want);
}

static void test_commands(void **state)
{
    (void)state;
    rlb_refuses("stress --trainers -1", "bad value '-1' for --trainers: must be in [1, 8]");
    rlb_refuses("stress --duration 10abc", "bad value '10abc' for --duration: not an integer");
    rlb_refuses("stress --seed -3", "bad value '-3' for --seed");
    rlb_refuses("stress --replicas 65536 --tp 65536", "bad value '65536' for --replicas");
    rlb_refuses("stress --replicas 8 --tp 4", "--replicas 8 x --tp 4 is 32 workers; at most 16");
    rlb_refuses("stress --mode fast", "bad value 'fast' for --mode: pause or staged");
    rlb_refuses("stress --clients 0", "bad value '0' for --clients");
    rlb_refuses("stress --duration 5 extra", "unexpected argument 'extra'");
    rlb_refuses("bridge --threads 300", "bad value '300' for --threads: must be in [0, 256]");
    rlb_refuses("bridge --nnodes 2x", "bad value '2x' for --nnodes: not an unsigned integer");
    rlb_refuses("worker --gpu -1", "bad value '-1' for --gpu");
    /* before: the demo started its daemons and the trainer read seed 0 */
    rlb_refuses("demo --seed abc", "bad value 'abc' for --seed: not an unsigned integer");
    rlb_refuses("demo --steps 0", "bad value '0' for --steps: must be in [1, 100000]");
    /* the example trainer the demo runs: before, atoi and atof took "3x" as 3 and "abc"
     * as 0 */
    refuses(TOY_BIN, "--steps 3x", "bad value '3x' for --steps: an integer");
    refuses(TOY_BIN, "--lr abc", "bad value 'abc' for --lr: a number");
    refuses(TOY_BIN, "--target 250", "bad value '250' for --target");
    refuses(TOY_BIN, "--seed -1", "bad value '-1' for --seed");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_long),
        cmocka_unit_test(test_u64),
        cmocka_unit_test(test_float),
        cmocka_unit_test(test_commands),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
