/* ring_traffic.c: the message stream of ring_traffic.h. */
#include "tests/unit/ring_traffic.h"

#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "rlb/rlb.h"

uint64_t traffic_rand(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

int traffic_child_alive(void *arg)
{
    traffic_child *c = arg;
    if (!c->reaped && waitpid(c->pid, &c->status, WNOHANG) == c->pid)
        c->reaped = 1;
    return !c->reaped;
}

static size_t msg_len(const traffic *t, uint64_t i)
{
    uint64_t s = t->seed * 0x100000001b3ull + i;
    uint64_t x = traffic_rand(&s);
    switch (x % 500) {
    case 0:
        return (size_t)(traffic_rand(&s) % (t->big + 1));
    case 1: case 2: case 3: case 4: case 5: case 6: case 7: case 8: case 9: case 10:
        return (size_t)(traffic_rand(&s) % 2049);
    default:
        return (size_t)(traffic_rand(&s) % 65);
    }
}

static uint32_t msg_type(uint64_t i)
{
    return (uint32_t)(i * 2654435761u) & RLB_RING_TYPE_MASK;
}

static void msg_fill(const traffic *t, uint64_t i, uint8_t *p, size_t len)
{
    uint64_t s = ~t->seed ^ (i << 20);
    for (size_t k = 0; k < len; k += 8) {
        uint64_t v = traffic_rand(&s);
        memcpy(p + k, &v, len - k < 8 ? len - k : 8);
    }
}

int traffic_produce(rlb_ring *r, const traffic *t)
{
    uint8_t *buf = malloc(t->big + 1);
    if (!buf)
        return RLB_ENOMEM;
    int rc = 0;
    for (uint64_t i = 0; i < t->count && rc == 0; i++) {
        size_t len = msg_len(t, i);
        void *slot;
        size_t cap;
        if (i % 2 == 0 && len <= rlb__ring_max_payload(r)) {
            rc = rlb__ring_claim(r, len, t->timeout_ms, &slot, &cap);
            if (rc == 0) {
                msg_fill(t, i, slot, len);
                rc = rlb__ring_commit(r, msg_type(i), len);
            }
        } else {
            msg_fill(t, i, buf, len);
            rc = rlb__ring_send(r, msg_type(i), buf, len, t->timeout_ms);
        }
    }
    free(buf);
    return rc;
}

int traffic_consume(rlb_ring *r, const traffic *t, uint64_t *bad)
{
    uint8_t *want = malloc(t->big + 1);
    if (!want)
        return RLB_ENOMEM;
    rlb_ring_rx rx = {.max_msg = t->big};
    int rc = 0;
    for (uint64_t i = 0; i < t->count && rc == 0; i++) {
        rlb_ring_msg m;
        rc = rlb__ring_recv(r, &rx, t->timeout_ms, &m);
        if (rc < 0)
            break;
        size_t len = msg_len(t, i);
        msg_fill(t, i, want, len);
        if (m.type != msg_type(i) || m.len != len || memcmp(m.data, want, len) != 0) {
            *bad = i;
            rc = 1;
        }
    }
    rlb__ring_recv_done(r, &rx);
    rlb__ring_rx_free(&rx);
    free(want);
    return rc;
}
