/* loop.c: the bridge's one event loop over every peer, and what it does with each
 * message (hello, stats, sleep/wake, shutdown; the rest goes to registry.c, sync.c and
 * sched.c).
 *
 * Waiting. Messages arrive on rings (shared memory); each ring side sleeps on an eventfd
 * its peer writes when it commits (or frees room) after the sleeper announced its sleep
 * (common/conn.h): no semaphore in memory a peer can write is ever touched. Everything
 * that wakes the bridge is thus an fd: the listener, each peer's socket (segment fds
 * arrive there and it reports a peer's death at once), each peer's two ring eventfds and
 * the copy thread's eventfd. So the loop
 *   - after any activity, keeps polling the rings without sleeping for RLB_SPIN_US
 *     (a burst of messages, a sync's loaded answers, costs no wake-up latency);
 *   - then announces its sleep on every ring (rlb__ring_arm) and blocks in poll() over all
 *     fds until one fires or the next heartbeat check is due.
 * An idle bridge wakes only for its heartbeat checks (RLB_HEARTBEAT_MS).
 *
 * Sending never blocks the loop: see peer.c. A message that fails to decode is answered
 * with an ERROR (rlb__msg_error_reply) and the sender's connection goes on; a message of a
 * type its role may not send is refused the same way.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "bridge/bridge_int.h"
#include "common/atomics.h"
#include "common/env.h"
#include "common/log.h"
#include "common/segmsg.h"
#include "common/shm.h"
#include "common/tp_comm.h"

#define BR_RECV_BUDGET 64   /* messages taken from one peer per loop turn (fairness) */

double br_thread_cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int rlb__sync_mode_parse(const char *text, rlb_sync_mode *mode)
{
    if (text && !strcmp(text, "pause"))
        *mode = RLB_SYNC_PAUSE;
    else if (text && !strcmp(text, "staged"))
        *mode = RLB_SYNC_STAGED;
    else
        return RLB_EINVAL;
    return 0;
}

static const char *role_name(int role)
{
    return role == RLB_ROLE_TRAINER ? "trainer" : role == RLB_ROLE_WORKER ? "worker"
           : role == RLB_ROLE_TOOL  ? "tool"
                                    : "new peer";
}

/* ---- Replicas ------------------------------------------------------------------------ */

void br_replica_kill(bridge *b, int replica, const char *why)
{
    br_replica *r = &b->replicas[replica];
    if (r->state == BR_REP_DEAD)
        return;
    r->state = BR_REP_DEAD;
    RLB_LOG_WARN(RLB_SUB_BRIDGE, "replica %d out of service: %s", replica, why);
    rlb_msg bye = {.type = RLB_MSG_SHUTDOWN};
    for (uint32_t t = 0; t < b->tp_size; t++)
        if (r->ranks[t]) {
            br_send(b, r->ranks[t], &bye);
            r->ranks[t]->closing = BR_CLOSE_AFTER_FLUSH;
        }
    if (r->tp_fd >= 0)
        close(r->tp_fd);
    r->tp_fd = -1;
    br_heal_lost(b, replica);
    br_replica_lost(b, replica);
}

void br_replica_up(bridge *b, int replica)
{
    br_replica *r = &b->replicas[replica];
    r->state = BR_REP_UP;
    b->ever_up = 1;
    rlb_msg m = {.type = RLB_MSG_SLEEP};
    for (uint32_t t = 0; b->asleep && t < b->tp_size; t++)
        br_send(b, r->ranks[t], &m);
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "replica %d up (%u TP ranks, version %" PRIu64 ")%s", replica,
                 b->tp_size, b->committed, b->asleep ? ", told to sleep" : "");
}

/* Makes room for replicas [n_replicas, n): a worker of a replica the bridge has not seen
 * yet (more workers at run time). The plan covers the replicas it was built for, so it is
 * rebuilt at the next sync. */
static int replicas_grow(bridge *b, uint32_t n, char *why, size_t len)
{
    if (b->sync != BR_SYNC_IDLE || b->copy_running || b->heal >= 0)
        return snprintf(why, len, "replica %u is new and a sync is in flight; say hello again "
                        "after it", n - 1), RLB_EAGAIN;
    br_replica *grown = realloc(b->replicas, n * sizeof(*grown));
    if (!grown)
        return snprintf(why, len, "out of memory"), RLB_ENOMEM;
    b->replicas = grown;
    for (uint32_t d = b->n_replicas; d < n; d++) {
        grown[d] = (br_replica){.state = BR_REP_FORMING, .tp_fd = -1,
                                .ranks = calloc(b->tp_size, sizeof(br_peer *))};
        if (!grown[d].ranks)
            return snprintf(why, len, "out of memory"), RLB_ENOMEM;
        b->n_replicas = d + 1;
    }
    br_plan_reset(b);
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "now %u replicas", n);
    return 0;
}

/* Sends replica d's CPU TP communicator segment to worker w, creating it first. */
static int send_tp_segment(bridge *b, br_replica *r, uint32_t d, br_peer *w)
{
    size_t size = rlb__tp_shm_memsize((int)b->tp_size, BR_TP_SLOT_FLOATS);
    if (r->tp_fd < 0) {
        void *mem;
        int fd, rc = rlb__shm_create(size, "rlb-tp", &fd);
        if (rc < 0)
            return rc;
        if ((rc = rlb__shm_map(fd, size, &mem)) == 0) {
            rc = rlb__tp_shm_init(mem, size, (int)b->tp_size, BR_TP_SLOT_FLOATS);
            rlb__shm_unmap(mem, size);
        }
        if (rc < 0) {
            close(fd);
            return rc;
        }
        r->tp_fd = fd;
    }
    rlb__seg_msg sm = {.magic = RLB_SEG_MAGIC, .id = RLB_SEG_ID_BRIDGE + d, .bytes = size};
    return rlb__conn_send_fds(w->conn, &sm, sizeof(sm), &r->tp_fd, 1);
}

/* ---- Hello ---------------------------------------------------------------------------- */

/* Refuses a hello: ERROR, then the connection closes once the ERROR went out. */
static void refuse(bridge *b, br_peer *p, int code, const char *text)
{
    br_send_error(b, p, code, 0, RLB_MSG_HELLO, "hello refused: %s", text);
    p->closing = BR_CLOSE_AFTER_FLUSH;
}

static int hello_trainer(bridge *b, br_peer *p, const rlb_msg_hello *h, char *why, size_t len)
{
    if (b->world == 0) {
        b->trainers = calloc(h->world, sizeof(*b->trainers));
        if (!b->trainers)
            return snprintf(why, len, "out of memory"), RLB_ENOMEM;
        b->world = h->world;
    }
    if (h->world != b->world)
        return snprintf(why, len, "trainer world %u, but this bridge's trainer world is %u "
                        "(fixed by its first trainer)", h->world, b->world), RLB_EINVAL;
    if (b->trainers[h->rank])
        return snprintf(why, len, "trainer rank %u is already connected", h->rank),
               RLB_EEXIST;
    b->trainers[h->rank] = p;
    return 0;
}

/* Creates the replica table from the first worker's TP size and worker count. */
static int replicas_init(bridge *b, const rlb_msg_hello *h, char *why, size_t len)
{
    char err[256] = "";
    if (h->world % h->tp_size)
        return snprintf(why, len, "%u workers do not make whole replicas of TP size %u",
                        h->world, h->tp_size), RLB_EINVAL;
    if (rlb__tp_check(&b->opts->cfg, (int)h->tp_size, err, sizeof(err)) < 0)
        return snprintf(why, len, "TP size %u: %s", h->tp_size, err), RLB_EUNSUPPORTED;
    uint32_t n = h->world / h->tp_size;
    b->replicas = calloc(n, sizeof(*b->replicas));
    if (!b->replicas)
        return snprintf(why, len, "out of memory"), RLB_ENOMEM;
    for (uint32_t d = 0; d < n; d++) {
        b->replicas[d].tp_fd = -1;
        b->replicas[d].ranks = calloc(h->tp_size, sizeof(br_peer *));
        if (!b->replicas[d].ranks)
            return snprintf(why, len, "out of memory"), RLB_ENOMEM;
    }
    b->n_replicas = n;
    b->tp_size = h->tp_size;
    br_plan_reset(b);
    return 0;
}

/* Checks that worker p passed a weight buffer of the layout's size as segment id. */
static int worker_buffer(bridge *b, br_peer *p, const rlb_msg_hello *h, uint32_t id,
                         uint64_t bytes, void **addr, char *why, size_t len)
{
    br_seg *s = br_seg_ready(p, id); /* held by the loop until it came, or a timeout */
    if (!s)
        return snprintf(why, len, "no weight buffer passed as segment %u%s", id,
                        id == RLB_SEG_ID_WEIGHTS_B ? " (the bridge runs in staged mode)" : ""),
               RLB_ENOTFOUND;
    if (s->refused)
        return snprintf(why, len, "weight buffer (segment %u) is %s", id, s->refused),
               RLB_EPERM;
    if (s->bytes < bytes)
        return snprintf(why, len, "weight buffer (segment %u) holds %llu bytes, the model needs "
                        "%llu: does the worker run the bridge's model?", id,
                        (unsigned long long)s->bytes, (unsigned long long)bytes), RLB_ESHAPE;
    if (s->vmm != (h->device == RLB_DEVICE_CUDA))
        return snprintf(why, len, "a %s worker passed its weight buffer as %s memory",
                        h->device == RLB_DEVICE_CUDA ? "GPU" : "CPU",
                        s->vmm ? "GPU" : "host"), RLB_EINVAL;
    int rc = s->vmm ? br_seg_map_device(b, s, h->device_uuid, why, len) : 0;
    *addr = s->addr;
    return rc;
}

static int hello_worker(bridge *b, br_peer *p, const rlb_msg_hello *h, char *why, size_t len)
{
    int rc;
    rlb_dtype wdt = h->weight_dtype;
    if (h->device != RLB_DEVICE_CPU && h->device != RLB_DEVICE_CUDA)
        return snprintf(why, len, "a worker names its backend (cpu or cuda)"), RLB_EINVAL;
    if ((h->device == RLB_DEVICE_CPU && wdt != RLB_DTYPE_F32) ||
        (wdt != RLB_DTYPE_F32 && wdt != RLB_DTYPE_BF16 && wdt != RLB_DTYPE_F16))
        return snprintf(why, len, "a %s worker with %s weights", h->device == RLB_DEVICE_CPU ?
                        "CPU" : "GPU", rlb_dtype_name(wdt)), RLB_EDTYPE;
    if (b->tp_size && wdt != b->wdt)
        return snprintf(why, len, "weights of %s, but the other workers hold %s",
                        rlb_dtype_name(wdt), rlb_dtype_name(b->wdt)), RLB_EDTYPE;
    if (h->device == RLB_DEVICE_CUDA && (rc = br_use_cuda(b, why, len)) < 0)
        return rc;
    if (b->tp_size == 0) {
        if ((rc = replicas_init(b, h, why, len)) < 0)
            return rc;
        b->wdt = wdt;
    }
    if (h->tp_size != b->tp_size || h->world % h->tp_size)
        return snprintf(why, len, "TP size %u and %u workers, but the others said TP size %u",
                        h->tp_size, h->world, b->tp_size), RLB_EINVAL;
    if (h->replica >= h->world / h->tp_size || h->rank != h->replica * b->tp_size + h->tp_rank)
        return snprintf(why, len, "replica %u TP rank %u does not match worker index %u of %u",
                        h->replica, h->tp_rank, h->rank, h->world), RLB_EINVAL;
    if (h->replica >= b->n_replicas && (rc = replicas_grow(b, h->replica + 1, why, len)) < 0)
        return rc;
    br_replica *r = &b->replicas[h->replica];
    if (r->state == BR_REP_DEAD) {
        for (uint32_t t = 0; t < b->tp_size; t++)
            if (r->ranks[t])
                return snprintf(why, len, "replica %u is still shutting down its old workers; "
                                "say hello again in a moment", h->replica), RLB_EAGAIN;
        r->state = BR_REP_FORMING; /* a worker for a lost replica: it forms again */
        RLB_LOG_INFO(RLB_SUB_BRIDGE, "replica %u forms again", h->replica);
    }
    if (r->ranks[h->tp_rank])
        return snprintf(why, len, "replica %u TP rank %u is already connected", h->replica,
                        h->tp_rank), RLB_EEXIST;
    rlb_tp_layout layout;
    if ((rc = rlb__tp_layout_init(&layout, &b->opts->cfg, (int)h->tp_size, (int)h->tp_rank,
                                  wdt)) < 0)
        return snprintf(why, len, "no TP layout for rank %u of %u", h->tp_rank, h->tp_size), rc;
    uint64_t bytes = layout.total_bytes;
    rlb__tp_layout_free(&layout);
    p->buf_bytes = bytes;
    if ((rc = worker_buffer(b, p, h, RLB_SEG_ID_WEIGHTS, bytes, &p->buf[0], why, len)) < 0)
        return rc;
    if (b->opts->mode == RLB_SYNC_STAGED &&
        (rc = worker_buffer(b, p, h, RLB_SEG_ID_WEIGHTS_B, bytes, &p->buf[1], why, len)) < 0)
        return rc;
    if (b->tp_size > 1 && (rc = send_tp_segment(b, r, h->replica, p)) < 0)
        return snprintf(why, len, "cannot pass the TP communicator: %s", rlb_strerror(rc)), rc;
    r->ranks[h->tp_rank] = p;
    return 0;
}

/* Worker p was welcomed: when it completes its replica, the replica serves (or joins).
 * This comes after the welcome, which must be the first message a worker reads: a replica
 * that comes up while the workers sleep is told to sleep at once. */
static void worker_welcomed(bridge *b, br_peer *p)
{
    br_replica *r = &b->replicas[p->hello.replica];
    for (uint32_t t = 0; t < b->tp_size; t++)
        if (!r->ranks[t])
            return;
    if (r->tp_fd >= 0)
        close(r->tp_fd); /* every rank holds it now */
    r->tp_fd = -1;
    r->has_weights = 1;
    for (uint32_t t = 0; t < b->tp_size; t++)
        r->has_weights &= r->ranks[t]->hello.has_weights;
    if (b->committed == 0 && b->sync == BR_SYNC_IDLE) {
        br_replica_up(b, (int)p->hello.replica); /* every buffer holds the initial weights */
        return;
    }
    /* Its buffers hold initial weights, not the committed version (nor the one in flight,
     * which it is not a destination of): it serves only once they do (br_heal_progress,
     * or the next sync). */
    r->state = BR_REP_JOINING;
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "replica %u formed; it joins once it holds version %" PRIu64,
                 p->hello.replica, b->committed);
}

static void on_hello(bridge *b, br_peer *p, const rlb_msg_hello *h)
{
    char why[384] = "";
    int rc = 0;
    if (p->role != BR_NEW) {
        br_send_error(b, p, RLB_EPROTO, 0, RLB_MSG_HELLO, "hello sent twice");
        return;
    }
    if (h->abi_version != RLB_ABI_VERSION) {
        snprintf(why, sizeof(why), "ABI version %u, the bridge speaks %u", h->abi_version,
                 RLB_ABI_VERSION);
        rc = RLB_EVERSION;
    } else if (h->role == RLB_ROLE_TRAINER) {
        rc = hello_trainer(b, p, h, why, sizeof(why));
    } else if (h->role == RLB_ROLE_WORKER) {
        rc = hello_worker(b, p, h, why, sizeof(why));
    }
    if (rc < 0) {
        refuse(b, p, rc, why);
        return;
    }
    p->role = (int)h->role;
    p->hello = *h;
    const char *device = p->role != RLB_ROLE_WORKER        ? ""
                         : h->device == RLB_DEVICE_CUDA ? " (GPU)"
                                                        : " (CPU)";
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "peer %u (pid %d) is %s %u of %u%s", p->id,
                 (int)rlb__conn_peer_pid(p->conn), role_name(p->role), h->rank, h->world,
                 device);
    rlb_msg m = {.type = RLB_MSG_WELCOME, .welcome = {.abi_version = RLB_ABI_VERSION,
                                                      .peer_id = p->id,
                                                      .weight_version = b->committed}};
    br_send(b, p, &m);
    if (p->role == RLB_ROLE_WORKER)
        worker_welcomed(b, p);
    br_dispatch(b);
}

/* ---- Control ------------------------------------------------------------------------ */

static void on_stats(bridge *b, br_peer *p, uint64_t id)
{
    uint32_t workers = 0, up = 0, joining = 0, trainers = 0, held = 0, loads = 0;
    for (uint32_t d = 0; d < b->n_replicas; d++) {
        up += b->replicas[d].state == BR_REP_UP;
        joining += b->replicas[d].state == BR_REP_JOINING;
        for (uint32_t t = 0; t < b->tp_size; t++) {
            workers += b->replicas[d].ranks[t] != NULL;
            loads += b->replicas[d].ranks[t] ? b->replicas[d].ranks[t]->loads_out : 0;
        }
    }
    for (uint32_t r = 0; r < b->world; r++)
        trainers += b->trainers[r] != NULL;
    for (uint32_t i = 0; i < b->n_gens; i++)
        held += b->gens[i].replica < 0;
    uint64_t x_sent, x_received, x_skipped;
    br_xnode_bytes(b, &x_sent, &x_received, &x_skipped);
    const rlb_msg_stat s[] = {
        {"weight_version", (double)b->committed},
        {"sync_phase", (double)b->sync}, /* br_sync_state: 0 idle, 1 drain, 2 copy, 3 load,
                                            4 xnode */
        {"sync_version", (double)b->syncing}, /* the version in flight, when not idle */
        {"syncs", (double)b->n_syncs},
        {"aborts", (double)b->n_aborts},
        {"bytes_synced", (double)b->bytes_synced},
        {"last_sync_ms", b->last_sync_ms},
        {"last_copy_ms", b->last_copy_ms},
        {"last_launch_ms", b->last_launch_ms},
        {"last_copy_wall_ms", b->last_copy_wall_ms},
        {"last_load_ms", b->last_load_ms},
        {"last_sync_gbps", b->last_gbps},
        {"control_ms_per_sync", b->last_control_ms},
        {"plan_ops", b->plan_ready ? (double)b->plan.n_ops : 0},
        {"requests", (double)b->n_requests},
        {"results", (double)b->n_results},
        {"retried", (double)b->n_retried},
        {"failed", (double)b->n_failed},
        {"inflight", (double)br_inflight(b)},
        {"held", (double)held},
        {"peers", (double)b->n_peers},
        {"trainers", (double)trainers},
        {"workers", (double)workers},
        {"replicas_up", (double)up},
        {"replicas_joining", (double)joining},
        {"heals", (double)b->n_heals},
        {"loads_unanswered", (double)loads},
        {"stale", (double)b->stale},
        {"asleep", (double)b->asleep},
        {"staged", (double)(b->opts->mode == RLB_SYNC_STAGED)},
        {"segments", (double)br_mapped_segments(b)},
        {"xnode_bytes_sent", (double)x_sent},         /* to other nodes' bridges, in all */
        {"xnode_bytes_received", (double)x_received}, /* from them */
        {"xnode_bytes_skipped", (double)x_skipped},   /* not sent: the receiver held them */
    };
    rlb_msg m = {.type = RLB_MSG_STATS_REPLY,
                 .stats_reply = {.request_id = id, .n_stats = sizeof(s) / sizeof(s[0]),
                                 .stats = s}};
    br_send(b, p, &m);
}

/* Sleep or wake every live worker; p asked for it (NULL: the bridge itself). The workers
 * stay asleep only while the peer that put them to sleep is connected (peer_drop). */
static void on_sleep(bridge *b, br_peer *p, int sleep)
{
    b->sleeper = sleep && p ? p->id : 0;
    rlb_msg m = {.type = sleep ? RLB_MSG_SLEEP : RLB_MSG_WAKE};
    for (uint32_t d = 0; d < b->n_replicas; d++)
        for (uint32_t t = 0; b->replicas[d].state == BR_REP_UP && t < b->tp_size; t++)
            br_send(b, b->replicas[d].ranks[t], &m);
    b->asleep = sleep;
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "workers told to %s", sleep ? "sleep" : "wake");
}

/* What each role may send (bit per message type). Only a trainer rank, the job that owns
 * the bridge, may shut it down; a tool (an observer) may ask for generation, sleep and
 * wake, never for the end of the bridge. SIGTERM stops it from outside. */
static int allowed(int role, uint32_t type)
{
    const uint32_t any = 1u << RLB_MSG_STATS;
    const uint32_t ask = any | 1u << RLB_MSG_GENERATE | 1u << RLB_MSG_SLEEP |
                         1u << RLB_MSG_WAKE;
    uint32_t mask = role == BR_NEW             ? any | 1u << RLB_MSG_HELLO
                    : role == RLB_ROLE_TOOL    ? ask
                    : role == RLB_ROLE_TRAINER ? ask | 1u << RLB_MSG_REGISTER |
                                                     1u << RLB_MSG_UNREGISTER |
                                                     1u << RLB_MSG_PUBLISH |
                                                     1u << RLB_MSG_SHUTDOWN
                                               : any | 1u << RLB_MSG_RESULT |
                                                     1u << RLB_MSG_LOADED | 1u << RLB_MSG_ERROR;
    return type < 32 && (mask >> type & 1);
}

/* Segments that message m from p names and p has not passed yet (the socket drained
 * first): a register's host and VMM tensors, a worker's weight buffers. */
static int segments_missing(bridge *b, br_peer *p, const rlb_msg *m)
{
    if (br_recv_segments(b, p, 0) < 0)
        return 0; /* the socket is broken: the message is answered, the peer dropped */
    if (m->type == RLB_MSG_REGISTER) {
        for (uint32_t i = 0; i < m->reg.n_tensors; i++)
            if (m->reg.tensors[i].mem.kind != RLB_MEM_CUDA_IPC &&
                !br_seg_ready(p, m->reg.tensors[i].mem.fd_index))
                return 1;
        return 0;
    }
    if (m->type == RLB_MSG_HELLO && m->hello.role == RLB_ROLE_WORKER)
        return !br_seg_ready(p, RLB_SEG_ID_WEIGHTS) ||
               (b->opts->mode == RLB_SYNC_STAGED && !br_seg_ready(p, RLB_SEG_ID_WEIGHTS_B));
    return 0;
}

/* Keeps a copy of message data for p until its segments arrive (segmsg.h: the fd is sent
 * before the message, but on another channel). Returns 1 when it was held. */
static int hold_message(bridge *b, br_peer *p, const void *data, size_t len)
{
    p->held = malloc(len ? len : 1);
    if (!p->held)
        return 0; /* answered now, without its segments */
    memcpy(p->held, data, len);
    p->held_len = len;
    p->held_until = rlb__clock_s() + (double)rlb__env_int(RLB_KNOB_PEER_TIMEOUT_MS) * 1e-3;
    return 1;
}

/* Handles one message of p. `final`: it was held for its segments already; answer it
 * now with whatever arrived. */
static void handle(bridge *b, br_peer *p, const void *data, size_t len, int final)
{
    rlb_msg m;
    char err[256];
    int rc = rlb__msg_decode(data, len, &m, err, sizeof(err));
    if (rc < 0) {
        rlb_msg reply;
        rlb__msg_error_reply(data, len, rc, err, &reply);
        RLB_LOG_INFO(RLB_SUB_BRIDGE, "peer %u sent a malformed message: %s", p->id, err);
        br_send(b, p, &reply);
        return;
    }
    if (!allowed(p->role, m.type)) {
        br_send_error(b, p, RLB_EPROTO, 0, m.type, "a %s may not send %s messages%s",
                      role_name(p->role), rlb__msg_type_name(m.type),
                      p->role == BR_NEW ? " before its hello" : "");
        rlb__msg_free(&m);
        return;
    }
    if (!final && segments_missing(b, p, &m) && hold_message(b, p, data, len)) {
        rlb__msg_free(&m);
        return;
    }
    int busy_registry = b->sync != BR_SYNC_IDLE;
    switch (m.type) {
    case RLB_MSG_HELLO: on_hello(b, p, &m.hello); break;
    case RLB_MSG_STATS: on_stats(b, p, m.stats.request_id); break;
    case RLB_MSG_REGISTER:
    case RLB_MSG_UNREGISTER:
        if (busy_registry)
            br_send_error(b, p, RLB_EAGAIN, 0, m.type, "version %" PRIu64 " is being synced; "
                          "change registrations between syncs", b->syncing);
        else if (m.type == RLB_MSG_REGISTER)
            br_register(b, p, &m.reg);
        else
            br_unregister(b, p, &m.unreg);
        break;
    case RLB_MSG_PUBLISH: br_publish(b, p, &m.publish); break;
    case RLB_MSG_GENERATE: br_generate(b, p, &m); break;
    case RLB_MSG_RESULT:
        if (p->hello.tp_rank == 0)
            br_result(b, p, &m);
        break;
    case RLB_MSG_LOADED: br_loaded(b, p, &m.loaded); break;
    case RLB_MSG_ERROR: br_worker_error(b, p, &m.error); break;
    case RLB_MSG_SLEEP: on_sleep(b, p, 1); break;
    case RLB_MSG_WAKE: on_sleep(b, p, 0); break;
    case RLB_MSG_SHUTDOWN:
        RLB_LOG_INFO(RLB_SUB_BRIDGE, "shutdown asked by peer %u", p->id);
        b->stop = 1;
        break;
    default: break;
    }
    rlb__msg_free(&m);
}

/* ---- Peers ----------------------------------------------------------------------------- */

static void peer_drop(bridge *b, br_peer *p, const char *why)
{
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "peer %u (%s) gone: %s", p->id, role_name(p->role), why);
    if (p->role == RLB_ROLE_TRAINER) {
        br_sync_peer_lost(b, p, NULL, why);
        b->trainers[p->hello.rank] = NULL;
        br_registry_drop(b, p);
        br_lora_drop(b, p);
    } else if (p->role == RLB_ROLE_WORKER) {
        br_replica *r = &b->replicas[p->hello.replica];
        r->ranks[p->hello.tp_rank] = NULL;
        if (r->state == BR_REP_UP || r->in_sync)
            br_sync_peer_lost(b, NULL, p, why);
        if (r->state != BR_REP_DEAD && !b->stop) {
            char text[96];
            snprintf(text, sizeof(text), "worker %u (TP rank %u) %s", p->hello.rank,
                     p->hello.tp_rank, why);
            br_replica_kill(b, (int)p->hello.replica, text);
        }
    }
    br_requester_lost(b, p);
    if (b->asleep && b->sleeper == p->id && !b->stop) {
        RLB_LOG_INFO(RLB_SUB_BRIDGE, "peer %u, which put the workers to sleep, is gone: "
                     "waking them", p->id);
        on_sleep(b, NULL, 0);
    }
    b->peers[p->slot] = NULL;
    b->n_peers--;
    br_peer_free(b, p);
}

/* Gives a connection whose handshake is done its peer slot. */
static void add_peer(bridge *b, rlb_conn *c)
{
    int slot = 0;
    while (slot < BR_MAX_PEERS && b->peers[slot])
        slot++;
    br_peer *p = slot < BR_MAX_PEERS ? calloc(1, sizeof(*p)) : NULL;
    if (!p) {
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "refusing a peer: %s", slot < BR_MAX_PEERS ?
                     "out of memory" : "too many peers");
        rlb__conn_close(c);
        return;
    }
    p->id = b->next_peer_id++;
    p->slot = slot;
    p->conn = c;
    p->role = BR_NEW;
    p->rx.max_msg = BR_MAX_MSG;
    p->rx.private_copy = 1; /* decode what no peer can rewrite under the decoder */
    b->peers[slot] = p;
    b->n_peers++;
}

/* Takes every connection waiting in accept. Its handshake waits in b->pending for the
 * peer's hello (pending_hellos), so a peer that connects and says nothing costs the others
 * nothing. */
static void accept_peers(bridge *b)
{
    for (;;) {
        int sock;
        int rc = rlb__listener_accept_sock(b->listener, &sock);
        if (rc == RLB_EAGAIN)
            return;
        if (rc < 0)
            continue; /* conn.c logged it */
        if (b->n_pending == BR_MAX_PENDING) {
            RLB_LOG_WARN(RLB_SUB_BRIDGE, "refusing a connection: %d handshakes pending",
                         BR_MAX_PENDING);
            close(sock);
            continue;
        }
        b->pending[b->n_pending] = sock;
        b->pending_until[b->n_pending++] =
            rlb__clock_s() + (double)rlb__env_int(RLB_KNOB_PEER_TIMEOUT_MS) * 1e-3;
    }
}

/* Runs the handshake of pending connection i when its hello is there (`ready`: poll said
 * so), or gives up on it past its bound. Returns 1 when it left the pending list. */
static int pending_hello(bridge *b, int i, int ready)
{
    int sock = b->pending[i];
    int rc = RLB_EAGAIN;
    rlb_conn *c = NULL;
    if (ready)
        rc = rlb__listener_welcome(b->listener, sock, &c);
    if (rc == RLB_EAGAIN && rlb__clock_s() < b->pending_until[i])
        return 0;
    b->pending[i] = b->pending[--b->n_pending];
    b->pending_until[i] = b->pending_until[b->n_pending];
    if (rc == 0) {
        add_peer(b, c);
        return 1;
    }
    if (rc == RLB_EAGAIN)
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "a connection sent no hello within RLB_PEER_TIMEOUT_MS; "
                     "closed");
    close(sock);
    return 1;
}

/* Takes up to BR_RECV_BUDGET messages from p's ring. Returns 1 when it took any, or
 * RLB_EPEERDEAD / RLB_ECORRUPT when p must go. */
static int recv_messages(bridge *b, br_peer *p)
{
    rlb_ring *rx = rlb__conn_rx(p->conn);
    int got = 0;
    if (p->held) {
        rlb_msg m;
        int waits = rlb__clock_s() < p->held_until;
        if (waits && rlb__msg_decode(p->held, p->held_len, &m, NULL, 0) == 0) {
            waits = segments_missing(b, p, &m);
            rlb__msg_free(&m);
        }
        if (waits)
            return 0;
        uint8_t *held = p->held;
        p->held = NULL;
        handle(b, p, held, p->held_len, 1);
        free(held);
        got = 1;
    }
    for (int i = 0; i < BR_RECV_BUDGET && p->closing == BR_OPEN && !p->held; i++) {
        rlb_ring_msg rm;
        int rc = rlb__ring_recv(rx, &p->rx, 0, &rm);
        if (rc == RLB_EAGAIN || rc == RLB_ETIMEDOUT)
            break;
        if (rc == RLB_ETOOBIG) {
            br_send_error(b, p, RLB_ETOOBIG, 0, 0, "message larger than %u bytes skipped",
                          BR_MAX_MSG);
            continue;
        }
        if (rc < 0)
            return rc;
        handle(b, p, rm.data, rm.len, 0);
        rlb__ring_recv_done(rx, &p->rx);
        got = 1;
    }
    return got;
}

/* One pass over peer p after poll said `revents`. Returns 1 when something happened. */
static int serve_peer(bridge *b, br_peer *p, short revents)
{
    int busy = 0;
    if ((revents & POLLIN) && br_recv_segments(b, p, 0) < 0 && !(revents & POLLHUP)) {
        peer_drop(b, p, "bad segment message on its socket");
        return 1;
    }
    int rc = recv_messages(b, p);
    if (rc < 0) {
        peer_drop(b, p, rlb_strerror(rc));
        return 1;
    }
    busy |= rc;
    if (revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL)) {
        peer_drop(b, p, "disconnected");
        return 1;
    }
    busy |= br_flush(b, p);
    if (p->closing == BR_CLOSE_NOW || (p->closing && !p->out_head)) {
        peer_drop(b, p, p->closing == BR_CLOSE_NOW ? "not reading its ring" : "closed by us");
        return 1;
    }
    return busy;
}

/* Refreshes the bridge's heartbeat on every ring and drops each worker whose own heartbeat
 * (it beats every turn of its loop, and while it waits on its ring) is older than
 * RLB_PEER_TIMEOUT_MS: a stopped or deadlocked worker, or one stuck in a collective, would
 * otherwise hold a drain or a load forever. Dropping it is what its death does: its replica
 * goes out of service, its requests are retried, a sync that needs it aborts; if it ever
 * wakes, it finds its connection closed and exits. Trainers and tools are judged by their
 * socket only: they are idle between calls by design. */
static void check_heartbeats(bridge *b)
{
    long long timeout = rlb__env_int(RLB_KNOB_PEER_TIMEOUT_MS);
    for (int i = 0; i < BR_MAX_PEERS; i++) {
        br_peer *p = b->peers[i];
        if (!p)
            continue;
        rlb_ring *rx = rlb__conn_rx(p->conn), *tx = rlb__conn_tx(p->conn);
        rlb__ring_heartbeat(rx);
        rlb__ring_heartbeat(tx);
        if (timeout > 0 && p->closing != BR_CLOSE_NOW && br_out_stalled(p, timeout * 1e-3)) {
            char why[128];
            snprintf(why, sizeof(why), "not reading its ring: nothing of a %zu-byte message "
                     "went out for %lld ms (RLB_PEER_TIMEOUT_MS)", p->out_head->len, timeout);
            peer_drop(b, p, why);
            continue;
        }
        if (p->role != RLB_ROLE_WORKER || p->closing || timeout <= 0)
            continue;
        int64_t a = rlb__ring_peer_idle_ms(rx), c = rlb__ring_peer_idle_ms(tx);
        int64_t idle = a < c ? a : c;
        if (idle <= timeout)
            continue;
        char why[128];
        snprintf(why, sizeof(why), "hung: no heartbeat for %lld ms (RLB_PEER_TIMEOUT_MS is "
                 "%lld)", (long long)idle, timeout);
        peer_drop(b, p, why);
    }
}

/* ---- Run ------------------------------------------------------------------------------- */

static void shutdown_all(bridge *b)
{
    b->stop = 1;
    br_sync_abort(b, RLB_ESHUTDOWN, "the bridge is shutting down");
    br_fail_requests(b, RLB_ESHUTDOWN, 0, "the bridge is shutting down");
    rlb_msg bye = {.type = RLB_MSG_SHUTDOWN};
    for (int i = 0; i < BR_MAX_PEERS; i++)
        if (b->peers[i] && b->peers[i]->role == RLB_ROLE_WORKER)
            br_send(b, b->peers[i], &bye);
    br_sync_join(b);
    for (int i = 0; i < BR_MAX_PEERS; i++)
        if (b->peers[i]) {
            br_flush(b, b->peers[i]);
            peer_drop(b, b->peers[i], "bridge shutdown");
        }
}

static void bridge_free(bridge *b)
{
    for (int i = 0; i < b->n_pending; i++)
        close(b->pending[i]);
    br_xnode_stop(b);
    br_unpark(b); /* what the xnode thread kept mapped */
    br_plan_reset(b);
    for (uint32_t d = 0; d < b->n_replicas; d++) {
        if (b->replicas[d].tp_fd >= 0)
            close(b->replicas[d].tp_fd);
        free(b->replicas[d].ranks);
    }
    free(b->replicas);
    free(b->trainers);
    free(b->gens);
    free(b->parked);
    rlb__params_free(&b->params);
    /* The executor first: the CUDA one may hold the base checkpoint's pages registered. */
    if (b->exec)
        b->exec->iface->destroy(b->exec);
    br_base_close(b);
    if (b->copy.wake_fd >= 0)
        close(b->copy.wake_fd);
    rlb__listener_close(b->listener);
}

rlb_executor *br_executor(bridge *b)
{
    return b->exec;
}

int br_use_cuda(bridge *b, char *why, size_t len)
{
    if (!strcmp(b->exec->iface->name, "cuda"))
        return 0;
#ifdef RLB_HAVE_CUDA
    /* The CPU executor maps nothing (its mappings are the bridge's own host addresses) and
     * keeps only its LoRA stage, so it can be swapped for the CUDA one whenever no copy
     * runs. */
    if (b->copy_running)
        return snprintf(why, len, "device memory arrived while a CPU copy runs; retry"),
               RLB_EAGAIN;
    rlb_executor *x = NULL;
    int rc = rlb__executor_cuda_create(&x, why, len);
    if (rc < 0)
        return rc;
    b->exec->iface->destroy(b->exec);
    b->exec = x;
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "device memory registered: syncs run on the GPU from now on");
    return 0;
#else
    return snprintf(why, len, "this bridge was built without CUDA and reads host memory "
                    "only"), RLB_EUNSUPPORTED;
#endif
}

/* Before a sleep in poll: asks every peer to write our eventfds on its next commit (and,
 * where output waits for ring room, on its next release). Returns 1 when a ring is ready
 * already (or broken), so the loop must not sleep. */
static int arm_rings(bridge *b)
{
    int ready = 0;
    for (int i = 0; i < BR_MAX_PEERS; i++) {
        br_peer *p = b->peers[i];
        if (!p)
            continue;
        if (p->closing == BR_OPEN && !p->held && rlb__ring_arm(rlb__conn_rx(p->conn), 0) != 0)
            ready = 1;
        if (p->out_head && rlb__ring_arm(rlb__conn_tx(p->conn), br_out_need(p)) != 0)
            ready = 1;
    }
    return ready;
}

static void disarm_rings(bridge *b)
{
    for (int i = 0; i < BR_MAX_PEERS; i++)
        if (b->peers[i]) {
            rlb__ring_disarm(rlb__conn_rx(b->peers[i]->conn));
            rlb__ring_disarm(rlb__conn_tx(b->peers[i]->conn));
        }
}

/* The earliest bound the loop must wake up for: the next heartbeat check, a pending
 * handshake or a held message giving up. */
static double next_deadline(bridge *b, double next_beat)
{
    double t = next_beat;
    for (int i = 0; i < b->n_pending; i++)
        t = b->pending_until[i] < t ? b->pending_until[i] : t;
    for (int i = 0; i < BR_MAX_PEERS; i++)
        if (b->peers[i] && b->peers[i]->held && b->peers[i]->held_until < t)
            t = b->peers[i]->held_until;
    return t;
}

/* Empties an eventfd that fired (non-blocking). */
static void drain_eventfd(int fd)
{
    uint64_t count;
    (void)!read(fd, &count, sizeof(count));
}

/* Poll entries per peer: its socket and its rx and tx ring eventfds. */
#define FDS_PER_PEER 3

static int loop(bridge *b)
{
    struct pollfd *fds = calloc(FDS_PER_PEER * BR_MAX_PEERS + BR_MAX_PENDING + 3, sizeof(*fds));
    br_peer **at = calloc(BR_MAX_PEERS, sizeof(*at));
    if (!fds || !at) {
        free(fds);
        free(at);
        return RLB_ENOMEM;
    }
    double spin_s = (double)rlb__env_int(RLB_KNOB_SPIN_US) * 1e-6;
    double spin_until = 0, next_beat = 0;
    double beat_s = (double)rlb__env_positive(RLB_KNOB_HEARTBEAT_MS) * 1e-3;
    const rlb_bridge_opts *o = b->opts;
    while (!b->stop && !(o->stop && *o->stop)) {
        fds[0] = (struct pollfd){.fd = rlb__listener_fd(b->listener), .events = POLLIN};
        fds[1] = (struct pollfd){.fd = b->copy.wake_fd, .events = POLLIN};
        fds[2] = (struct pollfd){.fd = br_xnode_fd(b), .events = POLLIN}; /* -1: ignored */
        int n = 3, n_peers = 0;
        for (int i = 0; i < BR_MAX_PEERS; i++)
            if (b->peers[i]) {
                int rx_fd, tx_fd;
                rlb__conn_wait_fds(b->peers[i]->conn, &rx_fd, &tx_fd);
                at[n_peers++] = b->peers[i];
                fds[n++] = (struct pollfd){.fd = rlb__conn_fd(b->peers[i]->conn),
                                           .events = POLLIN | POLLRDHUP};
                fds[n++] = (struct pollfd){.fd = rx_fd, .events = POLLIN};
                fds[n++] = (struct pollfd){.fd = tx_fd, .events = POLLIN};
            }
        int first_pending = n, n_pending = b->n_pending;
        for (int i = 0; i < n_pending; i++)
            fds[n++] = (struct pollfd){.fd = b->pending[i], .events = POLLIN};
        int timeout = 0;
        if (rlb__clock_s() >= spin_until && !arm_rings(b)) {
            double left = next_deadline(b, next_beat) - rlb__clock_s();
            timeout = left > 0 ? (int)(left * 1e3) + 1 : 0;
        }
        int polled = poll(fds, (nfds_t)n, timeout);
        disarm_rings(b);
        if (polled < 0 && errno != EINTR) {
            RLB_LOG_ERROR(RLB_SUB_BRIDGE, "poll: %s", strerror(errno));
            break;
        }
        int busy = 0;
        /* Backwards: pending_hello moves the last entry into a finished one's place. */
        for (int i = n_pending - 1; i >= 0; i--)
            busy |= pending_hello(b, i, fds[first_pending + i].revents != 0);
        if (fds[0].revents & POLLIN)
            accept_peers(b);
        if (fds[1].revents & POLLIN) {
            br_copy_done(b);
            busy = 1;
        }
        if (fds[2].revents & POLLIN) {
            drain_eventfd(fds[2].fd);
            busy = 1; /* br_sync_progress reads what the xnode thread reported */
        }
        for (int i = 0; i < n_peers; i++) {
            struct pollfd *f = &fds[3 + FDS_PER_PEER * i];
            for (int k = 1; k < FDS_PER_PEER; k++)
                if (f[k].revents & POLLIN)
                    drain_eventfd(f[k].fd);
            busy |= serve_peer(b, at[i], f[0].revents);
        }
        if (rlb__clock_s() >= next_beat) {
            check_heartbeats(b);
            next_beat = rlb__clock_s() + beat_s;
        }
        busy |= br_sync_progress(b);
        busy |= br_heal_progress(b);
        busy |= br_dispatch(b);
        if (busy)
            spin_until = rlb__clock_s() + spin_s;
        else if (timeout == 0)
            rlb_cpu_relax();
    }
    free(fds);
    free(at);
    return 0;
}

int rlb__bridge_run(const rlb_bridge_opts *opts)
{
    char err[256] = "";
    if (!opts || opts->struct_size < sizeof(*opts) || !opts->socket_path)
        return RLB_EINVAL;
    if (rlb__config_validate(&opts->cfg, err, sizeof(err)) < 0) {
        RLB_LOG_ERROR(RLB_SUB_BRIDGE, "bad model config: %s", err);
        return RLB_EINVAL;
    }
    bridge *b = calloc(1, sizeof(*b));
    if (!b)
        return RLB_ENOMEM;
    b->opts = opts;
    b->next_peer_id = 1;
    b->next_bid = 1;
    b->heal = -1;
    b->copy.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int rc = RLB_EIO;
    if (b->copy.wake_fd < 0)
        goto out;
    if ((rc = rlb__executor_cpu_create(&b->exec)) < 0)
        goto out;
    if ((rc = rlb__params_init(&b->params, &opts->cfg, err, sizeof(err))) < 0)
        goto out;
    if ((rc = br_base_open(b, err, sizeof(err))) < 0) {
        RLB_LOG_ERROR(RLB_SUB_BRIDGE, "base checkpoint: %s", err);
        goto out;
    }
    if ((rc = rlb__listener_open(opts->socket_path, opts->ring_bytes, &b->listener)) < 0)
        goto out;
    if ((rc = br_xnode_start(b)) < 0)
        goto out;
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "listening on %s (%s sync, model %s: %" PRId64 " layers, "
                 "hidden %" PRId64 ")", opts->socket_path,
                 opts->mode == RLB_SYNC_STAGED ? "staged" : "pause",
                 rlb__config_arch_name(opts->cfg.arch), opts->cfg.n_layers, opts->cfg.hidden);
    rc = loop(b);
    shutdown_all(b);
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "stopped after %" PRIu64 " syncs (%" PRIu64 " aborted), %"
                 PRIu64 " requests", b->n_syncs, b->n_aborts, b->n_requests);
out:
    bridge_free(b);
    free(b);
    return rc;
}
