/* test_proto: the msgpack protocol (common/proto*.c).
 *
 * References are independent of the code under test: every message type is built by hand
 * with non-trivial contents and compared field by field after a round trip; two encodings
 * are worked out byte by byte; malformed and invalid inputs are made by editing a message
 * as a msgpack-c object tree (msgpack-c parses our own, trusted output here) or by writing
 * bytes directly, and each must fail with RLB_EPROTO and a text naming the field. Which
 * fields are required is listed here again from proto.h's comments. Random and mutated
 * bytes must never crash; mutants that decode must re-encode to themselves.
 *
 *   test_proto                     run the tests
 *   test_proto --write-corpus DIR  write one encoded message of each type (the fuzz corpus)
 */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <msgpack.h>

#include "common/proto.h"

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* ---- one hand-built message of each type ------------------------------------------------ */

static const int32_t prompt0[] = {1, 2, 3, 4, 5};
static const int32_t prompt1[] = {100000, 7};
static const int32_t prompt2[] = {42};
static const int32_t stop_ids[] = {2, 151643};
static const int32_t out0[] = {10, 11, 12};
static const int32_t out1[] = {13};
static const float lp0[] = {-0.5f, -1.25f, -0.125f};

static rlb_msg_flat_entry flat_entries[] = {
    {.name = "a.weight", .ndim = 2, .shape = {3, 4}, .numel = 12},
    {.padding = true, .numel = 4},
    {.name = "a.bias", .ndim = 1, .shape = {5}, .numel = 5},
    {.padding = true, .numel = 3},
    {.name = "b.weight", .ndim = 3, .shape = {2, 2, 2}, .numel = 8},
};

static rlb_msg_tensor tensors[3];
static rlb_msg_name unreg_names[] = {{"a"}, {"model.layers.0.mlp.down_proj.weight"}};
static rlb_msg_lora loras[] = {{"model.layers.0.self_attn.q_proj.weight", 16, 2.0},
                               {"lm_head.weight", 0, 0.0}};
static rlb_msg_sampling prompt1_sp = {.n = 1, .max_tokens = 16, .temperature = 0.0f,
                                  .top_p = 1.0f};
static rlb_msg_prompt prompts[] = {
    {.tokens = prompt0, .n_tokens = 5},
    {.tokens = prompt1, .n_tokens = 2, .sampling = &prompt1_sp},
    {.tokens = prompt2, .n_tokens = 1},
};
static rlb_msg_sample samples[] = {
    {.prompt = 0, .index = 0, .tokens = out0, .n_tokens = 3, .logprobs = lp0,
     .n_logprobs = 3, .finish = RLB_MSG_FINISH_STOP, .weight_version = 9},
    {.prompt = 1, .index = 0, .tokens = out1, .n_tokens = 1, .finish = RLB_MSG_FINISH_LENGTH,
     .weight_version = 10},
    {.prompt = 2, .index = 3, .finish = RLB_MSG_FINISH_ABORT, .weight_version = 10},
};
static rlb_msg_stat stats[] = {
    {"bytes_synced", 1.5e9}, {"kv_blocks_free", 321}, {"weight_version", 9}};

static void fill_bytes(uint8_t *p, size_t n, uint8_t first)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(first + i);
}

/* The three layouts: a full norm on host memory; FSDP2 rank 3 of 4 of a [10, 6] matrix
 * (c = ceil(10/4) = 3, rows [9, 10): one row of 6 f32 = 24 bytes) behind a CUDA IPC
 * handle; FSDP1 rank 1 of 2 of a 32-element bf16 FlatParameter (align 8: entries start at
 * 0, 16, 24) in a VMM fd: 16 elements = 32 bytes. */
static void build_tensors(void)
{
    memset(tensors, 0, sizeof tensors);
    tensors[0] = (rlb_msg_tensor){
        .name = "model.norm.weight", .dtype = RLB_DTYPE_BF16, .ndim = 1, .shape = {64},
        .layout = {.kind = RLB_LAYOUT_FULL},
        .mem = {.kind = RLB_MEM_HOST_SHM, .fd_index = 2, .offset = 4096, .length = 128}};
    tensors[1] = (rlb_msg_tensor){
        .name = "model.layers.0.mlp.down_proj.weight", .dtype = RLB_DTYPE_F32, .ndim = 2,
        .shape = {10, 6}, .layout = {.kind = RLB_LAYOUT_FSDP2, .rank = 3, .world = 4},
        .mem = {.kind = RLB_MEM_CUDA_IPC, .offset = 1ull << 33, .length = 24}};
    fill_bytes(tensors[1].mem.ipc_handle, RLB_PROTO_HANDLE_BYTES, 0x40);
    fill_bytes(tensors[1].mem.device_uuid, RLB_PROTO_UUID_BYTES, 0xa0);
    tensors[2] = (rlb_msg_tensor){
        .name = "layers.1._flat_param", .dtype = RLB_DTYPE_BF16, .ndim = 1, .shape = {32},
        .layout = {.kind = RLB_LAYOUT_FSDP1, .rank = 1, .world = 2, .unit = 1, .align = 8,
                   .n_entries = N_OF(flat_entries), .entries = flat_entries},
        .mem = {.kind = RLB_MEM_CUDA_VMM_FD, .fd_index = 3, .length = 32}};
    fill_bytes(tensors[2].mem.device_uuid, RLB_PROTO_UUID_BYTES, 0xb0);
}

static void sample_msg(rlb_msg_type type, rlb_msg *m)
{
    memset(m, 0, sizeof *m);
    m->type = type;
    switch (type) {
    case RLB_MSG_HELLO:
        m->hello = (rlb_msg_hello){.abi_version = RLB_ABI_VERSION, .role = RLB_ROLE_WORKER,
                                   .rank = 5, .world = 8, .replica = 2, .tp_rank = 1,
                                   .tp_size = 4, .device = RLB_DEVICE_CUDA};
        fill_bytes(m->hello.device_uuid, RLB_PROTO_UUID_BYTES, 0x10);
        break;
    case RLB_MSG_WELCOME:
        m->welcome = (rlb_msg_welcome){.abi_version = RLB_ABI_VERSION, .peer_id = 7,
                                       .weight_version = 41};
        break;
    case RLB_MSG_ERROR:
        m->error = (rlb_msg_error){.code = RLB_ESHAPE, .request_id = 1234567890123ull,
                                   .in_reply_to = RLB_MSG_REGISTER,
                                   .text = "qkv shape [12, 4] does not match the model"};
        break;
    case RLB_MSG_REGISTER:
        build_tensors();
        m->reg = (rlb_msg_register){.n_tensors = N_OF(tensors), .tensors = tensors,
                                    .n_loras = N_OF(loras), .loras = loras};
        break;
    case RLB_MSG_UNREGISTER:
        m->unreg = (rlb_msg_unregister){.n_names = N_OF(unreg_names), .names = unreg_names};
        break;
    case RLB_MSG_PUBLISH:
        m->publish.version = 9;
        fill_bytes(m->publish.event, RLB_PROTO_HANDLE_BYTES, 0x60);
        fill_bytes(m->publish.event_uuid, RLB_PROTO_UUID_BYTES, 0xc0);
        break;
    case RLB_MSG_UNREGISTERED:
        m->unregistered.n_tensors = 2;
        break;
    case RLB_MSG_SYNCED:
        m->synced = (rlb_msg_synced){.version = 9, .bytes = 123456789, .ms = 12.5,
                                     .gbps = 9.875};
        break;
    case RLB_MSG_ABORTED:
        m->aborted = (rlb_msg_outcome){.version = 10, .code = RLB_EPEERDEAD,
                                       .text = "trainer rank 3 died"};
        break;
    case RLB_MSG_GENERATE:
        m->generate = (rlb_msg_generate){
            .request_id = 77, .min_weight_version = 9,
            .sampling = {.n = 4, .max_tokens = 128, .temperature = 0.7f, .top_p = 0.95f,
                         .top_k = 50, .seed = 0xdeadbeefcafeull, .stop = stop_ids,
                         .n_stop = N_OF(stop_ids), .logprobs = true},
            .n_prompts = N_OF(prompts), .prompts = prompts};
        break;
    case RLB_MSG_RESULT:
        m->result = (rlb_msg_result){.request_id = 77, .done = true,
                                     .n_samples = N_OF(samples), .samples = samples};
        break;
    case RLB_MSG_LOAD:
        m->load = (rlb_msg_load){.version = 11, .buffer = 1};
        break;
    case RLB_MSG_LOADED:
        m->loaded = (rlb_msg_outcome){.version = 11, .code = RLB_ECUDA,
                                      .text = "cuMemcpy failed", .buffer = 1};
        break;
    case RLB_MSG_STATS:
        m->stats.request_id = 5;
        break;
    case RLB_MSG_STATS_REPLY:
        m->stats_reply = (rlb_msg_stats_reply){.request_id = 5, .n_stats = N_OF(stats),
                                               .stats = stats};
        break;
    default: /* sleep, wake, shutdown: a type alone */
        break;
    }
}

/* ---- field-by-field comparison ---------------------------------------------------------- */

static void assert_str(const char *want, const char *got)
{
    if (!want) {
        assert_null(got);
        return;
    }
    assert_non_null(got);
    assert_string_equal(want, got);
}

/* Both arrays hold n 4-byte elements with the same bytes; got points into [buf, buf+len). */
static void assert_bin4(const void *want, uint32_t n_want, const void *got, uint32_t n_got,
                        const void *buf, size_t len)
{
    assert_int_equal(n_want, n_got);
    if (n_want == 0) {
        assert_null(got);
        return;
    }
    assert_memory_equal(want, got, 4 * (size_t)n_want);
    if (buf) { /* decoded bins are borrowed from the buffer, not copied */
        const char *b = buf, *g = got;
        assert_true(g >= b && g + 4 * (size_t)n_got <= b + len);
    }
}

static void assert_dims(const uint64_t *want, uint32_t nw, const uint64_t *got, uint32_t ng)
{
    assert_int_equal(nw, ng);
    for (uint32_t i = 0; i < nw; i++)
        assert_int_equal(want[i], got[i]);
}

static void assert_sampling(const rlb_msg_sampling *w, const rlb_msg_sampling *g, const void *buf,
                            size_t len)
{
    assert_int_equal(w->n, g->n);
    assert_int_equal(w->max_tokens, g->max_tokens);
    assert_true(w->temperature == g->temperature);
    assert_true(w->top_p == g->top_p);
    assert_int_equal(w->top_k, g->top_k);
    assert_int_equal(w->seed, g->seed);
    assert_bin4(w->stop, w->n_stop, g->stop, g->n_stop, buf, len);
    assert_int_equal(w->logprobs, g->logprobs);
}

static void assert_tensor(const rlb_msg_tensor *w, const rlb_msg_tensor *g)
{
    assert_str(w->name, g->name);
    assert_int_equal(w->dtype, g->dtype);
    assert_dims(w->shape, w->ndim, g->shape, g->ndim);
    const rlb_msg_layout *wl = &w->layout, *gl = &g->layout;
    assert_int_equal(wl->kind, gl->kind);
    assert_int_equal(wl->rank, gl->rank);
    assert_int_equal(wl->world, gl->world);
    assert_int_equal(wl->unit, gl->unit);
    assert_int_equal(wl->align, gl->align);
    assert_int_equal(wl->n_entries, gl->n_entries);
    for (uint32_t i = 0; i < wl->n_entries; i++) {
        const rlb_msg_flat_entry *we = &wl->entries[i], *ge = &gl->entries[i];
        assert_str(we->name, ge->name);
        assert_dims(we->shape, we->ndim, ge->shape, ge->ndim);
        assert_int_equal(we->numel, ge->numel);
        assert_int_equal(we->padding, ge->padding);
    }
    const rlb_mem_ref *wm = &w->mem, *gm = &g->mem;
    assert_int_equal(wm->kind, gm->kind);
    assert_int_equal(wm->fd_index, gm->fd_index);
    assert_memory_equal(wm->ipc_handle, gm->ipc_handle, RLB_PROTO_HANDLE_BYTES);
    assert_memory_equal(wm->device_uuid, gm->device_uuid, RLB_PROTO_UUID_BYTES);
    assert_int_equal(wm->offset, gm->offset);
    assert_int_equal(wm->length, gm->length);
}

static void assert_outcome(const rlb_msg_outcome *w, const rlb_msg_outcome *g)
{
    assert_int_equal(w->version, g->version);
    assert_int_equal(w->code, g->code);
    assert_str(w->text, g->text);
    assert_int_equal(w->buffer, g->buffer);
}

/* want was built by hand; got was decoded from buf[0..len) (buf NULL: no borrow check). */
static void assert_msg_equal(const rlb_msg *want, const rlb_msg *got, const void *buf,
                             size_t len)
{
    assert_int_equal(want->type, got->type);
    switch (want->type) {
    case RLB_MSG_HELLO: {
        const rlb_msg_hello *w = &want->hello, *g = &got->hello;
        assert_int_equal(w->abi_version, g->abi_version);
        assert_int_equal(w->role, g->role);
        assert_int_equal(w->rank, g->rank);
        assert_int_equal(w->world, g->world);
        assert_int_equal(w->replica, g->replica);
        assert_int_equal(w->tp_rank, g->tp_rank);
        assert_int_equal(w->tp_size, g->tp_size);
        assert_int_equal(w->device, g->device);
        assert_memory_equal(w->device_uuid, g->device_uuid, RLB_PROTO_UUID_BYTES);
        break;
    }
    case RLB_MSG_WELCOME:
        assert_int_equal(want->welcome.abi_version, got->welcome.abi_version);
        assert_int_equal(want->welcome.peer_id, got->welcome.peer_id);
        assert_int_equal(want->welcome.weight_version, got->welcome.weight_version);
        break;
    case RLB_MSG_ERROR:
        assert_int_equal(want->error.code, got->error.code);
        assert_int_equal(want->error.request_id, got->error.request_id);
        assert_int_equal(want->error.in_reply_to, got->error.in_reply_to);
        assert_str(want->error.text, got->error.text);
        break;
    case RLB_MSG_REGISTER:
        assert_int_equal(want->reg.n_tensors, got->reg.n_tensors);
        for (uint32_t i = 0; i < want->reg.n_tensors; i++)
            assert_tensor(&want->reg.tensors[i], &got->reg.tensors[i]);
        assert_int_equal(want->reg.n_loras, got->reg.n_loras);
        for (uint32_t i = 0; i < want->reg.n_loras; i++) {
            assert_str(want->reg.loras[i].target, got->reg.loras[i].target);
            assert_int_equal(want->reg.loras[i].rank, got->reg.loras[i].rank);
            assert_true(want->reg.loras[i].scale == got->reg.loras[i].scale);
        }
        break;
    case RLB_MSG_UNREGISTER:
        assert_int_equal(want->unreg.n_names, got->unreg.n_names);
        for (uint32_t i = 0; i < want->unreg.n_names; i++)
            assert_str(want->unreg.names[i].name, got->unreg.names[i].name);
        break;
    case RLB_MSG_PUBLISH:
        assert_int_equal(want->publish.version, got->publish.version);
        assert_memory_equal(want->publish.event, got->publish.event, RLB_PROTO_HANDLE_BYTES);
        assert_memory_equal(want->publish.event_uuid, got->publish.event_uuid,
                            RLB_PROTO_UUID_BYTES);
        break;
    case RLB_MSG_LOAD:
        assert_int_equal(want->load.version, got->load.version);
        assert_int_equal(want->load.buffer, got->load.buffer);
        break;
    case RLB_MSG_UNREGISTERED:
        assert_int_equal(want->unregistered.n_tensors, got->unregistered.n_tensors);
        break;
    case RLB_MSG_SYNCED:
        assert_int_equal(want->synced.version, got->synced.version);
        assert_int_equal(want->synced.bytes, got->synced.bytes);
        assert_true(want->synced.ms == got->synced.ms);
        assert_true(want->synced.gbps == got->synced.gbps);
        break;
    case RLB_MSG_ABORTED:
    case RLB_MSG_LOADED:
        assert_outcome(&want->aborted, &got->aborted);
        break;
    case RLB_MSG_GENERATE: {
        const rlb_msg_generate *w = &want->generate, *g = &got->generate;
        assert_int_equal(w->request_id, g->request_id);
        assert_int_equal(w->min_weight_version, g->min_weight_version);
        assert_sampling(&w->sampling, &g->sampling, buf, len);
        assert_int_equal(w->n_prompts, g->n_prompts);
        for (uint32_t i = 0; i < w->n_prompts; i++) {
            const rlb_msg_prompt *wp = &w->prompts[i], *gp = &g->prompts[i];
            assert_bin4(wp->tokens, wp->n_tokens, gp->tokens, gp->n_tokens, buf, len);
            if (wp->sampling)
                assert_sampling(wp->sampling, gp->sampling, buf, len);
            else
                assert_null(gp->sampling);
        }
        break;
    }
    case RLB_MSG_RESULT: {
        const rlb_msg_result *w = &want->result, *g = &got->result;
        assert_int_equal(w->request_id, g->request_id);
        assert_int_equal(w->done, g->done);
        assert_int_equal(w->n_samples, g->n_samples);
        for (uint32_t i = 0; i < w->n_samples; i++) {
            const rlb_msg_sample *ws = &w->samples[i], *gs = &g->samples[i];
            assert_int_equal(ws->prompt, gs->prompt);
            assert_int_equal(ws->index, gs->index);
            assert_bin4(ws->tokens, ws->n_tokens, gs->tokens, gs->n_tokens, buf, len);
            assert_bin4(ws->logprobs, ws->n_logprobs, gs->logprobs, gs->n_logprobs, buf, len);
            assert_int_equal(ws->finish, gs->finish);
            assert_int_equal(ws->weight_version, gs->weight_version);
        }
        break;
    }
    case RLB_MSG_STATS:
        assert_int_equal(want->stats.request_id, got->stats.request_id);
        break;
    case RLB_MSG_STATS_REPLY:
        assert_int_equal(want->stats_reply.request_id, got->stats_reply.request_id);
        assert_int_equal(want->stats_reply.n_stats, got->stats_reply.n_stats);
        for (uint32_t i = 0; i < want->stats_reply.n_stats; i++) {
            assert_str(want->stats_reply.stats[i].name, got->stats_reply.stats[i].name);
            assert_true(want->stats_reply.stats[i].value == got->stats_reply.stats[i].value);
        }
        break;
    default:
        break;
    }
}

/* ---- helpers ------------------------------------------------------------------------------ */

/* Packs m into a fresh heap buffer of exactly rlb__msg_packed_size bytes. */
static char *pack_alloc(const rlb_msg *m, size_t *len)
{
    size_t size = 0, got = 0;
    assert_int_equal(rlb__msg_packed_size(m, &size), 0);
    char *buf = malloc(size);
    assert_non_null(buf);
    assert_int_equal(rlb__msg_pack(m, buf, size, &got), 0);
    assert_int_equal(got, size);
    *len = size;
    return buf;
}

static int decode(const void *buf, size_t len, rlb_msg *m, char *err)
{
    return rlb__msg_decode(buf, len, m, err, 256);
}

/* Decoding buf must fail with RLB_EPROTO and a text containing `want`. */
static void assert_refused(const void *buf, size_t len, const char *want)
{
    rlb_msg m;
    char err[256];
    int rc = decode(buf, len, &m, err);
    if (rc != RLB_EPROTO || !strstr(err, want))
        fail_msg("rc %d, error \"%s\", wanted RLB_EPROTO and \"%s\"", rc, err, want);
    assert_null(m.arena);
    assert_int_equal(m.type, 0);
}

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ---- msgpack-c object trees, to make malformed and invalid variants ---------------------- */

typedef struct tree {
    msgpack_unpacked u; /* the parsed message; strs point into the packed buffer */
    char *packed;       /* the sample message, packed by the code under test */
    size_t packed_len;
} tree;

static void tree_load(tree *t, rlb_msg_type type)
{
    rlb_msg m;
    size_t off = 0;
    sample_msg(type, &m);
    t->packed = pack_alloc(&m, &t->packed_len);
    msgpack_unpacked_init(&t->u);
    assert_int_equal(msgpack_unpack_next(&t->u, t->packed, t->packed_len, &off),
                     MSGPACK_UNPACK_SUCCESS);
    assert_int_equal(off, t->packed_len);
}

static void tree_free(tree *t)
{
    msgpack_unpacked_destroy(&t->u);
    free(t->packed);
}

/* Encodes an object with msgpack-c (not the code under test) into a heap buffer. */
static char *tree_pack(const msgpack_object *o, size_t *len)
{
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    assert_int_equal(msgpack_pack_object(&pk, *o), 0);
    *len = sb.size;
    char *out = malloc(sb.size ? sb.size : 1);
    assert_non_null(out);
    memcpy(out, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
    return out;
}

/* The object at a path like "tens[1].lay.rank" below a map, or NULL. */
static msgpack_object *tree_at(msgpack_object *o, const char *path)
{
    while (*path) {
        char key[32];
        size_t n = strcspn(path, ".[");
        assert_true(n < sizeof key);
        memcpy(key, path, n);
        key[n] = '\0';
        path += n;
        if (n) {
            msgpack_object *next = NULL;
            if (o->type != MSGPACK_OBJECT_MAP)
                return NULL;
            for (uint32_t i = 0; i < o->via.map.size; i++) {
                msgpack_object_kv *kv = &o->via.map.ptr[i];
                if (kv->key.via.str.size == n && memcmp(kv->key.via.str.ptr, key, n) == 0)
                    next = &kv->val;
            }
            if (!(o = next))
                return NULL;
        }
        if (*path == '[') {
            unsigned long i = strtoul(path + 1, (char **)&path, 10);
            path++; /* ']' */
            if (o->type != MSGPACK_OBJECT_ARRAY || i >= o->via.array.size)
                return NULL;
            o = &o->via.array.ptr[i];
        }
        if (*path == '.')
            path++;
    }
    return o;
}

/* Adds key -> val to the map at o (memory from the tree's zone). */
static void tree_add(tree *t, msgpack_object *o, const char *key, msgpack_object val)
{
    uint32_t n = o->via.map.size;
    msgpack_object_kv *kv = msgpack_zone_malloc(t->u.zone, (n + 1) * sizeof *kv);
    assert_non_null(kv);
    memcpy(kv, o->via.map.ptr, n * sizeof *kv);
    kv[n].key = (msgpack_object){.type = MSGPACK_OBJECT_STR,
                                 .via.str = {.size = (uint32_t)strlen(key), .ptr = key}};
    kv[n].val = val;
    o->via.map.ptr = kv;
    o->via.map.size = n + 1;
}

static msgpack_object obj_uint(uint64_t v)
{
    return (msgpack_object){.type = MSGPACK_OBJECT_POSITIVE_INTEGER, .via.u64 = v};
}

static msgpack_object obj_int(int64_t v)
{
    return (msgpack_object){.type = MSGPACK_OBJECT_NEGATIVE_INTEGER, .via.i64 = v};
}

static msgpack_object obj_f64(double v)
{
    return (msgpack_object){.type = MSGPACK_OBJECT_FLOAT64, .via.f64 = v};
}

static msgpack_object obj_str(const char *s, uint32_t n)
{
    return (msgpack_object){.type = MSGPACK_OBJECT_STR, .via.str = {.size = n, .ptr = s}};
}

static msgpack_object obj_bin(const void *p, uint32_t n)
{
    return (msgpack_object){.type = MSGPACK_OBJECT_BIN, .via.bin = {.size = n, .ptr = p}};
}

static msgpack_object obj_array(msgpack_object *items, uint32_t n)
{
    return (msgpack_object){.type = MSGPACK_OBJECT_ARRAY, .via.array = {.size = n, .ptr = items}};
}

/* The sample message of `type` with the value at `path` replaced: decoding must fail with
 * a text containing `want`. */
static void refuse_edit(rlb_msg_type type, const char *path, msgpack_object val,
                        const char *want)
{
    tree t;
    size_t len;
    tree_load(&t, type);
    msgpack_object *o = tree_at(&t.u.data, path);
    if (o) {
        *o = val;
    } else { /* an optional field the sample leaves out: add it to its map */
        char parent[64];
        const char *dot = strrchr(path, '.');
        assert_non_null(dot);
        snprintf(parent, sizeof parent, "%.*s", (int)(dot - path), path);
        o = tree_at(&t.u.data, parent);
        if (!o || o->type != MSGPACK_OBJECT_MAP)
            fail_msg("no %s in the %s sample", parent, rlb__msg_type_name(type));
        tree_add(&t, o, dot + 1, val);
    }
    char *buf = tree_pack(&t.u.data, &len);
    assert_refused(buf, len, want);
    free(buf);
    tree_free(&t);
}

/* ---- round trips and exact encodings ------------------------------------------------------ */

static void test_round_trip_every_type(void **state)
{
    (void)state;
    for (int type = 1; type < RLB_MSG_COUNT_; type++) {
        rlb_msg want, got;
        char err[256];
        size_t len;
        sample_msg((rlb_msg_type)type, &want);
        char *buf = pack_alloc(&want, &len);
        if (decode(buf, len, &got, err) != 0)
            fail_msg("%s: %s", rlb__msg_type_name((uint32_t)type), err);
        assert_msg_equal(&want, &got, buf, len);
        rlb__msg_free(&got);
        assert_null(got.arena);
        free(buf);
    }
}

/* {"ty": 6, "ver": 9}, {"ty": 18, "n": 2} and {"ty": 3, "code": -7, "text": "x"} worked out from the msgpack
 * spec: fixmap, fixstr keys, positive and negative fixints. */
static void test_exact_encodings(void **state)
{
    (void)state;
    static const uint8_t publish[] = {0x82, 0xa2, 't', 'y', 0x06, 0xa3, 'v', 'e', 'r', 0x09};
    static const uint8_t error[] = {0x83, 0xa2, 't', 'y', 0x03, 0xa4, 'c', 'o', 'd', 'e', 0xf9,
                                    0xa4, 't', 'e', 'x', 't', 0xa1, 'x'};
    uint8_t buf[64];
    size_t len;
    rlb_msg m = {.type = RLB_MSG_PUBLISH, .publish.version = 9};
    assert_int_equal(rlb__msg_pack(&m, buf, sizeof buf, &len), 0);
    assert_int_equal(len, sizeof publish);
    assert_memory_equal(buf, publish, sizeof publish);
    static const uint8_t unregistered[] = {0x82, 0xa2, 't', 'y', 0x12, 0xa1, 'n', 0x02};
    m = (rlb_msg){.type = RLB_MSG_UNREGISTERED, .unregistered.n_tensors = 2};
    assert_int_equal(rlb__msg_pack(&m, buf, sizeof buf, &len), 0);
    assert_int_equal(len, sizeof unregistered);
    assert_memory_equal(buf, unregistered, sizeof unregistered);
    m = (rlb_msg){.type = RLB_MSG_ERROR, .error = {.code = RLB_EPROTO, .text = "x"}};
    assert_int_equal(rlb__msg_pack(&m, buf, sizeof buf, &len), 0);
    assert_int_equal(len, sizeof error);
    assert_memory_equal(buf, error, sizeof error);
    /* A load of buffer 0 is written as before the buffer field existed (and read back as
     * buffer 0 from a peer that does not write it). */
    static const uint8_t load[] = {0x82, 0xa2, 't', 'y', 0x0b, 0xa3, 'v', 'e', 'r', 0x03};
    m = (rlb_msg){.type = RLB_MSG_LOAD, .load.version = 3};
    assert_int_equal(rlb__msg_pack(&m, buf, sizeof buf, &len), 0);
    assert_int_equal(len, sizeof load);
    assert_memory_equal(buf, load, sizeof load);
}

/* A generate request as another encoder may write it: keys in another order, a float64
 * temperature, an int top_p, a non-minimal uint64 n, nil for optional fields, a bin32
 * holding the tokens, unknown keys with nested values. */
static void test_foreign_encoding(void **state)
{
    (void)state;
    const int32_t toks[] = {7, -1, 65536};
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 5);
    msgpack_pack_str_with_body(&pk, "p", 1);
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 2);
    msgpack_pack_str_with_body(&pk, "sp", 2);
    msgpack_pack_nil(&pk);
    msgpack_pack_str_with_body(&pk, "t", 1);
    static const uint8_t bin32[] = {0xc6, 0, 0, 0, 12};
    msgpack_sbuffer_write(&sb, (const char *)bin32, sizeof bin32);
    msgpack_sbuffer_write(&sb, (const char *)toks, sizeof toks);
    msgpack_pack_str_with_body(&pk, "future", 6);
    msgpack_pack_map(&pk, 1);
    msgpack_pack_int(&pk, 3); /* a non-str key inside an ignored value is fine */
    msgpack_pack_array(&pk, 2);
    msgpack_pack_ext_with_body(&pk, "ab", 2, 5);
    msgpack_pack_double(&pk, 1.0);
    msgpack_pack_str_with_body(&pk, "sp", 2);
    msgpack_pack_map(&pk, 6);
    msgpack_pack_str_with_body(&pk, "topp", 4);
    msgpack_pack_int(&pk, 1);
    msgpack_pack_str_with_body(&pk, "temp", 4);
    msgpack_pack_double(&pk, 0.25);
    static const uint8_t n_u64[] = {0xa1, 'n', 0xcf, 0, 0, 0, 0, 0, 0, 0, 3};
    msgpack_sbuffer_write(&sb, (const char *)n_u64, sizeof n_u64);
    msgpack_pack_str_with_body(&pk, "max", 3);
    msgpack_pack_uint16(&pk, 300);
    msgpack_pack_str_with_body(&pk, "topk", 4);
    msgpack_pack_nil(&pk);
    msgpack_pack_str_with_body(&pk, "lp", 2);
    msgpack_pack_true(&pk);
    msgpack_pack_str_with_body(&pk, "id", 2);
    msgpack_pack_uint64(&pk, 1ull << 40);
    msgpack_pack_str_with_body(&pk, "ty", 2);
    msgpack_pack_int8(&pk, RLB_MSG_GENERATE);

    rlb_msg m;
    char err[256];
    if (decode(sb.data, sb.size, &m, err) != 0)
        fail_msg("%s", err);
    assert_int_equal(m.type, RLB_MSG_GENERATE);
    assert_int_equal(m.generate.request_id, 1ull << 40);
    assert_int_equal(m.generate.min_weight_version, 0);
    assert_int_equal(m.generate.sampling.n, 3);
    assert_int_equal(m.generate.sampling.max_tokens, 300);
    assert_true(m.generate.sampling.temperature == 0.25f);
    assert_true(m.generate.sampling.top_p == 1.0f);
    assert_int_equal(m.generate.sampling.top_k, 0);
    assert_true(m.generate.sampling.logprobs);
    assert_int_equal(m.generate.n_prompts, 1);
    assert_null(m.generate.prompts[0].sampling);
    assert_int_equal(m.generate.prompts[0].n_tokens, 3);
    for (size_t i = 0; i < 3; i++)
        assert_int_equal(rlb__msg_i32(m.generate.prompts[0].tokens, i), toks[i]);
    rlb__msg_free(&m);
    msgpack_sbuffer_destroy(&sb);
}

/* ---- the bounded writer ------------------------------------------------------------------- */

static void test_bounded_writer(void **state)
{
    (void)state;
    enum { GUARD = 32 };
    for (int type = 1; type < RLB_MSG_COUNT_; type++) {
        rlb_msg m;
        size_t size, len;
        sample_msg((rlb_msg_type)type, &m);
        assert_int_equal(rlb__msg_packed_size(&m, &size), 0);
        uint8_t *buf = malloc(size + GUARD), *ref = malloc(size);
        assert_non_null(buf);
        assert_non_null(ref);
        assert_int_equal(rlb__msg_pack(&m, ref, size, &len), 0);
        for (size_t cap = 0; cap <= size; cap++) {
            memset(buf, 0xab, size + GUARD);
            len = 12345;
            int rc = rlb__msg_pack(&m, buf, cap, &len);
            assert_int_equal(rc, cap == size ? 0 : RLB_ETOOBIG);
            assert_int_equal(len, cap == size ? size : 12345); /* untouched on failure */
            for (size_t i = cap; i < size + GUARD; i++)
                if (buf[i] != 0xab)
                    fail_msg("%s, cap %zu: byte %zu written", rlb__msg_type_name((uint32_t)type),
                             cap, i);
        }
        assert_memory_equal(buf, ref, size);
        free(buf);
        free(ref);
    }
}

/* Invalid messages are refused before any byte is written. */
static void test_pack_refuses_invalid(void **state)
{
    (void)state;
    uint8_t buf[1024];
    size_t len;
    rlb_msg m;

    memset(buf, 0xab, sizeof buf);
    sample_msg(RLB_MSG_GENERATE, &m);
    m.generate.sampling.top_p = 0;
    assert_int_equal(rlb__msg_pack(&m, buf, sizeof buf, &len), RLB_EINVAL);
    assert_int_equal(rlb__msg_packed_size(&m, &len), RLB_EINVAL);
    sample_msg(RLB_MSG_GENERATE, &m);
    rlb_msg_prompt bad_prompt = {.tokens = NULL, .n_tokens = 3};
    m.generate.prompts = &bad_prompt;
    m.generate.n_prompts = 1;
    assert_int_equal(rlb__msg_pack(&m, buf, sizeof buf, &len), RLB_EINVAL);
    sample_msg(RLB_MSG_ERROR, &m);
    m.error.text = NULL;
    assert_int_equal(rlb__msg_pack(&m, buf, sizeof buf, &len), RLB_EINVAL);
    sample_msg(RLB_MSG_REGISTER, &m);
    tensors[2].layout.entries = NULL;
    assert_int_equal(rlb__msg_pack(&m, buf, sizeof buf, &len), RLB_EINVAL);
    sample_msg(RLB_MSG_HELLO, &m);
    m.type = (rlb_msg_type)RLB_MSG_COUNT_;
    assert_int_equal(rlb__msg_pack(&m, buf, sizeof buf, &len), RLB_EINVAL);
    m.type = (rlb_msg_type)0;
    assert_int_equal(rlb__msg_pack(&m, buf, sizeof buf, &len), RLB_EINVAL);
    for (size_t i = 0; i < sizeof buf; i++)
        assert_int_equal(buf[i], 0xab);
}

/* ---- malformed bytes ---------------------------------------------------------------------- */

static void test_every_truncation(void **state)
{
    (void)state;
    for (int type = 1; type < RLB_MSG_COUNT_; type++) {
        rlb_msg m;
        size_t len;
        sample_msg((rlb_msg_type)type, &m);
        char *buf = pack_alloc(&m, &len);
        for (size_t cut = 0; cut < len; cut++) {
            /* a copy of exactly `cut` bytes, so ASan sees any read past the end */
            char *part = malloc(cut ? cut : 1);
            assert_non_null(part);
            memcpy(part, buf, cut);
            assert_refused(part, cut, cut ? "malformed msgpack" : "empty message");
            free(part);
        }
        free(buf);
    }
}

/* A count or length far beyond the buffer, at the top, as an unknown key's value and as a
 * known field's value: refused at once, nothing allocated for it. */
static void test_oversized_counts(void **state)
{
    (void)state;
    static const struct {
        const char *bytes;
        size_t n;
    } heads[] = {
        {"\xdd\xff\x00\x00\x00", 5}, /* array32 */
        {"\xdf\xff\x00\x00\x00", 5}, /* map32 */
        {"\xc6\xff\x00\x00\x00", 5}, /* bin32 */
        {"\xdb\xff\x00\x00\x00", 5}, /* str32 */
        {"\xc9\xff\x00\x00\x00\x01", 6}, /* ext32 */
        {"\xdc\xff\xff", 3}, {"\xde\xff\xff", 3}, {"\xc5\xff\xff", 3}, {"\xda\xff\xff", 3},
        {"\xc8\xff\xff\x01", 4}, {"\xc4\xff", 2}, {"\xd9\xff", 2}, {"\xc7\xff\x01", 3},
        {"\x9f", 1}, {"\x8f", 1}, {"\xbf", 1}, {"\xd8\x01", 2},
    };
    /* {"ty": 9, "id": 1, "zz": <head>} and {"ty": 9, "id": 1, "p": <head>} */
    static const char unknown_key[] = "\x83\xa2ty\x09\xa2id\x01\xa2zz";
    static const char known_key[] = "\x83\xa2ty\x09\xa2id\x01\xa1p";
    for (size_t i = 0; i < N_OF(heads); i++) {
        char buf[64];
        assert_refused(heads[i].bytes, heads[i].n, "malformed msgpack");
        memcpy(buf, unknown_key, sizeof unknown_key - 1);
        memcpy(buf + sizeof unknown_key - 1, heads[i].bytes, heads[i].n);
        assert_refused(buf, sizeof unknown_key - 1 + heads[i].n, "malformed msgpack");
        memcpy(buf, known_key, sizeof known_key - 1);
        memcpy(buf + sizeof known_key - 1, heads[i].bytes, heads[i].n);
        assert_refused(buf, sizeof known_key - 1 + heads[i].n, "malformed msgpack");
    }
    /* {"ty": 4, "tens": [{} x 4000]}: the count fits the bytes, but 4000 tensors of over
     * 200 bytes each exceed the arena a 4013-byte message may take: refused before the
     * memory is taken. */
    size_t n = 4000, len = 13 + n;
    char *buf = malloc(len);
    assert_non_null(buf);
    memcpy(buf, "\x82\xa2ty\x04\xa4tens\xdc\x0f\xa0", 13); /* array16 of 4000 */
    memset(buf + 13, 0x80, n);                                  /* empty maps */
    assert_true(RLB_PROTO_ARENA_FACTOR * len + RLB_PROTO_ARENA_SLACK < n * sizeof(rlb_msg_tensor));
    assert_refused(buf, len, "register.tens: 4000 elements would take more memory");
    free(buf);
}

/* Nesting: a chain of one-element arrays under an unknown key of a sleep message. The map
 * is level 1, so 15 arrays reach level 16 (accepted), 16 arrays level 17 (refused). */
static void test_deep_nesting(void **state)
{
    (void)state;
    static const size_t depths[] = {15, 16, 1000, 1000000};
    for (size_t k = 0; k < N_OF(depths); k++) {
        size_t arrays = depths[k], len = 11 + arrays + 1;
        char *buf = malloc(len);
        assert_non_null(buf);
        memcpy(buf, "\x82\xa2ty\x0d\xa5" "extra", 11);
        memset(buf + 11, 0x91, arrays);
        buf[len - 1] = (char)0xc0;
        if (arrays < RLB_PROTO_MAX_DEPTH) {
            rlb_msg m;
            char err[256];
            if (decode(buf, len, &m, err) != 0)
                fail_msg("%s", err);
            assert_int_equal(m.type, RLB_MSG_SLEEP);
            rlb__msg_free(&m);
        } else {
            assert_refused(buf, len, "nested deeper than 16");
        }
        free(buf);
    }
}

static void test_object_limit(void **state)
{
    (void)state;
    /* {"ty": 13, "big": [nil x n]}: 5 objects besides the n elements */
    static const size_t counts[] = {RLB_PROTO_MAX_OBJECTS - 5, RLB_PROTO_MAX_OBJECTS - 4};
    for (size_t k = 0; k < N_OF(counts); k++) {
        size_t n = counts[k], len = 9 + 5 + n;
        uint8_t *buf = malloc(len);
        assert_non_null(buf);
        memcpy(buf, "\x82\xa2ty\x0d\xa3" "big", 9);
        uint8_t head[5] = {0xdd, (uint8_t)(n >> 24), (uint8_t)(n >> 16), (uint8_t)(n >> 8),
                           (uint8_t)n};
        memcpy(buf + 9, head, 5);
        memset(buf + 14, 0xc0, n);
        if (k == 0) {
            rlb_msg m;
            char err[256];
            if (decode(buf, len, &m, err) != 0)
                fail_msg("%s", err);
            rlb__msg_free(&m);
        } else {
            assert_refused(buf, len, "more than 4194304 objects");
        }
        free(buf);
    }
}

static void test_structural_errors(void **state)
{
    (void)state;
    assert_refused(NULL, 0, "empty message");
    assert_refused("\xc1", 1, "byte 0xc1 is not a msgpack type");
    assert_refused("\x92\x01\x02", 3, "a message is a map");
    assert_refused("\x80", 1, "ty: missing");
    assert_refused("\x81\xa2ty\x0d\x00", 6, "1 bytes after the message");
    assert_refused("\x82\xa2ty\x0d\xa2ty\x0d", 9, "ty: appears twice");
    assert_refused("\x81\xa2ty\x63", 5, "ty: unknown message type 99");
    assert_refused("\x81\xa2ty\x00", 5, "ty: unknown message type 0");
    assert_refused("\x81\xa2ty\xa1x", 6, "ty: expected a non-negative int, got str");
    assert_refused("\x82\xa2ty\x0d\x01\x02", 7, "sleep: keys are str, got int");
    assert_refused("\x82\xa2ty\x06\xa3ver\xc0", 10, "publish.ver: expected a non-negative int, "
                                                  "got nil");
    /* a known key twice: the value would be ambiguous */
    assert_refused("\x83\xa2ty\x06\xa3ver\x01\xa3ver\x02", 15, "publish.ver: appears twice");
}

/* ---- every field: wrong types, missing, unknown, nil ------------------------------------- */

/* The struct a field of struct `s` under `key` holds (maps and arrays of maps), from
 * proto.h's comments. */
static const char *child_struct(const char *s, const char *key)
{
    static const char *const links[][3] = {
        {"register", "tens", "tensor"},   {"tensor", "lay", "layout"},
        {"tensor", "mem", "mem"},         {"layout", "ent", "entry"},
        {"generate", "sp", "sampling"},   {"generate", "p", "prompt"},
        {"prompt", "sp", "sampling"},     {"result", "s", "sample"},
        {"stats_reply", "s", "stat"},     {"unregister", "names", "name"},
        {"register", "lora", "lora"},
    };
    for (size_t i = 0; s && i < N_OF(links); i++)
        if (strcmp(links[i][0], s) == 0 && strcmp(links[i][1], key) == 0)
            return links[i][2];
    return NULL;
}

/* The required keys of each struct, from proto.h's comments ("ty" for every message). */
static bool is_required(const char *s, const char *key, bool top)
{
    static const char *const req[][2] = {
        {"hello", "abi"},   {"hello", "role"},     {"welcome", "abi"},  {"error", "code"},
        {"error", "text"},  {"lora", "w"},        {"tensor", "name"},  {"tensor", "dt"},
        {"tensor", "shape"}, {"tensor", "lay"},    {"tensor", "mem"},   {"layout", "k"},
        {"entry", "numel"}, {"mem", "k"},          {"mem", "len"},      {"name", "name"},
        {"publish", "ver"}, {"load", "ver"},       {"synced", "ver"},   {"aborted", "ver"},
        {"loaded", "ver"},  {"generate", "id"},    {"generate", "sp"},  {"generate", "p"},
        {"sampling", "n"},  {"sampling", "max"},   {"sampling", "temp"}, {"sampling", "topp"},
        {"prompt", "t"},    {"result", "id"},      {"sample", "fin"},   {"sample", "ver"},
        {"stat", "name"},   {"lora", "r"},
    };
    if (top && strcmp(key, "ty") == 0)
        return true;
    for (size_t i = 0; i < N_OF(req); i++)
        if (strcmp(req[i][0], s) == 0 && strcmp(req[i][1], key) == 0)
            return true;
    return false;
}

typedef struct walk_ctx {
    tree *t;
    rlb_msg_type type;
    size_t visited; /* how many objects the visitor saw */
} walk_ctx;

typedef void (*visit_fn)(walk_ctx *c, msgpack_object *slot, const char *path,
                         const char *sname, bool top);

/* Calls fn on every object below the root map, with its path ("register.tens[0].dt") and,
 * for maps of a known struct, the struct's name; top is set for the root's own values. */
static void walk(walk_ctx *c, msgpack_object *o, const char *path, const char *sname,
                 visit_fn fn, bool top)
{
    char sub[256];
    if (o->type == MSGPACK_OBJECT_MAP) {
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            msgpack_object_kv *kv = &o->via.map.ptr[i];
            char key[32];
            snprintf(key, sizeof key, "%.*s", (int)kv->key.via.str.size, kv->key.via.str.ptr);
            if (snprintf(sub, sizeof sub, "%s.%s", path, key) >= (int)sizeof sub)
                fail_msg("path %s.%s longer than the walk's buffer", path, key);
            const char *child = child_struct(sname, key);
            fn(c, &kv->val, sub, kv->val.type == MSGPACK_OBJECT_MAP ? child : NULL, top);
            if (kv->val.type == MSGPACK_OBJECT_ARRAY) {
                for (uint32_t j = 0; j < kv->val.via.array.size; j++) {
                    msgpack_object *el = &kv->val.via.array.ptr[j];
                    char elem[sizeof sub + 16];
                    snprintf(elem, sizeof elem, "%s[%u]", sub, j);
                    fn(c, el, elem, child, false);
                    walk(c, el, elem, child, fn, false);
                }
            } else {
                walk(c, &kv->val, sub, child, fn, false);
            }
        }
    }
}

/* Runs fn over the sample message of `type`; fn must have tried every top-level key. */
static void walk_message(rlb_msg_type type, visit_fn fn)
{
    tree t;
    walk_ctx c = {.t = &t, .type = type};
    tree_load(&t, type);
    const char *name = rlb__msg_type_name(type);
    fn(&c, &t.u.data, name, name, false);
    walk(&c, &t.u.data, name, name, fn, true);
    assert_true(c.visited >= t.u.data.via.map.size);
    tree_free(&t);
}

/* Each value replaced by one of another type (a str, or an int where a str was). */
static void visit_wrong_type(walk_ctx *c, msgpack_object *slot, const char *path,
                             const char *sname, bool top)
{
    (void)sname;
    if (slot == &c->t->u.data)
        return;
    msgpack_object saved = *slot;
    *slot = saved.type == MSGPACK_OBJECT_STR ? obj_uint(7) : obj_str("x", 1);
    size_t len;
    char *buf = tree_pack(&c->t->u.data, &len), want[300];
    const char *dot = strchr(path, '.');
    if (top && strcmp(dot + 1, "ty") == 0)
        snprintf(want, sizeof want, "ty: expected");
    else
        snprintf(want, sizeof want, "%s: expected", path);
    rlb_msg m;
    char err[256];
    int rc = decode(buf, len, &m, err);
    if (rc != RLB_EPROTO || strncmp(err, want, strlen(want)) != 0)
        fail_msg("%s replaced: rc %d, \"%s\"", path, rc, err);
    free(buf);
    *slot = saved;
    c->visited++;
}

static void test_wrong_types(void **state)
{
    (void)state;
    for (int type = 1; type < RLB_MSG_COUNT_; type++)
        walk_message((rlb_msg_type)type, visit_wrong_type);
}

/* Each key of each struct removed in turn: a required one must be reported missing by its
 * path; an optional one reads back as zero, so the message re-encodes to the edited bytes
 * (or fails a consistency check, which needs it). */
static void visit_remove_keys(walk_ctx *c, msgpack_object *slot, const char *path,
                              const char *sname, bool top)
{
    (void)top;
    if (!sname || slot->type != MSGPACK_OBJECT_MAP)
        return;
    bool root = slot == &c->t->u.data;
    msgpack_object saved = *slot;
    for (uint32_t i = 0; i < saved.via.map.size; i++) {
        msgpack_object_kv kv[64];
        char key[32], want[300], err[256];
        size_t len;
        rlb_msg m;
        uint32_t n = 0;
        for (uint32_t j = 0; j < saved.via.map.size; j++)
            if (j != i)
                kv[n++] = saved.via.map.ptr[j];
        slot->via.map.ptr = kv;
        slot->via.map.size = n;
        snprintf(key, sizeof key, "%.*s", (int)saved.via.map.ptr[i].key.via.str.size,
                 saved.via.map.ptr[i].key.via.str.ptr);
        char *buf = tree_pack(&c->t->u.data, &len);
        int rc = decode(buf, len, &m, err);
        if (is_required(sname, key, root)) {
            if (root && strcmp(key, "ty") == 0)
                snprintf(want, sizeof want, "ty: missing (the message type)");
            else
                snprintf(want, sizeof want, "%s.%s: missing", path, key);
            if (rc != RLB_EPROTO || strcmp(err, want) != 0)
                fail_msg("without %s.%s: rc %d, \"%s\"", path, key, rc, err);
        } else if (rc == 0) {
            size_t len2;
            char *again = pack_alloc(&m, &len2);
            assert_int_equal(len, len2);
            assert_memory_equal(buf, again, len);
            free(again);
            rlb__msg_free(&m);
        } else if (rc != RLB_EPROTO) {
            fail_msg("without %s.%s: rc %d", path, key, rc);
        }
        free(buf);
        *slot = saved;
        c->visited++;
    }
}

static void test_missing_fields(void **state)
{
    (void)state;
    for (int type = 1; type < RLB_MSG_COUNT_; type++)
        walk_message((rlb_msg_type)type, visit_remove_keys);
}

/* An unknown key with a nested value added to every struct: the message decodes to the
 * same contents. */
static void test_unknown_keys_ignored(void **state)
{
    (void)state;
    static msgpack_object nested[3];
    nested[0] = obj_str("later", 5);
    nested[1] = obj_f64(2.5);
    nested[2] = (msgpack_object){.type = MSGPACK_OBJECT_EXT,
                                 .via.ext = {.type = 4, .size = 2, .ptr = "ab"}};
    for (int type = 1; type < RLB_MSG_COUNT_; type++) {
        tree t;
        rlb_msg want, got;
        char err[256];
        size_t len;
        tree_load(&t, (rlb_msg_type)type);
        tree_add(&t, &t.u.data, "zz_future", obj_array(nested, 3));
        static const char *const inner[] = {"tens[0]", "tens[2].lay", "tens[1].mem",
                                            "tens[2].lay.ent[1]", "sp", "p[1].sp", "s[0]",
                                            "names[0]"};
        for (size_t i = 0; i < N_OF(inner); i++) {
            msgpack_object *o = tree_at(&t.u.data, inner[i]);
            if (o && o->type == MSGPACK_OBJECT_MAP)
                tree_add(&t, o, "zz", obj_uint(1));
        }
        char *buf = tree_pack(&t.u.data, &len);
        if (decode(buf, len, &got, err) != 0)
            fail_msg("%s: %s", rlb__msg_type_name((uint32_t)type), err);
        sample_msg((rlb_msg_type)type, &want);
        assert_msg_equal(&want, &got, buf, len);
        rlb__msg_free(&got);
        free(buf);
        tree_free(&t);
    }
}

static void test_nil_is_absent(void **state)
{
    (void)state;
    static const msgpack_object nil = {.type = MSGPACK_OBJECT_NIL};
    tree t;
    rlb_msg m;
    char err[256];
    size_t len;
    tree_load(&t, RLB_MSG_GENERATE);
    *tree_at(&t.u.data, "sp.topk") = nil;
    *tree_at(&t.u.data, "minv") = nil;
    char *buf = tree_pack(&t.u.data, &len);
    assert_int_equal(decode(buf, len, &m, err), 0);
    assert_int_equal(m.generate.sampling.top_k, 0);
    assert_int_equal(m.generate.min_weight_version, 0);
    assert_int_equal(m.generate.sampling.n, 4);
    rlb__msg_free(&m);
    free(buf);
    tree_free(&t);
    refuse_edit(RLB_MSG_GENERATE, "sp.n", nil, "generate.sp.n: expected a non-negative int, "
                                               "got nil");
}

/* ---- values out of range and inconsistent fields ----------------------------------------- */

static void test_value_checks(void **state)
{
    (void)state;
    static const uint8_t six[6] = {0};
    static const uint8_t two_floats[8] = {0};
    static const uint8_t short_handle[63] = {1};
    static msgpack_object nine[9], huge[2], negative[1];
    for (size_t i = 0; i < 9; i++)
        nine[i] = obj_uint(1);
    huge[0] = huge[1] = obj_uint(1ull << 40);
    negative[0] = obj_int(-1);

    refuse_edit(RLB_MSG_GENERATE, "sp.n", obj_uint(0), "generate.sp.n: at least 1");
    refuse_edit(RLB_MSG_GENERATE, "sp.max", obj_uint(0), "generate.sp.max: at least 1");
    refuse_edit(RLB_MSG_GENERATE, "sp.temp", obj_f64(-1), "generate.sp.temp: must be >= 0");
    refuse_edit(RLB_MSG_GENERATE, "sp.topp", obj_f64(0), "generate.sp.topp: must be in (0, 1]");
    refuse_edit(RLB_MSG_GENERATE, "sp.topp", obj_f64(1.5), "generate.sp.topp: must be in");
    refuse_edit(RLB_MSG_GENERATE, "p[1].sp.topp", obj_f64(-0.5),
                "generate.p[1].sp.topp: must be in");
    refuse_edit(RLB_MSG_GENERATE, "sp.temp", obj_f64(1e300), "generate.sp.temp: 1e+300 is "
                                                             "out of the f32 range");
    refuse_edit(RLB_MSG_GENERATE, "sp.temp", obj_f64(NAN), "generate.sp.temp: not a finite");
    refuse_edit(RLB_MSG_GENERATE, "sp.temp", obj_f64(INFINITY), "generate.sp.temp: not a finite");
    refuse_edit(RLB_MSG_GENERATE, "p[0].t", obj_bin(six, 6),
                "generate.p[0].t: 6 bytes, not a multiple of 4");
    refuse_edit(RLB_MSG_GENERATE, "p[2].t", obj_bin(six, 0),
                "generate.p[2].t: a prompt has at least one token");
    refuse_edit(RLB_MSG_GENERATE, "sp.stop", obj_bin(six, 6), "generate.sp.stop: 6 bytes");
    refuse_edit(RLB_MSG_GENERATE, "id", obj_uint(0), "generate.id: request ids start at 1");
    refuse_edit(RLB_MSG_GENERATE, "p", obj_array(NULL, 0), "generate.p: at least one prompt");
    refuse_edit(RLB_MSG_RESULT, "s[0].lp", obj_bin(two_floats, 8),
                "result.s[0].lp: 2 logprobs for 3 tokens");
    refuse_edit(RLB_MSG_RESULT, "s[2].fin", obj_uint(3), "result.s[2].fin: 3 is above 2");
    refuse_edit(RLB_MSG_REGISTER, "tens[0].dt", obj_uint(99), "register.tens[0].dt: 99 is "
                                                              "above 7");
    refuse_edit(RLB_MSG_REGISTER, "tens[1].lay.rank", obj_uint(4),
                "register.tens[1].lay.rank: 4 is not below world 4");
    refuse_edit(RLB_MSG_REGISTER, "tens[0].shape", obj_array(huge, 2),
                "register.tens[0].shape: element count overflows 64 bits");
    refuse_edit(RLB_MSG_REGISTER, "tens[0].shape", obj_array(nine, 9),
                "register.tens[0].shape: 9 dimensions, at most 8");
    refuse_edit(RLB_MSG_REGISTER, "tens[0].shape", obj_array(negative, 1),
                "register.tens[0].shape[0]: expected a non-negative int, got negative int");
    refuse_edit(RLB_MSG_REGISTER, "tens[0].mem.len", obj_uint(130),
                "register.tens[0].mem.len: 130 bytes, but this rank's shard holds 128");
    /* FSDP2 rank 3 of 4 over 10 rows holds 1 row; over 9 rows (c = 3) it holds none */
    refuse_edit(RLB_MSG_REGISTER, "tens[1].shape[0]", obj_uint(9),
                "register.tens[1].mem.len: 24 bytes, but this rank's shard holds 0");
    refuse_edit(RLB_MSG_REGISTER, "tens[1].mem.h", obj_bin(short_handle, 63),
                "register.tens[1].mem.h: 63 bytes, must be 64");
    refuse_edit(RLB_MSG_REGISTER, "tens[0].mem.h", obj_bin(tensors[1].mem.ipc_handle, 64),
                "register.tens[0].mem.h: only CUDA_IPC memory has an IPC handle");
    refuse_edit(RLB_MSG_REGISTER, "tens[1].mem.k", obj_uint(RLB_MEM_HOST_SHM),
                "register.tens[1].mem.h: only CUDA_IPC");
    refuse_edit(RLB_MSG_REGISTER, "tens[0].mem.off", obj_uint(UINT64_MAX),
                "register.tens[0].mem.len: offset + length overflows");
    refuse_edit(RLB_MSG_REGISTER, "tens[2].lay.ent[0].numel", obj_uint(13),
                "register.tens[2].lay.ent[0].numel: 13 does not match the shape's 12");
    refuse_edit(RLB_MSG_REGISTER, "tens[2].lay.ent[1].numel", obj_uint(3),
                "register.tens[2].lay.ent[2]: starts at element 15, not a multiple of align 8");
    refuse_edit(RLB_MSG_REGISTER, "tens[2].shape[0]", obj_uint(34),
                "register.tens[2].shape: 34 elements, but the entries cover 32");
    refuse_edit(RLB_MSG_REGISTER, "tens[2].lay.world", obj_uint(3),
                "register.tens[2].shape: 32 elements do not split in 3 equal chunks");
    refuse_edit(RLB_MSG_REGISTER, "tens[2].lay.ent[1].name", obj_str("pad", 3),
                "register.tens[2].lay.ent[1].name: a padding entry has no name");
    refuse_edit(RLB_MSG_REGISTER, "tens[0].name", obj_str("a\0b", 3),
                "register.tens[0].name: contains a NUL byte");
    refuse_edit(RLB_MSG_REGISTER, "tens[0].name", obj_str("", 0),
                "register.tens[0].name: missing or empty");
    /* A register carries tensors, adapter declarations or both, never nothing. */
    assert_refused("\x81\xa2ty\x04", 5, "register.tens: at least one tensor or adapter");
    refuse_edit(RLB_MSG_REGISTER, "lora[0].r", obj_str("x", 1),
                "register.lora[0].r: expected a non-negative int, got str");
    refuse_edit(RLB_MSG_HELLO, "tp", obj_uint(4), "hello.tp: 4 is not below tp size 4");
    refuse_edit(RLB_MSG_HELLO, "rank", obj_uint(1ull << 32), "hello.rank: 4294967296 is above "
                                                             "4294967295");
    refuse_edit(RLB_MSG_HELLO, "role", obj_uint(3), "hello.role: 3 is above 2");
    refuse_edit(RLB_MSG_ERROR, "code", obj_uint(5), "error.code: 5 is not an error code");
    refuse_edit(RLB_MSG_ERROR, "code", obj_int(-(1ll << 40)), "error.code: out of the int32");
    refuse_edit(RLB_MSG_ABORTED, "code", obj_uint(0), "aborted.code: 0 is not an error code");
    refuse_edit(RLB_MSG_LOADED, "code", obj_uint(1), "loaded.code: 1 is not 0 or an error");
    refuse_edit(RLB_MSG_LOAD, "buf", obj_uint(2), "load.buf: 2 is not a weight buffer");
    refuse_edit(RLB_MSG_LOAD, "buf", obj_int(-1), "load.buf: expected a non-negative int");
    refuse_edit(RLB_MSG_LOADED, "buf", obj_uint(7), "loaded.buf: 7 is not a weight buffer");
    refuse_edit(RLB_MSG_PUBLISH, "ver", obj_uint(0), "publish.ver: versions start at 1");
    static const uint8_t zero_handle[RLB_PROTO_HANDLE_BYTES], zero_uuid[RLB_PROTO_UUID_BYTES];
    refuse_edit(RLB_MSG_PUBLISH, "evu", obj_bin(zero_uuid, sizeof zero_uuid),
                "publish.evu: an event and the uuid of its GPU go together");
    refuse_edit(RLB_MSG_PUBLISH, "ev", obj_bin(zero_handle, sizeof zero_handle),
                "publish.ev: an event and the uuid of its GPU go together");
    refuse_edit(RLB_MSG_PUBLISH, "ev", obj_bin(zero_uuid, sizeof zero_uuid),
                "publish.ev: 16 bytes, must be 64");
    refuse_edit(RLB_MSG_SYNCED, "ms", obj_f64(-1), "synced.ms: negative time");
    refuse_edit(RLB_MSG_STATS_REPLY, "s[1].v", obj_f64(NAN), "stats_reply.s[1].v: not a finite");
}

/* ---- random and mutated bytes ------------------------------------------------------------- */

static void test_random_bytes(void **state)
{
    (void)state;
    uint64_t seed = 1;
    for (int round = 0; round < 3000; round++) {
        size_t len = splitmix(&seed) % 300;
        uint8_t *buf = malloc(len ? len : 1);
        assert_non_null(buf);
        for (size_t i = 0; i < len; i++)
            buf[i] = (uint8_t)splitmix(&seed);
        if (round % 2) /* half of them start like a message, to get past the first byte */
            memcpy(buf, "\x84\xa2ty", len < 4 ? len : 4);
        rlb_msg m;
        char err[256];
        assert_int_equal(decode(buf, len, &m, err), RLB_EPROTO);
        free(buf);
    }
}

/* Valid messages with a few bytes changed: refused, or decoded into a message that
 * re-encodes to bytes that decode to the same encoding again. */
static void test_mutated_messages(void **state)
{
    (void)state;
    uint64_t seed = 7;
    size_t decoded = 0, refused = 0;
    for (int type = 1; type < RLB_MSG_COUNT_; type++) {
        rlb_msg m;
        size_t len;
        sample_msg((rlb_msg_type)type, &m);
        char *orig = pack_alloc(&m, &len);
        for (int round = 0; round < 400; round++) {
            char *buf = malloc(len), err[256];
            assert_non_null(buf);
            memcpy(buf, orig, len);
            int edits = 1 + (int)(splitmix(&seed) % 3);
            for (int e = 0; e < edits; e++)
                buf[splitmix(&seed) % len] = (char)splitmix(&seed);
            int rc = decode(buf, len, &m, err);
            if (rc == 0) {
                size_t len1, len2;
                rlb_msg again;
                char *p1 = pack_alloc(&m, &len1);
                assert_int_equal(decode(p1, len1, &again, err), 0);
                char *p2 = pack_alloc(&again, &len2);
                assert_int_equal(len1, len2);
                assert_memory_equal(p1, p2, len1);
                rlb__msg_free(&again);
                rlb__msg_free(&m);
                free(p1);
                free(p2);
                decoded++;
            } else {
                assert_int_equal(rc, RLB_EPROTO);
                refused++;
            }
            free(buf);
        }
        free(orig);
    }
    assert_true(decoded > 0 && refused > 0); /* both paths were taken */
}

/* ---- error replies ------------------------------------------------------------------------- */

static void test_error_reply(void **state)
{
    (void)state;
    tree t;
    size_t len;
    char err[256];
    rlb_msg m, reply, back;
    tree_load(&t, RLB_MSG_GENERATE);
    *tree_at(&t.u.data, "sp.topp") = obj_f64(2);
    char *buf = tree_pack(&t.u.data, &len);
    int rc = decode(buf, len, &m, err);
    assert_int_equal(rc, RLB_EPROTO);
    rlb__msg_error_reply(buf, len, rc, err, &reply);
    assert_int_equal(reply.type, RLB_MSG_ERROR);
    assert_int_equal(reply.error.code, RLB_EPROTO);
    assert_int_equal(reply.error.request_id, 77);
    assert_int_equal(reply.error.in_reply_to, RLB_MSG_GENERATE);
    assert_string_equal(reply.error.text, err);
    char *packed = pack_alloc(&reply, &len), err2[256];
    assert_int_equal(decode(packed, len, &back, err2), 0);
    assert_msg_equal(&reply, &back, NULL, 0);
    rlb__msg_free(&back);
    rlb__msg_free(&reply); /* owns nothing: harmless */
    free(packed);
    free(buf);
    tree_free(&t);

    /* cut short after the id: the id is still found */
    sample_msg(RLB_MSG_GENERATE, &m);
    buf = pack_alloc(&m, &len);
    rc = decode(buf, len - 3, &m, err);
    rlb__msg_error_reply(buf, len - 3, rc, err, &reply);
    assert_int_equal(reply.error.request_id, 77);
    assert_int_equal(reply.error.in_reply_to, RLB_MSG_GENERATE);
    free(buf);

    /* nothing readable: no id, unknown type, the code's name as text */
    rlb__msg_error_reply("\xc1\xc1", 2, RLB_EPROTO, "", &reply);
    assert_int_equal(reply.error.request_id, 0);
    assert_int_equal(reply.error.in_reply_to, 0);
    assert_string_equal(reply.error.text, rlb_strerror(RLB_EPROTO));
    rlb__msg_error_reply("\x81\xa2ty\x63", 5, RLB_EPROTO, "x", &reply);
    assert_int_equal(reply.error.in_reply_to, 0);
    rlb__msg_error_reply(NULL, 0, RLB_EPROTO, "x", &reply);
    assert_int_equal(reply.error.request_id, 0);
}

/* ---- the fuzz corpus ----------------------------------------------------------------------- */

static int write_corpus(const char *dir)
{
    for (int type = 1; type < RLB_MSG_COUNT_; type++) {
        rlb_msg m;
        char path[4096];
        size_t len;
        sample_msg((rlb_msg_type)type, &m);
        if (rlb__msg_packed_size(&m, &len) != 0)
            return 1;
        char *buf = malloc(len);
        if (!buf || rlb__msg_pack(&m, buf, len, &len) != 0)
            return 1;
        snprintf(path, sizeof path, "%s/%02d-%s.msgpack", dir, type,
                 rlb__msg_type_name((uint32_t)type));
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(buf, 1, len, f) != len || fclose(f) != 0) {
            fprintf(stderr, "test_proto: cannot write %s: %s\n", path, strerror(errno));
            return 1;
        }
        free(buf);
    }
    return 0;
}

/* The committed corpus holds one valid message of each type. */
static void test_corpus_decodes(void **state)
{
    (void)state;
    DIR *d = opendir(RLB_PROTO_CORPUS);
    bool seen[RLB_MSG_COUNT_] = {false};
    struct dirent *e;
    if (!d)
        fail_msg("cannot open %s", RLB_PROTO_CORPUS);
    while ((e = readdir(d))) {
        char path[4096], err[256];
        static char buf[1 << 16];
        rlb_msg m;
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "%s/%s", RLB_PROTO_CORPUS, e->d_name);
        FILE *f = fopen(path, "rb");
        assert_non_null(f);
        size_t len = fread(buf, 1, sizeof buf, f);
        fclose(f);
        if (decode(buf, len, &m, err) != 0)
            fail_msg("%s: %s", e->d_name, err);
        seen[m.type] = true;
        rlb__msg_free(&m);
    }
    closedir(d);
    for (int type = 1; type < RLB_MSG_COUNT_; type++)
        if (!seen[type])
            fail_msg("no %s in the corpus", rlb__msg_type_name((uint32_t)type));
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--write-corpus") == 0)
        return write_corpus(argv[2]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_every_type),
        cmocka_unit_test(test_exact_encodings),
        cmocka_unit_test(test_foreign_encoding),
        cmocka_unit_test(test_bounded_writer),
        cmocka_unit_test(test_pack_refuses_invalid),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_oversized_counts),
        cmocka_unit_test(test_deep_nesting),
        cmocka_unit_test(test_object_limit),
        cmocka_unit_test(test_structural_errors),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_missing_fields),
        cmocka_unit_test(test_unknown_keys_ignored),
        cmocka_unit_test(test_nil_is_absent),
        cmocka_unit_test(test_value_checks),
        cmocka_unit_test(test_random_bytes),
        cmocka_unit_test(test_mutated_messages),
        cmocka_unit_test(test_error_reply),
        cmocka_unit_test(test_corpus_decodes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
