/* launch_opts.c: the options of `rlb launch`: torchrun's, under both their spellings
 * (--nproc-per-node and --nproc_per_node), with torchrun's defaults and meanings, then
 * rlbridge's own (--rollout-*, --mode, --model/--tiny, --device, --quant). Parsing stops
 * at the first argument that is not an option, the training script, as torchrun's does;
 * everything after it is the script's.
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "launch/launch.h"

enum {
    O_NNODES = 256, O_NPROC, O_NODE_RANK, O_MASTER_ADDR, O_MASTER_PORT, O_RDZV_BACKEND,
    O_RDZV_ENDPOINT, O_RDZV_ID, O_RDZV_CONF, O_STANDALONE, O_MAX_RESTARTS, O_MONITOR,
    O_START_METHOD, O_ROLE, O_NO_PYTHON, O_RUN_PATH, O_LOG_DIR, O_LOCAL_FILTER, O_LOCAL_ADDR,
    O_LOGS_SPECS, O_ROLLOUT_TP, O_ROLLOUT_REPLICAS, O_ROLLOUT_GPUS, O_MODE, O_MODEL, O_TINY,
    O_DEVICE, O_QUANT, O_GPU_MEM, O_HELP,
};

/* Each of torchrun's options under both its spellings. */
#define BOTH(dash, under, arg, id) {dash, arg, NULL, id}, {under, arg, NULL, id}

static const struct option longopts[] = {
    {"nnodes", required_argument, NULL, O_NNODES},
    BOTH("nproc-per-node", "nproc_per_node", required_argument, O_NPROC),
    BOTH("node-rank", "node_rank", required_argument, O_NODE_RANK),
    BOTH("master-addr", "master_addr", required_argument, O_MASTER_ADDR),
    BOTH("master-port", "master_port", required_argument, O_MASTER_PORT),
    BOTH("rdzv-backend", "rdzv_backend", required_argument, O_RDZV_BACKEND),
    BOTH("rdzv-endpoint", "rdzv_endpoint", required_argument, O_RDZV_ENDPOINT),
    BOTH("rdzv-id", "rdzv_id", required_argument, O_RDZV_ID),
    BOTH("rdzv-conf", "rdzv_conf", required_argument, O_RDZV_CONF),
    {"standalone", no_argument, NULL, O_STANDALONE},
    BOTH("max-restarts", "max_restarts", required_argument, O_MAX_RESTARTS),
    BOTH("monitor-interval", "monitor_interval", required_argument, O_MONITOR),
    BOTH("start-method", "start_method", required_argument, O_START_METHOD),
    {"role", required_argument, NULL, O_ROLE},
    {"module", no_argument, NULL, 'm'},
    BOTH("no-python", "no_python", no_argument, O_NO_PYTHON),
    BOTH("run-path", "run_path", no_argument, O_RUN_PATH),
    BOTH("log-dir", "log_dir", required_argument, O_LOG_DIR),
    {"redirects", required_argument, NULL, 'r'},
    {"tee", required_argument, NULL, 't'},
    BOTH("local-ranks-filter", "local_ranks_filter", required_argument, O_LOCAL_FILTER),
    BOTH("local-addr", "local_addr", required_argument, O_LOCAL_ADDR),
    BOTH("logs-specs", "logs_specs", required_argument, O_LOGS_SPECS),
    {"rollout-tp", required_argument, NULL, O_ROLLOUT_TP},
    {"rollout-replicas", required_argument, NULL, O_ROLLOUT_REPLICAS},
    {"rollout-gpus", required_argument, NULL, O_ROLLOUT_GPUS},
    {"mode", required_argument, NULL, O_MODE},
    {"model", required_argument, NULL, O_MODEL},
    {"tiny", no_argument, NULL, O_TINY},
    {"device", required_argument, NULL, O_DEVICE},
    {"quant", required_argument, NULL, O_QUANT},
    {"gpu-memory-utilization", required_argument, NULL, O_GPU_MEM},
    {"help", no_argument, NULL, O_HELP},
    {NULL, 0, NULL, 0}};

static void usage(FILE *f)
{
    fprintf(f,
        "usage: rlb launch [torchrun options] [rlbridge options] SCRIPT [args...]\n"
        "torchrun's options (same meanings; README lists what each does here):\n"
        "  --nnodes N|MIN:MAX  --nproc-per-node N|cpu|gpu|auto  --node-rank R\n"
        "  --master-addr A  --master-port P  --rdzv-backend static|c10d\n"
        "  --rdzv-endpoint HOST[:PORT]  --rdzv-id ID  --rdzv-conf k=v,...  --standalone\n"
        "  --max-restarts N  --monitor-interval S  --start-method M  --role NAME\n"
        "  -m/--module  --no-python  --run-path  --log-dir DIR  -r/--redirects SPEC\n"
        "  -t/--tee SPEC  --local-ranks-filter R,...  --local-addr A\n"
        "rlbridge's options (this node's bridge and workers, up before the trainers):\n"
        "  --rollout-replicas N   replicas on this node (default 1; 0: no bridge, no workers)\n"
        "  --rollout-gpus G       G devices for rollout: G / --rollout-tp replicas\n"
        "  --rollout-tp T         tensor-parallel size of a replica (default 1)\n"
        "  --mode pause|staged    sync mode (default pause)\n"
        "  --model DIR | --tiny   the workers' model (default: the built-in tiny model)\n"
        "  --device auto|cpu|cuda the daemons' backend (RLB_DEVICE)\n"
        "  --quant Q              the workers' post-load processing: none (default), int8,\n"
        "                         fp8, fp8-channel (fp8 on GPU workers only)\n"
        "  --gpu-memory-utilization F\n"
        "                         share of each rollout GPU the workers fill (default 0.9),\n"
        "                         split evenly between workers that share a GPU\n");
}

static int bad(const char *what, const char *value)
{
    fprintf(stderr, "rlb launch: %s '%s'\n", what, value);
    return 2;
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi)
        return -1;
    *out = (int)v;
    return 0;
}

/* GPUs visible on this machine, counted without CUDA: the NVIDIA device nodes. */
int rlb__launch_count_gpus(void)
{
    int n = 0;
    DIR *d = opendir("/dev");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        int idx;
        if (!strncmp(e->d_name, "nvidia", 6) && parse_int(e->d_name + 6, 0, 1023, &idx) == 0)
            n++;
    }
    if (d)
        closedir(d);
    return n;
}

static int parse_nproc(rlb_launch_opts *o, const char *s)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    o->nproc_text = s;
    if (!strcmp(s, "cpu"))
        o->nproc = (int)cpus;
    else if (!strcmp(s, "gpu"))
        o->nproc = rlb__launch_count_gpus();
    else if (!strcmp(s, "auto"))
        o->nproc = rlb__launch_count_gpus() ? rlb__launch_count_gpus() : (int)cpus;
    else if (parse_int(s, 1, 65536, &o->nproc) < 0)
        return bad("--nproc-per-node is a number, cpu, gpu or auto, not", s);
    if (o->nproc < 1) {
        fprintf(stderr, "rlb launch: --nproc-per-node %s, but no GPU is visible\n", s);
        return 2;
    }
    return 0;
}

/* --rdzv-conf k=v,...: join_timeout and last_call_timeout are read; others are accepted. */
static int parse_rdzv_conf(rlb_launch_opts *o, const char *conf)
{
    char buf[512];
    snprintf(buf, sizeof(buf), "%s", conf);
    for (char *save = NULL, *kv = strtok_r(buf, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq)
            return bad("--rdzv-conf entries are key=value, not", kv);
        *eq = 0;
        int *dst = !strcmp(kv, "join_timeout") ? &o->join_timeout_s
                   : !strcmp(kv, "last_call_timeout") ? &o->last_call_s : NULL;
        if (dst && parse_int(eq + 1, 0, 86400, dst) < 0)
            return bad("--rdzv-conf timeouts are whole seconds, not", eq + 1);
    }
    return 0;
}

int rlb__launch_std_bits(const char *spec, int local_rank)
{
    int bits = 0, v;
    if (!spec || !*spec)
        return 0;
    if (parse_int(spec, 0, 3, &v) == 0)
        return v;
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", spec);
    for (char *save = NULL, *e = strtok_r(buf, ",", &save); e; e = strtok_r(NULL, ",", &save)) {
        char *colon = strchr(e, ':');
        int rank;
        if (!colon)
            return -1;
        *colon = 0;
        if (parse_int(e, 0, 65535, &rank) < 0 || parse_int(colon + 1, 0, 3, &v) < 0)
            return -1;
        if (rank == local_rank)
            bits = v;
    }
    return bits;
}

int rlb__launch_rank_shown(const char *filter, int local_rank)
{
    if (!filter || !*filter)
        return 1;
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", filter);
    for (char *save = NULL, *e = strtok_r(buf, ",", &save); e; e = strtok_r(NULL, ",", &save))
        if (atoi(e) == local_rank)
            return 1;
    return 0;
}

/* Splits HOST[:PORT] into the options. */
static int parse_endpoint(rlb_launch_opts *o, const char *s)
{
    snprintf(o->rdzv_host, sizeof(o->rdzv_host), "%s", s);
    char *colon = strrchr(o->rdzv_host, ':');
    if (colon) {
        *colon = 0;
        if (parse_int(colon + 1, 1, 65535, &o->rdzv_port) < 0)
            return bad("--rdzv-endpoint port is a number in 1..65535, not", colon + 1);
    }
    if (!o->rdzv_host[0])
        return bad("--rdzv-endpoint needs a host:", s);
    return 0;
}

static void defaults(rlb_launch_opts *o)
{
    *o = (rlb_launch_opts){.nnodes_min = 1, .nnodes_max = 1, .nproc = 1, .nproc_text = "1",
                           .node_rank = -1, .master_addr = "127.0.0.1", .master_port = -1,
                           .rdzv_backend = "static", .rdzv_port = -1, .rdzv_id = "none",
                           .join_timeout_s = 600, .last_call_s = 30, .monitor_interval = 0.1,
                           .start_method = "spawn", .role = "default", .rollout_tp = 1,
                           .rollout_replicas = 1, .mode = "pause", .device = "auto",
                           .quant = "none", .gpu_mem_util = 0.9};
    /* the daemons' backend follows RLB_DEVICE unless --device says otherwise */
    const char *env = getenv("RLB_DEVICE");
    if (env && (!strcmp(env, "auto") || !strcmp(env, "cpu") || !strcmp(env, "cuda")))
        o->device = env;
}

int rlb__launch_parse(int argc, char **argv, rlb_launch_opts *o)
{
    int c, rc = 0, replicas_given = 0;
    defaults(o);
    optind = 1;
    /* "+": stop at the script, so its own options stay its own */
    while (!rc && (c = getopt_long(argc, argv, "+mr:t:", longopts, NULL)) != -1) {
        char *colon, *end;
        switch (c) {
        case O_NNODES:
            colon = strchr(optarg, ':');
            if (colon ? (sscanf(optarg, "%d:%d", &o->nnodes_min, &o->nnodes_max) != 2)
                      : parse_int(optarg, 1, 65536, &o->nnodes_min) < 0)
                rc = bad("--nnodes is N or MIN:MAX, not", optarg);
            if (!colon)
                o->nnodes_max = o->nnodes_min;
            if (!rc && (o->nnodes_min < 1 || o->nnodes_max < o->nnodes_min))
                rc = bad("--nnodes needs 1 <= MIN <= MAX, not", optarg);
            break;
        case O_NPROC: rc = parse_nproc(o, optarg); break;
        case O_NODE_RANK:
            if (parse_int(optarg, 0, 65535, &o->node_rank) < 0)
                rc = bad("--node-rank is a number, not", optarg);
            break;
        case O_MASTER_ADDR: o->master_addr = optarg; break;
        case O_MASTER_PORT:
            if (parse_int(optarg, 1, 65534, &o->master_port) < 0)
                rc = bad("--master-port is a number in 1..65534, not", optarg);
            break;
        case O_RDZV_BACKEND:
            if (strcmp(optarg, "static") && strcmp(optarg, "c10d"))
                rc = bad("--rdzv-backend is static or c10d here (etcd is not built in), not",
                         optarg);
            o->rdzv_backend = optarg;
            break;
        case O_RDZV_ENDPOINT: rc = parse_endpoint(o, optarg); break;
        case O_RDZV_ID: o->rdzv_id = optarg; break;
        case O_RDZV_CONF: rc = parse_rdzv_conf(o, optarg); break;
        case O_STANDALONE: o->standalone = 1; break;
        case O_MAX_RESTARTS:
            if (parse_int(optarg, 0, 1000000, &o->max_restarts) < 0)
                rc = bad("--max-restarts is a number, not", optarg);
            break;
        case O_MONITOR:
            o->monitor_interval = strtod(optarg, &end);
            if (*end || o->monitor_interval < 0.001 || o->monitor_interval > 3600)
                rc = bad("--monitor-interval is seconds in 0.001..3600, not", optarg);
            break;
        case O_START_METHOD:
            if (strcmp(optarg, "spawn") && strcmp(optarg, "fork") && strcmp(optarg, "forkserver"))
                rc = bad("--start-method is spawn, fork or forkserver, not", optarg);
            o->start_method = optarg;
            break;
        case O_ROLE: o->role = optarg; break;
        case 'm': o->module = 1; break;
        case O_NO_PYTHON: o->no_python = 1; break;
        case O_RUN_PATH: o->run_path = 1; break;
        case O_LOG_DIR: o->log_dir = optarg; break;
        case 'r': o->redirects = optarg; break;
        case 't': o->tee = optarg; break;
        case O_LOCAL_FILTER: o->local_ranks_filter = optarg; break;
        case O_LOCAL_ADDR: o->local_addr = optarg; break;
        case O_LOGS_SPECS: rc = bad("--logs-specs (a Python plugin) is not supported:", optarg); break;
        case O_ROLLOUT_TP:
            if (parse_int(optarg, 1, 64, &o->rollout_tp) < 0)
                rc = bad("--rollout-tp is a number in 1..64, not", optarg);
            break;
        case O_ROLLOUT_REPLICAS:
            if (parse_int(optarg, 0, 4096, &o->rollout_replicas) < 0)
                rc = bad("--rollout-replicas is a number, not", optarg);
            replicas_given = 1;
            break;
        case O_ROLLOUT_GPUS:
            if (parse_int(optarg, 1, 65536, &o->rollout_gpus) < 0)
                rc = bad("--rollout-gpus is a number, not", optarg);
            break;
        case O_MODE:
            if (strcmp(optarg, "pause") && strcmp(optarg, "staged"))
                rc = bad("--mode is pause or staged, not", optarg);
            o->mode = optarg;
            break;
        case O_MODEL: o->model = optarg; break;
        case O_TINY: o->model = NULL; break;
        case O_DEVICE:
            if (strcmp(optarg, "auto") && strcmp(optarg, "cpu") && strcmp(optarg, "cuda"))
                rc = bad("--device is auto, cpu or cuda, not", optarg);
            o->device = optarg;
            break;
        case O_QUANT:
            if (strcmp(optarg, "none") && strcmp(optarg, "int8") && strcmp(optarg, "fp8") &&
                strcmp(optarg, "fp8-channel"))
                rc = bad("--quant is none, int8, fp8 or fp8-channel, not", optarg);
            o->quant = optarg;
            break;
        case O_GPU_MEM: {
            char *tail;
            errno = 0;
            o->gpu_mem_util = strtod(optarg, &tail);
            if (errno || tail == optarg || *tail || !(o->gpu_mem_util > 0) || o->gpu_mem_util > 1)
                rc = bad("--gpu-memory-utilization is a number in (0, 1], not", optarg);
            break;
        }
        case O_HELP: usage(stdout); return 1;
        default: usage(stderr); return 2;
        }
    }
    if (rc)
        return rc;
    if (optind >= argc) {
        fprintf(stderr, "rlb launch: no training script given (rlb launch --help)\n");
        return 2;
    }
    o->script_argv = argv + optind;
    o->script_argc = argc - optind;
    if (o->rollout_gpus) {
        if (replicas_given)
            return bad("give --rollout-gpus or --rollout-replicas, not both; --rollout-gpus",
                       argv[0]);
        if (o->rollout_gpus % o->rollout_tp) {
            fprintf(stderr, "rlb launch: --rollout-gpus %d is not a multiple of --rollout-tp "
                            "%d\n", o->rollout_gpus, o->rollout_tp);
            return 2;
        }
        o->rollout_replicas = o->rollout_gpus / o->rollout_tp;
    }
    if (o->module + o->no_python + o->run_path > 1) {
        fprintf(stderr, "rlb launch: -m, --no-python and --run-path exclude each other\n");
        return 2;
    }
    if (rlb__launch_std_bits(o->redirects, 0) < 0 || rlb__launch_std_bits(o->tee, 0) < 0) {
        fprintf(stderr, "rlb launch: --redirects / --tee are 0..3 or local_rank:0..3,...\n");
        return 2;
    }
    if (o->standalone) { /* torchrun: one node, c10d on localhost, a free port */
        o->nnodes_min = o->nnodes_max = 1;
        o->rdzv_backend = "c10d";
        snprintf(o->rdzv_host, sizeof(o->rdzv_host), "localhost");
        o->rdzv_port = 0;
        if (!strcmp(o->rdzv_id, "none"))
            o->rdzv_id = "standalone";
    }
    if (!strcmp(o->rdzv_backend, "static")) {
        if (o->node_rank < 0)
            o->node_rank = 0;
        if (o->nnodes_min != o->nnodes_max) {
            fprintf(stderr, "rlb launch: --nnodes MIN:MAX needs --rdzv-backend c10d\n");
            return 2;
        }
        if (o->node_rank >= o->nnodes_max) {
            fprintf(stderr, "rlb launch: --node-rank %d is not below --nnodes %d\n",
                    o->node_rank, o->nnodes_max);
            return 2;
        }
    } else if (!o->rdzv_host[0]) {
        fprintf(stderr, "rlb launch: --rdzv-backend c10d needs --rdzv-endpoint HOST[:PORT]\n");
        return 2;
    }
    return 0;
}
