/* engine.h: the rollout engine of one TP rank: requests in, token ids and logprobs out
 * (DESIGN §6), over the forward pass of worker/forward.h and the paged KV cache of
 * worker/kvcache.h.
 *
 * Continuous batching. Each step gathers up to max_batch_tokens tokens: first every
 * running sequence (oldest first) gets its next chunk (one token when decoding, up to the
 * budget when prefilling: prefill is chunked), then waiting sequences are admitted in
 * arrival order while budget, KV blocks and max_seqs allow. A sequence whose chunk
 * completes its known tokens gets logits and samples one token. When a running sequence
 * needs a block and none is free, the most recently admitted running sequence is
 * preempted: its blocks are freed and it goes back to the head of the queue, to be
 * recomputed (prompt + tokens so far) later. New work waits rather than preempting, and a
 * request that could not fit the cache even alone is refused when added, so the oldest
 * sequence always makes progress and nothing is ever truncated.
 *
 * A request with n samples is prefilled once; when its prompt is done it forks: the other
 * samples share the prompt's full KV blocks and get a copy of the last partial one
 * (rlb__kv_fork), and every sample draws its first token from the same logits with its own
 * sample index.
 *
 * Lockstep TP: every rank of a replica makes the same calls (add, step, abort, sleep, ...)
 * in the same order; the forward pass gathers full logits on every rank, and sampling is a
 * pure function of them, so all ranks produce the same tokens without talking about them.
 *
 * All functions return 0 (or a count where said) or a negative RLB_E* code.
 */
#ifndef RLB_WORKER_ENGINE_H
#define RLB_WORKER_ENGINE_H

#include <stdint.h>

#include "kernels/cpu/sample.h"
#include "worker/ebackend.h"
#include "model/tp_layout.h"
#include "worker/forward.h"
#include "common/tp_comm.h"

typedef struct rlb_engine rlb_engine; /* opaque */

typedef struct rlb_engine_opts {
    uint32_t struct_size;     /* sizeof(rlb_engine_opts): fields may be added later */
    uint64_t kv_bytes;        /* KV cache budget of this rank in bytes (required) */
    int32_t block_tokens;     /* token slots per KV block; 0 = 16 */
    int32_t max_batch_tokens; /* tokens per step; 0 = 512 */
    int32_t max_seqs;         /* running sequences admitted at most; 0 = 256 */
    int64_t max_model_len;    /* longest sequence; 0 = max_position_embeddings */
    rlb_quant quant;          /* post-load processing */
    int32_t threads;          /* OpenBLAS threads; 0 = the RLB_THREADS knob */
} rlb_engine_opts;

#define RLB_ENGINE_OPTS_INIT {.struct_size = sizeof(rlb_engine_opts)}

typedef struct rlb_gen_request {
    uint64_t id;            /* caller's id, unique among unfinished requests */
    const int32_t *prompt;  /* [prompt_len] token ids, each in [0, vocab) */
    int64_t prompt_len;     /* >= 1 */
    int32_t n;              /* samples, 1 .. RLB_ENGINE_MAX_N */
    int32_t max_tokens;     /* tokens to generate per sample at most, >= 1 */
    rlb_sampling sampling;  /* temperature, top_k, top_p, seed */
    const int32_t *stop_ids; /* [n_stop] ids that end a sample (the id is kept) */
    int32_t n_stop;         /* entries in stop_ids, 0 .. RLB_ENGINE_MAX_STOP */
    int logprobs;           /* 1: return the logprob of every sampled token */
} rlb_gen_request;

#define RLB_ENGINE_MAX_N 4096
#define RLB_ENGINE_MAX_STOP 256

typedef enum rlb_finish {
    RLB_FINISH_NONE = 0,   /* still running */
    RLB_FINISH_STOP = 1,   /* sampled a stop id */
    RLB_FINISH_LENGTH = 2, /* max_tokens or max_model_len reached */
    RLB_FINISH_ABORT = 3   /* rlb__engine_abort */
} rlb_finish;

typedef struct rlb_gen_sample {
    int32_t *tokens;    /* [n_tokens] generated ids */
    float *logprobs;    /* [n_tokens] log_softmax(logits / T)[token], or NULL */
    int64_t n_tokens;   /* generated tokens */
    rlb_finish finish;  /* why it ended */
} rlb_gen_sample;

typedef struct rlb_gen_result {
    uint64_t id;             /* the request's id */
    int32_t n;               /* samples */
    rlb_gen_sample *samples; /* [n], by sample index */
} rlb_gen_result;

typedef struct rlb_engine_stats {
    uint64_t steps;            /* steps that ran a forward pass */
    uint64_t prefill_tokens;   /* tokens run without sampling after them, recompute included */
    uint64_t sampled_tokens;   /* tokens sampled */
    uint64_t preemptions;      /* sequences preempted for recompute */
    uint64_t forks;            /* samples that started from a shared prompt cache */
    int64_t kv_blocks;         /* blocks in the cache */
    int64_t kv_free;           /* blocks free now */
} rlb_engine_stats;

/* Creates the engine of rank comm->rank on the CPU backend over `weights` (laid out by
 * `layout`, float32, borrowed; see rlb__ebackend_cpu_create) with a KV cache sized from
 * opts->kv_bytes. Returns 0, RLB_EINVAL, RLB_EDTYPE, RLB_EUNSUPPORTED, RLB_ETOOBIG (budget
 * below one block) or RLB_ENOMEM. */
int rlb__engine_create(const rlb_tp_layout *layout, const void *weights, rlb_tp_comm *comm,
                       const rlb_engine_opts *opts, rlb_engine **out);
/* The same on backend `b` (CPU, CUDA: worker/ebackend.h), which the engine owns from now
 * on, also when this fails; the KV cache's storage comes from the backend. */
int rlb__engine_create_on(rlb_ebackend *b, const rlb_engine_opts *opts, rlb_engine **out);
void rlb__engine_destroy(rlb_engine *e);

/* Queues a request (copied). Returns 0, RLB_EINVAL (bad field, id >= vocab), RLB_EEXIST
 * (id in use), RLB_ETOOBIG (the prompt leaves no room below max_model_len, or one sample
 * cannot fit the KV cache alone) or RLB_ENOMEM. */
int rlb__engine_add(rlb_engine *e, const rlb_gen_request *req);
/* Runs one step. Returns the number of sequences that ran (0: nothing to do), RLB_EAGAIN
 * while asleep, or an error of the forward pass (the engine is then unusable until
 * rlb__engine_reset). */
int rlb__engine_step(rlb_engine *e);
/* Drops every request, finished results not yet taken and the KV blocks they held, and
 * makes a failed engine usable again, keeping its backend (a GPU worker's weights, which
 * the bridge has mapped, stay where they are). Returns 0, or RLB_EIO when the KV pool did
 * not come back whole (then only a new engine serves). */
int rlb__engine_reset(rlb_engine *e);
/* 1 while any request is unfinished. */
int rlb__engine_busy(const rlb_engine *e);
/* Takes the oldest finished result (free with rlb__gen_result_free). Returns 0, or
 * RLB_EAGAIN when none is ready. */
int rlb__engine_pop(rlb_engine *e, rlb_gen_result **out);
void rlb__gen_result_free(rlb_gen_result *r);
/* Ends request `id` now: its samples finish with RLB_FINISH_ABORT and the tokens so far,
 * and the result is queued. Returns 0 or RLB_ENOTFOUND. */
int rlb__engine_abort(rlb_engine *e, uint64_t id);

/* Frees the KV cache, keeping weights and requests: running sequences are preempted (they
 * recompute after wake). Returns 0. */
int rlb__engine_sleep(rlb_engine *e);
/* Allocates the KV cache again. Returns 0 or RLB_ENOMEM. */
int rlb__engine_wake(rlb_engine *e);
/* New weights landed in the buffer: re-runs post-load processing and preempts running
 * sequences, whose caches were computed with the old weights. Returns 0 or an error of
 * the processing. */
int rlb__engine_reload(rlb_engine *e);

/* Switches to another weight buffer of the same layout (staged weight sync: the new
 * weights were written into a second buffer while this one served), re-runs post-load
 * processing on it and preempts running sequences as rlb__engine_reload does. The old
 * buffer is not read afterwards and may be reused. Returns 0, RLB_EINVAL (NULL weights) or
 * an error of the processing. */
int rlb__engine_set_weights(rlb_engine *e, const void *weights);

void rlb__engine_stats(const rlb_engine *e, rlb_engine_stats *out);
/* The forward pass, for callers that need logits directly (tests, benchmarks). */
rlb_forward *rlb__engine_forward(rlb_engine *e);

#endif /* RLB_WORKER_ENGINE_H */
