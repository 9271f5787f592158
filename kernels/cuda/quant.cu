/* quant.cu: post-load quantization kernels (quant.h): fp8 e4m3 per tensor and per row, int8
 * per row, over a set of tensors in two launches.
 *
 * Invariant: every output byte and scale equals what kernels/cpu/quant.c computes for the
 * same input, bit for bit. Both sides call the per-element functions of
 * kernels/cpu/quant_scalar.h (compiled here for the device: IEEE division, rintf), except
 * the e4m3 encoding, which the hardware does with the same rounding (fp8_value), and an
 * amax does not depend on the order it is taken in (max of non-negative non-NaN values; NaN
 * is skipped by rlb__amax_step on both sides), so splitting the reduction over threads and
 * blocks changes nothing.
 *
 * Work division: the tensors' work items are numbered across the set (first_item is a
 * prefix sum, one block per item, a binary search over the set finds the tensor). A
 * per-tensor item is a run of kItemElems elements; a per-row item is a group of whole rows
 * (at least one), each reduced by the whole block before it is quantized, so per-row
 * tensors need one launch. Per-tensor tensors need the amax of every element first: the
 * amax launch reduces each item and folds it into the tensor's scratch word with atomicMax
 * on the float's bits (non-negative floats order like their bit patterns); the quantize
 * launch divides it by 448 in every block (the same IEEE division as the CPU) and the
 * tensor's first item stores the scale. Loads are 16 bytes where the tensor (or row) start
 * is 16-byte aligned, with a scalar tail.
 *
 * Check: tests/gpu/test_cuda_quant (random tensors, every dtype and kind, NaN / inf / zero
 * rows, against the CPU reference); speed: rlb-bench-reshard-gpu (fp8 of the 8B model
 * against its byte floor).
 */
#include "kernels/cuda/quant.h"

#include <stdlib.h>

#include <type_traits>

#include <cuda_fp8.h>

#include "kernels/cpu/quant_scalar.h"
#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/cuda_check.h"

namespace {

constexpr int kThreads = 256;           /* threads per block */
constexpr uint64_t kItemElems = 16384;  /* elements per item (per-row: rows are grouped up to it) */

/* One tensor of the set as the kernels see it; built on the host at creation. */
struct qdesc {
    const char *w;        /* input elements */
    uint8_t *q;           /* output bytes */
    float *scale;         /* [1] or [rows] */
    uint64_t rows;        /* rows of the tensor */
    uint64_t cols;        /* elements per row */
    uint64_t first_item;  /* launch-wide index of the tensor's first item */
    uint64_t per_item;    /* elements (per tensor) or rows (per row) of one item */
    uint32_t kind;        /* rlb_quant_kind */
    uint32_t dtype;       /* rlb_dtype of w */
};

struct quant_args {
    const qdesc *t;  /* [n + 1]; the last is a sentinel with first_item == n_items */
    uint32_t n;      /* tensors in the set */
    uint32_t *amax;  /* [n] per-tensor amax as float bits (zeroed before each run) */
};

__device__ __forceinline__ uint32_t find_tensor(const quant_args &a, uint64_t item)
{
    uint32_t lo = 0, hi = a.n; /* invariant: t[lo].first_item <= item < t[hi].first_item */
    while (hi - lo > 1) {
        uint32_t mid = (lo + hi) / 2;
        if (a.t[mid].first_item <= item)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

template <typename T>
struct vec {
    static constexpr int N = 16 / (int)sizeof(T); /* elements per 16-byte load */
    union in_t {
        uint4 v;
        T e[N];
    };
};

/* Max |w| over elements [i0, i1) of the block's share; vector loads when `aligned` (the
 * address of element i0 is 16-byte aligned). Every thread returns its own partial max. */
template <typename T>
__device__ float amax_range(const char *w, uint64_t i0, uint64_t i1, bool aligned)
{
    constexpr int N = vec<T>::N;
    const T *p = reinterpret_cast<const T *>(w);
    float m = 0.0f;
    uint64_t body = aligned ? (i1 - i0) / N * N : 0;
    for (uint64_t i = i0 + (uint64_t)threadIdx.x * N; i < i0 + body; i += (uint64_t)kThreads * N) {
        typename vec<T>::in_t in;
        in.v = *reinterpret_cast<const uint4 *>(p + i);
#pragma unroll
        for (int e = 0; e < N; e++)
            m = rlb__amax_step(m, rlb__d_to_f32(in.e[e]));
    }
    for (uint64_t i = i0 + body + threadIdx.x; i < i1; i += kThreads)
        m = rlb__amax_step(m, rlb__d_to_f32(p[i]));
    return m;
}

/* rlb__quant_fp8_value with the e4m3 encoding done by the hardware (cvt.rn.satfinite, one
 * instruction for what rlb__f32_to_e4m3 spends a branchy score of instructions on, which
 * made the kernel compute-bound): the same rounding (nearest even, subnormals kept) and the
 * same saturation to +-448 of the clamp; NaN is settled before, as there. test_cuda_quant
 * sweeps the encoder over every e4m3 rounding boundary. */
__device__ __forceinline__ uint8_t fp8_value(float v, float s)
{
    float x = s > 0.0f ? v / s : 0.0f;
    if (x != x)
        return (uint8_t)(((__float_as_uint(v) >> 24) & 0x80u) | 0x7fu);
    return (uint8_t)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}

template <bool INT8>
__device__ __forceinline__ uint8_t quant_value(float v, float s)
{
    if constexpr (INT8)
        return (uint8_t)rlb__quant_int8_value(v, s);
    else
        return fp8_value(v, s);
}

/* q[i] = quantized w[i] for i in [i0, i1) with scale s; vector accesses when `aligned` (w's
 * element i0 16-byte aligned, q's byte i0 aligned to N). */
template <typename T, bool INT8>
__device__ void quant_range(const char *w, uint8_t *q, uint64_t i0, uint64_t i1, float s,
                            bool aligned)
{
    constexpr int N = vec<T>::N;
    const T *p = reinterpret_cast<const T *>(w);
    uint64_t body = aligned ? (i1 - i0) / N * N : 0;
    for (uint64_t i = i0 + (uint64_t)threadIdx.x * N; i < i0 + body; i += (uint64_t)kThreads * N) {
        typename vec<T>::in_t in;
        in.v = *reinterpret_cast<const uint4 *>(p + i);
        union {
            uint8_t b[N];
            typename std::conditional<N == 8, uint2, uint32_t>::type word;
        } out;
#pragma unroll
        for (int e = 0; e < N; e++)
            out.b[e] = quant_value<INT8>(rlb__d_to_f32(in.e[e]), s);
        *reinterpret_cast<decltype(out.word) *>(q + i) = out.word;
    }
    for (uint64_t i = i0 + body + threadIdx.x; i < i1; i += kThreads)
        q[i] = quant_value<INT8>(rlb__d_to_f32(p[i]), s);
}

/* Max over the block; every thread gets the result. Values are non-negative, never NaN. */
__device__ float block_max(float m)
{
    __shared__ float part[kThreads / 32];
    for (int o = 16; o > 0; o >>= 1)
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    __syncthreads(); /* an earlier call may still read part[] */
    if (threadIdx.x % 32 == 0)
        part[threadIdx.x / 32] = m;
    __syncthreads();
    m = part[0];
#pragma unroll
    for (int k = 1; k < kThreads / 32; k++)
        m = fmaxf(m, part[k]);
    return m;
}

__device__ __forceinline__ bool aligned16(const void *p)
{
    return (uintptr_t)p % 16 == 0;
}

template <typename T>
__device__ void amax_item(const quant_args &a, uint32_t k, uint64_t j)
{
    const qdesc &t = a.t[k];
    const uint64_t n = t.rows * t.cols, i0 = j * t.per_item;
    const uint64_t i1 = i0 + t.per_item < n ? i0 + t.per_item : n;
    float m = block_max(amax_range<T>(t.w, i0, i1, aligned16(t.w)));
    if (threadIdx.x == 0 && m > 0.0f)
        atomicMax(&a.amax[k], __float_as_uint(m));
}

template <typename T, bool INT8>
__device__ void quant_item(const quant_args &a, uint32_t k, uint64_t j)
{
    constexpr int N = vec<T>::N;
    const qdesc &t = a.t[k];
    if (t.kind == RLB_QUANT_FP8_TENSOR) {
        const uint64_t n = t.rows * t.cols, i0 = j * t.per_item;
        const uint64_t i1 = i0 + t.per_item < n ? i0 + t.per_item : n;
        const float s = __uint_as_float(a.amax[k]) / RLB_E4M3_MAX;
        if (j == 0 && threadIdx.x == 0)
            t.scale[0] = s;
        quant_range<T, INT8>(t.w, t.q, i0, i1, s, aligned16(t.w) && (uintptr_t)t.q % N == 0);
        return;
    }
    const float qmax = INT8 ? RLB_INT8_QMAX : RLB_E4M3_MAX;
    const uint64_t r1 = (j + 1) * t.per_item < t.rows ? (j + 1) * t.per_item : t.rows;
    /* every row start keeps the tensor's alignment when a row is whole 16-byte groups */
    const bool rows_aligned =
        aligned16(t.w) && (uintptr_t)t.q % N == 0 && (t.cols * sizeof(T)) % 16 == 0;
    for (uint64_t r = j * t.per_item; r < r1; r++) {
        const uint64_t i0 = r * t.cols, i1 = i0 + t.cols;
        const float s = block_max(amax_range<T>(t.w, i0, i1, rows_aligned)) / qmax;
        if (threadIdx.x == 0)
            t.scale[r] = s;
        quant_range<T, INT8>(t.w, t.q, i0, i1, s, rows_aligned);
    }
}

#define RLB__BY_DTYPE(dtype, FN, ...)                                                       \
    switch (dtype) {                                                                       \
    case RLB_DTYPE_BF16: FN<rlb__bf16_t>(__VA_ARGS__); break;                              \
    case RLB_DTYPE_F16: FN<rlb__f16_t>(__VA_ARGS__); break;                                \
    default: FN<float>(__VA_ARGS__); break; /* creation admitted only the three */         \
    }

/* One block per item; items of per-row tensors have nothing to reduce here. */
__global__ void __launch_bounds__(kThreads) amax_kernel(quant_args a)
{
    const uint32_t k = find_tensor(a, blockIdx.x);
    if (a.t[k].kind != RLB_QUANT_FP8_TENSOR)
        return;
    RLB__BY_DTYPE(a.t[k].dtype, amax_item, a, k, blockIdx.x - a.t[k].first_item);
}

template <typename T>
__device__ void quant_item_kind(const quant_args &a, uint32_t k, uint64_t j)
{
    if (a.t[k].kind == RLB_QUANT_INT8_ROWS)
        quant_item<T, true>(a, k, j);
    else
        quant_item<T, false>(a, k, j);
}

__global__ void __launch_bounds__(kThreads) quant_kernel(quant_args a)
{
    const uint32_t k = find_tensor(a, blockIdx.x);
    RLB__BY_DTYPE(a.t[k].dtype, quant_item_kind, a, k, blockIdx.x - a.t[k].first_item);
}

} /* namespace */

struct rlb_cuda_quant {
    int device;          /* GPU the set runs on */
    uint32_t n;          /* tensors */
    uint64_t n_items;    /* blocks of each launch */
    int any_tensor;      /* some tensor is FP8_TENSOR: the amax launch is needed */
    qdesc *d_t;          /* device: [n + 1] descriptors */
    uint32_t *d_amax;    /* device: [n] amax scratch */
};

/* Fills d from t (first_item left to the caller). Returns the item count or RLB_EINVAL /
 * RLB_EDTYPE with `err` naming tensor i. */
static int64_t describe_tensor(const rlb_cuda_quant_tensor *t, uint32_t i, qdesc *d,
                               char *err, size_t errlen)
{
    if (t->dtype != RLB_DTYPE_F32 && t->dtype != RLB_DTYPE_BF16 && t->dtype != RLB_DTYPE_F16) {
        rlb__cuda_err(err, errlen, "quant tensor %u: dtype %s is not f32, bf16 or f16", i,
                      rlb_dtype_name(t->dtype));
        return RLB_EDTYPE;
    }
    if (t->rows < 0 || t->cols < 0 || (t->cols && t->rows > INT64_MAX / 16 / t->cols) ||
        (unsigned)t->kind > RLB_QUANT_INT8_ROWS || !t->w || !t->q || !t->scale) {
        rlb__cuda_err(err, errlen, "quant tensor %u: bad shape [%lld, %lld], kind %d or a "
                      "NULL buffer", i, (long long)t->rows, (long long)t->cols, (int)t->kind);
        return RLB_EINVAL;
    }
    *d = qdesc{};
    d->w = (const char *)t->w;
    d->q = (uint8_t *)t->q;
    d->scale = t->scale;
    d->rows = (uint64_t)t->rows;
    d->cols = (uint64_t)t->cols;
    d->kind = (uint32_t)t->kind;
    d->dtype = (uint32_t)t->dtype;
    if (t->kind == RLB_QUANT_FP8_TENSOR) {
        /* an empty tensor still gets one item: its scale (0) must be written */
        d->per_item = kItemElems;
        uint64_t n = d->rows * d->cols;
        return (int64_t)(n ? (n + kItemElems - 1) / kItemElems : 1);
    }
    d->per_item = d->cols < kItemElems ? kItemElems / (d->cols ? d->cols : 1) : 1;
    return (int64_t)((d->rows + d->per_item - 1) / d->per_item);
}

extern "C" void rlb__cuda_quant_free(rlb_cuda_quant *qs)
{
    if (!qs)
        return;
    int prev;
    bool entered = rlb__cuda_enter(qs->device, &prev) == 0;
    cudaFree(qs->d_t);
    cudaFree(qs->d_amax);
    if (entered)
        rlb__cuda_leave(prev);
    free(qs);
}

extern "C" int rlb__cuda_quant_create(int device, const rlb_cuda_quant_tensor *t, uint32_t n,
                                      rlb_cuda_quant **out, char *err, size_t errlen)
{
    if (!out || (n && !t) || n >= UINT32_MAX)
        return RLB_EINVAL;
    *out = nullptr;
    int rc = 0, prev = -1;
    rlb_cuda_quant *qs = (rlb_cuda_quant *)calloc(1, sizeof(*qs));
    qdesc *d = (qdesc *)calloc((size_t)n + 1, sizeof(*d));
    if (!qs || !d) {
        rc = RLB_ENOMEM;
        goto err;
    }
    qs->device = device;
    qs->n = n;
    for (uint32_t i = 0; i < n; i++) {
        int64_t items = describe_tensor(&t[i], i, &d[i], err, errlen);
        if (items < 0) {
            rc = (int)items;
            goto err;
        }
        d[i].first_item = qs->n_items;
        qs->n_items += (uint64_t)items;
        qs->any_tensor |= t[i].kind == RLB_QUANT_FP8_TENSOR;
    }
    d[n].first_item = qs->n_items; /* sentinel */
    if (qs->n_items > INT32_MAX) {
        rlb__cuda_err(err, errlen, "quant set: %llu work items exceed one launch",
                      (unsigned long long)qs->n_items);
        rc = RLB_ETOOBIG;
        goto err;
    }
    RLB_CHECK_GOTO(rlb__cuda_enter(device, &prev), rc, err);
    RLB_CUDA_CHECK(cudaMalloc(&qs->d_t, ((size_t)n + 1) * sizeof(*d)), rc, err_dev);
    RLB_CUDA_CHECK(cudaMalloc(&qs->d_amax, ((size_t)n + 1) * sizeof(uint32_t)), rc, err_dev);
    RLB_CUDA_CHECK(cudaMemcpy(qs->d_t, d, ((size_t)n + 1) * sizeof(*d), cudaMemcpyHostToDevice),
                   rc, err_dev);
    rlb__cuda_leave(prev);
    free(d);
    *out = qs;
    return 0;
err_dev:
    rlb__cuda_leave(prev);
err:
    free(d);
    rlb__cuda_quant_free(qs);
    return rc;
}

extern "C" int rlb__cuda_quant_run(rlb_cuda_quant *qs, cudaStream_t stream)
{
    if (!qs)
        return RLB_EINVAL;
    if (qs->n_items == 0)
        return 0;
    int rc = 0, prev = -1;
    quant_args a;
    a.t = qs->d_t;
    a.n = qs->n;
    a.amax = qs->d_amax;
    RLB_CHECK(rlb__cuda_enter(qs->device, &prev));
    if (qs->any_tensor) {
        RLB_CUDA_CHECK(cudaMemsetAsync(qs->d_amax, 0, qs->n * sizeof(uint32_t), stream), rc, out);
        amax_kernel<<<(unsigned)qs->n_items, kThreads, 0, stream>>>(a);
        RLB_CUDA_CHECK(cudaGetLastError(), rc, out);
    }
    quant_kernel<<<(unsigned)qs->n_items, kThreads, 0, stream>>>(a);
    RLB_CUDA_CHECK(cudaGetLastError(), rc, out);
out:
    rlb__cuda_leave(prev);
    return rc;
}

extern "C" uint64_t rlb__cuda_quant_device_bytes(const rlb_cuda_quant *qs)
{
    return qs ? ((uint64_t)qs->n + 1) * (sizeof(qdesc) + sizeof(uint32_t)) : 0;
}
