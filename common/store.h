/* store.h: the rendezvous store, a small TCP key-value store in the manner of torch's
 * TCPStore (set, get, wait with a timeout, add), through which the launchers of a
 * multi-node job agree on node ranks and the nodes' bridges exchange addresses.
 *
 * Node 0's launcher runs the server (a thread of its own); every launcher, node 0's
 * included, and later every bridge, is a client. A client first says hello with the job's
 * run id: the server refuses another job's id, so two jobs that picked the same port never
 * mix keys. Keys are strings up to RLB_STORE_KEY_MAX bytes, values byte strings up to
 * RLB_STORE_VALUE_MAX. The wire format (little-endian, one request in flight per
 * connection): request {u32 magic, u8 op, u8 pad[3], u32 key_len, u32 value_len, i64 arg}
 * key value; reply {i32 status, u32 value_len, i64 num} value. A peer that sends anything
 * else is disconnected; a client that reaches something that is not a store gets
 * RLB_EPROTO rather than a hang.
 *
 * Every call is bounded: connect retries until its timeout (node 0 may start last), and a
 * wait returns RLB_ETIMEDOUT when the key did not appear in time. A server that goes away
 * makes every call return RLB_EPEERDEAD.
 */
#ifndef RLB_COMMON_STORE_H
#define RLB_COMMON_STORE_H

#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>

#define RLB_STORE_KEY_MAX 1024
#define RLB_STORE_VALUE_MAX (1u << 20)
#define RLB_STORE_RUN_ID_MAX 128

typedef struct rlb_store_server rlb_store_server;
typedef struct rlb_store rlb_store;

/* Fills *sa (IPv4, port) from a dotted IPv4 address, "localhost" or a host name (its first
 * IPv4 address, as the resolver of /etc/nsswitch.conf gives it: a cluster's MASTER_ADDR is
 * usually a name). Returns 0 or RLB_EINVAL (logged: what the resolver said). */
int rlb__store_resolve(const char *addr, int port, struct sockaddr_in *sa);

/* Listens on addr:port (port 0: a free port, see rlb__store_server_port) for the job run_id
 * and serves from a thread. Returns 0, RLB_EEXIST when the port is in use, RLB_ENOTFOUND
 * when addr is not an address of this machine (another node's), RLB_EINVAL for a bad
 * address or run id, RLB_EIO or RLB_ENOMEM. */
int rlb__store_server_start(const char *addr, int port, const char *run_id,
                            rlb_store_server **out);
/* The port the server listens on. */
int rlb__store_server_port(const rlb_store_server *s);
/* Stops the thread, closes every connection and frees the server. NULL is a no-op. */
void rlb__store_server_stop(rlb_store_server *s);

/* Connects to the store at addr:port as a member of run_id, retrying for up to timeout_ms
 * while nothing listens there. Returns 0; RLB_ETIMEDOUT when no store came up in time;
 * RLB_EPERM when the store serves another run id (err then names it); RLB_EPROTO when
 * something that is not a store answers; RLB_EINVAL. err (errcap bytes, may be NULL) gets
 * one line on failure. */
int rlb__store_connect(const char *addr, int port, const char *run_id, int timeout_ms,
                       rlb_store **out, char *err, size_t errcap);
/* Sets key to the len bytes at value (replacing an earlier value, waking its waiters). */
int rlb__store_set(rlb_store *s, const char *key, const void *value, size_t len);
/* Copies key's value into buf (cap bytes; a longer value is RLB_ETOOBIG) and its length
 * into *len. RLB_ENOTFOUND when the key is not set. */
int rlb__store_get(rlb_store *s, const char *key, void *buf, size_t cap, size_t *len);
/* Like get, but waits up to timeout_ms for the key to be set: RLB_ETIMEDOUT after that. */
int rlb__store_wait(rlb_store *s, const char *key, int timeout_ms, void *buf, size_t cap,
                    size_t *len);
/* Adds delta to the integer kept at key (0 when unset; stored as decimal text, as torch's
 * add does) and returns the new value in *out. RLB_EPROTO when key holds something else. */
int rlb__store_add(rlb_store *s, const char *key, int64_t delta, int64_t *out);
/* Closes the connection and frees the client. NULL is a no-op. */
void rlb__store_close(rlb_store *s);

#endif /* RLB_COMMON_STORE_H */
