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
 *
 * --lora (DESIGN §10): each trainer rank also declares a LoRA adapter of rank 16 (alpha 32)
 * on every q, k, v, o, gate, up and down weight it registers, registers the factors beside
 * them, and changes only the factors from one version to the next. Reported per job: the
 * first version's sync and the median of the later ones, and on two nodes the bytes each
 * bridge received from the other (its xnode_bytes_received stat) in the first version and
 * in each later one: after the first, only the other node's factors cross.
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
#include "model/lora.h"
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

#define LORA_RANK 16

/* A job's figures per node, written by its trainer rank. */
typedef struct node_figs {
    double first_ms, later_ms;            /* version 1's sync, the median of the others */
    uint64_t bytes;                       /* bytes written per sync */
    uint64_t recv_first, recv_later;      /* bytes received from the other node: version 1,
                                             each later version (the last one's) */
} node_figs;

/* Trainer rank `node` of `nnodes`: registers its parameters (with --lora also adapters on
 * them), publishes, writes its node_figs to fd as one line. */
static int trainer(const rlb_model_config *cfg, const char *sock, int node, int nnodes,
                   int versions, int lora, int fd)
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
    /* --lora: an adapter on each layer weight of this rank that takes one (the model's own
     * list says which), its factors appended to the list after the model's parameters */
    const int64_t n_base = pl.n;
    for (int64_t p = node; lora && p < n_base; p += nnodes) {
        char target[RLB_PARAM_NAME_MAX];
        snprintf(target, sizeof(target), "%s", pl.params[p].name); /* the list may move */
        if (rlb__lora_adaptable(&pl, p) && pl.params[p].role != RLB_ROLE_VOCAB &&
            rlb__params_add_adapter(&pl, target, LORA_RANK, 2.0f, NULL, 0) != 0)
            return 1;
    }
    /* this rank's parameters, then every factor (all of them this rank's) */
    uint64_t floats = 0, base_floats = 0;
    for (int64_t p = 0; p < pl.n; p++)
        if (p >= n_base || p % nnodes == node) {
            floats += rlb__param_numel(&pl.params[p]);
            base_floats = p < n_base ? floats : base_floats;
        }
    float *mem;
    rlb_tensor_desc *d = calloc((size_t)pl.n + 1, sizeof(*d));
    rlb_lora_desc *ad = calloc((size_t)pl.n_adapters + 1, sizeof(*ad));
    if (!d || !ad || rlb_alloc_host(c, floats * 4 + 4, (void **)&mem) != 0)
        return 1;
    size_t n = 0;
    uint64_t at = 0;
    for (int64_t p = 0; p < pl.n; p++) {
        const rlb_param *q = &pl.params[p];
        if (p < n_base && p % nnodes != node)
            continue;
        rlb_tensor_desc_init(&d[n]);
        d[n].name = q->name;
        d[n].ndim = (uint32_t)q->ndim;
        d[n].shape[0] = (uint64_t)q->rows;
        d[n].shape[1] = (uint64_t)q->cols;
        d[n++].data = mem + at;
        at += rlb__param_numel(q);
    }
    for (uint64_t i = 0; i < base_floats; i++)
        mem[i] = (float)(i % 1000) * 1e-3f;
    for (int64_t k = 0; k < pl.n_adapters; k++) {
        rlb_lora_desc_init(&ad[k]);
        ad[k].target = pl.params[pl.adapters[k].base].name;
        ad[k].rank = LORA_RANK;
        ad[k].alpha = pl.adapters[k].scale * LORA_RANK;
    }
    float *factors = mem + base_floats; /* every factor, after the frozen base */
    const uint64_t factor_floats = floats - base_floats;
    if ((pl.n_adapters && rlb_register_lora(c, ad, (size_t)pl.n_adapters) != 0) ||
        rlb_register(c, d, n) != 0) {
        fprintf(stderr, "rlb-bench-xnode: register: %s\n", rlb_last_error(c));
        return 1;
    }
    double ms[MAX_VERSIONS];
    node_figs fg = {0};
    double received = 0;
    for (int v = 1; v <= versions; v++) {
        for (uint64_t i = 0; i < factor_floats; i++) /* new adapters, the same base */
            factors[i] = (float)((i * 7 + (uint64_t)v) % 1000) * 1e-5f;
        rlb_sync_stats st = {.struct_size = sizeof(st)};
        if (rlb_publish(c, (uint64_t)v, &st) != 0) {
            fprintf(stderr, "rlb-bench-xnode: publish %d: %s\n", v, rlb_last_error(c));
            return 1;
        }
        ms[v - 1] = st.ms;
        fg.bytes = st.bytes;
        rlb_stat_list *l;
        double r = received;
        if (nnodes > 1 && rlb_bridge_stats(c, &l) == 0) {
            rlb_stat_list_find(l, "xnode_bytes_received", &r);
            rlb_stat_list_free(l);
        }
        *(v == 1 ? &fg.recv_first : &fg.recv_later) = (uint64_t)(r - received);
        received = r;
    }
    fg.first_ms = ms[0];
    qsort(ms + 1, (size_t)versions - 1, sizeof(ms[0]), cmp_double);
    fg.later_ms = versions > 1 ? ms[1 + (versions - 1) / 2] : ms[0];
    dprintf(fd, "%d %.4f %.4f %llu %llu %llu\n", node, fg.first_ms, fg.later_ms,
            (unsigned long long)fg.bytes, (unsigned long long)fg.recv_first,
            (unsigned long long)fg.recv_later);
    rlb_close(c);
    rlb__params_free(&pl);
    free(d);
    free(ad);
    return 0;
}

/* One job of nnodes nodes; fg[node] gets each node's figures. */
static int run_job(const rlb_model_config *cfg, int nnodes, int versions, int lora,
                   node_figs *fg)
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
            _exit(trainer(cfg, sock[node], node, nnodes, versions, lora, out[1]));
    close(out[1]);
    for (int node = 0; node < nnodes; node++) {
        int st;
        waitpid(tr[node], &st, 0);
        rc |= !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    FILE *f = fdopen(out[0], "r");
    int node;
    node_figs g;
    unsigned long long b, r1, r2;
    while (f && fscanf(f, "%d %lf %lf %llu %llu %llu", &node, &g.first_ms, &g.later_ms, &b,
                       &r1, &r2) == 6 && node >= 0 && node < nnodes) {
        g.bytes = b;
        g.recv_first = r1;
        g.recv_later = r2;
        fg[node] = g;
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

int rlb__bench_xnode_commit(int versions, int lora)
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
    if (versions < 2 || versions > MAX_VERSIONS)
        versions = 10;
    signal(SIGPIPE, SIG_IGN);
    printf("rlb-bench-xnode --commit%s: sync time (publish -> commit, per node) over %d "
           "versions, one CPU worker per node%s\n", lora ? " --lora" : "", versions,
           lora ? "; LoRA rank 16 on every target, only the factors change" : "");
    printf("%-6s %9s %13s %15s %15s %10s %18s\n", "model", "MB/sync", "1 node v1/later",
           "2 nodes v1", "2 nodes later", "added ms", "received v1/later");
    for (size_t i = 0; i < sizeof(models) / sizeof(models[0]); i++) {
        node_figs one[1] = {{0}}, two[2] = {{0}};
        if (run_job(models[i].cfg, 1, versions, lora, one) < 0 ||
            run_job(models[i].cfg, 2, versions, lora, two) < 0) {
            fprintf(stderr, "rlb-bench-xnode: the %s job failed\n", models[i].name);
            return 1;
        }
        double worst = two[0].later_ms > two[1].later_ms ? two[0].later_ms : two[1].later_ms;
        double mb = 1e6;
        printf("%-6s %9.1f %6.2f/%-6.2f %7.2f/%-7.2f %7.2f/%-7.2f %10.2f %8.2f/%-7.3f MB\n",
               models[i].name, (double)one[0].bytes / mb, one[0].first_ms, one[0].later_ms,
               two[0].first_ms, two[1].first_ms, two[0].later_ms, two[1].later_ms,
               worst - one[0].later_ms,
               (double)(two[0].recv_first + two[1].recv_first) / 2 / mb,
               (double)(two[0].recv_later + two[1].recv_later) / 2 / mb);
        printf("{\"bench\":\"xnode_commit\",\"lora\":%d,\"model\":\"%s\",\"bytes\":%llu,"
               "\"one_node_ms\":%.3f,\"two_nodes_ms\":[%.3f,%.3f],\"added_ms\":%.3f,"
               "\"two_nodes_first_ms\":[%.3f,%.3f],\"received_first\":[%llu,%llu],"
               "\"received_later\":[%llu,%llu]}\n", lora, models[i].name,
               (unsigned long long)one[0].bytes, one[0].later_ms, two[0].later_ms,
               two[1].later_ms, worst - one[0].later_ms, two[0].first_ms, two[1].first_ms,
               (unsigned long long)two[0].recv_first, (unsigned long long)two[1].recv_first,
               (unsigned long long)two[0].recv_later, (unsigned long long)two[1].recv_later);
    }
    return 0;
}
