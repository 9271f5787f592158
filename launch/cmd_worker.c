/* cmd_worker.c: `rlb worker`, one TP rank of one replica on the CPU backend
 * (worker/daemon.h), serving the bridge at --bridge SOCKET (a path, or a name in the
 * socket directory). Exit status: 0 after a shutdown, SIGTERM or SIGINT; 1 when it could
 * not start or lost the bridge or a TP peer; 2 on bad usage.
 */
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "common/conn.h"
#include "common/log.h"
#include "common/cli_args.h"
#include "launch/cmds.h"
#include "worker/daemon.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: rlb worker --bridge SOCKET --replica D --tp-rank T --tp-size S "
            "[--model DIR | --tiny] [options]\n"
            "  --bridge SOCKET      the bridge's socket path or name (default \"%s\")\n"
            "  --replica D          data-parallel replica index (default 0)\n"
            "  --replicas N         replicas in the run (default 1)\n"
            "  --tp-rank T          tensor-parallel rank in the replica (default 0)\n"
            "  --tp-size S          tensor-parallel size (default 1)\n"
            "  --model DIR          HF checkpoint (initial weights); --tiny: the built-in "
            "tiny model (default), zero until the first sync\n"
            "  --no-weights         with --model: read only config.json; the weights come with "
            "the first sync\n"
            RLB_BACKEND_USAGE
            "  --kv-mb N            KV cache budget in MiB (default: 64 on the CPU, the GPU's "
            "--gpu-memory-utilization share)\n"
            "  --threads N          BLAS threads (default: RLB_THREADS)\n",
            RLB_SOCKET_DEFAULT);
}

int rlb__cmd_worker(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"bridge", required_argument, NULL, 'b'},   {"replica", required_argument, NULL, 'd'},
        {"replicas", required_argument, NULL, 'D'}, {"tp-rank", required_argument, NULL, 't'},
        {"tp-size", required_argument, NULL, 'T'},  {"model", required_argument, NULL, 'm'},
        {"tiny", no_argument, NULL, 'y'},           RLB_BACKEND_LONGOPTS,
        {"no-weights", no_argument, NULL, 'n'},
        {"kv-mb", required_argument, NULL, 'k'},    {"threads", required_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0}};
    const char *bridge = RLB_SOCKET_DEFAULT;
    uint64_t replica = 0, replicas = 1, tp_rank = 0, tp_size = 1, kv_mb = 0, threads = 0;
    static volatile sig_atomic_t stop;
    rlb_worker_opts o = RLB_WORKER_OPTS_INIT;
    int no_weights = 0;
    rlb_model_config cfg;
    o.dtype = RLB_DTYPE_BF16; /* on a GPU; the CPU backend is float32 whatever this says */
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case 'b': bridge = optarg; break;
        case 'd': rc = rlb__cli_u64("worker", "replica", optarg, 0, 4095, &replica); break;
        case 'D': rc = rlb__cli_u64("worker", "replicas", optarg, 1, 4096, &replicas); break;
        case 't': rc = rlb__cli_u64("worker", "tp-rank", optarg, 0, 63, &tp_rank); break;
        case 'T': rc = rlb__cli_u64("worker", "tp-size", optarg, 1, 64, &tp_size); break;
        case 'm': o.model_dir = optarg; break;
        case 'y': o.model_dir = NULL; break;
        case 'n': no_weights = 1; break;
        case 'k': rc = rlb__cli_u64("worker", "kv-mb", optarg, 1, 1u << 20, &kv_mb); break;
        case 'j': rc = rlb__cli_u64("worker", "threads", optarg, 0, 256, &threads); break;
        case 'h': usage(stdout); return 0;
        default:
            if ((rc = rlb__backend_optarg("worker", c, optarg, &o)) == 1) {
                usage(stderr);
                return 2;
            }
        }
        if (rc)
            return rc;
    }
    if (optind < argc || replica >= replicas || tp_rank >= tp_size) {
        fprintf(stderr, "rlb worker: %s\n", optind < argc ? "unexpected argument"
                        : replica >= replicas ? "--replica must be below --replicas"
                                              : "--tp-rank must be below --tp-size");
        return 2;
    }
    rlb__log_init_default(RLB_LOG_LVL_INFO);
    char path[PATH_MAX];
    if (!strchr(bridge, '/')) {
        int rc = rlb__conn_socket_path(bridge, path, sizeof(path));
        if (rc < 0) {
            fprintf(stderr, "rlb worker: no socket path for '%s': %s\n", bridge,
                    rlb_strerror(rc));
            return 1;
        }
        bridge = path;
    }
    if (no_weights) {
        char err[256];
        if (!o.model_dir || rlb__config_load_dir(o.model_dir, &cfg, err, sizeof(err)) < 0) {
            fprintf(stderr, "rlb worker: --no-weights needs --model DIR with a config.json%s%s\n",
                    o.model_dir ? ": " : "", o.model_dir ? err : "");
            return 2;
        }
        o.cfg = &cfg; /* weights zero until the first sync */
    }
    o.socket_path = bridge;
    o.replica = (uint32_t)replica;
    o.replicas = (uint32_t)replicas;
    o.tp_rank = (uint32_t)tp_rank;
    o.tp_size = (uint32_t)tp_size;
    o.kv_bytes = kv_mb << 20; /* 0: the backend's default */
    o.threads = (int)threads;
    o.stop = &stop;
    rlb__daemon_stop_on_signals(&stop);
    int rc = rlb__worker_run(&o);
    if (rc < 0)
        fprintf(stderr, "rlb worker: %s\n", rlb_strerror(rc));
    return rc < 0 ? 1 : 0;
}
