/* test_cuda_executor: the CUDA executor (kernels/executor.h) against the CPU executor.
 *
 * For random reshard cases (gpu_case.h): source buffer 0 lives in host memory (the kernels
 * read it as registered mapped memory), sources 1..W and every destination in VMM
 * allocations (cuMemCreate, exported as POSIX fds and imported by the executor the way the
 * bridge imports a trainer's expandable segments and a GPU worker's weight buffer). The
 * destinations are poisoned, the run goes through map / run / eventfd / finish, and every
 * destination byte must equal the CPU executor's over the same plan and source bytes.
 * Unmapping everything and destroying the executor must give the device memory back.
 * A host source that shares its last page with another buffer of the caller's: after a
 * run, the caller's own cudaMemcpy into and out of that buffer still works (the executor
 * registers the source's bytes, not its pages: a copy starting in a registered range and
 * running past it fails with cudaErrorInvalidValue). Exits 77 where no GPU is visible.
 */
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cmocka.h>
#include <cuda.h>

#include "kernels/cpu/plan_exec.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/executor.h"
#include "tests/gpu/gpu_case.h"

#define N_CASES 6

typedef CUresult (*create_fn)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                              unsigned long long);
typedef CUresult (*gran_fn)(size_t *, const CUmemAllocationProp *, CUmemAllocationGranularity_flags);
typedef CUresult (*export_fn)(void *, CUmemGenericAllocationHandle, CUmemAllocationHandleType,
                              unsigned long long);
typedef CUresult (*release_fn)(CUmemGenericAllocationHandle);

/* A VMM allocation of at least `bytes` on GPU 0, exported as an fd, its size and handle
 * (kept while the executor may map it, as an exporter keeps its memory; vmm_free). */
static int vmm_alloc(uint64_t bytes, int *fd, uint64_t *size, CUmemGenericAllocationHandle *hp)
{
    create_fn create;
    gran_fn gran;
    export_fn export_h;
    if (rlb__cuda_driver_fn("cuMemCreate", (void **)&create) ||
        rlb__cuda_driver_fn("cuMemGetAllocationGranularity", (void **)&gran) ||
        rlb__cuda_driver_fn("cuMemExportToShareableHandle", (void **)&export_h))
        return -1;
    CUmemAllocationProp p = {.type = CU_MEM_ALLOCATION_TYPE_PINNED,
                             .requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                             .location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = 0}};
    size_t g = 0;
    if (gran(&g, &p, CU_MEM_ALLOC_GRANULARITY_MINIMUM) != CUDA_SUCCESS || g == 0)
        return -1;
    *size = (bytes + g - 1) / g * g;
    CUmemGenericAllocationHandle h;
    if (create(&h, *size, &p, 0) != CUDA_SUCCESS)
        return -1;
    *hp = h;
    return export_h(fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0) == CUDA_SUCCESS ? 0 : -1;
}

static void vmm_free(CUmemGenericAllocationHandle h)
{
    release_fn release;
    if (rlb__cuda_driver_fn("cuMemRelease", (void **)&release) == 0)
        release(h);
}

/* A one-chunk VMM reference to *fd (fd and size must outlive the reference). */
static rlb_exec_ref vmm_ref(const int *fd, const uint64_t *size, const uint8_t uuid[16])
{
    rlb_exec_ref r = {.kind = 2, .fd = -1, .chunk_fds = fd, .chunk_bytes = size, .n_chunks = 1,
                      .alloc_bytes = *size, .offset = 0, .length = *size};
    memcpy(r.device_uuid, uuid, 16);
    return r;
}

static void run_case(uint64_t seed, const uint8_t uuid[16])
{
    char err[512] = "", desc[256];
    gc_case g;
    assert_int_equal(gc_build(&g, seed, (int)(seed % 2), err, sizeof err), 0);
    const rlb_plan *p = &g.plan;
    rlb_executor *x = NULL;
    assert_int_equal(rlb__executor_cuda_create(&x, err, sizeof err), 0);

    void *src[GC_MAX_W + 1] = {0};
    uint64_t src_len[GC_MAX_W + 1];
    int src_fd[GC_MAX_W + 1];
    CUmemGenericAllocationHandle src_h[GC_MAX_W + 1], *dst_h;
    uint64_t src_size[GC_MAX_W + 1];
    rlb_exec_ref src_ref[GC_MAX_W + 1];
    /* Source 0: host memory, read in place. */
    src_ref[0] = (rlb_exec_ref){.kind = 0, .host = g.mem[0], .length = g.size[0]};
    assert_int_equal(x->iface->map(x, &src_ref[0], &src[0], err, sizeof err), 0);
    src_len[0] = g.size[0];
    for (uint32_t b = 1; b < g.n_buf; b++) {
        assert_int_equal(vmm_alloc(g.size[b], &src_fd[b], &src_size[b], &src_h[b]), 0);
        src_ref[b] = vmm_ref(&src_fd[b], &src_size[b], uuid);
        assert_int_equal(x->iface->map(x, &src_ref[b], &src[b], err, sizeof err), 0);
        assert_int_equal(cudaMemcpy(src[b], g.mem[b], g.size[b], cudaMemcpyHostToDevice),
                         cudaSuccess);
        src_len[b] = g.size[b];
    }
    uint64_t nd = p->n_dst;
    void **dst = calloc(nd, sizeof *dst);
    uint64_t *dst_len = calloc(nd, sizeof *dst_len);
    int *dst_fd = calloc(nd, sizeof *dst_fd);
    uint64_t *dst_size = calloc(nd, sizeof *dst_size);
    rlb_exec_ref *dst_ref = calloc(nd, sizeof *dst_ref);
    void **want = calloc(nd, sizeof *want);
    dst_h = calloc(nd, sizeof *dst_h);
    assert_non_null(dst && dst_len && dst_fd && dst_size && dst_ref && want && dst_h);
    for (uint64_t d = 0; d < nd; d++) {
        dst_len[d] = p->dst_bytes[d];
        assert_int_equal(vmm_alloc(dst_len[d] + 1, &dst_fd[d], &dst_size[d], &dst_h[d]), 0);
        dst_ref[d] = vmm_ref(&dst_fd[d], &dst_size[d], uuid);
        assert_int_equal(x->iface->map(x, &dst_ref[d], &dst[d], err, sizeof err), 0);
        assert_int_equal(cudaMemset(dst[d], GC_POISON, dst_len[d]), cudaSuccess);
        want[d] = malloc(dst_len[d] + 1);
        memset(want[d], GC_POISON, dst_len[d]);
    }
    assert_int_equal(rlb__plan_exec_cpu(p, (const void *const *)g.mem, g.size, want, dst_len, 1,
                                        err, sizeof err), 0);

    int efd = eventfd(0, EFD_CLOEXEC);
    assert_true(efd >= 0);
    rlb_exec_run run = {.plan = p, .src = src, .src_len = src_len, .dst = dst,
                        .dst_len = dst_len, .done_fd = efd};
    /* Twice: the second run reuses the uploaded plan and the registered host range. */
    for (int rep = 0; rep < 2; rep++) {
        assert_int_equal(x->iface->run(x, &run, err, sizeof err), 0);
        struct pollfd pf = {.fd = efd, .events = POLLIN};
        assert_int_equal(poll(&pf, 1, 60000), 1);
        uint64_t one;
        assert_int_equal(read(efd, &one, sizeof one), (ssize_t)sizeof one);
        double ms = -1;
        int rc = x->iface->finish(x, &ms, err, sizeof err);
        if (rc)
            fprintf(stderr, "case %s: %s\n", gc_describe(&g, desc, sizeof desc), err);
        assert_int_equal(rc, 0);
        assert_true(ms >= 0);
        for (uint64_t d = 0; d < nd; d++) {
            uint8_t *got = malloc(dst_len[d] + 1);
            assert_int_equal(cudaMemcpy(got, dst[d], dst_len[d], cudaMemcpyDeviceToHost),
                             cudaSuccess);
            if (memcmp(got, want[d], dst_len[d]) != 0)
                fprintf(stderr, "case %s: destination %llu differs\n",
                        gc_describe(&g, desc, sizeof desc), (unsigned long long)d);
            assert_memory_equal(got, want[d], dst_len[d]);
            free(got);
            if (rep == 0)
                assert_int_equal(cudaMemset(dst[d], GC_POISON, dst_len[d]), cudaSuccess);
        }
    }
    close(efd);
    for (uint64_t d = 0; d < nd; d++) {
        assert_int_equal(x->iface->unmap(x, &dst_ref[d], dst[d]), 0);
        close(dst_fd[d]);
        vmm_free(dst_h[d]);
        free(want[d]);
    }
    assert_int_equal(x->iface->unmap(x, &src_ref[0], src[0]), 0);
    for (uint32_t b = 1; b < g.n_buf; b++) {
        assert_int_equal(x->iface->unmap(x, &src_ref[b], src[b]), 0);
        close(src_fd[b]);
        vmm_free(src_h[b]);
    }
    x->iface->destroy(x);
    free(dst);
    free(dst_len);
    free(dst_fd);
    free(dst_size);
    free(dst_ref);
    free(want);
    free(dst_h);
    gc_free(&g);
}

static void test_against_cpu(void **state)
{
    struct cudaDeviceProp prop;
    assert_int_equal(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
    uint8_t uuid[16];
    memcpy(uuid, &prop.uuid, 16);
    size_t free0, total, free1;
    assert_int_equal(cudaMemGetInfo(&free0, &total), cudaSuccess);
    for (uint64_t seed = 1; seed <= N_CASES; seed++)
        run_case(seed * 7919, uuid);
    assert_int_equal(cudaMemGetInfo(&free1, &total), cudaSuccess);
    /* Every import, plan and stream was given back (a few MiB of slack for the runtime's
     * own pools). */
    assert_true(free1 + (64u << 20) >= free0);
}

static void test_refusals(void **state)
{
    char err[256];
    rlb_executor *x = NULL;
    assert_int_equal(rlb__executor_cuda_create(&x, err, sizeof err), 0);
    void *addr;
    int no_fd = -1;
    uint64_t size = 4096;
    rlb_exec_ref bad = {.kind = 2, .fd = -1, .chunk_fds = &no_fd, .chunk_bytes = &size,
                        .n_chunks = 1, .alloc_bytes = 4096, .length = 4096};
    struct cudaDeviceProp prop;
    assert_int_equal(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
    memcpy(bad.device_uuid, &prop.uuid, 16);
    assert_int_equal(x->iface->map(x, &bad, &addr, err, sizeof err), RLB_EINVAL);
    memset(bad.device_uuid, 0xee, 16);
    assert_int_equal(x->iface->map(x, &bad, &addr, err, sizeof err), RLB_ENOTFOUND);
    x->iface->destroy(x);
}

/* One page-aligned block of three pages: the source is [64, page + 64), a buffer of the
 * caller's starts 64 bytes after it, in the source's last page, and ends in the third. */
static void test_host_neighbour(void **state)
{
    (void)state;
    char err[512] = "";
    const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), len = page;
    uint8_t *block = NULL;
    assert_int_equal(posix_memalign((void **)&block, page, 3 * page), 0);
    uint8_t *host = block + 64, *nb = host + len + 64;
    const uint64_t nb_len = (uint64_t)(block + 3 * page - nb);
    for (uint64_t i = 0; i < len; i++)
        host[i] = (uint8_t)(i * 7 + 1);
    void *dst = NULL;
    assert_int_equal(cudaMalloc(&dst, nb_len), cudaSuccess);
    assert_int_equal(cudaMemset(dst, GC_POISON, nb_len), cudaSuccess);
    uint64_t src_bytes = len, dst_bytes = len, first_op[2] = {0, 1};
    rlb_copy_op op = {.src_ref = 0, .dst_ref = 0, .src_dtype = RLB_DTYPE_F32,
                      .dst_dtype = RLB_DTYPE_F32, .src_stride = len, .dst_stride = len,
                      .rows = 1, .row_elems = len / 4};
    rlb_plan p = {.n_src = 1, .n_dst = 1, .src_bytes = &src_bytes, .dst_bytes = &dst_bytes,
                  .dst_first_op = first_op, .n_ops = 1, .ops = &op};
    rlb_executor *x = NULL;
    assert_int_equal(rlb__executor_cuda_create(&x, err, sizeof err), 0);
    rlb_exec_ref ref = {.kind = 0, .fd = -1, .host = block, .offset = 64, .length = len};
    void *src = NULL;
    assert_int_equal(x->iface->map(x, &ref, &src, err, sizeof err), 0);
    assert_ptr_equal(src, host);
    int efd = eventfd(0, EFD_CLOEXEC);
    assert_true(efd >= 0);
    rlb_exec_run run = {.plan = &p, .src = &src, .src_len = &src_bytes, .dst = &dst,
                        .dst_len = &dst_bytes, .done_fd = efd};
    if (x->iface->run(x, &run, err, sizeof err))
        fail_msg("run: %s", err);
    struct pollfd pf = {.fd = efd, .events = POLLIN};
    assert_int_equal(poll(&pf, 1, 60000), 1);
    uint64_t one;
    assert_int_equal(read(efd, &one, sizeof one), (ssize_t)sizeof one);
    if (x->iface->finish(x, NULL, err, sizeof err))
        fail_msg("finish: %s", err);
    close(efd);
    /* the source is still registered: the neighbour's copies must not see it */
    assert_int_equal(cudaMemcpy(nb, dst, nb_len, cudaMemcpyDeviceToHost), cudaSuccess);
    assert_memory_equal(nb, host, len);
    assert_int_equal(cudaMemcpy(dst, nb, nb_len, cudaMemcpyHostToDevice), cudaSuccess);
    assert_int_equal(x->iface->unmap(x, &ref, src), 0);
    x->iface->destroy(x);
    assert_int_equal(cudaFree(dst), cudaSuccess);
    free(block);
}

int main(void)
{
    if (!gc_have_gpu())
        return GC_SKIP;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_against_cpu),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_host_neighbour),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
