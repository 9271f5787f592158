/* cuda.c: device tensors of a trainer (DESIGN §3, §5): exporting their memory to the
 * bridge, the interprocess event a publish carries, and the host staging fallback.
 *
 * librlb links no CUDA library: the driver (libcuda.so.1) is dlopen'ed at the first device
 * tensor and called through a table of the few entry points needed, so the library loads
 * and runs host-only on machines without a GPU. Every call that needs a context runs in the
 * device's primary context (the one PyTorch and the runtime API use), pushed and popped
 * around it, so the caller's current context never changes.
 *
 * A device tensor is placed in one of three ways, decided per allocation:
 *   - CUDA_IPC: memory from cudaMalloc (the driver says it is legacy-IPC capable) is the
 *     IPC handle of its allocation's base plus the tensor's offset;
 *   - CUDA_VMM_FD: memory mapped with the VMM API (cuMemCreate, PyTorch's expandable
 *     segments) is the run of physical allocations (chunks) that covers the tensor, sent as
 *     one segment of fds (segmsg.h, RLB_SEG_MAGIC_VMM); the fds are exported when the
 *     segment is sent and closed right after, so nothing here keeps the memory alive;
 *   - staged: where CUDA IPC is forbidden (the bridge refused the handle with RLB_EPERM,
 *     exporting failed for lack of permission, or RLB_CUDA_IPC=off) or the memory cannot be
 *     exported at all (a cudaMallocAsync pool), a host shadow: one pinned shared-memory
 *     segment per register batch, filled on the publish's stream before each publish.
 * An export is made once and reused by every tensor inside it while tensors are
 * registered there; when the last one is unregistered it is forgotten (the caller may
 * then free the memory, and the address may come back as another allocation).
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client/client_internal.h"
#include "common/check.h"
#include "common/env.h"
#include "common/log.h"
#include "common/segmsg.h"

/* ---- the driver, by dlsym ------------------------------------------------------------- */

/* Driver API types as the ABI has them: CUresult and CUdevice are ints, CUdeviceptr is a
 * 64-bit integer, contexts, streams, events and allocation handles are opaque. */
typedef int cu_result;
typedef unsigned long long cu_ptr;
typedef void *cu_ctx;

enum {
    CU_SUCCESS = 0,
    CU_ERROR_INVALID_VALUE = 1,
    CU_ERROR_OPERATING_SYSTEM = 304,
    CU_ERROR_NOT_PERMITTED = 800,
    CU_ERROR_NOT_SUPPORTED = 801,
    CU_MEMORYTYPE_DEVICE = 2,
    CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2,
    CU_POINTER_ATTRIBUTE_IS_MANAGED = 8,
    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9,
    CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10,
    CU_POINTER_ATTRIBUTE_RANGE_START_ADDR = 11,
    CU_POINTER_ATTRIBUTE_RANGE_SIZE = 12,
    CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES = 14,
    CU_POINTER_ATTRIBUTE_MAPPING_SIZE = 18,
    CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR = 19,
    CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1,
    CU_EVENT_DISABLE_TIMING = 2,
    CU_EVENT_INTERPROCESS = 4,
    CU_MEMHOSTREGISTER_PORTABLE = 1,
};

typedef struct cu_api {
    cu_result (*init)(unsigned flags);
    cu_result (*error_string)(cu_result rc, const char **text);
    cu_result (*device_get)(int *dev, int ordinal);
    cu_result (*device_count)(int *n);
    cu_result (*device_uuid)(uint8_t uuid[16], int dev);
    cu_result (*ctx_retain)(cu_ctx *ctx, int dev);
    cu_result (*ctx_release)(int dev);
    cu_result (*ctx_push)(cu_ctx ctx);
    cu_result (*ctx_pop)(cu_ctx *ctx);
    cu_result (*pointer_attributes)(unsigned n, const int *attrs, void **data, cu_ptr ptr);
    cu_result (*pointer_attribute)(void *data, int attr, cu_ptr ptr);
    cu_result (*ipc_mem_handle)(void *handle, cu_ptr base);
    cu_result (*retain_allocation)(unsigned long long *handle, void *addr);
    cu_result (*export_handle)(void *out, unsigned long long handle, int type,
                               unsigned long long flags);
    cu_result (*mem_release)(unsigned long long handle);
    cu_result (*event_create)(void **ev, unsigned flags);
    cu_result (*event_record)(void *ev, void *stream);
    cu_result (*event_destroy)(void *ev);
    cu_result (*ipc_event_handle)(void *handle, void *ev);
    cu_result (*memcpy_dtoh_async)(void *dst, cu_ptr src, size_t bytes, void *stream);
    cu_result (*stream_synchronize)(void *stream);
    cu_result (*host_register)(void *p, size_t bytes, unsigned flags);
    cu_result (*host_unregister)(void *p);
} cu_api;

static cu_api cu;
static pthread_once_t cu_once = PTHREAD_ONCE_INIT;
static char cu_missing[256]; /* why the driver is unusable; "" once loaded */

static void cu_load(void)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(cu_missing, sizeof(cu_missing), "the NVIDIA driver cannot be loaded (%s)",
                 dlerror());
        return;
    }
    const struct {
        void *slot;
        const char *name;
    } syms[] = {{&cu.init, "cuInit"},
                {&cu.error_string, "cuGetErrorString"},
                {&cu.device_get, "cuDeviceGet"},
                {&cu.device_count, "cuDeviceGetCount"},
                {&cu.device_uuid, "cuDeviceGetUuid_v2"},
                {&cu.ctx_retain, "cuDevicePrimaryCtxRetain"},
                {&cu.ctx_release, "cuDevicePrimaryCtxRelease_v2"},
                {&cu.ctx_push, "cuCtxPushCurrent_v2"},
                {&cu.ctx_pop, "cuCtxPopCurrent_v2"},
                {&cu.pointer_attributes, "cuPointerGetAttributes"},
                {&cu.pointer_attribute, "cuPointerGetAttribute"},
                {&cu.ipc_mem_handle, "cuIpcGetMemHandle"},
                {&cu.retain_allocation, "cuMemRetainAllocationHandle"},
                {&cu.export_handle, "cuMemExportToShareableHandle"},
                {&cu.mem_release, "cuMemRelease"},
                {&cu.event_create, "cuEventCreate"},
                {&cu.event_record, "cuEventRecord"},
                {&cu.event_destroy, "cuEventDestroy_v2"},
                {&cu.ipc_event_handle, "cuIpcGetEventHandle"},
                {&cu.memcpy_dtoh_async, "cuMemcpyDtoHAsync_v2"},
                {&cu.stream_synchronize, "cuStreamSynchronize"},
                {&cu.host_register, "cuMemHostRegister_v2"},
                {&cu.host_unregister, "cuMemHostUnregister"}};
    for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++) {
        void *f = dlsym(lib, syms[i].name);
        if (!f) {
            snprintf(cu_missing, sizeof(cu_missing), "the NVIDIA driver lacks %s (too old)",
                     syms[i].name);
            return; /* the library stays loaded: harmless, and dlclose races other users */
        }
        memcpy(syms[i].slot, &f, sizeof(f));
    }
    cu_result rc = cu.init(0);
    if (rc != CU_SUCCESS)
        snprintf(cu_missing, sizeof(cu_missing), "cuInit failed with CUDA error %d", rc);
}

/* 0 when the driver is usable, else RLB_EUNSUPPORTED with the reason in err. */
static int cu_ready(char *err, size_t cap)
{
    pthread_once(&cu_once, cu_load);
    if (!cu_missing[0])
        return 0;
    snprintf(err, cap, "device memory needs CUDA, but %s", cu_missing);
    return RLB_EUNSUPPORTED;
}

static const char *cu_text(cu_result rc)
{
    const char *s = NULL;
    return cu.error_string && cu.error_string(rc, &s) == CU_SUCCESS && s ? s : "unknown error";
}

/* Errors that mean "this process may not share its memory this way", not a bug. */
static int cu_forbidden(cu_result rc)
{
    return rc == CU_ERROR_NOT_PERMITTED || rc == CU_ERROR_NOT_SUPPORTED ||
           rc == CU_ERROR_OPERATING_SYSTEM;
}

/* ---- per-client state ----------------------------------------------------------------- */

/* One exported allocation (CUDA_IPC) or run of physical allocations (CUDA_VMM_FD). */
typedef struct rlb__dev_alloc {
    uint64_t id;                          /* rlb__reg_tensor.dev_alloc, from 1 */
    rlb_mem_kind kind;                    /* RLB_MEM_CUDA_IPC or RLB_MEM_CUDA_VMM_FD */
    cu_ptr base;                          /* first byte */
    uint64_t bytes;                       /* length */
    uint8_t ipc_handle[RLB_PROTO_HANDLE_BYTES]; /* CUDA_IPC */
    uint32_t seg_id;                      /* CUDA_VMM_FD: its segment id */
    int at_bridge;                        /* CUDA_VMM_FD: sent (the bridge maps it) */
    uint32_t registered;                  /* tensors registered inside it */
} rlb__dev_alloc;

struct rlb__cuda {
    int device;                 /* GPU ordinal of every device tensor; -1 = none yet */
    uint8_t uuid[RLB_PROTO_UUID_BYTES]; /* its uuid */
    cu_ctx ctx;                 /* its primary context, retained */
    rlb__dev_alloc *allocs;     /* exports */
    uint32_t n_allocs, cap_allocs; /* used / allocated entries */
    uint64_t next_alloc_id;     /* ids of exports, from 1 */
    int stage_all;              /* every new device tensor is staged */
    int staging_logged;         /* the log line saying so was written */
    int ipc_in_batch;           /* the register being answered exported CUDA IPC handles */
    void *event;                /* the interprocess publish event, NULL until first use */
    uint8_t event_handle[RLB_PROTO_HANDLE_BYTES]; /* its IPC handle */
    uint32_t n_staged;          /* staged tensors registered */
    uint32_t n_exported;        /* IPC / VMM tensors registered */
    uint32_t shadow_seg;        /* the current batch's shadow segment, 0 = none */
    uint8_t *shadow_next;       /* next free byte in it */
    uint8_t *shadow_end;        /* its end */
};

#define SHADOW_ALIGN 256 /* bytes: every staged tensor starts at a multiple */

static int push(rlb__cuda *cs)
{
    return cu.ctx_push(cs->ctx);
}

static void pop(void)
{
    cu_ctx ignored;
    cu.ctx_pop(&ignored);
}

/* The client's CUDA state for GPU `device`, made on first use (c->lock held). */
static int state_for(rlb_client *c, int device, char *err, size_t cap)
{
    rlb__cuda *cs = c->cuda;
    if (cs && cs->device == device)
        return 0;
    if (cs && cs->device >= 0 && (cs->n_staged || cs->n_exported))
        return snprintf(err, cap, "this client's device tensors are on GPU %d, not %d: one "
                        "client publishes from one GPU", cs->device, device), RLB_EUNSUPPORTED;
    int n = 0, dev;
    cu_result rc = cu.device_count(&n);
    if (rc == CU_SUCCESS && (device < 0 || device >= n))
        return snprintf(err, cap, "cuda_device %d: this process sees %d GPU(s)", device, n),
               RLB_EINVAL;
    if (!cs && !(cs = calloc(1, sizeof(*cs))))
        return snprintf(err, cap, "out of memory"), RLB_ENOMEM;
    c->cuda = cs;
    if (cs->ctx) { /* no tensors left on the previous GPU */
        if (cs->event)
            cu.event_destroy(cs->event);
        cs->event = NULL;
        cu.ctx_release(cs->device);
        cs->ctx = NULL;
    }
    cs->device = -1;
    if (rc == CU_SUCCESS)
        rc = cu.device_get(&dev, device);
    if (rc == CU_SUCCESS)
        rc = cu.device_uuid(cs->uuid, dev);
    if (rc == CU_SUCCESS)
        rc = cu.ctx_retain(&cs->ctx, dev);
    if (rc != CU_SUCCESS)
        return snprintf(err, cap, "GPU %d: %s", device, cu_text(rc)), RLB_ECUDA;
    cs->device = device;
    cs->stage_all = cs->stage_all || !strcmp(rlb__env_str(RLB_KNOB_CUDA_IPC), "off");
    return 0;
}

/* The export holding [p, p + bytes), or NULL. */
static rlb__dev_alloc *alloc_find(rlb__cuda *cs, cu_ptr p, uint64_t bytes)
{
    for (uint32_t i = 0; i < cs->n_allocs; i++) {
        rlb__dev_alloc *a = &cs->allocs[i];
        if (p >= a->base && p - a->base <= a->bytes && bytes <= a->bytes - (p - a->base))
            return a;
    }
    return NULL;
}

static rlb__dev_alloc *alloc_by_id(rlb__cuda *cs, uint64_t id)
{
    for (uint32_t i = 0; i < cs->n_allocs; i++)
        if (cs->allocs[i].id == id)
            return &cs->allocs[i];
    return NULL;
}

static rlb__dev_alloc *alloc_by_seg(rlb__cuda *cs, uint32_t seg_id)
{
    for (uint32_t i = 0; cs && i < cs->n_allocs; i++)
        if (cs->allocs[i].kind == RLB_MEM_CUDA_VMM_FD && cs->allocs[i].seg_id == seg_id)
            return &cs->allocs[i];
    return NULL;
}

/* What the driver says about a pointer. */
typedef struct ptr_info {
    int memory_type, ordinal, managed, ipc_capable;
    unsigned long long handle_types;
    cu_ptr range_start;
    size_t range_size;
} ptr_info;

static cu_result query(cu_ptr p, ptr_info *pi)
{
    int attrs[] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                   CU_POINTER_ATTRIBUTE_IS_MANAGED, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                   CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                   CU_POINTER_ATTRIBUTE_RANGE_SIZE};
    void *data[] = {&pi->memory_type, &pi->ordinal, &pi->managed, &pi->ipc_capable,
                    &pi->handle_types, &pi->range_start, &pi->range_size};
    memset(pi, 0, sizeof(*pi));
    pi->ordinal = -1;
    return cu.pointer_attributes(sizeof(attrs) / sizeof(attrs[0]), attrs, data, p);
}

/* [*base, *base + *size): the mapping (physical allocation) holding p, for VMM memory. */
static cu_result mapping_of(cu_ptr p, cu_ptr *base, size_t *size)
{
    cu_result rc = cu.pointer_attribute(base, CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR, p);
    if (rc == CU_SUCCESS)
        rc = cu.pointer_attribute(size, CU_POINTER_ATTRIBUTE_MAPPING_SIZE, p);
    if (rc == CU_SUCCESS && *size == 0)
        rc = CU_ERROR_INVALID_VALUE;
    return rc;
}

static rlb__dev_alloc *alloc_new(rlb__cuda *cs, rlb_mem_kind kind, cu_ptr base, uint64_t bytes)
{
    if (rlb__grow(&cs->allocs, &cs->cap_allocs, cs->n_allocs + 1, sizeof(*cs->allocs)) < 0)
        return NULL;
    rlb__dev_alloc *a = &cs->allocs[cs->n_allocs++];
    *a = (rlb__dev_alloc){.id = ++cs->next_alloc_id, .kind = kind, .base = base, .bytes = bytes};
    return a;
}

/* Exports the cudaMalloc allocation holding [p, p + bytes). Returns 0, 1 when exporting is
 * forbidden here (stage instead), or a negative code. */
static int export_ipc(rlb__cuda *cs, const ptr_info *pi, cu_ptr p, uint64_t bytes,
                      rlb__dev_alloc **out, char *err, size_t cap)
{
    if (p + bytes > pi->range_start + pi->range_size)
        return snprintf(err, cap, "its %llu bytes run past the end of their allocation",
                        (unsigned long long)bytes), RLB_EINVAL;
    uint8_t handle[RLB_PROTO_HANDLE_BYTES];
    cu_result rc = push(cs);
    if (rc == CU_SUCCESS) {
        rc = cu.ipc_mem_handle(handle, pi->range_start);
        pop();
    }
    if (cu_forbidden(rc))
        return 1;
    if (rc != CU_SUCCESS)
        return snprintf(err, cap, "cuIpcGetMemHandle: %s", cu_text(rc)), RLB_ECUDA;
    rlb__dev_alloc *a = alloc_new(cs, RLB_MEM_CUDA_IPC, pi->range_start, pi->range_size);
    if (!a)
        return snprintf(err, cap, "out of memory"), RLB_ENOMEM;
    memcpy(a->ipc_handle, handle, sizeof(handle));
    cs->ipc_in_batch = 1;
    *out = a;
    return 0;
}

/* Describes the run of VMM mappings that covers [p, p + bytes) as a segment to send. */
static int export_vmm(rlb_client *c, cu_ptr p, uint64_t bytes, rlb__dev_alloc **out,
                      char *err, size_t cap)
{
    cu_ptr base, at;
    size_t size;
    cu_result rc = mapping_of(p, &base, &size);
    at = base + size;
    while (rc == CU_SUCCESS && at < p + bytes) {
        cu_ptr next;
        rc = mapping_of(at, &next, &size);
        if (rc == CU_SUCCESS && next != at)
            rc = CU_ERROR_INVALID_VALUE;
        at += size;
    }
    if (rc != CU_SUCCESS)
        return snprintf(err, cap, "its bytes are not covered by mapped VMM allocations (%s)",
                        cu_text(rc)), RLB_EINVAL;
    if (c->next_seg_id >= RLB_SEG_ID_BRIDGE)
        return snprintf(err, cap, "out of segment ids"), RLB_ETOOBIG;
    rlb__dev_alloc *a = alloc_new(c->cuda, RLB_MEM_CUDA_VMM_FD, base, at - base);
    if (!a)
        return snprintf(err, cap, "out of memory"), RLB_ENOMEM;
    a->seg_id = c->next_seg_id++;
    *out = a;
    return 0;
}

static void log_staging(rlb_client *c, const char *why)
{
    if (c->cuda->staging_logged++)
        return;
    RLB_LOG_WARN(RLB_SUB_CLIENT, "device tensors of GPU %d go through host staging (pinned "
                 "shared memory, copied at each publish): %s", c->cuda->device, why);
}

/* Places a staged tensor in this batch's shadow, making the shadow when there is none or
 * it is full (sized for every device byte of the batch still to place). */
static int place_staged(rlb_client *c, const rlb_tensor_desc *d, uint64_t bytes,
                        uint64_t staged_left, rlb_msg_tensor *t, rlb__reg_tensor *rt,
                        uint32_t *send, uint32_t *n_send, char *err, size_t cap)
{
    rlb__cuda *cs = c->cuda;
    uint64_t need = (bytes + SHADOW_ALIGN - 1) / SHADOW_ALIGN * SHADOW_ALIGN;
    if (!cs->shadow_seg || (uint64_t)(cs->shadow_end - cs->shadow_next) < need) {
        uint32_t id;
        void *mem;
        uint64_t size = staged_left > need ? staged_left : need;
        pthread_mutex_unlock(&c->lock);
        int rc = rlb__host_alloc(c, size, 1, &id, &mem);
        if (rc == 0 && cu.host_register(mem, size, CU_MEMHOSTREGISTER_PORTABLE) != CU_SUCCESS)
            RLB_LOG_WARN(RLB_SUB_CLIENT, "pinning %llu bytes of staging memory failed "
                         "(memlock limit?); copies to it will be slower",
                         (unsigned long long)size);
        pthread_mutex_lock(&c->lock);
        if (rc < 0)
            return snprintf(err, cap, "no shared memory for its host staging copy"), rc;
        cs->shadow_seg = id;
        cs->shadow_next = mem;
        cs->shadow_end = (uint8_t *)mem + size;
        send[(*n_send)++] = id;
        rlb__host_by_id(c, id)->at_bridge = 1;
    }
    rlb__host_seg *s = rlb__host_by_id(c, cs->shadow_seg);
    t->mem = (rlb_mem_ref){.kind = RLB_MEM_HOST_SHM, .fd_index = s->id,
                           .offset = (uint64_t)(cs->shadow_next - s->base), .length = bytes};
    rt->seg_id = s->id;
    rt->shadow = cs->shadow_next;
    rt->dptr = d->data;
    rt->bytes = bytes;
    s->registered++;
    cs->shadow_next += need;
    cs->n_staged++;
    return 0;
}

int rlb__cuda_place(rlb_client *c, const rlb_tensor_desc *d, uint64_t bytes,
                    uint64_t staged_left, rlb_msg_tensor *t, rlb__reg_tensor *rt,
                    uint32_t *send, uint32_t *n_send, char *err, size_t cap)
{
    RLB_CHECK(cu_ready(err, cap));
    RLB_CHECK(state_for(c, d->cuda_device, err, cap));
    rlb__cuda *cs = c->cuda;
    cu_ptr p = (cu_ptr)(uintptr_t)d->data;
    ptr_info pi;
    cu_result rc = query(p, &pi);
    if (rc != CU_SUCCESS)
        return snprintf(err, cap, "cuPointerGetAttributes: %s", cu_text(rc)), RLB_ECUDA;
    if (pi.memory_type != CU_MEMORYTYPE_DEVICE || pi.managed)
        return snprintf(err, cap, "%p is not device memory of GPU %d (it is %s)", d->data,
                        d->cuda_device, pi.managed ? "managed memory"
                                       : pi.memory_type ? "host memory known to CUDA"
                                                        : "not CUDA memory"), RLB_EINVAL;
    if (pi.ordinal != d->cuda_device)
        return snprintf(err, cap, "%p is memory of GPU %d, not of cuda_device %d", d->data,
                        pi.ordinal, d->cuda_device), RLB_EINVAL;
    rlb__dev_alloc *a = cs->stage_all ? NULL : alloc_find(cs, p, bytes);
    int stage = cs->stage_all;
    if (!a && !stage) {
        int r;
        if (pi.ipc_capable)
            r = export_ipc(cs, &pi, p, bytes, &a, err, cap);
        else if (pi.handle_types & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
            r = export_vmm(c, p, bytes, &a, err, cap);
        else
            r = 2;
        if (r < 0)
            return r;
        if (r == 0)
            RLB_LOG_INFO(RLB_SUB_CLIENT, "GPU %d: an allocation of %llu bytes goes to the bridge "
                         "as %s", d->cuda_device, (unsigned long long)a->bytes,
                         a->kind == RLB_MEM_CUDA_VMM_FD ? "VMM fds (expandable segments)"
                                                        : "a CUDA IPC handle");
        if (r > 0) {
            cs->stage_all = 1;
            log_staging(c, r == 1 ? "this process may not export CUDA IPC handles"
                                  : "the memory has no IPC handle and no POSIX fd export "
                                    "(a cudaMallocAsync pool?)");
        }
        stage = r > 0;
    } else if (!a && !cs->n_staged) {
        log_staging(c, "RLB_CUDA_IPC=off, or the bridge may not open CUDA IPC handles");
    }
    if (stage)
        return place_staged(c, d, bytes, staged_left, t, rt, send, n_send, err, cap);
    t->mem = (rlb_mem_ref){.kind = a->kind, .offset = p - a->base, .length = bytes};
    memcpy(t->mem.device_uuid, cs->uuid, sizeof(cs->uuid));
    if (a->kind == RLB_MEM_CUDA_IPC) {
        memcpy(t->mem.ipc_handle, a->ipc_handle, sizeof(a->ipc_handle));
    } else {
        t->mem.fd_index = a->seg_id;
        if (!a->at_bridge) {
            a->at_bridge = 1;
            send[(*n_send)++] = a->seg_id;
        }
    }
    rt->dev_alloc = a->id;
    a->registered++;
    cs->n_exported++;
    return 0;
}

int rlb__cuda_has_seg(rlb_client *c, uint32_t id)
{
    return alloc_by_seg(c->cuda, id) != NULL;
}

int rlb__cuda_send(rlb_client *c, uint32_t id)
{
    pthread_mutex_lock(&c->lock);
    rlb__dev_alloc *a = alloc_by_seg(c->cuda, id);
    cu_ptr base = a->base, end = a->base + a->bytes;
    rlb__cuda *cs = c->cuda;
    pthread_mutex_unlock(&c->lock);
    /* One message per RLB_SEG_VMM_MAX_CHUNKS chunks, all with the segment's id and size. */
    struct {
        rlb__seg_msg head;
        uint64_t sizes[RLB_SEG_VMM_MAX_CHUNKS];
    } msg = {.head = {.magic = RLB_SEG_MAGIC_VMM, .id = id, .bytes = end - base}};
    int fds[RLB_SEG_VMM_MAX_CHUNKS];
    int n = 0, rc = 0;
    const char *what = "cuCtxPushCurrent";
    cu_result cr = push(cs);
    int pushed = cr == CU_SUCCESS;
    for (cu_ptr at = base; cr == CU_SUCCESS && rc == 0 && at < end;) {
        cu_ptr chunk;
        size_t size;
        unsigned long long h;
        int fd = -1;
        if ((cr = mapping_of(at, &chunk, &size)) != CU_SUCCESS) {
            what = "the mapping";
            break;
        }
        if ((cr = cu.retain_allocation(&h, (void *)(uintptr_t)at)) != CU_SUCCESS) {
            what = "cuMemRetainAllocationHandle";
            break;
        }
        cr = cu.export_handle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
        cu.mem_release(h);
        if (cr != CU_SUCCESS) {
            what = "cuMemExportToShareableHandle";
            break;
        }
        msg.sizes[n] = size;
        fds[n++] = fd;
        at = chunk + size;
        if (n == (int)RLB_SEG_VMM_MAX_CHUNKS || at >= end) {
            pthread_mutex_lock(&c->tx_lock);
            rc = rlb__conn_send_fds(c->conn, &msg, sizeof(msg.head) + 8 * (size_t)n, fds, n);
            pthread_mutex_unlock(&c->tx_lock);
            while (n)
                close(fds[--n]);
        }
    }
    if (pushed)
        pop();
    while (n)
        close(fds[--n]);
    if (cr != CU_SUCCESS)
        return rlb__fail(c, RLB_ECUDA, "exporting VMM memory at 0x%llx: %s: %s",
                         (unsigned long long)base, what, cu_text(cr));
    return rc < 0 ? rlb__fail(c, rc, "sending VMM segment %u to the bridge failed", id) : 0;
}

void rlb__cuda_drop(rlb_client *c, const rlb__reg_tensor *rt)
{
    rlb__cuda *cs = c->cuda;
    if (!cs)
        return;
    if (rt->shadow)
        cs->n_staged--;
    rlb__dev_alloc *a = rt->dev_alloc ? alloc_by_id(cs, rt->dev_alloc) : NULL;
    if (a) {
        a->registered--;
        cs->n_exported--;
    }
}

void rlb__cuda_settle(rlb_client *c)
{
    rlb__cuda *cs = c->cuda;
    if (!cs)
        return;
    for (uint32_t i = 0; i < cs->n_allocs;) {
        if (cs->allocs[i].registered)
            i++;
        else
            cs->allocs[i] = cs->allocs[--cs->n_allocs];
    }
    cs->shadow_seg = 0; /* the next batch makes its own shadow */
    cs->ipc_in_batch = 0;
}

int rlb__cuda_fall_back_to_staging(rlb_client *c)
{
    rlb__cuda *cs = c->cuda;
    if (!cs || !cs->ipc_in_batch || cs->stage_all)
        return 0;
    cs->stage_all = 1;
    log_staging(c, "the bridge may not open this process's CUDA IPC handles (no ptrace "
                   "capability between the processes?)");
    return 1;
}

/* The event recorded on stream after the trainer's writes, made once. */
static cu_result record_event(rlb__cuda *cs, void *stream, const char **what)
{
    cu_result rc = CU_SUCCESS;
    if (!cs->event) {
        *what = "cuEventCreate";
        rc = cu.event_create(&cs->event, CU_EVENT_INTERPROCESS | CU_EVENT_DISABLE_TIMING);
        if (rc == CU_SUCCESS) {
            *what = "cuIpcGetEventHandle";
            rc = cu.ipc_event_handle(cs->event_handle, cs->event);
        }
        if (rc != CU_SUCCESS) {
            if (cs->event)
                cu.event_destroy(cs->event);
            cs->event = NULL;
            return rc;
        }
    }
    *what = "cuEventRecord";
    return cu.event_record(cs->event, stream);
}

int rlb__cuda_before_publish(rlb_client *c, void *stream, rlb_msg_publish *pub)
{
    pthread_mutex_lock(&c->lock);
    rlb__cuda *cs = c->cuda;
    if (!cs || (!cs->n_staged && !cs->n_exported)) {
        pthread_mutex_unlock(&c->lock);
        return 0;
    }
    const char *what = "cuCtxPushCurrent";
    cu_result rc = push(cs);
    int pushed = rc == CU_SUCCESS;
    for (uint32_t i = 0; rc == CU_SUCCESS && cs->n_staged && i < c->n_tensors; i++) {
        const rlb__reg_tensor *t = &c->tensors[i];
        what = "cuMemcpyDtoHAsync";
        if (t->shadow)
            rc = cu.memcpy_dtoh_async(t->shadow, (cu_ptr)(uintptr_t)t->dptr, t->bytes, stream);
    }
    if (rc == CU_SUCCESS && cs->n_exported) {
        rc = record_event(cs, stream, &what);
        memcpy(pub->event, cs->event_handle, sizeof(pub->event));
        memcpy(pub->event_uuid, cs->uuid, sizeof(pub->event_uuid));
    }
    int staged = cs->n_staged != 0;
    pthread_mutex_unlock(&c->lock);
    /* The copies must have landed before the bridge reads the shadows: it cannot wait on
     * an event for host memory. Only this stream is synchronized. */
    if (rc == CU_SUCCESS && staged) {
        what = "cuStreamSynchronize";
        rc = cu.stream_synchronize(stream);
    }
    if (pushed)
        pop();
    return rc == CU_SUCCESS ? 0 : rlb__fail(c, RLB_ECUDA, "publish: %s: %s", what, cu_text(rc));
}

void rlb__cuda_unpin(void *ptr)
{
    if (!cu_missing[0] && cu.host_unregister)
        cu.host_unregister(ptr);
}

void rlb__cuda_free(rlb_client *c)
{
    rlb__cuda *cs = c->cuda;
    if (!cs)
        return;
    if (cs->event)
        cu.event_destroy(cs->event);
    if (cs->ctx)
        cu.ctx_release(cs->device);
    free(cs->allocs);
    free(cs);
    c->cuda = NULL;
}
