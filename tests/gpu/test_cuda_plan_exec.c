/* test_cuda_plan_exec: the CUDA reshard executor (kernels/cuda/plan_exec.h) writes the same
 * bytes as the CPU executor (kernels/cpu/plan_exec.h, itself checked element by element
 * against DESIGN §4 by tests/unit/test_plan), and writes nothing else:
 *   - planner plans for random models, FSDP2 / whole-tensor sources of mixed dtypes at
 *     unaligned offsets, TP sizes, replicas and destination dtypes;
 *   - hand-made ops the planner never emits: rows longer than a work item (split into
 *     segments), odd strides and offsets, every dtype pair, zero fills;
 *   - every bf16 and f16 pattern and a dense sweep of f32 patterns through each conversion;
 *   - a destination subset, and the refusals (misaligned op, missing / short / host
 *     buffers, run before bind);
 *   - the non-finite counts of random ops over random bits (NaN and Inf patterns among
 *     them, and f32 values beyond f16's range) against a naive scan of what each op wrote,
 *     with isfinite() on the decoded values.
 * Destinations start poisoned on both sides, so a stray or missing write shows. Exits 77
 * where no GPU is visible.
 */
#include <math.h>
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

/* Runs `plan` on GPU 0 from host sources src[i] (src_len[i] bytes) into poisoned
 * destinations and copies them back into out[d] (plan->dst_bytes[d] each); counts (or
 * NULL: counting off) gets each op's non-finite count. Returns the executor's first
 * non-zero code (then out[] is untouched). */
static int run_gpu(const rlb_plan *plan, uint8_t *const *src, const uint64_t *src_len,
                   const uint8_t *dst_sel, uint8_t **out, uint64_t *counts)
{
    char err[256] = "";
    rlb_cuda_buf *sb = calloc(plan->n_src + 1, sizeof *sb), *db = calloc(plan->n_dst + 1, sizeof *db);
    assert_non_null(sb);
    assert_non_null(db);
    for (uint32_t i = 0; i < plan->n_src; i++) {
        CHECK_CUDA(cudaMalloc(&sb[i].ptr, src_len[i]));
        CHECK_CUDA(cudaMemcpy(sb[i].ptr, src[i], src_len[i], cudaMemcpyHostToDevice));
        sb[i].bytes = src_len[i];
    }
    for (uint32_t d = 0; d < plan->n_dst; d++) {
        CHECK_CUDA(cudaMalloc(&db[d].ptr, plan->dst_bytes[d]));
        CHECK_CUDA(cudaMemset(db[d].ptr, GC_POISON, plan->dst_bytes[d]));
        db[d].bytes = plan->dst_bytes[d];
    }
    rlb_cuda_plan *cp = NULL;
    int rc = rlb__cuda_plan_upload(plan, 0, dst_sel, &cp, err, sizeof err);
    if (!rc)
        rc = rlb__cuda_plan_bind(cp, sb, db, err, sizeof err);
    if (!rc)
        rc = rlb__cuda_plan_count(cp, counts != NULL);
    if (!rc)
        rc = rlb__cuda_plan_run(cp, 0);
    if (!rc) {
        CHECK_CUDA(cudaDeviceSynchronize());
        if (counts) {
            memset(counts, 0, plan->n_ops * sizeof *counts);
            rlb__cuda_plan_counts(cp, counts);
        }
        for (uint32_t d = 0; d < plan->n_dst; d++)
            CHECK_CUDA(cudaMemcpy(out[d], db[d].ptr, plan->dst_bytes[d], cudaMemcpyDeviceToHost));
    }
    rlb__cuda_plan_free(cp);
    for (uint32_t i = 0; i < plan->n_src; i++)
        CHECK_CUDA(cudaFree(sb[i].ptr));
    for (uint32_t d = 0; d < plan->n_dst; d++)
        CHECK_CUDA(cudaFree(db[d].ptr));
    free(sb);
    free(db);
    return rc;
}

/* Runs `plan` on the CPU and on the GPU and compares every destination byte. */
static void compare_executors(const rlb_plan *plan, uint8_t *const *src, const uint64_t *src_len,
                              const char *what)
{
    char err[256] = "";
    uint8_t **cpu = calloc(plan->n_dst, sizeof *cpu), **gpu = calloc(plan->n_dst, sizeof *gpu);
    assert_non_null(cpu);
    assert_non_null(gpu);
    for (uint32_t d = 0; d < plan->n_dst; d++) {
        cpu[d] = malloc(plan->dst_bytes[d]);
        gpu[d] = malloc(plan->dst_bytes[d]);
        assert_non_null(cpu[d]);
        assert_non_null(gpu[d]);
        memset(cpu[d], GC_POISON, plan->dst_bytes[d]);
    }
    int rc = rlb__plan_exec_cpu(plan, (const void *const *)src, src_len, (void *const *)cpu,
                                plan->dst_bytes, 1, err, sizeof err);
    if (rc)
        fail_msg("%s: CPU executor: %s: %s", what, rlb_strerror(rc), err);
    rc = run_gpu(plan, src, src_len, NULL, gpu, NULL);
    if (rc)
        fail_msg("%s: GPU executor: %s", what, rlb_strerror(rc));
    for (uint32_t d = 0; d < plan->n_dst; d++) {
        for (uint64_t i = 0; i < plan->dst_bytes[d]; i++)
            if (cpu[d][i] != gpu[d][i])
                fail_msg("%s: destination %u byte %llu: CPU %02x, GPU %02x", what, d,
                         (unsigned long long)i, cpu[d][i], gpu[d][i]);
        free(cpu[d]);
        free(gpu[d]);
    }
    free(cpu);
    free(gpu);
}

static void planner_cases(int n, int medium, uint64_t seed0)
{
    for (int i = 0; i < n; i++) {
        gc_case g;
        char err[256] = "", what[256];
        int rc = gc_build(&g, seed0 + (uint64_t)i, medium, err, sizeof err);
        if (rc)
            fail_msg("case %d: build: %s: %s", i, rlb_strerror(rc), err);
        gc_describe(&g, what, sizeof what);
        compare_executors(&g.plan, g.mem, g.size, what);
        gc_free(&g);
    }
}

static void test_planner_small(void **state)
{
    (void)state;
    planner_cases(150, 0, 1000);
}

static void test_planner_medium(void **state)
{
    (void)state;
    planner_cases(6, 1, 5000);
}

/* A plan of one source and one destination, ops appended one after another in the
 * destination (each in its own region, so none overlaps another). */
typedef struct op_plan {
    rlb_plan plan;
    rlb_copy_op ops[64];
    uint64_t src_bytes, dst_bytes, dst_first_op[2];
} op_plan;

static void op_plan_init(op_plan *p, uint64_t src_bytes)
{
    memset(p, 0, sizeof *p);
    p->src_bytes = src_bytes;
    p->plan.n_src = 1;
    p->plan.n_dst = 1;
    p->plan.src_bytes = &p->src_bytes;
    p->plan.dst_bytes = &p->dst_bytes;
    p->plan.dst_first_op = p->dst_first_op;
    p->plan.ops = p->ops;
}

/* Appends rows x row_elems from src_offset (src_stride) to the end of the destination,
 * rows dst_gap bytes apart beyond their length, starting dst_skew bytes past alignment. */
static void op_plan_add(op_plan *p, uint32_t src_ref, rlb_dtype sdt, rlb_dtype ddt,
                        uint64_t src_offset, uint64_t src_stride, uint64_t rows,
                        uint64_t row_elems, uint64_t dst_gap, uint64_t dst_skew)
{
    assert_true(p->plan.n_ops < 64);
    uint64_t dsz = rlb_dtype_size(ddt), start = (p->dst_bytes + 15) / 16 * 16 + dst_skew;
    rlb_copy_op *op = &p->ops[p->plan.n_ops++];
    memset(op, 0, sizeof *op);
    op->src_ref = src_ref;
    op->dst_ref = 0;
    op->src_dtype = (uint8_t)sdt;
    op->dst_dtype = (uint8_t)ddt;
    op->src_offset = src_offset;
    op->src_stride = src_stride;
    op->dst_offset = start;
    op->dst_stride = row_elems * dsz + dst_gap;
    op->rows = rows;
    op->row_elems = row_elems;
    p->dst_bytes = start + (rows - 1) * op->dst_stride + row_elems * dsz;
    p->dst_first_op[1] = p->plan.n_ops;
}

/* Fills p with up to 40 random ops over a source of src_bytes: every dtype pair, long rows
 * (several work items) now and then, odd strides, offsets and skews, some zero fills. */
static void random_ops(op_plan *p, uint64_t *rng, uint64_t src_bytes)
{
    uint64_t s = *rng;
    op_plan_init(p, src_bytes);
    for (int k = 0; k < 40; k++) {
            rlb_dtype sdt = gc_float_dtypes[gc_rng(&s) % 3], ddt = gc_float_dtypes[gc_rng(&s) % 3];
            uint64_t ssz = rlb_dtype_size(sdt), dsz = rlb_dtype_size(ddt);
            /* long rows (several work items each) now and then, short ones mostly */
            uint64_t row_elems = gc_rng(&s) % 6 == 0 ? (uint64_t)gc_rnd(&s, 16000, 70000)
                                                     : (uint64_t)gc_rnd(&s, 1, 300);
            uint64_t rows = row_elems > 10000 ? (uint64_t)gc_rnd(&s, 1, 3) : (uint64_t)gc_rnd(&s, 1, 200);
            uint64_t src_stride = (row_elems + (uint64_t)gc_rnd(&s, 0, 1) * (uint64_t)gc_rnd(&s, 0, 9)) * ssz;
            if (gc_rng(&s) % 2)
                src_stride = (src_stride + 15) / 16 * 16; /* aligned rows on both sides often */
            uint64_t extent = (rows - 1) * src_stride + row_elems * ssz;
            if (extent > src_bytes)
                continue;
            uint64_t src_offset = (uint64_t)gc_rnd(&s, 0, (int64_t)((src_bytes - extent) / ssz)) * ssz;
            if (gc_rng(&s) % 2)
                src_offset &= ~(uint64_t)15;
            uint64_t dst_gap = gc_rng(&s) % 2 ? 0 : (uint64_t)gc_rnd(&s, 0, 5) * dsz;
            uint64_t dst_skew = gc_rng(&s) % 2 ? 0 : (uint64_t)gc_rnd(&s, 0, 7) * dsz;
            op_plan_add(p, gc_rng(&s) % 8 == 0 ? RLB_PLAN_ZERO_SRC : 0, sdt, ddt, src_offset,
                        src_stride, rows, row_elems, dst_gap, dst_skew);
    }
    *rng = s;
}

static uint8_t *random_bytes(uint64_t n, uint64_t seed)
{
    uint8_t *b = malloc(n);
    assert_non_null(b);
    for (uint64_t i = 0; i < n; i++)
        b[i] = (uint8_t)gc_rng(&seed);
    return b;
}

static void test_random_ops(void **state)
{
    (void)state;
    uint64_t s = 77;
    const uint64_t src_bytes = 4u << 20;
    uint8_t *src = random_bytes(src_bytes, 78);
    for (int round = 0; round < 12; round++) {
        op_plan p;
        random_ops(&p, &s, src_bytes);
        compare_executors(&p.plan, &src, &src_bytes, "random ops");
    }
    free(src);
}

/* 1 when the dtype element at p is NaN or infinite, decoded the plain way. */
static int naive_nonfinite(const uint8_t *p, rlb_dtype dt)
{
    if (dt == RLB_DTYPE_F32) {
        float f;
        memcpy(&f, p, 4);
        return !isfinite(f);
    }
    uint16_t h;
    memcpy(&h, p, 2);
    if (dt == RLB_DTYPE_BF16) {
        uint32_t w = (uint32_t)h << 16;
        float f;
        memcpy(&f, &w, 4);
        return !isfinite(f);
    }
    return ((h >> 10) & 0x1f) == 0x1f; /* f16: the largest exponent is Inf / NaN */
}

/* Counting on, random ops over random bits: each op's count equals the non-finite values
 * found in its destination rows (ops write disjoint regions) by a naive scan; zero fills
 * count none. The bytes still equal the CPU executor's (the copy is unchanged by counting). */
static void test_nonfinite_counts(void **state)
{
    (void)state;
    uint64_t s = 4242, total = 0;
    const uint64_t src_bytes = 4u << 20;
    uint8_t *src = random_bytes(src_bytes, 4243);
    for (int round = 0; round < 12; round++) {
        op_plan p;
        random_ops(&p, &s, src_bytes);
        uint8_t *out = malloc(p.dst_bytes + 1);
        uint64_t counts[64];
        assert_non_null(out);
        assert_int_equal(run_gpu(&p.plan, &src, &src_bytes, NULL, &out, counts), 0);
        for (uint64_t k = 0; k < p.plan.n_ops; k++) {
            const rlb_copy_op *op = &p.ops[k];
            uint64_t dsz = rlb_dtype_size((rlb_dtype)op->dst_dtype), want = 0;
            for (uint64_t r = 0; r < op->rows; r++)
                for (uint64_t e = 0; e < op->row_elems; e++)
                    want += (uint64_t)naive_nonfinite(out + op->dst_offset + r * op->dst_stride +
                                                      e * dsz, (rlb_dtype)op->dst_dtype);
            if (counts[k] != want)
                fail_msg("round %d op %llu (%s -> %s, %llu x %llu%s): counted %llu, the "
                         "destination holds %llu", round, (unsigned long long)k,
                         rlb_dtype_name((rlb_dtype)op->src_dtype),
                         rlb_dtype_name((rlb_dtype)op->dst_dtype), (unsigned long long)op->rows,
                         (unsigned long long)op->row_elems,
                         op->src_ref == RLB_PLAN_ZERO_SRC ? ", zero fill" : "",
                         (unsigned long long)counts[k], (unsigned long long)want);
            total += want;
        }
        free(out);
        compare_executors(&p.plan, &src, &src_bytes, "random ops, counted run");
    }
    assert_true(total > 1000); /* random bits hold many NaN / Inf patterns */
    print_message("non-finite values counted over 12 plans: %llu\n", (unsigned long long)total);
    free(src);
}

/* Every 16-bit pattern of bf16 and f16, and f32 patterns i * 251 + (i & 0xff) (every
 * exponent, dense mantissas), through every conversion. */
static void test_conversion_sweep(void **state)
{
    (void)state;
    const uint64_t n16 = 65536, n32 = (1ull << 32) / 251;
    uint64_t bytes = n16 * 2 + n32 * 4;
    uint8_t *src = malloc(bytes);
    assert_non_null(src);
    for (uint64_t i = 0; i < n16; i++) {
        uint16_t v = (uint16_t)i;
        memcpy(src + 2 * i, &v, 2);
    }
    for (uint64_t i = 0; i < n32; i++) {
        uint32_t v = (uint32_t)(i * 251 + (i & 0xff));
        memcpy(src + n16 * 2 + 4 * i, &v, 4);
    }
    op_plan p;
    op_plan_init(&p, bytes);
    for (int k = 0; k < 3; k++) {
        rlb_dtype sdt = gc_float_dtypes[k];
        for (int j = 0; j < 3; j++) {
            rlb_dtype ddt = gc_float_dtypes[j];
            if (sdt == RLB_DTYPE_F32)
                op_plan_add(&p, 0, sdt, ddt, n16 * 2, n32 * 4, 1, n32, 0, 0);
            else
                op_plan_add(&p, 0, sdt, ddt, 0, n16 * 2, 1, n16, 0, 0);
        }
    }
    compare_executors(&p.plan, &src, &bytes, "conversion sweep");
    free(src);
}

/* Uploading only destination 1's ops leaves destination 0 poisoned. */
static void test_dst_subset(void **state)
{
    (void)state;
    gc_case g;
    char err[256] = "";
    uint64_t seed = 42;
    do { /* a case with at least two destinations */
        assert_int_equal(gc_build(&g, seed++, 0, err, sizeof err), 0);
        if (g.plan.n_dst >= 2)
            break;
        gc_free(&g);
    } while (1);
    uint8_t *sel = calloc(g.plan.n_dst, 1), **out = calloc(g.plan.n_dst, sizeof *out);
    assert_non_null(sel);
    assert_non_null(out);
    sel[1] = 1;
    for (uint32_t d = 0; d < g.plan.n_dst; d++) {
        out[d] = malloc(g.plan.dst_bytes[d]);
        assert_non_null(out[d]);
    }
    assert_int_equal(run_gpu(&g.plan, g.mem, g.size, sel, out, NULL), 0);
    for (uint64_t i = 0; i < g.plan.dst_bytes[0]; i++)
        assert_int_equal(out[0][i], GC_POISON);
    int written = 0;
    for (uint64_t i = 0; i < g.plan.dst_bytes[1]; i++)
        written |= out[1][i] != GC_POISON;
    assert_true(written);
    for (uint32_t d = 0; d < g.plan.n_dst; d++)
        free(out[d]);
    free(out);
    free(sel);
    gc_free(&g);
}

static void test_refusals(void **state)
{
    (void)state;
    char err[256] = "";
    op_plan p;
    op_plan_init(&p, 4096);
    op_plan_add(&p, 0, RLB_DTYPE_F32, RLB_DTYPE_BF16, 0, 64, 4, 16, 0, 0);
    rlb_cuda_plan *cp = NULL;

    p.ops[0].src_offset = 2; /* not on an f32 element boundary */
    assert_int_equal(rlb__cuda_plan_upload(&p.plan, 0, NULL, &cp, err, sizeof err), RLB_EINVAL);
    assert_null(cp);
    assert_non_null(strstr(err, "op 0"));
    p.ops[0].src_offset = 0;
    p.ops[0].rows = 1000; /* past the source's 4096 bytes */
    assert_int_equal(rlb__cuda_plan_upload(&p.plan, 0, NULL, &cp, err, sizeof err), RLB_EINVAL);
    p.ops[0].rows = 4;

    assert_int_equal(rlb__cuda_plan_upload(&p.plan, 0, NULL, &cp, err, sizeof err), 0);
    assert_int_equal(rlb__cuda_plan_run(cp, 0), RLB_EINVAL); /* not bound yet */
    void *dsrc, *ddst;
    CHECK_CUDA(cudaMalloc(&dsrc, 4096));
    CHECK_CUDA(cudaMalloc(&ddst, p.dst_bytes));
    rlb_cuda_buf sb = {dsrc, 4096}, db = {ddst, p.dst_bytes};
    rlb_cuda_buf none = {NULL, 4096}, shorter = {dsrc, 100}, skewed = {(char *)dsrc + 2, 4096};
    static uint8_t host[4096];
    rlb_cuda_buf hostbuf = {host, sizeof host};
    assert_int_equal(rlb__cuda_plan_bind(cp, &none, &db, err, sizeof err), RLB_EINVAL);
    assert_int_equal(rlb__cuda_plan_bind(cp, &shorter, &db, err, sizeof err), RLB_EINVAL);
    assert_int_equal(rlb__cuda_plan_bind(cp, &skewed, &db, err, sizeof err), RLB_EINVAL);
    assert_int_equal(rlb__cuda_plan_bind(cp, &hostbuf, &db, err, sizeof err), RLB_EINVAL);
    assert_int_equal(rlb__cuda_plan_run(cp, 0), RLB_EINVAL); /* failed binds leave it unbound */
    assert_int_equal(rlb__cuda_plan_bind(cp, &sb, &db, err, sizeof err), 0);
    assert_int_equal(rlb__cuda_plan_run(cp, 0), 0);
    CHECK_CUDA(cudaDeviceSynchronize());
    assert_true(rlb__cuda_plan_items(cp) >= 1);
    assert_true(rlb__cuda_plan_device_bytes(cp) >= sizeof(rlb_copy_op));
    rlb__cuda_plan_free(cp);
    CHECK_CUDA(cudaFree(dsrc));
    CHECK_CUDA(cudaFree(ddst));
}

int main(void)
{
    if (!gc_have_gpu()) {
        fprintf(stderr, "test_cuda_plan_exec: no GPU visible, skipping\n");
        return GC_SKIP;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_planner_small),  cmocka_unit_test(test_planner_medium),
        cmocka_unit_test(test_random_ops),     cmocka_unit_test(test_conversion_sweep),
        cmocka_unit_test(test_dst_subset),     cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_nonfinite_counts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
