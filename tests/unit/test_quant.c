/* test_quant: the CPU reference of post-load quantization (kernels/cpu/quant.c) against
 * independent references: e4m3 encoding against a brute-force nearest-value search over
 * all 256 codes (decoded here from the OCP formula in double precision, ties to the even
 * code), the whole fp8 pipeline against that search on random tensors, and int8 / fp8 rows
 * worked out by hand (scales chosen as powers of two so every quotient is exact). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cpu/quant.h"

/* Value of e4m3fn code q (no sign) from the OCP definition: bias 7, 3 mantissa bits,
 * exponent 0 subnormal (m * 2^-9); 0x7f is NaN, returned as -1. */
static double e4m3_value(unsigned q)
{
    unsigned e = (q >> 3) & 15u, m = q & 7u;
    if (e == 15u && m == 7u)
        return -1.0;
    if (e == 0)
        return m * ldexp(1.0, -9);
    return (1.0 + m / 8.0) * ldexp(1.0, (int)e - 7);
}

/* Brute force: the finite code nearest to clamp(x, -448, 448), ties to the even code. */
static uint8_t e4m3_brute(float x)
{
    if (isnan(x))
        return (uint8_t)(signbit(x) ? 0xff : 0x7f);
    double a = fabs((double)x);
    if (a > 448.0)
        a = 448.0;
    unsigned best = 0;
    double best_d = INFINITY;
    for (unsigned q = 0; q < 0x7f; q++) {
        double d = fabs(e4m3_value(q) - a);
        if (d < best_d || (d == best_d && (q & 1u) == 0)) {
            best = q;
            best_d = d;
        }
    }
    return (uint8_t)(best | (signbit(x) ? 0x80u : 0u));
}

static float f32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void check_encode(float x)
{
    uint8_t want = e4m3_brute(x), got = rlb__f32_to_e4m3(x);
    if (want != got)
        fail_msg("e4m3(%a): got 0x%02x, brute force 0x%02x", (double)x, got, want);
}

/* Every code, every midpoint between neighbours (a tie) and one f32 ulp either side of
 * it, both signs; then values past the range, infinities, NaN. */
static void test_e4m3_boundaries(void **state)
{
    for (unsigned q = 0; q < 0x7e; q++) {
        float lo = (float)e4m3_value(q), hi = (float)e4m3_value(q + 1);
        float mid = (float)((e4m3_value(q) + e4m3_value(q + 1)) / 2.0);
        float xs[] = {lo, mid, nextafterf(mid, 0.0f), nextafterf(mid, INFINITY), hi};
        for (size_t i = 0; i < sizeof(xs) / sizeof(xs[0]); i++) {
            check_encode(xs[i]);
            check_encode(-xs[i]);
        }
    }
    float extra[] = {0.0f, -0.0f, 448.0f, 449.0f, 464.0f, 1e30f, INFINITY, -INFINITY, NAN,
                     -NAN, 1e-30f, 1e-45f, ldexpf(1.0f, -10), ldexpf(3.0f, -11)};
    for (size_t i = 0; i < sizeof(extra) / sizeof(extra[0]); i++)
        check_encode(extra[i]);
    assert_int_equal(rlb__f32_to_e4m3(448.0f), 0x7e);
    assert_int_equal(rlb__f32_to_e4m3(-1e9f), 0xfe);
    assert_int_equal(rlb__f32_to_e4m3(ldexpf(1.0f, -9)), 0x01); /* smallest subnormal */
    assert_int_equal(rlb__f32_to_e4m3(ldexpf(1.0f, -10)), 0x00); /* tie to even: 0 */
    assert_int_equal(rlb__f32_to_e4m3(ldexpf(3.0f, -10)), 0x02); /* 1.5 units: tie to 2 */
}

/* A stride through the f32 bit patterns (every exponent, scattered mantissas). */
static void test_e4m3_sweep(void **state)
{
    for (uint64_t u = 0; u < (1ull << 32); u += 4097u)
        check_encode(f32_from_bits((uint32_t)u));
}

static void test_e4m3_decode(void **state)
{
    for (unsigned q = 0; q < 256; q++) {
        double want = e4m3_value(q & 0x7fu);
        float got = rlb__e4m3_to_f32((uint8_t)q);
        if (want < 0) {
            assert_true(isnan(got));
            continue;
        }
        assert_true((double)fabsf(got) == want);
        assert_int_equal(signbit(got) != 0, (q & 0x80u) != 0);
        assert_int_equal(rlb__f32_to_e4m3(got), q); /* every finite code round-trips */
    }
}

/* 254 -> scale 2 exactly; quotients 127, 0.5, 1.5, -2.5, -63.25 round half to even. */
static const float int8_row[] = {254.0f, 1.0f, 3.0f, -5.0f, -126.5f, 0.0f};
static const int8_t int8_want[] = {127, 0, 2, -2, -63, 0};
/* The same values as bf16 and f16 bit patterns (all exact in both). */
static const uint16_t int8_row_bf16[] = {0x437e, 0x3f80, 0x4040, 0xc0a0, 0xc2fd, 0x0000};
static const uint16_t int8_row_f16[] = {0x5bf0, 0x3c00, 0x4200, 0xc500, 0xd7e8, 0x0000};

static void test_int8_hand(void **state)
{
    const void *inputs[] = {int8_row, int8_row_bf16, int8_row_f16};
    const rlb_dtype dtypes[] = {RLB_DTYPE_F32, RLB_DTYPE_BF16, RLB_DTYPE_F16};
    for (int k = 0; k < 3; k++) {
        int8_t q[6];
        float s;
        assert_int_equal(rlb__quant_int8_rows(inputs[k], dtypes[k], 1, 6, q, &s), 0);
        assert_true(s == 2.0f);
        assert_memory_equal(q, int8_want, sizeof(int8_want));
    }
    /* two rows: the second all zeros (scale 0, q 0), the first -127 at the minimum */
    const float w[] = {-127.0f, 63.5f, 0.0f, 0.0f, 0.0f, 0.0f};
    int8_t q[6];
    float s[2];
    assert_int_equal(rlb__quant_int8_rows(w, RLB_DTYPE_F32, 2, 3, q, s), 0);
    assert_true(s[0] == 1.0f);
    assert_true(s[1] == 0.0f);
    const int8_t want[] = {-127, 64, 0, 0, 0, 0}; /* 63.5 ties to 64 */
    assert_memory_equal(q, want, sizeof(want));
}

/* Per tensor: amax 896 -> scale 2; per channel: row 0 amax 448 (scale 1), row 1 amax 7
 * (scale 1/64). Quotients land on codes or on exact ties. */
static void test_fp8_hand(void **state)
{
    const float w[] = {896.0f, -3.0f, 0.0625f, 40.0f, /* row 1: */ 7.0f, -0.5f, 1.0f, 0.0f};
    uint8_t q[8];
    float s[2];
    assert_int_equal(rlb__quant_fp8_tensor(w, RLB_DTYPE_F32, 2, 4, q, s), 0);
    assert_true(s[0] == 2.0f);
    /* 448 -> 0x7e; -1.5 -> 0xbc; 2^-5 -> 0x10; 20 -> 0x5a; 3.5 -> 0x46; -0.25 -> 0xa8;
     * 0.5 -> 0x30; 0 -> 0x00 */
    const uint8_t want_t[] = {0x7e, 0xbc, 0x10, 0x5a, 0x46, 0xa8, 0x30, 0x00};
    assert_memory_equal(q, want_t, 8);

    const float w2[] = {448.0f, -3.0f, 0.0625f, 40.0f, 7.0f, -0.5f, 1.0f, 0.0f};
    assert_int_equal(rlb__quant_fp8_rows(w2, RLB_DTYPE_F32, 2, 4, q, s), 0);
    assert_true(s[0] == 1.0f && s[1] == 7.0f / 448.0f);
    /* row 0: 448, -3 (0xc4), 2^-4 (0x18), 40 (0x62); row 1 / (1/64): 448, -32 (0xe0), 64
     * (0x68), 0 */
    const uint8_t want_r[] = {0x7e, 0xc4, 0x18, 0x62, 0x7e, 0xe0, 0x68, 0x00};
    assert_memory_equal(q, want_r, 8);

    const float zeros[3] = {0};
    assert_int_equal(rlb__quant_fp8_tensor(zeros, RLB_DTYPE_F32, 1, 3, q, s), 0);
    assert_true(s[0] == 0.0f);
    assert_int_equal(q[0] | q[1] | q[2], 0);
}

static uint64_t rng_next(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* max |w[i]| over n values, NaN left out */
static float ref_amax(const float *w, int n)
{
    float m = 0.0f;
    for (int i = 0; i < n; i++)
        if (!isnan(w[i]) && fabsf(w[i]) > m)
            m = fabsf(w[i]);
    return m;
}

/* Random tensors with a wide dynamic range (and a NaN): per-tensor and per-channel fp8
 * against amax by hand, f32 division and the brute-force encoder. */
static void test_fp8_random(void **state)
{
    enum { R = 7, C = 93 };
    static float w[R * C];
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < R * C; i++) {
        double mag = ldexp((double)(rng_next(&seed) % 1000000) / 1e6, (int)(rng_next(&seed) % 40) - 20);
        w[i] = (float)((rng_next(&seed) & 1) ? -mag : mag);
    }
    w[5] = NAN;
    uint8_t q[R * C];
    float s[R];
    assert_int_equal(rlb__quant_fp8_rows(w, RLB_DTYPE_F32, R, C, q, s), 0);
    for (int r = 0; r < R; r++) {
        assert_true(s[r] == ref_amax(w + r * C, C) / 448.0f);
        for (int c = 0; c < C; c++)
            assert_int_equal(q[r * C + c], e4m3_brute(w[r * C + c] / s[r]));
    }
    float st;
    assert_int_equal(rlb__quant_fp8_tensor(w, RLB_DTYPE_F32, R, C, q, &st), 0);
    assert_true(st == ref_amax(w, R * C) / 448.0f);
    for (int i = 0; i < R * C; i++)
        assert_int_equal(q[i], e4m3_brute(w[i] / st));

    int8_t q8[R * C];
    assert_int_equal(rlb__quant_int8_rows(w, RLB_DTYPE_F32, R, C, q8, s), 0);
    for (int r = 0; r < R; r++) {
        assert_true(s[r] == ref_amax(w + r * C, C) / 127.0f);
        for (int c = 0; c < C; c++) {
            float x = w[r * C + c] / s[r];
            long want = isnan(x) ? 0 : lrintf(fminf(fmaxf(x, -127.0f), 127.0f));
            assert_int_equal(q8[r * C + c], want);
        }
    }
}

static void test_bad_input(void **state)
{
    float w[4] = {1, 2, 3, 4}, s[2];
    uint8_t q[4];
    int8_t q8[4];
    assert_int_equal(rlb__quant_fp8_tensor(NULL, RLB_DTYPE_F32, 1, 4, q, s), RLB_EINVAL);
    assert_int_equal(rlb__quant_fp8_rows(w, RLB_DTYPE_F32, -1, 4, q, s), RLB_EINVAL);
    assert_int_equal(rlb__quant_int8_rows(w, RLB_DTYPE_F32, 1, 4, NULL, s), RLB_EINVAL);
    assert_int_equal(rlb__quant_int8_rows(w, RLB_DTYPE_F32, 1, 4, q8, NULL), RLB_EINVAL);
    assert_int_equal(rlb__quant_int8_rows(w, RLB_DTYPE_I8, 1, 4, q8, s), RLB_EDTYPE);
    assert_int_equal(rlb__quant_fp8_rows(w, RLB_DTYPE_F8E4M3, 1, 4, q, s), RLB_EDTYPE);
    assert_int_equal(rlb__quant_fp8_tensor(w, (rlb_dtype)99, 1, 4, q, s), RLB_EDTYPE);
    /* an empty tensor is valid: nothing written but the (zero) scale */
    assert_int_equal(rlb__quant_fp8_tensor(w, RLB_DTYPE_F32, 0, 4, q, s), 0);
    assert_true(s[0] == 0.0f);
}

/* Infinite weights make an infinite per-tensor scale: inf / inf is NaN, whose sign the
 * division leaves to the hardware, so the code carries the weight's sign; finite weights
 * quantize to 0; NaN weights keep their own sign. */
static void test_fp8_nan_signs(void **state)
{
    float w[6] = {INFINITY, -INFINITY, 1.0f, -2.0f, NAN, -NAN}, st = 0.0f;
    uint8_t q[6];
    static const uint8_t want[6] = {0x7f, 0xff, 0x00, 0x80, 0x7f, 0xff};
    assert_int_equal(rlb__quant_fp8_tensor(w, RLB_DTYPE_F32, 1, 6, q, &st), 0);
    assert_true(isinf(st));
    assert_memory_equal(q, want, sizeof want);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_e4m3_boundaries), cmocka_unit_test(test_e4m3_sweep),
        cmocka_unit_test(test_e4m3_decode),     cmocka_unit_test(test_int8_hand),
        cmocka_unit_test(test_fp8_hand),        cmocka_unit_test(test_fp8_random),
        cmocka_unit_test(test_fp8_nan_signs),   cmocka_unit_test(test_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
