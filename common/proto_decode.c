/* proto_decode.c: turns untrusted bytes into a message (proto.h), or into an error text
 * that names what is wrong.
 *
 * msgpack-c's unpacker trusts declared counts (`dd ff 00 00 00` makes it allocate room for
 * four billion objects), so decoding never hands it the input. Instead a small bounded
 * reader walks the bytes twice:
 *   1. validate: the buffer is exactly one msgpack object; every declared count fits in
 *      the bytes that remain (each element takes at least one byte, each map pair two),
 *      nesting is at most RLB_PROTO_MAX_DEPTH and objects at most RLB_PROTO_MAX_OBJECTS;
 *   2. decode: the message's schema (proto.c) drives typed reads straight from the bytes,
 *      with no msgpack object tree: strings are copied (NUL-terminated) into the message's
 *      arena, bins are pointers into the buffer, arrays of structs are allocated in the
 *      arena. The arena may take at most RLB_PROTO_ARENA_FACTOR bytes per message byte
 *      (honest messages need a few: no struct is more than 8 times the size of its
 *      smallest valid encoding), so a count that passes step 1 but cannot be honest, like
 *      4000 empty maps for 4000 tensors of 200 bytes each, fails before memory is taken.
 * Then the same validation as before packing checks ranges and consistency.
 */
#include "common/proto.h"

#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>

#include <msgpack.h>

#include "common/check.h"

/* What a msgpack object header says. Signed formats holding values >= 0 read as UINT. */
typedef enum mtype { MT_NIL, MT_BOOL, MT_UINT, MT_NINT, MT_FLOAT, MT_STR, MT_BIN, MT_EXT,
                     MT_ARRAY, MT_MAP } mtype;

typedef struct mobj {
    mtype type;
    bool b;              /* BOOL */
    uint64_t u;          /* UINT */
    int64_t i;           /* NINT: a negative value */
    double d;            /* FLOAT (float32 widened) */
    uint32_t n;          /* STR, BIN, EXT: payload bytes; ARRAY: elements; MAP: pairs */
    const uint8_t *data; /* STR, BIN, EXT: the payload, inside the buffer */
} mobj;

typedef struct reader {
    const uint8_t *p; /* the message */
    size_t len;       /* its length */
    size_t pos;       /* next byte to read */
    char why[96];     /* what made a read fail */
} reader;

static const char *mtype_name(mtype t)
{
    static const char *const names[] = {"nil", "bool", "int", "negative int", "float",
                                        "str", "bin", "ext", "array", "map"};
    return names[t];
}

static int take(reader *r, size_t n, const uint8_t **out)
{
    if (n > r->len - r->pos) {
        snprintf(r->why, sizeof r->why, "%zu bytes needed, %zu left", n, r->len - r->pos);
        return -1;
    }
    *out = r->p + r->pos;
    r->pos += n;
    return 0;
}

/* Big-endian unsigned integer of `width` bytes at the cursor. */
static int take_be(reader *r, size_t width, uint64_t *v)
{
    const uint8_t *b;
    if (take(r, width, &b) < 0)
        return -1;
    *v = 0;
    for (size_t i = 0; i < width; i++)
        *v = *v << 8 | b[i];
    return 0;
}

/* A str/bin/ext payload of n bytes (ext: plus its type byte). */
static int payload(reader *r, mobj *o, mtype type, uint64_t n)
{
    o->type = type;
    o->n = (uint32_t)n; /* widths of at most 4 bytes */
    if (n > r->len - r->pos) {
        snprintf(r->why, sizeof r->why, "%s of %" PRIu64 " bytes, %zu left", mtype_name(type),
                 n, r->len - r->pos);
        return -1;
    }
    return take(r, (size_t)n + (type == MT_EXT), &o->data);
}

/* An array or map header: its elements must be able to fit in what is left. */
static int container(reader *r, mobj *o, mtype type, uint64_t n)
{
    o->type = type;
    o->n = (uint32_t)n;
    uint64_t need = type == MT_MAP ? 2 * n : n;
    if (need > r->len - r->pos) {
        snprintf(r->why, sizeof r->why, "%s of %" PRIu64 " %s, %zu bytes left",
                 mtype_name(type), n, type == MT_MAP ? "pairs" : "elements", r->len - r->pos);
        return -1;
    }
    return 0;
}

static int signed_int(reader *r, mobj *o, size_t width)
{
    uint64_t raw;
    if (take_be(r, width, &raw) < 0)
        return -1;
    unsigned shift = 64 - 8 * (unsigned)width; /* sign-extend the two's complement value */
    int64_t v = (int64_t)(raw << shift) >> shift;
    if (v >= 0) {
        o->type = MT_UINT;
        o->u = (uint64_t)v;
    } else {
        o->type = MT_NINT;
        o->i = v;
    }
    return 0;
}

static int float_value(reader *r, mobj *o, size_t width)
{
    uint64_t raw;
    if (take_be(r, width, &raw) < 0)
        return -1;
    o->type = MT_FLOAT;
    if (width == 4) {
        uint32_t bits = (uint32_t)raw;
        float f;
        memcpy(&f, &bits, sizeof f);
        o->d = f;
    } else {
        memcpy(&o->d, &raw, sizeof o->d);
    }
    return 0;
}

/* Reads one object's header, and the payload of a str, bin or ext, advancing past them;
 * elements of arrays and maps stay unread. Returns 0 or -1 (r->why says why). */
static int read_head(reader *r, mobj *o)
{
    const uint8_t *b;
    uint64_t n;
    memset(o, 0, sizeof *o);
    if (take(r, 1, &b) < 0)
        return -1;
    uint8_t c = b[0];
    if (c <= 0x7f) {
        o->type = MT_UINT;
        o->u = c;
        return 0;
    }
    if (c >= 0xe0) {
        o->type = MT_NINT;
        o->i = (int8_t)c;
        return 0;
    }
    if (c <= 0x8f)
        return container(r, o, MT_MAP, c & 0x0fu);
    if (c <= 0x9f)
        return container(r, o, MT_ARRAY, c & 0x0fu);
    if (c <= 0xbf)
        return payload(r, o, MT_STR, c & 0x1fu);
    switch (c) {
    case 0xc0:
        o->type = MT_NIL;
        return 0;
    case 0xc2:
    case 0xc3:
        o->type = MT_BOOL;
        o->b = c == 0xc3;
        return 0;
    case 0xc4: case 0xc5: case 0xc6: /* bin 8/16/32 */
        return take_be(r, 1u << (c - 0xc4), &n) < 0 ? -1 : payload(r, o, MT_BIN, n);
    case 0xc7: case 0xc8: case 0xc9: /* ext 8/16/32 */
        return take_be(r, 1u << (c - 0xc7), &n) < 0 ? -1 : payload(r, o, MT_EXT, n);
    case 0xca:
        return float_value(r, o, 4);
    case 0xcb:
        return float_value(r, o, 8);
    case 0xcc: case 0xcd: case 0xce: case 0xcf: /* uint 8/16/32/64 */
        o->type = MT_UINT;
        return take_be(r, 1u << (c - 0xcc), &o->u);
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: /* int 8/16/32/64 */
        return signed_int(r, o, 1u << (c - 0xd0));
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: /* fixext 1/2/4/8/16 */
        return payload(r, o, MT_EXT, 1u << (c - 0xd4));
    case 0xd9: case 0xda: case 0xdb: /* str 8/16/32 */
        return take_be(r, 1u << (c - 0xd9), &n) < 0 ? -1 : payload(r, o, MT_STR, n);
    case 0xdc: case 0xdd: /* array 16/32 */
        return take_be(r, 2u << (c - 0xdc), &n) < 0 ? -1 : container(r, o, MT_ARRAY, n);
    case 0xde: case 0xdf: /* map 16/32 */
        return take_be(r, 2u << (c - 0xde), &n) < 0 ? -1 : container(r, o, MT_MAP, n);
    default:
        snprintf(r->why, sizeof r->why, "byte 0x%02x is not a msgpack type", c);
        return -1;
    }
}

/* Skips one whole object inside a container at nesting level `depth` (0 = top), counting
 * objects in *objects. Returns 0 or -1 (r->why says why). */
static int skip_object(reader *r, unsigned depth, size_t *objects)
{
    mobj o;
    if (++*objects > RLB_PROTO_MAX_OBJECTS) {
        snprintf(r->why, sizeof r->why, "more than %u objects", RLB_PROTO_MAX_OBJECTS);
        return -1;
    }
    if (read_head(r, &o) < 0)
        return -1;
    if (o.type != MT_ARRAY && o.type != MT_MAP)
        return 0;
    if (depth + 1 > RLB_PROTO_MAX_DEPTH) {
        snprintf(r->why, sizeof r->why, "nested deeper than %d", RLB_PROTO_MAX_DEPTH);
        return -1;
    }
    uint64_t items = o.type == MT_MAP ? 2ull * o.n : o.n;
    for (uint64_t i = 0; i < items; i++)
        if (skip_object(r, depth + 1, objects) < 0)
            return -1;
    return 0;
}

/* Looks for `key` among the top-level map's keys, without trusting the bytes. Returns the
 * number of times it appears before the end or the first unreadable byte (the first
 * value's header in *val), or -1 when the bytes do not start a map. */
static int scan_top(const void *buf, size_t len, const char *key, mobj *val)
{
    reader r = {.p = buf, .len = buf ? len : 0};
    mobj map, k, v;
    size_t objects = 0, klen = strlen(key);
    int found = 0;
    if (read_head(&r, &map) < 0 || map.type != MT_MAP)
        return -1;
    for (uint32_t i = 0; i < map.n; i++) {
        reader at = r;
        if (skip_object(&r, 1, &objects) < 0 || read_head(&at, &k) < 0)
            break;
        bool match = k.type == MT_STR && k.n == klen && memcmp(k.data, key, klen) == 0;
        at = r;
        if (match && read_head(&at, &v) == 0 && found++ == 0)
            *val = v;
        if (skip_object(&r, 1, &objects) < 0)
            break;
    }
    return found;
}

/* ---- decoding against the schema --------------------------------------------------------- */

typedef struct decoder {
    reader r;            /* over the validated message */
    rlb__proto_err *err; /* error text and field path */
    msgpack_zone *zone;  /* the message's arena, created on the first allocation */
    size_t budget;       /* arena bytes this message may still take */
} decoder;

/* Stores n zeroed elements of `size` bytes from the arena in *out. Returns 0, RLB_EPROTO
 * (over the message's budget: f's count cannot be honest) or RLB_ENOMEM. */
static int arena_alloc(decoder *d, const rlb__field *f, size_t n, size_t size, void *out)
{
    size_t bytes;
    void *p;
    if (__builtin_mul_overflow(n, size, &bytes) || bytes > d->budget)
        return rlb__proto_fail(d->err, f->key, "%zu elements would take more memory than a "
                               "message of %zu bytes may use", n, d->r.len);
    d->budget -= bytes;
    if (!d->zone && !(d->zone = msgpack_zone_new(MSGPACK_ZONE_CHUNK_SIZE)))
        goto nomem;
    if (!(p = msgpack_zone_malloc(d->zone, bytes ? bytes : 1)))
        goto nomem;
    memset(p, 0, bytes);
    memcpy(out, &p, sizeof p);
    return 0;
nomem:
    rlb__proto_fail(d->err, f->key, "out of memory");
    return RLB_ENOMEM;
}

static const char *kind_wants(rlb__fkind kind)
{
    switch (kind) {
    case RLB__FK_U64: case RLB__FK_U32: case RLB__FK_ENUM: return "a non-negative int";
    case RLB__FK_I32: return "an int";
    case RLB__FK_BOOL: return "a bool";
    case RLB__FK_F32: case RLB__FK_F64: return "a number";
    case RLB__FK_STR: return "a str";
    case RLB__FK_BIN: case RLB__FK_BYTES: return "a bin";
    case RLB__FK_DIMS: return "an array of non-negative ints";
    case RLB__FK_STRUCT: case RLB__FK_PSTRUCT: return "a map";
    case RLB__FK_ARRAY: return "an array of maps";
    }
    return "?";
}

static int wrong_type(decoder *d, const rlb__field *f, const mobj *o)
{
    return rlb__proto_fail(d->err, f ? f->key : NULL, "expected %s, got %s",
                           f ? kind_wants(f->kind) : "a map", mtype_name(o->type));
}

static int decode_struct(decoder *d, const rlb__struct_desc *desc, void *out);

static int decode_array(decoder *d, const rlb__field *f, void *out)
{
    mobj o;
    read_head(&d->r, &o); /* validated: cannot fail */
    if (o.type != MT_ARRAY)
        return wrong_type(d, f, &o);
    char *elems = NULL;
    int rc = o.n ? arena_alloc(d, f, o.n, f->sub->size, &elems) : 0;
    if (rc < 0)
        return rc;
    size_t old = rlb__proto_push(d->err, f->key), base = d->err->path_len;
    for (uint32_t i = 0; i < o.n && rc == 0; i++) {
        rlb__proto_push_index(d->err, i);
        rc = decode_struct(d, f->sub, elems + (size_t)i * f->sub->size);
        rlb__proto_pop(d->err, base);
    }
    rlb__proto_pop(d->err, old);
    memcpy((char *)out + f->off, &elems, sizeof elems);
    memcpy((char *)out + f->count_off, &o.n, sizeof o.n);
    return rc;
}

static int decode_sub(decoder *d, const rlb__field *f, void *out)
{
    void *sub = (char *)out + f->off;
    if (f->kind == RLB__FK_PSTRUCT) {
        int rc = arena_alloc(d, f, 1, f->sub->size, &sub);
        if (rc < 0)
            return rc;
        memcpy((char *)out + f->off, &sub, sizeof sub);
    }
    size_t old = rlb__proto_push(d->err, f->key);
    int rc = decode_struct(d, f->sub, sub);
    rlb__proto_pop(d->err, old);
    return rc;
}

static int decode_dims(decoder *d, const rlb__field *f, const mobj *o, void *out)
{
    if (o->type != MT_ARRAY)
        return wrong_type(d, f, o);
    if (o->n > RLB_PROTO_MAX_DIMS)
        return rlb__proto_fail(d->err, f->key, "%" PRIu32 " dimensions, at most %d", o->n,
                               RLB_PROTO_MAX_DIMS);
    uint64_t shape[RLB_PROTO_MAX_DIMS];
    for (uint32_t i = 0; i < o->n; i++) {
        mobj dim;
        read_head(&d->r, &dim); /* validated: cannot fail */
        if (dim.type != MT_UINT) {
            rlb__proto_push(d->err, f->key);
            rlb__proto_push_index(d->err, i);
            return rlb__proto_fail(d->err, NULL, "expected a non-negative int, got %s",
                                   mtype_name(dim.type));
        }
        shape[i] = dim.u;
    }
    memcpy((char *)out + f->off, shape, o->n * sizeof shape[0]);
    memcpy((char *)out + f->count_off, &o->n, sizeof o->n);
    return 0;
}

static int decode_str(decoder *d, const rlb__field *f, const mobj *o, void *out)
{
    if (o->type != MT_STR)
        return wrong_type(d, f, o);
    if (memchr(o->data, '\0', o->n))
        return rlb__proto_fail(d->err, f->key, "contains a NUL byte");
    char *s;
    int rc = arena_alloc(d, f, (size_t)o->n + 1, 1, &s);
    if (rc < 0)
        return rc;
    memcpy(s, o->data, o->n);
    memcpy((char *)out + f->off, &s, sizeof s);
    return 0;
}

static int decode_bin(decoder *d, const rlb__field *f, const mobj *o, void *out)
{
    if (o->type != MT_BIN)
        return wrong_type(d, f, o);
    if (f->kind == RLB__FK_BYTES) {
        if (o->n != f->size)
            return rlb__proto_fail(d->err, f->key, "%" PRIu32 " bytes, must be %" PRIu32,
                                   o->n, f->size);
        memcpy((char *)out + f->off, o->data, o->n);
        return 0;
    }
    if (o->n % f->size != 0)
        return rlb__proto_fail(d->err, f->key, "%" PRIu32 " bytes, not a multiple of %" PRIu32,
                               o->n, f->size);
    uint32_t count = o->n / f->size;
    const void *p = count ? o->data : NULL; /* borrowed from the buffer */
    memcpy((char *)out + f->off, &p, sizeof p);
    memcpy((char *)out + f->count_off, &count, sizeof count);
    return 0;
}

/* A number of any msgpack numeric type as a double; -1 for other types. */
static int as_double(const mobj *o, double *v)
{
    switch (o->type) {
    case MT_FLOAT: *v = o->d; return 0;
    case MT_UINT: *v = (double)o->u; return 0;
    case MT_NINT: *v = (double)o->i; return 0;
    default: return -1;
    }
}

static int decode_scalar(decoder *d, const rlb__field *f, const mobj *o, void *out)
{
    void *v = (char *)out + f->off;
    double x;
    switch (f->kind) {
    case RLB__FK_U64:
        if (o->type != MT_UINT)
            return wrong_type(d, f, o);
        memcpy(v, &o->u, sizeof o->u);
        return 0;
    case RLB__FK_U32:
    case RLB__FK_ENUM: {
        if (o->type != MT_UINT)
            return wrong_type(d, f, o);
        uint32_t limit = f->kind == RLB__FK_ENUM ? f->size - 1 : UINT32_MAX;
        if (o->u > limit)
            return rlb__proto_fail(d->err, f->key, "%" PRIu64 " is above %" PRIu32, o->u, limit);
        uint32_t u = (uint32_t)o->u; /* ENUM fields are int-sized (proto.c asserts) */
        memcpy(v, &u, sizeof u);
        return 0;
    }
    case RLB__FK_I32: {
        if (o->type != MT_UINT && o->type != MT_NINT)
            return wrong_type(d, f, o);
        if (o->type == MT_UINT ? o->u > INT32_MAX : o->i < INT32_MIN)
            return rlb__proto_fail(d->err, f->key, "out of the int32 range");
        int32_t i32 = (int32_t)(o->type == MT_UINT ? (int64_t)o->u : o->i);
        memcpy(v, &i32, sizeof i32);
        return 0;
    }
    case RLB__FK_BOOL:
        if (o->type != MT_BOOL)
            return wrong_type(d, f, o);
        memcpy(v, &o->b, sizeof o->b);
        return 0;
    case RLB__FK_F32: {
        if (as_double(o, &x) < 0)
            return wrong_type(d, f, o);
        if (isfinite(x) && fabs(x) > FLT_MAX) /* converting it to float is undefined */
            return rlb__proto_fail(d->err, f->key, "%g is out of the f32 range", x);
        float f32 = (float)x; /* infinities and NaN convert; validation refuses them */
        memcpy(v, &f32, sizeof f32);
        return 0;
    }
    case RLB__FK_F64:
        if (as_double(o, &x) < 0)
            return wrong_type(d, f, o);
        memcpy(v, &x, sizeof x);
        return 0;
    default:
        return wrong_type(d, f, o);
    }
}

static int decode_field(decoder *d, const rlb__field *f, void *out)
{
    mobj o;
    switch (f->kind) {
    case RLB__FK_STRUCT:
    case RLB__FK_PSTRUCT:
        return decode_sub(d, f, out);
    case RLB__FK_ARRAY:
        return decode_array(d, f, out);
    default:
        break;
    }
    read_head(&d->r, &o); /* validated: cannot fail */
    switch (f->kind) {
    case RLB__FK_DIMS: return decode_dims(d, f, &o, out);
    case RLB__FK_STR: return decode_str(d, f, &o, out);
    case RLB__FK_BIN: case RLB__FK_BYTES: return decode_bin(d, f, &o, out);
    default: return decode_scalar(d, f, &o, out);
    }
}

static const rlb__field *find_field(const rlb__struct_desc *desc, const mobj *key)
{
    for (unsigned i = 0; i < desc->n_fields; i++) {
        const char *k = desc->fields[i].key;
        if (strlen(k) == key->n && memcmp(k, key->data, key->n) == 0)
            return &desc->fields[i];
    }
    return NULL;
}

/* Decodes the map at the cursor into the zeroed struct `out` of desc. */
static int decode_struct(decoder *d, const rlb__struct_desc *desc, void *out)
{
    mobj map, key;
    size_t objects = 0;
    uint64_t seen = 0;
    read_head(&d->r, &map); /* validated: cannot fail */
    if (map.type != MT_MAP)
        return wrong_type(d, NULL, &map);
    for (uint32_t i = 0; i < map.n; i++) {
        read_head(&d->r, &key);
        if (key.type != MT_STR)
            return rlb__proto_fail(d->err, NULL, "keys are str, got %s", mtype_name(key.type));
        const rlb__field *f = find_field(desc, &key);
        if (!f) { /* unknown keys are ignored, so fields can be added */
            skip_object(&d->r, 0, &objects); /* validated: cannot fail */
            continue;
        }
        uint64_t bit = 1ull << (f - desc->fields);
        if (seen & bit)
            return rlb__proto_fail(d->err, f->key, "appears twice");
        seen |= bit;
        if (!f->required && d->r.p[d->r.pos] == 0xc0) { /* nil: absent */
            d->r.pos++;
            continue;
        }
        int rc = decode_field(d, f, out);
        if (rc < 0)
            return rc;
    }
    for (unsigned i = 0; i < desc->n_fields; i++)
        if (desc->fields[i].required && !(seen & (1ull << i)))
            return rlb__proto_fail(d->err, desc->fields[i].key, "missing");
    return 0;
}

/* The message type of a validated buffer, or an error naming the problem. */
static int find_type(const void *buf, size_t len, uint32_t *type, rlb__proto_err *err)
{
    mobj ty;
    int found = scan_top(buf, len, "ty", &ty);
    if (found < 0)
        return rlb__proto_fail(err, NULL, "a message is a map");
    if (found == 0)
        return rlb__proto_fail(err, "ty", "missing (the message type)");
    if (found > 1)
        return rlb__proto_fail(err, "ty", "appears twice");
    if (ty.type != MT_UINT)
        return rlb__proto_fail(err, "ty", "expected a non-negative int, got %s",
                               mtype_name(ty.type));
    if (!rlb__msg_schema(ty.u > UINT32_MAX ? 0 : (uint32_t)ty.u))
        return rlb__proto_fail(err, "ty", "unknown message type %" PRIu64, ty.u);
    *type = (uint32_t)ty.u;
    return 0;
}

int rlb__msg_decode(const void *buf, size_t len, rlb_msg *msg, char *err, size_t err_cap)
{
    rlb__proto_err e = {.buf = err, .cap = err_cap, .code = RLB_EPROTO};
    decoder d = {.r = {.p = buf, .len = buf ? len : 0}, .err = &e};
    d.budget = d.r.len > (SIZE_MAX - RLB_PROTO_ARENA_SLACK) / RLB_PROTO_ARENA_FACTOR
                   ? SIZE_MAX
                   : d.r.len * RLB_PROTO_ARENA_FACTOR + RLB_PROTO_ARENA_SLACK;
    size_t objects = 0;
    uint32_t type = 0;
    int rc;
    memset(msg, 0, sizeof *msg);
    if (err && err_cap)
        err[0] = '\0';
    if (d.r.len == 0)
        return rlb__proto_fail(&e, NULL, "empty message");
    if (skip_object(&d.r, 0, &objects) < 0)
        return rlb__proto_fail(&e, NULL, "malformed msgpack at byte %zu: %s", d.r.pos, d.r.why);
    if (d.r.pos != len)
        return rlb__proto_fail(&e, NULL, "%zu bytes after the message", len - d.r.pos);
    RLB_CHECK_GOTO(find_type(buf, len, &type, &e), rc, err);
    const rlb__struct_desc *desc = rlb__msg_schema(type);
    rlb__proto_push(&e, desc->name);
    d.r.pos = 0;
    RLB_CHECK_GOTO(decode_struct(&d, desc, rlb__msg_body(msg)), rc, err);
    RLB_CHECK_GOTO(rlb__proto_validate(desc, rlb__msg_body(msg), &e), rc, err);
    msg->type = (rlb_msg_type)type;
    msg->arena = d.zone;
    return 0;
err:
    if (d.zone)
        msgpack_zone_free(d.zone);
    memset(msg, 0, sizeof *msg);
    return rc;
}

void rlb__msg_error_reply(const void *buf, size_t len, int code, const char *text,
                          rlb_msg *reply)
{
    mobj v;
    memset(reply, 0, sizeof *reply);
    reply->type = RLB_MSG_ERROR;
    reply->error.code = code < 0 ? code : RLB_EPROTO;
    reply->error.text = text && text[0] ? text : rlb_strerror(reply->error.code);
    if (scan_top(buf, len, "id", &v) >= 1 && v.type == MT_UINT)
        reply->error.request_id = v.u;
    if (scan_top(buf, len, "ty", &v) >= 1 && v.type == MT_UINT && v.u <= UINT32_MAX &&
        rlb__msg_schema((uint32_t)v.u))
        reply->error.in_reply_to = (uint32_t)v.u;
}
