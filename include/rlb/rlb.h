/* rlb.h: the public C API of rlbridge, the only installed header.
 *
 * Every function returns 0 (or a non-negative count where its comment says so) on success
 * and a negative RLB_E* code on failure; rlb_strerror() names the code. Nothing here exits
 * or prints unless logging is switched on with RLB_LOG.
 */
#ifndef RLB_RLB_H
#define RLB_RLB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define RLB_API __attribute__((visibility("default")))
#else
#define RLB_API
#endif

/* The version of the binary interface: this header's structs and functions, and the
 * protocol librlb speaks with the bridge. It is the soname of the library (librlb.so.1) and
 * is checked at every connection: a bridge refuses a client of another ABI, and the Python
 * package refuses a librlb of another ABI (rlb_abi_version). Only the build of a library of
 * another ABI for tests (tests/integration/install.cmake) defines it on the command line. */
#ifndef RLB_ABI_VERSION
#define RLB_ABI_VERSION 1u
#endif

/* Error codes: negative values, errno-style. A code never changes meaning; new ones are
 * appended. Keep rlb_strerror() in step. */
enum {
    RLB_OK = 0,
    RLB_EINVAL = -1,     /* invalid argument or malformed input */
    RLB_ENOMEM = -2,     /* out of memory (heap, shared memory or device memory) */
    RLB_EIO = -3,        /* system call failed; the log says which */
    RLB_ETIMEDOUT = -4,  /* a bounded wait ran out */
    RLB_EPEERDEAD = -5,  /* the peer process died or closed its side */
    RLB_EAGAIN = -6,     /* nothing to do now; try again (ring empty or full) */
    RLB_EPROTO = -7,     /* a message failed validation */
    RLB_EVERSION = -8,   /* ABI or format version mismatch */
    RLB_EPERM = -9,      /* peer refused (other uid, bad permissions) */
    RLB_ENOTFOUND = -10, /* a named thing (tensor, file, field) is missing */
    RLB_EEXIST = -11,    /* a thing that must be unique is already there */
    RLB_ETOOBIG = -12,   /* larger than a limit allows */
    RLB_ESHAPE = -13,    /* tensor shape or layout does not match the model */
    RLB_EDTYPE = -14,    /* unknown or unsupported dtype */
    RLB_EUNSUPPORTED = -15, /* valid but not supported (architecture, TP size, backend) */
    RLB_ESTALE = -16,    /* weights are stale after an aborted sync; generation refused */
    RLB_EABORTED = -17,  /* the operation (a sync) was aborted */
    RLB_ECUDA = -18,     /* a CUDA, cuBLAS or NCCL call failed; the log says which */
    RLB_ESHUTDOWN = -19, /* the bridge is shutting down */
    RLB_ECORRUPT = -20,  /* shared memory holds values no honest peer writes */
    RLB_ENONFINITE = -21, /* NaN or infinite values where finite ones are needed (weights,
                           * logits with no finite value left to sample from) */
    RLB_ENOREPLICA = -22, /* no live worker replica is left to run the request or sync (the
                           * bridge itself is alive; RLB_EPEERDEAD says it is not) */
    RLB_ENOTREADY = -23, /* no weights yet: the workers started without a checkpoint and no
                          * version has committed; publish one first */
    RLB_E_COUNT_ = 24
};

/* Returns a static, human-readable name for an RLB_E* code (any int is accepted). */
RLB_API const char *rlb_strerror(int code);

/* The RLB_ABI_VERSION this library was built with; a program that loads librlb at run time
 * (dlopen, ctypes) compares it with the version it was written for. */
RLB_API uint32_t rlb_abi_version(void);
/* The release of rlbridge this library comes from, e.g. "0.1.0" (static string). */
RLB_API const char *rlb_version(void);

/* Element types of tensors. The numbering is part of the wire protocol: append only. */
typedef enum rlb_dtype {
    RLB_DTYPE_F32 = 0,
    RLB_DTYPE_BF16 = 1,
    RLB_DTYPE_F16 = 2,
    RLB_DTYPE_F8E4M3 = 3,
    RLB_DTYPE_I8 = 4,
    RLB_DTYPE_I32 = 5,
    RLB_DTYPE_I64 = 6,
    RLB_DTYPE_U8 = 7,
    RLB_DTYPE_COUNT_
} rlb_dtype;

/* Size in bytes of one element, or 0 for a value outside the enum. */
RLB_API size_t rlb_dtype_size(rlb_dtype dtype);
/* Name as safetensors spells it ("F32", "BF16", "F8_E4M3", ...), or "?" outside the enum. */
RLB_API const char *rlb_dtype_name(rlb_dtype dtype);

/* Compute backend of a run. AUTO picks CUDA when a GPU is visible. */
typedef enum rlb_device {
    RLB_DEVICE_AUTO = 0,
    RLB_DEVICE_CPU = 1,
    RLB_DEVICE_CUDA = 2
} rlb_device;

/* ======================================================================================
 * The client API (librlb): a trainer rank, or a tool, talking to the node's rlb-bridge.
 *
 * A trainer rank connects, allocates its parameter storage with rlb_alloc_host (shared
 * memory the bridge maps too, so a sync reads the trainer's bytes in place: zero copy),
 * registers its tensors once, and then, every step, calls rlb_publish(version) after its
 * optimizer step and rlb_generate(...) for rollouts. While a publish is in flight the
 * registered memory must not change; rlb_publish returns once the bridge answered.
 *
 * Thread safety: a client is internally locked. Every function taking an rlb_client may be
 * called from any number of threads at once (for example one thread blocked in
 * rlb_generate_wait while another publishes); calls are serialized where they touch the
 * connection. Each client runs one receiver thread of its own that takes in the bridge's
 * messages as they arrive, so asynchronous results are collected while the caller does
 * other work. rlb_close must be the last call on a client and must not race with other
 * calls on it. A result object (rlb_result, rlb_stat_list) belongs to whoever received it
 * and is not locked.
 *
 * Structs passed in carry a struct_size field: set it with the matching *_init function
 * (or the RLB_*_INIT initializer), so a program compiled against this header keeps
 * working with a later library that appended fields. A struct_size smaller than the first
 * version of a struct, or larger than this library knows, is refused with RLB_EVERSION.
 *
 * Every function returns 0 (or a count where its comment says so) or a negative RLB_E*
 * code; rlb_last_error() then holds a sentence on what went wrong. Nothing here exits or
 * prints.
 * ====================================================================================== */

#define RLB_MAX_DIMS 8                 /* dimensions of a tensor shape */
#define RLB_SOCKET_DEFAULT "bridge"    /* the bridge's socket name in the socket directory */
/* The defaults of the knobs (environment variables) of the same names, which set the bounds
 * of a client whose options leave them 0. */
#define RLB_CONNECT_TIMEOUT_MS 5000    /* default bound on connecting and the hello */
#define RLB_REQUEST_TIMEOUT_MS 600000  /* default bound on a publish or stats round trip */

typedef struct rlb_client rlb_client;

typedef struct rlb_client_options {
    size_t struct_size;     /* sizeof(rlb_client_options) as the caller compiled it */
    const char *socket;     /* bridge socket: a path (contains '/') or a name in the socket
                               directory (RLB_SOCKET_DIR); NULL = RLB_SOCKET_DEFAULT */
    int connect_timeout_ms; /* bound on connect + hello/welcome; 0 = the knob
                               RLB_CONNECT_TIMEOUT_MS */
    int request_timeout_ms; /* bound on publish, register and stats waits; 0 = the knob
                               RLB_REQUEST_TIMEOUT_MS (a dead bridge is noticed at once
                               whatever the bound: the socket reports it) */
    uint32_t rank;          /* this trainer's rank, < world */
    uint32_t world;         /* trainer ranks that publish together; 0 is taken as 1 */
    int observer;           /* 1: connect as a tool (generate and stats only, never counted
                               as a trainer rank, cannot register or publish); 0: trainer */
} rlb_client_options;

#define RLB_CLIENT_OPTIONS_INIT {sizeof(rlb_client_options), NULL, 0, 0, 0, 1, 0}
/* Fills *opts with the defaults above (struct_size set). */
RLB_API void rlb_client_options_init(rlb_client_options *opts);

/* Connects to the bridge and says hello. Returns 0 with *out set, or RLB_EINVAL (bad
 * options), RLB_EVERSION (struct_size, or the bridge speaks another ABI), RLB_ENOTFOUND (no
 * bridge listens there), RLB_EPERM, RLB_ETIMEDOUT, RLB_EPEERDEAD, RLB_EPROTO, RLB_ENOMEM or
 * RLB_EIO; rlb_last_error(NULL) then says why, in the calling thread. */
RLB_API int rlb_connect(const rlb_client_options *opts, rlb_client **out);

/* Closes the connection, unmaps every rlb_alloc_host allocation (pointers into them become
 * invalid), drops pending tickets and frees the client. The bridge forgets this client's
 * registrations. NULL is a no-op. */
RLB_API void rlb_close(rlb_client *client);

/* The text of the last failure on `client` (from any thread using it), or, for client
 * NULL, of the calling thread's last call that takes no client (rlb_connect,
 * rlb_tensor_bytes, rlb_peft_to_hf). The text is copied into a buffer of the calling
 * thread, valid until its next rlb_last_error call. "" when nothing failed. */
RLB_API const char *rlb_last_error(rlb_client *client);

/* ---- Host memory ----------------------------------------------------------------------- */

/* Allocates `bytes` (> 0) of zeroed shared memory, page aligned, that the bridge can read in
 * place: use it as the storage of the parameters you register. Returns 0 with *ptr set,
 * RLB_EINVAL, RLB_ENOMEM (not enough shared memory: /dev/shm too small, see `rlb doctor`),
 * RLB_EPEERDEAD or RLB_EIO. */
RLB_API int rlb_alloc_host(rlb_client *client, size_t bytes, void **ptr);

/* Frees memory from rlb_alloc_host (ptr must be what it returned; NULL is a no-op returning
 * 0). Returns 0, RLB_EINVAL (not an allocation of this client) or RLB_EEXIST (tensors are
 * still registered in it: unregister them first). */
RLB_API int rlb_free_host(rlb_client *client, void *ptr);

/* ---- Registering tensors --------------------------------------------------------------- */

/* How this rank's bytes relate to the global tensor (DESIGN §4). */
typedef enum rlb_tensor_layout {
    RLB_TENSOR_FULL = 0,  /* the whole tensor */
    RLB_TENSOR_FSDP1 = 1, /* this rank's 1/world chunk of an FSDP1 FlatParameter */
    RLB_TENSOR_FSDP2 = 2  /* this rank's rows of a DTensor Shard(0): rows
                             [rank*c, rank*c + n), c = ceil(d0/world), contiguous */
} rlb_tensor_layout;

/* One entry of an FSDP1 FlatParameter, in flat order (PyTorch's _fqns, _shapes,
 * _numels_with_padding and _is_padding_mask, merged). */
typedef struct rlb_fsdp1_entry {
    const char *name;              /* parameter name; NULL for padding */
    uint32_t ndim;                 /* dimensions of shape; 0 for padding */
    uint64_t shape[RLB_MAX_DIMS];  /* the parameter's shape */
    uint64_t numel;                /* elements it occupies in the flat buffer (> 0) */
    int padding;                   /* 1: alignment padding, not a parameter */
} rlb_fsdp1_entry;

typedef struct rlb_tensor_desc {
    size_t struct_size;           /* sizeof(rlb_tensor_desc) as the caller compiled it */
    const char *name;             /* HF parameter name; for FSDP1 the FlatParameter's name */
    rlb_dtype dtype;              /* element type in memory (F32, BF16 or F16) */
    uint32_t ndim;                /* dimensions of shape, 1..RLB_MAX_DIMS */
    uint64_t shape[RLB_MAX_DIMS]; /* GLOBAL shape; FSDP1: [padded total elements] */
    rlb_tensor_layout layout;     /* how `data` relates to the global tensor */
    uint32_t shard_rank;          /* FSDP1 / FSDP2: this rank's index in the FSDP group */
    uint32_t shard_world;         /* FSDP1 / FSDP2: FSDP group size (>= 1) */
    uint32_t unit;                /* FSDP1: the FlatParameter's index (unit id) */
    uint32_t align;               /* FSDP1: parameter starts are multiples of this many
                                     elements (use_orig_params); 0 or 1 = none */
    uint32_t n_entries;           /* FSDP1: entries of the FlatParameter */
    const rlb_fsdp1_entry *entries; /* FSDP1: [n_entries], in flat order; the padding that
                                     rounds the total up to a multiple of shard_world may
                                     be left out (the library adds it) */
    const void *data;             /* this rank's bytes (FULL numel, FSDP2 n*d1*.. , FSDP1
                                     total/world elements, contiguous): with device CPU,
                                     inside memory from rlb_alloc_host; with device CUDA,
                                     a CUDA device pointer of GPU cuda_device */
    /* ---- appended later: a smaller struct_size leaves them at their defaults ---- */
    rlb_device device;            /* where data lives: RLB_DEVICE_CPU (default; AUTO is
                                     taken as CPU) or RLB_DEVICE_CUDA */
    int cuda_device;              /* CUDA: the GPU's ordinal in this process (as
                                     cudaSetDevice counts, under this process's
                                     CUDA_VISIBLE_DEVICES) */
} rlb_tensor_desc;

#define RLB_TENSOR_DESC_INIT {sizeof(rlb_tensor_desc), NULL, RLB_DTYPE_F32, 0, {0}, \
                              RLB_TENSOR_FULL, 0, 1, 0, 0, 0, NULL, NULL, RLB_DEVICE_CPU, 0}
RLB_API void rlb_tensor_desc_init(rlb_tensor_desc *desc);

/* Bytes this rank holds for `desc` (what `data` must provide), into *bytes. Returns 0,
 * RLB_EVERSION or RLB_EINVAL / RLB_EDTYPE / RLB_ESHAPE; rlb_last_error(NULL) then names the
 * tensor and the field ("tensor 'x': ndim 9 is outside 1..8"). Needs no client. */
RLB_API int rlb_tensor_bytes(const rlb_tensor_desc *desc, uint64_t *bytes);

/* Registers n (>= 1) tensors as one batch: array elements are tensors[0].struct_size bytes
 * apart, all with that struct_size. Each host tensor's bytes must lie inside one
 * rlb_alloc_host allocation (the library finds which, and the offset); an FSDP2 rank that
 * holds no rows may pass data NULL. Names are unique per client.
 *
 * Device tensors (device RLB_DEVICE_CUDA) are exported without copying: memory from
 * cudaMalloc (a PyTorch caching-allocator block) as the CUDA IPC handle of its allocation
 * plus an offset, memory from the VMM API (cuMemCreate; PyTorch's expandable_segments) as
 * POSIX fds of its physical allocations passed over the socket. Each allocation is
 * exported once while tensors are registered in it. The library loads the NVIDIA driver
 * (libcuda.so.1) at the first device tensor; without it the call fails with
 * RLB_EUNSUPPORTED. Where the bridge may not open CUDA IPC handles (a container without
 * the ptrace capability: it refuses the register with RLB_EPERM) or RLB_CUDA_IPC=off, the
 * library registers a pinned shared-memory shadow of each device tensor instead and copies
 * the tensors into it at every publish, on the publish's stream (one log line says so).
 * A client's device tensors are all on one GPU. A pointer that is not device memory of
 * GPU cuda_device is refused with RLB_EINVAL naming the tensor. The bridge answers a connection's
 * messages in order, so the library follows the register message with a stats request
 * and takes that request's reply as the acceptance (a refusal comes first, as an error). 
 * Returns 0 once the bridge accepted the batch, or RLB_EINVAL / RLB_EDTYPE / RLB_ESHAPE
 * (checked here, nothing sent), RLB_EEXIST (name already registered), an error the bridge
 * answered (RLB_ESHAPE, RLB_ENOTFOUND, ...: rlb_last_error has its text), RLB_ETIMEDOUT,
 * RLB_EPEERDEAD. Observers get RLB_EPERM. */
RLB_API int rlb_register(rlb_client *client, const rlb_tensor_desc *tensors, size_t n);

/* Forgets the named tensors (n == 0: every tensor of this client). Returns once the bridge
 * acknowledged that it dropped them and closed its mappings of their memory, so the memory
 * may be freed (rlb_free_host, cudaFree, ...) right after. Returns 0, RLB_ENOTFOUND (a name
 * is not registered: nothing is unregistered), or a bridge / connection error. */
RLB_API int rlb_unregister(rlb_client *client, const char *const *names, size_t n);

/* ---- LoRA adapters (DESIGN §10) ----------------------------------------------------------
 *
 * A trainer that fine-tunes LoRA adapters registers its frozen base weights as usual (once;
 * they must not change) and, per adapted weight W [out, in], the two factors as ordinary
 * tensors (full, FSDP2, or entries of an FSDP1 FlatParameter) named after W's module:
 *   "<module>.lora_A.weight" [rank, in]      "<module>.lora_B.weight" [out, rank]
 * (for model.embed_tokens, PEFT's transpose: A [rank, vocab], B [hidden, rank]). Every
 * sync then writes W + scale * B * A into the workers' tensor-parallel buffers, always from
 * the registered base, so nothing drifts; only the adapters change between versions. */

typedef struct rlb_lora_desc {
    size_t struct_size; /* sizeof(rlb_lora_desc) as the caller compiled it */
    const char *target; /* the adapted weight, its HF or PEFT name:
                           "model.layers.0.self_attn.q_proj.weight" */
    uint32_t rank;      /* r >= 1 */
    float alpha;        /* lora_alpha */
    int rslora;         /* 1: scale = alpha / sqrt(r) (use_rslora); 0: alpha / r */
} rlb_lora_desc;

#define RLB_LORA_DESC_INIT {sizeof(rlb_lora_desc), NULL, 0, 0.0f, 0}
RLB_API void rlb_lora_desc_init(rlb_lora_desc *desc);

/* Declares n (>= 1) adapters, array elements adapters[0].struct_size bytes apart. Declare
 * an adapter before registering its factors (a factor of a weight no rank declared is
 * refused): each rank declares the adapters whose factors it registers, and ranks declaring
 * the same weight must agree on rank and scale. An adapter lasts while some rank declares it.
 * Returns 0 once the bridge accepted them, RLB_EINVAL / RLB_EVERSION (checked here), or the
 * bridge's refusal: RLB_ENOTFOUND (no such weight), RLB_EINVAL (not q, k, v, o, gate, up,
 * down, embed or lm_head, or rank outside [1, min(out, in)]), RLB_EEXIST (declared
 * otherwise by another rank); RLB_EPERM for observers. */
RLB_API int rlb_register_lora(rlb_client *client, const rlb_lora_desc *adapters, size_t n);

/* Takes back this client's declarations for the named weights (n == 0: all of them). The
 * factors may stay registered (they are then ignored), and the next version serves the
 * base, bit for bit what a sync without adapters writes. Returns 0 or a bridge /
 * connection error. */
RLB_API int rlb_unregister_lora(rlb_client *client, const char *const *targets, size_t n);

/* Maps a PEFT parameter name to the HF name rlbridge uses, into out[cap]:
 *   base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight
 *       -> model.layers.3.self_attn.q_proj.lora_A.weight
 *   base_model.model.model.embed_tokens.lora_embedding_B.default
 *       -> model.embed_tokens.lora_B.weight
 *   base_model.model.model.layers.3.mlp.up_proj.base_layer.weight
 *       -> model.layers.3.mlp.up_proj.weight
 * dropping the segments FSDP, activation checkpointing and torch.compile insert
 * (_fsdp_wrapped_module, _checkpoint_wrapped_module, _orig_mod); a name without PEFT parts
 * comes back unchanged. `adapter` is the PEFT adapter wanted (NULL: any). Returns 0,
 * RLB_ENOTFOUND (a factor of another adapter), RLB_EUNSUPPORTED (DoRA's
 * lora_magnitude_vector), RLB_EINVAL (empty or malformed), RLB_ETOOBIG (out too small);
 * rlb_last_error(NULL) then says why. Needs no client. */
RLB_API int rlb_peft_to_hf(const char *peft_name, const char *adapter, char *out, size_t cap);

/* ---- Publishing weights ---------------------------------------------------------------- */

typedef struct rlb_sync_stats {
    size_t struct_size; /* sizeof(rlb_sync_stats) as the caller compiled it */
    uint64_t version;   /* the committed version */
    uint64_t bytes;     /* bytes written into the workers' weight buffers */
    double ms;          /* from the last rank's publish to the commit */
    double gbps;        /* bytes / ms, in GB/s */
} rlb_sync_stats;

/* Says this rank's registered tensors hold weight version `version` (>= 1, larger than the
 * last committed one) and blocks until the bridge committed it (returns 0 and, when stats
 * is non-NULL with struct_size set, fills it) or gave it up (returns RLB_EABORTED, or the
 * code of the bridge's refusal, with the reason in rlb_last_error). Other errors:
 * RLB_EINVAL, RLB_EPERM (observer), RLB_ETIMEDOUT (request_timeout_ms ran out; the version
 * may still commit later), RLB_EPEERDEAD. */
RLB_API int rlb_publish(rlb_client *client, uint64_t version, rlb_sync_stats *stats);

/* rlb_publish for a trainer whose registered tensors are device memory written by work on
 * `cuda_stream` (a cudaStream_t / CUstream of the tensors' GPU; NULL = the legacy default
 * stream). The library records an interprocess event on that stream (created once per
 * client) and sends it with the publish; the bridge's reads wait on it on the GPU, so the
 * trainer's host thread never synchronizes the device. Staged tensors (see rlb_register)
 * are copied to their shadows on that stream, which is then synchronized before the
 * publish is sent. For host tensors it is rlb_publish. Errors as rlb_publish, and RLB_ECUDA
 * when a CUDA call fails (rlb_last_error names it). */
RLB_API int rlb_publish_stream(rlb_client *client, uint64_t version, void *cuda_stream,
                               rlb_sync_stats *stats);

/* The newest weight version the bridge reported committed (0 = none yet). */
RLB_API uint64_t rlb_weight_version(rlb_client *client);

/* ---- Sleep / wake ---------------------------------------------------------------------- */

/* Tells every worker to free its KV cache (weights stay), e.g. while a colocated trainer
 * needs the memory; generation requests made meanwhile are held by the bridge and run
 * after rlb_wake. Returns 0 once the bridge took the command, or a connection error. */
RLB_API int rlb_sleep(rlb_client *client);
/* Tells every worker to restore its KV cache. Returns 0 or a connection error. */
RLB_API int rlb_wake(rlb_client *client);

/* ---- Generation ------------------------------------------------------------------------ */

/* Sampling parameters, named as vLLM's SamplingParams. */
typedef struct rlb_sampling_params {
    size_t struct_size;            /* sizeof(rlb_sampling_params) as the caller compiled it */
    uint32_t n;                    /* samples per prompt, >= 1 (default 1) */
    float temperature;             /* >= 0; 0 = greedy (default 1.0) */
    float top_p;                   /* nucleus mass in (0, 1] (default 1.0) */
    int32_t top_k;                 /* keep the k likeliest tokens; -1 or 0 = all (default -1) */
    int64_t seed;                  /* >= 0: noise key (reproducible); -1 = a fresh random seed
                                      per request (default -1) */
    uint32_t max_tokens;           /* tokens to generate per sample, >= 1 (default 16) */
    const int32_t *stop_token_ids; /* tokens that end a sample (kept in the output) */
    uint32_t n_stop_token_ids;     /* entries of stop_token_ids */
    int32_t logprobs;              /* -1 = none (default); 0 = the sampled token's logprob
                                      (log_softmax(logits / temperature)); > 0 (top
                                      alternatives) is refused with RLB_EUNSUPPORTED */
} rlb_sampling_params;

#define RLB_SAMPLING_PARAMS_INIT {sizeof(rlb_sampling_params), 1, 1.0f, 1.0f, -1, -1, 16, \
                                  NULL, 0, -1}
RLB_API void rlb_sampling_params_init(rlb_sampling_params *params);

typedef struct rlb_prompt {
    const int32_t *tokens; /* prompt token ids (no tokenizer here) */
    uint32_t n_tokens;     /* >= 1 */
} rlb_prompt;

typedef struct rlb_generate_request {
    size_t struct_size;                  /* sizeof(rlb_generate_request) as compiled */
    const rlb_prompt *prompts;           /* [n_prompts] */
    uint32_t n_prompts;                  /* >= 1 */
    const rlb_sampling_params *sampling; /* NULL = the defaults above */
    uint64_t min_weight_version;         /* serve only with weights at least this new (held
                                            until such a version commits; 1 waits for the
                                            first one rather than fail RLB_ENOTREADY) */
} rlb_generate_request;

#define RLB_GENERATE_REQUEST_INIT {sizeof(rlb_generate_request), NULL, 0, NULL, 0}
RLB_API void rlb_generate_request_init(rlb_generate_request *req);

typedef enum rlb_finish_reason {
    RLB_REASON_STOP = 0,   /* sampled a stop token (it is the last token) */
    RLB_REASON_LENGTH = 1, /* reached max_tokens */
    RLB_REASON_ABORT = 2   /* cancelled by the bridge (shutdown, failed sync, error) */
} rlb_finish_reason;

/* "stop", "length", "abort", or "?" outside the enum (vLLM's finish_reason strings). */
RLB_API const char *rlb_finish_reason_name(rlb_finish_reason reason);

/* One completion. Arrays are owned by the rlb_result it came from. */
typedef struct rlb_sample {
    uint32_t prompt;          /* index of its prompt in the request */
    uint32_t index;           /* which of the prompt's n samples */
    const int32_t *tokens;    /* generated token ids (prompt not included) */
    uint32_t n_tokens;        /* entries of tokens */
    const float *logprobs;    /* [n_tokens] logprob of each sampled token, or NULL when not
                                 requested */
    rlb_finish_reason finish; /* why it ended */
    uint64_t weight_version;  /* the weights every one of its tokens was sampled with */
} rlb_sample;

typedef struct rlb_result rlb_result;

/* Samples in a result: n_prompts * n, ordered prompt-major (sample i is prompt i / n,
 * index i % n). */
RLB_API size_t rlb_result_num_samples(const rlb_result *result);
/* Sample i, or NULL when i is out of range. Valid until rlb_result_free. */
RLB_API const rlb_sample *rlb_result_sample(const rlb_result *result, size_t i);
/* Frees a result and every array in it. NULL is a no-op. */
RLB_API void rlb_result_free(rlb_result *result);

/* A submitted request; 0 is never a valid ticket. */
typedef uint64_t rlb_ticket;

/* Sends a request without waiting. Returns 0 with *ticket set, or RLB_EINVAL /
 * RLB_EUNSUPPORTED / RLB_EVERSION (checked here, nothing sent), RLB_ETIMEDOUT (no room in
 * the ring in time), RLB_EPEERDEAD. */
RLB_API int rlb_generate_submit(rlb_client *client, const rlb_generate_request *req,
                                rlb_ticket *ticket);
/* Takes whatever arrived without blocking. Returns 0 with *out set once the request is
 * complete (the ticket is then spent), RLB_EAGAIN while it is not, RLB_ENOTFOUND for an
 * unknown or spent ticket, or the request's failure (RLB_ESTALE, RLB_ESHUTDOWN,
 * RLB_ENOREPLICA, RLB_ENOTREADY, RLB_EPEERDEAD, ...: the ticket is spent, rlb_last_error
 * has the bridge's text). A request
 * the bridge refused for now ("try again") fails with RLB_EABORTED, so that RLB_EAGAIN
 * always means "still running". */
RLB_API int rlb_generate_poll(rlb_client *client, rlb_ticket ticket, rlb_result **out);
/* Like poll but blocks up to timeout_ms (< 0: no bound beyond the bridge's liveness) for
 * completion. RLB_ETIMEDOUT leaves the ticket pending. */
RLB_API int rlb_generate_wait(rlb_client *client, rlb_ticket ticket, int timeout_ms,
                              rlb_result **out);
/* submit + wait. */
RLB_API int rlb_generate(rlb_client *client, const rlb_generate_request *req, int timeout_ms,
                         rlb_result **out);

/* ---- Statistics ------------------------------------------------------------------------ */

/* What this client did, counted locally (no round trip). */
typedef struct rlb_client_stats {
    size_t struct_size;        /* sizeof(rlb_client_stats) as the caller compiled it */
    uint64_t weight_version;   /* newest committed version seen */
    uint64_t publishes;        /* rlb_publish calls that reached the bridge */
    uint64_t synced;           /* ... of which committed */
    uint64_t aborted;          /* ... of which aborted */
    uint64_t bytes_synced;     /* sum of rlb_sync_stats.bytes */
    double sync_ms;            /* sum of rlb_sync_stats.ms */
    uint64_t requests;         /* generate requests completed */
    uint64_t samples;          /* samples received */
    uint64_t tokens;           /* tokens received */
    uint64_t host_bytes;       /* bytes allocated with rlb_alloc_host, now */
    uint64_t tensors;          /* tensors registered, now */
} rlb_client_stats;

/* Fills *stats (struct_size set by the caller). Returns 0 or RLB_EINVAL / RLB_EVERSION. */
RLB_API int rlb_client_stats_get(rlb_client *client, rlb_client_stats *stats);

/* The bridge's counters by name ("bytes_synced", "syncs", ...), one round trip. */
typedef struct rlb_stat_list rlb_stat_list;
/* Returns 0 with *out set (free it with rlb_stat_list_free), or a connection error. */
RLB_API int rlb_bridge_stats(rlb_client *client, rlb_stat_list **out);
/* Counters in the list. */
RLB_API size_t rlb_stat_list_size(const rlb_stat_list *list);
/* Counter i: its name (valid until the list is freed) and value. Returns 0 or RLB_EINVAL. */
RLB_API int rlb_stat_list_get(const rlb_stat_list *list, size_t i, const char **name,
                              double *value);
/* The counter called name. Returns 0 or RLB_ENOTFOUND. */
RLB_API int rlb_stat_list_find(const rlb_stat_list *list, const char *name, double *value);
RLB_API void rlb_stat_list_free(rlb_stat_list *list);

#ifdef __cplusplus
}
#endif
#endif /* RLB_RLB_H */
