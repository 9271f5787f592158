/* stress_trainer.c: `rlb stress --role trainer`, one trainer rank of a stress run, written
 * against the public API only (include/rlb/rlb.h), as a user's trainer would be.
 *
 * It connects, allocates its shard memory with rlb_alloc_host, registers its shards (FSDP1
 * FlatParameters for the units in --units, FSDP2 rows for the others) and says READY. Then,
 * for each command the supervisor sends (fd 3), it writes version v's weights (plus one NaN
 * when told to poison it), computes the FNV-1a checksum of the exact bytes it publishes,
 * publishes v and sends the outcome (fd 4). When the bridge is gone it exits with status 3,
 * and the supervisor starts a new rank against the new bridge.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "launch/stress.h"

#define PUBLISH_TIMEOUT_MS 30000 /* a publish answers within this (aborts included) */
#define CONNECT_TIMEOUT_MS 3000

static int fail(rlb_client *c, const char *what, int rc)
{
    fprintf(stderr, "stress trainer: %s: %s: %s\n", what, rlb_strerror(rc), rlb_last_error(c));
    return rc == RLB_EPEERDEAD ? 3 : 1;
}

int rlb__stress_trainer(int argc, char **argv)
{
    rlb_stress_role_opts ro;
    if (rlb__stress_role_parse(argc, argv, &ro))
        return 2;
    uint64_t seed = ro.seed;
    uint32_t rank = ro.rank, world = ro.world, units = ro.units;
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
    float *mem;
    static rlb_tensor_desc desc[RLB_STRESS_MAX_TENSORS];
    static rlb_fsdp1_entry entries[RLB_STRESS_MAX_TENSORS * RLB_STRESS_MAX_ENTRIES];
    if ((rc = rlb_alloc_host(cl, s.floats * sizeof(float), (void **)&mem)) < 0)
        return fail(cl, "alloc_host", rc);
    rlb__stress_shards_fill(&s, seed, 0, mem);
    uint32_t n = rlb__stress_shards_describe(&s, mem, desc, entries);
    if ((rc = rlb_register(cl, desc, n)) < 0)
        return fail(cl, "register", rc);
    rlb_stress_rec rec = {.kind = RLB_REC_READY};
    if (rlb__stress_send(&rec) < 0)
        return 1;
    rlb_stress_cmd cmd;
    while (read(RLB_STRESS_CMD_FD, &cmd, sizeof(cmd)) == (ssize_t)sizeof(cmd)) {
        rlb__stress_shards_fill(&s, seed, cmd.version, mem);
        if (cmd.poison)
            mem[rlb__stress_shards_pick(&s, cmd.pick)] = NAN;
        rec = (rlb_stress_rec){.kind = RLB_REC_PUBLISH, .version = cmd.version,
                               .flags = cmd.poison ? RLB_REC_F_POISONED : 0,
                               .checksum = rlb__stress_fnv(mem, s.floats * sizeof(float))};
        double t0 = rlb__stress_now_ms();
        rc = rlb_publish(cl, cmd.version, NULL);
        rec.ms = rlb__stress_now_ms() - t0;
        rec.rc = rc;
        if (rc < 0) {
            snprintf(rec.text, sizeof(rec.text), "%s", rlb_last_error(cl));
            if (!rlb__stress_named(rc, rec.text))
                rec.flags |= RLB_REC_F_UNNAMED;
        }
        if (rlb__stress_send(&rec) < 0)
            break;
        if (rc == RLB_EPEERDEAD) {
            rlb_close(cl);
            return 3;
        }
    }
    rlb_close(cl);
    return 0;
}
