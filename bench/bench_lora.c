/* bench_lora: rlb-bench-lora, a LoRA sync (base + s * B * A merged by the bridge's CPU
 * executor, DESIGN §10) against a full-weight sync of the same model, and against what a
 * trainer does without rlbridge's merge: merge every adapter into a full copy of the weights
 * itself (PEFT's merge_and_unload, here as the same sgemm in C), then sync that copy.
 *
 *   full_ms       the plan of the plain model: every weight copied into the workers' buffers
 *   adapter_ms    the plan with rank-r adapters on q, k, v, o, gate, up, down of every layer:
 *                 the base copied, the factors gathered, the merges run (the bridge's work,
 *                 with the executor's scratch kept from run to run as the bridge keeps it)
 *   trainer_ms    merging on the trainer (bf16 weights widened, sgemm, rounded back into a
 *                 merged copy) plus the full sync of that copy
 *   adapter_vs_full      adapter_ms / full_ms (GPU target <= 1.3, measured by
 *                        `rlb-bench-sync --device cuda --lora`; on the CPU the merge cannot
 *                        hide under the copy, so this is information)
 *   speedup_vs_trainer   trainer_ms / adapter_ms
 *   changed_fraction     bytes the trainer changes per step (the factors) / model bytes
 *
 * Shapes: the tiny demo model and a ~100M Llama-style model (D 768, I 2048, H 12, KV 4,
 * hd 64, 12 layers, V 16384), BF16 source and worker buffers, one full-tensor trainer rank,
 * TP 1 and 2 (one replica), rank 16. Best of REPS runs each with the executor's default
 * threads (RLB_THREADS); the first run of each touches the buffers. Prints a table, then one
 * JSON line. Build: cmake --build BUILD --target rlb-bench-lora.
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/plan_exec.h"
#include "model/lora.h"
#include "model/params.h"
#include "model/plan.h"
#include "model/source.h"

#define REPS 5
#define RANK 16
#define ALPHA 32.0f
#define DT RLB_DTYPE_BF16

static const char *const targets[] = {"self_attn.q_proj", "self_attn.k_proj",
                                      "self_attn.v_proj", "self_attn.o_proj",
                                      "mlp.gate_proj",    "mlp.up_proj",
                                      "mlp.down_proj"};
#define N_TARGETS (sizeof targets / sizeof targets[0])

static void die(const char *what, int rc, const char *err)
{
    fprintf(stderr, "rlb-bench-lora: %s: %s: %s\n", what, rlb_strerror(rc), err);
    exit(1);
}

/* One model shape, its two parameter lists and the trainer's buffer. */
typedef struct setup {
    rlb_model_config cfg;
    rlb_param_list plain, lora; /* without and with adapters */
    uint64_t *offset;           /* [lora.n] byte offset of each parameter in buf */
    uint64_t bytes;             /* buffer size: base then factors */
    uint64_t base_bytes;        /* the model's own parameters */
    uint8_t *buf;               /* the trainer's memory */
    uint8_t *merged;            /* the trainer-side merged copy (same layout) */
} setup;

static void setup_init(setup *s, const rlb_model_config *cfg)
{
    char err[256] = "";
    s->cfg = *cfg;
    if (rlb__params_init(&s->plain, cfg, err, sizeof err) ||
        rlb__params_init(&s->lora, cfg, err, sizeof err))
        die("params", RLB_EINVAL, err);
    float scale = ALPHA / RANK;
    char name[96];
    for (int64_t l = 0; l < cfg->n_layers; l++)
        for (size_t k = 0; k < N_TARGETS; k++) {
            snprintf(name, sizeof name, "model.layers.%lld.%s.weight", (long long)l, targets[k]);
            int rc = rlb__params_add_adapter(&s->lora, name, RANK, scale, err, sizeof err);
            if (rc)
                die("adapter", rc, err);
        }
    s->offset = calloc((size_t)s->lora.n, sizeof *s->offset);
    for (int64_t p = 0; p < s->lora.n; p++) {
        s->offset[p] = s->bytes;
        s->bytes += (rlb__param_numel(&s->lora.params[p]) * 2 + 63) / 64 * 64;
        if (p + 1 == s->plain.n)
            s->base_bytes = s->bytes;
    }
    s->buf = malloc(s->bytes);
    s->merged = malloc(s->bytes);
    if (!s->buf || !s->merged)
        die("buffers", RLB_ENOMEM, "malloc");
    /* Small bf16 values (0x3c00 = 0.0078125 and neighbours), finite whatever the merge. */
    for (uint64_t i = 0; i < s->bytes; i += 2) {
        uint16_t h = (uint16_t)(0x3c00u + (i / 2) % 97);
        memcpy(s->buf + i, &h, 2);
    }
    memcpy(s->merged, s->buf, s->bytes);
}

static void setup_free(setup *s)
{
    free(s->buf);
    free(s->merged);
    free(s->offset);
    rlb__params_free(&s->plain);
    rlb__params_free(&s->lora);
}

/* A plan over `list` (full tensors in the setup's buffer) for TP T. */
static void build(setup *s, const rlb_param_list *list, int T, rlb_source *src, rlb_plan *plan)
{
    char err[256] = "";
    int rc = rlb__source_init(src, list);
    if (!rc)
        rc = rlb__source_add_buffer(src, s->bytes) == 0 ? 0 : RLB_ENOMEM;
    for (int64_t p = 0; !rc && p < list->n; p++) {
        const rlb_param *q = &list->params[p];
        int64_t shape[2] = {q->rows, q->cols};
        rc = rlb__source_add_full(src, q->name, q->ndim, shape, DT, 0, s->offset[p], err,
                                  sizeof err);
    }
    rlb_target tgt = {.tp_size = T, .replicas = 1, .dtype = DT};
    if (!rc)
        rc = rlb__plan_build(src, &tgt, plan, err, sizeof err);
    if (rc)
        die("plan", rc, err);
}

/* Best time of running `plan` from `src_buf` into dst, keeping the executor's scratch
 * across runs as the bridge does. */
static double time_plan(const rlb_plan *plan, const uint8_t *src_buf, uint64_t src_len,
                        void **dst)
{
    char err[256] = "";
    const void *src[1] = {src_buf};
    rlb_exec_scratch scratch = {0};
    double best = 1e30;
    for (int r = 0; r < REPS; r++) {
        double t0 = rlb__clock_ms_f();
        int rc = rlb__plan_exec_cpu_counted(plan, src, &src_len, dst, plan->dst_bytes, 0,
                                            &scratch, NULL, err, sizeof err);
        double t = rlb__clock_ms_f() - t0;
        if (rc)
            die("exec", rc, err);
        best = t < best ? t : best;
    }
    rlb__exec_scratch_free(&scratch);
    return best;
}

/* The trainer-side merge: every adapted weight of the base widened, + s * B * A, rounded
 * into the merged copy. Returns its best time. */
static double time_trainer_merge(setup *s)
{
    double best = 1e30;
    uint64_t max_numel = 0;
    for (int64_t k = 0; k < s->lora.n_adapters; k++)
        max_numel = rlb__param_numel(&s->lora.params[s->lora.adapters[k].base]) > max_numel
                        ? rlb__param_numel(&s->lora.params[s->lora.adapters[k].base])
                        : max_numel;
    float *w = malloc(max_numel * 4), *a = malloc(max_numel * 4), *b = malloc(max_numel * 4);
    for (int r = 0; r < REPS; r++) {
        double t0 = rlb__clock_ms_f();
        for (int64_t k = 0; k < s->lora.n_adapters; k++) {
            const rlb_param_adapter *ad = &s->lora.adapters[k];
            const rlb_param *p = &s->lora.params[ad->base];
            uint64_t n = rlb__param_numel(p);
            rlb__row_to_f32(w, s->buf + s->offset[ad->base], n, DT);
            rlb__row_to_f32(a, s->buf + s->offset[ad->a], (uint64_t)(RANK * p->cols), DT);
            rlb__row_to_f32(b, s->buf + s->offset[ad->b], (uint64_t)(p->rows * RANK), DT);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)p->rows, (int)p->cols,
                        RANK, ad->scale, b, RANK, a, (int)p->cols, 1.0f, w, (int)p->cols);
            rlb__row_from_f32(s->merged + s->offset[ad->base], w, n, DT);
        }
        double t = rlb__clock_ms_f() - t0;
        best = t < best ? t : best;
    }
    free(w);
    free(a);
    free(b);
    return best;
}

typedef struct result {
    const char *shape;
    int tp;
    double params_m;   /* model parameters, millions */
    double full_ms, adapter_ms, merge_ms, trainer_ms;
    double changed_fraction;
} result;

static result run(const char *shape, const rlb_model_config *cfg, int T)
{
    setup s = {0};
    setup_init(&s, cfg);
    rlb_source fsrc, lsrc;
    rlb_plan full, lora;
    build(&s, &s.plain, T, &fsrc, &full);
    build(&s, &s.lora, T, &lsrc, &lora);
    void *dst[8];
    for (uint32_t d = 0; d < full.n_dst; d++) {
        dst[d] = calloc(1, full.dst_bytes[d]);
        if (!dst[d])
            die("worker buffers", RLB_ENOMEM, "calloc");
    }
    result r = {.shape = shape, .tp = T};
    for (int64_t p = 0; p < s.plain.n; p++)
        r.params_m += (double)rlb__param_numel(&s.plain.params[p]) / 1e6;
    r.changed_fraction = (double)(s.bytes - s.base_bytes) / (double)s.base_bytes;
    r.full_ms = time_plan(&full, s.buf, s.bytes, dst);
    r.adapter_ms = time_plan(&lora, s.buf, s.bytes, dst);
    r.merge_ms = time_trainer_merge(&s);
    r.trainer_ms = r.merge_ms + time_plan(&full, s.merged, s.bytes, dst);
    for (uint32_t d = 0; d < full.n_dst; d++)
        free(dst[d]);
    rlb__plan_free(&full);
    rlb__plan_free(&lora);
    rlb__source_free(&fsrc);
    rlb__source_free(&lsrc);
    setup_free(&s);
    return r;
}

int main(void)
{
    rlb_model_config tiny, m100;
    rlb__config_tiny(&tiny);
    m100 = tiny;
    m100.hidden = 768;
    m100.intermediate = 2048;
    m100.n_heads = 12;
    m100.n_kv_heads = 4;
    m100.head_dim = 64;
    m100.n_layers = 12;
    m100.vocab = 16384;
    result rs[4] = {run("tiny", &tiny, 1), run("tiny", &tiny, 2), run("100m", &m100, 1),
                    run("100m", &m100, 2)};
    printf("%-6s %3s %8s %10s %11s %11s %11s %8s %8s %9s\n", "model", "TP", "params",
           "full ms", "adapter ms", "merge ms", "trainer ms", "ad/full", "tr/ad", "changed");
    for (int i = 0; i < 4; i++)
        printf("%-6s %3d %7.1fM %10.3f %11.3f %11.3f %11.3f %8.2f %8.2f %8.2f%%\n",
               rs[i].shape, rs[i].tp, rs[i].params_m, rs[i].full_ms, rs[i].adapter_ms,
               rs[i].merge_ms, rs[i].trainer_ms, rs[i].adapter_ms / rs[i].full_ms,
               rs[i].trainer_ms / rs[i].adapter_ms, 100 * rs[i].changed_fraction);
    printf("{\"bench\":\"lora\",\"rank\":%d", RANK);
    for (int i = 0; i < 4; i++)
        printf(",\"%s_tp%d\":{\"full_ms\":%.3f,\"adapter_ms\":%.3f,\"trainer_ms\":%.3f,"
               "\"adapter_vs_full\":%.3f,\"speedup_vs_trainer\":%.3f,\"changed_fraction\":%.5f}",
               rs[i].shape, rs[i].tp, rs[i].full_ms, rs[i].adapter_ms, rs[i].trainer_ms,
               rs[i].adapter_ms / rs[i].full_ms, rs[i].trainer_ms / rs[i].adapter_ms,
               rs[i].changed_fraction);
    printf("}\n");
    return 0;
}
