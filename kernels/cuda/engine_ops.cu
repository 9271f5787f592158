/* engine_ops.cu: the kernels of the CUDA engine backend (engine_ops.h says what each
 * computes).
 *
 * Invariants: every kernel follows its CPU twin's operation order and float32 rounding
 * points (kernels/cpu/ops.c): rmsnorm's variance as float(sum in double / D), then
 * w * (x * (1 / sqrtf(var + eps))); RoPE's angle float(inv_freq * pos) through sincosf;
 * silu as g / (1 + expf(-g)) * u; 16-bit outputs rounded to nearest even by convert.cuh
 * (the same bits as kernels/cpu/convert.h). Attention differs from the CPU's two-pass
 * softmax only in rounding: it is the online (flash) form, a running max and sum per query
 * vector over tiles of RLB_EO_KTILE keys, and with splits > 1 each split's (acc, max, sum)
 * is combined by attn_combine; decode steps of a bf16 cache may run attn_decode_tc
 * instead (tensor cores; its comment says how it keeps f32-like sums). Sampling follows
 * sample.c step for step (z = logit / T, p = expf(z - max) as float, score = p / -log(u)
 * in double, the first index of the
 * largest score or logit wins, logsumexp accumulated in double) with the noise of
 * kernels/cpu/noise.h compiled for the device, so a sample differs from the CPU's only
 * where two scores lie within an ulp of expf. Top-k and top-p select by radix over z's
 * bits (sample_kernel says how); top-p weighs tokens by fixed-point masses (2^-40 units)
 * where the CPU sums floats in double, so the two cut differently only where top_p of
 * the mass falls within ~1e-12 of a cumulative sum. A row with a non-finite logit
 * gets status RLB_EINVAL, and the caller samples it on the host (sample.h's rules).
 *
 * Attention work division: a block is (query tile, kv head, split). A span of n rows has
 * n * grp query vectors (token i, head gq) ordered token-major; a tile holds RLB_EO_QTILE of
 * them, so one block serves the q heads of a GQA group for several tokens and reads each
 * key once for all of them. 4 warps; vector v belongs to warp v % 4. Keys and values come
 * into shared memory in 16-byte loads (a key's hd elements are contiguous in the cache);
 * the K tile's rows are padded by one float so lane j reading key j's element d hits bank
 * (j * (hd + 1) + d) % 32, all different.
 *
 * Check: tests/gpu/test_cuda_engine_ops (every op against kernels/cpu on random inputs,
 * random block tables, chunked against one-shot prefill, split-KV decode of a long
 * context, sampling against rlb__sample_token). Build: cmake --build BUILD --target
 * test_cuda_engine_ops; run: BUILD/tests/test_cuda_engine_ops (exits 77 without a GPU).
 */
#include "kernels/cuda/engine_ops.h"

#include <math.h>

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "kernels/cpu/noise.h"
#include "kernels/cpu/sample.h"
#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/cuda_check.h"

namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it. */
__device__ double block_sum_d(double v)
{
    __shared__ double part[32];
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (threadIdx.x % kWarp == 0)
        part[threadIdx.x / kWarp] = v;
    __syncthreads();
    double s = 0.0;
    for (int w = 0; w < (int)blockDim.x / kWarp; w++)
        s += part[w];
    return s;
}

/* (value, index) argmax over the warp: larger value wins, equal values the smaller index.
 * Every lane gets the winner. */
template <typename V>
__device__ __forceinline__ void warp_argmax(V &v, int64_t &i)
{
    for (int o = 16; o > 0; o >>= 1) {
        const V ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) {
            v = ov;
            i = oi;
        }
    }
}

/* The same over the block (the first maximum of a left-to-right scan). */
template <typename V>
__device__ void block_argmax(V &v, int64_t &i)
{
    __shared__ V pv[32];
    __shared__ int64_t pi[32];
    warp_argmax(v, i);
    __syncthreads();
    if (threadIdx.x % kWarp == 0) {
        pv[threadIdx.x / kWarp] = v;
        pi[threadIdx.x / kWarp] = i;
    }
    __syncthreads();
    v = pv[0];
    i = pi[0];
    for (int w = 1; w < (int)blockDim.x / kWarp; w++)
        if (pv[w] > v || (pv[w] == v && pi[w] < i)) {
            v = pv[w];
            i = pi[w];
        }
}

template <typename T>
__device__ __forceinline__ float ld(const T *p, int64_t i)
{
    return rlb__d_to_f32(p[i]);
}

template <typename T>
__device__ __forceinline__ void st(T *p, int64_t i, float v)
{
    rlb__d_from_f32(v, &p[i]);
}

/* Runs f.template operator()<T>() with T the element type of dt (F32, BF16, F16). */
#define RLB_EO_DISPATCH(dt, T, ...)                                                      \
    do {                                                                                 \
        switch (dt) {                                                                    \
        case RLB_DTYPE_F32: {                                                            \
            using T = float;                                                             \
            __VA_ARGS__;                                                                 \
            break;                                                                       \
        }                                                                                \
        case RLB_DTYPE_BF16: {                                                           \
            using T = rlb__bf16_t;                                                       \
            __VA_ARGS__;                                                                 \
            break;                                                                       \
        }                                                                                \
        case RLB_DTYPE_F16: {                                                            \
            using T = rlb__f16_t;                                                        \
            __VA_ARGS__;                                                                 \
            break;                                                                       \
        }                                                                                \
        default:                                                                         \
            return RLB_EDTYPE;                                                           \
        }                                                                                \
    } while (0)

int launched(const char *what)
{
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess)
        return 0;
    RLB_LOG_ERROR(RLB_SUB_KERNEL, "%s launch: %s", what, cudaGetErrorString(e));
    return RLB_ECUDA;
}

unsigned grid_for(int64_t n, int threads)
{
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : b > 65535 * 16 ? 65535 * 16 : b);
}

/* ---- Elementwise ------------------------------------------------------------------------ */

/* A thread's loads in flight at once, in the passes over rows (rmsnorm, swiglu) whose
 * few elements per thread would otherwise wait on memory one after another. */
constexpr int kLoadBatch = 8;

/* x[b + u * blockDim.x] for u < kLoadBatch, all loads issued before any is used (0 past hi). */
__device__ __forceinline__ void load_batch(const float *x, int64_t b, int64_t hi,
                                           float (&xv)[kLoadBatch])
{
#pragma unroll
    for (int u = 0; u < kLoadBatch; u++) {
        const int64_t i = b + u * (int64_t)blockDim.x;
        xv[u] = i < hi ? x[i] : 0.0f;
    }
}

template <typename T>
__global__ void embed_kernel(const T *table, int64_t vocab0, int64_t v_local, int64_t D,
                             const int32_t *tokens, float *x)
{
    RLB_PDL_ENTRY();
    int64_t r = blockIdx.x, local = (int64_t)tokens[r] - vocab0;
    bool mine = local >= 0 && local < v_local;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        x[r * D + d] = mine ? ld(table, local * D + d) : 0.0f;
}

/* One row per block: optional x += a, then y = w * (x * inv). */
template <typename W, typename Y>
__global__ void rmsnorm_kernel(float *x, const float *a, const int32_t *rows_index,
                               const W *w, int64_t D, float eps, Y *y)
{
    /* rows of up to kHeld batches stay in registers between the passes, and their norm
     * weights (no kernel of the step writes them) load before the wait */
    constexpr int kHeld = 2;
    const bool held = D <= kHeld * kLoadBatch * (int64_t)blockDim.x;
    float xh[kHeld][kLoadBatch], wh[kHeld][kLoadBatch];
    if (held)
#pragma unroll
        for (int b = 0; b < kHeld; b++)
#pragma unroll
            for (int u = 0; u < kLoadBatch; u++) {
                const int64_t d = threadIdx.x + (b * kLoadBatch + u) * (int64_t)blockDim.x;
                wh[b][u] = d < D ? ld(w, d) : 0.0f;
            }
    RLB_PDL_ENTRY();
    int64_t r = blockIdx.x, src = rows_index ? rows_index[r] : r;
    float *xr = x + src * D;
    const float *ar = a ? a + src * D : nullptr;
    double ss = 0.0;
    int b = 0;
    for (int64_t d0 = threadIdx.x; d0 < D; d0 += kLoadBatch * (int64_t)blockDim.x, b++) {
        float xv[kLoadBatch], av[kLoadBatch];
        load_batch(xr, d0, D, xv);
        if (ar)
            load_batch(ar, d0, D, av);
#pragma unroll
        for (int u = 0; u < kLoadBatch; u++) { /* a thread's elements in ascending order */
            const int64_t d = d0 + u * (int64_t)blockDim.x;
            if (d >= D)
                continue;
            float v = xv[u];
            if (ar) {
                v = v + av[u];
                xr[d] = v;
            }
            ss += (double)v * (double)v;
            xv[u] = v;
        }
        if (held)
#pragma unroll
            for (int hb = 0; hb < kHeld; hb++) /* constant indices: xh stays in registers */
                if (hb == b)
#pragma unroll
                    for (int u = 0; u < kLoadBatch; u++)
                        xh[hb][u] = xv[u];
    }
    ss = block_sum_d(ss);
    float var = (float)(ss / (double)D);
    float inv = 1.0f / sqrtf(var + eps);
    if (held) {
#pragma unroll
        for (int hb = 0; hb < kHeld; hb++)
#pragma unroll
            for (int u = 0; u < kLoadBatch; u++) {
                const int64_t d = threadIdx.x + (hb * kLoadBatch + u) * (int64_t)blockDim.x;
                if (d < D)
                    st(y, r * D + d, wh[hb][u] * (xh[hb][u] * inv));
            }
        return;
    }
    for (int64_t d0 = threadIdx.x; d0 < D; d0 += kLoadBatch * (int64_t)blockDim.x) {
        float xv[kLoadBatch], wv[kLoadBatch];
        load_batch(xr, d0, D, xv);
#pragma unroll
        for (int u = 0; u < kLoadBatch; u++) {
            const int64_t d = d0 + u * (int64_t)blockDim.x;
            wv[u] = d < D ? ld(w, d) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < kLoadBatch; u++) {
            const int64_t d = d0 + u * (int64_t)blockDim.x;
            if (d < D)
                st(y, r * D + d, wv[u] * (xv[u] * inv));
        }
    }
}

__global__ void add_kernel(float *x, const float *a, int64_t n)
{
    RLB_PDL_ENTRY();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = x[i] + a[i];
}

template <typename B>
__global__ void bias_kernel(float *y, const B *bias, int64_t rows, int64_t cols)
{
    RLB_PDL_ENTRY();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * cols;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = y[i] + ld(bias, i % cols);
}

/* Rows over grid.y, columns over grid.x, kLoadBatch columns a thread (no 64-bit division
 * per element, and few blocks: tiny ones spent the kernel's time being scheduled). */
template <typename O>
__global__ void swiglu_kernel(const float *gu, int64_t rows, int64_t inter, O *out)
{
    RLB_PDL_ENTRY();
    const int64_t step = (int64_t)gridDim.x * blockDim.x * kLoadBatch;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const float *gr = gu + r * 2 * inter, *ur = gr + inter;
        for (int64_t c0 = blockIdx.x * (int64_t)blockDim.x * kLoadBatch + threadIdx.x;
             c0 < inter; c0 += step) {
            float gv[kLoadBatch], uv[kLoadBatch];
            load_batch(gr, c0, inter, gv);
            load_batch(ur, c0, inter, uv);
#pragma unroll
            for (int u = 0; u < kLoadBatch; u++) {
                const int64_t c = c0 + u * (int64_t)blockDim.x;
                if (c < inter)
                    st(out, r * inter + c, gv[u] / (1.0f + expf(-gv[u])) * uv[u]);
            }
        }
    }
}

template <typename S, typename D>
__global__ void convert_kernel(const S *src, D *dst, int64_t n)
{
    RLB_PDL_ENTRY();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        st(dst, i, ld(src, i));
}

__global__ void cut_kernel(const float *gath, int64_t out, int64_t vl, int64_t V,
                           float *logits)
{
    RLB_PDL_ENTRY();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < out * V;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t o = i / V, j = i % V;
        logits[i] = gath[(j / vl) * out * vl + o * vl + j % vl];
    }
}

/* ---- RoPE and the cache store ------------------------------------------------------------ */

template <typename T>
__device__ __forceinline__ int64_t cache_off(const rlb_eo_cache &c, int64_t layer, int32_t blk,
                                             int64_t head, int64_t slot_in_block)
{
    return (((int64_t)blk * c.n_layers + layer) * c.kvt + head) * c.block_tokens * c.hd +
           slot_in_block * c.hd;
}

/* The rotation of the pair (x1, x2) = (x[j], x[j + hd / 2]) at position pos: x * cos +
 * rotate_half(x) * sin with the angle float(inv_freq[j] * pos) (sincosf: cosf's and sinf's
 * values, one range reduction), each product and sum rounded on its own as in
 * rlb__rope_apply (no contraction to fma), so rope_store_kernel and the attention kernel's
 * fused form give the same bits. */
__device__ __forceinline__ void rope_angle(const float *inv_freq, int64_t j, int32_t pos,
                                           float &cs, float &sn)
{
    sincosf(inv_freq[j] * (float)pos, &sn, &cs);
}

__device__ __forceinline__ void rope_rotate(float cs, float sn, float &x1, float &x2)
{
    const float y1 = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(-x2, sn));
    const float y2 = __fadd_rn(__fmul_rn(x2, cs), __fmul_rn(x1, sn));
    x1 = y1;
    x2 = y2;
}

__device__ __forceinline__ void rope_pair(const float *inv_freq, int64_t j, int32_t pos,
                                          float &x1, float &x2)
{
    float cs, sn;
    rope_angle(inv_freq, j, pos, cs, sn);
    rope_rotate(cs, sn, x1, x2);
}

/* One block per (row, head) of the qkv row, hd / 2 threads: thread j rotates the pair
 * (j, j + hd / 2) of a q or k head, and a k head's rotated pair and a v head's two values
 * go to the row's cache slot (slot -1: nothing stored). */
template <typename T>
__global__ void rope_store_kernel(float *qkv, int64_t hq, const int32_t *pos,
                                  const float *inv_freq, const int64_t *slot, rlb_eo_cache c,
                                  int64_t layer)
{
    RLB_PDL_ENTRY();
    const int64_t r = blockIdx.x, h = blockIdx.y, hd = c.hd, half = hd / 2, kvt = c.kvt;
    const int64_t j = threadIdx.x;
    if (j >= half)
        return;
    float *xh = qkv + r * (hq + 2 * kvt) * hd + h * hd;
    float x1 = xh[j], x2 = xh[j + half];
    if (h < hq + kvt) {
        rope_pair(inv_freq, j, pos[r], x1, x2);
        xh[j] = x1;
        xh[j + half] = x2;
        if (h < hq)
            return;
    }
    const int64_t s = slot[r];
    if (s < 0)
        return;
    const bool is_k = h < hq + kvt;
    const int64_t head = is_k ? h - hq : h - hq - kvt;
    const int64_t o = cache_off<T>(c, layer, (int32_t)(s / c.block_tokens), head,
                                   s % c.block_tokens);
    T *dst = (T *)(is_k ? c.k : c.v);
    st(dst, o + j, x1);
    st(dst, o + j + half, x2);
}

/* ---- Attention ---------------------------------------------------------------------------- */

constexpr int kAttnWarps = 4;
constexpr int kSlots = RLB_EO_QTILE / kAttnWarps; /* query vectors per warp */

template <typename T>
struct unpack16 {
    static constexpr int N = 16 / (int)sizeof(T);
    union u {
        uint4 v;
        T e[N];
    };
};

/* Element j of the q head at qh into the shared row dst; with inv_freq, the pair (j, j +
 * HD / 2) rotated at pos (j < HD / 2). */
template <int HD>
__device__ __forceinline__ void q_to_shared(const float *qh, const float *inv_freq, int32_t pos,
                                            int j, float *dst)
{
    if (!inv_freq) {
        dst[j] = qh[j];
        return;
    }
    float x1 = qh[j], x2 = qh[j + HD / 2];
    rope_pair(inv_freq, j, pos, x1, x2);
    dst[j] = x1;
    dst[j + HD / 2] = x2;
}

/* With a.inv_freq (a decode step, each span one row): the block of kv head g whose keys
 * [k0, k1) hold the row's own position rotates the row's k and stores it and v to the
 * row's slot (rope_store_kernel's bits), before its first tile reads them back through L2
 * (the caller's __syncthreads comes between). angle(j, cs, sn) gives pair j's rotation. */
template <int HD, typename T, class Angle>
__device__ __forceinline__ void store_row_kv(const rlb_eo_attn &a, const rlb_eo_cache &c,
                                             int64_t layer, int64_t row, int64_t g, int64_t k0,
                                             int64_t k1, Angle angle)
{
    const int32_t newp = a.pos[row];
    const int64_t sl = a.slot[row];
    if (sl < 0 || newp < k0 || newp >= k1)
        return;
    const int64_t kvt = c.kvt, qstride = (a.hq + 2 * kvt) * HD;
    const float *kh = a.qkv + row * qstride + (a.hq + g) * HD, *vh = kh + kvt * HD;
    /* slots below 2^32 (every cache of today) divide in 32 bits */
    const uint32_t us = (uint32_t)sl, ubt = (uint32_t)c.block_tokens;
    const int64_t o =
        sl <= (int64_t)UINT32_MAX
            ? cache_off<T>(c, layer, (int32_t)(us / ubt), g, us % ubt)
            : cache_off<T>(c, layer, (int32_t)(sl / c.block_tokens), g, sl % c.block_tokens);
    T *kd = (T *)c.k + o, *vd = (T *)c.v + o;
    for (int j = threadIdx.x; j < HD / 2; j += blockDim.x) {
        float x1 = kh[j], x2 = kh[j + HD / 2], cs, sn;
        angle(j, cs, sn);
        rope_rotate(cs, sn, x1, x2);
        st(kd, j, x1);
        st(kd, j + HD / 2, x2);
        st(vd, j, vh[j]);
        st(vd, j + HD / 2, vh[j + HD / 2]);
    }
}

template <int HD, typename T>
__global__ void __launch_bounds__(kAttnWarps * kWarp)
    attn_kernel(rlb_eo_attn a, rlb_eo_cache c, int64_t layer)
{
    RLB_PDL_ENTRY();
    constexpr int DPL = (HD + kWarp - 1) / kWarp; /* output dims per lane */
    constexpr int KS = HD + 1;                    /* padded K row */
    constexpr int EPC = unpack16<T>::N;           /* elements per 16-byte chunk */
    constexpr int CPK = HD / EPC;                 /* chunks per key */
    static_assert(HD % EPC == 0, "a key is a whole number of 16-byte chunks");
    __shared__ float sq[RLB_EO_QTILE][HD];
    __shared__ float sk[RLB_EO_KTILE][KS];
    __shared__ float sv[RLB_EO_KTILE][HD];

    const int64_t kvt = c.kvt, hq = a.hq, grp = hq / kvt, g = blockIdx.y, z = blockIdx.z;
    const int64_t qb = blockIdx.x;
    if (qb >= a.span_qb0[a.n_spans])
        return;
    int64_t lo = 0, hi = a.n_spans; /* span_qb0[lo] <= qb < span_qb0[hi] */
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (a.span_qb0[mid] <= qb)
            lo = mid;
        else
            hi = mid;
    }
    const int64_t s = lo, row0 = a.span_row0[s];
    const int64_t v0 = (qb - a.span_qb0[s]) * RLB_EO_QTILE;
    const int64_t nvec = (int64_t)a.span_n[s] * grp;
    const int nv = (int)(nvec - v0 < RLB_EO_QTILE ? nvec - v0 : RLB_EO_QTILE);
    const int64_t qstride = (hq + 2 * kvt) * HD;
    const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;

    const int64_t last = a.pos[row0 + (v0 + nv - 1) / grp] + 1;
    const int64_t kv_len = last > 0 ? last : 0;
    const int64_t per = (kv_len + a.splits - 1) / a.splits;
    const int64_t chunk = (per + RLB_EO_KTILE - 1) / RLB_EO_KTILE * RLB_EO_KTILE;
    const int64_t k0 = z * chunk, k1 = k0 + chunk < kv_len ? k0 + chunk : kv_len;

    /* a.inv_freq (a decode step, each span one row): q and k are rotated here, and the
     * block whose keys hold the row's own position stores the row's k and v to its slot
     * (rope_store_kernel's bits) before its first tile reads them back: the tile loads
     * go through L2 (__ldcg), where the block's stores are once __syncthreads passed */
    const bool rope = a.inv_freq != nullptr;
    const int qn = rope ? HD / 2 : HD; /* a thread takes a rotated pair, or one element */
    for (int i = tid; i < nv * qn; i += blockDim.x) {
        const int vi = i / qn, j = i % qn;
        const int64_t v = v0 + vi, row = row0 + v / grp, h = g * grp + v % grp;
        q_to_shared<HD>(a.qkv + row * qstride + h * HD, a.inv_freq, a.pos[row], j, sq[vi]);
    }
    if (rope)
        store_row_kv<HD, T>(a, c, layer, row0, g, k0, k1, [&](int j, float &cs, float &sn) {
            rope_angle(a.inv_freq, j, a.pos[row0], cs, sn);
        });
    float m[kSlots], l[kSlots], acc[kSlots][DPL];
    int64_t vpos[kSlots];
#pragma unroll
    for (int sl = 0; sl < kSlots; sl++) {
        int v = warp + kAttnWarps * sl;
        m[sl] = -INFINITY;
        l[sl] = 0.0f;
        vpos[sl] = v < nv ? a.pos[row0 + (v0 + v) / grp] : -1;
#pragma unroll
        for (int dd = 0; dd < DPL; dd++)
            acc[sl][dd] = 0.0f;
    }
    const int64_t bt_stride = a.bt_stride_dev ? *a.bt_stride_dev : a.bt_stride;
    const int32_t *table = a.block_tables + s * bt_stride;
    const T *kc = (const T *)c.k, *vc = (const T *)c.v;
    for (int64_t t0 = k0; t0 < k1; t0 += RLB_EO_KTILE) {
        const int nk = (int)(k1 - t0 < RLB_EO_KTILE ? k1 - t0 : RLB_EO_KTILE);
        __syncthreads(); /* the previous tile (and, first time, sq) is complete */
        for (int i = tid; i < nk * CPK; i += blockDim.x) {
            int j = i / CPK, cc = i % CPK;
            int64_t p = t0 + j;
            int32_t blk = table[p / c.block_tokens];
            int64_t o = cache_off<T>(c, layer, blk, g, p % c.block_tokens) + cc * EPC;
            typename unpack16<T>::u kk, vv;
            kk.v = __ldcg(reinterpret_cast<const uint4 *>(kc + o));
            vv.v = __ldcg(reinterpret_cast<const uint4 *>(vc + o));
#pragma unroll
            for (int e = 0; e < EPC; e++) {
                sk[j][cc * EPC + e] = rlb__d_to_f32(kk.e[e]);
                sv[j][cc * EPC + e] = rlb__d_to_f32(vv.e[e]);
            }
        }
        __syncthreads();
#pragma unroll
        for (int sl = 0; sl < kSlots; sl++) {
            const int v = warp + kAttnWarps * sl;
            if (v >= nv)
                continue;
            const bool ok = lane < nk && t0 + lane <= vpos[sl];
            float sc = -INFINITY;
            if (ok) {
                float dot = 0.0f;
#pragma unroll 8
                for (int d = 0; d < HD; d++)
                    dot += sq[v][d] * sk[lane][d];
                sc = dot * a.scale;
            }
            const float tmax = warp_max(sc);
            if (tmax == -INFINITY)
                continue;
            const float mnew = fmaxf(m[sl], tmax);
            const float corr = expf(m[sl] - mnew);
            const float p = ok ? expf(sc - mnew) : 0.0f;
            l[sl] = l[sl] * corr + warp_sum(p);
#pragma unroll
            for (int dd = 0; dd < DPL; dd++)
                acc[sl][dd] *= corr;
            for (int j = 0; j < nk; j++) {
                const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                for (int dd = 0; dd < DPL; dd++) {
                    const int d = lane + kWarp * dd;
                    if (d < HD)
                        acc[sl][dd] += pj * sv[j][d];
                }
            }
            m[sl] = mnew;
        }
    }
    T *out = (T *)a.out;
#pragma unroll
    for (int sl = 0; sl < kSlots; sl++) {
        const int v = warp + kAttnWarps * sl;
        if (v >= nv)
            continue;
        const int64_t row = row0 + (v0 + v) / grp, h = g * grp + (v0 + v) % grp;
        if (a.splits == 1) {
            const float inv = l[sl] > 0.0f ? 1.0f / l[sl] : 0.0f;
#pragma unroll
            for (int dd = 0; dd < DPL; dd++) {
                const int d = lane + kWarp * dd;
                if (d < HD)
                    st(out, row * hq * HD + h * HD + d, acc[sl][dd] * inv);
            }
        } else {
            float *pp = a.partial + ((z * a.rows + row) * hq + h) * (HD + 2);
#pragma unroll
            for (int dd = 0; dd < DPL; dd++) {
                const int d = lane + kWarp * dd;
                if (d < HD)
                    pp[d] = acc[sl][dd];
            }
            if (lane == 0) {
                pp[HD] = m[sl];
                pp[HD + 1] = l[sl];
            }
        }
    }
}

/* One warp per query vector: out = sum_z acc_z e^(m_z - M) / sum_z l_z e^(m_z - M). Lane z
 * holds split z's weight e^(m_z - M) (splits <= 32), so each exponential is taken once. */
template <typename T>
__global__ void attn_combine(const float *partial, int64_t splits, int64_t vectors,
                             int64_t hd, T *out)
{
    RLB_PDL_ENTRY();
    const int64_t vec = blockIdx.x * (int64_t)(blockDim.x / kWarp) + threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    if (vec >= vectors)
        return;
    const int64_t stride = vectors * (hd + 2);
    const float *p = partial + vec * (hd + 2);
    const float mz = lane < splits ? p[lane * stride + hd] : -INFINITY;
    const float M = warp_max(mz);
    const float wz = mz != -INFINITY ? expf(mz - M) : 0.0f;
    const float L = warp_sum(lane < splits && mz != -INFINITY ? p[lane * stride + hd + 1] * wz
                                                              : 0.0f);
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    constexpr int kDims = 128 / kWarp; /* head_dim <= 128: at most 4 dims per lane */
    float o[kDims] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int z = 0; z < (int)splits; z++) {
        const float w = __shfl_sync(0xffffffffu, wz, z); /* every lane takes part */
        if (w == 0.0f)
            continue;
#pragma unroll
        for (int q = 0; q < kDims; q++)
            if (lane + q * kWarp < hd)
                o[q] += p[z * stride + lane + q * kWarp] * w;
    }
#pragma unroll
    for (int q = 0; q < kDims; q++)
        if (lane + q * kWarp < hd)
            st(out, vec * hd + lane + q * kWarp, o[q] * inv);
}

/* ---- Decode attention on tensor cores ------------------------------------------------------ */

/* A decode step whose spans are each one row (rlb_eo_attn.one_row), bf16 cache, head_dim 64
 * or 128, at most 16 q heads per kv head: one block per (row, kv head, split), 4 warps, each
 * warp taking every fourth step of 16 keys of the block's range with mma.sync m16n8k16 (bf16
 * in, f32 accumulation), the online softmax in registers (FlashAttention-2's layout: the
 * score accumulators of two 8-key tiles are the A operand of P.V), and the four warps'
 * (max, sum, acc) merged through shared memory at the end.
 *
 * Layout, groups of 9 to 16 q heads (G16): S = Q K^T has the group's q heads as its 16
 * rows (rows past the group are zero). Groups of up to 8 (Llama-3's 4 among them) run the
 * transpose, S^T = K Q^T with the step's 16 keys as the rows and the q heads as the 8
 * columns, and O^T = V^T P^T: half the mma.sync of the G16 form and half its accumulators
 * (126 registers at head_dim 64: four blocks a multiprocessor). The A and B operands hold
 * the same words as in the G16 form, swapped; P^T's fragment is the score accumulator
 * transposed in registers (movmatrix, two 8 x 8 tiles). What follows says it for the G16
 * form.
 * A dot product does not depend on the order of its terms, so the hd axis is permuted to
 * make every load a 16-byte one that, with the other lanes' loads of the same instruction,
 * covers whole 32-byte sectors: lane t (t = lane % 4) holds the 16-byte chunks t, t + 4,
 * t + 8, ... of its key (lane / 4 of the 8-key tile), so one load instruction of the four
 * lanes of a key reads 64 contiguous bytes. In k-step kk, mma column 2t + j is element
 * 4 (kk % 2) + j and column 2t + 8 + j element 4 (kk % 2) + 2 + j of the lane's chunk kk / 2,
 * i.e. hd 8 (4 (kk / 2) + t) + 4 (kk % 2) + j (+ 2). In O = P V the output columns are
 * permuted the same way: lane n (n = lane / 4) loads the chunks n, n + 8, ... of each of its
 * four values (keys 2t, 2t + 1, 2t + 8, 2t + 9) and pairs them with byte permutes, so
 * n-tile nt's column n is hd 8 (8 (nt / 8) + n) + nt % 8. Every byte of the block's keys
 * and values is loaded once, from L2 (__ldcg: the row's own k and v may have been stored by
 * this block).
 *
 * Precision: q and p are split into bf16 hi + lo parts (x - hi rounds to about 2^-17 x),
 * two products each, so the scores and the weighted sum keep about 16 bits more than bf16
 * operands would: the result stays within the classic kernel's tolerance of the CPU's
 * float arithmetic. The order of the sums is another than the classic kernel's, so the bits
 * differ from it (not from run to run: the work division is fixed by the step's shape).
 *
 * Check: tests/gpu/test_cuda_engine_ops (test_attention_decode_tc, against the CPU), and
 * where no GPU is, tests/unit/test_mma_layout.py (this warp simulated lane by lane with the
 * PTX ISA's fragment layouts: the index formulas here must stay in step with it). */
constexpr int kTcWarps = 4;
constexpr int kTcKeys = 16; /* keys of a warp's step */

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* The 8 x 8 matrix of 16-bit elements whose row lane / 4, columns 2 (lane % 4) and + 1 the
 * lane holds (low half first), transposed: the lane gets row lane / 4 of the transpose. */
__device__ __forceinline__ uint32_t movmatrix_t(uint32_t x)
{
    uint32_t y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

/* (x, y) as bf16 pairs hi = bf16(x, y) and lo = bf16(x - hi.x, y - hi.y), x in the low
 * half (the smaller column of an mma fragment). */
__device__ __forceinline__ void split_bf16(float x, float y, uint32_t &hi, uint32_t &lo)
{
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    const float2 hf = __bfloat1622float2(h);
    const __nv_bfloat162 l = __floats2bfloat162_rn(x - hf.x, y - hf.y);
    hi = *reinterpret_cast<const uint32_t *>(&h);
    lo = *reinterpret_cast<const uint32_t *>(&l);
}

__device__ __forceinline__ uint32_t word_of(const uint4 &v, int i)
{
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

/* The 16-bit element e of a lane's run of 16-byte chunks, paired with the same element of
 * another run: (x[e], y[e]), x in the low half. */
template <int N>
__device__ __forceinline__ uint32_t pair_elems(const uint4 (&x)[N], const uint4 (&y)[N], int e)
{
    const uint32_t wx = word_of(x[e / 8], (e % 8) / 2), wy = word_of(y[e / 8], (e % 8) / 2);
    return __byte_perm(wx, wy, e % 2 ? 0x7632 : 0x5410);
}

/* Where a warp's step of kTcKeys keys from t0 (a multiple of kTcKeys) lies in the cache of
 * kv head g: with block_tokens a multiple of kTcKeys the step sits in one cache block, and
 * key t0 + i is element off0 + i * hd (off0 looked up ahead, see step_offsets); otherwise
 * each key is looked up (32-bit division: positions are int32). */
struct step_keys {
    const rlb_eo_cache *c;
    const int32_t *table;
    int64_t layer, g, t0, off0;
    bool one_block;
    __device__ __forceinline__ step_keys(const rlb_eo_cache &cc, const int32_t *tab, int64_t l,
                                         int64_t gg, int64_t t, int64_t o0)
        : c(&cc), table(tab), layer(l), g(gg), t0(t), off0(o0),
          one_block(cc.block_tokens % kTcKeys == 0)
    {
    }
    __device__ __forceinline__ int64_t off(int64_t p) const
    {
        if (one_block)
            return off0 + (p - t0) * c->hd;
        const uint32_t bt = (uint32_t)c->block_tokens, up = (uint32_t)p;
        return cache_off<rlb__bf16_t>(*c, layer, table[up / bt], g, up % bt);
    }
};

/* N 16-byte chunks of key (or value) p, every STRIDE-th from element e0 on, through L2;
 * zeros for p >= k1 (past the range: such keys are masked, and the cache there may hold
 * NaN). */
template <int STRIDE, int N>
__device__ __forceinline__ void load_key_run(const step_keys &sk, int64_t p, int64_t k1,
                                             const rlb__bf16_t *base, int e0, uint4 (&r)[N])
{
    const uint4 *src =
        p < k1 ? reinterpret_cast<const uint4 *>(base + sk.off(p) + e0) : nullptr;
#pragma unroll
    for (int u = 0; u < N; u++)
        r[u] = src ? __ldcg(src + u * STRIDE) : make_uint4(0, 0, 0, 0);
}

/* With one cache block a step (step_keys.one_block), lane l of a warp holds the cache offset
 * of the warp's step base + l, its steps being those of keys k0 + kTcKeys (warp + kTcWarps
 * s): one table lookup for 32 steps, made before they are needed, so a step's key and value
 * loads do not first wait on a lookup of their own. */
__device__ __forceinline__ int64_t step_offsets(const rlb_eo_cache &c, const int32_t *table,
                                                int64_t layer, int64_t g, int64_t k0,
                                                int64_t k1, int warp, int64_t base)
{
    const int64_t t = k0 + kTcKeys * (warp + kTcWarps * (base + threadIdx.x % kWarp));
    if (c.block_tokens % kTcKeys != 0 || t >= k1)
        return 0;
    const uint32_t bt = (uint32_t)c.block_tokens, ut = (uint32_t)t;
    return cache_off<rlb__bf16_t>(c, layer, table[ut / bt], g, ut % bt);
}

template <int HD, bool G16>
__global__ void __launch_bounds__(kTcWarps * kWarp, HD == 64 ? (G16 ? 3 : 4) : 2)
    attn_decode_tc(rlb_eo_attn a, rlb_eo_cache c, int64_t layer)
{
    RLB_PDL_ENTRY();
    using T = rlb__bf16_t;
    constexpr int R = G16 ? 16 : 8; /* q heads a block may hold */
    constexpr int HI = 8;           /* a fragment's second row (G16) */
    constexpr int KQ = HD / 4;      /* hd elements of a key one lane holds */
    constexpr int KSTEPS = HD / 16; /* mma k-steps over hd */
    constexpr int VQ = HD / 8;      /* hd elements of a value one lane holds; O's n-tiles */
    constexpr int QS = HD + 4;      /* padded q row */
    constexpr int AS = HD + 8;      /* padded accumulator row */
    /* the next keys load during this step's softmax and P.V, and so do the next values,
     * into a second buffer; at head_dim 128 with 16 q heads after P.V (the registers would
     * spill). Registers (ptxas, sm_90): <64, O^T> 126 (four blocks a multiprocessor),
     * <64, O> 168, <128, O^T> 238, <128, O> 254 */
    constexpr bool K_AHEAD = HD <= 64 || !G16;
    constexpr bool V_AHEAD = HD <= 64 || !G16;
    __shared__ __align__(16) float sq[R][QS];
    __shared__ float sm[kTcWarps][R], sl[kTcWarps][R];
    __shared__ __align__(16) float sacc[kTcWarps][R][AS];

    const int64_t s = blockIdx.x, g = blockIdx.y, z = blockIdx.z;
    if (s >= a.n_spans)
        return;
    /* 32-bit divisions: head counts, positions and split counts are small, and a 64-bit
     * division is a long subroutine every thread would run */
    const int64_t kvt = c.kvt, hq = a.hq, grp = (int32_t)hq / (int32_t)kvt;
    const int64_t row = a.span_row0[s], qstride = (hq + 2 * kvt) * HD;
    const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
    const int gq = lane / 4, t = lane % 4;
    const int64_t kv_len = a.pos[row] >= 0 ? (int64_t)a.pos[row] + 1 : 0;
    const int64_t per = (uint32_t)(kv_len + a.splits - 1) / (uint32_t)a.splits;
    const int64_t chunk = (per + RLB_EO_KTILE - 1) / RLB_EO_KTILE * RLB_EO_KTILE;
    const int64_t k0 = z * chunk, k1 = k0 + chunk < kv_len ? k0 + chunk : kv_len;

    const int64_t bt_stride = a.bt_stride_dev ? *a.bt_stride_dev : a.bt_stride;
    const int32_t *table = a.block_tables + s * bt_stride;
    const T *kc = (const T *)c.k, *vc = (const T *)c.v;
    /* a step's keys: lane (gq, t) holds chunks t, t + 4, ... of keys t0 + gq and t0 + 8 +
     * gq, and chunks gq, gq + 8, ... of the values of keys t0 + 2t, 2t + 1, 2t + 8, 2t + 9.
     * The next step's keys load while this one's softmax and P.V run (K_AHEAD), and so do
     * its values, into vn (V_AHEAD); at head_dim 128 its values load while its own scores
     * do */
    uint4 kr[2][KQ / 8], vr[4][VQ / 8];
    const auto load_k = [&](const step_keys &sk) {
#pragma unroll
        for (int j = 0; j < 2; j++)
            load_key_run<4>(sk, sk.t0 + 8 * j + gq, k1, kc, 8 * t, kr[j]);
    };
    const auto load_v = [&](const step_keys &sk, uint4 (&dst)[4][VQ / 8]) {
#pragma unroll
        for (int i = 0; i < 4; i++)
            load_key_run<8>(sk, sk.t0 + 2 * t + (i & 1) + 8 * (i >> 1), k1, vc, 8 * gq, dst[i]);
    };
    uint4 vn[4][V_AHEAD ? VQ / 8 : 1]; /* the next step's values (V_AHEAD) */
    /* the first step's keys load before the q prologue, unless they hold the row's own
     * position, whose key and value this block may be about to store */
    int64_t t0 = k0 + warp * kTcKeys;
    int64_t offs = step_offsets(c, table, layer, g, k0, k1, warp, 0); /* steps 0..31 */
    const bool rope = a.inv_freq != nullptr;
    const bool early = t0 < k1 && (!rope || a.pos[row] >= t0 + kTcKeys);
    if (early) {
        const step_keys first(c, table, layer, g, t0, __shfl_sync(0xffffffffu, offs, 0));
        load_k(first);
        load_v(first, vr);
    }
    /* the group's q heads into shared memory (rotated with a.inv_freq), zero rows after.
     * Rotated, thread tid takes pair j = tid % (HD / 2) of every (blockDim / (HD / 2))-th
     * head: one angle a thread, and the same for the row's k (store_row_kv: j = tid) */
    static_assert(kTcWarps * kWarp % (HD / 2) == 0, "a thread's pairs share one angle");
    const float *qg = a.qkv + row * qstride + g * grp * HD;
    if (rope) {
        constexpr int H2 = HD / 2;
        const int j = tid % H2;
        float cs, sn;
        rope_angle(a.inv_freq, j, a.pos[row], cs, sn);
        for (int h = tid / H2; h < R; h += kTcWarps * kWarp / H2) {
            float x1 = 0.0f, x2 = 0.0f;
            if (h < grp) {
                x1 = qg[h * HD + j];
                x2 = qg[h * HD + j + H2];
                rope_rotate(cs, sn, x1, x2);
            }
            sq[h][j] = x1;
            sq[h][j + H2] = x2;
        }
        store_row_kv<HD, T>(a, c, layer, row, g, k0, k1, [&](int, float &c_, float &s_) {
            c_ = cs;
            s_ = sn;
        });
    } else {
        for (int i = tid; i < R * HD; i += kTcWarps * kWarp)
            sq[i / HD][i % HD] = i / HD < grp ? qg[i] : 0.0f;
    }
    __syncthreads();
    if (t0 < k1 && !early) {
        const step_keys first(c, table, layer, g, t0, __shfl_sync(0xffffffffu, offs, 0));
        load_k(first);
        load_v(first, vr);
    }

    /* Q's fragments, hd permuted as above: G16, the A operand (all four words); otherwise
     * words 0 and 2 are the B operand of S^T and 1, 3 are unused */
    uint32_t qhi[KSTEPS][4], qlo[KSTEPS][4];
#pragma unroll
    for (int kk = 0; kk < KSTEPS; kk++) {
        const int e = 8 * (4 * (kk / 2) + t) + 4 * (kk % 2);
        const float4 q0 = *reinterpret_cast<const float4 *>(&sq[gq][e]);
        split_bf16(q0.x, q0.y, qhi[kk][0], qlo[kk][0]);
        split_bf16(q0.z, q0.w, qhi[kk][2], qlo[kk][2]);
        if constexpr (G16) {
            const float4 q1 = *reinterpret_cast<const float4 *>(&sq[gq + HI][e]);
            split_bf16(q1.x, q1.y, qhi[kk][1], qlo[kk][1]);
            split_bf16(q1.z, q1.w, qhi[kk][3], qlo[kk][3]);
        }
    }

    /* O's accumulators. G16: O (rows gq (0, 1) and gq + 8 (2, 3) of n-tile nt). Otherwise
     * O^T: m-tile mt's rows gq and gq + 8 are n-tile 2 mt's and 2 mt + 1's column gq, its
     * columns 2t, 2t + 1 q heads (0, 2: head 2t; 1, 3: head 2t + 1) */
    constexpr int OT = G16 ? VQ : VQ / 2;
    float o[OT][4];
#pragma unroll
    for (int mt = 0; mt < OT; mt++)
        o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.0f;
    /* G16: rows gq (m0, l0) and gq + 8 (m1, l1); otherwise heads 2t (m0, l0), 2t + 1 */
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    /* the online softmax of a step: the maxima mx0, mx1 of its scores (reduced over the
     * lanes XORed by x0, 2 x0, ...), the corrections of the old state */
    const auto rescale = [&](float mx0, float mx1, int x0, int xn, float &c0, float &c1) {
        for (int x = x0; x <= xn; x <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
        }
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        c0 = m0 == -INFINITY ? 0.0f : expf(m0 - n0);
        c1 = m1 == -INFINITY ? 0.0f : expf(m1 - n1);
        m0 = n0;
        m1 = n1;
        l0 *= c0;
        l1 *= c1;
    };
    for (int64_t step = 1; t0 < k1; t0 += kTcWarps * kTcKeys, step++) {
        const int64_t tn = t0 + kTcWarps * kTcKeys;
        if (step % kWarp == 0 && tn < k1) /* the next 32 steps' offsets */
            offs = step_offsets(c, table, layer, g, k0, k1, warp, step);
        const step_keys next(c, table, layer, g, tn,
                             __shfl_sync(0xffffffffu, offs, (int)(step % kWarp)));
        const int rem = (int)(k1 - t0 < kTcKeys ? k1 - t0 : kTcKeys); /* keys in range */
        if constexpr (G16) {
            float sc[2][4]; /* S of keys t0 + 8 j + 2t (+1): rows gq (0, 1), gq + 8 (2, 3) */
#pragma unroll
            for (int j = 0; j < 2; j++) {
                sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < KSTEPS; kk++) {
                    const uint32_t b0 = word_of(kr[j][kk / 2], (kk % 2) * 2);
                    const uint32_t b1 = word_of(kr[j][kk / 2], (kk % 2) * 2 + 1);
                    mma_bf16(sc[j], qhi[kk], b0, b1);
                    mma_bf16(sc[j], qlo[kk], b0, b1);
                }
            }
            if (K_AHEAD && tn < k1) {
                load_k(next);
                if constexpr (V_AHEAD)
                    load_v(next, vn);
            }
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const bool ok = 8 * j + 2 * t + (e & 1) < rem;
                    sc[j][e] = ok ? sc[j][e] * a.scale : -INFINITY;
                    if (e < 2)
                        mx0 = fmaxf(mx0, sc[j][e]);
                    else
                        mx1 = fmaxf(mx1, sc[j][e]);
                }
            float c0, c1;
            rescale(mx0, mx1, 1, 2, c0, c1);
            float p[2][4];
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    p[j][e] = sc[j][e] == -INFINITY ? 0.0f
                                                    : expf(sc[j][e] - (e < 2 ? m0 : m1));
                    if (e < 2)
                        l0 += p[j][e];
                    else
                        l1 += p[j][e];
                }
            uint32_t phi[4], plo[4]; /* A fragments of P: keys 2t (+1) and 2t + 8 (+9) */
            split_bf16(p[0][0], p[0][1], phi[0], plo[0]);
            split_bf16(p[0][2], p[0][3], phi[1], plo[1]);
            split_bf16(p[1][0], p[1][1], phi[2], plo[2]);
            split_bf16(p[1][2], p[1][3], phi[3], plo[3]);
#pragma unroll
            for (int nt = 0; nt < VQ; nt++) {
                o[nt][0] *= c0;
                o[nt][1] *= c0;
                o[nt][2] *= c1;
                o[nt][3] *= c1;
                const uint32_t b0 = pair_elems(vr[0], vr[1], nt);
                const uint32_t b1 = pair_elems(vr[2], vr[3], nt);
                mma_bf16(o[nt], phi, b0, b1);
                mma_bf16(o[nt], plo, b0, b1);
            }
        } else {
            /* S^T = K Q^T: keys are the 16 rows (A: keys gq and gq + 8, the words the G16
             * form gives its two n-tiles), q heads the 8 columns (B: Q's fragment) */
            float st[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* keys gq (0, 1), gq + 8 (2, 3) */
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk++) {
                const int w = (kk % 2) * 2;
                const uint32_t ka[4] = {word_of(kr[0][kk / 2], w), word_of(kr[1][kk / 2], w),
                                        word_of(kr[0][kk / 2], w + 1),
                                        word_of(kr[1][kk / 2], w + 1)};
                mma_bf16(st, ka, qhi[kk][0], qhi[kk][2]);
                mma_bf16(st, ka, qlo[kk][0], qlo[kk][2]);
            }
            if (K_AHEAD && tn < k1) {
                load_k(next);
                if constexpr (V_AHEAD)
                    load_v(next, vn);
            }
#pragma unroll
            for (int e = 0; e < 4; e++)
                st[e] = gq + (e < 2 ? 0 : 8) < rem ? st[e] * a.scale : -INFINITY;
            float c0, c1;
            rescale(fmaxf(st[0], st[2]), fmaxf(st[1], st[3]), 4, 16, c0, c1);
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; e++)
                p[e] = st[e] == -INFINITY ? 0.0f : expf(st[e] - (e % 2 ? m1 : m0));
            l0 += p[0] + p[2];
            l1 += p[1] + p[3];
            /* P^T's B fragment: the 8 x 8 tiles (keys 0-7 and 8-15) x heads, transposed in
             * registers, so lane (gq, t) holds head gq's p of keys 2t, 2t + 1 (+ 8) */
            uint32_t h0, l0w, h1, l1w;
            split_bf16(p[0], p[1], h0, l0w);
            split_bf16(p[2], p[3], h1, l1w);
            const uint32_t bh0 = movmatrix_t(h0), bh1 = movmatrix_t(h1);
            const uint32_t bl0 = movmatrix_t(l0w), bl1 = movmatrix_t(l1w);
            /* O^T += V^T P^T: V^T's rows (hd) are the G16 form's B columns of n-tiles 2 mt
             * (rows gq) and 2 mt + 1 (rows gq + 8) */
#pragma unroll
            for (int mt = 0; mt < OT; mt++) {
                o[mt][0] *= c0;
                o[mt][1] *= c1;
                o[mt][2] *= c0;
                o[mt][3] *= c1;
                const uint32_t va[4] = {
                    pair_elems(vr[0], vr[1], 2 * mt), pair_elems(vr[0], vr[1], 2 * mt + 1),
                    pair_elems(vr[2], vr[3], 2 * mt), pair_elems(vr[2], vr[3], 2 * mt + 1)};
                mma_bf16(o[mt], va, bh0, bh1);
                mma_bf16(o[mt], va, bl0, bl1);
            }
        }
        if (tn < k1) {
            if (!K_AHEAD)
                load_k(next);
            if constexpr (V_AHEAD) {
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int u = 0; u < VQ / 8; u++)
                        vr[i][u] = vn[i][u];
            } else {
                load_v(next, vr);
            }
        }
    }
    /* each warp's state to shared memory; accumulator position nt * 8 + n is hd
     * 8 (8 (nt / 8) + n) + nt % 8 */
    if constexpr (G16) {
#pragma unroll
        for (int x = 1; x <= 2; x <<= 1) {
            l0 += __shfl_xor_sync(0xffffffffu, l0, x);
            l1 += __shfl_xor_sync(0xffffffffu, l1, x);
        }
        if (t == 0) {
            sm[warp][gq] = m0;
            sl[warp][gq] = l0;
            sm[warp][gq + HI] = m1;
            sl[warp][gq + HI] = l1;
        }
#pragma unroll
        for (int nt = 0; nt < VQ; nt++) {
            *reinterpret_cast<float2 *>(&sacc[warp][gq][nt * 8 + 2 * t]) =
                make_float2(o[nt][0], o[nt][1]);
            *reinterpret_cast<float2 *>(&sacc[warp][gq + HI][nt * 8 + 2 * t]) =
                make_float2(o[nt][2], o[nt][3]);
        }
    } else {
#pragma unroll
        for (int x = 4; x <= 16; x <<= 1) {
            l0 += __shfl_xor_sync(0xffffffffu, l0, x);
            l1 += __shfl_xor_sync(0xffffffffu, l1, x);
        }
        if (gq == 0) {
            sm[warp][2 * t] = m0;
            sl[warp][2 * t] = l0;
            sm[warp][2 * t + 1] = m1;
            sl[warp][2 * t + 1] = l1;
        }
#pragma unroll
        for (int mt = 0; mt < OT; mt++) {
            sacc[warp][2 * t][16 * mt + gq] = o[mt][0];
            sacc[warp][2 * t + 1][16 * mt + gq] = o[mt][1];
            sacc[warp][2 * t][16 * mt + 8 + gq] = o[mt][2];
            sacc[warp][2 * t + 1][16 * mt + 8 + gq] = o[mt][3];
        }
    }
    __syncthreads();
    /* the merge: a head's warp weights e^(m_w - M) (into sm), M and L, once a head */
    __shared__ float shead[2][R]; /* M, L */
    if (tid < grp) {
        float M = -INFINITY, L = 0.0f;
#pragma unroll
        for (int w = 0; w < kTcWarps; w++)
            M = fmaxf(M, sm[w][tid]);
#pragma unroll
        for (int w = 0; w < kTcWarps; w++) {
            const float wt =
                M == -INFINITY || sm[w][tid] == -INFINITY ? 0.0f : expf(sm[w][tid] - M);
            L += sl[w][tid] * wt;
            sm[w][tid] = wt;
        }
        shead[0][tid] = M;
        shead[1][tid] = L;
    }
    __syncthreads();
    T *out = (T *)a.out;
    for (int i = tid; i < grp * HD; i += blockDim.x) {
        const int h = i / HD, jpos = i % HD, nt = jpos / 8;
        const int d = 8 * (8 * (nt / 8) + jpos % 8) + nt % 8;
        const float M = shead[0][h], L = shead[1][h];
        float acc = 0.0f;
        if (M != -INFINITY)
#pragma unroll
            for (int w = 0; w < kTcWarps; w++)
                acc += sacc[w][h][jpos] * sm[w][h];
        const int64_t hh = g * grp + h;
        if (a.splits == 1) {
            st(out, row * hq * HD + hh * HD + d, acc * (L > 0.0f ? 1.0f / L : 0.0f));
        } else {
            float *pp = a.partial + ((z * a.rows + row) * hq + hh) * (HD + 2);
            pp[d] = acc;
            if (jpos == 0) {
                pp[HD] = M;
                pp[HD + 1] = L;
            }
        }
    }
}

template <int HD, typename T>
int attention_hd(cudaStream_t stream, const rlb_eo_attn *a, const rlb_eo_cache *c,
                 int64_t layer)
{
    dim3 grid((unsigned)a->qblocks, (unsigned)c->kvt, (unsigned)a->splits);
    const int64_t grp = a->hq / c->kvt;
    bool tc = false; /* the tensor-core decode kernel serves the step */
    if constexpr (std::is_same<T, rlb__bf16_t>::value && (HD == 64 || HD == 128)) {
        if (a->one_row && grp <= 16) {
            tc = true;
            grid.x = (unsigned)a->n_spans;
            rlb__pdl_launch(grp <= 8 ? attn_decode_tc<HD, false> : attn_decode_tc<HD, true>,
                            grid, kTcWarps * kWarp, stream, *a, *c, layer);
        }
    }
    if (!tc)
        rlb__pdl_launch(attn_kernel<HD, T>, grid, kAttnWarps * kWarp, stream, *a, *c, layer);
    int rc = launched("attention");
    if (rc || a->splits == 1)
        return rc;
    const int64_t vectors = a->rows * a->hq;
    rlb__pdl_launch(attn_combine<T>, grid_for(vectors, 4), 4 * kWarp, stream, a->partial,
                    a->splits, vectors, HD, (T *)a->out);
    return launched("attention combine");
}

/* ---- Sampling ------------------------------------------------------------------------------ */

constexpr int kSampleThreads = 1024;
/* Fixed-point scale of a token's mass p = exp(z - max z) in top-p: integer masses add up
 * exactly in any order (128K tokens of at most 2^40 stay below 2^57). */
constexpr double kMassScale = 1099511627776.0;

/* z's bits as a key that orders like z (-0 as +0, so equal z give equal keys). */
__device__ __forceinline__ uint32_t zkey(float z)
{
    const uint32_t u = __float_as_uint(z == 0.0f ? 0.0f : z);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

__device__ __forceinline__ float zkey_value(uint32_t k)
{
    return __uint_as_float(k & 0x80000000u ? k & 0x7fffffffu : ~k);
}

__device__ unsigned long long block_sum_u64(unsigned long long v)
{
    __shared__ unsigned long long total;
    if (threadIdx.x == 0)
        total = 0;
    __syncthreads();
    atomicAdd(&total, v);
    __syncthreads();
    const unsigned long long t = total;
    __syncthreads();
    return t;
}

/* Radix select over the tokens i < V with in(i), ordered by key(i) descending, each
 * weighing w(i): the key of the first token at which the running weight reaches `want`
 * (weight 1: the want-th largest key; weight = mass: where the cumulative mass crosses).
 * *above gets the weight of the keys strictly larger. Four passes of 8 bits, integer
 * histograms: exact and in no particular order, so the result is deterministic. */
template <class In, class Key, class Weight>
__device__ uint32_t radix_select(int64_t V, In in, Key key, Weight w, double want,
                                 unsigned long long *above)
{
    __shared__ unsigned long long hist[256];
    __shared__ uint32_t s_bin;
    __shared__ unsigned long long s_above;
    uint32_t prefix = 0, mask = 0;
    unsigned long long ab = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x)
            hist[b] = 0;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
            if (!in(i))
                continue;
            const uint32_t k = key(i);
            if ((k & mask) == prefix)
                atomicAdd(&hist[(k >> shift) & 255u], w(i));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int b = 255;
            for (; b > 0 && (double)(ab + hist[b]) < want; b--)
                ab += hist[b];
            s_bin = (uint32_t)b;
            s_above = ab;
        }
        __syncthreads();
        prefix |= s_bin << shift;
        mask |= 255u << shift;
        ab = s_above;
        __syncthreads();
    }
    *above = ab;
    return prefix;
}

/* The passes over a row that need no whole-row result are split into kSampleChunks chunks
 * per job, one warp each, kChunkWarps (job, chunk) items a block (one block per row took
 * ~100 us on a 128K vocabulary, latency-bound; one block per chunk, of 8 KB, left the
 * batch-256 step waiting on 16 waves of short blocks). sample_chunk reads its chunk twice,
 * the second time from the cache: first the chunk's first maximum zc of z = x / T, then the
 * sum of e^(z - zc) and, for a job without top-k / top-p, the race winner (the largest p / e
 * with p = e^(z - zc)). sample_kernel takes the row's maximum zmax from the chunks' and
 * combines them in chunk order, each scaled by e^(zc - zmax): the same first maximum and the
 * race's winner up to the rounding of p (both are order-free: ties go to the smaller id),
 * and a sum in a fixed order (deterministic, batch-invariant). So the logits are read from
 * memory once (a pass for the maximum alone took 52 us of the 1B batch-256 step under
 * ncu). Top-k / top-p keep their whole-row radix passes.
 *
 * A chunk's sum is added in the order of a 256-thread scan (kSumWarps warps of it): thread
 * t = 32 w + l sums the tokens lo + t + 256 j in ascending j, each warp's 32 sums meet in a
 * shuffle tree and the 8 trees' results add up in w order, as block_sum_d adds. The warp
 * that takes the chunk holds thread 32 w + l's sum in lane l's s[w]: lane l reads the
 * tokens lo + l + 32 m (m = 8 j + w) in ascending m, so every load instruction reads 128
 * contiguous bytes, and the order, hence the bits, does not depend on the batch. */
constexpr int kSampleChunks = 64;
constexpr int kChunkWarps = 8;  /* (job, chunk) items a block, one a warp */
constexpr int kSumWarps = 8;    /* warps of the scan whose order a chunk's sum keeps */
constexpr int kChunkLoads = 16; /* a lane's loads in flight (a multiple of kSumWarps) */

struct sample_part {
    float zmax;    /* the chunk's first maximum of z (-inf: every z is -inf or NaN) */
    int32_t imax;  /* its token */
    double sum;    /* the sum of e^(z - zsub), zsub = zmax where finite, else 0 */
    double best;   /* the race's best p / e, p = e^(z - zmax) (-1: no candidate) */
    int64_t ibest; /* its token */
};

__device__ __forceinline__ bool plain_sampling(const rlb_eo_sample_job &job, int64_t V)
{
    return job.temperature > RLB_SAMPLE_GREEDY_EPS && !(job.top_k > 0 && job.top_k < V) &&
           !(job.top_p < 1.0f);
}

__device__ __forceinline__ float job_t(const rlb_eo_sample_job &job)
{
    return job.temperature <= RLB_SAMPLE_GREEDY_EPS ? 1.0f : job.temperature;
}

__device__ __forceinline__ void chunk_range(int64_t V, int64_t c, int64_t *lo, int64_t *hi)
{
    *lo = V * c / kSampleChunks;
    *hi = V * (c + 1) / kSampleChunks;
}

/* f(i, x[i], w) for the lane's tokens i = lo + lane + 32 m of [lo, hi) in ascending m,
 * w = m % kSumWarps (a constant after unrolling), the loads kChunkLoads at a time. */
template <class F>
__device__ __forceinline__ void warp_scan(const float *x, int64_t lo, int64_t hi, F f)
{
    for (int64_t b = lo + threadIdx.x % kWarp; b < hi; b += kChunkLoads * kWarp) {
        float xv[kChunkLoads];
#pragma unroll
        for (int u = 0; u < kChunkLoads; u++)
            xv[u] = b + u * kWarp < hi ? x[b + u * kWarp] : 0.0f;
#pragma unroll
        for (int u = 0; u < kChunkLoads; u++)
            if (b + u * kWarp < hi)
                f(b + u * kWarp, xv[u], u % kSumWarps);
    }
}

/* The warp's (job, chunk) item: false past the last. */
__device__ __forceinline__ bool chunk_item(int64_t n, int64_t *item)
{
    *item = (int64_t)blockIdx.x * kChunkWarps + threadIdx.x / kWarp;
    return *item < n * kSampleChunks;
}

/* The row's first maximum from the chunks' (every lane gets it). */
__device__ __forceinline__ void row_max(const sample_part *p, int64_t V, float *zmax,
                                        int64_t *imax)
{
    /* each warp by itself, the chunks over its lanes: the largest z, then the smallest
     * index (order-free, so the scan's result in chunk order) */
    float z = -INFINITY;
    int64_t i = V;
    for (int c = (int)threadIdx.x % kWarp; c < kSampleChunks; c += kWarp)
        if (p[c].zmax > z || (p[c].zmax == z && p[c].imax < i)) {
            z = p[c].zmax;
            i = p[c].imax;
        }
    warp_argmax(z, i);
    *zmax = z;
    *imax = i;
}

__global__ void __launch_bounds__(kChunkWarps * kWarp)
    sample_chunk(const float *logits, int64_t V, const rlb_eo_sample_job *jobs, int64_t n,
                 sample_part *part)
{
    RLB_PDL_ENTRY();
    int64_t item;
    if (!chunk_item(n, &item))
        return;
    const rlb_eo_sample_job job = jobs[item / kSampleChunks];
    const float *x = logits + job.row * V;
    const float T = job_t(job);
    int64_t lo, hi;
    chunk_range(V, item % kSampleChunks, &lo, &hi);
    float zc = -INFINITY;
    int64_t ic = V;
    warp_scan(x, lo, hi, [&](int64_t i, float xi, int) {
        const float z = xi / T;
        if (z > zc) { /* a lane scans ascending: it keeps its first maximum */
            zc = z;
            ic = i;
        }
    });
    warp_argmax(zc, ic);
    /* the second pass: the sum, and for plain sampling the race (rlb__race_score skips the
     * logs of tokens that cannot win; the first best of any order is the scan's). A chunk
     * without a finite maximum subtracts 0: its sum is then 0, infinite or NaN, as the
     * row's must come out (sample_kernel refuses the latter two). */
    const float zsub = isfinite(zc) ? zc : 0.0f;
    const bool race = plain_sampling(job, V) && isfinite(zc);
    const uint64_t prefix = race ? rlb__noise_prefix(job.seed, job.sample, job.pos) : 0;
    double s[kSumWarps] = {}, best = -1.0;
    int64_t ibest = V;
    warp_scan(x, lo, hi, [&](int64_t i, float xi, int w) {
        const float pr = expf(xi / T - zsub);
        s[w] += pr;
        if (!race)
            return;
        const double score =
            rlb__race_score(pr, rlb__bits_to_uniform(rlb__noise_token(prefix, i)), best);
        if (score > best) {
            best = score;
            ibest = i;
        }
    });
    double sum = 0.0; /* block_sum_d's order: each warp's tree, then the warps in order */
#pragma unroll
    for (int w = 0; w < kSumWarps; w++) {
        double v = s[w];
        for (int o = 16; o > 0; o >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        sum += v;
    }
    if (race)
        warp_argmax(best, ibest);
    if (threadIdx.x % kWarp == 0) {
        part[item].zmax = zc;
        part[item].imax = (int32_t)ic;
        part[item].sum = sum;
        part[item].best = best;
        part[item].ibest = ibest;
    }
}

/* One block per job, after sample_chunk. Greedy: the first maximum; plain
 * sampling: the race winner of the chunks. Otherwise the top-k threshold (the k-th
 * largest z, ties kept) and the top-p cut (the first token, z descending then id
 * ascending, at which the kept mass above it reaches top_p of the kept mass) by radix
 * select, then the exponential race over the kept tokens. */
__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(const float *logits, int64_t V, const rlb_eo_sample_job *jobs,
                  const sample_part *part, int32_t *tokens, float *logprobs, int32_t *status)
{
    RLB_PDL_ENTRY();
    const rlb_eo_sample_job job = jobs[blockIdx.x];
    const float *x = logits + job.row * V;
    const bool greedy = job.temperature <= RLB_SAMPLE_GREEDY_EPS;
    const float T = greedy ? 1.0f : job.temperature;
    const bool top_k = !greedy && job.top_k > 0 && job.top_k < V;
    const bool top_p = !greedy && job.top_p < 1.0f;
    const sample_part *pp = part + blockIdx.x * kSampleChunks;
    float zmax;
    int64_t imax;
    row_max(pp, V, &zmax, &imax);
    /* in chunk order, each chunk's sum scaled from its maximum to the row's (a chunk of no
     * finite maximum has a sum of 0 or NaN, which stays so) */
    double sum = 0.0;
#pragma unroll 16
    for (int c = 0; c < kSampleChunks; c++)
        sum += pp[c].zmax == -INFINITY ? pp[c].sum
                                       : pp[c].sum * exp((double)pp[c].zmax - (double)zmax);
    const double lse = (double)zmax + log(sum);
    if (!isfinite(zmax) || !isfinite(lse)) { /* the host sampler's non-finite rules apply */
        if (threadIdx.x == 0) {
            status[blockIdx.x] = RLB_EINVAL;
            tokens[blockIdx.x] = 0;
            logprobs[blockIdx.x] = 0.0f;
        }
        return;
    }
    auto zk = [&](int64_t i) { return zkey(x[i] / T); };
    auto one = [](int64_t) { return 1ull; };
    auto all = [](int64_t) { return true; };
    unsigned long long above = 0;
    const uint32_t k_key = top_k ? radix_select(V, all, zk, one, (double)job.top_k, &above) : 0;
    auto kept_k = [&](int64_t i) { return zk(i) >= k_key; };
    uint32_t p_key = 0;    /* top-p: keys above p_key are kept, ... */
    int64_t p_last = V;    /* ... and those equal to it up to this id */
    if (top_p) {
        auto mass = [&](int64_t i) {
            return (unsigned long long)((double)expf(x[i] / T - zmax) * kMassScale);
        };
        unsigned long long q = 0, ties = 0;
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
            q += kept_k(i) ? mass(i) : 0ull;
        const double limit = (double)job.top_p * (double)block_sum_u64(q);
        p_key = radix_select(V, kept_k, zk, mass, limit, &above);
        /* the tokens of z = z(p_key) share one mass; the first of them (by id) whose mass
         * above is still below the limit are kept */
        const unsigned long long m1 =
            (unsigned long long)((double)expf(zkey_value(p_key) - zmax) * kMassScale);
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
            ties += kept_k(i) && zk(i) == p_key;
        ties = block_sum_u64(ties);
        const double keep = m1 ? ceil((limit - (double)above) / (double)m1) : (double)ties;
        if (keep < (double)ties) {
            auto tied = [&](int64_t i) { return kept_k(i) && zk(i) == p_key; };
            auto id_key = [](int64_t i) { return ~(uint32_t)i; }; /* ascending ids */
            p_last = (int64_t)~radix_select(V, tied, id_key, one, keep < 1.0 ? 1.0 : keep,
                                            &above);
        }
    }
    const uint64_t prefix = rlb__noise_prefix(job.seed, job.sample, job.pos);
    double best = -1.0;
    int64_t ibest = V;
    if (!greedy && !top_k && !top_p) { /* plain sampling: the chunks ran the race */
        for (int c = 0; c < kSampleChunks; c++) {
            if (pp[c].best < 0.0)
                continue;
            const double b = pp[c].best * exp((double)pp[c].zmax - (double)zmax);
            if (b > best || (b == best && pp[c].ibest < ibest)) {
                best = b;
                ibest = pp[c].ibest;
            }
        }
    }
    for (int64_t i = threadIdx.x; (top_k || top_p) && i < V; i += blockDim.x) {
        if (top_k || top_p) {
            const uint32_t k = zk(i);
            if (k < k_key || k < p_key || (top_p && k == p_key && i > p_last))
                continue;
        }
        const double score = rlb__race_score(
            expf(x[i] / T - zmax), rlb__bits_to_uniform(rlb__noise_token(prefix, i)), best);
        if (score > best) {
            best = score;
            ibest = i;
        }
    }
    if (top_k || top_p)
        block_argmax(best, ibest);
    if (threadIdx.x != 0)
        return;
    const int64_t tok = greedy ? imax : ibest;
    if (tok >= V) {
        status[blockIdx.x] = RLB_EINVAL;
        tokens[blockIdx.x] = 0;
        logprobs[blockIdx.x] = 0.0f;
        return;
    }
    status[blockIdx.x] = 0;
    tokens[blockIdx.x] = (int32_t)tok;
    logprobs[blockIdx.x] = (float)((double)(x[tok] / T) - lse);
}

/* ---- Weight-only quantized matmul ------------------------------------------------------------ */

constexpr int kWqWarps = 8; /* output rows per block */
constexpr int kWqRows = 4;  /* x rows per pass */

template <bool FP8>
__device__ __forceinline__ float wq_value(uint8_t b)
{
    if constexpr (FP8) {
        __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)b, __NV_E4M3);
        return __half2float(__half(h));
    } else {
        return (float)(int8_t)b;
    }
}

template <typename X, bool FP8>
__global__ void __launch_bounds__(kWqWarps * kWarp)
    wq_kernel(const X *x, int64_t n, int64_t k, const uint8_t *q, const float *scale,
              int per_row, int64_t m, float *y)
{
    RLB_PDL_ENTRY();
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int64_t r = blockIdx.x * (int64_t)kWqWarps + warp;
    if (r >= m)
        return;
    const float s = per_row ? scale[r] : scale[0];
    const uint8_t *qr = q + r * k;
    const bool vec = k % 16 == 0;
    for (int64_t n0 = 0; n0 < n; n0 += kWqRows) {
        float acc[kWqRows];
#pragma unroll
        for (int b = 0; b < kWqRows; b++)
            acc[b] = 0.0f;
        if (vec) {
            for (int64_t c0 = lane * 16; c0 < k; c0 += 16 * kWarp) {
                union {
                    uint4 v;
                    uint8_t b[16];
                } w;
                w.v = *reinterpret_cast<const uint4 *>(qr + c0);
                float wf[16];
#pragma unroll
                for (int e = 0; e < 16; e++)
                    wf[e] = wq_value<FP8>(w.b[e]);
#pragma unroll
                for (int b = 0; b < kWqRows; b++) {
                    if (n0 + b >= n)
                        break;
                    const X *xr = x + (n0 + b) * k + c0;
                    typename unpack16<X>::u xv;
#pragma unroll
                    for (int part = 0; part < 16 / unpack16<X>::N; part++) {
                        xv.v = reinterpret_cast<const uint4 *>(xr)[part];
#pragma unroll
                        for (int e = 0; e < unpack16<X>::N; e++)
                            acc[b] += wf[part * unpack16<X>::N + e] * rlb__d_to_f32(xv.e[e]);
                    }
                }
            }
        } else {
            for (int64_t c = lane; c < k; c += kWarp) {
                const float wv = wq_value<FP8>(qr[c]);
#pragma unroll
                for (int b = 0; b < kWqRows; b++)
                    if (n0 + b < n)
                        acc[b] += wv * ld(x, (n0 + b) * k + c);
            }
        }
#pragma unroll
        for (int b = 0; b < kWqRows; b++) {
            const float t = warp_sum(acc[b]);
            if (lane == 0 && n0 + b < n)
                y[(n0 + b) * m + r] = t * s;
        }
    }
}

template <typename W>
int rmsnorm_w(cudaStream_t stream, float *x, const float *a, const int32_t *idx,
                     const void *w, int64_t rows, int64_t D, float eps, void *y, rlb_dtype ydt)
{
    RLB_EO_DISPATCH(ydt, Y,
                    rlb__pdl_launch(rmsnorm_kernel<W, Y>, (unsigned)rows, 256, stream, 
                        x, a, idx, (const W *)w, D, eps, (Y *)y));
    return launched("rmsnorm");
}

int rmsnorm_any(cudaStream_t stream, float *x, const float *a, const int32_t *idx,
                       const void *w, rlb_dtype wdt, int64_t rows, int64_t D, float eps,
                       void *y, rlb_dtype ydt)
{
    if (rows <= 0)
        return 0;
    RLB_EO_DISPATCH(wdt, W, return rmsnorm_w<W>(stream, x, a, idx, w, rows, D, eps, y, ydt));
    return 0;
}

template <typename S>
int convert_from(cudaStream_t stream, const void *src, void *dst, rlb_dtype ddt,
                        int64_t n)
{
    RLB_EO_DISPATCH(ddt, D,
                    rlb__pdl_launch(convert_kernel<S, D>, grid_for(n, 256), 256, stream, 
                        (const S *)src, (D *)dst, n));
    return launched("convert");
}

template <bool FP8>
int wq_launch(cudaStream_t stream, const void *x, rlb_dtype xdt, int64_t n, int64_t k,
                     const void *q, const float *scale, int per_row, int64_t m, float *y)
{
    unsigned grid = (unsigned)((m + kWqWarps - 1) / kWqWarps);
    RLB_EO_DISPATCH(xdt, X,
                    rlb__pdl_launch(wq_kernel<X, FP8>, grid, kWqWarps * kWarp, stream, 
                        (const X *)x, n, k, (const uint8_t *)q, scale, per_row, m, y));
    return launched("matmul_wq");
}

} /* namespace */

extern "C" {

static int g_pdl = 1;

int rlb__eo_pdl(void)
{
    return g_pdl;
}

void rlb__eo_set_pdl(int on)
{
    g_pdl = on != 0;
}

int rlb__eo_head_dim_supported(int64_t hd)
{
    return hd == 16 || hd == 24 || hd == 64 || hd == 128;
}

int rlb__eo_embed(cudaStream_t stream, const void *table, rlb_dtype dt, int64_t vocab0,
                  int64_t v_local, int64_t D, const int32_t *tokens, int64_t rows, float *x)
{
    if (rows <= 0)
        return 0;
    RLB_EO_DISPATCH(dt, T,
                    rlb__pdl_launch(embed_kernel<T>, (unsigned)rows, 256, stream, 
                        (const T *)table, vocab0, v_local, D, tokens, x));
    return launched("embed");
}

int rlb__eo_rmsnorm(cudaStream_t stream, const float *x, const int32_t *rows_index,
                    const void *w, rlb_dtype wdt, int64_t rows, int64_t D, float eps, void *y,
                    rlb_dtype ydt)
{
    return rmsnorm_any(stream, (float *)x, NULL, rows_index, w, wdt, rows, D, eps, y, ydt);
}

int rlb__eo_add_rmsnorm(cudaStream_t stream, float *x, const float *a, const void *w,
                        rlb_dtype wdt, int64_t rows, int64_t D, float eps, void *y,
                        rlb_dtype ydt)
{
    return rmsnorm_any(stream, x, a, NULL, w, wdt, rows, D, eps, y, ydt);
}

int rlb__eo_add(cudaStream_t stream, float *x, const float *a, int64_t n)
{
    if (n <= 0)
        return 0;
    rlb__pdl_launch(add_kernel, grid_for(n, 256), 256, stream, x, a, n);
    return launched("add");
}

int rlb__eo_bias_add(cudaStream_t stream, float *y, const void *bias, rlb_dtype dt,
                     int64_t rows, int64_t cols)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    RLB_EO_DISPATCH(dt, B,
                    rlb__pdl_launch(bias_kernel<B>, grid_for(rows * cols, 256), 256, stream, 
                        y, (const B *)bias, rows, cols));
    return launched("bias add");
}

int rlb__eo_swiglu(cudaStream_t stream, const float *gu, int64_t rows, int64_t inter,
                   void *out, rlb_dtype odt)
{
    if (rows <= 0 || inter <= 0)
        return 0;
    const unsigned gx = grid_for(inter, 256 * kLoadBatch);
    const dim3 grid(gx < 4096 ? gx : 4096, (unsigned)(rows < 65535 ? rows : 65535));
    RLB_EO_DISPATCH(odt, O,
                    rlb__pdl_launch(swiglu_kernel<O>, grid, 256, stream, gu, rows, inter,
                                    (O *)out));
    return launched("swiglu");
}

int rlb__eo_convert(cudaStream_t stream, const void *src, rlb_dtype sdt, void *dst,
                    rlb_dtype ddt, int64_t n)
{
    if (n <= 0)
        return 0;
    RLB_EO_DISPATCH(sdt, S, return convert_from<S>(stream, src, dst, ddt, n));
    return 0;
}

int rlb__eo_rope_store(cudaStream_t stream, float *qkv, int64_t rows, int64_t hq,
                       const int32_t *pos, const float *inv_freq, const int64_t *slot,
                       const rlb_eo_cache *c, int64_t layer)
{
    if (rows <= 0)
        return 0;
    if (c->hd % 2 || layer < 0 || layer >= c->n_layers)
        return RLB_EINVAL;
    RLB_EO_DISPATCH(c->dt, T,
                    rlb__pdl_launch(rope_store_kernel<T>,
                                    dim3((unsigned)rows, (unsigned)(hq + 2 * c->kvt)),
                                    (unsigned)((c->hd / 2 + 31) / 32 * 32), stream, 
                        qkv, hq, pos, inv_freq, slot, *c, layer));
    return launched("rope_store");
}

int64_t rlb__eo_attn_qblocks(int64_t n, int64_t grp)
{
    return (n * grp + RLB_EO_QTILE - 1) / RLB_EO_QTILE;
}

int64_t rlb__eo_attn_splits(int64_t base_blocks, int64_t max_kv, int sms, int64_t rows,
                            int64_t hq, int64_t ws_vectors)
{
    int64_t s = base_blocks > 0 ? (2 * (int64_t)sms + base_blocks - 1) / base_blocks : 1;
    if (max_kv > 0) {
        int64_t tiles = (max_kv + RLB_EO_KTILE - 1) / RLB_EO_KTILE;
        s = s < tiles ? s : tiles;
    }
    s = s < RLB_EO_MAX_SPLITS ? s : RLB_EO_MAX_SPLITS;
    if (rows * hq > 0 && s * rows * hq > ws_vectors)
        s = ws_vectors / (rows * hq);
    return s < 1 ? 1 : s;
}

int rlb__eo_attention(cudaStream_t stream, const rlb_eo_attn *a, const rlb_eo_cache *c,
                      int64_t layer)
{
    if (a->rows <= 0 || a->qblocks <= 0)
        return 0;
    if (a->out_dt != c->dt || a->splits < 1 || a->splits > RLB_EO_MAX_SPLITS ||
        (a->splits > 1 && !a->partial) || (a->inv_freq && !a->slot) || c->kvt < 1 ||
        a->hq % c->kvt || layer < 0 || layer >= c->n_layers)
        return RLB_EINVAL;
    if (!rlb__eo_head_dim_supported(c->hd)) {
        RLB_LOG_ERROR(RLB_SUB_KERNEL,
                      "attention: head_dim %lld has no CUDA kernel (16, 24, 64 and 128 do)",
                      (long long)c->hd);
        return RLB_EUNSUPPORTED;
    }
    switch (c->hd) {
    case 16: /* the built-in tiny model */
        RLB_EO_DISPATCH(c->dt, T, return attention_hd<16, T>(stream, a, c, layer));
        break;
    case 24:
        RLB_EO_DISPATCH(c->dt, T, return attention_hd<24, T>(stream, a, c, layer));
        break;
    case 64:
        RLB_EO_DISPATCH(c->dt, T, return attention_hd<64, T>(stream, a, c, layer));
        break;
    default:
        RLB_EO_DISPATCH(c->dt, T, return attention_hd<128, T>(stream, a, c, layer));
        break;
    }
    return 0;
}

int rlb__eo_cut_logits(cudaStream_t stream, const float *gath, int64_t T, int64_t out,
                       int64_t vl, int64_t V, float *logits)
{
    if (out <= 0 || V <= 0 || T * vl < V)
        return out <= 0 ? 0 : RLB_EINVAL;
    rlb__pdl_launch(cut_kernel, grid_for(out * V, 256), 256, stream, gath, out, vl, V, logits);
    return launched("cut logits");
}

uint64_t rlb__eo_sample_work_bytes(int64_t n)
{
    return (uint64_t)(n > 0 ? n : 0) * kSampleChunks * sizeof(sample_part);
}

int rlb__eo_sample(cudaStream_t stream, const float *logits, int64_t V,
                   const rlb_eo_sample_job *jobs, int64_t n, void *work, int32_t *tokens,
                   float *logprobs, int32_t *status)
{
    if (n <= 0)
        return 0;
    if (V < 1 || V > INT32_MAX || !work || n > 65535)
        return RLB_EINVAL;
    sample_part *part = (sample_part *)work;
    const unsigned blocks = (unsigned)((n * kSampleChunks + kChunkWarps - 1) / kChunkWarps);
    rlb__pdl_launch(sample_chunk, blocks, kChunkWarps * kWarp, stream, logits, V, jobs, n,
                    part);
    rlb__pdl_launch(sample_kernel, (unsigned)n, kSampleThreads, stream, logits, V, jobs,
                    (const sample_part *)part, tokens, logprobs, status);
    return launched("sample");
}

int rlb__eo_matmul_wq(cudaStream_t stream, const void *x, rlb_dtype xdt, int64_t n, int64_t k,
                      const void *q, rlb_dtype qdt, const float *scale, int per_row, int64_t m,
                      float *y)
{
    if (n <= 0 || m <= 0)
        return 0;
    if (qdt == RLB_DTYPE_I8)
        return wq_launch<false>(stream, x, xdt, n, k, q, scale, per_row, m, y);
    if (qdt == RLB_DTYPE_F8E4M3)
        return wq_launch<true>(stream, x, xdt, n, k, q, scale, per_row, m, y);
    return RLB_EDTYPE;
}

} /* extern "C" */
