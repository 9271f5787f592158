/* test_engine_ops: every transformer op of kernels/cpu/ops.h against a naive loop written
 * here from the formulas (double precision), on fresh random inputs of awkward sizes.
 *   matmul, matmul_i8   |got - ref| <= 1e-5 * sum_c |x w| per output (float32 rounding of
 *                       a k-term sum stays far below); int8 at 1..9 and 20 rows (the
 *                       dot-product kernel up to 8 rows, sgemm tiles beyond), k not a
 *                       multiple of the vector width, beta 0 and 1
 *   rmsnorm, swiglu,    relative 1e-5
 *   rope, softmax
 *   rope_inv_freq       default: theta^(-2i/hd); llama3: HF's piecewise scaling (low
 *                       frequencies / factor, high ones kept, a smooth blend between),
 *                       relative 1e-5
 *   attention_causal    grouped heads, a cache prefix (pos0 > 0): 1e-5 of sum |p v|
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cpu/ops.h"
#include "rlb/rlb.h"

static uint64_t rng_state = 0x243f6a8885a308d3ull;

static double urand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) * 0x1.0p-53;
}

static float *rand_floats(int64_t n, double amp)
{
    float *p = malloc((size_t)(n ? n : 1) * sizeof *p);
    for (int64_t i = 0; i < n; i++)
        p[i] = (float)((2.0 * urand() - 1.0) * amp);
    return p;
}

/* |got - ref| <= tol * mag (mag = |ref| when NULL) for each of n values. */
static void assert_close(const float *got, const double *ref, const double *mag, int64_t n,
                         double tol)
{
    for (int64_t i = 0; i < n; i++) {
        double m = mag ? mag[i] : fabs(ref[i]);
        if (!(fabs((double)got[i] - ref[i]) <= tol * m + 1e-30))
            fail_msg("value %lld: got %.9g, want %.9g (bound %.3g)", (long long)i,
                     (double)got[i], ref[i], tol * m);
    }
}

/* y = x . W^T (* scale) + beta * y0 with W given as floats or int8, in double. */
static void ref_linear(const float *x, int64_t n, int64_t k, const float *w, const int8_t *q,
                       const float *scale, int64_t m, float beta, const float *y0,
                       double *ref, double *mag)
{
    for (int64_t j = 0; j < n; j++)
        for (int64_t r = 0; r < m; r++) {
            double s = 0.0, a = 0.0;
            for (int64_t c = 0; c < k; c++) {
                double wv = w ? (double)w[r * k + c] : (double)q[r * k + c] * scale[r];
                s += (double)x[j * k + c] * wv;
                a += fabs((double)x[j * k + c] * wv);
            }
            ref[j * m + r] = s + beta * (double)y0[j * m + r];
            mag[j * m + r] = a + fabs(beta * (double)y0[j * m + r]) + 1e-12;
        }
}

static void check_matmul(int64_t n, int64_t k, int64_t m, float beta, int int8)
{
    float *x = rand_floats(n * k, 1.0), *w = rand_floats(m * k, 1.0);
    float *y = rand_floats(n * m, 1.0), *y0 = malloc((size_t)(n * m) * sizeof *y0);
    float *scale = rand_floats(m, 0.01);
    int8_t *q = malloc((size_t)(m * k));
    for (int64_t i = 0; i < m * k; i++)
        q[i] = (int8_t)(int)(urand() * 255.0 - 127.0);
    memcpy(y0, y, (size_t)(n * m) * sizeof *y);
    double *ref = malloc((size_t)(n * m) * sizeof *ref), *mag = malloc((size_t)(n * m) * 8);
    if (int8) {
        int64_t ns = rlb__matmul_i8_scratch(n, k);
        float *scratch = ns ? malloc((size_t)ns * sizeof *scratch) : NULL;
        rlb__matmul_i8(x, n, k, q, scale, m, beta, y, scratch);
        free(scratch);
        ref_linear(x, n, k, NULL, q, scale, m, beta, y0, ref, mag);
    } else {
        rlb__matmul(x, n, k, w, m, beta, y);
        ref_linear(x, n, k, w, NULL, NULL, m, beta, y0, ref, mag);
    }
    assert_close(y, ref, mag, n * m, 1e-5);
    free(x);
    free(w);
    free(y);
    free(y0);
    free(scale);
    free(q);
    free(ref);
    free(mag);
}

static void test_matmul(void **state)
{
    (void)state;
    const int64_t ns[] = {1, 3, 17}, ks[] = {1, 7, 64, 129}, ms[] = {1, 5, 33};
    for (size_t a = 0; a < 3; a++)
        for (size_t b = 0; b < 4; b++)
            for (size_t c = 0; c < 3; c++) {
                check_matmul(ns[a], ks[b], ms[c], 0.0f, 0);
                check_matmul(ns[a], ks[b], ms[c], 1.0f, 0);
            }
}

static void test_matmul_i8(void **state)
{
    (void)state;
    const int64_t ns[] = {1, 2, 3, 4, 5, 8, 9, 20}, ks[] = {1, 31, 32, 33, 100, 257};
    const int64_t ms[] = {1, 63, 65, 130};
    for (size_t a = 0; a < 8; a++)
        for (size_t b = 0; b < 6; b++)
            for (size_t c = 0; c < 4; c++) {
                check_matmul(ns[a], ks[b], ms[c], 0.0f, 1);
                check_matmul(ns[a], ks[b], ms[c], 1.0f, 1);
            }
}

static void test_rmsnorm_swiglu_softmax(void **state)
{
    (void)state;
    enum { N = 3, D = 67 };
    float *x = rand_floats(N * D, 3.0), *w = rand_floats(D, 2.0), y[N * D];
    double ref[N * D];
    rlb__rmsnorm(x, w, N, D, 1e-6f, y);
    for (int r = 0; r < N; r++) {
        double ss = 0.0;
        for (int i = 0; i < D; i++)
            ss += (double)x[r * D + i] * x[r * D + i];
        double inv = 1.0 / sqrt(ss / D + 1e-6);
        for (int i = 0; i < D; i++)
            ref[r * D + i] = (double)w[i] * x[r * D + i] * inv;
    }
    assert_close(y, ref, NULL, N * D, 1e-5);
    rlb__rmsnorm(x, w, N, D, 1e-6f, x); /* in place */
    assert_memory_equal(x, y, sizeof y);

    float *gu = rand_floats(N * 2 * D, 6.0), out[N * D];
    rlb__swiglu(gu, N, D, out);
    for (int r = 0; r < N; r++)
        for (int i = 0; i < D; i++) {
            double g = gu[r * 2 * D + i], u = gu[r * 2 * D + D + i];
            ref[r * D + i] = g / (1.0 + exp(-g)) * u;
        }
    assert_close(out, ref, NULL, N * D, 1e-5);

    float s[D];
    memcpy(s, gu, sizeof s);
    double mx = -INFINITY, sum = 0.0;
    for (int i = 0; i < D; i++)
        mx = s[i] > mx ? s[i] : mx;
    for (int i = 0; i < D; i++)
        sum += exp(s[i] - mx);
    for (int i = 0; i < D; i++)
        ref[i] = exp(s[i] - mx) / sum;
    rlb__softmax_inplace(s, D);
    assert_close(s, ref, NULL, D, 1e-5);
    free(x);
    free(w);
    free(gu);
}

static void ref_inv_freq(const rlb_model_config *c, double *f)
{
    int64_t half = c->head_dim / 2;
    for (int64_t i = 0; i < half; i++) {
        f[i] = pow(c->rope_theta, -2.0 * (double)i / (double)c->head_dim);
        if (c->rope_type != RLB_ROPE_LLAMA3)
            continue;
        double wavelen = 2.0 * M_PI / f[i];
        double lo_wl = c->rope_orig_max_pos / c->rope_low_freq_factor;
        double hi_wl = c->rope_orig_max_pos / c->rope_high_freq_factor;
        if (wavelen > lo_wl) {
            f[i] /= c->rope_factor; /* low frequencies: scaled */
        } else if (wavelen >= hi_wl) { /* in between: blended */
            double smooth = (c->rope_orig_max_pos / wavelen - c->rope_low_freq_factor) /
                            (c->rope_high_freq_factor - c->rope_low_freq_factor);
            f[i] = (1.0 - smooth) * f[i] / c->rope_factor + smooth * f[i];
        }
    }
}

static void test_rope(void **state)
{
    (void)state;
    rlb_model_config c;
    rlb__config_tiny(&c);
    c.head_dim = 64;
    float inv[32], cosv[32], sinv[32];
    double ref[64];
    int kinds[3] = {0, 0, 0};
    for (int type = 0; type < 2; type++) {
        c.rope_type = type ? RLB_ROPE_LLAMA3 : RLB_ROPE_DEFAULT;
        c.rope_theta = type ? 500000.0 : 10000.0;
        c.rope_factor = 8.0;
        c.rope_low_freq_factor = 1.0;
        c.rope_high_freq_factor = 4.0;
        c.rope_orig_max_pos = 8192;
        assert_int_equal(rlb__rope_inv_freq(&c, inv), 0);
        ref_inv_freq(&c, ref);
        assert_close(inv, ref, NULL, 32, 1e-5);
        for (int i = 0; type && i < 32; i++) {
            double wl = 2.0 * M_PI / pow(c.rope_theta, -2.0 * i / 64.0);
            kinds[wl > 8192.0 ? 0 : wl >= 2048.0 ? 1 : 2]++;
        }
    }
    /* The llama3 case covers all three bands. */
    assert_true(kinds[0] > 0 && kinds[1] > 0 && kinds[2] > 0);

    enum { HEADS = 3 };
    float *x = rand_floats(HEADS * 64, 2.0), y[HEADS * 64];
    memcpy(y, x, sizeof y);
    int64_t pos = 37;
    rlb__rope_cos_sin(inv, 32, pos, cosv, sinv);
    rlb__rope_apply(y, HEADS, 64, cosv, sinv);
    double want[HEADS * 64], mag[HEADS * 64];
    for (int h = 0; h < HEADS; h++)
        for (int i = 0; i < 32; i++) {
            double a = (double)inv[i] * (double)pos, x1 = x[h * 64 + i], x2 = x[h * 64 + 32 + i];
            want[h * 64 + i] = x1 * cos(a) - x2 * sin(a);
            want[h * 64 + 32 + i] = x2 * cos(a) + x1 * sin(a);
            mag[h * 64 + i] = mag[h * 64 + 32 + i] = fabs(x1) + fabs(x2);
        }
    assert_close(y, want, mag, HEADS * 64, 1e-5);
    c.rope_type = (rlb_rope_type)7;
    assert_int_equal(rlb__rope_inv_freq(&c, inv), RLB_EUNSUPPORTED);
    free(x);
}

static void test_attention(void **state)
{
    (void)state;
    enum { N = 5, GRP = 3, HD = 16, POS0 = 4, CTX = POS0 + N };
    float *q = rand_floats(N * GRP * HD, 1.0), *k = rand_floats(CTX * HD, 1.0);
    float *v = rand_floats(CTX * HD, 1.0), out[N * GRP * HD], scores[N * GRP * CTX];
    float scale = 0.25f;
    rlb__attention_causal(q, N, GRP, HD, POS0, k, v, scale, scores, out);
    double ref[N * GRP * HD], mag[N * GRP * HD];
    for (int r = 0; r < N * GRP; r++) {
        int len = POS0 + r / GRP + 1;
        double p[CTX], mx = -INFINITY, sum = 0.0;
        for (int t = 0; t < len; t++) {
            p[t] = 0.0;
            for (int d = 0; d < HD; d++)
                p[t] += (double)q[r * HD + d] * k[t * HD + d];
            p[t] *= scale;
            mx = p[t] > mx ? p[t] : mx;
        }
        for (int t = 0; t < len; t++)
            sum += (p[t] = exp(p[t] - mx));
        for (int d = 0; d < HD; d++) {
            ref[r * HD + d] = 0.0;
            mag[r * HD + d] = 1e-12;
            for (int t = 0; t < len; t++) {
                ref[r * HD + d] += p[t] / sum * v[t * HD + d];
                mag[r * HD + d] += fabs(p[t] / sum * v[t * HD + d]);
            }
        }
    }
    assert_close(out, ref, mag, N * GRP * HD, 1e-5);
    free(q);
    free(k);
    free(v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_i8),
        cmocka_unit_test(test_rmsnorm_swiglu_softmax),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
