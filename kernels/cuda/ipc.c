/* ipc.c: CUDA memory references and interprocess events (ipc.h).
 *
 * The importer's cache is a flat array of open allocations, each with its mapped base, its
 * size (for bounds checks) and the number of references mapped through it; lookups compare
 * the 64-byte handle. Registration, not the sync path, does the lookups, and a trainer rank
 * registers its shards from a few caching-allocator blocks, so a linear scan is enough.
 *
 * Where the allocation lives on another GPU, the handle opens in the cache GPU's context
 * (peer access enabled lazily) when that GPU can reach it peer to peer and the mode is
 * auto; otherwise it opens in the owning GPU's own context, which needs no peer path: the
 * plan executor then reads it through its staged fallback (cudaMemcpyPeerAsync).
 *
 * The two driver functions needed (allocation range, IPC capability) are looked up through
 * the runtime (cudaGetDriverEntryPointByVersion) instead of linked, so programs using this
 * file load on machines without a driver and can skip there.
 */
#include "kernels/cuda/ipc.h"

#include <stdlib.h>
#include <string.h>

#include <cuda.h>

#include "kernels/cuda/cuda_check.h"

_Static_assert(sizeof(cudaIpcMemHandle_t) == RLB_CUDA_IPC_HANDLE_BYTES, "IPC handle size");
_Static_assert(sizeof(cudaIpcEventHandle_t) == RLB_CUDA_IPC_HANDLE_BYTES, "event handle size");
_Static_assert(sizeof(cudaUUID_t) == RLB_CUDA_UUID_BYTES, "uuid size");

/* One allocation opened from another process. */
typedef struct ipc_entry {
    uint8_t handle[RLB_CUDA_IPC_HANDLE_BYTES]; /* its cudaIpcMemHandle_t */
    int dev;                                   /* GPU whose context holds the mapping */
    char *base;                                /* mapped base address (UVA) */
    uint64_t size;                             /* bytes of the allocation */
    uint32_t refs;                             /* references mapped through it (>= 1) */
} ipc_entry;

struct rlb_cuda_ipc_cache {
    int device;          /* GPU whose kernels use the mappings */
    rlb_cuda_peer_mode mode; /* how memory on another GPU is mapped */
    int n_devices;       /* visible GPUs */
    cudaUUID_t *uuids;   /* [n_devices] uuid of each visible GPU */
    uint32_t n;          /* open allocations in entries[] */
    uint32_t cap;        /* allocated entries */
    ipc_entry *entries;  /* open allocations, in no particular order */
};

typedef CUresult (*get_range_fn)(CUdeviceptr *base, size_t *size, CUdeviceptr ptr);
typedef CUresult (*ptr_attr_fn)(void *data, CUpointer_attribute attr, CUdeviceptr ptr);

/* [*base, *base + *size): the allocation holding ptr (a context must be current). */
static int address_range(const void *ptr, CUdeviceptr *base, size_t *size)
{
    get_range_fn get_range;
    int rc = rlb__cuda_driver_fn("cuMemGetAddressRange", (void **)&get_range);
    if (!rc)
        RLB_CU_CHECK(get_range(base, size, (CUdeviceptr)(uintptr_t)ptr), rc, out);
out:
    return rc;
}

static int device_uuid(int device, cudaUUID_t *uuid)
{
    int rc = 0;
    struct cudaDeviceProp prop;
    RLB_CUDA_CHECK(cudaGetDeviceProperties(&prop, device), rc, out);
    *uuid = prop.uuid;
out:
    return rc;
}

int rlb__cuda_ipc_export(const void *dptr, uint64_t length, rlb_cuda_ipc_ref *ref, char *err,
                         size_t errlen)
{
    if (!dptr || !ref)
        return RLB_EINVAL;
    struct cudaPointerAttributes at;
    cudaUUID_t uuid;
    cudaIpcMemHandle_t h;
    CUdeviceptr base = 0;
    size_t size = 0;
    int capable = 0, rc = 0, prev = -1;
    ptr_attr_fn ptr_attr;
    RLB_CUDA_CHECK(cudaPointerGetAttributes(&at, dptr), rc, out_nodev);
    if (at.type != cudaMemoryTypeDevice) {
        rlb__cuda_err(err, errlen, "export: %p is not device memory", dptr);
        return RLB_EINVAL;
    }
    RLB_CHECK(rlb__cuda_enter(at.device, &prev));
    RLB_CHECK_GOTO(address_range(dptr, &base, &size), rc, out);
    if ((uint64_t)((uintptr_t)dptr - base) + length > size) {
        rlb__cuda_err(err, errlen, "export: [%p, +%llu) leaves its allocation of %zu bytes",
                      dptr, (unsigned long long)length, size);
        rc = RLB_EINVAL;
        goto out;
    }
    RLB_CHECK_GOTO(rlb__cuda_driver_fn("cuPointerGetAttribute", (void **)&ptr_attr), rc, out);
    RLB_CU_CHECK(ptr_attr(&capable, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, base), rc,
                 out);
    if (!capable) {
        rlb__cuda_err(err, errlen, "export: %p has no legacy IPC handle (cuMemCreate or a "
                      "cudaMallocAsync pool); export it as CUDA_VMM_FD", dptr);
        rc = RLB_EUNSUPPORTED;
        goto out;
    }
    RLB_CUDA_CHECK(cudaIpcGetMemHandle(&h, (void *)(uintptr_t)base), rc, out);
    RLB_CHECK_GOTO(device_uuid(at.device, &uuid), rc, out);
    memset(ref, 0, sizeof(*ref));
    memcpy(ref->handle, &h, sizeof h);
    memcpy(ref->device_uuid, &uuid, sizeof uuid);
    ref->offset = (uint64_t)((uintptr_t)dptr - base);
    ref->length = length;
out:
    rlb__cuda_leave(prev);
out_nodev:
    return rc;
}

int rlb__cuda_ipc_cache_create(int device, rlb_cuda_ipc_cache **out)
{
    if (!out)
        return RLB_EINVAL;
    *out = NULL;
    int rc = 0;
    rlb_cuda_ipc_cache *c = calloc(1, sizeof(*c));
    if (!c)
        return RLB_ENOMEM;
    c->device = device;
    c->mode = rlb__cuda_peer_mode_env();
    RLB_CUDA_CHECK(cudaGetDeviceCount(&c->n_devices), rc, err);
    if (device < 0 || device >= c->n_devices) {
        rc = RLB_EINVAL;
        goto err;
    }
    c->uuids = calloc((size_t)c->n_devices, sizeof(*c->uuids));
    if (!c->uuids) {
        rc = RLB_ENOMEM;
        goto err;
    }
    for (int d = 0; d < c->n_devices; d++)
        RLB_CHECK_GOTO(device_uuid(d, &c->uuids[d]), rc, err);
    *out = c;
    return 0;
err:
    free(c->uuids);
    free(c);
    return rc;
}

static void close_entry(const rlb_cuda_ipc_cache *c, ipc_entry *e)
{
    int prev;
    if (rlb__cuda_enter(e->dev, &prev) != 0)
        return;
    cudaError_t ce = cudaIpcCloseMemHandle(e->base);
    if (ce != cudaSuccess)
        RLB_LOG_ERROR(RLB_SUB_KERNEL, "cudaIpcCloseMemHandle(%p): %s", (void *)e->base,
                      cudaGetErrorString(ce));
    rlb__cuda_leave(prev);
}

void rlb__cuda_ipc_cache_destroy(rlb_cuda_ipc_cache *c)
{
    if (!c)
        return;
    for (uint32_t i = 0; i < c->n; i++)
        close_entry(c, &c->entries[i]);
    free(c->entries);
    free(c->uuids);
    free(c);
}

static ipc_entry *find_entry(rlb_cuda_ipc_cache *c, const uint8_t *handle)
{
    for (uint32_t i = 0; i < c->n; i++)
        if (memcmp(c->entries[i].handle, handle, RLB_CUDA_IPC_HANDLE_BYTES) == 0)
            return &c->entries[i];
    return NULL;
}

/* Opens ref's allocation (on GPU `owner`) and appends its entry. */
static int open_entry(rlb_cuda_ipc_cache *c, const rlb_cuda_ipc_ref *ref, int owner,
                      ipc_entry **out)
{
    int rc = 0, prev = -1, dev = c->device, can = 0;
    void *base = NULL;
    CUdeviceptr range_base = 0;
    size_t size = 0;
    cudaIpcMemHandle_t h;
    if (c->n == c->cap) {
        uint32_t cap = c->cap ? 2 * c->cap : 16;
        ipc_entry *e = realloc(c->entries, cap * sizeof(*e));
        if (!e)
            return RLB_ENOMEM;
        c->entries = e;
        c->cap = cap;
    }
    memcpy(&h, ref->handle, sizeof h);
    if (owner != c->device) {
        RLB_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, c->device, owner), rc, out_nodev);
        if (c->mode == RLB_CUDA_PEER_STAGED || !can)
            dev = owner;
    }
    RLB_CHECK(rlb__cuda_enter(dev, &prev));
    RLB_CUDA_CHECK(cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess), rc, out);
    RLB_CHECK_GOTO(address_range(base, &range_base, &size), rc, err_close);
    ipc_entry *e = &c->entries[c->n++];
    memcpy(e->handle, ref->handle, RLB_CUDA_IPC_HANDLE_BYTES);
    e->dev = dev;
    e->base = base;
    e->size = size;
    e->refs = 0;
    *out = e;
    goto out;
err_close:
    cudaIpcCloseMemHandle(base);
out:
    rlb__cuda_leave(prev);
out_nodev:
    return rc;
}

static void drop_entry(rlb_cuda_ipc_cache *c, ipc_entry *e)
{
    close_entry(c, e);
    *e = c->entries[--c->n]; /* order does not matter: move the last entry into the hole */
}

int rlb__cuda_ipc_map(rlb_cuda_ipc_cache *c, const rlb_cuda_ipc_ref *ref, void **dptr,
                      char *err, size_t errlen)
{
    if (!c || !ref || !dptr)
        return RLB_EINVAL;
    int owner = -1;
    for (int d = 0; d < c->n_devices && owner < 0; d++)
        if (memcmp(&c->uuids[d], ref->device_uuid, RLB_CUDA_UUID_BYTES) == 0)
            owner = d;
    if (owner < 0) {
        rlb__cuda_err(err, errlen, "map: the reference's GPU is not visible to this process "
                      "(check CUDA_VISIBLE_DEVICES)");
        return RLB_ENOTFOUND;
    }
    ipc_entry *e = find_entry(c, ref->handle);
    if (!e) {
        int rc = open_entry(c, ref, owner, &e);
        if (rc) {
            rlb__cuda_err(err, errlen, "map: the allocation's IPC handle does not open (%s)",
                          rlb_strerror(rc));
            return rc;
        }
    }
    if (ref->offset > e->size || ref->length > e->size - ref->offset) {
        rlb__cuda_err(err, errlen, "map: [%llu, +%llu) leaves the allocation of %llu bytes",
                      (unsigned long long)ref->offset, (unsigned long long)ref->length,
                      (unsigned long long)e->size);
        if (e->refs == 0)
            drop_entry(c, e);
        return RLB_EINVAL;
    }
    e->refs++;
    *dptr = e->base + ref->offset;
    return 0;
}

int rlb__cuda_ipc_unmap(rlb_cuda_ipc_cache *c, const rlb_cuda_ipc_ref *ref)
{
    if (!c || !ref)
        return RLB_EINVAL;
    ipc_entry *e = find_entry(c, ref->handle);
    if (!e)
        return RLB_ENOTFOUND;
    if (--e->refs == 0)
        drop_entry(c, e);
    return 0;
}

uint32_t rlb__cuda_ipc_open_handles(const rlb_cuda_ipc_cache *c)
{
    return c ? c->n : 0;
}

int rlb__cuda_ipc_cache_set_peer_mode(rlb_cuda_ipc_cache *c, rlb_cuda_peer_mode mode)
{
    if (!c || c->n || (mode != RLB_CUDA_PEER_AUTO && mode != RLB_CUDA_PEER_STAGED))
        return RLB_EINVAL;
    c->mode = mode;
    return 0;
}

int rlb__cuda_event_create_ipc(cudaEvent_t *ev, rlb_cuda_ipc_event *handle)
{
    if (!ev || !handle)
        return RLB_EINVAL;
    int rc = 0;
    cudaIpcEventHandle_t h;
    RLB_CUDA_CHECK(cudaEventCreateWithFlags(ev, cudaEventInterprocess | cudaEventDisableTiming),
                   rc, out);
    RLB_CUDA_CHECK(cudaIpcGetEventHandle(&h, *ev), rc, err_destroy);
    memcpy(handle->handle, &h, sizeof h);
    return 0;
err_destroy:
    cudaEventDestroy(*ev);
out:
    return rc;
}

int rlb__cuda_event_open_ipc(const rlb_cuda_ipc_event *handle, cudaEvent_t *ev)
{
    if (!ev || !handle)
        return RLB_EINVAL;
    int rc = 0;
    cudaIpcEventHandle_t h;
    memcpy(&h, handle->handle, sizeof h);
    RLB_CUDA_CHECK(cudaIpcOpenEventHandle(ev, h), rc, out);
out:
    return rc;
}
