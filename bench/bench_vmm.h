/* bench_vmm.h: GPU memory mapped with CUDA's VMM API, for the GPU benchmarks: what a GPU
 * worker's weights are, and what PyTorch allocates under PYTORCH_CUDA_ALLOC_CONF=
 * expandable_segments:True (cuMemCreate with a POSIX fd handle, so the memory can be
 * exported as an fd and mapped again elsewhere). On GPU 0; the driver's functions come
 * through cudart (rlb__cuda_driver_fn), as everywhere in the tree.
 */
#ifndef RLB_BENCH_VMM_H
#define RLB_BENCH_VMM_H

#include <stddef.h>

#include <cuda.h>

typedef struct rlb_bench_vmm {
    char *p;                        /* the mapping */
    size_t size;                    /* its bytes, whole granules */
    CUmemGenericAllocationHandle h; /* the physical memory */
} rlb_bench_vmm;

/* Resolves the driver's VMM functions. 0, or -1 (the missing one is logged). */
int rlb__bench_vmm_init(void);
/* Physical memory of at least `bytes`, exportable as an fd, mapped readable and writable
 * at a fresh address. 0, or -1 with nothing held. */
int rlb__bench_vmm_alloc(rlb_bench_vmm *m, size_t bytes);
/* A second mapping of m's memory through its fd (export, import, map), as another process
 * would make it. 0, or -1 with nothing held. */
int rlb__bench_vmm_remap(const rlb_bench_vmm *m, rlb_bench_vmm *out);
/* Unmaps and releases m, once the GPU no longer uses it. */
void rlb__bench_vmm_free(rlb_bench_vmm *m);

#endif /* RLB_BENCH_VMM_H */
