/* rope.cuh: the rotation and the cache addressing that the kernels which rotate q and k and
 * store the step's keys and values share (engine_ops.cu's rope_store_kernel and the
 * attention kernels' fused form, gemv.cu's fused qkv epilogue), so that every one of them
 * gives the same bits.
 */
#ifndef RLB_KERNELS_CUDA_ROPE_CUH
#define RLB_KERNELS_CUDA_ROPE_CUH

#include <stdint.h>

#include "kernels/cuda/engine_ops.h"

/* Element offset of (block blk, layer, kv head, slot in block) in a paged cache of c's
 * layout ([n_blocks][n_layers][kvt][block_tokens][hd]). */
__device__ __forceinline__ int64_t rlb__cache_off(const rlb_eo_cache &c, int64_t layer,
                                                  int32_t blk, int64_t head,
                                                  int64_t slot_in_block)
{
    return (((int64_t)blk * c.n_layers + layer) * c.kvt + head) * c.block_tokens * c.hd +
           slot_in_block * c.hd;
}

/* The rotation of the pair (x1, x2) = (x[j], x[j + hd / 2]) at position pos: x * cos +
 * rotate_half(x) * sin with the angle float(inv_freq[j] * pos) (sincosf: cosf's and sinf's
 * values, one range reduction), each product and sum rounded on its own as in
 * rlb__rope_apply (no contraction to fma). */
__device__ __forceinline__ void rlb__rope_pair(const float *inv_freq, int64_t j, int32_t pos,
                                               float &x1, float &x2)
{
    float cs, sn;
    sincosf(inv_freq[j] * (float)pos, &sn, &cs);
    const float y1 = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(-x2, sn));
    const float y2 = __fadd_rn(__fmul_rn(x2, cs), __fmul_rn(x1, sn));
    x1 = y1;
    x2 = y2;
}

#endif /* RLB_KERNELS_CUDA_ROPE_CUH */
