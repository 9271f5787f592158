/* test_lora: LoRA adapters through the planner and the CPU executor (DESIGN §10), against
 * a naive double-precision reference of W + s * B * A written here element by element.
 *
 * The reference (lora_case.h, shared with the CUDA test) shares no code with the planner or
 * executor: plan_ref.h (the tests' own reading of DESIGN §4) says which global (parameter,
 * row, col) each worker element holds, and the case keeps every tensor's global values in
 * doubles, so the expected element is
 * W[row, col] + s * sum_j B[row, j] * A[j, col] (for the embedding, PEFT's transpose:
 * s * sum_j A[j, row] * B[col, j]). Each case registers the base and the adapters of all
 * seven targets (plus the embedding and an untied lm_head) as full tensors, FSDP2 shards
 * (uneven, with empty ranks) or one FSDP1 unit (alignment padding holding NaN), runs two
 * versions with new adapter values (each must equal the reference, so nothing drifts from
 * the pristine base), then takes the adapters out of the parameter list and runs again:
 * every worker buffer must then be the plain reshard of the base, bit for bit.
 *
 * Also: factor names and the refusals of rlb__params_add_adapter, the CPU executor seam
 * running merges from sync to sync while counting the NaN / Inf values they write, and the
 * merges' bases as pieces (model/merge_pieces.h, what the fused CUDA merge reads) against
 * the base copies applied one element at a time.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cmocka.h>

#include "kernels/cpu/convert.h"
#include "kernels/cpu/plan_exec.h"
#include "kernels/executor.h"
#include "model/lora.h"
#include "model/merge_pieces.h"
#include "model/params.h"
#include "model/plan.h"
#include "model/source.h"
#include "tests/unit/lora_case.h"

static void test_split_names(void **state)
{
    (void)state;
    char target[64];
    rlb_lora_factor f;
    assert_int_equal(rlb__lora_split_name("model.layers.2.mlp.gate_proj.lora_B.weight", target,
                                          sizeof target, &f), 0);
    assert_string_equal(target, "model.layers.2.mlp.gate_proj.weight");
    assert_int_equal(f, RLB_LORA_B);
    assert_int_equal(rlb__lora_split_name("model.layers.2.mlp.gate_proj.weight", target,
                                          sizeof target, &f), RLB_EINVAL);
    assert_int_equal(rlb__lora_split_name(".lora_A.weight", target, sizeof target, &f),
                     RLB_EINVAL);
}

static void test_add_adapter_refusals(void **state)
{
    (void)state;
    rlb_model_config c;
    lc_small_config(&c, 1);
    rlb_param_list pl;
    char err[256];
    assert_int_equal(rlb__params_init(&pl, &c, NULL, 0), 0);
    int64_t n0 = pl.n;
    assert_int_equal(rlb__params_add_adapter(&pl, "model.layers.9.mlp.up_proj.weight", 4, 1,
                                             err, sizeof err), RLB_ENOTFOUND);
    assert_int_equal(rlb__params_add_adapter(&pl, "lm_head.weight", 4, 1, err, sizeof err),
                     RLB_ENOTFOUND); /* tied: there is no lm_head */
    assert_int_equal(rlb__params_add_adapter(&pl, "model.norm.weight", 4, 1, err, sizeof err),
                     RLB_EINVAL);
    assert_int_equal(rlb__params_add_adapter(&pl, "model.layers.0.self_attn.q_proj.bias", 4, 1,
                                             err, sizeof err), RLB_EINVAL);
    assert_int_equal(rlb__params_add_adapter(&pl, "model.layers.0.self_attn.q_proj.weight", 0,
                                             1, err, sizeof err), RLB_EINVAL);
    assert_int_equal(rlb__params_add_adapter(&pl, "model.layers.0.self_attn.k_proj.weight", 9,
                                             1, err, sizeof err), RLB_EINVAL); /* > 8 rows */
    assert_int_equal(rlb__params_add_adapter(&pl, "model.layers.0.self_attn.q_proj.weight", 4,
                                             NAN, err, sizeof err), RLB_EINVAL);
    assert_int_equal(pl.n, n0);
    assert_int_equal(rlb__params_add_adapter(&pl, "model.layers.0.self_attn.q_proj.weight", 4,
                                             2, err, sizeof err), 0);
    assert_int_equal(rlb__params_add_adapter(&pl, "model.layers.0.self_attn.q_proj.weight", 4,
                                             2, err, sizeof err), RLB_EEXIST);
    int64_t a = rlb__params_find(&pl, "model.layers.0.self_attn.q_proj.lora_A.weight");
    int64_t b = rlb__params_find(&pl, "model.layers.0.self_attn.q_proj.lora_B.weight");
    assert_true(a >= n0 && b >= n0);
    assert_int_equal(pl.params[a].rows, 4);
    assert_int_equal(pl.params[a].cols, 32);
    assert_int_equal(pl.params[b].rows, 32);
    assert_int_equal(pl.params[b].cols, 4);
    /* A factor of a weight without an adapter is dropped, not refused; one with is kept. */
    assert_true(rlb__params_is_dropped(&pl, "model.layers.1.mlp.down_proj.lora_A.weight"));
    assert_false(rlb__params_is_dropped(&pl, "model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert_false(rlb__params_is_dropped(&pl, "model.layers.7.mlp.down_proj.lora_A.weight"));
    /* Many adapters grow the list and its index; every name stays findable. */
    static const char *const mods[] = {"self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                       "mlp.down_proj"};
    char name[96];
    for (int l = 0; l < 2; l++)
        for (size_t k = 0; k < sizeof mods / sizeof mods[0]; k++) {
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, mods[k]);
            assert_int_equal(rlb__params_add_adapter(&pl, name, 2, 1, err, sizeof err), 0);
        }
    for (int64_t i = 0; i < pl.n; i++)
        assert_int_equal(rlb__params_find(&pl, pl.params[i].name), i);
    rlb__params_free(&pl);
}

/* ---- the merge against the reference --------------------------------------------------- */

/* Runs `plan` into the worker buffers dst[] on `threads` threads. */
static void run_plan(const rlb_plan *plan, const lc_case *c, uint8_t **dst, int threads)
{
    const void *src[LC_W];
    void *d[8];
    for (int b = 0; b < c->nbuf; b++)
        src[b] = c->buf[b];
    for (uint32_t i = 0; i < plan->n_dst; i++)
        d[i] = dst[i];
    char err[256] = "";
    if (rlb__plan_exec_cpu(plan, src, c->blen, d, plan->dst_bytes, threads, err, sizeof err))
        fail_msg("exec: %s", err);
}

static void run_case(int qwen_tied, int mode, rlb_dtype sdt, rlb_dtype ddt, int T, int wide)
{
    lc_case c;
    lc_plans p;
    lc_init(&c, qwen_tied, mode, sdt, wide, 0);
    rlb_target tgt = {.tp_size = T, .replicas = 1, .dtype = ddt};
    lc_plans_build(&c, &tgt, &p);
    uint8_t *dst[4], *base[4];
    for (int t = 0; t < T; t++) {
        dst[t] = calloc(1, p.plan.dst_bytes[t]);
        base[t] = calloc(1, p.plan.dst_bytes[t]);
    }
    lc_fill(&c, 1, 0);
    lc_write_sources(&c);
    run_plan(&p.base, &c, base, 2);
    for (uint64_t v = 1; v <= 2; v++) {
        lc_fill(&c, 100 + v, 1); /* new adapters, same base */
        lc_write_sources(&c);
        run_plan(&p.plan, &c, dst, wide ? 4 : 2);
        for (int t = 0; t < T; t++)
            lc_check_worker(&c, T, t, ddt, dst[t], 1, 0, NULL);
    }
    /* Adapters taken out: the same buffers get the base back, bit for bit. */
    run_plan(&p.base, &c, dst, 2);
    for (int t = 0; t < T; t++) {
        lc_check_worker(&c, T, t, ddt, dst[t], 0, 0, NULL);
        assert_memory_equal(dst[t], base[t], p.plan.dst_bytes[t]);
        free(dst[t]);
        free(base[t]);
    }
    lc_plans_free(&p);
    lc_free(&c);
}

static void test_merge_against_reference(void **state)
{
    (void)state;
    static const rlb_dtype dts[][2] = {{RLB_DTYPE_F32, RLB_DTYPE_F32},
                                       {RLB_DTYPE_BF16, RLB_DTYPE_BF16},
                                       {RLB_DTYPE_F32, RLB_DTYPE_BF16},
                                       {RLB_DTYPE_BF16, RLB_DTYPE_F16}};
    for (int qt = 0; qt < 2; qt++)
        for (int mode = LC_FULL; mode <= LC_FSDP1; mode++)
            for (int T = 1; T <= 4; T *= 2)
                for (size_t d = 0; d < sizeof dts / sizeof dts[0]; d++)
                    run_case(qt, mode, dts[d][0], dts[d][1], T, 0);
}

/* A wider model whose merges the executor splits over four threads (also run under TSan). */
static void test_threaded_merge(void **state)
{
    (void)state;
    run_case(0, LC_FSDP2, RLB_DTYPE_BF16, RLB_DTYPE_BF16, 2, 1);
    run_case(1, LC_FULL, RLB_DTYPE_F32, RLB_DTYPE_F32, 4, 1);
}

/* An F32 full-tensor case with every adapter declared, and its plans for `tgt`. */
typedef struct adapted_case {
    lc_case c;
    lc_plans p;
} adapted_case;

static void adapted_init(adapted_case *a, const rlb_target *tgt)
{
    lc_init(&a->c, 0, LC_FULL, RLB_DTYPE_F32, 0, 0);
    lc_plans_build(&a->c, tgt, &a->p);
}

static void adapted_free(adapted_case *a)
{
    lc_plans_free(&a->p);
    lc_free(&a->c);
}

/* Two replicas get the same merges, and a plan with merges has no wire form yet. */
static void test_replicas_and_wire(void **state)
{
    (void)state;
    rlb_target tgt = {.tp_size = 2, .replicas = 2, .dtype = RLB_DTYPE_F32};
    adapted_case a;
    adapted_init(&a, &tgt);
    lc_case *c = &a.c;
    rlb_plan *plan = &a.p.plan;
    char err[256] = "";
    lc_fill(c, 7, 0);
    lc_write_sources(c);
    uint8_t *dst[4];
    for (int d = 0; d < 4; d++)
        dst[d] = calloc(1, plan->dst_bytes[d]);
    run_plan(plan, c, dst, 2);
    for (int d = 0; d < 4; d++)
        lc_check_worker(c, 2, d % 2, RLB_DTYPE_F32, dst[d], 1, 0, NULL);
    assert_memory_equal(dst[0], dst[2], plan->dst_bytes[0]);
    uint8_t wire[64];
    assert_int_equal(rlb__plan_serialize(plan, wire, sizeof wire), RLB_EUNSUPPORTED);
    /* A merge outside its destination fails the run before anything is written. */
    plan->merges[0].rows = UINT32_MAX;
    memset(dst[0], 0x5a, plan->dst_bytes[0]);
    const void *s[1] = {c->buf[0]};
    void *d[4] = {dst[0], dst[1], dst[2], dst[3]};
    assert_int_equal(rlb__plan_exec_cpu(plan, s, c->blen, d, plan->dst_bytes, 1, err,
                                        sizeof err), RLB_EINVAL);
    assert_non_null(strstr(err, "merge 0"));
    assert_int_equal(dst[0][0], 0x5a);
    for (int i = 0; i < 4; i++)
        free(dst[i]);
    adapted_free(&a);
}

/* One run of `plan` through executor x, waiting on its eventfd; nonfinite as the run's. */
static void exec_run(rlb_executor *x, const rlb_plan *plan, const lc_case *c, uint8_t **dst,
                     uint64_t *nonfinite)
{
    void *src[LC_W], *d[8];
    for (int b = 0; b < c->nbuf; b++)
        src[b] = c->buf[b];
    for (uint32_t i = 0; i < plan->n_dst; i++)
        d[i] = dst[i];
    int fd = eventfd(0, EFD_CLOEXEC);
    assert_true(fd >= 0);
    char err[256] = "";
    rlb_exec_run run = {.plan = plan, .src = src, .src_len = c->blen, .dst = d,
                        .dst_len = plan->dst_bytes, .threads = 2, .nonfinite = nonfinite,
                        .done_fd = fd};
    if (x->iface->run(x, &run, err, sizeof err))
        fail_msg("executor run: %s", err);
    uint64_t one;
    assert_int_equal(read(fd, &one, sizeof one), sizeof one);
    double ms;
    if (x->iface->finish(x, &ms, err, sizeof err))
        fail_msg("executor finish: %s", err);
    close(fd);
}

/* The CPU executor runs a plan with merges as rlb__plan_exec_cpu does, run after run (its
 * stage kept), and counts the non-finite values merges write: a NaN in one B factor
 * poisons its rows of the merged weight, and nothing else. */
static void test_executor_merges(void **state)
{
    (void)state;
    rlb_target tgt = {.tp_size = 2, .replicas = 1, .dtype = RLB_DTYPE_BF16};
    adapted_case a;
    adapted_init(&a, &tgt);
    lc_case *c = &a.c;
    rlb_plan *plan = &a.p.plan;
    rlb_executor *x;
    assert_int_equal(rlb__executor_cpu_create(&x), 0);
    uint64_t n_counts = plan->n_ops + plan->n_merges;
    uint64_t *bad = malloc(n_counts * sizeof *bad);
    uint8_t *dst[2], *want[2];
    for (int t = 0; t < 2; t++) {
        dst[t] = calloc(1, plan->dst_bytes[t]);
        want[t] = calloc(1, plan->dst_bytes[t]);
    }
    lc_fill(c, 3, 0);
    for (uint64_t v = 1; v <= 2; v++) {
        lc_fill(c, 200 + v, 1);
        lc_write_sources(c);
        run_plan(plan, c, want, 1);
        memset(bad, 0xab, n_counts * sizeof *bad);
        exec_run(x, plan, c, dst, bad);
        for (int t = 0; t < 2; t++)
            assert_memory_equal(dst[t], want[t], plan->dst_bytes[t]);
        for (uint64_t i = 0; i < n_counts; i++)
            assert_int_equal(bad[i], 0);
    }
    /* B(0, 0) of the first adapter NaN: row 0 of its merged weight is NaN where it lands. */
    int pi = 0;
    while (c->ad[pi] < 0 || c->m.p[pi].which == P_EMBED)
        pi++;
    int bi = c->ad[pi] + 1;
    uint32_t nan_bits = 0x7fc00000u;
    memcpy(c->buf[0] + c->where[bi] * 4, &nan_bits, 4);
    exec_run(x, plan, c, dst, bad);
    uint64_t in_ops = 0, in_merges = 0, in_dst = 0;
    for (uint64_t i = 0; i < plan->n_ops; i++)
        in_ops += bad[i];
    for (uint64_t i = 0; i < plan->n_merges; i++)
        in_merges += bad[plan->n_ops + i];
    for (int t = 0; t < 2; t++)
        in_dst += rlb__row_nonfinite(dst[t], plan->dst_bytes[t] / 2, RLB_DTYPE_BF16);
    assert_int_equal(in_ops, 0);
    assert_int_equal(in_merges, (uint64_t)c->t[pi].cols);
    assert_int_equal(in_merges, in_dst);
    x->iface->destroy(x);
    for (int t = 0; t < 2; t++) {
        free(dst[t]);
        free(want[t]);
    }
    free(bad);
    adapted_free(&a);
}

/* Where the base of each element of merge m's block comes from, by applying its copies one
 * element at a time (the copy op's own definition, plan.h): src[k] / off[k] for element k
 * of the block (row-major), set[k] how many copies wrote it. */
static void apply_copies(const rlb_plan *plan, const rlb_merge_op *m, uint32_t *src,
                         uint64_t *off, uint8_t *set)
{
    const uint64_t des = rlb_dtype_size((rlb_dtype)m->dst_dtype);
    for (uint64_t c = 0; c < m->n_copies; c++) {
        const rlb_copy_op *o = &plan->merge_copies[m->copy_first + c];
        const int zero = o->src_ref == RLB_PLAN_ZERO_SRC;
        const uint64_t ses = zero ? 0 : rlb_dtype_size((rlb_dtype)o->src_dtype);
        for (uint64_t r = 0; r < o->rows; r++)
            for (uint64_t e = 0; e < o->row_elems; e++) {
                uint64_t at = o->dst_offset + r * o->dst_stride + e * des;
                assert_true(at >= m->dst_offset);
                uint64_t k = (at - m->dst_offset) / des;
                assert_true(k < m->rows * m->cols);
                src[k] = o->src_ref;
                off[k] = zero ? 0 : o->src_offset + r * o->src_stride + e * ses;
                set[k]++;
            }
    }
}

/* Every merge of every case's plan is pieces, and each element of each block is in exactly
 * one piece, which reads it where the copies would. Then two plans the pieces must refuse:
 * a copy dropped (a gap), and a copy given twice (an overlap). */
static void test_merge_pieces(void **state)
{
    (void)state;
    uint64_t n_merges = 0, n_pieces = 0, several = 0;
    for (int mode = LC_FULL; mode <= LC_FSDP1; mode++)
        for (int T = 1; T <= 4; T *= 2)
            for (int d = 0; d < 2; d++) {
                lc_case c;
                lc_plans p;
                rlb_dtype sdt = d ? RLB_DTYPE_F32 : RLB_DTYPE_BF16;
                lc_init(&c, (mode + T) % 2, mode, sdt, 0, 8);
                rlb_target tgt = {.tp_size = T, .replicas = 1, .dtype = RLB_DTYPE_BF16};
                lc_plans_build(&c, &tgt, &p);
                const rlb_plan *plan = &p.plan;
                assert_true(plan->n_merges > 0);
                for (uint64_t i = 0; i < plan->n_merges; i++) {
                    const rlb_merge_op *m = &plan->merges[i];
                    const uint64_t n = m->rows * m->cols;
                    uint32_t *src = calloc(n, sizeof *src);
                    uint64_t *off = calloc(n, sizeof *off);
                    uint8_t *set = calloc(n, 1), *seen = calloc(n, 1);
                    assert_true(src && off && set && seen);
                    apply_copies(plan, m, src, off, set);
                    rlb_piece_list l = {0};
                    assert_int_equal(rlb__merge_pieces(plan, m, &l), 0);
                    for (uint64_t q = 0; q < l.n; q++) {
                        const rlb_merge_piece *pc = &l.p[q];
                        const int zero = pc->src_ref == RLB_PLAN_ZERO_SRC;
                        const uint64_t ses = zero ? 0 : rlb_dtype_size((rlb_dtype)pc->src_dtype);
                        assert_true(pc->i0 < pc->i1 && pc->i1 <= m->rows);
                        assert_true(pc->j0 < pc->j1 && pc->j1 <= m->cols);
                        if (q)
                            assert_true(pc->i0 > l.p[q - 1].i0 ||
                                        (pc->i0 == l.p[q - 1].i0 && pc->j0 > l.p[q - 1].j0));
                        for (uint64_t r = pc->i0; r < pc->i1; r++)
                            for (uint64_t j = pc->j0; j < pc->j1; j++) {
                                uint64_t k = r * m->cols + j;
                                assert_int_equal(set[k], 1);
                                assert_int_equal(seen[k], 0);
                                seen[k] = 1;
                                assert_int_equal(pc->src_ref, src[k]);
                                if (!zero) {
                                    assert_int_equal(pc->src_dtype, sdt);
                                    assert_int_equal(pc->src_off + (r - pc->i0) * pc->src_stride +
                                                         (j - pc->j0) * ses,
                                                     off[k]);
                                }
                            }
                    }
                    for (uint64_t k = 0; k < n; k++)
                        assert_int_equal(seen[k], 1);
                    n_merges++;
                    n_pieces += l.n;
                    several += l.n > 1;
                    rlb__piece_list_free(&l);
                    free(src);
                    free(off);
                    free(set);
                    free(seen);
                }
                /* The first merge with two copies or more: one dropped, then one doubled. */
                for (uint64_t i = 0; i < plan->n_merges; i++) {
                    rlb_merge_op m = plan->merges[i];
                    if (m.n_copies < 2)
                        continue;
                    rlb_piece_list l = {0};
                    m.n_copies--;
                    assert_int_equal(rlb__merge_pieces(plan, &m, &l), 1);
                    assert_int_equal(l.n, 0);
                    rlb_plan twice = *plan;
                    rlb_copy_op *ops = malloc((m.n_copies + 2) * sizeof *ops);
                    assert_non_null(ops);
                    memcpy(ops, plan->merge_copies + m.copy_first,
                           (m.n_copies + 1) * sizeof *ops);
                    ops[m.n_copies + 1] = ops[0];
                    twice.merge_copies = ops;
                    m.copy_first = 0;
                    m.n_copies += 2;
                    assert_int_equal(rlb__merge_pieces(&twice, &m, &l), 1);
                    assert_int_equal(l.n, 0);
                    rlb__piece_list_free(&l); /* a refusal keeps what the list had grown to */
                    free(ops);
                    break;
                }
                lc_plans_free(&p);
                lc_free(&c);
            }
    printf("%llu merges in %llu pieces, %llu of them in more than one\n",
           (unsigned long long)n_merges, (unsigned long long)n_pieces,
           (unsigned long long)several);
    assert_true(several > 0); /* the FSDP cases cut blocks */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_split_names),
        cmocka_unit_test(test_add_adapter_refusals),
        cmocka_unit_test(test_merge_against_reference),
        cmocka_unit_test(test_threaded_merge),
        cmocka_unit_test(test_replicas_and_wire),
        cmocka_unit_test(test_executor_merges),
        cmocka_unit_test(test_merge_pieces),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
