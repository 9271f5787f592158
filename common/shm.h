/* shm.h: anonymous shared-memory segments, named by file descriptor only.
 *
 * A segment is a memfd (or, where memfd_create is missing, a shm_open object with a random
 * name, mode 0600, O_EXCL, unlinked at once), so nothing is ever left in /dev/shm, not even
 * after kill -9. Its memory is reserved at creation (fallocate), so a machine or container
 * with too little shared memory fails there with a clear message rather than with SIGBUS on
 * first touch. memfd segments are sealed against shrinking and growing, so a peer that
 * receives the fd cannot truncate the mapping under the creator. Segments carry rings, weight
 * buffers and host allocations alike: create(size) -> fd, map(fd, size) -> pointer.
 *
 * Functions return 0 or a negative RLB_E* code.
 */
#ifndef RLB_COMMON_SHM_H
#define RLB_COMMON_SHM_H

#include <stddef.h>

/* Whether `size` more bytes of shared memory can be reserved: the address-space limit
 * (RLIMIT_AS), the memory available (MemAvailable + SwapFree), the memory cgroup's limit
 * (v2 memory.max, v1 memory.limit_in_bytes, less what is in use) and, for a POSIX object
 * (posix = 1; a memfd is not bound by it), the free space of /dev/shm. Returns 0, or
 * RLB_ENOMEM with why (len bytes) naming the limit. */
int rlb__shm_room(size_t size, int posix, char *why, size_t len);

/* Creates a segment of `size` bytes (> 0), its memory reserved, close-on-exec; `name` tags it
 * in /proc/<pid>/fd and logs. rlb__shm_room is checked before anything is reserved.
 * Returns 0 with *fd set, RLB_EINVAL, RLB_ENOMEM (not enough shared memory: the log says
 * which limit) or RLB_EIO. */
int rlb__shm_create(size_t size, const char *name, int *fd);

/* The fallback of rlb__shm_create, used when memfd_create is unavailable: a POSIX shm object
 * with a random name, created O_EXCL with mode 0600 and unlinked before returning. Exposed
 * so tests exercise it on machines that have memfd. Same returns as rlb__shm_create. */
int rlb__shm_create_posix(size_t size, int *fd);
/* The creator's pid when /dev/shm entry `name` is a segment of the shm_open fallback
 * ("rlb-<pid>-<16 hex digits>", unlinked right after its creation: one still there is in
 * flight in a live process, or left by one that died in between), else -1. */
int rlb__shm_fallback_pid(const char *name);
/* 1 when /dev/shm entry `name` may be left by this process or by processes it started that
 * are gone: a fallback segment whose creator is this process or no longer lives. Any other
 * entry belongs to another program (or a live process), which a machine shared with other
 * runs may well have; a check for leftovers counts only these. */
int rlb__shm_entry_ours(const char *name);

/* Size of the segment behind fd. Returns 0 with *size set, or RLB_EIO. */
int rlb__shm_size(int fd, size_t *size);

/* Maps `size` bytes of segment fd read-write and shared, after checking that the segment
 * holds at least that many (so no access through the mapping can SIGBUS while the segment
 * keeps its size). Returns 0 with *addr set, RLB_EINVAL (size 0 or larger than the segment)
 * or RLB_EIO. The fd may be closed afterwards; the mapping keeps the memory alive. */
int rlb__shm_map(int fd, size_t size, void **addr);

/* Unmaps a mapping made by rlb__shm_map (NULL is a no-op). */
void rlb__shm_unmap(void *addr, size_t size);

#endif /* RLB_COMMON_SHM_H */
