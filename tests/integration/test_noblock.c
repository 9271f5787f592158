/* test_noblock: the bridge's event loop never waits on one peer. While
 *   - connections that never say hello keep arriving,
 *   - a requester never reads results larger than one ring record, and
 *   - a trainer rank registers a tensor in a segment it never sends,
 * another client's publish and generate round trips stay fast (each under ROUND_MS); each
 * of those peers is timed out on its own after RLB_PEER_TIMEOUT_MS.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/clock.h"
#include "common/conn.h"
#include "tests/integration/bridge_harness.h"

#define MAX_TOKENS 8
#define TIMEOUT_MS 3000 /* RLB_PEER_TIMEOUT_MS: longer than every measured round */
#define ROUND_MS 200    /* bound on the median publish or generate round trip */
#define WORST_MS 1000   /* bound on each (a third of what one wait on a peer costs; the
                           margin is for a loaded machine's scheduling) */
#define ROUNDS 5

/* A connection that never says hello. */
static int silent_connect(const char *path)
{
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    assert_true(s >= 0 && strlen(path) < sizeof(sa.sun_path));
    memcpy(sa.sun_path, path, strlen(path) + 1);
    assert_int_equal(connect(s, (struct sockaddr *)&sa, sizeof(sa)), 0);
    return s;
}

static void raw_send(rlb_conn *c, const rlb_msg *m)
{
    static uint8_t buf[1 << 16];
    size_t len;
    assert_int_equal(rlb__msg_pack(m, buf, sizeof(buf), &len), 0);
    assert_int_equal(rlb__ring_send(rlb__conn_tx(c), m->type, buf, len, 2000), 0);
}

/* Reads one message from a raw connection: its type, and an ERROR's code and text. */
static int raw_recv(rlb_conn *c, rlb_ring_rx *rx, int timeout_ms, int *code, char *text)
{
    rlb_ring_msg rm;
    rlb_msg m;
    if (rlb__ring_recv(rlb__conn_rx(c), rx, timeout_ms, &rm) < 0)
        return -1;
    int type = -1;
    if (rlb__msg_decode(rm.data, rm.len, &m, NULL, 0) == 0) {
        type = (int)m.type;
        if (m.type == RLB_MSG_ERROR) {
            *code = m.error.code;
            snprintf(text, 256, "%s", m.error.text);
        }
        rlb__msg_free(&m);
    }
    rlb__ring_recv_done(rlb__conn_rx(c), rx);
    return type;
}

/* A raw peer that said hello (tool, or trainer rank/world) and got its welcome. */
static rlb_conn *raw_peer(h_run *r, rlb_ring_rx *rx, uint32_t role, uint32_t rank,
                          uint32_t world)
{
    rlb_conn *c;
    int code = 0;
    char text[256];
    assert_int_equal(rlb__conn_connect(r->sock, 5000, &c), 0);
    rlb_msg hello = {.type = RLB_MSG_HELLO,
                     .hello = {.abi_version = RLB_ABI_VERSION, .role = role, .rank = rank,
                               .world = world}};
    raw_send(c, &hello);
    assert_int_equal(raw_recv(c, rx, 5000, &code, text), RLB_MSG_WELCOME);
    return c;
}

/* Asks for results far larger than one record of the (small) rings, and never reads. */
static void flood(rlb_conn *c)
{
    int32_t prompt[2] = {3, 4};
    rlb_msg_prompt p = {.tokens = prompt, .n_tokens = 2};
    for (uint64_t id = 1; id <= 4; id++) {
        rlb_msg m = {.type = RLB_MSG_GENERATE,
                     .generate = {.request_id = id, .n_prompts = 1, .prompts = &p,
                                  .sampling = {.n = 16, .max_tokens = 64, .temperature = 1,
                                               .top_p = 1, .seed = id, .logprobs = 1}}};
        raw_send(c, &m);
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Checks n round-trip times against WORST_MS (each) and ROUND_MS (their median). */
static void check_times(double *ms, int n, const char *what)
{
    qsort(ms, (size_t)n, sizeof(*ms), cmp_double);
    fprintf(stderr, "%s: median %.1f ms, worst %.1f ms\n", what, ms[n / 2], ms[n - 1]);
    assert_true(ms[n - 1] < WORST_MS);
    assert_true(ms[n / 2] < ROUND_MS);
}

/* One publish and one generate round trip of t, timed into ms[0] and ms[1]. */
static void round_trips(h_trainer *t, uint64_t v, double *ms)
{
    int32_t prompt[3] = {2, 7, 18};
    double t0 = rlb__clock_ms_f();
    h_trainer_fill(t, v);
    assert_int_equal(rlb_publish(t->c, v, NULL), 0);
    double t1 = rlb__clock_ms_f();
    rlb_result *res;
    assert_int_equal(h_generate(t->c, prompt, 3, MAX_TOKENS, &res), 0);
    rlb_result_free(res);
    double t2 = rlb__clock_ms_f();
    fprintf(stderr, "version %llu: publish %.1f ms, generate %.1f ms\n", (unsigned long long)v,
            t1 - t0, t2 - t1);
    ms[0] = t1 - t0;
    ms[1] = t2 - t1;
}

static void start(h_run *r, h_trainer *t, uint32_t world)
{
    char ms[16];
    snprintf(ms, sizeof(ms), "%d", TIMEOUT_MS);
    setenv("RLB_PEER_TIMEOUT_MS", ms, 1);
    setenv("RLB_RING_BYTES", "8192", 1); /* results of a few KB span several records */
    assert_int_equal(h_start(r, RLB_SYNC_PAUSE), 0);
    assert_int_equal(h_workers_loaded(r, 1, 1, 0), 0); /* they serve before any sync */
    assert_int_equal(h_trainer_open(r, t, 0, world, H_FSDP2), 0);
    assert_int_equal(h_wait_workers(r, t->c, 1, 1), 0);
}

static void test_silent_and_slow_peers(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    start(&r, &t, 1);
    double peers = h_stat(t.c, "peers");
    rlb_ring_rx rx = {.max_msg = 1 << 20};
    rlb_conn *slow = raw_peer(&r, &rx, RLB_ROLE_TOOL, 0, 0);
    flood(slow);
    /* Its results are done and wait in the bridge for a reader that never comes. */
    assert_int_equal(h_wait_stat(t.c, "results", 4, 20), 0);
    int silent[3 * ROUNDS];
    double ms[2 * ROUNDS];
    for (int i = 0; i < ROUNDS; i++) {
        for (int k = 0; k < 3; k++)
            silent[3 * i + k] = silent_connect(r.sock);
        round_trips(&t, (uint64_t)i + 1, &ms[2 * i]);
    }
    check_times(ms, 2 * ROUNDS, "publish and generate beside silent and slow peers");
    /* The reader that never reads is dropped on its own after the timeout. */
    assert_int_equal(h_wait_stat(t.c, "peers", peers, 3.0 * TIMEOUT_MS / 1000), 0);
    for (int i = 0; i < 3 * ROUNDS; i++)
        close(silent[i]);
    rlb__ring_rx_free(&rx);
    rlb__conn_close(slow);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

static void test_register_without_segment(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    rlb_client *tool;
    int32_t prompt[3] = {28, 18, 28};
    start(&r, &t, 2);
    assert_int_equal(h_connect(&r, 0, 0, &tool), 0);
    rlb_ring_rx rx = {.max_msg = 1 << 20};
    rlb_conn *c = raw_peer(&r, &rx, RLB_ROLE_TRAINER, 1, 2);
    rlb_msg_tensor ten = {.name = "model.norm.weight", .dtype = RLB_DTYPE_F32, .ndim = 1,
                          .shape = {64},
                          .layout = {.kind = RLB_LAYOUT_FSDP2, .rank = 1, .world = 2},
                          .mem = {.kind = RLB_MEM_HOST_SHM, .fd_index = 77, .length = 128}};
    rlb_msg reg = {.type = RLB_MSG_REGISTER, .reg = {.n_tensors = 1, .tensors = &ten}};
    double t0 = rlb__clock_ms_f();
    raw_send(c, &reg);
    double ms[ROUNDS];
    for (int i = 0; i < ROUNDS; i++) {
        double a = rlb__clock_ms_f();
        rlb_result *res;
        assert_int_equal(h_generate(tool, prompt, 3, MAX_TOKENS, &res), 0);
        rlb_result_free(res);
        assert_true(h_stat(t.c, "trainers") == 2);
        ms[i] = rlb__clock_ms_f() - a;
    }
    check_times(ms, ROUNDS, "generate + stats while a register waits for its segment");
    /* The register is answered once its segment's time is up, naming it. */
    int code = 0;
    char text[256] = "";
    assert_int_equal(raw_recv(c, &rx, 3 * TIMEOUT_MS, &code, text), RLB_MSG_ERROR);
    fprintf(stderr, "after %.0f ms: %s\n", rlb__clock_ms_f() - t0, text);
    assert_int_equal(code, RLB_ENOTFOUND);
    assert_non_null(strstr(text, "segment 77 was never passed"));
    rlb__ring_rx_free(&rx);
    rlb__conn_close(c);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, tool), 0);
}

static int teardown(void **state)
{
    (void)state;
    h_cleanup();
    unsetenv("RLB_RING_BYTES");
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_silent_and_slow_peers, teardown),
        cmocka_unit_test_teardown(test_register_without_segment, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
