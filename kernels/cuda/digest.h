/* digest.h: 128-bit digests of byte ranges of device memory, computed on the GPU, so the
 * bridge can tell whether a chunk of a trainer's GPU tensor changed since it last sent it to
 * another node without copying the chunk to the host (the role XXH3 plays for host memory).
 *
 * The digest of a range of len bytes, all arithmetic on uint64 mod 2^64:
 *
 *   w_k          k = 0 .. ceil(len / 8) - 1: the little-endian uint64 of bytes
 *                [8k, 8k + 8) of the range, the bytes past len taken as 0
 *   splitmix(z)  z += 0x9E3779B97F4A7C15; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
 *                z = (z ^ (z >> 27)) * 0x94D049BB133111EB; return z ^ (z >> 31)
 *   lo           len ^ sum_k splitmix(w_k ^ (k * 0xD1B54A32D192ED03))
 *   hi           (len * 0x9E3779B97F4A7C15) + sum_k splitmix(splitmix(w_k) + k)
 *
 * Each word enters mixed with its index, so a changed byte or two swapped words change the
 * digest with overwhelming likelihood; the sums do not depend on the order they are taken
 * in, so the GPU splits a range over any number of blocks and the result is still exact.
 * It is a change detector, not a cryptographic hash: nobody is assumed to forge ranges.
 */
#ifndef RLB_KERNELS_CUDA_DIGEST_H
#define RLB_KERNELS_CUDA_DIGEST_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "rlb/rlb.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Digests of n byte ranges of device memory (ptr[i], len[i] bytes; any alignment; len 0
 * allowed) into out[2 * i] (lo) and out[2 * i + 1] (hi), host memory, computed on `stream`
 * after what is queued there; returns once they are in out (it synchronizes the stream).
 * Runs on the current device, which `stream` belongs to and from which every range is
 * readable; device scratch is taken from the device's stream-ordered pool for the call.
 * 0, RLB_EINVAL (n > 0 with a NULL array, a NULL ptr with len > 0), RLB_ENOMEM,
 * RLB_ECUDA. Check: tests/gpu/test_cuda_digest (against a plain C reference). */
int rlb__cuda_digest(const void *const *ptr, const uint64_t *len, uint32_t n, uint64_t *out,
                     cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif /* RLB_KERNELS_CUDA_DIGEST_H */
