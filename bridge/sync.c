/* sync.c: a weight version as a transaction (DESIGN §5).
 *
 *   IDLE   ranks publish v; when every rank of the world published the same v, every
 *          replica is formed and the plan is ready, the sync starts (registrations still
 *          incomplete at that point abort v with the missing tensor's name).
 *   DRAIN  pause mode only: new generation is held in the bridge; the sync waits until no
 *          request runs on any replica. (A node of several drains first, then XNODE.)
 *   XNODE  a node of several (xnode.h): the exchange with the other nodes starts; once the
 *          plan is installed the copy runs pipelined with it, in waves (br_xnode_pump).
 *   COPY   the executor (kernels/executor.h: a CPU thread, or the GPU) runs the plan from
 *          the trainers' memory straight into the workers' buffers: in place (pause), or
 *          into each worker's free buffer (staged) while generation goes on with v-1.
 *          The loop keeps serving meanwhile and learns of the end through an eventfd in its
 *          poll set.
 *   LOAD   load(v, buffer) went to every worker of every live replica, naming the buffer
 *          the copy wrote; staged workers first finish what runs on v-1, then run post-load
 *          processing on the new buffer and switch to it (the engine's set_weights); all
 *          answer loaded(v, buffer). New generation is held (a request must never start on
 *          a version that may still be rolled back). When every worker answered, v is
 *          committed and every rank gets synced(v, bytes, ms, GB/s).
 *
 * Buffers. The bridge keeps, per worker, the buffer it serves from (`live`, as its last
 * loaded answer said), the one holding the committed version (`committed_buf`) and the loads it
 * has not answered yet. A staged sync writes the buffer that is not live; it starts (and
 * a heal copies) only once every worker answered all its loads, so no buffer a worker may
 * still switch to, or read while it post-processes it, is ever written. A worker whose
 * load failed answers so and serves its previous buffer; the sync is aborted, naming it.
 *
 * Poisoned versions. The copy counts the NaN / Inf values it writes, LoRA merges included
 * (fused into the executor). By default (RLB_NONFINITE=abort) a version holding any is aborted before a
 * worker loads it, naming each tensor and its count; RLB_NONFINITE=allow commits it with
 * a warning (sampling over non-finite logits is defined: kernels/cpu/sample.h).
 *
 * Replicas that come back (a worker restarted for a lost replica, or a new replica) form
 * JOINING after a commit: their buffers hold initial weights. When no sync runs, the heal
 * copies a live replica's buffers (the committed version, same layout) into theirs on the
 * copy thread, sends load(committed) and puts the replica into service once every rank
 * answered; no sync starts meanwhile. With no live replica to copy from, a joining replica
 * is a destination of the next sync like a live one and serves once that version commits.
 *
 * Abort (a rank dies before commit, a worker dies while buffers are written or loaded, a
 * copy, post-load processing or a switch fails, the weights hold NaN / Inf): every rank
 * that published v gets aborted(v, reason). Pause mode: if worker buffers were written,
 * they hold no complete version, so generation is refused with RLB_ESTALE until a later
 * version commits. Staged mode: the buffers holding v-1 were never written; every worker
 * sent load(v) gets load(committed version, its v-1 buffer), which switches it back (or
 * keeps it there, when it had not switched or could not). A worker that cannot switch
 * back takes its replica out of service. (Before
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
#include "common/env.h"
#include "common/log.h"
#include "kernels/cpu/convert.h"
#include "kernels/executor.h"

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
        if (br_xnode_remote_rank(b, r))
            continue; /* it publishes to its own node's bridge */
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

void br_publish(bridge *b, br_peer *p, const rlb_msg_publish *m)
{
    uint64_t version = m->version;
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
    /* The trainer's tensors are written by GPU work ordered before this event: the copy
     * waits on it on the GPU (a zero handle: no event, the rank synchronized itself). */
    static const uint8_t none[RLB_PROTO_HANDLE_BYTES];
    p->has_event = memcmp(m->event, none, sizeof(none)) != 0;
    memcpy(p->event, m->event, sizeof(p->event));
    b->t_last_publish = rlb__clock_s();
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
    for (uint32_t d = 0; d < b->n_replicas; d++) {
        b->replicas[d].in_sync = 0;
        for (uint32_t t = 0; t < b->tp_size; t++) {
            br_peer *w = b->replicas[d].ranks[t];
            if (w)
                w->load_sent = w->loaded = 0;
        }
    }
}

/* Sends load(version, buffer) to w, which serves from that buffer once it answered. */
static void send_load(bridge *b, br_peer *w, uint64_t version, int buffer)
{
    rlb_msg m = {.type = RLB_MSG_LOAD, .load = {.version = version, .buffer = (uint32_t)buffer}};
    if (br_send(b, w, &m) == 0)
        w->loads_out++;
}

/* Picks the buffer of w a copy writes (staged: the one it does not serve; pause: its only
 * one) and returns it. */
static void *write_target(const bridge *b, br_peer *w)
{
    w->target = b->opts->mode == RLB_SYNC_STAGED ? !w->live : w->live;
    return w->buf[w->target];
}

/* 1 when replica d's workers are all there and answered every load they were sent, so
 * their buffers may be written and their live buffers read. */
static int replica_settled(const bridge *b, uint32_t d)
{
    for (uint32_t t = 0; t < b->tp_size; t++)
        if (!b->replicas[d].ranks[t] || b->replicas[d].ranks[t]->loads_out)
            return 0;
    return 1;
}

static void free_copy(br_copy *c);

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
    if (br_xnode_abort_hook(b, code, text))
        return;
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
                    send_load(b, w, b->committed, !w->target); /* back to v-1's buffer */
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
    if (!b->copy_running)
        free_copy(&b->copy); /* a pipelined copy between its waves (a running one: on join) */
    b->sync = BR_SYNC_IDLE;
    b->syncing = 0;
    b->copied = 0;
    b->control_s = 0;
    b->n_aborts++;
}

/* Starts the executor on b->copy (a sync's plan, or a heal's). Returns 0 or a negative
 * code with b->copy.err saying why. */
static int run_copy(bridge *b)
{
    br_copy *c = &b->copy;
    c->err[0] = 0;
    rlb_exec_run run = {.plan = &c->view, .src = (void *const *)c->src, .src_len = c->src_len,
                        .dst = c->dst, .dst_len = c->dst_len, .threads = c->threads,
                        .nonfinite = c->nonfinite, .done_fd = c->wake_fd,
                        .events = (const uint8_t(*)[64])c->events,
                        .n_events = c->heal ? 0 : c->n_events};
    return br_executor(b)->iface->run(br_executor(b), &run, c->err, sizeof(c->err));
}

/* Binds the plan's destinations to the live replicas' buffers and keeps only their ops
 * and LoRA merges (both grouped by destination, replica by replica). Returns 0,
 * RLB_ENOMEM, or RLB_EPEERDEAD (c->err says so) when no replica is left to take the
 * version (all were lost while a pause-mode sync drained): a version no worker holds is
 * never committed. */
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
    c->view.merges = malloc(plan->n_merges * sizeof(*c->view.merges) + 1);
    c->view.stage_ops = malloc(plan->n_stage_ops * sizeof(*c->view.stage_ops) + 1);
    c->view.merge_copies = malloc(plan->n_merge_copies * sizeof(*c->view.merge_copies) + 1);
    c->nonfinite = malloc((plan->n_ops + plan->n_merges) * sizeof(*c->nonfinite) + 1);
    c->events = malloc(b->world * sizeof(*c->events) + 1);
    if (!c->src || !c->src_len || !c->dst || !c->dst_len || !c->view.ops || !c->view.merges ||
        !c->view.stage_ops || !c->view.merge_copies || !c->nonfinite || !c->events)
        return RLB_ENOMEM;
    c->n_events = 0;
    for (uint32_t r = 0; r < b->world; r++)
        if (b->trainers[r] && b->trainers[r]->has_event)
            memcpy(c->events[c->n_events++], b->trainers[r]->event, sizeof(*c->events));
    memcpy(c->src, b->src_ptr, b->n_src * sizeof(*c->src));
    memcpy(c->src_len, b->src_len, b->n_src * sizeof(*c->src_len));
    /* Every merge reads the whole stage and its copies by index: both are kept whole. */
    if (plan->n_stage_ops)
        memcpy(c->view.stage_ops, plan->stage_ops,
               plan->n_stage_ops * sizeof(*plan->stage_ops));
    if (plan->n_merge_copies)
        memcpy(c->view.merge_copies, plan->merge_copies,
               plan->n_merge_copies * sizeof(*plan->merge_copies));
    c->view.n_ops = 0;
    c->view.n_merges = 0;
    c->view.dst_first_merge = NULL; /* the executor reads merges by their dst_ref */
    c->view.bytes_written = 0;
    uint32_t bound = 0;
    for (uint32_t d = 0; d < b->n_replicas; d++) {
        if (b->replicas[d].state != BR_REP_UP && b->replicas[d].state != BR_REP_JOINING)
            continue;
        b->replicas[d].in_sync = 1;
        bound++;
        for (uint32_t t = 0; t < b->tp_size; t++) {
            uint32_t dst = d * b->tp_size + t;
            br_peer *w = b->replicas[d].ranks[t];
            c->dst[dst] = write_target(b, w);
            c->dst_len[dst] = plan->dst_bytes[dst];
            uint64_t first = plan->dst_first_op[dst], end = plan->dst_first_op[dst + 1];
            memcpy(c->view.ops + c->view.n_ops, plan->ops + first,
                   (end - first) * sizeof(*plan->ops));
            for (uint64_t i = first; i < end; i++)
                c->view.bytes_written += plan->ops[i].rows * plan->ops[i].row_elems *
                                         rlb_dtype_size((rlb_dtype)plan->ops[i].dst_dtype);
            c->view.n_ops += end - first;
            if (!plan->n_merges)
                continue;
            uint64_t m0 = plan->dst_first_merge[dst], m1 = plan->dst_first_merge[dst + 1];
            memcpy(c->view.merges + c->view.n_merges, plan->merges + m0,
                   (m1 - m0) * sizeof(*plan->merges));
            for (uint64_t i = m0; i < m1; i++)
                c->view.bytes_written += plan->merges[i].rows * plan->merges[i].cols *
                                         rlb_dtype_size((rlb_dtype)plan->merges[i].dst_dtype);
            c->view.n_merges += m1 - m0;
        }
    }
    c->threads = b->opts->threads;
    c->heal = 0;
    if (!bound)
        return snprintf(c->err, sizeof(c->err), "no live worker replica is left to take it"),
               RLB_EPEERDEAD;
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
    free(c->view.merge_copies);
    free(c->nonfinite);
    free(c->events);
    c->events = NULL;
    c->n_events = 0;
    c->dst = NULL;
    c->dst_len = NULL;
    c->view.ops = NULL;
    c->view.merges = NULL;
    c->view.stage_ops = NULL;
    c->view.merge_copies = NULL;
    c->view.src_bytes = NULL; /* borrowed (a heal's: the arrays above) */
    c->view.dst_bytes = NULL;
    c->nonfinite = NULL;
}

/* The heal's steps (below): its copy ended; a loaded answer that may be the heal's. */
static void heal_copy_done(bridge *b);
static int heal_loaded(bridge *b, br_peer *w, const rlb_msg_outcome *m);

static void start_copy(bridge *b)
{
    br_copy *c = &b->copy;
    c->err[0] = 0;
    const double t0 = rlb__clock_s();
    int rc = bind_copy(b);
    const double t_bound = rlb__clock_s();
    if (rc == 0 && !b->xnode)
        rc = run_copy(b);
    if (rc < 0) {
        free_copy(c);
        br_sync_abort(b, rc, "cannot start the copy: %s", c->err[0] ? c->err : rlb_strerror(rc));
        return;
    }
    b->sync = BR_SYNC_COPY;
    if (b->xnode)
        return; /* br_xnode_pump runs it in waves, each chunk's ops once the chunk is in */
    b->copy_running = 1;
    b->copied = 1;
    b->t_copy_launched = rlb__clock_s();
    RLB_LOG_DEBUG(RLB_SUB_BRIDGE, "version %" PRIu64 ": copying %llu bytes (%llu ops), "
                  "launched %.3f ms after the last publish (the plan bound to the workers' "
                  "buffers in %.3f ms, the executor started in %.3f ms)", b->syncing,
                  (unsigned long long)b->copy.view.bytes_written,
                  (unsigned long long)b->copy.view.n_ops,
                  (b->t_copy_launched - b->t_last_publish) * 1e3, (t_bound - t0) * 1e3,
                  (b->t_copy_launched - t_bound) * 1e3);
}

static void copy_finished(bridge *b);

/* Waits for the copy thread and releases what it held, keeping the copy's tables. */
static void copy_join(bridge *b)
{
    br_copy *c = &b->copy;
    c->err[0] = 0;
    c->rc = br_executor(b)->iface->finish(br_executor(b), &c->ms, c->err, sizeof(c->err));
    uint64_t n;
    ssize_t got = read(b->copy.wake_fd, &n, sizeof(n));
    (void)got;
    b->copy_running = 0;
    br_xnode_joined(b);
    br_unpark(b);
}

void br_sync_join(bridge *b)
{
    if (!b->copy_running)
        return;
    copy_join(b);
    free_copy(&b->copy);
}

/* The source piece holding byte `at` of source buffer `buf`, or NULL; `hint` is the last
 * one found (poisoned elements come in runs). */
static const rlb_src_piece *piece_at(const rlb_source *src, uint32_t buf, uint64_t at,
                                     const rlb_src_piece *hint)
{
    for (uint64_t k = 0; k <= src->n_pieces; k++) {
        const rlb_src_piece *p = k == 0 ? hint : &src->pieces[k - 1];
        if (p && p->buffer == buf && at >= p->offset &&
            at - p->offset < p->n_elems * rlb_dtype_size(p->dtype))
            return p;
    }
    return NULL;
}

/* The index piece p names in the parameter list of the plan's source (b->params on one
 * node, every node's adapters too on several: xnode.c), or that list's n for none. */
static uint64_t param_of(const bridge *b, const rlb_src_piece *p)
{
    return p ? (uint64_t)p->param : (uint64_t)b->source.params->n;
}

/* 1 when destination dst_ref is a buffer the bridge can read: a CPU worker's host memory
 * (a GPU worker's weights are device memory; a worker gone since has nothing to read). */
static int dst_readable(const bridge *b, uint32_t dst_ref)
{
    const br_peer *w = b->replicas[dst_ref / b->tp_size].ranks[dst_ref % b->tp_size];
    return w && w->hello.device != RLB_DEVICE_CUDA;
}

/* Adds to per[param] (per[n]: unknown; the source's parameters) each non-finite element copy op `op` left in
 * the destination, traced back to the source piece it came from; *hint is the last piece
 * found. Where the destination cannot be read, the op's count (bad) goes to the piece the
 * op starts in. */
static void trace_op(const bridge *b, const rlb_copy_op *op, uint64_t bad, uint64_t *per,
                     const rlb_src_piece **hint)
{
    const br_copy *c = &b->copy;
    if (!dst_readable(b, op->dst_ref)) {
        *hint = piece_at(&b->source, op->src_ref, op->src_offset, *hint);
        per[param_of(b, *hint)] += bad;
        return;
    }
    uint64_t ses = rlb_dtype_size((rlb_dtype)op->src_dtype);
    uint64_t des = rlb_dtype_size((rlb_dtype)op->dst_dtype);
    const uint8_t *d = (const uint8_t *)c->dst[op->dst_ref] + op->dst_offset;
    for (uint64_t r = 0; r < op->rows; r++)
        for (uint64_t e = 0; e < op->row_elems; e++) {
            if (!rlb__row_nonfinite(d + r * op->dst_stride + e * des, 1, op->dst_dtype))
                continue;
            *hint = piece_at(&b->source, op->src_ref,
                             op->src_offset + r * op->src_stride + e * ses, *hint);
            per[param_of(b, *hint)]++;
        }
}

/* Writes "name: count, ..." for the non-finite values the copy counted, by tensor: each
 * poisoned element an op wrote is traced back to the source piece it came from, and a LoRA
 * merge's count goes to the weight whose base its copies bring ("name (LoRA-merged)"),
 * without reading the destination. This pass runs only for a poisoned version, over the
 * ops and merges that counted any. */
static void name_nonfinite(const bridge *b, char *text, size_t len)
{
    const br_copy *c = &b->copy;
    const rlb_param_list *pl = b->source.params;
    uint64_t n = (uint64_t)pl->n + 1;
    uint64_t *per = calloc(2 * n, sizeof(*per)); /* copied [0, n), merged [n, 2n) */
    size_t at = 0;
    text[0] = 0;
    if (!per)
        return;
    const rlb_src_piece *hint = NULL;
    for (uint64_t i = 0; i < c->view.n_ops; i++)
        if (c->nonfinite[i])
            trace_op(b, &c->view.ops[i], c->nonfinite[i], per, &hint);
    for (uint64_t i = 0; i < c->view.n_merges; i++) {
        const rlb_merge_op *m = &c->view.merges[i];
        uint64_t bad = c->nonfinite[c->view.n_ops + i];
        if (!bad || !m->n_copies)
            continue;
        const rlb_copy_op *op = &c->view.merge_copies[m->copy_first];
        hint = piece_at(&b->source, op->src_ref, op->src_offset, hint);
        per[n + param_of(b, hint)] += bad;
    }
    for (uint64_t k = 0; k < 2 * n && at + 1 < len; k++)
        if (per[k]) {
            uint64_t p = k % n;
            int w = snprintf(text + at, len - at, "%s%s%s: %llu", at ? ", " : "",
                             p < n - 1 ? pl->params[p].name : "(unknown tensor)",
                             k >= n ? " (LoRA-merged)" : "", (unsigned long long)per[k]);
            at = w < 0 ? len : at + (size_t)w;
        }
    free(per);
}

void br_copy_done(bridge *b)
{
    double c0 = br_thread_cpu();
    if (!b->copy_running)
        return;
    copy_join(b);
    if (b->copy.heal) {
        heal_copy_done(b);
        return;
    }
    if (b->sync != BR_SYNC_COPY) { /* aborted while the copy ran */
        free_copy(&b->copy);
        return;
    }
    if (b->copy.rc < 0) {
        free_copy(&b->copy);
        br_sync_abort(b, b->copy.rc, "copy failed: %s", b->copy.err);
        return;
    }
    if (!b->xnode) /* else one wave of a pipelined copy ended: br_xnode_pump goes on */
        copy_finished(b);
    b->control_s += br_thread_cpu() - c0;
}

/* The whole plan was copied: poisoned values abort the version, else every worker in the
 * sync loads it. */
static void copy_finished(bridge *b)
{
    b->last_copy_ms = b->copy.ms;
    b->t_loads_sent = rlb__clock_s();
    b->copy.n_nonfinite = 0;
    for (uint64_t i = 0; i < b->copy.view.n_ops + b->copy.view.n_merges; i++)
        b->copy.n_nonfinite += b->copy.nonfinite[i];
    if (b->copy.n_nonfinite) {
        char where[384];
        uint64_t n = b->copy.n_nonfinite;
        int allow = !strcmp(rlb__env_str(RLB_KNOB_NONFINITE), "allow");
        name_nonfinite(b, where, sizeof(where));
        free_copy(&b->copy);
        if (!allow) {
            br_sync_abort(b, RLB_ENONFINITE, "version %" PRIu64 " holds %llu non-finite "
                          "values (NaN/Inf) in the weights written to the workers: %s "
                          "(RLB_NONFINITE=allow commits such versions)", b->syncing,
                          (unsigned long long)n, where);
            return;
        }
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "version %" PRIu64 " holds %llu non-finite values "
                     "(NaN/Inf), committed anyway (RLB_NONFINITE=allow): %s", b->syncing,
                     (unsigned long long)n, where);
    } else {
        free_copy(&b->copy);
    }
    for (uint32_t d = 0; d < b->n_replicas; d++)
        for (uint32_t t = 0; b->replicas[d].in_sync && t < b->tp_size; t++) {
            br_peer *w = b->replicas[d].ranks[t];
            w->load_sent = 1;
            w->loaded = 0;
            send_load(b, w, b->syncing, w->target);
        }
    b->sync = BR_SYNC_LOAD;
}

static void commit(bridge *b)
{
    uint64_t v = b->syncing;
    const double now = rlb__clock_s();
    double ms = (now - b->t_last_publish) * 1e3;
    uint64_t bytes = b->copy.view.bytes_written;
    if (b->t_copy_launched >= b->t_last_publish && b->t_loads_sent >= b->t_copy_launched) {
        b->last_launch_ms = (b->t_copy_launched - b->t_last_publish) * 1e3;
        b->last_copy_wall_ms = (b->t_loads_sent - b->t_copy_launched) * 1e3;
        b->last_load_ms = (now - b->t_loads_sent) * 1e3;
    }
    b->committed = v;
    b->stale = 0;
    b->sync = BR_SYNC_IDLE;
    b->syncing = 0;
    b->copied = 0;
    for (uint32_t d = 0; d < b->n_replicas; d++) {
        for (uint32_t t = 0; b->replicas[d].in_sync && t < b->tp_size; t++)
            b->replicas[d].ranks[t]->committed_buf = b->replicas[d].ranks[t]->target;
        if (b->replicas[d].in_sync && b->replicas[d].state == BR_REP_JOINING) {
            b->n_heals++;
            br_replica_up(b, (int)d);
        }
    }
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

/* Takes w's answer to its oldest unanswered load: it serves `buffer` now. Once every load
 * is answered and no sync or heal waits for it, it must serve the committed version; a
 * worker that does not (its switch back after an aborted sync failed) takes its replica
 * out of service. Returns 0 when w had no load to answer (the answer is ignored). */
static int take_answer(bridge *b, br_peer *w, uint32_t buffer, const char *text)
{
    if (!w->loads_out) {
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "worker %u answered a load it was not sent",
                     w->hello.rank);
        return 0;
    }
    w->loads_out--;
    if (buffer < (b->opts->mode == RLB_SYNC_STAGED ? 2u : 1u))
        w->live = (int)buffer;
    br_replica *r = &b->replicas[w->hello.replica];
    if (!w->loads_out && !w->load_sent && w->live != w->committed_buf && !b->stale &&
        r->state == BR_REP_UP) {
        char why[256];
        snprintf(why, sizeof(why), "worker %u serves weight buffer %d, not buffer %d holding "
                 "version %" PRIu64 " (its switch back failed: %s)", w->hello.rank, w->live,
                 w->committed_buf, b->committed, text ? text : "no reason given");
        br_replica_kill(b, (int)w->hello.replica, why);
    }
    return 1;
}

/* w's load failed (code, text; version 0: a load it could not read): the sync in flight
 * or the heal of its replica gives up, when the load was theirs. The worker goes on
 * serving the buffer it served before. */
static void load_failed(bridge *b, br_peer *w, uint64_t version, int code, const char *text)
{
    const char *why = text ? text : rlb_strerror(code);
    if (b->heal == (int)w->hello.replica && b->heal_copied && w->load_sent &&
        (!version || version == b->committed)) {
        char what[256];
        snprintf(what, sizeof(what), "its load of version %" PRIu64 " failed: %s",
                 b->committed, why);
        br_replica_kill(b, b->heal, what); /* which abandons the heal */
        return;
    }
    if (b->sync == BR_SYNC_LOAD && w->load_sent && (!version || version == b->syncing))
        br_sync_abort(b, code, "worker %u (replica %u, TP rank %u) could not load version %"
                      PRIu64 ": %s; it goes on serving the version it served", w->hello.rank,
                      w->hello.replica, w->hello.tp_rank, b->syncing, why);
}

void br_loaded(bridge *b, br_peer *w, const rlb_msg_outcome *m)
{
    double c0 = br_thread_cpu();
    if (!take_answer(b, w, m->buffer, m->text))
        return;
    if (m->code < 0) {
        load_failed(b, w, m->version, m->code, m->text);
        return;
    }
    if (heal_loaded(b, w, m))
        return;
    if (b->sync != BR_SYNC_LOAD || m->version != b->syncing || !w->load_sent)
        return; /* a switch back after an abort, or the answer to an aborted sync's load */
    w->loaded = 1;
    b->control_s += br_thread_cpu() - c0;
}

void br_load_refused(bridge *b, br_peer *w, int code, const char *text)
{
    if (take_answer(b, w, (uint32_t)w->live, text))
        load_failed(b, w, 0, code, text);
}

/* 1 when every worker of every replica in the sync answered loaded(v). */
static int all_loaded(const bridge *b)
{
    for (uint32_t d = 0; d < b->n_replicas; d++)
        for (uint32_t t = 0; b->replicas[d].in_sync && t < b->tp_size; t++)
            if (!b->replicas[d].ranks[t]->loaded)
                return 0;
    return 1;
}

/* 1 when every live or joining replica answered all its loads: a sync starts only then,
 * so it never writes a buffer a worker may still switch to (or read while it switches). */
static int loads_answered(const bridge *b)
{
    for (uint32_t d = 0; d < b->n_replicas; d++)
        if ((b->replicas[d].state == BR_REP_UP || b->replicas[d].state == BR_REP_JOINING) &&
            !replica_settled(b, d))
            return 0;
    return 1;
}

/* 1 when some replica can take the version: live or joining, and, before any replica has
 * served, every replica formed (or dead). Aborts v when all replicas died. */
static int workers_ready(bridge *b, uint64_t v)
{
    if (b->tp_size == 0)
        return 0;
    int up = 0;
    for (uint32_t d = 0; d < b->n_replicas; d++) {
        if (b->replicas[d].state == BR_REP_FORMING && !b->ever_up)
            return 0;
        up += b->replicas[d].state == BR_REP_UP || b->replicas[d].state == BR_REP_JOINING;
    }
    if (!up)
        br_sync_abort(b, RLB_ENOREPLICA, "version %" PRIu64 ": no live worker replica", v);
    return up > 0;
}

int br_sync_progress(bridge *b)
{
    double c0 = br_thread_cpu();
    int did = 0;
    br_xnode_tick(b);
    switch (b->sync) {
    case BR_SYNC_IDLE: {
        uint64_t v = all_published(b);
        if (!v || b->copy_running || b->heal >= 0 || !loads_answered(b) ||
            !workers_ready(b, v))
            return 0;
        if (b->xnode && b->opts->mode == RLB_SYNC_PAUSE) {
            b->syncing = v; /* drained first: the exchange's chunks are copied as they come */
            b->sync = BR_SYNC_DRAIN;
            return 1;
        }
        if (b->xnode)
            return br_xnode_begin(b, v); /* the exchange, pipelined with the copy */
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
    case BR_SYNC_XNODE:
        if (br_xnode_poll(b) <= 0)
            return 0;
        start_copy(b);
        return 1;
    case BR_SYNC_DRAIN:
        if (br_inflight(b) == 0 && b->xnode)
            return br_xnode_begin(b, b->syncing);
        if (br_inflight(b) == 0) {
            start_copy(b);
            did = 1;
        }
        break;
    case BR_SYNC_LOAD:
        if (all_loaded(b)) {
            int ready = br_xnode_commit_ready(b); /* one node of several: node 0 decides */
            if (ready > 0)
                commit(b);
            return ready != 0;
        }
        break;
    case BR_SYNC_COPY:
        if (b->xnode && !b->copy_running) { /* pipelined: the next wave, or the end */
            int r = br_xnode_pump(b);
            if (r == 2)
                copy_finished(b);
            return r != 0;
        }
        break;
    }
    if (did)
        b->control_s += br_thread_cpu() - c0;
    return did;
}

/* ---- Heal -------------------------------------------------------------------------- */

void br_heal_lost(bridge *b, int replica)
{
    if (b->heal != replica)
        return;
    RLB_LOG_WARN(RLB_SUB_BRIDGE, "replica %d: heal abandoned", replica);
    b->heal = -1;
    b->heal_copied = 0;
}

/* Binds the heal copy: one op per TP rank, the whole buffer of live replica `from` into
 * the buffer of joining replica `to` that its load will make active. */
static int bind_heal(bridge *b, int from, int to)
{
    br_copy *c = &b->copy;
    uint32_t T = b->tp_size;
    c->view = (rlb_plan){.n_src = T, .n_dst = T};
    c->src = malloc(T * sizeof(*c->src));
    c->src_len = malloc(T * sizeof(*c->src_len));
    c->dst = malloc(T * sizeof(*c->dst));
    c->dst_len = malloc(T * sizeof(*c->dst_len));
    c->view.ops = calloc(T, sizeof(*c->view.ops));
    c->nonfinite = malloc(T * sizeof(*c->nonfinite));
    if (!c->src || !c->src_len || !c->dst || !c->dst_len || !c->view.ops || !c->nonfinite)
        return RLB_ENOMEM;
    for (uint32_t t = 0; t < T; t++) {
        const br_peer *s = b->replicas[from].ranks[t];
        br_peer *w = b->replicas[to].ranks[t];
        uint64_t bytes = w->buf_bytes;
        int wide = bytes % 4 == 0; /* a byte copy: the dtype only sets the element size */
        c->src[t] = s->buf[s->live];
        c->src_len[t] = s->buf_bytes;
        c->dst[t] = write_target(b, w);
        c->dst_len[t] = bytes;
        c->view.ops[t] = (rlb_copy_op){
            .src_ref = t, .dst_ref = t, .src_dtype = wide ? RLB_DTYPE_F32 : RLB_DTYPE_BF16,
            .dst_dtype = wide ? RLB_DTYPE_F32 : RLB_DTYPE_BF16, .rows = 1,
            .row_elems = bytes / (wide ? 4 : 2)};
        c->view.bytes_written += bytes;
    }
    c->view.n_ops = T;
    /* the sizes an executor checks the ranges against (the CUDA one reads them): the view
     * borrows the copy's own arrays, freed with it */
    c->view.src_bytes = c->src_len;
    c->view.dst_bytes = c->dst_len;
    c->threads = b->opts->threads;
    c->heal = 1;
    return 0;
}

int br_heal_progress(bridge *b)
{
    /* After an aborted pause-mode sync the live buffers are stale: the next sync heals. */
    if (b->heal >= 0 || b->sync != BR_SYNC_IDLE || b->copy_running || b->committed == 0 ||
        b->stale || br_xnode_busy(b))
        return 0;
    int to = -1, from = -1;
    for (uint32_t d = 0; d < b->n_replicas; d++) {
        if (b->replicas[d].state == BR_REP_JOINING && to < 0)
            to = (int)d;
        if (b->replicas[d].state == BR_REP_UP && from < 0)
            from = (int)d;
    }
    if (to < 0 || from < 0)
        return 0; /* nothing to heal, or no live copy: the next sync brings it in */
    if (!replica_settled(b, (uint32_t)to) || !replica_settled(b, (uint32_t)from))
        return 0; /* a switch is still on its way */
    int rc = bind_heal(b, from, to);
    if (rc == 0)
        rc = run_copy(b);
    if (rc < 0) {
        free_copy(&b->copy);
        br_replica_kill(b, to, "cannot copy the committed version into it");
        return 1;
    }
    b->copy_running = 1;
    b->heal = to;
    b->heal_copied = 0;
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "replica %d: copying version %" PRIu64 " from replica %d",
                 to, b->committed, from);
    return 1;
}

/* The heal copy ended: load the committed version on every rank of the replica. */
static void heal_copy_done(bridge *b)
{
    int to = b->heal;
    int rc = b->copy.rc;
    free_copy(&b->copy);
    if (to < 0)
        return; /* the replica died meanwhile */
    if (rc < 0) {
        b->heal = -1;
        br_replica_kill(b, to, "the copy of the committed version into it failed");
        return;
    }
    for (uint32_t t = 0; t < b->tp_size; t++) {
        br_peer *w = b->replicas[to].ranks[t];
        w->load_sent = 1;
        w->loaded = 0;
        send_load(b, w, b->committed, w->target);
    }
    b->heal_copied = 1;
}

/* A loaded(committed) of the replica being healed. Returns 1 when it was one. */
static int heal_loaded(bridge *b, br_peer *w, const rlb_msg_outcome *m)
{
    int to = b->heal;
    if (to < 0 || !b->heal_copied || w->hello.replica != (uint32_t)to ||
        m->version != b->committed || !w->load_sent)
        return 0;
    w->loaded = 1;
    br_replica *r = &b->replicas[to];
    for (uint32_t t = 0; t < b->tp_size; t++)
        if (!r->ranks[t]->loaded)
            return 1;
    for (uint32_t t = 0; t < b->tp_size; t++) {
        r->ranks[t]->load_sent = r->ranks[t]->loaded = 0;
        r->ranks[t]->committed_buf = r->ranks[t]->target;
    }
    b->heal = -1;
    b->heal_copied = 0;
    b->n_heals++;
    br_replica_up(b, to);
    br_dispatch(b);
    return 1;
}

void br_sync_peer_lost(bridge *b, br_peer *trainer, br_peer *worker, const char *why)
{
    if (trainer && pending_version(b))
        br_sync_abort(b, RLB_EPEERDEAD, "trainer rank %u is gone: %s", trainer->hello.rank,
                      why);
    if (worker && (b->sync == BR_SYNC_COPY || b->sync == BR_SYNC_LOAD))
        br_sync_abort(b, RLB_EPEERDEAD, "worker %u (replica %u, TP rank %u) is gone: %s",
                      worker->hello.rank, worker->hello.replica, worker->hello.tp_rank, why);
}
