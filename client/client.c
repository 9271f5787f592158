/* client.c: an rlb_client's connection to the bridge: connect and hello, the locked send
 * path, the receive pump that any waiting thread may drive, the dispatch of every incoming
 * message to what waits for it, error texts, and publish (DESIGN §5, §7).
 */
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "client/client_internal.h"
#include "common/check.h"
#include "common/clock.h"
#include "common/env.h"
#include "common/log.h"

/* Largest message the pump reassembles: results of many MB pass whole, and a bridge that
 * announces more than this is not one we talk to. */
#define MAX_INCOMING (1ull << 31)

/* rlb_last_error hands out this thread's copy, so another thread's failure on the same
 * client cannot change the text while the caller reads it. */
static _Thread_local char tls_err[RLB_CLIENT_ERR_MAX];
/* Why this thread's last call without a client (rlb_connect, rlb_tensor_bytes,
 * rlb_peft_to_hf) failed: there is no client to hold it. */
static _Thread_local char tls_call_err[RLB_CLIENT_ERR_MAX];

/* ---- errors ---------------------------------------------------------------------------- */

static void vformat(char *buf, int code, const char *fmt, va_list ap)
{
    int n = vsnprintf(buf, RLB_CLIENT_ERR_MAX, fmt, ap);
    if (n >= 0 && n < RLB_CLIENT_ERR_MAX - 8)
        snprintf(buf + n, (size_t)(RLB_CLIENT_ERR_MAX - n), " (%s)", rlb_strerror(code));
}

int rlb__fail_locked(rlb_client *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vformat(c->err, code, fmt, ap);
    va_end(ap);
    RLB_LOG_DEBUG(RLB_SUB_CLIENT, "%s", c->err);
    return code;
}

int rlb__fail(rlb_client *c, int code, const char *fmt, ...)
{
    pthread_mutex_lock(&c->lock);
    va_list ap;
    va_start(ap, fmt);
    vformat(c->err, code, fmt, ap);
    va_end(ap);
    RLB_LOG_DEBUG(RLB_SUB_CLIENT, "%s", c->err);
    pthread_mutex_unlock(&c->lock);
    return code;
}

int rlb__fail_call(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vformat(tls_call_err, code, fmt, ap);
    va_end(ap);
    RLB_LOG_DEBUG(RLB_SUB_CLIENT, "%s", tls_call_err);
    return code;
}

void rlb__call_begin(void)
{
    tls_call_err[0] = 0;
}

RLB_API const char *rlb_last_error(rlb_client *client)
{
    if (!client) {
        memcpy(tls_err, tls_call_err, sizeof(tls_err));
        return tls_err;
    }
    pthread_mutex_lock(&client->lock);
    memcpy(tls_err, client->err, sizeof(tls_err));
    pthread_mutex_unlock(&client->lock);
    return tls_err;
}

int rlb__check_struct_size(rlb_client *c, size_t given, size_t min, size_t cur, const char *what)
{
    if (given >= min && given <= cur)
        return 0;
    const char *fmt = "%s.struct_size is %zu; this library knows sizes %zu..%zu (initialize "
                      "it with its _init function)";
    return c ? rlb__fail(c, RLB_EVERSION, fmt, what, given, min, cur)
             : rlb__fail_call(RLB_EVERSION, fmt, what, given, min, cur);
}

int rlb__grow(void *array, uint32_t *cap, uint32_t need, size_t size)
{
    if (need <= *cap)
        return 0;
    uint32_t n = *cap ? *cap : 8;
    while (n < need) {
        if (n > UINT32_MAX / 2)
            return RLB_ENOMEM;
        n *= 2;
    }
    void **p = array;
    void *grown = realloc(*p, (size_t)n * size);
    if (!grown)
        return RLB_ENOMEM;
    *p = grown;
    *cap = n;
    return 0;
}

uint64_t rlb__next_id(rlb_client *c)
{
    return c->next_id++;
}

/* ---- sending --------------------------------------------------------------------------- */

int rlb__send(rlb_client *c, const rlb_msg *msg, int timeout_ms)
{
    size_t size, len;
    int rc = rlb__msg_packed_size(msg, &size);
    if (rc < 0)
        return rlb__fail(c, rc, "%s message failed validation", rlb__msg_type_name(msg->type));
    pthread_mutex_lock(&c->tx_lock);
    if (size > c->pack_cap) {
        void *grown = realloc(c->pack_buf, size);
        if (!grown) {
            pthread_mutex_unlock(&c->tx_lock);
            return rlb__fail(c, RLB_ENOMEM, "no memory to encode a %zu-byte message", size);
        }
        c->pack_buf = grown;
        c->pack_cap = size;
    }
    rc = rlb__msg_pack(msg, c->pack_buf, c->pack_cap, &len);
    if (rc == 0)
        rc = rlb__ring_send(rlb__conn_tx(c->conn), msg->type, c->pack_buf, len, timeout_ms);
    pthread_mutex_unlock(&c->tx_lock);
    if (rc < 0)
        return rlb__fail(c, rc, "sending %s to the bridge failed",
                         rlb__msg_type_name(msg->type));
    return 0;
}

/* ---- dispatch -------------------------------------------------------------------------- */

/* A code from the wire: negative and known, else RLB_EPROTO. */
static int wire_code(int32_t code)
{
    return code < 0 && code > -RLB_E_COUNT_ ? code : RLB_EPROTO;
}

static void ctl_finish(rlb_client *c, int code)
{
    c->ctl.done = 1;
    c->ctl.code = code;
}

static void on_error(rlb_client *c, const rlb_msg_error *e)
{
    int code = wire_code(e->code);
    const char *what = e->in_reply_to ? rlb__msg_type_name(e->in_reply_to) : "a message";
    if (e->request_id && rlb__ticket_on_error(c, e->request_id, code, e->text))
        return;
    if (e->request_id && rlb__stats_on_error(c, e->request_id, code, e->text))
        return;
    rlb__fail_locked(c, code, "bridge refused %s: %s", what, e->text);
    if (c->ctl.waiting_for && !c->ctl.done &&
        (e->in_reply_to == c->ctl.waiting_for || e->request_id == c->ctl.fence_id)) {
        ctl_finish(c, code);
        return;
    }
    RLB_LOG_WARN(RLB_SUB_CLIENT, "bridge error not tied to a call: %s", c->err);
}

static void on_synced(rlb_client *c, const rlb_msg_synced *s)
{
    if (s->version > c->stats.weight_version)
        c->stats.weight_version = s->version;
    if (c->ctl.waiting_for != RLB_MSG_PUBLISH || c->ctl.done || s->version != c->ctl.version)
        return;
    c->ctl.stats = (rlb_sync_stats){.struct_size = sizeof(rlb_sync_stats),
                                    .version = s->version,
                                    .bytes = s->bytes,
                                    .ms = s->ms,
                                    .gbps = s->gbps};
    ctl_finish(c, 0);
}

static void on_aborted(rlb_client *c, const rlb_msg_outcome *a)
{
    if (c->ctl.waiting_for != RLB_MSG_PUBLISH || c->ctl.done || a->version != c->ctl.version)
        return;
    rlb__fail_locked(c, RLB_EABORTED, "version %llu aborted by the bridge: %s (cause: %s)",
                     (unsigned long long)a->version, a->text ? a->text : "no reason given",
                     rlb_strerror(wire_code(a->code)));
    ctl_finish(c, RLB_EABORTED);
}

static void dispatch(rlb_client *c, const rlb_msg *m)
{
    switch (m->type) {
    case RLB_MSG_WELCOME:
        c->welcomed = 1;
        c->peer_id = m->welcome.peer_id;
        c->stats.weight_version = m->welcome.weight_version;
        if (c->ctl.waiting_for == RLB_MSG_HELLO)
            ctl_finish(c, 0);
        break;
    case RLB_MSG_ERROR: on_error(c, &m->error); break;
    case RLB_MSG_SYNCED: on_synced(c, &m->synced); break;
    case RLB_MSG_ABORTED: on_aborted(c, &m->aborted); break;
    case RLB_MSG_RESULT: rlb__ticket_on_result(c, &m->result); break;
    case RLB_MSG_UNREGISTERED:
        if (c->ctl.waiting_for == RLB_MSG_UNREGISTER && !c->ctl.done)
            ctl_finish(c, 0);
        break;
    case RLB_MSG_STATS_REPLY:
        if (c->ctl.waiting_for && !c->ctl.done && m->stats_reply.request_id == c->ctl.fence_id)
            ctl_finish(c, 0);
        else
            rlb__stats_on_reply(c, &m->stats_reply);
        break;
    default:
        RLB_LOG_DEBUG(RLB_SUB_CLIENT, "ignoring a %s message", rlb__msg_type_name(m->type));
    }
}

/* The connection failed for good: everything that waits learns it. */
static void mark_dead(rlb_client *c, int code)
{
    if (c->dead)
        return;
    c->dead = code;
    /* A bridge that refuses our hello closes the connection right after it said why: that
     * reason stays the text. */
    if (c->welcomed || !c->err[0])
        rlb__fail_locked(c, code, "connection to the bridge lost");
    rlb__tickets_fail_all(c, code);
    rlb__stats_fail_all(c, code);
}

/* Receives and dispatches at most one message, waiting up to timeout_ms. Called by the
 * receiver thread with c->lock held; drops the lock while it waits on the ring. */
static void pump_once(rlb_client *c, int timeout_ms)
{
    rlb_ring *rx = rlb__conn_rx(c->conn);
    rlb_ring_msg rm;
    rlb_msg m;
    char why[160];
    pthread_mutex_unlock(&c->lock);
    int rc = rlb__ring_recv(rx, &c->rx, timeout_ms, &rm);
    int drc = rc == 0 ? rlb__msg_decode(rm.data, rm.len, &m, why, sizeof(why)) : rc;
    pthread_mutex_lock(&c->lock);
    if (rc == 0 && drc == 0) {
        dispatch(c, &m);
        rlb__msg_free(&m);
    } else if (rc == 0) {
        RLB_LOG_WARN(RLB_SUB_CLIENT, "dropping a malformed message from the bridge: %s", why);
    } else if (rc == RLB_ETOOBIG) {
        RLB_LOG_WARN(RLB_SUB_CLIENT, "dropping a message over %llu bytes",
                     (unsigned long long)MAX_INCOMING);
    } else if (rc != RLB_ETIMEDOUT && rc != RLB_EAGAIN) {
        mark_dead(c, rc);
    }
    if (rc == 0)
        rlb__ring_recv_done(rx, &c->rx);
}

/* The receiver thread: reads the bridge's messages as they come, whatever the caller is
 * doing, so results pile up in their tickets (the bridge drops a peer that leaves a large
 * message unread for RLB_PEER_TIMEOUT_MS) and waiters only wait on the condition. */
static void *receiver(void *arg)
{
    rlb_client *c = arg;
    pthread_mutex_lock(&c->lock);
    while (!c->stopping && !c->dead) {
        pump_once(c, c->slice_ms);
        pthread_cond_broadcast(&c->cond);
    }
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

int rlb__wait(rlb_client *c, int (*done)(rlb_client *c, void *arg), void *arg, int timeout_ms)
{
    int64_t deadline = timeout_ms < 0 ? INT64_MAX : rlb__clock_ms() + timeout_ms;
    for (;;) {
        if (done(c, arg))
            return 0;
        if (c->dead)
            return c->dead;
        if (timeout_ms == 0)
            return RLB_EAGAIN;
        int64_t left = deadline - rlb__clock_ms();
        if (left <= 0)
            return RLB_ETIMEDOUT;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t slice = left < c->slice_ms ? left : c->slice_ms;
        ts.tv_nsec += (long)slice * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&c->cond, &c->lock, &ts);
    }
}

/* ---- connect / close ------------------------------------------------------------------- */

RLB_API void rlb_client_options_init(rlb_client_options *opts)
{
    if (opts)
        *opts = (rlb_client_options)RLB_CLIENT_OPTIONS_INIT;
}

static int ctl_done(rlb_client *c, void *arg)
{
    return c->ctl.done;
}

static int resolve_socket(const char *socket, char *path, size_t cap)
{
    const char *name = socket && *socket ? socket : RLB_SOCKET_DEFAULT;
    if (strchr(name, '/')) {
        if (strlen(name) >= cap)
            return rlb__fail_call(RLB_ETOOBIG, "socket path %s is too long", name);
        strcpy(path, name);
        return 0;
    }
    int rc = rlb__conn_socket_path(name, path, cap);
    if (rc < 0)
        return rlb__fail_call(rc, "no usable socket directory for '%s' (see `rlb doctor`)", name);
    return 0;
}

static void free_client(rlb_client *client);

static int client_new(rlb_conn *conn, const rlb_client_options *o, rlb_client **out)
{
    rlb_client *c = calloc(1, sizeof(*c));
    if (!c)
        return RLB_ENOMEM;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_init(&c->tx_lock, NULL);
    pthread_mutex_init(&c->ctl_lock, NULL);
    c->conn = conn;
    c->request_timeout_ms = o->request_timeout_ms ? o->request_timeout_ms
                                                  : rlb__env_positive(RLB_KNOB_REQUEST_TIMEOUT_MS);
    c->slice_ms = rlb__env_positive(RLB_KNOB_WAIT_SLICE_MS);
    c->observer = o->observer;
    c->rx.max_msg = MAX_INCOMING;
    c->next_id = 1;
    c->next_seg_id = 1;
    c->stats.struct_size = sizeof(c->stats);
    *out = c;
    return 0;
}

static int say_hello(rlb_client *c, const rlb_client_options *o, int timeout_ms)
{
    rlb_msg hello = {.type = RLB_MSG_HELLO};
    hello.hello = (rlb_msg_hello){.abi_version = RLB_ABI_VERSION,
                                  .role = o->observer ? RLB_ROLE_TOOL : RLB_ROLE_TRAINER,
                                  .rank = o->rank,
                                  .world = o->world ? o->world : 1};
    pthread_mutex_lock(&c->lock);
    c->ctl = (rlb__ctl_state){.waiting_for = RLB_MSG_HELLO};
    pthread_mutex_unlock(&c->lock);
    int rc = rlb__send(c, &hello, timeout_ms);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&c->lock);
    rc = rlb__wait(c, ctl_done, NULL, timeout_ms);
    if (rc == 0)
        rc = c->ctl.code;
    c->ctl.waiting_for = 0;
    pthread_mutex_unlock(&c->lock);
    return rc;
}

RLB_API int rlb_connect(const rlb_client_options *opts, rlb_client **out)
{
    rlb__call_begin();
    if (!opts || !out)
        return rlb__fail_call(RLB_EINVAL, "rlb_connect needs options and an output pointer");
    *out = NULL;
    int rc = rlb__check_struct_size(NULL, opts->struct_size, sizeof(rlb_client_options),
                                    sizeof(rlb_client_options), "rlb_client_options");
    if (rc < 0)
        return rc;
    rlb_client_options o = *opts;
    uint32_t world = o.world ? o.world : 1;
    if (o.connect_timeout_ms < 0 || o.request_timeout_ms < 0 || o.rank >= world ||
        (o.observer != 0 && o.observer != 1))
        return rlb__fail_call(RLB_EINVAL,
                            "bad options: timeouts must be >= 0, rank (%u) < world (%u), "
                            "observer 0 or 1",
                            o.rank, world);
    int timeout = o.connect_timeout_ms ? o.connect_timeout_ms
                                       : rlb__env_positive(RLB_KNOB_CONNECT_TIMEOUT_MS);
    char path[256];
    RLB_CHECK(resolve_socket(o.socket, path, sizeof(path)));
    rlb_conn *conn = NULL;
    uint32_t bridge_abi = 0;
    /* A tool asks for small rings: what it receives (stats, results) streams through. */
    uint64_t ring_bytes = o.observer ? (uint64_t)rlb__env_int(RLB_KNOB_RING_TOOL_BYTES) : 0;
    rc = rlb__conn_connect_abi(path, timeout, ring_bytes, &conn, &bridge_abi);
    if (rc == RLB_EVERSION)
        return rlb__fail_call(rc, "the bridge at %s speaks ABI version %u and this librlb ABI "
                                "version %u: use a librlb from the bridge's release",
                            path, bridge_abi, RLB_ABI_VERSION);
    if (rc < 0)
        return rlb__fail_call(rc, rc == RLB_ENOTFOUND ? "no bridge listens at %s (start one with "
                                                      "`rlb bridge`)"
                                                    : "cannot connect to the bridge at %s",
                            path);
    rlb_client *c = NULL;
    rc = client_new(conn, &o, &c);
    if (rc < 0) {
        rlb__conn_close(conn);
        return rlb__fail_call(rc, "no memory for a client");
    }
    rc = pthread_create(&c->rx_thread, NULL, receiver, c);
    if (rc != 0) {
        rlb__conn_close(conn);
        free_client(c);
        return rlb__fail_call(RLB_EIO, "cannot start the receiver thread: %s", strerror(rc));
    }
    c->rx_running = 1;
    rc = say_hello(c, &o, timeout);
    if (rc < 0) {
        pthread_mutex_lock(&c->lock);
        memcpy(tls_call_err, c->err, sizeof(tls_call_err));
        pthread_mutex_unlock(&c->lock);
        if (!tls_call_err[0])
            rlb__fail_call(rc, "the bridge at %s did not welcome us", path);
        rlb_close(c);
        return rc;
    }
    *out = c;
    return 0;
}

RLB_API void rlb_close(rlb_client *client)
{
    if (!client)
        return;
    if (client->rx_running) {
        pthread_mutex_lock(&client->lock);
        client->stopping = 1;
        pthread_mutex_unlock(&client->lock);
        pthread_join(client->rx_thread, NULL);
    }
    rlb__conn_close(client->conn);
    free_client(client);
}

/* Frees everything of c but its connection. */
static void free_client(rlb_client *client)
{
    rlb__ring_rx_free(&client->rx);
    rlb__tickets_free_all(client);
    rlb__stats_free_all(client);
    rlb__tensors_free_all(client);
    rlb__host_free_all(client);
    rlb__cuda_free(client);
    free(client->pack_buf);
    pthread_mutex_destroy(&client->lock);
    pthread_mutex_destroy(&client->tx_lock);
    pthread_mutex_destroy(&client->ctl_lock);
    pthread_cond_destroy(&client->cond);
    free(client);
}

/* ---- control calls --------------------------------------------------------------------- */

int rlb__control(rlb_client *c, const rlb_msg *msg, int fence)
{
    pthread_mutex_lock(&c->ctl_lock);
    int rc = rlb__control_locked(c, msg, fence);
    pthread_mutex_unlock(&c->ctl_lock);
    return rc;
}

int rlb__control_locked(rlb_client *c, const rlb_msg *msg, int fence)
{
    pthread_mutex_lock(&c->lock);
    int rc = c->dead;
    if (rc < 0) {
        pthread_mutex_unlock(&c->lock);
        return rc;
    }
    c->ctl = (rlb__ctl_state){.waiting_for = msg->type,
                              .fence_id = fence ? rlb__next_id(c) : 0,
                              .version = msg->type == RLB_MSG_PUBLISH ? msg->publish.version
                                                                       : 0};
    uint64_t fence_id = c->ctl.fence_id;
    pthread_mutex_unlock(&c->lock);
    rc = rlb__send(c, msg, c->request_timeout_ms);
    if (rc == 0 && fence) {
        /* The bridge answers a connection's messages in order, so the reply to a stats
         * request sent right after tells that the message before it was accepted (an
         * error about it would have come first). */
        rlb_msg st = {.type = RLB_MSG_STATS, .stats = {.request_id = fence_id}};
        rc = rlb__send(c, &st, c->request_timeout_ms);
    }
    pthread_mutex_lock(&c->lock);
    if (rc == 0)
        rc = rlb__wait(c, ctl_done, NULL, c->request_timeout_ms);
    if (rc == 0)
        rc = c->ctl.code;
    else if (rc == RLB_ETIMEDOUT)
        rlb__fail_locked(c, rc, "no answer to %s within %d ms", rlb__msg_type_name(msg->type),
                         c->request_timeout_ms);
    c->ctl.waiting_for = 0;
    pthread_mutex_unlock(&c->lock);
    return rc;
}

RLB_API int rlb_publish(rlb_client *client, uint64_t version, rlb_sync_stats *stats)
{
    return rlb_publish_stream(client, version, NULL, stats);
}

RLB_API int rlb_publish_stream(rlb_client *client, uint64_t version, void *cuda_stream,
                               rlb_sync_stats *stats)
{
    if (!client)
        return RLB_EINVAL;
    if (stats)
        RLB_CHECK(rlb__check_struct_size(client, stats->struct_size, sizeof(*stats),
                                         sizeof(*stats), "rlb_sync_stats"));
    if (client->observer)
        return rlb__fail(client, RLB_EPERM, "an observer client cannot publish");
    if (version == 0)
        return rlb__fail(client, RLB_EINVAL, "weight versions start at 1");
    rlb_msg msg = {.type = RLB_MSG_PUBLISH, .publish = {.version = version}};
    /* Under ctl_lock, so the registered tensors do not change between the copies or the
     * event and the publish. */
    pthread_mutex_lock(&client->ctl_lock);
    int rc = rlb__cuda_before_publish(client, cuda_stream, &msg.publish);
    if (rc == 0)
        rc = rlb__control_locked(client, &msg, 0);
    pthread_mutex_unlock(&client->ctl_lock);
    pthread_mutex_lock(&client->lock);
    if (rc == 0 || rc == RLB_EABORTED)
        client->stats.publishes++;
    if (rc == 0) {
        client->stats.synced++;
        client->stats.bytes_synced += client->ctl.stats.bytes;
        client->stats.sync_ms += client->ctl.stats.ms;
        if (stats)
            *stats = client->ctl.stats;
    } else if (rc == RLB_EABORTED) {
        client->stats.aborted++;
    }
    pthread_mutex_unlock(&client->lock);
    return rc;
}

RLB_API int rlb_sleep(rlb_client *client)
{
    if (!client)
        return RLB_EINVAL;
    rlb_msg msg = {.type = RLB_MSG_SLEEP};
    return rlb__control(client, &msg, 1);
}

RLB_API int rlb_wake(rlb_client *client)
{
    if (!client)
        return RLB_EINVAL;
    rlb_msg msg = {.type = RLB_MSG_WAKE};
    return rlb__control(client, &msg, 1);
}

RLB_API uint64_t rlb_weight_version(rlb_client *client)
{
    if (!client)
        return 0;
    pthread_mutex_lock(&client->lock);
    uint64_t v = client->stats.weight_version;
    pthread_mutex_unlock(&client->lock);
    return v;
}

RLB_API int rlb_client_stats_get(rlb_client *client, rlb_client_stats *stats)
{
    if (!client || !stats)
        return RLB_EINVAL;
    RLB_CHECK(rlb__check_struct_size(client, stats->struct_size, sizeof(*stats),
                                     sizeof(*stats), "rlb_client_stats"));
    pthread_mutex_lock(&client->lock);
    *stats = client->stats;
    pthread_mutex_unlock(&client->lock);
    return 0;
}
