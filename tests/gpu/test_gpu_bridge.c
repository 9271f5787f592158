/* test_gpu_bridge: the bridge writing a GPU worker's weights. A bridge, one rlb-worker on
 * the CUDA backend (float32 weights, so the CPU engine is its reference) and trainer ranks
 * on host memory, as processes: each version is published by two FSDP2 ranks (or two
 * FSDP1 ranks), the CUDA executor copies their shards into the worker's VMM weights (which
 * the worker exported as an fd), the worker runs post-load processing and the version
 * commits; the greedy tokens it then generates must equal `rlb generate --device cpu` on a
 * checkpoint of the same weights, stamped with the version. Staged: the bridge writes the
 * worker's second device buffer while the first serves; a long request running across the
 * sync is served whole by the old version, what follows the commit by the new one, both
 * against the CPU reference. Poisoned: a version holding NaN / Inf values is aborted by
 * the copy's own count on the GPU (no extra pass), naming each tensor and its count, and
 * the worker keeps serving the version before; allowed (RLB_NONFINITE=allow), its requests
 * fail with a named error and the worker lives on to serve the next version. Exits 77
 * where no GPU is visible.
 */
#include <setjmp.h>
#include <signal.h>
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
#define LONG_TOKENS 256 /* a request that outlasts a sync */

static const int32_t prompt[3] = {5, 17, 42};

/* A bridge in `mode`, one GPU worker, trainer rank 1 in a child and rank 0 here. */
static void start_gpu(h_run *r, rlb_sync_mode mode, h_layout layout, h_child *ch, h_trainer *t0)
{
    h_worker_device = RLB_DEVICE_CUDA;
    assert_int_equal(h_start(r, mode), 0);
    assert_int_equal(h_workers(r, 1, 1), 0);
    assert_int_equal(h_child_start(r, ch, 1, 2, layout), 0);
    assert_int_equal(h_trainer_open(r, t0, 0, 2, layout), 0);
    assert_int_equal(h_wait_workers(r, t0->c, 1, 1), 0);
}

/* Both ranks publish version v; it must commit. */
static void publish_version(h_child *ch, h_trainer *t0, uint64_t v)
{
    h_trainer_fill(t0, v);
    assert_int_equal(h_child_publish(ch, v), 0);
    rlb_sync_stats st = {.struct_size = sizeof(st)};
    int rc = rlb_publish(t0->c, v, &st), crc = -1;
    if (rc)
        fprintf(stderr, "publish %llu: %s\n", (unsigned long long)v, rlb_last_error(t0->c));
    assert_int_equal(rc, 0);
    assert_int_equal(h_child_result(ch, &crc), 0);
    assert_int_equal(crc, 0);
}

static void stop_gpu(h_run *r, h_child *ch, h_trainer *t0)
{
    h_child_stop(ch);
    h_trainer_close(t0);
    assert_int_equal(h_stop(r, NULL), 0);
}

static void sync_on_gpu(h_layout layout)
{
    h_run r;
    h_child ch;
    h_trainer t0;
    start_gpu(&r, RLB_SYNC_PAUSE, layout, &ch, &t0);
    for (uint64_t v = 1; v <= VERSIONS; v++) {
        publish_version(&ch, &t0, v);
        assert_int_equal(h_check_greedy(&r, t0.c, v, 1, prompt, 3, MAX_TOKENS), 0);
    }
    stop_gpu(&r, &ch, &t0);
}

static void test_fsdp2(void **state)
{
    sync_on_gpu(H_FSDP2);
}

static void test_fsdp1(void **state)
{
    sync_on_gpu(H_FSDP1);
}

/* Staged syncs into a GPU worker: for each version v after the first, a long greedy
 * request is submitted on v - 1, then v is published. The worker's load waits for the
 * request, so the request is done by the time v commits: its result is already there when
 * the publish returns, stamped v - 1, with v - 1's reference tokens (the bridge wrote the
 * other device buffer meanwhile, and the switch came after). What follows the commit is
 * served by v, against v's reference. */
static void test_staged(void **state)
{
    h_run r;
    h_child ch;
    h_trainer t0;
    start_gpu(&r, RLB_SYNC_STAGED, H_FSDP2, &ch, &t0);
    publish_version(&ch, &t0, 1);
    assert_int_equal(h_check_greedy(&r, t0.c, 1, 1, prompt, 3, MAX_TOKENS), 0);
    int32_t want[LONG_TOKENS];
    for (uint64_t v = 2; v <= VERSIONS; v++) {
        rlb_ticket tk;
        rlb_result *res = NULL;
        assert_int_equal(h_submit(t0.c, prompt, 3, LONG_TOKENS, v - 1, &tk), 0);
        publish_version(&ch, &t0, v);
        assert_int_equal(rlb_generate_poll(t0.c, tk, &res), 0);
        const rlb_sample *s = rlb_result_sample(res, 0);
        assert_int_equal(s->weight_version, v - 1);
        int n = h_reference(&r, v - 1, 1, prompt, 3, LONG_TOKENS, want, LONG_TOKENS);
        assert_int_equal(n, (int)s->n_tokens);
        assert_memory_equal(want, s->tokens, sizeof(int32_t) * (size_t)n);
        rlb_result_free(res);
        assert_int_equal(h_check_greedy(&r, t0.c, v, 1, prompt, 3, MAX_TOKENS), 0);
    }
    assert_true(h_stat(t0.c, "aborts") == 0);
    stop_gpu(&r, &ch, &t0);
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

/* Version 2 carries two non-finite values in lm_head.weight and one in model.norm.weight
 * (rank 0's rows): the bridge aborts it with the tensors and counts named, for both ranks;
 * the GPU worker serves version 1 on, and a clean version 3 commits. */
static void test_poisoned(void **state)
{
    h_run r;
    h_child ch;
    h_trainer t0;
    int crc = 0;
    start_gpu(&r, RLB_SYNC_STAGED, H_FSDP2, &ch, &t0);
    publish_version(&ch, &t0, 1);
    h_trainer_fill(&t0, 2);
    assert_int_equal(h_trainer_poison3(&t0), 0);
    assert_int_equal(h_child_publish(&ch, 2), 0);
    assert_int_equal(rlb_publish(t0.c, 2, NULL), RLB_EABORTED);
    assert_int_equal(h_poison3_named(rlb_last_error(t0.c)), 0);
    assert_int_equal(h_child_result(&ch, &crc), 0);
    assert_int_equal(crc, RLB_EABORTED);
    assert_int_equal(h_check_greedy(&r, t0.c, 1, 1, prompt, 3, MAX_TOKENS), 0);
    publish_version(&ch, &t0, 3);
    assert_int_equal(h_check_greedy(&r, t0.c, 3, 1, prompt, 3, MAX_TOKENS), 0);
    stop_gpu(&r, &ch, &t0);
}

/* RLB_NONFINITE=allow: a version whose final norm holds a NaN commits, every logit is
 * NaN, and each request fails with RLB_ENONFINITE, named; the GPU worker process lives on
 * (its engine is reset over the same device weights, never recreated) and serves the next
 * clean version against the CPU reference. */
static void test_poisoned_allowed(void **state)
{
    h_run r;
    h_child ch;
    h_trainer t0;
    setenv("RLB_NONFINITE", "allow", 1); /* the forked bridge inherits it */
    start_gpu(&r, RLB_SYNC_PAUSE, H_FSDP2, &ch, &t0);
    unsetenv("RLB_NONFINITE");
    h_trainer_fill(&t0, 2);
    assert_int_equal(h_trainer_poison(&t0, "model.norm.weight", 0, __builtin_nanf("")), 0);
    assert_int_equal(h_child_publish(&ch, 2), 0);
    assert_int_equal(rlb_publish(t0.c, 2, NULL), 0);
    int crc = -1;
    assert_int_equal(h_child_result(&ch, &crc), 0);
    assert_int_equal(crc, 0);
    for (int i = 0; i < 3; i++) {
        rlb_result *res = NULL;
        assert_int_equal(h_generate(t0.c, prompt, 3, MAX_TOKENS, &res), RLB_ENONFINITE);
        assert_non_null(strstr(rlb_last_error(t0.c), "NaN"));
    }
    fprintf(stderr, "refusal: %s\n", rlb_last_error(t0.c));
    assert_int_equal(kill(r.workers[0], 0), 0);
    publish_version(&ch, &t0, 3);
    assert_int_equal(h_check_greedy(&r, t0.c, 3, 1, prompt, 3, MAX_TOKENS), 0);
    assert_true(h_stat(t0.c, "replicas_up") == 1);
    stop_gpu(&r, &ch, &t0);
}

int main(void)
{
    if (!gpu_visible())
        return 77;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_fsdp2, h_teardown),
        cmocka_unit_test_teardown(test_fsdp1, h_teardown),
        cmocka_unit_test_teardown(test_staged, h_teardown),
        cmocka_unit_test_teardown(test_poisoned, h_teardown),
        cmocka_unit_test_teardown(test_poisoned_allowed, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
