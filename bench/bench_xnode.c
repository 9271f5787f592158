/* bench_xnode: rlb-bench-xnode, the bytes one node's bridge sends another through the
 * cross-node transport (bridge/xport, UCX), against a plain TCP stream of the same bytes
 * over loopback in the same run.
 *
 *   rlb-bench-xnode [--mib N] [--chunk-mib C] [--runs R] [--peer-errors]
 *   rlb-bench-xnode --commit [VERSIONS] [--lora]
 *                                         what a second node adds to a commit; --lora:
 *                                         with LoRA adapters, what crosses after the first
 *                                         version (bench_xnode_commit.c)
 *   rlb-bench-xnode --nccl [--mib N] [--chunk-mib C] [--runs R]
 *                                         GPU memory over the NCCL transport between GPUs 0
 *                                         and 1 against an NCCL all-gather on them
 *                                         (bench_xnode_nccl.c; builds with NCCL only)
 *
 * Two processes of this machine are node 0 (sender) and node 1 (receiver); they meet
 * through a real rendezvous store. Each run moves N MiB (default 1024) from one buffer to
 * another, buffers written beforehand so no page fault is timed. The transport run posts
 * every chunk of C MiB (default 8) at once, as the exchange does; the TCP run writes the
 * same buffer with send() into a connected socket and the receiver recv()s it whole.
 * Timing is the receiver's, from the "go" it gives to the last byte in place; the receiver
 * checks the first and last byte of every chunk. Best of R runs (default 3), UCX and TCP
 * taking turns. Ratio: xnode_ratio_vs_tcp = transport GB/s / TCP GB/s (target >= 0.8).
 * Which UCX transports carry the bytes follows UCX_TLS (default: UCX's choice, shared
 * memory between processes of one machine; UCX_TLS=tcp,self forces loopback TCP);
 * --peer-errors turns on UCX's peer failure handling, which leaves only tcp.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench_xnode.h"
#include "bridge/xport/xport.h"
#include "common/cli_args.h"
#include "common/clock.h"
#include "common/store.h"
#include "rlb/rlb.h"

#define RUN_ID "xnode-bench"
#define TIMEOUT_MS 120000

typedef struct bench {
    size_t bytes, chunk;
    int runs;
    int peer_errors; /* --peer-errors: UCX's peer failure handling (tcp only) */
} bench;

static int die(const char *what, int rc)
{
    fprintf(stderr, "rlb-bench-xnode: %s: %s\n", what, rc < 0 ? rlb_strerror(rc) : strerror(rc));
    return 1;
}

static int xport_run(const bench *b, rlb_xport *x, rlb_store *st, uint8_t *buf, int run,
                     double *secs)
{
    int n = (int)((b->bytes + b->chunk - 1) / b->chunk), rc = 0;
    rlb_xreq **reqs = calloc((size_t)n, sizeof(*reqs));
    char key[32], v[4];
    size_t len;
    if (!reqs)
        return RLB_ENOMEM;
    snprintf(key, sizeof(key), "go/%d", run);
    for (int k = 0; k < n && rc == 0; k++) {
        size_t off = (size_t)k * b->chunk, len_k = b->bytes - off < b->chunk ? b->bytes - off
                                                                              : b->chunk;
        if (x->node == 1)
            rc = x->iface->irecv(x->ctx, 0, (uint64_t)run << 20 | (uint64_t)k, buf + off,
                                 len_k, &reqs[k]);
    }
    double t0 = rlb__clock_s();
    if (rc == 0 && x->node == 1)
        rc = rlb__store_set(st, key, "1", 1);
    if (rc == 0 && x->node == 0) {
        rc = rlb__store_wait(st, key, TIMEOUT_MS, v, sizeof(v), &len);
        for (int k = 0; k < n && rc == 0; k++) {
            size_t off = (size_t)k * b->chunk, len_k = b->bytes - off < b->chunk
                                                           ? b->bytes - off : b->chunk;
            rc = x->iface->isend(x->ctx, 1, (uint64_t)run << 20 | (uint64_t)k, buf + off, len_k,
                                 &reqs[k]);
        }
    }
    if (rc == 0)
        rc = rlb__xport_wait_all(x, reqs, n, TIMEOUT_MS);
    *secs = rlb__clock_s() - t0;
    free(reqs);
    return rc;
}

static int tcp_run(const bench *b, int fd, int node, rlb_store *st, uint8_t *buf, int run,
                   double *secs)
{
    char key[32], v[4];
    size_t len, done = 0;
    snprintf(key, sizeof(key), "tcpgo/%d", run);
    double t0 = rlb__clock_s();
    if (node == 1) {
        if (rlb__store_set(st, key, "1", 1) < 0)
            return RLB_EIO;
        while (done < b->bytes) {
            ssize_t r = recv(fd, buf + done, b->bytes - done, 0);
            if (r <= 0)
                return RLB_EPEERDEAD;
            done += (size_t)r;
        }
    } else {
        if (rlb__store_wait(st, key, TIMEOUT_MS, v, sizeof(v), &len) < 0)
            return RLB_ETIMEDOUT;
        while (done < b->bytes) {
            ssize_t w = send(fd, buf + done, b->bytes - done, MSG_NOSIGNAL);
            if (w <= 0)
                return RLB_EPEERDEAD;
            done += (size_t)w;
        }
    }
    *secs = rlb__clock_s() - t0;
    return 0;
}

/* The TCP connection of the peer run: node 1 listens, publishes its port, node 0 connects. */
static int tcp_connect(rlb_store *st, int node)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    char port[16];
    size_t len;
    int one = 1;
    if (node == 1) {
        int l = socket(AF_INET, SOCK_STREAM, 0);
        if (l < 0 || bind(l, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(l, 1) < 0 ||
            getsockname(l, (struct sockaddr *)&sa, &sl) < 0)
            return -1;
        int n = snprintf(port, sizeof(port), "%d", ntohs(sa.sin_port));
        rlb__store_set(st, "tcp_port", port, (size_t)n);
        int fd = accept(l, NULL, NULL);
        close(l);
        return fd;
    }
    if (rlb__store_wait(st, "tcp_port", TIMEOUT_MS, port, sizeof(port) - 1, &len) < 0)
        return -1;
    port[len] = 0;
    sa.sin_port = htons((uint16_t)atoi(port));
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

/* Checks the first and last byte of every chunk the receiver got. */
static int check(const bench *b, const uint8_t *buf)
{
    for (size_t off = 0; off < b->bytes; off += b->chunk) {
        size_t last = (off + b->chunk < b->bytes ? off + b->chunk : b->bytes) - 1;
        if (buf[off] != (uint8_t)(off * 7 + 3) || buf[last] != (uint8_t)(last * 7 + 3))
            return -1;
    }
    return 0;
}

/* One node's whole benchmark; node 1 writes "ucx_best tcp_best" to out_fd. */
static int node_main(int node, int port, void *arg, int out_fd)
{
    const bench *b = arg;
    rlb_store *st = NULL;
    rlb_xport *x = NULL;
    int rc = rlb__store_connect("127.0.0.1", port, RUN_ID, 10000, &st, NULL, 0);
    if (rc < 0)
        return die("store", rc);
    if ((rc = rlb__xport_ucx_create(node, 2, b->peer_errors, &x)) < 0 ||
        (rc = rlb__xport_connect_all(x, st, "bench", TIMEOUT_MS)) < 0)
        return die("transport", rc);
    int fd = tcp_connect(st, node);
    if (fd < 0)
        return die("tcp", RLB_EIO);
    uint8_t *buf = malloc(b->bytes);
    if (!buf)
        return die("buffer", RLB_ENOMEM);
    for (size_t i = 0; i < b->bytes; i++)
        buf[i] = node == 0 ? (uint8_t)(i * 7 + 3) : 0;
    double best_x = 1e30, best_t = 1e30, s;
    for (int run = 0; run < b->runs; run++) {
        if (node == 1)
            memset(buf, 0, b->bytes);
        if ((rc = xport_run(b, x, st, buf, run, &s)) < 0)
            return die("transport run", rc);
        if (node == 1 && check(b, buf) < 0)
            return die("transport run: wrong bytes", RLB_ECORRUPT);
        best_x = s < best_x ? s : best_x;
        if (node == 1)
            memset(buf, 0, b->bytes);
        if ((rc = tcp_run(b, fd, node, st, buf, run, &s)) < 0)
            return die("tcp run", rc);
        if (node == 1 && check(b, buf) < 0)
            return die("tcp run: wrong bytes", RLB_ECORRUPT);
        best_t = s < best_t ? s : best_t;
    }
    if (node == 1)
        dprintf(out_fd, "%.9f %.9f\n", best_x, best_t);
    /* node 0 closes last, once node 1 has everything */
    char v[4];
    size_t len;
    int64_t n;
    rlb__store_add(st, "finished", 1, &n);
    if (n == 2)
        rlb__store_set(st, "all", "1", 1);
    rlb__store_wait(st, "all", TIMEOUT_MS, v, sizeof(v), &len);
    close(fd);
    free(buf);
    rlb__xport_destroy(x);
    rlb__store_close(st);
    return 0;
}

int rlb__bench_xnode_pair(const char *who, const char *run_id, rlb_bench_node_fn fn, void *arg,
                          double *a, double *b)
{
    rlb_store_server *srv = NULL;
    int rc = rlb__store_server_start("127.0.0.1", 0, run_id, &srv), out[2];
    if (rc < 0 || pipe(out) < 0) {
        fprintf(stderr, "%s: store server: %s\n", who, rc < 0 ? rlb_strerror(rc) : "no pipe");
        rlb__store_server_stop(srv);
        return 1;
    }
    int port = rlb__store_server_port(srv), ok = 1;
    pid_t pid[2];
    for (int node = 0; node < 2; node++)
        if ((pid[node] = fork()) == 0)
            _exit(fn(node, port, arg, out[1]));
    close(out[1]);
    for (int node = 0; node < 2; node++) {
        int st = 1;
        if (pid[node] < 0 || waitpid(pid[node], &st, 0) != pid[node] || !WIFEXITED(st) ||
            WEXITSTATUS(st) != 0)
            ok = 0;
    }
    rlb__store_server_stop(srv);
    FILE *f = fdopen(out[0], "r");
    ok = ok && f && fscanf(f, "%lf %lf", a, b) == 2;
    if (f)
        fclose(f);
    else
        close(out[0]);
    if (!ok)
        fprintf(stderr, "%s: a node failed\n", who);
    return !ok;
}

int main(int argc, char **argv)
{
    bench b = {.bytes = 1024ull << 20, .chunk = 8ull << 20, .runs = 3};
    int nccl = 0;
    if (argc > 1 && !strcmp(argv[1], "--commit")) {
        int versions = 10, lora = 0;
        for (int i = 2; i < argc; i++) {
            long v;
            if (!strcmp(argv[i], "--lora"))
                lora = 1;
            else if (rlb__cli_long("bench-xnode", "commit", argv[i], 1, 100000, &v))
                return 2;
            else
                versions = (int)v;
        }
        return rlb__bench_xnode_commit(versions, lora);
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--nccl")) {
            nccl = 1;
            continue;
        }
        long v;
        if (i + 1 < argc && !strcmp(argv[i], "--mib")) {
            if (rlb__cli_long("bench-xnode", "mib", argv[++i], 1, 1 << 20, &v))
                return 2;
            b.bytes = (uint64_t)v << 20;
        } else if (i + 1 < argc && !strcmp(argv[i], "--chunk-mib")) {
            if (rlb__cli_long("bench-xnode", "chunk-mib", argv[++i], 1, 1 << 12, &v))
                return 2;
            b.chunk = (uint64_t)v << 20;
        } else if (i + 1 < argc && !strcmp(argv[i], "--runs")) {
            if (rlb__cli_long("bench-xnode", "runs", argv[++i], 1, 1000, &v))
                return 2;
            b.runs = (int)v;
        } else if (!strcmp(argv[i], "--peer-errors"))
            b.peer_errors = 1;
        else {
            fprintf(stderr, "usage: rlb-bench-xnode [--nccl] [--mib N] [--chunk-mib C] "
                            "[--runs R] [--peer-errors] | --commit [VERSIONS] [--lora]\n");
            return 2;
        }
    }
    if (!b.bytes || !b.chunk || b.runs < 1 || b.chunk > b.bytes) {
        fprintf(stderr, "rlb-bench-xnode: --mib, --chunk-mib (<= --mib) and --runs must be "
                        "positive\n");
        return 2;
    }
    if (nccl) {
#ifdef RLB_HAVE_NCCL_XPORT
        return rlb__bench_xnode_nccl(b.bytes, b.chunk, b.runs);
#else
        fprintf(stderr, "rlb-bench-xnode: this build has no NCCL transport (a CUDA build "
                        "with NCCL)\n");
        return 2;
#endif
    }
    double bx, bt;
    if (rlb__bench_xnode_pair("rlb-bench-xnode", RUN_ID, node_main, &b, &bx, &bt))
        return 1;
    double gb = (double)b.bytes / 1e9, gx = gb / bx, gt = gb / bt;
    const char *tls = getenv("UCX_TLS");
    printf("rlb-bench-xnode: %.2f GB from node 0 to node 1 (two processes, loopback), chunks "
           "of %zu MiB, best of %d\n", gb, b.chunk >> 20, b.runs);
    printf("%-36s %10s %10s\n", "path", "seconds", "GB/s");
    printf("%-36s %10.3f %10.2f\n", "rlb xport (UCX)", bx, gx);
    printf("%-36s %10.3f %10.2f\n", "plain TCP stream (loopback)", bt, gt);
    printf("%-36s %10.2f  target >= 0.8\n", "xnode_ratio_vs_tcp", gx / gt);
    printf("{\"bench\":\"xnode\",\"bytes\":%zu,\"chunk\":%zu,\"ucx_tls\":\"%s\","
           "\"peer_errors\":%d,\"xport_gbs\":%.3f,\"tcp_gbs\":%.3f,\"xnode_ratio_vs_tcp\":%.3f}\n",
           b.bytes, b.chunk, tls ? tls : "default", b.peer_errors, gx, gt, gx / gt);
    return 0;
}
