/* ops_i8.c: matrix products with int8 weight-only weights (one float scale per output
 * row, kernels/cpu/quant.h), dequantized on the fly: y[j, r] = scale[r] * sum_c q[r, c] *
 * x[j, c] + beta * y[j, r].
 *
 * Decode (a few rows of x) is bound by the bytes of W it reads, so a dot-product kernel
 * reads each int8 row once for up to four rows of x at a time: a quarter of the float32
 * weight traffic. AVX2+FMA when the CPU has it (checked at run time, so the library still
 * runs on a baseline x86-64), a plain loop otherwise. Prefill (many rows) is compute bound:
 * tiles of W are dequantized (q * scale) into float32 and multiplied with cblas_sgemm.
 * Check: tests/unit/test_engine_ops.c against a double-precision loop.
 */
#include <cblas.h>
#include <stddef.h>

#include "kernels/cpu/ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RLB_I8_HAVE_AVX2_PATH 1
#endif

/* Up to this many rows of x use the dot-product kernel; more go through sgemm tiles. */
#define I8_DOT_MAX_ROWS 8
/* Weight rows dequantized per sgemm tile. */
#define I8_TILE_ROWS 64

int64_t rlb__matmul_i8_scratch(int64_t n, int64_t k)
{
    return n > I8_DOT_MAX_ROWS ? (int64_t)I8_TILE_ROWS * k : 0;
}

/* acc[g] = sum_c q[c] * x[g * ldx + c] for g < G, plain C. Four partial sums per row keep
 * the loop from waiting on one addition chain. */
static void dot_rows_plain(const int8_t *q, const float *x, int64_t ldx, int64_t k, int G,
                           float *acc)
{
    for (int g = 0; g < G; g++) {
        const float *xg = x + g * ldx;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        int64_t c = 0;
        for (; c + 4 <= k; c += 4) {
            a0 += (float)q[c] * xg[c];
            a1 += (float)q[c + 1] * xg[c + 1];
            a2 += (float)q[c + 2] * xg[c + 2];
            a3 += (float)q[c + 3] * xg[c + 3];
        }
        for (; c < k; c++)
            a0 += (float)q[c] * xg[c];
        acc[g] = (a0 + a1) + (a2 + a3);
    }
}

#ifdef RLB_I8_HAVE_AVX2_PATH
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Eight int8 weights at p (any alignment) as eight floats. */
__attribute__((target("avx2,fma"))) static inline __m256 load_w8(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* The AVX2 version of dot_rows_plain for a constant G (1..4) so the accumulators stay in
 * registers; each 16 weights are converted once and used for all G rows of x. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
dot_rows_avx2_g(const int8_t *q, const float *x, int64_t ldx, int64_t k, const int G,
                float *acc)
{
    __m256 a0[4], a1[4];
    for (int g = 0; g < G; g++) {
        a0[g] = _mm256_setzero_ps();
        a1[g] = _mm256_setzero_ps();
    }
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
        __m256 w0 = load_w8(q + c), w1 = load_w8(q + c + 8);
        for (int g = 0; g < G; g++) {
            a0[g] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + g * ldx + c), a0[g]);
            a1[g] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + g * ldx + c + 8), a1[g]);
        }
    }
    for (int g = 0; g < G; g++) {
        float s = hsum256(_mm256_add_ps(a0[g], a1[g]));
        for (int64_t t = c; t < k; t++)
            s += (float)q[t] * x[g * ldx + t];
        acc[g] = s;
    }
}

__attribute__((target("avx2,fma"))) static void dot_rows_avx2(const int8_t *q, const float *x,
                                                              int64_t ldx, int64_t k, int G,
                                                              float *acc)
{
    switch (G) {
    case 1: dot_rows_avx2_g(q, x, ldx, k, 1, acc); break;
    case 2: dot_rows_avx2_g(q, x, ldx, k, 2, acc); break;
    case 3: dot_rows_avx2_g(q, x, ldx, k, 3, acc); break;
    default: dot_rows_avx2_g(q, x, ldx, k, 4, acc); break;
    }
}
#endif

typedef void (*dot_rows_fn)(const int8_t *, const float *, int64_t, int64_t, int, float *);

static dot_rows_fn pick_dot_rows(void)
{
#ifdef RLB_I8_HAVE_AVX2_PATH
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return dot_rows_avx2;
#endif
    return dot_rows_plain;
}

static void matmul_i8_dot(const float *x, int64_t n, int64_t k, const int8_t *q,
                          const float *scale, int64_t m, float beta, float *y)
{
    dot_rows_fn dot = pick_dot_rows();
    float acc[4];
    for (int64_t j0 = 0; j0 < n; j0 += 4) {
        int G = n - j0 < 4 ? (int)(n - j0) : 4;
        for (int64_t r = 0; r < m; r++) {
            dot(q + r * k, x + j0 * k, k, k, G, acc);
            for (int g = 0; g < G; g++) {
                float *yo = y + (j0 + g) * m + r;
                float v = scale[r] * acc[g];
                *yo = beta == 0.0f ? v : v + beta * *yo;
            }
        }
    }
}

static void matmul_i8_tiles(const float *x, int64_t n, int64_t k, const int8_t *q,
                            const float *scale, int64_t m, float beta, float *y, float *tile)
{
    for (int64_t r0 = 0; r0 < m; r0 += I8_TILE_ROWS) {
        int64_t tr = m - r0 < I8_TILE_ROWS ? m - r0 : I8_TILE_ROWS;
        for (int64_t r = 0; r < tr; r++) {
            const int8_t *qr = q + (r0 + r) * k;
            float s = scale[r0 + r];
            for (int64_t c = 0; c < k; c++)
                tile[r * k + c] = (float)qr[c] * s;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)tr, (int)k, 1.0f, x,
                    (int)k, tile, (int)k, beta, y + r0, (int)m);
    }
}

void rlb__matmul_i8(const float *x, int64_t n, int64_t k, const int8_t *q, const float *scale,
                    int64_t m, float beta, float *y, float *scratch)
{
    if (n <= 0 || m <= 0)
        return;
    if (n <= I8_DOT_MAX_ROWS)
        matmul_i8_dot(x, n, k, q, scale, m, beta, y);
    else
        matmul_i8_tiles(x, n, k, q, scale, m, beta, y, scratch);
}
