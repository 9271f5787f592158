/* pdl.cuh: programmatic dependent launch (sm_90) for the engine's kernels.
 *
 * A kernel launched with rlb__pdl_launch may be scheduled while the kernel before it on the
 * stream is still finishing, so launch latency and the previous kernel's tail overlap its
 * start. The contract that keeps this correct: every such kernel runs RLB_PDL_WAIT() in
 * every block, before it reads or writes any memory an earlier kernel of the stream may
 * touch, and before any early return (griddepcontrol.wait returns once the previous grid
 * has completed and its writes are visible; completion is transitive along the stream
 * because each kernel waits before it can complete). Loads of memory no kernel of the step
 * writes (the weights) may come before the wait: that is the overlap the GEMV uses.
 * RLB_PDL_TRIGGER() lets the next kernel be scheduled as soon as every block of this one
 * has issued it; a kernel that never triggers releases its dependent when it completes.
 *
 * Kernels launched any other way (cuBLASLt, copies) keep plain stream order, and the two
 * instructions are no-ops in a kernel launched without the attribute. rlb__eo_set_pdl(0)
 * (RLB_CUDA_PDL=0) launches everything plainly, to measure what PDL brings.
 */
#ifndef RLB_KERNELS_CUDA_PDL_CUH
#define RLB_KERNELS_CUDA_PDL_CUH

#include <cuda_runtime.h>

#include <utility>

#define RLB_PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#define RLB_PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define RLB_PDL_ENTRY()                                                                  \
    do {                                                                                 \
        RLB_PDL_WAIT();                                                                  \
        RLB_PDL_TRIGGER();                                                               \
    } while (0)

extern "C" int rlb__eo_pdl(void);

/* kernel<<<grid, block, 0, stream>>>(args...), with programmatic stream serialization
 * allowed when PDL is on. */
template <typename... KArgs, typename... Args>
static inline cudaError_t rlb__pdl_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block,
                                          cudaStream_t stream, Args &&...args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = rlb__eo_pdl() ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

#endif /* RLB_KERNELS_CUDA_PDL_CUH */
