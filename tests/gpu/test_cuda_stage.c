/* test_cuda_stage: the staged fallback's window planning (kernels/cuda/plan_stage.h),
 * replayed on the host, so it runs with no GPU.
 *
 * For planner plans of random models (FSDP2 / whole-tensor sources of mixed dtypes at
 * unaligned offsets), a random subset of sources is staged through two buffers of a random
 * capacity (down to the 4 KiB minimum, far below a row of the larger cases, so rows are
 * split into column segments and groups of rows). The replay runs the ops the plan does
 * not stage with the CPU executor on the original sources, then each window: poisons its
 * staging buffer, performs its copies with memcpy and runs its ops with the CPU executor
 * reading the two staging buffers. The destinations must equal those of the CPU executor
 * on the whole plan, byte for byte. Each copy is also checked against the layout rules:
 * inside its source and its buffer, no overlap with another copy of its window, the
 * source address's phase modulo 16 kept, windows alternating between the buffers.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cpu/plan_exec.h"
#include "kernels/cuda/plan_stage.h"
#include "tests/gpu/gpu_case.h"

#define STAGE_POISON 0xa5

/* Runs ops[0, n) on the CPU from sources src[0, n_src) into the plan's destinations. */
static void exec_ops(const rlb_plan *plan, const rlb_copy_op *ops, uint64_t n, uint32_t n_src,
                     uint8_t *const *src, const uint64_t *src_len, uint8_t **dst)
{
    char err[256] = "";
    rlb_plan p = *plan;
    p.n_src = n_src;
    p.src_bytes = (uint64_t *)src_len;
    p.n_ops = n;
    p.ops = (rlb_copy_op *)ops;
    int rc = rlb__plan_exec_cpu(&p, (const void *const *)src, src_len, (void *const *)dst,
                                plan->dst_bytes, 1, err, sizeof err);
    if (rc)
        fail_msg("CPU executor: %s: %s", rlb_strerror(rc), err);
}

/* The copies of window w obey the layout rules of plan_stage.h. */
static void check_window(const rlb_stage_plan *sp, uint32_t w, const gc_case *g,
                         const uint8_t *phase)
{
    const rlb_stage_window *win = &sp->windows[w];
    assert_int_equal(win->buf, w % 2);
    assert_true(win->n_ops >= 1 && win->n_copies >= 1);
    for (uint64_t k = win->first_copy; k < win->first_copy + win->n_copies; k++) {
        const rlb_stage_copy *c = &sp->copies[k];
        assert_int_equal(c->buf, win->buf);
        assert_true(c->src_ref < g->n_buf);
        assert_true(c->bytes > 0);
        assert_true(c->src_offset + c->bytes <= g->size[c->src_ref]);
        assert_true(c->stage_offset + c->bytes <= sp->cap);
        assert_int_equal(c->stage_offset % 16, (phase[c->src_ref] + c->src_offset) % 16);
        for (uint64_t j = win->first_copy; j < k; j++) {
            const rlb_stage_copy *o = &sp->copies[j];
            assert_true(o->stage_offset + o->bytes <= c->stage_offset ||
                        c->stage_offset + c->bytes <= o->stage_offset);
        }
    }
}

/* One case: staged replay against the CPU executor on the whole plan. */
static void stage_case(uint64_t seed, int medium)
{
    static const uint64_t caps[] = {RLB_STAGE_MIN_BYTES, 8192, 65536, 1u << 20};
    char err[256] = "", what[256];
    gc_case g;
    uint64_t s = seed * 7919;
    int rc = gc_build(&g, seed, medium, err, sizeof err);
    if (rc)
        fail_msg("case %llu: build: %s: %s", (unsigned long long)seed, rlb_strerror(rc), err);
    gc_describe(&g, what, sizeof what);
    const rlb_plan *plan = &g.plan;
    uint8_t staged[GC_MAX_W + 1] = {0}, phase[GC_MAX_W + 1];
    int any = 0;
    for (uint32_t b = 0; b < g.n_buf; b++) {
        staged[b] = gc_rng(&s) % 5 != 0;
        any |= staged[b];
        phase[b] = (uint8_t)(4 * gc_rnd(&s, 0, 3)); /* any f32 / bf16 / f16 base alignment */
    }
    if (!any)
        staged[gc_rng(&s) % g.n_buf] = 1;
    const uint64_t cap = caps[gc_rng(&s) % 4];

    rlb_stage_plan sp;
    rc = rlb__stage_build(plan->ops, plan->n_ops, plan->n_src, staged, phase, cap, &sp);
    if (rc)
        fail_msg("%s: stage build: %s", what, rlb_strerror(rc));
    uint8_t **want = calloc(plan->n_dst, sizeof *want), **got = calloc(plan->n_dst, sizeof *got);
    uint8_t *stage[2] = {malloc(cap), malloc(cap)};
    rlb_copy_op *direct = malloc((plan->n_ops + 1) * sizeof *direct);
    assert_true(want && got && stage[0] && stage[1] && direct);
    for (uint32_t d = 0; d < plan->n_dst; d++) {
        want[d] = malloc(plan->dst_bytes[d]);
        got[d] = malloc(plan->dst_bytes[d]);
        assert_true(want[d] && got[d]);
        memset(want[d], GC_POISON, plan->dst_bytes[d]);
        memset(got[d], GC_POISON, plan->dst_bytes[d]);
    }
    exec_ops(plan, plan->ops, plan->n_ops, plan->n_src, g.mem, g.size, want);

    /* distinct staged source bytes (replicas and replicated tensors read some twice) */
    uint8_t *read_map[GC_MAX_W + 1];
    uint64_t n_direct = 0, staged_read = 0, staged_ops = 0, distinct = 0;
    for (uint32_t b = 0; b < g.n_buf; b++) {
        read_map[b] = calloc(g.size[b], 1);
        assert_non_null(read_map[b]);
    }
    for (uint64_t i = 0; i < plan->n_ops; i++) {
        const rlb_copy_op *op = &plan->ops[i];
        if (op->src_ref == RLB_PLAN_ZERO_SRC || !staged[op->src_ref]) {
            direct[n_direct++] = *op;
            continue;
        }
        const uint64_t row_bytes = op->row_elems * rlb_dtype_size((rlb_dtype)op->src_dtype);
        staged_ops++;
        staged_read += op->rows * row_bytes;
        for (uint64_t r = 0; r < op->rows; r++)
            memset(read_map[op->src_ref] + op->src_offset + r * op->src_stride, 1, row_bytes);
    }
    for (uint32_t b = 0; b < g.n_buf; b++) {
        for (uint64_t i = 0; i < g.size[b]; i++)
            distinct += read_map[b][i];
        free(read_map[b]);
    }
    exec_ops(plan, direct, n_direct, plan->n_src, g.mem, g.size, got);
    const uint64_t stage_len[2] = {cap, cap};
    uint64_t ops_seen = 0, pieces_read = 0;
    for (uint32_t w = 0; w < sp.n_windows; w++) {
        const rlb_stage_window *win = &sp.windows[w];
        check_window(&sp, w, &g, phase);
        memset(stage[win->buf], STAGE_POISON, cap);
        for (uint64_t k = win->first_copy; k < win->first_copy + win->n_copies; k++) {
            const rlb_stage_copy *c = &sp.copies[k];
            memcpy(stage[c->buf] + c->stage_offset, g.mem[c->src_ref] + c->src_offset, c->bytes);
        }
        assert_int_equal(win->first_op, ops_seen);
        for (uint64_t i = win->first_op; i < win->first_op + win->n_ops; i++) {
            const rlb_copy_op *op = &sp.ops[i];
            assert_int_equal(op->src_ref, win->buf);
            /* the op it was cut from: a staged op of the same destination and dtypes whose
             * rows hold the piece's */
            assert_true(sp.op_of[i] < plan->n_ops);
            const rlb_copy_op *from = &plan->ops[sp.op_of[i]];
            const uint64_t dsz = rlb_dtype_size((rlb_dtype)op->dst_dtype);
            assert_true(from->src_ref != RLB_PLAN_ZERO_SRC && staged[from->src_ref]);
            assert_int_equal(from->dst_ref, op->dst_ref);
            assert_int_equal(from->src_dtype, op->src_dtype);
            assert_int_equal(from->dst_dtype, op->dst_dtype);
            assert_true(op->dst_offset >= from->dst_offset);
            const uint64_t at = op->dst_offset - from->dst_offset;
            /* a one-row op's stride means nothing */
            const int strided = from->rows > 1 && from->dst_stride;
            const uint64_t row = strided ? at / from->dst_stride : 0;
            const uint64_t col = strided ? at % from->dst_stride : at;
            assert_true(row + op->rows <= from->rows);
            assert_true(col + op->row_elems * dsz <= from->row_elems * dsz);
            pieces_read += op->rows * op->row_elems * rlb_dtype_size((rlb_dtype)op->src_dtype);
        }
        exec_ops(plan, &sp.ops[win->first_op], win->n_ops, 2, stage, stage_len, got);
        ops_seen += win->n_ops;
    }
    assert_int_equal(ops_seen, sp.n_ops);
    assert_true(sp.n_ops >= staged_ops);
    assert_int_equal(pieces_read, staged_read); /* pieces cover the staged ops exactly */
    assert_true(sp.bytes_copied >= distinct);
    for (uint32_t d = 0; d < plan->n_dst; d++) {
        for (uint64_t i = 0; i < plan->dst_bytes[d]; i++)
            if (want[d][i] != got[d][i])
                fail_msg("%s, cap %llu: destination %u byte %llu: whole plan %02x, staged %02x",
                         what, (unsigned long long)cap, d, (unsigned long long)i, want[d][i],
                         got[d][i]);
        free(want[d]);
        free(got[d]);
    }
    free(want);
    free(got);
    free(stage[0]);
    free(stage[1]);
    free(direct);
    rlb__stage_free(&sp);
    gc_free(&g);
}

static void test_small_cases(void **state)
{
    (void)state;
    for (uint64_t seed = 2000; seed < 2150; seed++)
        stage_case(seed, 0);
}

static void test_medium_cases(void **state)
{
    (void)state;
    for (uint64_t seed = 6000; seed < 6012; seed++)
        stage_case(seed, 1);
}

/* One op whose rows are longer than the buffer, rows far apart: column segments of a
 * multiple of 16 elements, one row group each, and copies that skip the gaps. */
static void test_long_rows(void **state)
{
    (void)state;
    rlb_copy_op op = {.src_ref = 0, .dst_ref = 0, .src_dtype = RLB_DTYPE_F32,
                      .dst_dtype = RLB_DTYPE_BF16, .src_offset = 4, .src_stride = 400000,
                      .dst_offset = 0, .dst_stride = 6000, .rows = 3, .row_elems = 3000};
    const uint8_t staged = 1, phase = 0;
    rlb_stage_plan sp;
    assert_int_equal(rlb__stage_build(&op, 1, 1, &staged, &phase, RLB_STAGE_MIN_BYTES, &sp), 0);
    /* 12000-byte rows in pieces of at most 3840 bytes: 960 elements (a multiple of 16) */
    assert_int_equal(sp.n_ops, 3 * 4);
    uint64_t elems = 0;
    for (uint64_t i = 0; i < sp.n_ops; i++) {
        assert_int_equal(sp.ops[i].rows, 1);
        assert_true(sp.ops[i].row_elems == 960 || sp.ops[i].row_elems == 3000 - 3 * 960);
        elems += sp.ops[i].row_elems;
    }
    assert_int_equal(elems, 3 * 3000);
    assert_int_equal(sp.bytes_copied, 3 * 3000 * 4); /* gaps of 388000 bytes not copied */
    rlb__stage_free(&sp);
}

static void test_refusals(void **state)
{
    (void)state;
    rlb_copy_op op = {.src_ref = 0, .src_dtype = RLB_DTYPE_BF16, .dst_dtype = RLB_DTYPE_BF16,
                      .rows = 1, .row_elems = 8};
    const uint8_t staged = 1, phase = 0, not_staged = 0;
    rlb_stage_plan sp;
    assert_int_equal(rlb__stage_build(&op, 1, 1, &staged, &phase, 2048, &sp), RLB_EINVAL);
    assert_int_equal(rlb__stage_build(&op, 1, 1, &staged, &phase, 4096 + 100, &sp), RLB_EINVAL);
    assert_int_equal(rlb__stage_build(&op, 1, 1, NULL, &phase, 4096, &sp), RLB_EINVAL);
    assert_int_equal(rlb__stage_build(&op, 1, 1, &not_staged, &phase, 4096, &sp), 0);
    assert_int_equal(sp.n_ops, 0);
    assert_int_equal(sp.n_windows, 0);
    rlb__stage_free(&sp);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_small_cases), cmocka_unit_test(test_medium_cases),
        cmocka_unit_test(test_long_rows),   cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
