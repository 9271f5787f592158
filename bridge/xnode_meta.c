/* xnode_meta.c: the registration blob of a node (xnode_meta.h has the format). */
#include "bridge/xnode_meta.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- Encoding -------------------------------------------------------------------------- */

void xn_meta_put(xbuf *w, const void *data, size_t n)
{
    if (w->oom || n == 0) /* n == 0: data may be NULL (a padding entry's name) */
        return;
    if (w->len + n > w->cap) {
        size_t cap = (w->len + n) * 2 + 256;
        uint8_t *p = realloc(w->p, cap);
        if (!p) {
            w->oom = 1;
            return;
        }
        w->p = p;
        w->cap = cap;
    }
    memcpy(w->p + w->len, data, n);
    w->len += n;
}

static void put_u8(xbuf *w, uint8_t v) { xn_meta_put(w, &v, 1); }
static void put_u16(xbuf *w, uint16_t v) { xn_meta_put(w, &v, 2); }
void xn_meta_put_u32(xbuf *w, uint32_t v) { xn_meta_put(w, &v, 4); }
void xn_meta_put_u64(xbuf *w, uint64_t v) { xn_meta_put(w, &v, 8); }

static void put_name(xbuf *w, const char *s)
{
    size_t n = s ? strlen(s) : 0;
    put_u16(w, (uint16_t)n);
    xn_meta_put(w, s, n);
}

void xn_meta_put_header(xbuf *w, uint32_t tp_size, uint32_t replicas, rlb_dtype wdt,
                        uint32_t mem, uint32_t n_bufs, uint32_t n_tensors)
{
    xn_meta_put_u32(w, XN_MAGIC);
    xn_meta_put_u32(w, XN_META_VERSION);
    xn_meta_put_u32(w, tp_size);
    xn_meta_put_u32(w, replicas);
    xn_meta_put_u32(w, (uint32_t)wdt);
    xn_meta_put_u32(w, mem);
    xn_meta_put_u32(w, n_bufs);
    xn_meta_put_u32(w, n_tensors);
}

void xn_meta_put_tensor(xbuf *w, const br_tensor *t, uint32_t buf)
{
    put_name(w, t->name);
    put_u8(w, (uint8_t)t->dtype);
    put_u8(w, (uint8_t)t->kind);
    put_u8(w, (uint8_t)t->ndim);
    put_u8(w, 0);
    xn_meta_put_u32(w, t->frank);
    xn_meta_put_u32(w, t->fworld);
    xn_meta_put_u32(w, t->unit);
    xn_meta_put_u32(w, buf);
    xn_meta_put_u64(w, t->offset);
    xn_meta_put_u64(w, t->length);
    for (uint32_t d = 0; d < t->ndim; d++)
        xn_meta_put_u64(w, (uint64_t)t->shape[d]);
    if (t->kind != RLB_LAYOUT_FSDP1)
        return;
    xn_meta_put_u32(w, (uint32_t)t->n_entries);
    for (uint64_t e = 0; e < t->n_entries; e++) {
        const rlb_flat_entry *fe = &t->entries[e];
        put_name(w, fe->name);
        put_u8(w, (uint8_t)fe->ndim);
        xn_meta_put_u64(w, (uint64_t)fe->shape[0]);
        xn_meta_put_u64(w, (uint64_t)fe->shape[1]);
        xn_meta_put_u64(w, fe->numel);
    }
}

void xn_meta_put_adapter(xbuf *w, const char *target, uint32_t rank, float scale)
{
    uint32_t bits;
    memcpy(&bits, &scale, 4);
    put_name(w, target);
    xn_meta_put_u32(w, rank);
    xn_meta_put_u32(w, bits);
}

void xn_meta_encode(const xn_meta *m, xbuf *w)
{
    xn_meta_put_header(w, m->tp_size, m->replicas, m->wdt, m->mem, m->n_bufs, m->n_tensors);
    for (uint32_t k = 0; k < m->n_bufs; k++)
        xn_meta_put_u64(w, m->buf_bytes[k]);
    for (uint32_t i = 0; i < m->n_tensors; i++)
        xn_meta_put_tensor(w, &m->tensors[i], m->tensors[i].seg);
    xn_meta_put_u32(w, m->n_adapters);
    for (uint32_t i = 0; i < m->n_adapters; i++)
        xn_meta_put_adapter(w, m->adapters[i].target, m->adapters[i].rank,
                            m->adapters[i].scale);
}

/* ---- Decoding (pure: bytes in, meta out) ----------------------------------------------- */

typedef struct xrd {
    const uint8_t *p;
    size_t len, at;
    int bad;
} xrd;

static void get(xrd *r, void *out, size_t n)
{
    if (r->bad || n > r->len - r->at) {
        r->bad = 1;
        memset(out, 0, n);
        return;
    }
    memcpy(out, r->p + r->at, n);
    r->at += n;
}

static uint8_t get_u8(xrd *r) { uint8_t v; get(r, &v, 1); return v; }
static uint16_t get_u16(xrd *r) { uint16_t v; get(r, &v, 2); return v; }
static uint32_t get_u32(xrd *r) { uint32_t v; get(r, &v, 4); return v; }
static uint64_t get_u64(xrd *r) { uint64_t v; get(r, &v, 8); return v; }

/* A NUL-terminated copy of the next name, or NULL: empty, or malformed (r->bad: past the
 * blob, or a NUL inside, which a C string could not give back). */
static char *get_name(xrd *r)
{
    uint16_t n = get_u16(r);
    if (r->bad || n == 0 || n > r->len - r->at || memchr(r->p + r->at, 0, n)) {
        r->bad |= n != 0;
        return NULL;
    }
    char *s = malloc((size_t)n + 1);
    if (!s) {
        r->bad = 1;
        return NULL;
    }
    memcpy(s, r->p + r->at, n);
    s[n] = 0;
    r->at += n;
    return s;
}

void xn_meta_free(xn_meta *m)
{
    for (uint32_t i = 0; m->tensors && i < m->n_tensors; i++) {
        br_tensor *t = &m->tensors[i];
        free(t->name);
        for (uint64_t e = 0; e < t->n_entries; e++)
            free((char *)t->entries[e].name);
        free(t->entries);
    }
    for (uint32_t i = 0; m->adapters && i < m->n_adapters; i++)
        free(m->adapters[i].target);
    free(m->adapters);
    free(m->tensors);
    free(m->buf_bytes);
    memset(m, 0, sizeof(*m));
}

/* The FSDP1 entries of t (its count read), or r->bad. */
static void get_entries(xrd *r, br_tensor *t)
{
    uint32_t n = get_u32(r);
    if (r->bad || n > (r->len - r->at) / 27) { /* an entry takes 27 bytes at least */
        r->bad = 1;
        return;
    }
    t->entries = calloc(n + 1, sizeof(*t->entries));
    if (!t->entries) {
        r->bad = 1;
        return;
    }
    for (uint32_t e = 0; e < n && !r->bad; e++) {
        rlb_flat_entry *fe = &t->entries[t->n_entries++];
        fe->name = get_name(r);
        fe->ndim = get_u8(r);
        fe->shape[0] = (int64_t)get_u64(r);
        fe->shape[1] = (int64_t)get_u64(r);
        fe->numel = get_u64(r);
        r->bad |= fe->ndim > 2 || fe->shape[0] < 0 || fe->shape[1] < 0;
    }
}

/* The next tensor into t, or r->bad. */
static void get_tensor(xrd *r, const xn_meta *m, br_tensor *t)
{
    t->name = get_name(r);
    t->dtype = (rlb_dtype)get_u8(r);
    const uint8_t kind = get_u8(r);
    t->kind = (rlb_layout_kind)kind;
    t->ndim = get_u8(r);
    const uint8_t pad = get_u8(r);
    t->frank = get_u32(r);
    t->fworld = get_u32(r);
    t->unit = get_u32(r);
    t->seg = get_u32(r);
    t->offset = get_u64(r);
    t->length = get_u64(r);
    t->mem = RLB_MEM_HOST_SHM;
    if (r->bad || !t->name || pad != 0 || rlb_dtype_size(t->dtype) == 0 ||
        kind > RLB_LAYOUT_FSDP2 || t->ndim < 1 || t->ndim > RLB_PROTO_MAX_DIMS ||
        t->seg >= m->n_bufs || t->offset > m->buf_bytes[t->seg] ||
        t->length > m->buf_bytes[t->seg] - t->offset ||
        (t->kind != RLB_LAYOUT_FULL && (t->fworld == 0 || t->frank >= t->fworld))) {
        r->bad = 1;
        return;
    }
    for (uint32_t d = 0; d < t->ndim; d++) {
        t->shape[d] = (int64_t)get_u64(r);
        r->bad |= t->shape[d] < 0;
    }
    if (!r->bad && t->kind == RLB_LAYOUT_FSDP1)
        get_entries(r, t);
}

int xn_meta_decode(const void *data, size_t len, xn_meta *m)
{
    xrd r = {.p = data, .len = len};
    memset(m, 0, sizeof(*m));
    if (get_u32(&r) != XN_MAGIC || get_u32(&r) != XN_META_VERSION)
        return RLB_EPROTO;
    m->tp_size = get_u32(&r);
    m->replicas = get_u32(&r);
    m->wdt = (rlb_dtype)get_u32(&r);
    m->mem = get_u32(&r);
    m->n_bufs = get_u32(&r);
    uint32_t n_tensors = get_u32(&r);
    /* a buffer's size takes 8 bytes, a tensor 47 at least (a 1-byte name, one dimension) */
    if (r.bad || rlb_dtype_size(m->wdt) == 0 || m->mem > XN_MEM_GPU || m->n_bufs > len / 8 ||
        n_tensors > len / 47) {
        memset(m, 0, sizeof(*m));
        return RLB_EPROTO;
    }
    m->buf_bytes = calloc(m->n_bufs + 1, sizeof(*m->buf_bytes));
    m->tensors = calloc(n_tensors + 1, sizeof(*m->tensors));
    if (!m->buf_bytes || !m->tensors) {
        xn_meta_free(m);
        return RLB_ENOMEM;
    }
    for (uint32_t k = 0; k < m->n_bufs; k++)
        m->buf_bytes[k] = get_u64(&r);
    for (uint32_t i = 0; i < n_tensors && !r.bad; i++)
        get_tensor(&r, m, &m->tensors[m->n_tensors++]);
    uint32_t n_adapters = get_u32(&r);
    if (!r.bad && n_adapters > (len - r.at) / 11) /* an adapter takes 11 bytes at least */
        r.bad = 1;
    if (!r.bad && !(m->adapters = calloc(n_adapters + 1, sizeof(*m->adapters))))
        r.bad = 1;
    for (uint32_t i = 0; i < n_adapters && !r.bad; i++) {
        xn_adapter *a = &m->adapters[m->n_adapters++];
        uint32_t bits;
        a->target = get_name(&r);
        a->rank = get_u32(&r);
        bits = get_u32(&r);
        memcpy(&a->scale, &bits, 4);
        r.bad |= !a->target || a->rank == 0 || !isfinite(a->scale);
    }
    if (r.bad || r.at != len) {
        xn_meta_free(m);
        return RLB_EPROTO;
    }
    return 0;
}
