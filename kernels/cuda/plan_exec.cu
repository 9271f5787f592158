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
 * Check: tests/gpu/test_cuda_plan_exec (random plans vs a naive loop, every conversion
 * pattern); speed: rlb-bench-reshard-gpu (bytes moved against a cudaMemcpy of the same).
 */
#include "kernels/cuda/plan_exec.h"

#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/cuda_check.h"

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
    uint32_t reserved;      /* zero */
};
static_assert(sizeof(task) == 48, "task is uploaded as is");

struct exec_args {
    const rlb_copy_op *ops; /* [n_ops] the uploaded ops */
    const task *tasks;      /* [n_ops + 1]; the last is a sentinel with first_item == n_items */
    const uint32_t *coarse; /* [n_items / kCoarse + 2] op holding item g * kCoarse */
    char *const *src;       /* [n_src] bound source base addresses */
    char *const *dst;       /* [n_dst] bound destination base addresses */
};

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

template <typename S, typename D, bool ZERO>
__device__ __forceinline__ void store_group(char *d, const typename group<S, D>::in_t &in)
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
#pragma unroll
    for (int v = 0; v < (int)(sizeof(out.v) / sizeof(out.v[0])); v++)
        p[v] = out.v[v];
}

template <typename S, typename D, bool ZERO>
__device__ __forceinline__ void move_unit(const char *s, char *d)
{
    if constexpr (ZERO)
        *reinterpret_cast<D *>(d) = D{};
    else if constexpr (sizeof(S) == 1 && sizeof(D) == 1)
        *reinterpret_cast<D *>(d) = *reinterpret_cast<const S *>(s);
    else
        *reinterpret_cast<D *>(d) = rlb__d_convert<S, D>(*reinterpret_cast<const S *>(s));
}

/* Rows [0, nr) x units [0, nu) of a region whose first unit is at src / dst. */
template <typename S, typename D, bool ZERO>
__device__ void copy_region(const char *src, uint64_t sstride, char *dst, uint64_t dstride,
                            uint64_t nr, uint64_t nu)
{
    using G = group<S, D>;
    constexpr int VEC = G::VEC, SS = G::SS, DS = G::DS;
    const uint32_t tid = threadIdx.x;
    const bool rows_aligned = (nr == 1 || (dstride % 16 == 0 && (ZERO || sstride % 16 == 0)));
    const bool fast = nu % VEC == 0 && rows_aligned && (uintptr_t)dst % 16 == 0 &&
                      (ZERO || (uintptr_t)src % 16 == 0);
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
                    store_group<S, D, ZERO>(dst + r[i] * dstride + (uint64_t)c[i] * VEC * DS, in[i]);
        }
        return;
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
            store_group<S, D, ZERO>(d + (head + g * VEC) * DS, in);
        }
        const uint64_t n_scalar = head + (nu - tail0);
        for (uint64_t i = tid; i < n_scalar; i += kThreads) {
            uint64_t u = i < head ? i : tail0 + (i - head);
            move_unit<S, D, ZERO>(s + u * SS, d + u * DS);
        }
    }
}

#define RLB__PAIR(s, d) ((uint32_t)(s) * RLB_DTYPE_COUNT_ + (uint32_t)(d))

template <typename S, typename D, bool ZERO>
__device__ __forceinline__ void run_region(const char *src, const rlb_copy_op &op, char *dst,
                                           uint64_t u0, uint64_t nr, uint64_t nu)
{
    copy_region<S, D, ZERO>(ZERO ? nullptr : src + u0 * sizeof(S), op.src_stride,
                            dst + u0 * sizeof(D), op.dst_stride, nr, nu);
}

/* Item j of op k. */
__device__ void run_item(const exec_args &a, uint32_t k, uint64_t j)
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
    if (t.mode == MODE_RAW) {
        run_region<uint8_t, uint8_t, false>(src, op, dst, u0, nr, nu);
        return;
    }
    if (t.mode == MODE_ZERO) {
        run_region<uint8_t, uint8_t, true>(src, op, dst, u0, nr, nu);
        return;
    }
    switch (RLB__PAIR(op.src_dtype, op.dst_dtype)) {
    case RLB__PAIR(RLB_DTYPE_F32, RLB_DTYPE_BF16):
        run_region<float, rlb__bf16_t, false>(src, op, dst, u0, nr, nu);
        break;
    case RLB__PAIR(RLB_DTYPE_F32, RLB_DTYPE_F16):
        run_region<float, rlb__f16_t, false>(src, op, dst, u0, nr, nu);
        break;
    case RLB__PAIR(RLB_DTYPE_BF16, RLB_DTYPE_F32):
        run_region<rlb__bf16_t, float, false>(src, op, dst, u0, nr, nu);
        break;
    case RLB__PAIR(RLB_DTYPE_BF16, RLB_DTYPE_F16):
        run_region<rlb__bf16_t, rlb__f16_t, false>(src, op, dst, u0, nr, nu);
        break;
    case RLB__PAIR(RLB_DTYPE_F16, RLB_DTYPE_F32):
        run_region<rlb__f16_t, float, false>(src, op, dst, u0, nr, nu);
        break;
    case RLB__PAIR(RLB_DTYPE_F16, RLB_DTYPE_BF16):
        run_region<rlb__f16_t, rlb__bf16_t, false>(src, op, dst, u0, nr, nu);
        break;
    default: /* upload admits no other pair */
        break;
    }
}

/* One block per item. The block finds its op by binary search between the ops that the
 * coarse index names for its item group and the next group (usually one or two ops).
 * (A persistent grid looping over items was tried: with every copy path inlined into one
 * loop the compiler keeps all paths' registers live at once, over 200 per thread.) */
__global__ void __launch_bounds__(kThreads) plan_kernel(exec_args a)
{
    const uint64_t item = blockIdx.x;
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
    run_item(a, lo, item - a.tasks[lo].first_item);
}

} /* namespace */

struct rlb_cuda_plan {
    int device;           /* GPU the plan runs on */
    uint32_t n_ops;       /* ops uploaded (those writing this GPU's destinations, non-empty) */
    uint64_t n_items;     /* work items of one run */
    uint32_t n_src;       /* plan->n_src */
    uint32_t n_dst;       /* plan->n_dst */
    uint64_t *need;       /* [n_src + n_dst] bytes a bound buffer must cover; 0 = ref unused */
    uint8_t *align;       /* [n_src + n_dst] widest element size the uploaded ops use with it */
    char *d_mem;          /* device: one allocation holding the four tables below */
    uint64_t dev_bytes;   /* its size */
    rlb_copy_op *d_ops;   /* in d_mem: [n_ops] */
    task *d_tasks;        /* in d_mem: [n_ops + 1] */
    uint32_t *d_coarse;   /* in d_mem: [n_items / kCoarse + 2] */
    char **d_ptrs;        /* in d_mem: [n_src + n_dst] bound base addresses, sources first */
    int bound;            /* a bind has succeeded */
};

/* Checks op i against the plan (rlb__plan_check_op, plus element alignment, which GPU loads
 * need) and fills its descriptor (first_item left to the caller). Returns the op's item
 * count (>= 1) or RLB_EINVAL with `err` naming the op. */
static int64_t describe_op(const rlb_plan *plan, uint64_t i, task *t, char *err, size_t errlen)
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
        return (int64_t)(op->rows * t->segs_per_row);
    }
    t->seg_units = t->row_units;
    t->segs_per_row = 1;
    t->rows_per_item = per_item / t->row_units;
    return (int64_t)((op->rows + t->rows_per_item - 1) / t->rows_per_item);
}

static uint64_t align256(uint64_t x)
{
    return (x + 255) / 256 * 256;
}

static void note_use(rlb_cuda_plan *cp, uint32_t ref, uint64_t need, uint64_t elem)
{
    cp->need[ref] = need;
    if (elem > cp->align[ref])
        cp->align[ref] = (uint8_t)elem;
}

extern "C" void rlb__cuda_plan_free(rlb_cuda_plan *cp)
{
    if (!cp)
        return;
    int prev;
    bool entered = rlb__cuda_enter(cp->device, &prev) == 0;
    cudaFree(cp->d_mem);
    if (entered)
        rlb__cuda_leave(prev);
    free(cp->need);
    free(cp->align);
    free(cp);
}

extern "C" int rlb__cuda_plan_upload(const rlb_plan *plan, int device, const uint8_t *dst_sel,
                                     rlb_cuda_plan **out, char *err, size_t errlen)
{
    if (!plan || !out || (plan->n_ops && !plan->ops) || (plan->n_src && !plan->src_bytes) ||
        (plan->n_dst && !plan->dst_bytes) || plan->n_ops > UINT32_MAX)
        return RLB_EINVAL;
    *out = nullptr;
    int rc = 0, prev = -1;
    rlb_copy_op *ops = nullptr;
    task *tasks = nullptr;
    uint32_t *coarse = nullptr;
    char *staging = nullptr;
    uint64_t n_coarse = 0;
    rlb_cuda_plan *cp = (rlb_cuda_plan *)calloc(1, sizeof(*cp));
    const uint32_t n_refs = plan->n_src + plan->n_dst;
    if (!cp)
        return RLB_ENOMEM;
    cp->device = device;
    cp->n_src = plan->n_src;
    cp->n_dst = plan->n_dst;
    cp->need = (uint64_t *)calloc(n_refs + 1, sizeof(uint64_t));
    cp->align = (uint8_t *)calloc(n_refs + 1, 1);
    ops = (rlb_copy_op *)malloc((plan->n_ops + 1) * sizeof(*ops));
    tasks = (task *)malloc((plan->n_ops + 1) * sizeof(*tasks));
    if (!cp->need || !cp->align || !ops || !tasks) {
        rc = RLB_ENOMEM;
        goto err;
    }
    for (uint64_t i = 0; i < plan->n_ops; i++) {
        const rlb_copy_op *op = &plan->ops[i];
        if (dst_sel && op->dst_ref < plan->n_dst && !dst_sel[op->dst_ref])
            continue;
        int64_t items = describe_op(plan, i, &tasks[cp->n_ops], err, errlen);
        if (items < 0) {
            rc = (int)items;
            goto err;
        }
        const uint64_t ds = rlb_dtype_size((rlb_dtype)op->dst_dtype);
        note_use(cp, plan->n_src + op->dst_ref, plan->dst_bytes[op->dst_ref], ds);
        if (op->src_ref != RLB_PLAN_ZERO_SRC)
            note_use(cp, op->src_ref, plan->src_bytes[op->src_ref],
                     rlb_dtype_size((rlb_dtype)op->src_dtype));
        tasks[cp->n_ops].first_item = cp->n_items;
        cp->n_items += (uint64_t)items;
        ops[cp->n_ops++] = *op;
    }
    memset(&tasks[cp->n_ops], 0, sizeof(task));
    tasks[cp->n_ops].first_item = cp->n_items; /* sentinel: ends every search */
    if (cp->n_items > INT32_MAX) { /* one block per item */
        rlb__cuda_err(err, errlen, "plan: %llu work items exceed one launch",
                      (unsigned long long)cp->n_items);
        rc = RLB_ETOOBIG;
        goto err;
    }
    /* coarse[g] = op holding item g * kCoarse; the entry after the last group is the last op */
    n_coarse = (cp->n_items + kCoarse - 1) / kCoarse + 1;
    coarse = (uint32_t *)malloc(n_coarse * sizeof(*coarse));
    if (!coarse) {
        rc = RLB_ENOMEM;
        goto err;
    }
    for (uint64_t g = 0, k = 0; g + 1 < n_coarse; g++) {
        while (tasks[k + 1].first_item <= g * kCoarse)
            k++;
        coarse[g] = (uint32_t)k;
    }
    coarse[n_coarse - 1] = cp->n_ops ? cp->n_ops - 1 : 0;

    RLB_CHECK_GOTO(rlb__cuda_enter(device, &prev), rc, err);
    /* one allocation and one copy: upload is on the registration path, where each CUDA call
     * costs tens of microseconds */
    {
        const uint64_t o_tasks = align256((cp->n_ops + 1) * sizeof(*ops));
        const uint64_t o_coarse = align256(o_tasks + (cp->n_ops + 1) * sizeof(*tasks));
        const uint64_t o_ptrs = align256(o_coarse + n_coarse * sizeof(*coarse));
        cp->dev_bytes = o_ptrs + (n_refs + 1) * sizeof(char *);
        staging = (char *)malloc(o_ptrs);
        if (!staging) {
            rc = RLB_ENOMEM;
            goto err_dev;
        }
        memcpy(staging, ops, cp->n_ops * sizeof(*ops));
        memcpy(staging + o_tasks, tasks, (cp->n_ops + 1) * sizeof(*tasks));
        memcpy(staging + o_coarse, coarse, n_coarse * sizeof(*coarse));
        RLB_CUDA_CHECK(cudaMalloc(&cp->d_mem, cp->dev_bytes), rc, err_dev);
        RLB_CUDA_CHECK(cudaMemcpy(cp->d_mem, staging, o_ptrs, cudaMemcpyHostToDevice), rc, err_dev);
        cp->d_ops = (rlb_copy_op *)cp->d_mem;
        cp->d_tasks = (task *)(cp->d_mem + o_tasks);
        cp->d_coarse = (uint32_t *)(cp->d_mem + o_coarse);
        cp->d_ptrs = (char **)(cp->d_mem + o_ptrs);
    }
    rlb__cuda_leave(prev);
    free(staging);
    free(ops);
    free(tasks);
    free(coarse);
    *out = cp;
    return 0;
err_dev:
    rlb__cuda_leave(prev);
err:
    free(staging);
    free(ops);
    free(tasks);
    free(coarse);
    rlb__cuda_plan_free(cp);
    return rc;
}

/* Checks that kernels on `device` can address ptr, enabling peer access where needed. */
static int check_access(int device, const void *ptr, uint32_t ref, char *err, size_t errlen)
{
    cudaPointerAttributes at;
    int rc = 0, can = 0;
    RLB_CUDA_CHECK(cudaPointerGetAttributes(&at, ptr), rc, out);
    if (at.type == cudaMemoryTypeHost && at.devicePointer == ptr)
        return 0; /* mapped host memory, same address on the device (UVA) */
    if (at.type != cudaMemoryTypeDevice && at.type != cudaMemoryTypeManaged) {
        rlb__cuda_err(err, errlen, "buffer %u at %p is not memory GPU %d can address "
                      "(host memory must be registered and mapped)", ref, ptr, device);
        return RLB_EINVAL;
    }
    if (at.device == device)
        return 0;
    RLB_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, device, at.device), rc, out);
    if (!can) {
        rlb__cuda_err(err, errlen, "buffer %u lives on GPU %d, which GPU %d cannot reach "
                      "peer to peer: stage it into local memory", ref, at.device, device);
        return RLB_EUNSUPPORTED;
    }
    {
        cudaError_t e = cudaDeviceEnablePeerAccess(at.device, 0);
        if (e == cudaErrorPeerAccessAlreadyEnabled)
            cudaGetLastError(); /* reset the error state; access is on, which is the aim */
        else
            RLB_CUDA_CHECK(e, rc, out);
    }
out:
    return rc;
}

extern "C" int rlb__cuda_plan_bind(rlb_cuda_plan *cp, const rlb_cuda_buf *src,
                                   const rlb_cuda_buf *dst, char *err, size_t errlen)
{
    if (!cp || (cp->n_src && !src) || (cp->n_dst && !dst))
        return RLB_EINVAL;
    const uint32_t n_refs = cp->n_src + cp->n_dst;
    int rc = 0, prev = -1;
    char **ptrs = (char **)calloc(n_refs + 1, sizeof(char *));
    if (!ptrs)
        return RLB_ENOMEM;
    cp->bound = 0;
    RLB_CHECK_GOTO(rlb__cuda_enter(cp->device, &prev), rc, out_free);
    for (uint32_t r = 0; r < n_refs; r++) {
        const rlb_cuda_buf *b = r < cp->n_src ? &src[r] : &dst[r - cp->n_src];
        if (cp->need[r] == 0)
            continue;
        if (!b->ptr || b->bytes < cp->need[r] || (uintptr_t)b->ptr % cp->align[r] != 0) {
            rlb__cuda_err(err, errlen, "%s %u: buffer %p of %llu bytes; the plan needs %llu "
                          "bytes aligned to %u", r < cp->n_src ? "source" : "destination",
                          r < cp->n_src ? r : r - cp->n_src, b->ptr,
                          (unsigned long long)b->bytes, (unsigned long long)cp->need[r],
                          cp->align[r]);
            rc = RLB_EINVAL;
            goto out;
        }
        RLB_CHECK_GOTO(check_access(cp->device, b->ptr, r, err, errlen), rc, out);
        ptrs[r] = (char *)b->ptr;
    }
    RLB_CUDA_CHECK(cudaMemcpy(cp->d_ptrs, ptrs, n_refs * sizeof(char *), cudaMemcpyHostToDevice),
                   rc, out);
    cp->bound = 1;
out:
    rlb__cuda_leave(prev);
out_free:
    free(ptrs);
    return rc;
}

extern "C" int rlb__cuda_plan_run(rlb_cuda_plan *cp, cudaStream_t stream)
{
    if (!cp || !cp->bound)
        return RLB_EINVAL;
    if (cp->n_items == 0)
        return 0;
    int rc = 0, prev = -1;
    exec_args a;
    a.ops = cp->d_ops;
    a.tasks = cp->d_tasks;
    a.coarse = cp->d_coarse;
    a.src = cp->d_ptrs;
    a.dst = cp->d_ptrs + cp->n_src;
    RLB_CHECK(rlb__cuda_enter(cp->device, &prev));
    plan_kernel<<<(unsigned)cp->n_items, kThreads, 0, stream>>>(a);
    RLB_CUDA_CHECK(cudaGetLastError(), rc, out);
out:
    rlb__cuda_leave(prev);
    return rc;
}

extern "C" uint64_t rlb__cuda_plan_device_bytes(const rlb_cuda_plan *cp)
{
    return cp ? cp->dev_bytes : 0;
}

extern "C" uint64_t rlb__cuda_plan_items(const rlb_cuda_plan *cp)
{
    return cp ? cp->n_items : 0;
}
