/* stress_weights.c: the weights of a stress run, a pure function of (seed, version,
 * parameter, element), in the two places they live: a trainer rank's shards (what it
 * registers and publishes, FSDP2 rows or FSDP1 flat units per wrap unit) and a TP rank's
 * worker buffer (what the checker's reference engine runs). Any process can recompute
 * either, and the FNV-1a checksum of the exact bytes, from the seed and the version.
 */
#include <stdio.h>
#include <string.h>

#include "launch/stress.h"

const rlb_param_list *rlb__stress_params(void)
{
    static rlb_param_list list;
    static int done;
    if (!done) {
        rlb_model_config cfg;
        rlb__config_tiny(&cfg);
        rlb__params_init(&list, &cfg, NULL, 0);
        done = 1;
    }
    return &list;
}

float rlb__stress_weight(uint64_t seed, uint64_t v, int64_t p, uint64_t i)
{
    const rlb_param *q = &rlb__stress_params()->params[p];
    uint64_t s = rlb__stress_key(seed, v, (uint64_t)p, 0) + i * 0x9e3779b97f4a7c15ull;
    uint64_t z = rlb__stress_rand(&s);
    float u = (float)(z >> 40) / (float)(1u << 24) - 0.5f;
    return q->role == RLB_ROLE_REPLICATED ? 1.0f + 0.2f * u : 0.4f * u;
}

uint64_t rlb__stress_fnv(const void *data, size_t len)
{
    const uint8_t *b = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

/* ---- Shards ----------------------------------------------------------------------------- */

static size_t aligned(uint64_t floats)
{
    return (size_t)((floats + RLB_STRESS_ALIGN - 1) / RLB_STRESS_ALIGN * RLB_STRESS_ALIGN);
}

/* A run of the rank's memory: `count` floats at mem[at] holding elements [elem, elem +
 * count) of parameter p (p < 0: padding). */
typedef void (*run_fn)(void *arg, int64_t p, uint64_t elem, size_t at, uint64_t count);

/* FSDP1 unit u's flat layout (model/params.h), aligned as use_orig_params does. */
static uint64_t flat_walk(int u, uint32_t world, rlb_flat_piece_fn flat, void *arg)
{
    return rlb__params_fsdp1_walk(rlb__stress_params(), u, RLB_STRESS_ALIGN, world, flat, arg);
}

typedef struct chunk_walk {
    uint64_t lo, hi; /* this rank's flat range */
    size_t base;     /* where the chunk starts in the rank's memory */
    run_fn fn;
    void *arg;
} chunk_walk;

/* Cuts a flat piece to this rank's chunk. */
static void chunk_cb(void *arg, int64_t p, uint64_t start, uint64_t numel)
{
    chunk_walk *c = arg;
    uint64_t a = start > c->lo ? start : c->lo;
    uint64_t b = start + numel < c->hi ? start + numel : c->hi;
    if (a < b)
        c->fn(c->arg, p, a - start, c->base + (size_t)(a - c->lo), b - a);
}

static void fsdp2_rows(const rlb_param *p, uint32_t f, uint32_t w, int64_t *row0, int64_t *rows)
{
    int64_t c = (p->rows + w - 1) / w;
    *row0 = f * c;
    *rows = *row0 >= p->rows ? 0 : (p->rows - *row0 < c ? p->rows - *row0 : c);
}

/* Calls fn for every run of the rank's memory; returns the floats it spans. */
static size_t shards_walk(const rlb_stress_shards *s, run_fn fn, void *arg)
{
    const rlb_param_list *l = rlb__stress_params();
    size_t at = 0;
    for (int u = 0; u <= (int)l->cfg.n_layers; u++) {
        if (s->fsdp1_units >> u & 1) {
            uint64_t chunk = flat_walk(u, s->world, NULL, NULL) / s->world;
            chunk_walk c = {.lo = s->rank * chunk, .hi = (s->rank + 1) * chunk, .base = at,
                            .fn = fn, .arg = arg};
            if (fn)
                flat_walk(u, s->world, chunk_cb, &c);
            at += aligned(chunk);
            continue;
        }
        for (int64_t p = 0; p < l->n; p++) {
            const rlb_param *q = &l->params[p];
            if (rlb__param_fsdp1_unit(q) != u)
                continue;
            int64_t row0, rows;
            fsdp2_rows(q, s->rank, s->world, &row0, &rows);
            uint64_t n = (uint64_t)(rows * q->cols);
            if (fn && n)
                fn(arg, p, (uint64_t)(row0 * q->cols), at, n);
            at += aligned(n);
        }
    }
    return at;
}

void rlb__stress_shards_init(rlb_stress_shards *s, uint32_t rank, uint32_t world,
                             uint32_t fsdp1_units)
{
    *s = (rlb_stress_shards){.rank = rank, .world = world ? world : 1,
                             .fsdp1_units = fsdp1_units};
    s->floats = shards_walk(s, NULL, NULL);
}

typedef struct fill_arg {
    uint64_t seed, v;
    float *mem;
} fill_arg;

static void fill_cb(void *arg, int64_t p, uint64_t elem, size_t at, uint64_t count)
{
    fill_arg *f = arg;
    for (uint64_t k = 0; k < count; k++)
        f->mem[at + k] = p < 0 ? 0.0f : rlb__stress_weight(f->seed, f->v, p, elem + k);
}

void rlb__stress_shards_fill(const rlb_stress_shards *s, uint64_t seed, uint64_t v, float *mem)
{
    fill_arg f = {seed, v, mem};
    memset(mem, 0, s->floats * sizeof(float));
    shards_walk(s, fill_cb, &f);
}

typedef struct pick_arg {
    uint64_t want;  /* index among the real elements */
    uint64_t seen;  /* real elements walked so far */
    size_t at;      /* the answer */
} pick_arg;

static void pick_cb(void *arg, int64_t p, uint64_t elem, size_t at, uint64_t count)
{
    (void)elem;
    pick_arg *k = arg;
    if (p >= 0 && k->want >= k->seen && k->want < k->seen + count)
        k->at = at + (size_t)(k->want - k->seen);
    k->seen += p >= 0 ? count : 0;
}

size_t rlb__stress_shards_pick(const rlb_stress_shards *s, uint64_t pick)
{
    pick_arg k = {.want = UINT64_MAX};
    shards_walk(s, pick_cb, &k); /* counts the real elements */
    k = (pick_arg){.want = k.seen ? pick % k.seen : 0};
    shards_walk(s, pick_cb, &k);
    return k.at;
}

typedef struct entry_arg {
    rlb_fsdp1_entry *e; /* next entry to fill */
    uint32_t n;         /* entries filled */
} entry_arg;

static void entry_cb(void *arg, int64_t p, uint64_t start, uint64_t numel)
{
    (void)start;
    entry_arg *a = arg;
    if (a->n == RLB_STRESS_MAX_ENTRIES)
        return;
    rlb_fsdp1_entry *e = &a->e[a->n++];
    memset(e, 0, sizeof(*e));
    e->numel = numel;
    e->padding = p < 0;
    if (p >= 0) {
        const rlb_param *q = &rlb__stress_params()->params[p];
        e->name = q->name;
        e->ndim = (uint32_t)q->ndim;
        e->shape[0] = (uint64_t)q->rows;
        e->shape[1] = (uint64_t)q->cols;
    }
}

uint32_t rlb__stress_shards_describe(const rlb_stress_shards *s, const float *mem,
                                     rlb_tensor_desc *desc, rlb_fsdp1_entry *entries)
{
    static char unit_names[RLB_STRESS_MAX_TENSORS][16];
    const rlb_param_list *l = rlb__stress_params();
    uint32_t n = 0;
    size_t at = 0;
    for (int u = 0; u <= (int)l->cfg.n_layers && n < RLB_STRESS_MAX_TENSORS; u++) {
        if (s->fsdp1_units >> u & 1) {
            entry_arg a = {.e = entries + (size_t)u * RLB_STRESS_MAX_ENTRIES};
            uint64_t total = flat_walk(u, s->world, entry_cb, &a);
            rlb_tensor_desc *d = &desc[n++];
            rlb_tensor_desc_init(d);
            snprintf(unit_names[u], sizeof(unit_names[u]), "unit%d", u);
            d->name = unit_names[u];
            d->dtype = RLB_DTYPE_F32;
            d->layout = RLB_TENSOR_FSDP1;
            d->ndim = 1;
            d->shape[0] = total;
            d->shard_rank = s->rank;
            d->shard_world = s->world;
            d->unit = (uint32_t)u;
            d->align = RLB_STRESS_ALIGN;
            d->n_entries = a.n;
            d->entries = a.e;
            d->data = mem + at;
            at += aligned(total / s->world);
            continue;
        }
        for (int64_t p = 0; p < l->n && n < RLB_STRESS_MAX_TENSORS; p++) {
            const rlb_param *q = &l->params[p];
            if (rlb__param_fsdp1_unit(q) != u)
                continue;
            int64_t row0, rows;
            fsdp2_rows(q, s->rank, s->world, &row0, &rows);
            rlb_tensor_desc *d = &desc[n++];
            rlb_tensor_desc_init(d);
            d->name = q->name;
            d->dtype = RLB_DTYPE_F32;
            d->layout = RLB_TENSOR_FSDP2;
            d->ndim = (uint32_t)q->ndim;
            d->shape[0] = (uint64_t)q->rows;
            d->shape[1] = (uint64_t)q->cols;
            d->shard_rank = s->rank;
            d->shard_world = s->world;
            d->data = rows ? mem + at : mem; /* an empty shard still names memory */
            at += aligned((uint64_t)(rows * q->cols));
        }
    }
    return n;
}

/* ---- A worker's buffer ----------------------------------------------------------------------- */

void rlb__stress_tp_fill(const rlb_tp_layout *layout, uint64_t seed, uint64_t v, float *buf)
{
    const rlb_param_list *l = rlb__stress_params();
    memset(buf, 0, layout->total_bytes);
    for (int64_t p = 0; p < l->n; p++) {
        const rlb_param *q = &l->params[p];
        const rlb_local_tensor *t = rlb__tp_layout_find(layout, q->target, q->layer);
        if (!t)
            continue;
        rlb_param_region r;
        rlb__param_region(q, layout, &r);
        float *dst = buf + t->offset / sizeof(float);
        for (int64_t i = 0; i < r.n_rows; i++)
            for (int64_t j = 0; j < r.n_cols; j++)
                dst[(r.lrow0 + i) * r.local_cols + r.lcol0 + j] = rlb__stress_weight(
                    seed, v, p, (uint64_t)((r.row0 + i) * q->cols + r.col0 + j));
    }
}
