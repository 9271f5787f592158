/* test_cuda_quant: the CUDA post-load quantization kernels (kernels/cuda/quant.h) give the
 * bytes and scales of the CPU reference (kernels/cpu/quant.h, itself checked against a
 * brute-force e4m3 search and hand-worked int8 rows by tests/unit/test_quant), bit for bit:
 *   - one set of many random tensors of every dtype and kind, with shapes that exercise
 *     grouped rows, split per-tensor items, odd widths and unaligned starts, values over a
 *     wide exponent range, and tensors salted with NaN, inf, zero rows and ties;
 *   - a second run over the same buffers gives the same bytes (pointers never change);
 *   - the e4m3 encoder (the GPU's is the hardware's) on every rounding boundary: each value
 *     halfway between neighbouring e4m3 codes, one f32 step either side, and a sweep of
 *     f32 patterns in [-448, 448], under a scale of exactly 1;
 *   - an empty per-tensor tensor gets scale 0; bad descriptions are refused.
 * Exits 77 where no GPU is visible.
 */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cpu/convert.h"
#include "kernels/cpu/quant.h"
#include "kernels/cuda/quant.h"
#include "tests/gpu/gpu_case.h"

#define N_TENSORS 60

/* One tensor of the test set: host input and where it sits in the device arena. */
typedef struct qt {
    rlb_cuda_quant_tensor d; /* device description (pointers filled after allocation) */
    uint8_t *w;              /* host input */
    uint64_t w_off, q_off, s_off; /* offsets in the input, output and scale arenas */
} qt;

/* A value spread over many binades, with a sign. */
static float random_value(uint64_t *s)
{
    float m = (float)(gc_rng(s) % 2000001) / 1000000.0f - 1.0f;
    return ldexpf(m, (int)gc_rnd(s, -30, 10));
}

static void put(uint8_t *w, rlb_dtype dt, uint64_t i, float v)
{
    if (dt == RLB_DTYPE_F32) {
        memcpy(w + 4 * i, &v, 4);
    } else {
        uint16_t h = dt == RLB_DTYPE_BF16 ? rlb__f32_to_bf16(v) : rlb__f32_to_f16(v);
        memcpy(w + 2 * i, &h, 2);
    }
}

static void fill_tensor(qt *t, uint64_t *s)
{
    const rlb_dtype dt = t->d.dtype;
    const uint64_t rows = (uint64_t)t->d.rows, cols = (uint64_t)t->d.cols, n = rows * cols;
    const int salted = gc_rng(s) % 3 == 0;
    for (uint64_t i = 0; i < n; i++)
        put(t->w, dt, i, random_value(s));
    if (!salted || !n)
        return;
    for (int k = 0; k < 4; k++) /* NaNs of both signs, infs and a zero row */
        put(t->w, dt, gc_rng(s) % n, k % 2 ? -NAN : NAN);
    if (gc_rng(s) % 4 == 0) {
        put(t->w, dt, gc_rng(s) % n, INFINITY);
        put(t->w, dt, gc_rng(s) % n, -INFINITY);
    }
    uint64_t r = gc_rng(s) % rows;
    for (uint64_t c = 0; c < cols; c++)
        put(t->w, dt, r * cols + c, 0.0f);
    /* exact multiples of the row's future scale sit on rounding ties after division */
    put(t->w, dt, gc_rng(s) % n, 448.0f);
    put(t->w, dt, gc_rng(s) % n, 2.5f);
}

static void cpu_reference(const qt *t, uint8_t *q, float *scale)
{
    const void *w = t->w;
    int rc = t->d.kind == RLB_QUANT_INT8_ROWS
                 ? rlb__quant_int8_rows(w, t->d.dtype, t->d.rows, t->d.cols, (int8_t *)q, scale)
             : t->d.kind == RLB_QUANT_FP8_ROWS
                 ? rlb__quant_fp8_rows(w, t->d.dtype, t->d.rows, t->d.cols, q, scale)
                 : rlb__quant_fp8_tensor(w, t->d.dtype, t->d.rows, t->d.cols, q, scale);
    assert_int_equal(rc, 0);
}

static void test_random_set(void **state)
{
    (void)state;
    uint64_t s = 9001, w_bytes = 0, q_bytes = 0, s_count = 0;
    qt t[N_TENSORS];
    for (int i = 0; i < N_TENSORS; i++) {
        memset(&t[i], 0, sizeof t[i]);
        t[i].d.dtype = gc_float_dtypes[gc_rng(&s) % 3];
        t[i].d.kind = (rlb_quant_kind)(i % 3);
        switch (gc_rng(&s) % 4) { /* row widths: tiny, odd, one item wide, wider than an item */
        case 0: t[i].d.cols = gc_rnd(&s, 1, 16); break;
        case 1: t[i].d.cols = gc_rnd(&s, 17, 700); break;
        case 2: t[i].d.cols = 8 * gc_rnd(&s, 2, 600); break;
        default: t[i].d.cols = gc_rnd(&s, 16000, 40000); break;
        }
        t[i].d.rows = t[i].d.cols > 10000 ? gc_rnd(&s, 1, 6) : gc_rnd(&s, 1, 300);
        uint64_t esz = rlb_dtype_size(t[i].d.dtype), n = (uint64_t)(t[i].d.rows * t[i].d.cols);
        /* a third of the tensors start off 16-byte alignment (still element-aligned) */
        uint64_t skew = gc_rng(&s) % 3 == 0 ? esz * (uint64_t)gc_rnd(&s, 1, 3) : 0;
        t[i].w_off = (w_bytes + 255) / 256 * 256 + skew;
        w_bytes = t[i].w_off + n * esz;
        t[i].q_off = (q_bytes + 255) / 256 * 256 + (skew ? 1 : 0);
        q_bytes = t[i].q_off + n;
        t[i].s_off = s_count;
        s_count += t[i].d.kind == RLB_QUANT_FP8_TENSOR ? 1 : (uint64_t)t[i].d.rows;
        t[i].w = malloc(n * esz);
        assert_non_null(t[i].w);
        fill_tensor(&t[i], &s);
    }
    char *dw, *dq;
    float *ds;
    CHECK_CUDA(cudaMalloc((void **)&dw, w_bytes));
    CHECK_CUDA(cudaMalloc((void **)&dq, q_bytes));
    CHECK_CUDA(cudaMalloc((void **)&ds, s_count * sizeof(float)));
    rlb_cuda_quant_tensor desc[N_TENSORS];
    for (int i = 0; i < N_TENSORS; i++) {
        uint64_t n = (uint64_t)(t[i].d.rows * t[i].d.cols);
        CHECK_CUDA(cudaMemcpy(dw + t[i].w_off, t[i].w, n * rlb_dtype_size(t[i].d.dtype),
                              cudaMemcpyHostToDevice));
        t[i].d.w = dw + t[i].w_off;
        t[i].d.q = dq + t[i].q_off;
        t[i].d.scale = ds + t[i].s_off;
        desc[i] = t[i].d;
    }
    char err[256] = "";
    rlb_cuda_quant *qs = NULL;
    assert_int_equal(rlb__cuda_quant_create(0, desc, N_TENSORS, &qs, err, sizeof err), 0);
    assert_true(rlb__cuda_quant_device_bytes(qs) > 0);
    uint8_t *gq = malloc(q_bytes), *gq2 = malloc(q_bytes);
    float *gs = malloc(s_count * sizeof(float));
    assert_non_null(gq);
    assert_non_null(gq2);
    assert_non_null(gs);
    for (int run = 0; run < 2; run++) {
        CHECK_CUDA(cudaMemset(dq, 0xcc, q_bytes)); /* stale bytes must not survive */
        assert_int_equal(rlb__cuda_quant_run(qs, 0), 0);
        CHECK_CUDA(cudaDeviceSynchronize());
        CHECK_CUDA(cudaMemcpy(run ? gq2 : gq, dq, q_bytes, cudaMemcpyDeviceToHost));
    }
    assert_memory_equal(gq, gq2, q_bytes);
    CHECK_CUDA(cudaMemcpy(gs, ds, s_count * sizeof(float), cudaMemcpyDeviceToHost));
    for (int i = 0; i < N_TENSORS; i++) {
        uint64_t n = (uint64_t)(t[i].d.rows * t[i].d.cols);
        uint64_t ns = t[i].d.kind == RLB_QUANT_FP8_TENSOR ? 1 : (uint64_t)t[i].d.rows;
        uint8_t *q = malloc(n);
        float *sc = malloc(ns * sizeof(float));
        assert_non_null(q);
        assert_non_null(sc);
        cpu_reference(&t[i], q, sc);
        for (uint64_t r = 0; r < ns; r++)
            if (memcmp(&sc[r], &gs[t[i].s_off + r], sizeof(float)) != 0)
                fail_msg("tensor %d (%s, kind %d, %lld x %lld): scale %llu CPU %a GPU %a", i,
                         rlb_dtype_name(t[i].d.dtype), (int)t[i].d.kind, (long long)t[i].d.rows,
                         (long long)t[i].d.cols, (unsigned long long)r, (double)sc[r],
                         (double)gs[t[i].s_off + r]);
        for (uint64_t e = 0; e < n; e++)
            if (q[e] != gq[t[i].q_off + e])
                fail_msg("tensor %d (%s, kind %d, %lld x %lld): element %llu CPU %02x GPU %02x",
                         i, rlb_dtype_name(t[i].d.dtype), (int)t[i].d.kind,
                         (long long)t[i].d.rows, (long long)t[i].d.cols, (unsigned long long)e,
                         q[e], gq[t[i].q_off + e]);
        free(q);
        free(sc);
        free(t[i].w);
    }
    rlb__cuda_quant_free(qs);
    free(gq);
    free(gq2);
    free(gs);
    CHECK_CUDA(cudaFree(dw));
    CHECK_CUDA(cudaFree(dq));
    CHECK_CUDA(cudaFree(ds));
}

static void test_fp8_encoder_boundaries(void **state)
{
    (void)state;
    uint64_t cap = 1u << 22, n = 0;
    float *w = malloc(cap * sizeof(float));
    assert_non_null(w);
    w[n++] = 448.0f; /* amax 448: the scale is exactly 1, so each w is what gets encoded */
    for (uint8_t c = 0; c < 0x7e; c++) { /* neighbouring finite codes c, c + 1 */
        float lo = rlb__e4m3_to_f32(c), hi = rlb__e4m3_to_f32((uint8_t)(c + 1));
        float mid = lo + (hi - lo) / 2; /* exact: e4m3 values have 4 significant bits */
        float v[3] = {mid, nextafterf(mid, 0.0f), nextafterf(mid, 1e9f)};
        for (int k = 0; k < 3; k++) {
            w[n++] = v[k];
            w[n++] = -v[k];
        }
    }
    for (uint64_t i = 0; n < cap && i < (1ull << 32); i += 1021) { /* dense sweep */
        uint32_t u = (uint32_t)i;
        float f;
        memcpy(&f, &u, 4);
        if (fabsf(f) <= 448.0f)
            w[n++] = f;
    }
    float *dw, *ds;
    uint8_t *dq, *q = malloc(n), *gq = malloc(n);
    assert_non_null(q);
    assert_non_null(gq);
    CHECK_CUDA(cudaMalloc((void **)&dw, n * sizeof(float)));
    CHECK_CUDA(cudaMalloc((void **)&dq, n));
    CHECK_CUDA(cudaMalloc((void **)&ds, sizeof(float)));
    CHECK_CUDA(cudaMemcpy(dw, w, n * sizeof(float), cudaMemcpyHostToDevice));
    rlb_cuda_quant_tensor t = {.w = dw, .dtype = RLB_DTYPE_F32, .rows = 1, .cols = (int64_t)n,
                               .kind = RLB_QUANT_FP8_TENSOR, .q = dq, .scale = ds};
    char err[256] = "";
    rlb_cuda_quant *qs = NULL;
    float sc = 0.0f, gs = 0.0f;
    assert_int_equal(rlb__cuda_quant_create(0, &t, 1, &qs, err, sizeof err), 0);
    assert_int_equal(rlb__cuda_quant_run(qs, 0), 0);
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaMemcpy(gq, dq, n, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(&gs, ds, sizeof gs, cudaMemcpyDeviceToHost));
    assert_int_equal(rlb__quant_fp8_tensor(w, RLB_DTYPE_F32, 1, (int64_t)n, q, &sc), 0);
    assert_true(sc == 1.0f && gs == 1.0f);
    for (uint64_t i = 0; i < n; i++)
        if (q[i] != gq[i])
            fail_msg("e4m3(%a): CPU %02x GPU %02x", (double)w[i], q[i], gq[i]);
    rlb__cuda_quant_free(qs);
    CHECK_CUDA(cudaFree(dw));
    CHECK_CUDA(cudaFree(dq));
    CHECK_CUDA(cudaFree(ds));
    free(w);
    free(q);
    free(gq);
}

static void test_empty_and_refusals(void **state)
{
    (void)state;
    char err[256] = "";
    float *ds;
    uint8_t *dq;
    CHECK_CUDA(cudaMalloc((void **)&ds, 4 * sizeof(float)));
    CHECK_CUDA(cudaMalloc((void **)&dq, 64));
    CHECK_CUDA(cudaMemset(ds, 0x7f, 4 * sizeof(float)));
    rlb_cuda_quant_tensor t = {.w = dq, .dtype = RLB_DTYPE_BF16, .rows = 0, .cols = 8,
                               .kind = RLB_QUANT_FP8_TENSOR, .q = dq, .scale = ds};
    rlb_cuda_quant *qs = NULL;
    assert_int_equal(rlb__cuda_quant_create(0, &t, 1, &qs, err, sizeof err), 0);
    assert_int_equal(rlb__cuda_quant_run(qs, 0), 0);
    CHECK_CUDA(cudaDeviceSynchronize());
    float got = 1.0f;
    CHECK_CUDA(cudaMemcpy(&got, ds, sizeof got, cudaMemcpyDeviceToHost));
    assert_true(got == 0.0f); /* the CPU reference's 0 / 448 */
    rlb__cuda_quant_free(qs);

    rlb_cuda_quant_tensor bad = t;
    bad.dtype = RLB_DTYPE_I8;
    assert_int_equal(rlb__cuda_quant_create(0, &bad, 1, &qs, err, sizeof err), RLB_EDTYPE);
    assert_null(qs);
    bad = t;
    bad.rows = -1;
    assert_int_equal(rlb__cuda_quant_create(0, &bad, 1, &qs, err, sizeof err), RLB_EINVAL);
    assert_non_null(strstr(err, "tensor 0"));
    bad = t;
    bad.scale = NULL;
    assert_int_equal(rlb__cuda_quant_create(0, &bad, 1, &qs, err, sizeof err), RLB_EINVAL);
    bad = t;
    bad.kind = (rlb_quant_kind)7;
    assert_int_equal(rlb__cuda_quant_create(0, &bad, 1, &qs, err, sizeof err), RLB_EINVAL);
    assert_int_equal(rlb__cuda_quant_run(NULL, 0), RLB_EINVAL);
    CHECK_CUDA(cudaFree(ds));
    CHECK_CUDA(cudaFree(dq));
}

int main(void)
{
    if (!gc_have_gpu()) {
        fprintf(stderr, "test_cuda_quant: no GPU visible, skipping\n");
        return GC_SKIP;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_set),
        cmocka_unit_test(test_fp8_encoder_boundaries),
        cmocka_unit_test(test_empty_and_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
