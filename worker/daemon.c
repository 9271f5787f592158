/* daemon.c: the rlb-worker daemon (daemon.h).
 *
 * Lockstep. The TP ranks of a replica must make the same engine calls at the same step
 * boundaries (engine.h), but each rank reads the bridge's commands from its own ring, so
 * at a given moment one rank may have received a command another has not yet. Commands
 * are therefore queued, and before each step the ranks all-gather how many commands each
 * has queued and apply the smallest count: the bridge sends every rank the same commands
 * in the same order, so every rank applies the same prefix. A rank joins that exchange
 * whenever it has queued commands or unfinished requests; ranks without either wait on
 * their ring, and receive the same command moments later. TP size 1 skips the exchange.
 *
 * Versions. A load(v) is applied only once no request is unfinished (in pause mode the
 * bridge drained generation already; in staged mode the requests running on v-1 finish
 * first and requests that arrived after the load wait behind it), so every sample is
 * generated with one buffer's weights and stamped with that buffer's version. Sleep and
 * wake are not held behind a waiting load (a request the sleep preempted finishes only
 * after the wake). In staged mode a load names the buffer to serve from (the one the
 * bridge just wrote, or, after an aborted sync, the one still holding the committed
 * version): the engine switches to it with set_weights, post-load processing running on
 * it before the switch, never recreating the engine. In pause mode a load re-runs
 * post-load processing in place.
 *
 * Results. A generate with P prompts becomes P engine requests; when all are done, TP
 * rank 0 sends one RESULT holding every sample (whole, fragmented by the ring as needed);
 * the other ranks drop theirs. Every rank answers each load with loaded (or, for a load it
 * cannot decode, an ERROR in reply to it).
 *
 * Failures. What goes wrong with one request (a refused prompt, an engine step that fails,
 * a result that cannot be sent) fails that request, or the step's batch, with an ERROR
 * naming the cause; the worker goes on serving. A load that fails (post-load processing
 * or the switch to the new buffer) is answered with its error and the worker goes on
 * serving the version it served. It exits only when the bridge is gone or it cannot hold
 * an engine at all.
 */
#include "worker/daemon.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/check.h"
#include "common/conn.h"
#include "common/env.h"
#include "common/log.h"
#include "common/proto.h"
#include "common/segmsg.h"
#include "common/shm.h"
#include "model/config.h"
#include "worker/backends.h"
#include "worker/engine.h"
#include "worker/loader.h"

/* Waits of the worker, from the knob table (common/env.h). */
#define WK_IDLE_WAIT_MS rlb__env_positive(RLB_KNOB_WAIT_SLICE_MS) /* on the ring, when idle */
#define WK_SEND_TIMEOUT_MS rlb__env_positive(RLB_KNOB_WORKER_SEND_TIMEOUT_MS)
#define WK_CONNECT_TIMEOUT_MS rlb__env_positive(RLB_KNOB_CONNECT_TIMEOUT_MS)
#define WK_MAX_MSG (1u << 30)     /* largest command accepted */

/* A command from the bridge, queued until the TP ranks agree to apply it. */
typedef struct wk_cmd {
    struct wk_cmd *next;
    uint32_t type;   /* its ring record type (rlb_msg_type) */
    size_t len;      /* bytes of the encoded message */
    uint8_t data[];  /* the message as received */
} wk_cmd;

/* A generate request in the engine: prompts p run as engine ids eid0 + p. */
typedef struct wk_gen {
    uint64_t bid;            /* the bridge's request id */
    uint64_t eid0;           /* engine id of prompt 0 */
    uint32_t n_prompts;      /* prompts (engine requests) */
    uint32_t remaining;      /* engine requests not popped yet */
    int failed;              /* refused half-way: results are dropped, the error was sent */
    int logprobs;            /* samples carry logprobs */
    rlb_gen_result **res;    /* [n_prompts] popped results */
} wk_gen;

typedef struct wk {
    const rlb_worker_opts *o;
    uint32_t tp_size, replicas;
    rlb_model_config cfg;
    rlb_tp_layout layout;
    rlb_conn *conn;
    rlb_ring_rx rx;          /* reassembly of fragmented commands */
    int staged;              /* the bridge runs in staged mode: two weight buffers */
    void *buf[2];            /* CPU: the weight buffers (mapped segments) */
    const void *weights[2];  /* what the engine binds for buffer i: buf[i] (CPU), or the
                                backend's device buffer i (GPU) */
    int active;              /* which one the engine reads */
    uint64_t version;        /* version the active buffer holds (0 = initial weights) */
    void *tp_mem;            /* CPU TP communicator region (tp_size > 1) */
    size_t tp_bytes;
    rlb_tp_comm *comm;
    rlb_engine_opts eopts;
    rlb_backend_choice choice; /* the backend, resolved */
    rlb_ebackend *gpu;       /* the CUDA backend until the engine owns it; NULL on the CPU */
    uint8_t uuid[16];        /* the GPU's uuid (CUDA) */
    rlb_engine *engine;
    int asleep;
    wk_cmd *head, *tail;     /* queued commands */
    uint32_t n_cmds;
    wk_gen *gens;            /* requests in the engine */
    uint32_t n_gens, cap_gens;
    uint64_t next_eid;       /* engine request ids, from 1 */
    void *pack;              /* encoding buffer */
    size_t pack_cap;
} wk;

/* ---- Messages ------------------------------------------------------------------------ */

static int wk_send(wk *w, const rlb_msg *m)
{
    size_t size, len;
    int rc = rlb__msg_packed_size(m, &size);
    if (rc < 0)
        return rc;
    if (size > w->pack_cap) {
        void *grown = realloc(w->pack, size);
        if (!grown)
            return RLB_ENOMEM;
        w->pack = grown;
        w->pack_cap = size;
    }
    RLB_CHECK(rlb__msg_pack(m, w->pack, size, &len));
    return rlb__ring_send(rlb__conn_tx(w->conn), m->type, w->pack, len, WK_SEND_TIMEOUT_MS);
}

/* Sends an ERROR about request bid (0 = none) in reply to a message of `type`. TP rank 0
 * speaks for the replica, except about a load: every rank answers each load it was sent
 * (the bridge counts the answers). */
static void wk_error(wk *w, int code, uint64_t bid, uint32_t type, const char *text)
{
    RLB_LOG_WARN(RLB_SUB_WORKER, "%s: %s", rlb__msg_type_name(type), text);
    if (w->o->tp_rank != 0 && type != RLB_MSG_LOAD)
        return;
    rlb_msg m = {.type = RLB_MSG_ERROR,
                 .error = {.code = code, .request_id = bid, .in_reply_to = type, .text = text}};
    wk_send(w, &m);
}

/* Waits up to timeout_ms for a message of `type` during start-up, decoding it into *m
 * (which borrows the ring until rlb__ring_recv_done). An ERROR from the bridge ends the
 * wait with its code. */
static int wait_for(wk *w, uint32_t type, int timeout_ms, rlb_msg *m)
{
    rlb_ring *rx = rlb__conn_rx(w->conn);
    rlb_ring_msg rm;
    char err[256];
    int rc = rlb__ring_recv(rx, &w->rx, timeout_ms, &rm);
    if (rc < 0)
        return rc;
    if ((rc = rlb__msg_decode(rm.data, rm.len, m, err, sizeof(err))) < 0) {
        RLB_LOG_ERROR(RLB_SUB_WORKER, "bad message from the bridge: %s", err);
        return rc;
    }
    if (m->type == RLB_MSG_ERROR) {
        RLB_LOG_ERROR(RLB_SUB_WORKER, "the bridge refused us: %s", m->error.text);
        rc = m->error.code < 0 ? m->error.code : RLB_EPROTO;
        rlb__msg_free(m);
        return rc;
    }
    if (m->type != type) {
        RLB_LOG_ERROR(RLB_SUB_WORKER, "expected %s from the bridge, got %s",
                      rlb__msg_type_name(type), rlb__msg_type_name(m->type));
        rlb__msg_free(m);
        return RLB_EPROTO;
    }
    return 0;
}

/* ---- Start-up ------------------------------------------------------------------------ */

/* Asks the bridge for its stats and reads the sync mode from them. */
static int learn_mode(wk *w)
{
    rlb_msg q = {.type = RLB_MSG_STATS, .stats = {.request_id = 1}}, m;
    RLB_CHECK(wk_send(w, &q));
    RLB_CHECK(wait_for(w, RLB_MSG_STATS_REPLY, WK_CONNECT_TIMEOUT_MS, &m));
    for (uint32_t i = 0; i < m.stats_reply.n_stats; i++)
        if (!strcmp(m.stats_reply.stats[i].name, "staged"))
            w->staged = m.stats_reply.stats[i].value != 0;
    rlb__msg_free(&m);
    rlb__ring_recv_done(rlb__conn_rx(w->conn), &w->rx);
    return 0;
}

/* Creates weight buffer i (memfd "rlb-weights-<i>") and passes it to the bridge as segment
 * id. */
static int make_buffer(wk *w, int i, uint32_t id)
{
    int fd, rc;
    size_t bytes = (size_t)w->layout.total_bytes;
    char name[32];
    snprintf(name, sizeof(name), "rlb-weights-%d", i);
    RLB_CHECK(rlb__shm_create(bytes, name, &fd));
    rc = rlb__shm_map(fd, bytes, &w->buf[i]);
    w->weights[i] = w->buf[i];
    if (rc == 0) {
        rlb__seg_msg sm = {.magic = RLB_SEG_MAGIC, .id = id, .bytes = bytes};
        rc = rlb__conn_send_fds(w->conn, &sm, sizeof(sm), &fd, 1);
    }
    close(fd);
    return rc;
}

/* The GPU path of start-up: the CUDA backend over the checkpoint's weights (zeros for a
 * model whose weights come with the first sync), each of its device weight buffers (two
 * for staged syncs) passed to the bridge as a VMM segment. */
static int open_gpu(wk *w, const char *dir, char *err, size_t errlen)
{
    w->choice.weight_buffers = w->staged ? 2 : 1;
    void *host = calloc(1, (size_t)w->layout.total_bytes);
    if (!host)
        return snprintf(err, errlen, "no host memory to stage %llu weight bytes",
                        (unsigned long long)w->layout.total_bytes), RLB_ENOMEM;
    int rc = dir ? rlb__load_weights(dir, &w->layout, host, w->o->threads, err, errlen) : 0;
    uint64_t budget = 0;
    if (rc == 0)
        rc = rlb__backend_open(&w->layout, host, NULL, &w->choice, &w->gpu, &budget, err,
                               errlen);
    free(host);
    if (rc < 0)
        return rc;
    if (!w->o->kv_bytes) {
        if (budget == 0)
            return snprintf(err, errlen, "no device memory is left for the KV cache at "
                            "gpu_memory_utilization %.2f", w->choice.gpu_memory_utilization),
                   RLB_ENOMEM;
        w->eopts.kv_bytes = budget;
    }
    for (int i = 0; i < w->choice.weight_buffers; i++) {
        int fd = -1;
        uint64_t bytes = 0;
        if ((rc = rlb__backend_export_weights(w->gpu, &w->choice, i, &fd, &bytes,
                                              w->uuid)) < 0)
            return snprintf(err, errlen, "cannot export device weight buffer %d: %s", i,
                            rlb_strerror(rc)), rc;
        /* One chunk: the segment header followed by its size (segmsg.h). */
        struct {
            rlb__seg_msg sm;
            uint64_t chunk;
        } m = {{.magic = RLB_SEG_MAGIC_VMM, .id = RLB_SEG_ID_WEIGHTS + (uint32_t)i,
                .bytes = bytes}, bytes};
        rc = rlb__conn_send_fds(w->conn, &m, sizeof(m), &fd, 1);
        close(fd);
        if (rc < 0)
            return rc;
        w->weights[i] = rlb__backend_weight_buffer(w->gpu, i);
    }
    return 0;
}

/* Maps the TP communicator the bridge passed and attaches our rank. */
static int join_tp(wk *w)
{
    if (w->tp_size == 1)
        return rlb__tp_comm_local(&w->comm);
    rlb__seg_msg sm;
    size_t len = 0;
    int fd = -1, nfds = 0;
    int rc = rlb__conn_recv_fds(w->conn, &sm, sizeof(sm), &len, &fd, 1, &nfds,
                                (int)rlb__env_int(RLB_KNOB_PEER_TIMEOUT_MS));
    if (rc < 0)
        return rc;
    rc = RLB_EPROTO;
    if (nfds == 1 && len == sizeof(sm) && sm.magic == RLB_SEG_MAGIC &&
        sm.id == RLB_SEG_ID_BRIDGE + w->o->replica) {
        w->tp_bytes = (size_t)sm.bytes;
        rc = rlb__shm_map(fd, w->tp_bytes, &w->tp_mem);
    }
    if (nfds == 1)
        close(fd);
    if (rc < 0) {
        RLB_LOG_ERROR(RLB_SUB_WORKER, "no usable TP communicator from the bridge");
        return rc;
    }
    return rlb__tp_comm_shm_attach(w->tp_mem, w->tp_bytes, (int)w->o->tp_rank, 0, &w->comm);
}

static int start(wk *w)
{
    const rlb_worker_opts *o = w->o;
    char err[256] = "";
    int rc;
    const char *dir = o->cfg ? NULL : o->model_dir;
    if (o->cfg)
        w->cfg = *o->cfg;
    else if (dir)
        RLB_CHECK_GOTO(rlb__config_load_dir(dir, &w->cfg, err, sizeof(err)), rc, fail);
    else
        rlb__config_tiny(&w->cfg);
    int gpu = w->choice.device == RLB_DEVICE_CUDA;
    RLB_CHECK_GOTO(rlb__tp_layout_init(&w->layout, &w->cfg, (int)w->tp_size, (int)o->tp_rank,
                                       rlb__backend_weight_dtype(&w->choice)), rc, fail);
    RLB_CHECK_GOTO(rlb__conn_connect(o->socket_path, WK_CONNECT_TIMEOUT_MS, &w->conn), rc, fail);
    RLB_CHECK_GOTO(learn_mode(w), rc, fail);
    if (gpu) {
        RLB_CHECK_GOTO(open_gpu(w, dir, err, sizeof(err)), rc, fail);
    } else {
        RLB_CHECK_GOTO(make_buffer(w, 0, RLB_SEG_ID_WEIGHTS), rc, fail);
        if (w->staged)
            RLB_CHECK_GOTO(make_buffer(w, 1, RLB_SEG_ID_WEIGHTS_B), rc, fail);
        if (dir)
            RLB_CHECK_GOTO(rlb__load_weights(dir, &w->layout, w->buf[0], o->threads, err,
                                             sizeof(err)), rc, fail);
    }
    rlb_msg hello = {.type = RLB_MSG_HELLO,
                     .hello = {.abi_version = RLB_ABI_VERSION, .role = RLB_ROLE_WORKER,
                               .rank = o->replica * w->tp_size + o->tp_rank,
                               .world = w->replicas * w->tp_size, .replica = o->replica,
                               .tp_rank = o->tp_rank, .tp_size = w->tp_size,
                               .device = gpu ? RLB_DEVICE_CUDA : RLB_DEVICE_CPU,
                               .weight_dtype = w->layout.dtype, .has_weights = dir != NULL}};
    memcpy(hello.hello.device_uuid, w->uuid, sizeof(w->uuid));
    RLB_CHECK_GOTO(wk_send(w, &hello), rc, fail);
    rlb_msg m;
    RLB_CHECK_GOTO(wait_for(w, RLB_MSG_WELCOME, WK_CONNECT_TIMEOUT_MS, &m), rc, fail);
    w->version = 0; /* the buffer holds the initial weights until a load */
    rlb__msg_free(&m);
    rlb__ring_recv_done(rlb__conn_rx(w->conn), &w->rx);
    RLB_CHECK_GOTO(join_tp(w), rc, fail);
    if (gpu) {
        /* TP > 1: the group's NCCL communicator, through the one the bridge just passed */
        RLB_CHECK_GOTO(rlb__backend_join_tp(w->gpu, w->comm, err, sizeof(err)), rc, fail);
        rlb_ebackend *b = w->gpu;
        w->gpu = NULL; /* the engine owns it from here on, also when creation fails */
        RLB_CHECK_GOTO(rlb__engine_create_on(b, &w->eopts, &w->engine), rc, fail);
    } else {
        RLB_CHECK_GOTO(rlb__engine_create(&w->layout, w->buf[0], w->comm, &w->eopts,
                                          &w->engine), rc, fail);
    }
    RLB_LOG_INFO(RLB_SUB_WORKER, "replica %u TP rank %u of %u ready on %s: %s, %llu weight "
                 "bytes of %s%s", o->replica, o->tp_rank, w->tp_size, gpu ? "cuda" : "cpu",
                 dir ? dir : o->cfg ? "given model" : "tiny model",
                 (unsigned long long)w->layout.total_bytes, rlb_dtype_name(w->layout.dtype),
                 w->staged ? " x2 (staged sync)" : "");
    return 0;
fail:
    RLB_LOG_ERROR(RLB_SUB_WORKER, "start-up failed: %s%s%s", rlb_strerror(rc), *err ? ": " : "",
                  err);
    return rc;
}

/* ---- Commands ------------------------------------------------------------------------ */

static int queue_cmd(wk *w, uint32_t type, const void *data, size_t len)
{
    wk_cmd *c = malloc(sizeof(*c) + len);
    if (!c)
        return RLB_ENOMEM;
    c->next = NULL;
    c->type = type;
    c->len = len;
    memcpy(c->data, data, len);
    if (w->tail)
        w->tail->next = c;
    else
        w->head = c;
    w->tail = c;
    w->n_cmds++;
    return 0;
}

/* Removes the command after `prev` (the head when prev is NULL). */
static void unlink_cmd(wk *w, wk_cmd *prev)
{
    wk_cmd *c = prev ? prev->next : w->head;
    if (prev)
        prev->next = c->next;
    else
        w->head = c->next;
    if (w->tail == c)
        w->tail = prev;
    w->n_cmds--;
    free(c);
}

static void pop_cmd(wk *w)
{
    unlink_cmd(w, NULL);
}

/* Copies a little-endian int32 array out of a message (bins are unaligned). */
static int32_t *copy_ids(const void *src, uint32_t n)
{
    int32_t *ids = malloc((n ? n : 1) * sizeof(*ids));
    for (uint32_t i = 0; ids && i < n; i++)
        ids[i] = rlb__msg_i32(src, i);
    return ids;
}

/* Adds prompt p of g to the engine as request eid. */
static int add_prompt(wk *w, const rlb_msg_generate *g, uint32_t p, uint64_t eid)
{
    const rlb_msg_prompt *pr = &g->prompts[p];
    const rlb_msg_sampling *sp = pr->sampling ? pr->sampling : &g->sampling;
    int32_t *prompt = copy_ids(pr->tokens, pr->n_tokens);
    int32_t *stop = copy_ids(sp->stop, sp->n_stop);
    int rc = RLB_ENOMEM;
    if (prompt && stop) {
        rlb_gen_request req = {
            .id = eid, .prompt = prompt, .prompt_len = pr->n_tokens, .n = (int32_t)sp->n,
            .max_tokens = (int32_t)sp->max_tokens,
            .sampling = {.temperature = sp->temperature, .top_k = (int32_t)sp->top_k,
                         .top_p = sp->top_p, .seed = sp->seed},
            .stop_ids = stop, .n_stop = (int32_t)sp->n_stop, .logprobs = sp->logprobs};
        rc = rlb__engine_add(w->engine, &req);
    }
    free(prompt);
    free(stop);
    return rc;
}

static void apply_generate(wk *w, const rlb_msg_generate *g)
{
    if (w->n_gens == w->cap_gens) {
        uint32_t cap = w->cap_gens ? 2 * w->cap_gens : 16;
        wk_gen *grown = realloc(w->gens, cap * sizeof(*grown));
        if (!grown) {
            wk_error(w, RLB_ENOMEM, g->request_id, RLB_MSG_GENERATE, "out of memory");
            return;
        }
        w->gens = grown;
        w->cap_gens = cap;
    }
    wk_gen x = {.bid = g->request_id, .eid0 = w->next_eid, .n_prompts = g->n_prompts,
                .logprobs = g->sampling.logprobs};
    x.res = calloc(g->n_prompts, sizeof(*x.res));
    if (!x.res) {
        wk_error(w, RLB_ENOMEM, g->request_id, RLB_MSG_GENERATE, "out of memory");
        return;
    }
    w->next_eid += g->n_prompts;
    for (uint32_t p = 0; p < g->n_prompts; p++) {
        int rc = add_prompt(w, g, p, x.eid0 + p);
        if (rc == 0) {
            x.remaining++;
            continue;
        }
        char text[160];
        snprintf(text, sizeof(text), "prompt %u refused by the engine: %s (token ids must be "
                 "below %" PRId64 "; prompt + max_tokens must fit the context and KV cache)",
                 p, rlb_strerror(rc), w->cfg.vocab);
        wk_error(w, rc, g->request_id, RLB_MSG_GENERATE, text);
        for (uint32_t q = 0; q < p; q++)
            rlb__engine_abort(w->engine, x.eid0 + q);
        x.failed = 1;
        break;
    }
    if (x.remaining == 0) {
        free(x.res);
        return;
    }
    w->gens[w->n_gens++] = x;
}

static rlb_msg_finish finish_of(rlb_finish f)
{
    return f == RLB_FINISH_STOP ? RLB_MSG_FINISH_STOP : f == RLB_FINISH_LENGTH
                                                            ? RLB_MSG_FINISH_LENGTH
                                                            : RLB_MSG_FINISH_ABORT;
}

/* Sends g's RESULT (TP rank 0). */
static int send_result(wk *w, const wk_gen *g)
{
    uint32_t n = 0;
    for (uint32_t p = 0; p < g->n_prompts; p++)
        n += (uint32_t)g->res[p]->n;
    rlb_msg_sample *s = calloc(n ? n : 1, sizeof(*s));
    if (!s)
        return RLB_ENOMEM;
    uint32_t k = 0;
    for (uint32_t p = 0; p < g->n_prompts; p++)
        for (int32_t i = 0; i < g->res[p]->n; i++, k++) {
            const rlb_gen_sample *gs = &g->res[p]->samples[i];
            s[k] = (rlb_msg_sample){.prompt = p, .index = (uint32_t)i, .tokens = gs->tokens,
                                    .n_tokens = (uint32_t)gs->n_tokens,
                                    .logprobs = gs->logprobs ? gs->logprobs : NULL,
                                    .n_logprobs = gs->logprobs ? (uint32_t)gs->n_tokens : 0,
                                    .finish = finish_of(gs->finish),
                                    .weight_version = w->version};
        }
    rlb_msg m = {.type = RLB_MSG_RESULT,
                 .result = {.request_id = g->bid, .done = true, .n_samples = n, .samples = s}};
    int rc = wk_send(w, &m);
    free(s);
    return rc;
}

/* Takes finished engine requests; sends each generate's result once all its prompts are
 * done. */
static int collect(wk *w)
{
    rlb_gen_result *r;
    while (rlb__engine_pop(w->engine, &r) == 0) {
        uint32_t i = 0;
        while (i < w->n_gens && !(r->id >= w->gens[i].eid0 &&
                                  r->id < w->gens[i].eid0 + w->gens[i].n_prompts))
            i++;
        if (i == w->n_gens) {
            rlb__gen_result_free(r);
            continue;
        }
        wk_gen *g = &w->gens[i];
        g->res[r->id - g->eid0] = r;
        if (--g->remaining)
            continue;
        int rc = !g->failed && w->o->tp_rank == 0 ? send_result(w, g) : 0;
        if (rc < 0 && rc != RLB_EPEERDEAD && rc != RLB_ETIMEDOUT) {
            /* This result alone could not go out (memory, size): its request fails. */
            wk_error(w, rc, g->bid, RLB_MSG_GENERATE, "the result could not be sent");
            rc = 0;
        }
        for (uint32_t p = 0; p < g->n_prompts; p++)
            rlb__gen_result_free(g->res[p]);
        free(g->res);
        memmove(g, g + 1, (w->n_gens - i - 1) * sizeof(*g));
        w->n_gens--;
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* A fresh engine over the active buffer (after a failed step), asleep if the worker is. */
static int renew_engine(wk *w)
{
    rlb__engine_destroy(w->engine);
    w->engine = NULL;
    RLB_CHECK(rlb__engine_create(&w->layout, w->buf[w->active], w->comm, &w->eopts,
                                 &w->engine));
    return w->asleep ? rlb__engine_sleep(w->engine) : 0;
}

/* A step failed (the forward pass, or sampling found no finite logit left): the engine is
 * unusable (engine.h) and the requests of its batch are lost with it. Every unfinished
 * request fails with the step's error, named, and the engine, reset, serves what comes
 * next over the same weights (a CPU worker whose KV pool did not come back whole gets a
 * fresh engine over the same buffer; a GPU worker's backend holds the weights the bridge
 * mapped, so it is never recreated): a per-request failure never ends the worker. Every TP rank
 * fails the same step (the logits are the same on every rank), so they recover in
 * lockstep. Returns 0, or the error of the new engine's creation (fatal). */
static int recover_step(wk *w, int code)
{
    char text[192];
    snprintf(text, sizeof(text), "the engine step running it failed: %s%s", rlb_strerror(code),
             code == RLB_ENONFINITE ? " (every logit was NaN or -inf: are the weights of "
                                      "this version poisoned?)" : "");
    RLB_LOG_WARN(RLB_SUB_WORKER, "%s; failing %u requests and starting a fresh engine", text,
                 w->n_gens);
    for (uint32_t i = 0; i < w->n_gens; i++) {
        wk_gen *g = &w->gens[i];
        if (!g->failed)
            wk_error(w, code, g->bid, RLB_MSG_GENERATE, text);
        for (uint32_t p = 0; p < g->n_prompts; p++)
            rlb__gen_result_free(g->res[p]);
        free(g->res);
    }
    w->n_gens = 0;
    int rc = rlb__engine_reset(w->engine);
    return rc == 0 || w->choice.device == RLB_DEVICE_CUDA ? rc : renew_engine(w);
}

/* Staged: makes the engine read buffer `which` (set_weights runs post-load processing on
 * it first, with no request unfinished). When that fails, the engine is bound to the buffer
 * it served again (post-processed anew from it) and `text` says what happened. Returns 0
 * or the switch's error; *fatal is set when binding the previous buffer again failed too
 * (the worker cannot serve any version then). */
static int switch_buffer(wk *w, int which, int *fatal, char *text, size_t len)
{
    int rc = rlb__engine_set_weights(w->engine, w->weights[which]);
    if (rc == 0) {
        w->active = which;
        return 0;
    }
    int back = rlb__engine_set_weights(w->engine, w->weights[w->active]);
    *fatal = back < 0;
    if (back)
        snprintf(text, len, "switching to weight buffer %d failed: %s, and binding buffer %d "
                 "again failed too: %s", which, rlb_strerror(rc), w->active,
                 rlb_strerror(back));
    else
        snprintf(text, len, "switching to weight buffer %d failed: %s; it serves the previous "
                 "version from buffer %d", which, rlb_strerror(rc), w->active);
    return rc;
}

/* load(version, buffer): serves `version` from weight buffer `which` from now on. Staged:
 * switches to it (nothing to do when it is the active one: a switch back after an aborted
 * sync the worker had not followed). Pause: runs post-load processing again in place.
 * Answers loaded(version, code, the buffer it serves now). Returns 0 or a fatal error. */
static int apply_load(wk *w, uint64_t version, uint32_t which)
{
    char text[256] = "";
    int rc = 0, fatal = 0;
    if (which >= (w->staged ? 2u : 1u)) {
        rc = RLB_EINVAL;
        snprintf(text, sizeof(text), "load names weight buffer %u; this worker has %s",
                 which, w->staged ? "buffers 0 and 1" : "buffer 0 only (pause-mode syncs)");
    } else if (!w->staged) {
        rc = rlb__engine_reload(w->engine);
    } else if ((int)which != w->active) {
        rc = switch_buffer(w, (int)which, &fatal, text, sizeof(text));
    }
    if (rc == 0)
        w->version = version;
    if (rc < 0 && !text[0])
        snprintf(text, sizeof(text), "post-load processing failed: %s", rlb_strerror(rc));
    RLB_LOG_INFO(RLB_SUB_WORKER, "version %" PRIu64 " %s buffer %d%s: %s", version,
                 rc ? "not loaded, serving" : "loaded, serving", w->active,
                 w->staged ? "" : " (in place)", rc ? text : "success");
    rlb_msg m = {.type = RLB_MSG_LOADED,
                 .loaded = {.version = version, .code = rc, .text = rc ? text : NULL,
                            .buffer = (uint32_t)w->active}};
    int src = wk_send(w, &m);
    return fatal ? rc : src;
}

/* Decodes and runs command c. Returns 0, or a fatal error (the worker cannot go on); what
 * fails for this command alone is answered to the bridge. */
static int apply_one(wk *w, const wk_cmd *c)
{
    rlb_msg m;
    char err[256];
    int rc = rlb__msg_decode(c->data, c->len, &m, err, sizeof(err));
    if (rc == 0 && m.type != c->type) {
        snprintf(err, sizeof(err), "a record of type %s holds a %s message",
                 rlb__msg_type_name(c->type), rlb__msg_type_name(m.type));
        rlb__msg_free(&m);
        rc = RLB_EPROTO;
    }
    if (rc < 0) {
        wk_error(w, rc, 0, c->type, err);
        return 0;
    }
    switch (m.type) {
    case RLB_MSG_GENERATE: apply_generate(w, &m.generate); break;
    case RLB_MSG_LOAD: rc = apply_load(w, m.load.version, m.load.buffer); break;
    case RLB_MSG_SLEEP:
        rc = rlb__engine_sleep(w->engine);
        w->asleep = 1;
        RLB_LOG_INFO(RLB_SUB_WORKER, "asleep (KV cache freed)");
        break;
    case RLB_MSG_WAKE:
        rc = rlb__engine_wake(w->engine);
        w->asleep = rc < 0;
        RLB_LOG_INFO(RLB_SUB_WORKER, "awake: %s", rlb_strerror(rc));
        break;
    default:
        RLB_LOG_WARN(RLB_SUB_WORKER, "ignoring a %s message", rlb__msg_type_name(m.type));
        break;
    }
    rlb__msg_free(&m);
    return rc;
}

/* 1 when the command at the head of the queue is a load that must wait: requests that
 * started before it are unfinished. */
static int load_waits(const wk *w)
{
    return w->head && w->head->type == RLB_MSG_LOAD && rlb__engine_busy(w->engine);
}

static int sleep_or_wake(const wk_cmd *c)
{
    return c->type == RLB_MSG_SLEEP || c->type == RLB_MSG_WAKE;
}

/* 1 when apply() can run a queued command now. */
static int can_apply(const wk *w)
{
    if (!load_waits(w))
        return w->head != NULL;
    for (const wk_cmd *c = w->head->next; c; c = c->next)
        if (sleep_or_wake(c))
            return 1;
    return 0;
}

/* Applies the first n queued commands in order. A load waits until no request is
 * unfinished, and what came after it waits behind it, except sleep and wake: requests
 * preempted by a sleep finish only after the wake, so a wake held behind the load would
 * never come. Sleep and wake change only the KV cache, never which weights a request
 * reads, so letting them pass keeps every sample on one version. Every TP rank applies the
 * same prefix to an engine in the same state, so all make the same choice. Returns 0 or a
 * fatal error. */
static int apply(wk *w, uint32_t n)
{
    uint32_t k = 0;
    for (; k < n && !load_waits(w); k++) {
        int rc = apply_one(w, w->head);
        pop_cmd(w);
        RLB_CHECK(rc);
    }
    wk_cmd *prev = w->head;
    for (k++; k < n && prev && prev->next; k++) {
        if (!sleep_or_wake(prev->next)) {
            prev = prev->next;
            continue;
        }
        int rc = apply_one(w, prev->next);
        unlink_cmd(w, prev);
        RLB_CHECK(rc);
    }
    return 0;
}

/* Receives what the bridge sent, waiting up to wait_ms for the first message. Sets
 * *shutdown on a shutdown message. Returns 0 or RLB_EPEERDEAD / a ring error. */
static int receive(wk *w, int wait_ms, int *shutdown)
{
    rlb_ring *rx = rlb__conn_rx(w->conn);
    for (;;) {
        rlb_ring_msg rm;
        int rc = rlb__ring_recv(rx, &w->rx, wait_ms, &rm);
        wait_ms = 0;
        if (rc == RLB_EAGAIN || rc == RLB_ETIMEDOUT)
            return 0;
        if (rc < 0)
            return rc;
        if (rm.type == RLB_MSG_SHUTDOWN)
            *shutdown = 1;
        else
            rc = queue_cmd(w, rm.type, rm.data, rm.len);
        rlb__ring_recv_done(rx, &w->rx);
        if (rc < 0 || *shutdown)
            return rc;
    }
}

/* Commands every TP rank has queued: the smallest queue length over the ranks. */
static int agree(wk *w, uint32_t *n)
{
    *n = w->n_cmds;
    if (w->tp_size == 1)
        return 0;
    float mine = (float)w->n_cmds;
    float all[w->tp_size];
    RLB_CHECK(rlb__tp_allgather(w->comm, &mine, 1, all));
    for (uint32_t r = 0; r < w->tp_size; r++)
        if ((uint32_t)all[r] < *n)
            *n = (uint32_t)all[r];
    return 0;
}

static int serve(wk *w)
{
    const rlb_worker_opts *o = w->o;
    int shutdown = 0;
    while (!(o->stop && *o->stop)) {
        /* The bridge drops a worker whose heartbeat is older than RLB_PEER_TIMEOUT_MS, so
         * every turn beats: one engine step or load must stay well below that bound. */
        rlb__ring_heartbeat(rlb__conn_rx(w->conn));
        rlb__ring_heartbeat(rlb__conn_tx(w->conn));
        int work = rlb__engine_busy(w->engine) && !w->asleep;
        RLB_CHECK(receive(w, work || can_apply(w) ? 0 : WK_IDLE_WAIT_MS, &shutdown));
        if (shutdown) {
            RLB_LOG_INFO(RLB_SUB_WORKER, "shutdown from the bridge");
            return 0;
        }
        if (!work && !w->n_cmds)
            continue;
        uint32_t n;
        RLB_CHECK(agree(w, &n));
        RLB_CHECK(apply(w, n));
        if (rlb__engine_busy(w->engine) && !w->asleep) {
            int rc = rlb__engine_step(w->engine);
            if (rc < 0 && rc != RLB_EAGAIN) {
                RLB_CHECK(collect(w)); /* what finished before the failure still goes out */
                RLB_CHECK(recover_step(w, rc));
            }
        }
        RLB_CHECK(collect(w));
    }
    return 0;
}

static void cleanup(wk *w)
{
    rlb__engine_destroy(w->engine);
    if (w->gpu)
        w->gpu->iface->destroy(w->gpu);
    rlb__tp_comm_destroy(w->comm);
    rlb__shm_unmap(w->tp_mem, w->tp_bytes);
    for (int i = 0; i < 2; i++)
        rlb__shm_unmap(w->buf[i], (size_t)w->layout.total_bytes);
    while (w->head)
        pop_cmd(w);
    for (uint32_t i = 0; i < w->n_gens; i++) {
        for (uint32_t p = 0; p < w->gens[i].n_prompts; p++)
            rlb__gen_result_free(w->gens[i].res[p]);
        free(w->gens[i].res);
    }
    free(w->gens);
    free(w->pack);
    rlb__ring_rx_free(&w->rx);
    rlb__conn_close(w->conn);
    rlb__tp_layout_free(&w->layout);
}

int rlb__worker_run(const rlb_worker_opts *opts)
{
    if (!opts || opts->struct_size < sizeof(*opts) || !opts->socket_path)
        return RLB_EINVAL;
    wk w = {.o = opts, .tp_size = opts->tp_size ? opts->tp_size : 1,
            .replicas = opts->replicas ? opts->replicas : 1, .next_eid = 1,
            .eopts = RLB_ENGINE_OPTS_INIT};
    if (opts->tp_rank >= w.tp_size || opts->replica >= w.replicas)
        return RLB_EINVAL;
    w.rx.max_msg = WK_MAX_MSG;
    w.eopts.quant = opts->quant;
    w.eopts.threads = opts->threads;
    w.choice = (rlb_backend_choice)RLB_BACKEND_CHOICE_INIT;
    w.choice.device = rlb__backend_resolve(opts->device == RLB_DEVICE_AUTO
                                               ? rlb__backend_device_env()
                                               : opts->device);
    w.choice.cuda_device = opts->cuda_device;
    w.choice.dtype = opts->dtype;
    w.choice.quant = opts->quant;
    w.choice.graphs = !opts->no_graphs;
    w.choice.batch_invariant = opts->batch_invariant;
    if (opts->gpu_memory_utilization > 0)
        w.choice.gpu_memory_utilization = opts->gpu_memory_utilization;
    w.choice.max_batch_tokens = 512; /* the engine's defaults (engine.h) */
    w.choice.max_seqs = 256;
    w.eopts.kv_bytes = opts->kv_bytes ? opts->kv_bytes
                       : w.choice.device == RLB_DEVICE_CUDA ? 0 : RLB_WORKER_KV_DEFAULT;
    int rc = start(&w);
    if (rc == 0)
        rc = serve(&w);
    cleanup(&w);
    return rc;
}
