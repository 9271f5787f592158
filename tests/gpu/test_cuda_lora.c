/* test_cuda_lora: LoRA merges through the CUDA executor (kernels/cuda/lora_merge.h behind
 * kernels/executor.h), against the CPU executor on the same plan and against a naive
 * double-precision W + s * B * A computed element by element (tests/unit/lora_case.h,
 * sharing no code with the planner or either executor).
 *
 * Cases: a model wide enough for rank 64 on every adapted weight (the seven targets, the
 * embedding, an untied lm_head), sources full, FSDP2 or FSDP1 (tests/unit/lora_case.h), in
 * device memory (as a trainer's IPC-mapped tensors) or in host memory (which the executor
 * registers as mapped pinned memory), TP 1, 2 and 4, ranks 8 and 64, destinations bf16
 * (from bf16, and from f32 master weights) and f32. Each case runs two versions with new
 * adapter values over the same base, each checked: every unmerged element bit for bit
 * against the reference conversion and the CPU executor's; every merged element within
 * tol of W + s * B * A (the f32 sums' error (r + 4) 2^-23 (|W| + |s| sum |terms|), plus for
 * bf16 one rounding of the result, at most 2^-8 of it, and where the source is f32 one
 * rounding of the base, which the CUDA executor makes before merging) and within 2 tol of
 * the CPU executor's value. Then the adapters are taken out (the plan without them) and the
 * same GPU buffers must hold the base again, bit for bit; then the adapters come back.
 * Every run's non-finite count must be zero; a NaN planted in one B factor must be counted
 * by the GPU as by the CPU, merge by merge. Prints, per case, how many merged elements
 * differ in their bits from the CPU executor's (f32 roundings in another order).
 *
 * The whole matrix runs with RLB_LORA_MERGE=fused (each merged element's base read from its
 * source, the product added, written once; the product on tensor cores where the factors
 * are bf16, in f32 fused multiply-adds where they are f32); every case also checks which
 * kernel its plan's merges get (kernels/cuda/lora_merge.h: rlb__cuda_lora_mode), so no
 * case passes by falling back. test_fused_fma and test_separate run a share of the cases
 * with RLB_LORA_MERGE=fused-fma (bf16 factors too in multiply-adds) and =separate (base
 * copies, then the merge in place; also what a base staged from a GPU without a peer path
 * gets); test_gemm runs it with RLB_LORA_MERGE=gemm (the merges whose base is one bf16
 * source in whole rows as cuBLASLt products, each case checking how many), a NaN planted in
 * a base (counted from the scan a bind makes) and in a factor at rank 64. Exits 77 where no
 * GPU is visible.
 */
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/env.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/plan_exec.h"
#include "kernels/cuda/lora_merge.h"
#include "kernels/executor.h"
#include "tests/gpu/gpu_case.h"
#include "tests/unit/lora_case.h"

#define MAX_T 4

/* Where the GPU executor reads a case's sources and writes its workers' buffers. */
typedef struct gpu_side {
    int on_host;             /* sources read from the case's host buffers */
    void *src[LC_W];         /* the source addresses the executor gets */
    void *dst[MAX_T];        /* worker buffers in device memory */
    uint8_t *got[MAX_T];     /* host copies of them */
    uint8_t *want[MAX_T];    /* the CPU executor's buffers */
    uint64_t *gpu_bad, *cpu_bad; /* [n_ops + n_merges] non-finite counts of a run */
} gpu_side;

/* Brings the sources the case just wrote to where the executor reads them. */
static void put_sources(const lc_case *c, gpu_side *g)
{
    for (int b = 0; b < c->nbuf; b++) {
        if (g->on_host) {
            g->src[b] = c->buf[b];
            continue;
        }
        if (!g->src[b])
            CHECK_CUDA(cudaMalloc(&g->src[b], c->blen[b]));
        CHECK_CUDA(cudaMemcpy(g->src[b], c->buf[b], c->blen[b], cudaMemcpyHostToDevice));
    }
}

/* Runs `plan` through the CUDA executor x into g->dst and copies them back into g->got,
 * and through the CPU executor into g->want; both count non-finite values. */
static void run_both(rlb_executor *x, const rlb_plan *plan, const lc_case *c, gpu_side *g)
{
    char err[512] = "";
    int fd = eventfd(0, EFD_CLOEXEC);
    assert_true(fd >= 0);
    rlb_exec_run run = {.plan = plan, .src = g->src, .src_len = c->blen, .dst = g->dst,
                        .dst_len = plan->dst_bytes, .nonfinite = g->gpu_bad, .done_fd = fd};
    if (x->iface->run(x, &run, err, sizeof err))
        fail_msg("CUDA executor run: %s", err);
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    assert_int_equal(poll(&pf, 1, 120000), 1);
    uint64_t one;
    assert_int_equal(read(fd, &one, sizeof one), (ssize_t)sizeof one);
    double ms = -1;
    if (x->iface->finish(x, &ms, err, sizeof err))
        fail_msg("CUDA executor finish: %s", err);
    close(fd);
    for (uint32_t t = 0; t < plan->n_dst; t++) {
        cudaError_t e = cudaMemcpy(g->got[t], g->dst[t], plan->dst_bytes[t],
                                   cudaMemcpyDeviceToHost);
        if (e != cudaSuccess)
            fail_msg("copying worker buffer %u (%p, %llu bytes) back into %p after a run that "
                     "succeeded: %s", t, g->dst[t], (unsigned long long)plan->dst_bytes[t],
                     (void *)g->got[t], cudaGetErrorString(e));
    }
    if (rlb__plan_exec_cpu_counted(plan, (const void *const *)c->buf, c->blen,
                                   (void *const *)g->want, plan->dst_bytes, 0, NULL,
                                   g->cpu_bad, err, sizeof err))
        fail_msg("CPU executor: %s", err);
}

static void assert_no_nonfinite(const rlb_plan *plan, const gpu_side *g)
{
    for (uint64_t i = 0; i < plan->n_ops + plan->n_merges; i++) {
        assert_int_equal(g->gpu_bad[i], 0);
        assert_int_equal(g->cpu_bad[i], 0);
    }
}

/* Checks the merged version in g->got against the reference and g->want; returns the
 * merged elements whose bits differ from the CPU executor's. */
static uint64_t check_merged(const lc_case *c, const rlb_plan *plan, int T, rlb_dtype ddt,
                             const gpu_side *g)
{
    int base_rounded = rlb_dtype_size(c->sdt) > rlb_dtype_size(ddt);
    uint64_t differ = 0;
    for (int t = 0; t < T; t++)
        differ += lc_check_worker(c, T, t, ddt, g->got[t], 1, base_rounded, g->want[t]);
    assert_no_nonfinite(plan, g);
    return differ;
}

/* A NaN in the base of the first adapted linear weight (base 1: W(0, 0)) or in its
 * B(0, 0) (base 0), then a run: the GPU counts, merge by merge, what the CPU counts, and
 * what lands in the buffers (one merged value, or a row of B * A's). */
static void check_poisoned(rlb_executor *x, const rlb_plan *plan, lc_case *c, gpu_side *g,
                           rlb_dtype ddt, int base)
{
    int pi = 0;
    while (c->ad[pi] < 0 || c->m.p[pi].which == P_EMBED)
        pi++;
    int at = base ? pi : c->ad[pi] + 1;
    uint32_t nan_bits = c->sdt == RLB_DTYPE_F32 ? 0x7fc00000u : c->sdt == RLB_DTYPE_BF16 ? 0x7fc0u
                                                                                         : 0x7e00u;
    memcpy(c->buf[0] + c->where[at] * rlb_dtype_size(c->sdt), &nan_bits, rlb_dtype_size(c->sdt));
    put_sources(c, g);
    run_both(x, plan, c, g);
    uint64_t merged = 0, in_dst = 0;
    for (uint64_t i = 0; i < plan->n_ops; i++)
        assert_int_equal(g->gpu_bad[i], 0);
    for (uint64_t i = 0; i < plan->n_merges; i++) {
        assert_int_equal(g->gpu_bad[plan->n_ops + i], g->cpu_bad[plan->n_ops + i]);
        merged += g->gpu_bad[plan->n_ops + i];
    }
    for (uint32_t t = 0; t < plan->n_dst; t++)
        in_dst += rlb__row_nonfinite(g->got[t], plan->dst_bytes[t] / rlb_dtype_size(ddt), ddt);
    assert_int_equal(merged, base ? 1 : (uint64_t)c->t[pi].cols);
    assert_int_equal(merged, in_dst);
}

static void run_case(int qwen_tied, int mode, rlb_dtype sdt, rlb_dtype ddt, int T,
                     int64_t rank, int on_host, int poison)
{
    char what[128];
    snprintf(what, sizeof what, "%-5s %-5s %-4s -> %-4s TP %d rank %2lld %s sources%s",
             qwen_tied ? "qwen" : "llama",
             mode == LC_FULL ? "full" : mode == LC_FSDP2 ? "fsdp2" : "fsdp1", rlb_dtype_name(sdt),
             rlb_dtype_name(ddt), T, (long long)rank, on_host ? "host" : "device",
             poison == 1 ? ", a NaN planted" : poison ? ", a NaN in the base" : "");
    /* before anything runs: a failure below names its case */
    fprintf(stderr, "case: %s\n", what);
    lc_case c;
    lc_plans p;
    lc_init(&c, qwen_tied, mode, sdt, 1, rank);
    rlb_target tgt = {.tp_size = T, .replicas = 1, .dtype = ddt};
    lc_plans_build(&c, &tgt, &p);
    const rlb_plan *plan = &p.plan;
    gpu_side g = {.on_host = on_host};
    { /* the path the executor takes with this plan */
        const char *how = getenv("RLB_LORA_MERGE");
        rlb_cuda_lora *cl = NULL;
        char e[256] = "";
        if (rlb__cuda_lora_upload(plan, 0, NULL, &cl, e, sizeof e))
            fail_msg("upload: %s", e);
        assert_non_null(cl);
        assert_non_null(how); /* every test names the way */
        /* fused: tensor cores for bf16 factors */
        rlb_lora_merge_mode want = sdt == RLB_DTYPE_BF16 ? RLB_LORA_FUSED_TC : RLB_LORA_FUSED_FMA;
        uint64_t products = 0;
        if (!strcmp(how, "separate"))
            want = RLB_LORA_SEPARATE;
        else if (!strcmp(how, "fused-fma"))
            want = RLB_LORA_FUSED_FMA;
        else if (!strcmp(how, "gemm") && sdt == RLB_DTYPE_BF16 && ddt == RLB_DTYPE_BF16) {
            const long long least = rlb__env_int(RLB_KNOB_LORA_GEMM_MIN_BYTES);
            if (mode == LC_FULL || least == 0) { /* FSDP1: its runs across rows aside */
                /* full: each block's base is one piece, of the block's bytes */
                for (uint64_t i = 0; i < plan->n_merges; i++)
                    products += (long long)(plan->merges[i].rows * plan->merges[i].cols * 2) >=
                                least;
            }
            if (mode == LC_FSDP1) { /* the merges whose runs are whole rows */
                products = rlb__cuda_lora_products(cl);
                assert_true(products > 0 && products <= plan->n_merges);
            }
            want = products ? RLB_LORA_GEMM : RLB_LORA_FUSED_TC;
        }
        assert_int_equal(rlb__cuda_lora_mode(cl), want);
        assert_int_equal(rlb__cuda_lora_products(cl), products);
        if (how && !strcmp(how, "gemm"))
            printf("%s: %llu of %llu merges as cuBLASLt products\n", what,
                   (unsigned long long)products, (unsigned long long)plan->n_merges);
        rlb__cuda_lora_free(cl);
    }
    uint64_t n_counts = plan->n_ops + plan->n_merges; /* the base plan has more ops */
    n_counts = (n_counts > p.base.n_ops ? n_counts : p.base.n_ops) + 1;
    g.gpu_bad = calloc(n_counts, sizeof *g.gpu_bad);
    g.cpu_bad = calloc(n_counts, sizeof *g.cpu_bad);
    assert_non_null(g.gpu_bad);
    assert_non_null(g.cpu_bad);
    for (int t = 0; t < T; t++) {
        CHECK_CUDA(cudaMalloc(&g.dst[t], plan->dst_bytes[t]));
        CHECK_CUDA(cudaMemset(g.dst[t], GC_POISON, plan->dst_bytes[t]));
        g.got[t] = malloc(plan->dst_bytes[t]);
        g.want[t] = malloc(plan->dst_bytes[t]);
        assert_non_null(g.got[t]);
        assert_non_null(g.want[t]);
        memset(g.want[t], GC_POISON, plan->dst_bytes[t]);
    }
    char err[512] = "";
    rlb_executor *x = NULL;
    if (rlb__executor_cuda_create(&x, err, sizeof err))
        fail_msg("CUDA executor: %s", err);

    uint64_t differ = 0, merged = 0;
    for (uint64_t i = 0; i < plan->n_merges; i++)
        merged += plan->merges[i].rows * plan->merges[i].cols;
    lc_fill(&c, 1, 0);
    for (uint64_t v = 1; v <= 2; v++) {
        lc_fill(&c, 100 + v, 1); /* new adapters, same base */
        lc_write_sources(&c);
        put_sources(&c, &g);
        run_both(x, plan, &c, &g);
        differ += check_merged(&c, plan, T, ddt, &g);
    }
    /* Adapters taken out: the same GPU buffers hold the base again, bit for bit. */
    run_both(x, &p.base, &c, &g);
    for (int t = 0; t < T; t++) {
        lc_check_worker(&c, T, t, ddt, g.got[t], 0, 0, g.want[t]);
        assert_memory_equal(g.got[t], g.want[t], plan->dst_bytes[t]);
    }
    assert_no_nonfinite(&p.base, &g);
    /* And back: merged from the base, not from what the buffers held. */
    run_both(x, plan, &c, &g);
    differ += check_merged(&c, plan, T, ddt, &g);
    if (poison == 1)
        check_poisoned(x, plan, &c, &g, ddt, 0);
    if (poison == 2) { /* a new executor binds again, and scans the poisoned base */
        x->iface->destroy(x);
        if (rlb__executor_cuda_create(&x, err, sizeof err))
            fail_msg("CUDA executor: %s", err);
        check_poisoned(x, plan, &c, &g, ddt, 1);
    }
    printf("%s: %llu of %llu merged elements differ in their bits from the CPU executor's\n",
           what, (unsigned long long)differ, (unsigned long long)(3 * merged));

    x->iface->destroy(x); /* before the host sources it registered are freed */
    for (int t = 0; t < T; t++) {
        CHECK_CUDA(cudaFree(g.dst[t]));
        free(g.got[t]);
        free(g.want[t]);
    }
    for (int b = 0; b < c.nbuf && !on_host; b++)
        CHECK_CUDA(cudaFree(g.src[b]));
    free(g.gpu_bad);
    free(g.cpu_bad);
    lc_plans_free(&p);
    lc_free(&c);
}

static void test_against_cpu_and_reference(void **state)
{
    (void)state;
    assert_int_equal(setenv("RLB_LORA_MERGE", "fused", 1), 0);
    static const rlb_dtype dts[][2] = {{RLB_DTYPE_BF16, RLB_DTYPE_BF16},
                                       {RLB_DTYPE_F32, RLB_DTYPE_BF16},
                                       {RLB_DTYPE_F32, RLB_DTYPE_F32}};
    static const int64_t ranks[] = {8, 64};
    int n = 0;
    for (int mode = LC_FULL; mode <= LC_FSDP1; mode++)
        for (int T = 1; T <= MAX_T; T *= 2)
            for (size_t r = 0; r < sizeof ranks / sizeof ranks[0]; r++)
                for (size_t d = 0; d < sizeof dts / sizeof dts[0]; d++, n++)
                    run_case(n % 2, mode, dts[d][0], dts[d][1], T, ranks[r], n / 2 % 2, 0);
    unsetenv("RLB_LORA_MERGE");
}

/* A share of the cases under RLB_LORA_MERGE=how: every source layout, bf16 and f32 sources,
 * TP 1 and 2, device and host sources, a planted NaN. */
static void run_share(const char *how)
{
    assert_int_equal(setenv("RLB_LORA_MERGE", how, 1), 0);
    int n = 0;
    for (int mode = LC_FULL; mode <= LC_FSDP1; mode++, n++) {
        run_case(n % 2, mode, RLB_DTYPE_BF16, RLB_DTYPE_BF16, 2, 8, n % 2, 0);
        run_case((n + 1) % 2, mode, RLB_DTYPE_F32, RLB_DTYPE_BF16, 1, 64, (n + 1) % 2, 0);
    }
    run_case(0, LC_FULL, RLB_DTYPE_BF16, RLB_DTYPE_BF16, 2, 8, 0, 1);
    unsetenv("RLB_LORA_MERGE");
}

static void test_fused_fma(void **state)
{
    (void)state;
    run_share("fused-fma");
}

static void test_separate(void **state)
{
    (void)state;
    run_share("separate");
}

/* RLB_LORA_MERGE=gemm with products of any size: the share, then a NaN in the base (its
 * count comes from the scan at bind) and in a factor at rank 64, TP 4; then with the
 * smallest product at 100000 bytes (this model's 64 KiB blocks fused, its 128 KiB and larger
 * ones products, in one run), and at the default (no block of this model a product). */
static void test_gemm(void **state)
{
    (void)state;
    assert_int_equal(setenv("RLB_LORA_GEMM_MIN_BYTES", "0", 1), 0);
    run_share("gemm");
    assert_int_equal(setenv("RLB_LORA_MERGE", "gemm", 1), 0);
    run_case(0, LC_FULL, RLB_DTYPE_BF16, RLB_DTYPE_BF16, 2, 8, 0, 2);
    run_case(1, LC_FSDP2, RLB_DTYPE_BF16, RLB_DTYPE_BF16, 4, 64, 1, 0);
    run_case(0, LC_FULL, RLB_DTYPE_BF16, RLB_DTYPE_BF16, 4, 64, 0, 1);
    assert_int_equal(setenv("RLB_LORA_GEMM_MIN_BYTES", "100000", 1), 0);
    run_case(0, LC_FULL, RLB_DTYPE_BF16, RLB_DTYPE_BF16, 2, 8, 0, 1);
    run_case(1, LC_FULL, RLB_DTYPE_BF16, RLB_DTYPE_BF16, 1, 64, 1, 0);
    unsetenv("RLB_LORA_GEMM_MIN_BYTES");
    run_case(0, LC_FULL, RLB_DTYPE_BF16, RLB_DTYPE_BF16, 2, 8, 0, 0);
    unsetenv("RLB_LORA_MERGE");
}

static void test_poisoned_factor(void **state)
{
    (void)state;
    assert_int_equal(setenv("RLB_LORA_MERGE", "fused", 1), 0);
    run_case(0, LC_FULL, RLB_DTYPE_BF16, RLB_DTYPE_BF16, 2, 8, 0, 1);
    run_case(0, LC_FULL, RLB_DTYPE_F32, RLB_DTYPE_F32, 1, 64, 1, 1);
    unsetenv("RLB_LORA_MERGE");
}

int main(void)
{
    if (!gc_have_gpu())
        return GC_SKIP;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_against_cpu_and_reference),
        cmocka_unit_test(test_poisoned_factor),
        cmocka_unit_test(test_fused_fma),
        cmocka_unit_test(test_separate),
        cmocka_unit_test(test_gemm),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
