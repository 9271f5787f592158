/* stress_trainer.c: `rlb stress --role trainer`, one trainer rank of a stress run, written
 * against the public API only (include/rlb/rlb.h), as a user's trainer would be, but for
 * the truncate_seg fault below.
 *
 * It connects, allocates its shard memory with rlb_alloc_host, registers its shards (FSDP1
 * FlatParameters for the units in --units, FSDP2 rows for the others) and says READY. Then,
 * for each command the supervisor sends (fd 3), it writes version v's weights (plus one NaN
 * when told to poison it), computes the FNV-1a checksum of the exact bytes it publishes,
 * publishes v and sends the outcome (fd 4). When the bridge is gone it exits with status 3,
 * and the supervisor starts a new rank against the new bridge; when a publish timed out it
 * exits with status 4 (the bridge holds the version as published by this rank until it
 * goes, refusing any other).
 *
 * The truncate_seg fault (--truncate) starts a rank that truncates its shard segment to 0
 * bytes under the bridge, which takes the library's internals (a user's trainer can neither
 * pass an unsealed segment nor reach the fd of its own):
 *   - unsealed: its shards lie in a memfd without seals. The register must be refused with
 *     RLB_EPERM naming the seals; it truncates the memfd all the same, says READY with the
 *     register's code and text, publishes the next version without touching its (gone)
 *     bytes, which must abort (its shards are missing), and exits: the supervisor starts an
 *     honest rank. Had the bridge mapped the memfd, its copy would die of SIGBUS.
 *   - sealed: its shards lie in rlb_alloc_host memory. Once registered it tries to truncate
 *     that segment, which must fail with EPERM, says READY with the errno and goes on as an
 *     honest rank.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "client/client_internal.h"
#include "launch/stress.h"

#define PUBLISH_TIMEOUT_MS 30000 /* a publish answers within this (aborts included) */
#define CONNECT_TIMEOUT_MS 3000

static int fail(rlb_client *c, const char *what, int rc)
{
    fprintf(stderr, "stress trainer: %s: %s: %s\n", what, rlb_strerror(rc), rlb_last_error(c));
    return rc == RLB_EPEERDEAD ? 3 : 1;
}

/* Shard memory as a careless or hostile trainer would allocate it: a memfd without seals in
 * the client's allocation table (its fd goes to the bridge with the register). Returns 0
 * with *mem and *fd set, or a negative code. */
static int alloc_unsealed(rlb_client *c, size_t bytes, float **mem, int *fd)
{
    size_t size = (bytes + 4095) / 4096 * 4096;
    uint32_t id;
    *fd = memfd_create("rlb-stress-unsealed", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (*fd < 0 || ftruncate(*fd, (off_t)size) != 0)
        return RLB_EIO;
    *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
    if (*mem == MAP_FAILED)
        return RLB_EIO;
    return rlb__host_adopt(c, *fd, *mem, bytes, 0, &id);
}

/* The fd of the rlb_alloc_host allocation holding mem, or -1. */
static int host_fd(rlb_client *c, const void *mem, size_t bytes)
{
    pthread_mutex_lock(&c->lock);
    const rlb__host_seg *s = rlb__host_find(c, mem, bytes);
    int fd = s ? s->fd : -1;
    pthread_mutex_unlock(&c->lock);
    return fd;
}

int rlb__stress_trainer(int argc, char **argv)
{
    rlb_stress_role_opts ro;
    if (rlb__stress_role_parse(argc, argv, &ro))
        return 2;
    uint64_t seed = ro.seed;
    uint32_t rank = ro.rank, world = ro.world, units = ro.units;
    int unsealed = ro.truncate == RLB_TRUNCATE_UNSEALED;
    rlb_client_options o;
    rlb_client_options_init(&o);
    o.socket = ro.socket;
    o.rank = rank;
    o.world = world;
    o.connect_timeout_ms = CONNECT_TIMEOUT_MS;
    o.request_timeout_ms = PUBLISH_TIMEOUT_MS;
    rlb_client *cl = NULL;
    int rc = rlb_connect(&o, &cl);
    if (rc < 0)
        return fail(NULL, "connect", rc);
    rlb_stress_shards s;
    rlb__stress_shards_init(&s, rank, world, units);
    size_t bytes = s.floats * sizeof(float);
    float *mem;
    int fd = -1;
    static rlb_tensor_desc desc[RLB_STRESS_MAX_TENSORS];
    static rlb_fsdp1_entry entries[RLB_STRESS_MAX_TENSORS * RLB_STRESS_MAX_ENTRIES];
    rc = unsealed ? alloc_unsealed(cl, bytes, &mem, &fd)
                  : rlb_alloc_host(cl, bytes, (void **)&mem);
    if (rc < 0)
        return fail(cl, "alloc_host", rc);
    rlb__stress_shards_fill(&s, seed, 0, mem);
    uint32_t n = rlb__stress_shards_describe(&s, mem, desc, entries);
    rlb_stress_rec rec = {.kind = RLB_REC_READY};
    if ((rc = rlb_register(cl, desc, n)) < 0 && !(unsealed && rc == RLB_EPERM))
        return fail(cl, "register", rc);
    if (ro.truncate) {
        rec.rc = rc;
        rec.flags = unsealed ? RLB_REC_F_UNSEALED : RLB_REC_F_SEALED;
        snprintf(rec.text, sizeof(rec.text), "%s", rc < 0 ? rlb_last_error(cl) : "");
        if (!unsealed)
            fd = host_fd(cl, mem, bytes);
        rec.count = ftruncate(fd, 0) == 0 ? 0 : (uint32_t)errno;
    }
    if (rlb__stress_send(&rec) < 0)
        return 1;
    rlb_stress_cmd cmd;
    while (read(RLB_STRESS_CMD_FD, &cmd, sizeof(cmd)) == (ssize_t)sizeof(cmd)) {
        rec = (rlb_stress_rec){.kind = RLB_REC_PUBLISH, .version = cmd.version,
                               .flags = unsealed     ? RLB_REC_F_UNSEALED
                                        : cmd.poison ? RLB_REC_F_POISONED
                                                     : 0};
        if (!unsealed) { /* the unsealed rank's bytes are gone: touching them is SIGBUS */
            rlb__stress_shards_fill(&s, seed, cmd.version, mem);
            if (cmd.poison)
                mem[rlb__stress_shards_pick(&s, cmd.pick)] = NAN;
            rec.checksum = rlb__stress_fnv(mem, bytes);
        }
        double t0 = rlb__clock_ms_f();
        rc = rlb_publish(cl, cmd.version, NULL);
        rec.ms = rlb__clock_ms_f() - t0;
        rec.rc = rc;
        if (rc < 0) {
            snprintf(rec.text, sizeof(rec.text), "%s", rlb_last_error(cl));
            if (!rlb__stress_named(rc, rec.text))
                rec.flags |= RLB_REC_F_UNNAMED;
        }
        if (rlb__stress_send(&rec) < 0)
            break;
        if (rc == RLB_EPEERDEAD || rc == RLB_ETIMEDOUT || unsealed) {
            rlb_close(cl);
            return rc == RLB_EPEERDEAD ? 3 : rc == RLB_ETIMEDOUT ? 4 : 0;
        }
    }
    rlb_close(cl);
    return 0;
}
