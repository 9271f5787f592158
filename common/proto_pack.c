/* proto_pack.c: encodes a message (proto.h) with msgpack-c's packer into a caller-given
 * buffer, through a bounded writer that never writes past the buffer's end.
 *
 * The writer's callback copies into {ptr, cap} and, once a write would not fit, only
 * records the overflow: msgpack-c then runs to the end of the message without effect, and
 * the caller learns RLB_ETOOBIG. With ptr == NULL the same walk counts bytes, which is how
 * rlb__msg_packed_size gets the exact size without a second encoder. Optional fields that
 * are zero are left out; bins are written with one memcpy each.
 */
#include "common/proto.h"

#include <msgpack.h>

#include "common/log.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "token and logprob bins are host arrays sent as little-endian: little-endian hosts only"
#endif

typedef struct writer {
    uint8_t *ptr;  /* destination, or NULL to count only */
    size_t cap;    /* bytes available at ptr */
    size_t len;    /* bytes written (or counted) so far */
    bool overflow; /* a write did not fit; nothing more is written */
} writer;

static int writer_write(void *data, const char *buf, size_t n)
{
    writer *w = data;
    if (w->overflow || n > w->cap - w->len) {
        w->overflow = true;
        return -1;
    }
    if (w->ptr && n)
        memcpy(w->ptr + w->len, buf, n);
    w->len += n;
    return 0;
}

static void pack_str(msgpack_packer *pk, const char *s, size_t n)
{
    msgpack_pack_str(pk, n);
    if (n)
        msgpack_pack_str_body(pk, s, n);
}

static void pack_bin(msgpack_packer *pk, const void *p, size_t n)
{
    msgpack_pack_bin(pk, n);
    if (n)
        msgpack_pack_bin_body(pk, p, n);
}

/* True when field f of s goes on the wire: required, or optional and not zero. */
static bool field_present(const rlb__field *f, const void *s)
{
    if (f->required)
        return true;
    const uint8_t *v = rlb__field_addr(s, f);
    size_t n;
    switch (f->kind) {
    case RLB__FK_U64: n = sizeof(uint64_t); break;
    case RLB__FK_F64: n = sizeof(double); break;
    case RLB__FK_ENUM: n = sizeof(int); break;
    case RLB__FK_BOOL: n = sizeof(bool); break;
    case RLB__FK_U32: case RLB__FK_I32: case RLB__FK_F32: n = 4; break;
    case RLB__FK_BYTES: n = f->size; break;
    case RLB__FK_STR: case RLB__FK_PSTRUCT: return rlb__field_pointer(s, f) != NULL;
    default: return rlb__field_count(s, f) != 0; /* BIN, DIMS, ARRAY */
    }
    for (size_t i = 0; i < n; i++)
        if (v[i])
            return true;
    return false;
}

static void pack_map(msgpack_packer *pk, const rlb__struct_desc *desc, const void *s,
                     uint32_t type);

static void pack_value(msgpack_packer *pk, const rlb__field *f, const void *s)
{
    const void *v = rlb__field_addr(s, f);
    switch (f->kind) {
    case RLB__FK_U64: {
        uint64_t x;
        memcpy(&x, v, sizeof x);
        msgpack_pack_uint64(pk, x);
        break;
    }
    case RLB__FK_U32: {
        uint32_t x;
        memcpy(&x, v, sizeof x);
        msgpack_pack_uint32(pk, x);
        break;
    }
    case RLB__FK_I32: {
        int32_t x;
        memcpy(&x, v, sizeof x);
        msgpack_pack_int32(pk, x);
        break;
    }
    case RLB__FK_ENUM: {
        int x; /* validated: 0 <= x < f->size */
        memcpy(&x, v, sizeof x);
        msgpack_pack_uint32(pk, (uint32_t)x);
        break;
    }
    case RLB__FK_BOOL: {
        bool x;
        memcpy(&x, v, sizeof x);
        if (x)
            msgpack_pack_true(pk);
        else
            msgpack_pack_false(pk);
        break;
    }
    case RLB__FK_F32: {
        float x;
        memcpy(&x, v, sizeof x);
        msgpack_pack_float(pk, x);
        break;
    }
    case RLB__FK_F64: {
        double x;
        memcpy(&x, v, sizeof x);
        msgpack_pack_double(pk, x);
        break;
    }
    case RLB__FK_STR: {
        const char *str = rlb__field_pointer(s, f);
        pack_str(pk, str, strlen(str));
        break;
    }
    case RLB__FK_BIN:
        pack_bin(pk, rlb__field_pointer(s, f), (size_t)rlb__field_count(s, f) * f->size);
        break;
    case RLB__FK_BYTES:
        pack_bin(pk, v, f->size);
        break;
    case RLB__FK_DIMS: {
        uint32_t ndim = rlb__field_count(s, f);
        const uint64_t *shape = v;
        msgpack_pack_array(pk, ndim);
        for (uint32_t i = 0; i < ndim; i++)
            msgpack_pack_uint64(pk, shape[i]);
        break;
    }
    case RLB__FK_STRUCT:
        pack_map(pk, f->sub, v, 0);
        break;
    case RLB__FK_PSTRUCT:
        pack_map(pk, f->sub, rlb__field_pointer(s, f), 0);
        break;
    case RLB__FK_ARRAY: {
        uint32_t n = rlb__field_count(s, f);
        const char *elems = rlb__field_pointer(s, f);
        msgpack_pack_array(pk, n);
        for (uint32_t i = 0; i < n; i++)
            pack_map(pk, f->sub, elems + (size_t)i * f->sub->size, 0);
        break;
    }
    }
}

/* Packs the struct at s as a map of its present fields; a whole message (type != 0)
 * starts with its "ty" entry. */
static void pack_map(msgpack_packer *pk, const rlb__struct_desc *desc, const void *s,
                     uint32_t type)
{
    size_t n = type != 0;
    for (unsigned i = 0; i < desc->n_fields; i++)
        n += field_present(&desc->fields[i], s);
    msgpack_pack_map(pk, n);
    if (type) {
        pack_str(pk, "ty", 2);
        msgpack_pack_uint32(pk, type);
    }
    for (unsigned i = 0; i < desc->n_fields; i++) {
        const rlb__field *f = &desc->fields[i];
        if (!field_present(f, s))
            continue;
        pack_str(pk, f->key, strlen(f->key));
        pack_value(pk, f, s);
    }
}

/* Validates msg and runs it through w. Returns 0, RLB_EINVAL or RLB_ETOOBIG. */
static int pack_msg(const rlb_msg *msg, writer *w)
{
    char text[256];
    rlb__proto_err err = {.buf = text, .cap = sizeof text, .code = RLB_EINVAL};
    const rlb__struct_desc *desc = rlb__msg_schema(msg->type);
    if (!desc) {
        RLB_LOG_DEBUG(RLB_SUB_PROTO, "cannot pack: unknown message type %u", (unsigned)msg->type);
        return RLB_EINVAL;
    }
    const void *body = rlb__msg_body(msg);
    rlb__proto_push(&err, desc->name);
    if (rlb__proto_validate(desc, body, &err) < 0) {
        RLB_LOG_DEBUG(RLB_SUB_PROTO, "cannot pack: %s", text);
        return RLB_EINVAL;
    }
    msgpack_packer pk;
    msgpack_packer_init(&pk, w, writer_write);
    pack_map(&pk, desc, body, (uint32_t)msg->type);
    return w->overflow ? RLB_ETOOBIG : 0;
}

int rlb__msg_packed_size(const rlb_msg *msg, size_t *size)
{
    writer w = {.ptr = NULL, .cap = SIZE_MAX};
    int rc = pack_msg(msg, &w);
    if (rc == 0)
        *size = w.len;
    return rc;
}

int rlb__msg_pack(const rlb_msg *msg, void *buf, size_t cap, size_t *len)
{
    writer w = {.ptr = buf, .cap = cap};
    int rc = pack_msg(msg, &w);
    if (rc == 0)
        *len = w.len;
    return rc;
}
