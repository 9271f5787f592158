/* conn.h: connections between rlbridge processes on one node (DESIGN §7).
 *
 * The bridge listens on an AF_UNIX SOCK_SEQPACKET socket in a per-user directory (mode
 * 0700, owned by us: RLB_SOCKET_DIR, else $XDG_RUNTIME_DIR/rlbridge, else
 * /tmp/rlbridge-<uid>). A peer connects and sends a hello (ABI version); the listener checks
 * the peer's uid with SO_PEERCRED and its ABI version, creates two ring segments (shm.h) of
 * RLB_RING_BYTES each, and passes their fds back with SCM_RIGHTS: ring 0 carries listener ->
 * peer, ring 1 peer -> listener. The welcome also carries four eventfds, one per ring side,
 * through which each side wakes the other (the semaphores in the segments are not used:
 * the peer may scribble over them). Refusals (other uid, other ABI) are answered with a reason
 * before the socket closes, so the peer gets RLB_EPERM / RLB_EVERSION rather than a hang-up.
 *
 * The socket then stays open as the liveness channel: when either process exits, even by
 * kill -9, the other sees POLLHUP at once, and the rings' waits use that to return
 * RLB_EPEERDEAD. It also carries further fds (weight buffers, shard segments) with
 * rlb__conn_send_fds / rlb__conn_recv_fds. Nothing is ever created in /dev/shm.
 *
 * The listener's fd and each connection's fd can go into one poll loop: accept is
 * non-blocking. Functions return 0 or a negative RLB_E* code.
 */
#ifndef RLB_COMMON_CONN_H
#define RLB_COMMON_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/ring.h"

#define RLB_CONN_MAGIC 0x4e4e4f43u /* "CONN" */
#define RLB_CONN_MAX_FDS 32        /* fds one message may carry */

/* The handshake message, one SEQPACKET datagram each way. Peer -> listener: hello (status
 * 0, ring_bytes: the capacity it asks for, 0 = the listener's; it gets at most the
 * listener's). Listener -> peer: welcome (status 0, ring_bytes granted, the two ring fds
 * and four eventfds attached) or a refusal (status < 0, no fds). */
typedef struct rlb__conn_hello {
    uint32_t magic;       /* RLB_CONN_MAGIC */
    uint32_t abi_version; /* sender's RLB_ABI_VERSION */
    int32_t status;       /* 0, or the RLB_E* code of a refusal */
    int32_t pid;          /* sender's pid, for logs */
    uint64_t ring_bytes;  /* capacity of each of the two rings: asked (hello), granted */
} rlb__conn_hello;
_Static_assert(sizeof(rlb__conn_hello) == 24, "handshake message is 24 bytes");

typedef struct rlb_listener rlb_listener;
typedef struct rlb_conn rlb_conn;

/* Writes the path of socket `name` in the per-user socket directory into buf (cap bytes),
 * creating the directory (mode 0700) if needed. Returns 0, RLB_EPERM (the directory is not
 * ours or is open to group/others: the log says which), RLB_ETOOBIG (the path does not fit
 * a socket address) or RLB_EIO. */
int rlb__conn_socket_path(const char *name, char *buf, size_t cap);

/* Listens at path (a stale socket file left by a dead listener is replaced). Each accepted
 * peer gets two rings of ring_bytes (0 = RLB_RING_BYTES), or smaller ones if it asks; a
 * peer whose rings would take the rings of all connections past RLB_RING_TOTAL_BYTES is
 * refused with RLB_ENOMEM. Returns 0, RLB_EEXIST (a listener
 * is running there, or the path is not a socket), RLB_EINVAL (ring_bytes not a power of two
 * in range), RLB_ETOOBIG (path too long), RLB_ENOMEM or RLB_EIO. */
int rlb__listener_open(const char *path, uint64_t ring_bytes, rlb_listener **out);
/* The listening socket, for poll (POLLIN: a peer waits in accept). */
int rlb__listener_fd(const rlb_listener *l);
/* Accepts one pending peer without blocking on the accept itself; the handshake then waits
 * at most RLB_PEER_TIMEOUT_MS for the peer's hello. Returns 0 with *out set, RLB_EAGAIN (no
 * peer pending), RLB_EPERM (other uid: refused and logged), RLB_EVERSION (other ABI:
 * refused), RLB_EPROTO (bad hello), RLB_ETIMEDOUT, RLB_EPEERDEAD, RLB_ENOMEM (no shared
 * memory for the rings) or RLB_EIO. A refused peer never affects the listener. */
int rlb__listener_accept(rlb_listener *l, rlb_conn **out);
/* The two halves of rlb__listener_accept, for an event loop that never waits on one peer:
 * accept_sock takes a pending connection without waiting (0 with *sock set, RLB_EAGAIN,
 * RLB_ENOMEM or RLB_EIO); welcome runs the handshake on it once poll says it is readable,
 * without waiting: 0 with *out set (the connection owns sock from then on), RLB_EAGAIN (no
 * hello yet: poll again; the caller bounds how long), or a refusal or error as
 * rlb__listener_accept returns it (the caller closes sock). */
int rlb__listener_accept_sock(rlb_listener *l, int *sock);
int rlb__listener_welcome(rlb_listener *l, int sock, rlb_conn **out);
/* Closes the listener and removes its socket file (if it is still ours). NULL is a no-op. */
void rlb__listener_close(rlb_listener *l);

/* Connects to the listener at path and maps the two rings, waiting at most timeout_ms
 * (> 0) in all. Returns 0, RLB_ENOTFOUND (nobody listens there), RLB_EPERM (the listener,
 * or the directory, belongs to another uid, or the listener refused us), RLB_EVERSION,
 * RLB_EPROTO (malformed welcome, or segments smaller than announced), RLB_ECORRUPT (the
 * segments hold no valid ring), RLB_ETIMEDOUT, RLB_EPEERDEAD, RLB_ENOMEM, RLB_EINVAL or
 * RLB_EIO; a refusal passes on the listener's reason (RLB_ENOMEM, say). */
int rlb__conn_connect(const char *path, int timeout_ms, rlb_conn **out);
/* rlb__conn_connect that asks for rings of ring_bytes (0 = the listener's size; a tool
 * asks for small ones) and reports the ABI version the listener announced in its welcome
 * or refusal (0 when none came), so a caller refused with RLB_EVERSION can name both
 * versions. listener_abi may be NULL. */
int rlb__conn_connect_abi(const char *path, int timeout_ms, uint64_t ring_bytes,
                          rlb_conn **out, uint32_t *listener_abi);

/* The connection's socket, for poll: POLLIN = fds to receive, POLLHUP = peer gone. */
int rlb__conn_fd(const rlb_conn *c);
/* The eventfds our rings sleep on (conn.c: rings wake each other through eventfds passed
 * at welcome, never through the semaphores in the segments): rx_fd turns readable when
 * the peer committed into our rx ring after rlb__ring_arm of it, tx_fd when it freed room
 * in our tx ring after rlb__ring_arm of that one. For an event loop's poll(). */
void rlb__conn_wait_fds(const rlb_conn *c, int *rx_fd, int *tx_fd);
/* The ring we produce into, and the ring we consume from. */
rlb_ring *rlb__conn_tx(rlb_conn *c);
rlb_ring *rlb__conn_rx(rlb_conn *c);
/* Peer's pid and uid as the kernel reported them at connect time (SO_PEERCRED). */
pid_t rlb__conn_peer_pid(const rlb_conn *c);
uid_t rlb__conn_peer_uid(const rlb_conn *c);
/* 1 while the peer holds its end of the socket, 0 once it closed it or died. */
int rlb__conn_peer_alive(const rlb_conn *c);

/* Sends one message of len bytes (1..65536) with nfds (0..RLB_CONN_MAX_FDS) fds attached;
 * the fds stay open here. Returns 0, RLB_EINVAL, RLB_EPEERDEAD or RLB_EIO. */
int rlb__conn_send_fds(rlb_conn *c, const void *msg, size_t len, const int *fds, int nfds);
/* Receives one message into msg (cap bytes) and up to max_fds fds (close-on-exec; the
 * caller owns them), waiting at most timeout_ms. Returns 0 with *len and *nfds set,
 * RLB_EAGAIN / RLB_ETIMEDOUT, RLB_EPEERDEAD, RLB_ETOOBIG (message or fd count over the
 * limits: what arrived is discarded and closed) or RLB_EIO. */
int rlb__conn_recv_fds(rlb_conn *c, void *msg, size_t cap, size_t *len, int *fds, int max_fds,
                       int *nfds, int timeout_ms);

/* Closes both rings (the peer sees RLB_EPEERDEAD once it drained them), unmaps them and
 * closes the socket. NULL is a no-op. */
void rlb__conn_close(rlb_conn *c);

#endif /* RLB_COMMON_CONN_H */
