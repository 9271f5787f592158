/* test_gpu_bridge: the bridge writing a GPU worker's weights. A bridge, one rlb-worker on
 * the CUDA backend (float32 weights, so the CPU engine is its reference) and trainer ranks
 * on host memory, as processes: each version is published by two FSDP2 ranks (or two
 * FSDP1 ranks), the CUDA executor copies their shards into the worker's VMM weights (which
 * the worker exported as an fd), the worker runs post-load processing and the version
 * commits; the greedy tokens it then generates must equal `rlb generate --device cpu` on a
 * checkpoint of the same weights, stamped with the version. Also: a GPU worker in a staged
 * bridge is refused with a sentence, not a crash. Exits 77 where no GPU is visible.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/integration/bridge_harness.h"
#include "worker/backends.h"

#define VERSIONS 6
#define MAX_TOKENS 8

static void sync_on_gpu(h_layout layout)
{
    static const int32_t prompt[3] = {5, 17, 42};
    h_run r;
    h_child ch;
    h_trainer t0;
    h_worker_device = RLB_DEVICE_CUDA;
    assert_int_equal(h_start(&r, RLB_SYNC_PAUSE), 0);
    assert_int_equal(h_workers(&r, 1, 1), 0);
    assert_int_equal(h_child_start(&r, &ch, 1, 2, layout), 0);
    assert_int_equal(h_trainer_open(&r, &t0, 0, 2, layout), 0);
    assert_int_equal(h_wait_workers(&r, t0.c, 1, 1), 0);
    for (uint64_t v = 1; v <= VERSIONS; v++) {
        h_trainer_fill(&t0, v);
        assert_int_equal(h_child_publish(&ch, v), 0);
        rlb_sync_stats st = {.struct_size = sizeof(st)};
        int rc = rlb_publish(t0.c, v, &st), crc = -1;
        if (rc)
            fprintf(stderr, "publish %llu: %s\n", (unsigned long long)v, rlb_last_error(t0.c));
        assert_int_equal(rc, 0);
        assert_int_equal(h_child_result(&ch, &crc), 0);
        assert_int_equal(crc, 0);
        assert_int_equal(h_check_greedy(&r, t0.c, v, 1, prompt, 3, MAX_TOKENS), 0);
    }
    h_child_stop(&ch);
    h_trainer_close(&t0);
    assert_int_equal(h_stop(&r, NULL), 0);
}

static void test_fsdp2(void **state)
{
    sync_on_gpu(H_FSDP2);
}

static void test_fsdp1(void **state)
{
    sync_on_gpu(H_FSDP1);
}

/* A staged bridge refuses a GPU worker (it would need a second device buffer), and the
 * worker exits with an error instead of hanging. */
static void test_staged_refused(void **state)
{
    h_run r;
    h_worker_device = RLB_DEVICE_CUDA;
    assert_int_equal(h_start(&r, RLB_SYNC_STAGED), 0);
    pid_t pid = h_worker(&r, 0, 1, 0, 1);
    assert_true(pid > 0);
    assert_int_equal(h_reap_worker(&r, r.n_workers - 1, 20), 0);
    rlb_client *tool = NULL;
    assert_int_equal(h_connect(&r, 0, 1, &tool), 0); /* a trainer rank may shut it down */
    assert_int_equal(h_stop(&r, tool), 0);
}

/* 1 when a GPU is visible, asked in a child: CUDA must not be initialized in this process,
 * whose children (the bridge and the worker) use it. */
static int gpu_visible(void)
{
    pid_t pid = fork();
    if (pid == 0)
        _exit(rlb__backend_resolve(RLB_DEVICE_AUTO) == RLB_DEVICE_CUDA ? 0 : 1);
    int st = 0;
    return pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

int main(void)
{
    if (!gpu_visible())
        return 77;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_fsdp2, h_teardown),
        cmocka_unit_test_teardown(test_fsdp1, h_teardown),
        cmocka_unit_test_teardown(test_staged_refused, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
