/* peer.c: what the bridge keeps per connection besides its role: the outbound queue that
 * keeps the event loop from ever blocking on a slow peer, and the shared-memory segments
 * the peer passed over its socket (common/segmsg.h).
 *
 * Outbound: a message is packed once into a heap record and moved into the peer's ring
 * when there is room, without waiting (claim with timeout 0), in order. A message larger
 * than one ring record cannot be moved piecewise from outside the ring (fragments carry
 * ring-private flags), so it goes through rlb__ring_send with a bound of
 * RLB_PEER_TIMEOUT_MS once it reaches the head of the queue: a peer that does not read a
 * many-MB result within that bound is dropped rather than stalling everyone else.
 *
 * Segments: mapped once when they arrive, unmapped when their last registered tensor goes
 * or the peer disconnects. While the copy thread runs a sync, unmapping is deferred
 * ("parked") so the executor never reads or writes freed memory.
 */
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
    if (p->out_tail)
        p->out_tail->next = o;
    else
        p->out_head = o;
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

int br_flush(bridge *b, br_peer *p)
{
    rlb_ring *tx = rlb__conn_tx(p->conn);
    size_t max_payload = rlb__ring_max_payload(tx);
    int moved = 0;
    while (p->out_head && p->closing != BR_CLOSE_NOW) {
        br_out *o = p->out_head;
        if (o->len > max_payload) {
            int rc = rlb__ring_send(tx, o->type, o->data, o->len,
                                    (int)rlb__env_int(RLB_KNOB_PEER_TIMEOUT_MS));
            if (rc < 0) {
                RLB_LOG_WARN(RLB_SUB_BRIDGE, "peer %u: a %zu-byte message did not go out "
                             "(%s); dropping the peer", p->id, o->len, rlb_strerror(rc));
                p->closing = BR_CLOSE_NOW;
                return moved;
            }
        } else {
            void *slot;
            size_t cap;
            int rc = rlb__ring_claim(tx, o->len, 0, &slot, &cap);
            if (rc == RLB_EAGAIN || rc == RLB_ETIMEDOUT)
                return moved;
            if (rc < 0) {
                p->closing = BR_CLOSE_NOW;
                return moved;
            }
            memcpy(slot, o->data, o->len);
            rlb__ring_commit(tx, o->type, o->len);
        }
        out_pop(p);
        moved = 1;
    }
    (void)b;
    return moved;
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
        return (rlb_exec_ref){.kind = RLB_MEM_CUDA_VMM_FD, .fd = s->fd, .alloc_bytes = s->bytes,
                              .length = s->bytes};
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
    if (s->vmm)
        close(s->fd);
    else
        rlb__shm_unmap(s->addr, (size_t)s->bytes);
}

/* Maps one received segment into p's table. Takes ownership of fd. */
static int seg_add(br_peer *p, const rlb__seg_msg *sm, int fd)
{
    int rc = RLB_EPROTO;
    size_t size = 0;
    void *addr = NULL;
    if ((sm->magic != RLB_SEG_MAGIC && sm->magic != RLB_SEG_MAGIC_VMM) || sm->id == 0 ||
        sm->bytes == 0 || br_seg_find(p, sm->id)) {
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "peer %u: bad or duplicate segment message (id %u)",
                     p->id, sm->id);
        goto out;
    }
    if (sm->magic == RLB_SEG_MAGIC_VMM) {
        /* Device memory: imported by the executor when a tensor or the worker's hello names
         * its GPU; the fd stays open until then and identifies the allocation. */
        if ((rc = seg_grow(p)) < 0)
            goto out;
        p->segs[p->n_segs++] = (br_seg){.id = sm->id, .bytes = sm->bytes, .vmm = 1, .fd = fd};
        RLB_LOG_DEBUG(RLB_SUB_BRIDGE, "peer %u: VMM segment %u received (%llu bytes)", p->id,
                      sm->id, (unsigned long long)sm->bytes);
        return 0;
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
    p->segs[p->n_segs++] = (br_seg){.id = sm->id, .addr = addr, .bytes = sm->bytes, .fd = -1};
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
        rlb__seg_msg sm;
        size_t len = 0;
        int fds[RLB_CONN_MAX_FDS];
        int nfds = 0;
        int rc = rlb__conn_recv_fds(p->conn, &sm, sizeof(sm), &len, fds, RLB_CONN_MAX_FDS,
                                    &nfds, wait_ms);
        if (rc == RLB_EAGAIN || rc == RLB_ETIMEDOUT)
            return 0;
        if (rc < 0)
            return rc;
        wait_ms = 0; /* only the first datagram is waited for */
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
    s->fd = -1;
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
    rlb__ring_rx_free(&p->rx);
    rlb__conn_close(p->conn);
    free(p);
}
