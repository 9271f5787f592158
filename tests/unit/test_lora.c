/* test_lora: LoRA adapters through the planner and the CPU executor (DESIGN §10), against
 * a naive double-precision reference of W + s * B * A written here element by element.
 *
 * The reference shares no code with the planner or executor: plan_ref.h (the tests' own
 * reading of DESIGN §4) says which global (parameter, row, col) each worker element holds,
 * and this file keeps every tensor's global values in doubles, so the expected element is
 * W[row, col] + s * sum_j B[row, j] * A[j, col] (for the embedding, PEFT's transpose:
 * s * sum_j A[j, row] * B[col, j]). Each case registers the base and the adapters of all
 * seven targets (plus the embedding and an untied lm_head) as full tensors, FSDP2 shards
 * (uneven, with empty ranks) or one FSDP1 unit (alignment padding holding NaN), runs two
 * versions with new adapter values (each must equal the reference, so nothing drifts from
 * the pristine base), then takes the adapters out of the parameter list and runs again:
 * every worker buffer must then be the plain reshard of the base, bit for bit.
 *
 * Also: factor names and the refusals of rlb__params_add_adapter, and the CPU executor
 * seam running merges from sync to sync while counting the NaN / Inf values they write.
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
#include "model/params.h"
#include "model/plan.h"
#include "model/source.h"
#include "tests/unit/plan_ref.h"
#include "tests/unit/ref_convert.h"

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

static void small_config(rlb_model_config *c, int qwen_tied)
{
    rlb__config_tiny(c);
    c->arch = qwen_tied ? RLB_ARCH_QWEN2 : RLB_ARCH_LLAMA;
    c->attn_bias = c->tie_embeddings = qwen_tied;
    c->hidden = 32;
    c->intermediate = 48;
    c->n_heads = 4;
    c->n_kv_heads = qwen_tied ? 1 : 2;
    c->head_dim = 8;
    c->n_layers = 2;
    c->vocab = 100;
}

static void test_add_adapter_refusals(void **state)
{
    (void)state;
    rlb_model_config c;
    small_config(&c, 1);
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

enum { M_FULL, M_FSDP2, M_FSDP1 };
#define W_FSDP 3 /* FSDP world: uneven rows, and ranks with nothing of a rank-2 A */

typedef struct tens {
    char name[96];
    int ndim;
    int64_t rows, cols;
    double *val; /* global values, row-major, each exact in the source dtype */
} tens;

typedef struct lcase {
    rlb_model_config cfg;
    ref_model m;
    int n;          /* tensors: m.n base tensors, then A, B of each adapter */
    tens *t;
    int *ad;        /* [m.n]: index of the base tensor's A factor (B follows), or -1 */
    float *scale;   /* [m.n]: the adapter's scale */
    int64_t *rank;  /* [m.n]: its rank */
    rlb_dtype sdt;  /* source dtype */
    int mode;       /* M_* */
    uint8_t **buf;  /* source buffers */
    uint64_t *blen;
    int nbuf;
    uint64_t *where; /* full / FSDP1: flat element offset of tensor i in its layout */
} lcase;

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

/* A value in [-amp, amp] exact in dtype, keyed by (seed, tensor, element). */
static double draw(uint64_t seed, int ti, uint64_t e, double amp, rlb_dtype dtype)
{
    uint64_t h = mix64(seed ^ (uint64_t)ti << 40 ^ e);
    double x = ((double)(h % 20001) / 10000.0 - 1.0) * amp;
    return ref_value(ref_bits((double)(float)x, dtype), dtype);
}

static void fill_values(lcase *c, uint64_t seed, int adapters_only)
{
    for (int i = adapters_only ? c->m.n : 0; i < c->n; i++) {
        uint64_t n = (uint64_t)(c->t[i].rows * c->t[i].cols);
        for (uint64_t e = 0; e < n; e++)
            c->t[i].val[e] = draw(seed, i, e, i < c->m.n ? 1.0 : 0.5, c->sdt);
    }
}

static void put(uint8_t *p, double v, rlb_dtype dt)
{
    uint32_t bits = ref_bits(v, dt);
    memcpy(p, &bits, rlb_dtype_size(dt)); /* little-endian: the low bytes */
}

static uint64_t fsdp2_rows(int64_t d0, int f, uint64_t *first)
{
    uint64_t c = ((uint64_t)d0 + W_FSDP - 1) / W_FSDP;
    *first = (uint64_t)f * c;
    return *first >= (uint64_t)d0 ? 0 : ((uint64_t)d0 - *first < c ? (uint64_t)d0 - *first : c);
}

/* FSDP1: each tensor starts at a multiple of this many elements (use_orig_params). */
static uint64_t fsdp1_align(rlb_dtype dt)
{
    return 16 / rlb_dtype_size(dt);
}

/* Writes every tensor's values into the source buffers of the case's layout. */
static void write_sources(lcase *c)
{
    uint64_t es = rlb_dtype_size(c->sdt);
    uint64_t off[W_FSDP] = {0};
    for (int i = 0; i < c->n; i++) {
        const tens *t = &c->t[i];
        uint64_t n = (uint64_t)(t->rows * t->cols);
        if (c->mode == M_FSDP2) {
            for (int f = 0; f < W_FSDP; f++) {
                uint64_t first, rows = fsdp2_rows(t->rows, f, &first);
                for (uint64_t e = 0; e < rows * (uint64_t)t->cols; e++)
                    put(c->buf[f] + off[f] + e * es, t->val[first * (uint64_t)t->cols + e],
                        c->sdt);
                off[f] += rows * (uint64_t)t->cols * es;
            }
            continue;
        }
        uint64_t chunk = c->mode == M_FSDP1 ? c->blen[0] / es : UINT64_MAX;
        for (uint64_t e = 0; e < n; e++) {
            uint64_t pos = c->where[i] + e;
            put(c->buf[pos / chunk] + pos % chunk * es, t->val[e], c->sdt);
        }
    }
}

/* Builds the buffers and registers every tensor with `src` (buffers added first). */
static void register_sources(lcase *c, rlb_source *src, int alloc)
{
    uint64_t es = rlb_dtype_size(c->sdt);
    if (alloc) {
        c->where = calloc((size_t)c->n, sizeof *c->where);
        c->nbuf = c->mode == M_FULL ? 1 : W_FSDP;
        c->buf = calloc((size_t)c->nbuf, sizeof *c->buf);
        c->blen = calloc((size_t)c->nbuf, sizeof *c->blen);
        uint64_t pos = 0;
        for (int i = 0; i < c->n; i++) {
            uint64_t n = (uint64_t)(c->t[i].rows * c->t[i].cols);
            if (c->mode == M_FSDP1)
                pos = (pos + fsdp1_align(c->sdt) - 1) / fsdp1_align(c->sdt) * fsdp1_align(c->sdt);
            c->where[i] = pos;
            pos += n;
            if (c->mode == M_FSDP2)
                for (int f = 0; f < W_FSDP; f++) {
                    uint64_t first;
                    c->blen[f] += fsdp2_rows(c->t[i].rows, f, &first) * (uint64_t)c->t[i].cols * es;
                }
        }
        if (c->mode == M_FULL)
            c->blen[0] = pos * es;
        if (c->mode == M_FSDP1)
            for (int f = 0; f < W_FSDP; f++)
                c->blen[f] = (pos + W_FSDP - 1) / W_FSDP * es;
        for (int b = 0; b < c->nbuf; b++) {
            c->buf[b] = malloc(c->blen[b] + 1);
            memset(c->buf[b], 0xff, c->blen[b] + 1); /* NaN in every dtype: padding */
        }
    }
    for (int b = 0; b < c->nbuf; b++)
        assert_int_equal(rlb__source_add_buffer(src, c->blen[b]), b);
    char err[256] = "";
    if (c->mode == M_FULL) {
        for (int i = 0; i < c->n; i++) {
            int64_t shape[2] = {c->t[i].rows, c->t[i].cols};
            if (rlb__source_add_full(src, c->t[i].name, c->t[i].ndim, shape, c->sdt, 0,
                                     c->where[i] * es, err, sizeof err))
                fail_msg("add_full: %s", err);
        }
        return;
    }
    if (c->mode == M_FSDP2) {
        uint64_t off[W_FSDP] = {0};
        for (int i = 0; i < c->n; i++) {
            rlb_src_loc ranks[W_FSDP];
            for (int f = 0; f < W_FSDP; f++) {
                uint64_t first, rows = fsdp2_rows(c->t[i].rows, f, &first);
                ranks[f] = (rlb_src_loc){rows ? (uint32_t)f : RLB_SRC_NO_BUFFER, off[f]};
                off[f] += rows * (uint64_t)c->t[i].cols * es;
            }
            int64_t shape[2] = {c->t[i].rows, c->t[i].cols};
            if (rlb__source_add_fsdp2(src, c->t[i].name, c->t[i].ndim, shape, c->sdt, W_FSDP,
                                      ranks, err, sizeof err))
                fail_msg("add_fsdp2: %s", err);
        }
        return;
    }
    rlb_flat_entry *ent = calloc((size_t)c->n * 2 + 1, sizeof *ent);
    uint64_t pos = 0;
    int ne = 0;
    for (int i = 0; i < c->n; i++) {
        if (c->where[i] > pos)
            ent[ne++] = (rlb_flat_entry){.numel = c->where[i] - pos};
        uint64_t n = (uint64_t)(c->t[i].rows * c->t[i].cols);
        ent[ne++] = (rlb_flat_entry){.name = c->t[i].name, .ndim = c->t[i].ndim,
                                     .shape = {c->t[i].rows, c->t[i].cols}, .numel = n};
        pos = c->where[i] + n;
    }
    uint64_t chunk = c->blen[0] / es;
    if (chunk * W_FSDP > pos)
        ent[ne++] = (rlb_flat_entry){.numel = chunk * W_FSDP - pos};
    rlb_src_loc ranks[W_FSDP];
    for (int f = 0; f < W_FSDP; f++)
        ranks[f] = (rlb_src_loc){(uint32_t)f, 0};
    rlb_flat_unit u = {.dtype = c->sdt, .world = W_FSDP, .chunk_numel = chunk,
                       .n_entries = (uint64_t)ne, .entries = ent, .ranks = ranks};
    if (rlb__source_add_fsdp1(src, &u, err, sizeof err))
        fail_msg("add_fsdp1: %s", err);
    free(ent);
}

static int adapted_kind(int which)
{
    return which == P_Q || which == P_K || which == P_V || which == P_O || which == P_GATE ||
           which == P_UP || which == P_DOWN || which == P_EMBED || which == P_HEAD;
}

/* The case's tensors: the base (plan_ref.h's names and shapes), then A and B of every
 * adaptable weight, ranks 1..4 varying by weight. */
static void case_init(lcase *c, int qwen_tied, int mode, rlb_dtype sdt, int wide)
{
    memset(c, 0, sizeof *c);
    small_config(&c->cfg, qwen_tied);
    if (wide) { /* enough rows that the executor splits the merges over threads */
        c->cfg.hidden = 256;
        c->cfg.intermediate = 512;
        c->cfg.head_dim = 64;
        c->cfg.vocab = 1000;
    }
    ref_model_init(&c->m, &c->cfg, 0);
    c->mode = mode;
    c->sdt = sdt;
    int nb = c->m.n;
    c->t = calloc((size_t)nb * 3, sizeof *c->t);
    c->ad = malloc((size_t)nb * sizeof *c->ad);
    c->scale = calloc((size_t)nb, sizeof *c->scale);
    c->rank = calloc((size_t)nb, sizeof *c->rank);
    c->n = nb;
    for (int i = 0; i < nb; i++) {
        const ref_param *p = &c->m.p[i];
        c->t[i] = (tens){.ndim = p->ndim, .rows = p->rows, .cols = p->cols};
        snprintf(c->t[i].name, sizeof c->t[i].name, "%s", p->name);
        c->ad[i] = -1;
    }
    for (int i = 0; i < nb; i++) {
        const ref_param *p = &c->m.p[i];
        if (!adapted_kind(p->which))
            continue;
        int64_t r = 1 + (i % 4);
        int embed = p->which == P_EMBED;
        c->ad[i] = c->n;
        c->rank[i] = r;
        c->scale[i] = (float)(i % 2 ? 8.0 / sqrt((double)r) : 8.0 / (double)r);
        size_t len = strlen(p->name) - strlen(".weight");
        tens *a = &c->t[c->n++], *b = &c->t[c->n++];
        *a = (tens){.ndim = 2, .rows = r, .cols = embed ? p->rows : p->cols};
        *b = (tens){.ndim = 2, .rows = embed ? p->cols : p->rows, .cols = r};
        snprintf(a->name, sizeof a->name, "%.*s.lora_A.weight", (int)len, p->name);
        snprintf(b->name, sizeof b->name, "%.*s.lora_B.weight", (int)len, p->name);
    }
    for (int i = 0; i < c->n; i++)
        c->t[i].val = malloc((size_t)(c->t[i].rows * c->t[i].cols) * sizeof(double));
}

static void case_free(lcase *c)
{
    for (int i = 0; i < c->n; i++)
        free(c->t[i].val);
    for (int b = 0; b < c->nbuf; b++)
        free(c->buf[b]);
    free(c->buf);
    free(c->blen);
    free(c->where);
    free(c->t);
    free(c->ad);
    free(c->scale);
    free(c->rank);
    ref_model_free(&c->m);
}

/* Checks every element of worker buffer dst (TP rank t of T, dtype ddt) against the
 * reference; with_adapters 0 wants the plain base, bit for bit. */
static void check_worker(const lcase *c, int T, int t, rlb_dtype ddt, const uint8_t *dst,
                         int with_adapters)
{
    ref_tensor rt[3 + 7 * 8];
    uint64_t total, es = rlb_dtype_size(ddt);
    int nt = ref_tensors(&c->cfg, T, es, rt, &total);
    int64_t V = c->cfg.vocab;
    for (int k = 0; k < nt; k++)
        for (int64_t lr = 0; lr < rt[k].rows; lr++)
            for (int64_t lc = 0; lc < rt[k].cols; lc++) {
                const uint8_t *at = dst + rt[k].offset + (uint64_t)(lr * rt[k].cols + lc) * es;
                uint32_t bits = 0;
                memcpy(&bits, at, es);
                double got = ref_value(bits, ddt);
                int which;
                int64_t gr, gc;
                if (!ref_origin(&c->cfg, T, t, rt[k].kind, lr, lc, &which, &gr, &gc)) {
                    if (bits)
                        fail_msg("T%d t%d tensor %d: padding row %lld is not zero", T, t, k,
                                 (long long)lr);
                    continue;
                }
                int pi = c->m.idx[(rt[k].layer + 1) * P_KINDS + which];
                double w = c->t[pi].val[gr * c->t[pi].cols + gc];
                int ai = with_adapters ? c->ad[pi] : -1;
                if (ai < 0) {
                    if (bits != ref_bits(w, ddt))
                        fail_msg("T%d t%d %s[%lld, %lld]: %.9g, base is %.9g", T, t,
                                 c->t[pi].name, (long long)gr, (long long)gc, got, w);
                    continue;
                }
                const tens *A = &c->t[ai], *B = &c->t[ai + 1];
                int64_t r = c->rank[pi];
                double s = c->scale[pi], sum = 0, mag = 0;
                for (int64_t j = 0; j < r; j++) {
                    double term = which == P_EMBED ? A->val[j * V + gr] * B->val[gc * r + j]
                                                   : B->val[gr * r + j] * A->val[j * A->cols + gc];
                    sum += term;
                    mag += fabs(term);
                }
                double ref = w + s * sum;
                double tol = (double)(r + 4) * ldexp(fabs(w) + fabs(s) * mag, -23);
                if (ddt != RLB_DTYPE_F32) /* one rounding of the sum, whatever the base's dtype */
                    tol += ldexp(fabs(ref), ddt == RLB_DTYPE_BF16 ? -8 : -11);
                if (!(fabs(got - ref) <= tol))
                    fail_msg("T%d t%d %s[%lld, %lld]: %.9g, W + sBA is %.9g (tol %.3g)", T, t,
                             c->t[pi].name, (long long)gr, (long long)gc, got, ref, tol);
            }
}

/* Runs `plan` into the worker buffers dst[] on `threads` threads. */
static void run_plan(const rlb_plan *plan, const lcase *c, uint8_t **dst, int threads)
{
    const void *src[W_FSDP];
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
    lcase c;
    case_init(&c, qwen_tied, mode, sdt, wide);
    rlb_param_list pl, plain;
    char err[256] = "";
    assert_int_equal(rlb__params_init(&pl, &c.cfg, NULL, 0), 0);
    assert_int_equal(rlb__params_init(&plain, &c.cfg, NULL, 0), 0);
    for (int i = 0; i < c.m.n; i++)
        if (c.ad[i] >= 0 &&
            rlb__params_add_adapter(&pl, c.t[i].name, c.rank[i], c.scale[i], err, sizeof err))
            fail_msg("add_adapter: %s", err);
    rlb_source src, psrc;
    assert_int_equal(rlb__source_init(&src, &pl), 0);
    assert_int_equal(rlb__source_init(&psrc, &plain), 0);
    register_sources(&c, &src, 1);
    register_sources(&c, &psrc, 0); /* the factors are dropped here: no adapters declared */
    rlb_target tgt = {.tp_size = T, .replicas = 1, .dtype = ddt};
    rlb_plan plan, pplan;
    if (rlb__plan_build(&src, &tgt, &plan, err, sizeof err) ||
        rlb__plan_build(&psrc, &tgt, &pplan, err, sizeof err))
        fail_msg("plan: %s", err);
    assert_true(plan.n_merges > 0 && plan.stage_bytes > 0);
    assert_int_equal(pplan.n_merges, 0);
    uint8_t *dst[4], *base[4];
    for (int t = 0; t < T; t++) {
        dst[t] = calloc(1, plan.dst_bytes[t]);
        base[t] = calloc(1, plan.dst_bytes[t]);
    }
    fill_values(&c, 1, 0);
    write_sources(&c);
    run_plan(&pplan, &c, base, 2);
    for (uint64_t v = 1; v <= 2; v++) {
        fill_values(&c, 100 + v, 1); /* new adapters, same base */
        write_sources(&c);
        run_plan(&plan, &c, dst, wide ? 4 : 2);
        for (int t = 0; t < T; t++)
            check_worker(&c, T, t, ddt, dst[t], 1);
    }
    /* Adapters taken out: the same buffers get the base back, bit for bit. */
    run_plan(&pplan, &c, dst, 2);
    for (int t = 0; t < T; t++) {
        check_worker(&c, T, t, ddt, dst[t], 0);
        assert_memory_equal(dst[t], base[t], plan.dst_bytes[t]);
        free(dst[t]);
        free(base[t]);
    }
    rlb__plan_free(&plan);
    rlb__plan_free(&pplan);
    rlb__source_free(&src);
    rlb__source_free(&psrc);
    rlb__params_free(&pl);
    rlb__params_free(&plain);
    case_free(&c);
}

static void test_merge_against_reference(void **state)
{
    (void)state;
    static const rlb_dtype dts[][2] = {{RLB_DTYPE_F32, RLB_DTYPE_F32},
                                       {RLB_DTYPE_BF16, RLB_DTYPE_BF16},
                                       {RLB_DTYPE_F32, RLB_DTYPE_BF16},
                                       {RLB_DTYPE_BF16, RLB_DTYPE_F16}};
    for (int qt = 0; qt < 2; qt++)
        for (int mode = M_FULL; mode <= M_FSDP1; mode++)
            for (int T = 1; T <= 4; T *= 2)
                for (size_t d = 0; d < sizeof dts / sizeof dts[0]; d++)
                    run_case(qt, mode, dts[d][0], dts[d][1], T, 0);
}

/* A wider model whose merges the executor splits over four threads (also run under TSan). */
static void test_threaded_merge(void **state)
{
    (void)state;
    run_case(0, M_FSDP2, RLB_DTYPE_BF16, RLB_DTYPE_BF16, 2, 1);
    run_case(1, M_FULL, RLB_DTYPE_F32, RLB_DTYPE_F32, 4, 1);
}

/* An F32 full-tensor case with every adapter declared, and its plan for `tgt`. */
typedef struct adapted_case {
    lcase c;
    rlb_param_list pl;
    rlb_source src;
    rlb_plan plan;
} adapted_case;

static void adapted_init(adapted_case *a, const rlb_target *tgt)
{
    char err[256] = "";
    case_init(&a->c, 0, M_FULL, RLB_DTYPE_F32, 0);
    assert_int_equal(rlb__params_init(&a->pl, &a->c.cfg, NULL, 0), 0);
    for (int i = 0; i < a->c.m.n; i++)
        if (a->c.ad[i] >= 0)
            assert_int_equal(rlb__params_add_adapter(&a->pl, a->c.t[i].name, a->c.rank[i],
                                                     a->c.scale[i], err, sizeof err), 0);
    assert_int_equal(rlb__source_init(&a->src, &a->pl), 0);
    register_sources(&a->c, &a->src, 1);
    if (rlb__plan_build(&a->src, tgt, &a->plan, err, sizeof err))
        fail_msg("plan: %s", err);
}

static void adapted_free(adapted_case *a)
{
    rlb__plan_free(&a->plan);
    rlb__source_free(&a->src);
    rlb__params_free(&a->pl);
    case_free(&a->c);
}

/* Two replicas get the same merges, and a plan with merges has no wire form yet. */
static void test_replicas_and_wire(void **state)
{
    (void)state;
    rlb_target tgt = {.tp_size = 2, .replicas = 2, .dtype = RLB_DTYPE_F32};
    adapted_case a;
    adapted_init(&a, &tgt);
    lcase *c = &a.c;
    rlb_plan *plan = &a.plan;
    char err[256] = "";
    fill_values(c, 7, 0);
    write_sources(c);
    uint8_t *dst[4];
    for (int d = 0; d < 4; d++)
        dst[d] = calloc(1, plan->dst_bytes[d]);
    run_plan(plan, c, dst, 2);
    for (int d = 0; d < 4; d++)
        check_worker(c, 2, d % 2, RLB_DTYPE_F32, dst[d], 1);
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
static void exec_run(rlb_executor *x, const rlb_plan *plan, const lcase *c, uint8_t **dst,
                     uint64_t *nonfinite)
{
    void *src[W_FSDP], *d[8];
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
    lcase *c = &a.c;
    rlb_plan *plan = &a.plan;
    rlb_executor *x;
    assert_int_equal(rlb__executor_cpu_create(&x), 0);
    uint64_t n_counts = plan->n_ops + plan->n_merges;
    uint64_t *bad = malloc(n_counts * sizeof *bad);
    uint8_t *dst[2], *want[2];
    for (int t = 0; t < 2; t++) {
        dst[t] = calloc(1, plan->dst_bytes[t]);
        want[t] = calloc(1, plan->dst_bytes[t]);
    }
    fill_values(c, 3, 0);
    for (uint64_t v = 1; v <= 2; v++) {
        fill_values(c, 200 + v, 1);
        write_sources(c);
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_split_names),
        cmocka_unit_test(test_add_adapter_refusals),
        cmocka_unit_test(test_merge_against_reference),
        cmocka_unit_test(test_threaded_merge),
        cmocka_unit_test(test_replicas_and_wire),
        cmocka_unit_test(test_executor_merges),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
