/* test_abi: a librlb of another ABI is refused by the bridge's hello. This program links
 * librlb built with RLB_ABI_VERSION + 1 (RLB_ABI_OTHER, tests/integration/install.cmake) and
 * connects to an `rlb bridge --tiny` of RLB_ABI_VERSION that it starts (argv[1] is the rlb
 * program): rlb_connect must fail with RLB_EVERSION and an error that names both versions,
 * and the bridge must go on serving (it answers a second refused hello too, then exits
 * cleanly on SIGTERM).
 */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/clock.h"
#include "rlb/rlb.h"

static const char *rlb_bin;
static char dir[] = "/tmp/rlb-test-abi-XXXXXX"; /* private; holds the bridge's socket */
static char sock[64];                          /* dir/bridge */
static pid_t bridge;                           /* the bridge, 0 once stopped */

static int start_bridge(void **state)
{
    assert_non_null(mkdtemp(dir));
    snprintf(sock, sizeof(sock), "%s/bridge", dir);
    bridge = fork();
    if (bridge == 0) {
        execl(rlb_bin, rlb_bin, "bridge", "--socket", sock, "--tiny", "--threads", "1",
              (char *)NULL);
        _exit(127);
    }
    struct stat st;
    int64_t deadline = rlb__clock_ms() + 20000;
    while (stat(sock, &st) != 0 && rlb__clock_ms() < deadline)
        usleep(10000);
    if (stat(sock, &st) != 0) {
        kill(bridge, SIGKILL); /* cmocka skips the teardown of a failed setup */
        waitpid(bridge, NULL, 0);
        fail_msg("the bridge did not create %s", sock);
    }
    return 0;
}

/* Runs even when the test failed, so no bridge outlives it. */
static int stop_bridge(void **state)
{
    int status;
    kill(bridge, SIGTERM);
    assert_int_equal(waitpid(bridge, &status, 0), bridge);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_int_equal(rmdir(dir), 0); /* the bridge removed its socket */
    return 0;
}

static void test_bridge_refuses_other_abi(void **state)
{
    /* The library really is of another ABI than the bridge this test runs (this file's
     * rlb.h gives the bridge's). */
    assert_int_equal(rlb_abi_version(), RLB_ABI_OTHER);
    char bridge_says[64], we_say[64];
    snprintf(bridge_says, sizeof(bridge_says), "speaks ABI version %u ", RLB_ABI_VERSION);
    snprintf(we_say, sizeof(we_say), "this librlb ABI version %u", RLB_ABI_OTHER);
    rlb_client_options o;
    rlb_client_options_init(&o);
    o.socket = sock;
    o.observer = 1;
    o.connect_timeout_ms = 10000;
    for (int i = 0; i < 2; i++) {
        rlb_client *c = NULL;
        int rc;
        /* The socket file exists from bind(); connections are refused until listen(). */
        int64_t deadline = rlb__clock_ms() + 10000;
        while ((rc = rlb_connect(&o, &c)) == RLB_ENOTFOUND && rlb__clock_ms() < deadline)
            usleep(10000);
        const char *err = rlb_last_error(NULL);
        print_message("refused: %s\n", err);
        assert_int_equal(rc, RLB_EVERSION);
        assert_null(c);
        assert_non_null(strstr(err, "the bridge at"));
        assert_non_null(strstr(err, bridge_says));
        assert_non_null(strstr(err, we_say));
        assert_non_null(strstr(err, rlb_strerror(RLB_EVERSION)));
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: test_abi <rlb program>\n");
        return 2;
    }
    rlb_bin = argv[1];
    setenv("RLB_LOG", "warn", 1);
    const struct CMUnitTest tests[] = {cmocka_unit_test_setup_teardown(
        test_bridge_refuses_other_abi, start_bridge, stop_bridge)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
