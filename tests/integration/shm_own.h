/* shm_own.h: the /dev/shm entries a test's own processes could have made, so a test that
 * checks "nothing left behind" does not race the other tests of a parallel ctest run:
 * rlbridge's "rlb-<pid>-<n>" names (the shm_open fallback of common/shm.h) and CUDA's
 * "cuda.shm.<n>.<pid>.<n>" of the pids given and of this process.
 */
#ifndef RLB_TESTS_SHM_OWN_H
#define RLB_TESTS_SHM_OWN_H

#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "common/shm.h"

/* 1 when /dev/shm entry `name` may come from this process or one of pids[0..n). */
static inline int shm_own_entry(const char *name, const pid_t *pids, int n)
{
    unsigned dev, idx;
    int pid = rlb__shm_fallback_pid(name), end = 0;
    if (pid < 0 && (sscanf(name, "cuda.shm.%u.%d.%u%n", &dev, &pid, &idx, &end) != 3 ||
                    name[end]))
        return 0;
    if (pid == (int)getpid())
        return 1;
    for (int i = 0; i < n; i++)
        if (pids[i] == pid)
            return 1;
    return 0;
}

/* Entries of /dev/shm that shm_own_entry claims. */
static inline int shm_own_count(const pid_t *pids, int n)
{
    DIR *d = opendir("/dev/shm");
    int count = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        count += shm_own_entry(e->d_name, pids, n);
    if (d)
        closedir(d);
    return count;
}

#endif /* RLB_TESTS_SHM_OWN_H */
