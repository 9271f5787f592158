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
 * must keep their poison, and the ops must cover each tensor byte exactly once. A tally
 * makes sure the draws reached every layout feature (uneven and empty FSDP2 ranks, FSDP1
 * with and without padding and cut by rank boundaries, each T, kv replication, ...).
 *
 * Hand-worked cases pin the reference itself: regions, element origins and buffer offsets
 * of one small model worked out on paper, and a full-tensor reshard read back element by
 * element. Also: the parameter list against the reference names, and a tied model's
 * lm_head.weight dropped with exactly one info line however it is sent.
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

/* What the random cases have exercised; the property test insists on each at the end, so
 * a change to the generators cannot quietly stop covering one. */
#define SEEN_ITEMS(X)                                                                      \
    X(FSDP2_UNEVEN, "FSDP2 tensor with d0 % W != 0")                                       \
    X(FSDP2_EMPTY_RANK, "FSDP2 tensor with d0 < W (ranks holding nothing)")                \
    X(FSDP1_ALIGNED, "FSDP1 unit with alignment padding")                                  \
    X(FSDP1_UNALIGNED, "FSDP1 unit without padding")                                       \
    X(FSDP1_SPLIT, "FSDP1 parameter cut by a rank boundary")                               \
    X(T1, "T = 1") X(T2, "T = 2") X(T4, "T = 4") X(T8, "T = 8")                            \
    X(KV_REPLICATED, "T > KV (kv heads replicated)")                                       \
    X(REPLICAS, "2 replicas")                                                              \
    X(TIED_SENT, "tied model whose source still sends lm_head.weight")                     \
    X(BIAS, "Qwen2 q/k/v biases")                                                          \
    X(VOCAB_PAD, "zero vocabulary padding rows")                                           \
    X(MIXED, "source mixing full, FSDP2 and FSDP1 placements")
enum {
#define SEEN_ENUM(id, text) SEEN_##id,
    SEEN_ITEMS(SEEN_ENUM)
#undef SEEN_ENUM
    SEEN_COUNT
};
static const char *const seen_text[SEEN_COUNT] = {
#define SEEN_TEXT(id, text) text,
    SEEN_ITEMS(SEEN_TEXT)
#undef SEEN_TEXT
};
static int seen[SEEN_COUNT];

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
        seen[SEEN_FSDP2_UNEVEN] += f == 0 && d0 % W != 0;
        seen[SEEN_FSDP2_EMPTY_RANK] += f == 0 && d0 < W;
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
    seen[SEEN_FSDP1_ALIGNED] += aligned;
    seen[SEEN_FSDP1_UNALIGNED] += !aligned;
    for (uint64_t e = 0, start = 0; e < a->n_entries; start += a->entries[e++].numel)
        seen[SEEN_FSDP1_SPLIT] += entry_pid[e] >= 0 &&
                            start / chunk != (start + a->entries[e].numel - 1) / chunk;
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

/* Runs fn with stderr sent to a temporary file; returns how many lines it logged that
 * contain `needle`. */
static int count_logged(void (*fn)(void *), void *arg, const char *needle)
{
    FILE *f = tmpfile();
    assert_non_null(f);
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    assert_true(saved >= 0 && dup2(fileno(f), STDERR_FILENO) >= 0);
    fn(arg);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    rewind(f);
    char line[1024];
    int n = 0;
    while (fgets(line, sizeof line, f))
        n += strstr(line, needle) != NULL;
    fclose(f);
    return n;
}

typedef struct register_job {
    case_src *cs;
    const ref_model *m;
    const rlb_param_list *pl;
    uint64_t *s;
} register_job;

static void register_job_run(void *arg)
{
    register_job *j = arg;
    register_source(j->cs, j->m, j->pl, j->s);
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
        seen[T == 1 ? SEEN_T1 : T == 2 ? SEEN_T2 : T == 4 ? SEEN_T4 : SEEN_T8]++;
        seen[SEEN_KV_REPLICATED] += T > cfg.n_kv_heads;
        seen[SEEN_REPLICAS] += R == 2;
        seen[SEEN_TIED_SENT] += tied_head;
        seen[SEEN_BIAS] += cfg.attn_bias;
        seen[SEEN_VOCAB_PAD] += rlb__tp_vocab_padded(cfg.vocab) != cfg.vocab;
        seen[SEEN_MIXED] += kinds[k].modes == 7u;
        register_job rj = {&cs, &m, &pl, &s};
        assert_int_equal(count_logged(register_job_run, &rj, "lm_head.weight ignored"),
                         tied_head);
        fill_buffers(&cs, &m);
        run_case(&m, &cs, T, R, dt, (int)rnd(&s, 1, 3));
        case_src_free(&cs);
        rlb__params_free(&pl);
        ref_model_free(&m);
    }
    for (int k = 0; k < SEEN_COUNT; k++)
        if (!seen[k])
            fail_msg("%d random cases never drew: %s", n_cases, seen_text[k]);
}

/* ---- hand-worked cases: they pin the reference above as much as the code ---------------- */

/* Llama, D 6, I 8, H 8, KV 2, hd 2, one layer, V 100 (Vp 128), untied. At T = 4: Hq 2,
 * KVt 1 and each kv head serves two ranks (kv0 = t / 2); vocab rows 32 per rank, rank 3
 * holding tokens 96..99 and 28 zero rows. */
static void config_a(rlb_model_config *c)
{
    rlb__config_tiny(c);
    c->arch = RLB_ARCH_LLAMA;
    c->attn_bias = 0;
    c->hidden = 6;
    c->intermediate = 8;
    c->n_heads = 8;
    c->n_kv_heads = 2;
    c->head_dim = 2;
    c->n_layers = 1;
    c->vocab = 100;
    c->tie_embeddings = 0;
}

static void expect_region(const rlb_param_list *pl, const char *name, int T, int t,
                          rlb_param_region want)
{
    rlb_tp_layout lay;
    assert_int_equal(rlb__tp_layout_init(&lay, &pl->cfg, T, t, RLB_DTYPE_BF16), 0);
    int64_t i = rlb__params_find(pl, name);
    assert_true(i >= 0);
    rlb_param_region r;
    rlb__param_region(&pl->params[i], &lay, &r);
    if (memcmp(&r, &want, sizeof r) != 0)
        fail_msg("%s on %d/%d: rows %lld+%lld cols %lld+%lld at (%lld, %lld) of %lld cols, "
                 "zero %lld+%lld",
                 name, t, T, (long long)r.row0, (long long)r.n_rows, (long long)r.col0,
                 (long long)r.n_cols, (long long)r.lrow0, (long long)r.lcol0,
                 (long long)r.local_cols, (long long)r.zero_row0, (long long)r.n_zero_rows);
    rlb__tp_layout_free(&lay);
}

static void test_hand_worked_regions(void **state)
{
    (void)state;
    rlb_model_config c;
    config_a(&c);
    rlb_param_list pl;
    assert_int_equal(rlb__params_init(&pl, &c, NULL, 0), 0);
    static const struct {
        const char *name;
        int T, t;
        rlb_param_region want; /* row0 n_rows col0 n_cols lrow0 lcol0 local_cols z0 n_zero */
    } regions[] = {
        {"model.layers.0.self_attn.q_proj.weight", 4, 3, {12, 4, 0, 6, 0, 0, 6, 0, 0}},
        {"model.layers.0.self_attn.k_proj.weight", 4, 3, {2, 2, 0, 6, 4, 0, 6, 0, 0}},
        {"model.layers.0.self_attn.k_proj.weight", 4, 2, {2, 2, 0, 6, 4, 0, 6, 0, 0}},
        {"model.layers.0.self_attn.k_proj.weight", 4, 1, {0, 2, 0, 6, 4, 0, 6, 0, 0}},
        {"model.layers.0.self_attn.v_proj.weight", 4, 3, {2, 2, 0, 6, 6, 0, 6, 0, 0}},
        {"model.layers.0.self_attn.k_proj.weight", 2, 1, {2, 2, 0, 6, 8, 0, 6, 0, 0}},
        {"model.layers.0.mlp.gate_proj.weight", 4, 3, {6, 2, 0, 6, 0, 0, 6, 0, 0}},
        {"model.layers.0.mlp.up_proj.weight", 4, 3, {6, 2, 0, 6, 2, 0, 6, 0, 0}},
        {"model.layers.0.self_attn.o_proj.weight", 4, 3, {0, 6, 12, 4, 0, 0, 4, 0, 0}},
        {"model.layers.0.mlp.down_proj.weight", 4, 1, {0, 6, 2, 2, 0, 0, 2, 0, 0}},
        {"model.embed_tokens.weight", 4, 3, {96, 4, 0, 6, 0, 0, 6, 4, 28}},
        {"lm_head.weight", 4, 2, {64, 32, 0, 6, 0, 0, 6, 32, 0}},
        {"model.layers.0.input_layernorm.weight", 4, 2, {0, 6, 0, 1, 0, 0, 1, 0, 0}},
    };
    for (size_t k = 0; k < sizeof regions / sizeof regions[0]; k++)
        expect_region(&pl, regions[k].name, regions[k].T, regions[k].t, regions[k].want);

    /* The reference mapping of plan_ref.h agrees on the same elements. */
    int which;
    int64_t grow, gcol;
    static const struct {
        int t;
        rlb_wkind kind;
        int64_t lrow, lcol;
        int which, holds;
        int64_t grow, gcol;
    } pins[] = {
        {3, RLB_W_QKV, 4, 5, P_K, 1, 2, 5},   {2, RLB_W_QKV, 4, 5, P_K, 1, 2, 5},
        {1, RLB_W_QKV, 5, 0, P_K, 1, 1, 0},   {3, RLB_W_QKV, 7, 0, P_V, 1, 3, 0},
        {3, RLB_W_QKV, 1, 0, P_Q, 1, 13, 0},  {3, RLB_W_EMBED, 3, 2, P_EMBED, 1, 99, 2},
        {3, RLB_W_EMBED, 4, 2, P_EMBED, 0, 100, 2}, {3, RLB_W_GATE_UP, 3, 0, P_UP, 1, 7, 0},
        {3, RLB_W_O, 5, 1, P_O, 1, 5, 13},    {1, RLB_W_DOWN, 0, 1, P_DOWN, 1, 0, 3},
    };
    for (size_t k = 0; k < sizeof pins / sizeof pins[0]; k++) {
        int holds = ref_origin(&c, 4, pins[k].t, pins[k].kind, pins[k].lrow, pins[k].lcol,
                               &which, &grow, &gcol);
        assert_int_equal(holds, pins[k].holds);
        assert_int_equal(which, pins[k].which);
        assert_int_equal(grow, pins[k].grow);
        assert_int_equal(gcol, pins[k].gcol);
    }

    /* BF16 worker buffer of rank 0 of 4, offsets worked out by hand (256-byte steps). */
    static const struct {
        rlb_wkind kind;
        int layer;
        uint64_t offset, bytes;
    } at[] = {
        {RLB_W_EMBED, -1, 0, 384},   {RLB_W_FINAL_NORM, -1, 512, 12}, {RLB_W_LM_HEAD, -1, 768, 384},
        {RLB_W_ATTN_NORM, 0, 1280, 12}, {RLB_W_QKV, 0, 1536, 96},     {RLB_W_O, 0, 1792, 48},
        {RLB_W_MLP_NORM, 0, 2048, 12},  {RLB_W_GATE_UP, 0, 2304, 48}, {RLB_W_DOWN, 0, 2560, 24},
    };
    rlb_tp_layout lay;
    assert_int_equal(rlb__tp_layout_init(&lay, &c, 4, 0, RLB_DTYPE_BF16), 0);
    assert_int_equal(lay.total_bytes, 2816);
    for (size_t k = 0; k < sizeof at / sizeof at[0]; k++) {
        const rlb_local_tensor *lt = rlb__tp_layout_find(&lay, at[k].kind, at[k].layer);
        assert_non_null(lt);
        assert_int_equal(lt->offset, at[k].offset);
        assert_int_equal(lt->bytes, at[k].bytes);
    }
    assert_null(rlb__tp_layout_find(&lay, RLB_W_QKV_BIAS, 0));
    rlb__tp_layout_free(&lay);
    rlb__params_free(&pl);
}

/* Element (r, c) of parameter i holds i * 10000 + r * 100 + c, exact in F32. */
static float tagged(int64_t i, int64_t r, int64_t c)
{
    return (float)(i * 10000 + r * 100 + c);
}

/* Config A from full F32 tensors to T = 4 F32 workers, then single elements read by hand:
 * kv heads replicated to rank pairs, vocabulary padding zero, o_proj columns split. */
static void test_hand_worked_end_to_end(void **state)
{
    (void)state;
    rlb_model_config c;
    config_a(&c);
    rlb_param_list pl;
    rlb_source src;
    assert_int_equal(rlb__params_init(&pl, &c, NULL, 0), 0);
    assert_int_equal(rlb__source_init(&src, &pl), 0);
    uint64_t total = 0;
    for (int64_t i = 0; i < pl.n; i++)
        total += rlb__param_numel(&pl.params[i]) * 4;
    float *mem = malloc(total);
    assert_int_equal(rlb__source_add_buffer(&src, total), 0);
    for (int64_t i = 0, off = 0; i < pl.n; i++) {
        const rlb_param *p = &pl.params[i];
        int64_t shape[2] = {p->rows, p->cols};
        for (int64_t r = 0; r < p->rows; r++)
            for (int64_t k = 0; k < p->cols; k++)
                mem[off + r * p->cols + k] = tagged(i, r, k);
        assert_int_equal(rlb__source_add_full(&src, p->name, p->ndim, shape, RLB_DTYPE_F32, 0,
                                              (uint64_t)off * 4, NULL, 0),
                         0);
        off += p->rows * p->cols;
    }
    rlb_plan plan;
    rlb_target tgt = {.tp_size = 4, .replicas = 1, .dtype = RLB_DTYPE_F32};
    assert_int_equal(rlb__plan_build(&src, &tgt, &plan, NULL, 0), 0);
    float *dst[4];
    uint64_t dst_len[4];
    for (int t = 0; t < 4; t++) {
        dst_len[t] = plan.dst_bytes[t];
        dst[t] = malloc(dst_len[t]);
        memset(dst[t], 0xff, dst_len[t]);
    }
    const void *srcs[1] = {mem};
    assert_int_equal(rlb__plan_exec_cpu(&plan, srcs, &total, (void *const *)dst, dst_len, 2,
                                        NULL, 0),
                     0);
    int64_t k = rlb__params_find(&pl, "model.layers.0.self_attn.k_proj.weight");
    int64_t v = rlb__params_find(&pl, "model.layers.0.self_attn.v_proj.weight");
    int64_t o = rlb__params_find(&pl, "model.layers.0.self_attn.o_proj.weight");
    int64_t e = rlb__params_find(&pl, "model.embed_tokens.weight");
    /* F32 bytes: embed 0 (768), final norm 768 (24), lm_head 1024 (768), attn norm 1792
     * (24), qkv 2048 (rows of 6 floats), o 2304 (rows of 4). */
    const uint64_t qkv = 2048 / 4, o_at = 2304 / 4;
    for (int t = 0; t < 4; t++) {
        int64_t kv = t / 2; /* the kv head rank t holds */
        assert_true(dst[t][qkv + 4 * 6 + 5] == tagged(k, 2 * kv, 5));     /* k row 0 */
        assert_true(dst[t][qkv + 7 * 6 + 0] == tagged(v, 2 * kv + 1, 0)); /* v row 1 */
        assert_true(dst[t][o_at + 5 * 4 + 1] == tagged(o, 5, 4 * t + 1));
        assert_true(dst[t][31 * 6 + 5] == (t < 3 ? tagged(e, 32 * t + 31, 5) : 0.0f));
    }
    assert_true(dst[3][3 * 6] == tagged(e, 99, 0));
    for (int r = 4; r < 32; r++)
        for (int col = 0; col < 6; col++)
            assert_true(dst[3][r * 6 + col] == 0.0f);
    for (int t = 0; t < 4; t++)
        free(dst[t]);
    free(mem);
    rlb__plan_free(&plan);
    rlb__source_free(&src);
    rlb__params_free(&pl);
}

/* The list holds every parameter once, in the documented order, and finds it by name. */
static void test_param_list(void **state)
{
    (void)state;
    rlb_model_config c;
    config_a(&c);
    static const struct {
        int qwen_tied;
        int64_t layers, n;
    } shapes[] = {{0, 1, 3 + 9}, {1, 3, 2 + 3 * 12}, {0, 40, 3 + 40 * 9}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        c.arch = shapes[s].qwen_tied ? RLB_ARCH_QWEN2 : RLB_ARCH_LLAMA;
        c.attn_bias = c.tie_embeddings = shapes[s].qwen_tied;
        c.n_layers = shapes[s].layers;
        rlb_param_list pl;
        assert_int_equal(rlb__params_init(&pl, &c, NULL, 0), 0);
        ref_model m;
        ref_model_init(&m, &c, 0);
        assert_int_equal(pl.n, shapes[s].n);
        assert_int_equal(m.n, pl.n);
        assert_string_equal(pl.params[0].name, "model.embed_tokens.weight");
        assert_string_equal(pl.params[pl.n - 1].name,
                            c.tie_embeddings ? "model.norm.weight" : "lm_head.weight");
        for (int i = 0; i < m.n; i++) {
            int64_t at = rlb__params_find(&pl, m.p[i].name);
            if (at < 0)
                fail_msg("%s not found", m.p[i].name);
            assert_string_equal(pl.params[at].name, m.p[i].name);
            assert_int_equal(pl.params[at].ndim, m.p[i].ndim);
            assert_int_equal(pl.params[at].rows, m.p[i].rows);
            assert_int_equal(pl.params[at].cols, m.p[i].cols);
            assert_int_equal(pl.params[at].layer, m.p[i].layer);
        }
        char name[64];
        snprintf(name, sizeof name, "model.layers.%lld.mlp.up_proj.weight", (long long)c.n_layers);
        assert_int_equal(rlb__params_find(&pl, name), -1);
        assert_int_equal(rlb__params_find(&pl, "model.norm"), -1);
        assert_int_equal(rlb__params_find(&pl, ""), -1);
        assert_int_equal(rlb__params_find(&pl, NULL), -1);
        assert_int_equal(rlb__params_find(&pl, "model.layers.0.self_attn.o_proj.bias"), -1);
        assert_int_equal(rlb__params_find(&pl, "model.layers.0.self_attn.q_proj.bias") >= 0,
                         c.attn_bias);
        assert_int_equal(rlb__params_find(&pl, "lm_head.weight") >= 0, !c.tie_embeddings);
        assert_int_equal(rlb__params_is_dropped(&pl, "lm_head.weight"), c.tie_embeddings);
        assert_int_equal(rlb__params_is_dropped(&pl, "model.norm.weight"), 0);
        ref_model_free(&m);
        rlb__params_free(&pl);
    }
    c.head_dim = 3; /* odd: the config itself is refused, naming the field */
    rlb_param_list pl;
    char err[128] = "";
    assert_int_equal(rlb__params_init(&pl, &c, err, sizeof err), RLB_EINVAL);
    assert_non_null(strstr(err, "head_dim"));
}

typedef struct tie_case {
    rlb_source *src;
    const rlb_model_config *cfg;
    int how; /* 0 full, 1 FSDP2, 2 FSDP1 unit with model.norm.weight */
    uint32_t buffer;
    int rc;
} tie_case;

static void send_lm_head(void *arg)
{
    tie_case *tc = arg;
    int64_t shape[2] = {tc->cfg->vocab, tc->cfg->hidden};
    rlb_src_loc ranks[2] = {{tc->buffer, 0}, {tc->buffer, 0}};
    uint64_t numel = (uint64_t)(shape[0] * shape[1]), D = (uint64_t)tc->cfg->hidden;
    rlb_flat_entry e[2] = {{"model.norm.weight", 1, {shape[1], 0}, D},
                           {"lm_head.weight", 2, {shape[0], shape[1]}, numel}};
    rlb_flat_unit u = {.dtype = RLB_DTYPE_F32, .world = 2, .chunk_numel = (numel + D) / 2,
                       .n_entries = 2, .entries = e, .ranks = ranks};
    if (tc->how == 0)
        tc->rc = rlb__source_add_full(tc->src, "lm_head.weight", 2, shape, RLB_DTYPE_F32,
                                      tc->buffer, 0, NULL, 0);
    else if (tc->how == 1)
        tc->rc = rlb__source_add_fsdp2(tc->src, "lm_head.weight", 2, shape, RLB_DTYPE_F32, 2,
                                       ranks, NULL, 0);
    else
        tc->rc = rlb__source_add_fsdp1(tc->src, &u, NULL, 0);
}

/* A tied model's lm_head.weight, however it arrives, is accepted, dropped, and said so in
 * exactly one info line per call; the plan has no LM head. */
static void test_tied_lm_head_dropped(void **state)
{
    (void)state;
    rlb_model_config c;
    config_a(&c);
    c.tie_embeddings = 1;
    rlb_param_list pl;
    assert_int_equal(rlb__params_init(&pl, &c, NULL, 0), 0);
    for (int how = 0; how < 3; how++) {
        rlb_source src;
        assert_int_equal(rlb__source_init(&src, &pl), 0);
        uint64_t big = (uint64_t)(c.vocab * c.hidden + c.hidden) * 4;
        assert_int_equal(rlb__source_add_buffer(&src, big), 0);
        for (int64_t i = 0; i < pl.n; i++) {
            const rlb_param *p = &pl.params[i];
            int64_t shape[2] = {p->rows, p->cols};
            if (how < 2 || strcmp(p->name, "model.norm.weight") != 0)
                assert_int_equal(rlb__source_add_full(&src, p->name, p->ndim, shape,
                                                      RLB_DTYPE_F32, 0, 0, NULL, 0),
                                 0);
        }
        uint64_t pieces = src.n_pieces;
        tie_case tc = {.src = &src, .cfg = &c, .how = how, .buffer = 0};
        assert_int_equal(count_logged(send_lm_head, &tc, "lm_head.weight ignored"), 1);
        assert_int_equal(tc.rc, 0);
        assert_int_equal(src.n_pieces, pieces + (how == 2)); /* FSDP1: the norm only */
        assert_int_equal(rlb__source_check(&src, NULL, 0), 0);
        rlb_plan plan;
        rlb_target tgt = {.tp_size = 2, .replicas = 1, .dtype = RLB_DTYPE_BF16};
        assert_int_equal(rlb__plan_build(&src, &tgt, &plan, NULL, 0), 0);
        rlb_tp_layout lay;
        assert_int_equal(rlb__tp_layout_init(&lay, &c, 2, 0, RLB_DTYPE_BF16), 0);
        assert_null(rlb__tp_layout_find(&lay, RLB_W_LM_HEAD, -1));
        assert_int_equal(plan.dst_bytes[0], lay.total_bytes);
        rlb__tp_layout_free(&lay);
        rlb__plan_free(&plan);
        rlb__source_free(&src);
    }
    rlb__params_free(&pl);

    /* Untied, a missing lm_head is an error, and nothing about it is logged as dropped. */
    c.tie_embeddings = 0;
    assert_int_equal(rlb__params_init(&pl, &c, NULL, 0), 0);
    rlb_source src;
    assert_int_equal(rlb__source_init(&src, &pl), 0);
    char err[256] = "";
    assert_int_equal(rlb__source_check(&src, err, sizeof err), RLB_ENOTFOUND);
    assert_non_null(strstr(err, "model.embed_tokens.weight"));
    tie_case tc = {.src = &src, .cfg = &c, .how = 0, .buffer = 7}; /* no buffer 7 */
    assert_int_equal(count_logged(send_lm_head, &tc, "ignored"), 0);
    assert_int_equal(tc.rc, RLB_EINVAL);
    rlb__source_free(&src);
    rlb__params_free(&pl);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        n_cases = atoi(argv[1]);
    /* The tie test reads the info line lm_head.weight's drop leaves in the log. */
    setenv("RLB_LOG", "info:model", 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hand_worked_regions), cmocka_unit_test(test_hand_worked_end_to_end),
        cmocka_unit_test(test_param_list),          cmocka_unit_test(test_tied_lm_head_dropped),
        cmocka_unit_test(test_property_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
