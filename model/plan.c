/* plan.c: the reshard planner (source pieces -> TP worker buffers), op validation, and the
 * plan's serialized wire form.
 *
 * The planner walks each TP rank's local tensors in buffer order; for each parameter that
 * lands in a tensor it intersects every source piece (a run of consecutive row-major
 * elements) with the rectangle of global rows x cols the rank holds (rlb__param_region),
 * which gives at most three 2-D copies per piece: a partial head row, a block of whole
 * rows, a partial tail row. Each copy is merged into the previous op when it continues it
 * (same buffers and dtypes, next bytes on both sides, or next row at the same strides), and
 * an op whose rows are contiguous on both sides becomes one long row, so a tensor copied
 * whole from one buffer is one op. Vocabulary padding rows get zero ops. Replicas repeat
 * rank t's ops with dst_ref shifted by replica * T.
 *
 * A weight with a LoRA adapter (model/lora.h) gets the same copies, but in a list of their
 * own, fenced so they never merge with another weight's, and one merge op over its block
 * that runs them; its factors are gathered whole into the f32 stage by stage ops.
 */
#include "model/plan.h"

#include <stdlib.h>
#include <string.h>

#include "model/lora.h"
#include "model/params.h"
#include "model/source.h"
#include "model/tp_layout.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the plan wire format is little-endian; a big-endian host needs byte swapping here"
#endif

/* ---- op list with merge-on-append ------------------------------------------------------ */

typedef struct op_list {
    rlb_copy_op *ops; /* ops so far */
    uint64_t n;       /* entries used */
    uint64_t cap;     /* entries allocated */
    uint64_t fence;   /* ops before this index take no more merges */
} op_list;

static uint64_t dsize(uint8_t dtype)
{
    return (uint64_t)rlb_dtype_size((rlb_dtype)dtype);
}

static int is_zero_op(const rlb_copy_op *op)
{
    return op->src_ref == RLB_PLAN_ZERO_SRC;
}

/* Rows contiguous on both sides become one row; a single row gets the canonical strides
 * (its row length), so equal copies always produce equal ops. */
static void normalize(rlb_copy_op *op)
{
    uint64_t sbytes = is_zero_op(op) ? 0 : op->row_elems * dsize(op->src_dtype);
    uint64_t dbytes = op->row_elems * dsize(op->dst_dtype);
    if (op->rows > 1 && op->src_stride == sbytes && op->dst_stride == dbytes) {
        op->row_elems *= op->rows;
        op->rows = 1;
    }
    if (op->rows == 1) {
        op->src_stride = is_zero_op(op) ? 0 : op->row_elems * dsize(op->src_dtype);
        op->dst_stride = op->row_elems * dsize(op->dst_dtype);
    }
}

/* Merges b into a when b continues a; returns 1 if it did. */
static int try_merge(rlb_copy_op *a, const rlb_copy_op *b)
{
    if (a->src_ref != b->src_ref || a->dst_ref != b->dst_ref || a->src_dtype != b->src_dtype ||
        a->dst_dtype != b->dst_dtype)
        return 0;
    int zero = is_zero_op(a);
    uint64_t ses = zero ? 0 : dsize(a->src_dtype), des = dsize(a->dst_dtype);
    /* One long row followed by the next bytes on both sides: a longer row. */
    if (a->rows == 1 && b->rows == 1 && b->src_offset == a->src_offset + a->row_elems * ses &&
        b->dst_offset == a->dst_offset + a->row_elems * des) {
        a->row_elems += b->row_elems;
        return 1;
    }
    /* Rows of one length, b starting where a's next row would: more rows. */
    if (a->row_elems != b->row_elems || b->src_offset < a->src_offset ||
        b->dst_offset <= a->dst_offset)
        return 0;
    uint64_t ss, ds;
    if (a->rows > 1) {
        ss = a->src_stride;
        ds = a->dst_stride;
    } else if (b->rows > 1) {
        ss = b->src_stride;
        ds = b->dst_stride;
    } else {
        ss = b->src_offset - a->src_offset;
        ds = b->dst_offset - a->dst_offset;
    }
    if (ds < a->row_elems * des || ss < a->row_elems * ses)
        return 0; /* rows would overlap */
    if (b->rows > 1 && (b->src_stride != ss || b->dst_stride != ds))
        return 0;
    if (b->src_offset != a->src_offset + a->rows * ss ||
        b->dst_offset != a->dst_offset + a->rows * ds)
        return 0;
    a->rows += b->rows;
    a->src_stride = ss;
    a->dst_stride = ds;
    normalize(a);
    return 1;
}

static int push(op_list *l, rlb_copy_op op)
{
    normalize(&op);
    if (l->n > l->fence && try_merge(&l->ops[l->n - 1], &op))
        return 0;
    if (l->n == l->cap) {
        uint64_t cap = l->cap ? l->cap * 2 : 1024;
        rlb_copy_op *ops = realloc(l->ops, (size_t)cap * sizeof *ops);
        if (!ops)
            return RLB_ENOMEM;
        l->ops = ops;
        l->cap = cap;
    }
    l->ops[l->n++] = op;
    return 0;
}

/* ---- planning one TP rank --------------------------------------------------------------- */

/* What the copies of one (piece, parameter) pair into one local tensor share. */
typedef struct piece_ctx {
    const rlb_src_piece *piece;  /* the source run */
    const rlb_param *param;      /* its parameter */
    const rlb_param_region *reg; /* the rectangle this rank holds */
    const rlb_local_tensor *lt;  /* the local tensor it lands in */
    uint32_t dst_ref;            /* destination index */
    rlb_dtype dst_dtype;         /* destination element type */
} piece_ctx;

/* Copies rows [row, row + n_rows) x cols [c_begin, c_end) of the parameter, which lie in
 * the piece, clipped to the rank's rectangle. */
static int emit_rows(op_list *l, const piece_ctx *c, uint64_t row, uint64_t n_rows,
                     uint64_t c_begin, uint64_t c_end)
{
    const rlb_param_region *r = c->reg;
    uint64_t r0 = (uint64_t)r->row0, r1 = r0 + (uint64_t)r->n_rows;
    uint64_t k0 = (uint64_t)r->col0, k1 = k0 + (uint64_t)r->n_cols;
    uint64_t ra = row > r0 ? row : r0, rb = row + n_rows < r1 ? row + n_rows : r1;
    uint64_t ca = c_begin > k0 ? c_begin : k0, cb = c_end < k1 ? c_end : k1;
    if (ra >= rb || ca >= cb)
        return 0;
    uint64_t C = (uint64_t)c->param->cols, lcols = (uint64_t)r->local_cols;
    uint64_t ses = rlb_dtype_size(c->piece->dtype), des = rlb_dtype_size(c->dst_dtype);
    uint64_t lrow = ra - r0 + (uint64_t)r->lrow0, lcol = ca - k0 + (uint64_t)r->lcol0;
    rlb_copy_op op = {
        .src_ref = c->piece->buffer,
        .dst_ref = c->dst_ref,
        .src_dtype = (uint8_t)c->piece->dtype,
        .dst_dtype = (uint8_t)c->dst_dtype,
        .src_offset = c->piece->offset + (ra * C + ca - c->piece->elem0) * ses,
        .src_stride = C * ses,
        .dst_offset = c->lt->offset + (lrow * lcols + lcol) * des,
        .dst_stride = lcols * des,
        .rows = rb - ra,
        .row_elems = cb - ca,
    };
    return push(l, op);
}

/* Splits the piece's element run into a partial head row, whole rows and a partial tail. */
static int emit_piece(op_list *l, const piece_ctx *c)
{
    uint64_t C = (uint64_t)c->param->cols;
    uint64_t pos = c->piece->elem0, end = pos + c->piece->n_elems;
    int rc = 0;
    if (pos % C) {
        uint64_t row = pos / C, stop = (row + 1) * C < end ? (row + 1) * C : end;
        rc = emit_rows(l, c, row, 1, pos % C, stop - row * C);
        pos = stop;
    }
    if (!rc && end - pos >= C) {
        uint64_t rows = (end - pos) / C;
        rc = emit_rows(l, c, pos / C, rows, 0, C);
        pos += rows * C;
    }
    if (!rc && pos < end)
        rc = emit_rows(l, c, pos / C, 1, 0, end - pos);
    return rc;
}

static int emit_zero_rows(op_list *l, const rlb_param_region *r, const rlb_local_tensor *lt,
                          uint32_t dst_ref, rlb_dtype dtype)
{
    uint64_t des = rlb_dtype_size(dtype), lcols = (uint64_t)r->local_cols;
    rlb_copy_op op = {
        .src_ref = RLB_PLAN_ZERO_SRC,
        .dst_ref = dst_ref,
        .src_dtype = (uint8_t)dtype,
        .dst_dtype = (uint8_t)dtype,
        .dst_offset = lt->offset + (uint64_t)r->zero_row0 * lcols * des,
        .dst_stride = lcols * des,
        .rows = (uint64_t)r->n_zero_rows,
        .row_elems = lcols,
    };
    return push(l, op);
}

/* The source pieces of each parameter in element order, and the parameters that land in
 * each local tensor (contiguous in the canonical list: q,k,v / gate,up / one). */
typedef struct plan_index {
    uint64_t *piece_order; /* piece indices grouped by param, each group in element order */
    uint64_t *piece_first; /* [n_params + 1] param p's pieces are piece_order[first[p]..] */
    int64_t *slot_first;   /* [(layers + 1) * RLB_W_KIND_COUNT_] first param of a tensor */
    int64_t *slot_count;   /* params landing in that tensor */
} plan_index;

static void index_free(plan_index *ix)
{
    free(ix->piece_order);
    free(ix->piece_first);
    free(ix->slot_first);
    free(ix->slot_count);
}

static size_t slot_of(rlb_wkind kind, int32_t layer)
{
    return (size_t)(layer + 1) * RLB_W_KIND_COUNT_ + kind;
}

static int index_init(plan_index *ix, const rlb_source *src)
{
    const rlb_param_list *pl = src->params;
    size_t n_slots = (size_t)(pl->cfg.n_layers + 1) * RLB_W_KIND_COUNT_;
    *ix = (plan_index){
        .piece_order = malloc((size_t)src->n_pieces * sizeof(uint64_t) + 1),
        .piece_first = calloc((size_t)pl->n + 1, sizeof(uint64_t)),
        .slot_first = malloc(n_slots * sizeof(int64_t)),
        .slot_count = calloc(n_slots, sizeof(int64_t)),
    };
    if (!ix->piece_order || !ix->piece_first || !ix->slot_first || !ix->slot_count) {
        index_free(ix);
        return RLB_ENOMEM;
    }
    /* Counting sort by parameter. Every parameter's pieces come from one add call, which
     * appends them in element order, so the stable placement keeps that order. */
    for (uint64_t i = 0; i < src->n_pieces; i++)
        ix->piece_first[src->pieces[i].param + 1]++;
    for (int64_t p = 0; p < pl->n; p++)
        ix->piece_first[p + 1] += ix->piece_first[p];
    uint64_t *cursor = ix->piece_first; /* first[p] advances to p's end = (p+1)'s start */
    for (uint64_t i = 0; i < src->n_pieces; i++)
        ix->piece_order[cursor[src->pieces[i].param]++] = i;
    memmove(ix->piece_first + 1, ix->piece_first, (size_t)pl->n * sizeof(uint64_t));
    ix->piece_first[0] = 0;
    for (int64_t p = pl->n - 1; p >= 0; p--) {
        if (pl->params[p].role == RLB_ROLE_LORA_A || pl->params[p].role == RLB_ROLE_LORA_B)
            continue; /* adapter factors land in the stage, not in a local tensor */
        size_t s = slot_of(pl->params[p].target, pl->params[p].layer);
        ix->slot_first[s] = p;
        ix->slot_count[s]++;
    }
    return 0;
}

/* ---- LoRA adapters: the stage and the merges ---------------------------------------- */

typedef struct merge_list {
    rlb_merge_op *ops; /* merges so far */
    uint64_t n;        /* entries used */
    uint64_t cap;      /* entries allocated */
} merge_list;

static int push_merge(merge_list *l, const rlb_merge_op *m)
{
    if (l->n == l->cap) {
        uint64_t cap = l->cap ? l->cap * 2 : 64;
        rlb_merge_op *ops = realloc(l->ops, (size_t)cap * sizeof *ops);
        if (!ops)
            return RLB_ENOMEM;
        l->ops = ops;
        l->cap = cap;
    }
    l->ops[l->n++] = *m;
    return 0;
}

/* Byte offset in the stage of factor param p's first element: factors are laid out in
 * adapter order, A then B, each 64-byte aligned. */
static uint64_t stage_offset(const rlb_param_list *pl, int64_t param, uint64_t *total)
{
    uint64_t off = 0, found = 0;
    for (int64_t k = 0; k < pl->n_adapters; k++)
        for (int f = 0; f < 2; f++) {
            int64_t p = f ? pl->adapters[k].b : pl->adapters[k].a;
            off = (off + 63) / 64 * 64;
            if (p == param)
                found = off;
            off += rlb__param_numel(&pl->params[p]) * 4;
        }
    if (total)
        *total = (off + 63) / 64 * 64;
    return found;
}

/* Gathers every factor, whole and as f32, into the stage (destination 0 of stage_ops). */
static int plan_stage(op_list *l, const rlb_source *src, const plan_index *ix)
{
    const rlb_param_list *pl = src->params;
    for (int64_t k = 0; k < pl->n_adapters; k++)
        for (int f = 0; f < 2; f++) {
            int64_t p = f ? pl->adapters[k].b : pl->adapters[k].a;
            const rlb_param *par = &pl->params[p];
            rlb_param_region reg = {.n_rows = par->rows, .n_cols = par->cols,
                                    .local_cols = par->cols};
            rlb_local_tensor lt = {.offset = stage_offset(pl, p, NULL)};
            piece_ctx c = {.param = par, .reg = &reg, .lt = &lt, .dst_ref = 0,
                           .dst_dtype = RLB_DTYPE_F32};
            for (uint64_t q = ix->piece_first[p]; q < ix->piece_first[p + 1]; q++) {
                c.piece = &src->pieces[ix->piece_order[q]];
                int rc = emit_piece(l, &c);
                if (rc)
                    return rc;
            }
        }
    return 0;
}

/* What a plan with adapters adds per destination: the base copies of each adapted weight,
 * kept apart from the other ops and run inside its merge, and the merges. */
typedef struct adapted_lists {
    op_list copies;     /* base copies of adapted weights, grouped by merge */
    merge_list merges;  /* one per adapted weight block of each destination */
} adapted_lists;

/* Plans weight p (region reg of local tensor lt on this rank), which has adapter ad: its base
 * copies go to a->copies, fenced so they never merge with another weight's, and one merge
 * covers its block. */
static int plan_adapted(adapted_lists *a, const piece_ctx *c, const rlb_param_adapter *ad,
                        const rlb_source *src, const plan_index *ix, int64_t p)
{
    const rlb_param_list *pl = src->params;
    const rlb_param_region *reg = c->reg;
    if (reg->n_rows == 0 || reg->n_cols == 0)
        return 0;
    uint64_t first = a->copies.n;
    a->copies.fence = first;
    piece_ctx pc = *c;
    for (uint64_t q = ix->piece_first[p]; q < ix->piece_first[p + 1]; q++) {
        pc.piece = &src->pieces[ix->piece_order[q]];
        int rc = emit_piece(&a->copies, &pc);
        if (rc)
            return rc;
    }
    uint64_t des = rlb_dtype_size(c->dst_dtype);
    uint64_t sa = stage_offset(pl, ad->a, NULL), sb = stage_offset(pl, ad->b, NULL);
    uint64_t r = (uint64_t)ad->rank, in = (uint64_t)pl->params[ad->a].cols;
    rlb_merge_op m = {
        .dst_ref = c->dst_ref,
        .dst_dtype = (uint8_t)c->dst_dtype,
        .scale = ad->scale,
        .rank = (uint32_t)r,
        .dst_offset = c->lt->offset +
                      ((uint64_t)reg->lrow0 * (uint64_t)reg->local_cols + (uint64_t)reg->lcol0) *
                          des,
        .dst_stride = (uint64_t)reg->local_cols * des,
        .rows = (uint64_t)reg->n_rows,
        .cols = (uint64_t)reg->n_cols,
        .copy_first = first,
        .n_copies = a->copies.n - first,
    };
    if (c->lt->kind == RLB_W_EMBED) {
        /* delta(v, c) = sum_k A[k, v] B[c, k]: L = A^T from column row0 of A [r, V],
         * R = B^T from row col0 of B [D, r]. */
        m.flags = RLB_MERGE_L_TRANS | RLB_MERGE_R_TRANS;
        m.l_offset = sa + (uint64_t)reg->row0 * 4;
        m.l_ld = in;
        m.r_offset = sb + (uint64_t)reg->col0 * r * 4;
        m.r_ld = r;
    } else {
        /* Rows row0.. of B [out, r] times columns col0.. of A [r, in]. */
        m.l_offset = sb + (uint64_t)reg->row0 * r * 4;
        m.l_ld = r;
        m.r_offset = sa + (uint64_t)reg->col0 * 4;
        m.r_ld = in;
    }
    return push_merge(&a->merges, &m);
}

/* Appends the ops of TP rank t (destination dst_ref) to l, and with adapters the adapted
 * weights' copies and merges to a. */
static int plan_rank(op_list *l, adapted_lists *a, const rlb_source *src, const plan_index *ix,
                     const rlb_tp_layout *lay, uint32_t dst_ref)
{
    const rlb_param_list *pl = src->params;
    for (int64_t k = 0; k < lay->n_tensors; k++) {
        const rlb_local_tensor *lt = &lay->tensors[k];
        size_t s = slot_of(lt->kind, lt->layer);
        for (int64_t p = ix->slot_first[s]; p < ix->slot_first[s] + ix->slot_count[s]; p++) {
            rlb_param_region reg;
            rlb__param_region(&pl->params[p], lay, &reg);
            piece_ctx c = {.param = &pl->params[p], .reg = &reg, .lt = lt, .dst_ref = dst_ref,
                           .dst_dtype = lay->dtype};
            const rlb_param_adapter *ad = rlb__params_adapter_of(pl, p);
            int rc = ad ? plan_adapted(a, &c, ad, src, ix, p) : 0;
            for (uint64_t q = ix->piece_first[p]; !ad && !rc && q < ix->piece_first[p + 1];
                 q++) {
                c.piece = &src->pieces[ix->piece_order[q]];
                rc = emit_piece(l, &c);
            }
            if (!rc && reg.n_zero_rows)
                rc = emit_zero_rows(l, &reg, lt, dst_ref, lay->dtype);
            if (rc)
                return rc;
        }
    }
    return 0;
}

/* Replicas 1.. repeat replica 0's merges, and their copies, with their own destination
 * indices; fills dst_first_merge for them. */
static int replicate_adapted(rlb_plan *plan, adapted_lists *a, uint32_t T)
{
    uint64_t per_replica = a->merges.n;
    for (uint32_t d = T; d < plan->n_dst; d++) {
        uint64_t first = plan->dst_first_merge[d % T];
        uint64_t end = d % T + 1 < T ? plan->dst_first_merge[d % T + 1] : per_replica;
        plan->dst_first_merge[d] = a->merges.n;
        for (uint64_t i = first; i < end; i++) {
            rlb_merge_op m = a->merges.ops[i];
            m.dst_ref = d;
            m.copy_first = a->copies.n;
            a->copies.fence = a->copies.n;
            for (uint64_t k = 0; k < a->merges.ops[i].n_copies; k++) {
                rlb_copy_op op = a->copies.ops[a->merges.ops[i].copy_first + k];
                op.dst_ref = d;
                int rc = push(&a->copies, op);
                if (rc)
                    return rc;
            }
            m.n_copies = a->copies.n - m.copy_first;
            int rc = push_merge(&a->merges, &m);
            if (rc)
                return rc;
        }
    }
    plan->dst_first_merge[plan->n_dst] = a->merges.n;
    return 0;
}

/* Gathers the factors into the plan's stage (stage_ops). */
static int plan_adapters(rlb_plan *plan, const rlb_source *src, const plan_index *ix)
{
    const rlb_param_list *pl = src->params;
    op_list stage = {0};
    stage_offset(pl, -1, &plan->stage_bytes);
    int rc = plan_stage(&stage, src, ix);
    if (rc) {
        free(stage.ops);
        return rc;
    }
    plan->stage_ops = stage.ops;
    plan->n_stage_ops = stage.n;
    return 0;
}

static void plan_totals(const rlb_plan *plan, uint64_t *read, uint64_t *written)
{
    *read = *written = 0;
    for (uint64_t i = 0; i < plan->n_ops; i++) {
        const rlb_copy_op *op = &plan->ops[i];
        uint64_t elems = op->rows * op->row_elems;
        if (!is_zero_op(op))
            *read += elems * dsize(op->src_dtype);
        *written += elems * dsize(op->dst_dtype);
    }
    for (uint64_t i = 0; i < plan->n_stage_ops; i++)
        *read += plan->stage_ops[i].rows * plan->stage_ops[i].row_elems *
                 dsize(plan->stage_ops[i].src_dtype);
    for (uint64_t i = 0; i < plan->n_merge_copies; i++) {
        const rlb_copy_op *op = &plan->merge_copies[i];
        *read += op->rows * op->row_elems * dsize(op->src_dtype);
        *written += op->rows * op->row_elems * dsize(op->dst_dtype);
    }
}

static int check_target(const rlb_source *src, const rlb_target *tgt, char *err, size_t errlen)
{
    if (!src || !tgt || !src->params)
        return rlb__model_err(err, errlen, RLB_EINVAL, "plan: NULL source or target");
    if (tgt->replicas < 1 || tgt->tp_size < 1 ||
        (int64_t)tgt->replicas * tgt->tp_size >= (int64_t)UINT32_MAX)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "plan: target of %d replicas x TP %d is not a valid size",
                              tgt->replicas, tgt->tp_size);
    if (tgt->dtype != RLB_DTYPE_F32 && tgt->dtype != RLB_DTYPE_BF16 &&
        tgt->dtype != RLB_DTYPE_F16)
        return rlb__model_err(err, errlen, RLB_EDTYPE,
                              "plan: worker dtype %s; F32, BF16 or F16 expected",
                              rlb_dtype_name(tgt->dtype));
    int rc = rlb__tp_check(&src->params->cfg, tgt->tp_size, err, errlen);
    return rc ? rc : rlb__source_check(src, err, errlen);
}

int rlb__plan_build(const rlb_source *src, const rlb_target *tgt, rlb_plan *plan, char *err,
                    size_t errlen)
{
    *plan = (rlb_plan){0};
    int rc = check_target(src, tgt, err, errlen);
    if (rc)
        return rc;
    uint32_t T = (uint32_t)tgt->tp_size, n_dst = T * (uint32_t)tgt->replicas;
    op_list l = {0};
    adapted_lists a = {0};
    plan_index ix;
    rlb_tp_layout lay = {0};
    if ((rc = index_init(&ix, src)))
        return rlb__model_err(err, errlen, rc, "plan: out of memory");
    plan->n_src = src->n_buffers;
    plan->n_dst = n_dst;
    plan->src_bytes = malloc((size_t)src->n_buffers * sizeof(uint64_t) + 1);
    plan->dst_bytes = malloc((size_t)n_dst * sizeof(uint64_t));
    plan->dst_first_op = malloc(((size_t)n_dst + 1) * sizeof(uint64_t));
    if (src->params->n_adapters)
        plan->dst_first_merge = malloc(((size_t)n_dst + 1) * sizeof(uint64_t));
    if (!plan->src_bytes || !plan->dst_bytes || !plan->dst_first_op ||
        (src->params->n_adapters && !plan->dst_first_merge)) {
        rc = RLB_ENOMEM;
        goto err;
    }
    memcpy(plan->src_bytes, src->buffer_bytes, (size_t)src->n_buffers * sizeof(uint64_t));
    for (uint32_t t = 0; t < T; t++) {
        if ((rc = rlb__tp_layout_init(&lay, &src->params->cfg, (int)T, (int)t, tgt->dtype)))
            goto err;
        plan->dst_first_op[t] = l.n;
        if (plan->dst_first_merge)
            plan->dst_first_merge[t] = a.merges.n;
        rc = plan_rank(&l, &a, src, &ix, &lay, t);
        for (uint32_t d = t; d < n_dst; d += T)
            plan->dst_bytes[d] = lay.total_bytes;
        rlb__tp_layout_free(&lay);
        if (rc)
            goto err;
    }
    /* Replicas 1.. repeat replica 0's ops with their own destination indices (they do not
     * merge with each other: they did not in replica 0). */
    uint64_t per_replica = l.n;
    for (uint32_t d = T; d < n_dst; d++) {
        uint64_t first = plan->dst_first_op[d % T];
        uint64_t count = (d % T + 1 < T ? plan->dst_first_op[d % T + 1] : per_replica) - first;
        plan->dst_first_op[d] = l.n;
        for (uint64_t i = 0; i < count; i++) {
            rlb_copy_op op = l.ops[first + i];
            op.dst_ref = d;
            if ((rc = push(&l, op)))
                goto err;
        }
    }
    plan->dst_first_op[n_dst] = l.n;
    plan->ops = l.ops;
    plan->n_ops = l.n;
    l.ops = NULL; /* the plan owns them now */
    if (plan->dst_first_merge) {
        if ((rc = replicate_adapted(plan, &a, T)))
            goto err;
        plan->merges = a.merges.ops;
        plan->n_merges = a.merges.n;
        plan->merge_copies = a.copies.ops;
        plan->n_merge_copies = a.copies.n;
        a = (adapted_lists){0};
        if ((rc = plan_adapters(plan, src, &ix)))
            goto err;
    }
    plan_totals(plan, &plan->bytes_read, &plan->bytes_written);
    index_free(&ix);
    return 0;
err:
    free(l.ops);
    free(a.copies.ops);
    free(a.merges.ops);
    index_free(&ix);
    rlb__plan_free(plan);
    return rc == RLB_ENOMEM ? rlb__model_err(err, errlen, rc, "plan: out of memory") : rc;
}

void rlb__plan_free(rlb_plan *plan)
{
    free(plan->src_bytes);
    free(plan->dst_bytes);
    free(plan->dst_first_op);
    free(plan->ops);
    free(plan->stage_ops);
    free(plan->merges);
    free(plan->merge_copies);
    free(plan->dst_first_merge);
    *plan = (rlb_plan){0};
}

/* ---- validation -------------------------------------------------------------------------- */

static int is_float(uint8_t dtype)
{
    return dtype == RLB_DTYPE_F32 || dtype == RLB_DTYPE_BF16 || dtype == RLB_DTYPE_F16;
}

/* End of a strided extent, offset + (rows-1)*stride + row_bytes; 0 on overflow (no valid
 * extent ends at 0 since rows and row_bytes are non-zero). */
static uint64_t extent_end(uint64_t offset, uint64_t stride, uint64_t rows, uint64_t row_bytes)
{
    uint64_t span, end;
    if (__builtin_mul_overflow(rows - 1, stride, &span) ||
        __builtin_add_overflow(offset, span, &end) ||
        __builtin_add_overflow(end, row_bytes, &end))
        return 0;
    return end;
}

int rlb__plan_check_op(const rlb_copy_op *op, uint64_t index, uint32_t n_src,
                       const uint64_t *src_len, uint32_t n_dst, const uint64_t *dst_len,
                       char *err, size_t errlen)
{
    unsigned long long i = (unsigned long long)index;
    int zero = is_zero_op(op);
    if (op->dst_ref >= n_dst || (!zero && op->src_ref >= n_src))
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "plan op %llu: source %u / destination %u out of range (%u / %u)",
                              i, op->src_ref, op->dst_ref, n_src, n_dst);
    if (!is_float(op->dst_dtype) || (!zero && !is_float(op->src_dtype)))
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "plan op %llu: dtypes %u -> %u; F32, BF16 or F16 expected", i,
                              op->src_dtype, op->dst_dtype);
    for (size_t k = 0; k < sizeof op->reserved; k++)
        if (op->reserved[k])
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "plan op %llu: reserved bytes are not zero", i);
    if (!op->rows || !op->row_elems)
        return rlb__model_err(err, errlen, RLB_EINVAL, "plan op %llu: empty (%llu x %llu)", i,
                              (unsigned long long)op->rows, (unsigned long long)op->row_elems);
    uint64_t dbytes, sbytes;
    if (__builtin_mul_overflow(op->row_elems, dsize(op->dst_dtype), &dbytes) ||
        __builtin_mul_overflow(op->row_elems, dsize(zero ? op->dst_dtype : op->src_dtype),
                               &sbytes))
        return rlb__model_err(err, errlen, RLB_EINVAL, "plan op %llu: row length overflows", i);
    if (op->rows > 1 && op->dst_stride < dbytes)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "plan op %llu: destination rows overlap (stride %llu < %llu bytes)",
                              i, (unsigned long long)op->dst_stride,
                              (unsigned long long)dbytes);
    uint64_t dend = extent_end(op->dst_offset, op->dst_stride, op->rows, dbytes);
    if (!dend || dend > dst_len[op->dst_ref])
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "plan op %llu: writes past destination %u (ends at %llu of %llu)",
                              i, op->dst_ref, (unsigned long long)dend,
                              (unsigned long long)dst_len[op->dst_ref]);
    if (zero)
        return 0;
    uint64_t send = extent_end(op->src_offset, op->src_stride, op->rows, sbytes);
    if (!send || send > src_len[op->src_ref])
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "plan op %llu: reads past source %u (ends at %llu of %llu)", i,
                              op->src_ref, (unsigned long long)send,
                              (unsigned long long)src_len[op->src_ref]);
    return 0;
}

int rlb__plan_check_merge(const rlb_plan *plan, uint64_t index, const uint64_t *src_len,
                          const uint64_t *dst_len, char *err, size_t errlen)
{
    const rlb_merge_op *m = &plan->merges[index];
    unsigned long long i = (unsigned long long)index;
    if (m->dst_ref >= plan->n_dst || !is_float(m->dst_dtype) || m->reserved ||
        (m->flags & ~(RLB_MERGE_L_TRANS | RLB_MERGE_R_TRANS)))
        return rlb__model_err(err, errlen, RLB_EINVAL, "plan merge %llu: destination %u of "
                              "%u, dtype %u or flags %u not valid", i, m->dst_ref,
                              plan->n_dst, m->dst_dtype, m->flags);
    /* Kernels take int dimensions and leading dimensions. */
    if (!m->rows || !m->cols || !m->rank || m->rows > INT32_MAX || m->cols > INT32_MAX ||
        m->l_ld > INT32_MAX || m->r_ld > INT32_MAX)
        return rlb__model_err(err, errlen, RLB_EINVAL, "plan merge %llu: dimensions %llu x "
                              "%llu x %u empty or past int", i, (unsigned long long)m->rows,
                              (unsigned long long)m->cols, m->rank);
    int lt = (m->flags & RLB_MERGE_L_TRANS) != 0, rt = (m->flags & RLB_MERGE_R_TRANS) != 0;
    /* Stored row count and length of L and R as they are read. */
    uint64_t l_rows = lt ? m->rank : m->rows, l_len = lt ? m->rows : m->rank;
    uint64_t r_rows = rt ? m->cols : m->rank, r_len = rt ? m->rank : m->cols;
    uint64_t row_bytes = m->cols * dsize(m->dst_dtype), stage = plan->stage_bytes;
    uint64_t dend = extent_end(m->dst_offset, m->dst_stride, m->rows, row_bytes);
    uint64_t lend = extent_end(m->l_offset, m->l_ld * 4, l_rows, l_len * 4);
    uint64_t rend = extent_end(m->r_offset, m->r_ld * 4, r_rows, r_len * 4);
    if ((m->rows > 1 && m->dst_stride != row_bytes) || m->l_ld < l_len || m->r_ld < r_len ||
        !dend || dend > dst_len[m->dst_ref] || !lend || lend > stage || !rend ||
        rend > stage)
        return rlb__model_err(err, errlen, RLB_EINVAL, "plan merge %llu: its block is not "
                              "whole rows, or it, L or R lies outside destination %u (%llu "
                              "bytes) or the stage (%llu)", i, m->dst_ref,
                              (unsigned long long)dst_len[m->dst_ref],
                              (unsigned long long)stage);
    if (m->copy_first > plan->n_merge_copies ||
        m->n_copies > plan->n_merge_copies - m->copy_first)
        return rlb__model_err(err, errlen, RLB_EINVAL, "plan merge %llu: copies out of range",
                              i);
    for (uint64_t k = m->copy_first; k < m->copy_first + m->n_copies; k++) {
        const rlb_copy_op *op = &plan->merge_copies[k];
        int rc = rlb__plan_check_op(op, k, plan->n_src, src_len, plan->n_dst, dst_len, err,
                                    errlen);
        if (rc)
            return rc;
        uint64_t end = extent_end(op->dst_offset, op->dst_stride, op->rows,
                                  op->row_elems * dsize(op->dst_dtype));
        if (is_zero_op(op) || op->dst_ref != m->dst_ref || op->dst_dtype != m->dst_dtype ||
            op->dst_offset < m->dst_offset || end > dend)
            return rlb__model_err(err, errlen, RLB_EINVAL, "plan merge %llu: copy %llu writes "
                                  "outside its block", i, (unsigned long long)k);
    }
    return 0;
}

/* ---- wire form --------------------------------------------------------------------------- */

/* Offset of ops[] in the serialized form of a plan with these table sizes. */
static uint64_t wire_ops_offset(uint32_t n_src, uint32_t n_dst)
{
    uint64_t tables = sizeof(rlb_plan_wire_header) +
                      8 * ((uint64_t)n_src + 2 * (uint64_t)n_dst + 1);
    return (tables + 63) / 64 * 64;
}

uint64_t rlb__plan_serialized_size(const rlb_plan *plan)
{
    return wire_ops_offset(plan->n_src, plan->n_dst) + plan->n_ops * sizeof(rlb_copy_op);
}

int rlb__plan_serialize(const rlb_plan *plan, void *buf, uint64_t len)
{
    if (plan->n_merges || plan->n_stage_ops || plan->n_merge_copies)
        return RLB_EUNSUPPORTED;
    uint64_t total = rlb__plan_serialized_size(plan);
    if (len < total)
        return RLB_ETOOBIG;
    rlb_plan_wire_header h = {
        .magic = RLB_PLAN_MAGIC,
        .version = RLB_PLAN_VERSION,
        .header_bytes = sizeof h,
        .n_src = plan->n_src,
        .n_dst = plan->n_dst,
        .n_ops = plan->n_ops,
        .ops_offset = wire_ops_offset(plan->n_src, plan->n_dst),
        .bytes_read = plan->bytes_read,
        .bytes_written = plan->bytes_written,
        .total_bytes = total,
    };
    uint8_t *p = buf;
    memset(p, 0, (size_t)h.ops_offset);
    memcpy(p, &h, sizeof h);
    p += sizeof h;
    memcpy(p, plan->src_bytes, 8 * (size_t)plan->n_src);
    p += 8 * (size_t)plan->n_src;
    memcpy(p, plan->dst_bytes, 8 * (size_t)plan->n_dst);
    p += 8 * (size_t)plan->n_dst;
    memcpy(p, plan->dst_first_op, 8 * ((size_t)plan->n_dst + 1));
    memcpy((uint8_t *)buf + h.ops_offset, plan->ops, (size_t)plan->n_ops * sizeof(rlb_copy_op));
    return 0;
}

/* Checks the destination grouping and every op of a deserialized plan. */
static int check_plan(const rlb_plan *plan, char *err, size_t errlen)
{
    if (plan->dst_first_op[0] != 0 || plan->dst_first_op[plan->n_dst] != plan->n_ops)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "plan: destination op ranges do not cover ops[0..%llu)",
                              (unsigned long long)plan->n_ops);
    /* All ranges first: a non-decreasing table ending at n_ops keeps every range in ops[]. */
    for (uint32_t d = 0; d < plan->n_dst; d++)
        if (plan->dst_first_op[d + 1] < plan->dst_first_op[d])
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "plan: op range of destination %u is decreasing", d);
    /* The planner writes each destination front to back, every op past the end of the one
     * before; holding any plan to that keeps its ops disjoint, so executor threads never
     * write the same byte. */
    for (uint32_t d = 0; d < plan->n_dst; d++) {
        uint64_t prev_end = 0;
        for (uint64_t i = plan->dst_first_op[d]; i < plan->dst_first_op[d + 1]; i++) {
            const rlb_copy_op *op = &plan->ops[i];
            if (op->dst_ref != d)
                return rlb__model_err(err, errlen, RLB_EINVAL,
                                      "plan op %llu: in destination %u's range but writes %u",
                                      (unsigned long long)i, d, op->dst_ref);
            int rc = rlb__plan_check_op(op, i, plan->n_src, plan->src_bytes, plan->n_dst,
                                        plan->dst_bytes, err, errlen);
            if (rc)
                return rc;
            if (op->dst_offset < prev_end)
                return rlb__model_err(err, errlen, RLB_EINVAL,
                                      "plan op %llu: starts at byte %llu of destination %u, "
                                      "before the previous op's end %llu",
                                      (unsigned long long)i, (unsigned long long)op->dst_offset,
                                      d, (unsigned long long)prev_end);
            prev_end = extent_end(op->dst_offset, op->dst_stride, op->rows,
                                  op->row_elems * dsize(op->dst_dtype));
        }
    }
    return 0;
}

int rlb__plan_deserialize(const void *buf, uint64_t len, rlb_plan *plan, char *err,
                          size_t errlen)
{
    *plan = (rlb_plan){0};
    rlb_plan_wire_header h;
    if (!buf || len < sizeof h)
        return rlb__model_err(err, errlen, RLB_EINVAL, "plan: %llu bytes is too short",
                              (unsigned long long)len);
    memcpy(&h, buf, sizeof h);
    if (h.magic != RLB_PLAN_MAGIC)
        return rlb__model_err(err, errlen, RLB_EINVAL, "plan: bad magic");
    if (h.version != RLB_PLAN_VERSION || h.header_bytes != sizeof h)
        return rlb__model_err(err, errlen, RLB_EVERSION,
                              "plan: version %u (header %u bytes), expected %u (%zu)",
                              h.version, h.header_bytes, RLB_PLAN_VERSION, sizeof h);
    uint64_t ops_offset = wire_ops_offset(h.n_src, h.n_dst);
    uint64_t total = 0;
    if (h.ops_offset != ops_offset || h.n_ops > (UINT64_MAX - ops_offset) / 64 ||
        (total = ops_offset + h.n_ops * 64) != h.total_bytes || total > len)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "plan: sizes do not add up (%llu ops, %llu bytes, buffer %llu)",
                              (unsigned long long)h.n_ops, (unsigned long long)h.total_bytes,
                              (unsigned long long)len);
    const uint8_t *p = (const uint8_t *)buf + sizeof h;
    plan->n_src = h.n_src;
    plan->n_dst = h.n_dst;
    plan->n_ops = h.n_ops;
    plan->src_bytes = malloc(8 * (size_t)h.n_src + 1);
    plan->dst_bytes = malloc(8 * (size_t)h.n_dst + 1);
    plan->dst_first_op = malloc(8 * ((size_t)h.n_dst + 1));
    plan->ops = malloc((size_t)h.n_ops * sizeof(rlb_copy_op) + 1);
    int rc = RLB_ENOMEM;
    if (!plan->src_bytes || !plan->dst_bytes || !plan->dst_first_op || !plan->ops) {
        rlb__model_err(err, errlen, rc, "plan: out of memory");
        goto err;
    }
    memcpy(plan->src_bytes, p, 8 * (size_t)h.n_src);
    p += 8 * (size_t)h.n_src;
    memcpy(plan->dst_bytes, p, 8 * (size_t)h.n_dst);
    p += 8 * (size_t)h.n_dst;
    memcpy(plan->dst_first_op, p, 8 * ((size_t)h.n_dst + 1));
    memcpy(plan->ops, (const uint8_t *)buf + ops_offset, (size_t)h.n_ops * sizeof(rlb_copy_op));
    if ((rc = check_plan(plan, err, errlen)))
        goto err;
    plan_totals(plan, &plan->bytes_read, &plan->bytes_written);
    if (plan->bytes_read != h.bytes_read || plan->bytes_written != h.bytes_written) {
        rc = rlb__model_err(err, errlen, RLB_EINVAL,
                            "plan: byte totals in the header do not match the ops");
        goto err;
    }
    return 0;
err:
    rlb__plan_free(plan);
    return rc;
}
