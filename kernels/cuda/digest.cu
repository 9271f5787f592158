/* digest.cu: the digest of digest.h over many device ranges in one launch.
 *
 * Invariant: out holds, for each range, exactly the lo and hi of the definition in digest.h
 * (the test recomputes them in plain C). The kernel sums the per-word terms; the host adds
 * the length terms after the copy back, so an empty range needs no block.
 *
 * Work division: each range is cut into blocks of kBlockWords words (the ranges' blocks are
 * numbered across the call: first_block is a prefix sum, a binary search finds the range of
 * a block). A block's threads sum their words into two 64-bit partials, the block reduces
 * them and adds them into the range's two sums with atomicAdd; sums mod 2^64 do not depend
 * on the order of the additions, so the result is the same whatever order the blocks run
 * in. Where the range starts 8-byte aligned, words are read in 16-byte pairs, kUnroll loads
 * in flight per thread (a range starting 8 but not 16 bytes past alignment reads its first
 * word of each block alone); the few words outside the pairs (that head, an odd last whole
 * word, a partial last word) and every word of a range starting off 8-byte alignment are
 * read byte by byte, which is slower but never reads a byte outside the range.
 *
 * Check: tests/gpu/test_cuda_digest (every tail length at aligned and unaligned starts
 * against the plain C reference; it prints the achieved GB/s of large ranges).
 */
#include "kernels/cuda/digest.h"

#include <stdlib.h>

#include "kernels/cuda/cuda_check.h"

namespace {

constexpr int kThreads = 256;            /* threads per block */
constexpr int kUnroll = 4;               /* 16-byte loads in flight per thread */
constexpr uint64_t kBlockWords = 8192;   /* words (64 KiB) per block: 4 rounds of loads */
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;   /* splitmix increment, hi's len factor */
constexpr uint64_t kIndexMul = 0xD1B54A32D192ED03ull; /* spreads k over lo's word */

/* One range as the kernel sees it; built on the host for each call. */
struct ddesc {
    const uint8_t *p;      /* first byte */
    uint64_t len;          /* bytes */
    uint64_t first_block;  /* launch-wide index of the range's first block */
};

__device__ __forceinline__ uint64_t splitmix(uint64_t z)
{
    z += kGolden;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Adds word k's terms (value w) to the partial sums. */
__device__ __forceinline__ void mix(uint64_t w, uint64_t k, uint64_t &lo, uint64_t &hi)
{
    lo += splitmix(w ^ (k * kIndexMul));
    hi += splitmix(splitmix(w) + k);
}

/* Word k of the range, zero-filled past len; one 8-byte load where the word is whole and
 * aligned, byte loads otherwise. */
__device__ __forceinline__ uint64_t load_word(const uint8_t *p, uint64_t len, uint64_t k)
{
    const uint8_t *q = p + 8 * k;
    const uint64_t left = len - 8 * k;
    if (left >= 8 && (uintptr_t)q % 8 == 0)
        return __ldg(reinterpret_cast<const unsigned long long *>(q));
    uint64_t w = 0;
    if (left >= 8) {
#pragma unroll
        for (uint32_t i = 0; i < 8; i++)
            w |= (uint64_t)__ldg(q + i) << (8 * i);
    } else {
        for (uint32_t i = 0; i < (uint32_t)left; i++)
            w |= (uint64_t)__ldg(q + i) << (8 * i);
    }
    return w;
}

__device__ __forceinline__ uint32_t find_range(const ddesc *d, uint32_t n, uint64_t block)
{
    /* invariant: d[lo].first_block <= block < d[hi].first_block (d[n] is the sentinel); the
     * largest such lo is never an empty range, whose first_block is its successor's */
    uint32_t lo = 0, hi = n;
    while (hi - lo > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (d[mid].first_block <= block)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* Sums the block's partials and adds them into dst[0] (lo) and dst[1] (hi). */
__device__ void block_add(uint64_t lo, uint64_t hi, unsigned long long *dst)
{
    __shared__ unsigned long long part[2][kThreads / 32];
    unsigned long long l = lo, h = hi;
    for (int o = 16; o > 0; o >>= 1) {
        l += __shfl_xor_sync(0xffffffffu, l, o);
        h += __shfl_xor_sync(0xffffffffu, h, o);
    }
    if (threadIdx.x % 32 == 0) {
        part[0][threadIdx.x / 32] = l;
        part[1][threadIdx.x / 32] = h;
    }
    __syncthreads();
    if (threadIdx.x != 0)
        return;
#pragma unroll
    for (int w = 1; w < kThreads / 32; w++) {
        l += part[0][w];
        h += part[1][w];
    }
    atomicAdd(&dst[0], l);
    atomicAdd(&dst[1], h);
}

__global__ void __launch_bounds__(kThreads)
digest_kernel(const ddesc *d, uint32_t n, unsigned long long *sums)
{
    const uint32_t i = find_range(d, n, blockIdx.x);
    const ddesc r = d[i];
    const uint64_t n_words = r.len / 8 + (r.len % 8 != 0);
    const uint64_t k0 = (blockIdx.x - r.first_block) * kBlockWords;
    const uint32_t nw = (uint32_t)(n_words - k0 < kBlockWords ? n_words - k0 : kBlockWords);
    const uint32_t n_whole = (uint32_t)(r.len / 8 - k0 < nw ? r.len / 8 - k0 : nw);
    /* k0 is even, so the block's first word has the range start's alignment */
    const bool vec = (uintptr_t)r.p % 8 == 0;
    const uint32_t head = vec && (uintptr_t)r.p % 16 != 0;
    const uint32_t n_pairs = vec && n_whole > head ? (n_whole - head) / 2 : 0;
    const ulonglong2 *v = reinterpret_cast<const ulonglong2 *>(r.p + 8 * (k0 + head));
    uint64_t lo = 0, hi = 0;
    for (uint32_t j = threadIdx.x; j < n_pairs; j += kThreads * kUnroll) {
        ulonglong2 x[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; u++)
            if (j + u * kThreads < n_pairs)
                x[u] = __ldcs(&v[j + u * kThreads]);
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            const uint32_t q = j + u * kThreads;
            if (q < n_pairs) {
                const uint64_t k = k0 + head + 2 * (uint64_t)q;
                mix(x[u].x, k, lo, hi);
                mix(x[u].y, k + 1, lo, hi);
            }
        }
    }
    if (head && threadIdx.x == 0)
        mix(load_word(r.p, r.len, k0), k0, lo, hi);
    for (uint32_t q = head + 2 * n_pairs + threadIdx.x; q < nw; q += kThreads)
        mix(load_word(r.p, r.len, k0 + q), k0 + q, lo, hi);
    block_add(lo, hi, &sums[2 * (uint64_t)i]);
}

} /* namespace */

extern "C" int rlb__cuda_digest(const void *const *ptr, const uint64_t *len, uint32_t n,
                                uint64_t *out, cudaStream_t stream)
{
    if (n == 0)
        return 0;
    if (!ptr || !len || !out)
        return RLB_EINVAL;
    const size_t sum_bytes = 2 * (size_t)n * sizeof(uint64_t);
    const size_t desc_bytes = ((size_t)n + 1) * sizeof(ddesc);
    int rc = 0;
    char *scratch = nullptr; /* device: [2n] sums, then [n + 1] descriptors */
    uint64_t blocks = 0;
    ddesc *d = (ddesc *)malloc(desc_bytes);
    if (!d)
        return RLB_ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        if (!ptr[i] && len[i]) {
            rc = RLB_EINVAL;
            goto out;
        }
        d[i].p = (const uint8_t *)ptr[i];
        d[i].len = len[i];
        d[i].first_block = blocks;
        const uint64_t n_words = len[i] / 8 + (len[i] % 8 != 0);
        blocks += (n_words + kBlockWords - 1) / kBlockWords;
    }
    d[n].first_block = blocks; /* sentinel */
    if (blocks > INT32_MAX) { /* over 128 TiB: more than any device holds */
        rc = RLB_EINVAL;
        goto out;
    }
    RLB_CUDA_CHECK(cudaMallocAsync((void **)&scratch, sum_bytes + desc_bytes, stream), rc, out);
    RLB_CUDA_CHECK(cudaMemsetAsync(scratch, 0, sum_bytes, stream), rc, release);
    RLB_CUDA_CHECK(cudaMemcpyAsync(scratch + sum_bytes, d, desc_bytes, cudaMemcpyHostToDevice,
                                   stream), rc, release);
    if (blocks) {
        digest_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(
            (const ddesc *)(scratch + sum_bytes), n, (unsigned long long *)scratch);
        RLB_CUDA_CHECK(cudaGetLastError(), rc, release);
    }
    RLB_CUDA_CHECK(cudaMemcpyAsync(out, scratch, sum_bytes, cudaMemcpyDeviceToHost, stream), rc,
                   release);
release:
    /* d stays alive until the stream is synchronized: the upload may still read it */
    RLB_CUDA_CHECK(cudaFreeAsync(scratch, stream), rc, out);
    RLB_CUDA_CHECK(cudaStreamSynchronize(stream), rc, out);
    for (uint32_t i = 0; rc == 0 && i < n; i++) {
        out[2 * i] ^= len[i];
        out[2 * i + 1] += len[i] * kGolden;
    }
out:
    free(d);
    return rc;
}
