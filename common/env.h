/* env.h: every environment knob rlbridge reads, declared once, with its default.
 *
 * Code reads a knob only through rlb__env_str / rlb__env_int with its RLB_KNOB_* id, so
 * this table is the complete list (README "Knobs" is printed from it by `rlb doctor`, and
 * test_knobs checks that the README lists every knob with its default). The one knob read
 * elsewhere is RLBRIDGE_LIB: the Python package reads it to find this library.
 * To add a knob: add one X(...) line, and its row in README "Knobs".
 */
#ifndef RLB_COMMON_ENV_H
#define RLB_COMMON_ENV_H

#include <stddef.h>

#include "rlb/rlb.h"

#define RLB__ENV_STR_(x) #x
#define RLB__ENV_STR(x) RLB__ENV_STR_(x) /* a default from a number the public API names */

/* X(id, name, default, help) */
#define RLB_ENV_KNOBS(X)                                                                   \
    X(LOG, "RLB_LOG", "", "log level [error|warn|info|debug] and optional subsystems, "   \
      "e.g. 'debug:ring,conn'; empty = library quiet, daemons at info")                   \
    X(SOCKET_DIR, "RLB_SOCKET_DIR", "", "directory (mode 0700) holding the bridge "         \
      "socket; empty = $XDG_RUNTIME_DIR/rlbridge, else /tmp/rlbridge-<uid>")              \
    X(RING_BYTES, "RLB_RING_BYTES", "8388608", "capacity in bytes of each ring "          \
      "(per direction per peer)")                                                         \
    X(RING_TOOL_BYTES, "RLB_RING_TOOL_BYTES", "262144", "capacity in bytes of each ring " \
      "of an observer client (a tool): larger messages stream through it in fragments")   \
    X(RING_TOTAL_BYTES, "RLB_RING_TOTAL_BYTES", "4294967296", "most bytes of rings the "  \
      "bridge holds for all its connections together; a connection past it is refused")   \
    X(SPIN_US, "RLB_SPIN_US", "50", "microseconds a waiting consumer spins before it "    \
      "sleeps")                                                                           \
    X(WAIT_SLICE_MS, "RLB_WAIT_SLICE_MS", "100", "longest single sleep of a waiter "       \
      "before it rechecks that its peer is alive")                                        \
    X(HEARTBEAT_MS, "RLB_HEARTBEAT_MS", "200", "period of the per-side ring heartbeat")   \
    X(PEER_TIMEOUT_MS, "RLB_PEER_TIMEOUT_MS", "2000", "a peer whose heartbeat is older "  \
      "than this is treated as dead")                                                     \
    X(THREADS, "RLB_THREADS", "0", "CPU threads for kernels (executor, engine); "         \
      "0 = number of online cores")                                                       \
    X(DEVICE, "RLB_DEVICE", "auto", "compute backend: auto, cpu or cuda")                 \
    X(TP_TIMEOUT_MS, "RLB_TP_TIMEOUT_MS", "60000", "longest a CPU tensor-parallel rank "  \
      "waits in a collective for a live peer before it fails the step")                   \
    X(CUDA_PEER, "RLB_CUDA_PEER", "auto", "how a GPU reads weights on another GPU: auto " \
      "(peer access where the GPUs have a peer path, staged copies otherwise) or staged") \
    X(CUDA_PDL, "RLB_CUDA_PDL", "1", "1: the GPU engine's kernels use programmatic "      \
      "dependent launch (each starts while the one before it finishes); 0: plain launches") \
    X(CUDA_STAGE_BYTES, "RLB_CUDA_STAGE_BYTES", "16777216", "bytes of each of the two "   \
      "device staging buffers of a staged read from another GPU")                         \
    X(LORA_MERGE, "RLB_LORA_MERGE", "gemm", "how the CUDA executor writes LoRA-merged "   \
      "weights: gemm (as fused, but merges whose base is one bf16 source in whole rows, "  \
      "in pieces of RLB_LORA_GEMM_MIN_BYTES or more, as cuBLASLt products), fused (one "   \
      "pass: base read from its source plus s*B*A, written once; B*A on tensor cores "     \
      "where the factors are bf16), fused-fma (B*A always in f32 multiply-adds) or "       \
      "separate (the base copied, then the product added in place)")                      \
    X(LORA_GEMM_MIN_BYTES, "RLB_LORA_GEMM_MIN_BYTES", "8388608", "RLB_LORA_MERGE=gemm: "   \
      "the smallest piece of base (bytes) a merge written as cuBLASLt products may have; "  \
      "smaller ones run in the fused kernel")                                              \
    X(NONFINITE, "RLB_NONFINITE", "abort", "what a sync does when the weights it copies "  \
      "hold NaN or Inf: abort (the version, naming the tensors and counts) or allow "     \
      "(commit it and log the counts)")                                                 \
    X(CUDA_IPC, "RLB_CUDA_IPC", "auto", "how a trainer shares device tensors: auto (CUDA " \
      "IPC handles or VMM fds, host staging where the bridge may not open them) or off "   \
      "(always host staging: pinned shared memory copied at each publish)")               \
    X(XNODE_CHUNK_BYTES, "RLB_XNODE_CHUNK_BYTES", "8388608", "bytes per transfer between " \
      "the bridges of different nodes (a multiple of 64); a chunk is resharded into the "  \
      "workers as soon as it arrived")                                                    \
    X(XNODE_STAGING_BYTES, "RLB_XNODE_STAGING_BYTES", "67108864", "most bytes of other "  \
      "nodes' chunks a bridge holds at once (at least one chunk)") \
    X(CONNECT_TIMEOUT_MS, "RLB_CONNECT_TIMEOUT_MS", RLB__ENV_STR(RLB_CONNECT_TIMEOUT_MS),  \
      "bound on connecting to the bridge and its welcome: a worker's, and a client's "     \
      "whose connect_timeout_ms is 0")                                                    \
    X(REQUEST_TIMEOUT_MS, "RLB_REQUEST_TIMEOUT_MS", RLB__ENV_STR(RLB_REQUEST_TIMEOUT_MS),  \
      "bound on a client's register, publish and stats round trips when its "             \
      "request_timeout_ms is 0 (a dead bridge is noticed at once whatever the bound)")    \
    X(WORKER_SEND_TIMEOUT_MS, "RLB_WORKER_SEND_TIMEOUT_MS", "30000", "longest a worker "  \
      "waits for room in its ring to hand the bridge one message before it gives up on "  \
      "the bridge")                                                                       \
    X(LIB, "RLBRIDGE_LIB", "", "path of the librlb.so.1 the Python package loads (the "   \
      "only place it looks when set); empty = its checkout's build tree, next to the rlb " \
      "on PATH, Python's prefix, then the system's loader path")

typedef enum rlb_env_knob {
#define RLB__ENV_ENUM(id, name, def, help) RLB_KNOB_##id,
    RLB_ENV_KNOBS(RLB__ENV_ENUM)
#undef RLB__ENV_ENUM
    RLB_KNOB_COUNT_
} rlb_env_knob;

typedef struct rlb_env_entry {
    const char *name;  /* environment variable */
    const char *def;   /* default value, as a string */
    const char *help;  /* one line for `rlb doctor` and the README */
} rlb_env_entry;

/* The whole table, RLB_KNOB_COUNT_ entries. */
const rlb_env_entry *rlb__env_table(void);
/* The knob's value from the environment, or its default when unset or empty. */
const char *rlb__env_str(rlb_env_knob knob);
/* The knob parsed as a base-10 integer; the default (parsed) when unset, empty or not a
 * number (a malformed value is logged as a warning). */
long long rlb__env_int(rlb_env_knob knob);
/* rlb__env_int for a knob that must be > 0 and fit an int (timeouts, periods): the default
 * for any other value, with a warning. */
int rlb__env_positive(rlb_env_knob knob);

#endif /* RLB_COMMON_ENV_H */
