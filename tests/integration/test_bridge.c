/* test_bridge.c: rlb-bridge + rlb-workers + trainer ranks as processes, on the tiny model
 * (issue 5's integration tests). Trainer ranks use the public client API; the reference
 * for every generation is `rlb generate` on a checkpoint of the same weights that the test
 * writes itself (bridge_harness.c), so the bridge's registry, plan, copy and load path is
 * checked end to end against an independent path. Each test also checks that nothing is
 * left in /dev/shm and that the socket file is gone.
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/clock.h"
#include "common/conn.h"
#include "common/proto.h"
#include "tests/integration/bridge_harness.h"

#define MAX_TOKENS 8

/* Generates greedily from `prompt` through client c and checks the tokens against the
 * reference for version v (TP size tp) and the version stamp. */
static void check_generate(h_run *r, rlb_client *c, uint64_t v, uint32_t tp,
                           const int32_t *prompt, uint32_t n, uint32_t max_tokens)
{
    assert_int_equal(h_check_greedy(r, c, v, tp, prompt, n, max_tokens), 0);
}

/* Staged mode, after version v committed with no abort before it: every worker serves v
 * from buffer v % 2 and keeps v - 1 in the other (the sync wrote only the buffer it did
 * not serve), both checked element by element against the naive reference. Workers are
 * r->workers[d * tp + t]. */
static void check_staged_buffers(h_run *r, uint32_t replicas, uint32_t tp, uint64_t v)
{
    for (uint32_t i = 0; i < replicas * tp; i++)
        for (uint64_t back = 0; back <= (v > 1); back++)
            assert_int_equal(h_check_buffer(r->workers[i], (int)((v - back) % 2), i % tp, tp,
                                            v - back), 0);
}

/* Syncs 20 versions from two trainer ranks and checks generation after each (and, staged,
 * both buffers of every worker). Two prompts are submitted at once so that both replicas
 * serve when there are two. */
static void sync_versions(rlb_sync_mode mode, h_layout layout, uint32_t replicas, uint32_t tp)
{
    h_run r;
    h_child ch;
    h_trainer t0;
    assert_int_equal(h_start(&r, mode), 0);
    assert_int_equal(h_workers(&r, replicas, tp), 0);
    assert_int_equal(h_child_start(&r, &ch, 1, 2, layout), 0);
    assert_int_equal(h_trainer_open(&r, &t0, 0, 2, layout), 0);
    assert_int_equal(h_wait_workers(&r, t0.c, replicas * tp, replicas), 0);
    for (uint64_t v = 1; v <= 20; v++) {
        h_trainer_fill(&t0, v);
        assert_int_equal(h_child_publish(&ch, v), 0);
        rlb_sync_stats st = {.struct_size = sizeof(st)};
        int rc = rlb_publish(t0.c, v, &st), crc = -1;
        if (rc)
            fprintf(stderr, "publish %llu: %s\n", (unsigned long long)v, rlb_last_error(t0.c));
        assert_int_equal(rc, 0);
        assert_int_equal(h_child_result(&ch, &crc), 0);
        assert_int_equal(crc, 0);
        assert_int_equal(st.version, v);
        assert_true(st.bytes > 0);
        if (mode == RLB_SYNC_STAGED)
            check_staged_buffers(&r, replicas, tp, v);
        int32_t pa[3] = {(int32_t)(v % 200) + 1, 7, 42}, pb[2] = {3, (int32_t)(v % 100) + 5};
        h_request q[2];
        h_request_greedy(&q[0], pa, 3, MAX_TOKENS);
        h_request_greedy(&q[1], pb, 2, MAX_TOKENS);
        rlb_ticket tk[2];
        for (int i = 0; i < 2; i++) {
            q[i].req.min_weight_version = v;
            assert_int_equal(rlb_generate_submit(t0.c, &q[i].req, &tk[i]), 0);
        }
        for (int i = 0; i < 2; i++) {
            rlb_result *res;
            assert_int_equal(rlb_generate_wait(t0.c, tk[i], 20000, &res), 0);
            assert_int_equal(h_check_result(&r, res, v, tp, q[i].prompt.tokens,
                                            q[i].prompt.n_tokens, MAX_TOKENS), 0);
            rlb_result_free(res);
        }
    }
    assert_true(h_stat(t0.c, "syncs") == 20);
    assert_true(h_stat(t0.c, "aborts") == 0);
    h_child_stop(&ch);
    h_trainer_close(&t0);
    assert_int_equal(h_stop(&r, NULL), 0);
}

static void test_fsdp2_pause_two_replicas(void **state)
{
    (void)state;
    sync_versions(RLB_SYNC_PAUSE, H_FSDP2, 2, 1);
}

static void test_fsdp1_staged_tp2(void **state)
{
    (void)state;
    sync_versions(RLB_SYNC_STAGED, H_FSDP1, 1, 2);
}

/* ---- A raw tool connection (conn.h + proto.h), for messages the client never sends --- */

typedef struct raw {
    rlb_conn *c;
    rlb_ring_rx rx;
} raw;

static void raw_send_bytes(raw *w, const void *data, size_t len)
{
    assert_int_equal(rlb__ring_send(rlb__conn_tx(w->c), 0, data, len, 2000), 0);
}

static void raw_send(raw *w, const rlb_msg *m)
{
    uint8_t buf[4096];
    size_t len;
    assert_int_equal(rlb__msg_pack(m, buf, sizeof(buf), &len), 0);
    raw_send_bytes(w, buf, len);
}

/* Receives the next message; returns its type and, for an ERROR, its code in *code. */
static uint32_t raw_recv(raw *w, int *code)
{
    rlb_ring_msg rm;
    assert_int_equal(rlb__ring_recv(rlb__conn_rx(w->c), &w->rx, 5000, &rm), 0);
    rlb_msg m;
    assert_int_equal(rlb__msg_decode(rm.data, rm.len, &m, NULL, 0), 0);
    uint32_t type = m.type;
    if (code)
        *code = type == RLB_MSG_ERROR ? m.error.code : 0;
    rlb__msg_free(&m);
    rlb__ring_recv_done(rlb__conn_rx(w->c), &w->rx);
    return type;
}

static void raw_open(h_run *r, raw *w, int hello)
{
    memset(w, 0, sizeof(*w));
    w->rx.max_msg = 1 << 20;
    assert_int_equal(rlb__conn_connect(r->sock, 5000, &w->c), 0);
    if (!hello)
        return;
    rlb_msg m = {.type = RLB_MSG_HELLO,
                 .hello = {.abi_version = RLB_ABI_VERSION, .role = RLB_ROLE_TOOL}};
    raw_send(w, &m);
    assert_int_equal(raw_recv(w, NULL), RLB_MSG_WELCOME);
}

static void raw_close(raw *w)
{
    rlb__ring_rx_free(&w->rx);
    rlb__conn_close(w->c);
}

static void test_sleep_wake(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    raw w;
    assert_int_equal(h_start_simple(&r, &t, RLB_SYNC_PAUSE, 1), 0);
    raw_open(&r, &w, 1);
    rlb_msg m = {.type = RLB_MSG_SLEEP};
    raw_send(&w, &m);
    for (double t0 = rlb__clock_s(); h_stat(t.c, "asleep") != 1 && rlb__clock_s() - t0 < 5;)
        usleep(1000);
    /* A request made while the workers sleep waits for the wake. */
    int32_t prompt[2] = {5, 9};
    h_request q;
    h_request_greedy(&q, prompt, 2, MAX_TOKENS);
    rlb_ticket tk;
    rlb_result *res = NULL;
    assert_int_equal(rlb_generate_submit(t.c, &q.req, &tk), 0);
    assert_int_equal(rlb_generate_wait(t.c, tk, 200, &res), RLB_ETIMEDOUT);
    assert_true(h_stat(t.c, "held") == 1);
    m.type = RLB_MSG_WAKE;
    raw_send(&w, &m);
    assert_int_equal(rlb_generate_wait(t.c, tk, 5000, &res), 0);
    assert_int_equal(h_check_result(&r, res, 1, 1, prompt, 2, MAX_TOKENS), 0);
    rlb_result_free(res);
    assert_true(h_stat(t.c, "asleep") == 0);
    check_generate(&r, t.c, 1, 1, prompt, 2, MAX_TOKENS);
    raw_close(&w);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

/* kill -9 of a worker holding requests: they finish on the other replica. Both workers
 * are stopped while the requests go out, so that each replica holds two of them when the
 * kill lands, however fast the machine (the peer timeout is raised so that the stopped
 * workers are not declared hung meanwhile). */
static void test_worker_killed(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    setenv("RLB_PEER_TIMEOUT_MS", "60000", 1);
    assert_int_equal(h_start_simple(&r, &t, RLB_SYNC_PAUSE, 2), 0);
    int32_t prompt[3] = {11, 12, 13};
    h_request q;
    h_request_greedy(&q, prompt, 3, 400);
    rlb_ticket tk[4];
    kill(r.workers[0], SIGSTOP);
    kill(r.workers[1], SIGSTOP);
    for (int i = 0; i < 4; i++)
        assert_int_equal(rlb_generate_submit(t.c, &q.req, &tk[i]), 0);
    assert_int_equal(h_wait_stat(t.c, "inflight", 4, 10), 0);
    kill(r.workers[0], SIGKILL);
    kill(r.workers[1], SIGCONT);
    double t0 = rlb__clock_s();
    int32_t want[512];
    int nw = h_reference(&r, 1, 1, prompt, 3, 400, want, 512);
    assert_true(nw > 0);
    for (int i = 0; i < 4; i++) {
        rlb_result *res;
        assert_int_equal(rlb_generate_wait(t.c, tk[i], 20000, &res), 0);
        const rlb_sample *s = rlb_result_sample(res, 0);
        assert_int_equal(s->weight_version, 1);
        assert_int_equal((int)s->n_tokens, nw);
        assert_memory_equal(want, s->tokens, sizeof(int32_t) * (size_t)nw);
        rlb_result_free(res);
    }
    fprintf(stderr, "requests done %.2f s after the kill\n", rlb__clock_s() - t0);
    assert_true(h_stat(t.c, "retried") == 2);
    assert_true(h_stat(t.c, "replicas_up") == 1);
    check_generate(&r, t.c, 1, 1, prompt, 2, MAX_TOKENS);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
    unsetenv("RLB_PEER_TIMEOUT_MS");
}

static void *kill_later(void *arg)
{
    usleep(300000);
    kill(*(pid_t *)arg, SIGKILL);
    return NULL;
}

/* kill -9 of a trainer rank before it publishes: the version is aborted, and the staged
 * bridge goes on serving the committed version. */
static void test_trainer_killed(void **state)
{
    (void)state;
    h_run r;
    h_child ch;
    h_trainer t0;
    assert_int_equal(h_start(&r, RLB_SYNC_STAGED), 0);
    assert_int_equal(h_workers(&r, 1, 1), 0);
    assert_int_equal(h_child_start(&r, &ch, 1, 2, H_FSDP2), 0);
    assert_int_equal(h_trainer_open(&r, &t0, 0, 2, H_FSDP2), 0);
    assert_int_equal(h_wait_workers(&r, t0.c, 1, 1), 0);
    int crc = -1;
    h_trainer_fill(&t0, 1);
    assert_int_equal(h_child_publish(&ch, 1), 0);
    assert_int_equal(rlb_publish(t0.c, 1, NULL), 0);
    assert_int_equal(h_child_result(&ch, &crc), 0);
    assert_int_equal(crc, 0);
    h_trainer_fill(&t0, 2);
    pthread_t th;
    pthread_create(&th, NULL, kill_later, &ch.pid);
    double t = rlb__clock_s();
    assert_int_equal(rlb_publish(t0.c, 2, NULL), RLB_EABORTED);
    assert_true(rlb__clock_s() - t < 2.5);
    pthread_join(th, NULL);
    int32_t prompt[2] = {21, 22};
    check_generate(&r, t0.c, 1, 1, prompt, 2, MAX_TOKENS);
    assert_true(h_stat(t0.c, "aborts") == 1);
    assert_true(h_stat(t0.c, "stale") == 0);
    close(ch.to);
    close(ch.from);
    h_trainer_close(&t0);
    assert_int_equal(h_stop(&r, NULL), 0);
}

typedef struct publish_job {
    h_trainer *t;
    uint64_t v;
    int rc;
} publish_job;

static void *publish_main(void *arg)
{
    publish_job *j = arg;
    j->rc = rlb_publish(j->t->c, j->v, NULL);
    return NULL;
}

/* Fills and publishes v from both ranks; rank 0's publish runs in *th (joined by the
 * caller, its result in j->rc). */
static void publish_both(h_child *ch, h_trainer *t0, uint64_t v, publish_job *j, pthread_t *th)
{
    h_trainer_fill(t0, v);
    assert_int_equal(h_child_publish(ch, v), 0);
    *j = (publish_job){.t = t0, .v = v, .rc = -1};
    assert_int_equal(pthread_create(th, NULL, publish_main, j), 0);
}

/* Buffer `buf` of worker pid (TP 1) holds version v; skips the test where the worker's
 * memory cannot be read. */
static void expect_buffer(pid_t pid, int buf, uint64_t v)
{
    int rc = h_check_buffer(pid, buf, 0, 1, v);
    if (rc == 77)
        skip();
    assert_int_equal(rc, 0);
}

/* A staged worker slow to answer its loads (stopped): version 3 is copied into its free
 * buffer 1 and loaded, then aborted (a trainer rank is killed), which sends it back to
 * buffer 0. Both loads wait unanswered, and it may still switch to buffer 1 and read it,
 * so version 4 must not be copied into it until the worker answered both: buffer 1 keeps
 * version 3 until then. Once it runs again, version 4 lands in buffer 1 and commits, and
 * buffer 0 keeps version 2 throughout. */
static void test_staged_slow_ack(void **state)
{
    (void)state;
    h_run r;
    h_child ch;
    h_trainer t0;
    rlb_client *tool;
    publish_job j;
    pthread_t th;
    int crc = -1;
    setenv("RLB_PEER_TIMEOUT_MS", "10000", 1); /* the stopped worker stays in service */
    assert_int_equal(h_start(&r, RLB_SYNC_STAGED), 0);
    assert_int_equal(h_workers(&r, 1, 1), 0);
    assert_int_equal(h_child_start(&r, &ch, 1, 2, H_FSDP2), 0);
    assert_int_equal(h_trainer_open(&r, &t0, 0, 2, H_FSDP2), 0);
    assert_int_equal(h_connect(&r, 0, 0, &tool), 0);
    assert_int_equal(h_wait_workers(&r, tool, 1, 1), 0);
    for (uint64_t v = 1; v <= 2; v++) {
        publish_both(&ch, &t0, v, &j, &th);
        pthread_join(th, NULL);
        assert_int_equal(j.rc, 0);
        assert_int_equal(h_child_result(&ch, &crc), 0);
        assert_int_equal(crc, 0);
    }
    pid_t w = r.workers[0];
    expect_buffer(w, 0, 2);
    expect_buffer(w, 1, 1);

    kill(w, SIGSTOP);
    publish_both(&ch, &t0, 3, &j, &th);
    assert_int_equal(h_wait_stat(tool, "loads_unanswered", 1, 10), 0); /* load(3, buffer 1) */
    kill(ch.pid, SIGKILL);
    waitpid(ch.pid, NULL, 0);
    close(ch.to);
    close(ch.from);
    pthread_join(th, NULL);
    assert_int_equal(j.rc, RLB_EABORTED);
    assert_int_equal(h_wait_stat(tool, "loads_unanswered", 2, 10), 0); /* + load(2, buffer 0) */
    expect_buffer(w, 1, 3);

    assert_int_equal(h_child_start(&r, &ch, 1, 2, H_FSDP2), 0);
    publish_both(&ch, &t0, 4, &j, &th);
    usleep(500000); /* time to copy, had the bridge not waited for the answers */
    assert_true(h_stat(tool, "syncs") == 2);
    expect_buffer(w, 1, 3);
    expect_buffer(w, 0, 2);
    kill(w, SIGCONT);
    pthread_join(th, NULL);
    assert_int_equal(j.rc, 0);
    assert_int_equal(h_child_result(&ch, &crc), 0);
    assert_int_equal(crc, 0);
    expect_buffer(w, 1, 4);
    expect_buffer(w, 0, 2);
    int32_t prompt[2] = {31, 32};
    check_generate(&r, tool, 4, 1, prompt, 2, MAX_TOKENS);
    assert_true(h_stat(tool, "loads_unanswered") == 0);
    h_child_stop(&ch);
    h_trainer_close(&t0);
    assert_int_equal(h_stop(&r, tool), 0);
}

/* Pause mode: the only replica dies while the sync drains the request it runs (asleep, so
 * the request cannot finish first). The version is aborted (no worker holds it), never
 * committed with nothing written. */
static void test_worker_killed_while_draining(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    int32_t prompt[3] = {11, 12, 13};
    rlb_ticket tk;
    rlb_result *res = NULL;
    assert_int_equal(h_start_simple(&r, &t, RLB_SYNC_PAUSE, 1), 0);
    assert_int_equal(h_submit(t.c, prompt, 3, 400, 1, &tk), 0);
    assert_int_equal(rlb_sleep(t.c), 0);
    publish_job j;
    pthread_t th;
    h_trainer_fill(&t, 2);
    j = (publish_job){.t = &t, .v = 2, .rc = -1};
    assert_int_equal(pthread_create(&th, NULL, publish_main, &j), 0);
    usleep(200000); /* the sync waits for the request to drain */
    h_kill_worker(&r, 0);
    pthread_join(th, NULL);
    assert_int_equal(j.rc, RLB_EABORTED);
    assert_non_null(strstr(rlb_last_error(t.c), "no live worker replica"));
    /* the request's last replica died: no live replica is left to run it */
    assert_int_equal(rlb_generate_wait(t.c, tk, 20000, &res), RLB_ENOREPLICA);
    assert_true(h_stat(t.c, "weight_version") == 1);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

static int slow_ack_teardown(void **state)
{
    unsetenv("RLB_PEER_TIMEOUT_MS");
    return h_teardown(state);
}

/* Malformed and misplaced messages get an ERROR; the sender and the others go on. */
static void test_malformed(void **state)
{
    (void)state;
    h_run r;
    h_trainer t;
    raw w, fresh;
    int code;
    assert_int_equal(h_start_simple(&r, &t, RLB_SYNC_PAUSE, 1), 0);
    raw_open(&r, &w, 1);
    const uint8_t garbage[] = {0xc1, 0x00, 0xff, 0x12};
    raw_send_bytes(&w, garbage, sizeof(garbage));
    assert_int_equal(raw_recv(&w, &code), RLB_MSG_ERROR);
    assert_int_equal(code, RLB_EPROTO);
    const uint8_t no_type[] = {0x81, 0xa1, 'x', 0x01}; /* {"x": 1} */
    raw_send_bytes(&w, no_type, sizeof(no_type));
    assert_int_equal(raw_recv(&w, &code), RLB_MSG_ERROR);
    rlb_msg pub = {.type = RLB_MSG_PUBLISH, .publish = {.version = 5}};
    raw_send(&w, &pub); /* a tool may not publish */
    assert_int_equal(raw_recv(&w, &code), RLB_MSG_ERROR);
    assert_int_equal(code, RLB_EPROTO);
    raw_open(&r, &fresh, 0);
    rlb_msg stats = {.type = RLB_MSG_STATS, .stats = {.request_id = 7}};
    raw_send(&fresh, &pub); /* nothing before hello */
    assert_int_equal(raw_recv(&fresh, &code), RLB_MSG_ERROR);
    raw_send(&fresh, &stats);
    assert_int_equal(raw_recv(&fresh, NULL), RLB_MSG_STATS_REPLY);
    raw_send(&w, &stats);
    assert_int_equal(raw_recv(&w, NULL), RLB_MSG_STATS_REPLY);

    /* A registration the model refuses names the tensor. */
    const char *norm = "model.norm.weight";
    assert_int_equal(rlb_unregister(t.c, &norm, 1), 0);
    rlb_tensor_desc d;
    rlb_tensor_desc_init(&d);
    d.name = "model.norm.weight";
    d.ndim = 1;
    d.shape[0] = 65;
    d.data = t.mem;
    assert_int_equal(rlb_register(t.c, &d, 1), RLB_ESHAPE);
    assert_non_null(strstr(rlb_last_error(t.c), "model.norm.weight"));
    int32_t prompt[2] = {1, 2};
    check_generate(&r, t.c, 1, 1, prompt, 2, MAX_TOKENS);
    raw_close(&fresh);
    raw_close(&w);
    h_trainer_close(&t);
    assert_int_equal(h_stop(&r, NULL), 0);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    setenv("RLB_THREADS", "1", 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_fsdp2_pause_two_replicas, h_teardown),
        cmocka_unit_test_teardown(test_fsdp1_staged_tp2, h_teardown),
        cmocka_unit_test_teardown(test_sleep_wake, h_teardown),
        cmocka_unit_test_teardown(test_worker_killed, h_teardown),
        cmocka_unit_test_teardown(test_worker_killed_while_draining, h_teardown),
        cmocka_unit_test_teardown(test_trainer_killed, h_teardown),
        cmocka_unit_test_teardown(test_staged_slow_ack, slow_ack_teardown),
        cmocka_unit_test_teardown(test_malformed, h_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
