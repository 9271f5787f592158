/* test_xnode_meta.c: the registration blob the bridges of a multi-node job exchange
 * (bridge/xnode_meta.h), decoded from bytes this test writes field by field from the
 * format's description (not with the encoder it checks):
 *   - a blob of every kind of record decodes to the fields written, and encodes back to the
 *     same bytes;
 *   - every truncation, a trailing byte, and each field set out of its range one at a time
 *     are RLB_EPROTO, leaving the meta empty;
 *   - every single-byte change of a valid blob decodes to RLB_EPROTO or to a meta that
 *     encodes back to the changed bytes (the encoding is canonical);
 *   - counts that claim more records than the blob could hold are refused before any
 *     allocation of that size.
 *   test_xnode_meta --write-corpus DIR  writes the valid blobs (the fuzz seeds)
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "bridge/xnode_meta.h"

/* ---- the test's own writer ------------------------------------------------------------ */

typedef struct blob {
    uint8_t b[4096];
    size_t n;
} blob;

static size_t w_le(blob *o, uint64_t v, int bytes)
{
    size_t at = o->n;
    for (int i = 0; i < bytes; i++)
        o->b[o->n++] = (uint8_t)(v >> (8 * i));
    return at;
}

static size_t w_name(blob *o, const char *s)
{
    size_t at = w_le(o, strlen(s), 2);
    memcpy(o->b + o->n, s, strlen(s));
    o->n += strlen(s);
    return at;
}

/* A tensor record up to its shape (FSDP1 entries follow); returns where it starts. */
static size_t w_tensor(blob *o, const char *name, int dtype, int kind, int ndim, uint32_t rank,
                       uint32_t world, uint32_t unit, uint32_t buf, uint64_t off, uint64_t len,
                       const int64_t *shape)
{
    size_t at = w_name(o, name);
    w_le(o, (uint64_t)dtype, 1);
    w_le(o, (uint64_t)kind, 1);
    w_le(o, (uint64_t)ndim, 1);
    w_le(o, 0, 1); /* pad */
    w_le(o, rank, 4);
    w_le(o, world, 4);
    w_le(o, unit, 4);
    w_le(o, buf, 4);
    w_le(o, off, 8);
    w_le(o, len, 8);
    for (int d = 0; d < ndim; d++)
        w_le(o, (uint64_t)shape[d], 8);
    return at;
}

/* Offsets of the fields the corruption test changes. */
typedef struct marks {
    size_t magic, version, wdt, mem, n_bufs, n_tensors, t_name, t_dtype, t_kind, t_ndim, t_pad,
        t_world, t_rank, t_buf, t_off, t_len, t_shape, f_count, e_ndim, e_shape, a_count,
        a_rank, a_scale, f2_world;
} marks;

/* Node blob: Llama-ish, TP 2, one replica, bf16 workers, buffers in GPU memory; 2 buffers (4096 and 1024 bytes);
 * tensors: a FULL [8, 16] bf16 at 0 of buffer 0, an FSDP2 rank 1 of 2 [32, 16] f32 at 256
 * of buffer 0, an FSDP1 unit 3 rank 0 of 4 in buffer 1 with entries (a 2-D weight, a
 * padding entry, a 1-D norm); adapters: q_proj rank 16 scale 2, down_proj rank 8 scale
 * 0.25. */
static void write_blob(blob *o, marks *k)
{
    memset(o, 0, sizeof(*o));
    k->magic = w_le(o, 0x584e4252u, 4);
    k->version = w_le(o, 3, 4);
    w_le(o, 2, 4);                    /* tp_size */
    w_le(o, 1, 4);                    /* replicas */
    k->wdt = w_le(o, RLB_DTYPE_BF16, 4);
    k->mem = w_le(o, 1, 4);           /* GPU memory */
    k->n_bufs = w_le(o, 2, 4);
    k->n_tensors = w_le(o, 3, 4);
    w_le(o, 4096, 8);
    w_le(o, 1024, 8);
    /* FULL */
    static const int64_t s_full[2] = {8, 16}, s_fsdp2[2] = {32, 16}, s_fsdp1[1] = {1000};
    k->t_name = w_tensor(o, "model.embed_tokens.weight", RLB_DTYPE_BF16, RLB_LAYOUT_FULL, 2,
                         0, 1, 0, 0, 0, 256, s_full);
    const size_t f = k->t_name + 2 + strlen("model.embed_tokens.weight"); /* its fields */
    k->t_dtype = f;
    k->t_kind = f + 1;
    k->t_ndim = f + 2;
    k->t_pad = f + 3;
    k->t_rank = f + 4;
    k->t_world = f + 8;
    k->t_buf = f + 16;
    k->t_off = f + 20;
    k->t_len = f + 28;
    k->t_shape = f + 36;
    /* FSDP2, rank 1 of 2 */
    const size_t f2 = w_tensor(o, "model.layers.0.mlp.up_proj.weight", RLB_DTYPE_F32,
                               RLB_LAYOUT_FSDP2, 2, 1, 2, 0, 0, 256, 1024, s_fsdp2);
    k->f2_world = f2 + 2 + strlen("model.layers.0.mlp.up_proj.weight") + 8;
    /* FSDP1, unit 3, rank 0 of 4 */
    w_tensor(o, "_fsdp_wrapped_module._flat_param", RLB_DTYPE_F32, RLB_LAYOUT_FSDP1, 1, 0, 4,
             3, 1, 0, 1024, s_fsdp1);
    k->f_count = w_le(o, 3, 4);
    w_name(o, "model.layers.1.self_attn.o_proj.weight");
    k->e_ndim = w_le(o, 2, 1);
    k->e_shape = w_le(o, 16, 8);
    w_le(o, 16, 8);
    w_le(o, 256, 8);
    w_le(o, 0, 2);                    /* padding: no name */
    w_le(o, 0, 1);
    w_le(o, 0, 8);
    w_le(o, 0, 8);
    w_le(o, 8, 8);
    w_name(o, "model.layers.1.input_layernorm.weight");
    w_le(o, 1, 1);
    w_le(o, 16, 8);
    w_le(o, 0, 8);
    w_le(o, 16, 8);
    /* adapters */
    float two = 2.0f, quarter = 0.25f;
    uint32_t b2, bq;
    memcpy(&b2, &two, 4);
    memcpy(&bq, &quarter, 4);
    k->a_count = w_le(o, 2, 4);
    w_name(o, "model.layers.0.self_attn.q_proj.weight");
    k->a_rank = w_le(o, 16, 4);
    k->a_scale = w_le(o, b2, 4);
    w_name(o, "model.layers.0.mlp.down_proj.weight");
    w_le(o, 8, 4);
    w_le(o, bq, 4);
}

static int is_empty(const xn_meta *m)
{
    static const xn_meta zero;
    return memcmp(m, &zero, sizeof(zero)) == 0;
}

/* Decodes d; when it is accepted, the encoding of the result must be d again. */
static int decode_canonical(const uint8_t *d, size_t n)
{
    xn_meta m;
    int rc = xn_meta_decode(d, n, &m);
    if (rc != 0) {
        assert_true(is_empty(&m));
        return rc;
    }
    xbuf w = {0};
    xn_meta_encode(&m, &w);
    assert_false(w.oom);
    assert_int_equal(w.len, n);
    assert_memory_equal(w.p, d, n);
    free(w.p);
    xn_meta_free(&m);
    return 0;
}

/* ---- tests ----------------------------------------------------------------------------- */

static void test_fields(void **state)
{
    (void)state;
    blob o;
    marks k;
    write_blob(&o, &k);
    xn_meta m;
    assert_int_equal(xn_meta_decode(o.b, o.n, &m), 0);
    assert_int_equal(m.tp_size, 2);
    assert_int_equal(m.replicas, 1);
    assert_int_equal(m.wdt, RLB_DTYPE_BF16);
    assert_int_equal(m.mem, XN_MEM_GPU);
    assert_int_equal(m.n_bufs, 2);
    assert_int_equal(m.buf_bytes[0], 4096);
    assert_int_equal(m.buf_bytes[1], 1024);
    assert_int_equal(m.n_tensors, 3);
    const br_tensor *t = m.tensors;
    assert_string_equal(t[0].name, "model.embed_tokens.weight");
    assert_int_equal(t[0].kind, RLB_LAYOUT_FULL);
    assert_int_equal(t[0].dtype, RLB_DTYPE_BF16);
    assert_int_equal(t[0].ndim, 2);
    assert_int_equal(t[0].shape[0], 8);
    assert_int_equal(t[0].shape[1], 16);
    assert_int_equal(t[0].seg, 0);
    assert_int_equal(t[0].length, 256);
    assert_int_equal(t[0].mem, RLB_MEM_HOST_SHM);
    assert_int_equal(t[1].kind, RLB_LAYOUT_FSDP2);
    assert_int_equal(t[1].frank, 1);
    assert_int_equal(t[1].fworld, 2);
    assert_int_equal(t[1].offset, 256);
    assert_int_equal(t[1].shape[0], 32);
    assert_int_equal(t[2].kind, RLB_LAYOUT_FSDP1);
    assert_int_equal(t[2].unit, 3);
    assert_int_equal(t[2].seg, 1);
    assert_int_equal(t[2].n_entries, 3);
    assert_string_equal(t[2].entries[0].name, "model.layers.1.self_attn.o_proj.weight");
    assert_int_equal(t[2].entries[0].ndim, 2);
    assert_int_equal(t[2].entries[0].numel, 256);
    assert_null(t[2].entries[1].name);
    assert_int_equal(t[2].entries[1].numel, 8);
    assert_int_equal(t[2].entries[2].ndim, 1);
    assert_int_equal(m.n_adapters, 2);
    assert_string_equal(m.adapters[0].target, "model.layers.0.self_attn.q_proj.weight");
    assert_int_equal(m.adapters[0].rank, 16);
    assert_true(m.adapters[0].scale == 2.0f);
    assert_true(m.adapters[1].scale == 0.25f);
    xn_meta_free(&m);
    assert_true(is_empty(&m));
    assert_int_equal(decode_canonical(o.b, o.n), 0);
}

static void test_every_truncation(void **state)
{
    (void)state;
    blob o;
    marks k;
    write_blob(&o, &k);
    for (size_t n = 0; n < o.n; n++) {
        uint8_t *cut = malloc(n ? n : 1); /* exactly n bytes: ASan sees any read past */
        memcpy(cut, o.b, n);
        assert_int_equal(decode_canonical(cut, n), RLB_EPROTO);
        free(cut);
    }
    o.b[o.n++] = 0; /* a trailing byte */
    assert_int_equal(decode_canonical(o.b, o.n), RLB_EPROTO);
}

/* Each field out of its range, one at a time. */
static void test_bad_fields(void **state)
{
    (void)state;
    blob o;
    marks k;
    write_blob(&o, &k);
    const float nan = NAN;
    uint32_t nan_bits;
    memcpy(&nan_bits, &nan, 4);
    const struct {
        const char *what;
        size_t at;  /* offset in marks */
        uint64_t v;
        int bytes;
    } cases[] = {
        {"magic", offsetof(marks, magic), 0x584e4253u, 4},
        {"version", offsetof(marks, version), 2, 4},
        {"memory kind", offsetof(marks, mem), 2, 4},
        {"worker dtype", offsetof(marks, wdt), 99, 4},
        {"buffers past the blob", offsetof(marks, n_bufs), 0xffffffffu, 4},
        {"tensors past the blob", offsetof(marks, n_tensors), 0xffffffffu, 4},
        {"a name with a NUL", offsetof(marks, t_name), 0, -3}, /* byte 3 of the name */
        {"tensor dtype", offsetof(marks, t_dtype), 200, 1},
        {"layout kind", offsetof(marks, t_kind), 3, 1},
        {"no dimension", offsetof(marks, t_ndim), 0, 1},
        {"too many dimensions", offsetof(marks, t_ndim), RLB_PROTO_MAX_DIMS + 1, 1},
        {"pad byte", offsetof(marks, t_pad), 1, 1},
        {"buffer index", offsetof(marks, t_buf), 2, 4},
        {"offset past the buffer", offsetof(marks, t_off), 4097, 8},
        {"length past the buffer", offsetof(marks, t_len), 4097, 8},
        {"negative dimension", offsetof(marks, t_shape), (uint64_t)-8, 8},
        {"FSDP world 0", offsetof(marks, f2_world), 0, 4},
        {"FSDP rank >= world", offsetof(marks, f2_world), 1, 4},
        {"entries past the blob", offsetof(marks, f_count), 0x7fffffffu, 4},
        {"entry of 3 dimensions", offsetof(marks, e_ndim), 3, 1},
        {"negative entry dimension", offsetof(marks, e_shape), (uint64_t)-1, 8},
        {"adapters past the blob", offsetof(marks, a_count), 0xffffffffu, 4},
        {"adapter rank 0", offsetof(marks, a_rank), 0, 4},
        {"adapter scale NaN", offsetof(marks, a_scale), nan_bits, 4},
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        blob bad = o;
        size_t at;
        memcpy(&at, (const char *)&k + cases[c].at, sizeof(at));
        if (cases[c].bytes < 0) {
            bad.b[at + 2 + (size_t)(-cases[c].bytes)] = (uint8_t)cases[c].v;
        } else {
            for (int i = 0; i < cases[c].bytes; i++)
                bad.b[at + (size_t)i] = (uint8_t)(cases[c].v >> (8 * i));
        }
        int rc = decode_canonical(bad.b, bad.n);
        if (rc != RLB_EPROTO)
            fail_msg("%s: decoded with %d", cases[c].what, rc);
    }
}

/* Every single-byte change: refused, or a meta that encodes back to the changed bytes. */
static void test_every_byte(void **state)
{
    (void)state;
    blob o;
    marks k;
    write_blob(&o, &k);
    static const uint8_t vals[] = {0x00, 0x01, 0x02, 0x7f, 0x80, 0xff};
    int accepted = 0;
    for (size_t i = 0; i < o.n; i++)
        for (size_t v = 0; v < sizeof(vals); v++) {
            blob x = o;
            if (x.b[i] == vals[v])
                continue;
            x.b[i] = vals[v];
            accepted += decode_canonical(x.b, x.n) == 0;
        }
    /* the byte values of the names, unit and numel fields are free: some changes decode */
    assert_true(accepted > 0);
}

static int write_corpus(const char *dir)
{
    blob o;
    marks k;
    write_blob(&o, &k);
    char path[512];
    snprintf(path, sizeof(path), "%s/node.bin", dir);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(o.b, 1, o.n, f) != o.n || fclose(f) != 0) {
        fprintf(stderr, "test_xnode_meta: cannot write %s\n", path);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--write-corpus") == 0)
        return write_corpus(argv[2]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fields),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_bad_fields),
        cmocka_unit_test(test_every_byte),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
