/* merge_pieces.c: a LoRA merge's base copies as rectangles of its block (merge_pieces.h). */
#include "model/merge_pieces.h"

#include <stdlib.h>

static int add_piece(rlb_piece_list *l, const rlb_merge_piece *p)
{
    if (l->n == l->cap) {
        uint64_t cap = l->cap ? 2 * l->cap : 64;
        rlb_merge_piece *q = realloc(l->p, cap * sizeof(*q));
        if (!q)
            return RLB_ENOMEM;
        l->p = q;
        l->cap = cap;
    }
    l->p[l->n++] = *p;
    return 0;
}

static int cmp_piece(const void *a, const void *b)
{
    const rlb_merge_piece *x = a, *y = b;
    if (x->i0 != y->i0)
        return x->i0 < y->i0 ? -1 : 1;
    return x->j0 < y->j0 ? -1 : x->j0 > y->j0;
}

/* Cuts base copy o of merge m into pieces appended to l. Returns 0, 1 (not pieces) or
 * RLB_ENOMEM. */
static int op_pieces(const rlb_merge_op *m, const rlb_copy_op *o, rlb_piece_list *l)
{
    const uint64_t des = rlb_dtype_size((rlb_dtype)m->dst_dtype), C = m->cols;
    const int zero = o->src_ref == RLB_PLAN_ZERO_SRC;
    if (o->dst_ref != m->dst_ref || o->dst_dtype != m->dst_dtype || o->row_elems == 0 ||
        o->rows == 0 || o->dst_offset < m->dst_offset || (o->dst_offset - m->dst_offset) % des ||
        o->dst_stride % des ||
        (!zero && o->src_dtype != RLB_DTYPE_F32 && o->src_dtype != RLB_DTYPE_BF16 &&
         o->src_dtype != RLB_DTYPE_F16))
        return 1;
    const uint64_t ses = zero ? 0 : rlb_dtype_size((rlb_dtype)o->src_dtype);
    const uint64_t e0 = (o->dst_offset - m->dst_offset) / des;
    rlb_merge_piece p = {.src_ref = o->src_ref, .src_dtype = zero ? 0u : o->src_dtype};
    if ((o->rows == 1 || o->dst_stride == C * des) && e0 % C + o->row_elems <= C) {
        /* the op's rows are rows of C: one piece */
        if (e0 / C + o->rows > m->rows)
            return 1;
        p.src_off = o->src_offset;
        p.src_stride = o->src_stride;
        p.i0 = (uint32_t)(e0 / C);
        p.i1 = (uint32_t)(e0 / C + o->rows);
        p.j0 = (uint32_t)(e0 % C);
        p.j1 = (uint32_t)(e0 % C + o->row_elems);
        return add_piece(l, &p);
    }
    if (o->rows > 4096)
        return 1; /* a long list of runs across rows: not worth a table */
    /* each op row is a run of C's elements across rows: its head, whole rows, tail */
    for (uint64_t r = 0; r < o->rows; r++) {
        uint64_t e = e0 + r * (o->dst_stride / des), left = o->row_elems;
        uint64_t so = o->src_offset + r * o->src_stride;
        while (left) {
            const uint64_t j = e % C;
            const uint64_t whole = j == 0 ? left / C : 0;
            const uint64_t len = whole ? whole * C : (left < C - j ? left : C - j);
            if (e / C + (whole ? whole : 1) > m->rows)
                return 1;
            p.src_off = so;
            p.src_stride = C * ses;
            p.i0 = (uint32_t)(e / C);
            p.i1 = (uint32_t)(e / C + (whole ? whole : 1));
            p.j0 = (uint32_t)j;
            p.j1 = (uint32_t)(whole ? C : j + len);
            if (add_piece(l, &p))
                return RLB_ENOMEM;
            e += len;
            so += len * ses;
            left -= len;
        }
    }
    return 0;
}

int rlb__merge_pieces(const rlb_plan *plan, const rlb_merge_op *m, rlb_piece_list *l)
{
    const uint64_t first = l->n;
    int rc = 0;
    if (m->dst_stride != m->cols * rlb_dtype_size((rlb_dtype)m->dst_dtype) || m->cols == 0 ||
        m->rows > UINT32_MAX / 2 || m->cols > UINT32_MAX / 2)
        rc = 1;
    for (uint64_t c = 0; c < m->n_copies && !rc; c++)
        rc = op_pieces(m, &plan->merge_copies[m->copy_first + c], l);
    rlb_merge_piece *p = l->p + first;
    const uint64_t np = l->n - first;
    if (!rc) {
        /* they tile the block when, inside it (checked above), their area is the block's
         * and no two overlap: sorted by (i0, j0), a piece can only overlap one that starts
         * on an earlier or the same row */
        qsort(p, np, sizeof(*p), cmp_piece);
        uint64_t area = 0;
        for (uint64_t i = 0; i < np; i++)
            area += (uint64_t)(p[i].i1 - p[i].i0) * (p[i].j1 - p[i].j0);
        rc = area != m->rows * m->cols;
        for (uint64_t i = 0; i < np && !rc; i++)
            for (uint64_t k = i + 1; k < np && p[k].i0 < p[i].i1 && !rc; k++)
                rc = p[k].j0 < p[i].j1 && p[i].j0 < p[k].j1;
    }
    if (rc)
        l->n = first;
    return rc;
}

void rlb__piece_list_free(rlb_piece_list *l)
{
    free(l->p);
    l->p = NULL;
    l->n = l->cap = 0;
}
