/* daemon.h: the rlb-worker daemon (DESIGN §1, §6) as a function: one TP rank of one
 * data-parallel replica on the CPU or CUDA backend (worker/backends.h), driven by the bridge.
 *
 * It connects to the bridge, learns the sync mode (a stats request: "staged"), allocates
 * its weight buffer laid out by model/tp_layout.h — on the CPU a float32 shared-memory
 * segment (a second one in staged mode), on a GPU the CUDA backend's device weights —
 * fills it from a checkpoint (or leaves it zero for the built-in tiny model until the
 * first sync), passes it to the bridge as segment 1 (and 2; a GPU worker passes its VMM
 * fd, pause mode only for now), says hello (with its device, GPU uuid and weight dtype), maps the CPU TP communicator the bridge hands a replica of TP size > 1,
 * and then runs the engine on the bridge's commands: generate, load, sleep, wake,
 * shutdown. Results carry the version of the weights they were sampled with.
 */
#ifndef RLB_WORKER_DAEMON_H
#define RLB_WORKER_DAEMON_H

#include <signal.h>
#include <stdint.h>

#include "model/config.h"
#include "worker/forward.h"

typedef struct rlb_worker_opts {
    uint32_t struct_size;        /* sizeof(rlb_worker_opts) */
    const char *socket_path;     /* the bridge's socket (required) */
    uint32_t replica;            /* data-parallel replica index, < replicas */
    uint32_t replicas;           /* replicas in the run (0 = 1) */
    uint32_t tp_rank;            /* TP rank in the replica, < tp_size */
    uint32_t tp_size;            /* TP size (0 = 1) */
    const char *model_dir;       /* HF checkpoint directory, or NULL for the tiny model */
    const rlb_model_config *cfg; /* when set: this model, weights zero until the first sync
                                    (benchmarks, tests); model_dir is then ignored */
    rlb_quant quant;             /* post-load processing */
    uint64_t kv_bytes;           /* KV cache budget; 0 = RLB_WORKER_KV_DEFAULT */
    int threads;                 /* OpenBLAS threads; 0 = the RLB_THREADS knob */
    volatile sig_atomic_t *stop; /* the daemon ends when *stop != 0; may be NULL */
    rlb_device device;           /* backend: AUTO (the RLB_DEVICE knob's choice), CPU, CUDA */
    int cuda_device;             /* CUDA: GPU ordinal */
    rlb_dtype dtype;             /* CUDA: weight dtype (F32, BF16, F16; `rlb worker`
                                    passes BF16 unless told otherwise) */
    double gpu_memory_utilization; /* CUDA: KV budget share of the GPU (0 = 0.9) when
                                    kv_bytes is 0 */
    int no_graphs;               /* CUDA: 1 = no CUDA graphs */
    int batch_invariant;         /* CUDA: 1 = batch-invariant kernels (--batch-invariant) */
} rlb_worker_opts;

#define RLB_WORKER_OPTS_INIT {.struct_size = sizeof(rlb_worker_opts)}
#define RLB_WORKER_KV_DEFAULT (64ull << 20)

/* Runs the worker until the bridge says shutdown, the bridge goes away or *opts->stop.
 * Returns 0 after a shutdown message or a stop request, RLB_EPEERDEAD when the bridge or a
 * TP peer died, or the error that prevented start-up (bad options, refused hello, no
 * memory, a checkpoint that does not load). */
int rlb__worker_run(const rlb_worker_opts *opts);

/* ---- Helpers of the daemon commands (`rlb worker`, `rlb bridge`): daemon_args.c ------- */

/* Installs SIGTERM / SIGINT handlers that set *flag (without SA_RESTART, so a blocking
 * poll returns at once) and ignores SIGPIPE. */
void rlb__daemon_stop_on_signals(volatile sig_atomic_t *flag);
/* The backend options every engine command takes (`rlb worker`, `rlb generate`):
 *   --device auto|cpu|cuda, --gpu N, --dtype bf16|fp16|fp32, --quant
 *   none|int8|fp8|fp8-channel, --gpu-memory-utilization F, --no-graphs, --batch-invariant
 * RLB_BACKEND_LONGOPTS are their getopt_long entries (values 0x400 and up) and
 * RLB_BACKEND_USAGE their help lines. */
#define RLB_BACKEND_OPT_BASE 0x400
#define RLB_BACKEND_LONGOPTS                                                              \
    {"device", required_argument, NULL, RLB_BACKEND_OPT_BASE + 0},                        \
        {"gpu", required_argument, NULL, RLB_BACKEND_OPT_BASE + 1},                       \
        {"dtype", required_argument, NULL, RLB_BACKEND_OPT_BASE + 2},                     \
        {"quant", required_argument, NULL, RLB_BACKEND_OPT_BASE + 3},                     \
        {"gpu-memory-utilization", required_argument, NULL, RLB_BACKEND_OPT_BASE + 4},    \
        {"no-graphs", no_argument, NULL, RLB_BACKEND_OPT_BASE + 5},                        \
        {"batch-invariant", no_argument, NULL, RLB_BACKEND_OPT_BASE + 6}
#define RLB_BACKEND_USAGE                                                                 \
    "  --device D           auto (a GPU when one is visible), cpu or cuda (default: the "   \
    "RLB_DEVICE knob)\n"                                                                  \
    "  --gpu N              GPU ordinal (default 0)\n"                                     \
    "  --dtype T            GPU weight dtype: bf16 (default), fp16 or fp32\n"              \
    "  --quant Q            post-load processing: none (default), int8; on a GPU also fp8, " \
    "fp8-channel\n"                                                                        \
    "  --gpu-memory-utilization F  share of the GPU the worker fills, KV cache included "  \
    "(default 0.9)\n"                                                                     \
    "  --no-graphs          GPU: run decode steps without CUDA graphs\n"                  \
    "  --batch-invariant    GPU: a sequence's logits bitwise the same whatever else is in " \
    "the batch (fixed GEMM algorithms, one attention split; slower)\n"

/* Applies backend option `c` (an RLB_BACKEND_OPT_BASE + i value) with argument `arg` to o.
 * Returns 1 when c is not a backend option, 0 when applied, 2 (usage error, printed as
 * "rlb CMD: ...") for a bad value. */
int rlb__backend_optarg(const char *cmd, int c, const char *arg, rlb_worker_opts *o);

#endif /* RLB_WORKER_DAEMON_H */
