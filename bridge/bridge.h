/* bridge.h: the rlb-bridge daemon (DESIGN §1, §5, §6, §7) as a function, so the `rlb
 * bridge` command, the integration tests and the sync benchmark all run the same code.
 *
 * rlb__bridge_run listens on a socket, accepts trainer ranks, workers and tools, keeps the
 * registry of the trainers' tensors, builds the reshard plan once registrations are
 * complete, runs every weight sync as a transaction and schedules generation over the
 * workers' data-parallel replicas, until a shutdown message or *opts->stop becomes
 * non-zero. It returns 0 after a clean shutdown (socket file removed, every segment
 * unmapped and closed), or a negative RLB_E* code when it could not start.
 */
#ifndef RLB_BRIDGE_BRIDGE_H
#define RLB_BRIDGE_BRIDGE_H

#include <signal.h>
#include <stdint.h>

#include "model/config.h"

typedef enum rlb_sync_mode {
    RLB_SYNC_PAUSE = 0, /* drain generation, write the workers' buffers in place */
    RLB_SYNC_STAGED = 1 /* write a second buffer while generation goes on; switch on load */
} rlb_sync_mode;

typedef struct rlb_bridge_opts {
    uint32_t struct_size;        /* sizeof(rlb_bridge_opts): fields may be added later */
    const char *socket_path;     /* where to listen (required) */
    rlb_model_config cfg;        /* the model the workers run (required, validated) */
    rlb_sync_mode mode;          /* sync mode */
    int threads;                 /* plan executor threads; 0 = the RLB_THREADS knob */
    uint64_t ring_bytes;         /* ring capacity per direction per peer; 0 = the knob */
    volatile sig_atomic_t *stop; /* the loop ends when *stop != 0 (signal handlers); may be
                                    NULL */
    const char *base_dir;        /* a checkpoint of the model (config's shapes) whose tensors
                                    serve every parameter no trainer registers (the frozen
                                    base of LoRA training: bridge/base.c); NULL = none */
    /* one node of several (bridge/xnode.h); nnodes 0 or 1: a single node */
    int nnodes;                  /* nodes of the job */
    int node_rank;               /* this node */
    uint32_t first_rank, n_ranks; /* the trainer ranks that publish to this bridge */
    const char *store_addr;      /* the rendezvous store (common/store.h) */
    int store_port;
    const char *run_id;          /* the job's run id at the store */
} rlb_bridge_opts;

#define RLB_BRIDGE_OPTS_INIT {.struct_size = sizeof(rlb_bridge_opts)}

/* Runs the bridge until shutdown. Returns 0, or RLB_EINVAL (bad options), RLB_EEXIST (a
 * bridge already listens there), RLB_ENOMEM, RLB_EIO or the checkpoint reader's error (a
 * base_dir it cannot map) when it could not start. */
int rlb__bridge_run(const rlb_bridge_opts *opts);

/* "pause" / "staged" -> mode. Returns 0 or RLB_EINVAL. */
int rlb__sync_mode_parse(const char *text, rlb_sync_mode *mode);

#endif /* RLB_BRIDGE_BRIDGE_H */
