/* xport_ucx.c: the host-memory transport over UCX's tag API (xport.h). One UCP context
 * and one worker per bridge, one endpoint per other node; a request's tag carries the
 * sender's node in its top 16 bits, so a receive names its peer with an exact tag mask.
 *
 * Peer failure: with peer_errors, endpoints are created with UCX's peer failure handling and
 * the error callback marks the node dead; a receive from a dead node is then cancelled and
 * fails with RLB_EPEERDEAD (a tag receive is not bound to an endpoint, so UCX alone would
 * let it wait forever). UCX 1.13 has no failure handling on its shared-memory transports
 * (posix, sysv, cma), so that mode leaves only tcp between processes of one machine, at a
 * third of a plain TCP stream's speed here (BENCHMARKS.md). Without it, shared memory is
 * used and a dead peer shows as no progress: rlb__xport_wait_all's timeout, and the abort
 * that the dead node's launcher watchdog publishes in the store.
 * Requests complete through a callback into our own rlb_xreq, so no request memory of
 * UCX's is read after it is freed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ucp/api/ucp.h>

#include "bridge/xport/xport.h"
#include "common/log.h"
#include "rlb/rlb.h"

#define TAG_NODE_SHIFT 48
#define TAG_USER_MASK ((1ull << TAG_NODE_SHIFT) - 1)

typedef struct ucx_ctx {
    ucp_context_h context; /* UCP context (features: tag) */
    ucp_worker_h worker;   /* the one worker, progressed by test */
    ucp_ep_h *eps;         /* endpoint per node; NULL for ourselves and unconnected */
    int *dead;             /* per node: its endpoint failed */
    int node, nnodes;      /* this node and the job's nodes */
    int peer_errors;       /* endpoints with UCX's peer failure handling */
} ucx_ctx;

struct rlb_xreq {
    ucx_ctx *c;      /* owner */
    void *ucx;       /* UCX's request, NULL once complete */
    int peer;        /* the other node */
    int recv;        /* a receive (cancelled when its peer dies) */
    int done;        /* set by the completion callback */
    int status;      /* 0 or RLB_E* once done */
};

static int from_ucs(ucs_status_t s)
{
    switch (s) {
    case UCS_OK: return 0;
    case UCS_ERR_NO_MEMORY: return RLB_ENOMEM;
    case UCS_ERR_CANCELED: return RLB_EABORTED;
    case UCS_ERR_MESSAGE_TRUNCATED: return RLB_EPROTO;
    case UCS_ERR_TIMED_OUT:
    case UCS_ERR_ENDPOINT_TIMEOUT: return RLB_ETIMEDOUT;
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_NOT_CONNECTED: return RLB_EPEERDEAD;
    default: return RLB_EIO;
    }
}

static void on_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    ucx_ctx *c = arg;
    for (int i = 0; i < c->nnodes; i++) {
        if (c->eps[i] == ep) {
            c->dead[i] = 1;
            RLB_LOG_WARN(RLB_SUB_BRIDGE, "xport ucx: node %d: connection to node %d failed: %s",
                         c->node, i, ucs_status_string(status));
        }
    }
}

static void on_send_done(void *request, ucs_status_t status, void *user)
{
    rlb_xreq *r = user;
    r->done = 1;
    r->status = status == UCS_OK ? 0 : from_ucs(status);
}

static void on_recv_done(void *request, ucs_status_t status, const ucp_tag_recv_info_t *info,
                         void *user)
{
    on_send_done(request, status, user);
}

static int ucx_address(void *ctx, void *buf, size_t cap, size_t *len)
{
    ucx_ctx *c = ctx;
    ucp_address_t *addr;
    size_t n;
    ucs_status_t s = ucp_worker_get_address(c->worker, &addr, &n);
    if (s != UCS_OK)
        return from_ucs(s);
    int rc = n <= cap ? 0 : RLB_ETOOBIG;
    if (rc == 0) {
        memcpy(buf, addr, n);
        *len = n;
    }
    ucp_worker_release_address(c->worker, addr);
    return rc;
}

static int ucx_connect(void *ctx, int peer, const void *addr, size_t len)
{
    ucx_ctx *c = ctx;
    if (peer < 0 || peer >= c->nnodes || peer == c->node || c->eps[peer])
        return RLB_EINVAL;
    ucp_ep_params_t p = {
        .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER,
        .address = addr,
        .err_mode = c->peer_errors ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE,
        .err_handler = {.cb = on_ep_error, .arg = c},
    };
    (void)len;
    ucs_status_t s = ucp_ep_create(c->worker, &p, &c->eps[peer]);
    if (s != UCS_OK) {
        c->eps[peer] = NULL;
        return from_ucs(s);
    }
    return 0;
}

/* Wraps what ucp_tag_*_nbx returned into *req. */
static int start(rlb_xreq *r, ucs_status_ptr_t p, rlb_xreq **req)
{
    if (UCS_PTR_IS_ERR(p)) {
        int rc = from_ucs(UCS_PTR_STATUS(p));
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "xport ucx: node %d: a %s with node %d failed at once: %s",
                     r->c->node, r->recv ? "receive" : "send", r->peer,
                     ucs_status_string(UCS_PTR_STATUS(p)));
        free(r);
        return rc;
    }
    r->ucx = p;
    if (!p) /* completed in place */
        r->done = 1;
    *req = r;
    return 0;
}

/* A request to peer, checked and allocated, with its completion parameters in *p. */
static int new_req(ucx_ctx *c, int peer, uint64_t tag, int recv, rlb_xreq **out,
                   ucp_request_param_t *p)
{
    if (peer < 0 || peer >= c->nnodes || peer == c->node || tag > TAG_USER_MASK ||
        (!recv && !c->eps[peer]))
        return RLB_EINVAL;
    if (c->dead[peer])
        return RLB_EPEERDEAD;
    rlb_xreq *r = calloc(1, sizeof(*r));
    if (!r)
        return RLB_ENOMEM;
    *r = (rlb_xreq){.c = c, .peer = peer, .recv = recv};
    *p = (ucp_request_param_t){.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK |
                                               UCP_OP_ATTR_FIELD_USER_DATA,
                               .user_data = r};
    if (recv)
        p->cb.recv = on_recv_done;
    else
        p->cb.send = on_send_done;
    *out = r;
    return 0;
}

static int ucx_isend(void *ctx, int peer, uint64_t tag, const void *buf, size_t len,
                     rlb_xreq **req)
{
    ucx_ctx *c = ctx;
    rlb_xreq *r;
    ucp_request_param_t p;
    int rc = new_req(c, peer, tag, 0, &r, &p);
    if (rc < 0)
        return rc;
    uint64_t t = ((uint64_t)c->node << TAG_NODE_SHIFT) | tag;
    return start(r, ucp_tag_send_nbx(c->eps[peer], buf, len, t, &p), req);
}

static int ucx_irecv(void *ctx, int peer, uint64_t tag, void *buf, size_t len, rlb_xreq **req)
{
    ucx_ctx *c = ctx;
    rlb_xreq *r;
    ucp_request_param_t p;
    int rc = new_req(c, peer, tag, 1, &r, &p);
    if (rc < 0)
        return rc;
    uint64_t t = ((uint64_t)peer << TAG_NODE_SHIFT) | tag;
    return start(r, ucp_tag_recv_nbx(c->worker, buf, len, t, ~0ull, &p), req);
}

static void release(rlb_xreq *r)
{
    if (r->ucx)
        ucp_request_free(r->ucx);
    free(r);
}

static void ucx_cancel(void *ctx, rlb_xreq *r)
{
    ucx_ctx *c = ctx;
    if (r->ucx && !r->done) {
        ucp_request_cancel(c->worker, r->ucx);
        for (int i = 0; i < 1000 && !r->done; i++) /* the callback runs from progress */
            ucp_worker_progress(c->worker);
    }
    release(r);
}

static int ucx_test(void *ctx, rlb_xreq *r)
{
    ucx_ctx *c = ctx;
    ucp_worker_progress(c->worker);
    if (!r->done && c->dead[r->peer]) {
        ucx_cancel(c, r);
        return RLB_EPEERDEAD;
    }
    if (!r->done)
        return RLB_EAGAIN;
    int rc = r->status;
    release(r);
    return rc;
}

static void ucx_destroy(void *ctx)
{
    ucx_ctx *c = ctx;
    for (int i = 0; i < c->nnodes; i++) {
        if (!c->eps[i])
            continue;
        ucp_request_param_t p = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                                 .flags = c->dead[i] ? UCP_EP_CLOSE_FLAG_FORCE : 0};
        ucs_status_ptr_t req = ucp_ep_close_nbx(c->eps[i], &p);
        /* bounded: a peer that is gone cannot hold a flush forever, but we do not wait on it */
        for (int k = 0; k < 100000 && req && !UCS_PTR_IS_ERR(req) &&
                        ucp_request_check_status(req) == UCS_INPROGRESS; k++)
            ucp_worker_progress(c->worker);
        if (req && !UCS_PTR_IS_ERR(req))
            ucp_request_free(req);
    }
    ucp_worker_destroy(c->worker);
    ucp_cleanup(c->context);
    free(c->eps);
    free(c->dead);
    free(c);
}

static int ucx_mem_alloc(void *ctx, size_t bytes, void **out)
{
    (void)ctx;
    *out = calloc(1, bytes + 1);
    return *out ? 0 : RLB_ENOMEM;
}

static void ucx_mem_free(void *ctx, void *p)
{
    (void)ctx;
    free(p);
}

static const rlb_xport_iface_v1 ucx_iface = {
    .name = "ucx",
    .address = ucx_address,
    .connect = ucx_connect,
    .isend = ucx_isend,
    .irecv = ucx_irecv,
    .test = ucx_test,
    .cancel = ucx_cancel,
    .destroy = ucx_destroy,
    .mem_alloc = ucx_mem_alloc,
    .mem_free = ucx_mem_free,
    .after_events = NULL, /* host memory: the trainers wrote it before they published */
    .digest = NULL,       /* host memory: the exchange hashes it */
};

int rlb__xport_ucx_create(int node, int nnodes, int peer_errors, rlb_xport **out)
{
    int rc = RLB_ENOMEM;
    ucs_status_t s;
    ucp_config_t *cfg = NULL;
    *out = NULL;
    if (nnodes < 1 || nnodes > 65535 || node < 0 || node >= nnodes)
        return RLB_EINVAL;
    rlb_xport *x = calloc(1, sizeof(*x));
    ucx_ctx *c = calloc(1, sizeof(*c));
    if (!x || !c)
        goto err;
    c->node = node;
    c->nnodes = nnodes;
    c->peer_errors = peer_errors;
    c->eps = calloc((size_t)nnodes, sizeof(*c->eps));
    c->dead = calloc((size_t)nnodes, sizeof(*c->dead));
    if (!c->eps || !c->dead)
        goto err;
    s = ucp_config_read(NULL, NULL, &cfg);
    if (s != UCS_OK) {
        rc = from_ucs(s);
        goto err;
    }
    ucp_params_t p = {.field_mask = UCP_PARAM_FIELD_FEATURES, .features = UCP_FEATURE_TAG};
    s = ucp_init(&p, cfg, &c->context);
    ucp_config_release(cfg);
    if (s != UCS_OK) {
        rc = from_ucs(s);
        c->context = NULL;
        goto err;
    }
    ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                              .thread_mode = UCS_THREAD_MODE_SINGLE};
    s = ucp_worker_create(c->context, &wp, &c->worker);
    if (s != UCS_OK) {
        rc = from_ucs(s);
        ucp_cleanup(c->context);
        goto err;
    }
    *x = (rlb_xport){.iface = &ucx_iface, .ctx = c, .node = node, .nnodes = nnodes};
    *out = x;
    return 0;
err:
    if (c) {
        free(c->eps);
        free(c->dead);
    }
    free(c);
    free(x);
    return rc;
}
