/* launch_rdzv.c: the rendezvous of a job's launchers through the store (common/store.h).
 *
 * Where the store listens: with the static backend at --master-addr, one port above
 * --master-port (the master port itself is left for trainer rank 0, which hosts torch's
 * own TCPStore there: ours does not speak its protocol), or at --rdzv-endpoint when given;
 * with c10d at --rdzv-endpoint (port 29400 when none is given, as torchrun's default).
 *
 * Keys (all under the run id the store checks at hello):
 *   claim/<r>      add: 1 for the first launcher that says it is node r, more for a clash
 *   rank_counter   add (c10d without --node-rank): node ranks 1, 2, ... by arrival
 *   node/<r>       "nnodes=MIN:MAX nproc=N script=ok|<reason>" of node r
 *   verdict        node 0's answer: "ok <nnodes> <master port>" or "error <one line>"
 * Node 0 waits for every node/<r> within the join timeout; with c10d and MIN < MAX it
 * closes the rendezvous once MIN nodes are there and the last-call time has passed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/check.h"
#include "common/clock.h"
#include "common/log.h"
#include "launch/launch.h"
#include "rlb/rlb.h"

#define VERDICT_MAX 512

/* A TCP port free on addr now (for MASTER_PORT under c10d), or -1. */
static int free_port(const char *addr)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    if (rlb__store_resolve(addr, 0, &sa) != 0)
        sa = (struct sockaddr_in){.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
        getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
        port = ntohs(sa.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

/* Whether addr:port can be bound now (the master port that trainer rank 0 will take):
 * 0, RLB_EEXIST (in use), RLB_ENOTFOUND (addr is not this node's) or RLB_EIO. */
static int port_free(const char *addr, int port)
{
    struct sockaddr_in sa;
    if (rlb__store_resolve(addr, port, &sa) != 0)
        sa = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1, rc = 0;
    if (fd < 0)
        return RLB_EIO;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        rc = errno == EADDRINUSE ? RLB_EEXIST : errno == EADDRNOTAVAIL ? RLB_ENOTFOUND : RLB_EIO;
    close(fd);
    return rc;
}

static void node_key(char *buf, size_t cap, const char *what, int r)
{
    snprintf(buf, cap, "%s/%d", what, r);
}

/* Node 0: collects every node's description, compares it with its own, decides. */
static void decide(const rlb_launch_opts *o, rlb_rdzv *r, char *verdict, size_t cap)
{
    long long t0 = rlb__clock_ms(), join_end = t0 + (long long)o->join_timeout_s * 1000;
    int elastic = o->nnodes_min < o->nnodes_max;
    int n = 1;
    char key[64], info[256];
    long long min_reached = -1;
    while (n < o->nnodes_max) {
        long long now = rlb__clock_ms();
        if (elastic && n >= o->nnodes_min && min_reached < 0)
            min_reached = now;
        long long end = min_reached >= 0 ? min_reached + (long long)o->last_call_s * 1000 : join_end;
        if (now >= end)
            break;
        size_t len = 0;
        node_key(key, sizeof(key), "node", n);
        long long slice = end - now < 200 ? end - now : 200; /* a slice: last call may end */
        int rc = rlb__store_wait(r->store, key, (int)slice, info, sizeof(info) - 1, &len);
        if (rc == RLB_ETIMEDOUT)
            continue;
        if (rc < 0) {
            snprintf(verdict, cap, "error node 0: the store failed: %s", rlb_strerror(rc));
            return;
        }
        n++;
    }
    if (n < o->nnodes_min || (!elastic && n < o->nnodes_max)) {
        snprintf(verdict, cap, "error node %d of %d never joined the rendezvous at %s:%d "
                 "(run id '%s') within %d s", n, o->nnodes_max, r->store_addr, r->store_port,
                 o->rdzv_id, o->join_timeout_s);
        return;
    }
    for (int i = 1; i < n; i++) {
        size_t len = 0;
        node_key(key, sizeof(key), "node", i);
        if (rlb__store_get(r->store, key, info, sizeof(info) - 1, &len) < 0)
            len = 0;
        info[len] = 0;
        int mn, mx, np;
        char script[200] = "";
        if (sscanf(info, "nnodes=%d:%d nproc=%d script=%199[^\n]", &mn, &mx, &np, script) < 3) {
            snprintf(verdict, cap, "error node %d: malformed rendezvous entry '%s'", i, info);
            return;
        }
        if (strcmp(script, "ok")) {
            snprintf(verdict, cap, "error node %d: %s", i, script);
            return;
        }
        if (mn != o->nnodes_min || mx != o->nnodes_max) {
            if (mn == mx && o->nnodes_min == o->nnodes_max)
                snprintf(verdict, cap, "error node %d says --nnodes %d, node 0 says %d", i,
                         mn, o->nnodes_min);
            else
                snprintf(verdict, cap, "error node %d says --nnodes %d:%d, node 0 says %d:%d",
                         i, mn, mx, o->nnodes_min, o->nnodes_max);
            return;
        }
        if (np != o->nproc) {
            snprintf(verdict, cap, "error node %d says --nproc-per-node %d, node 0 says %d", i,
                     np, o->nproc);
            return;
        }
    }
    int port = o->master_port > 0 ? o->master_port : free_port(r->master_addr);
    snprintf(verdict, cap, "ok %d %d", n, port);
}

int rlb__rdzv_join(const rlb_launch_opts *o, const char *script_error, rlb_rdzv *r, char *err,
                   size_t errcap)
{
    int rc, is_static = !strcmp(o->rdzv_backend, "static");
    char key[64], info[256], verdict[VERDICT_MAX], why[256];
    *r = (rlb_rdzv){.node_rank = o->node_rank};
    err[0] = 0;
    snprintf(r->store_addr, sizeof(r->store_addr), "%s",
             o->rdzv_host[0] ? o->rdzv_host : o->master_addr);
    if (!strcmp(r->store_addr, "localhost"))
        snprintf(r->store_addr, sizeof(r->store_addr), "127.0.0.1");
    int master_port = o->master_port > 0 ? o->master_port : 29500;
    r->store_port = o->rdzv_port >= 0 ? o->rdzv_port : is_static ? master_port + 1 : 29400;
    snprintf(r->master_addr, sizeof(r->master_addr), "%s",
             is_static ? o->master_addr : r->store_addr);
    int host = o->node_rank == 0 || o->standalone;
    if (!is_static && o->node_rank < 0) {
        /* c10d without a node rank: whoever binds the endpoint first is node 0; a node
         * the endpoint's address is not on (another machine's) cannot and joins it */
        rc = rlb__store_server_start(r->store_addr, r->store_port, o->rdzv_id, &r->server);
        host = rc == 0;
        if (rc < 0 && rc != RLB_EEXIST && rc != RLB_ENOTFOUND) {
            snprintf(err, errcap, "cannot listen at --rdzv-endpoint %s:%d: %s", r->store_addr,
                     r->store_port, rlb_strerror(rc));
            return rc;
        }
    } else if (host) {
        rc = is_static ? port_free(o->master_addr, master_port) : 0;
        if (rc == RLB_ENOTFOUND) {
            snprintf(err, errcap, "node 0: --master-addr %s is not an address of this node",
                     o->master_addr);
            return rc;
        }
        if (rc < 0) {
            snprintf(err, errcap, "node 0: --master-port %d on %s is %s", master_port,
                     o->master_addr, rc == RLB_EEXIST ? "in use" : rlb_strerror(rc));
            return rc;
        }
        rc = rlb__store_server_start(r->store_addr, r->store_port, o->rdzv_id, &r->server);
        if (rc == RLB_ENOTFOUND) {
            snprintf(err, errcap, "node 0: the rendezvous address %s is not an address of this "
                     "node", r->store_addr);
            return rc;
        }
        if (rc < 0) {
            snprintf(err, errcap, "node 0: the rendezvous port %d on %s%s is %s", r->store_port,
                     r->store_addr, is_static && o->rdzv_port < 0 ? " (--master-port + 1)" : "",
                     rc == RLB_EEXIST ? "in use" : rlb_strerror(rc));
            return rc;
        }
    }
    if (r->server)
        r->store_port = rlb__store_server_port(r->server);
    rc = rlb__store_connect(r->store_addr, r->store_port, o->rdzv_id,
                            host ? 5000 : o->join_timeout_s * 1000, &r->store, why, sizeof(why));
    if (rc < 0) {
        snprintf(err, errcap, "node %d: %s", o->node_rank, why);
        goto err;
    }
    if (host) {
        r->node_rank = 0;
    } else if (o->node_rank < 0) {
        int64_t v;
        RLB_CHECK_GOTO(rlb__store_add(r->store, "rank_counter", 1, &v), rc, err);
        r->node_rank = (int)v;
        if (r->node_rank >= o->nnodes_max) {
            snprintf(err, errcap, "node %d: more launchers joined run id '%s' than --nnodes %d",
                     r->node_rank, o->rdzv_id, o->nnodes_max);
            rc = RLB_EINVAL;
            goto err;
        }
    }
    int64_t claims = 0;
    node_key(key, sizeof(key), "claim", r->node_rank);
    RLB_CHECK_GOTO(rlb__store_add(r->store, key, 1, &claims), rc, err);
    if (claims > 1) {
        snprintf(err, errcap, "node %d: another launcher of run id '%s' is already node %d",
                 r->node_rank, o->rdzv_id, r->node_rank);
        rc = RLB_EEXIST;
        goto err;
    }
    int n = snprintf(info, sizeof(info), "nnodes=%d:%d nproc=%d script=%s", o->nnodes_min,
                     o->nnodes_max, o->nproc, script_error ? script_error : "ok");
    node_key(key, sizeof(key), "node", r->node_rank);
    RLB_CHECK_GOTO(rlb__store_set(r->store, key, info, (size_t)n), rc, err);
    if (host) {
        if (script_error)
            snprintf(verdict, sizeof(verdict), "error node 0: %s", script_error);
        else
            decide(o, r, verdict, sizeof(verdict));
        RLB_CHECK_GOTO(rlb__store_set(r->store, "verdict", verdict, strlen(verdict)), rc, err);
    } else {
        size_t len = 0;
        rc = rlb__store_wait(r->store, "verdict", o->join_timeout_s * 1000 + 5000, verdict,
                             sizeof(verdict) - 1, &len);
        if (rc < 0) {
            snprintf(err, errcap, "node %d: no answer from node 0 at %s:%d: %s", r->node_rank,
                     r->store_addr, r->store_port, rlb_strerror(rc));
            goto err;
        }
        verdict[len] = 0;
    }
    if (!strncmp(verdict, "error ", 6)) {
        snprintf(err, errcap, "%s", verdict + 6);
        rc = RLB_EINVAL;
        if (host) { /* nodes still on their way to the wait get the verdict too */
            struct timespec ts = {1, 0};
            nanosleep(&ts, NULL);
        }
        goto err;
    }
    if (sscanf(verdict, "ok %d %d", &r->nnodes, &r->master_port) != 2 ||
        r->node_rank >= r->nnodes) {
        snprintf(err, errcap, "node %d: the rendezvous closed with %d nodes without it",
                 r->node_rank, r->nnodes);
        rc = RLB_EINVAL;
        goto err;
    }
    return 0;
err:
    if (!err[0])
        snprintf(err, errcap, "node %d: the rendezvous store failed: %s", r->node_rank,
                 rlb_strerror(rc));
    rlb__rdzv_leave(r);
    return rc;
}

void rlb__rdzv_leave(rlb_rdzv *r)
{
    rlb__store_close(r->store);
    rlb__store_server_stop(r->server);
    r->store = NULL;
    r->server = NULL;
}
