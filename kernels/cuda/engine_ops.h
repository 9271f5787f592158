/* engine_ops.h: the kernels of the CUDA engine backend (worker/backend_cuda.c), each the GPU
 * twin of a CPU operation of kernels/cpu/ops.h or kernels/cpu/sample.h:
 *
 *   embed        x[r] = table[tokens[r] - vocab0] (float32), zero for ids outside this
 *                rank's [vocab0, vocab0 + v_local) slice (vocabulary-parallel embedding)
 *   rmsnorm      y[r] = w * (x[src_r] * rsqrt(mean(x[src_r]^2) + eps)), float32 math (HF
 *                LlamaRMSNorm with a float32 input), y in float32 / bf16 / fp16; src_r is
 *                r or rows_index[r] (the gather of the rows whose logits are wanted)
 *   add_rmsnorm  x += a, then y = rmsnorm(x): the residual add fused with the next norm
 *   add, bias_add, swiglu (silu(gate) * up, out in the compute dtype), convert
 *   rope_store   rotate-half RoPE of the q and k heads of each qkv row in place (angle =
 *                float(inv_freq[i] * pos), cosf / sinf), then k and v of each row into its
 *                slot of the paged cache (rows with slot < 0 store nothing: padding rows)
 *   attention    causal softmax(q k^T * scale) v of each span's query rows over the keys of
 *                its block table, GQA / MQA (q head h reads kv head h / grp); a query at
 *                position p sees keys 0..p (p < 0: none, output 0). The keys of a query
 *                tile are split over `splits` blocks (flash-decoding) and combined by a
 *                second kernel when splits > 1. In a decode step it can also do
 *                rope_store's work for the step (inv_freq set), one kernel instead of two.
 *   cut_logits   the TP all-gather's [T][out][vl] into [out, V]
 *   sample       sample.h's greedy / temperature / top-k / top-p Gumbel-max with the same
 *                noise (kernels/cpu/noise.h) and the full-vocabulary fp32 logprob
 *   matmul_wq    y[n, m] = (x[n, k] . q[m, k]^T) * scale: weight-only int8 / fp8 e4m3 (one
 *                scale per row, or one for the tensor) with float32 accumulation
 *
 * The paged cache (worker/kvcache.h): k and v are each [n_blocks][n_layers][kvt]
 * [block_tokens][hd] in the compute dtype; slot = block * block_tokens + offset.
 *
 * All run asynchronously on `stream` and are graph-capturable (no allocation, no
 * synchronization); they return 0, RLB_EINVAL, RLB_EDTYPE, RLB_EUNSUPPORTED (a head_dim
 * without a kernel, logged by name) or RLB_ECUDA (a failed launch). Check:
 * tests/gpu/test_cuda_engine_ops.c runs each against the CPU op on fresh random inputs.
 */
#ifndef RLB_KERNELS_CUDA_ENGINE_OPS_H
#define RLB_KERNELS_CUDA_ENGINE_OPS_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "rlb/rlb.h"

#ifdef __cplusplus
extern "C" {
#endif

#define RLB_EO_QTILE 16     /* query vectors (token, head) one attention block holds */
#define RLB_EO_KTILE 32     /* keys per attention tile */
#define RLB_EO_MAX_SPLITS 32 /* largest split count of the keys of one query tile */

/* 1 when the attention kernels cover head dimension hd (16, 24, 64, 128). */
int rlb__eo_head_dim_supported(int64_t hd);

/* Programmatic dependent launch of the engine's kernels (pdl.cuh): on by default; the
 * backend sets it from RLB_CUDA_PDL when it starts. Process-wide. */
int rlb__eo_pdl(void);
void rlb__eo_set_pdl(int on);

int rlb__eo_embed(cudaStream_t stream, const void *table, rlb_dtype dt, int64_t vocab0,
                  int64_t v_local, int64_t D, const int32_t *tokens, int64_t rows, float *x);

/* y[r] = rmsnorm(x[rows_index ? rows_index[r] : r]) * w. y may equal x (float32 y only, no
 * rows_index). */
int rlb__eo_rmsnorm(cudaStream_t stream, const float *x, const int32_t *rows_index,
                    const void *w, rlb_dtype wdt, int64_t rows, int64_t D, float eps, void *y,
                    rlb_dtype ydt);
/* x += a; y = rmsnorm(x) * w. */
int rlb__eo_add_rmsnorm(cudaStream_t stream, float *x, const float *a, const void *w,
                        rlb_dtype wdt, int64_t rows, int64_t D, float eps, void *y,
                        rlb_dtype ydt);
/* x[i] += a[i], n floats. */
int rlb__eo_add(cudaStream_t stream, float *x, const float *a, int64_t n);
/* y[r, c] += bias[c]. */
int rlb__eo_bias_add(cudaStream_t stream, float *y, const void *bias, rlb_dtype dt,
                     int64_t rows, int64_t cols);
/* out[r, i] = silu(gu[r, i]) * gu[r, inter + i], out in odt. */
int rlb__eo_swiglu(cudaStream_t stream, const float *gu, int64_t rows, int64_t inter,
                   void *out, rlb_dtype odt);
/* dst[i] = src[i] converted (float32 / bf16 / fp16 either way, round to nearest even). */
int rlb__eo_convert(cudaStream_t stream, const void *src, rlb_dtype sdt, void *dst,
                    rlb_dtype ddt, int64_t n);

/* The paged cache of one rank. */
typedef struct rlb_eo_cache {
    void *k, *v;          /* [n_blocks][n_layers][kvt][block_tokens][hd] */
    rlb_dtype dt;         /* element type (the compute dtype) */
    int64_t n_layers;     /* layers */
    int64_t kvt;          /* kv heads of this rank */
    int64_t hd;           /* head dim */
    int64_t block_tokens; /* slots per block */
} rlb_eo_cache;

/* qkv rows: [hq * hd q | kvt * hd k | kvt * hd v] float32. */
int rlb__eo_rope_store(cudaStream_t stream, float *qkv, int64_t rows, int64_t hq,
                       const int32_t *pos, const float *inv_freq, const int64_t *slot,
                       const rlb_eo_cache *c, int64_t layer);

/* One step's attention work (device arrays, except the counts). */
typedef struct rlb_eo_attn {
    const float *qkv;         /* [rows, (hq + 2 kvt) hd] after rope_store (see inv_freq) */
    const int32_t *pos;       /* [rows] position of each row (< 0: sees no key) */
    int64_t rows;             /* rows of qkv */
    int64_t hq;               /* q heads */
    int64_t n_spans;          /* spans */
    const int32_t *span_row0; /* [n_spans] first row of each span */
    const int32_t *span_n;    /* [n_spans] rows of each span (positions increasing) */
    const int32_t *span_qb0;  /* [n_spans + 1] prefix sums of rlb__eo_attn_qblocks */
    int64_t qblocks;          /* span_qb0[n_spans] or more (extra blocks exit) */
    const int32_t *block_tables; /* [n_spans][bt_stride] block ids */
    int64_t bt_stride;        /* entries per span in block_tables */
    const int32_t *bt_stride_dev; /* not NULL: the stride is read here instead (a captured
                                   * graph replays with each step's own stride) */
    float scale;              /* hd^-1/2 */
    int64_t splits;           /* key splits, 1..RLB_EO_MAX_SPLITS */
    float *partial;           /* splits > 1: [splits][rows * hq][hd + 2] workspace */
    const float *inv_freq;    /* not NULL: RoPE and the cache store fused (a decode step: every
                               * span one row). qkv is then as before rope_store, [hd / 2] */
    const int64_t *slot;      /* with inv_freq: [rows] each row's cache slot (-1: none) */
    void *out;                /* [rows, hq * hd] in out_dt */
    rlb_dtype out_dt;
    int one_row;              /* every span is one row (a decode step): a bf16 cache of head_dim
                               * 64 or 128 with at most 16 q heads per kv head goes to the
                               * tensor-core decode kernel (other bits than the classic one) */
} rlb_eo_attn;

/* Query tiles (blocks) of a span of n rows with grp q heads per kv head. */
int64_t rlb__eo_attn_qblocks(int64_t n, int64_t grp);
/* A split count: enough blocks for the device's `sms` multiprocessors over `base_blocks`
 * (qblocks * kvt), no more splits than tiles of max_kv keys (max_kv <= 0: unknown, as in a
 * captured decode graph), at most RLB_EO_MAX_SPLITS, and splits * rows * hq vectors within
 * `ws_vectors` (the workspace). */
int64_t rlb__eo_attn_splits(int64_t base_blocks, int64_t max_kv, int sms, int64_t rows,
                            int64_t hq, int64_t ws_vectors);
int rlb__eo_attention(cudaStream_t stream, const rlb_eo_attn *a, const rlb_eo_cache *c,
                      int64_t layer);

/* logits[o, j] = gath[(j / vl) * out * vl + o * vl + j % vl] for j < V. */
int rlb__eo_cut_logits(cudaStream_t stream, const float *gath, int64_t T, int64_t out,
                       int64_t vl, int64_t V, float *logits);

/* One row to sample on the device. */
typedef struct rlb_eo_sample_job {
    int64_t row;        /* logits row */
    float temperature;  /* <= RLB_SAMPLE_GREEDY_EPS: greedy */
    int32_t top_k;      /* <= 0 or >= V: no top-k */
    uint64_t seed;      /* noise key */
    uint64_t sample;
    int64_t pos;
    float top_p;        /* (0, 1]; 1: no top-p */
    int32_t pad_;       /* zero */
} rlb_eo_sample_job;

/* For each job: tokens[j], logprobs[j]; status[j] = 0, or RLB_EINVAL for a row whose
 * logits are not all finite (the caller samples it with rlb__sample_token, whose rules for
 * NaN and infinities the kernel does not repeat). jobs, work, tokens, logprobs and status
 * are device arrays; work holds rlb__eo_sample_work_bytes(n). */
int rlb__eo_sample(cudaStream_t stream, const float *logits, int64_t V,
                   const rlb_eo_sample_job *jobs, int64_t n, void *work, int32_t *tokens,
                   float *logprobs, int32_t *status);
/* Bytes of device workspace rlb__eo_sample needs for n jobs (n <= 65535). */
uint64_t rlb__eo_sample_work_bytes(int64_t n);

/* y[n, m] (+)= (x[n, k] . q[m, k]^T) * scale, x in xdt, q int8 (RLB_DTYPE_I8) or e4m3
 * (RLB_DTYPE_F8E4M3), scale [m] (per_row) or [1]; k a multiple of 16. */
int rlb__eo_matmul_wq(cudaStream_t stream, const void *x, rlb_dtype xdt, int64_t n, int64_t k,
                      const void *q, rlb_dtype qdt, const float *scale, int per_row, int64_t m,
                      float *y);

#ifdef __cplusplus
}
#endif
#endif /* RLB_KERNELS_CUDA_ENGINE_OPS_H */
