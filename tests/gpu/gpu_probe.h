/* gpu_probe.h: the GPUs a test that forks sees, counted without CUDA in the caller.
 *
 * A CUDA context does not survive fork, so a test that forks bridges, workers or nodes that
 * use the GPU must not initialize CUDA itself: it counts the GPUs in a child of its own.
 */
#ifndef RLB_TESTS_GPU_PROBE_H
#define RLB_TESTS_GPU_PROBE_H

#include <sys/wait.h>
#include <unistd.h>

#include <cuda_runtime_api.h>

/* The number of visible GPUs (at most 9), counted in a forked child; 0 when none, or when
 * the probe cannot run or dies. */
static inline int gp_count_gpus(void)
{
    enum { PROBE = 100 }; /* the child exits PROBE + the count, so a crash reads as 0 */
    pid_t pid = fork();
    if (pid == 0) {
        int n = 0;
        _exit(cudaGetDeviceCount(&n) == cudaSuccess ? PROBE + (n > 9 ? 9 : n) : PROBE);
    }
    int st = 0;
    if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) < PROBE)
        return 0;
    return WEXITSTATUS(st) - PROBE;
}

#endif /* RLB_TESTS_GPU_PROBE_H */
