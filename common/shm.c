/* shm.c: segments of shm.h: memfd (sealed) or an unlinked POSIX shm object, memory reserved
 * up front, mapped by fd. */
#include "common/shm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/check.h"
#include "common/log.h"
#include "rlb/rlb.h"

/* Random shm_open names tried before giving up (a clash needs a 64-bit collision). */
#define NAME_TRIES 4

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
    int rc = RLB_EIO;
    int sfd = -1;
    char name[32];
    for (int i = 0; i < NAME_TRIES && sfd < 0; i++) {
        uint64_t rnd;
        if (getrandom(&rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
            RLB_LOG_ERROR(RLB_SUB_CONN, "getrandom: %s", strerror(errno));
            return RLB_EIO;
        }
        snprintf(name, sizeof(name), "/rlb-%016llx", (unsigned long long)rnd);
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

int rlb__shm_create(size_t size, const char *name, int *fd)
{
    if (!fd || !name || size == 0 || size > (size_t)INT64_MAX)
        return RLB_EINVAL;
    int rc = RLB_EIO;
    int mfd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mfd < 0 && errno == ENOSYS)
        return rlb__shm_create_posix(size, fd);
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
