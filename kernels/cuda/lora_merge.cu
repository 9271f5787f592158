/* lora_merge.cu: the LoRA merge on one GPU (lora_merge.h): C = base + scale * L * R over each
 * merge's block, with f32 sums and one rounding: fused (the base read from the sources;
 * fused_kernel, or fused_tc_kernel with the product on tensor cores from factors packed
 * into bf16 tiles once per run by pack_kernel) or in place after the block's base copies
 * (merge_kernel).
 *
 * Invariant: each destination element of a merge is written once (the merged value), by one
 * thread, after its base was read once (from its source, or from C as the copies left it);
 * blocks of a plan's merges never overlap, so tiles run in any order. The stage and the
 * sources are only read.
 *
 * The fused kernel's base. At upload every base copy of a merge is cut into pieces:
 * rectangles of the block (rows i0..i1, columns j0..j1) whose element (i, j) sits at
 * src_off + (i - i0) * src_stride + (j - j0) * size in one source (an op whose rows are rows
 * of the block is one piece; an FSDP1 run across rows is cut into its head, whole rows and
 * tail). The pieces must tile the block exactly (no gap, no overlap: checked), else the
 * merges run separately. Each band of kTileRows rows lists the pieces it meets; a tile whose
 * band has one piece (every full and FSDP2 source) loads 16 bytes per thread where the
 * address allows, otherwise it finds each element's piece in the band's list.
 *
 * Work division: every merge is cut into tiles of kTileRows x kTileCols elements of C,
 * numbered across merges (first_tile is a prefix sum). The in-place merge runs one block
 * per tile, which finds its merge by binary search over the descriptors; the fused ones run
 * as many blocks as the GPU holds at once, each taking every gridDim.x-th tile, so its
 * merge is found by a step forward from the last. The descriptors are ordered by
 * destination dtype, so one launch per dtype runs a kernel compiled for it. In a block the
 * 8 warps each hold kRowsPerThread rows (ty, ty + 8, ...) and every lane kColsPerThread
 * columns (tx, tx + 32, ...), so loads and stores of C are coalesced along rows. The rank is
 * walked in chunks of kRankChunk: scale * L and R of the chunk are staged in shared memory
 * (L broadcast along a warp, R read by consecutive lanes), then each thread adds the
 * chunk's products to its 32 sums in rank order.
 *
 * The non-finite values written (the rounded bits, as the CPU counts them) are summed per
 * warp and added to the merge's counter with one atomic add, only when not zero.
 *
 * Check: tests/gpu/test_cuda_lora (against the CPU executor and a double-precision
 * W + s * B * A, full / FSDP2 / FSDP1 sources, TP 1, 2, 4, ranks 8 and 64); speed:
 * rlb-bench-reshard-gpu --lora (the merges against their floor and the plain copy) and
 * rlb-bench-sync --device cuda --lora (publish to commit).
 */
#include "kernels/cuda/lora_merge.h"

#include <stdlib.h>
#include <string.h>

#include <cuda_bf16.h>
#include <mma.h>

#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/lora_gemm.h"
#include "model/merge_pieces.h"
extern "C" { /* common/env.h has no C++ guard of its own */
#include "common/env.h"
}

namespace {

constexpr int kThreads = 256;   /* threads per block: 8 warps */
constexpr int kTileRows = 64;   /* rows of C per tile */
constexpr int kTileCols = 128;  /* columns of C per tile */
constexpr int kRankChunk = 32;  /* rank steps staged in shared memory at a time */
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerThread = kTileRows / kWarps;
constexpr int kColsPerThread = kTileCols / 32;
constexpr int kDtypes = 3;      /* F32, BF16, F16: the dtype ranges of the descriptors */

/* One merge as the kernel reads it. */
struct merge_desc {
    char *c;             /* C(0, 0): the block in its destination (set at bind) */
    const float *l;      /* L(0, 0) in the stage */
    const float *r;      /* R(0, 0) in the stage */
    uint64_t first_tile; /* launch-wide index of its first tile */
    uint32_t rows;       /* rows of C */
    uint32_t cols;       /* columns of C (row length: blocks are whole rows) */
    uint32_t rank;       /* inner dimension */
    uint32_t l_ld;       /* f32 elements between stored rows of L (of L^T when transposed) */
    uint32_t r_ld;       /* the same for R */
    uint32_t col_tiles;  /* tiles across a row of C */
    float scale;         /* s */
    uint32_t flags;      /* RLB_MERGE_* */
    uint32_t band_first; /* fused: its first row band in the band table */
    uint32_t kp;         /* tensor cores: the rank padded to a whole mma step (16) */
    const uint16_t *pl;  /* tensor cores: L packed in bf16, kp per row, a whole band's rows */
    const uint16_t *pr;  /* ... R packed in bf16, kp rows of pr_ld (whole tiles' columns) */
    uint32_t pr_ld;
    uint32_t reserved;
};
static_assert(sizeof(merge_desc) == 96, "merge_desc is uploaded as is");

typedef rlb_merge_piece piece_desc; /* model/merge_pieces.h */

__device__ __forceinline__ bool nonfinite(float f)
{
    return (__float_as_uint(f) & 0x7f800000u) == 0x7f800000u;
}

__device__ __forceinline__ bool nonfinite(rlb__bf16_t h)
{
    return (h.bits & 0x7f80u) == 0x7f80u;
}

__device__ __forceinline__ bool nonfinite(rlb__f16_t h)
{
    return (h.bits & 0x7c00u) == 0x7c00u;
}

/* Stages m.scale * L(i0 + i, k0 + k) in ls[i][k] and R(k0 + k, j0 + j) in rs[k][j] for the
 * tile's rows and columns and k < kc, zero outside C. Consecutive threads take consecutive
 * stored elements of L (coalesced) and consecutive columns of R (no bank conflict). */
template <int LdL, int LdR>
__device__ __forceinline__ void stage_chunk(const merge_desc &m, uint32_t i0, uint32_t j0,
                                            uint32_t k0, uint32_t kc, float (*ls)[LdL],
                                            float (*rs)[LdR])
{
    const bool lt = (m.flags & RLB_MERGE_L_TRANS) != 0, rt = (m.flags & RLB_MERGE_R_TRANS) != 0;
    for (uint32_t x = threadIdx.x; x < kTileRows * kc; x += kThreads) {
        const uint32_t i = lt ? x % kTileRows : x / kc, k = lt ? x / kTileRows : x % kc;
        ls[i][k] = i0 + i < m.rows ? m.scale * (lt ? m.l[(uint64_t)(k0 + k) * m.l_ld + i0 + i]
                                                   : m.l[(uint64_t)(i0 + i) * m.l_ld + k0 + k])
                                   : 0.0f;
    }
    for (uint32_t x = threadIdx.x; x < kc * kTileCols; x += kThreads) {
        const uint32_t j = x % kTileCols, k = x / kTileCols;
        rs[k][j] = j0 + j < m.cols ? (rt ? m.r[(uint64_t)(j0 + j) * m.r_ld + k0 + k]
                                         : m.r[(uint64_t)(k0 + k) * m.r_ld + j0 + j])
                                   : 0.0f;
    }
}

/* Adds the non-finite values this thread wrote (bad) to counts[k]: summed per warp, one
 * atomic add by its first lane, only when not zero. */
__device__ __forceinline__ void add_count(int bad, unsigned long long *counts, uint32_t k)
{
    for (int o = 16; o > 0; o /= 2)
        bad += __shfl_down_sync(0xffffffffu, bad, o);
    if (threadIdx.x % 32 == 0 && bad)
        atomicAdd(&counts[k], (unsigned long long)bad);
}

/* The index of the merge of md[lo, hi) holding launch-wide tile `tile`, given
 * md[lo].first_tile <= tile < md[hi].first_tile (binary search). */
__device__ __forceinline__ uint32_t search_tile(const merge_desc *md, uint32_t lo, uint32_t hi,
                                                uint64_t tile)
{
    while (hi - lo > 1) {
        const uint32_t mid = (lo + hi) / 2;
        if (md[mid].first_tile <= tile)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* The merge of md[first, last) holding launch-wide tile `tile` (md[last] ends the range):
 * returns it, its index in *k and the tile's first row and column. */
__device__ __forceinline__ merge_desc find_tile(const merge_desc *md, uint32_t first,
                                                uint32_t last, uint64_t tile, uint32_t *k,
                                                uint32_t *i0, uint32_t *j0)
{
    const uint32_t lo = search_tile(md, first, last, tile);
    const merge_desc m = md[lo];
    const uint64_t t = tile - m.first_tile;
    *k = lo;
    *i0 = (uint32_t)(t / m.col_tiles) * kTileRows;
    *j0 = (uint32_t)(t % m.col_tiles) * kTileCols;
    return m;
}

/* One block per tile of the merges md[first, last) (md[last].first_tile ends the range). */
template <typename D>
__global__ void __launch_bounds__(kThreads)
merge_kernel(const merge_desc *md, uint32_t first, uint32_t last, uint64_t tile0,
             unsigned long long *counts)
{
    __shared__ float ls[kTileRows][kRankChunk + 1]; /* scale * L; padded: stores by row */
    __shared__ float rs[kRankChunk][kTileCols];
    uint32_t lo, i0, j0;
    const merge_desc m = find_tile(md, first, last, tile0 + blockIdx.x, &lo, &i0, &j0);
    const uint32_t tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    D *c = reinterpret_cast<D *>(m.c);

    float acc[kRowsPerThread][kColsPerThread];
#pragma unroll
    for (int q = 0; q < kRowsPerThread; q++)
#pragma unroll
        for (int cc = 0; cc < kColsPerThread; cc++) {
            const uint32_t i = i0 + ty + kWarps * q, j = j0 + tx + 32 * cc;
            acc[q][cc] = i < m.rows && j < m.cols ? rlb__d_to_f32(c[(uint64_t)i * m.cols + j])
                                                  : 0.0f;
        }
    for (uint32_t k0 = 0; k0 < m.rank; k0 += kRankChunk) {
        const uint32_t kc = min((uint32_t)kRankChunk, m.rank - k0);
        __syncthreads(); /* every thread is done with the last chunk */
        stage_chunk(m, i0, j0, k0, kc, ls, rs);
        __syncthreads();
#pragma unroll 4
        for (uint32_t k = 0; k < kc; k++) {
            float rv[kColsPerThread];
#pragma unroll
            for (int cc = 0; cc < kColsPerThread; cc++)
                rv[cc] = rs[k][tx + 32 * cc];
#pragma unroll
            for (int q = 0; q < kRowsPerThread; q++) {
                const float lv = ls[ty + kWarps * q][k];
#pragma unroll
                for (int cc = 0; cc < kColsPerThread; cc++)
                    acc[q][cc] = fmaf(lv, rv[cc], acc[q][cc]);
            }
        }
    }
    int bad = 0;
#pragma unroll
    for (int q = 0; q < kRowsPerThread; q++)
#pragma unroll
        for (int cc = 0; cc < kColsPerThread; cc++) {
            const uint32_t i = i0 + ty + kWarps * q, j = j0 + tx + 32 * cc;
            if (i < m.rows && j < m.cols) {
                D out;
                rlb__d_from_f32(acc[q][cc], &out);
                c[(uint64_t)i * m.cols + j] = out;
                bad += nonfinite(out);
            }
        }
    add_count(bad, counts, lo);
}


/* ---- The fused merge ------------------------------------------------------------------ */

constexpr int kVec = 8;                        /* columns of C per thread, side by side */
constexpr int kLanesPerRow = kTileCols / kVec; /* threads across a tile row */
constexpr int kRowStep = kThreads / kLanesPerRow;
constexpr int kFusedRows = kTileRows / kRowStep; /* rows per thread */

/* Element (i, j) of C's base in piece p as f32. */
__device__ __forceinline__ float base_at(const piece_desc &p, char *const *src, uint32_t i,
                                         uint32_t j)
{
    if (p.src_ref == RLB_PLAN_ZERO_SRC)
        return 0.0f;
    const char *a = src[p.src_ref] + p.src_off + (uint64_t)(i - p.i0) * p.src_stride;
    const uint32_t dj = j - p.j0;
    switch (p.src_dtype) {
    case RLB_DTYPE_F32:
        return reinterpret_cast<const float *>(a)[dj];
    case RLB_DTYPE_BF16:
        return rlb__d_to_f32(reinterpret_cast<const rlb__bf16_t *>(a)[dj]);
    default:
        return rlb__d_to_f32(reinterpret_cast<const rlb__f16_t *>(a)[dj]);
    }
}

/* n (<= kVec) elements of 2 bytes at h as raw bits (zeros past n): one 16-byte load where
 * the address allows. */
__device__ __forceinline__ uint4 load_bits(const uint16_t *h, uint32_t n)
{
    if (n == kVec && (reinterpret_cast<uintptr_t>(h) & 15u) == 0)
        return *reinterpret_cast<const uint4 *>(h);
    uint32_t w[4] = {};
#pragma unroll
    for (int c = 0; c < kVec; c++)
        if ((uint32_t)c < n)
            w[c / 2] |= (uint32_t)h[c] << (16 * (c % 2));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

/* The kVec bf16 (bf) or f16 values of raw bits x, widened to f32, into v. */
__device__ __forceinline__ void widen_bits(uint4 x, bool bf, float *v)
{
    const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int c = 0; c < kVec; c++) {
        const uint16_t bits = (uint16_t)(w[c / 2] >> (16 * (c % 2)));
        v[c] = bf ? rlb__d_to_f32(rlb__bf16_t{bits}) : rlb__d_to_f32(rlb__f16_t{bits});
    }
}

/* Columns j .. j + kVec - 1 of row i of C's base from piece p, which holds all of them
 * (n of them inside C: past them, zeros from a 2-byte source, the values left as they are
 * from an f32 one), into v. 16-byte loads where the address allows. The loops over the n
 * columns are unrolled with a guard, so v stays in registers. */
__device__ __forceinline__ void base_row(const piece_desc &p, char *const *src, uint32_t i,
                                         uint32_t j, uint32_t n, float *v)
{
    if (p.src_ref == RLB_PLAN_ZERO_SRC) {
#pragma unroll
        for (int c = 0; c < kVec; c++)
            v[c] = 0.0f;
        return;
    }
    const char *a = src[p.src_ref] + p.src_off + (uint64_t)(i - p.i0) * p.src_stride;
    const uint32_t dj = j - p.j0;
    if (p.src_dtype == RLB_DTYPE_F32) {
        const float *f = reinterpret_cast<const float *>(a) + dj;
        if (n == kVec && (reinterpret_cast<uintptr_t>(f) & 15u) == 0) {
            const float4 x = reinterpret_cast<const float4 *>(f)[0];
            const float4 y = reinterpret_cast<const float4 *>(f)[1];
            v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
            v[4] = y.x, v[5] = y.y, v[6] = y.z, v[7] = y.w;
            return;
        }
#pragma unroll
        for (int c = 0; c < kVec; c++)
            if ((uint32_t)c < n)
                v[c] = f[c];
        return;
    }
    widen_bits(load_bits(reinterpret_cast<const uint16_t *>(a) + dj, n),
               p.src_dtype == RLB_DTYPE_BF16, v);
}

/* Writes n (<= kVec) merged values of D at d: one or two 16-byte stores where the address
 * allows. Returns how many are non-finite. */
__device__ __forceinline__ int store_row(float *d, const float *v, uint32_t n)
{
    int bad = 0;
#pragma unroll
    for (int c = 0; c < kVec; c++)
        bad += (uint32_t)c < n && nonfinite(v[c]);
    if (n == kVec && (reinterpret_cast<uintptr_t>(d) & 15u) == 0) {
        reinterpret_cast<float4 *>(d)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4 *>(d)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
#pragma unroll
        for (int c = 0; c < kVec; c++)
            if ((uint32_t)c < n)
                d[c] = v[c];
    }
    return bad;
}

template <typename D>
__device__ __forceinline__ int store_row(D *d, const float *v, uint32_t n)
{
    uint16_t bits[kVec];
    int bad = 0;
#pragma unroll
    for (int c = 0; c < kVec; c++) {
        D o;
        rlb__d_from_f32(v[c], &o);
        bits[c] = o.bits;
        bad += (uint32_t)c < n && nonfinite(o);
    }
    if (n == kVec && (reinterpret_cast<uintptr_t>(d) & 15u) == 0) {
        uint4 x;
        x.x = bits[0] | (uint32_t)bits[1] << 16;
        x.y = bits[2] | (uint32_t)bits[3] << 16;
        x.z = bits[4] | (uint32_t)bits[5] << 16;
        x.w = bits[6] | (uint32_t)bits[7] << 16;
        *reinterpret_cast<uint4 *>(d) = x;
    } else {
#pragma unroll
        for (int c = 0; c < kVec; c++)
            if ((uint32_t)c < n)
                d[c].bits = bits[c];
    }
    return bad;
}

/* What a fused kernel reads besides the descriptors: the pieces, the band table, the
 * bound sources' addresses (the base plan's pointer table) and the counts. */
struct fused_args {
    const piece_desc *pieces;
    const uint2 *bands;          /* per band: first entry in band_pieces, count */
    const uint32_t *band_pieces; /* pieces of each band, in band order */
    char *const *src;            /* [n_src] */
    unsigned long long *counts;  /* [merges] */
};

/* A block's tile and a thread's place in it: columns j .. j + n - 1 of rows i0 + ty,
 * i0 + ty + kRowStep, ... of merge m (index k). */
struct fused_tile {
    const merge_desc *m; /* read where used: a copy in registers would crowd them */
    uint32_t k, i0, j0, tx, ty, j, n;
};

/* The thread's columns of row i of tile t's base, widened to f32 (zeros outside C), in
 * out: one piece holds the whole band (the usual case), else each element's piece is looked
 * up in the band's list. */
__device__ __forceinline__ void row_base(const fused_tile &t, const fused_args &a, uint2 band,
                                         uint32_t i, float *out)
{
#pragma unroll
    for (int c = 0; c < kVec; c++)
        out[c] = 0.0f;
    if (i >= t.m->rows || t.n == 0)
        return;
    if (band.y == 1) {
        base_row(a.pieces[a.band_pieces[band.x]], a.src, i, t.j, t.n, out);
        return;
    }
#pragma unroll
    for (int c = 0; c < kVec; c++)
        for (uint32_t k = 0; (uint32_t)c < t.n && k < band.y; k++) {
            const piece_desc &p = a.pieces[a.band_pieces[band.x + k]];
            if (i >= p.i0 && i < p.i1 && t.j + c >= p.j0 && t.j + c < p.j1) {
                out[c] = base_at(p, a.src, i, t.j + c);
                break;
            }
        }
}

/* The base of the thread's rows of tile t (row_base). */
__device__ __forceinline__ void tile_base(const fused_tile &t, const fused_args &a,
                                          float (*out)[kVec])
{
    const uint2 band = a.bands[t.m->band_first + t.i0 / kTileRows];
#pragma unroll
    for (int q = 0; q < kFusedRows; q++)
        row_base(t, a, band, t.i0 + t.ty + kRowStep * q, out[q]);
}

/* The fused kernels run a grid no larger than the GPU holds at once; each block takes the
 * launch's tiles tile0 + blockIdx.x, + gridDim.x, ... in turn, so the merge holding its
 * next tile is its last one or a later one: *lo (the last one's index) is checked first,
 * then found by binary search over md[*lo, last). */
__device__ __forceinline__ fused_tile fused_locate(const merge_desc *md, uint32_t *lo,
                                                   uint32_t last, uint64_t tile)
{
    fused_tile t;
    if (md[*lo + 1].first_tile <= tile)
        *lo = search_tile(md, *lo + 1, last, tile);
    t.m = &md[*lo];
    t.k = *lo;
    const uint64_t x = tile - t.m->first_tile;
    t.i0 = (uint32_t)(x / t.m->col_tiles) * kTileRows;
    t.j0 = (uint32_t)(x % t.m->col_tiles) * kTileCols;
    t.tx = threadIdx.x % kLanesPerRow;
    t.ty = threadIdx.x / kLanesPerRow;
    t.j = t.j0 + kVec * t.tx;
    t.n = t.j < t.m->cols ? min((uint32_t)kVec, t.m->cols - t.j) : 0;
    return t;
}

/* What both fused kernels do last with a tile: the thread's merged values v into C, the
 * non-finite ones counted. */
template <typename D>
__device__ __forceinline__ void fused_store(const fused_tile &t, const fused_args &a,
                                            const float (*v)[kVec])
{
    int bad = 0;
    D *c = reinterpret_cast<D *>(t.m->c);
#pragma unroll
    for (int q = 0; q < kFusedRows; q++) {
        const uint32_t i = t.i0 + t.ty + kRowStep * q;
        if (i < t.m->rows && t.n)
            bad += store_row(c + (uint64_t)i * t.m->cols + t.j, v[q], t.n);
    }
    add_count(bad, a.counts, t.k);
}

/* As merge_kernel, but C's base comes from the merge's sources (its pieces) instead of C:
 * C = base + scale * L * R is written once, and nothing reads C. The arithmetic is
 * merge_kernel's: the base widened to f32, then the rank-r products added in rank order,
 * each a fused multiply-add, one rounding. Thread (ty, tx) holds columns
 * kVec * tx .. + kVec - 1 of rows ty, ty + kRowStep, ... of a tile; tiles tile0 .. tile1 - 1
 * are shared among the blocks (fused_locate). */
template <typename D>
__global__ void __launch_bounds__(kThreads)
fused_kernel(const merge_desc *md, uint32_t first, uint32_t last, uint64_t tile0,
             uint64_t tile1, fused_args a)
{
    __shared__ float ls[kTileRows][kRankChunk + 1];
    __shared__ __align__(16) float rs[kRankChunk][kTileCols];
    uint32_t lo = first;
    for (uint64_t tile = tile0 + blockIdx.x; tile < tile1; tile += gridDim.x) {
        float acc[kFusedRows][kVec];
        const fused_tile t = fused_locate(md, &lo, last, tile);
        tile_base(t, a, acc);
        for (uint32_t k0 = 0; k0 < t.m->rank; k0 += kRankChunk) {
            const uint32_t kc = min((uint32_t)kRankChunk, t.m->rank - k0);
            __syncthreads(); /* every thread is done with the last chunk */
            stage_chunk(*t.m, t.i0, t.j0, k0, kc, ls, rs);
            __syncthreads();
#pragma unroll 4
            for (uint32_t k = 0; k < kc; k++) {
                const float4 ra = *reinterpret_cast<const float4 *>(&rs[k][kVec * t.tx]);
                const float4 rb = *reinterpret_cast<const float4 *>(&rs[k][kVec * t.tx + 4]);
                const float rv[kVec] = {ra.x, ra.y, ra.z, ra.w, rb.x, rb.y, rb.z, rb.w};
#pragma unroll
                for (int q = 0; q < kFusedRows; q++) {
                    const float lv = ls[t.ty + kRowStep * q][k];
#pragma unroll
                    for (int c = 0; c < kVec; c++)
                        acc[q][c] = fmaf(lv, rv[c], acc[q][c]);
                }
            }
        }
        fused_store<D>(t, a, acc);
    }
}

/* ---- The fused merge on tensor cores -------------------------------------------------- */

constexpr int kTcChunk = 64;               /* rank steps staged at a time (a multiple of 16) */
constexpr int kLdL = kTcChunk + 8;         /* bf16 elements per staged row of L */
constexpr int kLdR = kTileCols + 8;        /* of R */
constexpr int kLdAcc = kTileCols + 4;      /* f32 elements per row of the product */

/* The staged factors, then (the same bytes) the tile's product L * R. */
union tc_smem {
    struct {
        __nv_bfloat16 l[kTileRows][kLdL];
        __nv_bfloat16 r[kTcChunk][kLdR];
    } in;
    float acc[kTileRows][kLdAcc];
};

/* The packed factors of the tensor-core merge, made from the stage once per run: L of
 * merge k as bf16 rows of kp (zeros past its rank, and in the rows past C up to a whole
 * band), R as kp rows of pr_ld bf16 (zeros past C's columns, up to whole tiles, and in the
 * rows past its rank). Exact: the stage holds bf16 values. So a tile stages its factors
 * with plain 16-byte copies, no bounds and no transposition. Blocks (x, y): merge x, every
 * gridDim.y-th element of its packed factors from y. */

/* The largest of the lanes' x. */
__device__ __forceinline__ uint32_t warp_max(uint32_t x)
{
    for (int o = 16; o > 0; o /= 2)
        x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

/* out[a][b] (n_a x n_b, row-major) = X(a, b) in bf16 for a < va and b < vb, else zero,
 * where X(a, b) is x[a * ld + b] or, transposed, x[b * ld + a]; this block's share (every
 * gridDim.y-th element from blockIdx.y). Returns the largest |X(a, b)| it read as f32 bits
 * (NaN above infinity). */
__device__ __forceinline__ uint32_t pack_matrix(const float *x, uint64_t ld, bool trans,
                                                uint32_t va, uint32_t vb, uint16_t *out,
                                                uint64_t n_a, uint32_t n_b)
{
    const uint64_t stride = (uint64_t)gridDim.y * kThreads;
    uint32_t most = 0;
    for (uint64_t e = (uint64_t)blockIdx.y * kThreads + threadIdx.x; e < n_a * n_b; e += stride) {
        const uint32_t i = (uint32_t)(e / n_b), k = (uint32_t)(e % n_b);
        float v = 0.0f;
        if (i < va && k < vb)
            v = trans ? x[(uint64_t)k * ld + i] : x[(uint64_t)i * ld + k];
        most = max(most, __float_as_uint(v) & 0x7fffffffu);
        out[e] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    }
    return most;
}

/* Packs every merge's factors; where fmax is not NULL, also raises fmax[2 k] and
 * fmax[2 k + 1] to the largest |L| and |R| of merge k (f32 bits, atomicMax). */
__global__ void __launch_bounds__(kThreads)
pack_kernel(const merge_desc *md, uint32_t *fmax)
{
    const merge_desc m = md[blockIdx.x];
    const uint64_t band_rows = (uint64_t)(m.rows + kTileRows - 1) / kTileRows * kTileRows;
    const uint32_t ml = warp_max(pack_matrix(m.l, m.l_ld, (m.flags & RLB_MERGE_L_TRANS) != 0,
                                             m.rows, m.rank, const_cast<uint16_t *>(m.pl),
                                             band_rows, m.kp));
    const uint32_t mr = warp_max(pack_matrix(m.r, m.r_ld, (m.flags & RLB_MERGE_R_TRANS) != 0,
                                             m.rank, m.cols, const_cast<uint16_t *>(m.pr),
                                             m.kp, m.pr_ld));
    if (fmax && threadIdx.x % 32 == 0) {
        atomicMax(&fmax[2 * blockIdx.x], ml);
        atomicMax(&fmax[2 * blockIdx.x + 1], mr);
    }
}

/* C = base + scale * acc over the thread's part of tile t, acc the product in shared
 * memory. Where one 2-byte source holds the tile's band (every full and FSDP2 source of a
 * bf16 model), the thread's rows are read first, all at once, as raw bits (16 registers,
 * four loads in flight), then widened; otherwise row by row (row_base). */
template <typename D>
__device__ __forceinline__ void tc_epilogue(const fused_tile &t, const fused_args &a,
                                            const float (*acc)[kLdAcc])
{
    const uint2 band = a.bands[t.m->band_first + t.i0 / kTileRows];
    const uint32_t rows = t.m->rows, cols = t.m->cols;
    const float scale = t.m->scale;
    D *c = reinterpret_cast<D *>(t.m->c);
    const piece_desc *p = band.y == 1 ? &a.pieces[a.band_pieces[band.x]] : nullptr;
    int bad = 0;
    if (p && t.n && p->src_ref != RLB_PLAN_ZERO_SRC && p->src_dtype != RLB_DTYPE_F32) {
        const uint16_t *h = reinterpret_cast<const uint16_t *>(a.src[p->src_ref] + p->src_off) +
                            (t.j - p->j0);
        const uint64_t ld = p->src_stride / 2;
        const bool bf = p->src_dtype == RLB_DTYPE_BF16;
        uint4 raw[kFusedRows];
#pragma unroll
        for (int q = 0; q < kFusedRows; q++) {
            const uint32_t i = t.i0 + t.ty + kRowStep * q;
            raw[q] = i < rows ? load_bits(h + (uint64_t)(i - p->i0) * ld, t.n) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int q = 0; q < kFusedRows; q++) {
            const uint32_t i = t.i0 + t.ty + kRowStep * q;
            if (i >= rows)
                continue;
            float v[kVec];
            widen_bits(raw[q], bf, v);
#pragma unroll
            for (int e = 0; e < kVec; e++)
                v[e] = fmaf(scale, acc[t.ty + kRowStep * q][kVec * t.tx + e], v[e]);
            bad += store_row(c + (uint64_t)i * cols + t.j, v, t.n);
        }
    } else {
#pragma unroll
        for (int q = 0; q < kFusedRows; q++) {
            const uint32_t i = t.i0 + t.ty + kRowStep * q;
            if (i >= rows || !t.n)
                continue;
            float v[kVec];
            row_base(t, a, band, i, v);
#pragma unroll
            for (int e = 0; e < kVec; e++)
                v[e] = fmaf(scale, acc[t.ty + kRowStep * q][kVec * t.tx + e], v[e]);
            bad += store_row(c + (uint64_t)i * cols + t.j, v, t.n);
        }
    }
    add_count(bad, a.counts, t.k);
}

/* fused_kernel's work with L * R on tensor cores, for factors whose f32 values are bf16
 * values (the stage gathered them from bf16 sources, so bf16 holds them exactly; packed by
 * pack_kernel): the products are exact in f32 and summed in f32 (16 at a time, in the
 * tensor core's order), then C = base + scale * (L * R) with one fused multiply-add and one
 * rounding; the same error bound as the rank-order sum of fused_kernel, not the same bits.
 * 8 warps each hold 32 x 32 of the 64 x 128 product as 2 x 2 fragments of 16 x 16. The
 * base is read after the product, once the fragments are in shared memory (tc_epilogue):
 * no thread holds both, so three blocks fit on a multiprocessor and hide each other's
 * reads. Two other shapes of it were measured and dropped: copying the base and the factors
 * into shared memory with cp.async, four blocks a multiprocessor, ran 1.5x slower on an
 * H200 (the L2 became the bottleneck); each warp making 16 x 64 of the tile with mma.sync,
 * its fragments loaded straight from the packed factors, no shared memory and no barrier,
 * ran 1.3x (rank 16) and 1.7x (rank 64) slower on an H100. */
template <typename D>
__global__ void __launch_bounds__(kThreads, 3)
fused_tc_kernel(const merge_desc *md, uint32_t first, uint32_t last, uint64_t tile0,
                uint64_t tile1, fused_args a)
{
    using namespace nvcuda;
    __shared__ __align__(128) tc_smem sm;
    const int warp = threadIdx.x / 32, wr = warp / 4, wc = warp % 4;
    uint32_t lo = first;
    for (uint64_t tile = tile0 + blockIdx.x; tile < tile1; tile += gridDim.x) {
        const fused_tile t = fused_locate(md, &lo, last, tile);
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
        for (int x = 0; x < 2; x++)
#pragma unroll
            for (int y = 0; y < 2; y++)
                wmma::fill_fragment(acc[x][y], 0.0f);
        for (uint32_t k0 = 0; k0 < t.m->kp; k0 += kTcChunk) {
            const uint32_t kc = min((uint32_t)kTcChunk, t.m->kp - k0); /* a multiple of 16 */
            const uint32_t nq = kc / 8;                              /* 16-byte pieces a row */
            __syncthreads(); /* every warp is done with the last chunk, or the last product */
            for (uint32_t x = threadIdx.x; x < kTileRows * nq; x += kThreads) {
                const uint32_t i = x / nq, q = x - i * nq;
                *reinterpret_cast<uint4 *>(&sm.in.l[i][8 * q]) = *reinterpret_cast<const uint4 *>(
                    t.m->pl + (uint64_t)(t.i0 + i) * t.m->kp + k0 + 8 * q);
            }
            for (uint32_t x = threadIdx.x; x < kc * (kTileCols / 8); x += kThreads) {
                const uint32_t k = x / (kTileCols / 8), q = x % (kTileCols / 8);
                *reinterpret_cast<uint4 *>(&sm.in.r[k][8 * q]) = *reinterpret_cast<const uint4 *>(
                    t.m->pr + (uint64_t)(k0 + k) * t.m->pr_ld + t.j0 + 8 * q);
            }
            __syncthreads();
            for (uint32_t k = 0; k < kc; k += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
#pragma unroll
                for (int x = 0; x < 2; x++)
                    wmma::load_matrix_sync(fa[x], &sm.in.l[32 * wr + 16 * x][k], kLdL);
#pragma unroll
                for (int y = 0; y < 2; y++)
                    wmma::load_matrix_sync(fb[y], &sm.in.r[k][32 * wc + 16 * y], kLdR);
#pragma unroll
                for (int x = 0; x < 2; x++)
#pragma unroll
                    for (int y = 0; y < 2; y++)
                        wmma::mma_sync(acc[x][y], fa[x], fb[y], acc[x][y]);
            }
        }
        __syncthreads();
#pragma unroll
        for (int x = 0; x < 2; x++)
#pragma unroll
            for (int y = 0; y < 2; y++)
                wmma::store_matrix_sync(&sm.acc[32 * wr + 16 * x][32 * wc + 16 * y], acc[x][y],
                                        kLdAcc, wmma::mem_row_major);
        __syncthreads();
        tc_epilogue<D>(t, a, sm.acc);
    }
}

/* ---- The merges written as cuBLASLt products (RLB_LORA_MERGE=gemm, lora_gemm.h) -------- */

/* A rectangle of a product merge's base, as the scan reads it. */
struct scan_piece {
    piece_desc p;
    uint32_t merge; /* its merge's index */
    uint32_t reserved;
};
static_assert(sizeof(scan_piece) == 48, "scan_piece is uploaded as is");

/* Raises bmax[merge] of each piece to the largest |base| in it (bf16 bits without the sign:
 * infinity 0x7f80, NaN above). Blocks (x, y): piece x, its rows y, y + gridDim.y, ... */
__global__ void __launch_bounds__(kThreads)
scan_kernel(const scan_piece *sp, char *const *src, uint32_t *bmax)
{
    const scan_piece s = sp[blockIdx.x];
    const uint32_t w = s.p.j1 - s.p.j0;
    const char *base = src[s.p.src_ref] + s.p.src_off;
    const bool vec = w % 8 == 0 && ((reinterpret_cast<uintptr_t>(base) | s.p.src_stride) & 15u) == 0;
    uint32_t most = 0;
    for (uint32_t i = blockIdx.y; i < s.p.i1 - s.p.i0; i += gridDim.y) {
        const uint16_t *row = reinterpret_cast<const uint16_t *>(base + (uint64_t)i * s.p.src_stride);
        if (vec) {
            for (uint32_t j = kVec * threadIdx.x; j < w; j += kVec * kThreads) {
                const uint4 x = *reinterpret_cast<const uint4 *>(row + j);
                const uint32_t q[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
                for (int c = 0; c < 4; c++)
                    most = max(most, max(q[c] & 0x7fffu, (q[c] >> 16) & 0x7fffu));
            }
        } else {
            for (uint32_t j = threadIdx.x; j < w; j += kThreads)
                most = max(most, (uint32_t)row[j] & 0x7fffu);
        }
    }
    most = warp_max(most);
    if (threadIdx.x % 32 == 0 && most)
        atomicMax(&bmax[s.merge], most);
}

/* Below the largest finite bf16 and f32 values (3.39e38), with room for the f32 sums'
 * rounding. */
constexpr double kSafe = 3.0e38;

/* The non-finite values each product merge wrote (bf16), counted where its inputs allow
 * one: a non-finite factor or base value, or a bound on its f32 sums (kp max|L| max|R|) or
 * on its results (max|base| + |scale| times that) reaching kSafe. Otherwise every value it
 * wrote is finite and its count stays 0, without reading what it wrote. Blocks (x, y):
 * merge list[x], its rows y, y + gridDim.y, ... */
__global__ void __launch_bounds__(kThreads)
count_kernel(const merge_desc *md, const uint32_t *list, const uint32_t *fmax,
             const uint32_t *bmax, unsigned long long *counts)
{
    const uint32_t k = list[blockIdx.x];
    const merge_desc &m = md[k];
    const uint32_t l = fmax[2 * k], r = fmax[2 * k + 1], b = bmax[k];
    if (l < 0x7f800000u && r < 0x7f800000u && b < 0x7f80u) {
        const double sum = (double)m.kp * (double)__uint_as_float(l) *
                           (double)__uint_as_float(r) * 1.001;
        const double base = (double)__uint_as_float(b << 16);
        if (sum < kSafe && base + fabs((double)m.scale) * sum < kSafe)
            return;
    }
    const rlb__bf16_t *c = reinterpret_cast<const rlb__bf16_t *>(m.c);
    int bad = 0;
    for (uint32_t i = blockIdx.y; i < m.rows; i += gridDim.y)
        for (uint32_t j = threadIdx.x; j < m.cols; j += kThreads)
            bad += nonfinite(c[(uint64_t)i * m.cols + j]);
    add_count(bad, counts, k);
}

} /* namespace */

struct rlb_cuda_lora {
    int device;                /* GPU it runs on */
    uint32_t n;                /* merges uploaded */
    rlb_merge_op *merges;      /* [n] host copies, ordered by destination dtype */
    uint64_t *index;           /* [n] each one's index in the uploaded plan's merges[] */
    uint32_t range[kDtypes + 1]; /* merges of dtype k (F32, BF16, F16) are
                                  * [range[k], range[k + 1]) */
    merge_desc *desc;          /* [n + 1] host copy of the descriptors; the last a sentinel */
    merge_desc *d_desc;        /* the device's */
    rlb_cuda_plan *base;       /* the merges' base copies */
    rlb_cuda_plan *gather;     /* the stage ops, into the stage */
    char *d_stage;             /* the f32 adapter stage */
    uint64_t stage_bytes;      /* its size */
    unsigned long long *d_counts; /* [n] non-finite values each merge wrote */
    unsigned long long *h_counts; /* [n] pinned host copy, filled at the end of a run */
    int desc_stale;            /* the device's descriptors lag the host's */
    int bound;                 /* a bind has succeeded */
    /* the fused merge: every merge's base as pieces and the pieces of each row band of
     * kTileRows rows (the sources' addresses: the base plan's bound table) */
    int fused;                 /* the fused kernel may run these merges */
    int tensor;                /* ... on tensor cores: every factor came from bf16 */
    piece_desc *d_pieces;      /* [n_pieces] */
    uint2 *d_bands;            /* per band: first entry in d_band_pieces, count */
    uint32_t *d_band_pieces;   /* pieces of each band, in band order */
    uint64_t fused_bytes;      /* device bytes of the three */
    uint16_t *d_pack;          /* tensor cores: every merge's factors packed (pack_kernel) */
    uint64_t pack_bytes;       /* its size */
    unsigned grid[kDtypes];    /* fused: blocks of dtype range k's launch, as many as the GPU
                                  holds at once (fused_locate), fewer for fewer tiles */
    int per_sm[kDtypes], sms;  /* fused: blocks of range k's kernel a multiprocessor holds,
                                  multiprocessors */
    /* RLB_LORA_MERGE=gemm: the merges whose base is one bf16 source in whole rows, written
     * as cuBLASLt products (they then have no tiles); their non-finite values counted from
     * their inputs (count_kernel), the base's once a bind (scan_kernel) */
    uint8_t *is_gemm;          /* [n] merge k is one */
    uint32_t n_gemm;           /* how many */
    int gemm_now;              /* the last bind writes them so (no source staged) */
    rlb_lora_gemm *gemm;       /* the products of the last bind */
    scan_piece *h_scan;        /* [n_scan] their pieces */
    uint64_t n_scan;
    scan_piece *d_scan;        /* the device's copy */
    uint32_t *d_gemm_list;     /* [n_gemm] their indices */
    uint32_t *d_stat;          /* [3 n]: max |L|, |R| per merge (f32 bits), then max |base| */
    int scan_due;              /* the base was bound and not scanned since */
};

extern "C" void rlb__cuda_lora_free(rlb_cuda_lora *cl)
{
    if (!cl)
        return;
    int prev;
    bool entered = rlb__cuda_enter(cl->device, &prev) == 0;
    rlb__cuda_plan_free(cl->base);
    rlb__cuda_plan_free(cl->gather);
    cudaFree(cl->d_desc);
    cudaFree(cl->d_stage);
    cudaFree(cl->d_counts);
    cudaFreeHost(cl->h_counts);
    cudaFree(cl->d_pieces);
    cudaFree(cl->d_bands);
    cudaFree(cl->d_band_pieces);
    cudaFree(cl->d_pack);
    cudaFree(cl->d_scan);
    cudaFree(cl->d_gemm_list);
    cudaFree(cl->d_stat);
    rlb__lora_gemm_free(cl->gemm);
    if (entered)
        rlb__cuda_leave(prev);
    free(cl->merges);
    free(cl->index);
    free(cl->desc);
    free(cl->is_gemm);
    free(cl->h_scan);
    free(cl);
}

/* Checks the stage ops the merges read from: copies (not zero fills) into f32. The gather
 * plan's upload checks their extents. */
static int check_stage_ops(const rlb_plan *plan, char *err, size_t errlen)
{
    if (plan->n_stage_ops && !plan->stage_ops)
        return RLB_EINVAL;
    for (uint64_t i = 0; i < plan->n_stage_ops; i++)
        if (plan->stage_ops[i].src_ref == RLB_PLAN_ZERO_SRC ||
            plan->stage_ops[i].dst_dtype != RLB_DTYPE_F32) {
            rlb__cuda_err(err, errlen, "plan stage op %llu: not a copy into f32",
                          (unsigned long long)i);
            return RLB_EINVAL;
        }
    return 0;
}

/* Selects, checks and orders (by destination dtype) the merges of `plan` for dst_sel into
 * cl->merges / cl->index / cl->range. */
static int select_merges(rlb_cuda_lora *cl, const rlb_plan *plan, const uint8_t *dst_sel,
                         char *err, size_t errlen)
{
    uint32_t per[kDtypes] = {0};
    for (uint64_t i = 0; i < plan->n_merges; i++) {
        const rlb_merge_op *m = &plan->merges[i];
        if (dst_sel && m->dst_ref < plan->n_dst && !dst_sel[m->dst_ref])
            continue;
        int rc = rlb__plan_check_merge(plan, i, plan->src_bytes, plan->dst_bytes, err, errlen);
        if (rc)
            return rc;
        /* The planner gives every block its base; a block without one would be written
         * from whatever the destination held. */
        if (m->n_copies == 0) {
            rlb__cuda_err(err, errlen, "plan merge %llu: no base copies", (unsigned long long)i);
            return RLB_EINVAL;
        }
        per[m->dst_dtype]++;
    }
    cl->range[0] = 0;
    for (int k = 0; k < kDtypes; k++)
        cl->range[k + 1] = cl->range[k] + per[k];
    uint32_t at[kDtypes];
    memcpy(at, cl->range, sizeof at);
    for (uint64_t i = 0; i < plan->n_merges; i++) {
        const rlb_merge_op *m = &plan->merges[i];
        if (dst_sel && m->dst_ref < plan->n_dst && !dst_sel[m->dst_ref])
            continue;
        uint32_t k = at[m->dst_dtype]++;
        cl->merges[k] = *m;
        cl->index[k] = i;
    }
    return 0;
}

/* Fills the descriptors but for their C (bound later): tiles, stage addresses. Returns the
 * tile count. */
static uint64_t describe_merges(rlb_cuda_lora *cl)
{
    uint64_t tiles = 0;
    for (uint32_t k = 0; k < cl->n; k++) {
        const rlb_merge_op *m = &cl->merges[k];
        merge_desc *d = &cl->desc[k];
        memset(d, 0, sizeof *d);
        d->l = (const float *)(cl->d_stage + m->l_offset);
        d->r = (const float *)(cl->d_stage + m->r_offset);
        d->first_tile = tiles;
        d->rows = (uint32_t)m->rows;
        d->cols = (uint32_t)m->cols;
        d->rank = m->rank;
        d->l_ld = (uint32_t)m->l_ld;
        d->r_ld = (uint32_t)m->r_ld;
        d->col_tiles = (uint32_t)((m->cols + kTileCols - 1) / kTileCols);
        d->scale = m->scale;
        d->flags = m->flags;
        tiles += (m->rows + kTileRows - 1) / kTileRows * d->col_tiles;
    }
    memset(&cl->desc[cl->n], 0, sizeof(merge_desc));
    cl->desc[cl->n].first_tile = tiles; /* sentinel: ends every search */
    return tiles;
}

/* Uploads the copies of the selected merges, and the stage ops, each as a plan of its own. */
static int upload_plans(rlb_cuda_lora *cl, const rlb_plan *plan, char *err, size_t errlen)
{
    uint64_t n_copies = 0, at = 0;
    for (uint32_t k = 0; k < cl->n; k++)
        n_copies += cl->merges[k].n_copies;
    rlb_copy_op *copies = (rlb_copy_op *)malloc((n_copies + 1) * sizeof(*copies));
    if (!copies)
        return RLB_ENOMEM;
    for (uint32_t k = 0; k < cl->n; k++) {
        const rlb_merge_op *m = &cl->merges[k];
        memcpy(copies + at, plan->merge_copies + m->copy_first, m->n_copies * sizeof(*copies));
        at += m->n_copies;
    }
    rlb_plan base = {.n_src = plan->n_src, .n_dst = plan->n_dst, .src_bytes = plan->src_bytes,
                     .dst_bytes = plan->dst_bytes, .n_ops = n_copies, .ops = copies};
    int rc = rlb__cuda_plan_upload(&base, cl->device, NULL, &cl->base, err, errlen);
    free(copies);
    if (rc)
        return rc;
    uint64_t stage_bytes = plan->stage_bytes;
    rlb_plan gather = {.n_src = plan->n_src, .n_dst = 1, .src_bytes = plan->src_bytes,
                       .dst_bytes = &stage_bytes, .n_ops = plan->n_stage_ops,
                       .ops = plan->stage_ops};
    return rlb__cuda_plan_upload(&gather, cl->device, NULL, &cl->gather, err, errlen);
}


/* ---- The fused merge's tables ---------------------------------------------------------- */

/* Builds and uploads the fused kernel's tables of cl's merges (current device: cl's), their
 * pieces left in the caller's `all` (empty), merge k's from first_piece[k] (the caller's,
 * [cl->n + 1]) to first_piece[k + 1]. Leaves cl->fused 0 when some merge's copies are not
 * pieces the kernel reads, or do not tile its block exactly (the merges then run
 * separately). Returns 0 or RLB_ENOMEM / RLB_ECUDA. */
static int build_fused(rlb_cuda_lora *cl, const rlb_plan *plan, rlb_piece_list &all,
                       uint64_t *first_piece)
{
    uint64_t n_bands = 0, n_entries = 0;
    int rc = 0, fusable = 1;
    uint2 *bands = nullptr;
    uint32_t *entries = nullptr;
    for (uint32_t k = 0; k < cl->n && !rc && fusable; k++) {
        const rlb_merge_op *m = &cl->merges[k];
        first_piece[k] = all.n;
        int r = rlb__merge_pieces(plan, m, &all);
        if (r < 0)
            rc = r;
        else if (r > 0)
            fusable = 0;
        if (rc || !fusable)
            break;
        cl->desc[k].band_first = (uint32_t)n_bands;
        n_bands += (m->rows + kTileRows - 1) / kTileRows;
        for (uint64_t i = first_piece[k]; i < all.n; i++)
            n_entries += (all.p[i].i1 - 1) / kTileRows - all.p[i].i0 / kTileRows + 1;
    }
    if (rc || !fusable || n_bands > UINT32_MAX || n_entries > UINT32_MAX ||
        all.n > UINT32_MAX)
        return rc;
    first_piece[cl->n] = all.n;
    bands = (uint2 *)calloc(n_bands + 1, sizeof(uint2));
    entries = (uint32_t *)malloc((n_entries + 1) * sizeof(uint32_t));
    if (!bands || !entries) {
        rc = RLB_ENOMEM;
        goto out;
    }
    for (uint32_t k = 0; k < cl->n; k++) /* count, then place, each band's pieces */
        for (uint64_t i = first_piece[k]; i < first_piece[k + 1]; i++)
            for (uint32_t b = all.p[i].i0 / kTileRows; b <= (all.p[i].i1 - 1) / kTileRows; b++)
                bands[cl->desc[k].band_first + b].y++;
    for (uint64_t b = 0, at = 0; b < n_bands; b++) {
        bands[b].x = (uint32_t)at;
        at += bands[b].y;
        if (bands[b].y == 0) /* every row has a piece when the area matched; kept honest */
            fusable = 0;
        bands[b].y = 0;
    }
    for (uint32_t k = 0; k < cl->n; k++)
        for (uint64_t i = first_piece[k]; i < first_piece[k + 1]; i++)
            for (uint32_t b = all.p[i].i0 / kTileRows; b <= (all.p[i].i1 - 1) / kTileRows; b++) {
                uint2 &e = bands[cl->desc[k].band_first + b];
                entries[e.x + e.y++] = (uint32_t)i;
            }
    if (!fusable)
        goto out;
    RLB_CUDA_CHECK(cudaMalloc(&cl->d_pieces, (all.n + 1) * sizeof(piece_desc)), rc, out);
    RLB_CUDA_CHECK(cudaMalloc(&cl->d_bands, (n_bands + 1) * sizeof(uint2)), rc, out);
    RLB_CUDA_CHECK(cudaMalloc(&cl->d_band_pieces, (n_entries + 1) * sizeof(uint32_t)), rc, out);
    RLB_CUDA_CHECK(cudaMemcpy(cl->d_pieces, all.p, all.n * sizeof(piece_desc),
                              cudaMemcpyHostToDevice), rc, out);
    RLB_CUDA_CHECK(cudaMemcpy(cl->d_bands, bands, n_bands * sizeof(uint2),
                              cudaMemcpyHostToDevice), rc, out);
    RLB_CUDA_CHECK(cudaMemcpy(cl->d_band_pieces, entries, n_entries * sizeof(uint32_t),
                              cudaMemcpyHostToDevice), rc, out);
    cl->fused_bytes = (all.n + 1) * sizeof(piece_desc) + (n_bands + 1) * sizeof(uint2) +
                      (n_entries + 1) * sizeof(uint32_t);
    cl->fused = 1;
out:
    free(bands);
    free(entries);
    return rc;
}

/* Places every merge's packed factors (pack_kernel) in one allocation, 256-byte aligned
 * each, and points the descriptors at them (current device: cl's). */
static int build_pack(rlb_cuda_lora *cl)
{
    uint64_t at = 0;
    int rc = 0;
    for (uint32_t k = 0; k < cl->n; k++) {
        merge_desc *d = &cl->desc[k];
        d->kp = (d->rank + 15) / 16 * 16;
        d->pr_ld = d->col_tiles * kTileCols;
        const uint64_t nl = (uint64_t)(d->rows + kTileRows - 1) / kTileRows * kTileRows * d->kp;
        d->pl = (const uint16_t *)(uintptr_t)at; /* offsets until the allocation is made */
        at += (nl * 2 + 255) / 256 * 256;
        d->pr = (const uint16_t *)(uintptr_t)at;
        at += ((uint64_t)d->kp * d->pr_ld * 2 + 255) / 256 * 256;
    }
    RLB_CUDA_CHECK(cudaMalloc(&cl->d_pack, at ? at : 256), rc, out);
    cl->pack_bytes = at;
    for (uint32_t k = 0; k < cl->n; k++) {
        merge_desc *d = &cl->desc[k];
        d->pl = (const uint16_t *)((char *)cl->d_pack + (uintptr_t)d->pl);
        d->pr = (const uint16_t *)((char *)cl->d_pack + (uintptr_t)d->pr);
    }
out:
    return rc;
}

typedef void (*fused_fn)(const merge_desc *, uint32_t, uint32_t, uint64_t, uint64_t,
                         fused_args);

/* The fused kernel of dtype range k. */
static fused_fn fused_kern(const rlb_cuda_lora *cl, int k)
{
    return cl->tensor && k == RLB_DTYPE_F32    ? fused_tc_kernel<float>
           : cl->tensor && k == RLB_DTYPE_BF16 ? fused_tc_kernel<rlb__bf16_t>
           : cl->tensor                        ? fused_tc_kernel<rlb__f16_t>
           : k == RLB_DTYPE_F32                ? fused_kernel<float>
           : k == RLB_DTYPE_BF16               ? fused_kernel<rlb__bf16_t>
                                               : fused_kernel<rlb__f16_t>;
}

/* cl->per_sm, cl->sms: how many blocks of each dtype range's fused kernel `device` holds at
 * once (current device: `device`). */
static int query_occupancy(rlb_cuda_lora *cl, int device)
{
    int rc = 0;
    cl->sms = 1;
    RLB_CUDA_CHECK(cudaDeviceGetAttribute(&cl->sms, cudaDevAttrMultiProcessorCount, device), rc,
                   out);
    for (int k = 0; k < kDtypes; k++) {
        cl->per_sm[k] = 1;
        RLB_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&cl->per_sm[k],
                                                                     fused_kern(cl, k),
                                                                     kThreads, 0), rc, out);
    }
out:
    return rc;
}

/* Numbers the merges' tiles (first_tile, a prefix sum; the product merges none when skip)
 * and sizes each dtype range's fused launch as large as the GPU holds at once, or its tiles
 * where fewer. Marks the device's descriptors stale. */
static void assign_tiles(rlb_cuda_lora *cl, bool skip)
{
    uint64_t tiles = 0;
    for (uint32_t k = 0; k < cl->n; k++) {
        merge_desc *d = &cl->desc[k];
        d->first_tile = tiles;
        if (!(skip && cl->is_gemm && cl->is_gemm[k]))
            tiles += (uint64_t)(d->rows + kTileRows - 1) / kTileRows * d->col_tiles;
    }
    cl->desc[cl->n].first_tile = tiles;
    for (int k = 0; k < kDtypes; k++) {
        const uint64_t n = cl->desc[cl->range[k + 1]].first_tile -
                           cl->desc[cl->range[k]].first_tile;
        const uint64_t most = (uint64_t)(cl->per_sm[k] > 0 ? cl->per_sm[k] : 1) *
                              (cl->sms > 0 ? cl->sms : 1);
        cl->grid[k] = (unsigned)(n < most ? n : most);
    }
    cl->desc_stale = 1;
}

/* Marks the merges of cl whose base is one bf16 source read in whole rows, in at most
 * kMaxProductPieces pieces of RLB_LORA_GEMM_MIN_BYTES or more (cuBLASLt writes small
 * products well below the fused kernel's rate: on an H100, 1050 GB/s for 4 MiB of base,
 * 2030 for 16), as products (cl->is_gemm), and uploads their pieces (build_fused's `all`
 * and first_piece), their list and room for the statistics the count reads; makes the
 * cuBLASLt handle (current device: cl's). Run after build_pack. */
constexpr uint64_t kMaxProductPieces = 64;

static int build_gemm(rlb_cuda_lora *cl, const rlb_piece_list &all,
                      const uint64_t *first_piece, char *err, size_t errlen)
{
    int rc = 0;
    uint32_t *list = nullptr;
    const long long least = rlb__env_int(RLB_KNOB_LORA_GEMM_MIN_BYTES);
    cl->is_gemm = (uint8_t *)calloc(cl->n + 1, 1);
    if (!cl->is_gemm)
        return RLB_ENOMEM;
    for (uint32_t k = 0; k < cl->n; k++) {
        const rlb_merge_op *m = &cl->merges[k];
        bool ok = m->dst_dtype == RLB_DTYPE_BF16 &&
                  first_piece[k + 1] - first_piece[k] <= kMaxProductPieces;
        for (uint64_t i = first_piece[k]; ok && i < first_piece[k + 1]; i++) {
            const rlb_merge_piece &p = all.p[i];
            ok = p.src_ref != RLB_PLAN_ZERO_SRC && p.src_dtype == RLB_DTYPE_BF16 &&
                 p.j0 == 0 && p.j1 == m->cols && p.src_off % 2 == 0 && p.src_stride % 2 == 0 &&
                 (long long)((uint64_t)(p.i1 - p.i0) * m->cols * 2) >= least;
        }
        if (ok) {
            cl->is_gemm[k] = 1;
            cl->n_gemm++;
            cl->n_scan += first_piece[k + 1] - first_piece[k];
        }
    }
    if (cl->n_gemm == 0)
        return 0;
    cl->h_scan = (scan_piece *)calloc(cl->n_scan, sizeof(scan_piece));
    list = (uint32_t *)malloc(cl->n_gemm * sizeof(uint32_t));
    if (!cl->h_scan || !list) {
        rc = RLB_ENOMEM;
        goto out;
    }
    for (uint32_t k = 0, g = 0, at = 0; k < cl->n; k++) { /* their pieces */
        if (!cl->is_gemm[k])
            continue;
        list[g++] = k;
        for (uint64_t i = first_piece[k]; i < first_piece[k + 1]; i++, at++) {
            cl->h_scan[at].p = all.p[i];
            cl->h_scan[at].merge = k;
        }
    }
    RLB_CUDA_CHECK(cudaMalloc(&cl->d_scan, cl->n_scan * sizeof(scan_piece)), rc, out);
    RLB_CUDA_CHECK(cudaMalloc(&cl->d_gemm_list, cl->n_gemm * sizeof(uint32_t)), rc, out);
    RLB_CUDA_CHECK(cudaMalloc(&cl->d_stat, 3 * (uint64_t)cl->n * sizeof(uint32_t)), rc, out);
    RLB_CUDA_CHECK(cudaMemcpy(cl->d_scan, cl->h_scan, cl->n_scan * sizeof(scan_piece),
                              cudaMemcpyHostToDevice), rc, out);
    RLB_CUDA_CHECK(cudaMemcpy(cl->d_gemm_list, list, cl->n_gemm * sizeof(uint32_t),
                              cudaMemcpyHostToDevice), rc, out);
    rc = rlb__lora_gemm_create(&cl->gemm, err, errlen);
out:
    free(list);
    return rc;
}

extern "C" int rlb__cuda_lora_upload(const rlb_plan *plan, int device, const uint8_t *dst_sel,
                                     rlb_cuda_lora **out, char *err, size_t errlen)
{
    if (!plan || !out || (plan->n_merges && (!plan->merges || !plan->merge_copies)))
        return RLB_EINVAL;
    *out = nullptr;
    uint64_t n = 0;
    for (uint64_t i = 0; i < plan->n_merges; i++)
        n += !dst_sel || plan->merges[i].dst_ref >= plan->n_dst || dst_sel[plan->merges[i].dst_ref];
    if (n == 0)
        return 0;
    if (n >= UINT32_MAX)
        return RLB_ETOOBIG;
    int rc = check_stage_ops(plan, err, errlen), prev = -1;
    rlb_lora_merge_mode how;
    if (rc)
        return rc;
    rlb_piece_list pieces = {}; /* every merge's base as pieces (build_fused) */
    uint64_t *first_piece = nullptr;
    rlb_cuda_lora *cl = (rlb_cuda_lora *)calloc(1, sizeof(*cl));
    if (!cl)
        return RLB_ENOMEM;
    cl->device = device;
    cl->n = (uint32_t)n;
    cl->merges = (rlb_merge_op *)malloc(n * sizeof(*cl->merges));
    cl->index = (uint64_t *)malloc(n * sizeof(*cl->index));
    cl->desc = (merge_desc *)malloc((n + 1) * sizeof(*cl->desc));
    /* at least one f32 and 256-byte aligned, as every cudaMalloc */
    cl->stage_bytes = plan->stage_bytes > 4 ? plan->stage_bytes : 4;
    if (!cl->merges || !cl->index || !cl->desc) {
        rc = RLB_ENOMEM;
        goto err;
    }
    RLB_CHECK_GOTO(select_merges(cl, plan, dst_sel, err, errlen), rc, err);
    RLB_CHECK_GOTO(upload_plans(cl, plan, err, errlen), rc, err);
    RLB_CHECK_GOTO(rlb__cuda_enter(device, &prev), rc, err);
    RLB_CUDA_CHECK(cudaMalloc(&cl->d_stage, cl->stage_bytes), rc, out);
    RLB_CUDA_CHECK(cudaMalloc(&cl->d_desc, (n + 1) * sizeof(merge_desc)), rc, out);
    RLB_CUDA_CHECK(cudaMalloc(&cl->d_counts, n * sizeof(*cl->d_counts)), rc, out);
    RLB_CUDA_CHECK(cudaMallocHost(&cl->h_counts, n * sizeof(*cl->h_counts)), rc, out);
    if (describe_merges(cl) > INT32_MAX) { /* one block per tile */
        rlb__cuda_err(err, errlen, "plan: the merges' tiles exceed one launch");
        rc = RLB_ETOOBIG;
    }
    how = rlb__cuda_lora_merge_env();
    if (!rc && how != RLB_LORA_SEPARATE) {
        first_piece = (uint64_t *)malloc((n + 1) * sizeof(uint64_t));
        rc = first_piece ? build_fused(cl, plan, pieces, first_piece) : RLB_ENOMEM;
    }
    if (!rc && cl->fused && how >= RLB_LORA_FUSED_TC) {
        cl->tensor = 1; /* the stage holds bf16 values exactly when every factor was bf16 */
        for (uint64_t i = 0; i < plan->n_stage_ops; i++)
            cl->tensor &= plan->stage_ops[i].src_dtype == RLB_DTYPE_BF16;
        if (cl->tensor)
            rc = build_pack(cl);
        if (!rc && cl->tensor && how == RLB_LORA_GEMM)
            rc = build_gemm(cl, pieces, first_piece, err, errlen);
    }
    if (!rc && cl->fused)
        rc = query_occupancy(cl, device);
    if (!rc && cl->fused)
        assign_tiles(cl, false);
out:
    rlb__cuda_leave(prev);
    rlb__piece_list_free(&pieces);
    free(first_piece);
    if (rc)
        goto err;
    *out = cl;
    return 0;
err:
    rlb__cuda_lora_free(cl);
    return rc;
}

/* The products of the bound buffers, one per piece of each product merge (current device:
 * cl's); the base is scanned again at the next run. */
static int set_products(rlb_cuda_lora *cl, const rlb_cuda_buf *src, char *err, size_t errlen)
{
    rlb_lora_product *p = (rlb_lora_product *)calloc(cl->n_scan + 1, sizeof(*p));
    if (!p)
        return RLB_ENOMEM;
    for (uint64_t i = 0; i < cl->n_scan; i++) {
        const piece_desc &q = cl->h_scan[i].p;
        const merge_desc &d = cl->desc[cl->h_scan[i].merge];
        p[i].l = d.pl + (uint64_t)q.i0 * d.kp;
        p[i].r = d.pr + q.j0;
        p[i].c = (const char *)src[q.src_ref].ptr + q.src_off;
        p[i].d = d.c + ((uint64_t)q.i0 * d.cols + q.j0) * 2;
        p[i].rows = q.i1 - q.i0;
        p[i].cols = q.j1 - q.j0;
        p[i].kp = d.kp;
        p[i].ldr = d.pr_ld;
        p[i].ldc = q.src_stride / 2;
        p[i].ldd = d.cols;
        p[i].scale = d.scale;
    }
    int rc = rlb__lora_gemm_set(cl->gemm, p, cl->n_scan, err, errlen);
    free(p);
    cl->scan_due = 1;
    return rc;
}

extern "C" int rlb__cuda_lora_bind(rlb_cuda_lora *cl, const rlb_cuda_buf *src,
                                   const rlb_cuda_buf *dst, char *err, size_t errlen)
{
    if (!cl || !dst)
        return RLB_EINVAL;
    cl->bound = 0;
    rlb_cuda_buf stage = {cl->d_stage, cl->stage_bytes};
    int rc = rlb__cuda_plan_bind(cl->base, src, dst, err, errlen), prev;
    if (!rc)
        rc = rlb__cuda_plan_bind(cl->gather, src, &stage, err, errlen);
    if (rc)
        return rc;
    for (uint32_t k = 0; k < cl->n; k++) {
        const rlb_merge_op *m = &cl->merges[k];
        const rlb_cuda_buf *b = &dst[m->dst_ref];
        const uint64_t des = rlb_dtype_size((rlb_dtype)m->dst_dtype);
        if (!b->ptr || b->bytes < m->dst_offset + m->rows * m->cols * des ||
            ((uintptr_t)b->ptr + m->dst_offset) % des) {
            rlb__cuda_err(err, errlen, "destination %u: buffer %p of %llu bytes cannot hold "
                          "merge %llu", m->dst_ref, b->ptr, (unsigned long long)b->bytes,
                          (unsigned long long)cl->index[k]);
            return RLB_EINVAL;
        }
    }
    for (uint32_t k = 0; k < cl->n; k++) {
        char *c = (char *)dst[cl->merges[k].dst_ref].ptr + cl->merges[k].dst_offset;
        cl->desc_stale |= cl->desc[k].c != c;
        cl->desc[k].c = c;
    }
    /* The products read their base where the fused kernel would: not from a staged source */
    const int gemm_now = cl->n_gemm && !rlb__cuda_plan_staging(cl->base);
    if (gemm_now != cl->gemm_now) { /* product merges exist only where fused ones do */
        cl->gemm_now = gemm_now;
        assign_tiles(cl, gemm_now);
    }
    RLB_CHECK(rlb__cuda_enter(cl->device, &prev));
    if (cl->desc_stale) {
        RLB_CUDA_CHECK(cudaMemcpy(cl->d_desc, cl->desc, (cl->n + 1) * sizeof(merge_desc),
                                  cudaMemcpyHostToDevice), rc, out);
        cl->desc_stale = 0;
    }
    if (cl->gemm_now)
        rc = set_products(cl, src, err, errlen);
out:
    rlb__cuda_leave(prev);
    cl->bound = rc == 0;
    return rc;
}

/* The merges of dtype range k on `stream` (current device: the merges'), fused or in place
 * after their base copies. */
static int launch_range(const rlb_cuda_lora *cl, int k, bool fused, cudaStream_t stream)
{
    const uint32_t first = cl->range[k], last = cl->range[k + 1];
    int rc = 0;
    if (first == last)
        return 0;
    const uint64_t tile0 = cl->desc[first].first_tile, tile1 = cl->desc[last].first_tile;
    const unsigned blocks = (unsigned)(tile1 - tile0);
    if (blocks == 0) /* every merge of the range a product */
        return 0;
    if (fused) {
        /* the sources' addresses: those the base plan's bind checked and tabled */
        const fused_args a = {cl->d_pieces, cl->d_bands, cl->d_band_pieces,
                              rlb__cuda_plan_bound_ptrs(cl->base), cl->d_counts};
        fused_kern(cl, k)<<<cl->grid[k], kThreads, 0, stream>>>(cl->d_desc, first, last, tile0,
                                                                tile1, a);
        RLB_CUDA_CHECK(cudaGetLastError(), rc, out);
        return 0;
    }
    switch (k) {
    case RLB_DTYPE_F32:
        merge_kernel<float><<<blocks, kThreads, 0, stream>>>(cl->d_desc, first, last, tile0,
                                                             cl->d_counts);
        break;
    case RLB_DTYPE_BF16:
        merge_kernel<rlb__bf16_t><<<blocks, kThreads, 0, stream>>>(cl->d_desc, first, last,
                                                                   tile0, cl->d_counts);
        break;
    default:
        merge_kernel<rlb__f16_t><<<blocks, kThreads, 0, stream>>>(cl->d_desc, first, last,
                                                                  tile0, cl->d_counts);
        break;
    }
    RLB_CUDA_CHECK(cudaGetLastError(), rc, out);
out:
    return rc;
}

extern "C" int rlb__cuda_lora_run(rlb_cuda_lora *cl, cudaStream_t stream)
{
    if (!cl || !cl->bound)
        return RLB_EINVAL;
    /* A base staged from a GPU without a peer path has no address the kernel may read. */
    const bool fused = cl->fused && !rlb__cuda_plan_staging(cl->base);
    int rc = fused ? 0 : rlb__cuda_plan_run(cl->base, stream), prev;
    if (!rc)
        rc = rlb__cuda_plan_run(cl->gather, stream);
    if (rc)
        return rc;
    RLB_CHECK(rlb__cuda_enter(cl->device, &prev));
    RLB_CUDA_CHECK(cudaMemsetAsync(cl->d_counts, 0, cl->n * sizeof(*cl->d_counts), stream), rc,
                   out);
    if (fused && cl->gemm_now)
        RLB_CUDA_CHECK(cudaMemsetAsync(cl->d_stat, 0, 2 * (uint64_t)cl->n * sizeof(uint32_t),
                                       stream), rc, out);
    if (fused && cl->tensor) {
        pack_kernel<<<dim3(cl->n, 8), kThreads, 0, stream>>>(cl->d_desc,
                                                              cl->gemm_now ? cl->d_stat : nullptr);
        RLB_CUDA_CHECK(cudaGetLastError(), rc, out);
    }
    if (fused && cl->gemm_now && cl->scan_due) {
        uint32_t *bmax = cl->d_stat + 2 * (uint64_t)cl->n;
        RLB_CUDA_CHECK(cudaMemsetAsync(bmax, 0, cl->n * sizeof(uint32_t), stream), rc, out);
        scan_kernel<<<dim3((unsigned)cl->n_scan, 32), kThreads, 0, stream>>>(
            cl->d_scan, rlb__cuda_plan_bound_ptrs(cl->base), bmax);
        RLB_CUDA_CHECK(cudaGetLastError(), rc, out);
        cl->scan_due = 0;
    }
    for (int k = 0; k < kDtypes && !rc; k++)
        rc = launch_range(cl, k, fused, stream);
    if (!rc && fused && cl->gemm_now) {
        rc = rlb__lora_gemm_run(cl->gemm, stream);
        if (!rc) {
            count_kernel<<<dim3(cl->n_gemm, 16), kThreads, 0, stream>>>(
                cl->d_desc, cl->d_gemm_list, cl->d_stat, cl->d_stat + 2 * (uint64_t)cl->n,
                cl->d_counts);
            RLB_CUDA_CHECK(cudaGetLastError(), rc, out);
        }
    }
    if (!rc)
        RLB_CUDA_CHECK(cudaMemcpyAsync(cl->h_counts, cl->d_counts,
                                       cl->n * sizeof(*cl->h_counts), cudaMemcpyDeviceToHost,
                                       stream), rc, out);
out:
    rlb__cuda_leave(prev);
    return rc;
}

extern "C" void rlb__cuda_lora_counts(const rlb_cuda_lora *cl, uint64_t *nonfinite)
{
    for (uint32_t k = 0; cl && k < cl->n; k++)
        nonfinite[cl->index[k]] += cl->h_counts[k];
}

extern "C" uint64_t rlb__cuda_lora_merges(const rlb_cuda_lora *cl)
{
    return cl ? cl->n : 0;
}

extern "C" uint64_t rlb__cuda_lora_device_bytes(const rlb_cuda_lora *cl)
{
    if (!cl)
        return 0;
    return rlb__cuda_plan_device_bytes(cl->base) + rlb__cuda_plan_device_bytes(cl->gather) +
           cl->stage_bytes + (cl->n + 1) * sizeof(merge_desc) + cl->n * sizeof(*cl->d_counts) +
           cl->fused_bytes + cl->pack_bytes + cl->n_scan * sizeof(scan_piece) +
           (cl->n_gemm + 3 * (uint64_t)cl->n) * sizeof(uint32_t) +
           rlb__lora_gemm_device_bytes(cl->gemm);
}

extern "C" rlb_lora_merge_mode rlb__cuda_lora_mode(const rlb_cuda_lora *cl)
{
    if (!cl || !cl->fused || (cl->bound && rlb__cuda_plan_staging(cl->base)))
        return RLB_LORA_SEPARATE;
    if (cl->n_gemm && (!cl->bound || cl->gemm_now))
        return RLB_LORA_GEMM;
    return cl->tensor ? RLB_LORA_FUSED_TC : RLB_LORA_FUSED_FMA;
}

extern "C" uint64_t rlb__cuda_lora_products(const rlb_cuda_lora *cl)
{
    return cl && rlb__cuda_lora_mode(cl) == RLB_LORA_GEMM ? cl->n_gemm : 0;
}
