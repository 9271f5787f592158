/* plan_exec.cu: the CUDA reshard executor (plan_exec.h): one launch per destination GPU runs
 * every op of a plan, converting f32 / bf16 / f16 on the fly.
 *
 * Invariant: a run writes exactly the destination bytes the ops name, each once, with the
 * bits kernels/cpu's executor writes (conversions through convert.cuh, twins of convert.h);
 * ops never read what another op of the same plan writes, so items run in any order.
 *
 * Work division: at upload every op gets a descriptor (struct task) that cuts it into items
 * of at most RLB_CUDA_ITEM_BYTES on its wider side: rows shorter than that are grouped
 * whole, longer rows are split into segments whose length is a multiple of 16 units, so a
 * segment keeps its row's 16-byte alignment. Items are numbered across ops (first_item is a
 * prefix sum) and the launch has one block per item; a coarse index (the op of every 64th
 * item) bounds each block's binary search for its op to one or two entries. Inside an
 * item, when every row start on both sides is 16-byte aligned and the row is a whole
 * number of vector groups, threads stride over (row, group) pairs loading kUnroll groups
 * before storing any (several 16-byte loads in flight per thread); otherwise each row gets
 * a scalar head up to the first unit where both sides are aligned, a vector body and a
 * scalar tail.
 *
 * Non-finite values: with counting on (rlb__cuda_plan_count), every value an op writes is
 * checked for an all-ones exponent (NaN or Inf, the test of kernels/cpu's
 * rlb__row_nonfinite) as it is stored: a byte copy checks the words it moves by the
 * destination's dtype, a conversion the converted words. Each warp sums its threads' counts
 * and adds a nonzero sum to the op's slot (its index in the caller's plan) with one
 * atomic; clean weights cost no atomics and no extra pass.
 *
 * Sources on another GPU: bind reads each through peer access where the GPUs have a peer
 * path (and the mode allows), in the same launch as local ones. The others are staged
 * (plan_stage.h): the ops reading them leave the launch, and each run then copies windows
 * of those sources into two local staging buffers with cudaMemcpyPeerAsync on a stream of
 * the plan's own, each window's launch (a range of items of a second work list, whose
 * ops read the staging buffers) waiting for its copy, and the copy into a buffer waiting
 * for the launch that last read it. Everything ends up ordered on the caller's stream.
 *
 * Check: tests/gpu/test_cuda_plan_exec (random plans vs the CPU executor, every conversion
 * pattern), tests/gpu/test_cuda_peer (two GPUs, peer and staged), tests/gpu/test_cuda_stage
 * (window planning, no GPU); speed: rlb-bench-reshard-gpu (bytes moved against a
 * cudaMemcpy of the same; --peer: two GPUs against cudaMemcpyPeer).
 */
#include "kernels/cuda/plan_exec.h"

#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/plan_stage.h"
extern "C" { /* common/env.h has no C++ guard of its own */
#include "common/env.h"
}

namespace {

constexpr int kThreads = 256; /* threads per block */
constexpr int kUnroll = 4;    /* vector groups each thread loads before it stores */
constexpr int kCoarse = 64;   /* items per entry of the coarse item -> op index */

enum : uint32_t {
    MODE_RAW = 0,     /* same dtype on both sides: a byte copy (units are bytes) */
    MODE_ZERO = 1,    /* zero fill of the destination (units are bytes) */
    MODE_CONVERT = 2, /* f32 / bf16 / f16 conversion (units are elements) */
};

/* How one op is cut into work items; built on the host at upload. */
struct task {
    uint64_t first_item;    /* launch-wide index of the op's first item */
    uint64_t row_units;     /* units per row */
    uint64_t seg_units;     /* units per item along a row (row_units unless rows are split) */
    uint64_t segs_per_row;  /* items per row; > 1 only when rows are split */
    uint64_t rows_per_item; /* rows per item; > 1 only when whole rows are grouped */
    uint32_t mode;          /* MODE_* */
    uint32_t slot;          /* index of the op in the caller's plan: its non-finite count */
};
static_assert(sizeof(task) == 48, "task is uploaded as is");

struct exec_args {
    const rlb_copy_op *ops; /* [n_ops] the uploaded ops */
    const task *tasks;      /* [n_ops + 1]; the last is a sentinel with first_item == n_items */
    const uint32_t *coarse; /* [n_items / kCoarse + 2] op holding item g * kCoarse */
    char *const *src;       /* [n_src] bound source base addresses */
    char *const *dst;       /* [n_dst] bound destination base addresses */
    uint64_t item_base;     /* item of block 0 (a staged window runs a range of items) */
    unsigned long long *counts; /* [plan ops] non-finite values written, by slot; NULL: none */
};

/* What a count reads a destination element as (0: nothing is counted). */
enum : uint32_t { NF_NONE = 0, NF_F32 = 1, NF_BF16 = 2, NF_F16 = 3 };

__device__ __forceinline__ uint32_t nf_kind(uint8_t dtype)
{
    return dtype == RLB_DTYPE_F32 ? NF_F32 : dtype == RLB_DTYPE_BF16 ? NF_BF16
                                           : dtype == RLB_DTYPE_F16  ? NF_F16 : NF_NONE;
}

/* Non-finite values (all-ones exponent) among the elements of 32-bit word w. */
__device__ __forceinline__ uint32_t nf_word(uint32_t w, uint32_t kind)
{
    if (kind == NF_F32)
        return (w & 0x7f800000u) == 0x7f800000u;
    const uint32_t m = kind == NF_BF16 ? 0x7f80u : 0x7c00u;
    return ((w & m) == m) + (((w >> 16) & m) == m);
}

__device__ __forceinline__ uint32_t nf_vec(const uint4 &v, uint32_t kind)
{
    if (kind == NF_NONE)
        return 0;
    return nf_word(v.x, kind) + nf_word(v.y, kind) + nf_word(v.z, kind) + nf_word(v.w, kind);
}

/* Non-finite values among the esz-byte element at p (esz 4 or 2, as kind says). */
__device__ __forceinline__ uint32_t nf_elem(const char *p, uint32_t kind)
{
    if (kind == NF_F32)
        return nf_word(*reinterpret_cast<const uint32_t *>(p), kind);
    return nf_word(*reinterpret_cast<const uint16_t *>(p), kind);
}

/* The vector group of one (S -> D) pair: VEC units, 16 bytes on the narrower side. */
template <typename S, typename D>
struct group {
    static constexpr int SS = (int)sizeof(S), DS = (int)sizeof(D);
    static constexpr int VEC = 16 / (SS < DS ? SS : DS);
    union in_t {
        uint4 v[VEC * SS / 16];
        S e[VEC];
    };
    union out_t {
        uint4 v[VEC * DS / 16];
        D e[VEC];
    };
};

template <typename S, typename D, bool ZERO>
__device__ __forceinline__ void load_group(const char *s, typename group<S, D>::in_t &in)
{
    if constexpr (!ZERO) {
        const uint4 *p = reinterpret_cast<const uint4 *>(s);
#pragma unroll
        for (int v = 0; v < (int)(sizeof(in.v) / sizeof(in.v[0])); v++)
            in.v[v] = p[v];
    }
}

/* Stores the group and returns the non-finite values it wrote (as kind reads them). */
template <typename S, typename D, bool ZERO>
__device__ __forceinline__ uint32_t store_group(char *d, const typename group<S, D>::in_t &in,
                                                uint32_t kind)
{
    typename group<S, D>::out_t out;
    if constexpr (ZERO) {
#pragma unroll
        for (int v = 0; v < (int)(sizeof(out.v) / sizeof(out.v[0])); v++)
            out.v[v] = make_uint4(0, 0, 0, 0);
    } else if constexpr (sizeof(S) == sizeof(D) && sizeof(S) == 1) {
        out.v[0] = in.v[0];
    } else {
#pragma unroll
        for (int e = 0; e < group<S, D>::VEC; e++)
            out.e[e] = rlb__d_convert<S, D>(in.e[e]);
    }
    uint4 *p = reinterpret_cast<uint4 *>(d);
    uint32_t bad = 0;
#pragma unroll
    for (int v = 0; v < (int)(sizeof(out.v) / sizeof(out.v[0])); v++) {
        p[v] = out.v[v];
        if constexpr (!ZERO)
            bad += nf_vec(out.v[v], kind);
    }
    return bad;
}

/* Moves one unit and returns the non-finite values it wrote. A byte copy's units are
 * bytes: the element starting at unit u (u a multiple of the element size) is counted by
 * the thread moving its first byte, from the source, whose bits it copies unchanged. */
template <typename S, typename D, bool ZERO>
__device__ __forceinline__ uint32_t move_unit(const char *s, char *d, uint64_t u, uint32_t kind)
{
    if constexpr (ZERO) {
        *reinterpret_cast<D *>(d) = D{};
        return 0;
    } else if constexpr (sizeof(S) == 1 && sizeof(D) == 1) {
        *reinterpret_cast<D *>(d) = *reinterpret_cast<const S *>(s);
        return kind != NF_NONE && u % (kind == NF_F32 ? 4 : 2) == 0 ? nf_elem(s, kind) : 0;
    } else {
        const D v = rlb__d_convert<S, D>(*reinterpret_cast<const S *>(s));
        *reinterpret_cast<D *>(d) = v;
        return kind != NF_NONE ? nf_elem(reinterpret_cast<const char *>(&v), kind) : 0;
    }
}

/* Rows [0, nr) x units [0, nu) of a region whose first unit is at src / dst. Returns the
 * non-finite values this thread wrote (kind: how to read them; NF_NONE counts nothing). */
template <typename S, typename D, bool ZERO>
__device__ uint32_t copy_region(const char *src, uint64_t sstride, char *dst, uint64_t dstride,
                                uint64_t nr, uint64_t nu, uint32_t kind)
{
    using G = group<S, D>;
    constexpr int VEC = G::VEC, SS = G::SS, DS = G::DS;
    const uint32_t tid = threadIdx.x;
    const bool rows_aligned = (nr == 1 || (dstride % 16 == 0 && (ZERO || sstride % 16 == 0)));
    const bool fast = nu % VEC == 0 && rows_aligned && (uintptr_t)dst % 16 == 0 &&
                      (ZERO || (uintptr_t)src % 16 == 0);
    uint32_t bad = 0;
    if (fast) {
        /* an item holds at most RLB_CUDA_ITEM_BYTES, so the counts fit 32 bits */
        const uint32_t groups = (uint32_t)(nu / VEC), total = (uint32_t)nr * groups;
        for (uint32_t g0 = tid; g0 < total; g0 += kUnroll * kThreads) {
            typename G::in_t in[kUnroll];
            uint32_t r[kUnroll], c[kUnroll];
#pragma unroll
            for (int i = 0; i < kUnroll; i++) {
                uint32_t g = g0 + i * kThreads;
                r[i] = g / groups;
                c[i] = g - r[i] * groups;
                if (g < total)
                    load_group<S, D, ZERO>(src + r[i] * sstride + (uint64_t)c[i] * VEC * SS, in[i]);
            }
#pragma unroll
            for (int i = 0; i < kUnroll; i++)
                if (g0 + i * kThreads < total)
                    bad += store_group<S, D, ZERO>(dst + r[i] * dstride + (uint64_t)c[i] * VEC * DS,
                                                   in[i], kind);
        }
        return bad;
    }
    for (uint64_t r = 0; r < nr; r++) {
        const char *s = src + r * sstride;
        char *d = dst + r * dstride;
        /* first unit where both sides are 16-byte aligned; nu when there is none */
        uint64_t head = nu;
        for (int h = 0; h < VEC && (uint64_t)h < nu; h++) {
            if ((uintptr_t)(d + h * DS) % 16 == 0 && (ZERO || (uintptr_t)(s + h * SS) % 16 == 0)) {
                head = (uint64_t)h;
                break;
            }
        }
        const uint64_t body = (nu - head) / VEC, tail0 = head + body * VEC;
        for (uint64_t g = tid; g < body; g += kThreads) {
            typename G::in_t in;
            load_group<S, D, ZERO>(s + (head + g * VEC) * SS, in);
            bad += store_group<S, D, ZERO>(d + (head + g * VEC) * DS, in, kind);
        }
        const uint64_t n_scalar = head + (nu - tail0);
        for (uint64_t i = tid; i < n_scalar; i += kThreads) {
            uint64_t u = i < head ? i : tail0 + (i - head);
            bad += move_unit<S, D, ZERO>(s + u * SS, d + u * DS, u, kind);
        }
    }
    return bad;
}

#define RLB__PAIR(s, d) ((uint32_t)(s) * RLB_DTYPE_COUNT_ + (uint32_t)(d))

template <typename S, typename D, bool ZERO>
__device__ __forceinline__ uint32_t run_region(const char *src, const rlb_copy_op &op, char *dst,
                                               uint64_t u0, uint64_t nr, uint64_t nu,
                                               uint32_t kind)
{
    return copy_region<S, D, ZERO>(ZERO ? nullptr : src + u0 * sizeof(S), op.src_stride,
                                   dst + u0 * sizeof(D), op.dst_stride, nr, nu, kind);
}

/* Item j of op k; returns the non-finite values this thread wrote (0 unless counting). */
__device__ uint32_t run_item(const exec_args &a, uint32_t k, uint64_t j)
{
    const rlb_copy_op op = a.ops[k];
    const task t = a.tasks[k];
    uint64_t row0, nr, u0, nu;
    if (t.segs_per_row > 1) {
        row0 = j / t.segs_per_row;
        u0 = (j - row0 * t.segs_per_row) * t.seg_units;
        nr = 1;
        nu = min(t.seg_units, t.row_units - u0);
    } else {
        row0 = j * t.rows_per_item;
        nr = min(t.rows_per_item, op.rows - row0);
        u0 = 0;
        nu = t.row_units;
    }
    char *dst = a.dst[op.dst_ref] + op.dst_offset + row0 * op.dst_stride;
    const char *src = t.mode == MODE_ZERO ? nullptr
                                          : a.src[op.src_ref] + op.src_offset + row0 * op.src_stride;
    const uint32_t kind = a.counts ? nf_kind(op.dst_dtype) : NF_NONE;
    if (t.mode == MODE_RAW)
        return run_region<uint8_t, uint8_t, false>(src, op, dst, u0, nr, nu, kind);
    if (t.mode == MODE_ZERO)
        return run_region<uint8_t, uint8_t, true>(src, op, dst, u0, nr, nu, NF_NONE);
    switch (RLB__PAIR(op.src_dtype, op.dst_dtype)) {
    case RLB__PAIR(RLB_DTYPE_F32, RLB_DTYPE_BF16):
        return run_region<float, rlb__bf16_t, false>(src, op, dst, u0, nr, nu, kind);
    case RLB__PAIR(RLB_DTYPE_F32, RLB_DTYPE_F16):
        return run_region<float, rlb__f16_t, false>(src, op, dst, u0, nr, nu, kind);
    case RLB__PAIR(RLB_DTYPE_BF16, RLB_DTYPE_F32):
        return run_region<rlb__bf16_t, float, false>(src, op, dst, u0, nr, nu, kind);
    case RLB__PAIR(RLB_DTYPE_BF16, RLB_DTYPE_F16):
        return run_region<rlb__bf16_t, rlb__f16_t, false>(src, op, dst, u0, nr, nu, kind);
    case RLB__PAIR(RLB_DTYPE_F16, RLB_DTYPE_F32):
        return run_region<rlb__f16_t, float, false>(src, op, dst, u0, nr, nu, kind);
    case RLB__PAIR(RLB_DTYPE_F16, RLB_DTYPE_BF16):
        return run_region<rlb__f16_t, rlb__bf16_t, false>(src, op, dst, u0, nr, nu, kind);
    default: /* upload admits no other pair */
        return 0;
    }
}

/* One block per item. The block finds its op by binary search between the ops that the
 * coarse index names for its item group and the next group (usually one or two ops).
 * (A persistent grid looping over items was tried: with every copy path inlined into one
 * loop the compiler keeps all paths' registers live at once, over 200 per thread.) */
__global__ void __launch_bounds__(kThreads) plan_kernel(exec_args a)
{
    const uint64_t item = a.item_base + blockIdx.x;
    const uint64_t group = item / kCoarse;
    uint32_t lo = a.coarse[group], hi = a.coarse[group + 1] + 1;
    /* invariant: tasks[lo].first_item <= item < tasks[hi].first_item */
    while (hi - lo > 1) {
        uint32_t mid = (lo + hi) / 2;
        if (a.tasks[mid].first_item <= item)
            lo = mid;
        else
            hi = mid;
    }
    uint32_t bad = run_item(a, lo, item - a.tasks[lo].first_item);
    if (a.counts) { /* every thread of the block gets here */
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            bad += __shfl_xor_sync(0xffffffffu, bad, o);
        if ((threadIdx.x & 31) == 0 && bad)
            atomicAdd(&a.counts[a.tasks[lo].slot], (unsigned long long)bad);
    }
}

} /* namespace */

/* Device tables of one set of ops, in one allocation: the ops, their descriptors, the
 * coarse item -> op index and n_ptrs pointer slots. */
struct work_list {
    char *d_mem;        /* the allocation (NULL: no list) */
    uint64_t dev_bytes; /* its size */
    rlb_copy_op *d_ops; /* in d_mem: [n_ops] */
    task *d_tasks;      /* in d_mem: [n_ops + 1]; the last is the sentinel */
    uint32_t *d_coarse; /* in d_mem: [n_items / kCoarse + 2] */
    char **d_ptrs;      /* in d_mem: [n_ptrs] */
    uint32_t n_ops;     /* ops in the list */
    uint64_t n_items;   /* work items of all of them */
};

struct rlb_cuda_plan {
    int device;              /* GPU the plan runs on */
    rlb_cuda_peer_mode mode; /* how sources on another GPU are read */
    uint64_t stage_cap;      /* bytes of each staging buffer */
    uint32_t n_src;          /* plan->n_src */
    uint32_t n_dst;          /* plan->n_dst */
    uint64_t *need;          /* [n_src + n_dst] bytes a bound buffer must cover; 0 = ref unused */
    uint8_t *align;          /* [n_src + n_dst] widest element size the uploaded ops use with it */
    rlb_copy_op *h_ops;      /* [all.n_ops] the uploaded ops, for a bind that stages */
    uint32_t *h_slot;        /* [all.n_ops] index of each in the caller's plan */
    uint32_t n_plan_ops;     /* ops of the caller's plan (slots of the counts) */
    int counting;            /* runs count non-finite values written (rlb__cuda_plan_count) */
    unsigned long long *d_counts; /* [n_plan_ops] on the device, zeroed by each counted run */
    unsigned long long *h_counts; /* [n_plan_ops] pinned copy, filled at a counted run's end */
    work_list all;           /* every uploaded op; pointer slots: sources, then destinations */
    int bound;               /* a bind has succeeded */
    /* set by a bind that stages at least one source */
    int staging;             /* run launches direct + staged windows instead of all */
    work_list direct;        /* the ops reading local or peer memory (pointers: all.d_ptrs) */
    work_list staged;        /* staged pieces; pointer slots: the two staging buffers */
    rlb_stage_plan sp;       /* host: the windows and copies of staged */
    uint64_t *win_item;      /* [sp.n_windows + 1] first item of each window in staged */
    char **src_ptr;          /* [n_src] bound source addresses, which the copies read */
    int *src_dev;            /* [n_src] GPU holding each source */
    /* staging resources, made by the first bind that stages and kept until free */
    char *d_stage;           /* 2 * stage_cap bytes on the plan's GPU */
    cudaStream_t copy_stream; /* non-blocking stream of the copies */
    cudaEvent_t ev_start;    /* recorded on the caller's stream when a run starts */
    cudaEvent_t ev_full[2];  /* staging buffer b holds its window (copy stream) */
    cudaEvent_t ev_free[2];  /* the launch reading staging buffer b is done (caller's stream) */
};

/* Checks op i against the plan (rlb__plan_check_op, plus element alignment, which GPU loads
 * need). Returns 0 or RLB_EINVAL with `err` naming the op. */
static int check_op(const rlb_plan *plan, uint64_t i, char *err, size_t errlen)
{
    const rlb_copy_op *op = &plan->ops[i];
    int rc = rlb__plan_check_op(op, i, plan->n_src, plan->src_bytes, plan->n_dst,
                                plan->dst_bytes, err, errlen);
    if (rc)
        return rc;
    const bool zero = op->src_ref == RLB_PLAN_ZERO_SRC;
    const uint64_t ds = rlb_dtype_size((rlb_dtype)op->dst_dtype);
    const uint64_t ss = zero ? ds : rlb_dtype_size((rlb_dtype)op->src_dtype);
    if (op->dst_offset % ds || op->dst_stride % ds ||
        (!zero && (op->src_offset % ss || op->src_stride % ss))) {
        rlb__cuda_err(err, errlen, "plan op %llu: an offset or stride is not a multiple of "
                      "its element size", (unsigned long long)i);
        return RLB_EINVAL;
    }
    return 0;
}

/* Fills the descriptor of a checked op (first_item left to the caller); returns its item
 * count (>= 1). */
static uint64_t describe_op(const rlb_copy_op *op, task *t)
{
    const bool zero = op->src_ref == RLB_PLAN_ZERO_SRC;
    const uint64_t ds = rlb_dtype_size((rlb_dtype)op->dst_dtype);
    const uint64_t ss = zero ? ds : rlb_dtype_size((rlb_dtype)op->src_dtype);
    memset(t, 0, sizeof(*t));
    uint64_t unit_max;
    if (zero || op->src_dtype == op->dst_dtype) {
        t->mode = zero ? MODE_ZERO : MODE_RAW;
        t->row_units = op->row_elems * ds;
        unit_max = 1;
    } else {
        t->mode = MODE_CONVERT;
        t->row_units = op->row_elems;
        unit_max = ss > ds ? ss : ds;
    }
    const uint64_t per_item = RLB_CUDA_ITEM_BYTES / unit_max; /* a multiple of 16 */
    if (t->row_units > per_item) {
        t->seg_units = per_item;
        t->segs_per_row = (t->row_units + per_item - 1) / per_item;
        t->rows_per_item = 1;
        return op->rows * t->segs_per_row;
    }
    t->seg_units = t->row_units;
    t->segs_per_row = 1;
    t->rows_per_item = per_item / t->row_units;
    return (op->rows + t->rows_per_item - 1) / t->rows_per_item;
}

static uint64_t align256(uint64_t x)
{
    return (x + 255) / 256 * 256;
}

/* Builds and uploads the work list of ops[0, n) (checked ops) with n_ptrs pointer slots,
 * on the current device; op k counts into slot[k]. first_item (may be NULL) gets each op's
 * first item and, at [n], the item count. Returns 0, RLB_ETOOBIG (more items than one
 * launch has blocks), RLB_ENOMEM or RLB_ECUDA. */
static int build_list(const rlb_copy_op *ops, const uint32_t *slot, uint32_t n, uint32_t n_ptrs,
                      work_list *wl, uint64_t *first_item, char *err, size_t errlen)
{
    int rc = 0;
    uint64_t n_coarse = 0;
    char *staging = nullptr;
    uint32_t *coarse = nullptr;
    task *tasks = (task *)malloc(((uint64_t)n + 1) * sizeof(*tasks));
    memset(wl, 0, sizeof(*wl));
    if (!tasks)
        return RLB_ENOMEM;
    for (uint32_t k = 0; k < n; k++) {
        uint64_t items = describe_op(&ops[k], &tasks[k]);
        tasks[k].first_item = wl->n_items;
        tasks[k].slot = slot[k];
        wl->n_items += items;
    }
    memset(&tasks[n], 0, sizeof(task));
    tasks[n].first_item = wl->n_items; /* sentinel: ends every search */
    if (first_item)
        for (uint32_t k = 0; k <= n; k++)
            first_item[k] = tasks[k].first_item;
    if (wl->n_items > INT32_MAX) { /* one block per item */
        rlb__cuda_err(err, errlen, "plan: %llu work items exceed one launch",
                      (unsigned long long)wl->n_items);
        rc = RLB_ETOOBIG;
        goto out;
    }
    /* coarse[g] = op holding item g * kCoarse; the entry after the last group is the last op */
    n_coarse = (wl->n_items + kCoarse - 1) / kCoarse + 1;
    coarse = (uint32_t *)malloc(n_coarse * sizeof(*coarse));
    if (!coarse) {
        rc = RLB_ENOMEM;
        goto out;
    }
    for (uint64_t g = 0, k = 0; g + 1 < n_coarse; g++) {
        while (tasks[k + 1].first_item <= g * kCoarse)
            k++;
        coarse[g] = (uint32_t)k;
    }
    coarse[n_coarse - 1] = n ? n - 1 : 0;
    /* one allocation and one copy: upload is on the registration path, where each CUDA call
     * costs tens of microseconds */
    {
        const uint64_t o_tasks = align256(((uint64_t)n + 1) * sizeof(*ops));
        const uint64_t o_coarse = align256(o_tasks + ((uint64_t)n + 1) * sizeof(*tasks));
        const uint64_t o_ptrs = align256(o_coarse + n_coarse * sizeof(*coarse));
        const uint64_t bytes = o_ptrs + ((uint64_t)n_ptrs + 1) * sizeof(char *);
        staging = (char *)malloc(o_ptrs);
        if (!staging) {
            rc = RLB_ENOMEM;
            goto out;
        }
        memcpy(staging, ops, (uint64_t)n * sizeof(*ops));
        memcpy(staging + o_tasks, tasks, ((uint64_t)n + 1) * sizeof(*tasks));
        memcpy(staging + o_coarse, coarse, n_coarse * sizeof(*coarse));
        RLB_CUDA_CHECK(cudaMalloc(&wl->d_mem, bytes), rc, out);
        RLB_CUDA_CHECK(cudaMemcpy(wl->d_mem, staging, o_ptrs, cudaMemcpyHostToDevice), rc, out);
        wl->dev_bytes = bytes;
        wl->d_ops = (rlb_copy_op *)wl->d_mem;
        wl->d_tasks = (task *)(wl->d_mem + o_tasks);
        wl->d_coarse = (uint32_t *)(wl->d_mem + o_coarse);
        wl->d_ptrs = (char **)(wl->d_mem + o_ptrs);
        wl->n_ops = n;
    }
out:
    if (rc) {
        cudaFree(wl->d_mem);
        memset(wl, 0, sizeof(*wl));
    }
    free(staging);
    free(tasks);
    free(coarse);
    return rc;
}

static void free_list(work_list *wl)
{
    cudaFree(wl->d_mem);
    memset(wl, 0, sizeof(*wl));
}

/* Items [item0, item0 + n) of wl on `stream` (current device: the list's), counting into
 * counts (NULL: no counting). */
static int launch_list(const work_list &wl, char *const *src, char *const *dst, uint64_t item0,
                       uint64_t n, unsigned long long *counts, cudaStream_t stream)
{
    int rc = 0;
    if (n == 0)
        return 0;
    exec_args a;
    a.ops = wl.d_ops;
    a.tasks = wl.d_tasks;
    a.coarse = wl.d_coarse;
    a.src = src;
    a.dst = dst;
    a.item_base = item0;
    a.counts = counts;
    plan_kernel<<<(unsigned)n, kThreads, 0, stream>>>(a);
    RLB_CUDA_CHECK(cudaGetLastError(), rc, out);
out:
    return rc;
}

/* Forgets what a bind that staged set up (current device: the plan's); the staging
 * buffers, stream and events stay for the next one. */
static void drop_staging(rlb_cuda_plan *cp)
{
    free_list(&cp->direct);
    free_list(&cp->staged);
    rlb__stage_free(&cp->sp);
    free(cp->win_item);
    cp->win_item = nullptr;
    cp->staging = 0;
}

/* Releases the staging buffers, stream and events (current device: the plan's). */
static void free_stage_resources(rlb_cuda_plan *cp)
{
    cudaFree(cp->d_stage);
    cp->d_stage = nullptr;
    if (cp->copy_stream)
        cudaStreamDestroy(cp->copy_stream);
    cp->copy_stream = nullptr;
    cudaEvent_t *evs[5] = {&cp->ev_start, &cp->ev_full[0], &cp->ev_full[1], &cp->ev_free[0],
                           &cp->ev_free[1]};
    for (cudaEvent_t *e : evs) {
        if (*e)
            cudaEventDestroy(*e);
        *e = nullptr;
    }
}

extern "C" void rlb__cuda_plan_free(rlb_cuda_plan *cp)
{
    if (!cp)
        return;
    int prev;
    bool entered = rlb__cuda_enter(cp->device, &prev) == 0;
    drop_staging(cp);
    free_stage_resources(cp);
    free_list(&cp->all);
    cudaFree(cp->d_counts);
    cudaFreeHost(cp->h_counts);
    if (entered)
        rlb__cuda_leave(prev);
    free(cp->need);
    free(cp->align);
    free(cp->h_ops);
    free(cp->h_slot);
    free(cp->src_ptr);
    free(cp->src_dev);
    free(cp);
}

static void note_use(rlb_cuda_plan *cp, uint32_t ref, uint64_t need, uint64_t elem)
{
    cp->need[ref] = need;
    if (elem > cp->align[ref])
        cp->align[ref] = (uint8_t)elem;
}

/* The RLB_CUDA_STAGE_BYTES knob, or the default where it is out of range. */
static uint64_t stage_bytes_env(void)
{
    long long v = rlb__env_int(RLB_KNOB_CUDA_STAGE_BYTES);
    if (v < (long long)RLB_STAGE_MIN_BYTES || v % 256 || v > (1ll << 40)) {
        RLB_LOG_WARN(RLB_SUB_KERNEL, "RLB_CUDA_STAGE_BYTES=%lld: a multiple of 256 of at least "
                     "%u expected; using 16 MiB", v, RLB_STAGE_MIN_BYTES);
        return 16u << 20;
    }
    return (uint64_t)v;
}

extern "C" int rlb__cuda_plan_upload(const rlb_plan *plan, int device, const uint8_t *dst_sel,
                                     rlb_cuda_plan **out, char *err, size_t errlen)
{
    if (!plan || !out || (plan->n_ops && !plan->ops) || (plan->n_src && !plan->src_bytes) ||
        (plan->n_dst && !plan->dst_bytes) || plan->n_ops > UINT32_MAX)
        return RLB_EINVAL;
    *out = nullptr;
    /* Copying the base alone would serve unmerged weights: a caller uploads the copy ops
     * here and the merges through lora_merge.h. */
    if (plan->n_merges || plan->n_stage_ops) {
        rlb__cuda_err(err, errlen, "plan: LoRA merges run through lora_merge.h, not here");
        return RLB_EUNSUPPORTED;
    }
    int rc = 0, prev = -1;
    uint32_t n_ops = 0;
    rlb_cuda_plan *cp = (rlb_cuda_plan *)calloc(1, sizeof(*cp));
    const uint32_t n_refs = plan->n_src + plan->n_dst;
    if (!cp)
        return RLB_ENOMEM;
    cp->device = device;
    cp->mode = rlb__cuda_peer_mode_env();
    cp->stage_cap = stage_bytes_env();
    cp->n_src = plan->n_src;
    cp->n_dst = plan->n_dst;
    cp->need = (uint64_t *)calloc(n_refs + 1, sizeof(uint64_t));
    cp->align = (uint8_t *)calloc(n_refs + 1, 1);
    cp->n_plan_ops = (uint32_t)plan->n_ops;
    cp->h_ops = (rlb_copy_op *)malloc((plan->n_ops + 1) * sizeof(rlb_copy_op));
    cp->h_slot = (uint32_t *)malloc((plan->n_ops + 1) * sizeof(uint32_t));
    cp->src_ptr = (char **)calloc(plan->n_src + 1, sizeof(char *));
    cp->src_dev = (int *)calloc(plan->n_src + 1, sizeof(int));
    if (!cp->need || !cp->align || !cp->h_ops || !cp->h_slot || !cp->src_ptr || !cp->src_dev) {
        rc = RLB_ENOMEM;
        goto err;
    }
    for (uint64_t i = 0; i < plan->n_ops; i++) {
        const rlb_copy_op *op = &plan->ops[i];
        if (dst_sel && op->dst_ref < plan->n_dst && !dst_sel[op->dst_ref])
            continue;
        RLB_CHECK_GOTO(check_op(plan, i, err, errlen), rc, err);
        const uint64_t ds = rlb_dtype_size((rlb_dtype)op->dst_dtype);
        note_use(cp, plan->n_src + op->dst_ref, plan->dst_bytes[op->dst_ref], ds);
        if (op->src_ref != RLB_PLAN_ZERO_SRC)
            note_use(cp, op->src_ref, plan->src_bytes[op->src_ref],
                     rlb_dtype_size((rlb_dtype)op->src_dtype));
        cp->h_slot[n_ops] = (uint32_t)i;
        cp->h_ops[n_ops++] = *op;
    }
    RLB_CHECK_GOTO(rlb__cuda_enter(device, &prev), rc, err);
    rc = build_list(cp->h_ops, cp->h_slot, n_ops, n_refs, &cp->all, nullptr, err, errlen);
    rlb__cuda_leave(prev);
    if (rc)
        goto err;
    *out = cp;
    return 0;
err:
    rlb__cuda_plan_free(cp);
    return rc;
}

extern "C" int rlb__cuda_plan_set_peer_mode(rlb_cuda_plan *cp, rlb_cuda_peer_mode mode,
                                            uint64_t stage_bytes)
{
    if (!cp || (mode != RLB_CUDA_PEER_AUTO && mode != RLB_CUDA_PEER_STAGED) ||
        (stage_bytes && (stage_bytes < RLB_STAGE_MIN_BYTES || stage_bytes % 256)))
        return RLB_EINVAL;
    int prev;
    RLB_CHECK(rlb__cuda_enter(cp->device, &prev));
    drop_staging(cp);
    if (stage_bytes && stage_bytes != cp->stage_cap) {
        free_stage_resources(cp);
        cp->stage_cap = stage_bytes;
    }
    rlb__cuda_leave(prev);
    cp->mode = mode;
    cp->bound = 0;
    return 0;
}

/* Checks that kernels on `device` can address ptr and stores in *owner the GPU holding it
 * (`device` for local, managed and mapped host memory). */
static int locate(int device, const void *ptr, uint32_t ref, int *owner, char *err,
                  size_t errlen)
{
    cudaPointerAttributes at;
    int rc = 0;
    *owner = device;
    RLB_CUDA_CHECK(cudaPointerGetAttributes(&at, ptr), rc, out);
    if (at.type == cudaMemoryTypeHost && at.devicePointer == ptr)
        return 0; /* mapped host memory, same address on the device (UVA) */
    if (at.type != cudaMemoryTypeDevice && at.type != cudaMemoryTypeManaged) {
        rlb__cuda_err(err, errlen, "buffer %u at %p is not memory GPU %d can address "
                      "(host memory must be registered and mapped)", ref, ptr, device);
        return RLB_EINVAL;
    }
    if (at.type == cudaMemoryTypeDevice)
        *owner = at.device;
out:
    return rc;
}

/* Enables peer access from the current device (`device`) to `owner`; RLB_EUNSUPPORTED
 * where the two have no peer path. */
static int enable_peer(int device, int owner)
{
    int rc = 0, can = 0;
    RLB_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, device, owner), rc, out);
    if (!can)
        return RLB_EUNSUPPORTED;
    {
        cudaError_t e = cudaDeviceEnablePeerAccess(owner, 0);
        if (e == cudaErrorPeerAccessAlreadyEnabled)
            cudaGetLastError(); /* reset the error state; access is on, which is the aim */
        else
            RLB_CUDA_CHECK(e, rc, out);
    }
out:
    return rc;
}

/* Makes the staging buffers, copy stream and events once (current device: the plan's). */
static int make_stage_resources(rlb_cuda_plan *cp)
{
    int rc = 0;
    if (cp->d_stage)
        return 0;
    cudaEvent_t *evs[5] = {&cp->ev_start, &cp->ev_full[0], &cp->ev_full[1], &cp->ev_free[0],
                           &cp->ev_free[1]};
    RLB_CUDA_CHECK(cudaMalloc(&cp->d_stage, 2 * cp->stage_cap), rc, err);
    RLB_CUDA_CHECK(cudaStreamCreateWithFlags(&cp->copy_stream, cudaStreamNonBlocking), rc, err);
    for (cudaEvent_t *e : evs)
        RLB_CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming), rc, err);
    return 0;
err:
    free_stage_resources(cp);
    return rc;
}

/* Sets up the staged fallback for the sources with staged[s] != 0 (current device: the
 * plan's): the direct list without their ops, the staged list of their pieces, the
 * windows, and the staging buffers' addresses in the staged list's pointer slots. */
static int setup_staging(rlb_cuda_plan *cp, const uint8_t *staged, const uint8_t *phase,
                         char *err, size_t errlen)
{
    int rc = 0;
    uint32_t n_direct = 0;
    uint64_t *first_item = nullptr;
    uint32_t *staged_slot = nullptr;
    rlb_copy_op *direct = (rlb_copy_op *)malloc(((uint64_t)cp->all.n_ops + 1) * sizeof(*direct));
    uint32_t *direct_slot = (uint32_t *)malloc(((uint64_t)cp->all.n_ops + 1) * sizeof(uint32_t));
    if (!direct || !direct_slot) {
        free(direct);
        free(direct_slot);
        return RLB_ENOMEM;
    }
    RLB_CHECK_GOTO(make_stage_resources(cp), rc, out);
    RLB_CHECK_GOTO(rlb__stage_build(cp->h_ops, cp->all.n_ops, cp->n_src, staged, phase,
                                    cp->stage_cap, &cp->sp), rc, out);
    for (uint32_t k = 0; k < cp->all.n_ops; k++) {
        const rlb_copy_op *op = &cp->h_ops[k];
        if (op->src_ref == RLB_PLAN_ZERO_SRC || !staged[op->src_ref]) {
            direct_slot[n_direct] = cp->h_slot[k];
            direct[n_direct++] = *op;
        }
    }
    first_item = (uint64_t *)malloc((cp->sp.n_ops + 1) * sizeof(*first_item));
    staged_slot = (uint32_t *)malloc((cp->sp.n_ops + 1) * sizeof(*staged_slot));
    cp->win_item = (uint64_t *)malloc(((uint64_t)cp->sp.n_windows + 1) * sizeof(uint64_t));
    if (!first_item || !staged_slot || !cp->win_item) {
        rc = RLB_ENOMEM;
        goto out;
    }
    for (uint64_t j = 0; j < cp->sp.n_ops; j++)
        staged_slot[j] = cp->h_slot[cp->sp.op_of[j]];
    RLB_CHECK_GOTO(build_list(direct, direct_slot, n_direct, 0, &cp->direct, nullptr, err, errlen),
                   rc, out);
    RLB_CHECK_GOTO(build_list(cp->sp.ops, staged_slot, (uint32_t)cp->sp.n_ops, 2, &cp->staged,
                              first_item, err, errlen), rc, out);
    for (uint32_t w = 0; w < cp->sp.n_windows; w++)
        cp->win_item[w] = first_item[cp->sp.windows[w].first_op];
    cp->win_item[cp->sp.n_windows] = cp->staged.n_items;
    {
        char *bufs[2] = {cp->d_stage, cp->d_stage + cp->stage_cap};
        RLB_CUDA_CHECK(cudaMemcpy(cp->staged.d_ptrs, bufs, sizeof bufs, cudaMemcpyHostToDevice),
                       rc, out);
    }
    cp->staging = 1;
out:
    if (rc)
        drop_staging(cp);
    free(direct);
    free(direct_slot);
    free(staged_slot);
    free(first_item);
    return rc;
}

extern "C" int rlb__cuda_plan_bind(rlb_cuda_plan *cp, const rlb_cuda_buf *src,
                                   const rlb_cuda_buf *dst, char *err, size_t errlen)
{
    if (!cp || (cp->n_src && !src) || (cp->n_dst && !dst))
        return RLB_EINVAL;
    const uint32_t n_refs = cp->n_src + cp->n_dst;
    int rc = 0, prev = -1, any_staged = 0;
    char **ptrs = (char **)calloc(n_refs + 1, sizeof(char *));
    uint8_t *staged = (uint8_t *)calloc(cp->n_src + 1, 1);
    uint8_t *phase = (uint8_t *)calloc(cp->n_src + 1, 1);
    if (!ptrs || !staged || !phase) {
        rc = RLB_ENOMEM;
        goto out_free;
    }
    cp->bound = 0;
    RLB_CHECK_GOTO(rlb__cuda_enter(cp->device, &prev), rc, out_free);
    drop_staging(cp);
    for (uint32_t r = 0; r < n_refs; r++) {
        const bool is_src = r < cp->n_src;
        const rlb_cuda_buf *b = is_src ? &src[r] : &dst[r - cp->n_src];
        int owner;
        if (cp->need[r] == 0)
            continue;
        if (!b->ptr || b->bytes < cp->need[r] || (uintptr_t)b->ptr % cp->align[r] != 0) {
            rlb__cuda_err(err, errlen, "%s %u: buffer %p of %llu bytes; the plan needs %llu "
                          "bytes aligned to %u", is_src ? "source" : "destination",
                          is_src ? r : r - cp->n_src, b->ptr, (unsigned long long)b->bytes,
                          (unsigned long long)cp->need[r], cp->align[r]);
            rc = RLB_EINVAL;
            goto out;
        }
        RLB_CHECK_GOTO(locate(cp->device, b->ptr, r, &owner, err, errlen), rc, out);
        ptrs[r] = (char *)b->ptr;
        if (owner == cp->device)
            continue;
        /* another GPU's memory: peer access, or (sources only) the staged fallback */
        rc = is_src && cp->mode == RLB_CUDA_PEER_STAGED ? RLB_EUNSUPPORTED
                                                         : enable_peer(cp->device, owner);
        if (rc == RLB_EUNSUPPORTED && is_src) {
            rc = 0;
            staged[r] = 1;
            phase[r] = (uint8_t)((uintptr_t)b->ptr % 16);
            cp->src_ptr[r] = (char *)b->ptr;
            cp->src_dev[r] = owner;
            any_staged = 1;
        } else if (rc == RLB_EUNSUPPORTED) {
            rlb__cuda_err(err, errlen, "destination %u lives on GPU %d, which GPU %d cannot "
                          "reach peer to peer", r - cp->n_src, owner, cp->device);
            goto out;
        } else if (rc) {
            goto out;
        }
    }
    RLB_CUDA_CHECK(cudaMemcpy(cp->all.d_ptrs, ptrs, n_refs * sizeof(char *),
                              cudaMemcpyHostToDevice), rc, out);
    if (any_staged)
        RLB_CHECK_GOTO(setup_staging(cp, staged, phase, err, errlen), rc, out);
    cp->bound = 1;
out:
    rlb__cuda_leave(prev);
out_free:
    free(ptrs);
    free(staged);
    free(phase);
    return rc;
}

/* A run with staged sources (current device: the plan's): the direct ops in one launch,
 * then each window: its copies on the copy stream once the launch that last read its
 * staging buffer is done, its launch on `stream` once the copies are in. */
static int run_staged(rlb_cuda_plan *cp, unsigned long long *counts, cudaStream_t stream)
{
    int rc = 0;
    char *const *dst = cp->all.d_ptrs + cp->n_src;
    RLB_CUDA_CHECK(cudaEventRecord(cp->ev_start, stream), rc, out);
    RLB_CHECK_GOTO(launch_list(cp->direct, cp->all.d_ptrs, dst, 0, cp->direct.n_items, counts,
                               stream), rc, out);
    /* the copies overwrite nothing the caller's earlier work may still read, but they read
     * sources the caller's earlier work may still write */
    RLB_CUDA_CHECK(cudaStreamWaitEvent(cp->copy_stream, cp->ev_start, 0), rc, out);
    for (uint32_t w = 0; w < cp->sp.n_windows; w++) {
        const rlb_stage_window *win = &cp->sp.windows[w];
        const uint32_t b = win->buf;
        char *buf = cp->d_stage + (uint64_t)b * cp->stage_cap;
        /* an event never recorded (the first run) is complete: no wait */
        RLB_CUDA_CHECK(cudaStreamWaitEvent(cp->copy_stream, cp->ev_free[b], 0), rc, out);
        for (uint64_t k = win->first_copy; k < win->first_copy + win->n_copies; k++) {
            const rlb_stage_copy *c = &cp->sp.copies[k];
            RLB_CUDA_CHECK(cudaMemcpyPeerAsync(buf + c->stage_offset, cp->device,
                                               cp->src_ptr[c->src_ref] + c->src_offset,
                                               cp->src_dev[c->src_ref], c->bytes,
                                               cp->copy_stream), rc, out);
        }
        RLB_CUDA_CHECK(cudaEventRecord(cp->ev_full[b], cp->copy_stream), rc, out);
        RLB_CUDA_CHECK(cudaStreamWaitEvent(stream, cp->ev_full[b], 0), rc, out);
        RLB_CHECK_GOTO(launch_list(cp->staged, cp->staged.d_ptrs, dst, cp->win_item[w],
                                   cp->win_item[w + 1] - cp->win_item[w], counts, stream),
                       rc, out);
        RLB_CUDA_CHECK(cudaEventRecord(cp->ev_free[b], stream), rc, out);
    }
out:
    return rc;
}

extern "C" int rlb__cuda_plan_run(rlb_cuda_plan *cp, cudaStream_t stream)
{
    if (!cp || !cp->bound)
        return RLB_EINVAL;
    int rc = 0, prev = -1;
    unsigned long long *counts = cp->counting ? cp->d_counts : nullptr;
    RLB_CHECK(rlb__cuda_enter(cp->device, &prev));
    if (counts)
        RLB_CUDA_CHECK(cudaMemsetAsync(counts, 0, cp->n_plan_ops * sizeof(*counts), stream), rc,
                       out);
    if (cp->staging)
        rc = run_staged(cp, counts, stream);
    else
        rc = launch_list(cp->all, cp->all.d_ptrs, cp->all.d_ptrs + cp->n_src, 0,
                         cp->all.n_items, counts, stream);
    if (rc == 0 && counts)
        RLB_CUDA_CHECK(cudaMemcpyAsync(cp->h_counts, counts, cp->n_plan_ops * sizeof(*counts),
                                       cudaMemcpyDeviceToHost, stream), rc, out);
out:
    rlb__cuda_leave(prev);
    return rc;
}

extern "C" int rlb__cuda_plan_count(rlb_cuda_plan *cp, int on)
{
    if (!cp)
        return RLB_EINVAL;
    if (on && !cp->d_counts && cp->n_plan_ops) {
        int rc = 0, prev = -1;
        const size_t bytes = cp->n_plan_ops * sizeof(*cp->d_counts);
        RLB_CHECK(rlb__cuda_enter(cp->device, &prev));
        RLB_CUDA_CHECK(cudaMalloc(&cp->d_counts, bytes), rc, out);
        RLB_CUDA_CHECK(cudaMallocHost(&cp->h_counts, bytes), rc, out);
    out:
        if (rc) {
            cudaFree(cp->d_counts);
            cp->d_counts = nullptr;
        }
        rlb__cuda_leave(prev);
        if (rc)
            return rc;
    }
    cp->counting = on && cp->n_plan_ops;
    return 0;
}

extern "C" void rlb__cuda_plan_counts(const rlb_cuda_plan *cp, uint64_t *nonfinite)
{
    for (uint32_t i = 0; cp && cp->counting && i < cp->n_plan_ops; i++)
        nonfinite[i] += cp->h_counts[i];
}

extern "C" uint64_t rlb__cuda_plan_device_bytes(const rlb_cuda_plan *cp)
{
    if (!cp)
        return 0;
    return cp->all.dev_bytes + cp->direct.dev_bytes + cp->staged.dev_bytes +
           (cp->d_stage ? 2 * cp->stage_cap : 0);
}

extern "C" char *const *rlb__cuda_plan_bound_ptrs(const rlb_cuda_plan *cp)
{
    return cp ? cp->all.d_ptrs : nullptr;
}

extern "C" int rlb__cuda_plan_staging(const rlb_cuda_plan *cp)
{
    return cp && cp->bound && cp->staging;
}

extern "C" uint64_t rlb__cuda_plan_items(const rlb_cuda_plan *cp)
{
    return cp ? cp->all.n_items : 0;
}

extern "C" uint64_t rlb__cuda_plan_staged_bytes(const rlb_cuda_plan *cp, uint32_t *windows)
{
    if (windows)
        *windows = cp && cp->staging ? cp->sp.n_windows : 0;
    return cp && cp->staging ? cp->sp.bytes_copied : 0;
}
