/* test_plan: the reshard planner and CPU executor end to end, against the naive reference
 * of plan_ref.h (DESIGN §4 written out element by element).
 *
 * The property test draws random small models (D, I, H, KV, hd, V, layers, tied or not,
 * Qwen2 biases or not), a source layout (full tensors, FSDP2 over W = 1..8, FSDP1 units in
 * shuffled order with and without 16-byte alignment, or a mix), a TP size T in {1,2,4,8}
 * the heads allow, 1-2 replicas and source / worker dtypes. Each source element holds a
 * pseudo-random value keyed by (parameter, row, col); padding in FSDP1 chunks holds NaN
 * bytes that must never arrive. After the plan runs (through its serialized form), EVERY
 * element of every worker buffer is compared bit for bit with the reference conversion of
 * the element the reference says belongs there, padding rows must be zero, alignment gaps
 * must keep their poison, and the ops must cover each tensor byte exactly once.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "kernels/cpu/plan_exec.h"
#include "model/params.h"
#include "model/plan.h"
#include "model/source.h"
#include "model/tp_layout.h"
#include "tests/unit/plan_ref.h"
#include "tests/unit/ref_convert.h"

#define MAX_W 8
#define POISON 0xa5
#define VALUE_SEED UINT64_C(0x5eed0f1a7ba55e5)

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static uint64_t rng(uint64_t *s)
{
    return mix64(*s += UINT64_C(0x9e3779b97f4a7c15));
}

/* Uniform in [lo, hi]. */
static int64_t rnd(uint64_t *s, int64_t lo, int64_t hi)
{
    return lo + (int64_t)(rng(s) % (uint64_t)(hi - lo + 1));
}

static const rlb_dtype float_dtypes[] = {RLB_DTYPE_F32, RLB_DTYPE_BF16, RLB_DTYPE_F16};

/* The source bits of element (row, col) of parameter pid: a hash, nudged off the all-ones
 * exponent so it is never inf or NaN in its dtype. */
static uint32_t value_bits(int pid, int64_t row, int64_t col, rlb_dtype dtype)
{
    uint64_t h = mix64(VALUE_SEED ^ (uint64_t)pid << 48 ^ (uint64_t)row << 24 ^ (uint64_t)col);
    uint32_t b = (uint32_t)h;
    uint32_t emask = dtype == RLB_DTYPE_F32 ? 0x7f800000u : dtype == RLB_DTYPE_BF16 ? 0x7f80u
                                                                                    : 0x7c00u;
    if (dtype != RLB_DTYPE_F32)
        b &= 0xffffu;
    return (b & emask) == emask ? b ^ (emask & ~(emask >> 1)) : b;
}

/* ---- building a source the way trainers would register it ------------------------------- */

enum { M_FULL, M_FSDP2, M_FSDP1 };

/* Contiguous source bytes to fill: elements [elem0, elem0+n) of parameter pid, or padding
 * (pid -1) that gets NaN bytes. */
typedef struct fill_job {
    uint32_t buffer;
    uint64_t offset;
    rlb_dtype dtype;
    int pid;
    uint64_t elem0, n;
} fill_job;

/* One registration call to replay once the buffers are registered. */
typedef struct add_rec {
    int mode;                 /* M_* */
    int pid;                  /* full / FSDP2: the parameter */
    rlb_dtype dtype;          /* element type */
    rlb_src_loc loc[MAX_W];   /* full: loc[0]; FSDP2 / FSDP1: per rank */
    rlb_flat_entry *entries;  /* FSDP1 */
    uint64_t n_entries, chunk;
} add_rec;

typedef struct case_src {
    int W;                         /* FSDP world */
    uint64_t size[MAX_W + 1];      /* buffer 0: full tensors, 1 + f: rank f */
    uint8_t *mem[MAX_W + 1];       /* the buffers, after fill */
    rlb_dtype *pdtype;             /* [model n] source dtype of each parameter */
    add_rec *adds;
    int n_adds;
    fill_job *jobs;
    int n_jobs, cap_jobs;
    rlb_source src;
} case_src;

static uint64_t place(case_src *cs, uint32_t buffer, uint64_t bytes, uint64_t *s)
{
    uint64_t off = cs->size[buffer] + (uint64_t)rnd(s, 0, 3) * (rng(s) % 4 == 0); /* unaligned */
    cs->size[buffer] = off + bytes;
    return off;
}

static void add_job(case_src *cs, fill_job j)
{
    if (!j.n)
        return;
    if (cs->n_jobs == cs->cap_jobs) {
        cs->cap_jobs = cs->cap_jobs ? 2 * cs->cap_jobs : 64;
        cs->jobs = realloc(cs->jobs, (size_t)cs->cap_jobs * sizeof *cs->jobs);
    }
    cs->jobs[cs->n_jobs++] = j;
}

static uint64_t numel(const ref_param *p)
{
    return (uint64_t)p->rows * (uint64_t)p->cols;
}

static void gen_full(case_src *cs, const ref_model *m, int pid, uint64_t *s)
{
    add_rec *a = &cs->adds[cs->n_adds++];
    rlb_dtype dt = cs->pdtype[pid];
    *a = (add_rec){.mode = M_FULL, .pid = pid, .dtype = dt};
    a->loc[0] = (rlb_src_loc){0, place(cs, 0, numel(&m->p[pid]) * rlb_dtype_size(dt), s)};
    add_job(cs, (fill_job){0, a->loc[0].offset, dt, pid, 0, numel(&m->p[pid])});
}

static void gen_fsdp2(case_src *cs, const ref_model *m, int pid, uint64_t *s)
{
    add_rec *a = &cs->adds[cs->n_adds++];
    const ref_param *p = &m->p[pid];
    rlb_dtype dt = cs->pdtype[pid];
    *a = (add_rec){.mode = M_FSDP2, .pid = pid, .dtype = dt};
    uint64_t W = (uint64_t)cs->W, d0 = (uint64_t)p->rows, c = (d0 + W - 1) / W;
    for (uint32_t f = 0; f < W; f++) {
        uint64_t n_f = f * c >= d0 ? 0 : d0 - f * c < c ? d0 - f * c : c;
        if (!n_f) { /* an empty rank may or may not name a buffer */
            a->loc[f] = rng(s) % 2 ? (rlb_src_loc){RLB_SRC_NO_BUFFER, 0}
                                   : (rlb_src_loc){f + 1, cs->size[f + 1]};
            continue;
        }
        uint64_t n = n_f * (uint64_t)p->cols;
        a->loc[f] = (rlb_src_loc){f + 1, place(cs, f + 1, n * rlb_dtype_size(dt), s)};
        add_job(cs, (fill_job){f + 1, a->loc[f].offset, dt, pid, f * c * (uint64_t)p->cols, n});
    }
}

/* One FlatParameter over pids[0..n) (already in the unit's flat order), laid out as
 * torch's FlatParamHandle does: with `aligned`, padding before each parameter to a
 * multiple of 16 bytes and a tail padding entry up to a multiple of W; without, no padding
 * entries and the chunks simply run past the end. */
static void gen_fsdp1(case_src *cs, const ref_model *m, const int *pids, int n, int aligned,
                      rlb_dtype dt, uint64_t *s)
{
    add_rec *a = &cs->adds[cs->n_adds++];
    *a = (add_rec){.mode = M_FSDP1, .dtype = dt};
    a->entries = calloc((size_t)(2 * n + 1), sizeof *a->entries);
    uint64_t A = 16 / rlb_dtype_size(dt), W = (uint64_t)cs->W, total = 0;
    int *entry_pid = calloc((size_t)(2 * n + 1), sizeof *entry_pid);
    for (int k = 0; k < n; k++) {
        const ref_param *p = &m->p[pids[k]];
        if (aligned && total % A) {
            entry_pid[a->n_entries] = -1;
            a->entries[a->n_entries++] = (rlb_flat_entry){.numel = A - total % A};
            total += A - total % A;
        }
        entry_pid[a->n_entries] = pids[k];
        a->entries[a->n_entries++] = (rlb_flat_entry){
            .name = p->name, .ndim = p->ndim, .shape = {p->rows, p->cols}, .numel = numel(p)};
        total += numel(p);
        cs->pdtype[pids[k]] = dt;
    }
    if (aligned && total % W) {
        entry_pid[a->n_entries] = -1;
        a->entries[a->n_entries++] = (rlb_flat_entry){.numel = W - total % W};
        total += W - total % W;
    }
    uint64_t chunk = (total + W - 1) / W, esz = rlb_dtype_size(dt);
    a->chunk = chunk;
    for (uint32_t f = 0; f < W; f++) {
        uint64_t lo = f * chunk, hi = lo + chunk, start = 0;
        a->loc[f] = (rlb_src_loc){f + 1, place(cs, f + 1, chunk * esz, s)};
        for (uint64_t e = 0; e <= a->n_entries; e++) {
            /* entry e, or (e == n_entries) the implicit tail up to W * chunk */
            uint64_t len = e < a->n_entries ? a->entries[e].numel : W * chunk - start;
            uint64_t b = start > lo ? start : lo, en = start + len < hi ? start + len : hi;
            int pid = e < a->n_entries ? entry_pid[e] : -1;
            if (b < en)
                add_job(cs, (fill_job){f + 1, a->loc[f].offset + (b - lo) * esz, dt, pid,
                                       b - start, en - b});
            start += len;
        }
    }
    free(entry_pid);
}

/* Places every parameter of m: each takes a mode from `modes` (bit per M_*); FSDP1 ones go
 * into units of 1-6 parameters in shuffled order. align: 0 none, 1 all, 2 random per unit. */
static void gen_source(case_src *cs, const ref_model *m, int W, unsigned modes, int align,
                       uint64_t *s)
{
    memset(cs, 0, sizeof *cs);
    cs->W = W;
    cs->pdtype = calloc((size_t)m->n, sizeof *cs->pdtype);
    cs->adds = calloc((size_t)m->n, sizeof *cs->adds);
    int *flat = calloc((size_t)m->n, sizeof *flat), n_flat = 0;
    int allowed[3], n_allowed = 0;
    for (int k = 0; k < 3; k++)
        if (modes >> k & 1)
            allowed[n_allowed++] = k;
    for (int pid = 0; pid < m->n; pid++) {
        cs->pdtype[pid] = float_dtypes[rng(s) % 3];
        int mode = allowed[rng(s) % (uint64_t)n_allowed];
        if (mode == M_FULL)
            gen_full(cs, m, pid, s);
        else if (mode == M_FSDP2)
            gen_fsdp2(cs, m, pid, s);
        else
            flat[n_flat++] = pid;
    }
    for (int i = n_flat - 1; i > 0; i--) { /* shuffle: the metadata, not the order, rules */
        int j = (int)(rng(s) % (uint64_t)(i + 1)), t = flat[i];
        flat[i] = flat[j];
        flat[j] = t;
    }
    for (int i = 0; i < n_flat;) {
        int n = (int)rnd(s, 1, 6);
        n = n > n_flat - i ? n_flat - i : n;
        gen_fsdp1(cs, m, flat + i, n, align == 2 ? (int)(rng(s) % 2) : align,
                  float_dtypes[rng(s) % 3], s);
        i += n;
    }
    free(flat);
}

static void fill_buffers(case_src *cs, const ref_model *m)
{
    for (int b = 0; b <= cs->W; b++) {
        cs->mem[b] = malloc(cs->size[b] + 1);
        memset(cs->mem[b], 0x3c, cs->size[b]); /* bytes no placement covers */
    }
    for (int j = 0; j < cs->n_jobs; j++) {
        const fill_job *f = &cs->jobs[j];
        uint64_t esz = rlb_dtype_size(f->dtype);
        uint8_t *dst = cs->mem[f->buffer] + f->offset;
        if (f->pid < 0) {
            memset(dst, 0xff, f->n * esz); /* NaN in every float dtype */
            continue;
        }
        int64_t cols = m->p[f->pid].cols;
        for (uint64_t k = 0; k < f->n; k++) {
            uint64_t e = f->elem0 + k;
            uint32_t v = value_bits(f->pid, (int64_t)(e / (uint64_t)cols),
                                    (int64_t)(e % (uint64_t)cols), f->dtype);
            memcpy(dst + k * esz, &v, esz);
        }
    }
}

/* Registers the buffers and replays the add calls in a shuffled order; each must pass. */
static void register_source(case_src *cs, const ref_model *m, const rlb_param_list *pl,
                            uint64_t *s)
{
    char err[256] = "";
    assert_int_equal(rlb__source_init(&cs->src, pl), 0);
    for (int b = 0; b <= cs->W; b++)
        assert_int_equal(rlb__source_add_buffer(&cs->src, cs->size[b]), b);
    for (int i = cs->n_adds - 1; i > 0; i--) {
        int j = (int)(rng(s) % (uint64_t)(i + 1));
        add_rec t = cs->adds[i];
        cs->adds[i] = cs->adds[j];
        cs->adds[j] = t;
    }
    for (int i = 0; i < cs->n_adds; i++) {
        const add_rec *a = &cs->adds[i];
        int rc;
        if (a->mode == M_FSDP1) {
            rlb_flat_unit u = {.dtype = a->dtype, .world = cs->W, .chunk_numel = a->chunk,
                               .n_entries = a->n_entries, .entries = a->entries,
                               .ranks = a->loc};
            rc = rlb__source_add_fsdp1(&cs->src, &u, err, sizeof err);
        } else {
            const ref_param *p = &m->p[a->pid];
            int64_t shape[2] = {p->rows, p->cols};
            rc = a->mode == M_FULL
                     ? rlb__source_add_full(&cs->src, p->name, p->ndim, shape, a->dtype,
                                            a->loc[0].buffer, a->loc[0].offset, err, sizeof err)
                     : rlb__source_add_fsdp2(&cs->src, p->name, p->ndim, shape, a->dtype,
                                             cs->W, a->loc, err, sizeof err);
        }
        if (rc)
            fail_msg("add call %d (mode %d) failed: %s: %s", i, a->mode, rlb_strerror(rc), err);
    }
}

static void case_src_free(case_src *cs)
{
    for (int b = 0; b <= cs->W; b++)
        free(cs->mem[b]);
    for (int i = 0; i < cs->n_adds; i++)
        free(cs->adds[i].entries);
    free(cs->adds);
    free(cs->jobs);
    free(cs->pdtype);
    rlb__source_free(&cs->src);
}

/* ---- checking a plan and its result ------------------------------------------------------ */

/* The serialized plan must read back identical. */
static void roundtrip(const rlb_plan *plan, rlb_plan *out)
{
    uint64_t len = rlb__plan_serialized_size(plan);
    void *buf = malloc(len);
    char err[256] = "";
    assert_int_equal(rlb__plan_serialize(plan, buf, len - 1), RLB_ETOOBIG);
    assert_int_equal(rlb__plan_serialize(plan, buf, len), 0);
    int rc = rlb__plan_deserialize(buf, len, out, err, sizeof err);
    if (rc)
        fail_msg("deserialize: %s", err);
    assert_int_equal(out->n_src, plan->n_src);
    assert_int_equal(out->n_dst, plan->n_dst);
    assert_int_equal(out->n_ops, plan->n_ops);
    assert_memory_equal(out->src_bytes, plan->src_bytes, 8 * plan->n_src);
    assert_memory_equal(out->dst_bytes, plan->dst_bytes, 8 * plan->n_dst);
    assert_memory_equal(out->dst_first_op, plan->dst_first_op, 8 * (plan->n_dst + 1));
    assert_memory_equal(out->ops, plan->ops, plan->n_ops * sizeof(rlb_copy_op));
    assert_int_equal(out->bytes_written, plan->bytes_written);
    assert_int_equal(out->bytes_read, plan->bytes_read);
    free(buf);
}

/* Ops that continue each other must have been merged; contiguous rows collapsed. */
static void check_merged(const rlb_plan *plan)
{
    for (uint64_t i = 0; i < plan->n_ops; i++) {
        const rlb_copy_op *a = &plan->ops[i];
        uint64_t ses = a->src_ref == RLB_PLAN_ZERO_SRC ? 0 : rlb_dtype_size(a->src_dtype);
        uint64_t des = rlb_dtype_size(a->dst_dtype);
        if (a->rows > 1)
            assert_false(a->src_stride == a->row_elems * ses &&
                         a->dst_stride == a->row_elems * des);
        if (i + 1 == plan->n_ops)
            break;
        const rlb_copy_op *b = a + 1;
        if (a->rows == 1 && b->rows == 1 && a->src_ref == b->src_ref &&
            a->dst_ref == b->dst_ref && a->src_dtype == b->src_dtype &&
            a->dst_dtype == b->dst_dtype)
            assert_false(b->dst_offset == a->dst_offset + a->row_elems * des &&
                         b->src_offset == a->src_offset + a->row_elems * ses);
    }
}

/* Counts how often the ops write each byte of destination d: every tensor byte once,
 * every gap byte never. */
static void check_coverage(const rlb_plan *plan, uint32_t d, const ref_tensor *rt, int n_rt,
                           uint64_t total, uint64_t esz)
{
    uint8_t *count = calloc(total + 1, 1);
    for (uint64_t i = plan->dst_first_op[d]; i < plan->dst_first_op[d + 1]; i++) {
        const rlb_copy_op *op = &plan->ops[i];
        assert_int_equal(op->dst_ref, d);
        for (uint64_t r = 0; r < op->rows; r++)
            for (uint64_t b = 0; b < op->row_elems * esz; b++)
                count[op->dst_offset + r * op->dst_stride + b]++;
    }
    uint64_t pos = 0;
    for (int k = 0; k <= n_rt; k++) {
        uint64_t start = k < n_rt ? rt[k].offset : total;
        for (; pos < start; pos++)
            assert_int_equal(count[pos], 0);
        if (k == n_rt)
            break;
        uint64_t end = start + (uint64_t)rt[k].rows * (uint64_t)rt[k].cols * esz;
        for (; pos < end; pos++)
            if (count[pos] != 1)
                fail_msg("dst %u byte %llu (tensor kind %d layer %d) written %d times", d,
                         (unsigned long long)pos, rt[k].kind, rt[k].layer, count[pos]);
    }
    free(count);
}

/* The layout code must agree with the reference offsets and shapes. */
static void check_layout(const rlb_model_config *cfg, int T, int t, rlb_dtype dt,
                         const ref_tensor *rt, int n_rt, uint64_t total)
{
    rlb_tp_layout lay;
    assert_int_equal(rlb__tp_layout_init(&lay, cfg, T, t, dt), 0);
    assert_int_equal(lay.n_tensors, n_rt);
    assert_int_equal(lay.total_bytes, total);
    for (int k = 0; k < n_rt; k++) {
        const rlb_local_tensor *lt = rlb__tp_layout_find(&lay, rt[k].kind, rt[k].layer);
        assert_non_null(lt);
        assert_int_equal(lt->offset, rt[k].offset);
        assert_int_equal(lt->rows, rt[k].rows);
        assert_int_equal(lt->cols, rt[k].cols);
    }
    rlb__tp_layout_free(&lay);
}

/* Every element of destination d (rank t) against the reference; gaps keep the poison. */
static void check_elements(const ref_model *m, const case_src *cs, int T, int t, rlb_dtype dt,
                           const uint8_t *buf, const ref_tensor *rt, int n_rt, uint64_t total)
{
    uint64_t esz = rlb_dtype_size(dt), pos = 0;
    for (int k = 0; k < n_rt; k++) {
        for (; pos < rt[k].offset; pos++)
            assert_int_equal(buf[pos], POISON);
        for (int64_t r = 0; r < rt[k].rows; r++)
            for (int64_t c = 0; c < rt[k].cols; c++) {
                int which;
                int64_t grow, gcol;
                uint32_t want = 0, got = 0;
                if (ref_origin(&m->cfg, T, t, rt[k].kind, r, c, &which, &grow, &gcol)) {
                    int pid = m->idx[(rt[k].layer + 1) * P_KINDS + which];
                    assert_true(pid >= 0 && !m->p[pid].dropped);
                    rlb_dtype sdt = cs->pdtype[pid];
                    want = ref_bits(ref_value(value_bits(pid, grow, gcol, sdt), sdt), dt);
                }
                memcpy(&got, buf + rt[k].offset + ((uint64_t)r * (uint64_t)rt[k].cols +
                                                   (uint64_t)c) * esz, esz);
                if (got != want)
                    fail_msg("rank %d/%d tensor kind %d layer %d [%lld, %lld]: got 0x%x, "
                             "want 0x%x",
                             t, T, rt[k].kind, rt[k].layer, (long long)r, (long long)c, got,
                             want);
            }
        pos = rt[k].offset + (uint64_t)rt[k].rows * (uint64_t)rt[k].cols * esz;
    }
    for (; pos < total; pos++)
        assert_int_equal(buf[pos], POISON);
}

/* Plans, runs and checks one case. */
static void run_case(const ref_model *m, case_src *cs, int T, int R, rlb_dtype dt, int threads)
{
    char err[256] = "";
    rlb_plan built, plan;
    rlb_target tgt = {.tp_size = T, .replicas = R, .dtype = dt};
    int rc = rlb__plan_build(&cs->src, &tgt, &built, err, sizeof err);
    if (rc)
        fail_msg("plan build: %s: %s", rlb_strerror(rc), err);
    roundtrip(&built, &plan);
    check_merged(&plan);

    uint32_t n_dst = (uint32_t)(T * R);
    uint64_t esz = rlb_dtype_size(dt), tensor_bytes = 0;
    ref_tensor *rt = calloc((size_t)(3 + 7 * m->cfg.n_layers), sizeof *rt);
    uint64_t total;
    int n_rt = ref_tensors(&m->cfg, T, esz, rt, &total);
    for (int k = 0; k < n_rt; k++)
        tensor_bytes += (uint64_t)rt[k].rows * (uint64_t)rt[k].cols * esz;
    assert_int_equal(plan.n_dst, n_dst);
    assert_int_equal(plan.bytes_written, tensor_bytes * n_dst);

    void **dst = calloc(n_dst, sizeof *dst);
    uint64_t *dst_len = calloc(n_dst, sizeof *dst_len);
    for (uint32_t d = 0; d < n_dst; d++) {
        assert_int_equal(plan.dst_bytes[d], total);
        dst_len[d] = total;
        dst[d] = malloc(total);
        memset(dst[d], POISON, total);
    }
    uint64_t src_len[MAX_W + 1];
    for (int b = 0; b <= cs->W; b++)
        src_len[b] = cs->size[b];
    rc = rlb__plan_exec_cpu(&plan, (const void *const *)cs->mem, src_len, dst, dst_len, threads,
                            err, sizeof err);
    if (rc)
        fail_msg("exec: %s: %s", rlb_strerror(rc), err);
    for (uint32_t d = 0; d < n_dst; d++) {
        int t = (int)(d % (uint32_t)T);
        if (d < (uint32_t)T)
            check_layout(&m->cfg, T, t, dt, rt, n_rt, total);
        check_coverage(&plan, d, rt, n_rt, total, esz);
        check_elements(m, cs, T, t, dt, dst[d], rt, n_rt, total);
        free(dst[d]);
    }
    free(dst);
    free(dst_len);
    free(rt);
    rlb__plan_free(&plan);
    rlb__plan_free(&built);
}

/* Cases the property test draws; `test_plan N` runs N for a longer soak. */
static int n_cases = 250;

static void random_config(rlb_model_config *c, uint64_t *s)
{
    static const int kv_choices[] = {1, 2, 3, 4, 8};
    rlb__config_tiny(c);
    c->arch = rng(s) % 2 ? RLB_ARCH_QWEN2 : RLB_ARCH_LLAMA;
    c->attn_bias = c->arch == RLB_ARCH_QWEN2 && rng(s) % 4 != 0;
    c->n_kv_heads = kv_choices[rng(s) % 5];
    c->n_heads = c->n_kv_heads * rnd(s, 1, 4);
    c->head_dim = 2 * rnd(s, 1, 4);
    c->hidden = rnd(s, 1, 40);
    c->intermediate = rng(s) % 3 ? 8 * rnd(s, 1, 6) : rnd(s, 1, 30);
    c->n_layers = rnd(s, 1, 3);
    c->vocab = rnd(s, 1, 300);
    c->tie_embeddings = (int)(rng(s) % 2);
}

static int random_tp(const rlb_model_config *c, uint64_t *s)
{
    int valid[4], n = 0;
    for (int T = 1; T <= 8; T *= 2)
        if (rlb__tp_check(c, T, NULL, 0) == 0)
            valid[n++] = T;
    return valid[rng(s) % (uint64_t)n];
}

static void test_property_random(void **state)
{
    (void)state;
    /* source kinds cycled so each gets its share: modes bits, alignment */
    static const struct {
        unsigned modes;
        int align;
    } kinds[] = {
        {1u << M_FULL, 0},  {1u << M_FSDP2, 0}, {1u << M_FSDP1, 1},
        {1u << M_FSDP1, 0}, {7u, 2},
    };
    uint64_t s = 20240611;
    for (int i = 0; i < n_cases; i++) {
        rlb_model_config cfg;
        random_config(&cfg, &s);
        int T = random_tp(&cfg, &s), R = (int)rnd(&s, 1, 2), W = (int)rnd(&s, 1, MAX_W);
        rlb_dtype dt = float_dtypes[rng(&s) % 3];
        int k = i % 5, tied_head = cfg.tie_embeddings && rng(&s) % 2;
        if (n_cases <= 250)
            print_message("case %d: D %lld I %lld H %lld KV %lld hd %lld L %lld V %lld tie %d "
                      "bias %d | modes %u align %d W %d -> T %d x %d %s%s\n",
                      i, (long long)cfg.hidden, (long long)cfg.intermediate,
                      (long long)cfg.n_heads, (long long)cfg.n_kv_heads,
                      (long long)cfg.head_dim, (long long)cfg.n_layers, (long long)cfg.vocab,
                      cfg.tie_embeddings, cfg.attn_bias, kinds[k].modes, kinds[k].align, W, T,
                      R, rlb_dtype_name(dt), tied_head ? " (+lm_head sent)" : "");
        ref_model m;
        ref_model_init(&m, &cfg, tied_head);
        rlb_param_list pl;
        assert_int_equal(rlb__params_init(&pl, &cfg, NULL, 0), 0);
        case_src cs;
        gen_source(&cs, &m, W, kinds[k].modes, kinds[k].align, &s);
        register_source(&cs, &m, &pl, &s);
        fill_buffers(&cs, &m);
        run_case(&m, &cs, T, R, dt, (int)rnd(&s, 1, 3));
        case_src_free(&cs);
        rlb__params_free(&pl);
        ref_model_free(&m);
    }
}

int main(int argc, char **argv)
{
    if (argc > 1)
        n_cases = atoi(argv[1]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_property_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
