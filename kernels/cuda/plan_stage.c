/* plan_stage.c: cutting staged ops into pieces and packing them into staging windows
 * (plan_stage.h).
 *
 * Invariant: every staged piece reads, from its staging buffer, exactly the bytes its
 * original op read from the source, at the same address modulo 16; a window's copies never
 * overlap one another in the buffer, and each lies inside [0, cap).
 */
#include "kernels/cuda/plan_stage.h"

#include <stdlib.h>
#include <string.h>

#include "rlb/rlb.h"

/* A gap of at most this many bytes between two pieces of one source is copied along with
 * them: one larger copy costs less than a second copy call. */
#define STAGE_GAP_MAX (64u << 10)
/* Room a piece leaves in a buffer, so that it fits a fresh one at any alignment phase. */
#define STAGE_SLACK 256u

/* A staged op's rows (or part of them) whose source bytes fit one staging buffer. */
typedef struct piece {
    rlb_copy_op op;  /* the piece, still reading the original source */
    uint64_t from;   /* index of the op it was cut from */
    uint64_t start;  /* first source byte it reads */
    uint64_t span;   /* bytes from start to one past its last byte */
} piece;

typedef struct piece_vec {
    piece *v;     /* pieces */
    uint64_t n;   /* in use */
    uint64_t cap; /* allocated */
} piece_vec;

static uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

static int push_piece(piece_vec *pv, const rlb_copy_op *op, uint64_t from, uint64_t row_bytes)
{
    if (pv->n == pv->cap) {
        uint64_t cap = pv->cap ? 2 * pv->cap : 256;
        piece *v = realloc(pv->v, cap * sizeof(*v));
        if (!v)
            return RLB_ENOMEM;
        pv->v = v;
        pv->cap = cap;
    }
    piece *p = &pv->v[pv->n++];
    p->op = *op;
    p->from = from;
    p->start = op->src_offset;
    p->span = (op->rows - 1) * op->src_stride + row_bytes;
    return 0;
}

/* Cuts op (ops[from]) into pieces reading at most max_span source bytes each: column
 * segments of a multiple of 16 elements when a row alone is longer, then groups of rows. */
static int cut_op(const rlb_copy_op *op, uint64_t from, uint64_t max_span, piece_vec *pv)
{
    const uint64_t ss = rlb_dtype_size((rlb_dtype)op->src_dtype);
    const uint64_t ds = rlb_dtype_size((rlb_dtype)op->dst_dtype);
    uint64_t seg = op->row_elems;
    if (seg * ss > max_span)
        seg = max_span / ss / 16 * 16;
    for (uint64_t c0 = 0; c0 < op->row_elems; c0 += seg) {
        const uint64_t elems = min_u64(seg, op->row_elems - c0), row_bytes = elems * ss;
        const uint64_t per = op->src_stride ? (max_span - row_bytes) / op->src_stride + 1 : op->rows;
        for (uint64_t r0 = 0; r0 < op->rows; r0 += per) {
            rlb_copy_op p = *op;
            p.rows = min_u64(per, op->rows - r0);
            p.row_elems = elems;
            p.src_offset += r0 * op->src_stride + c0 * ss;
            p.dst_offset += r0 * op->dst_stride + c0 * ds;
            int rc = push_piece(pv, &p, from, row_bytes);
            if (rc)
                return rc;
        }
    }
    return 0;
}

/* Source, then position; destination breaks ties so the order does not depend on qsort. */
static int piece_cmp(const void *a, const void *b)
{
    const piece *x = a, *y = b;
    if (x->op.src_ref != y->op.src_ref)
        return x->op.src_ref < y->op.src_ref ? -1 : 1;
    if (x->start != y->start)
        return x->start < y->start ? -1 : 1;
    if (x->op.dst_ref != y->op.dst_ref)
        return x->op.dst_ref < y->op.dst_ref ? -1 : 1;
    return (x->op.dst_offset > y->op.dst_offset) - (x->op.dst_offset < y->op.dst_offset);
}

void rlb__stage_free(rlb_stage_plan *sp)
{
    if (!sp)
        return;
    free(sp->ops);
    free(sp->op_of);
    free(sp->copies);
    free(sp->windows);
    memset(sp, 0, sizeof(*sp));
}

/* Packs the sorted pieces into windows (see the file comment of plan_stage.h). */
static void pack(const piece *pcs, uint64_t n, const uint8_t *src_phase, rlb_stage_plan *sp)
{
    rlb_stage_window *w = NULL;
    rlb_stage_copy *c = NULL;
    for (uint64_t i = 0; i < n; i++) {
        const piece *p = &pcs[i];
        const uint32_t ref = p->op.src_ref;
        /* extend the current copy over this piece when it is close and still fits */
        int extend = 0;
        if (c && c->src_ref == ref && p->start <= c->src_offset + c->bytes + STAGE_GAP_MAX) {
            uint64_t end = p->start + p->span;
            if (end < c->src_offset + c->bytes)
                end = c->src_offset + c->bytes;
            extend = c->stage_offset + (end - c->src_offset) <= sp->cap;
            if (extend)
                c->bytes = end - c->src_offset;
        }
        if (!extend) {
            const uint64_t phase = (src_phase[ref] + p->start) % 16;
            uint64_t off = c ? (c->stage_offset + c->bytes + 255) / 256 * 256 + phase : 0;
            if (!w || off + p->span > sp->cap) {
                w = &sp->windows[sp->n_windows];
                w->buf = sp->n_windows++ % 2;
                w->first_op = sp->n_ops;
                w->n_ops = 0;
                w->first_copy = sp->n_copies;
                w->n_copies = 0;
                off = phase;
            }
            c = &sp->copies[sp->n_copies++];
            c->src_ref = ref;
            c->buf = w->buf;
            c->src_offset = p->start;
            c->stage_offset = off;
            c->bytes = p->span;
            w->n_copies++;
        }
        sp->op_of[sp->n_ops] = p->from;
        rlb_copy_op *op = &sp->ops[sp->n_ops++];
        *op = p->op;
        op->src_ref = w->buf;
        op->src_offset = c->stage_offset + (p->start - c->src_offset);
        w->n_ops++;
    }
    for (uint64_t k = 0; k < sp->n_copies; k++)
        sp->bytes_copied += sp->copies[k].bytes;
}

int rlb__stage_build(const rlb_copy_op *ops, uint64_t n, uint32_t n_src, const uint8_t *staged,
                     const uint8_t *src_phase, uint64_t cap, rlb_stage_plan *out)
{
    if (!out)
        return RLB_EINVAL;
    memset(out, 0, sizeof(*out));
    if ((n && !ops) || (n_src && (!staged || !src_phase)) || cap < RLB_STAGE_MIN_BYTES ||
        cap % 256)
        return RLB_EINVAL;
    out->cap = cap;
    piece_vec pv = {0};
    int rc = 0;
    for (uint64_t i = 0; i < n; i++) {
        const rlb_copy_op *op = &ops[i];
        if (op->src_ref == RLB_PLAN_ZERO_SRC || op->src_ref >= n_src || !staged[op->src_ref])
            continue;
        if ((rc = cut_op(op, i, cap - STAGE_SLACK, &pv)))
            goto err;
    }
    if (pv.n == 0)
        return 0;
    if (pv.n > UINT32_MAX) { /* windows are counted in 32 bits */
        rc = RLB_ETOOBIG;
        goto err;
    }
    qsort(pv.v, pv.n, sizeof(*pv.v), piece_cmp);
    out->ops = malloc(pv.n * sizeof(*out->ops));
    out->op_of = malloc(pv.n * sizeof(*out->op_of));
    out->copies = malloc(pv.n * sizeof(*out->copies));
    out->windows = malloc(pv.n * sizeof(*out->windows));
    if (!out->ops || !out->op_of || !out->copies || !out->windows) {
        rc = RLB_ENOMEM;
        goto err;
    }
    pack(pv.v, pv.n, src_phase, out);
    free(pv.v);
    return 0;
err:
    free(pv.v);
    rlb__stage_free(out);
    return rc;
}
