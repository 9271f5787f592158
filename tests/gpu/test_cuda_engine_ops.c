/* test_cuda_engine_ops: every kernel of kernels/cuda/engine_ops.h against its CPU twin
 * (kernels/cpu/ops.h, kernels/cpu/sample.h) on fresh random inputs (the seed is printed;
 * RLB_TEST_SEED=n repeats a run), compared with |gpu - ref| <= tol + |ref| * eps:
 *   - embed (vocabulary slice, foreign ids zero), convert, cut_logits, bias_add: exact;
 *   - rmsnorm with every weight and output dtype, the gathered-rows form, and the fused
 *     residual add; swiglu;
 *   - rope_store: rotated q and k against rlb__rope_apply, and the cache slots written
 *     (padding rows with slot -1 write nothing);
 *   - paged attention for GQA, MQA and MHA, head_dim 16 / 24 / 64 / 128, f32 and bf16 caches,
 *     random block tables (shuffled block ids, 5- and 16-token blocks), several spans in a
 *     batch, with 1, a few and the largest number of key splits; chunked prefill (three
 *     spans sharing a table) against one-shot prefill; a long-context decode (4000 keys)
 *     with split-KV against one split and against the CPU; a padding row (position -1)
 *     gets zeros;
 *   - sampling: the same token as rlb__sample_token for random logits, seeds,
 *     temperatures (greedy included, with ties on the maximum), top-k (1..V+1) and top-p
 *     (0.05 .. 1), rows of few distinct values (ties at both cuts) and vocabulary sizes up
 *     to 128256, the logprob within 1e-5; a row with a NaN is refused;
 *   - the weight-only int8 / fp8 matmul against a double-precision dequantized product;
 *   - the decode GEMV (kernels/cuda/gemv.h), every dtype, 1..8 rows, odd k, the 1B / 8B
 *     layer shapes and a vocabulary-sized head, plain and with the fused rmsnorm and
 *     residual add, against a double-precision reference (each output within 1e-5 of the
 *     sum of its terms' magnitudes), and each row alone bitwise equal to the batch.
 * Exits 77 where no GPU is visible. Prints the time and achieved bandwidth of a decode
 * attention over a long context.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "kernels/cpu/convert.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant_scalar.h"
#include "kernels/cpu/sample.h"
#include "kernels/cuda/engine_ops.h"
#include "kernels/cuda/gemv.h"
#include "tests/gpu/gpu_case.h"

static uint64_t g_seed;
static cudaStream_t g_stream;

static float frand(uint64_t *s, float lo, float hi)
{
    return lo + (hi - lo) * (float)((double)(gc_rng(s) >> 11) * 0x1.0p-53);
}

static size_t esz(rlb_dtype dt)
{
    return rlb_dtype_size(dt);
}

/* Element i of a host buffer of dt as float, and a float stored (rounded) into it. */
static float getv(const void *buf, rlb_dtype dt, int64_t i)
{
    if (dt == RLB_DTYPE_F32)
        return ((const float *)buf)[i];
    uint16_t h = ((const uint16_t *)buf)[i];
    return dt == RLB_DTYPE_BF16 ? rlb__bf16_to_f32(h) : rlb__f16_to_f32(h);
}

static void putv(void *buf, rlb_dtype dt, int64_t i, float v)
{
    if (dt == RLB_DTYPE_F32)
        ((float *)buf)[i] = v;
    else
        ((uint16_t *)buf)[i] = dt == RLB_DTYPE_BF16 ? rlb__f32_to_bf16(v) : rlb__f32_to_f16(v);
}

static float roundv(rlb_dtype dt, float v)
{
    uint16_t h[2];
    putv(h, dt, 0, v);
    return dt == RLB_DTYPE_F32 ? v : getv(h, dt, 0);
}

static void *dput(const void *h, size_t n)
{
    void *d = NULL;
    CHECK_CUDA(cudaMalloc(&d, n ? n : 16));
    if (n && h) /* h NULL: an output buffer, nothing to copy */
        CHECK_CUDA(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
    return d;
}

static void dget(void *h, const void *d, size_t n)
{
    CHECK_CUDA(cudaStreamSynchronize(g_stream));
    CHECK_CUDA(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost));
}

/* Counts |got - ref| > tol + |ref| * eps, printing the first few; asserts none. */
static void expect_close(const char *what, const float *got, const float *ref, int64_t n,
                         double tol, double eps)
{
    int64_t bad = 0;
    double worst = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]);
        double lim = tol + fabs((double)ref[i]) * eps;
        if (d / lim > worst)
            worst = d / lim;
        if (!(d <= lim)) {
            if (bad < 5)
                fprintf(stderr, "%s[%lld]: gpu %.9g ref %.9g\n", what, (long long)i,
                        (double)got[i], (double)ref[i]);
            bad++;
        }
    }
    if (bad)
        fprintf(stderr, "%s: %lld of %lld outside tolerance (seed %llu)\n", what,
                (long long)bad, (long long)n, (unsigned long long)g_seed);
    assert_int_equal(bad, 0);
}

static const rlb_dtype kFloat3[3] = {RLB_DTYPE_F32, RLB_DTYPE_BF16, RLB_DTYPE_F16};

/* Output tolerance (relative) for a value rounded to dt on both sides: one ulp of dt. */
static double ulp_eps(rlb_dtype dt)
{
    return dt == RLB_DTYPE_F32 ? 2e-6 : dt == RLB_DTYPE_BF16 ? 1.0 / 128 : 1.0 / 1024;
}

/* ---- Elementwise ---------------------------------------------------------------------- */

static void test_embed_convert_cut(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 1;
    const int64_t D = 72, vl = 50, rows = 40, vocab0 = 50;
    for (int t = 0; t < 3; t++) {
        rlb_dtype dt = kFloat3[t];
        uint8_t *table = malloc((size_t)(vl * D) * esz(dt));
        for (int64_t i = 0; i < vl * D; i++)
            putv(table, dt, i, frand(&s, -2, 2));
        int32_t tok[40];
        for (int64_t r = 0; r < rows; r++)
            tok[r] = (int32_t)gc_rnd(&s, 0, 149);
        void *dtab = dput(table, (size_t)(vl * D) * esz(dt));
        int32_t *dtok = dput(tok, sizeof tok);
        float *dx = dput(NULL, (size_t)(rows * D) * 4), *x = malloc((size_t)(rows * D) * 4);
        float *ref = malloc((size_t)(rows * D) * 4);
        assert_int_equal(rlb__eo_embed(g_stream, dtab, dt, vocab0, vl, D, dtok, rows, dx), 0);
        dget(x, dx, (size_t)(rows * D) * 4);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t d = 0; d < D; d++) {
                int64_t l = tok[r] - vocab0;
                ref[r * D + d] = l >= 0 && l < vl ? getv(table, dt, l * D + d) : 0.0f;
            }
        expect_close("embed", x, ref, rows * D, 0, 0);

        /* convert dt -> every dtype and back to float */
        for (int u = 0; u < 3; u++) {
            rlb_dtype ot = kFloat3[u];
            void *dout = dput(NULL, (size_t)(vl * D) * esz(ot));
            uint8_t *out = malloc((size_t)(vl * D) * esz(ot));
            float *got = malloc((size_t)(vl * D) * 4), *want = malloc((size_t)(vl * D) * 4);
            assert_int_equal(rlb__eo_convert(g_stream, dtab, dt, dout, ot, vl * D), 0);
            dget(out, dout, (size_t)(vl * D) * esz(ot));
            for (int64_t i = 0; i < vl * D; i++) {
                got[i] = getv(out, ot, i);
                want[i] = roundv(ot, getv(table, dt, i));
            }
            expect_close("convert", got, want, vl * D, 0, 0);
            free(out);
            free(got);
            free(want);
            cudaFree(dout);
        }
        free(table);
        free(x);
        free(ref);
        cudaFree(dtab);
        cudaFree(dtok);
        cudaFree(dx);
    }
    /* cut: T = 3 slices of vl = 8, V = 20 */
    const int64_t T = 3, out = 5, v8 = 8, V = 20;
    float gath[3 * 5 * 8], ref[5 * 20], got[5 * 20];
    for (int i = 0; i < 3 * 5 * 8; i++)
        gath[i] = (float)i;
    for (int64_t o = 0; o < out; o++)
        for (int64_t j = 0; j < V; j++)
            ref[o * V + j] = gath[(j / v8) * out * v8 + o * v8 + j % v8];
    float *dg = dput(gath, sizeof gath), *dl = dput(NULL, sizeof got);
    assert_int_equal(rlb__eo_cut_logits(g_stream, dg, T, out, v8, V, dl), 0);
    dget(got, dl, sizeof got);
    expect_close("cut_logits", got, ref, out * V, 0, 0);
    assert_int_equal(rlb__eo_cut_logits(g_stream, dg, 2, out, v8, V, dl), RLB_EINVAL);
    cudaFree(dg);
    cudaFree(dl);
}

static void test_norm_swiglu_bias(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 2;
    const int64_t rows = 9, D = 1000, inter = 300;
    const float eps = 1e-5f;
    float *x = malloc((size_t)(rows * D) * 4), *a = malloc((size_t)(rows * D) * 4);
    float *xs = malloc((size_t)(rows * D) * 4), *wf = malloc((size_t)D * 4);
    float *ref = malloc((size_t)(rows * D) * 4), *got = malloc((size_t)(rows * D) * 4);
    uint8_t *w = malloc((size_t)D * 4), *y = malloc((size_t)(rows * D) * 4);
    for (int64_t i = 0; i < rows * D; i++) {
        x[i] = frand(&s, -3, 3) * (float)(1 + i / D);
        a[i] = frand(&s, -1, 1);
    }
    int32_t idx[4] = {8, 0, 3, 3};
    for (int wt = 0; wt < 3; wt++)
        for (int yt = 0; yt < 3; yt++) {
            rlb_dtype wdt = kFloat3[wt], ydt = kFloat3[yt];
            for (int64_t d = 0; d < D; d++) {
                putv(w, wdt, d, frand(&s, 0.5f, 1.5f));
                wf[d] = getv(w, wdt, d);
            }
            void *dw = dput(w, (size_t)D * esz(wdt));
            float *dx = dput(x, (size_t)(rows * D) * 4), *da = dput(a, (size_t)(rows * D) * 4);
            void *dy = dput(NULL, (size_t)(rows * D) * esz(ydt));
            int32_t *didx = dput(idx, sizeof idx);

            assert_int_equal(rlb__eo_rmsnorm(g_stream, dx, NULL, dw, wdt, rows, D, eps, dy, ydt), 0);
            dget(y, dy, (size_t)(rows * D) * esz(ydt));
            rlb__rmsnorm(x, wf, rows, D, eps, ref);
            for (int64_t i = 0; i < rows * D; i++) {
                got[i] = getv(y, ydt, i);
                ref[i] = roundv(ydt, ref[i]);
            }
            expect_close("rmsnorm", got, ref, rows * D, 1e-6, ulp_eps(ydt) + 2e-6);

            assert_int_equal(rlb__eo_rmsnorm(g_stream, dx, didx, dw, wdt, 4, D, eps, dy, ydt), 0);
            dget(y, dy, (size_t)(4 * D) * esz(ydt));
            for (int r = 0; r < 4; r++) {
                rlb__rmsnorm(x + idx[r] * D, wf, 1, D, eps, ref + r * D);
                for (int64_t d = 0; d < D; d++) {
                    got[r * D + d] = getv(y, ydt, r * D + d);
                    ref[r * D + d] = roundv(ydt, ref[r * D + d]);
                }
            }
            expect_close("rmsnorm gathered", got, ref, 4 * D, 1e-6, ulp_eps(ydt) + 2e-6);

            assert_int_equal(rlb__eo_add_rmsnorm(g_stream, dx, da, dw, wdt, rows, D, eps, dy, ydt), 0);
            dget(y, dy, (size_t)(rows * D) * esz(ydt));
            dget(got, dx, (size_t)(rows * D) * 4);
            for (int64_t i = 0; i < rows * D; i++)
                xs[i] = x[i] + a[i];
            expect_close("add_rmsnorm x", got, xs, rows * D, 0, 0);
            rlb__rmsnorm(xs, wf, rows, D, eps, ref);
            for (int64_t i = 0; i < rows * D; i++) {
                got[i] = getv(y, ydt, i);
                ref[i] = roundv(ydt, ref[i]);
            }
            expect_close("add_rmsnorm y", got, ref, rows * D, 1e-6, ulp_eps(ydt) + 2e-6);

            /* bias_add with a bias of wdt over [rows, D] */
            CHECK_CUDA(cudaMemcpy(dx, x, (size_t)(rows * D) * 4, cudaMemcpyHostToDevice));
            assert_int_equal(rlb__eo_bias_add(g_stream, dx, dw, wdt, rows, D), 0);
            dget(got, dx, (size_t)(rows * D) * 4);
            for (int64_t i = 0; i < rows * D; i++)
                ref[i] = x[i] + wf[i % D];
            expect_close("bias_add", got, ref, rows * D, 0, 0);

            /* swiglu of x seen as [rows, 2 * inter] (2 * inter <= D), out in ydt */
            for (int64_t r = 0; r < rows; r++)
                memcpy(xs + r * 2 * inter, x + r * D, (size_t)(2 * inter) * 4);
            CHECK_CUDA(cudaMemcpy(dx, xs, (size_t)(rows * 2 * inter) * 4, cudaMemcpyHostToDevice));
            assert_int_equal(rlb__eo_swiglu(g_stream, dx, rows, inter, dy, ydt), 0);
            dget(y, dy, (size_t)(rows * inter) * esz(ydt));
            rlb__swiglu(xs, rows, inter, ref);
            for (int64_t i = 0; i < rows * inter; i++) {
                got[i] = getv(y, ydt, i);
                ref[i] = roundv(ydt, ref[i]);
            }
            expect_close("swiglu", got, ref, rows * inter, 1e-6, ulp_eps(ydt) + 2e-6);
            cudaFree(dw);
            cudaFree(dx);
            cudaFree(da);
            cudaFree(dy);
            cudaFree(didx);
        }
    free(x);
    free(a);
    free(xs);
    free(wf);
    free(ref);
    free(got);
    free(w);
    free(y);
}

/* ---- RoPE + store ----------------------------------------------------------------------- */

/* inv_freq of head_dim hd at theta 5e5 (malloc'd, hd / 2 floats) */
static float *test_inv_freq(int64_t hd)
{
    rlb_model_config cfg;
    rlb__config_tiny(&cfg);
    cfg.head_dim = hd;
    cfg.rope_theta = 500000.0;
    float *inv = malloc((size_t)(hd / 2) * 4);
    assert_int_equal(rlb__rope_inv_freq(&cfg, inv), 0);
    return inv;
}

/* A random cache (keys in [-2, 2], values in [-1, 1]) of celems elements of dt each, and nq
 * random qkv floats in [-2, 2]. */
static void fill_cache_qkv(uint64_t *s, rlb_dtype dt, uint8_t *kc, uint8_t *vc, int64_t celems,
                           float *qkv, int64_t nq)
{
    for (int64_t i = 0; i < celems; i++) {
        putv(kc, dt, i, frand(s, -2, 2));
        putv(vc, dt, i, frand(s, -1, 1));
    }
    for (int64_t i = 0; i < nq; i++)
        qkv[i] = frand(s, -2, 2);
}

/* The CPU's rope_store: each qkv row rotated in place (rlb__rope_apply), and its k and v
 * heads, rounded to dt, put into the caches kc / vc (elements of cdt, layout of
 * rlb_eo_cache) at the row's slot (slot < 0: none). */
static void cpu_rope_store(float *qkv, int64_t rows, int64_t hq, int64_t kvt, int64_t hd,
                           const int32_t *pos, const int64_t *slot, const float *inv,
                           int64_t bt, int64_t L, int64_t layer, rlb_dtype dt, void *kc,
                           void *vc, rlb_dtype cdt)
{
    const int64_t qkvw = (hq + 2 * kvt) * hd;
    float cs[64], sn[64];
    for (int64_t r = 0; r < rows; r++) {
        float *row = qkv + r * qkvw;
        rlb__rope_cos_sin(inv, hd / 2, pos[r], cs, sn);
        rlb__rope_apply(row, hq + kvt, hd, cs, sn);
        if (slot[r] < 0)
            continue;
        const int64_t blk = slot[r] / bt, off = slot[r] % bt;
        for (int64_t h = 0; h < kvt; h++)
            for (int64_t d = 0; d < hd; d++) {
                const int64_t o = (((blk * L + layer) * kvt + h) * bt + off) * hd + d;
                putv(kc, cdt, o, roundv(dt, row[hq * hd + h * hd + d]));
                putv(vc, cdt, o, roundv(dt, row[(hq + kvt) * hd + h * hd + d]));
            }
    }
}

static void test_rope_store(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 3;
    static const int64_t hds[4] = {16, 24, 64, 128};
    for (int hi = 0; hi < 4; hi++)
        for (int t = 0; t < 2; t++) {
            const rlb_dtype dt = t ? RLB_DTYPE_BF16 : RLB_DTYPE_F32;
            const int64_t hd = hds[hi], half = hd / 2, kvt = 2, hq = 6, rows = 23, L = 3;
            const int64_t bt = 16, nblk = 8, layer = 2, qkvw = (hq + 2 * kvt) * hd;
            float *inv = test_inv_freq(hd);
            float *qkv = malloc((size_t)(rows * qkvw) * 4), *ref = malloc((size_t)(rows * qkvw) * 4);
            int32_t pos[23];
            int64_t slot[23];
            int64_t perm[128];
            for (int64_t i = 0; i < nblk * bt; i++)
                perm[i] = i;
            for (int64_t i = nblk * bt - 1; i > 0; i--) {
                int64_t j = gc_rnd(&s, 0, i), tmp = perm[i];
                perm[i] = perm[j];
                perm[j] = tmp;
            }
            for (int64_t r = 0; r < rows; r++) {
                pos[r] = (int32_t)gc_rnd(&s, 0, 100000);
                slot[r] = r % 7 == 3 ? -1 : perm[r];
            }
            for (int64_t i = 0; i < rows * qkvw; i++)
                qkv[i] = ref[i] = frand(&s, -2, 2);
            const size_t cbytes = (size_t)(nblk * L * kvt * bt * hd) * esz(dt);
            uint8_t *kc = calloc(1, cbytes), *vc = calloc(1, cbytes);
            float *dqkv = dput(qkv, (size_t)(rows * qkvw) * 4), *dinv = dput(inv, (size_t)half * 4);
            int32_t *dpos = dput(pos, sizeof pos);
            int64_t *dslot = dput(slot, sizeof slot);
            rlb_eo_cache c = {dput(kc, cbytes), dput(vc, cbytes), dt, L, kvt, hd, bt};
            assert_int_equal(rlb__eo_rope_store(g_stream, dqkv, rows, hq, dpos, dinv, dslot, &c, layer), 0);
            float *got = malloc((size_t)(rows * qkvw) * 4);
            dget(got, dqkv, (size_t)(rows * qkvw) * 4);
            dget(kc, c.k, cbytes);
            dget(vc, c.v, cbytes);
            float *kref = malloc((size_t)(nblk * L * kvt * bt * hd) * 4);
            float *kgot = malloc((size_t)(nblk * L * kvt * bt * hd) * 4);
            float *vref = malloc((size_t)(nblk * L * kvt * bt * hd) * 4);
            float *vgot = malloc((size_t)(nblk * L * kvt * bt * hd) * 4);
            memset(kref, 0, (size_t)(nblk * L * kvt * bt * hd) * 4);
            memset(vref, 0, (size_t)(nblk * L * kvt * bt * hd) * 4);
            cpu_rope_store(ref, rows, hq, kvt, hd, pos, slot, inv, bt, L, layer, dt, kref, vref,
                           RLB_DTYPE_F32);
            for (int64_t i = 0; i < nblk * L * kvt * bt * hd; i++) {
                kgot[i] = getv(kc, dt, i);
                vgot[i] = getv(vc, dt, i);
            }
            /* positions up to 1e5: angle errors of a few float ulps of the angle */
            expect_close("rope q/k", got, ref, rows * qkvw, 2e-3, 1e-5);
            expect_close("rope cache k", kgot, kref, nblk * L * kvt * bt * hd, 2e-3,
                         ulp_eps(dt) + 1e-5);
            expect_close("rope cache v", vgot, vref, nblk * L * kvt * bt * hd, 0, 0);
            free(inv);
            free(qkv);
            free(ref);
            free(got);
            free(kc);
            free(vc);
            free(kref);
            free(kgot);
            free(vref);
            free(vgot);
            cudaFree(dqkv);
            cudaFree(dinv);
            cudaFree(dpos);
            cudaFree(dslot);
            cudaFree(c.k);
            cudaFree(c.v);
        }
}

/* ---- Attention ------------------------------------------------------------------------ */

typedef struct attn_case {
    int64_t hd, kvt, grp, bt;      /* head dim, kv heads, q heads per kv head, block tokens */
    rlb_dtype dt;                  /* cache and output dtype */
    int64_t n_spans;
    int64_t n[8], pos0[8];         /* each span's rows and first position */
    int table_of[8];               /* which span's block table each span uses (chunking) */
    int64_t splits;                /* 0: rlb__eo_attn_splits */
    int one_row;                   /* rlb_eo_attn.one_row (every n[i] must be 1) */
} attn_case;

/* Runs one case on the GPU (rows' output into got, float) and on the CPU (ref). */
static void run_attn(const attn_case *ac, uint64_t *s, float **got_out, float **ref_out,
                     int64_t *rows_out, double *ms_out)
{
    const int64_t hd = ac->hd, kvt = ac->kvt, hq = kvt * ac->grp, bt = ac->bt, L = 2, layer = 1;
    const rlb_dtype dt = ac->dt;
    int64_t rows = 0, max_ctx = 0;
    for (int64_t i = 0; i < ac->n_spans; i++) {
        rows += ac->n[i];
        if (ac->pos0[i] + ac->n[i] > max_ctx)
            max_ctx = ac->pos0[i] + ac->n[i];
    }
    int n_tables = 0;
    for (int64_t i = 0; i < ac->n_spans; i++)
        n_tables = ac->table_of[i] + 1 > n_tables ? ac->table_of[i] + 1 : n_tables;
    const int64_t stride = (max_ctx + bt - 1) / bt, nblk = stride * n_tables + 3;
    const int64_t qkvw = (hq + 2 * kvt) * hd;
    /* shuffled block ids: each span's table takes distinct blocks */
    int32_t *perm = malloc((size_t)nblk * 4), *tables = malloc((size_t)(stride * ac->n_spans) * 4);
    for (int64_t i = 0; i < nblk; i++)
        perm[i] = (int32_t)i;
    for (int64_t i = nblk - 1; i > 0; i--) {
        int64_t j = gc_rnd(s, 0, i);
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (int64_t sp = 0; sp < ac->n_spans; sp++)
        for (int64_t b = 0; b < stride; b++)
            tables[sp * stride + b] = perm[ac->table_of[sp] * stride + b];
    const int64_t celems = nblk * L * kvt * bt * hd;
    uint8_t *kc = malloc((size_t)celems * esz(dt)), *vc = malloc((size_t)celems * esz(dt));
    float *qkv = malloc((size_t)(rows * qkvw) * 4);
    fill_cache_qkv(s, dt, kc, vc, celems, qkv, rows * qkvw);
    int32_t pos[512], row0[8], sn[8], qb0[9];
    int64_t r = 0;
    qb0[0] = 0;
    for (int64_t sp = 0; sp < ac->n_spans; sp++) {
        row0[sp] = (int32_t)r;
        sn[sp] = (int32_t)ac->n[sp];
        qb0[sp + 1] = qb0[sp] + (int32_t)rlb__eo_attn_qblocks(ac->n[sp], ac->grp);
        for (int64_t i = 0; i < ac->n[sp]; i++)
            pos[r++] = (int32_t)(ac->pos0[sp] + i);
    }
    assert_true(rows <= 512);
    const float scale = (float)pow((double)hd, -0.5);
    const int64_t ws_vectors = RLB_EO_MAX_SPLITS * rows * hq;
    rlb_eo_attn a = {
        .qkv = dput(qkv, (size_t)(rows * qkvw) * 4),
        .pos = dput(pos, (size_t)rows * 4),
        .rows = rows,
        .hq = hq,
        .n_spans = ac->n_spans,
        .span_row0 = dput(row0, (size_t)ac->n_spans * 4),
        .span_n = dput(sn, (size_t)ac->n_spans * 4),
        .span_qb0 = dput(qb0, (size_t)(ac->n_spans + 1) * 4),
        .qblocks = qb0[ac->n_spans],
        .block_tables = dput(tables, (size_t)(stride * ac->n_spans) * 4),
        .bt_stride = stride,
        .scale = scale,
        .splits = ac->splits ? ac->splits
                             : rlb__eo_attn_splits(qb0[ac->n_spans] * kvt, max_ctx, 132, rows,
                                                   hq, ws_vectors),
        .partial = dput(NULL, (size_t)(ws_vectors * (hd + 2)) * 4),
        .out = dput(NULL, (size_t)(rows * hq * hd) * esz(dt)),
        .out_dt = dt,
        .one_row = ac->one_row,
    };
    rlb_eo_cache c = {dput(kc, (size_t)celems * esz(dt)), dput(vc, (size_t)celems * esz(dt)),
                      dt, L, kvt, hd, bt};
    const size_t obytes = (size_t)(rows * hq * hd) * esz(dt);
    assert_int_equal(rlb__eo_attention(g_stream, &a, &c, layer), 0);
    uint8_t *out = malloc(obytes), *again = malloc(obytes);
    dget(out, a.out, obytes);
    /* a second launch over a poisoned output gives the same bits */
    CHECK_CUDA(cudaMemsetAsync(a.out, 0xff, obytes, g_stream));
    assert_int_equal(rlb__eo_attention(g_stream, &a, &c, layer), 0);
    dget(again, a.out, obytes);
    assert_memory_equal(again, out, obytes);
    free(again);
    if (ms_out) { /* time 20 runs */
        cudaEvent_t e0, e1;
        CHECK_CUDA(cudaEventCreate(&e0));
        CHECK_CUDA(cudaEventCreate(&e1));
        CHECK_CUDA(cudaEventRecord(e0, g_stream));
        for (int i = 0; i < 20; i++)
            assert_int_equal(rlb__eo_attention(g_stream, &a, &c, layer), 0);
        CHECK_CUDA(cudaEventRecord(e1, g_stream));
        CHECK_CUDA(cudaEventSynchronize(e1));
        float ms;
        CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        *ms_out = ms / 20.0;
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
    }
    float *got = malloc((size_t)(rows * hq * hd) * 4), *ref = malloc((size_t)(rows * hq * hd) * 4);
    for (int64_t i = 0; i < rows * hq * hd; i++)
        got[i] = getv(out, dt, i);
    /* CPU: per span and kv head, gather keys / values of positions 0..ctx-1 in float */
    float *kb = malloc((size_t)(max_ctx * hd) * 4), *vb = malloc((size_t)(max_ctx * hd) * 4);
    float *qp = malloc((size_t)(512 * ac->grp * hd) * 4), *op = malloc((size_t)(512 * ac->grp * hd) * 4);
    float *sc = malloc((size_t)(512 * ac->grp * max_ctx) * 4);
    for (int64_t sp = 0; sp < ac->n_spans; sp++) {
        const int64_t n = ac->n[sp], ctx = ac->pos0[sp] + n;
        for (int64_t g = 0; g < kvt; g++) {
            for (int64_t p = 0; p < ctx; p++) {
                int64_t blk = tables[sp * stride + p / bt];
                int64_t o = (((blk * L + layer) * kvt + g) * bt + p % bt) * hd;
                for (int64_t d = 0; d < hd; d++) {
                    kb[p * hd + d] = getv(kc, dt, o + d);
                    vb[p * hd + d] = getv(vc, dt, o + d);
                }
            }
            for (int64_t i = 0; i < n; i++)
                memcpy(qp + i * ac->grp * hd, qkv + (row0[sp] + i) * qkvw + g * ac->grp * hd,
                       (size_t)(ac->grp * hd) * 4);
            rlb__attention_causal(qp, n, ac->grp, hd, ac->pos0[sp], kb, vb, scale, sc, op);
            for (int64_t i = 0; i < n; i++)
                for (int64_t e = 0; e < ac->grp * hd; e++)
                    ref[(row0[sp] + i) * hq * hd + g * ac->grp * hd + e] =
                        roundv(dt, op[i * ac->grp * hd + e]);
        }
    }
    *got_out = got;
    *ref_out = ref;
    *rows_out = rows;
    free(perm);
    free(tables);
    free(kc);
    free(vc);
    free(qkv);
    free(out);
    free(kb);
    free(vb);
    free(qp);
    free(op);
    free(sc);
    cudaFree((void *)a.qkv);
    cudaFree((void *)a.pos);
    cudaFree((void *)a.span_row0);
    cudaFree((void *)a.span_n);
    cudaFree((void *)a.span_qb0);
    cudaFree((void *)a.block_tables);
    cudaFree(a.partial);
    cudaFree(a.out);
    cudaFree(c.k);
    cudaFree(c.v);
}

static double attn_eps(rlb_dtype dt)
{
    return dt == RLB_DTYPE_F32 ? 1e-4 : 1.0 / 128;
}

static void test_attention_random(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 4;
    static const int64_t hds[4] = {16, 24, 64, 128};
    static const int64_t groups[4][2] = {{2, 4}, {1, 8}, {4, 1}, {1, 20}}; /* kvt, grp */
    for (int hi = 0; hi < 4; hi++)
        for (int gi = 0; gi < 4; gi++)
            for (int t = 0; t < 2; t++)
                for (int sm = 0; sm < 3; sm++) {
                    attn_case ac = {.hd = hds[hi], .kvt = groups[gi][0], .grp = groups[gi][1],
                                    .bt = gc_rng(&s) % 2 ? 16 : 5,
                                    .dt = t ? RLB_DTYPE_BF16 : RLB_DTYPE_F32};
                    ac.n_spans = gc_rnd(&s, 1, 5);
                    for (int64_t i = 0; i < ac.n_spans; i++) {
                        ac.n[i] = gc_rng(&s) % 2 ? 1 : gc_rnd(&s, 1, 40);
                        ac.pos0[i] = gc_rnd(&s, 0, 150);
                        ac.table_of[i] = (int)i;
                    }
                    ac.splits = sm == 0 ? 0 : sm == 1 ? gc_rnd(&s, 2, 5) : RLB_EO_MAX_SPLITS;
                    float *got, *ref;
                    int64_t rows;
                    run_attn(&ac, &s, &got, &ref, &rows, NULL);
                    char what[96];
                    snprintf(what, sizeof what, "attention hd %lld kvt %lld grp %lld %s splits %lld",
                             (long long)ac.hd, (long long)ac.kvt, (long long)ac.grp,
                             rlb_dtype_name(ac.dt), (long long)ac.splits);
                    expect_close(what, got, ref, rows * ac.kvt * ac.grp * ac.hd, 2e-5,
                                 attn_eps(ac.dt));
                    free(got);
                    free(ref);
                }
}

static void test_attention_chunked_prefill(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 5;
    /* one prompt of 70 tokens: one span, and three chunks over the same table; the same
     * seed makes the same cache, queries and tables for both */
    attn_case one = {.hd = 64, .kvt = 2, .grp = 4, .bt = 16, .dt = RLB_DTYPE_F32, .n_spans = 1,
                     .n = {70}, .pos0 = {0}, .table_of = {0}, .splits = 0};
    attn_case chunks = one;
    chunks.n_spans = 3;
    chunks.n[0] = 20, chunks.pos0[0] = 0;
    chunks.n[1] = 33, chunks.pos0[1] = 20;
    chunks.n[2] = 17, chunks.pos0[2] = 53;
    chunks.table_of[1] = chunks.table_of[2] = 0;
    float *g1, *r1, *g3, *r3;
    int64_t rows1, rows3;
    uint64_t s1 = s, s3 = s;
    run_attn(&one, &s1, &g1, &r1, &rows1, NULL);
    run_attn(&chunks, &s3, &g3, &r3, &rows3, NULL);
    assert_int_equal(rows1, rows3);
    const int64_t n = rows1 * 8 * 64;
    expect_close("one-shot prefill", g1, r1, n, 2e-5, 1e-4);
    expect_close("chunked prefill", g3, r3, n, 2e-5, 1e-4);
    expect_close("chunked vs one-shot", g3, g1, n, 2e-5, 1e-4);
    free(g1);
    free(r1);
    free(g3);
    free(r3);
}

static void test_attention_long_decode(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 6;
    for (int t = 0; t < 2; t++) {
        attn_case ac = {.hd = 128, .kvt = 8, .grp = 4, .bt = 16,
                        .dt = t ? RLB_DTYPE_BF16 : RLB_DTYPE_F32, .n_spans = 2,
                        .n = {1, 1}, .pos0 = {3999, 1234}, .table_of = {0, 1}};
        float *gs, *rs, *g1, *r1;
        int64_t rows;
        double ms;
        uint64_t sa = s, sb = s;
        ac.splits = 0; /* the split count for 16 blocks on 132 SMs: 17 */
        run_attn(&ac, &sa, &gs, &rs, &rows, &ms);
        ac.splits = 1;
        run_attn(&ac, &sb, &g1, &r1, &rows, NULL);
        const int64_t n = rows * 32 * 128;
        expect_close("long decode split-KV", gs, rs, n, 2e-5, attn_eps(ac.dt));
        expect_close("long decode one split", g1, r1, n, 2e-5, attn_eps(ac.dt));
        expect_close("split-KV vs one split", gs, g1, n, 2e-5, attn_eps(ac.dt));
        double bytes = 2.0 * (4000 + 1235) * 8 * 128 * (double)esz(ac.dt);
        printf("decode attention %s, 2 spans (4000 + 1235 keys), split-KV: %.1f us, %.0f GB/s of KV\n",
               rlb_dtype_name(ac.dt), ms * 1e3, bytes / (ms * 1e-3) / 1e9);
        free(gs);
        free(rs);
        free(g1);
        free(r1);
    }
}

/* The tensor-core decode kernel (one_row: every span one row; bf16 cache, head_dim 64 and
 * 128, 1 to 16 q heads per kv head): against the CPU, and against the classic kernel on
 * the same inputs (both within the tolerance of the CPU: their sums differ in order). One
 * span sits at a long position (several 64-key rounds of the four warps, a partial last
 * step); splits 1, the count for 132 multiprocessors and RLB_EO_MAX_SPLITS (splits with
 * no keys). */
static void test_attention_decode_tc(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 10;
    static const int64_t hds[2] = {64, 128};
    static const int64_t groups[6][2] = {{2, 4}, {1, 8}, {4, 1}, {1, 16}, {2, 7}, {1, 12}};
    for (int hi = 0; hi < 2; hi++)
        for (int gi = 0; gi < 6; gi++)
            for (int sm = 0; sm < 3; sm++) {
                attn_case ac = {.hd = hds[hi], .kvt = groups[gi][0], .grp = groups[gi][1],
                                .bt = gc_rng(&s) % 2 ? 16 : 5, .dt = RLB_DTYPE_BF16,
                                .one_row = 1};
                ac.n_spans = gc_rnd(&s, 1, 8);
                for (int64_t i = 0; i < ac.n_spans; i++) {
                    ac.n[i] = 1;
                    ac.pos0[i] = i == 0 ? gc_rnd(&s, 300, 1100) : gc_rnd(&s, 0, 200);
                    ac.table_of[i] = (int)i;
                }
                ac.splits = sm == 0 ? 1 : sm == 1 ? 0 : RLB_EO_MAX_SPLITS;
                float *got, *ref, *cgot, *cref;
                int64_t rows;
                uint64_t s1 = s, s2 = s;
                run_attn(&ac, &s1, &got, &ref, &rows, NULL);
                attn_case classic = ac;
                classic.one_row = 0;
                run_attn(&classic, &s2, &cgot, &cref, &rows, NULL);
                s = s1;
                char what[112];
                const int64_t n = rows * ac.kvt * ac.grp * ac.hd;
                snprintf(what, sizeof what, "tc decode attention hd %lld kvt %lld grp %lld splits %lld",
                         (long long)ac.hd, (long long)ac.kvt, (long long)ac.grp,
                         (long long)ac.splits);
                expect_close(what, got, ref, n, 2e-5, attn_eps(ac.dt));
                assert_memory_equal(cref, ref, (size_t)n * 4); /* the same inputs */
                expect_close("tc against classic", got, cgot, n, 2e-5, attn_eps(ac.dt));
                free(got);
                free(ref);
                free(cgot);
                free(cref);
            }
}

/* One decode step of the fused test: qkv (not rotated) and the cache uploaded fresh, then
 * rope_store and the attention (fused 0) or the attention alone with RoPE and the store in
 * it (fused 1); the output and both caches come back. */
typedef struct fused_step {
    const float *qkv;
    const uint8_t *kc, *vc; /* the cache before the step */
    size_t qkv_bytes, cache_bytes, out_bytes;
    rlb_eo_attn a;          /* the step's device metadata; qkv, cache, out set per run */
    rlb_eo_cache c;
    const float *inv;       /* device inv_freq */
    const int64_t *slot;    /* device slots */
    int64_t layer;
} fused_step;

static void fused_run(const fused_step *st, int fused, uint8_t *out, uint8_t *kc, uint8_t *vc)
{
    rlb_eo_attn a = st->a;
    rlb_eo_cache c = st->c;
    float *qkv = dput(st->qkv, st->qkv_bytes);
    c.k = dput(st->kc, st->cache_bytes);
    c.v = dput(st->vc, st->cache_bytes);
    a.qkv = qkv;
    a.out = dput(NULL, st->out_bytes);
    if (fused) {
        a.inv_freq = st->inv;
        a.slot = st->slot;
    } else {
        assert_int_equal(rlb__eo_rope_store(g_stream, qkv, a.rows, a.hq, a.pos, st->inv,
                                            st->slot, &c, st->layer), 0);
    }
    assert_int_equal(rlb__eo_attention(g_stream, &a, &c, st->layer), 0);
    dget(out, a.out, st->out_bytes);
    dget(kc, c.k, st->cache_bytes);
    dget(vc, c.v, st->cache_bytes);
    cudaFree(qkv);
    cudaFree(a.out);
    cudaFree(c.k);
    cudaFree(c.v);
}

/* A decode step with RoPE and the cache store fused into the attention kernel: against the
 * CPU (rope, store, causal attention per row), and bit for bit against rope_store then the
 * attention on the same inputs (the output and the whole cache). Rows: one at a long
 * position (several tiles per split), a padding row (position -1, slot -1) and a row whose
 * slot is -1 (it reads its position from the cache as it is). Splits: 1, the count for
 * 132 multiprocessors (sm 1), RLB_EO_MAX_SPLITS (sm 2). */
static void fused_case(uint64_t *sp, int64_t hd, int64_t kvt, int64_t grp, rlb_dtype dt, int sm,
                       int one_row)
{
    uint64_t s = *sp;
    const int64_t half = hd / 2;
    const int64_t hq = kvt * grp, bt = gc_rng(&s) % 2 ? 16 : 5, L = 2, layer = 1;
    const int64_t rows = gc_rnd(&s, 1, 6), qkvw = (hq + 2 * kvt) * hd;
    int32_t pos[6], row0[6], sn[6], qb0[7] = {0};
    int64_t slot[6], max_ctx = 1;
    for (int64_t r = 0; r < rows; r++) {
        pos[r] = r == 2   ? -1
                 : r == 0 ? (int32_t)gc_rnd(&s, 500, 900)
                          : (int32_t)gc_rnd(&s, 0, 300);
        max_ctx = pos[r] + 1 > max_ctx ? pos[r] + 1 : max_ctx;
        row0[r] = (int32_t)r;
        sn[r] = 1;
        qb0[r + 1] = qb0[r] + (int32_t)rlb__eo_attn_qblocks(1, grp);
    }
    const int64_t stride = (max_ctx + bt - 1) / bt, nblk = stride * rows + 1;
    int32_t *perm = malloc((size_t)nblk * 4), *tables = malloc((size_t)(stride * rows) * 4);
    for (int64_t i = 0; i < nblk; i++)
        perm[i] = (int32_t)i;
    for (int64_t i = nblk - 1; i > 0; i--) {
        int64_t j = gc_rnd(&s, 0, i);
        int32_t tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    memcpy(tables, perm, (size_t)(stride * rows) * 4);
    for (int64_t r = 0; r < rows; r++)
        slot[r] = pos[r] < 0 || r == 4
                      ? -1
                      : (int64_t)tables[r * stride + pos[r] / bt] * bt + pos[r] % bt;
    const int64_t celems = nblk * L * kvt * bt * hd;
    const size_t cbytes = (size_t)celems * esz(dt);
    uint8_t *kc = malloc(cbytes), *vc = malloc(cbytes);
    float *qkv = malloc((size_t)(rows * qkvw) * 4);
    fill_cache_qkv(&s, dt, kc, vc, celems, qkv, rows * qkvw);
    float *inv = test_inv_freq(hd);
    const int64_t ws_vectors = RLB_EO_MAX_SPLITS * rows * hq;
    fused_step st = {
        .qkv = qkv, .kc = kc, .vc = vc, .qkv_bytes = (size_t)(rows * qkvw) * 4,
        .cache_bytes = cbytes, .out_bytes = (size_t)(rows * hq * hd) * esz(dt),
        .a = {.pos = dput(pos, (size_t)rows * 4), .rows = rows, .hq = hq, .n_spans = rows,
              .span_row0 = dput(row0, (size_t)rows * 4), .span_n = dput(sn, (size_t)rows * 4),
              .span_qb0 = dput(qb0, (size_t)(rows + 1) * 4), .qblocks = qb0[rows],
              .block_tables = dput(tables, (size_t)(stride * rows) * 4), .bt_stride = stride,
              .scale = (float)pow((double)hd, -0.5),
              .splits = sm == 0   ? 1
                        : sm == 1 ? rlb__eo_attn_splits(qb0[rows] * kvt, 0, 132, rows, hq,
                                                        ws_vectors)
                                  : RLB_EO_MAX_SPLITS,
              .partial = dput(NULL, (size_t)(ws_vectors * (hd + 2)) * 4),
              .out_dt = dt, .one_row = one_row},
        .c = {NULL, NULL, dt, L, kvt, hd, bt},
        .inv = dput(inv, (size_t)half * 4),
        .slot = dput(slot, (size_t)rows * 8),
        .layer = layer,
    };
    uint8_t *out1 = malloc(st.out_bytes), *out0 = malloc(st.out_bytes);
    uint8_t *k1 = malloc(cbytes), *v1 = malloc(cbytes), *k0 = malloc(cbytes), *v0 = malloc(cbytes);
    fused_run(&st, 1, out1, k1, v1);
    fused_run(&st, 0, out0, k0, v0);
    /* the CPU: rotate, store (rounded to dt), then attend over positions 0..pos */
    float *ref = calloc((size_t)(rows * hq * hd), 4), *got = malloc((size_t)(rows * hq * hd) * 4);
    float *kb = malloc((size_t)(max_ctx * hd) * 4), *vb = malloc((size_t)(max_ctx * hd) * 4);
    float *op = malloc((size_t)(grp * hd) * 4), *sc = malloc((size_t)(grp * max_ctx) * 4);
    uint8_t *kr = malloc(cbytes), *vr = malloc(cbytes);
    memcpy(kr, kc, cbytes);
    memcpy(vr, vc, cbytes);
    cpu_rope_store(qkv, rows, hq, kvt, hd, pos, slot, inv, bt, L, layer, dt, kr, vr, dt);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < kvt && pos[r] >= 0; g++) {
            for (int64_t p = 0; p <= pos[r]; p++) {
                int64_t blk = tables[r * stride + p / bt];
                int64_t o = (((blk * L + layer) * kvt + g) * bt + p % bt) * hd;
                for (int64_t d = 0; d < hd; d++) {
                    kb[p * hd + d] = getv(kr, dt, o + d);
                    vb[p * hd + d] = getv(vr, dt, o + d);
                }
            }
            rlb__attention_causal(qkv + r * qkvw + g * grp * hd, 1, grp, hd, pos[r], kb, vb,
                                  st.a.scale, sc, op);
            for (int64_t e = 0; e < grp * hd; e++)
                ref[r * hq * hd + g * grp * hd + e] = roundv(dt, op[e]);
        }
    for (int64_t i = 0; i < rows * hq * hd; i++)
        got[i] = getv(out1, dt, i);
    char what[112];
    snprintf(what, sizeof what, "fused rope attention hd %lld kvt %lld grp %lld %s splits %lld",
             (long long)hd, (long long)kvt, (long long)grp, rlb_dtype_name(dt),
             (long long)st.a.splits);
    expect_close(what, got, ref, rows * hq * hd, 2e-5, attn_eps(dt));
    float *kg = malloc((size_t)celems * 4), *kw = malloc((size_t)celems * 4);
    for (int64_t i = 0; i < celems; i++) {
        kg[i] = getv(k1, dt, i);
        kw[i] = getv(kr, dt, i);
    }
    expect_close("fused rope cache k", kg, kw, celems, 1e-5, ulp_eps(dt) + 1e-5);
    assert_memory_equal(v1, vr, cbytes);
    /* the unfused kernels on the same inputs: the same bits everywhere */
    assert_memory_equal(out1, out0, st.out_bytes);
    assert_memory_equal(k1, k0, cbytes);
    assert_memory_equal(v1, v0, cbytes);
    free(kg);
    free(kw);
    free(kr);
    free(vr);
    free(ref);
    free(got);
    free(kb);
    free(vb);
    free(op);
    free(sc);
    free(out1);
    free(out0);
    free(k1);
    free(v1);
    free(k0);
    free(v0);
    free(perm);
    free(tables);
    free(kc);
    free(vc);
    free(qkv);
    free(inv);
    cudaFree((void *)st.a.pos);
    cudaFree((void *)st.a.span_row0);
    cudaFree((void *)st.a.span_n);
    cudaFree((void *)st.a.span_qb0);
    cudaFree((void *)st.a.block_tables);
    cudaFree(st.a.partial);
    cudaFree((void *)st.inv);
    cudaFree((void *)st.slot);
    *sp = s;
}

static void test_attention_rope_fused(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 9;
    static const int64_t hds[4] = {16, 24, 64, 128};
    static const int64_t groups[3][2] = {{2, 4}, {1, 20}, {4, 1}}; /* kvt, grp (20: 2 tiles) */
    for (int hi = 0; hi < 4; hi++)
        for (int gi = 0; gi < 3; gi++)
            for (int t = 0; t < 2; t++)
                for (int sm = 0; sm < 3; sm++) /* tc 1: the tensor-core decode kernel */
                    for (int tc = 0; tc <= (t && hds[hi] >= 64); tc++)
                        fused_case(&s, hds[hi], groups[gi][0], groups[gi][1],
                                   t ? RLB_DTYPE_BF16 : RLB_DTYPE_F32, sm, tc);
}

static void test_attention_padding_and_refusals(void **state)
{
    (void)state;
    /* a padding row (position -1) sees no key: zeros */
    float qkv[3 * 24] = {1};
    int32_t pos[1] = {-1}, row0[1] = {0}, sn[1] = {1}, qb0[2] = {0, 1}, table[1] = {0};
    uint16_t kv[16 * 24];
    for (int i = 0; i < 16 * 24; i++)
        kv[i] = rlb__f32_to_bf16(1.0f);
    rlb_eo_attn a = {.qkv = dput(qkv, sizeof qkv), .pos = dput(pos, 4), .rows = 1, .hq = 1,
                     .n_spans = 1, .span_row0 = dput(row0, 4), .span_n = dput(sn, 4),
                     .span_qb0 = dput(qb0, 8), .qblocks = 1, .block_tables = dput(table, 4),
                     .bt_stride = 1, .scale = 0.2f, .splits = 1, .partial = NULL,
                     .out = dput(kv, 48), .out_dt = RLB_DTYPE_BF16};
    rlb_eo_cache c = {dput(kv, sizeof kv), dput(kv, sizeof kv), RLB_DTYPE_BF16, 1, 1, 24, 16};
    assert_int_equal(rlb__eo_attention(g_stream, &a, &c, 0), 0);
    uint16_t out[24];
    dget(out, a.out, sizeof out);
    for (int i = 0; i < 24; i++)
        assert_int_equal(out[i], 0);
    c.hd = 96;
    assert_int_equal(rlb__eo_attention(g_stream, &a, &c, 0), RLB_EUNSUPPORTED);
    assert_false(rlb__eo_head_dim_supported(96));
    c.hd = 24;
    a.splits = 2; /* splits without their workspace */
    assert_int_equal(rlb__eo_attention(g_stream, &a, &c, 0), RLB_EINVAL);
    a.partial = dput(NULL, 2 * 26 * 4);
    assert_int_equal(rlb__eo_attention(g_stream, &a, &c, 0), 0);
    a.inv_freq = (const float *)a.partial; /* RoPE fused without the slots */
    assert_int_equal(rlb__eo_attention(g_stream, &a, &c, 0), RLB_EINVAL);
    a.inv_freq = NULL;
    a.out_dt = RLB_DTYPE_F32;
    assert_int_equal(rlb__eo_attention(g_stream, &a, &c, 0), RLB_EINVAL);
    cudaFree(a.partial);
    cudaFree((void *)a.qkv);
    cudaFree((void *)a.pos);
    cudaFree((void *)a.span_row0);
    cudaFree((void *)a.span_n);
    cudaFree((void *)a.span_qb0);
    cudaFree((void *)a.block_tables);
    cudaFree(a.out);
    cudaFree(c.k);
    cudaFree(c.v);
}

/* ---- Sampling ----------------------------------------------------------------------------- */

static void test_sample(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 7;
    static const int64_t Vs[5] = {1, 7, 1000, 32017, 128256};
    static const float temps[6] = {0.0f, 1e-6f, 0.3f, 0.7f, 1.0f, 1.7f};
    static const float top_ps[5] = {0.05f, 0.3f, 0.9f, 0.999f, 1.0f};
    rlb_sample_ws ws = {0};
    for (int vi = 0; vi < 5; vi++) {
        const int64_t V = Vs[vi], n = 96;
        float *logits = malloc((size_t)(n * V) * 4);
        rlb_eo_sample_job jobs[96];
        for (int64_t j = 0; j < n; j++) {
            float spread = frand(&s, 0.5f, 8.0f);
            for (int64_t i = 0; i < V; i++)
                logits[j * V + i] = frand(&s, -spread, spread);
            if (j % 5 == 0 && V > 3) { /* ties on the maximum: the first index wins */
                logits[j * V + 1] = logits[j * V + V - 1] = 2 * spread;
            }
            if (j % 7 == 3) /* a few distinct values: ties at the top-k and top-p cuts */
                for (int64_t i = 0; i < V; i++)
                    logits[j * V + i] = (float)gc_rnd(&s, 0, 6) * 0.5f;
            /* top-k / top-p on three jobs of four (the fourth: plain temperature) */
            const int filt = (int)(j % 4);
            jobs[j] = (rlb_eo_sample_job){
                .row = n - 1 - j, .temperature = temps[j % 6],
                .top_k = filt & 1 ? (int32_t)gc_rnd(&s, 1, V + 1) : 0,
                .seed = gc_rng(&s), .sample = gc_rng(&s) % 8, .pos = gc_rnd(&s, 0, 5000),
                .top_p = filt & 2 ? top_ps[gc_rng(&s) % 5] : 1.0f};
        }
        float *dl = dput(logits, (size_t)(n * V) * 4);
        rlb_eo_sample_job *dj = dput(jobs, sizeof jobs);
        int32_t *dt = dput(NULL, (size_t)n * 4), *dst = dput(NULL, (size_t)n * 4);
        float *dlp = dput(NULL, (size_t)n * 4);
        void *dw = dput(NULL, rlb__eo_sample_work_bytes(n));
        assert_int_equal(rlb__eo_sample(g_stream, dl, V, dj, n, dw, dt, dlp, dst), 0);
        int32_t tok[96], st[96];
        float lp[96];
        dget(tok, dt, sizeof tok);
        dget(lp, dlp, sizeof lp);
        dget(st, dst, sizeof st);
        for (int64_t j = 0; j < n; j++) {
            rlb_sampling sp = {.temperature = jobs[j].temperature, .top_k = jobs[j].top_k,
                               .top_p = jobs[j].top_p, .seed = jobs[j].seed};
            int32_t rt;
            float rlp;
            assert_int_equal(rlb__sample_token(logits + jobs[j].row * V, V, &sp, jobs[j].sample,
                                               jobs[j].pos, &ws, &rt, &rlp), 0);
            assert_int_equal(st[j], 0);
            if (tok[j] != rt || fabsf(lp[j] - rlp) > 1e-5f * fmaxf(1.0f, fabsf(rlp)))
                fprintf(stderr, "sample V %lld job %lld T %g top_k %d top_p %g: gpu %d (%.9g) cpu "
                        "%d (%.9g), seed %llu\n", (long long)V, (long long)j,
                        (double)jobs[j].temperature, jobs[j].top_k, (double)jobs[j].top_p,
                        tok[j], (double)lp[j], rt, (double)rlp, (unsigned long long)g_seed);
            assert_int_equal(tok[j], rt);
            assert_true(fabsf(lp[j] - rlp) <= 1e-5f * fmaxf(1.0f, fabsf(rlp)));
        }
        /* a job alone, and three jobs together, give the bits it gave among 96: the chunk
         * sums' order does not depend on the batch */
        for (int64_t j = 0; j < n; j += 19) {
            const int64_t m = j % 2 && j + 1 < n ? 3 : 1;
            int32_t t1[3], s1[3];
            float l1[3];
            assert_int_equal(rlb__eo_sample(g_stream, dl, V, dj + j - (m > 1), m, dw, dt, dlp,
                                            dst), 0);
            dget(t1, dt, (size_t)m * 4);
            dget(l1, dlp, (size_t)m * 4);
            dget(s1, dst, (size_t)m * 4);
            const int64_t at = m > 1; /* job j's place among the m */
            assert_int_equal(s1[at], 0);
            assert_int_equal(t1[at], tok[j]);
            assert_memory_equal(&l1[at], &lp[j], 4);
        }
        /* a NaN in a row is refused, the other rows are not */
        if (V > 1) {
            float nan = NAN;
            CHECK_CUDA(cudaMemcpy(dl + jobs[3].row * V + V / 2, &nan, 4, cudaMemcpyHostToDevice));
            assert_int_equal(rlb__eo_sample(g_stream, dl, V, dj, n, dw, dt, dlp, dst), 0);
            dget(st, dst, sizeof st);
            for (int64_t j = 0; j < n; j++)
                assert_int_equal(st[j], j == 3 ? RLB_EINVAL : 0);
        }
        free(logits);
        cudaFree(dl);
        cudaFree(dj);
        cudaFree(dt);
        cudaFree(dst);
        cudaFree(dlp);
        cudaFree(dw);
    }
    rlb__sample_ws_free(&ws);
}

/* ---- Weight-only quantized matmul -------------------------------------------------------- */

static void test_matmul_wq(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 8;
    static const int64_t ks[3] = {48, 512, 40};
    static const int64_t ns[4] = {1, 3, 4, 9};
    for (int qi = 0; qi < 2; qi++)
        for (int ki = 0; ki < 3; ki++)
            for (int ni = 0; ni < 4; ni++)
                for (int xt = 0; xt < 2; xt++) {
                    const rlb_dtype qdt = qi ? RLB_DTYPE_F8E4M3 : RLB_DTYPE_I8;
                    const rlb_dtype xdt = xt ? RLB_DTYPE_BF16 : RLB_DTYPE_F32;
                    const int64_t k = ks[ki], n = ns[ni], m = 37;
                    const int per_row = (ki + ni) % 2 == 0;
                    uint8_t *q = malloc((size_t)(m * k)), *x = malloc((size_t)(n * k) * 4);
                    float scale[37];
                    for (int64_t i = 0; i < m * k; i++)
                        q[i] = qi ? rlb__f32_to_e4m3(frand(&s, -400, 400)) : (uint8_t)gc_rnd(&s, 0, 255);
                    if (qi)
                        for (int64_t i = 0; i < m * k; i++)
                            if ((q[i] & 0x7f) == 0x7f)
                                q[i] = 0; /* no NaN codes */
                    for (int64_t i = 0; i < m; i++)
                        scale[i] = frand(&s, 1e-3f, 1e-2f);
                    for (int64_t i = 0; i < n * k; i++)
                        putv(x, xdt, i, frand(&s, -1, 1));
                    float *ref = malloc((size_t)(n * m) * 4), *got = malloc((size_t)(n * m) * 4);
                    double worst_mag = 0;
                    for (int64_t r = 0; r < n; r++)
                        for (int64_t o = 0; o < m; o++) {
                            double acc = 0, mag = 0;
                            for (int64_t c = 0; c < k; c++) {
                                double w = qi ? rlb__e4m3_to_f32(q[o * k + c]) : (double)(int8_t)q[o * k + c];
                                acc += w * getv(x, xdt, r * k + c);
                                mag += fabs(w * getv(x, xdt, r * k + c));
                            }
                            float sc = per_row ? scale[o] : scale[0];
                            ref[r * m + o] = (float)(acc * sc);
                            if (mag * sc > worst_mag)
                                worst_mag = mag * sc;
                        }
                    void *dq = dput(q, (size_t)(m * k)), *dx = dput(x, (size_t)(n * k) * esz(xdt));
                    float *ds = dput(scale, sizeof scale), *dy = dput(NULL, (size_t)(n * m) * 4);
                    assert_int_equal(rlb__eo_matmul_wq(g_stream, dx, xdt, n, k, dq, qdt, ds, per_row, m, dy), 0);
                    dget(got, dy, (size_t)(n * m) * 4);
                    expect_close(qi ? "matmul fp8" : "matmul int8", got, ref, n * m,
                                 2e-6 * worst_mag, 0);
                    free(q);
                    free(x);
                    free(ref);
                    free(got);
                    cudaFree(dq);
                    cudaFree(dx);
                    cudaFree(ds);
                    cudaFree(dy);
                }
}

/* A GEMV's random inputs: W [m, k] in [-scale, scale] / sqrt(k), x [n, k] in [-1, 1] (dt),
 * the float32 stream nx [n, k] in [-3, 3] and the norm weight nw [k] in [0.5, 1.5] (dt). */
static void gemv_inputs(uint64_t *s, rlb_dtype dt, int64_t m, int64_t k, int64_t n,
                        float scale, uint8_t *w, uint8_t *x, float *nx, uint8_t *nw)
{
    const float a = scale / sqrtf((float)k);
    for (int64_t i = 0; i < m * k; i++)
        putv(w, dt, i, frand(s, -a, a));
    for (int64_t i = 0; i < n * k; i++) {
        putv(x, dt, i, frand(s, -1, 1));
        nx[i] = frand(s, -3, 3);
    }
    for (int64_t i = 0; i < k; i++)
        putv(nw, dt, i, frand(s, 0.5f, 1.5f));
}

/* One GEMV case: y = x . W^T (or the fused norm's input), against a double-precision
 * reference from the same rounded inputs, each output within 1e-5 of the sum of |terms|;
 * with `residual`, R += y too. Then every row alone must give the same bits as in the
 * batch (the kernel's batch invariance). */
static void gemv_case(uint64_t *s, rlb_dtype dt, int64_t m, int64_t k, int64_t n, int norm,
                      int residual)
{
    const size_t e = esz(dt);
    uint8_t *w = malloc((size_t)(m * k) * e), *x = malloc((size_t)(n * k) * e);
    uint8_t *nw = malloc((size_t)k * e);
    float *nx = malloc((size_t)(n * k) * 4), *res = malloc((size_t)(n * m) * 4);
    float *ref = malloc((size_t)(n * m) * 4), *got = malloc((size_t)(n * m) * 4);
    float *gres = malloc((size_t)(n * m) * 4), *alone = malloc((size_t)m * 4);
    double *tol = malloc((size_t)(n * m) * sizeof *tol), *h = malloc((size_t)k * sizeof *h);
    gemv_inputs(s, dt, m, k, n, 1.0f, w, x, nx, nw);
    for (int64_t i = 0; i < n * m; i++)
        res[i] = frand(s, -1, 1);
    const float eps = 1e-5f;
    for (int64_t b = 0; b < n; b++) {
        double inv = 1.0;
        if (norm) {
            double ss = 0;
            for (int64_t c = 0; c < k; c++)
                ss += (double)nx[b * k + c] * nx[b * k + c];
            inv = 1.0 / sqrt(ss / (double)k + eps);
        }
        for (int64_t c = 0; c < k; c++)
            h[c] = norm ? (double)getv(nw, dt, c) * nx[b * k + c] : getv(x, dt, b * k + c);
        for (int64_t j = 0; j < m; j++) {
            double acc = 0, mag = 0;
            for (int64_t c = 0; c < k; c++) {
                double t = (double)getv(w, dt, j * k + c) * h[c];
                acc += t;
                mag += fabs(t);
            }
            ref[b * m + j] = (float)(acc * inv);
            tol[b * m + j] = 1e-5 * mag * inv + 1e-30;
        }
    }
    void *dw = dput(w, (size_t)(m * k) * e), *dx = dput(x, (size_t)(n * k) * e);
    void *dnw = dput(nw, (size_t)k * e);
    float *dnx = dput(nx, (size_t)(n * k) * 4), *dres = dput(res, (size_t)(n * m) * 4);
    float *dy = dput(NULL, (size_t)(n * m) * 4);
    rlb_eo_gemv_fuse f = {.norm_x = norm ? dnx : NULL, .norm_w = dnw, .eps = eps,
                          .residual = residual ? dres : NULL};
    assert_int_equal(rlb__eo_gemv(g_stream, dw, dt, m, k, norm ? NULL : dx, n,
                                  norm || residual ? &f : NULL, dy),
                     0);
    dget(got, dy, (size_t)(n * m) * 4);
    dget(gres, dres, (size_t)(n * m) * 4);
    int64_t bad = 0;
    for (int64_t i = 0; i < n * m; i++) {
        double d = fabs((double)got[i] - ref[i]);
        double dr = fabs((double)gres[i] - ((double)res[i] + got[i]));
        if (!(d <= tol[i]) || (residual && !(dr <= 1e-6 * (fabs(res[i]) + fabs(got[i])) + 1e-30))) {
            if (bad++ < 5)
                fprintf(stderr, "gemv %s m %lld k %lld n %lld norm %d res %d [%lld]: gpu %.9g "
                        "ref %.9g tol %.3g residual %.9g\n", rlb_dtype_name(dt), (long long)m,
                        (long long)k, (long long)n, norm, residual, (long long)i,
                        (double)got[i], (double)ref[i], tol[i], (double)gres[i]);
        }
    }
    if (bad)
        fprintf(stderr, "gemv: %lld of %lld outside tolerance (seed %llu)\n", (long long)bad,
                (long long)(n * m), (unsigned long long)g_seed);
    assert_int_equal(bad, 0);
    for (int64_t b = 0; n > 1 && b < n; b++) {
        rlb_eo_gemv_fuse f1 = {.norm_x = norm ? dnx + b * k : NULL, .norm_w = dnw, .eps = eps};
        assert_int_equal(rlb__eo_gemv(g_stream, dw, dt, m, k,
                                      norm ? NULL : (char *)dx + (size_t)(b * k) * e, 1,
                                      norm ? &f1 : NULL, dy),
                         0);
        dget(alone, dy, (size_t)m * 4);
        if (memcmp(alone, got + b * m, (size_t)m * 4))
            fprintf(stderr, "gemv %s m %lld k %lld: row %lld of %lld differs alone (seed %llu)\n",
                    rlb_dtype_name(dt), (long long)m, (long long)k, (long long)b, (long long)n,
                    (unsigned long long)g_seed);
        assert_memory_equal(alone, got + b * m, (size_t)m * 4);
    }
    free(w);
    free(x);
    free(nw);
    free(nx);
    free(res);
    free(ref);
    free(got);
    free(gres);
    free(alone);
    free(tol);
    free(h);
    cudaFree(dw);
    cudaFree(dx);
    cudaFree(dnw);
    cudaFree(dnx);
    cudaFree(dres);
    cudaFree(dy);
}

/* gate_up's GEMV writing the activation too (swiglu_out), against the same GEMV without it
 * then the swiglu op (each checked on its own against its reference above): y and the
 * activation the same bits, plain and with the norm fused, batched and each row alone. */
static void gemv_swiglu_out_case(uint64_t *s, rlb_dtype dt, int64_t half, int64_t k, int64_t n,
                                 int norm)
{
    const size_t e = esz(dt);
    const int64_t m = 2 * half;
    uint8_t *w = malloc((size_t)(m * k) * e), *x = malloc((size_t)(n * k) * e);
    uint8_t *nw = malloc((size_t)k * e);
    float *nx = malloc((size_t)(n * k) * 4), *plain = malloc((size_t)(n * m) * 4);
    float *fused = malloc((size_t)(n * m) * 4);
    uint8_t *act_ref = malloc((size_t)(n * half) * e), *act = malloc((size_t)(n * half) * e);
    gemv_inputs(s, dt, m, k, n, 2.0f, w, x, nx, nw);
    void *dw = dput(w, (size_t)(m * k) * e), *dx = dput(x, (size_t)(n * k) * e);
    void *dnw = dput(nw, (size_t)k * e), *dact = dput(NULL, (size_t)(n * half) * e);
    float *dnx = dput(nx, (size_t)(n * k) * 4), *dy = dput(NULL, (size_t)(n * m) * 4);
    const void *xin = norm ? NULL : dx;
    rlb_eo_gemv_fuse f = {.norm_x = norm ? dnx : NULL, .norm_w = dnw, .eps = 1e-5f};
    assert_int_equal(rlb__eo_gemv(g_stream, dw, dt, m, k, xin, n, norm ? &f : NULL, dy), 0);
    dget(plain, dy, (size_t)(n * m) * 4);
    assert_int_equal(rlb__eo_swiglu(g_stream, dy, n, half, dact, dt), 0);
    dget(act_ref, dact, (size_t)(n * half) * e);
    assert_int_equal(cudaMemset(dact, 0xff, (size_t)(n * half) * e), 0);
    assert_int_equal(cudaMemset(dy, 0xff, (size_t)(n * m) * 4), 0);
    f.swiglu_out = dact;
    assert_int_equal(rlb__eo_gemv(g_stream, dw, dt, m, k, xin, n, &f, dy), 0);
    dget(fused, dy, (size_t)(n * m) * 4);
    dget(act, dact, (size_t)(n * half) * e);
    if (memcmp(plain, fused, (size_t)(n * m) * 4) || memcmp(act, act_ref, (size_t)(n * half) * e))
        fprintf(stderr, "gemv swiglu out %s half %lld k %lld n %lld norm %d: differs from the "
                "GEMV then swiglu (seed %llu)\n", rlb_dtype_name(dt), (long long)half,
                (long long)k, (long long)n, norm, (unsigned long long)g_seed);
    assert_memory_equal(plain, fused, (size_t)(n * m) * 4);
    assert_memory_equal(act, act_ref, (size_t)(n * half) * e);
    for (int64_t b = 0; n > 1 && b < n; b++) {
        rlb_eo_gemv_fuse f1 = {.norm_x = norm ? dnx + b * k : NULL, .norm_w = dnw, .eps = 1e-5f,
                               .swiglu_out = dact};
        assert_int_equal(rlb__eo_gemv(g_stream, dw, dt, m, k,
                                      norm ? NULL : (char *)dx + (size_t)(b * k) * e, 1, &f1, dy),
                         0);
        dget(act, dact, (size_t)half * e);
        assert_memory_equal(act, act_ref + (size_t)(b * half) * e, (size_t)half * e);
    }
    /* an odd m, or the residual add with it, is refused */
    rlb_eo_gemv_fuse bad = {.swiglu_out = dact, .residual = dy};
    assert_int_equal(rlb__eo_gemv(g_stream, dw, dt, m, k, dx, n, &bad, dy), RLB_EINVAL);
    bad.residual = NULL;
    assert_int_equal(rlb__eo_gemv(g_stream, dw, dt, m - 1, k, dx, n, &bad, dy), RLB_EINVAL);
    free(w);
    free(x);
    free(nw);
    free(nx);
    free(plain);
    free(fused);
    free(act_ref);
    free(act);
    cudaFree(dw);
    cudaFree(dx);
    cudaFree(dnw);
    cudaFree(dact);
    cudaFree(dnx);
    cudaFree(dy);
}

static void test_gemv_swiglu(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 11;
    /* gate_up writing the activation: odd sizes in every dtype, the 1B and 8B shapes */
    static const int64_t gu[][2] = {{37, 70}, {300, 512}, {8192, 2048}, {14336, 4096}};
    for (size_t i = 0; i < sizeof gu / sizeof gu[0]; i++)
        for (int t = 0; t < (i < 2 ? 3 : 1); t++)
            for (int64_t n = 1; n <= RLB_EO_GEMV_MAX_ROWS; n += i < 2 ? 1 : 3)
                gemv_swiglu_out_case(&s, kFloat3[i < 2 ? t : 1], gu[i][0], gu[i][1], n,
                                     (int)(n % 2));
}

static void test_gemv(void **state)
{
    (void)state;
    uint64_t s = g_seed ^ 9;
    /* small and odd shapes: every dtype, n 1..8, the fusions */
    static const int64_t small[][2] = {{37, 70}, {300, 129}, {5, 1}, {259, 512}, {64, 2056}};
    for (size_t i = 0; i < sizeof small / sizeof small[0]; i++)
        for (int t = 0; t < 3; t++)
            for (int64_t n = 1; n <= RLB_EO_GEMV_MAX_ROWS; n++)
                gemv_case(&s, kFloat3[t], small[i][0], small[i][1], n, (int)(n % 2),
                          (int)(n % 3 == 0));
    /* the 1B and 8B layer shapes (qkv, o, gate_up, down) and a vocabulary-sized head, bf16 */
    static const int64_t big[][2] = {{3072, 2048}, {2048, 2048}, {16384, 2048}, {2048, 8192},
                                     {6144, 4096}, {4096, 14336}, {40000, 2048}};
    static const int64_t ns[3] = {1, 3, 8};
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
        for (int j = 0; j < 3; j++)
            gemv_case(&s, j == 2 ? RLB_DTYPE_F16 : RLB_DTYPE_BF16, big[i][0], big[i][1], ns[j],
                      j == 1, j == 2);
    assert_int_equal(rlb__eo_gemv(g_stream, NULL, RLB_DTYPE_BF16, 8, 8, NULL, 9, NULL, NULL),
                     RLB_EINVAL);
    assert_int_equal(rlb__eo_gemv(g_stream, NULL, RLB_DTYPE_I8, 8, 8, NULL, 1, NULL, NULL),
                     RLB_EINVAL);
}

int main(void)
{
    if (!gc_have_gpu()) {
        fprintf(stderr, "test_cuda_engine_ops: no GPU visible, skipping\n");
        return GC_SKIP;
    }
    const char *env = getenv("RLB_TEST_SEED");
    g_seed = env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL);
    printf("test_cuda_engine_ops: seed %llu (RLB_TEST_SEED repeats it)\n",
           (unsigned long long)g_seed);
    if (cudaStreamCreate(&g_stream) != cudaSuccess)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_embed_convert_cut),
        cmocka_unit_test(test_norm_swiglu_bias),
        cmocka_unit_test(test_rope_store),
        cmocka_unit_test(test_attention_random),
        cmocka_unit_test(test_attention_chunked_prefill),
        cmocka_unit_test(test_attention_long_decode),
        cmocka_unit_test(test_attention_decode_tc),
        cmocka_unit_test(test_attention_rope_fused),
        cmocka_unit_test(test_attention_padding_and_refusals),
        cmocka_unit_test(test_sample),
        cmocka_unit_test(test_matmul_wq),
        cmocka_unit_test(test_gemv),
        cmocka_unit_test(test_gemv_swiglu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
