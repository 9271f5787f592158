/* peer.c: what the bridge keeps per connection besides its role: the outbound queue that
 * keeps the event loop from ever blocking on a slow peer, and the shared-memory segments
 * the peer passed over its socket (common/segmsg.h).
 *
 * Outbound: a message is packed once into a heap record and moved into the peer's ring
 * when there is room, without ever waiting, in order; a message larger than one ring
 * record is streamed in fragments as the peer frees room (rlb__ring_send_from). A peer
 * whose queue makes no progress for RLB_PEER_TIMEOUT_MS (it does not read its ring) is
 * dropped by the loop's heartbeat check; nobody else waits for it meanwhile.
 *
 * Segments: mapped once when they arrive, unmapped when their last registered tensor goes
 * or the peer disconnects. Only segments sealed against shrinking and growing are mapped:
 * a peer that truncated an unsealed one under a sync would kill the bridge with SIGBUS.
 * While the copy thread runs a sync, unmapping is deferred ("parked") so the executor never
 * reads or writes freed memory.
 */
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bridge/bridge_int.h"
#include "common/env.h"
#include "common/log.h"
#include "common/segmsg.h"
#include "common/shm.h"

/* Appends o to p's queue and moves what fits. */
static void enqueue(bridge *b, br_peer *p, br_out *o)
{
    o->next = NULL;
    if (p->out_tail) {
        p->out_tail->next = o;
    } else {
        p->out_head = o;
        p->out_since = rlb__clock_s();
    }
    p->out_tail = o;
    br_flush(b, p);
}

int br_send_packed(bridge *b, br_peer *p, uint32_t type, const void *data, size_t len)
{
    if (p->closing == BR_CLOSE_NOW)
        return RLB_EPEERDEAD;
    br_out *o = malloc(sizeof(*o) + len);
    if (!o)
        return RLB_ENOMEM;
    o->type = type;
    o->len = len;
    memcpy(o->data, data, len);
    enqueue(b, p, o);
    return 0;
}

int br_send(bridge *b, br_peer *p, const rlb_msg *msg)
{
    size_t size;
    int rc = rlb__msg_packed_size(msg, &size);
    if (rc < 0) {
        RLB_LOG_ERROR(RLB_SUB_BRIDGE, "cannot encode a %s message for peer %u",
                      rlb__msg_type_name(msg->type), p->id);
        return rc;
    }
    if (p->closing == BR_CLOSE_NOW)
        return RLB_EPEERDEAD;
    br_out *o = malloc(sizeof(*o) + size);
    if (!o)
        return RLB_ENOMEM;
    if ((rc = rlb__msg_pack(msg, o->data, size, &o->len)) < 0) {
        free(o);
        return rc;
    }
    o->type = msg->type;
    enqueue(b, p, o);
    return 0;
}

int br_send_error(bridge *b, br_peer *p, int code, uint64_t request_id, uint32_t in_reply_to,
                  const char *fmt, ...)
{
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "error to peer %u (%s): %s", p->id, rlb_strerror(code), text);
    rlb_msg m = {.type = RLB_MSG_ERROR,
                 .error = {.code = code, .request_id = request_id, .in_reply_to = in_reply_to,
                           .text = text}};
    return br_send(b, p, &m);
}

static void out_pop(br_peer *p)
{
    br_out *o = p->out_head;
    p->out_head = o->next;
    if (!p->out_head)
        p->out_tail = NULL;
    free(o);
}

size_t br_out_need(br_peer *p)
{
    rlb_ring *tx = rlb__conn_tx(p->conn);
    return p->out_head ? rlb__ring_send_need(tx, p->out_head->len, p->out_off) : 0;
}

int br_flush(bridge *b, br_peer *p)
{
    rlb_ring *tx = rlb__conn_tx(p->conn);
    int moved = 0;
    while (p->out_head && p->closing != BR_CLOSE_NOW) {
        br_out *o = p->out_head;
        size_t before = p->out_off;
        int rc = rlb__ring_send_from(tx, o->type, o->data, o->len, &p->out_off, 0);
        if (p->out_off != before) {
            moved = 1;
            p->out_since = rlb__clock_s();
        }
        if (rc == RLB_EAGAIN || rc == RLB_ETIMEDOUT)
            return moved;
        if (rc < 0) {
            RLB_LOG_WARN(RLB_SUB_BRIDGE, "peer %u: a %zu-byte message did not go out (%s); "
                         "dropping the peer", p->id, o->len, rlb_strerror(rc));
            p->closing = BR_CLOSE_NOW;
            return moved;
        }
        p->out_off = 0;
        p->out_since = rlb__clock_s();
        out_pop(p);
        moved = 1;
    }
    (void)b;
    return moved;
}

int br_out_stalled(br_peer *p, double timeout_s)
{
    return p->out_head && rlb__clock_s() - p->out_since > timeout_s;
}

/* ---- Segments ----------------------------------------------------------------------- */

br_seg *br_seg_find(br_peer *p, uint32_t id)
{
    for (uint32_t i = 0; i < p->n_segs; i++)
        if (p->segs[i].id == id)
            return &p->segs[i];
    return NULL;
}

static int seg_grow(br_peer *p)
{
    if (p->n_segs < p->cap_segs)
        return 0;
    uint32_t cap = p->cap_segs ? 2 * p->cap_segs : 8;
    br_seg *grown = realloc(p->segs, cap * sizeof(*grown));
    if (!grown)
        return RLB_ENOMEM;
    p->segs = grown;
    p->cap_segs = cap;
    return 0;
}

/* What the executor knows a segment by. */
static rlb_exec_ref seg_ref(const br_seg *s)
{
    if (s->vmm)
        return (rlb_exec_ref){.kind = RLB_MEM_CUDA_VMM_FD, .fd = -1, .chunk_fds = s->fds,
                              .chunk_bytes = s->chunks, .n_chunks = s->n_chunks,
                              .alloc_bytes = s->bytes, .length = s->bytes};
    return (rlb_exec_ref){.kind = RLB_MEM_HOST_SHM, .fd = -1, .host = s->addr,
                          .alloc_bytes = s->bytes, .length = s->bytes};
}

int br_seg_map_device(bridge *b, br_seg *s, const uint8_t uuid[RLB_PROTO_UUID_BYTES],
                      char *why, size_t len)
{
    if (s->addr)
        return 0;
    int rc = br_use_cuda(b, why, len);
    if (rc < 0)
        return rc;
    rlb_exec_ref r = seg_ref(s);
    memcpy(r.device_uuid, uuid, sizeof(r.device_uuid));
    return b->exec->iface->map(b->exec, &r, &s->addr, why, len);
}

/* Gives a segment's memory back: the executor forgets it (a VMM import is released, a
 * host range unregistered), then the mapping and the fd go. */
static void seg_close(bridge *b, const br_seg *s)
{
    rlb_exec_ref r = seg_ref(s);
    if (s->addr && b->exec)
        b->exec->iface->unmap(b->exec, &r, s->addr);
    if (s->vmm) {
        for (uint32_t i = 0; i < s->n_chunks; i++)
            close(s->fds[i]);
        free(s->fds);
        free(s->chunks);
    } else {
        rlb__shm_unmap(s->addr, (size_t)s->bytes);
    }
}

/* Keeps received VMM chunks (fds and sizes) in p's table: a new segment, or the next
 * chunks of one whose earlier messages came already (segmsg.h: more chunks than one
 * message carries). The executor imports the segment once it is whole and a tensor or
 * the worker's hello names its GPU. Takes ownership of the fds. Returns 0, RLB_EPROTO (the
 * chunks overrun the segment, or the id names a host segment) or RLB_ENOMEM. */
static int seg_add_vmm(br_peer *p, const rlb__seg_msg *sm, const uint64_t *chunks,
                       const int *fds, int nfds)
{
    int rc = RLB_EPROTO;
    uint64_t sum = 0;
    for (int i = 0; i < nfds; i++)
        sum += chunks[i];
    br_seg *s = br_seg_find(p, sm->id);
    if (s && (!s->vmm || s->bytes != sm->bytes || s->have + sum > s->bytes))
        goto fail;
    if (!s && sum > sm->bytes)
        goto fail;
    rc = RLB_ENOMEM;
    if (!s) {
        if (seg_grow(p) < 0)
            goto fail;
        s = &p->segs[p->n_segs];
        *s = (br_seg){.id = sm->id, .bytes = sm->bytes, .vmm = 1};
    }
    int *f = realloc(s->fds, (s->n_chunks + (size_t)nfds) * sizeof(int));
    if (f)
        s->fds = f;
    uint64_t *c = realloc(s->chunks, (s->n_chunks + (size_t)nfds) * sizeof(uint64_t));
    if (c)
        s->chunks = c;
    if (!f || !c) {
        if (s == &p->segs[p->n_segs]) { /* not in the table yet */
            free(s->fds);
            free(s->chunks);
        }
        goto fail;
    }
    memcpy(s->fds + s->n_chunks, fds, (size_t)nfds * sizeof(int));
    memcpy(s->chunks + s->n_chunks, chunks, (size_t)nfds * sizeof(uint64_t));
    s->n_chunks += (uint32_t)nfds;
    s->have += sum;
    if (s == &p->segs[p->n_segs])
        p->n_segs++;
    RLB_LOG_DEBUG(RLB_SUB_BRIDGE, "peer %u: VMM segment %u: %d chunks (%llu of %llu bytes)",
                  p->id, sm->id, nfds, (unsigned long long)s->have,
                  (unsigned long long)s->bytes);
    return 0;
fail:
    RLB_LOG_WARN(RLB_SUB_BRIDGE, "peer %u: VMM segment message %u refused: %s", p->id, sm->id,
                 rlb_strerror(rc));
    for (int i = 0; i < nfds; i++)
        close(fds[i]);
    return rc;
}

br_seg *br_seg_ready(br_peer *p, uint32_t id)
{
    br_seg *s = br_seg_find(p, id);
    return s && (!s->vmm || s->have == s->bytes) ? s : NULL;
}

/* Maps one received segment into p's table. Takes ownership of fd. */
static int seg_add(br_peer *p, const rlb__seg_msg *sm, int fd)
{
    int rc = RLB_EPROTO;
    size_t size = 0;
    void *addr = NULL;
    if (sm->magic != RLB_SEG_MAGIC || sm->id == 0 || sm->bytes == 0 ||
        br_seg_find(p, sm->id)) {
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "peer %u: bad or duplicate segment message (id %u)",
                     p->id, sm->id);
        goto out;
    }
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW)) {
        /* Its owner could truncate it while the copy thread reads it (SIGBUS): it is kept
         * as refused, so the register naming it gets the reason rather than "never sent". */
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "peer %u: segment %u is not sealed against shrinking and "
                     "growing; refused", p->id, sm->id);
        if ((rc = seg_grow(p)) < 0)
            goto out;
        p->segs[p->n_segs++] = (br_seg){.id = sm->id, .bytes = sm->bytes,
                                        .refused = "not sealed against shrinking and growing "
                                                   "(F_SEAL_SHRINK | F_SEAL_GROW): allocate it "
                                                   "with rlb_alloc_host"};
        rc = 0;
        goto out;
    }
    if ((rc = rlb__shm_size(fd, &size)) < 0 || size < sm->bytes) {
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "peer %u: segment %u holds %zu bytes, message says %llu",
                     p->id, sm->id, size, (unsigned long long)sm->bytes);
        rc = RLB_EPROTO;
        goto out;
    }
    if ((rc = rlb__shm_map(fd, (size_t)sm->bytes, &addr)) < 0)
        goto out;
    if ((rc = seg_grow(p)) < 0) {
        rlb__shm_unmap(addr, (size_t)sm->bytes);
        goto out;
    }
    p->segs[p->n_segs++] = (br_seg){.id = sm->id, .addr = addr, .bytes = sm->bytes};
    RLB_LOG_DEBUG(RLB_SUB_BRIDGE, "peer %u: segment %u mapped (%llu bytes)", p->id, sm->id,
                  (unsigned long long)sm->bytes);
    rc = 0;
out:
    close(fd);
    return rc;
}

int br_recv_segments(bridge *b, br_peer *p, int wait_ms)
{
    for (;;) {
        struct {
            rlb__seg_msg sm;
            uint64_t chunks[RLB_SEG_VMM_MAX_CHUNKS]; /* VMM: the chunk sizes */
        } m;
        rlb__seg_msg sm;
        size_t len = 0;
        int fds[RLB_CONN_MAX_FDS];
        int nfds = 0;
        int rc = rlb__conn_recv_fds(p->conn, &m, sizeof(m), &len, fds, RLB_CONN_MAX_FDS,
                                    &nfds, wait_ms);
        if (rc == RLB_EAGAIN || rc == RLB_ETIMEDOUT)
            return 0;
        if (rc < 0)
            return rc;
        wait_ms = 0; /* only the first datagram is waited for */
        sm = m.sm;
        uint64_t sum = 0;
        for (int i = 0; i < nfds && i < (int)RLB_SEG_VMM_MAX_CHUNKS; i++)
            sum += m.chunks[i];
        if (len >= sizeof(sm) && sm.magic == RLB_SEG_MAGIC_VMM && nfds >= 1 &&
            nfds <= (int)RLB_SEG_VMM_MAX_CHUNKS &&
            len == sizeof(sm) + (size_t)nfds * sizeof(uint64_t) && sum <= sm.bytes &&
            sm.id != 0) {
            if ((rc = seg_add_vmm(p, &sm, m.chunks, fds, nfds)) < 0)
                return rc;
            continue;
        }
        if (len != sizeof(sm) || nfds != 1) {
            RLB_LOG_WARN(RLB_SUB_BRIDGE, "peer %u: socket message of %zu bytes with %d fds is "
                         "not a segment message", p->id, len, nfds);
            for (int i = 0; i < nfds; i++)
                close(fds[i]);
            return RLB_EPROTO;
        }
        if ((rc = seg_add(p, &sm, fds[0])) < 0)
            return rc;
    }
    (void)b;
}

void br_seg_release(bridge *b, br_seg *s)
{
    if (!s->addr && !s->vmm)
        return;
    if (b->copy_running || br_xnode_busy(b)) {
        if (b->n_parked == b->cap_parked) {
            uint32_t cap = b->cap_parked ? 2 * b->cap_parked : 8;
            br_seg *grown = realloc(b->parked, cap * sizeof(*grown));
            if (!grown) {
                /* Unmapping under the copy thread is never an option: leak the mapping. */
                RLB_LOG_ERROR(RLB_SUB_BRIDGE, "out of memory parking a segment; it stays mapped");
                s->addr = NULL;
                return;
            }
            b->parked = grown;
            b->cap_parked = cap;
        }
        b->parked[b->n_parked++] = *s;
    } else {
        seg_close(b, s);
    }
    s->addr = NULL;
    s->vmm = 0;
    s->fds = NULL;
    s->chunks = NULL;
    s->n_chunks = 0;
}

void br_release_unused_segments(bridge *b, br_peer *p)
{
    br_recv_segments(b, p, 0);
    for (uint32_t i = 0; i < p->n_segs;) {
        if (p->segs[i].refs) {
            i++;
            continue;
        }
        br_seg_release(b, &p->segs[i]);
        p->segs[i] = p->segs[--p->n_segs];
    }
}

uint32_t br_mapped_segments(const bridge *b)
{
    uint32_t n = 0;
    for (int i = 0; i < BR_MAX_PEERS; i++)
        for (uint32_t k = 0; b->peers[i] && k < b->peers[i]->n_segs; k++)
            n += b->peers[i]->segs[k].addr != NULL;
    return n;
}

void br_unpark(bridge *b)
{
    for (uint32_t i = 0; i < b->n_parked; i++)
        seg_close(b, &b->parked[i]);
    b->n_parked = 0;
}

br_peer *br_peer_by_id(bridge *b, uint32_t id)
{
    for (int i = 0; i < BR_MAX_PEERS; i++)
        if (b->peers[i] && b->peers[i]->id == id)
            return b->peers[i];
    return NULL;
}

void br_peer_free(bridge *b, br_peer *p)
{
    while (p->out_head)
        out_pop(p);
    for (uint32_t i = 0; i < p->n_segs; i++)
        br_seg_release(b, &p->segs[i]);
    free(p->segs);
    free(p->held);
    rlb__ring_rx_free(&p->rx);
    rlb__conn_close(p->conn);
    free(p);
}
