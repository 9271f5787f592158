/* test_convert: kernels/cpu/convert.h against the independent reference in ref_convert.h.
 *
 * Every one of the 65536 bf16 and f16 inputs is decoded and re-encoded; f32 -> bf16 / f16
 * is checked on hand-picked edges (ties to even, subnormal boundaries, overflow, NaN, inf,
 * signed zeros) and on millions of random f32 values, half of them drawn from the f16
 * range where the interesting rounding happens.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#include <cmocka.h>

#include "kernels/cpu/convert.h"
#include "tests/unit/ref_convert.h"

typedef struct fmt16 {
    const char *name;
    int ebits, mbits;
    float (*to_f32)(uint16_t);
    uint16_t (*from_f32)(float);
} fmt16;

static const fmt16 formats[] = {
    {"bf16", REF_BF16_E, REF_BF16_M, rlb__bf16_to_f32, rlb__f32_to_bf16},
    {"f16", REF_F16_E, REF_F16_M, rlb__f16_to_f32, rlb__f32_to_f16},
};

static int is_nan16(uint16_t h, const fmt16 *f)
{
    uint16_t emask = (uint16_t)(((1u << f->ebits) - 1) << f->mbits);
    return (h & emask) == emask && (h & ((1u << f->mbits) - 1));
}

static uint16_t quiet_bit16(const fmt16 *f)
{
    return (uint16_t)(1u << (f->mbits - 1));
}

/* One f32 -> 16-bit conversion against the reference; NaN must stay a quiet NaN of the
 * same sign. Returns 1 when it matches (and prints the first mismatches). */
static int check_encode(const fmt16 *f, uint32_t bits)
{
    float x = ref_f32_of_bits(bits);
    uint16_t got = f->from_f32(x);
    if (isnan(x)) {
        int ok = is_nan16(got, f) && (got & quiet_bit16(f)) && (got >> 15) == (bits >> 31);
        if (!ok)
            print_error("%s: NaN 0x%08x -> 0x%04x, not a quiet NaN of that sign\n", f->name,
                        bits, got);
        return ok;
    }
    uint16_t want = ref_encode16(x, f->ebits, f->mbits);
    if (got != want)
        print_error("%s: f32 0x%08x (%a) -> 0x%04x, reference 0x%04x\n", f->name, bits,
                    (double)x, got, want);
    return got == want;
}

static void test_decode_all_16bit(void **state)
{
    (void)state;
    for (size_t k = 0; k < sizeof formats / sizeof formats[0]; k++) {
        const fmt16 *f = &formats[k];
        for (uint32_t h = 0; h < 65536; h++) {
            float got = f->to_f32((uint16_t)h);
            double want = ref_decode16((uint16_t)h, f->ebits, f->mbits);
            if (isnan(want)) {
                /* NaN: stays NaN, sign and payload kept (widening may keep a signaling
                 * NaN signaling, as a plain bit shift does on the GPU). */
                uint32_t gb = ref_bits_of_f32(got);
                assert_true(isnan(got));
                assert_int_equal(gb >> 31, h >> 15);
                uint32_t payload = h & ((1u << f->mbits) - 1) & ~(uint32_t)quiet_bit16(f);
                assert_int_equal((gb >> (23 - f->mbits)) & ((1u << f->mbits) - 1) & payload,
                                 payload);
                /* back to 16 bits: a quiet NaN of the same sign */
                uint16_t back = f->from_f32(got);
                assert_true(is_nan16(back, f) && (back & quiet_bit16(f)));
                assert_int_equal(back >> 15, h >> 15);
                continue;
            }
            if ((double)got != want || !signbit(got) != !signbit(want))
                fail_msg("%s 0x%04x -> %a, reference %a", f->name, h, (double)got, want);
            /* every finite value and infinity round-trips bit for bit */
            assert_int_equal(f->from_f32(got), h);
        }
    }
}

static void test_encode_edges(void **state)
{
    (void)state;
    static const uint32_t edges[] = {
        0x00000000u, 0x80000000u, /* signed zeros */
        0x00000001u, 0x80000001u, 0x007fffffu, 0x00800000u, /* f32 subnormals, FLT_MIN */
        0x7f7fffffu, 0xff7fffffu, 0x7f800000u, 0xff800000u, /* FLT_MAX, infinities */
        0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fbfffffu, /* NaNs, quiet+sig */
        0x3f808000u, 0x3f818000u, 0x3f808001u, 0x3f807fffu, /* bf16 ties around 1.0 */
        0x7f7f8000u, 0x7f7f7fffu, /* bf16: rounds to inf / to max */
        0x00008000u, 0x00018000u, 0x00010000u, /* bf16 subnormal ties */
        0x3f801000u, 0x3f803000u, 0x3f801001u, /* f16 ties around 1.0 (2^-11 ulp/2) */
        0x477fe000u, 0x477fefffu, 0x477ff000u, 0x477ff001u, 0x47800000u, /* 65504..65536 */
        0x33800000u, 0x33000000u, 0x33000001u, 0x32ffffffu, /* 2^-24, 2^-25 tie, around */
        0x33c00000u, 0x34200000u, 0x38800000u, 0x387fc000u, 0x387fe000u, 0x387ff000u,
        0x38000000u, 0x37800000u, /* f16 subnormal/normal boundary and ties */
        0xc77ff000u, 0xb3000000u, 0xb3000001u, /* negative mirrors */
    };
    for (size_t k = 0; k < sizeof formats / sizeof formats[0]; k++)
        for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++)
            assert_true(check_encode(&formats[k], edges[i]));
    /* A few values worked by hand, so the reference itself is pinned. */
    assert_int_equal(rlb__f32_to_bf16(1.0f), 0x3f80);
    assert_int_equal(rlb__f32_to_bf16(ref_f32_of_bits(0x3f808000u)), 0x3f80); /* tie: even */
    assert_int_equal(rlb__f32_to_bf16(ref_f32_of_bits(0x3f818000u)), 0x3f82); /* tie: even */
    assert_int_equal(rlb__f32_to_f16(65504.0f), 0x7bff);
    assert_int_equal(rlb__f32_to_f16(65520.0f), 0x7c00);                    /* tie -> inf */
    assert_int_equal(rlb__f32_to_f16(ref_f32_of_bits(0x33000000u)), 0x0000); /* 2^-25 -> 0 */
    assert_int_equal(rlb__f32_to_f16(ref_f32_of_bits(0x33000001u)), 0x0001);
    assert_int_equal(rlb__f32_to_f16(-2.0f), 0xc000);
    assert_int_equal(ref_encode16(1.0, REF_F16_E, REF_F16_M), 0x3c00);
    assert_int_equal(ref_encode16(ldexp(1, -24), REF_F16_E, REF_F16_M), 0x0001);
    assert_int_equal(ref_encode16(ldexp(1, -14), REF_F16_E, REF_F16_M), 0x0400);
}

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static void test_encode_random(void **state)
{
    (void)state;
    uint64_t s = 12345;
    unsigned bad = 0;
    for (int i = 0; i < 2000000 && bad < 10; i++) {
        uint64_t r = rng_next(&s);
        uint32_t any = (uint32_t)r;
        /* sign, exponent 2^-27 .. 2^17 (around f16's range), random mantissa */
        uint32_t exp = 100u + (uint32_t)((r >> 32) % 45u);
        uint32_t near16 = (uint32_t)(r >> 63) << 31 | exp << 23 | ((uint32_t)(r >> 8) & 0x7fffffu);
        for (size_t k = 0; k < sizeof formats / sizeof formats[0]; k++) {
            bad += !check_encode(&formats[k], any);
            bad += !check_encode(&formats[k], near16);
        }
    }
    assert_int_equal(bad, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_all_16bit),
        cmocka_unit_test(test_encode_edges),
        cmocka_unit_test(test_encode_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
