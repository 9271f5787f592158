/* noise.h: the counter-based noise of sampling (kernels/cpu/sample.h) and the race's score,
 * written once for the CPU sampler and the CUDA one (kernels/cuda/engine_ops.cu). Under
 * nvcc every function is compiled for host and device, so a GPU sample draws the same 64
 * bits, the same uniform and the same score as the CPU for the same (seed, sample index,
 * position, token).
 */
#ifndef RLB_KERNELS_CPU_NOISE_H
#define RLB_KERNELS_CPU_NOISE_H

#include <math.h>
#include <stdint.h>

#ifndef RLB__HD
#ifdef __CUDACC__
#define RLB__HD __host__ __device__
#else
#define RLB__HD
#endif
#endif

/* splitmix64's finalizer: a bijection of 64-bit words with full avalanche. */
static inline RLB__HD uint64_t rlb__mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= UINT64_C(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x *= UINT64_C(0x94d049bb133111eb);
    x ^= x >> 31;
    return x;
}

/* The hash of (seed, sample, pos) that every token of one sampling step shares. */
static inline RLB__HD uint64_t rlb__noise_prefix(uint64_t seed, uint64_t sample, int64_t pos)
{
    uint64_t h = rlb__mix64(seed + UINT64_C(0x9e3779b97f4a7c15));
    h = rlb__mix64(h ^ (sample + UINT64_C(0xd1b54a32d192ed03)));
    return rlb__mix64(h ^ ((uint64_t)pos + UINT64_C(0x8cb92ba72f3d8dd7)));
}

static inline RLB__HD uint64_t rlb__noise_token(uint64_t prefix, int64_t token)
{
    return rlb__mix64(prefix ^ ((uint64_t)token + UINT64_C(0xaef17502108ef2d9)));
}

/* 53 random bits as a double strictly inside (0, 1). */
static inline RLB__HD double rlb__bits_to_uniform(uint64_t bits)
{
    return ((double)(bits >> 11) + 0.5) * 0x1.0p-53;
}

/* The race (Gumbel-max): a token of weight p = exp(z - max z) and uniform u scores
 * p / -log(u), and the first largest score wins. As -log(u) >= 1 - u, p / (1 - u) bounds
 * the score from above; where even the bound (with 2^-40 to spare, far above the roundings
 * of the products, the log and the division) is below `best`, the token cannot replace it
 * and the log is skipped: the score is then given as -1, below any real one (best > 0
 * there). So a scan keeping the first largest score picks the same token either way. */
static inline RLB__HD double rlb__race_score(float p, double u, double best)
{
    if ((double)p * (1.0 + 0x1p-40) < best * (1.0 - u))
        return -1.0;
    return (double)p / -log(u);
}

#endif /* RLB_KERNELS_CPU_NOISE_H */
