/* xnode_delta.c: which chunks a node need not send again (xnode_delta.h has the rules). */
#include "bridge/xnode_delta.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "rlb/rlb.h"

int xn_attempt_same(xn_attempt a, xn_attempt b)
{
    return a.v == b.v && (a.v == 0 || a.k == b.k);
}

int xn_attempt_format(xn_attempt a, char *buf, size_t cap)
{
    int n = a.v ? snprintf(buf, cap, "%" PRIu64 ".%" PRIu32, a.v, a.k) : snprintf(buf, cap, "0");
    return n < (int)cap ? n : (int)cap - 1;
}

xn_attempt xn_attempt_parse(const char *s)
{
    xn_attempt a = {0};
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (v == 0 || *end != '.')
        return a;
    const char *ks = end + 1;
    unsigned long k = strtoul(ks, &end, 10);
    if (end == ks || *end || k > UINT32_MAX)
        return a;
    return (xn_attempt){.v = v, .k = (uint32_t)k};
}

void xn_delta_free(xn_delta *d)
{
    free(d->sent);
    free(d->hash);
    memset(d, 0, sizeof(*d));
}

int xn_delta_reset(xn_delta *d, int nnodes, uint32_t n_sends)
{
    xn_delta_free(d);
    d->sent = calloc((size_t)nnodes + 1, sizeof(*d->sent));
    d->hash = calloc((size_t)n_sends + 1, sizeof(*d->hash));
    if (!d->sent || !d->hash) {
        xn_delta_free(d);
        return RLB_ENOMEM;
    }
    d->nnodes = nnodes;
    d->n_sends = n_sends;
    return 0;
}

int xn_delta_open(xn_delta *d, int peer, xn_attempt peer_have)
{
    if (!d->sent || peer < 0 || peer >= d->nnodes)
        return 0;
    int held = d->sent[peer].v != 0 && xn_attempt_same(d->sent[peer], peer_have);
    d->sent[peer] = (xn_attempt){0};
    return held;
}

int xn_delta_changed(xn_delta *d, uint32_t i, int held, const void *data, uint64_t len)
{
    XXH128_hash_t h = XXH3_128bits(data, (size_t)len);
    return xn_delta_changed_hash(d, i, held, (xn_hash){.lo = h.low64, .hi = h.high64});
}

int xn_delta_changed_hash(xn_delta *d, uint32_t i, int held, xn_hash h)
{
    if (!d->hash || i >= d->n_sends)
        return 1;
    int same = held && d->hash[i].lo == h.lo && d->hash[i].hi == h.hi;
    d->hash[i] = h;
    return !same;
}

void xn_delta_close(xn_delta *d, int peer, xn_attempt now)
{
    if (d->sent && peer >= 0 && peer < d->nnodes)
        d->sent[peer] = now;
}
