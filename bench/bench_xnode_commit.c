/* bench_xnode_commit.c: `rlb-bench-xnode --commit`, what a second node adds to a commit.
 *
 * For each model, the same job runs on one node and on two nodes of this machine: per node a
 * bridge (bridge/xnode.h when there are two, meeting through a store this process serves),
 * one CPU worker (TP 1) and one trainer rank (librlb) that registers its share of the
 * parameters FULL in float32 (rank r of W the parameters p with p % W == r) and publishes
 * N versions back to back. A sync's time is the bridge's, from the node's last publish to
 * its commit (synced.ms); the figure is the median over the versions, per node. Two nodes
 * add the exchange (gate, registrations, transfer of what the other node holds, staging) and
 * the two-phase commit through the store; the peer in the same run is the one-node job.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench/bench_xnode.h"
#include "bridge/bridge.h"
#include "common/store.h"
#include "model/config.h"
#include "model/params.h"
#include "rlb/rlb.h"
#include "worker/daemon.h"

#define RUN_ID "xnode-commit-bench"
#define MAX_VERSIONS 64

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Trainer rank `node` of `nnodes`: registers its parameters, publishes, writes the median
 * sync ms and the bytes written per sync to fd. */
static int trainer(const rlb_model_config *cfg, const char *sock, int node, int nnodes,
                   int versions, int fd)
{
    rlb_param_list pl;
    rlb_client *c = NULL;
    rlb_client_options co;
    rlb_client_options_init(&co);
    co.socket = sock;
    co.rank = (uint32_t)node;
    co.world = (uint32_t)nnodes;
    co.request_timeout_ms = 60000;
    if (rlb__params_init(&pl, cfg, NULL, 0) != 0 || rlb_connect(&co, &c) != 0)
        return 1;
    uint64_t floats = 0;
    for (int64_t p = node; p < pl.n; p += nnodes)
        floats += rlb__param_numel(&pl.params[p]);
    float *mem;
    rlb_tensor_desc *d = calloc((size_t)pl.n, sizeof(*d));
    if (!d || rlb_alloc_host(c, floats * 4 + 4, (void **)&mem) != 0)
        return 1;
    size_t n = 0;
    uint64_t at = 0;
    for (int64_t p = node; p < pl.n; p += nnodes, n++) {
        rlb_tensor_desc_init(&d[n]);
        d[n].name = pl.params[p].name;
        d[n].ndim = (uint32_t)pl.params[p].ndim;
        d[n].shape[0] = (uint64_t)pl.params[p].rows;
        d[n].shape[1] = (uint64_t)pl.params[p].cols;
        d[n].data = mem + at;
        at += rlb__param_numel(&pl.params[p]);
    }
    for (uint64_t i = 0; i < floats; i++)
        mem[i] = (float)(i % 1000) * 1e-3f;
    if (rlb_register(c, d, n) != 0) {
        fprintf(stderr, "rlb-bench-xnode: register: %s\n", rlb_last_error(c));
        return 1;
    }
    double ms[MAX_VERSIONS];
    uint64_t bytes = 0;
    for (int v = 1; v <= versions; v++) {
        rlb_sync_stats st = {.struct_size = sizeof(st)};
        if (rlb_publish(c, (uint64_t)v, &st) != 0) {
            fprintf(stderr, "rlb-bench-xnode: publish %d: %s\n", v, rlb_last_error(c));
            return 1;
        }
        ms[v - 1] = st.ms;
        bytes = st.bytes;
    }
    qsort(ms, (size_t)versions, sizeof(ms[0]), cmp_double);
    dprintf(fd, "%d %.4f %llu\n", node, ms[versions / 2], (unsigned long long)bytes);
    rlb_close(c);
    rlb__params_free(&pl);
    return 0;
}

/* One job of nnodes nodes; ms[node] gets each node's median sync time. */
static int run_job(const rlb_model_config *cfg, int nnodes, int versions, double *ms,
                   uint64_t *bytes)
{
    char dir[] = "/tmp/rlb-bench-xnode-XXXXXX";
    rlb_store_server *srv = NULL;
    pid_t pids[12];
    int np = 0, out[2], rc = 0;
    if (!mkdtemp(dir))
        return -1;
    if (nnodes > 1 && rlb__store_server_start("127.0.0.1", 0, RUN_ID, &srv) < 0)
        return -1;
    int port = srv ? rlb__store_server_port(srv) : 0;
    char sock[4][128];
    for (int node = 0; node < nnodes; node++) {
        snprintf(sock[node], sizeof(sock[node]), "%s/bridge%d", dir, node);
        if ((pids[np++] = fork()) == 0) {
            static volatile sig_atomic_t stop;
            rlb__daemon_stop_on_signals(&stop);
            rlb_bridge_opts o = RLB_BRIDGE_OPTS_INIT;
            o.socket_path = sock[node];
            o.cfg = *cfg;
            o.stop = &stop;
            o.nnodes = nnodes;
            o.node_rank = node;
            o.first_rank = (uint32_t)node;
            o.n_ranks = 1;
            o.store_addr = "127.0.0.1";
            o.store_port = port;
            o.run_id = RUN_ID;
            _exit(rlb__bridge_run(&o) ? 1 : 0);
        }
    }
    usleep(300000);
    for (int node = 0; node < nnodes; node++)
        if ((pids[np++] = fork()) == 0) {
            rlb_worker_opts o = RLB_WORKER_OPTS_INIT;
            o.socket_path = sock[node];
            o.cfg = cfg;
            o.kv_bytes = 4u << 20;
            o.threads = 1;
            _exit(rlb__worker_run(&o) ? 1 : 0);
        }
    usleep(300000);
    pid_t tr[4];
    if (pipe(out) < 0) /* after the daemons: only the trainers hold its write end */
        return -1;
    for (int node = 0; node < nnodes; node++)
        if ((tr[node] = fork()) == 0)
            _exit(trainer(cfg, sock[node], node, nnodes, versions, out[1]));
    close(out[1]);
    for (int node = 0; node < nnodes; node++) {
        int st;
        waitpid(tr[node], &st, 0);
        rc |= !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    FILE *f = fdopen(out[0], "r");
    int node;
    double m;
    unsigned long long b;
    while (f && fscanf(f, "%d %lf %llu", &node, &m, &b) == 3 && node >= 0 && node < nnodes) {
        ms[node] = m;
        *bytes = b;
    }
    if (f)
        fclose(f);
    for (int i = 0; i < nnodes; i++)
        kill(pids[i], SIGTERM);
    for (int i = 0; i < np; i++)
        waitpid(pids[i], NULL, 0);
    rlb__store_server_stop(srv);
    rmdir(dir);
    return rc ? -1 : 0;
}

int rlb__bench_xnode_commit(int versions)
{
    rlb_model_config tiny, mid;
    rlb__config_tiny(&tiny);
    mid = tiny; /* ~21M parameters: D 512, 4 layers, V 8000 */
    mid.hidden = 512;
    mid.intermediate = 1536;
    mid.n_heads = 8;
    mid.n_kv_heads = 8;
    mid.head_dim = 64;
    mid.n_layers = 4;
    mid.vocab = 8000;
    const struct {
        const char *name;
        const rlb_model_config *cfg;
    } models[] = {{"tiny", &tiny}, {"21M", &mid}};
    if (versions < 1 || versions > MAX_VERSIONS)
        versions = 10;
    signal(SIGPIPE, SIG_IGN);
    printf("rlb-bench-xnode --commit: median sync time (publish -> commit, per node) over %d "
           "versions, one CPU worker per node\n", versions);
    printf("%-6s %12s %14s %14s %14s\n", "model", "MB/sync", "1 node ms", "2 nodes ms",
           "added ms");
    for (size_t i = 0; i < sizeof(models) / sizeof(models[0]); i++) {
        double one[1] = {0}, two[2] = {0};
        uint64_t b1 = 0, b2 = 0;
        if (run_job(models[i].cfg, 1, versions, one, &b1) < 0 ||
            run_job(models[i].cfg, 2, versions, two, &b2) < 0) {
            fprintf(stderr, "rlb-bench-xnode: the %s job failed\n", models[i].name);
            return 1;
        }
        double worst = two[0] > two[1] ? two[0] : two[1];
        printf("%-6s %12.1f %14.2f %7.2f/%-6.2f %14.2f\n", models[i].name, (double)b1 / 1e6,
               one[0], two[0], two[1], worst - one[0]);
        printf("{\"bench\":\"xnode_commit\",\"model\":\"%s\",\"bytes\":%llu,\"one_node_ms\":%.3f,"
               "\"two_nodes_ms\":[%.3f,%.3f],\"added_ms\":%.3f}\n", models[i].name,
               (unsigned long long)b1, one[0], two[0], two[1], worst - one[0]);
    }
    return 0;
}
