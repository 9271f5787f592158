/* ebackend.h: the engine backend, the seam between the forward pass and a device (DESIGN §3,
 * "Seams"). worker/forward.c walks the model (embedding, layers, head) and worker/engine.c
 * schedules requests; both call a backend only through this struct of function pointers,
 * so the CPU backend (worker/backend_cpu.c, OpenBLAS, float32) and the CUDA backend
 * (worker/backend_cuda.c, cuBLASLt and the kernels of kernels/cuda/engine_ops.h) are two
 * implementations of one interface and the scheduler holds no #ifdef.
 *
 * A backend owns everything on its device: the binding to the weight buffer (and the
 * post-load copies: int8, fp8), the activation buffers of a step (named by rlb_ebuf, sized
 * for the step in `begin`), the KV cache storage (allocated through rlb_kv_mem, so the
 * block manager in kvcache.c stays host-side and shared), the logits of the step, and the
 * communicator of its TP group.
 *
 * One step is: begin(batch) -> embed -> per layer (rmsnorm, linear qkv, rope_store,
 * attention, linear o, allreduce, add, rmsnorm, linear gate_up, swiglu, linear down,
 * allreduce, add) -> logits -> sample or read_logits. Calls are asynchronous on backends
 * that can be (a CUDA stream); `sample` and `read_logits` return results on the host and
 * so end the step. A backend that captures graphs says so in `graph_begin`: when it returns
 * 1 a captured graph for this batch shape exists, the caller skips the ops from embed to
 * logits, and `graph_end` replays it; otherwise the ops are issued (and maybe captured) and
 * `graph_end` finishes the capture. The batch's host metadata is uploaded in `begin`, into
 * buffers whose addresses never change, which is what makes replay valid.
 *
 * Numerics: the residual stream (RLB_EBUF_X) and the linear outputs are float32 on every
 * backend; the inputs of matrix products (H, ATTN, ACT) are in the backend's compute dtype
 * (float32 on the CPU; the weights' dtype on CUDA: bf16, fp16 or fp32). Every function
 * returns 0 or a negative RLB_E* code.
 *
 * The interface is versioned by its name (NCCL's plugin habit): a later version adds
 * fields at the end of a new struct, and backends written against v1 keep working.
 */
#ifndef RLB_WORKER_EBACKEND_H
#define RLB_WORKER_EBACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/cpu/sample.h"
#include "rlb/rlb.h"
#include "model/tp_layout.h"

typedef struct rlb_ebackend rlb_ebackend;

/* Post-load processing of the matrices (DESIGN §4). */
typedef enum rlb_quant {
    RLB_QUANT_NONE = 0,        /* weights as loaded */
    RLB_QUANT_INT8 = 1,        /* int8 weight-only, one scale per output row */
    RLB_QUANT_FP8 = 2,         /* fp8 e4m3, one scale per tensor (CUDA backend) */
    RLB_QUANT_FP8_CHANNEL = 3  /* fp8 e4m3, one scale per output row (CUDA backend) */
} rlb_quant;

/* "none", "int8", "fp8", "fp8-channel" (NULL for another value). */
const char *rlb__quant_name(rlb_quant q);
/* Parses a --quant value. Returns 0 or RLB_EINVAL. */
int rlb__quant_parse(const char *s, rlb_quant *out);

/* Parses --device / RLB_DEVICE ("auto", "cpu", "cuda"). Returns 0 or RLB_EINVAL. */
int rlb__device_parse(const char *s, rlb_device *out);

/* The activation buffers of one step. Rows are the batch's tokens (rows), or the rows whose
 * logits are wanted (out). */
typedef enum rlb_ebuf {
    RLB_EBUF_X = 0, /* [rows, D] float32 residual stream */
    RLB_EBUF_H,     /* [rows, D] normed input of a block (compute dtype) */
    RLB_EBUF_QKV,   /* [rows, (hq + 2 kvt) hd] float32 */
    RLB_EBUF_ATTN,  /* [rows, hq hd] attention output (compute dtype) */
    RLB_EBUF_PROJ,  /* [rows, D] float32 o_proj / down_proj output */
    RLB_EBUF_GU,    /* [rows, 2 I/T] float32 gate_up output */
    RLB_EBUF_ACT,   /* [rows, I/T] silu(gate) * up (compute dtype) */
    RLB_EBUF_COUNT_
} rlb_ebuf;

/* What the rows of a step are: spans of consecutive tokens of sequences (DESIGN §6). Built
 * by forward.c on the host; the arrays stay valid until the step's read_logits or sample
 * returns (a device backend copies them to the device in `begin`). */
typedef struct rlb_ebatch {
    int64_t rows;              /* tokens in the step, sum of span_n */
    int64_t n_spans;           /* sequences in the step */
    int64_t out;               /* rows whose logits are wanted */
    int64_t max_ctx;           /* largest span_pos0 + span_n */
    int64_t max_blocks;        /* entries per span in block_tables */
    int32_t decode_only;       /* 1 when every span is one token (a graph-capturable step) */
    const int32_t *tokens;     /* [rows] token ids, each in [0, V) */
    const int32_t *pos;        /* [rows] position of each token */
    const int64_t *slot;       /* [rows] KV slot of each token: block id * block_tokens + slot */
    const int32_t *row_span;   /* [rows] span of each row */
    const int32_t *span_row0;  /* [n_spans] first row of each span */
    const int32_t *span_n;     /* [n_spans] tokens of each span */
    const int32_t *span_pos0;  /* [n_spans] position of each span's first token */
    const int32_t *block_tables; /* [n_spans, max_blocks] block ids, position order */
    const int32_t *out_rows;   /* [out] rows whose logits are wanted, ascending */
} rlb_ebatch;

/* One token to sample from a row of the step's logits (see kernels/cpu/sample.h). */
typedef struct rlb_sample_job {
    int64_t row;          /* logits row, < batch.out */
    rlb_sampling sp;      /* temperature, top_k, top_p, seed */
    uint64_t sample;      /* sample index: part of the noise key */
    int64_t pos;          /* position of the token being sampled: part of the noise key */
} rlb_sample_job;

/* How the KV block manager gets storage from the backend (host or device memory). */
typedef struct rlb_kv_mem {
    /* Maps `bytes` of storage; returns it, or NULL (no memory). A backend that sleeps and
     * wakes returns the same address every time, so block tables stay valid. */
    void *(*alloc)(void *ctx, uint64_t bytes);
    /* Gives the storage back (sleep, destroy). */
    void (*release)(void *ctx, void *p, uint64_t bytes);
    /* dst <- src, `bytes` inside the storage (a fork's copy of a partial block). */
    int (*copy)(void *ctx, void *dst, const void *src, uint64_t bytes);
    void *ctx;            /* the backend */
    uint32_t elem_bytes;  /* bytes of one cached key / value element */
} rlb_kv_mem;

struct rlb_kvcache;

typedef struct rlb_ebackend_iface_v1 {
    const char *name; /* "cpu", "cuda" */
    void (*destroy)(rlb_ebackend *b);

    /* Weights. `postload` re-runs post-load processing from the bound buffer (new bytes
     * landed); `set_weights` binds another buffer of the same layout and re-runs it. */
    int (*postload)(rlb_ebackend *b);
    int (*set_weights)(rlb_ebackend *b, const void *weights);

    /* The step. */
    int (*begin)(rlb_ebackend *b, const rlb_ebatch *batch, struct rlb_kvcache *kv);
    int (*graph_begin)(rlb_ebackend *b); /* NULL: never captures */
    int (*graph_end)(rlb_ebackend *b);   /* NULL: never captures */
    /* X <- the embedding rows of the tokens (vocabulary-parallel, summed over ranks). */
    int (*embed)(rlb_ebackend *b);
    /* dst <- rmsnorm(src) * w, w the norm of (kind, layer); dst may be src when both are X. */
    int (*rmsnorm)(rlb_ebackend *b, rlb_ebuf src, rlb_wkind w, int layer, rlb_ebuf dst);
    /* dst = src . W^T (+ bias of the QKV weight when the model has one) for the weight of
     * (kind, layer); reads the post-load copy when there is one. */
    int (*linear)(rlb_ebackend *b, rlb_wkind w, int layer, rlb_ebuf src, rlb_ebuf dst);
    /* RoPE on the q and k heads of QKV in place, then the k and v of each row into its
     * KV slot of `layer`. */
    int (*rope_store)(rlb_ebackend *b, int layer);
    /* ATTN <- causal attention of each span's queries over its cached keys and values. */
    int (*attention)(rlb_ebackend *b, int layer);
    /* ACT <- silu(GU[:, :I/T]) * GU[:, I/T:]. */
    int (*swiglu)(rlb_ebackend *b);
    /* dst += src, both float32 [rows, D]. */
    int (*add)(rlb_ebackend *b, rlb_ebuf dst, rlb_ebuf src);
    /* Sums `buf` over the TP group (a no-op at T = 1). */
    int (*allreduce)(rlb_ebackend *b, rlb_ebuf buf);
    /* The step's logits [out, V]: final norm of the out rows of X, the LM head (this rank's
     * vocabulary slice), gathered over the TP group and cut to V. Kept on the device. */
    int (*logits)(rlb_ebackend *b);

    /* Results. */
    int (*read_logits)(rlb_ebackend *b, float *host); /* [out, V] float32 */
    int (*sample)(rlb_ebackend *b, const rlb_sample_job *jobs, int64_t n, int32_t *tokens,
                  float *logprobs);

    /* KV storage for kvcache.c. */
    rlb_kv_mem (*kv_mem)(rlb_ebackend *b);

    /* Sleep / wake of the weights (CUDA: release the physical memory, keep the addresses).
     * NULL where not supported. */
    int (*weights_sleep)(rlb_ebackend *b);
    int (*weights_wake)(rlb_ebackend *b);
} rlb_ebackend_iface_v1;

/* The base every backend embeds first. */
struct rlb_ebackend {
    const rlb_ebackend_iface_v1 *iface;
    const rlb_tp_layout *layout;  /* the rank's layout (borrowed) */
};

#endif /* RLB_WORKER_EBACKEND_H */
