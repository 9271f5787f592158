/* cmd_doctor.c: `rlb doctor`, a check of everything rlbridge needs from the machine, each
 * with what is wrong and how to fix it:
 *   - /dev/shm: mounted, its size and free space (containers often give 64 MB), and that a
 *     shared-memory segment can really be created and reserved;
 *   - the socket directory (conn.h's rule: RLB_SOCKET_DIR, else $XDG_RUNTIME_DIR/rlbridge,
 *     else /tmp/rlbridge-<uid>): ours, mode 0700; stale sockets in it (nobody listens)
 *     and live bridges;
 *   - stale segments: rlb-* objects left in /dev/shm (only the shm_open fallback names any),
 *     and CUDA's cuda.shm.* files of dead processes;
 *   - where present, the GPU: the driver (libcuda, dlopen'ed: no link-time dependency), its
 *     version, the devices, CUDA IPC (a handle of a real allocation), which way device
 *     tensors reach the bridge (in place, or host staging) and why, peer access between
 *     every pair, and NCCL (libnccl, dlopen'ed) with its version;
 *   - the RLB_* knobs and their values.
 * --fix removes stale sockets, segments and CUDA files of dead processes. Exit status 0
 * when nothing is wrong (warnings allowed), 1 when a check failed, 2 on bad usage.
 */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/env.h"
#include "common/shm.h"
#include "launch/cmds.h"
#include "rlb/rlb.h"

#define MIB (1024.0 * 1024.0)
#define GIB (1024.0 * MIB)
#define SHM_WARN_BYTES (1ull << 30)   /* below this /dev/shm limits real models */
#define SHM_FAIL_BYTES (64ull << 20)  /* below this even the demo's rings do not fit */
#define PROBE_BYTES (32ull << 20)     /* segment created to prove shared memory works */
#define TMPFS_MAGIC_ 0x01021994

typedef struct doctor {
    int fix;      /* --fix: remove stale sockets and segments */
    int failures; /* checks that failed */
    int warnings; /* checks that warned */
} doctor;

static void say(doctor *d, int level, const char *fix, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* level 0 ok, 1 warning, 2 failure, 3 information. */
static void say(doctor *d, int level, const char *fix, const char *fmt, ...)
{
    static const char *const tags[] = {"[ ok ]", "[warn]", "[FAIL]", "[info]"};
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", tags[level]);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (fix && *fix)
        printf("       fix: %s\n", fix);
    d->warnings += level == 1;
    d->failures += level == 2;
}

/* ---- shared memory ---------------------------------------------------------------------- */

static void check_shm(doctor *d)
{
    struct statfs fs;
    if (statfs("/dev/shm", &fs) != 0) {
        say(d, 2, "mount a tmpfs there (mount -t tmpfs -o size=8g tmpfs /dev/shm), or in "
                  "Docker run with --shm-size=8g or --ipc=host",
            "/dev/shm: %s", strerror(errno));
    } else {
        unsigned long long size = (unsigned long long)fs.f_blocks * fs.f_bsize;
        unsigned long long avail = (unsigned long long)fs.f_bavail * fs.f_bsize;
        int level = avail < SHM_FAIL_BYTES ? 2 : size < SHM_WARN_BYTES ? 1 : 0;
        say(d, level,
            level ? "enlarge it: Docker --shm-size=16g (or --ipc=host), Kubernetes an "
                    "emptyDir with medium Memory at /dev/shm, or mount -o remount,size=16g "
                    "/dev/shm; weights and rings of a real model need several GB"
                  : NULL,
            "/dev/shm: %s, %.1f GiB, %.1f GiB free", fs.f_type == TMPFS_MAGIC_ ? "tmpfs" : "not tmpfs",
            size / GIB, avail / GIB);
    }
    int fd = -1;
    int rc = rlb__shm_create(PROBE_BYTES, "rlb-doctor", &fd);
    if (rc == 0) {
        close(fd);
        say(d, 0, NULL, "shared memory: a %.0f MiB segment was created and reserved",
            PROBE_BYTES / MIB);
    } else {
        say(d, 2, "free or enlarge shared memory (see /dev/shm above) and the memory limit "
                  "of this container",
            "shared memory: creating a %.0f MiB segment failed: %s", PROBE_BYTES / MIB,
            rlb_strerror(rc));
    }
}

/* Stale segments: only the POSIX fallback of shm.h names objects ("rlb-<pid>-" + 16 hex
 * digits), and it unlinks them at once, so one still there whose creator is gone was left
 * by a crash in between (one of a live process is in flight). */
static void check_stale_segments(doctor *d)
{
    DIR *dir = opendir("/dev/shm");
    struct dirent *e;
    int stale = 0;
    while (dir && (e = readdir(dir))) {
        int pid = rlb__shm_fallback_pid(e->d_name);
        if (pid < 0 || kill(pid, 0) == 0 || errno != ESRCH)
            continue;
        char path[PATH_MAX];
        snprintf(path, sizeof(path), "/dev/shm/%s", e->d_name);
        struct stat st;
        if (lstat(path, &st) != 0 || st.st_uid != geteuid())
            continue;
        stale++;
        if (d->fix && unlink(path) == 0)
            say(d, 0, NULL, "removed stale segment %s (%.1f MiB)", path, st.st_size / MIB);
        else
            say(d, 1, "rm it (no live rlbridge process names segments), or run rlb doctor "
                      "--fix",
                "stale segment %s (%.1f MiB)", path, st.st_size / MIB);
    }
    if (dir)
        closedir(dir);
    if (!stale)
        say(d, 0, NULL, "no stale rlbridge segments in /dev/shm");
}

/* CUDA's own files, /dev/shm/cuda.shm.<n>.<pid>.<n>: the driver removes them at a clean
 * exit only, so a process killed with -9 leaves them. Those of dead processes are stale. */
static void check_cuda_shm(doctor *d)
{
    DIR *dir = opendir("/dev/shm");
    struct dirent *e;
    int stale = 0;
    while (dir && (e = readdir(dir))) {
        unsigned dev, idx;
        int pid, end = 0;
        if (sscanf(e->d_name, "cuda.shm.%u.%d.%u%n", &dev, &pid, &idx, &end) != 3 ||
            e->d_name[end] || pid <= 0 || kill(pid, 0) == 0 || errno != ESRCH)
            continue;
        char path[PATH_MAX];
        struct stat st;
        snprintf(path, sizeof(path), "/dev/shm/%s", e->d_name);
        if (lstat(path, &st) != 0 || st.st_uid != geteuid())
            continue;
        stale++;
        if (d->fix && unlink(path) == 0)
            say(d, 0, NULL, "removed %s of dead process %d", path, pid);
        else
            say(d, 1, "rm it, or run rlb doctor --fix", "%s belongs to process %d, which is "
                "gone (killed with -9?): CUDA leaves it behind", path, pid);
    }
    if (dir)
        closedir(dir);
    if (!stale)
        say(d, 0, NULL, "no CUDA files of dead processes in /dev/shm");
}

/* ---- socket directory ------------------------------------------------------------------ */

/* 1 when something accepts connections at the socket path, 0 when nobody does. */
static int someone_listens(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sa.sun_path))
        return 0;
    strcpy(sa.sun_path, path);
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0)
        return 0;
    int ok = connect(s, (struct sockaddr *)&sa, sizeof(sa)) == 0;
    close(s);
    return ok;
}

static void check_sockets(doctor *d)
{
    char dir[PATH_MAX];
    const char *knob = rlb__env_str(RLB_KNOB_SOCKET_DIR), *xdg = getenv("XDG_RUNTIME_DIR");
    if (*knob)
        snprintf(dir, sizeof(dir), "%s", knob);
    else if (xdg && *xdg)
        snprintf(dir, sizeof(dir), "%s/rlbridge", xdg);
    else
        snprintf(dir, sizeof(dir), "/tmp/rlbridge-%u", (unsigned)geteuid());
    struct stat st;
    if (lstat(dir, &st) != 0) {
        say(d, 0, NULL, "socket directory %s does not exist yet (the first bridge creates it, "
                        "mode 0700)", dir);
        return;
    }
    char fix[PATH_MAX + 96];
    if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid()) {
        snprintf(fix, sizeof(fix), "remove %s, or set RLB_SOCKET_DIR to a directory you own",
                 dir);
        say(d, 2, fix, "socket directory %s %s", dir,
            !S_ISDIR(st.st_mode) ? "is not a directory" : "belongs to another user");
        return;
    }
    if (st.st_mode & 077) {
        snprintf(fix, sizeof(fix), "chmod 700 %s", dir);
        say(d, 2, fix, "socket directory %s has mode %03o: others could reach the bridge; "
                       "rlbridge refuses it", dir, st.st_mode & 0777);
        return;
    }
    say(d, 0, NULL, "socket directory %s: ours, mode 0700", dir);
    DIR *dp = opendir(dir);
    struct dirent *e;
    while (dp && (e = readdir(dp))) {
        char path[PATH_MAX];
        if (snprintf(path, sizeof(path), "%s/%s", dir, e->d_name) >= (int)sizeof(path) ||
            lstat(path, &st) != 0 || !S_ISSOCK(st.st_mode))
            continue;
        if (someone_listens(path))
            say(d, 3, NULL, "a bridge listens at %s", path);
        else if (d->fix && unlink(path) == 0)
            say(d, 0, NULL, "removed stale socket %s", path);
        else
            say(d, 1, "rm it, or run rlb doctor --fix (a new bridge also replaces it)",
                "stale socket %s: nobody listens (a bridge was killed)", path);
    }
    if (dp)
        closedir(dp);
}

/* ---- GPU -------------------------------------------------------------------------------- */

/* The few driver API entry points we need, by dlsym: CUresult is an int, CUdevice an int,
 * contexts and pointers opaque. */
typedef int (*cu_init_fn)(unsigned);
typedef int (*cu_int_fn)(int *);
typedef int (*cu_dev_get_fn)(int *, int);
typedef int (*cu_dev_name_fn)(char *, int, int);
typedef int (*cu_can_peer_fn)(int *, int, int);
typedef int (*cu_ctx_retain_fn)(void **, int);
typedef int (*cu_ctx_release_fn)(int);
typedef int (*cu_ctx_set_fn)(void *);
typedef int (*cu_mem_alloc_fn)(unsigned long long *, size_t);
typedef int (*cu_mem_free_fn)(unsigned long long);
typedef int (*cu_ipc_handle_fn)(void *, unsigned long long);
typedef int (*cu_err_fn)(int, const char **);

typedef struct cuda_api {
    void *lib;                 /* libcuda.so.1 */
    cu_init_fn init;           /* cuInit */
    cu_int_fn version;         /* cuDriverGetVersion */
    cu_int_fn count;           /* cuDeviceGetCount */
    cu_dev_get_fn get;         /* cuDeviceGet */
    cu_dev_name_fn name;       /* cuDeviceGetName */
    cu_can_peer_fn can_peer;   /* cuDeviceCanAccessPeer */
    cu_ctx_retain_fn retain;   /* cuDevicePrimaryCtxRetain */
    cu_ctx_release_fn release; /* cuDevicePrimaryCtxRelease */
    cu_ctx_set_fn set;         /* cuCtxSetCurrent */
    cu_mem_alloc_fn alloc;     /* cuMemAlloc_v2 */
    cu_mem_free_fn free;       /* cuMemFree_v2 */
    cu_ipc_handle_fn ipc;      /* cuIpcGetMemHandle */
    cu_err_fn err;             /* cuGetErrorString */
} cuda_api;

static int cuda_load(cuda_api *a)
{
    a->lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!a->lib)
        return -1;
    const struct {
        void *slot;
        const char *name;
    } syms[] = {{&a->init, "cuInit"},
                {&a->version, "cuDriverGetVersion"},
                {&a->count, "cuDeviceGetCount"},
                {&a->get, "cuDeviceGet"},
                {&a->name, "cuDeviceGetName"},
                {&a->can_peer, "cuDeviceCanAccessPeer"},
                {&a->retain, "cuDevicePrimaryCtxRetain"},
                {&a->release, "cuDevicePrimaryCtxRelease"},
                {&a->set, "cuCtxSetCurrent"},
                {&a->alloc, "cuMemAlloc_v2"},
                {&a->free, "cuMemFree_v2"},
                {&a->ipc, "cuIpcGetMemHandle"},
                {&a->err, "cuGetErrorString"}};
    for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++) {
        void *f = dlsym(a->lib, syms[i].name);
        if (!f)
            return -1;
        memcpy(syms[i].slot, &f, sizeof(f));
    }
    return 0;
}

static const char *cu_text(const cuda_api *a, int rc)
{
    const char *s = NULL;
    return a->err && a->err(rc, &s) == 0 && s ? s : "unknown CUDA error";
}

/* Allocates on device dev and takes an IPC handle of it: what the bridge does with every
 * CUDA shard. Returns 0 or the CUDA error. */
static int ipc_probe(const cuda_api *a, int dev)
{
    void *ctx;
    unsigned long long ptr = 0;
    unsigned char handle[64];
    int rc = a->retain(&ctx, dev);
    if (rc)
        return rc;
    rc = a->set(ctx);
    if (!rc)
        rc = a->alloc(&ptr, 1 << 20);
    if (!rc)
        rc = a->ipc(handle, ptr);
    if (ptr)
        a->free(ptr);
    a->release(dev);
    return rc;
}

/* CAP_SYS_PTRACE in this process's effective capabilities. */
static int has_cap_ptrace(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    unsigned long long caps = 0;
    while (f && fgets(line, sizeof(line), f))
        if (sscanf(line, "CapEff: %llx", &caps) == 1)
            break;
    if (f)
        fclose(f);
    return (caps >> 19) & 1; /* CAP_SYS_PTRACE */
}

/* Which way a trainer's device tensors reach the bridge here, and why (client/cuda.c):
 * opening another process's CUDA IPC handle needs the right to ptrace it (the driver
 * duplicates its fds), which containers often withhold; VMM memory (PyTorch's
 * expandable_segments) travels as fds over the socket and needs no such right; host
 * staging always works. */
static void check_share_path(doctor *d)
{
    int scope = -1;
    FILE *f = fopen("/proc/sys/kernel/yama/ptrace_scope", "r");
    if (f) {
        if (fscanf(f, "%d", &scope) != 1)
            scope = -1;
        fclose(f);
    }
    const char *off = rlb__env_str(RLB_KNOB_CUDA_IPC);
    int cap = has_cap_ptrace();
    if (!strcmp(off, "off")) {
        say(d, 3, NULL, "device tensors: host staging (RLB_CUDA_IPC=off): pinned shared "
                        "memory, copied at each publish");
    } else if (cap || scope <= 0) {
        say(d, 0, NULL, "device tensors: shared in place (CUDA IPC handles for cudaMalloc "
                        "memory, fds for VMM memory): %s",
            cap ? "CAP_SYS_PTRACE is held" : "ptrace_scope 0 lets same-user processes "
                                             "open each other's handles");
    } else {
        say(d, 1, "run the trainer and the bridge with CAP_SYS_PTRACE (Docker --cap-add "
                  "SYS_PTRACE), or set expandable_segments:True in PYTORCH_CUDA_ALLOC_CONF "
                  "so tensors go as fds",
            "device tensors: VMM memory is shared in place by fd; cudaMalloc memory may need "
            "host staging (chosen by itself, one log line): ptrace_scope is %d and "
            "CAP_SYS_PTRACE is not held", scope);
    }
}

static void check_nccl(doctor *d)
{
    void *lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        say(d, 1, "install NCCL (libnccl2) for multi-GPU and multi-node runs",
            "NCCL: libnccl.so.2 not found");
        return;
    }
    int (*get_version)(int *) = NULL;
    void *f = dlsym(lib, "ncclGetVersion");
    memcpy(&get_version, &f, sizeof(f));
    int v = 0;
    if (get_version && get_version(&v) == 0)
        say(d, 0, NULL, "NCCL %d.%d.%d", v / 10000, v / 100 % 100, v % 100);
    else
        say(d, 1, "reinstall NCCL", "NCCL: libnccl.so.2 loads but ncclGetVersion fails");
    dlclose(lib);
}

static void check_gpu(doctor *d)
{
    cuda_api a = {0};
    if (cuda_load(&a) < 0) {
        say(d, 3, NULL, "no NVIDIA driver (libcuda.so.1): the CPU backend runs everything");
        if (a.lib)
            dlclose(a.lib);
        return;
    }
    int rc = a.init(0), version = 0, n = 0;
    if (!rc)
        rc = a.version(&version);
    if (!rc)
        rc = a.count(&n);
    if (rc) {
        say(d, 2, "check nvidia-smi; in a container pass the GPUs (--gpus all) and the "
                  "driver libraries",
            "CUDA driver present but not usable: %s", cu_text(&a, rc));
        dlclose(a.lib);
        return;
    }
    say(d, n ? 0 : 3, NULL, "CUDA driver %d.%d, %d device(s)", version / 1000,
        version % 1000 / 10, n);
    for (int i = 0; i < n; i++) {
        int dev;
        char name[128] = "?";
        if (a.get(&dev, i) == 0)
            a.name(name, sizeof(name), dev);
        rc = ipc_probe(&a, i);
        if (rc == 0)
            say(d, 0, NULL, "GPU %d: %s, CUDA IPC handles can be made", i, name);
        else
            say(d, 1, "CUDA IPC needs processes that share the IPC namespace (Docker "
                      "--ipc=host) and a device not in exclusive-process mode; meanwhile "
                      "cudaMalloc tensors go through host staging",
                "GPU %d: %s, CUDA IPC handle failed: %s", i, name, cu_text(&a, rc));
    }
    if (n)
        check_share_path(d);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            int can = 0;
            if (i == j || a.can_peer(&can, i, j) != 0 || can)
                continue;
            say(d, 1, "without peer access, copies between these GPUs go through the host "
                      "(slower); check nvidia-smi topo -m and IOMMU / ACS settings",
                "GPU %d cannot access GPU %d directly", i, j);
        }
    check_nccl(d);
    dlclose(a.lib);
}

/* ---- knobs -------------------------------------------------------------------------------- */

static void show_knobs(void)
{
    const rlb_env_entry *t = rlb__env_table();
    printf("knobs (environment):\n");
    for (int i = 0; i < RLB_KNOB_COUNT_; i++) {
        const char *v = getenv(t[i].name);
        printf("  %-26s = %-12s %s\n", t[i].name, v && *v ? v : t[i].def[0] ? t[i].def : "\"\"",
               v && *v ? "(set)" : "(default)");
    }
}

int rlb__cmd_doctor(int argc, char **argv)
{
    static const struct option longopts[] = {{"fix", no_argument, NULL, 'f'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    doctor d = {0};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        if (c == 'f') {
            d.fix = 1;
        } else {
            FILE *f = c == 'h' ? stdout : stderr;
            fprintf(f, "usage: rlb doctor [--fix]\n  Checks shared memory, the socket "
                       "directory, stale sockets and segments, GPU, CUDA IPC, peer access and "
                       "NCCL.\n  --fix removes stale sockets, segments and CUDA files of "
                       "dead processes.\n");
            return c == 'h' ? 0 : 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "rlb doctor: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    check_shm(&d);
    check_stale_segments(&d);
    check_cuda_shm(&d);
    check_sockets(&d);
    check_gpu(&d);
    show_knobs();
    if (d.failures)
        printf("rlb doctor: %d problem(s) to fix, %d warning(s)\n", d.failures, d.warnings);
    else
        printf("rlb doctor: all is well%s\n", d.warnings ? " (see the warnings)" : "");
    return d.failures ? 1 : 0;
}
