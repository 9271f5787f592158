/* registry.c: the tensors each trainer rank registered, and the reshard plan built from
 * them (DESIGN §4, §5 step 1).
 *
 * A REGISTER batch is checked tensor by tensor before anything is kept, and refused as a
 * whole with an ERROR naming the first bad tensor:
 *   - its memory: a HOST_SHM reference to a segment the rank passed (the loop holds the
 *     batch until its segments arrived, as segmsg.h asks, or RLB_PEER_TIMEOUT_MS passed),
 *     sealed, inside that segment, exactly as long as its layout says;
 *   - the model: the tensor is checked against the parameter list by the very functions
 *     that later build the source (model/source.h), on a scratch source whose other ranks'
 *     shards are stand-ins, so name, shape, dtype and FSDP metadata get the planner's own
 *     errors;
 *   - the other ranks: the same name registered elsewhere must agree on dtype, shape,
 *     layout kind and FSDP world, and no FSDP shard may be claimed twice.
 * The plan is built once, when every trainer rank is connected and every parameter has a
 * placement (from the trainers, or from the bridge's base checkpoint: bridge/base.c), and
 * thrown away when a registration changes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bridge/bridge_int.h"
#include "common/env.h"
#include "common/log.h"

#define ERRLEN 256

static uint64_t shape_numel(const int64_t *shape, uint32_t ndim)
{
    uint64_t n = 1;
    for (uint32_t d = 0; d < ndim; d++)
        n *= (uint64_t)shape[d];
    return n;
}

static void tensor_free(br_tensor *t)
{
    free(t->name);
    for (uint64_t e = 0; e < t->n_entries; e++)
        free((char *)t->entries[e].name);
    free(t->entries);
    memset(t, 0, sizeof(*t));
}

/* Copies the message's tensor into t (names owned). Returns 0 or RLB_ENOMEM. */
static int tensor_copy(br_tensor *t, const rlb_msg_tensor *m)
{
    memset(t, 0, sizeof(*t));
    t->name = strdup(m->name);
    t->dtype = m->dtype;
    t->ndim = m->ndim;
    for (uint32_t d = 0; d < m->ndim; d++)
        t->shape[d] = (int64_t)m->shape[d];
    t->kind = m->layout.kind;
    t->frank = m->layout.rank;
    t->fworld = m->layout.world;
    t->unit = m->layout.unit;
    t->seg = m->mem.fd_index;
    t->offset = m->mem.offset;
    t->length = m->mem.length;
    t->mem = m->mem.kind;
    memcpy(t->uuid, m->mem.device_uuid, sizeof(t->uuid));
    memcpy(t->ipc, m->mem.ipc_handle, sizeof(t->ipc));
    if (!t->name)
        return RLB_ENOMEM;
    if (t->kind != RLB_LAYOUT_FSDP1)
        return 0;
    t->entries = calloc(m->layout.n_entries ? m->layout.n_entries : 1, sizeof(*t->entries));
    if (!t->entries)
        return RLB_ENOMEM;
    t->n_entries = m->layout.n_entries;
    for (uint32_t e = 0; e < m->layout.n_entries; e++) {
        const rlb_msg_flat_entry *me = &m->layout.entries[e];
        rlb_flat_entry *fe = &t->entries[e];
        fe->numel = me->numel;
        if (me->padding || !me->name)
            continue;
        fe->name = strdup(me->name);
        if (!fe->name)
            return RLB_ENOMEM;
        fe->ndim = (int32_t)me->ndim;
        for (uint32_t d = 0; d < me->ndim && d < 2; d++)
            fe->shape[d] = (int64_t)me->shape[d];
    }
    return 0;
}

/* Rows rank f holds of a d0-row tensor sharded FSDP2-style over w ranks. */
static uint64_t fsdp2_rows(uint64_t d0, uint64_t w, uint64_t f)
{
    uint64_t c = (d0 + w - 1) / w;
    return f * c >= d0 ? 0 : (d0 - f * c < c ? d0 - f * c : c);
}

/* Bytes rank t.frank must hold for t, or 0 when the layout cannot be satisfied. */
static uint64_t expected_bytes(const br_tensor *t)
{
    uint64_t es = rlb_dtype_size(t->dtype);
    uint64_t numel = shape_numel(t->shape, t->ndim);
    switch (t->kind) {
    case RLB_LAYOUT_FULL:
        return numel * es;
    case RLB_LAYOUT_FSDP2:
        return fsdp2_rows((uint64_t)t->shape[0], t->fworld, t->frank) * (numel / t->shape[0]) * es;
    case RLB_LAYOUT_FSDP1:
        return t->ndim == 1 && numel % t->fworld == 0 ? numel / t->fworld * es : 0;
    default:
        return 0;
    }
}

/* Fills the FSDP1 unit of t (ranks borrowed from the caller). */
static rlb_flat_unit flat_unit(const br_tensor *t, const rlb_src_loc *ranks)
{
    return (rlb_flat_unit){.dtype = t->dtype, .world = (int32_t)t->fworld,
                           .chunk_numel = shape_numel(t->shape, t->ndim) / t->fworld,
                           .n_entries = t->n_entries, .entries = t->entries, .ranks = ranks};
}

/* Adds t to src with the shards of the other FSDP ranks at `ranks` (FSDP kinds). */
static int source_add(rlb_source *src, const br_tensor *t, uint32_t buffer, uint64_t offset,
                      const rlb_src_loc *ranks, char *err)
{
    if (t->kind == RLB_LAYOUT_FULL)
        return rlb__source_add_full(src, t->name, (int)t->ndim, t->shape, t->dtype, buffer,
                                    offset, err, ERRLEN);
    if (t->kind == RLB_LAYOUT_FSDP2)
        return rlb__source_add_fsdp2(src, t->name, (int)t->ndim, t->shape, t->dtype,
                                     (int)t->fworld, ranks, err, ERRLEN);
    rlb_flat_unit u = flat_unit(t, ranks);
    return rlb__source_add_fsdp1(src, &u, err, ERRLEN);
}

int br_tensor_source_add(rlb_source *src, const br_tensor *t, const rlb_src_loc *ranks,
                         char *err)
{
    return source_add(src, t, ranks[0].buffer, ranks[0].offset, ranks, err);
}

rlb_src_loc *br_tensor_locs(const br_tensor *t)
{
    uint32_t w = t->kind == RLB_LAYOUT_FULL ? 1 : t->fworld;
    rlb_src_loc *ranks = malloc(w * sizeof(*ranks));
    for (uint32_t f = 0; ranks && f < w; f++)
        ranks[f] = (rlb_src_loc){.buffer = RLB_SRC_NO_BUFFER};
    return ranks;
}

uint64_t br_tensor_bytes(const br_tensor *t)
{
    return expected_bytes(t);
}

void br_tensor_free(br_tensor *t)
{
    tensor_free(t);
}

/* Checks t against the model on a scratch source where every FSDP rank has a buffer of
 * exactly the size its shard needs. Returns 0 or the source's error (err says what). */
static int check_model(bridge *b, const br_tensor *t, char *err)
{
    rlb_source src;
    int rc = rlb__source_init(&src, &b->params);
    if (rc < 0)
        return rc;
    uint32_t w = t->kind == RLB_LAYOUT_FULL ? 1 : t->fworld;
    rlb_src_loc *ranks = calloc(w, sizeof(*ranks));
    rc = RLB_ENOMEM;
    if (!ranks)
        goto out;
    for (uint32_t f = 0; f < w; f++) {
        br_tensor shard = *t;
        shard.frank = f;
        uint64_t bytes = expected_bytes(&shard);
        ranks[f].buffer = bytes ? (uint32_t)rlb__source_add_buffer(&src, bytes)
                                : RLB_SRC_NO_BUFFER;
    }
    rc = source_add(&src, t, ranks[0].buffer, 0, ranks, err);
out:
    free(ranks);
    rlb__source_free(&src);
    return rc;
}

/* Checks t against o, an earlier registration of trainer rank `orank` (own: of the same
 * rank). Returns 0, or RLB_EEXIST / RLB_EINVAL with err naming the tensor. */
static int conflict(const br_tensor *o, const br_tensor *t, int own, uint32_t orank, char *err)
{
    if (strcmp(o->name, t->name))
        return 0;
    if (own)
        return snprintf(err, ERRLEN, "tensor '%s' is already registered by this rank",
                        t->name), RLB_EEXIST;
    int same = o->dtype == t->dtype && o->kind == t->kind && o->ndim == t->ndim &&
               !memcmp(o->shape, t->shape, sizeof(t->shape[0]) * t->ndim) &&
               o->fworld == t->fworld;
    if (!same)
        return snprintf(err, ERRLEN, "tensor '%s' disagrees with trainer rank %u's "
                        "registration (dtype, shape, layout or FSDP world)", t->name,
                        orank), RLB_EINVAL;
    if (t->kind != RLB_LAYOUT_FULL && o->frank == t->frank)
        return snprintf(err, ERRLEN, "tensor '%s': FSDP shard %u is already registered by "
                        "trainer rank %u", t->name, t->frank, orank), RLB_EEXIST;
    return 0;
}

/* Checks t (from trainer p) against every rank's tensors and the first `batch` entries of
 * the batch being registered. */
static int check_others(bridge *b, br_peer *p, const br_tensor *t, const br_tensor *pending,
                        uint32_t batch, char *err)
{
    int rc;
    for (uint32_t r = 0; r < b->world; r++) {
        br_peer *q = b->trainers[r];
        for (uint32_t i = 0; q && i < q->n_tensors; i++)
            if ((rc = conflict(&q->tensors[i], t, q == p, r, err)) < 0)
                return rc;
    }
    for (uint32_t i = 0; i < batch; i++)
        if ((rc = conflict(&pending[i], t, 1, p->hello.rank, err)) < 0)
            return rc;
    return 0;
}

/* Refuses LoRA factors of weights that have no adapter declared: registering them first
 * would have them silently ignored. */
static int check_factors(const bridge *b, const br_tensor *t, char *err)
{
    const char *bad = br_lora_undeclared_factor(b, t->name) ? t->name : NULL;
    for (uint64_t e = 0; !bad && e < t->n_entries; e++)
        if (t->entries[e].name && br_lora_undeclared_factor(b, t->entries[e].name))
            bad = t->entries[e].name;
    if (bad)
        return snprintf(err, ERRLEN, "tensor '%s': no LoRA adapter is declared for its "
                        "weight (rlb_register_lora first)", bad), RLB_ENOTFOUND;
    return 0;
}

/* The executor's view of an IPC tensor (its own allocation handle). */
static rlb_exec_ref ipc_ref(const br_tensor *t)
{
    rlb_exec_ref r = {.kind = RLB_MEM_CUDA_IPC, .fd = -1, .offset = t->offset,
                      .length = t->length};
    memcpy(r.ipc_handle, t->ipc, sizeof(r.ipc_handle));
    memcpy(r.device_uuid, t->uuid, sizeof(r.device_uuid));
    return r;
}

/* Checks (and, for device memory, maps) where a tensor's bytes live; err names it. Host
 * and VMM tensors lie inside a segment the rank passed; an IPC tensor names its
 * allocation, opened through the executor. */
static int check_memory(bridge *b, br_peer *p, br_tensor *t, char *err)
{
    if (t->mem == RLB_MEM_CUDA_IPC) {
        rlb_exec_ref r = ipc_ref(t);
        int rc = br_use_cuda(b, err, ERRLEN);
        if (rc == 0)
            rc = b->exec->iface->map(b->exec, &r, &t->ipc_addr, err, ERRLEN);
        if (rc < 0) {
            char why[ERRLEN];
            snprintf(why, sizeof(why), "%s", err);
            /* A handle that does not open is what a container without the ptrace capability
             * gives: RLB_EPERM makes the client fall back to host staging. */
            if (rc == RLB_ECUDA)
                rc = RLB_EPERM;
            return snprintf(err, ERRLEN, "tensor '%.60s': CUDA IPC memory: %.160s", t->name, why), rc;
        }
        return 0;
    }
    /* The loop held the register until its segments came, or RLB_PEER_TIMEOUT_MS. */
    br_seg *s = br_seg_ready(p, t->seg);
    if (!s)
        return snprintf(err, ERRLEN, "tensor '%s': segment %u was never passed (within "
                        "RLB_PEER_TIMEOUT_MS)", t->name, t->seg), RLB_ENOTFOUND;
    if (s->refused)
        return snprintf(err, ERRLEN, "tensor '%.60s': segment %u is %s", t->name, t->seg,
                        s->refused), RLB_EPERM;
    if (s->vmm != (t->mem == RLB_MEM_CUDA_VMM_FD))
        return snprintf(err, ERRLEN, "tensor '%s': segment %u holds %s memory, the tensor "
                        "says %s", t->name, t->seg, s->vmm ? "GPU" : "host",
                        t->mem == RLB_MEM_CUDA_VMM_FD ? "GPU" : "host"), RLB_EINVAL;
    if (t->offset > s->bytes || t->length > s->bytes - t->offset)
        return snprintf(err, ERRLEN, "tensor '%s': bytes [%llu, +%llu) lie outside segment %u "
                        "(%llu bytes)", t->name, (unsigned long long)t->offset,
                        (unsigned long long)t->length, t->seg,
                        (unsigned long long)s->bytes), RLB_EINVAL;
    if (s->vmm) {
        char why[ERRLEN];
        int rc = br_seg_map_device(b, s, t->uuid, why, sizeof(why));
        if (rc < 0)
            return snprintf(err, ERRLEN, "tensor '%.60s': CUDA VMM memory: %.160s", t->name, why), rc;
    }
    return 0;
}

/* Drops what check_memory mapped for a tensor that is not kept (or is removed). */
static void release_memory(bridge *b, br_tensor *t)
{
    if (t->mem == RLB_MEM_CUDA_IPC && t->ipc_addr) {
        rlb_exec_ref r = ipc_ref(t);
        b->exec->iface->fence(b->exec);
        b->exec->iface->unmap(b->exec, &r, t->ipc_addr);
        t->ipc_addr = NULL;
    }
}

/* Checks one tensor of a batch; err names it. */
static int check_tensor(bridge *b, br_peer *p, br_tensor *t, const br_tensor *pending,
                        uint32_t batch, char *err)
{
    int rc = check_memory(b, p, t, err);
    if (rc < 0)
        return rc;
    if (t->dtype != RLB_DTYPE_F32 && t->dtype != RLB_DTYPE_BF16 && t->dtype != RLB_DTYPE_F16)
        return snprintf(err, ERRLEN, "tensor '%s': dtype %s (want F32, BF16 or F16)", t->name,
                        rlb_dtype_name(t->dtype)), RLB_EDTYPE;
    if (t->ndim < 1 || (t->kind != RLB_LAYOUT_FULL && (t->fworld < 1 || t->frank >= t->fworld)))
        return snprintf(err, ERRLEN, "tensor '%s': bad shape or FSDP rank %u of %u", t->name,
                        t->frank, t->fworld), RLB_EINVAL;
    if ((rc = check_others(b, p, t, pending, batch, err)) == 0)
        rc = check_factors(b, t, err);
    if (rc < 0 || t->dropped)
        return rc;
    uint64_t want = expected_bytes(t);
    if (want == 0 || want != t->length)
        return snprintf(err, ERRLEN, "tensor '%s': %llu bytes registered, its layout needs "
                        "%llu", t->name, (unsigned long long)t->length,
                        (unsigned long long)want), RLB_ESHAPE;
    return check_model(b, t, err);
}

void br_register(bridge *b, br_peer *p, const rlb_msg_register *m)
{
    char err[ERRLEN] = "";
    int rc = 0;
    uint32_t n = 0;
    /* Declarations first: the batch may carry the factors they declare. */
    if (m->n_loras && (rc = br_lora_declare(b, p, m, err, sizeof(err))) < 0) {
        br_send_error(b, p, rc, 0, RLB_MSG_REGISTER, "adapters refused: %s", err);
        return;
    }
    if (m->n_tensors == 0)
        return;
    br_tensor *batch = calloc(m->n_tensors, sizeof(*batch));
    if (!batch) {
        br_send_error(b, p, RLB_ENOMEM, 0, RLB_MSG_REGISTER, "out of memory");
        return;
    }
    for (; n < m->n_tensors; n++) {
        br_tensor *t = &batch[n];
        if ((rc = tensor_copy(t, &m->tensors[n])) < 0) {
            snprintf(err, sizeof(err), "out of memory");
            n++;
            break;
        }
        t->dropped = t->kind == RLB_LAYOUT_FULL && rlb__params_is_dropped(&b->params, t->name);
        if ((rc = check_tensor(b, p, t, batch, n, err)) < 0) {
            n++;
            break;
        }
    }
    if (rc == 0 && p->n_tensors + n > p->cap_tensors) {
        uint32_t cap = p->n_tensors + n + p->cap_tensors;
        br_tensor *grown = realloc(p->tensors, cap * sizeof(*grown));
        if (!grown) {
            rc = RLB_ENOMEM;
            snprintf(err, sizeof(err), "out of memory");
        } else {
            p->tensors = grown;
            p->cap_tensors = cap;
        }
    }
    if (rc < 0) {
        br_send_error(b, p, rc, 0, RLB_MSG_REGISTER, "register refused: %s", err);
        for (uint32_t i = 0; i < n; i++) {
            release_memory(b, &batch[i]);
            tensor_free(&batch[i]);
        }
        free(batch);
        br_release_unused_segments(b, p);
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (batch[i].mem != RLB_MEM_CUDA_IPC)
            br_seg_find(p, batch[i].seg)->refs++;
        p->tensors[p->n_tensors++] = batch[i];
    }
    free(batch);
    br_plan_reset(b);
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "trainer rank %u registered %u tensors (%u in all)",
                 p->hello.rank, n, p->n_tensors);
}

/* Removes p's tensor i; br_release_unused_segments closes what it leaves unused. */
static void tensor_remove(bridge *b, br_peer *p, uint32_t i)
{
    br_tensor *t = &p->tensors[i];
    br_seg *s = t->mem == RLB_MEM_CUDA_IPC ? NULL : br_seg_find(p, t->seg);
    if (s)
        s->refs--;
    release_memory(b, t);
    tensor_free(&p->tensors[i]);
    p->tensors[i] = p->tensors[--p->n_tensors];
}

/* Closes the mappings the unregister left unused and only then acknowledges it, so the
 * trainer may free its memory as soon as the answer arrives. Host segments are unmapped
 * right away (nothing reads them between syncs: an unregister is refused during one);
 * device mappings must be closed here only after their last use is fenced. */
static void br_unregister_fenced(bridge *b, br_peer *p, uint32_t n_removed)
{
    b->exec->iface->fence(b->exec);
    br_release_unused_segments(b, p);
    rlb_msg ack = {.type = RLB_MSG_UNREGISTERED, .unregistered = {.n_tensors = n_removed}};
    br_send(b, p, &ack);
}

void br_unregister(bridge *b, br_peer *p, const rlb_msg_unregister *m)
{
    for (uint32_t k = 0; k < m->n_names; k++) {
        uint32_t i = 0;
        while (i < p->n_tensors && strcmp(p->tensors[i].name, m->names[k].name))
            i++;
        if (i == p->n_tensors) {
            br_send_error(b, p, RLB_ENOTFOUND, 0, RLB_MSG_UNREGISTER,
                          "unregister: tensor '%s' is not registered", m->names[k].name);
            return;
        }
    }
    uint32_t n_removed = m->n_names ? m->n_names : p->n_tensors;
    if (m->n_names == 0) {
        br_registry_drop(b, p);
    } else {
        for (uint32_t k = 0; k < m->n_names; k++)
            for (uint32_t i = 0; i < p->n_tensors; i++)
                if (!strcmp(p->tensors[i].name, m->names[k].name)) {
                    tensor_remove(b, p, i);
                    break;
                }
    }
    br_plan_reset(b);
    br_unregister_fenced(b, p, n_removed);
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "trainer rank %u unregistered %u tensors (%u left)",
                 p->hello.rank, n_removed, p->n_tensors);
}

void br_registry_drop(bridge *b, br_peer *p)
{
    while (p->n_tensors)
        tensor_remove(b, p, p->n_tensors - 1);
    free(p->tensors);
    p->tensors = NULL;
    p->cap_tensors = 0;
    br_plan_reset(b);
}

void br_plan_reset(bridge *b)
{
    if (!b->plan_ready)
        return;
    rlb__plan_free(&b->plan);
    rlb__source_free(&b->source);
    if (b->xparams)
        rlb__params_free(b->xparams);
    free(b->xparams);
    b->xparams = NULL;
    free(b->src_ptr);
    free(b->src_len);
    b->src_ptr = NULL;
    b->src_len = NULL;
    b->n_src = 0;
    b->plan_ready = 0;
}

int br_source_buffer(bridge *b, const void *addr, uint64_t bytes, uint32_t *index)
{
    for (uint32_t i = 0; i < b->n_src; i++)
        if (b->src_ptr[i] == addr) {
            *index = i;
            return 0;
        }
    const void **ptr = realloc(b->src_ptr, (b->n_src + 1) * sizeof(*ptr));
    if (!ptr)
        return RLB_ENOMEM;
    b->src_ptr = ptr;
    uint64_t *len = realloc(b->src_len, (b->n_src + 1) * sizeof(*len));
    if (!len)
        return RLB_ENOMEM;
    b->src_len = len;
    int rc = rlb__source_add_buffer(&b->source, bytes);
    if (rc < 0)
        return rc;
    b->src_ptr[b->n_src] = addr;
    b->src_len[b->n_src] = bytes;
    *index = b->n_src++;
    return 0;
}

/* Source buffer index of the memory holding tensor o of peer q (its segment, or its IPC
 * mapping), adding it on first use; *offset is o's place in it. */
static int src_buffer(bridge *b, br_peer *q, const br_tensor *o, uint32_t *index,
                      uint64_t *offset)
{
    br_seg *seg = o->mem == RLB_MEM_CUDA_IPC ? NULL : br_seg_find(q, o->seg);
    br_seg ipc = {.addr = o->ipc_addr, .bytes = o->length};
    const br_seg *s = seg ? seg : &ipc;
    *offset = seg ? o->offset : 0;
    return br_source_buffer(b, s->addr, s->bytes, index);
}

/* 1 when a lower rank than r (or an earlier tensor of r) already holds `name`. */
static int seen_before(bridge *b, uint32_t r, uint32_t i, const char *name)
{
    for (uint32_t q = 0; q <= r; q++) {
        br_peer *t = b->trainers[q];
        for (uint32_t k = 0; k < (q == r ? i : t->n_tensors); k++)
            if (!strcmp(t->tensors[k].name, name))
                return 1;
    }
    return 0;
}

/* Adds the tensor named by rank r's tensor i, gathering its FSDP shards from every rank.
 * Returns 0, 1 (a shard is missing: b->reg_missing says which) or a negative code. */
static int add_tensor(bridge *b, uint32_t r, uint32_t i, char *err)
{
    const br_tensor *t = &b->trainers[r]->tensors[i];
    uint32_t w = t->kind == RLB_LAYOUT_FULL ? 1 : t->fworld;
    rlb_src_loc *ranks = br_tensor_locs(t);
    if (!ranks)
        return RLB_ENOMEM;
    int rc = 0;
    for (uint32_t q = 0; q < b->world && rc == 0; q++) {
        br_peer *peer = b->trainers[q];
        for (uint32_t k = 0; k < peer->n_tensors && rc == 0; k++) {
            const br_tensor *o = &peer->tensors[k];
            if (strcmp(o->name, t->name) || (t->kind == RLB_LAYOUT_FULL && o != t))
                continue;
            uint32_t f = t->kind == RLB_LAYOUT_FULL ? 0 : o->frank;
            rc = src_buffer(b, peer, o, &ranks[f].buffer, &ranks[f].offset);
        }
    }
    for (uint32_t f = 0; f < w && rc == 0; f++) {
        br_tensor shard = *t;
        shard.frank = f;
        if (ranks[f].buffer == RLB_SRC_NO_BUFFER && expected_bytes(&shard) != 0) {
            snprintf(b->reg_missing, sizeof(b->reg_missing),
                     "tensor '%s': FSDP shard %u of %u is not registered", t->name, f, w);
            rc = 1;
        }
    }
    if (rc == 0)
        rc = source_add(&b->source, t, ranks[0].buffer, ranks[0].offset, ranks, err);
    free(ranks);
    return rc;
}

int br_plan_ensure(bridge *b)
{
    if (b->plan_ready)
        return 1;
    if (b->world == 0 || b->tp_size == 0) {
        snprintf(b->reg_missing, sizeof(b->reg_missing), "no %s connected yet",
                 b->world == 0 ? "trainer" : "worker");
        return 0;
    }
    for (uint32_t r = 0; r < b->world; r++)
        if (!b->trainers[r]) {
            snprintf(b->reg_missing, sizeof(b->reg_missing), "trainer rank %u of %u is not "
                     "connected", r, b->world);
            return 0;
        }
    char err[ERRLEN] = "";
    int rc = rlb__source_init(&b->source, &b->params);
    if (rc < 0)
        return rc;
    b->plan_ready = 1; /* so that br_plan_reset frees what is built below */
    for (uint32_t r = 0; r < b->world && rc == 0; r++)
        for (uint32_t i = 0; i < b->trainers[r]->n_tensors && rc == 0; i++) {
            const br_tensor *t = &b->trainers[r]->tensors[i];
            if (!t->dropped && !seen_before(b, r, i, t->name))
                rc = add_tensor(b, r, i, err);
        }
    if (rc == 0)
        rc = br_base_add(b, err, sizeof(err));
    if (rc == 0 && rlb__source_check(&b->source, err, sizeof(err)) < 0) {
        snprintf(b->reg_missing, sizeof(b->reg_missing), "%s", err);
        rc = 1;
    }
    rlb_target tgt = {.tp_size = (int32_t)b->tp_size, .replicas = (int32_t)b->n_replicas,
                      .dtype = b->wdt};
    memset(&b->plan, 0, sizeof(b->plan));
    if (rc == 0)
        rc = rlb__plan_build(&b->source, &tgt, &b->plan, err, sizeof(err));
    if (rc < 0) {
        snprintf(b->reg_missing, sizeof(b->reg_missing), "%s", err);
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "cannot build the plan: %s", err);
    }
    if (rc != 0) {
        br_plan_reset(b);
        return rc < 0 ? rc : 0;
    }
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "plan built: %llu ops, %llu bytes per sync, %u source "
                 "buffers, %u destinations", (unsigned long long)b->plan.n_ops,
                 (unsigned long long)b->plan.bytes_written, b->n_src, b->plan.n_dst);
    return 1;
}
