/* ipc.h: CUDA memory references (DESIGN §3, kind CUDA_IPC) and interprocess events.
 *
 * Export (trainer ranks, workers): a tensor is described by the IPC handle of the
 * allocation it lives in (cudaIpcGetMemHandle on the base that cuMemGetAddressRange
 * reports) plus its offset and length, so tensors inside a PyTorch caching-allocator block
 * export fine; the GPU is named by uuid, since device ordinals differ between processes
 * with different CUDA_VISIBLE_DEVICES. The fields match rlb_mem_ref (common/proto.h) with
 * kind RLB_MEM_CUDA_IPC one for one; the bridge copies them across.
 *
 * Import (the bridge): a cache per executing GPU opens each allocation's handle once
 * (cudaIpcOpenMemHandle; memory on another GPU is mapped for peer access where the GPUs
 * have a peer path and the peer mode is auto, else in its own GPU's context, for the
 * executor's staged fallback: give the cache and the plan the same mode), counts the
 * references mapped through it, and closes it exactly once: when the last reference is
 * unmapped, or when the cache is destroyed (a disconnect). Mapping is done at registration,
 * never per step. The cache is not thread-safe: the bridge's event loop owns it.
 *
 * Ordering across processes: the exporter records an interprocess event (created with
 * rlb__cuda_event_create_ipc) on the stream that wrote the tensors, then publishes; the
 * bridge, having opened the event's handle once, makes its stream wait on it
 * (cudaStreamWaitEvent) before running the plan. A client without an event synchronizes its
 * stream before publishing instead.
 *
 * Functions return 0 or a negative RLB_E* code; refusals are described in `err` (may be
 * NULL), failed CUDA calls are named in the log. None leaves the current device changed.
 */
#ifndef RLB_KERNELS_CUDA_IPC_H
#define RLB_KERNELS_CUDA_IPC_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_check.h"

#ifdef __cplusplus
extern "C" {
#endif

#define RLB_CUDA_IPC_HANDLE_BYTES 64 /* sizeof(cudaIpcMemHandle_t) and cudaIpcEventHandle_t */
#define RLB_CUDA_UUID_BYTES 16       /* sizeof(cudaUUID_t) */

/* A tensor in another process's GPU memory. */
typedef struct rlb_cuda_ipc_ref {
    uint8_t handle[RLB_CUDA_IPC_HANDLE_BYTES]; /* cudaIpcMemHandle_t of the allocation */
    uint8_t device_uuid[RLB_CUDA_UUID_BYTES];  /* uuid of the GPU holding it */
    uint64_t offset;                           /* bytes from the allocation's base */
    uint64_t length;                           /* bytes of the tensor */
} rlb_cuda_ipc_ref;

/* Describes device memory [dptr, dptr + length) of this process. RLB_EINVAL when dptr is
 * not device memory or the range leaves its allocation; RLB_EUNSUPPORTED for memory that
 * has no IPC handle (cuMemCreate / cudaMallocAsync pools: use CUDA_VMM_FD instead). */
int rlb__cuda_ipc_export(const void *dptr, uint64_t length, rlb_cuda_ipc_ref *ref, char *err,
                         size_t errlen);

typedef struct rlb_cuda_ipc_cache rlb_cuda_ipc_cache;

/* A cache for GPU `device` (the GPU whose kernels will read or write the memory), its peer
 * mode from the RLB_CUDA_PEER knob. RLB_ENOMEM / RLB_ECUDA. */
int rlb__cuda_ipc_cache_create(int device, rlb_cuda_ipc_cache **out);
/* Closes every handle still open, once each, and frees the cache. NULL is fine. */
void rlb__cuda_ipc_cache_destroy(rlb_cuda_ipc_cache *c);
/* Maps `ref` and stores the tensor's address (valid on the cache's GPU) in *dptr, opening
 * the allocation's handle only if no mapped reference holds it open. RLB_ENOTFOUND when
 * no visible GPU has the ref's uuid; RLB_EINVAL when offset + length leaves the
 * allocation (nothing stays open); RLB_ECUDA when the handle does not open. */
int rlb__cuda_ipc_map(rlb_cuda_ipc_cache *c, const rlb_cuda_ipc_ref *ref, void **dptr,
                      char *err, size_t errlen);
/* Drops one reference mapped from the same allocation as `ref`; the last one closes the
 * handle. RLB_ENOTFOUND when no mapped reference has that handle. */
int rlb__cuda_ipc_unmap(rlb_cuda_ipc_cache *c, const rlb_cuda_ipc_ref *ref);
/* Handles open now (allocations with at least one mapped reference). */
uint32_t rlb__cuda_ipc_open_handles(const rlb_cuda_ipc_cache *c);
/* Sets how memory on another GPU is mapped; RLB_EINVAL while handles are open. */
int rlb__cuda_ipc_cache_set_peer_mode(rlb_cuda_ipc_cache *c, rlb_cuda_peer_mode mode);

/* An interprocess event handle. */
typedef struct rlb_cuda_ipc_event {
    uint8_t handle[RLB_CUDA_IPC_HANDLE_BYTES]; /* cudaIpcEventHandle_t */
} rlb_cuda_ipc_event;

/* Exporter: creates an event usable across processes (no timing) on the current device
 * and its handle; record it with cudaEventRecord after each write, before publishing. */
int rlb__cuda_event_create_ipc(cudaEvent_t *ev, rlb_cuda_ipc_event *handle);
/* Importer: opens an exported event once (cudaEventDestroy releases it); then
 * cudaStreamWaitEvent(stream, ev) orders work after the exporter's latest record that
 * happened before the call. */
int rlb__cuda_event_open_ipc(const rlb_cuda_ipc_event *handle, cudaEvent_t *ev);

#ifdef __cplusplus
}
#endif
#endif /* RLB_KERNELS_CUDA_IPC_H */
