/* test_staged_loads: the load protocol between the bridge and a staged worker, each side
 * against a scripted peer on the raw protocol (common/conn.h, ring.h, proto.h, segmsg.h),
 * so the answers neither real side ever sends can be tried:
 *   - a real rlb-worker under a scripted bridge: a load naming a buffer past the two it has
 *     is answered with an ERROR naming load.buf, and the worker goes on serving; loads
 *     naming buffer 1, then 0, switch its engine (set_weights) and generation follows,
 *     token for token against `rlb generate` on the same weights; a load naming the buffer
 *     it serves is a no-op; a pause-mode worker answers a load of buffer 1 with loaded and
 *     RLB_EINVAL, still serving buffer 0;
 *   - a real rlb-bridge under a scripted worker: each sync writes the buffer the worker does
 *     not serve (both buffers compared with the naive reference at every load); a load
 *     answered with a failure aborts the version naming the worker and its text, the switch
 *     back names the committed version's buffer, and the next sync writes the free buffer
 *     again; a failed switch back takes the replica out of service.
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/conn.h"
#include "common/proto.h"
#include "common/segmsg.h"
#include "common/shm.h"
#include "tests/integration/bridge_harness.h"

#define MAX_TOKENS 8
#define WAIT_MS 20000

/* One end of a raw protocol connection. */
typedef struct peer {
    rlb_conn *c;
    rlb_ring_rx rx;
} peer;

static void send_bytes(peer *p, uint32_t type, const void *data, size_t len)
{
    assert_int_equal(rlb__ring_send(rlb__conn_tx(p->c), type, data, len, WAIT_MS), 0);
}

static void send_msg(peer *p, const rlb_msg *m)
{
    size_t size, len;
    assert_int_equal(rlb__msg_packed_size(m, &size), 0);
    void *buf = malloc(size);
    assert_non_null(buf);
    assert_int_equal(rlb__msg_pack(m, buf, size, &len), 0);
    send_bytes(p, m->type, buf, len);
    free(buf);
}

/* The next message, which must be of `type`; release it with done(). */
static void recv_msg(peer *p, uint32_t type, rlb_msg *m)
{
    rlb_ring_msg rm;
    char err[256];
    assert_int_equal(rlb__ring_recv(rlb__conn_rx(p->c), &p->rx, WAIT_MS, &rm), 0);
    assert_int_equal(rlb__msg_decode(rm.data, rm.len, m, err, sizeof(err)), 0);
    if (m->type != type)
        fail_msg("expected %s, got %s", rlb__msg_type_name(type), rlb__msg_type_name(m->type));
}

static void done(peer *p, rlb_msg *m)
{
    rlb__msg_free(m);
    rlb__ring_recv_done(rlb__conn_rx(p->c), &p->rx);
}

static void peer_close(peer *p)
{
    rlb__ring_rx_free(&p->rx);
    rlb__conn_close(p->c);
}

/* Writes version v's weights (TP 1) into a worker buffer. */
static void fill(void *buf, uint64_t v)
{
    uint64_t bytes;
    float *img = h_buffer_image(0, 1, v, &bytes);
    assert_non_null(img);
    memcpy(buf, img, bytes);
    free(img);
}

/* 1 when a worker buffer holds version v's weights (TP 1). */
static int holds(const void *buf, uint64_t v)
{
    uint64_t bytes;
    float *img = h_buffer_image(0, 1, v, &bytes);
    assert_non_null(img);
    int same = memcmp(buf, img, bytes) == 0;
    free(img);
    return same;
}

static uint64_t buffer_bytes(void)
{
    uint64_t bytes;
    free(h_buffer_image(0, 1, 1, &bytes));
    return bytes;
}

/* ---- A real worker under a scripted bridge ------------------------------------------ */

typedef struct fake_bridge {
    h_run r;              /* the directory (socket, reference checkpoints) and the worker */
    rlb_listener *l;
    peer p;
    void *buf[2];         /* the worker's weight buffers, mapped */
    uint64_t bytes[2];
    uint64_t next_id;     /* generate request ids */
} fake_bridge;

static fake_bridge fb;

/* Starts a worker against a scripted bridge running `staged` or pause syncs, through its
 * start-up: stats (the mode), weight buffers, hello, welcome. */
static void fake_bridge_start(int staged)
{
    memset(&fb, 0, sizeof(fb));
    fb.p.rx.max_msg = 1 << 24;
    snprintf(fb.r.dir, sizeof(fb.r.dir), "/tmp/rlb-staged-loads-XXXXXX");
    assert_non_null(mkdtemp(fb.r.dir));
    snprintf(fb.r.sock, sizeof(fb.r.sock), "%s/bridge.sock", fb.r.dir);
    assert_int_equal(rlb__listener_open(fb.r.sock, 1u << 20, &fb.l), 0);
    assert_true(h_worker(&fb.r, 0, 1, 0, 1) > 0);
    int rc = RLB_EAGAIN;
    for (int i = 0; i < 2000 && rc == RLB_EAGAIN; i++) {
        rc = rlb__listener_accept(fb.l, &fb.p.c);
        if (rc == RLB_EAGAIN)
            usleep(5000);
    }
    assert_int_equal(rc, 0);
    rlb_msg m;
    recv_msg(&fb.p, RLB_MSG_STATS, &m);
    uint64_t id = m.stats.request_id;
    done(&fb.p, &m);
    rlb_msg_stat mode = {.name = "staged", .value = staged};
    rlb_msg reply = {.type = RLB_MSG_STATS_REPLY,
                     .stats_reply = {.request_id = id, .n_stats = 1, .stats = &mode}};
    send_msg(&fb.p, &reply);
    for (int i = 0; i < 1 + staged; i++) {
        rlb__seg_msg sm;
        size_t len;
        int fd = -1, nfds = 0;
        assert_int_equal(rlb__conn_recv_fds(fb.p.c, &sm, sizeof(sm), &len, &fd, 1, &nfds,
                                            WAIT_MS), 0);
        assert_int_equal(nfds, 1);
        assert_int_equal(sm.id, RLB_SEG_ID_WEIGHTS + (uint32_t)i);
        fb.bytes[i] = sm.bytes;
        assert_int_equal(rlb__shm_map(fd, sm.bytes, &fb.buf[i]), 0);
        close(fd);
    }
    recv_msg(&fb.p, RLB_MSG_HELLO, &m);
    assert_int_equal(m.hello.role, RLB_ROLE_WORKER);
    done(&fb.p, &m);
    rlb_msg welcome = {.type = RLB_MSG_WELCOME,
                       .welcome = {.abi_version = RLB_ABI_VERSION, .peer_id = 1}};
    send_msg(&fb.p, &welcome);
    fb.next_id = 1;
}

static int fake_bridge_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < 2; i++)
        rlb__shm_unmap(fb.buf[i], fb.bytes[i]);
    if (fb.p.c)
        peer_close(&fb.p);
    rlb__listener_close(fb.l);
    h_cleanup();
    if (fb.r.dir[0]) {
        char cmd[192];
        snprintf(cmd, sizeof(cmd), "rm -rf %s", fb.r.dir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", fb.r.dir);
    }
    memset(&fb, 0, sizeof(fb));
    return 0;
}

/* Sends load(version, buffer) and checks the loaded answer: code, and the buffer the worker
 * serves now. */
static void load(uint64_t version, uint32_t buffer, int code, uint32_t serves)
{
    rlb_msg m = {.type = RLB_MSG_LOAD, .load = {.version = version, .buffer = buffer}};
    send_msg(&fb.p, &m);
    recv_msg(&fb.p, RLB_MSG_LOADED, &m);
    assert_int_equal(m.loaded.version, version);
    assert_int_equal(m.loaded.code, code);
    assert_int_equal(m.loaded.buffer, serves);
    if (code)
        assert_non_null(m.loaded.text);
    done(&fb.p, &m);
}

/* A greedy generate through the worker: its sample must carry version v and, for v >= 1,
 * the tokens `rlb generate` gives on version v's weights. */
static void generate(uint64_t v)
{
    static const int32_t prompt[3] = {5, 17, 42};
    rlb_msg_prompt p = {.tokens = prompt, .n_tokens = 3};
    rlb_msg m = {.type = RLB_MSG_GENERATE,
                 .generate = {.request_id = fb.next_id++,
                              .sampling = {.n = 1, .max_tokens = MAX_TOKENS, .top_p = 1},
                              .n_prompts = 1, .prompts = &p}};
    send_msg(&fb.p, &m);
    recv_msg(&fb.p, RLB_MSG_RESULT, &m);
    assert_int_equal(m.result.n_samples, 1);
    const rlb_msg_sample *s = &m.result.samples[0];
    assert_int_equal(s->weight_version, v);
    if (v) {
        int32_t want[MAX_TOKENS];
        int n = h_reference(&fb.r, v, 1, prompt, 3, MAX_TOKENS, want, MAX_TOKENS);
        assert_int_equal(n, (int)s->n_tokens);
        for (int i = 0; i < n; i++)
            assert_int_equal(rlb__msg_i32(s->tokens, (uint32_t)i), want[i]);
    }
    done(&fb.p, &m);
}

static void test_worker_buffers(void **state)
{
    (void)state;
    fake_bridge_start(1);
    /* {"ty": LOAD, "ver": 1, "buf": 7}: the bridge's packer refuses it, so it goes raw. */
    static const uint8_t bad[] = {0x83, 0xa2, 't', 'y', RLB_MSG_LOAD, 0xa3, 'v', 'e', 'r', 0x01,
                                  0xa3, 'b', 'u', 'f', 0x07};
    send_bytes(&fb.p, RLB_MSG_LOAD, bad, sizeof(bad));
    rlb_msg m;
    recv_msg(&fb.p, RLB_MSG_ERROR, &m);
    assert_int_equal(m.error.code, RLB_EPROTO);
    assert_int_equal(m.error.in_reply_to, RLB_MSG_LOAD);
    assert_non_null(strstr(m.error.text, "load.buf: 7 is not a weight buffer"));
    done(&fb.p, &m);
    generate(0); /* still serving the initial weights */

    fill(fb.buf[1], 1);
    load(1, 1, 0, 1);
    generate(1);
    fill(fb.buf[0], 2);
    load(2, 0, 0, 0);
    generate(2);
    assert_true(holds(fb.buf[1], 1)); /* the worker never writes its buffers */
    load(2, 0, 0, 0); /* the buffer it serves: nothing to switch */
    generate(2);
}

static void test_pause_worker_one_buffer(void **state)
{
    (void)state;
    fake_bridge_start(0);
    load(1, 1, RLB_EINVAL, 0);
    generate(0);
    fill(fb.buf[0], 1);
    load(1, 0, 0, 0);
    generate(1);
}

/* ---- A real bridge under a scripted worker ------------------------------------------ */

typedef struct fake_worker {
    h_run r;
    peer p;
    void *buf[2];
    uint64_t bytes;
    h_trainer t;         /* trainer rank 0, in this process (its error texts are read) */
    h_child ch;          /* trainer rank 1, in a child (killed to abort a version) */
    pthread_t th;        /* rank 0's publish in flight */
    uint64_t publishing; /* its version */
    int rc;              /* its result */
} fake_worker;

static fake_worker fw;

static void *publish_main(void *arg)
{
    (void)arg;
    fw.rc = rlb_publish(fw.t.c, fw.publishing, NULL);
    return NULL;
}

/* A staged bridge, a scripted worker (replica 0 of 1, TP 1) and two trainer ranks. */
static void fake_worker_start(void)
{
    memset(&fw, 0, sizeof(fw));
    fw.p.rx.max_msg = 1 << 24;
    fw.bytes = buffer_bytes();
    assert_int_equal(h_start(&fw.r, RLB_SYNC_STAGED), 0);
    assert_int_equal(rlb__conn_connect(fw.r.sock, WAIT_MS, &fw.p.c), 0);
    for (uint32_t i = 0; i < 2; i++) {
        char name[32];
        int fd;
        snprintf(name, sizeof(name), "rlb-weights-%u", i);
        assert_int_equal(rlb__shm_create(fw.bytes, name, &fd), 0);
        assert_int_equal(rlb__shm_map(fd, fw.bytes, &fw.buf[i]), 0);
        rlb__seg_msg sm = {.magic = RLB_SEG_MAGIC, .id = RLB_SEG_ID_WEIGHTS + i,
                           .bytes = fw.bytes};
        assert_int_equal(rlb__conn_send_fds(fw.p.c, &sm, sizeof(sm), &fd, 1), 0);
        close(fd);
    }
    rlb_msg m = {.type = RLB_MSG_HELLO,
                 .hello = {.abi_version = RLB_ABI_VERSION, .role = RLB_ROLE_WORKER,
                           .world = 1, .tp_size = 1, .device = RLB_DEVICE_CPU,
                           .weight_dtype = RLB_DTYPE_F32}};
    send_msg(&fw.p, &m);
    recv_msg(&fw.p, RLB_MSG_WELCOME, &m);
    done(&fw.p, &m);
    assert_int_equal(h_child_start(&fw.r, &fw.ch, 1, 2, H_FSDP2), 0);
    assert_int_equal(h_trainer_open(&fw.r, &fw.t, 0, 2, H_FSDP2), 0);
    assert_int_equal(h_wait_workers(&fw.r, fw.t.c, 1, 1), 0);
}

static int fake_worker_teardown(void **state)
{
    for (int i = 0; i < 2; i++)
        rlb__shm_unmap(fw.buf[i], fw.bytes);
    if (fw.p.c)
        peer_close(&fw.p);
    memset(&fw, 0, sizeof(fw));
    return h_teardown(state);
}

/* Both ranks publish v; rank 0's publish runs in a thread until publish_end. */
static void publish_start(uint64_t v)
{
    h_trainer_fill(&fw.t, v);
    assert_int_equal(h_child_publish(&fw.ch, v), 0);
    fw.publishing = v;
    fw.rc = -1;
    assert_int_equal(pthread_create(&fw.th, NULL, publish_main, NULL), 0);
}

/* Rank 0's result; rank 1's must be the same. */
static int publish_end(void)
{
    int crc = -1;
    pthread_join(fw.th, NULL);
    assert_int_equal(h_child_result(&fw.ch, &crc), 0);
    assert_int_equal(crc, fw.rc);
    return fw.rc;
}

/* Takes the next load, which must name (version, buffer), and checks that the named
 * buffer holds version `written` and the other one `kept` (0: not checked). */
static void expect_load(uint64_t version, uint32_t buffer, uint64_t written, uint64_t kept)
{
    rlb_msg m;
    recv_msg(&fw.p, RLB_MSG_LOAD, &m);
    assert_int_equal(m.load.version, version);
    assert_int_equal(m.load.buffer, buffer);
    done(&fw.p, &m);
    assert_true(holds(fw.buf[buffer], written));
    if (kept)
        assert_true(holds(fw.buf[!buffer], kept));
}

static void answer(uint64_t version, int code, const char *text, uint32_t serves)
{
    rlb_msg m = {.type = RLB_MSG_LOADED,
                 .loaded = {.version = version, .code = code, .text = text, .buffer = serves}};
    send_msg(&fw.p, &m);
}

static void test_bridge_failed_load(void **state)
{
    (void)state;
    fake_worker_start();
    publish_start(1);
    expect_load(1, 1, 1, 0);
    answer(1, 0, NULL, 1);
    assert_int_equal(publish_end(), 0);

    /* A switch that fails: the version aborts naming the worker and its reason, and the
     * switch back names the buffer holding version 1. */
    static const char why[] = "switching to weight buffer 0 failed: out of memory; it serves "
                              "the previous version from buffer 1";
    publish_start(2);
    expect_load(2, 0, 2, 1);
    answer(2, RLB_ENOMEM, why, 1);
    assert_int_equal(publish_end(), RLB_EABORTED);
    assert_non_null(strstr(rlb_last_error(fw.t.c), "could not load version 2"));
    assert_non_null(strstr(rlb_last_error(fw.t.c), why));
    expect_load(1, 1, 1, 0);
    answer(1, 0, NULL, 1);
    assert_int_equal(h_wait_stat(fw.t.c, "loads_unanswered", 0, 10), 0);
    assert_true(h_stat(fw.t.c, "stale") == 0);
    assert_true(h_stat(fw.t.c, "replicas_up") == 1);

    /* The next sync writes the free buffer again, never the one served. */
    publish_start(3);
    expect_load(3, 0, 3, 1);
    answer(3, 0, NULL, 0);
    assert_int_equal(publish_end(), 0);

    /* Version 4 is aborted (trainer rank 1 killed) after the worker switched to it; its
     * switch back fails, which leaves it on the aborted version's buffer: its replica goes
     * out of service. */
    publish_start(4);
    rlb_msg m;
    recv_msg(&fw.p, RLB_MSG_LOAD, &m);
    assert_int_equal(m.load.buffer, 1);
    done(&fw.p, &m);
    kill(fw.ch.pid, SIGKILL);
    pthread_join(fw.th, NULL);
    assert_int_equal(fw.rc, RLB_EABORTED);
    answer(4, 0, NULL, 1);
    expect_load(3, 0, 3, 4);
    answer(3, RLB_ECUDA, "switching to weight buffer 0 failed: CUDA error; binding buffer 1 "
           "again failed too: CUDA error", 1);
    recv_msg(&fw.p, RLB_MSG_SHUTDOWN, &m);
    done(&fw.p, &m);
    assert_true(h_stat(fw.t.c, "replicas_up") == 0);
    h_trainer_close(&fw.t);
    assert_int_equal(h_stop(&fw.r, NULL), 0);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    setenv("RLB_THREADS", "1", 0);
    /* The scripted peers beat no heartbeat: no peer timeout while they wait on the test. */
    setenv("RLB_PEER_TIMEOUT_MS", "120000", 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_worker_buffers, fake_bridge_teardown),
        cmocka_unit_test_teardown(test_pause_worker_one_buffer, fake_bridge_teardown),
        cmocka_unit_test_teardown(test_bridge_failed_load, fake_worker_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
