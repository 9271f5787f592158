/* bridge_int.h: the inside of the bridge, shared by the files of bridge/.
 *
 *   loop.c      the event loop, accepting peers, hello / welcome, dispatch, stats, shutdown
 *   peer.c      peers: outbound queues, shared-memory segments received over the socket
 *   registry.c  the trainers' registered tensors, their validation, source and plan
 *   lora.c      the LoRA adapters trainers declare, and the parameter list carrying them
 *   base.c      the frozen base a bridge serves from a checkpoint (opts->base_dir)
 *   sync.c      the sync transaction (publish -> copy -> load -> commit / abort)
 *   sched.c     generation: the request table, replica choice, results, worker death
 *   xnode.c     a node of several: the exchange with the other nodes' bridges (xnode.h)
 *
 * Everything runs on the loop's thread except the plan executor, which runs on a copy
 * thread during a sync (sync.c); while it runs, no segment is unmapped (peer.c parks them).
 */
#ifndef RLB_BRIDGE_INT_H
#define RLB_BRIDGE_INT_H

#include <pthread.h>
#include <stdint.h>

#include "bridge/bridge.h"
#include "bridge/xnode.h"
#include "common/clock.h"
#include "common/conn.h"
#include "common/proto.h"
#include "common/ring.h"
#include "kernels/executor.h"
#include "model/params.h"
#include "model/plan.h"
#include "model/source.h"
#include "model/tp_layout.h"

#define BR_MAX_PEERS 1024      /* connections at once */
#define BR_MAX_MSG (1u << 30)  /* largest message accepted from a peer */
#define BR_TP_SLOT_FLOATS 65536 /* floats per call a CPU TP communicator exchanges at once */
#define BR_MAX_RETRIES 1       /* times a request moves to another replica after a death */
#define BR_MAX_PENDING 256     /* accepted connections whose hello has not come yet */

typedef struct bridge bridge;

/* A packed message waiting for room in a peer's ring. */
typedef struct br_out {
    struct br_out *next; /* FIFO */
    uint32_t type;       /* rlb_msg_type, also the ring record type */
    size_t len;          /* bytes in data */
    uint8_t data[];      /* the msgpack encoding */
} br_out;

/* A shared-memory segment a peer passed over its socket (common/segmsg.h). */
typedef struct br_seg {
    uint32_t id;    /* the sender's id for it */
    void *addr;     /* our mapping (a VMM segment: its device address, NULL until mapped) */
    uint64_t bytes; /* mapped length (a VMM segment: the allocation's size) */
    uint32_t refs;  /* registered tensors inside it (trainers) */
    int vmm;        /* 1: a CUDA VMM range (segmsg.h RLB_SEG_MAGIC_VMM), imported by the
                       executor, not mmapped */
    uint32_t n_chunks;  /* VMM: physical chunks of the range received so far */
    uint64_t have;      /* VMM: their bytes; the segment is whole when have == bytes */
    int *fds;           /* VMM: [n_chunks] their fds (kept: they identify the range) */
    uint64_t *chunks;   /* VMM: [n_chunks] their sizes */
    const char *refused; /* why it was not mapped (unsealed: its owner could truncate it
                            under us), NULL for a usable segment */
} br_seg;

/* One tensor a trainer rank registered (a copy of the message's tensor). */
typedef struct br_tensor {
    char *name;                   /* owned */
    rlb_dtype dtype;              /* element type */
    uint32_t ndim;                /* dimensions of shape */
    int64_t shape[RLB_PROTO_MAX_DIMS]; /* global shape */
    rlb_layout_kind kind;         /* FULL / FSDP1 / FSDP2 */
    uint32_t frank, fworld;       /* FSDP rank and world */
    uint32_t unit;                /* FSDP1 unit id */
    uint64_t n_entries;           /* FSDP1 entries */
    rlb_flat_entry *entries;      /* FSDP1 entries (names owned) */
    uint32_t seg;                 /* segment id holding its bytes (HOST_SHM, CUDA_VMM_FD) */
    uint64_t offset, length;      /* bytes inside the segment (or the IPC allocation) */
    rlb_mem_kind mem;             /* where its bytes live */
    uint8_t uuid[RLB_PROTO_UUID_BYTES]; /* CUDA memory: the GPU holding it */
    uint8_t ipc[RLB_PROTO_HANDLE_BYTES]; /* CUDA_IPC: the allocation's handle */
    void *ipc_addr;               /* CUDA_IPC: the mapped tensor, NULL until mapped */
    int dropped;                  /* the model does not use it (tied lm_head): ignored */
} br_tensor;

/* A LoRA adapter a trainer rank declared (bridge/lora.c). */
typedef struct br_lora {
    char *target;  /* HF name of the adapted weight (owned) */
    uint32_t rank; /* r */
    double scale;  /* s */
} br_lora;

typedef enum br_role { BR_NEW = -1 } br_role; /* before hello; else rlb_role */

enum { BR_OPEN = 0, BR_CLOSE_AFTER_FLUSH = 1, BR_CLOSE_NOW = 2 }; /* br_peer.closing */

typedef struct br_peer {
    uint32_t id;             /* peer id (welcome) */
    int slot;                /* index in bridge.peers */
    rlb_conn *conn;          /* socket + rings */
    int role;                /* BR_NEW until hello, then rlb_role */
    rlb_msg_hello hello;     /* what it said (owns nothing) */
    rlb_ring_rx rx;          /* reassembly of fragmented messages */
    br_out *out_head, *out_tail; /* messages waiting for ring room */
    size_t out_off;          /* bytes of out_head already in the ring (a fragmented one) */
    double out_since;        /* rlb__clock_s() of the queue's last progress (or of its start) */
    int closing;             /* BR_CLOSE_*: drop once the queue is flushed, or now */
    uint8_t *held;           /* a message naming segments that have not arrived on the
                                socket yet (register, a worker's hello): handled once they
                                come or at held_until; the ring is not read meanwhile */
    size_t held_len;         /* bytes in held */
    double held_until;       /* rlb__clock_s() bound of the wait for those segments */
    br_seg *segs;            /* segments received */
    uint32_t n_segs, cap_segs;
    /* trainer */
    br_tensor *tensors;      /* registered tensors */
    uint32_t n_tensors, cap_tensors;
    uint64_t published;      /* last version this rank published, 0 = none pending */
    int has_event;           /* its publish carried an interprocess CUDA event */
    uint8_t event[RLB_PROTO_HANDLE_BYTES]; /* that event's handle: the copy waits on it */
    br_lora *loras;          /* adapters it declared */
    uint32_t n_loras, cap_loras;
    /* worker */
    void *buf[2];            /* weight buffers (segments 1 and 2; pause mode: buf[0] only) */
    int live;                /* the buffer it serves from, as its last loaded answer said */
    int committed_buf;       /* the buffer holding the committed version (the one it must
                                serve once every load is answered) */
    int target;              /* the buffer the sync or heal in flight writes: staged, the
                                other one; pause, the live one */
    uint32_t loads_out;      /* loads sent that it has not answered: until they are, none of
                                its buffers is written (it may still read either) */
    uint64_t buf_bytes;      /* bytes of each weight buffer the layout uses */
    int load_sent;           /* a load of the sync in flight was sent to it */
    int loaded;              /* ... and it answered */
} br_peer;

typedef enum br_replica_state {
    BR_REP_FORMING = 0, /* not every TP rank connected yet */
    BR_REP_UP = 1,      /* serving */
    BR_REP_DEAD = 2,    /* a rank died: out of service until every rank is gone and new
                         * workers say hello for it (it forms again) */
    BR_REP_JOINING = 3  /* formed after a version committed: its buffers get the committed
                         * version (heal copy, or the next sync) before it serves */
} br_replica_state;

typedef struct br_replica {
    br_replica_state state;
    br_peer **ranks;   /* [tp_size] worker of each TP rank, NULL until it says hello */
    uint32_t inflight; /* generate requests on it */
    int tp_fd;         /* CPU TP communicator segment (tp_size > 1), -1 otherwise */
    int in_sync;       /* its buffers are destinations of the sync in flight */
    int has_weights;   /* every rank loaded a checkpoint at start (serves before a commit) */
} br_replica;

/* A generate request the bridge holds or has forwarded. */
typedef struct br_gen {
    uint64_t bid;       /* id on the worker side (unique in the bridge) */
    uint32_t peer;      /* requester's peer id */
    uint64_t cid;       /* requester's request id */
    uint64_t minv;      /* min_weight_version */
    int replica;        /* where it runs, -1 while held */
    uint32_t retries;   /* times it was moved after a worker died */
    size_t len;         /* bytes of the packed request (bid inside) */
    uint8_t *packed;    /* what the workers get */
} br_gen;

typedef enum br_sync_state {
    BR_SYNC_IDLE = 0,  /* no version in flight */
    BR_SYNC_DRAIN,     /* pause: every rank published; waiting for generation to drain */
    BR_SYNC_COPY,      /* the copy thread runs the plan */
    BR_SYNC_LOAD,      /* load(v) sent; waiting for every worker's loaded(v) */
    BR_SYNC_XNODE      /* one node of several: the exchange with the other nodes starts */
} br_sync_state;

/* A sync's copy job, shared with the copy thread. */
typedef struct br_copy {
    rlb_plan view;        /* ops of the live replicas only */
    const void **src;     /* [plan n_src] source buffers (a copy of the bridge's table) */
    uint64_t *src_len;    /* [plan n_src] */
    void **dst;           /* [plan n_dst] destination buffers */
    uint64_t *dst_len;    /* [plan n_dst] */
    int threads;          /* executor threads */
    uint8_t (*events)[RLB_PROTO_HANDLE_BYTES]; /* [n_events] the ranks' publish events */
    uint32_t n_events;
    int heal;             /* a heal copy (br_heal_progress), not a sync's */
    uint64_t *nonfinite;  /* [view n_ops + n_merges] NaN/Inf values each op, then each merge,
                             wrote (the executor) */
    uint64_t n_nonfinite; /* their sum */
    int rc;               /* result (the executor's finish) */
    char err[256];        /* the executor's error text */
    double ms;            /* time of the copy */
    int wake_fd;          /* eventfd the executor writes when done */
} br_copy;

struct bridge {
    const rlb_bridge_opts *opts;
    rlb_listener *listener;
    int pending[BR_MAX_PENDING];     /* accepted sockets waiting for their hello */
    double pending_until[BR_MAX_PENDING]; /* ... each until then (RLB_PEER_TIMEOUT_MS) */
    int n_pending;
    int stop;                 /* shutdown requested */
    uint32_t next_peer_id;    /* from 1 */
    br_peer *peers[BR_MAX_PEERS]; /* by slot; NULL = free */
    int n_peers;              /* slots in use */
    rlb_param_list params;    /* the model's parameters, with the declared adapters */
    rlb_param_list *xparams;  /* a node of several: the list the plan's source borrows (the
                                 model's and every node's adapters; xnode.c), or NULL */
    struct rlb_st_checkpoint *base; /* mapped base checkpoint (opts->base_dir), or NULL */
    /* trainers */
    uint32_t world;           /* trainer ranks, 0 until the first trainer says hello */
    br_peer **trainers;       /* [world] by rank, NULL while absent */
    /* workers */
    uint32_t tp_size;         /* T, 0 until the first worker says hello */
    uint32_t n_replicas;      /* D */
    br_replica *replicas;     /* [D] */
    int ever_up;              /* some replica has served */
    /* registry and plan */
    int plan_ready;           /* plan (and source) match the current registrations */
    rlb_source source;        /* built with the plan */
    rlb_plan plan;
    uint32_t n_src;           /* source buffers (segments) */
    const void **src_ptr;     /* [n_src] */
    uint64_t *src_len;        /* [n_src] */
    char reg_missing[256];    /* why registrations are incomplete, for an abort text */
    /* sync */
    br_sync_state sync;       /* where the version in flight is */
    uint64_t committed;       /* last committed version, 0 = initial weights */
    uint64_t syncing;         /* version in flight (sync != IDLE), or published by all */
    int stale;                /* pause mode: a sync aborted after writing; refuse generate */
    double t_last_publish;    /* monotonic seconds of the last rank's publish */
    int copy_running;         /* the copy thread owns src/dst memory */
    int copied;               /* the in-flight sync wrote worker buffers */
    br_copy copy;
    rlb_executor *exec;       /* runs the plans (kernels/executor.h): the CPU executor until
                                 device memory appears, then the CUDA one */
    rlb_dtype wdt;            /* element type of the workers' weight buffers */
    br_seg *parked;           /* segments to unmap once the copy ends */
    uint32_t n_parked, cap_parked;
    double control_s;         /* loop CPU seconds spent on the sync in flight */
    int heal;                 /* replica being healed (copy, then load), -1 when none */
    int heal_copied;          /* ... its copy is done and load(committed) went out */
    /* generation */
    br_gen *gens;             /* requests held or in flight */
    uint32_t n_gens, cap_gens;
    uint64_t next_bid;        /* from 1 */
    int asleep;               /* workers were told to sleep */
    uint32_t sleeper;         /* peer that put them to sleep (woken when it goes), 0 = none */
    /* counters for stats */
    uint64_t n_syncs, n_aborts, bytes_synced, n_requests, n_results, n_retried, n_failed;
    uint64_t n_heals;         /* replicas that rejoined with the committed version */
    double last_sync_ms, last_copy_ms, last_gbps, last_control_ms;
    /* where the last sync's time went (ms): the last publish until the copy was launched,
     * the launch until the loop saw it done (last_copy_ms: the executor's own measure of the
     * copy, GPU events on CUDA), then the loads sent until the commit */
    double last_launch_ms, last_copy_wall_ms, last_load_ms;
    double t_copy_launched, t_loads_sent; /* monotonic seconds, of the sync in flight */
    br_xnode *xnode;          /* a node of several (xnode.h), NULL on a single node */
};

/* ---- peer.c ------------------------------------------------------------------------ */

/* Packs msg and queues it for p (sending at once what the ring has room for). Returns 0 or
 * a negative code (logged; the message is dropped). */
int br_send(bridge *b, br_peer *p, const rlb_msg *msg);
/* Queues already packed bytes. */
int br_send_packed(bridge *b, br_peer *p, uint32_t type, const void *data, size_t len);
/* Sends an ERROR (code, request id, in_reply_to, formatted text). */
int br_send_error(bridge *b, br_peer *p, int code, uint64_t request_id, uint32_t in_reply_to,
                  const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Payload bytes the head of p's queue waits for in p's ring (0: no queue). */
size_t br_out_need(br_peer *p);
/* Moves queued messages into p's ring. Returns 1 when something moved, 0 otherwise. */
int br_flush(bridge *b, br_peer *p);
/* 1 when p's queue has made no progress for timeout_s (p does not read its ring). */
int br_out_stalled(br_peer *p, double timeout_s);
/* Receives every fd message waiting on p's socket. Returns 0, or RLB_EPEERDEAD / a
 * protocol error after which p should be dropped. */
int br_recv_segments(bridge *b, br_peer *p, int wait_ms);
/* The segment p sent under id, or NULL. */
br_seg *br_seg_find(br_peer *p, uint32_t id);
/* The segment if it arrived whole (a VMM segment's chunks may come in several messages),
 * else NULL. */
br_seg *br_seg_ready(br_peer *p, uint32_t id);
/* Unmaps a segment now, or parks it until the copy thread finishes. */
void br_seg_release(bridge *b, br_seg *s);
/* Trainer p's segments in which no registered tensor lies (those still waiting on the
 * socket included) are released and their ids forgotten (segmsg.h: after an unregister or
 * a refused register). */
void br_release_unused_segments(bridge *b, br_peer *p);
/* Segments mapped now, over every peer (the "segments" counter). */
uint32_t br_mapped_segments(const bridge *b);
/* Unmaps parked segments (after the copy). */
void br_unpark(bridge *b);
/* The peer with this id, or NULL when it is gone. */
br_peer *br_peer_by_id(bridge *b, uint32_t id);
/* Frees a peer's queues, segments and connection (not its role state: loop.c). */
void br_peer_free(bridge *b, br_peer *p);

/* ---- registry.c -------------------------------------------------------------------- */

/* Validates a REGISTER batch from trainer p and stores it (all or nothing). Replies with an
 * ERROR naming the tensor on refusal. */
void br_register(bridge *b, br_peer *p, const rlb_msg_register *m);
/* Forgets names (or all of p's tensors), releases the segments left without tensors and
 * answers UNREGISTERED once their mappings are closed. Replies ERROR for an unknown name. */
void br_unregister(bridge *b, br_peer *p, const rlb_msg_unregister *m);
/* Drops every tensor of p (disconnect). */
void br_registry_drop(bridge *b, br_peer *p);
/* Builds source and plan when every rank registered and the TP shape is known. Returns 1
 * when the plan is ready, 0 while registrations are incomplete (b->reg_missing says
 * why), or a negative code. */
int br_plan_ensure(bridge *b);
/* Invalidates source and plan (registrations changed). */
void br_plan_reset(bridge *b);
/* Index of the plan source at addr (bytes long), adding it on first use. Returns 0 or
 * RLB_ENOMEM. */
int br_source_buffer(bridge *b, const void *addr, uint64_t bytes, uint32_t *index);

/* ---- base.c ------------------------------------------------------------------------ */

/* Maps opts->base_dir when set. Returns 0 or the checkpoint reader's error (`err` says). */
int br_base_open(bridge *b, char *err, size_t errlen);
void br_base_close(bridge *b);
/* Adds to the source being built every model parameter no trainer placed, from the base
 * checkpoint (nothing without one). Returns 0, or 1 with b->reg_missing naming a weight
 * the checkpoint lacks, or a negative code with `err` saying what. */
int br_base_add(bridge *b, char *err, size_t errlen);

/* ---- lora.c ------------------------------------------------------------------------ */

/* Applies the adapter declarations of a REGISTER from trainer p (all or nothing) and
 * rebuilds the parameter list. Returns 0 or a negative code with `err` naming the weight. */
int br_lora_declare(bridge *b, br_peer *p, const rlb_msg_register *m, char *err,
                    size_t errlen);
/* Forgets p's declarations (disconnect). */
void br_lora_drop(bridge *b, br_peer *p);
/* 1 when `name` is a LoRA factor of a weight that has no adapter declared. */
int br_lora_undeclared_factor(const bridge *b, const char *name);
/* Adds tensor t to src with the FSDP shards (or the whole tensor, ranks[0]) at ranks[];
 * err (256 bytes) names the tensor on failure. For the global source of xnode.c. */
int br_tensor_source_add(rlb_source *src, const br_tensor *t, const rlb_src_loc *ranks,
                         char *err);
/* Where each FSDP rank of t (one entry for a whole tensor) holds it: a malloc'ed array,
 * every entry RLB_SRC_NO_BUFFER, or NULL when out of memory. */
rlb_src_loc *br_tensor_locs(const br_tensor *t);
/* Bytes the FSDP rank t->frank holds of t, or 0 when its layout cannot hold it. */
uint64_t br_tensor_bytes(const br_tensor *t);
/* Frees what a tensor owns (its name and FSDP1 entries). */
void br_tensor_free(br_tensor *t);

/* ---- sync.c ------------------------------------------------------------------------ */

void br_publish(bridge *b, br_peer *p, const rlb_msg_publish *m);
void br_loaded(bridge *b, br_peer *p, const rlb_msg_outcome *m);
/* Worker w could not take a load it was sent (it answered with an ERROR instead of loaded:
 * the message did not decode); code and text say why. */
void br_load_refused(bridge *b, br_peer *w, int code, const char *text);
/* Advances the sync in flight (start, drain, copy done). Returns 1 when it did something. */
int br_sync_progress(bridge *b);
/* The copy thread's wake fd signalled: collect the result. */
void br_copy_done(bridge *b);
/* The executor that runs this bridge's plans. */
rlb_executor *br_executor(bridge *b);
/* Makes the CUDA executor run the plans from now on (device memory was registered or a GPU
 * worker joined). Returns 0, or RLB_EUNSUPPORTED (no CUDA in this build, no GPU) with `why`
 * saying so. */
int br_use_cuda(bridge *b, char *why, size_t len);
/* Maps VMM segment s through the executor on the GPU of `uuid` (once). Returns 0 or the
 * executor's error, `why` saying what. */
int br_seg_map_device(bridge *b, br_seg *s, const uint8_t uuid[RLB_PROTO_UUID_BYTES],
                      char *why, size_t len);
/* A trainer (worker == NULL) or worker is gone (`why`): abort the version in flight if it
 * depends on it. */
void br_sync_peer_lost(bridge *b, br_peer *trainer, br_peer *worker, const char *why);
/* Aborts the version in flight with code and text; nothing if idle. */
void br_sync_abort(bridge *b, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Waits for a running copy thread (shutdown). */
void br_sync_join(bridge *b);
/* 1 while new generation must be held (pause drain/copy/load, staged load). */
int br_sync_holds_generation(const bridge *b);
/* Gives a JOINING replica the committed version when no sync runs: its buffers are copied
 * from a live replica's (same layout), then it loads. Returns 1 when it started one. */
int br_heal_progress(bridge *b);
/* A replica died or formed again: forget a heal of it. */
void br_heal_lost(bridge *b, int replica);

/* ---- sched.c ----------------------------------------------------------------------- */

/* Takes a GENERATE from requester p (decoded; raw is its encoding). */
void br_generate(bridge *b, br_peer *p, rlb_msg *m);
/* A worker's RESULT or request ERROR. */
void br_result(bridge *b, br_peer *w, rlb_msg *m);
void br_worker_error(bridge *b, br_peer *w, const rlb_msg_error *m);
/* Forwards held requests that can run now. Returns 1 when one moved. */
int br_dispatch(bridge *b);
/* A replica died: move its requests to another replica or fail them. */
void br_replica_lost(bridge *b, int replica);
/* The requester went away: forget its requests. */
void br_requester_lost(bridge *b, br_peer *p);
/* Fails every held or running request with code (shutdown, stale weights). held_only:
 * only those not forwarded yet. */
void br_fail_requests(bridge *b, int code, int held_only, const char *text);
/* Requests running on replicas (not held). */
uint32_t br_inflight(const bridge *b);

/* ---- loop.c ------------------------------------------------------------------------ */

/* CPU seconds used by the calling thread. */
double br_thread_cpu(void);
/* Marks a worker's replica dead, telling its other ranks to shut down. */
void br_replica_kill(bridge *b, int replica, const char *why);
/* Puts a formed replica into service (asleep too when the workers sleep). */
void br_replica_up(bridge *b, int replica);

#endif /* RLB_BRIDGE_INT_H */
