/* host.c: rlb_alloc_host, shared memory a CPU trainer keeps its parameters in, so that the
 * bridge reads them in place (zero copy).
 *
 * Each allocation is one anonymous segment (common/shm.h). Its fd goes to the bridge over
 * the connection's socket with an rlb__seg_msg naming its segment id (common/segmsg.h)
 * right before the first register that refers to it, and again whenever the bridge
 * released it in between (once no tensor was registered in it): so the bridge maps only
 * memory that tensors use, and the fd stays open here until rlb_free_host. A registered
 * tensor names its segment by id and its bytes by offset, which rlb__host_find works out
 * from the pointer.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client/client_internal.h"
#include "common/check.h"
#include "common/segmsg.h"
#include "common/shm.h"

static size_t page_round(size_t bytes)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (bytes + page - 1) / page * page;
}

RLB_API int rlb_alloc_host(rlb_client *client, size_t bytes, void **ptr)
{
    if (!client || !ptr)
        return RLB_EINVAL;
    *ptr = NULL;
    if (bytes == 0 || bytes > (SIZE_MAX >> 2))
        return rlb__fail(client, RLB_EINVAL, "rlb_alloc_host: %zu bytes is not a size we "
                                             "allocate", bytes);
    uint32_t id;
    return rlb__host_alloc(client, bytes, 0, &id, ptr);
}

int rlb__host_alloc(rlb_client *c, size_t bytes, int shadow, uint32_t *seg_id, void **ptr)
{
    size_t size = page_round(bytes);
    int fd = -1;
    void *mem = NULL;
    char why[256];
    int rc = rlb__shm_room(size, 0, why, sizeof(why));
    if (rc < 0)
        return rlb__fail(c, rc, "rlb_alloc_host: %s", why);
    rc = rlb__shm_create(size, "rlb-host", &fd);
    if (rc < 0)
        return rlb__fail(c, rc, "cannot create %zu bytes of shared memory (is /dev/shm large "
                                "enough? see `rlb doctor`)", size);
    RLB_CHECK_GOTO(rlb__shm_map(fd, size, &mem), rc, err);
    RLB_CHECK_GOTO(rlb__host_adopt(c, fd, mem, bytes, shadow, seg_id), rc, err);
    *ptr = mem;
    return 0;
err:
    rlb__shm_unmap(mem, size);
    close(fd);
    return rlb__fail(c, rc, "allocating %zu bytes of shared memory failed", bytes);
}

int rlb__host_adopt(rlb_client *c, int fd, void *mem, size_t bytes, int shadow,
                    uint32_t *seg_id)
{
    pthread_mutex_lock(&c->lock);
    int rc = c->dead ? c->dead
                     : rlb__grow(&c->segs, &c->cap_segs, c->n_segs + 1, sizeof(*c->segs));
    uint32_t id = c->next_seg_id;
    if (rc == 0 && id >= RLB_SEG_ID_BRIDGE)
        rc = RLB_ETOOBIG;
    if (rc == 0) {
        c->next_seg_id++;
        c->segs[c->n_segs++] = (rlb__host_seg){.id = id, .fd = fd, .base = mem,
                                               .bytes = page_round(bytes), .asked = bytes,
                                               .shadow = shadow};
        c->stats.host_bytes += shadow ? 0 : bytes;
        *seg_id = id;
    }
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* Index of the caller's allocation starting at ptr, or -1 (c->lock held). */
static int64_t seg_index(rlb_client *c, const void *ptr)
{
    for (uint32_t i = 0; i < c->n_segs; i++)
        if (c->segs[i].base == ptr && !c->segs[i].shadow)
            return i;
    return -1;
}

/* Unmaps segment s and closes its fd. */
static void seg_unmap(const rlb__host_seg *s)
{
    if (s->shadow)
        rlb__cuda_unpin(s->base);
    rlb__shm_unmap(s->base, s->bytes);
    close(s->fd);
}

RLB_API int rlb_free_host(rlb_client *client, void *ptr)
{
    if (!client)
        return RLB_EINVAL;
    if (!ptr)
        return 0;
    rlb_client *c = client;
    pthread_mutex_lock(&c->lock);
    int64_t i = seg_index(c, ptr);
    int rc = 0;
    if (i < 0) {
        rc = rlb__fail_locked(c, RLB_EINVAL, "rlb_free_host: %p is not the start of an "
                                             "allocation of this client", ptr);
    } else if (c->segs[i].registered) {
        rc = rlb__fail_locked(c, RLB_EEXIST, "rlb_free_host: %u tensors are still registered "
                                             "in this allocation; unregister them first",
                              c->segs[i].registered);
    } else {
        rlb__host_seg s = c->segs[i];
        c->segs[i] = c->segs[--c->n_segs];
        c->stats.host_bytes -= s.asked;
        seg_unmap(&s);
    }
    pthread_mutex_unlock(&c->lock);
    return rc;
}

rlb__host_seg *rlb__host_find(rlb_client *c, const void *ptr, uint64_t bytes)
{
    uintptr_t p = (uintptr_t)ptr;
    for (uint32_t i = 0; i < c->n_segs; i++) {
        if (c->segs[i].shadow)
            continue;
        uintptr_t base = (uintptr_t)c->segs[i].base;
        if (p >= base && p - base <= c->segs[i].bytes && bytes <= c->segs[i].bytes - (p - base))
            return &c->segs[i];
    }
    return NULL;
}

rlb__host_seg *rlb__host_by_id(rlb_client *c, uint32_t id)
{
    for (uint32_t i = 0; i < c->n_segs; i++)
        if (c->segs[i].id == id)
            return &c->segs[i];
    return NULL;
}

int rlb__host_send(rlb_client *c, uint32_t id)
{
    pthread_mutex_lock(&c->lock);
    rlb__host_seg *s = rlb__host_by_id(c, id);
    rlb__seg_msg sm = {.magic = RLB_SEG_MAGIC, .id = id, .bytes = s->bytes};
    int fd = s->fd;
    pthread_mutex_unlock(&c->lock);
    pthread_mutex_lock(&c->tx_lock);
    int rc = rlb__conn_send_fds(c->conn, &sm, sizeof(sm), &fd, 1);
    pthread_mutex_unlock(&c->tx_lock);
    return rc < 0 ? rlb__fail(c, rc, "sending segment %u to the bridge failed", id) : 0;
}

void rlb__host_settle(rlb_client *c)
{
    for (uint32_t i = 0; i < c->n_segs;) {
        rlb__host_seg *s = &c->segs[i];
        if (s->registered) {
            i++;
        } else if (s->shadow) {
            seg_unmap(s);
            *s = c->segs[--c->n_segs];
        } else {
            s->at_bridge = 0;
            i++;
        }
    }
    rlb__cuda_settle(c);
}

void rlb__host_free_all(rlb_client *c)
{
    for (uint32_t i = 0; i < c->n_segs; i++)
        seg_unmap(&c->segs[i]);
    free(c->segs);
    c->segs = NULL;
    c->n_segs = c->cap_segs = 0;
}
