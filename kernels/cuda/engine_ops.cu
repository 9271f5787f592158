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
 * is combined by attn_combine. Sampling follows sample.c step for step (z = logit / T,
 * p = expf(z - max) as float, score = p / -log(u) in double, the first index of the
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

#include <cuda_fp8.h>

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

/* (value, index) argmax over the block: larger value wins, equal values the smaller index
 * (the first maximum of a left-to-right scan). Every thread gets the winner. */
template <typename V>
__device__ void block_argmax(V &v, int64_t &i)
{
    __shared__ V pv[32];
    __shared__ int64_t pi[32];
    for (int o = 16; o > 0; o >>= 1) {
        V ov = __shfl_xor_sync(0xffffffffu, v, o);
        int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) {
            v = ov;
            i = oi;
        }
    }
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
    RLB_PDL_ENTRY();
    int64_t r = blockIdx.x, src = rows_index ? rows_index[r] : r;
    float *xr = x + src * D;
    double ss = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float v = xr[d];
        if (a) {
            v = v + a[src * D + d];
            xr[d] = v;
        }
        ss += (double)v * (double)v;
    }
    ss = block_sum_d(ss);
    float var = (float)(ss / (double)D);
    float inv = 1.0f / sqrtf(var + eps);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        st(y, r * D + d, ld(w, d) * (xr[d] * inv));
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

template <typename O>
__global__ void swiglu_kernel(const float *gu, int64_t rows, int64_t inter, O *out)
{
    RLB_PDL_ENTRY();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * inter;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / inter, c = i % inter;
        float g = gu[r * 2 * inter + c], u = gu[r * 2 * inter + inter + c];
        st(out, i, g / (1.0f + expf(-g)) * u);
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
__device__ __forceinline__ void rope_pair(const float *inv_freq, int64_t j, int32_t pos,
                                          float &x1, float &x2)
{
    float cs, sn;
    sincosf(inv_freq[j] * (float)pos, &sn, &cs);
    const float y1 = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(-x2, sn));
    const float y2 = __fadd_rn(__fmul_rn(x2, cs), __fmul_rn(x1, sn));
    x1 = y1;
    x2 = y2;
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
        const float *qh = a.qkv + row * qstride + h * HD;
        if (!rope) {
            sq[vi][j] = qh[j];
            continue;
        }
        float x1 = qh[j], x2 = qh[j + HD / 2];
        rope_pair(a.inv_freq, j, a.pos[row], x1, x2);
        sq[vi][j] = x1;
        sq[vi][j + HD / 2] = x2;
    }
    if (rope && a.slot[row0] >= 0 && a.pos[row0] >= k0 && a.pos[row0] < k1) {
        const int32_t newp = a.pos[row0];
        const int64_t sl = a.slot[row0];
        const float *kh = a.qkv + row0 * qstride + (hq + g) * HD, *vh = kh + kvt * HD;
        const int64_t o = cache_off<T>(c, layer, (int32_t)(sl / c.block_tokens), g,
                                       sl % c.block_tokens);
        T *kd = (T *)c.k + o, *vd = (T *)c.v + o;
        for (int j = tid; j < HD / 2; j += blockDim.x) {
            float x1 = kh[j], x2 = kh[j + HD / 2];
            rope_pair(a.inv_freq, j, newp, x1, x2);
            st(kd, j, x1);
            st(kd, j + HD / 2, x2);
            st(vd, j, vh[j]);
            st(vd, j + HD / 2, vh[j + HD / 2]);
        }
    }
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

template <int HD, typename T>
int attention_hd(cudaStream_t stream, const rlb_eo_attn *a, const rlb_eo_cache *c,
                 int64_t layer)
{
    dim3 grid((unsigned)a->qblocks, (unsigned)c->kvt, (unsigned)a->splits);
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

/* The passes over a row that need no whole-row result are split over kSampleChunks blocks
 * per job (one block per row took ~100 us on a 128K vocabulary, latency-bound):
 *   sample_max    each chunk's first maximum of z = x / T
 *   sample_chunk  the row's maximum from those, then each chunk's sum of e^(z - zmax) and,
 *                 for a job without top-k / top-p, its race winner (the largest p / e)
 * and sample_kernel combines them in chunk order: the same first maximum and the same race
 * winner as one pass (both are order-free: ties go to the smaller id), and a sum in a fixed
 * order (deterministic, batch-invariant). Top-k / top-p keep their whole-row radix passes. */
constexpr int kSampleChunks = 64;
constexpr int kChunkThreads = 256;

struct sample_part {
    float zmax;
    int32_t imax;
    double sum;
    double best;
    int64_t ibest;
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

__global__ void __launch_bounds__(kChunkThreads)
    sample_max(const float *logits, int64_t V, const rlb_eo_sample_job *jobs, sample_part *part)
{
    RLB_PDL_ENTRY();
    const rlb_eo_sample_job job = jobs[blockIdx.y];
    const float *x = logits + job.row * V;
    const float T = job_t(job);
    int64_t lo, hi;
    chunk_range(V, blockIdx.x, &lo, &hi);
    float zmax = -INFINITY;
    int64_t imax = V;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float z = x[i] / T;
        if (z > zmax) { /* a thread scans ascending: it keeps its first maximum */
            zmax = z;
            imax = i;
        }
    }
    block_argmax(zmax, imax);
    if (threadIdx.x == 0) {
        part[blockIdx.y * kSampleChunks + blockIdx.x].zmax = zmax;
        part[blockIdx.y * kSampleChunks + blockIdx.x].imax = (int32_t)imax;
    }
}

/* The row's first maximum from the chunks' (every thread gets it). */
__device__ __forceinline__ void row_max(const sample_part *p, int64_t V, float *zmax,
                                        int64_t *imax)
{
    float z = -INFINITY;
    int64_t i = V;
    for (int c = 0; c < kSampleChunks; c++)
        if (p[c].zmax > z || (p[c].zmax == z && p[c].imax < i)) {
            z = p[c].zmax;
            i = p[c].imax;
        }
    *zmax = z;
    *imax = i;
}

__global__ void __launch_bounds__(kChunkThreads)
    sample_chunk(const float *logits, int64_t V, const rlb_eo_sample_job *jobs,
                 sample_part *part)
{
    RLB_PDL_ENTRY();
    const rlb_eo_sample_job job = jobs[blockIdx.y];
    const float *x = logits + job.row * V;
    const float T = job_t(job);
    sample_part *p = part + blockIdx.y * kSampleChunks;
    float zmax;
    int64_t imax;
    row_max(p, V, &zmax, &imax);
    int64_t lo, hi;
    chunk_range(V, blockIdx.x, &lo, &hi);
    double sum = 0.0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x)
        sum += expf(x[i] / T - zmax);
    sum = block_sum_d(sum);
    double best = -1.0;
    int64_t ibest = V;
    if (plain_sampling(job, V) && isfinite(zmax)) {
        const uint64_t prefix = rlb__noise_prefix(job.seed, job.sample, job.pos);
        for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
            const float pr = expf(x[i] / T - zmax);
            const double e = -log(rlb__bits_to_uniform(rlb__noise_token(prefix, i)));
            const double score = (double)pr / e;
            if (score > best) {
                best = score;
                ibest = i;
            }
        }
        block_argmax(best, ibest);
    }
    if (threadIdx.x == 0) {
        p[blockIdx.x].sum = sum;
        p[blockIdx.x].best = best;
        p[blockIdx.x].ibest = ibest;
    }
}

/* One block per job, after sample_max and sample_chunk. Greedy: the first maximum; plain
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
    double sum = 0.0;
    for (int c = 0; c < kSampleChunks; c++)
        sum += pp[c].sum;
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
        for (int c = 0; c < kSampleChunks; c++)
            if (pp[c].best > best || (pp[c].best == best && pp[c].ibest < ibest)) {
                best = pp[c].best;
                ibest = pp[c].ibest;
            }
    }
    for (int64_t i = threadIdx.x; (top_k || top_p) && i < V; i += blockDim.x) {
        if (top_k || top_p) {
            const uint32_t k = zk(i);
            if (k < k_key || k < p_key || (top_p && k == p_key && i > p_last))
                continue;
        }
        const float p = expf(x[i] / T - zmax);
        const double e = -log(rlb__bits_to_uniform(rlb__noise_token(prefix, i)));
        const double score = (double)p / e;
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
    RLB_EO_DISPATCH(odt, O,
                    rlb__pdl_launch(swiglu_kernel<O>, grid_for(rows * inter, 256), 256, stream, 
                        gu, rows, inter, (O *)out));
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
    const dim3 chunks(kSampleChunks, (unsigned)n);
    rlb__pdl_launch(sample_max, chunks, kChunkThreads, stream, logits, V, jobs, part);
    rlb__pdl_launch(sample_chunk, chunks, kChunkThreads, stream, logits, V, jobs, part);
    rlb__pdl_launch(sample_kernel, (unsigned)n, kSampleThreads, stream, logits, V, jobs,
                    (const sample_part *)part, tokens,
                                                               logprobs, status);
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
