/* sync.c: a weight version as a transaction (DESIGN §5).
 *
 *   IDLE   ranks publish v; when every rank of the world published the same v, every
 *          replica is formed and the plan is ready, the sync starts (registrations still
 *          incomplete at that point abort v with the missing tensor's name).
 *   DRAIN  pause mode only: new generation is held in the bridge; the sync waits until no
 *          request runs on any replica.
 *   COPY   the copy thread runs the plan from the trainers' segments straight into the
 *          workers' buffers: in place (pause), or into each worker's inactive buffer
 *          (staged) while generation goes on with v-1. The loop keeps serving meanwhile
 *          and learns of the end through an eventfd in its poll set.
 *   LOAD   load(v) went to every worker of every live replica; staged workers first finish
 *          what runs on v-1, then switch buffers; all run post-load processing and answer
 *          loaded(v). New generation is held (a request must never start on a version
 *          that may still be rolled back). When every worker answered, v is committed and
 *          every rank gets synced(v, bytes, ms, GB/s).
 *
 * Abort (a rank dies before commit, a worker dies while buffers are written or loaded, a
 * copy or post-load processing fails): every rank that published v gets aborted(v,
 * reason). Pause mode: if worker buffers were written, they hold no complete version, so
 * generation is refused with RLB_ESTALE until a later version commits. Staged mode: the
 * active buffers never changed, except on workers that already switched for v; those get
 * load(committed version), which switches them back to the untouched v-1 buffer. (Before
 * the first commit there is no version number to switch back to, so those workers are
 * marked stale as in pause mode.) A mix of versions is never served: results carry the
 * version of the buffer the engine read, and nothing runs on a buffer being written.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "bridge/bridge_int.h"
#include "common/log.h"
#include "kernels/cpu/plan_exec.h"

int br_sync_holds_generation(const bridge *b)
{
    if (b->opts->mode == RLB_SYNC_PAUSE)
        return b->sync != BR_SYNC_IDLE;
    return b->sync == BR_SYNC_LOAD;
}

/* The version every connected rank published, or 0 while some rank has not. */
static uint64_t all_published(const bridge *b)
{
    if (b->world == 0)
        return 0;
    uint64_t v = 0;
    for (uint32_t r = 0; r < b->world; r++) {
        const br_peer *p = b->trainers[r];
        if (!p || !p->published || (v && p->published != v))
            return 0;
        v = p->published;
    }
    return v;
}

/* A version some rank published and that is not settled yet, or 0. */
static uint64_t pending_version(const bridge *b)
{
    if (b->sync != BR_SYNC_IDLE)
        return b->syncing;
    for (uint32_t r = 0; r < b->world; r++)
        if (b->trainers[r] && b->trainers[r]->published)
            return b->trainers[r]->published;
    return 0;
}

void br_publish(bridge *b, br_peer *p, uint64_t version)
{
    double c0 = br_thread_cpu();
    uint64_t pending = pending_version(b);
    if (version <= b->committed) {
        br_send_error(b, p, RLB_EINVAL, 0, RLB_MSG_PUBLISH, "publish %" PRIu64 ": version %"
                      PRIu64 " is already committed; versions must grow", version,
                      b->committed);
        return;
    }
    if (pending && pending != version) {
        br_send_error(b, p, RLB_EINVAL, 0, RLB_MSG_PUBLISH, "publish %" PRIu64 ": version %"
                      PRIu64 " is in flight; every rank must publish the same version",
                      version, pending);
        return;
    }
    if (p->published == version) {
        br_send_error(b, p, RLB_EEXIST, 0, RLB_MSG_PUBLISH, "publish %" PRIu64 ": already "
                      "published by this rank", version);
        return;
    }
    p->published = version;
    b->t_last_publish = br_now();
    RLB_LOG_DEBUG(RLB_SUB_BRIDGE, "trainer rank %u published version %" PRIu64, p->hello.rank,
                  version);
    b->control_s += br_thread_cpu() - c0;
}

/* Sends msg to every connected rank that published the version in flight, and clears the
 * published marks. */
static void tell_ranks(bridge *b, const rlb_msg *msg)
{
    for (uint32_t r = 0; r < b->world; r++) {
        br_peer *p = b->trainers[r];
        if (p && p->published) {
            br_send(b, p, msg);
            p->published = 0;
        }
    }
}

static void reset_workers(bridge *b)
{
    for (uint32_t d = 0; d < b->n_replicas; d++)
        for (uint32_t t = 0; t < b->tp_size; t++) {
            br_peer *w = b->replicas[d].ranks[t];
            if (w)
                w->load_sent = w->loaded = 0;
        }
}

/* Sends load(version) to w; in staged mode its active buffer flips. */
static void send_load(bridge *b, br_peer *w, uint64_t version)
{
    rlb_msg m = {.type = RLB_MSG_LOAD, .load = {.version = version}};
    if (b->opts->mode == RLB_SYNC_STAGED)
        w->active ^= 1;
    br_send(b, w, &m);
}

void br_sync_abort(bridge *b, int code, const char *fmt, ...)
{
    uint64_t v = pending_version(b);
    if (!v)
        return;
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    int staged = b->opts->mode == RLB_SYNC_STAGED;
    int spoiled = 0; /* some worker's active buffer holds neither v-1 nor a committed v */
    if (b->copied && !staged)
        spoiled = 1;
    if (staged && b->sync == BR_SYNC_LOAD)
        for (uint32_t d = 0; d < b->n_replicas; d++)
            for (uint32_t t = 0; t < b->tp_size; t++) {
                br_peer *w = b->replicas[d].ranks[t];
                if (!w || !w->load_sent || b->replicas[d].state != BR_REP_UP)
                    continue;
                if (b->committed)
                    send_load(b, w, b->committed); /* switch back to the v-1 buffer */
                else
                    spoiled = 1;
            }
    if (spoiled && !b->stale) {
        b->stale = 1;
        br_fail_requests(b, RLB_ESTALE, 1, "weights are stale after an aborted sync");
    }
    RLB_LOG_WARN(RLB_SUB_BRIDGE, "version %" PRIu64 " aborted: %s%s", v, text,
                 spoiled ? " (workers are stale until a version commits)" : "");
    rlb_msg m = {.type = RLB_MSG_ABORTED, .aborted = {.version = v, .code = code, .text = text}};
    tell_ranks(b, &m);
    reset_workers(b);
    b->sync = BR_SYNC_IDLE;
    b->syncing = 0;
    b->copied = 0;
    b->control_s = 0;
    b->n_aborts++;
}

static void *copy_thread(void *arg)
{
    br_copy *c = arg;
    double t0 = br_now();
    c->rc = rlb__plan_exec_cpu_scratch(&c->view, c->src, c->src_len, c->dst, c->dst_len,
                                       &c->scratch, c->threads, c->err, sizeof(c->err));
    c->ms = (br_now() - t0) * 1e3;
    uint64_t one = 1;
    /* The eventfd write is the thread's last touch of c; the loop reads c after reading
     * the eventfd and joining the thread. */
    ssize_t n = write(c->wake_fd, &one, sizeof(one));
    (void)n;
    return NULL;
}

/* Binds the plan's destinations to the live replicas' buffers and keeps only their ops
 * and LoRA merges (both grouped by destination, replica by replica). Returns 0 or
 * RLB_ENOMEM. */
static int bind_copy(bridge *b)
{
    br_copy *c = &b->copy;
    const rlb_plan *plan = &b->plan;
    c->view = *plan;
    /* Own copies of every table: a registration may change while the thread runs. */
    c->src = malloc(b->n_src * sizeof(*c->src) + 1);
    c->src_len = malloc(b->n_src * sizeof(*c->src_len) + 1);
    c->dst = calloc(plan->n_dst, sizeof(*c->dst));
    c->dst_len = calloc(plan->n_dst, sizeof(*c->dst_len));
    c->view.ops = malloc(plan->n_ops * sizeof(*c->view.ops) + 1);
    if (!c->src || !c->src_len || !c->dst || !c->dst_len || !c->view.ops)
        return RLB_ENOMEM;
    memcpy(c->src, b->src_ptr, b->n_src * sizeof(*c->src));
    memcpy(c->src_len, b->src_len, b->n_src * sizeof(*c->src_len));
    c->view.merges = malloc(plan->n_merges * sizeof(*c->view.merges) + 1);
    c->view.stage_ops = malloc(plan->n_stage_ops * sizeof(*c->view.stage_ops) + 1);
    if (!c->view.merges || !c->view.stage_ops)
        return RLB_ENOMEM;
    if (plan->n_stage_ops)
        memcpy(c->view.stage_ops, plan->stage_ops,
               plan->n_stage_ops * sizeof(*plan->stage_ops));
    c->view.n_ops = 0;
    c->view.n_merges = 0;
    c->view.dst_first_merge = NULL; /* the executor reads merges by their dst_ref */
    c->view.bytes_written = 0;
    for (uint32_t d = 0; d < b->n_replicas; d++) {
        if (b->replicas[d].state != BR_REP_UP)
            continue;
        for (uint32_t t = 0; t < b->tp_size; t++) {
            uint32_t dst = d * b->tp_size + t;
            br_peer *w = b->replicas[d].ranks[t];
            c->dst[dst] = w->buf[b->opts->mode == RLB_SYNC_STAGED ? !w->active : w->active];
            c->dst_len[dst] = plan->dst_bytes[dst];
            uint64_t first = plan->dst_first_op[dst], end = plan->dst_first_op[dst + 1];
            memcpy(c->view.ops + c->view.n_ops, plan->ops + first,
                   (end - first) * sizeof(*plan->ops));
            for (uint64_t i = first; i < end; i++)
                c->view.bytes_written += plan->ops[i].rows * plan->ops[i].row_elems *
                                         rlb_dtype_size((rlb_dtype)plan->ops[i].dst_dtype);
            c->view.n_ops += end - first;
            if (plan->n_merges) {
                uint64_t m0 = plan->dst_first_merge[dst], m1 = plan->dst_first_merge[dst + 1];
                memcpy(c->view.merges + c->view.n_merges, plan->merges + m0,
                       (m1 - m0) * sizeof(*plan->merges));
                c->view.n_merges += m1 - m0;
            }
        }
    }
    c->threads = b->opts->threads;
    return 0;
}

static void free_copy(br_copy *c)
{
    free(c->src);
    free(c->src_len);
    c->src = NULL;
    c->src_len = NULL;
    free(c->dst);
    free(c->dst_len);
    free(c->view.ops);
    free(c->view.merges);
    free(c->view.stage_ops);
    c->dst = NULL;
    c->dst_len = NULL;
    c->view.ops = NULL;
    c->view.merges = NULL;
    c->view.stage_ops = NULL;
}

static void start_copy(bridge *b)
{
    int rc = bind_copy(b);
    if (rc == 0 && pthread_create(&b->copy.tid, NULL, copy_thread, &b->copy) != 0)
        rc = RLB_EIO;
    if (rc < 0) {
        free_copy(&b->copy);
        br_sync_abort(b, rc, "cannot start the copy: %s", rlb_strerror(rc));
        return;
    }
    b->copy_running = 1;
    b->copied = 1;
    b->sync = BR_SYNC_COPY;
    RLB_LOG_DEBUG(RLB_SUB_BRIDGE, "version %" PRIu64 ": copying %llu bytes", b->syncing,
                  (unsigned long long)b->copy.view.bytes_written);
}

void br_sync_join(bridge *b)
{
    if (!b->copy_running)
        return;
    pthread_join(b->copy.tid, NULL);
    uint64_t n;
    ssize_t got = read(b->copy.wake_fd, &n, sizeof(n));
    (void)got;
    b->copy_running = 0;
    free_copy(&b->copy);
    br_unpark(b);
}

void br_copy_done(bridge *b)
{
    double c0 = br_thread_cpu();
    br_sync_join(b);
    if (b->sync != BR_SYNC_COPY) /* aborted while the copy ran */
        return;
    b->last_copy_ms = b->copy.ms;
    if (b->copy.rc < 0) {
        br_sync_abort(b, b->copy.rc, "copy failed: %s", b->copy.err);
        return;
    }
    for (uint32_t d = 0; d < b->n_replicas; d++)
        for (uint32_t t = 0; b->replicas[d].state == BR_REP_UP && t < b->tp_size; t++) {
            br_peer *w = b->replicas[d].ranks[t];
            w->load_sent = 1;
            w->loaded = 0;
            send_load(b, w, b->syncing);
        }
    b->sync = BR_SYNC_LOAD;
    b->control_s += br_thread_cpu() - c0;
}

static void commit(bridge *b)
{
    uint64_t v = b->syncing;
    double ms = (br_now() - b->t_last_publish) * 1e3;
    uint64_t bytes = b->copy.view.bytes_written;
    b->committed = v;
    b->stale = 0;
    b->sync = BR_SYNC_IDLE;
    b->syncing = 0;
    b->copied = 0;
    reset_workers(b);
    b->n_syncs++;
    b->bytes_synced += bytes;
    b->last_sync_ms = ms;
    b->last_gbps = ms > 0 ? (double)bytes / (ms * 1e6) : 0;
    rlb_msg m = {.type = RLB_MSG_SYNCED,
                 .synced = {.version = v, .bytes = bytes, .ms = ms, .gbps = b->last_gbps}};
    tell_ranks(b, &m);
    b->last_control_ms = b->control_s * 1e3;
    b->control_s = 0;
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "version %" PRIu64 " committed: %llu bytes in %.2f ms "
                 "(copy %.2f ms, %.2f GB/s, bridge CPU %.3f ms)", v, (unsigned long long)bytes,
                 ms, b->last_copy_ms, b->last_gbps, b->last_control_ms);
}

void br_loaded(bridge *b, br_peer *w, const rlb_msg_outcome *m)
{
    double c0 = br_thread_cpu();
    if (b->sync != BR_SYNC_LOAD || m->version != b->syncing || !w->load_sent) {
        if (m->version == b->committed) /* a switch back after an abort */
            w->version = m->version;
        return;
    }
    if (m->code < 0) {
        br_sync_abort(b, m->code, "worker %u (replica %u, TP rank %u): post-load processing "
                      "failed: %s", w->hello.rank, w->hello.replica, w->hello.tp_rank,
                      m->text ? m->text : rlb_strerror(m->code));
        return;
    }
    w->loaded = 1;
    w->version = m->version;
    b->control_s += br_thread_cpu() - c0;
}

/* 1 when every worker of every live replica answered loaded(v). */
static int all_loaded(const bridge *b)
{
    for (uint32_t d = 0; d < b->n_replicas; d++)
        for (uint32_t t = 0; b->replicas[d].state == BR_REP_UP && t < b->tp_size; t++)
            if (!b->replicas[d].ranks[t]->loaded)
                return 0;
    return 1;
}

/* 1 when every replica is formed (or dead) and some replica is up. Aborts v when all
 * replicas died. */
static int workers_ready(bridge *b, uint64_t v)
{
    if (b->tp_size == 0)
        return 0;
    int up = 0;
    for (uint32_t d = 0; d < b->n_replicas; d++) {
        if (b->replicas[d].state == BR_REP_FORMING)
            return 0;
        up += b->replicas[d].state == BR_REP_UP;
    }
    if (!up)
        br_sync_abort(b, RLB_EPEERDEAD, "version %" PRIu64 ": no live worker replica", v);
    return up > 0;
}

int br_sync_progress(bridge *b)
{
    double c0 = br_thread_cpu();
    int did = 0;
    switch (b->sync) {
    case BR_SYNC_IDLE: {
        uint64_t v = all_published(b);
        if (!v || b->copy_running || !workers_ready(b, v))
            return 0;
        int rc = br_plan_ensure(b);
        if (rc <= 0) {
            br_sync_abort(b, rc < 0 ? rc : RLB_ENOTFOUND, "registrations are incomplete: %s",
                          b->reg_missing);
            return 1;
        }
        b->syncing = v;
        if (b->opts->mode == RLB_SYNC_PAUSE)
            b->sync = BR_SYNC_DRAIN;
        else
            start_copy(b);
        did = 1;
        break;
    }
    case BR_SYNC_DRAIN:
        if (br_inflight(b) == 0) {
            start_copy(b);
            did = 1;
        }
        break;
    case BR_SYNC_LOAD:
        if (all_loaded(b)) {
            commit(b);
            return 1;
        }
        break;
    case BR_SYNC_COPY:
        break;
    }
    if (did)
        b->control_s += br_thread_cpu() - c0;
    return did;
}

void br_sync_peer_lost(bridge *b, br_peer *trainer, br_peer *worker)
{
    if (trainer && pending_version(b))
        br_sync_abort(b, RLB_EPEERDEAD, "trainer rank %u disconnected", trainer->hello.rank);
    if (worker && (b->sync == BR_SYNC_COPY || b->sync == BR_SYNC_LOAD))
        br_sync_abort(b, RLB_EPEERDEAD, "worker %u (replica %u, TP rank %u) died",
                      worker->hello.rank, worker->hello.replica, worker->hello.tp_rank);
}
