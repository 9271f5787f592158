/* test_cuda_ipc: CUDA memory references across processes (kernels/cuda/ipc.h).
 *
 *   leak      an exporter allocates, exports two tensors of one allocation, and frees it,
 *             1000 times; the importer maps and unmaps them (one handle open per
 *             allocation, closed once; every 100th round the cache is destroyed with the
 *             mappings still held). Device memory in use must come back to its baseline:
 *             a handle left open keeps the exporter's freed allocation alive.
 *   reshard   three processes: a "trainer" fills FSDP2 / whole-tensor shards (a planner
 *             case of gpu_case.h) inside two caching-allocator-like blocks, records an
 *             interprocess event and exports them; a "worker" exports its poisoned weight
 *             buffers; the bridge maps both sides, waits on the event, runs the plan with
 *             the CUDA executor and unmaps; the worker then checks every byte against the
 *             CPU executor run on the same case.
 *             With two GPUs, twice more with the trainer's second block on GPU 1: the
 *             bridge on GPU 0 reads it peer to peer (auto mode, where the GPUs have a
 *             peer path), and with the cache and the plan in staged mode, where the
 *             cache opens the handle in GPU 1's context and the executor copies it
 *             through its staging buffers.
 *   refusals  host memory does not export; unknown GPU, out-of-range tensor and unknown
 *             handle are refused and leave nothing open.
 *
 * Every child's CUDA files in /dev/shm (cuda.shm.*.<pid>.*) are removed once it is reaped.
 *
 * The parent never touches CUDA (a process that forks after initializing CUDA may not use
 * it in the child): every role is a child, talking over socketpairs, each under an alarm.
 * Exits 77 where no GPU is visible.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kernels/cpu/plan_exec.h"
#include "kernels/cuda/ipc.h"
#include "kernels/cuda/plan_exec.h"
#include "tests/gpu/gpu_case.h"

#define ROLE_TIMEOUT_S 120 /* hang guard for every child */
#define LEAK_ROUNDS 1000
#define LEAK_ALLOC (4u << 20)
#define LEAK_SLACK (64ull << 20) /* tolerated drift of free memory (other processes) */

/* Fails the child role with a message; the parent sees a non-zero exit. */
#define REQUIRE(cond, ...)                                                                 \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: %s: ", __FILE__, __LINE__, #cond);                     \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fputc('\n', stderr);                                                           \
            _exit(1);                                                                      \
        }                                                                                  \
    } while (0)
#define REQUIRE_CUDA(call) REQUIRE((call) == cudaSuccess, "%s", cudaGetErrorString(cudaGetLastError()))

static void send_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        REQUIRE(n > 0, "write: %s", strerror(errno));
        p += n;
        len -= (size_t)n;
    }
}

static void recv_all(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        REQUIRE(n > 0, "read: peer gone (%s)", n ? strerror(errno) : "EOF");
        p += n;
        len -= (size_t)n;
    }
}

typedef void (*role_fn)(int fd_a, int fd_b, uint64_t arg);

/* Forks a child running fn(fd_a, fd_b, arg) under an alarm; returns its pid. */
static pid_t spawn(role_fn fn, int fd_a, int fd_b, uint64_t arg)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(1);
    }
    if (pid == 0) {
        alarm(ROLE_TIMEOUT_S);
        fn(fd_a, fd_b, arg);
        _exit(0);
    }
    return pid;
}

/* Removes CUDA's /dev/shm/cuda.shm.<n>.<pid>.<n> files of a child that is gone: CUDA
 * removes them at a clean exit only, and a child ending in _exit or a signal leaves them,
 * which other tests' "nothing left in /dev/shm" checks would see. */
static void remove_cuda_shm(pid_t pid)
{
    DIR *d = opendir("/dev/shm");
    for (struct dirent *e; d && (e = readdir(d));) {
        unsigned dev, idx;
        int owner, end = 0;
        if (sscanf(e->d_name, "cuda.shm.%u.%d.%u%n", &dev, &owner, &idx, &end) == 3 &&
            !e->d_name[end] && owner == (int)pid && unlinkat(dirfd(d), e->d_name, 0) != 0)
            fprintf(stderr, "cannot remove /dev/shm/%s: %s\n", e->d_name, strerror(errno));
    }
    if (d)
        closedir(d);
}

static int wait_exit(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -1;
    remove_cuda_shm(pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* Exit code of the probe: PROBE_GPUS + the number of visible GPUs (at most 9), or GC_SKIP. */
#define PROBE_GPUS 100

static void role_probe(int fd_a, int fd_b, uint64_t arg)
{
    (void)fd_a, (void)fd_b, (void)arg;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0)
        _exit(GC_SKIP);
    _exit(PROBE_GPUS + (n < 9 ? n : 9));
}

/* ---- leak ------------------------------------------------------------------------------ */

static void role_leak_exporter(int fd, int unused, uint64_t arg)
{
    (void)unused, (void)arg;
    char err[256] = "";
    REQUIRE_CUDA(cudaFree(0)); /* context first, so the importer's baseline includes it */
    rlb_cuda_ipc_ref refs[2];
    static char host[64];
    REQUIRE(rlb__cuda_ipc_export(host, sizeof host, refs, err, sizeof err) == RLB_EINVAL,
            "host memory exported");
    uint8_t go = 1;
    send_all(fd, &go, 1);
    for (int round = 0; round < LEAK_ROUNDS; round++) {
        char *p;
        REQUIRE_CUDA(cudaMalloc((void **)&p, LEAK_ALLOC));
        int rc = rlb__cuda_ipc_export(p + (1u << 20), 1u << 20, &refs[0], err, sizeof err);
        REQUIRE(rc == 0, "export: %s", err);
        rc = rlb__cuda_ipc_export(p + (2u << 20), 2u << 20, &refs[1], err, sizeof err);
        REQUIRE(rc == 0, "export: %s", err);
        REQUIRE(refs[0].offset == (1u << 20) && refs[1].offset == (2u << 20),
                "offsets %llu %llu", (unsigned long long)refs[0].offset,
                (unsigned long long)refs[1].offset);
        REQUIRE(memcmp(refs[0].handle, refs[1].handle, sizeof refs[0].handle) == 0,
                "two tensors of one allocation export different handles");
        REQUIRE(rlb__cuda_ipc_export(p + (3u << 20), 2u << 20, &refs[1], err, sizeof err) ==
                    RLB_EINVAL, "a range past the allocation exported");
        rc = rlb__cuda_ipc_export(p + (2u << 20), 2u << 20, &refs[1], err, sizeof err);
        REQUIRE(rc == 0, "export: %s", err);
        send_all(fd, refs, sizeof refs);
        recv_all(fd, &go, 1); /* the importer is done with this allocation */
        REQUIRE_CUDA(cudaFree(p));
        send_all(fd, &go, 1);
    }
    recv_all(fd, &go, 1);
}

static void role_leak_importer(int fd, int unused, uint64_t arg)
{
    (void)unused, (void)arg;
    char err[256] = "";
    size_t free0, free1, total;
    uint8_t go;
    recv_all(fd, &go, 1);
    rlb_cuda_ipc_cache *c = NULL;
    REQUIRE(rlb__cuda_ipc_cache_create(0, &c) == 0, "cache");
    REQUIRE_CUDA(cudaMemGetInfo(&free0, &total));
    for (int round = 0; round < LEAK_ROUNDS; round++) {
        rlb_cuda_ipc_ref refs[2];
        void *p0, *p1;
        recv_all(fd, refs, sizeof refs);
        REQUIRE(rlb__cuda_ipc_map(c, &refs[0], &p0, err, sizeof err) == 0, "map: %s", err);
        REQUIRE(rlb__cuda_ipc_map(c, &refs[1], &p1, err, sizeof err) == 0, "map: %s", err);
        REQUIRE(rlb__cuda_ipc_open_handles(c) == 1, "%u handles open for one allocation",
                rlb__cuda_ipc_open_handles(c));
        REQUIRE((char *)p1 - (char *)p0 == (1 << 20), "mapped tensors are %td apart",
                (char *)p1 - (char *)p0);
        if (round % 100 == 99) { /* a disconnect: destroy closes what is still mapped */
            rlb__cuda_ipc_cache_destroy(c);
            REQUIRE(rlb__cuda_ipc_cache_create(0, &c) == 0, "cache");
        } else {
            REQUIRE(rlb__cuda_ipc_unmap(c, &refs[0]) == 0, "unmap");
            REQUIRE(rlb__cuda_ipc_open_handles(c) == 1, "closed while still mapped");
            REQUIRE(rlb__cuda_ipc_unmap(c, &refs[1]) == 0, "unmap");
            REQUIRE(rlb__cuda_ipc_unmap(c, &refs[1]) == RLB_ENOTFOUND, "unmapped twice");
        }
        REQUIRE(rlb__cuda_ipc_open_handles(c) == 0, "handle left open");
        send_all(fd, &go, 1);
        recv_all(fd, &go, 1); /* freed by the exporter */
    }
    REQUIRE_CUDA(cudaMemGetInfo(&free1, &total));
    long long drift = (long long)free0 - (long long)free1;
    printf("leak: %d rounds of %u MiB; free device memory before %zu, after %zu (drift %lld)\n",
           LEAK_ROUNDS, LEAK_ALLOC >> 20, free0, free1, drift);
    REQUIRE(drift < (long long)LEAK_SLACK, "device memory did not return to its baseline");
    rlb__cuda_ipc_cache_destroy(c);
    send_all(fd, &go, 1);
}

/* ---- refusals ----------------------------------------------------------------------- */

static void role_refusal_exporter(int fd, int unused, uint64_t arg)
{
    (void)unused, (void)arg;
    char err[256] = "", *p;
    rlb_cuda_ipc_ref ref;
    REQUIRE_CUDA(cudaMalloc((void **)&p, 1u << 20));
    REQUIRE(rlb__cuda_ipc_export(p, 1u << 20, &ref, err, sizeof err) == 0, "export: %s", err);
    send_all(fd, &ref, sizeof ref);
    uint8_t go;
    recv_all(fd, &go, 1);
    REQUIRE_CUDA(cudaFree(p));
}

static void role_refusal_importer(int fd, int unused, uint64_t arg)
{
    (void)unused, (void)arg;
    char err[256] = "";
    rlb_cuda_ipc_ref ref, bad;
    void *p;
    rlb_cuda_ipc_cache *c = NULL;
    recv_all(fd, &ref, sizeof ref);
    REQUIRE(rlb__cuda_ipc_cache_create(0, &c) == 0, "cache");
    bad = ref;
    bad.device_uuid[0] ^= 0xff;
    REQUIRE(rlb__cuda_ipc_map(c, &bad, &p, err, sizeof err) == RLB_ENOTFOUND, "unknown GPU");
    bad = ref;
    bad.length = (2u << 20);
    REQUIRE(rlb__cuda_ipc_map(c, &bad, &p, err, sizeof err) == RLB_EINVAL, "range past end");
    REQUIRE(rlb__cuda_ipc_open_handles(c) == 0, "a refused map left its handle open");
    REQUIRE(rlb__cuda_ipc_unmap(c, &ref) == RLB_ENOTFOUND, "unmap of nothing");
    REQUIRE(rlb__cuda_ipc_map(c, &ref, &p, err, sizeof err) == 0, "map: %s", err);
    REQUIRE(rlb__cuda_ipc_open_handles(c) == 1, "one handle");
    rlb__cuda_ipc_cache_destroy(c);
    uint8_t go = 1;
    send_all(fd, &go, 1);
}

/* ---- three-process reshard -------------------------------------------------------------- */

/* A reshard role's argument: the case seed in the low 32 bits, RESHARD_* flags above. */
#define RESHARD_TWO_GPUS (1ull << 32) /* the trainer's second block lives on GPU 1 */
#define RESHARD_STAGED (1ull << 33)   /* the bridge maps and reads in staged mode */
#define RESHARD_SEED(arg) ((arg) & 0xffffffffull)

static void role_trainer(int fd, int unused, uint64_t arg)
{
    (void)unused;
    const uint64_t seed = RESHARD_SEED(arg);
    char err[256] = "";
    gc_case g;
    REQUIRE(gc_build(&g, seed, (int)(seed & 1), err, sizeof err) == 0, "case: %s", err);
    /* odd buffers in one block, even ones in another, like caching-allocator blocks */
    uint64_t off[GC_MAX_W + 1], block[2] = {0, 0};
    for (uint32_t b = 0; b < g.n_buf; b++) {
        off[b] = block[b % 2];
        block[b % 2] = (off[b] + g.size[b] + 255) / 256 * 256;
    }
    char *base[2];
    cudaStream_t st;
    for (int k = 0; k < 2; k++) {
        REQUIRE_CUDA(cudaSetDevice(arg & RESHARD_TWO_GPUS ? k : 0));
        REQUIRE_CUDA(cudaMalloc((void **)&base[k], block[k] + 256));
    }
    REQUIRE_CUDA(cudaSetDevice(0));
    REQUIRE_CUDA(cudaStreamCreate(&st));
    for (uint32_t b = 0; b < g.n_buf; b++) { /* a block on GPU 1: synchronous copies */
        if (b % 2 && (arg & RESHARD_TWO_GPUS))
            REQUIRE_CUDA(cudaMemcpy(base[1] + off[b], g.mem[b], g.size[b], cudaMemcpyHostToDevice));
        else
            REQUIRE_CUDA(cudaMemcpyAsync(base[b % 2] + off[b], g.mem[b], g.size[b],
                                         cudaMemcpyHostToDevice, st));
    }
    cudaEvent_t ev;
    rlb_cuda_ipc_event evh;
    REQUIRE(rlb__cuda_event_create_ipc(&ev, &evh) == 0, "event");
    REQUIRE_CUDA(cudaEventRecord(ev, st));
    rlb_cuda_ipc_ref refs[GC_MAX_W + 1];
    for (uint32_t b = 0; b < g.n_buf; b++)
        REQUIRE(rlb__cuda_ipc_export(base[b % 2] + off[b], g.size[b], &refs[b], err,
                                     sizeof err) == 0, "export: %s", err);
    send_all(fd, &evh, sizeof evh);
    send_all(fd, refs, g.n_buf * sizeof refs[0]);
    uint8_t go;
    recv_all(fd, &go, 1); /* the bridge has run the plan: shards may change or go */
    REQUIRE_CUDA(cudaEventDestroy(ev));
    gc_free(&g);
}

static void role_worker(int fd, int unused, uint64_t arg)
{
    (void)unused;
    const uint64_t seed = RESHARD_SEED(arg);
    char err[256] = "";
    gc_case g;
    REQUIRE(gc_build(&g, seed, (int)(seed & 1), err, sizeof err) == 0, "case: %s", err);
    const uint32_t n = g.plan.n_dst;
    char **dbuf = calloc(n, sizeof *dbuf);
    uint8_t **want = calloc(n, sizeof *want), *got = NULL;
    rlb_cuda_ipc_ref *refs = calloc(n, sizeof *refs);
    REQUIRE(dbuf && want && refs, "oom");
    for (uint32_t d = 0; d < n; d++) {
        REQUIRE_CUDA(cudaMalloc((void **)&dbuf[d], g.plan.dst_bytes[d]));
        REQUIRE_CUDA(cudaMemset(dbuf[d], GC_POISON, g.plan.dst_bytes[d]));
        REQUIRE(rlb__cuda_ipc_export(dbuf[d], g.plan.dst_bytes[d], &refs[d], err, sizeof err) == 0,
                "export: %s", err);
        want[d] = malloc(g.plan.dst_bytes[d]);
        REQUIRE(want[d], "oom");
        memset(want[d], GC_POISON, g.plan.dst_bytes[d]);
    }
    REQUIRE_CUDA(cudaDeviceSynchronize());
    send_all(fd, refs, n * sizeof *refs);
    int rc = rlb__plan_exec_cpu(&g.plan, (const void *const *)g.mem, g.size, (void *const *)want,
                                g.plan.dst_bytes, 1, err, sizeof err);
    REQUIRE(rc == 0, "CPU executor: %s", err);
    uint8_t go;
    recv_all(fd, &go, 1); /* the bridge's writes are complete (it synchronized) */
    uint64_t checked = 0;
    for (uint32_t d = 0; d < n; d++) {
        got = realloc(got, g.plan.dst_bytes[d]);
        REQUIRE(got, "oom");
        REQUIRE_CUDA(cudaMemcpy(got, dbuf[d], g.plan.dst_bytes[d], cudaMemcpyDeviceToHost));
        for (uint64_t i = 0; i < g.plan.dst_bytes[d]; i++)
            REQUIRE(got[i] == want[d][i], "destination %u byte %llu: got %02x, want %02x", d,
                    (unsigned long long)i, got[i], want[d][i]);
        checked += g.plan.dst_bytes[d];
        REQUIRE_CUDA(cudaFree(dbuf[d]));
        free(want[d]);
    }
    printf("worker: case %llu: %llu bytes in %u buffers match the CPU executor\n",
           (unsigned long long)seed, (unsigned long long)checked, n);
    free(got);
    free(dbuf);
    free(want);
    free(refs);
    gc_free(&g);
}

static void role_bridge(int fd_trainer, int fd_worker, uint64_t arg)
{
    const uint64_t seed = RESHARD_SEED(arg);
    const rlb_cuda_peer_mode mode = arg & RESHARD_STAGED ? RLB_CUDA_PEER_STAGED : RLB_CUDA_PEER_AUTO;
    char err[256] = "", what[256];
    gc_case g;
    REQUIRE(gc_build(&g, seed, (int)(seed & 1), err, sizeof err) == 0, "case: %s", err);
    printf("bridge: case %llu: %s\n", (unsigned long long)seed, gc_describe(&g, what, sizeof what));
    REQUIRE(g.plan.n_src == g.n_buf, "plan reads %u buffers of %u", g.plan.n_src, g.n_buf);
    const uint32_t ns = g.n_buf, nd = g.plan.n_dst;
    rlb_cuda_ipc_ref *sref = calloc(ns, sizeof *sref), *dref = calloc(nd, sizeof *dref);
    rlb_cuda_buf *sb = calloc(ns, sizeof *sb), *db = calloc(nd, sizeof *db);
    REQUIRE(sref && dref && sb && db, "oom");
    rlb_cuda_ipc_event evh;
    recv_all(fd_trainer, &evh, sizeof evh);
    recv_all(fd_trainer, sref, ns * sizeof *sref);
    recv_all(fd_worker, dref, nd * sizeof *dref);
    rlb_cuda_ipc_cache *c = NULL;
    REQUIRE(rlb__cuda_ipc_cache_create(0, &c) == 0, "cache");
    REQUIRE(rlb__cuda_ipc_cache_set_peer_mode(c, mode) == 0, "peer mode");
    for (uint32_t i = 0; i < ns; i++) {
        REQUIRE(rlb__cuda_ipc_map(c, &sref[i], &sb[i].ptr, err, sizeof err) == 0, "map: %s", err);
        sb[i].bytes = sref[i].length;
    }
    for (uint32_t d = 0; d < nd; d++) {
        REQUIRE(rlb__cuda_ipc_map(c, &dref[d], &db[d].ptr, err, sizeof err) == 0, "map: %s", err);
        db[d].bytes = dref[d].length;
    }
    const uint32_t blocks = 2; /* the trainer's two allocations (n_buf >= 2) */
    REQUIRE(rlb__cuda_ipc_open_handles(c) == blocks + nd, "%u handles open for %u allocations",
            rlb__cuda_ipc_open_handles(c), blocks + nd);
    cudaEvent_t ev;
    cudaStream_t st;
    rlb_cuda_plan *cp = NULL;
    REQUIRE(rlb__cuda_event_open_ipc(&evh, &ev) == 0, "event open");
    REQUIRE_CUDA(cudaStreamCreate(&st));
    REQUIRE(rlb__cuda_plan_upload(&g.plan, 0, NULL, &cp, err, sizeof err) == 0, "upload: %s", err);
    REQUIRE(rlb__cuda_plan_set_peer_mode(cp, mode, 0) == 0, "peer mode");
    REQUIRE(rlb__cuda_plan_bind(cp, sb, db, err, sizeof err) == 0, "bind: %s", err);
    uint32_t windows = 0;
    const uint64_t staged = rlb__cuda_plan_staged_bytes(cp, &windows);
    int peer_path = 0;
    if (arg & RESHARD_TWO_GPUS)
        REQUIRE_CUDA(cudaDeviceCanAccessPeer(&peer_path, 0, 1));
    REQUIRE((staged > 0) == ((arg & RESHARD_TWO_GPUS) && (mode == RLB_CUDA_PEER_STAGED || !peer_path)),
            "%llu bytes staged in %u windows", (unsigned long long)staged, windows);
    if (arg & RESHARD_TWO_GPUS)
        printf("bridge: case %llu, %s: %llu bytes staged in %u windows\n",
               (unsigned long long)seed, mode == RLB_CUDA_PEER_STAGED ? "staged" : "auto",
               (unsigned long long)staged, windows);
    REQUIRE_CUDA(cudaStreamWaitEvent(st, ev, 0)); /* the trainer's writes come first */
    REQUIRE(rlb__cuda_plan_run(cp, st) == 0, "run");
    REQUIRE_CUDA(cudaStreamSynchronize(st));
    rlb__cuda_plan_free(cp);
    for (uint32_t i = 0; i < ns; i++)
        REQUIRE(rlb__cuda_ipc_unmap(c, &sref[i]) == 0, "unmap");
    for (uint32_t d = 0; d < nd; d++)
        REQUIRE(rlb__cuda_ipc_unmap(c, &dref[d]) == 0, "unmap");
    REQUIRE(rlb__cuda_ipc_open_handles(c) == 0, "handles left open");
    rlb__cuda_ipc_cache_destroy(c);
    REQUIRE_CUDA(cudaEventDestroy(ev));
    uint8_t go = 1;
    send_all(fd_worker, &go, 1);
    send_all(fd_trainer, &go, 1);
    free(sref);
    free(dref);
    free(sb);
    free(db);
    gc_free(&g);
}

/* ---- driver ----------------------------------------------------------------------------- */

static int pair_roles(role_fn a, role_fn b, const char *name)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
        perror("socketpair");
        return 1;
    }
    pid_t pa = spawn(a, sv[0], -1, 0), pb = spawn(b, sv[1], -1, 0);
    close(sv[0]);
    close(sv[1]);
    int ra = wait_exit(pa), rb = wait_exit(pb);
    printf("%s: exporter exit %d, importer exit %d\n", name, ra, rb);
    return ra || rb;
}

static int reshard(uint64_t arg)
{
    int tb[2], wb[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, tb) != 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, wb) != 0) {
        perror("socketpair");
        return 1;
    }
    pid_t pt = spawn(role_trainer, tb[0], -1, arg), pw = spawn(role_worker, wb[0], -1, arg);
    pid_t pb = spawn(role_bridge, tb[1], wb[1], arg);
    close(tb[0]);
    close(tb[1]);
    close(wb[0]);
    close(wb[1]);
    int rt = wait_exit(pt), rw = wait_exit(pw), rb = wait_exit(pb);
    printf("reshard case %llu%s%s: trainer exit %d, worker exit %d, bridge exit %d\n",
           (unsigned long long)RESHARD_SEED(arg), arg & RESHARD_TWO_GPUS ? ", two GPUs" : "",
           arg & RESHARD_STAGED ? ", staged" : "", rt, rw, rb);
    return rt || rw || rb;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* a dead peer shows up as a failed write */
    int probe = wait_exit(spawn(role_probe, -1, -1, 0));
    if (probe == GC_SKIP) {
        fprintf(stderr, "test_cuda_ipc: no GPU visible, skipping\n");
        return GC_SKIP;
    }
    if (probe <= PROBE_GPUS) {
        fprintf(stderr, "test_cuda_ipc: probe exited %d\n", probe);
        return 1;
    }
    const int n_gpus = probe - PROBE_GPUS;
    int failed = pair_roles(role_refusal_exporter, role_refusal_importer, "refusals");
    for (uint64_t seed = 300; seed < 304; seed++)
        failed |= reshard(seed);
    for (uint64_t seed = 304; n_gpus >= 2 && seed < 306; seed++) {
        failed |= reshard(seed | RESHARD_TWO_GPUS);
        failed |= reshard(seed | RESHARD_TWO_GPUS | RESHARD_STAGED);
    }
    if (n_gpus < 2)
        printf("test_cuda_ipc: one GPU; the two-GPU reshard cases are not run\n");
    failed |= pair_roles(role_leak_exporter, role_leak_importer, "leak");
    printf("test_cuda_ipc: %s\n", failed ? "FAILED" : "ok");
    return failed ? 1 : 0;
}
