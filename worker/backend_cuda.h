/* backend_cuda.h: the CUDA engine backend (worker/ebackend.h's interface on one GPU), and
 * what a worker needs of it beyond the interface: uploading a host copy of the weights,
 * exporting the device weights as a POSIX fd for the bridge (DESIGN §3, CUDA_VMM_FD), and
 * sizing the KV cache from the free device memory (vLLM's gpu_memory_utilization).
 *
 * Weights live in one allocation of the driver's VMM API at a fixed virtual address, in the
 * buffer layout of model/tp_layout.h (dtype bf16, fp16 or fp32: the layout's); for staged
 * syncs in two such allocations, the forward pass reading one while the bridge writes the
 * other (set_weights switches, dropping the decode graphs, which are captured again).
 * Post-load copies (int8 weight-only, fp8 e4m3 per tensor or per channel, weight-only on
 * the GPU's dequantizing matmul) sit in one more fixed allocation; KV storage (through
 * kv_mem) in more. Sleep unmaps the physical memory and keeps the addresses, so captured
 * decode graphs stay valid across sleep / wake and in-place weight loads. The driver's VMM
 * functions are looked up at run time, not linked, so programs load (and GPU tests skip)
 * where no driver is.
 */
#ifndef RLB_WORKER_BACKEND_CUDA_H
#define RLB_WORKER_BACKEND_CUDA_H

#include <stdint.h>

#include "common/tp_comm.h"
#include "model/tp_layout.h"
#include "worker/ebackend.h"

typedef struct rlb_cuda_backend_opts {
    uint32_t struct_size;       /* sizeof(rlb_cuda_backend_opts): fields may be added */
    int32_t device;             /* CUDA device ordinal */
    int64_t max_batch_tokens;   /* rows of one step (<= 0: 2048) */
    int64_t max_seqs;           /* spans of one step (<= 0: 256) */
    int64_t max_blocks_per_seq; /* block-table entries per span on average: a step holds
                                 * max_seqs * this many (<= 0: max_pos / 4 + 1, blocks of
                                 * 4 tokens and up) */
    int64_t max_logit_rows;     /* logits rows of one step (<= 0: max_seqs) */
    int32_t graphs;             /* 1: capture decode steps in CUDA graphs per batch bucket */
    rlb_quant quant;            /* post-load processing (int8, fp8, fp8-channel: weight-only) */
    int32_t no_gemv;            /* 1: steps of <= 8 rows multiply through cuBLASLt too, not
                                 * the decode GEMV (benchmarks compare the two) */
    int32_t batch_invariant;    /* 1: a sequence's logits are bitwise the same whatever else
                                 * is in the step (see backend_cuda.c) */
    int32_t weight_buffers;     /* 2: a second weight buffer for staged syncs, allocated and
                                 * exportable like the first (<= 1: one) */
    int32_t fused_rope;         /* RoPE and the cache store inside the attention kernel: 0 in
                                 * decode steps of one key split (the large batches), 1 in
                                 * every decode step, -1 never (benchmarks and tests compare
                                 * them; all give the same bits) */
    int32_t classic_attention;  /* 1: decode steps attend with the classic kernel, not the
                                 * tensor-core decode kernel (benchmarks compare them) */
    int32_t gemm_tune;          /* the cuBLASLt products of a decode graph bucket: 0 the
                                 * fastest of the heuristic's first candidates, timed once
                                 * per shape before the bucket's capture; -1 the heuristic's
                                 * first (batch-invariant mode always) */
} rlb_cuda_backend_opts;

#define RLB_CUDA_BACKEND_OPTS_INIT {.struct_size = sizeof(rlb_cuda_backend_opts), .graphs = 1}

/* Creates the backend of rank layout->tp_rank on opts->device: maps the weights (uploads
 * `host_weights`, layout->total_bytes, when not NULL, and keeps it bound: postload uploads
 * it again) and the activation buffers of a step of the opts' maximum size, and runs
 * post-load processing; a rank of T > 1 then joins its group (rlb__cuda_backend_join_tp)
 * before its first step. Logs the memory plan. Returns 0, RLB_EINVAL, RLB_EDTYPE (a layout
 * dtype other than f32 / bf16 / f16), RLB_EUNSUPPORTED (a head_dim without kernels; logged
 * by name), RLB_ENOMEM (not enough device memory: the log says how much is needed and
 * free) or RLB_ECUDA. */
int rlb__ebackend_cuda_create(const rlb_tp_layout *layout, const void *host_weights,
                              const rlb_cuda_backend_opts *opts, rlb_ebackend **out);

/* T > 1: makes the NCCL communicator of the TP group (before the rank's first step).
 * Collective over `comm`, the group's own communicator (common/tp_comm.h: this rank, T
 * ranks): rank 0 makes the unique id and every rank gets it through comm, so the group
 * needs nothing but what already joins it; its waits are comm's, bounded, and a rank that
 * died ends them. NCCL then takes one GPU per rank. Returns 0 (also for T == 1 and a rank that joined already), RLB_EINVAL (comm is not
 * this rank's group), RLB_EPEERDEAD / RLB_ETIMEDOUT (comm's), RLB_EUNSUPPORTED (no NCCL in
 * this build) or RLB_ECUDA (NCCL refused: logged, e.g. two ranks on one GPU). */
int rlb__cuda_backend_join_tp(rlb_ebackend *b, rlb_tp_comm *comm);

/* Device weight buffer `buffer` (layout->total_bytes at a fixed address; set_weights of
 * this address makes the forward pass read it), or NULL when there is no such buffer. */
void *rlb__cuda_backend_weights(rlb_ebackend *b, int buffer);
/* Copies a host buffer of the layout into the device weights the forward pass reads and
 * runs post-load processing (the host buffer is not kept). Returns 0, RLB_EINVAL or
 * RLB_ECUDA. */
int rlb__cuda_backend_upload(rlb_ebackend *b, const void *host);
/* A POSIX fd of weight buffer `buffer`'s physical memory (cuMemExportToShareableHandle) and
 * its size; the caller owns the fd. RLB_EINVAL (no such buffer), RLB_EUNSUPPORTED where the
 * memory was made without an fd handle type, RLB_ECUDA. */
int rlb__cuda_backend_export_fd(rlb_ebackend *b, int buffer, int *fd, uint64_t *bytes);
/* Bytes the KV cache may take: util * total device memory minus what is in use now (after
 * the weights and buffers), 0 when nothing is left. */
uint64_t rlb__cuda_backend_kv_budget(rlb_ebackend *b, double gpu_memory_utilization);

#endif /* RLB_WORKER_BACKEND_CUDA_H */
