/* test_engine_sample: the sampler (kernels/cpu/sample.c) against brute force on small
 * vocabularies.
 *   - top-k / top-p: the kept set equals one computed here the slow way from the
 *     definitions in sample.h (sort everything, count the mass above each token in double),
 *     over thousands of random cases with many tied logits; top_p values that fall within
 *     1e-4 of a cumulative mass are nudged, since float and double may round them apart;
 *   - the sampled token is always in the kept set, its logprob is log_softmax(z) over the
 *     whole vocabulary (double reference), greedy takes the first largest logit;
 *   - frequencies over 40000 draws (positions 0..39999, fixed seed: deterministic, so not
 *     flaky) match softmax of the kept tokens within 0.012 (about 5 standard deviations of
 *     the largest probability's estimate);
 *   - the same (seed, sample, position) draws the same token, other sample indices differ;
 *   - the race's skipped logs change nothing: the token equals the race with every log
 *     (small vocabularies with filters, and 32K ones);
 *   - non-finite logits follow sample.h: NaN is never sampled, +inf tokens share the mass
 *     equally (logprob -log(count)), a row with nothing finite gives RLB_ENONFINITE;
 *   - bad parameters are refused.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cpu/noise.h"
#include "kernels/cpu/sample.h"
#include "rlb/rlb.h"

#define MAXV 64

static uint64_t rng_state = 88172645463325252ull;

static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static double rng_unit(void)
{
    return (double)(rng() >> 11) * 0x1.0p-53;
}

/* The kept set straight from the definitions; returns how many. */
static int ref_filter(const float *logits, int V, const rlb_sampling *sp, uint8_t *keep)
{
    float z[MAXV];
    for (int i = 0; i < V; i++)
        z[i] = logits[i] / sp->temperature;
    for (int i = 0; i < V; i++) {
        /* top-k: fewer than k tokens have a strictly larger z. */
        int larger = 0;
        for (int j = 0; j < V; j++)
            larger += z[j] > z[i];
        keep[i] = sp->top_k <= 0 || sp->top_k >= V || larger < sp->top_k;
    }
    if (sp->top_p < 1.0f) {
        double zmax = -INFINITY, mass = 0.0, above[MAXV];
        for (int i = 0; i < V; i++)
            zmax = keep[i] && z[i] > zmax ? z[i] : zmax;
        for (int i = 0; i < V; i++)
            mass += keep[i] ? exp((double)z[i] - zmax) : 0.0;
        for (int i = 0; i < V; i++) {
            above[i] = 0.0;
            for (int j = 0; j < V; j++)
                if (keep[j] && (z[j] > z[i] || (z[j] == z[i] && j < i)))
                    above[i] += exp((double)z[j] - zmax) / mass;
        }
        for (int i = 0; i < V; i++)
            keep[i] = keep[i] && above[i] < sp->top_p;
    }
    int n = 0;
    for (int i = 0; i < V; i++)
        n += keep[i];
    return n;
}

/* 1 when top_p lies within 1e-4 of the cumulative kept mass above some token, where the
 * float and double roundings may disagree. */
static int near_boundary(const float *logits, int V, const rlb_sampling *sp)
{
    rlb_sampling all = *sp;
    all.top_p = 1.0f;
    uint8_t keep[MAXV];
    ref_filter(logits, V, &all, keep);
    double zmax = -INFINITY, mass = 0.0;
    for (int i = 0; i < V; i++)
        if (keep[i] && logits[i] / sp->temperature > zmax)
            zmax = logits[i] / sp->temperature;
    for (int i = 0; i < V; i++)
        mass += keep[i] ? exp((double)(logits[i] / sp->temperature) - zmax) : 0.0;
    for (int i = 0; i < V; i++) {
        double above = 0.0;
        float zi = logits[i] / sp->temperature;
        for (int j = 0; j < V; j++) {
            float zj = logits[j] / sp->temperature;
            if (keep[j] && (zj > zi || (zj == zi && j < i)))
                above += exp((double)zj - zmax) / mass;
        }
        if (keep[i] && fabs(above - sp->top_p) < 1e-4)
            return 1;
    }
    return 0;
}

static void random_case(float *logits, int *V, rlb_sampling *sp)
{
    *V = 1 + (int)(rng() % MAXV);
    int ties = rng() % 2; /* integer logits: many ties */
    for (int i = 0; i < *V; i++)
        logits[i] = ties ? (float)(rng() % 5) : (float)(rng_unit() * 8.0 - 4.0);
    sp->temperature = 0.25f + (float)rng_unit() * 1.75f;
    sp->top_k = rng() % 3 == 0 ? 0 : (int32_t)(rng() % (uint64_t)(*V + 2));
    sp->top_p = rng() % 3 == 0 ? 1.0f : 0.05f + (float)rng_unit() * 0.95f;
    sp->seed = rng();
}

static double ref_logprob(const float *logits, int V, float T, int tok)
{
    double zmax = -INFINITY, sum = 0.0;
    for (int i = 0; i < V; i++)
        zmax = logits[i] / T > zmax ? logits[i] / T : zmax;
    for (int i = 0; i < V; i++)
        sum += exp((double)(logits[i] / T) - zmax);
    return (double)(logits[tok] / T) - zmax - log(sum);
}

/* The race from its definition, every token's log taken: the first token with the largest
 * p / -log(u) among the kept (p = expf(z - max z) as the sampler computes it). */
static int32_t ref_race(const float *logits, int64_t V, const rlb_sampling *sp,
                        const uint8_t *keep, uint64_t sample, int64_t pos)
{
    float zmax = -INFINITY;
    for (int64_t i = 0; i < V; i++)
        zmax = logits[i] / sp->temperature > zmax ? logits[i] / sp->temperature : zmax;
    const uint64_t prefix = rlb__noise_prefix(sp->seed, sample, pos);
    double best = -1.0;
    int32_t tok = -1;
    for (int64_t i = 0; i < V; i++) {
        if (keep && !keep[i])
            continue;
        const float p = expf(logits[i] / sp->temperature - zmax);
        const double score =
            (double)p / -log(rlb__bits_to_uniform(rlb__noise_token(prefix, i)));
        if (score > best) {
            best = score;
            tok = (int32_t)i;
        }
    }
    return tok;
}

static void test_filter_brute_force(void **state)
{
    (void)state;
    rlb_sample_ws ws = {0};
    int checked = 0;
    for (int it = 0; it < 5000; it++) {
        float logits[MAXV];
        int V;
        rlb_sampling sp;
        random_case(logits, &V, &sp);
        while (near_boundary(logits, V, &sp))
            sp.top_p = sp.top_p > 0.5f ? sp.top_p - 0.013f : sp.top_p + 0.017f;
        uint8_t keep[MAXV], ref[MAXV];
        int64_t n = rlb__sample_filter(logits, V, &sp, &ws, keep);
        int n_ref = ref_filter(logits, V, &sp, ref);
        assert_int_equal(n, n_ref);
        assert_memory_equal(keep, ref, (size_t)V);
        assert_true(n >= 1);
        int32_t tok;
        float lp;
        assert_int_equal(rlb__sample_token(logits, V, &sp, (uint64_t)it % 3, it, &ws, &tok, &lp),
                         0);
        assert_true(tok >= 0 && tok < V && ref[tok]);
        assert_int_equal(tok, ref_race(logits, V, &sp, ref, (uint64_t)it % 3, it));
        assert_true(fabs(lp - ref_logprob(logits, V, sp.temperature, tok)) <= 1e-5);
        checked++;
    }
    assert_int_equal(checked, 5000);
    rlb__sample_ws_free(&ws);
}

/* The sampler skips the log where p / (1 - u) cannot win: the same tokens as the race with
 * every log on 32K vocabularies of flat and of peaked logits (test_filter_brute_force
 * checks the small ones, with filters). */
static void test_race_skips_nothing(void **state)
{
    (void)state;
    rlb_sample_ws ws = {0};
    enum { BIG = 32768 };
    float *big = malloc(BIG * sizeof *big);
    assert_non_null(big);
    for (int it = 0; it < 60; it++) {
        const double spread = it % 3 == 0 ? 0.1 : it % 3 == 1 ? 4.0 : 30.0;
        for (int i = 0; i < BIG; i++)
            big[i] = (float)((rng_unit() * 2.0 - 1.0) * spread);
        rlb_sampling sp = {.temperature = 0.5f + (float)rng_unit(), .top_p = 1.0f,
                           .seed = rng()};
        int32_t tok;
        float lp;
        assert_int_equal(rlb__sample_token(big, BIG, &sp, 0, it, &ws, &tok, &lp), 0);
        assert_int_equal(tok, ref_race(big, BIG, &sp, NULL, 0, it));
    }
    free(big);
    rlb__sample_ws_free(&ws);
}

static void test_greedy(void **state)
{
    (void)state;
    rlb_sample_ws ws = {0};
    float logits[6] = {0.5f, 2.0f, -1.0f, 2.0f, 1.5f, 2.0f};
    rlb_sampling sp = {.temperature = 0.0f, .top_p = 1.0f, .seed = 7};
    int32_t tok;
    float lp;
    for (int64_t pos = 0; pos < 20; pos++) {
        assert_int_equal(rlb__sample_token(logits, 6, &sp, 0, pos, &ws, &tok, &lp), 0);
        assert_int_equal(tok, 1); /* the first of the tied maxima */
    }
    assert_true(fabs(lp - ref_logprob(logits, 6, 1.0f, 1)) <= 1e-6);
    /* Temperatures up to the epsilon are greedy too. */
    sp.temperature = RLB_SAMPLE_GREEDY_EPS;
    assert_int_equal(rlb__sample_token(logits, 6, &sp, 3, 99, &ws, &tok, &lp), 0);
    assert_int_equal(tok, 1);
    uint8_t keep[6];
    assert_int_equal(rlb__sample_filter(logits, 6, &sp, &ws, keep), 1);
    assert_int_equal(keep[1], 1);
    rlb__sample_ws_free(&ws);
}

/* Draws at positions 0..draws-1 and compares frequencies with softmax over `kept`. */
static void check_frequencies(const float *logits, int V, const rlb_sampling *sp,
                              const uint8_t *kept)
{
    enum { DRAWS = 40000 };
    rlb_sample_ws ws = {0};
    int counts[MAXV] = {0};
    for (int64_t pos = 0; pos < DRAWS; pos++) {
        int32_t tok;
        float lp;
        assert_int_equal(rlb__sample_token(logits, V, sp, 1, pos, &ws, &tok, &lp), 0);
        counts[tok]++;
    }
    double sum = 0.0;
    for (int i = 0; i < V; i++)
        sum += kept[i] ? exp((double)(logits[i] / sp->temperature)) : 0.0;
    for (int i = 0; i < V; i++) {
        double p = kept[i] ? exp((double)(logits[i] / sp->temperature)) / sum : 0.0;
        assert_true(fabs((double)counts[i] / DRAWS - p) <= 0.012);
        if (!kept[i])
            assert_int_equal(counts[i], 0);
    }
    rlb__sample_ws_free(&ws);
}

static void test_distribution(void **state)
{
    (void)state;
    float logits[5] = {1.0f, 0.0f, 2.0f, -1.0f, 0.5f};
    rlb_sampling sp = {.temperature = 1.0f, .top_p = 1.0f, .seed = 12345};
    uint8_t all[5] = {1, 1, 1, 1, 1};
    check_frequencies(logits, 5, &sp, all);
    sp.temperature = 0.7f;
    sp.top_k = 2;
    uint8_t top2[5] = {1, 0, 1, 0, 0};
    check_frequencies(logits, 5, &sp, top2);
    /* softmax at T = 1: .207 .076 .563 .028 .126; top_p .75 keeps ids 2 and 0 (id 4 has
     * .770 above it). */
    sp.temperature = 1.0f;
    sp.top_k = 0;
    sp.top_p = 0.75f;
    check_frequencies(logits, 5, &sp, top2);
}

static void test_noise_keys(void **state)
{
    (void)state;
    rlb_sample_ws ws = {0};
    float logits[32];
    for (int i = 0; i < 32; i++)
        logits[i] = 0.0f; /* uniform: the noise alone decides */
    rlb_sampling sp = {.temperature = 1.0f, .top_p = 1.0f, .seed = 99};
    int differ = 0;
    for (int64_t pos = 0; pos < 200; pos++) {
        int32_t a, b, c;
        float lp;
        assert_int_equal(rlb__sample_token(logits, 32, &sp, 0, pos, &ws, &a, &lp), 0);
        assert_int_equal(rlb__sample_token(logits, 32, &sp, 0, pos, &ws, &b, &lp), 0);
        assert_int_equal(rlb__sample_token(logits, 32, &sp, 1, pos, &ws, &c, &lp), 0);
        assert_int_equal(a, b);
        differ += a != c;
    }
    /* Independent streams agree 1/32 of the time. */
    assert_true(differ > 170);
    for (int64_t t = 0; t < 1000; t++) {
        double u = rlb__noise_uniform(1, 2, 3, t);
        assert_true(u > 0.0 && u < 1.0);
    }
    assert_true(rlb__noise_bits(1, 2, 3, 4) != rlb__noise_bits(1, 2, 4, 3));
    rlb__sample_ws_free(&ws);
}

static void test_refusals(void **state)
{
    (void)state;
    rlb_sample_ws ws = {0};
    float logits[4] = {0.0f, 1.0f, 2.0f, 3.0f};
    int32_t tok;
    float lp;
    rlb_sampling ok = {.temperature = 1.0f, .top_p = 1.0f};
    rlb_sampling bad[] = {
        {.temperature = -1.0f, .top_p = 1.0f},
        {.temperature = NAN, .top_p = 1.0f},
        {.temperature = INFINITY, .top_p = 1.0f},
        {.temperature = 1.0f, .top_p = 0.0f},
        {.temperature = 1.0f, .top_p = 1.5f},
        {.temperature = 1.0f, .top_p = NAN},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(rlb__sampling_check(&bad[i]), RLB_EINVAL);
        assert_int_equal(rlb__sample_token(logits, 4, &bad[i], 0, 0, &ws, &tok, &lp),
                         RLB_EINVAL);
    }
    assert_int_equal(rlb__sample_token(logits, 0, &ok, 0, 0, &ws, &tok, &lp), RLB_EINVAL);
    rlb__sample_ws_free(&ws);
}

/* Poisoned logits: NaN is never drawn, +inf tokens share the mass equally, nothing finite
 * is RLB_ENONFINITE; greedy, top-k and top-p keep to the same rules. */
static void test_non_finite(void **state)
{
    (void)state;
    rlb_sample_ws ws = {0};
    enum { V = 16, DRAWS = 4000 };
    float logits[V];
    int32_t tok;
    float lp;
    rlb_sampling greedy = {.temperature = 0.0f, .top_p = 1.0f};
    rlb_sampling warm = {.temperature = 1.0f, .top_p = 1.0f, .seed = 5};
    rlb_sampling topk = {.temperature = 0.8f, .top_k = 3, .top_p = 1.0f, .seed = 6};
    rlb_sampling topp = {.temperature = 1.0f, .top_p = 0.5f, .seed = 7};
    const rlb_sampling *all[] = {&greedy, &warm, &topk, &topp};

    /* NaN at the would-be argmax and elsewhere: never sampled, logprobs stay finite. */
    for (int i = 0; i < V; i++)
        logits[i] = (float)(i % 5);
    logits[4] = NAN;
    logits[9] = NAN;
    logits[14] = 100.0f;
    logits[14] = NAN;
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        for (int64_t pos = 0; pos < DRAWS / 10; pos++) {
            assert_int_equal(rlb__sample_token(logits, V, all[k], 0, pos, &ws, &tok, &lp), 0);
            assert_true(tok != 4 && tok != 9 && tok != 14);
            assert_true(isfinite(lp) && lp <= 0.0f);
        }
    assert_int_equal(rlb__sample_token(logits, V, &greedy, 0, 0, &ws, &tok, &lp), 0);
    assert_true(logits[tok] == 3.0f);

    /* Two +inf tokens: only they are drawn, about equally, each with logprob -log 2. */
    for (int i = 0; i < V; i++)
        logits[i] = (float)i;
    logits[3] = INFINITY;
    logits[11] = INFINITY;
    logits[7] = NAN;
    int hits[V] = {0};
    for (int64_t pos = 0; pos < DRAWS; pos++) {
        assert_int_equal(rlb__sample_token(logits, V, &warm, 0, pos, &ws, &tok, &lp), 0);
        assert_true(tok == 3 || tok == 11);
        assert_true(fabsf(lp + logf(2.0f)) < 1e-6f);
        hits[tok]++;
    }
    assert_true(abs(hits[3] - DRAWS / 2) < DRAWS / 20);
    assert_int_equal(rlb__sample_token(logits, V, &greedy, 0, 0, &ws, &tok, &lp), 0);
    assert_int_equal(tok, 3);
    /* top-k 3 keeps the ties at the third z (-inf, no mass): still only 3 and 11 drawn. */
    for (int64_t pos = 0; pos < DRAWS / 10; pos++) {
        assert_int_equal(rlb__sample_token(logits, V, &topk, 0, pos, &ws, &tok, &lp), 0);
        assert_true(tok == 3 || tok == 11);
    }
    uint8_t keep[V];

    /* A finite logit that overflows at a small temperature is an +inf token. */
    for (int i = 0; i < V; i++)
        logits[i] = 0.0f;
    logits[6] = 3e38f;
    rlb_sampling cold = {.temperature = 0.01f, .top_p = 1.0f, .seed = 8};
    assert_int_equal(rlb__sample_token(logits, V, &cold, 0, 0, &ws, &tok, &lp), 0);
    assert_int_equal(tok, 6);
    assert_true(lp == 0.0f);

    /* Nothing left to sample. */
    for (int i = 0; i < V; i++)
        logits[i] = i % 2 ? NAN : -INFINITY;
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        assert_int_equal(rlb__sample_token(logits, V, all[k], 0, 0, &ws, &tok, &lp),
                         RLB_ENONFINITE);
    assert_int_equal(rlb__sample_filter(logits, V, &warm, &ws, keep), RLB_ENONFINITE);
    rlb__sample_ws_free(&ws);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_filter_brute_force),
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_race_skips_nothing),
        cmocka_unit_test(test_distribution),
        cmocka_unit_test(test_noise_keys),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_non_finite),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
