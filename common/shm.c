/* shm.c: segments of shm.h: memfd (sealed) or an unlinked POSIX shm object, memory reserved
 * up front, mapped by fd. */
#include "common/shm.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "common/check.h"
#include "common/log.h"
#include "rlb/rlb.h"

/* Random shm_open names tried before giving up (a clash needs a 64-bit collision). */
#define NAME_TRIES 4

/* A limit at or above this is no limit (cgroup v1 writes "unlimited" as ~2^63). */
#define NO_LIMIT (1ull << 62)

/* The first unsigned number in file path after `key` (NULL: at its start), times `scale`;
 * UINT64_MAX when the file or key is missing, or the value is "max". */
static uint64_t read_number(const char *path, const char *key, uint64_t scale)
{
    char buf[4096];
    FILE *f = fopen(path, "re");
    if (!f)
        return UINT64_MAX;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *at = key ? strstr(buf, key) : buf;
    if (!at)
        return UINT64_MAX;
    at += key ? strlen(key) : 0;
    unsigned long long v;
    return sscanf(at, " %llu", &v) == 1 ? v * scale : UINT64_MAX;
}

/* Room left in our memory cgroup (v2, then v1; our own group's files, else the root of
 * the mount, which a container sees as its own), or UINT64_MAX without a limit. */
static uint64_t cgroup_room(void)
{
    char line[512], path[640], group[512] = "";
    int v1 = 0;
    FILE *f = fopen("/proc/self/cgroup", "re");
    while (f && fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\n")] = 0;
        if (!strncmp(line, "0::", 3) && !group[0])
            snprintf(group, sizeof(group), "%s", line + 3);
        const char *m = strstr(line, ":memory:");
        if (m) {
            snprintf(group, sizeof(group), "%s", m + 8);
            v1 = 1;
        }
    }
    if (f)
        fclose(f);
    const char *root = v1 ? "/sys/fs/cgroup/memory" : "/sys/fs/cgroup";
    const char *max = v1 ? "memory.limit_in_bytes" : "memory.max";
    const char *cur = v1 ? "memory.usage_in_bytes" : "memory.current";
    for (int own = 1; own >= 0; own--) {
        snprintf(path, sizeof(path), "%s%s/%s", root, own ? group : "", max);
        uint64_t limit = read_number(path, NULL, 1);
        if (limit == UINT64_MAX && access(path, R_OK) != 0)
            continue; /* no such file: try the mount's root */
        if (limit >= NO_LIMIT)
            return UINT64_MAX;
        snprintf(path, sizeof(path), "%s%s/%s", root, own ? group : "", cur);
        uint64_t used = read_number(path, NULL, 1);
        return used == UINT64_MAX ? limit : used >= limit ? 0 : limit - used;
    }
    return UINT64_MAX;
}

int rlb__shm_room(size_t size, int posix, char *why, size_t len)
{
    struct rlimit rl;
    uint64_t room;
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && size > rl.rlim_cur)
        return snprintf(why, len, "%zu MiB is more than the address-space limit (RLIMIT_AS, "
                        "%llu MiB)", size >> 20, (unsigned long long)rl.rlim_cur >> 20),
               RLB_ENOMEM;
    uint64_t avail = read_number("/proc/meminfo", "MemAvailable:", 1024);
    uint64_t swap = read_number("/proc/meminfo", "SwapFree:", 1024);
    if (avail != UINT64_MAX && size > avail + (swap == UINT64_MAX ? 0 : swap))
        return snprintf(why, len, "%zu MiB is more than the memory available (MemAvailable + "
                        "SwapFree: %llu MiB)", size >> 20,
                        (unsigned long long)(avail + (swap == UINT64_MAX ? 0 : swap)) >> 20),
               RLB_ENOMEM;
    if ((room = cgroup_room()) != UINT64_MAX && size > room)
        return snprintf(why, len, "%zu MiB is more than the memory cgroup has left (%llu MiB "
                        "below its limit)", size >> 20, (unsigned long long)room >> 20),
               RLB_ENOMEM;
    /* A memfd lives outside /dev/shm and is not bound by its size; a POSIX object is. */
    struct statvfs vfs;
    if (posix && statvfs("/dev/shm", &vfs) == 0 &&
        size > (uint64_t)vfs.f_bavail * vfs.f_frsize)
        return snprintf(why, len, "%zu MiB is more than /dev/shm has free (%llu MiB)",
                        size >> 20, (unsigned long long)vfs.f_bavail * vfs.f_frsize >> 20),
               RLB_ENOMEM;
    if (len)
        why[0] = 0;
    return 0;
}

/* Checks rlb__shm_room before a reservation, logging why it cannot fit. */
static int check_room(size_t size, int posix, const char *name)
{
    char why[256];
    int rc = rlb__shm_room(size, posix, why, sizeof(why));
    if (rc < 0)
        RLB_LOG_ERROR(RLB_SUB_CONN, "cannot reserve shared memory for %s: %s", name, why);
    return rc;
}

/* Reserves size bytes behind fd, so that touching the mapping later cannot fail. */
static int reserve(int fd, size_t size, const char *name)
{
    int err;
    do {
        err = posix_fallocate(fd, 0, (off_t)size);
    } while (err == EINTR);
    if (err == 0)
        return 0;
    RLB_LOG_ERROR(RLB_SUB_CONN,
                  "cannot reserve %zu MiB of shared memory for %s: %s (too little shared "
                  "memory: enlarge /dev/shm or the memory limit, or ask for less)",
                  size >> 20, name, strerror(err));
    return (err == ENOSPC || err == ENOMEM || err == EFBIG) ? RLB_ENOMEM : RLB_EIO;
}

int rlb__shm_create_posix(size_t size, int *fd)
{
    if (!fd || size == 0 || size > (size_t)INT64_MAX)
        return RLB_EINVAL;
    int rc = check_room(size, 1, "a POSIX shm segment");
    if (rc < 0)
        return rc;
    rc = RLB_EIO;
    int sfd = -1;
    char name[48];
    for (int i = 0; i < NAME_TRIES && sfd < 0; i++) {
        uint64_t rnd;
        if (getrandom(&rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
            RLB_LOG_ERROR(RLB_SUB_CONN, "getrandom: %s", strerror(errno));
            return RLB_EIO;
        }
        /* The creator's pid in the name says whose an entry is while it exists. */
        snprintf(name, sizeof(name), "/rlb-%d-%016llx", (int)getpid(), (unsigned long long)rnd);
        sfd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (sfd < 0 && errno != EEXIST) {
            RLB_LOG_ERROR(RLB_SUB_CONN, "shm_open(%s): %s", name, strerror(errno));
            return RLB_EIO;
        }
    }
    if (sfd < 0) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "shm_open: %d random names all taken", NAME_TRIES);
        return RLB_EIO;
    }
    /* Unlinked at once: from here on only fds and mappings keep it alive. */
    RLB_SYSCHECK(shm_unlink(name), rc, err);
    RLB_CHECK_GOTO(reserve(sfd, size, name), rc, err);
    *fd = sfd;
    return 0;
err:
    close(sfd);
    return rc;
}

int rlb__shm_fallback_pid(const char *name)
{
    int pid, at = 0, end = 0;
    unsigned long long rnd;
    if (!name || sscanf(name, "rlb-%d-%n%llx%n", &pid, &at, &rnd, &end) != 2 || name[end] ||
        end - at != 16 || pid <= 0)
        return -1;
    return pid;
}

int rlb__shm_entry_ours(const char *name)
{
    int pid = rlb__shm_fallback_pid(name);
    return pid > 0 && (pid == (int)getpid() || (kill(pid, 0) < 0 && errno == ESRCH));
}

int rlb__shm_create(size_t size, const char *name, int *fd)
{
    if (!fd || !name || size == 0 || size > (size_t)INT64_MAX)
        return RLB_EINVAL;
    int rc = RLB_EIO;
    int mfd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mfd < 0 && errno == ENOSYS)
        return rlb__shm_create_posix(size, fd);
    /* Checked first: fallocate of more than the machine holds runs until the OOM killer
     * ends the process instead of failing. */
    if (mfd >= 0 && (rc = check_room(size, 0, name)) < 0)
        goto err;
    rc = RLB_EIO;
    if (mfd < 0) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "memfd_create(%s): %s", name, strerror(errno));
        return RLB_EIO;
    }
    RLB_CHECK_GOTO(reserve(mfd, size, name), rc, err);
    /* The size is final: a peer holding the fd can neither shrink it (SIGBUS for us) nor
     * grow it, and nobody can lift the seals. */
    RLB_SYSCHECK(fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), rc, err);
    *fd = mfd;
    return 0;
err:
    close(mfd);
    return rc;
}

int rlb__shm_size(int fd, size_t *size)
{
    struct stat st;
    int rc = RLB_EIO;
    RLB_SYSCHECK(fstat(fd, &st), rc, err);
    *size = (size_t)st.st_size;
    return 0;
err:
    return rc;
}

int rlb__shm_map(int fd, size_t size, void **addr)
{
    size_t have;
    if (!addr || size == 0)
        return RLB_EINVAL;
    int rc = rlb__shm_size(fd, &have);
    if (rc < 0)
        return rc;
    if (have < size) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "segment holds %zu bytes, %zu needed", have, size);
        return RLB_EINVAL;
    }
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        int err = errno;
        RLB_LOG_ERROR(RLB_SUB_CONN, "mmap of %zu bytes: %s", size, strerror(err));
        return err == ENOMEM ? RLB_ENOMEM : RLB_EIO;
    }
    *addr = p;
    return 0;
}

void rlb__shm_unmap(void *addr, size_t size)
{
    if (addr)
        munmap(addr, size);
}
