/* test_cuda_digest: the GPU digest of device byte ranges (kernels/cuda/digest.h) against a
 * plain C implementation of its definition, written here again from the header's text:
 *   - ranges of every tail length (0, 1, 7, 8, 9, 15, 16, 17 bytes, 4095, 64 KiB + 3,
 *     8 MiB + 5) at start offsets 0, 1, 3 and 8 in a buffer of random bytes, all in one
 *     call and one by one;
 *   - a byte changed in the middle or at the end, and two words swapped, change lo and hi
 *     (and give the reference's new digest); the same bytes elsewhere give the same digest;
 *   - n = 0 does nothing, NULL arrays and a NULL range with bytes are refused;
 *   - the achieved GB/s over 1 GiB of 8 MiB ranges, aligned and not (printed).
 * Exits 77 where no GPU is visible.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/clock.h"
#include "kernels/cuda/digest.h"
#include "tests/gpu/gpu_case.h"

#define N_LENS 11
#define N_OFFS 4
#define N_RANGES (N_LENS * N_OFFS)

static const uint64_t k_lens[N_LENS] = {0, 1, 7, 8, 9, 15, 16, 17, 4095, 65536 + 3,
                                        (8u << 20) + 5};
static const uint64_t k_offs[N_OFFS] = {0, 1, 3, 8};

/* The test ranges: one device buffer of random bytes and its host copy. */
static uint8_t *g_dev, *g_host;
static uint64_t g_size;                 /* bytes of the buffer */
static uint64_t g_at[N_RANGES];         /* where range i starts in the buffer */
static const void *g_ptr[N_RANGES];     /* device address of range i */
static uint64_t g_len[N_RANGES];        /* bytes of range i */
static uint64_t g_ref[2 * N_RANGES];    /* reference digests of the unchanged buffer */

static uint64_t ref_splitmix(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The definition of digest.h, word by word, the little-endian order spelled out. */
static void ref_digest(const uint8_t *b, uint64_t len, uint64_t out[2])
{
    uint64_t lo = 0, hi = 0;
    for (uint64_t k = 0; 8 * k < len; k++) {
        uint64_t w = 0;
        for (int i = 7; i >= 0; i--)
            w = w << 8 | (8 * k + (uint64_t)i < len ? b[8 * k + (uint64_t)i] : 0);
        lo += ref_splitmix(w ^ (k * 0xD1B54A32D192ED03ull));
        hi += ref_splitmix(ref_splitmix(w) + k);
    }
    out[0] = len ^ lo;
    out[1] = len * 0x9E3779B97F4A7C15ull + hi;
}

static int setup(void **state)
{
    (void)state;
    uint64_t s = 4242;
    g_size = 0;
    for (int l = 0; l < N_LENS; l++)
        for (int o = 0; o < N_OFFS; o++) {
            const int i = l * N_OFFS + o;
            g_at[i] = (g_size + 255) / 256 * 256 + k_offs[o];
            g_len[i] = k_lens[l];
            g_size = g_at[i] + g_len[i];
        }
    g_host = malloc(g_size);
    if (!g_host || cudaMalloc((void **)&g_dev, g_size) != cudaSuccess)
        return -1;
    for (uint64_t i = 0; i < g_size; i += 8) {
        uint64_t r = gc_rng(&s);
        memcpy(g_host + i, &r, g_size - i < 8 ? g_size - i : 8);
    }
    if (cudaMemcpy(g_dev, g_host, g_size, cudaMemcpyHostToDevice) != cudaSuccess)
        return -1;
    for (int i = 0; i < N_RANGES; i++) {
        g_ptr[i] = g_dev + g_at[i];
        ref_digest(g_host + g_at[i], g_len[i], &g_ref[2 * i]);
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    cudaFree(g_dev);
    free(g_host);
    return 0;
}

static void expect_digest(const char *what, int i, const uint64_t got[2], const uint64_t want[2])
{
    if (got[0] != want[0] || got[1] != want[1])
        fail_msg("%s: range %d (%llu bytes at offset %llu): GPU %016llx %016llx, reference "
                 "%016llx %016llx", what, i, (unsigned long long)g_len[i],
                 (unsigned long long)(g_at[i] % 256), (unsigned long long)got[0],
                 (unsigned long long)got[1], (unsigned long long)want[0],
                 (unsigned long long)want[1]);
}

static void test_all_ranges(void **state)
{
    (void)state;
    uint64_t out[2 * N_RANGES];
    memset(out, 0xcc, sizeof out);
    assert_int_equal(rlb__cuda_digest(g_ptr, g_len, N_RANGES, out, 0), 0);
    for (int i = 0; i < N_RANGES; i++)
        expect_digest("one call", i, &out[2 * i], &g_ref[2 * i]);
    for (int i = 0; i < N_RANGES; i++) {
        uint64_t one[2] = {~0ull, ~0ull};
        assert_int_equal(rlb__cuda_digest(&g_ptr[i], &g_len[i], 1, one, 0), 0);
        expect_digest("alone", i, one, &g_ref[2 * i]);
    }
}

/* Writes bytes [at, at + n) of the host copy to the device buffer. */
static void push(uint64_t at, uint64_t n)
{
    CHECK_CUDA(cudaMemcpy(g_dev + at, g_host + at, n, cudaMemcpyHostToDevice));
}

/* Range i after the edit now in the host copy (bytes [at, at + n) of the buffer): the
 * reference's digest, different from the unchanged one in both halves. */
static void expect_changed(const char *what, int i, uint64_t at, uint64_t n)
{
    uint64_t got[2], want[2];
    push(at, n);
    assert_int_equal(rlb__cuda_digest(&g_ptr[i], &g_len[i], 1, got, 0), 0);
    ref_digest(g_host + g_at[i], g_len[i], want);
    expect_digest(what, i, got, want);
    if (got[0] == g_ref[2 * i] || got[1] == g_ref[2 * i + 1])
        fail_msg("%s: range %d keeps half of its digest", what, i);
}

static void swap_words(uint64_t a, uint64_t b)
{
    uint8_t t[8];
    memcpy(t, g_host + a, 8);
    memcpy(g_host + a, g_host + b, 8);
    memcpy(g_host + b, t, 8);
}

static void test_changes(void **state)
{
    (void)state;
    for (int i = 0; i < N_RANGES; i++) {
        const uint64_t len = g_len[i], at = g_at[i];
        if (len < 17)
            continue;
        const uint64_t pos[2] = {at + len / 2, at + len - 1}; /* middle and last byte */
        for (int p = 0; p < 2; p++) {
            g_host[pos[p]] ^= 0x01;
            expect_changed(p ? "last byte changed" : "middle byte changed", i, pos[p], 1);
            g_host[pos[p]] ^= 0x01;
            push(pos[p], 1);
        }
        /* neighbouring whole words in the middle, then the first and the last whole word */
        const uint64_t m = at + (len / 8 - 2) / 2 * 8, last = at + (len / 8 - 1) * 8;
        const uint64_t pair[2][2] = {{m, m + 8}, {at, last}};
        for (int p = 0; p < 2; p++) {
            assert_memory_not_equal(g_host + pair[p][0], g_host + pair[p][1], 8);
            swap_words(pair[p][0], pair[p][1]);
            expect_changed("words swapped", i, at, len);
            swap_words(pair[p][0], pair[p][1]);
            push(at, len);
        }
        uint64_t back[2];
        assert_int_equal(rlb__cuda_digest(&g_ptr[i], &g_len[i], 1, back, 0), 0);
        expect_digest("restored", i, back, &g_ref[2 * i]);
    }
}

static void test_other_address(void **state)
{
    (void)state;
    const int i = N_RANGES - 2; /* 8 MiB + 5 bytes at offset 3 */
    const uint64_t len = g_len[i];
    uint8_t *copy;
    cudaStream_t st;
    CHECK_CUDA(cudaMalloc((void **)&copy, len + 64));
    CHECK_CUDA(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    const uint64_t offs[4] = {0, 5, 8, 16};
    for (int o = 0; o < 4; o++) {
        uint64_t got[2];
        const void *p = copy + offs[o];
        CHECK_CUDA(cudaMemcpyAsync(copy + offs[o], g_ptr[i], len, cudaMemcpyDeviceToDevice, st));
        assert_int_equal(rlb__cuda_digest(&p, &len, 1, got, st), 0); /* ordered after it */
        expect_digest("moved", i, got, &g_ref[2 * i]);
    }
    CHECK_CUDA(cudaStreamDestroy(st));
    CHECK_CUDA(cudaFree(copy));
}

static void test_refusals(void **state)
{
    (void)state;
    uint64_t out[4] = {1, 2, 3, 4};
    const void *p[2] = {g_ptr[0], NULL};
    uint64_t len[2] = {8, 0};
    assert_int_equal(rlb__cuda_digest(NULL, NULL, 0, NULL, 0), 0);
    assert_int_equal(rlb__cuda_digest(NULL, len, 2, out, 0), RLB_EINVAL);
    assert_int_equal(rlb__cuda_digest(p, NULL, 2, out, 0), RLB_EINVAL);
    assert_int_equal(rlb__cuda_digest(p, len, 2, NULL, 0), RLB_EINVAL);
    assert_int_equal(rlb__cuda_digest(p, len, 2, out, 0), 0); /* a NULL range of 0 bytes */
    assert_true(out[2] == 0 && out[3] == 0);
    len[1] = 1;
    assert_int_equal(rlb__cuda_digest(p, len, 2, out, 0), RLB_EINVAL);
}

/* Not a check: 128 ranges of 8 MiB in one call, the call's wall time, best of 5. */
static void test_throughput(void **state)
{
    (void)state;
    enum { N = 128 };
    const uint64_t each = 8u << 20;
    uint8_t *buf;
    const void *p[N];
    uint64_t len[N], out[2 * N];
    CHECK_CUDA(cudaMalloc((void **)&buf, N * each + 64));
    CHECK_CUDA(cudaMemset(buf, 0x3c, N * each + 64));
    for (int shift = 0; shift < 2; shift++) {
        double best = 1e30;
        for (int i = 0; i < N; i++) {
            p[i] = buf + (uint64_t)i * each + (uint64_t)shift;
            len[i] = each;
        }
        for (int r = 0; r < 5; r++) {
            double t0 = rlb__clock_s();
            assert_int_equal(rlb__cuda_digest(p, len, N, out, 0), 0);
            double t = rlb__clock_s() - t0;
            best = t < best ? t : best;
        }
        printf("digest of %d x 8 MiB, %s: %.3f ms, %.0f GB/s (one read of each byte)\n", N,
               shift ? "starts off alignment" : "16-byte aligned", best * 1e3,
               (double)N * (double)each / best / 1e9);
    }
    CHECK_CUDA(cudaFree(buf));
}

int main(void)
{
    if (!gc_have_gpu()) {
        fprintf(stderr, "test_cuda_digest: no GPU visible, skipping\n");
        return GC_SKIP;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_all_ranges),
        cmocka_unit_test(test_changes),
        cmocka_unit_test(test_other_address),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_throughput),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
