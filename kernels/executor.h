/* executor.h: the reshard executor seam (DESIGN §3, "Seams"): what the bridge drives to run
 * a sync's plan, whatever memory the trainers' shards and the workers' buffers live in.
 *
 * An executor maps memory references (DESIGN §3) into addresses it can use, runs a plan
 * (model/plan.h) asynchronously and says it finished by writing to an eventfd the caller
 * polls, and unmaps only after every use is fenced. The bridge calls nothing else: it
 * links common, model and kernels, never the engine. Two implementations:
 *
 *   cpu   host memory only (HOST_SHM segments the bridge mmaps itself); a run is a thread
 *         executing rlb__plan_exec_cpu (kernels/cpu/plan_exec.h), the reference, LoRA
 *         merges included (their f32 adapter stage is kept from run to run).
 *   cuda  (kernels/cuda/executor_cuda.c, when the build has CUDA) CUDA_IPC handles through
 *         the IPC cache, CUDA_VMM_FD allocations imported and mapped on their GPU, host
 *         segments registered as mapped pinned memory; a run waits on the trainers'
 *         interprocess events on the executor's stream, then launches the plan's ops on the
 *         destinations' GPU (kernels/cuda/plan_exec.h), then the LoRA merges of those
 *         destinations (kernels/cuda/lora_merge.h: base copies, f32 adapter stage, merges in
 *         place), and a host thread writes the eventfd once the stream is done.
 *
 * Like ggml-backend and NCCL's plugins the interface is a struct of function pointers with
 * its version in its name; a later version appends fields. Every function returns 0 or a
 * negative RLB_E* code, with `err` (may be NULL) saying what was refused.
 */
#ifndef RLB_KERNELS_EXECUTOR_H
#define RLB_KERNELS_EXECUTOR_H

#include <stddef.h>
#include <stdint.h>

#include "model/plan.h"
#include "rlb/rlb.h"

typedef struct rlb_executor rlb_executor;

/* Where one referenced buffer is, for map: the protocol's memory reference, flattened so
 * kernels/ needs no message types. */
typedef struct rlb_exec_ref {
    int kind;                 /* rlb_mem_kind of common/proto.h: 0 host, 1 CUDA IPC, 2 VMM fd */
    int fd;                   /* HOST_SHM: the segment's fd (-1 when the caller keeps none) */
    const int *chunk_fds;     /* CUDA_VMM_FD: [n_chunks] fds of the physical chunks, in
                                 address order; the first one (the same fd number, kept
                                 open until unmap) identifies the range: exported chunks
                                 all stat as the driver's one device node */
    const uint64_t *chunk_bytes; /* CUDA_VMM_FD: [n_chunks] their sizes */
    uint32_t n_chunks;        /* CUDA_VMM_FD: chunks mapped back to back */
    uint8_t ipc_handle[64];   /* CUDA_IPC: the allocation's cudaIpcMemHandle_t */
    uint8_t device_uuid[16];  /* the GPU holding it; zero for host memory */
    uint64_t alloc_bytes;     /* CUDA_VMM_FD: the range's size (the chunks' sum); HOST_SHM:
                                 the segment's */
    uint64_t offset;          /* bytes from the allocation's (or segment's) start */
    uint64_t length;          /* bytes of the buffer */
    void *host;               /* HOST_SHM: where the caller mapped the segment's start */
} rlb_exec_ref;

/* One run: the plan (only the ops to execute) and its buffers, bound by index. */
typedef struct rlb_exec_run {
    const rlb_plan *plan;       /* ops grouped by destination */
    void *const *src;           /* [plan->n_src] mapped source addresses (NULL: unused) */
    const uint64_t *src_len;    /* [plan->n_src] */
    void *const *dst;           /* [plan->n_dst] mapped destination addresses */
    const uint64_t *dst_len;    /* [plan->n_dst] */
    const uint8_t (*events)[64]; /* [n_events] trainers' interprocess event handles to wait on */
    uint32_t n_events;
    int threads;                /* cpu: threads (<= 0: the RLB_THREADS knob) */
    uint64_t *nonfinite;        /* [plan->n_ops + plan->n_merges] or NULL: NaN / Inf values
                                   each op, then each LoRA merge, wrote, counted while
                                   copying (no extra pass) */
    int done_fd;                /* eventfd written (+1) when the run ended, well or not */
} rlb_exec_run;

typedef struct rlb_executor_iface_v1 {
    const char *name; /* "cpu", "cuda" */
    void (*destroy)(rlb_executor *x); /* fences first */
    /* Maps `ref` and stores an address for plans in *addr. */
    int (*map)(rlb_executor *x, const rlb_exec_ref *ref, void **addr, char *err, size_t errlen);
    /* Drops a mapping made by map (call only after fence, or with no run in flight). */
    int (*unmap)(rlb_executor *x, const rlb_exec_ref *ref, void *addr);
    /* Starts a run; at most one is in flight. The run's tables are copied. */
    int (*run)(rlb_executor *x, const rlb_exec_run *run, char *err, size_t errlen);
    /* After done_fd fired: the run's outcome and its time in ms. */
    int (*finish)(rlb_executor *x, double *ms, char *err, size_t errlen);
    /* Waits until nothing this executor started touches any mapping. */
    int (*fence)(rlb_executor *x);
} rlb_executor_iface_v1;

struct rlb_executor {
    const rlb_executor_iface_v1 *iface;
};

/* The CPU executor. RLB_ENOMEM. */
int rlb__executor_cpu_create(rlb_executor **out);
/* The CUDA executor, when this build has CUDA (RLB_EUNSUPPORTED otherwise, or with no GPU
 * visible). */
int rlb__executor_cuda_create(rlb_executor **out, char *err, size_t errlen);

#endif /* RLB_KERNELS_EXECUTOR_H */
