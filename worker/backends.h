/* backends.h: which engine backend a worker or `rlb generate` runs on (--device,
 * RLB_DEVICE), and opening it: the one place that knows which backends this build has, so
 * the daemon and the commands carry no #ifdef.
 *
 *   cpu    float32 weights in a host buffer the caller owns (the worker's shared-memory
 *          segment), OpenBLAS (worker/backend_cpu.h)
 *   cuda   weights of the chosen dtype (bf16 by default) on one GPU at a fixed address,
 *          uploaded from a host buffer of the same layout (worker/backend_cuda.h); the KV
 *          budget follows --gpu-memory-utilization
 * auto is cuda where this build has CUDA and a GPU is visible, else cpu.
 */
#ifndef RLB_WORKER_BACKENDS_H
#define RLB_WORKER_BACKENDS_H

#include <stddef.h>
#include <stdint.h>

#include "common/tp_comm.h"
#include "model/tp_layout.h"
#include "worker/ebackend.h"

typedef struct rlb_backend_choice {
    uint32_t struct_size;          /* sizeof(rlb_backend_choice) */
    rlb_device device;             /* AUTO (see rlb__backend_resolve), CPU or CUDA */
    int cuda_device;               /* GPU ordinal (CUDA) */
    rlb_dtype dtype;               /* CUDA: weight dtype F32, BF16 (default) or F16 */
    rlb_quant quant;               /* post-load processing */
    int graphs;                    /* CUDA: capture decode steps in graphs (default 1) */
    int batch_invariant;           /* CUDA: batch-invariant kernels (default 0) */
    double gpu_memory_utilization; /* CUDA: share of the GPU the worker may fill (0.9) */
    int64_t max_batch_tokens;      /* the engine's step size (sizes the CUDA buffers) */
    int64_t max_seqs;              /* the engine's running sequences at most */
    int weight_buffers;            /* CUDA: 2 for staged syncs (a second device buffer, in
                                      the memory gpu_memory_utilization shares out); else 1 */
} rlb_backend_choice;

#define RLB_BACKEND_CHOICE_INIT                                                           \
    {.struct_size = sizeof(rlb_backend_choice), .device = RLB_DEVICE_AUTO,                \
     .dtype = RLB_DTYPE_BF16, .graphs = 1, .gpu_memory_utilization = 0.9}

/* AUTO -> CUDA when this build has CUDA and a GPU is visible, else CPU; others unchanged.
 * The RLB_DEVICE knob is the caller's default (rlb__backend_device_env). */
rlb_device rlb__backend_resolve(rlb_device d);
/* The RLB_DEVICE knob ("auto", "cpu", "cuda"; another value is logged and read as auto). */
rlb_device rlb__backend_device_env(void);
/* Element type of the weight buffer on `device` (CPU: F32 whatever was asked). */
rlb_dtype rlb__backend_weight_dtype(const rlb_backend_choice *c);

/* Opens the backend of c->device (resolved) for `layout` (its dtype must be
 * rlb__backend_weight_dtype): CPU over `weights` (borrowed, read in place), CUDA with
 * `weights` uploaded once when not NULL (the caller may free them on return), joined to its
 * TP group through `comm` when T > 1 (rlb__backend_join_tp). *kv_budget (may be NULL) gets
 * the KV bytes the device leaves (CUDA: by gpu_memory_utilization; CPU: 0, the caller's
 * budget stands). Returns 0 or the backend's error, `err` saying what (RLB_EUNSUPPORTED: a
 * device this build or machine lacks). */
int rlb__backend_open(const rlb_tp_layout *layout, const void *weights, rlb_tp_comm *comm,
                      const rlb_backend_choice *c, rlb_ebackend **out, uint64_t *kv_budget,
                      char *err, size_t errlen);
/* CUDA, T > 1: the rank's NCCL communicator, made through the group's own `comm` (every
 * rank calls it; rlb__cuda_backend_join_tp). rlb__backend_open does it when given a comm;
 * a worker, whose group communicator comes after the backend is open, calls it then.
 * Returns 0 (also on the CPU backend and for T == 1) or the error, `err` saying what. */
int rlb__backend_join_tp(rlb_ebackend *b, rlb_tp_comm *comm, char *err, size_t errlen);
/* CUDA: a POSIX fd of device weight buffer `buffer`'s memory for the bridge (CUDA_VMM_FD),
 * its size and the uuid of GPU c->cuda_device. RLB_EUNSUPPORTED on the CPU backend. */
int rlb__backend_export_weights(rlb_ebackend *b, const rlb_backend_choice *c, int buffer,
                                int *fd, uint64_t *bytes, uint8_t uuid[16]);
/* CUDA: the device address of weight buffer `buffer` (what set_weights takes to switch to
 * it), or NULL (no such buffer, or the CPU backend, whose buffers the caller owns). */
const void *rlb__backend_weight_buffer(rlb_ebackend *b, int buffer);

#endif /* RLB_WORKER_BACKENDS_H */
