/* xnode.c: the bridges of a multi-node job exchange weight bytes and commit each version
 * together (xnode.h has the protocol; DESIGN §9).
 *
 * Store keys (under the job's run id), for version v in its k-th attempt ("v.k"):
 *   xreg/<n>/<e>     node n's registrations, epoch e (written when they change)
 *   x/<v>/cur        k, the attempt of v running now (absent: 0)
 *   x/<v.k>/epoch/<n> the registration epoch node n syncs v with
 *   x/<v.k>/gate     add: +1 per node ready, +XN_BIG per node aborting; see gate_abort()
 *   x/<v.k>/go       "on" (the exchange runs on every node) or "off <reason>"
 *   x/<v.k>/have/<n> whole staging: the attempt ("v.k", or "0") whose bytes node n's
 *                    staging holds as the attempt starts (xnode_delta.h)
 *   x/<v.k>/man/<n>/<m> GPU memory, whole staging: node n's manifest for node m ('0' or
 *                    '1' per chunk it sends m: its bytes follow), which the exchange over
 *                    host memory sends through the transport instead
 *   x/<v.k>/nccl/addr/<n> the NCCL transport's addresses (node 0's: the unique id), at the
 *                    first exchange over GPU memory (connect_gpu)
 *   x/<v.k>/in       add: +1 per node that posted its transfers, +XN_BIG per node leaving
 *   x/<v.k>/left     the first leaver's reason
 *   x/<v.k>/done     add: +1 per node whose exchange ended (see settle())
 *   x/<v.k>/state/<n> "ok" (prepared) or "abort <reason>"
 *   x/<v.k>/outcome  node 0's decision: "commit" or "abort <reason>"
 *   xbeat/<n>        add: node n's heartbeat
 *   abort            the job's abort line, written by a launcher (or its watchdog)
 * An aborted attempt moves x/<v>/cur on first, so a version published again after a
 * restart of the trainers runs in fresh keys; a node joins each attempt at most once
 * (join_attempt). Transfer tags carry v and k, then the chunk's local buffer index (16 bits)
 * and its index in that buffer (16 bits); buffer 0xffff, chunk 0xffff is reserved for the
 * manifests of whole staging: per peer, one byte per chunk sent to it, 1 when the chunk's
 * bytes follow, 0 when the peer's staging holds them already (xnode_delta.h).
 *
 * The registration blob (meta) and its checks are in xnode_meta.h.
 */
#include "bridge/xnode.h"

#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "bridge/bridge_int.h"
#include "bridge/xnode_delta.h"
#include "bridge/xnode_meta.h"
#include "common/clock.h"
#include "common/env.h"
#include "common/log.h"
#include "common/store.h"
#include "model/lora.h"

#ifdef RLB_HAVE_UCX
#include "bridge/xport/xport.h"
#endif

#define XN_BIG (INT64_C(1) << 24)  /* an abort's weight in the gate and entry counters */
#define XN_LOCAL UINT32_MAX        /* an op that reads no received chunk */
#define XN_POLL_NS 100000          /* between two store polls of a wait, at first */
#define XN_NAP_MAX_NS 1000000      /* ... and at most, once the wait lasts */
#define XN_CHECK_MS 100            /* between two liveness checks of a wait */
#define XN_BEAT_MS 200             /* heartbeat period */
#define XN_CONNECT_MS 120000       /* the other bridges must come up within this */
#define XN_TAG_RESERVED 0xffffu    /* local buffer index of the manifests' tag, never a
                                      buffer's */
#define XN_TAG_MANIFEST ((uint64_t)XN_TAG_RESERVED << 16 | 0xffffu) /* a manifest's tag */

_Static_assert(RLB_PROTO_HANDLE_BYTES == 64, "a publish event handle is 64 bytes");

/* A byte range of one global source buffer that goes from its owner to node `peer`. */
typedef struct xn_chunk {
    uint32_t buf;  /* global buffer index */
    uint64_t off;  /* byte offset in it */
    uint64_t len;  /* bytes */
    int peer;      /* the other node (receiver of a send, sender of a receive) */
    uint64_t tag;  /* low 32 bits: local buffer index << 16 | chunk index */
} xn_chunk;

struct br_xnode {
    /* configuration (constant once started) */
    int node, nnodes;
    uint32_t first_rank, n_ranks; /* the trainer ranks of this node */
    rlb_model_config cfg;         /* the model's */
    const rlb_bridge_opts *opts;
    long long peer_timeout_ms;
    uint64_t chunk;               /* bytes per transfer, cut at multiples of it
                                     (RLB_XNODE_CHUNK_BYTES) */
    uint32_t max_slots;           /* chunks in bounded staging (RLB_XNODE_STAGING_BYTES) */
    pthread_t thread;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int wake_fd;               /* eventfd the thread writes when it reports to the loop */
    /* loop -> thread, under mu */
    int stop;                  /* the bridge stops */
    uint64_t job_v;            /* version asked for (0: none) */
    uint8_t *job_meta;         /* its registrations (owned) */
    size_t job_meta_len;
    void **job_ptr;            /* local buffer addresses, in the meta's order */
    uint8_t (*job_events)[64]; /* the local trainers' publish events (GPU memory) */
    uint32_t job_n_events;
    int job_rebuild;           /* the loop has no plan: build one */
    int job_prepared;          /* the local sync is loaded */
    int job_abort;             /* the local sync aborted */
    char job_why[512];
    /* thread -> loop, under mu */
    int busy;                  /* the thread works on job_v */
    int exchanged;             /* 1 done, -1 aborted, 0 pending */
    int outcome;               /* 1 commit, -1 abort, 0 pending */
    int code;                  /* the abort's code */
    char why[512];             /* the abort's reason */
    int have_plan;             /* src and plan below are new, for the loop to take */
    rlb_source src;
    rlb_plan plan;
    rlb_param_list *gparams;   /* the parameters src borrows: the model's and every node's
                                  adapters (handed to the loop with src) */
    int broken;                /* the transport or store failed for good */
    uint64_t bytes_sent;       /* chunk bytes sent to other nodes, in all */
    uint64_t bytes_received;   /* ... received from them */
    uint64_t bytes_skipped;    /* ... not sent: the receiver held them (xnode_delta.h) */
    /* the thread's own */
    rlb_store *store;
#ifdef RLB_HAVE_UCX
    rlb_xport *xp;             /* UCX: host memory */
    rlb_xport *xg;             /* NCCL: GPU memory; made by the first plan over GPU memory,
                                  connected by its first exchange (NULL: none) */
    rlb_xport *xt;             /* the transport of the plan built: xp, or xg (gpu) */
#endif
    int xg_ready;              /* xg is connected */
    int xg_stale;              /* an exchange over xg failed: the next build replaces it and
                                  its staging (the loop may still read them until then) */
    uint8_t (*events)[64];     /* the version's local publish events (from job_events) */
    uint32_t n_events;
    int gpu;                   /* the plan's sources are GPU memory: whole staging on the GPU
                                  through xg (one NCCL group a version, every chunk landing
                                  at once); manifests through the store, chunks hashed by
                                  the transport's digest */
    xn_meta *metas;            /* [nnodes] last decoded meta of each node */
    uint64_t *epochs;          /* [nnodes] its epoch (0: none yet) */
    uint8_t *my_meta;          /* the last meta this node wrote */
    size_t my_meta_len;
    uint64_t my_epoch;
    uint32_t n_global;         /* global source buffers */
    void **src_ptr;            /* [n_global] this node's view of them: its own segments,
                                  staging for what it receives, NULL for the rest */
    uint64_t *src_len;         /* [n_global] */
    uint32_t *base;            /* [nnodes + 1] first global buffer of each node */
    void **staging;            /* [n_global] whole staging: received copies of remote
                                  buffers, or NULL */
    xn_chunk *sends, *recvs;   /* recvs sorted by buffer and offset */
    uint32_t n_sends, n_recvs;
    int whole;                 /* whole staging, the plan run once every chunk is in (a plan
                                  with LoRA merges, or one that cannot be cut at chunks) */
    uint8_t *peer_whole;       /* [nnodes] node m's plan runs from whole staging: what it is
                                  sent goes with manifests (plan_whole; gpu: every plan runs
                                  from whole staging, manifests only for these) */
    uint32_t n_slots;          /* chunks in staging at once: max_slots, or all (whole) */
    uint8_t *slots;            /* bounded staging: n_slots chunks, chunk i in slot
                                  i % n_slots */
    xn_delta delta;            /* whole staging: what need not cross again (xnode_delta.h) */
    uint8_t *man_out;          /* [n_sends] whole staging: the manifests sent, per chunk 1
                                  when its bytes follow */
    uint8_t *man_in;           /* [n_recvs] the manifests received, likewise */
    /* the pipeline, under mu: thread -> loop, and loop -> thread */
    uint8_t *arrived;          /* [n_recvs] chunk i is in its staging */
    uint8_t *consumed;         /* [n_recvs] every op reading chunk i ran: its slot is free */
    int wave_on;               /* a wave of the loop reads the staging */
    /* the pipeline: the loop's own (br_xnode_pump) */
    int pipe_on;               /* set up for the version in flight */
    uint32_t *op_chunk;        /* [view ops] the chunk each op reads, or XN_LOCAL */
    uint8_t *op_done;          /* [view ops] it ran */
    uint32_t *chunk_left;      /* [n_recvs] ops not run yet that read chunk i */
    uint64_t n_done;           /* view ops that ran */
    int ran_whole;             /* whole staging: the one run ended well */
    uint64_t *wave;            /* [view ops] the view index of each op of the wave in flight */
    uint64_t n_wave;           /* its ops (0: no wave in flight) */
    rlb_plan wave_plan;        /* the wave: its ops, sources rewritten to slots */
    uint64_t *wave_nonfinite;  /* [view ops] non-finite values each op of the wave wrote */
    const void **wave_src;     /* [n_global + n_slots] the global sources, then the slots */
    uint64_t *wave_src_len;
    double pipe_ms;            /* the waves' executor time */
    uint64_t joined_v;         /* the last attempt this node joined: version, */
    int joined_k;              /* ... and attempt */
    int64_t *beat;             /* [nnodes] last heartbeat value seen */
    long long *beat_at;        /* [nnodes] when it last changed */
    long long next_beat;
};

/* Waits on x->cv (x->mu held) for at most ms. */
static void timed_wait(br_xnode *x, long ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += ms * 1000000L;
    ts.tv_sec += ts.tv_nsec / 1000000000L;
    ts.tv_nsec %= 1000000000L;
    pthread_cond_timedwait(&x->cv, &x->mu, &ts);
}

/* ---- Meta: encoding ------------------------------------------------------------------ */

/* A local source buffer: a segment of a local trainer rank (host or VMM memory), or one
 * CUDA IPC tensor's mapping (such a tensor has no segment: it is a buffer of its own, at
 * offset 0, as on one node). */
typedef struct xn_local {
    void *addr;     /* where the bridge mapped it */
    uint64_t bytes;
} xn_local;

/* Serializes the local ranks' tensors and the workers' target into *w and lists the local
 * buffers. The node's tensors are all in host memory or all in GPU memory (the transport
 * follows). Returns 0, or a negative code with why saying what cannot cross nodes. */
static int meta_encode(const bridge *b, xbuf *w, xn_local **locals, uint32_t *n_locals,
                       char *why, size_t len)
{
    br_xnode *x = b->xnode;
    uint32_t n_tensors = 0, n = 0, cap = 0, n_gpu = 0;
    const char *host_name = NULL, *gpu_name = NULL;
    xn_local *loc = NULL;
    xbuf tw = {0}; /* the tensors, after the buffers in the blob */
    for (uint32_t r = x->first_rank; r < x->first_rank + x->n_ranks; r++) {
        const br_peer *p = b->trainers[r];
        for (uint32_t i = 0; p && i < p->n_tensors; i++) {
            const br_tensor *t = &p->tensors[i];
            if (t->dropped)
                continue;
            if (t->mem == RLB_MEM_HOST_SHM) {
                host_name = host_name ? host_name : t->name;
            } else {
                gpu_name = gpu_name ? gpu_name : t->name;
                n_gpu++;
            }
            n_tensors++;
            const br_seg *sg = t->mem == RLB_MEM_CUDA_IPC ? NULL : br_seg_find((br_peer *)p,
                                                                                 t->seg);
            xn_local here = sg ? (xn_local){.addr = sg->addr, .bytes = sg->bytes}
                               : (xn_local){.addr = t->ipc_addr, .bytes = t->length};
            br_tensor at = *t; /* its place in that buffer */
            at.offset = sg ? t->offset : 0;
            uint32_t k = 0;
            while (k < n && loc[k].addr != here.addr)
                k++;
            if (k == n && n == cap) {
                cap = cap ? 2 * cap : 8;
                xn_local *g = realloc(loc, cap * sizeof(*g));
                if (!g) {
                    free(loc);
                    free(tw.p);
                    return RLB_ENOMEM;
                }
                loc = g;
            }
            if (k == n)
                loc[n++] = here;
            xn_meta_put_tensor(&tw, &at, k);
        }
    }
    if (host_name && gpu_name) {
        free(loc);
        free(tw.p);
        return snprintf(why, len, "node %d's trainers registered tensor '%s' in host memory "
                        "and '%s' in GPU memory: one node's tensors cross nodes from one kind "
                        "of memory", x->node, host_name, gpu_name), RLB_EUNSUPPORTED;
    }
    xn_meta_put_header(w, b->tp_size, b->n_replicas, b->wdt, n_gpu ? XN_MEM_GPU : XN_MEM_HOST,
                       n, n_tensors);
    for (uint32_t k = 0; k < n; k++)
        xn_meta_put_u64(w, loc[k].bytes);
    xn_meta_put(w, tw.p, tw.len);
    w->oom |= tw.oom;
    free(tw.p);
    const rlb_param_list *pl = &b->params;
    xn_meta_put_u32(w, (uint32_t)pl->n_adapters);
    for (int64_t i = 0; i < pl->n_adapters; i++) {
        const rlb_param_adapter *a = &pl->adapters[i];
        xn_meta_put_adapter(w, pl->params[a->base].name, (uint32_t)a->rank, a->scale);
    }
    *locals = loc;
    *n_locals = n;
    return w->oom ? RLB_ENOMEM : 0;
}

/* ---- The global plan ------------------------------------------------------------------ */

/* Whole staging's memory, from the plan's transport: host memory, or its GPU's (gpu). */
static int stage_alloc(br_xnode *x, uint64_t bytes, void **out)
{
#ifdef RLB_HAVE_UCX
    return x->xt->iface->mem_alloc(x->xt->ctx, (size_t)bytes, out);
#else
    return (*out = calloc(1, bytes + 1)) ? 0 : RLB_ENOMEM;
#endif
}

static void stage_free(br_xnode *x, void *p)
{
#ifdef RLB_HAVE_UCX
    if (p)
        x->xt->iface->mem_free(x->xt->ctx, p);
#else
    free(p);
#endif
}

static void free_built(br_xnode *x)
{
    for (uint32_t g = 0; x->staging && g < x->n_global; g++)
        stage_free(x, x->staging[g]);
    free(x->staging);
    free(x->peer_whole);
    free(x->src_ptr);
    free(x->src_len);
    free(x->base);
    free(x->sends);
    free(x->recvs);
    free(x->slots);
    free(x->arrived);
    free(x->consumed);
    free(x->man_out);
    free(x->man_in);
    xn_delta_free(&x->delta);
    x->slots = x->arrived = x->consumed = x->man_out = x->man_in = NULL;
    x->staging = NULL;
    x->peer_whole = NULL;
    x->src_ptr = NULL;
    x->src_len = NULL;
    x->base = NULL;
    x->sends = x->recvs = NULL;
    x->n_sends = x->n_recvs = 0;
    x->n_global = 0;
}

/* The node owning global buffer g. */
static int owner(const br_xnode *x, uint32_t g)
{
    int m = 0;
    while (g >= x->base[m + 1])
        m++;
    return m;
}

/* The model's parameters and every node's adapters, in node order (so every node builds the
 * same list), into x->gparams. Nodes must agree on an adapter they both declared. */
static int build_params(br_xnode *x, char *err, size_t len)
{
    rlb_param_list *pl = calloc(1, sizeof(*pl));
    if (!pl)
        return RLB_ENOMEM;
    int rc = rlb__params_init(pl, &x->cfg, err, len);
    if (rc) {
        free(pl);
        return rc;
    }
    x->gparams = pl;
    for (int m = 0; m < x->nnodes && rc == 0; m++)
        for (uint32_t i = 0; i < x->metas[m].n_adapters && rc == 0; i++) {
            const xn_adapter *a = &x->metas[m].adapters[i];
            const rlb_param_adapter *had = rlb__params_adapter_of(pl, rlb__params_find(pl,
                                                                                 a->target));
            if (!had) {
                rc = rlb__params_add_adapter(pl, a->target, a->rank, a->scale, err, len);
            } else if (had->rank != (int64_t)a->rank || had->scale != a->scale) {
                snprintf(err, len, "the LoRA adapter of '%s': node %d declares rank %u, scale "
                         "%g; an earlier node rank %lld, scale %g", a->target, m, a->rank,
                         (double)a->scale, (long long)had->rank, (double)had->scale);
                rc = RLB_EEXIST;
            }
        }
    return rc;
}

static void free_params(rlb_param_list **pl)
{
    if (*pl)
        rlb__params_free(*pl);
    free(*pl);
    *pl = NULL;
}

/* Adds every tensor of every node to src (global buffer of node m's buffer k: base[m] + k),
 * gathering each tensor's FSDP shards from all nodes. err says what is missing. */
static int build_source(br_xnode *x, rlb_source *src, char *err, size_t len)
{
    char e[256] = "";
    int rc = build_params(x, err, len);
    if (rc)
        return rc;
    rc = rlb__source_init(src, x->gparams);
    for (int m = 0; rc == 0 && m < x->nnodes; m++)
        for (uint32_t k = 0; rc == 0 && k < x->metas[m].n_bufs; k++)
            rc = rlb__source_add_buffer(src, x->metas[m].buf_bytes[k]) < 0 ? RLB_ENOMEM : 0;
    for (int m = 0; rc == 0 && m < x->nnodes; m++)
        for (uint32_t i = 0; rc == 0 && i < x->metas[m].n_tensors; i++) {
            const br_tensor *t = &x->metas[m].tensors[i];
            int seen = 0;
            for (int q = 0; q <= m && !seen; q++)
                for (uint32_t j = 0; j < (q == m ? i : x->metas[q].n_tensors) && !seen; j++)
                    seen = !strcmp(x->metas[q].tensors[j].name, t->name);
            if (seen)
                continue;
            uint32_t w = t->kind == RLB_LAYOUT_FULL ? 1 : t->fworld;
            rlb_src_loc *ranks = br_tensor_locs(t);
            if (!ranks)
                return RLB_ENOMEM;
            for (int q = m; q < x->nnodes; q++)
                for (uint32_t j = 0; j < x->metas[q].n_tensors; j++) {
                    const br_tensor *o = &x->metas[q].tensors[j];
                    if (strcmp(o->name, t->name) || (t->kind == RLB_LAYOUT_FULL && o != t))
                        continue;
                    uint32_t f = t->kind == RLB_LAYOUT_FULL ? 0 : o->frank;
                    if (o->kind != t->kind || o->fworld != t->fworld || f >= w) {
                        snprintf(err, len, "tensor '%s': nodes %d and %d registered it with "
                                 "different layouts", t->name, m, q);
                        free(ranks);
                        return RLB_EINVAL;
                    }
                    ranks[f] = (rlb_src_loc){.buffer = x->base[q] + o->seg, .offset = o->offset};
                }
            for (uint32_t f = 0; f < w && rc == 0; f++) {
                br_tensor shard = *t;
                shard.frank = f;
                if (ranks[f].buffer == RLB_SRC_NO_BUFFER && br_tensor_bytes(&shard) != 0) {
                    snprintf(err, len, "tensor '%s': FSDP shard %u of %u is registered on no "
                             "node", t->name, f, w);
                    rc = RLB_ENOTFOUND;
                }
            }
            if (rc == 0 && (rc = br_tensor_source_add(src, t, ranks, e)) < 0)
                snprintf(err, len, "%s", e);
            free(ranks);
        }
    if (rc == 0 && (rc = rlb__source_check(src, e, sizeof(e))) < 0)
        snprintf(err, len, "%s", e);
    return rc;
}

/* A byte range of a source buffer that a plan reads. */
typedef struct xn_range {
    uint32_t buf;
    uint64_t lo, hi;
    int factor;  /* read by a stage op: LoRA factor bytes, which change every version */
} xn_range;

static int range_cmp(const void *a, const void *b)
{
    const xn_range *p = a, *q = b;
    if (p->buf != q->buf)
        return p->buf < q->buf ? -1 : 1;
    return p->lo < q->lo ? -1 : p->lo > q->lo;
}

/* Appends to rg[*nr] the source ranges of ops[n] that cross between node m and another
 * node: those this node sends m (sends: owner is us), or those m receives (m is us). */
static void add_ranges(const br_xnode *x, int m, int sends, const rlb_copy_op *ops, uint64_t n,
                       int factor, xn_range *rg, uint64_t *nr)
{
    for (uint64_t i = 0; i < n; i++) {
        const rlb_copy_op *op = &ops[i];
        if (op->src_ref == RLB_PLAN_ZERO_SRC)
            continue;
        int o = owner(x, op->src_ref);
        if (o == m || (sends && o != x->node))
            continue;
        uint64_t es = rlb_dtype_size((rlb_dtype)op->src_dtype);
        rg[(*nr)++] = (xn_range){.buf = op->src_ref, .lo = op->src_offset,
                                 .hi = op->src_offset + (op->rows - 1) * op->src_stride +
                                       op->row_elems * es,
                                 .factor = factor};
    }
}

/* Appends to *list the chunks of the remote bytes node m's plan reads, merged per buffer:
 * those sent by this node (sends: owner is us) or received by it (m is us). A LoRA plan
 * reads sources through three lists: ops[], the stage ops (factor pieces) and the merges'
 * base copies. Factor bytes never share a chunk with other bytes, so after the first
 * version a chunk of the frozen base stays unchanged (xnode_delta.h). Local buffer index
 * 0xffff is not used: its tag is the manifests'. */
static int add_chunks(br_xnode *x, int m, const rlb_plan *plan, int sends, xn_chunk **list,
                      uint32_t *n, char *err, size_t len)
{
    xn_range *rg = malloc((plan->n_ops + plan->n_stage_ops + plan->n_merge_copies + 1) *
                          sizeof(*rg));
    uint64_t nr = 0;
    if (!rg)
        return RLB_ENOMEM;
    add_ranges(x, m, sends, plan->ops, plan->n_ops, 0, rg, &nr);
    add_ranges(x, m, sends, plan->stage_ops, plan->n_stage_ops, 1, rg, &nr);
    add_ranges(x, m, sends, plan->merge_copies, plan->n_merge_copies, 0, rg, &nr);
    qsort(rg, nr, sizeof(*rg), range_cmp);
    int rc = 0;
    uint32_t cur_buf = UINT32_MAX, chunk = 0;
    for (uint64_t i = 0; i < nr && rc == 0;) {
        xn_range r = rg[i++];
        while (i < nr && rg[i].buf == r.buf && rg[i].factor == r.factor && rg[i].lo <= r.hi) {
            r.hi = rg[i].hi > r.hi ? rg[i].hi : r.hi;
            i++;
        }
        if (r.buf != cur_buf) {
            cur_buf = r.buf;
            chunk = 0;
        }
        int o = owner(x, r.buf);
        uint32_t local = r.buf - x->base[o];
        for (uint64_t at = r.lo, end; at < r.hi && rc == 0; at = end) {
            end = (at / x->chunk + 1) * x->chunk; /* cut at multiples: never mid-element */
            end = end < r.hi ? end : r.hi;
            if (local >= XN_TAG_RESERVED || chunk > 0xffff) {
                snprintf(err, len, "node %d: too many source buffers or chunks to tag", o);
                rc = RLB_ETOOBIG;
                break;
            }
            xn_chunk *g = realloc(*list, (*n + 1) * sizeof(*g));
            if (!g) {
                rc = RLB_ENOMEM;
                break;
            }
            *list = g;
            g[(*n)++] = (xn_chunk){.buf = r.buf, .off = at, .len = end - at,
                                   .peer = sends ? m : o, .tag = (uint64_t)local << 16 | chunk++};
        }
    }
    free(rg);
    return rc;
}

/* A growing list of copy ops. */
typedef struct xn_ops {
    rlb_copy_op *p;
    uint64_t n, cap;
    int oom;
} xn_ops;

static void push_op(xn_ops *o, const rlb_copy_op *op)
{
    if (o->oom)
        return;
    if (o->n == o->cap) {
        uint64_t cap = o->cap ? 2 * o->cap : 64;
        rlb_copy_op *p = realloc(o->p, cap * sizeof(*p));
        if (!p) {
            o->oom = 1;
            return;
        }
        o->p = p;
        o->cap = cap;
    }
    o->p[o->n++] = *op;
}

/* Appends op cut at every multiple of `chunk` of its source bytes: runs of whole rows that
 * lie in one chunk, and a row that crosses boundaries in one piece per chunk. */
static void cut_op(xn_ops *out, const rlb_copy_op *op, uint64_t chunk)
{
    uint64_t es = rlb_dtype_size((rlb_dtype)op->src_dtype);
    uint64_t ds = rlb_dtype_size((rlb_dtype)op->dst_dtype);
    uint64_t rb = op->row_elems * es, run = 0, run_k = 0;
    for (uint64_t r = 0; r <= op->rows; r++) {
        uint64_t s = op->src_offset + r * op->src_stride, k = s / chunk;
        int fits = r < op->rows && (s + rb - 1) / chunk == k;
        if (fits && run && k == run_k) {
            run++;
            continue;
        }
        if (run) { /* rows r - run .. r - 1, all in chunk run_k */
            rlb_copy_op p = *op;
            p.src_offset += (r - run) * op->src_stride;
            p.dst_offset += (r - run) * op->dst_stride;
            p.rows = run;
            push_op(out, &p);
            run = 0;
        }
        if (r == op->rows)
            break;
        if (fits) {
            run = 1;
            run_k = k;
            continue;
        }
        for (uint64_t at = s, end; at < s + rb; at = end) {
            end = (at / chunk + 1) * chunk;
            end = end < s + rb ? end : s + rb;
            rlb_copy_op p = *op;
            p.src_offset = at;
            p.dst_offset = op->dst_offset + r * op->dst_stride + (at - s) / es * ds;
            p.rows = 1;
            p.row_elems = (end - at) / es;
            push_op(out, &p);
        }
    }
}

/* 1 when node m's plan runs from whole staging: it has LoRA merges, or an op reads another
 * node's elements at offsets that are not multiples of their size (a chunk boundary could
 * split one). Every node decides it alike for every plan, so a sender knows how each peer
 * receives (with manifests or not). */
static int plan_whole(const br_xnode *x, int m, const rlb_plan *plan)
{
    if (plan->n_merges || plan->n_stage_ops)
        return 1;
    for (uint64_t i = 0; i < plan->n_ops; i++) {
        const rlb_copy_op *op = &plan->ops[i];
        uint64_t es = rlb_dtype_size((rlb_dtype)op->src_dtype);
        if (op->src_ref != RLB_PLAN_ZERO_SRC && owner(x, op->src_ref) != m &&
            (op->src_offset % es || op->src_stride % es))
            return 1;
    }
    return 0;
}

/* Cuts the ops of this node's plan that read another node's buffer at the chunk boundaries
 * (add_chunks), so each op reads one received chunk and can run as soon as that chunk is
 * in (a plan that plan_whole passed). Returns 0 or RLB_ENOMEM. */
static int split_ops(const br_xnode *x, rlb_plan *plan)
{
    xn_ops out = {0};
    uint64_t *first = malloc((plan->n_dst + 1) * sizeof(*first));
    if (!first)
        return RLB_ENOMEM;
    for (uint32_t d = 0; d < plan->n_dst; d++) {
        first[d] = out.n;
        for (uint64_t i = plan->dst_first_op[d]; i < plan->dst_first_op[d + 1]; i++) {
            const rlb_copy_op *op = &plan->ops[i];
            if (op->src_ref == RLB_PLAN_ZERO_SRC || owner(x, op->src_ref) == x->node)
                push_op(&out, op);
            else
                cut_op(&out, op, x->chunk);
        }
    }
    first[plan->n_dst] = out.n;
    if (out.oom) {
        free(out.p);
        free(first);
        return RLB_ENOMEM;
    }
    free(plan->ops);
    free(plan->dst_first_op);
    plan->ops = out.p;
    plan->n_ops = out.n;
    plan->dst_first_op = first;
    return 0;
}

/* The staging of what this node receives. Bounded (a plan without LoRA merges, cut at the
 * chunks): max_slots chunks at once, each op of the loop reading its chunk's slot, so the
 * reshard of what arrived runs while the rest is in flight. Whole: a copy of every remote
 * buffer read, the plan run once every chunk is in; it outlives the version, so the next
 * one is sent only the chunks that changed (xnode_delta.h: a new plan starts with no
 * records, and an empty staging). */
static int stage(br_xnode *x, rlb_plan *mine)
{
    x->whole = x->peer_whole[x->node] || x->gpu;
    int rc = x->whole ? 0 : split_ops(x, mine);
    if (rc < 0)
        return rc;
    x->n_slots = x->whole || x->n_recvs < x->max_slots ? x->n_recvs : x->max_slots;
    x->arrived = calloc(x->n_recvs + 1, 1);
    x->consumed = calloc(x->n_recvs + 1, 1);
    x->man_out = calloc(x->n_sends + 1, 1);
    x->man_in = calloc(x->n_recvs + 1, 1);
    if (!x->arrived || !x->consumed || !x->man_out || !x->man_in ||
        xn_delta_reset(&x->delta, x->nnodes, x->n_sends) < 0)
        return RLB_ENOMEM;
    if (!x->whole)
        return (x->slots = malloc(x->n_slots * x->chunk + 1)) ? 0 : RLB_ENOMEM;
    for (uint32_t i = 0; i < x->n_recvs; i++) {
        uint32_t g = x->recvs[i].buf;
        if (!x->staging[g] && (rc = stage_alloc(x, x->src_len[g], &x->staging[g])) < 0)
            return rc;
        x->src_ptr[g] = x->staging[g];
    }
    return 0;
}

#ifdef RLB_HAVE_UCX
/* Where received chunk i lands. */
static uint8_t *recv_at(const br_xnode *x, uint32_t i)
{
    const xn_chunk *c = &x->recvs[i];
    return x->whole ? (uint8_t *)x->staging[c->buf] + c->off
                    : x->slots + (uint64_t)(i % x->n_slots) * x->chunk;
}
#endif

/* The transport of the plan (x->xt): UCX for host memory; NCCL where any node's buffers are
 * GPU memory, made here (once) on the GPU of this node's first buffer, or GPU 0 where it has
 * none. Every node decides alike from the same metas. Returns 0 or a negative code with
 * err. */
static int choose_xport(br_xnode *x, void *const *local_ptr, char *err, size_t len)
{
    int gpu = -1, host = -1;
    for (int m = 0; m < x->nnodes; m++) {
        if (x->metas[m].mem == XN_MEM_GPU)
            gpu = gpu < 0 ? m : gpu;
        else if (x->metas[m].n_bufs)
            host = host < 0 ? m : host;
    }
    x->gpu = gpu >= 0;
    if (gpu >= 0 && host >= 0)
        return snprintf(err, len, "node %d's trainers publish GPU memory and node %d's host "
                        "memory: every node's tensors must be in one kind of memory", gpu,
                        host), RLB_EUNSUPPORTED;
#ifdef RLB_HAVE_UCX
    if (x->xg && x->xg_stale) { /* its staging went in free_built, through it */
        rlb__xport_destroy(x->xg);
        x->xg = NULL;
    }
    x->xg_stale = 0;
    x->xt = x->xp;
    if (!x->gpu)
        return 0;
#ifdef RLB_HAVE_NCCL_XPORT
    if (!x->xg) {
        int dev = x->metas[x->node].n_bufs ? rlb__xport_nccl_device_of(local_ptr[0]) : 0;
        if (dev < 0)
            return snprintf(err, len, "node %d: its trainers' first buffer is not device "
                            "memory of a GPU this bridge sees", x->node), RLB_EINVAL;
        int rc = rlb__xport_nccl_create(x->node, x->nnodes, dev, &x->xg);
        if (rc < 0)
            return snprintf(err, len, "node %d cannot start the NCCL transport on GPU %d: %s",
                            x->node, dev, rlb_strerror(rc)), rc;
        x->xg_ready = 0;
    }
    x->xt = x->xg;
    return 0;
#else
    (void)local_ptr;
    return snprintf(err, len, "node %d's trainers publish GPU memory, which crosses nodes "
                    "through NCCL: this build has no NCCL transport", gpu), RLB_EUNSUPPORTED;
#endif
#else
    (void)local_ptr;
    return 0;
#endif
}

/* Builds the global source, every node's plan, this node's sends and receives and the
 * staging; this node's plan and source go to x->plan / x->src for the loop. */
static int build(br_xnode *x, void *const *local_ptr, char *err, size_t len)
{
    int rc = 0;
    free_built(x);
    if (x->have_plan) {
        rlb__plan_free(&x->plan);
        rlb__source_free(&x->src);
        x->have_plan = 0;
    }
    free_params(&x->gparams); /* the loop's, once it took the plan: NULL here then */
    x->base = calloc((size_t)x->nnodes + 1, sizeof(*x->base));
    if (!x->base)
        return RLB_ENOMEM;
    for (int m = 0; m < x->nnodes; m++)
        x->base[m + 1] = x->base[m] + x->metas[m].n_bufs;
    x->n_global = x->base[x->nnodes];
    x->staging = calloc(x->n_global + 1, sizeof(*x->staging));
    x->src_ptr = calloc(x->n_global + 1, sizeof(*x->src_ptr));
    x->src_len = calloc(x->n_global + 1, sizeof(*x->src_len));
    x->peer_whole = calloc((size_t)x->nnodes + 1, 1);
    if (!x->staging || !x->src_ptr || !x->src_len || !x->peer_whole)
        return RLB_ENOMEM;
    if ((rc = choose_xport(x, local_ptr, err, len)) < 0)
        return rc;
    rlb_source src = {0};
    if ((rc = build_source(x, &src, err, len)) < 0) {
        rlb__source_free(&src);
        return rc;
    }
    rlb_plan mine = {0};
    for (int m = 0; m < x->nnodes && rc == 0; m++) {
        const xn_meta *t = &x->metas[m];
        rlb_target tgt = {.tp_size = (int32_t)t->tp_size, .replicas = (int32_t)t->replicas,
                          .dtype = t->wdt};
        rlb_plan plan = {0};
        char e[256] = "";
        if (t->tp_size == 0)
            continue; /* no workers there: it needs nothing */
        rc = rlb__plan_build(&src, &tgt, &plan, e, sizeof(e));
        if (rc == 0)
            x->peer_whole[m] = (uint8_t)plan_whole(x, m, &plan);
        if (rc < 0) {
            snprintf(err, len, "node %d's plan: %s", m, e);
        } else if (m == x->node) {
            rc = add_chunks(x, m, &plan, 0, &x->recvs, &x->n_recvs, err, len);
            mine = plan;
            continue;
        } else {
            rc = add_chunks(x, m, &plan, 1, &x->sends, &x->n_sends, err, len);
        }
        rlb__plan_free(&plan);
    }
    for (uint32_t g = 0; g < x->n_global && rc == 0; g++) {
        int o = owner(x, g);
        x->src_len[g] = x->metas[o].buf_bytes[g - x->base[o]];
        x->src_ptr[g] = o == x->node ? local_ptr[g - x->base[o]] : NULL;
    }
    if (rc == 0)
        rc = stage(x, &mine);
    if (rc < 0) {
        rlb__plan_free(&mine);
        rlb__source_free(&src);
        return rc;
    }
    x->src = src;
    x->plan = mine;
    x->have_plan = 1;
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "xnode: node %d: global plan over %u buffers of %d nodes: "
                 "%u chunks to send, %u to receive into %s staging of %u chunks%s", x->node,
                 x->n_global, x->nnodes, x->n_sends, x->n_recvs,
                 x->whole ? "whole" : "bounded", x->n_slots,
                 x->gpu ? " on the GPU, through NCCL" : "");
    return 0;
}

/* 1 when every chunk is in (whole staging waits for that). */
static int all_arrived(br_xnode *x)
{
    int all = 1;
    pthread_mutex_lock(&x->mu);
    for (uint32_t k = 0; k < x->n_recvs && all; k++)
        all = x->arrived[k];
    pthread_mutex_unlock(&x->mu);
    return all;
}

/* ---- The thread ------------------------------------------------------------------------- */

/* Wakes the loop from its poll (br_xnode_fd) to read what the thread reported. */
static void wake_loop(br_xnode *x)
{
    uint64_t one = 1;
    ssize_t n = write(x->wake_fd, &one, sizeof(one));
    (void)n; /* a full counter still wakes the poll */
}

/* Records an outcome for the loop (under mu) and wakes it. */
static void report(br_xnode *x, int *field, int value, int code, const char *why)
{
    pthread_mutex_lock(&x->mu);
    *field = value;
    if (value < 0) {
        x->code = code;
        snprintf(x->why, sizeof(x->why), "%.500s", why);
    }
    pthread_mutex_unlock(&x->mu);
    wake_loop(x);
}

/* Beats, and checks that the job goes on: the launchers' abort key and every other node's
 * heartbeat. Returns 0, or a negative code with why naming the failure. */
static int alive(br_xnode *x, char *why, size_t len)
{
    char key[64], line[256];
    size_t n = 0;
    long long now = rlb__clock_ms();
    if (now < x->next_beat)
        return 0;
    x->next_beat = now + XN_CHECK_MS;
    int64_t v;
    snprintf(key, sizeof(key), "xbeat/%d", x->node);
    int rc = rlb__store_add(x->store, key, 1, &v);
    if (rc < 0)
        return snprintf(why, len, "node %d lost the rendezvous store: %s", x->node,
                        rlb_strerror(rc)), RLB_EPEERDEAD;
    if (rlb__store_get(x->store, "abort", line, sizeof(line) - 1, &n) == 0) {
        line[n] = 0;
        return snprintf(why, len, "the job is stopping: %s", line), RLB_EPEERDEAD;
    }
    for (int m = 0; m < x->nnodes; m++) {
        if (m == x->node)
            continue;
        snprintf(key, sizeof(key), "xbeat/%d", m);
        if ((rc = rlb__store_add(x->store, key, 0, &v)) < 0)
            return snprintf(why, len, "node %d lost the rendezvous store: %s", x->node,
                            rlb_strerror(rc)), RLB_EPEERDEAD;
        if (v != x->beat[m] || x->beat_at[m] == 0) {
            x->beat[m] = v;
            x->beat_at[m] = now;
        } else if (x->peer_timeout_ms > 0 && now - x->beat_at[m] > x->peer_timeout_ms) {
            return snprintf(why, len, "node %d's bridge stopped answering (no heartbeat for "
                            "%lld ms)", m, now - x->beat_at[m]), RLB_EPEERDEAD;
        }
    }
    return 0;
}

/* What a wait waits for: 1 when it came, 0 while it has not, or a negative code with why. */
typedef int (*xn_ready)(br_xnode *x, void *arg, char *why, size_t len);
/* What a wait does once when the loop aborts the version locally: 0 to go on waiting, or a
 * negative code (with why) to end the wait. */
typedef int (*xn_on_abort)(br_xnode *x, void *arg, char *why, size_t len);

/* Waits until ready says so, checking liveness. Only liveness bounds it (a heartbeat older
 * than RLB_PEER_TIMEOUT_MS, the job's abort key): a node whose trainers take long to publish,
 * a restart say, is alive and is waited for; past the peer timeout the wait says once what
 * it waits for. Polls every 0.1 ms at first, backing off to XN_NAP_MAX_NS. Returns 0 or a
 * negative code with why. */
static int wait_for(br_xnode *x, const char *what, xn_ready ready, void *arg,
                    xn_on_abort on_abort, void *abort_arg, char *why, size_t len)
{
    long nap_ns = XN_POLL_NS;
    long long t0 = rlb__clock_ms();
    int said = 0;
    for (;;) {
        int rc = ready(x, arg, why, len);
        if (rc != 0)
            return rc < 0 ? rc : 0;
        if ((rc = alive(x, why, len)) < 0)
            return rc;
        pthread_mutex_lock(&x->mu);
        int stop = x->stop, ab = x->job_abort;
        pthread_mutex_unlock(&x->mu);
        if (stop)
            return snprintf(why, len, "node %d's bridge is shutting down", x->node),
                   RLB_ESHUTDOWN;
        if (ab && on_abort && (rc = on_abort(x, abort_arg, why, len)) < 0)
            return rc;
        if (ab)
            on_abort = NULL;
        if (!said && x->peer_timeout_ms > 0 && rlb__clock_ms() - t0 > x->peer_timeout_ms) {
            said = 1;
            RLB_LOG_INFO(RLB_SUB_BRIDGE, "xnode: node %d: still waiting for %s after %lld ms "
                         "(every node's bridge is alive)", x->node, what, rlb__clock_ms() - t0);
        }
        struct timespec ts = {0, nap_ns};
        nanosleep(&ts, NULL);
        nap_ns = nap_ns * 2 < XN_NAP_MAX_NS ? nap_ns * 2 : XN_NAP_MAX_NS;
    }
}

/* A key awaited by wait_key, and where its value goes. */
typedef struct xn_key {
    const char *key;
    char *buf;   /* the value, NUL-terminated */
    size_t cap;
} xn_key;

static int key_set(br_xnode *x, void *arg, char *why, size_t len)
{
    xn_key *k = arg;
    size_t n = 0;
    int rc = rlb__store_get(x->store, k->key, k->buf, k->cap - 1, &n);
    if (rc == 0) {
        k->buf[n] = 0;
        return 1;
    }
    if (rc == RLB_ENOTFOUND)
        return 0;
    return snprintf(why, len, "node %d lost the rendezvous store: %s", x->node,
                    rlb_strerror(rc)), rc;
}

/* Waits (wait_for) until key is set; its value goes to buf (NUL-terminated). */
static int wait_key(br_xnode *x, const char *key, const char *what, char *buf, size_t cap,
                    xn_on_abort on_abort, void *arg, char *why, size_t len)
{
    xn_key k = {.key = key, .buf = buf, .cap = cap};
    return wait_for(x, what, key_set, &k, on_abort, arg, why, len);
}

typedef struct xn_version {
    uint64_t v;
    int k;              /* attempt */
    char base[64];      /* "x/<v>.<k>" */
    int aborted;        /* this node added its abort to the gate */
} xn_version;

/* Names attempt k + 1 the one a node publishing v from now on joins (x/<v>/cur). */
static int move_on(br_xnode *x, const xn_version *xv)
{
    char key[96], cur[24];
    int n = snprintf(cur, sizeof(cur), "%d", xv->k + 1);
    snprintf(key, sizeof(key), "x/%" PRIu64 "/cur", xv->v);
    return rlb__store_set(x->store, key, cur, (size_t)n);
}

/* The loop aborted while the gate is undecided: add our abort; the first aborter before
 * the gate opened closes it. */
static int gate_abort(br_xnode *x, void *arg, char *why, size_t len)
{
    xn_version *xv = arg;
    char key[96], off[600];
    int64_t a;
    if (xv->aborted)
        return 0;
    xv->aborted = 1;
    snprintf(key, sizeof(key), "%s/gate", xv->base);
    int rc = rlb__store_add(x->store, key, XN_BIG, &a);
    if (rc == 0 && (a >= 2 * XN_BIG || a - XN_BIG >= x->nnodes))
        return 0; /* someone closed it already, or it is open: the exchange runs */
    pthread_mutex_lock(&x->mu);
    int n = snprintf(off, sizeof(off), "off node %d: %s", x->node, x->job_why);
    pthread_mutex_unlock(&x->mu);
    if (rc == 0 && (rc = move_on(x, xv)) == 0) {
        snprintf(key, sizeof(key), "%s/go", xv->base);
        rc = rlb__store_set(x->store, key, off, (size_t)(n < (int)sizeof(off) ? n : (int)sizeof(off) - 1));
    }
    if (rc < 0)
        snprintf(why, len, "node %d lost the rendezvous store: %s", x->node, rlb_strerror(rc));
    return rc;
}

/* Reads x/<v>/cur into xv->k: 1 once it names an attempt this node has not joined yet. */
static int attempt_fresh(br_xnode *x, void *arg, char *why, size_t len)
{
    xn_version *xv = arg;
    char key[96], val[32];
    size_t n = 0;
    snprintf(key, sizeof(key), "x/%" PRIu64 "/cur", xv->v);
    int rc = rlb__store_get(x->store, key, val, sizeof(val) - 1, &n);
    if (rc < 0 && rc != RLB_ENOTFOUND)
        return snprintf(why, len, "node %d lost the rendezvous store: %s", x->node,
                        rlb_strerror(rc)), rc;
    val[rc == 0 ? n : 0] = 0;
    xv->k = atoi(val);
    return xv->v != x->joined_v || xv->k > x->joined_k;
}

/* The loop aborted before this node joined an attempt: nothing to undo elsewhere. */
static int abort_unjoined(br_xnode *x, void *arg, char *why, size_t len)
{
    pthread_mutex_lock(&x->mu);
    snprintf(why, len, "%s", x->job_why);
    pthread_mutex_unlock(&x->mu);
    return RLB_EABORTED;
}

/* Picks the attempt of xv->v this node joins: the one x/<v>/cur names, but never one it
 * joined before. A node that left an attempt whose gate had opened (its trainer died
 * mid-exchange, say) must not run that attempt's exchange again when its restarted
 * trainers publish v anew: the other nodes are past it, so it would wait there alone until
 * the exchange's bound gave up on it. Every attempt that does not commit has its successor
 * named (by node 0's decision, or by the node that closed its gate), so this waits for
 * that, bounded by liveness like the gate. Returns 0 or a negative code with why. */
static int join_attempt(br_xnode *x, xn_version *xv, char *why, size_t len)
{
    char what[96];
    snprintf(what, sizeof(what), "node 0 to settle version %" PRIu64 "'s attempt %d",
             xv->v, x->joined_k);
    int rc = wait_for(x, what, attempt_fresh, xv, abort_unjoined, NULL, why, len);
    if (rc < 0)
        return rc;
    x->joined_v = xv->v;
    x->joined_k = xv->k;
    snprintf(xv->base, sizeof(xv->base), "x/%" PRIu64 ".%d", xv->v, xv->k);
    return 0;
}

/* This node will not finish the exchange of an attempt whose gate opened: says why under
 * x/<v.k>/left (unless a node that left first did) and adds XN_BIG to x/<v.k>/in, so the
 * others' exchanges end at once rather than at their no-progress bound (exchange()). */
static void leave(br_xnode *x, const xn_version *xv, const char *why)
{
    char key[96], val[600], seen[1];
    size_t got;
    int64_t in;
    int n = snprintf(val, sizeof(val), "node %d left the exchange: %s", x->node, why);
    snprintf(key, sizeof(key), "%s/left", xv->base);
    int rc = rlb__store_get(x->store, key, seen, sizeof(seen), &got);
    if (rc == RLB_ENOTFOUND)
        rc = rlb__store_set(x->store, key, val,
                            (size_t)(n < (int)sizeof(val) ? n : (int)sizeof(val) - 1));
    else if (rc == RLB_ETOOBIG)
        rc = 0; /* a reason is there already */
    snprintf(key, sizeof(key), "%s/in", xv->base);
    if (rc == 0)
        rlb__store_add(x->store, key, XN_BIG, &in);
}

/* Fetches every other node's meta for this attempt. Returns 1 when one changed. */
static int fetch_metas(br_xnode *x, const xn_version *xv, char *why, size_t len)
{
    char key[96], val[32];
    int changed = 0;
    uint8_t *blob = malloc(RLB_STORE_VALUE_MAX);
    if (!blob)
        return RLB_ENOMEM;
    for (int m = 0; m < x->nnodes; m++) {
        size_t n = 0;
        if (m == x->node)
            continue;
        snprintf(key, sizeof(key), "%s/epoch/%d", xv->base, m);
        int rc = rlb__store_get(x->store, key, val, sizeof(val) - 1, &n);
        val[rc == 0 ? n : 0] = 0;
        uint64_t e = strtoull(val, NULL, 10);
        if (rc == 0 && e == x->epochs[m])
            continue;
        snprintf(key, sizeof(key), "xreg/%d/%" PRIu64, m, e);
        if (rc == 0)
            rc = rlb__store_get(x->store, key, blob, RLB_STORE_VALUE_MAX, &n);
        xn_meta meta;
        if (rc == 0)
            rc = xn_meta_decode(blob, n, &meta);
        if (rc < 0) {
            free(blob);
            return snprintf(why, len, "node %d's registrations (epoch %" PRIu64 ") cannot be "
                            "read: %s", m, e, rlb_strerror(rc)), rc;
        }
        xn_meta_free(&x->metas[m]);
        x->metas[m] = meta;
        x->epochs[m] = e;
        changed = 1;
    }
    free(blob);
    return changed;
}

#ifdef RLB_HAVE_UCX
/* Reads x/<v.k>/in: how many nodes posted their requests (XN_BIG more per node that left).
 * Returns 0, or RLB_EABORTED with why (the first leaver's reason) once a node left. */
static int entered(br_xnode *x, const xn_version *xv, int64_t *in, char *why, size_t len)
{
    char key[96];
    size_t n = 0;
    snprintf(key, sizeof(key), "%s/in", xv->base);
    int rc = rlb__store_add(x->store, key, 0, in);
    if (rc < 0)
        return snprintf(why, len, "node %d lost the rendezvous store: %s", x->node,
                        rlb_strerror(rc)), rc;
    if (*in < XN_BIG)
        return 0;
    snprintf(key, sizeof(key), "%s/left", xv->base);
    if (rlb__store_get(x->store, key, why, len - 1, &n) == 0)
        why[n] = 0;
    else
        snprintf(why, len, "another node left the exchange");
    return RLB_EABORTED;
}

/* Posts the receives whose staging is free, in order: chunk i once the loop ran every op
 * reading chunk i - n_slots (or, the version aborted here, once no wave reads the slots).
 * Returns the number posted (progress), or the transport's error. */
static int post_recvs(br_xnode *x, uint64_t vt, rlb_xreq **reqs, uint32_t *posted)
{
    int rc = 0, n = 0;
    pthread_mutex_lock(&x->mu);
    while (rc == 0 && *posted < x->n_recvs) {
        uint32_t i = *posted;
        if (i >= x->n_slots && !x->consumed[i - x->n_slots] && !(x->job_abort && !x->wave_on))
            break;
        pthread_mutex_unlock(&x->mu);
        const xn_chunk *c = &x->recvs[i];
        rc = x->xt->iface->irecv(x->xt->ctx, c->peer, vt | c->tag, recv_at(x, i), c->len,
                                 &reqs[i]);
        (*posted)++;
        n++;
        pthread_mutex_lock(&x->mu);
    }
    pthread_mutex_unlock(&x->mu);
    return rc < 0 ? rc : n;
}

/* ---- The exchange: whole staging sends only what changed (xnode_delta.h) ---------------- */

/* An exchange's requests are indexed: receives, sends, then (whole staging) the manifest
 * sent to each node, then the one received from each node. */
static uint32_t req_man_out(const br_xnode *x, int peer)
{
    return x->n_recvs + x->n_sends + (uint32_t)peer;
}

static uint32_t req_man_in(const br_xnode *x, int peer)
{
    return req_man_out(x, x->nnodes) + (uint32_t)peer;
}

/* The node at the other end of request i. */
static int req_peer(const br_xnode *x, uint32_t i)
{
    if (i < x->n_recvs)
        return x->recvs[i].peer;
    if (i < req_man_out(x, 0))
        return x->sends[i - x->n_recvs].peer;
    return (int)((i - req_man_out(x, 0)) % (uint32_t)x->nnodes);
}

/* The chunks of list[n] whose peer is p: [*first, *first + the count returned). They are
 * contiguous: sends are listed peer by peer, receives by global buffer, and each node's
 * buffers are consecutive there. */
static uint32_t span_of(const xn_chunk *list, uint32_t n, int p, uint32_t *first)
{
    uint32_t i = 0, k = 0;
    while (i < n && list[i].peer != p)
        i++;
    while (i + k < n && list[i + k].peer == p)
        k++;
    *first = i;
    return k;
}

/* A peer's x/<v.k>/have/<n>, awaited by send_changed. */
typedef struct xn_have {
    const xn_version *xv;
    xn_key key;
} xn_have;

/* 1 once the key is set. A node that left the exchange will not write it: that ends the
 * wait at once (RLB_EABORTED, its reason). */
static int have_ready(br_xnode *x, void *arg, char *why, size_t len)
{
    xn_have *h = arg;
    int64_t in;
    int rc = key_set(x, &h->key, why, len);
    return rc != 0 ? rc : entered(x, h->xv, &in, why, len);
}

/* GPU memory, some node's plan taking manifests: the digests of every send chunk
 * (out[2 i], out[2 i + 1] for chunk i), taken by the transport on the GPU after the
 * trainers' events. With LoRA every node's plan takes manifests, so hashing the chunks of a
 * node whose plan does not is rare (a misaligned plan beside LoRA-free ones) and only costs
 * a read. Returns 0 or a negative code with why. */
static int digest_sends(br_xnode *x, uint64_t **out, char *why, size_t len)
{
    const void **ptr = calloc(x->n_sends + 1, sizeof(*ptr));
    uint64_t *bytes = calloc(x->n_sends + 1, sizeof(*bytes));
    uint64_t *d = calloc(2 * (size_t)x->n_sends + 2, sizeof(*d));
    int rc = ptr && bytes && d ? 0 : RLB_ENOMEM;
    for (uint32_t i = 0; rc == 0 && i < x->n_sends; i++) {
        const xn_chunk *c = &x->sends[i];
        ptr[i] = (const uint8_t *)x->src_ptr[c->buf] + c->off;
        bytes[i] = c->len;
    }
    if (rc == 0 && (rc = x->xt->iface->digest(x->xt->ctx, ptr, bytes, x->n_sends, d)) < 0)
        snprintf(why, len, "node %d cannot hash its chunks on the GPU: %s", x->node,
                 rlb_strerror(rc));
    free(ptr);
    free(bytes);
    if (rc < 0) {
        free(d);
        d = NULL;
    }
    *out = d;
    return rc;
}

/* Whole staging: once `peer` said what its staging holds, sends it the manifest of the
 * chunks it is sent (1: the bytes follow, 0: unchanged since the attempt it holds), then
 * those chunks. GPU memory: the chunks' digests (digest_sends) decide, and the manifest
 * goes through the store (x/<v.k>/man/<from>/<to>, '0' or '1' per chunk), so the
 * receiver posts all of its receives in the version's one NCCL group. *left loses the
 * skipped ones, *skipped counts their bytes. Returns 0 or a negative code with why. */
static int send_changed(br_xnode *x, const xn_version *xv, int peer, uint64_t vt,
                        rlb_xreq **reqs, const uint64_t *digests, uint32_t *left,
                        uint64_t *skipped, char *why, size_t len)
{
    uint32_t first, n = span_of(x->sends, x->n_sends, peer, &first);
    char key[96], val[64], what[64];
    if (n == 0)
        return 0;
    snprintf(key, sizeof(key), "%s/have/%d", xv->base, peer);
    snprintf(what, sizeof(what), "node %d to post its transfers", peer);
    xn_have h = {.xv = xv, .key = {.key = key, .buf = val, .cap = sizeof(val)}};
    int rc = wait_for(x, what, have_ready, &h, NULL, NULL, why, len);
    if (rc < 0)
        return rc;
    int held = xn_delta_open(&x->delta, peer, xn_attempt_parse(val));
    for (uint32_t i = first; i < first + n; i++) {
        const xn_chunk *c = &x->sends[i];
        x->man_out[i] = (uint8_t)(
            digests ? xn_delta_changed_hash(&x->delta, i, held,
                                            (xn_hash){digests[2 * i], digests[2 * i + 1]})
                    : xn_delta_changed(&x->delta, i, held,
                                       (const uint8_t *)x->src_ptr[c->buf] + c->off, c->len));
    }
    xn_delta_close(&x->delta, peer, (xn_attempt){.v = xv->v, .k = (uint32_t)xv->k});
    if (digests) {
        char *man = malloc(n + 1);
        for (uint32_t i = 0; man && i < n; i++)
            man[i] = x->man_out[first + i] ? '1' : '0';
        snprintf(key, sizeof(key), "%s/man/%d/%d", xv->base, x->node, peer);
        rc = man ? rlb__store_set(x->store, key, man, n) : RLB_ENOMEM;
        free(man);
    } else {
        rc = x->xt->iface->isend(x->xt->ctx, peer, vt | XN_TAG_MANIFEST, x->man_out + first, n,
                                 &reqs[req_man_out(x, peer)]);
        (*left)++;
    }
    for (uint32_t i = first; i < first + n && rc == 0; i++) {
        const xn_chunk *c = &x->sends[i];
        if (!x->man_out[i]) {
            *skipped += c->len;
            (*left)--;
            continue;
        }
        rc = x->xt->iface->isend(x->xt->ctx, peer, vt | c->tag,
                                 (const uint8_t *)x->src_ptr[c->buf] + c->off, c->len,
                                 &reqs[x->n_recvs + i]);
    }
    if (rc < 0)
        snprintf(why, len, "node %d cannot send to node %d: %s", x->node, peer,
                 rlb_strerror(rc));
    return rc;
}

/* Sends `peer` (bounded staging) every chunk it is sent. Returns 0 or the transport's error
 * (why says it). */
static int send_all(br_xnode *x, int peer, uint64_t vt, rlb_xreq **reqs, char *why, size_t len)
{
    uint32_t first, n = span_of(x->sends, x->n_sends, peer, &first);
    int rc = 0;
    for (uint32_t i = first; i < first + n && rc == 0; i++) {
        const xn_chunk *c = &x->sends[i];
        rc = x->xt->iface->isend(x->xt->ctx, peer, vt | c->tag,
                                 (const uint8_t *)x->src_ptr[c->buf] + c->off, c->len,
                                 &reqs[x->n_recvs + i]);
    }
    if (rc < 0)
        snprintf(why, len, "node %d cannot start its transfers: %s", x->node, rlb_strerror(rc));
    return rc;
}

/* Whole staging: the manifest of `peer` is in: posts the receives of the chunks whose bytes
 * follow; the others are in the staging already (arrived), and leave *left. Returns 0 or the
 * transport's error. */
static int recv_changed(br_xnode *x, int peer, uint64_t vt, rlb_xreq **reqs, uint32_t *left)
{
    uint32_t first, n = span_of(x->recvs, x->n_recvs, peer, &first), kept = 0;
    int rc = 0;
    for (uint32_t i = first; i < first + n && rc == 0; i++) {
        const xn_chunk *c = &x->recvs[i];
        if (x->man_in[i]) {
            rc = x->xt->iface->irecv(x->xt->ctx, peer, vt | c->tag, recv_at(x, i), c->len,
                                     &reqs[i]);
            continue;
        }
        pthread_mutex_lock(&x->mu);
        x->arrived[i] = 1;
        pthread_mutex_unlock(&x->mu);
        kept++;
    }
    *left -= kept;
    if (kept)
        wake_loop(x);
    return rc;
}

/* GPU memory, whole staging with manifests: waits for peer's manifest in the store
 * (send_changed wrote it), then posts the receives of the chunks whose bytes follow
 * (recv_changed). Returns 0 or a negative code with why. */
static int manifest_from(br_xnode *x, const xn_version *xv, int peer, uint64_t vt,
                         rlb_xreq **reqs, uint32_t *left, char *why, size_t len)
{
    uint32_t first, n = span_of(x->recvs, x->n_recvs, peer, &first);
    if (n == 0 || peer == x->node)
        return 0;
    char key[96], what[64];
    char *val = malloc((size_t)n + 2);
    if (!val)
        return RLB_ENOMEM;
    snprintf(key, sizeof(key), "%s/man/%d/%d", xv->base, peer, x->node);
    snprintf(what, sizeof(what), "node %d's manifest", peer);
    xn_have h = {.xv = xv, .key = {.key = key, .buf = val, .cap = (size_t)n + 2}};
    int rc = wait_for(x, what, have_ready, &h, NULL, NULL, why, len);
    if (rc == 0 && strlen(val) != n)
        rc = (snprintf(why, len, "node %d's manifest names %zu chunks, not %u", peer,
                       strlen(val), n), RLB_EPROTO);
    for (uint32_t i = 0; rc == 0 && i < n; i++)
        x->man_in[first + i] = val[i] == '1';
    free(val);
    if (rc == 0 && (rc = recv_changed(x, peer, vt, reqs, left)) < 0)
        snprintf(why, len, "node %d cannot receive: %s", x->node, rlb_strerror(rc));
    return rc;
}

/* Whole staging, before any transfer: publishes what the staging holds
 * (x/<v.k>/have/<node>), which from now on is unknown until every receive of this attempt is
 * in, and posts the receives of the other nodes' manifests. Returns 0 or a negative code
 * with why. */
static int start_manifests(br_xnode *x, const xn_version *xv, uint64_t vt, rlb_xreq **reqs,
                           uint32_t *left, char *why, size_t len)
{
    char key[96], val[64];
    int n = xn_attempt_format(x->delta.have, val, sizeof(val));
    x->delta.have = (xn_attempt){0};
    snprintf(key, sizeof(key), "%s/have/%d", xv->base, x->node);
    int rc = rlb__store_set(x->store, key, val, (size_t)n);
    if (rc < 0)
        return snprintf(why, len, "node %d lost the rendezvous store: %s", x->node,
                        rlb_strerror(rc)), rc;
    for (int p = 0; p < x->nnodes && rc == 0 && !x->gpu; p++) { /* gpu: manifest_from */
        uint32_t first, k = span_of(x->recvs, x->n_recvs, p, &first);
        if (k == 0 || p == x->node)
            continue;
        rc = x->xt->iface->irecv(x->xt->ctx, p, vt | XN_TAG_MANIFEST, x->man_in + first, k,
                                 &reqs[req_man_in(x, p)]);
        (*left)++;
    }
    if (rc < 0)
        snprintf(why, len, "node %d cannot receive: %s", x->node, rlb_strerror(rc));
    return rc;
}

/* Runs this node's sends and receives of attempt xv to the end (also after an abort
 * elsewhere: every node that passed the gate runs the same exchange, so every request has
 * its match). Tags carry the attempt, so nothing left over from an earlier one can match.
 * Once its transfers are posted the loop takes the plan (exchanged = 1) and reshards each
 * chunk as it arrives (br_xnode_pump), freeing its slot for a later one. Whole staging
 * sends each peer a manifest first and then only the chunks that changed (send_changed,
 * recv_changed).
 * The no-progress bound runs only while every node is in (has posted its requests, counted
 * in x/<v.k>/in): until then a node still building its plan is waited for like one at the
 * gate, bounded by liveness; a node that left (leave()) ends the wait at once. *held says
 * whether a send (a manifest too) was still pending at the end. The byte counts go to the
 * loop's stats, and the log. Returns 0 or a negative code with why. */
static int exchange(br_xnode *x, const xn_version *xv, int *held, char *why, size_t len)
{
    uint32_t n = req_man_in(x, x->nnodes), posted = 0, left = x->n_sends + x->n_recvs;
    uint64_t sent = 0, received = 0, skipped = 0;
    rlb_xreq **reqs = calloc(n + 1, sizeof(*reqs));
    int rc = reqs ? 0 : RLB_ENOMEM;
    uint64_t vt = ((xv->v & 0xfff) << 4 | ((uint64_t)xv->k & 0xf)) << 32;
    pthread_mutex_lock(&x->mu);
    memset(x->arrived, 0, x->n_recvs);
    memset(x->consumed, 0, x->n_recvs);
    pthread_mutex_unlock(&x->mu);
    if (rc == 0 && x->peer_whole[x->node])
        rc = start_manifests(x, xv, vt, reqs, &left, why, len);
    if (rc == 0 && x->n_sends && x->n_events && x->xt->iface->after_events &&
        (rc = x->xt->iface->after_events(x->xt->ctx, (const uint8_t(*)[64])x->events,
                                         x->n_events)) < 0)
        snprintf(why, len, "node %d cannot order its sends after its trainers' work: %s",
                 x->node, rlb_strerror(rc));
    uint64_t *digests = NULL;
    int manifests = 0; /* some node's plan takes them */
    for (int p = 0; p < x->nnodes; p++)
        manifests |= p != x->node && x->peer_whole[p];
    if (rc == 0 && x->gpu && manifests)
        rc = digest_sends(x, &digests, why, len);
    for (int p = 0; p < x->nnodes && rc == 0; p++)
        rc = x->peer_whole[p] ? send_changed(x, xv, p, vt, reqs, digests, &left, &skipped, why,
                                             len)
                              : send_all(x, p, vt, reqs, why, len);
    free(digests);
    /* GPU: the manifests came through the store; the receives of what follows, at once */
    for (int p = 0; p < x->nnodes && rc == 0 && x->gpu && x->peer_whole[x->node]; p++)
        rc = manifest_from(x, xv, p, vt, reqs, &left, why, len);
    /* without manifests: bounded staging posts receives as slots free, GPU staging all of
     * them at once (its slots are every chunk) */
    int got = rc == 0 && !x->peer_whole[x->node] ? post_recvs(x, vt, reqs, &posted) : 0;
    if (got < 0) {
        rc = got;
        snprintf(why, len, "node %d cannot start its transfers: %s", x->node, rlb_strerror(rc));
    }
    if (!reqs)
        snprintf(why, len, "node %d: no memory for its transfers", x->node);
    char key[96];
    int64_t in = 0;
    snprintf(key, sizeof(key), "%s/in", xv->base);
    if (rc == 0 && (rc = rlb__store_add(x->store, key, 1, &in)) < 0)
        snprintf(why, len, "node %d lost the rendezvous store: %s", x->node, rlb_strerror(rc));
    if (rc == 0)
        report(x, &x->exchanged, 1, 0, "");
    long long last = rlb__clock_ms(), next_in = 0;
    while (rc == 0 && left) {
        uint32_t was_left = left;
        for (uint32_t i = 0; i < n && rc == 0; i++) {
            if (!reqs[i])
                continue;
            int r = x->xt->iface->test(x->xt->ctx, reqs[i]);
            if (r == RLB_EAGAIN)
                continue;
            reqs[i] = NULL;
            left--;
            last = rlb__clock_ms();
            if (r < 0) {
                rc = r;
                snprintf(why, len, "node %d: a transfer with node %d failed: %s", x->node,
                         req_peer(x, i), rlb_strerror(r));
            } else if (i < x->n_recvs) {
                received += x->recvs[i].len;
                pthread_mutex_lock(&x->mu);
                x->arrived[i] = 1;
                pthread_mutex_unlock(&x->mu);
                wake_loop(x);
            } else if (i < req_man_out(x, 0)) {
                sent += x->sends[i - x->n_recvs].len;
            } else if (i >= req_man_in(x, 0) &&
                       (rc = recv_changed(x, req_peer(x, i), vt, reqs, &left)) < 0) {
                snprintf(why, len, "node %d cannot receive: %s", x->node, rlb_strerror(rc));
            }
        }
        got = rc == 0 && !x->peer_whole[x->node] ? post_recvs(x, vt, reqs, &posted) : 0;
        if (got < 0) {
            rc = got;
            snprintf(why, len, "node %d cannot receive: %s", x->node, rlb_strerror(rc));
        }
        long long now = rlb__clock_ms();
        if (got > 0)
            last = now; /* the loop freed slots: progress */
        else if (left == was_left)
            sched_yield(); /* nothing moved: let the copy (and the peer) have the core */
        if (rc == 0 && left && in != x->nnodes && now >= next_in) {
            next_in = now + XN_CHECK_MS;
            rc = entered(x, xv, &in, why, len);
        }
        if (in != x->nnodes)
            last = now; /* not every node is in yet: no stall to measure */
        pthread_mutex_lock(&x->mu);
        int stop = x->stop;
        pthread_mutex_unlock(&x->mu);
        if (rc == 0 && stop) {
            snprintf(why, len, "node %d's bridge is shutting down", x->node);
            rc = RLB_ESHUTDOWN;
        }
        if (rc == 0 && left && (rc = alive(x, why, len)) == 0 && x->peer_timeout_ms > 0 &&
            now - last > x->peer_timeout_ms + 1000) {
            snprintf(why, len, "node %d: the exchange made no progress for %lld ms", x->node,
                     now - last);
            rc = RLB_ETIMEDOUT;
        }
    }
    for (uint32_t i = 0; reqs && i < n; i++) {
        /* a send (or manifest) a peer may still read */
        *held |= reqs[i] && i >= x->n_recvs && i < req_man_in(x, 0);
        if (reqs[i])
            x->xt->iface->cancel(x->xt->ctx, reqs[i]);
    }
    free(reqs);
    if (x->peer_whole[x->node] && all_arrived(x))
        x->delta.have = (xn_attempt){.v = xv->v, .k = (uint32_t)xv->k};
    pthread_mutex_lock(&x->mu);
    x->bytes_sent += sent;
    x->bytes_received += received;
    x->bytes_skipped += skipped;
    pthread_mutex_unlock(&x->mu);
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "xnode: node %d: version %" PRIu64 " (attempt %d): sent %"
                 PRIu64 " bytes, skipped %" PRIu64 " unchanged, received %" PRIu64, x->node,
                 xv->v, xv->k, sent, skipped, received);
    return rc;
}
#endif

#ifdef RLB_HAVE_UCX
/* The first exchange over GPU memory connects the NCCL transport: every node that passed
 * the gate built the same plan and comes here, bounded by the no-progress bound (a node that
 * left before it does not come). Keys under the attempt, so a later try starts afresh. */
static int connect_gpu(br_xnode *x, const xn_version *xv, char *why, size_t len)
{
    char prefix[96];
    long long ms = x->peer_timeout_ms > 0 ? x->peer_timeout_ms + 1000 : XN_CONNECT_MS;
    snprintf(prefix, sizeof(prefix), "%s/nccl", xv->base);
    int rc = rlb__xport_connect_all(x->xg, x->store, prefix, (int)ms);
    if (rc < 0)
        return snprintf(why, len, "node %d cannot connect NCCL to the other nodes' bridges: "
                        "%s", x->node, rlb_strerror(rc)), rc;
    x->xg_ready = 1;
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "xnode: node %d: NCCL connected to the other %d nodes for "
                 "GPU memory", x->node, x->nnodes - 1);
    return 0;
}

#endif

/* Reads x/<v.k>/done: 1 once every node ended its exchange of the attempt. */
static int all_done(br_xnode *x, void *arg, char *why, size_t len)
{
    const xn_version *xv = arg;
    char key[96];
    int64_t done = 0;
    snprintf(key, sizeof(key), "%s/done", xv->base);
    int rc = rlb__store_add(x->store, key, 0, &done);
    if (rc < 0)
        return snprintf(why, len, "node %d lost the rendezvous store: %s", x->node,
                        rlb_strerror(rc)), rc;
    return done >= x->nnodes;
}

/* This node's exchange of the attempt ended (x/<v.k>/done), however. One that ended with
 * sends still pending (it failed, or left) then waits, bounded by liveness, until every
 * node ended its own, having completed or cancelled its receives: UCX cannot take back a
 * rendezvous send, and a receive posted later (bounded staging posts them as slots free)
 * could still match it and read the trainers' memory, which the loop unmaps once this
 * thread is done with the version. */
static void settle(br_xnode *x, const xn_version *xv, int held)
{
    char key[96], why[512];
    int64_t done;
    snprintf(key, sizeof(key), "%s/done", xv->base);
    if (rlb__store_add(x->store, key, 1, &done) == 0 && held && done < x->nnodes)
        wait_for(x, "every node to stop receiving what this node sent", all_done, (void *)xv,
                 NULL, NULL, why, sizeof(why));
}

/* Writes this node's meta when it changed, and its epoch for the attempt. */
static int publish_meta(br_xnode *x, const xn_version *xv, const uint8_t *meta, size_t len)
{
    char key[96], val[32];
    int rc = 0;
    if (!x->my_meta || x->my_meta_len != len || memcmp(x->my_meta, meta, len)) {
        uint8_t *copy = malloc(len);
        if (!copy)
            return RLB_ENOMEM;
        memcpy(copy, meta, len);
        free(x->my_meta);
        x->my_meta = copy;
        x->my_meta_len = len;
        x->my_epoch++;
        snprintf(key, sizeof(key), "xreg/%d/%" PRIu64, x->node, x->my_epoch);
        if ((rc = rlb__store_set(x->store, key, meta, len)) < 0)
            return rc;
        xn_meta_free(&x->metas[x->node]);
        if ((rc = xn_meta_decode(meta, len, &x->metas[x->node])) < 0)
            return rc;
        x->epochs[x->node] = x->my_epoch;
    }
    int n = snprintf(val, sizeof(val), "%" PRIu64, x->my_epoch);
    snprintf(key, sizeof(key), "%s/epoch/%d", xv->base, x->node);
    return rlb__store_set(x->store, key, val, (size_t)n);
}

/* The commit phase: state, node 0's decision, the outcome. */
static void decide(br_xnode *x, xn_version *xv)
{
    char key[96], val[600], why[512] = "";
    int rc;
    pthread_mutex_lock(&x->mu);
    while (!x->job_prepared && !x->job_abort && !x->stop) {
        timed_wait(x, XN_CHECK_MS);
        pthread_mutex_unlock(&x->mu);
        alive(x, why, sizeof(why)); /* keep beating while the local sync runs */
        pthread_mutex_lock(&x->mu);
    }
    int ok = x->job_prepared && !x->job_abort && !x->stop;
    int n = ok ? snprintf(val, sizeof(val), "ok")
               : snprintf(val, sizeof(val), "abort node %d: %s", x->node,
                          x->stop ? "its bridge is shutting down" : x->job_why);
    pthread_mutex_unlock(&x->mu);
    snprintf(key, sizeof(key), "%s/state/%d", xv->base, x->node);
    rc = rlb__store_set(x->store, key, val, (size_t)(n < (int)sizeof(val) ? n : (int)sizeof(val) - 1));
    if (x->node == 0) {
        char first[600] = "";
        for (int m = 0; m < x->nnodes && rc == 0; m++) {
            char what[64];
            snprintf(key, sizeof(key), "%s/state/%d", xv->base, m);
            snprintf(what, sizeof(what), "node %d's local sync of version %" PRIu64, m, xv->v);
            rc = wait_key(x, key, what, val, sizeof(val), NULL, NULL, why, sizeof(why));
            if (rc == 0 && strcmp(val, "ok") && !first[0])
                snprintf(first, sizeof(first), "%s", val);
        }
        if (rc < 0)
            snprintf(first, sizeof(first), "abort %s", why);
        if (first[0])
            move_on(x, xv);
        snprintf(key, sizeof(key), "%s/outcome", xv->base);
        const char *out = first[0] ? first : "commit";
        rc = rlb__store_set(x->store, key, out, strlen(out));
        snprintf(val, sizeof(val), "%s", out);
    } else if (ok) {
        snprintf(key, sizeof(key), "%s/outcome", xv->base);
        rc = wait_key(x, key, "node 0's decision", val, sizeof(val), NULL, NULL, why,
                      sizeof(why));
        if (rc < 0)
            snprintf(val, sizeof(val), "abort %s", why);
    }
    if (!ok)
        return; /* the loop aborted already */
    if (!strcmp(val, "commit"))
        report(x, &x->outcome, 1, 0, "");
    else
        report(x, &x->outcome, -1, RLB_EABORTED, val + (strncmp(val, "abort ", 6) ? 0 : 6));
}

/* The version cannot go on here: logs it and tells the loop (which aborts it locally); a
 * peer or the transport gone for good breaks the exchange between nodes for the job. */
static void fail(br_xnode *x, const xn_version *xv, int rc, const char *why)
{
    if (rc == RLB_EPEERDEAD || rc == RLB_ETIMEDOUT) {
        pthread_mutex_lock(&x->mu);
        x->broken = 1;
        pthread_mutex_unlock(&x->mu);
    }
    RLB_LOG_WARN(RLB_SUB_BRIDGE, "xnode: node %d: version %" PRIu64 " aborted: %s", x->node,
                 xv->v, why);
    report(x, &x->exchanged, -1, rc, why);
}

/* One version, from the gate to the outcome. */
static void run_version(br_xnode *x)
{
    xn_version xv = {0};
    char key[96], val[600], what[96], why[512] = "";
    pthread_mutex_lock(&x->mu);
    xv.v = x->job_v;
    uint8_t *meta = x->job_meta;
    size_t meta_len = x->job_meta_len;
    void **local = x->job_ptr;
    int rebuild = x->job_rebuild;
    x->job_meta = NULL;
    x->job_ptr = NULL;
    free(x->events);
    x->events = x->job_events;
    x->n_events = x->job_n_events;
    x->job_events = NULL;
    x->job_n_events = 0;
    pthread_mutex_unlock(&x->mu);
    int rc = join_attempt(x, &xv, why, sizeof(why));
    int64_t r = 0;
    if (rc == 0) {
        rc = publish_meta(x, &xv, meta, meta_len);
        snprintf(key, sizeof(key), "%s/gate", xv.base);
        if (rc == 0)
            rc = rlb__store_add(x->store, key, 1, &r);
        if (rc == 0 && r == x->nnodes) {
            snprintf(key, sizeof(key), "%s/go", xv.base);
            rc = rlb__store_set(x->store, key, "on", 2);
        }
        if (rc < 0)
            snprintf(why, sizeof(why), "node %d lost the rendezvous store: %s", x->node,
                     rlb_strerror(rc));
    }
    snprintf(key, sizeof(key), "%s/go", xv.base);
    snprintf(what, sizeof(what), "every node's trainers to publish version %" PRIu64, xv.v);
    if (rc == 0)
        rc = wait_key(x, key, what, val, sizeof(val), gate_abort, &xv, why, sizeof(why));
    if (rc == 0 && strcmp(val, "on")) {
        snprintf(why, sizeof(why), "%s", val + (strncmp(val, "off ", 4) ? 0 : 4));
        rc = RLB_EABORTED;
    }
    if (rc < 0) { /* before the gate opened: the node that closed it named the next attempt */
        free(meta);
        free(local);
        fail(x, &xv, rc, why);
        return;
    }
    /* The gate opened: this attempt ends in node 0's decision, whatever happens here. */
    int held = 0;
    rc = fetch_metas(x, &xv, why, sizeof(why));
    if (rc >= 0 && (rc > 0 || rebuild || !x->base || x->xg_stale))
        rc = build(x, local, why, sizeof(why));
    if (rc >= 0) {
        /* the local buffers may have moved (registered again at the same layout) */
        for (uint32_t k = 0; k < x->metas[x->node].n_bufs; k++)
            x->src_ptr[x->base[x->node] + k] = local[k];
#ifdef RLB_HAVE_UCX
        if (x->gpu && !x->xg_ready)
            rc = connect_gpu(x, &xv, why, sizeof(why));
        if (rc >= 0)
            rc = exchange(x, &xv, &held, why, sizeof(why));
        if (rc < 0 && x->gpu)
            x->xg_stale = 1; /* out of step with the other nodes', or aborted: see build */
#endif
    }
    free(meta);
    free(local);
    if (rc < 0)
        leave(x, &xv, why);
    settle(x, &xv, held);
    if (rc < 0)
        fail(x, &xv, rc, why);
    decide(x, &xv);
}

static void *xn_main(void *arg)
{
    bridge *b = arg;
    br_xnode *x = b->xnode;
    const rlb_bridge_opts *o = b->opts;
    char why[512] = "";
    int rc = rlb__store_connect(o->store_addr, o->store_port, o->run_id, XN_CONNECT_MS,
                                &x->store, why, sizeof(why));
#ifdef RLB_HAVE_UCX
    if (rc == 0 && (rc = rlb__xport_ucx_create(x->node, x->nnodes, 0, &x->xp)) < 0)
        snprintf(why, sizeof(why), "cannot start the UCX transport: %s", rlb_strerror(rc));
    if (rc == 0 && (rc = rlb__xport_connect_all(x->xp, x->store, "xnode", XN_CONNECT_MS)) < 0)
        snprintf(why, sizeof(why), "cannot reach the other nodes' bridges: %s",
                 rlb_strerror(rc));
#endif
    if (rc < 0) {
        RLB_LOG_ERROR(RLB_SUB_BRIDGE, "xnode: node %d: %s", x->node, why);
        pthread_mutex_lock(&x->mu);
        x->broken = 1;
        snprintf(x->why, sizeof(x->why), "node %d: %.480s", x->node, why);
    } else {
        RLB_LOG_INFO(RLB_SUB_BRIDGE, "xnode: node %d of %d connected to every other node's "
                     "bridge", x->node, x->nnodes);
        pthread_mutex_lock(&x->mu);
    }
    while (!x->stop) {
        if (x->busy && !x->broken) {
            pthread_mutex_unlock(&x->mu);
            run_version(x);
            pthread_mutex_lock(&x->mu);
            x->busy = 0;
            continue;
        }
        timed_wait(x, XN_BEAT_MS);
        if (!x->broken && x->store && !x->busy && !x->stop) {
            pthread_mutex_unlock(&x->mu);
            if (alive(x, why, sizeof(why)) == RLB_EPEERDEAD && strstr(why, "store"))
                RLB_LOG_WARN(RLB_SUB_BRIDGE, "xnode: %s", why);
            pthread_mutex_lock(&x->mu);
        }
    }
    pthread_mutex_unlock(&x->mu);
    return NULL;
}

/* Reads a field the thread reports (exchanged, outcome) under mu; a negative one aborts the
 * version here with the thread's code and reason. Returns the value. */
static int take_report(bridge *b, const int *field)
{
    br_xnode *x = b->xnode;
    char why[512];
    pthread_mutex_lock(&x->mu);
    int v = *field, code = x->code;
    snprintf(why, sizeof(why), "%s", x->why);
    pthread_mutex_unlock(&x->mu);
    if (v < 0)
        br_sync_abort(b, code < 0 ? code : RLB_EABORTED, "%s", why);
    return v;
}

/* ---- The pipeline: the loop reshards each chunk as it arrives ----------------------------- */

/* The received chunk holding byte `off` of global buffer g, or XN_LOCAL. */
static uint32_t chunk_of(const br_xnode *x, uint32_t g, uint64_t off)
{
    uint32_t lo = 0, hi = x->n_recvs;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        const xn_chunk *c = &x->recvs[mid];
        if (c->buf < g || (c->buf == g && c->off + c->len <= off))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < x->n_recvs && x->recvs[lo].buf == g && x->recvs[lo].off <= off ? lo : XN_LOCAL;
}

static void pipe_free(br_xnode *x)
{
    free(x->op_chunk);
    free(x->op_done);
    free(x->chunk_left);
    free(x->wave);
    free(x->wave_plan.ops);
    free(x->wave_nonfinite);
    free(x->wave_src);
    free(x->wave_src_len);
    x->op_chunk = x->chunk_left = NULL;
    x->op_done = NULL;
    x->wave = x->wave_nonfinite = x->wave_src_len = NULL;
    x->wave_plan.ops = NULL;
    x->wave_src = NULL;
}

/* Sets up the pipeline over the bound copy (b->copy.view, the live replicas' ops): which
 * chunk each op reads; chunks no op reads are consumed at once. Whole staging runs the view
 * once, every chunk in (its stage ops and merge copies read chunks too): no op waits for
 * one chunk there. Returns 0 or RLB_ENOMEM. */
static int pipe_init(bridge *b)
{
    br_xnode *x = b->xnode;
    br_copy *c = &b->copy;
    uint64_t n = c->view.n_ops;
    uint32_t n_src = x->n_global + x->n_slots;
    pipe_free(x);
    x->op_chunk = malloc((n + 1) * sizeof(*x->op_chunk));
    x->op_done = calloc(n + 1, 1);
    x->chunk_left = calloc(x->n_recvs + 1, sizeof(*x->chunk_left));
    x->wave = malloc((n + 1) * sizeof(*x->wave));
    x->wave_plan.ops = malloc((n + 1) * sizeof(*x->wave_plan.ops));
    x->wave_nonfinite = malloc((n + 1) * sizeof(*x->wave_nonfinite));
    x->wave_src = malloc((n_src + 1) * sizeof(*x->wave_src));
    x->wave_src_len = malloc((n_src + 1) * sizeof(*x->wave_src_len));
    if (!x->op_chunk || !x->op_done || !x->chunk_left || !x->wave || !x->wave_plan.ops ||
        !x->wave_nonfinite || !x->wave_src || !x->wave_src_len)
        return RLB_ENOMEM;
    memset(c->nonfinite, 0, (n + c->view.n_merges) * sizeof(*c->nonfinite));
    for (uint64_t i = 0; i < n; i++) {
        const rlb_copy_op *op = &c->view.ops[i];
        x->op_chunk[i] = op->src_ref == RLB_PLAN_ZERO_SRC || x->whole
                             ? XN_LOCAL
                             : chunk_of(x, op->src_ref, op->src_offset);
        if (x->op_chunk[i] != XN_LOCAL)
            x->chunk_left[x->op_chunk[i]]++;
    }
    for (uint32_t g = 0; g < x->n_global; g++) { /* another node's buffer: only slots */
        x->wave_src[g] = c->src[g];
        x->wave_src_len[g] = c->src[g] ? c->src_len[g] : 0;
    }
    for (uint32_t s = 0; s < x->n_slots && !x->whole; s++) {
        x->wave_src[x->n_global + s] = x->slots + (uint64_t)s * x->chunk;
        x->wave_src_len[x->n_global + s] = x->chunk;
    }
    pthread_mutex_lock(&x->mu);
    for (uint32_t k = 0; k < x->n_recvs; k++)
        x->consumed[k] |= x->chunk_left[k] == 0;
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
    x->n_done = 0;
    x->n_wave = 0;
    x->ran_whole = 0;
    x->pipe_ms = 0;
    x->pipe_on = 1;
    return 0;
}

/* Gathers the next wave (bounded staging): every op not run yet whose chunk is in. Returns
 * its op count. */
static uint64_t next_wave(br_xnode *x, const br_copy *c)
{
    uint64_t n = 0;
    pthread_mutex_lock(&x->mu);
    for (uint64_t i = 0; i < c->view.n_ops; i++) {
        uint32_t k = x->op_chunk[i];
        if (!x->op_done[i] && (k == XN_LOCAL || x->arrived[k]))
            x->wave[n++] = i;
    }
    pthread_mutex_unlock(&x->mu);
    return n;
}

int br_xnode_pump(bridge *b)
{
    br_xnode *x = b->xnode;
    br_copy *c = &b->copy;
    if (!x->pipe_on && pipe_init(b) < 0) {
        br_sync_abort(b, RLB_ENOMEM, "version %" PRIu64 ": no memory for the pipeline",
                      b->syncing);
        return -1;
    }
    if (take_report(b, &x->exchanged) < 0)
        return -1; /* the exchange failed */
    if (x->n_done == c->view.n_ops && (!x->whole || x->ran_whole)) {
        c->ms = x->pipe_ms;
        return 2;
    }
    rlb_exec_run run = {.dst = c->dst, .dst_len = c->dst_len,
                        .events = (const uint8_t(*)[64])c->events, .n_events = c->n_events,
                        .threads = c->threads, .done_fd = c->wake_fd};
    if (x->whole) { /* the bound copy as it is: its sources are the whole staging */
        if (!all_arrived(x))
            return 0;
        run.plan = &c->view;
        run.src = (void *const *)c->src;
        run.src_len = c->src_len;
        run.nonfinite = c->nonfinite;
    } else {
        if (!(x->n_wave = next_wave(x, c)))
            return 0;
        x->wave_plan = (rlb_plan){.n_src = x->n_global + x->n_slots, .n_dst = c->view.n_dst,
                                  .n_ops = x->n_wave, .ops = x->wave_plan.ops};
        for (uint64_t k = 0; k < x->n_wave; k++) {
            rlb_copy_op *op = &x->wave_plan.ops[k];
            uint32_t chunk = x->op_chunk[x->wave[k]];
            *op = c->view.ops[x->wave[k]];
            if (chunk == XN_LOCAL)
                continue;
            op->src_ref = x->n_global + chunk % x->n_slots;
            op->src_offset -= x->recvs[chunk].off;
        }
        run.plan = &x->wave_plan;
        run.src = (void *const *)x->wave_src;
        run.src_len = x->wave_src_len;
        run.nonfinite = x->wave_nonfinite;
    }
    pthread_mutex_lock(&x->mu);
    x->wave_on = 1;
    pthread_mutex_unlock(&x->mu);
    c->err[0] = 0;
    int rc = br_executor(b)->iface->run(br_executor(b), &run, c->err, sizeof(c->err));
    if (rc < 0) {
        pthread_mutex_lock(&x->mu);
        x->wave_on = 0;
        pthread_cond_broadcast(&x->cv);
        pthread_mutex_unlock(&x->mu);
        x->n_wave = 0;
        br_sync_abort(b, rc, "cannot start the copy: %s", c->err[0] ? c->err : rlb_strerror(rc));
        return -1;
    }
    b->copy_running = 1;
    b->copied = 1;
    return 1;
}

void br_xnode_joined(bridge *b)
{
    br_xnode *x = b->xnode;
    br_copy *c = &b->copy;
    if (!x || !x->pipe_on || !x->wave_on)
        return;
    pthread_mutex_lock(&x->mu);
    x->wave_on = 0;
    for (uint64_t k = 0; k < x->n_wave && c->rc == 0; k++) {
        uint64_t i = x->wave[k];
        uint32_t chunk = x->op_chunk[i];
        x->op_done[i] = 1;
        c->nonfinite[i] += x->wave_nonfinite[k];
        if (chunk != XN_LOCAL && --x->chunk_left[chunk] == 0)
            x->consumed[chunk] = 1;
    }
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
    if (c->rc == 0) {
        x->n_done += x->whole ? c->view.n_ops : x->n_wave;
        x->ran_whole = x->whole;
    }
    x->pipe_ms += c->ms;
    x->n_wave = 0;
}

/* ---- The loop's side ---------------------------------------------------------------------- */

int br_xnode_start(bridge *b)
{
    const rlb_bridge_opts *o = b->opts;
    if (o->nnodes <= 1)
        return 0;
    if (o->node_rank < 0 || o->node_rank >= o->nnodes || !o->store_addr || !o->run_id ||
        o->store_port <= 0 || o->n_ranks == 0)
        return RLB_EINVAL;
#ifndef RLB_HAVE_UCX
    RLB_LOG_ERROR(RLB_SUB_BRIDGE, "xnode: this build has no transport between nodes (UCX)");
    return RLB_EUNSUPPORTED;
#endif
    br_xnode *x = calloc(1, sizeof(*x));
    if (!x)
        return RLB_ENOMEM;
    x->node = o->node_rank;
    x->nnodes = o->nnodes;
    x->first_rank = o->first_rank;
    x->n_ranks = o->n_ranks;
    x->cfg = b->params.cfg;
    x->opts = o;
    x->peer_timeout_ms = rlb__env_int(RLB_KNOB_PEER_TIMEOUT_MS);
    long long chunk = rlb__env_int(RLB_KNOB_XNODE_CHUNK_BYTES);
    long long staging = rlb__env_int(RLB_KNOB_XNODE_STAGING_BYTES);
    x->chunk = chunk >= 64 ? (uint64_t)chunk / 64 * 64 : 64; /* whole elements of any dtype */
    x->max_slots = staging / (long long)x->chunk > 1 ? (uint32_t)(staging / (long long)x->chunk)
                                                     : 1;
    x->metas = calloc((size_t)o->nnodes, sizeof(*x->metas));
    x->epochs = calloc((size_t)o->nnodes, sizeof(*x->epochs));
    x->beat = calloc((size_t)o->nnodes, sizeof(*x->beat));
    x->beat_at = calloc((size_t)o->nnodes, sizeof(*x->beat_at));
    x->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->cv, NULL);
    b->xnode = x;
    if (!x->metas || !x->epochs || !x->beat || !x->beat_at || x->wake_fd < 0 ||
        pthread_create(&x->thread, NULL, xn_main, b) != 0) {
        br_xnode_stop(b);
        return RLB_ENOMEM;
    }
    x->started = 1;
    RLB_LOG_INFO(RLB_SUB_BRIDGE, "xnode: node %d of %d, trainer ranks %u..%u, store %s:%d",
                 x->node, x->nnodes, x->first_rank, x->first_rank + x->n_ranks - 1,
                 o->store_addr, o->store_port);
    return 0;
}

void br_xnode_stop(bridge *b)
{
    br_xnode *x = b->xnode;
    if (!x)
        return;
    if (x->started) {
        pthread_mutex_lock(&x->mu);
        x->stop = 1;
        pthread_cond_broadcast(&x->cv);
        pthread_mutex_unlock(&x->mu);
        pthread_join(x->thread, NULL);
    }
    free_built(x); /* staging first: it may be the GPU transport's memory */
#ifdef RLB_HAVE_UCX
    rlb__xport_destroy(x->xg);
    rlb__xport_destroy(x->xp);
#endif
    rlb__store_close(x->store);
    if (x->have_plan) {
        rlb__plan_free(&x->plan);
        rlb__source_free(&x->src);
    }
    free_params(&x->gparams);
    for (int m = 0; x->metas && m < x->nnodes; m++)
        xn_meta_free(&x->metas[m]);
    free(x->metas);
    free(x->epochs);
    free(x->beat);
    free(x->beat_at);
    pipe_free(x);
    free(x->my_meta);
    free(x->job_meta);
    free(x->job_ptr);
    free(x->job_events);
    free(x->events);
    if (x->wake_fd >= 0)
        close(x->wake_fd);
    pthread_mutex_destroy(&x->mu);
    pthread_cond_destroy(&x->cv);
    free(x);
    b->xnode = NULL;
}

int br_xnode_fd(const bridge *b)
{
    return b->xnode ? b->xnode->wake_fd : -1;
}

int br_xnode_remote_rank(const bridge *b, uint32_t rank)
{
    const br_xnode *x = b->xnode;
    return x && (rank < x->first_rank || rank >= x->first_rank + x->n_ranks);
}

void br_xnode_bytes(const bridge *b, uint64_t *sent, uint64_t *received, uint64_t *skipped)
{
    br_xnode *x = b->xnode;
    *sent = *received = *skipped = 0;
    if (!x)
        return;
    pthread_mutex_lock(&x->mu);
    *sent = x->bytes_sent;
    *received = x->bytes_received;
    *skipped = x->bytes_skipped;
    pthread_mutex_unlock(&x->mu);
}

int br_xnode_busy(const bridge *b)
{
    br_xnode *x = b->xnode;
    if (!x)
        return 0;
    pthread_mutex_lock(&x->mu);
    int busy = x->busy;
    pthread_mutex_unlock(&x->mu);
    return busy;
}

void br_xnode_tick(bridge *b)
{
    if (b->xnode && b->n_parked && !b->copy_running && !br_xnode_busy(b))
        br_unpark(b);
}

int br_xnode_begin(bridge *b, uint64_t v)
{
    br_xnode *x = b->xnode;
    char why[512] = "";
    xn_local *loc = NULL;
    uint32_t n_loc = 0;
    if (br_xnode_busy(b))
        return 0;
    xbuf w = {0};
    int rc = meta_encode(b, &w, &loc, &n_loc, why, sizeof(why));
    void **ptr = calloc(n_loc + 1, sizeof(*ptr));
    if (rc == 0 && !ptr)
        rc = RLB_ENOMEM;
    for (uint32_t k = 0; rc == 0 && k < n_loc; k++)
        ptr[k] = loc[k].addr;
    free(loc);
    /* the local ranks' publish events: sends of GPU memory wait for the work before them */
    uint8_t(*ev)[64] = rc == 0 ? calloc(x->n_ranks + 1, sizeof(*ev)) : NULL;
    uint32_t n_ev = 0;
    if (rc == 0 && !ev)
        rc = RLB_ENOMEM;
    for (uint32_t r = x->first_rank; rc == 0 && r < x->first_rank + x->n_ranks; r++)
        if (b->trainers[r] && b->trainers[r]->has_event)
            memcpy(ev[n_ev++], b->trainers[r]->event, sizeof(*ev));
    b->syncing = v;
    b->sync = BR_SYNC_XNODE;
    pthread_mutex_lock(&x->mu);
    if (rc == 0 && x->broken)
        rc = RLB_EPEERDEAD;
    if (rc == 0) {
        x->job_v = v;
        x->job_meta = w.p;
        x->job_meta_len = w.len;
        x->job_ptr = ptr;
        free(x->job_events);
        x->job_events = ev;
        x->job_n_events = n_ev;
        ev = NULL;
        x->job_rebuild = !b->plan_ready;
        x->job_prepared = x->job_abort = 0;
        x->exchanged = x->outcome = 0;
        x->busy = 1;
        pthread_cond_broadcast(&x->cv);
    } else if (x->broken) {
        snprintf(why, sizeof(why), "%s", x->why[0] ? x->why : "the exchange between nodes "
                 "failed earlier; the job must restart");
    }
    pthread_mutex_unlock(&x->mu);
    free(ev);
    if (rc < 0) {
        free(w.p);
        free(ptr);
        br_sync_abort(b, rc, "version %" PRIu64 ": %s", v, why[0] ? why : rlb_strerror(rc));
    }
    return 1;
}

int br_xnode_poll(bridge *b)
{
    br_xnode *x = b->xnode;
    char why[512];
    pthread_mutex_lock(&x->mu);
    int ex = x->exchanged, code = x->code;
    snprintf(why, sizeof(why), "%s", x->why);
    if (ex > 0 && x->have_plan) { /* a new plan: the loop takes it */
        br_plan_reset(b);
        b->source = x->src;
        b->plan = x->plan;
        b->xparams = x->gparams; /* what the source borrows */
        x->gparams = NULL;
        b->src_ptr = malloc((x->n_global + 1) * sizeof(*b->src_ptr));
        b->src_len = malloc((x->n_global + 1) * sizeof(*b->src_len));
        b->plan_ready = b->src_ptr && b->src_len;
        b->n_src = x->n_global;
        x->have_plan = 0;
    }
    if (ex > 0 && b->plan_ready && b->n_src == x->n_global) {
        /* the thread's table, bound for this version (the trainers' segments may have moved
         * since the plan was built; the staging buffers stay) */
        memcpy(b->src_ptr, x->src_ptr, x->n_global * sizeof(*b->src_ptr));
        memcpy(b->src_len, x->src_len, x->n_global * sizeof(*b->src_len));
    }
    pthread_mutex_unlock(&x->mu);
    if (ex == 0)
        return 0;
    if (ex < 0) {
        br_sync_abort(b, code < 0 ? code : RLB_EABORTED, "%s", why);
        return -1;
    }
    if (!b->plan_ready || b->plan.n_dst != b->tp_size * b->n_replicas) {
        br_sync_abort(b, RLB_EAGAIN, "version %" PRIu64 ": the workers changed during the "
                      "exchange between nodes", b->syncing);
        return -1;
    }
    x->pipe_on = 0; /* br_xnode_pump sets up this version's pipeline */
    return 1;
}

int br_xnode_commit_ready(bridge *b)
{
    br_xnode *x = b->xnode;
    if (!x)
        return 1;
    pthread_mutex_lock(&x->mu);
    if (!x->job_prepared) {
        x->job_prepared = 1;
        pthread_cond_broadcast(&x->cv);
    }
    pthread_mutex_unlock(&x->mu);
    int out = take_report(b, &x->outcome);
    return out < 0 ? -1 : out > 0;
}

int br_xnode_abort_hook(bridge *b, int code, const char *text)
{
    br_xnode *x = b->xnode;
    if (!x)
        return 0;
    /* Prepared (in LOAD, every worker loaded): node 0's outcome alone ends the version, be it
     * still pending or already a commit that this loop has not acted on yet. */
    pthread_mutex_lock(&x->mu);
    int defer = b->sync == BR_SYNC_LOAD && x->job_prepared && x->outcome >= 0 &&
                code != RLB_ESHUTDOWN;
    if (!defer && x->busy && !x->job_abort) {
        x->job_abort = 1;
        snprintf(x->job_why, sizeof(x->job_why), "%s", text);
        pthread_cond_broadcast(&x->cv);
    }
    pthread_mutex_unlock(&x->mu);
    if (!defer)
        return 0;
    /* A replica that lost a worker leaves the sync; the others commit with node 0. */
    for (uint32_t d = 0; d < b->n_replicas; d++)
        for (uint32_t t = 0; b->replicas[d].in_sync && t < b->tp_size; t++)
            if (!b->replicas[d].ranks[t])
                b->replicas[d].in_sync = 0;
    RLB_LOG_WARN(RLB_SUB_BRIDGE, "xnode: node %d prepared version %" PRIu64 "; node 0 decides "
                 "its outcome (not aborted here: %s)", x->node, b->syncing, text);
    return 1;
}
