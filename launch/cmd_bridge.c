/* cmd_bridge.c: `rlb bridge`, the rlb-bridge daemon (bridge/bridge.h) on the CPU backend.
 *
 * It listens on --socket PATH, or on --name NAME in the per-user socket directory
 * (default name "bridge", where librlb looks by default), for the model of --model DIR
 * (its config.json) or the built-in tiny model (--tiny, the default); with --base it also
 * maps that checkpoint and serves from it every weight no trainer registers (a LoRA
 * trainer's frozen base). It logs one line per event at info level and exits 0 on SIGTERM /
 * SIGINT or a shutdown message, leaving no socket file and nothing in /dev/shm; 1 when it
 * cannot start; 2 on bad usage.
 * In a job of several nodes (`rlb launch` passes --nnodes and the rest) it is node
 * --node-rank's bridge, serving trainer ranks --ranks FIRST:COUNT, and meets the other
 * nodes' bridges through the rendezvous store at --store HOST:PORT (bridge/xnode.h).
 */
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "bridge/bridge.h"
#include "common/conn.h"
#include "common/log.h"
#include "common/cli_args.h"
#include "launch/cmds.h"
#include "worker/daemon.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: rlb bridge [--socket PATH | --name NAME] [--model DIR | --tiny] [options]\n"
            "  --socket PATH        listen on this socket path\n"
            "  --name NAME          listen on NAME in the socket directory (default \"%s\")\n"
            "  --model DIR          the workers' model: DIR/config.json\n"
            "  --tiny               the built-in tiny model (default)\n"
            "  --base               serve every weight no trainer registers from --model's\n"
            "                       checkpoint (LoRA: trainers register only adapters)\n"
            "  --mode pause|staged  sync mode (default pause)\n"
            "  --threads N          copy threads per sync (default: RLB_THREADS)\n"
            "  --ring-bytes N       ring capacity per direction per peer (default: "
            "RLB_RING_BYTES)\n"
            "  --nnodes N           nodes of the job (default 1); with N > 1 also:\n"
            "  --node-rank R        this node\n"
            "  --ranks FIRST:COUNT  the trainer ranks of this node\n"
            "  --store HOST:PORT    the job's rendezvous store\n"
            "  --run-id ID          the job's run id at the store\n",
            RLB_SOCKET_DEFAULT);
}

int rlb__cmd_bridge(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"socket", required_argument, NULL, 's'}, {"name", required_argument, NULL, 'n'},
        {"model", required_argument, NULL, 'm'},  {"tiny", no_argument, NULL, 't'},
        {"mode", required_argument, NULL, 'M'},   {"threads", required_argument, NULL, 'T'},
        {"ring-bytes", required_argument, NULL, 'r'}, {"help", no_argument, NULL, 'h'},
        {"base", no_argument, NULL, 'b'},
        {"nnodes", required_argument, NULL, 'N'}, {"node-rank", required_argument, NULL, 'R'},
        {"ranks", required_argument, NULL, 'k'},  {"store", required_argument, NULL, 'S'},
        {"run-id", required_argument, NULL, 'I'}, {NULL, 0, NULL, 0}};
    const char *socket = NULL, *name = RLB_SOCKET_DEFAULT, *model = NULL;
    int base = 0;
    uint64_t threads = 0, ring_bytes = 0, nnodes = 1, node_rank = 0;
    char store_host[256] = "";
    unsigned first = 0, count = 0;
    int port = 0;
    static volatile sig_atomic_t stop;
    rlb_bridge_opts o = RLB_BRIDGE_OPTS_INIT;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case 's': socket = optarg; break;
        case 'n': name = optarg; break;
        case 'm': model = optarg; break;
        case 't': model = NULL; break;
        case 'b': base = 1; break;
        case 'M':
            if (rlb__sync_mode_parse(optarg, &o.mode) < 0) {
                fprintf(stderr, "rlb bridge: --mode is pause or staged, not '%s'\n", optarg);
                rc = 2;
            }
            break;
        case 'T': rc = rlb__cli_u64("bridge", "threads", optarg, 0, 256, &threads); break;
        case 'r':
            rc = rlb__cli_u64("bridge", "ring-bytes", optarg, 4096, 1ull << 40,
                                       &ring_bytes);
            break;
        case 'N': rc = rlb__cli_u64("bridge", "nnodes", optarg, 1, 65535, &nnodes); break;
        case 'R':
            rc = rlb__cli_u64("bridge", "node-rank", optarg, 0, 65534, &node_rank);
            break;
        case 'k':
            if (sscanf(optarg, "%u:%u", &first, &count) != 2 || count == 0) {
                fprintf(stderr, "rlb bridge: --ranks is FIRST:COUNT, not '%s'\n", optarg);
                rc = 2;
            }
            break;
        case 'S':
            if (sscanf(optarg, "%255[^:]:%d", store_host, &port) != 2 || port <= 0 ||
                port > 65535) {
                fprintf(stderr, "rlb bridge: --store is HOST:PORT, not '%s'\n", optarg);
                rc = 2;
            }
            break;
        case 'I': o.run_id = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (rc)
            return rc;
    }
    if (optind < argc) {
        fprintf(stderr, "rlb bridge: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (nnodes > 1 && (node_rank >= nnodes || !count || !port || !o.run_id)) {
        fprintf(stderr, "rlb bridge: --nnodes %llu needs --node-rank (< nnodes), --ranks, "
                "--store and --run-id\n", (unsigned long long)nnodes);
        return 2;
    }
    o.nnodes = (int)nnodes;
    o.node_rank = (int)node_rank;
    o.first_rank = first;
    o.n_ranks = count;
    o.store_addr = store_host;
    o.store_port = port;
    rlb__log_init_default(RLB_LOG_LVL_INFO);
    char path[PATH_MAX], err[256] = "";
    if (!socket) {
        int rc = rlb__conn_socket_path(name, path, sizeof(path));
        if (rc < 0) {
            fprintf(stderr, "rlb bridge: no socket path for name '%s': %s\n", name,
                    rlb_strerror(rc));
            return 1;
        }
        socket = path;
    }
    if (model && rlb__config_load_dir(model, &o.cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "rlb bridge: %s: %s\n", model, err);
        return 1;
    }
    if (!model)
        rlb__config_tiny(&o.cfg);
    if (base && !model) {
        fprintf(stderr, "rlb bridge: --base serves the checkpoint of --model DIR\n");
        return 2;
    }
    o.base_dir = base ? model : NULL;
    o.socket_path = socket;
    o.threads = (int)threads;
    o.ring_bytes = ring_bytes;
    o.stop = &stop;
    rlb__daemon_stop_on_signals(&stop);
    int rc = rlb__bridge_run(&o);
    if (rc < 0)
        fprintf(stderr, "rlb bridge: %s\n", rlb_strerror(rc));
    return rc < 0 ? 1 : 0;
}
