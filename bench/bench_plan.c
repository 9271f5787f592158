/* bench_plan: rlb-bench-plan, how fast the reshard planner builds a plan for an 8B model
 * and how close the CPU executor comes to memcpy.
 *
 *   plan_build_ms_8b        Llama-3-8B shapes (D 4096, I 14336, H 32, KV 8, hd 128, 32
 *                           layers, V 128256), FSDP2 Shard(0) over W = 8 -> TP 2, BF16;
 *                           best of 20 builds (target <= 20 ms). The same for FSDP1 flat
 *                           units (one per decoder layer, use_orig_params alignment).
 *                           Each plan also goes through its wire form once (all ops checked).
 *   executor_vs_memcpy      a same-dtype (BF16) plan of about 1 GB (a 6-layer, D 2048 model,
 *                           FSDP2 8 -> TP 2) run by the executor with its default threads,
 *                           against one plain memcpy of the same number of bytes between
 *                           the same buffers in the same run; best of 5 each (target <= 1.5).
 *   convert (information)   an F32 -> BF16 plan of the 2-layer version of that model.
 *
 * Buffers are touched before timing so page faults are not measured. Prints a table, then
 * one JSON line. Build: cmake --build BUILD --target rlb-bench-plan; run BUILD/bench/...
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/env.h"
#include "kernels/cpu/plan_exec.h"
#include "model/params.h"
#include "model/plan.h"
#include "model/source.h"

#define W 8 /* FSDP world of every source here */
#define BUILD_REPS 20
#define EXEC_REPS 5

static void die(const char *what, int rc, const char *err)
{
    fprintf(stderr, "rlb-bench-plan: %s: %s: %s\n", what, rlb_strerror(rc), err);
    exit(1);
}

static void llama_config(rlb_model_config *c, int64_t D, int64_t I, int64_t H, int64_t KV,
                         int64_t layers, int64_t V)
{
    rlb__config_tiny(c);
    c->hidden = D;
    c->intermediate = I;
    c->n_heads = H;
    c->n_kv_heads = KV;
    c->head_dim = 128;
    c->n_layers = layers;
    c->vocab = V;
    c->tie_embeddings = 0;
}

/* ---- sources, registered the way W trainer ranks would ---------------------------------- */

/* FSDP2: every parameter Shard(0) over W ranks; rank f's shards back to back in buffer f.
 * Sets bytes[f] to each buffer's size. */
static void source_fsdp2(rlb_source *src, const rlb_param_list *pl, rlb_dtype dt,
                         uint64_t bytes[W])
{
    char err[256] = "";
    uint64_t esz = rlb_dtype_size(dt);
    memset(bytes, 0, W * sizeof bytes[0]);
    for (int64_t i = 0; i < pl->n; i++) {
        uint64_t d0 = (uint64_t)pl->params[i].rows, c = (d0 + W - 1) / W;
        for (uint64_t f = 0; f < W && f * c < d0; f++) {
            uint64_t n_f = d0 - f * c < c ? d0 - f * c : c;
            bytes[f] += n_f * (uint64_t)pl->params[i].cols * esz;
        }
    }
    int rc = rlb__source_init(src, pl);
    for (int f = 0; !rc && f < W; f++)
        rc = rlb__source_add_buffer(src, bytes[f]) == f ? 0 : RLB_ENOMEM;
    uint64_t off[W] = {0};
    for (int64_t i = 0; !rc && i < pl->n; i++) {
        const rlb_param *p = &pl->params[i];
        uint64_t d0 = (uint64_t)p->rows, c = (d0 + W - 1) / W;
        rlb_src_loc ranks[W];
        for (uint32_t f = 0; f < W; f++) {
            uint64_t n_f = f * c >= d0 ? 0 : d0 - f * c < c ? d0 - f * c : c;
            ranks[f] = (rlb_src_loc){n_f ? f : RLB_SRC_NO_BUFFER, off[f]};
            off[f] += n_f * (uint64_t)p->cols * esz;
        }
        int64_t shape[2] = {p->rows, p->cols};
        rc = rlb__source_add_fsdp2(src, p->name, p->ndim, shape, dt, W, ranks, err, sizeof err);
    }
    if (rc)
        die("FSDP2 source", rc, err);
}

/* FSDP1: a flat unit per decoder layer plus one for embed / norm / lm_head, each parameter
 * aligned to 16 bytes and the total padded to a multiple of W (use_orig_params=True);
 * rank f's chunks of all units back to back in buffer f. */
static void source_fsdp1(rlb_source *src, const rlb_param_list *pl, rlb_dtype dt)
{
    char err[256] = "";
    uint64_t esz = rlb_dtype_size(dt), A = 16 / esz;
    int64_t n = pl->n;
    rlb_flat_entry *e = calloc((size_t)(2 * n + 1), sizeof *e);
    int64_t *unit_first = calloc((size_t)n + 1, sizeof *unit_first), n_units = 0;
    /* Unit boundaries: where the layer changes in the canonical order. */
    for (int64_t i = 0; i < n; i++)
        if (i == 0 || pl->params[i].layer != pl->params[i - 1].layer)
            unit_first[n_units++] = i;
    unit_first[n_units] = n;
    uint64_t chunk_total = 0;
    for (int pass = 0; pass < 2; pass++) {
        int rc = 0;
        if (pass == 1) {
            rc = rlb__source_init(src, pl);
            for (int f = 0; !rc && f < W; f++)
                rc = rlb__source_add_buffer(src, chunk_total * esz) == f ? 0 : RLB_ENOMEM;
        }
        uint64_t at = 0; /* elements into each rank's buffer */
        for (int64_t u = 0; !rc && u < n_units; u++) {
            uint64_t total = 0, ne = 0;
            for (int64_t i = unit_first[u]; i < unit_first[u + 1]; i++) {
                const rlb_param *p = &pl->params[i];
                if (total % A) {
                    e[ne++] = (rlb_flat_entry){.numel = A - total % A};
                    total += A - total % A;
                }
                e[ne++] = (rlb_flat_entry){.name = p->name, .ndim = p->ndim,
                                           .shape = {p->rows, p->cols},
                                           .numel = rlb__param_numel(p)};
                total += rlb__param_numel(p);
            }
            if (total % W) {
                e[ne++] = (rlb_flat_entry){.numel = W - total % W};
                total += W - total % W;
            }
            rlb_src_loc ranks[W];
            for (uint32_t f = 0; f < W; f++)
                ranks[f] = (rlb_src_loc){f, at * esz};
            rlb_flat_unit unit = {.dtype = dt, .world = W, .chunk_numel = total / W,
                                  .n_entries = ne, .entries = e, .ranks = ranks};
            if (pass == 1)
                rc = rlb__source_add_fsdp1(src, &unit, err, sizeof err);
            at += total / W;
        }
        if (rc)
            die("FSDP1 source", rc, err);
        chunk_total = at;
    }
    free(e);
    free(unit_first);
}

/* Serializes the plan and reads it back, which checks every op; returns the wire size. */
static uint64_t wire_check(const rlb_plan *plan)
{
    char err[256] = "";
    uint64_t len = rlb__plan_serialized_size(plan);
    void *buf = malloc(len);
    rlb_plan back;
    int rc = buf ? rlb__plan_serialize(plan, buf, len) : RLB_ENOMEM;
    if (!rc)
        rc = rlb__plan_deserialize(buf, len, &back, err, sizeof err);
    if (rc)
        die("plan wire form", rc, err);
    rlb__plan_free(&back);
    free(buf);
    return len;
}

/* Best of BUILD_REPS builds, in milliseconds; *ops and *wire get the plan's op count and
 * serialized size. */
static double time_build(const rlb_source *src, const rlb_target *tgt, uint64_t *ops,
                         uint64_t *wire)
{
    char err[256] = "";
    double best = 1e30;
    for (int r = 0; r < BUILD_REPS; r++) {
        rlb_plan plan;
        double t0 = rlb__clock_ms_f();
        int rc = rlb__plan_build(src, tgt, &plan, err, sizeof err);
        double t = rlb__clock_ms_f() - t0;
        if (rc)
            die("plan build", rc, err);
        best = t < best ? t : best;
        *ops = plan.n_ops;
        if (r == 0)
            *wire = wire_check(&plan);
        rlb__plan_free(&plan);
    }
    return best;
}

/* ---- execution -------------------------------------------------------------------------- */

typedef struct bound {
    rlb_plan plan;
    void *src[W];
    uint64_t src_len[W];
    void **dst;
    uint64_t *dst_len;
} bound;

/* Builds the plan of `src` for tgt and allocates (and touches) its buffers. */
static void bind(bound *b, const rlb_source *src, const uint64_t src_bytes[W],
                 const rlb_target *tgt)
{
    char err[256] = "";
    int rc = rlb__plan_build(src, tgt, &b->plan, err, sizeof err);
    if (rc)
        die("plan build", rc, err);
    for (int f = 0; f < W; f++) {
        b->src_len[f] = src_bytes[f];
        b->src[f] = malloc(src_bytes[f] + 1);
        if (!b->src[f])
            die("source buffers", RLB_ENOMEM, "malloc");
        memset(b->src[f], 0x3c, src_bytes[f]); /* 0x3c3c...: finite in every dtype */
    }
    b->dst = calloc(b->plan.n_dst, sizeof *b->dst);
    b->dst_len = calloc(b->plan.n_dst, sizeof *b->dst_len);
    for (uint32_t d = 0; d < b->plan.n_dst; d++) {
        b->dst_len[d] = b->plan.dst_bytes[d];
        b->dst[d] = malloc(b->dst_len[d] + 1);
        if (!b->dst[d])
            die("destination buffers", RLB_ENOMEM, "malloc");
        memset(b->dst[d], 0, b->dst_len[d]);
    }
}

static void unbind(bound *b)
{
    for (int f = 0; f < W; f++)
        free(b->src[f]);
    for (uint32_t d = 0; d < b->plan.n_dst; d++)
        free(b->dst[d]);
    free(b->dst);
    free(b->dst_len);
    rlb__plan_free(&b->plan);
}

static double time_exec(bound *b, int threads)
{
    char err[256] = "";
    double t0 = rlb__clock_ms_f();
    int rc = rlb__plan_exec_cpu(&b->plan, (const void *const *)b->src, b->src_len, b->dst,
                                b->dst_len, threads, err, sizeof err);
    if (rc)
        die("plan exec", rc, err);
    return rlb__clock_ms_f() - t0;
}

/* The peer: one memcpy stream of `bytes` bytes, source buffers in order into destination
 * buffers in order, the same memory the plan moves. */
static double time_memcpy(bound *b, uint64_t bytes)
{
    double t0 = rlb__clock_ms_f();
    uint32_t s = 0, d = 0;
    uint64_t so = 0, dof = 0;
    while (bytes) {
        uint64_t n = b->src_len[s] - so;
        n = n < b->dst_len[d] - dof ? n : b->dst_len[d] - dof;
        n = n < bytes ? n : bytes;
        memcpy((uint8_t *)b->dst[d] + dof, (const uint8_t *)b->src[s] + so, n);
        bytes -= n;
        so += n;
        dof += n;
        if (so == b->src_len[s]) {
            s++;
            so = 0;
        }
        if (dof == b->dst_len[d]) {
            d++;
            dof = 0;
        }
    }
    return rlb__clock_ms_f() - t0;
}

typedef struct exec_result {
    uint64_t bytes_read, bytes_written, ops;
    double exec_ms, exec1_ms, memcpy_ms; /* best of EXEC_REPS each */
} exec_result;

/* Runs a plan of cfg from FSDP2 W over `sdt` to TP 2 over `ddt`: the executor with default
 * and one thread, and memcpy of the written bytes, interleaved, best of EXEC_REPS. */
static void bench_exec(const rlb_model_config *cfg, rlb_dtype sdt, rlb_dtype ddt,
                       exec_result *out)
{
    rlb_param_list pl;
    rlb_source src;
    uint64_t src_bytes[W];
    char err[256] = "";
    int rc = rlb__params_init(&pl, cfg, err, sizeof err);
    if (rc)
        die("params", rc, err);
    source_fsdp2(&src, &pl, sdt, src_bytes);
    rlb_target tgt = {.tp_size = 2, .replicas = 1, .dtype = ddt};
    bound b;
    bind(&b, &src, src_bytes, &tgt);
    *out = (exec_result){.bytes_read = b.plan.bytes_read, .bytes_written = b.plan.bytes_written,
                         .ops = b.plan.n_ops, .exec_ms = 1e30, .exec1_ms = 1e30,
                         .memcpy_ms = 1e30};
    uint64_t copy_bytes = b.plan.bytes_written;
    uint64_t src_total = 0;
    for (int f = 0; f < W; f++)
        src_total += src_bytes[f];
    copy_bytes = copy_bytes < src_total ? copy_bytes : src_total;
    time_exec(&b, 0); /* warm-up */
    for (int r = 0; r < EXEC_REPS; r++) {
        double t = time_exec(&b, 0);
        out->exec_ms = t < out->exec_ms ? t : out->exec_ms;
        t = time_memcpy(&b, copy_bytes);
        out->memcpy_ms = t < out->memcpy_ms ? t : out->memcpy_ms;
        t = time_exec(&b, 1);
        out->exec1_ms = t < out->exec1_ms ? t : out->exec1_ms;
    }
    /* memcpy moved copy_bytes; scale to the plan's written bytes (equal for same dtype). */
    out->memcpy_ms *= (double)b.plan.bytes_written / (double)copy_bytes;
    unbind(&b);
    rlb__source_free(&src);
    rlb__params_free(&pl);
}

static double gbps(uint64_t bytes, double ms)
{
    return (double)bytes / (ms * 1e6);
}

int main(void)
{
    /* Plan build, 8B shapes. */
    rlb_model_config c8;
    llama_config(&c8, 4096, 14336, 32, 8, 32, 128256);
    rlb_param_list pl;
    char err[256] = "";
    int rc = rlb__params_init(&pl, &c8, err, sizeof err);
    if (rc)
        die("params", rc, err);
    rlb_target tgt = {.tp_size = 2, .replicas = 1, .dtype = RLB_DTYPE_BF16};
    rlb_source src;
    uint64_t bytes8[W], ops2 = 0, ops1 = 0, wire2 = 0, wire1 = 0;
    source_fsdp2(&src, &pl, RLB_DTYPE_BF16, bytes8);
    double build2 = time_build(&src, &tgt, &ops2, &wire2);
    rlb__source_free(&src);
    source_fsdp1(&src, &pl, RLB_DTYPE_BF16);
    double build1 = time_build(&src, &tgt, &ops1, &wire1);
    rlb__source_free(&src);
    rlb__params_free(&pl);

    /* Executor: same dtype ~1 GB, and F32 -> BF16 for information. */
    rlb_model_config cm;
    llama_config(&cm, 2048, 8192, 16, 8, 6, 32000);
    exec_result same, conv;
    bench_exec(&cm, RLB_DTYPE_BF16, RLB_DTYPE_BF16, &same);
    cm.n_layers = 2;
    bench_exec(&cm, RLB_DTYPE_F32, RLB_DTYPE_BF16, &conv);
    double ratio = same.exec_ms / same.memcpy_ms, ratio1 = same.exec1_ms / same.memcpy_ms;
    double conv_ratio = conv.exec_ms / conv.memcpy_ms;
    long long threads = rlb__env_int(RLB_KNOB_THREADS);
    threads = threads > 0 ? threads : sysconf(_SC_NPROCESSORS_ONLN);

    printf("%-44s %12s  %s\n", "measure", "value", "notes");
    printf("%-44s %9.3f ms  %llu ops, %llu bytes serialized\n",
           "plan_build_ms_8b (FSDP2 8 -> TP 2, BF16)", build2, (unsigned long long)ops2,
           (unsigned long long)wire2);
    printf("%-44s %9.3f ms  %llu ops, %llu bytes serialized\n",
           "plan_build_ms_8b_fsdp1 (FSDP1 8 -> TP 2)", build1, (unsigned long long)ops1,
           (unsigned long long)wire1);
    printf("%-44s %9.1f MB  %llu ops\n", "same-dtype plan (BF16, FSDP2 8 -> TP 2)",
           (double)same.bytes_written / 1e6, (unsigned long long)same.ops);
    printf("%-44s %9.2f ms  %.2f GB/s read+write, %lld threads\n", "  executor (default)",
           same.exec_ms, gbps(same.bytes_read + same.bytes_written, same.exec_ms), threads);
    printf("%-44s %9.2f ms  %.2f GB/s\n", "  executor (1 thread)", same.exec1_ms,
           gbps(same.bytes_read + same.bytes_written, same.exec1_ms));
    printf("%-44s %9.2f ms  %.2f GB/s\n", "  memcpy of the same bytes", same.memcpy_ms,
           gbps(2 * same.bytes_written, same.memcpy_ms));
    printf("%-44s %9.3f     target <= 1.5 (1 thread: %.3f)\n", "executor_vs_memcpy", ratio,
           ratio1);
    printf("%-44s %9.1f MB  written, %.1f MB read\n", "convert plan (F32 -> BF16, 2 layers)",
           (double)conv.bytes_written / 1e6, (double)conv.bytes_read / 1e6);
    printf("%-44s %9.2f ms  %.2f GB/s read+write, %.3f x memcpy of the written bytes\n",
           "  executor (default threads)", conv.exec_ms,
           gbps(conv.bytes_read + conv.bytes_written, conv.exec_ms), conv_ratio);
    printf("{\"bench\":\"plan\",\"plan_build_ms_8b\":%.3f,\"plan_build_ms_8b_fsdp1\":%.3f,"
           "\"plan_ops_8b\":%llu,\"exec_bytes\":%llu,\"executor_ms\":%.3f,\"memcpy_ms\":%.3f,"
           "\"executor_vs_memcpy\":%.3f,\"executor_1t_vs_memcpy\":%.3f,"
           "\"convert_f32_bf16_ms\":%.3f,\"convert_vs_memcpy\":%.3f,\"threads\":%lld}\n",
           build2, build1, (unsigned long long)ops2, (unsigned long long)same.bytes_written,
           same.exec_ms, same.memcpy_ms, ratio, ratio1, conv.exec_ms, conv_ratio, threads);
    return 0;
}
