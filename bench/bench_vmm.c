/* bench_vmm.c: see bench_vmm.h. */
#include "bench/bench_vmm.h"

#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_check.h"

static struct {
    CUresult (*gran)(size_t *, const CUmemAllocationProp *, CUmemAllocationGranularity_flags);
    CUresult (*create)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                       unsigned long long);
    CUresult (*reserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                    unsigned long long);
    CUresult (*access)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*unmap)(CUdeviceptr, size_t);
    CUresult (*release)(CUmemGenericAllocationHandle);
    CUresult (*afree)(CUdeviceptr, size_t);
    CUresult (*exp)(void *, CUmemGenericAllocationHandle, CUmemAllocationHandleType,
                    unsigned long long);
    CUresult (*imp)(CUmemGenericAllocationHandle *, void *, CUmemAllocationHandleType);
} vm;

static const CUmemAllocationProp prop = {
    .type = CU_MEM_ALLOCATION_TYPE_PINNED,
    .requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
    .location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = 0}};

int rlb__bench_vmm_init(void)
{
    return rlb__cuda_driver_fn("cuMemGetAllocationGranularity", (void **)&vm.gran) ||
                   rlb__cuda_driver_fn("cuMemCreate", (void **)&vm.create) ||
                   rlb__cuda_driver_fn("cuMemAddressReserve", (void **)&vm.reserve) ||
                   rlb__cuda_driver_fn("cuMemMap", (void **)&vm.map) ||
                   rlb__cuda_driver_fn("cuMemSetAccess", (void **)&vm.access) ||
                   rlb__cuda_driver_fn("cuMemUnmap", (void **)&vm.unmap) ||
                   rlb__cuda_driver_fn("cuMemRelease", (void **)&vm.release) ||
                   rlb__cuda_driver_fn("cuMemAddressFree", (void **)&vm.afree) ||
                   rlb__cuda_driver_fn("cuMemExportToShareableHandle", (void **)&vm.exp) ||
                   rlb__cuda_driver_fn("cuMemImportFromShareableHandle", (void **)&vm.imp)
               ? -1
               : 0;
}

/* Maps m->h (m->size bytes) at a fresh address of GPU 0, readable and writable. */
static int map_handle(rlb_bench_vmm *m)
{
    CUdeviceptr va;
    const CUmemAccessDesc acc = {.location = prop.location,
                                 .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
    if (vm.reserve(&va, m->size, 0, 0, 0) != CUDA_SUCCESS)
        return -1;
    if (vm.map(va, m->size, 0, m->h, 0) != CUDA_SUCCESS) {
        vm.afree(va, m->size);
        return -1;
    }
    if (vm.access(va, m->size, &acc, 1) != CUDA_SUCCESS) {
        vm.unmap(va, m->size);
        vm.afree(va, m->size);
        return -1;
    }
    m->p = (char *)(uintptr_t)va;
    return 0;
}

int rlb__bench_vmm_alloc(rlb_bench_vmm *m, size_t bytes)
{
    size_t g = 0;
    memset(m, 0, sizeof *m);
    if (vm.gran(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED) != CUDA_SUCCESS || g == 0)
        return -1;
    m->size = (bytes + g - 1) / g * g;
    if (vm.create(&m->h, m->size, &prop, 0) != CUDA_SUCCESS)
        return -1;
    if (map_handle(m) != 0) {
        vm.release(m->h);
        return -1;
    }
    return 0;
}

int rlb__bench_vmm_remap(const rlb_bench_vmm *m, rlb_bench_vmm *out)
{
    int fd = -1;
    memset(out, 0, sizeof *out);
    out->size = m->size;
    if (vm.exp(&fd, m->h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0) != CUDA_SUCCESS)
        return -1;
    CUresult r = vm.imp(&out->h, (void *)(uintptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    close(fd);
    if (r != CUDA_SUCCESS)
        return -1;
    if (map_handle(out) != 0) {
        vm.release(out->h);
        return -1;
    }
    return 0;
}

void rlb__bench_vmm_free(rlb_bench_vmm *m)
{
    if (!m->p)
        return;
    cudaDeviceSynchronize();
    vm.unmap((CUdeviceptr)(uintptr_t)m->p, m->size);
    vm.afree((CUdeviceptr)(uintptr_t)m->p, m->size);
    vm.release(m->h);
    memset(m, 0, sizeof *m);
}
