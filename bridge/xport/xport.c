/* xport.c: what every transport shares (xport.h): connecting the nodes through the store,
 * waiting for a set of requests with one deadline, destroying. Only the iface is called. */
#include "bridge/xport/xport.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "common/clock.h"
#include "common/log.h"
#include "rlb/rlb.h"

#define XPORT_ADDR_MAX 65536

int rlb__xport_connect_all(rlb_xport *x, rlb_store *store, const char *prefix, int timeout_ms)
{
    int rc;
    char key[256];
    size_t len = 0;
    uint8_t *addr = malloc(XPORT_ADDR_MAX);
    if (!addr)
        return RLB_ENOMEM;
    long long deadline = rlb__clock_ms() + timeout_ms;
    rc = x->iface->address(x->ctx, addr, XPORT_ADDR_MAX, &len);
    if (rc < 0)
        goto out;
    snprintf(key, sizeof(key), "%s/addr/%d", prefix, x->node);
    rc = rlb__store_set(store, key, addr, len);
    for (int peer = 0; rc == 0 && peer < x->nnodes; peer++) {
        if (peer == x->node)
            continue;
        long long left = deadline - rlb__clock_ms();
        snprintf(key, sizeof(key), "%s/addr/%d", prefix, peer);
        rc = rlb__store_wait(store, key, left > 0 ? (int)left : 0, addr, XPORT_ADDR_MAX, &len);
        if (rc == 0)
            rc = x->iface->connect(x->ctx, peer, addr, len);
        if (rc < 0)
            RLB_LOG_ERROR(RLB_SUB_BRIDGE, "xport %s: node %d cannot reach node %d: %s",
                          x->iface->name, x->node, peer, rlb_strerror(rc));
    }
out:
    free(addr);
    return rc;
}

int rlb__xport_wait_all(rlb_xport *x, rlb_xreq **reqs, int n, int timeout_ms)
{
    long long deadline = rlb__clock_ms() + timeout_ms;
    int rc = 0, pending = 1;
    while (pending && rc == 0) {
        pending = 0;
        for (int i = 0; i < n && rc == 0; i++) {
            if (!reqs[i])
                continue;
            int r = x->iface->test(x->ctx, reqs[i]);
            if (r == RLB_EAGAIN) {
                pending = 1;
                continue;
            }
            reqs[i] = NULL; /* done or failed: test freed it */
            rc = r;
            deadline = rlb__clock_ms() + timeout_ms; /* progress: the clock starts again */
        }
        if (pending && rc == 0 && rlb__clock_ms() > deadline)
            rc = RLB_ETIMEDOUT;
    }
    for (int i = 0; rc < 0 && i < n; i++) {
        if (reqs[i])
            x->iface->cancel(x->ctx, reqs[i]);
        reqs[i] = NULL;
    }
    return rc;
}

void rlb__xport_destroy(rlb_xport *x)
{
    if (!x)
        return;
    x->iface->destroy(x->ctx);
    free(x);
}
