/* tp_comm_shm.c: all-reduce and all-gather among T processes through one shared region
 * (see tp_comm.h for the contract).
 *
 * Region layout (a wire format between processes: fixed-width fields, no pointers):
 *   header (64 B) | T rank records (128 B each) | data: 2 x T slots of slot_floats floats
 * Exchange number s (every rank counts its collectives; chunks of large calls count too)
 * uses slot set s & 1. A rank copies its input into its slot, publishes s in its `arrive`
 * word, waits until every rank's `arrive` reached s, then reads all slots. Two slot sets
 * suffice: a rank writes set s & 1 again only for exchange s + 2, which it starts after
 * every peer arrived at s + 1, and a peer arrives at s + 1 only after it read exchange s.
 */
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/atomics.h"
#include "common/env.h"
#include "common/log.h"
#include "rlb/rlb.h"
#include "common/tp_comm.h"

#define TP_SHM_MAGIC UINT64_C(0x314d485350544c52) /* "RLTPSHM1" read as little-endian */
#define TP_SHM_VERSION 1u
#define SPIN_ROUNDS 256 /* polls (with a pause) before a waiter sleeps on the futex */

typedef struct tp_shm_header {
    uint64_t magic;       /* TP_SHM_MAGIC */
    uint32_t version;     /* TP_SHM_VERSION */
    uint32_t size;        /* T */
    uint64_t slot_floats; /* floats per slot */
    uint64_t total_bytes; /* rlb__tp_shm_memsize(size, slot_floats) */
    uint8_t pad[32];
} tp_shm_header;
_Static_assert(sizeof(tp_shm_header) == 64, "header is one cache line");

typedef struct tp_shm_rank {
    uint32_t arrive;  /* futex word: last exchange number this rank published */
    uint32_t joined;  /* 1 once the rank attached (it stays 1 after it detaches) */
    uint32_t dead;    /* 1 once a peer found this rank's liveness mutex abandoned */
    uint8_t pad0[52];
    union {
        pthread_mutex_t alive; /* robust, process-shared; held by the rank while attached */
        uint8_t pad1[64];
    } u;
} tp_shm_rank;
_Static_assert(sizeof(pthread_mutex_t) <= 64, "mutex fits its cache line");
_Static_assert(sizeof(tp_shm_rank) == 128, "rank record is two cache lines");

typedef struct shm_comm {
    rlb_tp_comm base;      /* vtable, rank, size */
    tp_shm_header *hdr;    /* start of the region */
    tp_shm_rank *ranks;    /* [size] */
    float *data;           /* [2][size][slot_floats] */
    uint64_t slot_floats;  /* floats per slot */
    uint32_t seq;          /* exchanges this rank has started */
    int64_t timeout_ns;    /* bound on one wait for the peers */
    int64_t slice_ns;      /* longest futex sleep between liveness checks */
    int failed;            /* a collective failed: every later call fails too */
} shm_comm;

size_t rlb__tp_shm_memsize(int size, size_t slot_floats)
{
    if (size < 1 || size > 1024 || slot_floats < 1 || slot_floats > ((size_t)1 << 40))
        return 0;
    return sizeof(tp_shm_header) + (size_t)size * sizeof(tp_shm_rank) +
           2 * (size_t)size * slot_floats * sizeof(float);
}

int rlb__tp_shm_init(void *mem, size_t len, int size, size_t slot_floats)
{
    size_t need = rlb__tp_shm_memsize(size, slot_floats);
    if (!mem || need == 0 || len < need || ((uintptr_t)mem & 63))
        return RLB_EINVAL;
    memset(mem, 0, sizeof(tp_shm_header) + (size_t)size * sizeof(tp_shm_rank));
    tp_shm_header *hdr = mem;
    tp_shm_rank *ranks = (tp_shm_rank *)(hdr + 1);
    pthread_mutexattr_t attr;
    int rc = 0;
    if (pthread_mutexattr_init(&attr))
        return RLB_EIO;
    if (pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED) ||
        pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST))
        rc = RLB_EIO;
    for (int r = 0; r < size && !rc; r++)
        if (pthread_mutex_init(&ranks[r].u.alive, &attr))
            rc = RLB_EIO;
    pthread_mutexattr_destroy(&attr);
    if (rc)
        return rc;
    hdr->version = TP_SHM_VERSION;
    hdr->size = (uint32_t)size;
    hdr->slot_floats = slot_floats;
    hdr->total_bytes = need;
    /* Pairs with the acquire load in rlb__tp_comm_shm_attach: a rank that sees the magic
     * sees the formatted records. */
    rlb_store_release(&hdr->magic, TP_SHM_MAGIC);
    return 0;
}

static long futex_wait(uint32_t *word, uint32_t expect, int64_t ns)
{
    struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    return syscall(SYS_futex, word, FUTEX_WAIT, expect, &ts, NULL, 0);
}

static void futex_wake_all(uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

/* 0 while rank r is attached and alive, RLB_EPEERDEAD once it died or detached, RLB_EAGAIN
 * when it has not attached yet. */
static int peer_state(shm_comm *c, int r)
{
    tp_shm_rank *pr = &c->ranks[r];
    if (rlb_load_acquire(&pr->dead))
        return RLB_EPEERDEAD;
    int e = pthread_mutex_trylock(&pr->u.alive);
    if (e == EBUSY)
        return 0;
    if (e == EOWNERDEAD || e == ENOTRECOVERABLE) {
        /* Release pairs with the acquire at the top of this function in every rank: the
         * verdict is published once and then read without touching the mutex. Unlocking
         * without pthread_mutex_consistent leaves the mutex unrecoverable, so no later
         * trylock can mistake the dead rank for a live one. */
        rlb_store_release(&pr->dead, 1u);
        if (e == EOWNERDEAD)
            pthread_mutex_unlock(&pr->u.alive);
        return RLB_EPEERDEAD;
    }
    if (e == 0) {
        pthread_mutex_unlock(&pr->u.alive);
        return rlb_load_acquire(&pr->joined) ? RLB_EPEERDEAD : RLB_EAGAIN;
    }
    return RLB_EPEERDEAD;
}

/* Waits until rank r published exchange s. Returns 0, RLB_EPEERDEAD or RLB_ETIMEDOUT. */
static int wait_arrive(shm_comm *c, int r, uint32_t s, int64_t deadline)
{
    uint32_t *word = &c->ranks[r].arrive;
    for (int i = 0; i < SPIN_ROUNDS; i++) {
        /* Acquire pairs with the publishing rank's release store of `arrive` in exchange():
         * its slot bytes are visible once the number is. */
        if ((int32_t)(rlb_load_acquire(word) - s) >= 0)
            return 0;
        rlb_cpu_relax();
    }
    for (;;) {
        uint32_t seen = rlb_load_acquire(word);
        if ((int32_t)(seen - s) >= 0)
            return 0;
        int st = peer_state(c, r);
        if (st == RLB_EPEERDEAD) {
            RLB_LOG_ERROR(RLB_SUB_ENGINE, "tp rank %d: peer rank %d died or left", c->base.rank,
                          r);
            return st;
        }
        int64_t left = deadline - rlb__clock_ns();
        if (left <= 0) {
            RLB_LOG_ERROR(RLB_SUB_ENGINE, "tp rank %d: peer rank %d did not arrive in time",
                          c->base.rank, r);
            return RLB_ETIMEDOUT;
        }
        futex_wait(word, seen, left < c->slice_ns ? left : c->slice_ns);
    }
}

/* One exchange of n <= slot_floats floats: publish `send`, wait for every rank, then
 * return the slot set to read (rank r's data at set + r * slot_floats). */
static int exchange(shm_comm *c, const float *send, size_t n, const float **set)
{
    if (c->failed)
        return RLB_EPEERDEAD;
    uint32_t s = ++c->seq;
    float *slots = c->data + (size_t)(s & 1u) * (size_t)c->base.size * c->slot_floats;
    memcpy(slots + (size_t)c->base.rank * c->slot_floats, send, n * sizeof(float));
    /* Release pairs with the acquire loads in the peers' wait_arrive: publishes the slot. */
    rlb_store_release(&c->ranks[c->base.rank].arrive, s);
    futex_wake_all(&c->ranks[c->base.rank].arrive);
    int64_t deadline = rlb__clock_ns() + c->timeout_ns;
    for (int r = 0; r < c->base.size; r++) {
        if (r == c->base.rank)
            continue;
        int rc = wait_arrive(c, r, s, deadline);
        if (rc) {
            c->failed = 1;
            return rc;
        }
    }
    *set = slots;
    return 0;
}

/* What a collective does with one exchanged chunk: elements [off, off + len) of every
 * rank's n-float input are in `set`; the result goes to out. */
typedef void (*combine_fn)(const shm_comm *c, const float *set, size_t off, size_t len,
                           size_t n, float *out);

static void combine_sum(const shm_comm *c, const float *set, size_t off, size_t len, size_t n,
                        float *out)
{
    /* Rank order, the same on every rank: the sums are bit-identical everywhere. */
    for (size_t i = 0; i < len; i++) {
        float acc = set[i];
        for (int r = 1; r < c->base.size; r++)
            acc += set[(size_t)r * c->slot_floats + i];
        out[off + i] = acc;
    }
}

static void combine_gather(const shm_comm *c, const float *set, size_t off, size_t len,
                           size_t n, float *out)
{
    for (int r = 0; r < c->base.size; r++)
        memcpy(out + (size_t)r * n + off, set + (size_t)r * c->slot_floats,
               len * sizeof(float));
}

/* Runs a collective over n floats in chunks of at most one slot. */
static int collective(shm_comm *c, const float *send, size_t n, float *out, combine_fn fn)
{
    for (size_t off = 0; off < n; off += c->slot_floats) {
        size_t len = n - off < c->slot_floats ? n - off : c->slot_floats;
        const float *set;
        int rc = exchange(c, send + off, len, &set);
        if (rc)
            return rc;
        fn(c, set, off, len, n, out);
    }
    return 0;
}

static int shm_allreduce_sum(rlb_tp_comm *base, float *buf, size_t n)
{
    return collective((shm_comm *)base, buf, n, buf, combine_sum);
}

static int shm_allgather(rlb_tp_comm *base, const float *send, size_t n, float *recv)
{
    return collective((shm_comm *)base, send, n, recv, combine_gather);
}

static void shm_destroy(rlb_tp_comm *base)
{
    shm_comm *c = (shm_comm *)base;
    /* Peers that find the mutex free with `joined` set see a rank that left. */
    pthread_mutex_unlock(&c->ranks[base->rank].u.alive);
    free(c);
}

static const rlb_tp_comm_ops shm_ops = {
    .allreduce_sum = shm_allreduce_sum,
    .allgather = shm_allgather,
    .destroy = shm_destroy,
};

int rlb__tp_comm_shm_attach(void *mem, size_t len, int rank, int timeout_ms,
                            rlb_tp_comm **out)
{
    tp_shm_header *hdr = mem;
    if (!mem || !out || len < sizeof *hdr || rlb_load_acquire(&hdr->magic) != TP_SHM_MAGIC ||
        hdr->version != TP_SHM_VERSION || hdr->total_bytes > len ||
        hdr->total_bytes != rlb__tp_shm_memsize((int)hdr->size, hdr->slot_floats) ||
        rank < 0 || (uint32_t)rank >= hdr->size)
        return RLB_EINVAL;
    shm_comm *c = calloc(1, sizeof *c);
    if (!c)
        return RLB_ENOMEM;
    c->base = (rlb_tp_comm){.ops = &shm_ops, .rank = rank, .size = (int)hdr->size};
    c->hdr = hdr;
    c->ranks = (tp_shm_rank *)(hdr + 1);
    c->data = (float *)(c->ranks + hdr->size);
    c->slot_floats = hdr->slot_floats;
    long long ms = timeout_ms > 0 ? timeout_ms : rlb__env_int(RLB_KNOB_TP_TIMEOUT_MS);
    long long slice = rlb__env_int(RLB_KNOB_WAIT_SLICE_MS);
    c->timeout_ns = (ms > 0 ? ms : 1) * 1000000LL;
    c->slice_ns = (slice > 0 ? slice : 1) * 1000000LL;
    tp_shm_rank *me = &c->ranks[rank];
    /* A peer probing this rank's liveness holds the mutex for an instant, so wait a little
     * rather than trylock; only a second holder of the same rank keeps it longer. */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 1;
    int e = pthread_mutex_timedlock(&me->u.alive, &until);
    if (e) {
        if (e == EOWNERDEAD)
            pthread_mutex_unlock(&me->u.alive);
        free(c);
        return e == ETIMEDOUT ? RLB_EEXIST : RLB_EPEERDEAD;
    }
    /* A rank attaches once per region: a second holder would pair with stale counters. */
    if (rlb_load_acquire(&me->joined)) {
        pthread_mutex_unlock(&me->u.alive);
        free(c);
        return RLB_EEXIST;
    }
    c->seq = rlb_load_relaxed(&me->arrive);
    /* Release pairs with the acquire in peer_state: `joined` tells a free mutex of a rank
     * that left apart from one of a rank not yet here. */
    rlb_store_release(&me->joined, 1u);
    *out = &c->base;
    return 0;
}
