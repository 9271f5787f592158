/* test_client_cuda: librlb's device tensors (client/cuda.c) against a fake bridge process
 * that imports them the way a bridge must (DESIGN §3, segmsg.h, proto.h publish event).
 *
 *   ipc       cudaMalloc-style memory (cuMemAlloc): two tensors of one allocation export
 *             one CUDA IPC handle with their offsets; the bridge opens it once, waits on
 *             the publish event, reads each tensor's first float (the version) and closes
 *             the handle at the unregister, before it answers.
 *   vmm       cuMemCreate memory: two physical chunks mapped back to back, a tensor across
 *             the boundary and one inside the first chunk: one SEGV segment of two fds,
 *             imported into a reservation of the same layout.
 *   staged    RLB_CUDA_IPC=off: the tensors go as host memory (a shadow segment) filled at
 *             publish.
 *   refusals  a host pointer and a pointer of another GPU ordinal, named in the error.
 * Each kind runs ROUNDS rounds of register, publish, unregister, free right after the
 * unregister returned; the client's free device memory (cuMemGetInfo) must come back to
 * its baseline: a mapping the bridge kept would keep every freed allocation alive
 * (ROUNDS * 4 MiB, far above the slack), so a leak in the close path fails the test.
 *
 * The driver is dlopen'ed (nothing links libcuda), the fake bridge is forked before the
 * parent touches CUDA; exits 77 where no GPU is visible.
 */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda.h>

#include "common/conn.h"
#include "common/proto.h"
#include "common/ring.h"
#include "common/segmsg.h"
#include "common/shm.h"
#include "rlb/rlb.h"

#define ROUNDS 1000
#define ALLOC (4u << 20)
#define SLACK (64ull << 20) /* drift of free memory tolerated (other processes) */
#define MAX_T 8
#define MAX_S 8

#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: %s: ", __FILE__, __LINE__, #cond);                     \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fputc('\n', stderr);                                                           \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)
#define CU(call) CHECK((call) == CUDA_SUCCESS, "%s", #call)

/* ---- the driver, by dlsym (cuda.h's names map to the versioned symbols) ------------- */

#define STR_(x) #x
#define STR(x) STR_(x)
#define DRIVER_FNS(X)                                                                      \
    X(cuInit) X(cuDeviceGetCount) X(cuDeviceGet) X(cuDevicePrimaryCtxRetain)               \
    X(cuCtxSetCurrent) X(cuMemAlloc) X(cuMemFree) X(cuMemsetD32) X(cuMemGetInfo)           \
    X(cuMemcpyDtoH) X(cuMemCreate) X(cuMemRelease) X(cuMemAddressReserve)                  \
    X(cuMemAddressFree) X(cuMemMap) X(cuMemUnmap) X(cuMemSetAccess)                        \
    X(cuMemGetAllocationGranularity) X(cuMemImportFromShareableHandle)                      \
    X(cuIpcOpenMemHandle) X(cuIpcCloseMemHandle) X(cuIpcOpenEventHandle)                   \
    X(cuStreamWaitEvent) X(cuCtxSynchronize)
#define DECLARE(fn) static __typeof__(&fn) p_##fn;
DRIVER_FNS(DECLARE)

static int driver_load(void)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib)
        return -1;
#define LOAD(fn)                                                                           \
    if (!(*(void **)&p_##fn = dlsym(lib, STR(fn))))                                        \
        return -1;
    DRIVER_FNS(LOAD)
    return p_cuInit(0) == CUDA_SUCCESS ? 0 : -1;
}

static int dev_ordinal; /* GPU 0 */

static void use_gpu(void)
{
    CUdevice dev;
    CUcontext ctx;
    CU(p_cuDeviceGet(&dev, dev_ordinal));
    CU(p_cuDevicePrimaryCtxRetain(&ctx, dev));
    CU(p_cuCtxSetCurrent(ctx));
}

/* ---- the fake bridge ------------------------------------------------------------------ */

typedef struct fseg {
    uint32_t id;
    int vmm;            /* 1: a reservation with imported chunks, 0: host shm */
    CUdeviceptr va;     /* vmm */
    void *host;         /* host */
    uint64_t bytes;
} fseg;

typedef struct ftensor {
    char name[64];
    rlb_mem_ref mem;
    CUdeviceptr dptr;   /* device tensors */
    const void *hptr;   /* host tensors */
} ftensor;

typedef struct fake {
    rlb_conn *conn;
    rlb_ring_rx rx;
    fseg segs[MAX_S];
    int n_segs;
    ftensor t[MAX_T];
    int n_t;
    CUdeviceptr ipc_base; /* the one open IPC handle, 0 = none */
    uint8_t ipc_handle[64];
    CUevent ev;           /* the client's publish event, opened once */
} fake;

static void reply(fake *f, const rlb_msg *m)
{
    static char buf[1 << 16];
    size_t len;
    CHECK(rlb__msg_pack(m, buf, sizeof(buf), &len) == 0, "pack");
    CHECK(rlb__ring_send(rlb__conn_tx(f->conn), m->type, buf, len, 5000) == 0, "send");
}

static fseg *seg_find(fake *f, uint32_t id)
{
    for (int i = 0; i < f->n_segs; i++)
        if (f->segs[i].id == id)
            return &f->segs[i];
    return NULL;
}

/* Takes every segment datagram waiting: host shm, or a VMM run of chunk fds. */
static void drain(fake *f)
{
    for (;;) {
        struct {
            rlb__seg_msg h;
            uint64_t sizes[RLB_SEG_VMM_MAX_CHUNKS];
        } m;
        size_t len;
        int fds[RLB_CONN_MAX_FDS], nfds;
        if (rlb__conn_recv_fds(f->conn, &m, sizeof(m), &len, fds, RLB_CONN_MAX_FDS, &nfds, 0))
            return;
        CHECK(!seg_find(f, m.h.id) && f->n_segs < MAX_S, "segment %u sent twice", m.h.id);
        fseg *s = &f->segs[f->n_segs++];
        *s = (fseg){.id = m.h.id, .bytes = m.h.bytes};
        if (m.h.magic == RLB_SEG_MAGIC) {
            CHECK(nfds == 1, "host segment with %d fds", nfds);
            CHECK(rlb__shm_map(fds[0], m.h.bytes, &s->host) == 0, "map");
            close(fds[0]);
            continue;
        }
        CHECK(m.h.magic == RLB_SEG_MAGIC_VMM && len == sizeof(m.h) + 8 * (size_t)nfds,
              "bad VMM segment message (%zu bytes, %d fds)", len, nfds);
        s->vmm = 1;
        CU(p_cuMemAddressReserve(&s->va, m.h.bytes, 0, 0, 0));
        uint64_t off = 0;
        for (int i = 0; i < nfds; i++) {
            CUmemGenericAllocationHandle h;
            CU(p_cuMemImportFromShareableHandle(&h, (void *)(uintptr_t)fds[i],
                                                CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR));
            CU(p_cuMemMap(s->va + off, m.sizes[i], 0, h, 0));
            CU(p_cuMemRelease(h)); /* the mapping holds the memory */
            close(fds[i]);
            off += m.sizes[i];
        }
        CHECK(off == m.h.bytes, "chunks hold %llu of %llu bytes", (unsigned long long)off,
              (unsigned long long)m.h.bytes);
        CUmemAccessDesc acc = {.location = {.type = CU_MEM_LOCATION_TYPE_DEVICE,
                                            .id = dev_ordinal},
                               .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
        CU(p_cuMemSetAccess(s->va, m.h.bytes, &acc, 1));
    }
}

static void on_register(fake *f, const rlb_msg_register *r)
{
    drain(f);
    for (uint32_t i = 0; i < r->n_tensors; i++) {
        const rlb_msg_tensor *m = &r->tensors[i];
        CHECK(f->n_t < MAX_T, "too many tensors");
        ftensor *t = &f->t[f->n_t++];
        *t = (ftensor){.mem = m->mem};
        snprintf(t->name, sizeof(t->name), "%s", m->name);
        if (m->mem.kind == RLB_MEM_CUDA_IPC) {
            if (!f->ipc_base) {
                CU(p_cuIpcOpenMemHandle(&f->ipc_base, *(CUipcMemHandle *)m->mem.ipc_handle,
                                        CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS));
                memcpy(f->ipc_handle, m->mem.ipc_handle, 64);
            }
            CHECK(!memcmp(f->ipc_handle, m->mem.ipc_handle, 64), "%s: another handle",
                  m->name);
            t->dptr = f->ipc_base + m->mem.offset;
        } else {
            fseg *s = seg_find(f, m->mem.fd_index);
            CHECK(s && m->mem.offset + m->mem.length <= s->bytes, "%s: segment %u", m->name,
                  m->mem.fd_index);
            CHECK(s->vmm == (m->mem.kind == RLB_MEM_CUDA_VMM_FD), "%s: kind", m->name);
            if (s->vmm)
                t->dptr = s->va + m->mem.offset;
            else
                t->hptr = (const char *)s->host + m->mem.offset;
        }
    }
}

/* Closes what no tensor uses any more: the IPC handle, VMM reservations, host maps. */
static void release_unused(fake *f)
{
    int ipc_used = 0;
    for (int k = 0; k < f->n_t; k++)
        ipc_used |= f->t[k].mem.kind == RLB_MEM_CUDA_IPC;
    if (!ipc_used && f->ipc_base) {
        CU(p_cuCtxSynchronize()); /* the fence: no read of it is in flight */
        CU(p_cuIpcCloseMemHandle(f->ipc_base));
        f->ipc_base = 0;
    }
    for (int i = 0; i < f->n_segs;) {
        int used = 0;
        for (int k = 0; k < f->n_t; k++)
            used |= f->t[k].mem.kind != RLB_MEM_CUDA_IPC && f->t[k].mem.fd_index == f->segs[i].id;
        if (used) {
            i++;
            continue;
        }
        fseg *s = &f->segs[i];
        if (s->vmm) {
            CU(p_cuCtxSynchronize());
            CU(p_cuMemUnmap(s->va, s->bytes));
            CU(p_cuMemAddressFree(s->va, s->bytes));
        } else {
            rlb__shm_unmap(s->host, s->bytes);
        }
        *s = f->segs[--f->n_segs];
    }
}

static void on_unregister(fake *f)
{
    uint32_t n = (uint32_t)f->n_t;
    f->n_t = 0; /* the client always unregisters everything here */
    release_unused(f);
    rlb_msg ack = {.type = RLB_MSG_UNREGISTERED, .unregistered = {.n_tensors = n}};
    reply(f, &ack);
}

static void on_publish(fake *f, const rlb_msg_publish *p)
{
    static const uint8_t zero[64];
    int has_ev = memcmp(p->event, zero, 64) != 0;
    int device = 0;
    for (int k = 0; k < f->n_t; k++)
        device |= f->t[k].dptr != 0;
    CHECK(has_ev == device, "publish event %s for %s tensors", has_ev ? "sent" : "missing",
          device ? "device" : "host");
    if (has_ev) {
        if (!f->ev)
            CU(p_cuIpcOpenEventHandle(&f->ev, *(CUipcEventHandle *)p->event));
        CU(p_cuStreamWaitEvent(NULL, f->ev, 0)); /* reads below are ordered after it */
    }
    char bad[160] = "";
    for (int k = 0; k < f->n_t && !bad[0]; k++) {
        float x;
        if (f->t[k].dptr)
            CU(p_cuMemcpyDtoH(&x, f->t[k].dptr, 4));
        else
            memcpy(&x, f->t[k].hptr, 4);
        if (x != (float)p->version)
            snprintf(bad, sizeof(bad), "%s holds %g, not %llu", f->t[k].name, x,
                     (unsigned long long)p->version);
    }
    rlb_msg m = bad[0] ? (rlb_msg){.type = RLB_MSG_ABORTED,
                                   .aborted = {.version = p->version, .code = RLB_ECORRUPT,
                                               .text = bad}}
                       : (rlb_msg){.type = RLB_MSG_SYNCED,
                                   .synced = {.version = p->version, .bytes = 1}};
    reply(f, &m);
}

static void fake_bridge(const char *path)
{
    alarm(300);
    rlb_listener *l;
    fake f = {.rx = {.max_msg = 1u << 24}};
    CHECK(rlb__listener_open(path, 1u << 20, &l) == 0, "listen");
    CHECK(driver_load() == 0, "driver");
    use_gpu();
    for (int clients = 0; clients < 2;) { /* the test connects twice */
        if (!f.conn) {
            if (rlb__listener_accept(l, &f.conn) != 0)
                usleep(1000);
            continue;
        }
        rlb_ring_msg rm;
        int rc = rlb__ring_recv(rlb__conn_rx(f.conn), &f.rx, 50, &rm);
        if (rc == RLB_EPEERDEAD) {
            f.n_t = 0;
            release_unused(&f);
            rlb__conn_close(f.conn);
            f.conn = NULL;
            rlb__ring_rx_free(&f.rx);
            f.rx = (rlb_ring_rx){.max_msg = 1u << 24};
            clients++;
            continue;
        }
        if (rc < 0)
            continue;
        rlb_msg m;
        char err[128];
        CHECK(rlb__msg_decode(rm.data, rm.len, &m, err, sizeof(err)) == 0, "%s", err);
        switch (m.type) {
        case RLB_MSG_HELLO: {
            rlb_msg w = {.type = RLB_MSG_WELCOME, .welcome = {.abi_version = RLB_ABI_VERSION}};
            reply(&f, &w);
            break;
        }
        case RLB_MSG_REGISTER: on_register(&f, &m.reg); break;
        case RLB_MSG_UNREGISTER: on_unregister(&f); break;
        case RLB_MSG_PUBLISH: on_publish(&f, &m.publish); break;
        case RLB_MSG_STATS: {
            rlb_msg r = {.type = RLB_MSG_STATS_REPLY, .stats_reply = {.request_id = m.stats.request_id}};
            reply(&f, &r);
            break;
        }
        default: CHECK(0, "unexpected %s", rlb__msg_type_name(m.type));
        }
        rlb__msg_free(&m);
        rlb__ring_recv_done(rlb__conn_rx(f.conn), &f.rx);
    }
    rlb__listener_close(l);
    exit(0);
}

/* ---- the trainer ------------------------------------------------------------------------ */

static rlb_tensor_desc dev_desc(const char *name, CUdeviceptr p, uint64_t floats)
{
    rlb_tensor_desc d;
    rlb_tensor_desc_init(&d);
    d.name = name;
    d.ndim = 1;
    d.shape[0] = floats;
    d.data = (const void *)(uintptr_t)p;
    d.device = RLB_DEVICE_CUDA;
    d.cuda_device = dev_ordinal;
    return d;
}

/* Writes version into the first float of each tensor (on the legacy stream, which the
 * publish's event is recorded on). */
static void fill(const rlb_tensor_desc *d, int n, uint64_t version)
{
    float v = (float)version;
    unsigned bits;
    memcpy(&bits, &v, 4);
    for (int i = 0; i < n; i++)
        CU(p_cuMemsetD32((CUdeviceptr)(uintptr_t)d[i].data, bits, 1));
}

static void round_trip(rlb_client *c, rlb_tensor_desc *d, int n, uint64_t version)
{
    fill(d, n, version);
    CHECK(rlb_register(c, d, (size_t)n) == 0, "register: %s", rlb_last_error(c));
    CHECK(rlb_publish_stream(c, version, NULL, NULL) == 0, "publish: %s", rlb_last_error(c));
    CHECK(rlb_unregister(c, NULL, 0) == 0, "unregister: %s", rlb_last_error(c));
}

static void ipc_round(rlb_client *c, uint64_t version)
{
    CUdeviceptr p;
    CU(p_cuMemAlloc(&p, ALLOC));
    rlb_tensor_desc d[2] = {dev_desc("ipc.a", p + (1u << 20), 1u << 18),
                            dev_desc("ipc.b", p + (2u << 20), 1u << 18)};
    round_trip(c, d, 2, version);
    CU(p_cuMemFree(p)); /* right after the unregister returned */
}

static void vmm_round(rlb_client *c, uint64_t version)
{
    CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED,
                                .requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                                .location = {.type = CU_MEM_LOCATION_TYPE_DEVICE,
                                             .id = dev_ordinal}};
    size_t g;
    CU(p_cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    size_t chunk = (ALLOC / 2 + g - 1) / g * g;
    CUdeviceptr va;
    CUmemGenericAllocationHandle h[2];
    CU(p_cuMemAddressReserve(&va, 2 * chunk, 0, 0, 0));
    for (int i = 0; i < 2; i++) {
        CU(p_cuMemCreate(&h[i], chunk, &prop, 0));
        CU(p_cuMemMap(va + i * chunk, chunk, 0, h[i], 0));
    }
    CUmemAccessDesc acc = {.location = prop.location,
                           .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
    CU(p_cuMemSetAccess(va, 2 * chunk, &acc, 1));
    rlb_tensor_desc d[2] = {dev_desc("vmm.across", va + chunk - 4096, 2048),
                            dev_desc("vmm.first", va + 4096, 1024)};
    round_trip(c, d, 2, version);
    CU(p_cuMemUnmap(va, 2 * chunk));
    for (int i = 0; i < 2; i++)
        CU(p_cuMemRelease(h[i]));
    CU(p_cuMemAddressFree(va, 2 * chunk));
}

static size_t free_bytes(void)
{
    size_t free_b, total;
    CU(p_cuCtxSynchronize());
    CU(p_cuMemGetInfo(&free_b, &total));
    return free_b;
}

static rlb_client *connect_to(const char *path)
{
    rlb_client_options o;
    rlb_client_options_init(&o);
    o.socket = path;
    o.request_timeout_ms = 30000;
    rlb_client *c;
    CHECK(rlb_connect(&o, &c) == 0, "connect: %s", rlb_last_error(NULL));
    return c;
}

static void check_back_to(size_t base, const char *what, int rounds)
{
    size_t now = free_bytes();
    CHECK(now + SLACK >= base, "%s: free device memory %zu MiB, was %zu MiB: freed memory "
          "is held by a mapping", what, now >> 20, base >> 20);
    printf("%s: %d rounds, free device memory %zu -> %zu MiB\n", what, rounds, base >> 20,
           now >> 20);
}

int main(void)
{
    char dir[] = "/tmp/rlb-test-cc-XXXXXX", path[128];
    CHECK(mkdtemp(dir), "mkdtemp");
    snprintf(path, sizeof(path), "%s/bridge", dir);
    /* Probe in a child: the parent must not touch CUDA before forking the bridge. */
    pid_t probe = fork();
    if (probe == 0) {
        int n = 0;
        _exit(driver_load() == 0 && p_cuDeviceGetCount(&n) == CUDA_SUCCESS && n > 0 ? 0 : 77);
    }
    int st;
    waitpid(probe, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        rmdir(dir);
        fprintf(stderr, "test_client_cuda: no GPU visible, skipping\n");
        return 77;
    }
    pid_t bridge = fork();
    if (bridge == 0)
        fake_bridge(path);
    for (int i = 0; i < 500 && access(path, F_OK) != 0; i++)
        usleep(10000);
    CHECK(driver_load() == 0, "driver");
    use_gpu();
    rlb_client *c = connect_to(path);
    uint64_t v = 0;

    /* Refusals: not device memory; memory of another ordinal than the one named. */
    static float host[16];
    rlb_tensor_desc bad = dev_desc("bad.host", (CUdeviceptr)(uintptr_t)host, 16);
    CHECK(rlb_register(c, &bad, 1) == RLB_EINVAL && strstr(rlb_last_error(c), "bad.host"),
          "host pointer: %s", rlb_last_error(c));
    CUdeviceptr p;
    CU(p_cuMemAlloc(&p, 4096));
    bad = dev_desc("bad.ordinal", p, 16);
    bad.cuda_device = 1;
    int n_gpus = 0;
    CU(p_cuDeviceGetCount(&n_gpus));
    CHECK(rlb_register(c, &bad, 1) == RLB_EINVAL, "ordinal 1 of %d GPUs: %s", n_gpus,
          rlb_last_error(c));
    CU(p_cuMemFree(p));

    ipc_round(c, ++v); /* warm up: contexts, the event, the bridge's first import */
    vmm_round(c, ++v);
    size_t base = free_bytes();
    for (int i = 0; i < ROUNDS; i++)
        ipc_round(c, ++v);
    check_back_to(base, "ipc", ROUNDS);
    base = free_bytes();
    for (int i = 0; i < ROUNDS; i++)
        vmm_round(c, ++v);
    check_back_to(base, "vmm", ROUNDS);
    rlb_close(c);

    setenv("RLB_CUDA_IPC", "off", 1);
    c = connect_to(path);
    base = free_bytes();
    for (int i = 0; i < ROUNDS / 10; i++)
        ipc_round(c, ++v);
    rlb_close(c);
    check_back_to(base, "staged", ROUNDS / 10);

    CHECK(waitpid(bridge, &st, 0) == bridge && WIFEXITED(st) && WEXITSTATUS(st) == 0,
          "the fake bridge failed (status %d)", st);
    rmdir(dir);
    printf("test_client_cuda: ok\n");
    return 0;
}
