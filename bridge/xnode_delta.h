/* xnode_delta.h: after the first version of a LoRA job only adapters cross node boundaries
 * (DESIGN §10).
 *
 * A plan with LoRA merges keeps whole copies of the other nodes' buffers it reads (whole
 * staging, xnode.c), and such a job's base is frozen: from one version to the next only the
 * factors change, and add_chunks never puts factor bytes in a chunk of base bytes. So a
 * sender need not send again a chunk whose bytes the receiver's staging still holds:
 *   - the receiver keeps `have`, the attempt (v.k) whose exchange completed every receive
 *     into its staging, or none: none once its staging is new (a rebuilt plan), and none
 *     from the moment an exchange starts writing the staging until it completed every
 *     receive. It writes what it had in the store before it posts its transfers;
 *   - the sender keeps, per peer, a 128-bit hash (XXH3; for GPU memory the transport's digest,
 *     computed on the GPU) of each chunk it sends there and the
 *     attempt those hashes describe. A chunk is skipped only when the receiver's `have` is
 *     that attempt and the hash of the bytes now is the recorded one: then the receiver's
 *     staging holds these very bytes.
 * A sender rebuilding its plan forgets its records (its chunks are new). The exchange
 * (xnode.c) tells the receiver which chunks follow in a manifest per peer.
 */
#ifndef RLB_BRIDGE_XNODE_DELTA_H
#define RLB_BRIDGE_XNODE_DELTA_H

#include <stddef.h>
#include <stdint.h>

/* One attempt of a version (a version published again after an abort is a new attempt). */
typedef struct xn_attempt {
    uint64_t v;  /* version; 0: no attempt */
    uint32_t k;  /* attempt of v */
} xn_attempt;

/* 1 when a and b are the same attempt, none included. */
int xn_attempt_same(xn_attempt a, xn_attempt b);
/* Writes "v.k", or "0" for none, into buf[cap]; returns its length. */
int xn_attempt_format(xn_attempt a, char *buf, size_t cap);
/* What xn_attempt_format wrote; none for "0" or anything else. */
xn_attempt xn_attempt_parse(const char *s);

typedef struct xn_hash {
    uint64_t lo, hi;
} xn_hash;

typedef struct xn_delta {
    int nnodes;
    uint32_t n_sends;  /* send chunks of the plan the records are for */
    xn_attempt *sent;  /* [nnodes] per peer: the attempt whose bytes `hash` records, or none */
    xn_hash *hash;     /* [n_sends] per send chunk: its bytes in that attempt */
    xn_attempt have;   /* receiver: the attempt the whole staging holds, or none */
} xn_delta;

/* Forgets every record (a new plan: new chunks, a new staging) and makes room for n_sends
 * send chunks. Returns 0 or RLB_ENOMEM (then d holds no records). */
int xn_delta_reset(xn_delta *d, int nnodes, uint32_t n_sends);
void xn_delta_free(xn_delta *d);

/* Sender, before deciding the chunks it sends `peer`, whose staging holds `peer_have`:
 * returns 1 when that is the attempt the records describe (unchanged chunks may be skipped).
 * The peer's records are void from here until xn_delta_close, so a decision cut short
 * leaves none. */
int xn_delta_open(xn_delta *d, int peer, xn_attempt peer_have);
/* 1 when send chunk i (its bytes data[len]) must go to its peer: `held` (xn_delta_open's
 * answer) is 0, or its bytes changed since the recorded attempt. Records their hash. */
int xn_delta_changed(xn_delta *d, uint32_t i, int held, const void *data, uint64_t len);
/* The same with the chunk's hash given: a digest of its bytes where they are in memory the
 * host cannot hash (GPU memory: the transport's digest). A job hashes every chunk one way. */
int xn_delta_changed_hash(xn_delta *d, uint32_t i, int held, xn_hash h);
/* Every chunk to `peer` decided: the records describe attempt `now`. */
void xn_delta_close(xn_delta *d, int peer, xn_attempt now);

#endif /* RLB_BRIDGE_XNODE_DELTA_H */
