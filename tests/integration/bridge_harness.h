/* bridge_harness.h: processes for the bridge integration tests: an rlb-bridge and
 * rlb-workers forked from the test (running rlb__bridge_run / rlb__worker_run), trainer
 * ranks on the public client API (include/rlb/rlb.h) whose weights are a pure function of
 * (version, parameter, element), and the independent reference: the same weights written
 * as a safetensors checkpoint and run through `rlb generate`.
 */
#ifndef RLB_TESTS_BRIDGE_HARNESS_H
#define RLB_TESTS_BRIDGE_HARNESS_H

#include <stdint.h>
#include <sys/types.h>

#include "bridge/bridge.h"
#include "common/proto.h"
#include "model/config.h"
#include "rlb/rlb.h"

#define H_MAX_WORKERS 16

/* How a trainer's tensors are laid out over its ranks: FSDP2 shards, FSDP1 units, or (split)
 * whole tensors spread over the ranks, parameter p on rank p % world and an adapter's
 * factors on the rank of the weight they adapt, each rank declaring only the adapters whose
 * factors it registers. */
typedef enum h_layout { H_FSDP2 = 0, H_FSDP1 = 1, H_SPLIT = 2 } h_layout;

struct rlb_param_list;

/* Element i (row-major) of parameter p of list l in version v, as a trainer writes it. */
typedef float (*h_value_fn)(uint64_t v, const struct rlb_param_list *l, int64_t p, uint64_t i);

/* Device memory for trainer ranks whose tensors live on a GPU, as a GPU test implements it
 * (cudaMalloc, cudaMemcpy, cudaFree): the harness calls CUDA only through these hooks, so
 * CPU-only tests link it without CUDA. alloc and upload return 0 or -1; upload returns once
 * the bytes are on the device (a synchronous copy), so a plain rlb_publish may follow. */
typedef struct h_dev_ops {
    int (*alloc)(size_t bytes, void **ptr);                  /* device memory of GPU 0 */
    int (*upload)(void *dst, const void *src, size_t bytes); /* host to device */
    void (*free)(void *ptr);
} h_dev_ops;
/* NULL (the default): trainer ranks register their rlb_alloc_host memory. Set: every
 * trainer opened from then on keeps that memory for filling, registers a device copy of it
 * instead (each tensor at the same offset, RLB_DEVICE_CUDA, cuda_device 0), and uploads
 * what it writes there. h_child_start's children inherit it. A process must not fork the
 * bridge or workers after a hook ran in it (a CUDA context does not survive fork): open
 * such trainers in children only. */
extern const h_dev_ops *h_trainer_dev;

/* A trainer rank: a client, its shared memory and what it registered. */
typedef struct h_trainer {
    rlb_client *c;     /* connection */
    uint32_t rank;     /* FSDP rank = trainer rank */
    uint32_t world;    /* trainer ranks */
    h_layout layout;   /* how its shards are laid out */
    uint8_t *mem;      /* rlb_alloc_host memory holding every shard */
    size_t bytes;      /* bytes of mem in use */
    const struct rlb_param_list *list; /* the parameters it holds shards of */
    h_value_fn value;  /* their values */
    const h_dev_ops *dev; /* h_trainer_dev when it was opened: the device copy's hooks */
    uint8_t *dev_mem;  /* the registered device copy of mem (dev set), or NULL */
} h_trainer;

/* A trainer rank running in its own process, driven through pipes. */
typedef struct h_child {
    pid_t pid;
    int to, from; /* command pipe in, answer pipe out */
} h_child;

typedef struct h_run {
    char dir[128];      /* temporary directory: socket and checkpoints */
    char sock[192];     /* bridge socket path */
    pid_t bridge;       /* bridge process */
    pid_t workers[H_MAX_WORKERS];
    int n_workers;
    int shm_before;     /* our entries in /dev/shm at the start (shm_own.h) */
} h_run;

/* Starts a bridge (tiny model) in mode; waits for its socket. Returns 0 or -1. */
/* The seven LoRA targets of a layer (suffixes of HF weight names: "self_attn.q_proj", ...). */
#define H_LORA_TARGETS 7
extern const char *const h_lora_targets[H_LORA_TARGETS];

int h_start(h_run *r, rlb_sync_mode mode);
/* The same with version v's weights, written as a checkpoint, as the bridge's base
 * (rlb_bridge_opts.base_dir): weights no trainer registers come from there. */
int h_start_base(h_run *r, rlb_sync_mode mode, uint64_t v);
/* h_start for another model than the tiny one (the h_weight family and h_reference know
 * only the tiny one). */
int h_start_config(h_run *r, rlb_sync_mode mode, const rlb_model_config *cfg);
/* One node of a multi-node job (bridge/xnode.h): its place and the job's store. */
typedef struct h_node {
    int nnodes, node;              /* the job's nodes and this one */
    uint32_t first_rank, n_ranks;  /* the trainer ranks this node serves */
    int store_port;                /* the rendezvous store, on 127.0.0.1 */
    const char *run_id;            /* the job's run id in the store */
} h_node;
/* Starts the bridge of one node of such a job (each node its own h_run). */
int h_start_node(h_run *r, rlb_sync_mode mode, const h_node *node);
/* Waits up to s seconds until a listener accepts connections at path. Returns 0 or -1. */
int h_wait_listening(const char *path, double s);
/* The backend workers started from now on run (CPU unless a GPU test says otherwise;
 * float32 weights on either, so the CPU reference holds). */
extern rlb_device h_worker_device;
/* Starts workers: `replicas` replicas of TP size tp. Their buffers hold zeros until the
 * first sync, so the bridge refuses generation before it (RLB_ENOTREADY). Returns 0 or -1. */
int h_workers(h_run *r, uint32_t replicas, uint32_t tp);
/* The same with workers that load version v's weights as a checkpoint at start: they serve
 * before any sync, stamped version 0, and h_reference(v) is their reference. */
int h_workers_loaded(h_run *r, uint32_t replicas, uint32_t tp, uint64_t v);
/* Starts one worker: TP rank tp_rank of replica `replica`, in a fleet of `replicas`
 * replicas of TP size tp (a restart, or a replica added at run time). Returns its pid
 * (also appended to r->workers) or -1. */
pid_t h_worker(h_run *r, uint32_t replica, uint32_t replicas, uint32_t tp_rank, uint32_t tp);
/* A copy (malloc'ed, *bytes long) of weight buffer `buf` of the CPU worker `pid` (its
 * "rlb-weights-<buf>" mapping, read through /proc/PID/mem: a child of this process, or one
 * it may trace), or NULL with errno set when it cannot be read. */
float *h_worker_weights(pid_t pid, int buf, uint64_t *bytes);
/* kill -9 of r->workers[i], reaped, and its entry set to -1 (so neither h_stop nor
 * h_cleanup signals a pid that may belong to someone else by then). */
void h_kill_worker(h_run *r, int i);
/* Waits up to s seconds for r->workers[i] to exit by itself, then kills it; reaped and
 * set to -1 either way. Returns 0 when it exited by itself, -1 otherwise. */
int h_reap_worker(h_run *r, int i, double s);
/* Waits (bounded) until the bridge reports `workers` workers and `up` replicas up. */
int h_wait_workers(h_run *r, rlb_client *c, uint32_t workers, uint32_t up);
/* Shuts everything down (shutdown message, then SIGKILL after a bound) and checks that
 * /dev/shm holds what it held before and the socket file is gone. Returns 0 or -1. */
int h_stop(h_run *r, rlb_client *tool);

/* Kills whatever the harness started that still runs and removes the run's directory
 * (the teardown of every test: a failed assertion leaves the test half-way). */
void h_cleanup(void);
/* A bridge in mode, `replicas` replicas of TP size tp up, and one FSDP2 trainer rank of
 * world 1 registered with version 1's weights, nothing published. Returns 0 or -1. */
int h_start_unpublished(h_run *r, h_trainer *t, rlb_sync_mode mode, uint32_t replicas,
                        uint32_t tp);
/* h_start_unpublished with TP-1 workers, then version 1 committed (the start of most
 * single-trainer tests). Returns 0 or -1. */
int h_start_simple(h_run *r, h_trainer *t, rlb_sync_mode mode, uint32_t replicas);
/* h_cleanup as a cmocka teardown. */
int h_teardown(void **state);

/* Connects trainer rank/world (or a tool when world == 0). */
int h_connect(h_run *r, uint32_t rank, uint32_t world, rlb_client **out);
/* How h_trainer_open allocates a trainer's shard memory: rlb_alloc_host unless a test
 * swaps in a hostile allocator. */
extern int (*h_alloc)(rlb_client *c, size_t bytes, void **ptr);
/* Allocates (h_alloc; and a device copy where h_trainer_dev is set) and registers rank t's
 * shards. Returns 0, the client's error, or RLB_ENOMEM / RLB_ECUDA (the device copy could
 * not be allocated / written). */
int h_trainer_open(h_run *r, h_trainer *t, uint32_t rank, uint32_t world, h_layout layout);
/* h_trainer_open for the parameters of `list` (the tiny model's, plus the LoRA adapters
 * added to it with rlb__params_add_adapter), valued by `value`; `list` outlives t. The rank
 * declares the list's adapters (rlb_register_lora, alpha = scale * rank) before it registers
 * their factors like any tensor: FSDP2 shards, or entries of their layer's FSDP1 unit. */
int h_trainer_open_list(h_run *r, h_trainer *t, uint32_t rank, uint32_t world, h_layout layout,
                        const struct rlb_param_list *list, h_value_fn value);
/* Bytes of parameter p of t's list that FSDP rank f of t's world holds (FSDP2 rows; FSDP1
 * the part of the parameter inside f's chunk of its unit), without alignment padding. */
uint64_t h_shard_bytes(const h_trainer *t, int64_t p, uint32_t f);
/* Writes version v's weights into t's shards (and uploads them to its device copy).
 * Returns 0, or -1 when the upload failed (printed). */
int h_trainer_fill(h_trainer *t, uint64_t v);
/* Closes t's client; a device copy is freed after its tensors were unregistered. */
void h_trainer_close(h_trainer *t);
/* Overwrites element `elem` (row-major index into the global tensor) of parameter `name`
 * in t's shards (and its device copy) with `value`, when t's FSDP2 shard holds it. Returns
 * 0, or -1 when it does not (another rank holds it, or t is FSDP1) or the upload failed. */
int h_trainer_poison(h_trainer *t, const char *name, uint64_t elem, float value);
/* The poison tests' three values, in rows every FSDP2 rank 0 holds: NaN and -Inf in
 * lm_head.weight (elements 5 and 6), +Inf in model.norm.weight (element 3). */
int h_trainer_poison3(h_trainer *t);
/* 0 when an abort's text (printed) names what h_trainer_poison3 put in, else -1. */
int h_poison3_named(const char *why);

/* Element `elem` (row-major) of parameter `name` in version v, as the trainers write it;
 * NAN for a name the tiny model does not have. */
float h_weight_named(uint64_t v, const char *name, uint64_t elem);

/* Forks trainer rank/world in its own process (connect, register, then publish on
 * command; on a device copy where h_trainer_dev is set). Returns 0 or -1. */
int h_child_start(h_run *r, h_child *ch, uint32_t rank, uint32_t world, h_layout layout);
/* The same with the parameters of `list`, valued by `value`, as h_trainer_open_list (the
 * list outlives the child). */
int h_child_start_list(h_run *r, h_child *ch, uint32_t rank, uint32_t world, h_layout layout,
                       const struct rlb_param_list *list, h_value_fn value);
/* Tells the child to fill and publish v (returns at once). */
int h_child_publish(h_child *ch, uint64_t v);
/* The child's publish result (waits up to 20 s): rlb_publish's, or RLB_ECUDA when the
 * upload to its device copy failed. */
int h_child_result(h_child *ch, int *rc);
void h_child_stop(h_child *ch);

/* Greedy generation of `prompt` (n ids) for max_tokens with the weights of version v,
 * through `rlb generate --tp tp` on a checkpoint the harness writes itself. Fills
 * tokens[] and returns the count, or -1. */
int h_reference(h_run *r, uint64_t v, uint32_t tp, const int32_t *prompt, uint32_t n,
                uint32_t max_tokens, int32_t *tokens, int cap);

/* A greedy request of one prompt, its parts in one place (fill it where it stays: req
 * points into it). */
typedef struct h_request {
    rlb_sampling_params sp;
    rlb_prompt prompt;
    rlb_generate_request req;
} h_request;
/* Fills q: `prompt` (n ids), temperature 0, max_tokens, min_weight_version 0. */
void h_request_greedy(h_request *q, const int32_t *prompt, uint32_t n, uint32_t max_tokens);
/* Checks that res holds one sample of weight version v whose tokens are h_reference's for
 * version v (TP size tp) on the same prompt. Returns 0, or -1 after printing what differs. */
int h_check_result(h_run *r, const rlb_result *res, uint64_t v, uint32_t tp,
                   const int32_t *prompt, uint32_t n, uint32_t max_tokens);

/* Submits a greedy generate of `prompt` (n ids, max_tokens) through c, to be served with
 * weights of at least min_version. Returns the client's code (*ticket set on 0). */
int h_submit(rlb_client *c, const int32_t *prompt, uint32_t n, uint32_t max_tokens,
             uint64_t min_version, rlb_ticket *ticket);
/* h_submit (any version), then waits up to 20 s. Returns the client's code; *out (on 0) is
 * the result to free. */
int h_generate(rlb_client *c, const int32_t *prompt, uint32_t n, uint32_t max_tokens,
               rlb_result **out);
/* Greedy generation of `prompt` through client c; the sample must carry weight version v
 * (else -1). Fills tokens[] and returns the count, or -1 (what went wrong printed). */
int h_greedy(rlb_client *c, uint64_t v, const int32_t *prompt, uint32_t n,
             uint32_t max_tokens, int32_t *tokens, int cap);
/* h_greedy, then checks the one sample against h_reference for version v (TP size tp)
 * and its version stamp. Returns 0, or -1 after printing what differs. */
int h_check_greedy(h_run *r, rlb_client *c, uint64_t v, uint32_t tp, const int32_t *prompt,
                   uint32_t n, uint32_t max_tokens);

/* h_reference through a checkpoint DIR/<tag> of the weights data[p] (every parameter of
 * the tiny model, in h_params() order, row-major F32), written once per tag. */
int h_reference_weights(h_run *r, const char *tag, float *const *data, uint32_t tp,
                        const int32_t *prompt, uint32_t n, uint32_t max_tokens,
                        int32_t *tokens, int cap);
/* The tiny model's parameter list, and element i of parameter p in version v's weights. */
const struct rlb_param_list *h_params(void);
float h_weight(uint64_t v, int64_t p, uint64_t i);

/* The weight buffer of TP rank t of T holding version v, laid out by the naive reference
 * of tests/unit/plan_ref.h (DESIGN §4, not the planner's; zeros in padding and alignment
 * gaps): malloc'ed, *bytes long, or NULL. */
float *h_buffer_image(uint32_t t, uint32_t T, uint64_t v, uint64_t *bytes);
/* Compares weight buffer `buf` of worker pid (TP rank t of T) with h_buffer_image of
 * version v. Returns 0, 1 (a mismatch: the first one printed) or 77 (the buffer cannot be
 * read: no such mapping, or /proc/PID/mem refused). */
int h_check_buffer(pid_t pid, int buf, uint32_t t, uint32_t T, uint64_t v);

/* Connects as a tool on the raw protocol (messages the client library never sends), says
 * hello, sends m and reads one reply. Returns the reply's message type (and, for an ERROR,
 * its code in *code), or -1 when no reply came. */
int h_raw_tool(h_run *r, const rlb_msg *m, int *code);

/* One bridge counter by name through the client (-1 when absent). */
double h_stat(rlb_client *c, const char *name);
/* Waits up to s seconds for counter `name` to equal `want`. Returns 0, or -1 after
 * printing the value it had. */
int h_wait_stat(rlb_client *c, const char *name, double want, double s);

/* Element i of LoRA factor `name` in version v: small, so the merged model stays
 * well-conditioned, and different in every version. */
float h_factor_value(uint64_t v, const char *name, uint64_t i);
/* What a LoRA trainer rank writes (an h_value_fn for a list of the tiny model's parameters
 * with adapters): the frozen base, version 1's weights (the tiny model's parameters come
 * first in such a list, at their own indices), and the factors of version v. */
float h_lora_value(uint64_t v, const struct rlb_param_list *l, int64_t p, uint64_t i);

#endif /* RLB_TESTS_BRIDGE_HARNESS_H */
