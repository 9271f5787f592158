/* executor_cuda.c: the CUDA reshard executor (kernels/executor.h).
 *
 * Mapping. CUDA_IPC references open through one IPC cache per GPU that holds them
 * (kernels/cuda/ipc.h: once per allocation, closed with its last reference).
 * CUDA_VMM_FD ranges (PyTorch's expandable segments, the GPU workers' weight buffers) are
 * physical chunks each imported with cuMemImportFromShareableHandle and mapped back to
 * back at an address range reserved here, readable and writable by every visible GPU with
 * a peer path; the same range (the same open fd of its first chunk, which the caller keeps
 * until unmap) is imported once and counted. The fds' inode cannot name a range: the
 * driver exports every allocation as an open of the same device node (/dev/nvidiactl),
 * so all of them stat alike. Host segments are read by the kernels as
 * mapped pinned memory: a run registers (cudaHostRegister) the byte ranges its host sources
 * cover, merged where they overlap or touch, and keeps them registered for the next runs;
 * unmap of a host reference (the bridge is about to munmap the segment) fences and
 * unregisters every range inside it. The ranges are the sources' own bytes, not rounded out
 * to pages: the driver pins the pages under them either way, but a copy (cudaMemcpy) into or
 * out of host memory that starts inside a registered range and runs past its end fails with
 * cudaErrorInvalidValue, so a range rounded out over a neighbouring allocation of the
 * caller's (malloc'd buffers share pages) would break the caller's own copies of it.
 *
 * Running. The plan's destinations are grouped by the GPU that holds them; each group's
 * ops are uploaded to that GPU once (kernels/cuda/plan_exec.h) and reused while the plan's
 * ops and the group are the same (a hash of both), bound to this run's addresses, and
 * launched on the GPU's stream after cudaStreamWaitEvent on each trainer event (opened once
 * per handle). A host thread then waits for the streams and writes the run's eventfd, so
 * the bridge's loop never blocks on the GPU; finish joins it and reports the first error.
 * Fence joins the thread: nothing this executor started then touches any mapping.
 *
 * LoRA merges (DESIGN §10). A plan's merges are uploaded per GPU beside its copies
 * (kernels/cuda/lora_merge.h, likewise kept while the merges and the group are the same)
 * and run on the same stream after the copies: the merged weights' base copies, the
 * adapter stage, then the merges in place. The copy kernel counts the non-finite values
 * each op writes and the merge kernel those each merge writes (plan_exec.h,
 * lora_merge.h); the waiting thread adds both to the run's table once the stream is done.
 *
 * Driver functions are looked up through the runtime (rlb__cuda_driver_fn), so the program
 * loads on machines without a driver. Check: tests/gpu/test_cuda_executor.c (against the
 * CPU executor on host, IPC and VMM memory).
 */
#include "kernels/executor.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include "common/clock.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ipc.h"
#include "kernels/cuda/lora_merge.h"
#include "kernels/cuda/plan_exec.h"

#define EX_MAX_DEV 16

/* One imported VMM range: chunks mapped back to back. */
typedef struct vmm_entry {
    int fd0;             /* the caller's fd of the first chunk (open until unmap) */
    uint64_t ino, dev, rdev; /* its st_ino / st_dev / st_rdev when mapped */
    uint64_t alloc;      /* the reference's alloc_bytes */
    CUmemGenericAllocationHandle *h; /* [n] the imported chunks */
    uint64_t *chunk;     /* [n] their sizes */
    uint32_t n;          /* chunks imported */
    uint32_t mapped;     /* chunks mapped */
    CUdeviceptr va;      /* where the range is mapped */
    uint64_t bytes;      /* its size */
    uint32_t refs;       /* map calls not yet unmapped */
} vmm_entry;

/* A host range registered as mapped pinned memory. */
typedef struct host_range {
    char *lo, *hi;   /* [lo, hi): the sources' bytes, exactly */
    int used;        /* covered by the last run's sources or destinations */
} host_range;

/* One cudaIpcEventHandle opened once. */
typedef struct ev_entry {
    uint8_t handle[64];
    cudaEvent_t ev;
    int dev;
} ev_entry;

/* Per GPU: the stream, and the plan uploaded for the destinations it holds. */
typedef struct dev_state {
    cudaStream_t stream;         /* NULL until first use */
    rlb_cuda_ipc_cache *ipc;     /* NULL until a reference on this GPU is mapped */
    rlb_cuda_plan *plan;         /* uploaded plan for this GPU's destinations */
    uint64_t plan_hash;          /* hash of the ops and destination set it was made from */
    rlb_cuda_lora *lora;         /* uploaded merges of this GPU's destinations, or NULL */
    uint64_t lora_hash;          /* hash of the merges, their copies, the stage ops and the
                                    destination set they were made from */
    int used;                    /* the current run launched here */
    int bound;                   /* plan and lora are bound to the buffers of the last run
                                    (cuda_exec.last): a run with the same skips binding */
    cudaEvent_t t0, t1;          /* timing of the run on this GPU */
} dev_state;

/* The buffers of the last run that started well, as the caller gave them, and what was
 * found out about them: a run over the same buffers, with no mapping made or dropped since,
 * skips asking CUDA about each of them again (a pointer query per buffer, hundreds of them
 * for a model registered tensor by tensor). */
typedef struct run_bufs {
    int valid;
    uint64_t gen;                /* cuda_exec.map_gen then */
    uint64_t n_src, n_dst;
    void **src, **dst;           /* [n_src], [n_dst] */
    uint64_t *src_len, *dst_len;
    uint8_t *sel;                /* [n_dst] the destinations its ops and merges wrote */
    int *dev_of;                 /* [n_dst] each one's GPU, or -1 */
} run_bufs;

typedef struct cuda_exec {
    rlb_executor base;
    int n_dev;                   /* visible GPUs */
    cudaUUID_t uuid[EX_MAX_DEV]; /* their uuids */
    dev_state d[EX_MAX_DEV];
    vmm_entry *vmm;              /* imported allocations */
    uint32_t n_vmm, cap_vmm;
    host_range *hr;              /* registered host ranges */
    uint32_t n_hr, cap_hr;
    ev_entry *evs;               /* opened trainer events */
    uint32_t n_ev, cap_ev;
    pthread_t tid;               /* waits for the run's streams */
    int running;                 /* tid started, not joined */
    int done_fd;                 /* the run's eventfd */
    uint64_t *nonfinite;         /* the run's count table, or NULL */
    uint64_t n_ops;              /* its copy ops: merge m counts at [n_ops + m] */
    int rc;                      /* the run's outcome */
    double ms;                   /* its time */
    char err[512];               /* why it failed */
    double t_upload, t_bind;     /* host ms of this run's uploads and binds (debug log) */
    uint64_t map_gen;            /* +1 at every map and unmap */
    run_bufs last;               /* the last run's buffers */
} cuda_exec;

static int grow(void **p, uint32_t *cap, uint32_t need, size_t elem)
{
    if (*cap >= need)
        return 0;
    uint32_t c = *cap ? 2 * *cap : 8;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q)
        return RLB_ENOMEM;
    *p = q;
    *cap = c;
    return 0;
}

static int device_of_uuid(const cuda_exec *x, const uint8_t uuid[16])
{
    for (int i = 0; i < x->n_dev; i++)
        if (memcmp(&x->uuid[i], uuid, 16) == 0)
            return i;
    return -1;
}

static int stream_of(cuda_exec *x, int dev, cudaStream_t *out)
{
    int rc = 0, prev;
    dev_state *s = &x->d[dev];
    if (!s->stream) {
        RLB_CHECK(rlb__cuda_enter(dev, &prev));
        RLB_CUDA_CHECK(cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking), rc, out);
        RLB_CUDA_CHECK(cudaEventCreate(&s->t0), rc, out);
        RLB_CUDA_CHECK(cudaEventCreate(&s->t1), rc, out);
    out:
        rlb__cuda_leave(prev);
    }
    *out = s->stream;
    return rc;
}

/* ---- VMM import ------------------------------------------------------------------------ */

typedef CUresult (*import_fn)(CUmemGenericAllocationHandle *, void *, CUmemAllocationHandleType);
typedef CUresult (*reserve_fn)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
typedef CUresult (*map_fn)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                           unsigned long long);
typedef CUresult (*access_fn)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
typedef CUresult (*unmap_fn)(CUdeviceptr, size_t);
typedef CUresult (*free_va_fn)(CUdeviceptr, size_t);
typedef CUresult (*release_fn)(CUmemGenericAllocationHandle);

static void vmm_drop(vmm_entry *e)
{
    unmap_fn unmap;
    free_va_fn free_va;
    release_fn release;
    uint64_t off = 0;
    if (!rlb__cuda_driver_fn("cuMemUnmap", (void **)&unmap))
        for (uint32_t i = 0; i < e->mapped; off += e->chunk[i], i++)
            unmap(e->va + off, e->chunk[i]);
    if (e->va && !rlb__cuda_driver_fn("cuMemAddressFree", (void **)&free_va))
        free_va(e->va, e->bytes);
    if (!rlb__cuda_driver_fn("cuMemRelease", (void **)&release))
        for (uint32_t i = 0; i < e->n; i++)
            release(e->h[i]);
    free(e->h);
    free(e->chunk);
    memset(e, 0, sizeof *e);
}

/* Whether ref (whose first chunk's fd stats as *st) names the range of e. Every exported
 * chunk is an open of the driver's one device node, so inode and device match across
 * unrelated allocations: the identity is the fd itself, which the caller keeps open from
 * map to unmap (no other file can hold that number meanwhile), checked against the
 * stat and the size for a caller that closed and reused it. */
static int same_range(const vmm_entry *e, const rlb_exec_ref *ref, const struct stat *st)
{
    return e->fd0 == ref->chunk_fds[0] && e->ino == (uint64_t)st->st_ino &&
           e->dev == (uint64_t)st->st_dev && e->rdev == (uint64_t)st->st_rdev &&
           e->alloc == ref->alloc_bytes && e->n == ref->n_chunks;
}

static int vmm_map(cuda_exec *x, const rlb_exec_ref *ref, int dev, void **addr, char *err,
                   size_t errlen)
{
    struct stat st;
    uint64_t sum = 0;
    int ok = ref->n_chunks >= 1 && ref->chunk_fds && ref->chunk_bytes &&
             fstat(ref->chunk_fds[0], &st) == 0;
    for (uint32_t i = 0; ok && i < ref->n_chunks; i++) {
        ok = ref->chunk_bytes[i] > 0 && ref->chunk_fds[i] >= 0;
        sum += ok ? ref->chunk_bytes[i] : 0;
    }
    if (!ok || sum != ref->alloc_bytes || ref->offset + ref->length > sum) {
        rlb__cuda_err(err, errlen, "VMM reference: bad chunks (%u) or range [%llu, +%llu) of "
                      "%llu bytes", ref->n_chunks, (unsigned long long)ref->offset,
                      (unsigned long long)ref->length, (unsigned long long)ref->alloc_bytes);
        return RLB_EINVAL;
    }
    for (uint32_t i = 0; i < x->n_vmm; i++)
        if (same_range(&x->vmm[i], ref, &st)) {
            x->vmm[i].refs++;
            *addr = (char *)(uintptr_t)x->vmm[i].va + ref->offset;
            return 0;
        }
    if (grow((void **)&x->vmm, &x->cap_vmm, x->n_vmm + 1, sizeof *x->vmm))
        return RLB_ENOMEM;
    vmm_entry e = {.fd0 = ref->chunk_fds[0], .ino = (uint64_t)st.st_ino,
                   .dev = (uint64_t)st.st_dev, .rdev = (uint64_t)st.st_rdev,
                   .alloc = ref->alloc_bytes, .bytes = sum,
                   .refs = 1, .h = calloc(ref->n_chunks, sizeof(*e.h)),
                   .chunk = calloc(ref->n_chunks, sizeof(*e.chunk))};
    import_fn import;
    reserve_fn reserve;
    map_fn map;
    access_fn access;
    int rc = RLB_ENOMEM, prev;
    if (!e.h || !e.chunk)
        goto out_nodev;
    rc = 0;
    RLB_CHECK_GOTO(rlb__cuda_enter(dev, &prev), rc, out_nodev);
    RLB_CUDA_CHECK(cudaFree(0), rc, out); /* the device's primary context */
    RLB_CHECK_GOTO(rlb__cuda_driver_fn("cuMemImportFromShareableHandle", (void **)&import), rc,
                   out);
    RLB_CHECK_GOTO(rlb__cuda_driver_fn("cuMemAddressReserve", (void **)&reserve), rc, out);
    RLB_CHECK_GOTO(rlb__cuda_driver_fn("cuMemMap", (void **)&map), rc, out);
    RLB_CHECK_GOTO(rlb__cuda_driver_fn("cuMemSetAccess", (void **)&access), rc, out);
    /* Importing takes its own reference on each chunk: the fds may be closed after. */
    for (; e.n < ref->n_chunks; e.n++) {
        e.chunk[e.n] = ref->chunk_bytes[e.n];
        RLB_CU_CHECK(import(&e.h[e.n], (void *)(uintptr_t)ref->chunk_fds[e.n],
                            CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR), rc, out);
    }
    RLB_CU_CHECK(reserve(&e.va, e.bytes, 0, 0, 0), rc, out);
    for (uint64_t off = 0; e.mapped < e.n; off += e.chunk[e.mapped], e.mapped++)
        RLB_CU_CHECK(map(e.va + off, e.chunk[e.mapped], 0, e.h[e.mapped], 0), rc, out);
    /* Readable and writable from its own GPU and every GPU with a peer path to it. */
    for (int g = 0; g < x->n_dev; g++) {
        int can = g == dev;
        if (!can && cudaDeviceCanAccessPeer(&can, g, dev) != cudaSuccess)
            can = 0;
        if (!can)
            continue;
        CUmemAccessDesc a = {.location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = g},
                             .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
        RLB_CU_CHECK(access(e.va, e.bytes, &a, 1), rc, out);
    }
    x->vmm[x->n_vmm++] = e;
    *addr = (char *)(uintptr_t)e.va + ref->offset;
out:
    rlb__cuda_leave(prev);
out_nodev:
    if (rc) {
        rlb__cuda_err(err, errlen, "cannot import a VMM range of %u chunks, %llu bytes, on "
                      "GPU %d", ref->n_chunks, (unsigned long long)e.bytes, dev);
        vmm_drop(&e);
    }
    return rc;
}

static int vmm_unmap(cuda_exec *x, const rlb_exec_ref *ref)
{
    struct stat st;
    if (ref->n_chunks < 1 || !ref->chunk_fds || fstat(ref->chunk_fds[0], &st) != 0)
        return RLB_EINVAL;
    for (uint32_t i = 0; i < x->n_vmm; i++)
        if (same_range(&x->vmm[i], ref, &st)) {
            if (--x->vmm[i].refs == 0) {
                vmm_drop(&x->vmm[i]);
                x->vmm[i] = x->vmm[--x->n_vmm];
            }
            return 0;
        }
    return RLB_ENOTFOUND;
}

/* ---- Host ranges -------------------------------------------------------------------- */

static int cmp_range(const void *a, const void *b)
{
    const host_range *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

static void host_unregister(host_range *r)
{
    cudaError_t e = cudaHostUnregister(r->lo);
    if (e != cudaSuccess)
        RLB_LOG_WARN(RLB_SUB_KERNEL, "cudaHostUnregister(%p): %s", (void *)r->lo,
                     cudaGetErrorString(e));
}

/* Makes every host buffer of the run readable by the kernels: the byte ranges they cover,
 * merged where they overlap or touch, registered unless a registered range already holds
 * them; ranges no buffer of this run uses are unregistered. Not rounded to pages (see the
 * top of this file): registered memory must not reach into the caller's other buffers. */
static int host_prepare(cuda_exec *x, void *const *ptr, const uint64_t *len, uint64_t n,
                        char *err, size_t errlen)
{
    host_range *want = NULL;
    uint32_t n_want = 0, cap_want = 0;
    int rc = 0;
    for (uint64_t i = 0; i < n; i++) {
        struct cudaPointerAttributes at;
        if (!ptr[i] || !len[i])
            continue;
        if (cudaPointerGetAttributes(&at, ptr[i]) == cudaSuccess &&
            (at.type == cudaMemoryTypeDevice || at.type == cudaMemoryTypeManaged))
            continue;
        cudaGetLastError();
        char *lo = (char *)ptr[i], *hi = lo + len[i];
        if (grow((void **)&want, &cap_want, n_want + 1, sizeof *want)) {
            free(want);
            return RLB_ENOMEM;
        }
        want[n_want++] = (host_range){lo, hi, 1};
    }
    qsort(want, n_want, sizeof *want, cmp_range);
    uint32_t m = 0;
    for (uint32_t i = 0; i < n_want; i++) {
        if (m && want[i].lo <= want[m - 1].hi) {
            if (want[i].hi > want[m - 1].hi)
                want[m - 1].hi = want[i].hi;
        } else {
            want[m++] = want[i];
        }
    }
    for (uint32_t j = 0; j < x->n_hr; j++)
        x->hr[j].used = 0;
    for (uint32_t i = 0; i < m && !rc; i++) {
        uint32_t j;
        for (j = 0; j < x->n_hr; j++)
            if (x->hr[j].lo <= want[i].lo && want[i].hi <= x->hr[j].hi)
                break;
        if (j < x->n_hr) {
            x->hr[j].used = 1;
            continue;
        }
        /* A registered range overlapping this one must go first (registrations may not
         * overlap); nothing is in flight between runs. */
        for (j = 0; j < x->n_hr;)
            if (x->hr[j].lo < want[i].hi && want[i].lo < x->hr[j].hi) {
                host_unregister(&x->hr[j]);
                x->hr[j] = x->hr[--x->n_hr];
            } else {
                j++;
            }
        if (grow((void **)&x->hr, &x->cap_hr, x->n_hr + 1, sizeof *x->hr)) {
            rc = RLB_ENOMEM;
            break;
        }
        cudaError_t e = cudaHostRegister(want[i].lo, (size_t)(want[i].hi - want[i].lo),
                                         cudaHostRegisterMapped | cudaHostRegisterPortable);
        if (e != cudaSuccess) {
            rlb__cuda_err(err, errlen, "cannot register host memory [%p, %p) for the GPU: %s",
                          (void *)want[i].lo, (void *)want[i].hi, cudaGetErrorString(e));
            rc = e == cudaErrorMemoryAllocation ? RLB_ENOMEM : RLB_ECUDA;
            break;
        }
        x->hr[x->n_hr++] = want[i];
    }
    for (uint32_t j = 0; j < x->n_hr && !rc;)
        if (!x->hr[j].used) {
            host_unregister(&x->hr[j]);
            x->hr[j] = x->hr[--x->n_hr];
        } else {
            j++;
        }
    free(want);
    return rc;
}

/* ---- The interface ------------------------------------------------------------------- */

static int cuda_fence(rlb_executor *b)
{
    cuda_exec *x = (cuda_exec *)b;
    if (x->running) {
        pthread_join(x->tid, NULL);
        x->running = 0;
    }
    return 0;
}

static int cuda_map(rlb_executor *b, const rlb_exec_ref *ref, void **addr, char *err,
                    size_t errlen)
{
    cuda_exec *x = (cuda_exec *)b;
    x->map_gen++;
    if (ref->kind == 0) {
        if (!ref->host)
            return RLB_EINVAL;
        *addr = (char *)ref->host + ref->offset; /* registered when a run reads it */
        return 0;
    }
    int dev = device_of_uuid(x, ref->device_uuid);
    if (dev < 0) {
        rlb__cuda_err(err, errlen, "no visible GPU has the uuid of the referenced memory");
        return RLB_ENOTFOUND;
    }
    if (ref->kind == 2)
        return vmm_map(x, ref, dev, addr, err, errlen);
    if (ref->kind != 1)
        return RLB_EINVAL;
    if (!x->d[dev].ipc)
        RLB_CHECK(rlb__cuda_ipc_cache_create(dev, &x->d[dev].ipc));
    rlb_cuda_ipc_ref r = {.offset = ref->offset, .length = ref->length};
    memcpy(r.handle, ref->ipc_handle, sizeof r.handle);
    memcpy(r.device_uuid, ref->device_uuid, sizeof r.device_uuid);
    return rlb__cuda_ipc_map(x->d[dev].ipc, &r, addr, err, errlen);
}

static int cuda_unmap(rlb_executor *b, const rlb_exec_ref *ref, void *addr)
{
    cuda_exec *x = (cuda_exec *)b;
    cuda_fence(b);
    x->map_gen++;
    if (ref->kind == 0) {
        char *lo = ref->host, *hi = (char *)ref->host + ref->offset + ref->length;
        for (uint32_t j = 0; j < x->n_hr;)
            if (x->hr[j].lo < hi && lo < x->hr[j].hi) {
                host_unregister(&x->hr[j]);
                x->hr[j] = x->hr[--x->n_hr];
            } else {
                j++;
            }
        return 0;
    }
    if (ref->kind == 2)
        return vmm_unmap(x, ref);
    int dev = device_of_uuid(x, ref->device_uuid);
    if (dev < 0 || !x->d[dev].ipc)
        return RLB_ENOTFOUND;
    rlb_cuda_ipc_ref r = {.offset = ref->offset, .length = ref->length};
    memcpy(r.handle, ref->ipc_handle, sizeof r.handle);
    memcpy(r.device_uuid, ref->device_uuid, sizeof r.device_uuid);
    return rlb__cuda_ipc_unmap(x->d[dev].ipc, &r);
}

static void *wait_thread(void *arg)
{
    cuda_exec *x = arg;
    float worst = 0;
    for (int g = 0; g < x->n_dev; g++) {
        dev_state *s = &x->d[g];
        if (!s->used)
            continue;
        cudaError_t e = cudaStreamSynchronize(s->stream);
        if (e != cudaSuccess && x->rc == 0) {
            snprintf(x->err, sizeof x->err, "the copy%s on GPU %d failed: %s",
                     s->lora ? " or a LoRA merge" : "", g, cudaGetErrorString(e));
            x->rc = RLB_ECUDA;
        }
        float ms = 0;
        if (e == cudaSuccess && cudaEventElapsedTime(&ms, s->t0, s->t1) == cudaSuccess &&
            ms > worst)
            worst = ms;
        if (e == cudaSuccess && x->nonfinite) {
            rlb__cuda_plan_counts(s->plan, x->nonfinite);
            rlb__cuda_lora_counts(s->lora, x->nonfinite + x->n_ops);
        }
    }
    x->ms = worst;
    uint64_t one = 1;
    /* The last touch of x by this thread; finish joins before reading x. */
    ssize_t n = write(x->done_fd, &one, sizeof(one));
    (void)n;
    return NULL;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ c[i]) * UINT64_C(0x100000001b3);
    return h;
}

/* The trainer event of `handle`, opened once. */
static int event_of(cuda_exec *x, const uint8_t handle[64], cudaEvent_t *ev)
{
    for (uint32_t i = 0; i < x->n_ev; i++)
        if (memcmp(x->evs[i].handle, handle, 64) == 0) {
            *ev = x->evs[i].ev;
            return 0;
        }
    if (grow((void **)&x->evs, &x->cap_ev, x->n_ev + 1, sizeof *x->evs))
        return RLB_ENOMEM;
    rlb_cuda_ipc_event h;
    memcpy(h.handle, handle, 64);
    ev_entry e = {.dev = 0};
    memcpy(e.handle, handle, 64);
    RLB_CHECK(rlb__cuda_event_open_ipc(&h, &e.ev));
    x->evs[x->n_ev++] = e;
    *ev = e.ev;
    return 0;
}

/* Uploads to GPU g what it runs of plan p for the destinations sel (its copy ops, and its
 * merges with theirs), unless the same is uploaded already. */
static int upload_on(dev_state *s, int g, const rlb_plan *p, const uint8_t *sel, char *err,
                     size_t errlen)
{
    uint64_t h = fnv(UINT64_C(0xcbf29ce484222325), sel, p->n_dst);
    h = fnv(h, p->src_bytes, p->n_src * sizeof(*p->src_bytes));
    h = fnv(h, p->dst_bytes, p->n_dst * sizeof(*p->dst_bytes));
    uint64_t hc = fnv(h, p->ops, p->n_ops * sizeof(*p->ops));
    if (!s->plan || s->plan_hash != hc) {
        /* The copies alone: the merges' base copies run inside the merges. */
        rlb_plan copies = {.n_src = p->n_src, .n_dst = p->n_dst, .src_bytes = p->src_bytes,
                           .dst_bytes = p->dst_bytes, .n_ops = p->n_ops, .ops = p->ops};
        rlb__cuda_plan_free(s->plan);
        s->plan = NULL;
        RLB_CHECK(rlb__cuda_plan_upload(&copies, g, sel, &s->plan, err, errlen));
        s->plan_hash = hc;
        s->bound = 0;
    }
    uint64_t hl = fnv(h, p->merges, p->n_merges * sizeof(*p->merges));
    hl = fnv(hl, p->merge_copies, p->n_merge_copies * sizeof(*p->merge_copies));
    hl = fnv(hl, p->stage_ops, p->n_stage_ops * sizeof(*p->stage_ops));
    hl = fnv(hl, &p->stage_bytes, sizeof(p->stage_bytes));
    if (s->lora_hash != hl) {
        rlb__cuda_lora_free(s->lora);
        s->lora = NULL;
        s->lora_hash = 0;
        RLB_CHECK(rlb__cuda_lora_upload(p, g, sel, &s->lora, err, errlen));
        s->lora_hash = hl;
        s->bound = 0;
    }
    return 0;
}

/* Launches GPU g's bound plan and merges on st after the trainers' events. */
static int launch_bound(cuda_exec *x, dev_state *s, int g, cudaStream_t st,
                        const rlb_exec_run *run)
{
    int rc = 0, prev;
    RLB_CHECK(rlb__cuda_enter(g, &prev));
    for (uint32_t e = 0; e < run->n_events; e++) {
        cudaEvent_t ev;
        RLB_CHECK_GOTO(event_of(x, run->events[e], &ev), rc, out);
        RLB_CUDA_CHECK(cudaStreamWaitEvent(st, ev, 0), rc, out);
    }
    s->used = 1; /* from here on, a failure waits for what was launched (the copies, when
                  * the merges fail to launch) before the caller sees it */
    RLB_CUDA_CHECK(cudaEventRecord(s->t0, st), rc, out);
    RLB_CHECK_GOTO(rlb__cuda_plan_run(s->plan, st), rc, out);
    if (s->lora)
        RLB_CHECK_GOTO(rlb__cuda_lora_run(s->lora, st), rc, out);
    RLB_CUDA_CHECK(cudaEventRecord(s->t1, st), rc, out);
out:
    rlb__cuda_leave(prev);
    return rc;
}

/* Launches the ops and merges of the destinations on GPU g; `same`: the run's buffers are
 * the last run's (run_bufs), so what is bound to them stays. */
static int launch_on(cuda_exec *x, int g, const rlb_exec_run *run, const uint8_t *sel, int same,
                     char *err, size_t errlen)
{
    const rlb_plan *p = run->plan;
    dev_state *s = &x->d[g];
    int rc = 0;
    cudaStream_t st;
    RLB_CHECK(stream_of(x, g, &st));
    double t0 = rlb__clock_ms_f();
    RLB_CHECK(upload_on(s, g, p, sel, err, errlen));
    double t1 = rlb__clock_ms_f();
    x->t_upload += t1 - t0;
    RLB_CHECK(rlb__cuda_plan_count(s->plan, run->nonfinite != NULL));
    if (same && s->bound)
        return launch_bound(x, s, g, st, run);
    s->bound = 0;
    rlb_cuda_buf *src = calloc(p->n_src + 1, sizeof *src);
    rlb_cuda_buf *dst = calloc(p->n_dst + 1, sizeof *dst);
    if (!src || !dst) {
        free(src);
        free(dst);
        return RLB_ENOMEM;
    }
    for (uint64_t i = 0; i < p->n_src; i++) {
        void *hp = run->src[i];
        /* Registered host memory: the device's view of it (the same address with UVA). */
        if (hp && cudaHostGetDevicePointer(&hp, run->src[i], 0) != cudaSuccess) {
            cudaGetLastError();
            hp = run->src[i];
        }
        src[i] = (rlb_cuda_buf){hp, run->src_len[i]};
    }
    for (uint64_t d = 0; d < p->n_dst; d++)
        dst[d] = (rlb_cuda_buf){sel[d] ? run->dst[d] : NULL, sel[d] ? run->dst_len[d] : 0};
    RLB_CHECK_GOTO(rlb__cuda_plan_bind(s->plan, src, dst, err, errlen), rc, out_nodev);
    if (s->lora) {
        RLB_CHECK_GOTO(rlb__cuda_lora_bind(s->lora, src, dst, err, errlen), rc, out_nodev);
        static const char *const how[] = {"separately", "fused, in multiply-adds",
                                          "fused, on tensor cores",
                                          "fused, on tensor cores, or as cuBLASLt products"};
        RLB_LOG_DEBUG(RLB_SUB_KERNEL, "GPU %d: %llu LoRA merges, written %s (%llu products)", g,
                      (unsigned long long)rlb__cuda_lora_merges(s->lora),
                      how[rlb__cuda_lora_mode(s->lora)],
                      (unsigned long long)rlb__cuda_lora_products(s->lora));
    }
    s->bound = 1;
    x->t_bind += rlb__clock_ms_f() - t1;
    rc = launch_bound(x, s, g, st, run);
out_nodev:
    free(src);
    free(dst);
    return rc;
}

static void bufs_free(run_bufs *l)
{
    free(l->src);
    free(l->dst);
    free(l->src_len);
    free(l->dst_len);
    free(l->sel);
    free(l->dev_of);
    memset(l, 0, sizeof(*l));
}

/* 1 when run's buffers are the last run's, written alike (sel), with no mapping made or
 * dropped since. */
static int same_bufs(const cuda_exec *x, const rlb_exec_run *run, const uint8_t *sel)
{
    const run_bufs *l = &x->last;
    const rlb_plan *p = run->plan;
    return l->valid && l->gen == x->map_gen && l->n_src == p->n_src && l->n_dst == p->n_dst &&
           !memcmp(l->sel, sel, p->n_dst) &&
           !memcmp(l->src, run->src, p->n_src * sizeof(*l->src)) &&
           !memcmp(l->src_len, run->src_len, p->n_src * sizeof(*l->src_len)) &&
           !memcmp(l->dst, run->dst, p->n_dst * sizeof(*l->dst)) &&
           !memcmp(l->dst_len, run->dst_len, p->n_dst * sizeof(*l->dst_len));
}

/* Keeps run's buffers and their GPUs for the next run (none kept when out of memory). */
static void keep_bufs(cuda_exec *x, const rlb_exec_run *run, const uint8_t *sel,
                      const int *dev_of)
{
    run_bufs *l = &x->last;
    const rlb_plan *p = run->plan;
    bufs_free(l);
    l->src = malloc((p->n_src + 1) * sizeof(*l->src));
    l->src_len = malloc((p->n_src + 1) * sizeof(*l->src_len));
    l->dst = malloc((p->n_dst + 1) * sizeof(*l->dst));
    l->dst_len = malloc((p->n_dst + 1) * sizeof(*l->dst_len));
    l->sel = malloc(p->n_dst + 1);
    l->dev_of = malloc((p->n_dst + 1) * sizeof(*l->dev_of));
    if (!l->src || !l->src_len || !l->dst || !l->dst_len || !l->sel || !l->dev_of) {
        bufs_free(l);
        return;
    }
    memcpy(l->src, run->src, p->n_src * sizeof(*l->src));
    memcpy(l->src_len, run->src_len, p->n_src * sizeof(*l->src_len));
    memcpy(l->dst, run->dst, p->n_dst * sizeof(*l->dst));
    memcpy(l->dst_len, run->dst_len, p->n_dst * sizeof(*l->dst_len));
    memcpy(l->sel, sel, p->n_dst);
    memcpy(l->dev_of, dev_of, p->n_dst * sizeof(*l->dev_of));
    l->n_src = p->n_src;
    l->n_dst = p->n_dst;
    l->gen = x->map_gen;
    l->valid = 1;
}

static int cuda_run(rlb_executor *b, const rlb_exec_run *run, char *err, size_t errlen)
{
    cuda_exec *x = (cuda_exec *)b;
    const rlb_plan *p = run->plan;
    if (x->running) {
        rlb__cuda_err(err, errlen, "a run is already in flight");
        return RLB_EEXIST;
    }
    const double t0 = rlb__clock_ms_f();
    x->t_upload = x->t_bind = 0;
    /* Destinations by GPU; the plan runs where its destinations are. */
    uint8_t *sel = calloc(p->n_dst + 1, 1), *wrote = calloc(p->n_dst + 1, 1);
    int *dev_of = calloc(p->n_dst + 1, sizeof *dev_of);
    if (!sel || !wrote || !dev_of) {
        free(sel);
        free(wrote);
        free(dev_of);
        return RLB_ENOMEM;
    }
    /* Destinations an op or a merge writes, found from the ops themselves: a caller's view
     * of a plan may keep the whole plan's dst_first_op over fewer ops (the bridge's does). */
    for (uint64_t i = 0; i < p->n_ops; i++)
        if (p->ops[i].dst_ref < p->n_dst)
            sel[p->ops[i].dst_ref] = 1;
    for (uint64_t m = 0; m < p->n_merges; m++)
        if (p->merges[m].dst_ref < p->n_dst)
            sel[p->merges[m].dst_ref] = 1;
    memcpy(wrote, sel, p->n_dst); /* sel is then each GPU's share in turn */
    const int same = same_bufs(x, run, wrote);
    x->last.valid = 0; /* until this run started well */
    int rc = same ? 0 : host_prepare(x, (void *const *)run->src, run->src_len, p->n_src, err,
                                     errlen);
    if (rc) {
        free(sel);
        free(wrote);
        free(dev_of);
        return rc;
    }
    const double t_prepared = rlb__clock_ms_f();
    if (run->nonfinite)
        memset(run->nonfinite, 0, (p->n_ops + p->n_merges) * sizeof(*run->nonfinite));
    x->nonfinite = run->nonfinite;
    x->n_ops = p->n_ops;
    if (same)
        memcpy(dev_of, x->last.dev_of, p->n_dst * sizeof(*dev_of));
    for (uint64_t d = 0; d < p->n_dst && !rc && !same; d++) {
        dev_of[d] = -1;
        if (!run->dst[d] || !sel[d])
            continue;
        struct cudaPointerAttributes at;
        if (cudaPointerGetAttributes(&at, run->dst[d]) != cudaSuccess ||
            at.type != cudaMemoryTypeDevice) {
            cudaGetLastError();
            rlb__cuda_err(err, errlen, "destination %llu is not GPU memory: the CUDA executor "
                          "writes GPU workers' buffers only", (unsigned long long)d);
            rc = RLB_EUNSUPPORTED;
        } else {
            dev_of[d] = at.device;
        }
    }
    x->rc = 0;
    x->err[0] = 0;
    x->ms = 0;
    for (int g = 0; g < x->n_dev; g++)
        x->d[g].used = 0;
    const double t_located = rlb__clock_ms_f();
    for (int g = 0; g < x->n_dev && !rc; g++) {
        int any = 0;
        for (uint64_t d = 0; d < p->n_dst; d++)
            any |= (sel[d] = dev_of[d] == g);
        if (any)
            rc = launch_on(x, g, run, sel, same, err, errlen);
    }
    if (rc == 0 && same)
        x->last.valid = 1;
    else if (rc == 0)
        keep_bufs(x, run, wrote, dev_of);
    free(sel);
    free(wrote);
    free(dev_of);
    x->done_fd = run->done_fd;
    if (rc) {
        /* Whatever was launched must end before the caller sees the failure. */
        for (int g = 0; g < x->n_dev; g++)
            if (x->d[g].used)
                cudaStreamSynchronize(x->d[g].stream);
        return rc;
    }
    if (pthread_create(&x->tid, NULL, wait_thread, x) != 0) {
        for (int g = 0; g < x->n_dev; g++)
            if (x->d[g].used)
                cudaStreamSynchronize(x->d[g].stream);
        rlb__cuda_err(err, errlen, "cannot start the waiting thread");
        return RLB_EIO;
    }
    x->running = 1;
    const double t_end = rlb__clock_ms_f();
    RLB_LOG_DEBUG(RLB_SUB_KERNEL, "cuda run of %llu ops: %.3f ms on the host (host ranges "
                  "%.3f, locating destinations %.3f, upload %.3f, bind %.3f, launches and "
                  "waiting thread %.3f)%s", (unsigned long long)p->n_ops, t_end - t0,
                  t_prepared - t0, t_located - t_prepared, x->t_upload, x->t_bind,
                  t_end - t_located - x->t_upload - x->t_bind,
                  same ? ", the last run's buffers: nothing asked again, nothing bound" : "");
    return 0;
}

static int cuda_finish(rlb_executor *b, double *ms, char *err, size_t errlen)
{
    cuda_exec *x = (cuda_exec *)b;
    cuda_fence(b);
    if (ms)
        *ms = x->ms;
    if (x->rc < 0 && err && errlen)
        snprintf(err, errlen, "%s", x->err);
    return x->rc;
}

static void cuda_destroy(rlb_executor *b)
{
    cuda_exec *x = (cuda_exec *)b;
    if (!x)
        return;
    cuda_fence(b);
    bufs_free(&x->last);
    for (uint32_t j = 0; j < x->n_hr; j++)
        host_unregister(&x->hr[j]);
    for (uint32_t i = 0; i < x->n_vmm; i++)
        vmm_drop(&x->vmm[i]);
    for (uint32_t i = 0; i < x->n_ev; i++)
        cudaEventDestroy(x->evs[i].ev);
    for (int g = 0; g < x->n_dev; g++) {
        dev_state *s = &x->d[g];
        rlb__cuda_plan_free(s->plan);
        rlb__cuda_lora_free(s->lora);
        rlb__cuda_ipc_cache_destroy(s->ipc);
        if (s->stream) {
            cudaStreamDestroy(s->stream);
            cudaEventDestroy(s->t0);
            cudaEventDestroy(s->t1);
        }
    }
    free(x->hr);
    free(x->vmm);
    free(x->evs);
    free(x);
}

static const rlb_executor_iface_v1 cuda_exec_iface = {
    .name = "cuda",
    .destroy = cuda_destroy,
    .map = cuda_map,
    .unmap = cuda_unmap,
    .run = cuda_run,
    .finish = cuda_finish,
    .fence = cuda_fence,
};

int rlb__executor_cuda_create(rlb_executor **out, char *err, size_t errlen)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
        cudaGetLastError();
        rlb__cuda_err(err, errlen, "no GPU is visible");
        return RLB_EUNSUPPORTED;
    }
    cuda_exec *x = calloc(1, sizeof *x);
    if (!x)
        return RLB_ENOMEM;
    x->base.iface = &cuda_exec_iface;
    x->n_dev = n < EX_MAX_DEV ? n : EX_MAX_DEV;
    for (int g = 0; g < x->n_dev; g++) {
        struct cudaDeviceProp prop;
        if (cudaGetDeviceProperties(&prop, g) != cudaSuccess) {
            free(x);
            return RLB_ECUDA;
        }
        x->uuid[g] = prop.uuid;
    }
    *out = &x->base;
    return 0;
}
