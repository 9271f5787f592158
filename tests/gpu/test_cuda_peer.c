/* test_cuda_peer: the CUDA reshard executor with sources on two GPUs (kernels/cuda/
 * plan_exec.h): FSDP2 shards (and whole tensors) spread over both GPUs, the TP ranks'
 * destinations too, each GPU running the part of the plan that writes its own
 * destinations, reading half its sources from the other GPU:
 *   - auto mode: peer access where the GPUs have a peer path (nothing staged), the staged
 *     fallback where they have none;
 *   - forced fallback (RLB_CUDA_PEER_STAGED, through the setter and through the knob): every
 *     remote source copied through the staging buffers, at the default size and at the
 *     4 KiB minimum (many windows, rows split into column segments); run twice, the
 *     destinations poisoned in between, so the staging buffers' reuse across runs is
 *     covered.
 * Every destination byte must equal the CPU executor's (kernels/cpu/plan_exec.h) on the
 * same plan; destinations start poisoned. Exits 77 with fewer than two GPUs.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cpu/plan_exec.h"
#include "kernels/cuda/plan_exec.h"
#include "tests/gpu/gpu_case.h"

#define N_GPU 2

static int peer_path; /* GPU 0 and GPU 1 can reach each other peer to peer */

typedef enum how {
    HOW_AUTO,         /* setter: auto */
    HOW_STAGED,       /* setter: staged, default staging size */
    HOW_STAGED_SMALL, /* setter: staged, RLB_STAGE_MIN_BYTES */
    HOW_KNOB,         /* no setter; RLB_CUDA_PEER=staged in the environment at upload */
} how;

/* Source buffer b and destination d live on GPU b % 2 and d % 2. */
static int gpu_of(uint32_t i)
{
    return (int)(i % N_GPU);
}

/* Copies the destinations back and compares them with want[]. */
static void compare(const gc_case *g, char *const *dbuf, uint8_t *const *want, const char *what,
                    int run)
{
    const rlb_plan *plan = &g->plan;
    uint8_t *got = NULL;
    for (uint32_t d = 0; d < plan->n_dst; d++) {
        got = realloc(got, plan->dst_bytes[d]);
        assert_non_null(got);
        CHECK_CUDA(cudaMemcpy(got, dbuf[d], plan->dst_bytes[d], cudaMemcpyDeviceToHost));
        for (uint64_t i = 0; i < plan->dst_bytes[d]; i++)
            if (got[i] != want[d][i])
                fail_msg("%s, run %d: destination %u byte %llu: CPU %02x, GPU %02x", what, run, d,
                         (unsigned long long)i, want[d][i], got[i]);
    }
    free(got);
}

/* Runs case g over both GPUs the way `h` says and checks it against the CPU executor. */
static void two_gpu_case(const gc_case *g, how h)
{
    static const char *names[] = {"auto", "staged", "staged 4 KiB", "staged by knob"};
    const rlb_plan *plan = &g->plan;
    char err[256] = "", what[320], desc[256];
    snprintf(what, sizeof what, "%s [%s]", gc_describe(g, desc, sizeof desc), names[h]);
    rlb_cuda_buf *sb = calloc(plan->n_src, sizeof *sb), *db = calloc(plan->n_dst, sizeof *db);
    uint8_t **want = calloc(plan->n_dst, sizeof *want);
    char **dbuf = calloc(plan->n_dst, sizeof *dbuf);
    assert_true(sb && db && want && dbuf);
    for (uint32_t b = 0; b < plan->n_src; b++) {
        CHECK_CUDA(cudaSetDevice(gpu_of(b)));
        CHECK_CUDA(cudaMalloc(&sb[b].ptr, g->size[b]));
        CHECK_CUDA(cudaMemcpy(sb[b].ptr, g->mem[b], g->size[b], cudaMemcpyHostToDevice));
        sb[b].bytes = g->size[b];
    }
    for (uint32_t d = 0; d < plan->n_dst; d++) {
        CHECK_CUDA(cudaSetDevice(gpu_of(d)));
        CHECK_CUDA(cudaMalloc((void **)&dbuf[d], plan->dst_bytes[d]));
        db[d] = (rlb_cuda_buf){dbuf[d], plan->dst_bytes[d]};
        want[d] = malloc(plan->dst_bytes[d]);
        assert_non_null(want[d]);
        memset(want[d], GC_POISON, plan->dst_bytes[d]);
    }
    int rc = rlb__plan_exec_cpu(plan, (const void *const *)g->mem, g->size, (void *const *)want,
                                plan->dst_bytes, 1, err, sizeof err);
    if (rc)
        fail_msg("%s: CPU executor: %s", what, err);

    rlb_cuda_plan *cp[N_GPU] = {NULL, NULL};
    cudaStream_t st[N_GPU];
    int remote[N_GPU] = {0, 0}; /* the GPU's part reads a source on the other GPU */
    for (uint64_t i = 0; i < plan->n_ops; i++) {
        const rlb_copy_op *op = &plan->ops[i];
        if (op->src_ref != RLB_PLAN_ZERO_SRC && gpu_of(op->src_ref) != gpu_of(op->dst_ref))
            remote[gpu_of(op->dst_ref)] = 1;
    }
    if (h == HOW_KNOB)
        setenv("RLB_CUDA_PEER", "staged", 1);
    for (int gpu = 0; gpu < N_GPU; gpu++) {
        uint8_t *sel = calloc(plan->n_dst, 1);
        assert_non_null(sel);
        for (uint32_t d = 0; d < plan->n_dst; d++)
            sel[d] = gpu_of(d) == gpu;
        CHECK_CUDA(cudaSetDevice(gpu));
        CHECK_CUDA(cudaStreamCreate(&st[gpu]));
        rc = rlb__cuda_plan_upload(plan, gpu, sel, &cp[gpu], err, sizeof err);
        if (rc)
            fail_msg("%s: upload on GPU %d: %s", what, gpu, err);
        free(sel);
        if (h == HOW_AUTO)
            assert_int_equal(rlb__cuda_plan_set_peer_mode(cp[gpu], RLB_CUDA_PEER_AUTO, 0), 0);
        else if (h == HOW_STAGED)
            assert_int_equal(rlb__cuda_plan_set_peer_mode(cp[gpu], RLB_CUDA_PEER_STAGED, 0), 0);
        else if (h == HOW_STAGED_SMALL)
            assert_int_equal(rlb__cuda_plan_set_peer_mode(cp[gpu], RLB_CUDA_PEER_STAGED,
                                                          RLB_STAGE_MIN_BYTES), 0);
        rc = rlb__cuda_plan_bind(cp[gpu], sb, db, err, sizeof err);
        if (rc)
            fail_msg("%s: bind on GPU %d: %s", what, gpu, err);
        uint32_t windows = 0;
        uint64_t staged = rlb__cuda_plan_staged_bytes(cp[gpu], &windows);
        const int expect_staged = remote[gpu] && (h != HOW_AUTO || !peer_path);
        if ((staged > 0) != expect_staged)
            fail_msg("%s: GPU %d stages %llu bytes in %u windows; staging expected: %d", what,
                     gpu, (unsigned long long)staged, windows, expect_staged);
    }
    if (h == HOW_KNOB)
        unsetenv("RLB_CUDA_PEER");
    const int runs = h == HOW_AUTO ? 1 : 2;
    for (int run = 0; run < runs; run++) {
        for (uint32_t d = 0; d < plan->n_dst; d++) {
            CHECK_CUDA(cudaSetDevice(gpu_of(d)));
            CHECK_CUDA(cudaMemsetAsync(dbuf[d], GC_POISON, plan->dst_bytes[d], st[gpu_of(d)]));
        }
        for (int gpu = 0; gpu < N_GPU; gpu++)
            assert_int_equal(rlb__cuda_plan_run(cp[gpu], st[gpu]), 0);
        for (int gpu = 0; gpu < N_GPU; gpu++)
            CHECK_CUDA(cudaStreamSynchronize(st[gpu]));
        compare(g, dbuf, want, what, run);
    }
    for (int gpu = 0; gpu < N_GPU; gpu++) {
        rlb__cuda_plan_free(cp[gpu]);
        CHECK_CUDA(cudaStreamDestroy(st[gpu]));
    }
    for (uint32_t b = 0; b < plan->n_src; b++)
        CHECK_CUDA(cudaFree(sb[b].ptr));
    for (uint32_t d = 0; d < plan->n_dst; d++) {
        CHECK_CUDA(cudaFree(dbuf[d]));
        free(want[d]);
    }
    free(sb);
    free(db);
    free(want);
    free(dbuf);
}

/* n planner cases with sources on both GPUs (W >= 2), each run every way. */
static void cases(int n, int medium, uint64_t seed)
{
    for (int done = 0; done < n; seed++) {
        gc_case g;
        char err[256] = "";
        int rc = gc_build(&g, seed, medium, err, sizeof err);
        if (rc)
            fail_msg("case %llu: build: %s: %s", (unsigned long long)seed, rlb_strerror(rc), err);
        if (g.W >= 2 && g.plan.n_dst >= 2) {
            for (int h = HOW_AUTO; h <= HOW_KNOB; h++)
                two_gpu_case(&g, (how)h);
            done++;
        }
        gc_free(&g);
    }
}

static void test_small(void **state)
{
    (void)state;
    cases(10, 0, 7000);
}

static void test_medium(void **state)
{
    (void)state;
    cases(3, 1, 8000);
}

/* A destination on the other GPU needs a peer path; the setter checks its arguments. */
static void test_refusals(void **state)
{
    (void)state;
    char err[256] = "";
    rlb_copy_op op = {.src_ref = 0, .dst_ref = 0, .src_dtype = RLB_DTYPE_BF16,
                      .dst_dtype = RLB_DTYPE_BF16, .src_stride = 64, .dst_stride = 64,
                      .rows = 4, .row_elems = 32};
    uint64_t sbytes = 256, dbytes = 256, first[2] = {0, 1};
    rlb_plan plan = {.n_src = 1, .n_dst = 1, .src_bytes = &sbytes, .dst_bytes = &dbytes,
                     .dst_first_op = first, .n_ops = 1, .ops = &op};
    void *s0, *d1;
    CHECK_CUDA(cudaSetDevice(0));
    CHECK_CUDA(cudaMalloc(&s0, 256));
    CHECK_CUDA(cudaSetDevice(1));
    CHECK_CUDA(cudaMalloc(&d1, 256));
    CHECK_CUDA(cudaSetDevice(0));
    rlb_cuda_plan *cp = NULL;
    assert_int_equal(rlb__cuda_plan_upload(&plan, 0, NULL, &cp, err, sizeof err), 0);
    assert_int_equal(rlb__cuda_plan_set_peer_mode(cp, (rlb_cuda_peer_mode)7, 0), RLB_EINVAL);
    assert_int_equal(rlb__cuda_plan_set_peer_mode(cp, RLB_CUDA_PEER_STAGED, 1000), RLB_EINVAL);
    assert_int_equal(rlb__cuda_plan_set_peer_mode(cp, RLB_CUDA_PEER_STAGED, 4096 + 128), RLB_EINVAL);
    rlb_cuda_buf sb = {s0, 256}, db = {d1, 256};
    int rc = rlb__cuda_plan_bind(cp, &sb, &db, err, sizeof err);
    assert_int_equal(rc, peer_path ? 0 : RLB_EUNSUPPORTED);
    rlb__cuda_plan_free(cp);
    CHECK_CUDA(cudaFree(s0));
    CHECK_CUDA(cudaFree(d1));
}

int main(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < N_GPU) {
        fprintf(stderr, "test_cuda_peer: %d GPU(s) visible, 2 needed; skipping\n", n);
        return GC_SKIP;
    }
    int a = 0, b = 0;
    CHECK_CUDA(cudaDeviceCanAccessPeer(&a, 0, 1));
    CHECK_CUDA(cudaDeviceCanAccessPeer(&b, 1, 0));
    peer_path = a && b;
    printf("test_cuda_peer: %d GPUs; GPU 0 <-> GPU 1 peer access: %s\n", n,
           peer_path ? "yes" : "no (auto mode stages too)");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_small),
        cmocka_unit_test(test_medium),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
