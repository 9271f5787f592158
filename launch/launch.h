/* launch.h: the pieces of `rlb launch` (launch/cmd_launch.c) that are not process
 * supervision: its options (torchrun's plus rlbridge's own, launch_opts.c) and the
 * rendezvous of the nodes' launchers through the store (launch_rdzv.c).
 */
#ifndef RLB_LAUNCH_LAUNCH_H
#define RLB_LAUNCH_LAUNCH_H

#include <stddef.h>

#include "common/store.h"

typedef struct rlb_launch_opts {
    /* torchrun's options, with torchrun's defaults */
    int nnodes_min, nnodes_max;   /* --nnodes N or MIN:MAX (default 1:1) */
    int nproc;                    /* --nproc-per-node, resolved to a number */
    const char *nproc_text;       /* as given: a number, cpu, gpu or auto */
    int node_rank;                /* --node-rank; -1 = assigned by the rendezvous */
    const char *master_addr;      /* --master-addr (default 127.0.0.1) */
    int master_port;              /* --master-port (default 29500); -1 = not given */
    const char *rdzv_backend;     /* --rdzv-backend: static (default) or c10d */
    char rdzv_host[256];          /* --rdzv-endpoint host (default: master address) */
    int rdzv_port;                /* --rdzv-endpoint port; -1 = the default of the backend */
    const char *rdzv_id;          /* --rdzv-id: the run id (default "none") */
    int join_timeout_s;           /* --rdzv-conf join_timeout (default 600) */
    int last_call_s;              /* --rdzv-conf last_call_timeout (default 30) */
    int standalone;               /* --standalone: one node, a free port on localhost */
    int max_restarts;             /* --max-restarts (default 0) */
    double monitor_interval;      /* --monitor-interval seconds (default 0.1) */
    const char *start_method;     /* --start-method: accepted, every start is fork+exec */
    const char *role;             /* --role (default "default") */
    int module;                   /* -m: SCRIPT is a Python module */
    int no_python;                /* --no-python: SCRIPT is an executable */
    int run_path;                 /* --run-path: same as a script path here */
    const char *log_dir;          /* --log-dir; NULL = no log files unless redirected */
    const char *redirects;        /* -r/--redirects: 0..3 or local_rank:bits,... */
    const char *tee;              /* -t/--tee: same syntax */
    const char *local_ranks_filter; /* --local-ranks-filter: ranks shown on the console */
    const char *local_addr;       /* --local-addr: this node's address (default: hostname) */
    /* rlbridge's own */
    int rollout_tp;               /* --rollout-tp: TP size of each replica (default 1) */
    int rollout_replicas;         /* --rollout-replicas on this node (default 1; 0 = none) */
    int rollout_gpus;             /* --rollout-gpus G: replicas = G / rollout_tp (0 = unset) */
    const char *mode;             /* --mode pause|staged (default pause) */
    const char *model;            /* --model DIR; NULL = --tiny, the built-in tiny model */
    const char *device;           /* --device auto|cpu|cuda (RLB_DEVICE of the daemons) */
    const char *quant;            /* --quant none|int8|fp8|fp8-channel (post-load processing) */
    double gpu_mem_util;          /* --gpu-memory-utilization of each rollout GPU (0.9) */
    /* what to run */
    char **script_argv;           /* SCRIPT [args...] */
    int script_argc;
} rlb_launch_opts;

/* GPUs visible on this machine, counted without CUDA (the NVIDIA device nodes). */
int rlb__launch_count_gpus(void);

/* Parses `rlb launch` arguments (argv[0] = "launch") into o. Returns 0, 1 after --help
 * (usage printed to stdout), or 2 after a usage error (one line on stderr). */
int rlb__launch_parse(int argc, char **argv, rlb_launch_opts *o);
/* The bits (1 stdout, 2 stderr) a --redirects / --tee spec gives local_rank; -1 when the
 * spec is malformed. NULL is 0. */
int rlb__launch_std_bits(const char *spec, int local_rank);
/* Whether --local-ranks-filter shows local_rank on the console (no filter: all). */
int rlb__launch_rank_shown(const char *filter, int local_rank);

/* The outcome of the rendezvous, and the store connection the node keeps for the run. */
typedef struct rlb_rdzv {
    rlb_store_server *server; /* node 0 only: the store */
    rlb_store *store;         /* every node's connection to it */
    int node_rank;            /* this node's rank */
    int nnodes;               /* the nodes of the job */
    char master_addr[256];    /* MASTER_ADDR of the trainers */
    int master_port;          /* MASTER_PORT of the trainers */
    char store_addr[256];     /* where the store listens */
    int store_port;
} rlb_rdzv;

/* Joins the job's rendezvous: node 0 starts the store, every node says who it is
 * (nnodes, nproc-per-node, whether its script exists: script_error, NULL when it does), and
 * node 0 checks that they agree, within the join timeout. Returns 0 with r filled, or a
 * negative RLB_E* with err holding the one-line reason, naming the node and the value; on
 * a failure found by node 0, every node gets the same reason. */
int rlb__rdzv_join(const rlb_launch_opts *o, const char *script_error, rlb_rdzv *r, char *err,
                   size_t errcap);
/* Closes the connection (and stops node 0's store). */
void rlb__rdzv_leave(rlb_rdzv *r);

#endif /* RLB_LAUNCH_LAUNCH_H */
