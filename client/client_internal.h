/* client_internal.h: the inside of an rlb_client, shared by the files of librlb.
 *
 * client.c    connection, hello/welcome, the receive pump and message dispatch, errors,
 *             publish, stats
 * host.c      rlb_alloc_host segments and the pointer -> (segment, offset) lookup
 * tensors.c   tensor descriptors: validation, byte counts, register / unregister
 * generate.c  sampling parameters, requests, tickets and results
 * cuda.c      device tensors: CUDA IPC / VMM exports, the publish event, host staging
 *
 * Locking: `lock` guards every field below it in the struct except the rings. The receive
 * side of the connection belongs to one receiver thread per client: it drops `lock` while
 * it waits on the ring, takes it again to dispatch a message to what waits for it, then
 * wakes the waiters through `cond`. The transmit side has its own `tx_lock`, so a thread
 * can send while another waits. `ctl_lock` serializes the control calls that expect an
 * answer tied to no request id (register, unregister, publish).
 */
#ifndef RLB_CLIENT_INTERNAL_H
#define RLB_CLIENT_INTERNAL_H

#include <pthread.h>
#include <stdint.h>

#include "common/conn.h"
#include "common/proto.h"
#include "common/ring.h"
#include "rlb/rlb.h"

#define RLB_CLIENT_ERR_MAX 512 /* bytes of an error text, NUL included */

/* One rlb_alloc_host allocation. Its fd goes to the bridge with the first register that
 * needs it, and again after the bridge released it (segmsg.h: once no registered tensor
 * lies in it), so the fd stays open here until the allocation is freed. */
typedef struct rlb__host_seg {
    uint32_t id;         /* segment id on the wire (rlb__seg_msg.id, mem_ref.fd_index) */
    int fd;              /* the segment's fd */
    uint8_t *base;       /* our mapping */
    size_t bytes;        /* mapped (and segment) size, page multiple */
    size_t asked;        /* bytes the caller asked for; the rest is page rounding */
    uint32_t registered; /* tensors registered inside it */
    int at_bridge;       /* sent, and not released by the bridge since */
    int shadow;          /* the library's own: staged device tensors (pinned), freed when
                            its last tensor is unregistered */
} rlb__host_seg;

/* A registered tensor, for unregister and free checks and for the staged copies. */
typedef struct rlb__reg_tensor {
    char *name;         /* owned copy */
    uint32_t seg_id;    /* host segment holding its bytes (or its staged shadow), 0 = none */
    uint64_t dev_alloc; /* device allocation it is exported from (rlb__dev_alloc.id), 0 = none */
    const void *dptr;   /* staged: the device bytes copied into `shadow` at each publish */
    void *shadow;       /* staged: their place in the shadow segment; NULL = not staged */
    uint64_t bytes;     /* staged: bytes copied */
} rlb__reg_tensor;

typedef struct rlb__cuda rlb__cuda; /* cuda.c: device exports, event, staging */

/* What a control call waits for; reset before each send. */
typedef struct rlb__ctl_state {
    uint32_t waiting_for;  /* RLB_MSG_* the reply answers (PUBLISH, REGISTER, ...), 0 = idle */
    uint64_t fence_id;     /* register, sleep, wake: the stats request sent after it */
    uint64_t version;      /* publish: the version published */
    int done;              /* the answer arrived */
    int code;              /* 0, or the negative code of an error or abort */
    rlb_sync_stats stats;  /* publish: the synced message's figures */
} rlb__ctl_state;

typedef struct rlb__ticket rlb__ticket; /* generate.c */

/* A pending stats request. */
typedef struct rlb__stats_wait {
    uint64_t id;          /* request id of the stats message */
    int done;             /* the reply (or an error) arrived */
    int code;             /* 0 or negative */
    rlb_stat_list *list;  /* the reply, handed to the caller */
} rlb__stats_wait;

struct rlb_client {
    rlb_conn *conn;             /* socket + rings */
    int request_timeout_ms;     /* bound on control round trips */
    int slice_ms;               /* longest single wait before a recheck (RLB_WAIT_SLICE_MS) */
    int observer;               /* connected as a tool */
    pthread_mutex_t tx_lock;    /* the tx ring, the socket's sends, pack_buf */
    void *pack_buf;             /* encoding buffer, grown as needed (under tx_lock) */
    size_t pack_cap;            /* bytes at pack_buf */
    pthread_mutex_t ctl_lock;   /* one control call at a time; register and unregister
                                   hold it from their checks to their answer */

    pthread_mutex_t lock;       /* everything below */
    pthread_cond_t cond;        /* broadcast after each dispatch and when the reader leaves */
    pthread_t rx_thread;        /* the receiver */
    int rx_running;             /* rx_thread was started (read by rlb_close only) */
    int stopping;               /* rlb_close asks the receiver to end */
    int dead;                   /* sticky connection failure (negative), 0 while healthy */
    rlb_ring_rx rx;             /* reassembly of fragmented messages (owned by the reader) */
    uint64_t next_id;           /* request ids (generate, stats), from 1 */
    uint32_t peer_id;           /* what the bridge called us in its welcome */
    int welcomed;               /* the welcome arrived */
    char err[RLB_CLIENT_ERR_MAX]; /* last failure text */
    rlb_client_stats stats;     /* local counters */
    rlb__ctl_state ctl;         /* the control call in flight */
    rlb__stats_wait *stats_waits; /* pending stats requests */
    uint32_t n_stats_waits;     /* entries used */
    uint32_t cap_stats_waits;   /* entries allocated */
    rlb__host_seg *segs;        /* allocations */
    uint32_t n_segs, cap_segs;  /* used / allocated entries of segs */
    uint32_t next_seg_id;       /* next segment id, from 1 */
    rlb__reg_tensor *tensors;   /* registered tensors */
    uint32_t n_tensors, cap_tensors; /* used / allocated entries of tensors */
    rlb__cuda *cuda;            /* device tensors' state; NULL until the first one */
    rlb__ticket **tickets;      /* pending and finished generate requests */
    uint32_t n_tickets, cap_tickets; /* used / allocated entries of tickets */
};

/* ---- client.c ---------------------------------------------------------------------- */

/* Stores a failure text for rlb_last_error and returns code (so `return rlb__fail(..)`).
 * Takes c->lock; call it without holding it. */
int rlb__fail(rlb_client *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Same, with c->lock already held. */
int rlb__fail_locked(rlb_client *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Stores the failure text of a call that has no client (rlb_connect, rlb_tensor_bytes,
 * rlb_peft_to_hf) in the calling thread, for rlb_last_error(NULL), and returns code. */
int rlb__fail_call(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A call without a client starts: clears the calling thread's text of rlb_last_error(NULL). */
void rlb__call_begin(void);
/* Checks an incoming struct's struct_size against the smallest and the current size. */
int rlb__check_struct_size(rlb_client *c, size_t given, size_t min, size_t cur, const char *what);
/* Packs msg and sends it on the tx ring, waiting at most timeout_ms for room. Returns 0,
 * RLB_EINVAL (msg invalid), RLB_ETIMEDOUT, RLB_EPEERDEAD or RLB_ENOMEM. */
int rlb__send(rlb_client *c, const rlb_msg *msg, int timeout_ms);
/* Waits with c->lock held until done(c, arg) returns non-zero (the receiver thread
 * dispatches what arrives). timeout_ms < 0: no bound; 0: look once (RLB_EAGAIN when not
 * done). Returns 0, RLB_ETIMEDOUT, RLB_EAGAIN or the connection's failure. */
int rlb__wait(rlb_client *c, int (*done)(rlb_client *c, void *arg), void *arg, int timeout_ms);
/* Grows *array (elements of size bytes) so that it holds at least need entries. Returns 0 or
 * RLB_ENOMEM. */
int rlb__grow(void *array, uint32_t *cap, uint32_t need, size_t size);
/* A fresh request id (c->lock held). */
uint64_t rlb__next_id(rlb_client *c);
/* Sends msg (register, unregister, publish) and waits, under ctl_lock, for its answer: with
 * fence set, the reply to a stats request sent right after it (an error about msg comes
 * first); publish: synced or aborted. Returns 0 or the negative code of the answer or of
 * the connection. c->ctl holds the answer's details until the next control call. */
int rlb__control(rlb_client *c, const rlb_msg *msg, int fence);
/* The same with ctl_lock already held by the caller. */
int rlb__control_locked(rlb_client *c, const rlb_msg *msg, int fence);

/* ---- stats.c ----------------------------------------------------------------------- */

/* Takes a stats reply (c->lock held). */
void rlb__stats_on_reply(rlb_client *c, const rlb_msg_stats_reply *reply);
/* Takes an error tied to request id; returns 1 when a stats request took it. */
int rlb__stats_on_error(rlb_client *c, uint64_t id, int code, const char *text);
/* Fails every pending stats request with code (connection lost; c->lock held). */
void rlb__stats_fail_all(rlb_client *c, int code);
/* Frees the pending stats table (rlb_close). */
void rlb__stats_free_all(rlb_client *c);

/* ---- host.c ------------------------------------------------------------------------ */

/* The allocation holding [ptr, ptr + bytes), or NULL (c->lock held). */
rlb__host_seg *rlb__host_find(rlb_client *c, const void *ptr, uint64_t bytes);
/* The allocation with segment id `id`, or NULL (c->lock held). */
rlb__host_seg *rlb__host_by_id(rlb_client *c, uint32_t id);
/* Allocates a segment of `bytes` (c->lock not held); shadow marks the library's own
 * (cuda.c). Returns 0 with *seg_id and *ptr set, or a negative code (c->err set). */
int rlb__host_alloc(rlb_client *c, size_t bytes, int shadow, uint32_t *seg_id, void **ptr);
/* Takes segment fd, mapped at mem over bytes rounded up to whole pages, into the table as
 * an allocation of `bytes` (c->lock not held): rlb__host_alloc's second half, and how a
 * test passes a segment rlb__shm_create did not make. Returns 0 with *seg_id set (fd and
 * mem are the client's from then on), or a negative code (they stay the caller's). */
int rlb__host_adopt(rlb_client *c, int fd, void *mem, size_t bytes, int shadow,
                    uint32_t *seg_id);
/* Sends segment `id`'s fd to the bridge (ctl_lock held, c->lock not). Returns 0 or a
 * connection error. */
int rlb__host_send(rlb_client *c, uint32_t id);
/* After the bridge answered a register or an unregister: segments without registered
 * tensors are no longer at the bridge, and shadows without tensors are freed (c->lock
 * held). */
void rlb__host_settle(rlb_client *c);
/* Unmaps every allocation (rlb_close). */
void rlb__host_free_all(rlb_client *c);

/* ---- tensors.c --------------------------------------------------------------------- */

/* Frees the registered-tensor table (rlb_close). */
void rlb__tensors_free_all(rlb_client *c);

/* ---- cuda.c ------------------------------------------------------------------------ */

/* Where device tensor d (bytes > 0 of them, checked) goes on the wire: fills t->mem and
 * rt's device fields, exporting the allocation on first use; segment ids the bridge must
 * receive first are appended to send[*n_send]. staged_left: bytes of this batch's device
 * tensors not placed yet (a shadow made now is sized for them). c->lock held. Returns 0,
 * or RLB_EINVAL / RLB_EUNSUPPORTED / RLB_ECUDA / RLB_ENOMEM with err naming the tensor. */
int rlb__cuda_place(rlb_client *c, const rlb_tensor_desc *d, uint64_t bytes,
                    uint64_t staged_left, rlb_msg_tensor *t, rlb__reg_tensor *rt,
                    uint32_t *send, uint32_t *n_send, char *err, size_t cap);
/* 1 when segment id is a device export of this client (c->lock held). */
int rlb__cuda_has_seg(rlb_client *c, uint32_t id);
/* Sends VMM segment id's fds (ctl_lock held, c->lock not). Returns 0 or a negative code. */
int rlb__cuda_send(rlb_client *c, uint32_t id);
/* A registered device tensor goes away (c->lock held). */
void rlb__cuda_drop(rlb_client *c, const rlb__reg_tensor *rt);
/* Forgets exports no tensor is registered in any more (c->lock held): the memory may be
 * freed and its addresses reused once the bridge answered. */
void rlb__cuda_settle(rlb_client *c);
/* Makes every staged shadow current and records the publish event on stream (ctl_lock
 * held, c->lock not): fills pub's event fields when device memory is exported. Returns 0
 * or a negative code (c->err set). */
int rlb__cuda_before_publish(rlb_client *c, void *stream, rlb_msg_publish *pub);
/* After a register the bridge refused with RLB_EPERM (it may not open CUDA IPC handles):
 * returns 1 when the batch had exported device tensors and switches this client to
 * staged copies (one log line), 0 otherwise (c->lock held). */
int rlb__cuda_fall_back_to_staging(rlb_client *c);
/* Unpins a shadow segment's memory before it is unmapped. */
void rlb__cuda_unpin(void *ptr);
/* Releases the event, contexts and exports (rlb_close). */
void rlb__cuda_free(rlb_client *c);

/* ---- generate.c -------------------------------------------------------------------- */

/* Takes a result message (c->lock held): fills the matching ticket. */
void rlb__ticket_on_result(rlb_client *c, const rlb_msg_result *res);
/* Takes an error message tied to request id (c->lock held); returns 1 when a ticket took it. */
int rlb__ticket_on_error(rlb_client *c, uint64_t id, int code, const char *text);
/* Fails every pending ticket with code (connection lost; c->lock held). */
void rlb__tickets_fail_all(rlb_client *c, int code);
/* Frees every ticket (rlb_close). */
void rlb__tickets_free_all(rlb_client *c);

#endif /* RLB_CLIENT_INTERNAL_H */
