/* ring_traffic.h: a reproducible stream of messages for the ring stress tests, and the
 * pieces those tests share (a random generator, the liveness of a forked peer).
 *
 * Message i of a stream has a length, a type and bytes that are pure functions of (seed, i),
 * so the receiver regenerates what it must get and compares every byte, independently of
 * the ring under test. Lengths: mostly small (up to 64 bytes), some medium (up to 2 KiB),
 * and one in 500 up to `big` bytes, which can exceed one record and then travels as
 * fragments. The producer alternates between filling a claimed slot in place and
 * rlb__ring_send; the consumer reads with rlb__ring_recv.
 */
#ifndef RLB_TESTS_RING_TRAFFIC_H
#define RLB_TESTS_RING_TRAFFIC_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/ring.h"

typedef struct traffic {
    uint64_t seed;  /* names the stream */
    uint64_t count; /* messages in it */
    size_t big;     /* longest message */
    int timeout_ms; /* bound on each send / recv */
} traffic;

/* Sends the whole stream. Returns 0 or the first negative RLB_E* code. */
int traffic_produce(rlb_ring *r, const traffic *t);

/* Receives the whole stream and checks every message. Returns 0, the first negative RLB_E*
 * code, or 1 for a message that differs from what was sent (its index in *bad). */
int traffic_consume(rlb_ring *r, const traffic *t, uint64_t *bad);

/* splitmix64: the next number of the sequence that *state names. */
uint64_t traffic_rand(uint64_t *state);

/* A forked peer, reaped by its liveness check. */
typedef struct traffic_child {
    pid_t pid;  /* the child */
    int status; /* its wait status once reaped */
    int reaped; /* 1 after waitpid returned it */
} traffic_child;

/* rlb_ring_alive_fn over a traffic_child: reaps it without waiting, so a crashed child
 * ends the peer's wait at once instead of at a timeout. */
int traffic_child_alive(void *arg);

#endif /* RLB_TESTS_RING_TRAFFIC_H */
