/* tensors.c: tensor descriptors (full, FSDP1 unit, FSDP2 Shard(0)) checked and turned into
 * register messages, and the client's table of what it registered (DESIGN §4, §5).
 *
 * Everything a descriptor says is checked here before anything is sent, so a trainer learns
 * of a wrong shape or a pointer outside its shared memory from the call that made the
 * mistake; the bridge then checks the tensors against the model and answers in order (see
 * rlb__control).
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/client_internal.h"
#include "common/check.h"

#define NAME_MAX_BYTES 1024 /* longest tensor name accepted, NUL excluded */

_Static_assert(RLB_MAX_DIMS == RLB_PROTO_MAX_DIMS, "public and wire shapes agree");
_Static_assert((int)RLB_TENSOR_FULL == (int)RLB_LAYOUT_FULL &&
                   (int)RLB_TENSOR_FSDP1 == (int)RLB_LAYOUT_FSDP1 &&
                   (int)RLB_TENSOR_FSDP2 == (int)RLB_LAYOUT_FSDP2,
               "public layouts are the wire's");

/* The first version of rlb_tensor_desc ended with `data`. */
#define DESC_V1_SIZE offsetof(rlb_tensor_desc, device)

RLB_API void rlb_tensor_desc_init(rlb_tensor_desc *desc)
{
    if (desc)
        *desc = (rlb_tensor_desc)RLB_TENSOR_DESC_INIT;
}

/* 1 for the struct_size of a version of rlb_tensor_desc this library reads. */
static int desc_size_known(size_t size)
{
    return size == DESC_V1_SIZE || size == sizeof(rlb_tensor_desc);
}

/* The caller's descriptor as this library's struct: fields it was compiled without keep
 * their defaults. in->struct_size was checked. */
static rlb_tensor_desc desc_read(const rlb_tensor_desc *in)
{
    rlb_tensor_desc d = RLB_TENSOR_DESC_INIT;
    memcpy(&d, in, in->struct_size);
    d.struct_size = sizeof(d);
    return d;
}

/* Writes "tensor 'name': <what>" into err and returns code. */
static int bad(char *err, size_t cap, int code, const rlb_tensor_desc *d, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int bad(char *err, size_t cap, int code, const rlb_tensor_desc *d, const char *fmt, ...)
{
    int n = snprintf(err, cap, "tensor '%.200s': ", d->name ? d->name : "(no name)");
    if (n >= 0 && (size_t)n < cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err + n, cap - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return code;
}

static int shape_numel(const uint64_t *shape, uint32_t ndim, uint64_t *numel)
{
    for (uint32_t i = 0; i < ndim; i++)
        if (shape[i] == 0)
            return -1;
    return rlb__proto_numel(shape, ndim, numel);
}

/* Checks the FSDP1 metadata of d (global shape [total]) against itself. */
static int check_fsdp1(const rlb_tensor_desc *d, char *err, size_t cap)
{
    if (d->ndim != 1)
        return bad(err, cap, RLB_ESHAPE, d, "an FSDP1 FlatParameter has shape [total], not %u "
                                            "dimensions", d->ndim);
    uint64_t total = d->shape[0];
    if (total % d->shard_world)
        return bad(err, cap, RLB_ESHAPE, d, "total %llu is not a multiple of shard_world %u",
                   (unsigned long long)total, d->shard_world);
    if (d->n_entries == 0 || !d->entries)
        return bad(err, cap, RLB_EINVAL, d, "FSDP1 needs its FlatParameter entries");
    uint64_t sum = 0;
    for (uint32_t i = 0; i < d->n_entries; i++) {
        const rlb_fsdp1_entry *e = &d->entries[i];
        uint64_t numel;
        if (e->numel == 0 || e->numel > total - sum)
            return bad(err, cap, RLB_ESHAPE, d, "entry %u: numel %llu is 0 or runs past the "
                                                "total %llu", i, (unsigned long long)e->numel,
                       (unsigned long long)total);
        sum += e->numel;
        if (e->padding) {
            if (e->name || e->padding != 1)
                return bad(err, cap, RLB_EINVAL, d, "entry %u: padding has no name", i);
            continue;
        }
        if (!e->name || !*e->name || strlen(e->name) > NAME_MAX_BYTES)
            return bad(err, cap, RLB_EINVAL, d, "entry %u: a parameter needs a name", i);
        if (e->ndim < 1 || e->ndim > RLB_MAX_DIMS || shape_numel(e->shape, e->ndim, &numel) ||
            numel != e->numel)
            return bad(err, cap, RLB_ESHAPE, d, "entry %u (%s): shape does not hold numel %llu",
                       i, e->name, (unsigned long long)e->numel);
    }
    /* PyTorch pads the flat total to the next multiple of the world size. */
    uint64_t w = d->shard_world;
    if ((sum + w - 1) / w * w != total)
        return bad(err, cap, RLB_ESHAPE, d, "entries hold %llu elements; padded to a multiple "
                                            "of %u that is not the total %llu",
                   (unsigned long long)sum, d->shard_world, (unsigned long long)total);
    return 0;
}

/* Checks d and computes the bytes this rank holds. err gets the reason. */
static int desc_bytes(const rlb_tensor_desc *d, uint64_t *bytes, char *err, size_t cap)
{
    if (d->struct_size != sizeof(rlb_tensor_desc))
        return bad(err, cap, RLB_EVERSION, d, "struct_size %zu, this library knows %zu "
                                              "(use rlb_tensor_desc_init)",
                   d->struct_size, sizeof(rlb_tensor_desc));
    if (d->device != RLB_DEVICE_AUTO && d->device != RLB_DEVICE_CPU &&
        d->device != RLB_DEVICE_CUDA)
        return bad(err, cap, RLB_EINVAL, d, "device %d is not CPU or CUDA", (int)d->device);
    if (!d->name || !*d->name || strlen(d->name) > NAME_MAX_BYTES)
        return bad(err, cap, RLB_EINVAL, d, "a name of 1..%d bytes is required", NAME_MAX_BYTES);
    if (d->dtype != RLB_DTYPE_F32 && d->dtype != RLB_DTYPE_BF16 && d->dtype != RLB_DTYPE_F16)
        return bad(err, cap, RLB_EDTYPE, d, "dtype %d: weights are F32, BF16 or F16",
                   (int)d->dtype);
    if (d->ndim < 1 || d->ndim > RLB_MAX_DIMS)
        return bad(err, cap, RLB_ESHAPE, d, "ndim %u is outside 1..%d", d->ndim, RLB_MAX_DIMS);
    for (uint32_t i = 0; i < d->ndim; i++)
        if (d->shape[i] == 0)
            return bad(err, cap, RLB_ESHAPE, d, "shape[%u] is 0", i);
    uint64_t numel;
    if (rlb__proto_numel(d->shape, d->ndim, &numel) || numel > (UINT64_MAX >> 4))
        return bad(err, cap, RLB_ESHAPE, d, "its shape holds more than 2^60 elements");
    uint64_t esize = rlb_dtype_size(d->dtype);
    switch (d->layout) {
    case RLB_TENSOR_FULL:
        *bytes = numel * esize;
        return 0;
    case RLB_TENSOR_FSDP1:
    case RLB_TENSOR_FSDP2:
        if (d->shard_world == 0 || d->shard_rank >= d->shard_world)
            return bad(err, cap, RLB_EINVAL, d, "shard_rank %u must be < shard_world %u",
                       d->shard_rank, d->shard_world);
        break;
    default:
        return bad(err, cap, RLB_EINVAL, d, "unknown layout %d", (int)d->layout);
    }
    if (d->layout == RLB_TENSOR_FSDP1) {
        RLB_CHECK(check_fsdp1(d, err, cap));
        *bytes = numel / d->shard_world * esize;
        return 0;
    }
    uint64_t d0 = d->shape[0], rows_per = (d0 + d->shard_world - 1) / d->shard_world;
    uint64_t first = (uint64_t)d->shard_rank * rows_per;
    uint64_t rows = first >= d0 ? 0 : (d0 - first < rows_per ? d0 - first : rows_per);
    *bytes = rows * (numel / d0) * esize;
    return 0;
}

/* Refuses a descriptor array's struct_size, on client c or, without one, in the thread. */
static int refuse_desc_size(rlb_client *c, size_t size)
{
    const char *fmt = "rlb_tensor_desc.struct_size is %zu; this library knows %zu and %zu "
                      "(initialize it with rlb_tensor_desc_init)";
    return c ? rlb__fail(c, RLB_EVERSION, fmt, size, DESC_V1_SIZE, sizeof(rlb_tensor_desc))
             : rlb__fail_call(RLB_EVERSION, fmt, size, DESC_V1_SIZE, sizeof(rlb_tensor_desc));
}

RLB_API int rlb_tensor_bytes(const rlb_tensor_desc *desc, uint64_t *bytes)
{
    char err[RLB_CLIENT_ERR_MAX];
    rlb__call_begin();
    if (!desc || !bytes)
        return rlb__fail_call(RLB_EINVAL, "rlb_tensor_bytes needs a descriptor and an output "
                                          "pointer");
    if (!desc_size_known(desc->struct_size))
        return refuse_desc_size(NULL, desc->struct_size);
    rlb_tensor_desc d = desc_read(desc);
    int rc = desc_bytes(&d, bytes, err, sizeof(err));
    return rc < 0 ? rlb__fail_call(rc, "%s", err) : 0;
}

/* ---- the client's table ---------------------------------------------------------------- */

static int64_t find_tensor(rlb_client *c, const char *name)
{
    for (uint32_t i = 0; i < c->n_tensors; i++)
        if (!strcmp(c->tensors[i].name, name))
            return i;
    return -1;
}

static void drop_tensor(rlb_client *c, uint32_t i)
{
    rlb__host_seg *s = rlb__host_by_id(c, c->tensors[i].seg_id);
    if (s)
        s->registered--;
    rlb__cuda_drop(c, &c->tensors[i]);
    free(c->tensors[i].name);
    c->tensors[i] = c->tensors[--c->n_tensors];
    c->stats.tensors = c->n_tensors;
}

void rlb__tensors_free_all(rlb_client *c)
{
    for (uint32_t i = 0; i < c->n_tensors; i++)
        free(c->tensors[i].name);
    free(c->tensors);
    c->tensors = NULL;
    c->n_tensors = c->cap_tensors = 0;
}

/* ---- register ---------------------------------------------------------------------------- */

/* The wire form of descriptor d whose bytes lie in segment seg (NULL: a rank holding no
 * rows). FSDP1 entries go to *entries, allocated here. */
static int to_wire(const rlb_tensor_desc *d, const rlb__host_seg *seg, uint64_t bytes,
                   rlb_msg_tensor *t, rlb_msg_flat_entry **entries)
{
    *t = (rlb_msg_tensor){.name = d->name, .dtype = d->dtype, .ndim = d->ndim};
    memcpy(t->shape, d->shape, sizeof(t->shape));
    t->layout = (rlb_msg_layout){.kind = (rlb_layout_kind)d->layout};
    if (d->layout != RLB_TENSOR_FULL) {
        t->layout.rank = d->shard_rank;
        t->layout.world = d->shard_world;
    }
    if (seg)
        t->mem = (rlb_mem_ref){.kind = RLB_MEM_HOST_SHM,
                               .fd_index = seg->id,
                               .offset = (uint64_t)((const uint8_t *)d->data - seg->base),
                               .length = bytes};
    else
        t->mem.length = bytes; /* device tensors: rlb__cuda_place fills the rest */
    if (d->layout != RLB_TENSOR_FSDP1)
        return 0;
    /* On the wire the entries cover the whole total, so the padding PyTorch adds to reach
     * a multiple of the world size becomes a trailing padding entry. */
    rlb_msg_flat_entry *e = calloc(d->n_entries + 1, sizeof(*e));
    if (!e)
        return RLB_ENOMEM;
    uint64_t sum = 0;
    for (uint32_t i = 0; i < d->n_entries; i++) {
        const rlb_fsdp1_entry *src = &d->entries[i];
        e[i] = (rlb_msg_flat_entry){.name = src->padding ? NULL : src->name,
                                    .ndim = src->padding ? 0 : src->ndim,
                                    .numel = src->numel,
                                    .padding = src->padding != 0};
        if (!src->padding)
            memcpy(e[i].shape, src->shape, sizeof(e[i].shape));
        sum += src->numel;
    }
    uint32_t n = d->n_entries;
    if (sum < d->shape[0])
        e[n++] = (rlb_msg_flat_entry){.numel = d->shape[0] - sum, .padding = true};
    t->layout.unit = d->unit;
    t->layout.align = d->align;
    t->layout.n_entries = n;
    t->layout.entries = e;
    *entries = e;
    return 0;
}

/* Descriptor i of an array whose elements are `stride` bytes apart. */
static const rlb_tensor_desc *desc_at(const rlb_tensor_desc *tensors, size_t stride, size_t i)
{
    return (const rlb_tensor_desc *)((const char *)tensors + stride * i);
}

/* Checks the batch, reserves its names and segments in the table (so a concurrent free
 * sees them) and builds the wire tensors; send[0..*n_send) gets the segments the bridge
 * does not hold yet. On failure nothing is reserved. */
static int prepare(rlb_client *c, const rlb_tensor_desc *tensors, size_t n, rlb_msg_tensor *t,
                   rlb_msg_flat_entry **entries, uint32_t *send, uint32_t *n_send)
{
    size_t stride = tensors[0].struct_size;
    char err[RLB_CLIENT_ERR_MAX];
    uint32_t added = 0;
    uint64_t device_bytes = 0; /* bytes of the batch's device tensors not placed yet */
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        rlb_tensor_desc d = desc_read(desc_at(tensors, stride, i));
        uint64_t bytes;
        rc = desc_bytes(&d, &bytes, err, sizeof(err));
        if (rc < 0)
            return rlb__fail(c, rc, "%s", err);
        device_bytes += d.device == RLB_DEVICE_CUDA ? (bytes + 255) / 256 * 256 : 0;
    }
    pthread_mutex_lock(&c->lock);
    rc = rlb__grow(&c->tensors, &c->cap_tensors, (uint32_t)(c->n_tensors + n),
                   sizeof(*c->tensors));
    for (size_t i = 0; i < n && rc == 0; i++) {
        rlb_tensor_desc desc = desc_read(desc_at(tensors, stride, i)), *d = &desc;
        uint64_t bytes;
        desc_bytes(d, &bytes, err, sizeof(err)); /* checked above */
        int on_device = d->device == RLB_DEVICE_CUDA;
        rlb__host_seg *seg = bytes && !on_device ? rlb__host_find(c, d->data, bytes) : NULL;
        if (bytes && on_device && !d->data) {
            rc = bad(err, sizeof(err), RLB_EINVAL, d, "data is NULL");
            break;
        }
        if (bytes && !on_device && !seg) {
            rc = bad(err, sizeof(err), RLB_EINVAL, d, "its %llu bytes at %p do not lie inside "
                                                      "one rlb_alloc_host allocation",
                     (unsigned long long)bytes, d->data);
            break;
        }
        if (find_tensor(c, d->name) >= 0) {
            rc = bad(err, sizeof(err), RLB_EEXIST, d, "already registered");
            break;
        }
        char *name = strdup(d->name);
        rc = name ? to_wire(d, seg, bytes, &t[i], &entries[i]) : RLB_ENOMEM;
        if (rc < 0) {
            free(name);
            snprintf(err, sizeof(err), "out of memory building the register message");
            break;
        }
        rlb__reg_tensor rt = {.name = name, .seg_id = seg ? seg->id : 0};
        if (bytes && on_device) {
            char why[RLB_CLIENT_ERR_MAX - 256];
            rc = rlb__cuda_place(c, d, bytes, device_bytes, &t[i], &rt, send, n_send, why,
                                 sizeof(why));
            device_bytes -= (bytes + 255) / 256 * 256;
            if (rc < 0) {
                free(name);
                bad(err, sizeof(err), rc, d, "%s", why);
                break;
            }
        }
        c->tensors[c->n_tensors++] = rt;
        if (seg && !seg->at_bridge) {
            seg->at_bridge = 1;
            send[(*n_send)++] = seg->id;
        }
        if (seg)
            seg->registered++;
        added++;
    }
    if (rc < 0) {
        while (added--)
            drop_tensor(c, c->n_tensors - 1);
        rlb__host_settle(c);
        rlb__fail_locked(c, rc, "%s", err);
    }
    c->stats.tensors = c->n_tensors;
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* Takes the batch's names out of the table again after the bridge refused the batch. */
static void unreserve(rlb_client *c, const rlb_tensor_desc *tensors, size_t n)
{
    pthread_mutex_lock(&c->lock);
    for (size_t i = 0; i < n; i++) {
        int64_t j = find_tensor(c, desc_at(tensors, tensors[0].struct_size, i)->name);
        if (j >= 0)
            drop_tensor(c, (uint32_t)j);
    }
    pthread_mutex_unlock(&c->lock);
}

/* Sends segment id (host memory, a staging shadow or a VMM export) to the bridge. */
static int send_segment(rlb_client *c, uint32_t id)
{
    pthread_mutex_lock(&c->lock);
    int device = rlb__cuda_has_seg(c, id);
    pthread_mutex_unlock(&c->lock);
    return device ? rlb__cuda_send(c, id) : rlb__host_send(c, id);
}

/* One attempt at registering the batch (ctl_lock held). */
static int register_once(rlb_client *c, const rlb_tensor_desc *tensors, size_t n,
                         rlb_msg_tensor *t, rlb_msg_flat_entry **entries, uint32_t *send)
{
    uint32_t n_send = 0;
    int rc = prepare(c, tensors, n, t, entries, send, &n_send);
    if (rc < 0)
        return rc;
    for (uint32_t i = 0; i < n_send && rc == 0; i++)
        rc = send_segment(c, send[i]);
    rlb_msg msg = {.type = RLB_MSG_REGISTER, .reg = {.n_tensors = (uint32_t)n, .tensors = t}};
    if (rc == 0)
        rc = rlb__control_locked(c, &msg, 1);
    if (rc < 0)
        unreserve(c, tensors, n);
    return rc;
}

RLB_API int rlb_register(rlb_client *client, const rlb_tensor_desc *tensors, size_t n)
{
    if (!client)
        return RLB_EINVAL;
    rlb_client *c = client;
    if (!tensors || n == 0 || n > UINT32_MAX / 2)
        return rlb__fail(c, RLB_EINVAL, "rlb_register needs 1 or more tensors");
    if (c->observer)
        return rlb__fail(c, RLB_EPERM, "an observer client cannot register tensors");
    size_t stride = tensors[0].struct_size;
    if (!desc_size_known(stride))
        return refuse_desc_size(c, stride);
    for (size_t i = 0; i < n; i++)
        if (desc_at(tensors, stride, i)->struct_size != stride)
            return rlb__fail(c, RLB_EINVAL, "tensor %zu has another struct_size than tensor 0",
                             i);
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < i; j++) {
            const char *a = desc_at(tensors, stride, i)->name, *b = desc_at(tensors, stride, j)->name;
            if (a && b && !strcmp(a, b))
                return rlb__fail(c, RLB_EEXIST, "tensor '%.200s' appears twice in the batch", a);
        }
    rlb_msg_tensor *t = calloc(n, sizeof(*t));
    rlb_msg_flat_entry **entries = calloc(n, sizeof(*entries));
    uint32_t *send = calloc(n, sizeof(*send));
    int rc = RLB_ENOMEM;
    if (!t || !entries || !send) {
        rlb__fail(c, rc, "no memory for a register message of %zu tensors", n);
        goto out;
    }
    /* The segments this batch sends and the bridge's answer go together: no other
     * register or unregister may release or send one in between. */
    pthread_mutex_lock(&c->ctl_lock);
    for (int attempt = 0; attempt < 2; attempt++) {
        for (size_t i = 0; i < n; i++) {
            free(entries[i]);
            entries[i] = NULL;
        }
        memset(t, 0, n * sizeof(*t));
        rc = register_once(c, tensors, n, t, entries, send);
        pthread_mutex_lock(&c->lock);
        /* A bridge that may not open this process's CUDA IPC handles refuses them with
         * RLB_EPERM: the batch goes again, staged through host memory. */
        int again = rc == RLB_EPERM && rlb__cuda_fall_back_to_staging(c);
        rlb__host_settle(c);
        pthread_mutex_unlock(&c->lock);
        if (!again)
            break;
    }
    pthread_mutex_unlock(&c->ctl_lock);
out:
    for (size_t i = 0; entries && i < n; i++)
        free(entries[i]);
    free(entries);
    free(send);
    free(t);
    return rc;
}

RLB_API int rlb_unregister(rlb_client *client, const char *const *names, size_t n)
{
    if (!client)
        return RLB_EINVAL;
    rlb_client *c = client;
    if ((n && !names) || n > UINT32_MAX / 2)
        return rlb__fail(c, RLB_EINVAL, "rlb_unregister: %zu names but no array", n);
    rlb_msg_name *wire = calloc(n ? n : 1, sizeof(*wire));
    if (!wire)
        return rlb__fail(c, RLB_ENOMEM, "no memory for an unregister message");
    int rc = 0;
    pthread_mutex_lock(&c->ctl_lock);
    pthread_mutex_lock(&c->lock);
    for (size_t i = 0; i < n && rc == 0; i++) {
        wire[i].name = names[i];
        if (!names[i] || find_tensor(c, names[i]) < 0)
            rc = rlb__fail_locked(c, RLB_ENOTFOUND, "tensor '%.200s' is not registered",
                                  names[i] ? names[i] : "(null)");
    }
    pthread_mutex_unlock(&c->lock);
    if (rc == 0) {
        /* Answered by UNREGISTERED once the bridge closed its mappings of the memory. */
        rlb_msg msg = {.type = RLB_MSG_UNREGISTER,
                       .unreg = {.n_names = (uint32_t)n, .names = wire}};
        rc = rlb__control_locked(c, &msg, 0);
    }
    if (rc == 0) {
        pthread_mutex_lock(&c->lock);
        if (n == 0)
            while (c->n_tensors)
                drop_tensor(c, c->n_tensors - 1);
        for (size_t i = 0; i < n; i++) {
            int64_t j = find_tensor(c, names[i]);
            if (j >= 0)
                drop_tensor(c, (uint32_t)j);
        }
        rlb__host_settle(c);
        pthread_mutex_unlock(&c->lock);
    }
    pthread_mutex_unlock(&c->ctl_lock);
    free(wire);
    return rc;
}
