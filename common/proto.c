/* proto.c: the message schema (one table of fields per struct of proto.h), the checks
 * that go beyond a field's kind (ranges, FSDP shard sizes, consistency between fields) and
 * the validator that applies both to a C struct.
 *
 * The same tables drive the packer (proto_pack.c) and the decoder (proto_decode.c), and
 * the same validation runs before packing and after decoding, so a peer can neither send
 * nor accept a message the other side would refuse. Error texts name the field by its
 * path of wire keys: "generate.p[3].sp.topp: must be in (0, 1], got 1.5".
 */
#include "common/proto.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#include <msgpack.h>

_Static_assert(sizeof(rlb_role) == sizeof(int) && sizeof(rlb_dtype) == sizeof(int) &&
                   sizeof(rlb_device) == sizeof(int) && sizeof(rlb_layout_kind) == sizeof(int) &&
                   sizeof(rlb_mem_kind) == sizeof(int) && sizeof(rlb_msg_finish) == sizeof(int),
               "RLB__FK_ENUM fields are read and written as int");

#define N_OF(a) (unsigned)(sizeof(a) / sizeof((a)[0]))
#define OPT false
#define REQ true

/* Field initializers: T is the struct, m the member, cnt the member holding its count. */
#define FLD(T, m, key_, kind_, req_)                                                        \
    { .key = key_, .kind = kind_, .required = req_, .off = offsetof(T, m) }
#define FLD_ENUM(T, m, key_, n_values, req_)                                                \
    { .key = key_, .kind = RLB__FK_ENUM, .required = req_, .off = offsetof(T, m),           \
      .size = n_values }
#define FLD_BIN4(T, m, cnt, key_, req_)                                                     \
    { .key = key_, .kind = RLB__FK_BIN, .required = req_, .off = offsetof(T, m),            \
      .count_off = offsetof(T, cnt), .size = 4 }
#define FLD_BYTES(T, m, key_)                                                               \
    { .key = key_, .kind = RLB__FK_BYTES, .required = OPT, .off = offsetof(T, m),           \
      .size = sizeof(((T *)0)->m) }
#define FLD_DIMS(T, m, nd, key_, req_)                                                      \
    { .key = key_, .kind = RLB__FK_DIMS, .required = req_, .off = offsetof(T, m),           \
      .count_off = offsetof(T, nd) }
#define FLD_STRUCT(T, m, key_, desc)                                                        \
    { .key = key_, .kind = RLB__FK_STRUCT, .required = REQ, .off = offsetof(T, m),          \
      .sub = &desc }
#define FLD_PSTRUCT(T, m, key_, desc)                                                       \
    { .key = key_, .kind = RLB__FK_PSTRUCT, .required = OPT, .off = offsetof(T, m),         \
      .sub = &desc }
#define FLD_ARRAY(T, m, cnt, key_, desc, req_)                                              \
    { .key = key_, .kind = RLB__FK_ARRAY, .required = req_, .off = offsetof(T, m),          \
      .count_off = offsetof(T, cnt), .sub = &desc }
#define DESC(name_, T, fields_, check_)                                                     \
    { .name = name_, .size = sizeof(T), .fields = fields_, .n_fields = N_OF(fields_),       \
      .check = check_ }

/* ---- errors and paths ---------------------------------------------------------------- */

size_t rlb__proto_push(rlb__proto_err *err, const char *key)
{
    size_t old = err->path_len;
    int n = snprintf(err->path + old, sizeof err->path - old, "%s%s", old ? "." : "", key);
    if (n > 0)
        err->path_len = old + (size_t)n < sizeof err->path ? old + (size_t)n
                                                            : sizeof err->path - 1;
    return old;
}

size_t rlb__proto_push_index(rlb__proto_err *err, size_t index)
{
    size_t old = err->path_len;
    int n = snprintf(err->path + old, sizeof err->path - old, "[%zu]", index);
    if (n > 0)
        err->path_len = old + (size_t)n < sizeof err->path ? old + (size_t)n
                                                            : sizeof err->path - 1;
    return old;
}

void rlb__proto_pop(rlb__proto_err *err, size_t len)
{
    err->path_len = len;
    err->path[len] = '\0';
}

int rlb__proto_fail(rlb__proto_err *err, const char *field, const char *fmt, ...)
{
    if (!err->buf || err->cap == 0)
        return err->code;
    int n = snprintf(err->buf, err->cap, "%s%s%s%s", err->path,
                     err->path_len && field ? "." : "", field ? field : "",
                     err->path_len || field ? ": " : "");
    if (n >= 0 && (size_t)n < err->cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->buf + n, err->cap - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return err->code;
}

int rlb__proto_numel(const uint64_t *shape, uint32_t ndim, uint64_t *numel)
{
    uint64_t n = 1;
    for (uint32_t i = 0; i < ndim; i++)
        if (__builtin_mul_overflow(n, shape[i], &n))
            return -1;
    *numel = n;
    return 0;
}

static bool all_zero(const uint8_t *bytes, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (bytes[i])
            return false;
    return true;
}

/* ---- checks beyond the field kinds ----------------------------------------------------- */

static int check_hello(const void *p, rlb__proto_err *e)
{
    const rlb_msg_hello *h = p;
    if (h->abi_version == 0)
        return rlb__proto_fail(e, "abi", "must be >= 1");
    if (h->role != RLB_ROLE_TOOL && h->rank >= h->world)
        return rlb__proto_fail(e, "rank", "%" PRIu32 " is not below world %" PRIu32,
                               h->rank, h->world);
    if (h->role == RLB_ROLE_WORKER && h->tp_rank >= h->tp_size)
        return rlb__proto_fail(e, "tp", "%" PRIu32 " is not below tp size %" PRIu32,
                               h->tp_rank, h->tp_size);
    return 0;
}

static int check_welcome(const void *p, rlb__proto_err *e)
{
    const rlb_msg_welcome *w = p;
    return w->abi_version == 0 ? rlb__proto_fail(e, "abi", "must be >= 1") : 0;
}

static int check_error(const void *p, rlb__proto_err *e)
{
    const rlb_msg_error *m = p;
    return m->code >= 0 ? rlb__proto_fail(e, "code", "%" PRId32 " is not an error code", m->code)
                        : 0;
}

static int check_flat_entry(const void *p, rlb__proto_err *e)
{
    const rlb_msg_flat_entry *x = p;
    if (x->padding) {
        if (x->name || x->ndim)
            return rlb__proto_fail(e, "name", "a padding entry has no name or shape");
        if (x->numel == 0)
            return rlb__proto_fail(e, "numel", "a padding entry covers at least 1 element");
        return 0;
    }
    if (!x->name || !x->name[0])
        return rlb__proto_fail(e, "name", "missing for a parameter entry");
    uint64_t numel = 0;
    rlb__proto_numel(x->shape, x->ndim, &numel); /* the DIMS check ruled out overflow */
    if (numel != x->numel)
        return rlb__proto_fail(e, "numel", "%" PRIu64 " does not match the shape's %" PRIu64,
                               x->numel, numel);
    return 0;
}

/* Elements in an FSDP1 FlatParameter's entries; -1 when the sum overflows. */
static int flat_total(const rlb_msg_layout *l, uint64_t *total)
{
    uint64_t sum = 0;
    for (uint32_t i = 0; i < l->n_entries; i++)
        if (__builtin_add_overflow(sum, l->entries[i].numel, &sum))
            return -1;
    *total = sum;
    return 0;
}

static int check_layout(const void *p, rlb__proto_err *e)
{
    const rlb_msg_layout *l = p;
    if (l->kind == RLB_LAYOUT_FULL)
        return l->n_entries ? rlb__proto_fail(e, "ent", "only FSDP1 layouts have entries") : 0;
    if (l->rank >= l->world)
        return rlb__proto_fail(e, "rank", "%" PRIu32 " is not below world %" PRIu32, l->rank,
                               l->world);
    if (l->kind == RLB_LAYOUT_FSDP2)
        return l->n_entries ? rlb__proto_fail(e, "ent", "only FSDP1 layouts have entries") : 0;
    if (l->n_entries == 0)
        return rlb__proto_fail(e, "ent", "an FSDP1 unit needs at least one entry");
    uint64_t start = 0;
    for (uint32_t i = 0; i < l->n_entries; i++) {
        const rlb_msg_flat_entry *x = &l->entries[i];
        if (!x->padding && l->align > 1 && start % l->align != 0) {
            size_t old = rlb__proto_push(e, "ent");
            rlb__proto_push_index(e, i);
            int rc = rlb__proto_fail(e, NULL, "starts at element %" PRIu64
                                     ", not a multiple of align %" PRIu32, start, l->align);
            rlb__proto_pop(e, old);
            return rc;
        }
        if (__builtin_add_overflow(start, x->numel, &start))
            return rlb__proto_fail(e, "ent", "entries overflow 64 bits of elements");
    }
    return 0;
}

static int check_mem_ref(const void *p, rlb__proto_err *e)
{
    const rlb_mem_ref *m = p;
    bool no_handle = all_zero(m->ipc_handle, sizeof m->ipc_handle);
    bool no_uuid = all_zero(m->device_uuid, sizeof m->device_uuid);
    if (m->kind == RLB_MEM_CUDA_IPC && no_handle)
        return rlb__proto_fail(e, "h", "CUDA_IPC memory needs its IPC handle");
    if (m->kind != RLB_MEM_CUDA_IPC && !no_handle)
        return rlb__proto_fail(e, "h", "only CUDA_IPC memory has an IPC handle");
    if (m->kind == RLB_MEM_HOST_SHM && !no_uuid)
        return rlb__proto_fail(e, "uuid", "host memory has no device uuid");
    if (m->kind != RLB_MEM_HOST_SHM && no_uuid)
        return rlb__proto_fail(e, "uuid", "CUDA memory needs its device uuid");
    uint64_t end;
    if (__builtin_add_overflow(m->offset, m->length, &end))
        return rlb__proto_fail(e, "len", "offset + length overflows 64 bits");
    return 0;
}

/* Elements this rank holds of a tensor, from the layout rules of DESIGN §4. The shape
 * passed the DIMS check (no overflow) and the layout passed check_layout. */
static int shard_elems(const rlb_msg_tensor *t, uint64_t numel, uint64_t *elems,
                       rlb__proto_err *e)
{
    const rlb_msg_layout *l = &t->layout;
    if (l->kind == RLB_LAYOUT_FULL) {
        *elems = numel;
        return 0;
    }
    if (t->ndim == 0)
        return rlb__proto_fail(e, "shape", "a sharded tensor has at least one dimension");
    uint64_t d0 = t->shape[0];
    if (l->kind == RLB_LAYOUT_FSDP2) {
        /* c = ceil(d0/W); rank f holds rows [f*c, f*c + n_f), n_f = max(0, min(c, d0-f*c)). */
        uint64_t c = d0 / l->world + (d0 % l->world != 0);
        uint64_t first = (uint64_t)l->rank * c; /* <= d0 + W - 1: no overflow */
        uint64_t rows = first >= d0 ? 0 : (d0 - first < c ? d0 - first : c);
        *elems = d0 ? rows * (numel / d0) : 0;
        return 0;
    }
    uint64_t total = 0;
    if (t->ndim != 1)
        return rlb__proto_fail(e, "shape", "an FSDP1 FlatParameter is 1-D, got %" PRIu32
                               " dimensions", t->ndim);
    if (flat_total(l, &total) < 0 || total != d0)
        return rlb__proto_fail(e, "shape", "%" PRIu64 " elements, but the entries cover "
                               "%" PRIu64, d0, total);
    if (d0 % l->world != 0)
        return rlb__proto_fail(e, "shape", "%" PRIu64 " elements do not split in %" PRIu32
                               " equal chunks", d0, l->world);
    *elems = d0 / l->world;
    return 0;
}

static int check_tensor(const void *p, rlb__proto_err *e)
{
    const rlb_msg_tensor *t = p;
    uint64_t numel = 0, elems = 0, bytes, total;
    rlb__proto_numel(t->shape, t->ndim, &numel); /* the DIMS check ruled out overflow */
    if (__builtin_mul_overflow(numel, (uint64_t)rlb_dtype_size(t->dtype), &total))
        return rlb__proto_fail(e, "shape", "size in bytes overflows 64 bits");
    int rc = shard_elems(t, numel, &elems, e);
    if (rc < 0)
        return rc;
    bytes = elems * rlb_dtype_size(t->dtype); /* elems <= numel */
    if (t->mem.length != bytes)
        return rlb__proto_fail(e, "mem.len", "%" PRIu64 " bytes, but this rank's shard holds "
                               "%" PRIu64, t->mem.length, bytes);
    return 0;
}

static int check_register(const void *p, rlb__proto_err *e)
{
    const rlb_msg_register *m = p;
    return m->n_tensors == 0 && m->n_loras == 0
               ? rlb__proto_fail(e, "tens", "at least one tensor or adapter")
               : 0;
}

/* A weight buffer index a load or loaded names. */
static int check_buffer(uint32_t buffer, rlb__proto_err *e)
{
    return buffer >= RLB_PROTO_WEIGHT_BUFFERS
               ? rlb__proto_fail(e, "buf", "%" PRIu32 " is not a weight buffer (a worker has "
                                 "buffers 0 and 1 at most)", buffer)
               : 0;
}

static int check_load(const void *p, rlb__proto_err *e)
{
    const rlb_msg_load *m = p;
    if (m->version == 0)
        return rlb__proto_fail(e, "ver", "versions start at 1");
    return check_buffer(m->buffer, e);
}

static int check_publish(const void *p, rlb__proto_err *e)
{
    const rlb_msg_publish *m = p;
    if (m->version == 0)
        return rlb__proto_fail(e, "ver", "versions start at 1");
    bool no_event = all_zero(m->event, sizeof m->event);
    if (no_event != all_zero(m->event_uuid, sizeof m->event_uuid))
        return rlb__proto_fail(e, no_event ? "ev" : "evu",
                               "an event and the uuid of its GPU go together");
    return 0;
}

static int check_synced(const void *p, rlb__proto_err *e)
{
    const rlb_msg_synced *m = p;
    if (m->version == 0)
        return rlb__proto_fail(e, "ver", "versions start at 1");
    if (m->ms < 0)
        return rlb__proto_fail(e, "ms", "negative time %g", m->ms);
    if (m->gbps < 0)
        return rlb__proto_fail(e, "gbps", "negative rate %g", m->gbps);
    return 0;
}

/* aborted carries an error code; loaded carries 0 (success) or an error code. */
static int check_outcome(const rlb_msg_outcome *m, bool may_succeed, rlb__proto_err *e)
{
    if (m->version == 0)
        return rlb__proto_fail(e, "ver", "versions start at 1");
    if (m->code > 0 || (m->code == 0 && !may_succeed))
        return rlb__proto_fail(e, "code", "%" PRId32 " is not %s", m->code,
                               may_succeed ? "0 or an error code" : "an error code");
    return 0;
}

static int check_aborted(const void *p, rlb__proto_err *e)
{
    return check_outcome(p, false, e);
}

static int check_loaded(const void *p, rlb__proto_err *e)
{
    const rlb_msg_outcome *m = p;
    int rc = check_outcome(m, true, e);
    return rc ? rc : check_buffer(m->buffer, e);
}

static int check_sampling(const void *p, rlb__proto_err *e)
{
    const rlb_msg_sampling *s = p;
    if (s->n == 0)
        return rlb__proto_fail(e, "n", "at least 1 sample per prompt");
    if (s->max_tokens == 0)
        return rlb__proto_fail(e, "max", "at least 1 token");
    if (!(s->temperature >= 0))
        return rlb__proto_fail(e, "temp", "must be >= 0, got %g", s->temperature);
    if (!(s->top_p > 0 && s->top_p <= 1))
        return rlb__proto_fail(e, "topp", "must be in (0, 1], got %g", s->top_p);
    return 0;
}

static int check_prompt(const void *p, rlb__proto_err *e)
{
    const rlb_msg_prompt *m = p;
    return m->n_tokens == 0 ? rlb__proto_fail(e, "t", "a prompt has at least one token") : 0;
}

static int check_generate(const void *p, rlb__proto_err *e)
{
    const rlb_msg_generate *m = p;
    if (m->request_id == 0)
        return rlb__proto_fail(e, "id", "request ids start at 1");
    if (m->n_prompts == 0)
        return rlb__proto_fail(e, "p", "at least one prompt");
    return 0;
}

static int check_sample(const void *p, rlb__proto_err *e)
{
    const rlb_msg_sample *s = p;
    if (s->n_logprobs != 0 && s->n_logprobs != s->n_tokens)
        return rlb__proto_fail(e, "lp", "%" PRIu32 " logprobs for %" PRIu32 " tokens",
                               s->n_logprobs, s->n_tokens);
    return 0;
}

static int check_result(const void *p, rlb__proto_err *e)
{
    const rlb_msg_result *m = p;
    return m->request_id == 0 ? rlb__proto_fail(e, "id", "request ids start at 1") : 0;
}

/* ---- the schema ------------------------------------------------------------------------ */

static const rlb__field hello_fields[] = {
    FLD(rlb_msg_hello, abi_version, "abi", RLB__FK_U32, REQ),
    FLD_ENUM(rlb_msg_hello, role, "role", RLB_ROLE_COUNT_, REQ),
    FLD(rlb_msg_hello, rank, "rank", RLB__FK_U32, OPT),
    FLD(rlb_msg_hello, world, "world", RLB__FK_U32, OPT),
    FLD(rlb_msg_hello, replica, "rep", RLB__FK_U32, OPT),
    FLD(rlb_msg_hello, tp_rank, "tp", RLB__FK_U32, OPT),
    FLD(rlb_msg_hello, tp_size, "tps", RLB__FK_U32, OPT),
    FLD_ENUM(rlb_msg_hello, device, "dev", RLB_DEVICE_CUDA + 1, OPT),
    FLD_BYTES(rlb_msg_hello, device_uuid, "uuid"),
    FLD_ENUM(rlb_msg_hello, weight_dtype, "wdt", RLB_DTYPE_F16 + 1, OPT),
    FLD(rlb_msg_hello, has_weights, "wts", RLB__FK_BOOL, OPT),
};
static const rlb__struct_desc hello_desc = DESC("hello", rlb_msg_hello, hello_fields, check_hello);

static const rlb__field welcome_fields[] = {
    FLD(rlb_msg_welcome, abi_version, "abi", RLB__FK_U32, REQ),
    FLD(rlb_msg_welcome, peer_id, "peer", RLB__FK_U32, OPT),
    FLD(rlb_msg_welcome, weight_version, "ver", RLB__FK_U64, OPT),
};
static const rlb__struct_desc welcome_desc =
    DESC("welcome", rlb_msg_welcome, welcome_fields, check_welcome);

static const rlb__field error_fields[] = {
    FLD(rlb_msg_error, code, "code", RLB__FK_I32, REQ),
    FLD(rlb_msg_error, request_id, "id", RLB__FK_U64, OPT),
    FLD(rlb_msg_error, in_reply_to, "re", RLB__FK_U32, OPT),
    FLD(rlb_msg_error, text, "text", RLB__FK_STR, REQ),
};
static const rlb__struct_desc error_desc = DESC("error", rlb_msg_error, error_fields, check_error);

static const rlb__field flat_entry_fields[] = {
    FLD(rlb_msg_flat_entry, name, "name", RLB__FK_STR, OPT),
    FLD_DIMS(rlb_msg_flat_entry, shape, ndim, "shape", OPT),
    FLD(rlb_msg_flat_entry, numel, "numel", RLB__FK_U64, REQ),
    FLD(rlb_msg_flat_entry, padding, "pad", RLB__FK_BOOL, OPT),
};
static const rlb__struct_desc flat_entry_desc =
    DESC("entry", rlb_msg_flat_entry, flat_entry_fields, check_flat_entry);

static const rlb__field layout_fields[] = {
    FLD_ENUM(rlb_msg_layout, kind, "k", RLB_LAYOUT_COUNT_, REQ),
    FLD(rlb_msg_layout, rank, "rank", RLB__FK_U32, OPT),
    FLD(rlb_msg_layout, world, "world", RLB__FK_U32, OPT),
    FLD(rlb_msg_layout, unit, "unit", RLB__FK_U32, OPT),
    FLD(rlb_msg_layout, align, "align", RLB__FK_U32, OPT),
    FLD_ARRAY(rlb_msg_layout, entries, n_entries, "ent", flat_entry_desc, OPT),
};
static const rlb__struct_desc layout_desc =
    DESC("layout", rlb_msg_layout, layout_fields, check_layout);

static const rlb__field mem_ref_fields[] = {
    FLD_ENUM(rlb_mem_ref, kind, "k", RLB_MEM_COUNT_, REQ),
    FLD(rlb_mem_ref, fd_index, "fd", RLB__FK_U32, OPT),
    FLD_BYTES(rlb_mem_ref, ipc_handle, "h"),
    FLD_BYTES(rlb_mem_ref, device_uuid, "uuid"),
    FLD(rlb_mem_ref, offset, "off", RLB__FK_U64, OPT),
    FLD(rlb_mem_ref, length, "len", RLB__FK_U64, REQ),
};
static const rlb__struct_desc mem_ref_desc = DESC("mem", rlb_mem_ref, mem_ref_fields, check_mem_ref);

static const rlb__field tensor_fields[] = {
    FLD(rlb_msg_tensor, name, "name", RLB__FK_STR, REQ),
    FLD_ENUM(rlb_msg_tensor, dtype, "dt", RLB_DTYPE_COUNT_, REQ),
    FLD_DIMS(rlb_msg_tensor, shape, ndim, "shape", REQ),
    FLD_STRUCT(rlb_msg_tensor, layout, "lay", layout_desc),
    FLD_STRUCT(rlb_msg_tensor, mem, "mem", mem_ref_desc),
};
static const rlb__struct_desc tensor_desc = DESC("tensor", rlb_msg_tensor, tensor_fields, check_tensor);

static const rlb__field lora_fields[] = {
    FLD(rlb_msg_lora, target, "w", RLB__FK_STR, REQ),
    FLD(rlb_msg_lora, rank, "r", RLB__FK_U32, REQ),
    FLD(rlb_msg_lora, scale, "s", RLB__FK_F64, OPT),
};
static const rlb__struct_desc lora_desc = DESC("lora", rlb_msg_lora, lora_fields, NULL);

static const rlb__field register_fields[] = {
    FLD_ARRAY(rlb_msg_register, tensors, n_tensors, "tens", tensor_desc, OPT),
    FLD_ARRAY(rlb_msg_register, loras, n_loras, "lora", lora_desc, OPT),
};
static const rlb__struct_desc register_desc =
    DESC("register", rlb_msg_register, register_fields, check_register);

static const rlb__field name_fields[] = {
    FLD(rlb_msg_name, name, "name", RLB__FK_STR, REQ),
};
static const rlb__struct_desc name_desc = DESC("name", rlb_msg_name, name_fields, NULL);

static const rlb__field unregister_fields[] = {
    FLD_ARRAY(rlb_msg_unregister, names, n_names, "names", name_desc, OPT),
};
static const rlb__struct_desc unregister_desc =
    DESC("unregister", rlb_msg_unregister, unregister_fields, NULL);

static const rlb__field load_fields[] = {
    FLD(rlb_msg_load, version, "ver", RLB__FK_U64, REQ),
    FLD(rlb_msg_load, buffer, "buf", RLB__FK_U32, OPT),
};
static const rlb__field publish_fields[] = {
    FLD(rlb_msg_publish, version, "ver", RLB__FK_U64, REQ),
    FLD_BYTES(rlb_msg_publish, event, "ev"),
    FLD_BYTES(rlb_msg_publish, event_uuid, "evu"),
};
static const rlb__struct_desc publish_desc =
    DESC("publish", rlb_msg_publish, publish_fields, check_publish);

static const rlb__field unregistered_fields[] = {
    FLD(rlb_msg_unregistered, n_tensors, "n", RLB__FK_U32, OPT),
};
static const rlb__struct_desc unregistered_desc =
    DESC("unregistered", rlb_msg_unregistered, unregistered_fields, NULL);
static const rlb__struct_desc load_desc = DESC("load", rlb_msg_load, load_fields, check_load);

static const rlb__field synced_fields[] = {
    FLD(rlb_msg_synced, version, "ver", RLB__FK_U64, REQ),
    FLD(rlb_msg_synced, bytes, "bytes", RLB__FK_U64, OPT),
    FLD(rlb_msg_synced, ms, "ms", RLB__FK_F64, OPT),
    FLD(rlb_msg_synced, gbps, "gbps", RLB__FK_F64, OPT),
};
static const rlb__struct_desc synced_desc = DESC("synced", rlb_msg_synced, synced_fields, check_synced);

static const rlb__field outcome_fields[] = {
    FLD(rlb_msg_outcome, version, "ver", RLB__FK_U64, REQ),
    FLD(rlb_msg_outcome, code, "code", RLB__FK_I32, OPT),
    FLD(rlb_msg_outcome, text, "text", RLB__FK_STR, OPT),
};
static const rlb__field loaded_fields[] = {
    FLD(rlb_msg_outcome, version, "ver", RLB__FK_U64, REQ),
    FLD(rlb_msg_outcome, code, "code", RLB__FK_I32, OPT),
    FLD(rlb_msg_outcome, text, "text", RLB__FK_STR, OPT),
    FLD(rlb_msg_outcome, buffer, "buf", RLB__FK_U32, OPT),
};
static const rlb__struct_desc aborted_desc =
    DESC("aborted", rlb_msg_outcome, outcome_fields, check_aborted);
static const rlb__struct_desc loaded_desc =
    DESC("loaded", rlb_msg_outcome, loaded_fields, check_loaded);

static const rlb__field sampling_fields[] = {
    FLD(rlb_msg_sampling, n, "n", RLB__FK_U32, REQ),
    FLD(rlb_msg_sampling, max_tokens, "max", RLB__FK_U32, REQ),
    FLD(rlb_msg_sampling, temperature, "temp", RLB__FK_F32, REQ),
    FLD(rlb_msg_sampling, top_p, "topp", RLB__FK_F32, REQ),
    FLD(rlb_msg_sampling, top_k, "topk", RLB__FK_U32, OPT),
    FLD(rlb_msg_sampling, seed, "seed", RLB__FK_U64, OPT),
    FLD_BIN4(rlb_msg_sampling, stop, n_stop, "stop", OPT),
    FLD(rlb_msg_sampling, logprobs, "lp", RLB__FK_BOOL, OPT),
};
static const rlb__struct_desc sampling_desc =
    DESC("sampling", rlb_msg_sampling, sampling_fields, check_sampling);

static const rlb__field prompt_fields[] = {
    FLD_BIN4(rlb_msg_prompt, tokens, n_tokens, "t", REQ),
    FLD_PSTRUCT(rlb_msg_prompt, sampling, "sp", sampling_desc),
};
static const rlb__struct_desc prompt_desc = DESC("prompt", rlb_msg_prompt, prompt_fields, check_prompt);

static const rlb__field generate_fields[] = {
    FLD(rlb_msg_generate, request_id, "id", RLB__FK_U64, REQ),
    FLD(rlb_msg_generate, min_weight_version, "minv", RLB__FK_U64, OPT),
    FLD_STRUCT(rlb_msg_generate, sampling, "sp", sampling_desc),
    FLD_ARRAY(rlb_msg_generate, prompts, n_prompts, "p", prompt_desc, REQ),
};
static const rlb__struct_desc generate_desc =
    DESC("generate", rlb_msg_generate, generate_fields, check_generate);

static const rlb__field sample_fields[] = {
    FLD(rlb_msg_sample, prompt, "p", RLB__FK_U32, OPT),
    FLD(rlb_msg_sample, index, "i", RLB__FK_U32, OPT),
    FLD_BIN4(rlb_msg_sample, tokens, n_tokens, "t", OPT),
    FLD_BIN4(rlb_msg_sample, logprobs, n_logprobs, "lp", OPT),
    FLD_ENUM(rlb_msg_sample, finish, "fin", RLB_MSG_FINISH_COUNT_, REQ),
    FLD(rlb_msg_sample, weight_version, "ver", RLB__FK_U64, REQ),
};
static const rlb__struct_desc sample_desc = DESC("sample", rlb_msg_sample, sample_fields, check_sample);

static const rlb__field result_fields[] = {
    FLD(rlb_msg_result, request_id, "id", RLB__FK_U64, REQ),
    FLD(rlb_msg_result, done, "done", RLB__FK_BOOL, OPT),
    FLD_ARRAY(rlb_msg_result, samples, n_samples, "s", sample_desc, OPT),
};
static const rlb__struct_desc result_desc = DESC("result", rlb_msg_result, result_fields, check_result);

static const rlb__field stats_fields[] = {
    FLD(rlb_msg_stats, request_id, "id", RLB__FK_U64, OPT),
};
static const rlb__struct_desc stats_desc = DESC("stats", rlb_msg_stats, stats_fields, NULL);

static const rlb__field stat_fields[] = {
    FLD(rlb_msg_stat, name, "name", RLB__FK_STR, REQ),
    FLD(rlb_msg_stat, value, "v", RLB__FK_F64, OPT),
};
static const rlb__struct_desc stat_desc = DESC("stat", rlb_msg_stat, stat_fields, NULL);

static const rlb__field stats_reply_fields[] = {
    FLD(rlb_msg_stats_reply, request_id, "id", RLB__FK_U64, OPT),
    FLD_ARRAY(rlb_msg_stats_reply, stats, n_stats, "s", stat_desc, OPT),
};
static const rlb__struct_desc stats_reply_desc =
    DESC("stats_reply", rlb_msg_stats_reply, stats_reply_fields, NULL);

/* sleep, wake and shutdown: a type and nothing else. */
static const rlb__struct_desc sleep_desc = {.name = "sleep", .size = 0};
static const rlb__struct_desc wake_desc = {.name = "wake", .size = 0};
static const rlb__struct_desc shutdown_desc = {.name = "shutdown", .size = 0};

static const rlb__struct_desc *const msg_schemas[RLB_MSG_COUNT_] = {
    [RLB_MSG_HELLO] = &hello_desc,
    [RLB_MSG_WELCOME] = &welcome_desc,
    [RLB_MSG_ERROR] = &error_desc,
    [RLB_MSG_REGISTER] = &register_desc,
    [RLB_MSG_UNREGISTER] = &unregister_desc,
    [RLB_MSG_PUBLISH] = &publish_desc,
    [RLB_MSG_SYNCED] = &synced_desc,
    [RLB_MSG_ABORTED] = &aborted_desc,
    [RLB_MSG_GENERATE] = &generate_desc,
    [RLB_MSG_RESULT] = &result_desc,
    [RLB_MSG_LOAD] = &load_desc,
    [RLB_MSG_LOADED] = &loaded_desc,
    [RLB_MSG_SLEEP] = &sleep_desc,
    [RLB_MSG_WAKE] = &wake_desc,
    [RLB_MSG_STATS] = &stats_desc,
    [RLB_MSG_STATS_REPLY] = &stats_reply_desc,
    [RLB_MSG_SHUTDOWN] = &shutdown_desc,
    [RLB_MSG_UNREGISTERED] = &unregistered_desc,
};

const rlb__struct_desc *rlb__msg_schema(uint32_t type)
{
    return type > 0 && type < RLB_MSG_COUNT_ ? msg_schemas[type] : NULL;
}

const char *rlb__msg_type_name(uint32_t type)
{
    const rlb__struct_desc *desc = rlb__msg_schema(type);
    return desc ? desc->name : "?";
}

void *rlb__msg_body(const rlb_msg *msg)
{
    return (void *)&msg->hello;
}

void rlb__msg_free(rlb_msg *msg)
{
    if (msg->arena)
        msgpack_zone_free(msg->arena);
    memset(msg, 0, sizeof *msg);
}

/* ---- validation of a C struct ---------------------------------------------------------- */

static int validate_array(const rlb__field *f, const void *s, rlb__proto_err *e)
{
    uint32_t n = rlb__field_count(s, f);
    const char *elems = rlb__field_pointer(s, f);
    if (n && !elems)
        return rlb__proto_fail(e, f->key, "%" PRIu32 " elements at NULL", n);
    size_t old = rlb__proto_push(e, f->key), base = e->path_len;
    int rc = 0;
    for (uint32_t i = 0; i < n && rc == 0; i++) {
        rlb__proto_push_index(e, i);
        rc = rlb__proto_validate(f->sub, elems + (size_t)i * f->sub->size, e);
        rlb__proto_pop(e, base);
    }
    rlb__proto_pop(e, old);
    return rc;
}

static int validate_field(const rlb__field *f, const void *s, rlb__proto_err *e)
{
    const void *v = rlb__field_addr(s, f);
    switch (f->kind) {
    case RLB__FK_ENUM: {
        int x;
        memcpy(&x, v, sizeof x);
        if (x < 0 || (uint32_t)x >= f->size)
            return rlb__proto_fail(e, f->key, "%d is not a known value (0..%" PRIu32 ")", x,
                                   f->size - 1);
        return 0;
    }
    case RLB__FK_F32: {
        float x;
        memcpy(&x, v, sizeof x);
        return isfinite(x) ? 0 : rlb__proto_fail(e, f->key, "not a finite number");
    }
    case RLB__FK_F64: {
        double x;
        memcpy(&x, v, sizeof x);
        return isfinite(x) ? 0 : rlb__proto_fail(e, f->key, "not a finite number");
    }
    case RLB__FK_STR: {
        const char *str = rlb__field_pointer(s, f);
        if (f->required && (!str || !str[0]))
            return rlb__proto_fail(e, f->key, "missing or empty");
        if (str && strlen(str) > UINT32_MAX)
            return rlb__proto_fail(e, f->key, "longer than 4 GiB");
        return 0;
    }
    case RLB__FK_BIN: {
        uint32_t n = rlb__field_count(s, f);
        if (n && !rlb__field_pointer(s, f))
            return rlb__proto_fail(e, f->key, "%" PRIu32 " elements at NULL", n);
        if ((uint64_t)n * f->size > UINT32_MAX)
            return rlb__proto_fail(e, f->key, "longer than 4 GiB");
        return 0;
    }
    case RLB__FK_DIMS: {
        uint32_t ndim = rlb__field_count(s, f);
        uint64_t numel;
        if (ndim > RLB_PROTO_MAX_DIMS)
            return rlb__proto_fail(e, f->key, "%" PRIu32 " dimensions, at most %d", ndim,
                                   RLB_PROTO_MAX_DIMS);
        if (rlb__proto_numel(v, ndim, &numel) < 0)
            return rlb__proto_fail(e, f->key, "element count overflows 64 bits");
        return 0;
    }
    case RLB__FK_STRUCT:
    case RLB__FK_PSTRUCT: {
        const void *sub = f->kind == RLB__FK_STRUCT ? v : rlb__field_pointer(s, f);
        if (!sub)
            return 0;
        size_t old = rlb__proto_push(e, f->key);
        int rc = rlb__proto_validate(f->sub, sub, e);
        rlb__proto_pop(e, old);
        return rc;
    }
    case RLB__FK_ARRAY:
        return validate_array(f, s, e);
    default: /* integers, bools and fixed bytes hold any value their C type can */
        return 0;
    }
}

int rlb__proto_validate(const rlb__struct_desc *desc, const void *s, rlb__proto_err *err)
{
    for (unsigned i = 0; i < desc->n_fields; i++) {
        int rc = validate_field(&desc->fields[i], s, err);
        if (rc < 0)
            return rc;
    }
    return desc->check ? desc->check(s, err) : 0;
}
