/* test_client_fake: librlb against a scripted bridge running in a thread of the test, built
 * only from the protocol (common/conn.h, ring.h, proto.h, segmsg.h), so every client path is
 * exercised without the real rlb-bridge:
 *   - hello/welcome; segments arrive before the register naming them, and the memory
 *     references (segment id, offset, length) match what the test computes from its own
 *     pointers; the fake reads the trainer's bytes through its own mapping (zero copy);
 *   - a register the bridge refuses (error text reaches rlb_last_error, names roll back);
 *   - publish -> synced with stats, publish -> aborted with the reason;
 *   - generate blocking and asynchronous, results split over two messages and, for a large
 *     request, over ring fragments; every token checked against the fake's formula;
 *   - an error tied to a request (stale weights), a malformed message from the bridge
 *     (dropped, the connection goes on), the bridge dying mid-request (no hang);
 *   - several threads generating while another publishes (run under TSan too).
 * The fake's answers are a formula of the request: token k of sample i of prompt p is
 * first_prompt_token + 1000 p + 100 i + k, its logprob -(k + 1) / 8.
 */
#include <dlfcn.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/clock.h"
#include "common/conn.h"
#include "common/proto.h"
#include "common/segmsg.h"
#include "common/shm.h"
#include "rlb/rlb.h"

#define RING_BYTES 65536u /* small, so large results travel in fragments */
#define MAX_REG 16
#define MAX_SEGS 16
#define TOKEN_ABORT_CONN 777 /* first prompt token that makes the fake drop the connection */
#define TOKEN_GARBAGE 666    /* ... that makes it send a malformed message first */
#define ABORTED_VERSION 3    /* publishing this version is answered with aborted */

typedef struct fake_tensor {
    char name[64];       /* registered name */
    rlb_mem_ref mem;     /* its memory reference */
    rlb_layout_kind kind; /* layout */
    uint32_t rank, world; /* FSDP rank / world */
    uint32_t n_entries;  /* FSDP1 entries */
} fake_tensor;

typedef struct fake_seg {
    uint32_t id;  /* segment id from the seg message */
    void *map;    /* our own mapping of the trainer's memory */
    uint64_t bytes; /* its size */
} fake_seg;

typedef struct fake {
    char dir[64];           /* socket directory */
    char path[128];         /* socket path */
    rlb_listener *l;
    rlb_conn *conn;         /* the one client, or NULL */
    rlb_ring_rx rx;         /* reassembly of the client's messages */
    pthread_t thread;
    pthread_mutex_t lock;   /* the fields below */
    int stop;               /* ask the thread to end */
    uint64_t committed;     /* committed version */
    fake_tensor reg[MAX_REG];
    int n_reg;
    fake_seg segs[MAX_SEGS];
    int n_segs;
    int fd_before_use;      /* every register found its segments already received */
} fake;

static fake F;

/* ---- the fake bridge --------------------------------------------------------------------- */

static void reply(fake *f, const rlb_msg *m)
{
    size_t size, len;
    assert_int_equal(rlb__msg_packed_size(m, &size), 0);
    void *buf = malloc(size);
    assert_int_equal(rlb__msg_pack(m, buf, size, &len), 0);
    assert_int_equal(rlb__ring_send(rlb__conn_tx(f->conn), m->type, buf, len, 2000), 0);
    free(buf);
}

static void reply_error(fake *f, int code, uint64_t id, uint32_t re, const char *text)
{
    rlb_msg m = {.type = RLB_MSG_ERROR,
                 .error = {.code = code, .request_id = id, .in_reply_to = re, .text = text}};
    reply(f, &m);
}

static fake_seg *seg_by_id(fake *f, uint32_t id)
{
    for (int i = 0; i < f->n_segs; i++)
        if (f->segs[i].id == id)
            return &f->segs[i];
    return NULL;
}

/* Receives every segment fd the client sent so far. */
static void drain_fds(fake *f)
{
    for (;;) {
        rlb__seg_msg sm;
        size_t len;
        int fd, nfds;
        if (rlb__conn_recv_fds(f->conn, &sm, sizeof(sm), &len, &fd, 1, &nfds, 0) < 0)
            return;
        assert_int_equal(len, sizeof(sm));
        assert_int_equal(nfds, 1);
        assert_int_equal(sm.magic, RLB_SEG_MAGIC);
        size_t size;
        assert_int_equal(rlb__shm_size(fd, &size), 0);
        assert_int_equal(size, sm.bytes);
        pthread_mutex_lock(&f->lock);
        assert_true(f->n_segs < MAX_SEGS);
        assert_null(seg_by_id(f, sm.id)); /* an id is sent again only after its release */
        fake_seg *s = &f->segs[f->n_segs++];
        s->id = sm.id;
        s->bytes = sm.bytes;
        assert_int_equal(rlb__shm_map(fd, size, &s->map), 0);
        pthread_mutex_unlock(&f->lock);
        close(fd);
    }
}

/* Unmaps and forgets the segments no registered tensor lies in, as the bridge does after
 * an unregister or a refused register (segmsg.h). */
static void release_unused(fake *f)
{
    pthread_mutex_lock(&f->lock);
    for (int i = 0; i < f->n_segs;) {
        int used = 0;
        for (int k = 0; k < f->n_reg; k++)
            used |= f->reg[k].mem.length && f->reg[k].mem.fd_index == f->segs[i].id;
        if (used) {
            i++;
            continue;
        }
        rlb__shm_unmap(f->segs[i].map, f->segs[i].bytes);
        f->segs[i] = f->segs[--f->n_segs];
    }
    pthread_mutex_unlock(&f->lock);
}

static void on_register(fake *f, const rlb_msg_register *r)
{
    for (uint32_t i = 0; i < r->n_tensors; i++)
        if (!strncmp(r->tensors[i].name, "bad", 3)) {
            char text[128];
            snprintf(text, sizeof(text), "fake: shape of %s does not match the model",
                     r->tensors[i].name);
            reply_error(f, RLB_ESHAPE, 0, RLB_MSG_REGISTER, text);
            return release_unused(f);
        }
    pthread_mutex_lock(&f->lock);
    for (uint32_t i = 0; i < r->n_tensors; i++) {
        const rlb_msg_tensor *t = &r->tensors[i];
        if (t->mem.length && !seg_by_id(f, t->mem.fd_index))
            f->fd_before_use = 0;
        fake_tensor *ft = &f->reg[f->n_reg++];
        snprintf(ft->name, sizeof(ft->name), "%s", t->name);
        ft->mem = t->mem;
        ft->kind = t->layout.kind;
        ft->rank = t->layout.rank;
        ft->world = t->layout.world;
        ft->n_entries = t->layout.n_entries;
    }
    pthread_mutex_unlock(&f->lock);
}

static void on_unregister(fake *f, const rlb_msg_unregister *u)
{
    pthread_mutex_lock(&f->lock);
    uint32_t removed = u->n_names ? u->n_names : (uint32_t)f->n_reg;
    if (u->n_names == 0)
        f->n_reg = 0;
    for (uint32_t i = 0; i < u->n_names; i++)
        for (int k = 0; k < f->n_reg; k++)
            if (!strcmp(f->reg[k].name, u->names[i].name)) {
                f->reg[k] = f->reg[--f->n_reg];
                break;
            }
    pthread_mutex_unlock(&f->lock);
    release_unused(f);
    rlb_msg ack = {.type = RLB_MSG_UNREGISTERED, .unregistered = {.n_tensors = removed}};
    reply(f, &ack);
}

/* Every registered tensor must hold `version` as its first float: the trainer wrote it into
 * the shared memory, and we read it through our own mapping. */
static void on_publish(fake *f, uint64_t v)
{
    if (v == ABORTED_VERSION) {
        rlb_msg m = {.type = RLB_MSG_ABORTED,
                     .aborted = {.version = v, .code = RLB_EPEERDEAD, .text = "fake: rank 1 died"}};
        return reply(f, &m);
    }
    uint64_t bytes = 0;
    char bad[160] = "";
    pthread_mutex_lock(&f->lock);
    for (int i = 0; i < f->n_reg; i++) {
        fake_tensor *t = &f->reg[i];
        if (!t->mem.length)
            continue;
        fake_seg *s = seg_by_id(f, t->mem.fd_index);
        float x;
        memcpy(&x, (char *)s->map + t->mem.offset, sizeof(x));
        if (x != (float)v && !bad[0])
            snprintf(bad, sizeof(bad), "fake: %s holds %g, expected %g", t->name, x, (double)v);
        bytes += t->mem.length;
    }
    if (!bad[0])
        f->committed = v;
    pthread_mutex_unlock(&f->lock);
    rlb_msg m;
    if (bad[0])
        m = (rlb_msg){.type = RLB_MSG_ABORTED,
                      .aborted = {.version = v, .code = RLB_ECORRUPT, .text = bad}};
    else
        m = (rlb_msg){.type = RLB_MSG_SYNCED,
                      .synced = {.version = v, .bytes = bytes, .ms = 2.0, .gbps = bytes / 2e6}};
    reply(f, &m);
}

/* Sends samples [from, to) of the request (prompt-major) in one result message. */
static void send_samples(fake *f, const rlb_msg_generate *g, uint32_t from, uint32_t to,
                         int done, uint64_t version)
{
    const rlb_msg_sampling *sp = &g->sampling;
    uint32_t n = to - from, T = sp->max_tokens;
    rlb_msg_sample *s = calloc(n ? n : 1, sizeof(*s));
    int32_t *tok = malloc((size_t)n * T * 4 + 4);
    float *lp = malloc((size_t)n * T * 4 + 4);
    for (uint32_t j = 0; j < n; j++) {
        uint32_t p = (from + j) / sp->n, i = (from + j) % sp->n;
        int32_t first = rlb__msg_i32(g->prompts[p].tokens, 0);
        for (uint32_t k = 0; k < T; k++) {
            tok[(size_t)j * T + k] = first + 1000 * (int32_t)p + 100 * (int32_t)i + (int32_t)k;
            lp[(size_t)j * T + k] = -(float)(k + 1) / 8;
        }
        s[j] = (rlb_msg_sample){.prompt = p,
                                .index = i,
                                .tokens = tok + (size_t)j * T,
                                .n_tokens = T,
                                .logprobs = sp->logprobs ? lp + (size_t)j * T : NULL,
                                .n_logprobs = sp->logprobs ? T : 0,
                                .finish = RLB_MSG_FINISH_LENGTH,
                                .weight_version = version};
    }
    rlb_msg m = {.type = RLB_MSG_RESULT,
                 .result = {.request_id = g->request_id, .done = done, .n_samples = n,
                            .samples = s}};
    reply(f, &m);
    free(s);
    free(tok);
    free(lp);
}

/* Returns 1 when the connection was dropped on purpose. */
static int on_generate(fake *f, const rlb_msg_generate *g)
{
    pthread_mutex_lock(&f->lock);
    uint64_t version = f->committed;
    pthread_mutex_unlock(&f->lock);
    int32_t first = rlb__msg_i32(g->prompts[0].tokens, 0);
    if (first == TOKEN_ABORT_CONN) {
        rlb__conn_close(f->conn);
        f->conn = NULL;
        return 1;
    }
    if (first == TOKEN_GARBAGE) {
        static const uint8_t junk[] = {0x93, 0xc1, 0xff, 0x00, 0x12};
        assert_int_equal(rlb__ring_send(rlb__conn_tx(f->conn), RLB_MSG_RESULT, junk,
                                        sizeof(junk), 1000), 0);
    }
    if (g->min_weight_version > version) {
        reply_error(f, RLB_ESTALE, g->request_id, RLB_MSG_GENERATE,
                    "fake: no weights that new yet");
        return 0;
    }
    uint32_t total = g->n_prompts * g->sampling.n;
    send_samples(f, g, 0, total / 2, 0, version);
    send_samples(f, g, total / 2, total, 1, version);
    return 0;
}

static void on_stats(fake *f, uint64_t id)
{
    pthread_mutex_lock(&f->lock);
    rlb_msg_stat st[2] = {{.name = "tensors", .value = f->n_reg},
                          {.name = "committed", .value = (double)f->committed}};
    pthread_mutex_unlock(&f->lock);
    rlb_msg m = {.type = RLB_MSG_STATS_REPLY,
                 .stats_reply = {.request_id = id, .n_stats = 2, .stats = st}};
    reply(f, &m);
}

/* Answers one message; returns 1 when the connection was dropped on purpose. */
static int handle(fake *f, const rlb_msg *m)
{
    switch (m->type) {
    case RLB_MSG_HELLO: {
        assert_int_equal(m->hello.abi_version, RLB_ABI_VERSION);
        rlb_msg w = {.type = RLB_MSG_WELCOME,
                     .welcome = {.abi_version = RLB_ABI_VERSION, .peer_id = 7,
                                 .weight_version = f->committed}};
        reply(f, &w);
        break;
    }
    case RLB_MSG_REGISTER: on_register(f, &m->reg); break;
    case RLB_MSG_UNREGISTER: on_unregister(f, &m->unreg); break;
    case RLB_MSG_PUBLISH: on_publish(f, m->publish.version); break;
    case RLB_MSG_STATS: on_stats(f, m->stats.request_id); break;
    case RLB_MSG_GENERATE: return on_generate(f, &m->generate);
    default: fail_msg("fake bridge: unexpected %s", rlb__msg_type_name(m->type));
    }
    return 0;
}

static int stopping(fake *f)
{
    pthread_mutex_lock(&f->lock);
    int s = f->stop;
    pthread_mutex_unlock(&f->lock);
    return s;
}

static void *fake_main(void *arg)
{
    fake *f = arg;
    while (!stopping(f)) {
        if (!f->conn) {
            struct pollfd p = {.fd = rlb__listener_fd(f->l), .events = POLLIN};
            if (poll(&p, 1, 20) > 0)
                rlb__listener_accept(f->l, &f->conn);
            continue;
        }
        rlb_ring *rx = rlb__conn_rx(f->conn);
        rlb_ring_msg rm;
        int rc = rlb__ring_recv(rx, &f->rx, 20, &rm);
        if (rc == RLB_EPEERDEAD) {
            rlb__conn_close(f->conn);
            f->conn = NULL;
            continue;
        }
        if (rc < 0)
            continue;
        drain_fds(f);
        rlb_msg m;
        char err[128];
        assert_int_equal(rlb__msg_decode(rm.data, rm.len, &m, err, sizeof(err)), 0);
        int dropped = handle(f, &m);
        rlb__msg_free(&m);
        if (!dropped)
            rlb__ring_recv_done(rx, &f->rx);
        else
            rlb__ring_rx_free(&f->rx);
    }
    return NULL;
}

static int fake_start(void **state)
{
    fake *f = &F;
    memset(f, 0, sizeof(*f));
    f->rx.max_msg = 1u << 28;
    f->fd_before_use = 1;
    strcpy(f->dir, "/tmp/rlb-test-client-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    setenv("RLB_SOCKET_DIR", f->dir, 1);
    snprintf(f->path, sizeof(f->path), "%s/%s", f->dir, RLB_SOCKET_DEFAULT);
    assert_int_equal(rlb__listener_open(f->path, RING_BYTES, &f->l), 0);
    pthread_mutex_init(&f->lock, NULL);
    assert_int_equal(pthread_create(&f->thread, NULL, fake_main, f), 0);
    return 0;
}

static int fake_stop(void **state)
{
    fake *f = &F;
    pthread_mutex_lock(&f->lock);
    f->stop = 1;
    pthread_mutex_unlock(&f->lock);
    pthread_join(f->thread, NULL);
    rlb__conn_close(f->conn);
    rlb__ring_rx_free(&f->rx);
    rlb__listener_close(f->l);
    for (int i = 0; i < f->n_segs; i++)
        rlb__shm_unmap(f->segs[i].map, f->segs[i].bytes);
    pthread_mutex_destroy(&f->lock);
    rmdir(f->dir);
    return 0;
}

/* ---- helpers ------------------------------------------------------------------------------- */

static rlb_client *connect_default(void)
{
    rlb_client_options o;
    rlb_client_options_init(&o);
    o.connect_timeout_ms = 2000;
    o.request_timeout_ms = 5000;
    rlb_client *c = NULL;
    int rc = rlb_connect(&o, &c);
    if (rc)
        fail_msg("connect: %s: %s", rlb_strerror(rc), rlb_last_error(NULL));
    return c;
}

/* rlb_last_error(c) holds text. */
static void expect_error(rlb_client *c, const char *text)
{
    if (!strstr(rlb_last_error(c), text))
        fail_msg("error text '%s' does not say '%s'", rlb_last_error(c), text);
}

static rlb_tensor_desc full2(const char *name, uint64_t d0, uint64_t d1, const void *data)
{
    rlb_tensor_desc d;
    rlb_tensor_desc_init(&d);
    d.name = name;
    d.ndim = 2;
    d.shape[0] = d0;
    d.shape[1] = d1;
    d.data = data;
    return d;
}

/* Checks a result against the fake's formula. */
static void check_result(const rlb_result *r, const rlb_prompt *prompts, uint32_t n_prompts,
                         uint32_t n, uint32_t max_tokens, int logprobs, uint64_t version)
{
    assert_int_equal(rlb_result_num_samples(r), (size_t)n_prompts * n);
    for (uint32_t p = 0; p < n_prompts; p++)
        for (uint32_t i = 0; i < n; i++) {
            const rlb_sample *s = rlb_result_sample(r, (size_t)p * n + i);
            assert_non_null(s);
            assert_int_equal(s->prompt, p);
            assert_int_equal(s->index, i);
            assert_int_equal(s->n_tokens, max_tokens);
            assert_int_equal(s->finish, RLB_REASON_LENGTH);
            assert_int_equal(s->weight_version, version);
            for (uint32_t k = 0; k < max_tokens; k++) {
                assert_int_equal(s->tokens[k], prompts[p].tokens[0] + 1000 * (int)p +
                                                   100 * (int)i + (int)k);
                if (logprobs)
                    assert_true(s->logprobs[k] == -(float)(k + 1) / 8);
            }
            if (!logprobs)
                assert_null(s->logprobs);
        }
    assert_null(rlb_result_sample(r, (size_t)n_prompts * n));
}

/* ---- tests ----------------------------------------------------------------------------------- */

static void test_register_publish(void **state)
{
    rlb_client *c = connect_default();
    assert_int_equal(rlb_weight_version(c), 0);
    float *a, *b;
    assert_int_equal(rlb_alloc_host(c, 4096, (void **)&a), 0);
    assert_int_equal(rlb_alloc_host(c, 100, (void **)&b), 0);
    assert_int_equal((uintptr_t)a % 4096, 0);
    for (int i = 0; i < 25; i++)
        assert_true(b[i] == 0.0f); /* zeroed */

    /* a: two full tensors; b: an FSDP2 shard (rank 1 of 3 of [10, 2]: rows 4..7) and an
     * FSDP1 chunk (rank 0 of 2 of a 6-element unit). */
    rlb_tensor_desc d[4];
    d[0] = full2("x.weight", 4, 8, a);
    d[1] = full2("y.weight", 2, 3, a + 32);
    d[2] = full2("z.weight", 10, 2, b);
    d[2].layout = RLB_TENSOR_FSDP2;
    d[2].shard_rank = 1;
    d[2].shard_world = 3;
    rlb_fsdp1_entry ent[2] = {{.name = "u.a", .ndim = 1, .shape = {2}, .numel = 2},
                              {.name = "u.b", .ndim = 2, .shape = {2, 2}, .numel = 4}};
    rlb_tensor_desc_init(&d[3]);
    d[3].name = "unit0";
    d[3].ndim = 1;
    d[3].shape[0] = 6;
    d[3].layout = RLB_TENSOR_FSDP1;
    d[3].shard_world = 2;
    d[3].entries = ent;
    d[3].n_entries = 2;
    d[3].data = b + 8;
    assert_int_equal(rlb_register(c, d, 4), 0);

    pthread_mutex_lock(&F.lock);
    assert_int_equal(F.n_reg, 4);
    assert_true(F.fd_before_use);
    const uint64_t off[4] = {0, 128, 0, 32}, len[4] = {128, 24, 4 * 2 * 4, 3 * 4};
    for (int i = 0; i < 4; i++) {
        assert_string_equal(F.reg[i].name, d[i].name);
        assert_int_equal(F.reg[i].mem.kind, RLB_MEM_HOST_SHM);
        assert_int_equal(F.reg[i].mem.offset, off[i]);
        assert_int_equal(F.reg[i].mem.length, len[i]);
    }
    assert_int_equal(F.reg[0].mem.fd_index, F.reg[1].mem.fd_index);
    assert_int_not_equal(F.reg[0].mem.fd_index, F.reg[2].mem.fd_index);
    assert_int_equal(F.reg[2].kind, RLB_LAYOUT_FSDP2);
    assert_int_equal(F.reg[2].rank, 1);
    assert_int_equal(F.reg[2].world, 3);
    assert_int_equal(F.reg[3].kind, RLB_LAYOUT_FSDP1);
    assert_int_equal(F.reg[3].n_entries, 2);
    pthread_mutex_unlock(&F.lock);

    /* Refusals before sending, each naming what is wrong: duplicates, a pointer outside
     * the shared memory, a bad descriptor, a batch that is not one. */
    assert_int_equal(rlb_register(c, d, 1), RLB_EEXIST);
    expect_error(c, "tensor 'x.weight': already registered");
    float outside[8];
    rlb_tensor_desc o = full2("w.weight", 2, 4, outside);
    assert_int_equal(rlb_register(c, &o, 1), RLB_EINVAL);
    expect_error(c, "tensor 'w.weight': its 32 bytes at");
    expect_error(c, "do not lie inside one rlb_alloc_host allocation");
    o = full2("w.weight", 2, 4, a + 1020); /* runs 28 bytes past the allocation */
    o.shape[1] = 6;
    assert_int_equal(rlb_register(c, &o, 1), RLB_EINVAL);
    expect_error(c, "tensor 'w.weight': its 48 bytes at");
    o = full2("w.weight", 2, 4, a + 700);
    o.ndim = 9;
    assert_int_equal(rlb_register(c, &o, 1), RLB_ESHAPE);
    expect_error(c, "tensor 'w.weight': ndim 9 is outside 1..8");
    o = full2("w.weight", 2, 4, a + 700);
    o.dtype = RLB_DTYPE_I32;
    assert_int_equal(rlb_register(c, &o, 1), RLB_EDTYPE);
    expect_error(c, "tensor 'w.weight': dtype 5: weights are F32, BF16 or F16");
    rlb_tensor_desc two[2] = {full2("w.weight", 2, 4, a + 700), full2("w.weight", 2, 4, a + 800)};
    assert_int_equal(rlb_register(c, two, 2), RLB_EEXIST);
    expect_error(c, "tensor 'w.weight' appears twice in the batch");
    two[1].struct_size = offsetof(rlb_tensor_desc, device);
    assert_int_equal(rlb_register(c, two, 2), RLB_EINVAL);
    expect_error(c, "tensor 1 has another struct_size than tensor 0");
    two[0].struct_size = 12;
    assert_int_equal(rlb_register(c, two, 1), RLB_EVERSION);
    expect_error(c, "rlb_tensor_desc.struct_size is 12");
    assert_int_equal(rlb_register(c, two, 0), RLB_EINVAL);
    expect_error(c, "rlb_register needs 1 or more tensors");
    /* Adapter declarations the library refuses itself, naming the field. */
    rlb_lora_desc ld = RLB_LORA_DESC_INIT;
    assert_int_equal(rlb_register_lora(c, &ld, 1), RLB_EINVAL);
    expect_error(c, "adapter 0: target is NULL");
    ld.target = "model.layers.0.self_attn.q_proj.weight";
    assert_int_equal(rlb_register_lora(c, &ld, 1), RLB_EINVAL);
    expect_error(c, "adapter 0: rank is 0");
    ld.rank = 4;
    ld.alpha = INFINITY;
    assert_int_equal(rlb_register_lora(c, &ld, 1), RLB_EINVAL);
    expect_error(c, "adapter 0: alpha is not finite");
    ld.alpha = 8;
    ld.target = "model..q_proj.weight";
    assert_int_equal(rlb_register_lora(c, &ld, 1), RLB_EINVAL);
    expect_error(c, "adapter 0: 'model..q_proj.weight' has an empty segment");
    const char *targets[2] = {"model.norm.weight", "q.lora_magnitude_vector.default.weight"};
    assert_int_equal(rlb_unregister_lora(c, targets, 2), RLB_EUNSUPPORTED);
    expect_error(c, "target 1: 'q.lora_magnitude_vector.default.weight': DoRA's");
    targets[1] = NULL;
    assert_int_equal(rlb_unregister_lora(c, targets, 2), RLB_EINVAL);
    expect_error(c, "target 1 is NULL");
    /* A descriptor compiled before `device` was appended is host memory; an unknown
     * device is refused; without a usable NVIDIA driver a device tensor is refused with
     * RLB_EUNSUPPORTED saying so (tests/gpu/test_client_cuda covers the GPU side). */
    rlb_tensor_desc v1 = full2("v1.weight", 2, 4, a + 700);
    v1.struct_size = offsetof(rlb_tensor_desc, device);
    assert_int_equal(rlb_register(c, &v1, 1), 0);
    assert_int_equal(rlb_unregister(c, &v1.name, 1), 0);
    o = full2("w.weight", 2, 4, a + 700);
    o.device = (rlb_device)7;
    assert_int_equal(rlb_register(c, &o, 1), RLB_EINVAL);
    expect_error(c, "tensor 'w.weight': device 7 is not CPU or CUDA");
    void *driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!driver) {
        o.device = RLB_DEVICE_CUDA;
        assert_int_equal(rlb_register(c, &o, 1), RLB_EUNSUPPORTED);
        assert_non_null(strstr(rlb_last_error(c), "w.weight"));
        assert_non_null(strstr(rlb_last_error(c), "NVIDIA driver"));
    } else {
        dlclose(driver);
    }
    /* The bridge refuses a batch: nothing of it stays registered. */
    rlb_tensor_desc pair[2] = {full2("w.weight", 2, 4, a + 512), full2("bad.weight", 2, 4, a + 600)};
    assert_int_equal(rlb_register(c, pair, 2), RLB_ESHAPE);
    assert_non_null(strstr(rlb_last_error(c), "fake: shape of bad.weight"));
    assert_int_equal(rlb_register(c, pair, 1), 0);

    /* publish: the fake reads each tensor's first float through its own mapping. */
    a[0] = a[32] = b[0] = b[8] = a[512] = 1.0f;
    rlb_sync_stats st = {.struct_size = sizeof(st)};
    assert_int_equal(rlb_publish(c, 1, &st), 0);
    assert_int_equal(st.version, 1);
    assert_int_equal(st.bytes, 128 + 24 + 32 + 12 + 32);
    assert_true(st.ms == 2.0);
    assert_int_equal(rlb_weight_version(c), 1);
    /* The fake sees the new bytes without any copy. */
    a[0] = a[32] = b[0] = b[8] = a[512] = 2.0f;
    assert_int_equal(rlb_publish(c, 2, NULL), 0);
    a[0] = b[0] = b[8] = a[512] = 4.0f;
    a[32] = 5.0f; /* one tensor was not updated */
    assert_int_equal(rlb_publish(c, 4, &st), RLB_EABORTED);
    assert_non_null(strstr(rlb_last_error(c), "y.weight holds 5"));

    a[0] = a[32] = b[0] = b[8] = a[512] = 3.0f;
    assert_int_equal(rlb_publish(c, ABORTED_VERSION, &st), RLB_EABORTED);
    assert_non_null(strstr(rlb_last_error(c), "fake: rank 1 died"));
    assert_int_equal(rlb_weight_version(c), 2);
    assert_int_equal(rlb_publish(c, 0, NULL), RLB_EINVAL);
    st.struct_size = 3;
    assert_int_equal(rlb_publish(c, 5, &st), RLB_EVERSION);

    rlb_client_stats cs = {.struct_size = sizeof(cs)};
    assert_int_equal(rlb_client_stats_get(c, &cs), 0);
    assert_int_equal(cs.publishes, 4);
    assert_int_equal(cs.synced, 2);
    assert_int_equal(cs.aborted, 2);
    assert_int_equal(cs.bytes_synced, 2 * 228);
    assert_int_equal(cs.tensors, 5);
    assert_int_equal(cs.host_bytes, 4096 + 100);

    /* Memory with tensors in it cannot be freed; after unregister it can. */
    assert_int_equal(rlb_free_host(c, b), RLB_EEXIST);
    assert_int_equal(rlb_free_host(c, b + 1), RLB_EINVAL);
    const char *names[2] = {"z.weight", "unit0"};
    const char *missing[1] = {"nope"};
    assert_int_equal(rlb_unregister(c, missing, 1), RLB_ENOTFOUND);
    assert_int_equal(rlb_unregister(c, names, 2), 0);
    pthread_mutex_lock(&F.lock);
    assert_int_equal(F.n_reg, 3);
    pthread_mutex_unlock(&F.lock);
    assert_int_equal(rlb_free_host(c, b), 0);
    assert_int_equal(rlb_unregister(c, NULL, 0), 0);
    pthread_mutex_lock(&F.lock);
    assert_int_equal(F.n_reg, 0);
    pthread_mutex_unlock(&F.lock);
    assert_int_equal(rlb_free_host(c, a), 0);
    assert_int_equal(rlb_free_host(c, NULL), 0);

    rlb_stat_list *l;
    assert_int_equal(rlb_bridge_stats(c, &l), 0);
    double v;
    assert_int_equal(rlb_stat_list_size(l), 2);
    assert_int_equal(rlb_stat_list_find(l, "committed", &v), 0);
    assert_true(v == 2.0);
    assert_int_equal(rlb_stat_list_find(l, "nope", &v), RLB_ENOTFOUND);
    const char *name;
    assert_int_equal(rlb_stat_list_get(l, 0, &name, &v), 0);
    assert_string_equal(name, "tensors");
    assert_int_equal(rlb_stat_list_get(l, 2, &name, &v), RLB_EINVAL);
    rlb_stat_list_free(l);
    rlb_close(c);
}

static void test_generate(void **state)
{
    rlb_client *c = connect_default();
    int32_t t0[3] = {5, 6, 7}, t1[1] = {40};
    rlb_prompt prompts[2] = {{t0, 3}, {t1, 1}};
    rlb_sampling_params sp;
    rlb_sampling_params_init(&sp);
    sp.n = 3;
    sp.max_tokens = 4;
    sp.logprobs = 0;
    sp.seed = 42;
    rlb_generate_request req;
    rlb_generate_request_init(&req);
    req.prompts = prompts;
    req.n_prompts = 2;
    req.sampling = &sp;
    rlb_result *r = NULL;
    assert_int_equal(rlb_generate(c, &req, 5000, &r), 0);
    check_result(r, prompts, 2, 3, 4, 1, 0);
    rlb_result_free(r);

    /* Asynchronous: two tickets collected in the other order; poll never blocks. */
    sp.logprobs = -1;
    rlb_ticket a, b;
    assert_int_equal(rlb_generate_submit(c, &req, &a), 0);
    sp.n = 1;
    assert_int_equal(rlb_generate_submit(c, &req, &b), 0);
    assert_int_not_equal(a, b);
    int rc;
    while ((rc = rlb_generate_poll(c, b, &r)) == RLB_EAGAIN)
        usleep(1000);
    assert_int_equal(rc, 0);
    check_result(r, prompts, 2, 1, 4, 0, 0);
    rlb_result_free(r);
    assert_int_equal(rlb_generate_wait(c, a, 5000, &r), 0);
    check_result(r, prompts, 2, 3, 4, 0, 0);
    rlb_result_free(r);
    assert_int_equal(rlb_generate_wait(c, a, 100, &r), RLB_ENOTFOUND); /* spent */

    /* A result far larger than the 64 KiB ring arrives whole. */
    sp.max_tokens = 100000;
    sp.logprobs = 0;
    assert_int_equal(rlb_generate(c, &req, 10000, &r), 0);
    check_result(r, prompts, 2, 1, 100000, 1, 0);
    rlb_result_free(r);

    /* An error tied to the request. */
    sp.max_tokens = 2;
    req.min_weight_version = 9;
    assert_int_equal(rlb_generate(c, &req, 5000, &r), RLB_ESTALE);
    assert_null(r);
    assert_non_null(strstr(rlb_last_error(c), "fake: no weights that new yet"));
    req.min_weight_version = 0;

    /* A malformed message from the bridge is dropped; the request still completes. */
    int32_t g[1] = {TOKEN_GARBAGE};
    rlb_prompt gp = {g, 1};
    req.prompts = &gp;
    req.n_prompts = 1;
    assert_int_equal(rlb_generate(c, &req, 5000, &r), 0);
    check_result(r, &gp, 1, 1, 2, 1, 0);
    rlb_result_free(r);

    rlb_client_stats cs = {.struct_size = sizeof(cs)};
    assert_int_equal(rlb_client_stats_get(c, &cs), 0);
    assert_int_equal(cs.requests, 5);
    assert_int_equal(cs.samples, 6 + 2 + 6 + 2 + 1);
    assert_int_equal(cs.tokens, 6 * 4 + 2 * 4 + 6 * 4 + 2 * 100000 + 2);
    rlb_close(c);
}

static void test_generate_refusals(void **state)
{
    rlb_client *c = connect_default();
    int32_t t[2] = {1, 2};
    rlb_prompt p = {t, 2};
    rlb_sampling_params sp;
    rlb_generate_request req;
    rlb_generate_request_init(&req);
    req.prompts = &p;
    req.n_prompts = 1;
    req.sampling = &sp;
    rlb_ticket tk = 99;
#define CASE(body, want)                                                                 \
    do {                                                                                 \
        rlb_sampling_params_init(&sp);                                                   \
        body;                                                                            \
        assert_int_equal(rlb_generate_submit(c, &req, &tk), want);                       \
        assert_int_equal(tk, 0);                                                         \
    } while (0)
    CASE(sp.n = 0, RLB_EINVAL);
    CASE(sp.temperature = -0.5f, RLB_EINVAL);
    CASE(sp.temperature = 1.0f / 0.0f, RLB_EINVAL);
    CASE(sp.top_p = 0, RLB_EINVAL);
    CASE(sp.top_p = 1.5f, RLB_EINVAL);
    CASE(sp.top_k = -2, RLB_EINVAL);
    CASE(sp.seed = -3, RLB_EINVAL);
    CASE(sp.max_tokens = 0, RLB_EINVAL);
    CASE(sp.n_stop_token_ids = 2, RLB_EINVAL);
    CASE(sp.logprobs = 5, RLB_EUNSUPPORTED);
    CASE(sp.logprobs = -2, RLB_EINVAL);
    CASE(sp.struct_size = 8, RLB_EVERSION);
    CASE(p.n_tokens = 0, RLB_EINVAL);
    p.n_tokens = 2;
    CASE(t[1] = -4, RLB_EINVAL);
    t[1] = 2;
    CASE(req.n_prompts = 0, RLB_EINVAL);
    req.n_prompts = 1;
    CASE(req.struct_size = 0, RLB_EVERSION);
#undef CASE
    req.struct_size = sizeof(req);
    rlb_result *r = (rlb_result *)0x1;
    assert_int_equal(rlb_generate_poll(c, 12345, &r), RLB_ENOTFOUND);
    assert_null(r);
    /* NULL sampling = defaults: 1 sample of 16 tokens. */
    req.sampling = NULL;
    assert_int_equal(rlb_generate(c, &req, 5000, &r), 0);
    check_result(r, &p, 1, 1, 16, 0, 0);
    rlb_result_free(r);
    rlb_close(c);
}

/* Several threads generate while the main thread publishes: every result is complete and
 * carries a version the fake had committed. */
typedef struct gen_thread {
    rlb_client *c;
    int32_t first; /* first prompt token, distinct per thread */
    int failures;  /* results that did not match */
} gen_thread;

static void *generate_loop(void *arg)
{
    gen_thread *g = arg;
    int32_t t[2] = {g->first, 0};
    rlb_prompt p = {t, 2};
    rlb_sampling_params sp;
    rlb_sampling_params_init(&sp);
    sp.n = 2;
    sp.max_tokens = 3;
    rlb_generate_request req;
    rlb_generate_request_init(&req);
    req.prompts = &p;
    req.n_prompts = 1;
    req.sampling = &sp;
    for (int it = 0; it < 30; it++) {
        rlb_result *r = NULL;
        if (rlb_generate(g->c, &req, 10000, &r) != 0) {
            g->failures++;
            continue;
        }
        for (uint32_t i = 0; i < 2; i++) {
            const rlb_sample *s = rlb_result_sample(r, i);
            if (s->index != i || s->n_tokens != 3 || s->tokens[2] != g->first + 100 * (int)i + 2 ||
                s->weight_version > 10)
                g->failures++;
        }
        rlb_result_free(r);
    }
    return NULL;
}

static void test_threads(void **state)
{
    rlb_client *c = connect_default();
    float *w;
    assert_int_equal(rlb_alloc_host(c, 64, (void **)&w), 0);
    rlb_tensor_desc d = full2("w", 4, 4, w);
    assert_int_equal(rlb_register(c, &d, 1), 0);
    gen_thread g[3];
    pthread_t th[3];
    for (int i = 0; i < 3; i++) {
        g[i] = (gen_thread){.c = c, .first = 10000 * (i + 1)};
        assert_int_equal(pthread_create(&th[i], NULL, generate_loop, &g[i]), 0);
    }
    for (uint64_t v = 4; v <= 10; v++) {
        w[0] = (float)v;
        assert_int_equal(rlb_publish(c, v, NULL), 0);
    }
    for (int i = 0; i < 3; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(g[i].failures, 0);
    }
    assert_int_equal(rlb_weight_version(c), 10);
    rlb_close(c);
}

/* The bridge dies with a request in flight: the waiter learns it at once, and so does
 * every later call. */
static void test_bridge_dies(void **state)
{
    rlb_client *c = connect_default();
    int32_t t[1] = {TOKEN_ABORT_CONN};
    rlb_prompt p = {t, 1};
    rlb_generate_request req;
    rlb_generate_request_init(&req);
    req.prompts = &p;
    req.n_prompts = 1;
    rlb_result *r = NULL;
    int64_t t0 = rlb__clock_ms();
    assert_int_equal(rlb_generate(c, &req, -1, &r), RLB_EPEERDEAD);
    assert_true(rlb__clock_ms() - t0 < 2000);
    assert_non_null(strstr(rlb_last_error(c), "lost"));
    assert_int_equal(rlb_publish(c, 11, NULL), RLB_EPEERDEAD);
    rlb_ticket tk;
    assert_int_equal(rlb_generate_submit(c, &req, &tk), RLB_EPEERDEAD);
    rlb_close(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_register_publish, fake_start, fake_stop),
        cmocka_unit_test_setup_teardown(test_generate, fake_start, fake_stop),
        cmocka_unit_test_setup_teardown(test_generate_refusals, fake_start, fake_stop),
        cmocka_unit_test_setup_teardown(test_threads, fake_start, fake_stop),
        cmocka_unit_test_setup_teardown(test_bridge_dies, fake_start, fake_stop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
